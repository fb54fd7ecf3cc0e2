"""`make bench`: Courier's throughput and memory, measured against a bare aio-pika loop.

Starts the project's fakes and file server in a separate process, runs
`courier run` as a subprocess exactly as a user would, publishes N requests,
waits for N terminal events, and prints a table and JSON. The same run
measures the bare loop before and after every scenario (each ratio uses the
faster of its two neighbours) and, before and after `big`, a plain aiohttp
copy (the faster counts) as baselines.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import pstats
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import orjson

from tests.support import AMQP_URL, EventCollector, Names, delete_topology, free_port

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
    "small": Scenario("small", 5000, 32, _inconvo("/small.csv")),
    "big": Scenario("big", 200, 32, _inconvo("/big.csv")),
    "presign": Scenario("presign", 5000, 32, _presign),
    "inline": Scenario("inline", 5000, 32, _inline),
    "caps": Scenario("caps", 64, 32, _caps, expect="too_large"),
}


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


async def publish_all(url: str, queue: str, bodies: list[bytes]) -> None:
    """Publish every body (confirmed), a few hundred in flight at a time."""
    async with await aio_pika.connect(url) as connection:
        channel = await connection.channel(publisher_confirms=True)
        for start in range(0, len(bodies), 500):
            await asyncio.gather(
                *(
                    channel.default_exchange.publish(
                        aio_pika.Message(body=body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                        routing_key=queue,
                        timeout=60,
                    )
                    for body in bodies[start : start + 500]
                )
            )


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
) -> Result:
    """Start a consumer process, publish ``bodies``, wait for every event; measure."""
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
            began = time.monotonic()
            await publish_all(url, names.queue, bodies)
            await collector.wait_for(n, timeout=1800)
            elapsed = collector.arrivals[n - 1] - began
            peak = proc_status(proc.pid, "VmHWM")
            cpu = cpu_seconds(proc.pid) - cpu_before
            others_cpu = {key: cpu_seconds(pid) - others_before[key] for key, pid in others.items()}
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
    )


async def run_courier(
    scenario: Scenario,
    n: int,
    info: dict[str, Any],
    url: str,
    others: dict[str, int],
    profile: Path | None = None,
) -> Result:
    """One Courier scenario; with ``profile``, the service runs under cProfile, saved there."""
    names = Names.fresh()
    port = free_port()
    env = {
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
    bodies = [orjson.dumps(scenario.request(info, i)) for i in range(n)]
    http = aiohttp.ClientSession()

    async def ready(_: asyncio.subprocess.Process) -> bool:
        try:
            async with http.get(f"http://127.0.0.1:{port}/readyz") as answer:
                return answer.status == 200
        except aiohttp.ClientError:
            return False

    profiler = ["-m", "cProfile", "-o", str(profile)] if profile else []

    async def start() -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            *profiler,
            "-m",
            "service",
            "run",
            env=env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
        )

    try:
        return await measure(
            scenario.name, n, bodies, names, start, ready, scenario.expect, url, others
        )
    finally:
        await http.close()
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


def broker_pid() -> dict[str, int]:
    """The local RabbitMQ's process (Erlang's beam), when it runs on this machine."""
    for stat in Path("/proc").glob("[0-9]*/comm"):
        try:
            if stat.read_text().startswith("beam"):
                return {"broker": int(stat.parent.name)}
        except OSError:
            continue
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
        "| scenario | N | req/s | MB/s | vs bare loop | vs copy | peak RSS MiB | idle RSS MiB "
        "| ready s | CPU ms/req | others' CPU ms/req |"
    )
    rows = [head, "|" + "---|" * 11]
    for r in results:
        ratio = f"{r.ratio_to_bare:.2f}x" if r.ratio_to_bare is not None else "-"
        copy = f"{r.ratio_to_copy:.2f}x" if r.ratio_to_copy is not None else "-"
        rows.append(
            f"| {r.scenario} | {r.n} | {r.requests_per_s} | {r.mb_per_s} | {ratio} | {copy} | "
            f"{r.peak_rss_mib} | {r.idle_rss_mib} | {r.ready_s} | {r.cpu_ms_per_request} | "
            + ", ".join(f"{k} {v}" for k, v in r.others_cpu_ms_per_request.items())
            + " |"
        )
    return "\n".join(rows)


async def main() -> int:
    """Run the chosen scenarios and print what they measured."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scenarios", default="small,big,presign,inline,caps")
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
    args = parser.parse_args()
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    url = os.environ.get("COURIER_AMQP_URL", AMQP_URL)
    servers = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.servers",
        cwd=ROOT,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert servers.stdout is not None and servers.stdin is not None
    info = orjson.loads(await servers.stdout.readline())
    # Everything else that shares the machine, so each run shows where the CPU went.
    others = {"peers": servers.pid, "harness": os.getpid(), **broker_pid()}
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
            result = await run_courier(scenario, n, info, url, others, profile)
            if profile is not None:
                print(f"{name}: {profile_summary(profile)}", file=sys.stderr, flush=True)
            if copies:
                # The copy baseline likewise runs before and after; the faster counts.
                copies.append(await run_copy(info, n, scenario.concurrency, servers.pid))
                copy = max(copies, key=lambda c: float(c["mb_per_s"]))
                result.ratio_to_copy = round(result.mb_per_s / copy["mb_per_s"], 3)
            after = await run_bare(args.n or args.bare_n, url, f"bare-loop-after-{name}", others)
            bare_rate = max(before.requests_per_s, after.requests_per_s)
            result.ratio_to_bare = round(result.requests_per_s / bare_rate, 3)
            results += [result, after]
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
    print(table(results))
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
