"""txt2img with A1111's semantics on a loaded model.

Everything a run needs arrives as arguments (model, VAE, request, control); the loaded model is
only read, so the same model serves one job after another without carrying state between them.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from .. import __version__
from ..errors import InvalidRequestError
from ..infotext import build_infotext
from ..models.family import Family
from ..models.loader import LoadedModel
from ..prompts.parser import extract_extra_networks
from ..request import GenerationRequest
from . import samplers
from .conditioning import JobConditioning, PromptEncoder, job_conditioning
from .seeds import RNG_SOURCE, ImageNoise, all_seeds


class Interrupted(Exception):
    """The job was canceled by its owner; the partial images are discarded."""


@dataclass
class JobControl:
    """Interrupt/skip flags of ONE job (A1111 has one global pair; here every job has its own)."""

    interrupted: threading.Event = field(default_factory=threading.Event)  # cancel: nothing is kept
    skipped: threading.Event = field(default_factory=threading.Event)  # end this batch, keep it as it is
    stopped: threading.Event = field(default_factory=threading.Event)  # A1111's interrupt: keep what is done

    def interrupt(self) -> None:
        self.interrupted.set()

    def stop_early(self) -> None:
        self.stopped.set()

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
    detected: list[Image.Image] = field(default_factory=list)  # ControlNet maps, as clients get them


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


def schedule_tuning(req: GenerationRequest) -> samplers.ScheduleTuning:
    return samplers.ScheduleTuning(req.sigma_min, req.sigma_max, req.rho, req.always_discard_next_to_last_sigma,
                                   req.beta_dist_alpha, req.beta_dist_beta)


@dataclass(frozen=True)
class SamplingOptions:
    """A1111's sampler options of one job; None means A1111's default for the sampler."""

    eta: float | None = None
    s_noise: float | None = None
    s_churn: float | None = None
    s_tmin: float | None = None
    s_tmax: float | None = None
    sgm_noise_multiplier: bool = False
    tuning: samplers.ScheduleTuning = field(default_factory=samplers.ScheduleTuning)

    @classmethod
    def of(cls, req: GenerationRequest) -> SamplingOptions:
        return cls(req.eta, req.s_noise, req.s_churn, req.s_tmin, req.s_tmax, req.sgm_noise_multiplier, schedule_tuning(req))

    def kwargs_for(self, fn: Callable[..., Any], extra: tuple[str, ...]) -> dict[str, Any]:
        """What A1111 passes a k-diffusion sampler function: eta where it takes one (default 1, the
        eta_ancestral option) and the sampler's own extra params, s_tmax 0 meaning no upper limit."""
        values = {"eta": 1.0 if self.eta is None else self.eta, "s_noise": 1.0 if self.s_noise is None else self.s_noise,
                  "s_churn": self.s_churn or 0.0, "s_tmin": self.s_tmin or 0.0, "s_tmax": self.s_tmax or math.inf}
        params = inspect.signature(fn).parameters
        return {k: v for k, v in values.items() if k in params and (k == "eta" or k in extra)}


def _step_kwargs(scheduler: Any, generators: list[torch.Generator], eta: float | None) -> dict[str, Any]:
    params = inspect.signature(scheduler.step).parameters
    kw: dict[str, Any] = {}
    if "generator" in params:
        # One CPU generator per image: step noise doesn't depend on the batch (A1111).
        kw["generator"] = generators
    if "eta" in params and eta is not None:
        kw["eta"] = eta
    return kw


def _noise_options(model: LoadedModel, req: GenerationRequest) -> dict[str, Any]:
    return {"eta_noise_seed_delta": req.eta_noise_seed_delta,
            "device": model.device if req.randn_source == "GPU" else "cpu"}


def fixed_steps(steps: int, strength: float) -> int:
    """The schedule length with which the last ``steps`` steps start at ``strength`` (A1111: hires
    fix always, img2img with "img2img_fix_steps")."""
    return int(steps / min(strength, 0.999)) if strength > 0 else steps


def img2img_steps(choice: samplers.SamplerChoice, steps: int, strength: float, fix_steps: bool) -> tuple[int, int]:
    """(schedule length, steps run) of an img2img pass, as A1111 counts them.

    k-diffusion samplers enter a schedule of ``steps`` (or, with fixed steps, a longer one) at index
    ``steps - t_enc - 1`` and so run t_enc + 1 steps; the timestep samplers run t_enc.
    """
    if fix_steps:
        sched, t_enc = fixed_steps(steps, strength), steps - 1
    else:
        sched, t_enc = steps, int(min(strength, 0.999) * steps)
    if choice.sampler.is_k:
        return sched, t_enc + 1
    return sched, max(1, min(t_enc if not fix_steps else steps, sched))


