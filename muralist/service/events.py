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


class EventRelay:
    """Job events between API processes sharing one database: a client connected to any of them
    follows its jobs wherever they run. Events are written in small batches off the hot path and
    read back by the other processes every ``poll`` seconds; progress without a preview is thinned
    to one per job every ``progress_every`` seconds (it is superseded by the next one anyway)."""

    def __init__(self, store: Any, instance: str, deliver: Any, poll: float = 0.2, progress_every: float = 0.25) -> None:
        import queue

        self.store = store
        self.instance = instance
        self.deliver = deliver
        self.poll = poll
        self.progress_every = progress_every
        self._out: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
        self._last_progress: dict[str, float] = {}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def send(self, event: dict[str, Any]) -> None:
        import time

        if event["type"] == "progress" and "preview" not in event:
            now = time.monotonic()
            if now - self._last_progress.get(event["job_id"], 0.0) < self.progress_every:
                return
            self._last_progress[event["job_id"]] = now
        elif event["type"] in ("finished", "failed", "canceled", "requeued"):
            self._last_progress.pop(event["job_id"], None)
        self._out.put(event)

    def start(self) -> None:
        for target in (self._write, self._read):
            t = threading.Thread(target=target, daemon=True, name=f"muralist-relay-{target.__name__[1:]}")
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(5)
        self._flush()

    def _flush(self) -> None:
        batch = []
        while not self._out.empty():
            batch.append(self._out.get())
        if batch:
            self.store.add_events(self.instance, batch)

    def _write(self) -> None:
        import logging

        while not self._stop.wait(0.1):
            try:
                self._flush()
            except Exception:  # the database is away: those events are lost, the jobs are not
                logging.getLogger("muralist.events").exception("relaying events failed")

    def _read(self) -> None:
        import logging

        last = None
        while not self._stop.wait(self.poll):
            try:
                last, events = self.store.events_since(last, self.instance)
            except Exception:
                logging.getLogger("muralist.events").exception("reading relayed events failed")
                continue
            for ev in events:
                self.deliver(ev)
