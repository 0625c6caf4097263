"""A worker: runs jobs on one device with its own model manager.

The same class runs in the API process (``muralist serve`` on one box) and inside a Ray actor on
any machine of a cluster (``muralist worker``). It never touches the database or the API's files:
a job comes in as a plain dict, and out come events (started, progress with previews, and one
terminal event carrying the PNG bytes), so that the dispatcher alone decides what is recorded.
"""

from __future__ import annotations

import base64
import io
import logging
import os
import queue
import shutil
import socket
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import MuralistError
from ..paths import DataDirs

log = logging.getLogger("muralist.worker")

TERMINAL = ("done", "interrupted", "error")
_AVAILABLE_TTL = 30.0  # seconds between rescans of the checkpoints this worker can load


class Worker:
    """One device's job runner. ``engine``: an Engine to use (the API process shares its model
    registry); otherwise one is built from ``data_dir`` and ``folders`` (``ckpt_dir``, ``vae_dir``,
    ``lora_dir``, ``embeddings_dir``): a worker on another machine reads that machine's own A1111
    folders."""

    def __init__(
        self,
        name: str,
        device: str | None = None,
        data_dir: str | os.PathLike[str] | None = None,
        folders: dict[str, str] | None = None,
        engine: Any = None,
        max_loaded_models: int = 2,
        max_model_bytes: int | None = None,
        preview_every: int = 5,
        node: str | None = None,
        report_available: bool = True,
    ) -> None:
        self.name = name
        self.preview_every = preview_every
        self.report_available = report_available
        self.loads = 0  # checkpoints loaded so far (what model affinity saves)
        self.node = node or socket.gethostname()
        if engine is None:
            from ..engine.engine import Engine, ModelCache

            dirs = DataDirs.from_options(data_dir, **(folders or {}))
            engine = Engine(dirs, cache=ModelCache(max_models=max_loaded_models, device=device, max_bytes=max_model_bytes))
        self.engine = engine
        self.device = str(engine.cache.device)
        self._lock = threading.Lock()
        self._current: tuple[str, int, Any] | None = None  # (job id, attempt, JobControl)
        self._owner: tuple[str, float] | None = None  # (dispatcher, last seen), see attach()
        self._available: tuple[float, list[str]] | None = None
        self._inbox: queue.Queue[Any] = queue.Queue()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------- control (answers while a job runs)

    def attach(self, owner: str, ttl: float) -> bool:
        """Whether dispatcher ``owner`` may drive this worker: one dispatcher at a time, and another
        may take over once the owner has not been heard of for ``ttl`` seconds (it died)."""
        now = time.monotonic()
        with self._lock:
            if self._owner is None or self._owner[0] == owner or now - self._owner[1] > ttl:
                self._owner = (owner, now)
                return True
            return False

    def detach(self, owner: str) -> None:
        with self._lock:
            if self._owner is not None and self._owner[0] == owner:
                self._owner = None

    def interrupt(self, job_id: str, attempt: int | None = None) -> bool:
        return self._control(job_id, attempt, "interrupt")

    def skip(self, job_id: str, attempt: int | None = None) -> bool:
        return self._control(job_id, attempt, "skip")

    def stop_early(self, job_id: str, attempt: int | None = None) -> bool:
        return self._control(job_id, attempt, "stop_early")

    def _control(self, job_id: str, attempt: int | None, action: str) -> bool:
        with self._lock:
            cur = self._current
        if cur is None or cur[0] != job_id or (attempt is not None and cur[1] != attempt):
            return False
        getattr(cur[2], action)()
        return True

    def info(self) -> dict[str, Any]:
        """What the dispatcher needs to place jobs, and what the Admin page shows."""
        with self._lock:
            cur = self._current
            owner = self._owner[0] if self._owner else None
        cache = self.engine.cache
        manager = getattr(cache, "manager", None)
        memory: dict[str, Any] = {"models_bytes": manager.used_bytes() if manager else None, "budget_bytes": cache.max_bytes}
        if self.device.startswith("cuda"):
            try:
                import torch

                free, total = torch.cuda.mem_get_info(torch.device(self.device))
                memory.update(device_free_bytes=free, device_total_bytes=total)
            except Exception:  # a broken device is reported by the job that uses it
                pass
        return {
            "name": self.name,
            "node": self.node,
            "device": self.device,
            "pid": os.getpid(),
            "state": "busy" if cur else "idle",
            "job_id": cur[0] if cur else None,
            "attempt": cur[1] if cur else None,
            "owner": owner,
            "loaded_models": [sha for _path, sha in cache.loaded()],
            "models": manager.summary() if manager else [],
            "loads": self.loads,
            "available": self.available() if self.report_available else None,
            "memory": memory,
        }

    def available(self) -> list[str]:
        """sha256 of every checkpoint in this worker's folders (a job needing another never comes here)."""
        now = time.monotonic()
        if self._available is None or now - self._available[0] > _AVAILABLE_TTL:
            try:
                shas = sorted({c.sha256 for c in self.engine.registry.checkpoints()})
            except Exception:
                log.exception("scanning the checkpoints failed")
                shas = self._available[1] if self._available else []
            self._available = (now, shas)
        return self._available[1]

    # ------------------------------------------------------------- running a job

    def run(self, job: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """Run ``job`` ({"id", "attempt", "type", "params", "owner"}) and yield its events; the last
        one is terminal: "done" (with the images' PNG bytes), "interrupted" or "error"."""
        from ..engine.txt2img import JobControl

        control = JobControl()
        with self._lock:
            if self._current is not None:
                yield {"type": "error", "user": False, "message": f"worker {self.name} is busy with job {self._current[0]}"}
                return
            self._current = (job["id"], int(job.get("attempt", 0)), control)
        events: queue.Queue[dict[str, Any]] = queue.Queue()
        finished = False
        try:
            self._executor().put((job, control, events.put))
            yield {"type": "started", "worker": self.name}
            while True:
                ev = events.get()
                yield ev
                if ev["type"] in TERMINAL:
                    finished = True
                    return
        finally:
            if not finished:  # the caller went away: stop the job rather than finish it for nobody
                control.interrupt()

    def _executor(self) -> queue.Queue[Any]:
        """The worker's one long-lived job thread: torch pays for a new calling thread (its
        OpenMP team) on first use, ~50 ms per job on a CPU if every job had a fresh thread."""
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._serve, daemon=True, name=f"muralist-{self.name}")
                self._thread.start()
        return self._inbox

    def _serve(self) -> None:
        while True:
            job, control, emit = self._inbox.get()
            self._execute(job, control, emit)

    def _execute(self, job: dict[str, Any], control: Any, emit: Any) -> None:
        from ..engine.txt2img import Interrupted

        tmp = Path(tempfile.mkdtemp(prefix="muralist-job-"))
        before = {sha for _path, sha in self.engine.cache.loaded()}
        try:
            try:
                end = self._dispatch(job, control, emit, tmp)
            except Interrupted:
                end = {"type": "interrupted"}
            except MuralistError as e:
                end = {"type": "error", "user": True, "message": str(e)}
            except Exception as e:  # a bug or an out-of-memory: the job fails, the worker lives on
                log.error("job %s failed:\n%s", job["id"], traceback.format_exc())
                end = {"type": "error", "user": False, "message": f"internal error: {type(e).__name__}: {e}"}
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            with self._lock:
                self._current = None
        loaded = [sha for _path, sha in self.engine.cache.loaded()]
        self.loads += len(set(loaded) - before)
        end["loaded_models"] = loaded
        end["loads"] = self.loads  # the /metrics counter is current once the job ends, not at the next refresh
        emit(end)

    def _dispatch(self, job: dict[str, Any], control: Any, emit: Any, tmp: Path) -> dict[str, Any]:
        kind, params = job["type"], job["params"]
        if job.get("cancel_requested"):
            control.interrupt()
        if job.get("stop_requested"):
            control.stop_early()
        if kind == "interrogate":
            from ..engine.images import decode_image

            caption = self.engine.interrogator.caption(decode_image(params["image"]))
            return {"type": "done", "images": [], "result": {"caption": caption, "infotexts": [], "seeds": [], "warnings": []}}
        if kind in ("train_lora", "train_embedding"):
            return self._train(job, control, emit, tmp)
        if kind == "merge":
            return self._merge(params, control, emit)
        if kind == "download":
            return self._download(job, control, emit)
        if kind == "model_info":
            return self._model_info(job, control, emit)
        if kind == "extras":
            paths, texts = self._extras(params, tmp)
            result = {"infotexts": texts, "seeds": [-1] * len(paths), "subseeds": [-1] * len(paths), "warnings": [], "model": None}
            return {"type": "done", "images": _read_images(paths, texts, result["seeds"]), "result": result}
        from ..request import GenerationRequest

        req = GenerationRequest.model_validate(params)
        saved = self.engine.generate(req, control=control, progress=lambda p: emit(self._progress(p)), save_to=tmp)
        r = saved.result
        result = {"infotexts": r.infotexts, "seeds": r.seeds, "subseeds": r.subseeds, "warnings": r.warnings,
                  "model": saved.model.title if saved.model else None,
                  "inpainting_conditioning": bool(saved.model and saved.model.kind.inpainting)}
        images = _read_images(saved.paths, r.infotexts, r.seeds)
        if req.samples_format != "png":
            images = [_reformat(img, req) for img in images]
        # ControlNet's detected maps follow the images (PNG, no infotext), as the extension returns them.
        images += _read_images(saved.detected, [""] * len(saved.detected), [-1] * len(saved.detected))
        result["detected_maps"] = len(saved.detected)
        return {"type": "done", "images": images, "result": result}

    def _train(self, job: dict[str, Any], control: Any, emit: Any, tmp: Path) -> dict[str, Any]:
        """A LoRA or embedding training run on a private copy of the checkpoint (the cached models
        that serve generation are never changed). Files come back as "file" events; a "state" file after each
        epoch lets a re-run continue (job["resume"])."""
        from ..models.loader import load_checkpoint
        from ..models.manager import file_bytes
        from ..service.training import options_of
        from ..training.lora import Saved, train_lora

        params = job["params"]
        embedding = job["type"] == "train_embedding"
        if embedding:
            from ..training.embedding import EmbeddingOptions, train_embedding

            opts: Any = options_of(params, EmbeddingOptions)
            label = opts.embedding_name
        else:
            opts = options_of(params)
            label = opts.output_name
        data = tmp / "dataset"
        for rel, blob in (job.get("dataset") or {}).items():
            path = data / rel
            if ".." in Path(rel).parts or Path(rel).is_absolute():
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(blob)
        info = self.engine.registry.find_checkpoint(opts.pretrained_model_name_or_path)
        samples: list[Saved] = []

        def save(s: Saved) -> None:
            if s.kind == "sample":
                samples.append(s)
            else:
                emit({"type": "file", "kind": s.kind, "name": s.name, "data": s.data, "epoch": s.epoch})

        def progress(p: Any) -> None:
            emit({"type": "progress", "step": p.step, "steps": p.steps, "batch": p.epoch - 1, "n_iter": p.epochs,
                  "progress": round(p.fraction, 4), "eta": None if p.eta_seconds is None else round(p.eta_seconds, 2),
                  "loss": round(p.loss, 6), "lr": p.lr, "epoch": p.epoch})

        def load() -> Any:
            return load_checkpoint(info.path, info.kind, info.prediction_type, str(self.engine.cache.device))

        # Budgeted like any model; never cached for other jobs (its weights are being changed).
        manager = self.engine.cache.manager
        try:
            with manager.use("training", job["id"], load, file_bytes(info.path), f"training {label}") as model:
                stop = lambda: control.interrupted.is_set() or control.stopped.is_set()  # noqa: E731
                if embedding:
                    result = train_embedding(model, info, opts, data, progress=progress, save=save, resume=job.get("resume"),
                                             stopped=stop)
                else:
                    result = train_lora(model, info, opts, data, progress=progress, save=save, resume=job.get("resume"),
                                        stopped=stop, sample=lambda m, epoch: _samples(m, info, opts, epoch))
        finally:
            manager.discard("training", lambda key: key == job["id"])
        if result.canceled:
            return {"type": "interrupted"}
        images = [{"name": s.name, "data": s.data, "infotext": "", "seed": -1} for s in samples]
        return {"type": "done", "images": images, "result": {
            ("embedding" if embedding else "lora"): label, "steps": result.steps, "epochs": result.epochs, "loss": result.losses,
            "resumed_from_step": result.resumed_from,
            "warnings": list(params.get("notes") or []) + result.warnings, "infotexts": [], "seeds": [], "subseeds": []}}

    def _merge(self, params: dict[str, Any], control: Any, emit: Any) -> dict[str, Any]:
        """A checkpoint merge into this worker's checkpoint folder, registered there at once."""
        from ..models.merge import MergeCanceled, run_merge

        last = [-1.0]
        started = time.monotonic()

        def progress(done: int, total: int) -> None:
            fraction = done / total
            if fraction - last[0] >= 0.01 or done == total:  # about a hundred events, not one per key
                last[0] = fraction
                spent = time.monotonic() - started
                emit({"type": "progress", "step": done, "steps": total, "batch": 0, "n_iter": 1,
                      "progress": round(fraction, 4), "eta": round(spent / fraction - spent, 2) if fraction else None})

        stop = lambda: control.interrupted.is_set() or control.stopped.is_set()  # noqa: E731
        try:
            result, info = run_merge(self.engine.registry, params, progress, stop)
        except MergeCanceled:
            return {"type": "interrupted"}
        self._available = None  # report the new checkpoint with the next refresh
        return {"type": "done", "images": [], "result": {
            "model": info.title, "file": info.name, "sha256": result.sha256, "keys": result.keys,
            "is_inpainting": result.is_inpainting, "infotexts": [], "seeds": [], "subseeds": [], "warnings": []}}
    def _download(self, job: dict[str, Any], control: Any, emit: Any) -> dict[str, Any]:
        """A model download into this worker's folders; a cancel (or a crash) leaves the ``.part``
        file, which the next download of the same file resumes."""
        from ..models.download import DownloadCanceled, DownloadSettings, download

        def progress(p: Any) -> None:
            # step/steps in KiB keep the generic progress fields meaningful; bytes/total/speed are exact.
            emit({"type": "progress", "step": p.done // 1024, "steps": (p.total or 0) // 1024, "batch": 0, "n_iter": 1,
                  "progress": round(p.fraction, 4), "eta": None if p.eta is None else round(p.eta, 1),
                  "bytes": p.done, "total": p.total, "speed": round(p.speed)})

        eng = self.engine
        try:
            result = download(job["params"], eng.dirs, DownloadSettings.from_payload(job.get("download_settings")),
                              progress=progress, stopped=control.interrupted.is_set, cache=eng.registry.cache)
        except DownloadCanceled:
            return {"type": "interrupted"}
        eng.registry.refresh()  # usable at once
        eng.loras.refresh()
        eng.embeddings.refresh()
        if result["source"] == "civitai":
            result["card"] = self._card_after_download(job, result)
        return {"type": "done", "images": [], "result": {**result, "infotexts": [], "seeds": [], "subseeds": []}}

    def _card_after_download(self, job: dict[str, Any], result: dict[str, Any]) -> str:
        """Civitai Helper's habit: a model from Civitai arrives with its card. The download stands
        whatever happens here; a problem is a warning."""
        from ..models.cards import fetch_cards
        from ..models.download import DownloadSettings, kind_dirs

        path = kind_dirs(self.engine.dirs)[result["kind"]] / result["file"]
        settings = DownloadSettings.from_payload(job.get("download_settings"))
        try:
            out = fetch_cards([(result["kind"], result["file"], path)], settings, lambda _p: result["sha256"])
        except MuralistError as e:
            result["warnings"].append(f"model card: {e}")
            return "error"
        entry = out["models"][0]
        result["warnings"] += out["warnings"]
        if entry["status"] == "not_found":
            result["warnings"].append(f"model card: {result['file']} {entry['message']}")
        return str(entry["status"])

    def _model_info(self, job: dict[str, Any], control: Any, emit: Any) -> dict[str, Any]:
        """Model cards from Civitai for one model or all of them (``model_info`` job)."""
        from ..models.cards import CardsCanceled, fetch_cards, targets
        from ..models.download import DownloadSettings

        params, eng = job["params"], self.engine
        items = targets(eng, params)

        def progress(done: int, total: int) -> None:
            emit({"type": "progress", "step": done, "steps": total, "batch": 0, "n_iter": 1,
                  "progress": round(done / total, 4), "eta": None})

        try:
            result = fetch_cards(items, DownloadSettings.from_payload(job.get("download_settings")),
                                 eng.registry.cache.sha256,
                                 refresh=params.get("refresh", False), skip_existing=bool(params.get("all")),
                                 progress=progress, stopped=control.interrupted.is_set)
        except CardsCanceled:
            return {"type": "interrupted"}
        return {"type": "done", "images": [], "result": {**result, "infotexts": [], "seeds": [], "subseeds": []}}

    def _extras(self, params: dict[str, Any], folder: Path) -> tuple[list[Path], list[str]]:
        from ..engine.images import decode_image
        from ..infotext import read_infotext, save_png
        from ..upscale.extras import ExtrasRequest, run_extras

        req = ExtrasRequest.model_validate(params)
        paths, texts = [], []
        for i, data in enumerate(req.images):
            src = decode_image(data, f"image[{i}]")
            image, info = run_extras(self.engine, req, src)
            # A1111 keeps the source's generation parameters intact in the PNG; the postprocessing
            # description is what the API returns (its html_info).
            paths.append(save_png(image, folder / f"{i:05d}.png", read_infotext(src) or info))
            texts.append(info)
        return paths, texts

    def _progress(self, p: Any) -> dict[str, Any]:
        event: dict[str, Any] = {
            "type": "progress", "step": p.step, "steps": p.steps, "batch": p.batch, "n_iter": p.n_iter,
            "progress": round(p.fraction, 4), "eta": None if p.eta_seconds is None else round(p.eta_seconds, 2),
        }
        every = self.preview_every
        if every and p.latents is not None and (p.step % every == 0 or p.step == p.steps):
            event["preview"] = preview_png(p.latents)
        return event


