"""Workers in the API process: the embedded default of ``muralist serve``.

The dispatcher drives them exactly as it drives Ray actors (same Worker class, same calls), so
there is one scheduling path; only the transport differs. Starting a local Ray instance instead
would cost ~11 s and ~540 MiB before the first job (measured, ../shared/reference/scale-out.md).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

from .worker import Worker


class WorkerLost(Exception):
    """The worker running a job is gone (process or machine died, or it was killed as stalled)."""


class LocalHandle:
    """A Worker object in this process. ``kill()`` cannot stop a thread: it abandons the running job
    (the dispatcher re-queues it) and keeps the worker out of use until that job's thread ends."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.name = worker.name
        self._abandoned = threading.Event()

    def attach(self, owner: str, ttl: float) -> bool:
        return self.worker.attach(owner, ttl)

    def detach(self, owner: str) -> None:
        self.worker.detach(owner)

    def info(self) -> dict[str, Any]:
        info = self.worker.info()
        if self._abandoned.is_set():
            if info["state"] == "idle":
                self._abandoned.clear()
            else:
                info["state"] = "stalled"
        return info

    def run(self, job: dict[str, Any]) -> Iterator[dict[str, Any]]:
        if self._abandoned.is_set():
            raise WorkerLost(f"worker {self.name} is still stuck in an earlier job")
        events = self.worker.run(job)
        for ev in events:
            if self._abandoned.is_set():
                raise WorkerLost(f"worker {self.name} was stopped as stalled")
            yield ev

    def interrupt(self, job_id: str, attempt: int | None = None) -> None:
        self.worker.interrupt(job_id, attempt)

    def skip(self, job_id: str, attempt: int | None = None) -> None:
        self.worker.skip(job_id, attempt)

    def stop_early(self, job_id: str, attempt: int | None = None) -> None:
        self.worker.stop_early(job_id, attempt)

    def kill(self) -> None:
        self._abandoned.set()
        info = self.worker.info()
        if info["job_id"]:
            self.worker.interrupt(info["job_id"])
