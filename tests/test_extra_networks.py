"""LoRA, textual-inversion embeddings and styles, applied per job, checked on pixels and infotext."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from muralist.infotext import parse_infotext
from muralist.request import GenerationRequest
from tests.conftest import link_file, pixels

# Targets in both kohya namings (diffusers-style for the UNet, HF CLIP for the text encoder) and
# the A1111 checkpoint keys of the same weights, for the hand-merged reference.
UNET_LORA = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
UNET_A1111 = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
TE_LORA = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
TE_A1111 = "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
RANK, ALPHA = 4, 2.0


def make_lora(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key in (UNET_LORA, TE_LORA):
        out[f"{key}.lora_down.weight"] = torch.randn(RANK, 32, generator=g) * 0.5
        out[f"{key}.lora_up.weight"] = torch.randn(32, RANK, generator=g) * 0.5
        out[f"{key}.alpha"] = torch.tensor(ALPHA)
    return out


@pytest.fixture(scope="module")
def data(a1111_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("extra")
    ckpt = root / "models" / "Stable-diffusion"
    ckpt.mkdir(parents=True)
    base = a1111_models / "models" / "Stable-diffusion" / "tiny-sd15.safetensors"
    link_file(base, ckpt / "base.safetensors")
    lora = make_lora(1)
    (root / "models" / "Lora").mkdir(parents=True)
    save_file(lora, str(root / "models" / "Lora" / "inkstyle.safetensors"))
    save_file(make_lora(2), str(root / "models" / "Lora" / "other.safetensors"))
    # The same LoRA merged by hand at weight 0.7: W + w * (alpha / rank) * up @ down.
    sd = load_file(str(base))
    for lora_key, a1111_key in ((UNET_LORA, UNET_A1111), (TE_LORA, TE_A1111)):
        delta = lora[f"{lora_key}.lora_up.weight"] @ lora[f"{lora_key}.lora_down.weight"]
        sd[a1111_key] = sd[a1111_key] + 0.7 * (ALPHA / RANK) * delta
    save_file(sd, str(ckpt / "merged.safetensors"))
    emb = root / "embeddings"
    emb.mkdir()
    torch.save({"string_to_param": {"*": torch.randn(2, 32, generator=torch.Generator().manual_seed(5)) * 3}}, emb / "glowy.pt")
    (root / "styles.csv").write_text('name,prompt,negative_prompt\nnoir,"{prompt}, film noir, high contrast","color"\n', encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def eng(data: Path):
    from muralist.engine.engine import Engine, ModelCache
    from muralist.paths import DataDirs

    return Engine(DataDirs.from_options(data), cache=ModelCache(max_models=2, device="cpu"))


def gen(eng, tmp_path: Path, prompt: str, **kw):
    base = dict(prompt=prompt, width=64, height=64, steps=5, seed=7, model="base")
    base.update(kw)
    return eng.generate(GenerationRequest(**base), save_to=tmp_path)


def test_lora_weight_zero_is_the_base_model(eng, tmp_path: Path) -> None:
    base = pixels(gen(eng, tmp_path, "a cat").result.images[0])
    zero = gen(eng, tmp_path, "a cat <lora:inkstyle:0>")
    assert np.array_equal(base, pixels(zero.result.images[0]))


def test_lora_equals_hand_merged_weights(eng, tmp_path: Path) -> None:
    with_lora = pixels(gen(eng, tmp_path, "a cat <lora:inkstyle:0.7>").result.images[0])
    merged = pixels(gen(eng, tmp_path, "a cat", model="merged").result.images[0])
    base = pixels(gen(eng, tmp_path, "a cat").result.images[0])
    assert np.abs(with_lora - merged).max() <= 1
    assert not np.array_equal(with_lora, base)


def test_a_job_without_lora_after_one_with_lora_is_the_base_output(eng, tmp_path: Path) -> None:
    before = pixels(gen(eng, tmp_path, "a cat").result.images[0])
    gen(eng, tmp_path, "a cat <lora:inkstyle:1> <lora:other:0.5>")
    after = pixels(gen(eng, tmp_path, "a cat").result.images[0])
    assert np.array_equal(before, after)


def test_te_and_unet_weights_apply_separately(eng, tmp_path: Path) -> None:
    both = pixels(gen(eng, tmp_path, "a cat <lora:inkstyle:1>").result.images[0])
    te_only = pixels(gen(eng, tmp_path, "a cat <lora:inkstyle:1:0>").result.images[0])
    unet_only = pixels(gen(eng, tmp_path, "a cat <lora:inkstyle:0:1>").result.images[0])
    assert len({both.tobytes(), te_only.tobytes(), unet_only.tobytes()}) == 3


def test_lora_hashes_in_infotext(eng, tmp_path: Path) -> None:
    saved = gen(eng, tmp_path, "a cat <lora:inkstyle:0.7>")
    params = parse_infotext(saved.result.infotexts[0])
    info = eng.loras.find("inkstyle")
    assert params["Lora hashes"] == f"inkstyle: {info.shorthash}"
    assert params["Prompt"] == "a cat <lora:inkstyle:0.7>"  # A1111 keeps the tag in the prompt


def test_unknown_lora_is_a_warning_with_close_names(eng, tmp_path: Path) -> None:
    saved = gen(eng, tmp_path, "a cat <lora:inkstyl:1>")
    assert any("inkstyl" in w and "inkstyle" in w for w in saved.result.warnings)
    base = pixels(gen(eng, tmp_path, "a cat").result.images[0])
    assert np.array_equal(base, pixels(saved.result.images[0]))


def test_embedding_changes_the_image_and_is_named_in_infotext(eng, tmp_path: Path) -> None:
    plain = gen(eng, tmp_path, "a cat, painting")
    with_emb = gen(eng, tmp_path, "a cat, glowy")
    without = gen(eng, tmp_path, "a cat, glowyy")  # not the embedding's name
    assert not np.array_equal(pixels(plain.result.images[0]), pixels(with_emb.result.images[0]))
    params = parse_infotext(with_emb.result.infotexts[0])
    emb = eng.embeddings.all()["glowy"]
    assert params["TI hashes"] == f"glowy: {emb.shorthash}"
    assert "TI hashes" not in parse_infotext(without.result.infotexts[0])


def test_style_is_applied_by_name(eng, tmp_path: Path) -> None:
    styled = gen(eng, tmp_path, "a cat", styles=["noir"])
    params = parse_infotext(styled.result.infotexts[0])
    assert params["Prompt"] == "a cat, film noir, high contrast"
    assert params["Negative prompt"] == "color"
    by_hand = gen(eng, tmp_path, "a cat, film noir, high contrast", negative_prompt="color")
    assert np.array_equal(pixels(styled.result.images[0]), pixels(by_hand.result.images[0]))


def test_unknown_style_names_the_choices(eng, tmp_path: Path) -> None:
    from muralist.errors import NotFoundError

    with pytest.raises(NotFoundError, match="noir"):
        gen(eng, tmp_path, "a cat", styles=["nior"])


def test_sdxl_embedding_uses_both_encoders_and_sd1_embeddings_are_skipped(a1111_models: Path, tmp_path: Path) -> None:
    from safetensors.torch import save_file as save

    from muralist.engine.engine import Engine, ModelCache, embedding_widths
    from muralist.paths import DataDirs

    root = tmp_path / "xl"
    (root / "models" / "Stable-diffusion").mkdir(parents=True)
    link_file(a1111_models / "models" / "Stable-diffusion" / "tiny-sdxl.safetensors", root / "models" / "Stable-diffusion")
    (root / "embeddings").mkdir()
    g = torch.Generator().manual_seed(3)
    save({"clip_l": torch.randn(1, 32, generator=g) * 3, "clip_g": torch.randn(1, 64, generator=g) * 3}, str(root / "embeddings" / "xlglow.safetensors"))
    torch.save({"string_to_param": {"*": torch.randn(1, 32)}}, root / "embeddings" / "sd1only.pt")
    eng = Engine(DataDirs.from_options(root), cache=ModelCache(device="cpu"))
    model = eng.cache.model(eng.registry.find_checkpoint("tiny-sdxl"))
    loaded, skipped = eng.embeddings.for_model(embedding_widths(model))
    assert set(loaded) == {"xlglow"} and "sd1only" in skipped
    a = gen(eng, tmp_path, "a cat, painting", model="tiny-sdxl")
    b = gen(eng, tmp_path, "a cat, xlglow", model="tiny-sdxl")
    assert not np.array_equal(pixels(a.result.images[0]), pixels(b.result.images[0]))
    assert parse_infotext(b.result.infotexts[0])["TI hashes"].startswith("xlglow: ")
