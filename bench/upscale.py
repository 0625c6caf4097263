"""Upscaler benchmark: muralist's former hand-written networks against spandrel, on the same weights.

Builds small random weights for the four architectures muralist ran before it used spandrel, each
in its ORIGINAL key layout (old ESRGAN ``model.N``, Real-ESRGAN x4plus ``conv_first/body``,
SRVGGNetCompact ``body.N``, SwinIR), saves them as files and loads each file twice:

* "old": the hand-written implementation, imported from git history (``git show
  REV:muralist/upscale/upscalers.py`` into a temporary module; by default the newest commit whose
  version still has the hand-written networks);
* "new": the working tree's ``muralist.upscale.upscalers`` (spandrel).

It prints the largest absolute difference of the raw network outputs and of the upscaled tensors
(target <= 1e-6), and the throughput ratio spandrel/old (min time over interleaved repetitions,
target <= 1.05), untiled and tiled. On the CPU the time is the process's CPU time, so that other
load on a shared machine does not count; on a GPU it is wall time. Without git history (e.g. an
unpacked sdist) it only reports spandrel's times.

Usage: python bench/upscale.py [--reps 7] [--size 48] [--tile 32] [--threads 1] [--device cpu]
                               [--rev REV] [--only SwinIR]
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
FILE = "muralist/upscale/upscalers.py"
MARKER = "def build_model("  # only the hand-written version has it


# ---------------------------------------------------------------------------------------------
# Weights in the original layouts


def _shrink(sd: dict[str, torch.Tensor], gain: float) -> dict[str, torch.Tensor]:
    # Default inits make deep random nets saturate; smaller weights keep outputs inside [0, 1]
    # so the clamped comparison still measures something.
    return {k: (v * gain if k.endswith("weight") and v.ndim == 4 else v).clone() for k, v in sd.items()}


def old_esrgan(nf: int, nb: int) -> dict[str, torch.Tensor]:
    """The original ESRGAN layout (model.0, model.1.sub.N.RDBk.convJ.0, model.3, ...), 4x."""
    from spandrel.architectures.ESRGAN import ESRGAN

    return _shrink(ESRGAN(num_filters=nf, num_blocks=nb, scale=4).state_dict(), 0.5)


def to_x4plus(old: dict[str, torch.Tensor], nb: int) -> dict[str, torch.Tensor]:
    """The same 4x weights as Real-ESRGAN's RealESRGAN_x4plus.pth names them (basicsr layout)."""
    names = {"model.0": "conv_first", f"model.1.sub.{nb}": "conv_body", "model.3": "conv_up1",
             "model.6": "conv_up2", "model.8": "conv_hr", "model.10": "conv_last"}  # fmt: skip
    new = {}
    for key, v in old.items():
        name, param = key.rsplit(".", 1)
        if name in names:
            new[f"{names[name]}.{param}"] = v
        else:  # model.1.sub.I.RDBk.convJ.0
            _, _, _, i, rdb, conv, _ = name.split(".")
            new[f"body.{i}.rdb{rdb[3:]}.{conv}.{param}"] = v
    return new


def srvgg(nf: int, num_conv: int) -> dict[str, torch.Tensor]:
    from spandrel.architectures.Compact import Compact

    return _shrink(Compact(num_feat=nf, num_conv=num_conv, upscale=4).state_dict(), 0.5)


def swinir() -> dict[str, torch.Tensor]:
    """Lightweight SwinIR's shape (SwinIR-S: 60 channels, 4x6 blocks, window 8, pixelshuffledirect), 4x."""
    from spandrel.architectures.SwinIR import SwinIR

    net = SwinIR(img_size=64, embed_dim=60, depths=[6] * 4, num_heads=[6] * 4, window_size=8, upscale=4,
                 upsampler="pixelshuffledirect", mlp_ratio=2.0)  # fmt: skip
    return net.state_dict()  # includes attn_mask / relative_position_index, as SwinIR saves them


# ---------------------------------------------------------------------------------------------
# The implementation from git history


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)
    except OSError:
        return None
    return done.stdout if done.returncode == 0 else None


