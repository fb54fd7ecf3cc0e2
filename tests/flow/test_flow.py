"""Flow control: the breaker, rate control, admission and the aiohttp middleware.

Pure logic runs on passed-in times or a fake clock; concurrency on a
virtual-time event loop. Nothing here sleeps for real except the loopback
timeout case, and no assertion depends on real timing.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
from pydantic import SecretStr

from service.config import load_settings
from service.contracts import UploadRequest
from service.destinations.inconvo import Inconvo
from service.errors import CourierError, ErrorCode
from service.flow import (
    Breaker,
    BreakerState,
    DeferReason,
    Deferred,
    DestinationFlow,
    FlowControl,
    RateControl,
    flow_middleware,
    is_transient,
)
from service.flow.breaker import PROBE_HOLD
from service.flow.rate import MARGIN
from service.messages import parse_request
from service.sources.guard import AddressPolicy, guarded_connector, parse_allowed_hosts
from service.sources.http import HttpSource
from testbed.fakes import FakeInconvo
from testbed.support import FileServer, closed_port
from testbed.virtual_time import run_virtual
from tests.conftest import INCONVO_KEY

KEY = "test-inconvo-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


class FakeClock:
    """Time that moves only when told to, or by exactly what a caller sleeps."""

    def __init__(self, start: float = 1000.0) -> None:
        self.t = start
        self.slept: list[float] = []

    def now(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.t += seconds

    def advance(self, seconds: float) -> None:
        self.t += seconds


class Recorder:
    """An observer that keeps every call."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def breaker_changed(self, destination: str, state: BreakerState) -> None:
        self.events.append(("breaker", destination, state))

    def rate_changed(self, destination: str, rate: float | None) -> None:
        self.events.append(("rate", destination, rate))

    def rate_limited(self, destination: str) -> None:
        self.events.append(("limited", destination))

    def states(self) -> list[BreakerState]:
        return [event[2] for event in self.events if event[0] == "breaker"]


def state(subject: Breaker | DestinationFlow) -> BreakerState:
    """The state, read through a call (mypy would narrow the attribute across calls)."""
    return subject.state


def make_flow(
    *,
    threshold: int = 5,
    cooldown: float = 10.0,
    rate: float | None = None,
    clock: FakeClock | None = None,
    observer: Recorder | None = None,
    max_wait: float = 5.0,
) -> DestinationFlow:
    return DestinationFlow(
        "inconvo",
        breaker=Breaker(threshold, cooldown),
        rate=RateControl(rate),
        observer=observer,
        clock=clock,
        max_wait=max_wait,
    )


# -- the breaker, pure ---------------------------------------------------------------


def test_breaker_opens_after_threshold_consecutive_failures() -> None:
    """Only consecutive transient failures count; the threshold-th opens it for the cooldown."""
    breaker = Breaker(3, 10.0)
    gen = breaker.generation
    assert not breaker.failed(0.0, gen)
    assert not breaker.failed(0.0, gen)
    assert not breaker.succeeded(gen)  # resets the count
    assert not breaker.failed(1.0, gen)
    assert not breaker.failed(1.0, gen)
    assert state(breaker) is BreakerState.CLOSED
    assert breaker.failed(2.0, gen)
    assert state(breaker) is BreakerState.OPEN
    assert breaker.blocked_for(2.0) == (10.0, False)
    assert breaker.blocked_for(11.5) == (0.5, False)


def test_open_breaker_lets_exactly_one_probe_after_the_cooldown() -> None:
    """After the cooldown the first caller becomes the probe; the others wait for it."""
    breaker = Breaker(1, 10.0)
    breaker.failed(0.0, breaker.generation)
    assert breaker.blocked_for(10.0) is None
    generation, probe = breaker.enter(10.0)
    assert probe
    assert state(breaker) is BreakerState.HALF_OPEN
    assert breaker.blocked_for(10.0) == (PROBE_HOLD, True)
    with pytest.raises(RuntimeError):
        breaker.enter(10.0)
    assert breaker.succeeded(generation)
    assert state(breaker) is BreakerState.CLOSED
    assert breaker.enter(11.0) == (breaker.generation, False)


