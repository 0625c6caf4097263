"""One model manager per worker: every loaded network (checkpoints, VAEs, upscalers, face
restorers, BLIP) under one memory budget, least recently used evicted first.

Room is made *before* a load, not after: on a GPU the new weights must fit next to the ones
already there, so checking afterwards is too late. A load in flight counts as in use, so
concurrent loads account for each other. Entries pinned by a running job are never evicted.
Evicting only drops the manager's reference; an object still held by a caller lives on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import itertools
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch

from .loader import pick_device

log = logging.getLogger(__name__)

T = TypeVar("T")

KINDS = ("checkpoint", "vae", "upscaler", "face", "blip", "controlnet")

Ident = tuple[str, Hashable]


def file_bytes(path: str | os.PathLike[str]) -> int:
    """Size on disk: a file's size, a folder's files summed (diffusers folders); 0 if unreadable."""
    p = Path(path)
    try:
        if p.is_file():
            return p.stat().st_size
        if p.is_dir():
            return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    except OSError:
        pass
    return 0


# The walk that finds modules inside a loaded object stays shallow and bounded: loaded objects
# hold tokenizers and processors whose vocabularies are large and contain no tensors.
_MAX_DEPTH = 3
_MAX_CHILDREN = 256
_LEAVES = (str, bytes, int, float, bool, type(None), torch.Tensor, torch.device, torch.dtype, Path)


def measure_bytes(obj: Any) -> int | None:
    """Bytes of the parameters and buffers of every ``nn.Module`` in ``obj`` (shared tensors once);
    None when no module is found."""
    seen: set[int] = set()
    tensors: set[int] = set()
    total, found = 0, False
    stack: list[tuple[Any, int]] = [(obj, 0)]
    while stack:
        o, depth = stack.pop()
        if id(o) in seen:
            continue
        seen.add(id(o))
        if isinstance(o, torch.nn.Module):
            found = True
            for t in itertools.chain(o.parameters(), o.buffers()):
                if id(t) not in tensors:
                    tensors.add(id(t))
                    total += t.numel() * t.element_size()
            continue
        if depth >= _MAX_DEPTH or isinstance(o, _LEAVES):
            continue
        if isinstance(o, dict):
            children: Any = o.values()
        elif isinstance(o, (list, tuple, set, frozenset)):
            children = o
        elif dataclasses.is_dataclass(o) and not isinstance(o, type):
            children = (getattr(o, f.name, None) for f in dataclasses.fields(o))
        elif hasattr(o, "__dict__") and not isinstance(o, type):
            children = vars(o).values()
        else:
            continue
        stack.extend((c, depth + 1) for c in itertools.islice(children, _MAX_CHILDREN))
    if not found and callable(getattr(obj, "parameters_bytes", None)):
        return int(obj.parameters_bytes())
    return total if found else None


@dataclasses.dataclass
class _Entry:
    kind: str
    key: Hashable
    label: str
    value: Any
    bytes: int
    pins: int = 0


class _Gate:
    """Serialises loads of one (kind, key); counted so it is dropped when nobody waits on it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.users = 0


