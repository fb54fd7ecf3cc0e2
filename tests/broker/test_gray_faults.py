"""Gray broker faults: a broker that goes away at SIGTERM, slow or stalled confirms,
a cut with work in flight, rolling restarts. Each ends with every request settled once."""

from __future__ import annotations

import signal
import time

import pytest

from testbed.proxy import TcpProxy
from testbed.stage import Stage
from testbed.support import (
    CourierProcess,
    EventCollector,
    in_flight,
    quiesce,
    request_counts,
    wait_until,
)
from testbed.timing import assert_within

SLOW_CONFIRM = b"has not confirmed a publish to upload."


def counts_of(collector: EventCollector, ids: set[str]) -> dict[str, int]:
    """How many terminal events each request got; every id must have at least one."""
    counts: dict[str, int] = dict.fromkeys(ids, 0)
    for event in collector.events:
        counts[event["data"]["requestId"]] = counts.get(event["data"]["requestId"], 0) + 1
    missing = sorted(rid for rid, n in counts.items() if n == 0)
    assert not missing, f"{len(missing)} requests never ended: {missing[:5]}"
    return counts


@pytest.mark.timing
@pytest.mark.timeout(120)
async def test_a_shutdown_deadline_during_slow_confirms_repeats_no_event(stage: Stage) -> None:
    """The shutdown deadline passes while the broker's confirms are held: no delivery is requeued behind a published event, so no event repeats, and the process exits within the timeout + 5 s."""
    proxy = await TcpProxy(target_port=stage.broker_port).start()
    stage.inconvo.delay = 1.0
    url = stage.files.add("/a.csv", b"1\n")
    try:
        first = await CourierProcess(
            stage.env(
                COURIER_AMQP_URL=proxy.amqp_url,
                COURIER_CONCURRENCY="8",
                COURIER_SHUTDOWN_TIMEOUT="1",
                # A confirm missing for 0.2 s is logged: the sign an event went out.
                COURIER_PUBLISH_TIMEOUT="0.2",
            )
        ).start()
        ids = await stage.publish_many(url, 8, "slow-confirm")
        await wait_until(lambda: len(stage.inconvo.requests) >= 8, 30, "every upload under way")
        proxy.stall()  # the uploads end and their events go out; no confirm comes back
        await first.wait_output(SLOW_CONFIRM, count=8, timeout=30)  # all eight events are out
        started = time.monotonic()
        assert await first.signal(signal.SIGTERM, timeout=60) == 0
        took = time.monotonic() - started
    finally:
        await proxy.close()
    await stage.collector.wait_for_ids(ids, timeout=15)
    # Requeued deliveries would be back in the queue once the broker dropped the
    # process's consumer (its connection is gone): the queue must be empty then.
    await wait_until(lambda: _no_consumer(stage), 30, "the broker dropping the gone consumer")
    ready, _ = await request_counts(stage.amqp, stage.queue)
    assert ready == 0, f"{ready} deliveries were requeued behind their published events"
    counts = counts_of(stage.collector, ids)
    assert set(counts.values()) == {1}, f"repeated events: {counts}"
    assert len(stage.inconvo.uploads) == 8, "a request was uploaded twice"
    assert_within("exit at SIGTERM, confirms held", took, 1 + 5)


async def _no_consumer(stage: Stage) -> bool:
    return (await request_counts(stage.amqp, stage.queue))[1] == 0


@pytest.mark.timeout(150)  # its waits, added up, are longer than the default 60 s
async def test_a_cut_with_work_in_flight_repeats_no_event(stage: Stage) -> None:
    """Both connections cut with 32 uploads in flight: the lost deliveries' work is cancelled, so only the broker's redeliveries publish events."""
    proxy = await TcpProxy(target_port=stage.broker_port).start()
    inconvo = stage.inconvo
    # The fake drops a request whose client left during this delay (it is never
    # uploaded), so work the cut failed to cancel would show as a second upload.
    inconvo.delay = 3.0
    url = stage.files.add("/a.csv", b"1\n")
    try:
        async with stage.running(amqp_url=proxy.amqp_url, concurrency=32) as service:
            ids = await stage.publish_many(url, 32, "in-flight")
            await wait_until(lambda: len(inconvo.requests) >= 32, 30, "32 uploads under way")
            proxy.cut()
            inconvo.delay = 0.0  # for the redeliveries; the cut-off requests sleep on
            # The service noticed: every task of a lost delivery is cancelled.
            await wait_until(lambda: in_flight(service) == 0, 30, "the lost work cancelled")
            # On a loaded node the 32 arrive over more than a second: an upload that ended
            # before its work was cancelled is rightly repeated by its redelivery.
            early = len(inconvo.uploads)
            proxy.restore()
            await stage.collector.wait_for_ids(ids, timeout=30)
            # Work the cut failed to cancel would still be in flight: let it end.
            await quiesce(service)
    finally:
        await proxy.close()
    counts = counts_of(stage.collector, ids)
    duplicates = sum(counts.values()) - len(ids)
    assert duplicates == 0, f"{duplicates} events repeated by work whose delivery was lost"
    uploads = len(inconvo.uploads)
    assert 32 <= uploads <= 32 + early, (
        f"{uploads} uploads for 32 requests ({early} before the cut)"
    )


