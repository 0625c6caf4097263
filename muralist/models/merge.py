"""A1111's checkpoint merger (``modules/extras.py run_modelmerger``), streamed key by key.

Methods, applied to every key containing ``"model"`` that A and B both have (A1111's rules):

* weighted sum ``A·(1−M) + B·M``;
* add difference ``A + M·(B − C)`` (keys of B missing from C give a zero difference);
* no interpolation: A as it is (to convert the format, save as fp16, bake a VAE or discard keys).

An inpainting (9-channel) or instruct-pix2pix (8-channel) A merges with a normal B on the input
channels they share; a normal A with an inpainting B is refused, as in A1111. Keys only in A stay.

A1111 loads all three state dicts at once (three full models in RAM). Here the output's header is
planned from the inputs' headers, then each tensor is read, merged and appended to the file, so
memory holds one key of each input at a time. Safetensors data is read with plain positioned reads,
not through the memory map of ``safetensors.safe_open``: every mapped page a merge touches counts in
the process's resident memory (measured: two open files pushed the peak up by twice the file size).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import struct
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import InvalidRequestError, ModelFileError, NotFoundError
from . import files

METHODS = {"weighted_sum": "Weighted sum", "add_difference": "Add difference", "no_interpolation": "No interpolation"}
FORMATS = ("safetensors", "ckpt")
# A1111's checkpoint_dict_skip_on_merge: an integer index table that must never be averaged.
SKIP_ON_MERGE = frozenset({"cond_stage_model.transformer.text_model.embeddings.position_ids"})
VAE_PREFIX = "first_stage_model."
_VAE_IGNORED = frozenset({"model_ema.decay", "model_ema.num_updates"})  # A1111's vae_ignore_keys

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


class MergeCanceled(Exception):
    """The merge was stopped before it finished; no file was left behind."""


@dataclass(frozen=True)
class Source:
    """One input checkpoint with the names and hashes A1111 records in the merge metadata."""

    path: Path
    name: str  # relative to the checkpoint folder, with extension
    model_name: str  # without extension, as A1111 names merges
    sha256: str
    legacy_hash: str

    @classmethod
    def from_info(cls, info: Any) -> Source:
        return cls(Path(info.path), info.name, info.model_name, info.sha256, info.legacy_hash)

    @classmethod
    def from_file(cls, path: Path) -> Source:
        from . import hashing

        return cls(path, path.name, path.stem, hashing.sha256_file(path), hashing.legacy_hash(path))


@dataclass
class MergeOptions:
    method: str = "weighted_sum"
    multiplier: float = 0.3
    save_as_half: bool = False
    bake_in_vae: Path | None = None
    bake_in_vae_name: str = "None"  # as A1111 records it in the recipe
    discard_weights: str = ""
    custom_name: str = ""
    copy_metadata: bool = True


@dataclass
class MergeResult:
    path: Path
    keys: int
    sha256: str
    is_inpainting: bool
    is_instruct_pix2pix: bool
    metadata: dict[str, str] = field(default_factory=dict)


# ------------------------------------------------------------------------------------- reading


class _Reader:
    """Key-by-key access to a model file: shapes and dtypes without data, one tensor per read."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.metadata: dict[str, str] = {}
        if path.suffix.lower() in files.SAFETENSORS_EXTS:
            self._n, header = files.read_safetensors_header(path)
            self._entries = {k: v for k, v in header.items() if k != "__metadata__"}
            meta = header.get("__metadata__")
            if isinstance(meta, dict):
                self.metadata = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}
            for k, v in self._entries.items():
                if v["dtype"] not in _ST_DTYPES:
                    raise ModelFileError(f"{path}: tensor {k!r} has dtype {v['dtype']}, which the merger cannot read")
            self._file: Any = open(path, "rb")  # noqa: SIM115 (closed by close())
            self._tensors: dict[str, torch.Tensor] | None = None
        else:
            # Pickles only through the weights-only loader; zip checkpoints are memory-mapped, not read whole.
            self._tensors = files.tensors_of(path, files.load_pickle(path, mmap=True))
            self._file = None

    def keys(self) -> list[str]:
        return list(self._tensors if self._tensors is not None else self._entries)

    def __contains__(self, key: str) -> bool:
        return key in (self._tensors if self._tensors is not None else self._entries)

    def spec(self, key: str) -> tuple[torch.dtype, tuple[int, ...]]:
        if self._tensors is not None:
            t = self._tensors[key]
            return t.dtype, tuple(t.shape)
        e = self._entries[key]
        return _ST_DTYPES[e["dtype"]], tuple(int(d) for d in e["shape"])

    def get(self, key: str) -> torch.Tensor:
        if self._tensors is not None:
            return self._tensors[key]
        e = self._entries[key]
        begin, end = (int(o) for o in e["data_offsets"])
        buf = torch.empty(end - begin, dtype=torch.uint8)
        try:
            self._file.seek(8 + self._n + begin)
            got = self._file.readinto(memoryview(buf.numpy()))
        except OSError as exc:
            raise files.read_error(self.path, exc) from exc
        if got != end - begin:
            raise ModelFileError(f"{self.path} is corrupt or truncated (tensor {key!r} ends early)")
        dtype, shape = self.spec(key)
        return buf.view(dtype).reshape(shape)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._tensors = None


