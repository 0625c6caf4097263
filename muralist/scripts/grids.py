"""A1111's "X/Y/Z plot" and "Prompt matrix" scripts, on top of ``Engine.generate``.

Both take one request, turn it into many cell requests, generate them one after another and
draw a labelled grid, as A1111's ``scripts/xyz_grid.py`` and ``scripts/prompt_matrix.py`` do:

* axis values use A1111's syntax: CSV lists (quotes for values holding commas), integer and
  float ranges ``1-5``, ``1-10 (+3)``, ``10-1 (-3)``, ``1-10 [4]`` (a count);
* every value and every cell is validated before the first image is generated, so a typo in
  the last value cannot waste a long job;
* "fixed seeds": a random seed (-1) is drawn once for the whole plot, so cells differ only in
  what the axes change;
* grids follow A1111's layout: column labels on top, row labels on the left (3/4 of a cell
  wide), font size (cell width + height) / 25, white background.

The individual images are saved by the engine (with their own infotexts); grids are saved as
``xyz_grid-NNNN.png`` / ``prompt_matrix-NNNN.png`` carrying the first cell's infotext.
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image, ImageDraw, ImageFont
from pydantic import ValidationError

from ..engine import samplers
from ..engine.seeds import random_seed, resolve_seed
from ..engine.txt2img import Interrupted, JobControl, Progress, ProgressFn
from ..errors import InvalidRequestError, MuralistError
from ..infotext import quote, save_png
from ..request import GenerationRequest, describe_validation_error

if TYPE_CHECKING:
    from ..engine.engine import Engine

# A1111 refuses grids over opts.img_max_size_mp (default 200 megapixels) before generating.
MAX_GRID_MEGAPIXELS = 200

# A1111's grid colours (opts.grid_text_active_color / inactive / grid_background_color defaults).
TEXT_ACTIVE = (0, 0, 0)
TEXT_INACTIVE = (153, 153, 153)
GRID_BACKGROUND = (255, 255, 255)

XYZ_TITLE = "X/Y/Z plot"

# A1111 v1.10's axis_options, in order, with the tab each is limited to (None: both). Script
# args give the axis type as an index into this list filtered for the tab, so the order matters.
_A1111_AXES: tuple[tuple[str, str | None], ...] = (
    ("Nothing", None),
    ("Seed", None),
    ("Var. seed", None),
    ("Var. strength", None),
    ("Steps", None),
    ("Hires steps", "txt2img"),
    ("CFG Scale", None),
    ("Image CFG Scale", "img2img"),
    ("Prompt S/R", None),
    ("Prompt order", None),
    ("Sampler", "txt2img"),
    ("Hires sampler", "txt2img"),
    ("Sampler", "img2img"),
    ("Checkpoint name", None),
    ("Negative Guidance minimum sigma", None),
    ("Sigma Churn", None),
    ("Sigma min", None),
    ("Sigma max", None),
    ("Sigma noise", None),
    ("Schedule type", None),
    ("Schedule min sigma", None),
    ("Schedule max sigma", None),
    ("Schedule rho", None),
    ("Beta schedule alpha", None),
    ("Beta schedule beta", None),
    ("Eta", None),
    ("Clip skip", None),
    ("Denoising", None),
    ("Initial noise multiplier", None),
    ("Extra noise", None),
    ("Hires upscaler", "txt2img"),
    ("Cond. Image Mask Weight", "img2img"),
    ("VAE", None),
    ("Styles", None),
    ("UniPC Order", None),
    ("Face restore", None),
    ("Token merging ratio", None),
    ("Token merging ratio high-res", None),
    ("Always discard next-to-last sigma", None),
    ("SGM noise multiplier", None),
    ("Refiner checkpoint", None),
    ("Refiner switch at", None),
    ("RNG source", None),
    ("FP8 mode", None),
    ("Size", None),
)


def a1111_axis_labels(img2img: bool = False) -> list[str]:
    """A1111's axis type dropdown for the txt2img or img2img tab (what an index in script_args means)."""
    tab = "img2img" if img2img else "txt2img"
    return [label for label, only in _A1111_AXES if only in (None, tab)]


# -- axis types ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class AxisType:
    """One kind of axis: how its values are typed, applied to a request and labelled."""

    label: str
    kind: type  # int, float or str: how values are parsed (ranges for int/float)
    apply: Callable[[GenerationRequest, Any, list[Any]], None]  # mutates a (validating) copy
    label_style: str = "with_name"  # "with_name" ("Steps: 20"), "value" or "basename"
    cost: float = 0.0  # A1111: costly axes (model switches) are iterated outermost
    choices: bool = False  # A1111 offers a dropdown: script_args may carry the values there
    check: Callable[[Engine, Any], None] | None = None  # per-value validation needing the engine

    def format(self, value: Any) -> str:
        """The cell label A1111 draws for ``value``."""
        if self.label == "Nothing":
            return ""
        if isinstance(value, float):
            value = round(value, 8)
        if self.label_style == "value":
            return str(value)
        if self.label_style == "basename":
            return os.path.basename(str(value))
        return f"{self.label}: {value}"


def _set(field_name: str) -> Callable[[GenerationRequest, Any, list[Any]], None]:
    def apply(req: GenerationRequest, value: Any, values: list[Any]) -> None:
        setattr(req, field_name, value)  # validate_assignment: out-of-range values raise here

    return apply


def _apply_nothing(req: GenerationRequest, value: Any, values: list[Any]) -> None:
    pass


def _apply_prompt_sr(req: GenerationRequest, value: str, values: list[str]) -> None:
    # A1111: the first value is the text searched for; every value (the first too) replaces it.
    search = values[0]
    if search not in req.prompt and search not in req.negative_prompt:
        raise ValueError(f"Prompt S/R did not find {search!r} in the prompt or negative prompt")
    req.prompt = req.prompt.replace(search, value)
    req.negative_prompt = req.negative_prompt.replace(search, value)


