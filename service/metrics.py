"""Prometheus metrics: small fixed label sets, never ids or URLs."""

from __future__ import annotations

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)

from service import __version__

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
        self.events_unroutable = Counter(
            "courier_events_unroutable_total",
            "Result events the broker returned: no queue was bound for their routing key.",
            ["routing_key"],
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
        self.broker_blocked = Gauge(
            "courier_broker_blocked",
            "1 while RabbitMQ blocks the publishing connection (a resource alarm).",
            registry=r,
        )
        self.reply_failures = Counter(
            "courier_reply_failures_total",
            "Result events that could not be sent to a request's reply_to queue.",
            registry=r,
        )
        self.duplicates_dropped = Counter(
            "courier_duplicate_copies_dropped_total",
            "Second copies of an already settled request, acked without running.",
            registry=r,
        )
        self.breaker_state = Gauge(
            "courier_breaker_state",
            "A destination's circuit breaker: 0 closed, 1 half-open, 2 open.",
            ["destination"],
            registry=r,
        )
        self.held = Gauge(
            "courier_held_requests",
            "Requests held (parked in a delay tier) for a sick destination; sum over replicas.",
            ["destination"],
            registry=r,
        )
        self.rate_limit = Gauge(
            "courier_destination_rate_limit",
            "Requests per second now allowed to a destination (absent while unlimited).",
            ["destination"],
            registry=r,
        )
        self.rate_limited = Counter(
            "courier_rate_limited_total",
            "Requests to a destination that were rate limited.",
            ["destination"],
            registry=r,
        )
        self.ingestions = Counter(
            "courier_ingestions_total",
            "Uploaded files whose state at the destination became final: completed or failed.",
            ["destination", "outcome"],
            registry=r,
        )
        self.ingestion_duration = Histogram(
            "courier_ingestion_seconds",
            "From an upload's success to its file's final state at the destination.",
            ["destination"],
            buckets=(1, 5, 15, 30, 60, 120, 300, 900, 1800, 3600, 10800, 21600),
            registry=r,
        )
        self.tracked = Gauge(
            "courier_tracked_files",
            "Uploaded files being followed (parked in a delay tier between reads); sum over "
            "replicas.",
            registry=r,
        )
        self.tenant_requests = Counter(
            "courier_tenant_requests_total",
            "Requests that reached a terminal outcome, by tenant (named in "
            "COURIER_TENANT_WEIGHTS, else other).",
            ["tenant", "outcome"],
            registry=r,
        )
        self.tenant_waiting = Gauge(
            "courier_tenant_waiting",
            "Deliveries waiting in this replica for a slot, by tenant (named in "
            "COURIER_TENANT_WEIGHTS, else other).",
            ["tenant"],
            registry=r,
        )
        self.tenant_moved = Counter(
            "courier_tenant_moved_total",
            "Deliveries moved from the request queue into their tenant's queue (over-share "
            "work set aside so the queue is read past it), by tenant (named in "
            "COURIER_TENANT_WEIGHTS, else other).",
            ["tenant"],
            registry=r,
        )
        self.build = Info("courier_build", "Build information.", registry=r)
        self.build.info({"version": __version__})
        if registry is None:
            # process_* (CPU, memory, open files) and python_* (GC, version), as the
            # default registry has them; a caller's own registry keeps its own choice.
            for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
                r.register(collector)

    def exposition(self) -> bytes:
        """The Prometheus text format of every metric."""
        return generate_latest(self.registry)
