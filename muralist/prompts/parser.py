"""Prompt syntax, read the way AUTOMATIC1111 reads it.

A prompt goes through these stages, in this order (as in A1111's processing):

1. ``extract_extra_networks`` removes ``<lora:name:w>`` style tags from the whole prompt.
2. ``split_and`` splits it on ``AND`` into weighted sub-prompts (composable diffusion).
3. ``prompt_schedule`` resolves prompt editing ``[a:b:N]`` and alternation ``[a|b]`` of each
   sub-prompt into plain texts, one per range of sampling steps.
4. ``parse_attention`` turns each such text into (text, weight) runs for the tokenizer.

Every function here is pure and deterministic; none of them needs torch.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from muralist.errors import MuralistError

__all__ = [
    "ExtraNetwork",
    "extract_extra_networks",
    "lora_multipliers",
    "parse_attention",
    "prompt_schedule",
    "schedules_for_prompts",
    "split_and",
]


# --------------------------------------------------------------------------------------------
# Emphasis: (x) [x] (x:w) and BREAK
# --------------------------------------------------------------------------------------------

ROUND_MULTIPLIER = 1.1
# A1111 multiplies by the precomputed reciprocal rather than dividing; the float results
# differ in the last bit, and equal weights are merged by exact comparison.
SQUARE_MULTIPLIER = 1 / 1.1
CURLY_MULTIPLIER = 1.05  # NovelAI's {x}

BREAK_WEIGHT = -1.0

# Text runs are split on BREAK together with the whitespace around it.
_BREAK_RE = re.compile(r"\s*\bBREAK\b\s*")
# An explicit weight closing a round bracket: ":1.3)", ": 1.3 )". A1111 accepts any run of
# digits and dots here, so "(a:1.2.3)" is a weight that fails to convert.
_EXPLICIT_WEIGHT_RE = re.compile(r":\s*([+-]?[.\d]+)\s*\)")


def parse_attention(text: str, novelai_braces: bool = False) -> list[tuple[str, float]]:
    """Split ``text`` into runs of (text, weight), following A1111's emphasis rules.

    ``(x)`` multiplies by 1.1, ``(x:w)`` by w, ``[x]`` by 1/1.1; nesting multiplies. ``\\(``,
    ``\\)``, ``\\[``, ``\\]`` and ``\\\\`` are literal characters; any other backslash is
    dropped. A closer with no opener is literal text; an opener that is never closed applies
    its multiplier to everything after it. ``BREAK`` as a separate word becomes
    ``("BREAK", -1.0)`` (inside brackets it is multiplied like any other run, exactly as in
    A1111, and then no longer counts as a break). Adjacent runs of equal weight are merged;
    an empty result is ``[("", 1.0)]``.

    With ``novelai_braces`` ``{x}`` multiplies by 1.05 and ``\\{``/``\\}`` are literal;
    without it braces are ordinary text.
    """
    # Runs are kept as mutable [text, weight] pairs so that a closing bracket can multiply
    # every run since its opener in place, in the same order A1111 does.
    runs: list[list] = []
    stacks: dict[str, list[int]] = {"(": [], "[": [], "{": []}
    closers = {")": ("(", ROUND_MULTIPLIER), "]": ("[", SQUARE_MULTIPLIER)}
    escapable = "()[]\\"
    specials = "\\()[]:"
    if novelai_braces:
        closers["}"] = ("{", CURLY_MULTIPLIER)
        escapable += "{}"
        specials += "{}"

    def multiply_from(start: int, multiplier: float) -> None:
        for run in runs[start:]:
            run[1] *= multiplier

    def add_text(chunk: str) -> None:
        pieces = _BREAK_RE.split(chunk)
        for index, piece in enumerate(pieces):
            if index:
                runs.append(["BREAK", BREAK_WEIGHT])
            runs.append([piece, 1.0])

    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            if i + 1 < n and text[i + 1] in escapable:
                runs.append([text[i + 1], 1.0])
                i += 2
            else:
                # A lone backslash is swallowed (A1111 emits an empty run for it).
                runs.append(["", 1.0])
                i += 1
        elif c in stacks and (c != "{" or novelai_braces):
            stacks[c].append(len(runs))
            i += 1
        elif c == ":":
            m = _EXPLICIT_WEIGHT_RE.match(text, i)
            if m and stacks["("]:
                multiply_from(stacks["("].pop(), _explicit_weight(m.group(1), text))
                i = m.end()
            elif m:
                add_text(m.group(0))  # no bracket to close: the whole ":w)" is text
                i = m.end()
            else:
                add_text(":")
                i += 1
        elif c in closers:
            opener, multiplier = closers[c]
            if stacks[opener]:
                multiply_from(stacks[opener].pop(), multiplier)
            else:
                add_text(c)
            i += 1
        else:
            j = i + 1
            while j < n and text[j] not in specials:
                j += 1
            add_text(text[i:j])
            i = j

    # Unclosed openers reach to the end of the prompt, rounds first (A1111's order).
    for opener, multiplier in (("(", ROUND_MULTIPLIER), ("[", SQUARE_MULTIPLIER), ("{", CURLY_MULTIPLIER)):
        for start in stacks[opener]:
            multiply_from(start, multiplier)

    if not runs:
        return [("", 1.0)]
    merged: list[list] = [runs[0]]
    for run in runs[1:]:
        if run[1] == merged[-1][1]:
            merged[-1][0] += run[0]
        else:
            merged.append(run)
    return [(t, w) for t, w in merged]


def _explicit_weight(value: str, prompt: str) -> float:
    try:
        return float(value)
    except ValueError:
        # A1111 fails the whole generation here too; say which weight is wrong.
        raise MuralistError(
            f"bad emphasis weight {value!r} in prompt {prompt!r}; use e.g. (word:1.2)"
        ) from None


# --------------------------------------------------------------------------------------------
# Prompt editing [a:b:N] and alternation [a|b]
# --------------------------------------------------------------------------------------------
#
# The language, as A1111 defines it (prompt_parser.py), has two levels:
#   top level : any mix of nested-level items and stray "[", "]", "(", ")", ":" characters
#   nested    : text, "\\" + any character but a newline, and groups:
#               "(" nested ")"  |  "(" nested ":" nested ")"  |  "[" nested "]"
#               "[" [nested ":"] nested ":" number "]"       (editing; spaces around number)
#               "[" nested ("|" [nested])+ "]"                 (alternation)
# A nested level never holds a bare ":" or "|" or an unbalanced bracket. A "|" outside every
# alternation, or a backslash at the end / before a newline, makes the whole prompt
# unparseable, and A1111 then uses it verbatim for every step. Where a bracket could be either
# an editing/alternation group or stray characters, A1111's parser picks the group, and the
# outermost one when groups nest; the output of emphasis groups is their own text either way.

# Lark's SIGNED_NUMBER: ASCII digits, optional sign, optional fraction and exponent.
_NUMBER_RE = re.compile(
    r"\s*([+-]?(?:[0-9]+[eE][+-]?[0-9]+|(?:[0-9]+\.[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|[0-9]+))\s*\]"
)


@dataclass
class _Edit:
    """``[before:after:when]``; ``before`` is None for the ``[after:when]`` form."""

    before: list | None
    after: list
    number: str
    when: int = 0  # resolved against the step count before rendering


@dataclass
class _Alternate:
    options: list[list]


class _NoParse(Exception):
    """The text at this position is not a group of the nested level."""


class _ScheduleParser:
    """Recursive descent over one prompt. Group parses are memoised by position: a group's
    meaning does not depend on what surrounds it, so retrying from a stray bracket is cheap."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.memo: dict[int, tuple[list, int] | None] = {}

    def parse(self) -> list | None:
        """The top-level node list, or None when the prompt is unparseable."""
        text, n = self.text, len(self.text)
        nodes: list = []
        i = 0
        while i < n:
            c = text[i]
            if c in "([":
                parsed = self._group(i)
                if parsed is None:
                    nodes.append(c)  # stray opener; what follows is read at top level again
                    i += 1
                else:
                    nodes.extend(parsed[0])
                    i = parsed[1]
            elif c in ")]:":
                nodes.append(c)
                i += 1
            elif c == "|":
                return None
            elif c == "\\":
                if i + 1 >= n or text[i + 1] == "\n":
                    return None
                nodes.append(text[i : i + 2])
                i += 2
            else:
                nodes.append(c)
                i += 1
        return nodes

    def _group(self, i: int) -> tuple[list, int] | None:
        if i not in self.memo:
            try:
                self.memo[i] = self._paren(i) if self.text[i] == "(" else self._square(i)
            except _NoParse:
                self.memo[i] = None
        return self.memo[i]

    def _nested(self, i: int) -> tuple[list, int]:
        """Nested-level items from ``i`` up to the next ":", "|", ")", "]" or the end."""
        text, n = self.text, len(self.text)
        nodes: list = []
        while i < n:
            c = text[i]
            if c in ":|)]":
                break
            if c in "([":
                parsed = self._group(i)
                if parsed is None:
                    raise _NoParse
                nodes.extend(parsed[0])
                i = parsed[1]
            elif c == "\\":
                if i + 1 >= n or text[i + 1] == "\n":
                    raise _NoParse
                nodes.append(text[i : i + 2])
                i += 2
            else:
                nodes.append(c)
                i += 1
        return nodes, i

    def _expect(self, i: int, chars: str) -> str:
        if i >= len(self.text) or self.text[i] not in chars:
            raise _NoParse
        return self.text[i]

    def _paren(self, i: int) -> tuple[list, int]:
        inner, i = self._nested(i + 1)
        if self._expect(i, ":)") == ":":
            second, i = self._nested(i + 1)
            inner = [*inner, ":", *second]
            self._expect(i, ")")
        return ["(", *inner, ")"], i + 1

    def _square(self, i: int) -> tuple[list, int]:
        first, i = self._nested(i + 1)
        sep = self._expect(i, "]|:")
        if sep == "]":
            return ["[", *first, "]"], i + 1
        if sep == "|":
            options = [first]
            while self.text[i] == "|":
                option, i = self._nested(i + 1)
                options.append(option)
                self._expect(i, "|]")
            return [_Alternate(options)], i + 1
        # Editing: "[first:N]" or "[first:second:N]".
        m = _NUMBER_RE.match(self.text, i + 1)
        if m:
            return [_Edit(None, first, m.group(1))], m.end()
        second, i = self._nested(i + 1)
        self._expect(i, ":")
        m = _NUMBER_RE.match(self.text, i + 1)
        if not m:
            raise _NoParse
        return [_Edit(first, second, m.group(1))], m.end()


