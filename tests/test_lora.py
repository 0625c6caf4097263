"""LoRA listing, parsing and merging, on tiny models and random LoRAs with kohya's real key names."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from muralist.errors import ModelFileError, MuralistError
from muralist.models import files, hashing
from muralist.models.family import Family
from muralist.models.loader import LoadedModel, load_checkpoint
from muralist.models.tiny import save, tiny_checkpoint
from muralist.networks.lora import PARSE_CACHE, LoraInfo, LoraRegistry, applied_loras, parse_lora
from muralist.paths import DataDirs

RANK, ALPHA = 4, 3.0  # alpha != rank: scale 0.75
SCALE = ALPHA / RANK

# (kohya layer name, component, module path in the diffusers/transformers component)
SD1_DIFFUSERS = [
    (
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
        "unet",
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    ),
    (
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k",
        "unet",
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
    ),
    ("lora_unet_down_blocks_0_resnets_0_conv1", "unet", "down_blocks.0.resnets.0.conv1"),
    ("lora_unet_up_blocks_0_upsamplers_0_conv", "unet", "up_blocks.0.upsamplers.0.conv"),
    ("lora_unet_mid_block_attentions_0_proj_in", "unet", "mid_block.attentions.0.proj_in"),
    (
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
        "text_encoder",
        "encoder.layers.0.self_attn.q_proj",
    ),
    ("lora_te_text_model_encoder_layers_1_mlp_fc1", "text_encoder", "encoder.layers.1.mlp.fc1"),
]
SD1_LDM = [
    (
        "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q",
        "unet",
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    ),
    ("lora_unet_input_blocks_1_0_in_layers_2", "unet", "down_blocks.0.resnets.0.conv1"),
    ("lora_unet_output_blocks_2_1_conv", "unet", "up_blocks.0.upsamplers.0.conv"),
    ("lora_unet_output_blocks_3_0_skip_connection", "unet", "up_blocks.1.resnets.0.conv_shortcut"),
    (
        "lora_te_text_model_encoder_layers_0_self_attn_v_proj",
        "text_encoder",
        "encoder.layers.0.self_attn.v_proj",
    ),
]
SDXL_LDM = [
    (
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
        "unet",
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
    ),
    (
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k",
        "unet",
        "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
    ),
    ("lora_unet_input_blocks_1_0_in_layers_2", "unet", "down_blocks.0.resnets.0.conv1"),
    (
        "lora_unet_middle_block_1_transformer_blocks_1_ff_net_0_proj",
        "unet",
        "mid_block.attentions.0.transformer_blocks.1.ff.net.0.proj",
    ),
    ("lora_unet_output_blocks_2_2_conv", "unet", "up_blocks.0.upsamplers.0.conv"),
    (
        "lora_te1_text_model_encoder_layers_1_self_attn_out_proj",
        "text_encoder",
        "encoder.layers.1.self_attn.out_proj",
    ),
    ("lora_te2_text_model_encoder_layers_0_mlp_fc1", "text_encoder_2", "text_model.encoder.layers.0.mlp.fc1"),
]
SDXL_DIFFUSERS = [
    (
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_v",
        "unet",
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_v",
    ),
    ("lora_unet_down_blocks_0_resnets_1_conv2", "unet", "down_blocks.0.resnets.1.conv2"),
    (
        "lora_te1_text_model_encoder_layers_0_self_attn_k_proj",
        "text_encoder",
        "encoder.layers.0.self_attn.k_proj",
    ),
    (
        "lora_te2_text_model_encoder_layers_1_self_attn_q_proj",
        "text_encoder_2",
        "text_model.encoder.layers.1.self_attn.q_proj",
    ),
]


# ---------------------------------------------------------------- fixtures and helpers


def _load(tmp_path_factory: pytest.TempPathFactory, family: Family, inpainting: bool = False) -> LoadedModel:
    path = tmp_path_factory.mktemp("ckpt") / f"{family.value}{'-inp' if inpainting else ''}.safetensors"
    save(tiny_checkpoint(family, inpainting), path)
    return load_checkpoint(path, device="cpu")


@pytest.fixture(scope="module")
def sd1(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    return _load(tmp_path_factory, Family.SD1)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    return _load(tmp_path_factory, Family.SDXL)


@pytest.fixture(autouse=True)
def _fresh_parse_cache():
    PARSE_CACHE.clear()
    yield
    PARSE_CACHE.clear()


def module_of(model: LoadedModel, component: str, path: str) -> torch.nn.Module:
    root = model.unet if component == "unet" else model.text_encoders[component]
    return root.get_submodule(path)


def snapshot(model: LoadedModel) -> dict[str, torch.Tensor]:
    out = {}
    for comp, mod in [("unet", model.unet), *model.text_encoders.items()]:
        for name, p in mod.named_parameters():
            out[f"{comp}.{name}"] = p.detach().clone()
    return out


def assert_same(model: LoadedModel, before: dict[str, torch.Tensor]) -> None:
    after = snapshot(model)
    assert after.keys() == before.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"not restored: {changed[:5]}"


def rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.1


def lora_factors(weight: torch.Tensor, seed: int, rank: int = RANK) -> tuple[torch.Tensor, torch.Tensor]:
    """kohya's LoRA/LoCon factors for a Linear (out, in) or Conv2d (out, in, kh, kw) weight."""
    if weight.ndim == 2:
        return rand(weight.shape[0], rank, seed=seed), rand(rank, weight.shape[1], seed=seed + 1)
    out, cin, kh, kw = weight.shape
    return rand(out, rank, 1, 1, seed=seed), rand(rank, cin, kh, kw, seed=seed + 1)


