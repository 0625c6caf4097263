"""Input images of queued jobs, kept as files beside the database instead of inside job rows.

A 27 MB init image stored in the row made the database 55 MB plus as much WAL, and every read of
the job (views, claims) carried it. The row holds a reference; the dispatcher puts the data back
into the job it sends to a worker (which may be on another machine).
"""

from __future__ import annotations

import base64
import binascii
import uuid
from pathlib import Path
from typing import Any

from ..errors import InvalidRequestError

REF = "muralist-input:"  # a params value "muralist-input:inputs/<owner>/<name>" is a stored file
FIELDS = ("init_images", "mask", "images", "image")  # where request params carry images
NESTED = "controlnet"  # a list of objects with their own image fields


def store_inputs(root: Path, owner: str, params: dict[str, Any]) -> dict[str, Any]:
    """``params`` with every base64 image written to ``root/inputs/<owner>/`` and replaced by a reference."""
    out = dict(params)
    folder = root / "inputs" / owner
    for key in FIELDS:
        value = out.get(key)
        if isinstance(value, str) and value:
            out[key] = _write(root, folder, value)
        elif isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            out[key] = [_write(root, folder, v) for v in value]
    if isinstance(out.get(NESTED), list):  # ControlNet units carry their own image and mask
        out[NESTED] = [store_inputs(root, owner, u) if isinstance(u, dict) else u for u in out[NESTED]]
    return out


def load_inputs(root: Path, params: dict[str, Any]) -> dict[str, Any]:
    """``params`` with references replaced by the images' base64 again (what workers take)."""
    out = dict(params)
    for key in FIELDS:
        value = out.get(key)
        if isinstance(value, str):
            out[key] = _read(root, value)
        elif isinstance(value, list):
            out[key] = [_read(root, v) if isinstance(v, str) else v for v in value]
    if isinstance(out.get(NESTED), list):
        out[NESTED] = [load_inputs(root, u) if isinstance(u, dict) else u for u in out[NESTED]]
    return out


def input_paths(root: Path, params: dict[str, Any]) -> list[Path]:
    refs = []
    for key in FIELDS:
        value = params.get(key)
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, str) and v.startswith(REF):
                refs.append(root / v[len(REF):])
    for unit in params.get(NESTED) or []:
        if isinstance(unit, dict):
            refs += input_paths(root, unit)
    return refs


def delete_inputs(root: Path, params: dict[str, Any]) -> None:
    for path in input_paths(root, params):
        path.unlink(missing_ok=True)


def prune_inputs(root: Path, older_than: float) -> int:
    """Delete input files older than ``older_than`` (unix time): left by jobs that ended without
    their dispatcher deleting them (a user removed, a crash)."""
    n = 0
    folder = root / "inputs"
    if folder.is_dir():
        for path in folder.rglob("*.b64"):
            try:
                if path.stat().st_mtime < older_than:
                    path.unlink()
                    n += 1
            except OSError:
                pass
    return n


def _write(root: Path, folder: Path, value: str) -> str:
    if value.startswith(REF):
        return value  # already stored (a re-submitted job)
    data = value.partition(",")[2] if value.startswith("data:") else value
    try:
        base64.b64decode(data, validate=False)
    except (binascii.Error, ValueError):
        raise InvalidRequestError("image: not valid base64") from None
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{uuid.uuid4().hex}.b64"
    path.write_text(data, encoding="ascii", errors="ignore")
    return REF + path.relative_to(root).as_posix()


def _read(root: Path, value: str) -> str:
    if not value.startswith(REF):
        return value
    path = root / value[len(REF):]
    try:
        return path.read_text(encoding="ascii")
    except OSError:
        raise InvalidRequestError(f"an input image of this job is gone from {path.parent} (deleted by hand?)") from None