def test_failing_probes_double_the_cooldown_up_to_five_minutes() -> None:
    """Each failed probe re-opens with twice the cooldown (at most 300 s); a success resets it."""
    breaker = Breaker(1, 10.0)
    now = 0.0
    breaker.failed(now, breaker.generation)
    cooldowns = []
    for _ in range(7):
        now = breaker.open_until
        generation, probe = breaker.enter(now)
        assert probe
        assert breaker.failed(now, generation)
        cooldowns.append(breaker.open_until - now)
    assert cooldowns == [20.0, 40.0, 80.0, 160.0, 300.0, 300.0, 300.0]
    now = breaker.open_until
    generation, _ = breaker.enter(now)
    breaker.succeeded(generation)
    breaker.failed(now, breaker.generation)
    assert breaker.open_until - now == 10.0


def test_outcomes_of_calls_from_before_a_state_change_are_ignored() -> None:
    """A straggler admitted while closed cannot close an open breaker or fail a probe."""
    breaker = Breaker(1, 10.0)
    straggler = breaker.generation
    breaker.failed(0.0, breaker.generation)
    assert not breaker.succeeded(straggler)
    assert state(breaker) is BreakerState.OPEN
    generation, _ = breaker.enter(10.0)
    assert not breaker.failed(10.0, straggler)
    assert state(breaker) is BreakerState.HALF_OPEN
    assert breaker.succeeded(generation)


def test_an_abandoned_probe_frees_its_slot() -> None:
    """A released probe, or one silent past the probe timeout, lets the next caller probe."""
    breaker = Breaker(1, 10.0, probe_timeout=60.0)
    breaker.failed(0.0, breaker.generation)
    first, _ = breaker.enter(10.0)
    breaker.released(first)
    assert breaker.blocked_for(10.0) is None
    second, probe = breaker.enter(10.0)
    assert probe
    assert breaker.blocked_for(69.0) == (PROBE_HOLD, True)
    assert breaker.blocked_for(70.0) is None
    third, _ = breaker.enter(70.0)
    assert not breaker.failed(71.0, second)  # the timed-out probe's late answer
    assert state(breaker) is BreakerState.HALF_OPEN
    assert breaker.failed(71.0, third)


def test_transient_outcomes() -> None:
    """No answer, 408 and 5xx count against the breaker; 4xx (429 included) and 2xx do not."""
    assert [is_transient(s) for s in (None, 408, 500, 503, 599)] == [True] * 5
    assert [is_transient(s) for s in (200, 201, 400, 404, 409, 425, 429)] == [False] * 7


# -- rate control, pure --------------------------------------------------------------


def test_token_bucket_spaces_calls_a_little_under_the_rate() -> None:
    """A configured rate gives one slot every (1 + MARGIN) / rate seconds, no burst after idling."""
    rate = RateControl(10.0)
    gap = (1 + MARGIN) / 10
    slots = []
    for _ in range(4):
        slot = rate.next_slot(0.0)
        rate.take(slot)
        slots.append(slot)
    assert slots == pytest.approx([0.0, gap, 2 * gap, 3 * gap])
    assert rate.next_slot(100.0) == 100.0
    rate.take(100.0)
    assert rate.next_slot(100.0) == pytest.approx(100.0 + gap)


def test_pause_stops_every_call_and_voids_reservations() -> None:
    """A pause moves the next slot to its end; a shorter one changes nothing; it is capped."""
    rate = RateControl(1.0, max_pause=60.0)
    rate.take(0.0)
    rate.take(rate.next_slot(0.0))
    assert rate.next_slot(0.0) == pytest.approx(2 * (1 + MARGIN))
    epoch = rate.epoch
    assert rate.pause(0.0, 0.5)
    assert rate.epoch == epoch + 1
    assert rate.next_slot(0.0) == 0.5
    assert not rate.pause(0.1, 0.2)
    assert rate.pause(0.0, 3600.0)
    assert rate.next_slot(0.0) == 60.0


