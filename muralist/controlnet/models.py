"""ControlNet model files from A1111's folders, loaded offline into diffusers' ``ControlNetModel``.

Two layouts exist in users' folders: the original (LDM) one of the SD1.x/SD2.x ControlNets
(``control_model.input_blocks.*``, ``zero_convs.*``, ``input_hint_block.*``, ``middle_block_out.*``)
and diffusers' own of most SDXL ones (``controlnet_cond_embedding.*``, ``down_blocks.*``). The
architecture comes from the base model's UNet (a ControlNet is a copy of its encoder half) checked
against the file's tensors, so nothing is fetched; a ControlNet made for another family is refused
with the two families named.
"""

from __future__ import annotations

import difflib
import re
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import InvalidRequestError, ModelFileError
from ..models.convert import Rule, from_a1111, to_a1111, unet_key
from ..models.hashing import legacy_hash
from ..paths import DataDirs

CONTROLNET_EXTS = (".safetensors", ".pth", ".ckpt", ".pt", ".bin")
LDM_PREFIX = "control_model."
# A context width says which family a ControlNet was trained for (real models; tiny test models
# are matched against the base model instead).
_CONTEXT_FAMILY = {768: "SD1", 1024: "SD2", 2048: "SDXL"}


@dataclass(frozen=True)
class ControlNetInfo:
    name: str  # file stem, as the extension lists it
    path: Path
    hash: str  # A1111's legacy 8-hex hash, as in "control_v11p_sd15_canny [d14c016b]"

    @property
    def title(self) -> str:
        return f"{self.name} [{self.hash}]"


def _hint_key(key: str) -> str | None:
    """The LDM name of a ControlNet-only tensor (conditioning embedding, zero convs), else None."""
    if m := re.match(r"controlnet_cond_embedding\.conv_in\.(.+)", key):
        return f"input_hint_block.0.{m[1]}"
    if m := re.match(r"controlnet_cond_embedding\.blocks\.(\d+)\.(.+)", key):
        return f"input_hint_block.{2 * (int(m[1]) + 1)}.{m[2]}"
    if m := re.match(r"controlnet_down_blocks\.(\d+)\.(.+)", key):
        return f"zero_convs.{m[1]}.0.{m[2]}"
    if m := re.match(r"controlnet_mid_block\.(.+)", key):
        return f"middle_block_out.0.{m[1]}"
    return None


def controlnet_rules(keys: Iterable[str], config: Mapping[str, Any]) -> list[Rule]:
    """Where every tensor of a diffusers ControlNetModel lives in an original (LDM) ControlNet file."""
    keys = list(keys)
    lpb = config["layers_per_block"]
    n_hint = sum(1 for k in keys if re.match(r"controlnet_cond_embedding\.blocks\.\d+\.weight$", k))
    rules = []
    for k in keys:
        if k.startswith("controlnet_cond_embedding.conv_out."):
            name = f"input_hint_block.{2 * (n_hint + 1)}.{k.rsplit('.', 1)[1]}"
        else:
            name = _hint_key(k) or unet_key(k, lpb, [])
        rules.append(Rule(LDM_PREFIX + name, (k,)))
    return rules


