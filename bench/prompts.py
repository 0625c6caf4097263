"""Prompt-conditioning and LoRA-switch benchmark (issue 3).

(a) Conditioning time of a ~300-token prompt with prompt editing, with two LoRAs applied (their
    text-encoder parts change the conditioning), as a fraction of a 20-step generation on the
    same tiny SD1.5 model (target < 5%).
(b) LoRA switch cost between jobs: merging two LoRAs into the loaded model and restoring it,
    compared with the same 20-step generation.

Usage: python bench/prompts.py [--runs 5] [--size 256]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file


def make_full_lora(model, path: Path, seed: int, rank: int = 8) -> None:
    """A kohya LoRA touching every attention projection of the UNet and the text encoder."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    te = model.text_encoders["text_encoder"]
    targets = [("lora_unet_", n, m) for n, m in model.unet.named_modules() if isinstance(m, torch.nn.Linear) and ".attn" in n]
    targets += [("lora_te_text_model_", n, m) for n, m in te.named_modules() if n.endswith(("q_proj", "k_proj", "v_proj", "out_proj"))]
    for prefix, name, mod in targets:
        key = prefix + name.replace(".", "_")
        tensors[f"{key}.lora_down.weight"] = torch.randn(rank, mod.in_features, generator=g) * 0.1
        tensors[f"{key}.lora_up.weight"] = torch.randn(mod.out_features, rank, generator=g) * 0.1
        tensors[f"{key}.alpha"] = torch.tensor(rank / 2)
    save_file(tensors, str(path))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--size", type=int, default=256)
    args = ap.parse_args()

    from muralist.engine.conditioning import PromptEncoder, job_conditioning, token_count
    from muralist.engine.engine import Engine, ModelCache
    from muralist.networks.lora import applied_loras
    from muralist.paths import DataDirs
    from muralist.request import GenerationRequest

    root = Path(tempfile.mkdtemp(prefix="muralist-bench-"))
    dirs = DataDirs.from_options(root)
    from muralist.models.tiny import make_tiny_models

    make_tiny_models(dirs.ckpt_dir, dirs.vae_dir)
    eng = Engine(dirs, cache=ModelCache(device="cpu"))
    model = eng.cache.model(eng.registry.find_checkpoint("tiny-sd15.safetensors"))
    dirs.lora_dir.mkdir(parents=True, exist_ok=True)
    make_full_lora(model, dirs.lora_dir / "style-a.safetensors", 1)
    make_full_lora(model, dirs.lora_dir / "style-b.safetensors", 2)
    eng.loras.refresh()
    a, b = eng.loras.find("style-a"), eng.loras.find("style-b")

    phrases = [f"detailed {w} texture" for w in ("stone", "wood", "glass", "silk", "copper", "marble", "moss", "ice")]
    prompt = ", ".join(phrases * 9) + ", a [castle:ruin:0.5] on a (hill:1.2)"
    used, limit = token_count(prompt, 20)
    loras = [(a, 0.8, 0.8), (b, 0.5, 0.5)]

    def conditioning() -> tuple[float, float]:
        """(encoding time, LoRA merge + restore time) of one job's prompts."""
        t = time.perf_counter()
        with model.lock, applied_loras(model, loras):
            t_in = time.perf_counter()
            job_conditioning(PromptEncoder(model), prompt, "blurry, low quality", 20)
            t_out = time.perf_counter()
        return t_out - t_in, time.perf_counter() - t - (t_out - t_in)

    req = GenerationRequest(prompt="a castle on a hill", steps=20, width=args.size, height=args.size, seed=1, model="tiny-sd15.safetensors")
    out = root / "out"

    def generation() -> float:
        t = time.perf_counter()
        eng.generate(req, save_to=out)
        return time.perf_counter() - t

    conditioning(), generation()  # warm-up
    cond_t, switch_t, gen_t = [], [], []
    for _ in range(args.runs):
        c, s = conditioning()
        cond_t.append(c)
        switch_t.append(s)
        gen_t.append(generation())
    c, s, g = (statistics.median(x) for x in (cond_t, switch_t, gen_t))
    print(f"prompt: {used}/{limit} tokens with prompt editing; 2 LoRAs on every attention projection")
    print(f"(a) conditioning {c * 1000:7.1f} ms vs 20-step {args.size}x{args.size} generation {g * 1000:7.1f} ms: {100 * c / g:.2f}% (target < 5%)")
    print(f"(b) LoRA switch (merge 2 LoRAs + restore) {s * 1000:7.1f} ms: {100 * s / g:.2f}% of the generation")


if __name__ == "__main__":
    main()
