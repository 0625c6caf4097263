"""Conditioning checked against A1111's rules computed by hand with the bare CLIP text encoders.

A1111 v1.10 (sd_hijack_clip.py, sd_emphasis.py, prompt_parser.py, sd_samplers_cfg_denoiser.py):
- all schedule texts of one prompt go through the text encoder in one batch, chunk index by chunk
  index; a text with fewer chunks gets empty chunks ([BOS] + [EOS] * 76);
- "Original" emphasis multiplies each token's vector by its weight, then scales the whole batch
  tensor of that chunk index so that its mean is the mean before (all texts together);
- AND parts are stacked by repeating a shorter part's last vector; the negative prompt keeps its
  own length unless "Pad prompt/negative prompt" appends empty-prompt chunks to the shorter side;
- SDXL encodes with each text encoder separately and encodes an empty negative prompt as zeros.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch

from muralist.engine.conditioning import PromptEncoder, job_conditioning

PROMPT = "a (red:1.3) [cat:dog:0.5] on a sofa, BREAK watercolor"
LONG = ", ".join(f"word{i} thing" for i in range(30))  # 2 chunks


def _model(engine, name: str):
    return engine.cache.model(engine.registry.find_checkpoint(name))


def _row(tok, pieces: list[tuple[str, float]]) -> tuple[list[int], list[float]]:
    """One 77-token chunk as A1111 builds it: each weighted run tokenized on its own."""
    ids: list[int] = []
    mults: list[float] = []
    for text, weight in pieces:
        t = tok(text, add_special_tokens=False).input_ids
        ids += t
        mults += [weight] * len(t)
    fill = 75 - len(ids)
    # SD1 pads with EOS; SD2/SDXL-G put their own pad token after the first EOS.
    return [tok.bos_token_id, *ids, tok.eos_token_id] + [tok.pad_token_id] * fill, [1.0, *mults, 1.0] + [1.0] * fill


def _hidden(model, component: str, rows: list[list[int]], sdxl: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    enc = model.text_encoders[component]
    with torch.inference_mode():
        out = enc(input_ids=torch.tensor(rows, device=model.device), output_hidden_states=True)
    z = (out.hidden_states[-2] if sdxl else out.last_hidden_state).float()
    pooled = out.text_embeds.float() if component == "text_encoder_2" else None
    return z, pooled


def _original_emphasis(z: torch.Tensor, mults: list[list[float]]) -> torch.Tensor:
    m = torch.tensor(mults, dtype=z.dtype, device=z.device)[..., None]
    before = z.double().mean()  # the whole batch tensor: every text of the schedule together
    weighted = z * m
    return weighted * (before / weighted.double().mean()).float()


@contextlib.contextmanager
def _norm_bias(model, component: str = "text_encoder") -> Iterator[None]:
    """A non-zero final-norm bias, as real CLIP models have: the tiny model's is zero, which makes
    the mean of SD1's (normalized) output ~1e-9 and the mean restoration pure rounding noise."""
    enc = model.text_encoders[component]
    norm = getattr(enc, "text_model", enc).final_layer_norm
    saved = norm.bias.detach().clone()
    with torch.no_grad():
        norm.bias.add_(0.25)
    try:
        yield
    finally:
        with torch.no_grad():
            norm.bias.copy_(saved)


def _by_hand(model, component: str, chunks_per_text: list[list[list[tuple[str, float]]]], sdxl: bool):
    """Per text: (tokens, width) context and the first chunk's pooled output."""
    tok = model.tokenizers[component]
    n = max(len(c) for c in chunks_per_text)
    contexts: list[list[torch.Tensor]] = [[] for _ in chunks_per_text]
    pooled = None
    for i in range(n):
        built = [_row(tok, c[i] if i < len(c) else []) for c in chunks_per_text]
        z, p = _hidden(model, component, [r for r, _ in built], sdxl)
        z = _original_emphasis(z, [m for _, m in built])
        for t, ctx in enumerate(contexts):
            ctx.append(z[t])
        if i == 0:
            pooled = p
    return [torch.cat(c, dim=0) for c in contexts], pooled


