"""The installed checkpoints and VAEs, named, hashed and looked up the way A1111 does.

A1111 clients select models by "title" (``name [shorthash]``), by name, or by a hash copied from
an infotext; all of those resolve here. Scanning reads each model file once: hashes and the
detected model kind are kept in a ``HashCache`` keyed by size and mtime.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..errors import ModelFileError, MuralistError, not_found
from ..paths import DataDirs
from . import files, hashing
from .family import Family, ModelKind, detect_kind

log = logging.getLogger(__name__)

EPSILON = "epsilon"
V_PREDICTION = "v_prediction"
_PREDICTION_ALIASES = {"epsilon": EPSILON, "eps": EPSILON, "v_prediction": V_PREDICTION, "v": V_PREDICTION}

# A1111 lists only these as checkpoints; .pt/.bin in the checkpoint folder are usually other things.
CHECKPOINT_EXTS = (".safetensors", ".ckpt")
VAE_EXTS = (".safetensors", ".pt", ".ckpt")
ADJACENT_VAE_SUFFIXES = (".vae.pt", ".vae.safetensors", ".vae.ckpt")

# Bump when family detection changes, so cached verdicts (including "this is a LoRA") are redone.
_KIND_FIELD = "kind.1"

_SD_PIPELINES = {
    "StableDiffusionPipeline",
    "StableDiffusionInpaintPipeline",
    "StableDiffusionImg2ImgPipeline",
}
_SDXL_PIPELINES = {
    "StableDiffusionXLPipeline",
    "StableDiffusionXLInpaintPipeline",
    "StableDiffusionXLImg2ImgPipeline",
}
_UNET_WEIGHT_NAMES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.fp16.bin",
    # Sharded UNets: the index stands in for the weights (hashing every shard would do too,
    # but A1111 has no convention for folders anyway).
    "diffusion_pytorch_model.safetensors.index.json",
    "diffusion_pytorch_model.bin.index.json",
)


def natural_key(text: str) -> list[Any]:
    """A1111's sort order: case-insensitive, digit runs compared as numbers ("v2" < "v10")."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", text)] + [text]


@dataclass(frozen=True)
class CheckpointInfo:
    """One checkpoint file (or diffusers folder), with A1111's names for it."""

    path: Path
    name: str  # relative to the checkpoint folder, with extension, "/"-separated
    model_name: str  # name without extension, "/" and "\\" replaced by "_"
    sha256: str
    shorthash: str  # "AutoV2": sha256[:10], the infotext "Model hash"
    legacy_hash: str  # A1111's pre-2023 8-hex hash
    title: str  # f"{name} [{shorthash}]", what clients send as sd_model_checkpoint
    kind: ModelKind
    prediction_type: str  # "epsilon" or "v_prediction"
    size: int
    is_diffusers: bool = False
    config: Path | None = None  # the A1111 .yaml sidecar, when there is one

    @property
    def family_label(self) -> str:
        return self.kind.label


