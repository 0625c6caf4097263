"""The Extras tab: upscale (two upscalers blended) and face restoration, as A1111's extras do."""

from __future__ import annotations

from typing import Any

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import InvalidRequestError
from ..request import describe_validation_error


class ExtrasRequest(BaseModel):
    """A1111's extra-single-image / extra-batch-images fields (unknown fields ignored)."""

    model_config = ConfigDict(extra="ignore")

    images: list[str] = Field(default_factory=list, description="base64 images")
    names: list[str] = Field(default_factory=list)
    resize_mode: int = Field(0, ge=0, le=1, description="0 scale by, 1 scale to")
    upscaling_resize: float = Field(2.0, gt=0, le=8)
    upscaling_resize_w: int = Field(512, ge=1, le=16384)
    upscaling_resize_h: int = Field(512, ge=1, le=16384)
    upscaling_crop: bool = True
    upscaler_1: str = "None"
    upscaler_2: str = "None"
    extras_upscaler_2_visibility: float = Field(0.0, ge=0, le=1)
    gfpgan_visibility: float = Field(0.0, ge=0, le=1)
    codeformer_visibility: float = Field(0.0, ge=0, le=1)
    codeformer_weight: float = Field(0.0, ge=0, le=1)


def parse_extras(data: dict[str, Any]) -> ExtrasRequest:
    data = dict(data)
    if "image" in data and not data.get("images"):
        data["images"] = [data.pop("image")]
    if "imageList" in data and not data.get("images"):
        items = data.pop("imageList") or []
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            raise InvalidRequestError('imageList: a list of {"data": "<base64>", "name": "..."} objects')
        data["images"] = [i.get("data", "") for i in items]
        data["names"] = [str(i.get("name", "")) for i in items]
    try:
        req = ExtrasRequest.model_validate(data)
    except ValidationError as e:
        raise InvalidRequestError(describe_validation_error(e)) from None
    if not req.images:
        raise InvalidRequestError("image: send a base64 image")
    return req


def run_extras(engine: Any, req: ExtrasRequest, image: Image.Image) -> tuple[Image.Image, str]:
    """One image through upscaling then face restoration; returns it with A1111's postprocess info."""
    from .upscalers import upscale

    info: dict[str, Any] = {}
    if req.upscaler_1 != "None" or req.upscaler_2 != "None":
        crop_to = None
        if req.resize_mode == 1:
            # A1111: scale until the image covers the size (aspect kept), then, with upscaling_crop,
            # cut the centre to exactly that size.
            w, h = req.upscaling_resize_w, req.upscaling_resize_h
            kw: dict[str, Any] = {"scale": max(w / image.width, h / image.height)}
            crop_to = (w, h) if req.upscaling_crop else None
            info["Postprocess upscale to"] = f"{w}x{h}"
            if req.upscaling_crop:
                info["Postprocess crop to"] = f"{w}x{h}"
        else:
            kw = {"scale": req.upscaling_resize}
            info["Postprocess upscale by"] = f"{req.upscaling_resize:g}"
        dev = engine.cache.device
        first = upscale(image, req.upscaler_1, engine.upscalers, device=dev, **kw)
        info["Postprocess upscaler"] = req.upscaler_1
        if req.upscaler_2 != "None" and req.extras_upscaler_2_visibility > 0:
            second = upscale(image, req.upscaler_2, engine.upscalers, device=dev, **kw).resize(first.size, Image.LANCZOS)
            first = Image.blend(first.convert("RGB"), second.convert("RGB"), req.extras_upscaler_2_visibility)
            info["Postprocess upscaler 2"] = req.upscaler_2
        if crop_to is not None and first.size != crop_to:
            if first.width < crop_to[0] or first.height < crop_to[1]:  # rounding left it a pixel short
                first = first.resize((max(first.width, crop_to[0]), max(first.height, crop_to[1])), Image.LANCZOS)
            left, top = (first.width - crop_to[0]) // 2, (first.height - crop_to[1]) // 2
            first = first.crop((left, top, left + crop_to[0], top + crop_to[1]))
        image = first
    if req.gfpgan_visibility > 0:
        image = engine.faces.restore(image, model="GFPGAN", visibility=req.gfpgan_visibility)
        info["GFPGAN visibility"] = f"{req.gfpgan_visibility:g}"
    if req.codeformer_visibility > 0:
        image = engine.faces.restore(image, model="CodeFormer", visibility=req.codeformer_visibility, weight=req.codeformer_weight)
        info["CodeFormer visibility"] = f"{req.codeformer_visibility:g}"
        info["CodeFormer weight"] = f"{req.codeformer_weight:g}"
    text = ", ".join(f"{k}: {v}" for k, v in info.items())
    return image, text
