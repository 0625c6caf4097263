"""LoRA-family networks (kohya / LyCORIS files), listed, parsed and merged the way A1111 does.

A1111's built-in Lora extension merges each network into the model's weights
(``W += updown * scale * multiplier``) and keeps a backup of the original weights. We do the
same per job: ``applied_loras`` merges in place and restores the backed-up tensors on exit, so
the next job on the same loaded model is bit-identical to the base model.

Key names are kohya's: ``lora_unet_<module path with . -> _>`` (diffusers paths for SD1/SD2
LoRAs, LDM paths like ``input_blocks_4_1_...`` for SDXL ones) and ``lora_te_`` / ``lora_te1_`` /
``lora_te2_`` for the text encoders. Both UNet schemes are looked up in a table built from the
loaded model's own modules (LDM names through ``convert.unet_key``), never by splitting on "_",
so any model size works.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelFileError, MuralistError, closest
from ..models import convert, files, hashing
from ..models.family import Family
from ..models.loader import LoadedModel
from ..models.registry import natural_key, walk_models
from ..paths import DataDirs

log = logging.getLogger(__name__)

LORA_EXTS = (".safetensors", ".pt", ".ckpt")  # what A1111 lists in models/Lora

# ---------------------------------------------------------------- listing


@dataclass(frozen=True)
class LoraInfo:
    """One LoRA file, with A1111's names for it."""

    name: str  # file stem: what <lora:name:...> uses
    path: Path
    alias: str  # metadata ss_output_name (the training run's name), else ``name``
    shorthash: str  # 12 hex: addnet hash for .safetensors, sha256[:12] otherwise ("Lora hashes")
    metadata: Mapping[str, str] = field(default_factory=dict, compare=False, hash=False)


class LoraRegistry:
    """LoRA files under ``dirs.lora_dir`` (recursively), scanned lazily, rescanned after ``refresh()``."""

    def __init__(self, dirs: DataDirs, cache: hashing.HashCache | None = None) -> None:
        self.dirs = dirs
        # Not the checkpoint registry's file by default: two HashCache objects on one file would
        # overwrite each other's entries. Pass the shared cache object to share it.
        self.cache = cache or hashing.HashCache(dirs.cache_dir / "lora-hashes.json")
        self._lock = threading.RLock()
        self._loras: list[LoraInfo] | None = None
        self._skipped: list[tuple[Path, str]] = []
        # path -> (size, mtime_ns, info): a rescan rereads only changed files' headers.
        self._known: dict[Path, tuple[int, int, LoraInfo]] = {}

    def refresh(self) -> None:
        """Forget the listing; the next call rescans (unchanged files are not reread)."""
        with self._lock:
            self._loras = None

    def all(self) -> list[LoraInfo]:
        with self._lock:
            if self._loras is None:
                self._scan()
            assert self._loras is not None
            return list(self._loras)

    def skipped(self) -> list[tuple[Path, str]]:
        """Files in the LoRA folder that could not be read, with the reason."""
        with self._lock:
            self.all()
            return list(self._skipped)

    def find(self, name: str) -> LoraInfo | None:
        """The LoRA called ``name`` (file stem or alias), exact case first, then any case."""
        loras = self.all()
        folded = name.casefold()
        rules: list[Callable[[LoraInfo], bool]] = [
            lambda i: i.name == name,
            lambda i: i.alias == name,
            lambda i: i.name.casefold() == folded,
            lambda i: i.alias.casefold() == folded,
        ]
        for rule in rules:
            for info in loras:
                if rule(info):
                    return info
        return None

    def find_by_hash(self, shorthash: str) -> LoraInfo | None:
        """The LoRA whose shorthash is (a prefix of) ``shorthash``, as infotexts' "Lora hashes" list it."""
        h = shorthash.strip().lower()
        if not h:
            return None
        for info in self.all():
            if info.shorthash.startswith(h) or h.startswith(info.shorthash):
                return info
        return None

    def suggest(self, name: str) -> list[str]:
        """The installed names and aliases closest to ``name``, best first."""
        loras = self.all()
        choices = dict.fromkeys([i.name for i in loras] + [i.alias for i in loras])
        return closest(name, choices)

    def _scan(self) -> None:
        loras: list[LoraInfo] = []
        skipped: list[tuple[Path, str]] = []
        known: dict[Path, tuple[int, int, LoraInfo]] = {}
        for path, _ in walk_models(self.dirs.lora_dir):
            if path.suffix.lower() not in LORA_EXTS:
                continue
            try:
                st = path.stat()
                prev = self._known.get(path)
                if prev and prev[:2] == (st.st_size, st.st_mtime_ns):
                    info = prev[2]
                else:
                    info = self._info(path)
                known[path] = (st.st_size, st.st_mtime_ns, info)
                loras.append(info)
            except ModelFileError as exc:
                skipped.append((path, str(exc)))
            except OSError as exc:
                skipped.append((path, f"cannot read {path}: {exc.strerror or exc}"))
        for path, reason in skipped:
            log.warning("skipped LoRA %s: %s", path, reason)
        loras.sort(key=lambda i: natural_key(i.name))
        self._loras, self._skipped, self._known = loras, skipped, known

    def _info(self, path: Path) -> LoraInfo:
        if path.suffix.lower() == ".safetensors":
            meta = files.safetensors_metadata(path)  # also validates the header
            # Cover images are base64 blobs, too big to carry around (A1111 drops them too).
            meta.pop("ssmd_cover_images", None)
            short = self.cache.get(path, "addnet", lambda: hashing.addnet_hash_safetensors(path))
        else:
            meta = {}
            short = self.cache.sha256(path)[:12]
        alias = meta.get("ss_output_name") or path.stem
        return LoraInfo(name=path.stem, path=path, alias=alias, shorthash=short, metadata=meta)


