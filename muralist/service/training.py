"""Training jobs on the service side: per-user datasets, option checks and limits before queueing.

Datasets live in ``data/datasets/<user>/<name>/`` (kohya's folders inside); a user names only their
own datasets, never a path. The dispatcher sends a dataset's files with the job, so a worker on
another machine trains on the same data; the resume state and the LoRA files come back as events
and are written here (``data/training/<job>/``, ``models/Lora/<user>/``).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from ..errors import InvalidRequestError, NotFoundError
from ..training.dataset import CAPTION_EXTS, IMAGE_EXTS, describe, extract_zip, load_dataset
from ..training.options import TrainOptions, parse_options
from .store import LimitError, User

TRAIN_TYPES = ("train_lora", "train_embedding")
NAME = re.compile(r"[\w][\w .\-]{0,63}")


def dataset_root(root: Path, owner: str) -> Path:
    return root / "datasets" / owner


def dataset_dir(root: Path, owner: str, name: str) -> Path:
    """A user's dataset folder by name (a plain name: no paths, no way out of the user's area)."""
    if not isinstance(name, str) or not NAME.fullmatch(name) or name.startswith("."):
        raise InvalidRequestError("dataset names are letters, digits, spaces, '.', '-' and '_' (at most 64), not paths")
    return dataset_root(root, owner) / name


def save_upload(root: Path, owner: str, name: str, data: bytes, max_bytes: int) -> dict[str, Any]:
    target = dataset_dir(root, owner, name)
    target.parent.mkdir(parents=True, exist_ok=True)
    notes = extract_zip(data, target, max_bytes)
    try:
        info = describe(target)
    except InvalidRequestError:
        shutil.rmtree(target, ignore_errors=True)
        raise
    return {**info, "notes": notes}


def list_datasets(root: Path, owner: str) -> list[dict[str, Any]]:
    out = []
    base = dataset_root(root, owner)
    for d in sorted(base.iterdir()) if base.is_dir() else []:
        if d.is_dir() and not d.name.endswith(".incoming"):
            try:
                info = describe(d)
                out.append({"name": d.name, "folders": info["folders"], "images": len(info["images"])})
            except InvalidRequestError as e:
                out.append({"name": d.name, "error": str(e)})
    return out


def set_caption(root: Path, owner: str, name: str, image: str, caption: str, ext: str = ".txt") -> None:
    """Write one image's caption (the web UI's caption editor)."""
    folder = dataset_dir(root, owner, name)
    rel = Path(image)
    if rel.is_absolute() or ".." in rel.parts or len(rel.parts) != 2 or rel.suffix.lower() not in IMAGE_EXTS:
        raise InvalidRequestError("image: '<folder>/<file>' of an image in this dataset")
    if ext not in CAPTION_EXTS:
        raise InvalidRequestError(f"caption_extension: one of {', '.join(CAPTION_EXTS)}")
    path = folder / rel
    if not path.is_file():
        raise NotFoundError(f"no image {image!r} in dataset {name!r}")
    path.with_suffix(ext).write_text(caption.strip() + "\n", encoding="utf-8")


def dataset_files(folder: Path) -> dict[str, bytes]:
    """Everything a worker needs of a dataset: its images and captions, by relative path."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.suffix.lower() in IMAGE_EXTS + CAPTION_EXTS:
            out[p.relative_to(folder).as_posix()] = p.read_bytes()
    return out


def _common_checks(service: Any, user: User, limits: Any, dataset: str, w: int, h: int) -> Path:
    folder = dataset_dir(service.dirs.root, user.name, dataset)
    if not folder.is_dir():
        raise InvalidRequestError(f"you have no dataset {dataset!r}; upload one with PUT /api/v1/datasets/{dataset} (a zip)")
    if w * h > limits.max_pixels:
        raise InvalidRequestError(f"resolution: {w}x{h} is over your limit of max_pixels={limits.max_pixels}")
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    if size > limits.max_dataset_bytes:
        raise InvalidRequestError(f"the dataset is {size} bytes, over your limit of max_dataset_bytes={limits.max_dataset_bytes}")
    if service.active_jobs(user, TRAIN_TYPES) >= limits.max_trainings:
        raise LimitError(f"you already have {limits.max_trainings} training job(s) queued or running (max_trainings)")
    return folder


def validate_embedding(service: Any, user: User, params: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """Textual-inversion training (A1111's train_embedding options) before queueing."""
    from ..training.embedding import parse_embedding_options

    opts = parse_embedding_options(params)
    limits = service.settings.limits.merged(user.limits)
    info = service.engine.registry.find_checkpoint(opts.pretrained_model_name_or_path)
    if info.kind.family.value == "sdxl":
        raise InvalidRequestError("embedding training is for SD1.x and SD2.x checkpoints; SDXL is not supported yet")
    folder = _common_checks(service, user, limits, opts.data_root, opts.training_width, opts.training_height)
    ds = load_dataset(folder, ".txt")
    if opts.steps > limits.max_train_steps:
        raise InvalidRequestError(f"steps: {opts.steps} is over your limit of max_train_steps={limits.max_train_steps}")
    stored = opts.model_dump()
    stored["pretrained_model_name_or_path"] = info.title
    stored["train_data_dir"] = opts.data_root
    stored["notes"] = ds.warnings
    stored["steps"], stored["n_iter"] = opts.steps, 1
    return stored, info.sha256


def validate(service: Any, user: User, params: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The stored params (checked options + notes) and the checkpoint hash the job needs."""
    from ..training.dataset import assign_buckets
    from ..training.lora import optimizer_available, plan

    opts, notes = parse_options(params)
    limits = service.settings.limits.merged(user.limits)
    info = service.engine.registry.find_checkpoint(opts.pretrained_model_name_or_path)
    problem = optimizer_available(opts.optimizer_type)
    if problem:
        raise InvalidRequestError(problem)
    try:
        folder = _common_checks(service, user, limits, opts.train_data_dir, *opts.size)
    except InvalidRequestError as e:
        raise InvalidRequestError(f"train_data_dir: {e}" if "dataset" in str(e) else str(e)) from None
    ds = load_dataset(folder, opts.caption_extension)
    assign_buckets(ds, opts.size, opts.enable_bucket, opts.min_bucket_reso, opts.max_bucket_reso, opts.bucket_reso_steps,
                   opts.bucket_no_upscale)
    p = plan(ds, opts)
    if p.steps > limits.max_train_steps:
        raise InvalidRequestError(f"this training takes {p.steps} steps ({p.epochs} epochs of {p.steps_per_epoch}), "
                                  f"over your limit of max_train_steps={limits.max_train_steps}")
    stored = opts.model_dump()
    stored["pretrained_model_name_or_path"] = info.title  # pinned, as generation pins its checkpoint
    stored["notes"] = notes + ds.warnings
    stored["steps"], stored["n_iter"] = p.steps, p.epochs  # what progress counts
    return stored, info.sha256


def options_of(params: dict[str, Any], model: type[BaseModel] = TrainOptions) -> Any:
    """A stored job's options (the params also hold muralist's own keys: notes, steps...)."""
    return model.model_validate({k: v for k, v in params.items() if k in model.model_fields})
