"""Flow control end to end: a sick dependency holds work;
it never burns, repeats or stalls it."""

from __future__ import annotations

import signal
import time
from collections import Counter
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.runtime import Service
from testbed.stage import Stage
from testbed.support import inconvo_request, publish_requests, wait_until
from testbed.timing import assert_within


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


class HoldCounter:
    """Counts the requests held for one destination: every rise of its
    ``courier_held_requests`` (a gauge only shows how many are held right now)."""

    def __init__(self, service: Service, destination: str) -> None:
        self.count = 0
        child = service.metrics.held.labels(destination)
        rise = child.inc

        def counted(amount: float = 1) -> None:
            self.count += 1
            rise(amount)

        child.inc = counted  # type: ignore[method-assign]


def probes_within(outage: float, cooldown: float) -> int:
    """How many half-open probes a breaker makes during ``outage`` seconds (cooldown doubling)."""
    probes, elapsed = 0, cooldown
    while elapsed <= outage:
        probes += 1
        cooldown *= 2
        elapsed += cooldown
    return probes


@pytest.mark.timeout(180)
async def test_an_outage_holds_work_without_spending_attempts(stage: Stage) -> None:
    """Inconvo down under 100 queued requests (tiers 1s,2s, 3 attempts) until each was held three times on average: none dead-lettered, all succeed after the heal; Inconvo is called at most by the work in flight, the tries before the breaker opened and one probe per cooldown; Mindset's requests all end during the outage, none of them held; /metrics shows the open breaker and the held requests."""
    concurrency, cooldown, threshold, attempts = 16, 2.0, 5, 3
    inconvo, collector = stage.inconvo, stage.collector
    csv = stage.files.add("/a.csv", b"1\n")
    text = stage.files.add("/note.txt", b"hello", content_type="text/plain")
    async with stage.running(
        max_attempts=attempts,
        concurrency=concurrency,
        breaker_cooldown=cooldown,
        breaker_threshold=threshold,
        hold_max=600,
    ) as service:
        holds = {name: HoldCounter(service, name) for name in ("inconvo", "mindset")}
        # The outage lasts until the test heals it, so what follows is never a race with
        # its end: no assertion depends on how long the machine takes.
        inconvo.outage(503)
        down_since = time.monotonic()
        ids = await stage.publish_many(csv, 100, "outage")
        await wait_until(
            lambda: samples(service, "courier_breaker_state").get("inconvo") == 2,
            30,
            "Inconvo's breaker open",
        )
        during = [mindset_text(text, f"during-{i}") for i in range(20)]
        await publish_requests(stage.amqp, stage.queue, during)
        await collector.wait_for_ids({b["id"] for b in during}, timeout=60)
        await wait_until(
            lambda: samples(service, "courier_held_requests").get("inconvo", 0) > 0,
            30,
            "held requests shown",
        )
        # Held three times each on average: had a hold spent an attempt, some request
        # would have failed by now.
        await wait_until(
            lambda: holds["inconvo"].count >= attempts * 100, 120, "each request held 3 times"
        )
        assert not [e for e in collector.events if e["data"]["requestId"] in ids]
        inconvo.heal()
        outage = time.monotonic() - down_since
        await collector.wait_for_ids(ids, timeout=120)
        assert samples(service, "courier_breaker_state")["inconvo"] == 0
    assert holds["mindset"].count == 0, "Mindset's requests were held for Inconvo's outage"
    mindset_events = [
        e["data"] for e in collector.events if e["data"]["requestId"] in {b["id"] for b in during}
    ]
    assert {d["status"] for d in mindset_events} == {"succeeded"}
    outcomes = [e["data"] for e in collector.events if e["data"]["requestId"] in ids]
    assert Counter(d["status"] for d in outcomes) == {"succeeded": 100}
    assert max(d["attempts"] for d in outcomes) <= attempts
    assert await stage.dead_letters() == []
    # In flight when the breaker opened, the in-process re-tries of the first failures
    # before the last of `threshold` opened it, then the probes (flow_sim.outage agrees).
    bound = concurrency + threshold + probes_within(outage, cooldown)
    assert inconvo.outage_calls <= bound, f"{inconvo.outage_calls} calls during the outage"
    print(
        f"\noutage {outage:.1f} s, 100 requests held {holds['inconvo'].count} times: "
        f"{inconvo.outage_calls} calls during it (bound {bound}), all succeeded"
    )


