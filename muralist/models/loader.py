"""Build diffusers components from A1111 single-file checkpoints, VAEs and diffusers folders, offline.

Components are created empty (parameters on the meta device, so even SDXL costs no random
init) from the configs that ``arch`` reads off the tensors, then the checkpoint's tensors are
assigned through the ``convert`` rules. Nothing is fetched from a model hub.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelFileError
from . import convert
from .arch import Architecture, infer_architecture, vae_config
from .family import VAE_PREFIX, Family, ModelKind, detect_kind
from .files import load_state_dict
from .tokenizer import EOS, clip_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # belt and braces: nothing here may reach a hub

# Heavy imports (diffusers, transformers) happen on first use, not at import time, so that the
# CLI and server start fast.


@dataclass
class LoadedModel:
    """A checkpoint's components, ready to run. Read-only while jobs use it."""

    kind: ModelKind
    unet: Any
    vae: Any
    text_encoders: dict[str, Any]  # "text_encoder" (and "text_encoder_2" for SDXL)
    tokenizers: dict[str, Any]
    prediction_type: str = "epsilon"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    # One job at a time per loaded model: runs may toggle per-job module state (tiling, LoRA).
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def family(self) -> Family:
        return self.kind.family

    @property
    def vae_scale(self) -> float:
        return float(self.vae.config.scaling_factor)

    def parameters_bytes(self) -> int:
        mods = [self.unet, self.vae, *self.text_encoders.values()]
        return sum(p.numel() * p.element_size() for m in mods for p in m.parameters())


def _quiet_libraries() -> None:
    # diffusers warns about dtype casts that are deliberate here; users should see our messages only.
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.set_verbosity_error()
    tlog.set_verbosity_error()


def _empty(factory: Any) -> Any:
    _quiet_libraries()
    from accelerate import init_empty_weights

    # Parameters on meta, buffers real: non-persistent buffers (CLIP's position_ids) stay valid.
    with init_empty_weights(include_buffers=False):
        return factory()


def _assign(module: torch.nn.Module, tensors: Mapping[str, torch.Tensor], what: str) -> None:
    missing, unexpected = module.load_state_dict(dict(tensors), strict=False, assign=True)
    if missing or unexpected:
        raise ModelFileError(f"the checkpoint's {what} does not fit its inferred architecture ({(missing or unexpected)[0]})")


def _build_unet(config: dict[str, Any]) -> Any:
    from diffusers import UNet2DConditionModel

    return _empty(lambda: UNet2DConditionModel(**config))


def _build_vae(config: dict[str, Any]) -> Any:
    from diffusers import AutoencoderKL

    return _empty(lambda: AutoencoderKL(**config))


def _build_text_encoder(config: dict[str, Any]) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(**config)
    cls = CLIPTextModelWithProjection if "projection_dim" in config else CLIPTextModel
    return _empty(lambda: cls(cfg))


def _text_body(model: Any) -> torch.nn.Module:
    # transformers 5's CLIPTextModel is the transformer itself; the projection model wraps one.
    return getattr(model, "text_model", model)


def text_encoder_tensors(model: Any) -> dict[str, torch.Tensor]:
    """A transformers CLIP text model's tensors, keyed as ``convert.text_encoder_rules`` expects."""
    out = dict(_text_body(model).state_dict())
    if hasattr(model, "text_projection"):
        out["text_projection.weight"] = model.text_projection.weight
    return out


def _assign_text_encoder(model: Any, tensors: dict[str, torch.Tensor], what: str) -> None:
    proj = tensors.pop("text_projection.weight", None)
    _assign(_text_body(model), tensors, what)
    if hasattr(model, "text_projection"):
        if proj is None:
            raise ModelFileError(f"the checkpoint's {what} has no text projection")
        _assign(model.text_projection, {"weight": proj}, what)


def tokenizers_for(family: Family) -> dict[str, Any]:
    if family is Family.SD1:
        return {"text_encoder": clip_tokenizer(EOS)}
    if family is Family.SD2:
        return {"text_encoder": clip_tokenizer("!")}
    return {"text_encoder": clip_tokenizer(EOS), "text_encoder_2": clip_tokenizer("!")}


def components_from_a1111(sd: Mapping[str, torch.Tensor], kind: ModelKind | None = None) -> tuple[Architecture, dict[str, Any]]:
    """Empty-built components with the checkpoint's tensors assigned (no copies are made)."""
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    kind = kind or detect_kind(shapes)
    arch = infer_architecture(shapes, kind)
    unet = _build_unet(arch.unet)
    keys = list(unet.state_dict().keys())
    _assign(unet, convert.from_a1111(convert.unet_rules(keys, arch.unet), sd, "UNet"), "UNet")
    vae = _build_vae(arch.vae)
    vkeys = list(vae.state_dict().keys())
    _assign(vae, convert.from_a1111(convert.vae_rules(vkeys, arch.vae), sd, "VAE"), "VAE")
    tes: dict[str, Any] = {}
    for name, cfg in arch.text_encoders.items():
        te = _build_text_encoder(cfg)
        rules = convert.text_encoder_rules(text_encoder_tensors(te).keys(), kind.family.value, name)
        _assign_text_encoder(te, convert.from_a1111(rules, sd, "text encoder"), "text encoder")
        tes[name] = te
    return arch, {"unet": unet, "vae": vae, **tes}


