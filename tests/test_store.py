"""The persistent store: users, the fair job queue with model affinity, recovery, migrations.

Every test runs on SQLite (a temporary file) and on PostgreSQL when MURALIST_TEST_POSTGRES names a
database (e.g. postgresql://postgres@127.0.0.1:5432/test); each PostgreSQL test gets its own schema,
dropped afterwards.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from muralist.errors import InvalidRequestError, MuralistError, NotFoundError
from muralist.service.store import MIGRATIONS, JobStatus, LimitError, Store, open_store

PG_URL = os.environ.get("MURALIST_TEST_POSTGRES")

Opener = Callable[[], Store]


@pytest.fixture
def pg_url() -> Iterator[str]:
    """The URL of a fresh schema in the MURALIST_TEST_POSTGRES database (dropped afterwards)."""
    if not PG_URL:
        pytest.skip("set MURALIST_TEST_POSTGRES=postgresql://user@host:port/db to run the PostgreSQL tests")
    import psycopg

    schema = f"muralist_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    yield PG_URL + ("&" if "?" in PG_URL else "?") + f"options=-csearch_path%3D{schema}"
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


@pytest.fixture(params=["sqlite", "postgres"])
def opener(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opener]:
    """A function opening a new Store on one fresh database (call it again to "restart")."""
    stores: list[Store] = []
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'db' / 'muralist.db'}"
    else:
        url = request.getfixturevalue("pg_url")

    def open_() -> Store:
        store = open_store(url, tmp_path)
        stores.append(store)
        return store

    yield open_
    for s in stores:
        s.close()


@pytest.fixture
def store(opener: Opener) -> Store:
    s = opener()
    for name in ("alice", "bob", "carol"):
        s.ensure_user(name)
    return s


def claim_all(store: Store, worker: str = "w", **kw) -> list[str]:
    ids = []
    while (job := store.claim_next(worker, **kw)) is not None:
        ids.append(job.id)
    return ids


# ---------------------------------------------------------------- users


def test_users_keys(store: Store) -> None:
    key = store.add_user("dave", admin=True)
    assert key.startswith("mur_") and len(key) == 36
    user = store.user_by_key(key)
    assert user is not None and user.name == "dave" and user.admin and user.has_key and user.created_at > 0
    assert store.user_by_key("mur_" + "x" * 32) is None and store.user_by_key("") is None

    new = store.reset_key("dave")
    assert new != key
    assert store.user_by_key(key) is None  # the old key stops working
    assert store.user_by_key(new).name == "dave"
    with pytest.raises(NotFoundError):
        store.reset_key("nobody")

    with pytest.raises(InvalidRequestError, match="already exists"):
        store.add_user("dave")
    with pytest.raises(InvalidRequestError, match="already exists"):
        store.add_user("DAVE")  # case-insensitive: names become folder names
    for bad in ("", "a b", "x" * 65, "é", "..", "a/b", "a:b"):
        with pytest.raises(InvalidRequestError, match="invalid user name"):
            store.add_user(bad)
    assert store.add_user("a" * 64) and store.add_user("A-b_c.9")

    assert store.remove_user("dave") is True
    assert store.remove_user("dave") is False
    assert store.user_by_key(new) is None and store.get_user("dave") is None


def test_ensure_user_options_limits(store: Store) -> None:
    u = store.ensure_user("local", admin=True)
    assert u.admin and not u.has_key
    assert store.ensure_user("local", admin=False).admin  # existing users are left unchanged
    assert [u.name for u in store.list_users()] == ["alice", "bob", "carol", "local"]

    store.set_user_options("local", {"sd_model_checkpoint": "a", "CLIP_stop_at_last_layers": 2})
    store.set_user_options("local", {"sd_model_checkpoint": "b", "CLIP_stop_at_last_layers": None})
    assert store.get_user("local").options == {"sd_model_checkpoint": "b"}
    store.set_user_limits("local", {"max_queued": 3, "max_steps": 50})
    store.set_user_limits("local", {"max_steps": None})
    assert store.get_user("local").limits == {"max_queued": 3}
    with pytest.raises(NotFoundError):
        store.set_user_options("nobody", {"a": 1})


def test_remove_user_cancels_their_queue(store: Store) -> None:
    running = store.submit("bob", "txt2img", {})
    queued = store.submit("bob", "txt2img", {})
    assert store.claim_next("w").id == running.id
    other = store.submit("alice", "txt2img", {})
    assert store.remove_user("bob")
    assert store.get(queued.id).status is JobStatus.CANCELED
    assert store.get(running.id).cancel_requested
    assert store.get(other.id).status is JobStatus.QUEUED
    # A new "bob" is someone else: he starts empty; the old history is still there for admins.
    store.add_user("bob")
    assert store.list_jobs("bob") == [] and store.list_images("bob") == []
    assert {j.owner.split("~")[0] for j in store.list_jobs(None)} == {"alice", "bob"}
    assert store.get(queued.id).owner.startswith("bob~")


# ---------------------------------------------------------------- jobs


def test_submit_get_list(store: Store) -> None:
    a1 = store.submit("alice", "txt2img", {"prompt": "a cat", "steps": 20}, model_key="m1")
    b1 = store.submit("bob", "txt2img", {"prompt": "ünïcode"}, priority=3)
    a2 = store.submit("alice", "txt2img", {"prompt": "a dog"}, job_id="task(abc123)")
    assert len(a1.id) == 32 and a2.id == "task(abc123)"

    got = store.get(a1.id)
    assert got == a1
    assert got.status is JobStatus.QUEUED and got.params == {"prompt": "a cat", "steps": 20} and got.model_key == "m1"
    assert got.created_at > 0 and got.attempts == 0 and got.result is None
    assert store.get(b1.id).priority == 3 and store.get(b1.id).params["prompt"] == "ünïcode"
    assert store.get("nope") is None

    assert [j.id for j in store.list_jobs("alice")] == [a2.id, a1.id]  # newest first
    assert [j.id for j in store.list_jobs(None)] == [a2.id, b1.id, a1.id]
    assert [j.id for j in store.list_jobs(None, limit=1, offset=1)] == [b1.id]
    store.claim_next("w")
    assert [j.id for j in store.list_jobs(None, [JobStatus.RUNNING])] == [a1.id]
    assert {j.id for j in store.list_jobs(None, [JobStatus.QUEUED, JobStatus.RUNNING])} == {a1.id, a2.id, b1.id}
    assert store.list_jobs("alice", [JobStatus.FAILED]) == []
    assert store.list_jobs("alice", []) == []

    with pytest.raises(InvalidRequestError, match="already exists"):
        store.submit("alice", "txt2img", {}, job_id="task(abc123)")
    with pytest.raises(InvalidRequestError, match="invalid job id"):
        store.submit("alice", "txt2img", {}, job_id="has space")
    with pytest.raises(NotFoundError, match="no user"):
        store.submit("nobody", "txt2img", {})


def test_cancel_finish_fail(store: Store) -> None:
    running = store.submit("alice", "txt2img", {})
    queued = store.submit("alice", "txt2img", {})
    assert store.claim_next("w1").id == running.id

    q = store.request_cancel(queued.id)
    assert q.status is JobStatus.CANCELED and q.finished_at is not None
    r = store.request_cancel(running.id)
    assert r.status is JobStatus.RUNNING and r.cancel_requested
    assert store.request_cancel("nope") is None

    # Finishing a job whose cancel was requested cancels it and drops its images.
    store.add_image(running.id, "alice", "outputs/alice/1.png", "a cat", 1, 0)
    assert store.finish(running.id, {"images": ["x"]}) == ["outputs/alice/1.png"]
    done = store.get(running.id)
    assert done.status is JobStatus.CANCELED and done.result is None and done.finished_at is not None
    assert store.list_images("alice") == []
    # Finished jobs do not change any more.
    assert store.request_cancel(running.id).status is JobStatus.CANCELED
    assert store.finish(running.id, {}) == [] and store.get(running.id).status is JobStatus.CANCELED

    ok = store.submit("alice", "txt2img", {})
    bad = store.submit("alice", "txt2img", {})
    stopped = store.submit("alice", "txt2img", {})
    for _ in range(3):
        store.claim_next("w1")
    img = store.add_image(ok.id, "alice", "outputs/alice/2.png", "a dog\nSteps: 20", 42, 0)
    assert store.finish(ok.id, {"images": [img.id], "seeds": [42]}) == []
    j = store.get(ok.id)
    assert j.status is JobStatus.SUCCEEDED and j.result == {"images": [img.id], "seeds": [42]} and j.finished_at >= j.started_at
    assert store.get_image(img.id) == img

    store.fail(bad.id, "CUDA out of memory")
    j = store.get(bad.id)
    assert j.status is JobStatus.FAILED and j.error == "CUDA out of memory"
    store.mark_canceled(stopped.id)
    assert store.get(stopped.id).status is JobStatus.CANCELED
    assert store.list_jobs("alice", [JobStatus.QUEUED, JobStatus.RUNNING]) == []


def test_images_and_prune(store: Store) -> None:
    jobs = [store.submit("alice", "txt2img", {}) for _ in range(2)] + [store.submit("bob", "txt2img", {})]
    for _ in jobs:
        store.claim_next("w")
    recs = [store.add_image(j.id, j.owner, f"outputs/{j.owner}/{j.id}-{i}.png", f"text {i}", 2**32 + i, i)
            for j in jobs for i in range(2)]
    assert recs[0].seed == 2**32  # seeds above 32 bits fit
    assert [r.id for r in store.list_images("alice")] == [r.id for r in reversed(recs[:4])]
    assert len(store.list_images(None)) == 6 and len(store.list_images(None, limit=2, offset=5)) == 1
    with pytest.raises(NotFoundError):
        store.add_image("nope", "alice", "x.png", "", 1, 0)
    assert store.delete_image(recs[0].id) and not store.delete_image(recs[0].id)
    assert store.get_image(recs[0].id) is None

    for j in jobs:
        store.finish(j.id, {"images": []})
    queued = store.submit("bob", "txt2img", {})  # unfinished jobs are never pruned
    assert store.prune(time.time() - 3600) == (0, [])
    n, paths = store.prune(store.get(jobs[2].id).finished_at)  # strictly before: alice's two jobs
    assert n == 2 and sorted(paths) == sorted(r.path for r in recs[1:4])
    n, paths = store.prune(time.time() + 1)
    assert n == 1 and sorted(paths) == sorted(r.path for r in recs[4:])
    assert store.list_images(None) == [] and [j.id for j in store.list_jobs(None)] == [queued.id]


# ---------------------------------------------------------------- scheduling


def test_fairness_across_users(store: Store) -> None:
    a = [store.submit("alice", "txt2img", {"n": i}) for i in range(5)]
    b = store.submit("bob", "txt2img", {})
    order = claim_all(store)
    assert order[:2] == [a[0].id, b.id]  # bob's job is second, not sixth
    assert order == [a[0].id, b.id] + [j.id for j in a[1:]]
    claimed = store.get(b.id)
    assert claimed.status is JobStatus.RUNNING and claimed.attempts == 1 and claimed.worker == "w"
    assert claimed.started_at is not None
    assert store.get_user("bob").last_served_at > store.get_user("alice").last_served_at - 10


def test_least_recently_served_goes_first(store: Store) -> None:
    store.submit("alice", "txt2img", {})
    claim_all(store)  # alice was just served
    b = store.submit("bob", "txt2img", {})
    a = store.submit("alice", "txt2img", {})  # older than carol's job, but alice was served lately
    c = store.submit("carol", "txt2img", {})
    assert [j.id for j in store.queue_order()] == [b.id, c.id, a.id]
    assert claim_all(store) == [b.id, c.id, a.id]


def test_priorities_within_a_user(store: Store) -> None:
    low = store.submit("alice", "txt2img", {})
    high = store.submit("alice", "txt2img", {}, priority=5)
    low2 = store.submit("alice", "txt2img", {})
    mid = store.submit("alice", "txt2img", {}, priority=1)
    assert claim_all(store) == [high.id, mid.id, low.id, low2.id]


def test_model_affinity(store: Store) -> None:
    first = store.submit("alice", "txt2img", {}, model_key="m1")
    later = store.submit("bob", "txt2img", {}, model_key="m2")
    # With m2 loaded, bob's m2 job goes before alice's m1 job...
    assert store.claim_next("w", loaded_models={"m2"}).id == later.id
    # ...and without an m2 job left, the m1 job runs.
    assert store.claim_next("w", loaded_models={"m2"}).id == first.id


def test_model_affinity_limited_by_lookahead(store: Store) -> None:
    m1 = [store.submit("alice", "txt2img", {}, model_key="m1") for _ in range(4)]
    m2 = store.submit("alice", "txt2img", {}, model_key="m2")  # fifth in fair order
    assert store.claim_next("w", loaded_models={"m2"}, lookahead=4).id == m1[0].id
    # Now it is fourth: within reach.
    assert store.claim_next("w", loaded_models={"m2"}, lookahead=4).id == m2.id


def test_model_affinity_yields_to_old_jobs(store: Store) -> None:
    m1 = store.submit("alice", "txt2img", {}, model_key="m1")
    store.submit("bob", "txt2img", {}, model_key="m2")
    # The m1 job has waited past affinity_max_wait: it goes first, loaded model or not.
    job = store.claim_next("w", loaded_models={"m2"}, affinity_max_wait=60, now=m1.created_at + 61)
    assert job.id == m1.id and job.started_at == pytest.approx(m1.created_at + 61)


def test_model_affinity_without_model_key(store: Store) -> None:
    plain = store.submit("alice", "extras", {})  # needs no checkpoint: never makes others wait
    store.submit("bob", "txt2img", {}, model_key="m2")
    assert store.claim_next("w", loaded_models={"m2"}).id == plain.id


def test_queue_order_and_position_match_claims(store: Store) -> None:
    jobs = []
    for i, (owner, prio) in enumerate(
        [("alice", 0), ("alice", 0), ("alice", 2), ("bob", 0), ("carol", 1), ("bob", 5), ("carol", 0), ("alice", 0)]
    ):
        jobs.append(store.submit(owner, "txt2img", {"i": i}, priority=prio))
    predicted = [j.id for j in store.queue_order()]
    assert sorted(predicted) == sorted(j.id for j in jobs)
    assert [j.id for j in store.queue_order(limit=3)] == predicted[:3]
    assert [store.position(i) for i in predicted] == list(range(len(predicted)))
    assert store.queue_counts() == {"alice": 4, "bob": 2, "carol": 2}

    claimed = store.claim_next("w")
    assert claimed.id == predicted[0]
    assert store.position(claimed.id) is None and store.position("nope") is None
    assert store.position(predicted[1]) == 0
    # After each claim the prediction still holds for the rest.
    assert [claimed.id] + claim_all(store) == predicted
    assert store.queue_counts() == {}


def test_concurrent_claims(opener: Opener) -> None:
    shared = opener()
    users = [f"u{i}" for i in range(5)]
    for u in users:
        shared.ensure_user(u)
    ids = {shared.submit(users[i % 5], "txt2img", {"i": i}).id for i in range(50)}
    # Half the threads share one Store; the others each have their own (like separate processes).
    stores = [shared] * 4 + [opener() for _ in range(4)]
    got: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(len(stores))
    errors: list[BaseException] = []

    def work(s: Store, n: int) -> None:
        try:
            barrier.wait()
            while (job := s.claim_next(f"w{n}")) is not None:
                with lock:
                    got.append(job.id)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(s, n)) for n, s in enumerate(stores)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert len(got) == 50 and set(got) == ids  # each job exactly once
    assert all(j.attempts == 1 for j in shared.list_jobs(None, [JobStatus.RUNNING]))
    assert len(shared.list_jobs(None, [JobStatus.RUNNING])) == 50


def test_concurrent_submits_respect_limit(opener: Opener) -> None:
    stores = [opener() for _ in range(4)]
    stores[0].ensure_user("alice")
    results: list[str] = []
    lock = threading.Lock()

    def work(s: Store) -> None:
        for _ in range(5):
            try:
                s.submit("alice", "txt2img", {}, max_queued=7)
                outcome = "ok"
            except LimitError:
                outcome = "limit"
            with lock:
                results.append(outcome)

    threads = [threading.Thread(target=work, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert Counter(results) == {"ok": 7, "limit": 13}


def test_limit_max_queued(store: Store) -> None:
    first = store.submit("alice", "txt2img", {}, max_queued=2)
    store.submit("alice", "txt2img", {}, max_queued=2)
    store.claim_next("w")  # running jobs count too
    with pytest.raises(LimitError, match="max_queued=2") as err:
        store.submit("alice", "txt2img", {}, max_queued=2)
    assert err.value.http_status == 429 and isinstance(err.value, MuralistError)
    store.submit("bob", "txt2img", {}, max_queued=2)  # per user
    store.finish(first.id, {"images": []})
    store.submit("alice", "txt2img", {}, max_queued=2)


# ---------------------------------------------------------------- persistence, recovery, migrations


def test_persistence(opener: Opener) -> None:
    s = opener()
    key = s.add_user("alice")
    jobs = [s.submit("alice", "txt2img", {"i": i}) for i in range(3)]
    s.claim_next("w")
    s.close()
    with pytest.raises(RuntimeError):
        s.get(jobs[0].id)

    s2 = opener()
    assert s2.user_by_key(key).name == "alice"
    assert [j.id for j in s2.queue_order()] == [j.id for j in jobs[1:]]
    assert s2.get(jobs[0].id).status is JobStatus.RUNNING
    assert s2.get(jobs[1].id).params == {"i": 1}


def test_leases_recover_only_dead_dispatchers_jobs(opener: Opener) -> None:
    s = opener()
    s.ensure_user("alice")
    job = s.submit("alice", "txt2img", {})
    other = s.submit("alice", "txt2img", {})
    s.claim_next("A-w0", dispatcher="A", lease=30)
    s.claim_next("B-w0", dispatcher="B", lease=30)
    s.add_image(job.id, "alice", "partial.png", "", 1, 0)
    s.close()  # API process A dies with its job running; B lives on

    s = opener()  # a new API process starts: it touches no live lease
    assert s.expire_leases() == (0, 0)
    assert s.get(job.id).status is JobStatus.RUNNING and s.get(other.id).status is JobStatus.RUNNING
    assert s.renew_leases("B", [other.id], lease=60) == {other.id}  # B keeps renewing
    assert s.renew_leases("B", [job.id], lease=30) == set()  # not B's job

    later = time.time() + 31  # A's lease lapses
    assert s.expire_leases(now=later) == (1, 0)
    j = s.get(job.id)
    assert j.status is JobStatus.QUEUED and j.worker is None and j.dispatcher is None and j.attempts == 1
    assert j.failures == 1 and j.started_at is None
    assert s.list_images("alice") == []  # the partial result is gone
    assert s.get(other.id).status is JobStatus.RUNNING
    assert s.position(job.id) == 0
    again = s.claim_next("C-w0", dispatcher="C", lease=30)
    assert again.id == job.id and again.attempts == 2

    # The second lost run fails the job (max_attempts=2), naming the reason.
    assert s.expire_leases(max_attempts=2, now=time.time() + 3600) == (1, 1)  # other: re-queued; job: failed
    j = s.get(job.id)
    assert j.status is JobStatus.FAILED and "stopped answering (2 attempts)" in j.error and j.finished_at is not None

    # A job whose cancel was requested is canceled, not run again.
    assert s.claim_next("w", dispatcher="C").id == other.id
    s.request_cancel(other.id)
    assert s.expire_leases(now=time.time() + 3600) == (0, 0) and s.get(other.id).status is JobStatus.CANCELED


def test_attempt_fencing(store: Store) -> None:
    from muralist.service.store import NewImage

    job = store.submit("alice", "txt2img", {})
    first = store.claim_next("w1", dispatcher="A")
    assert first.attempts == 1
    assert store.requeue(job.id, 1, "worker w1 died") == "queued"
    assert store.requeue(job.id, 1, "worker w1 died") is None  # already dealt with
    second = store.claim_next("w2", dispatcher="A")
    assert second.attempts == 2 and second.failures == 1
    # The presumed-dead first run delivers late: dropped, its files are the caller's to delete.
    late = [NewImage("outputs/late.png", "alice", "", 1, 0)]
    assert store.finish(job.id, {"images": ["late"]}, attempt=1, images=late) == ["outputs/late.png"]
    assert store.fail(job.id, "late failure", attempt=1) == [] and store.get(job.id).status is JobStatus.RUNNING
    good = [NewImage("outputs/good.png", "alice", "text", 7, 0)]
    assert store.finish(job.id, {"images": [good[0].id]}, attempt=2, images=good) == []
    j = store.get(job.id)
    assert j.status is JobStatus.SUCCEEDED and [i.path for i in store.list_images("alice")] == ["outputs/good.png"]
    assert store.get_image(good[0].id).infotext == "text"


def test_graceful_requeue_does_not_count_as_a_failure(store: Store) -> None:
    job = store.submit("alice", "txt2img", {})
    for attempt in (1, 2, 3):
        assert store.claim_next("w", dispatcher="A").attempts == attempt
        assert store.requeue(job.id, attempt, "server stopping", max_attempts=2, failure=False) == "queued"
    assert store.get(job.id).failures == 0
    store.claim_next("w", dispatcher="A")
    assert store.requeue(job.id, 4, "worker died", max_attempts=1) == "failed"


def test_claim_only_jobs_the_worker_can_load(store: Store) -> None:
    a = store.submit("alice", "txt2img", {}, model_key="A")
    b = store.submit("bob", "txt2img", {}, model_key="B")
    plain = store.submit("carol", "extras", {})
    assert store.claim_next("w", available={"B"}).id == b.id
    assert store.claim_next("w", available=set()).id == plain.id
    assert store.claim_next("w", available={"B"}) is None  # A waits for a worker that has it
    assert store.claim_next("w", available=None).id == a.id


def test_controls_and_events_between_processes(opener: Opener) -> None:
    s1, s2 = opener(), opener()
    s1.ensure_user("alice")
    job = s1.submit("alice", "txt2img", {})
    s1.claim_next("w", dispatcher="A")
    assert s2.request_skip(job.id) and s2.request_stop(job.id) and s2.request_cancel(job.id).cancel_requested
    assert s1.running_controls("A") == [(job.id, 1, True, 1, True)] and s1.running_controls("B") == []
    last, _ = s2.events_since(None, "B")
    s1.add_events("A", [{"type": "progress", "job_id": job.id, "owner": "alice", "step": 1}])
    s2.add_events("B", [{"type": "progress", "job_id": job.id, "owner": "alice", "step": 2}])
    last2, events = s2.events_since(last, "B")
    assert [e["step"] for e in events] == [1] and last2 > last  # its own events are not relayed back
    assert s1.events_since(last2, "A") == (last2, [])
    assert s1.prune_events(time.time() + 1) == 2


def test_migrations(opener: Opener) -> None:
    s = opener()
    assert s.schema_version() == len(MIGRATIONS)

    def versions(store: Store) -> list[tuple[int, float]]:
        with store._tx() as tx:
            return [(r["version"], r["applied_at"]) for r in tx.rows("SELECT * FROM schema_version ORDER BY version")]

    before = versions(s)
    assert [v for v, _ in before] == list(range(1, len(MIGRATIONS) + 1))
    s.close()
    s2 = opener()
    s3 = opener()
    assert versions(s2) == before == versions(s3)  # not applied again
    s2.ensure_user("alice")  # and the tables work

    # A database from a newer muralist is refused, not damaged.
    with s3._tx(write=True) as tx:
        tx.execute("INSERT INTO schema_version (version, applied_at) VALUES (?, ?)", (len(MIGRATIONS) + 1, 0.0))
    with pytest.raises(MuralistError, match="newer"):
        opener()


def test_concurrent_open_of_a_fresh_database(opener: Opener) -> None:
    stores: list[Store] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def work() -> None:
        try:
            barrier.wait()
            stores.append(opener())
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and len(stores) == 4
    assert all(s.schema_version() == len(MIGRATIONS) for s in stores)


def test_open_store_urls(tmp_path: Path) -> None:
    s = open_store(None, tmp_path / "data")
    assert s.backend == "sqlite" and (tmp_path / "data" / "muralist.db").is_file()
    s.close()
    for url in (f"sqlite:///{tmp_path}/x.db", f"sqlite:////{tmp_path}/y.db"):
        open_store(url, tmp_path).close()
    assert (tmp_path / "x.db").is_file() and (tmp_path / "y.db").is_file()
    for bad in ("mysql://x", "sqlite://x.db", "sqlite:///:memory:"):
        with pytest.raises(MuralistError):
            open_store(bad, tmp_path)


# ---------------------------------------------------------------- PostgreSQL connections


def _backend_pids(store: Store, calls: int) -> set[int]:
    pids = set()
    for _ in range(calls):  # the pool hands out its idle connections in turn
        with store._tx() as tx:
            pids.add(int(tx.value("SELECT pg_backend_pid()")))
    return pids


def test_dropped_connections_are_replaced(pg_url: str, tmp_path: Path) -> None:
    import psycopg

    store = open_store(pg_url, tmp_path, pool_size=2)
    try:
        store.ensure_user("alice")
        pids = _backend_pids(store, 4)
        # As a server restart, an idle timeout or an admin would: the pooled connections die while idle.
        with psycopg.connect(PG_URL, autocommit=True) as admin:
            for pid in pids:
                assert admin.execute("SELECT pg_terminate_backend(%s, 5000)", (pid,)).fetchone()[0]
        job = store.submit("alice", "txt2img", {"i": 1})  # no error: fresh connections took their place
        assert store.claim_next("w").id == job.id
        assert not _backend_pids(store, 4) & pids
    finally:
        store.close()


class _Relay:
    """A TCP relay to the PostgreSQL server that a test can cut (the server "goes down") and restore."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.port = 0  # chosen on the first start, kept on restarts
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()

    def start(self) -> None:
        listener = socket.create_server(("127.0.0.1", self.port))
        self.port = listener.getsockname()[1]
        self._track(listener)
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def stop(self) -> None:
        with self._lock:
            socks, self._socks = self._socks, []
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def _track(self, s: socket.socket) -> None:
        with self._lock:
            self._socks.append(s)

    def _accept(self, listener: socket.socket) -> None:
        with contextlib.suppress(OSError):  # the listener was closed
            while True:
                client, _ = listener.accept()
                server = socket.create_connection(self.target)
                self._track(client)
                self._track(server)
                for a, b in ((client, server), (server, client)):
                    threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


