"""ControlNet as sd-webui-controlnet speaks it, on tiny random ControlNets in the real file layouts."""

from __future__ import annotations

import base64
import io
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from muralist.controlnet import preprocess
from muralist.controlnet.apply import parse_infotext_units
from muralist.errors import InvalidRequestError
from muralist.infotext import parse_infotext
from muralist.request import GenerationRequest
from tests.conftest import pixels
from tests.server_util import link_models, running_server


def b64(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def shape_image(kind: str = "circle", size: int = 64) -> Image.Image:
    img = Image.new("RGB", (size, size), "black")
    draw = ImageDraw.Draw(img)
    if kind == "circle":
        draw.ellipse((size // 6, size // 6, size * 5 // 6, size * 5 // 6), fill="white")
    else:
        draw.rectangle((size // 8, size // 3, size * 7 // 8, size * 2 // 3), fill=(200, 80, 30))
    return img


BASE = dict(prompt="a house", width=64, height=64, steps=6, seed=5, model="tiny-sd15.safetensors")


def run(engine, tmp_path: Path, **kw):
    return engine.generate(GenerationRequest(**{**BASE, **kw}), save_to=tmp_path)


def unit(**kw) -> dict:
    return {"enabled": True, "module": "canny", "model": "tiny-control-sd15", "image": b64(shape_image()), **kw}


# ----------------------------------------------------------------- model files


def test_original_layout_matches_diffusers_own_converter(engine) -> None:
    """Our LDM names for a ControlNet are the ones diffusers' single-file converter reads."""
    from diffusers import ControlNetModel
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    from muralist.controlnet.models import controlnet_config, export_ldm
    from muralist.models.family import Family
    from muralist.models.tiny import tiny_components

    unet = tiny_components(Family.SD1)["unet"]
    model = ControlNetModel(**controlnet_config(unet.config, {}))
    ldm = export_ldm(model)
    assert all(k.startswith("control_model.") for k in ldm) and "control_model.input_hint_block.14.weight" in ldm
    converted = convert_controlnet_checkpoint(ldm, dict(model.config))
    assert set(converted) == set(model.state_dict())


@pytest.mark.parametrize("name", ["tiny-control-sd15 [8257ec4c]", "tiny-control-sd15-b", "tiny-control-sdxl"])
def test_every_layout_loads_to_the_same_network(engine, name: str) -> None:
    from muralist.controlnet.models import load_controlnet
    from muralist.models.family import Family
    from muralist.models.tiny import TINY_CONTROLNETS, tiny_controlnet

    info = engine.controlnets.find(name)
    family, seed = TINY_CONTROLNETS[info.path.name]
    base = engine.cache.model(engine.registry.find_checkpoint("tiny-sdxl" if family is Family.SDXL else "tiny-sd15"))
    model = load_controlnet(info.path, base.unet.config, family.value.upper(), torch.device("cpu"), torch.float32)
    sd = tiny_controlnet(family, seed)
    if family is Family.SDXL:  # diffusers layout: the very tensors
        got = model.state_dict()
        assert all(torch.equal(got[k], sd[k]) for k in sd)
    else:
        from muralist.controlnet.models import export_ldm

        back = export_ldm(model)
        assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)


def test_model_list_names_are_a1111_titles(engine) -> None:
    titles = [i.title for i in engine.controlnets.list()]
    assert titles[0].startswith("tiny-control-sd15 [") and all(t.endswith("]") and len(t.split("[")[1]) == 9 for t in titles)
    with pytest.raises(InvalidRequestError, match="close names: tiny-control-sd15"):
        engine.controlnets.find("tiny-control-sd1")


# ----------------------------------------------------------------- generation


def test_weight_zero_is_no_unit_and_weight_one_changes_the_image(engine, tmp_path: Path) -> None:
    plain = pixels(run(engine, tmp_path).result.images[0])
    zero = pixels(run(engine, tmp_path, controlnet=[unit(weight=0.0)]).result.images[0])
    one = run(engine, tmp_path, controlnet=[unit()])
    assert np.array_equal(plain, zero)
    assert np.abs(pixels(one.result.images[0]) - plain).mean() > 0.5
    # A1111's step counter never reaches 1: a unit starting there never acts.
    late = pixels(run(engine, tmp_path, controlnet=[unit(guidance_start=1.0)]).result.images[0])
    assert np.array_equal(plain, late)
    # ... and one ending at 0 still guides the first two steps, as in the extension.
    early = pixels(run(engine, tmp_path, controlnet=[unit(guidance_end=0.0)]).result.images[0])
    assert not np.array_equal(plain, early)


def test_the_control_image_and_the_mode_steer_the_result(engine, tmp_path: Path) -> None:
    circle = pixels(run(engine, tmp_path, controlnet=[unit()]).result.images[0])
    bar = pixels(run(engine, tmp_path, controlnet=[unit(image=b64(shape_image("bar")))]).result.images[0])
    assert np.abs(circle - bar).mean() > 0.5
    again = pixels(run(engine, tmp_path, controlnet=[unit()]).result.images[0])
    assert np.array_equal(circle, again)  # same request, same pixels
    modes = [pixels(run(engine, tmp_path, controlnet=[unit(control_mode=m)]).result.images[0])
             for m in ("My prompt is more important", "ControlNet is more important")]
    assert not np.array_equal(modes[0], circle) and not np.array_equal(modes[1], circle) and not np.array_equal(*modes)


def test_two_units_add_up_and_sdxl_takes_its_own_layout(engine, tmp_path: Path) -> None:
    one = pixels(run(engine, tmp_path, controlnet=[unit()]).result.images[0])
    two = pixels(run(engine, tmp_path, controlnet=[unit(), unit(model="tiny-control-sd15-b", module="invert")]).result.images[0])
    assert not np.array_equal(one, two)
    plain = pixels(run(engine, tmp_path, model="tiny-sdxl.safetensors").result.images[0])
    xl = run(engine, tmp_path, model="tiny-sdxl.safetensors", controlnet=[unit(model="tiny-control-sdxl")])
    assert np.abs(pixels(xl.result.images[0]) - plain).mean() > 0.5
    with pytest.raises(InvalidRequestError, match="choose a ControlNet made for SDXL"):
        run(engine, tmp_path, model="tiny-sdxl.safetensors", controlnet=[unit()])


def test_img2img_unit_without_image_takes_the_init_image(engine, tmp_path: Path) -> None:
    init = b64(shape_image("bar"))
    common = dict(init_images=[init], denoising_strength=0.6)
    implicit = run(engine, tmp_path, **common, controlnet=[unit(image=None)])
    explicit = run(engine, tmp_path, **common, controlnet=[unit(image=init, resize_mode="Just Resize")])
    assert np.array_equal(pixels(implicit.result.images[0]), pixels(explicit.result.images[0]))
    with pytest.raises(InvalidRequestError, match="no image given"):
        engine.check_controlnet(GenerationRequest(**BASE, controlnet=[unit(image=None)]))


def test_hires_fix_uses_the_unit_and_returns_both_maps(engine, tmp_path: Path) -> None:
    saved = run(engine, tmp_path, enable_hr=True, hr_scale=1.5, denoising_strength=0.5, controlnet=[unit()])
    sizes = [Image.open(p).size for p in saved.detected]
    assert sizes == [(96, 96), (64, 64)]  # the extension's order: hires map first
    low_only = run(engine, tmp_path, enable_hr=True, hr_scale=1.5, denoising_strength=0.5,
                   controlnet=[unit(hr_option="Low res only", save_detected_map=False)])
    assert low_only.detected == [] and not np.array_equal(pixels(low_only.result.images[0]), pixels(saved.result.images[0]))


def test_infotext_names_each_unit_and_reads_back(engine, tmp_path: Path) -> None:
    u = unit(weight=0.8, guidance_end=0.9, control_mode=1, resize_mode=2)
    text = run(engine, tmp_path, controlnet=[u]).result.infotexts[0]
    fields = parse_infotext(text)
    assert fields["ControlNet 0"].startswith("Module: canny, Model: tiny-control-sd15 [8257ec4c], Weight: 0.8, Resize Mode: Resize and Fill")
    assert '"Module: canny' in text  # quoted, as A1111 writes values holding ", "
    back = parse_infotext_units(fields)[0]
    assert back["model"] == "tiny-control-sd15 [8257ec4c]" and back["weight"] == 0.8 and back["control_mode"] == "My prompt is more important"
    first = run(engine, tmp_path, controlnet=[u])
    again = run(engine, tmp_path, controlnet=[{**back, "image": u["image"]}])
    assert np.array_equal(pixels(again.result.images[0]), pixels(first.result.images[0]))
    # Sent thresholds are floats ("100.0"); the slider defaults used for -1 are ints ("100"), as in the extension.
    assert parse_infotext_units(parse_infotext(again.result.infotexts[0]))[0] == back


# ----------------------------------------------------------------- preprocessors


def test_canny_threshold_invert_match_opencv() -> None:
    import cv2

    rng = np.random.default_rng(0)
    img = (rng.random((512, 512, 3)) * 255).astype(np.uint8)
    img[100:300, 150:400] = (240, 30, 30)
    assert np.array_equal(preprocess.run(preprocess.find("canny"), img, 512, 100, 200),
                          np.stack([cv2.Canny(img, 100, 200)] * 3, axis=2))
    expect = np.where(img.min(axis=2) > 127, 255, 0).astype(np.uint8)
    assert np.array_equal(preprocess.run(preprocess.find("threshold"), img, 512, 127, 0), np.stack([expect] * 3, axis=2))
    assert np.array_equal(preprocess.run(preprocess.find("invert (from white bg & black line)"), img, 512, 0, 0), 255 - img)
    # shortest side to processor_res, aspect kept
    small = preprocess.run(preprocess.find("canny"), img[:, :256], 256, 100, 200)
    assert small.shape == (512, 256, 3)


@pytest.mark.parametrize("name", ["scribble_xdog", "blur_gaussian", "tile_resample", "tile_colorfix", "color",
                                  "recolor_luminance", "recolor_intensity", "lineart_standard", "shuffle", "none"])
def test_every_weightless_preprocessor_makes_an_rgb_map(name: str) -> None:
    img = np.asarray(shape_image("bar", 128))
    pre = preprocess.find(name)
    res, a, b = pre.bounded(-1, -1, -1)
    out = preprocess.run(pre, img, int(res if res > 1 else 512), a, b, seed=3)
    assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3


def test_pixel_perfect_sets_the_processor_resolution_from_the_generation_size() -> None:
    from muralist.controlnet.apply import Control

    assert preprocess.pixel_perfect_resolution(128, 256, 64, 64, "Crop and Resize") == 64  # max(64/128, 64/256) * 128
    assert preprocess.pixel_perfect_resolution(128, 256, 64, 64, "Resize and Fill") == 32  # min(...) * 128
    src = np.asarray(shape_image("bar", 128))
    for perfect, side in ((False, 512), (True, 64)):
        u = GenerationRequest(controlnet=[unit(pixel_perfect=perfect)]).controlnet[0]
        c = Control(u, None, src, preprocess.find("canny"))
        c.prepare(1, 1, 64, 64, None, 0)
        assert c.detected.shape[:2] == (side, side)
        assert "Processor Res: 512" in c.infotext  # the extension writes the value before pixel perfect


def test_weighted_preprocessor_says_which_file_is_missing() -> None:
    with pytest.raises(InvalidRequestError, match="openpose/body_pose_model.pth"):
        preprocess.run(preprocess.find("openpose"), np.zeros((8, 8, 3), np.uint8), 512, 0, 0)
    with pytest.raises(InvalidRequestError, match="not found; close names: canny"):
        preprocess.find("cany")


# ----------------------------------------------------------------- A1111 API


@pytest.fixture()
def server(a1111_models: Path, tmp_path: Path):
    import httpx

    root = link_models(a1111_models, tmp_path / "data", ("tiny-sd15.safetensors", "tiny-sdxl.safetensors"), controlnet=True)
    with running_server(root) as (url, service):
        keys = {n: service.store.add_user(n) for n in ("alice", "bob")}
        yield url, service, {n: httpx.Client(base_url=url, headers={"Authorization": f"Bearer {k}"}, timeout=120)
                             for n, k in keys.items()}


A1111 = {"prompt": "a house", "seed": 5, "steps": 6, "width": 64, "height": 64, "sampler_name": "Euler"}


def test_old_client_payload_through_sdapi(server) -> None:
    """input_image, an int control_mode and no "enabled": the unit runs, and its map follows the image."""
    _, _, c = server
    old = {"input_image": b64(shape_image()), "module": "canny", "model": "tiny-control-sd15", "control_mode": 0,
           "resize_mode": 1, "lowvram": False, "guidance": 1.0}
    r = c["alice"].post("/sdapi/v1/txt2img", json={**A1111, "alwayson_scripts": {"ControlNet": {"args": [old]}}})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["images"]) == 2
    first = base64.b64decode(body["images"][0])
    assert "ControlNet 0" in parse_infotext(__import__("muralist.infotext", fromlist=["x"]).read_infotext(first))
    detected = Image.open(io.BytesIO(base64.b64decode(body["images"][1])))
    assert detected.size == (64, 64) and set(np.unique(np.asarray(detected))) <= {0, 255}
    assert json.loads(body["info"])["all_seeds"] == [5]  # info covers the generated images only
    plain = c["alice"].post("/sdapi/v1/txt2img", json=A1111).json()["images"][0]
    assert plain != body["images"][0]
    quiet = {**old, "save_detected_map": False}
    r = c["alice"].post("/sdapi/v1/txt2img", json={**A1111, "alwayson_scripts": {"controlnet": {"args": [quiet]}}})
    assert len(r.json()["images"]) == 1 and r.json()["images"][0] == body["images"][0]
    # a unit without a model (the UI's empty slots) is off
    off = {"enabled": True, "model": "None", "module": "none"}
    r = c["alice"].post("/sdapi/v1/txt2img", json={**A1111, "alwayson_scripts": {"controlnet": {"args": [off, off]}}})
    assert r.json()["images"] == [plain]


def test_units_are_per_job_across_users(server) -> None:
    """Interleaved jobs of two users on one worker: each gets exactly what it would get alone."""
    _, _, c = server
    mine = {**A1111, "alwayson_scripts": {"controlnet": {"args": [unit()]}}}
    alone_alice = c["alice"].post("/sdapi/v1/txt2img", json=mine).json()["images"][0]
    alone_bob = c["bob"].post("/sdapi/v1/txt2img", json=A1111).json()["images"][0]
    results: dict[str, list[str]] = {"alice": [], "bob": []}

    def go(name: str, body: dict) -> None:
        for _ in range(3):
            results[name].append(c[name].post("/sdapi/v1/txt2img", json=body).json()["images"][0])

    threads = [threading.Thread(target=go, args=("alice", mine)), threading.Thread(target=go, args=("bob", A1111))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results["alice"] == [alone_alice] * 3 and results["bob"] == [alone_bob] * 3


def test_controlnet_routes_have_the_extension_shapes(server) -> None:
    _, _, c = server
    cl = c["alice"]
    assert cl.get("/controlnet/version").json() == {"version": 3}
    models = cl.get("/controlnet/model_list").json()["model_list"]
    assert any(m.startswith("tiny-control-sd15 [") for m in models)
    mods = cl.get("/controlnet/module_list").json()
    assert mods["module_list"][0] == "none" and "canny" in mods["module_list"]
    assert mods["module_detail"]["canny"]["sliders"][1] == {"name": "Low Threshold", "value": 100, "min": 1, "max": 255, "step": 1}
    assert "invert (from white bg & black line)" in cl.get("/controlnet/module_list?alias_names=true").json()["module_list"]
    types = cl.get("/controlnet/control_types").json()["control_types"]
    assert types["Canny"]["default_option"] == "canny" and types["All"]["default_model"] == "None"
    assert cl.get("/controlnet/settings").json() == {"control_net_unit_count": 3}
    img = np.asarray(shape_image("bar", 512))
    r = cl.post("/controlnet/detect", json={"controlnet_module": "canny", "controlnet_input_images": [b64(Image.fromarray(img))]})
    assert r.status_code == 200 and r.json()["info"] == "Success"
    import cv2

    got = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))))
    assert np.array_equal(got[:, :, 0], cv2.Canny(img, 100, 200))
    mask = Image.new("L", (512, 512), 0)
    ImageDraw.Draw(mask).rectangle((0, 0, 255, 511), fill=255)
    r = cl.post("/controlnet/detect", json={"controlnet_module": "inpaint_only", "controlnet_input_images": [b64(Image.fromarray(img))],
                                            "controlnet_masks": [b64(mask)]})
    rgba = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))))
    assert rgba.shape[2] == 4 and rgba[10, 10, 3] == 128 and rgba[10, 500, 3] == 255  # alpha = 255 - mask / 2
    for body, word in (({"controlnet_module": "inpaint", "controlnet_input_images": [b64(shape_image())]}, "controlnet_masks"),
                       ({"controlnet_module": "nope", "controlnet_input_images": ["x"]}, "Module not available"),
                       ({"controlnet_module": "canny"}, "No image selected"),
                       ({"controlnet_module": "openpose", "controlnet_input_images": [b64(shape_image())]}, "annotator")):
        r = cl.post("/controlnet/detect", json=body)
        assert r.status_code == 422 and word in r.json()["detail"], r.text


