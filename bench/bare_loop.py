"""The baseline: a bare aio-pika loop on a quorum queue with no HTTP work.

Consume (prefetch 64), publish one confirmed message, ack: what the broker
client itself can do on this machine. Runs until SIGTERM.
"""

from __future__ import annotations

import asyncio
import sys

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from bench.loops import consume_until_sigterm


async def main(url: str, queue_name: str, exchange_name: str) -> None:
    """Consume ``queue_name`` and answer each message on ``exchange_name``."""
    consume_conn = await aio_pika.connect_robust(url)
    publish_conn = await aio_pika.connect_robust(url)
    channel = await consume_conn.channel()
    await channel.set_qos(prefetch_count=64)
    queue = await channel.declare_queue(
        queue_name, durable=True, arguments={"x-queue-type": "quorum"}
    )
    out = await publish_conn.channel(publisher_confirms=True)
    exchange = await out.declare_exchange(exchange_name, aio_pika.ExchangeType.TOPIC, durable=True)

    async def handle(message: AbstractIncomingMessage) -> None:
        await exchange.publish(
            aio_pika.Message(body=message.body, message_id=message.message_id),
            routing_key="upload.succeeded",
            timeout=10,
        )
        await message.ack()

    await consume_until_sigterm(queue, handle)
    await consume_conn.close()
    await publish_conn.close()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
