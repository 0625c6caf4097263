"""ControlNet preprocessors that need no weights, with sd-webui-controlnet's names, sliders and rules.

Each takes an RGB uint8 image and returns the detected map (RGB uint8, white lines on black unless
the module says otherwise) at its processing resolution; sizing it to the generation happens in
``apply``. Preprocessors that need annotator weights are named so a request for one gets a 422
saying which file is missing, instead of a silently different image.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import InvalidRequestError

RESOLUTION = {"name": "Resolution", "value": 512, "min": 64, "max": 2048, "step": 8}


@dataclass(frozen=True)
class Slider:
    name: str
    value: float
    min: float
    max: float
    step: float = 0.01

    def json(self) -> dict[str, Any]:
        return {"name": self.name, "value": self.value, "min": self.min, "max": self.max, "step": self.step}


@dataclass(frozen=True)
class Preprocessor:
    name: str
    label: str
    run: Callable[[np.ndarray, int, float, float, int], np.ndarray] | None  # (img, res, a, b, seed); None: needs weights
    tags: tuple[str, ...] = ()
    sliders: tuple[Slider, ...] = ()
    resolution: bool = True  # shows the Resolution slider
    weights: str = ""  # annotator file it needs, for the error message
    priority: int = 0
    mask: bool = False  # takes a mask (inpaint): the map is RGBA, alpha = area to repaint

    def module_detail(self) -> dict[str, Any]:
        return {"model_free": False, "sliders": ([RESOLUTION] if self.resolution else []) + [s.json() for s in self.sliders]}

    def bounded(self, res: float, a: float, b: float) -> tuple[int | float, float, float]:
        """processor_res and thresholds with the extension's rule: out of a slider's range (-1 included)
        means that slider's default."""
        out_res: int | float = int(res) if RESOLUTION["min"] <= res <= RESOLUTION["max"] else RESOLUTION["value"]
        if not self.resolution:
            out_res = 0.5 if not (0 <= res <= 1) else res
        vals = []
        for i, v in enumerate((a, b)):
            s = self.sliders[i] if i < len(self.sliders) else Slider("", 0.5, 0, 1)
            vals.append(v if s.min <= v <= s.max else s.value)
        return out_res, vals[0], vals[1]


def hwc3(img: np.ndarray) -> np.ndarray:
    """Any uint8 image as 3-channel RGB (gray repeated; RGBA composited over white)."""
    if img.ndim == 2:
        img = img[:, :, None]
    c = img.shape[2]
    if c == 3:
        return img
    if c == 1:
        return np.concatenate([img] * 3, axis=2)
    color, alpha = img[:, :, :3].astype(np.float32), img[:, :, 3:4].astype(np.float32) / 255.0
    return (color * alpha + 255.0 * (1.0 - alpha)).clip(0, 255).astype(np.uint8)


def _resize_with_pad(img: np.ndarray, res: int) -> tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]]:
    """The extension's common step: shortest side to ``res`` (cubic up, area down), edge-pad to
    multiples of 64; returns the padded image and the crop that undoes the padding."""
    import cv2

    img = hwc3(img)
    h, w = img.shape[:2]
    k = float(res) / min(h, w)
    ht, wt = int(np.round(h * k)), int(np.round(w * k))
    img = cv2.resize(img, (wt, ht), interpolation=cv2.INTER_CUBIC if k > 1 else cv2.INTER_AREA)
    hp, wp = math.ceil(ht / 64) * 64, math.ceil(wt / 64) * 64
    padded = np.pad(img, [[0, hp - ht], [0, wp - wt], [0, 0]], mode="edge")
    return padded, lambda x: x[:ht, :wt]


def _gray3(x: np.ndarray) -> np.ndarray:
    return hwc3(x.astype(np.uint8))


def _none(img: np.ndarray, res: int, a: float, b: float, seed: int) -> np.ndarray:
    return hwc3(img)


def _invert(img: np.ndarray, res: int, a: float, b: float, seed: int) -> np.ndarray:
    return 255 - hwc3(img)


