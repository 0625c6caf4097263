"""txt2img through the public Python API (Engine) on tiny real-architecture models."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import numpy as np
import pytest

from muralist.engine import samplers
from muralist.engine.txt2img import Interrupted, JobControl
from muralist.errors import InvalidRequestError, NotFoundError
from muralist.infotext import A1111_PARAM_RE, parse_infotext, read_infotext
from muralist.request import GenerationRequest, parse_request
from tests.conftest import link_file, pixels


def req(**kw) -> GenerationRequest:
    base = dict(prompt="a red fox in the snow", width=64, height=64, steps=8, seed=1234, model="tiny-sd15.safetensors")
    base.update(kw)
    return GenerationRequest(**base)


def run(engine, tmp_path: Path, **kw):
    return engine.generate(req(**kw), save_to=tmp_path)


def test_same_seed_same_pixels_and_next_seed_differs(engine, tmp_path: Path) -> None:
    a = run(engine, tmp_path, seed=77).result.images[0]
    b = run(engine, tmp_path, seed=77).result.images[0]
    c = run(engine, tmp_path, seed=78).result.images[0]
    assert np.array_equal(pixels(a), pixels(b))
    assert np.abs(pixels(a) - pixels(c)).mean() > 5


@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ SDE", "DPM++ 2M SDE", "DDIM"])
def test_batch_of_two_equals_two_single_runs(engine, tmp_path: Path, sampler: str) -> None:
    """One noise generator per image: image i of a batch equals a single run with seed+i."""
    batch = run(engine, tmp_path, seed=500, batch_size=2, sampler_name=sampler).result
    assert batch.seeds == [500, 501]
    single0 = run(engine, tmp_path, seed=500, sampler_name=sampler).result.images[0]
    single1 = run(engine, tmp_path, seed=501, sampler_name=sampler).result.images[0]
    # Batched matrix products round differently in the last float bit: allow 1/255 on some pixels
    # (an image from another seed differs by ~60/255 on average).
    for got, want in ((batch.images[0], single0), (batch.images[1], single1)):
        diff = np.abs(pixels(got) - pixels(want))
        assert diff.max() <= 1 and diff.mean() < 0.1
    assert np.abs(pixels(batch.images[0]) - pixels(batch.images[1])).mean() > 5


def test_n_iter_continues_seeds_and_names_files_like_a1111(engine, tmp_path: Path) -> None:
    saved = run(engine, tmp_path, seed=10, batch_size=2, n_iter=2, steps=2)
    assert saved.result.seeds == [10, 11, 12, 13]
    assert [p.name for p in saved.paths] == ["00000-10.png", "00001-11.png", "00002-12.png", "00003-13.png"]
    again = run(engine, tmp_path, seed=20, steps=2)
    assert again.paths[0].name == "00004-20.png"


@pytest.mark.parametrize("sampler", [s.name for s in samplers.SAMPLERS])
def test_every_sampler_runs_without_nan(engine, tmp_path: Path, sampler: str) -> None:
    res = run(engine, tmp_path, sampler_name=sampler, steps=4).result
    arr = pixels(res.images[0])
    assert arr.shape == (64, 64, 3) and arr.std() > 0
    assert f"Sampler: {sampler}," in res.infotexts[0]


@pytest.mark.parametrize(
    "model,family",
    [("tiny-sd15.safetensors", "SD1"), ("tiny-sd21", "SD2"), ("tiny-sdxl", "SDXL"), ("tiny-sd15-inpainting", "SD1 inpainting")],
)
def test_each_family_generates_and_the_image_names_its_model(engine, tmp_path: Path, model: str, family: str) -> None:
    saved = run(engine, tmp_path, model=model, steps=3, width=72, height=64)
    info = saved.model
    assert saved.result.images[0].size == (72, 64)
    text = read_infotext(saved.paths[0])
    params = parse_infotext(text)
    assert params["Model"] == info.model_name and params["Model hash"] == info.shorthash
    assert params["Size-1"] == "72" and params["Size-2"] == "64"


def test_infotext_is_read_by_a1111_regex(engine, tmp_path: Path) -> None:
    saved = run(
        engine,
        tmp_path,
        prompt="a castle, (detailed:1.2), at night",
        negative_prompt="blurry, low quality\nwatermark",
        subseed=99,
        subseed_strength=0.3,
        seed_resize_from_w=128,
        seed_resize_from_h=96,
        clip_skip=2,
        tiling=True,
        sampler_name="DPM++ 2M",
        scheduler="Karras",
        vae="tiny-vae.safetensors",
        steps=3,
    )
    text = read_infotext(saved.paths[0])
    lines = text.split("\n")
    assert lines[0] == "a castle, (detailed:1.2), at night"
    assert lines[1] == "Negative prompt: blurry, low quality" and lines[2] == "watermark"
    found = {m.group(1): m.group(2) for m in A1111_PARAM_RE.finditer(lines[-1])}
    vae = saved.vae
    expected = {
        "Steps": "3",
        "Sampler": "DPM++ 2M",
        "Schedule type": "Karras",
        "CFG scale": "7.0",
        "Seed": "1234",
        "Size": "64x64",
        "Model hash": saved.model.shorthash,
        "Model": "tiny-sd15",
        "VAE hash": vae.shorthash,
        "VAE": "tiny-vae.safetensors",
        "Variation seed": "99",
        "Variation seed strength": "0.3",
        "Seed resize from": "128x96",
        "Clip skip": "2",
        "RNG": "CPU",
        "Tiling": "True",
    }
    for k, v in expected.items():
        assert found.get(k) == v, (k, found.get(k))
    keys = list(found)
    order = ["Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size", "Model hash", "Model", "VAE hash", "VAE",
             "Variation seed", "Variation seed strength", "Seed resize from", "Clip skip", "RNG", "Tiling", "Version"]
    assert [k for k in keys if k in order] == order
    parsed = parse_infotext(text)
    assert parsed["Negative prompt"] == "blurry, low quality\nwatermark"


@pytest.mark.parametrize(
    "change",
    [dict(subseed=5, subseed_strength=0.5), dict(clip_skip=2), dict(tiling=True), dict(vae="tiny-vae"),
     dict(seed_resize_from_w=96, seed_resize_from_h=96), dict(cfg_scale=3.0), dict(negative_prompt="snow")],
)
def test_options_change_the_image(engine, tmp_path: Path, change: dict) -> None:
    base = pixels(run(engine, tmp_path).result.images[0])
    changed = pixels(run(engine, tmp_path, **change).result.images[0])
    assert np.abs(base - changed).mean() > 0.5


def test_variation_strength_zero_is_the_plain_seed(engine, tmp_path: Path) -> None:
    base = pixels(run(engine, tmp_path).result.images[0])
    same = pixels(run(engine, tmp_path, subseed=5, subseed_strength=0.0).result.images[0])
    assert np.array_equal(base, same)


def test_ckpt_and_safetensors_of_the_same_weights_give_the_same_image(engine, tmp_path: Path) -> None:
    a = run(engine, tmp_path, model="tiny-sd15.safetensors").result.images[0]
    b = run(engine, tmp_path, model="same-as-sd15.ckpt").result.images[0]
    assert np.array_equal(pixels(a), pixels(b))


def test_v_prediction_sidecar_changes_sd2_output(a1111_models: Path, tmp_path: Path) -> None:
    from muralist.engine.engine import Engine, ModelCache
    from muralist.paths import DataDirs

    root = tmp_path / "data"
    ckpt = root / "models" / "Stable-diffusion"
    ckpt.mkdir(parents=True)
    link_file(a1111_models / "models" / "Stable-diffusion" / "tiny-sd21.safetensors", ckpt / "v.safetensors")
    link_file(a1111_models / "models" / "Stable-diffusion" / "tiny-sd21.safetensors", ckpt / "eps.safetensors")
    (ckpt / "v.yaml").write_text("model:\n  params:\n    parameterization: \"v\"\n")
    eng = Engine(DataDirs.from_options(root), cache=ModelCache(max_models=2, device="cpu"))
    assert eng.registry.find_checkpoint("v").prediction_type == "v_prediction"
    v = pixels(eng.generate(req(model="v"), save_to=tmp_path).result.images[0])
    e = pixels(eng.generate(req(model="eps"), save_to=tmp_path).result.images[0])
    assert np.abs(v - e).mean() > 0.5


def test_interrupt_stops_the_job_and_saves_nothing(engine, tmp_path: Path) -> None:
    control = JobControl()
    steps_seen = []

    def progress(p) -> None:
        steps_seen.append(p.step)
        if p.step == 2:
            control.interrupt()

    with pytest.raises(Interrupted):
        engine.generate(req(steps=8), control=control, progress=progress, save_to=tmp_path)
    assert max(steps_seen) == 2
    assert not list(tmp_path.glob("*.png"))


def test_skip_keeps_the_current_batch_unfinished_and_goes_on(engine, tmp_path: Path) -> None:
    control = JobControl()

    def progress(p) -> None:
        if p.batch == 0 and p.step == 1:
            control.skip()

    saved = engine.generate(req(steps=3, n_iter=2), control=control, progress=progress, save_to=tmp_path)
    assert saved.result.seeds == [1234, 1235]  # A1111 keeps the skipped image, decoded as it was
    assert "skipped" in saved.result.warnings[0]
    full = engine.generate(req(steps=3, n_iter=2), save_to=tmp_path / "full")
    assert (pixels(saved.result.images[0]) != pixels(full.result.images[0])).any()  # unfinished
    assert (pixels(saved.result.images[1]) == pixels(full.result.images[1])).all()  # the next batch is whole


def test_stop_early_keeps_what_is_done(engine, tmp_path: Path) -> None:
    control = JobControl()

    def progress(p) -> None:
        if p.batch == 0 and p.step == 1:
            control.stop_early()

    saved = engine.generate(req(steps=3, n_iter=2), control=control, progress=progress, save_to=tmp_path)
    assert saved.result.seeds == [1234] and len(saved.paths) == 1 and saved.paths[0].is_file()
    assert "interrupted" in saved.result.warnings[0]


def test_progress_reports_steps_and_eta(engine, tmp_path: Path) -> None:
    seen = []
    engine.generate(req(steps=4, n_iter=2), progress=lambda p: seen.append((p.batch, p.step, p.fraction)), save_to=tmp_path)
    assert [(b, s) for b, s, _ in seen] == [(0, 1), (0, 2), (0, 3), (0, 4), (1, 1), (1, 2), (1, 3), (1, 4)]
    assert seen[-1][2] == pytest.approx(1.0)


def test_random_seed_is_recorded(engine, tmp_path: Path) -> None:
    saved = run(engine, tmp_path, seed=-1, steps=2)
    seed = saved.result.seeds[0]
    assert 0 <= seed < 4294967294
    assert re.search(rf"Seed: {seed},", saved.result.infotexts[0])
    assert saved.paths[0].name.endswith(f"-{seed}.png")


@pytest.mark.parametrize(
    "bad,msg",
    [
        (dict(width=500), "width: must be a multiple of 8"),
        (dict(steps=0), "steps"),
        (dict(cfg_scale=-1), "cfg_scale"),
        (dict(subseed_strength=2), "subseed_strength"),
    ],
)
def test_bad_request_fields_are_named(bad: dict, msg: str) -> None:
    with pytest.raises(InvalidRequestError, match=msg):
        parse_request({"prompt": "x", **bad})


def test_unknown_names_suggest_choices(engine) -> None:
    with pytest.raises(NotFoundError, match="tiny-sd15"):
        engine.resolve_model(req(model="tinny-sd15"))
    with pytest.raises(NotFoundError, match="Euler a"):
        samplers.resolve("Eular a")
    with pytest.raises(InvalidRequestError, match="not available"):
        samplers.resolve("DDIM CFG++")


def test_legacy_sampler_names() -> None:
    c = samplers.resolve("DPM++ 2M Karras")
    assert (c.sampler.name, c.schedule_label) == ("DPM++ 2M", "Karras")
    assert samplers.resolve("k_euler_a").sampler.name == "Euler a"
    assert samplers.resolve("DPM++ 2M", "Automatic").schedule_label == "Karras"
    assert samplers.resolve("Euler", "sgm_uniform").schedule_label == "SGM Uniform"


def test_one_loaded_model_serves_threads_one_job_at_a_time(engine, tmp_path: Path) -> None:
    """Two threads on the same loaded model still get their own seeds' images."""
    results: dict[int, np.ndarray] = {}

    def work(seed: int) -> None:
        results[seed] = pixels(engine.generate(req(seed=seed, steps=3), save_to=tmp_path / str(seed)).result.images[0])

    threads = [threading.Thread(target=work, args=(s,)) for s in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    alone = pixels(run(engine, tmp_path, seed=2, steps=3).result.images[0])
    assert np.array_equal(results[2], alone)


def test_model_cache_keeps_the_budget_and_never_evicts_a_model_in_use(a1111_models: Path) -> None:
    from muralist.engine.engine import ModelCache
    from muralist.models.registry import ModelRegistry
    from muralist.paths import DataDirs

    reg = ModelRegistry(DataDirs.from_options(a1111_models))
    a, b, c = (reg.find_checkpoint(n) for n in ("tiny-sd15.safetensors", "tiny-sd21", "tiny-sdxl"))
    cache = ModelCache(max_models=1, device="cpu")
    with cache.use(a) as model_a:
        cache.model(b)  # over the count budget, but a is pinned and stays
        assert (str(a.path), a.sha256) in cache.loaded()
        assert cache.model(a) is model_a
    cache.model(c)
    assert cache.loaded() == [(str(c.path), c.sha256)]
    small = ModelCache(max_models=5, device="cpu", max_bytes=1)
    small.model(a)
    small.model(b)
    assert small.loaded() == [(str(b.path), b.sha256)]  # the byte budget evicts the older one


@pytest.mark.parametrize("sampler", ["Euler a", "DPM2 a"])
def test_eta_noise_seed_delta_changes_ancestral_samplers_only(engine, tmp_path: Path, sampler: str) -> None:
    """A1111: ENSD reseeds the step noise of ancestral samplers; deterministic samplers and DPM++ SDE
    (its Brownian tree is seeded by the image seeds) give the same image."""
    plain = run(engine, tmp_path, sampler_name=sampler)
    delta = run(engine, tmp_path, sampler_name=sampler, eta_noise_seed_delta=31337)
    assert np.abs(pixels(plain.result.images[0]) - pixels(delta.result.images[0])).max() > 0
    assert parse_infotext(delta.result.infotexts[0])["ENSD"] == "31337"
    assert "ENSD" not in parse_infotext(plain.result.infotexts[0])
    for deterministic in ("Euler", "DPM++ 2M", "DPM++ SDE"):
        a = run(engine, tmp_path, sampler_name=deterministic)
        b = run(engine, tmp_path, sampler_name=deterministic, eta_noise_seed_delta=31337)
        assert np.array_equal(pixels(a.result.images[0]), pixels(b.result.images[0]))


def test_randn_source_gpu_draws_on_the_worker_device(engine, tmp_path: Path) -> None:
    """On a CPU worker "GPU" noise is the CPU's; the infotext then omits RNG, as A1111 does for GPU."""
    cpu = run(engine, tmp_path, sampler_name="Euler a")
    gpu = run(engine, tmp_path, sampler_name="Euler a", randn_source="GPU")
    assert np.array_equal(pixels(cpu.result.images[0]), pixels(gpu.result.images[0]))
    assert parse_infotext(cpu.result.infotexts[0])["RNG"] == "CPU" and "RNG" not in parse_infotext(gpu.result.infotexts[0])


ETA_SAMPLERS = ["Euler a", "DPM2 a", "DPM++ 2S a", "DPM++ SDE", "DPM++ 2M SDE", "DPM++ 3M SDE", "DPM fast", "DPM adaptive"]


@pytest.mark.parametrize("sampler", ETA_SAMPLERS)
def test_eta_changes_ancestral_and_sde_samplers(engine, tmp_path: Path, sampler: str) -> None:
    """A1111's eta (eta_ancestral, default 1) scales the fresh noise of ancestral and SDE samplers."""
    px = lambda **kw: pixels(run(engine, tmp_path, sampler_name=sampler, steps=4, **kw).result.images[0])  # noqa: E731
    default, eta1, eta0 = px(), px(eta=1.0), px(eta=0.0)
    assert np.array_equal(default, eta1) and np.abs(eta0 - eta1).max() > 0


@pytest.mark.parametrize("sampler", ["Euler", "Heun", "LMS", "DPM++ 2M", "DPM2", "DDIM", "UniPC"])
def test_eta_leaves_deterministic_samplers_alone(engine, tmp_path: Path, sampler: str) -> None:
    px = lambda **kw: pixels(run(engine, tmp_path, sampler_name=sampler, steps=4, **kw).result.images[0])  # noqa: E731
    assert np.array_equal(px(eta=0.0), px(eta=1.0)) or sampler == "DDIM"
    if sampler == "DDIM":  # DDIM's own eta (A1111's eta_ddim, default 0): 1 adds noise
        assert np.array_equal(px(), px(eta=0.0)) and np.abs(px(eta=1.0) - px()).max() > 0


def test_eta_zero_makes_euler_a_euler_and_churn_changes_euler(engine, tmp_path: Path) -> None:
    px = lambda **kw: pixels(run(engine, tmp_path, **kw).result.images[0])  # noqa: E731
    euler = px(sampler_name="Euler")
    assert np.array_equal(px(sampler_name="Euler a", eta=0.0), euler)
    # s_noise reaches the samplers A1111 gives it to: not Euler a, and for Euler only through churn
    assert np.array_equal(px(sampler_name="Euler a", s_noise=0.5), px(sampler_name="Euler a"))
    assert np.abs(px(sampler_name="DPM2 a", s_noise=0.5) - px(sampler_name="DPM2 a")).max() > 0
    assert np.array_equal(px(sampler_name="Euler", s_noise=0.5), euler)
    churned = px(sampler_name="Euler", s_churn=1.0)
    assert np.abs(churned - euler).max() > 0
    assert np.array_equal(px(sampler_name="Euler", s_churn=1.0, s_tmax=0.001, s_tmin=0.0005), euler)  # no sigma in range
    assert np.abs(px(sampler_name="Euler", sgm_noise_multiplier=True) - euler).max() > 0


def test_tiny_model_image_equals_an_independent_dpmpp_2m_karras_loop(a1111_models: Path, engine, tmp_path: Path) -> None:
    """The whole txt2img path (noise, Karras sigmas, fractional timesteps, CFG, DPM++ 2M, VAE) against
    a loop written here from A1111's rules with the same UNet, VAE and conditioning."""
    import torch

    from muralist.engine.conditioning import PromptEncoder, job_conditioning
    from muralist.engine.txt2img import decode
    from muralist.models.loader import load_checkpoint

    steps, cfg = 6, 7.0
    got = run(engine, tmp_path, sampler_name="DPM++ 2M", scheduler="Karras", steps=steps, cfg_scale=cfg, seed=42).result

    model = load_checkpoint(a1111_models / "models" / "Stable-diffusion" / "tiny-sd15.safetensors")
    conds = job_conditioning(PromptEncoder(model, 1, {}, False), "a red fox in the snow", "", steps)
    parts, uncond = conds.at(0)
    c, u = parts[0][0].context, uncond.context
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    ac = np.cumprod(1 - betas)
    train = np.sqrt((1 - ac) / ac)
    lo, hi = train[0], train[-1]
    ramp = np.linspace(0, 1, steps)
    sig = np.append((hi ** (1 / 7) + ramp * (lo ** (1 / 7) - hi ** (1 / 7))) ** 7, 0.0)
    x = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(42)).double() * sig[0]

    def denoise(x: torch.Tensor, s: float) -> torch.Tensor:
        t = float(np.interp(np.log(s), np.log(train), np.arange(1000)))
        xin = (x / np.sqrt(s * s + 1)).float()
        with torch.inference_mode():
            eps_u = model.unet(xin, torch.tensor(t), encoder_hidden_states=u).sample.double()
            eps_c = model.unet(xin, torch.tensor(t), encoder_hidden_states=c).sample.double()
        return x - s * (eps_u + cfg * (eps_c - eps_u))

    old = None
    for i in range(steps):
        den = denoise(x, sig[i])
        if sig[i + 1] == 0:
            x = den
        else:
            d = den if old is None else den + (den - old) / (2 * (np.log(sig[i - 1] / sig[i]) / np.log(sig[i] / sig[i + 1])))
            x = (sig[i + 1] / sig[i]) * x + (1 - sig[i + 1] / sig[i]) * d
        old = den
    want = decode(model.vae, x.float(), model.vae_scale)[0]
    diff = np.abs(pixels(got.images[0]) - pixels(want))
    assert diff.max() <= 1, diff.max()


