"""A1111 seed rules and per-image noise, checked against explicitly generated tensors."""

from __future__ import annotations

import pytest
import torch

from muralist.engine.seeds import (
    RANDOM_SEED_LIMIT,
    ImageNoise,
    all_seeds,
    random_seed,
    resolve_seed,
    slerp,
)
from muralist.errors import InvalidRequestError

SHAPE = (4, 8, 12)  # (C, H/8, W/8) of a 96x64 image


def draws(seed: int, shape: tuple[int, ...], n: int = 1) -> list[torch.Tensor]:
    """The first n draws of a fresh CPU generator seeded with ``seed``."""
    generator = torch.Generator("cpu").manual_seed(seed)
    return [torch.randn(shape, generator=generator) for _ in range(n)]


def test_random_and_resolved_seeds() -> None:
    for _ in range(200):
        assert 0 <= random_seed() < RANDOM_SEED_LIMIT
    assert RANDOM_SEED_LIMIT == 4294967294
    assert 0 <= resolve_seed(-1) < RANDOM_SEED_LIMIT
    assert 0 <= resolve_seed(None) < RANDOM_SEED_LIMIT
    assert resolve_seed(0) == 0
    assert resolve_seed(5_000_000_000) == 5_000_000_000  # kept as given, beyond 32 bits too
    for bad in (-2, 2**64, 1.5, "7", True):
        with pytest.raises(InvalidRequestError):
            resolve_seed(bad)  # type: ignore[arg-type]


def test_all_seeds_rules() -> None:
    assert all_seeds(100, 7, 0, 3) == ([100, 101, 102], [7, 8, 9])
    # With a variation, the seed stays and the subseed increments.
    assert all_seeds(100, 7, 0.3, 3) == ([100, 100, 100], [7, 8, 9])
    assert all_seeds(100, 7, 0, 0) == ([], [])
    seeds, subseeds = all_seeds(-1, None, 0, 4)
    assert seeds == list(range(seeds[0], seeds[0] + 4))
    assert subseeds == list(range(subseeds[0], subseeds[0] + 4))
    with pytest.raises(InvalidRequestError):
        all_seeds(-5, 1, 0, 2)
    with pytest.raises(InvalidRequestError):
        all_seeds(1, 1, 0, -1)


def test_slerp() -> None:
    low, high = draws(1, SHAPE)[0], draws(2, SHAPE)[0]
    torch.testing.assert_close(slerp(0.0, low, high), low)
    torch.testing.assert_close(slerp(1.0, low, high), high, atol=1e-5, rtol=1e-5)
    mid = slerp(0.5, low, high)
    assert not torch.allclose(mid, low) and not torch.allclose(mid, high)
    # Nearly parallel (mean cosine > 0.9995): A1111's lerp fallback, low*val + high*(1-val).
    torch.testing.assert_close(slerp(0.25, low, 2 * low), low * 0.25 + 2 * low * 0.75)


def test_same_seed_same_noise_and_plain_torch_noise() -> None:
    a = ImageNoise([42], shape=SHAPE).first()
    b = ImageNoise([42], shape=SHAPE).first()
    assert a.shape == (1, *SHAPE) and a.dtype == torch.float32 and a.device.type == "cpu"
    assert torch.equal(a, b)
    assert torch.equal(a[0], draws(42, SHAPE)[0])
    assert not torch.equal(a, ImageNoise([43], shape=SHAPE).first())


def test_image_does_not_depend_on_batch() -> None:
    pair = ImageNoise([10, 11], shape=SHAPE)
    single = ImageNoise([11], shape=SHAPE)
    assert torch.equal(pair.first()[1], single.first()[0])
    assert torch.equal(pair.next()[1], single.next()[0])
    assert len(pair.generators) == 2


def test_variation_strength() -> None:
    seed_noise, sub_noise = draws(5, SHAPE)[0], draws(900, SHAPE)[0]

    def varied(strength: float) -> torch.Tensor:
        return ImageNoise([5], [900], strength, shape=SHAPE).first()[0]

    assert torch.equal(varied(0.0), seed_noise)
    torch.testing.assert_close(varied(1.0), sub_noise, atol=1e-5, rtol=1e-5)
    half = varied(0.5)
    assert not torch.allclose(half, seed_noise, atol=1e-3) and not torch.allclose(half, sub_noise, atol=1e-3)
    torch.testing.assert_close(half, slerp(0.5, seed_noise, sub_noise))
    # Missing subseeds count as subseed 0, as in A1111.
    torch.testing.assert_close(
        ImageNoise([5, 6], [900], 0.5, shape=SHAPE).first()[1],
        slerp(0.5, draws(6, SHAPE)[0], draws(0, SHAPE)[0]),
    )