def _walk(nodes: list) -> Iterable[_Edit | _Alternate]:
    """Every editing/alternation node, including those inside branches never shown."""
    for node in nodes:
        if isinstance(node, _Edit):
            yield node
            if node.before is not None:
                yield from _walk(node.before)
            yield from _walk(node.after)
        elif isinstance(node, _Alternate):
            yield node
            for option in node.options:
                yield from _walk(option)


def _switch_step(number: str, steps: int, base_steps: int | None = None) -> int:
    value = float(number)
    # "0.25" and "2.0" are fractions of the step count, "5" and "1e1" absolute steps;
    # truncation (int) is A1111's rounding, so 0.29 of 100 steps switches at 28. In a hires pass
    # (A1111's scheduling since 1.6) both count on from the first pass: "1.5" is half-way through
    # the hires steps and "25" is step 25 - base_steps of it.
    if "." in number:
        value = (value - (1.0 if base_steps is not None else 0.0)) * steps
    elif base_steps is not None:
        value -= base_steps
    if math.isinf(value):  # "1e999": A1111 crashes; treat it as "never" / "always"
        return steps if value > 0 else -1
    return min(steps, int(value))


def _render(nodes: list, step: int) -> str:
    out: list[str] = []
    for node in nodes:
        if isinstance(node, str):
            out.append(node)
        elif isinstance(node, _Edit):
            chosen = (node.before or []) if step <= node.when else node.after
            out.append(_render(chosen, step))
        else:
            out.append(_render(node.options[(step - 1) % len(node.options)], step))
    return "".join(out)


