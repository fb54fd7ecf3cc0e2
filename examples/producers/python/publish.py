"""Publish one upload request to Courier, the way Courier asks producers to.

- never declare the request queue (Courier owns its arguments): look it up
  passively, so a missing queue is an error here and not a new, wrong queue;
- persistent, so the request survives a broker restart;
- with publisher confirms, so "sent" means the broker has it;
- mandatory, so a request that no queue takes comes back instead of vanishing.

    COURIER_AMQP_URL=amqp://guest:guest@127.0.0.1:5672/ python publish.py request.json
"""

import asyncio
import json
import os
import sys
import uuid

import aio_pika

URL = os.environ.get("COURIER_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
QUEUE = os.environ.get("COURIER_QUEUE", "courier.uploads")


async def publish(body: bytes) -> None:
    """Publish the request ``body``; raises when the broker did not take it."""
    request_id = json.loads(body).get("id") or str(uuid.uuid4())
    async with await aio_pika.connect(URL) as connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        await channel.declare_queue(QUEUE, passive=True)  # 404 NOT_FOUND when missing
        await channel.default_exchange.publish(
            aio_pika.Message(
                body,
                content_type="application/json",
                message_id=request_id,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            routing_key=QUEUE,
            mandatory=True,  # returned (and raised here) when no queue takes it
        )  # returns once the broker confirmed it
    print(json.dumps({"submitted": request_id, "queue": QUEUE}))


if __name__ == "__main__":
    try:
        with open(sys.argv[1], "rb") as handle:
            asyncio.run(publish(handle.read()))
    except (aio_pika.exceptions.AMQPError, OSError) as exc:
        sys.exit(f"publish.py: {exc!r}")
