"""The publishes that carry a settle decision out, in the order they go."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from service.amqp.inflight import InFlight, Send
from service.amqp.publisher import Outbox
from service.amqp.wire import copy_message, event_message
from service.events import Event, build_event, build_ingestion_event
from service.messages import Decoded, Envelope
from service.outcome import Ingestion
from service.settle import Decision, Finish, Follow, Ingested, Republish
from service.topology import Topology, event_routing_key


@dataclass(frozen=True, slots=True)
class Wiring:
    """Where a settle's publishes go and what its events say they come from."""

    topology: Topology
    event_source: str
    reply_timeout: float = 10.0  # how long a reply_to publish may take


@dataclass(frozen=True, slots=True)
class Publish:
    """One publish of a settle: confirmed (``queue`` or the events exchange) or best effort."""

    message: aio_pika.Message
    queue: str | None = None  # None: the events exchange, routing key ``key``
    key: str = ""
    best_effort: bool = False  # the reply_to copy: never retried, never blocking the settle
    timeout: float = 10.0  # how long a best-effort publish may take


def publishes(
    decision: Decision,
    message: AbstractIncomingMessage,
    envelope: Envelope,
    decoded: Decoded,
    wiring: Wiring,
) -> list[Publish]:
    """What carries ``decision`` out for the delivery ``message``, in order; the last
    confirmed publish is the one after which the delivery is acked (none: ack at once)."""
    topology = wiring.topology
    if isinstance(decision, Republish):
        copy = copy_message(message, decision.headers(message.headers))
        return [Publish(copy, queue=topology.tier(decision.delay).name)]
    if isinstance(decision, Ingested):
        if decision.ingestion is None:
            return []
        plan = _ingestion_event(decision.ingestion, envelope, decoded, wiring)
        headers = decision.dead_letter_headers(message.headers, datetime.now(UTC))
        if headers is not None:
            plan.append(Publish(copy_message(message, headers), queue=topology.dead.name))
        return plan
    if isinstance(decision, Follow):
        plan = (
            []
            if decision.upload is None
            else _finish(decision.upload, message, envelope, decoded, wiring)
        )
        copy = copy_message(message, decision.headers(message.headers))
        return [*plan, Publish(copy, queue=topology.tier(decision.delay).name)]
    return _finish(decision, message, envelope, decoded, wiring)


def _finish(
    decision: Finish,
    message: AbstractIncomingMessage,
    envelope: Envelope,
    decoded: Decoded,
    wiring: Wiring,
) -> list[Publish]:
    """The terminal event; then a failure's dead letter, or an already final file's
    ingestion event."""
    event = build_event(
        event_source=wiring.event_source,
        request_id=decoded.request_id,
        attempts=decision.attempts,
        metadata=decoded.metadata,
        outcome=decision.outcome,
    )
    plan = _event(event, envelope, decoded, wiring)
    if decision.failed:
        headers = decision.dead_letter_headers(message.headers, datetime.now(UTC))
        plan.append(Publish(copy_message(message, headers), queue=wiring.topology.dead.name))
    elif decision.ingestion is not None:
        plan += _ingestion_event(decision.ingestion, envelope, decoded, wiring)
    return plan


def _ingestion_event(
    ingestion: Ingestion, envelope: Envelope, decoded: Decoded, wiring: Wiring
) -> list[Publish]:
    event = build_ingestion_event(
        event_source=wiring.event_source,
        request_id=decoded.request_id,
        metadata=decoded.metadata,
        ingestion=ingestion,
    )
    return _event(event, envelope, decoded, wiring)


def _event(event: Event, envelope: Envelope, decoded: Decoded, wiring: Wiring) -> list[Publish]:
    """An event to the exchange, and (best effort) its copy to the request's reply_to."""
    correlation = envelope.correlation_id or decoded.request_id
    key = event_routing_key(event["type"])
    plan = [Publish(event_message(event, correlation, envelope.traceparent), key=key)]
    if envelope.reply_to:
        # Best effort: the event is on the exchange already; a producer's missing or
        # full reply queue must not make Courier upload the file again.
        reply = event_message(event, correlation, envelope.traceparent)
        timeout = wiring.reply_timeout
        plan.append(Publish(reply, queue=envelope.reply_to, best_effort=True, timeout=timeout))
    return plan


async def send_all(
    publisher: Outbox, work: InFlight, plan: Sequence[Publish], reply_failed: Callable[[], None]
) -> None:
    """Hand every confirmed publish of ``plan`` to the broker at once, in order (the
    channel writes them in that order), wait for all their confirms, then make the
    best-effort ones. Once all were handed to a live connection the settle counts as
    done (:meth:`InFlight.committed`)."""
    confirmed = [step for step in plan if not step.best_effort]
    sends = work.publishing(len(confirmed))
    if len(confirmed) == 1:  # the common case: no task needed
        await _send(publisher, confirmed[0], sends[0])
    elif confirmed:
        tasks = [
            asyncio.ensure_future(_send(publisher, step, send))
            for step, send in zip(confirmed, sends, strict=True)
        ]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            raise
    for step in plan:
        if step.best_effort:
            assert step.queue is not None  # noqa: S101 - best effort goes to a queue
            if not await publisher.best_effort(step.queue, step.message, step.timeout):
                reply_failed()


async def _send(publisher: Outbox, step: Publish, send: Send) -> None:
    if step.queue is None:
        await publisher.event(step.key, step.message, send)
    else:
        await publisher.to_queue(step.queue, step.message, send)