def expected_delta(up: torch.Tensor, down: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)


def write_lora(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> LoraInfo:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    meta = metadata or {}
    return LoraInfo(
        name=path.stem, path=path, alias=meta.get("ss_output_name", path.stem), shorthash="", metadata=meta
    )


def make_lora(model: LoadedModel, spec: list[tuple[str, str, str]], seed: int = 0) -> tuple[dict, dict]:
    """Random LoRA tensors for ``spec`` and, per spec entry, its (up, down) factors."""
    tensors, factors = {}, {}
    for i, (key, comp, path) in enumerate(spec):
        up, down = lora_factors(module_of(model, comp, path).weight, seed + 10 * i)
        tensors[f"{key}.lora_up.weight"] = up
        tensors[f"{key}.lora_down.weight"] = down
        tensors[f"{key}.alpha"] = torch.tensor(ALPHA)
        factors[key] = (up, down)
    return tensors, factors


# ---------------------------------------------------------------- LoRA / LoCon math


@pytest.mark.parametrize(
    "family, spec",
    [
        (Family.SD1, SD1_DIFFUSERS),
        (Family.SD1, SD1_LDM),
        (Family.SDXL, SDXL_LDM),
        (Family.SDXL, SDXL_DIFFUSERS),
    ],
    ids=["sd1-diffusers-names", "sd1-ldm-names", "sdxl-ldm-names", "sdxl-diffusers-names"],
)
def test_merge_matches_formula_and_restores(request, tmp_path: Path, family: Family, spec) -> None:
    model = request.getfixturevalue("sd1" if family is Family.SD1 else "sdxl")
    tensors, factors = make_lora(model, spec)
    info = write_lora(tmp_path / "l.safetensors", tensors)
    before = snapshot(model)
    te_mult, unet_mult = 0.6, 0.8
    with applied_loras(model, [(info, te_mult, unet_mult)]):
        for key, comp, path in spec:
            w = module_of(model, comp, path).weight
            base = before[f"{comp}.{path}.weight"]
            up, down = factors[key]
            mult = unet_mult if comp == "unet" else te_mult
            torch.testing.assert_close(w, base + mult * SCALE * expected_delta(up, down, base))
        # Layers the LoRA does not name are untouched.
        now = snapshot(model)
        touched = {f"{comp}.{path}.weight" for _, comp, path in spec}
        assert all(torch.equal(now[k], before[k]) for k in before if k not in touched)
    assert_same(model, before)


def test_zero_multiplier_touches_nothing(sd1: LoadedModel, tmp_path: Path) -> None:
    tensors, _ = make_lora(sd1, SD1_DIFFUSERS)
    info = write_lora(tmp_path / "l.safetensors", tensors)
    before = snapshot(sd1)
    with applied_loras(sd1, [(info, 0.0, 0.0)]):
        assert_same(sd1, before)


def test_te_and_unet_multipliers_apply_separately(sd1: LoadedModel, tmp_path: Path) -> None:
    tensors, factors = make_lora(sd1, SD1_DIFFUSERS)
    info = write_lora(tmp_path / "l.safetensors", tensors)
    before = snapshot(sd1)
    te_key, te_comp, te_path = SD1_DIFFUSERS[-1]
    un_key, un_comp, un_path = SD1_DIFFUSERS[0]
    with applied_loras(sd1, [(info, 0.5, 0.0)]):
        base = before[f"text_encoder.{te_path}.weight"]
        torch.testing.assert_close(
            module_of(sd1, te_comp, te_path).weight,
            base + 0.5 * SCALE * expected_delta(*factors[te_key], base),
        )
        now = snapshot(sd1)
        assert all(torch.equal(now[k], before[k]) for k in before if k.startswith("unet."))
    with applied_loras(sd1, [(info, 0.0, -1.5)]):
        base = before[f"unet.{un_path}.weight"]
        torch.testing.assert_close(
            module_of(sd1, un_comp, un_path).weight,
            base - 1.5 * SCALE * expected_delta(*factors[un_key], base),
        )
        now = snapshot(sd1)
        assert all(torch.equal(now[k], before[k]) for k in before if k.startswith("text_encoder."))
    assert_same(sd1, before)


def test_two_loras_on_one_layer_add_up(sd1: LoadedModel, tmp_path: Path) -> None:
    a, fa = make_lora(sd1, SD1_DIFFUSERS[:1], seed=1)
    b, fb = make_lora(sd1, SD1_DIFFUSERS[:1], seed=2)
    ia, ib = write_lora(tmp_path / "a.safetensors", a), write_lora(tmp_path / "b.safetensors", b)
    key, comp, path = SD1_DIFFUSERS[0]
    base = module_of(sd1, comp, path).weight.detach().clone()
    with applied_loras(sd1, [(ia, 1.0, 0.7), (ib, 1.0, 0.3)]):
        want = (
            base + 0.7 * SCALE * expected_delta(*fa[key], base) + 0.3 * SCALE * expected_delta(*fb[key], base)
        )
        torch.testing.assert_close(module_of(sd1, comp, path).weight, want)
    assert torch.equal(module_of(sd1, comp, path).weight, base)


def test_no_alpha_means_scale_one(sd1: LoadedModel, tmp_path: Path) -> None:
    tensors, factors = make_lora(sd1, SD1_DIFFUSERS[:1])
    tensors = {k: v for k, v in tensors.items() if not k.endswith(".alpha")}
    info = write_lora(tmp_path / "l.safetensors", tensors)
    key, comp, path = SD1_DIFFUSERS[0]
    base = module_of(sd1, comp, path).weight.detach().clone()
    with applied_loras(sd1, [(info, 1.0, 1.0)]):
        torch.testing.assert_close(
            module_of(sd1, comp, path).weight, base + expected_delta(*factors[key], base)
        )


def test_restored_after_exception(sd1: LoadedModel, tmp_path: Path) -> None:
    tensors, _ = make_lora(sd1, SD1_DIFFUSERS)
    info = write_lora(tmp_path / "l.safetensors", tensors)
    before = snapshot(sd1)
    with pytest.raises(RuntimeError, match="boom"):
        with applied_loras(sd1, [(info, 1.0, 1.0)]):
            raise RuntimeError("boom")
    assert_same(sd1, before)


def test_unet_output_equals_hand_merged_model(sd1: LoadedModel, tmp_path: Path, tmp_path_factory) -> None:
    tensors, factors = make_lora(sd1, SD1_DIFFUSERS, seed=5)
    info = write_lora(tmp_path / "l.safetensors", tensors)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g)
    ctx = torch.randn(1, 77, 32, generator=g)

    def run(unet) -> torch.Tensor:
        with torch.no_grad():
            return unet(x, 10, encoder_hidden_states=ctx).sample

    base = run(sd1.unet)
    with applied_loras(sd1, [(info, 1.0, 0.9)]):
        merged = run(sd1.unet)
    assert not torch.allclose(merged, base)
    assert torch.equal(run(sd1.unet), base)  # the next job sees the base model, bit for bit

    other = _load(tmp_path_factory, Family.SD1)
    with torch.no_grad():
        for key, comp, path in SD1_DIFFUSERS:
            if comp == "unet":
                w = module_of(other, comp, path).weight
                w += 0.9 * SCALE * expected_delta(*factors[key], w)
    torch.testing.assert_close(run(other.unet), merged)