@pytest.mark.timeout(120)  # its waits, added up, are longer than the default 60 s
async def test_an_outage_longer_than_the_hold_limit_fails_counting_real_tries(
    stage: Stage,
) -> None:
    """Past COURIER_HOLD_MAX a held request fails destination_unavailable, its message says how long it was held, and data.attempts counts only real tries."""
    url = stage.files.add("/a.csv", b"1\n")
    inconvo = stage.inconvo
    inconvo.outage(503)
    openers = {f"opener-{i}" for i in range(3)}  # an outage: several requests fail
    held = {f"held-{i}" for i in range(5)}
    async with stage.running(
        max_attempts=3, breaker_threshold=2, breaker_cooldown=60, hold_max=4, concurrency=4
    ):
        for rid in sorted(openers):
            await stage.publish(inconvo_request(url, rid, userIdentifier="opener"))
        await wait_until(lambda: inconvo.outage_calls >= 3, 30, "three requests' failures")
        for rid in sorted(held):
            await stage.publish(inconvo_request(url, rid, userIdentifier="held"))
        await stage.collector.wait_for_ids(openers | held, timeout=30)
    by_id = {e["data"]["requestId"]: e["data"] for e in stage.collector.events}
    for rid in openers | held:
        error = by_id[rid]["error"]
        assert error["code"] == "destination_unavailable" and error["retryable"]
        assert "held for" in error["message"] and "COURIER_HOLD_MAX" in error["message"]
    assert {by_id[rid]["attempts"] for rid in openers} == {1}
    assert {by_id[rid]["attempts"] for rid in held} == {0}
    assert not [r for r in inconvo.requests if "/held" in r.path], "held requests were sent"
    assert len(await stage.dead_letters()) == 8


RATE = 40  # requests a second the fake allows


async def rate_limited_run(stage: Stage, prefix: str, **env: str) -> tuple[float, int]:
    """300 requests against Inconvo enforcing RATE/s: (seconds they took, 429 answers).

    `courier run` is a process of its own, as in production: the fake's clock (in this
    process) is not held up by Courier's own work, so the window it keeps is fair.
    """
    url = stage.files.add("/a.csv", b"1\n")
    stage.inconvo.rate_limit(RATE)
    courier = await stage.process(COURIER_CONCURRENCY="32", **env).start()
    try:
        started = time.monotonic()
        ids = await stage.publish_many(url, 300, prefix)
        await stage.collector.wait_for_ids(ids, timeout=120)
        seconds = time.monotonic() - started
    finally:
        assert await courier.signal(signal.SIGTERM) == 0
    assert all(e["data"]["status"] == "succeeded" for e in stage.collector.events)
    return seconds, stage.inconvo.throttled


@pytest.mark.timing
@pytest.mark.timeout(180)
async def test_an_adaptive_rate_finds_an_unconfigured_limit(stage: Stage) -> None:
    """With no rate configured, against 40 requests/s: under 20% of requests draw a 429 and throughput is at least 70% of the limit."""
    seconds, throttled = await rate_limited_run(stage, "adaptive")
    print(
        f"\nadaptive: {300 / seconds:.1f} req/s against {RATE}/s, {throttled} 429s for 300 requests"
    )
    assert throttled < 0.2 * 300
    assert_within(f"300 requests at 70% of {RATE}/s", seconds, 300 / (0.7 * RATE))


@pytest.mark.timing
@pytest.mark.timeout(180)
async def test_a_configured_rate_keeps_under_the_limit(stage: Stage) -> None:
    """With COURIER_INCONVO_RATE_LIMIT=40 against 40 requests/s: at most 1% 429s and at least 80% of the limit."""
    seconds, throttled = await rate_limited_run(
        stage, "configured", COURIER_INCONVO_RATE_LIMIT=str(RATE)
    )
    print(f"\nconfigured {RATE}/s: {300 / seconds:.1f} req/s, {throttled} 429s for 300 requests")
    assert throttled <= 3
    assert_within(f"300 requests at 80% of {RATE}/s", seconds, 300 / (0.8 * RATE))


@pytest.mark.timeout(120)  # its waits, added up, are longer than the default 60 s
async def test_trickling_sources_time_out_and_do_not_starve_the_rest(stage: Stage) -> None:
    """16 sources that trickle a byte now and then, concurrency 8, COURIER_SOURCE_TIMEOUT 1 s: the requests behind them finish, and the trickling ones end source_unavailable."""
    files, collector = stage.files, stage.collector
    slow = [files.add(f"/slow-{i}.csv", b"x" * 1000, trickle=0.3) for i in range(16)]
    fast = files.add("/fast.csv", b"1\n")
    async with stage.running(concurrency=8, source_timeout=1, max_attempts=2):
        await publish_requests(
            stage.amqp, stage.queue, [inconvo_request(u, f"slow-{i}") for i, u in enumerate(slow)]
        )
        normal = await stage.publish_many(fast, 20, "normal")
        await collector.wait_for_ids(normal, timeout=30)
        await collector.wait_for_ids({f"slow-{i}" for i in range(16)}, timeout=60)
    by_id = {e["data"]["requestId"]: e["data"] for e in collector.events}
    assert {by_id[rid]["status"] for rid in normal} == {"succeeded"}
    for i in range(16):
        data = by_id[f"slow-{i}"]
        assert data["error"]["code"] == "source_unavailable", data
        assert "COURIER_SOURCE_TIMEOUT" in data["error"]["message"]
    files.stop_trickles()
