"""Image upscalers named and applied the way A1111 does: None, Lanczos, Nearest and model files.

Model files live in A1111's folders ``models/ESRGAN``, ``models/RealESRGAN``, ``models/SwinIR``,
``models/DAT``, ``models/HAT`` and ``models/ScuNET`` (``.pth``, ``.pt``, ``.safetensors``). As in
A1111 >= 1.8, Forge and ComfyUI, the networks and their detection come from spandrel: the
architecture and its hyper-parameters are read from tensor names and shapes, never from the file
name or folder, so every image super-resolution or restoration architecture spandrel knows (ESRGAN
in its old, BSRGAN and Real-ESRGAN layouts, Real-ESRGAN Compact, SwinIR, Swin2SR, HAT, DAT, OmniSR,
SPAN, RealCUGAN, ...) loads from any of these folders. Files that are not such a model (face
restorers, inpainting models, checkpoints, LoRAs...) are refused with a ``ModelFileError`` that
says what they are.

Upscalers use spandrel's own architectures only (spandrel is MIT-licensed), never those of
spandrel_extra_arches (SRFormer, CodeFormer, Restormer, ...: non-commercial or copyleft licences),
even after face restoration has installed that package into spandrel's global registry for
CodeFormer: an upscaler folder must load the same files whatever ran before.

Models run in float32 on RGB in [0, 1] (the colour order they were trained on; A1111 feeds them
BGR, which shifts colours slightly) and tile large images so memory stays bounded by one tile.
Two speed-ups are applied to spandrel's networks at load time, neither changing a pixel: Swin-style
networks share their shifted-window masks per tile shape instead of rebuilding them in every block
at every call, and SwinIR's window attention runs through PyTorch's fused attention kernel.

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
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import spandrel
import torch
import torch.nn.functional as F
from PIL import Image
from spandrel import ImageModelDescriptor, ModelTiling, SizeRequirements, UnsupportedModelError
from torch import nn

from ..errors import InvalidRequestError, ModelFileError, not_found
from ..models import files
from ..models.manager import ModelManager
from ..paths import DataDirs

LANCZOS = Image.Resampling.LANCZOS
NEAREST = Image.Resampling.NEAREST

NONE = "None"
BUILTIN_UPSCALERS = (NONE, "Lanczos", "Nearest")
# A1111's upscaler folders (ScuNET, DAT and HAT since 1.8); any of them holds any architecture.
MODEL_FOLDERS = ("ESRGAN", "RealESRGAN", "SwinIR", "DAT", "HAT", "ScuNET")
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

_IMAGE_MODES = {1: "L", 3: "RGB", 4: "RGBA"}

# spandrel's purposes that map an image to an image of the same content: super-resolution and
# 1x restoration (denoise, JPEG, sharpen). "FaceSR" needs aligned face crops.
_UPSCALER_PURPOSES = ("SR", "Restoration")


# --------------------------------------------------------------------------------------------------
# What a file holds


@dataclass(frozen=True)
class ArchSpec:
    """What a model file holds, as spandrel describes it."""

    arch: str  # spandrel's architecture name: "ESRGAN", "RealESRGAN Compact", "SwinIR", "HAT", ...
    scale: int
    in_channels: int
    out_channels: int
    size_requirements: SizeRequirements = field(default_factory=SizeRequirements)
    tiling: ModelTiling = ModelTiling.SUPPORTED

    @property
    def size_multiple(self) -> int:
        """Input sides must be a multiple of this (pixel-unshuffle models); inputs are padded to it."""
        return self.size_requirements.multiple_of


@functools.cache
def _registry() -> spandrel.ArchRegistry:
    """spandrel's core architectures, without any that other modules added to its global registry."""
    registry = spandrel.ArchRegistry()
    registry.add(
        *(
            s
            for s in spandrel.MAIN_REGISTRY
            if type(s.architecture).__module__.startswith("spandrel.architectures.")
        )
    )
    return registry


