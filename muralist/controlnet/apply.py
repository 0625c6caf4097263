"""ControlNet units applied inside muralist's denoising loop, with sd-webui-controlnet's semantics.

Per UNet call, each unit active at that point of the schedule runs its ControlNet on the same
latents and text context as the UNet; its 13 (SDXL: 10) residuals are scaled and summed into the
UNet's skip connections and middle block:

- "Balanced": every residual times the weight, for the prompt and the negative prompt alike;
- "My prompt is more important": soft weights ``weight * 0.825 ** (12 - i)`` (the middle block
  full, the first block about a tenth);
- "ControlNet is more important": the soft weights, and no control on the negative-prompt rows.

A unit is active while ``guidance_start <= step / steps <= guidance_end``, where ``step`` is the
index of the last finished step, as A1111 counts it (so ``guidance_end`` 0 still guides the first
two steps, as in the extension).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .units import ControlNetUnit, resize_mode_name

SOFT = [0.825 ** float(12 - i) for i in range(13)]


def _unique_colors(img: np.ndarray) -> int:
    return len(np.unique(img.reshape(-1, img.shape[2]), axis=0))


def hq_resize(img: np.ndarray, w: int, h: int) -> np.ndarray:
    """The extension's map resize: nearest for few-coloured maps, area down, cubic up; binary maps
    (two colours, near black and white) are re-binarised with Otsu after resizing."""
    import cv2

    if img.shape[0] == h and img.shape[1] == w:
        return img
    colors = _unique_colors(img)
    binary = colors == 2 and img.min() < 16 and img.max() > 240
    if 2 < colors < 200:
        interp = cv2.INTER_NEAREST
    elif w * h < img.shape[0] * img.shape[1]:
        interp = cv2.INTER_AREA
    else:
        interp = cv2.INTER_CUBIC
    out = cv2.resize(img, (w, h), interpolation=interp)
    if img.shape[2] == 4:  # the inpaint mask stays a mask
        out[:, :, 3] = np.where(out[:, :, 3] > 127, 255, 0)
    elif binary:
        gray = out.mean(axis=2).clip(0, 255).astype(np.uint8)
        _, bw = cv2.threshold(gray, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        out = np.stack([bw] * 3, axis=2)
    return out


def fit(detected: np.ndarray, mode: str, w: int, h: int) -> np.ndarray:
    """A detected map sized to the generation (w x h) by the unit's resize mode."""
    oh, ow = detected.shape[:2]
    if mode == "Just Resize":
        return hq_resize(detected, w, h)
    if mode == "Crop and Resize":
        k = max(h / oh, w / ow)
        nw, nh = int(np.round(ow * k)), int(np.round(oh * k))
        big = hq_resize(detected, nw, nh)
        y, x = (nh - h) // 2, (nw - w) // 2
        return big[y:y + h, x:x + w]
    # Resize and Fill: fit inside, pad with the median colour of the border.
    k = min(h / oh, w / ow)
    nw, nh = int(np.round(ow * k)), int(np.round(oh * k))
    small = hq_resize(detected, nw, nh)
    border = np.concatenate([detected[0], detected[-1], detected[:, 0], detected[:, -1]], axis=0)
    canvas = np.empty((h, w, detected.shape[2]), dtype=np.uint8)
    canvas[:] = np.median(border, axis=0).astype(np.uint8)
    if detected.shape[2] == 4:
        canvas[:, :, 3] = 255  # the padding is new area: an inpaint unit repaints it (outpainting)
    y, x = (h - nh) // 2, (w - nw) // 2
    canvas[y:y + nh, x:x + nw] = small
    return canvas


