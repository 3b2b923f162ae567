"""Prometheus metrics of the operator, served over aiohttp on the metrics port."""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from kubetune.api import Phase
from kubetune.api.status import JobStatusBase

# Returns the snapshot (apiVersion, kind, metadata, spec, status) of every job the operator
# knows, read at scrape time.
JobSource = Callable[[], Iterable[Mapping[str, Any]]]

# Queue waits and job durations run from seconds (a rejected spec) to days (a long training run).
DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 43200, 86400, 259200)


class _JobGauges(Collector):
    """Gauges read from the jobs at scrape time: counts by phase, and the throughput rank 0
    reports in status.progress of each running job."""

    def __init__(self, jobs: JobSource) -> None:
        self._jobs = jobs

    def collect(self) -> Iterator[GaugeMetricFamily]:
        phases = GaugeMetricFamily(
            "kubetune_jobs", "Jobs known to the operator, by kind and phase.", labels=["kind", "phase"]
        )
        throughput = GaugeMetricFamily(
            "kubetune_training_samples_per_second",
            "Training throughput of each running job, as its rank 0 last reported it.",
            labels=["kind", "namespace", "name"],
        )
        counts: Tally[tuple[str, str]] = Tally()
        for job in self._jobs():
            kind, status = str(job.get("kind")), job.get("status") or {}
            phase = str(status.get("phase") or Phase.pending.value)
            counts[(kind, phase)] += 1
            rate = (status.get("progress") or {}).get("samplesPerSecond")
            if phase == Phase.running.value and isinstance(rate, int | float):
                meta = job.get("metadata") or {}
                throughput.add_metric([kind, str(meta.get("namespace")), str(meta.get("name"))], rate)
        for kind in ("FineTuneJob", "CompressJob"):
            for each in Phase:
                phases.add_metric([kind, each.value], counts.get((kind, each.value), 0))
        yield phases
        yield throughput


@dataclass(frozen=True)
class StatusChange:
    """What one status write tells the metrics about a job's life."""

    restarts: int = 0
    queue_wait_seconds: float | None = None
    finished_phase: str | None = None
    duration_seconds: float | None = None


def _seconds_between(start: str | None, end: str | None) -> float | None:
    if not start or not end:
        return None
    try:
        seconds = (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()
    except ValueError:
        return None
    return max(seconds, 0.0)


def status_change(old: JobStatusBase, new: JobStatusBase, created_at: str | None) -> StatusChange:
    """Restarts added, the queue wait (creation to first start) when the workload starts, and the
    duration (start, or creation for a job that never started, to completion) when the job
    finishes. A job seen already finished (an operator restart) yields nothing twice."""
    started = new.start_time is not None and old.start_time is None
    finished = (
        new.phase is not None and new.phase.finished and not (old.phase is not None and old.phase.finished)
    )
    return StatusChange(
        restarts=max((new.restarts or 0) - (old.restarts or 0), 0),
        queue_wait_seconds=_seconds_between(created_at, new.start_time) if started else None,
        finished_phase=new.phase.value if finished and new.phase is not None else None,
        duration_seconds=(
            _seconds_between(new.start_time or created_at, new.completion_time) if finished else None
        ),
    )


class Metrics:
    """The operator's metrics, in a registry of their own (several operators may share a process in tests)."""

    def __init__(self, jobs: JobSource) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_JobGauges(jobs))
        self.reconcile_errors = Counter(
            "kubetune_reconcile_errors",
            "Reconciliations that raised, by kind and error.",
            ["kind", "error"],
            registry=self.registry,
        )
        self.reconcile_seconds = Histogram(
            "kubetune_reconcile_duration_seconds",
            "Time to reconcile one job, by kind and trigger.",
            ["kind", "trigger"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        self.transitions = Counter(
            "kubetune_phase_transitions",
            "Phase transitions, by kind and new phase.",
            ["kind", "phase"],
            registry=self.registry,
        )
        self.restarts = Counter(
            "kubetune_job_restarts",
            "Gang restarts after retriable failures, by kind.",
            ["kind"],
            registry=self.registry,
        )
        self.queue_wait_seconds = Histogram(
            "kubetune_job_queue_wait_seconds",
            "Time from a job's creation to the start of its workload (validation, suspension and "
            "Kueue admission included), by kind.",
            ["kind"],
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.job_duration_seconds = Histogram(
            "kubetune_job_duration_seconds",
            "Time from a job's start (its creation if it never started) to its completion, by kind "
            "and final phase.",
            ["kind", "phase"],
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self._runner: web.AppRunner | None = None

    def record(self, kind: str, change: StatusChange) -> None:
        if change.restarts:
            self.restarts.labels(kind).inc(change.restarts)
        if change.queue_wait_seconds is not None:
            self.queue_wait_seconds.labels(kind).observe(change.queue_wait_seconds)
        if change.finished_phase is not None and change.duration_seconds is not None:
            self.job_duration_seconds.labels(kind, change.finished_phase).observe(change.duration_seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    async def serve(self, port: int, host: str = "0.0.0.0") -> None:
        async def handle(_: web.Request) -> web.Response:
            return web.Response(body=self.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

        app = web.Application()
        app.router.add_get("/metrics", handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


def jobs_of(indices: Mapping[str, Mapping[Any, Iterable[Mapping[str, Any]]]]) -> Iterator[Mapping[str, Any]]:
    """Every owner snapshot in the owner indices."""
    for index in indices.values():
        for store in index.values():
            yield from store
