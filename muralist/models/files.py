"""Reading model files without trusting them.

Model files come from the internet. ``.safetensors`` files are parsed by hand (header only) or by
the safetensors library; pickle-based files (``.ckpt``, ``.pt``, ``.pth``, ``.bin``) are only ever
opened with ``torch.load(weights_only=True)``, which refuses any pickle that would call code. There
is deliberately no ``weights_only=False`` fallback anywhere in muralist.

Every failure is a ``ModelFileError`` whose message is one line naming the file.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import struct
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelFileError

SAFETENSORS_EXTS = (".safetensors",)
PICKLE_EXTS = (".ckpt", ".pt", ".pth", ".bin")
MODEL_EXTS = SAFETENSORS_EXTS + PICKLE_EXTS

# The safetensors library refuses headers above 100 MB; anything bigger is garbage, and the
# limit keeps a corrupt length field from making us allocate gigabytes.
MAX_HEADER_BYTES = 100_000_000

_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4,
    "U64": 8, "I64": 8, "F64": 8, "C64": 8,
}  # fmt: skip

_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = 0x80  # torch.save's legacy format is a protocol-2 pickle


def _corrupt(path: Path, why: str) -> ModelFileError:
    return ModelFileError(f"{path} is corrupt or truncated ({why})")


def _check_file(path: Path, exts: tuple[str, ...] = MODEL_EXTS) -> str:
    """The file's lower-case extension, after checking it exists and is one we read."""
    ext = path.suffix.lower()
    if not path.exists():
        raise ModelFileError(f"{path} does not exist")
    if path.is_dir():
        raise ModelFileError(f"{path} is a folder, not a model file")
    if ext not in exts:
        raise ModelFileError(
            f"{path} has an unsupported extension {ext or '(none)'!r}; expected one of {', '.join(exts)}"
        )
    return ext


def read_error(path: Path, exc: OSError) -> ModelFileError:
    err = ModelFileError(f"cannot read {path}: {exc.strerror or exc}")
    err.__cause__ = exc  # callers use this to tell I/O trouble from bad content
    return err


def read_safetensors_header(path: str | os.PathLike[str]) -> tuple[int, dict[str, Any]]:
    """The header length and the parsed JSON header of a safetensors file, validated.

    Checks that the length field is sane and that every tensor's byte range lies inside the file,
    so a truncated download is caught here without reading any tensor data.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise _corrupt(path, f"{size} bytes is too short for a safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n < 2 or n > MAX_HEADER_BYTES:
                raise _corrupt(path, f"implausible header length {n}")
            if 8 + n > size:
                raise _corrupt(path, f"header needs {8 + n} bytes but the file has {size}")
            raw = f.read(n)
    except OSError as exc:
        raise read_error(path, exc) from exc
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _corrupt(path, f"header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "header is not a JSON object")

    data_size = size - 8 - n
    end_max = 0
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype = entry["dtype"]
            shape = [int(d) for d in entry["shape"]]
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise _corrupt(path, f"bad header entry for tensor {key!r}") from None
        if begin < 0 or end < begin or any(d < 0 for d in shape):
            raise _corrupt(path, f"bad offsets or shape for tensor {key!r}")
        itemsize = _DTYPE_BYTES.get(dtype)
        if itemsize is not None and (end - begin) != math.prod(shape) * itemsize:
            raise _corrupt(path, f"tensor {key!r} has {end - begin} bytes for shape {shape} of {dtype}")
        end_max = max(end_max, end)
    if end_max > data_size:
        raise _corrupt(
            path, f"header declares {end_max} bytes of tensor data but only {data_size} are present"
        )
    return n, header


def safetensors_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors header (training info, LoRA settings...); {} if absent."""
    _check_file(Path(path), SAFETENSORS_EXTS)
    _, header = read_safetensors_header(path)
    meta = header.get("__metadata__")
    if not isinstance(meta, dict):
        return {}
    # The format says str -> str, but some tools write nested JSON; keep it as text.
    return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}


def _refusal(path: Path, message: str) -> ModelFileError:
    # Name the offending global or operation, not torch's multi-paragraph advice.
    m = re.search(r"GLOBAL (\S+)", message)
    if m:
        detail = f"it references {m.group(1)}"
    else:
        m = re.search(r"(Trying to call reduce[^\n]*|Can only [^\n]*|Unsupported operand[^\n]*)", message)
        detail = m.group(1).strip() if m else "it is not a plain tensor pickle"
    return ModelFileError(
        f"refused to load {path}: the pickle wants to run code ({detail}); muralist only loads plain "
        "tensors — convert it to .safetensors from a trusted source"
    )


