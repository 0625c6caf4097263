"""Model downloads against a local server that speaks the providers' URL shapes and headers.

One ``http.server`` plays Hugging Face (``/{repo}/resolve/{rev}/{file}`` answering with a redirect
that carries ``X-Linked-Etag``/``X-Linked-Size``), ModelScope (file listing with ``Sha256``, file
API, revisions), Civitai (version API, ``/api/download/models/{id}`` redirecting to a single-use "signed" URL)
and plain URLs; a second one plays the CDN/storage host. Switches cut or pause a transfer, turn
Range off, or corrupt a byte. ``test_hub_clients`` checks these shapes with the providers' own clients.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import httpx
import pytest

from muralist.errors import ForbiddenError, InvalidRequestError
from muralist.models.download import (
    ChecksumError,
    DownloadCanceled,
    DownloadError,
    DownloadSettings,
    download,
    filename_from_disposition,
    parse_params,
    sanitize_name,
)
from muralist.paths import DataDirs

MiB = 1 << 20
TOKEN = "civ-SECRET-token-0123456789"
HF_TOKEN = "hf_SECRETtoken9876543210"
MS_TOKEN = "ms-SECRET-token-13579"


class Provider:
    """State shared by both servers: the files, the switches and a log of requests."""

    def __init__(self) -> None:
        self.hf: dict[tuple[str, str, str], bytes] = {}
        self.ms: dict[tuple[str, str, str], bytes] = {}
        self.civitai: dict[int, tuple[str, bytes]] = {}
        self.plain: dict[str, bytes] = {}
        self.blobs: dict[str, bytes] = {}
        self.range_enabled = True
        self.cut_after: int | None = None  # the next content response sends this many bytes, then closes
        self.pause_after: int | None = None  # ... or sends them and waits for ``release``
        self.release = threading.Event()
        self.corrupt = False
        self.civitai_token: str | None = None
        self.signed: set[str] = set()
        self.log: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.main = self.storage = ""

    def add_blob(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        self.blobs[sha] = data
        return sha

    def content_requests(self) -> list[dict[str, Any]]:
        return [r for r in self.log if r.get("content")]


def make_handler(p: Provider, role: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def _record(self, status: int, **extra: Any) -> None:
            with p.lock:
                p.log.append({"role": role, "method": self.command, "path": self.path, "status": status,
                              "range": self.headers.get("Range"), "auth": self.headers.get("Authorization"),
                              "cookie": self.headers.get("Cookie"), **extra})

        def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
            self._record(status)
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, obj: Any, status: int = 200) -> None:
            self._send(status, json.dumps(obj).encode(), {"Content-Type": "application/json"})

        def _content(self, data: bytes, headers: dict[str, str] | None = None) -> None:
            if p.corrupt:
                data = data[: len(data) // 2] + bytes([data[len(data) // 2] ^ 0xFF]) + data[len(data) // 2 + 1:]
            headers = dict(headers or {})
            headers["Accept-Ranges"] = "bytes" if p.range_enabled else "none"
            rng = self.headers.get("Range")
            status, start = 200, 0
            if rng and p.range_enabled:
                start = int(re.match(r"bytes=(\d+)-$", rng).group(1))  # type: ignore[union-attr]
                if start >= len(data):
                    self._record(416, content=True)
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                status = 206
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            body = data[start:]
            self._record(status, content=True)
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command == "HEAD":
                return
            cut, pause = p.cut_after, p.pause_after
            if cut is not None or pause is not None:
                p.cut_after = p.pause_after = None
                self.wfile.write(body[: cut if cut is not None else pause])
                self.wfile.flush()
                if pause is not None:
                    p.release.wait(60)
                self.close_connection = True  # the client sees the body end early
                return
            self.wfile.write(body)

        def do_HEAD(self) -> None:
            self.do_GET()

        def do_GET(self) -> None:
            url = urlsplit(self.path)
            path, q = unquote(url.path), {k: v[0] for k, v in parse_qs(url.query).items()}
            if role == "storage":
                if m := re.match(r"^/cdn/([0-9a-f]{64})$", path):
                    return self._content(p.blobs[m.group(1)]) if m.group(1) in p.blobs else self._send(404)
                if m := re.match(r"^/signed/([0-9a-f]+)/(\d+)$", path):
                    nonce = m.group(1)
                    # Single use: a retry must go back to the API for a fresh signed URL.
                    if q.get("X-Amz-Signature") != nonce or nonce not in p.signed:
                        return self._send(403, b"<Error>AccessDenied: Request has expired</Error>")
                    p.signed.discard(nonce)
                    name, data = p.civitai[int(m.group(2))]
                    return self._content(data, {"Content-Disposition": f'attachment; filename="{name}"'})
                return self._send(404)
            if m := re.match(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path):
                data = p.hf.get((m.group(1), m.group(2), m.group(3)))
                if data is None:
                    return self._send(404, b"Entry not found", {"X-Error-Code": "EntryNotFound"})
                sha = p.add_blob(data)
                # As the Hub does for LFS files: a redirect to the CDN, the metadata on the redirect.
                return self._send(302, b"", {"Location": f"{p.storage}/cdn/{sha}", "X-Linked-Etag": f'"{sha}"',
                                             "X-Linked-Size": str(len(data)), "ETag": '"0123abcd"',
                                             "X-Repo-Commit": "c" * 40})
            if m := re.match(r"^/api/v1/models/([^/]+/[^/]+)/repo/files$", path):
                files = [{"Name": f.rsplit("/", 1)[-1], "Path": f, "Type": "blob", "Size": len(d),
                          "Sha256": hashlib.sha256(d).hexdigest()}
                         for (mid, rev, f), d in p.ms.items() if mid == m.group(1) and rev == q.get("Revision")]
                if not files:
                    return self._json({"Code": 10010205001, "Message": "model not found", "Success": False}, 404)
                return self._json({"Code": 200, "Data": {"Files": files}, "Message": "success", "Success": True})
            if m := re.match(r"^/api/v1/models/([^/]+/[^/]+)/revisions$", path):
                # Branches and tags; modelscope's own client checks the revision here before a snapshot.
                revs = sorted({rev for (mid, rev, _f) in p.ms if mid == m.group(1)})
                if not revs:
                    return self._json({"Code": 10010205001, "Message": "model not found", "Success": False}, 404)
                return self._json({"Code": 200, "Success": True, "Data": {"RevisionMap": {
                    "Branches": [{"Revision": r, "CreatedAt": 1700000000} for r in revs], "Tags": []}}})
            if m := re.match(r"^/api/v1/models/([^/]+/[^/]+)/repo$", path):
                data = p.ms.get((m.group(1), q.get("Revision", ""), q.get("FilePath", "")))
                if data is None:
                    return self._send(404)
                # As ModelScope does for LFS files: a redirect to its object storage.
                return self._send(302, b"", {"Location": f"{p.storage}/cdn/{p.add_blob(data)}"})
            if m := re.match(r"^/api/v1/model-versions/(\d+)$", path):
                vid = int(m.group(1))
                if vid not in p.civitai:
                    return self._json({"error": f"No model version with id {vid}"}, 404)
                name, data = p.civitai[vid]
                return self._json({
                    "id": vid, "modelId": 1, "name": "v1.0", "baseModel": "SD 1.5", "trainedWords": ["tiny"],
                    "model": {"name": "Tiny", "type": "Checkpoint"}, "downloadUrl": f"{p.main}/api/download/models/{vid}",
                    "files": [{"id": 7, "name": name, "type": "Model", "primary": True, "sizeKB": len(data) / 1024,
                               "metadata": {"format": "SafeTensor", "size": "pruned", "fp": "fp16"},
                               "hashes": {"SHA256": hashlib.sha256(data).hexdigest().upper(), "AutoV2": "X"},
                               "downloadUrl": f"{p.main}/api/download/models/{vid}?type=Model&format=SafeTensor"}]})
            if m := re.match(r"^/api/download/models/(\d+)$", path):
                if p.civitai_token and self.headers.get("Authorization") != f"Bearer {p.civitai_token}":
                    return self._json({"error": "Unauthorized"}, 401)
                nonce = uuid.uuid4().hex
                p.signed.add(nonce)
                loc = f"{p.storage}/signed/{nonce}/{m.group(1)}?X-Amz-Expires=3600&X-Amz-Signature={nonce}"
                return self._send(307, b"", {"Location": loc})
            if m := re.match(r"^/files/(.+)$", path):
                data = p.plain.get(m.group(1))
                if data is None:
                    return self._send(404)
                return self._content(data, {"Content-Disposition": "attachment; filename*=UTF-8''plain%20model.safetensors"})
            return self._send(404)

    return Handler


@pytest.fixture
def provider() -> Any:
    yield from serve(Provider(), make_handler)


def serve(p: Any, handler: Any) -> Any:
    """The provider's two hosts ("main": the API, "storage": the CDN/signed URLs) on local ports."""
    servers = [ThreadingHTTPServer(("127.0.0.1", 0), handler(p, role)) for role in ("main", "storage")]
    p.main, p.storage = (f"http://127.0.0.1:{s.server_address[1]}" for s in servers)
    for s in servers:
        s.daemon_threads = True
        threading.Thread(target=s.serve_forever, daemon=True).start()
    yield p
    p.release.set()
    for s in servers:
        s.shutdown()
        s.server_close()


