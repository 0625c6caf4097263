"""A1111's sigma schedules and k-diffusion samplers against references written here from the
papers' formulas (float64 numpy), on a toy data distribution whose exact denoiser and
probability-flow ODE solution are known in closed form."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from muralist.engine import ksampling as ks
from muralist.engine import samplers
from muralist.engine.txt2img import SamplingOptions

MU, S = 0.7, 0.5  # data ~ N(MU, S^2) per element


def exact_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    s2 = float(sigma) ** 2
    return (x * S**2 + MU * s2) / (S**2 + s2)


def np_denoise(x: np.ndarray, sigma: float) -> np.ndarray:
    return (x * S**2 + MU * sigma**2) / (S**2 + sigma**2)


def ode_solution(x0: np.ndarray, sigma0: float) -> np.ndarray:
    """The probability-flow ODE from sigma0 to 0 for Gaussian data: x(0) = mu + (x0 - mu) s / sqrt(s^2 + sigma0^2)."""
    return MU + (x0 - MU) * S / math.sqrt(S**2 + sigma0**2)


@pytest.fixture()
def ms() -> ks.ModelSigmas:
    return ks.ModelSigmas()


# --- schedules -----------------------------------------------------------------------------------

def training_sigmas() -> np.ndarray:
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    ac = np.cumprod(1 - betas)
    return np.sqrt((1 - ac) / ac)


def np_t_to_sigma(t: np.ndarray) -> np.ndarray:
    return np.exp(np.interp(t, np.arange(1000), np.log(training_sigmas())))


def np_sigma_to_t(sigma: float) -> float:
    return float(np.interp(np.log(sigma), np.log(training_sigmas()), np.arange(1000)))


def test_model_sigmas_are_the_sd_training_levels_and_timesteps_are_fractional(ms: ks.ModelSigmas) -> None:
    ref = training_sigmas()
    assert np.allclose(ms.sigmas.numpy(), ref, rtol=1e-12)
    assert ms.sigma_min == pytest.approx(0.0292, abs=1e-4) and ms.sigma_max == pytest.approx(14.6146, abs=1e-4)
    for sigma in (0.05, 1.0, 3.3, 14.0):
        assert float(ms.sigma_to_t(sigma)) == pytest.approx(np_sigma_to_t(sigma), abs=1e-9)
        assert float(ms.t_to_sigma(ms.sigma_to_t(sigma))) == pytest.approx(sigma, rel=1e-9)
    assert float(ms.sigma_to_t(1.0)) % 1 != 0  # between two training levels


def reference_schedule(kind: str, n: int, sdxl: bool = False) -> np.ndarray:
    """Each A1111 schedule type from its definition (sigma_min/max: the model's)."""
    sig = training_sigmas()
    lo, hi = sig[0], sig[-1]
    if kind == "uniform":
        out = np_t_to_sigma(np.linspace(999, 0, n))
    elif kind == "karras":
        r = np.linspace(0, 1, n)
        out = (hi ** (1 / 7) + r * (lo ** (1 / 7) - hi ** (1 / 7))) ** 7
    elif kind == "exponential":
        out = np.exp(np.linspace(np.log(hi), np.log(lo), n))
    elif kind == "polyexponential":  # rho 1 (A1111's default) is exponential
        out = np.exp(np.linspace(np.log(hi), np.log(lo), n))
    elif kind == "sgm_uniform":
        out = np_t_to_sigma(np.linspace(np_sigma_to_t(hi), np_sigma_to_t(lo), n + 1)[:-1])
    elif kind == "normal":
        out = np_t_to_sigma(np.linspace(np_sigma_to_t(hi), np_sigma_to_t(lo), n))
    elif kind == "simple":
        out = np.array([sig[999 - int(i * 1000 / n)] for i in range(n)])
    elif kind == "ddim":
        out = sig[list(range(1, 1000, 1000 // n))][::-1]
    elif kind == "beta":
        from scipy import stats

        out = lo + stats.beta.ppf(1 - np.linspace(0, 1, n), 0.6, 0.6) * (hi - lo)
    elif kind == "kl_optimal":
        i = np.arange(n + 1) / n
        return np.tan(i * np.arctan(lo) + (1 - i) * np.arctan(hi))
    elif kind == "align_your_steps":
        table = np.array(ks.AYS_SDXL if sdxl else ks.AYS_SD15)
        if n == len(table):
            out = table
        else:
            out = np.exp(np.interp(np.linspace(0, 1, n), np.linspace(0, 1, len(table)), np.log(table[::-1])))[::-1]
    else:
        raise AssertionError(kind)
    return np.append(out, 0.0)


@pytest.mark.parametrize("kind", [k for k in samplers.SCHEDULES if k != "automatic"])
@pytest.mark.parametrize("n", [10, 20, 7])
def test_every_schedule_type_matches_its_definition(ms: ks.ModelSigmas, kind: str, n: int) -> None:
    got = ks.schedule_sigmas(kind, n, ms).numpy()
    ref = reference_schedule(kind, n)
    assert got.shape == ref.shape
    assert np.allclose(got, ref, rtol=1e-9, atol=1e-12), (kind, n)
    assert np.all(np.diff(got) <= 0)  # never rises


def test_polyexponential_rho_and_sdxl_align_your_steps_differ_from_the_defaults() -> None:
    lo, hi = 0.03, 14.6
    ramp = np.linspace(1, 0, 12) ** 2.0
    ref = np.exp(ramp * (np.log(hi) - np.log(lo)) + np.log(lo))
    assert np.allclose(ks.sigmas_polyexponential(12, lo, hi, rho=2.0).numpy()[:-1], ref, rtol=1e-12)
    assert not np.allclose(ks.sigmas_align_your_steps(10, True).numpy(), ks.sigmas_align_your_steps(10, False).numpy())


def test_next_to_last_sigma_is_dropped_for_dpm2_as_a1111_does(ms: ks.ModelSigmas) -> None:
    choice = samplers.resolve("DPM2")
    assert choice.schedule == "karras"
    sig = choice.sigmas(10, ms).numpy()
    full = reference_schedule("karras", 11)
    assert np.allclose(sig, np.append(full[:-2], 0.0))
    assert len(sig) == 11  # 10 steps


# --- samplers ------------------------------------------------------------------------------------

class Draws:
    """A fixed stream of standard-normal draws, read in order by the sampler and the reference."""

    def __init__(self, shape: tuple[int, ...], seed: int = 3) -> None:
        self.rng, self.shape = np.random.default_rng(seed), shape

    def torch(self, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.np()).float()

    def np(self) -> np.ndarray:
        return self.rng.standard_normal(self.shape)


SHAPE = (2, 3, 4, 4)


def start(sigma0: float) -> tuple[torch.Tensor, np.ndarray]:
    x = np.random.default_rng(11).standard_normal(SHAPE) * sigma0
    return torch.from_numpy(x).float(), x


def run(fn, sigmas: np.ndarray, **kw):  # noqa: ANN001, ANN202
    x, x_np = start(sigmas[0])
    draws = Draws(SHAPE)
    out = fn(exact_denoiser, x, torch.from_numpy(sigmas), draws.torch, **kw)
    return out.double().numpy(), x_np


def ancestral(s: float, sn: float, eta: float) -> tuple[float, float]:
    if sn == 0 or eta == 0:
        return sn, 0.0
    up = min(sn, eta * math.sqrt(sn**2 * (s**2 - sn**2) / s**2))
    return math.sqrt(sn**2 - up**2), up


def ref_euler_family(x: np.ndarray, sig: np.ndarray, draws: Draws, kind: str, churn: float = 0.0, tmin: float = 0.0,
                     tmax: float = math.inf, s_noise: float = 1.0, eta: float = 1.0) -> np.ndarray:
    """Euler, Heun and DPM2 (Karras et al. 2022, Algorithm 2), and their ancestral forms."""
    n = len(sig) - 1
    for i in range(n):
        s, sn = sig[i], sig[i + 1]
        if kind in ("euler", "heun", "dpm2"):
            eps = draws.np() * s_noise
            gamma = min(churn / n, math.sqrt(2) - 1) if tmin <= s <= tmax else 0.0
            sh = s * (1 + gamma)
            if gamma > 0:
                x = x + eps * math.sqrt(sh**2 - s**2)
            target, up = sn, 0.0
        else:
            sh = s
            target, up = ancestral(s, sn, eta)
        d = (x - np_denoise(x, sh)) / sh
        if kind in ("euler", "euler_a") or target == 0:
            x = x + d * (target - sh)
        elif kind == "heun":
            x2 = x + d * (target - sh)
            d2 = (x2 - np_denoise(x2, target)) / target
            x = x + 0.5 * (d + d2) * (target - sh)
        else:  # dpm2 / dpm2_a: slope at the geometric mean of the two sigmas
            mid = math.sqrt(sh * target)
            x2 = x + d * (mid - sh)
            x = x + (x2 - np_denoise(x2, mid)) / mid * (target - sh)
        if kind == "euler_a" and sn > 0:
            x = x + draws.np() * s_noise * up
        if kind == "dpm2_a":
            x = x + draws.np() * s_noise * up
    return x


SIG = reference_schedule("karras", 12)


@pytest.mark.parametrize("kind,fn,kw", [
    ("euler", ks.sample_euler, {}),
    ("euler", ks.sample_euler, {"s_churn": 3.0, "s_tmin": 0.5, "s_tmax": 8.0, "s_noise": 1.1}),
    ("heun", ks.sample_heun, {}),
    ("heun", ks.sample_heun, {"s_churn": 2.0}),
    ("dpm2", ks.sample_dpm_2, {"s_churn": 1.0, "s_noise": 0.9}),
    ("euler_a", ks.sample_euler_ancestral, {"eta": 1.0}),
    ("euler_a", ks.sample_euler_ancestral, {"eta": 0.4, "s_noise": 0.8}),
    ("dpm2_a", ks.sample_dpm_2_ancestral, {"eta": 0.7, "s_noise": 1.2}),
])
def test_euler_heun_dpm2_and_ancestral_steps_match_the_reference(kind: str, fn, kw: dict) -> None:  # noqa: ANN001
    got, x0 = run(fn, SIG, **kw)
    ref_kw = {"churn": kw.get("s_churn", 0.0), "tmin": kw.get("s_tmin", 0.0), "tmax": kw.get("s_tmax", math.inf),
              "s_noise": kw.get("s_noise", 1.0), "eta": kw.get("eta", 1.0)}
    ref = ref_euler_family(x0, SIG, Draws(SHAPE), kind, **ref_kw)
    assert np.allclose(got, ref, atol=2e-5), np.abs(got - ref).max()


def test_lms_matches_adams_bashforth_on_the_sigma_grid() -> None:
    got, x = run(ks.sample_lms, SIG)
    ds: list[np.ndarray] = []
    for i in range(len(SIG) - 1):
        ds.append((x - np_denoise(x, SIG[i])) / SIG[i])
        order = min(i + 1, 4)
        nodes = SIG[i - order + 1 : i + 1][::-1]  # sigma_i, sigma_{i-1}, ...
        for j in range(order):
            # weight of derivative j: integral of its Lagrange basis polynomial, by Gauss-Legendre
            gx, gw = np.polynomial.legendre.leggauss(8)
            a, b = SIG[i], SIG[i + 1]
            tau = (b - a) / 2 * gx + (a + b) / 2
            basis = np.prod([(tau - nodes[k]) / (nodes[j] - nodes[k]) for k in range(order) if k != j], axis=0)
            x = x + (b - a) / 2 * np.sum(gw * basis) * ds[-1 - j]
    assert np.allclose(got, x, atol=2e-5)


def ref_dpmpp_2m(x: np.ndarray, sig: np.ndarray) -> np.ndarray:
    """DPM-Solver++(2M), written with sigma ratios: x' = (s'/s) x + (1 - s'/s) D, D extrapolated in log sigma."""
    old = None
    for i in range(len(sig) - 1):
        s, sn = sig[i], sig[i + 1]
        den = np_denoise(x, s)
        if sn == 0:
            x = den
        else:
            d = den
            if old is not None:
                r = math.log(sig[i - 1] / s) / math.log(s / sn)
                d = den + (den - old) / (2 * r)
            x = (sn / s) * x + (1 - sn / s) * d
        old = den
    return x


def test_dpmpp_2m_matches_the_reference() -> None:
    got, x0 = run(ks.sample_dpmpp_2m, SIG)
    assert np.allclose(got, ref_dpmpp_2m(x0, SIG), atol=2e-5)


def ref_dpmpp_sde(x: np.ndarray, sig: np.ndarray, draws: Draws, eta: float, s_noise: float) -> np.ndarray:
    for i in range(len(sig) - 1):
        s, sn = sig[i], sig[i + 1]
        den = np_denoise(x, s)
        if sn == 0:
            x = x + (x - den) / s * (sn - s)
            continue
        mid = math.sqrt(s * sn)  # r = 1/2: halfway in log sigma
        down, up = ancestral(s, mid, eta)
        x2 = (down / s) * x + (1 - down / s) * den + draws.np() * s_noise * up
        den2 = np_denoise(x2, mid)
        down, up = ancestral(s, sn, eta)
        x = (down / s) * x + (1 - down / s) * den2 + draws.np() * s_noise * up  # (1 - fac) D + fac D2 with fac = 1
    return x


@pytest.mark.parametrize("eta,s_noise", [(1.0, 1.0), (0.5, 0.7), (0.0, 1.0)])
def test_dpmpp_sde_matches_the_reference(eta: float, s_noise: float) -> None:
    got, x0 = run(ks.sample_dpmpp_sde, SIG, eta=eta, s_noise=s_noise)
    assert np.allclose(got, ref_dpmpp_sde(x0, SIG, Draws(SHAPE), eta, s_noise), atol=2e-5)


def ref_dpmpp_2m_sde(x: np.ndarray, sig: np.ndarray, draws: Draws, eta: float, heun: bool) -> np.ndarray:
    old, h_last = None, None
    for i in range(len(sig) - 1):
        s, sn = sig[i], sig[i + 1]
        den = np_denoise(x, s)
        if sn == 0:
            x = den
        else:
            h = math.log(s / sn)
            a = (sn / s) * math.exp(-eta * h)  # weight of x
            phi = 1 - math.exp(-h - eta * h)
            x = a * x + phi * den
            if old is not None:
                coef = 1 - phi / (h * (1 + eta)) if heun else 0.5 * phi
                x = x + coef * (h / h_last) * (den - old)
            if eta:
                x = x + draws.np() * sn * math.sqrt(1 - math.exp(-2 * eta * h))
            h_last = h
        old = den
    return x


@pytest.mark.parametrize("heun", [False, True])
@pytest.mark.parametrize("eta", [1.0, 0.0])
def test_dpmpp_2m_sde_matches_the_reference(heun: bool, eta: float) -> None:
    sig = reference_schedule("exponential", 12)
    got, x0 = run(ks.sample_dpmpp_2m_sde, sig, eta=eta, solver_type="heun" if heun else "midpoint")
    assert np.allclose(got, ref_dpmpp_2m_sde(x0, sig, Draws(SHAPE), eta, heun), atol=2e-5)


def ref_dpmpp_3m_sde(x: np.ndarray, sig: np.ndarray, draws: Draws, eta: float) -> np.ndarray:
    hist: list[tuple[np.ndarray, float]] = []  # (denoised, h) of earlier steps, newest first
    for i in range(len(sig) - 1):
        s, sn = sig[i], sig[i + 1]
        den = np_denoise(x, s)
        h = None
        if sn == 0:
            x = den
        else:
            h = math.log(s / sn)
            he = h * (eta + 1)
            x = math.exp(-he) * x + (1 - math.exp(-he)) * den
            phi2 = (math.exp(-he) - 1) / he + 1
            if len(hist) >= 2 and hist[1][1] is not None and hist[0][1] is not None:
                (d1, h1), (d2, h2) = hist[0], hist[1]
                r0, r1 = h1 / h, h2 / h
                a, b = (den - d1) / r0, (d1 - d2) / r1
                x = x + phi2 * (a + (a - b) * r0 / (r0 + r1)) - (phi2 / he - 0.5) * (a - b) / (r0 + r1)
            elif hist and hist[0][1] is not None:
                x = x + phi2 * (den - hist[0][0]) * h / hist[0][1]
            if eta:
                x = x + draws.np() * sn * math.sqrt(1 - math.exp(-2 * h * eta)) * 1.0
        hist = [(den, h), *hist][:2]
    return x


@pytest.mark.parametrize("eta", [1.0, 0.0])
def test_dpmpp_3m_sde_matches_the_reference(eta: float) -> None:
    sig = reference_schedule("exponential", 12)
    got, x0 = run(ks.sample_dpmpp_3m_sde, sig, eta=eta)
    assert np.allclose(got, ref_dpmpp_3m_sde(x0, sig, Draws(SHAPE), eta), atol=2e-5)


def test_lcm_jumps_to_the_prediction_and_renoises() -> None:
    got, x = run(ks.sample_lcm, SIG)
    draws = Draws(SHAPE)
    for i in range(len(SIG) - 1):
        x = np_denoise(x, SIG[i])
        if SIG[i + 1] > 0:
            x = x + SIG[i + 1] * draws.np()
    assert np.allclose(got, x, atol=2e-5)


@pytest.mark.parametrize("fn,kw,tol", [
    (ks.sample_euler, {}, 2e-2), (ks.sample_heun, {}, 1e-3), (ks.sample_dpm_2, {}, 1e-3), (ks.sample_lms, {}, 1e-3),
    (ks.sample_dpmpp_2m, {}, 1e-3), (ks.sample_dpmpp_2m_sde, {"eta": 0.0}, 1e-3), (ks.sample_dpmpp_3m_sde, {"eta": 0.0}, 1e-3),
    (ks.sample_euler_ancestral, {"eta": 0.0}, 2e-2), (ks.sample_dpmpp_sde, {"eta": 0.0}, 1e-3),
])
def test_deterministic_samplers_converge_to_the_exact_ode_solution(fn, kw: dict, tol: float) -> None:  # noqa: ANN001
    # Down to sigma 1e-4, so that the last jump (the prediction at the smallest sigma) adds no error.
    sig = ks.sigmas_karras(150, 1e-4, 14.6).numpy()
    got, x0 = run(fn, sig, **kw)
    assert np.abs(got - ode_solution(x0, sig[0])).max() < tol


def test_brownian_noise_is_per_image_and_independent_of_the_batch() -> None:
    x = torch.zeros(2, 4, 8, 8)
    pair = ks.BrownianNoise(x, 0.03, 14.6, [5, 9])
    alone = ks.BrownianNoise(x[1:], 0.03, 14.6, [9])
    a = pair(torch.tensor(3.0, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64))
    b = alone(torch.tensor(3.0, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64))
    assert torch.allclose(a[1], b[0]) and not torch.allclose(a[0], a[1])
    assert 0.7 < float(a.std()) < 1.3  # standard normal increments


# --- what A1111 passes each sampler --------------------------------------------------------------

ETA_SAMPLERS = {"Euler a", "DPM2 a", "DPM++ 2S a", "DPM++ SDE", "DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 3M SDE",
                "DPM fast", "DPM adaptive"}


@pytest.mark.parametrize("name", [s.name for s in samplers.SAMPLERS if s.is_k])
def test_eta_reaches_exactly_the_samplers_that_take_it(name: str) -> None:
    from muralist.engine import ksolvers

    s = samplers.find_sampler(name)
    fn = getattr(ks, s.func, None) or getattr(ksolvers, s.func)
    kw = SamplingOptions(eta=0.0, s_noise=0.5, s_churn=1.0).kwargs_for(fn, s.extra)
    assert ("eta" in kw) == (name in ETA_SAMPLERS) == s.eta  # the table the infotext reads agrees
    # s_noise: A1111's sampler_extra_params (not Euler a, LMS, DPM adaptive or Restart)
    assert ("s_noise" in kw) == (name not in {"Euler a", "LMS", "DPM adaptive", "Restart", "DPM++ 2M", "LCM"})
    assert ("s_churn" in kw) == (name in {"Euler", "Heun", "DPM2"})


def test_every_pair_of_sampler_and_schedule_a1111_offers_resolves() -> None:
    for s in samplers.SAMPLERS:
        for k, (label, *_rest) in samplers.SCHEDULES.items():
            c = samplers.resolve(s.name, label)
            assert c.schedule == (s.default_schedule if k == "automatic" else k)
    assert samplers.resolve("DPM++ 2S a").schedule_label == "Karras"
    assert samplers.resolve("Restart").schedule_label == "Karras"
    assert samplers.resolve("Euler a", "Karras").schedule == "karras"
    assert samplers.resolve("DPM++ 2M SDE").schedule_label == "Exponential"


def test_lcm_denoiser_uses_the_50_distilled_levels_and_its_boundary_scalings() -> None:
    lcm = ks.LcmSigmas()
    train = training_sigmas()
    assert np.allclose(lcm.sigmas.numpy(), train[19::20]) and len(lcm.sigmas) == 50
    assert float(lcm.sigma_to_t(train[500])) == 499  # quantized to the nearest distilled level (t = 19 + 20k)
    # "Uniform" for LCM: timesteps 999 .. 19, each mapped onto the 50 levels (log-linear between them)
    got = ks.schedule_sigmas("uniform", 4, lcm).numpy()
    idx = (np.linspace(999, 19, 4) - 19) / 20
    ref = np.exp(np.interp(idx, np.arange(50), np.log(train[19::20])))
    assert np.allclose(got, np.append(ref, 0.0), rtol=1e-12)
    x, den = torch.full((1, 4, 2, 2), 2.0), torch.full((1, 4, 2, 2), 0.5)
    sigma = torch.tensor(float(train[299]), dtype=torch.float64)
    st = 2990.0  # timestep 299 x 10
    want = 0.5 * st / math.sqrt(st**2 + 0.25) + 2.0 * 0.25 / (st**2 + 0.25)
    assert torch.allclose(lcm.boundary(x, sigma, den), torch.full_like(x, want))
    assert samplers.resolve("LCM").sampler.lcm and samplers.resolve("LCM", "Karras").schedule == "karras"


def test_a1111_schedule_options_reach_the_sigmas_and_the_infotext(ms: ks.ModelSigmas) -> None:
    from muralist.infotext import request_fields

    t = samplers.ScheduleTuning(sigma_min=0.1, sigma_max=10.0, rho=3.0)
    karras = samplers.resolve("DPM++ 2M")
    sig = karras.sigmas(8, ms, tuning=t).numpy()
    ramp = np.linspace(0, 1, 8)
    assert np.allclose(sig[:-1], (10 ** (1 / 3) + ramp * (0.1 ** (1 / 3) - 10 ** (1 / 3))) ** 3)
    info = karras.schedule_infotext(t, ms)
    assert info == {"Schedule min sigma": 0.1, "Schedule max sigma": 10.0, "Schedule rho": 3.0}
    # Euler left on Automatic takes the model's own levels: A1111 applies none of these there
    euler = samplers.resolve("Euler")
    assert np.allclose(euler.sigmas(8, ms, tuning=t).numpy(), euler.sigmas(8, ms).numpy())
    assert euler.schedule_infotext(t, ms) == {}
    # forced discard of the next-to-last sigma, written only where the sampler does not do it anyway
    forced = samplers.ScheduleTuning(always_discard_next_to_last_sigma=True)
    assert len(euler.sigmas(8, ms, tuning=forced)) == 9
    assert euler.schedule_infotext(forced, ms) == {"Discard penultimate sigma": True}
    assert samplers.resolve("DPM2").schedule_infotext(forced, ms) == {}
    beta = samplers.resolve("Euler", "Beta")
    b = samplers.ScheduleTuning(beta_alpha=0.5, beta_beta=0.7)
    assert not np.allclose(beta.sigmas(8, ms, tuning=b).numpy(), beta.sigmas(8, ms).numpy())
    assert beta.schedule_infotext(b, ms) == {"Beta schedule alpha": 0.5, "Beta schedule beta": 0.7}
    pasted = request_fields({"Schedule min sigma": "0.1", "Schedule rho": "3.0", "Discard penultimate sigma": "True"})
    assert pasted["sigma_min"] == 0.1 and pasted["rho"] == 3.0 and pasted["always_discard_next_to_last_sigma"] is True
