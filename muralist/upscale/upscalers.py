"""Image upscalers named and applied the way A1111 does: None, Lanczos, Nearest and model files.

Model files live in A1111's folders ``models/ESRGAN``, ``models/RealESRGAN`` and ``models/SwinIR``
(``.pth``, ``.pt``, ``.safetensors``). Their architecture is read from tensor names and shapes, never
from the file name, so every size of these networks loads through the same path:

* ESRGAN RRDBNet in the old ESRGAN layout (``model.0``, ``model.1.sub.N.RDBk.convJ.0``, ...), the
  BSRGAN layout (``RRDB_trunk``, ``trunk_conv``, ``upconvN``, ``HRconv``) and basicsr's layout
  (``conv_first``, ``body.N.rdbK.convJ``, ...), including Real-ESRGAN's pixel-unshuffle input for
  2x and 1x models;
* Real-ESRGAN's SRVGGNetCompact (general-x4v3, animevideov3) with PReLU activations;
* SwinIR (classical, lightweight, real-world and denoising/JPEG heads; not Swin2SR or HAT).

The networks are written here rather than taken from spandrel/basicsr, which need torchvision.
They run in float32 on RGB in [0, 1] (the colour order they were trained on; A1111 feeds them BGR,
which shifts colours slightly) and tile large images so memory stays bounded by one tile.

Sizes follow A1111's ``Upscaler.upscale``: the target is ``int(w * scale // 8 * 8)`` by the same for
the height, a model is applied up to 3 times until the image is at least that big, then Lanczos
resizes to the exact target. An explicit target size follows ``images.resize_image``: upscale by
``max(tw / w, th / h)`` when that exceeds 1, then Lanczos to the exact size.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..errors import InvalidRequestError, ModelFileError, not_found
from ..models import files
from ..models.manager import ModelManager
from ..paths import DataDirs

LANCZOS = Image.Resampling.LANCZOS
NEAREST = Image.Resampling.NEAREST

NONE = "None"
BUILTIN_UPSCALERS = (NONE, "Lanczos", "Nearest")
MODEL_FOLDERS = ("ESRGAN", "RealESRGAN", "SwinIR")
UPSCALER_EXTS = (".pth", ".pt", ".safetensors")

# A1111 applies a model at most this many times to reach the requested size.
MAX_PASSES = 3
# Refuse outputs no client could want; a typo like scale=80 would otherwise exhaust memory.
MAX_OUTPUT_SIDE = 16384

# A1111 lists Real-ESRGAN models under these names, matching local files by their download name.
REALESRGAN_NAMES = {
    "realesr-general-x4v3": "R-ESRGAN General 4xV3",
    "realesr-general-wdn-x4v3": "R-ESRGAN General WDN 4xV3",
    "realesr-animevideov3": "R-ESRGAN AnimeVideo",
    "RealESRGAN_x4plus": "R-ESRGAN 4x+",
    "RealESRGAN_x4plus_anime_6B": "R-ESRGAN 4x+ Anime6B",
    "RealESRGAN_x2plus": "R-ESRGAN 2x+",
}

Shapes = Mapping[str, tuple[int, ...]]
V = TypeVar("V")


# --------------------------------------------------------------------------------------------------
# Architecture detection


@dataclass(frozen=True)
class ArchSpec:
    """What a state dict holds: the architecture, its scale and the options to build it."""

    arch: str  # "ESRGAN", "SRVGGNetCompact" or "SwinIR"
    scale: int
    in_channels: int
    out_channels: int
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def size_multiple(self) -> int:
        """Input sides must be a multiple of this (pixel-unshuffle models); inputs are padded to it."""
        return int(self.options.get("unshuffle", 1))


def _unknown(source: str, why: str) -> ModelFileError:
    return ModelFileError(
        f"{source} is not a supported upscaler model ({why}); muralist reads ESRGAN, "
        "Real-ESRGAN (RRDBNet, SRVGGNetCompact) and SwinIR models"
    )


def _shape(shapes: Shapes, key: str, ndim: int, source: str) -> tuple[int, ...]:
    shape = shapes.get(key)
    if shape is None:
        raise _unknown(source, f"missing tensor {key}")
    if len(shape) != ndim:
        raise _unknown(source, f"tensor {key} has shape {list(shape)}")
    return tuple(shape)


def _indices(keys: Iterable[str], pattern: str) -> list[int]:
    """Sorted distinct integers captured by ``pattern``'s first group over the keys."""
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in keys if (m := rx.fullmatch(k))})


_OLD_RDB = re.compile(r"model\.1\.sub\.(\d+)\.RDB(\d)\.conv(\d)\.0\.(weight|bias)")
_OLD_TRUNK_CONV = re.compile(r"model\.1\.sub\.(\d+)\.(weight|bias)")
_OLD_TOP = re.compile(r"model\.(\d+)\.(weight|bias)")


def _old_esrgan_to_new(state: Mapping[str, V], source: str) -> dict[str, V]:
    # The old model is one flat Sequential: first conv, the shortcut trunk, then per 2x step
    # [Upsample, conv, LeakyReLU], then HR conv, LeakyReLU, last conv. Only convs hold weights,
    # so with n upsampling steps the convs sit at 3, 6, ..., 3n, then 3n + 2 and 3n + 4.
    tops = _indices(list(state), r"model\.(\d+)\.weight")
    n = len(tops) - 3
    if n < 0 or tops != [0] + [3 * (i + 1) for i in range(n)] + [3 * n + 2, 3 * n + 4]:
        raise _unknown(source, f"unexpected ESRGAN layer indices {tops}")
    names = {0: "conv_first", 3 * n + 2: "conv_hr", 3 * n + 4: "conv_last"}
    names.update({3 * (i + 1): f"conv_up{i + 1}" for i in range(n)})
    trunk_convs = _indices(list(state), r"model\.1\.sub\.(\d+)\.weight")
    if len(trunk_convs) != 1:
        raise _unknown(source, "cannot find the ESRGAN trunk conv")

    out: dict[str, V] = {}
    for key, value in state.items():
        if m := _OLD_RDB.fullmatch(key):
            out[f"body.{m[1]}.rdb{m[2]}.conv{m[3]}.{m[4]}"] = value
        elif m := _OLD_TRUNK_CONV.fullmatch(key):
            out[f"conv_body.{m[2]}"] = value
        elif (m := _OLD_TOP.fullmatch(key)) and int(m[1]) in names:
            out[f"{names[int(m[1])]}.{m[2]}"] = value
        else:
            out[key] = value  # e.g. ESRGAN+ conv1x1: left as is, so loading names it
    return out


