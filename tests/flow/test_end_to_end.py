"""Flow control end to end (issue 12, CONTRACT section 7): a sick dependency holds work;
it never burns, repeats or stalls it."""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from aio_pika.abc import AbstractRobustConnection
from prometheus_client.parser import text_string_to_metric_families

from service.config import Settings
from service.runtime import Service
from testbed.fakes import FakeInconvo, FakeMindset
from testbed.support import (
    CourierProcess,
    EventCollector,
    FileServer,
    Names,
    drain,
    inconvo_request,
    publish_many,
    publish_requests,
)
from tests.conftest import running


def samples(service: Service, name: str) -> dict[str, float]:
    """The values of metric ``name`` by destination label, from the service's own scrape."""
    text = service.metrics.exposition().decode()
    return {
        sample.labels.get("destination", ""): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    }


def mindset_text(url: str, rid: str) -> dict[str, Any]:
    """A Mindset request inlining a text file."""
    return {
        "id": rid,
        "source": {"url": url},
        "destination": {"type": "mindset", "appUid": "app-1", "contextUid": "ctx-1"},
    }


async def timed_batch(
    amqp: AbstractRobustConnection, queue: str, collector: EventCollector, bodies: list[Any]
) -> float:
    """Publish ``bodies`` and return the seconds until each has its event."""
    started = time.monotonic()
    await publish_requests(amqp, queue, bodies)
    await collector.wait_for_ids({b["id"] for b in bodies}, timeout=60)
    return time.monotonic() - started


def probes_within(outage: float, cooldown: float) -> int:
    """How many half-open probes a breaker makes during ``outage`` seconds (cooldown doubling)."""
    probes, elapsed = 0, cooldown
    while elapsed <= outage:
        probes += 1
        cooldown *= 2
        elapsed += cooldown
    return probes


@pytest.mark.timeout(180)
async def test_an_outage_holds_work_without_spending_attempts(
    make_settings: Callable[..., Settings],
    amqp: AbstractRobustConnection,
    names: Names,
    files: FileServer,
    inconvo: FakeInconvo,
    mindset: FakeMindset,
    collector: EventCollector,
) -> None:
    """Inconvo down for 30 s under 100 queued requests (tiers 1s,2s, 3 attempts): none dead-lettered, all succeed after the heal; Inconvo is called at most by the work in flight plus one probe per cooldown; Mindset's requests go as fast as without the outage; /metrics shows the open breaker and the held requests."""
    outage, cooldown, concurrency = 30.0, 2.0, 16
    settings = make_settings(
        max_attempts=3, concurrency=concurrency, breaker_cooldown=cooldown, hold_max=600
    )
    csv = files.add("/a.csv", b"1\n")
    text = files.add("/note.txt", b"hello", content_type="text/plain")
    async with running(settings) as service:
        baseline = await timed_batch(
            amqp, names.queue, collector, [mindset_text(text, f"before-{i}") for i in range(20)]
        )
        inconvo.outage(503, seconds=outage)
        ids = await publish_many(amqp, names.queue, csv, 100, "outage")
        async with asyncio.timeout(15):
            while samples(service, "courier_breaker_state").get("inconvo") != 2:
                await asyncio.sleep(0.1)
        during = await timed_batch(
            amqp, names.queue, collector, [mindset_text(text, f"during-{i}") for i in range(20)]
        )
        held = samples(service, "courier_held_requests")
        assert held.get("inconvo", 0) > 0, held
        assert inconvo.down, "the outage ended before the test could look at it"
        await collector.wait_for_ids(ids, timeout=outage + 60)
        assert samples(service, "courier_breaker_state")["inconvo"] == 0
    outcomes = [e["data"] for e in collector.events if e["data"]["requestId"] in ids]
    assert Counter(d["status"] for d in outcomes) == {"succeeded": 100}
    assert max(d["attempts"] for d in outcomes) <= 3
    assert [m async for m in drain(amqp, names.dead_queue)] == []
    bound = concurrency + probes_within(outage, cooldown)
    assert inconvo.outage_calls <= bound, f"{inconvo.outage_calls} calls during the outage"
    # Held Inconvo requests share the queue with these (held, tiered, back again), so the
    # batch pays for their churn: 2.6 s against 0.6 s once on a loaded CI node. What this
    # guards against is Mindset waiting for Inconvo's 30 s outage.
    assert during <= max(2 * baseline, baseline + 3.0), f"{during:.1f}s against {baseline:.1f}s"
    print(
        f"\noutage 30 s, 100 requests: {inconvo.outage_calls} calls during it (bound {bound}), "
        f"all succeeded; Mindset batch {during:.2f}s during vs {baseline:.2f}s before"
    )


