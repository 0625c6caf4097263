"""Key mapping between diffusers' module layout and A1111's single-file (LDM/SGM) layout.

One set of naming rules serves both directions: ``rules_for(...)`` lists, for every tensor of a
diffusers component, where it lives in an A1111 checkpoint and how it is transformed (a plain
copy, a 1x1-conv reshape, a transpose, or OpenCLIP's fused q/k/v). Loading a checkpoint reads
tensors through the rules; exporting (tests' fixtures, merges, LoRA training) writes through
them; a round trip is bit-exact because every transform is exactly invertible.

The rules are computed from the component's own key list and block structure, never from a
hard-coded model size, so SD1-, SD2- and SDXL-shaped models of any size share this code.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

import torch

from ..errors import ModelFileError

Transform = Literal["copy", "conv1x1", "transpose", "qkv"]

UNET = "model.diffusion_model."
VAE = "first_stage_model."
TE_PREFIX = {
    # component -> (A1111 prefix, layout)
    ("sd1", "text_encoder"): ("cond_stage_model.transformer.text_model.", "clip"),
    ("sd2", "text_encoder"): ("cond_stage_model.model.", "openclip"),
    ("sdxl", "text_encoder"): ("conditioner.embedders.0.transformer.text_model.", "clip"),
    ("sdxl", "text_encoder_2"): ("conditioner.embedders.1.model.", "openclip"),
}


@dataclass(frozen=True)
class Rule:
    """Tensor ``a1111`` of the checkpoint is made from diffusers tensors ``diffusers`` by ``transform``."""

    a1111: str
    diffusers: tuple[str, ...]
    transform: Transform = "copy"


# ---------------------------------------------------------------- UNet

_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_UNET_TOP = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def _resnet_tail(tail: str) -> str:
    head, _, rest = tail.partition(".")
    return f"{_RESNET.get(head, head)}.{rest}"


def unet_key(key: str, layers_per_block: int, up_has_attention: list[bool]) -> str:
    """The A1111 name of a diffusers UNet2DConditionModel tensor."""
    n = layers_per_block + 1  # A1111 numbers resnets, attentions and the resampler of a level together
    for src, dst in _UNET_TOP.items():
        if key.startswith(src + "."):
            return dst + key[len(src) :]
    if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        b, kind, j, tail = int(m[1]), m[2], int(m[3]), m[4]
        idx = 1 + b * n + j
        return f"input_blocks.{idx}.0.{_resnet_tail(tail)}" if kind == "resnets" else f"input_blocks.{idx}.1.{tail}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{(int(m[1]) + 1) * n}.0.op.{m[2]}"
    if m := re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key):
        kind, j, tail = m[1], int(m[2]), m[3]
        if kind == "attentions":
            return f"middle_block.1.{tail}"
        return f"middle_block.{2 * j}.{_resnet_tail(tail)}"
    if m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        b, kind, j, tail = int(m[1]), m[2], int(m[3]), m[4]
        idx = b * n + j
        return f"output_blocks.{idx}.0.{_resnet_tail(tail)}" if kind == "resnets" else f"output_blocks.{idx}.1.{tail}"
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        b = int(m[1])
        slot = 2 if up_has_attention[b] else 1
        return f"output_blocks.{b * n + layers_per_block}.{slot}.conv.{m[2]}"
    raise ModelFileError(f"no A1111 name for UNet tensor {key!r}")


# ---------------------------------------------------------------- VAE

_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_key(key: str, num_levels: int) -> tuple[str, Transform]:
    """The A1111 name of a diffusers AutoencoderKL tensor and the transform to it."""
    key = key.replace(".conv_shortcut.", ".nin_shortcut.")
    if m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(.+)", key):
        part, name, tail = m[1], m[2], m[3]
        transform: Transform = "conv1x1" if name != "group_norm" and tail == "weight" else "copy"
        return f"{part}.mid.attn_1.{_VAE_ATTN[name]}.{tail}", transform
    if m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}", "copy"
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{m[3]}", "copy"
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}", "copy"
    # The decoder's levels are numbered from the bottom in A1111 and from the top in diffusers.
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"decoder.up.{num_levels - 1 - int(m[1])}.block.{m[2]}.{m[3]}", "copy"
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        return f"decoder.up.{num_levels - 1 - int(m[1])}.upsample.conv.{m[2]}", "copy"
    key = re.sub(r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out.", key)
    return key, "copy"


# ---------------------------------------------------------------- text encoders

_OPENCLIP_LAYER = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}


def openclip_rules(keys: Iterable[str], prefix: str) -> list[Rule]:
    """Rules for a transformers CLIP text model (inner ``text_model`` keys + ``text_projection``) in OpenCLIP layout."""
    rules: list[Rule] = []
    for key in keys:
        if m := re.match(r"encoder\.layers\.(\d+)\.self_attn\.q_proj\.(weight|bias)", key):
            i, kind = m[1], m[2]
            parts = tuple(f"encoder.layers.{i}.self_attn.{p}_proj.{kind}" for p in "qkv")
            rules.append(Rule(f"{prefix}transformer.resblocks.{i}.attn.in_proj_{kind}", parts, "qkv"))
        elif re.match(r"encoder\.layers\.\d+\.self_attn\.[kv]_proj\.", key):
            continue  # fused with q above
        elif m := re.match(r"encoder\.layers\.(\d+)\.([a-z_0-9.]+)\.(weight|bias)", key):
            rules.append(Rule(f"{prefix}transformer.resblocks.{m[1]}.{_OPENCLIP_LAYER[m[2]]}.{m[3]}", (key,)))
        elif key == "embeddings.token_embedding.weight":
            rules.append(Rule(prefix + "token_embedding.weight", (key,)))
        elif key == "embeddings.position_embedding.weight":
            rules.append(Rule(prefix + "positional_embedding", (key,)))
        elif key.startswith("final_layer_norm."):
            rules.append(Rule(prefix + "ln_final." + key.split(".")[-1], (key,)))
        elif key == "text_projection.weight":
            rules.append(Rule(prefix + "text_projection", (key,), "transpose"))
        elif key == "embeddings.position_ids":
            continue
        else:
            raise ModelFileError(f"no OpenCLIP name for text-encoder tensor {key!r}")
    return rules


def clip_rules(keys: Iterable[str], prefix: str) -> list[Rule]:
    """Rules for a transformers CLIP text model in OpenAI/HF layout (A1111's SD1 and SDXL-L)."""
    return [Rule(prefix + k, (k,)) for k in keys if k != "embeddings.position_ids"]


# ---------------------------------------------------------------- rules for whole components


def unet_rules(keys: Iterable[str], config: Mapping) -> list[Rule]:
    up_attn = [t.startswith("CrossAttn") for t in config["up_block_types"]]
    lpb = config["layers_per_block"]
    return [Rule(UNET + unet_key(k, lpb, up_attn), (k,)) for k in keys]


def vae_rules(keys: Iterable[str], config: Mapping) -> list[Rule]:
    levels = len(config["block_out_channels"])
    out = []
    for k in keys:
        name, transform = vae_key(k, levels)
        out.append(Rule(VAE + name, (k,), transform))
    return out


def text_encoder_rules(keys: Iterable[str], family: str, component: str) -> list[Rule]:
    """``keys`` are the text model's inner keys (no ``text_model.`` prefix) plus ``text_projection.weight``."""
    prefix, layout = TE_PREFIX[(family, component)]
    return openclip_rules(keys, prefix) if layout == "openclip" else clip_rules(keys, prefix)


# ---------------------------------------------------------------- applying rules


def to_a1111(rules: Iterable[Rule], tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Diffusers tensors -> A1111 tensors."""
    out: dict[str, torch.Tensor] = {}
    for r in rules:
        src = [tensors[k] for k in r.diffusers]
        if r.transform == "copy":
            out[r.a1111] = src[0]
        elif r.transform == "conv1x1":
            out[r.a1111] = src[0].reshape(*src[0].shape, 1, 1)
        elif r.transform == "transpose":
            out[r.a1111] = src[0].t().contiguous()
        else:
            out[r.a1111] = torch.cat(src, dim=0)
    return out


def from_a1111(rules: Iterable[Rule], sd: Mapping[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    """A1111 tensors -> diffusers tensors; a missing tensor is a ModelFileError naming it."""
    out: dict[str, torch.Tensor] = {}
    missing: list[str] = []
    for r in rules:
        t = sd.get(r.a1111)
        if t is None:
            missing.append(r.a1111)
            continue
        if r.transform == "copy":
            out[r.diffusers[0]] = t
        elif r.transform == "conv1x1":
            out[r.diffusers[0]] = t.reshape(t.shape[0], t.shape[1]) if t.ndim == 4 else t
        elif r.transform == "transpose":
            out[r.diffusers[0]] = t.t().contiguous()
        else:
            for name, part in zip(r.diffusers, t.chunk(3, dim=0), strict=True):
                out[name] = part
    if missing:
        raise ModelFileError(
            f"the checkpoint's {what} is incomplete: {len(missing)} tensors missing (e.g. {missing[0]})"
        )
    return out
