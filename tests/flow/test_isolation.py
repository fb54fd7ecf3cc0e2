"""A failing request is not an outage: the breaker opens only on failures of several requests.

Pure logic on passed-in or virtual time: the breaker's table, then a destination's flow
driven through in-process and delayed retries on a virtual clock.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest

from service.flow import Breaker, BreakerState, Deferred, DestinationFlow, LoopClock, RateControl
from testbed.virtual_time import run_virtual

THRESHOLD, MIN_REQUESTS, COOLDOWN = 5, 3, 10.0


@dataclass(frozen=True)
class Case:
    name: str
    calls: str  # one letter a call: its request; "." a success, e.g. "AAA.B"
    opens_at: int | None  # the call (1-based) whose failure opened it; None: it stays closed
    min_requests: int = MIN_REQUESTS


CASES = [
    Case("one request's in-process retries (3 tries)", "AAA", None),
    Case("one request's 5 attempts of 3 tries", "A" * 15, None),
    Case("two requests, failing again and again", "AB" * 10, None),
    Case("three requests failing at once: an outage", "ABCAB", 5),
    Case("three requests, one failure short of the threshold", "ABCA", None),
    Case("the threshold reached by one, then two more requests", "AAAAABC", 7),
    Case("a success between resets the count and the requests", "AABB.CABCA", 10),
    Case("a success between, and not enough after it", "AABB.CAB", None),
    Case("with COURIER_BREAKER_MIN_REQUESTS=1, one request opens it", "AAAAA", 5, 1),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_the_breaker_opens_only_on_several_requests(case: Case) -> None:
    """Consecutive transient failures open the breaker only when they came from enough
    different requests; a success between them starts the count again."""
    breaker = Breaker(THRESHOLD, COOLDOWN, min_requests=case.min_requests)
    opened_at = None
    for i, call in enumerate(case.calls, 1):
        generation, _ = breaker.enter(float(i))
        if call == ".":
            breaker.succeeded(generation)
        elif breaker.failed(float(i), generation, call):
            opened_at = i
            break
    assert opened_at == case.opens_at
    expected = BreakerState.OPEN if case.opens_at else BreakerState.CLOSED
    assert breaker.state is expected


def _open(breaker: Breaker) -> float:
    """Open ``breaker`` with an outage of three requests; the time its cooldown ends."""
    for i, request in enumerate("XYZXY"):
        generation, _ = breaker.enter(float(i))
        breaker.failed(float(i), generation, request)
    assert breaker.state is BreakerState.OPEN
    return breaker.open_until


def test_a_request_whose_probe_failed_pays_for_its_next_probe() -> None:
    """A probe is free, unless the request that carries it already failed as the last probe."""
    breaker = Breaker(THRESHOLD, COOLDOWN, min_requests=MIN_REQUESTS)
    now = _open(breaker)
    assert not breaker.charges("A"), "the first probe of any request is free"
    generation, probe = breaker.enter(now)
    assert probe
    breaker.failed(now, generation, "A")
    assert breaker.cooldown == 2 * COOLDOWN
    assert breaker.charges("A") and not breaker.charges("B") and not breaker.charges(None)
    now = breaker.open_until
    generation, _ = breaker.enter(now)
    breaker.failed(now, generation, "B")
    assert breaker.charges("B") and not breaker.charges("A"), "only the last failed probe pays"
    now = breaker.open_until
    generation, _ = breaker.enter(now)
    breaker.succeeded(generation)
    assert breaker.state is BreakerState.CLOSED
    assert not breaker.charges("B"), "a success clears the charge"


def _flow(min_requests: int = MIN_REQUESTS) -> DestinationFlow:
    return DestinationFlow(
        "inconvo",
        breaker=Breaker(THRESHOLD, COOLDOWN, min_requests=min_requests),
        rate=RateControl(),
        clock=LoopClock(),
    )


async def _attempt(flow: DestinationFlow, request: str, tries: int = 3) -> str:
    """One attempt of ``request`` against a destination that answers it 500: its in-process
    tries, 0.5 s apart; "held" when the flow would not let a try go."""
    for _ in range(tries):
        try:
            ticket = await flow.admit(request)
        except Deferred:
            return "held"
        ticket.record(500)
        await asyncio.sleep(0.5)
    return "failed"


def test_one_request_s_in_process_and_delayed_retries_never_open_it() -> None:
    """A request that always gets 500, retried in-process and through the delay tiers
    (10 s, 1 m, 5 m, 30 m), is never held: the breaker stays closed for everyone."""

    async def scenario() -> list[str]:
        flow = _flow()
        results = []
        for delay in (10, 60, 300, 1800, 0):
            results.append(await _attempt(flow, "bad"))
            await asyncio.sleep(delay)
        assert flow.state is BreakerState.CLOSED
        good = await flow.admit("good")
        good.record(200)
        return results

    assert run_virtual(scenario()) == ["failed"] * 5


def test_three_requests_failing_at_once_still_open_it() -> None:
    """An outage: three requests failing together open the breaker, and the next request
    is held without a call."""

    async def scenario() -> tuple[list[str], str]:
        flow = _flow()
        results = await asyncio.gather(*(_attempt(flow, r) for r in "ABC"))
        assert flow.state is BreakerState.OPEN
        return list(results), await _attempt(flow, "D", tries=1)

    results, late = run_virtual(scenario())
    assert "held" in results, "the outage's own requests are held once it opens"
    assert late == "held"


def test_the_old_rule_opened_on_one_request() -> None:
    """With one request enough (the rule before), the same lone bad request opens the
    breaker within its second attempt: the case the minimum exists for."""

    async def scenario() -> list[str]:
        flow = _flow(min_requests=1)
        results = []
        for delay in (10, 60):
            results.append(await _attempt(flow, "bad"))
            await asyncio.sleep(delay)
        return results

    assert run_virtual(scenario()) == ["failed", "held"]


def test_a_charged_probe_counts_as_a_real_call() -> None:
    """The ticket of a repeat probe says so: the middleware counts it as a real call, so a
    failing request cannot be the free probe for ever."""

    async def scenario() -> tuple[bool, bool, bool]:
        flow = _flow()
        await asyncio.gather(*(_attempt(flow, r, tries=2) for r in "ABC"))
        assert flow.state is BreakerState.OPEN
        await asyncio.sleep(COOLDOWN)
        first = await flow.admit("bad")
        first.record(500)
        await asyncio.sleep(2 * COOLDOWN)
        again = await flow.admit("bad")
        again.record(500)
        await asyncio.sleep(4 * COOLDOWN)
        other = await flow.admit("other")
        other.record(200)
        return first.charged, again.charged, other.charged

    assert run_virtual(scenario()) == (False, True, False)
