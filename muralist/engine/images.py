"""Image handling for img2img and inpainting with A1111's rules: decoding, resize modes, masks.

Images arrive as base64 (raw or data URLs), are checked (decodable, not oversized) and turned
into RGB; masks are white where the picture is repainted.
"""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from ..errors import InvalidRequestError

MAX_INPUT_PIXELS = 4096 * 4096


def decode_image(data: str | bytes, field: str = "image") -> Image.Image:
    """A PIL image from base64 (raw or ``data:`` URL) or bytes; bad input is a clear InvalidRequestError."""
    if not isinstance(data, str | bytes):
        raise InvalidRequestError(f"{field}: must be a base64 string or a data URL, not {type(data).__name__}")
    if isinstance(data, str):
        if data.startswith("data:"):
            data = data.partition(",")[2]
        try:
            raw = base64.b64decode(data, validate=False)
        except (binascii.Error, ValueError):
            raise InvalidRequestError(f"{field}: not valid base64") from None
    else:
        raw = data
    try:
        img = Image.open(io.BytesIO(raw))
        if img.width * img.height > MAX_INPUT_PIXELS:
            raise InvalidRequestError(f"{field}: {img.width}x{img.height} is larger than {MAX_INPUT_PIXELS} pixels")
        img.load()
    except InvalidRequestError:
        raise
    except (OSError, ValueError, Image.DecompressionBombError):
        raise InvalidRequestError(f"{field}: not an image (send a PNG, JPEG or WEBP as base64)") from None
    return img


