"""A1111's seed rules and initial noise (modules/rng.py, processing.py), on the CPU RNG.

Noise always comes from ``torch.Generator("cpu")`` so that a seed gives the same image on any
device; A1111 reproduces it when the infotext says ``RNG: CPU`` (see RNG_SOURCE). Each image
has its own generator, so an image never depends on the batch it was made in.
"""

from __future__ import annotations

import numbers
import random
from collections.abc import Sequence

import torch

from ..errors import InvalidRequestError

# A1111 draws random seeds with random.randrange(4294967294): [0, 4294967294).
RANDOM_SEED_LIMIT = 4294967294
# torch.Generator.manual_seed takes at most an unsigned 64-bit value.
MAX_SEED = 2**64 - 1
# Infotext "RNG" value that makes A1111 use the same (CPU) noise as we do.
RNG_SOURCE = "CPU"
# slerp falls back to lerp when the mean cosine exceeds this (A1111's constant).
SLERP_PARALLEL_DOT = 0.9995


def random_seed() -> int:
    """A random seed in A1111's range [0, 4294967294)."""
    return random.randrange(RANDOM_SEED_LIMIT)


def resolve_seed(seed: int | None) -> int:
    """-1 or None → a random seed; any other seed >= 0 is kept as given."""
    if seed is None:
        return random_seed()
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise InvalidRequestError(f"seed must be an integer (-1 for random), got {seed!r}")
    seed = int(seed)
    if seed == -1:
        return random_seed()
    if seed < -1:
        raise InvalidRequestError(f"seed must be -1 (random) or a non-negative integer, got {seed}")
    if seed > MAX_SEED:
        raise InvalidRequestError(f"seed must be at most {MAX_SEED}, got {seed}")
    return seed


def all_seeds(
    seed: int | None, subseed: int | None, subseed_strength: float, count: int
) -> tuple[list[int], list[int]]:
    """Seeds and variation seeds of ``count`` images (n_iter * batch_size), as A1111 numbers them.

    Image i gets seed + i, except with a variation (subseed_strength != 0): then every image
    keeps the seed and the subseed increments instead. -1/None seeds are resolved first.
    """
    if isinstance(count, bool) or not isinstance(count, numbers.Integral) or count < 0:
        raise InvalidRequestError(f"image count must be a non-negative integer, got {count!r}")
    seed = resolve_seed(seed)
    subseed = resolve_seed(subseed)
    step = 1 if subseed_strength == 0 else 0
    seeds = [seed + i * step for i in range(count)]
    subseeds = [subseed + i for i in range(count)]
    if max(seeds + subseeds, default=0) > MAX_SEED:
        raise InvalidRequestError(f"seed + image index must stay at most {MAX_SEED}")
    return seeds, subseeds


