"""Settling each delivery: run it, decide, carry the decision out. The only code that acks.

Each delivery runs in a task of its own: read (:mod:`service.messages`), run (the
handler, :mod:`service.pipeline`), decided (:func:`service.settle.decide`),
carried out with the publisher, and acked only after every publish was
confirmed. When a delivery's channel dies, its work is cancelled or its result
discarded before anything is published: the broker's redelivery is the copy
that continues. Nothing here nacks: unfinished work at shutdown is given back as
a fresh copy (so ``x-delivery-count`` keeps meaning "crashed consumers" on every
RabbitMQ version) or left unacked.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from service.amqp.gate import AckGate
from service.amqp.hooks import SettlerHooks
from service.amqp.inflight import InFlight, SettledCopies
from service.amqp.link import CONNECTION_ERRORS
from service.amqp.plan import Wiring, publishes, send_all
from service.amqp.publisher import DeliveryGone, Outbox
from service.amqp.wire import copy_message
from service.attempt import attempt
from service.config import Settings
from service.contracts import DEFAULT_TENANT
from service.copies import beacon_headers, give_back_headers, moved_headers
from service.messages import Decoded, Envelope
from service.outcome import Work
from service.redact import mask_text
from service.settle import (
    Decision,
    Follow,
    Policy,
    decide,
    decide_follow,
    describe,
    not_due,
)
from service.topology import Topology

log = logging.getLogger(__name__)

ACK_TIMEOUT = 5.0
# After the shutdown timeout, give-backs and settles under way get this long...
GIVE_BACK_TIME = 1.5
# ...then the tasks left are cancelled and get this long to unwind.
UNWIND_TIME = 0.25


class Settler:
    """Runs and settles every delivery the consumer hands over, exactly once."""

    def __init__(
        self,
        settings: Settings,
        topology: Topology,
        work: Work,
        publisher: Outbox,
        hooks: SettlerHooks,
        gate: AckGate,
    ) -> None:
        self.settings = settings
        self.topology = topology
        self.policy = Policy.from_settings(settings, topology.delays)
        self._work_for = work
        self._publisher = publisher
        self._hooks = hooks
        self._gate = gate
        self._mask = functools.partial(mask_text, secrets=tuple(settings.secret_values()))
        self._work: dict[asyncio.Task[None], InFlight] = {}
        self._settled = SettledCopies()
        self._wiring = Wiring(topology, settings.event_source, settings.publish_timeout)
        self._max_bytes = settings.max_message_bytes
        self._stopping = False
        self._hard_deadline = 0.0

    # -- taking deliveries and giving them up ----------------------------------------

    def take(
        self,
        message: AbstractIncomingMessage,
        channel: object,
        tenant: str = DEFAULT_TENANT,
        done: Callable[[], None] | None = None,
    ) -> None:
        """Start working on a delivery that arrived on ``channel`` (an aiormq channel);
        ``done`` is called once it has ended, however it ended."""
        self._track(self._handle(message, tenant), message, channel, done)

    def move(self, message: AbstractIncomingMessage, channel: object, tenant: str) -> None:
        """Move a delivery, untouched, into ``tenant``'s queue: a confirmed copy, then the ack."""
        copy = copy_message(message, moved_headers(message.headers, tenant))
        queue = self.topology.tenant(tenant).name
        self._track(self._relay(copy, queue), message, channel, None)

    def circulate(self, message: AbstractIncomingMessage, channel: object, keep: bool) -> None:
        """A beacon came round: park it again in the shortest delay tier (``keep``), or
        drop it; either way, then the ack."""
        copy = copy_message(message, beacon_headers(message.headers)) if keep else None
        self._track(self._relay(copy, self.topology.tiers[0].name), message, channel, None)

    def give_back(self, message: AbstractIncomingMessage, channel: object) -> None:
        """At shutdown: hand a delivery that never started back as a fresh copy."""
        self._track(self._give_back_now(message), message, channel, None)

    def unacked(self, source: str | None = None) -> int:
        """Deliveries taken and not yet acked (from queue ``source`` only, when given)."""
        return sum(
            not work.acked and (source is None or work.message.routing_key == source)
            for work in self._work.values()
        )

    def _track(
        self,
        job: Coroutine[Any, Any, None],
        message: AbstractIncomingMessage,
        channel: object,
        done: Callable[[], None] | None,
    ) -> None:
        task = asyncio.create_task(job)
        self._work[task] = InFlight(message, channel)
        task.add_done_callback(self._done)
        if done is not None:
            task.add_done_callback(lambda _: done())

    def channel_lost(self, channel: object) -> int:
        """The channel died: its deliveries are the broker's again; stop working on them.

        Returns how many were cancelled (those already settling finish or find their
        publishes refused).
        """
        lost = [t for t, w in self._work.items() if w.channel is channel and not w.settling]
        for task in lost:
            task.cancel()
        return len(lost)

    async def drain(self, deadline: float) -> None:
        """Finish in-flight work by ``deadline`` (the loop's clock), give back what is left, ack
        settles whose last publish went out; everything within :data:`GIVE_BACK_TIME` more."""
        self._stopping = True
        self._hard_deadline = deadline + GIVE_BACK_TIME
        if self._work:
            log.info("waiting up to %.0fs for %d requests", deadline - _now(), len(self._work))
            await asyncio.wait(set(self._work), timeout=max(0.0, deadline - _now()))
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

    def _left(self) -> float:
        return max(0.0, self._hard_deadline - _now())

    def _done(self, task: asyncio.Task[None]) -> None:
        self._work.pop(task, None)
        if not task.cancelled() and task.exception() is not None:
            log.error("a delivery's task failed", exc_info=task.exception())

    # -- one delivery ----------------------------------------------------------------

    async def _handle(self, message: AbstractIncomingMessage, tenant: str) -> None:
        work = self._work[asyncio.current_task()]  # type: ignore[index]
        envelope = Envelope.read(message)
        started = time.perf_counter()
        self._hooks.in_flight(1)
        try:
            with self._hooks.request(envelope) as scope:
                if envelope.copy_id in self._settled:
                    log.warning("dropping a second copy of an already settled request")
                    self._hooks.duplicate_dropped()
                    await self._ack(work)
                    return
                hop = not_due(envelope, self.policy)
                if hop is not None:  # a followed file whose next read is not due: unread
                    await self._round(work, hop)
                    self._settled.remember(envelope.copy_id)
                    return
                decoded, outcome = await attempt(
                    self._work_for, message.body, envelope, self.policy, self._max_bytes
                )
                self._hooks.outcome(scope, decoded.request_id, outcome)
                judge = decide if envelope.follow_since is None else decide_follow
                decision = judge(outcome.masked(self._mask), envelope, self.policy)
                work.begin_settle()
                plan = publishes(decision, message, envelope, decoded, self._wiring)
                await send_all(self._publisher, work, plan, self._hooks.reply_failed)
                self._log(envelope, decision, decoded)
                await self._ack(work)
                self._settled.remember(envelope.copy_id)
                self._hooks.settled(
                    decision,
                    envelope,
                    outcome.destination or "unknown",
                    tenant,
                    time.perf_counter() - started,
                )
        except DeliveryGone:
            log.info("the delivery's channel is gone; the broker's redelivery continues")
        except asyncio.CancelledError:
            if self._stopping and not work.settling:
                await self._give_back(work, envelope)
            raise
        finally:
            self._hooks.in_flight(-1)

    async def _round(self, work: InFlight, hop: Follow) -> None:
        """One more round through the delay tiers for a copy following its file."""
        work.begin_settle()
        copy = copy_message(work.message, hop.headers(work.message.headers))
        [send] = work.publishing(1)
        await self._publisher.to_queue(self.topology.tier(hop.delay).name, copy, send)
        await self._ack(work)

    def _log(self, envelope: Envelope, decision: Decision, decoded: Decoded) -> None:
        level, text, code = describe(decision, envelope.attempt)
        extra = {"errorCode": code} if code else None
        log.log(level, "request %s: %s", decoded.request_id, text, extra=extra)

    async def _relay(self, copy: aio_pika.Message | None, queue: str) -> None:
        work = self._work[asyncio.current_task()]  # type: ignore[index]
        work.begin_settle()
        try:
            if copy is not None:
                [send] = work.publishing(1)
                await self._publisher.to_queue(queue, copy, send)
        except DeliveryGone:
            return  # the broker redelivers it
        await self._ack(work)

    async def _give_back_now(self, message: AbstractIncomingMessage) -> None:
        work = self._work[asyncio.current_task()]  # type: ignore[index]
        await self._give_back(work, Envelope.read(message))

    async def _give_back(self, work: InFlight, envelope: Envelope) -> None:
        """Hand unfinished work back as a fresh copy at the same attempt, then ack.

        A fresh copy, not a requeue: RabbitMQ before 4.3 counts every return in
        ``x-delivery-count``, so a rolling deploy would push requests towards
        ``poison_message``. Without a reachable broker the delivery stays unacked.
        """
        if not work.alive() or not self._publisher.ready:
            return
        copy = copy_message(work.message, give_back_headers(work.message.headers, envelope))
        [send] = work.publishing(1)
        origin = self.topology.home_of(work.message.routing_key)
        try:
            await asyncio.wait_for(self._publisher.to_queue(origin, copy, send), self._left())
        except (TimeoutError, DeliveryGone):
            # Out of time: a copy that went out on a live connection still counts.
            if not work.committed(self._publisher):
                return
        await self._ack(work)

    async def _ack(self, work: InFlight) -> None:
        await self._gate.passed()
        work.acking()
        try:
            async with asyncio.timeout(ACK_TIMEOUT):  # not wait_for: no task per ack
                await work.message.ack()
        except (*CONNECTION_ERRORS, aio_pika.exceptions.MessageProcessError) as exc:  # type: ignore[misc]
            # The channel is gone: the broker redelivers the delivery by itself.
            log.info("could not ack (%s); the broker will redeliver", type(exc).__name__)


def _now() -> float:
    # The loop's clock (monotonic), so tests can run this on virtual time.
    return asyncio.get_running_loop().time()