def _open(path: Path | None, stack: ExitStack) -> _Reader | None:
    if path is None:
        return None
    reader = _Reader(path)
    stack.callback(reader.close)
    return reader


# ------------------------------------------------------------------------------------- writing


class _SafetensorsWriter:
    """Writes a safetensors file whose header is known up front, tensor by tensor, hashing as it goes."""

    def __init__(self, path: Path, plan: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str]):
        self.path = path
        self.order = [k for k, _, _ in plan]
        self.specs = {k: (d, s) for k, d, s in plan}
        header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
        offset = 0
        for key, dtype, shape in plan:
            n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            header[key] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # tensor data 8-byte aligned, as the library writes it
        self.sha = hashlib.sha256()
        self._f = open(path, "wb")  # noqa: SIM115 (closed by close())
        self._emit(struct.pack("<Q", len(raw)) + raw)
        self._next = 0

    def _emit(self, data: bytes | memoryview) -> None:
        self.sha.update(data)
        self._f.write(data)

    def write(self, key: str, tensor: torch.Tensor) -> None:
        assert self.order[self._next] == key, f"merge wrote {key!r} out of order"
        dtype, shape = self.specs[key]
        t = tensor.to(dtype).contiguous().reshape(-1)
        assert tuple(tensor.shape) == shape, f"{key}: planned {shape}, got {tuple(tensor.shape)}"
        self._emit(memoryview(t.view(torch.uint8).numpy()))
        self._next += 1

    def close(self) -> None:
        self._f.close()


class _CkptWriter:
    """A1111's ``.ckpt`` output (``{"state_dict": ...}``): torch.save needs the whole dict in memory."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sd: dict[str, torch.Tensor] = {}

    def write(self, key: str, tensor: torch.Tensor) -> None:
        self.sd[key] = tensor.clone() if tensor.untyped_storage().size() > tensor.nbytes else tensor

    def close(self) -> None:
        torch.save({"state_dict": self.sd}, self.path)
        self.sd = {}


# ------------------------------------------------------------------------------------- merging


def _to_half(t: torch.Tensor, half: bool) -> torch.Tensor:
    # A1111's to_half: only float32 becomes float16 (bf16, fp16 and integers stay).
    return t.half() if half and t.dtype == torch.float32 else t


def _combine(method: str, a: torch.Tensor, b: torch.Tensor, m: float) -> torch.Tensor:
    """A1111's theta_func2: ``b`` is B for a weighted sum, (B − C) for add difference."""
    if method == "weighted_sum":
        return (1 - m) * a + m * b
    return a + m * b


