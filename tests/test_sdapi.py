"""A1111's /sdapi/v1 on the queue: A1111 request/response shapes, with per-user scope."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from pathlib import Path

import httpx
import pytest

from muralist.infotext import parse_infotext, read_infotext
from tests.server_util import link_models, running_server

A1111_BODY = {
    "prompt": "a lighthouse, stormy sea",
    "negative_prompt": "blurry",
    "seed": 42,
    "steps": 3,
    "width": 64,
    "height": 64,
    "sampler_index": "Euler a",
    "firstphase_width": 0,  # legacy field that clients still send
    "do_not_save_grid": True,
    "alwayson_scripts": {},
}


@pytest.fixture()
def server(a1111_models: Path, tmp_path: Path):
    root = link_models(a1111_models, tmp_path / "data")
    with running_server(root) as (url, service):
        keys = {n: service.store.add_user(n) for n in ("alice", "bob")}
        yield url, service, {n: httpx.Client(base_url=url, headers={"Authorization": f"Bearer {k}"}, timeout=120) for n, k in keys.items()}


def test_txt2img_response_has_a1111_shape(server) -> None:
    _, _, c = server
    r = c["alice"].post("/sdapi/v1/txt2img", json=A1111_BODY)
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"images", "parameters", "info"}
    assert not body["images"][0].startswith("data:")
    png = base64.b64decode(body["images"][0])
    params = parse_infotext(read_infotext(png))
    assert params["Sampler"] == "Euler a" and params["Seed"] == "42"
    info = json.loads(body["info"])
    for key in ("prompt", "all_prompts", "negative_prompt", "all_negative_prompts", "seed", "all_seeds", "subseed", "all_subseeds",
                "subseed_strength", "width", "height", "sampler_name", "cfg_scale", "steps", "batch_size", "restore_faces",
                "sd_model_name", "sd_model_hash", "sd_vae_name", "sd_vae_hash", "seed_resize_from_w", "seed_resize_from_h",
                "denoising_strength", "extra_generation_params", "index_of_first_image", "infotexts", "styles",
                "job_timestamp", "clip_skip", "is_using_inpainting_conditioning", "version"):
        assert key in info, key
    assert info["all_seeds"] == [42] and isinstance(info["job_timestamp"], str)
    assert body["parameters"]["prompt"] == A1111_BODY["prompt"]


def test_options_are_per_user_and_override_settings_per_job(server) -> None:
    _, _, c = server
    models = [m["title"] for m in c["alice"].get("/sdapi/v1/sd-models").json()]
    default = c["bob"].get("/sdapi/v1/options").json()["sd_model_checkpoint"]
    other = next(t for t in models if t != default)
    assert c["alice"].post("/sdapi/v1/options", json={"sd_model_checkpoint": other.split(" [")[0]}).json() == {}
    assert c["alice"].get("/sdapi/v1/options").json()["sd_model_checkpoint"] == other
    assert c["bob"].get("/sdapi/v1/options").json()["sd_model_checkpoint"] == default  # bob's default is unchanged
    name = {t: t.split(" [")[0].rsplit(".", 1)[0] for t in models}

    def model_of(client: httpx.Client, body: dict) -> str:
        info = json.loads(client.post("/sdapi/v1/txt2img", json=body).json()["info"])
        return info["sd_model_name"]

    assert model_of(c["alice"], A1111_BODY) == name[other]
    assert model_of(c["bob"], A1111_BODY) == name[default]
    over = {**A1111_BODY, "override_settings": {"sd_model_checkpoint": default}}
    assert model_of(c["alice"], over) == name[default]
    assert c["alice"].get("/sdapi/v1/options").json()["sd_model_checkpoint"] == other  # not changed by the override


def test_progress_is_fast_and_scoped_to_the_caller(server) -> None:
    _, service, c = server
    done = threading.Event()

    def long_job() -> None:
        c["alice"].post("/sdapi/v1/txt2img", json={**A1111_BODY, "steps": 60, "force_task_id": "task(alice-1)"})
        done.set()

    t = threading.Thread(target=long_job)
    t.start()
    deadline = time.monotonic() + 60
    while not service.live and time.monotonic() < deadline:
        time.sleep(0.02)
    times = []
    for _ in range(20):
        t0 = time.perf_counter()
        p = c["alice"].get("/sdapi/v1/progress").json()
        times.append(time.perf_counter() - t0)
    assert set(p) >= {"progress", "eta_relative", "state", "current_image", "textinfo"}
    assert p["state"]["job"] == "task(alice-1)"
    assert sorted(times)[len(times) // 2] < 0.1
    bob = c["bob"].get("/sdapi/v1/progress").json()
    assert bob["state"]["job"] == "" and bob["progress"] == 0.0  # bob sees nothing of alice's job
    ip = c["alice"].post("/internal/progress", json={"id_task": "task(alice-1)", "id_live_preview": -1}).json()
    assert ip["active"] is True
    assert c["bob"].post("/internal/progress", json={"id_task": "task(alice-1)"}).json()["active"] is False
    # bob's interrupt does not touch alice's job
    assert c["bob"].post("/sdapi/v1/interrupt").json() == {}
    t.join(120)
    job = service.store.get("task(alice-1)")
    assert job.status.value == "succeeded"


def test_interrupt_stops_my_own_job(server) -> None:
    _, service, c = server
    result = {}

    def run() -> None:
        result["r"] = c["alice"].post("/sdapi/v1/txt2img", json={**A1111_BODY, "steps": 150, "width": 128, "height": 128, "force_task_id": "a2"})

    t = threading.Thread(target=run)
    t.start()
    deadline = time.monotonic() + 60
    while "a2" not in service.live and time.monotonic() < deadline:
        time.sleep(0.02)
    while service.live["a2"].step < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    c["alice"].post("/sdapi/v1/interrupt")
    t.join(120)
    # As A1111: the unfinished image comes back (clients index images[0]), with its real seed and
    # model, and is saved; the job is done, not canceled.
    r = result["r"]
    assert r.status_code == 200 and len(r.json()["images"]) == 1
    info = json.loads(r.json()["info"])
    assert info["seed"] == A1111_BODY["seed"] and info["sd_model_name"] and "interrupted" in " ".join(info["warnings"])
    job = service.store.get("a2")
    assert job.status.value == "succeeded" and len(service.store.list_images("alice")) == 1
    png = base64.b64decode(r.json()["images"][0])
    assert parse_infotext(read_infotext(png))["Seed"] == str(A1111_BODY["seed"])


def test_skip_keeps_the_unfinished_batch_and_goes_on(server) -> None:
    _, service, c = server
    result = {}

    def run() -> None:
        body = {**A1111_BODY, "steps": 150, "n_iter": 2, "force_task_id": "s1"}
        result["r"] = c["alice"].post("/sdapi/v1/txt2img", json=body)

    t = threading.Thread(target=run)
    t.start()
    deadline = time.monotonic() + 60
    while ("s1" not in service.live or service.live["s1"].step < 2) and time.monotonic() < deadline:
        time.sleep(0.02)
    c["alice"].post("/sdapi/v1/skip")
    t.join(180)
    info = json.loads(result["r"].json()["info"])
    assert len(result["r"].json()["images"]) == 2 and info["all_seeds"] == [42, 43]
    assert any("batch 1 of 2 was skipped" in w for w in info["warnings"])


def test_list_routes_have_a1111_shapes(server) -> None:
    _, _, c = server
    a = c["alice"]
    s = a.get("/sdapi/v1/samplers").json()
    assert {"name", "aliases", "options"} <= set(s[0]) and "Euler a" in [x["name"] for x in s]
    sch = a.get("/sdapi/v1/schedulers").json()
    assert {"name", "label", "aliases", "default_rho", "need_inner_model"} <= set(sch[0])
    m = a.get("/sdapi/v1/sd-models").json()
    assert {"title", "model_name", "hash", "sha256", "filename", "config"} <= set(m[0])
    for path in ("sd-vae", "loras", "prompt-styles", "upscalers", "latent-upscale-modes", "face-restorers", "realesrgan-models",
                 "hypernetworks", "scripts", "script-info", "extensions", "cmd-flags", "memory", "embeddings"):
        assert a.get(f"/sdapi/v1/{path}").status_code == 200, path
    for path in ("refresh-checkpoints", "refresh-vae", "refresh-loras", "refresh-embeddings", "skip", "interrupt"):
        r = a.post(f"/sdapi/v1/{path}")
        assert r.status_code == 200 and r.json() == {}, path
    assert a.get("/sdapi/v1/txt2img").status_code == 405
    assert a.get("/sdapi/v1/interrupt").status_code == 405


def test_png_info_reads_our_images_and_explains_plain_ones(server) -> None:
    _, _, c = server
    img = c["alice"].post("/sdapi/v1/txt2img", json=A1111_BODY).json()["images"][0]
    r = c["alice"].post("/sdapi/v1/png-info", json={"image": "data:image/png;base64," + img}).json()
    assert r["info"].startswith("a lighthouse, stormy sea") and r["parameters"]["Seed"] == "42"
    from io import BytesIO

    from PIL import Image

    buf = BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="PNG")
    r = c["alice"].post("/sdapi/v1/png-info", json={"image": base64.b64encode(buf.getvalue()).decode()})
    assert r.status_code == 200 and r.json()["info"] == ""
    r = c["alice"].post("/sdapi/v1/png-info", json={"image": base64.b64encode(b"not an image").decode()})
    assert r.status_code in (400, 422) and "image" in r.json()["detail"]


def test_bad_a1111_requests(server) -> None:
    _, _, c = server
    r = c["alice"].post("/sdapi/v1/txt2img", json={**A1111_BODY, "sampler_name": "Eulr"})
    assert r.status_code == 422 and "Euler" in r.json()["detail"]
    r = c["alice"].post("/sdapi/v1/txt2img", json={**A1111_BODY, "override_settings": {"sd_model_checkpoint": "nope"}})
    assert r.status_code == 422 and "tiny-sd15" in r.json()["detail"]
    r = c["alice"].post("/sdapi/v1/img2img", json={**A1111_BODY, "init_images": ["bm90IGFuIGltYWdl"]})
    assert r.status_code == 422 and "init_images[0]: not an image" in r.json()["detail"]
    r = c["alice"].post("/sdapi/v1/img2img", json=A1111_BODY)
    assert r.status_code == 422 and "init_images" in r.json()["detail"]


def test_img2img_inpaint_and_hires_through_sdapi(server) -> None:
    from io import BytesIO

    import numpy as np
    from PIL import Image, ImageDraw

    _, _, c = server
    src = Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    mask = Image.new("L", (64, 64))
    ImageDraw.Draw(mask).rectangle((20, 20, 44, 44), fill=255)

    def b64(img: Image.Image) -> str:
        buf = BytesIO()
        img.save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode()

    body = {**A1111_BODY, "init_images": ["data:image/png;base64," + b64(src)], "mask": b64(mask), "mask_blur": 0,
            "inpaint_full_res": False, "denoising_strength": 0.8, "include_init_images": True}
    r = c["alice"].post("/sdapi/v1/img2img", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert len(out["images"]) == 2 and out["parameters"]["init_images"] is None and out["parameters"]["mask"] is None
    img = np.asarray(Image.open(BytesIO(base64.b64decode(out["images"][0]))).convert("RGB"))
    assert np.array_equal(img[:10], np.asarray(src)[:10])
    info = json.loads(out["info"])
    assert "Denoising strength: 0.8" in info["infotexts"][0]
    hr = c["alice"].post("/sdapi/v1/txt2img", json={**A1111_BODY, "enable_hr": True, "hr_scale": 2, "hr_upscaler": "Latent"})
    assert hr.status_code == 200
    assert Image.open(BytesIO(base64.b64decode(hr.json()["images"][0]))).size == (128, 128)


def test_xyz_plot_and_prompt_matrix_through_script_name(server) -> None:
    from io import BytesIO

    from PIL import Image

    _, _, c = server
    args = ["Steps", "2,3", "", "Sampler", "Euler,Euler a", "", "Nothing", "", "", True, False, False, False]
    r = c["alice"].post("/sdapi/v1/txt2img", json={**A1111_BODY, "script_name": "x/y/z plot", "script_args": args})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["images"]) == 5  # the grid first, then the four cells
    grid = Image.open(BytesIO(base64.b64decode(body["images"][0])))
    assert grid.width > 2 * 64 and grid.height > 2 * 64  # cells plus label margins
    cells = [parse_infotext(t) for t in json.loads(body["info"])["infotexts"][1:]]
    assert [(p["Steps"], p["Sampler"]) for p in cells] == [("2", "Euler"), ("3", "Euler"), ("2", "Euler a"), ("3", "Euler a")]
    bad = c["alice"].post("/sdapi/v1/txt2img", json={**A1111_BODY, "script_name": "x/y/z plot", "script_args": ["Sampler", "Eulr", "", "Nothing", "", "", "Nothing", "", ""]})
    assert bad.status_code == 422 and "Eulr" in bad.json()["detail"]
    m = c["alice"].post("/sdapi/v1/txt2img", json={**A1111_BODY, "prompt": "a cat|red|hat", "script_name": "prompt matrix"})
    assert m.status_code == 200 and len(m.json()["images"]) == 5
    prompts = [i.split("\n")[0] for i in json.loads(m.json()["info"])["infotexts"][1:]]
    assert prompts == ["a cat", "a cat, red", "a cat, hat", "a cat, red, hat"]
    assert c["alice"].post("/sdapi/v1/txt2img", json={**A1111_BODY, "script_name": "outpainting mk2"}).status_code == 422


def test_full_option_set_per_user_and_output_options_honoured(server) -> None:
    """GET options is A1111's whole set; samples_format/jpeg_quality set by one user make that
    user's images JPEGs (file, API and download), infotext in EXIF; other users keep PNG."""
    url, service, c = server
    opts = c["alice"].get("/sdapi/v1/options").json()
    assert len(opts) > 250
    assert opts["samples_format"] == "png" and opts["jpeg_quality"] == 80 and opts["eta_noise_seed_delta"] == 0
    assert opts["randn_source"] == "CPU" and opts["sd_vae"] == "Automatic" and opts["s_noise"] == 1.0
    r = c["alice"].post("/sdapi/v1/options", json={"samples_format": "jpeg", "jpeg_quality": 90, "show_warnings": True,
                                                   "some_extension_option": [1, 2]})
    assert r.status_code == 200, r.text
    mine = c["alice"].get("/sdapi/v1/options").json()
    assert (mine["samples_format"], mine["jpeg_quality"], mine["show_warnings"], mine["some_extension_option"]) == ("jpg", 90, True, [1, 2])
    assert c["bob"].get("/sdapi/v1/options").json()["samples_format"] == "png"

    out = c["alice"].post("/sdapi/v1/txt2img", json=A1111_BODY).json()
    data = base64.b64decode(out["images"][0])
    assert data[:3] == b"\xff\xd8\xff"  # JPEG
    assert parse_infotext(read_infotext(data))["Seed"] == "42"
    info = json.loads(out["info"])
    rec = service.store.list_images("alice", 1, 0)[0]
    assert rec.path.endswith(".jpg") and (service.dirs.root / rec.path).read_bytes() == data
    dl = c["alice"].get(f"/api/v1/images/{rec.id}")
    assert dl.headers["content-type"] == "image/jpeg" and dl.content == data
    assert info["seed"] == 42
    # bob: still PNG
    assert base64.b64decode(c["bob"].post("/sdapi/v1/txt2img", json=A1111_BODY).json()["images"][0])[:4] == b"\x89PNG"
    # per job, through override_settings, without changing alice's options
    webp = {**A1111_BODY, "override_settings": {"samples_format": "webp"}}
    assert base64.b64decode(c["alice"].post("/sdapi/v1/txt2img", json=webp).json()["images"][0])[8:12] == b"WEBP"
    # jpeg_quality and webp_lossless reach the encoder: a lower quality is a smaller file; lossless
    # WEBP has the PNG's very pixels
    low = {**A1111_BODY, "override_settings": {"jpeg_quality": 10}}
    assert len(base64.b64decode(c["alice"].post("/sdapi/v1/txt2img", json=low).json()["images"][0])) < len(data)
    from PIL import Image

    png = base64.b64decode(c["bob"].post("/sdapi/v1/txt2img", json=A1111_BODY).json()["images"][0])
    lossless = {**A1111_BODY, "override_settings": {"samples_format": "webp", "webp_lossless": True}}
    exact = base64.b64decode(c["alice"].post("/sdapi/v1/txt2img", json=lossless).json()["images"][0])
    assert list(Image.open(io.BytesIO(exact)).convert("RGB").getdata()) == list(Image.open(io.BytesIO(png)).convert("RGB").getdata())
    assert c["alice"].get("/sdapi/v1/options").json()["samples_format"] == "jpg"