def test_adaptive_rate_drops_below_the_rate_that_drew_a_429_once_per_round() -> None:
    """Unlimited at first; a 429 sets 0.7 x the recent send rate; 429s of the same round do not."""
    rate = RateControl()
    assert rate.rate is None
    for i in range(10):
        rate.take(i / 10)
    assert rate.recent_rate(1.0) == pytest.approx(10.0)
    assert rate.throttled(1.0, sent_at=0.9)
    assert rate.rate == pytest.approx(0.7 * 10)
    assert rate.next_slot(1.0) == pytest.approx(1.0 + 1 / 7)
    assert not rate.throttled(1.05, sent_at=0.95)  # sent before the decrease
    assert not rate.succeeded(sent_at=0.95)
    assert rate.rate == pytest.approx(7.0)
    rate.take(2.0)
    assert rate.throttled(2.0, sent_at=2.0)
    assert rate.rate == pytest.approx(0.7 * 1.0)  # one call in the last second


def test_adaptive_rate_grows_back_and_lifts_the_limit() -> None:
    """Successes add 10% of the reference rate per second (1% near it), up to twice it: unlimited."""
    rate = RateControl()
    for i in range(20):
        rate.take(i / 20)
    rate.throttled(1.0, sent_at=0.95)
    assert rate.rate == pytest.approx(14.0)
    assert rate.succeeded(sent_at=1.0)
    assert rate.rate == pytest.approx(14.0 + 0.1 * 20 / 14)
    rate.rate = 19.0
    rate.succeeded(sent_at=1.0)
    assert rate.rate == pytest.approx(19.0 + 0.01 * 20 / 19)
    successes = 0
    while rate.rate is not None:
        rate.succeeded(sent_at=1.0)
        successes += 1
    assert 100 < successes < 1000
    assert rate.next_slot(5.0) == 5.0


def test_adaptive_rate_has_a_floor_and_configured_rates_do_not_adapt() -> None:
    """The adaptive rate never drops below 0.2/s; a configured rate ignores 429s and successes."""
    rate = RateControl()
    assert rate.throttled(100.0, sent_at=50.0)
    assert rate.rate == 0.2
    fixed = RateControl(5.0)
    assert not fixed.throttled(1.0, sent_at=0.5)
    assert not fixed.succeeded(sent_at=0.5)
    assert fixed.rate == 5.0
    with pytest.raises(ValueError, match="positive"):
        RateControl(0.0)


# -- admission and outcomes ----------------------------------------------------------


async def test_open_breaker_holds_calls_until_one_probe_closes_it() -> None:
    """Open: deferred with the time left; after the cooldown one probe; its success closes it."""
    clock, observer = FakeClock(), Recorder()
    flow = make_flow(threshold=2, clock=clock, observer=observer)
    (await flow.admit()).record(503)
    (await flow.admit()).record(None)
    assert state(flow) is BreakerState.OPEN
    clock.advance(4.0)
    with pytest.raises(Deferred) as held:
        await flow.admit()
    assert (held.value.reason, held.value.seconds) == (DeferReason.BREAKER_OPEN, 6.0)
    assert held.value.destination == "inconvo"
    with pytest.raises(Deferred):
        flow.check()
    clock.advance(6.0)
    flow.check()
    probe = await flow.admit()
    assert probe.probe
    with pytest.raises(Deferred) as held:
        await flow.admit()
    assert held.value.reason is DeferReason.PROBE_IN_FLIGHT
    probe.record(200)
    assert state(flow) is BreakerState.CLOSED
    assert not (await flow.admit()).probe
    assert observer.states() == [BreakerState.OPEN, BreakerState.HALF_OPEN, BreakerState.CLOSED]


