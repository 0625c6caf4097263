"""Bad input of every kind gets a 4xx naming what to change (never a 500), in A1111's error shape,
and request bodies are limited while they stream in (issue 10, first part)."""

from __future__ import annotations

import base64
import gc
import json
import resource
from pathlib import Path

import httpx
import pytest

from tests.server_util import link_models, running_server

SMALL = {"prompt": "a red fox", "width": 64, "height": 64, "steps": 1}


@pytest.fixture()
def server(a1111_models: Path, tmp_path: Path):
    root = link_models(a1111_models, tmp_path / "data", ("tiny-sd15.safetensors", "tiny-sd15-inpainting.safetensors"))
    with running_server(root, api_auth={"emile": "mot de passe é"}) as (url, service):
        key = service.store.add_user("alice")
        yield url, service, httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120)


def a1111_error(r: httpx.Response, status: int, *words: str) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) >= {"error", "detail", "body", "errors"}, body  # what A1111 clients parse
    for w in words:
        assert w in body["detail"], body
    return body


def test_inputs_that_used_to_answer_500(server) -> None:
    url, service, c = server
    a1111_error(c.get("/api/v1/images", params={"offset": 36893488147419103231}), 422, "offset")
    a1111_error(c.get("/api/v1/jobs", params={"offset": 36893488147419103231}), 422, "offset")
    for bad in ([1, 2], "abc"):
        a1111_error(c.post("/sdapi/v1/txt2img", json={**SMALL, "override_settings": bad}), 422, "override_settings")
    a1111_error(c.post("/sdapi/v1/txt2img", json={**SMALL, "seed_resize_from_h": "abc"}), 422, "seed_resize_from_h")
    for bad in (5, ["x"], {}):
        r = c.post("/sdapi/v1/png-info", json={"image": bad})
        a1111_error(r, 422, "image")
        a1111_error(c.post("/sdapi/v1/interrogate", json={"image": bad}), 422, "image")
        a1111_error(c.post("/api/v1/png-info", json={"image": bad}), 422, "image")
    a1111_error(c.post("/sdapi/v1/extra-batch-images", json={"imageList": [1, 2], "upscaler_1": "Lanczos"}), 422, "imageList")
    junk = base64.b64encode(b"not an image").decode()
    a1111_error(c.post("/sdapi/v1/extra-single-image", json={"image": junk, "upscaler_1": "Lanczos"}), 422, "image")
    # Face weights missing: the message says which file goes where.
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buf, format="PNG")
    img = base64.b64encode(buf.getvalue()).decode()
    body = a1111_error(c.post("/sdapi/v1/extra-single-image", json={"image": img, "gfpgan_visibility": 1}), 400, "GFPGAN")
    assert "models/GFPGAN" in body["detail"]
    # HTTP Basic with a non-ASCII password: works, and a wrong one is a 401, not a 500.
    good = httpx.get(url + "/api/v1/me", auth=("emile", "mot de passe é"))
    assert good.status_code == 200 and good.json()["name"] == "emile"
    bad = httpx.get(url + "/api/v1/me", auth=("emile", "mauvais é"))
    a1111_error(bad, 401)
    assert bad.headers["www-authenticate"] == 'Bearer, Basic realm="muralist"'  # the schemes this server takes
    assert service.store.list_jobs(None) == []  # nothing was queued by any of it


def test_progress_state_has_every_a1111_key(server) -> None:
    _, _, c = server
    state = c.get("/sdapi/v1/progress").json()["state"]
    assert set(state) >= {"skipped", "interrupted", "stopping_generation", "job", "job_count", "job_timestamp",
                          "job_no", "sampling_step", "sampling_steps"}


def test_a_user_error_in_a_job_is_4xx_on_sdapi(server) -> None:
    _, _, c = server
    # Valid at submit, refused when it runs: an empty mask is the caller's mistake, not ours.
    import io

    from PIL import Image

    def b64(img: Image.Image) -> str:
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode()

    r = c.post("/sdapi/v1/img2img", json={**SMALL, "init_images": [b64(Image.new("RGB", (64, 64)))],
                                          "mask": b64(Image.new("L", (64, 64), 0))})
    a1111_error(r, 422, "mask")  # it failed in the worker; before, this answered 500


def _chunks(total: int, size: int = 2**20):
    sent = 0
    while sent < total:
        yield b"x" * size
        sent += size


def test_a_chunked_100_mb_body_is_refused_without_being_read(server) -> None:
    url, _, _c = server
    gc.collect()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB; the server runs in this process
    r = httpx.post(url + "/api/v1/jobs", content=_chunks(100 * 2**20), timeout=120,
                   headers={"content-type": "application/json"})  # no auth either: refused before it
    assert r.status_code == 413 and r.json()["error"] == "PayloadTooLarge"
    grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grew < 80 * 1024, f"peak memory grew {grew / 1024:.0f} MiB"
    # A declared oversize body is refused from its header alone.
    r = httpx.post(url + "/sdapi/v1/txt2img", content=b"x" * (33 * 2**20), headers={"content-type": "application/json"})
    assert r.status_code == 413