async def test_an_outage_longer_than_the_hold_limit_fails_counting_real_tries(
    make_settings: Callable[..., Settings],
    amqp: AbstractRobustConnection,
    names: Names,
    files: FileServer,
    inconvo: FakeInconvo,
    collector: EventCollector,
) -> None:
    """Past COURIER_HOLD_MAX a held request fails destination_unavailable, its message says how long it was held, and data.attempts counts only real tries."""
    settings = make_settings(
        max_attempts=3, breaker_threshold=2, breaker_cooldown=60, hold_max=4, concurrency=4
    )
    url = files.add("/a.csv", b"1\n")
    inconvo.outage(503)
    async with running(settings):
        openers = await publish_many(amqp, names.queue, url, 1, "opener")
        async with asyncio.timeout(10):
            while inconvo.outage_calls < 2:
                await asyncio.sleep(0.05)
        held = await publish_many(amqp, names.queue, url, 5, "held")
        await collector.wait_for_ids(openers | held, timeout=30)
    by_id = {e["data"]["requestId"]: e["data"] for e in collector.events}
    for rid in openers | held:
        error = by_id[rid]["error"]
        assert error["code"] == "destination_unavailable" and error["retryable"]
        assert "held for" in error["message"] and "COURIER_HOLD_MAX" in error["message"]
    assert [by_id[rid]["attempts"] for rid in sorted(openers)] == [1]
    assert {by_id[rid]["attempts"] for rid in held} == {0}
    assert inconvo.outage_calls <= 3, "held requests were sent"
    dead = [m async for m in drain(amqp, names.dead_queue)]
    assert len(dead) == 6


async def rate_limited_run(
    env: dict[str, str],
    amqp: AbstractRobustConnection,
    names: Names,
    url: str,
    inconvo: FakeInconvo,
    collector: EventCollector,
    prefix: str,
) -> tuple[float, int]:
    """300 requests against Inconvo enforcing 20/s: (requests per second, 429 answers).

    `courier run` is a process of its own, as in production: the fake's clock (in this
    process) is not held up by Courier's own work, so the window it keeps is fair.
    """
    inconvo.rate_limit(20)
    courier = await CourierProcess(env).start()
    try:
        started = time.monotonic()
        ids = await publish_many(amqp, names.queue, url, 300, prefix)
        await collector.wait_for_ids(ids, timeout=120)
        rate = 300 / (time.monotonic() - started)
    finally:
        assert await courier.signal(signal.SIGTERM) == 0
    assert all(e["data"]["status"] == "succeeded" for e in collector.events)
    return rate, inconvo.throttled


@pytest.mark.timing
@pytest.mark.timeout(180)
async def test_an_adaptive_rate_finds_an_unconfigured_limit(
    process_env: Callable[..., dict[str, str]],
    amqp: AbstractRobustConnection,
    names: Names,
    files: FileServer,
    inconvo: FakeInconvo,
    collector: EventCollector,
) -> None:
    """With no rate configured, against 20 requests/s: under 20% of requests draw a 429 and throughput is at least 70% of the limit."""
    url = files.add("/a.csv", b"1\n")
    env = process_env(COURIER_CONCURRENCY="32")
    rate, throttled = await rate_limited_run(env, amqp, names, url, inconvo, collector, "adaptive")
    print(f"\nadaptive: {rate:.1f} req/s against 20/s, {throttled} 429s for 300 requests")
    assert throttled < 0.2 * 300
    assert rate >= 0.7 * 20


@pytest.mark.timing
@pytest.mark.timeout(180)
async def test_a_configured_rate_keeps_under_the_limit(
    process_env: Callable[..., dict[str, str]],
    amqp: AbstractRobustConnection,
    names: Names,
    files: FileServer,
    inconvo: FakeInconvo,
    collector: EventCollector,
) -> None:
    """With COURIER_INCONVO_RATE_LIMIT=20 against 20 requests/s: at most 1% 429s and at least 80% of the limit."""
    url = files.add("/a.csv", b"1\n")
    env = process_env(COURIER_CONCURRENCY="32", COURIER_INCONVO_RATE_LIMIT="20")
    rate, throttled = await rate_limited_run(
        env, amqp, names, url, inconvo, collector, "configured"
    )
    print(f"\nconfigured 20/s: {rate:.1f} req/s, {throttled} 429s for 300 requests")
    assert throttled <= 3
    assert rate >= 0.8 * 20


async def test_trickling_sources_time_out_and_do_not_starve_the_rest(
    make_settings: Callable[..., Settings],
    amqp: AbstractRobustConnection,
    names: Names,
    files: FileServer,
    inconvo: FakeInconvo,
    collector: EventCollector,
) -> None:
    """16 sources that trickle a byte now and then, concurrency 8, COURIER_SOURCE_TIMEOUT 1 s: the requests behind them finish, and the trickling ones end source_unavailable."""
    settings = make_settings(concurrency=8, source_timeout=1, max_attempts=2)
    slow = [files.add(f"/slow-{i}.csv", b"x" * 1000, trickle=0.3) for i in range(16)]
    fast = files.add("/fast.csv", b"1\n")
    async with running(settings):
        await publish_requests(
            amqp, names.queue, [inconvo_request(u, f"slow-{i}") for i, u in enumerate(slow)]
        )
        normal = await publish_many(amqp, names.queue, fast, 20, "normal")
        await collector.wait_for_ids(normal, timeout=30)
        await collector.wait_for_ids({f"slow-{i}" for i in range(16)}, timeout=60)
    by_id = {e["data"]["requestId"]: e["data"] for e in collector.events}
    assert {by_id[rid]["status"] for rid in normal} == {"succeeded"}
    for i in range(16):
        data = by_id[f"slow-{i}"]
        assert data["error"]["code"] == "source_unavailable", data
        assert "COURIER_SOURCE_TIMEOUT" in data["error"]["message"]
    files.stop_trickles()
