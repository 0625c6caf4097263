"""The four A1111 samplers beyond the plain k-diffusion set: DPM++ 2S a, DPM fast, DPM adaptive, Restart.

Written from the papers (Lu et al. 2022, "DPM-Solver", arXiv 2206.00927; Lu et al. 2022, "DPM-Solver++",
arXiv 2211.01095; Xu et al. 2023, "Restart Sampling", arXiv 2306.14878) and A1111's documented behaviour,
in the conventions of :mod:`muralist.engine.ksampling`: a denoiser ``model(x, sigma)``, float64 sigmas,
``noise(sigma, sigma_next)`` for fresh standard-normal noise and ``callback(i, x, denoised)`` after step i.

With alpha = 1 (the variance-exploding form k-diffusion samples in) the DPM-Solver half-log-SNR is
lambda = t = -log(sigma), so "uniform in t" means geometric in sigma, and the exponential integrator
gives x_t = x_s - sigma_t * (e^h - 1) * eps for h = t - s.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from muralist.engine.ksampling import Denoiser, NoiseSampler, StepCallback, ancestral_step, to_d

__all__ = ["sample_dpm_adaptive", "sample_dpm_fast", "sample_dpmpp_2s_ancestral", "sample_restart"]

# eps(x, t): the noise prediction at t = -log(sigma).
_Eps = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _sigma(t: torch.Tensor) -> torch.Tensor:
    return torch.exp(-t)


def _t(sigma: torch.Tensor) -> torch.Tensor:
    return -torch.log(sigma)


def _as_sigma(value: float | torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(value, dtype=torch.float64).detach().cpu().reshape(())


def _karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. 2022 eq. 5 (n levels from sigma_max down to sigma_min, then 0), float64.

    Restart builds its own schedules with it, as A1111 does. The end points are set exactly, so a restart
    segment ends on the very sigma it left from (no spurious re-noising by rounding)."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    if n:
        sigmas[0] = sigma_max
    if n > 1:
        sigmas[-1] = sigma_min
    return torch.cat([sigmas, sigmas.new_zeros(1)])


# --- DPM++ 2S a ------------------------------------------------------------------------------------------


def sample_dpmpp_2s_ancestral(
    model: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    noise: NoiseSampler,
    callback: StepCallback | None = None,
    *,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> torch.Tensor:
    """DPM-Solver++(2S) (Lu et al. 2022b, Alg. 1, r = 1/2) to the ancestral step's sigma_down, then fresh
    noise of scale sigma_up. The step down to sigma 0 is an Euler step, as in A1111 (k-diffusion).
    Two model calls per step except that last one."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        if not float(sigma_down):
            # log(0) has no place in the solver; Euler to 0 lands on the prediction.
            x = x + to_d(x, sigma, denoised) * (sigma_down - sigma)
        else:
            t, t_next = _t(sigma), _t(sigma_down)
            h = t_next - t
            s = t + h / 2
            # Data-prediction form: x_s = (sigma_s / sigma_t) x_t - (e^{-h/2} - 1) D_t.
            x_mid = (_sigma(s) / sigma) * x - torch.expm1(-h / 2) * denoised
            denoised_mid = model(x_mid, _sigma(s))
            # With r = 1/2 the paper's D = (1 - 1/(2r)) D_t + 1/(2r) D_s is D_s alone.
            x = (sigma_down / sigma) * x - torch.expm1(-h) * denoised_mid
        if float(sigma_up):
            x = x + noise(sigma, sigma_next) * (s_noise * sigma_up)
        if callback is not None:
            callback(i, x, denoised)
    return x


# --- DPM-Solver (fast and adaptive) -------------------------------------------------------------------


def _eps_fn(model: Denoiser) -> _Eps:
    def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sigma = _sigma(t)
        return (x - model(x, sigma)) / sigma

    return eps


