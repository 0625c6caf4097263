"""Model downloads from Hugging Face (or a mirror), ModelScope, Civitai and plain URLs.

Every source is reduced to one ``Remote`` (a URL, the sha256 and size the source publishes, a file
name), and one transfer routine moves the bytes: a streaming GET into ``<dest>.part`` that resumes
with ``Range`` (206 appends; 200 means Range was ignored, so restart; 416 means the part is already
complete), re-resolving the source on every attempt so that signed URLs never go stale. The file is
checked against the published sha256 before it is moved into its A1111 folder, so a model folder
never holds a half-written or corrupted file.

No ``huggingface_hub``/``modelscope`` client moves the bytes: ``huggingface_hub`` 2.x deletes its
partial file on failure (no resume across restarts) and checks no sha256, and both read their
endpoint at import. The metadata each client would read (HF's ``X-Linked-Etag``, ModelScope's file
listing, Civitai's version API) is read here directly, with the endpoint of this download.

Tokens come from settings or the environment only (never from a job's params) and travel in
headers, never in URLs; every message that leaves this module is passed through ``redact``.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import queue
import re
import shutil
import ssl
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote, urljoin, urlsplit

from ..errors import InvalidRequestError, MuralistError
from ..paths import DataDirs

if TYPE_CHECKING:
    import httpx

    from .hashing import HashCache

log = logging.getLogger(__name__)

SOURCES = ("hf", "modelscope", "civitai", "url")
MODEL_EXTS = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
CHUNK = 1 << 20
PROGRESS_EVERY = 0.5  # seconds between progress reports
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_REPO = re.compile(r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)?$")
_REVISION = re.compile(r"^[A-Za-z0-9_./-]+$")
_PARAM_KEYS = {"source", "repo", "model_id", "version_id", "url", "file", "revision", "kind", "name", "sha256",
               "fallback"}
_REF_KEYS = {"source", "repo", "model_id", "version_id", "url", "file", "revision", "sha256"}


def kind_dirs(dirs: DataDirs) -> dict[str, Path]:
    """The A1111 folder of each downloadable kind (Civitai Helper's mapping of model types)."""
    models = dirs.root / "models"
    return {
        "checkpoint": dirs.ckpt_dir,
        "vae": dirs.vae_dir,
        "lora": dirs.lora_dir,
        "embedding": dirs.embeddings_dir,
        "controlnet": dirs.controlnet_dir,
        "upscaler": models / "ESRGAN",
        "hypernetwork": models / "hypernetworks",
    }


KINDS = ("checkpoint", "vae", "lora", "embedding", "controlnet", "upscaler", "hypernetwork")


class DownloadError(MuralistError):
    """A download failed (source, network, disk, size); the message says which and what to do."""


class ChecksumError(DownloadError):
    """The bytes do not match the sha256 the source publishes (or the job gave)."""


class DownloadCanceled(Exception):
    """The job was canceled; the ``.part`` file stays for a later job to resume."""


class _Retry(Exception):
    """A transient failure: try again (re-resolving the source)."""


# ------------------------------------------------------------------------------------------ settings


def _env(*names: str) -> str | None:
    for n in names:
        if v := os.environ.get(n):
            return v
    return None


@dataclass
class DownloadSettings:
    """Endpoints, tokens and limits of downloads. Tokens are never shown: see ``public()``."""

    hf_endpoint: str = "https://huggingface.co"
    modelscope_endpoint: str = "https://www.modelscope.cn"
    civitai_endpoint: str = "https://civitai.com"
    hf_token: str | None = field(default=None, repr=False)
    modelscope_token: str | None = field(default=None, repr=False)
    civitai_token: str | None = field(default=None, repr=False)
    max_bytes: int | None = 64 * 2**30  # size cap of one file; None: no cap
    timeout: float = 60.0  # seconds without a byte before an attempt is given up (and retried)
    retries: int = 5  # failed attempts in a row (no byte gained) before the download fails
    backoff: float = 0.5  # first wait between attempts; doubles, at most 10 s

    @classmethod
    def from_env(cls, **overrides: Any) -> DownloadSettings:
        """Settings from the environment (``HF_ENDPOINT``, ``MODELSCOPE_ENDPOINT``, ``CIVITAI_ENDPOINT``,
        ``HF_TOKEN``, ``MODELSCOPE_API_TOKEN``, ``CIVITAI_API_TOKEN``), then ``overrides`` that are not None."""
        s = cls()
        s.hf_endpoint = _env("HF_ENDPOINT") or s.hf_endpoint
        s.modelscope_endpoint = _env("MODELSCOPE_ENDPOINT", "MODELSCOPE_DOMAIN") or s.modelscope_endpoint
        s.civitai_endpoint = _env("CIVITAI_ENDPOINT") or s.civitai_endpoint
        s.hf_token = _env("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
        s.modelscope_token = _env("MODELSCOPE_API_TOKEN")
        s.civitai_token = _env("CIVITAI_API_TOKEN", "CIVITAI_TOKEN")
        for k, v in overrides.items():
            if v is not None:
                setattr(s, k, v)
        # A bare host ("hf-mirror.com") is what people paste.
        for name in ("hf_endpoint", "modelscope_endpoint", "civitai_endpoint"):
            value = getattr(s, name).rstrip("/")
            setattr(s, name, value if "://" in value else "https://" + value)
        return s

    def to_payload(self) -> dict[str, Any]:
        """Everything, tokens included, for the worker that runs the job (never stored, never shown)."""
        return asdict(self)

    @classmethod
    def from_payload(cls, data: dict[str, Any] | None) -> DownloadSettings:
        if not data:
            return cls.from_env()
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})

    def secrets(self) -> list[str]:
        return [t for t in (self.hf_token, self.modelscope_token, self.civitai_token) if t]

    def redact(self, text: str) -> str:
        """``text`` without any token and without URL query strings (signed URLs carry credentials too)."""
        for t in self.secrets():
            text = text.replace(t, "***")
        return re.sub(r"(https?://[^\s'\"?]+)\?[^\s'\"]*", r"\1?…", text)


