"""`make bench`: Courier's throughput and memory, measured against the floor of its stack.

Starts the project's fakes and file server in a separate process, runs
`courier run` as a subprocess exactly as a user would, publishes N requests,
waits for N terminal events, and prints a table and JSON. The same run
measures baselines beside each scenario, each before and after it (the faster
of the two counts, as the machine's speed drifts): the bare aio-pika loop for
every scenario; for `small`, the floor (bench/floor.py: the same consume, GET,
multipart POST, confirmed publish and ack with no checks at all); for `big`, a
plain aiohttp copy. The `flow` scenario makes Inconvo sick mid-run (an outage,
then a rate limit) and counts the calls made and the requests kept, with
Courier's flow control and without its breaker.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import platform
import pstats
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import fmean
from typing import Any

import aio_pika
import aiohttp
import orjson
from yarl import URL

from testbed.producer import publish_requests
from testbed.support import (
    AMQP_URL,
    EventCollector,
    Names,
    delete_topology,
    free_port,
    metric_sum,
)

MOVED = "courier_tenant_moved_total"
ROOT = Path(__file__).resolve().parent.parent
MIB = 1024 * 1024


@dataclass
class Scenario:
    """One workload: how many requests, at what concurrency, and what each looks like."""

    name: str
    n: int
    concurrency: int
    request: Callable[[dict[str, Any], int], dict[str, Any]]
    expect: str = "succeeded"


def _inconvo(path: str) -> Callable[[dict[str, Any], int], dict[str, Any]]:
    def make(info: dict[str, Any], i: int) -> dict[str, Any]:
        return {
            "id": f"r{i}",
            "source": {"url": info["files"] + path},
            "destination": {"type": "inconvo", "userIdentifier": f"bench{i % 50}"},
        }

    return make


def _presign(info: dict[str, Any], i: int) -> dict[str, Any]:
    return {
        "id": f"r{i}",
        "source": {"url": f"s3://{info['bucket']}/media/talk-{i % info['s3_objects']}.mp4"},
        "destination": {
            "type": "mindset",
            "appUid": "bench",
            "contextUid": "ctx",
            "delivery": "sourceUrl",
        },
    }


def _inline(info: dict[str, Any], i: int) -> dict[str, Any]:
    return {
        "id": f"r{i}",
        "source": {"url": info["files"] + "/note.txt"},
        "destination": {"type": "mindset", "appUid": "bench", "contextUid": "ctx"},
    }


def _caps(info: dict[str, Any], i: int) -> dict[str, Any]:
    path = "/bomb.csv" if i % 2 else "/endless.csv"
    return _inconvo(path)(info, i)


SCENARIOS = {
    # 10,000: this VM's speed swings by a third within seconds; longer runs average it.
    "small": Scenario("small", 10_000, 32, _inconvo("/small.csv")),
    "flow": Scenario("flow", 600, 32, _inconvo("/small.csv"), expect="any"),
    "big": Scenario("big", 200, 32, _inconvo("/big.csv")),
    "presign": Scenario("presign", 5000, 32, _presign),
    "inline": Scenario("inline", 5000, 32, _inline),
    "caps": Scenario("caps", 64, 32, _caps, expect="too_large"),
}


# The flow scenario: short tiers and few attempts, so burning them shows within a run.
FLOW_ENV = {
    "COURIER_RETRY_DELAYS": "1s,2s",
    "COURIER_MAX_ATTEMPTS": "3",
    "COURIER_BREAKER_COOLDOWN": "2s",
}
# The same without the breaker: every request tries (and retries) through the outage.
NO_BREAKER_ENV = {**FLOW_ENV, "COURIER_BREAKER_THRESHOLD": "1000"}


@dataclass
class Result:
    """What one run measured."""

    scenario: str
    n: int
    seconds: float
    requests_per_s: float
    mb_per_s: float
    peak_rss_mib: float
    idle_rss_mib: float
    ready_s: float
    cpu_ms_per_request: float
    others_cpu_ms_per_request: dict[str, float] = field(default_factory=dict)
    outcomes: dict[str, int] = field(default_factory=dict)
    ratio_to_bare: float | None = None
    ratio_to_copy: float | None = None
    ratio_to_floor: float | None = None
    cpu_ratio_to_floor: float | None = None
    ab: float | None = None  # req/s as a ratio to the --ab side's (median of the pairs)
    ab_pairs: list[float] | None = None  # each alternating run's ratio to the --ab side
    ab_rates: tuple[list[float], list[float]] | None = None  # req/s: this side's, the other's
    pairs: list[float] | None = None  # each alternating run's ratio to the floor
    floor_aa: list[float] | None = None  # each inner floor run's ratio to its neighbours
    flow: dict[str, Any] | None = None
    moved: int | None = None  # requests moved into tenant queues (courier_tenant_moved_total)
    # Requests moved in each alternating run: this side's, the other's (None: not reported).
    ab_moved: tuple[list[int | None], list[int | None]] | None = None


def flow_faults(
    control: str, n: int, outage_s: float, rate_s: float
) -> Callable[[EventCollector], Any]:
    """Once a fifth of the events are in: Inconvo down for ``outage_s``, then limited to
    20 requests/s for ``rate_s``; returns the calls Inconvo saw meanwhile."""

    async def during(collector: EventCollector) -> dict[str, Any]:
        async with aiohttp.ClientSession() as http:

            async def stats() -> dict[str, int]:
                async with http.get(f"{control}/stats") as answer:
                    return dict(await answer.json())

            await collector.wait_for(n // 5, timeout=600)
            before = await stats()
            await http.post(f"{control}/outage", params={"seconds": str(outage_s)})
            await asyncio.sleep(outage_s)
            healed = await stats()
            await http.post(f"{control}/rate", params={"per_second": "20", "seconds": str(rate_s)})
            await asyncio.sleep(rate_s)
            after = await stats()
        return {
            "outage_s": outage_s,
            "calls_during_outage": healed["outage_calls"] - before["outage_calls"],
            "rate_limit_s": rate_s,
            "answered_429": after["throttled"] - healed["throttled"],
        }

    return during


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_status(pid: int, key: str) -> float:
    """A /proc/<pid>/status memory figure (VmRSS, VmHWM) in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


