"""Operations: MURALIST_* variables, the first admin, probes, /metrics, JSON logs, doctor, SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from muralist.cli import _parse, main
from muralist.service.bootstrap import bootstrap_admin
from muralist.service.store import open_store
from tests.server_util import free_port, link_models, running_server, serve_subprocess, wait_http, wait_job

JOB = {"prompt": "a red fox", "width": 64, "height": 64, "steps": 4}


# ---------------------------------------------------------------- MURALIST_* variables


def test_every_serve_and_worker_option_comes_from_the_environment_and_flags_win(monkeypatch, capsys) -> None:
    monkeypatch.setenv("MURALIST_PORT", "8123")
    monkeypatch.setenv("MURALIST_LISTEN", "yes")
    monkeypatch.setenv("MURALIST_DATABASE", "postgresql://db/x")
    monkeypatch.setenv("MURALIST_MAX_MODEL_MEMORY", "6.5")
    args = _parse(["serve"])
    assert (args.port, args.listen, args.database, args.max_model_memory) == (8123, True, "postgresql://db/x", 6.5)
    assert _parse(["serve", "--port", "9000"]).port == 9000
    monkeypatch.setenv("MURALIST_LISTEN", "0")
    assert _parse(["serve"]).listen is False
    # worker --cluster is required, unless the environment gives it.
    monkeypatch.setenv("MURALIST_CLUSTER", "10.0.0.5:6380")
    assert _parse(["worker"]).cluster == "10.0.0.5:6380"
    with pytest.raises(SystemExit):
        _parse(["serve", "--help"])
    assert "MURALIST_<OPTION>" in capsys.readouterr().out


@pytest.mark.parametrize(("name", "value"), [("MURALIST_PORT", "abc"), ("MURALIST_LISTEN", "maybe"),
                                             ("MURALIST_LOG_FORMAT", "xml")])
def test_a_bad_variable_is_one_line_naming_it(monkeypatch, capsys, tmp_path: Path, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    # A bad --api-auth too: should the variable pass unnoticed, serve still stops (on the wrong error).
    assert main(["serve", "--data-dir", str(tmp_path), "--api-auth", "no-password"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and name in err and "Traceback" not in err
    # Other commands do not read them.
    assert main(["png-info", "/nonexistent.png"]) == 2
    assert name not in capsys.readouterr().err


# ---------------------------------------------------------------- first admin


def test_admin_key_from_the_environment_creates_that_admin_once(tmp_path: Path) -> None:
    store = open_store(None, tmp_path)
    try:
        key = "k" * 30
        assert bootstrap_admin(store, needs_auth=True, environ={"MURALIST_ADMIN_KEY": key, "MURALIST_ADMIN_NAME": "ops"}) is None
        user = store.user_by_key(key)
        assert user is not None and user.name == "ops" and user.admin
        # Exists: left alone, also when the variable now holds another key.
        other = "z" * 30
        bootstrap_admin(store, needs_auth=True, environ={"MURALIST_ADMIN_KEY": other, "MURALIST_ADMIN_NAME": "ops"})
        assert store.user_by_key(other) is None and store.user_by_key(key) is not None
        # No generated key either: there are users.
        assert bootstrap_admin(store, needs_auth=True, environ={}) is None
    finally:
        store.close()


def test_a_short_admin_key_is_refused_before_serving(tmp_path: Path) -> None:
    env = dict(os.environ, MURALIST_ADMIN_KEY="short")
    done = subprocess.run([sys.executable, "-m", "muralist.cli", "serve", "--data-dir", str(tmp_path), "--port",
                           str(free_port())], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2 and "MURALIST_ADMIN_KEY" in done.stderr and "24" in done.stderr
    assert "short" not in done.stderr and "Traceback" not in done.stderr


def _serve(root: Path, port: int, *extra: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, list[str]]:
    """A `muralist serve` subprocess whose stderr lines are collected as they come."""
    proc = serve_subprocess(root, port, None, *extra, env=env)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")), daemon=True).start()
    return proc, lines


def _stop(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(60)


def test_a_network_server_without_users_creates_an_admin_and_shows_its_key_once(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc, lines = _serve(tmp_path, port, "--listen", "--workers", "0")
    try:
        wait_http(url, 120, proc)
    finally:
        _stop(proc)
    text = "".join(lines)
    assert "first start: created admin user 'admin'; its API key (shown once): mur_" in text
    key = text.split("(shown once): ")[1].split()[0]
    store = open_store(None, tmp_path)
    user = store.user_by_key(key)
    store.close()
    assert user is not None and user.name == "admin" and user.admin
    # The next start: the admin exists, so no key and no new user.
    proc, lines = _serve(tmp_path, port, "--listen", "--workers", "0")
    try:
        wait_http(url, 120, proc)
        assert httpx.get(url + "/api/v1/me", headers={"Authorization": f"Bearer {key}"}).json()["admin"] is True
        assert httpx.get(url + "/api/v1/me").status_code == 401
    finally:
        _stop(proc)
    assert "mur_" not in "".join(lines) and "first start" not in "".join(lines)


def test_a_model_folder_that_cannot_be_created_is_a_warning_not_a_crash(a1111_models: Path, tmp_path: Path) -> None:
    # As with an A1111 models/ folder mounted read-only in a container without a Lora/ folder:
    # the server starts, says which folder is missing, and serves the checkpoints it has.
    root = link_models(a1111_models, tmp_path / "data")
    (root / "models" / "Lora").write_text("not a folder")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc, lines = _serve(root, port, "--workers", "0")
    try:
        wait_http(url, 120, proc)
        names = [m["model_name"] for m in httpx.get(url + "/sdapi/v1/sd-models").json()]
        assert "tiny-sd15" in names
    finally:
        _stop(proc)
    text = "".join(lines)
    assert "Lora is missing and cannot be created" in text and "Traceback" not in text
    # muralist's own folders must be writable: one line saying so, no traceback.
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro" / "outputs").write_text("not a folder")
    done = subprocess.run([sys.executable, "-m", "muralist.cli", "serve", "--data-dir", str(tmp_path / "ro"),
                           "--port", str(port)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "the data folder must be writable" in done.stderr and "Traceback" not in done.stderr


# ---------------------------------------------------------------- probes and metrics


def test_healthz_is_ready_with_a_live_worker_and_says_why_not_otherwise(a1111_models: Path, tmp_path: Path) -> None:
    root = link_models(a1111_models, tmp_path / "data")
    with running_server(root, workers=0) as (url, _service):
        assert httpx.get(url + "/livez").json() == {"status": "alive"}
        r = httpx.get(url + "/healthz")
        assert r.status_code == 503
        assert r.json()["status"] == "not ready" and r.json()["problems"] == ["no worker registered yet"]
        assert r.json()["database"] == "ok"
    with running_server(root, workers=1, allow_single_user=False) as (url, _service):
        deadline = time.monotonic() + 30
        while (r := httpx.get(url + "/healthz")).status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "ready" and r.json()["workers"] == 1 and "problems" not in r.json()


@pytest.mark.skipif(not os.environ.get("MURALIST_TEST_POSTGRES"), reason="set MURALIST_TEST_POSTGRES to run")
def test_healthz_names_a_database_that_went_away(a1111_models: Path, tmp_path: Path) -> None:
    import uuid

    import psycopg

    base = os.environ["MURALIST_TEST_POSTGRES"]
    name = f"muralist_ops_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    url = base.rsplit("/", 1)[0] + "/" + name
    root = link_models(a1111_models, tmp_path / "data")
    try:
        with running_server(root, database=url, workers=0) as (server, _service):
            assert httpx.get(server + "/healthz").json()["database"] == "ok"
            with psycopg.connect(base, autocommit=True) as conn:
                conn.execute(f"DROP DATABASE {name} WITH (FORCE)")  # the database is gone under the server
            r = httpx.get(server + "/healthz", timeout=30)
            assert r.status_code == 503 and r.json()["database"] == "unreachable"
            assert any(p.startswith("database unreachable") for p in r.json()["problems"])
            assert httpx.get(server + "/livez").status_code == 200  # alive, just not ready
    finally:
        with psycopg.connect(base, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def _metrics(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_metrics_follow_a_job_from_queue_to_finish_and_need_an_admin_key(a1111_models: Path, tmp_path: Path) -> None:
    root = link_models(a1111_models, tmp_path / "data")
    store = open_store(None, root)
    admin_key, bob_key = store.add_user("root", admin=True), store.add_user("bob")
    store.close()
    admin, bob = {"Authorization": f"Bearer {admin_key}"}, {"Authorization": f"Bearer {bob_key}"}
    with running_server(root, workers=0, allow_single_user=False) as (url, _service):  # no worker: jobs wait
        assert httpx.get(url + "/metrics").status_code == 401
        assert httpx.get(url + "/metrics", headers=bob).status_code == 403
        job = httpx.post(url + "/api/v1/jobs", json={"type": "txt2img", "params": JOB}, headers=bob).json()
        m = _metrics(httpx.get(url + "/metrics", headers=admin).text)
        assert m[("muralist_queue_jobs", (("user", "bob"),))] == 1
        assert m[("muralist_jobs", (("status", "queued"),))] == 1
        assert m[("muralist_jobs", (("status", "succeeded"),))] == 0
        assert m[("muralist_step_seconds_count", ())] == 0
        assert m[("muralist_database_up", ())] == 1
    with running_server(root, workers=1, allow_single_user=False, metrics_public=True) as (url, _service):
        with httpx.Client(base_url=url, headers=bob) as c:
            assert wait_job(c, job["id"])["status"] == "succeeded"
        m = _metrics(httpx.get(url + "/metrics").text)  # --metrics-public: no key needed
    assert ("muralist_queue_jobs", (("user", "bob"),)) not in m
    assert m[("muralist_jobs", (("status", "succeeded"),))] == 1
    assert m[("muralist_jobs", (("status", "queued"),))] == 0
    # 4 steps: the first is not timed (it includes loading), the other three are.
    assert m[("muralist_step_seconds_count", ())] == 3 and m[("muralist_step_seconds_sum", ())] > 0
    loads = {k: v for k, v in m.items() if k[0] == "muralist_model_loads_total"}
    assert list(loads.values()) == [1]
    assert m[("muralist_workers", (("state", "idle"),))] == 1 and m[("muralist_workers", (("state", "busy"),))] == 0
    assert m[("process_resident_memory_bytes", ())] > 0


# ---------------------------------------------------------------- JSON logs and SIGTERM


def test_json_logs_are_one_object_per_line_with_job_fields_and_no_keys(a1111_models: Path, tmp_path: Path) -> None:
    root = link_models(a1111_models, tmp_path / "data")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    key = "secret-admin-key-0123456789abcdef"
    proc, lines = _serve(root, port, "--listen", env={"MURALIST_LOG_FORMAT": "json", "MURALIST_ADMIN_KEY": key})
    try:
        wait_http(url, 120, proc)
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}) as c:
            job = c.post("/api/v1/jobs?token=mur_leakedleakedleaked", json={"type": "txt2img", "params": JOB}).json()
            assert wait_job(c, job["id"])["status"] == "succeeded"
    finally:
        assert _stop(proc) in (0, -signal.SIGTERM)
    records = [json.loads(line) for line in lines if line.strip()]  # every line parses
    assert all({"ts", "level", "logger", "message"} <= r.keys() for r in records)
    assert any(r["logger"] == "uvicorn.access" and "POST /api/v1/jobs" in r["message"] for r in records)
    about_job = [r for r in records if r.get("job") == job["id"]]
    assert about_job and all(r["user"] == "admin" for r in about_job)
    assert any("succeeded" in r["message"] for r in about_job)
    text = "".join(lines)
    assert key not in text and "mur_leaked" not in text


def test_sigterm_stops_the_server_when_it_is_pid_1(tmp_path: Path) -> None:
    """In a container muralist is PID 1, where a signal without a handler is ignored."""
    if subprocess.run(["unshare", "--pid", "--fork", "true"], capture_output=True).returncode != 0:
        pytest.skip("cannot make a PID namespace here")
    port = free_port()
    proc = subprocess.Popen(["unshare", "--pid", "--fork", "--kill-child", sys.executable, "-c",
                             "import os, sys; from muralist.cli import main; assert os.getpid() == 1; "
                             f"sys.exit(main(['serve', '--data-dir', {str(tmp_path)!r}, '--port', '{port}', '--workers', '0']))"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_http(f"http://127.0.0.1:{port}", 120, proc)
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        os.kill(int(children[0]), signal.SIGTERM)  # to muralist itself, PID 1 in its namespace
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "Shutting down" in proc.stderr.read()


# ---------------------------------------------------------------- doctor


def _doctor(capsys, *args: str) -> tuple[int, dict[str, dict[str, str]]]:
    code = main(["doctor", "--json", *args])
    out = json.loads(capsys.readouterr().out)
    return code, {c["name"]: c for c in out["checks"]}


def test_doctor_passes_a_good_setup(a1111_models: Path, tmp_path: Path, capsys) -> None:
    root = link_models(a1111_models, tmp_path / "data")
    code, checks = _doctor(capsys, "--data-dir", str(root), "--port", str(free_port()))
    assert code == 0, checks
    assert checks["models"]["status"] == "OK" and "2 checkpoint(s)" in checks["models"]["message"]
    assert {"python", "torch", "gpu", "cuda", "database", "disk", "port"} <= checks.keys()
    main(["doctor", "--data-dir", str(root), "--port", str(free_port())])
    lines = capsys.readouterr().out.splitlines()
    assert lines and all(line.split()[0] in ("OK", "WARN", "FAIL") for line in lines)


def test_doctor_fails_on_real_problems_and_says_what_to_change(tmp_path: Path, capsys, monkeypatch) -> None:
    (tmp_path / "empty" / "models" / "Stable-diffusion").mkdir(parents=True)
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        taken = held.getsockname()[1]
        closed = free_port()
        monkeypatch.setenv("MURALIST_PORT", str(taken))  # the variables apply to doctor as to serve
        code, checks = _doctor(capsys, "--data-dir", str(tmp_path / "empty"),
                               "--database", f"postgresql://postgres:hunter2@127.0.0.1:{closed}/test",
                               "--cluster", f"127.0.0.1:{closed}")
    assert code == 1
    assert checks["port"]["status"] == "FAIL" and "--port" in checks["port"]["message"]
    assert checks["database"]["status"] == "FAIL" and f"127.0.0.1:{closed}" in checks["database"]["message"]
    assert "hunter2" not in checks["database"]["message"]
    assert checks["models"]["status"] == "FAIL" and "0 checkpoint(s)" in checks["models"]["message"]
    assert checks["ray head"]["status"] == "FAIL" and "muralist cluster start-head" in checks["ray head"]["message"]
    # A data path that is a regular file.
    (tmp_path / "file").write_text("not a folder")
    code, checks = _doctor(capsys, "--data-dir", str(tmp_path / "file"), "--port", str(free_port()))
    assert code == 1 and checks["data folder"]["status"] == "FAIL" and "regular file" in checks["data folder"]["message"]
    assert checks["database"]["status"] == "FAIL"