async def test_only_transient_failures_open_the_breaker() -> None:
    """4xx answers and 429s are the API being up; 408 is a transient failure."""
    flow = make_flow(threshold=1, rate=100.0, clock=FakeClock())
    for status in (400, 404, 409, 425, 429, 201):
        (await flow.admit()).record(status)
    (await flow.admit()).record(500, transient=False)  # the caller knows better
    assert state(flow) is BreakerState.CLOSED
    (await flow.admit()).record(408)
    assert state(flow) is BreakerState.OPEN


async def test_a_released_probe_does_not_leave_the_breaker_stuck() -> None:
    """A probe cancelled without an answer is released: the next caller probes."""
    clock = FakeClock()
    flow = make_flow(threshold=1, clock=clock)
    (await flow.admit()).record(None)
    clock.advance(10.0)
    probe = await flow.admit()
    probe.release()
    probe.record(200)  # ignored: the first report counts
    assert state(flow) is BreakerState.HALF_OPEN
    second = await flow.admit()
    assert second.probe
    second.record(502)
    assert state(flow) is BreakerState.OPEN
    assert flow.breaker.open_until - clock.now() == 20.0


async def test_retry_after_pauses_and_long_waits_hold() -> None:
    """A 429's Retry-After: short waits are waited out, long ones are deferred; each counted once."""
    clock, observer = FakeClock(), Recorder()
    flow = make_flow(rate=50.0, clock=clock, observer=observer)
    (await flow.admit()).record(429, retry_after=3.0)
    await flow.admit()
    assert clock.slept == [pytest.approx(3.0)]
    clock.advance(1.0)
    (await flow.admit()).record(429, retry_after=30.0)
    with pytest.raises(Deferred) as held:
        await flow.admit()
    assert held.value.reason is DeferReason.RATE_LIMITED
    assert held.value.seconds == pytest.approx(30.0)
    with pytest.raises(Deferred):
        flow.check()
    assert observer.events.count(("limited", "inconvo")) == 2


async def test_a_503_retry_after_longer_than_the_cooldown_delays_the_probe() -> None:
    """The deferral of an open breaker lasts until both the cooldown and the pause are over."""
    clock = FakeClock()
    flow = make_flow(threshold=1, clock=clock)
    (await flow.admit()).record(503, retry_after=25.0)
    with pytest.raises(Deferred) as held:
        await flow.admit()
    assert (held.value.reason, held.value.seconds) == (DeferReason.BREAKER_OPEN, 25.0)


def test_a_retry_after_stops_every_waiting_call() -> None:
    """Calls waiting for their slot when a Retry-After arrives go only after it."""

    async def scenario() -> list[float]:
        loop = asyncio.get_running_loop()
        flow = make_flow(rate=10.0)
        admitted: list[float] = []

        async def call() -> None:
            await flow.admit()
            admitted.append(loop.time())

        first = await flow.admit()
        waiting = [asyncio.create_task(call()) for _ in range(3)]
        await asyncio.sleep(0.05)
        first.record(503, retry_after=2.0)
        await asyncio.gather(*waiting)
        return admitted

    admitted = run_virtual(scenario())
    gap = (1 + MARGIN) / 10
    assert admitted == pytest.approx([2.05, 2.05 + gap, 2.05 + 2 * gap])  # the pause began at 0.05


def test_concurrent_callers_queue_for_tokens_and_the_overflow_is_held() -> None:
    """Waiters get consecutive slots in arrival order; one whose slot is past max_wait Holds."""

    async def scenario() -> tuple[list[tuple[int, float]], list[float]]:
        loop = asyncio.get_running_loop()
        flow = make_flow(rate=10.0, max_wait=0.25)
        admitted: list[tuple[int, float]] = []
        held: list[float] = []

        async def call(index: int) -> None:
            try:
                await flow.admit()
            except Deferred as hold:
                held.append(hold.seconds)
            else:
                admitted.append((index, loop.time()))

        await asyncio.gather(*(call(i) for i in range(5)))
        return admitted, held

    admitted, held = run_virtual(scenario())
    assert [index for index, _ in admitted] == [0, 1, 2]
    gap = (1 + MARGIN) / 10
    assert [at for _, at in admitted] == pytest.approx([0.0, gap, 2 * gap])
    assert held == pytest.approx([3 * gap, 3 * gap])