def _read_images(paths: list[Path], infotexts: list[str], seeds: list[int]) -> list[dict[str, Any]]:
    return [{"name": Path(p).name, "data": Path(p).read_bytes(), "infotext": text, "seed": int(seed)}
            for p, text, seed in zip(paths, infotexts, seeds, strict=True)]


def _samples(model: Any, info: Any, opts: Any, epoch: int) -> list[Any]:
    """Sample images of a training run with its adapters as they are (kohya's sample prompts)."""
    from ..engine.txt2img import Identity, generate_images
    from ..infotext import png_bytes
    from ..request import GenerationRequest
    from ..training.lora import Saved

    w, h = opts.size
    out = []
    model.unet.eval()
    for te in model.text_encoders.values():
        te.eval()
    try:
        for i, prompt in enumerate(opts.sample_prompts):
            req = GenerationRequest(prompt=prompt, width=w, height=h, steps=20, seed=opts.seed, sampler_name="Euler a")
            r = generate_images(model, req, Identity(info.model_name, info.shorthash))
            text = r.infotexts[0] + f", Training epoch: {epoch}"
            out.append(Saved("sample", f"{i:05d}-{opts.output_name}-e{epoch:06d}.png", png_bytes(r.images[0], text), epoch))
    finally:
        model.unet.train()
    return out


_GRID_NAMES = ("xyz_grid-", "prompt_matrix-")


def _reformat(img: dict[str, Any], req: Any) -> dict[str, Any]:
    """An image in the job's samples_format (JPEG/WEBP with EXIF infotext). Grids stay PNG, as
    A1111's separate grid_format defaults to."""
    import io

    from PIL import Image

    from ..infotext import image_bytes

    name = img["name"]
    if name.startswith(_GRID_NAMES):
        return img
    with Image.open(io.BytesIO(img["data"])) as im:
        data = image_bytes(im, img["infotext"], req.samples_format, req.jpeg_quality, req.webp_lossless)
    return {**img, "name": str(Path(name).with_suffix("." + req.samples_format)), "data": data}


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