def _dpm_solver_step(
    eps: _Eps, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, eps_t: torch.Tensor, order: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DPM-Solver-k step (Lu et al. 2022, Alg. 1 and 2; k-1 model calls beyond ``eps_t``).

    Returns (x_next of order k, the embedded order k-1 solution) — the pair DPM adaptive compares. For
    k = 3 the embedded one is DPM-Solver-2 with r1 = 1/3, which reuses the third-order step's first
    intermediate evaluation; for k = 2 it is DPM-Solver-1."""
    h = t_next - t
    sigma_next = _sigma(t_next)
    phi = torch.expm1(h)
    x1 = x - sigma_next * phi * eps_t
    if order == 1:
        return x1, x1
    r1 = 0.5 if order == 2 else 1 / 3
    s1 = t + r1 * h
    u1 = x - _sigma(s1) * torch.expm1(r1 * h) * eps_t
    d1 = eps(u1, s1) - eps_t
    x2 = x1 - sigma_next / (2 * r1) * phi * d1
    if order == 2:
        return x2, x1
    r2 = 2 / 3
    s2 = t + r2 * h
    phi2 = torch.expm1(r2 * h)
    u2 = x - _sigma(s2) * phi2 * eps_t - _sigma(s2) * (r2 / r1) * (phi2 / (r2 * h) - 1) * d1
    d2 = eps(u2, s2) - eps_t
    x3 = x1 - sigma_next / r2 * (phi / h - 1) * d2
    return x3, x2


def _ancestral_target(
    t: torch.Tensor, t_next: torch.Tensor, t_end: torch.Tensor, eta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the deterministic part of an ancestral DPM-Solver step goes (never past t_end, since
    sigma_min > 0 is where sampling stops) and the noise scale that brings it back to sigma(t_next)."""
    if not eta:
        return t_next, torch.zeros((), dtype=torch.float64)
    sigma_down, _ = ancestral_step(_sigma(t), _sigma(t_next), eta)
    target = torch.minimum(t_end, _t(sigma_down))
    return target, (_sigma(t_next) ** 2 - _sigma(target) ** 2).clamp(min=0) ** 0.5


def _dpm_fast_orders(n: int) -> list[int]:
    """DPM-Solver-fast (Lu et al. 2022, sec. 3.4): n model calls over floor(n/3) + 1 uniform steps in t,
    third order except at the end: n % 3 == 0 -> ..., 3, 2, 1; n % 3 == 1 -> ..., 3, 1; == 2 -> ..., 3, 2."""
    steps = n // 3 + 1
    if n % 3 == 0:
        return [3] * (steps - 2) + [2, 1]
    return [3] * (steps - 1) + [n % 3]


def _check_range(sigma_min: torch.Tensor, sigma_max: torch.Tensor) -> None:
    if not (float(sigma_min) > 0 and float(sigma_max) > 0):
        raise ValueError("DPM fast/adaptive need sigma_min and sigma_max above 0 (they stop at sigma_min)")
    if float(sigma_min) > float(sigma_max):
        raise ValueError(f"sigma_min {float(sigma_min)} is above sigma_max {float(sigma_max)}")


def sample_dpm_fast(
    model: Denoiser,
    x: torch.Tensor,
    sigma_min: float | torch.Tensor,
    sigma_max: float | torch.Tensor,
    n: int,
    noise: NoiseSampler,
    callback: StepCallback | None = None,
    *,
    eta: float = 0.0,
    s_noise: float = 1.0,
) -> torch.Tensor:
    """DPM-Solver-fast: exactly ``n`` model calls from sigma_max down to sigma_min (not to 0, as in A1111:
    the result keeps sigma_min's little noise). With eta > 0 each step solves to the ancestral
    sigma_down and adds noise back up to the step's sigma. ``callback`` runs once per solver step
    (floor(n/3) + 1 of them), with the prediction at the step's start."""
    if n < 1:
        raise ValueError("DPM fast needs n >= 1 model evaluations")
    lo, hi = _as_sigma(sigma_min), _as_sigma(sigma_max)
    _check_range(lo, hi)
    if float(lo) == float(hi):
        return x  # nothing to integrate
    t_start, t_end = _t(hi), _t(lo)
    orders = _dpm_fast_orders(n)
    ts = torch.linspace(float(t_start), float(t_end), len(orders) + 1, dtype=torch.float64)
    ts[-1] = t_end  # land on sigma_min exactly
    eps = _eps_fn(model)
    for i, order in enumerate(orders):
        t, t_next = ts[i], ts[i + 1]
        target, noise_scale = _ancestral_target(t, t_next, t_end, eta)
        eps_t = eps(x, t)
        denoised = x - _sigma(t) * eps_t
        x, _ = _dpm_solver_step(eps, x, t, target, eps_t, order)
        if float(noise_scale):
            x = x + noise(_sigma(t), _sigma(t_next)) * (s_noise * noise_scale)
        if callback is not None:
            callback(i, x, denoised)
    return x


class _PIDStepSize:
    """PID control of the step size in t (Söderlind 2003, "Digital filters in adaptive time-stepping"),
    on the inverse errors of the last three accepted steps, with the arctan limiter 1 + atan(f - 1)."""

    def __init__(
        self, h: float, pcoeff: float, icoeff: float, dcoeff: float, order: float, accept_safety: float
    ):
        self.h = h
        self.b1 = (pcoeff + icoeff + dcoeff) / order
        self.b2 = -(pcoeff + 2 * dcoeff) / order
        self.b3 = dcoeff / order
        self.accept_safety = accept_safety
        self.inv_errors: list[float] = []

    def propose(self, error: float) -> bool:
        """Scale h by the controller's factor; True when the step just tried is accepted."""
        inv = 1 / (error + 1e-8)
        if not self.inv_errors:
            self.inv_errors = [inv, inv, inv]
        self.inv_errors[0] = inv
        e0, e1, e2 = self.inv_errors
        factor = 1 + math.atan(e0**self.b1 * e1**self.b2 * e2**self.b3 - 1)
        accepted = factor >= self.accept_safety
        if accepted:
            self.inv_errors = [e0, e0, e1]
        self.h *= factor
        return accepted


def sample_dpm_adaptive(
    model: Denoiser,
    x: torch.Tensor,
    sigma_min: float | torch.Tensor,
    sigma_max: float | torch.Tensor,
    noise: NoiseSampler,
    callback: StepCallback | None = None,
    *,
    order: int = 3,
    rtol: float = 0.05,
    atol: float = 0.0078,
    h_init: float = 0.05,
    pcoeff: float = 0.0,
    icoeff: float = 1.0,
    dcoeff: float = 0.0,
    accept_safety: float = 0.81,
    eta: float = 0.0,
    s_noise: float = 1.0,
) -> torch.Tensor:
    """DPM-Solver-12 (order 2) or -23 (order 3) with adaptive steps in t (Lu et al. 2022, sec. 3.4 / app.
    C): each try costs ``order`` model calls, the embedded lower-order solution gives the error, scaled
    per element by max(atol, rtol * max(|x_low|, |x_prev|)) and RMS-normed over the whole batch (so images
    of a batch share their steps, as in A1111). Stops at sigma_min, not 0. With eta > 0 the controller
    assumes order 1.5 (the ancestral noise caps the achievable order). ``callback`` runs per accepted step."""
    if order not in (2, 3):
        raise ValueError("DPM adaptive order must be 2 or 3")
    lo, hi = _as_sigma(sigma_min), _as_sigma(sigma_max)
    _check_range(lo, hi)
    t_end = _t(lo)
    s = _t(hi)
    pid = _PIDStepSize(abs(h_init), pcoeff, icoeff, dcoeff, 1.5 if eta else order, accept_safety)
    eps = _eps_fn(model)
    x_prev = x
    accepted = 0
    while float(s) < float(t_end) - 1e-5:
        t = torch.minimum(t_end, s + pid.h)
        target, noise_scale = _ancestral_target(s, t, t_end, eta)
        # A rejected try re-evaluates at s: A1111 counts every model call (prompt editing, progress).
        eps_s = eps(x, s)
        denoised = x - _sigma(s) * eps_s
        x_high, x_low = _dpm_solver_step(eps, x, s, target, eps_s, order)
        scale = torch.clamp(rtol * torch.maximum(x_low.abs(), x_prev.abs()), min=atol)
        error = float(torch.linalg.vector_norm((x_low - x_high) / scale)) / math.sqrt(x.numel())
        if not math.isfinite(error):
            raise FloatingPointError(
                f"DPM adaptive: non-finite error estimate at sigma {float(_sigma(s)):.6g}"
            )
        if pid.propose(error):
            x_prev = x_low
            x = x_high
            if float(noise_scale):
                x = x + noise(_sigma(s), _sigma(t)) * (s_noise * noise_scale)
            s = t
            if callback is not None:
                callback(accepted, x, denoised)
            accepted += 1
    return x


# --- Restart -------------------------------------------------------------------------------------------


def _restart_plan(
    sigmas: torch.Tensor, restart_list: dict[float, tuple[int, int, float]] | None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (sigma, sigma_next) Heun steps of a Restart run, restart segments spliced in.

    Without a ``restart_list`` this is A1111's automatic choice: under 20 steps none (plain Heun);
    from 20, the schedule becomes Karras with ``steps - k * m`` steps between the given schedule's
    end points, and at the sigma nearest 0.1 it restarts m times up to the sigma nearest 2 and walks
    back down in k Karras steps (k = 9, m = 1; from 36 steps k = steps // 4, m = 2) — so the step count
    stays ``steps``. ``restart_list`` maps {sigma: (levels, times, sigma_max)} (k = levels - 1)."""
    steps = len(sigmas) - 1
    if restart_list is None:
        restart_list = {}
        if steps >= 20:
            k, m = (steps // 4, 2) if steps >= 36 else (9, 1)
            sigmas = _karras(steps - k * m, float(sigmas[-2]), float(sigmas[0]))
            restart_list = {0.1: (k + 1, m, 2.0)}
    at = {int(torch.argmin((sigmas - key).abs())): value for key, value in restart_list.items()}
    plan = []
    for i in range(len(sigmas) - 1):
        plan.append((sigmas[i], sigmas[i + 1]))
        if i + 1 in at:
            levels, times, restart_max = at[i + 1]
            top = int(torch.argmin((sigmas - restart_max).abs()))
            if top < i + 1:
                segment = _karras(levels, float(sigmas[i + 1]), float(sigmas[top]))[:-1]
                plan.extend(list(zip(segment[:-1], segment[1:], strict=True)) * times)
    return plan


def sample_restart(
    model: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    noise: NoiseSampler,
    callback: StepCallback | None = None,
    *,
    s_noise: float = 1.0,
    restart_list: dict[float, tuple[int, int, float]] | None = None,
) -> torch.Tensor:
    """Restart sampling (Xu et al. 2023) as A1111's ``restart_sampler``: Heun steps (Euler into sigma 0)
    along the plan of :func:`_restart_plan`; where a step starts above the level just reached, the
    latents are re-noised forward, x += s_noise * sqrt(sigma_hi^2 - sigma_lo^2) * noise(sigma_hi,
    sigma_lo). No eta: A1111 passes none. ``callback`` runs per Heun step (``steps`` of them)."""
    last: torch.Tensor | None = None
    for i, (sigma, sigma_next) in enumerate(_restart_plan(sigmas, restart_list)):
        if last is not None and float(sigma) > float(last):
            x = x + noise(sigma, last) * (s_noise * (sigma**2 - last**2) ** 0.5)
        denoised = model(x, sigma)
        d = to_d(x, sigma, denoised)
        dt = sigma_next - sigma
        if not float(sigma_next):
            x = x + d * dt
        else:
            x_euler = x + d * dt
            d_next = to_d(x_euler, sigma_next, model(x_euler, sigma_next))
            x = x + (d + d_next) / 2 * dt
        last = sigma_next
        if callback is not None:
            callback(i, x, denoised)
    return x
