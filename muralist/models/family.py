"""Model family detection from an A1111 checkpoint's tensor names and shapes.

Works at any model size: only the presence of keys and the UNet's input channels are read, so
a full SD1.5 checkpoint and a tiny test checkpoint are told apart by the same rules.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

from ..errors import ModelFileError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_TE_KEY = "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight"
SD2_TE_KEY = "cond_stage_model.model.token_embedding.weight"
SDXL_TE2_KEY = "conditioner.embedders.1.model.positional_embedding"
SDXL_TE1_KEY = "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight"
UNET_IN_KEY = UNET_PREFIX + "input_blocks.0.0.weight"


class Family(StrEnum):
    SD1 = "sd1"
    SD2 = "sd2"
    SDXL = "sdxl"

    @property
    def label(self) -> str:
        return {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL"}[self.value]


@dataclass(frozen=True)
class ModelKind:
    family: Family
    inpainting: bool = False  # 9 UNet input channels: latent + mask + masked-image latent

    @property
    def label(self) -> str:
        return self.family.label + (" inpainting" if self.inpainting else "")


def detect_kind(shapes: Mapping[str, Sequence[int]]) -> ModelKind:
    """The family of an A1111-layout checkpoint, from its key -> shape map.

    Raises ModelFileError when the file is not an SD1/SD2/SDXL checkpoint (a LoRA, a VAE...).
    """
    if UNET_IN_KEY not in shapes:
        if any(k.startswith(("lora_", "lora_unet", "lora_te")) for k in shapes):
            raise ModelFileError("this is a LoRA, not a checkpoint: put it in models/Lora")
        if any(k.startswith(("encoder.", "decoder.", VAE_PREFIX)) for k in shapes) and not any(
            k.startswith(UNET_PREFIX) for k in shapes
        ):
            raise ModelFileError("this is a VAE, not a checkpoint: put it in models/VAE")
        raise ModelFileError(
            "not a Stable Diffusion checkpoint we can read: no UNet found under 'model.diffusion_model.'"
        )
    in_channels = int(shapes[UNET_IN_KEY][1])
    if in_channels not in (4, 9):
        raise ModelFileError(f"unsupported UNet with {in_channels} input channels (expected 4, or 9 for inpainting)")
    inpainting = in_channels == 9
    if SDXL_TE2_KEY in shapes:
        if SDXL_TE1_KEY not in shapes:
            raise ModelFileError("SDXL refiner checkpoints (one OpenCLIP text encoder) are not supported yet")
        return ModelKind(Family.SDXL, inpainting)
    if SD2_TE_KEY in shapes:
        return ModelKind(Family.SD2, inpainting)
    if SD1_TE_KEY in shapes:
        return ModelKind(Family.SD1, inpainting)
    raise ModelFileError("checkpoint has a UNet but no text encoder we recognise (SD1.x, SD2.x or SDXL)")
