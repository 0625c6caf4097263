"""LoRA training with kohya sd-scripts' maths, written out in kohya's file format.

The adapters are peft's (kohya's LoRA module: ``W x + up(down(x)) * alpha / rank``, down
Kaiming-uniform, up zero), on the UNet's transformer blocks and the text encoders' attention and
MLP layers, as ``networks.lora`` targets them. The loop is kohya's: DDPM noise at uniform
timesteps, MSE on the noise (or v), optional noise offset and min-SNR weighting, clip skip,
aspect-ratio buckets, cached latents. Files are kohya's: ``lora_unet_*``/``lora_te*_`` keys with
``.lora_down``/``.lora_up``/``.alpha``, ``ss_*`` and ``modelspec.*`` metadata and the ``sshs_*`` hashes,
so A1111, kohya's tools and muralist read them alike.

Training runs on a private copy of the checkpoint: the models that serve generation are never
touched. Every epoch end yields a resume state; a re-run continues from it.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import random
import re
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import InvalidRequestError
from ..models import convert
from ..models.family import Family
from ..models.loader import LoadedModel
from .dataset import Dataset, Item, assign_buckets, load_dataset, load_image, shuffle_caption
from .options import TrainOptions

UNET_TARGETS = (r".*attentions\.\d+\.(proj_in|proj_out|transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)"
                r"|ff\.net\.0\.proj|ff\.net\.2))$")
CONV_TARGETS = r".*(resnets\.\d+\.(conv1|conv2|conv_shortcut|time_emb_proj)|(downsamplers|upsamplers)\.0\.conv)$"
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
_TE_PREFIX = {Family.SD1: {"text_encoder": "lora_te_"}, Family.SD2: {"text_encoder": "lora_te_"},
              Family.SDXL: {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}}
_BASE_VERSION = {Family.SD1: "sd_v1", Family.SD2: "sd_v2", Family.SDXL: "sdxl_base_v1-0"}
_ARCH = {Family.SD1: "stable-diffusion-v1/lora", Family.SD2: "stable-diffusion-v2-512/lora",
         Family.SDXL: "stable-diffusion-xl-v1-base/lora"}
_PRECISION = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
STATE_EVERY = 60.0  # seconds between resume states when no epoch file is saved


@dataclass
class TrainProgress:
    step: int
    steps: int
    epoch: int
    epochs: int
    loss: float
    lr: float
    started: float

    @property
    def fraction(self) -> float:
        return self.step / max(1, self.steps)

    @property
    def eta_seconds(self) -> float | None:
        if self.step == 0:
            return None
        return (time.monotonic() - self.started) / self.step * (self.steps - self.step)


@dataclass
class Saved:
    """A file the run produced: an epoch's LoRA, the final one, its sidecar, a sample or the resume state."""

    kind: str  # "epoch" | "final" | "sidecar" | "state" | "sample"
    name: str
    data: bytes
    epoch: int = 0


@dataclass
class TrainResult:
    steps: int
    epochs: int
    losses: list[float] = field(default_factory=list)
    canceled: bool = False
    warnings: list[str] = field(default_factory=list)
    resumed_from: int = 0  # the step a re-run continued from (0: it started fresh)


def optimizer_available(name: str) -> str | None:
    """None when the optimizer can run here, else what to do about it."""
    import importlib.util

    need = {"AdamW8bit": "bitsandbytes", "Lion": "lion_pytorch", "Prodigy": "prodigyopt"}.get(name)
    if need is None:
        return None
    if importlib.util.find_spec(need) is None:
        return f"optimizer_type {name} needs the {need} package (pip install {need}); or set optimizer_type = \"AdamW\""
    if name == "AdamW8bit" and not torch.cuda.is_available():
        return "optimizer_type AdamW8bit needs a CUDA GPU; set optimizer_type = \"AdamW\""
    return None


