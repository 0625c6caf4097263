"""Run a real muralist server (uvicorn on a free port) for tests, in-process or as a subprocess."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.conftest import link_file, link_tree


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def link_models(a1111_models: Path, root: Path, names: tuple[str, ...] = ("tiny-sd15.safetensors", "tiny-sd15-b.ckpt"),
                controlnet: bool = False) -> Path:
    """A data folder at root holding the named tiny checkpoints (and the ControlNets), hard-linked."""
    ckpt = root / "models" / "Stable-diffusion"
    ckpt.mkdir(parents=True, exist_ok=True)
    for n in names:
        link_file(a1111_models / "models" / "Stable-diffusion" / n, ckpt / n)
    if controlnet:
        link_tree(a1111_models / "models" / "ControlNet", root / "models" / "ControlNet")
    return root


@contextmanager
def running_server(root: Path, database: str | None = None, api_auth: dict[str, str] | None = None,
                   workers: int = 1, allow_single_user: bool = True, metrics_public: bool = False,
                   **settings) -> Iterator[tuple[str, object]]:
    """An in-process server; yields (base URL, Service)."""
    import uvicorn

    from muralist.paths import DataDirs
    from muralist.service.app import AuthConfig, create_app
    from muralist.service.core import Service, Settings
    from muralist.service.store import open_store

    dirs = DataDirs.from_options(root)
    dirs.ensure()
    store = open_store(database, root)
    # grace 0: a job still running when a test ends is re-queued at once, not waited for.
    service = Service(dirs, store, Settings(**{"workers": workers, "device": "cpu", "grace": 0.0, **settings}))
    app = create_app(service, AuthConfig(api_auth or {}, allow_single_user=allow_single_user, metrics_public=metrics_public))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("server did not start")
        time.sleep(0.05)
    try:
        yield url, service
    finally:
        server.should_exit = True
        thread.join(30)
        store.close()


def serve_subprocess(root: Path, port: int, database: str | None = None, *extra: str,
                     env: dict[str, str] | None = None) -> subprocess.Popen:
    """A ``muralist serve`` process (its stderr piped); ``env`` adds variables to this one's."""
    args = [sys.executable, "-m", "muralist.cli", "serve", "--data-dir", str(root), "--port", str(port), *extra]
    if database:
        args += ["--database", database]
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})


def wait_http(url: str, timeout: float = 60, proc: subprocess.Popen | None = None) -> float:
    """Seconds until ``url``/api/v1/health answers; fails at once if ``proc`` (the server) exits."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        assert proc is None or proc.poll() is None, "the server exited"
        try:
            if httpx.get(url + "/api/v1/health", timeout=1).status_code == 200:
                return time.monotonic() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise TimeoutError(url)


def wait_job(client: httpx.Client, job_id: str, timeout: float = 120, interval: float = 0.05) -> dict:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        job = client.get(f"/api/v1/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "canceled"):
            return job
        time.sleep(interval)
    raise TimeoutError(job_id)
