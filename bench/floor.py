"""The floor of this stack: the same I/O as Courier's `small` path with no checks at all.

Consume (prefetch = concurrency) from the same quorum queue, GET the source
with aiohttp, POST it to Inconvo as multipart, publish an event of the same
shape and size (persistent, confirmed), ack. No validation, no address policy,
no spool, no hashing, no retries, no metrics, no tracing, no flow control: what
the libraries themselves cost for one request. Runs as its own process, like
`courier run`, until SIGTERM. Settings come from the same COURIER_* variables
the benchmark gives Courier.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from datetime import UTC, datetime

import aio_pika
import aiohttp
import orjson
from aio_pika.abc import AbstractIncomingMessage

from bench.loops import consume_until_sigterm


async def main() -> None:
    """Consume the queue named by COURIER_QUEUE until SIGTERM."""
    env = os.environ
    url, queue_name = env["COURIER_AMQP_URL"], env["COURIER_QUEUE"]
    prefetch = int(env.get("COURIER_CONCURRENCY", "32"))
    inconvo, key = env["COURIER_INCONVO_BASE_URL"], env["COURIER_INCONVO_API_KEY"]
    consume_conn = await aio_pika.connect(url)
    publish_conn = await aio_pika.connect(url)
    channel = await consume_conn.channel()
    await channel.set_qos(prefetch_count=prefetch)
    queue = await channel.declare_queue(
        queue_name,
        durable=True,
        arguments={
            "x-queue-type": "quorum",
            "x-delivery-limit": 7,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": f"{queue_name}.dead",
        },
    )
    out = await publish_conn.channel(publisher_confirms=True)
    events = await out.declare_exchange(
        env["COURIER_EVENTS_EXCHANGE"], aio_pika.ExchangeType.TOPIC, durable=True
    )
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=prefetch * 2))
    auth = {"Authorization": f"Bearer {key}"}

    async def handle(message: AbstractIncomingMessage) -> None:
        started = time.perf_counter()
        request = orjson.loads(message.body)
        url = request["source"]["url"]
        async with session.get(url) as answer:
            body = b"".join([chunk async for chunk, _ in answer.content.iter_chunks()])
            content_type = answer.headers.get("Content-Type")
        user = request["destination"]["userIdentifier"]
        form = aiohttp.FormData()
        form.add_field("file", body, filename="small.csv", content_type="text/csv")
        async with session.post(f"{inconvo}/datasets/user/{user}", data=form, headers=auth) as r:
            result = orjson.loads(await r.read())
        event_id = str(uuid.uuid4())
        event = {  # Courier's event, field for field (no sha256 computed: a fixed one)
            "specversion": "1.0",
            "id": event_id,
            "source": "urn:courier:floor",
            "type": "courier.upload.succeeded",
            "subject": request["id"],
            "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "datacontenttype": "application/json",
            "data": {
                "requestId": request["id"],
                "status": "succeeded",
                "destination": "inconvo",
                "delivery": "multipart",
                "attempts": 1,
                "durationMs": round((time.perf_counter() - started) * 1000, 1),
                "source": {
                    "url": url,
                    "bytes": len(body),
                    "contentType": content_type,
                    "sha256": "0" * 64,
                },
                "result": result,
                "metadata": {},
            },
        }
        await events.publish(
            aio_pika.Message(
                body=orjson.dumps(event),
                content_type="application/cloudevents+json",
                message_id=event_id,
                correlation_id=request["id"],
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                type="courier.upload.succeeded",
            ),
            routing_key="upload.succeeded",
            timeout=10,
        )
        await message.ack()

    await consume_until_sigterm(queue, handle)
    await session.close()
    await consume_conn.close()
    await publish_conn.close()


if __name__ == "__main__":
    asyncio.run(main())
