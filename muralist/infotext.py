"""A1111 "infotext": the generation-parameters text stored in every image.

Layout (as A1111's ``create_infotext`` writes it, so A1111's PNG Info tab and its
``/sdapi/v1/png-info`` read our images back)::

    <prompt, may span lines>
    Negative prompt: <negative prompt, may span lines>      (only when non-empty)
    Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, ...

PNGs carry it in a text chunk named "parameters"; A1111's JPEG/WEBP files carry it in the
EXIF UserComment.
"""

from __future__ import annotations

import io
import json
import os
import re
import struct
from collections.abc import Mapping
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo

from .engine.samplers import SAMPLERS, SCHEDULES
from .errors import MuralistError

# Fixed keys in the order of A1111's create_infotext (v1.10). Keys not listed here are
# "extra generation params" (Hires upscale, Lora hashes, NGMS, Mask blur...): they follow in
# the order the caller gives them, and INFOTEXT_LAST closes the line.
INFOTEXT_ORDER: tuple[str, ...] = (
    "Steps",
    "Sampler",
    "Schedule type",
    "CFG scale",
    "Image CFG scale",
    "Seed",
    "Face restoration",
    "Size",
    "Model hash",
    "Model",
    "FP8 weight",
    "Cache FP16 weight for LoRA",
    "VAE hash",
    "VAE",
    "Variation seed",
    "Variation seed strength",
    "Seed resize from",
    "Denoising strength",
    "Conditional mask weight",
    "Clip skip",
    "ENSD",
    "Token merging ratio",
    "Token merging ratio hr",
    "Init image hash",
    "RNG",
    "Tiling",
)
INFOTEXT_LAST: tuple[str, ...] = ("Version", "User")

PNG_TEXT_KEY = "parameters"

# A1111 v1.10 sampler facts that decide which keys its infotext holds, from the one sampler table
# (``engine/samplers.py``: sd_samplers_kdiffusion.py, sd_samplers_timesteps.py, sd_schedulers.py).
# The schedule type a sampler uses for "Automatic"; samplers not listed use the model's own sigmas,
# and A1111 then writes "Schedule type: Automatic".
A1111_DEFAULT_SCHEDULE: dict[str, str] = {s.name: SCHEDULES[s.default_schedule][0] for s in SAMPLERS
                                          if s.is_k and s.default_schedule != "uniform"}
# Samplers on timesteps ignore the schedule type; A1111 writes the one that was asked for.
TIMESTEP_SAMPLERS = frozenset(s.name for s in SAMPLERS if not s.is_k)
# Samplers whose k-diffusion function takes eta ("Eta" when it is not 1); DDIM's is "Eta DDIM" (default 0).
ETA_SAMPLERS = frozenset(s.name for s in SAMPLERS if s.eta)
DDIM_ETA_SAMPLERS = frozenset({"DDIM"})
# sampler_extra_params: the samplers given s_churn/s_tmin/s_tmax, and those given s_noise.
CHURN_SAMPLERS = frozenset(s.name for s in SAMPLERS if "s_churn" in s.extra)
S_NOISE_SAMPLERS = frozenset(s.name for s in SAMPLERS if "s_noise" in s.extra)
# The samplers whose noise ENSD changes ("uses_ensd"); only while eta is not 0.
ENSD_SAMPLERS = frozenset(s.name for s in SAMPLERS if s.uses_ensd)
BETA_DIST = (0.6, 0.6)  # A1111's beta_dist_alpha/beta_dist_beta defaults, written with the Beta schedule

# A1111's parameter regex (infotext_utils.re_param), kept verbatim: what it cannot match,
# A1111 cannot read back.
A1111_PARAM_RE = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_SIZE_RE = re.compile(r"^(\d+)x(\d+)$")
_NEGATIVE_PREFIX = "Negative prompt:"

_EXIF_IFD = 0x8769
_USER_COMMENT = 0x9286
_PNG_MODES = {"1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"}


def quote(value: object) -> str:
    """A value as A1111 writes it: as is, or JSON-quoted if it holds a comma, colon or newline."""
    text = str(value)
    if "," not in text and ":" not in text and "\n" not in text:
        return text
    try:
        # A1111 dumps the value itself (not its str), with non-ASCII left readable.
        return json.dumps(value, ensure_ascii=False)
    except TypeError:
        return json.dumps(text, ensure_ascii=False)


def _unquote(text: str) -> str:
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, str) else text


def _ordered(params: Mapping[str, object]) -> list[tuple[str, object]]:
    fixed = set(INFOTEXT_ORDER) | set(INFOTEXT_LAST)
    keys = [k for k in INFOTEXT_ORDER if k in params]
    keys += [k for k in params if k not in fixed]
    keys += [k for k in INFOTEXT_LAST if k in params]
    return [(k, params[k]) for k in keys if params[k] is not None]


