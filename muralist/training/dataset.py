"""Training datasets in kohya's folder convention, read and bucketed as kohya sd-scripts does.

``<dataset>/<repeats>_<class tokens>/image.png`` (+ ``image.txt``, first line only); a folder whose
name does not start with a number is skipped with a warning; an image without a caption takes the
folder's class tokens. Loose images (no such folders) are wrapped into ``<n>_zkz`` as lora-scripts
does. Aspect-ratio buckets follow kohya's ``make_bucket_resolutions`` and ``bucket_no_upscale``.
"""

from __future__ import annotations

import io
import math
import random
import shutil
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from PIL import Image, UnidentifiedImageError

from ..errors import InvalidRequestError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTION_EXTS = (".txt", ".caption")
MAX_FILES = 20_000


@dataclass
class Item:
    path: Path
    caption: str
    folder: str
    size: tuple[int, int]  # (w, h) of the source image
    bucket: tuple[int, int] = (0, 0)


@dataclass
class Dataset:
    items: list[Item]  # one per image (repeats are applied when batching)
    repeats: dict[str, int]
    warnings: list[str] = field(default_factory=list)

    @property
    def num_train_images(self) -> int:
        return sum(self.repeats[i.folder] for i in self.items)

    def dataset_dirs(self) -> dict[str, dict[str, int]]:
        counts = Counter(i.folder for i in self.items)
        return {f: {"n_repeats": self.repeats[f], "img_count": counts[f]} for f in self.repeats if counts[f]}

    def tag_frequency(self) -> dict[str, dict[str, int]]:
        out: dict[str, Counter[str]] = {}
        for i in self.items:
            tags = [t.strip().lower() for t in i.caption.split(",") if t.strip()]
            out.setdefault(i.folder, Counter()).update(tags)
        return {k: dict(v) for k, v in out.items()}

    def bucket_info(self) -> dict[str, object]:
        counts = Counter(i.bucket for i in self.items)
        buckets = {str(n): {"resolution": list(b), "count": c} for n, (b, c) in enumerate(sorted(counts.items()))}
        errors = [abs(i.size[0] / i.size[1] - i.bucket[0] / i.bucket[1]) for i in self.items]
        return {"buckets": buckets, "mean_img_ar_error": sum(errors) / max(1, len(errors))}


def _folder_params(name: str) -> tuple[int, str] | None:
    head, sep, rest = name.partition("_")
    if not sep or not head.isdigit():
        return None
    return int(head), rest


def read_caption(image: Path, ext: str, fallback: str) -> str:
    for suffix in (ext, *(e for e in CAPTION_EXTS if e != ext)):
        cap = image.with_suffix(suffix)
        if cap.is_file():
            try:
                lines = cap.read_text(encoding="utf-8").splitlines()
            except UnicodeDecodeError:
                raise InvalidRequestError(f"{cap.name}: the caption is not UTF-8 text") from None
            first = lines[0].strip() if lines else ""
            return first or fallback
    return fallback


def load_dataset(root: Path, caption_extension: str = ".txt") -> Dataset:
    """The dataset under ``root``; errors say what is wrong and what kohya expects."""
    if not root.is_dir():
        raise InvalidRequestError(f"train_data_dir: no dataset folder {root.name!r}")
    items: list[Item] = []
    repeats: dict[str, int] = {}
    warnings: list[str] = []
    subdirs = sorted(p for p in root.iterdir() if p.is_dir())
    for sub in subdirs:
        params = _folder_params(sub.name)
        if params is None:
            warnings.append(f"folder {sub.name!r} was skipped: its name must be <repeats>_<class tokens>, e.g. '10_sks dog'")
            continue
        n, tokens = params
        repeats[sub.name] = n
        for img in sorted(sub.iterdir()):
            if img.suffix.lower() not in IMAGE_EXTS or not img.is_file():
                continue
            try:
                with Image.open(img) as im:
                    im.verify()
                with Image.open(img) as im:
                    size = im.size
            except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
                raise InvalidRequestError(f"{sub.name}/{img.name}: not a readable image ({e})") from None
            items.append(Item(img, read_caption(img, caption_extension, tokens), sub.name, size))
    if not items:
        hint = " (folders named <repeats>_<class tokens>, e.g. '10_sks dog', holding PNG/JPEG/WEBP images)"
        raise InvalidRequestError(f"train_data_dir: no training images in {root.name!r}{hint}")
    return Dataset(items, repeats, warnings)


# -- buckets ------------------------------------------------------------------------------------


