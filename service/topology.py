"""Every queue and exchange Courier uses, with its arguments, and every wire name.

Pure data: nothing here talks to a broker, so the settle decision, the CLI and
the documentation generators can all read the same names.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

# -- headers Courier writes and reads ---------------------------------------------------
ATTEMPT_HEADER = "x-courier-attempt"  # the attempt this copy runs (1 for a producer's message)
ERROR_CODE_HEADER = "x-courier-error-code"
ERROR_MESSAGE_HEADER = "x-courier-error-message"
ATTEMPTS_HEADER = "x-courier-attempts"
FAILED_AT_HEADER = "x-courier-failed-at"
HELD_SINCE_HEADER = "x-courier-held-since"  # when a held request was first held (ISO 8601)
COPY_ID_HEADER = "x-courier-copy-id"  # identifies one copy Courier published
# Crashes of earlier copies of this request, carried over when Courier republishes it.
REDELIVERIES_HEADER = "x-courier-redeliveries"
# A copy that follows an uploaded file (not an upload): since when, the reads so far, and
# when the next read is due (until then the copy goes round the delay tiers unread).
FOLLOW_SINCE_HEADER = "x-courier-follow-since"
CHECKS_HEADER = "x-courier-checks"
READ_AT_HEADER = "x-courier-read-at"
# A request moved into its tenant's queue: whose it is (so it is not parsed again).
TENANT_HEADER = "x-courier-tenant"
# Not a request: a marker that circulates through the delay tiers while a tenant's queue
# holds work, so every replica (a new one too) learns of the queue and consumes it.
BEACON_HEADER = "x-courier-beacon"
COURIER_HEADER_PREFIX = "x-courier-"
# The broker's own headers.
DELIVERY_COUNT_HEADER = "x-delivery-count"
BROKER_HEADERS = ("x-death", "x-first-death-", "x-last-death-", DELIVERY_COUNT_HEADER)
TRACEPARENT_HEADER = "traceparent"

# -- the events exchange's routing keys -------------------------------------------------
# Each with what it says: the terminal events of uploads and deletes, and the file's
# final state at the destination after a succeeded upload.
EVENT_KEYS = {
    "upload.succeeded": "An upload succeeded.",
    "upload.failed": "An upload failed for good.",
    "delete.succeeded": "A delete succeeded (data.existed says whether there was a file).",
    "delete.failed": "A delete failed for good.",
    "ingestion.completed": "The uploaded file is usable at the destination.",
    "ingestion.failed": "The destination could not ingest the uploaded file, or no final "
    "state came within COURIER_INGESTION_TIMEOUT.",
}
EVENT_TYPE_PREFIX = "courier."

# RabbitMQ refuses a message TTL above this many milliseconds.
MAX_TTL_MS = 4_294_967_295

QueueRole = Literal["requests", "delay", "dead", "tenant"]
TENANT_INFIX = ".tenant."
# A tenant's queue: its messages go back to the request queue after TENANT_TTL, and the
# queue itself goes away unused after TENANT_EXPIRES (later: nothing is left in it then).
TENANT_TTL = 6 * 3600
TENANT_EXPIRES = TENANT_TTL + 3600
LONGEST_TENANT = 64


class TopologySettings(Protocol):
    """The settings the topology is made of (``service.config.Settings`` has them)."""

    @property
    def queue(self) -> str: ...

    @property
    def events_exchange(self) -> str: ...

    @property
    def retry_delays(self) -> tuple[int, ...]: ...

    @property
    def max_redeliveries(self) -> int: ...


@dataclass(frozen=True, slots=True)
class QueueSpec:
    """One durable queue and the arguments Courier declares it with."""

    name: str
    role: QueueRole
    arguments: Mapping[str, Any] = field(default_factory=dict)
    delay: int | None = None  # seconds, for a delay tier


def requests_arguments(dead_queue: str, max_redeliveries: int) -> dict[str, Any]:
    """The request queue: quorum; the broker dead-letters what crashed consumers too often.

    Courier fails such a request as ``poison_message`` itself first; the delivery
    limit is only the broker's backstop.
    """
    return {
        "x-queue-type": "quorum",
        "x-delivery-limit": max_redeliveries + 2,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": dead_queue,
    }


def delay_arguments(delay: int, requests_queue: str) -> dict[str, Any]:
    """A delay tier: quorum, every message expires after ``delay`` seconds and is
    dead-lettered back to the request queue at least once (never dropped on the way)."""
    return {
        "x-queue-type": "quorum",
        "x-message-ttl": delay * 1000,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": requests_queue,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }


def tenant_arguments(requests_queue: str) -> dict[str, Any]:
    """A tenant's queue: quorum; what waits in it longer than :data:`TENANT_TTL` goes back
    to the request queue (at least once), so nothing is lost when the queue expires."""
    return {
        "x-queue-type": "quorum",
        "x-message-ttl": TENANT_TTL * 1000,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": requests_queue,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
        "x-expires": TENANT_EXPIRES * 1000,
    }


DEAD_ARGUMENTS: Mapping[str, Any] = {"x-queue-type": "quorum"}


@dataclass(frozen=True, slots=True)
class Topology:
    """The whole topology of one Courier deployment."""

    requests: QueueSpec
    tiers: tuple[QueueSpec, ...]
    dead: QueueSpec
    events_exchange: str

    @classmethod
    def build(
        cls,
        *,
        queue: str,
        events_exchange: str,
        retry_delays: tuple[int, ...],
        max_redeliveries: int,
    ) -> Topology:
        """The topology for these names and knobs."""
        dead = f"{queue}.dead"
        return cls(
            requests=QueueSpec(queue, "requests", requests_arguments(dead, max_redeliveries)),
            tiers=tuple(
                QueueSpec(tier_name(queue, d), "delay", delay_arguments(d, queue), delay=d)
                for d in retry_delays
            ),
            dead=QueueSpec(dead, "dead", DEAD_ARGUMENTS),
            events_exchange=events_exchange,
        )

    @classmethod
    def from_settings(cls, settings: TopologySettings) -> Topology:
        """The topology the settings describe."""
        return cls.build(
            queue=settings.queue,
            events_exchange=settings.events_exchange,
            retry_delays=settings.retry_delays,
            max_redeliveries=settings.max_redeliveries,
        )

    @property
    def delays(self) -> tuple[int, ...]:
        """The delay tiers' delays in seconds, shortest first."""
        return tuple(t.delay for t in self.tiers if t.delay is not None)

    def tier(self, delay: int) -> QueueSpec:
        """The delay tier of ``delay`` seconds."""
        for spec in self.tiers:
            if spec.delay == delay:
                return spec
        raise KeyError(delay)

    def tenant(self, tenant: str) -> QueueSpec:
        """The queue of ``tenant``'s work moved out of the request queue."""
        name = f"{self.requests.name}{TENANT_INFIX}{tenant}"
        return QueueSpec(name, "tenant", tenant_arguments(self.requests.name))

    def tenant_of_queue(self, name: str) -> str | None:
        """The tenant whose queue ``name`` is, or None."""
        prefix = self.requests.name + TENANT_INFIX
        return name.removeprefix(prefix) if name.startswith(prefix) else None

    def home_of(self, routing_key: str | None) -> str:
        """The queue a delivery came from, by its routing key: one of Courier's own queues
        (the request queue, a tenant's), else the request queue."""
        if routing_key and (routing_key == self.requests.name or self.tenant_of_queue(routing_key)):
            return routing_key
        return self.requests.name

    def spec_of(self, name: str) -> QueueSpec | None:
        """The spec of Courier's own queue ``name`` (a tier, the dead letters, a tenant's)."""
        tenant = self.tenant_of_queue(name)
        return self.tenant(tenant) if tenant else self.own_queues().get(name)

    def own_queues(self) -> dict[str, QueueSpec]:
        """The queues Courier itself publishes to (delay tiers and dead letters), by name."""
        return {spec.name: spec for spec in (*self.tiers, self.dead)}


def tier_name(queue: str, delay: int) -> str:
    """``<queue>.retry.<N>s``."""
    return f"{queue}.retry.{delay}s"


def event_routing_key(event_type: str) -> str:
    """``courier.upload.succeeded`` -> ``upload.succeeded``."""
    return event_type.removeprefix(EVENT_TYPE_PREFIX)
