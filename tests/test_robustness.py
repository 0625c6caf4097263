"""Bad input of every kind gets a 4xx naming what to change (never a 500), in A1111's error shape,
and request bodies are limited while they stream in (issue 10, first part)."""

from __future__ import annotations

import base64
import gc
import resource
from pathlib import Path

import httpx
import pytest

from tests.server_util import copy_models, running_server

SMALL = {"prompt": "a red fox", "width": 64, "height": 64, "steps": 1}


@pytest.fixture()
def server(a1111_models: Path, tmp_path: Path):
    root = copy_models(a1111_models, tmp_path / "data")
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
