"""At-least-once under faults: retries, dead letters, broker cuts and restarts, kills, shutdown."""

from __future__ import annotations

import signal
import time
from collections import Counter

import aiohttp
import pytest

from service.amqp.consumer import MOVING
from service.errors import CourierError, ErrorCode, RetryableError, error_for
from service.retry import backoff, parse_retry_after, retried
from service.settle import pick_delay
from testbed.proxy import TcpProxy
from testbed.stage import Stage
from testbed.support import (
    EventCollector,
    courier,
    courier_env,
    inconvo_request,
    next_message,
    quiesce,
    request_counts,
    wait_until,
)
from testbed.timing import assert_at_least, assert_within


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


async def test_transient_failures_then_success(stage: Stage) -> None:
    """500 twice then 200 succeeds; 429 with Retry-After: 1 then 200 succeeds; both in one attempt."""
    url = stage.files.add("/a.csv", b"1\n")
    inconvo, collector = stage.inconvo, stage.collector
    async with stage.running():
        inconvo.fail_next(500, count=2)
        await stage.publish(inconvo_request(url, "after-500s"))
        [first] = await collector.wait_for(1)
        inconvo.fail_next(429, headers={"Retry-After": "1"})
        started = time.monotonic()
        await stage.publish(inconvo_request(url, "after-429"))
        events = await collector.wait_for(2)
        waited = time.monotonic() - started
    assert first["data"]["status"] == "succeeded" and first["data"]["attempts"] == 1
    assert events[1]["data"]["status"] == "succeeded" and events[1]["data"]["attempts"] == 1
    assert [r.status for r in inconvo.requests] == [500, 500, 200, 429, 200]
    # A floor, not a bound: no load makes the wait shorter than the server asked.
    assert_at_least("Retry-After: 1 honoured", waited, 1.0)


@pytest.mark.usefixtures("fast_retries")
@pytest.mark.timeout(120)  # its waits, added up, are longer than the default 60 s
async def test_exhausted_retries_dead_letter_then_replay(stage: Stage) -> None:
    """Always 500: one failed event after COURIER_MAX_ATTEMPTS, the message dead-lettered; replay after healing succeeds."""
    url = stage.files.add("/a.csv", b"1\n")
    inconvo, collector = stage.inconvo, stage.collector
    inconvo.fail_next(500, count=1000)
    async with stage.running(max_attempts=3, breaker_threshold=100) as service:
        await stage.publish(inconvo_request(url, "doomed"), message_id="doomed")
        [failed] = await collector.wait_for(1, timeout=30)
        await quiesce(service)  # a second event would have been published by now
        assert len(collector.events) == 1
        data = failed["data"]
        assert data["attempts"] == 3
        assert data["error"] == {
            "code": "destination_unavailable",
            "message": data["error"]["message"],
            "retryable": True,
            "httpStatus": 500,
        }
        channel = await stage.amqp.channel()
        dead = await next_message(await channel.declare_queue(stage.names.dead_queue, passive=True))
        headers = dead.headers or {}
        assert headers["x-courier-error-code"] == "destination_unavailable"
        assert headers["x-courier-attempts"] == 3
        await dead.nack(requeue=True)
        await channel.close()
        inconvo.clear_failures()
        code, _, _ = await courier(
            "dead",
            "replay",
            env=courier_env(COURIER_AMQP_URL=stage.broker_url, COURIER_QUEUE=stage.queue),
        )
        assert code == 0
        events = await collector.wait_for(2, timeout=30)
    replayed = events[1]["data"]
    assert replayed["requestId"] == "doomed"
    assert replayed["status"] == "succeeded"
    assert replayed["attempts"] == 1  # the attempt count was reset by the replay


async def test_poison_message(stage: Stage) -> None:
    """A delivery that crashed consumers COURIER_MAX_REDELIVERIES times fails as poison_message."""
    async with stage.running(max_redeliveries=3):
        pass  # declares the topology
    await stage.publish(inconvo_request(stage.files.add("/a.csv", b"1\n"), "poison"))
    channel = await stage.amqp.channel()
    queue = await channel.declare_queue(stage.queue, passive=True)
    for _ in range(3):  # a consumer that dies holding the message, three times
        message = await queue.get(timeout=5)
        await message.nack(requeue=True)
    await channel.close()
    async with stage.running(max_redeliveries=3):
        [event] = await stage.collector.wait_for(1)
    assert event["data"]["error"]["code"] == "poison_message"
    assert stage.inconvo.requests == []
    [dead] = await stage.dead_letters()  # the service has stopped: nothing more on its way
    assert (dead.headers or {})["x-courier-error-code"] == "poison_message"


# -- broker faults ----------------------------------------------------------------------


