"""Gray broker faults: a broker that goes away at SIGTERM, slow or stalled confirms,
a cut with work in flight, rolling restarts. Each ends with every request settled once."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable

import pytest
from aio_pika.abc import AbstractRobustConnection

from service.config import Settings
from testbed.fakes import FakeInconvo
from testbed.proxy import TcpProxy
from testbed.support import (
    CourierProcess,
    EventCollector,
    FileServer,
    Names,
    publish_many,
)
from tests.conftest import running


def counts_of(collector: EventCollector, ids: set[str]) -> dict[str, int]:
    """How many terminal events each request got; every id must have at least one."""
    counts: dict[str, int] = dict.fromkeys(ids, 0)
    for event in collector.events:
        counts[event["data"]["requestId"]] = counts.get(event["data"]["requestId"], 0) + 1
    missing = sorted(rid for rid, n in counts.items() if n == 0)
    assert not missing, f"{len(missing)} requests never ended: {missing[:5]}"
    return counts


async def test_a_shutdown_deadline_during_slow_confirms_repeats_no_event(
    process_env: Callable[..., dict[str, str]],
    amqp: AbstractRobustConnection,
    names: Names,
    files: FileServer,
    inconvo: FakeInconvo,
    collector: EventCollector,
) -> None:
    """The shutdown deadline passes while the broker's confirms are held: no delivery is requeued behind a published event, so no event repeats."""
    proxy = await TcpProxy().start()
    inconvo.delay = 1.0
    url = files.add("/a.csv", b"1\n")
    try:
        env = process_env(
            COURIER_AMQP_URL=proxy.amqp_url, COURIER_CONCURRENCY="8", COURIER_SHUTDOWN_TIMEOUT="1"
        )
        first = await CourierProcess(env).start()
        ids = await publish_many(amqp, names.queue, url, 8, "slow-confirm")
        async with asyncio.timeout(10):
            while len(inconvo.requests) < 8:  # every upload under way
                await asyncio.sleep(0.05)
        proxy.stall()  # the uploads end and their events go out; no confirm comes back
        await asyncio.sleep(1.5)
        started = time.monotonic()
        assert await first.signal(signal.SIGTERM, timeout=30) == 0
        took = time.monotonic() - started
    finally:
        await proxy.close()
    await collector.wait_for_ids(ids, timeout=15)
    second = await CourierProcess(process_env(COURIER_CONCURRENCY="8")).start()
    try:
        await asyncio.sleep(3)  # anything requeued would be delivered and settled by now
    finally:
        assert await second.signal(signal.SIGTERM) == 0
    counts = counts_of(collector, ids)
    print(first.stderr.decode()[-6000:])
    assert set(counts.values()) == {1}, f"repeated events: {counts}"
    assert len(inconvo.uploads) == 8, "a request was uploaded twice"
    assert took < 1 + 5


async def test_a_cut_with_work_in_flight_repeats_no_event(
    make_settings: Callable[..., Settings],
    amqp: AbstractRobustConnection,
    names: Names,
    files: FileServer,
    inconvo: FakeInconvo,
    collector: EventCollector,
) -> None:
    """Both connections cut with 32 uploads in flight: the lost deliveries' work is cancelled, so only the broker's redeliveries publish events."""
    proxy = await TcpProxy().start()
    # The fake drops a request whose client left during this delay; the test outlasts it,
    # so work the cut failed to cancel would show as a second upload.
    inconvo.delay = 3.0
    url = files.add("/a.csv", b"1\n")
    try:
        async with running(make_settings(amqp_url=proxy.amqp_url, concurrency=32)):
            ids = await publish_many(amqp, names.queue, url, 32, "in-flight")
            async with asyncio.timeout(10):
                while len(inconvo.requests) < 32:
                    await asyncio.sleep(0.02)
            proxy.cut()
            # On a loaded node the 32 arrive over more than a second: an upload that ended
            # before the cut is rightly repeated by its redelivery.
            early = len(inconvo.uploads)
            inconvo.delay = 0.0  # for the redeliveries; the cut-off requests sleep on
            await asyncio.sleep(2)
            proxy.restore()
            await collector.wait_for_ids(ids, timeout=30)
            await asyncio.sleep(2)  # the cut-off work's uploads and events would be in by now
    finally:
        await proxy.close()
    counts = counts_of(collector, ids)
    duplicates = sum(counts.values()) - len(ids)
    assert duplicates == 0, f"{duplicates} events repeated by work whose delivery was lost"
    uploads = len(inconvo.uploads)
    assert 32 <= uploads <= 32 + early, (
        f"{uploads} uploads for 32 requests ({early} before the cut)"
    )


