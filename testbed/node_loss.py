"""Node loss in a three-node RabbitMQ cluster: the scenario shared by the test suite and
``make chaos``.

`courier run` consumes from a cluster it knows by all three URLs while requests
are worked off. Mid-run the node Courier is connected to is stopped (and started
again), then the node leading the request queue (and started again). The
scenario counts every request's terminal events and, for each loss, the seconds
from the stop until events flowed again.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import signal
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import orjson
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage

from testbed.producer import inconvo_request, publish_requests
from testbed.rabbit import RabbitCluster, RabbitNode
from testbed.support import TERMINAL_KEYS, CourierProcess

CONSUME_CONNECTION = "courier-consume"


class FailoverCollector:
    """Gathers result events from a cluster, reconnecting to another node when one goes.

    Its queue is a durable quorum queue, so events published while it reconnects
    wait for it; an event redelivered after a reconnect is counted once (by id). It
    reconnects when its connection or channel closes, and when the broker cancels its
    consumer (the broker may, as a node goes), so it never sits on a dead consumer.
    """

    def __init__(self, urls: list[str], exchange: str) -> None:
        self._urls = urls
        self._exchange = exchange
        self.events: dict[str, dict[str, Any]] = {}  # by event id
        self.arrivals: list[float] = []
        self.url = ""  # the node it consumes from
        self.reconnects: list[str] = []  # why it left a node, for a stalled run's report
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> FailoverCollector:
        """Connect and consume in the background; returns once consuming."""
        ready = asyncio.Event()
        self._task = asyncio.create_task(self._run(ready))
        await asyncio.wait_for(ready.wait(), 30)
        return self

    async def _run(self, ready: asyncio.Event) -> None:
        index = 0
        while True:
            url = self._urls[index % len(self._urls)]
            index += 1
            try:
                connection = await aio_pika.connect(url, timeout=5)
            except (OSError, aio_pika.exceptions.AMQPError, TimeoutError):
                await asyncio.sleep(0.2)
                continue
            gone: asyncio.Future[str] = asyncio.get_running_loop().create_future()
            connection.close_callbacks.add(lambda *_, gone=gone: _settle(gone, "connection closed"))
            try:
                await self._consume(connection, gone)
            except (aio_pika.exceptions.AMQPError, OSError, RuntimeError):
                await connection.close()
                await asyncio.sleep(0.2)
                continue
            self.url = url
            ready.set()
            self.reconnects.append(f"{url}: {await gone}")
            await connection.close()

    async def _consume(self, connection: AbstractConnection, gone: asyncio.Future[str]) -> None:
        channel = await connection.channel()
        channel.close_callbacks.add(lambda *_: _settle(gone, "channel closed"))
        underlay = await channel.get_underlay_channel()
        underlay.on_consumer_cancel_callbacks.add(
            lambda *_: _settle(gone, "consumer cancelled by the broker")
        )
        exchange = await channel.declare_exchange(
            self._exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )
        queue = await channel.declare_queue(
            f"{self._exchange}.collector", durable=True, arguments={"x-queue-type": "quorum"}
        )
        for key in TERMINAL_KEYS:  # one event per request: ingestion events are not repeats
            await queue.bind(exchange, routing_key=key)
        await queue.consume(self._on_message)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        event = orjson.loads(message.body)
        if event["id"] not in self.events:
            self.events[event["id"]] = event
            self.arrivals.append(time.monotonic())
            self._changed.set()
        with contextlib.suppress(aio_pika.exceptions.AMQPError, RuntimeError):
            await message.ack()

    def counts(self) -> Counter[str]:
        """Terminal events per request id."""
        return Counter(e["data"]["requestId"] for e in self.events.values())

    async def wait(self, predicate: Any, timeout: float) -> None:
        """Wait until ``predicate()`` holds."""
        async with asyncio.timeout(timeout):
            while not predicate():
                self._changed.clear()
                await self._changed.wait()

    async def close(self) -> None:
        """Stop collecting."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


def _settle(future: asyncio.Future[str], reason: str) -> None:
    if not future.done():
        future.set_result(reason)


@dataclass
class Loss:
    """One node stopped mid-run."""

    what: str
    node: str
    recovered_s: float  # the longest pause in the flow of events after the stop