def blob(n: int = 3 * MiB + 12345, seed: int = 0) -> bytes:
    import random

    return random.Random(seed).randbytes(n)


def settings_for(p: Provider, **kw: Any) -> DownloadSettings:
    return DownloadSettings(hf_endpoint=p.main, modelscope_endpoint=p.main, civitai_endpoint=p.main,
                            backoff=0.01, timeout=30, **kw)


def ckpts(root: Path) -> Path:
    return root / "models" / "Stable-diffusion"


# ------------------------------------------------------------------------------------------ transfers


def test_hf_download_resumes_after_a_cut_and_is_exact(provider: Provider, tmp_path: Path) -> None:
    data = blob()
    provider.hf[("org/model", "main", "sub/m.safetensors")] = data
    provider.cut_after = 2 * MiB + 100
    seen: list[Any] = []
    result = download({"source": "hf", "repo": "org/model", "file": "sub/m.safetensors"}, DataDirs.from_options(tmp_path),
                      settings_for(provider, hf_token=HF_TOKEN), progress=seen.append)
    out = ckpts(tmp_path) / "m.safetensors"
    assert out.read_bytes() == data
    assert result["sha256"] == hashlib.sha256(data).hexdigest() and result["verified"] == "sha256"
    assert not list(ckpts(tmp_path).glob("*.part*"))
    gets = provider.content_requests()
    assert gets[0]["range"] is None and gets[1]["status"] == 206
    assert gets[1]["range"] == f"bytes={2 * MiB + 100}-"  # resumed where the cut was, not from 0
    assert seen and seen[-1].done == len(data) and seen[-1].total == len(data)
    # The token goes to the Hub only; the CDN (another host) never sees it.
    assert {r["auth"] for r in provider.log if r["role"] == "main"} == {f"Bearer {HF_TOKEN}"}
    assert all(r["auth"] is None for r in provider.log if r["role"] == "storage")