def _parse_size(value: str) -> tuple[int, int]:
    w, sep, h = value.lower().partition("x")
    try:
        if not sep:
            raise ValueError
        return int(w.strip()), int(h.strip())
    except ValueError:
        raise ValueError(f"size must be WIDTHxHEIGHT, e.g. 512x768 (got {value!r})") from None


def _apply_size(req: GenerationRequest, value: str, values: list[str]) -> None:
    req.width, req.height = _parse_size(value)


def _check_sampler(engine: Engine, value: str) -> None:
    # Legacy names ("DPM++ 2M Karras") carry a schedule; the sampler part must exist.
    name, _ = samplers.split_legacy_name(value, None)
    samplers.find_sampler(name)


def _check_schedule(engine: Engine, value: str) -> None:
    samplers.find_schedule(value)


def _check_checkpoint(engine: Engine, value: str) -> None:
    engine.registry.find_checkpoint(value)


def _check_vae(engine: Engine, value: str) -> None:
    if value.strip().lower() not in ("", "automatic", "auto", "none"):
        engine.registry.find_vae(value)


def _apply_vae(req: GenerationRequest, value: str, values: list[str]) -> None:
    # A1111's "Automatic"/"None" both mean the checkpoint's own VAE here.
    req.vae = None if value.strip().lower() in ("", "automatic", "auto", "none") else value


def _set_unit(field_name: str) -> Callable[[GenerationRequest, Any, list[Any]], None]:
    """sd-webui-controlnet's "[ControlNet] ..." axes: the value goes to every enabled unit."""

    def apply(req: GenerationRequest, value: Any, values: list[Any]) -> None:
        if not req.control_units:
            raise ValueError("the [ControlNet] axes need an enabled ControlNet unit in the request")
        from ..controlnet.units import ControlNetUnit

        req.controlnet = [ControlNetUnit.model_validate({**u.model_dump(), field_name: value}) if u.active else u
                          for u in req.controlnet]

    return apply


def _check_controlnet(engine: Engine, value: str) -> None:
    engine.controlnets.find(value)


def _check_module(engine: Engine, value: str) -> None:
    from ..controlnet import preprocess

    preprocess.find(value)


AXES: dict[str, AxisType] = {
    a.label: a
    for a in (
        AxisType("Nothing", str, _apply_nothing),
        AxisType("Seed", int, _set("seed")),
        AxisType("Var. seed", int, _set("subseed")),
        AxisType("Var. strength", float, _set("subseed_strength")),
        AxisType("Steps", int, _set("steps")),
        AxisType("Hires steps", int, _set("hr_second_pass_steps")),
        AxisType("CFG Scale", float, _set("cfg_scale")),
        AxisType("Prompt S/R", str, _apply_prompt_sr, label_style="value"),
        AxisType("Sampler", str, _set("sampler_name"), label_style="value", choices=True, check=_check_sampler),
        AxisType("Schedule type", str, _set("scheduler"), choices=True, check=_check_schedule),
        AxisType("Checkpoint name", str, _set("model"), label_style="basename", cost=1.0, choices=True,
                 check=_check_checkpoint),
        AxisType("Eta", float, _set("eta")),
        AxisType("Clip skip", int, _set("clip_skip")),
        AxisType("Denoising", float, _set("denoising_strength")),
        AxisType("VAE", str, _apply_vae, cost=0.7, choices=True, check=_check_vae),
        AxisType("Size", str, _apply_size),
        AxisType("[ControlNet] Weight", float, _set_unit("weight")),
        AxisType("[ControlNet] Guidance Start", float, _set_unit("guidance_start")),
        AxisType("[ControlNet] Guidance End", float, _set_unit("guidance_end")),
        AxisType("[ControlNet] Model", str, _set_unit("model"), label_style="value", cost=0.5, check=_check_controlnet),
        AxisType("[ControlNet] Preprocessor", str, _set_unit("module"), label_style="value", check=_check_module),
    )
}
_AXES_LOWER = {k.lower(): v for k, v in AXES.items()}


def find_axis(axis: str | int | AxisType, img2img: bool = False) -> AxisType:
    """An axis type by A1111 label (case-insensitive) or by index into A1111's dropdown for the tab."""
    if isinstance(axis, AxisType):
        return axis
    if isinstance(axis, bool):
        raise InvalidRequestError(f"axis type must be a name or an index, got {axis!r}")
    name: str
    if isinstance(axis, int) or (isinstance(axis, str) and axis.strip().isdigit()):
        labels = a1111_axis_labels(img2img)
        index = int(axis)
        if not 0 <= index < len(labels):
            raise InvalidRequestError(f"axis type index {index} is out of range: A1111's list has {len(labels)} entries")
        name = labels[index]
    else:
        name = str(axis).strip()
    found = _AXES_LOWER.get(name.lower())
    if found is not None:
        return found
    supported = ", ".join(AXES)
    if name.lower() in (label.lower() for label, _ in _A1111_AXES):
        raise InvalidRequestError(f"axis type {name!r} is not supported by muralist; supported: {supported}")
    raise InvalidRequestError(f"unknown axis type {name!r}; supported: {supported}")


# -- value parsing ------------------------------------------------------------------------------

