"""Prometheus metrics: requests, conversions, the queue, what is stored, what is refused.

Each app has a registry of its own, so that several apps in one process (tests) do not
share counters. Label values are bounded: routes by their pattern, never by their URL.
A server of several HTTP processes reports the sum of all of theirs (``others``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Iterable

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

_log = logging.getLogger(__name__)

PROBLEM = web.RequestKey("problem", str)
"""The problem type a request ended with, set by the error middleware."""
_STARTED = web.RequestKey("started", float)

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.others: Callable[[], Awaitable[list[bytes]]] | None = None
        """The series of the server's other HTTP processes, if it has others."""
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
        answered, seconds = _request_series(self, route, method, response.status)
        answered.inc()
        seconds.observe(time.perf_counter() - started)
        problem = request.get(PROBLEM)
        if problem and route == "/images" and request.method == "POST":
            self.rejections.labels(problem).inc()

    def own_series(self) -> bytes:
        return generate_latest(self.registry)

    async def handle(self, request: web.Request) -> web.Response:
        if self.others is None:
            body = self.own_series()
        else:
            # Parsing every other process's series is work in proportion to the CPUs:
            # not for the event loop.
            body = await asyncio.to_thread(self._with_others, await self.others())
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    def _with_others(self, others: list[bytes]) -> bytes:
        """This process's series added to the others', but for the shared gauges, which
        are this process's alone; with a gauge of how many processes are counted."""
        total = _Sum()
        total.add(self.registry.collect())
        counted = 1
        for series in others:
            try:
                families = list(text_string_to_metric_families(series.decode()))
            except ValueError as error:  # cut short: the process is stopping, say
                _log.warning("left a process's metrics out of a scrape: %s", error)
                continue
            total.add(family for family in families if family.name not in self.shared_gauges)
            counted += 1
        processes = Metric(
            "asgilook_http_processes", "HTTP processes whose series are summed here.", "gauge"
        )
        processes.add_sample("asgilook_http_processes", {}, counted)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Families([*total.families(), processes]))
        return generate_latest(registry)


@functools.lru_cache(maxsize=1024)
def _request_series(
    metrics: Metrics, route: str, method: str, status: int
) -> tuple[Counter, Histogram]:
    """The series a request is counted in: looked up once, not on every request."""
    return (
        metrics.requests.labels(route, method, str(status)),
        metrics.request_seconds.labels(route, method),
    )


def _route(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


class _Sum:
    """Metric families added up sample by sample. Creation times are left out: a sum of
    several processes' counters has none of its own."""

    def __init__(self) -> None:
        self._families: dict[str, Metric] = {}
        self._values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}

    def add(self, families: Iterable[Metric]) -> None:
        for family in families:
            if family.name not in self._families:
                self._families[family.name] = family
                self._values[family.name] = {}
            values = self._values[family.name]
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue
                key = (sample.name, tuple(sorted(sample.labels.items())))
                values[key] = values.get(key, 0.0) + sample.value

    def families(self) -> list[Metric]:
        summed = []
        for name, family in self._families.items():
            if not self._values[name]:
                continue  # the creation times the text format gives as families of their own
            total = Metric(name, family.documentation, family.type, family.unit)
            for (sample_name, labels), value in self._values[name].items():
                total.add_sample(sample_name, dict(labels), value)
            summed.append(total)
        return summed


class _Families(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families
