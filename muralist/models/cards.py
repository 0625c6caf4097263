"""Model cards: what the Civitai Helper extension gives A1111 users, as A1111's own sidecar files.

A local model file is looked up on Civitai by its sha256 (``/api/v1/model-versions/by-hash/``) and
three files are written next to it, named after its stem as A1111 expects:

- ``<stem>.civitai.info``: the JSON Civitai returned (Civitai Helper's file);
- ``<stem>.json``: A1111's user metadata (``description``, ``sd version``, ``activation text``,
  ``preferred weight``, ``notes``), merged into an existing file so a user's edits win;
- ``<stem>.preview.png``: the version's first image, shrunk, as A1111's card preview.

The Civitai endpoint and token are the download settings' (``DownloadSettings``); the token is sent
to the Civitai API only, never to the image host, and never appears in a result or a message.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from ..errors import InvalidRequestError, MuralistError, NotFoundError
from ..paths import write_atomic
from .download import KINDS, MODEL_EXTS, DownloadSettings, _bearer, http_client, kind_dirs

if TYPE_CHECKING:
    import httpx

log = logging.getLogger(__name__)

PREVIEW_SIZE = 512  # longest side of a stored preview: A1111's cards are ~300 px wide
MAX_IMAGE_BYTES = 32 * 2**20  # an "image" bigger than this is not a preview (Civitai also hosts videos)
NOT_FOUND = "not found on Civitai"
_PARAM_KEYS = {"kind", "name", "all", "refresh"}


class CardError(MuralistError):
    """Civitai could not be asked (network, HTTP error, bad JSON); the message is token-free."""


class CardsCanceled(Exception):
    """The job was canceled between two models; the cards written so far stay."""


def sidecar(path: Path, suffix: str) -> Path:
    """``<stem><suffix>`` beside ``path`` (A1111 strips only the last extension)."""
    return path.with_name(path.name.rsplit(".", 1)[0] + suffix)


# ------------------------------------------------------------------------------------------ reading


_card_cache: dict[str, tuple[tuple[int, int], dict[str, Any]]] = {}


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return 0


def _load_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def read_card(path: Path) -> dict[str, Any]:
    """The card of a model file for listings: ``activation_text``, ``base_model``, ``preferred_weight``
    and (when there is one) ``description``; the user's ``.json`` wins over ``.civitai.info``."""
    info_path, user_path = sidecar(path, ".civitai.info"), sidecar(path, ".json")
    stamp = (_mtime(info_path), _mtime(user_path))
    key = str(path)
    if (hit := _card_cache.get(key)) and hit[0] == stamp:  # listings are polled: don't reparse unchanged files
        return dict(hit[1])
    info = _load_json(info_path) if stamp[0] else {}
    user = _load_json(user_path) if stamp[1] else {}
    words = info.get("trainedWords") or []
    activation = user.get("activation text") or ", ".join(str(w) for w in words if w) or None
    sd_version = user.get("sd version")
    base = info.get("baseModel") or (sd_version if sd_version and sd_version != "Unknown" else None)
    card: dict[str, Any] = {"activation_text": activation, "base_model": base}
    try:
        weight = float(user.get("preferred weight") or 0)
    except (TypeError, ValueError):
        weight = 0.0
    card["preferred_weight"] = weight or None  # A1111: 0 means "the default multiplier"
    description = user.get("description") or info.get("description") or (info.get("model") or {}).get("description")
    if description:
        card["description"] = str(description)
    _card_cache[key] = (stamp, card)
    return dict(card)


# ------------------------------------------------------------------------------------------ Civitai


def sd_version(base_model: str | None) -> str:
    """A1111's "sd version" user-metadata value for a Civitai ``baseModel``."""
    b = (base_model or "").lower()
    if b.startswith("sd 1"):
        return "SD1"
    if b.startswith("sd 2"):
        return "SD2"
    if "xl" in b or b.startswith(("pony", "illustrious", "noobai")):
        return "SDXL"
    return "Unknown"


def lookup(sha256: str, settings: DownloadSettings, client: httpx.Client) -> dict[str, Any] | None:
    """Civitai's version info for a file's sha256, or None when Civitai does not know it (404)."""
    import httpx

    url = f"{settings.civitai_endpoint}/api/v1/model-versions/by-hash/{sha256.upper()}"
    try:
        r = client.get(url, headers=_bearer(settings.civitai_token))
    except httpx.HTTPError as e:
        raise CardError(settings.redact(f"Civitai by-hash lookup: {type(e).__name__} (network)")) from None
    if r.status_code == 404:
        return None
    if r.status_code >= 400:
        hint = " (set CIVITAI_API_TOKEN for models that need a login)" if r.status_code in (401, 403) else ""
        raise CardError(f"Civitai by-hash lookup: HTTP {r.status_code}{hint}")
    try:
        data = r.json()
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise CardError("Civitai by-hash lookup: the answer is not Civitai's JSON")
    return data