async def wait_ready(check: Callable[[], Any], timeout: float = 60) -> None:
    """Poll ``check`` until it is true."""
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.01)


async def measure(
    name: str,
    n: int,
    bodies: list[bytes],
    names: Names,
    start: Callable[[], Any],
    ready: Callable[[asyncio.subprocess.Process], Any],
    expect: str,
    url: str,
    others: dict[str, int],
    during: Callable[[EventCollector], Any] | None = None,
    moved: Callable[[], Awaitable[int | None]] | None = None,
) -> Result:
    """Start a consumer process, publish ``bodies``, wait for every event; measure
    (``moved``: read the requests the process moved, before it is stopped)."""
    async with await aio_pika.connect_robust(url) as connection:
        collector = await EventCollector(connection, names.events_exchange).start()
        spawned = time.perf_counter()
        proc: asyncio.subprocess.Process = await start()
        try:
            await wait_ready(lambda: ready(proc))
            ready_s = time.perf_counter() - spawned
            await asyncio.sleep(1.0)
            idle = proc_status(proc.pid, "VmRSS")
            cpu_before = cpu_seconds(proc.pid)
            others_before = {key: cpu_seconds(pid) for key, pid in others.items()}
            # The harness holds every body and event: its collections of them (up to
            # 70 ms each, 2.4 s over a run) took CPU from the measured process. No
            # collection while measuring, as timeit does.
            gc.collect()
            gc.disable()
            try:
                began = time.monotonic()
                side = asyncio.create_task(during(collector)) if during is not None else None
                await publish_requests(url, names.queue, bodies)
                await collector.wait_for(n, timeout=1800)
                flow = await side if side is not None else None
            finally:
                gc.enable()
            elapsed = collector.arrivals[n - 1] - began
            peak = proc_status(proc.pid, "VmHWM")
            cpu = cpu_seconds(proc.pid) - cpu_before
            others_cpu = {key: cpu_seconds(pid) - others_before[key] for key, pid in others.items()}
            moves = await moved() if moved is not None else None
        finally:
            proc.send_signal(signal.SIGTERM)
            await proc.wait()
    outcomes: dict[str, int] = {}
    total_bytes = 0
    for event in collector.events[:n]:
        data = event.get("data", {})
        key = (
            data.get("status", "?")
            if data.get("status") == "succeeded"
            else (data.get("error") or {}).get("code", "?")
        )
        outcomes[key] = outcomes.get(key, 0) + 1
        if data.get("status") == "succeeded" and data.get("delivery") != "sourceUrl":
            total_bytes += (data.get("source") or {}).get("bytes") or 0  # bytes that went through
    if expect != "any" and outcomes.get(expect, 0) != n:
        raise SystemExit(f"{name}: expected {n} x {expect}, got {outcomes}")
    return Result(
        name,
        n,
        round(elapsed, 3),
        round(n / elapsed, 1),
        round(total_bytes / 1e6 / elapsed, 1),
        round(peak, 1),
        round(idle, 1),
        round(ready_s, 3),
        round(cpu / n * 1000, 3),
        {key: round(value / n * 1000, 3) for key, value in others_cpu.items()},
        outcomes,
        flow=flow,
        moved=moves,
    )