def png_b64(img) -> str:
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_identity_and_paths_leak_nothing(server) -> None:
    url, service, c = server
    bob = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {service.store.add_user('bob')}"}, timeout=120)
    mine = c.post("/sdapi/v1/txt2img", json={**SMALL, "model": "tiny-sd15", "force_task_id": "task(shared-1)"})
    assert mine.status_code == 200
    # Bob names Alice's job id: he gets his own job, and learns nothing about hers.
    theirs = bob.post("/sdapi/v1/txt2img", json={**SMALL, "model": "tiny-sd15", "force_task_id": "task(shared-1)"})
    assert theirs.status_code == 200, theirs.text
    assert service.store.get("task(shared-1)").owner == "alice"
    assert [j.owner for j in service.store.list_jobs("bob")] == ["bob"]
    # Non-admins see file names, not the server's folders.
    for route, key in (("sd-models", "filename"), ("upscalers", "model_path")):
        for item in bob.get(f"/sdapi/v1/{route}").json():
            assert not str(item[key] or "").startswith("/"), item
    flags = bob.get("/sdapi/v1/cmd-flags").json()
    assert not any(str(v).startswith("/") for v in flags.values()), flags
    admin = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {service.store.add_user('root', admin=True)}"})
    assert admin.get("/sdapi/v1/sd-models").json()[0]["filename"].startswith("/")


def test_prompt_length_limit(server) -> None:
    _, service, c = server
    body = a1111_error(c.post("/api/v1/jobs", json={"params": {**SMALL, "prompt": "cat " * 6000}}), 422, "max_prompt_chars")
    assert "24000" in body["detail"]
    service.store.set_user_limits("alice", {"max_prompt_chars": 30000})
    assert c.post("/api/v1/jobs", json={"params": {**SMALL, "prompt": "cat " * 6000}}).status_code == 202


def test_inpainting_flag_and_sd_upscale_upscaler_by_index(server) -> None:
    from PIL import Image

    _, service, c = server
    init = png_b64(Image.new("RGB", (64, 64), (200, 30, 30)))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    r = c.post("/sdapi/v1/img2img", json={**SMALL, "model": "tiny-sd15-inpainting", "init_images": [init],
                                          "mask": png_b64(mask)})
    assert r.status_code == 200 and json.loads(r.json()["info"])["is_using_inpainting_conditioning"] is True
    r = c.post("/sdapi/v1/txt2img", json={**SMALL, "model": "tiny-sd15"})
    assert json.loads(r.json()["info"])["is_using_inpainting_conditioning"] is False
    names = [u["name"] for u in c.get("/sdapi/v1/upscalers").json()]
    nearest = names.index("Nearest")
    r = c.post("/sdapi/v1/img2img", json={**SMALL, "model": "tiny-sd15", "init_images": [init], "script_name": "SD upscale",
                                          "script_args": [None, 8, nearest, 2.0]})
    assert r.status_code == 200, r.text
    assert "SD upscale upscaler: Nearest" in json.loads(r.json()["info"])["infotexts"][0]
    a1111_error(c.post("/sdapi/v1/img2img", json={**SMALL, "init_images": [init], "script_name": "SD upscale",
                                                  "script_args": [None, 8, 99, 2.0]}), 422, "index 99")


def test_a_listening_server_never_becomes_anonymous(a1111_models: Path, tmp_path: Path) -> None:
    root = link_models(a1111_models, tmp_path / "data")
    with running_server(root, allow_single_user=False) as (url, service):
        key = service.store.add_user("alice", admin=True)
        assert httpx.get(url + "/api/v1/me", headers={"Authorization": f"Bearer {key}"}).status_code == 200
        service.store.remove_user("alice")  # the last user goes: still nobody gets in without a key
        a1111_error(httpx.get(url + "/api/v1/me"), 401)
        a1111_error(httpx.post(url + "/sdapi/v1/txt2img", json=SMALL), 401)


def test_newcomer_mistakes_get_helpful_answers(server, tmp_path: Path) -> None:
    import socket
    import subprocess
    import sys

    url, _, c = server
    # curl -d without a Content-Type sends a form.
    r = c.post("/api/v1/jobs", content=b'{"params": {}}', headers={"content-type": "application/x-www-form-urlencoded"})
    a1111_error(r, 422, "Content-Type: application/json")
    r = c.post("/api/v1/jobs", json={"params": SMALL})
    assert r.status_code == 202 and isinstance(r.json()["position"], int)
    # A taken port: one clear line, and no "listening on" before it.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "muralist.cli", "serve", "--data-dir", str(tmp_path / "d"),
                               "--port", str(port)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "listening on" not in done.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr and "--port" in done.stderr