def _spec(desc: ImageModelDescriptor[Any]) -> ArchSpec:
    return ArchSpec(
        desc.architecture.name,
        desc.scale,
        desc.input_channels,
        desc.output_channels,
        desc.size_requirements,
        desc.tiling,
    )


# Layouts spandrel does not load as upscalers, recognised so the error can say what the file is and
# where it belongs. (key test, what it is, what to do)
_NOT_UPSCALERS: tuple[tuple[Callable[[Mapping[str, Any]], bool], str, str], ...] = (
    (
        lambda sd: "position_emb" in sd and any(k.startswith("quantize.") for k in sd),
        "a CodeFormer face restoration model",
        "put it in models/Codeformer",
    ),
    (
        lambda sd: any(k.startswith(("model.diffusion_model.", "first_stage_model.")) for k in sd),
        "a Stable Diffusion checkpoint",
        "put it in models/Stable-diffusion",
    ),
    (
        lambda sd: any(k.startswith(("control_model.", "input_hint_block.")) for k in sd),
        "a ControlNet model",
        "put it in models/ControlNet",
    ),
    (
        lambda sd: any(
            k.startswith(("lora_unet_", "lora_te")) or ".lora_down." in k or ".lora_A." in k for k in sd
        ),
        "a LoRA",
        "put it in models/Lora",
    ),
    (
        lambda sd: (
            any(k.startswith("encoder.down.") for k in sd) and any(k.startswith("decoder.up.") for k in sd)
        ),
        "a VAE",
        "put it in models/VAE",
    ),
)


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = re.sub(r"\s+", " ", str(exc)).strip() or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _unsupported(source: str, state: Mapping[str, Any]) -> ModelFileError:
    for test, what, todo in _NOT_UPSCALERS:
        if test(state):
            return ModelFileError(f"{source} is {what}, not an upscaler; {todo}")
    if not state:
        why = "it holds no tensors"
    else:
        keys = ", ".join(list(state)[:3])
        why = f"spandrel {spandrel.__version__} recognises no architecture in its {len(state)} tensors ({keys}, ...)"
    return ModelFileError(
        f"{source} is not a supported upscaler model ({why}); upscalers are image super-resolution models "
        "such as ESRGAN, Real-ESRGAN, SwinIR, HAT, DAT, OmniSR or SPAN"
    )


def _detected_name(state: Mapping[str, Any]) -> str:
    """The architecture spandrel's detection picks for a state dict that then failed to load."""
    for support in _registry().architectures("detection"):
        with contextlib.suppress(Exception):
            if support.detect(state):
                return support.architecture.name
    return "known"


class _DoesNotFit(ModelFileError):
    """spandrel detected an architecture but could not build it from the tensors."""


def _load_descriptor(
    source: str, state: Mapping[str, torch.Tensor], device: torch.device
) -> ImageModelDescriptor[Any]:
    """spandrel's model for a state dict, on ``device``; every refusal is a ``ModelFileError``."""
    try:
        desc = spandrel.ModelLoader(device, registry=_registry()).load_from_state_dict(dict(state))
    except UnsupportedModelError:
        raise _unsupported(source, state) from None
    except MemoryError:
        raise
    except Exception as exc:  # detected, but the tensors do not fit that architecture
        name = _detected_name(state)
        article = "an" if name[:1].upper() in "AEIOU" else "a"
        raise _DoesNotFit(
            f"{source} looks like {article} {name} model but its tensors do not fit ({_one_line(exc)})"
        ) from None
    name = desc.architecture.name
    if not isinstance(desc, ImageModelDescriptor):  # spandrel's other kind takes a mask too
        raise ModelFileError(
            f"{source} is {name}, an inpainting model (image + mask), not an upscaler; remove it from the upscaler folders"
        )
    if desc.purpose == "FaceSR":  # works on aligned face crops only: A1111 keeps these elsewhere
        raise ModelFileError(
            f"{source} is a {name} face restoration model, not an upscaler; face restorers go in "
            "models/GFPGAN or models/Codeformer"
        )
    if desc.purpose not in _UPSCALER_PURPOSES:
        raise ModelFileError(f"{source} is a {name} model for {desc.purpose}, not an upscaler")
    if desc.input_channels not in _IMAGE_MODES or desc.output_channels not in _IMAGE_MODES:
        raise ModelFileError(
            f"{source} maps {desc.input_channels} to {desc.output_channels} channels; "
            "muralist runs 1 (grey), 3 (RGB) or 4 (RGBA) channel models"
        )
    return desc


