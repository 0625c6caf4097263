"""txt2img with A1111's semantics on a loaded model.

Everything a run needs arrives as arguments (model, VAE, request, control); the loaded model is
only read, so the same model serves one job after another without carrying state between them.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from .. import __version__
from ..infotext import build_infotext
from ..models.family import Family
from ..models.loader import LoadedModel
from ..prompts.parser import extract_extra_networks
from ..request import GenerationRequest
from . import samplers
from .conditioning import JobConditioning, PromptEncoder, job_conditioning
from .seeds import RNG_SOURCE, ImageNoise, all_seeds


class Interrupted(Exception):
    """The job was interrupted by its owner; the partial images are discarded."""


@dataclass
class JobControl:
    """Interrupt/skip flags of ONE job (A1111 has one global pair; here every job has its own)."""

    interrupted: threading.Event = field(default_factory=threading.Event)
    skipped: threading.Event = field(default_factory=threading.Event)

    def interrupt(self) -> None:
        self.interrupted.set()

    def skip(self) -> None:
        self.skipped.set()


@dataclass
class Progress:
    batch: int  # 0-based index of the batch (n_iter) being sampled
    n_iter: int
    step: int  # steps done in this batch
    steps: int
    started: float  # time.monotonic() at the start of the job
    latents: torch.Tensor | None = None  # current latents, for live previews

    @property
    def fraction(self) -> float:
        return (self.batch + self.step / max(1, self.steps)) / max(1, self.n_iter)

    @property
    def eta_seconds(self) -> float | None:
        f = self.fraction
        return None if f <= 0 else (time.monotonic() - self.started) * (1 - f) / f


ProgressFn = Callable[[Progress], None]


@dataclass
class Identity:
    """How the infotext names a model or VAE (A1111: model_name and the AutoV2 short hash)."""

    name: str
    shorthash: str


@dataclass
class GenerationResult:
    images: list[Image.Image]
    infotexts: list[str]
    seeds: list[int]
    subseeds: list[int]
    sampler: str
    schedule: str
    warnings: list[str] = field(default_factory=list)


@contextlib.contextmanager
def _tiling(modules: list[torch.nn.Module], enabled: bool) -> Iterator[None]:
    """Seamless tiling: circular padding in every conv, restored afterwards (the model is shared)."""
    if not enabled:
        yield
        return
    convs = [m for mod in modules for m in mod.modules() if isinstance(m, torch.nn.Conv2d)]
    old = [c.padding_mode for c in convs]
    for c in convs:
        c.padding_mode = "circular"
    try:
        yield
    finally:
        for c, mode in zip(convs, old, strict=True):
            c.padding_mode = mode


def _step_kwargs(scheduler: Any, generators: list[torch.Generator], eta: float | None) -> dict[str, Any]:
    params = inspect.signature(scheduler.step).parameters
    kw: dict[str, Any] = {}
    if "generator" in params:
        # One CPU generator per image: ancestral noise doesn't depend on the batch (A1111).
        kw["generator"] = generators
    if "eta" in params and eta is not None:
        kw["eta"] = eta
    return kw


def _sdxl_time_ids(height: int, width: int, n: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    # original size, crop top-left, target size: A1111 uses the generation size for both.
    ids = torch.tensor([height, width, 0, 0, height, width], dtype=dtype, device=device)
    return ids.repeat(n, 1)


def sample(
    model: LoadedModel,
    scheduler: Any,
    noise: torch.Tensor,
    conds: JobConditioning,
    cfg_scale: float,
    steps: int,
    step_kwargs: dict[str, Any],
    size: tuple[int, int],
    control: JobControl | None = None,
    on_step: Callable[[int, torch.Tensor], None] | None = None,
    image_cond: torch.Tensor | None = None,
) -> torch.Tensor:
    """The denoising loop with classifier-free guidance and composable (AND) prompts.

    Returns the final latents (float32). The combination is A1111's:
    ``uncond + sum(w_i * cfg * (cond_i - uncond))``. ``image_cond`` (mask + masked-image
    latents) is appended to the UNet input of inpainting models.
    """
    dev, dtype = model.device, model.dtype
    scheduler.set_timesteps(steps, device=dev)
    latents = noise.to(dev, torch.float32) * scheduler.init_noise_sigma
    b = latents.shape[0]
    built_for: tuple[int, ...] | None = None
    for i, t in enumerate(scheduler.timesteps):
        if control is not None and (control.interrupted.is_set() or control.skipped.is_set()):
            break
        parts, uncond = conds.at(i)
        key = (*(id(c) for c, _ in parts), id(uncond))
        if key != built_for:  # rebuild the UNet inputs only where the schedule changes
            built_for = key
            weights = [w for _, w in parts]
            # At CFG 1 with one plain prompt the negative prompt has no effect: skip its UNet pass.
            guided = not (len(parts) == 1 and cfg_scale * weights[0] == 1.0)
            sources = ([uncond] if guided else []) + [c for c, _ in parts]
            context = torch.cat([c.context.repeat(b, 1, 1) for c in sources]).to(dev, dtype)
            added = None
            if model.family is Family.SDXL:
                h, w = size
                pooled = torch.cat([c.pooled.repeat(b, 1) for c in sources])
                added = {
                    "text_embeds": pooled.to(dev, dtype),
                    "time_ids": _sdxl_time_ids(h, w, context.shape[0], dev, dtype),
                }
        n = context.shape[0] // b
        x = scheduler.scale_model_input(torch.cat([latents] * n) if n > 1 else latents, t)
        if image_cond is not None:
            x = torch.cat([x, torch.cat([image_cond] * n).to(x.device, x.dtype)], dim=1)
        with torch.inference_mode():
            out = model.unet(x.to(dtype), t, encoder_hidden_states=context, added_cond_kwargs=added, return_dict=False)[0]
        out = out.float()
        if guided:
            out_uncond = out[:b]
            combined = out_uncond.clone()
            for j, w in enumerate(weights):
                combined += (out[(j + 1) * b : (j + 2) * b] - out_uncond) * (w * cfg_scale)
            out = combined
        latents = scheduler.step(out, t, latents, **step_kwargs, return_dict=False)[0]
        if on_step is not None:
            on_step(i + 1, latents)
    return latents


def _txt2img_image_cond(model: LoadedModel, vae: Any, req: GenerationRequest) -> torch.Tensor | None:
    """An inpainting model in txt2img sees the whole canvas masked (A1111: mask 1, gray image)."""
    if model.unet.config.in_channels != 9:
        return None
    gray = torch.zeros(1, 3, req.height, req.width, device=vae.device, dtype=vae.dtype)  # 0.5 gray in [-1, 1]
    with torch.inference_mode():
        latent = vae.encode(gray).latent_dist.mode() * model.vae_scale
    mask = torch.ones(1, 1, *latent.shape[2:], device=latent.device, dtype=latent.dtype)
    return torch.cat([mask, latent], dim=1).float()


def decode(vae: Any, latents: torch.Tensor, scale: float) -> list[Image.Image]:
    """Latents -> RGB images, one at a time (memory, and batch-independent results)."""
    images = []
    for lat in latents:
        with torch.inference_mode():
            x = vae.decode((lat[None] / scale).to(vae.device, vae.dtype), return_dict=False)[0]
        x = ((x.float() + 1) / 2).clamp(0, 1)[0]
        # A1111 truncates (astype uint8) rather than rounds.
        arr = (255.0 * x.permute(1, 2, 0).cpu().numpy()).astype(np.uint8)
        images.append(Image.fromarray(arr))
    return images


def infotext_params(
    req: GenerationRequest,
    choice: samplers.SamplerChoice,
    seed: int,
    subseed: int,
    model_id: Identity,
    vae_id: Identity | None,
) -> dict[str, Any]:
    """The infotext keys of one image, as A1111 writes them (order is applied by build_infotext)."""
    params: dict[str, Any] = {
        "Steps": req.steps,
        "Sampler": choice.sampler.name,
        "Schedule type": choice.schedule_label,
        "CFG scale": f"{req.cfg_scale:g}",
        "Seed": seed,
        "Size": f"{req.width}x{req.height}",
        "Model hash": model_id.shorthash or None,
        "Model": model_id.name,
        "VAE hash": vae_id.shorthash if vae_id else None,
        "VAE": vae_id.name if vae_id else None,
        "Variation seed": subseed if req.subseed_strength else None,
        "Variation seed strength": f"{req.subseed_strength:g}" if req.subseed_strength else None,
        "Seed resize from": (
            f"{req.seed_resize_from_w}x{req.seed_resize_from_h}"
            if req.seed_resize_from_w > 0 and req.seed_resize_from_h > 0
            else None
        ),
        "Clip skip": req.clip_skip if req.clip_skip > 1 else None,
        "RNG": RNG_SOURCE,
        "Tiling": "True" if req.tiling else None,
        "Eta": f"{req.eta:g}" if req.eta is not None else None,
        "Version": f"muralist {__version__}",
    }
    return params


@dataclass
class Extras:
    """Extra networks a job uses, resolved by the caller: LoRAs as (info, te weight, unet weight)
    and the textual-inversion embeddings usable with this model."""

    loras: list[tuple[Any, float, float]] = field(default_factory=list)
    embeddings: dict[str, Any] = field(default_factory=dict)


def _hash_list(items: list[tuple[str, str]]) -> str | None:
    # A1111: "name: hash, name2: hash2" (quoted by the infotext writer because of the colons).
    return ", ".join(f"{n}: {h}" for n, h in items) if items else None


def txt2img(
    model: LoadedModel,
    req: GenerationRequest,
    model_id: Identity,
    vae: Any | None = None,
    vae_id: Identity | None = None,
    control: JobControl | None = None,
    progress: ProgressFn | None = None,
    extras: Extras | None = None,
) -> GenerationResult:
    """Generate ``req.n_iter`` batches of ``req.batch_size`` images. Raises Interrupted if interrupted.

    ``<lora:...>`` tags are removed from the prompt before encoding; the LoRAs in ``extras`` are
    merged into the model for this job only and removed before it returns.
    """
    extras = extras or Extras()
    choice = samplers.resolve(req.sampler_name, req.scheduler)
    seeds, subseeds = all_seeds(req.seed, req.subseed, req.subseed_strength, req.total_images)
    vae = vae if vae is not None else model.vae
    started = time.monotonic()
    result = GenerationResult([], [], [], [], choice.sampler.name, choice.schedule_label)
    latent_shape = (4, req.height // 8, req.width // 8)
    prompt, _ = extract_extra_networks(req.prompt)
    negative, _ = extract_extra_networks(req.negative_prompt)
    with model.lock, _tiling([model.unet, vae], req.tiling), _loras(model, extras.loras):
        image_cond = _txt2img_image_cond(model, vae, req)
        encoder = PromptEncoder(model, req.clip_skip, extras.embeddings, req.novelai_braces)
        conds = job_conditioning(encoder, prompt, negative, req.steps)
        extra_params = {
            "Lora hashes": _hash_list([(info.name, info.shorthash) for info, te, un in extras.loras if te or un]),
            "TI hashes": _hash_list([(e.name, e.shorthash) for e in encoder.used_embeddings.values()]),
        }
        for n in range(req.n_iter):
            if control is not None and control.interrupted.is_set():
                raise Interrupted()
            if control is not None:
                control.skipped.clear()
            bs = slice(n * req.batch_size, (n + 1) * req.batch_size)
            batch_seeds, batch_subseeds = seeds[bs], subseeds[bs]
            rng = ImageNoise(
                batch_seeds,
                batch_subseeds,
                req.subseed_strength,
                req.seed_resize_from_h,
                req.seed_resize_from_w,
                shape=latent_shape,
            )
            noise = rng.first()
            scheduler = choice.make(model.prediction_type, batch_seeds)

            def on_step(step: int, latents: torch.Tensor, n: int = n) -> None:
                if progress is not None:
                    progress(Progress(n, req.n_iter, step, req.steps, started, latents))

            latents = sample(
                model,
                scheduler,
                noise,
                conds,
                req.cfg_scale,
                req.steps,
                _step_kwargs(scheduler, rng.generators, req.eta),
                (req.height, req.width),
                control,
                on_step,
                image_cond.repeat(req.batch_size, 1, 1, 1) if image_cond is not None else None,
            )
            if control is not None and control.interrupted.is_set():
                raise Interrupted()
            if control is not None and control.skipped.is_set():
                result.warnings.append(f"batch {n + 1} of {req.n_iter} was skipped")
                continue
            for img, seed, subseed in zip(decode(vae, latents, model.vae_scale), batch_seeds, batch_subseeds, strict=True):
                params = infotext_params(req, choice, seed, subseed, model_id, vae_id)
                params.update(extra_params)
                result.images.append(img)
                result.infotexts.append(build_infotext(req.prompt, req.negative_prompt, params))
                result.seeds.append(seed)
                result.subseeds.append(subseed)
    return result


@contextlib.contextmanager
def _loras(model: LoadedModel, loras: list[tuple[Any, float, float]]) -> Iterator[None]:
    if not loras:
        yield
        return
    from ..networks.lora import applied_loras

    with applied_loras(model, loras):
        yield