def _sdxl_time_ids(height: int, width: int, n: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    # original size, crop top-left, target size: A1111 uses the generation size for both.
    ids = torch.tensor([height, width, 0, 0, height, width], dtype=dtype, device=device)
    return ids.repeat(n, 1)


class _Stop(Exception):
    """Raised inside a sampler when the job is interrupted or skipped: the loop ends where it is."""


_MODEL_SIGMAS: dict[bool, Any] = {}


def model_sigmas(lcm: bool = False) -> Any:
    """The training noise levels of SD1/SD2/SDXL (all share one beta schedule), or the 50 levels of
    A1111's LCM denoiser; built once each."""
    if lcm not in _MODEL_SIGMAS:
        from .ksampling import LcmSigmas, ModelSigmas

        _MODEL_SIGMAS[lcm] = LcmSigmas() if lcm else ModelSigmas()
    return _MODEL_SIGMAS[lcm]


class _GuidedUNet:
    """One guided model evaluation: every prompt part and the negative prompt through the UNet,
    combined as A1111 does: ``uncond + sum(w_i * cfg * (cond_i - uncond))``.

    Conditionings of different lengths (prompt and negative prompt without "Pad prompt/negative
    prompt") go through the UNet in separate calls, as in A1111.
    """

    def __init__(self, model: LoadedModel, conds: JobConditioning, cfg_scale: float, size: tuple[int, int],
                 image_cond: torch.Tensor | None, controls: Callable[..., dict[str, Any]] | None) -> None:
        self.model, self.conds, self.cfg_scale, self.size = model, conds, cfg_scale, size
        self.image_cond, self.controls = image_cond, controls
        self._built_for: tuple[int, ...] | None = None
        self._groups: list[tuple[list[int], torch.Tensor, dict[str, Any] | None, int]] = []

    def _build(self, call: int, b: int) -> None:
        parts, uncond = self.conds.at(call)
        key = (*(id(c) for c, _ in parts), id(uncond))
        if key == self._built_for:
            return
        self._built_for = key
        model, dev, dtype = self.model, self.model.device, self.model.dtype
        self.weights = [w for _, w in parts]
        # At CFG 1 with one plain prompt the negative prompt has no effect: skip its UNet pass.
        self.guided = not (len(parts) == 1 and self.cfg_scale * self.weights[0] == 1.0)
        sources = ([uncond] if self.guided else []) + [c for c, _ in parts]
        by_len: dict[int, list[int]] = {}
        for i, c in enumerate(sources):
            by_len.setdefault(c.context.shape[1], []).append(i)
        self._groups = []
        for idx in by_len.values():
            context = torch.cat([sources[i].context.repeat(b, 1, 1) for i in idx]).to(dev, dtype)
            added = None
            if model.family is Family.SDXL:
                h, w = self.size
                pooled = torch.cat([sources[i].pooled.repeat(b, 1) for i in idx])
                added = {"text_embeds": pooled.to(dev, dtype), "time_ids": _sdxl_time_ids(h, w, context.shape[0], dev, dtype)}
            self._groups.append((idx, context, added, b if (self.guided and 0 in idx) else 0))
        self._n_sources = len(sources)

    def __call__(self, x: torch.Tensor, t: Any, call: int, pct: float) -> torch.Tensor:
        """The combined model output (eps or v, float32) for UNet input ``x`` at timestep ``t``."""
        b = x.shape[0]
        self._build(call, b)
        outs: list[torch.Tensor | None] = [None] * self._n_sources
        for idx, context, added, uncond_rows in self._groups:
            xin = torch.cat([x] * len(idx)) if len(idx) > 1 else x
            residuals: dict[str, Any] = {}
            if self.controls is not None:  # ControlNet units active now add to the UNet's skip connections
                residuals = self.controls(xin.to(self.model.dtype), t, context, added, pct, uncond_rows)
            if self.image_cond is not None:
                ic = self.image_cond.to(xin.device, xin.dtype)
                xin = torch.cat([xin, torch.cat([ic] * len(idx)) if len(idx) > 1 else ic], dim=1)
            with torch.inference_mode():
                out = self.model.unet(xin.to(self.model.dtype), t, encoder_hidden_states=context, added_cond_kwargs=added,
                                      return_dict=False, **residuals)[0].float()
            for j, i in enumerate(idx):
                outs[i] = out[j * b : (j + 1) * b]
        if not self.guided:
            return outs[0]
        uncond = outs[0]
        combined = uncond.clone()
        for j, w in enumerate(self.weights):
            combined += (outs[j + 1] - uncond) * (w * self.cfg_scale)
        return combined


def sample(
    model: LoadedModel,
    choice: samplers.SamplerChoice,
    rng: ImageNoise,
    noise: torch.Tensor,
    conds: JobConditioning,
    cfg_scale: float,
    steps: int,
    options: SamplingOptions,
    size: tuple[int, int],
    control: JobControl | None = None,
    on_step: Callable[[int, torch.Tensor], None] | None = None,
    image_cond: torch.Tensor | None = None,
    init_latent: torch.Tensor | None = None,
    strength: float = 1.0,
    latent_mask: torch.Tensor | None = None,
    fix_steps: bool = False,
    controls: Callable[..., dict[str, Any]] | None = None,
) -> torch.Tensor:
    """The denoising loop with classifier-free guidance and composable (AND) prompts.

    Returns the final latents (float32). ``image_cond`` (mask + masked-image latents) is appended to
    the UNet input of inpainting models; ``latent_mask`` (1 = repaint) keeps the rest of
    ``init_latent`` for ordinary models. ``rng`` gives the per-image step noise.
    """
    guided = _GuidedUNet(model, conds, cfg_scale, size, image_cond, controls)
    if choice.sampler.is_k:
        return _sample_k(model, choice, rng, noise, guided, steps, options, control, on_step, init_latent, strength,
                         latent_mask, fix_steps)
    return _sample_diffusers(model, choice, rng, noise, guided, steps, options, control, on_step, init_latent, strength,
                             latent_mask, fix_steps)


def _sample_k(model: LoadedModel, choice: samplers.SamplerChoice, rng: ImageNoise, noise: torch.Tensor,
              guided: _GuidedUNet, steps: int, options: SamplingOptions, control: JobControl | None,
              on_step: Callable[[int, torch.Tensor], None] | None, init_latent: torch.Tensor | None, strength: float,
              latent_mask: torch.Tensor | None, fix_steps: bool) -> torch.Tensor:
    """A k-diffusion-style sampler on A1111's denoiser: x at sigma -> the model's clean-image estimate."""
    from . import ksampling

    dev = model.device
    ms = model_sigmas(choice.sampler.lcm)
    sdxl = model.family is Family.SDXL
    noise = noise.to(dev, torch.float32)
    if init_latent is None:
        sched_steps, run = steps, steps
        sigmas = choice.sigmas(steps, ms, sdxl, options.tuning)
        x = noise * (float((1 + sigmas[0] ** 2) ** 0.5) if options.sgm_noise_multiplier else float(sigmas[0]))
    else:
        sched_steps, run = img2img_steps(choice, steps, strength, fix_steps)
        sigmas = choice.sigmas(sched_steps, ms, sdxl, options.tuning)[sched_steps - run:]
        init_latent = init_latent.to(dev, torch.float32)
        x = init_latent + noise * float(sigmas[0])
    v_pred = model.prediction_type == "v_prediction"
    state = {"calls": 0, "done": 0, "last": x}
    keep = None if latent_mask is None or init_latent is None else (init_latent, latent_mask.to(dev, torch.float32))

    def denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if _stopped(control):
            raise _Stop()
        s = float(sigma)
        t = ms.sigma_to_t(sigma).to(dev, torch.float32)
        # A1111's step counter for ControlNet: the index of the last finished step (0 on the first two)
        pct = max(state["done"] - 1, 0) / max(1, run)
        out = guided(x * (1 / (s * s + 1) ** 0.5), t, state["calls"], pct)
        state["calls"] += 1
        if v_pred:
            denoised = x * (1 / (s * s + 1)) - out * (s / (s * s + 1) ** 0.5)
        else:
            denoised = x - out * s
        if choice.sampler.lcm:
            denoised = ms.boundary(x, sigma, denoised)
        if keep is not None:  # outside the mask the prediction is the original image (A1111)
            denoised = keep[0] * (1 - keep[1]) + denoised * keep[1]
        return denoised

    def callback(i: int, x: torch.Tensor, denoised: torch.Tensor) -> None:
        # DPM fast/adaptive take fewer, uneven steps: their progress is counted in model calls
        done = state["calls"] if choice.sampler.own_schedule else i + 1
        state["done"], state["last"] = done, denoised
        if on_step is not None:
            on_step(min(done, run), denoised)

    if choice.sampler.brownian:
        positive = sigmas[sigmas > 0]
        noise_fn: ksampling.NoiseSampler = ksampling.BrownianNoise(x, float(positive.min()), float(sigmas.max()), rng.seeds)
    else:
        def noise_fn(sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
            return rng.next().to(dev, torch.float32)

    fn = getattr(ksampling, choice.sampler.func, None)
    if fn is None:
        from . import ksolvers

        fn = getattr(ksolvers, choice.sampler.func)
    kwargs = dict(choice.sampler.kwargs, **options.kwargs_for(fn, choice.sampler.extra))
    params = inspect.signature(fn).parameters
    try:
        if "sigma_min" in params:  # DPM fast/adaptive choose their own steps between two sigmas
            lo, hi = (ms.sigma_min, ms.sigma_max) if init_latent is None else (float(sigmas[-2]), float(sigmas[0]))
            args = (lo, hi, run) if "n" in params else (lo, hi)
            x = fn(denoiser, x, *args, noise_fn, callback, **kwargs)
        else:
            x = fn(denoiser, x, sigmas, noise_fn, callback, **kwargs)
    except _Stop:
        x = state["last"]  # A1111 keeps the last prediction of an interrupted run
    if keep is not None:
        x = keep[0] * (1 - keep[1]) + x * keep[1]
    return x


def _sample_diffusers(model: LoadedModel, choice: samplers.SamplerChoice, rng: ImageNoise, noise: torch.Tensor,
                      guided: _GuidedUNet, steps: int, options: SamplingOptions, control: JobControl | None,
                      on_step: Callable[[int, torch.Tensor], None] | None, init_latent: torch.Tensor | None,
                      strength: float, latent_mask: torch.Tensor | None, fix_steps: bool) -> torch.Tensor:
    """A1111's timestep samplers (DDIM, PLMS, UniPC, LCM) on diffusers' schedulers."""
    dev = model.device
    scheduler = choice.make(model.prediction_type)
    step_kwargs = _step_kwargs(scheduler, rng.generators, options.eta)
    # img2img: run the last int(steps * strength) steps of the schedule from the noised image, or
    # with fix_steps exactly `steps` steps of a longer schedule (A1111).
    sched_steps, t_enc = img2img_steps(choice, steps, strength, fix_steps) if init_latent is not None else (steps, steps)
    scheduler.set_timesteps(sched_steps, device=dev)
    noise = noise.to(dev, torch.float32)
    timesteps = scheduler.timesteps
    if init_latent is None:
        latents = noise * scheduler.init_noise_sigma
    else:
        start = (sched_steps - t_enc) * scheduler.order
        timesteps = timesteps[start:]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(start)
        init_latent = init_latent.to(dev, torch.float32)
        latents = scheduler.add_noise(init_latent, noise, timesteps[:1])
    order = getattr(scheduler, "order", 1)
    n_run = max(1, -(-len(timesteps) // order))
    for i, t in enumerate(timesteps):
        if _stopped(control):
            break
        x = scheduler.scale_model_input(latents, t)
        # A1111's step counter for ControlNet: the index of the last finished step (0 on the first two).
        out = guided(x, t, i, max(i // order - 1, 0) / n_run)
        latents = scheduler.step(out, t, latents, **step_kwargs, return_dict=False)[0]
        if latent_mask is not None and init_latent is not None:
            # Outside the mask the latents follow the original image, noised to the next step.
            orig = init_latent if i + 1 >= len(timesteps) else scheduler.add_noise(init_latent, noise, timesteps[i + 1 : i + 2])
            latents = orig * (1 - latent_mask) + latents * latent_mask
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
    conds: list[JobConditioning] | tuple[JobConditioning, ...] = (),
) -> dict[str, Any]:
    """The infotext keys of one image, as A1111 v1.10 writes them (order is applied by build_infotext).

    ``conds``: the job's conditionings (first pass, hires pass), for "Emphasis" and "Pad conds".
    Floats stay floats, so they are written as A1111 writes them ("CFG scale: 7.0").
    """
    from ..infotext import sampler_params, uses_ensd
    from .conditioning import infotext_of

    # A1111 derives "Schedule type" from the schedule type asked for, per sampler (sampler_params).
    asked_label = samplers.SCHEDULES[choice.requested][0]
    name = choice.sampler.name
    params: dict[str, Any] = {
        "Steps": req.steps,
        "Sampler": name,
        "CFG scale": float(req.cfg_scale),
        "Seed": seed,
        "Size": f"{req.width}x{req.height}",
        "Model hash": model_id.shorthash or None,
        "Model": model_id.name,
        "VAE hash": vae_id.shorthash if vae_id else None,
        "VAE": vae_id.name if vae_id else None,
        "Variation seed": subseed if req.subseed_strength else None,
        "Variation seed strength": float(req.subseed_strength) if req.subseed_strength else None,
        "Seed resize from": (
            f"{req.seed_resize_from_w}x{req.seed_resize_from_h}"
            if req.seed_resize_from_w > 0 and req.seed_resize_from_h > 0
            else None
        ),
        "Clip skip": req.clip_skip if req.clip_skip > 1 else None,
        "ENSD": req.eta_noise_seed_delta if req.eta_noise_seed_delta and uses_ensd(name, req.eta) else None,
        # A1111 writes RNG only when it is not its default, GPU.
        "RNG": RNG_SOURCE if req.randn_source == "CPU" else None,
        "Tiling": "True" if req.tiling else None,
        **sampler_params(name, asked_label, eta=req.eta, s_churn=req.s_churn, s_tmin=req.s_tmin, s_tmax=req.s_tmax,
                         s_noise=req.s_noise, sgm_noise_multiplier=req.sgm_noise_multiplier,
                         txt2img=not req.init_images),
        **choice.schedule_infotext(schedule_tuning(req), model_sigmas(choice.sampler.lcm)),
        **infotext_of(conds),
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


LATENT_MODES = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """RGB images -> a (B, 3, H, W) float32 batch in [-1, 1], what the VAE encodes."""
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 127.5 - 1.0 for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2)


def encode(vae: Any, images: list[Image.Image], scale: float) -> torch.Tensor:
    """RGB images -> latents (the distribution's mode: deterministic, unlike a sample)."""
    x = to_tensor(images).to(vae.device, vae.dtype)
    with torch.inference_mode():
        return vae.encode(x).latent_dist.mode().float() * scale


@dataclass
class _Img2ImgInputs:
    """Per-job img2img inputs at generation size."""

    images: list[Image.Image]  # what is encoded (after resize, crop and masked-content fill)
    originals: list[Image.Image]  # for pasting back
    mask: Any = None  # images.PreparedMask
    latent_mask: torch.Tensor | None = None  # (1, 1, h/8, w/8), 1 = repaint


def _prepare_img2img(req: GenerationRequest, upscale: Any = None) -> _Img2ImgInputs:
    from PIL import ImageFilter

    from . import images as im

    resize = im.lanczos
    name = req.upscaler_for_img2img
    if name and name != "None" and upscale is not None:
        # A1111's "Upscaler for img2img": enlarge with it, shrink (and fit exactly) with Lanczos.
        def resize(img: Image.Image, w: int, h: int) -> Image.Image:
            return upscale(img, w, h, name) if max(w / img.width, h / img.height) > 1 else im.lanczos(img, w, h)

    originals = [im.decode_image(d, f"init_images[{i}]").convert("RGB") for i, d in enumerate(req.init_images)]
    if req.mask is None:
        return _Img2ImgInputs([im.resize_image(req.resize_mode, o, req.width, req.height, resize) for o in originals], originals)
    mask = im.decode_image(req.mask, "mask").convert("L")
    if mask.size != originals[0].size:
        raise InvalidRequestError(
            f"mask: its size {mask.width}x{mask.height} differs from the init image's {originals[0].width}x{originals[0].height}"
        )
    if req.inpainting_mask_invert:
        mask = ImageOps.invert(mask)
    blurred = mask.filter(ImageFilter.GaussianBlur(req.mask_blur)) if req.mask_blur else mask
    crop = None
    if req.inpaint_full_res:
        box = im.masked_bbox(mask, req.inpaint_full_res_padding)
        if box is None:
            raise InvalidRequestError("mask: it is empty (all black): paint the area to repaint in white")
        crop = im.expand_to_ratio(box, req.width, req.height, mask.width, mask.height)
        work_mask = blurred.crop(crop).resize((req.width, req.height), Image.LANCZOS)
        images = [o.crop(crop).resize((req.width, req.height), Image.LANCZOS) for o in originals]
    else:
        work_mask = im.resize_image(req.resize_mode, blurred.convert("RGB"), req.width, req.height).convert("L")
        images = [im.resize_image(req.resize_mode, o, req.width, req.height, resize) for o in originals]
        originals = [o.resize((req.width, req.height), Image.LANCZOS) if o.size != (req.width, req.height) else o for o in originals]
        blurred = work_mask
    if req.inpainting_fill == 0:
        images = [im.fill_masked(i, work_mask) for i in images]
    latent = torch.from_numpy(im.mask_to_latent(work_mask, req.width, req.height))[None, None]
    return _Img2ImgInputs(images, originals, im.PreparedMask(work_mask, blurred, crop), latent)


def generate_images(
    model: LoadedModel,
    req: GenerationRequest,
    model_id: Identity,
    vae: Any | None = None,
    vae_id: Identity | None = None,
    control: JobControl | None = None,
    progress: ProgressFn | None = None,
    extras: Extras | None = None,
    upscale: Callable[[Image.Image, int, int, str], Image.Image] | None = None,
    controls: list[Any] | None = None,
) -> GenerationResult:
    """txt2img (with hires fix) or, when ``req.init_images`` is set, img2img and inpainting.

    Generates ``req.n_iter`` batches of ``req.batch_size`` images; raises Interrupted if
    interrupted. ``<lora:...>`` tags are removed from the prompt before encoding; the LoRAs in
    ``extras`` are merged into the model for this job only and removed before it returns.
    ``upscale(image, width, height, upscaler)`` resizes with a named non-latent upscaler.
    """
    extras = extras or Extras()
    img2img = bool(req.init_images)
    choice = samplers.resolve(req.sampler_name, req.scheduler)
    hr_choice = samplers.resolve(req.hr_sampler_name or req.sampler_name, req.hr_scheduler or req.scheduler) if req.enable_hr else None
    if req.enable_hr and img2img:
        raise InvalidRequestError("enable_hr: hires fix is for txt2img; img2img takes the size you ask for")
    if req.enable_hr and req.hr_checkpoint_name not in (None, "", "Use same checkpoint"):
        raise InvalidRequestError("hr_checkpoint_name: a different checkpoint for the hires pass is not available yet; "
                                  "leave it empty or 'Use same checkpoint'")
    hr_upscaler = req.hr_upscaler or "Latent"
    if req.enable_hr and hr_upscaler not in LATENT_MODES and upscale is None:
        raise InvalidRequestError(f"hr_upscaler: {hr_upscaler!r} is not available here; use one of {', '.join(LATENT_MODES)}")
    seeds, subseeds = all_seeds(req.seed, req.subseed, req.subseed_strength, req.total_images)
    vae = vae if vae is not None else model.vae
    started = time.monotonic()
    result = GenerationResult([], [], [], [], choice.sampler.name, choice.schedule_label)
    latent_shape = (4, req.height // 8, req.width // 8)
    prompt, _ = extract_extra_networks(req.prompt)
    negative, _ = extract_extra_networks(req.negative_prompt)
    inputs = _prepare_img2img(req, upscale) if img2img else None
    strength = req.denoising_strength if req.denoising_strength is not None else (0.75 if img2img else 0.7)
    inpaint_model = model.unet.config.in_channels == 9
    total_steps = req.steps
    if img2img:
        total_steps = img2img_steps(choice, req.steps, strength, req.img2img_fix_steps)[1]
    # A1111's hires pass always runs exactly its steps (a longer schedule, entered at the strength).
    hr_steps = (req.hr_second_pass_steps or req.steps) if req.enable_hr else 0
    controls = controls or []
    low_hook = hr_hook = None
    if controls:
        from ..controlnet.apply import ControlHook

        mask = None
        if req.mask is not None:  # an inpaint unit without a mask of its own takes the img2img mask
            from .images import decode_image

            mask_img = decode_image(req.mask, "mask").convert("L")
            mask = np.asarray(ImageOps.invert(mask_img) if req.inpainting_mask_invert else mask_img)
        for c in controls:
            c.prepare(seeds[0], subseeds[0], req.width, req.height, inputs.originals[0] if inputs else None, req.resize_mode,
                      mask)
        phase = "low" if req.enable_hr else None
        low_hook, hr_hook = ControlHook(controls, phase) or None, ControlHook(controls, "high") or None
    with model.lock, _tiling([model.unet, vae], req.tiling), _loras(model, extras.loras):
        encoder = PromptEncoder(model, req.clip_skip, extras.embeddings, req.novelai_braces, req.emphasis)
        conds = job_conditioning(encoder, prompt, negative, choice.sampler.prompt_steps(req.steps),
                                 pad_cond_uncond=req.pad_cond_uncond)
        hr_conds = None
        if hr_choice is not None:
            # Once per job. A1111 (since 1.6) schedules the hires pass's prompt editing after the first
            # pass's steps: "[a:b:0.5]" is b for the whole hires pass, "[a:b:1.5]" switches half-way.
            hr_prompt = extract_extra_networks(req.hr_prompt)[0] if req.hr_prompt else prompt
            hr_negative = extract_extra_networks(req.hr_negative_prompt)[0] if req.hr_negative_prompt else negative
            hr_conds = job_conditioning(encoder, hr_prompt, hr_negative,
                                        hr_choice.sampler.prompt_steps(req.hr_second_pass_steps or req.steps),
                                        pad_cond_uncond=req.pad_cond_uncond,
                                        base_steps=choice.sampler.prompt_steps(req.steps))
        extra_params: dict[str, Any] = {}
        for i, c in enumerate(controls):
            extra_params[f"ControlNet {i}"] = c.infotext
        for n in range(req.n_iter):
            if control is not None and control.interrupted.is_set():
                raise Interrupted()
            if control is not None and control.stopped.is_set():
                break  # A1111's interrupt: the batches done so far are the result
            if control is not None:
                control.skipped.clear()
            bs = slice(n * req.batch_size, (n + 1) * req.batch_size)
            batch_seeds, batch_subseeds = seeds[bs], subseeds[bs]
            rng = ImageNoise(batch_seeds, batch_subseeds, req.subseed_strength, req.seed_resize_from_h, req.seed_resize_from_w,
                             shape=latent_shape, **_noise_options(model, req))
            noise = rng.first()

            def on_step(step: int, latents: torch.Tensor, n: int = n, offset: int = 0) -> None:
                if progress is not None:
                    progress(Progress(n, req.n_iter, offset + step, total_steps + hr_steps, started, latents))

            init_latent = latent_mask = image_cond = None
            if inputs is not None:
                batch_images = [inputs.images[(n * req.batch_size + i) % len(inputs.images)] for i in range(req.batch_size)]
                init_latent = encode(vae, batch_images, model.vae_scale)
                if req.resize_mode == 3 and inputs.mask is None:  # latent upscale: encode at source size, resize latents
                    src = [inputs.originals[(n * req.batch_size + i) % len(inputs.originals)] for i in range(req.batch_size)]
                    init_latent = torch.nn.functional.interpolate(
                        encode(vae, src, model.vae_scale), size=latent_shape[1:], mode="bilinear", antialias=False
                    )
                if inputs.latent_mask is not None:
                    latent_mask = inputs.latent_mask.to(init_latent.device)
                    if req.inpainting_fill == 2:
                        init_latent = init_latent * (1 - latent_mask) + noise.to(init_latent.device) * latent_mask
                    elif req.inpainting_fill == 3:
                        init_latent = init_latent * (1 - latent_mask)
                if inpaint_model:
                    image_cond = _inpaint_image_cond(model, vae, batch_images, latent_mask, init_latent.shape)
            elif inpaint_model:
                image_cond = _txt2img_image_cond(model, vae, req).repeat(req.batch_size, 1, 1, 1)
            for c in controls:
                c.set_size(req.width, req.height, model.device, model.dtype)
            latents = sample(
                model, choice, rng, noise, conds, req.cfg_scale, req.steps, SamplingOptions.of(req), (req.height, req.width), control, on_step, image_cond, init_latent, strength if img2img else 1.0,
                None if inpaint_model else latent_mask, req.img2img_fix_steps, low_hook,
            )
            if req.enable_hr and not _stopped(control):
                for c in controls:
                    c.set_size(*req.hr_size, model.device, model.dtype)
                latents = _hires_pass(model, vae, req, hr_choice, hr_upscaler, strength, latents, batch_seeds, batch_subseeds,
                                      hr_conds, control,
                                      lambda step, lat, n=n: on_step(step, lat, n, total_steps), upscale, hr_hook)
                extra_params.update(_hires_params(req, hr_upscaler, strength, hr_choice, choice))
            if control is not None and control.interrupted.is_set():
                raise Interrupted()
            if control is not None and (control.skipped.is_set() or control.stopped.is_set()):
                # A1111 decodes the latents as they are and keeps that image (with its real seed).
                how = "interrupted" if control.stopped.is_set() else "skipped"
                result.warnings.append(f"batch {n + 1} of {req.n_iter} was {how}: its images are unfinished")
            images = decode(vae, latents, model.vae_scale)
            if inputs is not None and inputs.mask is not None:
                from .images import paste_back

                images = [
                    paste_back(inputs.originals[(n * req.batch_size + i) % len(inputs.originals)], img, inputs.mask.blurred, inputs.mask.crop)
                    for i, img in enumerate(images)
                ]
            if img2img:
                extra_params.update(_img2img_params(req, strength))
            lora_ti = {
                "Lora hashes": _hash_list([(info.name, info.shorthash) for info, te, un in extras.loras if te or un]),
                "TI hashes": _hash_list([(e.name, e.shorthash) for e in encoder.used_embeddings.values()]),
            }
            for img, seed, subseed in zip(images, batch_seeds, batch_subseeds, strict=True):
                params = infotext_params(req, choice, seed, subseed, model_id, vae_id, conds=(conds,))
                params.update(extra_params)
                params.update(lora_ti)
                result.images.append(img)
                result.infotexts.append(build_infotext(req.prompt, req.negative_prompt, params))
                result.seeds.append(seed)
                result.subseeds.append(subseed)
    for c in controls:  # the extension's order: with hires fix the hires-size map, then the base one
        if c.unit.save_detected_map:
            if req.enable_hr and c.unit.hr_option != "Low res only":
                result.detected.append(Image.fromarray(c.client_map(*req.hr_size)))
            if not req.enable_hr or c.unit.hr_option != "High res only":
                result.detected.append(Image.fromarray(c.client_map(req.width, req.height)))
    return result


txt2img = generate_images  # the name callers used before img2img existed


def _stopped(control: JobControl | None) -> bool:
    return control is not None and (control.interrupted.is_set() or control.skipped.is_set() or control.stopped.is_set())


def _inpaint_image_cond(model: LoadedModel, vae: Any, images: list[Image.Image], latent_mask: torch.Tensor | None,
                        shape: torch.Size) -> torch.Tensor:
    """9-channel inpainting models see the mask and the image with the masked area blanked (A1111)."""
    x = to_tensor(images)
    if latent_mask is None:
        pixel_mask = torch.ones(1, 1, *x.shape[2:])
        latent_mask = torch.ones(1, 1, *shape[2:])
    else:
        pixel_mask = torch.nn.functional.interpolate(latent_mask.float().cpu(), size=x.shape[2:], mode="nearest")
    masked = (x * (1 - pixel_mask)).to(vae.device, vae.dtype)
    with torch.inference_mode():
        lat = vae.encode(masked).latent_dist.mode().float() * model.vae_scale
    m = latent_mask.float().to(lat.device).expand(lat.shape[0], 1, *lat.shape[2:])
    return torch.cat([m, lat], dim=1)


def _hires_pass(model: LoadedModel, vae: Any, req: GenerationRequest, choice: samplers.SamplerChoice, upscaler: str,
                strength: float, latents: torch.Tensor, seeds: list[int], subseeds: list[int], hr_conds: JobConditioning,
                control: JobControl | None, on_step: Callable[[int, torch.Tensor], None], upscale: Any,
                controls: Any = None) -> torch.Tensor:
    """Hires fix: upscale the first pass (in latent space, or as an image) and run img2img on it."""
    w, h = req.hr_size
    if upscaler in LATENT_MODES:
        mode, aa = LATENT_MODES[upscaler]
        init = torch.nn.functional.interpolate(latents, size=(h // 8, w // 8), mode=mode, antialias=aa)
    else:
        big = [upscale(img, w, h, upscaler) for img in decode(vae, latents, model.vae_scale)]
        init = encode(vae, big, model.vae_scale)
    steps = req.hr_second_pass_steps or req.steps
    rng = ImageNoise(seeds, subseeds, req.subseed_strength, shape=(4, h // 8, w // 8), **_noise_options(model, req))
    noise = rng.first()
    image_cond = None
    if model.unet.config.in_channels == 9:
        image_cond = _inpaint_image_cond(model, vae, decode(vae, init, model.vae_scale), None, init.shape)
    return sample(model, choice, rng, noise, hr_conds, req.cfg_scale, steps, SamplingOptions.of(req), (h, w), control, on_step, image_cond, init, strength, fix_steps=True, controls=controls)


def _written_schedule(choice: samplers.SamplerChoice) -> str | None:
    """The "Schedule type" A1111 records for a pass: the label it ran when it picked a schedule
    function (a k-diffusion sampler with a schedule asked for, or a default one), else None."""
    return choice.schedule_label if choice.runs_schedule() else None


def _hires_params(req: GenerationRequest, upscaler: str, strength: float, hr: samplers.SamplerChoice,
                  first: samplers.SamplerChoice) -> dict[str, Any]:
    resized = req.hr_resize_x or req.hr_resize_y
    hr_schedule = _written_schedule(hr)
    first_schedule = _written_schedule(first) or samplers.SCHEDULES[first.requested][0]
    return {
        "Denoising strength": float(strength),  # A1111 writes Python floats: 0.7, 1.0
        "Hires upscale": None if resized else float(req.hr_scale),
        "Hires resize": f"{req.hr_resize_x}x{req.hr_resize_y}" if resized else None,  # as asked, 0 included
        "Hires steps": req.hr_second_pass_steps or None,
        "Hires upscaler": upscaler,
        "Hires sampler": req.hr_sampler_name if req.hr_sampler_name and req.hr_sampler_name != req.sampler_name else None,
        "Hires schedule type": hr_schedule if hr_schedule and hr_schedule != first_schedule else None,
        "Hires prompt": req.hr_prompt or None,
        "Hires negative prompt": req.hr_negative_prompt or None,
    }


def _img2img_params(req: GenerationRequest, strength: float) -> dict[str, Any]:
    params: dict[str, Any] = {"Denoising strength": float(strength)}
    if req.mask is not None:
        params.update({
            "Mask blur": req.mask_blur,
            "Inpaint area": "Only masked" if req.inpaint_full_res else None,
            "Masked area padding": req.inpaint_full_res_padding if req.inpaint_full_res else None,
            "Masked content": ["fill", "original", "latent noise", "latent nothing"][req.inpainting_fill],
            "Mask mode": "Inpaint not masked" if req.inpainting_mask_invert else None,
        })
    elif req.resize_mode:
        params["Resize mode"] = ["Just resize", "Crop and resize", "Resize and fill", "Just resize (latent upscale)"][req.resize_mode]
    return params


@contextlib.contextmanager
def _loras(model: LoadedModel, loras: list[tuple[Any, float, float]]) -> Iterator[None]:
    if not loras:
        yield
        return
    from ..networks.lora import applied_loras

    with applied_loras(model, loras):
        yield
