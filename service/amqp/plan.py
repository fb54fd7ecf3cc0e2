"""The publishes that carry a settle decision out, in the order they go."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from service.amqp.wire import copy_message, event_message
from service.events import build_event
from service.messages import Decoded, Envelope
from service.settle import Decision, Republish
from service.topology import Topology, event_routing_key


@dataclass(frozen=True, slots=True)
class Wiring:
    """Where a settle's publishes go and what its events say they come from."""

    topology: Topology
    event_source: str


@dataclass(frozen=True, slots=True)
class Publish:
    """One publish of a settle: confirmed (``queue`` or the events exchange) or best effort."""

    message: aio_pika.Message
    queue: str | None = None  # None: the events exchange, routing key ``key``
    key: str = ""
    best_effort: bool = False  # the reply_to copy: never retried, never blocking the settle


def publishes(
    decision: Decision,
    message: AbstractIncomingMessage,
    envelope: Envelope,
    decoded: Decoded,
    wiring: Wiring,
) -> list[Publish]:
    """What carries ``decision`` out for the delivery ``message``: at least one confirmed
    publish, the last of them the one after which the delivery is acked."""
    topology, request_id = wiring.topology, decoded.request_id
    if isinstance(decision, Republish):
        copy = copy_message(message, decision.headers(message.headers))
        return [Publish(copy, queue=topology.tier(decision.delay).name)]
    event = build_event(
        event_source=wiring.event_source,
        request_id=request_id,
        attempts=decision.attempts,
        metadata=decoded.metadata,
        outcome=decision.outcome,
    )
    correlation = envelope.correlation_id or request_id
    key = event_routing_key(event["type"])
    plan = [Publish(event_message(event, correlation, envelope.traceparent), key=key)]
    if envelope.reply_to:
        # Best effort: the event is on the exchange already; a producer's missing or
        # full reply queue must not make Courier upload the file again.
        reply = event_message(event, correlation, envelope.traceparent)
        plan.append(Publish(reply, queue=envelope.reply_to, best_effort=True))
    if decision.failed:
        headers = decision.dead_letter_headers(message.headers, datetime.now(UTC))
        plan.append(Publish(copy_message(message, headers), queue=topology.dead.name))
    return plan
