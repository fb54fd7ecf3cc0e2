"""Prometheus metrics: small fixed label sets, never ids or URLs."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)

from service import __version__
from service.contracts import SourceSpec
from service.sources.base import FetchedFile, SizeLimit, Source, SourceFacts
from service.tracing import child_span

_DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    """All of Courier's metrics, in a registry of their own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "courier_requests_total",
            "Requests that reached a terminal outcome.",
            ["destination", "outcome"],
            registry=r,
        )
        self.request_duration = Histogram(
            "courier_request_duration_seconds",
            "Time from taking a request off the queue to settling it.",
            ["destination"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.source_fetch_duration = Histogram(
            "courier_source_fetch_duration_seconds",
            "Time to fetch a source file.",
            ["scheme"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.source_bytes = Counter(
            "courier_source_bytes_total", "Bytes read from sources.", ["scheme"], registry=r
        )
        self.destination_requests = Counter(
            "courier_destination_requests_total",
            "HTTP requests made to destinations, by status code ('error' for no answer).",
            ["destination", "status"],
            registry=r,
        )
        self.destination_duration = Histogram(
            "courier_destination_request_duration_seconds",
            "Duration of HTTP requests to destinations.",
            ["destination"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "courier_inflight_requests", "Requests being processed now.", registry=r
        )
        self.retries = Counter(
            "courier_retries_scheduled_total",
            "Requests republished to a delay tier.",
            ["destination", "error_code"],
            registry=r,
        )
        self.dead_lettered = Counter(
            "courier_dead_lettered_total",
            "Requests moved to the dead-letter queue.",
            ["error_code"],
            registry=r,
        )
        self.events = Counter(
            "courier_events_published_total",
            "Result events published (confirmed).",
            ["type"],
            registry=r,
        )
        self.broker_connected = Gauge(
            "courier_broker_connected", "1 while both broker connections are up.", registry=r
        )
        self.consumer_active = Gauge(
            "courier_consumer_active", "1 while the request consumer is registered.", registry=r
        )
        self.reconnects = Counter(
            "courier_broker_reconnects_total", "Broker reconnections.", registry=r
        )
        self.build = Info("courier_build", "Build information.", registry=r)
        self.build.info({"version": __version__})

    def exposition(self) -> bytes:
        """The Prometheus text format of every metric."""
        return generate_latest(self.registry)


class MeteredSource:
    """A Source wrapper recording fetch duration and bytes by scheme, beside the work."""

    def __init__(self, inner: Source, metrics: Metrics, scheme: str) -> None:
        self._inner = inner
        self._metrics = metrics
        self._scheme = scheme

    def check(self, spec: SourceSpec) -> None:
        """Delegate the pre-flight checks."""
        self._inner.check(spec)

    async def describe(self, spec: SourceSpec) -> SourceFacts:
        """Delegate; no bytes move."""
        return await self._inner.describe(spec)

    @asynccontextmanager
    async def open(self, spec: SourceSpec, limit: SizeLimit) -> AsyncIterator[FetchedFile]:
        """Time the fetch (until the file is spooled) and count its bytes."""
        started = time.perf_counter()
        async with AsyncExitStack() as stack:
            with child_span("courier.source.fetch", **{"url.scheme": self._scheme}) as span:
                fetched = await stack.enter_async_context(self._inner.open(spec, limit))
                if span is not None:
                    span.set_attribute("courier.source.bytes", fetched.size)
            self._metrics.source_fetch_duration.labels(self._scheme).observe(
                time.perf_counter() - started
            )
            self._metrics.source_bytes.labels(self._scheme).inc(fetched.size)
            yield fetched
