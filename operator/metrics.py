"""Prometheus metrics of the operator, served over aiohttp on the metrics port."""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from kubetune.api import Phase

# Returns (kind, phase) of every job the operator knows, read at scrape time.
PhaseSource = Callable[[], Iterable[tuple[str, str]]]


class _JobsByPhase(Collector):
    def __init__(self, source: PhaseSource) -> None:
        self._source = source

    def collect(self) -> Iterator[GaugeMetricFamily]:
        gauge = GaugeMetricFamily(
            "kubetune_jobs", "Jobs known to the operator, by kind and phase.", labels=["kind", "phase"]
        )
        counts = Tally(self._source())
        for kind in ("FineTuneJob", "CompressJob"):
            for phase in Phase:
                gauge.add_metric([kind, phase.value], counts.get((kind, phase.value), 0))
        yield gauge


class Metrics:
    """The operator's metrics, in a registry of their own (several operators may share a process in tests)."""

    def __init__(self, phases: PhaseSource) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_JobsByPhase(phases))
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
        self._runner: web.AppRunner | None = None

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


def phases_of(indices: Mapping[str, Mapping[Any, Iterable[Mapping[str, Any]]]]) -> Iterator[tuple[str, str]]:
    """(kind, phase) of every owner snapshot in the owner indices."""
    for index in indices.values():
        for store in index.values():
            for snapshot in store:
                yield (
                    str(snapshot.get("kind")),
                    str((snapshot.get("status") or {}).get("phase") or Phase.pending.value),
                )