def test_inpainting_conv_in_is_zero_padded(tmp_path: Path, tmp_path_factory) -> None:
    model = _load(tmp_path_factory, Family.SD1, inpainting=True)
    w = model.unet.conv_in.weight  # (32, 9, 3, 3)
    up, down = rand(w.shape[0], RANK, 1, 1, seed=1), rand(RANK, 4, 3, 3, seed=2)  # trained on 4 channels
    info = write_lora(tmp_path / "l.safetensors", {
        "lora_unet_conv_in.lora_up.weight": up, "lora_unet_conv_in.lora_down.weight": down, "lora_unet_conv_in.alpha": torch.tensor(ALPHA),
    })  # fmt: skip
    base = w.detach().clone()
    with applied_loras(model, [(info, 1.0, 1.0)]):
        delta = (up.flatten(1) @ down.flatten(1)).reshape(w.shape[0], 4, 3, 3)
        torch.testing.assert_close(model.unet.conv_in.weight[:, :4], base[:, :4] + SCALE * delta)
        assert torch.equal(model.unet.conv_in.weight[:, 4:], base[:, 4:])
    assert torch.equal(model.unet.conv_in.weight, base)


# ---------------------------------------------------------------- LyCORIS types


def _apply_one(
    model: LoadedModel, tmp_path: Path, key: str, tensors: dict[str, torch.Tensor], mult: float = 1.0
):
    info = write_lora(tmp_path / "n.safetensors", {f"{key}.{k}": v for k, v in tensors.items()})
    return applied_loras(model, [(info, mult, mult)])