class _Inert:
    """Stands in for training metadata that old checkpoints pickle next to the weights.

    A1111 allowlists these globals (Lightning's ModelCheckpoint state, numpy scalars in
    ``callbacks``); without a stand-in, torch would refuse many genuine SD1.x ``.ckpt`` files.
    The stand-in runs nothing from the file: it accepts and ignores its arguments and state,
    and the object is dropped anyway because only tensors are kept.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> _Inert:
        return super().__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


_INERT_GLOBALS = (
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
    "numpy.core.multiarray.scalar",
    "numpy.core.multiarray._reconstruct",
    "numpy._core.multiarray.scalar",
    "numpy._core.multiarray._reconstruct",
    "numpy.dtype",
    "numpy.ndarray",
)
_inert_registered = False


def _register_inert_globals() -> None:
    # Registered once, process-wide: torch's per-call ``safe_globals`` context edits the same
    # global set and is not safe when two threads load at once.
    global _inert_registered
    if not _inert_registered:
        torch.serialization.add_safe_globals([(_Inert, name) for name in _INERT_GLOBALS])
        _inert_registered = True


def _torch_load(path: Path, mmap: bool) -> Any:
    """torch.load that only ever unpickles plain data; errors become one-line ModelFileErrors."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise read_error(path, exc) from exc
    if not (magic.startswith(_ZIP_MAGIC) or (magic and magic[0] == _PICKLE_PROTO)):
        raise _corrupt(path, "not a PyTorch zip or pickle file")
    # mmap only works for the zip format; old-style pickles are read whole.
    mmap = mmap and magic.startswith(_ZIP_MAGIC)
    _register_inert_globals()
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        # With weights_only=True this means the pickle asked for something other than tensors.
        raise _refusal(path, str(exc)) from None
    except RuntimeError as exc:
        if mmap and "mmap" in str(exc):
            return _torch_load(path, mmap=False)
        raise _corrupt(path, _first_line(exc)) from None
    except OSError as exc:
        raise read_error(path, exc) from exc
    except MemoryError:
        raise
    except Exception as exc:  # EOFError, KeyError, ValueError...: a damaged pickle
        raise _corrupt(path, f"{type(exc).__name__}: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    # torch's zip errors run to a paragraph of advice; the first sentence says what broke.
    text = str(exc).strip()
    return text.splitlines()[0].split(". ")[0] if text else type(exc).__name__


def tensors_of(path: Path, obj: Any) -> dict[str, torch.Tensor]:
    # A1111-era checkpoints wrap the weights: {"state_dict": {...}, "global_step": ...}.
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ModelFileError(f"{path} does not hold a state dict (found {type(obj).__name__})")
    return {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def load_pickle(path: str | os.PathLike[str], mmap: bool = False) -> Any:
    """The whole object of a .ckpt/.pt/.pth/.bin file, unpickled weights-only (nested dicts kept).

    For formats that wrap their tensors (A1111 embeddings, basicsr's ``params_ema``); the same
    refusal and error rules as ``load_state_dict`` apply.
    """
    path = Path(path)
    _check_file(path)
    return _torch_load(path, mmap)


def read_shapes(path: str | os.PathLike[str]) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, read as cheaply as the format allows (no tensor data for safetensors)."""
    path = Path(path)
    ext = _check_file(path)
    if ext in SAFETENSORS_EXTS:
        _, header = read_safetensors_header(path)
        return {k: tuple(int(d) for d in v["shape"]) for k, v in header.items() if k != "__metadata__"}
    tensors = tensors_of(path, _torch_load(path, mmap=True))
    return {k: tuple(t.shape) for k, t in tensors.items()}


def load_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """All tensors of a model file on the CPU; non-tensor entries (step counters...) are dropped."""
    path = Path(path)
    ext = _check_file(path)
    if ext not in SAFETENSORS_EXTS:
        return tensors_of(path, _torch_load(path, mmap=False))

    import safetensors.torch

    read_safetensors_header(path)  # clearer truncation message than the library's
    try:
        return dict(safetensors.torch.load_file(str(path), device="cpu"))
    except OSError as exc:
        raise read_error(path, exc) from exc
    except MemoryError:
        raise
    except Exception as exc:  # SafetensorError and friends
        raise _corrupt(path, _first_line(exc)) from None
