"""Engine overhead benchmark (issue 2).

(a) The same tiny SD1.5 generation through muralist's engine and through a bare diffusers
    StableDiffusionPipeline call with the same weights, sampler, seed and size; runs interleaved;
    prints the ratio of medians (target <= 1.03) and the largest pixel difference.
(b) Whole process: `muralist generate` vs a bare diffusers script (load, generate, save a PNG),
    interleaved; prints the ratio of medians (target <= 1.10).

Usage: python bench/engine.py [--runs 7] [--size 128] [--steps 20]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--process-runs", type=int, default=5)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()

    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionPipeline

    from muralist.engine.samplers import BASE_SCHEDULER_CONFIG
    from muralist.engine.txt2img import Identity, txt2img
    from muralist.models.family import Family
    from muralist.models.loader import load_checkpoint
    from muralist.models.tiny import make_tiny_models
    from muralist.request import GenerationRequest

    work = Path(tempfile.mkdtemp(prefix="muralist-bench-"))
    ckpt_dir = work / "models" / "Stable-diffusion"
    make_tiny_models(ckpt_dir, work / "models" / "VAE")
    ckpt = ckpt_dir / "tiny-sd15.safetensors"
    model = load_checkpoint(ckpt, device="cpu")
    assert model.family is Family.SD1

    def scheduler():
        cfg = dict(BASE_SCHEDULER_CONFIG, timestep_spacing="linspace")
        return EulerAncestralDiscreteScheduler.from_config(cfg)

    pipe = StableDiffusionPipeline(
        vae=model.vae, text_encoder=model.text_encoders["text_encoder"], tokenizer=model.tokenizers["text_encoder"],
        unet=model.unet, scheduler=scheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    prompt, seed, n = "a lighthouse on a cliff, stormy sea", 1234, args.size
    req = GenerationRequest(prompt=prompt, seed=seed, width=n, height=n, steps=args.steps, sampler_name="Euler a", cfg_scale=7)

    def ours():
        return txt2img(model, req, Identity("tiny-sd15", "0"))

    def bare():
        pipe.scheduler = scheduler()
        g = torch.Generator("cpu").manual_seed(seed)
        return pipe(prompt, height=n, width=n, num_inference_steps=args.steps, guidance_scale=7.0, generator=g)

    ours(), bare()  # warm-up
    def timed(fn, acc: list[float]):
        t = time.perf_counter()
        out = fn()
        acc.append(time.perf_counter() - t)
        return out

    t_ours, t_bare = [], []
    for _ in range(args.runs):
        a = timed(ours, t_ours)
        b = timed(bare, t_bare)
    diff = np.abs(np.asarray(a.images[0]).astype(int) - np.asarray(b.images[0]).astype(int)).max()
    mo, mb = statistics.median(t_ours), statistics.median(t_bare)
    print(f"(a) in-process, {n}x{n}, {args.steps} steps Euler a, {args.runs} interleaved runs")
    print(f"    muralist engine  median {mo * 1000:8.1f} ms")
    print(f"    bare diffusers   median {mb * 1000:8.1f} ms")
    print(f"    ratio {mo / mb:.3f} (target <= 1.03); max pixel difference {diff}/255")

    # (b) whole process
    diffusers_dir = work / "diffusers"
    pipe.scheduler = scheduler()
    pipe.save_pretrained(diffusers_dir, safe_serialization=True)
    bare_script = work / "bare.py"
    bare_script.write_text(textwrap.dedent(f"""
        import torch
        from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionPipeline
        pipe = StableDiffusionPipeline.from_pretrained({str(diffusers_dir)!r}, local_files_only=True, safety_checker=None)
        pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        img = pipe({prompt!r}, height={n}, width={n}, num_inference_steps={args.steps}, guidance_scale=7.0,
                   generator=torch.Generator("cpu").manual_seed({seed})).images[0]
        img.save({str(work / "bare.png")!r})
    """))
    ours_cmd = [sys.executable, "-m", "muralist.cli", "generate", prompt, "--data-dir", str(work), "--model", "tiny-sd15",
                "--seed", str(seed), "--width", str(n), "--height", str(n), "--steps", str(args.steps),
                "--sampler", "Euler a", "--quiet", "--out", str(work / "out")]
    bare_cmd = [sys.executable, str(bare_script)]
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    p_ours, p_bare = [], []
    for _ in range(args.process_runs):
        for cmd, acc in ((ours_cmd, p_ours), (bare_cmd, p_bare)):
            t = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True, env=env)
            acc.append(time.perf_counter() - t)
    po, pb = statistics.median(p_ours), statistics.median(p_bare)
    print(f"(b) whole process, {args.process_runs} interleaved runs")
    print(f"    muralist generate median {po:6.2f} s")
    print(f"    bare diffusers    median {pb:6.2f} s")
    print(f"    ratio {po / pb:.3f} (target <= 1.10)")


if __name__ == "__main__":
    main()