def encode_png(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def lanczos(im: Image.Image, width: int, height: int) -> Image.Image:
    return im.resize((width, height), Image.LANCZOS)


def resize_image(mode: int, im: Image.Image, width: int, height: int,
                 resize: Callable[[Image.Image, int, int], Image.Image] = lanczos) -> Image.Image:
    """A1111's resize modes: 0 just resize, 1 crop and resize, 2 resize and fill (3, latent, resizes like 0).

    ``resize`` scales the source (A1111's "Upscaler for img2img" goes there); the fill bands of
    mode 2 are always stretched with Lanczos."""
    im = im.convert("RGB")
    if mode in (0, 3):
        return resize(im, width, height)
    ratio, src_ratio = width / height, im.width / im.height
    if mode == 1:
        # Scale to cover the target, then crop the centre.
        src_w = width if ratio > src_ratio else im.width * height // im.height
        src_h = height if ratio <= src_ratio else im.height * width // im.width
        resized = resize(im, src_w, src_h)
        out = Image.new("RGB", (width, height))
        out.paste(resized, (width // 2 - src_w // 2, height // 2 - src_h // 2))
        return out
    if mode == 2:
        # Scale to fit inside, then stretch the edge rows/columns into the empty bands.
        src_w = width if ratio < src_ratio else im.width * height // im.height
        src_h = height if ratio >= src_ratio else im.height * width // im.width
        resized = resize(im, src_w, src_h)
        out = Image.new("RGB", (width, height))
        out.paste(resized, (width // 2 - src_w // 2, height // 2 - src_h // 2))
        if ratio < src_ratio:
            fill = height // 2 - src_h // 2
            if fill > 0:
                out.paste(resized.resize((width, fill), box=(0, 0, width, 0)), (0, 0))
                out.paste(resized.resize((width, fill), box=(0, resized.height, width, resized.height)), (0, fill + src_h))
        elif ratio > src_ratio:
            fill = width // 2 - src_w // 2
            if fill > 0:
                out.paste(resized.resize((fill, height), box=(0, 0, 0, height)), (0, 0))
                out.paste(resized.resize((fill, height), box=(resized.width, 0, resized.width, height)), (fill + src_w, 0))
        return out
    raise InvalidRequestError(f"resize_mode: must be 0, 1, 2 or 3 (got {mode})")


@dataclass
class PreparedMask:
    """The mask at generation size (L, white = repaint), its blurred version for pasting back, and
    the crop box in the original image when only the masked area is repainted."""

    mask: Image.Image
    blurred: Image.Image
    crop: tuple[int, int, int, int] | None = None


def masked_bbox(mask: Image.Image, padding: int) -> tuple[int, int, int, int] | None:
    box = mask.getbbox()
    if box is None:
        return None
    x1, y1, x2, y2 = box
    return max(0, x1 - padding), max(0, y1 - padding), min(mask.width, x2 + padding), min(mask.height, y2 + padding)


def expand_to_ratio(box: tuple[int, int, int, int], width: int, height: int, img_w: int, img_h: int) -> tuple[int, int, int, int]:
    """Grow a crop box to the generation's aspect ratio, staying inside the image (A1111)."""
    x1, y1, x2, y2 = box
    ratio = width / height
    cw, ch = x2 - x1, y2 - y1
    if cw / ch < ratio:
        want = ch * ratio
        diff = int(want - cw)
        x1 -= diff // 2
        x2 += diff - diff // 2
        if x2 > img_w:
            x1, x2 = x1 - (x2 - img_w), img_w
        if x1 < 0:
            x2, x1 = min(img_w, x2 - x1), 0
    else:
        want = cw / ratio
        diff = int(want - ch)
        y1 -= diff // 2
        y2 += diff - diff // 2
        if y2 > img_h:
            y1, y2 = y1 - (y2 - img_h), img_h
        if y1 < 0:
            y2, y1 = min(img_h, y2 - y1), 0
    return x1, y1, x2, y2


def fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """A1111's "fill" masked content: the masked area painted with blurred colours of its surroundings."""
    out = Image.new("RGBA", image.size)
    rgba = image.convert("RGBA")
    keep = ImageOps.invert(mask.convert("L"))
    for radius, repeats in ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)):
        blurred = rgba.filter(ImageFilter.GaussianBlur(radius)) if radius else rgba
        layer = Image.new("RGBA", image.size)
        layer.paste(blurred, (0, 0), keep)
        for _ in range(repeats):
            out.alpha_composite(layer)
    return out.convert("RGB")


def paste_back(original: Image.Image, generated: Image.Image, blurred_mask: Image.Image, crop: tuple[int, int, int, int] | None) -> Image.Image:
    """The generated pixels inside the (blurred) mask over the original: outside it nothing changes."""
    base = original.convert("RGB")
    if crop is not None:
        x1, y1, x2, y2 = crop
        generated = generated.resize((x2 - x1, y2 - y1), Image.LANCZOS)
        canvas = base.copy()
        canvas.paste(generated, (x1, y1))
        generated = canvas
    return Image.composite(generated.convert("RGB"), base, blurred_mask.convert("L"))


def mask_to_latent(mask: Image.Image, width: int, height: int) -> np.ndarray:
    """A 0/1 latent-resolution mask (1 = repaint), as A1111 rounds it."""
    small = mask.convert("L").resize((width // 8, height // 8), Image.LANCZOS)
    return np.around(np.asarray(small, dtype=np.float32) / 255.0)


def outpaint_canvas(image: Image.Image, left: int, right: int, top: int, bottom: int, overlap: int) -> tuple[Image.Image, Image.Image]:
    """The extended canvas (new area filled by stretching the edges) and its mask.

    The canvas is padded on the right/bottom to a multiple of 8. The mask covers the new area and
    ``overlap`` pixels of the original along each extended side, so the seam is repainted smoothly.
    """
    image = image.convert("RGB")
    w, h = image.width + left + right, image.height + top + bottom
    w8, h8 = -(-w // 8) * 8, -(-h // 8) * 8
    right += w8 - w
    bottom += h8 - h
    canvas = image.resize((w8, h8), Image.LANCZOS)  # a stretched copy fills the new borders
    canvas = canvas.filter(ImageFilter.GaussianBlur(8))
    canvas.paste(image, (left, top))
    mask = Image.new("L", (w8, h8), 255)
    keep = (
        left + (overlap if left else 0),
        top + (overlap if top else 0),
        left + image.width - (overlap if right else 0),
        top + image.height - (overlap if bottom else 0),
    )
    mask.paste(0, keep)
    return canvas, mask