@dataclass(frozen=True)
class VaeInfo:
    """One VAE file; ``name`` is the file name, as A1111's infotext "VAE" shows it."""

    path: Path
    name: str
    sha256: str
    shorthash: str


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelFileError(f"{path} is missing") from None
    except (OSError, ValueError) as exc:
        raise ModelFileError(f"{path} is not readable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ModelFileError(f"{path} is not a JSON object")
    return data


def _yaml_parameterization(path: Path) -> str | None:
    """The prediction type an A1111 sidecar .yaml declares, or None (also for a broken file)."""
    try:
        conf = yaml.safe_load(path.read_text(encoding="utf-8"))
        value = conf["model"]["params"].get("parameterization")
    except Exception:  # noqa: BLE001 - any broken sidecar just means "no opinion"
        return None
    if value == "v":
        return V_PREDICTION
    if value == "eps":
        return EPSILON
    return None


class ModelRegistry:
    """Checkpoints and VAEs under ``DataDirs``, scanned lazily and rescanned after ``refresh()``."""

    def __init__(self, dirs: DataDirs, cache: hashing.HashCache | None = None) -> None:
        self.dirs = dirs
        self.cache = cache or hashing.HashCache(dirs.cache_dir / "hashes.json")
        self._lock = threading.RLock()
        self._checkpoints: list[CheckpointInfo] | None = None
        self._vaes: list[VaeInfo] = []
        self._skipped: list[tuple[Path, str]] = []

    # -- public -----------------------------------------------------------------------------

    def refresh(self) -> None:
        """Forget the listing; the next call rescans (unchanged files are not reread)."""
        with self._lock:
            self._checkpoints = None

    def checkpoints(self) -> list[CheckpointInfo]:
        with self._lock:
            self._ensure_scanned()
            assert self._checkpoints is not None
            return list(self._checkpoints)

    def skipped(self) -> list[tuple[Path, str]]:
        """Files in the model folders that could not be used, with the reason."""
        with self._lock:
            self._ensure_scanned()
            return list(self._skipped)

    def vaes(self) -> list[VaeInfo]:
        with self._lock:
            self._ensure_scanned()
            return list(self._vaes)

    def find_checkpoint(self, query: str) -> CheckpointInfo:
        """The checkpoint a client means by ``query`` (title, name, model_name or hash)."""
        cks = self.checkpoints()
        q = query.strip()
        found = self._match_checkpoint(q, cks)
        if found is None:
            raise not_found("model", query, [c.title for c in cks])
        return found

    def default_checkpoint(self) -> CheckpointInfo:
        cks = self.checkpoints()
        if cks:
            return cks[0]
        msg = f"no checkpoints found: put Stable Diffusion .safetensors files in {self.dirs.ckpt_dir}"
        skipped = self.skipped()
        if skipped:
            path, reason = skipped[0]
            msg += f" ({len(skipped)} file(s) skipped, e.g. {path.name}: {reason})"
        raise MuralistError(msg)

    def find_vae(self, query: str) -> VaeInfo:
        vaes = self.vaes()
        q = query.strip()
        rules: list[Callable[[VaeInfo], bool]] = [
            lambda v: v.name == q,
            lambda v: os.path.splitext(v.name)[0] == q,
            lambda v: v.shorthash == q.lower(),
            lambda v: v.sha256 == q.lower(),
        ]
        for rule in rules:
            for v in vaes:
                if rule(v):
                    return v
        raise not_found("VAE", query, [v.name for v in vaes])

    # -- lookup -----------------------------------------------------------------------------

    @staticmethod
    def _match_checkpoint(q: str, cks: list[CheckpointInfo]) -> CheckpointInfo | None:
        if not q:
            return None
        h = q.lower()
        rules: list[Callable[[CheckpointInfo], bool]] = [
            lambda c: c.title == q,
            lambda c: c.name == q,
            lambda c: _strip_ext(c) == q,
            lambda c: c.model_name == q,
            lambda c: c.shorthash == h,
            lambda c: c.sha256 == h,
            lambda c: c.legacy_hash == h,
        ]
        for rule in rules:
            for c in cks:
                if rule(c):
                    return c
        prefixed = sorted((c for c in cks if c.title.startswith(q)), key=lambda c: len(c.title))
        if prefixed:
            return prefixed[0]
        # A1111 also answers to the bare file stem ("sub/foo.safetensors" -> "foo")...
        for c in cks:
            if Path(c.name).stem == q:
                return c
        # ...and to a title whose bracket holds another hash (old 8-hex titles, a re-saved file).
        stripped = re.sub(r"\s*\[[0-9a-fA-F]+\]\s*$", "", q)
        if stripped != q:
            return ModelRegistry._match_checkpoint(stripped, cks)
        return None

    # -- scanning ---------------------------------------------------------------------------

    def _ensure_scanned(self) -> None:
        if self._checkpoints is None:
            self._scan()

    def _scan(self) -> None:
        settings = self._model_settings()
        checkpoints: list[CheckpointInfo] = []
        skipped: list[tuple[Path, str]] = []
        vae_paths: dict[str, Path] = {}

        ckpt_dir = self.dirs.ckpt_dir
        for path, is_folder in walk_models(ckpt_dir, diffusers=True):
            rel = path.relative_to(ckpt_dir).as_posix()
            lower = path.name.lower()
            try:
                if is_folder:
                    checkpoints.append(self._diffusers_info(path, rel, settings))
                elif lower.endswith(ADJACENT_VAE_SUFFIXES):
                    vae_paths[path.name] = path
                elif path.suffix.lower() in CHECKPOINT_EXTS:
                    checkpoints.append(self._checkpoint_info(path, rel, settings))
            except ModelFileError as exc:
                skipped.append((path, str(exc)))
            except OSError as exc:
                skipped.append((path, f"cannot read {path}: {exc.strerror or exc}"))

        # Like A1111, the VAE folder comes last, so it wins a file-name clash.
        for path, _ in walk_models(self.dirs.vae_dir):
            if path.suffix.lower() in VAE_EXTS:
                vae_paths[path.name] = path
        vaes: list[VaeInfo] = []
        for name, path in vae_paths.items():
            try:
                sha = self.cache.sha256(path)
            except OSError as exc:
                skipped.append((path, f"cannot read {path}: {exc.strerror or exc}"))
                continue
            vaes.append(VaeInfo(path=path, name=name, sha256=sha, shorthash=hashing.shorthash(sha)))

        checkpoints.sort(key=lambda c: natural_key(c.name))
        vaes.sort(key=lambda v: natural_key(v.name))
        for path, reason in skipped:
            log.warning("skipped %s: %s", path, reason)
        self._checkpoints, self._vaes, self._skipped = checkpoints, vaes, skipped

    def _model_settings(self) -> dict[str, dict[str, Any]]:
        """``<data root>/model-settings.json``: per-model overrides A1111 has no file format for."""
        path = self.dirs.root / "model-settings.json"
        if not path.exists():
            return {}
        try:
            data = _read_json(path)
        except ModelFileError as exc:
            log.warning("ignoring %s", exc)
            return {}
        return {str(k): v for k, v in data.items() if isinstance(v, dict)}

    def _hashes(self, path: Path) -> tuple[str, str]:
        sha = self.cache.sha256(path)
        legacy = self.cache.get(path, "legacy", lambda: hashing.legacy_hash(path))
        return sha, legacy

    def _checkpoint_info(self, path: Path, rel: str, settings: dict[str, dict[str, Any]]) -> CheckpointInfo:
        facts = self.cache.get(path, _KIND_FIELD, lambda: _detect(path))
        if "error" in facts:
            raise ModelFileError(facts["error"])
        kind = ModelKind(Family(facts["family"]), bool(facts["inpainting"]))
        # Detect before hashing: a LoRA dropped in the wrong folder is never hashed.
        sha, legacy = self._hashes(path)
        sidecar = path.with_suffix(".yaml")
        config = sidecar if sidecar.is_file() else None
        prediction = V_PREDICTION if facts.get("v_pred") else EPSILON
        if config is not None:
            prediction = _yaml_parameterization(config) or prediction
        return self._make_info(
            path, rel, kind, sha, legacy, prediction, settings,
            size=path.stat().st_size, is_diffusers=False, config=config,
        )  # fmt: skip

    def _diffusers_info(self, folder: Path, rel: str, settings: dict[str, dict[str, Any]]) -> CheckpointInfo:
        # Only small JSON configs are read here; the UNet weights are hashed (and cached).
        index = _read_json(folder / "model_index.json")
        cls = index.get("_class_name")
        unet_conf = _read_json(folder / "unet" / "config.json")
        if cls in _SD_PIPELINES:
            act = _read_json(folder / "text_encoder" / "config.json").get("hidden_act")
            if act == "quick_gelu":
                family = Family.SD1
            elif act == "gelu":
                family = Family.SD2
            else:
                raise ModelFileError(f"diffusers folder {folder}: unknown text encoder activation {act!r}")
        elif cls in _SDXL_PIPELINES:
            te = index.get("text_encoder")
            if not isinstance(te, list) or te[0] is None:
                raise ModelFileError(f"diffusers folder {folder}: SDXL refiners are not supported yet")
            family = Family.SDXL
        else:
            raise ModelFileError(f"diffusers folder {folder}: unsupported pipeline {cls!r}")
        in_channels = unet_conf.get("in_channels")
        if in_channels not in (4, 9):
            raise ModelFileError(
                f"diffusers folder {folder}: unsupported UNet with {in_channels} input channels"
            )
        kind = ModelKind(family, in_channels == 9)

        weights = next(
            (folder / "unet" / n for n in _UNET_WEIGHT_NAMES if (folder / "unet" / n).is_file()), None
        )
        if weights is None:
            raise ModelFileError(f"diffusers folder {folder} has no UNet weights in unet/")
        sha, legacy = self._hashes(weights)
        prediction = EPSILON
        sched = folder / "scheduler" / "scheduler_config.json"
        if sched.is_file():
            prediction = _PREDICTION_ALIASES.get(str(_read_json(sched).get("prediction_type")), EPSILON)
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        return self._make_info(
            folder, rel, kind, sha, legacy, prediction, settings, size=size, is_diffusers=True, config=None
        )

    def _make_info(
        self,
        path: Path,
        name: str,
        kind: ModelKind,
        sha: str,
        legacy: str,
        prediction: str,
        settings: dict[str, dict[str, Any]],
        *,
        size: int,
        is_diffusers: bool,
        config: Path | None,
    ) -> CheckpointInfo:
        # A diffusers folder has no extension to strip ("sd-1.5" must stay whole).
        bare = name if is_diffusers else os.path.splitext(name)[0]
        model_name = bare.replace("/", "_").replace("\\", "_")
        short = hashing.shorthash(sha)
        title = f"{name} [{short}]"
        for key in (name, bare, model_name, title):
            if key in settings and "prediction_type" in settings[key]:
                value = _PREDICTION_ALIASES.get(str(settings[key]["prediction_type"]))
                if value is None:
                    log.warning(
                        "model-settings.json: %s: unknown prediction_type %r",
                        key,
                        settings[key]["prediction_type"],
                    )
                else:
                    prediction = value
                break
        return CheckpointInfo(
            path=path,
            name=name,
            model_name=model_name,
            sha256=sha,
            shorthash=short,
            legacy_hash=legacy,
            title=title,
            kind=kind,
            prediction_type=prediction,
            size=size,
            is_diffusers=is_diffusers,
            config=config,
        )


def _strip_ext(c: CheckpointInfo) -> str:
    return c.name if c.is_diffusers else os.path.splitext(c.name)[0]


def _detect(path: Path) -> dict[str, Any]:
    """The cacheable verdict on a checkpoint file: its kind, or why it is not one."""
    try:
        shapes = files.read_shapes(path)
        kind = detect_kind(shapes)
    except ModelFileError as exc:
        if isinstance(exc.__cause__, OSError):
            raise  # I/O trouble may pass; don't remember it as the file's verdict
        return {"error": str(exc)}
    # Some v-prediction SDXL finetunes mark themselves with an empty "v_pred" tensor.
    return {"family": kind.family.value, "inpainting": kind.inpainting, "v_pred": "v_pred" in shapes}


def walk_models(root: Path, diffusers: bool = False) -> Iterator[tuple[Path, bool]]:
    """Files under ``root`` in A1111's order, and diffusers folders as single entries.

    Hidden folders (``.git``, ``.ipynb_checkpoints``) are skipped; symlinked folders are
    followed once each, so a link loop cannot hang the scan.
    """
    if not root.is_dir():
        return
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        here = Path(dirpath)
        if diffusers and here != root and "model_index.json" in filenames:
            dirnames[:] = []
            yield here, True
            continue
        dirnames[:] = sorted((d for d in dirnames if not d.startswith(".")), key=natural_key)
        for name in sorted(filenames, key=natural_key):
            if not name.startswith("."):
                yield here / name, False