def prompt_schedule(prompt: str, steps: int, base_steps: int | None = None) -> list[tuple[int, str]]:
    """Resolve prompt editing and alternation into ``(until_step, text)`` pairs.

    Step ``s`` (1-based) uses the first pair whose ``until_step >= s``; the last pair always
    ends at ``steps``. ``[a:b:N]`` is a up to step N then b, ``[a:N]`` adds a after step N,
    ``[a::N]`` removes a after step N; N containing "." is a fraction of ``steps``. ``[a|b|c]``
    switches option every step, so it yields one pair per step. Emphasis and other text is
    left as written for ``parse_attention``. A prompt that is not valid editing syntax (e.g. a
    stray "|") is used verbatim: ``[(steps, prompt)]``. ``base_steps``: this is the schedule of a
    hires pass that follows a first pass of that many steps (see ``_switch_step``).
    """
    try:
        nodes = _ScheduleParser(prompt).parse()
    except RecursionError:  # absurd nesting depth: give up on the syntax, like a parse error
        nodes = None
    if nodes is None:
        return [(steps, prompt)]

    boundaries = {steps}
    for node in _walk(nodes):
        if isinstance(node, _Edit):
            node.when = _switch_step(node.number, steps, base_steps)
            if node.when >= 1:
                boundaries.add(node.when)
        else:
            boundaries.update(range(1, steps + 1))
    return [(step, _render(nodes, step)) for step in sorted(boundaries)]


def schedules_for_prompts(prompts: list[str], steps: int) -> list[list[tuple[int, str]]]:
    """``prompt_schedule`` for each prompt; repeated prompts (big batches) are parsed once."""
    cache: dict[str, list[tuple[int, str]]] = {}
    for prompt in prompts:
        if prompt not in cache:
            cache[prompt] = prompt_schedule(prompt, steps)
    return [cache[prompt] for prompt in prompts]


