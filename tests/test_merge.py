"""The checkpoint merger: A1111's formulas tensor by tensor, its metadata, and merges as admin-only jobs."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from muralist.errors import InvalidRequestError, NotFoundError
from muralist.models.family import Family
from muralist.models.merge import MergeOptions, Source, check_params, merge_checkpoints, run_merge
from muralist.models.registry import ModelRegistry
from muralist.models.tiny import save, tiny_checkpoint, tiny_vae
from muralist.paths import DataDirs
from tests.server_util import link_models, running_server

SKIPPED = "cond_stage_model.transformer.text_model.embeddings.position_ids"
CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("merge-inputs")
    # Real SD1 files carry CLIP's position index table; A1111 never merges it.
    ids = torch.arange(77, dtype=torch.int64)[None]
    return {
        "a": save({**tiny_checkpoint(Family.SD1, seed=0), SKIPPED: ids}, d / "a.safetensors"),
        "b": save({**tiny_checkpoint(Family.SD1, seed=7), SKIPPED: ids.flip(1)}, d / "b.ckpt"),  # via the safe loader
        "c": save(tiny_checkpoint(Family.SD1, seed=11), d / "c.safetensors"),
        "inp": save(tiny_checkpoint(Family.SD1, inpainting=True, seed=3), d / "inp.safetensors"),
        "vae": save(tiny_vae(seed=5), d / "vae.safetensors"),
    }


def sd(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path)) if path.suffix == ".safetensors" else torch.load(path, weights_only=True)["state_dict"]


def merge(inputs: dict[str, Path], out: Path, a: str, b: str | None, c: str | None = None, name: str = "out",
          save_as: str = "safetensors", **opts) -> tuple[Path, dict[str, torch.Tensor]]:
    src = {k: Source.from_file(inputs[k]) for k in (a, b, c) if k}
    result = merge_checkpoints(src[a], src.get(b), src.get(c), out, name, MergeOptions(**opts), save_as)
    return result.path, sd(result.path)


def shared(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    keys = [k for k in a if k in b and "model" in k and k != SKIPPED and a[k].is_floating_point()]
    assert len(keys) > 500  # the tiny model's UNet, VAE and text encoder
    return keys


def test_weighted_sum_is_a1111s_formula_and_its_ends_are_a_and_b(inputs, tmp_path: Path) -> None:
    a, b = sd(inputs["a"]), sd(inputs["b"])
    keys = shared(a, b)
    _, m0 = merge(inputs, tmp_path, "a", "b", name="m0", multiplier=0.0)
    _, m1 = merge(inputs, tmp_path, "a", "b", name="m1", multiplier=1.0)
    _, m3 = merge(inputs, tmp_path, "a", "b", name="m3", multiplier=0.3)
    assert set(m0) == set(a) and set(m3) == set(a)
    for k in keys:
        assert torch.equal(m0[k], a[k]), k
        assert torch.equal(m1[k], b[k]), k
        assert torch.equal(m3[k], 0.7 * a[k] + 0.3 * b[k]), k
        assert m3[k].dtype == a[k].dtype
    assert not torch.equal(m3[keys[0]], a[keys[0]])  # the inputs really differ
    assert torch.equal(m3[SKIPPED], a[SKIPPED])  # the index table is never averaged


def test_add_difference_with_b_equal_c_is_a_and_otherwise_a_plus_m_b_minus_c(inputs, tmp_path: Path) -> None:
    a, b, c = sd(inputs["a"]), sd(inputs["b"]), sd(inputs["c"])
    _, same = merge(inputs, tmp_path, "a", "c", "c", name="same", method="add_difference", multiplier=0.8)
    _, diff = merge(inputs, tmp_path, "a", "b", "c", name="diff", method="add_difference", multiplier=0.5)
    for k in shared(a, b):
        assert torch.equal(same[k], a[k]), k
        assert torch.equal(diff[k], a[k] + 0.5 * (b[k] - c[k])), k


def test_no_interpolation_fp16_baked_vae_and_discarded_keys(inputs, tmp_path: Path) -> None:
    a, vae = sd(inputs["a"]), sd(inputs["vae"])
    path, out = merge(inputs, tmp_path, "a", "b", name="half", multiplier=0.5, save_as_half=True,
                      bake_in_vae=inputs["vae"], bake_in_vae_name="vae.safetensors",
                      discard_weights=r"^cond_stage_model\.transformer\.text_model\.final_layer_norm\.")
    assert not [k for k in out if "final_layer_norm" in k] and [k for k in a if "final_layer_norm" in k]
    assert {k for k in a if "final_layer_norm" not in k} == set(out)
    floats = [k for k in out if a[k].is_floating_point()]
    assert floats and all(out[k].dtype == torch.float16 for k in floats)
    assert out[SKIPPED].dtype == a[SKIPPED].dtype  # integers are not "halved"
    for k, v in vae.items():
        assert torch.equal(out["first_stage_model." + k], v.half()), k
    assert sum(not torch.equal(v, a["first_stage_model." + k]) for k, v in vae.items()) > len(vae) // 2
    recipe = json.loads(load_meta(path)["sd_merge_recipe"])
    assert recipe["bake_in_vae"] == "vae.safetensors" and recipe["save_as_half"] is True
    # No interpolation: A alone, every float32 tensor halved, B ignored.
    _, plain = merge(inputs, tmp_path, "a", "b", name="plain", method="no_interpolation", save_as_half=True)
    for k in a:
        assert torch.equal(plain[k], a[k].half() if a[k].dtype == torch.float32 else a[k]), k


def load_meta(path: Path) -> dict[str, str]:
    from muralist.models.files import safetensors_metadata

    return safetensors_metadata(path)


def test_metadata_records_the_recipe_and_accumulates_lineage(inputs, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    tagged = tmp_path / "tagged.safetensors"
    save_file(sd(inputs["c"]), str(tagged), metadata={"modelspec.title": "C's title"})
    ins = {**inputs, "tagged": tagged}
    first, _ = merge(ins, tmp_path, "a", "tagged", name="first", multiplier=0.25, custom_name="first")
    meta = load_meta(first)
    assert meta["format"] == "pt" and meta["modelspec.title"] == "C's title"  # copied from the inputs
    recipe = json.loads(meta["sd_merge_recipe"])
    a, t = Source.from_file(inputs["a"]), Source.from_file(tagged)
    assert recipe == {"type": "webui", "primary_model_hash": a.sha256, "secondary_model_hash": t.sha256,
                      "tertiary_model_hash": None, "interp_method": "Weighted sum", "multiplier": 0.25,
                      "save_as_half": False, "custom_name": "first", "config_source": 0, "bake_in_vae": "None",
                      "discard_weights": "", "is_inpainting": False, "is_instruct_pix2pix": False}
    models = json.loads(meta["sd_merge_models"])
    assert models == {a.sha256: {"name": "a.safetensors", "legacy_hash": a.legacy_hash, "sd_merge_recipe": None},
                      t.sha256: {"name": "tagged.safetensors", "legacy_hash": t.legacy_hash, "sd_merge_recipe": None}}
    # A merge of the merge carries the first recipe as an object and the earlier inputs along.
    second, _ = merge({**ins, "first": first}, tmp_path, "first", "c", "a", name="second", method="add_difference")
    models2 = json.loads(load_meta(second)["sd_merge_models"])
    f = Source.from_file(first)
    assert models2[f.sha256]["sd_merge_recipe"] == recipe
    assert {a.sha256, t.sha256, f.sha256} <= set(models2)
    assert json.loads(load_meta(second)["sd_merge_recipe"])["interp_method"] == "Add difference"


def test_ckpt_output_matches_the_safetensors_one(inputs, tmp_path: Path) -> None:
    st_path, st = merge(inputs, tmp_path, "a", "b", name="x", multiplier=0.4)
    ck_path, ck = merge(inputs, tmp_path, "a", "b", name="x", multiplier=0.4, save_as="ckpt")
    assert ck_path.suffix == ".ckpt" and set(ck) == set(st)
    assert all(torch.equal(ck[k], st[k]) for k in st)
    with pytest.raises(InvalidRequestError, match="already exists"):
        merge(inputs, tmp_path, "a", "b", name="x")


def test_inpainting_a_merges_its_first_four_input_channels_with_a_normal_b(inputs, tmp_path: Path) -> None:
    inp, a = sd(inputs["inp"]), sd(inputs["a"])
    path, out = merge(inputs, tmp_path, "inp", "a", name="mix", multiplier=0.5)
    assert path.name == "mix.inpainting.safetensors"
    assert out[CONV_IN].shape[1] == 9
    assert torch.equal(out[CONV_IN][:, :4], 0.5 * inp[CONV_IN][:, :4] + 0.5 * a[CONV_IN])
    assert torch.equal(out[CONV_IN][:, 4:], inp[CONV_IN][:, 4:])
    assert json.loads(load_meta(path)["sd_merge_recipe"])["is_inpainting"] is True
    with pytest.raises(InvalidRequestError, match="A \\(primary\\) must be the inpainting model"):
        merge(inputs, tmp_path, "a", "inp", name="wrong")


def test_a_merge_that_cannot_fit_on_disk_is_refused_before_writing(inputs, tmp_path: Path, monkeypatch) -> None:
    from collections import namedtuple

    import muralist.models.merge as merge_module

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(merge_module.shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 2**20, 2**20))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(InvalidRequestError, match="not enough disk space for the merge"):
        merge(inputs, out, "a", "b")
    assert list(out.iterdir()) == []  # nothing written, not even a temporary file
    monkeypatch.undo()
    assert merge(inputs, out, "a", "b")[0].is_file()


def test_the_sha256_written_is_the_files(inputs, tmp_path: Path) -> None:
    from muralist.models.hashing import sha256_file

    src = Source.from_file(inputs["a"])
    result = merge_checkpoints(src, Source.from_file(inputs["b"]), None, tmp_path, "h", MergeOptions())
    assert result.sha256 == sha256_file(result.path)


def test_requests_are_checked_with_clear_errors(a1111_models: Path, tmp_path: Path) -> None:
    root = link_models(a1111_models, tmp_path / "data", ("tiny-sd15.safetensors", "tiny-sd15-b.ckpt",
                                                         "tiny-sd15-inpainting.safetensors", "tiny-sdxl.safetensors"))
    reg = ModelRegistry(DataDirs.from_options(root))
    ok = {"primary": "tiny-sd15", "secondary": "tiny-sd15-b", "multiplier": 0.3}
    with pytest.raises(NotFoundError, match=r"secondary: unknown model 'tiny-sd15-bx'; did you mean: tiny-sd15-b"):
        check_params(reg, {**ok, "secondary": "tiny-sd15-bx"})
    with pytest.raises(InvalidRequestError, match="method: unknown merge method 'average'; choose one of weighted_sum"):
        check_params(reg, {**ok, "method": "average"})
    with pytest.raises(InvalidRequestError, match="tertiary: add_difference needs a tertiary model C"):
        check_params(reg, {**ok, "method": "add_difference"})
    with pytest.raises(InvalidRequestError, match="secondary: .* is SDXL but the primary is SD1"):
        check_params(reg, {**ok, "secondary": "tiny-sdxl"})
    with pytest.raises(InvalidRequestError, match="A \\(primary\\) must be the inpainting model"):
        check_params(reg, {**ok, "secondary": "tiny-sd15-inpainting"})
    for bad in ("../evil", "sub/evil", "..\\evil", ".hidden", "a\x00b"):
        with pytest.raises(InvalidRequestError, match="not a plain file name"):
            check_params(reg, {**ok, "name": bad})
    with pytest.raises(InvalidRequestError, match="discard_weights: not a valid regular expression"):
        check_params(reg, {**ok, "discard_weights": "("})
    with pytest.raises(InvalidRequestError, match="already exists"):
        check_params(reg, {**ok, "name": "tiny-sd15"})
    with pytest.raises(InvalidRequestError, match="mulitplier: unknown merge parameter"):
        check_params(reg, {**ok, "mulitplier": 0.5})
    stored = check_params(reg, {**ok, "method": "Weighted sum", "tertiary": "ignored"})
    assert stored["primary"].startswith("tiny-sd15.safetensors [") and stored["method"] == "weighted_sum"
    assert stored["name"] == "0.7(tiny-sd15) + 0.3(tiny-sd15-b)" and stored["tertiary"] is None  # A1111's name
    result, info = run_merge(reg, stored)
    assert info.title in [c.title for c in reg.checkpoints()] and info.sha256 == result.sha256
    assert not list(reg.dirs.ckpt_dir.glob(".*tmp"))


# ----------------------------------------------------------------- as a job


@pytest.fixture()
def server(a1111_models: Path, tmp_path: Path):
    import httpx

    root = link_models(a1111_models, tmp_path / "data")
    (root / "models" / "VAE").mkdir(parents=True)
    save(tiny_vae(seed=5), root / "models" / "VAE" / "other-vae.safetensors")
    with running_server(root) as (url, service):
        keys = {"alice": service.store.add_user("alice"), "root": service.store.add_user("root", admin=True)}
        yield url, service, {n: httpx.Client(base_url=url, headers={"Authorization": f"Bearer {k}"}, timeout=120)
                             for n, k in keys.items()}


def _wait(client, job_id: str, timeout: float = 120) -> dict:
    end = time.time() + timeout
    while time.time() < end:
        job = client.get(f"/api/v1/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "canceled"):
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not finish")


def test_admins_merge_as_a_job_and_everyone_generates_with_it_at_once(server) -> None:
    url, service, c = server
    params = {"primary": "tiny-sd15", "secondary": "tiny-sd15-b", "method": "weighted_sum", "multiplier": 0.5,
              "save_as_half": True, "bake_in_vae": "other-vae", "discard_weights": "", "name": "team-mix"}
    r = c["alice"].post("/api/v1/jobs", json={"type": "merge", "params": params})
    assert r.status_code == 403 and "only admins can merge" in r.json()["detail"], r.text
    for bad, status, words in (({"secondary": "tiny-sd15-c"}, 422, "did you mean"), ({"method": "blend"}, 422, "weighted_sum"),
                               ({"method": "add_difference"}, 422, "tertiary"), ({"name": "../../x"}, 422, "plain file name"),
                               ({"bake_in_vae": "nope"}, 422, "bake_in_vae: unknown VAE")):
        r = c["root"].post("/api/v1/jobs", json={"type": "merge", "params": {**params, **bad}})
        assert r.status_code == status and words in r.json()["detail"], (bad, r.text)
    events: list[dict] = []
    publish = service.publish
    service.publish = lambda ev, relay=True: (events.append(ev), publish(ev, relay))[1]
    r = c["root"].post("/api/v1/jobs", json={"type": "merge", "params": params})
    assert r.status_code == 202, r.text
    job = _wait(c["root"], r.json()["id"])
    assert job["status"] == "succeeded", job
    title = job["result"]["model"]
    assert title.startswith("team-mix.safetensors [") and job["result"]["keys"] > 500
    progress = [e for e in events if e["type"] == "progress" and e["job_id"] == job["id"]]
    assert progress and progress[-1]["step"] == progress[-1]["steps"] == job["result"]["keys"]
    out = load_file(str(service.dirs.ckpt_dir / "team-mix.safetensors"))
    assert out[CONV_IN].dtype == torch.float16
    # Listed and usable by a non-admin right away, with the merged weights.
    assert title in [m["title"] for m in c["alice"].get("/sdapi/v1/sd-models").json()]
    body = {"prompt": "a cat", "steps": 3, "width": 64, "height": 64, "seed": 1,
            "override_settings": {"sd_model_checkpoint": title}}
    r = c["alice"].post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert "Model: team-mix" in info["infotexts"][0] and r.json()["images"]
    plain = c["alice"].post("/sdapi/v1/txt2img", json={**body, "override_settings": {"sd_model_checkpoint": "tiny-sd15"}})
    assert plain.json()["images"][0] != r.json()["images"][0]
