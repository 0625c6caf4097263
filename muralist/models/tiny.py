"""Tiny random-weight models in the real SD1.x, SD2.x and SDXL architectures and A1111's key layout.

They exist because nothing may be downloaded here: the tests, the benchmarks and a newcomer's
first run (``muralist models make-tiny``) use them. They go through exactly the production code
path: diffusers components -> ``export_a1111`` -> a ``.safetensors``/``.ckpt`` file -> the loader.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .family import Family
from .loader import export_a1111

# Block layouts follow the real models (level count, block types, linear vs conv projections,
# SDXL's attention-free first level and deeper transformers); only widths and depths shrink.
_UNET: dict[Family, dict[str, Any]] = {
    Family.SD1: dict(
        block_out_channels=(32, 32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        layers_per_block=2,
        cross_attention_dim=32,
        attention_head_dim=8,
    ),
    Family.SD2: dict(
        block_out_channels=(32, 32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        layers_per_block=2,
        cross_attention_dim=32,
        attention_head_dim=[4, 4, 1, 1],  # heads of 64 channels where the width allows, as SD2
        use_linear_projection=True,
        upcast_attention=True,
    ),
    Family.SDXL: dict(
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=2,
        transformer_layers_per_block=[1, 1, 2],
        cross_attention_dim=32 + 64,
        attention_head_dim=[4, 1, 1],
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8,
    ),
}
_VAE = dict(
    block_out_channels=(32, 32, 64, 64),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=32,
)


def _clip(width: int, layers: int, act: str, projection: int | None = None) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from .arch import heads_for

    cfg = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=width,
        intermediate_size=width * 4,
        num_hidden_layers=layers,
        num_attention_heads=heads_for(width),
        max_position_embeddings=77,
        hidden_act=act,
        bos_token_id=49406,
        eos_token_id=49407,
        **({"projection_dim": projection} if projection else {}),
    )
    return CLIPTextModelWithProjection(cfg) if projection else CLIPTextModel(cfg)


def tiny_components(family: Family, inpainting: bool = False, seed: int = 0) -> dict[str, Any]:
    """Random diffusers components of a tiny model of ``family`` (deterministic for a seed)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(seed)
    unet_cfg = dict(_UNET[family], sample_size=8, in_channels=9 if inpainting else 4, out_channels=4, norm_num_groups=32)
    comps: dict[str, Any] = {"unet": UNet2DConditionModel(**unet_cfg), "vae": AutoencoderKL(**_VAE)}
    if family is Family.SD1:
        comps["text_encoder"] = _clip(32, 2, "quick_gelu")
    elif family is Family.SD2:
        # A1111's SD2 files hold the whole OpenCLIP stack; the last layer is never run (penultimate).
        comps["text_encoder"] = _clip(32, 3, "gelu")
    else:
        comps["text_encoder"] = _clip(32, 2, "quick_gelu")
        comps["text_encoder_2"] = _clip(64, 2, "gelu", projection=32)
    return comps


def tiny_checkpoint(family: Family, inpainting: bool = False, seed: int = 0) -> dict[str, torch.Tensor]:
    """A tiny model as an A1111 single-file state dict."""
    sd = export_a1111(tiny_components(family, inpainting, seed), family)
    return {k: v.detach().contiguous().clone() for k, v in sd.items()}


def tiny_vae(seed: int = 1) -> dict[str, torch.Tensor]:
    """A standalone tiny VAE in A1111's layout (no ``first_stage_model.`` prefix, like real VAE files)."""
    sd = tiny_checkpoint(Family.SD1, seed=seed)
    prefix = "first_stage_model."
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


def save(sd: dict[str, torch.Tensor], path: Path) -> Path:
    """Write as ``.safetensors`` or as a plain-tensor ``.ckpt`` (``{"state_dict": ...}``, A1111's layout)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(path))
    else:
        torch.save({"state_dict": sd}, path)
    return path


TINY_SET = {
    "tiny-sd15.safetensors": (Family.SD1, False, 0),
    "tiny-sd15-b.ckpt": (Family.SD1, False, 7),
    "tiny-sd15-inpainting.safetensors": (Family.SD1, True, 0),
    "tiny-sd21.safetensors": (Family.SD2, False, 0),
    "tiny-sdxl.safetensors": (Family.SDXL, False, 0),
}


def tiny_controlnet(family: Family, seed: int = 0) -> dict[str, torch.Tensor]:
    """A tiny ControlNet for the tiny ``family`` model, in the layout real files of that family use:
    the original (LDM, ``control_model.*``) one for SD1/SD2, diffusers' for SDXL."""
    from diffusers import ControlNetModel

    from ..controlnet.models import controlnet_config, export_ldm

    unet = tiny_components(family)["unet"]
    torch.manual_seed(seed)
    model = ControlNetModel(**controlnet_config(unet.config, {}))
    # Trained ControlNets' zero convolutions are no longer zero, and their hint encoder is strong;
    # random ones of that kind make the control (and the control image) visible in tiny images.
    for name, p in model.named_parameters():
        if name.startswith(("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding")):
            p.data.normal_(0.0, 0.1)
    sd = model.state_dict() if family is Family.SDXL else export_ldm(model)
    return {k: v.detach().contiguous().clone() for k, v in sd.items()}


TINY_CONTROLNETS = {
    "tiny-control-sd15.safetensors": (Family.SD1, 0),
    "tiny-control-sd15-b.pth": (Family.SD1, 3),
    "tiny-control-sdxl.safetensors": (Family.SDXL, 0),
}


def make_tiny_models(ckpt_dir: Path, vae_dir: Path, controlnet_dir: Path | None = None) -> list[Path]:
    """Write the tiny model set into A1111's ``models/Stable-diffusion``, ``models/VAE`` and
    (when given) ``models/ControlNet`` folders."""
    written = []
    for name, (family, inpainting, seed) in TINY_SET.items():
        written.append(save(tiny_checkpoint(family, inpainting, seed), ckpt_dir / name))
    written.append(save(tiny_vae(), vae_dir / "tiny-vae.safetensors"))
    if controlnet_dir is not None:
        for name, (family, seed) in TINY_CONTROLNETS.items():
            sd = tiny_controlnet(family, seed)
            path = controlnet_dir / name
            if path.suffix == ".pth":  # the original ControlNet 1.1 files: a plain pickled state dict
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.save(sd, path)
                written.append(path)
            else:
                written.append(save(sd, path))
    return written
