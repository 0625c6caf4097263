"""Workers on several machines through Ray: one dispatcher, every job run exactly once.

A real Ray cluster on this machine (``ray.cluster_utils.Cluster``: a head and three worker nodes,
each its own raylet, loopback only, health checks shortened) runs one muralist worker actor per
node on the tiny models. Processes are killed and paused for real.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest

# Before Ray is imported: keep every socket on 127.0.0.1 and Ray's files out of /tmp/ray.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_TMPDIR", f"/tmp/mrl-{os.getpid()}")
ray = pytest.importorskip("ray")

from muralist.paths import DataDirs  # noqa: E402
from muralist.service.core import Service, Settings  # noqa: E402
from muralist.service.store import JobStatus, open_store  # noqa: E402
from tests.conftest import link_file  # noqa: E402

MODELS = ("tiny-sd15.safetensors", "tiny-sd15-b.ckpt", "same-as-sd15.ckpt")
SHORT_HEALTH = {"health_check_initial_delay_ms": 1000, "health_check_period_ms": 1000,
                "health_check_timeout_ms": 1000, "health_check_failure_threshold": 3}
SMALL = {"prompt": "a red fox", "width": 64, "height": 64, "steps": 1}


@pytest.fixture(scope="module")
def cluster(a1111_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    from ray.cluster_utils import Cluster

    from muralist.workers.ray_cluster import NAMESPACE, start_workers

    models = tmp_path_factory.mktemp("worker-machine")
    (models / "models" / "Stable-diffusion").mkdir(parents=True)
    for name in MODELS:
        link_file(a1111_models / "models" / "Stable-diffusion" / name, models / "models" / "Stable-diffusion" / name)
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "_system_config": SHORT_HEALTH})
    nodes = [c.add_node(num_cpus=1) for _ in range(3)]
    ray.init(address=c.address, namespace=NAMESPACE, log_to_driver=False)
    try:
        for i, node in enumerate(nodes):
            start_workers(["cpu"], f"node{i}", str(models), node_id=node.node_id, max_loaded_models=1)
        yield SimpleNamespace(cluster=c, nodes=nodes, models=models, address=c.address, a1111=a1111_models)
    finally:
        ray.shutdown()
        c.shutdown()
        shutil.rmtree(os.environ["RAY_TMPDIR"], ignore_errors=True)


@contextmanager
def api(cluster: SimpleNamespace, root: Path, database: str | None = None, workers: int = 3, **settings) -> Iterator[Service]:
    """An API process's service (in this process) dispatching to the cluster's workers."""
    dirs = DataDirs.from_options(root, ckpt_dir=cluster.models / "models" / "Stable-diffusion")
    dirs.ensure()
    store = open_store(database, root)
    settings = {"stall_timeout": 60.0, "lease_seconds": 10.0, "device": "cpu", **settings}
    service = Service(dirs, store, Settings(workers=0, cluster=cluster.address, **settings))
    service.start()
    try:
        wait_for(lambda: sum(w["state"] == "idle" for w in service.workers()) >= workers, 120, "workers to be idle")
        yield service
    finally:
        service.stop(timeout=0)
        store.close()


def wait_for(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout} s for {what}")
        time.sleep(0.05)


def warm(service: Service) -> None:
    """Every worker loads the default checkpoint (small jobs, all at once, until each has run one)."""
    for _ in range(10):
        if all(w["loaded_models"] for w in service.workers()):
            return
        jobs = [service.submit(user(service, f"warm{i}"), "txt2img", SMALL) for i in range(len(service.workers()))]
        for job in jobs:
            assert finished(service, job.id).status is JobStatus.SUCCEEDED
        wait_for(lambda: all(w["state"] == "idle" for w in service.workers()), 60, "idle workers")
        time.sleep(2.5)  # loaded models reach the dispatcher with each job's end and every 2 s
    raise AssertionError(f"not every worker got a job: {service.workers()}")


def user(service: Service, name: str):
    return service.store.ensure_user(name)


def finished(service: Service, job_id: str, timeout: float = 120):
    wait_for(lambda: service.store.get(job_id).status.finished, timeout, f"job {job_id}")
    return service.store.get(job_id)


def running_on(service: Service, job_id: str, min_step: int = 2) -> dict:
    """The worker (its admin view) running ``job_id`` once it is sampling."""
    wait_for(lambda: (live := service.live.get(job_id)) is not None and live.step >= min_step, 120, "sampling")
    name = service.store.get(job_id).worker
    return next(w for w in service.workers() if w["name"] == name)


def images_of(service: Service, job) -> list[Path]:
    recs = [r for r in service.store.list_images(None, limit=1000) if r.job_id == job.id]
    return [service.dirs.root / r.path for r in recs]


def test_killed_worker_process_job_runs_again_elsewhere(cluster: SimpleNamespace, tmp_path: Path) -> None:
    with api(cluster, tmp_path) as service:
        job = service.submit(user(service, "alice"), "txt2img", {**SMALL, "steps": 150, "batch_size": 2})
        first = running_on(service, job.id)
        os.kill(first["pid"], signal.SIGKILL)
        done = finished(service, job.id)
        assert done.status is JobStatus.SUCCEEDED, done.error
        assert done.attempts == 2 and done.failures == 1 and done.worker != first["name"]
        files = images_of(service, done)
        assert len(files) == 2 and all(f.is_file() for f in files)  # one set of images, not two
        outputs = sorted(p for p in (service.dirs.outputs_dir).rglob("*.png"))
        assert outputs == sorted(files)
        # Ray brings the killed worker back, empty; the dispatcher uses it again.
        wait_for(lambda: any(w["name"] == first["name"] and w["state"] == "idle" and w["pid"] != first["pid"]
                             for w in service.workers()), 120, "the restarted worker")


def test_stalled_worker_is_killed_and_its_job_rerun(cluster: SimpleNamespace, tmp_path: Path) -> None:
    # The stall timeout counts between events (steps); loading a model sends none, so the workers
    # are warmed first and the timeout can be short.
    with api(cluster, tmp_path, stall_timeout=5.0) as service:
        warm(service)
        job = service.submit(user(service, "alice"), "txt2img", {**SMALL, "steps": 150})
        first = running_on(service, job.id)
        os.kill(first["pid"], signal.SIGSTOP)  # hung: Ray itself never reports this
        try:
            done = finished(service, job.id)
        finally:
            try:
                os.kill(first["pid"], signal.SIGCONT)
            except ProcessLookupError:
                pass  # killed by the watchdog, as it should be
        assert done.status is JobStatus.SUCCEEDED, done.error
        assert done.attempts == 2 and done.worker != first["name"]
        assert len(images_of(service, done)) == 1
        wait_for(lambda: all(w["state"] == "idle" for w in service.workers()) and len(service.workers()) == 3,
                 120, "the killed worker to come back")


def test_api_restart_finds_the_workers_with_their_models_loaded(cluster: SimpleNamespace, tmp_path: Path) -> None:
    with api(cluster, tmp_path / "first") as first:
        warm(first)
        held = {w["name"]: w["loaded_models"] for w in first.workers()}
    with api(cluster, tmp_path / "second") as second:  # a new API process: detached workers kept their models
        assert {w["name"]: w["loaded_models"] for w in second.workers()} == held
        assert all(held.values())


def test_cancel_through_another_api_process(cluster: SimpleNamespace, tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'shared.db'}"
    with api(cluster, tmp_path / "a", db) as a, api(cluster, tmp_path / "b", db, workers=0) as b:
        assert b.workers() == []  # A drives every worker; B only takes requests
        alice = user(b, "alice")
        job = b.submit(alice, "txt2img", {**SMALL, "steps": 150})
        events = []
        wait_for(lambda: (live := b.live.get(job.id)) is not None and live.step >= 2, 60, "relayed progress in B")
        assert a.store.get(job.id).dispatcher == a.instance
        t0 = time.monotonic()
        b.cancel(b.store.get(job.id))
        done = finished(b, job.id, timeout=30)
        took = time.monotonic() - t0
        events.append(took)
        assert done.status is JobStatus.CANCELED and images_of(b, done) == []
        assert took < 5, f"cancel took {took:.2f} s"  # ~0.3 s here; generous for a loaded CI machine
        # The worker is free again and runs the next job.
        nxt = b.submit(alice, "txt2img", SMALL)
        assert finished(b, nxt.id).status is JobStatus.SUCCEEDED


def test_affinity_loads_fewer_models_than_round_robin(cluster: SimpleNamespace, tmp_path: Path) -> None:
    import random

    def run(root: Path, lookahead: int) -> int:
        with api(cluster, root, affinity_lookahead=lookahead, affinity_max_wait=600.0) as service:
            titles = [c.title for c in service.engine.registry.checkpoints() if c.path.name in MODELS]
            assert len(titles) == 3
            before = {w["name"]: w["loads"] for w in service.workers()}
            rng = random.Random(7)
            users = [user(service, n) for n in ("u1", "u2", "u3")]
            jobs = [service.submit(users[i % 3], "txt2img", {**SMALL, "model": rng.choice(titles), "seed": i})
                    for i in range(30)]
            for job in jobs:
                assert finished(service, job.id).status is JobStatus.SUCCEEDED
            wait_for(lambda: all(w["state"] == "idle" for w in service.workers()), 30, "idle workers")
            return sum(w["loads"] - before[w["name"]] for w in service.workers())

    affinity = run(tmp_path / "affinity", lookahead=4)
    round_robin = run(tmp_path / "rr", lookahead=1)
    print(f"checkpoint loads for 30 jobs on 3 workers: affinity {affinity}, round-robin {round_robin}")
    assert affinity < round_robin


def test_job_needing_a_checkpoint_only_some_workers_have(cluster: SimpleNamespace, tmp_path: Path) -> None:
    """A job names its checkpoint by hash; a worker that lacks the file is never chosen for it."""
    from muralist.workers.ray_cluster import start_workers, stop_workers

    extra = tmp_path / "other-machine"
    (extra / "models" / "Stable-diffusion").mkdir(parents=True)
    only_here = extra / "models" / "Stable-diffusion" / "tiny-sd21.safetensors"  # the node workers lack it
    link_file(cluster.a1111 / "models" / "Stable-diffusion" / only_here.name, only_here)
    start_workers(["cpu"], "special", str(extra), node_id=cluster.nodes[0].node_id)
    try:
        root = tmp_path / "api"
        (root / "models" / "Stable-diffusion").mkdir(parents=True)
        link_file(only_here, root / "models" / "Stable-diffusion")
        dirs_ckpt = root / "models" / "Stable-diffusion"
        for name in MODELS:
            link_file(cluster.models / "models" / "Stable-diffusion" / name, dirs_ckpt / name)
        store = open_store(None, root)
        service = Service(DataDirs.from_options(root), store, Settings(workers=0, cluster=cluster.address, device="cpu"))
        service.start()
        try:
            wait_for(lambda: sum(w["state"] == "idle" for w in service.workers()) == 4, 120, "4 workers")
            alice = user(service, "alice")
            jobs = [service.submit(alice, "txt2img", {**SMALL, "model": "tiny-sd21", "seed": i}) for i in range(3)]
            for job in jobs:
                done = finished(service, job.id)
                assert done.status is JobStatus.SUCCEEDED and done.worker == "special"
        finally:
            service.stop(timeout=0)
            store.close()
    finally:
        stop_workers(["special"])


def test_unplugged_machine_its_job_runs_elsewhere(cluster: SimpleNamespace, tmp_path: Path) -> None:
    from muralist.workers.ray_cluster import start_workers, stop_workers

    spare = cluster.cluster.add_node(num_cpus=1)
    start_workers(["cpu"], "spare", str(cluster.models), node_id=spare.node_id, max_loaded_models=1)
    try:
        with api(cluster, tmp_path, workers=4) as service:
            warm(service)
            alice = user(service, "alice")
            jobs = [service.submit(alice, "txt2img", {**SMALL, "steps": 150, "seed": i}) for i in range(4)]
            wait_for(lambda: any(service.store.get(j.id).worker == "spare" for j in jobs), 60, "a job on the spare machine")
            victim = next(j for j in jobs if service.store.get(j.id).worker == "spare")
            running_on(service, victim.id)
            cluster.cluster.remove_node(spare)  # the machine is gone: raylet and worker process
            for job in jobs:
                done = finished(service, job.id, timeout=240)
                assert done.status is JobStatus.SUCCEEDED, done.error
                assert len(images_of(service, done)) == 1
            done = service.store.get(victim.id)
            assert done.attempts == 2 and done.worker != "spare"
            # The lost worker is listed as not answering, or gone; never offered a job again.
            wait_for(lambda: all(w["state"] == "down" for w in service.workers() if w["name"] == "spare"), 30,
                     "the lost worker out of use")
            again = service.submit(alice, "txt2img", SMALL)
            assert finished(service, again.id).worker != "spare"
    finally:
        stop_workers(["spare"])


def test_a_leaving_worker_hands_its_job_back_without_a_failure(cluster: SimpleNamespace, tmp_path: Path) -> None:
    """`muralist worker` on SIGTERM: its running job is re-queued (not failed) and runs elsewhere."""
    from muralist.workers.ray_cluster import leave_workers, start_workers

    start_workers(["cpu"], "leaving", str(cluster.models), max_loaded_models=1)
    with api(cluster, tmp_path, workers=4) as service:
        alice = user(service, "alice")
        jobs = [service.submit(alice, "txt2img", {**SMALL, "steps": 150, "seed": i}) for i in range(4)]
        wait_for(lambda: any(service.store.get(j.id).worker == "leaving" for j in jobs), 60, "a job on the leaving worker")
        victim = next(j for j in jobs if service.store.get(j.id).worker == "leaving")
        running_on(service, victim.id)
        leave_workers(["leaving"])
        done = finished(service, victim.id, timeout=240)
        assert done.status is JobStatus.SUCCEEDED and done.failures == 0 and done.worker != "leaving"