# ---------------------------------------------------------------- the math (A1111's network_*.py)


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


def _rebuild(up: torch.Tensor, down: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    return (_flat(up) @ _flat(down)).reshape(shape)


def _cp(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    # Tucker/CP core t (r, r, kh, kw) with wa (r, out), wb (r, in) -> (out, in, kh, kw).
    tmp = torch.einsum("i j k l, j r -> i r k l", t, wb)
    return torch.einsum("i j k l, i r -> r j k l", tmp, wa)


def _updown_lora(w: Mapping[str, torch.Tensor]) -> torch.Tensor:
    up, down, mid = w["lora_up.weight"], w["lora_down.weight"], w.get("lora_mid.weight")
    if mid is not None:  # LoCon with a tucker-decomposed kernel
        return torch.einsum("n m k l, i n, m j -> i j k l", mid, _flat(up), _flat(down))
    shape = [up.shape[0], down.shape[1], *down.shape[2:]] if down.ndim == 4 else [up.shape[0], down.shape[1]]
    return _rebuild(up, down, shape)


def _updown_loha(w: Mapping[str, torch.Tensor]) -> torch.Tensor:
    w1a, w1b, w2a, w2b = w["hada_w1_a"], w["hada_w1_b"], w["hada_w2_a"], w["hada_w2_b"]
    t1, t2 = w.get("hada_t1"), w.get("hada_t2")
    if t1 is not None:
        shape = [w1a.shape[1], w1b.shape[1], *t1.shape[2:]]
        one = _cp(t1, w1a, w1b)
    else:
        shape = [w1a.shape[0], w1b.shape[1], *(w1b.shape[2:] if w1b.ndim == 4 else ())]
        one = _rebuild(w1a, w1b, shape)
    two = _cp(t2, w2a, w2b) if t2 is not None else _rebuild(w2a, w2b, shape)
    return one * two  # the Hadamard product is what makes LoHa's rank higher than LoRA's


def _updown_lokr(w: Mapping[str, torch.Tensor]) -> torch.Tensor:
    w1 = w["lokr_w1"] if "lokr_w1" in w else w["lokr_w1_a"] @ w["lokr_w1_b"]
    if "lokr_w2" in w:
        w2 = w["lokr_w2"]
    elif "lokr_t2" in w:
        w2 = _cp(w["lokr_t2"], w["lokr_w2_a"], w["lokr_w2_b"])
    else:
        w2 = w["lokr_w2_a"] @ w["lokr_w2_b"]
    if w2.ndim == 4:
        w1 = w1[:, :, None, None]
    return torch.kron(w1, w2.contiguous())


def _updown_full(w: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return w["diff"]


# kind -> (tensors that identify it, optional tensors, how to build the delta)
_KINDS: dict[
    str,
    tuple[tuple[frozenset[str], ...], frozenset[str], Callable[[Mapping[str, torch.Tensor]], torch.Tensor]],
] = {
    "LoRA": (
        (frozenset({"lora_up.weight", "lora_down.weight"}),),
        frozenset({"lora_mid.weight"}),
        _updown_lora,
    ),
    "LoHa": (
        (frozenset({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}),),
        frozenset({"hada_t1", "hada_t2"}),
        _updown_loha,
    ),
    "LoKr": (
        tuple(
            frozenset(a | b)
            for a in ({"lokr_w1"}, {"lokr_w1_a", "lokr_w1_b"})
            for b in ({"lokr_w2"}, {"lokr_w2_a", "lokr_w2_b"})
        ),
        frozenset({"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"}),
        _updown_lokr,
    ),
    "full": ((frozenset({"diff"}),), frozenset({"diff_b"}), _updown_full),
}
_COMMON = frozenset({"alpha", "scale"})
# Tensor names of network types A1111 or LyCORIS know but muralist does not apply.
_UNSUPPORTED = {
    "dora_scale": "DoRA",
    "oft_blocks": "OFT",
    "oft_diag": "OFT",
    "a1.weight": "GLoRA",
    "b1.weight": "GLoRA",
    "w_norm": "norm",
    "b_norm": "norm",
    "on_input": "(IA)^3",
    "bias_indices": "LyCORIS sparse bias",
    "lora_A.weight": "PEFT-style LoRA",
}
SUPPORTED_TYPES = "LoRA/LoCon, LoHa, LoKr and full-diff networks"


@dataclass(frozen=True)
class NetworkModule:
    """The weights a network holds for one layer of the model."""

    key: str  # kohya layer name, e.g. "lora_unet_down_blocks_0_attentions_0_proj_in"
    kind: str  # "LoRA", "LoHa", "LoKr" or "full"
    tensors: Mapping[str, torch.Tensor] = field(repr=False)
    shape: tuple[int, ...]  # the delta's own shape, before fitting it to the layer's weight
    scale: float  # alpha/rank (A1111's calc_scale)

    def updown(self, device: torch.device) -> torch.Tensor:
        """The unscaled weight delta in float32 (A1111's ``calc_updown`` before ``finalize_updown``)."""
        w = {
            k: v.to(device, torch.float32)
            for k, v in self.tensors.items()
            if k not in _COMMON and k != "diff_b"
        }
        return _KINDS[self.kind][2](w)

    def bias_delta(self, device: torch.device) -> torch.Tensor | None:
        b = self.tensors.get("diff_b")
        return None if b is None else b.to(device, torch.float32)


def _scale(kind: str, w: Mapping[str, torch.Tensor]) -> float:
    if "scale" in w:
        return float(w["scale"].item())
    # A1111's "dim": the rank that alpha was chosen against; None (scale 1) for full weights.
    dim: int | None = None
    if kind == "LoRA":
        dim = w["lora_down.weight"].shape[0]
    elif kind == "LoHa":
        dim = w["hada_w1_b"].shape[0]
    elif kind == "LoKr":
        for k in ("lokr_w2_b", "lokr_w1_b"):
            if k in w:
                dim = w[k].shape[0]
                break
    if dim is None or "alpha" not in w:
        return 1.0
    return float(w["alpha"].item()) / dim


def _classify(path: Path, key: str, w: Mapping[str, torch.Tensor]) -> NetworkModule:
    parts = set(w)
    for part, label in _UNSUPPORTED.items():
        if part in parts:
            raise ModelFileError(
                f"{path.name}: unsupported network type {label} (layer {key} has {part!r}); "
                f"muralist applies {SUPPORTED_TYPES}"
            )
    for kind, (required, optional, build) in _KINDS.items():
        if not any(r <= parts for r in required):
            continue
        extra = parts - _COMMON - optional - set().union(*required)
        if extra:
            raise ModelFileError(
                f"{path.name}: unsupported network type (layer {key} is {kind} with extra tensors "
                f"{', '.join(sorted(extra))}); muralist applies {SUPPORTED_TYPES}"
            )
        # Run the math on meta tensors: checks the factors' shapes agree and gives the delta's
        # shape, without computing anything.
        meta = {k: torch.empty(v.shape, device="meta") for k, v in w.items() if k not in _COMMON}
        try:
            shape = tuple(build(meta).shape)
        except (RuntimeError, IndexError, KeyError, ValueError) as exc:
            raise ModelFileError(
                f"{path.name}: malformed {kind} layer {key}: {str(exc).splitlines()[0]}"
            ) from None
        return NetworkModule(key=key, kind=kind, tensors=dict(w), shape=shape, scale=_scale(kind, w))
    raise ModelFileError(
        f"{path.name}: unsupported network type (layer {key} has tensors {', '.join(sorted(parts))}); "
        f"muralist applies {SUPPORTED_TYPES}"
    )


@dataclass(frozen=True)
class ParsedLora:
    """A LoRA file's layers, independent of any model."""

    path: Path
    modules: Mapping[str, NetworkModule]
    ignored: tuple[str, ...] = ()  # keys that are not kohya layer weights (bundled embeddings...)


_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")


def parse_lora(path: str | os.PathLike[str]) -> ParsedLora:
    """Read a kohya/LyCORIS LoRA file into per-layer modules (raises ModelFileError for unsupported types)."""
    path = Path(path)
    sd = files.load_state_dict(path)
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    ignored: list[str] = []
    for k, t in sd.items():
        layer, _, part = k.partition(".")
        if not part or not layer.startswith(_PREFIXES):
            ignored.append(k)  # A1111 reads "bundle_emb.*" as embeddings; other keys match nothing
            continue
        grouped.setdefault(layer, {})[part] = t
    if not grouped:
        example = f" (keys like {ignored[0]!r})" if ignored else ""
        raise ModelFileError(
            f"{path.name} is not a kohya-format LoRA{example}: expected keys like "
            "'lora_unet_....lora_down.weight' or 'lora_te_....lora_up.weight'"
        )
    modules = {layer: _classify(path, layer, w) for layer, w in grouped.items()}
    return ParsedLora(path=path, modules=modules, ignored=tuple(ignored))


class _ParseCache:
    """A small LRU of parsed files keyed by path, mtime and size, so switching LoRAs is cheap."""

    def __init__(self, size: int = 8) -> None:
        self.size = size
        self._lock = threading.Lock()
        self._items: OrderedDict[tuple[str, int, int], ParsedLora] = OrderedDict()

    def get(self, path: Path) -> ParsedLora:
        try:
            st = path.stat()
        except OSError as exc:
            raise ModelFileError(f"cannot read LoRA {path}: {exc.strerror or exc}") from None
        key = (str(path.resolve()), st.st_mtime_ns, st.st_size)
        with self._lock:
            hit = self._items.get(key)
            if hit is not None:
                self._items.move_to_end(key)
                return hit
        parsed = parse_lora(path)  # outside the lock: parsing one file must not block others
        with self._lock:
            # A changed file gets a new key; drop its stale versions first.
            for old in [k for k in self._items if k[0] == key[0]]:
                del self._items[old]
            self._items[key] = parsed
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return parsed

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


PARSE_CACHE = _ParseCache()


# ---------------------------------------------------------------- matching layers to the model

_TE, _UNET = "te", "unet"
# Which text-encoder prefixes A1111 matches per family (SD1 also takes "lora_te1_": some SD1
# LoRAs are written that way; on SDXL "lora_te_" matches nothing).
_TE_PREFIXES: dict[Family, dict[str, tuple[str, ...]]] = {
    Family.SD1: {"text_encoder": ("lora_te_", "lora_te1_")},
    Family.SD2: {"text_encoder": ("lora_te_",)},
    Family.SDXL: {"text_encoder": ("lora_te1_",), "text_encoder_2": ("lora_te2_",)},
}


@dataclass(frozen=True)
class _Table:
    names: dict[str, tuple[str, torch.nn.Module]]  # kohya layer name -> (component, module)
    text_encoders: tuple[Any, ...]  # to tell when the model's encoders were swapped


_tables: weakref.WeakKeyDictionary[torch.nn.Module, _Table] = weakref.WeakKeyDictionary()
_tables_lock = threading.Lock()


def _has_weight(module: torch.nn.Module) -> bool:
    return isinstance(getattr(module, "weight", None), torch.nn.Parameter)


def _unet_names(unet: Any) -> dict[str, torch.nn.Module]:
    cfg = unet.config
    lpb = cfg["layers_per_block"]
    up_attn = [t.startswith("CrossAttn") for t in cfg["up_block_types"]]
    out: dict[str, torch.nn.Module] = {}
    for name, mod in unet.named_modules():
        if not name or not _has_weight(mod):
            continue
        out["lora_unet_" + name.replace(".", "_")] = mod  # diffusers scheme (SD1/SD2 kohya LoRAs)
        if isinstance(lpb, int):
            try:
                ldm = convert.unet_key(name + ".weight", lpb, up_attn)
            except ModelFileError:
                continue
            out["lora_unet_" + ldm.removesuffix(".weight").replace(".", "_")] = mod  # LDM scheme (SDXL)
    return out


def _text_encoder_names(te: Any, prefixes: Sequence[str]) -> dict[str, torch.nn.Module]:
    # kohya names layers after transformers 4's CLIPTextModel ("text_model.encoder.layers...");
    # transformers 5's CLIPTextModel is that inner "text_model" itself.
    wrapped = hasattr(te, "text_model")
    out: dict[str, torch.nn.Module] = {}
    for name, mod in te.named_modules():
        if not name or not _has_weight(mod):
            continue
        flat = (name if wrapped else "text_model." + name).replace(".", "_")
        for p in prefixes:
            out[p + flat] = mod
    return out


def _table(model: LoadedModel) -> _Table:
    tes = tuple(model.text_encoders.get(k) for k in ("text_encoder", "text_encoder_2"))
    with _tables_lock:
        table = _tables.get(model.unet)
        if table is not None and all(a is b for a, b in zip(table.text_encoders, tes, strict=True)):
            return table
    names: dict[str, tuple[str, torch.nn.Module]] = {
        k: (_UNET, m) for k, m in _unet_names(model.unet).items()
    }
    for component, prefixes in _TE_PREFIXES[model.family].items():
        te = model.text_encoders.get(component)
        if te is not None:
            names.update({k: (_TE, m) for k, m in _text_encoder_names(te, prefixes).items()})
    table = _Table(names, tes)
    with _tables_lock:
        _tables[model.unet] = table
    return table


def lora_family(metadata: Mapping[str, str], keys: Sequence[str] = ()) -> Family | None:
    """The model family a LoRA says it was trained for (kohya/modelspec metadata, or te2 keys), if any."""
    if any(k.startswith("lora_te2_") for k in keys):
        return Family.SDXL
    version = str(metadata.get("ss_base_model_version", ""))
    arch = str(metadata.get("modelspec.architecture", ""))
    if version.startswith("sdxl") or arch.startswith("stable-diffusion-xl"):
        return Family.SDXL
    if (
        version.startswith("sd_v2")
        or metadata.get("ss_v2") == "True"
        or arch.startswith("stable-diffusion-v2")
    ):
        return Family.SD2
    if version.startswith("sd_v1") or arch.startswith("stable-diffusion-v1"):
        return Family.SD1
    return None


def _fits(shape: tuple[int, ...], weight: torch.Tensor) -> bool:
    if math.prod(shape) == weight.numel():
        return True
    # A LoRA trained on a 4-channel model applied to an inpainting model's 9-channel conv_in.
    same_other_dims = (shape[0], *shape[2:]) == (weight.shape[0], *weight.shape[2:])
    return len(shape) == 4 and weight.ndim == 4 and shape[1] < weight.shape[1] and same_other_dims


def _fit_to(delta: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if delta.numel() == weight.numel():
        return delta.reshape(weight.shape)
    return torch.nn.functional.pad(delta, (0, 0, 0, 0, 0, weight.shape[1] - delta.shape[1]))


@dataclass
class _Bound:
    matched: list[tuple[NetworkModule, str, torch.nn.Module]]
    missing: int  # layer names this model does not have
    misfit: int  # layers it has, but of another shape or type


def _bind(parsed: ParsedLora, table: _Table) -> _Bound:
    bound = _Bound([], 0, 0)
    for key, mod in parsed.modules.items():
        target = table.names.get(key)
        if target is None:
            bound.missing += 1
            continue
        component, layer = target
        # Low-rank factors only make sense for Linear/Conv weights (A1111 refuses others too).
        if mod.kind != "full" and not isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
            bound.misfit += 1
            continue
        if not _fits(mod.shape, layer.weight):
            bound.misfit += 1
            continue
        bound.matched.append((mod, component, layer))
    return bound


def _does_not_fit(info: LoraInfo, model: LoadedModel, why: str) -> MuralistError:
    return MuralistError(f"LoRA '{info.name}' does not fit this model ({model.family.label} model; {why})")


# ---------------------------------------------------------------- applying


@contextmanager
def applied_loras(model: LoadedModel, loras: Sequence[tuple[LoraInfo, float, float]]) -> Iterator[None]:
    """Merge ``loras`` (info, te_multiplier, unet_multiplier) into ``model``'s weights for the block.

    Every touched weight is backed up first and restored exactly on exit, also on exceptions.
    Nothing is touched before every LoRA has been read and checked against the model. The caller
    holds ``model.lock``: weights are shared by every job on the model.
    """
    table = _table(model)
    # param id -> (param, [(module, factor, part)]): several LoRAs on one layer are summed in float32.
    plan: dict[int, tuple[torch.nn.Parameter, list[tuple[NetworkModule, float, str]]]] = {}
    for info, te_mult, unet_mult in loras:
        if not te_mult and not unet_mult:
            continue  # a zero multiplier touches nothing (A1111 still loads it; we need not)
        parsed = PARSE_CACHE.get(Path(info.path))
        family = lora_family(info.metadata, list(parsed.modules))
        if family is not None and family is not model.family:
            raise _does_not_fit(info, model, f"the LoRA is for {family.label}")
        bound = _bind(parsed, table)
        total = len(parsed.modules)
        if not bound.matched:
            why = f"none of its {total} layers exist in it"
            if bound.misfit:
                why = (
                    f"{bound.misfit} of its {total} layers exist but have other shapes, the rest do not exist"
                )
            raise _does_not_fit(info, model, why)
        if 2 * len(bound.matched) < total:
            # A LoRA for another family matches a few same-shaped layers by chance (SDXL's and
            # SD1's 640-channel attentions); A1111 merges those and yields garbage. A LoRA made
            # for this family fits (nearly) everywhere.
            raise _does_not_fit(info, model, f"only {len(bound.matched)} of its {total} layers fit")
        if bound.missing or bound.misfit:
            log.warning(
                "LoRA %r: %d of %d layers do not fit this %s model and are skipped",
                info.name, bound.missing + bound.misfit, total, model.family.label,
            )  # fmt: skip
        for mod, component, layer in bound.matched:
            mult = float(te_mult if component == _TE else unet_mult)
            if not mult:
                continue
            plan.setdefault(id(layer.weight), (layer.weight, []))[1].append((mod, mult, "weight"))
            bias = getattr(layer, "bias", None)
            if (
                "diff_b" in mod.tensors
                and isinstance(bias, torch.nn.Parameter)
                and bias.shape == mod.tensors["diff_b"].shape
            ):
                plan.setdefault(id(bias), (bias, []))[1].append((mod, mult, "bias"))

    backups: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for param, contributions in plan.values():
                # Backups live on the CPU (as in A1111): VRAM is the scarce resource.
                backup = param.detach().to("cpu", copy=True)
                backups.append((param, backup))
                acc = param.detach().to(torch.float32, copy=True)
                for mod, mult, part in contributions:
                    if part == "weight":
                        # A1111's finalize_updown: updown * calc_scale() * multiplier.
                        acc += _fit_to(mod.updown(acc.device), acc) * mod.scale * mult
                    else:
                        b = mod.bias_delta(acc.device)
                        assert b is not None
                        acc += b * mult  # A1111 scales the bias diff by the multiplier only
                param.copy_(acc)  # casts to the weight's dtype once, after summing in float32
        yield
    finally:
        with torch.no_grad():
            for param, backup in reversed(backups):
                param.copy_(backup)
