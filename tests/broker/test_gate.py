"""Cancelling a busy consumer of a quorum queue leaves no delivery counted as returned.

RabbitMQ 3.10 counts a delivery that was on its way to a consumer at its cancel in
``x-delivery-count``; with acks held at the gate nothing is on its way. Each trial is a
chance for the race (a plain cancel lost it in 7 of 24 trials here), so the test runs 20.
How the gate decides when to let the cancel go is tested against a scripted queue, where
the broker's pauses are set rather than hoped for.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, cast

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue, AbstractRobustConnection

from service.amqp.gate import AckGate
from testbed.support import Names

MESSAGES = 1000  # more than a trial can drain, so the cancel finds the consumer busy
PREFETCH = 8


async def cancel_while_busy(amqp: AbstractRobustConnection, name: str) -> tuple[int, int, int, str]:
    """Consume ``name`` at full speed, cancel through the gate, close the channel; then
    return (deliveries handled, messages left, messages left with a counted return, and
    why the gate let the cancel go)."""
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
            handled, released_by = await consume_then_cancel(amqp, name)
            left = counted = 0
            async with queue.iterator(no_ack=True) as messages:
                # Every message not handled is back on the queue, or this times out.
                with contextlib.suppress(TimeoutError):
                    while left < MESSAGES - handled:
                        async with asyncio.timeout(5):
                            message = await anext(messages)
                        left += 1
                        counted += bool((message.headers or {}).get("x-delivery-count"))
            return handled, left, counted, released_by
    finally:  # a failed trial leaves no queue behind
        async with amqp.channel() as cleanup:
            await cleanup.queue_delete(name)


async def consume_then_cancel(amqp: AbstractRobustConnection, name: str) -> tuple[int, str]:
    """Consume with a prefetch of 8 for 0.2 s, cancel through the gate, let the held acks
    go, close the channel; returns how many deliveries were handled (and acked), and why
    the gate let the cancel go."""
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
    return handled, gate.released_by


async def test_a_cancelled_consumer_returns_nothing_counted(
    amqp: AbstractRobustConnection, names: Names
) -> None:
    """Twenty busy consumers cancelled: every message handled once or left untouched."""
    results = [await cancel_while_busy(amqp, f"{names.queue}.gate{i}") for i in range(20)]
    assert all(handled + left == MESSAGES for handled, left, *_ in results), results
    assert sum(counted for _, _, counted, _ in results) == 0, f"counted returns: {results}"


@dataclass
class ScriptedQueue:
    """A queue whose broker reports ``ready`` messages to a passive declare (after
    ``answer_after`` seconds) and records how many deliveries were unacked at the cancel."""

    unacked: list[int]
    ready: int
    answer_after: float = 0.0
    name: str = "uploads"
    cancelled_with: list[int] = field(default_factory=list)

    @property
    def channel(self) -> Any:
        async def queue_declare(name: str, passive: bool) -> Any:
            assert (name, passive) == (self.name, True)
            await asyncio.sleep(self.answer_after)
            return SimpleNamespace(message_count=self.ready)

        async def underlay() -> Any:
            return SimpleNamespace(queue_declare=queue_declare)

        return SimpleNamespace(get_underlay_channel=underlay)

    async def cancel(self, tag: str) -> None:
        self.cancelled_with.append(len(self.unacked))


async def scripted_cancel(
    queue: ScriptedQueue, arrivals: list[float], wait: float = 2.0
) -> tuple[AckGate, float]:
    """Cancel through a gate while deliveries arrive at the offsets ``arrivals`` (s);
    returns the gate and how long the cancel took."""
    gate = AckGate()

    async def deliver(at: float) -> None:
        await asyncio.sleep(at)
        queue.unacked.append(1)
        gate.delivered()

    deliveries = [asyncio.create_task(deliver(at)) for at in arrivals]
    began = time.monotonic()
    await gate.cancel(cast(AbstractQueue, queue), "ctag", lambda: len(queue.unacked), 8, wait)
    took = time.monotonic() - began
    for task in deliveries:
        task.cancel()
    return gate, took


async def test_a_pause_with_messages_ready_does_not_release_the_cancel() -> None:
    """The broker pauses 0.25 s before the next deliveries while the queue holds more:
    the cancel waits for them, and goes out with the window full."""
    queue = ScriptedQueue(unacked=[1, 1, 1], ready=900)
    gate, _ = await scripted_cancel(queue, arrivals=[0.25] * 5)
    assert queue.cancelled_with == [8]
    assert gate.released_by == "window full"


async def test_a_dry_queue_releases_the_cancel_after_a_quiet_spell() -> None:
    """Nothing arrives and the broker reports no ready message: the cancel goes out
    after one quiet spell, not at the time limit."""
    queue = ScriptedQueue(unacked=[1, 1], ready=0)
    gate, took = await scripted_cancel(queue, arrivals=[])
    assert queue.cancelled_with == [2]
    assert gate.released_by == "queue dry"
    assert took < 0.4  # the limit (min(0.5, wait / 2)) is 0.5 s


@pytest.mark.parametrize("answer_after", [0.0, 5.0])
async def test_a_broker_that_never_fills_the_window_is_waited_for_no_longer_than_the_limit(
    answer_after: float,
) -> None:
    """Messages ready but none delivered (or a broker that does not answer the declare):
    the cancel goes out at the time limit all the same."""
    queue = ScriptedQueue(unacked=[1], ready=5, answer_after=answer_after)
    gate, took = await scripted_cancel(queue, arrivals=[], wait=1.0)
    assert queue.cancelled_with == [1]
    assert gate.released_by == "time limit"
    assert 0.45 < took < 1.5
