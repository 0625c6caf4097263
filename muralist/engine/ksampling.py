"""k-diffusion-style samplers and A1111's sigma schedules, written from the papers.

Every sampler works on a *denoiser* ``model(x, sigma) -> denoised`` (the prediction of the clean
latents from latents ``x`` at noise level ``sigma``), a descending 1-D tensor of ``sigmas`` ending
with 0, and starts from ``x = noise * sigmas[0]``. This is the form A1111 samples in (through
k-diffusion), so its sampler names, schedule types and extra options (eta, s_churn, s_tmin, s_tmax,
s_noise) map onto it one to one. Sigmas are float64 (as k-diffusion's tables); latents stay float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

# model(x, sigma) -> denoised; sigma is a 0-d float64 tensor.
Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# noise(sigma, sigma_next) -> standard normal noise shaped like x (per-image seeded by the caller).
NoiseSampler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# callback(i, x, denoised) after step i (0-based) with the new x and the last denoised prediction.
StepCallback = Callable[[int, torch.Tensor, torch.Tensor], None]


def to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """The probability-flow ODE derivative dx/dsigma (Karras et al. 2022, eq. 3 with sigma(t) = t)."""
    return (x - denoised) / sigma


def ancestral_step(sigma: torch.Tensor, sigma_next: torch.Tensor, eta: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Split the move sigma -> sigma_next into a deterministic step to ``sigma_down`` and fresh noise
    of scale ``sigma_up``, with sigma_down² + sigma_up² = sigma_next². eta 0: no noise (ODE)."""
    if not eta or not float(sigma_next):
        return sigma_next, torch.zeros_like(sigma_next)
    up = torch.clamp(eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5, max=float(sigma_next))
    down = (sigma_next**2 - up**2) ** 0.5
    return down, up


def _lin(a: float, b: float, n: int) -> torch.Tensor:
    return torch.linspace(a, b, n, dtype=torch.float64)


def append_zero(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, x.new_zeros(1)])


# --- the model's own noise levels -------------------------------------------------------------


class ModelSigmas:
    """The 1000 discrete noise levels an SD model was trained on, and A1111's fractional timesteps.

    sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) for the "scaled linear" beta schedule of every
    SD1/SD2/SDXL checkpoint. ``sigma_to_t`` interpolates linearly in log sigma between the two
    neighbouring levels, so a sigma between two training levels gets a fractional timestep.
    """

    def __init__(self, beta_start: float = 0.00085, beta_end: float = 0.012, steps: int = 1000) -> None:
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, steps, dtype=torch.float64) ** 2
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self.sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5  # ascending: t = 0 .. 999
        self.log_sigmas = self.sigmas.log()

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma: torch.Tensor | float) -> torch.Tensor:
        log_sigma = torch.as_tensor(sigma, dtype=torch.float64).log()
        ls = self.log_sigmas
        # index of the last training level at or below sigma, kept where a step to the next exists
        low = torch.clamp((log_sigma.reshape(-1, 1) >= ls).sum(dim=1) - 1, 0, len(ls) - 2)
        w = ((ls[low] - log_sigma.reshape(-1)) / (ls[low] - ls[low + 1])).clamp(0, 1)
        return ((1 - w) * low + w * (low + 1)).reshape(log_sigma.shape)

    def t_to_sigma(self, t: torch.Tensor | float) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float64)
        low, high = t.floor().long(), t.ceil().long()
        w = t - low
        return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]).exp()

    def uniform_ts(self, n: int) -> torch.Tensor:
        """The timesteps of the "Uniform" schedule: evenly spaced from the last level to the first."""
        return _lin(len(self.sigmas) - 1, 0, n)