def test_flow_control_from_settings() -> None:
    """One flow per destination with the configured rates; the observer hears the start values."""
    settings = load_settings(
        inconvo_rate_limit=5.0, breaker_threshold=2, breaker_cooldown=30.0, mindset_rate_limit=None
    )
    observer = Recorder()
    flows = FlowControl.from_settings(settings, observer)
    inconvo, mindset = flows.for_destination("inconvo"), flows.for_destination("mindset")
    assert (inconvo.rate, mindset.rate) == (5.0, None)
    assert inconvo.breaker.threshold == 2
    assert inconvo.breaker.base_cooldown == 30.0
    assert observer.events == [
        ("breaker", "inconvo", BreakerState.CLOSED),
        ("rate", "inconvo", 5.0),
        ("breaker", "mindset", BreakerState.CLOSED),
        ("rate", "mindset", None),
    ]
    assert callable(flow_middleware(flows.for_destination("mindset")))
    with pytest.raises(KeyError):
        flows.for_destination("dropbox")


# -- the aiohttp middleware, against the loopback fake -------------------------------


@pytest.fixture
async def fake() -> AsyncIterator[FakeInconvo]:
    """A running fake Inconvo."""
    async with FakeInconvo(api_key=KEY) as server:
        yield server


def upload_form() -> aiohttp.FormData:
    form = aiohttp.FormData(quote_fields=False)
    form.add_field("file", b"a,b\n1,2\n", filename="data.csv", content_type="text/csv")
    return form


async def post(session: aiohttp.ClientSession, url: str, **kwargs: Any) -> int:
    async with session.post(url, data=upload_form(), headers=AUTH, **kwargs) as response:
        await response.read()
        return response.status


async def test_middleware_opens_the_breaker_during_an_outage(fake: FakeInconvo) -> None:
    """Outage: the threshold-th 503 opens the breaker, later calls deferred unsent; a probe closes it."""
    clock = FakeClock()
    flow = make_flow(threshold=3, clock=clock)
    url = fake.base_url + "/datasets/user/u1"
    async with aiohttp.ClientSession(middlewares=[flow_middleware(flow)]) as session:
        fake.outage(503)
        assert [await post(session, url) for _ in range(3)] == [503, 503, 503]
        for _ in range(5):
            with pytest.raises(Deferred) as held:
                await post(session, url)
            assert held.value.reason is DeferReason.BREAKER_OPEN
        assert fake.outage_calls == 3
        fake.heal()
        clock.advance(10.0)
        assert await post(session, url) == 200
    assert state(flow) is BreakerState.CLOSED
    assert len(fake.uploads) == 1


async def test_middleware_shares_retry_after_with_every_request(fake: FakeInconvo) -> None:
    """A 429's retry-after-ms pauses the destination: the next request Holds without being sent."""
    clock = FakeClock()
    flow = make_flow(clock=clock)
    fake.rate_limit(per_second=1, window=60)
    url = fake.base_url + "/datasets/user/u1"
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession(middlewares=[flow_middleware(flow)]) as session:
        began = loop.time()
        assert [await post(session, url), await post(session, url)] == [200, 429]
        elapsed = loop.time() - began
        with pytest.raises(Deferred) as held:
            await post(session, url)
    assert held.value.reason is DeferReason.RATE_LIMITED
    # The window reopens 60 s after the first call: the 429 said so, less the time the
    # two calls took (however loaded the machine), and the hold is exactly that.
    assert 60.0 - elapsed <= held.value.seconds <= 60.0
    assert len(fake.requests) == 2
    assert flow.rate is not None  # adaptive: the 429 set a rate
    assert state(flow) is BreakerState.CLOSED