class ModelManager:
    """Loaded models of every kind within one byte budget and optional per-kind counts.

    ``max_bytes`` None: no byte budget; a kind missing from ``max_count``: no count limit.
    """

    def __init__(
        self,
        device: str | torch.device | None = None,
        max_bytes: int | None = None,
        max_count: dict[str, int] | None = None,
    ) -> None:
        self.device, _ = pick_device(str(device) if device is not None else None)
        self.max_bytes = max_bytes
        self.max_count: dict[str, int] = dict(max_count or {})
        self._entries: OrderedDict[Ident, _Entry] = OrderedDict()  # oldest first
        self._reserved: dict[Ident, int] = {}  # loads in flight and their estimates
        self._gates: dict[Ident, _Gate] = {}
        self._lock = threading.Lock()

    # -- public API -------------------------------------------------------------------------

    def get(self, kind: str, key: Hashable, load: Callable[[], T], estimate: int, label: str = "") -> T:
        """The loaded object for ``(kind, key)``, loading it with ``load()`` if needed (not pinned)."""
        return self._acquire(kind, key, load, estimate, label, pin=False)

    @contextlib.contextmanager
    def use(self, kind: str, key: Hashable, load: Callable[[], T], estimate: int, label: str = "") -> Iterator[T]:
        """Like ``get``, with the entry pinned (never evicted) for the duration of the block."""
        value = self._acquire(kind, key, load, estimate, label, pin=True)
        try:
            yield value
        finally:
            with self._lock:
                entry = self._entries.get((kind, key))
                if entry is not None and entry.pins:
                    entry.pins -= 1
                # A pinned entry may have been allowed over the budget; now it can go.
                dropped = self._shrink(keep=None, kind=kind)
            del dropped

    def loaded(self, kind: str | None = None) -> list[tuple[str, Hashable]]:
        """``(kind, key)`` of the loaded entries, least recently used first."""
        with self._lock:
            return [ident for ident in self._entries if kind is None or ident[0] == kind]

    def summary(self) -> list[dict[str, Any]]:
        """One ``{"kind", "label", "bytes", "pinned"}`` per loaded entry, least recently used first."""
        with self._lock:
            return [
                {"kind": e.kind, "label": e.label, "bytes": e.bytes, "pinned": e.pins > 0}
                for e in self._entries.values()
            ]

    def used_bytes(self) -> int:
        """Bytes of the loaded entries plus the estimates of loads in flight."""
        with self._lock:
            return self._used()

    def discard(self, kind: str, match: Callable[[Hashable], bool] | None = None) -> int:
        """Drop the unpinned entries of ``kind`` whose key matches (all if ``match`` is None)."""
        with self._lock:
            gone = [
                i for i, e in self._entries.items()
                if e.kind == kind and not e.pins and (match is None or match(e.key))
            ]
            dropped = [self._entries.pop(i) for i in gone]
        del dropped
        return len(gone)

    def evict_all(self) -> int:
        """Drop every unpinned entry; returns how many went."""
        with self._lock:
            gone = [i for i, e in self._entries.items() if not e.pins]
            dropped = [self._entries.pop(i) for i in gone]
        del dropped
        if gone:
            gc.collect()
        return len(gone)

    # -- internals --------------------------------------------------------------------------

    def _used(self) -> int:
        return sum(e.bytes for e in self._entries.values()) + sum(self._reserved.values())

    def _count(self, kind: str) -> int:
        return sum(1 for i in self._entries if i[0] == kind) + sum(1 for i in self._reserved if i[0] == kind)

    def _victim(self, kind: str | None, keep: Ident | None) -> Ident | None:
        """The least recently used unpinned entry (of ``kind`` if given), other than ``keep``."""
        for ident, e in self._entries.items():
            if not e.pins and ident != keep and (kind is None or e.kind == kind):
                return ident
        return None

    def _make_room(self, kind: str, estimate: int, label: str) -> list[_Entry]:
        """Evict until a new ``kind`` entry of ``estimate`` bytes fits (under the lock)."""
        dropped: list[_Entry] = []
        limit = self.max_count.get(kind)
        while limit is not None and self._count(kind) >= limit:
            victim = self._victim(kind, None)
            if victim is None:
                log.warning("loading %s over the limit of %d loaded %s models: the others are in use",
                            label, limit, kind)
                break
            dropped.append(self._entries.pop(victim))
        while self.max_bytes is not None and self._used() + estimate > self.max_bytes:
            victim = self._victim(None, None)
            if victim is None:
                log.warning("loading %s (~%d MiB) over the %d MiB model budget: everything loaded is in use",
                            label, estimate >> 20, self.max_bytes >> 20)
                break
            dropped.append(self._entries.pop(victim))
        return dropped

    def _shrink(self, keep: Ident | None, kind: str) -> list[_Entry]:
        """Evict back within the budgets after the fact (under the lock), sparing ``keep``."""
        dropped: list[_Entry] = []
        limit = self.max_count.get(kind)
        while limit is not None and self._count(kind) > limit and (victim := self._victim(kind, keep)):
            dropped.append(self._entries.pop(victim))
        while self.max_bytes is not None and self._used() > self.max_bytes and (victim := self._victim(None, keep)):
            dropped.append(self._entries.pop(victim))
        return dropped

    def _hit(self, ident: Ident, pin: bool) -> Any:
        entry = self._entries.get(ident)
        if entry is None:
            return _MISSING
        self._entries.move_to_end(ident)
        if pin:
            entry.pins += 1
        return entry.value

    def _acquire(self, kind: str, key: Hashable, load: Callable[[], T], estimate: int, label: str, pin: bool) -> T:
        ident = (kind, key)
        label = label or str(key)
        with self._lock:
            value = self._hit(ident, pin)
            if value is not _MISSING:
                return value
            gate = self._gates.setdefault(ident, _Gate())
            gate.users += 1
        try:
            with gate.lock:  # one load per key: the others wait and then find it loaded
                with self._lock:
                    value = self._hit(ident, pin)
                    if value is not _MISSING:
                        return value
                    dropped = self._make_room(kind, estimate, label)
                    self._reserved[ident] = estimate
                if dropped:
                    del dropped
                    gc.collect()  # free the evicted weights now, before the new ones arrive
                try:
                    value = load()
                except BaseException:
                    with self._lock:
                        self._reserved.pop(ident, None)
                    raise
                size = measure_bytes(value)
                with self._lock:
                    self._reserved.pop(ident, None)
                    self._entries[ident] = _Entry(kind, key, label, value, estimate if size is None else size,
                                                  1 if pin else 0)
                    dropped = self._shrink(keep=ident, kind=kind)
                del dropped
                return value
        finally:
            with self._lock:
                gate.users -= 1
                if not gate.users:
                    self._gates.pop(ident, None)


_MISSING: Any = object()
