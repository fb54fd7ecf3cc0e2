"""What the AMQP layer reports, as Protocols: metrics and tracing implement them
(:mod:`service.instrument`), so the layer itself names no metric."""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, Protocol

from service.messages import Envelope
from service.outcome import Outcome
from service.settle import Decision


class LinkHooks(Protocol):
    """What a broker link reports (metrics, readiness)."""

    def link_up(self, purpose: str, reconnected: bool) -> None:
        """A connection was opened and set up."""

    def link_down(self, purpose: str) -> None:
        """The connection was lost."""

    def blocked(self, purpose: str, is_blocked: bool) -> None:
        """The broker blocked (True) or unblocked (False) the connection."""


class PublishHooks(LinkHooks, Protocol):
    """What the publisher reports besides its link."""

    def event_unroutable(self, routing_key: str) -> None:
        """The broker returned an event: no queue is bound for ``routing_key``."""


class ConsumerHooks(LinkHooks, Protocol):
    """What the subscription and the dispatch report."""

    def consuming(self, active: bool) -> None:
        """The consumer was registered (True) or went away (False)."""

    def waiting(self, tenant: str, delta: int) -> None:
        """Deliveries of ``tenant`` waiting for a slot grew (or shrank) by ``delta``."""

    def moved(self, tenant: str) -> None:
        """A delivery of ``tenant`` was moved into its tenant's queue."""


class SettlerHooks(Protocol):
    """What the settling of each delivery reports: metrics and tracing live behind these."""

    def request(self, envelope: Envelope) -> AbstractContextManager[Any]:
        """The context one delivery is handled in (a span, log fields)."""

    def outcome(self, scope: Any, request_id: str, outcome: Outcome) -> None:
        """An attempt ended (inside :meth:`request`'s context)."""

    def settled(
        self,
        decision: Decision,
        envelope: Envelope,
        destination: str,
        tenant: str,
        seconds: float,
    ) -> None:
        """A decision was carried out and the delivery acked."""

    def in_flight(self, delta: int) -> None:
        """A delivery started (+1) or ended (-1)."""

    def reply_failed(self) -> None:
        """A result event could not be sent to the request's ``reply_to`` queue."""

    def duplicate_dropped(self) -> None:
        """A second copy of an already settled request was acked without running."""