def _first_image_url(info: dict[str, Any]) -> str | None:
    for img in info.get("images") or []:
        if isinstance(img, dict) and img.get("url") and img.get("type", "image") == "image":
            return str(img["url"])
    return None


def fetch_preview(url: str, dest: Path, client: httpx.Client) -> None:
    """Download an image (no credentials: it is on Civitai's public image host) and store it as a
    small PNG at ``dest``."""
    from PIL import Image

    if urlsplit(url).scheme not in ("http", "https"):
        raise CardError("preview: not an http(s) image URL")
    data = bytearray()
    with client.stream("GET", url, follow_redirects=True) as r:
        if r.status_code >= 400:
            raise CardError(f"preview image: HTTP {r.status_code}")
        for chunk in r.iter_bytes():
            data += chunk
            if len(data) > MAX_IMAGE_BYTES:
                raise CardError("preview image: over 32 MiB, not stored")
    try:
        with Image.open(io.BytesIO(bytes(data))) as im:
            im.seek(0)  # the first frame of an animated image
            im.thumbnail((PREVIEW_SIZE, PREVIEW_SIZE))
            out = im.convert("RGBA" if im.mode in ("RGBA", "LA", "P") else "RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise CardError(f"preview image: not a readable image ({type(e).__name__})") from None
    buf = io.BytesIO()
    out.save(buf, "PNG", optimize=True)
    write_atomic(dest, buf.getvalue())


def merge_user_metadata(existing: dict[str, Any], info: dict[str, Any]) -> dict[str, Any]:
    """A1111's ``<stem>.json`` filled from Civitai: only fields the user left empty are set, every
    other key (``notes``, a chosen weight, an edited description) is kept as it is."""
    words = [str(w).strip() for w in info.get("trainedWords") or [] if str(w).strip()]
    fresh: dict[str, Any] = {
        "description": info.get("description") or (info.get("model") or {}).get("description") or "",
        "sd version": sd_version(info.get("baseModel")),
        "activation text": ", ".join(words),
        "preferred weight": 0,
        "notes": "",
    }
    out = dict(existing)
    for k, v in fresh.items():
        if out.get(k) in (None, "", "Unknown") or (k == "preferred weight" and k not in out):
            out[k] = v
    return out


def write_card(path: Path, info: dict[str, Any], client: httpx.Client, refresh: bool = False) -> list[str]:
    """The three sidecars of ``path`` from Civitai's ``info``; returns warnings (a missing preview).
    A preview already there (perhaps the user's own) is replaced only with ``refresh``."""
    write_atomic(sidecar(path, ".civitai.info"), json.dumps(info, indent=4, ensure_ascii=False).encode())
    user_path = sidecar(path, ".json")
    user = _load_json(user_path) if user_path.exists() else {}
    write_atomic(user_path, json.dumps(merge_user_metadata(user, info), indent=4, ensure_ascii=False).encode())
    warnings: list[str] = []
    url = _first_image_url(info)
    preview = sidecar(path, ".preview.png")
    if url is None:
        if not preview.exists():
            warnings.append(f"{path.name}: Civitai lists no preview image")
    elif refresh or not preview.exists():
        import httpx

        try:
            fetch_preview(url, preview, client)
        except (CardError, httpx.HTTPError, OSError) as e:
            msg = str(e) if isinstance(e, CardError) else type(e).__name__
            warnings.append(f"{path.name}: no preview stored: {msg}")
    return warnings


# ------------------------------------------------------------------------------------------ the job


def parse_params(params: dict[str, Any]) -> dict[str, Any]:
    """A ``model_info`` job's params: ``{"kind", "name"}`` or ``{"all": true}``, optional ``refresh``."""
    if not isinstance(params, dict):
        raise InvalidRequestError("params: an object is required")
    unknown = set(params) - _PARAM_KEYS
    if unknown:
        raise InvalidRequestError(f"params: unknown field(s) {', '.join(sorted(unknown))}; "
                                  f"known: {', '.join(sorted(_PARAM_KEYS))}")
    out: dict[str, Any] = {"refresh": bool(params.get("refresh", False))}
    if params.get("all"):
        if params.get("name"):
            raise InvalidRequestError("all: give either all=true or kind and name, not both")
        out["all"] = True
        return out
    kind = params.get("kind") or "checkpoint"
    if kind not in KINDS:
        raise InvalidRequestError(f"kind: {kind!r} is not one of {', '.join(KINDS)}")
    name = params.get("name")
    if not isinstance(name, str) or not name.strip():
        raise InvalidRequestError("name: the model's name is required (or all=true for every model)")
    out.update(kind=kind, name=name.strip())
    return out


def _folder_files(folder: Path) -> Iterator[Path]:
    if folder.is_dir():
        for p in sorted(folder.rglob("*")):
            if p.is_file() and p.suffix.lower() in MODEL_EXTS and not p.name.lower().endswith(".vae.safetensors"):
                yield p


def _targets_of(engine: Any, kind: str) -> list[tuple[str, Path]]:
    """(name, file) of every local model of ``kind``."""
    if kind == "checkpoint":
        return [(c.title, c.path) for c in engine.registry.checkpoints() if not c.is_diffusers]
    if kind == "vae":
        return [(v.name, v.path) for v in engine.registry.vaes()]
    if kind == "lora":
        return [(lo.name, lo.path) for lo in engine.loras.all()]
    if kind == "embedding":
        return [(n, e.path) for n, e in engine.embeddings.all().items() if getattr(e, "path", None)]
    folder = kind_dirs(engine.dirs)[kind]
    return [(p.relative_to(folder).as_posix(), p) for p in _folder_files(folder)]


def targets(engine: Any, params: dict[str, Any]) -> list[tuple[str, str, Path]]:
    """(kind, name, file) of the models a parsed ``model_info`` job covers; NotFoundError names a
    missing one."""
    if params.get("all"):
        return [(k, n, p) for k in KINDS for n, p in _targets_of(engine, k)]
    kind, name = params["kind"], params["name"]
    if kind == "checkpoint":
        info = engine.registry.find_checkpoint(name)
        if info.is_diffusers:
            raise InvalidRequestError(f"name: {info.title} is a diffusers folder; Civitai hashes single files")
        return [(kind, info.title, info.path)]
    if kind == "vae":
        v = engine.registry.find_vae(name)
        return [(kind, v.name, v.path)]
    found = [(n, p) for n, p in _targets_of(engine, kind)
             if name in (n, p.name, p.name.rsplit(".", 1)[0]) or n.casefold() == name.casefold()]
    if not found:
        raise NotFoundError(f"name: no {kind} called {name!r}")
    return [(kind, *found[0])]


def fetch_cards(items: list[tuple[str, str, Path]], settings: DownloadSettings, sha256_of: Callable[[Path], str],
                refresh: bool = False, skip_existing: bool = False,
                progress: Callable[[int, int], None] | None = None, stopped: Callable[[], bool] = lambda: False,
                client: httpx.Client | None = None) -> dict[str, Any]:
    """Look up every item on Civitai and write its card; returns the job result.

    A 404 is recorded as "not found on Civitai" (many models are not on Civitai: not a failure).
    With one item, any other error fails the job; with several, it is recorded and the rest go on.
    Raises ``CardsCanceled`` when ``stopped()``.
    """
    own = client is None
    if client is None:
        client = http_client(settings, {"User-Agent": "muralist"})
    models: list[dict[str, Any]] = []
    warnings: list[str] = []
    try:
        for i, (kind, name, path) in enumerate(items):
            if stopped():
                raise CardsCanceled()
            entry: dict[str, Any] = {"kind": kind, "name": name, "file": path.name}
            if skip_existing and not refresh and sidecar(path, ".civitai.info").exists():
                entry["status"] = "skipped"
            else:
                try:
                    info = lookup(sha256_of(path), settings, client)
                    if info is None:
                        entry["status"] = "not_found"
                        entry["message"] = NOT_FOUND
                    else:
                        warnings += write_card(path, info, client, refresh)
                        card = read_card(path)
                        entry.update(status="saved", civitai_model=(info.get("model") or {}).get("name"),
                                     civitai_version=info.get("name"), version_id=info.get("id"),
                                     base_model=card["base_model"], activation_text=card["activation_text"])
                except (CardError, OSError) as e:
                    msg = settings.redact(str(e) if isinstance(e, CardError) else f"file error: {e.strerror or e}")
                    if len(items) == 1:
                        raise CardError(f"{kind} {name}: {msg}") from None
                    entry.update(status="error", message=msg)
                    warnings.append(f"{kind} {name}: {msg}")
            models.append(entry)
            if progress is not None:
                progress(i + 1, len(items))
    finally:
        if own:
            client.close()
    counts = {s: sum(1 for m in models if m["status"] == s) for s in ("saved", "not_found", "skipped", "error")}
    return {"models": models, **counts, "warnings": warnings}
