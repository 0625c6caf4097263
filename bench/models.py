"""Model-management benchmarks (issue 14): the checkpoint merger's memory and the download throughput.

``merge``: merges two checkpoints (weighted sum) in a fresh child process and reports the peak
resident memory the merge added over the process's baseline (Python + torch, measured just before
the merge, with the kernel's high-water mark reset through ``/proc/self/clear_refs``), against the
size of one input. Target: peak <= 1.2 x one model (A1111 holds all three inputs: >= 2 x).

* ``--size tiny`` (default): the tiny SD1 model of ``muralist.models.tiny`` (~20 MB fp32 files; the
  allocator's noise is a visible part of so small a number);
* ``--size full``: random weights in the real SD1.5 shapes (UNet 320/640/1280, CLIP ViT-L, VAE),
  ~1.07 G parameters, written key by key as fp16 (~2.1 GB per file, like a pruned SD1.5); needs
  ~7 GB of free disk in ``--workdir``.

Usage: python bench/models.py merge [--size tiny|full] [--half] [--format safetensors|ckpt] [--workdir DIR]
Linux only (reads /proc).

``download``: muralist's transfer (``muralist.models.download``: streaming GET into a ``.part``
file, sha256 computed on the way and checked, atomic move into the model folder) against ``curl``
(or, without curl, a plain ``urllib`` read into a file) fetching the same local file from the same
server. The server is ``python -m http.server`` in its own process, so it never competes with the
client for the GIL. ``--reps`` interleaved runs each; prints best and median MB/s, the CPU time
of each side, and the ratio muralist/curl best vs best, median vs median and run by run (target
>= 0.9). On a shared machine the spread between runs is wide: report min and median.

Usage: python bench/models.py download [--size-mb 200] [--reps 5] [--warmup 1]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TARGET = 1.2


def _status(field: str) -> int:
    """A /proc/self/status field in bytes (VmRSS: now; VmHWM: the peak since the last reset)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


# ---------------------------------------------------------------------------------------------- merge


def _sd15_shapes() -> dict[str, tuple[int, ...]]:
    """A1111 key -> shape of an SD1.5 checkpoint, from the diffusers classes built on the meta device."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from muralist.models.family import Family
    from muralist.models.loader import export_a1111

    with torch.device("meta"):
        comps = {
            "unet": UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8, sample_size=64),
            "vae": AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                                 up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4),
            "text_encoder": CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                                         num_attention_heads=12, hidden_act="quick_gelu")),
        }
    return {k: tuple(v.shape) for k, v in export_a1111(comps, Family.SD1).items()}


def _write_random(path: Path, shapes: dict[str, tuple[int, ...]], seed: int) -> None:
    """Random fp16 weights written key by key (never a whole model in memory), with the merger's writer."""
    import torch

    from muralist.models.merge import _SafetensorsWriter

    gen = torch.Generator().manual_seed(seed)
    plan = [(k, torch.float16, s) for k, s in shapes.items()]
    writer = _SafetensorsWriter(path, plan, {})
    for k, s in shapes.items():
        writer.write(k, torch.randn(s, generator=gen, dtype=torch.float32).mul_(0.02).half())
    writer.close()


def make_inputs(size: str, folder: Path) -> tuple[Path, Path]:
    from muralist.models.family import Family
    from muralist.models.tiny import save, tiny_checkpoint

    a, b = folder / "a.safetensors", folder / "b.safetensors"
    if size == "tiny":
        save(tiny_checkpoint(Family.SD1, seed=0), a)
        save(tiny_checkpoint(Family.SD1, seed=7), b)
    else:
        shapes = _sd15_shapes()
        _write_random(a, shapes, 0)
        _write_random(b, shapes, 1)
    return a, b


def merge_child(a: Path, b: Path, out: Path, half: bool, save_as: str) -> dict[str, float]:
    """Run in a fresh process: one merge, with its memory and time."""
    from muralist.models.merge import MergeOptions, Source, merge_checkpoints

    src_a, src_b = Source.from_file(a), Source.from_file(b)  # hashing reads files, not into memory
    baseline = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    t0 = time.perf_counter()
    result = merge_checkpoints(src_a, src_b, None, out, "merged", MergeOptions(multiplier=0.5, save_as_half=half), save_as)
    seconds = time.perf_counter() - t0
    peak = _status("VmHWM")
    return {"baseline": baseline, "peak": peak, "seconds": seconds, "keys": result.keys,
            "output_bytes": result.path.stat().st_size}


