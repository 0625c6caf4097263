"""The web UI in real headless Chromium (Debian's chromium, driven by Playwright)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.server_util import link_models, running_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")


@pytest.fixture(scope="module")
def site(a1111_models: Path, tmp_path_factory: pytest.TempPathFactory):
    root = link_models(a1111_models, tmp_path_factory.mktemp("web") / "data", controlnet=True)
    with running_server(root) as (url, service):
        keys = {n: service.store.add_user(n) for n in ("alice", "bob")}
        yield url, service, keys


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


def signed_in(browser, url: str, key: str):
    page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
    page.goto(url + "/")
    page.fill("#apikey", key)
    page.click("#login button[type=submit]")
    page.wait_for_function("document.querySelector('#model').options.length > 0")
    return page


def small_job(page, prompt: str, steps: int = 3) -> None:
    page.fill("#prompt", prompt)
    for field, value in (("#width", "64"), ("#height", "64"), ("#steps", str(steps)), ("#seed", "7")):
        page.fill(field, value)


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def test_generate_shows_the_image_with_its_infotext(site, browser) -> None:
    url, _, keys = site
    page = signed_in(browser, url, keys["alice"])
    assert page.inner_text("#whoami") == "alice"
    small_job(page, "a lighthouse at dusk")
    page.wait_for_function("document.querySelector('#tokens').textContent === '4/75'")
    page.focus("#prompt")
    page.keyboard.press("Control+Enter")  # A1111 shortcut, from the prompt box
    page.wait_for_selector(".job[data-status=succeeded] img", timeout=60000)
    caption = page.inner_text(".job[data-status=succeeded] .infotext")
    assert caption.startswith("a lighthouse at dusk") and "Seed: 7" in caption
    assert page.eval_on_selector(".job img", "img => img.naturalWidth") == 64
    shot(page, "txt2img")


def test_sign_in_before_the_language_file_arrives(site, browser) -> None:
    # A slow first load: the user signs in while the UI's strings are still on their way.
    url, _, keys = site
    page = browser.new_context().new_page()
    held = []
    page.route("**/ui/i18n/*.json", lambda route: held.append(route))
    page.goto(url + "/")
    page.fill("#apikey", keys["bob"])
    page.click("#login button[type=submit]")
    page.wait_for_function("document.querySelector('#model').options.length > 0")
    assert page.inner_text("#whoami") == "bob"
    assert held, "the language file was not held back"
    for route in held:
        route.continue_()
    page.wait_for_function("document.documentElement.lang !== ''")
    assert page.inner_text("#whoami") == "bob"
    page.context.close()


def test_queue_two_jobs_and_cancel_the_second(site, browser) -> None:
    url, _, keys = site
    page = signed_in(browser, url, keys["alice"])
    small_job(page, "first", steps=60)
    page.click("#generate")
    small_job(page, "second", steps=3)
    page.click("#generate")
    page.wait_for_selector(".job[data-status=queued] button.job-interrupt", timeout=30000)
    page.click(".job[data-status=queued] button.job-interrupt")
    page.wait_for_selector(".job[data-status=canceled]", timeout=30000)
    page.wait_for_selector(".job[data-status=succeeded]", timeout=120000)
    assert page.locator(".job[data-status=succeeded] .infotext").inner_text().startswith("first")
    page.click("[data-tab=queue]")
    shot(page, "queue")


def test_switching_to_simplified_chinese_changes_labels(site, browser) -> None:
    url, _, keys = site
    page = signed_in(browser, url, keys["alice"])
    assert page.inner_text("#generate") == "Generate"
    page.select_option("#lang", "zh-CN")
    page.wait_for_function("document.querySelector('#generate').textContent === '生成'")
    assert page.inner_text("[data-tab=history]") == "历史记录"
    shot(page, "txt2img-zh")
    page.reload()
    page.wait_for_function("document.querySelector('#generate').textContent === '生成'")  # remembered
    page.select_option("#lang", "en")


def test_two_users_see_only_their_own_history(site, browser) -> None:
    url, _, keys = site
    alice = signed_in(browser, url, keys["alice"])
    bob = signed_in(browser, url, keys["bob"])
    small_job(bob, "bob's private castle")
    bob.click("#generate")
    bob.wait_for_selector(".job[data-status=succeeded] img", timeout=60000)
    bob.click("[data-tab=history]")
    bob.wait_for_selector(".history-item")
    assert all("bob's private castle" in t for t in bob.locator(".history-item .infotext").all_inner_texts())
    alice.click("[data-tab=history]")
    alice.wait_for_selector(".history-item")
    texts = alice.locator(".history-item .infotext").all_inner_texts()
    assert texts and not any("bob's private castle" in t for t in texts)
    shot(alice, "history")


def test_page_weight_is_small_and_served_locally(site) -> None:
    import httpx

    url, _, _ = site
    html = httpx.get(url + "/").text
    assert "http://" not in html and "https://" not in html  # nothing from a CDN
    total = sum(len(httpx.get(url + p).content) for p in ("/", "/ui/app.js", "/ui/style.css", "/ui/i18n/en.json"))
    assert total < 75_000  # with the admin's download/merge forms; still no framework


def test_paint_a_mask_and_inpaint(site, browser, tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    url, service, keys = site
    src = Image.fromarray(np.random.default_rng(5).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    src.save(tmp_path / "src.png")
    page = signed_in(browser, url, keys["alice"])
    small_job(page, "a round window")
    page.set_input_files("#init-file", str(tmp_path / "src.png"))
    page.wait_for_selector("#mask-canvas", state="visible")
    page.fill("#mask_blur", "0")
    page.select_option("#inpaint_full_res", "0")
    box = page.locator("#mask-canvas").bounding_box()
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(cx - 10, cy)
    page.mouse.down()
    page.mouse.move(cx + 10, cy, steps=5)
    page.mouse.up()
    shot(page, "inpaint-mask")
    page.click("#generate")
    page.wait_for_selector(".job[data-status=succeeded] img", timeout=60000)
    caption = page.locator(".job[data-status=succeeded] .infotext").first.inner_text()
    assert "Masked content: original" in caption and "Mask blur: 0" in caption
    job = service.store.list_jobs("alice", limit=1)[0]
    assert job.type == "img2img"
    out = np.asarray(Image.open(service.dirs.root / service.store.get_image(job.result["images"][0]).path).convert("RGB"))
    assert np.array_equal(out[:8], np.asarray(src)[:8])  # far from the painted stroke: untouched
    assert not np.array_equal(out[28:36, 24:40], np.asarray(src)[28:36, 24:40])  # the stroke was repainted


def test_models_cards_insert_a_lora_and_settings_become_my_defaults(site, browser) -> None:
    from safetensors.torch import save_file

    from tests.test_extra_networks import make_lora

    url, service, keys = site
    lora_dir = service.dirs.lora_dir
    lora_dir.mkdir(parents=True, exist_ok=True)
    save_file(make_lora(1), str(lora_dir / "inkstyle.safetensors"))
    from PIL import Image

    Image.new("RGB", (16, 16), "orange").save(lora_dir / "inkstyle.preview.png")
    service.engine.loras.refresh()
    page = signed_in(browser, url, keys["bob"])
    page.fill("#prompt", "a cat")
    page.click("[data-tab=models]")
    page.wait_for_selector(".card-lora")
    page.wait_for_function("document.querySelector('.card-lora img').naturalWidth === 16")  # its preview
    shot(page, "models")
    page.click(".card-lora")
    assert page.input_value("#prompt") == "a cat <lora:inkstyle:1>"
    page.click("[data-tab=settings]")
    page.wait_for_function("document.querySelector('#set-model').options.length > 1")
    other = page.eval_on_selector("#set-model", "s => [...s.options].map(o => o.value).find(v => v !== s.value)")
    page.select_option("#set-model", other)
    page.fill("#set-steps", "7")
    page.click("#settings button[type=submit]")
    page.wait_for_function("document.querySelector('#settings-saved').textContent !== ''")
    shot(page, "settings")
    user = service.store.get_user("bob")
    assert user.options["model"] == other and user.options["steps"] == 7
    assert service.store.get_user("alice").options.get("steps") != 7  # only bob's defaults changed


def test_png_info_sends_settings_to_txt2img_and_extras_upscales(site, browser, tmp_path: Path) -> None:
    url, service, keys = site
    page = signed_in(browser, url, keys["alice"])
    small_job(page, "a blue boat, calm sea")
    page.click("#generate")
    page.wait_for_selector(".job[data-status=succeeded] img", timeout=60000)
    job = service.store.list_jobs("alice", limit=1)[0]
    png = service.dirs.root / service.store.get_image(job.result["images"][0]).path
    page.fill("#prompt", "something else")
    page.click("[data-tab=extras]")
    page.set_input_files("#pnginfo-file", str(png))
    page.wait_for_selector("#pnginfo-send", state="visible")
    assert page.inner_text("#pnginfo-text").startswith("a blue boat, calm sea")
    page.click("#pnginfo-send")
    assert page.input_value("#prompt") == "a blue boat, calm sea" and page.input_value("#seed") == "7"
    page.click("[data-tab=extras]")
    page.set_input_files("#extras-file", str(png))
    page.select_option("#extras-upscaler", "Lanczos")
    page.click("#extras-form button[type=submit]")
    page.wait_for_selector("#extras-out img", timeout=60000)
    page.wait_for_function("document.querySelector('#extras-out img').naturalWidth === 128")
    assert "Postprocess upscale by: 2" in page.inner_text("#extras-out pre")
    shot(page, "extras")


def test_history_delete_and_hires_from_the_form(site, browser) -> None:
    url, service, keys = site
    page = signed_in(browser, url, keys["bob"])
    small_job(page, "a tall tower")
    page.check("#enable_hr")
    page.fill("#hr_scale", "1.5")
    page.click("#generate")
    page.wait_for_selector(".job[data-status=succeeded] img", timeout=60000)
    assert "Hires upscale: 1.5" in page.locator(".job[data-status=succeeded] .infotext").first.inner_text()
    assert page.eval_on_selector(".job[data-status=succeeded] img", "img => img.naturalWidth") == 96
    page.uncheck("#enable_hr")
    page.click("[data-tab=history]")
    page.wait_for_selector(".history-item")
    before = len(service.store.list_images("bob"))
    page.locator(".history-item .history-delete").first.click()
    page.wait_for_function(f"document.querySelectorAll('.history-item').length === {before - 1}")
    assert len(service.store.list_images("bob")) == before - 1


def test_admin_page_manages_users_only_for_admins(site, browser) -> None:
    import httpx

    url, service, keys = site
    root_key = service.store.add_user("root", admin=True)
    bob = signed_in(browser, url, keys["bob"])
    assert bob.locator("#admin-tab").is_hidden()
    assert httpx.get(url + "/api/v1/admin/users", headers={"Authorization": f"Bearer {keys['bob']}"}).status_code == 403
    page = signed_in(browser, url, root_key)
    page.click("#admin-tab")
    page.wait_for_selector("#admin-users li[data-name=alice]")
    page.fill("#admin-name", "carol")
    page.click("#admin-add button[type=submit]")
    page.wait_for_function("document.querySelector('#admin-key').textContent.includes('mur_')")
    key = page.inner_text("#admin-key").split(": ")[-1].strip()
    assert service.store.user_by_key(key).name == "carol"
    page.wait_for_selector("#admin-users li[data-name=carol]")
    # The server's worker, as the dispatcher sees it (GET /api/v1/admin/workers).
    page.wait_for_selector("#admin-workers tbody tr[data-state=idle]")
    workers = httpx.get(url + "/api/v1/admin/workers", headers={"Authorization": f"Bearer {root_key}"}).json()
    assert page.inner_text("#admin-workers tbody tr td") == workers[0]["name"] and workers[0]["device"] == "cpu"
    assert httpx.get(url + "/api/v1/admin/workers", headers={"Authorization": f"Bearer {keys['bob']}"}).status_code == 403
    shot(page, "admin")


def test_outpainting_from_the_page(site, browser, tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    url, service, keys = site
    Image.fromarray(np.random.default_rng(6).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(tmp_path / "src.png")
    page = signed_in(browser, url, keys["alice"])
    small_job(page, "a wide landscape")
    page.set_input_files("#init-file", str(tmp_path / "src.png"))
    page.wait_for_selector("#outpaint-tools", state="visible")
    page.fill("#outpaint_right", "32")
    page.fill("#outpaint_bottom", "16")
    page.click("#generate")
    page.wait_for_selector(".job[data-status=succeeded] img", timeout=60000)
    page.wait_for_function("document.querySelector('.job[data-status=succeeded] img').naturalWidth === 96")
    assert page.eval_on_selector(".job[data-status=succeeded] img", "img => img.naturalHeight") == 64


def test_controlnet_unit_from_the_page(site, browser, tmp_path: Path) -> None:
    """Add a unit, upload a control image, preview the preprocessor, generate: the image is guided
    (its infotext names the unit) and the detected map follows it; reusing the infotext refills the unit."""
    from PIL import Image, ImageDraw

    url, service, keys = site
    img = Image.new("RGB", (64, 64), "black")
    ImageDraw.Draw(img).ellipse((12, 12, 52, 52), fill="white")
    img.save(tmp_path / "control.png")
    page = signed_in(browser, url, keys["bob"])
    small_job(page, "a round tower")
    page.click("#cn-add")
    page.set_input_files(".cn-unit .cn-file", str(tmp_path / "control.png"))
    page.wait_for_selector(".cn-unit .cn-canvas", state="visible")
    page.select_option(".cn-unit .cn-module", "canny")
    page.select_option(".cn-unit .cn-model", label=next(i.title for i in service.engine.controlnets.list()))
    page.click(".cn-unit .cn-preview")
    page.wait_for_selector(".cn-unit .cn-detected", state="visible")
    assert page.eval_on_selector(".cn-unit .cn-detected", "i => i.naturalWidth") == 512  # canny at its 512 resolution
    page.click("#generate")
    page.wait_for_selector(".job[data-status=succeeded] img", timeout=60000)
    assert page.locator(".job[data-status=succeeded] img").count() == 2
    caption = page.locator(".job[data-status=succeeded] .infotext").first.inner_text()
    assert 'ControlNet 0: "Module: canny, Model: tiny-control-sd15 [' in caption
    shot(page, "controlnet")
    page.click(".cn-unit .cn-remove")
    assert page.locator(".cn-unit").count() == 0
    page.evaluate("text => applyInfotext(text)", caption)
    assert page.locator(".cn-unit").count() == 1
    assert page.eval_on_selector(".cn-unit .cn-model", "s => s.value").startswith("tiny-control-sd15 [")


def test_train_tab_uploads_captions_trains_and_uses_the_lora(site, browser, tmp_path: Path) -> None:
    import io
    import zipfile

    from PIL import Image, ImageDraw

    url, service, keys = site
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for i in range(4):
            img = Image.new("RGB", (64, 64), "white")
            ImageDraw.Draw(img).ellipse((8 + i, 8, 56, 56), fill=(30, 30, 200))
            b = io.BytesIO()
            img.save(b, format="PNG")
            z.writestr(f"10_blue ball/{i}.png", b.getvalue())
            z.writestr(f"10_blue ball/{i}.txt", "blue ball")
    (tmp_path / "balls.zip").write_bytes(buf.getvalue())
    page = signed_in(browser, url, keys["bob"])
    page.click("[data-tab=train]")
    page.fill("#ds-name", "balls")
    page.set_input_files("#ds-file", str(tmp_path / "balls.zip"))
    page.click("#ds-upload button[type=submit]")
    page.wait_for_selector(".ds-item textarea")
    assert page.locator(".ds-item").count() == 4
    page.locator(".ds-item textarea").first.fill("blue ball, shiny")
    page.locator(".ds-item textarea").first.dispatch_event("change")
    caption = service.dirs.root / "datasets" / "bob" / "balls" / "10_blue ball" / "0.txt"
    page.wait_for_function("() => true")
    for _ in range(50):
        if caption.read_text().strip() == "blue ball, shiny":
            break
        page.wait_for_timeout(100)
    assert caption.read_text().strip() == "blue ball, shiny"
    page.select_option("#tr-pretrained_model_name_or_path", index=0)
    for field, value in (("#tr-output_name", "bobs_balls"), ("#tr-resolution", "64,64"), ("#tr-max_train_epochs", "1"),
                         ("#tr-network_dim", "4"), ("#tr-network_alpha", "4"), ("#tr-train_batch_size", "4")):
        page.fill(field, value)
    page.click("#train-form button[type=submit]")
    page.wait_for_selector("#train-use", timeout=120000)
    assert "bobs_balls" in page.inner_text("#train-result")
    assert page.evaluate("() => { const c = document.getElementById('loss-chart'); "
                         "return c.getContext('2d').getImageData(0, 0, c.width, c.height).data.some((v) => v > 0); }")
    shot(page, "train")
    page.click("#train-use")
    assert "<lora:bobs_balls:0.8>" in page.input_value("#prompt")
    assert (service.dirs.lora_dir / "bob" / "bobs_balls.safetensors").is_file()
