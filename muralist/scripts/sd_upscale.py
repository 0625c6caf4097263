"""A1111's "SD upscale" script: upscale an image, then re-detail it with img2img tile by tile.

Tiles have the request's width x height and overlap by ``overlap`` pixels; the last tile of a
row or column is aligned to the image's edge, and overlaps are blended linearly so no seam shows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..engine.images import decode_image, encode_png
from ..errors import InvalidRequestError
from ..request import GenerationRequest


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles covering ``length`` (the last one ends at the edge)."""
    if length <= tile:
        return [0]
    step = tile - overlap
    starts = list(range(0, length - tile, step))
    return starts + [length - tile]


def blend_weights(tile_w: int, tile_h: int, overlap: int, left: bool, top: bool) -> np.ndarray:
    """Weights ramping up over the overlap on the sides that meet an earlier tile."""
    w = np.ones((tile_h, tile_w), dtype=np.float32)
    if overlap > 0:
        ramp = (np.arange(overlap, dtype=np.float32) + 0.5) / overlap
        if left:
            w[:, :overlap] *= ramp[None, :]
        if top:
            w[:overlap, :] *= ramp[:, None]
    return w


def sd_upscale(engine: Any, req: GenerationRequest, overlap: int, upscaler: str, scale: float,
               control: Any = None, progress: Any = None, save_to: Path | None = None) -> tuple[Image.Image, list[str]]:
    """The upscaled, re-detailed image and the tiles' infotexts."""
    from ..upscale.upscalers import upscale

    if not req.init_images:
        raise InvalidRequestError("init_images: SD upscale needs the image to upscale")
    if not 0 <= overlap < min(req.width, req.height) // 2:
        raise InvalidRequestError(f"script_args: tile overlap {overlap} must be between 0 and half the tile size")
    src = decode_image(req.init_images[0], "init_images[0]").convert("RGB")
    big = upscale(src, upscaler, engine.upscalers, scale=scale, device=engine.cache.device).convert("RGB")
    if big.width < req.width or big.height < req.height:
        big = big.resize((max(big.width, req.width), max(big.height, req.height)), Image.LANCZOS)
    acc = np.zeros((big.height, big.width, 3), dtype=np.float32)
    weight = np.zeros((big.height, big.width, 1), dtype=np.float32)
    infotexts = []
    xs, ys = tile_starts(big.width, req.width, overlap), tile_starts(big.height, req.height, overlap)
    for j, y in enumerate(ys):
        for i, x in enumerate(xs):
            tile = big.crop((x, y, x + req.width, y + req.height))
            tile_req = req.model_copy(update={"init_images": [encode_png(tile)], "mask": None, "batch_size": 1, "n_iter": 1,
                                              "script_name": None, "script_args": [], "styles": [], "resize_mode": 0})
            out = engine.generate(tile_req, control=control, progress=progress, save_to=save_to / "tiles" if save_to else None,
                                  detected_maps=False)
            w = blend_weights(req.width, req.height, overlap, i > 0, j > 0)[..., None]
            acc[y : y + req.height, x : x + req.width] += np.asarray(out.result.images[0], dtype=np.float32) * w
            weight[y : y + req.height, x : x + req.width] += w
            infotexts.append(out.result.infotexts[0])
    image = Image.fromarray(np.clip(acc / np.maximum(weight, 1e-6) + 0.5, 0, 255).astype(np.uint8))
    return image, infotexts
