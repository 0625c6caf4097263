"""LoRA training options with lora-scripts' names and defaults (its SD1.5 "lora-basic" form).

A lora-scripts TOML (``config/autosave/*.toml``) reads as is: known keys are checked, keys muralist
knows but does not use are listed as ignored, and unknown keys are reported — never silently
dropped. Where lora-scripts' default needs something a fresh install lacks (AdamW8bit needs
bitsandbytes and a GPU), the option says what to change instead of failing obscurely.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..errors import InvalidRequestError

OPTIMIZERS = ("AdamW", "AdamW8bit", "Lion", "Prodigy", "SGDNesterov")
SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
# lora-scripts / kohya keys that are accepted but change nothing here (with why, for the report).
IGNORED = {
    "output_dir": "muralist saves into models/Lora/<user>/",
    "logging_dir": "progress and loss are job events", "log_with": "", "log_prefix": "",
    "xformers": "attention is PyTorch's SDPA", "sdpa": "", "mem_eff_attn": "",
    "cache_latents": "latents are always cached", "cache_latents_to_disk": "",
    "persistent_data_loader_workers": "", "max_data_loader_n_workers": "",
    "gradient_checkpointing": "", "lowram": "", "save_state": "muralist always keeps a resume state",
    "save_model_as": "LoRAs are saved as .safetensors", "prior_loss_weight": "no regularisation images yet",
    "reg_data_dir": "no regularisation images yet", "model_train_type": "the family comes from the checkpoint",
    "v2": "read from the checkpoint", "v_parameterization": "read from the checkpoint's settings",
    "full_fp16": "", "full_bf16": "", "fp8_base": "", "no_half_vae": "", "enable_preview": "",
    "random_crop": "", "color_aug": "", "flip_aug": "", "network_weights": "", "dim_from_weights": "",
    "training_comment": "", "save_last_n_epochs": "", "save_every_n_steps": "", "ddp_timeout": "",
    "huggingface_repo_id": "", "output_config": "", "config_file": "", "sample_sampler": "",
    "sample_at_first": "", "lr_scheduler_power": "", "optimizer_args": "",
}


class TrainOptions(BaseModel):
    """lora-scripts' option names, types and defaults."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    pretrained_model_name_or_path: str = Field(description="checkpoint title, name or hash from the models folder")
    train_data_dir: str = Field(description="dataset: kohya folders <repeats>_<class tokens> of images + captions")
    resolution: str = "512,512"
    enable_bucket: bool = True
    min_bucket_reso: int = Field(256, ge=64, le=4096)
    max_bucket_reso: int = Field(1024, ge=64, le=4096)
    bucket_reso_steps: int = Field(64, ge=8, le=256)
    bucket_no_upscale: bool = True
    network_module: str = "networks.lora"
    network_dim: int = Field(32, ge=1, le=1024)
    network_alpha: float = Field(32, gt=0, le=1024)
    network_args: list[str] = Field(default_factory=list, description="conv_dim=N, conv_alpha=N for LoCon")
    network_dropout: float = Field(0.0, ge=0, le=1)
    learning_rate: float = Field(1e-4, gt=0, le=1)
    unet_lr: float | None = Field(1e-4, gt=0, le=1)
    text_encoder_lr: float | None = Field(1e-5, ge=0, le=1)
    network_train_unet_only: bool = False
    network_train_text_encoder_only: bool = False
    optimizer_type: str = "AdamW"  # kohya's default; lora-scripts' AdamW8bit needs bitsandbytes and CUDA
    lr_scheduler: str = "cosine_with_restarts"
    lr_warmup_steps: int = Field(0, ge=0)
    lr_scheduler_num_cycles: int = Field(1, ge=1, le=100)
    max_train_epochs: int | None = Field(10, ge=1, le=10000)
    max_train_steps: int | None = Field(None, ge=1, le=10_000_000)
    train_batch_size: int = Field(1, ge=1, le=64)
    gradient_accumulation_steps: int = Field(1, ge=1, le=256)
    max_grad_norm: float = Field(1.0, ge=0)
    mixed_precision: str = "fp16"
    save_precision: str = "fp16"
    save_every_n_epochs: int | None = Field(2, ge=1)
    clip_skip: int = Field(2, ge=1, le=12)
    noise_offset: float | None = Field(None, ge=0, le=1)
    min_snr_gamma: float | None = Field(None, gt=0, le=100)
    shuffle_caption: bool = True
    keep_tokens: int = Field(0, ge=0, le=255)
    caption_extension: str = ".txt"
    max_token_length: int = Field(225, ge=75, le=255)
    seed: int = Field(1337, ge=0, le=2**32 - 1)
    output_name: str = "aki"
    sample_prompts: list[str] = Field(default_factory=list, description="prompts for sample images (A1111 syntax)")
    sample_every_n_epochs: int | None = Field(None, ge=1)

    @field_validator("output_name")
    @classmethod
    def _name(cls, v: str) -> str:
        v = v.strip()
        if not re.fullmatch(r"[\w][\w .()\-]{0,99}", v):
            raise ValueError("use letters, digits, spaces, '.', '-', '_', '(' or ')' (at most 100), no folders")
        return v

    @field_validator("sample_prompts", mode="before")
    @classmethod
    def _prompts(cls, v: Any) -> Any:
        if isinstance(v, str):  # lora-scripts: one prompt per line (a file path there; text here)
            return [line.strip() for line in v.splitlines() if line.strip() and not line.lstrip().startswith("#")]
        return v

    @field_validator("network_args", mode="before")
    @classmethod
    def _args(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("network_module")
    @classmethod
    def _module(cls, v: str) -> str:
        if v not in ("networks.lora", "lycoris.kohya"):
            raise ValueError(f"{v!r} is not available; use networks.lora (LoRA, or LoCon with conv_dim in network_args)")
        return v

    @field_validator("optimizer_type")
    @classmethod
    def _optimizer(cls, v: str) -> str:
        for name in OPTIMIZERS:
            if v.lower() == name.lower():
                return name
        raise ValueError(f"{v!r} is not available; use one of {', '.join(OPTIMIZERS)}")

    @field_validator("lr_scheduler")
    @classmethod
    def _scheduler(cls, v: str) -> str:
        if v not in SCHEDULERS:
            raise ValueError(f"{v!r} is not available; use one of {', '.join(SCHEDULERS)}")
        return v

    @field_validator("mixed_precision", "save_precision")
    @classmethod
    def _precision(cls, v: str) -> str:
        v = {"float": "fp32", "no": "fp32"}.get(v, v)
        if v not in ("fp32", "fp16", "bf16"):
            raise ValueError(f"{v!r}: use fp16, bf16 or float")
        return v

    @field_validator("caption_extension")
    @classmethod
    def _ext(cls, v: str) -> str:
        v = v if v.startswith(".") else "." + v
        if not re.fullmatch(r"\.[A-Za-z0-9]{1,10}", v):
            raise ValueError("an extension such as .txt or .caption")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> TrainOptions:
        if self.max_train_epochs is None and self.max_train_steps is None:
            raise ValueError("set max_train_epochs or max_train_steps")
        if self.network_train_unet_only and self.network_train_text_encoder_only:
            raise ValueError("network_train_unet_only and network_train_text_encoder_only exclude each other")
        if self.min_bucket_reso > self.max_bucket_reso:
            raise ValueError(f"min_bucket_reso ({self.min_bucket_reso}) is above max_bucket_reso ({self.max_bucket_reso})")
        self.size  # noqa: B018 (validates resolution)
        self.conv  # noqa: B018
        return self

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) from "W,H" or "W" (kohya)."""
        parts = [p.strip() for p in str(self.resolution).split(",")]
        try:
            w, h = (int(parts[0]), int(parts[1] if len(parts) > 1 else parts[0]))
        except ValueError:
            raise ValueError(f"resolution {self.resolution!r}: use 'W,H', e.g. '512,512'") from None
        if not (64 <= w <= 4096 and 64 <= h <= 4096) or w % 8 or h % 8:
            raise ValueError(f"resolution {self.resolution!r}: sides from 64 to 4096, multiples of 8")
        return w, h

    @property
    def conv(self) -> tuple[int, float] | None:
        """(conv_dim, conv_alpha) from network_args (LoCon), if any."""
        args = {}
        for a in self.network_args:
            k, sep, v = a.partition("=")
            if not sep:
                raise ValueError(f"network_args: {a!r} is not key=value")
            args[k.strip()] = v.strip()
        unknown = set(args) - {"conv_dim", "conv_alpha", "algo"}
        if unknown:
            raise ValueError(f"network_args: {', '.join(sorted(unknown))} not supported (conv_dim, conv_alpha are)")
        if "conv_dim" not in args:
            return None
        try:
            dim = int(args["conv_dim"])
            return dim, float(args.get("conv_alpha", dim))
        except ValueError:
            raise ValueError("network_args: conv_dim and conv_alpha are numbers") from None

    @property
    def unet_rate(self) -> float:
        return self.unet_lr if self.unet_lr is not None else self.learning_rate

    @property
    def te_rate(self) -> float:
        return self.text_encoder_lr if self.text_encoder_lr is not None else self.learning_rate


def parse_options(data: dict[str, Any]) -> tuple[TrainOptions, list[str]]:
    """Options and the notes about keys that were ignored or unknown (nothing is dropped silently)."""
    if not isinstance(data, dict):
        raise InvalidRequestError("training options must be an object")
    notes: list[str] = []
    known = set(TrainOptions.model_fields)
    clean: dict[str, Any] = {}
    unknown: list[str] = []
    for key, value in data.items():
        if key in known:
            clean[key] = value
        elif key in IGNORED:
            why = IGNORED[key]
            notes.append(f"{key} is ignored" + (f" ({why})" if why else ""))
        else:
            unknown.append(key)
    if unknown:
        raise InvalidRequestError(f"unknown training option(s): {', '.join(sorted(unknown))}; "
                                  f"muralist takes lora-scripts' names ({', '.join(sorted(known)[:8])}, ...)")
    from ..request import checked

    return checked(TrainOptions, clean), notes


def read_toml(path: Path) -> dict[str, Any]:
    """A lora-scripts TOML, flattened (its sections are only grouping)."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise InvalidRequestError(f"{path}: not a readable TOML file ({e})") from None
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return flat
