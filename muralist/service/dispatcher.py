"""The dispatcher: the one scheduling path from the persistent queue to the workers.

One dispatcher runs in each API process. For every idle worker it owns it claims the next job in
fair order with model affinity (``Store.claim_next``, the database decides), sends it to that
worker, turns the worker's events into live progress, writes the returned PNGs and records them,
and finishes the job, all fenced by the claim's attempt number so that a late result from a worker
presumed dead is dropped. Workers are the same ``Worker`` class in this process (embedded) or Ray
actors on other machines (``--cluster``); the dispatcher cannot tell them apart.

Liveness, never "re-queue everything running at start-up": each running job holds a lease that
its dispatcher renews; a lapsed lease (the API process died) lets any dispatcher re-queue it. A
worker that dies is reported by its transport (``WorkerLost``); one that stops sending events for
``stall_timeout`` seconds is killed by the watchdog. Either way its job is re-queued once more.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import MuralistError
from ..logs import job_extra
from ..paths import write_atomic
from ..workers.local import WorkerLost
from . import inputs
from .store import Job, JobStatus, NewImage
from .training import TRAIN_TYPES

if TYPE_CHECKING:
    from .core import Service

log = logging.getLogger("muralist.dispatcher")

_CONTROL_EVERY = 0.25  # seconds between looks for cancels/skips made through other API processes
_DISCOVER_EVERY = 2.0  # seconds between worker refreshes (membership, loaded models, memory)
_ATTACH_TTL = 10.0  # a worker whose dispatcher was silent this long may be taken over
_INFO_TIMEOUT = 5.0  # seconds a worker gets to answer a refresh
_SAMPLING_TYPES = ("txt2img", "img2img")  # jobs whose progress steps are sampling steps (step-time metric)


@dataclass
class Run:
    job: Job
    started: float = field(default_factory=time.monotonic)
    last_event: float = field(default_factory=time.monotonic)
    reason: str | None = None  # why we interrupted it: "cancel", "stop", "lease" or "stalled"
    abandoned: bool = False  # the watchdog gave up on it: whatever it still sends is ignored
    skips_sent: int = 0
    stop_sent: bool = False
    step_at: tuple[int, int, float] | None = None  # (batch, step, monotonic time) of the last progress event

    def step_time(self, ev: dict[str, Any], now: float) -> tuple[float, int] | None:
        """Seconds and number of sampling steps since the previous progress event of the same
        batch. The first event of a batch is not timed: it includes loading and encoding."""
        last, self.step_at = self.step_at, (ev["batch"], ev["step"], now)
        if last is None or last[0] != ev["batch"] or ev["step"] <= last[1]:
            return None
        return now - last[2], ev["step"] - last[1]


@dataclass
class Slot:
    """The dispatcher's view of one worker."""

    handle: Any
    name: str
    state: str = "idle"  # idle, busy, down (not answering), stalled (killed, coming back)
    info: dict[str, Any] = field(default_factory=dict)
    run: Run | None = None
    loaded: set[str] = field(default_factory=set)
    available: set[str] | None = None

    def view(self) -> dict[str, Any]:
        i = self.info
        return {"name": self.name, "node": i.get("node"), "device": i.get("device"), "pid": i.get("pid"),
                "state": self.state, "job_id": self.run.job.id if self.run else None,
                "loaded_models": sorted(self.loaded), "models": i.get("models", []), "memory": i.get("memory", {}),
                "loads": i.get("loads")}


