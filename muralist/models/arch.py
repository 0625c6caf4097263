"""Architecture inference: diffusers/transformers configs read off an A1111 checkpoint's tensor shapes.

Channels per level, layers per block, transformer depth, context width, text-encoder width and
depth, input channels: all come from the tensors, so any SD1-, SD2- or SDXL-shaped checkpoint
(full size or a tiny test model) loads through the same code. Only what shapes cannot tell is a
per-family convention, as in A1111's yaml configs: attention head counts, activation functions,
the VAE scaling factor, and which hidden layer feeds the UNet.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import ModelFileError
from .family import UNET_PREFIX, VAE_PREFIX, Family, ModelKind

Shapes = Mapping[str, Sequence[int]]

VAE_SCALING = {Family.SD1: 0.18215, Family.SD2: 0.18215, Family.SDXL: 0.13025}
DEFAULT_SIZE = {Family.SD1: 512, Family.SD2: 512, Family.SDXL: 1024}


def heads_for(width: int, head_dim: int = 64) -> int:
    """Attention heads for a width when the family fixes the head size (64 in CLIP, SD2 and SDXL).

    Widths below one head (tiny test models) use heads of 8 channels so that they still have
    several heads, like the real models.
    """
    if width >= head_dim and width % head_dim == 0:
        return width // head_dim
    return max(1, width // 8)


def _count(shapes: Shapes, pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m[1] for k in shapes if (m := rx.match(k))})


def _shape(shapes: Shapes, key: str) -> Sequence[int]:
    try:
        return shapes[key]
    except KeyError:
        raise ModelFileError(f"cannot read the architecture: tensor {key!r} is missing") from None


@dataclass
class Architecture:
    """Everything needed to build empty diffusers components for a checkpoint."""

    kind: ModelKind
    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoders: dict[str, dict[str, Any]] = field(default_factory=dict)  # component -> CLIPTextConfig kwargs

    @property
    def family(self) -> Family:
        return self.kind.family


# ---------------------------------------------------------------- UNet


def unet_config(shapes: Shapes, kind: ModelKind) -> dict[str, Any]:
    p = UNET_PREFIX
    n_input = _count(shapes, re.escape(p) + r"input_blocks\.(\d+)\.")
    n_down = _count(shapes, re.escape(p) + r"input_blocks\.(\d+)\.0\.op\.weight") + 1
    if n_input % n_down:
        raise ModelFileError("cannot read the UNet's layout: input blocks do not split into levels")
    lpb = n_input // n_down - 1
    if lpb < 1:
        raise ModelFileError("cannot read the UNet's layout: no resnet blocks")
    channels, down_types, depths, attn_levels = [], [], [], []
    for b in range(n_down):
        first = 1 + b * (lpb + 1)
        channels.append(int(_shape(shapes, f"{p}input_blocks.{first}.0.out_layers.3.weight")[0]))
        depth = _count(shapes, re.escape(f"{p}input_blocks.{first}.1.transformer_blocks.") + r"(\d+)\.")
        depths.append(max(depth, 1))
        attn_levels.append(depth > 0)
        down_types.append("CrossAttnDownBlock2D" if depth else "DownBlock2D")
    up_depths = []
    up_types = []
    for b in range(n_down):
        first = b * (lpb + 1)
        depth = _count(shapes, re.escape(f"{p}output_blocks.{first}.1.transformer_blocks.") + r"(\d+)\.")
        up_depths.append(max(depth, 1))
        up_types.append("CrossAttnUpBlock2D" if depth else "UpBlock2D")
    mid_depth = _count(shapes, re.escape(f"{p}middle_block.1.transformer_blocks.") + r"(\d+)\.")

    xattn_key = next(
        (k for k in shapes if k.startswith(p) and k.endswith("attn2.to_k.weight")), None
    )
    if xattn_key is None:
        raise ModelFileError("cannot read the UNet's layout: no cross-attention layers")
    context_dim = int(shapes[xattn_key][1])
    proj_key = next(k for k in shapes if k.startswith(p) and k.endswith(".1.proj_in.weight"))
    linear_proj = len(shapes[proj_key]) == 2

    if kind.family is Family.SD1:
        heads: list[int] | int = 8  # SD1's yaml: num_heads 8 at every level
    else:
        heads = [heads_for(c) for c in channels]  # SD2/SDXL: num_head_channels 64

    cfg: dict[str, Any] = {
        "sample_size": DEFAULT_SIZE[kind.family] // 8,
        "in_channels": int(_shape(shapes, p + "input_blocks.0.0.weight")[1]),
        "out_channels": int(_shape(shapes, p + "out.2.weight")[0]),
        "down_block_types": down_types,
        "up_block_types": up_types,  # both layouts list up blocks from the lowest resolution
        "block_out_channels": channels,
        "layers_per_block": lpb,
        "cross_attention_dim": context_dim,
        "attention_head_dim": heads,
        "use_linear_projection": linear_proj,
        "transformer_layers_per_block": depths,
        "reverse_transformer_layers_per_block": up_depths,
        "upcast_attention": kind.family is Family.SD2,
        "norm_num_groups": 32,
    }
    if mid_depth == 0:
        cfg["mid_block_type"] = "UNetMidBlock2D"
    elif mid_depth != depths[-1]:
        raise ModelFileError("unsupported UNet: the middle block's depth differs from the last level's")
    temb = int(_shape(shapes, p + "time_embed.0.weight")[0])
    if temb != 4 * channels[0]:
        cfg["time_embedding_dim"] = temb
    if kind.family is Family.SDXL:
        pooled = int(_shape(shapes, "conditioner.embedders.1.model.text_projection")[1])
        label_in = int(_shape(shapes, p + "label_emb.0.0.weight")[1])
        if (label_in - pooled) % 6:
            raise ModelFileError("cannot read SDXL's size conditioning width from label_emb")
        cfg.update(
            addition_embed_type="text_time",
            addition_time_embed_dim=(label_in - pooled) // 6,
            projection_class_embeddings_input_dim=label_in,
        )
    return cfg


# ---------------------------------------------------------------- VAE


def vae_config(shapes: Shapes, prefix: str = VAE_PREFIX, family: Family = Family.SD1) -> dict[str, Any]:
    levels = _count(shapes, re.escape(prefix) + r"encoder\.down\.(\d+)\.")
    if levels == 0:
        raise ModelFileError("cannot read the VAE: no encoder levels found")
    channels = [int(_shape(shapes, f"{prefix}encoder.down.{i}.block.0.conv1.weight")[0]) for i in range(levels)]
    lpb = _count(shapes, re.escape(f"{prefix}encoder.down.0.block.") + r"(\d+)\.")
    return {
        "in_channels": int(_shape(shapes, prefix + "encoder.conv_in.weight")[1]),
        "out_channels": int(_shape(shapes, prefix + "decoder.conv_out.weight")[0]),
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": channels,
        "layers_per_block": lpb,
        "latent_channels": int(_shape(shapes, prefix + "post_quant_conv.weight")[0]),
        "norm_num_groups": 32,
        "sample_size": DEFAULT_SIZE[family],
        "scaling_factor": VAE_SCALING[family],
    }


# ---------------------------------------------------------------- text encoders


def clip_config(shapes: Shapes, prefix: str, act: str) -> dict[str, Any]:
    vocab, width = (int(x) for x in _shape(shapes, prefix + "embeddings.token_embedding.weight"))
    layers = _count(shapes, re.escape(prefix + "encoder.layers.") + r"(\d+)\.")
    return {
        "vocab_size": vocab,
        "hidden_size": width,
        "intermediate_size": int(_shape(shapes, prefix + "encoder.layers.0.mlp.fc1.weight")[0]),
        "num_hidden_layers": layers,
        "num_attention_heads": heads_for(width),
        "max_position_embeddings": int(_shape(shapes, prefix + "embeddings.position_embedding.weight")[0]),
        "hidden_act": act,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 1,
    }


def openclip_config(shapes: Shapes, prefix: str, drop_last: bool) -> dict[str, Any]:
    vocab, width = (int(x) for x in _shape(shapes, prefix + "token_embedding.weight"))
    layers = _count(shapes, re.escape(prefix + "transformer.resblocks.") + r"(\d+)\.")
    cfg = {
        "vocab_size": vocab,
        "hidden_size": width,
        "intermediate_size": int(_shape(shapes, prefix + "transformer.resblocks.0.mlp.c_fc.weight")[0]),
        # SD2 feeds the UNet from the penultimate layer, so its last layer is never run.
        "num_hidden_layers": layers - 1 if drop_last else layers,
        "num_attention_heads": heads_for(width),
        "max_position_embeddings": int(_shape(shapes, prefix + "positional_embedding")[0]),
        "hidden_act": "gelu",
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 0,
    }
    if prefix + "text_projection" in shapes:
        cfg["projection_dim"] = int(shapes[prefix + "text_projection"][1])
    return cfg


def infer_architecture(shapes: Shapes, kind: ModelKind) -> Architecture:
    """Configs of every component of an A1111 checkpoint."""
    if kind.family is Family.SD1:
        tes = {"text_encoder": clip_config(shapes, "cond_stage_model.transformer.text_model.", "quick_gelu")}
    elif kind.family is Family.SD2:
        tes = {"text_encoder": openclip_config(shapes, "cond_stage_model.model.", drop_last=True)}
    else:
        tes = {
            "text_encoder": clip_config(shapes, "conditioner.embedders.0.transformer.text_model.", "quick_gelu"),
            "text_encoder_2": openclip_config(shapes, "conditioner.embedders.1.model.", drop_last=False),
        }
    return Architecture(kind, unet_config(shapes, kind), vae_config(shapes, VAE_PREFIX, kind.family), tes)