@pytest.mark.timing
@pytest.mark.timeout(180)
async def test_connection_cut_during_a_run(stage: Stage) -> None:
    """A cut of both broker connections mid-run, held until Courier has retried each a few times, loses nothing; /readyz drops, and events flow again within 10 s of the restore."""
    proxy = await TcpProxy(target_port=stage.broker_port).start()
    url = stage.files.add("/a.csv", b"1\n")
    stage.inconvo.delay = 0.005
    collector = stage.collector
    try:
        async with stage.running(amqp_url=proxy.amqp_url, concurrency=16) as service:
            ids = await stage.publish_many(url, 500, "cut")
            await collector.wait_for(100, timeout=60)
            proxy.cut()

            async def not_ready() -> bool:
                return not await service.ready()

            await wait_until(not_ready, 30, "readiness dropping at the cut")
            async with (
                aiohttp.ClientSession() as http,
                http.get(f"http://127.0.0.1:{service.http_port}/readyz") as answer,
            ):
                assert answer.status == 503
            # The cut lasts until each link has been refused twice: Courier went on retrying.
            await wait_until(lambda: proxy.refused >= 4, 60, "Courier retrying while cut")
            seen_before = len(collector.events)
            proxy.restore()
            restored = time.monotonic()
            await collector.wait_for(seen_before + 1, timeout=60)
            resumed_after = collector.arrivals[seen_before] - restored
            await collector.wait_for_ids(ids, timeout=90)
            await wait_until(service.ready, 30, "ready again")
    finally:
        await proxy.close()
    counts = assert_exactly_terminal(collector, ids)
    assert all(e["data"]["status"] == "succeeded" for e in collector.events)
    duplicates = sum(c - 1 for c in counts.values())
    assert duplicates <= 16 + 16, (
        f"{duplicates} duplicates: more than the work in flight at the cut"
    )
    print(
        f"\nconnection cut: 500 requests, {duplicates} duplicates, resumed {resumed_after:.1f}s after restore"
    )
    assert_within("events again after the restore", resumed_after, 10)


@pytest.mark.timeout(180)  # its waits, added up, are longer than the default 60 s
async def test_sigkill_mid_run_then_restart(stage: Stage) -> None:
    """SIGKILL during a run, then a new process: every request ends, none lost; only deliveries not yet acked at the kill repeat."""
    inconvo, collector = stage.inconvo, stage.collector
    inconvo.delay = 0.02
    url = stage.files.add("/a.csv", b"1\n")
    first = await stage.process(COURIER_CONCURRENCY="8").start()
    ids = await stage.publish_many(url, 200, "kill")
    await collector.wait_for(40, timeout=60)
    # From now on an upload hangs: no more work ends before the kill, whatever the timing.
    inconvo.delay = 600
    assert await first.signal(signal.SIGKILL) == -signal.SIGKILL
    killed_at = len(collector.events)
    inconvo.delay = 0.02
    second = await stage.process(COURIER_CONCURRENCY="8").start()
    try:
        await collector.wait_for_ids(ids, timeout=90)
    finally:
        assert await second.signal(signal.SIGTERM) == 0
    counts = assert_exactly_terminal(collector, ids)
    # 40 events seen, at most a window of 8 uploads ending after that, and 8 events
    # already on their way: the kill came with most of the run still to do.
    assert killed_at <= 40 + 8 + 8, killed_at
    # A repeat is a delivery the broker had not seen acked when the connection died:
    # an upload under way, an ack still on its way out (its slot already taken by the
    # next), a move between its confirmed copy and its ack.
    repeats = sum(counts.values()) - 200
    print(f"\nSIGKILL: {killed_at} events before the kill, {repeats} repeats")
    assert repeats <= 2 * 8 + MOVING, f"{repeats} repeats, more than the work under way"


@pytest.mark.timing
@pytest.mark.timeout(120)
async def test_sigterm_finishes_in_flight_and_requeues_the_rest(stage: Stage) -> None:
    """SIGTERM with slow requests in flight: they finish, exit 0 within the timeout, the rest wait for the next process."""
    inconvo, collector = stage.inconvo, stage.collector
    inconvo.delay = 2.0
    url = stage.files.add("/a.csv", b"1\n")
    first = await stage.process(
        COURIER_CONCURRENCY="4",
        COURIER_SHUTDOWN_TIMEOUT="10",
        COURIER_EVENT_SOURCE="urn:courier:first",
    ).start()
    ids = await stage.publish_many(url, 12, "term")
    await wait_until(lambda: len(inconvo.requests) >= 4, 30, "four slow uploads in flight")
    started = time.monotonic()
    assert await first.signal(signal.SIGTERM) == 0
    took = time.monotonic() - started
    # The four finished before the exit: their events were confirmed to the process, so
    # they reach the collector (on a connection of its own, perhaps a moment later).
    await collector.wait_for(4)

    # The other eight were never taken, given back, or moved to the tenant's queue: once
    # the broker dropped the gone consumer, all eight wait (with the beacon that names
    # the tenant's queue to the next process, if the backlog moved there). The second
    # process finishes each exactly once: a copy too many would show as a second event.
    async def eight_waiting() -> bool:
        ready, consumers = await request_counts(stage.amqp, stage.queue)
        return consumers == 0 and ready >= 8

    await wait_until(eight_waiting, 30, "the other eight back in the queue")
    second = await stage.process(COURIER_CONCURRENCY="12").start()
    try:
        await collector.wait_for_ids(ids, timeout=60)
    finally:
        assert await second.signal(signal.SIGTERM) == 0
    counts = assert_exactly_terminal(collector, ids)
    assert set(counts.values()) == {1}
    by_first = [e for e in collector.events if e["source"] == "urn:courier:first"]
    assert len(by_first) == 4, f"in-flight requests should finish before exit, got {len(by_first)}"
    assert b"Traceback" not in first.stderr
    assert_within("exit at SIGTERM, work in flight", took, 10 + 2)