# --------------------------------------------------------------------------------------------------
# Reading model files


def _tensors(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    # spandrel's canonical form: unwrapped from basicsr's params_ema/params, "state_dict", "model"...
    # and without DataParallel's "module." prefix.
    if not isinstance(obj, dict):
        raise ModelFileError(f"{path} does not hold a state dict (found {type(obj).__name__})")
    obj = spandrel.canonicalize_state_dict(obj)
    return {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _check_ext(path: Path) -> None:
    if path.suffix.lower() not in UPSCALER_EXTS:
        raise ModelFileError(f"{path} is not an upscaler model; expected one of {', '.join(UPSCALER_EXTS)}")


def read_upscaler_state(path: str | os.PathLike[str], mmap: bool = False) -> dict[str, torch.Tensor]:
    """All tensors of an upscaler file on the CPU, unwrapped and unprefixed as spandrel expects."""
    path = Path(path)
    _check_ext(path)
    if path.suffix.lower() == ".safetensors":
        return _tensors(files.load_state_dict(path), path)
    # muralist's weights-only unpickler (files refuses unsafe pickles), not spandrel's file loader;
    # basicsr nests the weights, which load_pickle keeps.
    return _tensors(files.load_pickle(path, mmap=mmap), path)


def read_upscaler_shapes(path: str | os.PathLike[str]) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of an upscaler file, without reading tensor data where the format allows."""
    path = Path(path)
    _check_ext(path)
    if path.suffix.lower() == ".safetensors":
        return dict(spandrel.canonicalize_state_dict(files.read_shapes(path)))
    return {k: tuple(v.shape) for k, v in read_upscaler_state(path, mmap=True).items()}


def describe_file(path: str | os.PathLike[str]) -> ArchSpec:
    """The architecture and scale of a model file; ``ModelFileError`` if it is not an upscaler.

    The network is first built on the meta device from the tensor shapes alone (no weights read,
    no memory used); the few architectures whose set-up needs real values are built on the CPU.
    """
    path = Path(path)
    shapes = read_upscaler_shapes(path)
    meta = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    try:
        with torch.device("meta"):
            return _spec(_load_descriptor(str(path), meta, torch.device("meta")))
    except _DoesNotFit:
        pass  # possibly only the meta device (no values); any other verdict needs shapes only
    # mmap: the pages of a .pth are read only as far as building the network touches them.
    return _spec(_load_descriptor(str(path), read_upscaler_state(path, mmap=True), torch.device("cpu")))


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


@dataclass
class UpscalerModel:
    """A loaded network (spandrel's descriptor), ready to upscale images by its ``scale`` factor."""

    descriptor: ImageModelDescriptor[Any]
    spec: ArchSpec
    source: str
    device: torch.device

    @property
    def scale(self) -> int:
        return self.spec.scale

    @property
    def module(self) -> nn.Module:
        """The bare network."""
        return self.descriptor.model

    def _tiles(
        self, x: torch.Tensor, tile: int, tile_overlap: int
    ) -> Iterator[tuple[slice, slice, torch.Tensor]]:
        """(output rows, output columns, output tile) for each tile of ``x``.

        Each tile is run with ``tile_overlap`` pixels of surrounding context and the context is
        cropped from its output, so tiles abut without blending. When the context covers the
        network's receptive field the result equals an untiled run; with less, seams are faint.
        Tiles below the model's minimum size (or not square where it must be) are padded by
        spandrel and cropped back.
        """
        req, s = self.spec.size_requirements, self.scale
        m = req.multiple_of
        x = _pad_to_multiple(x, m)
        h, w = x.shape[-2:]
        # DISCOURAGED (SwinIR, SCUNet...) still tiles, as A1111 tiles SwinIR: memory must stay
        # bounded on a shared GPU, and a context of tile_overlap hides most seams.
        if self.spec.tiling is ModelTiling.INTERNAL:
            tile = 0  # the network tiles itself; outer tiles would only add seams
        tile = max(tile, m, req.minimum) if tile > 0 else 0
        ctx = -(-max(tile_overlap, 0) // m) * m  # keep unshuffle groups aligned
        for y0, y1 in _spans(h, tile, m):
            for x0, x1 in _spans(w, tile, m):
                py0, py1, px0, px1 = max(y0 - ctx, 0), min(y1 + ctx, h), max(x0 - ctx, 0), min(x1 + ctx, w)
                out = self.descriptor(x[..., py0:py1, px0:px1])
                if out.shape[-2:] != ((py1 - py0) * s, (px1 - px0) * s):
                    raise ModelFileError(
                        f"{self.source} produced a {tuple(out.shape[-2:])} tile for a "
                        f"{(py1 - py0, px1 - px0)} input, not {s}x"
                    )
                oy, ox = (y0 - py0) * s, (x0 - px0) * s
                crop = out[..., oy : oy + (y1 - y0) * s, ox : ox + (x1 - x0) * s]
                yield slice(y0 * s, y1 * s), slice(x0 * s, x1 * s), crop

    def upscale_tensor(self, x: torch.Tensor, tile: int = 192, tile_overlap: int = 8) -> torch.Tensor:
        """(1, C, H, W) float in [0, 1] -> (1, C_out, H * scale, W * scale) in [0, 1]; tile <= 0: whole."""
        h, w = x.shape[-2:]
        x = x.to(self.device, torch.float32)
        out: torch.Tensor | None = None
        m = self.spec.size_multiple
        for rows, cols, patch in self._tiles(x, tile, tile_overlap):
            if out is None:
                size = (-(-h // m) * m * self.scale, -(-w // m) * m * self.scale)
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
        m = self.spec.size_multiple
        out = np.empty(
            (-(-h // m) * m * self.scale, -(-w // m) * m * self.scale, self.spec.out_channels), np.uint8
        )
        for rows, cols, patch in self._tiles(x, tile, tile_overlap):
            pixels = patch[0].clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0)
            out[rows, cols] = pixels.cpu().numpy()
        out = out[: h * self.scale, : w * self.scale]
        result = Image.fromarray(
            out[:, :, 0] if out.shape[2] == 1 else out, _IMAGE_MODES[self.spec.out_channels]
        )
        if alpha is not None and result.mode == "RGB":
            result.putalpha(alpha.resize(result.size, LANCZOS))
        return result


# Swin-style networks whose shifted-window mask depends only on the input size, the window and the
# shift. spandrel rebuilds it on the CPU (and copies it to the device) at every call whose size
# differs from the training size, which for tiles is every call and, for SwinIR, every block.
_MASKED_ARCHS = ("SwinIR", "Swin2SR", "DRCT", "HAT")
_MASKS: OrderedDict[tuple[Any, ...], torch.Tensor] = OrderedDict()
_MASKS_LOCK = threading.Lock()
# ids of the cached masks that are all zeros (blocks without shift get one too): attention skips them.
_ZERO_MASKS: set[int] = set()
_MASKS_KEPT = 8  # a few tile shapes recur (inner, right, bottom, corner); masks can be megabytes


def _shared_masks(model: nn.Module, device: torch.device) -> None:
    """Makes the Swin blocks of ``model`` share their shift masks, built once per shape on ``device``."""
    for block in model.modules():
        arch = type(block).__module__.split(".")
        compute = getattr(block, "calculate_mask", None)
        window, shift = getattr(block, "window_size", None), getattr(block, "shift_size", None)
        if len(arch) < 3 or arch[2] not in _MASKED_ARCHS or compute is None:
            continue
        if not isinstance(window, int) or not isinstance(shift, int):
            continue
        kind = (type(block).__module__, type(block).__qualname__, window, shift, str(device))
        block.calculate_mask = functools.partial(_shift_mask, compute, kind, device)  # type: ignore[method-assign]


def _shift_mask(compute: Callable[..., torch.Tensor], kind: tuple[Any, ...], device: torch.device,
                x_size: Any, *args: Any, **kwargs: Any) -> torch.Tensor:  # fmt: skip
    key = (*kind, tuple(int(v) for v in x_size), *args, *sorted(kwargs.items()))
    with _MASKS_LOCK:
        mask = _MASKS.get(key)
        if mask is not None:
            _MASKS.move_to_end(key)
            return mask
    mask = compute(x_size, *args, **kwargs).to(device)
    with _MASKS_LOCK:
        if key in _MASKS:  # another thread built it meanwhile: keep one object per key
            return _MASKS[key]
        _MASKS[key] = mask
        if not mask.any():
            _ZERO_MASKS.add(id(mask))
        while len(_MASKS) > _MASKS_KEPT:
            _ZERO_MASKS.discard(id(_MASKS.popitem(last=False)[1]))
    return mask


def _fused_window_attention(
    attn: nn.Module, x: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """SwinIR's window attention through ``scaled_dot_product_attention``: the same sums as
    spandrel's matmul/softmax forward (within float rounding), at about twice the speed (fused
    kernels on CPU and GPU), which SwinIR, where attention is most of the work, would otherwise lose."""
    b, n, c = x.shape
    heads = attn.num_heads
    q, k, v = attn.qkv(x).reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4).unbind(0)
    index = attn.relative_position_index.view(-1)
    bias = attn.relative_position_bias_table[index].view(n, n, heads).permute(2, 0, 1).unsqueeze(0)
    if mask is not None and id(mask) not in _ZERO_MASKS:
        # The windows of each image are consecutive in the batch.
        windows = mask.shape[0]
        bias = (bias + mask.unsqueeze(1).to(bias.dtype)).repeat(b // windows, 1, 1, 1)
    # 4-D inputs and mask throughout: anything else makes PyTorch fall back to unfused attention.
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=attn.scale)
    return attn.proj(out.transpose(1, 2).reshape(b, n, c))


def _speed_up(model: nn.Module, device: torch.device) -> None:
    """Shared shift masks for Swin-style networks, fused attention for SwinIR (see above)."""
    _shared_masks(model, device)
    for module in model.modules():
        kind = type(module)
        if kind.__name__ == "WindowAttention" and kind.__module__.startswith(
            "spandrel.architectures.SwinIR."
        ):
            if all(
                hasattr(module, a)
                for a in ("qkv", "proj", "relative_position_bias_table", "scale", "num_heads")
            ):
                module.forward = functools.partial(_fused_window_attention, module)  # type: ignore[method-assign]


def load_upscaler_model(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> UpscalerModel:
    """Reads a model file and builds its network with spandrel; every failure is a ``ModelFileError``."""
    path = Path(path)
    dev = torch.device(device)
    desc = _load_descriptor(str(path), read_upscaler_state(path), torch.device("cpu"))
    # float32 whatever the file stores, as before: half precision changes results per device.
    desc.to(dev).float().eval()
    desc.model.requires_grad_(False)
    _speed_up(desc.model, dev)
    return UpscalerModel(desc, _spec(desc), str(path), dev)


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
    def use(
        self, upscaler: str | UpscalerInfo, device: str | torch.device = "cpu"
    ) -> Iterator[UpscalerModel]:
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
    using = (
        registry.use(info, device) if registry is not None and info is not None else contextlib.nullcontext()
    )
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
