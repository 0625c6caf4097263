"""Workers on other machines as Ray Core actors (``muralist worker --cluster HOST:PORT``).

Each device of a machine gets one detached, named actor wrapping a ``Worker``; it is pinned to its
node (it reads that machine's model folders) and restarted by Ray if its process dies (its models
are then gone, and the dispatcher re-queues the job it was running). Calls that must answer while
a job runs (info, interrupt, skip, attach) live in their own concurrency group.

Ray is imported only here: ``muralist serve`` without ``--cluster`` never needs it.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Iterator
from typing import Any

from ..errors import MuralistError
from .local import WorkerLost

log = logging.getLogger("muralist.cluster")

NAMESPACE = "muralist"
PREFIX = "worker:"
DEFAULT_PORT = 6380  # Ray's own default, 6379, is Redis's port


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise MuralistError("the cluster needs Ray: pip install 'muralist[cluster]' (ray 2.60)") from None
    return ray


def auth_env() -> None:
    """Ray 2.60 clusters authenticate with a shared token; a node or driver joining an explicit
    address does not turn token mode on by itself."""
    if os.environ.get("RAY_AUTH_TOKEN") and not os.environ.get("RAY_AUTH_MODE"):
        os.environ["RAY_AUTH_MODE"] = "token"


def ray_get(refs: Any, timeout: float | None = None) -> Any:
    return _ray().get(refs, timeout=timeout)


def connect(address: str, **kwargs: Any) -> Any:
    """Join the Ray cluster at ``address`` (HOST:PORT) as a driver, in muralist's namespace."""
    ray = _ray()
    if ray.is_initialized():
        return ray
    auth_env()
    try:
        ray.init(address=address, namespace=NAMESPACE, logging_level=logging.WARNING, log_to_driver=False, **kwargs)
    except Exception as e:  # ConnectionError, auth errors: say what to check
        raise MuralistError(
            f"cannot join the Ray cluster at {address}: {str(e).splitlines()[0] if str(e) else type(e).__name__}. "
            "Is the head running (muralist cluster start-head), and are RAY_AUTH_MODE=token and the same "
            "RAY_AUTH_TOKEN set here?"
        ) from None
    return ray


def _actor_class() -> Any:
    ray = _ray()

    @ray.remote(concurrency_groups={"control": 4})
    class WorkerActor:
        def __init__(self, **kwargs: Any) -> None:
            from .worker import Worker

            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
            self.worker = Worker(**kwargs)

        def run(self, job: dict[str, Any]) -> Iterator[dict[str, Any]]:
            yield from self.worker.run(job)

        @ray.method(concurrency_group="control")
        def info(self) -> dict[str, Any]:
            return self.worker.info()

        @ray.method(concurrency_group="control")
        def attach(self, owner: str, ttl: float) -> bool:
            return self.worker.attach(owner, ttl)

        @ray.method(concurrency_group="control")
        def detach(self, owner: str) -> None:
            self.worker.detach(owner)

        @ray.method(concurrency_group="control")
        def interrupt(self, job_id: str, attempt: int | None = None) -> bool:
            return self.worker.interrupt(job_id, attempt)

        @ray.method(concurrency_group="control")
        def skip(self, job_id: str, attempt: int | None = None) -> bool:
            return self.worker.skip(job_id, attempt)

        @ray.method(concurrency_group="control")
        def stop_early(self, job_id: str, attempt: int | None = None) -> bool:
            return self.worker.stop_early(job_id, attempt)

    return WorkerActor


def actor_name(worker_name: str) -> str:
    return PREFIX + worker_name


def worker_name(name: str, device: str, count: int) -> str:
    """``name`` for a machine's only device, else ``name-cuda1`` etc."""
    return name if count == 1 else f"{name}-{re.sub(r'[^A-Za-z0-9]+', '', device)}"


def start_workers(devices: list[str], name: str, data_dir: str, node_id: str | None = None,
                  folders: dict[str, str] | None = None, max_loaded_models: int = 2,
                  max_model_bytes: int | None = None) -> list[Any]:
    """Create (or find, if already running) one detached worker actor per device on node ``node_id``
    (default: this machine's node). Returns the actor handles once each answers."""
    ray = _ray()
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node_id = node_id or ray.get_runtime_context().get_node_id()
    cls = _actor_class()
    actors = []
    for device in devices:
        wname = worker_name(name, device, len(devices))
        options: dict[str, Any] = {
            "name": actor_name(wname), "namespace": NAMESPACE, "lifetime": "detached", "get_if_exists": True,
            "max_restarts": -1, "max_task_retries": 0, "num_cpus": 0,
            "scheduling_strategy": NodeAffinitySchedulingStrategy(node_id, soft=False),
            # The device string is used as given ("cuda:1"): Ray must not renumber the GPUs.
            "runtime_env": {"env_vars": {"RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1"}},
        }
        actors.append(cls.options(**options).remote(
            name=wname, device=device, data_dir=data_dir, folders=folders, max_loaded_models=max_loaded_models,
            max_model_bytes=max_model_bytes, node=node_id[:12]))
    ray.get([a.info.remote() for a in actors])  # constructed and answering
    return actors


