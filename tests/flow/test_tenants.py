"""Fair share between tenants: one tenant's backlog holds up another's requests by about a
turn, not by the backlog; weights share the capacity; nothing is lost or repeated."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest

from service import fair
from service.amqp.dispatch import LOOKAHEAD, Dispatcher
from service.amqp.wire import beacon_of
from service.copies import moved_headers
from service.fair import FairQueue, SpillBudget, Tenants, cpu_clock, parse_weights, tenant_of
from service.instrument import Instruments
from service.metrics import Metrics
from service.topology import (
    BEACON_HEADER,
    DELIVERY_COUNT_HEADER,
    REDELIVERIES_HEADER,
    TENANT_HEADER,
    Topology,
)
from testbed.stage import Stage
from testbed.support import inconvo_request, publish_requests

DELAY = 0.1  # the fake answers each upload in 100 ms


def request(url: str, rid: str, tenant: str) -> dict[str, Any]:
    body = inconvo_request(url, rid)
    body["tenant"] = tenant
    return body


def order(stage: Stage) -> list[str]:
    """The tenant of each terminal event, in the order they came."""
    return [e["data"]["requestId"].split("-")[0] for e in stage.collector.events]


# Timing tier: moves use only the CPU the requests leave idle, so a machine loaded
# until the service itself is starved slows them by design.
@pytest.mark.timing
@pytest.mark.timeout(180)
async def test_a_backlog_published_first_does_not_hold_up_another_tenant(stage: Stage) -> None:
    """Tenant a publishes 2,000 requests, tenant b then 20 (concurrency 16, uploads taking
    100 ms): b's all finish while a still has more than half its backlog left; every
    request of both ends in exactly one event and one upload."""
    stage.inconvo.delay = DELAY
    stage.names.tenants |= {"a", "b"}
    url = stage.files.add("/a.csv", b"1\n")
    a = [request(url, f"a-{i}", "a") for i in range(2000)]
    b = [request(url, f"b-{i}", "b") for i in range(20)]
    courier = await stage.process(COURIER_CONCURRENCY="16").start()
    try:
        await publish_requests(stage.amqp, stage.queue, a)
        await publish_requests(stage.amqp, stage.queue, b)
        await stage.collector.wait_for_ids({r["id"] for r in b}, timeout=120)
        a_done_when_b_done = order(stage).count("a")
        await stage.collector.wait_for_ids({r["id"] for r in a}, timeout=150)
        moved = await courier.metric("courier_tenant_moved_total")
    finally:
        await courier.signal(15)
    # a's backlog was read past by moving it aside: counted, never more than there was.
    assert 0 < moved <= 2000, f"courier_tenant_moved_total {moved}"
    print(f"\nb's 20 done when {a_done_when_b_done} of a's 2,000 were (bound 1,000)")
    assert a_done_when_b_done < 1000, f"b waited for {a_done_when_b_done} of a's 2000"
    counts = Counter(e["data"]["requestId"] for e in stage.collector.events)
    assert set(counts.values()) == {1} and len(counts) == 2020, "lost or repeated"
    assert {e["data"]["status"] for e in stage.collector.events} == {"succeeded"}
    assert len(stage.inconvo.uploads) == 2020


# Timing tier: moves use only the CPU the requests leave idle, so a loaded machine
# slows them by design.
@pytest.mark.timing
@pytest.mark.timeout(180)
async def test_weights_share_the_capacity(stage: Stage) -> None:
    """With COURIER_TENANT_WEIGHTS a=1,b=3 and both tenants waiting, b gets about three
    quarters of the capacity."""
    stage.inconvo.delay = DELAY
    stage.names.tenants |= {"a", "b"}
    url = stage.files.add("/a.csv", b"1\n")
    a = [request(url, f"a-{i}", "a") for i in range(400)]
    b = [request(url, f"b-{i}", "b") for i in range(400)]
    courier = await stage.process(
        COURIER_CONCURRENCY="16", COURIER_TENANT_WEIGHTS="a=1,b=3"
    ).start()
    try:
        await publish_requests(stage.amqp, stage.queue, a)
        await publish_requests(stage.amqp, stage.queue, b)
        await stage.collector.wait_for_ids({r["id"] for r in a + b}, timeout=150)
    finally:
        await courier.signal(15)
    done = order(stage)
    # While both wait: from b's first event to the first tenant's last. (On a loaded
    # machine a backlog moves aside slowly, so b may be read late, when a has little
    # left; after a's last event only b waits, and that tail says nothing of weights.)
    last = min(len(done) - done[::-1].index(t) for t in ("a", "b"))
    both = done[done.index("b") : last]
    assert len(both) >= 100, f"both tenants waited for only {len(both)} events"
    share = both.count("b") / len(both)
    print(f"\nweights a=1,b=3: b's share {share:.2f} of {len(both)} events while both waited")
    assert 0.65 <= share <= 0.85, f"b's share while both waited: {share:.2f} of {len(both)}"


async def test_a_request_carrying_the_beacon_header_still_ends_in_its_event(
    stage: Stage,
) -> None:
    """A request that carries Courier's beacon header by mistake is still a request: it
    is uploaded and ends in one event (it was acked with none). A tenant header no tenant
    can have is the dispatcher's business: see the pure test below."""
    url = stage.files.add("/a.csv", b"1\n")
    async with stage.running():
        await stage.publish(request(url, "beacon-0", "web"), headers={BEACON_HEADER: "web"})
        await stage.collector.wait_for_ids({"beacon-0"}, timeout=30)
    assert [e["type"] for e in stage.collector.events] == ["courier.upload.succeeded"]
    assert len(stage.inconvo.uploads) == 1


