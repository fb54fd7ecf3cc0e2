"""Fair sharing under faults: a replica killed, and the broker restarted, while tenants'
queues hold moved work. Every request still ends in an event; only work under way at the
fault repeats.

In the timing tier: the restart stops the tests' own node, which the tier has to itself.
"""

from __future__ import annotations

import signal

import aiormq
import pytest

from service.amqp.consumer import MOVING
from testbed.rabbit import RabbitNode
from testbed.stage import Stage
from testbed.support import (
    EventCollector,
    app_stopped,
    inconvo_request,
    publish_requests,
    queue_counts,
    wait_until,
)
from tests.broker.test_reliability import assert_exactly_terminal

pytestmark = pytest.mark.timing

BACKLOG = 300
LATE = 30


async def moved_aside(stage: Stage) -> bool:
    """Whether tenant a's queue holds a good part of its backlog, moved there."""
    try:
        ready, _ = await queue_counts(stage.amqp, f"{stage.queue}.tenant.a")
    except aiormq.exceptions.ChannelNotFoundEntity:  # not declared yet
        return False
    return ready >= BACKLOG // 3


async def backlog_moved_aside(stage: Stage, url: str) -> set[str]:
    """Publish a's backlog and b's requests while every upload hangs (the slots stay full,
    so the backlog is moved into a's queue, and stays there); returns every id."""
    stage.names.tenants |= {"a", "b"}
    stage.inconvo.delay = 600
    backlog = [inconvo_request(url, f"a-{i}") | {"tenant": "a"} for i in range(BACKLOG)]
    late = [inconvo_request(url, f"b-{i}") | {"tenant": "b"} for i in range(LATE)]
    await publish_requests(stage.amqp, stage.queue, backlog)
    await publish_requests(stage.amqp, stage.queue, late)
    await wait_until(lambda: moved_aside(stage), 60, "tenant a's queue holding moved work")
    return {r["id"] for r in backlog + late}


@pytest.mark.timeout(180)
async def test_a_replica_killed_while_tenant_queues_hold_work(stage: Stage) -> None:
    """SIGKILL with tenant a's backlog partly moved into its queue: a new replica learns of
    the queue (the beacon) and finishes everything; only work under way at the kill (the
    uploads and the moves) repeats."""
    url = stage.files.add("/a.csv", b"1\n")
    first = await stage.process(COURIER_CONCURRENCY="8").start()
    ids = await backlog_moved_aside(stage, url)
    assert await first.signal(signal.SIGKILL) == -signal.SIGKILL
    stage.inconvo.delay = 0.05
    second = await stage.process(COURIER_CONCURRENCY="8").start()
    try:
        await stage.collector.wait_for_ids(ids, timeout=120)
    finally:
        assert await second.signal(signal.SIGTERM) == 0
    counts = assert_exactly_terminal(stage.collector, ids)
    # 8 uploads and at most 64 moves under way: nothing else may repeat.
    assert sum(counts.values()) - len(ids) <= 8 + MOVING
    assert {e["data"]["status"] for e in stage.collector.events} == {"succeeded"}


@pytest.mark.timeout(180)
async def test_a_broker_restart_while_tenant_queues_hold_work(
    stage: Stage, own_node: RabbitNode
) -> None:
    """`stop_app` / `start_app` with tenant a's backlog moved into its queue: the service
    consumes the tenant queues again once the broker is back, and every request ends."""
    url = stage.files.add("/a.csv", b"1\n")
    # Durable: events published while the node is away wait in it for the collector.
    collector = await EventCollector(stage.amqp, stage.names.events_exchange, durable=True).start()
    async with stage.running(concurrency=8) as service:
        ids = await backlog_moved_aside(stage, url)
        async with app_stopped(own_node, service.ready):
            # The hanging uploads' deliveries went with the connection: they are cancelled.
            stage.inconvo.delay = 0.05
        await collector.wait_for_ids(ids, timeout=120)
    counts = assert_exactly_terminal(collector, ids)
    assert sum(counts.values()) - len(ids) <= 8 + MOVING