def test_locon_tucker_mid(sd1: LoadedModel, tmp_path: Path) -> None:
    conv = sd1.unet.get_submodule("down_blocks.0.resnets.0.conv1")
    out, cin, kh, kw = conv.weight.shape
    up, down, mid = (
        rand(out, RANK, 1, 1, seed=1),
        rand(RANK, cin, 1, 1, seed=2),
        rand(RANK, RANK, kh, kw, seed=3),
    )
    base = conv.weight.detach().clone()
    with _apply_one(sd1, tmp_path, "lora_unet_down_blocks_0_resnets_0_conv1", {
        "lora_up.weight": up, "lora_down.weight": down, "lora_mid.weight": mid, "alpha": torch.tensor(ALPHA),
    }):  # fmt: skip
        delta = torch.einsum("nmkl,in,mj->ijkl", mid, up.flatten(1), down.flatten(1))
        torch.testing.assert_close(conv.weight, base + SCALE * delta)
    assert torch.equal(conv.weight, base)


def test_loha_matches_formula(sd1: LoadedModel, tmp_path: Path) -> None:
    lin = sd1.unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2")
    out, cin = lin.weight.shape
    w1a, w1b, w2a, w2b = (
        rand(out, RANK, seed=1),
        rand(RANK, cin, seed=2),
        rand(out, RANK, seed=3),
        rand(RANK, cin, seed=4),
    )
    base = lin.weight.detach().clone()
    with _apply_one(sd1, tmp_path, "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_2", {
        "hada_w1_a": w1a, "hada_w1_b": w1b, "hada_w2_a": w2a, "hada_w2_b": w2b, "alpha": torch.tensor(ALPHA),
    }, mult=0.7):  # fmt: skip
        torch.testing.assert_close(lin.weight, base + 0.7 * SCALE * ((w1a @ w1b) * (w2a @ w2b)))
    assert torch.equal(lin.weight, base)