def test_bad_units_are_422_before_queueing(server) -> None:
    _, service, c = server
    cases = [({"model": "tiny-control-sd1"}, "close names: tiny-control-sd15"), ({"module": "cany"}, "close names: canny"),
             ({"image": "%%%"}, "image"), ({"control_mode": 7}, "control_mode"), ({"weight": 5}, "weight"),
             ({"guidance_start": 0.8, "guidance_end": 0.2}, "guidance_start")]
    for change, word in cases:
        r = c["alice"].post("/sdapi/v1/txt2img", json={**A1111, "alwayson_scripts": {"controlnet": {"args": [unit(**change)]}}})
        assert r.status_code == 422 and word in r.json()["detail"], (change, r.text)
    assert service.store.list_jobs("alice") == []
    # wrong family: found when the worker loads it, still a 422 naming both families
    xl = {**A1111, "sd_model_checkpoint": None, "override_settings": {"sd_model_checkpoint": "tiny-sdxl"},
          "alwayson_scripts": {"controlnet": {"args": [unit()]}}}
    r = c["alice"].post("/sdapi/v1/txt2img", json=xl)
    assert r.status_code == 422 and "SDXL" in r.json()["detail"], r.text


def test_native_jobs_take_the_same_units(server) -> None:
    url, service, c = server
    r = c["bob"].post("/api/v1/jobs", json={"type": "txt2img", "params": {**BASE, "controlnet": [unit()]}})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    import time

    for _ in range(600):
        job = c["bob"].get(f"/api/v1/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed"):
            break
        time.sleep(0.1)
    assert job["status"] == "succeeded", job
    assert len(job["result"]["images"]) == 2 and job["result"]["detected_maps"] == 1
    assert not list((service.dirs.root / "inputs").rglob("*.b64"))  # the unit's image file went with the job