def _optimizer(name: str, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    if name == "AdamW":
        return torch.optim.AdamW(groups, weight_decay=0.01)
    if name == "SGDNesterov":
        return torch.optim.SGD(groups, momentum=0.9, nesterov=True)
    if name == "AdamW8bit":
        import bitsandbytes  # type: ignore[import-not-found]

        return bitsandbytes.optim.AdamW8bit(groups)
    if name == "Lion":
        from lion_pytorch import Lion  # type: ignore[import-not-found]

        return Lion(groups)
    from prodigyopt import Prodigy  # type: ignore[import-not-found]

    return Prodigy(groups)


# -- text conditioning (kohya: 75-token chunks, clip skip) ---------------------------------------


_TOKEN_CACHE: dict[tuple[int, str], list[int]] = {}


def _token_ids(tokenizer: Any, caption: str) -> list[int]:
    """A caption's token ids, remembered: the same captions come back every epoch."""
    key = (id(tokenizer), caption)
    ids = _TOKEN_CACHE.get(key)
    if ids is None:
        if len(_TOKEN_CACHE) > 100_000:
            _TOKEN_CACHE.clear()
        ids = _TOKEN_CACHE[key] = tokenizer(caption, add_special_tokens=False)["input_ids"]
    return ids


def _chunks(tokenizer: Any, captions: list[str], max_tokens: int) -> torch.Tensor:
    """Token ids (B, n_chunks, 77): each 75-token chunk wrapped in BOS/EOS and padded, as kohya splits
    a caption of up to ``max_tokens`` tokens."""
    n_max = max(1, max_tokens // 75)
    ids = [_token_ids(tokenizer, c)[: n_max * 75] for c in captions]
    n = max(1, max(math.ceil(len(i) / 75) for i in ids))
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    out = torch.full((len(ids), n, 77), pad, dtype=torch.long)
    for b, seq in enumerate(ids):
        for k in range(n):
            part = seq[k * 75:(k + 1) * 75]
            row = [bos, *part, eos]
            out[b, k, : len(row)] = torch.tensor(row)
    return out


def _encode(te: Any, ids: torch.Tensor, layer: int, final_norm: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Hidden states (B, n*77, D) from ``hidden_states[-layer]`` (and the pooled output of the first chunk)."""
    b, n, length = ids.shape
    if layer == 1 and final_norm:  # the model's own output: no need to keep every layer's states
        out = te(ids.reshape(b * n, length).to(te.device))
        hidden = out.last_hidden_state
    else:
        out = te(ids.reshape(b * n, length).to(te.device), output_hidden_states=True)
        hidden = out.hidden_states[-layer]
        if final_norm:
            hidden = getattr(te, "text_model", te).final_layer_norm(hidden)
    pooled = getattr(out, "text_embeds", None)
    if pooled is not None:
        pooled = pooled.reshape(b, n, -1)[:, 0]
    return hidden.reshape(b, n * length, -1), pooled


def conditioning(model: LoadedModel, captions: list[str], clip_skip: int, max_tokens: int) -> tuple[torch.Tensor, dict[str, Any] | None]:
    fam = model.family
    if fam is Family.SDXL:
        h1, _ = _encode(model.text_encoders["text_encoder"], _chunks(model.tokenizers["text_encoder"], captions, max_tokens), 2, False)
        h2, pooled = _encode(model.text_encoders["text_encoder_2"], _chunks(model.tokenizers["text_encoder_2"], captions, max_tokens), 2, False)
        return torch.cat([h1, h2], dim=-1), {"text_embeds": pooled}
    te, tok = model.text_encoders["text_encoder"], model.tokenizers["text_encoder"]
    hidden, _ = _encode(te, _chunks(tok, captions, max_tokens), clip_skip, clip_skip > 1 or fam is Family.SD1)
    return hidden, None


# -- adapters and export -------------------------------------------------------------------------


def attach_adapters(model: LoadedModel, opts: TrainOptions, seed: int) -> dict[str, list[torch.nn.Parameter]]:
    """peft LoRA layers on the UNet and (unless UNet-only) the text encoders; returns trainable params by part."""
    from peft import LoraConfig, inject_adapter_in_model

    for m in (model.unet, model.vae, *model.text_encoders.values()):
        m.requires_grad_(False)
    torch.manual_seed(seed)
    params: dict[str, list[torch.nn.Parameter]] = {"unet": [], "te": []}
    rank, alpha = opts.network_dim, opts.network_alpha
    if not opts.network_train_text_encoder_only:
        target = UNET_TARGETS
        ranks: dict[str, int] = {}
        alphas: dict[str, float] = {}
        if opts.conv is not None:  # LoCon: ResNet convs too, 3x3 ones at conv_dim/conv_alpha
            cdim, calpha = opts.conv
            target = f"({UNET_TARGETS})|({CONV_TARGETS})"
            for name, mod in model.unet.named_modules():
                if isinstance(mod, torch.nn.Conv2d) and mod.kernel_size != (1, 1) and re.fullmatch(CONV_TARGETS, name):
                    ranks[f"^{name}$"], alphas[f"^{name}$"] = cdim, calpha
        cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=target, init_lora_weights=True,
                         lora_dropout=opts.network_dropout, rank_pattern=ranks, alpha_pattern=alphas)
        inject_adapter_in_model(cfg, model.unet)
        params["unet"] = [p for n, p in model.unet.named_parameters() if "lora_" in n]
    if not opts.network_train_unet_only and opts.te_rate > 0:
        for te in model.text_encoders.values():
            cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=TE_TARGETS, init_lora_weights=True,
                             lora_dropout=opts.network_dropout)
            inject_adapter_in_model(cfg, te)
            params["te"] += [p for n, p in te.named_parameters() if "lora_" in n]
    for p in params["unet"] + params["te"]:
        p.requires_grad_(True)
        p.data = p.data.float()
    return params


def _adapter_layers(module: torch.nn.Module) -> Iterator[tuple[str, Any]]:
    from peft.tuners.lora import LoraLayer

    for name, mod in module.named_modules():
        if isinstance(mod, LoraLayer) and "default" in mod.lora_A:
            yield name, mod


def kohya_tensors(model: LoadedModel, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The trained adapters under kohya's names (SD1/SD2 UNet: diffusers paths; SDXL: LDM paths)."""
    out: dict[str, torch.Tensor] = {}
    cfg = model.unet.config
    lpb = cfg["layers_per_block"]
    up_attn = [t.startswith("CrossAttn") for t in cfg["up_block_types"]]

    def put(key: str, layer: Any) -> None:
        down, up = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        rank = down.shape[0]
        alpha = layer.scaling["default"] * rank
        out[f"{key}.lora_down.weight"] = down.detach().to("cpu", dtype).contiguous()
        out[f"{key}.lora_up.weight"] = up.detach().to("cpu", dtype).contiguous()
        out[f"{key}.alpha"] = torch.tensor(float(alpha)).to(dtype)

    for name, layer in _adapter_layers(model.unet):
        path = convert.unet_key(name + ".weight", lpb, up_attn).removesuffix(".weight") if model.family is Family.SDXL else name
        put("lora_unet_" + path.replace(".", "_"), layer)
    for component, prefix in _TE_PREFIX[model.family].items():
        te = model.text_encoders.get(component)
        if te is None:
            continue
        wrapped = hasattr(te, "text_model")
        for name, layer in _adapter_layers(te):
            put(prefix + (name if wrapped else "text_model." + name).replace(".", "_"), layer)
    return out


def safetensors_with_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """kohya's save: serialise with the ss_* metadata, hash the tensor bytes (A1111's "addnet" hash and
    the legacy hash), then serialise again with the hashes added (the tensor bytes do not change)."""
    from safetensors.torch import save

    first = save(tensors, metadata={k: v for k, v in metadata.items() if k.startswith("ss_")})
    header = int.from_bytes(first[:8], "little")
    model_hash = hashlib.sha256(first[8 + header:]).hexdigest()
    legacy = hashlib.sha256(first[0x100000:0x110000]).hexdigest()[:8]
    return save(tensors, metadata={**metadata, "sshs_model_hash": model_hash, "sshs_legacy_hash": legacy})


# -- the run -------------------------------------------------------------------------------------


@dataclass
class Plan:
    batches_per_epoch: int
    steps_per_epoch: int
    epochs: int
    steps: int


def plan(ds: Dataset, opts: TrainOptions) -> Plan:
    """Batches (one bucket each, kohya), optimizer steps per epoch and the totals."""
    per_bucket: dict[tuple[int, int], int] = {}
    for i in ds.items:
        per_bucket[i.bucket] = per_bucket.get(i.bucket, 0) + ds.repeats[i.folder]
    batches = sum(math.ceil(n / opts.train_batch_size) for n in per_bucket.values())
    per_epoch = math.ceil(batches / opts.gradient_accumulation_steps)
    if opts.max_train_epochs is not None:
        epochs = opts.max_train_epochs
        steps = epochs * per_epoch if opts.max_train_steps is None else min(opts.max_train_steps, epochs * per_epoch)
    else:
        steps = opts.max_train_steps or per_epoch
        epochs = math.ceil(steps / per_epoch)
    return Plan(batches, per_epoch, epochs, steps)


def _epoch_batches(ds: Dataset, opts: TrainOptions, epoch: int) -> list[list[Item]]:
    rng = random.Random(opts.seed * 1000 + epoch)
    by_bucket: dict[tuple[int, int], list[Item]] = {}
    for i in ds.items:
        by_bucket.setdefault(i.bucket, []).extend([i] * ds.repeats[i.folder])
    batches = []
    for items in by_bucket.values():
        rng.shuffle(items)
        batches += [items[k:k + opts.train_batch_size] for k in range(0, len(items), opts.train_batch_size)]
    rng.shuffle(batches)
    return batches


def metadata(opts: TrainOptions, model: LoadedModel, ds: Dataset, p: Plan, info: Any, epoch: int, step: int,
             started: float, session: str) -> dict[str, str]:
    from ..models.hashing import legacy_hash

    w, h = opts.size
    v = model.prediction_type == "v_prediction"
    fam = model.family
    meta: dict[str, Any] = {
        "ss_session_id": session, "ss_training_started_at": started, "ss_training_finished_at": time.time(),
        "ss_output_name": opts.output_name, "ss_steps": step, "ss_epoch": epoch, "ss_num_epochs": p.epochs,
        "ss_max_train_steps": p.steps, "ss_seed": opts.seed, "ss_training_comment": "trained with muralist",
        "ss_network_module": opts.network_module, "ss_network_dim": opts.network_dim, "ss_network_alpha": opts.network_alpha,
        "ss_network_dropout": opts.network_dropout,
        "ss_base_model_version": _BASE_VERSION[fam] + ("_v" if v and fam is not Family.SDXL else ""),
        "ss_v2": fam is Family.SD2, "ss_sd_model_name": info.path.name, "ss_sd_model_hash": legacy_hash(info.path),
        "ss_new_sd_model_hash": info.sha256, "ss_clip_skip": opts.clip_skip, "ss_learning_rate": opts.learning_rate,
        "ss_unet_lr": opts.unet_rate, "ss_text_encoder_lr": opts.te_rate,
        "ss_optimizer": {"AdamW": "torch.optim.adamw.AdamW(weight_decay=0.01)"}.get(opts.optimizer_type, opts.optimizer_type),
        "ss_lr_scheduler": opts.lr_scheduler, "ss_lr_warmup_steps": opts.lr_warmup_steps, "ss_max_grad_norm": opts.max_grad_norm,
        "ss_gradient_accumulation_steps": opts.gradient_accumulation_steps, "ss_mixed_precision": opts.mixed_precision,
        "ss_min_snr_gamma": opts.min_snr_gamma, "ss_noise_offset": opts.noise_offset, "ss_max_token_length": opts.max_token_length,
        "ss_cache_latents": True, "ss_num_train_images": ds.num_train_images, "ss_num_reg_images": 0,
        "ss_num_batches_per_epoch": p.batches_per_epoch, "ss_batch_size_per_device": opts.train_batch_size,
        "ss_total_batch_size": opts.train_batch_size * opts.gradient_accumulation_steps, "ss_resolution": f"({w}, {h})",
        "ss_enable_bucket": opts.enable_bucket, "ss_bucket_no_upscale": opts.bucket_no_upscale,
        "ss_min_bucket_reso": opts.min_bucket_reso, "ss_max_bucket_reso": opts.max_bucket_reso,
        "ss_bucket_info": json.dumps(ds.bucket_info()), "ss_shuffle_caption": opts.shuffle_caption,
        "ss_keep_tokens": opts.keep_tokens, "ss_dataset_dirs": json.dumps(ds.dataset_dirs(), ensure_ascii=False),
        "ss_tag_frequency": json.dumps(ds.tag_frequency(), ensure_ascii=False), "ss_color_aug": False, "ss_flip_aug": False,
        "ss_random_crop": False, "ss_caption_dropout_rate": 0.0, "ss_prior_loss_weight": 1.0,
        "modelspec.sai_model_spec": "1.0.1", "modelspec.architecture": _ARCH[fam],
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models" if fam is Family.SDXL else "diffusers",
        "modelspec.title": opts.output_name, "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "modelspec.resolution": f"{w}x{h}", "modelspec.prediction_type": "v" if v else "epsilon",
        "modelspec.encoder_layer": str(opts.clip_skip),
    }
    if opts.network_args:
        meta["ss_network_args"] = json.dumps(dict(a.split("=", 1) for a in opts.network_args))
    return {k: str(v) for k, v in meta.items()}


def noise_schedule() -> Any:
    """The DDPM schedule SD was trained with (kohya's and A1111's training noise)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                         clip_sample=False)


def cache_latents(model: LoadedModel, items: list[Item], seed: int) -> dict[Path, torch.Tensor]:
    """Each image's latents once (kohya's cache_latents): a sample of the VAE's distribution drawn
    with a fixed seed, scaled, on the CPU."""
    from ..engine.txt2img import to_tensor

    gen = torch.Generator("cpu").manual_seed(seed)
    out: dict[Path, torch.Tensor] = {}
    with torch.no_grad():
        for item in items:
            dist = model.vae.encode(to_tensor([load_image(item)]).to(model.device, model.vae.dtype)).latent_dist
            drawn = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen).to(dist.mean.device, dist.mean.dtype)
            out[item.path] = (drawn * model.vae_scale).float().cpu()
    return out


def _lora_params(model: LoadedModel) -> dict[str, torch.nn.Parameter]:
    """Adapter parameters keyed by component and path (SDXL's two encoders share paths)."""
    parts = {"unet": model.unet, **model.text_encoders}
    return {f"{c}:{n}": prm for c, part in parts.items() for n, prm in part.named_parameters() if "lora_" in n}


def train_lora(
    model: LoadedModel,
    info: Any,
    opts: TrainOptions,
    data_dir: Path,
    *,
    progress: Callable[[TrainProgress], None] | None = None,
    save: Callable[[Saved], None] | None = None,
    stopped: Callable[[], bool] | None = None,
    resume: bytes | None = None,
    sample: Callable[[LoadedModel, int], list[Saved]] | None = None,
) -> TrainResult:
    """Train ``model`` (a private copy: it is changed) on the dataset; files go to ``save``."""
    import torch.nn.functional as F
    from diffusers.optimization import get_scheduler

    save = save or (lambda s: None)
    problem = optimizer_available(opts.optimizer_type)
    if problem:
        raise InvalidRequestError(problem)
    ds = load_dataset(data_dir, opts.caption_extension)
    mn, mx = opts.min_bucket_reso, opts.max_bucket_reso
    assign_buckets(ds, opts.size, opts.enable_bucket, mn, mx, opts.bucket_reso_steps, opts.bucket_no_upscale)
    p = plan(ds, opts)
    dev = model.device
    params = attach_adapters(model, opts, opts.seed)
    groups = [g for g in ({"params": params["unet"], "lr": opts.unet_rate}, {"params": params["te"], "lr": opts.te_rate})
              if g["params"]]
    if not groups:
        raise InvalidRequestError("nothing to train: network_train_unet_only with text_encoder_lr 0, or the reverse")
    optimizer = _optimizer(opts.optimizer_type, groups)
    scheduler = get_scheduler(opts.lr_scheduler, optimizer, num_warmup_steps=opts.lr_warmup_steps,
                              num_training_steps=p.steps, num_cycles=opts.lr_scheduler_num_cycles)
    noise_sched = noise_schedule()
    alphas = noise_sched.alphas_cumprod.to(dev)
    session = uuid.uuid4().hex
    start_epoch, step, started = 0, 0, time.time()
    result = TrainResult(0, p.epochs, warnings=list(ds.warnings))
    if resume is not None:  # a re-run continues after the last finished epoch
        state = torch.load(io.BytesIO(resume), map_location="cpu", weights_only=True)
        named = _lora_params(model)
        for key, t in state["lora"].items():
            if key in named:
                named[key].data.copy_(t)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, step, started = int(state["epoch"]), int(state["step"]), float(state["started"])
        result.resumed_from = step
        result.losses = [float(x) for x in state["losses"]]
        session = str(state.get("session", session))

    latents = cache_latents(model, ds.items, opts.seed)

    trainable = params["unet"] + params["te"]
    v_pred = model.prediction_type == "v_prediction"
    tick = last_state = time.monotonic()
    cap_rng = random.Random(opts.seed)
    model.unet.train()
    for te in model.text_encoders.values():
        te.train(bool(params["te"]))
    for epoch in range(start_epoch, p.epochs):
        batches = _epoch_batches(ds, opts, epoch)
        accum = 0
        for batch in batches:
            if step >= p.steps:
                break
            if stopped is not None and stopped():
                result.canceled = True
                result.steps = step
                return result
            captions = [shuffle_caption(i.caption, opts.keep_tokens, cap_rng) if opts.shuffle_caption else i.caption
                        for i in batch]
            x0 = torch.cat([latents[i.path] for i in batch]).to(dev)
            noise = torch.randn_like(x0)
            if opts.noise_offset:
                noise = noise + opts.noise_offset * torch.randn(x0.shape[0], x0.shape[1], 1, 1, device=dev)
            t = torch.randint(0, 1000, (x0.shape[0],), device=dev)
            noisy = noise_sched.add_noise(x0, noise, t)
            with torch.set_grad_enabled(bool(params["te"])):
                context, added = conditioning(model, captions, opts.clip_skip, opts.max_token_length)
            if added is not None:  # SDXL: (original size, crop top-left, target size) of the bucket
                bw, bh = batch[0].bucket
                ids = torch.tensor([bh, bw, 0, 0, bh, bw], dtype=context.dtype, device=dev).repeat(x0.shape[0], 1)
                added = {"text_embeds": added["text_embeds"].to(context.dtype), "time_ids": ids}
            pred = model.unet(noisy.to(model.unet.dtype), t, encoder_hidden_states=context, added_cond_kwargs=added).sample.float()
            target = noise_sched.get_velocity(x0, noise, t) if v_pred else noise
            loss = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))
            if opts.min_snr_gamma:
                snr = alphas[t] / (1 - alphas[t])
                weight = torch.clamp(snr, max=opts.min_snr_gamma) / (snr + 1 if v_pred else snr)
                loss = loss * weight
            loss = loss.mean()
            (loss / opts.gradient_accumulation_steps).backward()
            accum += 1
            if accum % opts.gradient_accumulation_steps and batch is not batches[-1]:
                continue
            if opts.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(trainable, opts.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            result.losses.append(float(loss.detach()))
            if progress is not None:
                progress(TrainProgress(step, p.steps, epoch + 1, p.epochs, result.losses[-1], scheduler.get_last_lr()[0], tick))
        done_epoch = epoch + 1
        final = done_epoch >= p.epochs or step >= p.steps
        save_precision = _PRECISION[opts.save_precision]
        saved_epoch = bool(not final and opts.save_every_n_epochs and done_epoch % opts.save_every_n_epochs == 0)
        if saved_epoch:
            meta = metadata(opts, model, ds, p, info, done_epoch, step, started, session)
            save(Saved("epoch", f"{opts.output_name}-{done_epoch:06d}.safetensors",
                       safetensors_with_hashes(kohya_tensors(model, save_precision), meta), done_epoch))
        if sample is not None and opts.sample_prompts and opts.sample_every_n_epochs \
                and (done_epoch % opts.sample_every_n_epochs == 0 or final):
            for s in sample(model, done_epoch):
                save(s)
        # The resume state goes with every saved epoch, and otherwise at most once a minute: short
        # epochs would spend their time serialising it.
        if not final and (saved_epoch or time.monotonic() - last_state >= STATE_EVERY):
            last_state = time.monotonic()
            state = {"lora": {n: prm.detach().cpu() for n, prm in _lora_params(model).items()},
                     "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "epoch": done_epoch,
                     "step": step, "started": started, "losses": torch.tensor(result.losses), "session": session}
            buf = io.BytesIO()
            torch.save(state, buf)
            save(Saved("state", "state.pt", buf.getvalue(), done_epoch))
        if final:
            meta = metadata(opts, model, ds, p, info, done_epoch, step, started, session)
            save(Saved("final", f"{opts.output_name}.safetensors",
                       safetensors_with_hashes(kohya_tensors(model, save_precision), meta), done_epoch))
            tokens = next(iter(ds.dataset_dirs()), "").partition("_")[2]
            sidecar = {"description": f"trained with muralist on {data_dir.name}", "sd version": model.family.label.split(".")[0],
                       "activation text": tokens, "preferred weight": 0, "notes": ""}
            save(Saved("sidecar", f"{opts.output_name}.json", json.dumps(sidecar, ensure_ascii=False, indent=2).encode(),
                       done_epoch))
            break
    result.steps = step
    return result
