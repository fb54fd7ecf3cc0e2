"""What reading past a backlog would cost without moving it: deliveries held unacked.

Fills a quorum queue (as ``courier.uploads`` is) with N small requests of one tenant,
then consumes it holding every delivery unacked, as a consumer that looked past a
backlog for another tenant's requests without moving them into tenant queues would,
and prints how fast the deliveries came and this process's CPU for each. Then the
same with an unlimited prefetch (0), which a quorum queue caps: it prints how many
deliveries came before they stopped. Last, for comparison, it moves them all into a
second quorum queue as a bare aio-pika mover would with the prefetch the contract
allows (a confirmed publish, then the ack). Courier cannot read past without moving:
the contract ties the prefetch to ``COURIER_CONCURRENCY`` (docs/isolation.md, "What
bounds it"). Run with ``python -m bench.read_ahead [N]``.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid

import aio_pika
import orjson
from aio_pika.abc import AbstractIncomingMessage

from bench.run import broker_pid, cpu_seconds
from testbed.support import AMQP_URL

N = 20_000
PUBLISHING = 256  # publishes in flight while filling the queue
QUIET = 2.0  # seconds without a delivery after which an unlimited prefetch has stalled
PREFETCH = 32  # COURIER_CONCURRENCY's default, which the contract makes the prefetch too


def request(i: int) -> bytes:
    """A small Inconvo request of tenant ``backfill``, as the tenant bench sends."""
    return orjson.dumps(
        {
            "requestId": f"read-ahead-{i}",
            "tenant": "backfill",
            "source": {"type": "http", "url": f"http://127.0.0.1:9/files/{i}.csv"},
            "destination": {"type": "inconvo", "fileName": f"{i}.csv", "userId": "bench"},
            "metadata": {"batch": "read-ahead"},
        }
    )


async def fill(channel: aio_pika.abc.AbstractChannel, queue: str, n: int) -> float:
    """Publish ``n`` persistent requests to ``queue``, confirmed; the seconds it took."""
    limit = asyncio.Semaphore(PUBLISHING)

    async def one(i: int) -> None:
        async with limit:
            message = aio_pika.Message(request(i), delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
            await channel.default_exchange.publish(message, routing_key=queue)

    began = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    return time.perf_counter() - began


async def hold(
    connection: aio_pika.abc.AbstractConnection, queue: str, n: int, prefetch: int
) -> tuple[int, float, float]:
    """Consume ``queue`` with ``prefetch``, acking nothing, until ``n`` deliveries came or
    none came for :data:`QUIET` seconds; (deliveries, seconds to the last, CPU us each)."""
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=prefetch)
    held: list[AbstractIncomingMessage] = []
    arrived = asyncio.Event()
    last = began = time.perf_counter()
    cpu = time.process_time()

    async def on_message(message: AbstractIncomingMessage) -> None:
        nonlocal last
        held.append(message)
        last = time.perf_counter()
        arrived.set()

    used = time.process_time()
    await (await channel.get_queue(queue, ensure=False)).consume(on_message)
    while len(held) < n:
        arrived.clear()
        try:
            await asyncio.wait_for(arrived.wait(), QUIET)
        except TimeoutError:
            break
        used = time.process_time()
    count = len(held)
    await channel.close()  # every held delivery goes back to the queue
    return count, last - began, (used - cpu) / max(count, 1) * 1e6


async def move(
    connection: aio_pika.abc.AbstractConnection, source: str, target: str, n: int
) -> tuple[float, float]:
    """Move ``n`` deliveries from ``source`` to ``target`` as a bare aio-pika mover does
    (prefetch :data:`PREFETCH`; a confirmed publish, then the ack); (seconds, CPU us each)."""
    channel = await connection.channel(publisher_confirms=True)
    await channel.set_qos(prefetch_count=PREFETCH)
    moved, done = 0, asyncio.Event()
    tasks: set[asyncio.Task[None]] = set()

    async def one(message: AbstractIncomingMessage) -> None:
        nonlocal moved
        copy = aio_pika.Message(message.body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
        await channel.default_exchange.publish(copy, routing_key=target)
        await message.ack()
        moved += 1
        if moved == n:
            done.set()

    async def on_message(message: AbstractIncomingMessage) -> None:
        task = asyncio.create_task(one(message))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    began, cpu = time.perf_counter(), time.process_time()
    await (await channel.get_queue(source, ensure=False)).consume(on_message)
    await done.wait()
    took, used = time.perf_counter() - began, time.process_time() - cpu
    await channel.close()
    return took, used / n * 1e6


async def main(n: int) -> None:
    """Fill a queue, read it holding everything (prefetch ``n``, then 0), then move it."""
    url = os.environ.get("COURIER_AMQP_URL", AMQP_URL)
    broker = broker_pid(url).get("broker")

    def broker_us(since: float, count: int) -> str:
        if broker is None:
            return ""
        return f"; the broker's CPU {(cpu_seconds(broker) - since) / count * 1e6:.0f} us each"

    def broker_now() -> float:
        return cpu_seconds(broker) if broker is not None else 0.0

    name = f"bench.read-ahead.{uuid.uuid4().hex[:8]}"
    async with await aio_pika.connect(url) as connection:
        channel = await connection.channel(publisher_confirms=True)
        queues = [
            await channel.declare_queue(
                f"{name}.{role}", durable=True, arguments={"x-queue-type": "quorum"}
            )
            for role in ("requests", "tenant")
        ]
        requests, tenant = (queue.name for queue in queues)
        try:
            since = broker_now()
            took = await fill(channel, requests, n)
            print(
                f"{n} requests published to a quorum queue in {took:.2f} s ({n / took:.0f}/s)"
                f"{broker_us(since, n)}"
            )
            for prefetch in (n, 0):
                since = broker_now()
                count, seconds, cpu_us = await hold(connection, requests, n, prefetch)
                rate = f"{count / seconds:.0f}/s" if seconds > 0 else "-"
                print(
                    f"prefetch {prefetch}: {count} of {n} deliveries held unacked, the last after "
                    f"{seconds:.2f} s ({rate}); {cpu_us:.0f} us of this process's CPU each"
                )
            since = broker_now()
            took, cpu_us = await move(connection, requests, tenant, n)
            print(
                f"prefetch {PREFETCH}: {n} moved to another quorum queue in {took:.2f} s "
                f"({n / took:.0f}/s); {cpu_us:.0f} us of this process's CPU each"
                f"{broker_us(since, n)}"
            )
        finally:
            for queue in queues:
                await queue.delete(if_unused=False, if_empty=False)


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if sys.argv[1:] else N))
