"""Faults of the broker itself, on the RabbitMQ node of the tests' own (testbed/rabbit.py):
stopped under a running service, stopped at SIGTERM, blocking publishers with a memory alarm.

All three are in the timing tier: they hold the contract's times (consuming again within
10 s, SIGTERM within the timeout + 5 s), and they stop and block the node, which the
timing tier has to itself, one test at a time.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter

import aiohttp
import pytest

from testbed.rabbit import RabbitNode
from testbed.stage import Stage
from testbed.support import (
    EventCollector,
    app_stopped,
    inconvo_request,
    publish_requests,
    wait_until,
)
from testbed.timing import assert_within
from tests.broker.test_gray_faults import counts_of

pytestmark = pytest.mark.timing


@pytest.mark.timeout(180)
async def test_broker_restart_during_a_run(stage: Stage, own_node: RabbitNode) -> None:
    """`rabbitmqctl stop_app` / `start_app` mid-run: every request ends, consuming resumes within 10 s."""
    url = stage.files.add("/a.csv", b"1\n")
    stage.inconvo.delay = 0.005
    # Durable: events published while the node is away wait in it for the collector.
    collector = await EventCollector(stage.amqp, stage.names.events_exchange, durable=True).start()
    async with stage.running(concurrency=16) as service:
        ids = await stage.publish_many(url, 300, "restart")
        await collector.wait_for(50, timeout=60)
        async with app_stopped(own_node, service.ready):
            pass
        restored = time.monotonic()
        await wait_until(service.ready, 60, "ready again after start_app")
        ready_after = time.monotonic() - restored
        await collector.wait_for_ids(ids, timeout=90)
    assert_within("consuming again after start_app", ready_after, 10)
    counts = counts_of(collector, ids)
    print(
        f"\nbroker restart: 300 requests, {sum(counts.values()) - 300} duplicates, ready {ready_after:.1f}s after start_app"
    )


@pytest.mark.timeout(180)
async def test_sigterm_while_the_broker_is_down_exits_in_time(
    stage: Stage, own_node: RabbitNode
) -> None:
    """SIGTERM while RabbitMQ is stopped (stop_app): exit 0 within the shutdown timeout + 5 s; after the broker returns, every request ends."""
    stage.inconvo.delay = 1.0
    url = stage.files.add("/a.csv", b"1\n")
    collector = await EventCollector(stage.amqp, stage.names.events_exchange, durable=True).start()
    settings = {"COURIER_CONCURRENCY": "8", "COURIER_SHUTDOWN_TIMEOUT": "3"}
    first = await stage.process(**settings).start()
    ids = await stage.publish_many(url, 20, "down")
    await wait_until(lambda: len(stage.inconvo.requests) >= 4, 30, "four uploads under way")
    await own_node.stop_app()
    try:
        started = time.monotonic()
        code = await first.signal(signal.SIGTERM, timeout=60)
        took = time.monotonic() - started
    finally:
        await own_node.start_app()
    assert code == 0, first.stderr.decode()[-2000:]
    # How long the process itself took, by its own log: a test process starved of CPU
    # (the exit noticed late) shows as the difference between the two.
    own = first.logged_seconds("shutting down", "stopped")
    print(f"\nSIGTERM with the broker down: exit 0 in {took:.1f}s (by its own log: {own}s)")
    assert_within("exit at SIGTERM, broker down", took, 3 + 5)
    second = await stage.process(**settings).start()
    try:
        await collector.wait_for_ids(ids, timeout=60)
    finally:
        assert await second.signal(signal.SIGTERM) == 0
    counts = counts_of(collector, ids)
    assert all(e["data"]["status"] == "succeeded" for e in collector.events)
    print(f"{sum(counts.values()) - 20} duplicates")


ALARM_SAMPLES = 3  # /readyz asked once a second while the alarm holds
ALARMED = 200  # requests, enough to be under way when the alarm starts and after it ends


@pytest.mark.timeout(180)
async def test_a_memory_alarm_holds_outcomes_and_uploads_nothing_twice(
    stage: Stage, own_node: RabbitNode
) -> None:
    """RabbitMQ blocks publishers (a memory alarm) for 3 s during 200 requests: no file is uploaded twice, none is lost, /readyz answers 503 and courier_broker_blocked is 1 meanwhile."""
    url = stage.files.add("/a.csv", b"1\n")
    stage.inconvo.delay = 0.3
    ids = [f"alarm-{i}" for i in range(ALARMED)]
    bodies = [inconvo_request(url, rid, fileName=f"{rid}.csv") for rid in ids]
    collector = stage.collector
    async with stage.running(concurrency=16) as service, aiohttp.ClientSession() as http:
        blocked = service.metrics.broker_blocked._value.get
        await publish_requests(stage.amqp, stage.queue, bodies)
        readyz = f"http://127.0.0.1:{service.http_port}/readyz"
        await collector.wait_for(20, timeout=30)
        await own_node.set_memory_watermark(0.000001)
        try:
            await wait_until(lambda: blocked() == 1, 30, "courier_broker_blocked 1")
            answers = []
            for _ in range(ALARM_SAMPLES):  # the alarm lasts as long as the test holds it
                async with http.get(readyz) as answer:
                    answers.append(answer.status)
                await asyncio.sleep(1)
            blocked_events = len(collector.events)
            uploads_blocked = len(stage.inconvo.uploads)
        finally:
            await own_node.set_memory_watermark(0.4)
        try:
            await collector.wait_for_ids(set(ids), timeout=90)
        except TimeoutError:
            m = service.metrics
            raise AssertionError(
                f"{len(collector.request_ids())} of {ALARMED} ended after the alarm; "
                f"blocked {m.broker_blocked._value.get()}, consuming "
                f"{m.consumer_active._value.get()}, in flight {m.in_flight._value.get()}, "
                f"ready {await service.ready()}, uploads {len(stage.inconvo.uploads)}"
            ) from None
        await wait_until(lambda: blocked() == 0, 30, "courier_broker_blocked 0")
    assert set(answers) == {503}, answers
    counts = Counter(e["data"]["requestId"] for e in collector.events)
    assert set(counts.values()) == {1}, "an event repeated"
    uploaded = Counter(u.file_name for u in stage.inconvo.uploads)
    assert max(uploaded.values()) == 1 and len(uploaded) == ALARMED, "a file was uploaded twice"
    assert uploads_blocked <= blocked_events + 16, "work went on being taken while blocked"
    print(
        f"\nmemory alarm {ALARM_SAMPLES} s: {ALARMED} requests, {len(stage.inconvo.uploads)} uploads, "
        f"{sum(counts.values())} events; {uploads_blocked - blocked_events} outcomes held"
    )
