"""Prometheus metrics of the server, on a registry of its own (``GET /metrics``)."""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class ServeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "kubetune_serve_requests",
            "HTTP requests answered, by endpoint and status code.",
            ["endpoint", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "kubetune_serve_request_duration_seconds",
            "Time from request to the last byte of the response (streams included), by endpoint.",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "kubetune_serve_time_to_first_token_seconds",
            "Time from a generation request to its first generated token.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "kubetune_serve_requests_in_flight", "HTTP requests being handled.", registry=r
        )
        self.preparing = Gauge(
            "kubetune_serve_requests_preparing",
            "Requests whose body is being read, decoded or tokenized (or waits for the thread that does).",
            registry=r,
        )
        self.prompt_tokens = Counter("kubetune_serve_prompt_tokens", "Prompt tokens processed.", registry=r)
        self.generated_tokens = Counter("kubetune_serve_generation_tokens", "Tokens generated.", registry=r)
        self.batch_size = Histogram(
            "kubetune_serve_batch_size",
            "Sequences in each forward pass, by kind of step (prefill, decode, classify).",
            ["step"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "kubetune_serve_queue_depth", "Sequences waiting for a batch slot.", registry=r
        )
        self.running = Gauge(
            "kubetune_serve_running_sequences", "Sequences in the running batch.", registry=r
        )
        self.model_ready = Gauge(
            "kubetune_serve_model_ready", "1 once the model is loaded and serving.", registry=r
        )

    def observe_step(self, step: str, size: int) -> None:
        self.batch_size.labels(step=step).observe(size)

    def track_engine(self, queue_depth: Callable[[], float], running: Callable[[], float]) -> None:
        self.queue_depth.set_function(queue_depth)
        self.running.set_function(running)


class MetricsMiddleware:
    """Counts requests and measures latency until the response's last byte, streams included.

    A pure ASGI middleware: ``BaseHTTPMiddleware`` would buffer streaming bodies' timing and
    interfere with disconnect detection.
    """

    def __init__(self, app: ASGIApp, metrics: ServeMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        endpoint = _endpoint(scope)
        start = time.perf_counter()
        status = 500
        recorded = False

        def record() -> None:
            nonlocal recorded
            if not recorded:
                recorded = True
                self.metrics.requests.labels(endpoint=endpoint, status=str(status)).inc()
                self.metrics.latency.labels(endpoint=endpoint).observe(time.perf_counter() - start)

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                record()

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.in_flight.dec()
            record()


def _endpoint(scope: Scope) -> str:
    """The route's path template; unknown paths share one label so scanners cannot blow up cardinality."""
    app = scope.get("app")
    router = getattr(app, "router", None)
    for route in getattr(router, "routes", []):
        match, _ = route.matches(scope)
        if match == Match.FULL:
            return str(getattr(route, "path", "other"))
    return "other"
