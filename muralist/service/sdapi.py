"""AUTOMATIC1111's ``/sdapi/v1`` on top of the queue, so A1111 clients work unchanged.

Field names, defaults and response shapes are A1111's. What differs is scope, on purpose:
``options`` are the caller's own defaults (never a global model switch), ``progress`` shows the
caller's own job, and ``interrupt``/``skip`` act on the caller's own jobs only.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import os
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Body, Depends, FastAPI, HTTPException, Query
from pydantic import ValidationError

from .. import __version__
from ..errors import InvalidRequestError, MuralistError
from ..request import GenerationRequest, describe_validation_error
from . import sdapi_models as m
from .core import Service
from .store import Job, JobStatus, User

# A1111 option name -> our request field: the options that change a job's output travel with the job.
OPTION_FIELDS = {"sd_model_checkpoint": "model", "sd_vae": "vae", "CLIP_stop_at_last_layers": "clip_skip", "eta_ancestral": "eta",
                 "tiling": "tiling", "eta_noise_seed_delta": "eta_noise_seed_delta", "randn_source": "randn_source",
                 "img2img_fix_steps": "img2img_fix_steps", "upscaler_for_img2img": "upscaler_for_img2img",
                 "samples_format": "samples_format", "jpeg_quality": "jpeg_quality", "webp_lossless": "webp_lossless",
                 "s_noise": "s_noise", "s_churn": "s_churn", "s_tmin": "s_tmin", "s_tmax": "s_tmax",
                 "sgm_noise_multiplier": "sgm_noise_multiplier", "sigma_min": "sigma_min", "sigma_max": "sigma_max",
                 "rho": "rho", "always_discard_next_to_last_sigma": "always_discard_next_to_last_sigma",
                 "beta_dist_alpha": "beta_dist_alpha", "beta_dist_beta": "beta_dist_beta", "pad_cond_uncond": "pad_cond_uncond",
                 "emphasis": "emphasis"}
FIELD_OPTIONS = {v: k for k, v in OPTION_FIELDS.items()}
# A1111's option set with its defaults (names and values as its /sdapi/v1/options returns them).
A1111_OPTIONS: dict[str, Any] = json.loads((Path(__file__).with_name("a1111_options.json")).read_text())
# Where muralist's default differs: noise from the CPU, so a seed gives the same image on any worker.
A1111_OPTIONS["randn_source"] = "CPU"
MAX_OPTIONS_BYTES = 64 * 1024
# A1111 API defaults that differ from the CLI's.
A1111_DEFAULTS = {"steps": 50, "sampler_name": "Euler", "cfg_scale": 7.0, "width": 512, "height": 512}
LATENT_MODES = ["Latent", "Latent (antialiased)", "Latent (bicubic)", "Latent (bicubic antialiased)", "Latent (nearest)", "Latent (nearest-exact)"]


def a1111_params(body: dict[str, Any]) -> dict[str, Any]:
    """An A1111 txt2img body -> our request fields (unknown fields are ignored, as A1111 does)."""
    overrides = body.get("override_settings") or {}
    if not isinstance(overrides, dict):
        raise InvalidRequestError("override_settings: must be an object of A1111 option names and values")
    params = {k: v for k, v in A1111_DEFAULTS.items()}
    for k, v in body.items():
        if v is not None and k not in ("override_settings", "sampler_index", "alwayson_scripts"):
            params[k] = v
    if not body.get("sampler_name") and body.get("sampler_index"):
        params["sampler_name"] = body["sampler_index"]
    from ..controlnet.units import units_from_alwayson

    units = units_from_alwayson(body.get("alwayson_scripts"))  # sd-webui-controlnet's units
    if units is not None:
        params["controlnet"] = units
    for opt, value in overrides.items():
        if opt in OPTION_FIELDS and value is not None:
            params[OPTION_FIELDS[opt]] = value  # this job only
    for key in ("seed_resize_from_h", "seed_resize_from_w"):
        try:
            value = int(params.get(key, -1))
        except (TypeError, ValueError):
            raise InvalidRequestError(f"{key}: must be an integer (-1 or 0: no resize)") from None
        if value <= 0:  # A1111 treats 0 and -1 alike: no resize
            params[key] = -1
    return params


def info_json(job: Job, params: dict[str, Any]) -> str:
    """A1111's ``info`` string for a finished job."""
    from ..infotext import parse_infotext

    res = job.result or {}
    texts = res.get("infotexts", [])
    first = parse_infotext(texts[0]) if texts else {}
    seeds, subseeds = res.get("seeds", []), res.get("subseeds", [])
    info = {
        "prompt": params.get("prompt", ""),
        "all_prompts": [params.get("prompt", "")] * len(seeds),
        "negative_prompt": params.get("negative_prompt", ""),
        "all_negative_prompts": [params.get("negative_prompt", "")] * len(seeds),
        "seed": seeds[0] if seeds else -1,
        "all_seeds": seeds,
        "subseed": subseeds[0] if subseeds else -1,
        "all_subseeds": subseeds,
        "subseed_strength": params.get("subseed_strength", 0),
        "width": params.get("width"),
        "height": params.get("height"),
        "sampler_name": first.get("Sampler", params.get("sampler_name")),
        "cfg_scale": params.get("cfg_scale"),
        "steps": params.get("steps"),
        "batch_size": params.get("batch_size", 1),
        "restore_faces": False,
        "face_restoration_model": None,
        "sd_model_name": first.get("Model"),
        "sd_model_hash": first.get("Model hash"),
        "sd_vae_name": first.get("VAE"),
        "sd_vae_hash": first.get("VAE hash"),
        "seed_resize_from_w": params.get("seed_resize_from_w", -1),
        "seed_resize_from_h": params.get("seed_resize_from_h", -1),
        "denoising_strength": params.get("denoising_strength"),
        "extra_generation_params": {k: v for k, v in first.items() if k in ("Lora hashes", "TI hashes", "Schedule type")},
        "index_of_first_image": 0,
        "infotexts": texts,
        "styles": params.get("styles", []),
        "job_timestamp": datetime.fromtimestamp(job.created_at or time.time()).strftime("%Y%m%d%H%M%S"),
        "clip_skip": params.get("clip_skip", 1),
        # A1111: true whenever the checkpoint takes the 9-channel inpainting conditioning.
        "is_using_inpainting_conditioning": bool(res.get("inpainting_conditioning", False)),
        "version": f"muralist {__version__}",
        "warnings": res.get("warnings", []),
    }
    return json.dumps(info)