def scenario_env(
    scenario: Scenario, info: dict[str, Any], url: str, names: Names, port: int
) -> dict[str, str]:
    """The environment `courier run` (or the floor) gets for ``scenario``."""
    return {
        **os.environ,
        **info["aws"],
        "AWS_ENDPOINT_URL_S3": info["s3_endpoint"],
        "COURIER_AMQP_URL": url,
        "COURIER_QUEUE": names.queue,
        "COURIER_EVENTS_EXCHANGE": names.events_exchange,
        "COURIER_HTTP_HOST": "127.0.0.1",
        "COURIER_HTTP_PORT": str(port),
        "COURIER_CONCURRENCY": str(scenario.concurrency),
        "COURIER_INCONVO_API_KEY": info["inconvo_key"],
        "COURIER_INCONVO_BASE_URL": info["inconvo"],
        "COURIER_MINDSET_API_KEY": info["mindset_key"],
        "COURIER_MINDSET_BASE_URL": info["mindset"],
        "COURIER_SOURCE_ALLOWED_HOSTS": f"127.0.0.1:{info['files_port']}",
        "COURIER_LOG_LEVEL": "ERROR",
    }


async def run_courier(
    scenario: Scenario,
    n: int,
    info: dict[str, Any],
    url: str,
    others: dict[str, int],
    profile: Path | None = None,
    extra: dict[str, str] | None = None,
    during: Callable[[EventCollector], Any] | None = None,
    checkout: Path = ROOT,
) -> Result:
    """One Courier scenario; with ``profile``, the service runs under cProfile, saved there.

    ``extra``: more environment; ``during``: a coroutine function run beside the
    measurement with the event collector (the flow scenario's faults);
    ``checkout``: the source tree whose `courier run` is measured (for an A/B).
    """
    names = Names.fresh()
    port = free_port()
    env = {**scenario_env(scenario, info, url, names, port), **(extra or {})}
    bodies = [orjson.dumps(scenario.request(info, i)) for i in range(n)]
    http = aiohttp.ClientSession()

    async def ready(_: asyncio.subprocess.Process) -> bool:
        try:
            async with http.get(f"http://127.0.0.1:{port}/readyz") as answer:
                return answer.status == 200
        except aiohttp.ClientError:
            return False

    async def moved() -> int | None:
        async with http.get(f"http://127.0.0.1:{port}/metrics") as answer:
            text = await answer.text()
        # None: a checkout from before the counter (an A/B's other side).
        return int(metric_sum(text, MOVED)) if MOVED in text else None

    profiler = ["-m", "cProfile", "-o", str(profile)] if profile else []

    async def start() -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
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
        return await measure(
            scenario.name,
            n,
            bodies,
            names,
            start,
            ready,
            scenario.expect,
            url,
            others,
            during,
            moved,
        )
    finally:
        await http.close()
        await delete_topology(names, (1, 2, 10, 60, 300, 1800), url)


async def run_floor(
    scenario: Scenario, n: int, info: dict[str, Any], url: str, others: dict[str, int]
) -> Result:
    """The floor (bench/floor.py) on ``scenario``'s requests, measured like Courier."""
    names = Names.fresh()
    env = scenario_env(scenario, info, url, names, free_port())
    bodies = [orjson.dumps(scenario.request(info, i)) for i in range(n)]
    ready_line: dict[int, bool] = {}

    async def start() -> asyncio.subprocess.Process:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.floor", env=env, cwd=ROOT, stdout=asyncio.subprocess.PIPE
        )
        assert proc.stdout is not None
        ready_line[proc.pid] = (await proc.stdout.readline()).strip() == b"ready"
        return proc

    async def ready(proc: asyncio.subprocess.Process) -> bool:
        return ready_line.get(proc.pid, False)

    try:
        return await measure(
            f"floor-{scenario.name}", n, bodies, names, start, ready, "succeeded", url, others
        )
    finally:
        await delete_topology(names, (10, 60, 300, 1800), url)


