"""User-facing errors.

Every error a user can cause (bad model name, bad size, corrupt file) is a ``MuralistError``
whose message says what to change. Entry points print the message (CLI: one line, exit 2;
HTTP: 4xx JSON) instead of a traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class MuralistError(Exception):
    """An error caused by the user's input or files; its message is shown as is."""

    exit_code = 2


class NotFoundError(MuralistError):
    """A named thing (model, sampler, VAE...) does not exist."""


class InvalidRequestError(MuralistError):
    """A request parameter is outside what is allowed."""


class ForbiddenError(MuralistError):
    """The caller may not do this (an admin-only job: merge, download). HTTP 403."""


class ModelFileError(MuralistError):
    """A model file cannot be read: corrupt, truncated, unsafe or of an unknown architecture."""


def closest(name: str, choices: Iterable[str], n: int = 5) -> list[str]:
    """The choices closest to ``name`` (case-insensitive), best first."""
    choices = list(choices)
    lowered = {c.lower(): c for c in choices}
    hits = difflib.get_close_matches(name.lower(), list(lowered), n=n, cutoff=0.4)
    # Substring matches are what users expect from "sd15" -> "sd15-pruned [abcd]".
    subs = [c for c in choices if name.lower() in c.lower() and c.lower() not in hits]
    return [lowered[h] for h in hits] + subs[: max(0, n - len(hits))]


def not_found(kind: str, name: str, choices: Iterable[str]) -> NotFoundError:
    """A NotFoundError naming the closest choices, or all of them when there are few."""
    choices = sorted(set(choices))
    near = closest(name, choices)
    if near:
        hint = "did you mean: " + ", ".join(near)
    elif choices:
        hint = "available: " + ", ".join(choices[:20]) + (" ..." if len(choices) > 20 else "")
    else:
        hint = f"no {kind}s are installed"
    return NotFoundError(f"unknown {kind} {name!r}; {hint}")