def _input_channels_differ(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    return len(a) == len(b) >= 2 and a != b and a[:1] + a[2:] == b[:1] + b[2:]


def default_name(method: str, multiplier: float, a: Source, b: Source | None, c: Source | None) -> str:
    """A1111's file name for a merge without a custom name."""
    m = round(multiplier, 2)
    if method == "weighted_sum" and b is not None:
        return f"{round(1 - multiplier, 2)}({a.model_name}) + {m}({b.model_name})"
    if method == "add_difference" and b is not None and c is not None:
        return f"{a.model_name} + {m}({b.model_name} - {c.model_name})"
    return a.model_name


def _parsed(value: str | None) -> Any:
    # A1111 keeps JSON-looking metadata values parsed, so nested recipes stay objects.
    if isinstance(value, str) and value.startswith("{"):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def merge_checkpoints(
    primary: Source,
    secondary: Source | None,
    tertiary: Source | None,
    out_dir: Path,
    name: str,
    opts: MergeOptions,
    save_as: str = "safetensors",
    progress: Callable[[int, int], None] | None = None,
    stopped: Callable[[], bool] | None = None,
) -> MergeResult:
    """Merge as A1111 does and write ``out_dir/<name>[.inpainting].<save_as>``; returns where and what."""
    method, m, half = opts.method, float(opts.multiplier), bool(opts.save_as_half)
    if method not in METHODS:
        raise InvalidRequestError(f"method: unknown merge method {method!r}; choose one of {', '.join(METHODS)}")
    if method != "no_interpolation" and secondary is None:
        raise InvalidRequestError(f"secondary: {method} needs a secondary model (B)")
    if method == "add_difference" and tertiary is None:
        raise InvalidRequestError("tertiary: add_difference needs a tertiary model (C): A + (B - C) × M")
    if save_as not in FORMATS:
        raise InvalidRequestError(f"save_as: {save_as!r} is not one of {', '.join(FORMATS)}")
    discard = re.compile(opts.discard_weights) if opts.discard_weights else None
    if method == "no_interpolation":
        secondary = tertiary = None
    elif method == "weighted_sum":
        tertiary = None

    with ExitStack() as stack:
        ra = _open(primary.path, stack)
        rb = _open(secondary.path if secondary else None, stack)
        rc = _open(tertiary.path if tertiary else None, stack)
        rv = _open(opts.bake_in_vae, stack)
        assert ra is not None
        vae_keys = {}
        if rv is not None:
            vae_keys = {VAE_PREFIX + k: k for k in rv.keys() if not k.startswith("loss") and k not in _VAE_IGNORED}

        # Plan every output key: where it comes from, and its dtype and shape.
        plan: list[tuple[str, torch.dtype, tuple[int, ...]]] = []
        how: dict[str, str] = {}  # "a", "merge", "partial" (shared input channels) or "vae"
        inpainting = pix2pix = False
        for key in ra.keys():
            if discard is not None and discard.search(key):
                continue
            da, sa = ra.spec(key)
            if key in vae_keys:
                dv, sv = rv.spec(vae_keys[key])  # type: ignore[union-attr]
                plan.append((key, torch.float16 if half and dv == torch.float32 else dv, sv))
                how[key] = "vae"
                continue
            if rb is None or "model" not in key or key in SKIP_ON_MERGE or key not in rb:
                # No interpolation halves every key; merges only those they merge (A1111).
                plan.append((key, torch.float16 if half and rb is None and da == torch.float32 else da, sa))
                how[key] = "a"
                continue
            db, sb = rb.spec(key)
            dtypes = [db]
            if rc is not None and key in rc:
                dc, sc = rc.spec(key)
                if sc != sb:
                    raise InvalidRequestError(f"B and C differ in {key!r} ({list(sb)} vs {list(sc)}): "
                                              "add difference needs B and C of the same architecture")
                dtypes.append(dc)
            if sa == sb:
                # The dtype torch's arithmetic gives (int counters averaged become float, as in A1111).
                diff = torch.empty(0, dtype=dtypes[0])
                if len(dtypes) > 1:
                    diff = diff - torch.empty(0, dtype=dtypes[1])
                dt = _combine(method, torch.empty(0, dtype=da), diff, m).dtype
                plan.append((key, torch.float16 if half and dt == torch.float32 else dt, sa))
                how[key] = "merge"
            elif _input_channels_differ(sa, sb) and sb[1] == 4 and sa[1] in (8, 9):
                plan.append((key, torch.float16 if half and da == torch.float32 else da, sa))
                how[key] = "partial"
                inpainting, pix2pix = inpainting or sa[1] == 9, pix2pix or sa[1] == 8
            elif _input_channels_differ(sa, sb) and sa[1] == 4 and sb[1] in (8, 9):
                kind = "an inpainting" if sb[1] == 9 else "an instruct-pix2pix"
                raise InvalidRequestError(
                    f"when merging {kind} model with a normal one, A (primary) must be the {kind[3:]} model")
            else:
                raise InvalidRequestError(f"A and B differ in {key!r} ({list(sa)} vs {list(sb)}): "
                                          "they are different architectures and cannot be merged")

        stem = name + (".inpainting" if inpainting else ".instruct-pix2pix" if pix2pix else "")
        target = out_dir / f"{stem}.{save_as}"
        check_free(target)
        _check_space(out_dir, plan)
        metadata = _metadata(primary, secondary, tertiary, opts, inpainting, pix2pix,
                             [r for r in (ra, rb, rc) if r is not None]) if save_as == "safetensors" else {}

        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = out_dir / f".{stem}.merging.tmp"
        writer: Any = _SafetensorsWriter(tmp, plan, metadata) if save_as == "safetensors" else _CkptWriter(tmp)
        try:
            total = len(plan)
            for i, (key, _dtype, _shape) in enumerate(plan):
                if stopped is not None and stopped():
                    raise MergeCanceled
                writer.write(key, _merged(key, how[key], method, m, half, ra, rb, rc, rv, vae_keys))
                if progress is not None:
                    progress(i + 1, total)
            writer.close()
            check_free(target)  # another merge may have taken the name meanwhile
            os.replace(tmp, target)
        except BaseException:
            if isinstance(writer, _SafetensorsWriter):
                writer.close()
            tmp.unlink(missing_ok=True)
            raise

    from . import hashing

    sha = writer.sha.hexdigest() if isinstance(writer, _SafetensorsWriter) else hashing.sha256_file(target)
    # A1111 copies the primary's config (v-prediction SD2 models need it) next to the merge.
    sidecar = primary.path.with_suffix(".yaml")
    if sidecar.is_file():
        target.with_suffix(".yaml").write_bytes(sidecar.read_bytes())
    return MergeResult(target, len(plan), sha, inpainting, pix2pix, metadata)


def _merged(key: str, how: str, method: str, m: float, half: bool, ra: _Reader, rb: _Reader | None,
            rc: _Reader | None, rv: _Reader | None, vae_keys: dict[str, str]) -> torch.Tensor:
    if how == "vae":
        assert rv is not None
        return _to_half(rv.get(vae_keys[key]), half)
    a = ra.get(key)
    if how == "a":
        return _to_half(a, half and rb is None)
    assert rb is not None
    b = rb.get(key)
    if method == "add_difference":
        b = b - rc.get(key) if rc is not None and key in rc else torch.zeros_like(b)
    if how == "partial":
        a = a.clone()  # a view of a memory-mapped pickle must not be written through
        a[:, 0:4] = _combine(method, a[:, 0:4], b, m)
        return _to_half(a, half)
    return _to_half(_combine(method, a, b, m), half)


def _metadata(a: Source, b: Source | None, c: Source | None, opts: MergeOptions, inpainting: bool, pix2pix: bool,
              readers: list[_Reader]) -> dict[str, str]:
    """A1111's safetensors metadata: the inputs' fields, ``format``, and the merge recipe and lineage."""
    meta: dict[str, str] = {}
    if opts.copy_metadata:
        for r in readers:
            meta.update(r.metadata)
    meta["format"] = "pt"
    recipe = {
        "type": "webui",
        "primary_model_hash": a.sha256,
        "secondary_model_hash": b.sha256 if b else None,
        "tertiary_model_hash": c.sha256 if c else None,
        "interp_method": METHODS[opts.method],
        "multiplier": opts.multiplier,
        "save_as_half": opts.save_as_half,
        "custom_name": opts.custom_name,
        "config_source": 0,  # A1111's "A, B or C": the primary's config
        "bake_in_vae": opts.bake_in_vae_name,
        "discard_weights": opts.discard_weights,
        "is_inpainting": inpainting,
        "is_instruct_pix2pix": pix2pix,
    }
    models: dict[str, Any] = {}
    for src, reader in zip((a, b, c), readers, strict=False):
        if src is None:
            continue
        models[src.sha256] = {"name": src.name, "legacy_hash": src.legacy_hash,
                              "sd_merge_recipe": _parsed(reader.metadata.get("sd_merge_recipe"))}
        inherited = _parsed(reader.metadata.get("sd_merge_models"))
        if isinstance(inherited, dict):
            models.update(inherited)
    meta["sd_merge_recipe"] = json.dumps(recipe)
    meta["sd_merge_models"] = json.dumps(models)
    return meta


# ------------------------------------------------------------------------------------- names

_BAD_NAME = re.compile(r"[\x00-\x1f\x7f/\\:*?\"<>|]")


def output_name(name: str) -> str:
    """A checkpoint file name without extension, refusing anything that could leave the folder."""
    name = (name or "").strip()
    for ext in (".safetensors", ".ckpt"):
        if name.lower().endswith(ext):
            name = name[: -len(ext)]
    if not name:
        raise InvalidRequestError("name: empty output name")
    if _BAD_NAME.search(name) or name.startswith(".") or ".." in name or len(name) > 150:
        raise InvalidRequestError(f"name: {name!r} is not a plain file name (no folders, '..', leading '.', "
                                  "control characters or any of \\ / : * ? \" < > |; at most 150 characters)")
    return name


def _check_space(out_dir: Path, plan: list[tuple[str, torch.dtype, tuple[int, ...]]]) -> None:
    """Refuse before writing anything when the merged file cannot fit (its size is known from the plan)."""
    need = sum(math.prod(shape) * torch.empty(0, dtype=dt).element_size() for _, dt, shape in plan)
    folder = out_dir if out_dir.exists() else out_dir.parent
    free = shutil.disk_usage(folder).free
    margin = 64 * 2**20  # room for the hash cache, logs and the database
    if need + margin > free:
        raise InvalidRequestError(f"not enough disk space for the merge: {need / 2**30:.2f} GiB to write, "
                                  f"{free / 2**30:.2f} GiB free in {folder}")


def check_free(target: Path) -> None:
    if target.exists():
        raise InvalidRequestError(f"name: {target.name} already exists in the checkpoint folder; choose another name")


# ------------------------------------------------------------------------------------- jobs

PARAMS = ("primary", "secondary", "tertiary", "method", "multiplier", "save_as_half", "bake_in_vae",
          "discard_weights", "name", "save_as", "copy_metadata")
_METHOD_ALIASES = {**{k: k for k in METHODS}, **{v.lower(): k for k, v in METHODS.items()}}


def _flag(params: dict[str, Any], key: str, default: bool) -> bool:
    value = params.get(key, default)
    if not isinstance(value, bool):
        raise InvalidRequestError(f"{key}: expected true or false, got {value!r}")
    return value


def check_params(registry: Any, params: dict[str, Any]) -> dict[str, Any]:
    """A merge request checked against ``registry``: the params to store, with the models pinned to
    their titles (a rescan cannot change what a queued merge uses). Errors name the field to fix."""
    unknown = sorted(set(params) - set(PARAMS))
    if unknown:
        raise InvalidRequestError(f"{unknown[0]}: unknown merge parameter; known: {', '.join(PARAMS)}")
    raw_method = str(params.get("method") or "weighted_sum")
    method = _METHOD_ALIASES.get(raw_method.strip().lower())
    if method is None:
        raise InvalidRequestError(f"method: unknown merge method {raw_method!r}; choose one of {', '.join(METHODS)}")
    try:
        multiplier = float(params.get("multiplier", 0.3))
    except (TypeError, ValueError):
        raise InvalidRequestError(f"multiplier: expected a number, got {params.get('multiplier')!r}") from None
    if not math.isfinite(multiplier):
        raise InvalidRequestError("multiplier: must be a finite number")
    needed = {"primary": True, "secondary": method != "no_interpolation", "tertiary": method == "add_difference"}
    infos: dict[str, Any] = {}
    for role, required in needed.items():
        query = params.get(role)
        if not query:
            if required:
                what = {"primary": "model A", "secondary": "model B", "tertiary": "model C: A + (B - C) × M"}[role]
                raise InvalidRequestError(f"{role}: {method} needs a {role} {what}")
            continue
        if not isinstance(query, str):
            raise InvalidRequestError(f"{role}: expected a checkpoint name, got {query!r}")
        if not required:
            continue  # A1111 ignores the models a method does not use
        try:
            info = registry.find_checkpoint(query)
        except NotFoundError as e:
            raise NotFoundError(f"{role}: {e}") from None
        if info.is_diffusers:
            raise InvalidRequestError(f"{role}: {info.title} is a diffusers folder; the merger reads single files")
        infos[role] = info
    a = infos["primary"]
    for role, info in infos.items():
        if info.kind.family is not a.kind.family:
            raise InvalidRequestError(f"{role}: {info.title} is {info.kind.family.label} but the primary is "
                                      f"{a.kind.family.label}; only models of one family merge")
    if "secondary" in infos and infos["secondary"].kind.inpainting and not a.kind.inpainting:
        raise InvalidRequestError("primary: when merging an inpainting model with a normal one, A (primary) must "
                                  "be the inpainting model")
    vae = params.get("bake_in_vae") or None
    if vae in ("None", "none"):
        vae = None
    if vae is not None:
        try:
            vae = registry.find_vae(str(vae)).name
        except NotFoundError as e:
            raise NotFoundError(f"bake_in_vae: {e}") from None
    discard = params.get("discard_weights") or ""
    if not isinstance(discard, str):
        raise InvalidRequestError(f"discard_weights: expected a regular expression, got {discard!r}")
    try:
        re.compile(discard)
    except re.error as e:
        raise InvalidRequestError(f"discard_weights: not a valid regular expression: {e}") from None
    save_as = str(params.get("save_as") or "safetensors").lower().lstrip(".")
    if save_as not in FORMATS:
        raise InvalidRequestError(f"save_as: {save_as!r} is not one of {', '.join(FORMATS)}")
    custom = params.get("name") or ""
    if not isinstance(custom, str):
        raise InvalidRequestError(f"name: expected a file name, got {custom!r}")
    src = {role: Source.from_info(info) for role, info in infos.items()}
    name = output_name(custom) if custom.strip() else output_name(
        default_name(method, multiplier, src["primary"], src.get("secondary"), src.get("tertiary")))
    suffix = ".inpainting" if a.kind.inpainting and "secondary" in infos else ""
    check_free(registry.dirs.ckpt_dir / f"{name}{suffix}.{save_as}")
    return {"primary": a.title, "secondary": infos["secondary"].title if "secondary" in infos else None,
            "tertiary": infos["tertiary"].title if "tertiary" in infos else None, "method": method,
            "multiplier": multiplier, "save_as_half": _flag(params, "save_as_half", False), "bake_in_vae": vae,
            "discard_weights": discard, "name": name, "custom_name": custom, "save_as": save_as,
            "copy_metadata": _flag(params, "copy_metadata", True)}


def run_merge(registry: Any, params: dict[str, Any], progress: Callable[[int, int], None] | None = None,
              stopped: Callable[[], bool] | None = None) -> tuple[MergeResult, Any]:
    """Run a merge whose params passed ``check_params``; the new file is registered (listed, hash
    cached) before this returns. Returns the result and the new checkpoint's registry entry."""
    from . import hashing

    def source(role: str) -> Source | None:
        return Source.from_info(registry.find_checkpoint(params[role])) if params.get(role) else None

    vae = registry.find_vae(params["bake_in_vae"]) if params.get("bake_in_vae") else None
    opts = MergeOptions(method=params["method"], multiplier=float(params["multiplier"]),
                        save_as_half=bool(params["save_as_half"]), bake_in_vae=vae.path if vae else None,
                        bake_in_vae_name=vae.name if vae else "None", discard_weights=params.get("discard_weights", ""),
                        custom_name=params.get("custom_name", ""), copy_metadata=bool(params.get("copy_metadata", True)))
    primary = source("primary")
    assert primary is not None
    result = merge_checkpoints(primary, source("secondary"), source("tertiary"), registry.dirs.ckpt_dir,
                               params["name"], opts, params.get("save_as", "safetensors"), progress, stopped)
    # The sha256 was computed while writing: registering the file does not read it again.
    registry.cache.get(result.path, "sha256", lambda: result.sha256)
    registry.cache.get(result.path, "legacy", lambda: hashing.legacy_hash(result.path))
    registry.refresh()
    return result, registry.find_checkpoint(result.path.relative_to(registry.dirs.ckpt_dir).as_posix())
