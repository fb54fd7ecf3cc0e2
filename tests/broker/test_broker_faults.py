"""Faults of the broker itself, on a RabbitMQ node of the tests' own (testbed/rabbit.py):
stopped under a running service, stopped at SIGTERM, blocking publishers with a memory alarm.
One file, so one test worker starts that node."""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from collections.abc import Callable

import aio_pika
import aiohttp
import pytest

from service.config import Settings
from testbed.fakes import FakeInconvo
from testbed.rabbit import RabbitNode
from testbed.support import (
    CourierProcess,
    EventCollector,
    FileServer,
    Names,
    inconvo_request,
    publish_many,
    publish_requests,
)
from tests.broker.test_gray_faults import counts_of
from tests.conftest import running


async def test_broker_restart_during_a_run(
    make_settings: Callable[..., Settings],
    own_node: RabbitNode,
    names: Names,
    files: FileServer,
    inconvo: FakeInconvo,
) -> None:
    """`rabbitmqctl stop_app` / `start_app` mid-run: every request ends, consuming resumes within 10 s."""
    url = files.add("/a.csv", b"1\n")
    inconvo.delay = 0.005
    async with await aio_pika.connect_robust(own_node.url) as amqp:
        collector = await EventCollector(amqp, names.events_exchange, durable=True).start()
        async with running(make_settings(amqp_url=own_node.url, concurrency=16)) as service:
            ids = await publish_many(amqp, names.queue, url, 300, "restart")
            await collector.wait_for(50, timeout=60)
            await own_node.stop_app()
            try:
                await asyncio.sleep(1)
                assert not await service.ready()
            finally:
                await own_node.start_app()
            restored = time.monotonic()
            async with asyncio.timeout(10):
                while not await service.ready():
                    await asyncio.sleep(0.1)
            ready_after = time.monotonic() - restored
            await collector.wait_for_ids(ids, timeout=90)
    counts = counts_of(collector, ids)
    print(
        f"\nbroker restart: 300 requests, {sum(counts.values()) - 300} duplicates, ready {ready_after:.1f}s after start_app"
    )


async def test_sigterm_while_the_broker_is_down_exits_in_time(
    own_node: RabbitNode,
    process_env: Callable[..., dict[str, str]],
    names: Names,
    files: FileServer,
    inconvo: FakeInconvo,
) -> None:
    """SIGTERM while RabbitMQ is stopped (stop_app): exit 0 within the shutdown timeout + 5 s; after the broker returns, every request ends."""
    inconvo.delay = 1.0
    url = files.add("/a.csv", b"1\n")
    async with await aio_pika.connect_robust(own_node.url) as amqp:
        collector = await EventCollector(amqp, names.events_exchange, durable=True).start()
        env = process_env(
            COURIER_AMQP_URL=own_node.url,
            COURIER_CONCURRENCY="8",
            COURIER_SHUTDOWN_TIMEOUT="3",
        )
        first = await CourierProcess(env).start()
        ids = await publish_many(amqp, names.queue, url, 20, "down")
        async with asyncio.timeout(10):
            while len(inconvo.requests) < 4:
                await asyncio.sleep(0.05)
        await own_node.stop_app()
        try:
            started = time.monotonic()
            code = await first.signal(signal.SIGTERM, timeout=30)
            took = time.monotonic() - started
        finally:
            await own_node.start_app()
        assert code == 0, first.stderr.decode()[-2000:]
        assert took < 3 + 5, f"took {took:.1f}s"
        second = await CourierProcess(env).start()
        try:
            await collector.wait_for_ids(ids, timeout=60)
        finally:
            assert await second.signal(signal.SIGTERM) == 0
    counts = counts_of(collector, ids)
    assert all(e["data"]["status"] == "succeeded" for e in collector.events)
    print(
        f"\nSIGTERM with the broker down: exit 0 in {took:.1f}s, {sum(counts.values()) - 20} duplicates"
    )


@pytest.mark.timeout(180)
async def test_a_memory_alarm_holds_outcomes_and_uploads_nothing_twice(
    make_settings: Callable[..., Settings],
    own_node: RabbitNode,
    names: Names,
    files: FileServer,
    inconvo: FakeInconvo,
) -> None:
    """RabbitMQ blocks publishers (a memory alarm) for 15 s during 300 requests: no file is uploaded twice, none is lost, /readyz answers 503 and courier_broker_blocked is 1 meanwhile."""
    url = files.add("/a.csv", b"1\n")
    inconvo.delay = 0.3
    ids = [f"alarm-{i}" for i in range(300)]
    bodies = [inconvo_request(url, rid, fileName=f"{rid}.csv") for rid in ids]
    async with await aio_pika.connect_robust(own_node.url) as amqp:
        collector = await EventCollector(amqp, names.events_exchange).start()
        settings = make_settings(amqp_url=own_node.url, concurrency=16)
        async with running(settings) as service, aiohttp.ClientSession() as http:
            await publish_requests(amqp, names.queue, bodies)
            readyz = f"http://127.0.0.1:{service.http_port}/readyz"
            await collector.wait_for(20, timeout=30)
            await own_node.set_memory_watermark(0.000001)
            try:
                async with asyncio.timeout(10):
                    while service.metrics.broker_blocked._value.get() != 1:
                        await asyncio.sleep(0.05)
                alarm_began = time.monotonic()
                answers = []
                while time.monotonic() - alarm_began < 15:
                    async with http.get(readyz) as answer:
                        answers.append(answer.status)
                    await asyncio.sleep(1)
                blocked_events = len(collector.events)
                uploads_blocked = len(inconvo.uploads)
            finally:
                await own_node.set_memory_watermark(0.4)
            try:
                await collector.wait_for_ids(set(ids), timeout=90)
            except TimeoutError:
                m = service.metrics
                raise AssertionError(
                    f"{len(collector.request_ids())} of 300 ended after the alarm; "
                    f"blocked {m.broker_blocked._value.get()}, consuming "
                    f"{m.consumer_active._value.get()}, in flight {m.in_flight._value.get()}, "
                    f"ready {await service.ready()}, uploads {len(inconvo.uploads)}"
                ) from None
            async with asyncio.timeout(10):
                while service.metrics.broker_blocked._value.get() != 0:
                    await asyncio.sleep(0.05)
    assert set(answers) == {503}, answers
    counts = Counter(e["data"]["requestId"] for e in collector.events)
    assert set(counts.values()) == {1}, "an event repeated"
    uploaded = Counter(u.file_name for u in inconvo.uploads)
    assert max(uploaded.values()) == 1 and len(uploaded) == 300, "a file was uploaded twice"
    assert uploads_blocked <= blocked_events + 16, "work went on being taken while blocked"
    print(
        f"\nmemory alarm 15 s: 300 requests, {len(inconvo.uploads)} uploads, "
        f"{sum(counts.values())} events; {uploads_blocked - blocked_events} outcomes held"
    )