# -- the pure parts ------------------------------------------------------------------


@dataclass
class Delivery:
    body: bytes
    headers: dict[str, Any] = field(default_factory=dict)


class Runner:
    """Takes deliveries without ending them; records the moves."""

    def __init__(self) -> None:
        self.started: list[bytes] = []
        self.moves: list[tuple[bytes, str]] = []

    def take(self, message: Any, channel: object, tenant: str, done: Any) -> None:
        self.started.append(message.body)

    def move(self, message: Any, channel: object, tenant: str) -> None:
        self.moves.append((message.body, tenant))

    def give_back(self, message: Any, channel: object) -> None:
        raise AssertionError("nothing is given back here")


class Unlimited:
    """A budget that allows every move."""

    def take(self) -> bool:
        return True

    def finished(self, count: int = 1) -> None:
        pass


def test_the_newest_of_the_busiest_tenant_is_moved_and_counted() -> None:
    """With its one slot busy, the request queue's deliveries past the lookahead are moved,
    the newest of the busiest tenant first; each move is counted in
    courier_tenant_moved_total (a tenant not named in the weights as other)."""
    topology = Topology.build(
        queue="t-moves", events_exchange="t-moves.events", retry_delays=(1,), max_redeliveries=5
    )
    metrics, tenants = Metrics(), Tenants({"a": 1.0})
    instruments = Instruments(metrics, tenants)
    runner = Runner()
    moved: list[str] = []
    dispatcher = Dispatcher(
        runner, topology, 1, tenants, cast(SpillBudget, Unlimited()), instruments, moved.append
    )
    for body, tenant in [(b"a0", "a"), (b"a1", "a"), (b"a2", "a"), (b"b0", "b"), (b"a3", "a")]:
        dispatcher.offer(cast(Any, Delivery(body, {TENANT_HEADER: tenant})), None, "t-moves")
    assert runner.started == [b"a0"]
    assert dispatcher.waiting() == LOOKAHEAD and runner.moves == [(b"a2", "a"), (b"a3", "a")]
    dispatcher.offer(cast(Any, Delivery(b"b1", {TENANT_HEADER: "b"})), None, "t-moves")
    dispatcher.offer(cast(Any, Delivery(b"b2", {TENANT_HEADER: "b"})), None, "t-moves")
    assert runner.moves[2:] == [(b"b1", "b"), (b"b2", "b")], "now b has the most waiting"
    assert moved == ["a", "a", "b", "b"], "the consumer hears of every move"
    for tenant in moved:  # the consumer counts each (the backlog test reads it end to end)
        instruments.moved(tenant)
    value = metrics.registry.get_sample_value
    assert value("courier_tenant_moved_total", {"tenant": "a"}) == 2
    assert value("courier_tenant_moved_total", {"tenant": "other"}) == 2