@pytest.mark.timeout(120)  # its waits, added up, are longer than the default 60 s
async def test_consumer_cancelled_by_the_server_is_restored(
    stage: Stage, caplog: pytest.LogCaptureFixture
) -> None:
    """Deleting the queue under the consumer (a server-side cancel) is noticed and consuming comes back."""
    async with stage.running() as service:
        channel = await stage.amqp.channel()
        await channel.queue_delete(stage.queue)
        await channel.close()
        # The evidence, not a sample of the short not-ready window it opens.
        await wait_until(
            lambda: "the broker cancelled the consumer; consuming again" in caplog.text,
            30,
            "the consumer noticed its cancel",
        )
        await wait_until(service.ready, 30, "consuming again")
        await stage.publish(inconvo_request(stage.files.add("/a.csv", b"1\n"), "after-cancel"))
        [event] = await stage.collector.wait_for(1)
    assert event["data"]["status"] == "succeeded"


@pytest.mark.timeout(180)
async def test_three_processes_share_one_queue(stage: Stage) -> None:
    """Three `courier run` processes on one queue: 300 requests, 300 terminal events, work spread over all three."""
    stage.inconvo.delay = 0.005
    url = stage.files.add("/a.csv", b"1\n")
    collector = stage.collector
    replicas = [
        await stage.process(
            COURIER_CONCURRENCY="8", COURIER_EVENT_SOURCE=f"urn:courier:replica-{i}"
        ).start()
        for i in range(3)
    ]
    try:
        ids = await stage.publish_many(url, 300, "shared")
        await collector.wait_for_ids(ids, timeout=120)
    finally:
        codes = [await replica.signal(signal.SIGTERM) for replica in replicas]
    assert codes == [0, 0, 0]
    counts = assert_exactly_terminal(collector, ids)
    assert set(counts.values()) == {1}
    assert all(e["data"]["status"] == "succeeded" for e in collector.events)
    per_replica = Counter(e["source"] for e in collector.events)
    assert set(per_replica) == {f"urn:courier:replica-{i}" for i in range(3)}
    assert all(n >= 30 for n in per_replica.values()), per_replica


async def test_deleted_retry_and_dead_queues_are_declared_again(stage: Stage) -> None:
    """An operator deletes the retry tier and the dead-letter queue under a running service: the request is not confirmed into nowhere, it still ends in its event and the dead queue."""
    stage.inconvo.fail_next(500, count=100)
    async with stage.running(max_attempts=2):
        channel = await stage.amqp.channel()
        await channel.queue_delete(f"{stage.queue}.retry.1s")
        await channel.queue_delete(stage.names.dead_queue)
        await channel.close()
        await stage.publish(inconvo_request(stage.files.add("/a.csv", b"1\n"), "orphan"))
        [event] = await stage.collector.wait_for(1, timeout=30)
    assert event["data"]["error"]["code"] == "destination_unavailable"
    assert event["data"]["attempts"] == 2
    [dead] = await stage.dead_letters()
    assert (dead.headers or {})["x-courier-attempts"] == 2


async def test_a_deleted_events_exchange_does_not_wedge_publishing(stage: Stage) -> None:
    """An operator deletes the events exchange: the broker closes the publishing channel; Courier reopens it, declares the exchange again and publishes the event once more, without uploading again; later requests get their events."""
    url = stage.files.add("/a.csv", b"1\n")
    inconvo = stage.inconvo
    async with stage.running() as service:
        channel = await stage.amqp.channel()
        await channel.exchange_delete(stage.names.events_exchange)
        await channel.close()
        # Its event cannot be published: the broker closes the channel; Courier
        # opens another, declares the exchange, and publishes the event there.
        await stage.publish(inconvo_request(url, "while-deleted"))

        async def uploaded_and_ready() -> bool:
            return bool(inconvo.uploads) and await service.ready()

        await wait_until(uploaded_and_ready, 30, "the upload done, publishing again")
        collector = await EventCollector(stage.amqp, stage.names.events_exchange).start()
        await stage.publish(inconvo_request(url, "after"))
        await collector.wait_for_ids({"after"}, timeout=15)
    [event] = collector.by_request("after")
    assert event["data"]["status"] == "succeeded"
    assert [u.file_name for u in inconvo.uploads] == ["a.csv", "a.csv"], "one upload per request"
    assert await stage.dead_letters() == []