def build_infotext(prompt: str, negative_prompt: str, params: Mapping[str, object]) -> str:
    """The infotext A1111 would write for these values; keys whose value is None are left out.

    ``params["Size"]`` is expected as "WxH". A key whose value equals the key itself is
    written alone, as A1111 does for flag-like extra params.
    """
    parts = [k if k == v else f"{k}: {quote(v)}" for k, v in _ordered(params)]
    negative = f"\n{_NEGATIVE_PREFIX} {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{', '.join(parts)}".strip()


def _append_line(text: str, line: str) -> str:
    # A1111's accumulation: empty lines before the first text are dropped, later ones kept.
    return line if text == "" else f"{text}\n{line}"


def parse_infotext(text: str) -> dict[str, str]:
    """Parse an infotext like A1111's parse_generation_parameters (without its UI defaults).

    Returns "Prompt", "Negative prompt" and each parameter's unquoted value. A "WxH" value
    is split into "<key>-1" and "<key>-2" (so "Size" becomes "Size-1"/"Size-2"), as A1111
    does. The last line is read as parameters only if the regex finds 3 or more in it.
    """
    *lines, last = text.replace("\r\n", "\n").strip().split("\n")
    if len(A1111_PARAM_RE.findall(last)) < 3:
        lines.append(last)
        last = ""

    prompt = negative = ""
    in_negative = False
    for raw in lines:
        line = raw.strip()
        if line.startswith(_NEGATIVE_PREFIX):
            in_negative = True
            line = line[len(_NEGATIVE_PREFIX) :].strip()
        if in_negative:
            negative = _append_line(negative, line)
        else:
            prompt = _append_line(prompt, line)

    result = {"Prompt": prompt, "Negative prompt": negative}
    for key, value in A1111_PARAM_RE.findall(last):
        if not value:
            continue  # A1111 fails on an empty value and drops the key
        if value[0] == '"' and value[-1] == '"':
            value = _unquote(value)
        size = _SIZE_RE.match(value)
        if size:
            result[f"{key}-1"], result[f"{key}-2"] = size.groups()
        else:
            result[key] = value
    return result


def uses_ensd(sampler: str, eta: float | None) -> bool:
    """Whether A1111 writes "ENSD" for this sampler (eta None: its default, 1)."""
    return sampler in ENSD_SAMPLERS and eta != 0


def sampler_params(
    sampler: str,
    schedule: str,
    *,
    eta: float | None = None,
    s_churn: float | None = None,
    s_tmin: float | None = None,
    s_tmax: float | None = None,
    s_noise: float | None = None,
    sgm_noise_multiplier: bool = False,
    txt2img: bool = True,
) -> dict[str, object]:
    """The sampler-dependent keys A1111 v1.10 writes, from the sampler's name and the schedule type's
    label as requested ("Automatic" included). None: the option's default, never written.

    Float values stay floats: A1111 writes them with Python's str ("7.0", "0.5").
    """
    params: dict[str, object] = {}
    if sampler in TIMESTEP_SAMPLERS:
        params["Schedule type"] = schedule
        if sampler in DDIM_ETA_SAMPLERS and eta not in (None, 0.0):
            params["Eta DDIM"] = eta
        return params
    used = A1111_DEFAULT_SCHEDULE.get(sampler, "Automatic") if schedule == "Automatic" else schedule
    params["Schedule type"] = used
    if used == "Beta":
        params["Beta schedule alpha"], params["Beta schedule beta"] = BETA_DIST
    if sampler in ETA_SAMPLERS and eta not in (None, 1.0):
        params["Eta"] = eta
    if sampler in CHURN_SAMPLERS:
        params["Sigma churn"] = s_churn or None
        params["Sigma tmin"] = s_tmin or None
        params["Sigma tmax"] = s_tmax or None  # 0 means no limit (infinity), A1111's default
    if sampler in S_NOISE_SAMPLERS and s_noise not in (None, 1.0):
        params["Sigma noise"] = s_noise
    if sgm_noise_multiplier and txt2img:  # A1111 scales only txt2img's initial noise
        params["SGM noise multiplier"] = True
    return {k: v for k, v in params.items() if v is not None}


def _number(value: str, kind: type) -> object:
    number = float(value)
    return int(number) if kind is int else number