def _canny(img: np.ndarray, res: int, a: float, b: float, seed: int) -> np.ndarray:
    import cv2

    padded, crop = _resize_with_pad(img, res)
    return crop(_gray3(cv2.Canny(padded, int(a), int(b))))


def _threshold(img: np.ndarray, res: int, a: float, b: float, seed: int) -> np.ndarray:
    padded, crop = _resize_with_pad(img, res)
    on = padded.min(axis=2) > a
    return crop(_gray3(np.where(on, 255, 0)))


def _scribble_xdog(img: np.ndarray, res: int, a: float, b: float, seed: int) -> np.ndarray:
    import cv2

    padded, crop = _resize_with_pad(img, res)
    f = padded.astype(np.float32)
    dog = (255.0 - np.min(cv2.GaussianBlur(f, (0, 0), 5.0) - cv2.GaussianBlur(f, (0, 0), 0.5), axis=2)).clip(0, 255).astype(np.uint8)
    # The extension computes 2 * (255 - dog) in uint8, so it wraps around; kept for identical maps.
    doubled = ((255 - dog).astype(np.uint8) * np.uint8(2)).astype(np.uint8)
    return crop(_gray3(np.where(doubled > a, 255, 0)))


def _blur_gaussian(img: np.ndarray, res: int, a: float, b: float, seed: int) -> np.ndarray:
    import cv2

    padded, crop = _resize_with_pad(img, res)
    return cv2.GaussianBlur(crop(padded), (0, 0), float(a))


def _tile_resample(img: np.ndarray, res: int, a: float, b: float, seed: int) -> np.ndarray:
    import cv2

    img = hwc3(img)
    if a < 1.1:
        return img
    h, w = img.shape[:2]
    return cv2.resize(img, (int(w / a), int(h / a)), interpolation=cv2.INTER_AREA)


