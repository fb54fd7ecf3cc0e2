"""At-least-once under faults: retries, dead letters, broker cuts and restarts, kills, shutdown."""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from collections.abc import Callable

import aiohttp
import pytest
from aio_pika.abc import AbstractRobustConnection

from service.config import Settings
from service.errors import CourierError, ErrorCode, RetryableError, error_for
from service.retry import backoff, parse_retry_after, retried
from service.settle import pick_delay
from testbed.fakes import FakeInconvo
from testbed.proxy import TcpProxy
from testbed.support import (
    CourierProcess,
    EventCollector,
    FileServer,
    Names,
    courier,
    courier_env,
    drain,
    inconvo_request,
    next_message,
    publish,
    publish_many,
)
from tests.conftest import running


def assert_exactly_terminal(collector: EventCollector, ids: set[str]) -> dict[str, int]:
    """Every id ended; returns how many events each had (more than one only after interruptions)."""
    counts: dict[str, int] = {}
    for event in collector.events:
        counts[event["data"]["requestId"]] = counts.get(event["data"]["requestId"], 0) + 1
    assert set(counts) == ids, f"missing: {sorted(ids - set(counts))[:5]}"
    return counts


# -- pure decisions -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attempt", "retry_after", "expected"),
    [
        (1, None, 10),
        (2, None, 60),
        (4, None, 1800),
        (9, None, 1800),
        (1, 45.0, 60),
        (1, 400.0, 1800),
        (3, 20.0, 300),
        (1, 5000.0, 1800),
    ],
)
def test_delay_tier_choice(attempt: int, retry_after: float | None, expected: int) -> None:
    """One tier per attempt; a longer Retry-After picks the first tier at least that long."""
    assert pick_delay((10, 60, 300, 1800), attempt, retry_after) == expected


