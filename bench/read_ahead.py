"""What reading past a backlog would cost without moving it: deliveries held unacked.

Fills a quorum queue (as ``courier.uploads`` is) with N small requests of one tenant,
then consumes it holding every delivery unacked, as a consumer that looked past a
backlog for another tenant's requests without moving them into tenant queues would,
and prints how fast the deliveries came and this process's CPU for each. Then the
same with an unlimited prefetch (0), which a quorum queue caps: it prints how many
deliveries came before they stopped. Courier cannot read past this way: the contract ties the prefetch to ``COURIER_CONCURRENCY``
(docs/isolation.md, "What bounds it"). Run with ``python -m bench.read_ahead [N]``.
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

from testbed.support import AMQP_URL

N = 20_000
PUBLISHING = 256  # publishes in flight while filling the queue
QUIET = 2.0  # seconds without a delivery after which an unlimited prefetch has stalled


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


async def main(n: int) -> None:
    """Fill a queue, read it holding everything, once with prefetch ``n`` and once with 0."""
    url = os.environ.get("COURIER_AMQP_URL", AMQP_URL)
    name = f"bench.read-ahead.{uuid.uuid4().hex[:8]}"
    async with await aio_pika.connect(url) as connection:
        channel = await connection.channel(publisher_confirms=True)
        queue = await channel.declare_queue(
            name, durable=True, arguments={"x-queue-type": "quorum"}
        )
        try:
            took = await fill(channel, name, n)
            print(f"{n} requests published to a quorum queue in {took:.2f} s ({n / took:.0f}/s)")
            for prefetch in (n, 0):
                count, seconds, cpu_us = await hold(connection, name, n, prefetch)
                rate = f"{count / seconds:.0f}/s" if seconds > 0 else "-"
                print(
                    f"prefetch {prefetch}: {count} of {n} deliveries held unacked, the last after "
                    f"{seconds:.2f} s ({rate}); {cpu_us:.0f} us of this process's CPU each"
                )
        finally:
            await queue.delete(if_unused=False, if_empty=False)


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if sys.argv[1:] else N))
