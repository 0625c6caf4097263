"""Model cards (Civitai Helper's sidecars) against a local server with Civitai's URL shapes, and the
web UI's Models tab: cards with activation text, the admin-only "Get models" panel.

The provider server of ``test_download`` is reused and taught two more Civitai routes:
``/api/v1/model-versions/by-hash/{hash}`` on the API host and the image host's
``/{key}/{uuid}/width=450/{id}.jpeg``.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from muralist.errors import ForbiddenError
from muralist.models.cards import merge_user_metadata, sd_version
from tests.server_util import link_models, running_server, wait_job
from tests.test_download import TOKEN, Provider, make_handler, serve, settings_for
from tests.test_web import CHROMIUM, browser, shot, signed_in, site  # noqa: F401 - shared fixtures

needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
IMAGE_PATH = "/xG1nkqKTMzGDvpLrqFT7WA/8a3c-uuid/width=450/1234.jpeg"


class CivitaiProvider(Provider):
    def __init__(self) -> None:
        super().__init__()
        self.by_hash: dict[str, dict[str, Any]] = {}  # upper-case sha256 -> version info
        self.images: dict[str, bytes] = {}


def card_handler(p: CivitaiProvider, role: str) -> type:
    base = make_handler(p, role)

    class Handler(base):  # type: ignore[misc, valid-type]
        def do_GET(self) -> None:
            path = urlsplit(self.path).path
            if role == "main" and (m := re.match(r"^/api/v1/model-versions/by-hash/([0-9A-Fa-f]+)$", path)):
                info = p.by_hash.get(m.group(1).upper())
                if info is None:
                    return self._json({"error": "Model not found"}, 404)
                return self._json(info)
            if role == "storage" and path in p.images:
                return self._send(200, p.images[path], {"Content-Type": "image/jpeg"})
            return super().do_GET()

    return Handler


@pytest.fixture
def civitai() -> Any:
    yield from serve(CivitaiProvider(), card_handler)


def jpeg(size: tuple[int, int] = (800, 600)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, (200, 40, 90)).save(buf, "JPEG")
    return buf.getvalue()


def version_info(p: CivitaiProvider, vid: int, name: str, kind: str, words: list[str], base: str = "SD 1.5",
                 image: bool = True) -> dict[str, Any]:
    return {"id": vid, "modelId": vid * 10, "name": "v1.0", "baseModel": base, "trainedWords": words,
            "description": f"<p>{name} by someone</p>", "model": {"name": name, "type": kind, "nsfw": False},
            "files": [], "images": [{"url": p.storage + IMAGE_PATH, "type": "image", "width": 800}] if image else []}


def add_lora(folder: Path, name: str, seed: int = 1) -> Path:
    from safetensors.torch import save_file

    from tests.test_extra_networks import make_lora

    folder.mkdir(parents=True, exist_ok=True)
    save_file(make_lora(seed), str(folder / f"{name}.safetensors"))
    return folder / f"{name}.safetensors"


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------ the job


def test_model_info_writes_the_three_sidecars_and_keeps_user_notes(civitai: CivitaiProvider, tmp_path: Path,
                                                                    a1111_models: Path) -> None:
    from PIL import Image

    from muralist.service.store import User

    root = link_models(a1111_models, tmp_path / "data")
    lora = add_lora(root / "models" / "Lora", "inkstyle")
    # The user already wrote notes (and left activation text empty) in A1111's metadata editor.
    (lora.parent / "inkstyle.json").write_text(json.dumps({"notes": "my own notes", "activation text": ""}))
    info = version_info(civitai, 501, "Ink Style", "LORA", ["inkstyle", "ink wash"])
    civitai.by_hash[sha(lora).upper()] = info
    civitai.images[IMAGE_PATH] = jpeg()
    with running_server(root, downloads=settings_for(civitai, civitai_token=TOKEN)) as (url, service), \
            httpx.Client(base_url=url, timeout=30) as client:
        with pytest.raises(ForbiddenError):
            service.submit(User("bob"), "model_info", {"kind": "lora", "name": "inkstyle"})
        missing = client.post("/api/v1/jobs", json={"type": "model_info", "params": {"kind": "lora", "name": "nope"}})
        assert missing.status_code == 422 and "nope" in missing.text
        job = client.post("/api/v1/jobs", json={"type": "model_info", "params": {"kind": "lora", "name": "inkstyle"}})
        assert job.status_code == 202, job.text
        view = wait_job(client, job.json()["id"])
        assert view["status"] == "succeeded", view
        entry = view["result"]["models"][0]
        assert entry["status"] == "saved" and entry["civitai_model"] == "Ink Style"

        assert json.loads((lora.parent / "inkstyle.civitai.info").read_text()) == info
        user = json.loads((lora.parent / "inkstyle.json").read_text())
        assert user["notes"] == "my own notes"  # kept
        assert user["activation text"] == "inkstyle, ink wash" and user["sd version"] == "SD1"
        assert user["description"] == "<p>Ink Style by someone</p>" and user["preferred weight"] == 0
        with Image.open(lora.parent / "inkstyle.preview.png") as im:
            assert im.format == "PNG" and im.size == (512, 384)  # shrunk, aspect kept

        loras = client.get("/api/v1/models").json()["loras"]
        card = next(lo for lo in loras if lo["name"] == "inkstyle")
        assert card["activation_text"] == "inkstyle, ink wash" and card["base_model"] == "SD 1.5"
        assert card["description"] == "<p>Ink Style by someone</p>"
        assert client.get("/api/v1/models/preview", params={"kind": "lora", "name": "inkstyle"}).status_code == 200

        # The token went to the API only, never to the image host, and is nowhere in what users see.
        api_calls = [r for r in civitai.log if "by-hash" in r["path"]]
        assert api_calls and all(r["auth"] == f"Bearer {TOKEN}" for r in api_calls)
        assert all(r["auth"] is None for r in civitai.log if r["role"] == "storage")
        assert TOKEN not in json.dumps([view, client.get("/api/v1/jobs").json(), client.get("/api/v1/models").json()])

        # A user's later edits (words, their own preview) survive fetching the card again.
        user["activation text"] = "my words"
        (lora.parent / "inkstyle.json").write_text(json.dumps(user))
        Image.new("RGB", (8, 8), "blue").save(lora.parent / "inkstyle.preview.png")
        again = client.post("/api/v1/jobs", json={"type": "model_info", "params": {"kind": "lora", "name": "inkstyle"}})
        assert wait_job(client, again.json()["id"])["status"] == "succeeded"
        assert json.loads((lora.parent / "inkstyle.json").read_text())["activation text"] == "my words"
        with Image.open(lora.parent / "inkstyle.preview.png") as im:
            assert im.size == (8, 8)
        forced = client.post("/api/v1/jobs", json={"type": "model_info", "params": {"kind": "lora", "name": "inkstyle",
                                                                                    "refresh": True}})
        assert wait_job(client, forced.json()["id"])["status"] == "succeeded"
        with Image.open(lora.parent / "inkstyle.preview.png") as im:
            assert im.size == (512, 384)
        assert next(lo for lo in client.get("/api/v1/models").json()["loras"]
                    if lo["name"] == "inkstyle")["activation_text"] == "my words"


def test_fetch_all_records_not_found_and_skips_existing(civitai: CivitaiProvider, tmp_path: Path,
                                                        a1111_models: Path) -> None:
    root = link_models(a1111_models, tmp_path / "data")
    ckpt = root / "models" / "Stable-diffusion"
    known, unknown = ckpt / "tiny-sd15.safetensors", ckpt / "tiny-sd15-b.ckpt"
    civitai.by_hash[sha(known).upper()] = version_info(civitai, 7, "Tiny", "Checkpoint", ["tiny"], "SDXL 1.0",
                                                       image=False)
    with running_server(root, downloads=settings_for(civitai)) as (url, _service), \
            httpx.Client(base_url=url, timeout=30) as client:
        def run(params: dict[str, Any]) -> dict[str, Any]:
            job = client.post("/api/v1/jobs", json={"type": "model_info", "params": params})
            assert job.status_code == 202, job.text
            view = wait_job(client, job.json()["id"])
            assert view["status"] == "succeeded", view
            return {m["file"]: m for m in view["result"]["models"]}

        first = run({"all": True})
        assert first[known.name]["status"] == "saved" and first[known.name]["base_model"] == "SDXL 1.0"
        assert first[unknown.name]["status"] == "not_found" and first[unknown.name]["message"] == "not found on Civitai"
        assert (ckpt / "tiny-sd15.civitai.info").is_file() and not (ckpt / "tiny-sd15-b.civitai.info").exists()
        assert not (ckpt / "tiny-sd15.preview.png").exists()  # the version has no image

        lookups = len([r for r in civitai.log if "by-hash" in r["path"]])
        second = run({"all": True})
        assert second[known.name]["status"] == "skipped" and second[unknown.name]["status"] == "not_found"
        assert len([r for r in civitai.log if "by-hash" in r["path"]]) == lookups + 1  # only the unknown one
        third = run({"all": True, "refresh": True})
        assert third[known.name]["status"] == "saved"

        cks = {c["name"]: c for c in client.get("/api/v1/models").json()["checkpoints"]}
        assert cks[known.name]["base_model"] == "SDXL 1.0" and cks[known.name]["activation_text"] == "tiny"
        assert cks[unknown.name]["base_model"] is None and cks[unknown.name]["activation_text"] is None


def test_a_civitai_download_arrives_with_its_card(civitai: CivitaiProvider, tmp_path: Path, a1111_models: Path) -> None:
    data = (a1111_models / "models" / "Stable-diffusion" / "tiny-sd15.safetensors").read_bytes()
    civitai.civitai[77] = ("tiny-civitai.safetensors", data)
    civitai.by_hash[hashlib.sha256(data).hexdigest().upper()] = version_info(civitai, 77, "Tiny", "Checkpoint",
                                                                             ["tiny", "small"])
    civitai.images[IMAGE_PATH] = jpeg((64, 48))
    civitai.civitai_token = TOKEN
    root = tmp_path / "data"
    with running_server(root, downloads=settings_for(civitai, civitai_token=TOKEN)) as (url, _service), \
            httpx.Client(base_url=url, timeout=30) as client:
        job = client.post("/api/v1/jobs", json={"type": "download", "params": {"source": "civitai", "version_id": 77}})
        view = wait_job(client, job.json()["id"])
        assert view["status"] == "succeeded" and view["result"]["card"] == "saved", view
        folder = root / "models" / "Stable-diffusion"
        for suffix in (".civitai.info", ".json", ".preview.png"):
            assert (folder / f"tiny-civitai{suffix}").is_file(), suffix
        card = next(c for c in client.get("/api/v1/models").json()["checkpoints"] if c["name"] == "tiny-civitai.safetensors")
        assert card["activation_text"] == "tiny, small" and card["base_model"] == "SD 1.5"
        assert TOKEN not in json.dumps(view)


def test_user_metadata_merge_and_sd_version() -> None:
    info = {"trainedWords": ["a", " b "], "baseModel": "Pony", "description": "d"}
    merged = merge_user_metadata({"notes": "n", "description": "mine", "preferred weight": 0.7, "extra": 1}, info)
    assert merged == {"notes": "n", "description": "mine", "preferred weight": 0.7, "extra": 1,
                      "sd version": "SDXL", "activation text": "a, b"}
    assert [sd_version(b) for b in ("SD 1.5", "SD 2.1 768", "SDXL 1.0", "Flux.1 D", None)] == \
        ["SD1", "SD2", "SDXL", "Unknown", "Unknown"]


# ------------------------------------------------------------------------------------------ web UI


@needs_chromium
def test_get_models_panel_only_for_admins_and_merge_from_it(site, browser) -> None:  # noqa: F811
    url, service, keys = site
    bob = signed_in(browser, url, keys["bob"])
    bob.click("[data-tab=models]")
    bob.wait_for_selector("#cards-checkpoint .card")
    assert bob.locator("#get-models").is_hidden()
    # A user an admin allowed to download sees the download form, and not the admin's merger.
    trusted = service.store.add_user("cards-trusted")
    service.store.set_user_limits("cards-trusted", {"max_downloads": 1})
    carol = signed_in(browser, url, trusted)
    carol.click("[data-tab=models]")
    carol.wait_for_selector("#dl-form", state="visible")
    assert carol.locator("#merge-form").is_hidden() and carol.locator("#info-all").is_hidden()
    carol.context.close()

    page = signed_in(browser, url, service.store.add_user("cards-admin", admin=True))
    page.click("[data-tab=models]")
    page.wait_for_selector("#get-models", state="visible")
    page.wait_for_function("document.querySelector('#mg-primary').options.length > 1")
    titles = page.eval_on_selector("#mg-primary", "s => [...s.options].map(o => o.value)")
    page.select_option("#mg-primary", next(t for t in titles if t.startswith("tiny-sd15.safetensors")))
    page.select_option("#mg-secondary", next(t for t in titles if t.startswith("tiny-sd15-b.ckpt")))
    page.fill("#mg-multiplier", "0.5")
    page.fill("#mg-name", "webmerge")
    page.click("#merge-form button[type=submit]")
    page.wait_for_function("[...document.querySelector('#model').options].some(o => o.value.startsWith('webmerge'))",
                           timeout=120000)
    assert (service.dirs.ckpt_dir / "webmerge.safetensors").is_file()
    assert "webmerge" in page.inner_text("#merge-status")
    shot(page, "get-models")


@needs_chromium
def test_lora_card_inserts_its_tag_and_activation_text(site, browser) -> None:  # noqa: F811
    url, service, keys = site
    lora = add_lora(service.dirs.lora_dir, "glowstyle", seed=3)
    (lora.parent / "glowstyle.json").write_text(json.dumps({"activation text": "glowing, neon", "sd version": "SD1"}))
    service.engine.loras.refresh()
    page = signed_in(browser, url, keys["alice"])
    page.fill("#prompt", "a cat")
    page.click("[data-tab=models]")
    page.wait_for_selector(".card-lora[data-name=glowstyle]")
    assert "glowing, neon" in page.inner_text(".card-lora[data-name=glowstyle]")
    assert "SD1" in page.inner_text(".card-lora[data-name=glowstyle]")
    page.click(".card-lora[data-name=glowstyle]")
    assert page.input_value("#prompt") == "a cat <lora:glowstyle:1> glowing, neon"
    shot(page, "models-activation")


@needs_chromium
def test_download_form_shows_the_result_and_fetch_all_reports_counts(site, browser, civitai: CivitaiProvider,  # noqa: F811
                                                                      a1111_models: Path) -> None:
    url, service, _ = site
    data = (a1111_models / "models" / "Stable-diffusion" / "tiny-sd15.safetensors").read_bytes()
    civitai.civitai[88] = ("from-the-form.safetensors", data)
    civitai.by_hash[hashlib.sha256(data).hexdigest().upper()] = version_info(civitai, 88, "Tiny", "Checkpoint", ["tiny"])
    civitai.images[IMAGE_PATH] = jpeg((32, 32))
    before = service.settings.downloads
    service.settings.downloads = settings_for(civitai)  # read by the dispatcher for each run
    try:
        page = signed_in(browser, url, service.store.add_user("dl-admin", admin=True))
        page.click("[data-tab=models]")
        page.select_option("#dl-source", "civitai")
        page.fill("#dl-ref", "88")
        page.click("#dl-form button[type=submit]")
        page.wait_for_function("document.querySelector('#dl-status').textContent.includes('from-the-form.safetensors')",
                               timeout=60000)
        assert (service.dirs.ckpt_dir / "from-the-form.preview.png").is_file()  # its card came with it
        page.wait_for_selector(".card-checkpoint[data-name^='from-the-form'] .activation")
        page.click("#info-all")
        page.wait_for_function("document.querySelector('#info-status').textContent.includes('not found on Civitai')",
                               timeout=60000)
        # tiny-sd15 has the same bytes as the download (saved), the download was skipped (it has its card),
        # the other tiny models are unknown to Civitai.
        assert re.search(r"Saved 1, not found on Civitai [1-9]\d*, skipped 1, errors 0", page.inner_text("#info-status"))
    finally:
        service.settings.downloads = before


def test_cli_fetches_a_card_without_a_server(civitai: CivitaiProvider, tmp_path: Path, a1111_models: Path,
                                            monkeypatch, capsys) -> None:
    from muralist.cli import main

    root = link_models(a1111_models, tmp_path / "data")
    lora = add_lora(root / "models" / "Lora", "cliink")
    civitai.by_hash[sha(lora).upper()] = version_info(civitai, 77, "CLI Ink", "LORA", ["cli ink"])
    civitai.images[IMAGE_PATH] = jpeg()
    monkeypatch.setenv("CIVITAI_API_TOKEN", TOKEN)
    assert main(["models", "info", "cliink", "--kind", "lora", "--data-dir", str(root),
                 "--civitai-endpoint", civitai.main]) == 0
    assert "cliink: saved (CLI Ink, SD 1.5)" in capsys.readouterr().out
    assert json.loads((lora.parent / "cliink.json").read_text())["activation text"] == "cli ink"
    assert (lora.parent / "cliink.preview.png").is_file()
    assert main(["models", "info", "--all", "--data-dir", str(root), "--civitai-endpoint", civitai.main]) == 0
    out = capsys.readouterr().out
    assert "cliink: skipped" in out and "not_found" in out  # the tiny checkpoints are not on Civitai