class Dispatcher:
    def __init__(self, service: Service, discover: Callable[[], list[Any]], instance: str) -> None:
        self.service = service
        self.store = service.store
        self.settings = service.settings
        self.discover = discover
        self.instance = instance
        self.slots: dict[str, Slot] = {}
        self._runs: dict[str, tuple[Slot, Run]] = {}  # job id -> its slot and run
        self._lock = threading.Lock()
        self._kick = threading.Event()
        self._stop = threading.Event()
        self._draining = threading.Event()
        self._workers_known = threading.Event()
        self._asking: dict[str, Any] = {}
        self._pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="muralist-worker-info")
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------- lifecycle

    def start(self) -> None:
        for target, name in ((self._loop, "muralist-dispatcher"), (self._maintain, "muralist-dispatcher-maint"),
                             (self._watch_workers, "muralist-dispatcher-workers")):
            t = threading.Thread(target=target, daemon=True, name=name)
            t.start()
            self._threads.append(t)

    def wake(self) -> None:
        self._kick.set()

    def stop(self, grace: float = 10.0) -> None:
        """Graceful stop: claim nothing more, let running jobs finish for ``grace`` seconds, then
        interrupt and re-queue the rest (not a failure, not canceled; nothing is deleted)."""
        self._draining.set()
        deadline = time.monotonic() + grace
        while self._runs and time.monotonic() < deadline:
            time.sleep(0.05)
        with self._lock:
            left = list(self._runs.values())
        for slot, run in left:
            run.reason = "stop"
            self._safe(slot, lambda s=slot, r=run: s.handle.interrupt(r.job.id, r.job.attempts))
        deadline = time.monotonic() + 5.0
        while self._runs and time.monotonic() < deadline:
            time.sleep(0.05)
        with self._lock:
            left = list(self._runs.values())
        for _slot, run in left:  # a worker that did not stop in time: its late result will be fenced out
            run.abandoned = True
            self._requeue(run, "the server stopped while this job ran", failure=False)
        self._stop.set()
        self._kick.set()
        for slot in list(self.slots.values()):
            self._safe(slot, lambda s=slot: s.handle.detach(self.instance))
        for t in self._threads:
            t.join(5)
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------- requests from the API

    def interrupt(self, job_id: str) -> bool:
        """Interrupt a job this dispatcher runs, because its owner canceled it."""
        return self._control(job_id, "interrupt")

    def skip(self, job_id: str) -> bool:
        return self._control(job_id, "skip")

    def stop_early(self, job_id: str) -> bool:
        """A1111's interrupt: the job ends now and keeps the images made so far."""
        return self._control(job_id, "stop_early")

    def _control(self, job_id: str, action: str) -> bool:
        with self._lock:
            found = self._runs.get(job_id)
        if found is None:
            return False
        self._send(*found, action)
        return True

    def _send(self, slot: Slot, run: Run, action: str) -> None:
        """Deliver interrupt, skip or stop_early to the run's worker, marked as delivered so that
        the poll of running_controls does not deliver it again."""
        if action == "interrupt":
            run.reason = "cancel"
        elif action == "skip":
            run.skips_sent += 1
        else:
            run.stop_sent = True
        self._safe(slot, lambda: getattr(slot.handle, action)(run.job.id, run.job.attempts))

    def workers(self) -> list[dict[str, Any]]:
        return [s.view() for s in sorted(self.slots.values(), key=lambda s: s.name)]

    def loaded_keys(self) -> set[str]:
        return set().union(*(s.loaded for s in self.slots.values())) if self.slots else set()

    # ------------------------------------------------------------- claiming

    def _loop(self) -> None:
        self._workers_known.wait(30)
        while not self._stop.is_set():
            self._kick.wait(1.0)
            self._kick.clear()
            if self._draining.is_set():
                continue
            empty_for: set[frozenset[str] | None] = set()  # model sets for which the queue has nothing
            for slot in list(self.slots.values()):
                avail = None if slot.available is None else frozenset(slot.available)
                if slot.state != "idle" or self._draining.is_set() or avail in empty_for:
                    continue
                try:
                    job = self.store.claim_next(
                        slot.name, slot.loaded, self.settings.affinity_lookahead, self.settings.affinity_max_wait,
                        dispatcher=self.instance, lease=self.settings.lease_seconds, available=avail,
                    )
                except Exception:
                    log.exception("claiming a job failed")
                    break
                if job is None:
                    empty_for.add(avail)  # workers with the same models would find nothing either
                    continue
                run = Run(job)
                slot.state, slot.run = "busy", run
                with self._lock:
                    self._runs[job.id] = (slot, run)
                threading.Thread(target=self._execute, args=(slot, run), daemon=True,
                                 name=f"muralist-run-{job.id[:8]}").start()

    # ------------------------------------------------------------- running

    def _execute(self, slot: Slot, run: Run) -> None:
        job = run.job
        log.info("job %s (%s) started on %s, attempt %d", job.id, job.type, slot.name, job.attempts,
                 extra=job_extra(job.id, job.owner))
        self.service.publish({"type": "started", "owner": job.owner, "job_id": job.id, "worker": slot.name,
                              "steps": int(job.params.get("steps", 0) or 0), "n_iter": int(job.params.get("n_iter", 1) or 1)})
        lost = False
        try:
            try:
                params = inputs.load_inputs(self.service.dirs.root, job.params)
            except MuralistError as e:
                self._failed(run, str(e), user=True)
                return
            payload = {"id": job.id, "attempt": job.attempts, "type": job.type, "params": params, "owner": job.owner,
                       "cancel_requested": job.cancel_requested, "stop_requested": job.stop_requested}
            if job.type in TRAIN_TYPES:
                try:
                    payload.update(self._training_payload(job))
                except MuralistError as e:
                    self._failed(run, str(e), user=True)
                    return
            elif job.type in ("download", "model_info"):
                # Endpoints and tokens travel with the run only: never stored with the job, never shown.
                payload["download_settings"] = self.settings.downloads.to_payload()
            for ev in slot.handle.run(payload):
                run.last_event = time.monotonic()
                if run.abandoned:
                    break
                kind = ev["type"]
                if kind == "progress":
                    if job.type in _SAMPLING_TYPES and (timed := run.step_time(ev, run.last_event)):
                        self.service.metrics.observe_steps(*timed)
                    self.service.publish({**ev, "owner": job.owner, "job_id": job.id})
                elif kind == "file":
                    self._file(run, ev)
                elif kind in ("done", "interrupted", "error"):
                    slot.loaded = set(ev.get("loaded_models", slot.loaded))
                    if "loads" in ev:
                        slot.info = {**slot.info, "loads": ev["loads"]}
                    if kind == "done":
                        self._complete(run, ev)
                    elif kind == "interrupted":
                        self._interrupted(run)
                    else:
                        self._failed(run, ev["message"], user=ev.get("user", False))
                    break
            else:
                if not run.abandoned:
                    raise WorkerLost(f"worker {slot.name} ended job {job.id} without a result")
        except WorkerLost as e:
            lost = True
            if not run.abandoned:
                self._requeue(run, str(e), failure=True)
        except Exception as e:  # unknown trouble: the job is re-run rather than lost, the worker re-checked
            lost = True
            log.error("dispatching job %s failed:\n%s", job.id, traceback.format_exc(), extra=job_extra(job.id, job.owner))
            if not run.abandoned:
                self._requeue(run, f"internal error: {type(e).__name__}: {e}", failure=True)
        finally:
            with self._lock:
                if self._runs.get(job.id, (None, None))[1] is run:
                    del self._runs[job.id]
            if slot.run is run:
                slot.run = None
                if slot.state == "busy":
                    slot.state = "down" if lost else "idle"
            self._kick.set()
            self.service.wake()

    def _complete(self, run: Run, ev: dict[str, Any]) -> None:
        job = run.job
        folder = self.service.dirs.outputs_dir / job.owner / f"{job.type}-images" / date.today().isoformat()
        images: list[NewImage] = []
        try:
            for i, img in enumerate(ev["images"]):
                path = _write_new(folder, img["name"], img["data"])
                rel = str(path.resolve().relative_to(self.service.dirs.root))
                images.append(NewImage(rel, job.owner, img["infotext"], img["seed"], i))
        except BaseException:
            self.service.discard([i.path for i in images])
            raise
        result = {**ev["result"], "images": [i.id for i in images]}
        dropped = self.store.finish(job.id, result, attempt=job.attempts, images=images)
        self.service.discard(dropped)
        now = self.store.get(job.id)
        if now is None or now.attempts != job.attempts:
            log.warning("dropped a late result of job %s (attempt %d): the job was re-run", job.id, job.attempts)
            return
        if now.status.finished:
            inputs.delete_inputs(self.service.dirs.root, job.params)
            shutil.rmtree(self._training_dir(job), ignore_errors=True)
        if now.status is JobStatus.SUCCEEDED and job.type in ("merge", "download"):
            self._refresh_models()  # the API lists the new model at once
        log.info("job %s %s", job.id, now.status.value, extra=job_extra(job.id, job.owner))
        if now.status is JobStatus.SUCCEEDED:
            self.service.publish({"type": "finished", "owner": job.owner, "job_id": job.id, "images": result["images"],
                                  "warnings": result.get("warnings", [])})
        elif now.status is JobStatus.CANCELED:
            self.service.publish({"type": "canceled", "owner": job.owner, "job_id": job.id})

    def _refresh_models(self) -> None:
        """A merged or downloaded model is usable at once: the API's own listings forget their scan."""
        eng = self.service.engine
        eng.registry.refresh()
        eng.loras.refresh()
        eng.embeddings.refresh()

    # ------------------------------------------------------------- training jobs

    def _training_dir(self, job: Job) -> Path:
        return self.service.dirs.root / "training" / job.id

    def _training_payload(self, job: Job) -> dict[str, Any]:
        """The dataset's files (the worker may be on another machine) and the last resume state."""
        from .training import dataset_dir, dataset_files

        folder = dataset_dir(self.service.dirs.root, job.owner, job.params["train_data_dir"])
        if not folder.is_dir():
            raise MuralistError(f"the dataset {job.params['train_data_dir']!r} was deleted before the training ran")
        out: dict[str, Any] = {"dataset": dataset_files(folder)}
        state = self._training_dir(job) / "state.pt"
        if state.is_file():
            out["resume"] = state.read_bytes()
            log.info("job %s resumes training from its saved state", job.id)
        return out

    def _file(self, run: Run, ev: dict[str, Any]) -> None:
        """A file a training run produced: its resume state, a LoRA (epoch, final) and its sidecar
        into ``models/Lora/<user>/``, or an embedding; written atomically."""
        job = run.job
        name = Path(str(ev["name"])).name
        if ev["kind"] == "state":
            target = self._training_dir(job) / "state.pt"
        elif job.type == "train_embedding":
            # The final embedding is usable at once; intermediate ones go where A1111 logs them.
            target = (self.service.dirs.embeddings_dir / job.owner / name if ev["kind"] == "final" else
                      self.service.dirs.outputs_dir / job.owner / "textual_inversion" / job.params["embedding_name"] / name)
        else:
            target = self.service.dirs.lora_dir / job.owner / name
        write_atomic(target, ev["data"])
        if ev["kind"] != "state":
            self.service.engine.loras.refresh()  # usable in prompts at once
            self.service.engine.embeddings.refresh()
            self.service.publish({"type": "saved", "owner": job.owner, "job_id": job.id, "name": target.name,
                                  "epoch": ev.get("epoch", 0)})

    def _interrupted(self, run: Run) -> None:
        job = run.job
        if run.reason == "lease":
            return  # another dispatcher re-queued it; nothing of this run is kept
        current = self.store.get(job.id)
        if run.reason == "cancel" or (current is not None and current.cancel_requested):
            self.service.discard(self.store.mark_canceled(job.id, attempt=job.attempts))
            inputs.delete_inputs(self.service.dirs.root, job.params)
            shutil.rmtree(self._training_dir(job), ignore_errors=True)  # the epoch files stay
            self.service.publish({"type": "canceled", "owner": job.owner, "job_id": job.id})
        else:
            self._requeue(run, "the server stopped while this job ran", failure=False)

    def _failed(self, run: Run, message: str, user: bool) -> None:
        job = run.job
        log.info("job %s failed: %s", job.id, message if user else "internal error", extra=job_extra(job.id, job.owner))
        self.service.discard(self.store.fail(job.id, message, attempt=job.attempts))
        inputs.delete_inputs(self.service.dirs.root, job.params)
        shutil.rmtree(self._training_dir(job), ignore_errors=True)
        self.service.publish({"type": "failed", "owner": job.owner, "job_id": job.id,
                              "error": message if user else "internal error"})

    def _requeue(self, run: Run, reason: str, failure: bool) -> None:
        job = run.job
        try:
            status = self.store.requeue(job.id, job.attempts, reason, self.settings.max_attempts, failure=failure)
        except Exception:
            log.exception("re-queueing job %s failed (its lease will lapse and re-queue it)", job.id)
            return
        if status is None:
            return
        log.warning("job %s attempt %d: %s -> %s", job.id, job.attempts, reason, status, extra=job_extra(job.id, job.owner))
        if status != "queued":
            inputs.delete_inputs(self.service.dirs.root, job.params)
        event = {"queued": "requeued", "failed": "failed", "canceled": "canceled"}[status]
        self.service.publish({"type": event, "owner": job.owner, "job_id": job.id, "reason": reason,
                              **({"error": reason} if status == "failed" else {})})
        if status == "queued":
            self.service.wake()

    # ------------------------------------------------------------- upkeep

    def _maintain(self) -> None:
        last_renew = last_expire = last_prune = time.monotonic()
        renew_every = max(0.2, min(self.settings.lease_seconds / 3, 5.0))
        while not self._stop.wait(_CONTROL_EVERY):
            now = time.monotonic()
            try:
                if self._runs:
                    self._deliver_controls()
                    self._watchdog(now)
                if now - last_renew >= renew_every:
                    last_renew = now
                    self._renew()
                if now - last_expire >= renew_every:
                    last_expire = now
                    requeued, failed = self.store.expire_leases(self.settings.max_attempts)
                    if requeued or failed:
                        log.warning("jobs of a stopped API process: %d re-queued, %d failed", requeued, failed)
                        self.service.wake()
                if now - last_prune >= 30:
                    last_prune = now
                    self.store.prune_events(time.time() - 120)
            except Exception:
                log.exception("dispatcher upkeep failed")

    def _renew(self) -> None:
        with self._lock:
            runs = {job_id: pair for job_id, pair in self._runs.items() if not pair[1].abandoned}
        held = self.store.renew_leases(self.instance, list(runs), self.settings.lease_seconds)
        for job_id, (slot, run) in runs.items():
            if job_id not in held and run.reason is None and self._runs.get(job_id, (None, None))[1] is run:
                # Re-queued or ended by someone else (our lease lapsed): stop working on it.
                run.reason = "lease"
                self._safe(slot, lambda s=slot, r=run: s.handle.interrupt(r.job.id, r.job.attempts))

    def _deliver_controls(self) -> None:
        for job_id, attempt, cancel, skips, stop in self.store.running_controls(self.instance):
            found = self._runs.get(job_id)
            if found is None or found[1].job.attempts != attempt:
                continue
            slot, run = found
            if cancel and run.reason is None:
                self._send(slot, run, "interrupt")
            if stop and not run.stop_sent:
                self._send(slot, run, "stop_early")
            while run.skips_sent < skips:
                self._send(slot, run, "skip")

    def _watchdog(self, now: float) -> None:
        timeout = self.settings.stall_timeout
        with self._lock:
            runs = list(self._runs.values())
        for slot, run in runs:
            if run.abandoned or now - run.last_event <= timeout:
                continue
            run.abandoned, run.reason = True, "stalled"
            log.error("worker %s sent nothing for %.0f s while running job %s: killing it", slot.name, now - run.last_event, run.job.id)
            slot.state = "stalled"
            self._safe(slot, slot.handle.kill)
            self._requeue(run, f"worker {slot.name} stalled (no progress for {timeout:g} s)", failure=True)
            with self._lock:
                if self._runs.get(run.job.id, (None, None))[1] is run:
                    del self._runs[run.job.id]
            self._kick.set()

    def _watch_workers(self) -> None:
        """Membership, loaded models and memory of every worker, refreshed in its own thread: a
        worker that does not answer (a paused process) must not hold up the watchdog."""
        while True:
            try:
                self._refresh_workers()
            except Exception:
                log.exception("refreshing workers failed")
            self._workers_known.set()
            if self._stop.wait(_DISCOVER_EVERY):
                return

    def _refresh_workers(self) -> None:
        try:
            handles = self.discover()
        except Exception as e:
            log.warning("finding workers failed: %s", e)
            return

        def ask(handle: Any) -> dict[str, Any] | None:
            return handle.info() if handle.attach(self.instance, _ATTACH_TTL) else None

        # A worker still busy answering the previous round is not asked again (no pile-up).
        asked = {h.name: (h, f if (f := self._asking.get(h.name)) is not None and not f.done() else self._pool.submit(ask, h))
                 for h in handles}
        self._asking = {name: f for name, (_h, f) in asked.items()}
        wait([f for _h, f in asked.values()], timeout=_INFO_TIMEOUT)
        for name, (handle, future) in asked.items():
            slot = self.slots.get(name) or Slot(handle, name, state="down")
            if not future.done() or future.exception() is not None:
                if slot.run is None:  # not answering; if it runs a job, the watchdog decides
                    slot.state = "down"
                self.slots[name] = slot
                continue
            info = future.result()
            if info is None:  # another API process drives it now
                if slot.run is None:
                    self.slots.pop(name, None)
                continue
            slot.info = info
            if slot.run is None:
                slot.loaded = set(info.get("loaded_models", []))
                if info.get("job_id"):  # still busy with a job no dispatcher is waiting for
                    self._safe(slot, lambda s=slot, i=info: s.handle.interrupt(i["job_id"], i.get("attempt")))
                    slot.state = "stalled" if info.get("state") == "stalled" else "down"
                elif info.get("state") == "stalled":
                    slot.state = "stalled"
                else:
                    if slot.state != "idle":
                        self._kick.set()
                    slot.state = "idle"
            avail = info.get("available")
            slot.available = None if avail is None else set(avail)
            self.slots[name] = slot
        for name in list(self.slots):
            if name not in asked and self.slots[name].run is None:
                del self.slots[name]

    def _safe(self, slot: Slot, call: Callable[[], Any]) -> None:
        try:
            call()
        except Exception as e:  # the worker is gone; its run ends with WorkerLost
            log.warning("worker %s: %s", slot.name, e)


_LEADING_NUMBER = re.compile(r"^\d+")


def _write_new(folder: Path, name: str, data: bytes) -> Path:
    """Write an image under A1111's next free number (``00012-<seed>.png``). Written under a temporary
    name, then hard-linked to its final name, which fails if that name exists: readers never see a
    half-written file, and two jobs (or two API processes) writing at once never take the same name."""
    from ..engine.engine import next_sequence_number

    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".incoming-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        number = next_sequence_number(folder)
        while True:
            path = folder / _LEADING_NUMBER.sub(f"{number:05d}", name, count=1)
            try:
                os.link(tmp, path)
                return path
            except FileExistsError:
                number += 1
    finally:
        os.unlink(tmp)
