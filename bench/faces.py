"""Face networks: spandrel's (muralist.upscale.faces) against muralist's former hand-written ones.

The former implementation is read from git history (``git show <rev>:muralist/upscale/faces.py``,
default HEAD) when it is there. Both get the same random weights in the released key layouts;
the script prints the largest absolute difference of their outputs (images in [-1, 1]) and the
throughput ratio spandrel / former (min time of ``--runs`` runs each; above 1: spandrel faster).

Configurations: tiny GFPGAN (64x64, and its layout variants) and tiny CodeFormer (16x16 faces); with
``--full`` also the released GFPGANv1.4 size and CodeFormer's released VQGAN with a one-layer
transformer at 512x512 (fidelity 0.5 only; seconds per run on a CPU).

Usage: python bench/faces.py [--runs 3] [--full] [--rev HEAD] [--threads N] [--only LABEL]
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from muralist.upscale import faces

ROOT = Path(__file__).resolve().parents[1]


def former(rev: str) -> ModuleType | None:
    """The former faces module from git history, imported inside the muralist package."""
    try:
        src = subprocess.run(
            ["git", "show", f"{rev}:muralist/upscale/faces.py"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    if "class GFPGANv1Clean" not in src or "class CodeFormer" not in src:
        return None  # history already holds the spandrel version
    path = Path(tempfile.mkdtemp()) / "faces_former.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("muralist.upscale._faces_former", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its relative imports resolve against muralist.upscale
    spec.loader.exec_module(module)
    return module


def randomize(model: torch.nn.Module, scale: float, seed: int = 0) -> dict[str, torch.Tensor]:
    """Non-trivial random weights (noise maps and codebooks included), as a state dict."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if t.is_floating_point():
                t.add_(torch.randn(t.shape, generator=g) * scale)
    return {k: v.clone() for k, v in model.state_dict().items()}


def best(fns: list[Callable[[], Any]], runs: int) -> list[float]:
    """Min time of each function over ``runs`` rounds, interleaved so that load on a shared
    machine hits both alike."""
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(runs):
        for fn, ts in zip(fns, times, strict=True):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
    return [min(ts) for ts in times]


def compare(
    label: str, old_fn: Callable[[], torch.Tensor] | None, new_fn: Callable[[], torch.Tensor], runs: int
) -> None:
    with torch.inference_mode():
        new = new_fn()
        if old_fn is None:
            print(f"{label:48s} spandrel only: {best([new_fn], runs)[0] * 1000:8.1f} ms")
            return
        old = old_fn()
        if not (torch.isfinite(old).all() and torch.isfinite(new).all()):
            print(f"{label:48s} non-finite outputs (random weights too large): no comparison")
            return
        diff = (old - new).abs().max().item()
        t_old, t_new = best([old_fn, new_fn], runs)
    print(
        f"{label:48s} max|diff| {diff:.3g}   former {t_old * 1000:8.1f} ms   spandrel {t_new * 1000:8.1f} ms"
        f"   throughput spandrel/former {t_old / t_new:.2f}"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--full", action="store_true", help="also the released sizes (slow on a CPU)")
    ap.add_argument("--rev", default="HEAD", help="git revision holding the former implementation")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--only", default="", help="run only the configurations whose label contains this")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    old = former(args.rev)
    print(f"former implementation: {'git ' + args.rev if old else 'not available (spandrel timings only)'}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU\n")

    # GFPGAN: every layout variant the former from_state_dict inferred.
    tiny = dict(out_size=64, num_style_feat=16, channel_multiplier=1, num_mlp=2, narrow=1 / 32)
    gfp_cases = [("GFPGAN tiny 64px", tiny)]
    gfp_cases += [(f"GFPGAN tiny {k}={v}", tiny | {k: v}) for k, v in
                  (("sft_half", False), ("different_w", False), ("channel_multiplier", 2))]  # fmt: skip
    if args.full:
        gfp_cases.append(("GFPGAN released size (v1.4 layout)", {}))
    for label, sizes in gfp_cases:
        if args.only not in label:
            continue
        sd = randomize(faces.gfpgan_net(**sizes), 0.1 if sizes else 0.02)
        new = faces.build_face_model(sd)
        x = torch.rand(1, 3, new.size, new.size) * 2 - 1
        old_fn = None
        if old is not None:
            old_net = old.build_face_model(sd)
            old_fn = lambda n=old_net, x=x: n(x, return_rgb=False)[0]  # noqa: E731 - stored noise, as before
        compare(label, old_fn, lambda n=new, x=x: n(x), args.runs)

    # CodeFormer: tiny VQGAN (muralist's sized build of spandrel's blocks), and spandrel's own class.
    cf_tiny = dict(
        img_size=16, nf=32, ch_mult=(1, 1, 2), res_blocks=1, attn_resolutions=(4,), codebook_size=16,
        emb_dim=32, dim_embd=32, n_layers=1, connect_list=("8", "16"),
    )  # fmt: skip
    cf_cases = [("CodeFormer tiny 16px", cf_tiny)]
    if args.full:
        cf_cases.append(("CodeFormer released VQGAN, 1-layer transformer", dict(dim_embd=64, n_layers=1)))
    for label, sizes in cf_cases:
        if args.only not in label:
            continue
        # Full-size nets get smaller noise on top of PyTorch's init, or activations overflow.
        sd = randomize(faces.codeformer_net(**sizes), 0.05 if sizes is cf_tiny else 0.002)
        new = faces.build_face_model(sd)
        x = torch.rand(1, 3, new.size, new.size) * 2 - 1
        for w in (0.0, 0.5, 1.0) if sizes is cf_tiny else (0.5,):
            old_fn = None
            if old is not None:
                old_net = old.build_face_model(sd)
                old_fn = lambda n=old_net, w=w, x=x: n(x, w=w, adain=True)  # noqa: E731
            compare(f"{label}, w={w}", old_fn, lambda n=new, w=w, x=x: n(x, w), args.runs)


if __name__ == "__main__":
    main()
