"""Receive Courier's result events: bind a queue of your own to the events exchange.

The queue is yours (declare it as you like; here a durable quorum queue, so
events wait for you while you are away). Events may repeat (at-least-once):
deduplicate by ``data.requestId``. Ack after you have handled an event.

    python consume.py [--count N]
"""

import asyncio
import json
import os
import sys

import aio_pika

URL = os.environ.get("COURIER_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
EXCHANGE = os.environ.get("COURIER_EVENTS_EXCHANGE", "courier.events")
QUEUE = os.environ.get("EVENTS_QUEUE", "my-app.courier-events")


async def consume(count: float) -> None:
    """Print each event as one JSON line, ``count`` of them at most."""
    async with await aio_pika.connect(URL) as connection:
        channel = await connection.channel()
        exchange = await channel.declare_exchange(EXCHANGE, passive=True)  # Courier's
        queue = await channel.declare_queue(
            QUEUE, durable=True, arguments={"x-queue-type": "quorum"}
        )
        await queue.bind(exchange, routing_key="upload.*")  # upload.succeeded, upload.failed
        print(f"consume.py: waiting for events on {QUEUE}", file=sys.stderr, flush=True)
        seen = 0
        async with queue.iterator() as messages:
            async for message in messages:
                async with message.process():  # acked when the block ends without error
                    print(json.dumps(json.loads(message.body)), flush=True)
                seen += 1
                if seen >= count:
                    return


if __name__ == "__main__":
    args = sys.argv[1:]
    limit = float(args[args.index("--count") + 1]) if "--count" in args else float("inf")
    asyncio.run(consume(limit))
