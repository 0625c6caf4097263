"""Prompt styles from an A1111 ``styles.csv``.

The file has a header ``name,prompt,negative_prompt`` (very old files have ``name,text``);
fields may be quoted and span lines. A style's text either contains ``{prompt}``, which is
replaced by the user's prompt, or is appended to it after ", ".
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from muralist.errors import MuralistError, not_found

__all__ = ["Style", "apply_styles", "find_style", "load_styles", "merge_style_text"]

PROMPT_PLACEHOLDER = "{prompt}"


@dataclass(frozen=True)
class Style:
    name: str
    prompt: str = ""
    negative_prompt: str = ""


def load_styles(path: Path) -> dict[str, Style]:
    """Styles by name, in file order; a missing file means no styles.

    As in A1111: spaces after a comma are ignored, rows whose name starts with "#" are
    comments, a later row with the same name replaces an earlier one, and a UTF-8 BOM (Excel)
    is accepted.
    """
    path = Path(path)
    if not path.is_file():
        return {}
    styles: dict[str, Style] = {}
    try:
        with path.open(encoding="utf-8-sig", newline="") as file:
            reader = csv.DictReader(file, skipinitialspace=True)
            fields = reader.fieldnames or []
            if "name" not in fields or ("prompt" not in fields and "text" not in fields):
                raise MuralistError(
                    f"styles file {path} needs a header line 'name,prompt,negative_prompt' (found {fields})"
                )
            prompt_field = "prompt" if "prompt" in fields else "text"
            for row in reader:
                name = row.get("name") or ""
                if not name or name.startswith("#"):
                    continue
                # A short row leaves its missing fields as None.
                styles[name] = Style(name, row.get(prompt_field) or "", row.get("negative_prompt") or "")
    except (UnicodeDecodeError, csv.Error) as e:
        raise MuralistError(f"cannot read styles file {path}: {e}") from None
    return styles


def merge_style_text(style_text: str, prompt: str) -> str:
    """One style applied to one prompt (positive or negative), A1111's rule.

    With ``{prompt}`` every occurrence is replaced and nothing is stripped; otherwise the
    stripped prompt and stripped style are joined with ", ", leaving out an empty side.
    """
    if PROMPT_PLACEHOLDER in style_text:
        return style_text.replace(PROMPT_PLACEHOLDER, prompt)
    return ", ".join(part for part in (prompt.strip(), style_text.strip()) if part)


def apply_styles(prompt: str, negative_prompt: str, styles: Iterable[Style]) -> tuple[str, str]:
    """Apply ``styles`` in order to the prompt and to the negative prompt."""
    for style in styles:
        prompt = merge_style_text(style.prompt, prompt)
        negative_prompt = merge_style_text(style.negative_prompt, negative_prompt)
    return prompt, negative_prompt


def find_style(styles: Mapping[str, Style], name: str) -> Style:
    """The style called exactly ``name``; an unknown name is an error listing close names.

    (A1111 silently ignores unknown style names; a service should say so instead.)
    """
    try:
        return styles[name]
    except KeyError:
        raise not_found("style", name, styles.keys()) from None