# ------------------------------------------------------------------------------------------ params


def sanitize_name(name: str, what: str = "name") -> str:
    """A plain file name for a model folder; refuses anything that could leave it."""
    if not isinstance(name, str) or not name.strip():
        raise InvalidRequestError(f"{what}: a file name is required")
    name = name.strip()
    if "/" in name or "\\" in name or "\0" in name or ".." in name:
        raise InvalidRequestError(f"{what}: {name!r} must be a plain file name (no folders, '..' or separators)")
    if os.path.isabs(name) or re.match(r"^[A-Za-z]:", name) or name.startswith("."):
        raise InvalidRequestError(f"{what}: {name!r} must be a plain file name, not a path or a hidden file")
    if any(ord(c) < 32 for c in name) or len(name.encode()) > 200:
        raise InvalidRequestError(f"{what}: {name!r} has control characters or is too long")
    if not name.lower().endswith(MODEL_EXTS):
        raise InvalidRequestError(f"{what}: {name!r} is not a model file; allowed: {', '.join(MODEL_EXTS)}")
    return name


def _rel_path(value: Any, what: str) -> str:
    """A file path inside a repository (only used in URLs, but never with '..')."""
    if not isinstance(value, str) or not value.strip():
        raise InvalidRequestError(f"{what}: the file's path in the repository is required")
    p = value.strip().lstrip("/")
    if ".." in PurePosixPath(p).parts or "\\" in p or "\0" in p:
        raise InvalidRequestError(f"{what}: {value!r} must be a path inside the repository")
    return p


def _parse_ref(raw: dict[str, Any], where: str) -> dict[str, Any]:
    source = raw.get("source")
    if source not in SOURCES:
        raise InvalidRequestError(f"{where}source: {source!r} is not one of {', '.join(SOURCES)}")
    ref: dict[str, Any] = {"source": source}
    if source in ("hf", "modelscope"):
        repo = raw.get("repo") if source == "hf" else (raw.get("model_id") or raw.get("repo"))
        field_name = "repo" if source == "hf" else "model_id"
        if not isinstance(repo, str) or not _REPO.match(repo) or ".." in repo.split("/"):
            raise InvalidRequestError(f"{where}{field_name}: {repo!r} is not a repository id like 'owner/name'")
        ref[field_name] = repo
        ref["file"] = _rel_path(raw.get("file"), f"{where}file")
        rev = raw.get("revision") or ("main" if source == "hf" else "master")
        if not isinstance(rev, str) or not _REVISION.match(rev) or ".." in rev.split("/"):
            raise InvalidRequestError(f"{where}revision: {rev!r} is not a branch, tag or commit")
        ref["revision"] = rev
    elif source == "civitai":
        vid = raw.get("version_id")
        try:
            ref["version_id"] = int(vid)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise InvalidRequestError(f"{where}version_id: {vid!r} is not a Civitai model version id (a number)") from None
        if raw.get("file"):
            ref["file"] = sanitize_name(str(raw["file"]), f"{where}file")
    else:
        url = raw.get("url")
        if not isinstance(url, str) or urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).netloc:
            raise InvalidRequestError(f"{where}url: an http(s) URL is required")
        ref["url"] = url
    if raw.get("sha256") not in (None, ""):
        sha = str(raw["sha256"]).strip().lower()
        if not _SHA256.match(sha):
            raise InvalidRequestError(f"{where}sha256: {raw['sha256']!r} is not 64 hex digits")
        ref["sha256"] = sha
    return ref


