"""The producer snippets of docs/producing.md, in Python and Node.js, against the real broker:
publish (passive declare, persistent, confirmed, mandatory) and consume the result event."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import aio_pika
import orjson
import pytest
from aio_pika.abc import AbstractRobustConnection

from service.amqp.declare import declare_queue
from service.config import Settings
from service.runtime import Service
from service.topology import Topology
from testbed.support import LEDGER, FileServer, Names, courier_env, drain, inconvo_request
from tests.producers.conftest import command

LANGUAGES = ["python", "node"]


@pytest.fixture(params=LANGUAGES)
def runtime(request: pytest.FixtureRequest) -> tuple[str, str | None]:
    """The language, and the node binary when it is Node.js (skipped, with a reason, without it)."""
    language: str = request.param
    return language, request.getfixturevalue("node") if language == "node" else None


@pytest.fixture
async def events_queue(amqp: AbstractRobustConnection, names: Names) -> AsyncIterator[str]:
    """The name of the consumer's own events queue; deleted afterwards."""
    name = f"{names.queue}.app-events"
    yield name
    channel = await amqp.channel()
    await channel.queue_delete(name)
    await channel.close()


def _env(names: Names, events_queue: str) -> dict[str, str]:
    return courier_env(
        COURIER_QUEUE=names.queue,
        COURIER_EVENTS_EXCHANGE=names.events_exchange,
        EVENTS_QUEUE=events_queue,
    )


async def test_publish_then_consume_the_event(
    runtime: tuple[str, str | None],
    service: Service,
    names: Names,
    files: FileServer,
    events_queue: str,
    tmp_path: Path,
) -> None:
    """The consume snippet binds its queue, the publish snippet sends a request, the event comes."""
    language, node = runtime
    env = _env(names, events_queue)
    consumer = await asyncio.create_subprocess_exec(
        *command(language, "consume", node),
        "--count",
        "1",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert consumer.stderr is not None
        ready = await asyncio.wait_for(consumer.stderr.readline(), 30)
        assert b"waiting for events" in ready, ready
        rid = f"snippet-{language}"
        request = tmp_path / "request.json"
        request.write_bytes(orjson.dumps(inconvo_request(files.add("/a.csv", b"x,y\n"), rid)))
        publisher = await asyncio.create_subprocess_exec(
            *command(language, "publish", node),
            str(request),
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(publisher.communicate(), 30)
        assert publisher.returncode == 0, err.decode()
        assert orjson.loads(out) == {"submitted": rid, "queue": names.queue}
        events, err = await asyncio.wait_for(consumer.communicate(), 30)
        LEDGER.add(f"{language} consume snippet", events + err)
        assert consumer.returncode == 0, err.decode()
        [event] = [orjson.loads(line) for line in events.splitlines()]
        assert event["type"] == "courier.upload.succeeded"
        assert event["data"]["requestId"] == rid
    finally:
        if consumer.returncode is None:
            consumer.kill()
            await consumer.wait()


async def test_publish_to_a_missing_queue_fails_and_creates_nothing(
    runtime: tuple[str, str | None],
    amqp: AbstractRobustConnection,
    names: Names,
    events_queue: str,
    tmp_path: Path,
) -> None:
    """The snippet looks the queue up passively: missing, it fails loudly and declares nothing."""
    language, node = runtime
    request = tmp_path / "request.json"
    request.write_bytes(orjson.dumps(inconvo_request("https://files.example.com/a.csv", "x")))
    publisher = await asyncio.create_subprocess_exec(
        *command(language, "publish", node),
        str(request),
        env=_env(names, events_queue),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(publisher.communicate(), 30)
    assert publisher.returncode != 0 and out == b""
    assert b"NOT_FOUND" in err, err
    channel = await amqp.channel()
    with pytest.raises(aio_pika.exceptions.ChannelNotFoundEntity):
        await channel.declare_queue(names.queue, passive=True)


async def test_the_published_message_is_persistent_and_identified(
    runtime: tuple[str, str | None],
    amqp: AbstractRobustConnection,
    names: Names,
    events_queue: str,
    tmp_path: Path,
) -> None:
    """What the snippet puts in the queue: the body byte for byte, persistent, JSON, the request id."""
    language, node = runtime
    channel = await amqp.channel()
    await declare_queue(channel, Topology.from_settings(Settings(queue=names.queue)).requests)
    request = tmp_path / "request.json"
    request.write_bytes(orjson.dumps(inconvo_request("https://files.example.com/a.csv", "p-1")))
    publisher = await asyncio.create_subprocess_exec(
        *command(language, "publish", node),
        str(request),
        env=_env(names, events_queue),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(publisher.communicate(), 30)
    assert publisher.returncode == 0, err.decode()
    [message] = [m async for m in drain(amqp, names.queue)]
    assert message.body == request.read_bytes()
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert message.content_type == "application/json" and message.message_id == "p-1"
