"""muralist's infotext read by A1111 v1.10's own rules, and A1111's read back by muralist.

The reader here is written from A1111's documented behaviour (modules/infotext_utils.py,
parse_generation_parameters): the last line holds ``key: value`` pairs matched by ``re_param``,
quoted values are JSON strings, "WxH" values are split into ``key-1``/``key-2``, and a missing
"Schedule type" means "Automatic", a missing "RNG" means "GPU".
"""

from __future__ import annotations

import json
import re

import packaging.version
import pytest

from muralist.engine import samplers
from muralist.engine.conditioning import PromptEncoder, job_conditioning
from muralist.engine.txt2img import Identity, infotext_params
from muralist.errors import InvalidRequestError
from muralist.infotext import build_infotext, parse_infotext, request_fields
from muralist.request import GenerationRequest

# re_param_code and re_imagesize of A1111's infotext_utils, written from their documented form.
RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
RE_SIZE = re.compile(r"^(\d+)x(\d+)$")

# A1111 v1.10's schedule types (sd_schedulers.schedulers) and each sampler's "Automatic"
# (the "scheduler" option of sd_samplers_kdiffusion.samplers_k_diffusion; None: the model's sigmas).
A1111_SCHEDULES = ["Automatic", "Uniform", "Karras", "Exponential", "Polyexponential", "SGM Uniform", "KL Optimal",
                   "Align Your Steps", "Simple", "Normal", "DDIM", "Beta"]
A1111_AUTOMATIC = {"DPM++ 2M": "Karras", "DPM++ SDE": "Karras", "DPM++ 2M SDE": "Exponential",
                   "DPM++ 2M SDE Heun": "Exponential", "DPM++ 3M SDE": "Exponential", "DPM2": "Karras",
                   "DPM2 a": "Karras"}
TIMESTEP_SAMPLERS = {"DDIM", "PLMS", "UniPC"}  # they take no schedule type

MODEL = Identity("tiny-sd15", "0123456789")


def a1111_read(text: str) -> dict[str, str]:
    """What A1111's parse_generation_parameters gets from the last line."""
    res: dict[str, str] = {}
    for key, value in RE_PARAM.findall(text.strip().split("\n")[-1]):
        if value.startswith('"') and value.endswith('"'):
            value = json.loads(value)
        m = RE_SIZE.match(value)
        if m:
            res[f"{key}-1"], res[f"{key}-2"] = m.groups()
        else:
            res[key] = value
    res.setdefault("Schedule type", "Automatic")
    res.setdefault("RNG", "GPU")
    return res


def infotext(req: GenerationRequest, **kw) -> str:
    choice = samplers.resolve(req.sampler_name, req.scheduler)
    return build_infotext(req.prompt, req.negative_prompt, infotext_params(req, choice, 42, 43, MODEL, None, **kw))


def pairs() -> list[tuple[str, str]]:
    names = ["Automatic"] + [samplers.SCHEDULES[k][0] for k in samplers.SUPPORTED_SCHEDULES if k != "automatic"]
    return [(s.name, sched) for s in samplers.SAMPLERS for sched in names]


@pytest.mark.parametrize("sampler,schedule", pairs())
def test_every_sampler_and_schedule_reads_back_the_same_in_a1111_and_muralist(sampler: str, schedule: str) -> None:
    req = GenerationRequest(prompt="a cat, (red:1.2)", negative_prompt="blurry", sampler_name=sampler, scheduler=schedule,
                            steps=23, cfg_scale=6.5, seed=42, subseed=43, subseed_strength=0.25, width=640, height=448,
                            clip_skip=2)
    try:
        choice = samplers.resolve(sampler, schedule)
    except InvalidRequestError:
        pytest.skip(f"{sampler} does not take {schedule} in muralist")
    text = infotext(req)
    got = a1111_read(text)
    assert got["Sampler"] == sampler
    assert (got["Steps"], got["CFG scale"], got["Seed"], got["Size-1"], got["Size-2"]) == ("23", "6.5", "42", "640", "448")
    assert (got["Variation seed"], got["Variation seed strength"], got["Clip skip"]) == ("43", "0.25", "2")
    label = got["Schedule type"]
    assert label in A1111_SCHEDULES
    if sampler in TIMESTEP_SAMPLERS:
        assert label == schedule  # A1111 shows the schedule type that was asked for
    else:
        # The schedule A1111 would run from this infotext is the one muralist ran.
        used = A1111_AUTOMATIC.get(sampler) if label == "Automatic" else label
        assert used == choice.schedule_label or (used is None and choice.schedule == "uniform")

    back = GenerationRequest(**request_fields(parse_infotext(text)))
    pasted = samplers.resolve(back.sampler_name, back.scheduler)
    assert (pasted.sampler, pasted.schedule) == (choice.sampler, choice.schedule)  # the same run
    for name in ("prompt", "negative_prompt", "steps", "cfg_scale", "seed", "subseed", "subseed_strength", "width",
                 "height", "clip_skip"):
        assert getattr(back, name) == getattr(req, name), name


