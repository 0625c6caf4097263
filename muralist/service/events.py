"""In-process event hub: worker threads publish job events, HTTP streams (SSE) subscribe.

Every event carries the job's owner; a subscription only ever receives its own user's events
(or all, for an admin), so one user's progress never reaches another user's stream.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Subscription:
    owner: str | None  # None: every user's events (admins)
    job_id: str | None  # None: all of the owner's jobs
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[dict[str, Any]] = field(default_factory=lambda: asyncio.Queue(maxsize=1000))

    def wants(self, event: dict[str, Any]) -> bool:
        return (self.owner is None or event["owner"] == self.owner) and (self.job_id is None or event["job_id"] == self.job_id)


class EventHub:
    def __init__(self) -> None:
        self._subs: dict[int, Subscription] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()

    def subscribe(self, owner: str | None, job_id: str | None = None) -> tuple[int, Subscription]:
        sub = Subscription(owner, job_id, asyncio.get_running_loop())
        with self._lock:
            key = next(self._ids)
            self._subs[key] = sub
        return key, sub

    def unsubscribe(self, key: int) -> None:
        with self._lock:
            self._subs.pop(key, None)

    def publish(self, event: dict[str, Any]) -> None:
        """Thread-safe; ``event`` must have "type", "owner" and "job_id"."""
        with self._lock:
            subs = [s for s in self._subs.values() if s.wants(event)]
        for s in subs:
            try:
                s.loop.call_soon_threadsafe(_put, s.queue, event)
            except RuntimeError:  # the subscriber's loop is closed
                pass


def _put(queue: asyncio.Queue[dict[str, Any]], event: dict[str, Any]) -> None:
    if queue.full():  # a slow reader loses old progress events, never the newest
        queue.get_nowait()
    queue.put_nowait(event)