def test_seed_resize_from_smaller() -> None:
    # 96x64 target, noise "as if" 48x32: from-size latent (4, 4, 6) pasted at the centre.
    noise = ImageNoise([77], seed_resize_from_h=32, seed_resize_from_w=48, shape=SHAPE).first()[0]
    small = draws(77, (4, 4, 6))[0]
    full = draws(77, SHAPE)[0]
    dy, dx = (8 - 4) // 2, (12 - 6) // 2
    assert torch.equal(noise[:, dy : dy + 4, dx : dx + 6], small)
    outside = torch.ones(SHAPE, dtype=torch.bool)
    outside[:, dy : dy + 4, dx : dx + 6] = False
    assert torch.equal(noise[outside], full[outside])


def test_seed_resize_from_larger_crops_centre() -> None:
    # From 160x128 (latent 16x20) into 96x64 (8x12): the centre of the larger noise.
    noise = ImageNoise([77], seed_resize_from_h=128, seed_resize_from_w=160, shape=SHAPE).first()[0]
    large = draws(77, (4, 16, 20))[0]
    assert torch.equal(noise, large[:, 4:12, 4:16])


def test_seed_resize_odd_difference_follows_a1111_floor() -> None:
    # One row larger: floor((8-9)/2) = -1, so A1111 copies 7 rows starting at source row 1 and
    # the last row keeps full-size noise.
    noise = ImageNoise([3], seed_resize_from_h=72, seed_resize_from_w=96, shape=SHAPE).first()[0]
    large = draws(3, (4, 9, 12))[0]
    full = draws(3, SHAPE)[0]
    assert torch.equal(noise[:, 0:7, :], large[:, 1:8, :])
    assert torch.equal(noise[:, 7, :], full[:, 7, :])


def test_seed_resize_with_variation_uses_from_size_subnoise() -> None:
    noise = ImageNoise([8], [9], 0.5, seed_resize_from_h=32, seed_resize_from_w=48, shape=SHAPE).first()[0]
    mixed = slerp(0.5, draws(8, (4, 4, 6))[0], draws(9, (4, 4, 6))[0])
    torch.testing.assert_close(noise[:, 2:6, 3:9], mixed)


@pytest.mark.parametrize("resize", [(0, 0), (32, 48), (128, 160)])
def test_next_is_second_draw_of_image_generator(resize: tuple[int, int]) -> None:
    rng = ImageNoise([21, 22], seed_resize_from_h=resize[0], seed_resize_from_w=resize[1], shape=SHAPE)
    rng.first()
    step = rng.next()
    assert step.shape == (2, *SHAPE)
    assert torch.equal(step[0], draws(21, SHAPE, 2)[1])
    assert torch.equal(step[1], draws(22, SHAPE, 2)[1])
    assert torch.equal(rng.next()[0], draws(21, SHAPE, 3)[2])


def test_generators_left_as_a1111_leaves_them() -> None:
    rng = ImageNoise([21], shape=SHAPE)
    rng.first()
    assert torch.equal(torch.randn(SHAPE, generator=rng.generators[0]), draws(21, SHAPE, 2)[1])


def test_first_is_repeatable_and_next_starts_with_first() -> None:
    rng = ImageNoise([4], shape=SHAPE)
    assert torch.equal(rng.next(), ImageNoise([4], shape=SHAPE).first())  # A1111: first next() is first()
    again = ImageNoise([4], shape=SHAPE)
    assert torch.equal(again.first(), again.first())
    assert torch.equal(again.next()[0], draws(4, SHAPE, 2)[1])


def test_eta_noise_seed_delta_reseeds_after_first() -> None:
    rng = ImageNoise([100], shape=SHAPE, eta_noise_seed_delta=31337)
    assert torch.equal(rng.first()[0], draws(100, SHAPE)[0])
    assert torch.equal(rng.next()[0], draws(100 + 31337, SHAPE)[0])


def test_invalid_arguments() -> None:
    with pytest.raises(InvalidRequestError):
        ImageNoise([-1], shape=SHAPE)
    with pytest.raises(ValueError):
        ImageNoise([1], shape=(4, 0, 8))
    with pytest.raises(ValueError):
        ImageNoise([], shape=SHAPE)
