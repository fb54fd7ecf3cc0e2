"""What one more result event costs: the CPU of a confirmed publish in the publishing process.

Publishes result events as Courier does (``service.amqp.wire.event_message``,
``mandatory``, publisher confirms, ``CONCURRENCY`` in flight) to a topic exchange
of its own, once routed to a bound queue and once to a key no queue is bound
for (the broker returns it), and prints this process's CPU microseconds per
publish; the broker's CPU is not counted. With ``make bench``'s per-request CPU
of all its processes, it bounds what following ingestion, one more event per
Inconvo request, can cost. Run with ``python -m bench.publish_cost [N]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
import uuid

import aio_pika

from service.amqp.wire import event_message
from service.events import Event
from testbed.support import AMQP_URL

N = 10_000
CONCURRENCY = 32
ROUTED, UNROUTED = "ingestion.completed", "nobody.listens"


def sample_event() -> Event:
    """An ``ingestion.completed`` event of a typical size."""
    return {
        "specversion": "1.0",
        "id": str(uuid.uuid4()),
        "source": "courier/bench",
        "type": "courier.ingestion.completed",
        "subject": "bench-0",
        "time": "2026-12-02T00:00:00.000Z",
        "datacontenttype": "application/json",
        "data": {
            "requestId": "bench-0",
            "status": "completed",
            "destination": "inconvo",
            "fileStatus": "stored",
            "result": {"fileName": "bench-0.csv", "size": 2},
            "waitedMs": 0.0,
            "checks": 0,
            "metadata": {},
        },
    }


async def cpu_us_per_publish(exchange: aio_pika.abc.AbstractExchange, key: str, n: int) -> float:
    """This process's CPU time per confirmed publish to ``key``, ``CONCURRENCY`` at a time."""
    event = sample_event()
    limit = asyncio.Semaphore(CONCURRENCY)

    async def one() -> None:
        async with limit:
            # Each event its own id, as Courier's: aiormq matches a return by message id.
            message = event_message({**event, "id": str(uuid.uuid4())}, "bench-0", None)
            # Returned (no queue is bound for the key) or routed: confirmed either way.
            with contextlib.suppress(aio_pika.exceptions.DeliveryError):
                await exchange.publish(message, routing_key=key, mandatory=True, timeout=None)

    await asyncio.gather(*(one() for _ in range(min(n, 500))))  # warm-up
    began = time.process_time()
    await asyncio.gather(*(one() for _ in range(n)))
    return (time.process_time() - began) / n * 1e6


async def main(n: int) -> None:
    """Measure both kinds of publish twice, alternating, and print the figures."""
    url = os.environ.get("COURIER_AMQP_URL", AMQP_URL)
    async with await aio_pika.connect(url) as connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        exchange = await channel.declare_exchange(
            f"bench.publish-cost.{uuid.uuid4().hex[:8]}",
            aio_pika.ExchangeType.TOPIC,
            auto_delete=True,
        )
        queue = await channel.declare_queue(exclusive=True)
        await queue.bind(exchange, ROUTED)
        figures: dict[str, list[float]] = {"routed": [], "returned": []}
        for _ in range(2):
            figures["routed"].append(await cpu_us_per_publish(exchange, ROUTED, n))
            await queue.purge()
            figures["returned"].append(await cpu_us_per_publish(exchange, UNROUTED, n))
    print(f"confirmed event publishes, {n} each, {CONCURRENCY} in flight; CPU of this process:")
    for name, values in figures.items():
        print(f"  {name:8} {' / '.join(f'{v:.0f}' for v in values)} us per publish")


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if sys.argv[1:] else N))
