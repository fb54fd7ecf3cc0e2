"""`make chaos`: a longer run under mixed faults, counting what was lost or repeated.

Three `courier run` processes consume one queue through a TCP proxy to the
local RabbitMQ while requests arrive at a steady rate. On a fixed timeline the
run injects: destination 500s for 3 s, a SIGKILL and restart of one replica, a 5 s cut
of every broker connection, a real broker restart (`rabbitmqctl stop_app` /
`start_app`), a SIGTERM and restart of another replica, and a slow destination.
Then it waits for every request to end and prints sent / succeeded / failed /
lost / duplicated and how long each fault took to recover from (every live
replica ready again and events flowing).

Everything runs on loopback; the run is bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import aiohttp
import orjson

from testbed.fakes import FakeInconvo
from testbed.node_loss import node_loss_run
from testbed.producer import publish_requests
from testbed.proxy import TcpProxy
from testbed.rabbit import rabbit_cluster
from testbed.support import (
    AMQP_URL,
    CourierProcess,
    EventCollector,
    FileServer,
    Names,
    courier_env,
    delete_topology,
    free_port,
)

INCONVO_KEY = "chaos-inconvo-key"
DELAYS = (1, 2, 4)


@dataclass
class Recovery:
    """How long one fault took to heal, from the moment its cause was cleared."""

    fault: str
    ready_s: float | None = None
    events_s: float | None = None


@dataclass
class Run:
    """The state of one chaos run."""

    names: Names
    proxy: TcpProxy
    files: FileServer
    inconvo: FakeInconvo
    collector: EventCollector
    replicas: list[CourierProcess] = field(default_factory=list)
    recoveries: list[Recovery] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def env(self, index: int) -> dict[str, str]:
        """The environment of replica ``index``: through the proxy, on this run's queues."""
        return courier_env(
            COURIER_AMQP_URL=self.proxy.amqp_url,
            COURIER_QUEUE=self.names.queue,
            COURIER_EVENTS_EXCHANGE=self.names.events_exchange,
            COURIER_HTTP_PORT=str(free_port()),
            COURIER_CONCURRENCY="16",
            COURIER_INCONVO_API_KEY=INCONVO_KEY,
            COURIER_INCONVO_BASE_URL=self.inconvo.base_url,
            COURIER_SOURCE_ALLOWED_HOSTS=f"127.0.0.1:{self.files.port}",
            COURIER_RETRY_DELAYS=",".join(f"{d}s" for d in DELAYS),
            COURIER_MAX_ATTEMPTS="6",
            COURIER_SHUTDOWN_TIMEOUT="10",
            COURIER_EVENT_SOURCE=f"urn:courier:chaos-{index}",
            COURIER_LOG_LEVEL="ERROR",
        )

    def say(self, text: str) -> None:
        """A timeline line on stdout."""
        print(f"[{time.monotonic() - self.started:6.1f}s] {text}", flush=True)

    async def all_ready(self) -> bool:
        """Whether every live replica answers /readyz 200."""
        async with aiohttp.ClientSession() as http:
            for replica in self.replicas:
                try:
                    async with http.get(f"http://127.0.0.1:{replica.port}/readyz") as answer:
                        if answer.status != 200:
                            return False
                except aiohttp.ClientError:
                    return False
        return True

    async def recovered(self, fault: str, cleared: float, timeout: float = 60) -> None:
        """Measure how long after ``cleared`` the replicas were ready and events flowed."""
        recovery = Recovery(fault)
        seen = len(self.collector.events)
        deadline = cleared + timeout
        while time.monotonic() < deadline and (
            recovery.ready_s is None or recovery.events_s is None
        ):
            now = time.monotonic()
            if recovery.ready_s is None and await self.all_ready():
                recovery.ready_s = round(now - cleared, 2)
            if recovery.events_s is None and len(self.collector.events) > seen:
                recovery.events_s = round(self.collector.arrivals[seen] - cleared, 2)
            await asyncio.sleep(0.05)
        self.recoveries.append(recovery)
        self.say(f"{fault}: ready after {recovery.ready_s}s, events after {recovery.events_s}s")


def _index(rid: str) -> int:
    """``chaos-123`` -> 123 (published at 123 / rate seconds)."""
    return int(rid.rsplit("-", 1)[1])


def request(url: str, rid: str) -> bytes:
    """One small Inconvo upload request."""
    return orjson.dumps(
        {
            "id": rid,
            "source": {"url": url},
            "destination": {"type": "inconvo", "userIdentifier": f"chaos{rid[-1]}"},
        }
    )