async def test_middleware_counts_refused_connections_and_timeouts(fake: FakeInconvo) -> None:
    """No answer at all (connection refused, the session's timeout) counts against the breaker."""
    flow = make_flow(threshold=2, clock=FakeClock())
    async with aiohttp.ClientSession(middlewares=[flow_middleware(flow)]) as session:
        with closed_port() as port, pytest.raises(aiohttp.ClientConnectionError):
            await post(session, f"http://127.0.0.1:{port}/datasets/user/u1")
        assert flow.breaker.failures == 1
        fake.delay = 1.0
        with pytest.raises(TimeoutError):
            await post(
                session,
                fake.base_url + "/datasets/user/u1",
                timeout=aiohttp.ClientTimeout(total=0.05),
            )
    assert state(flow) is BreakerState.OPEN


async def test_middleware_releases_a_cancelled_probe(fake: FakeInconvo) -> None:
    """A probe whose task is cancelled mid-request is released, so the next caller probes."""
    clock = FakeClock()
    flow = make_flow(threshold=1, clock=clock)
    url = fake.base_url + "/datasets/user/u1"
    (await flow.admit()).record(None)
    clock.advance(10.0)
    fake.delay = 5.0
    async with aiohttp.ClientSession(middlewares=[flow_middleware(flow)]) as session:
        probe = asyncio.create_task(post(session, url))
        async with asyncio.timeout(5):
            while not fake.requests:
                await asyncio.sleep(0.01)
        probe.cancel()
        with pytest.raises(asyncio.CancelledError):
            await probe
    assert state(flow) is BreakerState.HALF_OPEN
    assert (await flow.admit()).probe


async def test_middleware_tells_its_timeout_from_other_cancellations() -> None:
    """Cancelled by the session's total timeout (connecting, sending): a failure; else released."""
    flow = make_flow(threshold=1, clock=FakeClock())
    middleware = flow_middleware(flow)

    async def cancelled(request: aiohttp.ClientRequest) -> aiohttp.ClientResponse:
        raise asyncio.CancelledError

    class Timer:
        _cancelled = False

    class Request:
        _timer = Timer()

    request: Any = Request()
    with pytest.raises(asyncio.CancelledError):
        await middleware(request, cancelled)
    assert (state(flow), flow.breaker.failures) == (BreakerState.CLOSED, 0)
    request._timer._cancelled = True  # what aiohttp's TimerContext sets when it fires
    with pytest.raises(asyncio.CancelledError):
        await middleware(request, cancelled)
    assert state(flow) is BreakerState.OPEN


@pytest.mark.usefixtures("fast_retries")
async def test_the_unchanged_inconvo_adapter_lets_hold_through(
    files: FileServer, inconvo: FakeInconvo
) -> None:
    """Through the adapter: in-process retries feed the breaker; then Deferred comes out of deliver()."""
    flow = make_flow(threshold=3, clock=FakeClock())
    policy = AddressPolicy(allowed_hosts=parse_allowed_hosts([f"127.0.0.1:{files.port}"]))
    body = {
        "source": {"url": files.add("/q.csv", b"a,b\n")},
        "destination": {"type": "inconvo", "userIdentifier": "u1"},
    }
    request = parse_request(orjson.dumps(body), 1 << 20)
    assert isinstance(request, UploadRequest)
    inconvo.outage(503)
    async with (
        aiohttp.ClientSession(connector=guarded_connector(policy)) as source_session,
        aiohttp.ClientSession(middlewares=[flow_middleware(flow)]) as api,
    ):
        adapter = Inconvo(api, base_url=inconvo.base_url, api_key=SecretStr(INCONVO_KEY))
        source = HttpSource(source_session, policy)
        with pytest.raises(CourierError) as failed:
            await adapter.deliver(request, source, "r-1")
        assert failed.value.code is ErrorCode.DESTINATION_UNAVAILABLE
        assert state(flow) is BreakerState.OPEN
        with pytest.raises(Deferred) as held:
            await adapter.deliver(request, source, "r-1")
    assert held.value.reason is DeferReason.BREAKER_OPEN
    assert inconvo.outage_calls == 3
