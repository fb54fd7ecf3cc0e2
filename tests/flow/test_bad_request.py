"""One request that Inconvo always answers 500 is that request's problem, not an outage."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import pytest
from aio_pika.abc import AbstractRobustConnection

from service.config import Settings
from testbed.fakes import FakeInconvo
from testbed.support import (
    EventCollector,
    FileServer,
    Names,
    drain,
    inconvo_request,
    publish,
)
from tests.conftest import running

GOOD = 30


@pytest.mark.timeout(120)
async def test_a_request_that_always_fails_holds_up_no_one(
    make_settings: Callable[..., Settings],
    amqp: AbstractRobustConnection,
    names: Names,
    files: FileServer,
    inconvo: FakeInconvo,
    collector: EventCollector,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Default breaker settings: a lone bad request fails again and again (more than the old
    breaker's threshold), then 30 good requests arrive at 2/s. The breaker never opens, so
    none of them is held or waits a cooldown: each is uploaded once, on its first attempt;
    the bad one spends its attempts and is dead-lettered."""
    caplog.set_level(logging.INFO, logger="service")
    bad = inconvo.fail_when(lambda r: r.match_info.get("userIdentifier") == "bad", 500)
    url = files.add("/a.csv", b"1\n")
    settings = make_settings()
    assert (settings.breaker_threshold, settings.breaker_min_requests) == (5, 3)
    async with running(settings):
        await publish(amqp, names.queue, inconvo_request(url, "bad-1", userIdentifier="bad"))
        async with asyncio.timeout(60):
            while bad.calls < 2 * settings.breaker_threshold:  # it would have opened by now
                await asyncio.sleep(0.05)
        good = [f"good-{i}" for i in range(GOOD)]
        for rid in good:
            await publish(amqp, names.queue, inconvo_request(url, rid))
            await asyncio.sleep(0.5)  # the arrival pattern: 2 requests a second
        await collector.wait_for_ids({*good, "bad-1"}, timeout=90)
    by_id = {e["data"]["requestId"]: e["data"] for e in collector.events}
    assert all(by_id[rid]["status"] == "succeeded" for rid in good)
    assert {by_id[rid]["attempts"] for rid in good} == {1}
    uploads = [r for r in inconvo.requests if "/datasets/user/user_123" in r.path]
    assert len(uploads) == GOOD, "each good request was sent once"
    opened = [r for r in caplog.records if "circuit breaker open" in r.getMessage()]
    assert opened == [], "the breaker opened on one request's failures"
    failed = by_id["bad-1"]
    assert failed["status"] == "failed" and failed["attempts"] == settings.max_attempts
    assert failed["error"]["code"] == "destination_unavailable"
    assert failed["error"]["httpStatus"] == 500
    dead = [m async for m in drain(amqp, names.dead_queue)]
    assert [(m.headers or {}).get("x-courier-attempts") for m in dead] == [settings.max_attempts]
