"""Metrics, traces and log context as hooks around the work, never inside it.

The consumer, the settler, the broker links, the sources and the destination calls
each report to a hook here; they name no metric themselves.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

from service.contracts import SourceSpec
from service.events import event_type
from service.fair import Tenants
from service.flow import BreakerState
from service.logs import add_log_context, log_context
from service.messages import Envelope
from service.metrics import Metrics
from service.outcome import Ingestion, Outcome
from service.settle import Decision, Finish, Follow, Ingested, Park, Retry
from service.sources.base import FetchedFile, SizeLimit, Source, SourceFacts
from service.tracing import (
    CallObserver,
    child_span,
    record_outcome,
    request_span,
    traceparent,
)

LINKS = ("consume", "publish")


class Instruments:
    """The hooks of the consumer, the settler and both broker links, recording into ``metrics``."""

    def __init__(self, metrics: Metrics, tenants: Tenants | None = None) -> None:
        self.metrics = metrics
        self.tenants = tenants or Tenants()
        self._up: set[str] = set()
        self._children: dict[tuple[Any, ...], Any] = {}

    def _child(self, metric: Any, *values: str) -> Any:
        """``metric.labels(*values)``, looked up once (``labels()`` takes a lock each call)."""
        key = (id(metric), *values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child

    # -- broker links ------------------------------------------------------------------

    def link_up(self, purpose: str, reconnected: bool) -> None:
        """A connection was opened; connected means both are."""
        self._up.add(purpose)
        if reconnected:
            self.metrics.reconnects.inc()
        self.metrics.broker_connected.set(1 if self._up >= set(LINKS) else 0)

    def link_down(self, purpose: str) -> None:
        """A connection was lost."""
        self._up.discard(purpose)
        self.metrics.broker_connected.set(0)

    def blocked(self, purpose: str, is_blocked: bool) -> None:
        """The broker blocked or unblocked the publishing connection."""
        if purpose == "publish":
            self.metrics.broker_blocked.set(1 if is_blocked else 0)

    def event_unroutable(self, routing_key: str) -> None:
        """An event came back unrouted: nobody has bound a queue for it."""
        self._child(self.metrics.events_unroutable, routing_key).inc()

    # -- the consumer ------------------------------------------------------------------

    @contextlib.contextmanager
    def request(self, envelope: Envelope) -> Iterator[Any]:
        """Log fields and the request's span; outgoing calls carry its trace context."""
        traceparent.set(envelope.traceparent)
        with (
            log_context(attempt=envelope.attempt, correlationId=envelope.correlation_id),
            request_span(envelope.traceparent, **{"courier.attempt": envelope.attempt}) as span,
        ):
            yield span

    def outcome(self, scope: Any, request_id: str, outcome: Outcome) -> None:
        """Name the request in the logs and mark its span."""
        add_log_context(requestId=request_id, destination=outcome.destination)
        record_outcome(scope, outcome.error.code.value if outcome.error else None)

    def settled(
        self,
        decision: Decision,
        envelope: Envelope,
        destination: str,
        tenant: str,
        seconds: float,
    ) -> None:
        """Count what the decision did, once it was carried out."""
        m, child = self.metrics, self._child
        finish = decision if isinstance(decision, Finish) else None
        if isinstance(decision, Follow):
            finish = decision.upload
        if finish is not None:
            outcome = "failed" if finish.outcome.error else "succeeded"
            child(m.tenant_requests, self.tenants.label(tenant), outcome).inc()
        if envelope.held_since is not None:
            child(m.held, destination).dec()  # a held request came back
        if envelope.follow_since is not None:
            m.tracked.dec()  # a followed file's copy came back
        if isinstance(decision, Park):
            child(m.held, destination).inc()
        elif isinstance(decision, Retry):
            child(m.retries, destination, decision.error.code.value).inc()
        elif isinstance(decision, Follow):
            m.tracked.inc()
            if decision.upload is not None:
                self._finished(decision.upload, destination, seconds)
        elif isinstance(decision, Ingested):
            if decision.ingestion is not None:
                self._ingested(decision.ingestion)
                if (error := decision.dead_lettered) is not None:
                    child(m.dead_lettered, error.code.value).inc()
        else:
            self._finished(decision, destination, seconds)

    def _finished(self, decision: Finish, destination: str, seconds: float) -> None:
        m, child = self.metrics, self._child
        error = decision.outcome.error
        child(m.requests, destination, "failed" if error else "succeeded").inc()
        child(m.events, event_type(decision.outcome)).inc()
        if error is not None:
            child(m.dead_lettered, error.code.value).inc()
        child(m.request_duration, destination).observe(seconds)
        if decision.ingestion is not None:
            self._ingested(decision.ingestion)

    def _ingested(self, ingestion: Ingestion) -> None:
        m, child, destination = self.metrics, self._child, ingestion.destination
        outcome = "completed" if ingestion.completed else "failed"
        child(m.ingestions, destination, outcome).inc()
        child(m.events, f"courier.ingestion.{outcome}").inc()
        child(m.ingestion_duration, destination).observe(ingestion.waited_ms / 1000)

    def waiting(self, tenant: str, delta: int) -> None:
        """``courier_tenant_waiting``: deliveries waiting for a slot, by tenant label."""
        self._child(self.metrics.tenant_waiting, self.tenants.label(tenant)).inc(delta)

    def moved(self, tenant: str) -> None:
        """``courier_tenant_moved_total``: a delivery moved into its tenant's queue."""
        self._child(self.metrics.tenant_moved, self.tenants.label(tenant)).inc()

    def in_flight(self, delta: int) -> None:
        """Requests being processed now."""
        self.metrics.in_flight.inc(delta)

    def consuming(self, active: bool) -> None:
        """Whether the request consumer is registered."""
        self.metrics.consumer_active.set(1 if active else 0)

    def reply_failed(self) -> None:
        """A reply_to publish failed."""
        self.metrics.reply_failures.inc()

    def duplicate_dropped(self) -> None:
        """A second copy of a settled request was dropped."""
        self.metrics.duplicates_dropped.inc()

    # -- flow control (service.flow's observer) ----------------------------------------

    def breaker_changed(self, destination: str, state: BreakerState) -> None:
        """``courier_breaker_state``: 0 closed, 1 half-open, 2 open."""
        self.metrics.breaker_state.labels(destination).set(int(state))

    def rate_changed(self, destination: str, rate: float | None) -> None:
        """``courier_destination_rate_limit``, absent while unlimited."""
        gauge = self.metrics.rate_limit
        if rate is None:
            with contextlib.suppress(KeyError):
                gauge.remove(destination)
        else:
            gauge.labels(destination).set(rate)

    def rate_limited(self, destination: str) -> None:
        """A call waited for, or was held by, rate control."""
        self.metrics.rate_limited.labels(destination).inc()

    # -- destinations ------------------------------------------------------------------

    def destination_call(self, destination: str) -> CallObserver:
        """Records each call to ``destination`` (for :func:`service.tracing.client_middleware`)."""
        requests = self.metrics.destination_requests
        duration = self.metrics.destination_duration.labels(destination)

        def observe(status: str, seconds: float) -> None:
            self._child(requests, destination, status).inc()
            duration.observe(seconds)

        return observe


class MeteredSource:
    """A Source wrapper recording fetch duration and bytes by scheme, beside the work."""

    def __init__(self, inner: Source, metrics: Metrics, scheme: str) -> None:
        self._inner = inner
        self._scheme = scheme
        self._fetch_duration = metrics.source_fetch_duration.labels(scheme)
        self._bytes = metrics.source_bytes.labels(scheme)

    def check(self, spec: SourceSpec) -> None:
        """The inner source's checks; nothing to measure (no I/O)."""
        self._inner.check(spec)

    async def describe(self, spec: SourceSpec) -> SourceFacts:
        """Delegate; no bytes move."""
        return await self._inner.describe(spec)

    async def fetch(self, spec: SourceSpec, limit: SizeLimit) -> FetchedFile:
        """Time the fetch (until the file is spooled) and count its bytes."""
        started = time.perf_counter()
        with child_span("courier.source.fetch", **{"url.scheme": self._scheme}) as span:
            fetched = await self._inner.fetch(spec, limit)
            if span is not None:
                span.set_attribute("courier.source.bytes", fetched.size)
        self._fetch_duration.observe(time.perf_counter() - started)
        self._bytes.inc(fetched.size)
        return fetched
