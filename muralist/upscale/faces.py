"""Face restoration (CodeFormer, GFPGAN) in AUTOMATIC1111's folders, with no torchvision or facexlib.

Both CodeFormer and GFPGAN v1 clean (GFPGANv1.3/1.4) run. The networks are rebuilt here from the
key layout of the released weights (``codeformer.pth`` and ``GFPGANv1.4.pth`` keep them under
``params_ema``); every size is read from the tensors, so a tiny random model in the same layout runs
through exactly the same code as the real ones (~94M and ~86M parameters).

Pipeline (A1111's ``restore_with_helper``, simplified): find faces with OpenCV's Haar frontal-face
cascade, cut a square crop with a margin around each, resize it to the network's input size (512 for
the released models; a plain square crop + resize, *not* facexlib's 5-landmark affine alignment),
restore it in [-1, 1] RGB, resize back and paste it with a feathered square mask. ``visibility``
then blends the result over the original like A1111's ``gfpgan_visibility``/``codeformer_visibility``.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..errors import InvalidRequestError, ModelFileError, MuralistError
from ..models import files
from ..models.manager import ModelManager
from ..paths import DataDirs

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive), in image pixels

CODEFORMER = "CodeFormer"
GFPGAN = "GFPGAN"

# ---------------------------------------------------------------------------------------------------
# CodeFormer (sczhou/CodeFormer basicsr/archs/codeformer_arch.py + vqgan_arch.py layout)
# ---------------------------------------------------------------------------------------------------


def _group_norm(channels: int) -> nn.GroupNorm:
    # The VQGAN blocks always use 32 groups; channel counts must be multiples of 32.
    return nn.GroupNorm(32, channels, eps=1e-6, affine=True)


def _swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


class _VQResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.norm1 = _group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, 1, 1)
        self.norm2 = _group_norm(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1)
        # Only present when the channel count changes, exactly as in the released weights.
        self.conv_out = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(_swish(self.norm1(x)))
        h = self.conv2(_swish(self.norm2(h)))
        return h + (self.conv_out(x) if self.conv_out is not None else x)


class _VQAttnBlock(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.norm = _group_norm(ch)
        self.q = nn.Conv2d(ch, ch, 1)
        self.k = nn.Conv2d(ch, ch, 1)
        self.v = nn.Conv2d(ch, ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        q = self.q(y).reshape(b, c, h * w).transpose(1, 2)  # (b, hw, c)
        k = self.k(y).reshape(b, c, h * w)  # (b, c, hw)
        v = self.v(y).reshape(b, c, h * w)
        attn = torch.softmax(torch.bmm(q, k) * c**-0.5, dim=2)  # (b, hw_q, hw_k)
        out = torch.bmm(v, attn.transpose(1, 2)).reshape(b, c, h, w)
        return x + self.proj_out(out)


class _Downsample(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, 2, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Asymmetric right/bottom padding, as the VQGAN was trained with.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class _Upsample(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Codebook(nn.Module):
    def __init__(self, codebook_size: int, emb_dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(codebook_size, emb_dim)


class _Blocks(nn.Module):
    """Holds ``blocks`` (so keys read ``encoder.blocks.N...``) and each block's output resolution."""

    def __init__(self, blocks: list[nn.Module], res: list[int]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.res = res


class _SALayer(nn.Module):
    """Pre-norm transformer self-attention layer (TransformerSALayer); queries/keys get the position."""

    def __init__(self, dim: int, n_head: int, dim_mlp: int) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, n_head, dropout=0.0)
        self.linear1 = nn.Linear(dim, dim_mlp)
        self.linear2 = nn.Linear(dim_mlp, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        qk = y + pos
        x = x + self.self_attn(qk, qk, value=y, need_weights=False)[0]
        return x + self.linear2(F.gelu(self.linear1(self.norm2(x))))


class _FuseSFT(nn.Module):
    """Controllable feature transform: encoder features modulate the decoder, scaled by fidelity w."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.encode_enc = _VQResBlock(2 * in_ch, out_ch)
        self.scale = nn.Sequential(
            nn.Conv2d(in_ch, out_ch, 3, 1, 1), nn.LeakyReLU(0.2), nn.Conv2d(out_ch, out_ch, 3, 1, 1)
        )
        self.shift = nn.Sequential(
            nn.Conv2d(in_ch, out_ch, 3, 1, 1), nn.LeakyReLU(0.2), nn.Conv2d(out_ch, out_ch, 3, 1, 1)
        )

    def forward(self, enc: torch.Tensor, dec: torch.Tensor, w: float) -> torch.Tensor:
        h = self.encode_enc(torch.cat([enc, dec], dim=1))
        return dec + w * (dec * self.scale(h) + self.shift(h))


def _adain(content: torch.Tensor, style: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    b, c = content.shape[:2]

    def stats(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = t.reshape(b, c, -1)
        return flat.mean(2).reshape(b, c, 1, 1), (flat.var(2) + eps).sqrt().reshape(b, c, 1, 1)

    c_mean, c_std = stats(content)
    s_mean, s_std = stats(style)
    return (content - c_mean) / c_std * s_std + s_mean


class CodeFormer(nn.Module):
    """CodeFormer with its released defaults; every size is a parameter so tiny models share the code.

    The released model is ``CodeFormer()`` (nf=64, ch_mult=(1,2,2,4,4,8), 512x512 faces, 16x16
    latent, codebook 1024x256, 9 transformer layers of width 512, fusion at 32/64/128/256).
    """

    def __init__(
        self,
        nf: int = 64,
        ch_mult: Sequence[int] = (1, 2, 2, 4, 4, 8),
        res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (16,),
        img_size: int = 512,
        codebook_size: int = 1024,
        emb_dim: int = 256,
        dim_embd: int = 512,
        n_head: int = 8,
        n_layers: int = 9,
        dim_mlp: int | None = None,
        connect_list: Sequence[str] = ("32", "64", "128", "256"),
    ) -> None:
        super().__init__()
        levels = len(ch_mult)
        self.img_size = img_size
        self.latent_res = img_size // 2 ** (levels - 1)
        self.emb_dim = emb_dim
        self.connect_list = [str(c) for c in connect_list]

        # Encoder: conv, per level (ResBlock [+Attn]) x res_blocks then Downsample, then a
        # non-local ResBlock/Attn/ResBlock, norm and a conv to the codebook width.
        enc: list[nn.Module] = [nn.Conv2d(3, nf, 3, 1, 1)]
        enc_res = [img_size]
        enc_kind = ["conv"]
        res = img_size
        ch = nf
        in_mult = (1, *ch_mult)
        for i in range(levels):
            ch, out = nf * in_mult[i], nf * ch_mult[i]
            for _ in range(res_blocks):
                enc.append(_VQResBlock(ch, out))
                enc_kind.append("res")
                ch = out
                if res in attn_resolutions:
                    enc.append(_VQAttnBlock(ch))
                    enc_kind.append("attn")
                enc_res += [res] * (len(enc) - len(enc_res))
            if i != levels - 1:
                enc.append(_Downsample(ch))
                enc_kind.append("down")
                res //= 2
                enc_res.append(res)
        level_end = len(enc)
        enc += [_VQResBlock(ch, ch), _VQAttnBlock(ch), _VQResBlock(ch, ch), _group_norm(ch)]
        enc.append(nn.Conv2d(ch, emb_dim, 3, 1, 1))
        enc_res += [res] * 5
        self.encoder = _Blocks(enc, enc_res)

        self.quantize = _Codebook(codebook_size, emb_dim)

        # Generator: the mirror image, from the latent up to RGB.
        ch = nf * ch_mult[-1]
        gen: list[nn.Module] = [nn.Conv2d(emb_dim, ch, 3, 1, 1), _VQResBlock(ch, ch), _VQAttnBlock(ch)]
        gen.append(_VQResBlock(ch, ch))
        gen_kind = ["conv", "res", "attn", "res"]
        gen_level_start = len(gen)
        gen_res = [res] * len(gen)
        for i in reversed(range(levels)):
            out = nf * ch_mult[i]
            for _ in range(res_blocks):
                gen.append(_VQResBlock(ch, out))
                gen_kind.append("res")
                ch = out
                if res in attn_resolutions:
                    gen.append(_VQAttnBlock(ch))
                    gen_kind.append("attn")
                gen_res += [res] * (len(gen) - len(gen_res))
            if i != 0:
                gen.append(_Upsample(ch))
                gen_kind.append("up")
                res *= 2
                gen_res.append(res)
        gen += [_group_norm(ch), nn.Conv2d(ch, 3, 3, 1, 1)]
        gen_res += [res, res]
        self.generator = _Blocks(gen, gen_res)

        dim_mlp = dim_mlp or 2 * dim_embd
        self.position_emb = nn.Parameter(torch.zeros(self.latent_res**2, dim_embd))
        self.feat_emb = nn.Linear(emb_dim, dim_embd)
        self.ft_layers = nn.Sequential(*[_SALayer(dim_embd, n_head, dim_mlp) for _ in range(n_layers)])
        self.idx_pred_layer = nn.Sequential(
            nn.LayerNorm(dim_embd), nn.Linear(dim_embd, codebook_size, bias=False)
        )

        # Where features are taken from / fused into. The original hard-codes these tables for
        # the released layout; they follow from the structure: the encoder's last ResBlock at a
        # resolution, and the generator's first ResBlock there (its last at the latent size).
        self.fuse_encoder_block: dict[str, int] = {}
        self.fuse_generator_block: dict[str, int] = {}
        for r in {int(c) for c in self.connect_list}:
            e = [i for i in range(level_end) if enc_kind[i] == "res" and enc_res[i] == r]
            g = [i for i in range(gen_level_start, len(gen_kind)) if gen_kind[i] == "res" and gen_res[i] == r]
            if not e or not g:
                raise ValueError(f"CodeFormer has no {r}x{r} features to connect")
            self.fuse_encoder_block[str(r)] = e[-1]
            self.fuse_generator_block[str(r)] = g[-1] if r == self.latent_res else g[0]
        self.fuse_convs_dict = nn.ModuleDict()
        for c in self.connect_list:
            width = nf * ch_mult[int(math.log2(img_size // int(c)))]
            self.fuse_convs_dict[c] = _FuseSFT(width, width)

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor], n_head: int = 8) -> CodeFormer:
        """Build (not load) a CodeFormer whose sizes match ``sd``; ``n_head`` is not in the tensors."""
        kinds = _block_kinds(sd, "encoder.blocks.")
        # kinds[0] is the input conv; the last five are the non-local blocks, norm and output conv.
        levels: list[list[tuple[str, tuple[int, ...]]]] = [[]]
        for kind in kinds[1:-5]:
            if kind[0] == "down":
                levels.append([])
            else:
                levels[-1].append(kind)
        nf = sd["encoder.blocks.0.weight"].shape[0]
        ch_mult = []
        for level in levels:
            outs = [shape[0] for k, shape in level if k == "res"]
            if not outs or outs[-1] % nf:
                raise ModelFileError("CodeFormer encoder layout is not recognised")
            ch_mult.append(outs[-1] // nf)
        res_blocks = sum(1 for k, _ in levels[0] if k == "res")
        latent_res = math.isqrt(sd["position_emb"].shape[0])
        img_size = latent_res * 2 ** (len(levels) - 1)
        attn = [img_size // 2**i for i, level in enumerate(levels) if any(k == "attn" for k, _ in level)]
        codebook_size, emb_dim = sd["quantize.embedding.weight"].shape
        n_layers = len({k.split(".")[1] for k in sd if k.startswith("ft_layers.")})
        connect = sorted({k.split(".")[1] for k in sd if k.startswith("fuse_convs_dict.")}, key=int)
        return cls(
            nf=nf,
            ch_mult=ch_mult,
            res_blocks=res_blocks,
            attn_resolutions=attn,
            img_size=img_size,
            codebook_size=codebook_size,
            emb_dim=emb_dim,
            dim_embd=sd["position_emb"].shape[1],
            n_head=n_head,
            n_layers=n_layers,
            dim_mlp=sd["ft_layers.0.linear1.weight"].shape[0] if n_layers else None,
            connect_list=connect,
        )

    def forward(self, x: torch.Tensor, w: float = 0.5, adain: bool = True) -> torch.Tensor:
        """Restore faces ``x`` (b, 3, img_size, img_size) in [-1, 1]; w=0 trusts the codebook, 1 the input."""
        enc_feats: dict[str, torch.Tensor] = {}
        take = {i: r for r, i in self.fuse_encoder_block.items() if r in self.connect_list}
        for i, block in enumerate(self.encoder.blocks):
            x = block(x)
            if i in take:
                enc_feats[take[i]] = x
        lq_feat = x
        b = x.shape[0]

        # Transformer predicts a codebook index per latent position (sequence-first layout).
        tokens = self.feat_emb(lq_feat.flatten(2).permute(2, 0, 1))
        pos = self.position_emb.unsqueeze(1).expand(-1, b, -1)
        for layer in self.ft_layers:
            tokens = layer(tokens, pos)
        logits = self.idx_pred_layer(tokens).permute(1, 0, 2)  # (b, hw, codebook)
        idx = logits.argmax(dim=2)
        quant = self.quantize.embedding.weight[idx]  # (b, hw, emb_dim)
        quant = quant.reshape(b, self.latent_res, self.latent_res, self.emb_dim).permute(0, 3, 1, 2)
        if adain:  # A1111 and CodeFormer's own inference match the input's feature statistics
            quant = _adain(quant, lq_feat)

        x = quant
        fuse = {i: r for r, i in self.fuse_generator_block.items() if r in self.connect_list}
        for i, block in enumerate(self.generator.blocks):
            x = block(x)
            if i in fuse and w > 0:
                r = fuse[i]
                x = self.fuse_convs_dict[r](enc_feats[r], x, w)
        return x


def _block_kinds(sd: Mapping[str, torch.Tensor], prefix: str) -> list[tuple[str, tuple[int, ...]]]:
    """(kind, defining shape) of each ``prefix<N>`` block, told apart by the keys it owns."""
    out: list[tuple[str, tuple[int, ...]]] = []
    i = 0
    while True:
        p = f"{prefix}{i}."
        if f"{p}q.weight" in sd:
            out.append(("attn", tuple(sd[f"{p}q.weight"].shape)))
        elif f"{p}conv1.weight" in sd:
            out.append(("res", tuple(sd[f"{p}conv1.weight"].shape)))
        elif f"{p}conv.weight" in sd:
            out.append(("down", tuple(sd[f"{p}conv.weight"].shape)))
        elif f"{p}weight" in sd:
            shape = tuple(sd[f"{p}weight"].shape)
            out.append(("conv" if len(shape) == 4 else "norm", shape))
        else:
            break
        i += 1
    if len(out) < 7:
        raise ModelFileError(f"CodeFormer weights have too few {prefix.rstrip('.')} entries")
    return out


# ---------------------------------------------------------------------------------------------------
# GFPGAN v1 clean (TencentARC/GFPGAN gfpgan/archs/gfpganv1_clean_arch.py + stylegan2_clean_arch.py layout)
# ---------------------------------------------------------------------------------------------------


def _stylegan_channels(out_size: int, channel_multiplier: float, narrow: float) -> dict[int, int]:
    """StyleGAN2's width per resolution: 512 up to 32x32, then 256*cm at 64x64, halving each step."""
    table: dict[int, int] = {}
    res = 4
    while res <= out_size:
        base = 512 if res <= 32 else 256 * channel_multiplier * 64 / res
        table[res] = int(base * narrow)
        res *= 2
    return table


class _NormStyle(nn.Module):
    """Pixel-norm of the style code (parameter-free ``style_mlp.0``), over dim 1 like the original."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + 1e-8)


class _ModulatedConv(nn.Module):
    """StyleGAN2 weight-modulated conv (no bias); the per-sample kernels run as one grouped conv."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel: int,
        style_dim: int,
        demodulate: bool = True,
        upsample: bool = False,
    ) -> None:
        super().__init__()
        self.out_ch = out_ch
        self.kernel = kernel
        self.demodulate = demodulate
        self.upsample = upsample
        self.modulation = nn.Linear(style_dim, in_ch)
        self.weight = nn.Parameter(
            torch.randn(1, out_ch, in_ch, kernel, kernel) / math.sqrt(in_ch * kernel**2)
        )

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        weight = self.weight * self.modulation(style).view(b, 1, c, 1, 1)  # (b, out, in, k, k)
        if self.demodulate:
            weight = weight * torch.rsqrt(weight.pow(2).sum(dim=(2, 3, 4), keepdim=True) + 1e-8)
        if self.upsample:  # the clean arch upsamples bilinearly, then convolves (no blur kernel)
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        h, w = x.shape[2:]
        kernels = weight.reshape(b * self.out_ch, c, self.kernel, self.kernel)
        out = F.conv2d(x.reshape(1, b * c, h, w), kernels, padding=self.kernel // 2, groups=b)
        return out.view(b, self.out_ch, *out.shape[2:])


class _StyleConv(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, style_dim: int, upsample: bool = False) -> None:
        super().__init__()
        self.modulated_conv = _ModulatedConv(in_ch, out_ch, 3, style_dim, demodulate=True, upsample=upsample)
        self.weight = nn.Parameter(torch.zeros(1))  # noise strength
        self.bias = nn.Parameter(torch.zeros(1, out_ch, 1, 1))

    def forward(self, x: torch.Tensor, style: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        out = self.modulated_conv(x, style) * 2**0.5  # the clean arch folds the old gain in here
        if noise is None:
            noise = out.new_empty(out.shape[0], 1, *out.shape[2:]).normal_()
        return F.leaky_relu(out + self.weight * noise + self.bias, 0.2)


class _ToRGB(nn.Module):
    def __init__(self, in_ch: int, style_dim: int, upsample: bool = True) -> None:
        super().__init__()
        self.upsample = upsample
        self.modulated_conv = _ModulatedConv(in_ch, 3, 1, style_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, x: torch.Tensor, style: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        out = self.modulated_conv(x, style) + self.bias
        if skip is not None:
            if self.upsample:
                skip = F.interpolate(skip, scale_factor=2, mode="bilinear", align_corners=False)
            out = out + skip
        return out


class _ConstantInput(nn.Module):
    def __init__(self, channels: int, size: int = 4) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(1, channels, size, size))


class _StyleGAN2CSFT(nn.Module):
    """StyleGAN2 generator whose first conv of each level is modulated by the U-Net's SFT conditions."""

    def __init__(
        self,
        out_size: int,
        num_style_feat: int = 512,
        num_mlp: int = 8,
        channel_multiplier: float = 2,
        narrow: float = 1,
        sft_half: bool = False,
        stored_noise: bool = True,
    ) -> None:
        super().__init__()
        self.sft_half = sft_half
        self.log_size = int(math.log2(out_size))
        self.num_layers = (self.log_size - 2) * 2 + 1  # style convs, each with its own noise
        self.num_latent = self.log_size * 2 - 2  # style vectors consumed (convs + to_rgbs)
        ch = _stylegan_channels(out_size, channel_multiplier, narrow)

        mlp: list[nn.Module] = [_NormStyle()]
        for _ in range(num_mlp):
            mlp += [nn.Linear(num_style_feat, num_style_feat), nn.LeakyReLU(0.2)]
        self.style_mlp = nn.Sequential(*mlp)

        self.constant_input = _ConstantInput(ch[4])
        self.style_conv1 = _StyleConv(ch[4], ch[4], num_style_feat)
        self.to_rgb1 = _ToRGB(ch[4], num_style_feat, upsample=False)
        self.style_convs = nn.ModuleList()
        self.to_rgbs = nn.ModuleList()
        in_ch = ch[4]
        for i in range(3, self.log_size + 1):
            out_ch = ch[2**i]
            self.style_convs.append(_StyleConv(in_ch, out_ch, num_style_feat, upsample=True))
            self.style_convs.append(_StyleConv(out_ch, out_ch, num_style_feat))
            self.to_rgbs.append(_ToRGB(out_ch, num_style_feat))
            in_ch = out_ch
        # The released weights ship fixed noise maps; using them makes restoration reproducible.
        self.noises = nn.Module()
        self.stored_noise = stored_noise
        if stored_noise:
            for idx in range(self.num_layers):
                res = 2 ** ((idx + 5) // 2)
                self.noises.register_buffer(f"noise{idx}", torch.zeros(1, 1, res, res))

    def forward(
        self,
        style: torch.Tensor,
        conditions: Sequence[torch.Tensor],
        input_is_latent: bool = True,
        randomize_noise: bool = False,
    ) -> torch.Tensor:
        if not input_is_latent:
            style = self.style_mlp(style)
        # One style vector per layer (different_w), or the same one repeated.
        latent = style if style.ndim == 3 else style.unsqueeze(1).expand(-1, self.num_latent, -1)
        noise: list[torch.Tensor | None]
        if randomize_noise or not self.stored_noise:
            noise = [None] * self.num_layers
        else:
            noise = [getattr(self.noises, f"noise{i}") for i in range(self.num_layers)]

        out = self.constant_input.weight.expand(latent.shape[0], -1, -1, -1)
        out = self.style_conv1(out, latent[:, 0], noise[0])
        skip = self.to_rgb1(out, latent[:, 1])
        for level, to_rgb in enumerate(self.to_rgbs):
            i = 2 * level + 1
            out = self.style_convs[2 * level](out, latent[:, i], noise[i])
            if 2 * level + 1 < len(conditions):  # SFT: scale and shift from the U-Net at this level
                scale, shift = conditions[2 * level], conditions[2 * level + 1]
                if self.sft_half:  # only the second half of the channels is modulated
                    keep, sft = torch.split(out, out.shape[1] // 2, dim=1)
                    out = torch.cat([keep, sft * scale + shift], dim=1)
                else:
                    out = out * scale + shift
            out = self.style_convs[2 * level + 1](out, latent[:, i + 1], noise[i + 1])
            skip = to_rgb(out, latent[:, i + 2], skip)
        return skip


class _GFPResBlock(nn.Module):
    """U-Net residual block that resamples bilinearly by ``scale`` (0.5 down, 2 up)."""

    def __init__(self, in_ch: int, out_ch: int, scale: float) -> None:
        super().__init__()
        self.scale = scale
        self.conv1 = nn.Conv2d(in_ch, in_ch, 3, 1, 1)
        self.conv2 = nn.Conv2d(in_ch, out_ch, 3, 1, 1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.leaky_relu(self.conv1(x), 0.2)
        out = F.interpolate(out, scale_factor=self.scale, mode="bilinear", align_corners=False)
        out = F.leaky_relu(self.conv2(out), 0.2)
        x = F.interpolate(x, scale_factor=self.scale, mode="bilinear", align_corners=False)
        return out + self.skip(x)


def _sft_branch(ch: int, out_ch: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(ch, ch, 3, 1, 1), nn.LeakyReLU(0.2), nn.Conv2d(ch, out_ch, 3, 1, 1))


class GFPGANv1Clean(nn.Module):
    """GFPGAN v1 clean: a U-Net whose features steer a pretrained StyleGAN2 decoder through SFT.

    The released GFPGANv1.3/1.4 is ``GFPGANv1Clean()``: 512x512 faces, 512-wide styles, 8 MLP
    layers, channel_multiplier 2, narrow 1, one style vector per layer (different_w), latent input
    (the MLP is skipped, as GFPGANer builds it) and SFT on half the channels.
    """

    def __init__(
        self,
        out_size: int = 512,
        num_style_feat: int = 512,
        channel_multiplier: float = 2,
        num_mlp: int = 8,
        input_is_latent: bool = True,
        different_w: bool = True,
        narrow: float = 1,
        sft_half: bool = True,
        stored_noise: bool = True,
    ) -> None:
        super().__init__()
        self.img_size = out_size
        self.input_is_latent = input_is_latent
        self.different_w = different_w
        self.num_style_feat = num_style_feat
        self.log_size = int(math.log2(out_size))
        if 2**self.log_size != out_size or self.log_size < 3:
            raise ValueError(f"GFPGAN output size must be a power of two >= 8, got {out_size}")
        ch = _stylegan_channels(out_size, channel_multiplier, narrow * 0.5)  # the U-Net is half as wide

        self.conv_body_first = nn.Conv2d(3, ch[out_size], 1)
        self.conv_body_down = nn.ModuleList()
        in_ch = ch[out_size]
        for i in range(self.log_size, 2, -1):
            self.conv_body_down.append(_GFPResBlock(in_ch, ch[2 ** (i - 1)], 0.5))
            in_ch = ch[2 ** (i - 1)]
        self.final_conv = nn.Conv2d(in_ch, ch[4], 3, 1, 1)

        self.conv_body_up = nn.ModuleList()
        self.toRGB = nn.ModuleList()  # auxiliary RGB heads: only trained, but stored in the weights
        self.condition_scale = nn.ModuleList()
        self.condition_shift = nn.ModuleList()
        in_ch = ch[4]
        for i in range(3, self.log_size + 1):
            out_ch = ch[2**i]
            self.conv_body_up.append(_GFPResBlock(in_ch, out_ch, 2.0))
            self.toRGB.append(nn.Conv2d(out_ch, 3, 1))
            # Half SFT modulates half the decoder's channels, which is exactly the U-Net's width.
            sft_ch = out_ch if sft_half else out_ch * 2
            self.condition_scale.append(_sft_branch(out_ch, sft_ch))
            self.condition_shift.append(_sft_branch(out_ch, sft_ch))
            in_ch = out_ch

        n_latent = (self.log_size * 2 - 2) if different_w else 1
        self.final_linear = nn.Linear(ch[4] * 16, n_latent * num_style_feat)
        self.stylegan_decoder = _StyleGAN2CSFT(
            out_size, num_style_feat, num_mlp, channel_multiplier, narrow, sft_half, stored_noise
        )

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor]) -> GFPGANv1Clean:
        """Build (not load) a GFPGANv1Clean whose sizes match ``sd``.

        ``input_is_latent`` is not in the tensors; it is True as GFPGANer (and A1111) build v1.3/1.4.
        """
        dec = "stylegan_decoder."
        levels = _count(sd, "conv_body_up.", ".conv1.weight")
        log_size = levels + 2
        num_style_feat = sd[f"{dec}style_conv1.modulated_conv.modulation.weight"].shape[1]
        narrow = sd[f"{dec}constant_input.weight"].shape[1] / 512
        multiplier: float = 2
        if log_size >= 6:  # widths beyond 32x32 scale with the multiplier
            width64 = sd[f"{dec}style_convs.6.modulated_conv.weight"].shape[1]
            multiplier = width64 / (256 * narrow)
            multiplier = round(multiplier) if abs(multiplier - round(multiplier)) < 1e-6 else multiplier
        scale_out, scale_in = sd["condition_scale.0.2.weight"].shape[:2]
        return cls(
            out_size=2**log_size,
            num_style_feat=num_style_feat,
            channel_multiplier=multiplier,
            num_mlp=_count(sd, f"{dec}style_mlp.", ".weight"),
            different_w=sd["final_linear.weight"].shape[0] != num_style_feat,
            narrow=narrow,
            sft_half=scale_out == scale_in,
            stored_noise=f"{dec}noises.noise0" in sd,
        )

    def forward(
        self,
        x: torch.Tensor,
        return_latents: bool = False,
        return_rgb: bool = True,
        randomize_noise: bool = False,
        **_ignored: Any,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Restore faces ``x`` (b, 3, out_size, out_size) in [-1, 1] -> (image, intermediate RGBs).

        Same call as the original (A1111 takes ``net(x, return_rgb=False)[0]``; extra keywords
        such as CodeFormer's ``weight`` are ignored). ``randomize_noise`` defaults to False here:
        the stored noise maps give reproducible output, where GFPGANer draws fresh noise per call.
        ``return_latents`` is accepted for compatibility; latents are not returned.
        """
        feat = F.leaky_relu(self.conv_body_first(x), 0.2)
        skips: list[torch.Tensor] = []
        for block in self.conv_body_down:
            feat = block(feat)
            skips.insert(0, feat)
        feat = F.leaky_relu(self.final_conv(feat), 0.2)

        style = self.final_linear(feat.flatten(1))
        if self.different_w:
            style = style.view(style.shape[0], -1, self.num_style_feat)

        conditions: list[torch.Tensor] = []
        rgbs: list[torch.Tensor] = []
        for i, up in enumerate(self.conv_body_up):
            feat = up(feat + skips[i])
            conditions += [self.condition_scale[i](feat), self.condition_shift[i](feat)]
            if return_rgb:
                rgbs.append(self.toRGB[i](feat))

        image = self.stylegan_decoder(style, conditions, self.input_is_latent, randomize_noise)
        return image, rgbs


def _count(sd: Mapping[str, torch.Tensor], prefix: str, suffix: str) -> int:
    """How many ``prefix<N>suffix`` keys there are (e.g. the layers of a ModuleList)."""
    pattern = re.compile(re.escape(prefix) + r"\d+" + re.escape(suffix) + "$")
    return sum(1 for k in sd if pattern.match(k))


# ---------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------


def _unwrap(obj: Any) -> Any:
    # BasicSR checkpoints keep the weights under "params_ema" (EMA, what A1111 uses) or "params".
    if isinstance(obj, dict):
        for key in ("params_ema", "params"):
            if isinstance(obj.get(key), dict):
                return obj[key]
    return obj


def load_face_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The tensors of a face-restoration weights file, ``params_ema``/``params`` unwrapped.

    ``files.load_state_dict`` keeps only top-level tensors, which would drop the BasicSR wrapper,
    so pickles go through the same safe ``weights_only`` loader it uses and are unwrapped here.
    """
    path = Path(path)
    if path.suffix.lower() in files.SAFETENSORS_EXTS:
        return files.load_state_dict(path)
    return files.tensors_of(path, _unwrap(files.load_pickle(path)))


def detect_architecture(sd: Mapping[str, torch.Tensor]) -> str:
    """``"CodeFormer"`` or ``"GFPGAN"`` (v1 clean: 1.3/1.4) from the key layout; ModelFileError otherwise."""
    if "position_emb" in sd and "quantize.embedding.weight" in sd and "idx_pred_layer.1.weight" in sd:
        return CODEFORMER
    if "conv_body_first.weight" in sd and "stylegan_decoder.constant_input.weight" in sd:
        return GFPGAN
    raise ModelFileError("not a CodeFormer or GFPGAN (v1 clean) state dict")


_BUILDERS: dict[str, Callable[[Mapping[str, torch.Tensor]], nn.Module]] = {
    CODEFORMER: CodeFormer.from_state_dict,
    GFPGAN: GFPGANv1Clean.from_state_dict,
}


def build_face_model(sd: Mapping[str, torch.Tensor], name: str = "weights") -> nn.Module:
    """A face-restoration network of the detected architecture with ``sd`` loaded, in eval mode."""
    arch = detect_architecture(sd)
    try:
        model: nn.Module = _BUILDERS[arch](sd)
    except (KeyError, IndexError, ValueError) as exc:
        raise ModelFileError(f"{name}: {arch} layout is not recognised ({exc})") from None
    try:
        missing, _unexpected = model.load_state_dict(dict(sd), strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise ModelFileError(
            f"{name}: {arch} weights do not fit the layout ({str(exc).splitlines()[-1].strip()})"
        ) from None
    # Extra keys (training leftovers) are harmless; a missing one means a different architecture.
    if missing:
        raise ModelFileError(f"{name}: {arch} weights lack {len(missing)} tensors, e.g. {missing[0]}")
    return model.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------------
# Detection, crop and paste
# ---------------------------------------------------------------------------------------------------

# The Haar box spans roughly brows to chin; the networks were trained on FFHQ crops that show the
# whole head, so the crop is about twice the detected box.
CROP_SCALE = 2.0


def detect_faces(image: Image.Image, min_size: int = 32) -> list[Box]:
    """Frontal faces found by OpenCV's bundled Haar cascade, largest first."""
    import cv2

    cascade = cv2.CascadeClassifier(
        os.path.join(cv2.data.haarcascades, "haarcascade_frontalface_default.xml")
    )
    if cascade.empty():
        raise MuralistError("OpenCV's haarcascade_frontalface_default.xml could not be loaded")
    gray = cv2.equalizeHist(np.asarray(image.convert("L")))
    found = cascade.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5, minSize=(min_size, min_size))
    boxes = [(int(x), int(y), int(x + w), int(y + h)) for x, y, w, h in (found if len(found) else [])]
    return sorted(boxes, key=lambda b: (b[2] - b[0]) * (b[3] - b[1]), reverse=True)


def face_crop_box(box: Box, scale: float = CROP_SCALE) -> Box:
    """The square region cut around a face box (may reach past the image edges); only it changes."""
    x0, y0, x1, y1 = box
    side = max(2, round(max(x1 - x0, y1 - y0) * scale))
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    left, top = round(cx - side / 2), round(cy - side / 2)
    return left, top, left + side, top + side


def _feather_mask(side: int) -> np.ndarray:
    # 1 in the middle, ramping linearly to 0 at the crop's border, so seams do not show.
    ramp = max(1.0, side / 8)
    d = np.arange(side, dtype=np.float32)
    edge = np.minimum(d + 0.5, side - d - 0.5) / ramp
    edge = np.clip(edge, 0.0, 1.0)
    return np.minimum(edge[:, None], edge[None, :])[..., None]


def _run_net(model: nn.Module, x: torch.Tensor, weight: float) -> torch.Tensor:
    if isinstance(model, CodeFormer):
        return model(x, w=weight, adain=True)
    if isinstance(model, GFPGANv1Clean):
        # As A1111 calls it: the restored image only; GFPGAN has no fidelity weight.
        return model(x, return_rgb=False)[0]
    return model(x)


def _restore_crop(crop: np.ndarray, model: nn.Module, weight: float) -> np.ndarray:
    """One face crop (side, side, 3) uint8 RGB -> restored, same size, float32 0..255."""
    side = crop.shape[0]
    size = int(model.img_size)
    face = Image.fromarray(crop).resize((size, size), Image.Resampling.LANCZOS)
    param = next(model.parameters())
    x = torch.from_numpy(np.asarray(face, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
    with torch.inference_mode():
        y = _run_net(model, x.to(param.device, param.dtype), weight)
    y = ((y[0].float().clamp(-1, 1) + 1) * 127.5).round().permute(1, 2, 0).cpu().numpy().astype(np.uint8)
    return np.asarray(Image.fromarray(y).resize((side, side), Image.Resampling.LANCZOS), dtype=np.float32)


def blend(original: Image.Image, restored: Image.Image, visibility: float) -> Image.Image:
    """A1111's visibility: ``Image.blend(original, restored, visibility)``; 0 returns the original."""
    if visibility <= 0:
        return original.copy()
    if visibility >= 1:
        return restored
    return Image.blend(original, restored, visibility)


def restore_boxes(
    image: Image.Image,
    boxes: Sequence[Box],
    model: nn.Module,
    visibility: float = 1.0,
    weight: float = 0.5,
) -> Image.Image:
    """Restore the faces at ``boxes`` (x0, y0, x1, y1) and paste them back; nothing outside
    ``face_crop_box(box)`` changes. Used by ``restore`` after detection, and directly by callers
    (and tests) that already know where the faces are."""
    original = image.convert("RGB")
    if visibility <= 0 or not boxes:
        return original.copy()
    src = np.asarray(original)
    out = src.astype(np.float32)
    h, w = src.shape[:2]
    for box in boxes:
        x0, y0, x1, y1 = face_crop_box(box)
        side = x1 - x0
        # Edge-replicate where the square reaches past the image, so the face stays centred.
        ys = np.clip(np.arange(y0, y1), 0, h - 1)
        xs = np.clip(np.arange(x0, x1), 0, w - 1)
        restored = _restore_crop(np.ascontiguousarray(src[ys][:, xs]), model, weight)
        mask = _feather_mask(side)
        cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
        if cx0 >= cx1 or cy0 >= cy1:
            continue
        sl = (slice(cy0 - y0, cy1 - y0), slice(cx0 - x0, cx1 - x0))
        region = out[cy0:cy1, cx0:cx1]
        out[cy0:cy1, cx0:cx1] = region + (restored[sl] - region) * mask[sl]
    result = Image.fromarray(np.clip(out.round(), 0, 255).astype(np.uint8))
    return blend(original, result, visibility)


# ---------------------------------------------------------------------------------------------------
# A1111 folders
# ---------------------------------------------------------------------------------------------------

# Folder under models/ and the file name A1111 downloads there.
_FOLDERS = {CODEFORMER: ("Codeformer", "codeformer-v0.1.0.pth"), GFPGAN: ("GFPGAN", "GFPGANv1.4.pth")}
_EXTS = (".pth", ".safetensors")


class FaceRestorers:
    """CodeFormer/GFPGAN weights from an A1111 data folder (``models/Codeformer``, ``models/GFPGAN``).

    GFPGAN files must be v1 clean (GFPGANv1.3/1.4, what A1111 downloads); the original v1 with
    its custom CUDA ops, RestoreFormer and GPEN are rejected as unrecognised.

    ``dirs`` is a ``DataDirs`` or the data folder itself. Networks load on first use and are kept
    in ``manager`` (evicted by its budget); concurrent requests load each file once.
    """

    def __init__(
        self,
        dirs: DataDirs | str | os.PathLike[str],
        device: str | torch.device = "cpu",
        manager: ModelManager | None = None,
    ) -> None:
        root = dirs.root if isinstance(dirs, DataDirs) else Path(dirs)
        self.folders = {name: root / "models" / folder for name, (folder, _) in _FOLDERS.items()}
        self.device = torch.device(device)
        # Loaded networks live in the worker's manager (one budget for all kinds), else a private one.
        self.manager = manager if manager is not None else ModelManager(self.device)

    def find(self, model: str) -> Path:
        """The weights file for ``model``: A1111's default name if present, else the first .pth there."""
        name = self._canonical(model)
        folder = self.folders[name]
        default = folder / _FOLDERS[name][1]
        if default.is_file():
            return default
        cands = (
            sorted(p for p in folder.glob("*") if p.suffix.lower() in _EXTS and p.is_file())
            if folder.is_dir()
            else []
        )
        # Prefer a file named after the model (A1111 filters GFPGAN files by name too).
        named = [p for p in cands if re.search(name, p.name, re.IGNORECASE)]
        if named or cands:
            return (named or cands)[0]
        raise MuralistError(
            f"{name} weights not found: put {_FOLDERS[name][1]} (or any {name} .pth file) in {folder}"
        )

    def _request(self, model: str) -> tuple[tuple[str, str, int, int, str], Callable[[], nn.Module], int, str]:
        """(manager key, loader, size estimate, label) of ``model``'s current weights file."""
        name = self._canonical(model)
        path = self.find(name)
        st = path.stat()
        key = (name, str(path), st.st_mtime_ns, st.st_size, str(self.device))

        def load() -> nn.Module:
            sd = load_face_state_dict(path)
            arch = detect_architecture(sd)
            if arch != name:
                raise ModelFileError(f"{path} holds {arch} weights, not {name}")
            return build_face_model(sd, str(path)).to(self.device)

        # One network per restorer, as before: a replaced or re-chosen file frees the old one.
        self.manager.discard("face", lambda k: k[0] == name and k[4] == key[4] and k != key)
        return key, load, st.st_size, f"{name} ({path.name})"

    def load(self, model: str) -> nn.Module:
        """The network for ``model``, loaded (once per file version) from ``find(model)``."""
        return self.manager.get("face", *self._request(model))

    def restore(
        self,
        image: Image.Image,
        model: str = CODEFORMER,
        visibility: float = 1.0,
        weight: float = 0.5,
    ) -> Image.Image:
        """Detect faces and restore them (A1111 extras: visibility 0..1, CodeFormer weight 0..1).

        ``weight`` is CodeFormer's fidelity; GFPGAN has none and ignores it, as in A1111."""
        if not 0 <= visibility <= 1:
            raise InvalidRequestError(
                f"face restoration visibility must be between 0 and 1, got {visibility}"
            )
        if not 0 <= weight <= 1:
            raise InvalidRequestError(f"CodeFormer weight must be between 0 and 1, got {weight}")
        if visibility == 0:
            return image.convert("RGB").copy()
        with self.manager.use("face", *self._request(model)) as net:  # pinned while it runs
            return restore_boxes(image, detect_faces(image), net, visibility, weight)

    @staticmethod
    def _canonical(model: str) -> str:
        for name in _FOLDERS:
            if model.lower() == name.lower():
                return name
        raise InvalidRequestError(f"unknown face restorer {model!r}; choose CodeFormer or GFPGAN")
