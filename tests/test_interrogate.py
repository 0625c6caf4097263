"""Captioning with a BLIP model read from a local folder (a tiny random one built here)."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.server_util import link_models, running_server


def make_tiny_blip(folder: Path) -> None:
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    text = dict(vocab_size=120, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
                encoder_hidden_size=32, max_position_embeddings=40, bos_token_id=2, sep_token_id=3, pad_token_id=0)
    vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37, image_size=32, patch_size=8)
    folder.mkdir(parents=True)
    BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(folder)
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[DEC]", "[SEP]", "[CLS]", "[MASK]"] + [f"w{i}" for i in range(114)]))
    tok = BertTokenizer(str(folder / "vocab.txt"), bos_token="[DEC]")
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok).save_pretrained(folder)


def b64(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_interrogate_with_a_local_blip_and_clear_errors(a1111_models: Path, tmp_path: Path) -> None:
    root = link_models(a1111_models, tmp_path / "data")
    with running_server(root) as (url, _service):
        c = httpx.Client(base_url=url, timeout=120)
        r = c.post("/sdapi/v1/interrogate", json={"image": b64(Image.new("RGB", (40, 30))), "model": "clip"})
        assert r.status_code == 400 and "models/BLIP" in r.json()["detail"]  # none configured: refused before queueing
        make_tiny_blip(root / "models" / "BLIP" / "tiny-blip")
        r = c.post("/sdapi/v1/interrogate", json={"image": b64(Image.new("RGB", (40, 30), "red"))})
        assert r.status_code == 200 and r.json()["caption"].startswith("w")
        job = c.post("/api/v1/jobs", json={"type": "interrogate", "params": {"image": b64(Image.new("RGB", (8, 8)))}}).json()
        from tests.server_util import wait_job

        done = wait_job(c, job["id"])
        assert done["status"] == "succeeded" and done["result"]["caption"].startswith("w")
        r = c.post("/sdapi/v1/interrogate", json={"image": b64(Image.new("RGB", (8, 8))), "model": "deepdanbooru"})
        assert r.status_code == 422
        r = c.post("/sdapi/v1/interrogate", json={"image": base64.b64encode(b"nope").decode()})
        assert r.status_code == 422 and "not an image" in r.json()["detail"]


@pytest.mark.parametrize("payload", [{}, {"image": ""}])
def test_interrogate_needs_an_image(a1111_models: Path, tmp_path: Path, payload: dict) -> None:
    root = link_models(a1111_models, tmp_path / "data")
    with running_server(root, workers=0) as (url, _service):
        r = httpx.post(url + "/sdapi/v1/interrogate", json=payload, timeout=60)
        assert r.status_code == 422 and "image" in r.json()["detail"]