def _color(img: np.ndarray, res: int, a: float, b: float, seed: int) -> np.ndarray:
    import cv2

    img = hwc3(img)
    h, w = img.shape[:2]
    k = float(res) / min(h, w)
    img = cv2.resize(img, (int(np.round(w * k)), int(np.round(h * k))), interpolation=cv2.INTER_AREA)
    h, w = img.shape[:2]
    small = cv2.resize(img, (max(1, w // 64), max(1, h // 64)), interpolation=cv2.INTER_CUBIC)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST)


def _recolor(channel: str) -> Callable[[np.ndarray, int, float, float, int], np.ndarray]:
    def run(img: np.ndarray, res: int, a: float, b: float, seed: int) -> np.ndarray:
        import cv2

        img = hwc3(img)
        if channel == "luminance":
            # The extension converts RGB data with OpenCV's BGR->LAB (R and B swapped); kept for identical maps.
            value = cv2.cvtColor(img, cv2.COLOR_BGR2LAB)[:, :, 0]
        else:
            value = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)[:, :, 2]
        out = (np.power(value.astype(np.float32) / 255.0, float(a)) * 255.0).clip(0, 255)
        return _gray3(out)

    return run


def _lineart_standard(img: np.ndarray, res: int, a: float, b: float, seed: int) -> np.ndarray:
    import cv2

    padded, crop = _resize_with_pad(img, res)
    x = padded.astype(np.float32)
    g = cv2.GaussianBlur(x, (0, 0), 6.0)
    intensity = np.min(g - x, axis=2).clip(0, 255)
    bright = intensity[intensity > 8]
    intensity /= max(16.0, float(np.median(bright)) if bright.size else 16.0)
    intensity *= 127
    return crop(_gray3(intensity.clip(0, 255)))


def _shuffle(img: np.ndarray, res: int, a: float, b: float, seed: int) -> np.ndarray:
    import cv2

    padded, crop = _resize_with_pad(img, res)
    img = crop(padded)
    h, w = img.shape[:2]
    rng = np.random.RandomState(seed & 0xFFFFFFFF)

    def noise() -> np.ndarray:
        n = rng.uniform(0, 1, ((h // 256) + 2, (w // 256) + 2)).astype(np.float32)
        n = cv2.resize(n, (w + 512, h + 512), interpolation=cv2.INTER_CUBIC)[256:256 + h, 256:256 + w]
        return (n - n.min()) / max(float(n.max() - n.min()), 1e-8)

    fx, fy = noise() * (w - 1), noise() * (h - 1)
    return cv2.remap(img, fx.astype(np.float32), fy.astype(np.float32), cv2.INTER_LINEAR)


PREPROCESSORS: list[Preprocessor] = [
    Preprocessor("none", "none", _none, ()),
    Preprocessor("invert", "invert (from white bg & black line)", _invert, ("Canny", "Lineart", "Scribble/Sketch", "MLSD"),
                 resolution=False, priority=0),
    Preprocessor("canny", "canny", _canny, ("Canny",),
                 (Slider("Low Threshold", 100, 1, 255, 1), Slider("High Threshold", 200, 1, 255, 1)), priority=100),
    Preprocessor("threshold", "threshold", _threshold, ("Scribble/Sketch",), (Slider("Binarization Threshold", 127, 0, 255),)),
    Preprocessor("scribble_xdog", "scribble_xdog", _scribble_xdog, ("Scribble/Sketch",), (Slider("XDoG Threshold", 32, 1, 64),)),
    Preprocessor("blur_gaussian", "blur_gaussian", _blur_gaussian, ("Tile",), (Slider("Sigma", 9.0, 0.01, 64.0),)),
    Preprocessor("tile_resample", "tile_resample", _tile_resample, ("Tile",), (Slider("Down Sampling Rate", 1.0, 1.0, 8.0),),
                 priority=100),
    Preprocessor("tile_colorfix", "tile_colorfix", _none, ("Tile",), (Slider("Variation", 8.0, 3.0, 32.0, 1),)),
    Preprocessor("tile_colorfix+sharp", "tile_colorfix+sharp", _none, ("Tile",),
                 (Slider("Variation", 8, 3, 32, 1), Slider("Sharpness", 1.0, 0.0, 2.0))),
    Preprocessor("color", "t2ia_color_grid", _color, ("T2I-Adapter",)),
    Preprocessor("recolor_luminance", "recolor_luminance", _recolor("luminance"), ("Recolor",),
                 (Slider("Gamma Correction", 1.0, 0.1, 2.0, 0.001),), priority=100),
    Preprocessor("recolor_intensity", "recolor_intensity", _recolor("intensity"), ("Recolor",),
                 (Slider("Gamma Correction", 1.0, 0.1, 2.0, 0.001),)),
    Preprocessor("lineart_standard", "lineart_standard (from white bg & black line)", _lineart_standard, ("Lineart",)),
    Preprocessor("shuffle", "shuffle", _shuffle, ("Shuffle",), resolution=False, priority=100),
    # The inpaint ControlNet's input: the image with the masked area marked (see apply.Control.set_size).
    Preprocessor("inpaint", "inpaint_global_harmonious", _none, ("Inpaint",), resolution=False, mask=True, priority=100),
    Preprocessor("inpaint_only", "inpaint_only", _none, ("Inpaint",), resolution=False, mask=True),
    # Annotators with weights (A1111's downloads folder names); not bundled, never fetched.
    Preprocessor("openpose", "openpose", None, ("OpenPose",), weights="openpose/body_pose_model.pth", priority=100),
    Preprocessor("depth", "depth_midas", None, ("Depth",), weights="midas/dpt_hybrid-midas-501f0c75.pt", priority=100),
    Preprocessor("lineart", "lineart_realistic", None, ("Lineart",), weights="lineart/sk_model.pth", priority=100),
    Preprocessor("lineart_anime", "lineart_anime", None, ("Lineart",), weights="lineart_anime/netG.pth"),
    Preprocessor("softedge_hed", "softedge_hed", None, ("SoftEdge",), weights="hed/ControlNetHED.pth", priority=100),
    Preprocessor("softedge_pidinet", "softedge_pidinet", None, ("SoftEdge",), weights="pidinet/table5_pidinet.pth"),
    Preprocessor("mlsd", "mlsd", None, ("MLSD",), (Slider("MLSD Value Threshold", 0.1, 0.01, 2.0), Slider("MLSD Distance Threshold", 0.1, 0.01, 20.0)),
                 weights="mlsd/mlsd_large_512_fp32.pth", priority=100),
    Preprocessor("normal_bae", "normal_bae", None, ("NormalMap",), weights="normal_bae/scannet.pt", priority=100),
    Preprocessor("seg_ofade20k", "seg_ofade20k", None, ("Segmentation",), weights="oneformer/250_16_swin_l_oneformer_ade20k_160k.pth"),
]
BY_NAME = {p.name: p for p in PREPROCESSORS}
BY_LABEL = {p.label: p for p in PREPROCESSORS}


def find(name: str) -> Preprocessor:
    """By label first, then internal name (the extension's order); names are case-sensitive, as there."""
    pre = BY_LABEL.get(name) or BY_NAME.get(name)
    if pre is None:
        import difflib

        near = difflib.get_close_matches(name, [*BY_NAME, *BY_LABEL], n=3, cutoff=0.5)
        raise InvalidRequestError(f"ControlNet module {name!r} not found" + (f"; close names: {', '.join(near)}" if near else
                                  f"; available: {', '.join(BY_NAME)}"))
    return pre


def run(pre: Preprocessor, img: np.ndarray, res: int, a: float, b: float, seed: int = 0, annotator_dir: Any = None) -> np.ndarray:
    if pre.run is None:
        where = f"{annotator_dir}/{pre.weights}" if annotator_dir else pre.weights
        raise InvalidRequestError(
            f"ControlNet module {pre.name!r} needs annotator weights ({where}), which muralist does not download; "
            f"put the file there, or send an already-processed control image with module 'none'")
    return pre.run(img, int(res), float(a), float(b), seed)


def pixel_perfect_resolution(raw_h: int, raw_w: int, target_h: int, target_w: int, resize_mode: str) -> int:
    """The extension's pixel-perfect processor resolution for an input of raw_h x raw_w."""
    k0, k1 = target_h / raw_h, target_w / raw_w
    k = min(k0, k1) if resize_mode == "Resize and Fill" else max(k0, k1)
    return int(np.round(k * min(raw_h, raw_w)))


def module_list(alias_names: bool = False) -> tuple[list[str], dict[str, Any]]:
    """``/controlnet/module_list``: "none" first, then by priority and label, descending (the extension's order)."""
    rest = sorted((p for p in PREPROCESSORS if p.name != "none"), key=lambda p: (f"{p.priority:05d}", p.label), reverse=True)
    ordered = [BY_NAME["none"], *rest]
    key = (lambda p: p.label) if alias_names else (lambda p: p.name)
    return [key(p) for p in ordered], {key(p): p.module_detail() for p in ordered}


def control_types(models: list[str]) -> dict[str, Any]:
    """``/controlnet/control_types``: "All", then every tag, each with its modules and matching models."""
    aliases = {"tile": ("blur",), "segmentation": ("seg",), "normalmap": ("normal",), "scribble/sketch": ("scribble", "sketch"),
               "softedge": ("softedge", "hed", "pidi"), "t2i-adapter": ("t2iadapter", "t2i"), "recolor": ("recolor",)}
    out: dict[str, Any] = {"All": {"module_list": [p.label for p in PREPROCESSORS], "model_list": ["None", *models],
                                   "default_option": "none", "default_model": "None"}}
    for tag in sorted({t for p in PREPROCESSORS for t in p.tags}):
        mods = ["none", *sorted(p.label for p in PREPROCESSORS if tag in p.tags)]
        words = (tag.lower(), *aliases.get(tag.lower(), ()))
        matching = [m for m in models if any(w in m.lower() for w in words)]
        default = next((m for m in matching if "11" in m.split("[")[0]), matching[0] if matching else "None")
        out[tag] = {"module_list": mods, "model_list": ["None", *matching], "default_option": mods[1] if len(mods) > 1 else "none",
                    "default_model": default}
    return out


@dataclass
class Detected:
    """A unit's detected map and the parameters it was made with (for the infotext)."""

    image: np.ndarray
    processor_res: int | float
    threshold_a: float
    threshold_b: float
    extra: dict[str, Any] = field(default_factory=dict)