class LcmSigmas(ModelSigmas):
    """A1111's LCM denoiser: the 50 levels an LCM was distilled on (every 20th training level, from
    t = 19), timesteps quantized to those levels, and the consistency model's boundary scalings."""

    SKIP = 20

    def __init__(self) -> None:
        super().__init__()
        self.sigmas = self.sigmas[self.SKIP - 1 :: self.SKIP].clone()  # t = 19, 39, ..., 999
        self.log_sigmas = self.sigmas.log()

    def sigma_to_t(self, sigma: torch.Tensor | float) -> torch.Tensor:
        log_sigma = torch.as_tensor(sigma, dtype=torch.float64).log()
        nearest = (log_sigma.reshape(-1, 1) - self.log_sigmas).abs().argmin(dim=1)
        return (nearest * self.SKIP + self.SKIP - 1).to(torch.float64).reshape(log_sigma.shape)

    def t_to_sigma(self, t: torch.Tensor | float) -> torch.Tensor:
        index = ((torch.as_tensor(t, dtype=torch.float64) - (self.SKIP - 1)) / self.SKIP).clamp(0, len(self.sigmas) - 1)
        return super().t_to_sigma(index)

    def uniform_ts(self, n: int) -> torch.Tensor:
        return _lin(float(self.sigma_to_t(self.sigma_max)), float(self.sigma_to_t(self.sigma_min)), n)

    def boundary(self, x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
        """LCM's c_skip/c_out at timestep*10 with sigma_data 0.5, applied to the eps-model's prediction."""
        st = float(self.sigma_to_t(sigma)) * 10.0
        c_skip, c_out = 0.25 / (st * st + 0.25), st / (st * st + 0.25) ** 0.5
        return denoised * c_out + x * c_skip


# --- A1111's schedule types --------------------------------------------------------------------
# Each returns n sigmas from high to low with a 0 appended (n + 1 values).

AYS_SD15 = [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029]
AYS_SDXL = [14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029]


def sigmas_uniform(n: int, ms: ModelSigmas) -> torch.Tensor:
    """Timesteps evenly spaced from 999 to 0 (k-diffusion's default for a discrete model)."""
    return append_zero(ms.t_to_sigma(ms.uniform_ts(n)))


def sigmas_karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. 2022, eq. 5: evenly spaced in sigma^(1/rho)."""
    ramp = _lin(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return append_zero((hi + ramp * (lo - hi)) ** rho)


def sigmas_exponential(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """Evenly spaced in log sigma."""
    return append_zero(_lin(math.log(sigma_max), math.log(sigma_min), n).exp())


def sigmas_polyexponential(n: int, sigma_min: float, sigma_max: float, rho: float = 1.0) -> torch.Tensor:
    """Log sigma moves from max to min along ramp^rho (rho 1 is Exponential)."""
    ramp = _lin(1, 0, n) ** rho
    return append_zero((ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min)).exp())


def sigmas_sgm_uniform(n: int, ms: ModelSigmas, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """n timesteps evenly spaced from t(sigma_max), the end point t(sigma_min) left out (SGM)."""
    t = _lin(float(ms.sigma_to_t(sigma_max)), float(ms.sigma_to_t(sigma_min)), n + 1)[:-1]
    return append_zero(ms.t_to_sigma(t))


def sigmas_normal(n: int, ms: ModelSigmas, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """n timesteps evenly spaced from t(sigma_max) to t(sigma_min), both ends included."""
    return append_zero(ms.t_to_sigma(_lin(float(ms.sigma_to_t(sigma_max)), float(ms.sigma_to_t(sigma_min)), n)))


def sigmas_simple(n: int, ms: ModelSigmas) -> torch.Tensor:
    """Every (1000/n)-th training level counted down from the top (ComfyUI's "simple")."""
    stride = len(ms.sigmas) / n
    return append_zero(torch.stack([ms.sigmas[-(1 + int(i * stride))] for i in range(n)]))


def sigmas_ddim(n: int, ms: ModelSigmas) -> torch.Tensor:
    """The training levels DDIM's uniform timestep spacing visits, from level 1 upward, reversed."""
    stride = max(len(ms.sigmas) // n, 1)
    return append_zero(ms.sigmas[1::stride].flip(0))


def sigmas_beta(n: int, sigma_min: float, sigma_max: float, alpha: float = 0.6, beta: float = 0.6) -> torch.Tensor:
    """Lee et al. 2024, "Beta Sampling is All You Need": steps at the Beta(alpha, beta) quantiles."""
    from scipy import stats

    q = stats.beta.ppf(1 - torch.linspace(0, 1, n, dtype=torch.float64).numpy(), alpha, beta)
    return append_zero(sigma_min + torch.from_numpy(q) * (sigma_max - sigma_min))


def sigmas_kl_optimal(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """The KL-optimal schedule (Sabour et al. 2024): evenly spaced in arctan(sigma); ends at sigma_min, no 0."""
    a_min, a_max = math.atan(sigma_min), math.atan(sigma_max)
    i = torch.arange(n + 1, dtype=torch.float64) / n
    return torch.tan(i * a_min + (1 - i) * a_max)


def sigmas_align_your_steps(n: int, sdxl: bool) -> torch.Tensor:
    """NVIDIA's Align Your Steps 10-step tables, log-linearly resampled to n steps."""
    table = AYS_SDXL if sdxl else AYS_SD15
    if n == len(table):
        return append_zero(torch.tensor(table, dtype=torch.float64))
    logs = torch.tensor(table[::-1], dtype=torch.float64).log()  # ascending
    xs = _lin(0, 1, len(table))
    new = _lin(0, 1, n)
    # piecewise-linear interpolation of log sigma over the table's positions
    idx = torch.clamp(torch.searchsorted(xs, new, right=True) - 1, 0, len(table) - 2)
    w = (new - xs[idx]) / (xs[idx + 1] - xs[idx])
    return append_zero(((1 - w) * logs[idx] + w * logs[idx + 1]).exp().flip(0))


def schedule_sigmas(kind: str, n: int, ms: ModelSigmas, sdxl: bool = False,
                    sigma_min: float | None = None, sigma_max: float | None = None, rho: float | None = None,
                    beta: tuple[float, float] = (0.6, 0.6)) -> torch.Tensor:
    """The sigmas of A1111's schedule type ``kind`` (its key: "karras", "sgm_uniform"...) for n steps;
    ``rho`` (Karras, Polyexponential) and ``beta`` (the Beta schedule's alpha, beta) as A1111's options."""
    lo = ms.sigma_min if sigma_min is None else sigma_min
    hi = ms.sigma_max if sigma_max is None else sigma_max
    table: dict[str, Callable[[], torch.Tensor]] = {
        "uniform": lambda: sigmas_uniform(n, ms),
        "karras": lambda: sigmas_karras(n, lo, hi, rho or 7.0),
        "exponential": lambda: sigmas_exponential(n, lo, hi),
        "polyexponential": lambda: sigmas_polyexponential(n, lo, hi, rho or 1.0),
        "sgm_uniform": lambda: sigmas_sgm_uniform(n, ms, lo, hi),
        "kl_optimal": lambda: sigmas_kl_optimal(n, lo, hi),
        "align_your_steps": lambda: sigmas_align_your_steps(n, sdxl),
        "simple": lambda: sigmas_simple(n, ms),
        "normal": lambda: sigmas_normal(n, ms, lo, hi),
        "ddim": lambda: sigmas_ddim(n, ms),
        "beta": lambda: sigmas_beta(n, lo, hi, *beta),
    }
    if kind not in table:
        raise ValueError(f"unknown schedule type {kind!r}")
    return table[kind]()


# --- noise -------------------------------------------------------------------------------------


class BrownianNoise:
    """Noise from one Brownian tree per image, seeded by the image's seed (A1111's DPM++ SDE samplers).

    The increment between two sigmas is a property of the path, not of the call order, so an image
    gets the same noise whatever its batch and however many steps query the tree.
    """

    def __init__(self, x: torch.Tensor, sigma_min: float, sigma_max: float, seeds: list[int]) -> None:
        import torchsde

        # Times in float32, as A1111 passes its sigmas: the tree's bisection points depend on them.
        w0 = torch.zeros_like(x[0])
        self.trees = [torchsde.BrownianTree(self._t(sigma_min), w0, self._t(sigma_max), entropy=s) for s in seeds]

    @staticmethod
    def _t(sigma: float | torch.Tensor) -> torch.Tensor:
        return torch.tensor(float(sigma), dtype=torch.float32)

    def __call__(self, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        a, b = self._t(sigma), self._t(sigma_next)
        lo, hi, sign = (a, b, 1.0) if a < b else (b, a, -1.0)
        w = torch.stack([tree(lo, hi) for tree in self.trees]) * sign
        return w / (hi - lo).sqrt()


# --- samplers ----------------------------------------------------------------------------------


def _churn(x: torch.Tensor, sigma: torch.Tensor, n_steps: int, noise: NoiseSampler, sigma_next: torch.Tensor,
           s_churn: float, s_tmin: float, s_tmax: float, s_noise: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Karras et al. 2022 Algorithm 2: raise the noise level to sigma_hat = sigma (1 + gamma) by adding
    fresh noise, for sigmas within [s_tmin, s_tmax]. The draw is taken every step (as k-diffusion
    does) so that the per-image noise streams stay aligned whatever s_churn is."""
    eps = noise(sigma, sigma_next) * s_noise
    gamma = min(s_churn / n_steps, 2**0.5 - 1) if s_tmin <= float(sigma) <= s_tmax else 0.0
    sigma_hat = sigma * (gamma + 1)
    if gamma > 0:
        x = x + eps * (sigma_hat**2 - sigma**2) ** 0.5
    return x, sigma_hat


def _move(model: Denoiser, x: torch.Tensor, d: torch.Tensor, sigma: torch.Tensor, target: torch.Tensor,
          kind: str) -> torch.Tensor:
    """One step from ``x`` at ``sigma`` (slope ``d``) to ``target``: Euler; Heun (the mean of the slopes
    at both ends); or DPM-Solver-2 (the slope at the log-midpoint sigma). A step into sigma 0 is Euler."""
    if kind == "euler" or target == 0:
        return x + d * (target - sigma)
    if kind == "heun":
        x_2 = x + d * (target - sigma)
        return x + (d + to_d(x_2, target, model(x_2, target))) / 2 * (target - sigma)
    mid = (sigma.log() * 0.5 + target.log() * 0.5).exp()
    x_2 = x + d * (mid - sigma)
    return x + to_d(x_2, mid, model(x_2, mid)) * (target - sigma)


def _churned(kind: str, model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, noise: NoiseSampler,
             callback: StepCallback | None, s_churn: float, s_tmin: float, s_tmax: float, s_noise: float) -> torch.Tensor:
    """Karras et al. 2022, Algorithm 2 with the step of ``kind`` (Euler, Heun or DPM2)."""
    for i in range(len(sigmas) - 1):
        x, sigma_hat = _churn(x, sigmas[i], len(sigmas) - 1, noise, sigmas[i + 1], s_churn, s_tmin, s_tmax, s_noise)
        denoised = model(x, sigma_hat)
        x = _move(model, x, to_d(x, sigma_hat, denoised), sigma_hat, sigmas[i + 1], kind)
        if callback:
            callback(i, x, denoised)
    return x


def sample_euler(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, noise: NoiseSampler,
                 callback: StepCallback | None = None, *, s_churn: float = 0.0, s_tmin: float = 0.0,
                 s_tmax: float = math.inf, s_noise: float = 1.0) -> torch.Tensor:
    """Euler's method on the probability-flow ODE."""
    return _churned("euler", model, x, sigmas, noise, callback, s_churn, s_tmin, s_tmax, s_noise)


def sample_heun(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, noise: NoiseSampler,
                callback: StepCallback | None = None, *, s_churn: float = 0.0, s_tmin: float = 0.0,
                s_tmax: float = math.inf, s_noise: float = 1.0) -> torch.Tensor:
    """Heun's second-order method; the last step to 0 is Euler."""
    return _churned("heun", model, x, sigmas, noise, callback, s_churn, s_tmin, s_tmax, s_noise)


def sample_dpm_2(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, noise: NoiseSampler,
                 callback: StepCallback | None = None, *, s_churn: float = 0.0, s_tmin: float = 0.0,
                 s_tmax: float = math.inf, s_noise: float = 1.0) -> torch.Tensor:
    """DPM-Solver-2 in Karras' form: the slope at the log-midpoint sigma drives the whole step."""
    return _churned("dpm2", model, x, sigmas, noise, callback, s_churn, s_tmin, s_tmax, s_noise)


def _ancestral(kind: str, model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, noise: NoiseSampler,
               callback: StepCallback | None, eta: float, s_noise: float) -> torch.Tensor:
    """A step of ``kind`` to sigma_down, then fresh noise of scale sigma_up (see ``ancestral_step``).
    Euler a adds noise only above sigma 0; DPM2 a draws it on every step (k-diffusion's draw order)."""
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        down, up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        x = _move(model, x, to_d(x, sigmas[i], denoised), sigmas[i], down, kind)
        if kind == "dpm2" or sigmas[i + 1] > 0:
            x = x + noise(sigmas[i], sigmas[i + 1]) * s_noise * up
        if callback:
            callback(i, x, denoised)
    return x


def sample_euler_ancestral(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, noise: NoiseSampler,
                           callback: StepCallback | None = None, *, eta: float = 1.0, s_noise: float = 1.0) -> torch.Tensor:
    """Euler a."""
    return _ancestral("euler", model, x, sigmas, noise, callback, eta, s_noise)


def sample_dpm_2_ancestral(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, noise: NoiseSampler,
                           callback: StepCallback | None = None, *, eta: float = 1.0, s_noise: float = 1.0) -> torch.Tensor:
    """DPM2 a."""
    return _ancestral("dpm2", model, x, sigmas, noise, callback, eta, s_noise)


def lms_coefficient(order: int, t: list[float], i: int, j: int) -> float:
    """Integral over [t_i, t_{i+1}] of the Lagrange basis polynomial of node t_{i-j} among the
    nodes t_i .. t_{i-order+1}: the weight of the j-th most recent derivative (exact, not quadrature)."""
    import numpy as np

    nodes = [t[i - k] for k in range(order)]
    poly = np.poly1d([1.0])
    for k, node in enumerate(nodes):
        if k != j:
            poly = poly * np.poly1d([1.0, -node]) / (nodes[j] - node)
    integral = poly.integ()
    return float(integral(t[i + 1]) - integral(t[i]))


def sample_lms(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, noise: NoiseSampler,
               callback: StepCallback | None = None, *, order: int = 4) -> torch.Tensor:
    """Linear multistep (Adams–Bashforth on the sigma grid) over the last ``order`` derivatives."""
    ts = [float(s) for s in sigmas]
    ds: list[torch.Tensor] = []
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        ds = [*ds, to_d(x, sigmas[i], denoised)][-order:]
        cur = min(i + 1, order)
        for j in range(cur):
            x = x + lms_coefficient(cur, ts, i, j) * ds[-1 - j]
        if callback:
            callback(i, x, denoised)
    return x


def _t(sigma: torch.Tensor) -> torch.Tensor:
    return -sigma.log()


def sample_dpmpp_2m(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, noise: NoiseSampler,
                    callback: StepCallback | None = None) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022): data-prediction multistep, second order in log sigma."""
    old = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            h = _t(sigmas[i + 1]) - _t(sigmas[i])
            d = denoised
            if old is not None:
                r = (_t(sigmas[i]) - _t(sigmas[i - 1])) / h
                d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old
            x = (sigmas[i + 1] / sigmas[i]) * x - torch.expm1(-h) * d
        old = denoised
        if callback:
            callback(i, x, denoised)
    return x


def sample_dpmpp_sde(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, noise: NoiseSampler,
                     callback: StepCallback | None = None, *, eta: float = 1.0, s_noise: float = 1.0,
                     r: float = 0.5) -> torch.Tensor:
    """DPM-Solver++ (stochastic, second order): an intermediate point at fraction r of the step in
    log sigma, each half with its ancestral noise; the last step to 0 is Euler."""
    def sig(t: torch.Tensor) -> torch.Tensor:
        return (-t).exp()

    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        if sigmas[i + 1] == 0:
            x = x + to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
        else:
            t, t_next = _t(sigmas[i]), _t(sigmas[i + 1])
            h = t_next - t
            s = t + h * r
            fac = 1 / (2 * r)
            down, up = ancestral_step(sig(t), sig(s), eta)
            s_ = _t(down)
            x_2 = (sig(s_) / sig(t)) * x - torch.expm1(t - s_) * denoised
            x_2 = x_2 + noise(sig(t), sig(s)) * s_noise * up
            denoised_2 = model(x_2, sig(s))
            down, up = ancestral_step(sig(t), sig(t_next), eta)
            t_next_ = _t(down)
            d = (1 - fac) * denoised + fac * denoised_2
            x = (sig(t_next_) / sig(t)) * x - torch.expm1(t - t_next_) * d
            x = x + noise(sig(t), sig(t_next)) * s_noise * up
        if callback:
            callback(i, x, denoised)
    return x


def sample_dpmpp_2m_sde(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, noise: NoiseSampler,
                        callback: StepCallback | None = None, *, eta: float = 1.0, s_noise: float = 1.0,
                        solver_type: str = "midpoint") -> torch.Tensor:
    """DPM-Solver++(2M) SDE: the exact SDE step for the data prediction plus a second-order
    correction from the previous prediction (midpoint or Heun form)."""
    old = h_last = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            h = _t(sigmas[i + 1]) - _t(sigmas[i])
            eta_h = eta * h
            x = sigmas[i + 1] / sigmas[i] * (-eta_h).exp() * x - torch.expm1(-h - eta_h) * denoised
            if old is not None:
                r = h_last / h
                phi = -torch.expm1(-h - eta_h)
                if solver_type == "heun":
                    x = x + (phi / (-h - eta_h) + 1) * (1 / r) * (denoised - old)
                else:
                    x = x + 0.5 * phi * (1 / r) * (denoised - old)
            if eta:
                x = x + noise(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * (-torch.expm1(-2 * eta_h)).sqrt() * s_noise
            h_last = h
        old = denoised
        if callback:
            callback(i, x, denoised)
    return x


def sample_dpmpp_3m_sde(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, noise: NoiseSampler,
                        callback: StepCallback | None = None, *, eta: float = 1.0, s_noise: float = 1.0) -> torch.Tensor:
    """DPM-Solver++(3M) SDE: third-order multistep from the last three data predictions."""
    d_1 = d_2 = None
    h_1 = h_2 = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        h = None
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            h = _t(sigmas[i + 1]) - _t(sigmas[i])
            h_eta = h * (eta + 1)
            x = (-h_eta).exp() * x - torch.expm1(-h_eta) * denoised
            phi_2 = torch.expm1(-h_eta) / h_eta + 1
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - d_1) / r0
                d1_1 = (d_1 - d_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_3 = phi_2 / h_eta - 0.5
                x = x + phi_2 * d1 - phi_3 * d2
            elif h_1 is not None:
                x = x + phi_2 * (denoised - d_1) / (h_1 / h)
            if eta:
                x = x + noise(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * (-torch.expm1(-2 * h * eta)).sqrt() * s_noise
        d_1, d_2 = denoised, d_1
        h_1, h_2 = h, h_1
        if callback:
            callback(i, x, denoised)
    return x


def sample_lcm(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, noise: NoiseSampler,
               callback: StepCallback | None = None) -> torch.Tensor:
    """Latent consistency sampling: jump to the prediction, re-noise to the next level."""
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        x = denoised
        if sigmas[i + 1] > 0:
            x = x + sigmas[i + 1] * noise(sigmas[i], sigmas[i + 1])
        if callback:
            callback(i, x, denoised)
    return x