@pytest.mark.parametrize(
    "sampler,schedule,written",
    [
        ("Euler", None, "Schedule type: Automatic"),  # the model's own sigmas: A1111 says Automatic
        ("Euler a", "Automatic", "Schedule type: Automatic"),
        ("DPM++ 2M", None, "Schedule type: Karras"),  # its Automatic is Karras
        ("DPM++ 2M SDE", None, "Schedule type: Exponential"),
        ("Euler", "Karras", "Schedule type: Karras"),
        ("DPM++ 2M Karras", None, "Schedule type: Karras"),  # A1111's old combined name
        ("DDIM", None, "Schedule type: Automatic"),
        ("Euler", "Beta", "Schedule type: Beta, CFG scale: 7.0"),
    ],
)
def test_schedule_type_as_a1111_writes_it(sampler: str, schedule: str | None, written: str) -> None:
    text = infotext(GenerationRequest(prompt="x", sampler_name=sampler, scheduler=schedule))
    assert written in text
    if schedule == "Beta":
        assert a1111_read(text)["Beta schedule alpha"] == a1111_read(text)["Beta schedule beta"] == "0.6"


def test_numbers_are_written_as_python_floats_like_a1111_api() -> None:
    text = infotext(GenerationRequest(prompt="x", cfg_scale=7, subseed_strength=1, subseed=5, steps=20))
    assert "CFG scale: 7.0," in text and "Variation seed strength: 1.0," in text and "Steps: 20," in text


def test_sampler_options_are_written_only_where_a1111_uses_them() -> None:
    def read(**kw) -> dict[str, str]:
        return a1111_read(infotext(GenerationRequest(prompt="x", **kw)))

    euler = read(sampler_name="Euler", s_churn=0.5, s_tmin=0.1, s_tmax=20, s_noise=0.9, eta=0.5)
    assert (euler["Sigma churn"], euler["Sigma tmin"], euler["Sigma tmax"], euler["Sigma noise"]) == ("0.5", "0.1", "20.0", "0.9")
    assert "Eta" not in euler  # sample_euler takes no eta
    # Euler a gets eta but neither churn nor s_noise (not in A1111's sampler_extra_params).
    ancestral = read(sampler_name="Euler a", s_churn=0.5, s_noise=0.9, eta=0.5)
    assert ancestral["Eta"] == "0.5" and not {"Sigma churn", "Sigma noise"} & set(ancestral)
    sde = read(sampler_name="DPM++ 2M SDE", s_noise=0.9, s_churn=0.5)
    assert sde["Sigma noise"] == "0.9" and "Sigma churn" not in sde
    assert "Eta" not in read(sampler_name="DPM++ 2M", eta=0.5)
    assert "Eta" not in read(sampler_name="Euler a", eta=1.0)  # the default is not written
    assert read(sampler_name="DDIM", eta=0.3)["Eta DDIM"] == "0.3"
    assert not {"Sigma churn", "Sigma tmax"} & set(read(sampler_name="Euler", s_churn=0, s_tmax=0))  # 0: defaults
    # ENSD only where the sampler's noise uses it, and not with eta 0.
    assert read(sampler_name="Euler a", eta_noise_seed_delta=31337)["ENSD"] == "31337"
    assert "ENSD" not in read(sampler_name="Euler", eta_noise_seed_delta=31337)
    assert "ENSD" not in read(sampler_name="Euler a", eta=0.0, eta_noise_seed_delta=31337)
    # SGM noise multiplier scales txt2img's first noise on k-diffusion samplers only.
    assert read(sampler_name="Euler", sgm_noise_multiplier=True)["SGM noise multiplier"] == "True"
    assert "SGM noise multiplier" not in read(sampler_name="Euler", sgm_noise_multiplier=True, init_images=["x"])
    assert "SGM noise multiplier" not in read(sampler_name="DDIM", sgm_noise_multiplier=True)