def _metadata(meta: Any) -> dict[str, Any]:
    """A LoRA's metadata as A1111 returns it: values that are JSON objects parsed (ss_tag_frequency...)."""
    out: dict[str, Any] = {}
    for k, v in dict(meta).items():
        if isinstance(v, str) and v.startswith("{"):
            try:
                v = json.loads(v)
            except ValueError:
                pass
        out[k] = v
    return out


def decode_image(data: Any, field: str = "image") -> bytes:
    """Raw base64 or a data URL (A1111 clients send both)."""
    if not isinstance(data, str):
        raise InvalidRequestError(f"{field}: must be a base64 string or a data URL, not {type(data).__name__}")
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        return base64.b64decode(data, validate=False)
    except (binascii.Error, ValueError):
        raise InvalidRequestError("image: not valid base64") from None


def raise_failed(job: Job, what: str) -> None:
    """A failed job as A1111 answers it: the caller's mistake is a 422 naming it, a fault of ours 500."""
    error = job.error or what
    ours = error.startswith(("internal error", "worker ", "the worker ", "the server "))
    if job.status is JobStatus.CANCELED:
        raise HTTPException(409, "the job was canceled")
    if ours:
        raise HTTPException(500, error)
    raise InvalidRequestError(error)


def decode_init(data: str) -> str:
    """An init image as A1111 returns it with include_init_images: raw base64."""
    return data.partition(",")[2] if data.startswith("data:") else data


