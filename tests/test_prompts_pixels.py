"""A1111 prompt semantics checked on pixels of tiny real-architecture models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from muralist.engine.conditioning import PromptEncoder, chunk_prompt, job_conditioning, token_count
from muralist.models.tokenizer import clip_tokenizer
from muralist.request import GenerationRequest
from tests.conftest import pixels

LONG = ", ".join(f"word{i} thing" for i in range(40))  # ~190 tokens: 3 chunks


def image(engine, tmp_path: Path, prompt: str, model: str = "tiny-sd15.safetensors", **kw) -> np.ndarray:
    base = dict(prompt=prompt, width=64, height=64, steps=6, seed=99, model=model, cfg_scale=7.0)
    base.update(kw)
    return pixels(engine.generate(GenerationRequest(**base), save_to=tmp_path).result.images[0])


def differ(a: np.ndarray, b: np.ndarray) -> bool:
    # Generation is deterministic, so identical conditioning gives identical pixels; tiny random
    # models react weakly to text, so any difference shows the conditioning changed.
    return not np.array_equal(a, b)


@pytest.mark.parametrize("model", ["tiny-sd15.safetensors", "tiny-sd21", "tiny-sdxl"])
def test_weight_one_is_plain_text_and_emphasis_changes_the_image(engine, tmp_path: Path, model: str) -> None:
    plain = image(engine, tmp_path, "a cat on a sofa", model)
    assert np.array_equal(plain, image(engine, tmp_path, "a (cat:1.0) on a sofa", model))
    assert differ(plain, image(engine, tmp_path, "a (cat:1.5) on a sofa", model))
    assert differ(plain, image(engine, tmp_path, "a [cat] on a sofa", model))


def test_prompt_editing_differs_from_both_prompts(engine, tmp_path: Path) -> None:
    cat = image(engine, tmp_path, "a photo of a cat")
    dog = image(engine, tmp_path, "a photo of a dog")
    edit = image(engine, tmp_path, "a photo of a [cat:dog:0.5]")
    assert differ(edit, cat) and differ(edit, dog)
    # At step fraction 0 the edit is "dog" from the start, i.e. the same as "dog".
    assert np.array_equal(image(engine, tmp_path, "a photo of a [cat:dog:0]"), dog)


def test_alternation_differs_from_each_option(engine, tmp_path: Path) -> None:
    alt = image(engine, tmp_path, "a photo of a [cat|dog]")
    assert differ(alt, image(engine, tmp_path, "a photo of a cat"))
    assert differ(alt, image(engine, tmp_path, "a photo of a dog"))


@pytest.mark.parametrize("model", ["tiny-sd15.safetensors", "tiny-sdxl"])
def test_the_tail_of_a_long_prompt_is_used(engine, tmp_path: Path, model: str) -> None:
    assert token_count(LONG + ", red")[0] > 100
    a = image(engine, tmp_path, LONG + ", red hat", model)
    b = image(engine, tmp_path, LONG + ", blue shoes", model)
    assert differ(a, b)


def test_break_changes_the_image(engine, tmp_path: Path) -> None:
    assert differ(image(engine, tmp_path, "a cat BREAK a dog"), image(engine, tmp_path, "a cat a dog"))


def test_and_composes_prompts_with_weights(engine, tmp_path: Path) -> None:
    cat = image(engine, tmp_path, "a cat")
    both = image(engine, tmp_path, "a cat AND a dog")
    assert differ(cat, both)
    assert differ(both, image(engine, tmp_path, "a cat AND a dog:0.3"))
    # One sub-prompt with weight 1 is the plain prompt.
    assert np.array_equal(cat, image(engine, tmp_path, "a cat AND a cat:0"))


def test_chunking_rules() -> None:
    tok = clip_tokenizer()
    chunks, n = chunk_prompt(LONG, tok, None, lambda e: 1)
    assert len(chunks) == 3 and n == 150 + len(chunks[-1].tokens)
    assert sum(len(c.tokens) for c in chunks) == len(tok(LONG, add_special_tokens=False).input_ids)  # none dropped
    # Comma backtracking: a chunk filling up within 20 tokens of a comma moves the words after it.
    chunks, n = chunk_prompt("a " * 70 + ", " + "b " * 10, tok, None, lambda e: 1)
    assert [len(c.tokens) for c in chunks] == [71, 10] and chunks[0].tokens[-1] == 267
    assert n == 85
    # Without a recent comma the chunk is simply cut at 75.
    chunks, _ = chunk_prompt("a " * 80, tok, None, lambda e: 1)
    assert [len(c.tokens) for c in chunks] == [75, 5]
    chunks, _ = chunk_prompt("a BREAK b", tok, None, lambda e: 1)
    assert [len(c.tokens) for c in chunks] == [1, 1]
    chunks, _ = chunk_prompt("(a:1.5) b", tok, None, lambda e: 1)
    assert chunks[0].multipliers == [1.5, 1.0]


@pytest.mark.parametrize(
    "prompt,expected",
    [("", (0, 75)), ("a photo of a cat", (5, 75)), ("<lora:x:1> a cat", (2, 75)), (LONG, None)],
)
def test_token_counter(prompt: str, expected: tuple[int, int] | None) -> None:
    used, limit = token_count(prompt)
    if expected:
        assert (used, limit) == expected
    else:
        assert 150 < used <= 225 and limit == 225


def test_conditioning_changes_only_where_the_schedule_changes(engine) -> None:
    info = engine.registry.find_checkpoint("tiny-sd15.safetensors")
    model = engine.cache.model(info)
    enc = PromptEncoder(model)
    conds = job_conditioning(enc, "a [cat:dog:10] [red|blue]", "", 20)
    # Alternation changes every step (A1111 uses the first option at step indexes 0 and 1).
    assert conds.change_steps(20) == set(range(2, 20))
    conds = job_conditioning(enc, "a [cat:dog:10] in [a:b:0.75]", "[x::5]", 20)
    assert conds.change_steps(20) == {6, 11, 16}
    # The 300-token prompt has 4+ chunks; the short negative keeps its one chunk (A1111's default)
    # unless "Pad prompt/negative prompt" is on.
    long300 = ", ".join(["masterpiece best quality"] * 60)
    parts, uncond = job_conditioning(enc, long300, "blurry", 20).at(0)
    assert parts[0][0].chunks >= 4 and uncond.chunks == 1
    parts, uncond = job_conditioning(enc, long300, "blurry", 20, pad_cond_uncond=True).at(0)
    assert parts[0][0].context.shape == uncond.context.shape


def test_novelai_braces_only_when_enabled(engine, tmp_path: Path) -> None:
    plain = image(engine, tmp_path, "a {cat} on a sofa")
    assert np.array_equal(plain, image(engine, tmp_path, "a {cat} on a sofa", novelai_braces=False))
    assert differ(plain, image(engine, tmp_path, "a {cat} on a sofa", novelai_braces=True))