def test_a_tenant_header_no_tenant_can_have_is_ignored() -> None:
    """Only a tenant name the contract allows is taken from the header (Courier's mark on a
    moved copy); anything else, a producer's mistake, gives way to the body's tenant."""
    topology = Topology.build(
        queue="t-marks", events_exchange="t-marks.events", retry_delays=(1,), max_redeliveries=5
    )
    runner = Runner()
    instruments = Instruments(Metrics(), Tenants())
    budget = cast(SpillBudget, Unlimited())
    dispatcher = Dispatcher(runner, topology, 1, Tenants(), budget, instruments, lambda _: None)
    for i in range(LOOKAHEAD + 2):
        body = b'{"tenant": "b", "n": %d}' % i
        dispatcher.offer(cast(Any, Delivery(body, {TENANT_HEADER: "x" * 300})), None, "t-marks")
    assert [tenant for _, tenant in runner.moves] == ["b"]


def test_a_beacon_is_told_apart_by_its_body_too() -> None:
    """A beacon is its tenant's name under the beacon header; a request carrying the
    header, or a name no tenant can have, is not one."""
    assert beacon_of(cast(Any, Delivery(b"web", {BEACON_HEADER: "web"}))) == "web"
    assert beacon_of(cast(Any, Delivery(b'{"id": "r"}', {BEACON_HEADER: "web"}))) is None
    assert beacon_of(cast(Any, Delivery(b"x" * 300, {BEACON_HEADER: "x" * 300}))) is None
    assert beacon_of(cast(Any, Delivery(b"web"))) is None


def test_a_move_keeps_the_crashes_counted() -> None:
    """A copy moved into its tenant's queue carries the crashes of the delivery it copies
    (the broker's count of this copy and earlier ones), so the poison limit still holds."""
    headers = moved_headers({DELIVERY_COUNT_HEADER: 3, REDELIVERIES_HEADER: 1, "p": "kept"}, "a")
    assert headers == {REDELIVERIES_HEADER: 4, TENANT_HEADER: "a", "p": "kept"}
    assert moved_headers(None, "a") == {TENANT_HEADER: "a"}


def test_weighted_turns() -> None:
    """Tenants take turns by weight; a tenant alone takes every turn; order within one
    tenant is kept; a tenant that wakes up banks no credit for its idle time."""
    queue: FairQueue[str] = FairQueue(Tenants({"b": 3}))
    for i in range(8):
        queue.push("a", f"a{i}")
        queue.push("b", f"b{i}")
    taken = [queue.pop() for _ in range(8)]
    tenants = [t[0] for t in taken if t is not None]
    assert tenants.count("b") == 6
    assert [t[1] for t in taken if t is not None and t[0] == "b"] == [f"b{i}" for i in range(6)]
    while queue.pop() is not None:
        pass
    for i in range(5):
        queue.push("a", f"x{i}")
    assert [queue.pop() for _ in range(5)] == [("a", f"x{i}") for i in range(5)]
    for i in range(4):
        queue.push("a", f"y{i}")
    queue.push("c", "late")
    first_two = {queue.pop(), queue.pop()}
    assert ("c", "late") in first_two, "a tenant arriving behind a backlog waits about a turn"


def test_the_busiest_tenant_gives_up_its_newest() -> None:
    """Moving aside takes the newest eligible item of the tenant with the most waiting."""
    queue: FairQueue[str] = FairQueue(Tenants())
    for item in ("a1", "a2", "a3"):
        queue.push("a", item)
    queue.push("b", "b1")
    assert queue.newest_of_busiest(lambda item: True) == ("a", "a3")
    assert queue.newest_of_busiest(lambda item: item != "a2") == ("a", "a1")
    assert len(queue) == 2 and queue.pop() == ("a", "a2")


def test_moves_use_the_cpu_the_requests_leave_idle() -> None:
    """A window of moving measures the requests alone, after a window that warms up; with
    CPU to spare moves refill at their rate, until a window reaches the ceiling or the
    recheck comes; a CPU-bound process earns a move for every so many requests
    finished; a pause warms up and measures afresh."""
    now, cpu = [0.0], [0.0]
    budget = SpillBudget(
        lambda: (cpu[0], 0.0), lambda: now[0], idle=0.6, free_rate=100, share=0.1, recheck=2
    )

    def at(t: float, used: float) -> int:
        now[0], cpu[0] = t, cpu[0] + used
        return sum(budget.take() for _ in range(50))

    assert at(0.0, 0.0) == 0 and at(1.0, 0.0) == 0, "a burst warms up first"
    assert not budget.free, "an idle warm-up says nothing"
    assert at(1.5, 0.1) == 0, "then it is measured"
    assert at(2.0, 0.1) == 10, "20% of a core: free, the burst a tenth of a second"
    assert at(2.5, 0.45) == 10
    assert at(3.0, 0.5) == 0, "the moves took the process to the ceiling: measure again"
    budget.finished(30)
    assert at(3.5, 0.4) == 3, "meanwhile a share of the requests finished"
    assert at(4.0, 0.4) == 0 and not budget.free, "80% of a core alone: CPU-bound"
    assert at(5.0, 0.3) == 10 and budget.free, "30%: free again"
    assert at(6.0, 0.5) == 10 and at(7.0, 0.5) == 0, "two free windows, then a recheck"
    assert not budget.free
    assert at(7.5, 0.1) == 0 and at(8.0, 0.1) == 10, "measured at 20%: free"
    assert at(10.0, 0.1) == 0 and not budget.free, "after a pause, warmed up first"
    assert at(11.0, 0.1) == 0 and not budget.free, "10% while warming up: not yet free"
    assert at(12.0, 0.1) == 10 and budget.free, "10% measured: free"


