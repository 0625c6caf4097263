"""DPM++ 2S a, DPM fast, DPM adaptive and Restart on a data distribution with a known denoiser.

The data is N(MU, S^2) per element, so the exact denoiser is D(x, sigma) = (x S^2 + MU sigma^2) / (S^2 +
sigma^2) and the probability-flow ODE has the closed form x(sigma) = MU + (x0 - MU) sqrt((S^2 + sigma^2) /
(S^2 + sigma0^2)). Each sampler is compared with a float64 NumPy re-derivation of its step equations,
written here from the papers in sigma form rather than the log-sigma form of the implementation
(DPM-Solver-1 is x_s - (sigma_s - sigma_t) eps; sigma_t (e^h - 1) = sigma_s - sigma_t), and the
deterministic ones also with the exact ODE solution.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from muralist.engine.ksolvers import (
    sample_dpm_adaptive,
    sample_dpm_fast,
    sample_dpmpp_2s_ancestral,
    sample_restart,
)

MU, S = 0.7, 0.5
SHAPE = (2, 3, 4, 4)
SIGMA_MIN, SIGMA_MAX = 0.0292, 14.6146  # SD1.x's range


# --- fixtures: the toy model, fixed noise, schedules, the exact ODE ---------------------------------------


class Model:
    """The exact denoiser of N(MU, S^2); records every sigma it is called with."""

    def __init__(self) -> None:
        self.sigmas: list[float] = []

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        assert sigma.dtype == torch.float64 and sigma.ndim == 0
        self.sigmas.append(float(sigma))
        return (x * S**2 + MU * sigma**2) / (S**2 + sigma**2)


def den(x: np.ndarray, sigma: float) -> np.ndarray:
    return (x * S**2 + MU * sigma**2) / (S**2 + sigma**2)


def exact_ode(x0: np.ndarray, sigma0: float, sigma: float) -> np.ndarray:
    return MU + (x0 - MU) * math.sqrt((S**2 + sigma**2) / (S**2 + sigma0**2))


class Noise:
    """A fixed sequence of standard-normal draws, handed out in call order."""

    def __init__(self, dtype: torch.dtype = torch.float64, seed: int = 1) -> None:
        self.draws = np.random.default_rng(seed).standard_normal((256, *SHAPE))
        self.dtype = dtype
        self.calls: list[tuple[float, float]] = []

    def __call__(self, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        self.calls.append((float(sigma), float(sigma_next)))
        return torch.from_numpy(self.draws[len(self.calls) - 1]).to(self.dtype)


class RefNoise:
    def __init__(self, seed: int = 1) -> None:
        self.draws = np.random.default_rng(seed).standard_normal((256, *SHAPE))
        self.n = 0

    def __call__(self) -> np.ndarray:
        self.n += 1
        return self.draws[self.n - 1]


def karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022 eq. 5, then 0."""
    i = np.arange(n) / max(n - 1, 1)
    sig = (sigma_max ** (1 / rho) + i * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    sig[0] = sigma_max
    if n > 1:
        sig[-1] = sigma_min
    return np.append(sig, 0.0)


def start(sigma0: float, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(SHAPE) * sigma0


def ancestral(sigma: float, sigma_next: float, eta: float) -> tuple[float, float]:
    """(sigma_down, sigma_up) with sigma_down^2 + sigma_up^2 = sigma_next^2 (k-diffusion/A1111)."""
    if not eta or sigma_next == 0:
        return sigma_next, 0.0
    up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    return math.sqrt(sigma_next**2 - up**2), up


def as_t(a: np.ndarray, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.from_numpy(a).to(dtype)


# --- references written from the papers ----------------------------------------------------------------


def ref_dpmpp_2s_a(x: np.ndarray, sigmas: np.ndarray, eta: float, s_noise: float = 1.0) -> np.ndarray:
    """DPM-Solver++(2S), r = 1/2, in sigma ratios: with lambda = -log sigma the data-prediction update
    x_t = (sigma_t/sigma_s) x_s - (e^{-h} - 1) D is x_t = (sigma_t/sigma_s) x_s + (1 - sigma_t/sigma_s) D,
    and the half step in lambda is the geometric mean of the sigmas."""
    rng = RefNoise()
    for sig, nxt in zip(sigmas[:-1], sigmas[1:], strict=True):
        d0 = den(x, sig)
        down, up = ancestral(sig, nxt, eta)
        if down == 0:
            x = d0
        else:
            mid = math.sqrt(sig * down)
            u = mid / sig * x + (1 - mid / sig) * d0
            x = down / sig * x + (1 - down / sig) * den(u, mid)
        if up:
            x = x + rng() * s_noise * up
    return x


def ref_eps(x: np.ndarray, sigma: float) -> np.ndarray:
    return (x - den(x, sigma)) / sigma


def ref_dpm_solver(x: np.ndarray, sig_s: float, sig_t: float, order: int) -> tuple[np.ndarray, np.ndarray]:
    """DPM-Solver-1/2/3 (Lu et al. 2022, Alg. 1 and 2; r1 = 1/2 for order 2, 1/3 and 2/3 for order 3) in
    sigma form, plus the embedded lower order (order 2 with r1 = 1/3 inside order 3)."""
    e0 = ref_eps(x, sig_s)
    h = math.log(sig_s / sig_t)
    x1 = x - (sig_s - sig_t) * e0
    if order == 1:
        return x1, x1
    r1 = 0.5 if order == 2 else 1 / 3
    s1 = sig_s * math.exp(-r1 * h)
    e1 = ref_eps(x - (sig_s - s1) * e0, s1)
    x2 = x - (sig_s - sig_t) * ((1 - 1 / (2 * r1)) * e0 + e1 / (2 * r1))
    if order == 2:
        return x2, x1
    r2 = 2 / 3
    s2 = sig_s * math.exp(-r2 * h)
    u2 = x - (sig_s - s2) * e0 - (r2 / r1) * ((sig_s - s2) / (r2 * h) - s2) * (e1 - e0)
    e2 = ref_eps(u2, s2)
    x3 = x - (sig_s - sig_t) * e0 - ((sig_s - sig_t) / h - sig_t) / r2 * (e2 - e0)
    return x3, x2


def ref_ancestral_target(sig: float, nxt: float, eta: float) -> tuple[float, float]:
    """Solve to sigma_down (not below SIGMA_MIN), add noise back up to sigma_next."""
    if not eta:
        return nxt, 0.0
    down = max(ancestral(sig, nxt, eta)[0], SIGMA_MIN)
    return down, math.sqrt(max(nxt**2 - down**2, 0.0))


def ref_dpm_fast(x: np.ndarray, n: int, eta: float) -> np.ndarray:
    k = n // 3 + 1
    orders = {0: [3] * (k - 2) + [2, 1], 1: [3] * (k - 1) + [1], 2: [3] * (k - 1) + [2]}[n % 3]
    levels = np.geomspace(SIGMA_MAX, SIGMA_MIN, k + 1)  # uniform in log sigma
    rng = RefNoise()
    for order, sig, nxt in zip(orders, levels[:-1], levels[1:], strict=True):
        target, up = ref_ancestral_target(sig, nxt, eta)
        x, _ = ref_dpm_solver(x, sig, target, order)
        if up:
            x = x + rng() * up
    return x


def ref_dpm_adaptive(
    x: np.ndarray,
    order: int,
    rtol: float,
    atol: float,
    eta: float,
    pid: tuple[float, float, float] = (0.0, 1.0, 0.0),
    h: float = 0.05,
) -> tuple[np.ndarray, int]:
    """Error-controlled DPM-Solver-12/23. The error is the RMS of (high - low) / max(atol, rtol max(|low|,
    |prev|)); the PID controller (Soderlind 2003) scales h by 1 + atan(f - 1), f = c_n^b1 c_{n-1}^b2
    c_{n-2}^b3 on the inverse errors c of this try and the last two accepted steps, with b1 = (P + I +
    D)/k, b2 = -(P + 2D)/k, b3 = D/k (k: the order, 1.5 when ancestral), and accepts when that is >= 0.81."""
    p, i, d = pid
    rng = RefNoise()
    lam, lam_end = -math.log(SIGMA_MAX), -math.log(SIGMA_MIN)
    k = 1.5 if eta else order
    prev, accepted, history = x, 0, None
    while lam < lam_end - 1e-5:
        lam_next = min(lam_end, lam + h)
        sig, nxt = math.exp(-lam), math.exp(-lam_next)
        target, up = ref_ancestral_target(sig, nxt, eta)
        high, low = ref_dpm_solver(x, sig, target, order)
        scale = np.maximum(atol, rtol * np.maximum(np.abs(low), np.abs(prev)))
        c = 1 / (math.sqrt(np.mean(((high - low) / scale) ** 2)) + 1e-8)
        c1, c2 = history or (c, c)
        factor = 1 + math.atan(c ** ((p + i + d) / k) * c1 ** (-(p + 2 * d) / k) * c2 ** (d / k) - 1)
        if factor >= 0.81:
            prev, x, lam = low, high + (rng() * up if up else 0), lam_next
            history = (c, c1)
            accepted += 1
        elif history is None:
            history = (c, c)
        h *= factor
    return x, accepted


def ref_heun(x: np.ndarray, sig: float, nxt: float) -> np.ndarray:
    d = (x - den(x, sig)) / sig
    if nxt == 0:
        return x + d * (nxt - sig)
    x2 = x + d * (nxt - sig)
    return x + (d + (x2 - den(x2, nxt)) / nxt) / 2 * (nxt - sig)


def ref_restart(x: np.ndarray, sigmas: np.ndarray, s_noise: float = 1.0) -> tuple[np.ndarray, int]:
    """A1111's automatic Restart (Xu et al. 2023): under 20 steps plain Heun; else Karras with steps - k*m
    steps, and after reaching the level nearest 0.1, m times: noise up to the level nearest 2, then k Heun
    steps down on a Karras schedule (k = 9, m = 1; from 36 steps k = steps // 4, m = 2)."""
    steps = len(sigmas) - 1
    rng = RefNoise()
    heun_steps = 0
    if steps < 20:
        for sig, nxt in zip(sigmas[:-1], sigmas[1:], strict=True):
            x = ref_heun(x, sig, nxt)
            heun_steps += 1
        return x, heun_steps
    k, m = (steps // 4, 2) if steps >= 36 else (9, 1)
    main = karras(steps - k * m, sigmas[-2], sigmas[0])
    lo = int(np.argmin(np.abs(main - 0.1)))
    hi = int(np.argmin(np.abs(main - 2.0)))
    for i in range(len(main) - 1):
        x = ref_heun(x, main[i], main[i + 1])
        heun_steps += 1
        if i + 1 == lo and hi < lo:
            down = karras(k + 1, main[lo], main[hi])[:-1]
            for _ in range(m):
                x = x + rng() * s_noise * math.sqrt(main[hi] ** 2 - main[lo] ** 2)
                for sig, nxt in zip(down[:-1], down[1:], strict=True):
                    x = ref_heun(x, sig, nxt)
                    heun_steps += 1
    return x, heun_steps


# --- DPM++ 2S a ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_dpmpp_2s_a_matches_reference(eta: float) -> None:
    sigmas = karras(12, SIGMA_MIN, SIGMA_MAX)
    x0 = start(sigmas[0])
    model, noise, calls = Model(), Noise(), []
    out = sample_dpmpp_2s_ancestral(
        model, as_t(x0), as_t(sigmas), noise, lambda i, x, d: calls.append(i), eta=eta
    )
    np.testing.assert_allclose(out.numpy(), ref_dpmpp_2s_a(x0, sigmas, eta), rtol=1e-10, atol=1e-10)
    assert calls == list(range(12))
    assert len(model.sigmas) == 2 * 12 - 1  # the last step (to 0) is Euler
    assert len(noise.calls) == (11 if eta else 0)


def test_dpmpp_2s_a_s_noise_scales_the_ancestral_noise() -> None:
    sigmas = karras(8, SIGMA_MIN, SIGMA_MAX)
    x0 = start(sigmas[0])
    out = sample_dpmpp_2s_ancestral(Model(), as_t(x0), as_t(sigmas), Noise(), s_noise=0.5)
    np.testing.assert_allclose(
        out.numpy(), ref_dpmpp_2s_a(x0, sigmas, 1.0, s_noise=0.5), rtol=1e-10, atol=1e-10
    )


def test_dpmpp_2s_a_eta0_follows_the_exact_ode() -> None:
    errors = {}
    for steps in (50, 200):
        sigmas = karras(steps, 0.002, SIGMA_MAX)
        x0 = start(sigmas[0])
        out = sample_dpmpp_2s_ancestral(Model(), as_t(x0), as_t(sigmas), Noise(), eta=0.0).numpy()
        errors[steps] = np.abs(out - exact_ode(x0, sigmas[0], 0.0)).max()
    assert errors[200] < 5e-4
    assert errors[200] < errors[50] / 8  # second order: 4x the steps, ~16x less error
    # ...while an ancestral run lands elsewhere: it follows the SDE, not the ODE.
    stochastic = sample_dpmpp_2s_ancestral(Model(), as_t(x0), as_t(sigmas), Noise(), eta=1.0).numpy()
    assert np.abs(stochastic - exact_ode(x0, sigmas[0], 0.0)).max() > 0.05


# --- DPM fast ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [10, 11, 12])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_dpm_fast_matches_reference(n: int, eta: float) -> None:
    x0 = start(SIGMA_MAX)
    model, noise = Model(), Noise()
    out = sample_dpm_fast(model, as_t(x0), SIGMA_MIN, SIGMA_MAX, n, noise, eta=eta)
    np.testing.assert_allclose(out.numpy(), ref_dpm_fast(x0, n, eta), rtol=1e-9, atol=1e-9)
    assert len(model.sigmas) == n


@pytest.mark.parametrize("n", range(1, 13))
def test_dpm_fast_spends_exactly_n_model_calls(n: int) -> None:
    model, steps = Model(), []
    sample_dpm_fast(
        model, as_t(start(SIGMA_MAX)), SIGMA_MIN, SIGMA_MAX, n, Noise(), lambda i, x, d: steps.append(i)
    )
    assert len(model.sigmas) == n
    assert steps == list(range(n // 3 + 1))
    assert model.sigmas[0] == pytest.approx(SIGMA_MAX, rel=1e-12)
    assert min(model.sigmas) >= SIGMA_MIN


def test_dpm_fast_eta0_follows_the_exact_ode_to_sigma_min() -> None:
    x0 = start(SIGMA_MAX)
    exact = exact_ode(x0, SIGMA_MAX, SIGMA_MIN)
    errors = [
        np.abs(sample_dpm_fast(Model(), as_t(x0), SIGMA_MIN, SIGMA_MAX, n, Noise()).numpy() - exact).max()
        for n in (90, 300)
    ]
    # The closing order-2/1 steps dominate: error ~ 1/n^2.
    assert errors[1] < 2e-5
    assert errors[1] < errors[0] / 5


def test_dpm_fast_rejects_bad_ranges() -> None:
    x = as_t(start(SIGMA_MAX))
    with pytest.raises(ValueError):
        sample_dpm_fast(Model(), x, 0.0, SIGMA_MAX, 10, Noise())
    with pytest.raises(ValueError):
        sample_dpm_fast(Model(), x, SIGMA_MAX, SIGMA_MIN, 10, Noise())
    with pytest.raises(ValueError):
        sample_dpm_fast(Model(), x, SIGMA_MIN, SIGMA_MAX, 0, Noise())


# --- DPM adaptive --------------------------------------------------------------------------------------


@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("pid", [(0.0, 1.0, 0.0), (0.4, 0.8, 0.3)])
def test_dpm_adaptive_matches_reference(order: int, eta: float, pid: tuple[float, float, float]) -> None:
    x0 = start(SIGMA_MAX)
    model, steps = Model(), []
    out = sample_dpm_adaptive(
        model,
        as_t(x0),
        SIGMA_MIN,
        SIGMA_MAX,
        Noise(),
        lambda i, x, d: steps.append(i),
        order=order,
        eta=eta,
        pcoeff=pid[0],
        icoeff=pid[1],
        dcoeff=pid[2],
    )
    expected, accepted = ref_dpm_adaptive(x0, order, rtol=0.05, atol=0.0078, eta=eta, pid=pid)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-9, atol=1e-9)
    assert steps == list(range(accepted))
    # Every try, accepted or not, costs `order` model calls.
    assert len(model.sigmas) % order == 0 and len(model.sigmas) >= order * accepted


def test_dpm_adaptive_tight_tolerances_approach_the_exact_ode() -> None:
    x0 = start(SIGMA_MAX)
    exact = exact_ode(x0, SIGMA_MAX, SIGMA_MIN)
    loose = sample_dpm_adaptive(Model(), as_t(x0), SIGMA_MIN, SIGMA_MAX, Noise()).numpy()
    model = Model()
    tight = sample_dpm_adaptive(model, as_t(x0), SIGMA_MIN, SIGMA_MAX, Noise(), rtol=1e-6, atol=1e-6).numpy()
    assert np.abs(tight - exact).max() < 1e-5
    assert np.abs(tight - exact).max() < np.abs(loose - exact).max() / 10
    assert len(model.sigmas) > 100  # it got there by taking more steps


def test_dpm_adaptive_rejects_bad_order() -> None:
    with pytest.raises(ValueError):
        sample_dpm_adaptive(Model(), as_t(start(SIGMA_MAX)), SIGMA_MIN, SIGMA_MAX, Noise(), order=1)


# --- Restart -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [10, 20, 35, 40])
def test_restart_matches_reference(steps: int) -> None:
    sigmas = karras(steps, SIGMA_MIN, SIGMA_MAX)
    x0 = start(sigmas[0])
    model, noise, calls = Model(), Noise(), []
    out = sample_restart(model, as_t(x0), as_t(sigmas), noise, lambda i, x, d: calls.append(i))
    expected, heun_steps = ref_restart(x0, sigmas)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-10, atol=1e-10)
    # A1111 keeps the step count: restart steps are taken out of the main schedule.
    assert heun_steps == steps and calls == list(range(steps))
    assert len(model.sigmas) == 2 * steps - 1
    assert len(noise.calls) == (0 if steps < 20 else 1 if steps < 36 else 2)
    assert all(hi > lo for hi, lo in noise.calls)


def test_restart_s_noise_scales_the_renoising() -> None:
    sigmas = karras(24, SIGMA_MIN, SIGMA_MAX)
    x0 = start(sigmas[0])
    out = sample_restart(Model(), as_t(x0), as_t(sigmas), Noise(), s_noise=0.3)
    np.testing.assert_allclose(out.numpy(), ref_restart(x0, sigmas, s_noise=0.3)[0], rtol=1e-10, atol=1e-10)


def test_restart_from_20_steps_keeps_only_the_schedule_end_points() -> None:
    """A1111 re-derives a Karras schedule between sigmas[0] and sigmas[-2], whatever the schedule type."""
    karras_sched = karras(24, SIGMA_MIN, SIGMA_MAX)
    geometric = np.append(np.geomspace(SIGMA_MAX, SIGMA_MIN, 24), 0.0)
    x0 = start(SIGMA_MAX)
    a = sample_restart(Model(), as_t(x0), as_t(karras_sched), Noise()).numpy()
    b = sample_restart(Model(), as_t(x0), as_t(geometric), Noise()).numpy()
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    short_a = sample_restart(Model(), as_t(x0), as_t(karras(12, SIGMA_MIN, SIGMA_MAX)), Noise()).numpy()
    short_b = sample_restart(
        Model(), as_t(x0), as_t(np.append(np.geomspace(SIGMA_MAX, SIGMA_MIN, 12), 0.0)), Noise()
    )
    assert np.abs(short_a - short_b.numpy()).max() > 1e-4


def test_restart_without_restarts_is_heun_on_the_exact_ode() -> None:
    errors = {}
    for steps in (50, 200):
        sigmas = karras(steps, 0.002, SIGMA_MAX)
        x0 = start(sigmas[0])
        out = sample_restart(Model(), as_t(x0), as_t(sigmas), Noise(), restart_list={}).numpy()
        errors[steps] = np.abs(out - exact_ode(x0, sigmas[0], 0.0)).max()
    assert errors[200] < 1e-3
    assert errors[200] < errors[50] / 8


# --- all four: float32 latents, stochasticity ----------------------------------------------------------


def _run_all(x: torch.Tensor, sigmas: np.ndarray, eta: float, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {
        "2s_a": sample_dpmpp_2s_ancestral(Model(), x, as_t(sigmas), Noise(dtype), eta=eta),
        "fast": sample_dpm_fast(Model(), x, SIGMA_MIN, SIGMA_MAX, 12, Noise(dtype), eta=eta),
        "adaptive": sample_dpm_adaptive(Model(), x, SIGMA_MIN, SIGMA_MAX, Noise(dtype), eta=eta),
        "restart": sample_restart(Model(), x, as_t(sigmas), Noise(dtype)),
    }


def test_float32_latents_stay_float32_and_agree_with_float64() -> None:
    sigmas = karras(24, SIGMA_MIN, SIGMA_MAX)
    x0 = start(SIGMA_MAX)
    lo = _run_all(as_t(x0, torch.float32), sigmas, 1.0, torch.float32)
    hi = _run_all(as_t(x0), sigmas, 1.0, torch.float64)
    for name, out in lo.items():
        assert out.dtype == torch.float32, name
        np.testing.assert_allclose(out.numpy(), hi[name].numpy(), atol=2e-4, err_msg=name)


def test_eta_changes_the_stochastic_samplers() -> None:
    sigmas = karras(12, SIGMA_MIN, SIGMA_MAX)
    x = as_t(start(SIGMA_MAX))
    ode, sde = _run_all(x, sigmas, 0.0, torch.float64), _run_all(x, sigmas, 1.0, torch.float64)
    for name in ("2s_a", "fast", "adaptive"):
        assert np.abs(ode[name].numpy() - sde[name].numpy()).max() > 1e-2, name
