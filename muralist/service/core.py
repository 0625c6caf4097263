"""The job service: validates and queues requests, tracks live progress, owns the dispatcher.

Entry points (native API, A1111 API, web UI) call ``Service.submit`` with the caller's user and
the same request model the CLI builds; the dispatcher (``dispatcher.py``) takes jobs from the
persistent store in fair order and runs them on workers, in this process or on a Ray cluster.
Interrupt/skip/progress are per job, never global.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from ..errors import ForbiddenError, InvalidRequestError
from ..models.download import DownloadSettings
from ..paths import DataDirs
from ..request import GenerationRequest, parse_request
from . import costs, inputs
from .events import EventHub, EventRelay
from .store import Job, JobStatus, LimitError, Store, User

log = logging.getLogger("muralist.service")

JOB_TYPES = ("txt2img", "img2img", "extras", "interrogate", "train_lora", "train_embedding", "merge", "download", "model_info")


@dataclass
class Limits:
    """Per-user limits (a user's own ``limits`` override these)."""

    max_queued: int = 50
    max_pixels: int = 2048 * 2048
    max_steps: int = 150
    max_batch_size: int = 8
    max_images: int = 64  # batch_size * n_iter
    max_prompt_chars: int = 20000  # each prompt; encoding cost grows with length (1 MB took 37 s)
    # Pixels x steps summed over every image and pass of one job (hires, cells, tiles): its GPU time.
    # 1e10 is e.g. 8 SDXL images at 1024x1024, 40 steps, with a 2x hires fix, ten times over.
    max_work: int = 10**10
    max_train_steps: int = 20000  # optimizer steps of one training job
    max_trainings: int = 1  # training jobs queued or running at once
    max_dataset_bytes: int = 2 * 2**30  # one dataset, unpacked
    # Download jobs queued or running at once. 0: only admins download (a download writes multi-GB
    # files into folders every user's jobs load from); an admin raises it for trusted users.
    max_downloads: int = 0

    @classmethod
    def check_overrides(cls, update: dict[str, Any]) -> dict[str, int | None]:
        """An admin's change to one user's limits: known names, whole numbers ≥ 0 (None: back to the default)."""
        if not isinstance(update, dict) or not update:
            raise InvalidRequestError(f"give limits as an object, e.g. {{\"max_queued\": 10}}; limits: {', '.join(cls.__dataclass_fields__)}")
        out: dict[str, int | None] = {}
        for k, v in update.items():
            if k not in cls.__dataclass_fields__:
                raise InvalidRequestError(f"unknown limit {k!r}; limits: {', '.join(cls.__dataclass_fields__)}")
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise InvalidRequestError(f"limit {k}: {v!r} is not a whole number ≥ 0 (null restores the default)")
            out[k] = v
        return out

    def merged(self, overrides: dict[str, Any]) -> Limits:
        known = {k: int(v) for k, v in overrides.items() if k in self.__dataclass_fields__}
        return Limits(**{**self.__dict__, **known})


@dataclass
class Live:
    """Live state of a running job (in memory: it changes every step)."""

    job_id: str
    owner: str
    step: int = 0
    steps: int = 0
    batch: int = 0
    n_iter: int = 1
    fraction: float = 0.0
    eta: float | None = None
    started: float = field(default_factory=time.time)
    preview: str | None = None  # base64 PNG
    preview_id: int = 0
    worker: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)  # e.g. a download's bytes, total and speed


@dataclass
class Settings:
    workers: int = 1
    device: str | None = None
    limits: Limits = field(default_factory=Limits)
    preview_every: int = 5  # steps between live previews (0: none)
    max_loaded_models: int = 2
    max_model_bytes: int | None = None  # weights budget of the model cache
    affinity_lookahead: int = 4
    affinity_max_wait: float = 60.0
    keep_days: float | None = 30.0  # finished jobs and their images are pruned after this; None: keep all
    devices: list[str] | None = None  # local workers' devices (default: ``device`` for each of ``workers``)
    cluster: str | None = None  # HOST:PORT of a Ray cluster whose worker actors run the jobs
    lease_seconds: float = 30.0  # a running job's lease; renewed by its dispatcher, re-queued once lapsed
    stall_timeout: float = 300.0  # seconds without any event (step) from a worker before it is killed
    max_attempts: int = 2  # lost runs (worker died or stalled) after which a job fails
    grace: float = 10.0  # on stop, seconds running jobs get to finish before they are re-queued
    # Download jobs: endpoints, tokens (never shown) and the size cap; the environment fills the rest.
    downloads: DownloadSettings = field(default_factory=DownloadSettings.from_env)


