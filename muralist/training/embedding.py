"""Textual-inversion training as A1111 does it (its train_embedding options), saved in A1111's ``.pt``.

New vectors stand in for ``[name]`` in prompts built from a template (``[filewords]`` is the image's
caption); they start from the embedding of ``init_text`` (vector i = token i*len/n, A1111's rule)
and are the only thing trained. The loss and noise are the LoRA trainer's (kohya's and A1111's
are the same DDPM objective). SD1.x and SD2.x models.
"""

from __future__ import annotations

import io
import math
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..errors import InvalidRequestError
from ..models.family import Family
from ..models.loader import LoadedModel
from .dataset import assign_buckets, load_dataset
from .lora import Saved, TrainProgress, TrainResult, _encode, cache_latents, noise_schedule

# Built-in prompt templates (A1111's template files' roles; the wording is ours).
TEMPLATES: dict[str, list[str]] = {
    "subject": ["a photo of a [name]", "a rendering of a [name]", "a close-up photo of the [name]", "a bright photo of a [name]",
                "a cropped photo of the [name]", "a good photo of a [name]"],
    "style": ["a painting, art by [name]", "a rendering, art by [name]", "an illustration in the style of [name]",
              "a picture in the style of [name]"],
    "subject_filewords": ["a photo of a [name], [filewords]", "a rendering of a [name], [filewords]",
                          "a close-up photo of the [name], [filewords]"],
    "style_filewords": ["a painting of [filewords], art by [name]", "an illustration of [filewords] in the style of [name]",
                        "a picture of [filewords], [name] style"],
    "none": ["picture"],
}


class EmbeddingOptions(BaseModel):
    """A1111's create_embedding + train_embedding arguments (muralist adds the checkpoint and dataset)."""

    model_config = ConfigDict(extra="forbid")

    embedding_name: str
    pretrained_model_name_or_path: str = Field(description="checkpoint title, name or hash")
    data_root: str = Field(description="one of your datasets (kohya folders or loose images with .txt captions)")
    num_vectors_per_token: int = Field(1, ge=1, le=75)
    init_text: str = "*"
    learn_rate: str = Field("0.005", description="a rate, or A1111's schedule '0.005:100, 1e-3:1000, 1e-5'")
    batch_size: int = Field(1, ge=1, le=64)
    gradient_step: int = Field(1, ge=1, le=256)
    training_width: int = Field(512, ge=64, le=2048)
    training_height: int = Field(512, ge=64, le=2048)
    steps: int = Field(2000, ge=1, le=1_000_000)
    template_filename: str = Field("style_filewords.txt", validate_default=True)
    shuffle_tags: bool = False
    tag_drop_out: float = Field(0.0, ge=0, le=1)
    clip_grad_mode: str = "disabled"
    clip_grad_value: float = Field(0.1, gt=0)
    save_embedding_every: int = Field(500, ge=0)
    seed: int = Field(0, ge=0, le=2**32 - 1)

    @field_validator("embedding_name")
    @classmethod
    def _name(cls, v: str) -> str:
        v = "".join(c for c in v if c.isalnum() or c in "._- ").strip()  # A1111's sanitising
        if not v:
            raise ValueError("give the embedding a name (letters, digits, '.', '_', '-', space)")
        return v

    @field_validator("template_filename")
    @classmethod
    def _template(cls, v: str) -> str:
        key = Path(v).stem
        if key not in TEMPLATES:
            raise ValueError(f"{v!r}: one of {', '.join(k + '.txt' for k in TEMPLATES)}")
        return key

    @field_validator("clip_grad_mode")
    @classmethod
    def _clip(cls, v: str) -> str:
        if v not in ("disabled", "value", "norm"):
            raise ValueError("disabled, value or norm")
        return v

    @field_validator("learn_rate", mode="before")
    @classmethod
    def _rate(cls, v: Any) -> str:
        v = str(v)
        schedule(v, 1)  # raises ValueError naming the problem
        return v