def bucket_resolutions(max_reso: tuple[int, int], min_size: int, max_size: int, step: int) -> list[tuple[int, int]]:
    """kohya's bucket list for a maximum area (both orientations)."""
    max_area = max_reso[0] * max_reso[1]
    side = int(math.sqrt(max_area) // step * step)
    out = {(side, side)}
    width = min_size
    while width <= max_size:
        height = min(max_size, int(max_area / width // step * step))
        if height >= min_size:
            out.add((width, height))
            out.add((height, width))
        width += step
    return sorted(out)


def assign_buckets(ds: Dataset, resolution: tuple[int, int], enable: bool, min_size: int, max_size: int, step: int,
                   no_upscale: bool) -> None:
    if not enable:
        for i in ds.items:
            i.bucket = resolution
        return
    max_area = resolution[0] * resolution[1]
    buckets = bucket_resolutions(resolution, min_size, max_size, step)
    for i in ds.items:
        w, h = i.size
        if no_upscale and w * h <= max_area:
            # The image keeps its size, floored to the step (cropped, never padded or enlarged).
            i.bucket = (max(step, w // step * step), max(step, h // step * step))
            continue
        if no_upscale:  # too large: shrink keeping the aspect ratio, then floor to the step
            k = math.sqrt(max_area / (w * h))
            i.bucket = (max(step, int(w * k) // step * step), max(step, int(h * k) // step * step))
            continue
        ar = w / h
        i.bucket = min(buckets, key=lambda b: abs(b[0] / b[1] - ar))


def load_image(item: Item) -> Image.Image:
    """The image resized to cover its bucket, centre-cropped to it (kohya's default, no random crop)."""
    bw, bh = item.bucket
    with Image.open(item.path) as im:
        im = im.convert("RGB")
        w, h = im.size
        k = max(bw / w, bh / h)
        nw, nh = max(bw, round(w * k)), max(bh, round(h * k))
        im = im.resize((nw, nh), Image.LANCZOS if k < 1 else Image.BICUBIC)
        x, y = (nw - bw) // 2, (nh - bh) // 2
        return im.crop((x, y, x + bw, y + bh))


def shuffle_caption(caption: str, keep_tokens: int, rng: random.Random) -> str:
    """kohya's shuffle_caption: comma-separated tags shuffled, the first ``keep_tokens`` kept in place."""
    tags = [t.strip() for t in caption.split(",")]
    head, tail = tags[:keep_tokens], tags[keep_tokens:]
    rng.shuffle(tail)
    return ", ".join(head + tail)


# -- uploads ------------------------------------------------------------------------------------


def extract_zip(data: bytes, target: Path, max_bytes: int) -> list[str]:
    """A zip of a dataset into ``target`` (a new folder), refusing path tricks and zip bombs.

    Only images and caption files are kept; loose images at the top are wrapped into ``<n>_zkz``
    as lora-scripts does. Returns notes for the caller."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise InvalidRequestError("the dataset must be a .zip file") from None
    members = [m for m in archive.infolist() if not m.is_dir()]
    if len(members) > MAX_FILES:
        raise InvalidRequestError(f"the zip holds {len(members)} files; at most {MAX_FILES}")
    total = sum(m.file_size for m in members)
    if total > max_bytes:
        raise InvalidRequestError(f"the zip unpacks to {total} bytes, over the dataset limit of {max_bytes}")
    notes: list[str] = []
    staging = target.with_name(target.name + ".incoming")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        for m in members:
            path = PurePosixPath(m.filename.replace("\\", "/"))
            if path.is_absolute() or ".." in path.parts or m.filename.startswith(("/", "\\")) or ":" in path.parts[0]:
                raise InvalidRequestError(f"{m.filename!r}: paths in the zip must stay inside it")
            if (m.external_attr >> 16) & 0o170000 == 0o120000:
                raise InvalidRequestError(f"{m.filename!r}: links are not allowed in a dataset")
            if path.suffix.lower() not in IMAGE_EXTS + CAPTION_EXTS or any(p.startswith(".") for p in path.parts) \
                    or "__MACOSX" in path.parts:
                continue
            parts = path.parts
            if len(parts) > 2:  # "<dataset>/<n_tokens>/img.png" zips: drop a single top folder
                parts = parts[-2:]
            out = staging.joinpath(*parts)
            out.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(m) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        loose = [p for p in staging.iterdir() if p.is_file()]
        images = [p for p in loose if p.suffix.lower() in IMAGE_EXTS]
        if images:  # lora-scripts: loose images go into <n>_zkz, n from the count
            n = 7 if len(images) <= 10 else 5 if len(images) <= 50 else 3 if len(images) <= 100 else 1
            folder = staging / f"{n}_zkz"
            folder.mkdir(exist_ok=True)
            for p in loose:
                p.rename(folder / p.name)
            notes.append(f"{len(images)} loose image(s) were put into {folder.name}/ (lora-scripts' rule)")
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return notes


def describe(root: Path, caption_extension: str = ".txt") -> dict[str, object]:
    """A dataset as the API lists it: folders, repeats, images and captions."""
    ds = load_dataset(root, caption_extension)
    return {"name": root.name, "folders": ds.dataset_dirs(), "images": [
        {"path": f"{i.folder}/{i.path.name}", "caption": i.caption, "width": i.size[0], "height": i.size[1]} for i in ds.items],
        "warnings": ds.warnings}
