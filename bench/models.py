"""Model-management benchmarks.

``download``: muralist's transfer (``muralist.models.download``: streaming GET into a ``.part``
file, sha256 computed on the way and checked, atomic move into the model folder) against ``curl``
(or, without curl, a plain ``urllib`` read into a file) fetching the same local file from the same
server. The server is ``python -m http.server`` in its own process, so it never competes with the
client for the GIL. Best of ``--reps`` interleaved runs each; prints MB/s and the ratio
muralist/curl (target >= 0.9).

Usage: python bench/models.py download [--size-mb 200] [--reps 3]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


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


def bench_download(size_mb: int, reps: int) -> float:
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
            for i in range(reps):
                out = Path(tmp) / "curl.out"
                t0 = time.perf_counter()
                _curl(url, out)
                times[tool].append(time.perf_counter() - t0)
                assert out.stat().st_size == size
                if verified:  # what curl needs to give the same guarantee: a second pass over the file
                    subprocess.run(["sha256sum", str(out)], check=True, stdout=subprocess.DEVNULL)
                    times[verified].append(time.perf_counter() - t0)
                out.unlink()
                t0 = time.perf_counter()
                result = download({"source": "url", "url": url, "sha256": sha, "name": f"bench{i}.safetensors"},
                                  dirs, settings)
                times["muralist"].append(time.perf_counter() - t0)
                assert result["sha256"] == sha and result["size"] == size
                (root / result["path"]).unlink()
        finally:
            server.terminate()
            server.wait()
    best = {k: min(v) for k, v in times.items()}
    for k, t in best.items():
        print(f"{k:>9}: {size / t / 1e6:8.1f} MB/s (best of {reps}: {t:.3f} s for {size / 1e6:.0f} MB)")
    ratio = best[tool] / best["muralist"]
    print(f"throughput muralist/{tool}: {ratio:.2f}x (target >= 0.9; muralist also computes and checks the sha256)")
    if verified:
        print(f"throughput muralist/({verified}): {best[verified] / best['muralist']:.2f}x (both verified)")
    print(f"cpus: {os.cpu_count()} (the server process, the receiver and the sha256 each want one)")
    return ratio


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    d = sub.add_parser("download", help="download throughput vs curl on a local file")
    d.add_argument("--size-mb", type=int, default=200)
    d.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    if args.command == "download":
        bench_download(args.size_mb, args.reps)


if __name__ == "__main__":
    main()
