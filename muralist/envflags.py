"""Command-line options from ``MURALIST_<OPTION>`` environment variables (containers set these).

The variable only becomes the option's default, so a flag given on the command line still wins.
A bad value is reported naming the variable, not the flag the user never typed.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping

from .errors import MuralistError

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def env_name(option: str) -> str:
    """``--max-loaded-models`` -> ``MURALIST_MAX_LOADED_MODELS``."""
    return "MURALIST_" + option.lstrip("-").upper().replace("-", "_")


def parse_bool(name: str, value: str) -> bool:
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise MuralistError(f"{name}={value!r}: write 1/0, true/false or yes/no")


def _convert(action: argparse.Action, name: str, value: str) -> object:
    if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
        flag = parse_bool(name, value)
        return flag if isinstance(action, argparse._StoreTrueAction) else not flag
    converted: object = value
    if action.type is not None:
        try:
            converted = action.type(value)  # type: ignore[misc,operator]
        except (TypeError, ValueError):
            kind = getattr(action.type, "__name__", "value")
            word = {"int": "a whole number", "float": "a number"}.get(kind, f"a valid {kind}")
            raise MuralistError(f"{name}={value!r}: must be {word} (as {action.option_strings[-1]})") from None
    if action.choices is not None and converted not in action.choices:
        raise MuralistError(f"{name}={value!r}: choose one of {', '.join(map(str, action.choices))}")
    return converted


def apply_env(parser: argparse.ArgumentParser, environ: Mapping[str, str] | None = None) -> None:
    """Make every ``--option`` of ``parser`` default to ``MURALIST_<OPTION>`` when that is set.

    Raises ``MuralistError`` naming the variable for a value the option would refuse. Options that
    collect several values (repeatable flags) are left to the command line.
    """
    env = os.environ if environ is None else environ
    for action in parser._actions:
        long = [s for s in action.option_strings if s.startswith("--")]
        if not long or isinstance(action, argparse._HelpAction | argparse._AppendAction | argparse._CountAction):
            continue
        name = env_name(long[0])
        if name not in env:
            continue
        action.default = _convert(action, name, env[name])
        action.required = False  # e.g. worker --cluster: the variable gives it


def env_epilog(command: str) -> str:
    return (f"Every option of '{command}' can also come from the environment as MURALIST_<OPTION> "
            "(upper case, dashes as underscores), e.g. MURALIST_DATABASE=postgresql://..., MURALIST_PORT=7860, "
            "MURALIST_LISTEN=1 (booleans: 1/0, true/false, yes/no). A flag on the command line wins.")