def test_limits_hold_for_the_whole_plan_of_a_job(a1111_models: Path, tmp_path: Path) -> None:
    from PIL import Image

    root = link_models(a1111_models, tmp_path / "data")
    with running_server(root, workers=0) as (url, service):
        c = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {service.store.add_user('alice')}"}, timeout=60)
        service.store.set_user_limits("alice", {"max_pixels": 16384, "max_steps": 6, "max_images": 2})
        base = {"prompt": "a cat", "width": 64, "height": 64, "steps": 4}
        init = png_b64(Image.new("RGB", (64, 64), (10, 120, 40)))

        def refused(params: dict, *words: str, kind: str = "txt2img") -> None:
            a1111_error(c.post("/api/v1/jobs", json={"type": kind, "params": params}), 422, *words)

        assert c.post("/api/v1/jobs", json={"params": base}).status_code == 202  # within every limit
        xyz = ["Steps", ",".join(["100"] * 3), [], "Seed", ",".join(str(i) for i in range(50)), [], "Nothing", "", []]
        refused({**base, "script_name": "X/Y/Z plot", "script_args": xyz}, "max_steps=6")
        xyz = ["Seed", "1,2,3", [], "Nothing", "", [], "Nothing", "", []]
        refused({**base, "script_name": "X/Y/Z plot", "script_args": xyz}, "3 images", "max_images=2")
        refused({**base, "prompt": "a|b|c", "script_name": "Prompt matrix"}, "4 images", "max_images=2")
        refused({**base, "enable_hr": True, "hr_resize_x": 4096, "hr_resize_y": 4096}, "hires fix 4096x4096", "max_pixels")
        refused({**base, "init_images": [init], "outpaint_left": 2048, "outpaint_right": 2048}, "outpainting canvas 4160x64",
                "maximum of 4096", kind="img2img")
        refused({**base, "init_images": [init], "script_name": "SD upscale", "script_args": [None, 8, "Lanczos", 4.0]},
                "SD upscale output 256x256", "max_pixels", kind="img2img")
        refused({"image": init, "upscaler_1": "Lanczos", "upscaling_resize": 8}, "extras output 512x512", "max_pixels",
                kind="extras")
        service.store.set_user_limits("alice", {"max_pixels": None, "max_steps": None, "max_images": None, "max_work": 10**6})
        refused({**base, "width": 512, "height": 512}, "max_work")
        assert [j.id for j in service.store.list_jobs("alice")] and len(service.store.list_jobs("alice")) == 1


def test_input_images_live_in_files_not_in_the_database(a1111_models: Path, tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    root = link_models(a1111_models, tmp_path / "data")
    noise = np.random.default_rng(1).integers(0, 255, (1024, 1024, 3), dtype=np.uint8)
    init = png_b64(Image.fromarray(noise))  # ~4 MB of base64 that does not compress
    with running_server(root, workers=1) as (url, service):
        c = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {service.store.add_user('alice')}"}, timeout=120)
        params = {**SMALL, "steps": 2, "init_images": [init], "denoising_strength": 0.5}
        job_id = c.post("/api/v1/jobs", json={"type": "img2img", "params": params}).json()["id"]
        row = service.store.get(job_id)
        assert len(json.dumps(row.params)) < 20_000  # a reference, not the image
        stored = list((root / "inputs" / "alice").glob("*"))
        from tests.server_util import wait_job

        job = wait_job(c, job_id)
        assert job["status"] == "succeeded" and job["params"]["init_images"] == "<1 image(s)>"
        assert stored and not any(p.exists() for p in stored)  # gone once the job ended
        assert (root / "muralist.db").stat().st_size < 2 * 2**20


def test_concurrent_jobs_of_one_user_never_overwrite_files(a1111_models: Path, tmp_path: Path) -> None:
    from tests.server_util import wait_job

    root = link_models(a1111_models, tmp_path / "data")
    with running_server(root, workers=2) as (url, service):
        c = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {service.store.add_user('alice')}"}, timeout=120)
        # Same seed: A1111 would name every file 0000N-7.png; two workers write at the same moment.
        ids = [c.post("/api/v1/jobs", json={"params": {**SMALL, "seed": 7}}).json()["id"] for _ in range(6)]
        for job_id in ids:
            assert wait_job(c, job_id)["status"] == "succeeded"
        records = service.store.list_images("alice")
        files = sorted(p for p in (root / "outputs").rglob("*.png"))
        assert len(records) == 6 and len(files) == 6 and sorted(root / r.path for r in records) == files
        assert sorted(p.name for p in files) == [f"{i:05d}-7.png" for i in range(6)]
        assert not list((root / "outputs").rglob(".incoming-*"))  # no temporary files left behind


def test_unknown_lora_warning_reaches_sdapi_clients(server) -> None:
    _, _, c = server
    r = c.post("/sdapi/v1/txt2img", json={**SMALL, "model": "tiny-sd15", "prompt": "a fox <lora:nosuchlora:0.8>"})
    assert r.status_code == 200
    warnings = json.loads(r.json()["info"])["warnings"]
    assert any("nosuchlora" in w and "not found" in w for w in warnings), warnings