@pytest.mark.usefixtures("fast_retries")
@pytest.mark.timeout(150)  # its waits, added up, are longer than the default 60 s
async def test_a_stalled_confirm_does_not_fork_a_request(
    stage: Stage, caplog: pytest.LogCaptureFixture
) -> None:
    """A retry's confirm is held far past COURIER_PUBLISH_TIMEOUT: Courier waits for it instead of returning the delivery, so one copy runs on, not two."""
    proxy = await TcpProxy(target_port=stage.broker_port).start()
    inconvo = stage.inconvo
    inconvo.delay = 0.5
    inconvo.fail_next(503, count=3)  # the first attempt's three tries
    url = stage.files.add("/a.csv", b"1\n")
    try:
        async with stage.running(
            amqp_url=proxy.amqp_url, publish_timeout=0.5, breaker_threshold=100
        ) as service:
            ids = await stage.publish_many(url, 1, "stalled")
            await wait_until(lambda: bool(inconvo.requests), 30, "the first try")
            proxy.stall()  # the retry copy goes to its tier; its confirm is held
            await wait_until(
                lambda: "has not confirmed a publish" in caplog.text,
                30,
                "the confirm held past COURIER_PUBLISH_TIMEOUT",
            )
            proxy.resume()
            # The retry copy ends with attempts 2; a forked copy (the delivery given back
            # and redelivered at once) would have been delivered before it, so it has
            # ended too, or is in flight until quiesce returns.
            await wait_until(
                lambda: any(e["data"]["attempts"] == 2 for e in stage.collector.events),
                30,
                "the retry copy's event",
            )
            await quiesce(service)
    finally:
        await proxy.close()
    assert [e["data"]["requestId"] for e in stage.collector.events] == sorted(ids)
    [event] = stage.collector.events
    assert event["data"]["status"] == "succeeded" and event["data"]["attempts"] == 2
    assert len(inconvo.uploads) == 1, "the request ran to an end twice"


async def rolling_restarts(
    stage: Stage, *, replicas: int, rounds: int, requests: int, max_redeliveries: int
) -> dict[str, int]:
    """SIGTERM and restart each replica, ``rounds`` times over, while requests run; every
    SIGTERM finds work in flight (each restart gets its share of the requests, published
    just before it, so the work outlasts the restarts however fast the replicas run).
    Returns the events per request."""
    stage.inconvo.delay = 0.5
    url = stage.files.add("/a.csv", b"1\n")

    def replica(i: int) -> CourierProcess:
        return stage.process(
            COURIER_CONCURRENCY="8",
            COURIER_SHUTDOWN_TIMEOUT="0.3",  # short: unfinished work is handed back
            COURIER_MAX_REDELIVERIES=str(max_redeliveries),
            COURIER_EVENT_SOURCE=f"urn:courier:replica-{i}",
        )

    running = [await replica(i).start() for i in range(replicas)]
    restarts = rounds * replicas
    ids: set[str] = set()
    codes = []
    try:
        for n in range(restarts):  # rolling deploys
            i = n % replicas
            share = requests // restarts + (n < requests % restarts)
            ids |= await stage.publish_many(url, share, f"rolling-{n}")
            await _working(running[i])
            codes.append(await running[i].signal(signal.SIGTERM, timeout=30))
            running[i] = await replica(i).start()
        await stage.collector.wait_for_ids(ids, timeout=120)
    finally:
        codes += [await r.signal(signal.SIGTERM, timeout=30) for r in running]
    assert set(codes) == {0}
    counts = counts_of(stage.collector, ids)
    failed = [e["data"] for e in stage.collector.events if e["data"].get("error")]
    assert not failed, f"{len(failed)} failed, the first: {failed[0]}"
    return counts


async def _working(replica: CourierProcess) -> None:
    """Wait until ``replica`` has requests in flight (uploads under way)."""

    async def busy() -> bool:
        return await replica.metric("courier_inflight_requests") > 0

    await wait_until(busy, 30, "the replica working")


@pytest.mark.timeout(120)
async def test_a_rolling_restart_loses_nothing(stage: Stage) -> None:
    """SIGTERM + restart of each of two replicas during 150 requests: graceful give-backs are not crashes, so none is lost or fails (the soak probe below: three replicas, three rounds, the strictest setting)."""
    counts = await rolling_restarts(stage, replicas=2, rounds=1, requests=150, max_redeliveries=5)
    print(f"\nrolling restart: 150 requests, {sum(counts.values()) - 150} duplicates")


@pytest.mark.soak
@pytest.mark.timeout(300)
async def test_rolling_restarts_push_no_request_to_poison(stage: Stage) -> None:
    """SIGTERM + restart of each of three replicas, three times each, during 600 requests, with COURIER_MAX_REDELIVERIES=1: not one give-back is counted as a return, so no poison_message, none lost.

    A soak probe: one return the broker counts (the cancel race the ack gate closes,
    tests/broker/test_gate.py) would be poison_message, and whether it happens depends
    on how the broker's and the replicas' work interleave.
    """
    counts = await rolling_restarts(stage, replicas=3, rounds=3, requests=600, max_redeliveries=1)
    print(f"\nrolling restarts: 600 requests, {sum(counts.values()) - 600} duplicates")