def parse_params(params: dict[str, Any]) -> dict[str, Any]:
    """A download job's params, checked and normalised; raises InvalidRequestError naming the field."""
    if not isinstance(params, dict):
        raise InvalidRequestError("params: an object is required")
    unknown = set(params) - _PARAM_KEYS
    if any("token" in k.lower() or "key" in k.lower() for k in unknown):
        raise InvalidRequestError("params: tokens are server settings (HF_TOKEN, CIVITAI_API_TOKEN, "
                                  "MODELSCOPE_API_TOKEN), never part of a job")
    if unknown:
        raise InvalidRequestError(f"params: unknown field(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(_PARAM_KEYS))}")
    out = _parse_ref(params, "")
    kind = params.get("kind") or "checkpoint"
    if kind not in KINDS:
        raise InvalidRequestError(f"kind: {kind!r} is not one of {', '.join(KINDS)}")
    out["kind"] = kind
    if params.get("name"):
        out["name"] = _with_ext(str(params["name"]), out)
    elif out["source"] in ("hf", "modelscope"):
        sanitize_name(PurePosixPath(out["file"]).name, "file")  # the name it will get: refuse it now
    fallback = params.get("fallback") or []
    if not isinstance(fallback, list):
        raise InvalidRequestError("fallback: a list of other sources of the same file is required")
    out["fallback"] = []
    for i, alt in enumerate(fallback):
        if not isinstance(alt, dict) or set(alt) - _REF_KEYS:
            raise InvalidRequestError(f"fallback[{i}]: an object with {', '.join(sorted(_REF_KEYS))} is required")
        ref = _parse_ref(alt, f"fallback[{i}].")
        if "sha256" not in ref and "sha256" in out:
            ref["sha256"] = out["sha256"]
        out["fallback"].append(ref)
    return out


def _with_ext(name: str, ref: dict[str, Any]) -> str:
    """The job's ``name``, given the source file's extension when it has none of its own."""
    if not name.lower().endswith(MODEL_EXTS):
        src = ref.get("file") or urlsplit(ref.get("url", "")).path
        suffix = PurePosixPath(src).suffix.lower() if src else ""
        if suffix in MODEL_EXTS:
            name += suffix
        elif ref["source"] in ("civitai", "url"):
            # The extension comes with the file (Civitai's file name, Content-Disposition): check the rest now.
            sanitize_name(name + ".safetensors")
            return name.strip()
    return sanitize_name(name)


def describe(ref: dict[str, Any]) -> str:
    """A short, token-free label of a reference, for messages."""
    s = ref["source"]
    if s == "hf":
        return f"hf:{ref['repo']}/{ref['file']}@{ref['revision']}"
    if s == "modelscope":
        return f"modelscope:{ref['model_id']}/{ref['file']}@{ref['revision']}"
    if s == "civitai":
        return f"civitai:{ref['version_id']}" + (f"/{ref['file']}" if ref.get("file") else "")
    u = urlsplit(ref["url"])
    return f"{u.scheme}://{u.netloc}{u.path}"


# ------------------------------------------------------------------------------------------ resolving


@dataclass
class Remote:
    """Where the bytes are and what they must be."""

    url: str
    name: str  # the file name the source gives it
    sha256: str | None = None
    size: int | None = None  # exact size, when the source publishes one
    approx_size: int | None = None  # for the disk check and progress only (Civitai's sizeKB)
    headers: dict[str, str] = field(default_factory=dict, repr=False)  # auth (header, cookie) for the first host only