_INT = r"[+-]?\s*\d+"
_FLOAT = r"[+-]?\s*(?:\d+(?:\.\d*)?|\.\d+)"
# "a-b", "a-b (+s)" (step), "a-b [n]" (count). A1111 requires a sign on the step; we accept both.
_INT_RANGE = re.compile(rf"\s*({_INT})\s*-\s*({_INT})\s*(?:\(\s*({_INT})\s*\)|\[\s*(\d+)\s*\])?\s*")
_FLOAT_RANGE = re.compile(rf"\s*({_FLOAT})\s*-\s*({_FLOAT})\s*(?:\(\s*({_FLOAT})\s*\)|\[\s*(\d+)\s*\])?\s*")


class _RangeError(ValueError):
    """A range that reads but makes no sense (step 0, no values)."""


def _num(text: str) -> str:
    return re.sub(r"\s+", "", text)  # "- 5" -> "-5" (int()/float() refuse inner spaces)


def split_values(text: str, raw_mode: bool = False) -> list[str]:
    """Axis values as A1111 splits them: CSV (double quotes protect commas), each value stripped.

    With ``raw_mode`` ("Use raw text lines") a multi-line text is split on newlines instead.
    """
    if raw_mode and "\n" in text.strip():
        return text.strip().split("\n")
    try:
        rows = csv.reader(io.StringIO(text), skipinitialspace=True)
        return [v.strip() for row in rows for v in row]
    except csv.Error as e:
        raise ValueError(f"cannot read the values as CSV: {e}") from None


def _int_values(value: str) -> list[int]:
    m = _INT_RANGE.fullmatch(value)
    if m is None:
        return [int(_num(value))]
    start, end = int(_num(m[1])), int(_num(m[2]))
    if m[4] is not None:  # count: evenly spaced, truncated to int as A1111 does
        import numpy as np

        if int(m[4]) < 1:
            raise _RangeError("the count must be at least 1")
        return [int(x) for x in np.linspace(start, end, int(m[4])).tolist()]
    step = int(_num(m[3])) if m[3] is not None else 1
    if step == 0:
        raise _RangeError("the step is 0")
    # A1111: range(start, end + 1, step); "10-1 (-3)" therefore gives 10, 7, 4.
    out = list(range(start, end + 1, step))
    if not out:
        raise _RangeError("the range is empty (counting down needs a negative step, e.g. 10-1 (-1))")
    return out


def _float_values(value: str) -> list[float]:
    m = _FLOAT_RANGE.fullmatch(value)
    if m is None:
        x = float(_num(value))
        if not math.isfinite(x):
            raise ValueError("not finite")
        return [x]
    start, end = float(_num(m[1])), float(_num(m[2]))
    if m[4] is not None:
        import numpy as np

        if int(m[4]) < 1:
            raise _RangeError("the count must be at least 1")
        return np.linspace(start, end, int(m[4])).tolist()
    step = float(_num(m[3])) if m[3] is not None else 1.0
    if step == 0:
        raise _RangeError("the step is 0")
    # A1111 uses np.arange(start, end + step, step), which can overshoot the end by a rounding
    # error (0.1-0.3 (+0.1) -> 0.1 .. 0.4); counting with a tolerance keeps the end inclusive.
    count = math.floor((end - start) / step + 1e-9) + 1
    if count < 1:
        raise _RangeError("the range is empty (counting down needs a negative step, e.g. 1-0 (-0.25))")
    return [round(start + i * step, 10) for i in range(count)]


def parse_axis_values(axis: str | int | AxisType, values: str | Sequence[Any], raw_mode: bool = False) -> list[Any]:
    """An axis's values, typed and with ranges expanded, as A1111's ``process_axis`` reads them.

    ``values`` is the text box content, or a list (A1111's dropdown values). Raises
    InvalidRequestError naming the axis and the bad value.
    """
    opt = find_axis(axis)
    return _parse_values(opt, values, raw_mode, f"{opt.label} axis")


def _parse_values(opt: AxisType, values: str | Sequence[Any], raw_mode: bool, where: str) -> list[Any]:
    if opt.label == "Nothing":
        return [None]
    try:
        items = split_values(values, raw_mode) if isinstance(values, str) else [str(v).strip() for v in values]
    except ValueError as e:
        raise InvalidRequestError(f"{where}: {e}") from None
    out: list[Any] = []
    for item in items:
        try:
            if opt.kind is int:
                out += _int_values(item)
            elif opt.kind is float:
                out += _float_values(item)
            elif not item and (opt.choices or opt.label == "Size"):
                raise ValueError("empty value")
            else:
                out.append(item)
        except _RangeError as e:
            raise InvalidRequestError(f"{where}: value {item!r}: {e}") from None
        except ValueError as e:
            detail = str(e) if str(e) == "empty value" else f"not a valid {'integer' if opt.kind is int else 'number'}"
            raise InvalidRequestError(f"{where}: value {item!r}: {detail}") from None
    if not out:
        raise InvalidRequestError(f"{where}: no values (got {values!r})")
    if opt.label == "Prompt S/R" and not out[0]:
        raise InvalidRequestError(f"{where}: the first value is the text to search for: it cannot be empty")
    return out


# -- grid drawing -------------------------------------------------------------------------------


@dataclass
class GridLabel:
    """One line of a grid legend; inactive ones are drawn grey and struck through (prompt matrix)."""

    text: str = ""
    active: bool = True


