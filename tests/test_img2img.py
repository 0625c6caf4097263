"""img2img, inpainting and hires fix on tiny real-architecture models."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from muralist.errors import InvalidRequestError
from muralist.infotext import parse_infotext
from muralist.request import GenerationRequest
from tests.conftest import pixels


def b64(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def source(w: int = 96, h: int = 64) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def gen(engine, tmp_path: Path, **kw):
    base = dict(prompt="a house", width=64, height=64, steps=6, seed=5, model="tiny-sd15.safetensors")
    base.update(kw)
    return engine.generate(GenerationRequest(**base), save_to=tmp_path)


@pytest.mark.parametrize("mode", [0, 1, 2, 3])
def test_img2img_output_size_for_every_resize_mode(engine, tmp_path: Path, mode: int) -> None:
    saved = gen(engine, tmp_path, init_images=[b64(source())], resize_mode=mode, width=72, height=64, denoising_strength=0.5)
    assert saved.result.images[0].size == (72, 64)
    params = parse_infotext(saved.result.infotexts[0])
    assert params["Denoising strength"] == "0.5"


def test_denoising_strength_controls_how_much_changes(engine, tmp_path: Path) -> None:
    src = source(64, 64)
    low = pixels(gen(engine, tmp_path, init_images=[b64(src)], denoising_strength=0.1).result.images[0])
    high = pixels(gen(engine, tmp_path, init_images=["data:image/png;base64," + b64(src)], denoising_strength=0.9).result.images[0])
    orig = pixels(src)
    assert np.abs(low - orig).mean() < np.abs(high - orig).mean()


@pytest.mark.parametrize("fill", [0, 1, 2, 3])
@pytest.mark.parametrize("full_res", [True, False])
def test_inpainting_leaves_unmasked_pixels_identical(engine, tmp_path: Path, fill: int, full_res: bool) -> None:
    src = source(96, 64)
    mask = Image.new("L", src.size, 0)
    ImageDraw.Draw(mask).rectangle((30, 16, 60, 44), fill=255)
    saved = gen(engine, tmp_path, init_images=[b64(src)], mask=b64(mask), inpainting_fill=fill, inpaint_full_res=full_res,
                mask_blur=2, width=64, height=64, denoising_strength=0.9)
    out = pixels(saved.result.images[0])
    orig = pixels(src if full_res else src.resize((64, 64), Image.LANCZOS))
    far = np.ones(out.shape[:2], bool)
    sx, sy = out.shape[1] / 96, out.shape[0] / 64
    far[int(10 * sy) : int(50 * sy), int(24 * sx) : int(66 * sx)] = False  # the mask, its blur and padding
    assert np.array_equal(out[far], orig[far])
    inside = out[int(24 * sy) : int(36 * sy), int(38 * sx) : int(52 * sx)]
    assert np.abs(inside - orig[int(24 * sy) : int(36 * sy), int(38 * sx) : int(52 * sx)]).mean() > 1
    params = parse_infotext(saved.result.infotexts[0])
    assert params["Masked content"] == ["fill", "original", "latent noise", "latent nothing"][fill]


def test_inpainting_model_uses_its_nine_channels(engine, tmp_path: Path) -> None:
    src = source(64, 64)
    mask = Image.new("L", src.size, 0)
    ImageDraw.Draw(mask).rectangle((16, 16, 48, 48), fill=255)
    saved = gen(engine, tmp_path, model="tiny-sd15-inpainting", init_images=[b64(src)], mask=b64(mask), inpaint_full_res=False,
                mask_blur=0)
    out = pixels(saved.result.images[0])
    assert np.array_equal(out[:8], pixels(src)[:8])  # far from the mask: the original


def test_inverted_mask_repaints_the_outside(engine, tmp_path: Path) -> None:
    src = source(64, 64)
    mask = Image.new("L", src.size, 0)
    ImageDraw.Draw(mask).rectangle((16, 16, 48, 48), fill=255)
    out = pixels(gen(engine, tmp_path, init_images=[b64(src)], mask=b64(mask), inpainting_mask_invert=1, inpaint_full_res=False,
                     mask_blur=0, denoising_strength=0.9).result.images[0])
    assert np.array_equal(out[24:40, 24:40], pixels(src)[24:40, 24:40])
    assert np.abs(out[:8] - pixels(src)[:8]).mean() > 1


@pytest.mark.parametrize("upscaler", ["Latent", "Latent (bicubic antialiased)", "Latent (nearest-exact)", "Lanczos", "Nearest"])
def test_hires_fix_sizes_and_infotext(engine, tmp_path: Path, upscaler: str) -> None:
    saved = gen(engine, tmp_path, enable_hr=True, hr_scale=1.5, hr_upscaler=upscaler, hr_second_pass_steps=3, steps=4)
    assert saved.result.images[0].size == (96, 96)
    params = parse_infotext(saved.result.infotexts[0])
    assert params["Size-1"] == "64" and params["Hires upscale"] == "1.5" and params["Hires upscaler"] == upscaler
    assert params["Hires steps"] == "3" and params["Denoising strength"] == "0.7"


def test_hires_resize_to_explicit_size(engine, tmp_path: Path) -> None:
    saved = gen(engine, tmp_path, enable_hr=True, hr_resize_x=128, hr_resize_y=96, steps=3)
    assert saved.result.images[0].size == (128, 96)
    params = parse_infotext(saved.result.infotexts[0])
    assert (params["Hires resize-1"], params["Hires resize-2"]) == ("128", "96")  # A1111 splits WxH values


@pytest.mark.parametrize(
    "kw,msg",
    [
        (dict(init_images=["bm90IGFuIGltYWdl"]), "init_images[0]: not an image"),
        (dict(init_images=["%%%"]), "init_images[0]"),
        (dict(mask="x"), None),
        (dict(hr_upscaler="Bogus", enable_hr=True), "hr_upscaler"),
    ],
)
def test_bad_images_and_masks(engine, tmp_path: Path, kw: dict, msg: str | None) -> None:
    if "mask" in kw:
        kw = {**kw, "init_images": [b64(source(64, 64))], "mask": b64(Image.new("L", (32, 32), 255))}
        msg = "mask: its size 32x32 differs"
    with pytest.raises(InvalidRequestError, match=msg.replace("[", r"\[").replace("]", r"\]")):
        gen(engine, tmp_path, **kw)


def test_outpainting_extends_the_canvas_and_keeps_the_original(engine, tmp_path: Path) -> None:
    src = source(64, 48)
    saved = gen(engine, tmp_path, init_images=[b64(src)], outpaint_left=32, outpaint_bottom=14, mask_blur=2, width=64, height=64)
    out = saved.result.images[0]
    assert out.size == (96, 64)  # 64+32 wide, 48+14 -> padded to 64 high
    arr, orig = pixels(out), pixels(src)
    # The original region, away from the repainted seam (2 * mask_blur px plus the blur itself), is untouched.
    assert np.array_equal(arr[0:36, 32 + 10 : 96], orig[0:36, 10:64])
    from muralist.engine.images import outpaint_canvas

    canvas, mask = outpaint_canvas(src, 32, 0, 0, 14, 4)
    assert canvas.size == mask.size == (96, 64)
    assert np.abs(arr[:, :24] - pixels(canvas)[:, :24]).mean() > 1  # the new area was generated, not just filled


def test_tile_layout_covers_the_image_with_overlap() -> None:
    from muralist.scripts.sd_upscale import blend_weights, tile_starts

    assert tile_starts(128, 64, 16) == [0, 48, 64]
    assert tile_starts(64, 64, 16) == [0]
    w = blend_weights(8, 8, 4, left=True, top=False)
    assert w[0, 0] < w[0, 3] < 1 and w[0, 4] == 1 and w[7, 7] == 1


def test_sd_upscale_script(engine, tmp_path: Path) -> None:
    src = source(64, 48)
    saved = gen(engine, tmp_path, init_images=[b64(src)], script_name="SD upscale", script_args=["", 16, "Lanczos", 2.0],
                denoising_strength=0.3, steps=4)
    out = saved.result.images[0]
    assert out.size == (128, 96)  # A1111's upscale rule, then tiled img2img at 64x64
    plain = src.resize((128, 96), Image.LANCZOS)
    assert np.abs(pixels(out) - pixels(plain)).mean() > 1  # re-detailed, not just resized
    assert "SD upscale upscaler: Lanczos" in saved.result.infotexts[0]
    with pytest.raises(InvalidRequestError, match="SD upscale"):
        gen(engine, tmp_path, script_name="SD upscale", script_args=["", 16, "Lanczos", 2.0])


def _steps_run(engine, tmp_path: Path, **kw) -> tuple[list[int], np.ndarray]:
    seen: list[int] = []
    base = dict(prompt="a house", width=64, height=64, steps=6, seed=5, model="tiny-sd15.safetensors")
    saved = engine.generate(GenerationRequest(**{**base, **kw}), progress=lambda p: seen.append(p.steps), save_to=tmp_path)
    return seen, pixels(saved.result.images[0])


def test_img2img_fix_steps_runs_exactly_the_requested_steps(engine, tmp_path: Path) -> None:
    src = [b64(source(64, 64))]
    normal, a = _steps_run(engine, tmp_path, init_images=src, denoising_strength=0.5)
    fixed, b = _steps_run(engine, tmp_path, init_images=src, denoising_strength=0.5, img2img_fix_steps=True)
    assert normal[-1] == 4 and len(normal) == 4  # A1111 (k-diffusion): int(0.5 * 6) + 1 steps of the schedule
    assert fixed[-1] == 6 and len(fixed) == 6  # A1111: 6 steps of a 12-step schedule
    assert np.abs(a - b).max() > 0


def test_hires_pass_runs_its_steps_in_full(engine, tmp_path: Path) -> None:
    seen, _ = _steps_run(engine, tmp_path, enable_hr=True, hr_scale=1.5, denoising_strength=0.5, hr_second_pass_steps=4)
    assert seen[-1] == 6 + 4 and len(seen) == 10  # A1111 always runs the hires steps as given


def test_upscaler_for_img2img_enlarges_the_input(engine, tmp_path: Path) -> None:
    small = [b64(source(32, 32))]
    _, lanczos = _steps_run(engine, tmp_path, init_images=small, denoising_strength=0.3)
    _, nearest = _steps_run(engine, tmp_path, init_images=small, denoising_strength=0.3, upscaler_for_img2img="Nearest")
    _, again = _steps_run(engine, tmp_path, init_images=small, denoising_strength=0.3, upscaler_for_img2img="Nearest")
    assert np.abs(lanczos - nearest).max() > 0 and np.array_equal(nearest, again)
    with pytest.raises(InvalidRequestError, match="upscaler_for_img2img"):
        gen(engine, tmp_path, init_images=small, upscaler_for_img2img="NoSuchNet")