def test_bad_option_values_are_422_naming_the_option(server) -> None:
    _, _, c = server
    for body, word in (({"samples_format": "bmp"}, "samples_format"), ({"randn_source": "NV"}, "NV"),
                       ({"jpeg_quality": 500}, "jpeg_quality"), ({"upscaler_for_img2img": "NoSuchNet"}, "NoSuchNet"),
                       ({"sd_vae": "missing.safetensors"}, "missing")):
        r = c["alice"].post("/sdapi/v1/options", json=body)
        assert r.status_code in (404, 422) and word in r.json()["detail"], (body, r.text)
    assert c["alice"].get("/sdapi/v1/options").json()["samples_format"] == "png"  # nothing half-applied


def test_sdapi_bodies_are_typed_in_openapi_and_auth_schemes_are_declared(server) -> None:
    url, _, c = server
    spec = httpx.get(f"{url}/openapi.json").json()
    body = spec["paths"]["/sdapi/v1/txt2img"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    schema = spec["components"]["schemas"][body["$ref"].rsplit("/", 1)[1]]
    assert schema["properties"]["steps"]["default"] == 50 and schema["properties"]["sampler_index"]["default"] == "Euler"
    assert "enable_hr" in schema["properties"]
    img = spec["paths"]["/sdapi/v1/img2img"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert "include_init_images" in spec["components"]["schemas"][img["$ref"].rsplit("/", 1)[1]]["properties"]
    resp = spec["paths"]["/sdapi/v1/txt2img"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert resp["$ref"].endswith("GenerationResponse")
    schemes = spec["components"]["securitySchemes"]
    assert {v["scheme"] for v in schemes.values()} == {"bearer", "basic"}
    assert spec["paths"]["/sdapi/v1/txt2img"]["post"]["security"]
    # wrong types: a 422 in A1111's error shape naming the field, nothing queued
    r = c["alice"].post("/sdapi/v1/txt2img", json={**A1111_BODY, "steps": "many"})
    assert r.status_code == 422 and "steps" in r.json()["detail"] and set(r.json()) >= {"error", "detail", "body", "errors"}
    assert c["alice"].get("/api/v1/jobs").json()["jobs"] == []