def test_loha_conv_with_tucker(sd1: LoadedModel, tmp_path: Path) -> None:
    conv = sd1.unet.get_submodule("down_blocks.0.resnets.1.conv2")
    out, cin, kh, kw = conv.weight.shape
    t1, t2 = rand(RANK, RANK, kh, kw, seed=1), rand(RANK, RANK, kh, kw, seed=2)
    w1a, w1b, w2a, w2b = (
        rand(RANK, out, seed=3),
        rand(RANK, cin, seed=4),
        rand(RANK, out, seed=5),
        rand(RANK, cin, seed=6),
    )
    base = conv.weight.detach().clone()

    def cp(t, wa, wb):  # (out, in, kh, kw) = sum_ij t[i,j] wa[i,:] (x) wb[j,:]
        return torch.einsum("ijkl,io,jc->ockl", t, wa, wb)

    with _apply_one(sd1, tmp_path, "lora_unet_down_blocks_0_resnets_1_conv2", {
        "hada_t1": t1, "hada_t2": t2, "hada_w1_a": w1a, "hada_w1_b": w1b, "hada_w2_a": w2a, "hada_w2_b": w2b,
        "alpha": torch.tensor(ALPHA),
    }):  # fmt: skip
        torch.testing.assert_close(conv.weight, base + SCALE * cp(t1, w1a, w1b) * cp(t2, w2a, w2b))
    assert torch.equal(conv.weight, base)


def test_lokr_matches_formula(sd1: LoadedModel, tmp_path: Path) -> None:
    lin = sd1.text_encoders["text_encoder"].get_submodule("encoder.layers.0.mlp.fc1")  # (128, 32)
    w1 = rand(4, 2, seed=1)
    w2a, w2b = rand(32, 2, seed=2), rand(2, 16, seed=3)  # rank 2, alpha 3 -> scale 1.5
    base = lin.weight.detach().clone()
    with _apply_one(sd1, tmp_path, "lora_te_text_model_encoder_layers_0_mlp_fc1", {
        "lokr_w1": w1, "lokr_w2_a": w2a, "lokr_w2_b": w2b, "alpha": torch.tensor(3.0),
    }):  # fmt: skip
        torch.testing.assert_close(lin.weight, base + 1.5 * torch.kron(w1, w2a @ w2b))
    assert torch.equal(lin.weight, base)


def test_lokr_full_factors_ignore_alpha_and_conv(sd1: LoadedModel, tmp_path: Path) -> None:
    conv = sd1.unet.get_submodule("down_blocks.0.resnets.0.conv2")  # (32, 32, 3, 3)
    w1, w2 = rand(4, 8, seed=1), rand(8, 4, 3, 3, seed=2)
    base = conv.weight.detach().clone()
    # Both factors full: A1111 has no rank to divide alpha by, so the scale is 1.
    with _apply_one(sd1, tmp_path, "lora_unet_down_blocks_0_resnets_0_conv2", {
        "lokr_w1": w1, "lokr_w2": w2, "alpha": torch.tensor(ALPHA),
    }):  # fmt: skip
        torch.testing.assert_close(conv.weight, base + torch.kron(w1[:, :, None, None], w2))
    assert torch.equal(conv.weight, base)


def test_full_diff_with_bias(sd1: LoadedModel, tmp_path: Path) -> None:
    lin = sd1.unet.get_submodule("time_embedding.linear_1")
    diff, diff_b = rand(*lin.weight.shape, seed=1), rand(*lin.bias.shape, seed=2)
    wb, bb = lin.weight.detach().clone(), lin.bias.detach().clone()
    with _apply_one(
        sd1, tmp_path, "lora_unet_time_embedding_linear_1", {"diff": diff, "diff_b": diff_b}, mult=0.5
    ):
        torch.testing.assert_close(lin.weight, wb + 0.5 * diff)
        torch.testing.assert_close(lin.bias, bb + 0.5 * diff_b)
    assert torch.equal(lin.weight, wb) and torch.equal(lin.bias, bb)


