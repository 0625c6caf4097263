"""The job service: validates and queues requests, runs workers, tracks live progress.

Entry points (native API, A1111 API, web UI) call ``Service.submit`` with the caller's user and
the same request model the CLI builds; workers take jobs from the persistent store in fair order
and run them on the engine. Interrupt/skip/progress are per job, never global.
"""

from __future__ import annotations

import base64
import io
import logging
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InvalidRequestError, MuralistError
from ..paths import DataDirs
from ..request import GenerationRequest, parse_request
from .events import EventHub
from .store import Job, JobStatus, LimitError, Store, User

log = logging.getLogger("muralist.service")

JOB_TYPES = ("txt2img", "img2img", "extras", "interrogate")


@dataclass
class Limits:
    """Per-user limits (a user's own ``limits`` override these)."""

    max_queued: int = 50
    max_pixels: int = 2048 * 2048
    max_steps: int = 150
    max_batch_size: int = 8
    max_images: int = 64  # batch_size * n_iter

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
    control: Any = None  # the job's JobControl


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


class Service:
    def __init__(self, dirs: DataDirs, store: Store, settings: Settings | None = None) -> None:
        self.dirs = dirs
        self.store = store
        self.settings = settings or Settings()
        self.hub = EventHub()
        self.live: dict[str, Live] = {}
        self._engine: Any = None
        self._engine_lock = threading.Lock()
        self._wake = threading.Condition()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.instance = uuid.uuid4().hex[:8]
        from ..interrogate import Interrogator

        self.interrogator = Interrogator(dirs)
        self._counts: dict[str, int] = {}
        self._counts_at = 0.0

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
        requeued, failed = self.store.recover()
        if requeued or failed:
            log.warning("recovered jobs interrupted by a stop: %d re-queued, %d failed", requeued, failed)
        # Import torch/diffusers and scan the model folders in the background, so the port opens
        # at once and the first request does not pay for it.
        threading.Thread(target=lambda: self.engine.registry.checkpoints(), daemon=True, name="muralist-warmup").start()
        if self.settings.keep_days is not None:
            threading.Thread(target=self._maintenance, daemon=True, name="muralist-prune").start()
        for i in range(self.settings.workers):
            t = threading.Thread(target=self._worker, args=(f"{self.instance}-w{i}",), daemon=True, name=f"muralist-worker-{i}")
            t.start()
            self._threads.append(t)

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        for live in list(self.live.values()):
            if live.control is not None:
                live.control.interrupt()
        with self._wake:
            self._wake.notify_all()
        for t in self._threads:
            t.join(timeout)

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
        if req.width * req.height > limits.max_pixels:
            raise InvalidRequestError(f"width x height: {req.width}x{req.height} is over your limit of {limits.max_pixels} pixels")
        if req.steps > limits.max_steps:
            raise InvalidRequestError(f"steps: {req.steps} is over your limit of {limits.max_steps}")
        if req.batch_size > limits.max_batch_size:
            raise InvalidRequestError(f"batch_size: {req.batch_size} is over your limit of {limits.max_batch_size}")
        if req.total_images > limits.max_images:
            raise InvalidRequestError(f"batch_size x n_iter: {req.total_images} images is over your limit of {limits.max_images}")
        from ..engine import samplers

        samplers.resolve(req.sampler_name, req.scheduler)
        eng = self.engine
        eng.check_upscaler(req)
        if req.script_name:
            eng.script(req)  # every axis value is checked now, not when the job runs
        info = eng.resolve_model(req)
        if req.vae:
            eng.registry.find_vae(req.vae)
        # Pin the exact checkpoint now: a later rescan or default change can't alter a queued job.
        req = req.model_copy(update={"model": info.title})
        return req, info.sha256

    def submit(self, user: User, job_type: str, params: dict[str, Any], priority: int = 0, job_id: str | None = None) -> Job:
        if job_type == "interrogate":
            from ..engine.images import decode_image

            if not params.get("image"):
                raise InvalidRequestError("image: a base64 image is required")
            decode_image(params["image"])
            self.interrogator.model_dir()  # no captioning model: say so now, not when the job runs
            return self._enqueue(user, job_type, {"image": params["image"]}, priority, job_id)
        if job_type == "extras":
            from ..engine.images import decode_image
            from ..upscale.extras import parse_extras

            ereq = parse_extras(params)
            for i, data in enumerate(ereq.images):
                decode_image(data, f"image[{i}]")
            for name in {ereq.upscaler_1, ereq.upscaler_2}:
                self.engine.upscalers.find(name)
            return self._enqueue(user, job_type, ereq.model_dump(), priority, job_id)
        req, model_key = self.validate(user, job_type, params)
        return self._enqueue(user, job_type, req.model_dump(), priority, job_id, model_key)

    def _enqueue(self, user: User, job_type: str, params: dict[str, Any], priority: int, job_id: str | None,
                 model_key: str | None = None) -> Job:
        """Store a validated job within the user's queue limit, announce it and wake a worker."""
        limits = self.settings.limits.merged(user.limits)
        job = self.store.submit(user.name, job_type, params, priority=priority, model_key=model_key, job_id=job_id,
                                max_queued=limits.max_queued)
        self.hub.publish({"type": "queued", "owner": job.owner, "job_id": job.id, "position": self.store.position(job.id)})
        with self._wake:
            self._wake.notify()
        return job

    def cancel(self, job: Job) -> Job:
        updated = self.store.request_cancel(job.id) or job
        live = self.live.get(job.id)
        if live is not None and live.control is not None:
            live.control.interrupt()
        if updated.status is JobStatus.CANCELED:
            self.hub.publish({"type": "canceled", "owner": job.owner, "job_id": job.id})
        return updated

    def queued_count(self, owner: str, max_age: float = 0.5) -> int:
        """The owner's queued jobs, from a per-service cache refreshed at most every ``max_age`` s."""
        now = time.monotonic()
        if now - self._counts_at > max_age:
            self._counts = self.store.queue_counts()
            self._counts_at = now
        return self._counts.get(owner, 0)

    def skip(self, job: Job) -> bool:
        live = self.live.get(job.id)
        if live is None or live.control is None:
            return False
        live.control.skip()
        return True

    # ------------------------------------------------------------- workers

    def loaded_models(self) -> list[str]:
        """Titles of the checkpoints in the model cache (none before the engine has started)."""
        keys = self._loaded_keys()
        return [c.title for c in self._engine.registry.checkpoints() if c.sha256 in keys] if keys else []

    def _loaded_keys(self) -> set[str]:
        if self._engine is None:
            return set()
        return {sha for _path, sha in self._engine.cache.loaded()}

    def _worker(self, name: str) -> None:
        while not self._stop.is_set():
            try:
                job = self.store.claim_next(
                    name, self._loaded_keys(), self.settings.affinity_lookahead, self.settings.affinity_max_wait
                )
            except Exception:
                log.exception("claiming a job failed")
                job = None
            if job is None:
                with self._wake:
                    self._wake.wait(timeout=1.0)
                continue
            self._run(job)

    def _run(self, job: Job) -> None:
        from ..engine.txt2img import Interrupted, JobControl

        control = JobControl()
        live = Live(job.id, job.owner, steps=int(job.params.get("steps", 0)), n_iter=int(job.params.get("n_iter", 1)), control=control)
        self.live[job.id] = live
        self.hub.publish({"type": "started", "owner": job.owner, "job_id": job.id})
        try:
            if job.cancel_requested:
                control.interrupt()
            out_dir = self.dirs.outputs_dir / job.owner / f"{job.type}-images" / time.strftime("%Y-%m-%d")
            if job.type == "interrogate":
                from ..engine.images import decode_image

                caption = self.interrogator.caption(decode_image(job.params["image"]))
                self.store.finish(job.id, {"caption": caption, "images": [], "infotexts": [], "seeds": [], "warnings": []})
                self.hub.publish({"type": "finished", "owner": job.owner, "job_id": job.id, "images": [], "warnings": []})
                return
            if job.type == "extras":
                saved = self._run_extras(job, out_dir)
            else:
                req = GenerationRequest.model_validate(job.params)
                saved = self.engine.generate(req, control=control, progress=lambda p: self._progress(live, p), save_to=out_dir)
            images = []
            for i, (path, text, seed) in enumerate(zip(saved.paths, saved.result.infotexts, saved.result.seeds, strict=True)):
                rel = str(Path(path).resolve().relative_to(self.dirs.root))
                images.append(self.store.add_image(job.id, job.owner, rel, text, seed, i).id)
            result = {
                "images": images,
                "infotexts": saved.result.infotexts,
                "seeds": saved.result.seeds,
                "subseeds": saved.result.subseeds,
                "warnings": saved.result.warnings,
                "model": saved.model.title if saved.model else None,
            }
            self._discard(self.store.finish(job.id, result))  # canceled meanwhile: its images go
            self.hub.publish({"type": "finished", "owner": job.owner, "job_id": job.id, "images": images, "warnings": saved.result.warnings})
        except Interrupted:
            self._discard(self.store.mark_canceled(job.id))
            self.hub.publish({"type": "canceled", "owner": job.owner, "job_id": job.id})
        except MuralistError as e:
            self._discard(self.store.fail(job.id, str(e)))
            self.hub.publish({"type": "failed", "owner": job.owner, "job_id": job.id, "error": str(e)})
        except Exception as e:  # a bug or an out-of-memory: the job fails, the worker lives on
            log.error("job %s failed:\n%s", job.id, traceback.format_exc())
            self._discard(self.store.fail(job.id, f"internal error: {type(e).__name__}: {e}"))
            self.hub.publish({"type": "failed", "owner": job.owner, "job_id": job.id, "error": "internal error"})
        finally:
            self.live.pop(job.id, None)
            with self._wake:
                self._wake.notify_all()

    def prune(self) -> int:
        """Delete finished jobs older than ``keep_days``, with their image files."""
        assert self.settings.keep_days is not None
        count, paths = self.store.prune(time.time() - self.settings.keep_days * 86400)
        self._discard(paths)
        return count

    def _maintenance(self) -> None:
        while not self._stop.is_set():
            try:
                if n := self.prune():
                    log.info("pruned %d finished jobs older than %g days", n, self.settings.keep_days)
            except Exception:
                log.exception("pruning history failed")
            self._stop.wait(3600)

    def _run_extras(self, job: Job, out_dir: Path) -> Any:
        from types import SimpleNamespace

        from ..engine.engine import next_sequence_number
        from ..engine.images import decode_image
        from ..infotext import read_infotext, save_png
        from ..upscale.extras import ExtrasRequest, run_extras

        req = ExtrasRequest.model_validate(job.params)
        paths, texts = [], []
        number = next_sequence_number(out_dir)
        for i, data in enumerate(req.images):
            src = decode_image(data, f"image[{i}]")
            image, info = run_extras(self.engine, req, src)
            # A1111 keeps the source's generation parameters intact in the PNG; the postprocessing
            # description is what the API returns (its html_info).
            previous = read_infotext(src)
            paths.append(save_png(image, out_dir / f"{number + i:05d}.png", previous or info))
            texts.append(info)
        result = SimpleNamespace(infotexts=texts, seeds=[-1] * len(paths), subseeds=[-1] * len(paths), warnings=[])
        return SimpleNamespace(paths=paths, result=result, model=None)

    def _discard(self, paths: list[str]) -> None:
        """Delete the files of images a canceled or failed job no longer keeps."""
        for rel in paths:
            (self.dirs.root / rel).unlink(missing_ok=True)

    def _progress(self, live: Live, p: Any) -> None:
        live.step, live.steps, live.batch, live.n_iter = p.step, p.steps, p.batch, p.n_iter
        live.fraction, live.eta = p.fraction, p.eta_seconds
        event = {
            "type": "progress",
            "owner": live.owner,
            "job_id": live.job_id,
            "step": p.step,
            "steps": p.steps,
            "batch": p.batch,
            "n_iter": p.n_iter,
            "progress": round(p.fraction, 4),
            "eta": None if p.eta_seconds is None else round(p.eta_seconds, 2),
        }
        every = self.settings.preview_every
        if every and p.latents is not None and (p.step % every == 0 or p.step == p.steps):
            live.preview = preview_png(p.latents)
            live.preview_id += 1
            event["preview"] = live.preview
        self.hub.publish(event)


# SD1/SD2 latent -> RGB approximation (a linear map), cheap enough for every few steps.
_LATENT_RGB = ((0.3512, 0.2297, 0.3227), (0.3250, 0.4974, 0.2350), (-0.2829, 0.1762, 0.2721), (-0.2120, -0.2616, -0.7177))


def preview_png(latents: Any) -> str:
    """A base64 PNG of the first image's latents (no VAE decode: it must not slow sampling)."""
    import torch
    from PIL import Image

    lat = latents[0].float().cpu()
    rgb = torch.einsum("chw,cr->hwr", lat, torch.tensor(_LATENT_RGB))
    arr = ((rgb + 1) / 2).clamp(0, 1).mul(255).byte().numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


__all__ = ["Service", "Settings", "Limits", "LimitError", "Live"]
