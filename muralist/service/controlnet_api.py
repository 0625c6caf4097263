"""sd-webui-controlnet's routes (``/controlnet/*``), with its shapes, so its clients work unchanged.

Units themselves travel in ``/sdapi/v1/txt2img|img2img`` (``alwayson_scripts.controlnet.args``)
and in native jobs (``params.controlnet``); these routes list models and preprocessors and run a
preprocessor alone (``detect``, for previews). The preprocessors here need no weights, so detect
runs in the API process, off the event loop.
"""

from __future__ import annotations

import base64
import io
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Query
from pydantic import BaseModel, Field

from ..controlnet import preprocess
from ..errors import InvalidRequestError
from .core import Service
from .store import User

MAX_DETECT_PIXELS = 4096 * 4096


class DetectRequest(BaseModel):
    controlnet_module: str = "none"
    controlnet_input_images: list[str] = Field(default_factory=list, description="base64 images")
    controlnet_processor_res: int = -1
    controlnet_threshold_a: float = -1
    controlnet_threshold_b: float = -1
    controlnet_masks: list[str] = Field(default_factory=list)
    low_vram: bool = False


class DetectResponse(BaseModel):
    info: str
    images: list[str]


def install(app: FastAPI, service: Service) -> None:
    current_user = app.state.current_user
    r = APIRouter(tags=["controlnet"])

    @r.get("/controlnet/version")
    def version(user: User = Depends(current_user)) -> dict[str, int]:
        return {"version": 3}  # the pydantic-unit API (string enums; muralist also takes the older ints)

    @r.get("/controlnet/model_list")
    def model_list(update: bool = Query(True), user: User = Depends(current_user)) -> dict[str, list[str]]:
        return {"model_list": [i.title for i in service.engine.controlnets.list()]}

    @r.get("/controlnet/module_list")
    def module_list(alias_names: bool = Query(False), user: User = Depends(current_user)) -> dict[str, Any]:
        names, detail = preprocess.module_list(alias_names)
        return {"module_list": names, "module_detail": detail}

    @r.get("/controlnet/control_types")
    def control_types(user: User = Depends(current_user)) -> dict[str, Any]:
        return {"control_types": preprocess.control_types([i.title for i in service.engine.controlnets.list()])}

    @r.get("/controlnet/settings")
    def settings(user: User = Depends(current_user)) -> dict[str, int]:
        count = user.options.get("control_net_unit_count", 3)
        return {"control_net_unit_count": count if isinstance(count, int) and 1 <= count <= 10 else 3}

    @r.post("/controlnet/detect", response_model=DetectResponse)
    def detect(body: DetectRequest, user: User = Depends(current_user)) -> dict[str, Any]:
        import numpy as np
        from PIL import Image

        from ..engine.images import decode_image

        try:
            pre = preprocess.find(body.controlnet_module)
        except InvalidRequestError:
            raise InvalidRequestError(f"Module not available: {body.controlnet_module!r}; see /controlnet/module_list") from None
        if not body.controlnet_input_images:
            raise InvalidRequestError("No image selected: send controlnet_input_images (base64)")
        if pre.mask and len(body.controlnet_masks) != len(body.controlnet_input_images):
            raise InvalidRequestError(f"Preprocessor {pre.name} requires `controlnet_masks` param (one mask per image)")
        res, a, b = pre.bounded(body.controlnet_processor_res, body.controlnet_threshold_a, body.controlnet_threshold_b)
        out = []
        for i, data in enumerate(body.controlnet_input_images):
            img = decode_image(data, f"controlnet_input_images[{i}]")
            if img.width * img.height > MAX_DETECT_PIXELS:
                raise InvalidRequestError(f"controlnet_input_images[{i}]: {img.width}x{img.height} is larger than 4096x4096")
            detected = preprocess.run(pre, np.asarray(img.convert("RGB")), int(res), a, b, 0,
                                      service.dirs.controlnet_dir / "annotator")
            if pre.mask:  # the map as the extension shows it: alpha = 255 - mask / 2
                mask = decode_image(body.controlnet_masks[i], f"controlnet_masks[{i}]").convert("L").resize(img.size)
                detected = np.dstack([detected, 255 - (np.asarray(mask) > 127).astype(np.uint8) * 127])
            buf = io.BytesIO()
            Image.fromarray(detected).save(buf, format="PNG")
            out.append(base64.b64encode(buf.getvalue()).decode())
        return {"info": "Success", "images": out}

    app.include_router(r)