_BSRGAN_RENAMES = (
    (re.compile(r"RRDB_trunk\.(\d+)\.RDB(\d)\."), r"body.\1.rdb\2."),
    (re.compile(r"trunk_conv\."), "conv_body."),
    (re.compile(r"upconv(\d+)\."), r"conv_up\1."),
    (re.compile(r"HRconv\."), "conv_hr."),
)


def _bsrgan_to_new(state: Mapping[str, V]) -> dict[str, V]:
    out: dict[str, V] = {}
    for key, value in state.items():
        for rx, repl in _BSRGAN_RENAMES:
            if rx.match(key):
                key = rx.sub(repl, key, count=1)
                break
        out[key] = value
    return out


def normalize_keys(state: Mapping[str, V], source: str = "state dict") -> dict[str, V]:
    """The state dict with ESRGAN's old and BSRGAN key layouts renamed to basicsr's; others unchanged.

    Works on tensors or on shapes, so listing can detect a model from a file header alone.
    """
    keys = list(state)
    if keys and all(k.startswith("module.") for k in keys):  # saved from DataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    if "model.0.weight" in state and any(k.startswith("model.1.sub.") for k in state):
        return _old_esrgan_to_new(state, source)
    if "conv_first.weight" in state and any(k.startswith("RRDB_trunk.") for k in state):
        return _bsrgan_to_new(state)
    return dict(state)


def _detect_rrdb(shapes: Shapes, source: str) -> ArchSpec:
    num_filters, in_raw = _shape(shapes, "conv_first.weight", 4, source)[:2]
    blocks = _indices(list(shapes), r"body\.(\d+)\.rdb\d\.conv\d\.weight")
    if blocks != list(range(len(blocks))):
        raise _unknown(source, f"RRDB blocks are not numbered 0..n: {blocks[:5]}...")
    growth = _shape(shapes, "body.0.rdb1.conv1.weight", 4, source)[0]
    ups = _indices(list(shapes), r"conv_up(\d+)\.weight")
    if ups != list(range(1, len(ups) + 1)):
        raise _unknown(source, f"upsampling convs are not numbered 1..n: {ups}")
    out_ch = _shape(shapes, "conv_last.weight", 4, source)[0]
    _shape(shapes, "conv_body.weight", 4, source)
    _shape(shapes, "conv_hr.weight", 4, source)
    # Real-ESRGAN x2/x1 pixel-unshuffle the input by 2/4, so conv_first sees 4x/16x the channels.
    unshuffle = 2 if in_raw == 4 * out_ch else 4 if in_raw == 16 * out_ch else 1
    net_scale = 2 ** len(ups)
    if net_scale % unshuffle:
        raise _unknown(source, f"{len(ups)} upsampling steps cannot undo a {unshuffle}x pixel-unshuffle")
    return ArchSpec(
        "ESRGAN",
        scale=net_scale // unshuffle,
        in_channels=in_raw // unshuffle**2,
        out_channels=out_ch,
        options={
            "num_filters": num_filters,
            "num_blocks": len(blocks),
            "growth": growth,
            "num_upsamples": len(ups),
            "unshuffle": unshuffle,
        },
    )