# Infotext key -> request field and type, as A1111's paste fields and infotext_to_setting_name_mapping.
_REQUEST_FIELDS: dict[str, tuple[str, type]] = {
    "Steps": ("steps", int), "Sampler": ("sampler_name", str), "Schedule type": ("scheduler", str),
    "CFG scale": ("cfg_scale", float), "Seed": ("seed", int), "Size-1": ("width", int), "Size-2": ("height", int),
    "Variation seed": ("subseed", int), "Variation seed strength": ("subseed_strength", float),
    "Seed resize from-1": ("seed_resize_from_w", int), "Seed resize from-2": ("seed_resize_from_h", int),
    "Denoising strength": ("denoising_strength", float), "Clip skip": ("clip_skip", int),
    "ENSD": ("eta_noise_seed_delta", int), "RNG": ("randn_source", str), "Tiling": ("tiling", bool),
    "Eta": ("eta", float), "Eta DDIM": ("eta", float), "Sigma churn": ("s_churn", float),
    "Sigma tmin": ("s_tmin", float), "Sigma tmax": ("s_tmax", float), "Sigma noise": ("s_noise", float),
    "Schedule min sigma": ("sigma_min", float), "Schedule max sigma": ("sigma_max", float), "Schedule rho": ("rho", float),
    "Discard penultimate sigma": ("always_discard_next_to_last_sigma", bool),
    "Beta schedule alpha": ("beta_dist_alpha", float), "Beta schedule beta": ("beta_dist_beta", float),
    "SGM noise multiplier": ("sgm_noise_multiplier", bool), "Pad conds": ("pad_cond_uncond", bool),
    "Emphasis": ("emphasis", str), "Model": ("model", str), "VAE": ("vae", str),
    "Hires upscale": ("hr_scale", float), "Hires resize-1": ("hr_resize_x", int), "Hires resize-2": ("hr_resize_y", int),
    "Hires steps": ("hr_second_pass_steps", int), "Hires upscaler": ("hr_upscaler", str),
    "Hires sampler": ("hr_sampler_name", str), "Hires schedule type": ("hr_scheduler", str),
    "Hires prompt": ("hr_prompt", str), "Hires negative prompt": ("hr_negative_prompt", str),
}
# What a missing key means to A1111's paste (parse_generation_parameters' defaults).
_MISSING: dict[str, object] = {
    "scheduler": "Automatic", "clip_skip": 1, "randn_source": "GPU", "emphasis": "Original", "subseed_strength": 0.0,
}


def request_fields(params: Mapping[str, str]) -> dict[str, object]:
    """Request fields from a parsed infotext (``parse_infotext``), read the way A1111 pastes them:
    a missing "Schedule type" is Automatic, a missing "RNG" is GPU, a missing "Clip skip" is 1, and
    hires fix is on when "Denoising strength" comes with a hires key. Unknown keys are left out."""
    fields: dict[str, object] = {"prompt": params.get("Prompt", ""), "negative_prompt": params.get("Negative prompt", "")}
    fields.update(_MISSING)
    for key, (name, kind) in _REQUEST_FIELDS.items():
        value = params.get(key)
        if value is None:
            continue
        if kind is bool:
            fields[name] = value.strip().lower() == "true"
        elif kind is str:
            fields[name] = value
        else:
            try:
                fields[name] = _number(value, kind)
            except ValueError:
                continue  # A1111 keeps the UI's value when a number does not parse
    fields["enable_hr"] = "Denoising strength" in params and any(
        k in params for k in ("Hires upscale", "Hires upscaler", "Hires resize-1"))
    return fields


def _png_ready(image: Image.Image) -> Image.Image:
    if image.mode in _PNG_MODES:
        return image
    has_alpha = "A" in image.mode or "transparency" in image.info
    return image.convert("RGBA" if has_alpha else "RGB")


def png_bytes(image: Image.Image, infotext: str) -> bytes:
    """The image as PNG with ``infotext`` in a "parameters" text chunk, as A1111 saves it."""
    info = PngInfo()
    # add_text picks tEXt for Latin-1 text and iTXt otherwise, exactly what A1111 gets.
    info.add_text(PNG_TEXT_KEY, infotext)
    buffer = io.BytesIO()
    _png_ready(image).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def _exif_with_comment(text: str) -> bytes:
    """A minimal big-endian EXIF block: IFD0 pointing to an Exif IFD holding one UserComment of
    type UNDEFINED (Pillow would type it BYTE, which piexif, A1111's reader, cannot decode)."""
    comment = b"UNICODE\x00" + text.encode("utf-16-be")
    ifd0 = struct.pack(">HHHLLL", 1, 0x8769, 4, 1, 26, 0)  # one entry: ExifIFD (LONG) at offset 26
    exif_ifd = struct.pack(">HHHLLL", 1, _USER_COMMENT, 7, len(comment), 44, 0)  # UNDEFINED, data at 44
    return b"Exif\x00\x00" + b"MM\x00\x2a" + struct.pack(">L", 8) + ifd0 + exif_ifd + comment


IMAGE_TYPES = {"png": "image/png", "jpg": "image/jpeg", "webp": "image/webp"}