async def publish_steadily(run: Run, url: str, total: int, rate: float) -> set[str]:
    """Publish ``total`` requests at ``rate`` per second; a publish the broker's restart
    interrupts is retried until confirmed (a duplicate at worst, never a loss)."""
    ids = [f"chaos-{i}" for i in range(total)]
    bodies = [request(url, rid) for rid in ids]
    await publish_requests(AMQP_URL, run.names.queue, bodies, rate=rate, retry=True)
    return set(ids)


async def at(run: Run, second: float, what: Callable[[], Awaitable[None]]) -> None:
    """Run ``what`` at ``second`` on the run's clock."""
    await asyncio.sleep(max(0.0, run.started + second - time.monotonic()))
    await what()


async def rabbitmqctl(*args: str) -> None:
    """Run ``rabbitmqctl -q ARGS``."""
    await asyncio.to_thread(subprocess.run, ["rabbitmqctl", "-q", *args], check=True, timeout=120)


def faults(run: Run) -> list[tuple[float, Callable[[], Awaitable[None]]]]:
    """The fault timeline, in seconds from the start of publishing."""

    async def destination_500s() -> None:
        # For a while, not for a number of calls: an open breaker makes few calls.
        run.inconvo.outage(500, seconds=3)
        run.say("destination: every upload answers 500 for 3 s")

    async def kill_replica() -> None:
        await run.replicas[0].signal(signal.SIGKILL)
        run.say("replica 0: SIGKILL")
        await asyncio.sleep(2)
        run.replicas[0] = await CourierProcess(run.env(0)).start(wait_ready=False)
        cleared = time.monotonic()
        run.say("replica 0: restarted")
        await run.recovered("SIGKILL + restart", cleared)

    async def cut_connections() -> None:
        run.proxy.cut()
        run.say("broker connections cut for 5 s")
        await asyncio.sleep(5)
        run.proxy.restore()
        cleared = time.monotonic()
        run.say("broker connections restored")
        await run.recovered("5 s connection cut", cleared)

    async def restart_broker() -> None:
        run.say("rabbitmqctl stop_app")
        await rabbitmqctl("stop_app")
        await asyncio.sleep(2)
        await rabbitmqctl("start_app")
        cleared = time.monotonic()
        run.say("rabbitmqctl start_app done")
        await run.recovered("broker restart", cleared)

    async def terminate_replica() -> None:
        code = await run.replicas[1].signal(signal.SIGTERM)
        run.say(f"replica 1: SIGTERM, exit status {code}")
        run.replicas[1] = await CourierProcess(run.env(1)).start(wait_ready=False)
        cleared = time.monotonic()
        await run.recovered("SIGTERM + restart", cleared)

    async def slow_destination() -> None:
        run.inconvo.delay = 0.3
        run.say("destination: 0.3 s per request for 4 s")
        await asyncio.sleep(4)
        run.inconvo.delay = 0.002

    return [
        (4, destination_500s),
        (8, kill_replica),
        (16, cut_connections),
        (28, restart_broker),
        (38, terminate_replica),
        (44, slow_destination),
    ]