def _detect_srvgg(shapes: Shapes, source: str) -> ArchSpec:
    convs = [i for i in _indices(list(shapes), r"body\.(\d+)\.weight") if len(shapes[f"body.{i}.weight"]) == 4]
    acts = [i for i in _indices(list(shapes), r"body\.(\d+)\.weight") if len(shapes[f"body.{i}.weight"]) == 1]
    last = convs[-1] if convs else 0
    if last < 2 or convs != list(range(0, last + 1, 2)):
        raise _unknown(source, "SRVGGNetCompact convs are not at body.0, body.2, ...")
    if acts != list(range(1, last, 2)):
        raise _unknown(source, "only SRVGGNetCompact with PReLU activations is supported")
    num_filters, in_ch = _shape(shapes, "body.0.weight", 4, source)[:2]
    last_out = shapes[f"body.{last}.weight"][0]
    # The last conv feeds a pixel shuffle: out_channels * scale^2 channels, out_channels == in.
    scale = math.isqrt(last_out // in_ch)
    if scale < 1 or scale * scale * in_ch != last_out:
        raise _unknown(source, f"last conv has {last_out} channels, not {in_ch} x scale^2")
    return ArchSpec(
        "SRVGGNetCompact",
        scale=scale,
        in_channels=in_ch,
        out_channels=in_ch,
        options={"num_filters": num_filters, "num_conv": last // 2 - 1},
    )


def _detect_swinir(shapes: Shapes, source: str) -> ArchSpec:
    keys = list(shapes)
    if any("cpb_mlp" in k or "logit_scale" in k for k in keys):
        raise ModelFileError(f"Swin2SR models are not supported: {source}")
    if any(".conv_block.cab." in k or "overlap_attn" in k for k in keys):
        raise ModelFileError(f"HAT models are not supported: {source}")
    if "conv_first.weight" not in shapes or "absolute_pos_embed" in shapes:
        raise ModelFileError(f"this SwinIR variant is not supported: {source}")
    embed_dim, in_ch = _shape(shapes, "conv_first.weight", 4, source)[:2]

    layers = _indices(keys, r"layers\.(\d+)\.residual_group\.blocks\.\d+\.norm1\.weight")
    if not layers or layers != list(range(len(layers))):
        raise _unknown(source, "SwinIR layers are not numbered 0..n")
    depths, heads = [], []
    for i in layers:
        blocks = _indices(keys, rf"layers\.{i}\.residual_group\.blocks\.(\d+)\.norm1\.weight")
        depths.append(len(blocks))
        table = _shape(shapes, f"layers.{i}.residual_group.blocks.0.attn.relative_position_bias_table", 2, source)
        heads.append(table[1])
    table_rows = shapes["layers.0.residual_group.blocks.0.attn.relative_position_bias_table"][0]
    window = (math.isqrt(table_rows) + 1) // 2
    if (2 * window - 1) ** 2 != table_rows:
        raise _unknown(source, f"relative position table of {table_rows} rows is not (2w-1)^2")
    # Shifted (odd) blocks store their attention mask; a file with masks for some blocks only
    # came from a model trained on images no larger than a window, where SwinIR drops the shift.
    masked = {k for k in keys if k.endswith(".attn_mask")}
    shifts = [
        [j % 2 == 1 and (not masked or f"layers.{i}.residual_group.blocks.{j}.attn_mask" in masked) for j in range(d)]
        for i, d in zip(layers, depths, strict=True)
    ]
    mlp_hidden = _shape(shapes, "layers.0.residual_group.blocks.0.mlp.fc1.weight", 2, source)[0]

    if "conv_after_body.weight" in shapes:
        resi = "1conv"
    elif "conv_after_body.0.weight" in shapes:
        resi = "3conv"
    else:
        raise _unknown(source, "no conv_after_body")

    num_feat = 0
    if "conv_before_upsample.0.weight" in shapes:
        num_feat = shapes["conv_before_upsample.0.weight"][0]
        out_ch = _shape(shapes, "conv_last.weight", 4, source)[0]
        ups = _indices(keys, r"conv_up(\d+)\.weight")
        if ups:
            upsampler, factors = "nearest+conv", [2] * len(ups)
        else:
            upsampler = "pixelshuffle"
            factors = []
            for i in _indices(keys, r"upsample\.(\d+)\.weight"):
                ratio = shapes[f"upsample.{i}.weight"][0] // num_feat
                if ratio not in (4, 9):
                    raise _unknown(source, f"upsample.{i} has {ratio}x channels")
                factors.append(math.isqrt(ratio))
        scale = math.prod(factors)
    elif "upsample.0.weight" in shapes:
        upsampler, out_ch = "pixelshuffledirect", in_ch
        scale = math.isqrt(shapes["upsample.0.weight"][0] // out_ch)
        factors = [scale]
    else:
        upsampler, out_ch, scale, factors = "", _shape(shapes, "conv_last.weight", 4, source)[0], 1, []

    return ArchSpec(
        "SwinIR",
        scale=scale,
        in_channels=in_ch,
        out_channels=out_ch,
        options={
            "embed_dim": embed_dim,
            "depths": depths,
            "num_heads": heads,
            "window_size": window,
            "mlp_hidden": mlp_hidden,
            "qkv_bias": "layers.0.residual_group.blocks.0.attn.qkv.bias" in shapes,
            "patch_norm": "patch_embed.norm.weight" in shapes,
            "resi_connection": resi,
            "upsampler": upsampler,
            "upsample_factors": factors,
            "num_feat": num_feat,
            "shifts": shifts,
            # SwinIR's JPEG artifact models are the ones with 7-pixel windows, and they work in 0..255.
            "img_range": 255.0 if window == 7 else 1.0,
        },
    )


def detect_architecture(shapes: Shapes, source: str = "state dict") -> ArchSpec:
    """The architecture of a state dict (already through ``normalize_keys``) from its key names and shapes.

    Raises ``ModelFileError`` naming ``source`` for layouts muralist cannot run.
    """
    if not shapes:
        raise _unknown(source, "it holds no tensors")
    if any(".residual_group.blocks." in k for k in shapes):
        return _detect_swinir(shapes, source)
    if "conv_first.weight" in shapes and "body.0.rdb1.conv1.weight" in shapes:
        return _detect_rrdb(shapes, source)
    if "body.0.weight" in shapes and all(k.startswith("body.") for k in shapes):
        return _detect_srvgg(shapes, source)
    raise _unknown(source, "unknown layout")


# --------------------------------------------------------------------------------------------------
# ESRGAN (RRDBNet)


class _ResidualDenseBlock(nn.Module):
    """Five 3x3 convs, each seeing the block input and every earlier output."""

    def __init__(self, num_filters: int, growth: int) -> None:
        super().__init__()
        for j in range(1, 6):
            out = growth if j < 5 else num_filters
            self.add_module(f"conv{j}", nn.Conv2d(num_filters + (j - 1) * growth, out, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [x]
        for j in range(1, 5):
            feats.append(F.leaky_relu(getattr(self, f"conv{j}")(torch.cat(feats, 1)), 0.2))
        # Residuals are scaled by 0.2, as trained; unscaled they blow up through 23 blocks.
        return x + 0.2 * self.conv5(torch.cat(feats, 1))


class _RRDB(nn.Module):
    def __init__(self, num_filters: int, growth: int) -> None:
        super().__init__()
        self.rdb1 = _ResidualDenseBlock(num_filters, growth)
        self.rdb2 = _ResidualDenseBlock(num_filters, growth)
        self.rdb3 = _ResidualDenseBlock(num_filters, growth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.2 * self.rdb3(self.rdb2(self.rdb1(x)))


class RRDBNet(nn.Module):
    """ESRGAN / Real-ESRGAN generator, with basicsr's parameter names."""

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        num_filters: int = 64,
        num_blocks: int = 23,
        growth: int = 32,
        num_upsamples: int = 2,
        unshuffle: int = 1,
    ) -> None:
        super().__init__()
        self.unshuffle = unshuffle
        self.num_upsamples = num_upsamples
        self.conv_first = nn.Conv2d(in_channels * unshuffle**2, num_filters, 3, 1, 1)
        self.body = nn.Sequential(*(_RRDB(num_filters, growth) for _ in range(num_blocks)))
        self.conv_body = nn.Conv2d(num_filters, num_filters, 3, 1, 1)
        for i in range(1, num_upsamples + 1):
            self.add_module(f"conv_up{i}", nn.Conv2d(num_filters, num_filters, 3, 1, 1))
        self.conv_hr = nn.Conv2d(num_filters, num_filters, 3, 1, 1)
        self.conv_last = nn.Conv2d(num_filters, out_channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.unshuffle > 1:
            x = F.pixel_unshuffle(x, self.unshuffle)
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        for i in range(1, self.num_upsamples + 1):
            feat = F.interpolate(feat, scale_factor=2, mode="nearest")
            feat = F.leaky_relu(getattr(self, f"conv_up{i}")(feat), 0.2)
        return self.conv_last(F.leaky_relu(self.conv_hr(feat), 0.2))


# --------------------------------------------------------------------------------------------------
# Real-ESRGAN SRVGGNetCompact


class SRVGGNetCompact(nn.Module):
    """A plain conv stack whose output is pixel-shuffled and added to a nearest-upscaled input."""

    def __init__(
        self, in_channels: int = 3, num_filters: int = 64, num_conv: int = 16, scale: int = 4
    ) -> None:
        super().__init__()
        self.scale = scale
        layers: list[nn.Module] = [nn.Conv2d(in_channels, num_filters, 3, 1, 1), nn.PReLU(num_filters)]
        for _ in range(num_conv):
            layers += [nn.Conv2d(num_filters, num_filters, 3, 1, 1), nn.PReLU(num_filters)]
        layers.append(nn.Conv2d(num_filters, in_channels * scale * scale, 3, 1, 1))
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.pixel_shuffle(self.body(x), self.scale)
        return out + F.interpolate(x, scale_factor=self.scale, mode="nearest")


# --------------------------------------------------------------------------------------------------
# SwinIR


def _relative_position_index(window: int) -> torch.Tensor:
    """For each pair of positions in a window, the row of their offset in the bias table."""
    ys, xs = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    coords = torch.stack((ys.flatten(), xs.flatten()))  # 2, N
    rel = (coords[:, :, None] - coords[:, None, :]) + (window - 1)  # offsets shifted to >= 0
    return rel[0] * (2 * window - 1) + rel[1]


def _partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * windows, window, window, C)."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window, window, c)


def _merge(windows: torch.Tensor, window: int, h: int, w: int) -> torch.Tensor:
    """Inverse of ``_partition``."""
    b = windows.shape[0] // ((h // window) * (w // window))
    x = windows.view(b, h // window, w // window, window, window, -1)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, -1)


@functools.lru_cache(maxsize=8)  # a few tile shapes recur; masks can be megabytes
def _shift_mask(h: int, w: int, window: int, shift: int) -> torch.Tensor:
    """(windows, N, N) additive mask keeping rolled-around pixels from attending across the seam."""
    regions = torch.zeros(1, h, w, 1)
    cuts = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    label = 0
    for hs in cuts:
        for ws in cuts:
            regions[:, hs, ws, :] = label
            label += 1
    windows = _partition(regions, window).reshape(-1, window * window)
    differ = windows[:, None, :] != windows[:, :, None]
    return torch.zeros(differ.shape).masked_fill(differ, -100.0)


class _WindowAttention(nn.Module):
    def __init__(self, dim: int, window: int, heads: int, qkv_bias: bool) -> None:
        super().__init__()
        self.heads = heads
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        # Recomputed rather than loaded: it is a pure function of the window size.
        self.register_buffer("relative_position_index", _relative_position_index(window), persistent=False)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        index = self.relative_position_index.reshape(-1)  # type: ignore[operator]
        bias = self.relative_position_bias_table[index].view(n, n, -1).permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            windows = mask.shape[0]
            bias = (bias + mask.unsqueeze(1)).repeat(b // windows, 1, 1, 1)
        # Default scale 1/sqrt(head_dim) is SwinIR's qk_scale.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _SwinBlock(nn.Module):
    def __init__(self, dim: int, heads: int, window: int, shift: int, mlp_hidden: int, qkv_bias: bool) -> None:
        super().__init__()
        self.window, self.shift = window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _WindowAttention(dim, window, heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = _Mlp(dim, mlp_hidden)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        h, w = size
        b, _, c = x.shape
        y = self.norm1(x).view(b, h, w, c)
        mask = None
        if self.shift:
            y = torch.roll(y, (-self.shift, -self.shift), (1, 2))
            mask = _shift_mask(h, w, self.window, self.shift).to(x.device)
        windows = _partition(y, self.window).view(-1, self.window * self.window, c)
        y = _merge(self.attn(windows, mask).view(-1, self.window, self.window, c), self.window, h, w)
        if self.shift:
            y = torch.roll(y, (self.shift, self.shift), (1, 2))
        x = x + y.reshape(b, h * w, c)
        return x + self.mlp(self.norm2(x))


def _residual_conv(dim: int, kind: str) -> nn.Module:
    if kind == "1conv":
        return nn.Conv2d(dim, dim, 3, 1, 1)
    # "3conv" saves parameters with a bottleneck; indices 0, 2, 4 hold the weights.
    return nn.Sequential(
        nn.Conv2d(dim, dim // 4, 3, 1, 1),
        nn.LeakyReLU(0.2),
        nn.Conv2d(dim // 4, dim // 4, 1, 1, 0),
        nn.LeakyReLU(0.2),
        nn.Conv2d(dim // 4, dim, 3, 1, 1),
    )


class _SwinGroup(nn.Module):
    def __init__(self, blocks: list[_SwinBlock]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, size)
        return x


class _RSTB(nn.Module):
    """Residual Swin Transformer block: Swin blocks, a conv on the image-shaped tokens, a skip."""

    def __init__(self, blocks: list[_SwinBlock], dim: int, resi_connection: str) -> None:
        super().__init__()
        self.residual_group = _SwinGroup(blocks)
        self.conv = _residual_conv(dim, resi_connection)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        b, _, c = x.shape
        y = self.residual_group(x, size).transpose(1, 2).reshape(b, c, *size)
        return self.conv(y).flatten(2).transpose(1, 2) + x


class _PatchNorm(nn.Module):
    # SwinIR's PatchEmbed holds nothing but this norm (patch size 1), hence "patch_embed.norm".
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)


class SwinIR(nn.Module):
    """SwinIR with all four reconstruction heads; inputs are padded to the window size and cropped back."""

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int,
        embed_dim: int,
        depths: list[int],
        num_heads: list[int],
        window_size: int,
        mlp_hidden: int,
        qkv_bias: bool,
        patch_norm: bool,
        resi_connection: str,
        upsampler: str,
        upsample_factors: list[int],
        num_feat: int,
        shifts: list[list[bool]],
        img_range: float,
        scale: int,
    ) -> None:
        super().__init__()
        self.window_size, self.upsampler, self.img_range, self.scale = window_size, upsampler, img_range, scale
        mean = (0.4488, 0.4371, 0.4040) if in_channels == 3 else (0.0,) * in_channels  # DIV2K RGB mean
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)

        self.conv_first = nn.Conv2d(in_channels, embed_dim, 3, 1, 1)
        self.patch_embed = _PatchNorm(embed_dim) if patch_norm else None
        self.layers = nn.ModuleList(
            _RSTB(
                [
                    _SwinBlock(embed_dim, heads, window_size, window_size // 2 if shifted else 0, mlp_hidden, qkv_bias)
                    for shifted in layer_shifts
                ],
                embed_dim,
                resi_connection,
            )
            for heads, layer_shifts in zip(num_heads, shifts, strict=True)
        )
        self.norm = nn.LayerNorm(embed_dim)
        self.conv_after_body = _residual_conv(embed_dim, resi_connection)

        if upsampler in ("pixelshuffle", "nearest+conv"):
            # nn.LeakyReLU's default slope (0.01) here, as in SwinIR, unlike the 0.2 elsewhere.
            self.conv_before_upsample = nn.Sequential(nn.Conv2d(embed_dim, num_feat, 3, 1, 1), nn.LeakyReLU())
        if upsampler == "pixelshuffle":
            steps: list[nn.Module] = []
            for f in upsample_factors:
                steps += [nn.Conv2d(num_feat, f * f * num_feat, 3, 1, 1), nn.PixelShuffle(f)]
            self.upsample = nn.Sequential(*steps)
            self.conv_last = nn.Conv2d(num_feat, out_channels, 3, 1, 1)
        elif upsampler == "pixelshuffledirect":
            self.upsample = nn.Sequential(
                nn.Conv2d(embed_dim, scale * scale * out_channels, 3, 1, 1), nn.PixelShuffle(scale)
            )
        elif upsampler == "nearest+conv":
            self.num_up = len(upsample_factors)
            for i in range(1, self.num_up + 1):
                self.add_module(f"conv_up{i}", nn.Conv2d(num_feat, num_feat, 3, 1, 1))
            self.conv_hr = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
            self.conv_last = nn.Conv2d(num_feat, out_channels, 3, 1, 1)
        else:
            self.conv_last = nn.Conv2d(embed_dim, out_channels, 3, 1, 1)

    def _deep_features(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)
        if self.patch_embed is not None:
            t = self.patch_embed.norm(t)
        for layer in self.layers:
            t = layer(t, (h, w))
        return self.norm(t).transpose(1, 2).reshape(b, c, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        x = _pad_to_multiple(x, self.window_size)
        x = (x - self.mean) * self.img_range
        feat = self.conv_first(x)
        feat = self.conv_after_body(self._deep_features(feat)) + feat
        if self.upsampler == "pixelshuffle":
            out = self.conv_last(self.upsample(self.conv_before_upsample(feat)))
        elif self.upsampler == "pixelshuffledirect":
            out = self.upsample(feat)
        elif self.upsampler == "nearest+conv":
            feat = self.conv_before_upsample(feat)
            for i in range(1, self.num_up + 1):
                feat = F.interpolate(feat, scale_factor=2, mode="nearest")
                feat = F.leaky_relu(getattr(self, f"conv_up{i}")(feat), 0.2)
            out = self.conv_last(F.leaky_relu(self.conv_hr(feat), 0.2))
        else:  # denoising / JPEG: predicts a residual on the input
            out = x + self.conv_last(feat)
        out = out / self.img_range + self.mean
        return out[..., : h * self.scale, : w * self.scale]


def build_model(spec: ArchSpec) -> nn.Module:
    """An untrained network of the detected architecture (load the weights with ``load_state_dict``)."""
    o = spec.options
    if spec.arch == "ESRGAN":
        return RRDBNet(
            spec.in_channels,
            spec.out_channels,
            o["num_filters"],
            o["num_blocks"],
            o["growth"],
            o["num_upsamples"],
            o["unshuffle"],
        )
    if spec.arch == "SRVGGNetCompact":
        return SRVGGNetCompact(spec.in_channels, o["num_filters"], o["num_conv"], spec.scale)
    if spec.arch == "SwinIR":
        return SwinIR(in_channels=spec.in_channels, out_channels=spec.out_channels, scale=spec.scale, **o)
    raise ValueError(f"unknown architecture {spec.arch!r}")


# --------------------------------------------------------------------------------------------------
# Reading model files


def _unwrap(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    # basicsr saves {"params_ema": ..., "params": ...}; the EMA weights are the released ones.
    if isinstance(obj, dict):
        for key in ("params_ema", "params", "state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict):
        raise ModelFileError(f"{path} does not hold a state dict (found {type(obj).__name__})")
    return {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _check_ext(path: Path) -> None:
    if path.suffix.lower() not in UPSCALER_EXTS:
        raise ModelFileError(f"{path} is not an upscaler model; expected one of {', '.join(UPSCALER_EXTS)}")


def read_upscaler_state(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """All tensors of an upscaler file, unwrapped from basicsr's ``params_ema``/``params``."""
    path = Path(path)
    _check_ext(path)
    if path.suffix.lower() == ".safetensors":
        return files.load_state_dict(path)
    # files.load_state_dict drops nested dicts, and basicsr nests the weights: unwrap them here,
    # with the same weights-only loader.
    return _unwrap(files.load_pickle(path), path)


def read_upscaler_shapes(path: str | os.PathLike[str]) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of an upscaler file, without reading tensor data where the format allows."""
    path = Path(path)
    _check_ext(path)
    if path.suffix.lower() == ".safetensors":
        return files.read_shapes(path)
    return {k: tuple(v.shape) for k, v in _unwrap(files.load_pickle(path, mmap=True), path).items()}


def describe_file(path: str | os.PathLike[str]) -> ArchSpec:
    """The architecture and scale of a model file, read from its shapes only."""
    return detect_architecture(normalize_keys(read_upscaler_shapes(path), str(path)), str(path))


# --------------------------------------------------------------------------------------------------
# Running a model


def _pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pads bottom/right by mirroring so both sides are multiples of ``multiple``."""
    ph, pw = -x.shape[-2] % multiple, -x.shape[-1] % multiple
    if not ph and not pw:
        return x
    # Mirroring needs more pixels than it pads; a tiny image repeats its edge instead.
    mode = "reflect" if ph < x.shape[-2] and pw < x.shape[-1] else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode)


def _spans(length: int, tile: int, multiple: int) -> list[tuple[int, int]]:
    """Even tiles covering [0, length), each starting on a multiple of ``multiple``."""
    if tile <= 0 or length <= tile:
        return [(0, length)]
    count = -(-length // tile)
    step = -(-length // (count * multiple)) * multiple  # even split, so no sliver at the end
    return [(a, min(a + step, length)) for a in range(0, length, step)]


_IMAGE_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


@dataclass
class UpscalerModel:
    """A loaded network, ready to upscale images by its ``scale`` factor."""

    module: nn.Module
    spec: ArchSpec
    source: str
    device: torch.device

    @property
    def scale(self) -> int:
        return self.spec.scale

    def _tiles(
        self, x: torch.Tensor, tile: int, tile_overlap: int
    ) -> Iterator[tuple[slice, slice, torch.Tensor]]:
        """(output rows, output columns, output tile) for each tile of ``x``.

        Each tile is run with ``tile_overlap`` pixels of surrounding context and the context is
        cropped from its output, so tiles abut without blending. When the context covers the
        network's receptive field the result equals an untiled run; with less, seams are faint.
        """
        m, s = self.spec.size_multiple, self.scale
        x = _pad_to_multiple(x, m)
        h, w = x.shape[-2:]
        tile = max(tile, m) if tile > 0 else 0
        ctx = -(-max(tile_overlap, 0) // m) * m  # keep unshuffle groups aligned
        for y0, y1 in _spans(h, tile, m):
            for x0, x1 in _spans(w, tile, m):
                py0, py1, px0, px1 = max(y0 - ctx, 0), min(y1 + ctx, h), max(x0 - ctx, 0), min(x1 + ctx, w)
                with torch.inference_mode():
                    out = self.module(x[..., py0:py1, px0:px1])
                if out.shape[-2:] != ((py1 - py0) * s, (px1 - px0) * s):
                    raise ModelFileError(
                        f"{self.source} produced a {tuple(out.shape[-2:])} tile for a "
                        f"{(py1 - py0, px1 - px0)} input, not {s}x"
                    )
                oy, ox = (y0 - py0) * s, (x0 - px0) * s
                crop = out[..., oy : oy + (y1 - y0) * s, ox : ox + (x1 - x0) * s]
                yield slice(y0 * s, y1 * s), slice(x0 * s, x1 * s), crop

    def upscale_tensor(self, x: torch.Tensor, tile: int = 192, tile_overlap: int = 8) -> torch.Tensor:
        """(1, C, H, W) float in [0, 1] -> (1, C_out, H * scale, W * scale), unclamped; tile <= 0: whole."""
        h, w = x.shape[-2:]
        x = x.to(self.device, torch.float32)
        out: torch.Tensor | None = None
        for rows, cols, patch in self._tiles(x, tile, tile_overlap):
            if out is None:
                hp, wp = -(-h // self.spec.size_multiple), -(-w // self.spec.size_multiple)
                size = (hp * self.spec.size_multiple * self.scale, wp * self.spec.size_multiple * self.scale)
                out = patch.new_empty(*patch.shape[:2], *size)
            out[..., rows, cols] = patch
        assert out is not None
        return out[..., : h * self.scale, : w * self.scale]

    def upscale_image(self, image: Image.Image, tile: int = 192, tile_overlap: int = 8) -> Image.Image:
        """One pass of the network over a PIL image; alpha, if the network has none, is Lanczos-resized."""
        mode = _IMAGE_MODES[self.spec.in_channels]
        alpha = None
        if mode == "RGB" and ("A" in image.getbands() or "transparency" in image.info):
            alpha = image.convert("RGBA").getchannel("A")
        arr = np.asarray(image.convert(mode), dtype=np.float32) / 255.0
        if arr.ndim == 2:
            arr = arr[:, :, None]
        x = torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0).to(self.device)
        h, w = arr.shape[:2]
        # Tiles go straight into a uint8 image: a float copy of a 4x output would be 4x larger.
        hp = -(-h // self.spec.size_multiple) * self.spec.size_multiple
        wp = -(-w // self.spec.size_multiple) * self.spec.size_multiple
        out = np.empty((hp * self.scale, wp * self.scale, self.spec.out_channels), dtype=np.uint8)
        for rows, cols, patch in self._tiles(x, tile, tile_overlap):
            pixels = patch[0].clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0)
            out[rows, cols] = pixels.cpu().numpy()
        out = out[: h * self.scale, : w * self.scale]
        result = Image.fromarray(out[:, :, 0] if out.shape[2] == 1 else out, _IMAGE_MODES[self.spec.out_channels])
        if alpha is not None and result.mode == "RGB":
            result.putalpha(alpha.resize(result.size, LANCZOS))
        return result


def _load_error(path: Path, spec: ArchSpec, module: nn.Module, state: Mapping[str, torch.Tensor]) -> str | None:
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if keys:
            problems.append(f"{label}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}")
    if not problems:
        return None
    return f"{path} looks like a {spec.arch} model but its tensors do not fit ({'; '.join(problems)})"


def load_upscaler_model(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> UpscalerModel:
    """Reads, detects and builds the network in a model file; every failure is a ``ModelFileError``."""
    path = Path(path)
    state = normalize_keys(read_upscaler_state(path), str(path))
    spec = detect_architecture({k: tuple(v.shape) for k, v in state.items()}, str(path))
    if spec.in_channels not in _IMAGE_MODES or spec.out_channels not in _IMAGE_MODES:
        raise ModelFileError(
            f"{path} maps {spec.in_channels} to {spec.out_channels} channels; "
            "muralist runs 1 (grey), 3 (RGB) or 4 (RGBA) channel models"
        )
    module = build_model(spec)
    if spec.arch == "SwinIR":
        # Buffers SwinIR recomputes for the actual input size.
        state = {k: v for k, v in state.items() if not k.endswith((".attn_mask", ".relative_position_index"))}
    problem = _load_error(path, spec, module, state)
    if problem:
        raise ModelFileError(problem)
    module.load_state_dict({k: v.float() for k, v in state.items()})
    dev = torch.device(device)
    module.to(dev).float().eval().requires_grad_(False)
    return UpscalerModel(module, spec, str(path), dev)


# --------------------------------------------------------------------------------------------------
# Registry


@dataclass(frozen=True)
class UpscalerInfo:
    """An upscaler as clients see it. ``path`` is None for the built-in None/Lanczos/Nearest."""

    name: str
    path: Path | None = None
    scale: int | None = None  # the model's factor; None for built-ins or unreadable files
    arch: str | None = None

    @property
    def is_model(self) -> bool:
        return self.path is not None


def _file_key(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return (str(path), st.st_mtime_ns, st.st_size)


class UpscalerRegistry:
    """The built-in upscalers plus the model files in A1111's upscaler folders, with a small model LRU."""

    def __init__(self, dirs: DataDirs, max_loaded: int = 2, manager: ModelManager | None = None) -> None:
        self.dirs = dirs
        self.folders = tuple(dirs.root / "models" / name for name in MODEL_FOLDERS)
        # Loaded models live in the worker's manager (one budget for all kinds), else a private one.
        self.manager = manager if manager is not None else ModelManager("cpu")
        self.max_loaded = max_loaded
        self._lock = threading.Lock()
        # Detected (arch, scale) per file version, so listing reads each file once.
        self._described: dict[tuple[str, int, int], tuple[str | None, int | None]] = {}

    def _model_files(self) -> Iterator[tuple[Path, Path]]:
        for folder in self.folders:
            if not folder.is_dir():
                continue
            for path in sorted(folder.rglob("*")):
                rel = path.relative_to(folder)
                if path.suffix.lower() in UPSCALER_EXTS and path.is_file():
                    if not any(part.startswith(".") for part in rel.parts):
                        yield folder, path

    def _describe(self, path: Path) -> tuple[str | None, int | None]:
        try:
            key = _file_key(path)
        except OSError:
            return None, None
        with self._lock:
            if key in self._described:
                return self._described[key]
        try:
            spec = describe_file(path)
            found: tuple[str | None, int | None] = (spec.arch, spec.scale)
        except (ModelFileError, OSError):
            found = (None, None)  # listed anyway; using it reports why it cannot load
        with self._lock:
            self._described[key] = found
        return found

    def _scan(self) -> list[tuple[str, Path]]:
        """(name, path) of every model file, named as A1111 does and made unique."""
        taken = {n.lower() for n in BUILTIN_UPSCALERS}
        found = []
        for folder, path in self._model_files():
            name = path.stem
            if folder.name == "RealESRGAN":
                name = REALESRGAN_NAMES.get(path.stem, name)
            if name.lower() in taken:  # same stem in two folders: keep both, distinguishable
                name = f"{name} ({folder.name}/{path.relative_to(folder).as_posix()})"
            taken.add(name.lower())
            found.append((name, path))
        return found

    def _info(self, name: str, path: Path) -> UpscalerInfo:
        arch, scale = self._describe(path)
        return UpscalerInfo(name, path, scale, arch)

    def list(self) -> list[UpscalerInfo]:
        """Built-ins first, then models by name (case-insensitive), as A1111 sorts them."""
        models = sorted((self._info(name, path) for name, path in self._scan()), key=lambda i: i.name.lower())
        return [UpscalerInfo(n) for n in BUILTIN_UPSCALERS] + models

    def names(self) -> list[str]:
        return [info.name for info in self.list()]

    def find(self, name: str) -> UpscalerInfo:
        """The upscaler of that name (exact, else unique case-insensitive match); NotFoundError suggests close names."""
        entries: list[tuple[str, Path | None]] = [(n, None) for n in BUILTIN_UPSCALERS]
        entries += self._scan()  # not self.list(): only the match needs its file read
        for candidates in (
            [e for e in entries if e[0] == name],
            [e for e in entries if e[0].lower() == name.lower()],
        ):
            if len(candidates) == 1:
                found, path = candidates[0]
                return UpscalerInfo(found) if path is None else self._info(found, path)
        raise not_found("upscaler", name, [n for n, _ in entries])

    @property
    def max_loaded(self) -> int:
        return self.manager.max_count["upscaler"]

    @max_loaded.setter
    def max_loaded(self, value: int) -> None:
        self.manager.max_count["upscaler"] = max(1, value)

    def _request(
        self, upscaler: str | UpscalerInfo, device: str | torch.device
    ) -> tuple[tuple[str, int, int, str], Callable[[], UpscalerModel], int, str]:
        """(manager key, loader, size estimate, label) of a model upscaler."""
        info = upscaler if isinstance(upscaler, UpscalerInfo) else self.find(upscaler)
        if info.path is None:
            raise InvalidRequestError(f"{info.name!r} is not a model upscaler")
        path = info.path
        try:
            key = (*_file_key(path), str(torch.device(device)))
        except OSError as exc:
            raise ModelFileError(f"cannot read {path}: {exc.strerror or exc}") from None
        # An older version of the same file is never used again: free it now.
        self.manager.discard("upscaler", lambda k: k[0] == key[0] and k != key)
        return key, lambda: load_upscaler_model(path, device), key[2], info.name

    def load(self, upscaler: str | UpscalerInfo, device: str | torch.device = "cpu") -> UpscalerModel:
        """The loaded model of a model upscaler, cached by file version and device."""
        key, load, estimate, label = self._request(upscaler, device)
        return self.manager.get("upscaler", key, load, estimate, label)

    @contextlib.contextmanager
    def use(self, upscaler: str | UpscalerInfo, device: str | torch.device = "cpu") -> Iterator[UpscalerModel]:
        """Like ``load``, with the model pinned (never evicted) for the duration of the block."""
        key, load, estimate, label = self._request(upscaler, device)
        with self.manager.use("upscaler", key, load, estimate, label) as model:
            yield model

    def clear(self) -> None:
        """Drops the loaded models (e.g. to free memory)."""
        self.manager.discard("upscaler")


# --------------------------------------------------------------------------------------------------
# Upscaling with A1111's size rules


def dest_size(width: int, height: int, scale: float) -> tuple[int, int]:
    """A1111's target for "scale by": each side times scale, rounded down to a multiple of 8."""
    return int((width * scale) // 8 * 8), int((height * scale) // 8 * 8)


def _check_output(size: tuple[int, int], what: str) -> None:
    if min(size) < 1:
        raise InvalidRequestError(f"{what} gives a {size[0]}x{size[1]} image; it must be at least 1x1")
    if max(size) > MAX_OUTPUT_SIDE:
        raise InvalidRequestError(
            f"{what} gives a {size[0]}x{size[1]} image; sides are limited to {MAX_OUTPUT_SIDE} pixels"
        )


def _upscale_by(image: Image.Image, scale: float, step: Callable[[Image.Image], Image.Image]) -> Image.Image:
    """A1111's ``Upscaler.upscale``: up to 3 passes until the //8 target is reached, then Lanczos to it."""
    dest = dest_size(image.width, image.height, scale)
    _check_output(dest, f"scaling {image.width}x{image.height} by {scale:g}")
    img = image
    for _ in range(MAX_PASSES):
        before = img.size
        img = step(img)
        if img.size == before:  # a 1x model: more passes would not grow it
            break
        if img.width >= dest[0] and img.height >= dest[1]:
            break
    if img.size != dest:
        img = img.resize(dest, resample=LANCZOS)
    return img


def upscale(
    image: Image.Image,
    upscaler: str,
    registry: UpscalerRegistry | None = None,
    *,
    scale: float | None = None,
    target: tuple[int, int] | None = None,
    tile: int = 192,
    tile_overlap: int = 8,
    device: str | torch.device = "cpu",
) -> Image.Image:
    """Upscales ``image`` by ``scale`` or to ``target`` (width, height) with the named upscaler.

    ``scale`` follows A1111's extras tab: the size is each side times scale rounded down to a
    multiple of 8; "None" returns the image as is. ``target`` follows ``images.resize_image`` (used by
    hires fix and img2img): upscale by ``max(tw / w, th / h)`` if that exceeds 1, then Lanczos to the
    exact size; with "None" it is a plain Lanczos resize. ``tile``/``tile_overlap`` bound the memory
    of model upscalers (A1111's ESRGAN_tile / ESRGAN_tile_overlap; tile <= 0 runs the image whole).
    """
    if (scale is None) == (target is None):
        raise InvalidRequestError("give either an upscale factor or a target size, not both or neither")
    name, info = _resolve(upscaler, registry)
    # A model upscaler stays pinned while it runs, so no other load evicts it from the budget.
    using = registry.use(info, device) if registry is not None and info is not None else contextlib.nullcontext()
    with using as model:
        return _upscale(image, name, model, scale, target, tile, tile_overlap)


def _upscale(
    image: Image.Image,
    name: str,
    model: UpscalerModel | None,
    scale: float | None,
    target: tuple[int, int] | None,
    tile: int,
    tile_overlap: int,
) -> Image.Image:
    if image.mode not in ("RGB", "RGBA", "L"):
        # Pillow resizes palette images with NEAREST whatever is asked; work on real colours.
        has_alpha = "A" in image.getbands() or "transparency" in image.info
        image = image.convert("RGBA" if has_alpha else "RGB")

    def step(im: Image.Image, factor: float) -> Image.Image:
        if model is not None:
            return _keep_grey(im, model.upscale_image(im, tile, tile_overlap))
        size = (int(im.width * factor), int(im.height * factor))
        return im.resize(size, resample=NEAREST if name == "Nearest" else LANCZOS)

    if target is not None:
        tw, th = (int(v) for v in target)
        _check_output((tw, th), f"target size {tw}x{th}")
        if name == NONE or image.mode == "L":
            # resize_image: no upscaler (or a mask) means a plain Lanczos resize.
            return image.resize((tw, th), resample=LANCZOS) if image.size != (tw, th) else image.copy()
        factor = max(tw / image.width, th / image.height)
        img = _upscale_by(image, factor, lambda im: step(im, factor)) if factor > 1.0 else image
        return img.resize((tw, th), resample=LANCZOS) if img.size != (tw, th) else img.copy()

    assert scale is not None
    if not math.isfinite(scale) or scale <= 0:
        raise InvalidRequestError(f"upscale factor must be a positive number, not {scale}")
    if name == NONE:
        return image.copy()  # the extras tab skips the "None" upscaler
    return _upscale_by(image, scale, lambda im: step(im, scale))


def _resolve(upscaler: str, registry: UpscalerRegistry | None) -> tuple[str, UpscalerInfo | None]:
    """The canonical name of the upscaler and, for a model upscaler, its registry entry."""
    for builtin in BUILTIN_UPSCALERS:
        if upscaler.lower() == builtin.lower():
            return builtin, None
    if registry is None:
        raise not_found("upscaler", upscaler, BUILTIN_UPSCALERS)
    info = registry.find(upscaler)
    return info.name, info


def _keep_grey(source: Image.Image, result: Image.Image) -> Image.Image:
    # An RGB network upscaling a grey image should give a grey image back.
    return result.convert("L") if source.mode == "L" and result.mode == "RGB" else result