def controlnet_config(base_unet_config: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """A ControlNetModel config from the base UNet's, with what the file's tensors say where they
    may differ (hint channels; SDXL's mid/small variants' transformer depths)."""
    import inspect

    from diffusers import ControlNetModel

    accepted = set(inspect.signature(ControlNetModel.__init__).parameters)
    cfg = {k: v for k, v in dict(base_unet_config).items() if k in accepted}
    cfg["in_channels"] = 4  # the noisy latent only, also beside a 9-channel inpainting UNet
    cfg["down_block_types"] = list(base_unet_config["down_block_types"])
    hint = shapes.get("controlnet_cond_embedding.conv_in.weight")
    if hint is not None:
        cfg["conditioning_channels"] = hint[1]
    n_levels = len(cfg["down_block_types"])
    depths = []
    for b in range(n_levels):
        blocks = {int(m[1]) for k in shapes if (m := re.match(rf"down_blocks\.{b}\.attentions\.0\.transformer_blocks\.(\d+)\.", k))}
        depths.append(max(blocks) + 1 if blocks else 0)
    if any(depths):
        types = cfg["down_block_types"]
        cfg["down_block_types"] = [t if depths[b] or not t.startswith("CrossAttn") else "DownBlock2D" for b, t in enumerate(types)]
        if isinstance(cfg.get("transformer_layers_per_block"), list | tuple) or max(depths) > 1:
            cfg["transformer_layers_per_block"] = [max(d, 1) for d in depths]
    mid = {int(m[1]) for k in shapes if (m := re.match(r"mid_block\.attentions\.0\.transformer_blocks\.(\d+)\.", k))}
    if mid and isinstance(cfg.get("transformer_layers_per_block"), list):
        # diffusers gives the mid block the last level's depth; a file whose mid block differs is refused below.
        cfg["transformer_layers_per_block"][-1] = max(mid) + 1
    return cfg


def file_family(shapes: Mapping[str, tuple[int, ...]]) -> tuple[str | None, int | None]:
    """(family by context width or SDXL's added embedding, context width) of a diffusers-keyed ControlNet."""
    width = next((s[1] for k, s in shapes.items() if k.endswith("attn2.to_k.weight")), None)
    if any(k.startswith("add_embedding.") for k in shapes):
        return "SDXL", width
    return _CONTEXT_FAMILY.get(width or 0), width


def to_diffusers_keys(sd: Mapping[str, torch.Tensor], base_unet_config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """A ControlNet state dict in diffusers' keys, whatever layout the file used."""
    if any(k.startswith(LDM_PREFIX) for k in sd) or any(k.startswith("input_hint_block.") for k in sd):
        ldm = {k if k.startswith(LDM_PREFIX) else LDM_PREFIX + k: v for k, v in sd.items()}
        n_hint = sum(1 for k in ldm if re.match(rf"{re.escape(LDM_PREFIX)}input_hint_block\.\d+\.weight$", k)) - 2
        keys = _diffusers_keys(ldm, base_unet_config, max(n_hint, 0))
        cfg = dict(base_unet_config)
        return from_a1111(controlnet_rules(keys, cfg), ldm, "ControlNet")
    if any(k.startswith("controlnet_cond_embedding.") for k in sd):
        return dict(sd)
    if any(k.startswith("lora_controlnet") for k in sd):
        raise ModelFileError("Control-LoRA files (sai_xl_*lora) are not supported yet; use a full ControlNet")
    raise ModelFileError("not a ControlNet: no control_model.* (original) or controlnet_cond_embedding.* (diffusers) tensors")


def _diffusers_keys(ldm: Mapping[str, torch.Tensor], base_unet_config: Mapping[str, Any], n_hint: int) -> list[str]:
    """The diffusers key list whose LDM names are the file's keys (built from a meta-device model)."""
    from diffusers import ControlNetModel

    from ..models.loader import _empty

    cfg = controlnet_config(base_unet_config, {})
    hint = ldm.get(LDM_PREFIX + "input_hint_block.0.weight")
    if hint is not None:
        cfg["conditioning_channels"] = hint.shape[1]
    model = _empty(lambda: ControlNetModel(**cfg))
    keys = list(model.state_dict().keys())
    del model
    return keys


def load_controlnet(path: Path, base_unet_config: Mapping[str, Any], base_family: str, device: torch.device,
                    dtype: torch.dtype) -> Any:
    """The file as a ``ControlNetModel`` on ``device``, refused when made for another family."""
    from diffusers import ControlNetModel

    from ..models.files import load_state_dict
    from ..models.loader import _assign, _empty

    sd = load_state_dict(path)
    if any(k.startswith(LDM_PREFIX) or k.startswith("input_hint_block.") for k in sd):
        ldm_ctx = next((v.shape[1] for k, v in sd.items() if k.endswith("attn2.to_k.weight")), None)
        family = "SDXL" if any("label_emb" in k for k in sd) else _CONTEXT_FAMILY.get(ldm_ctx or 0)
        width = ldm_ctx
    else:
        family, width = file_family({k: tuple(v.shape) for k, v in sd.items()})
    base_width = base_unet_config.get("cross_attention_dim")
    if (family is not None and family != base_family and _CONTEXT_FAMILY.get(base_width or 0)) or (width and width != base_width):
        raise InvalidRequestError(
            f"ControlNet {path.stem!r} is for {family or f'a model with context width {width}'}, but the checkpoint is "
            f"{base_family} (context width {base_width}); choose a ControlNet made for {base_family}")
    tensors = to_diffusers_keys(sd, base_unet_config)
    cfg = controlnet_config(base_unet_config, {k: tuple(v.shape) for k, v in tensors.items()})
    model = _empty(lambda: ControlNetModel(**cfg))
    try:
        _assign(model, tensors, f"ControlNet {path.name}")
    except ModelFileError as e:
        raise InvalidRequestError(f"ControlNet {path.stem!r} does not fit the checkpoint's UNet ({e}); "
                                  f"choose a ControlNet made for {base_family}") from None
    return model.to(device, dtype).eval()


def export_ldm(model: Any) -> dict[str, torch.Tensor]:
    """A diffusers ControlNetModel in the original LDM layout (tests' fixtures, conversions)."""
    tensors = model.state_dict()
    return to_a1111(controlnet_rules(tensors.keys(), model.config), tensors)


class ControlNetRegistry:
    """ControlNet files in ``models/ControlNet`` (and the extension's own ``models`` folder)."""

    def __init__(self, dirs: DataDirs, extra_dirs: Iterable[Path] = ()) -> None:
        self.dirs = dirs
        self.folders = [dirs.controlnet_dir, dirs.root / "extensions" / "sd-webui-controlnet" / "models", *extra_dirs]
        self._lock = threading.Lock()
        self._hashes: dict[tuple[str, float, int], str] = {}

    def list(self) -> list[ControlNetInfo]:
        out: dict[str, ControlNetInfo] = {}
        for folder in self.folders:
            if not folder.is_dir():
                continue
            for path in sorted(folder.rglob("*")):
                if path.suffix.lower() in CONTROLNET_EXTS and path.is_file() and "annotator" not in path.parts:
                    out.setdefault(path.stem, ControlNetInfo(path.stem, path, self._hash(path)))
        return sorted(out.values(), key=lambda i: i.name.lower())

    def _hash(self, path: Path) -> str:
        st = path.stat()
        key = (str(path), st.st_mtime, st.st_size)
        with self._lock:
            if key not in self._hashes:
                self._hashes[key] = legacy_hash(path)
            return self._hashes[key]

    def find(self, name: str) -> ControlNetInfo:
        """By title, stem or file name (the hash in brackets is ignored, as the extension matches loosely)."""
        items = self.list()
        want = re.sub(r"\s*\[[0-9a-fA-F]+\]\s*$", "", name.strip())
        want = Path(want).stem if Path(want).suffix.lower() in CONTROLNET_EXTS else want
        for info in items:
            if info.name == want or info.title == name.strip():
                return info
        for info in items:
            if info.name.lower() == want.lower():
                return info
        near = difflib.get_close_matches(want, [i.name for i in items], n=3, cutoff=0.4)
        where = f"put ControlNet files in {self.dirs.controlnet_dir}"
        hint = f"; close names: {', '.join(near)}" if near else f" ({where})" if not items else f"; available: {', '.join(i.title for i in items[:10])}"
        raise InvalidRequestError(f"ControlNet model {name!r} not found{hint}")
