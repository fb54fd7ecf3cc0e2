"""Cancelling a busy consumer of a quorum queue leaves no delivery counted as returned.

RabbitMQ 3.10 counts a delivery that was on its way to a consumer at its cancel in
``x-delivery-count``; with acks held at the gate nothing is on its way. Each trial is a
chance for the race (a plain cancel lost it in 7 of 24 trials here), so the test runs 20.
"""

from __future__ import annotations

import asyncio
import contextlib

import aio_pika
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

from service.amqp.gate import AckGate
from testbed.support import Names

MESSAGES = 1000  # more than a trial can drain, so the cancel finds the consumer busy
PREFETCH = 8


async def cancel_while_busy(amqp: AbstractRobustConnection, name: str) -> tuple[int, int, int]:
    """Consume ``name`` at full speed, cancel through the gate, close the channel; then
    return (deliveries handled, messages left, messages left with a counted return)."""
    try:
        async with amqp.channel(publisher_confirms=False) as channel:
            queue = await channel.declare_queue(
                name, durable=True, arguments={"x-queue-type": "quorum"}
            )
            for i in range(MESSAGES):
                await channel.default_exchange.publish(
                    aio_pika.Message(b"%d" % i), routing_key=name
                )
            async with asyncio.timeout(10):  # unconfirmed: wait till the queue holds them all
                while ((await queue.declare()).message_count or 0) < MESSAGES:
                    await asyncio.sleep(0.05)
            handled = await consume_then_cancel(amqp, name)
            left = counted = 0
            async with queue.iterator(no_ack=True) as messages:
                # Every message not handled is back on the queue, or this times out.
                with contextlib.suppress(TimeoutError):
                    while left < MESSAGES - handled:
                        async with asyncio.timeout(5):
                            message = await anext(messages)
                        left += 1
                        counted += bool((message.headers or {}).get("x-delivery-count"))
            return handled, left, counted
    finally:  # a failed trial leaves no queue behind
        async with amqp.channel() as cleanup:
            await cleanup.queue_delete(name)


async def consume_then_cancel(amqp: AbstractRobustConnection, name: str) -> int:
    """Consume with a prefetch of 8 for 0.2 s, cancel through the gate, let the held acks
    go, close the channel; returns how many deliveries were handled (and acked)."""
    gate = AckGate()
    unacked: set[int] = set()
    handled = 0

    async def handle(message: AbstractIncomingMessage) -> None:
        nonlocal handled
        gate.delivered()
        unacked.add(message.delivery_tag or 0)
        await asyncio.sleep(0.01)
        await gate.passed()
        unacked.discard(message.delivery_tag or 0)  # before the ack is sent, as the consumer does
        handled += 1
        await message.ack()

    async with amqp.channel() as consuming:
        await consuming.set_qos(prefetch_count=PREFETCH)
        source = await consuming.get_queue(name)
        tag = await source.consume(handle)
        await asyncio.sleep(0.2)
        await gate.cancel(source, tag, lambda: len(unacked), PREFETCH, wait=2.0)
        async with asyncio.timeout(5):
            while unacked:
                await asyncio.sleep(0.01)
    return handled


async def test_a_cancelled_consumer_returns_nothing_counted(
    amqp: AbstractRobustConnection, names: Names
) -> None:
    """Twenty busy consumers cancelled: every message handled once or left untouched."""
    results = [await cancel_while_busy(amqp, f"{names.queue}.gate{i}") for i in range(20)]
    assert all(handled + left == MESSAGES for handled, left, _ in results), results
    assert sum(counted for *_, counted in results) == 0, f"counted returns: {results}"
