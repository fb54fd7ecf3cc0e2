"""The one request publisher of the test bed: tests, benchmarks and the demo use it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Sequence
from typing import Any

import aio_pika
import orjson
from aio_pika.abc import AbstractConnection

# What a publish raises while the broker is away (a restart, a lost node).
_TRANSIENT = (aio_pika.exceptions.AMQPError, ConnectionError, OSError, TimeoutError, RuntimeError)


def encode(body: bytes | dict[str, Any]) -> bytes:
    """A request body as published: bytes as given, a dict as JSON."""
    return body if isinstance(body, bytes) else orjson.dumps(body)


async def publish_requests(
    target: AbstractConnection | str | Sequence[str],
    queue: str,
    bodies: Iterable[bytes | dict[str, Any]],
    *,
    rate: float | None = None,
    in_flight: int = 500,
    retry: bool = False,
    **properties: Any,
) -> int:
    """Publish each body to ``queue`` (confirmed, persistent), as a producer would.

    ``target``: an open connection, or one or more AMQP URLs (a connection is made
    for the call; several URLs are nodes of one cluster, tried in turn).
    ``rate``: at most this many per second. ``retry``: a publish that fails because
    the broker is away is published again until confirmed (so a request may reach
    the queue twice, never zero times). Returns how many were published.
    """
    if not isinstance(target, AbstractConnection):
        urls = [target] if isinstance(target, str) else list(target)
        connection = await _connect_any(urls)
        try:
            return await publish_requests(
                connection,
                queue,
                bodies,
                rate=rate,
                in_flight=in_flight,
                retry=retry,
                **properties,
            )
        finally:
            await connection.close()
    channel = await target.channel(publisher_confirms=True)
    limit = asyncio.Semaphore(in_flight)
    began = time.monotonic()

    async def one(raw: bytes) -> None:
        try:
            while True:
                try:
                    ch = channel if not channel.is_closed else await target.channel()
                    await ch.default_exchange.publish(
                        aio_pika.Message(
                            body=raw, delivery_mode=aio_pika.DeliveryMode.PERSISTENT, **properties
                        ),
                        routing_key=queue,
                        timeout=30,
                    )
                    return
                except _TRANSIENT:
                    if not retry:
                        raise
                    await asyncio.sleep(0.5)
        finally:
            limit.release()

    tasks = []
    for index, body in enumerate(bodies):
        if rate is not None:
            await asyncio.sleep(max(0.0, began + index / rate - time.monotonic()))
        await limit.acquire()
        tasks.append(asyncio.create_task(one(encode(body))))
    try:
        await asyncio.gather(*tasks)
    finally:
        if not channel.is_closed:
            await channel.close()
    return len(tasks)


async def _connect_any(urls: list[str]) -> AbstractConnection:
    last: BaseException | None = None
    for url in urls:
        try:
            return await aio_pika.connect_robust(url, timeout=10)
        except _TRANSIENT as exc:
            last = exc
    raise ConnectionError(f"no broker node answered: {last!r}")


def inconvo_request(url: str, rid: str | None = None, **destination: Any) -> dict[str, Any]:
    """A user-scoped Inconvo request for ``url`` (extra destination fields as given)."""
    body: dict[str, Any] = {
        "source": {"url": url},
        "destination": {"type": "inconvo", "userIdentifier": "user_123", **destination},
    }
    if rid:
        body["id"] = rid
    return body


async def publish(
    connection: AbstractConnection, queue: str, body: bytes | dict[str, Any], **properties: Any
) -> None:
    """Publish one request body to ``queue`` (confirmed), as a producer would."""
    await publish_requests(connection, queue, [body], **properties)


async def publish_many(
    target: AbstractConnection | str | Sequence[str],
    queue: str,
    url: str,
    count: int,
    prefix: str,
    **options: Any,
) -> set[str]:
    """Publish ``count`` Inconvo requests for ``url`` with ids ``<prefix>-<i>``; returns the ids."""
    ids = [f"{prefix}-{i}" for i in range(count)]
    await publish_requests(target, queue, [inconvo_request(url, rid) for rid in ids], **options)
    return set(ids)