def _chunks(animal: str) -> list[list[tuple[str, float]]]:
    return [[("a ", 1.0), ("red", 1.3), (f" {animal} on a sofa,", 1.0)], [("watercolor", 1.0)]]


@pytest.mark.parametrize("name", ["tiny-sd15.safetensors", "tiny-sdxl"])
def test_editing_variants_share_one_emphasis_mean(engine, name: str) -> None:
    model = _model(engine, name)
    sdxl = "sdxl" in name
    with contextlib.nullcontext() if sdxl else _norm_bias(model):
        _check_editing_variants(model, sdxl)


def _check_editing_variants(model, sdxl: bool) -> None:
    components = ["text_encoder", "text_encoder_2"] if sdxl else ["text_encoder"]
    texts = [_chunks("cat"), _chunks("dog")]
    expected, pooled = [], None
    for comp in components:
        ctx, p = _by_hand(model, comp, texts, sdxl)
        expected.append(ctx)
        pooled = p if p is not None else pooled
    want = [torch.cat([e[t] for e in expected], dim=-1) for t in range(2)]

    conds = job_conditioning(PromptEncoder(model), PROMPT, "", 20)
    cat = conds.at(0)[0][0][0]  # steps 0..10 use the text before the switch, then "dog"
    dog = conds.at(19)[0][0][0]
    assert cat.chunks == dog.chunks == 2  # BREAK starts a second chunk
    torch.testing.assert_close(cat.context[0], want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dog.context[0], want[1], atol=1e-5, rtol=1e-5)
    if sdxl:
        torch.testing.assert_close(cat.pooled[0], pooled[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(dog.pooled[0], pooled[1], atol=1e-5, rtol=1e-5)


def test_a_variant_without_weights_is_scaled_with_its_weighted_sibling(engine) -> None:
    # The joint mean is what users see: under editing, "a blue cat" is not the plain "a blue cat".
    model = _model(engine, "tiny-sd15.safetensors")
    with _norm_bias(model):
        enc = PromptEncoder(model)
        blue = job_conditioning(enc, "a [(red:1.5):blue:5] cat", "", 20).at(19)[0][0][0]
        plain = enc.encode("a blue cat")
        (_, want), _ = _by_hand(model, "text_encoder", [[[("a ", 1.0), ("red", 1.5), (" cat", 1.0)]],
                                                        [[("a blue cat", 1.0)]]], sdxl=False)
    torch.testing.assert_close(blue.context[0], want, atol=1e-5, rtol=1e-5)
    assert (blue.context - plain.context).abs().max() > 1e-3


def test_shorter_variant_gets_empty_chunks_and_no_norm_skips_the_mean(engine) -> None:
    model = _model(engine, "tiny-sd15.safetensors")
    enc = PromptEncoder(model)
    conds = job_conditioning(enc, f"[a cat:{LONG}:5]", "", 20)
    short, long = conds.at(0)[0][0][0], conds.at(19)[0][0][0]
    assert short.chunks == long.chunks == 2
    # The padding chunk is an empty chunk encoded in the batch: the empty prompt's vectors.
    torch.testing.assert_close(short.context[:, 77:], enc.empty().context, atol=1e-5, rtol=1e-5)

    tok = model.tokenizers["text_encoder"]
    row, mults = _row(tok, [("a ", 1.0), ("red", 1.3), (" cat", 1.0)])
    z, _ = _hidden(model, "text_encoder", [row], sdxl=False)
    plain = z * torch.tensor(mults)[None, :, None]
    got = PromptEncoder(model, emphasis="No norm").encode("a (red:1.3) cat").context
    torch.testing.assert_close(got, plain, atol=1e-5, rtol=1e-5)
    ignored = PromptEncoder(model, emphasis="Ignore").encode("a (red:1.3) cat").context
    torch.testing.assert_close(ignored, PromptEncoder(model).encode("a red cat").context, atol=1e-5, rtol=1e-5)
    # "None": brackets are text, so the tokens (and the vectors) differ from the parsed prompt.
    literal = PromptEncoder(model, emphasis="None").encode("a (red:1.3) cat").context
    assert not torch.allclose(literal, ignored, atol=1e-4)


def test_emphasis_is_noted_only_when_not_original_and_brackets_are_encoded(engine) -> None:
    model = _model(engine, "tiny-sd15.safetensors")
    assert job_conditioning(PromptEncoder(model), "a (cat)", "", 20).infotext_params() == {}
    nonorm = job_conditioning(PromptEncoder(model, emphasis="No norm"), "a (cat)", "", 20)
    assert nonorm.infotext_params() == {"Emphasis": "No norm"}
    # A1111 looks at the scheduled texts: "[cat:dog:5]" becomes "cat" and "dog", no bracket left.
    assert job_conditioning(PromptEncoder(model, emphasis="No norm"), "a [cat:dog:5]", "", 20).infotext_params() == {}


def test_padding_off_keeps_lengths_and_on_pads_with_the_empty_prompt(engine) -> None:
    model = _model(engine, "tiny-sd15.safetensors")
    enc = PromptEncoder(model)
    off = job_conditioning(enc, LONG, "blurry", 20)
    parts, uncond = off.at(0)
    assert (parts[0][0].tokens, uncond.tokens) == (154, 77)
    assert off.padding is None and off.infotext_params() == {}

    on = job_conditioning(enc, LONG, "blurry", 20, pad_cond_uncond=True)
    parts, uncond = on.at(0)
    assert (parts[0][0].tokens, uncond.tokens) == (154, 154)
    assert uncond.context[:, :77].equal(off.at(0)[1].context)
    torch.testing.assert_close(uncond.context[:, 77:], enc.empty().context)
    assert on.infotext_params() == {"Pad conds": True}
    # The shorter side is padded, whichever it is; equal lengths are not "padded".
    parts, uncond = job_conditioning(enc, "blurry", LONG, 20, pad_cond_uncond=True).at(0)
    assert (parts[0][0].tokens, uncond.tokens) == (154, 154)
    assert job_conditioning(enc, "a cat", "blurry", 20, pad_cond_uncond=True).infotext_params() == {}

    v0 = job_conditioning(enc, LONG, "blurry", 20, pad_cond_uncond_v0=True)
    parts, uncond = v0.at(0)
    assert uncond.tokens == 154 and bool((uncond.context[:, 77:] == uncond.context[:, 76:77]).all())
    assert v0.infotext_params() == {"Pad conds v0": True}
    _, cut = job_conditioning(enc, "blurry", LONG, 20, pad_cond_uncond_v0=True).at(0)
    assert cut.tokens == 77  # v0 cuts a longer negative prompt to the prompt's length


def test_and_parts_repeat_their_last_vector_and_objects_are_stable(engine) -> None:
    model = _model(engine, "tiny-sd15.safetensors")
    conds = job_conditioning(PromptEncoder(model), f"a cat AND {LONG}:0.5", "", 20)
    parts, uncond = conds.at(0)
    (short, w1), (long, w2) = parts
    assert (short.tokens, long.tokens, uncond.tokens, w1, w2) == (154, 154, 77, 1.0, 0.5)
    assert bool((short.context[:, 77:] == short.context[:, 76:77]).all())
    again, uncond2 = conds.at(5)
    assert again[0][0] is short and uncond2 is uncond  # nothing changed: the same objects


def test_sdxl_empty_negative_prompt_is_zeros(engine) -> None:
    model = _model(engine, "tiny-sdxl")
    enc = PromptEncoder(model)
    _, uncond = job_conditioning(enc, "a cat", "", 20).at(0)
    assert not uncond.context.any() and not uncond.pooled.any()
    _, uncond = job_conditioning(enc, "a cat", "blurry", 20).at(0)
    assert uncond.context.abs().sum() > 0 and uncond.pooled.abs().sum() > 0
    # The empty prompt used for padding is a real encoding (a positive prompt), not zeros.
    assert enc.empty().context.abs().sum() > 0
