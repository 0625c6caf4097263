"""Prometheus metrics of one API process (``GET /metrics``).

Queue and job counts come from the shared database at scrape time, so every API process of a
deployment reports the same totals; step times, worker states and model loads are this process's
own (its dispatcher's workers). Each Service has its own registry: several services in one process
(tests, embedding) never mix their numbers.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector

from .store import JobStatus

if TYPE_CHECKING:
    from .core import Service

log = logging.getLogger("muralist.metrics")

WORKER_STATES = ("idle", "busy", "down", "stalled")
# From tiny test models on a CPU (milliseconds) to SDXL at high resolution on a slow GPU (seconds).
STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self, service: Service) -> None:
        self.registry = CollectorRegistry()
        self.step_seconds = Histogram("muralist_step_seconds", "Time of one sampling step of a txt2img/img2img job",
                                      buckets=STEP_BUCKETS, registry=self.registry)
        self.registry.register(_ServiceCollector(service))
        ProcessCollector(registry=self.registry)  # CPU seconds, memory, open files (reads /proc: cheap)

    def observe_steps(self, seconds: float, steps: int) -> None:
        """``steps`` sampling steps took ``seconds`` together (progress events may skip steps)."""
        for _ in range(max(steps, 0)):
            self.step_seconds.observe(seconds / steps)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _ServiceCollector:
    def __init__(self, service: Service) -> None:
        self.service = service

    def collect(self) -> Iterator[Metric]:
        store = self.service.store
        up = GaugeMetricFamily("muralist_database_up", "1 if the job database answered this scrape")
        try:
            queued, statuses = store.queue_counts(), store.status_counts()
        except Exception as e:  # the rest of the metrics stay useful while the database is away
            log.warning("metrics: the database did not answer: %s", type(e).__name__)
            up.add_metric([], 0)
            yield up
        else:
            up.add_metric([], 1)
            yield up
            queue = GaugeMetricFamily("muralist_queue_jobs", "Jobs waiting in the queue, per user", labels=["user"])
            for user, n in sorted(queued.items()):
                queue.add_metric([user], n)
            yield queue
            jobs = GaugeMetricFamily("muralist_jobs", "Jobs in the database by status (finished ones until pruned)",
                                     labels=["status"])
            for status in JobStatus:
                jobs.add_metric([status.value], statuses.get(status.value, 0))
            yield jobs
        workers = self.service.workers()
        states = GaugeMetricFamily("muralist_workers", "Workers of this API process by state", labels=["state"])
        for state in sorted(set(WORKER_STATES) | {w["state"] for w in workers}):
            states.add_metric([state], sum(w["state"] == state for w in workers))
        yield states
        loads = CounterMetricFamily("muralist_model_loads", "Checkpoints loaded by each worker since it started",
                                    labels=["worker"])
        for w in workers:
            if w.get("loads") is not None:
                loads.add_metric([w["name"]], w["loads"])
        yield loads