@dataclass
class NodeLossResult:
    """What a run saw."""

    sent: int
    ended: int
    succeeded: int
    duplicated: int
    losses: list[Loss] = field(default_factory=list)
    seconds: float = 0.0

    def rows(self) -> list[str]:
        """A table of the losses, for people."""
        lines = [
            f"sent {self.sent}, ended {self.ended}, succeeded {self.succeeded}, "
            f"lost {self.sent - self.ended}, duplicated {self.duplicated}, {self.seconds:.1f}s"
        ]
        lines += [
            f"{loss.what} ({loss.node}): events paused at most {loss.recovered_s:.2f}s"
            for loss in self.losses
        ]
        return lines


async def lose_node(
    node: RabbitNode, what: str, collector: FailoverCollector, result: NodeLossResult
) -> None:
    """Stop ``node``'s application and start it again; how long did events stop flowing?

    Events already on their way arrive just after the stop, so the first arrival
    says little: the longest pause between arrivals from the stop until 100 more
    events have come is the time the service took to recover.
    """
    await node.wait_not_quorum_critical()
    seen = len(collector.events)
    stopped = time.monotonic()
    await node.stop_app()
    await collector.wait(lambda: len(collector.events) > seen + 100, timeout=60)
    arrivals = [stopped, *collector.arrivals[seen : seen + 101]]
    pause = max(later - earlier for earlier, later in itertools.pairwise(arrivals))
    result.losses.append(Loss(what, node.name, pause))
    await node.start_app()


async def collector_drained(cluster: RabbitCluster, queue: str, timeout: float = 60) -> None:
    """Wait until ``queue`` holds no message, ready or unacked."""
    deadline = time.monotonic() + timeout
    while True:
        text = await cluster.queues_report()
        depths = [line.split() for line in text.splitlines() if line.startswith(queue)]
        if depths and all(d[-3:-1] == ["0", "0"] for d in depths):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"the collector's queue did not drain: {depths}")
        await asyncio.sleep(0.2)


async def node_loss_run(
    cluster: RabbitCluster,
    env: Mapping[str, str],
    queue: str,
    exchange: str,
    url: str,
    n: int = 1000,
) -> NodeLossResult:
    """Run ``n`` requests through `courier run` (``env``) while two nodes are lost in turn."""
    urls = [node.url for node in cluster.nodes]
    # The collector starts on the last node, Courier on the first: the first loss
    # (Courier's node) does not take the collector and its queue's leader with it.
    collector = await FailoverCollector([*urls[-1:], *urls[:-1]], exchange).start()
    courier = await CourierProcess({**env, "COURIER_AMQP_URL": cluster.urls}).start()
    result = NodeLossResult(sent=n, ended=0, succeeded=0, duplicated=0)
    started = time.monotonic()
    ids = {f"cluster-{i}" for i in range(n)}
    stalled: TimeoutError | None = None
    try:
        bodies = [inconvo_request(url, rid) for rid in sorted(ids)]
        await publish_requests(urls, queue, bodies, retry=True)
        await collector.wait(lambda: len(collector.events) >= n // 10, timeout=60)
        connected = await cluster.connected_to(CONSUME_CONNECTION)
        assert connected is not None, "Courier's consume connection is on no node"
        await lose_node(connected, "the node Courier is connected to", collector, result)
        await collector.wait(lambda: len(collector.events) >= n // 3, timeout=60)
        leader = await cluster.leader(queue)
        await lose_node(leader, "the request queue's leader", collector, result)
        await collector.wait(lambda: ids <= set(collector.counts()), timeout=120)
    except TimeoutError as exc:
        stalled = exc
    finally:
        code = await courier.signal(signal.SIGTERM, timeout=30)
        if stalled is None:
            # Courier has exited: every event it will publish is out. A late duplicate
            # is in the collector once its queue holds nothing more.
            await collector_drained(cluster, f"{exchange}.collector")
        await collector.close()
    if stalled is not None:
        queues = await cluster.queues_report()
        raise AssertionError(
            f"events stopped at {len(collector.events)} after {result.rows()}; the collector "
            f"was on {collector.url} (left nodes: {collector.reconnects}); the queues "
            f"(name leader members ready unacked consumers):\n{queues}\n"
            f"Courier's log:\n{courier.stderr.decode()[-8000:]}"
        ) from stalled
    assert code == 0, courier.stderr.decode()[-2000:]
    counts = collector.counts()
    result.seconds = time.monotonic() - started
    result.ended = len(ids & set(counts))
    result.duplicated = sum(counts[rid] - 1 for rid in ids if counts[rid] > 1)
    result.succeeded = len(
        {
            e["data"]["requestId"]
            for e in collector.events.values()
            if e["data"]["status"] == "succeeded"
        }
        & ids
    )
    return result