class Service:
    def __init__(self, dirs: DataDirs, store: Store, settings: Settings | None = None) -> None:
        self.dirs = dirs
        self.store = store
        self.settings = settings or Settings()
        self.hub = EventHub()
        self.live: dict[str, Live] = {}
        self._engine: Any = None
        self._engine_lock = threading.Lock()
        self._stop = threading.Event()
        self.instance = uuid.uuid4().hex[:8]
        self.dispatcher: Any = None
        self.relay = EventRelay(store, self.instance, lambda ev: self.publish(ev, relay=False))
        self._counts: dict[str, int] = {}
        self._counts_at = 0.0
        from .metrics import Metrics

        self.metrics = Metrics(self)

    # ------------------------------------------------------------- engine (heavy imports live here)

    @property
    def engine(self) -> Any:
        with self._engine_lock:
            if self._engine is None:
                from ..engine.engine import Engine, ModelCache

                cache = ModelCache(max_models=self.settings.max_loaded_models, device=self.settings.device,
                                   max_bytes=self.settings.max_model_bytes)
                self._engine = Engine(self.dirs, cache=cache)
            return self._engine

    # ------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Start the dispatcher and its workers. Nothing already running is touched: jobs of a
        process that died are re-queued when their leases lapse, by whichever dispatcher sees it."""
        from ..workers.local import LocalHandle

        # Import torch/diffusers and scan the model folders in the background, so the port opens
        # at once and the first request does not pay for it.
        threading.Thread(target=lambda: self.engine.registry.checkpoints(), daemon=True, name="muralist-warmup").start()
        if self.settings.keep_days is not None:
            threading.Thread(target=self._maintenance, daemon=True, name="muralist-prune").start()
        if self.settings.cluster:
            from ..workers.ray_cluster import RayDiscovery

            discover: Any = RayDiscovery(self.settings.cluster)
        else:
            handles = [LocalHandle(w) for w in self._local_workers()]
            discover = lambda: handles  # noqa: E731
        from .dispatcher import Dispatcher

        self.dispatcher = Dispatcher(self, discover, self.instance)
        self.relay.start()
        self.dispatcher.start()

    def _local_workers(self) -> list[Any]:
        """In-process workers: one engine (one model manager) per device, shared by that device's workers."""
        import socket

        from ..workers.worker import Worker

        devices = self.settings.devices or [self.settings.device] * self.settings.workers
        engines: dict[str | None, Any] = {}
        workers = []
        for i, device in enumerate(devices):
            if device not in engines:
                engines[device] = self.engine if device == self.settings.device else self._engine_for(device)
            # Same folders as the API, which validated the job: no need to report what they hold.
            workers.append(Worker(f"{socket.gethostname()}-{self.instance}-w{i}", engine=engines[device],
                                  preview_every=self.settings.preview_every, report_available=False))
        return workers

    def _engine_for(self, device: str | None) -> Any:
        from ..engine.engine import Engine, ModelCache

        cache = ModelCache(max_models=self.settings.max_loaded_models, device=device, max_bytes=self.settings.max_model_bytes)
        return Engine(self.dirs, registry=self.engine.registry, cache=cache)

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def stop(self, timeout: float | None = None) -> None:
        """Graceful stop: running jobs get ``settings.grace`` seconds to finish, the rest are
        re-queued (never canceled); queued jobs stay queued."""
        self._stop.set()
        if self.dispatcher is not None:
            self.dispatcher.stop(self.settings.grace if timeout is None else timeout)
        self.relay.stop()

    def wake(self) -> None:
        if self.dispatcher is not None:
            self.dispatcher.wake()

    def publish(self, event: dict[str, Any], relay: bool = True) -> None:
        """Apply a job event to the live state and send it to subscribers (and, for events of this
        process, to the other API processes)."""
        kind, job_id = event["type"], event["job_id"]
        if kind == "started":
            self.live[job_id] = Live(job_id, event["owner"], steps=event.get("steps", 0), n_iter=event.get("n_iter", 1),
                                     worker=event.get("worker"))
        elif kind == "progress":
            live = self.live.get(job_id)
            if live is not None:
                live.step, live.steps, live.batch, live.n_iter = event["step"], event["steps"], event["batch"], event["n_iter"]
                live.fraction, live.eta = event["progress"], event["eta"]
                live.detail = {k: event[k] for k in ("bytes", "total", "speed") if k in event}
                if event.get("preview"):
                    live.preview = event["preview"]
                    live.preview_id += 1
        elif kind in ("finished", "failed", "canceled", "requeued"):
            self.live.pop(job_id, None)
        self.hub.publish(event)
        if relay:
            self.relay.send(event)

    # ------------------------------------------------------------- requests

    def validate(self, user: User, job_type: str, params: dict[str, Any]) -> tuple[GenerationRequest, str | None]:
        """The request model and the checkpoint key it needs; raises a MuralistError naming the problem."""
        if job_type not in JOB_TYPES:
            raise InvalidRequestError(f"type: unknown job type {job_type!r}; supported: {', '.join(JOB_TYPES)}")
        defaults = {k: v for k, v in user.options.items() if k in GenerationRequest.model_fields}
        req = parse_request({**defaults, **params})
        if job_type == "img2img" and not req.init_images:
            raise InvalidRequestError("init_images: img2img needs at least one image (base64 PNG/JPEG/WEBP)")
        if job_type == "txt2img" and req.init_images:
            raise InvalidRequestError("init_images: send images with type img2img, not txt2img")
        if req.init_images:
            from ..engine.images import decode_image

            for i, data in enumerate(req.init_images):  # refuse a bad image now, not when the job runs
                decode_image(data, f"init_images[{i}]")
            if req.mask is not None:
                decode_image(req.mask, "mask")
        limits = self.settings.limits.merged(user.limits)
        for name in ("prompt", "negative_prompt", "hr_prompt", "hr_negative_prompt"):
            if len(getattr(req, name) or "") > limits.max_prompt_chars:
                raise InvalidRequestError(f"{name}: {len(getattr(req, name))} characters is over your limit of "
                                          f"max_prompt_chars={limits.max_prompt_chars}")
        if req.batch_size > limits.max_batch_size:
            raise InvalidRequestError(f"batch_size: {req.batch_size} is over your limit of {limits.max_batch_size}")
        from ..engine import samplers

        samplers.resolve(req.sampler_name, req.scheduler)
        eng = self.engine
        eng.check_upscaler(req)
        req = eng.check_controlnet(req)
        # The whole plan (scripts' cells and tiles, hires and outpainting passes) against the limits;
        # scripts' axis values are checked on the way, before anything runs.
        costs.check(costs.generation_cost(eng, req), limits)
        info = eng.resolve_model(req)
        if req.vae:
            eng.registry.find_vae(req.vae)
        # Pin the exact checkpoint now: a later rescan or default change can't alter a queued job.
        req = req.model_copy(update={"model": info.title})
        return req, info.sha256

    def active_jobs(self, user: User, types: tuple[str, ...]) -> int:
        """How many of ``user``'s jobs of these types are queued or running (per-kind limits)."""
        return sum(j.type in types for j in self.store.list_jobs(user.name, [JobStatus.QUEUED, JobStatus.RUNNING]))

    def _check_download_allowed(self, user: User) -> None:
        limits = self.settings.limits.merged(user.limits)
        if limits.max_downloads <= 0:
            raise ForbiddenError("download: only admins, or users an admin allows "
                                 f"(muralist users limits {user.name} max_downloads=1)")
        if self.active_jobs(user, ("download",)) >= limits.max_downloads:
            raise LimitError(f"you already have {limits.max_downloads} download job(s) queued or running (max_downloads)")

    def submit(self, user: User, job_type: str, params: dict[str, Any], priority: int = 0, job_id: str | None = None) -> Job:
        if job_type == "download":
            from ..models.download import parse_params

            stored = parse_params(params)
            if not user.admin:
                self._check_download_allowed(user)
            return self._enqueue(user, job_type, stored, priority, job_id)
        if job_type == "model_info":
            from ..models.cards import parse_params as parse_info
            from ..models.cards import targets

            # Admins only: the job writes sidecar files into model folders every user shares.
            if not user.admin:
                raise ForbiddenError("model_info: only admins can fetch model cards")
            stored = parse_info(params)
            if not stored.get("all"):
                targets(self.engine, stored)  # a missing model is named now, not when the job runs
            return self._enqueue(user, job_type, stored, priority, job_id)
        if job_type in ("train_lora", "train_embedding"):
            from . import training

            check = training.validate if job_type == "train_lora" else training.validate_embedding
            stored, model_key = check(self, user, params)
            return self._enqueue(user, job_type, stored, priority, job_id, model_key)
        if job_type == "merge":
            from ..models.merge import check_params

            if not user.admin:
                raise ForbiddenError("merge: only admins can merge checkpoints (the result is visible to every user)")
            stored = check_params(self.engine.registry, params)
            # Placed on a worker that has the primary model; the merge itself loads no model.
            primary = self.engine.registry.find_checkpoint(stored["primary"])
            return self._enqueue(user, job_type, stored, priority, job_id, primary.sha256)
        if job_type == "interrogate":
            from ..engine.images import decode_image

            if not params.get("image"):
                raise InvalidRequestError("image: a base64 image is required")
            decode_image(params["image"])
            self.engine.interrogator.model_dir()  # no captioning model: say so now, not when the job runs
            return self._enqueue(user, job_type, {"image": params["image"]}, priority, job_id)
        if job_type == "extras":
            from ..engine.images import decode_image
            from ..upscale.extras import parse_extras

            ereq = parse_extras(params)
            for i, data in enumerate(ereq.images):
                decode_image(data, f"image[{i}]")
            costs.check(costs.extras_cost(ereq), self.settings.limits.merged(user.limits))
            for name in {ereq.upscaler_1, ereq.upscaler_2}:
                self.engine.upscalers.find(name)
            # Missing face weights: say which file to put where now, not when the job runs.
            for model, visibility in (("GFPGAN", ereq.gfpgan_visibility), ("CodeFormer", ereq.codeformer_visibility)):
                if visibility > 0:
                    self.engine.faces.find(model)
            return self._enqueue(user, job_type, ereq.model_dump(), priority, job_id)
        req, model_key = self.validate(user, job_type, params)
        return self._enqueue(user, job_type, req.model_dump(), priority, job_id, model_key)

    def _enqueue(self, user: User, job_type: str, params: dict[str, Any], priority: int, job_id: str | None,
                 model_key: str | None = None) -> Job:
        """Store a validated job within the user's queue limit, announce it and wake a worker."""
        limits = self.settings.limits.merged(user.limits)
        if job_id is not None and (other := self.store.get(job_id)) is not None and other.owner != user.name:
            job_id = None  # another user's id (A1111's force_task_id): a new id, and nothing about theirs
        params = inputs.store_inputs(self.dirs.root, user.name, params)  # images as files, not in the row
        try:
            job = self.store.submit(user.name, job_type, params, priority=priority, model_key=model_key, job_id=job_id,
                                    max_queued=limits.max_queued)
        except BaseException:
            inputs.delete_inputs(self.dirs.root, params)
            raise
        self.publish({"type": "queued", "owner": job.owner, "job_id": job.id, "position": self.store.position(job.id)})
        self.wake()
        return job

    def cancel(self, job: Job) -> Job:
        """Cancel a queued job at once; a running one is interrupted wherever it runs (its own
        dispatcher delivers the request, also when another API process runs it)."""
        updated = self.store.request_cancel(job.id) or job
        if self.dispatcher is not None:
            self.dispatcher.interrupt(job.id)
        if updated.status is JobStatus.CANCELED:
            if job.status is JobStatus.QUEUED:  # never ran: no dispatcher will clean up after it
                inputs.delete_inputs(self.dirs.root, updated.params)
            self.publish({"type": "canceled", "owner": job.owner, "job_id": job.id})
        return updated

    def queued_count(self, owner: str, max_age: float = 0.5) -> int:
        """The owner's queued jobs, from a per-service cache refreshed at most every ``max_age`` s."""
        now = time.monotonic()
        if now - self._counts_at > max_age:
            self._counts = self.store.queue_counts()
            self._counts_at = now
        return self._counts.get(owner, 0)

    def skip(self, job: Job) -> bool:
        """Skip the running job's current image batch (A1111's skip); False if it is not running."""
        if not self.store.request_skip(job.id):
            return False
        if self.dispatcher is not None:
            self.dispatcher.skip(job.id)
        return True

    def interrupt(self, job: Job) -> bool:
        """A1111's interrupt: the running job ends now and keeps the images made so far (partial
        ones included); False if it is not running. ``cancel`` is the one that discards."""
        if not self.store.request_stop(job.id):
            return False
        if self.dispatcher is not None:
            self.dispatcher.stop_early(job.id)
        return True

    # ------------------------------------------------------------- workers

    def loaded_keys(self) -> set[str]:
        """sha256 of the checkpoints the workers hold."""
        return self.dispatcher.loaded_keys() if self.dispatcher is not None else set()

    def loaded_models(self) -> list[str]:
        """Titles of the checkpoints the workers hold."""
        keys = self.loaded_keys()
        return [c.title for c in self.engine.registry.checkpoints() if c.sha256 in keys] if keys else []

    def workers(self) -> list[dict[str, Any]]:
        return self.dispatcher.workers() if self.dispatcher is not None else []

    def prune(self) -> int:
        """Delete finished jobs older than ``keep_days``, with their image files."""
        assert self.settings.keep_days is not None
        count, paths = self.store.prune(time.time() - self.settings.keep_days * 86400)
        self.discard(paths)
        return count

    def _maintenance(self) -> None:
        while not self._stop.is_set():
            try:
                if n := self.prune():
                    log.info("pruned %d finished jobs older than %g days", n, self.settings.keep_days)
                assert self.settings.keep_days is not None
                inputs.prune_inputs(self.dirs.root, time.time() - self.settings.keep_days * 86400)
            except Exception:
                log.exception("pruning history failed")
            self._stop.wait(3600)

    def discard(self, paths: list[str]) -> None:
        """Delete the files of images a canceled or failed job no longer keeps."""
        for rel in paths:
            (self.dirs.root / rel).unlink(missing_ok=True)


__all__ = ["Service", "Settings", "Limits", "LimitError", "Live"]