async def run_bare(n: int, url: str, label: str, others: dict[str, int]) -> Result:
    """The bare aio-pika loop with the same publish-and-wait procedure."""
    names = Names.fresh()
    bodies = [orjson.dumps({"id": f"r{i}", "pad": "x" * 200}) for i in range(n)]
    ready_line: dict[int, bool] = {}

    async def start() -> asyncio.subprocess.Process:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.bare_loop",
            url,
            names.queue,
            names.events_exchange,
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
        )
        assert proc.stdout is not None
        line = await proc.stdout.readline()
        ready_line[proc.pid] = line.strip() == b"ready"
        return proc

    async def ready(proc: asyncio.subprocess.Process) -> bool:
        return ready_line.get(proc.pid, False)

    try:
        result = await measure(label, n, bodies, names, start, ready, "any", url, others)
    finally:
        await delete_topology(names, (10, 60, 300, 1800), url)
    result.outcomes = {"acked": n}
    return result


async def run_copy(info: dict[str, Any], n: int, concurrency: int, peers: int) -> dict[str, Any]:
    """The plain aiohttp copy baseline for `big`."""
    peers_before = cpu_seconds(peers)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.copy_baseline",
        info["files"] + "/big.csv",
        info["inconvo"] + "/datasets/user/copy",
        info["inconvo_key"],
        str(n),
        str(concurrency),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await proc.communicate()
    result = dict(orjson.loads(out))
    result["peers_cpu_ms_per_file"] = (cpu_seconds(peers) - peers_before) / n * 1000
    return result


# Where a function's own time is counted, by the path of its file; first match wins.
COMPONENTS = (
    ("courier", f"{ROOT}/service/"),
    ("aiohttp", "/aiohttp/"),
    ("aio-pika, aiormq, pamqp", "/aio_pika/"),
    ("aio-pika, aiormq, pamqp", "/aiormq/"),
    ("aio-pika, aiormq, pamqp", "/pamqp/"),
    ("pydantic", "/pydantic"),
    ("prometheus_client", "/prometheus_client/"),
    ("botocore, aiobotocore", "botocore/"),
    ("asyncio event loop", "/asyncio/"),
    ("asyncio event loop", "/selectors.py"),
    ("C built-ins (socket calls, hashing, JSON...)", "~"),
)


def profile_summary(path: Path, top: int = 15) -> str:
    """The service's own CPU time by component, and its most expensive functions."""
    functions = pstats.Stats(str(path)).get_stats_profile().func_profiles
    # cProfile's clock is the wall clock: time spent waiting in epoll is idle, not work.
    idle = sum(
        f.tottime for name, f in functions.items() if name.endswith("'select.epoll' objects>")
    )
    functions = {n: f for n, f in functions.items() if not n.endswith("'select.epoll' objects>")}
    total = sum(f.tottime for f in functions.values()) or 1.0
    by_component: dict[str, float] = {}
    for function in functions.values():
        name = next((label for label, part in COMPONENTS if part in function.file_name), "other")
        by_component[name] = by_component.get(name, 0.0) + function.tottime
    lines = [
        f"own time by component (cProfile, which inflates call-heavy code; {idle:.1f} s "
        "idle in epoll left out):"
    ]
    for name, seconds in sorted(by_component.items(), key=lambda item: -item[1]):
        lines.append(f"  {100 * seconds / total:5.1f}%  {name}")
    lines.append(f"top {top} functions by own time:")
    ranked = sorted(functions.items(), key=lambda item: -item[1].tottime)[:top]
    for function_name, function in ranked:
        where = function.file_name.split("site-packages/")[-1].replace(f"{ROOT}/", "")
        lines.append(
            f"  {100 * function.tottime / total:5.1f}%  {function_name} ({where}:{function.line_number})"
        )
    return "\n".join(lines)


