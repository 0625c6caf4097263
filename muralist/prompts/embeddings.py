"""Textual inversion embeddings from an A1111 ``embeddings/`` folder.

A prompt uses an embedding by its file name without the extension, as in A1111. Files come in
four shapes, all told apart by content rather than extension:

* A1111's own ``.pt``: ``{"string_to_param": {"*": tensor}, "string_to_token": ..., "name", "step",
  "sd_checkpoint", "sd_checkpoint_name"}`` with exactly one entry in ``string_to_param``;
* SDXL ``.safetensors`` (or pickles) holding ``clip_l`` and ``clip_g`` tensors, one per encoder;
* a single tensor under any key: diffusers ``learned_embeds.bin`` (``{"<token>": tensor}``),
  kohya's ``{"emb_params": tensor}`` safetensors, bare tensor-dict ``.pt`` files;
* anything else is refused with a ``ModelFileError`` naming the file.

A1111 also reads embeddings hidden inside preview images; muralist ignores image files (they are
left in the folder by model-download tools far more often than they carry an embedding).

Pickles are opened only through ``muralist.models.files``' ``torch.load(weights_only=True)``
path, so a file that wants to run code is refused, never executed.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from muralist.errors import ModelFileError
from muralist.models import files
from muralist.models.hashing import HashCache, sha256_file
from muralist.models.registry import natural_key, walk_models
from muralist.paths import DataDirs

__all__ = [
    "DEFAULT",
    "EMBEDDING_EXTS",
    "SDXL_ENCODERS",
    "Embedding",
    "EmbeddingRegistry",
    "load_embedding",
]

log = logging.getLogger(__name__)

EMBEDDING_EXTS = (".pt", ".safetensors", ".bin")
DEFAULT = "default"
SDXL_ENCODERS = ("clip_l", "clip_g")


@dataclass(frozen=True, eq=False)  # eq=False: tensors have no truth value to compare by
class Embedding:
    """One embedding file's vectors, each ``(vector_count, width)`` float32 on the CPU.

    ``vectors`` has the key ``"default"`` for SD1/SD2 files, or ``"clip_l"`` and ``"clip_g"``
    for SDXL files. ``shorthash`` is what A1111 writes to "TI hashes": sha256 of the file, 12 hex.
    """

    name: str
    path: Path
    vectors: dict[str, torch.Tensor]
    shorthash: str
    sha256: str = ""
    step: int | None = None
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None

    def __post_init__(self) -> None:
        keys = set(self.vectors)
        if keys != {DEFAULT} and keys != set(SDXL_ENCODERS):
            raise ValueError(
                f"embedding vectors need the key 'default' or 'clip_l'+'clip_g', not {sorted(keys)}"
            )
        clean: dict[str, torch.Tensor] = {}
        for key, vec in self.vectors.items():
            if vec.ndim != 2 or vec.shape[0] < 1 or vec.shape[1] < 1:
                raise ValueError(
                    f"embedding vector {key!r} must be (n_vectors, width), not {tuple(vec.shape)}"
                )
            clean[key] = vec.detach().to(device="cpu", dtype=torch.float32).contiguous()
        if len({v.shape[0] for v in clean.values()}) != 1:
            # Both SDXL encoders must insert the same number of tokens, or the prompts desync.
            counts = ", ".join(f"{k} {v.shape[0]}" for k, v in clean.items())
            raise ValueError(f"embedding encoders have different vector counts ({counts})")
        object.__setattr__(self, "vectors", clean)

    @property
    def vector_count(self) -> int:
        """How many prompt tokens the embedding occupies."""
        return next(iter(self.vectors.values())).shape[0]

    @property
    def is_sdxl(self) -> bool:
        return DEFAULT not in self.vectors

    @property
    def widths(self) -> dict[str, int]:
        """Encoder key -> vector width."""
        return {key: vec.shape[1] for key, vec in self.vectors.items()}

    @property
    def shape(self) -> int:
        """A1111's ``shape`` (as in /sdapi/v1/embeddings): the width, summed over SDXL's encoders."""
        return sum(self.widths.values())

    def vector_for(self, width: int, encoder: str = DEFAULT) -> torch.Tensor | None:
        """The vectors to insert for ``encoder`` whose token width is ``width``, or None if none fit.

        SDXL callers pass ``encoder="clip_l"``/``"clip_g"``; a ``"default"`` vector serves any
        encoder of its width.
        """
        for key in (encoder, DEFAULT):
            vec = self.vectors.get(key)
            if vec is not None and vec.shape[1] == width:
                return vec
        return None


# -- reading one file -----------------------------------------------------------------------


def _vectors(path: Path, value: Any, what: str) -> torch.Tensor:
    """``value`` as (n, width) float32; a bare (width,) vector is one token."""
    if not isinstance(value, torch.Tensor):
        raise ModelFileError(f"{path} is not an embedding: {what} is a {type(value).__name__}, not a tensor")
    if not value.is_floating_point():
        raise ModelFileError(f"{path} is not an embedding: {what} holds {value.dtype}, not floats")
    if value.ndim == 1:
        value = value.unsqueeze(0)
    if value.ndim != 2 or value.shape[0] < 1 or value.shape[1] < 1:
        raise ModelFileError(
            f"{path} is not an embedding: {what} has shape {tuple(value.shape)}, expected (vectors, width)"
        )
    # copy=True: a memory-mapped pickle must not stay open behind the registry's back.
    return value.detach().to(dtype=torch.float32, copy=True).contiguous()


def _optional(data: Mapping[str, Any], key: str, kind: type) -> Any:
    value = data.get(key)
    return value if isinstance(value, kind) and not isinstance(value, bool) else None


def _parse(path: Path, data: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The vectors by encoder key and A1111's informational fields (step, sd_checkpoint...)."""
    if not isinstance(data, dict):
        raise ModelFileError(f"{path} is not an embedding: it holds a {type(data).__name__}, not a dict")
    meta = {
        "step": _optional(data, "step", int),
        "sd_checkpoint": _optional(data, "sd_checkpoint", str),
        "sd_checkpoint_name": _optional(data, "sd_checkpoint_name", str),
    }
    if "string_to_param" in data:
        params = data["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            count = len(params) if isinstance(params, dict) else type(params).__name__
            raise ModelFileError(
                f"{path} is not a usable embedding: string_to_param must hold one entry, found {count}"
            )
        ((key, value),) = params.items()
        return {DEFAULT: _vectors(path, value, f"string_to_param[{key!r}]")}, meta
    if "clip_l" in data and "clip_g" in data:
        vecs = {k: _vectors(path, data[k], k) for k in SDXL_ENCODERS}
        if vecs["clip_l"].shape[0] != vecs["clip_g"].shape[0]:
            raise ModelFileError(
                f"{path} is not a usable SDXL embedding: clip_l has {vecs['clip_l'].shape[0]} vectors "
                f"but clip_g has {vecs['clip_g'].shape[0]}"
            )
        return vecs, meta
    tensors = {str(k): v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if len(tensors) == 1:  # diffusers {"<token>": t}, kohya {"emb_params": t}, bare tensor dicts
        ((key, value),) = tensors.items()
        return {DEFAULT: _vectors(path, value, repr(key))}, meta
    raise ModelFileError(_not_embedding(path, list(tensors)))


def _not_embedding(path: Path, tensor_names: list[str]) -> str:
    if not tensor_names:
        found = "no tensors"
    else:
        shown = ", ".join(tensor_names[:3]) + (", ..." if len(tensor_names) > 3 else "")
        found = f"{len(tensor_names)} tensors ({shown})"
    return (
        f"{path} is not a textual inversion embedding: found {found}; expected string_to_param, "
        "clip_l + clip_g, or a single tensor (a model or LoRA in the embeddings folder?)"
    )


def _read(path: Path) -> Any:
    """The file's contents as plain data, read without running any code from it."""
    if path.suffix.lower() == ".safetensors":
        # Header first: a checkpoint dropped here by mistake is refused without reading gigabytes.
        _, header = files.read_safetensors_header(path)
        names = [k for k in header if k != "__metadata__"]
        if len(names) != 1 and not set(SDXL_ENCODERS) <= set(names):
            raise ModelFileError(_not_embedding(path, names))
        return files.load_state_dict(path)
    # Reuses the model loader's weights_only torch.load, its allowlist and its error messages;
    # load_state_dict itself can't be used because it drops the nested string_to_param dict.
    return files.load_pickle(path, mmap=True)


def load_embedding(path: str | os.PathLike[str], *, sha256: Callable[[Path], str] = sha256_file) -> Embedding:
    """One embedding file, named by its stem as in A1111.

    ``sha256`` hashes the file (the registry passes a cached one); it runs only after the
    content parsed, so junk files are never hashed. Raises ``ModelFileError`` naming the file.
    """
    path = Path(path)
    if path.suffix.lower() not in EMBEDDING_EXTS:
        raise ModelFileError(f"{path} is not an embedding file; expected one of {', '.join(EMBEDDING_EXTS)}")
    if path.is_dir():
        raise ModelFileError(f"{path} is a folder, not an embedding file")
    vectors, meta = _parse(path, _read(path))
    try:
        digest = sha256(path)
    except OSError as exc:
        raise files.read_error(path, exc) from exc
    return Embedding(name=path.stem, path=path, vectors=vectors, shorthash=digest[:12], sha256=digest, **meta)


# -- the folder -----------------------------------------------------------------------------


def _walk(root: Path) -> Iterator[Path]:
    """Embedding files under ``root`` in A1111's order (hidden files and folders skipped)."""
    return (p for p, _ in walk_models(root) if p.suffix.lower() in EMBEDDING_EXTS)


_Stamp = tuple[int, int]  # (size, mtime_ns): a change means the file must be reread


class EmbeddingRegistry:
    """The embeddings under ``dirs.embeddings_dir``, scanned on first use and after ``refresh()``.

    Parsed files (and the reasons for unreadable ones) are kept by path, size and mtime, so a
    rescan rereads only what changed; hashes go through the shared ``HashCache``.
    """

    def __init__(self, dirs: DataDirs, cache: HashCache | None = None) -> None:
        self.dirs = dirs
        self.cache = cache or HashCache(dirs.cache_dir / "hashes.json")
        self._lock = threading.RLock()
        self._parsed: dict[Path, tuple[_Stamp, Embedding | str]] = {}
        self._embeddings: dict[str, Embedding] | None = None
        self._errors: list[tuple[Path, str]] = []

    # -- public -----------------------------------------------------------------------------

    def refresh(self) -> None:
        """Forget the listing; the next call rescans (unchanged files are not reread)."""
        with self._lock:
            self._embeddings = None

    def all(self) -> dict[str, Embedding]:
        """Every readable embedding by name, sorted by name; the first file with a name wins."""
        with self._lock:
            return dict(self._scanned())

    def errors(self) -> list[tuple[Path, str]]:
        """Files in the embeddings folder that could not be read, with the reason."""
        with self._lock:
            self._scanned()
            return list(self._errors)

    def for_model(self, widths: Mapping[str, int]) -> tuple[dict[str, Embedding], dict[str, str]]:
        """(embeddings usable with a model, name -> why the others are not).

        ``widths`` is the model's text encoder width(s): ``{"default": 768}`` for SD1,
        ``{"default": 1024}`` for SD2, ``{"clip_l": 768, "clip_g": 1280}`` for SDXL. As in A1111,
        an embedding is usable only where its vectors fit every encoder of the model.
        """
        _check_widths(widths)
        loaded: dict[str, Embedding] = {}
        skipped: dict[str, str] = {}
        for name, emb in self.all().items():
            reason = _mismatch(emb, widths)
            if reason is None:
                loaded[name] = emb
            else:
                skipped[name] = reason
        return loaded, skipped

    # -- scanning ---------------------------------------------------------------------------

    def _scanned(self) -> dict[str, Embedding]:
        if self._embeddings is None:
            self._scan()
        assert self._embeddings is not None
        return self._embeddings

    def _scan(self) -> None:
        parsed: dict[Path, tuple[_Stamp, Embedding | str]] = {}
        found: dict[str, Embedding] = {}
        errors: list[tuple[Path, str]] = []
        for path in _walk(self.dirs.embeddings_dir):
            try:
                st = path.stat()
            except OSError as exc:
                errors.append((path, f"cannot read {path}: {exc.strerror or exc}"))
                continue
            if st.st_size == 0:
                continue  # as in A1111: most likely a download still being written
            stamp = (st.st_size, st.st_mtime_ns)
            cached = self._parsed.get(path)
            if cached is not None and cached[0] == stamp:
                result = cached[1]
                parsed[path] = cached
            else:
                result, keep = self._load(path, stamp)
                if keep:
                    parsed[path] = (stamp, result)
            if isinstance(result, str):
                errors.append((path, result))
            elif result.name in found:
                log.warning("embedding %s ignored: %s has the same name", path, found[result.name].path)
            else:
                found[result.name] = result
        for _, reason in errors:
            log.warning("embedding skipped: %s", reason)  # the reason names the file
        self._parsed = parsed  # drops deleted files
        self._embeddings = {name: found[name] for name in sorted(found, key=natural_key)}
        self._errors = errors

    def _load(self, path: Path, stamp: _Stamp) -> tuple[Embedding | str, bool]:
        """The embedding or why it is unusable, and whether that verdict may be cached."""
        try:
            result: Embedding | str = load_embedding(path, sha256=self._sha256)
        except ModelFileError as exc:
            # I/O trouble may pass: report it, but don't remember it as the file's verdict.
            return str(exc), not isinstance(exc.__cause__, OSError)
        except OSError as exc:
            return f"cannot read {path}: {exc.strerror or exc}", False
        try:
            st = path.stat()
        except OSError:
            return result, False
        # Rewritten while we read it: use what we got, but reread the finished file next scan.
        return result, (st.st_size, st.st_mtime_ns) == stamp

    def _sha256(self, path: Path) -> str:
        return self.cache.sha256(path)


def _check_widths(widths: Mapping[str, int]) -> None:
    keys = set(widths)
    if keys != {DEFAULT} and keys != set(SDXL_ENCODERS):
        raise ValueError(
            f"widths must be {{'default': w}} or {{'clip_l': w, 'clip_g': w}}, not {dict(widths)}"
        )


def _mismatch(emb: Embedding, widths: Mapping[str, int]) -> str | None:
    """Why ``emb`` cannot be used with a model of these encoder widths, or None if it can."""
    have = emb.widths
    if DEFAULT in widths:
        want = widths[DEFAULT]
        if emb.is_sdxl:
            return (
                f"SDXL embedding (clip_l {have['clip_l']} + clip_g {have['clip_g']}) does not fit "
                f"the model's single text encoder of width {want}"
            )
        if have[DEFAULT] != want:
            return f"vector width {have[DEFAULT]} does not match the model's {want}"
        return None
    l_want, g_want = widths["clip_l"], widths["clip_g"]
    if not emb.is_sdxl:
        return (
            f"vector width {have[DEFAULT]} does not match the model's clip_l {l_want} + clip_g {g_want} "
            "(SDXL needs an SDXL embedding)"
        )
    if (have["clip_l"], have["clip_g"]) != (l_want, g_want):
        return (
            f"vector widths clip_l {have['clip_l']} + clip_g {have['clip_g']} do not match "
            f"the model's clip_l {l_want} + clip_g {g_want}"
        )
    return None
