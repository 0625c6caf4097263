"""A1111 sampler and schedule-type names, mapped onto diffusers schedulers.

A scheduler holds per-run state, so every generation builds its own from the family's config;
nothing here is shared between jobs except the immutable tables.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidRequestError, not_found

# The noise schedule every SD1/SD2/SDXL checkpoint was trained with (not readable from tensors).
BASE_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "clip_sample": False,
    "set_alpha_to_one": False,
}


@dataclass(frozen=True)
class Sampler:
    name: str
    # k-diffusion-style sampler: a function name in ksampling/ksolvers. Otherwise a diffusers
    # scheduler class (A1111's timestep samplers DDIM, PLMS and UniPC).
    func: str | None = None
    cls: str | None = None
    aliases: tuple[str, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    # A1111's 'scheduler' option: the schedule type "Automatic" means for this sampler.
    default_schedule: str = "uniform"
    # A1111's options: drop the next-to-last sigma (DPM2, DPM2 a, 3M SDE); Brownian-tree noise
    # seeded per image (the DPM++ SDE family); the schedule is the sampler's own (DPM fast/adaptive).
    discard_penultimate: bool = False
    brownian: bool = False
    own_schedule: bool = False
    # diffusers samplers: DDIM/PLMS space timesteps like CompVis ("leading").
    spacing: str = "linspace"
    # A1111's sampler_extra_params: the options (besides eta) this sampler takes from the job.
    extra: tuple[str, ...] = ()
    # A1111's second_order: prompt schedules count two model calls per step (steps * 2).
    second_order: bool = False
    # A1111's LCM sampler runs on its own denoiser (LcmSigmas: 50 levels, boundary scalings).
    lcm: bool = False
    # Its function takes eta (A1111 then passes eta_ancestral, default 1); its noise follows ENSD.
    eta: bool = False
    uses_ensd: bool = False

    def prompt_steps(self, steps: int) -> int:
        """The step count A1111 builds prompt-editing schedules for (its SamplerData.total_steps)."""
        return steps * 2 if self.second_order else steps

    @property
    def is_k(self) -> bool:
        return self.func is not None


CHURN = ("s_churn", "s_tmin", "s_tmax", "s_noise")
NOISE = ("s_noise",)
# A1111 v1.10's samplers, in its order, with its aliases and per-sampler options.
SAMPLERS: list[Sampler] = [
    Sampler("DPM++ 2M", "sample_dpmpp_2m", aliases=("k_dpmpp_2m",), default_schedule="karras"),
    Sampler("DPM++ SDE", "sample_dpmpp_sde", aliases=("k_dpmpp_sde",), default_schedule="karras", brownian=True, extra=NOISE, second_order=True, eta=True),
    Sampler("DPM++ 2M SDE", "sample_dpmpp_2m_sde", aliases=("k_dpmpp_2m_sde",), default_schedule="exponential",
            brownian=True, extra=NOISE, eta=True),
    Sampler("DPM++ 2M SDE Heun", "sample_dpmpp_2m_sde", aliases=("k_dpmpp_2m_sde_heun",), kwargs={"solver_type": "heun"},
            default_schedule="exponential", brownian=True, extra=NOISE, eta=True),
    Sampler("DPM++ 2S a", "sample_dpmpp_2s_ancestral", aliases=("k_dpmpp_2s_a",), default_schedule="karras", extra=NOISE, second_order=True, eta=True, uses_ensd=True),
    Sampler("DPM++ 3M SDE", "sample_dpmpp_3m_sde", aliases=("k_dpmpp_3m_sde",), default_schedule="exponential",
            discard_penultimate=True, brownian=True, extra=NOISE, eta=True),
    Sampler("Euler a", "sample_euler_ancestral", aliases=("k_euler_a", "k_euler_ancestral"), eta=True, uses_ensd=True),
    Sampler("Euler", "sample_euler", aliases=("k_euler",), extra=CHURN),
    Sampler("LMS", "sample_lms", aliases=("k_lms",)),
    Sampler("Heun", "sample_heun", aliases=("k_heun",), extra=CHURN, second_order=True),
    Sampler("DPM2", "sample_dpm_2", aliases=("k_dpm_2",), default_schedule="karras", discard_penultimate=True, extra=CHURN, second_order=True),
    Sampler("DPM2 a", "sample_dpm_2_ancestral", aliases=("k_dpm_2_a",), default_schedule="karras", discard_penultimate=True, extra=NOISE, second_order=True, eta=True, uses_ensd=True),
    Sampler("DPM fast", "sample_dpm_fast", aliases=("k_dpm_fast",), own_schedule=True, extra=NOISE, eta=True, uses_ensd=True),
    Sampler("DPM adaptive", "sample_dpm_adaptive", aliases=("k_dpm_ad",), own_schedule=True, eta=True, uses_ensd=True),
    Sampler("Restart", "sample_restart", aliases=("restart",), default_schedule="karras", second_order=True),
    Sampler("DDIM", cls="DDIMScheduler", aliases=("ddim",), spacing="leading"),
    Sampler("PLMS", cls="PNDMScheduler", aliases=("plms",), kwargs={"skip_prk_steps": True}, spacing="leading"),
    Sampler("UniPC", cls="UniPCMultistepScheduler", aliases=("unipc",)),
    Sampler("LCM", "sample_lcm", aliases=("lcm", "k_lcm"), lcm=True),
]
SAMPLERS_BY_NAME = {s.name: s for s in SAMPLERS}

# A1111's schedule types: key -> (label, aliases, default rho or None, needs the model's own levels).
SCHEDULES: dict[str, tuple[str, tuple[str, ...], float | None, bool]] = {
    "automatic": ("Automatic", (), None, False),
    "uniform": ("Uniform", (), None, True),
    "karras": ("Karras", (), 7.0, False),
    "exponential": ("Exponential", (), None, False),
    "polyexponential": ("Polyexponential", (), 1.0, False),
    "sgm_uniform": ("SGM Uniform", ("SGMUniform",), None, True),
    "kl_optimal": ("KL Optimal", (), None, False),
    "align_your_steps": ("Align Your Steps", (), None, False),
    "simple": ("Simple", (), None, True),
    "normal": ("Normal", (), None, True),
    "ddim": ("DDIM", (), None, True),
    "beta": ("Beta", (), None, True),
}
SUPPORTED_SCHEDULES = list(SCHEDULES)

# A1111 samplers muralist does not have: say so instead of substituting.
UNSUPPORTED = {"DDIM CFG++", "Euler a CFG++"}


def _norm(s: str) -> str:
    return s.strip().lower().replace("_", " ")


def find_sampler(name: str | None) -> Sampler:
    """A sampler by A1111 name or alias (case-insensitive); ``None`` means A1111's API default, Euler."""
    if not name:
        return SAMPLERS_BY_NAME["Euler"]
    key = _norm(name)
    for s in SAMPLERS:
        if key == _norm(s.name) or key in (_norm(a) for a in s.aliases):
            return s
    if name in UNSUPPORTED:
        raise InvalidRequestError(
            f"sampler {name!r} is not available in muralist; choose one of: " + ", ".join(s.name for s in SAMPLERS)
        )
    raise not_found("sampler", name, [s.name for s in SAMPLERS])