# ---------------------------------------------------------------- refusals


def test_sdxl_lora_on_sd1_does_not_fit(sd1: LoadedModel, sdxl: LoadedModel, tmp_path: Path) -> None:
    tensors, _ = make_lora(sdxl, SDXL_LDM)
    info = write_lora(tmp_path / "xl_style.safetensors", tensors)
    before = snapshot(sd1)
    with pytest.raises(MuralistError, match=r"LoRA 'xl_style' does not fit this model \(SD1\.x model.*SDXL"):
        with applied_loras(sd1, [(info, 1.0, 1.0)]):
            pass
    assert_same(sd1, before)

    # UNet-only, no metadata: judged by the layers themselves (none has a matching shape).
    unet_only = {k: v for k, v in tensors.items() if k.startswith("lora_unet_")}
    info = write_lora(tmp_path / "xl_unet.safetensors", unet_only)
    with pytest.raises(MuralistError, match=r"LoRA 'xl_unet' does not fit this model \(SD1\.x model"):
        with applied_loras(sd1, [(info, 1.0, 1.0)]):
            pass
    assert_same(sd1, before)

    # kohya's metadata says what it was trained on.
    sd1_tensors, _ = make_lora(sd1, SD1_DIFFUSERS)
    info = write_lora(
        tmp_path / "claims_xl.safetensors", sd1_tensors, {"ss_base_model_version": "sdxl_base_v1-0"}
    )
    with pytest.raises(MuralistError, match="does not fit.*the LoRA is for SDXL"):
        with applied_loras(sd1, [(info, 1.0, 1.0)]):
            pass
    assert_same(sd1, before)


def test_partly_fitting_lora_applies_what_fits(sd1: LoadedModel, tmp_path: Path, caplog) -> None:
    tensors, factors = make_lora(sd1, SD1_DIFFUSERS[:1])
    tensors["lora_unet_down_blocks_9_resnets_0_conv1.lora_up.weight"] = rand(8, RANK, seed=1)
    tensors["lora_unet_down_blocks_9_resnets_0_conv1.lora_down.weight"] = rand(RANK, 8, seed=2)
    info = write_lora(tmp_path / "partial.safetensors", tensors)
    key, comp, path = SD1_DIFFUSERS[0]
    base = module_of(sd1, comp, path).weight.detach().clone()
    with caplog.at_level(logging.WARNING), applied_loras(sd1, [(info, 1.0, 1.0)]):
        torch.testing.assert_close(
            module_of(sd1, comp, path).weight, base + SCALE * expected_delta(*factors[key], base)
        )
    assert "1 of 2 layers do not fit" in caplog.text


@pytest.mark.parametrize(
    "extra, label",
    [
        ({"dora_scale": torch.ones(32, 1)}, "DoRA"),
        ({"oft_blocks": torch.ones(4, 8, 8)}, "OFT"),
    ],
)
def test_unsupported_type_is_named(sd1: LoadedModel, tmp_path: Path, extra, label) -> None:
    tensors, _ = make_lora(sd1, SD1_DIFFUSERS[:1])
    key = SD1_DIFFUSERS[0][0]
    if label == "OFT":
        tensors = {f"{key}.alpha": torch.tensor(ALPHA)}
    tensors.update({f"{key}.{k}": v for k, v in extra.items()})
    info = write_lora(tmp_path / "weird_net.safetensors", tensors)
    with pytest.raises(ModelFileError, match=rf"weird_net\.safetensors: unsupported network type {label}"):
        with applied_loras(sd1, [(info, 1.0, 1.0)]):
            pass


def test_unknown_tensor_set_is_refused(tmp_path: Path) -> None:
    info = write_lora(tmp_path / "odd.safetensors", {"lora_unet_conv_in.something": torch.ones(2)})
    with pytest.raises(ModelFileError, match=r"odd\.safetensors: unsupported network type.*something"):
        parse_lora(info.path)