@dataclass
class Control:
    """One unit ready to run: its ControlNet, its detected map and the hint for the current pass."""

    unit: ControlNetUnit
    model: Any
    source: np.ndarray | None  # the unit's own image (RGB uint8); None: the img2img init image
    preprocessor: Any
    mask: np.ndarray | None = None  # the unit's own mask (inpaint modules)
    annotator_dir: Any = None
    detected: np.ndarray | None = None  # RGB uint8, at the processing resolution
    resize_mode: str = "Crop and Resize"
    infotext: str = ""
    hint: torch.Tensor | None = None  # (1, 3, H, W) in [0, 1] for the current pass
    _maps: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)

    def prepare(self, seed: int, subseed: int, w: int, h: int, init_image: Any, img2img_resize: int,
                img2img_mask: Any = None) -> None:
        """Run the preprocessor (once per job), as the extension does before sampling."""
        from . import preprocess

        u = self.unit
        self.resize_mode = u.resize_mode
        src = self.source
        if src is None:  # img2img: the init image, sized by img2img's own resize mode
            src = np.asarray(init_image.convert("RGB"))
            self.resize_mode = resize_mode_name(img2img_resize)
        res, a, b = self.preprocessor.bounded(u.processor_res, u.threshold_a, u.threshold_b)
        self.infotext = infotext_value(u, res, a, b)
        if u.pixel_perfect:
            res = preprocess.pixel_perfect_resolution(src.shape[0], src.shape[1], h // 8 * 8, w // 8 * 8, self.resize_mode)
        self.detected = preprocess.run(self.preprocessor, src, int(res), a, b, (seed + subseed) & 0xFFFFFFFF, self.annotator_dir)
        if self.preprocessor.mask:  # alpha: the unit's mask, else the img2img mask, else nothing to repaint
            mask = self.mask if self.mask is not None else img2img_mask
            alpha = np.zeros(src.shape[:2], np.uint8)
            if mask is not None:
                from PIL import Image

                alpha = np.asarray(Image.fromarray(mask).convert("L").resize((src.shape[1], src.shape[0]), Image.NEAREST))
                alpha = np.where(alpha > 127, 255, 0).astype(np.uint8)
            self.detected = np.dstack([self.detected[:, :, :3], alpha])
        self._maps.clear()

    def map_for(self, w: int, h: int) -> np.ndarray:
        """The detected map sized to a pass of w x h (what the ControlNet sees, and what clients get)."""
        if (w, h) not in self._maps:
            self._maps[(w, h)] = fit(self.detected, self.resize_mode, w, h)
        return self._maps[(w, h)]

    def client_map(self, w: int, h: int) -> np.ndarray:
        """The map as the extension returns it (inpaint: alpha = 255 - mask / 2)."""
        m = self.map_for(w, h)
        if m.shape[2] == 4:
            m = m.copy()
            m[:, :, 3] = 255 - m[:, :, 3] // 2
        return m

    def set_size(self, w: int, h: int, device: torch.device, dtype: torch.dtype) -> None:
        fitted = self.map_for(w, h).astype(np.float32) / 255.0
        if fitted.shape[2] == 4:  # the inpaint ControlNet sees the masked area as -1
            m = (fitted[:, :, 3:] > 0.5).astype(np.float32)
            fitted = fitted[:, :, :3] * (1.0 - m) - m
        self.hint = torch.from_numpy(np.ascontiguousarray(fitted)).permute(2, 0, 1)[None].to(device, dtype)


class ControlHook:
    """What ``sample()`` calls before each UNet call: the residuals of the units active now."""

    def __init__(self, controls: list[Control], phase: str | None = None) -> None:
        # hr_option: with hires fix, a unit may take part in one pass only ("low" or "high").
        skip = {"low": "High res only", "high": "Low res only"}.get(phase or "")
        self.controls = [c for c in controls if c.unit.hr_option != skip and c.unit.weight > 0]

    def __bool__(self) -> bool:
        return bool(self.controls)

    def __call__(self, x: torch.Tensor, t: Any, context: torch.Tensor, added: dict[str, Any] | None, pct: float,
                 uncond_rows: int) -> dict[str, Any]:
        down: list[torch.Tensor] | None = None
        mid: torch.Tensor | None = None
        rows = x.shape[0]
        for c in self.controls:
            u = c.unit
            if not (u.guidance_start <= pct <= u.guidance_end):
                continue
            hint = c.hint.expand(rows, -1, -1, -1)
            with torch.inference_mode():
                d, m = c.model(x, t, encoder_hidden_states=context, controlnet_cond=hint, conditioning_scale=1.0,
                               added_cond_kwargs=added, return_dict=False)
            res = [*d, m]
            if u.control_mode == "Balanced":
                scales = [u.weight] * len(res)
            else:  # soft injection; SDXL's 10 residuals take the first 10 factors (the extension's list, cut)
                scales = [u.weight * f for f in SOFT[: len(res)]]
            if u.control_mode == "ControlNet is more important" and uncond_rows:
                mark = torch.ones(rows, 1, 1, 1, device=x.device, dtype=x.dtype)
                mark[:uncond_rows] = 0
                res = [r * mark for r in res]
            res = [r * s for r, s in zip(res, scales, strict=True)]
            if down is None:
                down, mid = res[:-1], res[-1]
            else:
                down = [a + b for a, b in zip(down, res[:-1], strict=True)]
                mid = mid + res[-1]
        if down is None:
            return {}
        return {"down_block_additional_residuals": tuple(down), "mid_block_additional_residual": mid}


def infotext_value(unit: ControlNetUnit, processor_res: Any, a: Any, b: Any) -> str:
    """The extension's serialised unit (A1111 quotes it, since it holds ", " and ":")."""
    fields = [("Module", unit.module), ("Model", unit.model), ("Weight", unit.weight), ("Resize Mode", unit.resize_mode),
              ("Processor Res", processor_res), ("Threshold A", a), ("Threshold B", b),
              ("Guidance Start", unit.guidance_start), ("Guidance End", unit.guidance_end),
              ("Pixel Perfect", unit.pixel_perfect), ("Control Mode", unit.control_mode)]
    return ", ".join(f"{k}: {'' if (',' in str(v) or ':' in str(v)) else v}" for k, v in fields)


def parse_infotext_units(params: dict[str, str]) -> list[dict[str, Any]]:
    """Units from parsed infotext keys ``ControlNet N`` (enabled, as the extension pastes them)."""
    out = []
    for key in sorted((k for k in params if k.startswith("ControlNet ")), key=lambda k: int(k.split()[-1]) if k.split()[-1].isdigit() else 0):
        unit: dict[str, Any] = {"enabled": True}
        for item in str(params[key]).split(","):
            name, sep, value = item.strip().partition(": ")
            if not sep:
                continue
            field = name.strip().lower().replace(" ", "_")
            unit[field] = _value(value.strip())
        out.append(unit)
    return out


def _value(text: str) -> Any:
    if text in ("True", "False"):
        return text == "True"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text