def _bearer(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def _http_error(code: int, what: str, hint: str = "") -> Exception:
    if code in (408, 425, 429) or code >= 500:
        return _Retry(f"{what}: HTTP {code}")
    if code in (401, 403) and not hint:
        hint = " (a private or gated file: set the source's token in the server's settings)"
    return DownloadError(f"{what}: HTTP {code}{hint}")


def _etag_sha(value: str | None) -> str | None:
    if not value:
        return None
    v = value.strip()
    if v.startswith("W/"):
        v = v[2:]
    v = v.strip('"').lower()
    return v if _SHA256.match(v) else None


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _resolve_hf(ref: dict[str, Any], s: DownloadSettings, client: httpx.Client) -> Remote:
    url = (f"{s.hf_endpoint}/{quote(ref['repo'], safe='/')}/resolve/{quote(ref['revision'], safe='')}/"
           f"{quote(ref['file'], safe='/')}")
    headers = _bearer(s.hf_token)
    # The Hub answers HEAD on /resolve/ with a redirect to its CDN carrying the LFS metadata
    # (X-Linked-Etag = sha256, X-Linked-Size); only relative redirects (a renamed repo) are followed.
    r = client.head(url, headers=headers, follow_redirects=False)
    for _ in range(5):
        loc = r.headers.get("location")
        if not (r.is_redirect and loc and not urlsplit(loc).netloc):
            break
        r = client.head(urljoin(str(r.url), loc), headers=headers, follow_redirects=False)
    if r.status_code >= 400:
        hint = " (no such repository, revision or file)" if r.status_code == 404 else ""
        raise _http_error(r.status_code, f"{describe(ref)}", hint)
    sha = _etag_sha(r.headers.get("x-linked-etag")) or _etag_sha(r.headers.get("etag"))
    size = _int(r.headers.get("x-linked-size")) or (None if r.is_redirect else _int(r.headers.get("content-length")))
    return Remote(url, PurePosixPath(ref["file"]).name, sha, size, headers=headers)


def _resolve_modelscope(ref: dict[str, Any], s: DownloadSettings, client: httpx.Client) -> Remote:
    base = f"{s.modelscope_endpoint}/api/v1/models/{quote(ref['model_id'], safe='/')}/repo"
    headers = _bearer(s.modelscope_token)
    if s.modelscope_token:
        # ModelScope's own client (modelscope_hub) sends the token both ways on /api/v1/: older routes
        # read the m_session_id cookie, newer ones the bearer header.
        headers["Cookie"] = f"m_session_id={s.modelscope_token}"
    folder = str(PurePosixPath(ref["file"]).parent)
    # The recursive listing is capped by the server; a file in a folder is looked up in that folder too.
    queries = [{"Revision": ref["revision"], "Recursive": "True"}]
    if folder != ".":
        queries.append({"Revision": ref["revision"], "Root": folder})
    entry = None
    for q in queries:
        r = client.get(base + "/files", params=q, headers=headers)
        if r.status_code >= 400:
            raise _http_error(r.status_code, f"{describe(ref)} (file listing)", " (no such model or revision)" if r.status_code == 404 else "")
        try:
            files = r.json()["Data"]["Files"] or []
        except (ValueError, KeyError, TypeError):
            raise DownloadError(f"{describe(ref)}: the file listing is not ModelScope's JSON") from None
        entry = next((f for f in files if f.get("Path") == ref["file"] and f.get("Type") != "tree"), None)
        if entry is not None:
            break
    if entry is None:
        raise DownloadError(f"{describe(ref)}: no such file in the model's listing")
    sha = str(entry.get("Sha256") or "").lower() or None
    url = f"{base}?Revision={quote(ref['revision'], safe='')}&FilePath={quote(ref['file'], safe='')}"
    return Remote(url, PurePosixPath(ref["file"]).name, sha, _int(entry.get("Size")), headers=headers)


def _resolve_civitai(ref: dict[str, Any], s: DownloadSettings, client: httpx.Client) -> Remote:
    headers = _bearer(s.civitai_token)
    r = client.get(f"{s.civitai_endpoint}/api/v1/model-versions/{ref['version_id']}", headers=headers)
    if r.status_code >= 400:
        raise _http_error(r.status_code, describe(ref), " (no such model version)" if r.status_code == 404 else "")
    try:
        info = r.json()
        files = list(info.get("files") or [])
    except (ValueError, AttributeError):
        raise DownloadError(f"{describe(ref)}: the version info is not Civitai's JSON") from None
    if ref.get("file"):
        chosen = next((f for f in files if f.get("name") == ref["file"]), None)
        if chosen is None:
            names = ", ".join(str(f.get("name")) for f in files)
            raise DownloadError(f"{describe(ref)}: the version has no file {ref['file']!r}; it has: {names}")
    else:
        chosen = (next((f for f in files if f.get("primary")), None)
                  or next((f for f in files if f.get("type") == "Model"), None) or (files[0] if files else None))
    if chosen is None:
        raise DownloadError(f"{describe(ref)}: the version lists no files")
    sha = str((chosen.get("hashes") or {}).get("SHA256") or "").lower() or None
    url = chosen.get("downloadUrl") or info.get("downloadUrl") or f"{s.civitai_endpoint}/api/download/models/{ref['version_id']}"
    kb = chosen.get("sizeKB")
    approx = int(float(kb) * 1024) if isinstance(kb, int | float) else None
    name = sanitize_name(str(chosen.get("name") or ""), "the file name Civitai gives")
    return Remote(url, name, sha, None, approx, headers=headers)


_CD_STAR = re.compile(r"filename\*\s*=\s*([^']*)'[^']*'([^;]+)", re.I)
_CD_PLAIN = re.compile(r'filename\s*=\s*"?([^";]+)"?', re.I)


def filename_from_disposition(value: str | None) -> str | None:
    """The file name of a Content-Disposition header (RFC 6266 ``filename*`` preferred)."""
    if not value:
        return None
    if m := _CD_STAR.search(value):
        return unquote(m.group(2).strip(), encoding=m.group(1) or "utf-8")
    if m := _CD_PLAIN.search(value):
        return m.group(1).strip()
    return None


def _resolve_url(ref: dict[str, Any], s: DownloadSettings, client: httpx.Client) -> Remote:
    name = None
    size = None
    try:
        r = client.head(ref["url"], follow_redirects=True)
        if r.status_code < 400:
            name = filename_from_disposition(r.headers.get("content-disposition"))
            size = _int(r.headers.get("content-length")) if "content-encoding" not in r.headers else None
    except Exception as e:  # noqa: BLE001 - servers that refuse HEAD still serve GET
        log.debug("HEAD %s failed: %s", describe(ref), e)
    name = name or unquote(PurePosixPath(urlsplit(ref["url"]).path).name)
    return Remote(ref["url"], name, None, None, size)


_RESOLVERS = {"hf": _resolve_hf, "modelscope": _resolve_modelscope, "civitai": _resolve_civitai, "url": _resolve_url}


def resolve(ref: dict[str, Any], settings: DownloadSettings, client: httpx.Client) -> Remote:
    """What a (parsed) reference points at: URL, published sha256 and size, file name."""
    import httpx

    try:
        remote = _RESOLVERS[ref["source"]](ref, settings, client)
    except httpx.HTTPError as e:
        raise _Retry(f"{describe(ref)}: {type(e).__name__}") from None
    given = ref.get("sha256")
    if given and remote.sha256 and given != remote.sha256:
        raise ChecksumError(f"{describe(ref)}: sha256 mismatch: the job expects {given}, the source publishes "
                            f"{remote.sha256}; nothing was downloaded")
    remote.sha256 = given or remote.sha256
    return remote


# ------------------------------------------------------------------------------------------ transfer


@dataclass
class DownloadProgress:
    done: int  # bytes on disk
    total: int | None
    speed: float  # bytes per second over this attempt
    eta: float | None  # seconds

    @property
    def fraction(self) -> float:
        return min(1.0, self.done / self.total) if self.total else 0.0


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """(start, total) of ``bytes a-b/total`` or ``bytes */total``."""
    m = re.match(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)", value or "")
    if not m:
        return None, None
    return (int(m.group(1)) if m.group(1) else None), (int(m.group(2)) if m.group(2) != "*" else None)


def _hash_file(path: Path, h: Any, stopped: Callable[[], bool]) -> None:
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
            if stopped():
                raise DownloadCanceled()


def _meta_path(part: Path) -> Path:
    return part.with_name(part.name + ".json")


def _check_space(folder: Path, need: int, name: str) -> None:
    free = shutil.disk_usage(folder).free
    margin = 64 * 2**20  # leave room for the hash cache, logs and the database
    if need + margin > free:
        raise DownloadError(f"not enough disk space for {name}: {need / 2**30:.2f} GiB still to download, "
                            f"{free / 2**30:.2f} GiB free in {folder}")


def transfer(get_remote: Callable[[], Remote], part: Path, settings: DownloadSettings, client: httpx.Client,
             label: str, progress: Callable[[DownloadProgress], None] | None = None,
             stopped: Callable[[], bool] = lambda: False) -> tuple[str, int, int]:
    """Fetch into ``part`` (resuming what it holds) and verify it; returns (sha256, size, resumed_from).

    ``get_remote`` is called before every attempt (signed URLs expire). Raises DownloadCanceled when
    ``stopped()`` (the part stays), ChecksumError on a mismatch (the part is deleted: its bytes are
    wrong somewhere), DownloadError for anything a retry cannot fix.
    """
    import httpx

    meta_path = _meta_path(part)
    failures, resumed_from, last_error = 0, -1, ""
    while True:
        if stopped():
            raise DownloadCanceled()
        offset = part.stat().st_size if part.exists() else 0
        try:
            remote = get_remote()
            identity = {"sha256": remote.sha256, "size": remote.size}
            offset = part.stat().st_size if part.exists() else 0
            if offset:
                try:
                    same = json.loads(meta_path.read_text()) == identity
                except (OSError, ValueError):
                    same = False
                if not same or (remote.size is not None and offset > remote.size):
                    log.info("%s: the partial file is of other content; starting over", label)
                    part.unlink()
                    offset = 0
            if not offset:
                meta_path.write_text(json.dumps(identity))
            total = remote.size or remote.approx_size
            if total and settings.max_bytes and total > settings.max_bytes:
                raise DownloadError(f"{label}: {total / 2**30:.2f} GiB is over the download size cap of "
                                    f"{settings.max_bytes / 2**30:.2f} GiB (setting max_bytes / --max-download-gb)")
            if total:
                _check_space(part.parent, max(0, total - offset), label)
            if resumed_from < 0:
                resumed_from = offset
            hasher = [hashlib.sha256()]  # a list: _fetch replaces it when the server restarts from 0
            if offset:
                _hash_file(part, hasher[0], stopped)
            got = _fetch(remote, part, offset, hasher, settings, client, label, progress, stopped)
            if got is None:  # the server ignored Range or the part was stale: start again at once
                continue
            size = part.stat().st_size
            if remote.size is not None and size != remote.size:
                raise _Retry(f"{label}: got {size} bytes, the source says {remote.size}")
            sha = hasher[0].hexdigest()
            if remote.sha256 and sha != remote.sha256:
                part.unlink(missing_ok=True)
                meta_path.unlink(missing_ok=True)
                raise ChecksumError(f"{label}: sha256 mismatch: the source publishes {remote.sha256}, the download is "
                                    f"{sha}; the partial file was deleted, nothing was installed")
            return sha, size, max(0, resumed_from)
        except _Retry as e:
            last_error = str(e)
        except httpx.TransportError as e:
            last_error = f"{label}: {type(e).__name__} (connection lost or timed out)"
        except OSError as e:
            raise DownloadError(f"{label}: cannot write {part}: {e.strerror or e}") from None
        now = part.stat().st_size if part.exists() else 0
        failures = 0 if now > offset else failures + 1  # only attempts that gained nothing count
        if failures > settings.retries:
            raise DownloadError(settings.redact(f"{last_error}; gave up after {failures} attempts "
                                                f"({now} bytes kept in {part.name}, a new job resumes from there)"))
        log.warning("%s; retrying", settings.redact(last_error))
        deadline = time.monotonic() + min(10.0, settings.backoff * 2 ** max(0, failures - 1))
        while time.monotonic() < deadline:
            if stopped():
                raise DownloadCanceled()
            time.sleep(0.05)


_SSL: ssl.SSLContext | None = None


def ssl_context() -> ssl.SSLContext:
    """One verifying context per process: building one reads the CA bundle (30-70 ms a time)."""
    global _SSL
    if _SSL is None:
        _SSL = ssl.create_default_context()
    return _SSL


def http_client(settings: DownloadSettings, headers: dict[str, str] | None = None) -> httpx.Client:
    """The HTTP client of downloads and model cards: the settings' timeout (connecting within 30 s at
    most) and the shared verifying SSL context."""
    import httpx

    return httpx.Client(timeout=httpx.Timeout(settings.timeout, connect=min(30.0, settings.timeout)),
                        verify=ssl_context(), headers=headers)


class _Origin:
    """Connections for the byte transfer: ``http.client`` (``readinto`` into reused buffers, about 2.5x
    httpx's streaming rate), redirects followed by hand so ``Authorization`` never reaches another host,
    and the environment's proxies (``https_proxy``, ``no_proxy``) honoured as httpx would."""

    @staticmethod
    def connect(url: str, timeout: float) -> tuple[http.client.HTTPConnection, str]:
        """A connection for ``url`` and the request target to send on it."""
        u = urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise DownloadError(f"cannot download from {u.scheme}://{u.netloc}{u.path}: not an http(s) URL")
        target = (u.path or "/") + (f"?{u.query}" if u.query else "")
        proxy = urllib.request.getproxies().get(u.scheme)
        if proxy and not urllib.request.proxy_bypass(u.hostname):
            pu = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
            if u.scheme == "https":
                conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                    pu.hostname or "", pu.port or 8080, timeout=timeout, context=ssl_context())
                conn.set_tunnel(u.hostname, u.port or 443)
                return conn, target
            return http.client.HTTPConnection(pu.hostname or "", pu.port or 8080, timeout=timeout), url
        if u.scheme == "https":
            return http.client.HTTPSConnection(u.hostname, u.port, timeout=timeout,
                                               context=ssl_context()), target
        return http.client.HTTPConnection(u.hostname, u.port, timeout=timeout), target

    @classmethod
    def get(cls, url: str, headers: dict[str, str],
            timeout: float) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse, bool]:
        """GET ``url`` following redirects; returns (connection, response, whether it was redirected)."""
        redirected = False
        for _ in range(10):
            conn, target = cls.connect(url, timeout)
            conn.request("GET", target, headers=headers)
            resp = conn.getresponse()
            loc = resp.getheader("Location")
            if resp.status not in (301, 302, 303, 307, 308) or not loc:
                return conn, resp, redirected
            resp.read()
            conn.close()
            new = urljoin(url, loc)
            a, b = urlsplit(url), urlsplit(new)
            if (a.scheme, a.hostname, a.port) != (b.scheme, b.hostname, b.port):
                # Another host (a CDN, a signed storage URL) must not get the source's token.
                headers = {k: v for k, v in headers.items() if k.lower() not in ("authorization", "cookie")}
            url, redirected = new, True
        raise DownloadError("too many redirects")


