"""Serving benchmark (issue 4), against a real server on a free port with the tiny models.

(a) Two users alternating two models, 20 jobs, vs the same 20 jobs on one model (target <= 1.10:
    the model cache keeps both loaded, so alternating costs no reloads).
(b) /sdapi/v1/progress latency p50/p99 with 10 pollers while a job generates (target p99 < 50 ms).
(c) Per-job overhead of the HTTP + queue path vs calling the engine directly, 1-step 64x64 jobs.

Usage: python bench/serving.py [--jobs 20] [--steps 8]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.server_util import running_server, wait_job  # noqa: E402


def run_jobs(url: str, keys: dict[str, str], plan: list[tuple[str, str]], params: dict) -> float:
    clients = {n: httpx.Client(base_url=url, headers={"Authorization": f"Bearer {k}"}, timeout=300) for n, k in keys.items()}
    t = time.perf_counter()
    ids = [(user, clients[user].post("/api/v1/jobs", json={"params": {**params, "model": model}}).json()["id"]) for user, model in plan]
    for user, job_id in ids:
        assert wait_job(clients[user], job_id, timeout=600)["status"] == "succeeded"
    return time.perf_counter() - t


def wait_events(c: httpx.Client, job_id: str) -> None:
    with c.stream("GET", f"/api/v1/jobs/{job_id}/events") as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and '"status": "succeeded"' in line or line in ("event: finished", "event: failed"):
                return


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=20)
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args()

    from muralist.models.tiny import make_tiny_models

    root = Path(tempfile.mkdtemp(prefix="muralist-bench-"))
    make_tiny_models(root / "models" / "Stable-diffusion", root / "models" / "VAE")
    params = {"width": 128, "height": 128, "steps": args.steps, "seed": 1, "prompt": "a lighthouse"}
    m1, m2 = "tiny-sd15.safetensors", "tiny-sd15-b.ckpt"
    with running_server(root, max_loaded_models=2) as (url, service):
        keys = {n: service.store.add_user(n) for n in ("alice", "bob")}
        warm = [("alice", m1), ("bob", m2)]
        run_jobs(url, keys, warm, params)
        alternating = [("alice" if i % 2 == 0 else "bob", m1 if i % 2 == 0 else m2) for i in range(args.jobs)]
        one_model = [("alice" if i % 2 == 0 else "bob", m1) for i in range(args.jobs)]
        t_alt, t_one = [], []
        for _ in range(2):  # interleaved
            t_alt.append(run_jobs(url, keys, alternating, params))
            t_one.append(run_jobs(url, keys, one_model, params))
        a, o = min(t_alt), min(t_one)
        print(f"(a) {args.jobs} jobs, two users alternating two models: {a:.2f} s; same jobs on one model: {o:.2f} s; "
              f"ratio {a / o:.3f} (target <= 1.10)")

        # (b) progress latency under 10 pollers while generating.
        c = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {keys['alice']}"}, timeout=60)
        job_id = c.post("/api/v1/jobs", json={"params": {**params, "steps": 150, "width": 256, "height": 256, "model": m1}}).json()["id"]
        while c.get(f"/api/v1/jobs/{job_id}").json()["status"] != "running":
            time.sleep(0.01)
        latencies: list[float] = []
        lock = threading.Lock()

        def poll() -> None:
            pc = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {keys['bob']}"}, timeout=60)
            for _ in range(50):
                t = time.perf_counter()
                pc.get("/sdapi/v1/progress")
                with lock:
                    latencies.append(time.perf_counter() - t)

        ts = [threading.Thread(target=poll) for _ in range(10)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        c.post(f"/api/v1/jobs/{job_id}/cancel")
        lat = sorted(latencies)
        p50, p99 = lat[len(lat) // 2], lat[int(len(lat) * 0.99) - 1]
        print(f"(b) /sdapi/v1/progress with 10 pollers during generation: p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms "
              f"over {len(lat)} requests (target p99 < 50 ms)")

        # (c) overhead of HTTP + queue vs the engine called directly.
        from muralist.request import GenerationRequest

        tiny = {"width": 64, "height": 64, "steps": 1, "seed": 3, "prompt": "x", "model": m1}
        wait_job(c, job_id)
        direct, queued = [], []
        for i in range(10):
            t = time.perf_counter()
            service.engine.generate(GenerationRequest(**{**tiny, "seed": i}), save_to=root / "direct")
            direct.append(time.perf_counter() - t)
            t = time.perf_counter()
            jid = c.post("/api/v1/jobs", json={"params": {**tiny, "seed": i}}).json()["id"]
            wait_events(c, jid)  # pushed events: no client polling in the measurement
            queued.append(time.perf_counter() - t)
        d, q = statistics.median(direct), statistics.median(queued)
        print(f"(c) 1-step 64x64 job: engine direct {d * 1000:.1f} ms, via HTTP + queue {q * 1000:.1f} ms: "
              f"overhead {1000 * (q - d):.1f} ms per job (ratio {q / d:.2f})")


if __name__ == "__main__":
    main()