def image_bytes(image: Image.Image, infotext: str, fmt: str = "png", quality: int = 80, lossless: bool = False) -> bytes:
    """The image in A1111's ``samples_format``: PNG with a "parameters" chunk, or JPEG/WEBP with the
    infotext in the EXIF UserComment, written as A1111's writer (piexif) does: big-endian EXIF,
    "UNICODE" prefix, UTF-16BE text, so A1111 and muralist read it back."""
    if fmt == "png":
        return png_bytes(image, infotext)
    exif = _exif_with_comment(infotext)
    buffer = io.BytesIO()
    if fmt == "jpg":
        # JPEG has no alpha channel.
        image.convert("RGB").save(buffer, format="JPEG", quality=quality, exif=exif)
    elif fmt == "webp":
        image.save(buffer, format="WEBP", quality=quality, lossless=lossless, exif=exif)
    else:
        raise MuralistError(f"samples_format: {fmt!r} is not png, jpg or webp")
    return buffer.getvalue()


def save_png(image: Image.Image, path: str | os.PathLike[str], infotext: str) -> Path:
    """Write ``png_bytes`` to ``path`` (parents created) and return the path.

    The file is written under a temporary name and renamed, so a reader (gallery, HTTP
    download, folder watcher) never sees a half-written PNG.
    """
    from .paths import write_atomic

    return write_atomic(path, png_bytes(image, infotext))


def _decode_user_comment(raw: bytes, little_endian: bool) -> str:
    prefix, body = raw[:8], raw[8:]
    if prefix == b"UNICODE\x00":
        # piexif (A1111's writer) emits UTF-16BE inside its big-endian EXIF; other tools use
        # the EXIF block's own byte order, which for piexif is the same thing.
        text = body.decode("utf-16-le" if little_endian else "utf-16-be", errors="replace")
    elif prefix == b"ASCII\x00\x00\x00":
        text = body.decode("ascii", errors="replace")
    elif prefix == b"JIS\x00\x00\x00\x00\x00":
        text = body.decode("shift_jis", errors="replace")
    else:
        # A1111's fallback for undefined/unknown prefixes: the whole value as lenient UTF-8.
        text = raw.decode("utf-8", errors="ignore").lstrip("\x00")
    return text.rstrip("\x00")


def _exif_user_comment(image: Image.Image) -> str | None:
    block = image.info.get("exif")
    if not isinstance(block, bytes | bytearray):
        return None
    tiff = bytes(block[6:] if block.startswith(b"Exif\x00\x00") else block)
    try:
        raw = image.getexif().get_ifd(_EXIF_IFD).get(_USER_COMMENT)
    except (OSError, SyntaxError, ValueError, KeyError, TypeError, struct.error):
        return None  # a broken EXIF block must not make the image unreadable
    if isinstance(raw, str):
        return raw or None
    if not raw:
        return None
    return _decode_user_comment(bytes(raw), little_endian=tiff.startswith(b"II")) or None


def _infotext_of(image: Image.Image) -> str | None:
    text = image.info.get(PNG_TEXT_KEY)
    if text is None and image.format == "PNG":
        # Text chunks placed after the image data only appear once the PNG is loaded.
        try:
            image.load()
        except (OSError, SyntaxError, ValueError):
            pass
        text = image.info.get(PNG_TEXT_KEY)

    # A1111's precedence: a non-empty EXIF UserComment wins; else a GIF comment.
    if "exif" in image.info:
        comment = _exif_user_comment(image)
        if comment:
            text = comment
    elif "comment" in image.info:
        comment = image.info["comment"]
        text = comment.decode("utf-8", errors="ignore") if isinstance(comment, bytes) else comment
    return None if text is None else str(text)


def read_infotext(source: str | os.PathLike[str] | bytes | Image.Image) -> str | None:
    """The infotext stored in an image (PNG "parameters", or JPEG/WEBP EXIF UserComment).

    ``source`` is a path, the file's bytes, or an open PIL image. Returns None when the
    image carries none; raises MuralistError when the source is not an image.
    """
    if isinstance(source, Image.Image):
        return _infotext_of(source)

    if isinstance(source, bytes | bytearray | memoryview):
        name = "the uploaded data"
        stream: io.BytesIO | Path = io.BytesIO(bytes(source))
    else:
        stream = Path(source)
        name = str(stream)
        if not stream.is_file():
            raise MuralistError(f"{name} does not exist or is not a file")

    try:
        image = Image.open(stream)
    except Image.DecompressionBombError as exc:
        raise MuralistError(f"{name} is too large an image to read safely: {exc}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, struct.error) as exc:
        raise MuralistError(f"{name} is not an image Pillow can read (PNG, JPEG, WEBP...): {exc}") from None
    with image:
        return _infotext_of(image)