async def test_a_stalled_confirm_does_not_fork_a_request(
    make_settings: Callable[..., Settings],
    amqp: AbstractRobustConnection,
    names: Names,
    files: FileServer,
    inconvo: FakeInconvo,
    collector: EventCollector,
    fast_retries: None,
) -> None:
    """A retry's confirm is held far past COURIER_PUBLISH_TIMEOUT: Courier waits for it instead of returning the delivery, so one copy runs on, not two."""
    proxy = await TcpProxy().start()
    inconvo.delay = 0.5
    inconvo.fail_next(503, count=3)  # the first attempt's three tries
    url = files.add("/a.csv", b"1\n")
    settings = make_settings(amqp_url=proxy.amqp_url, publish_timeout=0.5, breaker_threshold=100)
    try:
        async with running(settings):
            ids = await publish_many(amqp, names.queue, url, 1, "stalled")
            async with asyncio.timeout(10):
                while not inconvo.requests:
                    await asyncio.sleep(0.02)
            proxy.stall()  # the retry copy goes to its tier; its confirm is held
            await asyncio.sleep(4)
            proxy.resume()
            await collector.wait_for_ids(ids, timeout=30)
            await asyncio.sleep(3)  # a forked copy would have ended by now
    finally:
        await proxy.close()
    [event] = collector.events
    assert event["data"]["status"] == "succeeded" and event["data"]["attempts"] == 2
    assert len(inconvo.uploads) == 1, "the request ran to an end twice"


@pytest.mark.timeout(180)
async def test_rolling_restarts_push_no_request_to_poison(
    process_env: Callable[..., dict[str, str]],
    amqp: AbstractRobustConnection,
    names: Names,
    files: FileServer,
    inconvo: FakeInconvo,
    collector: EventCollector,
) -> None:
    """SIGTERM + restart of each of three replicas, three times each, during 600 requests: graceful give-backs are not crashes, so no poison_message, none lost."""
    inconvo.delay = 0.5  # the run outlasts the restarts: every SIGTERM finds work in flight
    url = files.add("/a.csv", b"1\n")

    def env(i: int) -> dict[str, str]:
        return process_env(
            COURIER_CONCURRENCY="8",
            COURIER_SHUTDOWN_TIMEOUT="0.3",  # short: unfinished work is handed back
            # The strictest setting: a single counted return would be poison_message.
            COURIER_MAX_REDELIVERIES="1",
            COURIER_EVENT_SOURCE=f"urn:courier:replica-{i}",
        )

    replicas = [await CourierProcess(env(i)).start() for i in range(3)]
    ids = await publish_many(amqp, names.queue, url, 600, "rolling")
    codes = []
    try:
        for _ in range(3):  # three rolling deploys
            for i in range(3):
                await asyncio.sleep(0.5)  # uploads under way
                codes.append(await replicas[i].signal(signal.SIGTERM, timeout=30))
                replicas[i] = await CourierProcess(env(i)).start()
        await collector.wait_for_ids(ids, timeout=120)
    finally:
        codes += [await replica.signal(signal.SIGTERM, timeout=30) for replica in replicas]
    assert set(codes) == {0}
    counts = counts_of(collector, ids)
    codes_seen = {e["data"].get("error", {}).get("code") for e in collector.events} - {None}
    assert codes_seen == set(), f"failures: {codes_seen}"
    print(f"\nrolling restarts: 600 requests, {sum(counts.values()) - 600} duplicates")