def leave_workers(names: list[str], wait: float = 15.0) -> None:
    """Take workers out of a cluster politely (``muralist worker`` on SIGTERM): a running job is
    interrupted, so its dispatcher re-queues it as not failed (it keeps its attempts for real
    failures), then the actors go. A worker that does not stop in time is killed all the same."""
    import time

    ray = _ray()
    actors = []
    for wname in names:
        try:
            actors.append(ray.get_actor(actor_name(wname), namespace=NAMESPACE))
        except ValueError:
            pass  # already gone
    deadline = time.monotonic() + wait
    while actors and time.monotonic() < deadline:
        try:
            infos = ray.get([a.info.remote() for a in actors], timeout=5)
        except Exception:  # not answering: nothing to wait for
            break
        busy = [(a, i) for a, i in zip(actors, infos, strict=True) if i["job_id"]]
        if not busy:
            break
        for a, info in busy:  # again each round: a job claimed meanwhile is handed back too
            a.interrupt.remote(info["job_id"], info["attempt"])
        time.sleep(0.2)
    stop_workers(names)


def stop_workers(names: list[str]) -> None:
    ray = _ray()
    for wname in names:
        try:
            ray.kill(ray.get_actor(actor_name(wname), namespace=NAMESPACE), no_restart=True)
        except ValueError:
            pass  # already gone


class RayHandle:
    """The dispatcher's side of one worker actor."""

    def __init__(self, actor: Any, name: str) -> None:
        self.actor = actor
        self.name = name
        self._ray = _ray()

    def _get(self, ref: Any, timeout: float | None = 5.0) -> Any:
        try:
            return self._ray.get(ref, timeout=timeout)
        except self._ray.exceptions.GetTimeoutError:
            raise WorkerLost(f"worker {self.name} did not answer within {timeout:g} s") from None
        except self._ray.exceptions.RayError as e:  # died, unschedulable (its machine is gone)
            raise WorkerLost(f"worker {self.name} is unavailable: {type(e).__name__}") from None

    def attach(self, owner: str, ttl: float) -> bool:
        return bool(self._get(self.actor.attach.remote(owner, ttl)))

    def detach(self, owner: str) -> None:
        self.actor.detach.remote(owner)

    def info(self) -> dict[str, Any]:
        return self._get(self.actor.info.remote())

    def run(self, job: dict[str, Any]) -> Iterator[dict[str, Any]]:
        gen = self.actor.run.remote(job)
        try:
            for ref in gen:
                yield self._get(ref, timeout=None)
        except self._ray.exceptions.RayActorError as e:
            raise WorkerLost(f"worker {self.name} died: {type(e).__name__}") from None
        except self._ray.exceptions.RayError as e:  # unschedulable (its machine is gone), task errors...
            raise WorkerLost(f"worker {self.name} failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None

    def interrupt(self, job_id: str, attempt: int | None = None) -> None:
        self.actor.interrupt.remote(job_id, attempt)

    def skip(self, job_id: str, attempt: int | None = None) -> None:
        self.actor.skip.remote(job_id, attempt)

    def stop_early(self, job_id: str, attempt: int | None = None) -> None:
        self.actor.stop_early.remote(job_id, attempt)

    def kill(self) -> None:
        # Restarted by Ray (max_restarts=-1) in a fresh process; the hung one is gone.
        self._ray.kill(self.actor, no_restart=False)


class RayDiscovery:
    """Finds the worker actors in the cluster (they come and go with their machines)."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._handles: dict[str, RayHandle] = {}
        self._ray: Any = None

    def __call__(self) -> list[RayHandle]:
        if self._ray is None:
            self._ray = connect(self.address)
        ray = self._ray
        names = sorted(
            n["name"] if isinstance(n, dict) else n
            for n in ray.util.list_named_actors(all_namespaces=False)
        )
        found = {}
        for full in names:
            if not full.startswith(PREFIX):
                continue
            wname = full[len(PREFIX):]
            handle = self._handles.get(wname)
            if handle is None:
                try:
                    handle = RayHandle(ray.get_actor(full, namespace=NAMESPACE), wname)
                except ValueError:
                    continue
            found[wname] = handle
        self._handles = found
        return list(found.values())


def start_head(port: int, token: str | None, extra: list[str] | None = None) -> tuple[list[str], dict[str, str]]:
    """The ``ray start --head`` command line and environment muralist uses (token auth on)."""
    import secrets

    env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token or secrets.token_hex(24)}
    cmd = ["ray", "start", "--head", f"--port={port}", "--num-cpus=0", "--num-gpus=0", "--include-dashboard=false",
           *(extra or [])]
    return cmd, env


def wait_for_node(timeout: float = 60.0) -> str:
    """This machine's node id once ``ray start`` has joined it (the driver connects through it)."""
    ray = _ray()
    deadline = time.monotonic() + timeout
    while True:
        node_id = ray.get_runtime_context().get_node_id()
        if node_id:
            return node_id
        if time.monotonic() > deadline:
            raise MuralistError("this machine did not join the Ray cluster")
        time.sleep(0.5)
