"""The A1111 <-> diffusers converter and the loader's architecture inference."""

from __future__ import annotations

import pytest
import torch

from muralist.models.arch import infer_architecture
from muralist.models.family import Family, ModelKind, detect_kind
from muralist.models.loader import components_from_a1111, export_a1111, text_encoder_tensors
from muralist.models.tiny import tiny_components

CASES = [(Family.SD1, False), (Family.SD1, True), (Family.SD2, False), (Family.SDXL, False)]


def _tensors(comps: dict) -> dict[str, torch.Tensor]:
    out = {}
    for name, m in comps.items():
        sd = text_encoder_tensors(m) if name.startswith("text_encoder") else m.state_dict()
        out.update({f"{name}/{k}": v for k, v in sd.items()})
    return out


@pytest.mark.parametrize("family,inpainting", CASES)
def test_round_trip_is_bit_exact(family: Family, inpainting: bool) -> None:
    comps = tiny_components(family, inpainting, seed=3)
    sd = export_a1111(comps, family)
    assert detect_kind({k: v.shape for k, v in sd.items()}) == ModelKind(family, inpainting)
    _, loaded = components_from_a1111(sd)
    sd2 = export_a1111(loaded, family)
    if family is Family.SD2:
        # A1111's SD2 files hold OpenCLIP's last layer, which SD2 never runs: it is not loaded.
        dropped = {k for k in sd if ".resblocks.2." in k}
        assert dropped and set(sd) - set(sd2) == dropped
    else:
        assert set(sd) == set(sd2)
    for k, v in sd2.items():
        assert torch.equal(v, sd[k]), k
    orig, back = _tensors(comps), _tensors(loaded)
    for k, v in back.items():
        assert torch.equal(v, orig[k]), k


@pytest.mark.parametrize("family,inpainting", CASES)
def test_loaded_model_computes_like_the_original(family: Family, inpainting: bool) -> None:
    comps = tiny_components(family, inpainting, seed=4)
    _, loaded = components_from_a1111(export_a1111(comps, family))
    torch.manual_seed(0)
    x = torch.randn(1, comps["unet"].config.in_channels, 8, 8)
    ctx = torch.randn(1, 77, comps["unet"].config.cross_attention_dim)
    added = None
    if family is Family.SDXL:
        added = {"text_embeds": torch.randn(1, 32), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    with torch.inference_mode():
        a = comps["unet"](x, 10, encoder_hidden_states=ctx, added_cond_kwargs=added).sample
        b = loaded["unet"](x, 10, encoder_hidden_states=ctx, added_cond_kwargs=added).sample
        ids = torch.tensor([[49406, 320, 2368, 49407]])
        ta = comps["text_encoder"](input_ids=ids).last_hidden_state
        tb = loaded["text_encoder"](input_ids=ids).last_hidden_state
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    if family is not Family.SD2:  # SD2 deliberately builds one layer fewer (penultimate)
        torch.testing.assert_close(ta, tb, rtol=0, atol=0)


# Full-size configs of the real models (diffusers' published configs), built on the meta device:
# their A1111 names must be the real checkpoints' names, and the architecture read back from the
# shapes must be the real one.
SD15_UNET = dict(
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768, attention_head_dim=8
)
SDXL_UNET = dict(
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    layers_per_block=2,
    transformer_layers_per_block=[1, 2, 10],
    cross_attention_dim=2048,
    attention_head_dim=[5, 10, 20],
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
VAE = dict(
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    latent_channels=4,
)


def _meta_full_size(family: Family) -> dict:
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    clip_l = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, hidden_act="quick_gelu")
    with init_empty_weights():
        if family is Family.SD1:
            return {"unet": UNet2DConditionModel(**SD15_UNET), "vae": AutoencoderKL(**VAE), "text_encoder": CLIPTextModel(clip_l)}
        big_g = CLIPTextConfig(
            hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20, hidden_act="gelu", projection_dim=1280
        )
        return {
            "unet": UNet2DConditionModel(**SDXL_UNET),
            "vae": AutoencoderKL(**VAE),
            "text_encoder": CLIPTextModel(clip_l),
            "text_encoder_2": CLIPTextModelWithProjection(big_g),
        }


def test_full_size_sd15_layout_and_inference() -> None:
    sd = export_a1111(_meta_full_size(Family.SD1), Family.SD1)
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    # Names and shapes as in the released v1-5-pruned checkpoint.
    assert shapes["model.diffusion_model.input_blocks.1.1.proj_in.weight"] == (320, 320, 1, 1)
    assert shapes["model.diffusion_model.output_blocks.2.1.conv.weight"] == (1280, 1280, 3, 3)
    assert shapes["model.diffusion_model.output_blocks.5.2.conv.weight"] == (1280, 1280, 3, 3)
    assert shapes["model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight"] == (1280, 768)
    assert shapes["first_stage_model.decoder.up.3.upsample.conv.weight"] == (512, 512, 3, 3)
    assert shapes["first_stage_model.encoder.mid.attn_1.q.weight"] == (512, 512, 1, 1)
    assert "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight" in shapes
    assert len([k for k in shapes if k.startswith("model.diffusion_model.")]) == 686
    arch = infer_architecture(shapes, detect_kind(shapes))
    assert arch.unet["block_out_channels"] == [320, 640, 1280, 1280]
    assert arch.unet["layers_per_block"] == 2 and arch.unet["cross_attention_dim"] == 768
    assert arch.unet["attention_head_dim"] == 8 and not arch.unet["use_linear_projection"]
    assert arch.vae["block_out_channels"] == [128, 256, 512, 512] and arch.vae["scaling_factor"] == 0.18215
    te = arch.text_encoders["text_encoder"]
    assert (te["hidden_size"], te["num_hidden_layers"], te["num_attention_heads"]) == (768, 12, 12)


def test_full_size_sdxl_layout_and_inference() -> None:
    sd = export_a1111(_meta_full_size(Family.SDXL), Family.SDXL)
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    assert shapes["model.diffusion_model.label_emb.0.0.weight"] == (1280, 2816)
    assert shapes["model.diffusion_model.input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight"] == (1280, 2048)
    assert shapes["conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight"] == (3840, 1280)
    assert shapes["conditioner.embedders.1.model.text_projection"] == (1280, 1280)
    assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in shapes
    arch = infer_architecture(shapes, detect_kind(shapes))
    assert arch.kind == ModelKind(Family.SDXL)
    assert arch.unet["block_out_channels"] == [320, 640, 1280]
    assert arch.unet["transformer_layers_per_block"] == [1, 2, 10]
    assert arch.unet["down_block_types"][0] == "DownBlock2D"
    assert arch.unet["attention_head_dim"] == [5, 10, 20]
    assert arch.unet["addition_time_embed_dim"] == 256 and arch.unet["cross_attention_dim"] == 2048
    assert arch.vae["scaling_factor"] == 0.13025
    g = arch.text_encoders["text_encoder_2"]
    assert (g["hidden_size"], g["num_hidden_layers"], g["num_attention_heads"], g["projection_dim"]) == (1280, 32, 20, 1280)
