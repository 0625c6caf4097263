"""ControlNet cost benchmark (issue 11), on the tiny SD1.5 model and a tiny ControlNet in the original layout.

(a) One ControlNet unit's cost relative to plain txt2img, through muralist's engine (same size,
    steps, sampler and seed), runs interleaved.
(b) The same unit through muralist against a bare diffusers StableDiffusionControlNetPipeline call
    with the same weights, sampler, seed and control image; prints the ratio of medians (target
    <= 1.05) and the largest pixel difference between the two images.

Usage: python bench/controlnet.py [--runs 7] [--size 128] [--steps 20]
"""

from __future__ import annotations

import argparse
import base64
import io
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()

    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionControlNetPipeline

    from muralist.engine.engine import Engine, ModelCache
    from muralist.engine.samplers import BASE_SCHEDULER_CONFIG
    from muralist.models.tiny import make_tiny_models
    from muralist.paths import DataDirs
    from muralist.request import GenerationRequest

    work = Path(tempfile.mkdtemp(prefix="muralist-bench-cn-"))
    dirs = DataDirs.from_options(work)
    make_tiny_models(dirs.ckpt_dir, dirs.vae_dir, dirs.controlnet_dir)
    engine = Engine(dirs, cache=ModelCache(max_models=1, device="cpu"))
    n, seed, prompt = args.size, 1234, "a lighthouse on a cliff, stormy sea"
    control = Image.new("RGB", (n, n), "black")
    ImageDraw.Draw(control).ellipse((n // 6, n // 6, n * 5 // 6, n * 5 // 6), fill="white")
    buf = io.BytesIO()
    control.save(buf, format="PNG")
    unit = {"enabled": True, "module": "none", "model": "tiny-control-sd15", "image": base64.b64encode(buf.getvalue()).decode(),
            "resize_mode": "Just Resize"}
    base = dict(prompt=prompt, seed=seed, width=n, height=n, steps=args.steps, sampler_name="Euler a", cfg_scale=7,
                model="tiny-sd15.safetensors")
    plain_req, cn_req = GenerationRequest(**base), GenerationRequest(**base, controlnet=[unit])
    out = work / "out"

    def plain():
        return engine.generate(plain_req, save_to=out, detected_maps=False).result.images[0]

    def ours():
        return engine.generate(cn_req, save_to=out, detected_maps=False).result.images[0]

    # The very modules muralist loaded: the same weights for the bare pipeline.
    model = engine.cache.model(engine.registry.find_checkpoint("tiny-sd15"))
    info = engine.controlnets.find("tiny-control-sd15")

    def scheduler():
        return EulerAncestralDiscreteScheduler.from_config(dict(BASE_SCHEDULER_CONFIG, timestep_spacing="linspace"))

    ours()  # loads the ControlNet into the cache
    cn = engine.cache.manager.get("controlnet", (str(info.path), info.hash, "SD1"), lambda: None, 0)
    pipe = StableDiffusionControlNetPipeline(
        vae=model.vae, text_encoder=model.text_encoders["text_encoder"], tokenizer=model.tokenizers["text_encoder"],
        unet=model.unet, controlnet=cn, scheduler=scheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)

    def bare():
        pipe.scheduler = scheduler()
        g = torch.Generator("cpu").manual_seed(seed)
        return pipe(prompt, image=control, height=n, width=n, num_inference_steps=args.steps, guidance_scale=7.0,
                    generator=g, controlnet_conditioning_scale=1.0).images[0]

    plain(), bare()  # warm-up

    def timed(fn, acc: list[float]):
        t = time.perf_counter()
        r = fn()
        acc.append(time.perf_counter() - t)
        return r

    t_plain, t_ours, t_bare = [], [], []
    for _ in range(args.runs):
        timed(plain, t_plain)
        a = timed(ours, t_ours)
        b = timed(bare, t_bare)
    diff = np.abs(np.asarray(a).astype(int) - np.asarray(b).astype(int)).max()
    mp, mo, mb = (statistics.median(x) for x in (t_plain, t_ours, t_bare))
    print(f"{n}x{n}, {args.steps} steps Euler a, {args.runs} interleaved runs, tiny SD1.5 + tiny ControlNet (LDM layout)")
    print(f"(a) plain txt2img       median {mp * 1000:8.1f} ms")
    print(f"    with one unit       median {mo * 1000:8.1f} ms   cost of the unit: x{mo / mp:.3f}")
    print(f"(b) bare diffusers ControlNet pipeline median {mb * 1000:8.1f} ms")
    print(f"    ratio muralist / diffusers {mo / mb:.3f} (target <= 1.05); max pixel difference {diff}/255")


if __name__ == "__main__":
    main()