def image_grid(images: Sequence[Image.Image], rows: int) -> Image.Image:
    """Images laid out row by row on ``rows`` rows, each in a cell the size of the largest (A1111)."""
    cols = math.ceil(len(images) / rows)
    w = max(im.width for im in images)
    h = max(im.height for im in images)
    grid = Image.new("RGB", (cols * w, rows * h), GRID_BACKGROUND)
    for i, im in enumerate(images):
        grid.paste(im.convert("RGB"), ((i % cols) * w, (i // cols) * h))
    return grid


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=max(1, size))  # Pillow >= 10.1, with FreeType
    except (TypeError, OSError):
        return ImageFont.load_default()


@dataclass
class _Line:
    text: str
    active: bool
    font: Any
    width: int
    height: int
    offset: tuple[int, int]  # bbox origin, so text lands where it was measured


def _measure(draw: ImageDraw.ImageDraw, text: str, font: Any) -> tuple[int, int, tuple[int, int]]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top, (left, top)


def _layout_lines(draw: ImageDraw.ImageDraw, labels: Sequence[GridLabel], fontsize: int, allowed: int) -> list[_Line]:
    """Word-wrap each label to ``allowed`` pixels; a word that still does not fit gets a smaller font."""
    font = _font(fontsize)
    lines: list[_Line] = []
    for label in labels:
        wrapped: list[str] = []
        for word in label.text.split():
            candidate = f"{wrapped[-1]} {word}" if wrapped else word
            if wrapped and draw.textlength(candidate, font=font) <= allowed:
                wrapped[-1] = candidate
            else:
                wrapped.append(word)
        for text in wrapped or [""]:
            size, line_font = fontsize, font
            while size > 1 and draw.textlength(text, font=line_font) > allowed:
                size -= 1
                line_font = _font(size)
            w, h, off = _measure(draw, text, line_font) if text else (0, 0, (0, 0))
            lines.append(_Line(text, label.active, line_font, w, h, off))
    return lines


def _block_height(lines: list[_Line], spacing: int) -> int:
    visible = [ln for ln in lines if ln.text]
    return sum(ln.height for ln in visible) + spacing * max(0, len(visible) - 1)


def _draw_block(draw: ImageDraw.ImageDraw, cx: float, top: float, lines: list[_Line], spacing: int) -> None:
    y = top
    for ln in lines:
        if not ln.text:
            continue
        x = cx - ln.width / 2
        colour = TEXT_ACTIVE if ln.active else TEXT_INACTIVE
        draw.text((x - ln.offset[0], y - ln.offset[1]), ln.text, font=ln.font, fill=colour)
        if not ln.active:
            mid = y + ln.height / 2
            # A1111 strikes with a 4 px line at its usual 40 px font: keep that proportion.
            draw.line((x, mid, x + ln.width, mid), fill=TEXT_INACTIVE, width=max(1, getattr(ln.font, "size", 10) // 10))
        y += ln.height + spacing


def draw_grid_annotations(
    grid: Image.Image,
    cell_w: int,
    cell_h: int,
    col_labels: Sequence[Sequence[GridLabel]],
    row_labels: Sequence[Sequence[GridLabel]],
    margin: int = 0,
) -> Image.Image:
    """A1111's legend: column labels above, row labels in a left strip 3/4 of a cell wide.

    The font size is (cell_w + cell_h) // 25 and lines are spaced by half of it; the top strip
    is as tall as the tallest column label plus one font size. ``margin`` pixels separate cells.
    """
    cols, rows = grid.width // cell_w, grid.height // cell_h
    if len(col_labels) != cols or len(row_labels) != rows:
        raise ValueError(f"{len(col_labels)}x{len(row_labels)} labels for a {cols}x{rows} grid")
    fontsize = max(1, (cell_w + cell_h) // 25)
    spacing = fontsize // 2
    has_row_text = any(lb.text.strip() for labels in row_labels for lb in labels)
    pad_left = cell_w * 3 // 4 if has_row_text else 0
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    col_lines = [_layout_lines(measure, labels, fontsize, cell_w) for labels in col_labels]
    row_lines = [_layout_lines(measure, labels, fontsize, pad_left) for labels in row_labels]
    col_heights = [_block_height(lines, spacing) for lines in col_lines]
    pad_top = max(col_heights) + spacing * 2 if any(col_heights) else 0

    result = Image.new(
        "RGB", (grid.width + pad_left + margin * (cols - 1), grid.height + pad_top + margin * (rows - 1)), GRID_BACKGROUND
    )
    for r in range(rows):
        for c in range(cols):
            cell = grid.crop((c * cell_w, r * cell_h, (c + 1) * cell_w, (r + 1) * cell_h))
            result.paste(cell, (pad_left + c * (cell_w + margin), pad_top + r * (cell_h + margin)))
    draw = ImageDraw.Draw(result)
    for c, lines in enumerate(col_lines):
        cx = pad_left + c * (cell_w + margin) + cell_w / 2
        _draw_block(draw, cx, pad_top / 2 - col_heights[c] / 2, lines, spacing)
    for r, lines in enumerate(row_lines):
        top = pad_top + r * (cell_h + margin) + cell_h / 2 - _block_height(lines, spacing) / 2
        _draw_block(draw, pad_left / 2, top, lines, spacing)
    return result


# -- results and saving -------------------------------------------------------------------------


@dataclass
class ScriptResult:
    """What a grid script made. ``images`` are the individual images (saved at ``paths``);
    ``grids`` the labelled grids (saved at ``grid_paths``), whose infotext is their first cell's."""

    images: list[Image.Image] = field(default_factory=list)
    infotexts: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    paths: list[Path] = field(default_factory=list)
    cells: list[tuple[int, int, int]] = field(default_factory=list)  # (ix, iy, iz) of each image
    grids: list[Image.Image] = field(default_factory=list)
    grid_infotexts: list[str] = field(default_factory=list)
    grid_paths: list[Path] = field(default_factory=list)
    labels: dict[str, list[str]] = field(default_factory=dict)  # "x"/"y"/"z" -> label of each value
    warnings: list[str] = field(default_factory=list)


def _with_params(infotext: str, params: dict[str, str]) -> str:
    """The infotext with extra parameters added before "Version" (A1111's place for script params)."""
    if not params:
        return infotext
    head, sep, last = infotext.rpartition("\n")
    extra = ", ".join(f"{k}: {quote(v)}" for k, v in params.items())
    m = re.search(r"(?:^|, )Version: ", last)
    if m is None:
        last = f"{last}, {extra}" if last else extra
    elif m.start() == 0:
        last = f"{extra}, {last}"
    else:
        last = f"{last[: m.start()]}, {extra}{last[m.start():]}"
    return f"{head}{sep}{last}"


def _next_grid_number(folder: Path, basename: str) -> int:
    # A1111's get_next_sequence_number with a basename: "xyz_grid-0003.png" -> next is 4.
    highest = -1
    if folder.is_dir():
        pattern = re.compile(rf"^{re.escape(basename)}-(\d+)")
        for p in folder.iterdir():
            if m := pattern.match(p.name):
                highest = max(highest, int(m[1]))
    return highest + 1


def _save_grid(grid: Image.Image, folder: Path, basename: str, infotext: str) -> Path:
    return save_png(grid, folder / f"{basename}-{_next_grid_number(folder, basename):04d}.png", infotext)


def _grid_folder(engine: Engine, req: GenerationRequest, save_to: Path | None, grid_dir: Path | None) -> Path:
    if grid_dir is not None:
        return grid_dir
    if save_to is not None:
        return save_to
    kind = "img2img-grids" if req.init_images else "txt2img-grids"
    return engine.dirs.outputs_dir / kind / date.today().isoformat()


def _check_grid_size(cells: int, width: int, height: int) -> None:
    mp = round(cells * width * height / 1_000_000)
    if mp >= MAX_GRID_MEGAPIXELS:
        raise InvalidRequestError(f"the grid would be too large ({mp} megapixels; the limit is {MAX_GRID_MEGAPIXELS})")


def _blank_like(images: Sequence[Image.Image | None], width: int, height: int) -> Image.Image:
    # A1111 fills a cell that made no image (skipped, failed) with black of the first image's size.
    first = next((im for im in images if im is not None), None)
    return Image.new("RGB", first.size if first is not None else (width, height))


def _job_progress(progress: ProgressFn | None, index: int, total: int, n_iter: int, started: float) -> ProgressFn | None:
    """Progress of one generation mapped onto the whole job (one "batch" per cell batch)."""
    if progress is None:
        return None

    def report(p: Progress) -> None:
        progress(Progress(index * n_iter + p.batch, total * n_iter, p.step, p.steps, started, p.latents))

    return report


# -- X/Y/Z plot ---------------------------------------------------------------------------------


@dataclass
class XYZSpec:
    """An X/Y/Z plot: axis types (A1111 labels, or indexes into A1111's list) and their values
    (A1111 text syntax, or a list of values), plus A1111's options."""

    x_type: str | int = "Nothing"
    x_values: str | list[Any] = ""
    y_type: str | int = "Nothing"
    y_values: str | list[Any] = ""
    z_type: str | int = "Nothing"
    z_values: str | list[Any] = ""
    draw_legend: bool = True
    include_lone_images: bool = False  # A1111: return cell images too; here they always are
    include_sub_grids: bool = False  # A1111: keep per-z grids; here they always are
    no_fixed_seeds: bool = False  # "Keep -1 for seeds": every cell draws its own random seed
    vary_seeds_x: bool = False  # seed + x index (A1111 >= 1.7 "Vary seeds for X")
    vary_seeds_y: bool = False
    vary_seeds_z: bool = False
    margin_size: int = 0  # pixels between cells
    raw_mode: bool = False  # "Use raw text lines": one value per line
    img2img: bool = False  # index axis types into A1111's img2img list


def _flag(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes", "on")
    return bool(value)


def xyz_from_script_args(args: Sequence[Any], img2img: bool = False) -> XYZSpec:
    """An XYZSpec from the ``script_args`` an A1111 client sends with ``script_name: "x/y/z plot"``.

    The order is that of A1111's ``Script.run``: x_type, x_values, x_values_dropdown, y_type, ...,
    z_values_dropdown, draw_legend, include_lone_images, include_sub_grids, no_fixed_seeds, then
    (A1111 >= 1.7) vary_seeds_x, vary_seeds_y, vary_seeds_z, margin_size, csv_mode; older
    versions have margin_size, csv_mode (, raw_mode) right after no_fixed_seeds. For a dropdown
    axis (Sampler, Checkpoint name...) without csv_mode, A1111 reads the dropdown list; it is
    used here when not empty, else the text.
    """
    args = list(args)
    if len(args) < 9:
        raise InvalidRequestError(f"script_args: the X/Y/Z plot takes at least 9 values (got {len(args)})")

    def arg(i: int, default: Any) -> Any:
        return args[i] if i < len(args) and args[i] is not None else default

    new_layout = isinstance(arg(13, None), bool) and isinstance(arg(14, None), bool)
    if new_layout:
        vary = [_flag(arg(13, False)), _flag(arg(14, False)), _flag(arg(15, False))]
        margin, csv_mode, raw_mode = arg(16, 0), _flag(arg(17, False)), False
    else:
        vary = [False, False, False]
        margin, csv_mode, raw_mode = arg(13, 0), _flag(arg(14, False)), _flag(arg(15, False))
    try:
        margin = int(margin)
    except (TypeError, ValueError):
        raise InvalidRequestError(f"script_args: margin_size must be a number (got {margin!r})") from None

    def axis(i: int) -> tuple[str | int, str | list[Any]]:
        kind = arg(i, 0)
        opt = find_axis(kind, img2img)
        text, dropdown = arg(i + 1, ""), arg(i + 2, [])
        if opt.choices and not csv_mode and isinstance(dropdown, list) and dropdown:
            return opt.label, [str(v) for v in dropdown]
        if not isinstance(text, str):
            text = ",".join(str(v) for v in text) if isinstance(text, list) else str(text)
        return opt.label, text

    (xt, xv), (yt, yv), (zt, zv) = axis(0), axis(3), axis(6)
    return XYZSpec(
        xt, xv, yt, yv, zt, zv,
        draw_legend=_flag(arg(9, True)),
        include_lone_images=_flag(arg(10, False)),
        include_sub_grids=_flag(arg(11, False)),
        no_fixed_seeds=_flag(arg(12, False)),
        vary_seeds_x=vary[0], vary_seeds_y=vary[1], vary_seeds_z=vary[2],
        margin_size=max(0, margin),
        raw_mode=raw_mode,
        img2img=img2img,
    )


@dataclass
class XYZPlan:
    """A validated plot: each axis's type, values and labels, and every cell's request."""

    axes: tuple[AxisType, AxisType, AxisType]
    values: tuple[list[Any], list[Any], list[Any]]
    labels: tuple[list[str], list[str], list[str]]
    texts: tuple[str, str, str]  # the values as typed (the grid infotext's "X Values")
    cells: dict[tuple[int, int, int], GenerationRequest]
    order: list[tuple[int, int, int]]  # generation order (costly axes outermost, as A1111)

    @property
    def shape(self) -> tuple[int, int, int]:
        return len(self.values[0]), len(self.values[1]), len(self.values[2])


def _values_text(values: str | list[Any]) -> str:
    if isinstance(values, str):
        return values
    out = io.StringIO()
    csv.writer(out).writerow(values)
    return out.getvalue().strip()


def _generation_order(axes: Sequence[AxisType], shape: tuple[int, int, int]) -> list[tuple[int, int, int]]:
    """A1111's loop order: the costliest axis outermost, then the next; ties keep z, y, x."""
    xc, yc, zc = (a.cost for a in axes)
    first, second = "z", "y"
    if xc > yc and xc > zc:
        first, second = "x", ("y" if yc > zc else "z")
    elif yc > xc and yc > zc:
        first, second = "y", ("x" if xc > zc else "z")
    elif zc > xc and zc > yc:
        first, second = "z", ("x" if xc > yc else "y")
    third = ({"x", "y", "z"} - {first, second}).pop()
    names = {"x": 0, "y": 1, "z": 2}
    order = []
    for a in range(shape[names[first]]):
        for b in range(shape[names[second]]):
            for c in range(shape[names[third]]):
                idx = [0, 0, 0]
                idx[names[first]], idx[names[second]], idx[names[third]] = a, b, c
                order.append((idx[0], idx[1], idx[2]))
    return order


def plan_xyz(engine: Engine, req: GenerationRequest, spec: XYZSpec) -> XYZPlan:
    """Parse and validate a plot without generating anything.

    Raises InvalidRequestError naming the axis and value for: an unknown or unsupported axis
    type, an unreadable value or range, an unknown sampler, schedule type, checkpoint or VAE, a
    value out of the request's limits, a Prompt S/R text missing from the prompt, a sampler and
    schedule type that do not go together, or a grid over A1111's size limit.
    """
    names = ("X", "Y", "Z")
    found: list[AxisType] = []
    for name, kind in zip(names, (spec.x_type, spec.y_type, spec.z_type), strict=True):
        try:
            found.append(find_axis(kind, spec.img2img))
        except InvalidRequestError as e:
            raise InvalidRequestError(f"{name} axis: {e}") from None
    axes = (found[0], found[1], found[2])
    raw = (spec.x_values, spec.y_values, spec.z_values)
    values: list[list[Any]] = []
    for name, opt, vals in zip(names, axes, raw, strict=True):
        parsed = _parse_values(opt, vals, spec.raw_mode, f"{name} axis ({opt.label})")
        if opt.check is not None:
            for v in dict.fromkeys(parsed):
                try:
                    opt.check(engine, v)
                except MuralistError as e:
                    raise InvalidRequestError(f"{name} axis ({opt.label}): value {v!r}: {e}") from None
        values.append(parsed)

    base = req.model_copy()
    if not spec.no_fixed_seeds:
        # A1111's fix_seed: one random seed for the whole plot, so cells differ only by the axes.
        base = base.model_copy(update={"seed": resolve_seed(base.seed), "subseed": resolve_seed(base.subseed)})
        for i, opt in enumerate(axes):
            if opt.label in ("Seed", "Var. seed"):
                values[i] = [random_seed() if v == -1 else v for v in values[i]]

    # Each value alone on the base request: errors name one axis and one value.
    for name, opt, vals in zip(names, axes, values, strict=True):
        for v in vals:
            probe = base.model_copy()
            try:
                opt.apply(probe, v, vals)
            except (ValidationError, ValueError) as e:
                detail = describe_validation_error(e) if isinstance(e, ValidationError) else str(e)
                raise InvalidRequestError(f"{name} axis ({opt.label}): value {v!r}: {detail}") from None

    shape = (len(values[0]), len(values[1]), len(values[2]))
    vary = (spec.vary_seeds_x, spec.vary_seeds_y, spec.vary_seeds_z)
    cells: dict[tuple[int, int, int], GenerationRequest] = {}
    for iz, z in enumerate(values[2]):
        for iy, y in enumerate(values[1]):
            for ix, x in enumerate(values[0]):
                cell = base.model_copy()
                where = f"cell ({axes[0].format(x) or '-'} / {axes[1].format(y) or '-'} / {axes[2].format(z) or '-'})"
                try:
                    for opt, v, vals in zip(axes, (x, y, z), values, strict=True):
                        opt.apply(cell, v, vals)
                    if cell.seed != -1 and any(vary):
                        # A1111's "vary seeds": seed + ix (+ iy * |x|) (+ iz * |x| * |y|).
                        xdim = shape[0] if vary[0] else 1
                        ydim = shape[1] if vary[1] else 1
                        cell.seed = cell.seed + ix * vary[0] + iy * xdim * vary[1] + iz * xdim * ydim * vary[2]
                    samplers.resolve(cell.sampler_name, cell.scheduler)
                except (ValidationError, ValueError, MuralistError) as e:
                    detail = describe_validation_error(e) if isinstance(e, ValidationError) else str(e)
                    raise InvalidRequestError(f"X/Y/Z plot {where}: {detail}") from None
                cells[(ix, iy, iz)] = cell

    for model in dict.fromkeys(c.model for c in cells.values()):
        engine.resolve_model(GenerationRequest(model=model))  # a default checkpoint must exist
    _check_grid_size(
        len(cells), max(c.width for c in cells.values()), max(c.height for c in cells.values())
    )
    labels = tuple([opt.format(v) for v in vals] for opt, vals in zip(axes, values, strict=True))
    texts = tuple(_values_text(v) if a.label != "Nothing" else "" for a, v in zip(axes, raw, strict=True))
    return XYZPlan(
        axes, (values[0], values[1], values[2]), (labels[0], labels[1], labels[2]), (texts[0], texts[1], texts[2]),
        cells, _generation_order(axes, shape),
    )


def _xyz_grid_infotext(plan: XYZPlan, first: str, spec: XYZSpec, with_z: bool) -> str:
    params: dict[str, str] = {"Script": XYZ_TITLE}
    for i, name in enumerate(("X", "Y", "Z") if with_z else ("X", "Y")):
        opt = plan.axes[i]
        if opt.label == "Nothing":
            continue
        params[f"{name} Type"] = opt.label
        params[f"{name} Values"] = plan.texts[i]
        if opt.label in ("Seed", "Var. seed") and not spec.no_fixed_seeds:
            params[f"Fixed {name} Values"] = ", ".join(str(v) for v in plan.values[i])
    return _with_params(first, params)


def run_xyz(
    engine: Engine,
    req: GenerationRequest,
    spec: XYZSpec,
    control: JobControl | None = None,
    progress: ProgressFn | None = None,
    save_to: Path | None = None,
    grid_dir: Path | None = None,
) -> ScriptResult:
    """Generate every cell of an X/Y/Z plot and draw one labelled grid per Z value.

    Everything is validated first (``plan_xyz``). Each cell runs the request with the axes'
    values applied (its batch_size x n_iter images); the grid shows each cell's first image.
    Images are saved in ``save_to`` (default: the engine's outputs folder), grids in
    ``grid_dir`` (default: ``save_to``, else A1111's ``txt2img-grids/<date>``). When there are
    several Z values, A1111's combined grid (sub-grids side by side under the Z labels) is
    added as the last grid. Raises Interrupted if the job is interrupted.
    """
    plan = plan_xyz(engine, req, spec)
    nx, ny, nz = plan.shape
    started = time.monotonic()
    result = ScriptResult(labels={"x": plan.labels[0], "y": plan.labels[1], "z": plan.labels[2]})
    per_cell: dict[tuple[int, int, int], tuple[list[Image.Image], list[str], list[int], list[Path]]] = {}
    first_infotext: dict[tuple[int, int, int], str] = {}
    n_iter = req.n_iter
    for k, key in enumerate(plan.order):
        if control is not None and control.interrupted.is_set():
            raise Interrupted()
        cell = plan.cells[key]
        saved = engine.generate(cell, control, _job_progress(progress, k, len(plan.order), n_iter, started), save_to,
                                detected_maps=False)
        r = saved.result
        per_cell[key] = (r.images, r.infotexts, r.seeds, saved.paths)
        if r.infotexts:
            first_infotext[key] = r.infotexts[0]
        result.warnings += [w for w in r.warnings if w not in result.warnings]

    for iz in range(nz):
        for iy in range(ny):
            for ix in range(nx):
                imgs, texts, seeds, paths = per_cell[(ix, iy, iz)]
                result.images += imgs
                result.infotexts += texts
                result.seeds += seeds
                result.paths += paths
                result.cells += [(ix, iy, iz)] * len(imgs)

    folder = _grid_folder(engine, req, save_to, grid_dir)
    sub_grids: list[Image.Image] = []
    for iz in range(nz):
        keys = [(ix, iy, iz) for iy in range(ny) for ix in range(nx)]
        firsts = [per_cell[k][0][0] if per_cell[k][0] else None for k in keys]
        cells = [im if im is not None else _blank_like(firsts, plan.cells[k].width, plan.cells[k].height)
                 for im, k in zip(firsts, keys, strict=True)]
        grid = image_grid(cells, rows=ny)
        if spec.draw_legend:
            grid = draw_grid_annotations(
                grid, grid.width // nx, grid.height // ny,
                [[GridLabel(t)] for t in plan.labels[0]], [[GridLabel(t)] for t in plan.labels[1]], spec.margin_size,
            )
        first = next((first_infotext[k] for k in keys if k in first_infotext), "")
        text = _xyz_grid_infotext(plan, first, spec, with_z=False)
        sub_grids.append(grid)
        result.grids.append(grid)
        result.grid_infotexts.append(text)
        result.grid_paths.append(_save_grid(grid, folder, "xyz_grid", text))

    if nz > 1:
        combined = image_grid(sub_grids, rows=1)
        if spec.draw_legend:
            combined = draw_grid_annotations(
                combined, combined.width // nz, combined.height, [[GridLabel(t)] for t in plan.labels[2]], [[GridLabel()]]
            )
        first = next((first_infotext[k] for k in plan.cells if k in first_infotext), "")
        text = _xyz_grid_infotext(plan, first, spec, with_z=True)
        result.grids.append(combined)
        result.grid_infotexts.append(text)
        result.grid_paths.append(_save_grid(combined, folder, "xyz_grid", text))
    return result


# -- prompt matrix ------------------------------------------------------------------------------


def prompt_matrix_prompts(prompt: str, put_at_start: bool = False, delimiter: str = ", ") -> list[str]:
    """A1111's prompt matrix: ``base|a|b`` -> every combination of the optional parts, 2**(n-1).

    Combination i holds optional part k when bit k of i is set (so: base, base+a, base+b,
    base+a+b); optional parts are stripped of spaces and commas, the base part is kept as is;
    ``put_at_start`` puts the optional parts before the base.
    """
    parts = prompt.split("|")
    out = []
    for i in range(2 ** (len(parts) - 1)):
        chosen = [p.strip().strip(",") for k, p in enumerate(parts[1:]) if i & (1 << k)]
        out.append(delimiter.join([*chosen, parts[0]] if put_at_start else [parts[0], *chosen]))
    return out


def _matrix_labels(parts: list[str]) -> tuple[list[list[GridLabel]], list[list[GridLabel]]]:
    # A1111's draw_prompt_matrix: the first half of the optional parts label the columns,
    # the rest the rows; each cell lists every part, active when its bit is set.
    boundary = math.ceil(len(parts) / 2)
    hor, ver = parts[:boundary], parts[boundary:]
    cols = [[GridLabel(p.strip(), bool(pos & (1 << i))) for i, p in enumerate(hor)] for pos in range(1 << len(hor))]
    rows = [[GridLabel(p.strip(), bool(pos & (1 << i))) for i, p in enumerate(ver)] for pos in range(1 << len(ver))]
    return cols, rows


def _label_text(labels: list[GridLabel]) -> str:
    return ", ".join(("+" if lb.active else "-") + lb.text for lb in labels)


def run_prompt_matrix(
    engine: Engine,
    req: GenerationRequest,
    save_to: Path | None = None,
    control: JobControl | None = None,
    progress: ProgressFn | None = None,
    put_at_start: bool = False,
    different_seeds: bool = False,
    prompt_type: str = "positive",
    variations_delimiter: str = "comma",
    margin_size: int = 0,
    grid_dir: Path | None = None,
) -> ScriptResult:
    """A1111's "Prompt matrix": one image per combination of the prompt's ``|`` parts, and a grid.

    All images share one seed (resolved once) unless ``different_seeds`` (seed + i). The grid
    has 2**(n//2) rows for n optional parts; columns are labelled with the first half of the
    parts, rows with the rest, each part drawn black when present and grey, struck through,
    when absent. ``prompt_type="negative"`` splits the negative prompt instead;
    ``variations_delimiter`` is "comma" (", ") or "space". One image per combination: the
    request's batch_size and n_iter are not used.
    """
    if prompt_type not in ("positive", "negative"):
        raise InvalidRequestError(f"prompt matrix: prompt type must be positive or negative (got {prompt_type!r})")
    if variations_delimiter not in ("comma", "space"):
        raise InvalidRequestError(f"prompt matrix: joining char must be comma or space (got {variations_delimiter!r})")
    source = req.prompt if prompt_type == "positive" else req.negative_prompt
    parts = source.split("|")
    prompts = prompt_matrix_prompts(source, put_at_start, ", " if variations_delimiter == "comma" else " ")
    if len(prompts) > 1 << 12:
        raise InvalidRequestError(f"prompt matrix: {len(prompts)} combinations is too many (at most 4096: 12 '|' parts)")
    _check_grid_size(len(prompts), req.width, req.height)
    seed, subseed = resolve_seed(req.seed), resolve_seed(req.subseed)
    key = "prompt" if prompt_type == "positive" else "negative_prompt"
    cells = []
    for i, p in enumerate(prompts):
        cells.append(req.model_copy(update={key: p, "seed": seed + (i if different_seeds else 0), "subseed": subseed,
                                            "batch_size": 1, "n_iter": 1}))
    samplers.resolve(req.sampler_name, req.scheduler)
    engine.resolve_model(req)

    started = time.monotonic()
    result = ScriptResult()
    firsts: list[Image.Image | None] = []
    for i, cell in enumerate(cells):
        if control is not None and control.interrupted.is_set():
            raise Interrupted()
        saved = engine.generate(cell, control, _job_progress(progress, i, len(cells), 1, started), save_to,
                                detected_maps=False)
        r = saved.result
        result.images += r.images
        result.infotexts += r.infotexts
        result.seeds += r.seeds
        result.paths += saved.paths
        result.cells += [(i, 0, 0)] * len(r.images)
        result.warnings += [w for w in r.warnings if w not in result.warnings]
        firsts.append(r.images[0] if r.images else None)

    optional = parts[1:]
    rows = 1 << (len(optional) // 2)
    grid_cells = [im if im is not None else _blank_like(firsts, req.width, req.height) for im in firsts]
    grid = image_grid(grid_cells, rows=rows)
    col_labels, row_labels = _matrix_labels(optional)
    cols = grid.width // max(im.width for im in grid_cells)
    if any(lb.text for labels in col_labels + row_labels for lb in labels):
        grid = draw_grid_annotations(grid, grid.width // cols, grid.height // rows, col_labels, row_labels, margin_size)
    result.labels = {"x": [_label_text(lbs) for lbs in col_labels], "y": [_label_text(lbs) for lbs in row_labels]}
    text = result.infotexts[0] if result.infotexts else ""
    result.grids.append(grid)
    result.grid_infotexts.append(text)
    result.grid_paths.append(_save_grid(grid, _grid_folder(engine, req, save_to, grid_dir), "prompt_matrix", text))
    return result
