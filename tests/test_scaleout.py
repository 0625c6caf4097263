"""Several API processes on one database, and stopping one: no job lost, none run twice.

Real ``muralist serve`` processes with their in-process workers (the embedded default), killed
and stopped with real signals. The PostgreSQL test needs MURALIST_TEST_POSTGRES (CI sets it).
"""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from muralist.service.store import JobStatus, open_store
from tests.server_util import free_port, link_models, serve_subprocess, wait_http, wait_job

PG = os.environ.get("MURALIST_TEST_POSTGRES")
SMALL = {"prompt": "a lighthouse", "width": 64, "height": 64, "steps": 2}


@pytest.fixture()
def root(a1111_models: Path, tmp_path: Path) -> Path:
    return link_models(a1111_models, tmp_path / "data")


@pytest.fixture()
def pg_url() -> Iterator[str]:
    if not PG:
        pytest.skip("set MURALIST_TEST_POSTGRES=postgresql://... to run against PostgreSQL")
    import psycopg

    schema = "t_" + uuid.uuid4().hex[:12]
    with psycopg.connect(PG, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    yield f"{PG}{'&' if '?' in PG else '?'}options=-csearch_path%3D{schema}"
    with psycopg.connect(PG, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA {schema} CASCADE")


def running(c: httpx.Client, job_id: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = c.get(f"/api/v1/jobs/{job_id}").json()
        if job["status"] == "running" and job.get("progress", {}).get("step", 0) >= 2:
            return job
        time.sleep(0.05)
    raise TimeoutError(job_id)


def stop(proc, sig: int = signal.SIGKILL) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
    proc.wait(60)


def serve(root: Path, *extra: str, port: int | None = None):
    """A `muralist serve` process on SQLite in single-user mode: (process, its port, a client)."""
    port = port or free_port()
    proc = serve_subprocess(root, port, None, *extra)
    wait_http(f"http://127.0.0.1:{port}")
    return proc, port, httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)


def test_sigterm_requeues_the_running_job_and_a_restart_finishes_it(root: Path) -> None:
    proc, port, c = serve(root, "--grace", "0")
    try:
        job_id = c.post("/api/v1/jobs", json={"params": {**SMALL, "steps": 150, "batch_size": 2}}).json()["id"]
        queued_id = c.post("/api/v1/jobs", json={"params": SMALL}).json()["id"]
        running(c, job_id)
        stop(proc, signal.SIGTERM)  # what `docker stop` and systemd send
        log = proc.stderr.read()
        assert "Application shutdown complete" in log and "Traceback" not in log, log[-2000:]
        with open_store(None, root) as store:
            job = store.get(job_id)
            assert job.status is JobStatus.QUEUED and job.failures == 0  # not canceled, not a failure
            assert store.get(queued_id).status is JobStatus.QUEUED
            assert store.list_images(None) == []
        proc, _, c = serve(root, port=port)
        done = wait_job(c, job_id, timeout=180)
        assert done["status"] == "succeeded" and done["attempts"] == 2 and len(done["result"]["images"]) == 2
        assert wait_job(c, queued_id)["status"] == "succeeded"
    finally:
        stop(proc)


def test_sigterm_lets_a_running_job_finish_within_the_grace_period(root: Path) -> None:
    proc, _, c = serve(root, "--grace", "120")
    try:
        job_id = c.post("/api/v1/jobs", json={"params": {**SMALL, "steps": 40}}).json()["id"]
        running(c, job_id)
        stop(proc, signal.SIGTERM)
        with open_store(None, root) as store:
            job = store.get(job_id)
            assert job.status is JobStatus.SUCCEEDED and job.attempts == 1
            assert [Path(root / i.path).is_file() for i in store.list_images(None)] == [True]
    finally:
        stop(proc)


def test_two_api_processes_on_postgres_each_job_once_and_a_killed_one_loses_nothing(root: Path, pg_url: str) -> None:
    with open_store(pg_url, root) as store:
        keys = {name: store.add_user(name) for name in ("ann", "ben", "cy")}
    ports = [free_port(), free_port()]
    procs = [serve_subprocess(root, p, pg_url, "--lease-timeout", "3") for p in ports]
    try:
        urls = [f"http://127.0.0.1:{p}" for p in ports]
        for u in urls:
            wait_http(u)
        instances = [httpx.get(u + "/api/v1/health").json()["instance"] for u in urls]
        clients = {(name, i): httpx.Client(base_url=urls[i], timeout=60, headers={"Authorization": f"Bearer {key}"})
                   for name, key in keys.items() for i in range(2)}
        submitted: list[tuple[str, str]] = []
        lock = threading.Lock()

        def submit(name: str) -> None:
            for n in range(7 if name != "cy" else 6):
                r = clients[(name, n % 2)].post("/api/v1/jobs", json={"params": {**SMALL, "steps": 12, "seed": n}})
                assert r.status_code == 202, r.text
                with lock:
                    submitted.append((name, r.json()["id"]))

        threads = [threading.Thread(target=submit, args=(n,)) for n in keys]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(submitted) == 20
        # Kill API process 0 while its worker runs a job.
        with open_store(pg_url, root) as store:
            deadline = time.monotonic() + 120
            while not (victims := [j for j in store.list_jobs(None, [JobStatus.RUNNING]) if j.dispatcher == instances[0]]):
                assert time.monotonic() < deadline, "process 0 never ran a job"
                time.sleep(0.02)
        stop(procs[0])
        for name, job_id in submitted:
            job = wait_job(clients[(name, 1)], job_id, timeout=240)
            assert job["status"] == "succeeded", job
            assert len(job["result"]["images"]) == 1
        with open_store(pg_url, root) as store:
            jobs = [store.get(job_id) for _, job_id in submitted]
            images = store.list_images(None, limit=1000)
            assert sorted(i.job_id for i in images) == sorted(j.id for j in jobs)  # exactly one image per job
            assert store.get(victims[0].id).attempts == 2
        files = sorted(p for p in (root / "outputs").rglob("*.png"))
        assert len(files) == 20 and sorted(root / i.path for i in images) == files
    finally:
        for p in procs:
            stop(p)
