"""Prometheus metrics: requests, conversions, the queue, what is stored, what is refused.

Each app has a registry of its own, so that several apps in one process (tests) do not
share counters. Label values are bounded: routes by their pattern, never by their URL.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest

PROBLEM = web.RequestKey("problem", str)
"""The problem type a request ended with, set by the error middleware."""
_STARTED = web.RequestKey("started", float)

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "asgilook_http_requests",
            "HTTP requests answered, by route pattern, method and status.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "asgilook_http_request_duration_seconds",
            "Time until the response's headers are sent.",
            ["route", "method"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.conversions = Counter(
            "asgilook_conversions",
            "Jobs run in the worker processes, by job and outcome.",
            ["job", "outcome"],
            registry=self.registry,
        )
        self.conversion_seconds = Histogram(
            "asgilook_conversion_duration_seconds",
            "Time a job spent in a worker process.",
            ["job"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.rejections = Counter(
            "asgilook_upload_rejections",
            "Uploads refused, by reason (the problem type).",
            ["reason"],
            registry=self.registry,
        )
        self.shared_gauges: set[str] = set()
        """Gauges that read what every process sees alike (the index's totals), so that
        a scrape of several processes reports them once rather than adding them up."""

    def gauge(
        self, name: str, documentation: str, read: Callable[[], float], *, shared: bool = False
    ) -> None:
        """A gauge whose value is read when scraped; ``shared`` if every process reads
        the same value."""
        Gauge(name, documentation, registry=self.registry).set_function(read)
        if shared:
            self.shared_gauges.add(name)

    def observe_job(self, job: str, outcome: str, seconds: float) -> None:
        self.conversions.labels(job, outcome).inc()
        self.conversion_seconds.labels(job).observe(seconds)

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        request[_STARTED] = time.perf_counter()
        return await handler(request)

    async def on_response_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        """Count a request once its status is final: a file's 206 or 304 is only decided
        as it is sent, after the handler has returned."""
        started = request.get(_STARTED)
        if started is None:
            return
        route = _route(request)
        method = request.method if request.method in hdrs.METH_ALL else "other"
        self.requests.labels(route, method, str(response.status)).inc()
        self.request_seconds.labels(route, method).observe(time.perf_counter() - started)
        problem = request.get(PROBLEM)
        if problem and route == "/images" and request.method == "POST":
            self.rejections.labels(problem).inc()

    async def handle(self, request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )


def _route(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"
