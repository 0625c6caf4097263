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
    cls: str  # diffusers scheduler class name
    aliases: tuple[str, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    default_schedule: str = "uniform"
    # k-diffusion samplers space timesteps like k-diffusion ("linspace"); DDIM/PLMS like CompVis.
    spacing: str = "linspace"
    # Whether the diffusers scheduler takes a custom sigma schedule (Karras, exponential, beta).
    custom_sigmas: bool = True


SAMPLERS: list[Sampler] = [
    Sampler("DPM++ 2M", "DPMSolverMultistepScheduler", ("k_dpmpp_2m",), {}, "karras"),
    Sampler("DPM++ SDE", "DPMSolverSDEScheduler", ("k_dpmpp_sde",), {}, "karras"),
    Sampler("DPM++ 2M SDE", "DPMSolverMultistepScheduler", ("k_dpmpp_2m_sde",), {"algorithm_type": "sde-dpmsolver++"}, "exponential"),
    Sampler(
        "DPM++ 2M SDE Heun",
        "DPMSolverMultistepScheduler",
        ("k_dpmpp_2m_sde_heun",),
        {"algorithm_type": "sde-dpmsolver++", "solver_type": "heun"},
        "exponential",
    ),
    Sampler(
        "DPM++ 3M SDE",
        "DPMSolverMultistepScheduler",
        ("k_dpmpp_3m_sde",),
        {"algorithm_type": "sde-dpmsolver++", "solver_order": 3},
        "exponential",
    ),
    Sampler("Euler a", "EtaEulerAncestral", ("k_euler_a", "k_euler_ancestral"), custom_sigmas=False),
    Sampler("Euler", "EulerDiscreteScheduler", ("k_euler",)),
    Sampler("LMS", "LMSDiscreteScheduler", ("k_lms",)),
    Sampler("Heun", "HeunDiscreteScheduler", ("k_heun",)),
    Sampler("DPM2", "KDPM2DiscreteScheduler", ("k_dpm_2",), {}, "karras"),
    Sampler("DPM2 a", "KDPM2AncestralDiscreteScheduler", ("k_dpm_2_a",), {}, "karras"),
    Sampler("DDIM", "DDIMScheduler", ("ddim",), {}, "uniform", "leading", False),
    Sampler("PLMS", "PNDMScheduler", ("plms",), {"skip_prk_steps": True}, "uniform", "leading", False),
    Sampler("UniPC", "UniPCMultistepScheduler", ("unipc",)),
    Sampler("LCM", "LCMScheduler", ("lcm",), {}, "uniform", "leading", False),
]
SAMPLERS_BY_NAME = {s.name: s for s in SAMPLERS}

# A1111's schedule types: name -> (label, aliases, diffusers options). None: not available here.
SCHEDULES: dict[str, tuple[str, tuple[str, ...], dict[str, Any] | None]] = {
    "automatic": ("Automatic", (), {}),
    "uniform": ("Uniform", (), {}),
    "karras": ("Karras", (), {"use_karras_sigmas": True}),
    "exponential": ("Exponential", (), {"use_exponential_sigmas": True}),
    "polyexponential": ("Polyexponential", (), None),
    "sgm_uniform": ("SGM Uniform", ("SGMUniform",), {"timestep_spacing": "trailing"}),
    "kl_optimal": ("KL Optimal", (), None),
    "align_your_steps": ("Align Your Steps", (), None),
    "simple": ("Simple", (), {"timestep_spacing": "trailing"}),
    "normal": ("Normal", (), {"timestep_spacing": "linspace"}),
    "ddim": ("DDIM", (), {"timestep_spacing": "leading"}),
    "beta": ("Beta", (), {"use_beta_sigmas": True}),
}
SUPPORTED_SCHEDULES = [k for k, v in SCHEDULES.items() if v[2] is not None]

# Samplers A1111 has that diffusers has no faithful equivalent for: say so instead of substituting.
UNSUPPORTED = {"DPM++ 2S a", "DPM fast", "DPM adaptive", "Restart", "DDIM CFG++", "Euler a CFG++"}


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
    for k, (label, aliases, _) in SCHEDULES.items():
        if key in (_norm(k), _norm(label), *(_norm(a) for a in aliases)):
            if SCHEDULES[k][2] is None:
                raise InvalidRequestError(
                    f"schedule type {label!r} is not available in muralist; choose one of: "
                    + ", ".join(SCHEDULES[s][0] for s in SUPPORTED_SCHEDULES)
                )
            return k
    raise not_found("schedule type", name, [SCHEDULES[s][0] for s in SUPPORTED_SCHEDULES])


def split_legacy_name(sampler: str | None, schedule: str | None) -> tuple[str | None, str | None]:
    """A1111's legacy combined names: "DPM++ 2M Karras" -> ("DPM++ 2M", "Karras")."""
    if not sampler or (schedule and _norm(schedule) != "automatic"):
        return sampler, schedule
    for k, (label, _, opts) in SCHEDULES.items():
        if k != "automatic" and opts is not None and sampler.lower().endswith(" " + label.lower()):
            base = sampler[: -len(label) - 1]
            if any(_norm(base) == _norm(s.name) for s in SAMPLERS):
                return base, label
    return sampler, schedule


@dataclass(frozen=True)
class SamplerChoice:
    """A resolved sampler + schedule type; ``make()`` builds a fresh scheduler for one run."""

    sampler: Sampler
    schedule: str  # resolved key, never "automatic"

    @property
    def schedule_label(self) -> str:
        return SCHEDULES[self.schedule][0]

    def make(self, prediction_type: str = "epsilon", seeds: list[int] | None = None) -> Any:
        import diffusers

        cls = _own_schedulers().get(self.sampler.cls) or getattr(diffusers, self.sampler.cls)
        params = inspect.signature(cls.__init__).parameters
        cfg = dict(BASE_SCHEDULER_CONFIG, prediction_type=prediction_type, **self.sampler.kwargs)
        if "timestep_spacing" in params:
            cfg["timestep_spacing"] = self.sampler.spacing
        cfg.update(SCHEDULES[self.schedule][2] or {})
        if "noise_sampler_seed" in params and seeds is not None:
            # DPM++ SDE's Brownian tree: one tree per image, seeded by that image's seed (A1111).
            cfg["noise_sampler_seed"] = list(seeds)
        return cls.from_config({k: v for k, v in cfg.items() if k in params})


def resolve(sampler: str | None, schedule: str | None = None) -> SamplerChoice:
    """Resolve names as A1111 does, including legacy names such as "DPM++ 2M Karras"."""
    sampler, schedule = split_legacy_name(sampler, schedule)
    s = find_sampler(sampler)
    key = find_schedule(schedule)
    if key == "automatic":
        key = s.default_schedule
    opts = SCHEDULES[key][2] or {}
    if not s.custom_sigmas and any(o.startswith("use_") for o in opts):
        raise InvalidRequestError(
            f"schedule type {SCHEDULES[key][0]!r} is not available with sampler {s.name!r}; "
            "use Automatic, Uniform, SGM Uniform, Simple, Normal or DDIM"
        )
    return SamplerChoice(s, key)


_OWN: dict[str, Any] = {}


def _own_schedulers() -> dict[str, Any]:
    """Schedulers muralist extends (built on first use: diffusers is a heavy import)."""
    if not _OWN:
        from diffusers import EulerAncestralDiscreteScheduler
        from diffusers.utils.torch_utils import randn_tensor

        class EtaEulerAncestral(EulerAncestralDiscreteScheduler):
            """Euler a with A1111's ``eta`` (eta_ancestral) and ``s_noise``.

            k-diffusion's ancestral step: from sigma to sigma_next, the noise added back is
            ``sigma_up = min(sigma_next, eta * sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2))``,
            the deterministic Euler step goes to ``sigma_down = sqrt(sigma_next^2 - sigma_up^2)``, and
            the new noise is scaled by ``s_noise``. At eta 1 and s_noise 1 this is diffusers' own step,
            which is used unchanged; eta 0 is plain Euler.
            """

            def step(self, model_output: Any, timestep: Any, sample: Any, generator: Any = None, return_dict: bool = True,
                     eta: float = 1.0, s_noise: float = 1.0) -> Any:
                if eta == 1.0 and s_noise == 1.0:
                    return super().step(model_output, timestep, sample, generator=generator, return_dict=return_dict)
                import torch

                if self.step_index is None:
                    self._init_step_index(timestep)
                sigma, sigma_next = self.sigmas[self.step_index], self.sigmas[self.step_index + 1]
                x = sample.to(torch.float32)
                if self.config.prediction_type == "v_prediction":
                    denoised = model_output * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)
                else:
                    denoised = x - sigma * model_output
                sigma_up = torch.clamp(eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5, max=sigma_next)
                sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
                x = x + (x - denoised) / sigma * (sigma_down - sigma)
                if sigma_next > 0:
                    noise = randn_tensor(model_output.shape, dtype=model_output.dtype, device=model_output.device,
                                         generator=generator)
                    x = x + noise * s_noise * sigma_up
                self._step_index += 1
                out = x.to(model_output.dtype)
                if not return_dict:
                    return out, denoised
                from diffusers.schedulers.scheduling_euler_ancestral_discrete import (
                    EulerAncestralDiscreteSchedulerOutput,
                )

                return EulerAncestralDiscreteSchedulerOutput(prev_sample=out, pred_original_sample=denoised)

        _OWN["EtaEulerAncestral"] = EtaEulerAncestral
    return _OWN
