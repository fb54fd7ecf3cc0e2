"""The subscription: the request queue and tenants' queues; consume, pause, resume, again.

Every delivery goes to the :class:`~service.amqp.dispatch.Dispatcher`, which starts it
on the :class:`~service.amqp.settler.Settler` in the tenants' turns. The consumer keeps
its subscriptions (:mod:`service.amqp.subscriptions`) alive across lost connections, a
broker that blocks Courier's publishing, and consumers the broker cancelled. It
consumes a tenant's queue once it moved work there or a beacon named it, and lets go
of one idle and empty, which then expires.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine
from typing import Any

import aio_pika
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage

from service.amqp.dispatch import LOOKAHEAD, Dispatcher
from service.amqp.gate import AckGate
from service.amqp.hooks import ConsumerHooks, SettlerHooks
from service.amqp.link import CONNECTION_ERRORS, Link
from service.amqp.publisher import Publisher
from service.amqp.settler import Settler
from service.amqp.subscriptions import Sub, Subscriptions
from service.amqp.wire import beacon_message, beacon_of
from service.config import Settings
from service.fair import SpillBudget, Tenants, cpu_clock
from service.outcome import Work
from service.topology import Topology

log = logging.getLogger(__name__)

# Each connection closes politely within this long, or is dropped.
CLOSE_TIME = 0.5
WATCH_INTERVAL = 1.0
# A tenant's queue that gave nothing for this long, and holds nothing, is let go.
TENANT_IDLE = 30.0
# Moves under way at once (each holds its delivery until the copy is confirmed).
MOVING = 64


class Consumer:
    """Consumes the request queue (and tenants' queues); every delivery is settled once."""

    def __init__(
        self,
        settings: Settings,
        topology: Topology,
        work: Work,
        publisher: Publisher,
        hooks: ConsumerHooks,
        settler_hooks: SettlerHooks,
    ) -> None:
        self.settings = settings
        self.topology = topology
        self._publisher = publisher
        self._hooks = hooks
        gate = AckGate()
        self._gate = gate
        self.settler = Settler(settings, topology, work, publisher, settler_hooks, gate)
        self.dispatcher = Dispatcher(
            self.settler,
            topology,
            settings.concurrency,
            Tenants(settings.tenant_weights),
            SpillBudget(cpu_clock, time.monotonic),
            hooks,
            self._moved,
        )
        self.subs = Subscriptions(self._on_message, gate, self._unacked)
        # Room for the slots, the lookahead, and as many moves on their way again.
        main = self.subs.add(topology.requests, settings.concurrency + LOOKAHEAD + MOVING)
        assert main is not None  # noqa: S101 - the first subscription
        self._main = main
        self.link = Link(settings.amqp_urls, "consume", on_open=self._open, hooks=hooks)
        self._beaconed: dict[str, float] = {}
        self._stopping = False
        self._watcher: asyncio.Task[None] | None = None
        self._steps: set[asyncio.Future[Any]] = set()

    def start(self) -> None:
        """Connect (retrying, failing over) and consume; returns at once."""
        # A broker that blocks our publishing takes no more work from us till it unblocks.
        self._publisher.start(on_blocked=self._pause)
        self.link.start()
        self._watcher = asyncio.create_task(self._watch(), name="courier-consumer-watch")

    async def _open(self, connection: AbstractConnection) -> None:
        channel = await connection.channel(publisher_confirms=False)
        underlay = await channel.get_underlay_channel()
        channel.close_callbacks.add(lambda *_: self._channel_lost(underlay))
        self.subs.reset(channel)
        await self._consume_all()

    async def _consume_all(self) -> None:
        for sub in list(self.subs.subs.values()):
            await self._consume(sub)

    async def _consume(self, sub: Sub) -> None:
        # While the broker blocks our publishing, consuming waits for it to unblock.
        if self._stopping or self._publisher.blocked or not await self.subs.consume(sub):
            return
        if sub is self._main:
            self._hooks.consuming(True)
            log.info("consuming %s with prefetch %d", sub.spec.name, sub.prefetch)

    def _step(self, step: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(step)
        self._steps.add(task)
        task.add_done_callback(self._steps.discard)

    def _pause(self, blocked: bool) -> None:
        self._step(self._cancel_all(_now()) if blocked else self._resume(self._consume_all()))

    async def _resume(self, step: Coroutine[Any, Any, None]) -> None:
        with contextlib.suppress(*CONNECTION_ERRORS):
            await step

    def _unacked(self, queue: str) -> int:
        return self.settler.unacked(queue) + self.dispatcher.waiting(queue)

    def subscribe(self, tenant: str) -> None:
        """Consume ``tenant``'s queue (from now on, and after every reconnect)."""
        if not self._stopping:
            sub = self.subs.add(self.topology.tenant(tenant), self.settings.concurrency)
            if sub is not None:
                self._step(self._resume(self._consume(sub)))

    def _moved(self, tenant: str) -> None:
        """Work was moved into ``tenant``'s queue: count it, consume it, and let others
        know of it."""
        self._hooks.moved(tenant)
        self.subscribe(tenant)
        now = time.monotonic()
        if now - self._beaconed.get(tenant, -1e9) >= 2 * self.topology.delays[0]:
            self._beaconed[tenant] = now
            beacon = beacon_message(tenant)
            self._step(self._publisher.to_queue(self.topology.tiers[0].name, beacon))

    async def _beacon(self, message: AbstractIncomingMessage, channel: Any, tenant: str) -> None:
        """A beacon: consume its tenant's queue while that holds work; let the beacon go
        round again while the queue holds work or has a consumer (which may move more)."""
        ready, consumers = 1, 1
        with contextlib.suppress(*CONNECTION_ERRORS):
            ready, consumers = await self.subs.counts(self.topology.tenant(tenant))
        if ready:
            self.subscribe(tenant)
        self.settler.circulate(message, channel, bool(ready or consumers))

    async def _watch(self) -> None:
        """Consume again when the broker cancelled a consumer (a deleted queue, say); let go
        of tenants' queues that stayed idle and empty."""
        while not self._stopping:
            await asyncio.sleep(WATCH_INTERVAL)
            if self.link.ready.is_set():
                for sub in list(self.subs.subs.values()):
                    with contextlib.suppress(*CONNECTION_ERRORS):
                        await self._check(sub)

    async def _check(self, sub: Sub) -> None:
        if sub.tag is None:
            return
        name = sub.spec.name
        if not await self.subs.registered(sub.tag):
            log.warning("the broker cancelled the consumer; consuming again (queue %s)", name)
            sub.queue, sub.tag = None, None
            if sub is self._main:
                self._hooks.consuming(False)
            await self._consume(sub)
        elif await self._idle(sub):
            del self.subs.subs[name]
            await self.subs.cancel(sub, _now(), self.link.ready.is_set())

    async def _idle(self, sub: Sub) -> bool:
        """A tenant's queue that gave nothing for a while, with nothing left in or of it."""
        if sub is self._main or time.monotonic() - sub.last <= TENANT_IDLE:
            return False
        return not self._unacked(sub.spec.name) and not (await self.subs.counts(sub.spec))[0]

    def _channel_lost(self, underlay: Any) -> None:
        """The channel died: its deliveries are the broker's again."""
        self.subs.reset(None)
        self._hooks.consuming(False)
        lost = self.settler.channel_lost(underlay) + self.dispatcher.channel_lost(underlay)
        if lost:
            log.warning("lost the channel of %d requests in progress; cancelled them", lost)

    async def ready(self) -> bool:
        """True only while both connections are up, not blocked, and the consumer registered."""
        tag = self._main.tag
        if self._stopping or tag is None or not self.link.ready.is_set():
            return False
        return self._publisher.ready and await self.subs.registered(tag)

    async def stop(self) -> None:
        """Stop taking deliveries, finish in-flight work within the shutdown timeout, give
        back what is left, and close both connections: all within the timeout + 5 s."""
        self._stopping = True
        deadline = _now() + self.settings.shutdown_timeout
        if self._watcher is not None:
            self._watcher.cancel()
        await self._cancel_all(deadline)
        for waiting in self.dispatcher.stop():
            self.settler.give_back(waiting.message, waiting.channel)
        await self.settler.drain(deadline)
        await asyncio.gather(
            self.link.close(grace=CLOSE_TIME), self._publisher.close(grace=CLOSE_TIME)
        )
        self._hooks.consuming(False)

    async def _cancel_all(self, deadline: float) -> None:
        self._hooks.consuming(False)
        for sub in list(self.subs.subs.values()):
            await self.subs.cancel(sub, deadline, self.link.ready.is_set())

    async def _on_message(self, message: AbstractIncomingMessage, source: str) -> None:
        # Deliveries that arrive while stopping (before the broker saw the cancel) are
        # handled like any other: they are ours, and finishing them costs nothing more.
        try:
            channel = message.channel
        except aio_pika.exceptions.ChannelInvalidStateError:
            return  # its channel died already: the broker redelivers it
        self._gate.delivered()
        if (sub := self.subs.subs.get(source)) is not None:
            sub.last = time.monotonic()
        beacon = beacon_of(message)
        if beacon is not None:
            self._step(self._beacon(message, channel, beacon))
        else:
            self.dispatcher.offer(message, channel, source)


def _now() -> float:
    # The loop's clock (monotonic), so tests can run this on virtual time.
    return asyncio.get_running_loop().time()