def test_non_kohya_keys_are_refused(tmp_path: Path) -> None:
    info = write_lora(tmp_path / "peft.safetensors", {"unet.conv_in.lora_A.weight": torch.ones(2, 2)})
    with pytest.raises(ModelFileError, match="not a kohya-format LoRA"):
        parse_lora(info.path)


def test_malformed_factors_are_refused(tmp_path: Path) -> None:
    info = write_lora(tmp_path / "bad.safetensors", {
        "lora_unet_conv_in.lora_up.weight": torch.ones(8, 4), "lora_unet_conv_in.lora_down.weight": torch.ones(3, 8),
    })  # fmt: skip
    with pytest.raises(ModelFileError, match="malformed LoRA layer lora_unet_conv_in"):
        parse_lora(info.path)


# ---------------------------------------------------------------- parse cache


def test_parsed_files_are_cached_by_mtime_and_size(sd1: LoadedModel, tmp_path: Path, monkeypatch) -> None:
    tensors, _ = make_lora(sd1, SD1_DIFFUSERS[:2])
    info = write_lora(tmp_path / "l.safetensors", tensors)
    reads = []
    real = files.load_state_dict
    monkeypatch.setattr(files, "load_state_dict", lambda p: reads.append(p) or real(p))
    for _ in range(3):
        with applied_loras(sd1, [(info, 1.0, 1.0)]):
            pass
    assert len(reads) == 1
    st = info.path.stat()
    os.utime(info.path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    with applied_loras(sd1, [(info, 1.0, 1.0)]):
        pass
    assert len(reads) == 2


# ---------------------------------------------------------------- registry


def test_registry_names_aliases_hashes(tmp_path: Path) -> None:
    dirs = DataDirs.from_options(data_dir=tmp_path / "data")
    dirs.ensure()
    t = {
        "lora_unet_conv_in.lora_up.weight": torch.ones(4, 2),
        "lora_unet_conv_in.lora_down.weight": torch.ones(2, 4),
    }
    a = write_lora(dirs.lora_dir / "style_a.safetensors", t, {"ss_output_name": "StyleAlpha"}).path
    b = write_lora(dirs.lora_dir / "sub" / "Char-B.safetensors", {k: v * 2 for k, v in t.items()}).path
    c = dirs.lora_dir / "old.pt"
    torch.save(t, c)
    (dirs.lora_dir / "notes.txt").write_text("not a model")
    (dirs.lora_dir / "broken.safetensors").write_bytes(b"\x05\x00")

    reg = LoraRegistry(dirs)
    assert [i.name for i in reg.all()] == ["Char-B", "old", "style_a"]
    assert [p.name for p, _ in reg.skipped()] == ["broken.safetensors"]
    info = reg.find("style_a")
    assert info is not None and info.alias == "StyleAlpha" and info.path == a
    assert info.metadata == {"ss_output_name": "StyleAlpha"}
    assert reg.find("StyleAlpha") is info
    assert reg.find("STYLE_A") is info and reg.find("stylealpha") is info
    assert reg.find("char-b").path == b and reg.find("char-b").alias == "Char-B"
    assert reg.find("nope") is None
    assert "style_a" in reg.suggest("styl_a")
    assert "StyleAlpha" in reg.suggest("stylealfa")

    # A1111's "Lora hashes": addnet hash for .safetensors (metadata not hashed), sha256[:12] otherwise.
    assert info.shorthash == hashing.addnet_hash_safetensors(a) and len(info.shorthash) == 12
    assert reg.find("old").shorthash == hashing.sha256_file(c)[:12]
    assert reg.find("Char-B").shorthash != info.shorthash
    write_lora(tmp_path / "same.safetensors", t, {"ss_output_name": "other"})
    assert hashing.addnet_hash_safetensors(tmp_path / "same.safetensors") == info.shorthash
    assert reg.find_by_hash(info.shorthash) is info

    write_lora(dirs.lora_dir / "new_one.safetensors", t)
    assert reg.find("new_one") is None
    reg.refresh()
    assert reg.find("new_one") is not None
    assert reg.find("style_a") is info  # unchanged files are not reread
