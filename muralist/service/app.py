"""The HTTP service: native ``/api/v1`` (and, mounted on the same app, A1111's ``/sdapi/v1``).

Authentication: ``Authorization: Bearer <API key>`` for users made with ``muralist users add``,
HTTP Basic for ``--api-auth`` users, and with neither configured a local single-user mode whose
caller is the admin "local". Every handler sees only the caller's jobs and images (admins: all);
another user's job answers 404, exactly like a job that does not exist.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import shutil
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBasic, HTTPBasicCredentials, HTTPBearer
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..errors import ForbiddenError, InvalidRequestError, MuralistError, NotFoundError
from ..infotext import IMAGE_TYPES
from .core import Limits, Service
from .store import Job, JobStatus, LimitError, User

LOCAL_USER = "local"
DB_PROBE_TIMEOUT = 3.0  # seconds /healthz waits for the database
MAX_OFFSET = 2**31 - 1  # larger offsets overflow the databases' integers (and list nothing anyway)


@dataclass
class AuthConfig:
    basic: dict[str, str] = field(default_factory=dict)  # --api-auth user -> password
    # False when listening on the network without --allow-anonymous: removing the last user must
    # not turn the server into an open admin.
    allow_single_user: bool = True
    metrics_public: bool = False  # /metrics without an admin key (--metrics-public: a private scrape network)

    def single_user(self, service: Service) -> bool:
        """No --api-auth and no users but the implicit local one: the caller is the local admin."""
        return (self.allow_single_user and not self.basic
                and all(u.name == LOCAL_USER for u in service.store.list_users()))


class Utf8Basic(HTTPBasic):
    """HTTP Basic that reads UTF-8 passwords (FastAPI's reads ASCII only) and leaves a missing or
    malformed header to ``current_user``, which answers one 401 naming every enabled scheme."""

    async def __call__(self, request: Request) -> HTTPBasicCredentials | None:  # type: ignore[override]
        scheme, _, param = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "basic" or not param:
            return None
        try:
            name, sep, password = base64.b64decode(param.strip()).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            return None
        return HTTPBasicCredentials(username=name, password=password) if sep else None


class JobIn(BaseModel):
    type: str = "txt2img"
    params: dict[str, Any] = Field(default_factory=dict, description="request fields, A1111 names")
    priority: int = Field(0, ge=-10, le=10)


class NewUser(BaseModel):
    name: str
    admin: bool = False


def job_view(service: Service, job: Job) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": job.id,
        "type": job.type,
        "owner": job.owner,
        "status": job.status.value,
        "priority": job.priority,
        "created_at": job.created_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "attempts": job.attempts,
        # Input images can be megabytes: the view says how many there were instead.
        "params": {k: (f"<{len(v)} image(s)>" if k in ("init_images", "images") else f"<{k}>" if k in ("mask", "image") and v else v)
                   for k, v in job.params.items()},
        "result": job.result,
        "error": job.error,
        "position": service.store.position(job.id) if job.status is JobStatus.QUEUED else None,
    }
    live = service.live.get(job.id)
    if live is not None:
        out["progress"] = {"step": live.step, "steps": live.steps, "batch": live.batch, "n_iter": live.n_iter,
                           "progress": live.fraction, "eta": live.eta, **live.detail}
    return out


def create_app(service: Service, auth: AuthConfig | None = None, cors_origins: list[str] | None = None,
               max_body_bytes: int = 32 * 2**20, start_workers: bool = True) -> FastAPI:
    auth = auth or AuthConfig()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        for name in auth.basic:
            service.store.ensure_user(name, admin=False)
        if start_workers:
            # Start workers off the event loop: the port is open before torch is imported.
            await asyncio.get_running_loop().run_in_executor(None, service.start)
        yield
        await asyncio.get_running_loop().run_in_executor(None, service.stop)

    app = FastAPI(title="muralist", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.service = service
    app.state.auth = auth
    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["*"], allow_headers=["*"])

    # Dataset uploads (zips) may be larger; they stream to a file, and each user's own limit applies.
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes,
                       larger={("PUT", "/api/v1/datasets/"): max(max_body_bytes, service.settings.limits.max_dataset_bytes)})

    @app.exception_handler(MuralistError)
    async def muralist_error(_request: Request, exc: MuralistError) -> JSONResponse:
        status = (429 if isinstance(exc, LimitError) else 403 if isinstance(exc, ForbiddenError)
                  else 422 if isinstance(exc, InvalidRequestError | NotFoundError) else 400)
        return error_response(type(exc).__name__, str(exc), status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        response = error_response(_HTTP_ERRORS.get(exc.status_code, "HTTPException"), str(exc.detail), exc.status_code)
        response.headers.update(exc.headers or {})
        if exc.status_code == 405:  # every method of the path, not just those of the first route matched
            from starlette.routing import Match

            methods = {m for r in _walk(request.app.routes)
                       if r.matches({**request.scope, "method": next(iter(r.methods))})[0] is Match.FULL
                       for m in r.methods}
            response.headers["Allow"] = ", ".join(sorted(methods))
        return response

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(str(x) for x in e['loc'] if x != 'body') or 'body'}: {e['msg']}" for e in exc.errors()]
        if request.headers.get("content-type", "").startswith(("application/x-www-form-urlencoded", "multipart/")):
            # curl -d sends a form: the most common first mistake with this API.
            parts.insert(0, "send the body as JSON with the header 'Content-Type: application/json'")
        return error_response("ValidationError", "; ".join(parts), 422, jsonable(exc.errors()))

    _install_docs(app)
    _install_ui(app)

    bearer_scheme = HTTPBearer(auto_error=False, description="an API key from `muralist users add`")
    basic_scheme = Utf8Basic(auto_error=False, description="--api-auth user:password (A1111's option)")

    def current_user(bearer: HTTPAuthorizationCredentials | None = Security(bearer_scheme),
                     basic: HTTPBasicCredentials | None = Security(basic_scheme)) -> User:
        # FastAPI's security classes parse the header and put "Authorize" in /docs; the decision
        # (and one 401 naming every enabled scheme) stays here.
        if bearer is not None:
            user = service.store.user_by_key(bearer.credentials.strip())
            if user is not None:
                return user
        elif basic is not None and auth.basic:
            expected = auth.basic.get(basic.username)
            # Bytes: compare_digest refuses non-ASCII str, and passwords may be any UTF-8.
            if expected is not None and hmac.compare_digest(expected.encode(), basic.password.encode()):
                user = service.store.get_user(basic.username)
                if user is not None:
                    return user
        if auth.single_user(service):
            return service.store.get_user(LOCAL_USER) or _ensure_local(service)
        # Name the schemes this server takes, so clients (and browsers, for Basic) know what to send.
        schemes = "Bearer" + (', Basic realm="muralist"' if auth.basic else "")
        raise HTTPException(401, "missing or wrong credentials: send 'Authorization: Bearer <API key>'"
                            + (" or HTTP Basic (--api-auth)" if auth.basic else ""), headers={"WWW-Authenticate": schemes})

    app.state.current_user = current_user

    def own_job(job_id: str, user: User) -> Job:
        job = service.store.get(job_id)
        if job is None or (job.owner != user.name and not user.admin):
            raise HTTPException(404, f"no job {job_id!r}")
        return job

    @app.get("/api/v1/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "version": __version__, "instance": service.instance}

    @app.post("/api/v1/jobs", status_code=202)
    def submit(body: JobIn, user: User = Depends(current_user)) -> dict[str, Any]:
        job = service.submit(user, body.type, body.params, body.priority)
        now = service.store.get(job.id) or job  # a free worker may already have taken it
        position = service.store.position(job.id) if now.status is JobStatus.QUEUED else None
        return {"id": job.id, "status": now.status.value, "position": 0 if position is None else position}

    @app.get("/api/v1/jobs")
    def list_jobs(status: list[JobStatus] | None = Query(None), limit: int = Query(100, ge=1, le=1000),
                  offset: int = Query(0, ge=0, le=MAX_OFFSET), user: User = Depends(current_user)) -> dict[str, Any]:
        jobs = service.store.list_jobs(user.name, status, limit, offset)
        return {"jobs": [job_view(service, j) for j in jobs]}

    @app.get("/api/v1/jobs/{job_id}")
    def get_job(job_id: str, user: User = Depends(current_user)) -> dict[str, Any]:
        return job_view(service, own_job(job_id, user))

    @app.post("/api/v1/jobs/{job_id}/cancel")
    def cancel(job_id: str, user: User = Depends(current_user)) -> dict[str, Any]:
        return job_view(service, service.cancel(own_job(job_id, user)))

    @app.post("/api/v1/jobs/{job_id}/interrupt")
    def interrupt(job_id: str, user: User = Depends(current_user)) -> dict[str, Any]:
        """A1111's interrupt: end now and keep the images made so far (cancel discards them)."""
        job = own_job(job_id, user)
        return {"id": job.id, "interrupted": service.interrupt(job)}

    @app.post("/api/v1/jobs/{job_id}/skip")
    def skip(job_id: str, user: User = Depends(current_user)) -> dict[str, Any]:
        job = own_job(job_id, user)
        return {"id": job.id, "skipped": service.skip(job)}

    @app.get("/api/v1/queue")
    def queue(user: User = Depends(current_user)) -> dict[str, Any]:
        order = service.store.queue_order()
        mine = [{"id": j.id, "position": i, "status": j.status.value} for i, j in enumerate(order) if j.owner == user.name]
        running = [job_view(service, j) for j in service.store.list_jobs(user.name, [JobStatus.RUNNING])]
        others = sum(1 for j in order if j.owner != user.name)
        return {"queued": mine, "running": running, "others_queued": others, "total_queued": len(order)}

    @app.get("/api/v1/images/{image_id}", response_class=FileResponse,
             responses={200: {"content": {"image/png": {}, "image/jpeg": {}, "image/webp": {}},
                              "description": "the image (the job's samples_format), with its infotext"}})
    def image(image_id: str, user: User = Depends(current_user)) -> FileResponse:
        rec = service.store.get_image(image_id)
        if rec is None or (rec.owner != user.name and not user.admin):
            raise HTTPException(404, f"no image {image_id!r}")
        path = service.dirs.root / rec.path
        if not path.is_file():
            raise HTTPException(410, f"image {image_id!r} was deleted from disk")
        media = IMAGE_TYPES.get(path.suffix.lower().lstrip("."), "image/png")
        return FileResponse(path, media_type=media, filename=Path(rec.path).name)

    @app.get("/api/v1/images")
    def images(limit: int = Query(100, ge=1, le=1000), offset: int = Query(0, ge=0, le=MAX_OFFSET),
               user: User = Depends(current_user)) -> dict[str, Any]:
        recs = service.store.list_images(user.name, limit, offset)
        return {"images": [{"id": r.id, "job_id": r.job_id, "seed": r.seed, "infotext": r.infotext, "created_at": r.created_at} for r in recs]}

    @app.delete("/api/v1/images/{image_id}")
    def delete_image(image_id: str, user: User = Depends(current_user)) -> dict[str, Any]:
        rec = service.store.get_image(image_id)
        if rec is None or (rec.owner != user.name and not user.admin):
            raise HTTPException(404, f"no image {image_id!r}")
        service.store.delete_image(image_id)
        (service.dirs.root / rec.path).unlink(missing_ok=True)
        return {"deleted": image_id}

    def admin(user: User = Depends(current_user)) -> User:
        if not user.admin:
            raise HTTPException(403, "admins only")
        return user

    @app.get("/api/v1/admin/users")
    def admin_users(user: User = Depends(admin)) -> dict[str, Any]:
        queued = service.store.queue_counts()  # one query, not one per user
        return {"users": [{"name": u.name, "admin": u.admin, "has_key": u.has_key, "created_at": u.created_at,
                           "queued": queued.get(u.name, 0), "limits": u.limits}
                          for u in service.store.list_users()]}

    @app.put("/api/v1/admin/users/{name}/limits")
    def admin_set_limits(name: str, body: dict[str, Any], user: User = Depends(admin)) -> dict[str, Any]:
        """Change one user's limits (e.g. ``{"max_downloads": 1}`` lets them download models);
        ``null`` restores the server's default."""
        service.store.set_user_limits(name, Limits.check_overrides(body))
        changed = service.store.get_user(name)
        assert changed is not None  # set_user_limits raised NotFoundError otherwise
        return {"name": name, "overrides": changed.limits, "limits": service.settings.limits.merged(changed.limits).__dict__}

    @app.post("/api/v1/admin/users", status_code=201)
    def admin_add_user(body: NewUser, user: User = Depends(admin)) -> dict[str, Any]:
        return {"name": body.name, "admin": body.admin, "key": service.store.add_user(body.name, admin=body.admin)}

    @app.post("/api/v1/admin/users/{name}/reset-key")
    def admin_reset_key(name: str, user: User = Depends(admin)) -> dict[str, Any]:
        if service.store.get_user(name) is None:
            raise HTTPException(404, f"no user {name!r}")
        return {"name": name, "key": service.store.reset_key(name)}

    @app.delete("/api/v1/admin/users/{name}")
    def admin_remove_user(name: str, user: User = Depends(admin)) -> dict[str, Any]:
        if name == user.name:
            raise InvalidRequestError("you cannot remove yourself")
        if not service.store.remove_user(name):
            raise HTTPException(404, f"no user {name!r}")
        from .training import dataset_root

        # A re-created name starts empty: the removed user's datasets go with them.
        shutil.rmtree(dataset_root(service.dirs.root, name), ignore_errors=True)
        return {"removed": name}

    _install_probes(app, service, auth, admin)

    @app.get("/api/v1/admin/status")
    def admin_status(user: User = Depends(admin)) -> dict[str, Any]:
        running = service.store.list_jobs(None, [JobStatus.RUNNING])
        return {"running": [job_view(service, j) for j in running], "queued": service.store.queue_counts(),
                "loaded_models": service.loaded_models(), "workers": service.workers()}

    @app.get("/api/v1/admin/workers")
    def admin_workers(user: User = Depends(admin)) -> list[dict[str, Any]]:
        """Every worker this API process dispatches to: where it runs, what it does and holds."""
        return service.workers()

    @app.get("/api/v1/jobs/{job_id}/events", response_class=StreamingResponse, responses=_SSE)
    async def job_events(job_id: str, request: Request, user: User = Depends(current_user)) -> StreamingResponse:
        job = own_job(job_id, user)
        return _sse(service, request, job.owner, job.id)

    @app.get("/api/v1/events", response_class=StreamingResponse, responses=_SSE)
    async def all_events(request: Request, user: User = Depends(current_user)) -> StreamingResponse:
        return _sse(service, request, None if user.admin and user.name != LOCAL_USER else user.name, None)

    @app.get("/api/v1/me")
    def me(user: User = Depends(current_user)) -> dict[str, Any]:
        return {"name": user.name, "admin": user.admin, "options": user.options,
                "limits": service.settings.limits.merged(user.limits).__dict__}

    @app.put("/api/v1/me/options")
    def set_options(options: dict[str, Any], user: User = Depends(current_user)) -> dict[str, Any]:
        from ..request import GenerationRequest

        unknown = sorted(set(options) - set(GenerationRequest.model_fields))
        if unknown:
            raise InvalidRequestError(f"unknown option(s) {', '.join(unknown)}; options are request fields")
        service.store.set_user_options(user.name, options)
        return {"options": (service.store.get_user(user.name) or user).options}

    @app.get("/api/v1/models")
    def models(user: User = Depends(current_user)) -> dict[str, Any]:
        from ..models.cards import read_card

        reg = service.engine.registry

        def card(path: Path | None) -> dict[str, Any]:
            # Civitai Helper's sidecars (model cards); a diffusers folder has none.
            return read_card(path) if path is not None and path.is_file() else {"activation_text": None, "base_model": None}

        embeddings = service.engine.embeddings.all()
        return {
            "checkpoints": [{"title": c.title, "name": c.name, "model_name": c.model_name, "hash": c.shorthash,
                             "sha256": c.sha256, "family": c.kind.label, "prediction_type": c.prediction_type,
                             **card(c.path)} for c in reg.checkpoints()],
            "vaes": [{"name": v.name, "hash": v.shorthash} for v in reg.vaes()],
            "loras": [{"name": lo.name, "alias": lo.alias, "hash": lo.shorthash, **card(lo.path)}
                      for lo in service.engine.loras.all()],
            "embeddings": sorted(embeddings),
            # A separate map: "embeddings" stays the list of names A1111-style clients expect.
            "embedding_cards": {name: card(getattr(e, "path", None)) for name, e in sorted(embeddings.items())},
            "loaded": sorted(service.loaded_keys()),
            "upscalers": [u.name for u in service.engine.upscalers.list()],
        }

    @app.get("/api/v1/models/preview")
    def model_preview(kind: str, name: str, user: User = Depends(current_user)) -> FileResponse:
        """A1111's card preview: ``<file stem>.preview.png`` next to the model file."""
        eng = service.engine
        path = None
        if kind == "checkpoint":
            path = eng.registry.find_checkpoint(name).path
        elif kind == "lora":
            info = eng.loras.find(name)
            path = info.path if info else None
        elif kind == "embedding":
            emb = eng.embeddings.all().get(name)
            path = emb.path if emb else None
        preview = path.with_name(path.name.rsplit(".", 1)[0] + ".preview.png") if path else None
        if preview is None or not preview.is_file():
            raise HTTPException(404, f"no preview for {kind} {name!r}")
        return FileResponse(preview, media_type="image/png")

    @app.get("/api/v1/samplers")
    def samplers_list() -> dict[str, Any]:
        from ..engine import samplers
        from ..engine.txt2img import LATENT_MODES

        return {"samplers": [s.name for s in samplers.SAMPLERS],
                "schedulers": [samplers.SCHEDULES[k][0] for k in samplers.SUPPORTED_SCHEDULES],
                "latent_upscale_modes": list(LATENT_MODES)}

    @app.get("/api/v1/styles")
    def styles(user: User = Depends(current_user)) -> dict[str, Any]:
        from ..prompts.styles import load_styles

        return {"styles": [{"name": st.name, "prompt": st.prompt, "negative_prompt": st.negative_prompt}
                           for st in load_styles(service.dirs.root / "styles.csv").values()]}

    @app.post("/api/v1/png-info")
    def png_info(body: dict[str, Any], user: User = Depends(current_user)) -> dict[str, Any]:
        from ..engine.images import decode_image
        from ..infotext import parse_infotext, read_infotext

        if not body.get("image"):
            raise InvalidRequestError("image: a base64 image is required")
        text = read_infotext(decode_image(body["image"]))
        return {"infotext": text, "parameters": parse_infotext(text) if text else {}}

    @app.get("/api/v1/token-count")
    def count(prompt: str = "", steps: int = Query(20, ge=1, le=150)) -> dict[str, int]:
        from ..engine.conditioning import token_count

        used, limit = token_count(prompt, steps)
        return {"tokens": used, "limit": limit}

    from . import controlnet_api, sdapi, training_api

    sdapi.install(app, service)
    controlnet_api.install(app, service)
    training_api.install(app, service)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _install_probes(app: FastAPI, service: Service, auth: AuthConfig, admin: Any) -> None:
    """Container probes and Prometheus: /livez (the process serves), /healthz (it can run jobs),
    /metrics (admins, or anyone with --metrics-public). No secrets in any of them."""
    from concurrent.futures import ThreadPoolExecutor
    from concurrent.futures import TimeoutError as FutureTimeout

    from fastapi.responses import Response
    from prometheus_client import CONTENT_TYPE_LATEST

    from ..logs import redact

    # A database that hangs (a dead host, a pool waiting to reconnect) must not hold a probe for the
    # pool's 15 s: the answer is "not ready" after DB_PROBE_TIMEOUT, while the query goes on here.
    pinger = ThreadPoolExecutor(max_workers=2, thread_name_prefix="muralist-healthz")

    @app.get("/livez", include_in_schema=False)
    async def livez() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> JSONResponse:  # sync: a hanging database blocks a pool thread, not the event loop
        problems: list[str] = []
        database = "ok"
        try:
            pinger.submit(service.store.ping).result(timeout=DB_PROBE_TIMEOUT)
        except FutureTimeout:
            database = "unreachable"
            problems.append(f"database unreachable: no answer within {DB_PROBE_TIMEOUT:g} s")
        except Exception as e:
            database = "unreachable"
            detail = redact(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
            problems.append(f"database unreachable: {detail}")
        workers = service.workers()
        alive = sum(w["state"] in ("idle", "busy") for w in workers)
        if service.stopping:
            problems.append("the server is stopping")
        elif not workers:
            problems.append("no worker registered yet" + (" (start one: muralist worker --cluster ...)"
                                                         if service.settings.cluster else ""))
        elif not alive:
            states = ", ".join(sorted(f"{w['name']} {w['state']}" for w in workers))
            problems.append(f"no worker alive: {states}")
        body: dict[str, Any] = {"status": "not ready" if problems else "ready", "database": database,
                                "workers": alive, "version": __version__}
        if problems:
            body["problems"] = problems
        return JSONResponse(body, status_code=503 if problems else 200)

    def render() -> Response:
        return Response(service.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    if auth.metrics_public:
        app.get("/metrics", include_in_schema=False)(lambda: render())
    else:
        @app.get("/metrics", include_in_schema=False)
        def metrics(user: User = Depends(admin)) -> Response:
            return render()


def error_response(error: str, detail: str, status: int, errors: Any = None) -> JSONResponse:
    """Errors in A1111's shape ({error, detail, body, errors}), which its clients parse."""
    return JSONResponse({"error": error, "detail": detail, "body": "", "errors": errors if errors is not None else detail}, status)


_HTTP_ERRORS = {413: "PayloadTooLarge", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound", 405: "MethodNotAllowed", 409: "Conflict",
                410: "Gone", 500: "InternalServerError"}


class _TooLarge(StarletteHTTPException):
    """Raised from the body stream: an HTTPException, so FastAPI's body reading passes it on as is."""


class BodyLimit:
    """Refuses request bodies over ``max_bytes`` while they stream in (chunked or not), before any
    route or authentication reads them: at most ``max_bytes`` are ever held."""

    def __init__(self, app: Any, max_bytes: int, larger: dict[tuple[str, str], int] | None = None) -> None:
        self.app = app
        self.default = max_bytes
        self.larger = larger or {}  # (method, path prefix) -> limit

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = next((n for (method, prefix), n in self.larger.items()
                      if scope.get("method") == method and scope.get("path", "").startswith(prefix)), self.default)
        await self._limited(scope, receive, send, limit)

    async def _limited(self, scope: dict[str, Any], receive: Any, send: Any, limit: int) -> None:
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            await self._refuse(send, limit)
            return
        seen = 0
        started = False

        async def counted() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _TooLarge(413, f"request body over {limit} bytes; send smaller images")
            return message

        async def tracked(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, tracked)
        except _TooLarge:
            if not started:
                await self._refuse(send, limit)

    async def _refuse(self, send: Any, limit: int) -> None:
        response = error_response("PayloadTooLarge", f"request body over {limit} bytes; send smaller images or files", 413)
        await response({"type": "http"}, _no_body, send)


async def _no_body() -> dict[str, Any]:
    return {"type": "http.disconnect"}


def _ensure_local(service: Service) -> User:
    service.store.ensure_user(LOCAL_USER, admin=True)
    user = service.store.get_user(LOCAL_USER)
    assert user is not None
    return user


def jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


_SSE: dict[int | str, dict[str, Any]] = {200: {"content": {"text/event-stream": {}}, "description": "server-sent events"}}
# Every error, on every route, has this one shape (A1111's); the schema says so, and which codes occur.
_ERROR_CODES = {"400": "bad input or files", "401": "missing or wrong credentials", "403": "admins only",
                "404": "no such job, image or model (or not yours)", "405": "method not allowed", "409": "conflict",
                "410": "gone", "413": "request body too large", "422": "invalid request: the detail says what to change",
                "429": "a per-user limit is reached", "500": "internal error"}


def _walk(routes: Any) -> Any:
    """Routes with methods, through included routers (FastAPI keeps those nested)."""
    for r in routes:
        if getattr(r, "methods", None):
            yield r
        # FastAPI >= 0.160 keeps included routers nested (their routes under original_router).
        inner = getattr(getattr(r, "original_router", None), "routes", None)
        if inner:
            yield from _walk(inner)


def _openapi(app: FastAPI) -> dict[str, Any]:
    if app.openapi_schema:
        return app.openapi_schema
    from fastapi.openapi.utils import get_openapi

    schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
    schemas = schema.setdefault("components", {}).setdefault("schemas", {})
    schemas["ErrorBody"] = {
        "type": "object", "required": ["error", "detail"],
        "properties": {"error": {"type": "string"}, "detail": {"type": "string"}, "body": {"type": "string"}, "errors": {}},
    }
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    ref = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}}
    for path in schema.get("paths", {}).values():
        for op in path.values():
            responses = op.setdefault("responses", {})
            for code, text in _ERROR_CODES.items():
                responses[code] = {"description": text, **ref}
    app.openapi_schema = schema
    return schema


_END_EVENTS = {JobStatus.SUCCEEDED: "finished", JobStatus.FAILED: "failed", JobStatus.CANCELED: "canceled"}


def _sse(service: Service, request: Request, owner: str | None, job_id: str | None) -> StreamingResponse:
    key, sub = service.hub.subscribe(owner, job_id)

    async def stream() -> AsyncIterator[bytes]:
        try:
            if job_id is not None:
                job = service.store.get(job_id)
                if job is not None:
                    first = {"type": "state", "owner": job.owner, "job_id": job.id, "status": job.status.value,
                             "position": service.store.position(job.id)}
                    yield f"event: state\ndata: {json.dumps(first)}\n\n".encode()
                    if job.status.finished:
                        return
            last = time.monotonic()
            while True:
                if await request.is_disconnected():
                    return
                try:
                    ev = await asyncio.wait_for(sub.queue.get(), timeout=1.0)
                except TimeoutError:
                    if job_id is not None:  # ended in another API process whose event did not reach us
                        job = service.store.get(job_id)
                        if job is not None and job.status.finished:
                            end = {"type": _END_EVENTS[job.status], "owner": job.owner, "job_id": job.id,
                                   "images": (job.result or {}).get("images", []), "error": job.error}
                            yield f"event: {end['type']}\ndata: {json.dumps(end)}\n\n".encode()
                            return
                    if time.monotonic() - last > 15:
                        last = time.monotonic()
                        yield b": keep-alive\n\n"
                    continue
                yield f"event: {ev['type']}\ndata: {json.dumps(ev)}\n\n".encode()
                if job_id is not None and ev["type"] in ("finished", "failed", "canceled"):
                    return
        finally:
            service.hub.unsubscribe(key)

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _install_ui(app: FastAPI) -> None:
    """The web UI: static files that speak only the public /api/v1 API."""
    from fastapi.responses import HTMLResponse
    from fastapi.staticfiles import StaticFiles

    web = Path(__file__).resolve().parent.parent / "web"
    app.mount("/ui", StaticFiles(directory=web), name="ui")

    @app.get("/", include_in_schema=False)
    def index() -> HTMLResponse:
        return HTMLResponse((web / "index.html").read_text(encoding="utf-8"))


def _install_docs(app: FastAPI) -> None:
    """Swagger UI from the locally installed swagger-ui-bundle: /docs works with no internet."""
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.staticfiles import StaticFiles

    try:
        import swagger_ui_bundle
    except ImportError:  # docs are optional; the API works without them
        return
    app.mount("/docs-assets", StaticFiles(directory=swagger_ui_bundle.swagger_ui_path), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    def docs() -> Any:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="muralist API",
                                   swagger_js_url="/docs-assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs-assets/swagger-ui.css",
                                   swagger_favicon_url="/docs-assets/favicon-32x32.png")