def export_a1111(components: Mapping[str, Any], family: Family) -> dict[str, torch.Tensor]:
    """Diffusers components -> one A1111 single-file state dict (the inverse of ``components_from_a1111``)."""
    unet, vae = components["unet"], components["vae"]
    out = convert.to_a1111(convert.unet_rules(unet.state_dict().keys(), unet.config), unet.state_dict())
    out.update(convert.to_a1111(convert.vae_rules(vae.state_dict().keys(), vae.config), vae.state_dict()))
    for name in ("text_encoder", "text_encoder_2"):
        if name in components:
            t = text_encoder_tensors(components[name])
            out.update(convert.to_a1111(convert.text_encoder_rules(t.keys(), family.value, name), t))
    return out


def pick_device(device: str | None = None) -> tuple[torch.device, torch.dtype]:
    """CUDA in half precision when present, else CPU in float32 (half is slow and lossy on CPUs)."""
    if device:
        dev = torch.device(device)
    else:
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return dev, (torch.float16 if dev.type == "cuda" else torch.float32)


def _align(module: torch.nn.Module) -> None:
    """Copy tensors that sit at unaligned addresses (safetensors maps them at arbitrary file offsets).

    oneDNN's CPU convolutions run several times slower on unaligned weights.
    """
    for t in (*module.parameters(), *module.buffers()):
        if t.device.type == "cpu" and t.data_ptr() % 64:
            t.data = t.data.clone()


def _finish(model: LoadedModel) -> LoadedModel:
    for m in (model.unet, model.vae, *model.text_encoders.values()):
        _align(m)
    for m in (model.unet, *model.text_encoders.values()):
        m.to(model.device, model.dtype).eval().requires_grad_(False)
    # The VAE runs in float32: SD VAEs overflow in float16 (A1111's --no-half-vae).
    model.vae.to(model.device, torch.float32).eval().requires_grad_(False)
    return model


def load_checkpoint(
    path: str | Path,
    kind: ModelKind | None = None,
    prediction_type: str = "epsilon",
    device: str | None = None,
) -> LoadedModel:
    """Load an A1111 single-file checkpoint (``.safetensors``/``.ckpt``) or a diffusers folder."""
    path = Path(path)
    dev, dtype = pick_device(device)
    if path.is_dir():
        return _finish(_load_diffusers_folder(path, kind, prediction_type, dev, dtype))
    sd = load_state_dict(path)
    arch, comps = components_from_a1111(sd, kind)
    tes = {k: v for k, v in comps.items() if k.startswith("text_encoder")}
    model = LoadedModel(arch.kind, comps["unet"], comps["vae"], tes, tokenizers_for(arch.family), prediction_type, dev, dtype)
    return _finish(model)


def _load_diffusers_folder(path: Path, kind: ModelKind | None, prediction_type: str, dev: torch.device, dtype: torch.dtype) -> LoadedModel:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if kind is None:
        raise ModelFileError(f"{path}: the model kind of a diffusers folder must be known (scan it with the registry)")
    try:
        unet = UNet2DConditionModel.from_pretrained(path / "unet", local_files_only=True)
        vae = AutoencoderKL.from_pretrained(path / "vae", local_files_only=True)
        tes = {"text_encoder": CLIPTextModel.from_pretrained(path / "text_encoder", local_files_only=True)}
        if kind.family is Family.SDXL:
            tes["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(path / "text_encoder_2", local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelFileError(f"cannot load the diffusers folder {path}: {str(e).splitlines()[0]}") from None
    return LoadedModel(kind, unet, vae, tes, tokenizers_for(kind.family), prediction_type, dev, dtype)


def load_vae(path: str | Path, family: Family, device: torch.device) -> Any:
    """A standalone VAE file (A1111 layout, with or without ``first_stage_model.``, or diffusers layout)."""
    sd = load_state_dict(path)
    if any(k.startswith("encoder.down_blocks.") for k in sd):
        # diffusers layout: rename to A1111's so that one code path reads both.
        levels = len({k.split(".")[2] for k in sd if k.startswith("encoder.down_blocks.")})
        renamed = {}
        for k, t in sd.items():
            name, transform = convert.vae_key(k, levels)
            renamed[VAE_PREFIX + name] = t.reshape(*t.shape, 1, 1) if transform == "conv1x1" and t.ndim == 2 else t
        sd = renamed
    elif not any(k.startswith(VAE_PREFIX) for k in sd):
        sd = {VAE_PREFIX + k: v for k, v in sd.items()}
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    if VAE_PREFIX + "encoder.conv_in.weight" not in shapes or VAE_PREFIX + "decoder.conv_out.weight" not in shapes:
        raise ModelFileError(f"{Path(path).name} is not a VAE (no encoder/decoder tensors)")
    cfg = vae_config(shapes, VAE_PREFIX, family)
    vae = _build_vae(cfg)
    keys = list(vae.state_dict().keys())
    _assign(vae, convert.from_a1111(convert.vae_rules(keys, cfg), sd, "VAE"), "VAE")
    _align(vae)
    return vae.to(device, torch.float32).eval().requires_grad_(False)
