"""LoRA training benchmark (issue 12): muralist's trainer against a bare diffusers + peft loop.

Both train the same tiny SD1.5 model on the same 4 images (64x64, batch 4, rank 8, AdamW, UNet and
text-encoder adapters, latents cached) for the same number of steps, each in its own process so peak
memory (max RSS) is its own. Runs alternate; prints steps/s of each, the ratio (target >= 0.95) and
peak memory.

Usage: python bench/training.py [--runs 3] [--steps 40] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _setup(work: Path) -> None:
    from PIL import Image, ImageDraw

    from muralist.models.tiny import make_tiny_models
    from muralist.paths import DataDirs

    dirs = DataDirs.from_options(work)
    make_tiny_models(dirs.ckpt_dir, dirs.vae_dir)
    folder = work / "dataset" / "10_sks shape"
    folder.mkdir(parents=True)
    for i in range(4):
        img = Image.new("RGB", (64, 64), "white")
        (ImageDraw.Draw(img).ellipse if i % 2 else ImageDraw.Draw(img).rectangle)((8 + i, 8, 54, 56 - i), fill=(200, 30, 30))
        img.save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text("sks shape")


def _ours(work: Path, steps: int) -> float:
    from muralist.models.loader import load_checkpoint
    from muralist.models.registry import ModelRegistry
    from muralist.paths import DataDirs
    from muralist.training.lora import train_lora
    from muralist.training.options import parse_options

    info = ModelRegistry(DataDirs.from_options(work)).find_checkpoint("tiny-sd15")
    model = load_checkpoint(info.path, info.kind, info.prediction_type, "cpu")
    opts, _ = parse_options({"pretrained_model_name_or_path": "tiny-sd15", "train_data_dir": "dataset", "resolution": "64,64",
                             "train_batch_size": 4, "network_dim": 8, "network_alpha": 8, "max_train_steps": steps,
                             "max_train_epochs": None, "lr_scheduler": "constant", "shuffle_caption": False,
                             "min_bucket_reso": 64, "bucket_reso_steps": 8, "save_every_n_epochs": None, "clip_skip": 1,
                             "output_name": "bench"})
    marks: list[float] = []
    train_lora(model, info, opts, work / "dataset", progress=lambda p: marks.append(time.perf_counter()))
    return _rate(marks)


def _bare(work: Path, steps: int) -> float:
    import numpy as np
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler
    from peft import LoraConfig, inject_adapter_in_model
    from PIL import Image

    from muralist.models.loader import load_checkpoint

    model = load_checkpoint(work / "models" / "Stable-diffusion" / "tiny-sd15.safetensors", device="cpu")
    unet, vae, te, tok = model.unet, model.vae, model.text_encoders["text_encoder"], model.tokenizers["text_encoder"]
    for m in (unet, vae, te):
        m.requires_grad_(False)
    torch.manual_seed(0)
    targets = (r".*attentions\.\d+\.(proj_in|proj_out|transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)"
               r"|ff\.net\.0\.proj|ff\.net\.2))$")
    inject_adapter_in_model(LoraConfig(r=8, lora_alpha=8, target_modules=targets), unet)
    inject_adapter_in_model(LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]), te)
    params = [p for m in (unet, te) for n, p in m.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW([{"params": [p for n, p in unet.named_parameters() if "lora_" in n], "lr": 1e-4},
                             {"params": [p for n, p in te.named_parameters() if "lora_" in n], "lr": 1e-5}], weight_decay=0.01)
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    files = sorted((work / "dataset" / "10_sks shape").glob("*.png"))
    with torch.no_grad():
        imgs = torch.stack([torch.from_numpy(np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
                            for f in files])
        latents = vae.encode(imgs).latent_dist.sample() * vae.config.scaling_factor
    ids = tok(["sks shape"] * 4, padding="max_length", max_length=77, return_tensors="pt").input_ids
    unet.train()
    te.train()
    marks = []
    for _ in range(steps):
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (4,))
        ctx = te(ids).last_hidden_state
        pred = unet(sched.add_noise(latents, noise, t), t, encoder_hidden_states=ctx).sample
        loss = F.mse_loss(pred, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        marks.append(time.perf_counter())
    return _rate(marks)


def _rate(marks: list[float]) -> float:
    """Steps/s over the whole run (setup and latent caching excluded) and of the median step."""
    gaps = [b - a for a, b in zip(marks, marks[1:], strict=False)]
    return (len(marks) - 1) / (marks[-1] - marks[0]), 1.0 / statistics.median(gaps)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--child", choices=["ours", "bare"])
    ap.add_argument("--work", type=Path)
    args = ap.parse_args()
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        rate, median = (_ours if args.child == "ours" else _bare)(args.work, args.steps)
        print(json.dumps({"steps_per_s": rate, "median_step_per_s": median,
                          "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
        return
    work = Path(tempfile.mkdtemp(prefix="muralist-bench-train-"))
    _setup(work)
    res: dict[str, list[dict[str, float]]] = {"ours": [], "bare": []}
    for _ in range(args.runs):
        for mode in ("ours", "bare"):
            out = subprocess.run([sys.executable, __file__, "--child", mode, "--work", str(work), "--steps", str(args.steps),
                                  "--threads", str(args.threads)], capture_output=True, text=True, check=True)
            res[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
    rate = {m: statistics.median(r["steps_per_s"] for r in v) for m, v in res.items()}
    step = {m: statistics.median(r["median_step_per_s"] for r in v) for m, v in res.items()}
    rss = {m: max(r["max_rss_mb"] for r in v) for m, v in res.items()}
    print(f"tiny SD1.5, 4 images 64x64, batch 4, rank 8, {args.steps} steps, {args.threads} thread(s), {args.runs} runs each")
    print(f"    muralist trainer   {rate['ours']:6.2f} steps/s (median step {step['ours']:6.2f}/s)   peak RSS {rss['ours']:7.0f} MiB")
    print(f"    diffusers + peft   {rate['bare']:6.2f} steps/s (median step {step['bare']:6.2f}/s)   peak RSS {rss['bare']:7.0f} MiB")
    print(f"    ratio {rate['ours'] / rate['bare']:.3f} overall, {step['ours'] / step['bare']:.3f} per median step (target >= 0.95)")


if __name__ == "__main__":
    main()