def find_schedule(name: str | None) -> str:
    """A schedule type's key from its A1111 name or label ("Karras", "karras", "SGM Uniform"...)."""
    if not name:
        return "automatic"
    key = _norm(name)
    for k, (label, aliases, _, _) in SCHEDULES.items():
        if key in (_norm(k), _norm(label), *(_norm(a) for a in aliases)):
            return k
    raise not_found("schedule type", name, [SCHEDULES[s][0] for s in SUPPORTED_SCHEDULES])


def split_legacy_name(sampler: str | None, schedule: str | None) -> tuple[str | None, str | None]:
    """A1111's legacy combined names: "DPM++ 2M Karras" -> ("DPM++ 2M", "Karras")."""
    if not sampler or (schedule and _norm(schedule) != "automatic"):
        return sampler, schedule
    for k, (label, *_rest) in SCHEDULES.items():
        if k != "automatic" and sampler.lower().endswith(" " + label.lower()):
            base = sampler[: -len(label) - 1]
            if any(_norm(base) == _norm(s.name) for s in SAMPLERS):
                return base, label
    return sampler, schedule


@dataclass(frozen=True)
class ScheduleTuning:
    """A1111's schedule options (0 = the model's own value / the schedule's default rho)."""

    sigma_min: float = 0.0
    sigma_max: float = 0.0
    rho: float = 0.0
    always_discard_next_to_last_sigma: bool = False
    beta_alpha: float = 0.6
    beta_beta: float = 0.6