def handwritten_source(rev: str | None) -> tuple[str, str] | None:
    """(commit, source) of the hand-written upscalers.py, or None without git history."""
    revs = [rev] if rev else (_git("log", "--format=%H", "--", FILE) or "").split()
    for r in revs:
        src = _git("show", f"{r}:{FILE}")
        if src and MARKER in src:
            return r, src
    return None


def import_handwritten(source: str, tmp: Path) -> ModuleType:
    # A module inside muralist.upscale, so its relative imports resolve against the working tree.
    path = tmp / "upscalers_handwritten.py"
    path.write_text(source)
    name = "muralist.upscale._upscalers_handwritten"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------


def run_time(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds one call takes: CPU time of this process on the CPU (a shared machine's other load
    then does not count), wall time with synchronisation on a GPU."""
    if device.type != "cuda":
        t = time.process_time()
        fn()
        return time.process_time() - t
    torch.cuda.synchronize(device)
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize(device)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--size", type=int, default=48, help="input side in pixels")
    ap.add_argument("--tile", type=int, default=32, help="tile size for the tiled run (overlap 8)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rev", default=None, help="commit holding the hand-written networks")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (1: least noise on a shared machine)")
    ap.add_argument("--only", default="", help="run the architectures whose label contains this")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from muralist.upscale import upscalers as new

    found = handwritten_source(args.rev)
    cases = {
        "ESRGAN (old layout)": ("old-esrgan.pth", old_esrgan(32, 2)),
        "RRDBNet (x4plus layout)": ("RealESRGAN_x4plus.pth", None),
        "SRVGGNetCompact": ("realesr-general-x4v3.pth", srvgg(32, 8)),
        "SwinIR": ("SwinIR_x4.pth", swinir()),
    }
    cases["RRDBNet (x4plus layout)"] = (
        "RealESRGAN_x4plus.pth",
        to_x4plus(cases["ESRGAN (old layout)"][1], 2),
    )
    xd = torch.rand(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(1)).to(device)

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        old = import_handwritten(found[1], tmp) if found else None
        print(f"old: {'hand-written networks from ' + found[0][:10] if found else 'not found in git history'}; "
              f"new: spandrel; device {device}, input {args.size}x{args.size}, {args.reps} reps, "
              f"{torch.get_num_threads()} threads")  # fmt: skip
        print(
            f"{'architecture':26} {'raw diff':>9} {'out diff':>9} {'whole s':>8} {'ratio':>6} {'tiled s':>8} {'ratio':>6}"
        )
        for label, (fname, sd) in cases.items():
            if args.only.lower() not in label.lower():
                continue
            path = tmp / fname
            torch.save(sd, path)
            b = new.load_upscaler_model(path, device)
            a = old.load_upscaler_model(path, device) if old else None
            runs: dict[str, Callable[[Any], object]] = {
                "whole": lambda m: m.upscale_tensor(xd, tile=0),
                "tiled": lambda m: m.upscale_tensor(xd, tile=args.tile, tile_overlap=8),
            }
            times: dict[tuple[str, str], float] = {}
            for kind, run in runs.items():
                for m in (a, b):
                    if m is not None:
                        run(m)  # warm-up
                for _ in range(args.reps):  # interleaved, so drifts in machine load hit both
                    for tag, m in (("old", a), ("new", b)):
                        if m is not None:
                            t = run_time(lambda m=m, run=run: run(m), device)
                            times[tag, kind] = min(times.get((tag, kind), float("inf")), t)
            row = f"{label:26} "
            if a is not None:
                with torch.inference_mode():
                    raw = (a.module(xd) - b.descriptor.model(xd)).abs().max().item()
                out = (
                    (a.upscale_tensor(xd, tile=0).clamp(0, 1) - b.upscale_tensor(xd, tile=0))
                    .abs()
                    .max()
                    .item()
                )
                row += f"{raw:9.1e} {out:9.1e} "
                for kind in runs:
                    row += f"{times['new', kind]:8.4f} {times['new', kind] / times['old', kind]:6.3f} "
            else:
                row += f"{'-':>9} {'-':>9} " + " ".join(f"{times['new', k]:8.4f} {'-':>6}" for k in runs)
            print(row.rstrip())


if __name__ == "__main__":
    main()