def test_database_outage_is_a_clear_error_and_the_store_recovers(
    pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from muralist.service import store as store_module

    monkeypatch.setattr(store_module._Postgres, "WAIT_TIMEOUT", 2.0)
    parts = urlsplit(pg_url)
    relay = _Relay(parts.hostname or "127.0.0.1", parts.port or 5432)
    relay.start()
    credentials = parts.netloc.rpartition("@")[0]
    netloc = (credentials + "@" if credentials else "") + f"127.0.0.1:{relay.port}"
    store = open_store(urlunsplit(parts._replace(netloc=netloc)), tmp_path)
    try:
        store.ensure_user("alice")
        relay.stop()
        t0 = time.monotonic()
        with pytest.raises(MuralistError, match=r"no connection to PostgreSQL at .* within 2 s"):
            store.submit("alice", "txt2img", {})
        assert time.monotonic() - t0 < 10
        relay.start()
        deadline = time.monotonic() + 20
        while True:  # the pool reconnects with a backoff; callers retry as the dispatchers do
            try:
                job = store.submit("alice", "txt2img", {})
                break
            except MuralistError:
                assert time.monotonic() < deadline, "the store did not recover after the server came back"
        assert store.get(job.id).status is JobStatus.QUEUED
    finally:
        store.close()
        relay.stop()


def test_unreachable_postgres_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))  # a port nobody listens on
        port = s.getsockname()[1]
    t0 = time.monotonic()
    with pytest.raises(MuralistError, match=r"cannot connect to PostgreSQL at postgresql://muralist:\*\*\*@127\.0\.0\.1"):
        open_store(f"postgresql://muralist:secret@127.0.0.1:{port}/muralist", tmp_path)
    assert time.monotonic() - t0 < 5  # at once, not after the pool's timeout
    with pytest.raises(MuralistError, match="cannot connect to PostgreSQL"):
        open_store("postgresql://127.0.0.1:notaport/muralist", tmp_path)


def test_unknown_postgres_database_is_a_clear_error(pg_url: str, tmp_path: Path) -> None:
    url = urlunsplit(urlsplit(pg_url)._replace(path="/muralist_no_such_database"))
    with pytest.raises(MuralistError, match="muralist_no_such_database"):
        open_store(url, tmp_path)
