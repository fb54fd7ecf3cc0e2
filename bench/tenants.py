"""`make bench-tenants`: how long one tenant waits behind another tenant's backlog.

Tenant ``backfill`` publishes a backlog (2,000 and 20,000 requests by default), then
tenant ``web`` publishes 20; the fake Inconvo answers each upload in 100 ms and Courier
runs at concurrency 16 (a ceiling of 160 uploads/s). For each backlog it prints how long
``web``'s requests took from their publish to their event (median and slowest), how much
of the backlog was done by then, how fast the backlog drained, and the wait a plain FIFO
consumer would have imposed (the backlog ahead of ``web`` at 160/s). With ``--ab
CHECKOUT`` the same runs are made with that checkout's ``courier run`` as well (one
from before fair sharing measures the FIFO wait instead of computing it; it gets the
same requests without the ``tenant`` field, which it would refuse).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import orjson

from bench.run import (
    ROOT,
    Scenario,
    cpu_seconds,
    machine,
    profile_summary,
    scenario_env,
    start_servers,
    wait_ready,
)
from testbed.producer import publish_requests
from testbed.support import AMQP_URL, EventCollector, Names, delete_topology, free_port

DELAY = 0.1
CONCURRENCY = 16
LATE = 20  # web's requests


@dataclass
class Run:
    """One backlog run: what the late tenant waited, and how the backlog fared."""

    checkout: str
    backlog: int
    web_median_s: float
    web_max_s: float
    backlog_done_when_web_done: int
    backlog_req_per_s: float
    fifo_wait_s: float
    cpu_ms_per_request: float
    published_per_s: float  # how fast the backlog was published
    ahead_of_web: int  # requests still in the request queue when web's were published


def body(info: dict[str, Any], rid: str, tenant: str | None) -> bytes:
    """One request (of ``tenant``; of none for a checkout that knows no tenants)."""
    request = {
        "id": rid,
        "source": {"url": info["files"] + "/small.csv"},
        "destination": {"type": "inconvo", "userIdentifier": rid.split("-")[0]},
    }
    return orjson.dumps(request if tenant is None else {**request, "tenant": tenant})


async def one_run(
    info: dict[str, Any],
    url: str,
    backlog: int,
    checkout: Path,
    *,
    quick: bool = False,
    profile: Path | None = None,
) -> Run:
    """Publish the backlog, then the late tenant's requests; wait for every event (for
    the late tenant's only, ``quick``); with ``profile``, under cProfile, saved there."""
    names = Names.fresh()
    names.tenants |= {"backfill", "web"}
    port = free_port()
    scenario = Scenario("tenants", backlog + LATE, CONCURRENCY, lambda _info, _i: {})
    env = scenario_env(scenario, info, url, names, port)
    ours = checkout == ROOT
    back = [body(info, f"backfill-{i}", "backfill" if ours else None) for i in range(backlog)]
    late = [body(info, f"web-{i}", "web" if ours else None) for i in range(LATE)]
    async with (
        aiohttp.ClientSession() as http,
        await aio_pika.connect_robust(url) as connection,
    ):

        async def ready() -> bool:
            try:
                async with http.get(f"http://127.0.0.1:{port}/readyz") as answer:
                    return answer.status == 200
            except aiohttp.ClientError:
                return False

        await http.post(f"{info['control']}/delay?seconds={DELAY}")
        collector = await EventCollector(connection, names.events_exchange).start()
        profiler = ["-m", "cProfile", "-o", str(profile)] if profile else []
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            *profiler,
            "-m",
            "service",
            "run",
            env=env,
            cwd=checkout,
            stdout=subprocess.DEVNULL,
        )
        try:
            await wait_ready(ready)
            cpu = cpu_seconds(proc.pid)
            began = time.monotonic()
            await publish_requests(url, names.queue, back)
            published = time.monotonic() - began
            await publish_requests(url, names.queue, late)
            web_published = time.monotonic()
            async with connection.channel() as channel:
                queue = await channel.declare_queue(names.queue, passive=True)
                ahead = (queue.declaration_result.message_count or 0) - LATE
            web_ids = {f"web-{i}" for i in range(LATE)}
            await collector.wait_for_ids(web_ids, timeout=3600)
            done = [
                (e["data"]["requestId"], t)
                for e, t in zip(collector.events, collector.arrivals, strict=True)
            ]
            web_waits = [t - web_published for rid, t in done if rid in web_ids]
            backlog_done = sum(1 for rid, _ in done if rid.startswith("backfill-"))
            if not quick:
                await collector.wait_for(backlog + LATE, timeout=3600)
            elapsed = collector.arrivals[-1] - began
            cpu = cpu_seconds(proc.pid) - cpu
        finally:
            proc.send_signal(signal.SIGTERM)
            await proc.wait()
            await http.post(f"{info['control']}/delay?seconds=0")
            await delete_topology(names, (1, 2, 10, 60, 300, 1800), url)
    return Run(
        checkout.name or str(checkout),
        backlog,
        round(statistics.median(web_waits), 2),
        round(max(web_waits), 2),
        backlog_done,
        round((len(collector.events) - LATE) / elapsed, 1),
        round(backlog * DELAY / CONCURRENCY, 1),
        round(cpu / (backlog + LATE) * 1000, 3),
        round(backlog / published, 1),
        max(ahead, 0),
    )


async def main() -> int:
    """Run each backlog (with this checkout, and --ab's), print a table and JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backlogs", default="2000,20000")
    parser.add_argument("--ab", type=Path, metavar="CHECKOUT")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "tenants.json")
    parser.add_argument(
        "--quick", action="store_true", help="stop each run once the late tenant is done"
    )
    parser.add_argument("--profile", type=Path, metavar="DIR", help="cProfile the service")
    args = parser.parse_args()
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    url = os.environ.get("COURIER_AMQP_URL", AMQP_URL)
    servers, info = await start_servers()
    assert servers.stdin is not None
    checkouts = [ROOT, *([args.ab] if args.ab else [])]
    runs: list[Run] = []
    try:
        for backlog in (int(x) for x in args.backlogs.split(",")):
            for checkout in checkouts:
                profile = args.profile / f"tenants-{backlog}.prof" if args.profile else None
                run = await one_run(info, url, backlog, checkout, quick=args.quick, profile=profile)
                if profile is not None:
                    print(profile_summary(profile, top=25), file=sys.stderr, flush=True)
                print(run, file=sys.stderr, flush=True)
                runs.append(run)
    finally:
        servers.stdin.close()
        await servers.wait()
    print(f"\nMachine: {machine()}; fake upload {DELAY * 1000:.0f} ms, concurrency {CONCURRENCY}")
    print(f"{LATE} requests of tenant web published right after tenant backfill's backlog\n")
    header = (
        "checkout", "backlog", "web median s", "web max s", "backlog done then",
        "backlog req/s", "FIFO wait s", "CPU ms/req", "published/s", "ahead of web",
    )  # fmt: skip
    print(" | ".join(header))
    print(" | ".join("---" for _ in header))
    for r in runs:
        print(" | ".join(str(v) for v in asdict(r).values()))
    report = {"machine": machine(), "runs": [asdict(r) for r in runs]}
    args.json.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
