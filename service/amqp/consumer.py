"""Consuming requests and carrying out each settle decision: the only code that acks.

Each delivery runs in a task of its own: decoded, run (:mod:`service.pipeline`),
decided (:func:`service.settle.decide`), carried out with the publisher, and
acked only after every publish was confirmed. When a delivery's channel dies,
its work is cancelled or its result discarded before anything is published: the
broker's redelivery is the copy that continues. Nothing here nacks: unfinished
work at shutdown is given back as a fresh copy (so ``x-delivery-count`` keeps
meaning "crashed consumers" on every RabbitMQ version) or left unacked.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage, AbstractQueue

from service.amqp.declare import declare_queue
from service.amqp.gate import AckGate
from service.amqp.hooks import ConsumerHooks
from service.amqp.inflight import InFlight
from service.amqp.publisher import (
    CONNECTION_ERRORS,
    DeliveryGone,
    Link,
    Publisher,
)
from service.amqp.topology import Topology, event_routing_key
from service.amqp.wire import copy_message, copy_with, event_message
from service.config import Settings
from service.contracts import SourceInfo, UploadRequest
from service.errors import CourierError
from service.events import build_event
from service.messages import Envelope, parse_request, peek, request_id
from service.pipeline import Outcome
from service.settle import (
    Decision,
    DeliveryFacts,
    Finish,
    Hold,
    Policy,
    Republish,
    decide,
    delivery_facts,
    give_back_headers,
    poisoned,
)

log = logging.getLogger(__name__)

Handler = Callable[[UploadRequest], Awaitable[Outcome]]
# Copies this replica has settled, remembered to drop a second copy of one (see README).
SETTLED_COPIES = 10_000
ACK_TIMEOUT = 5.0
# After the shutdown timeout: give-backs and settles, unwinding, closing. 2.25 s in all,
# leaving the rest of the contract's "timeout + 5 s" to a loaded node's teardown (1.7 s in CI).
GIVE_BACK_TIME, UNWIND_TIME, CLOSE_TIME = 1.5, 0.25, 0.5
WATCH_INTERVAL = 1.0


class Consumer:
    """Consumes the request queue and settles every delivery exactly once."""

    def __init__(
        self,
        settings: Settings,
        topology: Topology,
        handler: Handler,
        publisher: Publisher,
        hooks: ConsumerHooks,
    ) -> None:
        self.settings = settings
        self.topology = topology
        self._handler = handler
        self._publisher = publisher
        self._hooks = hooks
        self.policy = Policy.from_settings(settings, topology.delays)
        self.link = Link(settings.amqp_urls, "consume", on_open=self._open, hooks=hooks)
        self._work: dict[asyncio.Task[None], InFlight] = {}
        self._settled: OrderedDict[str, None] = OrderedDict()
        self._stopping = False
        self._channel: AbstractChannel | None = None
        self._queue: AbstractQueue | None = None
        self._tag: str | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._deadline = self._hard_deadline = 0.0
        self._steps: set[asyncio.Future[Any]] = set()
        self._gate = AckGate()

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        """Connect (retrying, failing over) and consume; returns at once."""
        # A broker that blocks our publishing takes no more work from us till it unblocks.
        self._publisher.link.on_blocked.append(lambda blocked: self._pause(blocked))
        self._publisher.link.start()
        self.link.start()
        self._watcher = asyncio.create_task(self._watch(), name="courier-consumer-watch")

    async def _open(self, connection: AbstractConnection) -> None:
        channel = await connection.channel(publisher_confirms=False)
        await channel.set_qos(prefetch_count=self.settings.concurrency)
        queue = await declare_queue(channel, self.topology.requests)
        underlay = await channel.get_underlay_channel()
        channel.close_callbacks.add(lambda *_: self._channel_lost(underlay))
        self._channel, self._queue, self._tag = channel, queue, None
        await self._consume()

    async def _consume(self) -> None:
        if self._stopping or self._queue is None or self._tag is not None:
            return
        if not self._publisher.link.unblocked.is_set():
            return  # consuming starts again when the broker unblocks publishing
        self._tag = await self._queue.consume(self._on_message, no_ack=False)
        self._hooks.consuming(True)
        log.info(
            "consuming %s with prefetch %d", self.topology.requests.name, self.settings.concurrency
        )

    def _pause(self, blocked: bool) -> None:
        task = asyncio.create_task(self._cancel_consumer() if blocked else self._resume())
        self._steps.add(task)
        task.add_done_callback(self._steps.discard)

    async def _resume(self) -> None:
        with contextlib.suppress(*CONNECTION_ERRORS):
            await self._consume()

    async def _watch(self) -> None:
        """Consume again when the broker cancelled the consumer (a deleted queue, say)."""
        while not self._stopping:
            await asyncio.sleep(WATCH_INTERVAL)
            if self._tag is None or not self.link.ready.is_set() or await self._registered():
                continue
            log.warning("the broker cancelled the consumer; consuming again")
            self._hooks.consuming(False)
            self._tag = None
            channel = self._channel
            with contextlib.suppress(*CONNECTION_ERRORS):
                if channel is not None and not channel.is_closed:
                    self._queue = await declare_queue(channel, self.topology.requests)
                    await self._consume()

    async def _registered(self) -> bool:
        channel = self._channel
        if channel is None or channel.is_closed:
            return False
        try:
            underlay = await asyncio.wait_for(channel.get_underlay_channel(), 0.5)
        except CONNECTION_ERRORS:
            return False
        return self._tag in getattr(underlay, "consumers", {})

    def _channel_lost(self, underlay: Any) -> None:
        """The channel died: its deliveries are the broker's again; stop working on them."""
        self._tag = None
        self._hooks.consuming(False)
        lost = [t for t, w in self._work.items() if w.channel is underlay and not w.settling]
        for task in lost:
            task.cancel()
        if lost:
            log.warning("lost the channel of %d requests in progress; cancelled them", len(lost))

    async def ready(self) -> bool:
        """True only while both connections are up, not blocked, and the consumer registered."""
        if self._stopping or self._tag is None or not self.link.ready.is_set():
            return False
        return self._publisher.ready and await self._registered()

    async def stop(self) -> None:
        """Stop taking deliveries, finish in-flight work within the shutdown timeout, give
        back what is left, and close both connections: all within the timeout + 5 s."""
        self._stopping = True
        deadline = self._deadline = time.monotonic() + self.settings.shutdown_timeout
        self._hard_deadline = deadline + GIVE_BACK_TIME
        if self._watcher is not None:
            self._watcher.cancel()
        await self._cancel_consumer()
        if self._work:
            log.info(
                "waiting up to %.0fs for %d requests", deadline - time.monotonic(), len(self._work)
            )
            await asyncio.wait(set(self._work), timeout=max(0.0, deadline - time.monotonic()))
        unfinished = [t for t, w in self._work.items() if not w.settling]
        if unfinished:
            log.warning("giving back %d unfinished requests", len(unfinished))
            for task in unfinished:
                task.cancel()
        if self._work:  # give-backs, and settles under way, until the hard deadline
            await asyncio.wait(set(self._work), timeout=self._left())
        for task, work in list(self._work.items()):
            # A settle whose last publish went out is acked (leaving it unacked would repeat
            # that publish after the redelivery); anything else stays unacked for the
            # broker to redeliver: none of its publishes went out.
            if work.committed(self._publisher):
                await self._ack(work)
            task.cancel()
        if self._work:
            await asyncio.wait(set(self._work), timeout=UNWIND_TIME)
        await asyncio.gather(
            self.link.close(grace=CLOSE_TIME), self._publisher.link.close(grace=CLOSE_TIME)
        )
        self._hooks.consuming(False)

    def _left(self) -> float:
        return max(0.0, self._hard_deadline - time.monotonic())

    async def _cancel_consumer(self) -> None:
        queue, tag, self._tag = self._queue, self._tag, None
        self._hooks.consuming(False)
        if queue is None or tag is None or not self.link.ready.is_set():
            return  # no broker to tell: the connection's end cancels the consumer anyway
        wait = min(2.0, max(0.5, self._deadline - time.monotonic()))
        unacked = lambda: sum(not work.acked for work in self._work.values())  # noqa: E731
        await self._gate.cancel(queue, tag, unacked, self.settings.concurrency, wait)

    # -- one delivery ----------------------------------------------------------------

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        # Deliveries that arrive while stopping (before the broker saw the cancel) are
        # handled like any other: they are ours, and finishing them costs nothing more.
        try:
            channel = message.channel
        except aio_pika.exceptions.ChannelInvalidStateError:
            return  # its channel died already: the broker redelivers it
        self._gate.delivered()
        task = asyncio.create_task(self._handle(message))
        self._work[task] = InFlight(message, channel)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._work.pop(task, None)
        if not task.cancelled() and task.exception() is not None:
            log.error("a delivery's task failed", exc_info=task.exception())

    async def _handle(self, message: AbstractIncomingMessage) -> None:
        work = self._work[asyncio.current_task()]  # type: ignore[index]
        envelope = Envelope.from_properties(
            message_id=message.message_id,
            correlation_id=message.correlation_id,
            reply_to=message.reply_to,
            headers=message.headers,
        )
        facts = delivery_facts(
            message.headers, attempt=envelope.attempt, delivery_count=envelope.delivery_count
        )
        started = time.perf_counter()
        self._hooks.in_flight(1)
        try:
            with self._hooks.request(envelope) as scope:
                if facts.copy_id is not None and facts.copy_id in self._settled:
                    log.warning("dropping a second copy of an already settled request")
                    self._hooks.duplicate_dropped()
                    await self._ack(work)
                    return
                outcome, rid, metadata = await self._run(message, envelope, facts)
                self._hooks.outcome(scope, rid, outcome)
                decision = decide(outcome, facts, self.policy)
                work.settling = True
                await self._carry_out(work, envelope, facts, decision, rid, metadata)
                self._hooks.settled(
                    decision, facts, outcome.destination or "unknown", time.perf_counter() - started
                )
        except DeliveryGone:
            log.info("the delivery's channel is gone; the broker's redelivery continues")
        except asyncio.CancelledError:
            if self._stopping and not work.settling:
                await self._give_back(work, facts)
            raise
        finally:
            self._hooks.in_flight(-1)

    async def _run(
        self, message: AbstractIncomingMessage, envelope: Envelope, facts: DeliveryFacts
    ) -> tuple[Outcome, str, dict[str, str]]:
        max_bytes = self.settings.max_message_bytes
        error = poisoned(facts, self.policy)
        request: UploadRequest | None = None
        if error is None:
            try:
                request = parse_request(message.body, max_bytes)
            except CourierError as invalid:
                error = invalid
        if request is None:
            assert error is not None  # noqa: S101 - one of the two is set
            info = peek(message.body, max_bytes)
            source = SourceInfo(url=info.source_url) if info.source_url else None
            outcome = Outcome(0.0, info.destination, source=source, error=error)
            return outcome, request_id(info.request_id, envelope), info.metadata or {}
        return await self._handler(request), request_id(request.id, envelope), request.metadata

    async def _carry_out(
        self,
        work: InFlight,
        envelope: Envelope,
        facts: DeliveryFacts,
        decision: Decision,
        rid: str,
        metadata: dict[str, str],
    ) -> None:
        publisher, message = self._publisher, work.message
        if isinstance(decision, Republish):
            tier = self.topology.tier(decision.delay)
            copy = copy_message(message, decision.copy_headers(message.headers))
            work.final = True
            await publisher.to_queue(tier.name, copy, work)
            kind = "held" if isinstance(decision, Hold) else "retrying"
            log.info(
                "attempt %d %s (%s); back in %ds",
                facts.attempt,
                kind,
                decision.error.code.value,
                decision.delay,
                extra={"errorCode": decision.error.code.value},
            )
        else:
            await self._finish(work, envelope, decision, rid, metadata)
        await self._ack(work)
        if facts.copy_id is not None:
            self._settled[facts.copy_id] = None
            if len(self._settled) > SETTLED_COPIES:
                self._settled.popitem(last=False)

    async def _finish(
        self,
        work: InFlight,
        envelope: Envelope,
        decision: Finish,
        rid: str,
        metadata: dict[str, str],
    ) -> None:
        event = build_event(
            event_source=self.settings.event_source,
            request_id=rid,
            attempts=decision.attempts,
            metadata=metadata,
            outcome=decision.outcome,
        )
        correlation = envelope.correlation_id or rid
        message = event_message(event, correlation, envelope.traceparent)
        work.final = not decision.failed
        await self._publisher.event(event_routing_key(event["type"]), message, work)
        # Best effort: the event is on the exchange already; a producer's missing or
        # full reply queue must not make Courier upload the file again.
        if envelope.reply_to and not await self._publisher.best_effort(
            envelope.reply_to,
            event_message(event, correlation, envelope.traceparent),
            self.settings.publish_timeout,
        ):
            self._hooks.reply_failed()
        if decision.failed:
            dead = copy_with(work.message, decision.dead_letter_headers(datetime.now(UTC)))
            work.final = True
            await self._publisher.to_queue(self.topology.dead.name, dead, work)
        log.log(
            logging.INFO if not decision.failed else logging.WARNING,
            "request %s %s",
            rid,
            event["data"]["status"],
            extra={"errorCode": error.code.value if (error := decision.outcome.error) else None},
        )

    async def _give_back(self, work: InFlight, facts: DeliveryFacts) -> None:
        """Hand unfinished work back as a fresh copy at the same attempt, then ack.

        A fresh copy, not a requeue: RabbitMQ before 4.3 counts every return in
        ``x-delivery-count``, so a rolling deploy would push requests towards
        ``poison_message``. Without a reachable broker the delivery stays unacked.
        """
        if not work.alive() or not self._publisher.ready:
            return
        copy = copy_with(work.message, give_back_headers(facts))
        work.settling = work.final = True
        try:
            await asyncio.wait_for(
                self._publisher.to_queue(self.topology.requests.name, copy, work), self._left()
            )
        except (TimeoutError, DeliveryGone):
            # Out of time: a copy that went out on a live connection still counts.
            if not work.committed(self._publisher):
                return
        await self._ack(work)

    async def _ack(self, work: InFlight) -> None:
        await self._gate.passed()
        work.acked = True
        try:
            async with asyncio.timeout(ACK_TIMEOUT):  # not wait_for: no task per ack
                await work.message.ack()
        except (*CONNECTION_ERRORS, aio_pika.exceptions.MessageProcessError) as exc:  # type: ignore[misc]
            # The channel is gone: the broker redelivers the delivery by itself.
            log.info("could not ack (%s); the broker will redeliver", type(exc).__name__)
