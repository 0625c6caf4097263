"""The persistent job queue, users and image records (SQLite embedded by default, PostgreSQL shared).

Interface first: everything that touches the database goes through ``Store``; the HTTP layer and
the workers never write SQL. State that belongs to a job (its request, model, owner) lives in its
row, so a restart or another worker process sees exactly what was asked.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
import secrets
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from ..errors import InvalidRequestError, MuralistError, NotFoundError
from ..logs import redact


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def finished(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED)


@dataclass
class Job:
    id: str  # 32 hex chars, or the client's own id (A1111's force_task_id)
    owner: str  # user name
    type: str  # "txt2img" (img2img, extras, training later)
    params: dict[str, Any]  # the validated request, A1111 field names
    status: JobStatus
    priority: int = 0  # higher runs first, within one user's jobs
    model_key: str | None = None  # checkpoint the job needs (its sha256), for model affinity
    created_at: float = 0.0  # unix time
    started_at: float | None = None
    finished_at: float | None = None
    attempts: int = 0  # times a worker claimed it
    worker: str | None = None
    cancel_requested: bool = False  # set while running; the worker interrupts it
    result: dict[str, Any] | None = None  # {"images": [image ids], "infotexts": [...], "seeds": [...], "warnings": [...]}
    error: str | None = None
    dispatcher: str | None = None  # the API process whose dispatcher runs it (it renews the lease)
    lease_until: float | None = None  # unix time; a running job whose lease lapsed is re-queued by any dispatcher
    failures: int = 0  # runs lost to a dead or stalled worker (a graceful stop does not count)
    skip_count: int = 0  # skip requests so far; dispatchers deliver new ones to the worker
    stop_requested: bool = False  # A1111's interrupt: end early and keep the images made so far


@dataclass
class User:
    name: str
    admin: bool = False
    created_at: float = 0.0
    options: dict[str, Any] = field(default_factory=dict)  # the user's defaults (A1111 options subset)
    limits: dict[str, Any] = field(default_factory=dict)  # overrides of the server's per-user limits
    has_key: bool = False  # holds an API key (users made by ensure_user have none)
    last_served_at: float | None = None  # when a worker last took one of their jobs (fair scheduling)


@dataclass
class ImageRecord:
    id: str
    job_id: str
    owner: str
    path: str  # relative to the data folder
    infotext: str
    seed: int
    index: int  # position in the job's result
    created_at: float = 0.0


@dataclass
class NewImage:
    """An image a finishing job records (Store.finish), with its id chosen by the caller."""

    path: str  # relative to the data folder
    owner: str
    infotext: str
    seed: int
    index: int
    id: str = field(default_factory=lambda: uuid.uuid4().hex)


class LimitError(MuralistError):
    """A per-user limit (queued jobs, rate) is reached; the message names the limit. HTTP 429."""

    http_status = 429


# ---------------------------------------------------------------- schema

# Ordered migration steps; step N (1-based) brings the schema to version N. Never edit a released
# step: append a new one. The SQL is written once for both engines (types both accept: TEXT,
# INTEGER for booleans, BIGINT, DOUBLE PRECISION; JSON as TEXT); where the dialects differ, a step
# holds {engine name: statement}.
MIGRATIONS: list[list[str | dict[str, str]]] = [
    [
        """CREATE TABLE users (
            name TEXT PRIMARY KEY,
            admin INTEGER NOT NULL DEFAULT 0,
            key_hash TEXT UNIQUE,
            created_at DOUBLE PRECISION NOT NULL,
            options TEXT NOT NULL DEFAULT '{}',
            limits TEXT NOT NULL DEFAULT '{}',
            last_served_at DOUBLE PRECISION
        )""",
        """CREATE TABLE jobs (
            id TEXT PRIMARY KEY,
            seq BIGINT NOT NULL,
            owner TEXT NOT NULL,
            type TEXT NOT NULL,
            params TEXT NOT NULL,
            status TEXT NOT NULL CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'canceled')),
            priority INTEGER NOT NULL DEFAULT 0,
            model_key TEXT,
            created_at DOUBLE PRECISION NOT NULL,
            started_at DOUBLE PRECISION,
            finished_at DOUBLE PRECISION,
            attempts INTEGER NOT NULL DEFAULT 0,
            worker TEXT,
            cancel_requested INTEGER NOT NULL DEFAULT 0,
            result TEXT,
            error TEXT
        )""",
        "CREATE INDEX jobs_queue ON jobs (status, priority, created_at)",
        "CREATE INDEX jobs_owner ON jobs (owner, created_at)",
        "CREATE UNIQUE INDEX jobs_seq ON jobs (seq)",
        """CREATE TABLE images (
            id TEXT PRIMARY KEY,
            job_id TEXT NOT NULL REFERENCES jobs (id),
            owner TEXT NOT NULL,
            path TEXT NOT NULL,
            infotext TEXT NOT NULL,
            seed BIGINT NOT NULL,
            idx INTEGER NOT NULL,
            created_at DOUBLE PRECISION NOT NULL
        )""",
        "CREATE INDEX images_owner ON images (owner, created_at)",
        "CREATE INDEX images_job ON images (job_id)",
    ],
    # 2: leases and fencing for workers on other machines; events relayed between API processes.
    [
        "ALTER TABLE jobs ADD COLUMN dispatcher TEXT",
        "ALTER TABLE jobs ADD COLUMN lease_until DOUBLE PRECISION",
        "ALTER TABLE jobs ADD COLUMN failures INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE jobs ADD COLUMN skip_count INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE jobs ADD COLUMN stop_requested INTEGER NOT NULL DEFAULT 0",
        {
            "sqlite": "CREATE TABLE job_events (id INTEGER PRIMARY KEY AUTOINCREMENT, instance TEXT NOT NULL, "
                      "payload TEXT NOT NULL, created_at DOUBLE PRECISION NOT NULL)",
            "postgresql": "CREATE TABLE job_events (id BIGSERIAL PRIMARY KEY, instance TEXT NOT NULL, "
                          "payload TEXT NOT NULL, created_at DOUBLE PRECISION NOT NULL)",
        },
        "CREATE INDEX job_events_time ON job_events (created_at)",
        "CREATE INDEX jobs_dispatcher ON jobs (dispatcher, status)",
    ],
]

_SCHEMA_VERSION_DDL = (
    "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, applied_at DOUBLE PRECISION NOT NULL)"
)
_FINISHED_SQL = "('succeeded', 'failed', 'canceled')"
_NAME_RE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
# A1111 clients send ids like "task(abc123)"; anything else that is safe in a URL or a log line.
_JOB_ID_RE = re.compile(r"[A-Za-z0-9_.:()@+\-]{1,128}")

# Round-robin over users in SQL: a user's n-th job (by priority, then age) comes in round n;
# within a round, users go least-recently-served first (never served first), ties by their oldest
# queued job. That is exactly the order of serving one job at a time and sending the served user
# to the back, so queue_order(), position() and claim_next() agree.
_FAIR_ORDER_SQL = """
SELECT {cols} FROM (
    SELECT j.*,
           ROW_NUMBER() OVER (PARTITION BY j.owner ORDER BY j.priority DESC, j.created_at, j.seq) AS round_no,
           MIN(j.seq) OVER (PARTITION BY j.owner) AS first_seq,
           MIN(j.created_at) OVER (PARTITION BY j.owner) AS first_at
    FROM jobs j WHERE j.status = 'queued'
) q LEFT JOIN users u ON u.name = q.owner {where}
ORDER BY q.round_no,
         CASE WHEN u.last_served_at IS NULL THEN 0 ELSE 1 END, u.last_served_at,
         q.first_at, q.first_seq, q.owner
