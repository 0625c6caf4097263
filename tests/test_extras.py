"""Extras (upscale + face restore) and model upscalers in hires fix, through the queue and both APIs."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

from muralist.infotext import parse_infotext, read_infotext
from tests.server_util import link_models, running_server, wait_job
from tests.test_faces import tiny_codeformer
from tests.test_upscalers import rrdb_new


def b64(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def picture(w: int = 40, h: int = 24) -> Image.Image:
    return Image.fromarray(np.random.default_rng(3).integers(0, 255, (h, w, 3), dtype=np.uint8))


def test_extras_and_model_upscalers(a1111_models: Path, tmp_path: Path) -> None:
    root = link_models(a1111_models, tmp_path / "data")
    (root / "models" / "ESRGAN").mkdir(parents=True)
    torch.save(rrdb_new(), root / "models" / "ESRGAN" / "tiny-esrgan.pth")  # 4x RRDBNet, basicsr layout
    (root / "models" / "Codeformer").mkdir(parents=True)
    torch.save({"params_ema": tiny_codeformer().state_dict()}, root / "models" / "Codeformer" / "codeformer-v0.1.0.pth")
    with running_server(root) as (url, _service):
        c = httpx.Client(base_url=url, timeout=120)
        names = [u["name"] for u in c.get("/sdapi/v1/upscalers").json()]
        assert names[:3] == ["None", "Lanczos", "Nearest"] and "tiny-esrgan" in names
        # CodeFormer weights are installed, GFPGAN's are not.
        assert {f["name"]: bool(f["cmd_dir"]) for f in c.get("/sdapi/v1/face-restorers").json()} == {"CodeFormer": True, "GFPGAN": False}

        r = c.post("/sdapi/v1/extra-single-image", json={"image": b64(picture()), "upscaling_resize": 2, "upscaler_1": "tiny-esrgan",
                                                         "codeformer_visibility": 0.5, "codeformer_weight": 0.3})
        assert r.status_code == 200, r.text
        out = Image.open(io.BytesIO(base64.b64decode(r.json()["image"])))
        assert out.size == (80, 48)  # A1111's rule: int(w * scale) // 8 * 8
        assert "Postprocess upscaler: tiny-esrgan" in r.json()["html_info"]

        r = c.post("/sdapi/v1/extra-batch-images", json={"imageList": [{"data": b64(picture()), "name": "a"}, {"data": b64(picture(32, 32)), "name": "b"}],
                                                         "resize_mode": 1, "upscaling_resize_w": 64, "upscaling_resize_h": 64, "upscaler_1": "Lanczos"})
        assert r.status_code == 200 and [Image.open(io.BytesIO(base64.b64decode(i))).size for i in r.json()["images"]] == [(64, 64)] * 2
        # Without upscaling_crop A1111 keeps the aspect ratio: scaled to cover 64x64, not cut.
        r = c.post("/sdapi/v1/extra-single-image", json={"image": b64(picture()), "resize_mode": 1, "upscaling_resize_w": 64,
                                                         "upscaling_resize_h": 64, "upscaling_crop": False, "upscaler_1": "Lanczos"})
        assert Image.open(io.BytesIO(base64.b64decode(r.json()["image"]))).size == (104, 64)

        bad = c.post("/sdapi/v1/extra-single-image", json={"image": b64(picture()), "upscaler_1": "tiny-esrgn"})
        assert bad.status_code == 422 and "tiny-esrgan" in bad.json()["detail"]
        bad = c.post("/sdapi/v1/extra-single-image", json={"image": base64.b64encode(b"junk").decode(), "upscaler_1": "Lanczos"})
        assert bad.status_code == 422 and "not an image" in bad.json()["detail"]

        # Native API: an extras job, and hires fix through the model upscaler.
        job = c.post("/api/v1/jobs", json={"type": "extras", "params": {"image": b64(picture()), "upscaler_1": "Nearest"}}).json()
        assert wait_job(c, job["id"])["status"] == "succeeded"
        job = c.post("/api/v1/jobs", json={"params": {"prompt": "x", "width": 64, "height": 64, "steps": 2, "enable_hr": True,
                                                      "hr_scale": 2, "hr_upscaler": "tiny-esrgan"}}).json()
        done = wait_job(c, job["id"])
        assert done["status"] == "succeeded", done
        png = c.get(f"/api/v1/images/{done['result']['images'][0]}").content
        assert Image.open(io.BytesIO(png)).size == (128, 128)
        assert parse_infotext(read_infotext(png))["Hires upscaler"] == "tiny-esrgan"
