"""Watching what comes back: result events through a temporary queue of the watcher's own.

``courier events`` tails the events exchange; ``courier submit --wait`` follows
one request. The queue is exclusive and auto-deleted: it lives as long as the
command, takes only what is published while it is bound, and is gone after.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Collection, Mapping
from dataclasses import dataclass
from typing import Any

import aio_pika
import orjson
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractQueue

from service.topology import EVENT_TYPE_PREFIX

# The events that end a request's story, and the exit status each stands for. While
# the service follows uploaded files, a succeeded upload's story ends with its ingestion.
FINAL_EVENTS: Mapping[str, int] = {
    "courier.upload.failed": 1,
    "courier.delete.succeeded": 0,
    "courier.delete.failed": 1,
    "courier.ingestion.completed": 0,
    "courier.ingestion.failed": 1,
}
UNFOLLOWED_FINAL_EVENTS: Mapping[str, int] = {**FINAL_EVENTS, "courier.upload.succeeded": 0}


def final_events(track_ingestion: bool) -> Mapping[str, int]:
    """The final events of a request, when ingestion is (or is not) followed."""
    return FINAL_EVENTS if track_ingestion else UNFOLLOWED_FINAL_EVENTS


class ExchangeMissing(Exception):
    """The events exchange does not exist (Courier has never run against this broker)."""


@dataclass(frozen=True, slots=True)
class Watch:
    """An exclusive queue bound to the events exchange, with the bindings asked for."""

    channel: AbstractChannel
    queue: AbstractQueue


@contextlib.asynccontextmanager
async def watching(
    connection: AbstractConnection, exchange: str, keys: Collection[str] = ("#",)
) -> AsyncIterator[Watch]:
    """Bind a temporary queue to ``exchange`` for each routing-key pattern in ``keys``."""
    channel = await connection.channel()
    try:
        try:
            events = await channel.declare_exchange(exchange, passive=True)
        except aio_pika.exceptions.ChannelNotFoundEntity:
            raise ExchangeMissing(exchange) from None
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        for key in keys or ("#",):
            await queue.bind(events, routing_key=key)
        yield Watch(channel, queue)
    finally:
        if not channel.is_closed:
            with contextlib.suppress(aio_pika.exceptions.AMQPError, RuntimeError):
                await channel.close()


async def events(watch: Watch) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """Each event as it arrives: its routing key and its body (anything unreadable is skipped)."""
    async with watch.queue.iterator(no_ack=True) as messages:
        async for message in messages:
            try:
                event = orjson.loads(message.body)
            except orjson.JSONDecodeError:
                continue
            if isinstance(event, dict):
                yield message.routing_key or "", event


def request_of(event: Mapping[str, Any]) -> str | None:
    """The request id an event is about."""
    data = event.get("data")
    if isinstance(data, dict) and isinstance(rid := data.get("requestId"), str):
        return rid
    subject = event.get("subject")
    return subject if isinstance(subject, str) else None


def routing_key_of(event: Mapping[str, Any]) -> str:
    """``courier.upload.failed`` -> ``upload.failed``."""
    return str(event.get("type", "")).removeprefix(EVENT_TYPE_PREFIX)


def line(event: Mapping[str, Any]) -> str:
    """One line for a person: time, routing key, request, status, and what happened."""
    data = event.get("data") if isinstance(event.get("data"), dict) else {}
    assert isinstance(data, dict)  # noqa: S101 - for the type checker
    parts = [
        str(event.get("time", "-")),
        f"{routing_key_of(event):<17}",
        str(request_of(event) or "-"),
        str(data.get("destination") or "-"),
        f"attempts={data.get('attempts', '-')}",
    ]
    error = data.get("error")
    if isinstance(error, dict):
        parts.append(f"{error.get('code')}: {error.get('message')}")
    elif isinstance(data.get("result"), dict):
        parts.append(_result_summary(data["result"]))
    return "  ".join(parts)


def _result_summary(result: dict[str, Any]) -> str:
    file = result.get("file") if isinstance(result.get("file"), dict) else result
    assert isinstance(file, dict)  # noqa: S101
    name = file.get("name") or file.get("uid") or file.get("path")
    return f"-> {name}" if name else "-> done"