"""


# ---------------------------------------------------------------- engines


class _Tx:
    """One open transaction: SQL written with ``?`` placeholders, rows as dicts, on either engine."""

    def __init__(self, conn: Any, translate: Callable[[str], str]) -> None:
        self._conn = conn
        self._translate = translate

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        return self._conn.execute(self._translate(sql), tuple(params)).rowcount

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        cur = self._conn.execute(self._translate(sql), tuple(params))
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]

    def row(self, sql: str, params: Sequence[Any] = ()) -> dict[str, Any] | None:
        rows = self.rows(sql, params)
        return rows[0] if rows else None

    def value(self, sql: str, params: Sequence[Any] = ()) -> Any:
        row = self._conn.execute(self._translate(sql), tuple(params)).fetchone()
        return None if row is None else row[0]


class _SQLite:
    name = "sqlite"

    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        self.integrity_errors: tuple[type[Exception], ...] = (sqlite3.IntegrityError,)
        # BEGIN IMMEDIATE already serializes writers, across processes too; this in-process lock
        # makes threads queue on a mutex instead of in SQLite's sleeping busy handler.
        self._write_lock = threading.Lock()
        # A few reused connections (opening one runs several PRAGMAs; HTTP servers use a thread per
        # request). SQLite connections never go stale, so unlike PostgreSQL's they need no checks.
        self._slots = threading.BoundedSemaphore(size)
        self._idle: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._closed = False

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: we issue BEGIN/COMMIT ourselves. check_same_thread=False: pooled
        # connections move between threads, but only one thread uses a connection at a time.
        conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout = 30000")
        # WAL: readers never block the writer. The mode is stored in the file, so only the first
        # connection ever switches it; that switch can fail with "database is locked" without
        # waiting (when several processes open a fresh file at once), hence the retries.
        deadline = time.monotonic() + 30.0
        while conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
            try:
                if conn.execute("PRAGMA journal_mode = WAL").fetchone()[0].lower() == "wal":
                    break
            except sqlite3.OperationalError:
                if time.monotonic() > deadline:
                    conn.close()
                    raise
            if time.monotonic() > deadline:
                break  # a file system without WAL support: the default journal works, more slowly
            time.sleep(0.01)
        conn.execute("PRAGMA synchronous = NORMAL")  # durable enough in WAL mode, much faster
        conn.execute("PRAGMA foreign_keys = ON")
        return conn

    @contextmanager
    def connection(self) -> Iterator[sqlite3.Connection]:
        with self._slots:
            with self._lock:
                if self._closed:
                    raise RuntimeError("the store is closed")
                conn = self._idle.pop() if self._idle else None
            conn = conn or self._connect()
            try:
                yield conn
            finally:
                with self._lock:
                    keep = not self._closed and not conn.in_transaction  # still in one: the ROLLBACK failed
                    if keep:
                        self._idle.append(conn)
                if not keep:
                    _close_quietly(conn)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            _close_quietly(conn)

    @staticmethod
    def translate(sql: str) -> str:
        return sql

    def guard(self, write: bool) -> AbstractContextManager[Any]:
        return self._write_lock if write else nullcontext()

    def begin(self, conn: Any, write: bool, lock: str | None) -> None:
        # Deferred transactions that later write can fail at once with SQLITE_BUSY; IMMEDIATE waits.
        conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")


class _Postgres:
    name = "postgresql"

    CONNECT_TIMEOUT = 10  # seconds for one connection attempt
    # How long a transaction waits for a pooled connection (all busy, or the server unreachable and
    # the pool reconnecting in the background) before failing with a MuralistError.
    WAIT_TIMEOUT = 15.0

    def __init__(self, url: str, size: int) -> None:
        import psycopg
        from psycopg_pool import ConnectionPool

        self.url = url
        self.integrity_errors = (psycopg.IntegrityError,)
        # The pool logs every checkout at INFO, which would flood `muralist serve`'s log; its warnings
        # (failed connection attempts) still show. A level someone set on purpose is kept.
        if (pool_log := logging.getLogger("psycopg.pool")).level == logging.NOTSET:
            pool_log.setLevel(logging.WARNING)
        kwargs = {"autocommit": True, "connect_timeout": self.CONNECT_TIMEOUT}
        # min_size: an API process is idle most of the time; the pool grows to max_size under load
        # (HTTP threads, dispatchers) and shrinks back after max_idle. check: every checkout runs an
        # empty query, so a connection the server dropped (restart, pg_terminate_backend, idle
        # timeout) is replaced before a transaction sees it. reconnect_timeout: the pool's retries
        # back off exponentially; a short give-up lets the next request start afresh, so the store
        # recovers within seconds of a long outage instead of minutes.
        self._pool = ConnectionPool(
            url, kwargs=kwargs, min_size=min(2, size), max_size=size, open=False, name="muralist",
            check=ConnectionPool.check_connection, timeout=self.WAIT_TIMEOUT, reconnect_timeout=30.0,
        )
        try:
            # One direct connection first: its error says at once what is wrong (refused, password,
            # no such database, bad URL), where the pool would only log it and retry until its timeout.
            with psycopg.connect(url, **kwargs) as conn:
                self._lock_keys = self._derive_lock_keys(conn)
            self._pool.open(wait=True, timeout=self.WAIT_TIMEOUT)
        except psycopg.Error as e:
            self._pool.close()
            raise MuralistError(f"cannot connect to PostgreSQL at {redact(url)}: {str(e).strip()}") from None

    def _derive_lock_keys(self, conn: Any) -> dict[str, int]:
        # Advisory locks are database-wide; derive their keys from the schema so that stores in
        # different schemas (tests, several deployments in one database) never wait on each other.
        schema = conn.execute("SELECT current_schema()").fetchone()[0]
        if schema is None:
            raise MuralistError(f"PostgreSQL at {redact(self.url)}: the search_path names no existing schema")
        return {name: int.from_bytes(hashlib.sha256(f"muralist:{schema}:{name}".encode()).digest()[:8], "big", signed=True)
                for name in ("migrate", "queue")}

    @contextmanager
    def connection(self) -> Iterator[Any]:
        from psycopg_pool import PoolClosed, PoolTimeout

        try:
            conn = self._pool.getconn()
        except PoolClosed:
            raise RuntimeError("the store is closed") from None
        except PoolTimeout:
            raise MuralistError(
                f"no connection to PostgreSQL at {redact(self.url)} within {self.WAIT_TIMEOUT:g} s: "
                "is the server running?"
            ) from None
        try:
            yield conn
        finally:
            # The pool rolls back a transaction left open and replaces a broken connection.
            self._pool.putconn(conn)

    def close(self) -> None:
        self._pool.close()

    @staticmethod
    @functools.lru_cache(maxsize=256)
    def translate(sql: str) -> str:
        return sql.replace("%", "%%").replace("?", "%s")

    def guard(self, write: bool) -> AbstractContextManager[Any]:
        return nullcontext()

    def begin(self, conn: Any, write: bool, lock: str | None) -> None:
        if write:
            conn.execute("BEGIN")
            if lock is not None:
                # Held until COMMIT/ROLLBACK; later statements (READ COMMITTED) see what the previous
                # holder committed, so claims and submits are serialized without table locks.
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (self._lock_keys[lock],))
        else:
            conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")  # one snapshot for all reads


def _close_quietly(conn: Any) -> None:
    with suppress(Exception):
        conn.close()


# ---------------------------------------------------------------- helpers


def _check_name(name: str) -> None:
    # Names end up in folder names (outputs/<user>/...): ASCII only, and no "." or "..".
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or set(name) == {"."}:
        raise InvalidRequestError(
            f"invalid user name {name!r}: use 1-64 letters, digits, '_', '.' or '-' (not only dots)"
        )


MIN_KEY_CHARS = 24  # a chosen key must be as hard to guess as a random one is long


def _new_key() -> str:
    return "mur_" + secrets.token_urlsafe(24)  # 24 random bytes = 32 URL-safe characters


def _hash_key(key: str) -> str:
    # Keys carry 192 random bits, so a fast unsalted hash is enough (no password stretching needed).
    return hashlib.sha256(key.encode()).hexdigest()


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _fence(attempt: int | None) -> tuple[str, tuple[Any, ...]]:
    """SQL condition (and its argument) accepting a state change only from the current attempt."""
    return ("", ()) if attempt is None else (" AND attempts = ?", (int(attempt),))


def _text(value: str) -> str:
    return value.replace("\x00", "")  # PostgreSQL TEXT refuses NUL; strip it on both engines alike


def _user(row: dict[str, Any]) -> User:
    return User(
        name=row["name"],
        admin=bool(row["admin"]),
        created_at=row["created_at"],
        options=json.loads(row["options"]),
        limits=json.loads(row["limits"]),
        has_key=row["key_hash"] is not None,
        last_served_at=row["last_served_at"],
    )


def _job(row: dict[str, Any]) -> Job:
    return Job(
        id=row["id"],
        owner=row["owner"],
        type=row["type"],
        params=json.loads(row["params"]),
        status=JobStatus(row["status"]),
        priority=row["priority"],
        model_key=row["model_key"],
        created_at=row["created_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        attempts=row["attempts"],
        worker=row["worker"],
        cancel_requested=bool(row["cancel_requested"]),
        result=None if row["result"] is None else json.loads(row["result"]),
        error=row["error"],
        dispatcher=row["dispatcher"],
        lease_until=row["lease_until"],
        failures=row["failures"],
        skip_count=row["skip_count"],
        stop_requested=bool(row["stop_requested"]),
    )


def _image(row: dict[str, Any]) -> ImageRecord:
    return ImageRecord(
        id=row["id"],
        job_id=row["job_id"],
        owner=row["owner"],
        path=row["path"],
        infotext=row["infotext"],
        seed=row["seed"],
        index=row["idx"],
        created_at=row["created_at"],
    )


def _pick(candidates: list[dict[str, Any]], loaded: Collection[str], max_wait: float, now: float) -> dict[str, Any]:
    """Model affinity: the fair first job, unless a job a little further on needs a loaded model
    and the first has not yet waited ``max_wait`` seconds (so no job waits forever)."""
    first = candidates[0]
    if first["model_key"] is None or first["model_key"] in loaded or now - first["created_at"] > max_wait:
        return first
    for cand in candidates[1:]:
        if cand["model_key"] is not None and cand["model_key"] in loaded:
            return cand
    return first


# ---------------------------------------------------------------- the store


class Store:
    """Users, jobs and images in SQLite or PostgreSQL. Thread-safe; every method is one transaction.

    Job state machine: queued -> running -> succeeded | failed | canceled, and queued -> canceled.
    Every transition is a conditional UPDATE on the current status, so racing callers (a cancel
    and a claim, two workers) cannot both win. Only succeeded jobs keep image records: finishing a
    job whose cancel was requested, failing or canceling it drops its records and returns their
    paths (relative to the data folder) so the caller can delete the files.
    """

    def __init__(self, engine: _SQLite | _Postgres) -> None:
        self._engine = engine  # owns the connection pool
        self.backend: str = engine.name  # "sqlite" or "postgresql"
        self._local = threading.local()
        try:
            self._migrate()
        except BaseException:
            engine.close()
            raise

    # ------------------------------------------------------------ plumbing

    @contextmanager
    def _tx(self, write: bool = False, lock: str | None = None) -> Iterator[_Tx]:
        """One transaction on a pooled connection. ``lock="queue"`` serializes with claims and
        submits on PostgreSQL (SQLite write transactions are serialized anyway)."""
        if getattr(self._local, "in_tx", False):
            raise RuntimeError("nested Store transaction")  # would deadlock on the pool or the lock
        self._local.in_tx = True
        try:
            with self._engine.connection() as conn, self._engine.guard(write):
                self._engine.begin(conn, write, lock)
                try:
                    yield _Tx(conn, self._engine.translate)
                    conn.execute("COMMIT")
                except BaseException:
                    with suppress(Exception):
                        conn.execute("ROLLBACK")
                    raise  # the pool drops the connection if the rollback failed too
        finally:
            self._local.in_tx = False

    def _migrate(self) -> None:
        # One transaction under the migration lock: a second process opening at the same time
        # waits, then finds the schema current. DDL is transactional on both engines.
        with self._tx(write=True, lock="migrate") as tx:
            tx.execute(_SCHEMA_VERSION_DDL)
            current = tx.value("SELECT COALESCE(MAX(version), 0) FROM schema_version")
            if current > len(MIGRATIONS):
                raise MuralistError(
                    f"the database schema is version {current}, newer than this muralist knows "
                    f"({len(MIGRATIONS)}); upgrade muralist"
                )
            for version in range(current + 1, len(MIGRATIONS) + 1):
                for statement in MIGRATIONS[version - 1]:
                    tx.execute(statement if isinstance(statement, str) else statement[self.backend])
                tx.execute("INSERT INTO schema_version (version, applied_at) VALUES (?, ?)", (version, time.time()))

    def schema_version(self) -> int:
        """The schema version the database is at (``len(MIGRATIONS)`` once opened)."""
        with self._tx() as tx:
            return int(tx.value("SELECT COALESCE(MAX(version), 0) FROM schema_version"))

    def close(self) -> None:
        """Close the pooled connections; later calls raise RuntimeError. Idempotent."""
        self._engine.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ users

    def add_user(self, name: str, admin: bool = False, key: str | None = None) -> str:
        """Create a user and return their API key: ``key`` if given (a deployment's chosen secret),
        else a new random one. Only its hash is stored."""
        _check_name(name)
        if key is not None and len(key) < MIN_KEY_CHARS:
            raise InvalidRequestError(f"an API key needs at least {MIN_KEY_CHARS} characters (got {len(key)})")
        key = key or _new_key()
        try:
            with self._tx(write=True) as tx:
                # Case-insensitive: names become folder names, and macOS/Windows folders ignore case.
                if tx.value("SELECT name FROM users WHERE lower(name) = lower(?)", (name,)) is not None:
                    raise InvalidRequestError(f"user {name!r} already exists")
                tx.execute(
                    "INSERT INTO users (name, admin, key_hash, created_at, options, limits) VALUES (?, ?, ?, ?, '{}', '{}')",
                    (name, int(admin), _hash_key(key), time.time()),
                )
        except self._engine.integrity_errors:
            raise InvalidRequestError(f"user {name!r} already exists") from None
        return key

    def ensure_user(self, name: str, admin: bool = False) -> User:
        """The user, created without an API key if missing (HTTP Basic users, the local user).
        An existing user is returned unchanged (``admin`` only applies on creation)."""
        _check_name(name)
        with self._tx(write=True) as tx:
            tx.execute(
                "INSERT INTO users (name, admin, key_hash, created_at, options, limits) VALUES (?, ?, NULL, ?, '{}', '{}') "
                "ON CONFLICT (name) DO NOTHING",
                (name, int(admin), time.time()),
            )
            row = tx.row("SELECT * FROM users WHERE name = ?", (name,))
        assert row is not None
        return _user(row)

    def remove_user(self, name: str) -> bool:
        """Delete the account (its key stops working) and cancel its queued and running jobs. Its
        jobs and image records stay, owned by ``name~<random>`` (admins still see them), so a user
        re-created with this name sees none of them. False if unknown."""
        now = time.time()
        with self._tx(write=True, lock="queue") as tx:
            if not tx.execute("DELETE FROM users WHERE name = ?", (name,)):
                return False
            tx.execute(
                "UPDATE jobs SET status = 'canceled', finished_at = ?, error = 'the user was removed' "
                "WHERE owner = ? AND status = 'queued'",
                (now, name),
            )
            tx.execute("UPDATE jobs SET cancel_requested = 1 WHERE owner = ? AND status = 'running'", (name,))
            # The history stays (admins see it) but leaves the name: a user created later with the
            # same name starts empty. "~" is not allowed in names, so no one can take this one.
            detached = f"{name}~{uuid.uuid4().hex[:8]}"
            tx.execute("UPDATE jobs SET owner = ? WHERE owner = ?", (detached, name))
            tx.execute("UPDATE images SET owner = ? WHERE owner = ?", (detached, name))
        return True

    def reset_key(self, name: str) -> str:
        """Replace the user's API key (the old one stops working); returns the new key."""
        key = _new_key()
        with self._tx(write=True) as tx:
            if not tx.execute("UPDATE users SET key_hash = ? WHERE name = ?", (_hash_key(key), name)):
                raise NotFoundError(f"no user {name!r}")
        return key

    def list_users(self) -> list[User]:
        with self._tx() as tx:
            return [_user(r) for r in tx.rows("SELECT * FROM users ORDER BY name")]

    def get_user(self, name: str) -> User | None:
        with self._tx() as tx:
            row = tx.row("SELECT * FROM users WHERE name = ?", (name,))
        return None if row is None else _user(row)

    def user_by_key(self, key: str) -> User | None:
        """The user owning this API key. Looked up by hash, so timing reveals nothing useful."""
        if not key:
            return None
        with self._tx() as tx:
            row = tx.row("SELECT * FROM users WHERE key_hash = ?", (_hash_key(key),))
        return None if row is None else _user(row)

    def set_user_options(self, name: str, options: dict[str, Any]) -> None:
        """Merge into the user's options; a value of None removes that option."""
        self._merge_json(name, "options", options)

    def set_user_limits(self, name: str, limits: dict[str, Any]) -> None:
        """Merge into the user's limit overrides; a value of None removes the override."""
        self._merge_json(name, "limits", limits)

    def _merge_json(self, name: str, column: str, update: dict[str, Any]) -> None:
        if not isinstance(update, dict):
            raise InvalidRequestError(f"{column} must be an object")
        with self._tx(write=True) as tx:
            current = tx.value(f"SELECT {column} FROM users WHERE name = ?", (name,))
            if current is None:
                raise NotFoundError(f"no user {name!r}")
            merged = json.loads(current)
            for k, v in update.items():
                if v is None:
                    merged.pop(k, None)
                else:
                    merged[k] = v
            tx.execute(f"UPDATE users SET {column} = ? WHERE name = ?", (_dumps(merged), name))

    # ------------------------------------------------------------ jobs

    def submit(
        self,
        owner: str,
        type: str,
        params: dict[str, Any],
        priority: int = 0,
        model_key: str | None = None,
        job_id: str | None = None,
        max_queued: int | None = None,
    ) -> Job:
        """Queue a job. ``max_queued``: refuse (LimitError) if the owner already has that many
        queued or running jobs. A duplicate or malformed ``job_id`` is an InvalidRequestError."""
        if job_id is None:
            job_id = uuid.uuid4().hex
        elif not isinstance(job_id, str) or not _JOB_ID_RE.fullmatch(job_id):
            raise InvalidRequestError(
                f"invalid job id {job_id!r}: use 1-128 letters, digits or any of _ . : ( ) @ + -"
            )
        params_json = _dumps(params)
        now = time.time()
        try:
            # The queue lock makes the limit check and the sequence number race-free.
            with self._tx(write=True, lock="queue") as tx:
                if tx.value("SELECT 1 FROM users WHERE name = ?", (owner,)) is None:
                    raise NotFoundError(f"no user {owner!r}")
                if tx.value("SELECT 1 FROM jobs WHERE id = ?", (job_id,)) is not None:
                    raise InvalidRequestError(f"a job with id {job_id!r} already exists")
                if max_queued is not None:
                    active = tx.value(
                        "SELECT COUNT(*) FROM jobs WHERE owner = ? AND status IN ('queued', 'running')", (owner,)
                    )
                    if active >= max_queued:
                        raise LimitError(
                            f"you already have {active} queued or running jobs; the limit is max_queued={max_queued}. "
                            "Wait for some to finish or cancel them"
                        )
                # seq: a strict insertion order, the last tie-break when timestamps are equal.
                seq = tx.value("SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs")
                tx.execute(
                    "INSERT INTO jobs (id, seq, owner, type, params, status, priority, model_key, created_at) "
                    "VALUES (?, ?, ?, ?, ?, 'queued', ?, ?, ?)",
                    (job_id, seq, owner, type, params_json, int(priority), model_key, now),
                )
        except self._engine.integrity_errors:
            raise InvalidRequestError(f"a job with id {job_id!r} already exists") from None
        return Job(job_id, owner, type, json.loads(params_json), JobStatus.QUEUED, int(priority), model_key, now)

    def get(self, job_id: str) -> Job | None:
        with self._tx() as tx:
            row = tx.row("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return None if row is None else _job(row)

    def list_jobs(
        self, owner: str | None, statuses: list[JobStatus] | None = None, limit: int = 100, offset: int = 0
    ) -> list[Job]:
        """Jobs, newest first; ``owner=None`` lists everyone's."""
        where, params = [], []
        if owner is not None:
            where.append("owner = ?")
            params.append(owner)
        if statuses is not None:
            if not statuses:
                return []
            where.append(f"status IN ({', '.join('?' * len(statuses))})")
            params.extend(JobStatus(s).value for s in statuses)  # .value: psycopg dumps enums by name
        sql = "SELECT * FROM jobs" + (" WHERE " + " AND ".join(where) if where else "")
        sql += " ORDER BY created_at DESC, seq DESC LIMIT ? OFFSET ?"
        with self._tx() as tx:
            return [_job(r) for r in tx.rows(sql, (*params, max(0, int(limit)), max(0, int(offset))))]

    def request_cancel(self, job_id: str) -> Job | None:
        """Cancel a queued job now; flag a running one (its worker interrupts it and calls
        mark_canceled, or finish turns it canceled). Finished jobs are unchanged. None if unknown."""
        with self._tx(write=True) as tx:
            if not tx.execute(
                "UPDATE jobs SET status = 'canceled', finished_at = ? WHERE id = ? AND status = 'queued'",
                (time.time(), job_id),
            ):
                tx.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ? AND status = 'running'", (job_id,))
            row = tx.row("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return None if row is None else _job(row)

    def finish(self, job_id: str, result: dict[str, Any], attempt: int | None = None,
               images: Sequence[NewImage] = ()) -> list[str]:
        """Running -> succeeded with ``result``, recording ``images`` in the same transaction. If a
        cancel was requested meanwhile the job becomes canceled instead: its result is discarded and
        its image records deleted; their paths are returned so the caller can delete the files.

        ``attempt`` fences out a superseded run: the job must still be running that attempt (a
        worker presumed dead whose job was re-queued may still deliver a late result). When the
        job is not running that attempt nothing changes and the paths of ``images`` are returned,
        so that the late run's files go and every job keeps exactly one set of images."""
        now = time.time()
        fence, fence_args = _fence(attempt)
        with self._tx(write=True) as tx:
            if tx.execute(
                "UPDATE jobs SET status = 'succeeded', finished_at = ?, result = ?, error = NULL, lease_until = NULL "
                f"WHERE id = ? AND status = 'running' AND cancel_requested = 0{fence}",
                (now, _dumps(result), job_id, *fence_args),
            ):
                for img in images:
                    tx.execute(
                        "INSERT INTO images (id, job_id, owner, path, infotext, seed, idx, created_at) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (img.id, job_id, img.owner, img.path, _text(img.infotext), int(img.seed), int(img.index), now),
                    )
                return []
            if tx.execute(
                f"UPDATE jobs SET status = 'canceled', finished_at = ?, lease_until = NULL WHERE id = ? AND status = 'running'{fence}",
                (now, job_id, *fence_args),
            ):
                return self._drop_images(tx, job_id) + [img.path for img in images]
        return [img.path for img in images]

    def fail(self, job_id: str, error: str, attempt: int | None = None) -> list[str]:
        """Queued or running -> failed with ``error``; returns the paths of dropped image records."""
        return self._end(job_id, "failed", _text(error), attempt)

    def mark_canceled(self, job_id: str, attempt: int | None = None) -> list[str]:
        """Queued or running -> canceled (after the worker interrupted it); returns dropped image paths."""
        return self._end(job_id, "canceled", None, attempt)

    def _end(self, job_id: str, status: str, error: str | None, attempt: int | None = None) -> list[str]:
        fence, fence_args = _fence(attempt)
        with self._tx(write=True) as tx:
            if tx.execute(
                "UPDATE jobs SET status = ?, finished_at = ?, error = ?, lease_until = NULL "
                f"WHERE id = ? AND status IN ('queued', 'running'){fence}",
                (status, time.time(), error, job_id, *fence_args),
            ):
                return self._drop_images(tx, job_id)
        return []

    def requeue(self, job_id: str, attempt: int, reason: str, max_attempts: int = 2, failure: bool = True) -> str | None:
        """Put running ``attempt`` of a job back in the queue at its old place (its worker died,
        stalled, or the server is stopping). ``failure``: the run was lost to a fault and counts
        towards ``max_attempts`` (after which the job fails with ``reason``); a graceful stop does not
        count. A job whose cancel was requested is canceled instead. Returns the new status, or None
        when that attempt is no longer running (someone else already dealt with it)."""
        with self._tx(write=True, lock="queue") as tx:
            row = tx.row("SELECT * FROM jobs WHERE id = ? AND status = 'running' AND attempts = ?", (job_id, int(attempt)))
            if row is None:
                return None
            return self._requeue_row(tx, row, reason, max_attempts, failure, time.time())

    def _requeue_row(self, tx: _Tx, row: dict[str, Any], reason: str, max_attempts: int, failure: bool, now: float) -> str:
        self._drop_images(tx, row["id"])
        failures = row["failures"] + (1 if failure else 0)
        if row["cancel_requested"]:
            status, error = "canceled", None
        elif failures >= max_attempts:
            status, error = "failed", f"{reason} ({row['attempts']} attempt{'s' if row['attempts'] != 1 else ''})"
        else:
            # Keeps created_at, so it goes back to its place near the front of the queue.
            tx.execute(
                "UPDATE jobs SET status = 'queued', started_at = NULL, worker = NULL, dispatcher = NULL, "
                "lease_until = NULL, failures = ?, error = ? WHERE id = ?",
                (failures, _text(reason), row["id"]),
            )
            return "queued"
        tx.execute(
            "UPDATE jobs SET status = ?, finished_at = ?, error = ?, failures = ?, lease_until = NULL WHERE id = ?",
            (status, now, error, failures, row["id"]),
        )
        return status

    def renew_leases(self, dispatcher: str, job_ids: Collection[str], lease: float) -> set[str]:
        """Extend the leases of the jobs this dispatcher is running; returns those it still holds
        (a job missing from the answer was re-queued or ended by someone else: stop running it)."""
        if not job_ids:
            return set()
        marks = ", ".join("?" * len(job_ids))
        with self._tx(write=True) as tx:
            tx.execute(
                f"UPDATE jobs SET lease_until = ? WHERE dispatcher = ? AND status = 'running' AND id IN ({marks})",
                (time.time() + lease, dispatcher, *job_ids),
            )
            rows = tx.rows(
                f"SELECT id FROM jobs WHERE dispatcher = ? AND status = 'running' AND id IN ({marks})", (dispatcher, *job_ids)
            )
        return {r["id"] for r in rows}

    def expire_leases(self, max_attempts: int = 2, now: float | None = None) -> tuple[int, int]:
        """Running jobs whose lease lapsed (their API process died or lost its database) are re-queued,
        or failed after ``max_attempts`` lost runs, or canceled if that was requested. Live jobs of
        other API processes are never touched: their leases are renewed. Returns (requeued, failed)."""
        now = time.time() if now is None else now
        requeued = failed = 0
        with self._tx(write=True, lock="queue") as tx:
            rows = tx.rows(
                "SELECT * FROM jobs WHERE status = 'running' AND (lease_until IS NULL OR lease_until < ?)", (now,)
            )
            for row in rows:
                status = self._requeue_row(tx, row, "the worker running this job stopped answering", max_attempts, True, now)
                requeued += status == "queued"
                failed += status == "failed"
        return requeued, failed

    def running_controls(self, dispatcher: str) -> list[tuple[str, int, bool, int, bool]]:
        """(job id, attempt, cancel requested, skip count, stop requested) of the running jobs of one
        dispatcher: how a cancel, skip or interrupt made through another API process reaches the worker."""
        with self._tx() as tx:
            rows = tx.rows(
                "SELECT id, attempts, cancel_requested, skip_count, stop_requested FROM jobs "
                "WHERE dispatcher = ? AND status = 'running'",
                (dispatcher,),
            )
        return [(r["id"], int(r["attempts"]), bool(r["cancel_requested"]), int(r["skip_count"]), bool(r["stop_requested"]))
                for r in rows]

    def request_stop(self, job_id: str) -> bool:
        """A1111's interrupt of a running job: it ends early and keeps what it made; False if not running."""
        with self._tx(write=True) as tx:
            return bool(tx.execute("UPDATE jobs SET stop_requested = 1 WHERE id = ? AND status = 'running'", (job_id,)))

    def request_skip(self, job_id: str) -> bool:
        """Count a skip request for a running job (its dispatcher tells the worker); False if not running."""
        with self._tx(write=True) as tx:
            return bool(tx.execute("UPDATE jobs SET skip_count = skip_count + 1 WHERE id = ? AND status = 'running'", (job_id,)))

    # ------------------------------------------------------------ events between API processes

    def add_events(self, instance: str, events: Sequence[dict[str, Any]]) -> None:
        """Record job events so that other API processes can relay them to their own clients."""
        if not events:
            return
        now = time.time()
        with self._tx(write=True) as tx:
            for ev in events:
                tx.execute("INSERT INTO job_events (instance, payload, created_at) VALUES (?, ?, ?)", (instance, _dumps(ev), now))

    def events_since(self, last_id: int | None, instance: str, limit: int = 1000) -> tuple[int, list[dict[str, Any]]]:
        """Events of other instances after ``last_id`` (None: start at the newest) -> (new last id, events)."""
        with self._tx() as tx:
            if last_id is None:
                return int(tx.value("SELECT COALESCE(MAX(id), 0) FROM job_events")), []
            rows = tx.rows("SELECT id, instance, payload FROM job_events WHERE id > ? ORDER BY id LIMIT ?", (int(last_id), limit))
        new_last = rows[-1]["id"] if rows else last_id
        return int(new_last), [json.loads(r["payload"]) for r in rows if r["instance"] != instance]

    def prune_events(self, before: float) -> int:
        with self._tx(write=True) as tx:
            return tx.execute("DELETE FROM job_events WHERE created_at < ?", (before,))

    @staticmethod
    def _drop_images(tx: _Tx, job_id: str) -> list[str]:
        paths = [r["path"] for r in tx.rows("SELECT path FROM images WHERE job_id = ? ORDER BY idx", (job_id,))]
        tx.execute("DELETE FROM images WHERE job_id = ?", (job_id,))
        return paths

    # ------------------------------------------------------------ scheduling

    def claim_next(
        self,
        worker: str,
        loaded_models: set[str] | frozenset[str] = frozenset(),
        lookahead: int = 4,
        affinity_max_wait: float = 60.0,
        now: float | None = None,
        dispatcher: str | None = None,
        lease: float = 30.0,
        available: Collection[str] | None = None,
    ) -> Job | None:
        """Atomically take the next job for ``worker`` and mark it running; None if the queue is empty.

        Fair across users (see queue_order), with model affinity: among the first ``lookahead``
        jobs in fair order, one whose model is in ``loaded_models`` goes before a first job that
        would need a model swap, unless that first job has waited over ``affinity_max_wait`` s.
        ``available``: the checkpoints (sha256) the worker can load; jobs needing another are left
        for other workers (None: any). The claim counts an attempt and holds a lease of ``lease``
        seconds for ``dispatcher``, which must renew it while the job runs.
        ``now`` (for tests) stands for the current time in every timestamp this call writes.
        """
        now = time.time() if now is None else now
        where, args = "", ()
        if available is not None:
            keys = sorted(available)
            where = "WHERE q.model_key IS NULL" + (f" OR q.model_key IN ({', '.join('?' * len(keys))})" if keys else "")
            args = tuple(keys)
        with self._tx(write=True, lock="queue") as tx:
            while True:
                candidates = tx.rows(_FAIR_ORDER_SQL.format(cols="q.*", where=where) + " LIMIT ?",
                                     (*args, max(1, int(lookahead))))
                if not candidates:
                    return None
                chosen = _pick(candidates, loaded_models, affinity_max_wait, now)
                # Conditional: on PostgreSQL a concurrent request_cancel (which takes no queue lock)
                # may have canceled it since our SELECT; then pick again.
                if tx.execute(
                    "UPDATE jobs SET status = 'running', attempts = attempts + 1, started_at = ?, worker = ?, "
                    "cancel_requested = 0, stop_requested = 0, dispatcher = ?, lease_until = ? "
                    "WHERE id = ? AND status = 'queued'",
                    (now, worker, dispatcher, now + lease, chosen["id"]),
                ):
                    break
            # Strictly later than anyone served before, so the served user goes to the back even
            # with equal clock readings or clocks that differ between machines.
            latest = tx.value("SELECT MAX(last_served_at) FROM users")
            served = now if latest is None else max(now, latest + 1e-6)
            tx.execute("UPDATE users SET last_served_at = ? WHERE name = ?", (served, chosen["owner"]))
            row = tx.row("SELECT * FROM jobs WHERE id = ?", (chosen["id"],))
        assert row is not None
        return _job(row)

    def queue_order(self, limit: int | None = None) -> list[Job]:
        """Queued jobs in the order they will be claimed, ignoring model affinity."""
        with self._tx() as tx:
            if limit is None:
                rows = tx.rows(_FAIR_ORDER_SQL.format(cols="q.*", where=""))
            else:
                rows = tx.rows(_FAIR_ORDER_SQL.format(cols="q.*", where="") + " LIMIT ?", (max(0, int(limit)),))
        return [_job(r) for r in rows]

    def position(self, job_id: str) -> int | None:
        """Place of a queued job in queue_order() (0 = next); None if it is not queued."""
        with self._tx() as tx:
            if tx.value("SELECT status FROM jobs WHERE id = ?", (job_id,)) != "queued":
                return None
            ids = [r["id"] for r in tx.rows(_FAIR_ORDER_SQL.format(cols="q.id", where=""))]
        return ids.index(job_id) if job_id in ids else None

    def queue_counts(self) -> dict[str, int]:
        """Number of queued jobs per owner (owners with none are absent)."""
        with self._tx() as tx:
            rows = tx.rows("SELECT owner, COUNT(*) AS n FROM jobs WHERE status = 'queued' GROUP BY owner ORDER BY owner")
        return {r["owner"]: int(r["n"]) for r in rows}

    def status_counts(self) -> dict[str, int]:
        """Number of jobs in the store per status (statuses with none are absent)."""
        with self._tx() as tx:
            rows = tx.rows("SELECT status, COUNT(*) AS n FROM jobs GROUP BY status ORDER BY status")
        return {r["status"]: int(r["n"]) for r in rows}

    def ping(self) -> None:
        """A trivial query: raises if the database cannot answer (readiness probes)."""
        with self._tx() as tx:
            tx.value("SELECT 1")

    # ------------------------------------------------------------ images

    def add_image(self, job_id: str, owner: str, path: str, infotext: str, seed: int, index: int) -> ImageRecord:
        """Record an image of a job; ``path`` is relative to the data folder."""
        rec = ImageRecord(uuid.uuid4().hex, job_id, owner, path, _text(infotext), int(seed), int(index), time.time())
        with self._tx(write=True) as tx:
            if tx.value("SELECT 1 FROM jobs WHERE id = ?", (job_id,)) is None:
                raise NotFoundError(f"no job {job_id!r}")
            tx.execute(
                "INSERT INTO images (id, job_id, owner, path, infotext, seed, idx, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (rec.id, rec.job_id, rec.owner, rec.path, rec.infotext, rec.seed, rec.index, rec.created_at),
            )
        return rec

    def get_image(self, image_id: str) -> ImageRecord | None:
        with self._tx() as tx:
            row = tx.row("SELECT * FROM images WHERE id = ?", (image_id,))
        return None if row is None else _image(row)

    def list_images(self, owner: str | None, limit: int = 100, offset: int = 0) -> list[ImageRecord]:
        """Image records, newest first; ``owner=None`` lists everyone's."""
        sql = "SELECT * FROM images" + (" WHERE owner = ?" if owner is not None else "")
        sql += " ORDER BY created_at DESC, idx DESC LIMIT ? OFFSET ?"
        params = (() if owner is None else (owner,)) + (max(0, int(limit)), max(0, int(offset)))
        with self._tx() as tx:
            return [_image(r) for r in tx.rows(sql, params)]

    def delete_image(self, image_id: str) -> bool:
        """Delete the record (not the file; the job's result keeps listing the id)."""
        with self._tx(write=True) as tx:
            return bool(tx.execute("DELETE FROM images WHERE id = ?", (image_id,)))

    def prune(self, finished_before: float) -> tuple[int, list[str]]:
        """Delete jobs that finished before ``finished_before`` and their image records.
        Returns (jobs deleted, the deleted images' paths); deleting the files is the caller's job."""
        cond = f"status IN {_FINISHED_SQL} AND finished_at < ?"
        with self._tx(write=True) as tx:
            paths = [
                r["path"]
                for r in tx.rows(f"SELECT path FROM images WHERE job_id IN (SELECT id FROM jobs WHERE {cond})", (finished_before,))
            ]
            tx.execute(f"DELETE FROM images WHERE job_id IN (SELECT id FROM jobs WHERE {cond})", (finished_before,))
            n = tx.execute(f"DELETE FROM jobs WHERE {cond}", (finished_before,))
        return n, paths


def sqlite_path(url: str | None, data_dir: Path) -> Path | None:
    """The SQLite file of a database URL (``None``: ``data_dir/muralist.db``), or None when the URL
    names another database. A malformed SQLite URL raises ``MuralistError`` saying how to write it."""
    if url is None:
        return data_dir / "muralist.db"
    if not url.startswith("sqlite:"):
        return None
    rest = url[len("sqlite:") :]
    if not rest.startswith("///") or len(rest.strip("/")) == 0 or ":memory:" in rest:
        raise MuralistError(f"bad SQLite URL {url!r}: write sqlite:///absolute/path/muralist.db")
    return Path("/" + rest.lstrip("/"))


def open_store(url: str | None, data_dir: Path, pool_size: int = 8) -> Store:
    """Open (creating and migrating as needed) the store.

    ``None``: SQLite file ``data_dir/muralist.db``. ``sqlite:///abs/path.db`` (``sqlite:////abs``
    works too). ``postgresql://user@host:port/db`` (``postgres://`` too; choose a schema with
    ``?options=-csearch_path%3Dname``).
    """
    path = sqlite_path(url, data_dir)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        return Store(_SQLite(path, pool_size))
    assert url is not None
    if url.startswith(("postgresql://", "postgres://")):
        return Store(_Postgres(url, pool_size))
    raise MuralistError(f"unsupported database URL {redact(url)!r}: use sqlite:///path or postgresql://...")
