"""The queues one channel consumes: each with its prefetch, its consumer tag, its last delivery.

Consuming, noticing a consumer the broker cancelled, and cancelling with acks held at
the :class:`~service.amqp.gate.AckGate` (so no delivery is on its way to a consumer
being cancelled), for every queue alike: the request queue and tenants' queues.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue

from service.amqp.declare import declare_queue
from service.amqp.gate import AckGate
from service.amqp.link import CONNECTION_ERRORS
from service.topology import QueueSpec

OnMessage = Callable[[AbstractIncomingMessage, str], Awaitable[None]]
Unacked = Callable[[str], int]  # a queue's deliveries taken and not yet acked


@dataclass(eq=False, slots=True)
class Sub:
    """One subscription: its queue, its consumer tag while consuming, its last delivery."""

    spec: QueueSpec
    prefetch: int
    queue: AbstractQueue | None = None
    tag: str | None = None
    last: float = 0.0


class Subscriptions:
    """The subscriptions of one consuming channel, by queue name."""

    def __init__(self, on_message: OnMessage, gate: AckGate, unacked: Unacked) -> None:
        self._on_message = on_message
        self._gate = gate
        self._unacked = unacked
        self.subs: dict[str, Sub] = {}
        self.channel: AbstractChannel | None = None

    def add(self, spec: QueueSpec, prefetch: int) -> Sub | None:
        """Subscribe to ``spec``'s queue (consumed from the next :meth:`consume`); None
        when already subscribed."""
        if spec.name in self.subs:
            return None
        self.subs[spec.name] = sub = Sub(spec, prefetch)
        return sub

    def reset(self, channel: AbstractChannel | None) -> None:
        """A new channel (or none): every subscription is to be consumed again."""
        self.channel = channel
        for sub in self.subs.values():
            sub.queue, sub.tag = None, None

    async def consume(self, sub: Sub) -> bool:
        """Consume ``sub``'s queue (declaring it); False when there is no channel for it."""
        channel = self.channel
        if channel is None or channel.is_closed:
            return False
        if sub.tag is not None:
            return True
        if sub.queue is None:
            sub.queue = await declare_queue(channel, sub.spec)
        await channel.set_qos(prefetch_count=sub.prefetch)  # for the consumer that follows
        name = sub.spec.name

        async def on_message(message: AbstractIncomingMessage) -> None:
            await self._on_message(message, name)

        sub.last = time.monotonic()
        sub.tag = await sub.queue.consume(on_message, no_ack=False)
        return True

    async def counts(self, spec: QueueSpec) -> tuple[int, int]:
        """(messages ready, consumers) of ``spec``'s queue, declaring it (an expired tenant
        queue comes back empty, and expires again); (1, 0) when there is no channel to ask."""
        channel = self.channel
        if channel is None or channel.is_closed:
            return 1, 0
        result = (await declare_queue(channel, spec)).declaration_result
        return int(result.message_count or 0), int(result.consumer_count or 0)

    async def registered(self, tag: str) -> bool:
        """Whether the broker still delivers to consumer ``tag``."""
        channel = self.channel
        if channel is None or channel.is_closed:
            return False
        try:
            underlay = await asyncio.wait_for(channel.get_underlay_channel(), 0.5)
        except CONNECTION_ERRORS:
            return False
        return tag in getattr(underlay, "consumers", {})

    async def cancel(self, sub: Sub, deadline: float, connected: bool) -> None:
        """Cancel ``sub``'s consumer with acks held; ``deadline`` (the loop's clock) bounds
        the wait for cancel-ok."""
        queue, tag, sub.tag = sub.queue, sub.tag, None
        if queue is None or tag is None or not connected:
            return  # no broker to tell: the connection's end cancels the consumer anyway
        wait = min(2.0, max(0.5, deadline - asyncio.get_running_loop().time()))
        name = sub.spec.name
        await self._gate.cancel(queue, tag, lambda: self._unacked(name), sub.prefetch, wait)
