"""Prometheus series (one registry per app): requests and errors by route and code, in-flight requests, queue depth,
batch sizes, request and model latency. `MetricsMiddleware` is the outermost layer, so refusals count too."""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("mlxclip_requests", "HTTP requests by route and status code.",
                                ["route", "code"], registry=r)
        self.errors = Counter("mlxclip_errors", "HTTP responses with status >= 400, by route and code.",
                              ["route", "code"], registry=r)
        self.latency = Histogram("mlxclip_request_latency_seconds", "Request latency, first byte in to last out.",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("mlxclip_in_flight_requests", "Inference requests being served.", registry=r)
        self.queue_depth = Gauge("mlxclip_queue_depth", "Items waiting for the model, by tower.", ["kind"],
                                 registry=r)
        self.batch_size = Histogram("mlxclip_batch_size", "Items per model call, by tower.", ["kind"],
                                    buckets=BATCH_BUCKETS, registry=r)
        self.inference = Histogram("mlxclip_inference_seconds", "Model time per batch, by tower.", ["kind"],
                                   buckets=LATENCY_BUCKETS, registry=r)
        self.items = Counter("mlxclip_embedded_items", "Items embedded, by tower.", ["kind"], registry=r)
        for kind in ("image", "text"):  # series exist from the start, at zero
            self.queue_depth.labels(kind).set(0)
            self.items.labels(kind)

    def observe_batch(self, kind: str, size: int, seconds: float) -> None:
        self.batch_size.labels(kind).observe(size)
        self.inference.labels(kind).observe(seconds)
        self.items.labels(kind).inc(size)

    def set_queue_depth(self, kind: str, depth: int) -> None:
        self.queue_depth.labels(kind).set(depth)

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class MetricsMiddleware:
    """Counts every HTTP request by route template (unknown paths as 'other', so labels stay bounded)."""

    def __init__(self, app, metrics: Metrics, routes: callable):
        self.app, self.metrics, self.routes = app, metrics, routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in self.routes() else "other"
        status = {"code": 500}
        start = time.perf_counter()

        async def send_and_record(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            code = str(status["code"])
            self.metrics.requests.labels(route, code).inc()
            if status["code"] >= 400:
                self.metrics.errors.labels(route, code).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)
