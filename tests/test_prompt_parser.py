"""Prompt syntax must read exactly as AUTOMATIC1111 reads it.

Expected values were worked out from A1111's rules (modules/prompt_parser.py,
modules/extra_networks.py, modules/styles.py) and cross-checked against A1111's own parser.
Weights are compared exactly: equal weights are merged by exact comparison, so the order of
float multiplications is part of the behaviour.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from muralist.errors import MuralistError, NotFoundError
from muralist.prompts.parser import (
    ExtraNetwork,
    extract_extra_networks,
    lora_multipliers,
    parse_attention,
    prompt_schedule,
    schedules_for_prompts,
    split_and,
)
from muralist.prompts.styles import Style, apply_styles, find_style, load_styles

R = 1.1  # (x)
S = 1 / 1.1  # [x]: A1111 multiplies by this reciprocal
C = 1.05  # {x} with NovelAI braces

# --------------------------------------------------------------------------------------------
# Emphasis
# --------------------------------------------------------------------------------------------

ATTENTION_CASES = [
    ("plain", "normal text", [("normal text", 1.0)]),
    ("empty", "", [("", 1.0)]),
    ("only-brackets", "()", [("", 1.0)]),
    ("round", "an (important) word", [("an ", 1.0), ("important", R), (" word", 1.0)]),
    ("double-round", "((x))", [("x", R * R)]),
    ("explicit", "(x:1.5)", [("x", 1.5)]),
    ("explicit-small", "(x:0.25)", [("x", 0.25)]),
    ("explicit-spaces", "( x : 1.5 )", [(" x ", 1.5)]),
    ("explicit-negative", "(x:-1)", [("x", -1.0)]),
    ("square", "[x]", [("x", S)]),
    ("double-square", "[[x]]", [("x", S * S)]),
    ("explicit-in-round", "((x:1.5))", [("x", 1.5 * R)]),
    ("explicit-in-square", "[(x:1.5)]", [("x", 1.5 * S)]),
    ("nested-mixed", "(a [b] c:2)", [("a ", 2.0), ("b", S * 2.0), (" c", 2.0)]),
    (
        "a1111-docstring",
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            ("a ", 1.0),
            ("house", 1.5730000000000004),
            (" ", 1.1),
            ("on", 1.0),
            (" a ", 1.1),
            ("hill", 0.55),
            (", sun, ", 1.1),
            ("sky", 1.4641000000000006),
            (".", 1.1),
        ],
    ),
    ("merge-equal-runs", "(unnecessary)(parens)", [("unnecessaryparens", R)]),
    ("merge-weight-one", "a (b:1) c", [("a b c", 1.0)]),
    ("escape-paren-open", r"\(x", [("(x", 1.0)]),
    ("escape-paren-close", r"x\)", [("x)", 1.0)]),
    ("escape-square", r"\[literal\]", [("[literal]", 1.0)]),
    ("escape-mixed", r"\(literal\]", [("(literal]", 1.0)]),
    ("escape-backslash", r"a\\b", [("a\\b", 1.0)]),
    ("escape-inside-emphasis", r"(\(x\))", [("(x)", R)]),
    ("lone-backslash-dropped", r"a\b", [("ab", 1.0)]),
    ("unclosed-round", "(unbalanced", [("unbalanced", R)]),
    ("unclosed-square", "[a", [("a", S)]),
    ("stray-round-closer", "a)", [("a)", 1.0)]),
    ("stray-square-closer", "a]", [("a]", 1.0)]),
    ("unclosed-round-then-square", "(a [b", [("a ", R), ("b", R * S)]),
    ("wrong-closer", "(a]", [("a]", R)]),
    ("colon-is-text", "a:b", [("a:b", 1.0)]),
    ("weight-without-opener", "a:1.5)", [("a:1.5)", 1.0)]),
    ("word-weight-is-text", "(x:abc)", [("x:abc", R)]),
    ("empty-weight-is-text", "(x:)", [("x:", R)]),
    ("break", "a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("break-newlines", "a\nBREAK\nb", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("break-alone", "BREAK", [("", 1.0), ("BREAK", -1.0), ("", 1.0)]),
    ("break-twice", "a BREAK BREAK b", [("a", 1.0), ("BREAK", -1.0), ("", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("break-in-word", "BREAKfast aBREAK", [("BREAKfast aBREAK", 1.0)]),
    ("break-lowercase", "a break b", [("a break b", 1.0)]),
    # Inside brackets BREAK is multiplied like any run, so it is no longer a break (A1111 quirk).
    ("break-in-emphasis", "(a BREAK b)", [("a", R), ("BREAK", -1.0 * R), ("b", R)]),
    ("braces-off", "{x}", [("{x}", 1.0)]),
]


@pytest.mark.parametrize(
    ("text", "expected"), [c[1:] for c in ATTENTION_CASES], ids=[c[0] for c in ATTENTION_CASES]
)
def test_parse_attention(text: str, expected: list[tuple[str, float]]) -> None:
    assert parse_attention(text) == expected


NOVELAI_CASES = [
    ("braces", "{x}", [("x", C)]),
    ("double-braces", "{{x}}", [("x", C * C)]),
    ("escaped-braces", r"\{x\}", [("{x}", 1.0)]),
    ("unclosed-brace", "a {x", [("a ", 1.0), ("x", C)]),
    ("stray-brace-closer", "x}", [("x}", 1.0)]),
    ("braces-in-round", "(a {b})", [("a ", R), ("b", C * R)]),
]


@pytest.mark.parametrize(
    ("text", "expected"), [c[1:] for c in NOVELAI_CASES], ids=[c[0] for c in NOVELAI_CASES]
)
def test_parse_attention_novelai_braces(text: str, expected: list[tuple[str, float]]) -> None:
    assert parse_attention(text, novelai_braces=True) == expected


@pytest.mark.parametrize("text", ["(x:1.2.3)", "(x:.)", "(a:1..5)"])
def test_unconvertible_weight_is_an_error(text: str) -> None:
    with pytest.raises(MuralistError, match="emphasis weight"):
        parse_attention(text)


# --------------------------------------------------------------------------------------------
# Prompt editing and alternation
# --------------------------------------------------------------------------------------------


def _alternating(steps: int, *options: str) -> list[tuple[int, str]]:
    return [(s, options[(s - 1) % len(options)]) for s in range(1, steps + 1)]


SCHEDULE_CASES = [
    ("plain", "test", 10, [(10, "test")]),
    ("empty", "", 5, [(5, "")]),
    ("edit-absolute", "[a:b:10]", 20, [(10, "a"), (20, "b")]),
    ("edit-fraction", "[a:b:0.25]", 20, [(5, "a"), (20, "b")]),
    ("edit-leading-dot", "a [b:.5] c", 10, [(5, "a  c"), (10, "a b c")]),
    ("add-after", "[a:10]", 20, [(10, ""), (20, "a")]),
    ("add-after-in-text", "a [b:3]", 10, [(3, "a "), (10, "a b")]),
    ("remove-after", "[a::10]", 20, [(10, "a"), (20, "")]),
    ("spaces-around-number", "[a:b: 5 ]", 20, [(5, "a"), (20, "b")]),
    ("newlines-around-number", "[a:b:\n5\n]", 20, [(5, "a"), (20, "b")]),
    ("spaces-kept-in-text", "a [b : c : 1] d", 10, [(1, "a b  d"), (10, "a  c  d")]),
    ("nested-in-after", "a[b:[c:d:2]:1]e", 10, [(1, "abe"), (2, "ace"), (10, "ade")]),
    # Every number counts as a boundary, even in a branch that is never shown.
    ("nested-in-hidden-branch", "[a:[b:c:5]:10]", 20, [(5, "a"), (10, "a"), (20, "c")]),
    ("nested-in-before", "[[a:b:5]:c:10]", 20, [(5, "a"), (10, "b"), (20, "c")]),
    ("emphasis-inside-edit", "[(a:2):3]", 10, [(3, ""), (10, "(a:2)")]),
    ("square-emphasis-inside-edit", "a [[[b]]:2]", 10, [(2, "a "), (10, "a [[b]]")]),
    ("edit-inside-emphasis", "((x [a:b:5]:1.3))", 10, [(5, "((x a:1.3))"), (10, "((x b:1.3))")]),
    ("fraction-truncated", "[a:b:0.29]", 100, [(28, "a"), (100, "b")]),
    ("fraction-one-is-all-steps", "[a:b:1.0]", 20, [(20, "a")]),
    ("fraction-above-one-clamped", "[a:b:3.5]", 2, [(2, "a")]),
    ("absolute-clamped", "[a:b:25]", 20, [(20, "a")]),
    ("step-zero", "[a:b:0]", 20, [(20, "b")]),
    ("negative-step", "[a:b:-3]", 20, [(20, "b")]),
    ("exponent-is-absolute", "[a:b:1e1]", 20, [(10, "a"), (20, "b")]),
    ("alternate-two", "[a|b]", 4, _alternating(4, "a", "b")),
    ("alternate-three", "[a|b|c]", 6, _alternating(6, "a", "b", "c")),
    ("alternate-empty-option", "[a|]", 4, _alternating(4, "a", "")),
    ("alternate-empty-options", "[fe|||]male", 10, _alternating(10, "female", "male", "male", "male")),
    ("alternate-emphasis", "[a|(b:1.1)]", 4, _alternating(4, "a", "(b:1.1)")),
    # The inner alternation sees the same step, so it always shows its second option here.
    ("alternate-nested", "[a|[b|c]]", 4, _alternating(4, "a", "c")),
    ("alternate-with-edit", "[a:b:0.5] [c|d]", 4, [(1, "a c"), (2, "a d"), (3, "b c"), (4, "b d")]),
    ("escaped-pipe-is-text", "a\\|b [c:2]", 4, [(2, "a\\|b "), (4, "a\\|b c")]),
    ("stray-brackets-around", "((a][:b:c [d:3]", 10, [(3, "((a][:b:c "), (10, "((a][:b:c d")]),
    ("emphasis-two-colons-is-text", "(a:b:c)[d:2]", 5, [(2, "(a:b:c)"), (5, "(a:b:c)d")]),
    # Unparseable prompts are used verbatim for every step, editing elsewhere included.
    ("unbalanced", "a [unbalanced", 10, [(10, "a [unbalanced")]),
    ("pipe-outside-alternation", "(a|b) [c:2]", 4, [(4, "(a|b) [c:2]")]),
    ("pipe-and-colon", "a [{b|d{:.5] c", 10, [(10, "a [{b|d{:.5] c")]),
    ("three-colons", "[a:b:c:3]", 5, [(5, "[a:b:c:3]")]),
    ("not-a-number", "[a:b:5 5]", 20, [(20, "[a:b:5 5]")]),
    ("trailing-backslash", "[a:b:2] x\\", 4, [(4, "[a:b:2] x\\")]),
]


@pytest.mark.parametrize(
    ("prompt", "steps", "expected"), [c[1:] for c in SCHEDULE_CASES], ids=[c[0] for c in SCHEDULE_CASES]
)
def test_prompt_schedule(prompt: str, steps: int, expected: list[tuple[int, str]]) -> None:
    assert prompt_schedule(prompt, steps) == expected


def test_schedule_output_keeps_emphasis_for_attention() -> None:
    (_, first), (_, second) = prompt_schedule("[(cat:1.5):(dog:0.5):3]", 10)
    assert parse_attention(first) == [("cat", 1.5)]
    assert parse_attention(second) == [("dog", 0.5)]


def test_schedules_for_prompts() -> None:
    assert schedules_for_prompts(["a", "[a:b:2]", "a"], 4) == [
        [(4, "a")],
        [(2, "a"), (4, "b")],
        [(4, "a")],
    ]


def test_deep_nesting_does_not_crash() -> None:
    prompt = "[" * 5000 + "a:b:2" + "]" * 5000
    assert prompt_schedule(prompt, 4)[-1][0] == 4


# --------------------------------------------------------------------------------------------
# AND
# --------------------------------------------------------------------------------------------

AND_CASES = [
    ("single", "a cat", [("a cat", 1.0)]),
    ("two", "a cat AND a dog", [("a cat", 1.0), (" a dog", 1.0)]),
    ("weights", "cat:0.5 AND dog: 2", [("cat", 0.5), (" dog", 2.0)]),
    ("negative-weight", "cat AND dog:-1", [("cat", 1.0), (" dog", -1.0)]),
    ("weight-forms", "a:2. AND b:.5", [("a", 2.0), (" b", 0.5)]),
    ("inside-word", "BAND ANDROID", [("BAND ANDROID", 1.0)]),
    ("lowercase", "cat and dog", [("cat and dog", 1.0)]),
    ("emphasis-not-weight", "(cat:1.2)", [("(cat:1.2)", 1.0)]),
    ("word-after-colon", "style:anime", [("style:anime", 1.0)]),
    ("trailing-and", "cat AND", [("cat", 1.0), ("", 1.0)]),
    ("splits-inside-brackets", "[cat AND dog:3]", [("[cat", 1.0), (" dog:3]", 1.0)]),
]


@pytest.mark.parametrize(("prompt", "expected"), [c[1:] for c in AND_CASES], ids=[c[0] for c in AND_CASES])
def test_split_and(prompt: str, expected: list[tuple[str, float]]) -> None:
    assert split_and(prompt) == expected


# --------------------------------------------------------------------------------------------
# Extra networks
# --------------------------------------------------------------------------------------------

LORA_CASES = [
    ("name-only", "<lora:foo>", (1.0, 1.0)),
    ("one-multiplier", "<lora:foo:0.5>", (0.5, 0.5)),
    ("te-and-unet", "<lora:foo:0.5:0.8>", (0.5, 0.8)),
    ("dyn-positional", "<lora:foo:0.5:0.8:16>", (0.5, 0.8)),
    # te= also becomes the unet default, as in A1111.
    ("named-te", "<lora:foo:te=0.3>", (0.3, 0.3)),
    ("named-unet", "<lora:foo:1:unet=0.2>", (1.0, 0.2)),
    ("named-override-positional", "<lora:foo:0.5:0.8:te=0.1:unet=0.2:dyn=16>", (0.1, 0.2)),
    ("lyco-alias", "<lyco:bar:0.7>", (0.7, 0.7)),
]


@pytest.mark.parametrize(("tag", "expected"), [c[1:] for c in LORA_CASES], ids=[c[0] for c in LORA_CASES])
def test_lora_multipliers(tag: str, expected: tuple[float, float]) -> None:
    text, nets = extract_extra_networks(f"a {tag} b")
    assert text == "a  b"
    assert len(nets) == 1 and nets[0].kind == "lora"
    assert lora_multipliers(nets[0]) == expected


def test_extract_extra_networks_items_and_named() -> None:
    text, nets = extract_extra_networks("x<lora:a:1>, <hypernet:h:0.5> <lyco:c:0.7:dyn=8:a=b=c>")
    assert text == "x,  "
    assert nets == [
        ExtraNetwork("lora", ["a", "1"], {}, "<lora:a:1>"),
        ExtraNetwork("hypernet", ["h", "0.5"], {}, "<hypernet:h:0.5>"),
        ExtraNetwork("lyco", ["c", "0.7", "a=b=c"], {"dyn": "8"}, "<lyco:c:0.7:dyn=8:a=b=c>"),
    ]
    assert [n.kind for n in nets] == ["lora", "hypernet", "lora"]


def test_extra_network_inside_prompt_editing_is_removed() -> None:
    text, nets = extract_extra_networks("a [<lora:x:0.5>:5] b")
    assert text == "a [:5] b"
    assert [n.items for n in nets] == [["x", "0.5"]]
    assert prompt_schedule(text, 10) == [(5, "a  b"), (10, "a  b")]


@pytest.mark.parametrize("text", ["a <notatag> b", "a <two words:x> b", "a < lora:x> b", "1 < 2 > 0"])
def test_text_that_is_not_a_tag_is_kept(text: str) -> None:
    assert extract_extra_networks(text) == (text, [])


@pytest.mark.parametrize(
    ("tag", "message"),
    [
        ("<lora:foo:strong>", "<lora:foo:strong>"),
        ("<lora:foo:1:abc>", "unet multiplier 'abc'"),
        ("<lora:foo:te=x>", "text encoder multiplier 'x'"),
        ("<lora::0.5>", "no LoRA name"),
        ("<hypernet:foo:0.5>", "not a LoRA"),
    ],
)
def test_bad_lora_tag_is_an_error(tag: str, message: str) -> None:
    _, (net,) = extract_extra_networks(tag)
    with pytest.raises(MuralistError, match=message):
        lora_multipliers(net)


# --------------------------------------------------------------------------------------------
# Styles
# --------------------------------------------------------------------------------------------

STYLES_CSV = (
    "\ufeffname,prompt,negative_prompt\n"
    'Cinematic,"cinematic still of {prompt}, film grain","cartoon, drawing"\n'
    'Sharp, "sharp focus, 8k", blurry\n'
    '"# disabled",ignored,ignored\n'
    'Poem,"line one\nline two",\n'
    "Short,just prompt\n"
)


@pytest.fixture
def styles(tmp_path: Path) -> dict[str, Style]:
    path = tmp_path / "styles.csv"
    path.write_text(STYLES_CSV, encoding="utf-8", newline="")
    return load_styles(path)


def test_load_styles(styles: dict[str, Style]) -> None:
    assert list(styles) == ["Cinematic", "Sharp", "Poem", "Short"]
    assert styles["Cinematic"] == Style(
        "Cinematic", "cinematic still of {prompt}, film grain", "cartoon, drawing"
    )
    assert styles["Sharp"] == Style("Sharp", "sharp focus, 8k", "blurry")
    assert styles["Poem"].prompt == "line one\nline two"
    assert styles["Short"] == Style("Short", "just prompt", "")


def test_load_styles_old_format_and_missing_file(tmp_path: Path) -> None:
    assert load_styles(tmp_path / "nope.csv") == {}
    old = tmp_path / "old.csv"
    old.write_text("name,text\nA,apple\n", encoding="utf-8")
    assert load_styles(old) == {"A": Style("A", "apple", "")}
    bad = tmp_path / "bad.csv"
    bad.write_text("title,body\nA,apple\n", encoding="utf-8")
    with pytest.raises(MuralistError, match="header"):
        load_styles(bad)


APPLY_CASES = [
    (
        "placeholder",
        ["Cinematic"],
        ("a cat", "ugly"),
        ("cinematic still of a cat, film grain", "ugly, cartoon, drawing"),
    ),
    ("append", ["Sharp"], ("a cat", ""), ("a cat, sharp focus, 8k", "blurry")),
    ("append-strips", ["Sharp"], ("  a cat  ", " ugly "), ("a cat, sharp focus, 8k", "ugly, blurry")),
    ("empty-prompt", ["Sharp"], ("", ""), ("sharp focus, 8k", "blurry")),
    (
        "placeholder-keeps-spaces",
        ["Cinematic"],
        (" a cat ", ""),
        ("cinematic still of  a cat , film grain", "cartoon, drawing"),
    ),
    (
        "in-order",
        ["Sharp", "Cinematic"],
        ("a cat", ""),
        ("cinematic still of a cat, sharp focus, 8k, film grain", "blurry, cartoon, drawing"),
    ),
    ("empty-style-strips", ["Short"], (" a cat ", " ugly "), ("a cat, just prompt", "ugly")),
]


@pytest.mark.parametrize(
    ("names", "prompts", "expected"), [c[1:] for c in APPLY_CASES], ids=[c[0] for c in APPLY_CASES]
)
def test_apply_styles(
    styles: dict[str, Style], names: list[str], prompts: tuple[str, str], expected: tuple[str, str]
) -> None:
    chosen = [find_style(styles, n) for n in names]
    assert apply_styles(*prompts, chosen) == expected


def test_unknown_style_names_close_matches(styles: dict[str, Style]) -> None:
    with pytest.raises(NotFoundError, match=r"unknown style 'cinematik'.*did you mean: Cinematic"):
        find_style(styles, "cinematik")


def test_hires_pass_schedules_prompt_editing_after_the_first_pass() -> None:
    """A1111 >= 1.6: in a hires pass of 10 steps after 20, fractions count from 1.0 and steps from 20."""
    from muralist.prompts.parser import prompt_schedule

    assert prompt_schedule("a [cat:dog:0.5]", 10, base_steps=20) == [(10, "a dog")]
    assert prompt_schedule("a [cat:dog:1.5]", 10, base_steps=20) == [(5, "a cat"), (10, "a dog")]
    assert prompt_schedule("a [cat:dog:25]", 10, base_steps=20) == [(5, "a cat"), (10, "a dog")]
    assert prompt_schedule("a [cat:dog:0.5]", 10) == [(5, "a cat"), (10, "a dog")]  # a first pass