_NET_ERRORS = (OSError, http.client.HTTPException)  # socket errors, timeouts, resets, IncompleteRead


def _fetch(remote: Remote, part: Path, offset: int, hasher: list[Any], settings: DownloadSettings, client: httpx.Client,
           label: str, progress: Callable[[DownloadProgress], None] | None,
           stopped: Callable[[], bool]) -> int | None:
    """One GET; appends to ``part``. Returns the bytes written, or None when the caller must start over."""
    # identity: the sha256 is of the file's bytes, not of a compressed stream.
    headers = {**remote.headers, "Accept-Encoding": "identity", "User-Agent": "muralist"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    total = remote.size or remote.approx_size
    try:
        conn, r, redirected = _Origin.get(remote.url, headers, settings.timeout)
    except _NET_ERRORS as e:
        raise _Retry(f"{label}: {type(e).__name__} (cannot connect)") from None
    try:
        status = r.status
        if status == 416 and offset:
            _start, whole = _content_range(r.getheader("Content-Range"))
            if whole == offset or (whole is None and remote.size == offset):
                return 0  # the part is already complete: verify it
            part.unlink()
            return None
        if status >= 400:
            # A signed URL that expired answers 403 after the redirect: re-resolve and try again.
            if status == 403 and redirected:
                raise _Retry(f"{label}: HTTP 403 from the storage host (signed URL expired?)")
            raise _http_error(status, label)
        if status == 206:
            start, whole = _content_range(r.getheader("Content-Range"))
            if start != offset:
                log.warning("%s: the server resumed at %s, not %d; starting over", label, start, offset)
                part.unlink()
                return None
            total = whole or total
            mode = "ab"
        else:  # 200: the whole file, whatever we asked for
            if offset:
                log.info("%s: the server ignored Range; restarting from 0", label)
                hasher[0] = hashlib.sha256()
            offset = 0
            mode = "wb"
            total = remote.size or _int(r.getheader("Content-Length")) or total
        if total and settings.max_bytes and total > settings.max_bytes:
            raise DownloadError(f"{label}: {total / 2**30:.2f} GiB is over the download size cap of "
                                f"{settings.max_bytes / 2**30:.2f} GiB")
        if total and mode == "wb":
            _check_space(part.parent, total, label)
        with open(part, mode, buffering=0) as f, _Pipeline(f, hasher[0]) as pipe:
            done = _copy(r, pipe, offset, total, remote, settings, label, progress, stopped)
        return done - offset
    finally:
        conn.close()


class _Pipeline:
    """The file write in the receiving thread, the sha256 in a thread of its own fed the buffers the
    receiver filled: socket reads, file writes and hashlib all release the GIL, so the hash overlaps
    the transfer instead of adding to it. One helper thread, not two: on a busy machine each extra
    thread costs GIL hand-offs and context switches (bench/models.py download reports the CPU time).
    A buffer is written before it is queued for the hash, and on exit everything queued is hashed,
    so the part file and the hash cover the same bytes."""

    def __init__(self, f: Any, h: Any, buffers: int = 4) -> None:
        self.f, self.h = f, h
        self.free: queue.Queue[bytearray] = queue.Queue()
        self._unmade = buffers  # allocated on demand: a small file zero-fills one buffer, not all
        self.error: BaseException | None = None
        self._queue: queue.Queue[tuple[bytearray, int] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._hash, daemon=True, name="muralist-download-sha256")

    def _hash(self) -> None:
        while (item := self._queue.get()) is not None:
            buf, n = item
            try:
                if self.error is None:
                    self.h.update(memoryview(buf)[:n])
            except BaseException as e:  # noqa: BLE001 - handed to the receiving thread
                self.error = e
            self.free.put(buf)

    def put(self, buf: bytearray, n: int) -> None:
        view = memoryview(buf)[:n]
        while view:  # an unbuffered write may be short (a signal, a nearly full disk)
            view = view[self.f.write(view):]
        self._queue.put((buf, n))

    def take(self) -> bytearray:
        if self.error is not None:
            raise self.error
        try:
            return self.free.get_nowait()
        except queue.Empty:
            if self._unmade:
                self._unmade -= 1
                return bytearray(CHUNK)
        buf = self.free.get()  # the hash is behind: wait for it (bounded memory)
        if self.error is not None:
            raise self.error
        return buf

    def __enter__(self) -> _Pipeline:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._queue.put(None)
        self._thread.join()
        if self.error is not None and exc[0] is None:
            raise self.error


def _copy(r: http.client.HTTPResponse, pipe: _Pipeline, offset: int, total: int | None, remote: Remote,
          settings: DownloadSettings, label: str, progress: Callable[[DownloadProgress], None] | None,
          stopped: Callable[[], bool]) -> int:
    done, t0, last = offset, time.monotonic(), 0.0
    while True:
        buf = pipe.take()
        view, n = memoryview(buf), 0
        try:
            while n < CHUNK and (k := r.readinto(view[n:])):  # fill the buffer: fewer, larger writes
                n += k
        except _NET_ERRORS as e:
            if n:
                pipe.put(buf, n)
            raise _Retry(f"{label}: {type(e).__name__} after {done + n} bytes (connection lost or timed out)") from None
        if not n:
            pipe.free.put(buf)
            if r.length:  # http.client reports a body cut short as a plain end of data
                raise _Retry(f"{label}: the connection closed after {done} bytes, {r.length} short")
            break
        pipe.put(buf, n)
        done += n
        if settings.max_bytes and done > settings.max_bytes:
            raise DownloadError(f"{label}: the server sent more than the download size cap of "
                                f"{settings.max_bytes / 2**30:.2f} GiB")
        if remote.size is not None and done > remote.size:
            raise _Retry(f"{label}: the server sent more than the {remote.size} bytes the source publishes")
        if stopped():
            raise DownloadCanceled()
        now = time.monotonic()
        if progress is not None and now - last >= PROGRESS_EVERY:
            last = now
            speed = (done - offset) / max(now - t0, 1e-6)
            eta = (total - done) / speed if total and speed > 0 and total >= done else None
            progress(DownloadProgress(done, total, speed, eta))
    if progress is not None:
        speed = (done - offset) / max(time.monotonic() - t0, 1e-6)
        progress(DownloadProgress(done, total or done, speed, 0.0))
    return done


# ------------------------------------------------------------------------------------------ the job


def _relative(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path)


def download(params: dict[str, Any], dirs: DataDirs, settings: DownloadSettings | None = None,
             progress: Callable[[DownloadProgress], None] | None = None, stopped: Callable[[], bool] = lambda: False,
             cache: HashCache | None = None, client: httpx.Client | None = None) -> dict[str, Any]:
    """Run a download job's ``params`` (see ``parse_params``) into its A1111 folder; returns the result.

    Sources are tried in order (the reference, then ``fallback``); each resumes the same ``.part`` file
    when the content it publishes is the same. ``cache`` (the registry's hash cache) gets the sha256.
    """
    settings = settings or DownloadSettings.from_env()
    p = parse_params(params)
    folder = kind_dirs(dirs)[p["kind"]]
    folder.mkdir(parents=True, exist_ok=True)
    own = client is None
    if client is None:
        client = http_client(settings)
    errors: list[str] = []
    try:
        for ref in [{k: v for k, v in p.items() if k in _REF_KEYS}, *p["fallback"]]:
            label = describe(ref)
            try:
                return _one(ref, p, folder, dirs, settings, client, label, progress, stopped, cache)
            except DownloadError as e:
                errors.append(settings.redact(str(e)))
                if len(p["fallback"]) and ref is not p["fallback"][-1]:
                    log.warning("%s; trying the next source", errors[-1])
    finally:
        if own:
            client.close()
    raise (ChecksumError if all("sha256 mismatch" in e for e in errors) else DownloadError)(" | ".join(errors))


def _one(ref: dict[str, Any], p: dict[str, Any], folder: Path, dirs: DataDirs, settings: DownloadSettings,
         client: httpx.Client, label: str, progress: Callable[[DownloadProgress], None] | None,
         stopped: Callable[[], bool], cache: HashCache | None) -> dict[str, Any]:
    pending: list[Remote] = []

    def get_remote() -> Remote:
        # The first attempt uses the answer just resolved; every later one asks again (signed URLs expire).
        return pending.pop() if pending else resolve(ref, settings, client)

    try:
        remote = get_remote()
    except _Retry as e:  # the source is down: the next source, or a clear failure
        raise DownloadError(settings.redact(str(e))) from None
    name = p.get("name")
    if name and not name.lower().endswith(MODEL_EXTS):
        name = sanitize_name(name + PurePosixPath(remote.name).suffix.lower())
    name = name or sanitize_name(remote.name, f"the file name {ref['source']} gives")
    dest = folder / name
    if dest.resolve().parent != folder.resolve():  # belt and braces: sanitize_name already refuses this
        raise InvalidRequestError(f"name: {name!r} would leave {folder}")
    warnings: list[str] = []
    if dest.exists():
        from .hashing import sha256_file

        have = cache.sha256(dest) if cache else sha256_file(dest)
        if remote.sha256 and have == remote.sha256:
            return {"file": name, "kind": p["kind"], "path": _relative(dest, dirs.root), "sha256": have,
                    "size": dest.stat().st_size, "source": ref["source"], "resumed_from": 0,
                    "verified": "sha256", "warnings": [f"{name} was already installed with this sha256"]}
        raise DownloadError(f"{dest.name} already exists in {folder} with other content; give another name")
    if not remote.sha256:
        warnings.append(f"{label} publishes no sha256: only the size was checked (pass sha256 to verify)")
    part = dest.with_name(dest.name + ".part")
    pending.append(remote)
    sha, size, resumed = transfer(get_remote, part, settings, client, label, progress, stopped)
    os.replace(part, dest)
    _meta_path(part).unlink(missing_ok=True)
    if cache is not None:
        cache.get(dest, "sha256", lambda: sha)  # computed while downloading; saves a rescan reading it again
    log.info("downloaded %s (%d bytes, sha256 %s) into %s", label, size, sha, folder)
    return {"file": name, "kind": p["kind"], "path": _relative(dest, dirs.root), "sha256": sha, "size": size,
            "source": ref["source"], "resumed_from": resumed,
            "verified": "sha256" if remote.sha256 else ("size" if remote.size else "none"), "warnings": warnings}