def test_xyz_plot_over_controlnet_weight_and_model(engine, tmp_path: Path) -> None:
    from muralist.scripts.grids import XYZSpec, plan_xyz, run_xyz

    base = GenerationRequest(**BASE, controlnet=[unit()])
    res = run_xyz(engine, base, XYZSpec("[ControlNet] Weight", "0, 1"), save_to=tmp_path)
    plain = pixels(run(engine, tmp_path).result.images[0])
    full = pixels(run(engine, tmp_path, controlnet=[unit()]).result.images[0])
    assert np.array_equal(pixels(res.images[0]), plain) and np.array_equal(pixels(res.images[1]), full)
    plan = plan_xyz(engine, base, XYZSpec("[ControlNet] Model", "tiny-control-sd15, tiny-control-sd15-b", "[ControlNet] Guidance End", "0.5, 1"))
    assert len(plan.order) == 4
    with pytest.raises(InvalidRequestError, match="tiny-control-sd1"):
        plan_xyz(engine, base, XYZSpec("[ControlNet] Model", "tiny-control-sd1"))
    with pytest.raises(InvalidRequestError, match="enabled ControlNet unit"):
        plan_xyz(engine, GenerationRequest(**BASE), XYZSpec("[ControlNet] Weight", "0.5"))


def test_inpaint_unit_takes_the_img2img_mask(engine, tmp_path: Path) -> None:
    """The inpaint ControlNet sees the image with the masked area at -1; its map's alpha marks it."""
    init = shape_image("bar")
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle((20, 20, 44, 44), fill=255)
    common = dict(init_images=[b64(init)], mask=b64(mask), denoising_strength=0.8, mask_blur=0, inpaint_full_res=False)
    plain = run(engine, tmp_path, **common)
    guided = run(engine, tmp_path, **common, controlnet=[unit(image=None, module="inpaint_only")])
    assert not np.array_equal(pixels(plain.result.images[0]), pixels(guided.result.images[0]))
    detected = np.asarray(Image.open(guided.detected[0]))
    assert detected.shape == (64, 64, 4) and detected[32, 32, 3] == 128 and detected[2, 2, 3] == 255
    from muralist.controlnet.apply import Control

    c = Control(GenerationRequest(controlnet=[unit(module="inpaint")]).controlnet[0], None, np.asarray(init),
                preprocess.find("inpaint"), np.asarray(mask))
    c.prepare(1, 1, 64, 64, None, 0)
    c.set_size(64, 64, torch.device("cpu"), torch.float32)
    assert torch.all(c.hint[0, :, 32, 32] == -1) and torch.allclose(c.hint[0, :, 2, 2], torch.zeros(3))