def slerp(val: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """A1111's spherical interpolation from ``low`` (val=0) to ``high`` (val=1).

    As in A1111, vectors are normalised along dim 1 (rows of a (C, H, W) noise), and when
    they are nearly parallel (mean cosine > 0.9995) it returns ``low*val + high*(1-val)``:
    A1111's lerp fallback has its weights that way round, kept for identical noise. It is
    only reached when low and high point the same way (e.g. seed == subseed), where the
    two orders agree.
    """
    low_unit = low / torch.norm(low, dim=1, keepdim=True)
    high_unit = high / torch.norm(high, dim=1, keepdim=True)
    cosine = (low_unit * high_unit).sum(1)
    if cosine.mean() > SLERP_PARALLEL_DOT:
        return low * val + high * (1 - val)
    omega = torch.acos(cosine)
    sin_omega = torch.sin(omega)
    low_weight = (torch.sin((1.0 - val) * omega) / sin_omega).unsqueeze(1)
    high_weight = (torch.sin(val * omega) / sin_omega).unsqueeze(1)
    return low_weight * low + high_weight * high


def _generator(seed: int, device: str | torch.device = "cpu") -> torch.Generator:
    return torch.Generator(device).manual_seed(int(seed))


def _randn(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=generator, dtype=torch.float32, device=generator.device)


def _paste_centre(target: torch.Tensor, source: torch.Tensor) -> None:
    """Centre ``source`` (C, h, w) in ``target`` (C, H, W), cropping its centre when larger.

    Offsets use floor division like A1111, so with an odd size difference the larger noise
    loses one more row/column on the far side than on the near side.
    """
    _, height, width = target.shape
    _, src_h, src_w = source.shape
    dx = (width - src_w) // 2
    dy = (height - src_h) // 2
    copy_w = src_w if dx >= 0 else src_w + 2 * dx
    copy_h = src_h if dy >= 0 else src_h + 2 * dy
    to_x, to_y = max(dx, 0), max(dy, 0)
    from_x, from_y = max(-dx, 0), max(-dy, 0)
    target[:, to_y : to_y + copy_h, to_x : to_x + copy_w] = source[
        :, from_y : from_y + copy_h, from_x : from_x + copy_w
    ]


def _check_seed(seed: object, what: str) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed <= MAX_SEED:
        raise InvalidRequestError(f"{what} must be an integer in [0, {MAX_SEED}], got {seed!r}")
    return int(seed)


class ImageNoise:
    """Per-image noise for one batch, as A1111's ImageRNG with randn_source=CPU.

    ``shape`` is one image's latent shape (C, H/8, W/8). ``first()`` gives the initial noise;
    ``next()`` one more draw per image from its generator (ancestral/SDE step noise).
    ``eta_noise_seed_delta`` (A1111's ENSD) reseeds the generators with seed + delta after
    the initial noise, as A1111 does.
    """

    def __init__(
        self,
        seeds: Sequence[int],
        subseeds: Sequence[int] | None = None,
        subseed_strength: float = 0.0,
        seed_resize_from_h: int = 0,
        seed_resize_from_w: int = 0,
        *,
        shape: tuple[int, int, int],
        eta_noise_seed_delta: int = 0,
        device: str | torch.device = "cpu",
    ) -> None:
        if len(shape) != 3 or any(int(n) <= 0 for n in shape):
            raise ValueError(f"shape must be (C, H/8, W/8) with positive sizes, got {shape!r}")
        if not seeds:
            raise ValueError("ImageNoise needs at least one seed")
        self.shape: tuple[int, int, int] = (int(shape[0]), int(shape[1]), int(shape[2]))
        self.seeds = [_check_seed(s, "seed") for s in seeds]
        self.subseeds = None if subseeds is None else [_check_seed(s, "subseed") for s in subseeds]
        self.subseed_strength = float(subseed_strength)
        self.seed_resize_from_h = int(seed_resize_from_h)
        self.seed_resize_from_w = int(seed_resize_from_w)
        self.eta_noise_seed_delta = int(eta_noise_seed_delta)
        # A1111's randn_source: "CPU" (the default here, device-independent) or "GPU", which draws on
        # the worker's own device (the same as CPU on a CPU worker).
        self.device = torch.device(device)
        self._generators = [_generator(s, self.device) for s in self.seeds]
        self._started = False

    @property
    def generators(self) -> list[torch.Generator]:
        """The per-image CPU generators, in the state A1111 leaves them (after ``first()``)."""
        return self._generators

    def _source_shape(self) -> tuple[int, int, int]:
        if self.seed_resize_from_h <= 0 or self.seed_resize_from_w <= 0:
            return self.shape
        return (self.shape[0], self.seed_resize_from_h // 8, self.seed_resize_from_w // 8)

    def first(self) -> torch.Tensor:
        """Initial noise (B, C, H, W), float32 on the noise device.

        Calling it again restarts every image's generator, so it always returns the same
        noise and leaves the generators in the same state.
        """
        source_shape = self._source_shape()
        resized = source_shape != self.shape
        subseeds = self.subseeds if self.subseed_strength != 0 else None
        self._generators = [_generator(s, self.device) for s in self.seeds]

        images = []
        for i, (seed, generator) in enumerate(zip(self.seeds, self._generators, strict=True)):
            # With "resize seed from", A1111 makes the from-size noise with a freshly seeded
            # (global) generator; the image's own generator is used once, for the full size.
            noise = _randn(source_shape, _generator(seed, self.device) if resized else generator)
            if subseeds is not None:
                subseed = subseeds[i] if i < len(subseeds) else 0  # A1111's default
                noise = slerp(self.subseed_strength, noise, _randn(source_shape, _generator(subseed, self.device)))
            if resized:
                full = _randn(self.shape, generator)
                _paste_centre(full, noise)
                noise = full
            images.append(noise)

        if self.eta_noise_seed_delta:
            self._generators = [_generator(s + self.eta_noise_seed_delta, self.device) for s in self.seeds]
        self._started = True
        return torch.stack(images)

    def next(self) -> torch.Tensor:
        """One more draw (B, C, H, W) per image from its generator; the first call is ``first()``."""
        if not self._started:
            return self.first()
        return torch.stack([_randn(self.shape, g) for g in self._generators])