async def chaos(total: int, rate: float, deadline: float) -> dict[str, Any]:
    """Run the scenario and return its figures."""
    names = Names.fresh()
    proxy = await TcpProxy().start()
    files = await FileServer().start()
    inconvo = FakeInconvo(api_key=INCONVO_KEY, keep_content=False)
    await inconvo.start()
    inconvo.delay = 0.002
    url = files.add("/chaos.csv", b"id,value\n1,2\n")
    amqp = await aio_pika.connect_robust(AMQP_URL)
    collector = await EventCollector(amqp, names.events_exchange, durable=True).start()
    run = Run(names, proxy, files, inconvo, collector)
    try:
        run.replicas = [await CourierProcess(run.env(i)).start() for i in range(3)]
        run.started = time.monotonic()
        run.say(f"3 replicas ready; publishing {total} requests at {rate:.0f}/s")
        publishing = asyncio.create_task(publish_steadily(run, url, total, rate))
        for when, what in faults(run):
            await at(run, when, what)
        ids = await publishing
        run.say("all requests published; waiting for every request to end")
        with contextlib.suppress(TimeoutError):
            await collector.wait_for_ids(ids, timeout=deadline)
        run.say("done")
        for replica in run.replicas:
            await replica.signal(signal.SIGTERM)
    finally:
        for replica in run.replicas:
            if replica.proc is not None and replica.proc.returncode is None:
                replica.proc.kill()
                await replica.proc.wait()
        await amqp.close()
        await proxy.close()
        await files.close()
        await inconvo.close()
        await delete_topology(names, DELAYS)
    per_request = Counter(e["data"]["requestId"] for e in collector.events)
    failed = Counter(
        e["data"]["error"]["code"] for e in collector.events if e["data"]["status"] == "failed"
    )
    succeeded = {
        e["data"]["requestId"] for e in collector.events if e["data"]["status"] == "succeeded"
    }
    # A figure that never came (None) counts as the whole deadline.
    worst = max(
        (
            max(deadline if s is None else s for s in (r.ready_s, r.events_s))
            for r in run.recoveries
        ),
        default=None,
    )
    return {
        "sent": len(ids),
        "succeeded": len(succeeded),
        "failed": sum(failed.values()),
        "failed_by_code": dict(failed),
        "lost": len(ids - set(per_request)),
        "lost_ids": sorted(ids - set(per_request), key=_index)[:20],
        "duplicated_ids": sorted((r for r, n in per_request.items() if n > 1), key=_index)[:30],
        "duplicated": sum(n - 1 for n in per_request.values()),
        "worst_recovery_s": worst,
        "recoveries": [r.__dict__ for r in run.recoveries],
        "by_replica": dict(Counter(e["source"] for e in collector.events)),
    }


async def cluster_chaos(total: int) -> list[str]:
    """Node loss in a three-node cluster of the installed RabbitMQ (testbed/node_loss.py)."""
    names = Names.fresh()
    files = await FileServer().start()
    inconvo = FakeInconvo(api_key=INCONVO_KEY, keep_content=False)
    await inconvo.start()
    inconvo.delay = 0.25
    try:
        env = courier_env(
            COURIER_QUEUE=names.queue,
            COURIER_EVENTS_EXCHANGE=names.events_exchange,
            COURIER_HTTP_PORT=str(free_port()),
            COURIER_CONCURRENCY="16",
            COURIER_INCONVO_API_KEY=INCONVO_KEY,
            COURIER_INCONVO_BASE_URL=inconvo.base_url,
            COURIER_SOURCE_ALLOWED_HOSTS=f"127.0.0.1:{files.port}",
            COURIER_LOG_LEVEL="ERROR",
        )
        url = files.add("/chaos.csv", b"id,value\n1,2\n")
        async with rabbit_cluster(3) as cluster:
            result = await node_loss_run(
                cluster, env, names.queue, names.events_exchange, url, n=total
            )
    finally:
        await files.close()
        await inconvo.close()
    rows = result.rows()
    if result.ended != result.sent:
        rows.append("LOST REQUESTS")
    return rows


def main() -> int:
    """Run the scenarios, print the figures; exit 1 if anything was lost."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scenario", choices=("mixed", "cluster", "both"), default="both")
    parser.add_argument("--requests", type=int, default=7500)
    parser.add_argument("--cluster-requests", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=150.0, help="requests published per second")
    parser.add_argument("--deadline", type=float, default=240.0, help="seconds to wait at the end")
    args = parser.parse_args()
    os.environ.setdefault("COURIER_AMQP_URL", AMQP_URL)
    # The harness's own broker client reconnects through the broker restart on
    # purpose: its tracebacks about that are noise, not findings.
    logging.basicConfig(level=logging.CRITICAL)
    lost = False
    if args.scenario in ("cluster", "both"):
        print("node loss in a three-node cluster:")
        rows = asyncio.run(cluster_chaos(args.cluster_requests))
        print("\n".join(rows) + "\n")
        lost = "LOST REQUESTS" in rows
    if args.scenario == "cluster":
        return 1 if lost else 0
    report = asyncio.run(chaos(args.requests, args.rate, args.deadline))
    print()
    print("| sent | succeeded | failed | lost | duplicated | worst recovery |")
    print("|---|---|---|---|---|---|")
    print(
        f"| {report['sent']} | {report['succeeded']} | {report['failed']} | {report['lost']} "
        f"| {report['duplicated']} | {report['worst_recovery_s']} s |"
    )
    print()
    print("| fault | replicas ready after | events flowing after |")
    print("|---|---|---|")
    for r in report["recoveries"]:
        print(f"| {r['fault']} | {r['ready_s']} s | {r['events_s']} s |")
    print()
    print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
    return 1 if report["lost"] or lost else 0


if __name__ == "__main__":
    raise SystemExit(main())