def test_server_ignoring_range_restarts_cleanly(provider: Provider, tmp_path: Path) -> None:
    data = blob(seed=1)
    provider.hf[("org/model", "main", "m.safetensors")] = data
    provider.range_enabled = False
    provider.cut_after = 2 * MiB + 5
    download({"source": "hf", "repo": "org/model", "file": "m.safetensors"}, DataDirs.from_options(tmp_path),
             settings_for(provider))
    assert (ckpts(tmp_path) / "m.safetensors").read_bytes() == data
    gets = provider.content_requests()
    assert gets[1]["range"] == f"bytes={2 * MiB + 5}-" and gets[1]["status"] == 200  # asked to resume, got all


def _write_part(folder: Path, name: str, data: bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    part = folder / f"{name}.part"
    part.write_bytes(data)
    (folder / f"{name}.part.json").write_text(json.dumps({"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}))
    return part


def test_416_means_complete_and_is_verified(provider: Provider, tmp_path: Path) -> None:
    data = blob(seed=2)
    provider.hf[("org/model", "main", "m.safetensors")] = data
    _write_part(ckpts(tmp_path), "m.safetensors", data)
    result = download({"source": "hf", "repo": "org/model", "file": "m.safetensors"}, DataDirs.from_options(tmp_path),
                      settings_for(provider))
    assert [r["status"] for r in provider.content_requests()] == [416]
    assert result["resumed_from"] == len(data)
    assert (ckpts(tmp_path) / "m.safetensors").read_bytes() == data


def test_416_with_a_damaged_part_fails_the_sha256(provider: Provider, tmp_path: Path) -> None:
    data = blob(seed=3)
    provider.hf[("org/model", "main", "m.safetensors")] = data
    part = _write_part(ckpts(tmp_path), "m.safetensors", data)
    part.write_bytes(data[:100] + b"\0" + data[101:])  # same size, one byte wrong
    with pytest.raises(ChecksumError, match="sha256 mismatch"):
        download({"source": "hf", "repo": "org/model", "file": "m.safetensors"}, DataDirs.from_options(tmp_path),
                 settings_for(provider))
    assert not (ckpts(tmp_path) / "m.safetensors").exists() and not part.exists()


def test_corrupted_byte_fails_and_nothing_lands(provider: Provider, tmp_path: Path) -> None:
    data = blob(seed=4)
    provider.hf[("org/model", "main", "m.safetensors")] = data
    provider.corrupt = True
    with pytest.raises(ChecksumError, match="sha256 mismatch"):
        download({"source": "hf", "repo": "org/model", "file": "m.safetensors"}, DataDirs.from_options(tmp_path),
                 settings_for(provider))
    assert list(ckpts(tmp_path).iterdir()) == []


def test_job_sha256_must_match_the_published_one(provider: Provider, tmp_path: Path) -> None:
    provider.hf[("org/model", "main", "m.safetensors")] = blob(seed=5)
    with pytest.raises(ChecksumError, match="the job expects"):
        download({"source": "hf", "repo": "org/model", "file": "m.safetensors", "sha256": "ab" * 32},
                 DataDirs.from_options(tmp_path), settings_for(provider))
    assert provider.content_requests() == []


def test_cancel_keeps_the_part_and_a_new_download_resumes(provider: Provider, tmp_path: Path) -> None:
    data = blob(seed=6)
    provider.hf[("org/model", "main", "m.safetensors")] = data
    dirs = DataDirs.from_options(tmp_path)
    stop = threading.Event()
    provider.cut_after = None
    with pytest.raises(DownloadCanceled):
        download({"source": "hf", "repo": "org/model", "file": "m.safetensors", "kind": "lora"}, dirs,
                 settings_for(provider), progress=lambda p: stop.set(), stopped=stop.is_set)
    part = dirs.lora_dir / "m.safetensors.part"
    kept = part.stat().st_size
    assert 0 < kept < len(data)
    result = download({"source": "hf", "repo": "org/model", "file": "m.safetensors", "kind": "lora"}, dirs,
                      settings_for(provider))
    assert result["resumed_from"] == kept and provider.content_requests()[-1]["range"] == f"bytes={kept}-"
    assert (dirs.lora_dir / "m.safetensors").read_bytes() == data and not part.exists()


def test_killed_process_resumes_from_the_part_file(provider: Provider, tmp_path: Path) -> None:
    """The CLI is killed mid-transfer (no cleanup runs); a second run resumes from the part file."""
    data = blob(5 * MiB + 7, seed=7)
    provider.hf[("org/model", "main", "big.safetensors")] = data
    provider.pause_after = 3 * MiB + 10
    args = [sys.executable, "-m", "muralist.cli", "models", "download", "--source", "hf", "--repo", "org/model",
            "--file", "big.safetensors", "--hf-endpoint", provider.main, "--data-dir", str(tmp_path)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    part = ckpts(tmp_path) / "big.safetensors.part"
    try:
        deadline = time.monotonic() + 60
        while not (part.exists() and part.stat().st_size >= 2 * MiB):
            assert proc.poll() is None and time.monotonic() < deadline, "the download never got going"
            time.sleep(0.02)
    finally:
        proc.kill()
        proc.wait()
        provider.release.set()
    kept = part.stat().st_size
    assert 0 < kept < len(data)
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (ckpts(tmp_path) / "big.safetensors").read_bytes() == data
    assert provider.content_requests()[-1]["range"] == f"bytes={kept}-"
    assert provider.content_requests()[-1]["status"] == 206
    assert hashlib.sha256(data).hexdigest() in done.stdout


def test_modelscope_listing_sha256_and_fallback(provider: Provider, tmp_path: Path) -> None:
    data = blob(seed=8)
    provider.ms[("org/model", "master", "unet/m.safetensors")] = data
    # The Hub (mirror) does not have it: the fallback source does.
    result = download({"source": "hf", "repo": "org/model", "file": "unet/m.safetensors", "kind": "vae",
                       "fallback": [{"source": "modelscope", "model_id": "org/model", "file": "unet/m.safetensors"}]},
                      DataDirs.from_options(tmp_path), settings_for(provider, modelscope_token=MS_TOKEN))
    assert result["source"] == "modelscope" and result["verified"] == "sha256"
    assert (tmp_path / "models" / "VAE" / "m.safetensors").read_bytes() == data
    # The token goes to ModelScope as its own client sends it (header and cookie), never to the storage host.
    assert {(r["auth"], r["cookie"]) for r in provider.log if r["role"] == "main" and "/api/v1/models/" in r["path"]} \
        == {(f"Bearer {MS_TOKEN}", f"m_session_id={MS_TOKEN}")}
    assert {(r["auth"], r["cookie"]) for r in provider.log if r["role"] == "storage"} == {(None, None)}
    provider.corrupt = True
    with pytest.raises(ChecksumError):
        download({"source": "modelscope", "model_id": "org/model", "file": "unet/m.safetensors", "name": "again"},
                 DataDirs.from_options(tmp_path), settings_for(provider))
    assert not (ckpts(tmp_path) / "again.safetensors").exists()


def test_civitai_signed_url_is_re_resolved_and_the_token_stays_hidden(provider: Provider, tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    data = blob(seed=9)
    provider.civitai[4242] = ("tinyModel_v10.safetensors", data)
    provider.civitai_token = TOKEN
    provider.cut_after = MiB + 3  # the first signed URL is used up: the retry needs a new one
    caplog.set_level("DEBUG")
    result = download({"source": "civitai", "version_id": 4242, "kind": "checkpoint"}, DataDirs.from_options(tmp_path),
                      settings_for(provider, civitai_token=TOKEN))
    assert (ckpts(tmp_path) / "tinyModel_v10.safetensors").read_bytes() == data
    assert result["sha256"] == hashlib.sha256(data).hexdigest()
    signed = [r["path"].split("?")[0] for r in provider.content_requests()]
    assert len(signed) == 2 and signed[0] != signed[1]
    assert all(r["auth"] is None for r in provider.log if r["role"] == "storage")
    assert TOKEN not in caplog.text and TOKEN not in json.dumps(result)
    # Without the token: a clear error that names the setting, not a token.
    with pytest.raises(DownloadError, match="401.*token") as e:
        download({"source": "civitai", "version_id": 4242, "name": "other"}, DataDirs.from_options(tmp_path),
                 settings_for(provider))
    assert TOKEN not in str(e.value)


def test_plain_url_name_from_content_disposition(provider: Provider, tmp_path: Path) -> None:
    data = blob(MiB, seed=10)
    provider.plain["x.bin"] = data
    sha = hashlib.sha256(data).hexdigest()
    result = download({"source": "url", "url": f"{provider.main}/files/x.bin", "sha256": sha, "kind": "upscaler"},
                      DataDirs.from_options(tmp_path), settings_for(provider))
    assert result["file"] == "plain model.safetensors"
    assert (tmp_path / "models" / "ESRGAN" / "plain model.safetensors").read_bytes() == data


# ------------------------------------------------------------------------------------------ safety


@pytest.mark.parametrize("name", ["../evil.safetensors", "/etc/evil.safetensors", "a/b.safetensors", "a\\b.safetensors",
                                  "..", ".hidden.safetensors", "C:evil.safetensors", "ok..safetensors"])
def test_path_tricks_in_names_are_refused(name: str) -> None:
    with pytest.raises(InvalidRequestError):
        sanitize_name(name)
    with pytest.raises(InvalidRequestError, match="name"):
        parse_params({"source": "hf", "repo": "a/b", "file": "m.safetensors", "name": name})


def test_params_are_checked() -> None:
    assert sanitize_name("model v1.safetensors") == "model v1.safetensors"
    with pytest.raises(InvalidRequestError, match="not a model file"):
        sanitize_name("x.exe")
    assert parse_params({"source": "hf", "repo": "a/b", "file": "x.safetensors", "name": "mine"})["name"] == "mine.safetensors"
    for bad, msg in [({"source": "ftp"}, "source"), ({"source": "hf", "repo": "a/b"}, "file"),
                     ({"source": "hf", "repo": "../b", "file": "x.safetensors"}, "repo"),
                     ({"source": "hf", "repo": "a/b", "file": "../../x.safetensors"}, "file"),
                     ({"source": "hf", "repo": "a/b", "file": "x.safetensors", "kind": "script"}, "kind"),
                     ({"source": "civitai", "version_id": "abc"}, "version_id"),
                     ({"source": "url", "url": "file:///etc/passwd"}, "url"),
                     ({"source": "hf", "repo": "a/b", "file": "x.safetensors", "sha256": "zz"}, "sha256"),
                     ({"source": "hf", "repo": "a/b", "file": "x.safetensors", "token": "t"}, "tokens are server settings")]:
        with pytest.raises(InvalidRequestError, match=msg):
            parse_params(bad)
    assert filename_from_disposition('attachment; filename="a b.safetensors"') == "a b.safetensors"


def test_civitai_name_with_path_tricks_is_refused(provider: Provider, tmp_path: Path) -> None:
    provider.civitai[1] = ("../../evil.safetensors", blob(1000))
    with pytest.raises(InvalidRequestError, match="plain file name"):
        download({"source": "civitai", "version_id": 1}, DataDirs.from_options(tmp_path), settings_for(provider))
    assert not list(tmp_path.rglob("evil*")) and provider.content_requests() == []


def test_disk_space_and_size_cap(provider: Provider, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    provider.hf[("org/model", "main", "m.safetensors")] = blob(seed=11)
    ref = {"source": "hf", "repo": "org/model", "file": "m.safetensors"}
    with pytest.raises(DownloadError, match="size cap"):
        download(ref, DataDirs.from_options(tmp_path), settings_for(provider, max_bytes=MiB))
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=2 * MiB))
    with pytest.raises(DownloadError, match="not enough disk space"):
        download(ref, DataDirs.from_options(tmp_path), settings_for(provider))
    assert provider.content_requests() == []


def test_settings_never_show_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", "hf-mirror.com")
    monkeypatch.setenv("CIVITAI_API_TOKEN", TOKEN)
    s = DownloadSettings.from_env()
    assert s.hf_endpoint == "https://hf-mirror.com" and s.civitai_token == TOKEN
    assert TOKEN not in repr(s)
    assert TOKEN not in s.redact(f"GET https://x/y?token={TOKEN}&sig=1 failed with {TOKEN}")


# ------------------------------------------------------------------------------------------ the service


def test_download_job_end_to_end(provider: Provider, tmp_path: Path, a1111_models: Path,
                                 caplog: pytest.LogCaptureFixture) -> None:
    """Admin-only job; a cancel keeps the part and a new job resumes it; the checkpoint is listed at
    once with its hash cached; a corrupted download fails with nothing installed; no token anywhere."""
    from muralist.service.store import User
    from tests.server_util import running_server, wait_job

    caplog.set_level("DEBUG")
    data = (a1111_models / "models" / "Stable-diffusion" / "tiny-sd15.safetensors").read_bytes()
    assert len(data) > 2 * MiB
    sha = hashlib.sha256(data).hexdigest()
    provider.civitai[77] = ("tiny-civitai.safetensors", data)
    provider.civitai_token = TOKEN
    root = tmp_path / "data"
    with running_server(root, downloads=settings_for(provider, civitai_token=TOKEN)) as (url, service), \
            httpx.Client(base_url=url, timeout=30) as client:
        with pytest.raises(ForbiddenError):
            service.submit(User("bob"), "download", {"source": "civitai", "version_id": 77})
        bad = client.post("/api/v1/jobs", json={"type": "download", "params": {"source": "civitai", "version_id": 77,
                                                                                 "name": "../x.safetensors"}})
        assert bad.status_code == 422 and "plain file name" in bad.text

        provider.pause_after = MiB + 1
        provider.release.clear()
        job = client.post("/api/v1/jobs", json={"type": "download", "params": {"source": "civitai", "version_id": 77}})
        assert job.status_code == 202, job.text
        part = ckpts(root) / "tiny-civitai.safetensors.part"
        deadline = time.monotonic() + 60
        while not (part.exists() and part.stat().st_size >= MiB):
            assert time.monotonic() < deadline, client.get(f"/api/v1/jobs/{job.json()['id']}").text
            time.sleep(0.02)
        client.post(f"/api/v1/jobs/{job.json()['id']}/cancel")
        provider.release.set()
        assert wait_job(client, job.json()["id"])["status"] == "canceled"
        kept = part.stat().st_size
        assert kept >= MiB

        job2 = client.post("/api/v1/jobs", json={"type": "download", "params": {"source": "civitai", "version_id": 77}})
        view = wait_job(client, job2.json()["id"])
        assert view["status"] == "succeeded", view
        assert view["result"]["resumed_from"] == kept and view["result"]["sha256"] == sha
        assert provider.content_requests()[-1]["range"] == f"bytes={kept}-"
        out = ckpts(root) / "tiny-civitai.safetensors"
        assert out.read_bytes() == data
        listed = client.get("/sdapi/v1/sd-models").json()
        assert any(m["filename"].endswith("tiny-civitai.safetensors") and m["sha256"] == sha for m in listed), listed
        assert service.engine.registry.cache.lookup(out, "sha256") == sha

        provider.corrupt = True
        job3 = client.post("/api/v1/jobs", json={"type": "download", "params": {
            "source": "civitai", "version_id": 77, "name": "corrupt"}})
        failed = wait_job(client, job3.json()["id"])
        assert failed["status"] == "failed" and "sha256 mismatch" in failed["error"]
        assert not list(ckpts(root).glob("corrupt*"))

        provider.civitai_token = "another"  # the server refuses ours: the error must not echo it
        job4 = client.post("/api/v1/jobs", json={"type": "download", "params": {
            "source": "civitai", "version_id": 77, "name": "denied"}})
        denied = wait_job(client, job4.json()["id"])
        assert denied["status"] == "failed" and "401" in denied["error"]
        everything = json.dumps([view, failed, denied, client.get("/api/v1/jobs").json()])
        assert TOKEN not in everything and TOKEN not in caplog.text
    assert os.path.exists(out)


def test_admin_lets_a_user_download(provider: Provider, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Downloads are admins' by default; an admin's max_downloads limit lets one user download
    (that many at once), and taking it back stops them again. Merging stays with admins."""
    from muralist.cli import main
    from tests.server_util import running_server, wait_job

    data = blob(2 * MiB, seed=11)
    provider.plain["shared.safetensors"] = data
    params = {"source": "url", "url": f"{provider.main}/files/shared.safetensors", "kind": "lora",
              "name": "shared.safetensors", "sha256": hashlib.sha256(data).hexdigest()}
    root = tmp_path / "data"
    with running_server(root, downloads=settings_for(provider), allow_single_user=False) as (url, service):
        admin_key = service.store.add_user("root", admin=True)
        alice_key = service.store.add_user("alice")
        admin = httpx.Client(base_url=url, timeout=30, headers={"Authorization": f"Bearer {admin_key}"})
        alice = httpx.Client(base_url=url, timeout=30, headers={"Authorization": f"Bearer {alice_key}"})
        with admin, alice:
            refused = alice.post("/api/v1/jobs", json={"type": "download", "params": params})
            assert refused.status_code == 403 and "max_downloads" in refused.text
            assert alice.put("/api/v1/admin/users/alice/limits", json={"max_downloads": 1}).status_code == 403
            for bad in ({"max_downloads": -1}, {"max_download": 1}, {"max_downloads": "many"}, {}):
                r = admin.put("/api/v1/admin/users/alice/limits", json=bad)
                assert r.status_code == 422, (bad, r.text)
            allowed = admin.put("/api/v1/admin/users/alice/limits", json={"max_downloads": 1})
            assert allowed.status_code == 200 and allowed.json()["limits"]["max_downloads"] == 1
            assert alice.get("/api/v1/me").json()["limits"]["max_downloads"] == 1

            provider.pause_after = MiB
            provider.release.clear()
            first = alice.post("/api/v1/jobs", json={"type": "download", "params": params})
            assert first.status_code == 202, first.text
            second = alice.post("/api/v1/jobs", json={"type": "download", "params": {**params, "name": "again.safetensors"}})
            assert second.status_code == 429 and "max_downloads" in second.text
            provider.release.set()
            assert wait_job(alice, first.json()["id"])["status"] == "succeeded"
            assert (root / "models" / "Lora" / "shared.safetensors").read_bytes() == data
            merge = alice.post("/api/v1/jobs", json={"type": "merge", "params": {"primary": "x", "secondary": "y"}})
            assert merge.status_code == 403

            assert admin.put("/api/v1/admin/users/alice/limits", json={"max_downloads": None}).status_code == 200
            assert alice.post("/api/v1/jobs", json={"type": "download", "params": params}).status_code == 403
            listed = {u["name"]: u for u in admin.get("/api/v1/admin/users").json()["users"]}
            assert listed["alice"]["limits"] == {}

    # The same switch from the command line, on the server's database.
    assert main(["users", "limits", "alice", "max_downloads=2", "--data-dir", str(root)]) == 0
    assert "max_downloads=2  (set for this user)" in capsys.readouterr().out
    assert main(["users", "limits", "alice", "max_downloads=lots", "--data-dir", str(root)]) == 2
    assert "whole number" in capsys.readouterr().err