def cmd_merge(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="muralist-bench-merge-") as tmp:
        folder = Path(tmp)
        t0 = time.perf_counter()
        a, b = make_inputs(args.size, folder)
        print(f"inputs ({args.size}): {a.stat().st_size / 2**20:.1f} MiB each, written in {time.perf_counter() - t0:.1f} s")
        child = [sys.executable, __file__, "_merge-child", str(a), str(b), str(folder / "out"), args.format]
        if args.half:
            child.append("--half")
        r = json.loads(subprocess.run(child, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
        one = a.stat().st_size
        added = r["peak"] - r["baseline"]
        ratio = added / one
        mib = 2**20
        print(f"merge (weighted sum, {r['keys']} keys, -> {args.format}{', fp16' if args.half else ''}): "
              f"{r['seconds']:.2f} s, output {r['output_bytes'] / mib:.1f} MiB")
        print(f"process RSS before the merge: {r['baseline'] / mib:.1f} MiB; peak during it: {r['peak'] / mib:.1f} MiB")
        print(f"peak added by the merge: {added / mib:.1f} MiB = {ratio:.3f} x one input "
              f"({one / mib:.1f} MiB); sum of the inputs: {2 * one / mib:.1f} MiB; "
              f"target <= {TARGET} x one input: {'met' if ratio <= TARGET else 'NOT met'}")
    return 0


# ---------------------------------------------------------------------------------------------- main


# ------------------------------------------------------------------------------------------ download


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(port: int) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError("the file server did not start")


def _curl(url: str, out: Path) -> None:
    if shutil.which("curl"):
        subprocess.run(["curl", "-sSf", "-o", str(out), url], check=True)
    else:  # no curl: the plainest Python read
        with urllib.request.urlopen(url) as r, open(out, "wb") as f:
            shutil.copyfileobj(r, f, 1 << 20)


def bench_download(size_mb: int, reps: int, warmup: int = 1) -> float:
    from muralist.models.download import DownloadSettings, download
    from muralist.paths import DataDirs

    with tempfile.TemporaryDirectory(prefix="muralist-bench-") as tmp:
        serve_dir, root = Path(tmp) / "serve", Path(tmp) / "data"
        serve_dir.mkdir()
        src = serve_dir / "model.safetensors"
        h = hashlib.sha256()
        with open(src, "wb") as f:  # incompressible bytes, written in blocks (no 200 MB in memory)
            for _ in range(size_mb):
                block = os.urandom(1 << 20)
                h.update(block)
                f.write(block)
        sha, size = h.hexdigest(), src.stat().st_size
        port = _free_port()
        server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                                   "--directory", str(serve_dir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            _wait(port)
            url = f"http://127.0.0.1:{port}/model.safetensors"
            dirs, settings = DataDirs.from_options(root), DownloadSettings(max_bytes=None)
            tool = "curl" if shutil.which("curl") else "urllib"
            verified = f"{tool}+sha256sum" if shutil.which("sha256sum") else None
            times: dict[str, list[float]] = {tool: [], "muralist": [], **({verified: []} if verified else {})}
            cpu: dict[str, list[float]] = {tool: [], "muralist": []}
            for i in range(-warmup, reps):  # i < 0: untimed warm-up of both sides (imports, first page faults)
                out = Path(tmp) / "curl.out"
                c0, t0 = _cpu(resource.RUSAGE_CHILDREN), time.perf_counter()
                _curl(url, out)
                times[tool].append(time.perf_counter() - t0)
                cpu[tool].append(_cpu(resource.RUSAGE_CHILDREN) - c0)
                assert out.stat().st_size == size
                if verified:  # what curl needs to give the same guarantee: a second pass over the file
                    subprocess.run(["sha256sum", str(out)], check=True, stdout=subprocess.DEVNULL)
                    times[verified].append(time.perf_counter() - t0)
                out.unlink()
                # RUSAGE_SELF: this process with the download's threads (the server is another process).
                c0, t0 = _cpu(resource.RUSAGE_SELF), time.perf_counter()
                result = download({"source": "url", "url": url, "sha256": sha, "name": f"bench{i}.safetensors"},
                                  dirs, settings)
                times["muralist"].append(time.perf_counter() - t0)
                cpu["muralist"].append(_cpu(resource.RUSAGE_SELF) - c0)
                if i < 0:
                    for v in (*times.values(), *cpu.values()):
                        v.pop()
                assert result["sha256"] == sha and result["size"] == size
                (root / result["path"]).unlink()
        finally:
            server.terminate()
            server.wait()
    for k, t in times.items():
        cpu_note = f", CPU {statistics.median(cpu[k]):.3f} s median" if k in cpu else ""
        print(f"{k:>9}: best {size / min(t) / 1e6:7.1f} MB/s, median {size / statistics.median(t) / 1e6:7.1f} MB/s "
              f"({reps} runs of {size / 1e6:.0f} MB after {warmup} untimed{cpu_note})")
    best = min(times[tool]) / min(times["muralist"])
    median = statistics.median(times[tool]) / statistics.median(times["muralist"])
    pairs = sorted(c / m for c, m in zip(times[tool], times["muralist"], strict=True))
    print(f"throughput muralist/{tool}: {best:.2f}x best vs best, {median:.2f}x median vs median; run by run "
          f"min {pairs[0]:.2f}x, median {statistics.median(pairs):.2f}x (target >= 0.9; muralist also computes and "
          f"checks the sha256)")
    if verified:
        print(f"throughput muralist/({verified}): {min(times[verified]) / min(times['muralist']):.2f}x best vs best "
              f"(both verified)")
    print(f"cpus: {os.cpu_count()} (the server process, the receiver and the sha256 each want one; "
          f"load average {os.getloadavg()[0]:.2f} at the end)")
    return best


def _cpu(who: int) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


# ---------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_merge-child":
        a, b, out, save_as = argv[1:5]
        print(json.dumps(merge_child(Path(a), Path(b), Path(out), "--half" in argv, save_as)))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("merge", help="peak memory of a checkpoint merge vs one input's size")
    m.add_argument("--size", choices=("tiny", "full"), default="tiny")
    m.add_argument("--half", action="store_true", help="save as fp16")
    m.add_argument("--format", choices=("safetensors", "ckpt"), default="safetensors")
    m.add_argument("--workdir", default=None, help="where the inputs and the output are written (default: the temp dir)")
    m.set_defaults(run=cmd_merge)
    d = sub.add_parser("download", help="download throughput vs curl on a local file")
    d.add_argument("--size-mb", type=int, default=200)
    d.add_argument("--reps", type=int, default=5)
    d.add_argument("--warmup", type=int, default=1, help="untimed runs of each side first")
    d.set_defaults(run=lambda a: (bench_download(a.size_mb, a.reps, a.warmup), 0)[1])
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
