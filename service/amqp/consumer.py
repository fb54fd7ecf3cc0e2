"""The subscription to the request queue: consume, pause, resume, consume again.

Every delivery is handed to the :class:`~service.amqp.settler.Settler`, which runs
and settles it. The consumer keeps the subscription alive across lost connections,
a broker that blocks Courier's publishing, and a consumer the broker cancelled;
at shutdown it cancels the subscription with acks held at the
:class:`~service.amqp.gate.AckGate`, so no delivery is on its way to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage, AbstractQueue

from service.amqp.declare import declare_queue
from service.amqp.gate import AckGate
from service.amqp.hooks import ConsumerHooks, SettlerHooks
from service.amqp.link import CONNECTION_ERRORS, Link
from service.amqp.publisher import Publisher
from service.amqp.settler import Settler, Work
from service.config import Settings
from service.topology import Topology

log = logging.getLogger(__name__)

# Each connection closes politely within this long, or is dropped.
CLOSE_TIME = 0.5
WATCH_INTERVAL = 1.0


class Consumer:
    """Consumes the request queue; every delivery is settled by its :class:`Settler`."""

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
        self._gate = AckGate()
        self.settler = Settler(settings, topology, work, publisher, settler_hooks, self._gate)
        self.link = Link(settings.amqp_urls, "consume", on_open=self._open, hooks=hooks)
        self._stopping = False
        self._channel: AbstractChannel | None = None
        self._queue: AbstractQueue | None = None
        self._tag: str | None = None
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
        await channel.set_qos(prefetch_count=self.settings.concurrency)
        queue = await declare_queue(channel, self.topology.requests)
        underlay = await channel.get_underlay_channel()
        channel.close_callbacks.add(lambda *_: self._channel_lost(underlay))
        self._channel, self._queue, self._tag = channel, queue, None
        await self._consume()

    async def _consume(self) -> None:
        if self._stopping or self._queue is None or self._tag is not None:
            return
        if self._publisher.blocked:
            return  # consuming starts again when the broker unblocks publishing
        self._tag = await self._queue.consume(self._on_message, no_ack=False)
        self._hooks.consuming(True)
        log.info(
            "consuming %s with prefetch %d", self.topology.requests.name, self.settings.concurrency
        )

    def _pause(self, blocked: bool) -> None:
        step = self._cancel_consumer(_now()) if blocked else self._resume()
        task = asyncio.create_task(step)
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
        """The channel died: its deliveries are the broker's again."""
        self._tag = None
        self._hooks.consuming(False)
        if lost := self.settler.channel_lost(underlay):
            log.warning("lost the channel of %d requests in progress; cancelled them", lost)

    async def ready(self) -> bool:
        """True only while both connections are up, not blocked, and the consumer registered."""
        if self._stopping or self._tag is None or not self.link.ready.is_set():
            return False
        return self._publisher.ready and await self._registered()

    async def stop(self) -> None:
        """Stop taking deliveries, finish in-flight work within the shutdown timeout, give
        back what is left, and close both connections: all within the timeout + 5 s."""
        self._stopping = True
        deadline = _now() + self.settings.shutdown_timeout
        if self._watcher is not None:
            self._watcher.cancel()
        await self._cancel_consumer(deadline)
        await self.settler.drain(deadline)
        await asyncio.gather(
            self.link.close(grace=CLOSE_TIME), self._publisher.close(grace=CLOSE_TIME)
        )
        self._hooks.consuming(False)

    async def _cancel_consumer(self, deadline: float) -> None:
        queue, tag, self._tag = self._queue, self._tag, None
        self._hooks.consuming(False)
        if queue is None or tag is None or not self.link.ready.is_set():
            return  # no broker to tell: the connection's end cancels the consumer anyway
        wait = min(2.0, max(0.5, deadline - _now()))
        settler = self.settler
        await self._gate.cancel(queue, tag, settler.unacked, self.settings.concurrency, wait)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        # Deliveries that arrive while stopping (before the broker saw the cancel) are
        # handled like any other: they are ours, and finishing them costs nothing more.
        try:
            channel = message.channel
        except aio_pika.exceptions.ChannelInvalidStateError:
            return  # its channel died already: the broker redelivers it
        self._gate.delivered()
        self.settler.take(message, channel)


def _now() -> float:
    # The loop's clock (monotonic), so tests can run this on virtual time.
    return asyncio.get_running_loop().time()
