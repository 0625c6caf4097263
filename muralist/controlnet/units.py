"""ControlNet units as sd-webui-controlnet's API takes them (its field names, defaults and enums).

Old clients are still common: they send ``input_image``, ``lowvram`` and ``guidance``, integer
enums for ``control_mode``/``resize_mode``/``hr_option``, and units without ``enabled`` (the
extension's older units defaulted to enabled). So a unit that omits ``enabled`` is enabled when it
names a model, and disabled otherwise.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..errors import InvalidRequestError

CONTROL_MODES = ("Balanced", "My prompt is more important", "ControlNet is more important")
RESIZE_MODES = ("Just Resize", "Crop and Resize", "Resize and Fill")
HR_OPTIONS = ("Both", "Low res only", "High res only")
# Older labels of the resize modes.
_RESIZE_ALIASES = {
    "inner fit (scale to fit)": "Crop and Resize", "scale to fit (inner fit)": "Crop and Resize",
    "outer fit (shrink to fit)": "Resize and Fill", "envelope (outer fit)": "Resize and Fill",
    "just resize (latent upscale)": "Just Resize",
}
_LEGACY = {"input_image": "image", "lowvram": "low_vram", "guidance": "guidance_end", "mask_image": "mask"}


def _enum(value: Any, names: tuple[str, ...], field: str, aliases: dict[str, str] | None = None) -> str:
    if isinstance(value, bool):
        raise ValueError(f"must be one of {', '.join(repr(n) for n in names)}")
    if isinstance(value, int):
        if value == 3 and field == "resize_mode":  # "Just Resize (Latent upscale)"
            return names[0]
        if 0 <= value < len(names):
            return names[value]
        raise ValueError(f"{value} is not one of 0..{len(names) - 1} ({', '.join(names)})")
    text = str(value).strip()
    for n in names:
        if text.lower() == n.lower():
            return n
    if aliases and text.lower() in aliases:
        return aliases[text.lower()]
    raise ValueError(f"{text!r} is not one of {', '.join(repr(n) for n in names)}")


class ControlNetUnit(BaseModel):
    """One unit (``alwayson_scripts.controlnet.args[i]``)."""

    model_config = ConfigDict(extra="ignore")

    enabled: bool = False
    module: str = Field("none", description="preprocessor, e.g. canny, invert, none")
    model: str = Field("None", description="ControlNet title 'name [hash]' or name")
    weight: float = Field(1.0, ge=0.0, le=2.0)
    image: str | None = Field(None, description="base64 control image; img2img: the init image when missing")
    mask: str | None = None
    resize_mode: str = "Crop and Resize"
    low_vram: bool = False
    processor_res: int = -1
    threshold_a: float = -1
    threshold_b: float = -1
    guidance_start: float = Field(0.0, ge=0.0, le=1.0)
    guidance_end: float = Field(1.0, ge=0.0, le=1.0)
    pixel_perfect: bool = False
    control_mode: str = "Balanced"
    hr_option: str = "Both"
    save_detected_map: bool = True

    @model_validator(mode="before")
    @classmethod
    def _legacy(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            raise ValueError("a ControlNet unit must be an object")
        data = dict(data)
        for old, new in _LEGACY.items():
            if old in data and data.get(new) is None:
                data[new] = data.pop(old)
        if "enabled" not in data:  # the extension's older default: a unit with a model is on
            data["enabled"] = str(data.get("model") or "None") not in ("None", "none", "")
        image = data.get("image")
        if isinstance(image, dict):  # {"image": ..., "mask": ...}
            data["image"], data["mask"] = image.get("image"), data.get("mask") or image.get("mask")
        elif isinstance(image, list | tuple) and image and all(isinstance(x, str) for x in image):
            data["image"] = image[0]
            if len(image) > 1 and not data.get("mask"):
                data["mask"] = image[1]
        return data

    @field_validator("control_mode", mode="before")
    @classmethod
    def _control_mode(cls, v: Any) -> str:
        return _enum(v, CONTROL_MODES, "control_mode")

    @field_validator("resize_mode", mode="before")
    @classmethod
    def _resize_mode(cls, v: Any) -> str:
        return resize_mode_name(v)

    @field_validator("hr_option", mode="before")
    @classmethod
    def _hr_option(cls, v: Any) -> str:
        return _enum(v, HR_OPTIONS, "hr_option")

    @model_validator(mode="after")
    def _order(self) -> ControlNetUnit:
        if self.guidance_start > self.guidance_end:
            raise ValueError(f"guidance_start ({self.guidance_start}) is after guidance_end ({self.guidance_end})")
        return self

    @property
    def active(self) -> bool:
        return self.enabled and self.model not in ("None", "none", "")


def resize_mode_name(value: Any) -> str:
    """A resize mode by name, alias or the old integer (A1111's img2img resize_mode uses the same
    numbers: 0 just resize, 1 crop and resize, 2 resize and fill, 3 latent = just resize)."""
    return _enum(value, RESIZE_MODES, "resize_mode", _RESIZE_ALIASES)


def units_from_alwayson(scripts: Any) -> list[dict[str, Any]] | None:
    """The unit list in A1111's ``alwayson_scripts`` (the script title matched case-insensitively)."""
    if not isinstance(scripts, dict):
        return None
    for title, value in scripts.items():
        if str(title).lower() == "controlnet":
            args = value.get("args") if isinstance(value, dict) else value
            if not isinstance(args, list):
                raise InvalidRequestError("alwayson_scripts.controlnet.args: must be a list of ControlNet units")
            return args
    return None


def parse_units(raw: Any) -> list[ControlNetUnit]:
    """Validated units; errors name the unit and field."""
    from ..request import checked

    if raw is None:
        return []
    if not isinstance(raw, list):
        raise InvalidRequestError("controlnet: must be a list of units")
    out = []
    for i, item in enumerate(raw):
        if isinstance(item, ControlNetUnit):
            out.append(item)
            continue
        out.append(checked(ControlNetUnit, item, f"controlnet unit {i}: "))
    return out