@dataclass(frozen=True)
class SamplerChoice:
    """A resolved sampler + schedule type.

    k-diffusion samplers take their sigmas from ``sigmas()``; the diffusers ones (DDIM, PLMS, UniPC)
    build a fresh scheduler per run with ``make()`` and, as A1111's timestep samplers, keep their
    own timesteps whatever the schedule type.
    """

    sampler: Sampler
    schedule: str  # resolved key, never "automatic"
    requested: str = "automatic"  # what the caller asked for ("automatic" when left to the sampler)

    @property
    def schedule_label(self) -> str:
        return SCHEDULES[self.schedule][0]

    def runs_schedule(self) -> bool:
        """Whether A1111 calls a schedule function for this pass: a k-diffusion sampler with a
        schedule type asked for, or with a default one; otherwise it takes the model's own levels."""
        return self.sampler.is_k and (self.requested != "automatic" or self.sampler.default_schedule != "uniform")

    def _tuned(self, tuning: ScheduleTuning | None, model_sigmas: Any) -> dict[str, Any]:
        """A1111's sigma_min/sigma_max/rho/Beta options where get_sigmas applies them: keyword
        arguments for ``schedule_sigmas`` and the infotext keys A1111 then writes."""
        t = tuning or ScheduleTuning()
        kw: dict[str, Any] = {}
        info: dict[str, Any] = {}
        if not self.runs_schedule():
            return {"kw": kw, "info": info}
        if t.sigma_min and t.sigma_min != model_sigmas.sigma_min:
            kw["sigma_min"] = info["Schedule min sigma"] = t.sigma_min
        if t.sigma_max and t.sigma_max != model_sigmas.sigma_max:
            kw["sigma_max"] = info["Schedule max sigma"] = t.sigma_max
        if SCHEDULES[self.schedule][2] is not None and t.rho:
            kw["rho"] = info["Schedule rho"] = t.rho
        if self.schedule == "beta":
            kw["beta"] = (t.beta_alpha, t.beta_beta)
            info["Beta schedule alpha"], info["Beta schedule beta"] = t.beta_alpha, t.beta_beta
        return {"kw": kw, "info": info}

    def discards_penultimate(self, tuning: ScheduleTuning | None = None) -> bool:
        return self.sampler.discard_penultimate or bool(tuning and tuning.always_discard_next_to_last_sigma)

    def sigmas(self, steps: int, model_sigmas: Any, sdxl: bool = False, tuning: ScheduleTuning | None = None) -> Any:
        """The sigma schedule for ``steps`` steps, with A1111's options and next-to-last-sigma rule."""
        import torch

        from .ksampling import schedule_sigmas

        discard = self.discards_penultimate(tuning)
        n = steps + 1 if discard else steps
        sig = schedule_sigmas(self.schedule, n, model_sigmas, sdxl, **self._tuned(tuning, model_sigmas)["kw"])
        if discard:
            sig = torch.cat([sig[:-2], sig[-1:]])
        return sig

    def schedule_infotext(self, tuning: ScheduleTuning | None, model_sigmas: Any) -> dict[str, Any]:
        """The schedule keys A1111 writes for these options (min/max sigma, rho, Beta, discard)."""
        info = dict(self._tuned(tuning, model_sigmas)["info"])
        if self.sampler.is_k and tuning and tuning.always_discard_next_to_last_sigma and not self.sampler.discard_penultimate:
            info["Discard penultimate sigma"] = True
        return info

    def make(self, prediction_type: str = "epsilon") -> Any:
        import diffusers

        if self.sampler.cls is None:
            raise ValueError(f"{self.sampler.name} is a k-diffusion sampler: it has no diffusers scheduler")
        cls = getattr(diffusers, self.sampler.cls)
        params = inspect.signature(cls.__init__).parameters
        cfg = dict(BASE_SCHEDULER_CONFIG, prediction_type=prediction_type, **self.sampler.kwargs)
        if "timestep_spacing" in params:
            cfg["timestep_spacing"] = self.sampler.spacing
        return cls.from_config({k: v for k, v in cfg.items() if k in params})


def resolve(sampler: str | None, schedule: str | None = None) -> SamplerChoice:
    """Resolve names as A1111 does, including legacy names such as "DPM++ 2M Karras"."""
    sampler, schedule = split_legacy_name(sampler, schedule)
    s = find_sampler(sampler)
    requested = find_schedule(schedule)
    key = s.default_schedule if requested == "automatic" else requested
    return SamplerChoice(s, key, requested)