# --------------------------------------------------------------------------------------------
# Composable diffusion: "a AND b:0.5"
# --------------------------------------------------------------------------------------------

_AND_RE = re.compile(r"\bAND\b")
# A trailing ":weight" (no exponent; "2." and ".5" allowed). Text keeps its leading
# whitespace, loses the trailing one, exactly as A1111 hands it to the text encoder.
_SUBPROMPT_WEIGHT_RE = re.compile(r"((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*", re.DOTALL)


def split_and(prompt: str) -> list[tuple[str, float]]:
    """Split on the word ``AND`` into (sub-prompt, weight); a part may end in ``:weight``.

    ``"a AND b:0.5"`` -> ``[("a", 1.0), (" b", 0.5)]``. ``AND`` inside a word (``BAND``) or in
    lower case does not split. Do this before ``prompt_schedule``: A1111 splits first, even
    inside brackets.
    """
    parts: list[tuple[str, float]] = []
    for sub in _AND_RE.split(prompt):
        m = _SUBPROMPT_WEIGHT_RE.fullmatch(sub)
        assert m is not None  # the pattern matches every string
        parts.append((m.group(1), float(m.group(2)) if m.group(2) is not None else 1.0))
    return parts


# --------------------------------------------------------------------------------------------
# Extra networks: <lora:name:0.8>
# --------------------------------------------------------------------------------------------

_EXTRA_NETWORK_RE = re.compile(r"<(\w+):([^>]+)>")
# A1111 registers "lyco" (the old LyCORIS extension's tag) as an alias of its lora network.
_ALIASES = {"lyco": "lora"}


@dataclass
class ExtraNetwork:
    """One ``<name:arg:arg:key=value>`` tag.

    ``name`` is the network type as written ("lora", "lyco", "hypernet"); ``items`` are the
    positional arguments (for a LoRA: file name, then multipliers); ``named`` holds the
    ``key=value`` arguments such as ``te=0.5``; ``tag`` is the original text, for messages.
    """

    name: str
    items: list[str]
    named: dict[str, str] = field(default_factory=dict)
    tag: str = ""

    @property
    def kind(self) -> str:
        """The network type after aliases: ``<lyco:...>`` is a ``lora``."""
        return _ALIASES.get(self.name, self.name)

    def describe(self) -> str:
        if self.tag:
            return self.tag
        args = [*self.items, *(f"{k}={v}" for k, v in self.named.items())]
        return f"<{self.name}:{':'.join(args)}>"


def extract_extra_networks(prompt: str) -> tuple[str, list[ExtraNetwork]]:
    """Remove every ``<name:args>`` tag from ``prompt``; return the text and the tags in order.

    Tags are removed wherever they are, even inside prompt editing (``[<lora:x:1>:5]`` leaves
    ``[:5]``): A1111 applies networks for the whole generation, not per step. Arguments are
    split on ":"; one containing exactly one "=" is a named argument.
    """
    found: list[ExtraNetwork] = []

    def take(m: re.Match[str]) -> str:
        items: list[str] = []
        named: dict[str, str] = {}
        for arg in m.group(2).split(":"):
            key_value = arg.split("=")
            if len(key_value) == 2:
                named[key_value[0]] = key_value[1]
            else:
                items.append(arg)
        found.append(ExtraNetwork(m.group(1), items, named, m.group(0)))
        return ""

    return _EXTRA_NETWORK_RE.sub(take, prompt), found


def lora_multipliers(net: ExtraNetwork) -> tuple[float, float]:
    """(text-encoder, unet) multipliers of a LoRA tag, with A1111's defaults.

    ``<lora:n>`` -> (1, 1); ``<lora:n:w>`` -> (w, w); ``<lora:n:te:unet>`` -> (te, unet).
    ``te=`` overrides the text-encoder value and, unless a unet value is given, the unet one
    too; ``unet=`` overrides the unet value.
    """
    if net.kind != "lora":
        raise MuralistError(f"{net.describe()} is not a LoRA tag")
    if not net.items or not net.items[0]:
        raise MuralistError(f"{net.describe()} has no LoRA name; write <lora:name:weight>")

    def number(value: str, what: str) -> float:
        try:
            return float(value)
        except ValueError:
            raise MuralistError(
                f"{net.describe()}: {what} multiplier {value!r} is not a number; write e.g. <lora:name:0.8>"
            ) from None

    te = number(net.items[1], "text encoder") if len(net.items) > 1 else 1.0
    if "te" in net.named:
        te = number(net.named["te"], "text encoder")
    unet = number(net.items[2], "unet") if len(net.items) > 2 else te
    if "unet" in net.named:
        unet = number(net.named["unet"], "unet")
    return te, unet