def test_sampler_options_paste_back_into_the_request() -> None:
    req = GenerationRequest(prompt="x", sampler_name="Euler", s_churn=0.5, s_tmin=0.1, s_tmax=20.0, s_noise=0.9,
                            sgm_noise_multiplier=True, eta_noise_seed_delta=0, randn_source="CPU")
    back = GenerationRequest(**request_fields(parse_infotext(infotext(req))))
    for name in ("s_churn", "s_tmin", "s_tmax", "s_noise", "sgm_noise_multiplier", "randn_source"):
        assert getattr(back, name) == getattr(req, name), name
    back = GenerationRequest(**request_fields(parse_infotext(infotext(GenerationRequest(prompt="x", sampler_name="Euler a",
                                                                                        eta=0.5)))))
    assert back.eta == 0.5


def test_a1111_infotext_defaults_when_pasted() -> None:
    text = ("a cat\nNegative prompt: ugly\nSteps: 30, Sampler: DPM++ 2M, CFG scale: 5.5, Seed: 7, Size: 512x768, "
            "Denoising strength: 0.5, Hires upscale: 2.0, Hires upscaler: Latent, Pad conds: True, Emphasis: No norm, "
            "Version: v1.10.1")
    fields = request_fields(parse_infotext(text))
    req = GenerationRequest(**fields)
    assert (req.scheduler, req.randn_source, req.clip_skip) == ("Automatic", "GPU", 1)  # A1111's meaning of "missing"
    assert req.enable_hr and req.hr_scale == 2.0 and req.hr_upscaler == "Latent" and req.denoising_strength == 0.5
    assert req.pad_cond_uncond and req.emphasis == "No norm" and req.cfg_scale == 5.5
    assert samplers.resolve(req.sampler_name, req.scheduler).schedule_label == "Karras"


def test_muralist_version_does_not_trigger_a1111_backcompat() -> None:
    # A1111 applies old-version fixes (old prompt editing timelines, "Pad conds v0" for DDIM, downcast
    # alphas) when packaging parses the Version below 1.6/1.7; muralist's must not parse at all.
    version = a1111_read(infotext(GenerationRequest(prompt="[a:b:3]", sampler_name="DDIM")))["Version"]
    with pytest.raises(packaging.version.InvalidVersion):
        packaging.version.parse(version)


def test_pad_conds_and_emphasis_are_written_only_when_they_happen(engine) -> None:
    model = engine.cache.model(engine.registry.find_checkpoint("tiny-sd15.safetensors"))
    long = ", ".join(f"word{i} thing" for i in range(30))
    req = GenerationRequest(prompt=long, negative_prompt="blurry", pad_cond_uncond=True)
    padded = job_conditioning(PromptEncoder(model), long, "blurry", 20, pad_cond_uncond=True)
    text = infotext(req, conds=[padded])
    assert "Pad conds: True" in text
    assert GenerationRequest(**request_fields(parse_infotext(text))).pad_cond_uncond
    # Off, or on with equal lengths: nothing to note.
    assert "Pad conds" not in infotext(req, conds=[job_conditioning(PromptEncoder(model), long, "blurry", 20)])
    same = job_conditioning(PromptEncoder(model), "a cat", "blurry", 20, pad_cond_uncond=True)
    assert "Pad conds" not in infotext(req, conds=[same])
    nonorm = job_conditioning(PromptEncoder(model, emphasis="No norm"), "a (cat:1.2)", "", 20)
    text = infotext(GenerationRequest(prompt="a (cat:1.2)", emphasis="No norm"), conds=[nonorm])
    assert a1111_read(text)["Emphasis"] == "No norm"
