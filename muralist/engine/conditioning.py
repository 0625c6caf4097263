"""Text conditioning: prompts -> the context tensors (and SDXL's pooled vector) the UNet reads.

Which hidden layer feeds the UNet follows A1111 per family: SD1 uses the last layer, or with
clip skip N the N-th from last followed by the final layer norm; SD2 uses the penultimate layer
(its checkpoint's last layer is not even built) with the final norm; SDXL uses both encoders'
penultimate layers without the norm, concatenated, plus the second encoder's pooled projection.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.family import Family
from ..models.loader import LoadedModel


@dataclass
class Conditioning:
    context: torch.Tensor  # (batch, tokens, width)
    pooled: torch.Tensor | None = None  # SDXL only: (batch, projection width)

    def repeat(self, n: int) -> Conditioning:
        pooled = self.pooled.repeat(n, 1) if self.pooled is not None else None
        return Conditioning(self.context.repeat(n, 1, 1), pooled)


def _tokens(tokenizer, prompts: list[str], device: torch.device) -> torch.Tensor:
    ids = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    return ids.to(device)


def _hidden(encoder, ids: torch.Tensor, layer_from_end: int, final_norm: bool) -> torch.Tensor:
    out = encoder(input_ids=ids, output_hidden_states=True)
    if layer_from_end == 1:
        return out.last_hidden_state if final_norm else out.hidden_states[-1]
    z = out.hidden_states[-layer_from_end]
    if final_norm:
        body = getattr(encoder, "text_model", encoder)
        z = body.final_layer_norm(z)
    return z


@torch.inference_mode()
def encode_prompts(model: LoadedModel, prompts: list[str], clip_skip: int = 1) -> Conditioning:
    """Encode one prompt per image. Prompts longer than 75 tokens are cut (chunking comes with issue 3)."""
    dev = model.device
    if model.family is Family.SD1:
        ids = _tokens(model.tokenizers["text_encoder"], prompts, dev)
        return Conditioning(_hidden(model.text_encoders["text_encoder"], ids, max(1, clip_skip), True))
    if model.family is Family.SD2:
        # A1111 ignores clip skip for SD2: it always uses the penultimate layer.
        ids = _tokens(model.tokenizers["text_encoder"], prompts, dev)
        return Conditioning(_hidden(model.text_encoders["text_encoder"], ids, 1, True))
    ids1 = _tokens(model.tokenizers["text_encoder"], prompts, dev)
    ids2 = _tokens(model.tokenizers["text_encoder_2"], prompts, dev)
    z1 = _hidden(model.text_encoders["text_encoder"], ids1, 2, False)
    out2 = model.text_encoders["text_encoder_2"](input_ids=ids2, output_hidden_states=True)
    z2 = out2.hidden_states[-2]
    return Conditioning(torch.cat([z1, z2.to(z1.dtype)], dim=-1), out2.text_embeds)
