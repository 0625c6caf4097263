"""The multi-user service through a real HTTP server, on SQLite and (when MURALIST_TEST_POSTGRES
is set, as in CI) on PostgreSQL."""

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

from muralist.infotext import parse_infotext, read_infotext
from tests.server_util import free_port, link_models, running_server, serve_subprocess, wait_http, wait_job

PG = os.environ.get("MURALIST_TEST_POSTGRES")
SMALL = {"width": 64, "height": 64, "steps": 2, "seed": 1}


@pytest.fixture(params=["sqlite", "postgres"])
def database(request: pytest.FixtureRequest) -> Iterator[str | None]:
    if request.param == "sqlite":
        yield None
        return
    if not PG:
        pytest.skip("set MURALIST_TEST_POSTGRES=postgresql://... to run against PostgreSQL")
    import psycopg

    schema = "t_" + uuid.uuid4().hex[:12]
    with psycopg.connect(PG, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    sep = "&" if "?" in PG else "?"
    yield f"{PG}{sep}options=-csearch_path%3D{schema}"
    with psycopg.connect(PG, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture()
def root(a1111_models: Path, tmp_path: Path) -> Path:
    return link_models(a1111_models, tmp_path / "data")


def users(service, *names: str) -> dict[str, str]:
    return {n: service.store.add_user(n) for n in names}


def client(url: str, key: str | None = None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=url, headers=headers, timeout=60)


def test_two_users_two_models_each_image_names_its_model(root: Path, database: str | None) -> None:
    with running_server(root, database, max_loaded_models=1) as (url, service):
        keys = users(service, "alice", "bob")
        ca, cb = client(url, keys["alice"]), client(url, keys["bob"])
        submitted: list[tuple[httpx.Client, str, str]] = []
        lock = threading.Lock()

        def submit(c: httpx.Client, model: str, n: int) -> None:
            for i in range(n):
                r = c.post("/api/v1/jobs", json={"type": "txt2img", "params": {**SMALL, "model": model, "seed": i, "prompt": "x"}})
                assert r.status_code == 202, r.text
                with lock:
                    submitted.append((c, r.json()["id"], model))

        ts = [threading.Thread(target=submit, args=a) for a in ((ca, "tiny-sd15.safetensors", 4), (cb, "tiny-sd15-b.ckpt", 4))]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        for c, job_id, model in submitted:
            job = wait_job(c, job_id)
            assert job["status"] == "succeeded", job
            png = c.get(f"/api/v1/images/{job['result']['images'][0]}")
            assert png.status_code == 200
            assert parse_infotext(read_infotext(png.content))["Model"] == Path(model).stem


def test_users_see_only_their_own_jobs_and_images(root: Path, database: str | None) -> None:
    with running_server(root, database) as (url, service):
        keys = users(service, "alice", "bob")
        ca, cb = client(url, keys["alice"]), client(url, keys["bob"])
        job_id = ca.post("/api/v1/jobs", json={"params": {**SMALL, "prompt": "secret"}}).json()["id"]
        job = wait_job(ca, job_id)
        image_id = job["result"]["images"][0]
        assert cb.get(f"/api/v1/jobs/{job_id}").status_code == 404
        assert cb.get(f"/api/v1/images/{image_id}").status_code == 404
        assert cb.post(f"/api/v1/jobs/{job_id}/cancel").status_code == 404
        assert cb.get("/api/v1/jobs").json()["jobs"] == []
        assert cb.get("/api/v1/images").json()["images"] == []
        assert ca.get(f"/api/v1/images/{image_id}").status_code == 200
        assert client(url).get("/api/v1/jobs").status_code == 401  # users exist: no anonymous access
        assert client(url, "mur_wrong").get("/api/v1/jobs").status_code == 401


def test_one_users_cancel_never_stops_another_users_job(root: Path, database: str | None) -> None:
    with running_server(root, database, workers=2) as (url, service):
        keys = users(service, "alice", "bob")
        ca, cb = client(url, keys["alice"]), client(url, keys["bob"])
        a = ca.post("/api/v1/jobs", json={"params": {**SMALL, "steps": 40, "prompt": "a"}}).json()["id"]
        b = cb.post("/api/v1/jobs", json={"params": {**SMALL, "steps": 40, "prompt": "b"}}).json()["id"]
        deadline = time.monotonic() + 60
        while ca.get(f"/api/v1/jobs/{a}").json()["status"] != "running" and time.monotonic() < deadline:
            time.sleep(0.02)
        assert ca.post(f"/api/v1/jobs/{a}/cancel").status_code == 200
        assert wait_job(ca, a)["status"] == "canceled"
        assert wait_job(cb, b)["status"] == "succeeded"
        assert ca.get("/api/v1/images").json()["images"] == []  # partial images are discarded


def test_many_concurrent_submitters_each_job_runs_exactly_once(root: Path, database: str | None) -> None:
    with running_server(root, database, workers=2) as (url, service):
        keys = users(service, *(f"u{i}" for i in range(20)))
        ids: dict[str, list[str]] = {}

        def submit(name: str) -> None:
            c = client(url, keys[name])
            ids[name] = [c.post("/api/v1/jobs", json={"params": {**SMALL, "steps": 1, "seed": i}}).json()["id"] for i in range(5)]

        ts = [threading.Thread(target=submit, args=(n,)) for n in keys]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        for name, job_ids in ids.items():
            c = client(url, keys[name])
            for job_id in job_ids:
                job = wait_job(c, job_id, timeout=300)
                assert job["status"] == "succeeded" and job["attempts"] == 1
        all_jobs = service.store.list_jobs(None, limit=1000)
        assert len(all_jobs) == 100 and len({j.id for j in all_jobs}) == 100
        assert len(service.store.list_images(None, limit=1000)) == 100


def test_queue_shows_my_positions_and_only_counts_of_others(root: Path, database: str | None) -> None:
    with running_server(root, database, workers=0) as (url, service):  # no worker: jobs stay queued
        keys = users(service, "alice", "bob")
        ca, cb = client(url, keys["alice"]), client(url, keys["bob"])
        a_ids = [ca.post("/api/v1/jobs", json={"params": SMALL}).json()["id"] for _ in range(3)]
        b = cb.post("/api/v1/jobs", json={"params": SMALL}).json()
        assert b["position"] == 1  # fair: bob's first job goes right after alice's first
        q = cb.get("/api/v1/queue").json()
        assert [j["id"] for j in q["queued"]] == [b["id"]] and q["others_queued"] == 3
        assert all(j["id"] in a_ids for j in ca.get("/api/v1/queue").json()["queued"])


def test_bad_requests_get_clear_4xx_and_queue_is_unaffected(root: Path, database: str | None) -> None:
    with running_server(root, database, workers=0) as (url, service):
        c = client(url, users(service, "alice")["alice"])
        ok = c.post("/api/v1/jobs", json={"params": SMALL}).json()["id"]
        r = c.post("/api/v1/jobs", json={"params": {**SMALL, "width": 65}})
        assert r.status_code == 422 and "width" in r.json()["detail"]
        r = c.post("/api/v1/jobs", json={"params": {**SMALL, "model": "nope"}})
        assert r.status_code == 422 and "tiny-sd15" in r.json()["detail"]
        r = c.post("/api/v1/jobs", json={"params": {**SMALL, "sampler_name": "Eulr a"}})
        assert r.status_code == 422 and "Euler a" in r.json()["detail"]
        r = c.post("/api/v1/jobs", json={"params": {**SMALL, "model": "../../etc/passwd"}})
        assert r.status_code == 422
        r = c.post("/api/v1/jobs", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 422
        r = c.post("/api/v1/jobs", content=b"x" * (33 * 2**20), headers={"content-type": "application/json"})
        assert r.status_code == 413
        r = c.post("/api/v1/jobs", json={"params": {**SMALL, "width": 4096, "height": 4096}})
        assert r.status_code == 422 and "limit" in r.json()["detail"]
        assert [j["id"] for j in c.get("/api/v1/jobs").json()["jobs"]] == [ok]
        assert c.get("/api/v1/jobs/" + ok).json()["status"] == "queued"


def test_user_defaults_and_per_job_settings(root: Path, database: str | None) -> None:
    with running_server(root, database) as (url, service):
        c = client(url, users(service, "alice")["alice"])
        assert c.put("/api/v1/me/options", json={"model": "tiny-sd15-b.ckpt", "cfg_scale": 5}).status_code == 200
        j1 = wait_job(c, c.post("/api/v1/jobs", json={"params": SMALL}).json()["id"])
        j2 = wait_job(c, c.post("/api/v1/jobs", json={"params": {**SMALL, "model": "tiny-sd15.safetensors"}}).json()["id"])
        j3 = wait_job(c, c.post("/api/v1/jobs", json={"params": SMALL}).json()["id"])
        models = [parse_infotext(j["result"]["infotexts"][0])["Model"] for j in (j1, j2, j3)]
        assert models == ["tiny-sd15-b", "tiny-sd15", "tiny-sd15-b"]
        assert parse_infotext(j1["result"]["infotexts"][0])["CFG scale"] == "5.0"


def test_job_events_stream_progress_and_finish(root: Path, database: str | None) -> None:
    with running_server(root, database) as (url, service):
        c = client(url, users(service, "alice")["alice"])
        job_id = c.post("/api/v1/jobs", json={"params": {**SMALL, "steps": 10}}).json()["id"]
        events = []
        with c.stream("GET", f"/api/v1/jobs/{job_id}/events") as r:
            for line in r.iter_lines():
                if line.startswith("event: "):
                    events.append(line[7:])
        assert events[0] == "state" and events[-1] == "finished"
        assert "progress" in events


def test_restart_with_queued_jobs_loses_nothing(root: Path, database: str | None) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = serve_subprocess(root, port, database, "--lease-timeout", "3")
    try:
        wait_http(url)
        c = client(url)  # single-user mode
        ids = [c.post("/api/v1/jobs", json={"params": {**SMALL, "steps": 20, "seed": i}}).json()["id"] for i in range(4)]
        deadline = time.monotonic() + 60
        while c.get(f"/api/v1/jobs/{ids[0]}").json()["status"] != "running" and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        # The new process re-queues the job once its lease (3 s here) lapses: nothing else knew it died.
        proc = serve_subprocess(root, port, database, "--lease-timeout", "3")
        wait_http(url)
        for job_id in ids:
            job = wait_job(c, job_id, timeout=180)
            assert job["status"] == "succeeded", job
        assert wait_job(c, ids[0])["attempts"] == 2  # it was running when the process died
    finally:
        proc.kill()
        proc.wait(30)


def test_queue_limit_is_429_naming_the_limit(root: Path) -> None:
    with running_server(root, workers=0) as (url, service):
        key = service.store.add_user("alice")
        service.store.set_user_limits("alice", {"max_queued": 2})
        c = client(url, key)
        assert [c.post("/api/v1/jobs", json={"params": SMALL}).status_code for _ in range(2)] == [202, 202]
        r = c.post("/api/v1/jobs", json={"params": SMALL})
        assert r.status_code == 429 and "2" in r.json()["detail"]


def test_docs_work_offline(root: Path) -> None:
    with running_server(root, workers=0) as (url, _service):
        page = httpx.get(url + "/docs").text
        assert "/docs-assets/swagger-ui-bundle.js" in page and "cdn" not in page.lower()
        assert httpx.get(url + "/docs-assets/swagger-ui-bundle.js").status_code == 200
        spec = httpx.get(url + "/openapi.json").json()
        assert "/api/v1/jobs" in spec["paths"] and "/sdapi/v1/txt2img" in spec["paths"]


def test_users_cli(tmp_path: Path) -> None:
    import subprocess
    import sys

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "muralist.cli", *args, "--data-dir", str(tmp_path)],
                              capture_output=True, text=True, timeout=120)

    # (serve --listen with no users creates a first admin: tests/test_ops.py)
    added = cli("users", "add", "carol", "--admin")
    assert added.returncode == 0
    key = added.stdout.strip().splitlines()[-1]
    assert key.startswith("mur_") and len(key) > 20
    listed = cli("users", "list")
    assert "carol" in listed.stdout and "admin" in listed.stdout
    new_key = cli("users", "reset-key", "carol").stdout.strip().splitlines()[-1]
    assert new_key != key
    from muralist.service.store import open_store

    store = open_store(None, tmp_path)
    try:
        assert store.user_by_key(key) is None and store.user_by_key(new_key).name == "carol"
    finally:
        store.close()
    assert cli("users", "remove", "carol").returncode == 0
    assert cli("users", "remove", "carol").returncode == 2


def test_basic_auth_users_as_with_a1111_api_auth(root: Path) -> None:
    with running_server(root, workers=0, api_auth={"dave": "s3cret"}) as (url, _service):
        ok = httpx.get(url + "/api/v1/me", auth=("dave", "s3cret"))
        assert ok.status_code == 200 and ok.json()["name"] == "dave"
        assert httpx.get(url + "/api/v1/me", auth=("dave", "wrong")).status_code == 401
        assert httpx.get(url + "/sdapi/v1/progress").status_code == 401


def test_old_history_is_pruned_with_its_files(root: Path) -> None:
    with running_server(root, keep_days=1) as (url, service):
        c = client(url, users(service, "alice")["alice"])
        job = wait_job(c, c.post("/api/v1/jobs", json={"params": SMALL}).json()["id"])
        rec = service.store.get_image(job["result"]["images"][0])
        path = service.dirs.root / rec.path
        assert path.is_file() and service.prune() == 0  # younger than a day: kept
        service.settings.keep_days = -1  # everything finished is "old" now
        assert service.prune() == 1
        assert not path.exists() and c.get(f"/api/v1/jobs/{job['id']}").status_code == 404