def install(app: FastAPI, service: Service) -> None:
    current_user = app.state.current_user
    r = APIRouter()

    def shown(path: Any, user: User) -> str | None:
        """A file's path as the caller may see it: absolute for admins; for everyone else relative to
        the data folder (or the bare name), so server paths do not leak."""
        if path is None:
            return None
        if user.admin:
            return str(path)
        p = Path(path)
        try:
            return p.resolve().relative_to(service.dirs.root).as_posix()
        except ValueError:
            return p.name

    def own_running(user: User) -> list[Job]:
        return service.store.list_jobs(user.name, [JobStatus.RUNNING])

    def images_b64(job: Job) -> list[str]:
        """A finished job's images as A1111 returns them: raw base64 PNGs."""
        out = []
        for image_id in (job.result or {}).get("images", []):
            rec = service.store.get_image(image_id)
            if rec is not None:
                out.append(base64.b64encode((service.dirs.root / rec.path).read_bytes()).decode())
        return out

    async def wait_finished(job_id: str) -> Job:
        key, sub = service.hub.subscribe(None, job_id)
        try:
            while True:
                job = service.store.get(job_id)
                if job is not None and job.status.finished:
                    return job
                try:
                    await asyncio.wait_for(sub.queue.get(), timeout=0.5)
                except TimeoutError:
                    pass
        finally:
            service.hub.unsubscribe(key)

    async def run(job_type: str, req: m.Txt2ImgRequest | m.Img2ImgRequest, user: User) -> dict[str, Any]:
        body = req.sent()
        params = a1111_params(body)
        if job_type == "img2img":
            params.setdefault("denoising_strength", 0.75)
        loop = asyncio.get_running_loop()
        job = await loop.run_in_executor(None, lambda: service.submit(user, job_type, params, job_id=req.force_task_id))
        job = await wait_finished(job.id)
        if job.status is JobStatus.FAILED:
            raise_failed(job, "generation failed")
        images = images_b64(job) if req.send_images else []
        parameters = req.model_dump()  # A1111 echoes the whole parsed request, defaults included
        if isinstance(req, m.Img2ImgRequest):
            if req.include_init_images:
                images += [decode_init(d) for d in req.init_images or []]
            parameters.update(init_images=None, mask=None)  # as A1111: the inputs are not echoed back
        return {"images": images, "parameters": parameters, "info": info_json(job, job.params)}

    @r.post("/sdapi/v1/txt2img", response_model=m.GenerationResponse)
    async def txt2img(body: m.Txt2ImgRequest, user: User = Depends(current_user)) -> dict[str, Any]:
        return await run("txt2img", body, user)

    @r.post("/sdapi/v1/img2img", response_model=m.GenerationResponse)
    async def img2img(body: m.Img2ImgRequest, user: User = Depends(current_user)) -> dict[str, Any]:
        if not body.init_images:
            raise InvalidRequestError("init_images: img2img needs at least one image")
        return await run("img2img", body, user)

    def progress_of(user: User) -> dict[str, Any]:
        # Answered from memory (live jobs, cached queue counts): it is polled often, mid-generation.
        live = next((v for v in list(service.live.values()) if v.owner == user.name), None)
        queued = service.queued_count(user.name)
        # Every key A1111's state has: strict clients' models require them all.
        state = {"skipped": False, "interrupted": False, "stopping_generation": False, "job": live.job_id if live else "",
                 "job_count": (1 if live else 0) + queued, "job_timestamp": datetime.now().strftime("%Y%m%d%H%M%S"),
                 "job_no": live.batch if live else 0, "sampling_step": live.step if live else 0,
                 "sampling_steps": live.steps if live else 0}
        return {"progress": live.fraction if live else 0.0, "eta_relative": (live.eta or 0.0) if live else 0.0,
                "state": state, "current_image": live.preview if live else None,
                "textinfo": None if live or not queued else "Waiting..."}

    @r.get("/sdapi/v1/progress", response_model=m.ProgressResponse)
    async def progress(skip_current_image: bool = Query(False), user: User = Depends(current_user)) -> dict[str, Any]:
        return progress_of(user)

    @r.post("/sdapi/v1/interrupt")
    def interrupt(user: User = Depends(current_user)) -> dict[str, Any]:
        # As A1111: the current job stops and returns (and saves) what it has, partial image
        # included. Only the caller's own jobs.
        for job in own_running(user):
            service.interrupt(job)
        return {}

    @r.post("/sdapi/v1/skip")
    def skip(user: User = Depends(current_user)) -> dict[str, Any]:
        for job in own_running(user):
            service.skip(job)
        return {}

    @r.get("/sdapi/v1/options")
    def get_options(user: User = Depends(current_user)) -> dict[str, Any]:
        """A1111's whole option set: its defaults, overlaid with the caller's own options."""
        reg = service.engine.registry
        out = dict(A1111_OPTIONS)
        out.update({k: v for k, v in user.options.items() if k not in GenerationRequest.model_fields})
        for field, value in user.options.items():
            if field in FIELD_OPTIONS:
                out[FIELD_OPTIONS[field]] = value
        if not user.options.get("model"):
            try:
                out["sd_model_checkpoint"] = reg.default_checkpoint().title
            except MuralistError:
                out["sd_model_checkpoint"] = None
        try:
            out["sd_checkpoint_hash"] = reg.find_checkpoint(out["sd_model_checkpoint"]).sha256 if out["sd_model_checkpoint"] else ""
        except MuralistError:
            out["sd_checkpoint_hash"] = ""
        out["sd_vae"] = out.get("sd_vae") or "Automatic"
        out["eta_ancestral"] = out["eta_ancestral"] if out.get("eta_ancestral") is not None else 1.0
        return out

    @r.post("/sdapi/v1/options")
    def set_options(body: dict[str, Any] = Body(...), user: User = Depends(current_user)) -> dict[str, Any]:
        """Store options for the caller only (never a global switch). The ones that change output are
        checked as request fields and then apply to every job of this user; the others are kept and
        returned as set."""
        reg = service.engine.registry
        update: dict[str, Any] = {}
        for opt, value in body.items():
            field = OPTION_FIELDS.get(opt)
            if field is None:
                if opt in GenerationRequest.model_fields:
                    raise InvalidRequestError(f"{opt}: not an A1111 option; set request fields with PUT /api/v1/me/options")
                update[opt] = value
                continue
            if field == "model" and value:
                value = reg.find_checkpoint(str(value)).title
            elif field == "vae" and value in ("", "Automatic", "None"):
                value = None
            elif field == "vae" and value is not None:
                value = reg.find_vae(str(value)).name
            elif field == "upscaler_for_img2img" and value not in (None, "", "None"):
                value = service.engine.upscalers.find(str(value)).name
            elif value is not None:
                try:
                    value = getattr(GenerationRequest.model_validate({field: value}), field)
                except ValidationError as e:
                    raise InvalidRequestError(describe_validation_error(e).replace(field, opt, 1)) from None
            update[field] = value
        stored = {**user.options, **update}
        if len(json.dumps(stored, default=str)) > MAX_OPTIONS_BYTES:
            raise InvalidRequestError(f"options: more than {MAX_OPTIONS_BYTES // 1024} KiB of options; send fewer or shorter values")
        service.store.set_user_options(user.name, update)  # the caller's own defaults only
        return {}

    @r.get("/sdapi/v1/sd-models")
    def sd_models(user: User = Depends(current_user)) -> list[dict[str, Any]]:
        return [{"title": c.title, "model_name": c.model_name, "hash": c.shorthash, "sha256": c.sha256,
                 "filename": shown(c.path, user), "config": None} for c in service.engine.registry.checkpoints()]

    @r.get("/sdapi/v1/sd-vae")
    def sd_vae(user: User = Depends(current_user)) -> list[dict[str, Any]]:
        return [{"model_name": v.name, "filename": shown(v.path, user)} for v in service.engine.registry.vaes()]

    @r.get("/sdapi/v1/samplers")
    def samplers_(user: User = Depends(current_user)) -> list[dict[str, Any]]:
        from ..engine import samplers

        def options(s: Any) -> dict[str, Any]:
            # A1111's per-sampler options as its /samplers lists them
            out: dict[str, Any] = {"scheduler": s.default_schedule} if s.default_schedule != "uniform" else {}
            flags = {"second_order": s.second_order, "discard_next_to_last_sigma": s.discard_penultimate,
                     "brownian_noise": s.brownian}
            out.update({k: True for k, v in flags.items() if v})
            out.update(s.kwargs if s.is_k else {})
            return out

        return [{"name": s.name, "aliases": list(s.aliases), "options": options(s)} for s in samplers.SAMPLERS]

    @r.get("/sdapi/v1/schedulers")
    def schedulers(user: User = Depends(current_user)) -> list[dict[str, Any]]:
        from ..engine import samplers

        return [{"name": k, "label": label, "aliases": list(aliases) or None,
                 "default_rho": rho if rho is not None else -1, "need_inner_model": inner}
                for k, (label, aliases, rho, inner) in samplers.SCHEDULES.items()]

    @r.get("/sdapi/v1/loras")
    def loras(user: User = Depends(current_user)) -> list[dict[str, Any]]:
        return [{"name": lo.name, "alias": lo.alias, "path": shown(lo.path, user), "metadata": _metadata(lo.metadata)}
                for lo in service.engine.loras.all()]

    @r.get("/sdapi/v1/embeddings")
    def embeddings(user: User = Depends(current_user)) -> dict[str, Any]:
        loaded = {name: {"step": e.step, "sd_checkpoint": e.sd_checkpoint, "sd_checkpoint_name": e.sd_checkpoint_name,
                         "shape": e.shape, "vectors": e.vector_count} for name, e in service.engine.embeddings.all().items()}
        return {"loaded": loaded, "skipped": {}}

    @r.get("/sdapi/v1/prompt-styles")
    def prompt_styles(user: User = Depends(current_user)) -> list[dict[str, Any]]:
        from ..prompts.styles import load_styles

        return [{"name": s.name, "prompt": s.prompt, "negative_prompt": s.negative_prompt} for s in load_styles(service.dirs.root / "styles.csv").values()]

    def refresher(name: str, fn: Any) -> None:
        @r.post(f"/sdapi/v1/{name}", name=name)
        def refresh(user: User = Depends(current_user)) -> dict[str, Any]:
            fn()
            return {}

    refresher("refresh-checkpoints", lambda: service.engine.registry.refresh())
    refresher("refresh-vae", lambda: service.engine.registry.refresh())
    refresher("refresh-loras", lambda: service.engine.loras.refresh())
    refresher("refresh-embeddings", lambda: service.engine.embeddings.refresh())
    refresher("unload-checkpoint", lambda: None)
    refresher("reload-checkpoint", lambda: None)

    @r.get("/sdapi/v1/upscalers")
    def upscalers(user: User = Depends(current_user)) -> list[dict[str, Any]]:
        return [{"name": u.name, "model_name": u.arch, "model_path": shown(u.path, user), "model_url": None,
                 "scale": u.scale or 4} for u in service.engine.upscalers.list()]

    @r.get("/sdapi/v1/realesrgan-models")
    def realesrgan(user: User = Depends(current_user)) -> list[dict[str, Any]]:
        return [{"name": u.name, "path": shown(u.path, user), "scale": u.scale} for u in service.engine.upscalers.list()
                if u.path is not None and "RealESRGAN" in u.path.parts]

    @r.get("/sdapi/v1/face-restorers")
    def face_restorers(user: User = Depends(current_user)) -> list[dict[str, Any]]:
        out = []
        for name in ("CodeFormer", "GFPGAN"):
            try:
                path = shown(service.engine.faces.find(name).parent, user)
            except MuralistError:
                path = None
            out.append({"name": name, "cmd_dir": path})
        return out

    @r.get("/sdapi/v1/latent-upscale-modes")
    def latent_modes(user: User = Depends(current_user)) -> list[dict[str, str]]:
        return [{"name": n} for n in LATENT_MODES]

    def constant(value: Any) -> Any:
        def handler(user: User = Depends(current_user)) -> Any:
            return value

        return handler

    # Features muralist does not have (yet): A1111's shapes, empty.
    for path, value in (("hypernetworks", []), ("script-info", []),
                        ("extensions", []), ("scripts", {"txt2img": ["x/y/z plot", "prompt matrix"], "img2img": ["x/y/z plot", "prompt matrix", "sd upscale"]})):
        r.add_api_route(f"/sdapi/v1/{path}", constant(value), methods=["GET"], name=path)

    @r.get("/sdapi/v1/cmd-flags")
    def cmd_flags(user: User = Depends(current_user)) -> dict[str, Any]:
        d = service.dirs
        return {"data_dir": str(d.root) if user.admin else ".", "ckpt_dir": shown(d.ckpt_dir, user), "vae_dir": shown(d.vae_dir, user),
                "lora_dir": shown(d.lora_dir, user), "embeddings_dir": shown(d.embeddings_dir, user), "api": True, "nowebui": True}

    @r.get("/sdapi/v1/memory")
    def memory(user: User = Depends(current_user)) -> dict[str, Any]:
        ram: dict[str, Any] = {}
        try:
            pages, size, avail = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE"), os.sysconf("SC_AVPHYS_PAGES")
            ram = {"total": pages * size, "free": avail * size, "used": (pages - avail) * size}
        except (ValueError, OSError):
            pass
        cuda: dict[str, Any] = {"error": "no CUDA device"}
        try:
            import torch

            if torch.cuda.is_available():
                free, total = torch.cuda.mem_get_info()
                cuda = {"system": {"free": free, "used": total - free, "total": total}}
        except ImportError:
            pass
        return {"ram": ram, "cuda": cuda}

    @r.post("/sdapi/v1/png-info", response_model=m.PngInfoResponse)
    def png_info(body: m.PngInfoRequest, user: User = Depends(current_user)) -> dict[str, Any]:
        from ..infotext import parse_infotext, read_infotext

        data = body.image
        if not data:
            raise InvalidRequestError("image: a base64 PNG/JPEG/WEBP is required")
        text = read_infotext(decode_image(data))
        if text is None:
            return {"info": "", "items": {}, "parameters": {}}
        return {"info": text, "items": {"parameters": text}, "parameters": parse_infotext(text)}

    async def extras(body: dict[str, Any], user: User) -> tuple[list[str], str]:
        loop = asyncio.get_running_loop()
        job = await loop.run_in_executor(None, lambda: service.submit(user, "extras", body))
        job = await wait_finished(job.id)
        if job.status is not JobStatus.SUCCEEDED:
            raise_failed(job, "extras failed")
        images = images_b64(job)
        info = "<br>".join((job.result or {}).get("infotexts", []))
        return images, f"<p>{info}</p>"

    @r.post("/sdapi/v1/extra-single-image", response_model=m.ExtrasSingleResponse)
    async def extra_single(body: m.ExtrasSingleRequest, user: User = Depends(current_user)) -> dict[str, Any]:
        images, html = await extras(body.sent(), user)
        return {"image": images[0] if images else None, "html_info": html}

    @r.post("/sdapi/v1/extra-batch-images", response_model=m.ExtrasBatchResponse)
    async def extra_batch(body: m.ExtrasBatchRequest, user: User = Depends(current_user)) -> dict[str, Any]:
        images, html = await extras(body.sent(), user)
        return {"images": images, "html_info": html}

    @r.post("/sdapi/v1/interrogate", response_model=m.InterrogateResponse)
    async def interrogate(body: m.InterrogateRequest, user: User = Depends(current_user)) -> dict[str, Any]:
        model = body.model
        if model != "clip":
            raise InvalidRequestError(f"model: {model!r} is not available; muralist interrogates with 'clip' (a local BLIP model)")
        loop = asyncio.get_running_loop()
        image = body.image
        job = await loop.run_in_executor(None, lambda: service.submit(user, "interrogate", {"image": image}))
        job = await wait_finished(job.id)
        if job.status is not JobStatus.SUCCEEDED:
            raise_failed(job, "interrogate failed")
        return {"caption": (job.result or {}).get("caption", "")}

    @r.post("/internal/progress")
    def internal_progress(body: m.ProgressRequest, user: User = Depends(current_user)) -> dict[str, Any]:
        job_id = str(body.id_task or "")
        job = service.store.get(job_id)
        if job is None or (job.owner != user.name and not user.admin):
            return {"active": False, "queued": False, "completed": False, "progress": None, "eta": None,
                    "live_preview": None, "id_live_preview": -1, "textinfo": "Unknown task"}
        live = service.live.get(job.id)
        want_preview = body.live_preview
        return {
            "active": job.status is JobStatus.RUNNING,
            "queued": job.status is JobStatus.QUEUED,
            "completed": job.status.finished,
            "progress": live.fraction if live else (1.0 if job.status.finished else None),
            "eta": live.eta if live else None,
            "live_preview": f"data:image/png;base64,{live.preview}" if live and live.preview and want_preview else None,
            "id_live_preview": live.preview_id if live else -1,
            "textinfo": f"In queue: position {service.store.position(job.id)}" if job.status is JobStatus.QUEUED else None,
        }

    @r.get("/internal/pending-tasks")
    def pending(user: User = Depends(current_user)) -> dict[str, Any]:
        jobs = service.store.list_jobs(user.name, [JobStatus.QUEUED, JobStatus.RUNNING])
        return {"size": len(jobs), "tasks": [j.id for j in jobs]}

    app.include_router(r)
