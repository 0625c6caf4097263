"""Scale-out benchmark (issue 9): the dispatcher driving Ray worker actors vs in-process workers.

A Ray cluster on this machine (``ray.cluster_utils.Cluster``: head + 3 worker nodes, loopback
only), one muralist worker actor per node on the tiny models, the API's service in this process.

(d) throughput with 1, 2 and 3 workers (jobs/s; this box has 2 CPU cores, so workers compete for
    them: the numbers show the dispatch path scales, not what 3 GPUs would do).
(a) per-job overhead of the cluster path vs the embedded one, 1-step 64x64 jobs, submit to the
    finished event, interleaved (target: <= 5 ms more).
(b) checkpoint loads for 30 jobs over 3 checkpoints on 3 workers (1 model slot each): model
    affinity vs round-robin (lookahead 1).
(c) recovery: SIGKILL of the worker process running a job -> the job running again on another
    worker (target <= 5 s), and -> its first step there.

Usage: python bench/cluster.py [--jobs 20]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback only
os.environ.setdefault("RAY_TMPDIR", f"/tmp/mrl-bench-{os.getpid()}")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from muralist.paths import DataDirs  # noqa: E402
from muralist.service.core import Service, Settings  # noqa: E402
from muralist.service.store import open_store  # noqa: E402

MODELS = ("tiny-sd15.safetensors", "tiny-sd15-b.ckpt", "tiny-sd15-c.safetensors")
TINY = {"prompt": "a lighthouse", "width": 64, "height": 64, "steps": 1}


class Api:
    """A service in this process; ``wait(job)`` blocks until the job's final event."""

    def __init__(self, root: Path, models: Path, **settings) -> None:
        dirs = DataDirs.from_options(root, ckpt_dir=models)
        dirs.ensure()
        self.store = open_store(None, root)
        self.service = Service(dirs, self.store, Settings(device="cpu", **settings))
        self._done: dict[str, threading.Event] = {}
        self._started: dict[str, list[tuple[float, str]]] = {}
        publish = self.service.publish

        def hook(event: dict, relay: bool = True) -> None:
            publish(event, relay)
            if event["type"] == "started":
                self._started.setdefault(event["job_id"], []).append((time.perf_counter(), event.get("worker")))
            if event["type"] in ("finished", "failed", "canceled"):
                self._done.setdefault(event["job_id"], threading.Event()).set()

        self.service.publish = hook  # type: ignore[method-assign]
        self.service.start()
        self.user = self.store.ensure_user("bench")

    def workers(self, n: int) -> None:
        deadline = time.monotonic() + 180
        while sum(w["state"] == "idle" for w in self.service.workers()) < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{n} idle workers")
            time.sleep(0.05)

    def submit(self, **params) -> str:
        job = self.service.submit(self.user, "txt2img", {**TINY, **params})
        self._done.setdefault(job.id, threading.Event())
        return job.id

    def wait(self, job_id: str) -> None:
        assert self._done[job_id].wait(600), job_id
        status = self.store.get(job_id).status.value
        assert status == "succeeded", (status, self.store.get(job_id).error)

    def timed(self, **params) -> float:
        t = time.perf_counter()
        self.wait(self.submit(**params))
        return time.perf_counter() - t

    def close(self) -> None:
        self.service.stop(0)
        self.store.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=20)
    args = ap.parse_args()

    import ray
    from ray.cluster_utils import Cluster

    from muralist.models.family import Family
    from muralist.models.tiny import make_tiny_models, save, tiny_checkpoint
    from muralist.workers.ray_cluster import NAMESPACE, start_workers

    tmp = Path(tempfile.mkdtemp(prefix="muralist-bench-"))
    models = tmp / "models" / "Stable-diffusion"
    make_tiny_models(models, tmp / "models" / "VAE")
    save(tiny_checkpoint(Family.SD1, seed=5), models / MODELS[2])  # a third SD1 checkpoint (another file)
    for p in models.iterdir():
        if p.name not in MODELS:
            p.unlink()
    t0 = time.perf_counter()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(3)]
    ray.init(address=cluster.address, namespace=NAMESPACE, log_to_driver=False)
    print(f"cluster of 3 worker nodes started in {time.perf_counter() - t0:.1f} s")
    try:
        # (d) throughput with 1, 2, 3 workers.
        for n in (1, 2, 3):
            start_workers(["cpu"], f"node{n - 1}", str(tmp), node_id=nodes[n - 1].node_id, max_loaded_models=1)
            api = Api(tmp / f"api-d{n}", models, workers=0, cluster=cluster.address)
            api.workers(n)
            for job in [api.submit(model=MODELS[0]) for _ in range(n)]:  # warm every worker
                api.wait(job)
            t = time.perf_counter()
            jobs = [api.submit(model=MODELS[0], steps=8, seed=i) for i in range(12)]
            for job in jobs:
                api.wait(job)
            took = time.perf_counter() - t
            print(f"(d) {n} worker(s): 12 jobs (8 steps, 64x64) in {took:.2f} s = {12 / took:.2f} jobs/s "
                  "(2 CPU cores shared by all workers)")
            api.close()

        # (a) per-job overhead, interleaved.
        embedded = Api(tmp / "api-embedded", models, workers=1)
        clustered = Api(tmp / "api-a", models, workers=0, cluster=cluster.address)
        embedded.workers(1)
        clustered.workers(3)
        for api in (embedded, clustered):
            for _ in range(3):
                api.timed(model=MODELS[0])
        t_emb, t_clu = [], []
        for i in range(args.jobs):
            t_emb.append(embedded.timed(model=MODELS[0], seed=i))
            t_clu.append(clustered.timed(model=MODELS[0], seed=i))
        e, c = statistics.median(t_emb), statistics.median(t_clu)
        print(f"(a) 1-step 64x64 job, submit to finished: embedded {e * 1000:.1f} ms, Ray cluster {c * 1000:.1f} ms: "
              f"{(c - e) * 1000:+.1f} ms per job (target <= +5 ms)")
        embedded.close()

        # (b) affinity vs round-robin.
        def loads(api: Api) -> int:
            return sum(w["loads"] for w in api.service.workers())

        rng = random.Random(3)
        plan = [rng.choice(MODELS) for _ in range(30)]
        results = {}
        for label in ("affinity", "round-robin"):
            # Round-robin: lookahead 1 takes the fair first job whatever the worker holds.
            api = clustered if label == "affinity" else Api(tmp / "api-rr", models, workers=0, cluster=cluster.address,
                                                            affinity_lookahead=1)
            api.workers(3)
            before, t = loads(api), time.perf_counter()
            jobs = [api.submit(model=m, seed=i) for i, m in enumerate(plan)]
            for job in jobs:
                api.wait(job)
            time.sleep(2.5)  # the workers' load counters reach the dispatcher every 2 s
            results[label] = (loads(api) - before, time.perf_counter() - t)
            if label == "affinity":
                clustered.close()
        rr_api = api
        (a_loads, a_t), (r_loads, r_t) = results["affinity"], results["round-robin"]
        print(f"(b) 30 jobs over 3 checkpoints on 3 workers: {a_loads} loads with affinity ({a_t:.1f} s), "
              f"{r_loads} round-robin ({r_t:.1f} s)")

        # (c) recovery after SIGKILL of the worker running a job.
        api = rr_api
        gaps, firsts = [], []
        for _ in range(3):
            api.workers(3)
            job = api.submit(model=MODELS[0], steps=150)
            while (live := api.service.live.get(job)) is None or live.step < 2:
                time.sleep(0.005)
            victim = next(w for w in api.service.workers() if w["job_id"] == job)
            t = time.perf_counter()
            os.kill(victim["pid"], signal.SIGKILL)
            while len(api._started.get(job, [])) < 2:
                time.sleep(0.002)
            restarted = api._started[job][1][0]
            while (live := api.service.live.get(job)) is None or live.step < 1:
                time.sleep(0.002)
            gaps.append(restarted - t)
            firsts.append(time.perf_counter() - t)
            api.service.cancel(api.store.get(job))
            api._done[job].wait(60)
        print(f"(c) worker SIGKILL -> job running again elsewhere: median {statistics.median(gaps):.3f} s "
              f"(max {max(gaps):.3f} s; target <= 5 s); -> first step there: median {statistics.median(firsts):.3f} s")
        api.close()
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(os.environ["RAY_TMPDIR"], ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