def schedule(text: str, steps: int) -> list[tuple[float, int]]:
    """A1111's learning-rate schedule: 'rate:until_step, ...', the last one until the end."""
    out = []
    for part in [p.strip() for p in text.split(",") if p.strip()]:
        rate, sep, until = part.partition(":")
        try:
            out.append((float(rate), int(until) if sep else steps))
        except ValueError:
            raise ValueError(f"learn_rate: {part!r} is not 'rate' or 'rate:step'") from None
    if not out:
        raise ValueError("learn_rate: give a rate, e.g. 0.005")
    return out


def rate_at(plan: list[tuple[float, int]], step: int) -> float:
    for rate, until in plan:
        if step < until:
            return rate
    return plan[-1][0]


def parse_embedding_options(data: dict[str, Any]) -> EmbeddingOptions:
    from ..request import checked

    return checked(EmbeddingOptions, data)


def _body(te: Any) -> Any:
    return getattr(te, "text_model", te)


def initial_vectors(model: LoadedModel, text: str, n: int) -> torch.Tensor:
    """A1111's create_embedding: vector i = the init text's token embedding i*len/n (zeros without text)."""
    emb = _body(model.text_encoders["text_encoder"]).embeddings.token_embedding.weight
    ids = model.tokenizers["text_encoder"](text, add_special_tokens=False)["input_ids"] if text else []
    vec = torch.zeros(n, emb.shape[1])
    if ids:
        embedded = emb[torch.tensor(ids)].detach().float().cpu()
        for i in range(n):
            vec[i] = embedded[i * len(ids) // n]
    return vec


def a1111_file(vectors: torch.Tensor, name: str, step: int, info: Any) -> bytes:
    """A1111's embedding .pt (what its loader and muralist's read)."""
    data = {"string_to_token": {"*": 265}, "string_to_param": {"*": vectors.detach().cpu().float().clone()}, "name": name,
            "step": step, "sd_checkpoint": info.shorthash, "sd_checkpoint_name": info.model_name}
    buf = io.BytesIO()
    torch.save(data, buf)
    return buf.getvalue()


def _prompt_ids(tok: Any, template: str, caption: str, n: int) -> tuple[list[int], int]:
    """Token ids of a template with [name] as ``n`` placeholder slots; returns (ids, first slot)."""
    text = template.replace("[filewords]", caption)
    before, _, after = text.partition("[name]")
    a = tok(before, add_special_tokens=False)["input_ids"]
    b = tok(after, add_special_tokens=False)["input_ids"] if "[name]" in text else []
    slots = n if "[name]" in text else 0
    ids = [tok.bos_token_id, *a, *([0] * slots), *b][:76] + [tok.eos_token_id]
    return ids, (1 + len(a)) if slots else -1


def train_embedding(
    model: LoadedModel,
    info: Any,
    opts: EmbeddingOptions,
    data_dir: Path,
    *,
    progress: Callable[[TrainProgress], None] | None = None,
    save: Callable[[Saved], None] | None = None,
    stopped: Callable[[], bool] | None = None,
    resume: bytes | None = None,
) -> TrainResult:
    import torch.nn.functional as F

    if model.family is Family.SDXL:
        raise InvalidRequestError("embedding training is for SD1.x and SD2.x checkpoints; SDXL is not supported yet")
    save = save or (lambda s: None)
    te, tok = model.text_encoders["text_encoder"], model.tokenizers["text_encoder"]
    for m in (model.unet, model.vae, te):
        m.requires_grad_(False)
    n = opts.num_vectors_per_token
    vectors = torch.nn.Parameter(initial_vectors(model, opts.init_text, n).to(model.device))
    plan = schedule(opts.learn_rate, opts.steps)
    optimizer = torch.optim.AdamW([vectors], lr=rate_at(plan, 0), weight_decay=0.0)
    step, losses = 0, []
    result = TrainResult(0, 1)
    if resume is not None:
        state = torch.load(io.BytesIO(resume), map_location="cpu", weights_only=True)
        vectors.data.copy_(state["vectors"])
        optimizer.load_state_dict(state["optimizer"])
        step, losses = int(state["step"]), [float(x) for x in state["losses"]]
        result.resumed_from = step

    slots: list[int] = []

    def put_vectors(module: Any, args: Any, output: torch.Tensor) -> torch.Tensor:
        # The placeholders' token embeddings are the trained vectors (one occurrence per row).
        out = output.clone()
        for row, first in enumerate(slots):
            if first >= 0:
                out[row, first:first + n] = vectors.to(out.dtype)
        return out

    hook = _body(te).embeddings.token_embedding.register_forward_hook(put_vectors)
    try:
        ds = load_dataset(data_dir, ".txt")
        size = (opts.training_width, opts.training_height)
        assign_buckets(ds, size, False, 64, 4096, 8, False)
        latents = cache_latents(model, ds.items, opts.seed)
        noise_sched = noise_schedule()
        rng = random.Random(opts.seed + step)
        layer = 1
        tick = time.monotonic()
        templates = TEMPLATES[opts.template_filename]
        v_pred = model.prediction_type == "v_prediction"
        while step < opts.steps:
            if stopped is not None and stopped():
                result.canceled = True
                break
            for g in optimizer.param_groups:
                g["lr"] = rate_at(plan, step)
            for _ in range(opts.gradient_step):
                picks = [rng.randrange(len(ds.items)) for _ in range(opts.batch_size)]
                ids, slots[:] = [], []
                for k in picks:
                    tags = [t.strip() for t in ds.items[k].caption.split(",") if t.strip()]
                    if opts.shuffle_tags:
                        rng.shuffle(tags)
                    if opts.tag_drop_out:
                        tags = [t for t in tags if rng.random() >= opts.tag_drop_out]
                    row, first = _prompt_ids(tok, rng.choice(templates), ", ".join(tags), n)
                    ids.append(row + [tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id] * (77 - len(row)))
                    slots.append(first)
                context, _ = _encode(te, torch.tensor(ids)[:, None, :], layer, model.family is Family.SD1)
                x0 = torch.cat([latents[ds.items[k].path] for k in picks]).to(model.device)
                noise = torch.randn_like(x0)
                t = torch.randint(0, 1000, (x0.shape[0],), device=model.device)
                pred = model.unet(noise_sched.add_noise(x0, noise, t).to(model.unet.dtype), t, encoder_hidden_states=context).sample
                target = noise_sched.get_velocity(x0, noise, t) if v_pred else noise
                loss = F.mse_loss(pred.float(), target)
                (loss / opts.gradient_step).backward()
            if opts.clip_grad_mode == "value":
                torch.nn.utils.clip_grad_value_([vectors], opts.clip_grad_value)
            elif opts.clip_grad_mode == "norm":
                torch.nn.utils.clip_grad_norm_([vectors], opts.clip_grad_value)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            losses.append(float(loss.detach()))
            if progress is not None:
                progress(TrainProgress(step, opts.steps, 1, 1, losses[-1], rate_at(plan, step - 1), tick))
            if opts.save_embedding_every and step % opts.save_embedding_every == 0 and step < opts.steps:
                save(Saved("epoch", f"{opts.embedding_name}-{step}.pt", a1111_file(vectors, opts.embedding_name, step, info), step))
                buf = io.BytesIO()
                torch.save({"vectors": vectors.detach().cpu(), "optimizer": optimizer.state_dict(), "step": step,
                            "losses": torch.tensor(losses)}, buf)
                save(Saved("state", "state.pt", buf.getvalue(), step))
    finally:
        hook.remove()
    if not result.canceled:
        save(Saved("final", f"{opts.embedding_name}.pt", a1111_file(vectors, opts.embedding_name, step, info), step))
    result.steps, result.losses = step, losses
    result.epochs = max(1, math.ceil(step / max(1, len(ds.items))))
    return result