def test_hires_pass_uses_a1111s_hires_prompt_schedule(engine, tmp_path: Path) -> None:
    """"[cat:dog:0.5]" is cat then dog in the first pass and dog for the whole hires pass (A1111 >= 1.6),
    so it gives the image of the same first pass followed by a hires pass prompted "dog"."""
    hr = dict(enable_hr=True, hr_scale=1.5, denoising_strength=0.6, steps=4, sampler_name="Euler")
    edited = run(engine, tmp_path, prompt="a [cat:dog:0.5]", **hr).result.images[0]
    explicit = run(engine, tmp_path, prompt="a [cat:dog:0.5]", hr_prompt="a dog", **hr).result.images[0]
    cat_hires = run(engine, tmp_path, prompt="a [cat:dog:0.5]", hr_prompt="a cat", **hr).result.images[0]
    assert np.array_equal(pixels(edited), pixels(explicit))
    assert np.abs(pixels(edited) - pixels(cat_hires)).max() > 0


def test_schedule_options_change_the_image_and_are_recorded(engine, tmp_path: Path) -> None:
    plain = run(engine, tmp_path, sampler_name="DPM++ 2M", steps=4).result
    tuned = run(engine, tmp_path, sampler_name="DPM++ 2M", steps=4, rho=3.0, sigma_max=10.0).result
    assert np.abs(pixels(plain.images[0]) - pixels(tuned.images[0])).max() > 0
    found = parse_infotext(tuned.infotexts[0])
    assert found["Schedule rho"] == "3.0" and found["Schedule max sigma"] == "10.0"
    assert "Schedule rho" not in parse_infotext(plain.infotexts[0])