def test_backoff_honours_retry_after() -> None:
    """In-process retries wait what the server asked, up to 30 s; longer goes to the tiers."""

    def err(after: float | None) -> RetryableError:
        return RetryableError(ErrorCode.DESTINATION_UNAVAILABLE, "x", retry_after=after)

    assert backoff(err(None)) is True
    assert backoff(err(1.0)) == 1.0
    assert backoff(err(31.0)) is False
    assert backoff(ValueError()) is False
    assert parse_retry_after({"Retry-After": "7"}) == 7.0
    assert parse_retry_after({"retry-after-ms": "1500", "Retry-After": "9"}) == 1.5
    assert parse_retry_after({"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0.0
    assert parse_retry_after({}) is None


@pytest.mark.usefixtures("fast_retries")
@pytest.mark.parametrize(
    ("failures", "error", "tries", "succeeds"),
    [
        (0, None, 1, True),
        (2, ErrorCode.DESTINATION_UNAVAILABLE, 3, True),
        (5, ErrorCode.SOURCE_UNAVAILABLE, 3, False),
        (5, ErrorCode.DESTINATION_REJECTED, 1, False),
    ],
)
async def test_retried_makes_three_tries_of_transient_failures_only(
    failures: int, error: ErrorCode | None, tries: int, succeeds: bool
) -> None:
    """A call is tried at most 3 times in-process, and only while it fails transiently."""
    calls = 0

    async def call() -> str:
        nonlocal calls
        calls += 1
        if calls <= failures:
            assert error is not None
            raise error_for(error, f"failure {calls}")
        return "done"

    if succeeds:
        assert await retried(call) == "done"
    else:
        with pytest.raises(CourierError) as caught:
            await retried(call)
        assert caught.value.message == f"failure {tries}"
    assert calls == tries


# -- retries through the real service -------------------------------------------------


async def test_transient_failures_then_success(
    make_settings: Callable[..., Settings],
    amqp: AbstractRobustConnection,
    names: Names,
    files: FileServer,
    inconvo: FakeInconvo,
    collector: EventCollector,
) -> None:
    """500 twice then 200 succeeds; 429 with Retry-After: 1 then 200 succeeds; both in one attempt."""
    url = files.add("/a.csv", b"1\n")
    async with running(make_settings()):
        inconvo.fail_next(500, count=2)
        await publish(amqp, names.queue, inconvo_request(url, "after-500s"))
        [first] = await collector.wait_for(1)
        inconvo.fail_next(429, headers={"Retry-After": "1"})
        started = time.monotonic()
        await publish(amqp, names.queue, inconvo_request(url, "after-429"))
        events = await collector.wait_for(2)
        waited = time.monotonic() - started
    assert first["data"]["status"] == "succeeded" and first["data"]["attempts"] == 1
    assert events[1]["data"]["status"] == "succeeded" and events[1]["data"]["attempts"] == 1
    assert [r.status for r in inconvo.requests] == [500, 500, 200, 429, 200]
    assert waited >= 1.0, "the Retry-After of 1 s was not honoured"


async def test_exhausted_retries_dead_letter_then_replay(
    make_settings: Callable[..., Settings],
    amqp: AbstractRobustConnection,
    names: Names,
    files: FileServer,
    inconvo: FakeInconvo,
    collector: EventCollector,
    fast_retries: None,
) -> None:
    """Always 500: one failed event after COURIER_MAX_ATTEMPTS, the message dead-lettered; replay after healing succeeds."""
    url = files.add("/a.csv", b"1\n")
    inconvo.fail_next(500, count=1000)
    async with running(make_settings(max_attempts=3, breaker_threshold=100)):
        await publish(amqp, names.queue, inconvo_request(url, "doomed"), message_id="doomed")
        [failed] = await collector.wait_for(1, timeout=30)
        await asyncio.sleep(0.5)
        assert len(collector.events) == 1
        data = failed["data"]
        assert data["attempts"] == 3
        assert data["error"] == {
            "code": "destination_unavailable",
            "message": data["error"]["message"],
            "retryable": True,
            "httpStatus": 500,
        }
        channel = await amqp.channel()
        dead = await next_message(await channel.declare_queue(names.dead_queue, passive=True))
        headers = dead.headers or {}
        assert headers["x-courier-error-code"] == "destination_unavailable"
        assert headers["x-courier-attempts"] == 3
        await dead.nack(requeue=True)
        await channel.close()
        inconvo.clear_failures()
        code, _, _ = await courier("dead", "replay", env=courier_env(COURIER_QUEUE=names.queue))
        assert code == 0
        events = await collector.wait_for(2, timeout=30)
    replayed = events[1]["data"]
    assert replayed["requestId"] == "doomed"
    assert replayed["status"] == "succeeded"
    assert replayed["attempts"] == 1  # the attempt count was reset by the replay


async def test_poison_message(
    make_settings: Callable[..., Settings],
    amqp: AbstractRobustConnection,
    names: Names,
    files: FileServer,
    inconvo: FakeInconvo,
    collector: EventCollector,
) -> None:
    """A delivery that crashed consumers COURIER_MAX_REDELIVERIES times fails as poison_message."""
    settings = make_settings(max_redeliveries=3)
    async with running(settings):
        pass  # declares the topology
    await publish(amqp, names.queue, inconvo_request(files.add("/a.csv", b"1\n"), "poison"))
    channel = await amqp.channel()
    queue = await channel.declare_queue(names.queue, passive=True)
    for _ in range(3):  # a consumer that dies holding the message, three times
        message = await queue.get(timeout=5)
        await message.nack(requeue=True)
    await channel.close()
    async with running(settings):
        [event] = await collector.wait_for(1)
    assert event["data"]["error"]["code"] == "poison_message"
    assert inconvo.requests == []
    [dead] = [m async for m in drain(amqp, names.dead_queue)]
    assert (dead.headers or {})["x-courier-error-code"] == "poison_message"


# -- broker faults ----------------------------------------------------------------------


async def test_connection_cut_during_a_run(
    make_settings: Callable[..., Settings],
    amqp: AbstractRobustConnection,
    names: Names,
    files: FileServer,
    inconvo: FakeInconvo,
    collector: EventCollector,
) -> None:
    """A 5 s cut of both broker connections mid-run loses nothing; /readyz drops and consuming resumes."""
    proxy = await TcpProxy().start()
    url = files.add("/a.csv", b"1\n")
    inconvo.delay = 0.005
    try:
        async with running(make_settings(amqp_url=proxy.amqp_url, concurrency=16)) as service:
            ids = await publish_many(amqp, names.queue, url, 500, "cut")
            await collector.wait_for(100, timeout=60)
            proxy.cut()
            await asyncio.sleep(0.5)
            assert not await service.ready()
            async with (
                aiohttp.ClientSession() as http,
                http.get(f"http://127.0.0.1:{service.http_port}/readyz") as answer,
            ):
                assert answer.status == 503
            await asyncio.sleep(4.5)
            seen_before = len(collector.events)
            proxy.restore()
            restored = time.monotonic()
            await collector.wait_for(seen_before + 1, timeout=10)
            resumed_after = collector.arrivals[seen_before] - restored
            await collector.wait_for_ids(ids, timeout=90)
            for _ in range(100):
                if await service.ready():
                    break
                await asyncio.sleep(0.1)
            assert await service.ready()
    finally:
        await proxy.close()
    counts = assert_exactly_terminal(collector, ids)
    assert all(e["data"]["status"] == "succeeded" for e in collector.events)
    duplicates = sum(c - 1 for c in counts.values())
    assert duplicates <= 16 + 16, (
        f"{duplicates} duplicates: more than the work in flight at the cut"
    )
    assert resumed_after < 10
    print(
        f"\nconnection cut: 500 requests, {duplicates} duplicates, resumed {resumed_after:.1f}s after restore"
    )


async def test_sigkill_mid_run_then_restart(
    process_env: Callable[..., dict[str, str]],
    amqp: AbstractRobustConnection,
    names: Names,
    files: FileServer,
    inconvo: FakeInconvo,
    collector: EventCollector,
) -> None:
    """SIGKILL during a run, then a new process: every request ends, none lost."""
    inconvo.delay = 0.02
    url = files.add("/a.csv", b"1\n")
    first = await CourierProcess(process_env(COURIER_CONCURRENCY="8")).start()
    ids = await publish_many(amqp, names.queue, url, 200, "kill")
    await collector.wait_for(40, timeout=60)
    assert await first.signal(signal.SIGKILL) == -signal.SIGKILL
    killed_at = len(collector.events)
    second = await CourierProcess(process_env(COURIER_CONCURRENCY="8")).start()
    try:
        await collector.wait_for_ids(ids, timeout=90)
    finally:
        assert await second.signal(signal.SIGTERM) == 0
    counts = assert_exactly_terminal(collector, ids)
    assert killed_at < 200, "the kill came too late to prove anything"
    assert sum(counts.values()) - 200 <= 8  # only work in flight at the kill repeats


async def test_sigterm_finishes_in_flight_and_requeues_the_rest(
    process_env: Callable[..., dict[str, str]],
    amqp: AbstractRobustConnection,
    names: Names,
    files: FileServer,
    inconvo: FakeInconvo,
    collector: EventCollector,
) -> None:
    """SIGTERM with slow requests in flight: they finish, exit 0 within the timeout, the rest wait for the next process."""
    inconvo.delay = 2.0
    url = files.add("/a.csv", b"1\n")
    env = process_env(COURIER_CONCURRENCY="4", COURIER_SHUTDOWN_TIMEOUT="10")
    first = await CourierProcess(env).start()
    ids = await publish_many(amqp, names.queue, url, 12, "term")
    async with asyncio.timeout(10):
        while len(inconvo.requests) < 4:  # four uploads in flight, slow
            await asyncio.sleep(0.05)
    started = time.monotonic()
    assert await first.signal(signal.SIGTERM) == 0
    took = time.monotonic() - started
    finished = collector.request_ids()
    assert len(finished) == 4, f"in-flight requests should finish before exit, got {len(finished)}"
    assert took < 10 + 2
    second = await CourierProcess(process_env(COURIER_CONCURRENCY="12")).start()
    try:
        await collector.wait_for_ids(ids, timeout=60)
    finally:
        assert await second.signal(signal.SIGTERM) == 0
    counts = assert_exactly_terminal(collector, ids)
    assert set(counts.values()) == {1}
    assert b"Traceback" not in first.stderr


async def test_consumer_cancelled_by_the_server_is_restored(
    make_settings: Callable[..., Settings],
    amqp: AbstractRobustConnection,
    names: Names,
    files: FileServer,
    inconvo: FakeInconvo,
    collector: EventCollector,
) -> None:
    """Deleting the queue under the consumer (a server-side cancel) drops readiness; consuming comes back."""
    async with running(make_settings()) as service:
        channel = await amqp.channel()
        await channel.queue_delete(names.queue)
        await channel.close()
        async with asyncio.timeout(5):
            while await service.ready():
                await asyncio.sleep(0.05)
        async with asyncio.timeout(15):
            while not await service.ready():
                await asyncio.sleep(0.1)
        await publish(
            amqp, names.queue, inconvo_request(files.add("/a.csv", b"1\n"), "after-cancel")
        )
        [event] = await collector.wait_for(1)
    assert event["data"]["status"] == "succeeded"


async def test_three_processes_share_one_queue(
    process_env: Callable[..., dict[str, str]],
    amqp: AbstractRobustConnection,
    names: Names,
    files: FileServer,
    inconvo: FakeInconvo,
    collector: EventCollector,
) -> None:
    """Three `courier run` processes on one queue: 1,000 requests, 1,000 terminal events, work spread over all three."""
    inconvo.delay = 0.005
    url = files.add("/a.csv", b"1\n")
    replicas = [
        await CourierProcess(
            process_env(COURIER_CONCURRENCY="8", COURIER_EVENT_SOURCE=f"urn:courier:replica-{i}")
        ).start()
        for i in range(3)
    ]
    try:
        ids = await publish_many(amqp, names.queue, url, 1000, "shared")
        await collector.wait_for_ids(ids, timeout=120)
    finally:
        codes = [await replica.signal(signal.SIGTERM) for replica in replicas]
    assert codes == [0, 0, 0]
    counts = assert_exactly_terminal(collector, ids)
    assert set(counts.values()) == {1}
    assert all(e["data"]["status"] == "succeeded" for e in collector.events)
    per_replica = Counter(e["source"] for e in collector.events)
    assert set(per_replica) == {f"urn:courier:replica-{i}" for i in range(3)}
    assert all(n >= 50 for n in per_replica.values()), per_replica


async def test_deleted_retry_and_dead_queues_are_declared_again(
    make_settings: Callable[..., Settings],
    amqp: AbstractRobustConnection,
    names: Names,
    files: FileServer,
    inconvo: FakeInconvo,
    collector: EventCollector,
) -> None:
    """An operator deletes the retry tier and the dead-letter queue under a running service: the request is not confirmed into nowhere, it still ends in its event and the dead queue."""
    inconvo.fail_next(500, count=100)
    async with running(make_settings(max_attempts=2)):
        channel = await amqp.channel()
        await channel.queue_delete(f"{names.queue}.retry.1s")
        await channel.queue_delete(names.dead_queue)
        await channel.close()
        await publish(amqp, names.queue, inconvo_request(files.add("/a.csv", b"1\n"), "orphan"))
        [event] = await collector.wait_for(1, timeout=30)
    assert event["data"]["error"]["code"] == "destination_unavailable"
    assert event["data"]["attempts"] == 2
    [dead] = [m async for m in drain(amqp, names.dead_queue)]
    assert (dead.headers or {})["x-courier-attempts"] == 2


async def test_a_deleted_events_exchange_does_not_wedge_publishing(
    make_settings: Callable[..., Settings],
    amqp: AbstractRobustConnection,
    names: Names,
    files: FileServer,
    inconvo: FakeInconvo,
) -> None:
    """An operator deletes the events exchange: the broker closes the publishing channel; Courier reopens it, declares the exchange again and publishes the event once more, without uploading again; later requests get their events."""
    url = files.add("/a.csv", b"1\n")
    async with running(make_settings()) as service:
        channel = await amqp.channel()
        await channel.exchange_delete(names.events_exchange)
        await channel.close()
        # Its event cannot be published: the broker closes the channel; Courier
        # opens another, declares the exchange, and publishes the event there.
        await publish(amqp, names.queue, inconvo_request(url, "while-deleted"))
        async with asyncio.timeout(15):
            while not inconvo.uploads or not await service.ready():
                await asyncio.sleep(0.05)
        collector = await EventCollector(amqp, names.events_exchange).start()
        await publish(amqp, names.queue, inconvo_request(url, "after"))
        await collector.wait_for_ids({"after"}, timeout=15)
    [event] = collector.by_request("after")
    assert event["data"]["status"] == "succeeded"
    assert [u.file_name for u in inconvo.uploads] == ["a.csv", "a.csv"], "one upload per request"
    assert [m async for m in drain(amqp, names.dead_queue)] == []
