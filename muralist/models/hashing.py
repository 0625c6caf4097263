"""A1111-compatible model hashes and a cache that keeps rescans from rereading model files.

Infotexts written by A1111 carry "Model hash" (AutoV2, sha256[:10]), older ones the 8-hex legacy
hash, and "Lora hashes" the addnet hash; computing the same values lets those images and client
requests find the same models here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger(__name__)

BLOCK = 1024 * 1024
T = TypeVar("T")


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a whole file, read in 1 MiB blocks so multi-GB models use no memory."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(BLOCK):
            h.update(block)
    return h.hexdigest()


def shorthash(sha256: str) -> str:
    """A1111's "AutoV2" hash: the first 10 hex digits of the sha256."""
    return sha256[:10]


def legacy_hash(path: str | os.PathLike[str]) -> str:
    """A1111's pre-2023 model hash: sha256 of 64 KiB at offset 1 MiB, 8 hex digits."""
    try:
        with open(path, "rb") as f:
            f.seek(0x100000)
            return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]
    except FileNotFoundError:
        return "NOFILE"


def addnet_hash_safetensors(path: str | os.PathLike[str]) -> str:
    """The "Lora hashes" infotext hash: sha256 of the tensor data after the header, 12 hex digits.

    It ignores ``__metadata__``, so renaming a LoRA's training tags keeps the hash.
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        f.seek(n + 8)
        while block := f.read(BLOCK):
            h.update(block)
    return h.hexdigest()[:12]


TOP_FIELDS = ("sha256", "legacy")


class HashCache:
    """A JSON file of per-file facts, trusted while the file's size and mtime are unchanged.

    Entries look like ``{"size", "mtime", "sha256", "legacy", "info": {...}}``, keyed by absolute
    path. ``sha256`` and ``legacy`` are top-level fields; any other field name (e.g. the model
    kind) lives in ``info``. Any change to size or mtime drops the whole entry, since every
    cached fact describes the old content.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._data: dict[str, dict[str, Any]] | None = None

    def _load(self) -> dict[str, dict[str, Any]]:
        if self._data is None:
            data: Any = {}
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
            except FileNotFoundError:
                pass
            except (OSError, ValueError) as exc:
                # Only a cache: rebuilding it costs time, not correctness.
                log.warning("ignoring unreadable hash cache %s: %s", self.path, exc)
            self._data = (
                {k: v for k, v in data.items() if isinstance(v, dict)} if isinstance(data, dict) else {}
            )
        return self._data

    @staticmethod
    def _key(path: str | os.PathLike[str]) -> str:
        return os.path.abspath(path)

    def lookup(self, path: str | os.PathLike[str], field: str) -> Any | None:
        """The cached value, or None when absent or the file changed (or is gone)."""
        try:
            st = os.stat(path)
        except OSError:
            return None
        with self._lock:
            entry = self._load().get(self._key(path))
            if not entry or entry.get("size") != st.st_size or entry.get("mtime") != st.st_mtime:
                return None
            return entry.get(field) if field in TOP_FIELDS else entry.get("info", {}).get(field)

    def get(self, path: str | os.PathLike[str], field: str, compute: Callable[[], T]) -> T:
        """The cached ``field`` for ``path``, or ``compute()`` stored and saved.

        ``compute`` must return a JSON-serialisable value other than None.
        """
        try:
            before = os.stat(path)
        except OSError:
            return compute()  # nothing to key on; let compute report the problem
        cached = self.lookup(path, field)
        if cached is not None:
            return cached
        # Computed outside the lock: hashing a 7 GB file must not block other lookups.
        value = compute()
        try:
            after = os.stat(path)
        except OSError:
            return value
        if (after.st_size, after.st_mtime) != (before.st_size, before.st_mtime):
            return value  # changed while we read it; don't cache a value for unknown content
        self._store(path, after, field, value)
        return value

    def sha256(self, path: str | os.PathLike[str]) -> str:
        """The file's sha256 (A1111's full hash), hashed once per file version."""
        return self.get(path, "sha256", lambda: sha256_file(path))

    def _store(self, path: str | os.PathLike[str], st: os.stat_result, field: str, value: Any) -> None:
        with self._lock:
            data = self._load()
            key = self._key(path)
            entry = data.get(key)
            if not entry or entry.get("size") != st.st_size or entry.get("mtime") != st.st_mtime:
                entry = {"size": st.st_size, "mtime": st.st_mtime}
                data[key] = entry
            if field in TOP_FIELDS:
                entry[field] = value
            else:
                entry.setdefault("info", {})[field] = value
            try:
                self._save_locked()
            except OSError as exc:
                # A read-only data folder still gets working (if slower) scans.
                log.warning("cannot save hash cache %s: %s", self.path, exc)

    def _save_locked(self) -> None:
        # Temp file + os.replace: a crash mid-write leaves the old cache, never half a file.
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=self.path.name + ".", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(self._data, f, indent=1, sort_keys=True)
            os.replace(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