def test_a_busy_process_that_starts_slowly_does_not_move_its_backlog() -> None:
    """A replica that takes a second to reach full speed (connections opening, its
    first requests still under way) is not read as idle: that first window only warms
    up, and the next one, at full load, keeps it to the share."""
    now, cpu = [0.0], [0.0]
    budget = SpillBudget(lambda: (cpu[0], 0.0), lambda: now[0], free_rate=100, share=0.1)
    budget.take()
    moves = 0
    for t, used in ((1.0, 0.5), (2.0, 0.97), (3.0, 0.98)):
        now[0], cpu[0] = t, cpu[0] + used
        budget.finished(100)
        moves += sum(budget.take() for _ in range(50))
        assert not budget.free, f"free at {t}s"
    assert moves == 30, "a tenth of the requests finished: a move each"


@pytest.mark.parametrize(
    ("body", "tenant"),
    [
        (b'{"tenant": "acme", "source": {}}', "acme"),
        (b'{"source": {}}', "default"),
        (b'{"tenant": "no spaces"}', "default"),
        (b'{"tenant": 7}', "default"),
        (b'not json, but "tenant"', "default"),
    ],
)
def test_tenant_of_a_body(body: bytes, tenant: str) -> None:
    """A body's tenant; anything odd is the default tenant (the request then fails on its own)."""
    assert tenant_of(body) == tenant


def test_weights_are_parsed() -> None:
    """COURIER_TENANT_WEIGHTS: tenant=weight pairs; bad pairs name themselves."""
    assert parse_weights("web=4, backfill=0.5,") == {"web": 4.0, "backfill": 0.5}
    for bad in ("web", "web=0", "web=x", "bad name=1", "w=1001"):
        with pytest.raises(ValueError, match=r"^'"):
            parse_weights(bad)


def test_waiting_for_a_core_on_waking_is_not_being_busy() -> None:
    """On a loaded machine a process that sleeps between requests waits for a core each
    time it wakes: it still has room to move. One starved by its neighbours (always
    runnable: running or waiting, never sleeping) has none."""
    now, used, waited = [0.0], [0.0], [0.0]
    budget = SpillBudget(lambda: (used[0], waited[0]), lambda: now[0], free_rate=100)

    def window(cpu: float, wait: float) -> bool:
        budget.take()
        now[0] += 1.0  # the warm-up after a pause
        budget.take()
        now[0], used[0], waited[0] = now[0] + 1.0, used[0] + cpu, waited[0] + wait
        budget.take()
        return budget.free

    assert window(0.3, 0.55), "30% CPU, 55% waiting for a core, 15% asleep: room"
    assert budget.utilization == pytest.approx(0.3 / 0.45)
    now[0] += 5  # a pause: measured afresh
    assert not window(0.55, 0.43), "55% CPU, 43% waiting, 2% asleep: starved, no room"
    now[0] += 5
    assert not window(0.02, 0.98), "no time awake at all: busy"
    assert budget.utilization == 1.0


def test_cpu_clock_reads_the_wait_for_a_core(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CPU time used, and the seconds the thread waited for a core (schedstat's
    second field); without schedstat, no wait."""
    stat = tmp_path / "schedstat"
    stat.write_text("1000 2500000000 3\n")
    monkeypatch.setattr(fair, "_SCHEDSTAT", str(stat))
    used, waited = cpu_clock()
    assert used == pytest.approx(time.process_time(), abs=0.05) and waited == 2.5
    monkeypatch.setattr(fair, "_SCHEDSTAT", str(tmp_path / "absent"))
    assert cpu_clock()[1] == 0.0
