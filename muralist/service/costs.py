"""What a job will cost, computed from its whole plan before it is queued.

Per-user limits are checked against every image and every pass a job will produce, not just the
base request: X/Y/Z cells, prompt-matrix combinations, the hires-fix target, the outpainting
canvas, SD-upscale output and tiles, and extras outputs. ``work`` (pixels x steps, summed) bounds
the GPU time one job can take.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..errors import InvalidRequestError
from ..request import MAX_SIDE, GenerationRequest


@dataclass
class Cost:
    images: int = 0  # images the job returns (grids aside)
    pixels: int = 0  # the largest pass, in pixels
    pixels_at: str = ""  # which pass that is, for the message
    side: int = 0  # the longest side of any pass
    steps: int = 0  # the most steps of any pass
    work: int = 0  # sum over every image and pass of pixels x steps

    def add_pass(self, width: int, height: int, steps: int, count: int, what: str) -> None:
        if width * height > self.pixels:
            self.pixels, self.pixels_at = width * height, f"{what} {width}x{height}"
        self.side = max(self.side, width, height)
        self.steps = max(self.steps, steps)
        self.work += width * height * max(steps, 1) * count

    def merge(self, other: Cost) -> None:
        if other.pixels > self.pixels:
            self.pixels, self.pixels_at = other.pixels, other.pixels_at
        self.images += other.images
        self.side = max(self.side, other.side)
        self.steps = max(self.steps, other.steps)
        self.work += other.work


def _image_size(data: str) -> tuple[int, int]:
    from ..engine.images import decode_image

    img = decode_image(data, "init_images[0]")
    return img.width, img.height


def generation_cost(engine: Any, req: GenerationRequest) -> Cost:
    """The cost of a txt2img/img2img request, its script included."""
    if req.script_name:
        kind, spec = engine.script(req)
        base = req.model_copy(update={"script_name": None, "script_args": [], "styles": []})
        if kind == "xyz":
            from ..scripts.grids import plan_xyz

            total = Cost()
            for cell in plan_xyz(engine, base, spec).cells.values():
                total.merge(generation_cost(engine, cell))
            return total
        if kind == "matrix":
            parts = len(req.prompt.split("|")) - 1
            one = generation_cost(engine, base)
            combos = 2 ** parts
            return Cost(one.images * combos, one.pixels, one.pixels_at, one.side, one.steps, one.work * combos)
        if kind == "sd_upscale":
            from ..scripts.sd_upscale import tile_starts

            overlap, _upscaler, scale = spec
            w0, h0 = _image_size(req.init_images[0])
            big_w, big_h = int(w0 * scale) // 8 * 8, int(h0 * scale) // 8 * 8
            cost = Cost(images=req.n_iter)
            cost.add_pass(big_w, big_h, 1, req.n_iter, "SD upscale output")
            if 0 <= overlap < min(req.width, req.height) // 2:
                tiles = len(tile_starts(big_w, req.width, overlap)) * len(tile_starts(big_h, req.height, overlap))
                cost.add_pass(req.width, req.height, req.steps, tiles * req.n_iter, "SD upscale tile")
            return cost
    count = req.batch_size * req.n_iter
    cost = Cost(images=count)
    width, height = req.width, req.height
    if req.init_images and req.outpaints:
        w0, h0 = _image_size(req.init_images[0])
        width = math.ceil((w0 + req.outpaint_left + req.outpaint_right) / 8) * 8
        height = math.ceil((h0 + req.outpaint_top + req.outpaint_bottom) / 8) * 8
        cost.add_pass(width, height, req.steps, count, "outpainting canvas")
    else:
        cost.add_pass(width, height, req.steps, count, "generation")
    if req.enable_hr and not req.init_images:
        hr_w, hr_h = req.hr_size
        cost.add_pass(hr_w, hr_h, req.hr_second_pass_steps or req.steps, count, "hires fix")
    return cost


def extras_cost(ereq: Any) -> Cost:
    cost = Cost(images=len(ereq.images))
    for data in ereq.images:
        w, h = _image_size(data)
        if ereq.upscaler_1 == "None" and ereq.upscaler_2 == "None":
            out_w, out_h = w, h
        elif ereq.resize_mode == 1:  # scaled to cover the size, then (upscaling_crop) cut to it
            s = max(ereq.upscaling_resize_w / w, ereq.upscaling_resize_h / h)
            out_w, out_h = max(int(w * s), ereq.upscaling_resize_w), max(int(h * s), ereq.upscaling_resize_h)
        else:
            out_w, out_h = int(w * ereq.upscaling_resize), int(h * ereq.upscaling_resize)
        cost.add_pass(out_w, out_h, 1, 1, "extras output")
    return cost


def check(cost: Cost, limits: Any) -> None:
    """Refuse a plan over the user's limits (or over what muralist can make), naming the limit
    and the computed value."""
    if cost.side > MAX_SIDE:
        raise InvalidRequestError(f"{cost.pixels_at}: a side of {cost.side} pixels is over the maximum of {MAX_SIDE}")
    if cost.pixels > limits.max_pixels:
        raise InvalidRequestError(f"{cost.pixels_at}: {cost.pixels} pixels is over your limit of max_pixels={limits.max_pixels}")
    if cost.steps > limits.max_steps:
        raise InvalidRequestError(f"steps: a pass of {cost.steps} steps is over your limit of max_steps={limits.max_steps}")
    if cost.images > limits.max_images:
        raise InvalidRequestError(
            f"this job makes {cost.images} images (batches, X/Y/Z cells, prompt-matrix combinations included), "
            f"over your limit of max_images={limits.max_images}")
    if cost.work > limits.max_work:
        raise InvalidRequestError(
            f"this job's work (pixels x steps over every image and pass) is {cost.work:.3g}, over your limit of "
            f"max_work={limits.max_work:.3g}; make fewer or smaller images, or fewer steps")