def broker_pid(url: str) -> dict[str, int]:
    """The process listening on the broker's port (RabbitMQ's beam), when it runs here.

    Not just any beam: the test suite starts RabbitMQ nodes of its own beside a
    benchmark, and one of them may be gone before the run ends.
    """
    port = URL(url).port or 5672
    sockets = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                # local address, state (0A: listening), inode
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    sockets.add(f"socket:[{fields[9]}]")
    for fds in Path("/proc").glob("[0-9]*/fd"):
        with contextlib.suppress(OSError):
            if any(os.readlink(fd) in sockets for fd in fds.iterdir()):
                return {"broker": int(fds.parent.name)}
    return {}


def machine() -> str:
    """A one-line description of the machine the figures come from."""
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.machine(),
    )
    mem = proc_status_total()
    return f"{os.cpu_count()} cores ({model}), {mem:.0f} GiB RAM, Python {platform.python_version()}, {platform.system()}"


def proc_status_total() -> float:
    """Total memory in GiB."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 1024 / 1024
    return 0.0


def table(results: list[Result]) -> str:
    """The results as a Markdown table."""
    head = (
        "| scenario | N | req/s | MB/s | vs floor | CPU vs floor | vs bare loop | vs copy "
        "| peak RSS MiB | idle RSS MiB | ready s | CPU ms/req | others' CPU ms/req |"
    )
    rows = [head, "|" + "---|" * 13]

    def times(value: float | None) -> str:
        return f"{value:.2f}x" if value is not None else "-"

    for r in results:
        rows.append(
            f"| {r.scenario} | {r.n} | {r.requests_per_s} | {r.mb_per_s} | "
            f"{times(r.ratio_to_floor)} | {times(r.cpu_ratio_to_floor)} | "
            f"{times(r.ratio_to_bare)} | {times(r.ratio_to_copy)} | "
            f"{r.peak_rss_mib} | {r.idle_rss_mib} | {r.ready_s} | {r.cpu_ms_per_request} | "
            + ", ".join(f"{k} {v}" for k, v in r.others_cpu_ms_per_request.items())
            + " |"
        )
    return "\n".join(rows)


def flow_table(results: list[Result]) -> str:
    """The flow scenario's runs: calls made and requests kept, with and without the breaker."""
    rows = [
        "| run | N | succeeded | failed | calls during the outage | 429s during the limit "
        "| seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if r.flow is None:
            continue
        failed = r.n - r.outcomes.get("succeeded", 0)
        rows.append(
            f"| {r.scenario} | {r.n} | {r.outcomes.get('succeeded', 0)} | {failed} | "
            f"{r.flow['calls_during_outage']} ({r.flow['outage_s']:g} s) | "
            f"{r.flow['answered_429']} ({r.flow['rate_limit_s']:g} s at 20/s) | {r.seconds} |"
        )
    return "\n".join(rows)


async def start_servers() -> tuple[asyncio.subprocess.Process, dict[str, Any]]:
    """Start bench/servers.py (the fakes, the file server, S3); it runs until its stdin
    closes. Returns the process and what it printed: where each server listens."""
    servers = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.servers",
        cwd=ROOT,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert servers.stdout is not None
    info: dict[str, Any] = orjson.loads(await servers.stdout.readline())
    return servers, info


async def main() -> int:
    """Run the chosen scenarios and print what they measured."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scenarios", default="small,big,presign,inline,caps,flow")
    parser.add_argument("--flow-outage", type=float, default=10.0, help="seconds (flow)")
    parser.add_argument(
        "--pairs", type=int, default=7, help="alternating Courier/floor runs for small"
    )
    parser.add_argument("--flow-rate-limit", type=float, default=10.0, help="seconds (flow)")
    parser.add_argument("--n", type=int, help="override N for every scenario")
    parser.add_argument("--bare-n", type=int, default=5000)
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results.json")
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="run the service under cProfile, save <scenario>.prof in DIR and print where "
        "its time went (the figures of such a run are not comparable)",
    )
    parser.add_argument(
        "--scenarios-ab", default="small", help="the scenarios --ab compares (default small)"
    )
    parser.add_argument(
        "--ab",
        type=Path,
        metavar="CHECKOUT",
        help="also run each scenario with the `courier run` of another checkout (say, the "
        "last release: git worktree add /tmp/before <commit>), alternating with this one's, "
        "and report this one's req/s as a ratio to it",
    )
    parser.add_argument(
        "--checkout",
        type=Path,
        default=ROOT,
        metavar="DIR",
        help="the checkout whose `courier run` is measured (default this one; with --ab, "
        "to race two other checkouts, say before and after one change)",
    )
    parser.add_argument(
        "--ab-env",
        default="",
        metavar="KEY=VALUE,...",
        help="environment for the --ab side's runs (without --ab: this checkout with it, "
        "for example COURIER_TRACK_INGESTION=false)",
    )
    parser.add_argument(
        "--ab-rounds", type=int, default=3, help="runs of each side in an A/B (alternating)"
    )
    args = parser.parse_args()
    ab_env = dict(item.split("=", 1) for item in args.ab_env.split(",") if item)
    ab_other: Path | None = args.ab or (args.checkout if ab_env else None)
    ab_label = ",".join(
        ([args.ab.name] if args.ab else []) + [f"{k}={v}" for k, v in ab_env.items()]
    )
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    url = os.environ.get("COURIER_AMQP_URL", AMQP_URL)
    servers, info = await start_servers()
    assert servers.stdin is not None
    # Everything else that shares the machine, so each run shows where the CPU went.
    others = {"peers": servers.pid, "harness": os.getpid(), **broker_pid(url)}
    results: list[Result] = []
    copy: dict[str, Any] | None = None
    try:
        # The bare loop runs before and after every scenario, and each scenario's
        # ratio is taken against the faster of its two neighbours: the machine's
        # speed drifts over a run, and a slow moment of it cannot flatter Courier.
        before = await run_bare(args.n or args.bare_n, url, "bare-loop", others)
        results.append(before)
        for name in args.scenarios.split(","):
            scenario = SCENARIOS[name]
            n = args.n or scenario.n
            copies = (
                [await run_copy(info, n, scenario.concurrency, servers.pid)]
                if name == "big"
                else []
            )
            profile = args.profile / f"{name}.prof" if args.profile else None
            if name == "flow":
                faults = flow_faults(info["control"], n, args.flow_outage, args.flow_rate_limit)
                unguarded = await run_courier(
                    scenario,
                    n,
                    info,
                    url,
                    others,
                    extra=NO_BREAKER_ENV,
                    during=faults,
                    checkout=args.checkout,
                )
                unguarded.scenario = "flow-no-breaker"
                results.append(unguarded)
                extra: dict[str, str] | None = FLOW_ENV
            else:
                faults, extra = None, None
            floors = [await run_floor(scenario, n, info, url, others)] if name == "small" else []
            result = await run_courier(
                scenario,
                n,
                info,
                url,
                others,
                profile,
                extra=extra,
                during=faults,
                checkout=args.checkout,
            )
            if profile is not None:
                print(f"{name}: {profile_summary(profile)}", file=sys.stderr, flush=True)
            if ab_other is not None and name in args.scenarios_ab.split(","):
                # This checkout and the other alternate (C O C O ... O): each of this
                # one's runs is held against the mean of the other's beside it, so the
                # machine's drift cancels, and the median of those ratios is reported.
                label = f"{name}@{ab_label}"
                theirs = [
                    await run_courier(
                        scenario, n, info, url, others, extra={**(extra or {}), **ab_env},
                        checkout=ab_other,
                    )
                ]  # fmt: skip
                ours_ab = [result]
                for _ in range(args.ab_rounds - 1):
                    ours_ab.append(
                        await run_courier(
                            scenario,
                            n,
                            info,
                            url,
                            others,
                            extra=extra,
                            during=faults,
                            checkout=args.checkout,
                        )
                    )
                    theirs.append(
                        await run_courier(
                            scenario, n, info, url, others, extra={**(extra or {}), **ab_env},
                            checkout=ab_other,
                        )
                    )  # fmt: skip
                for other in theirs:
                    other.scenario = label
                rates = [o.requests_per_s for o in theirs]
                ratios = [
                    r.requests_per_s / fmean(rates[max(i - 1, 0) : i + 1])
                    for i, r in enumerate(ours_ab)
                ]
                result.ab = round(statistics.median(ratios), 3)
                result.ab_pairs = [round(x, 3) for x in ratios]
                result.ab_rates = (
                    [o.requests_per_s for o in ours_ab], rates
                )  # fmt: skip
                result.ab_moved = ([o.moved for o in ours_ab], [o.moved for o in theirs])
                results += theirs
            if floors:
                # Floor and Courier alternate (F C F C ... F): each Courier run is held
                # against the mean of the floors beside it (drift between them cancels;
                # the faster of the two would score an identical program below 1), and
                # the median of those pairs is reported. The inner floors, each held
                # against its own neighbours the same way, show what noise alone does.
                ours = [result]
                floors.append(await run_floor(scenario, n, info, url, others))
                for _ in range(args.pairs - 1):
                    ours.append(
                        await run_courier(scenario, n, info, url, others, checkout=args.checkout)
                    )
                    floors.append(await run_floor(scenario, n, info, url, others))
                rates = [f.requests_per_s for f in floors]
                cpus = [f.cpu_ms_per_request for f in floors]
                speed = [r.requests_per_s / fmean(rates[i : i + 2]) for i, r in enumerate(ours)]
                cpu = [
                    r.cpu_ms_per_request / fmean(cpus[i : i + 2])
                    for i, r in enumerate(ours)
                    if fmean(cpus[i : i + 2]) > 0
                ]
                aa = [rates[i] / fmean((rates[i - 1], rates[i + 1])) for i in range(1, len(ours))]
                median = ours[sorted(range(len(ours)), key=lambda i: speed[i])[len(ours) // 2]]
                # The A/B belongs to the scenario, not to the run that stands for it.
                median.ab, median.ab_pairs, median.ab_rates, median.ab_moved = (
                    result.ab,
                    result.ab_pairs,
                    result.ab_rates,
                    result.ab_moved,
                )
                result = median
                result.ratio_to_floor = round(statistics.median(speed), 3)
                result.cpu_ratio_to_floor = round(statistics.median(cpu), 3) if cpu else None
                result.pairs = [round(x, 3) for x in speed]
                result.floor_aa = [round(x, 3) for x in aa]
                interleaved = [x for pair in zip(floors, ours, strict=False) for x in pair]
                results += interleaved + floors[len(ours) :]
            if copies:
                # The copy baseline likewise runs before and after; the faster counts.
                copies.append(await run_copy(info, n, scenario.concurrency, servers.pid))
                copy = max(copies, key=lambda c: float(c["mb_per_s"]))
                result.ratio_to_copy = round(result.mb_per_s / copy["mb_per_s"], 3)
            after = await run_bare(args.n or args.bare_n, url, f"bare-loop-after-{name}", others)
            bare_rate = max(before.requests_per_s, after.requests_per_s)
            result.ratio_to_bare = round(result.requests_per_s / bare_rate, 3)
            results += [after] if floors else [result, after]
            before = after
            print(
                f"{name}: {result.requests_per_s} req/s, {result.mb_per_s} MB/s, "
                f"peak {result.peak_rss_mib} MiB (idle {result.idle_rss_mib})",
                file=sys.stderr,
                flush=True,
            )
    finally:
        servers.stdin.close()
        await servers.wait()
    report = {"machine": machine(), "results": [asdict(r) for r in results], "copy_baseline": copy}
    print(f"\nMachine: {report['machine']}\n")
    print(table([r for r in results if r.flow is None]))
    for r in results:
        if r.moved is not None:
            print(f"{r.scenario}: {r.moved} of {r.n} requests moved into tenant queues")
    for r in results:
        if r.pairs:
            print(f"\n{r.scenario} vs floor, each alternating run: {r.pairs}")
            print(f"floor vs its neighbours, the same way (A/A, noise alone): {r.floor_aa}")
        if r.ab is not None and r.ab_rates is not None:
            print(
                f"\n{r.scenario}: {r.ab:.3f}x the req/s of {ab_label} (median of the "
                f"alternating pairs {r.ab_pairs}; req/s here {r.ab_rates[0]}, "
                f"there {r.ab_rates[1]})"
            )
        if r.ab_moved is not None and any(x is not None for side in r.ab_moved for x in side):
            # A lone tenant's replica that read itself as idle moves its own backlog:
            # each run's count shows whether one did, on either side.
            print(
                f"{r.scenario}: requests moved into tenant queues, each alternating run: "
                f"here {r.ab_moved[0]}, there {r.ab_moved[1]}"
            )
    if any(r.flow is not None for r in results):
        print("\n" + flow_table(results))
    if copy:
        print(
            f"\ncopy baseline (plain aiohttp stream, big): {copy['mb_per_s']:.1f} MB/s, "
            f"CPU ms/file {copy['cpu_ms_per_file']:.1f}, peers {copy['peers_cpu_ms_per_file']:.1f}"
        )
    print("\n" + orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
    args.json.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
