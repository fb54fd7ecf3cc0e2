"""The benchmark runs end to end (tiny N); it asserts what it reports, never timings."""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
from pathlib import Path

import orjson
import pytest

from bench.run import broker_pid
from testbed.support import ROOT

SCENARIOS = ("small", "big", "presign", "inline", "caps", "flow")


@pytest.mark.soak
@pytest.mark.timeout(300)
async def test_bench_runs_every_scenario(tmp_path: Path) -> None:
    """`python -m bench.run` with a tiny N prints the table, a JSON report and a profile for every scenario.

    In the soak tier (`make soak`), though it probes no race: it runs the whole
    benchmark (some twenty processes, the machine's broker at full tilt, 45-55 s), so
    in the parallel phase it would take the two cores and the broker from every test
    beside it, and in the serial phase it would make `make test` a third slower.
    """
    report_path = tmp_path / "results.json"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.run",
        "--n",
        "4",
        "--bare-n",
        "20",
        "--scenarios",
        ",".join(SCENARIOS),
        "--pairs",
        "2",
        "--scenarios-ab",
        "small",
        "--ab",
        str(ROOT),
        "--ab-rounds",
        "2",
        "--flow-outage",
        "1",
        "--flow-rate-limit",
        "1",
        "--json",
        str(report_path),
        "--profile",
        str(tmp_path / "profiles"),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 240)
    assert proc.returncode == 0, err.decode()[-3000:]
    text = out.decode()
    assert "| scenario | N | req/s |" in text
    assert "Machine: " in text
    report = orjson.loads(report_path.read_bytes())
    order = [r["scenario"] for r in report["results"]]
    # The bare loop before and after every scenario; around small, the floor alternating
    # with Courier (F C F C F); before flow, the same run without the breaker.
    expected = ["bare-loop"]
    for name in SCENARIOS:
        if name == "small":
            expected += [f"small@{ROOT.name}"] * 2
            expected += ["floor-small", "small", "floor-small", "small", "floor-small"]
        elif name == "flow":
            expected += ["flow-no-breaker", "flow"]
        else:
            expected.append(name)
        expected.append(f"bare-loop-after-{name}")
    assert order == expected
    rows = {r["scenario"]: r for r in report["results"] if r["scenario"] != "small" or r["pairs"]}
    for name in SCENARIOS:
        row = rows[name]
        after = order.index(f"bare-loop-after-{name}")
        before = (
            after
            - 1
            - order[after - 1 :: -1].index(
                next(o for o in order[after - 1 :: -1] if o.startswith("bare-loop"))
            )
        )
        best_bare = max(rows[order[i]]["requests_per_s"] for i in (before, after))
        assert row["n"] == 4
        assert row["requests_per_s"] > 0 and row["peak_rss_mib"] >= row["idle_rss_mib"] > 0
        # With N = 4 the CPU time may round to zero clock ticks.
        assert row["cpu_ms_per_request"] >= 0
        assert row["ratio_to_bare"] == round(row["requests_per_s"] / best_bare, 3)
        assert f"| {name} | 4 |" in text
    small = rows["small"]
    assert len(small["pairs"]) == 2 and small["ratio_to_floor"] > 0
    assert len(small["floor_aa"]) == 1 and small["floor_aa"][0] > 0  # the inner floor's A/A
    assert "(A/A, noise alone)" in text
    assert "| floor-small | 4 |" in text and "vs floor, each alternating run" in text
    flow = {r["scenario"]: r for r in report["results"] if r["flow"]}
    assert set(flow) == {"flow", "flow-no-breaker"}
    for run in flow.values():
        assert set(run["flow"]) == {
            "outage_s",
            "calls_during_outage",
            "rate_limit_s",
            "answered_429",
        }
        assert sum(run["outcomes"].values()) == 4
    assert "| run | N | succeeded | failed | calls during the outage |" in text
    # --ab: the same checkout as its own baseline, alternating, for `small` only.
    assert f"small: {small['ab']:.3f}x the req/s of {ROOT.name} (median of the" in text
    assert len(small["ab_pairs"]) == 2
    assert small["ab"] == pytest.approx(statistics.median(small["ab_pairs"]), abs=0.001)
    # Each alternating run's moves into tenant queues, on both sides (one tenant here).
    here, there = small["ab_moved"]
    assert len(here) == len(there) == 2
    assert all(isinstance(m, int) and 0 <= m <= 4 for m in here + there)
    assert f"small: requests moved into tenant queues, each alternating run: here {here}" in text
    assert rows["small"]["outcomes"] == {"succeeded": 4}
    assert rows["caps"]["outcomes"] == {"too_large": 4}
    assert report["copy_baseline"]["files"] == 4
    # --profile: the service ran under cProfile; where its time went is printed per scenario.
    for name in SCENARIOS:
        if name == "flow":
            continue  # its faults run beside the measurement; not profiled
        assert (tmp_path / "profiles" / f"{name}.prof").stat().st_size > 0
        assert f"{name}: own time by component" in err.decode()
    assert "courier" in err.decode() and "aiohttp" in err.decode()
    assert rows["big"]["ratio_to_copy"] == round(
        rows["big"]["mb_per_s"] / report["copy_baseline"]["mb_per_s"], 3
    )


@pytest.mark.timeout(120)
async def test_bench_runs_small_against_its_floor(tmp_path: Path) -> None:
    """The soak run's twin in `make test`: `python -m bench.run` for `small` alone (one floor/Courier pair, tiny N) prints its table and a JSON report whose ratios are its own figures.

    In the default tier: it asserts no time, and its fifteen seconds are mostly
    waits (a second of idle memory per run, processes booting), so beside other
    tests it costs the parallel phase a few seconds of CPU where alone it would cost
    the serial phase all fifteen.
    """
    report_path = tmp_path / "results.json"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.run",
        "--n",
        "4",
        "--bare-n",
        "20",
        "--scenarios",
        "small",
        "--pairs",
        "1",
        "--json",
        str(report_path),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 100)
    assert proc.returncode == 0, err.decode()[-3000:]
    text = out.decode()
    assert "| scenario | N | req/s |" in text and "| small | 4 |" in text
    report = orjson.loads(report_path.read_bytes())
    order = [r["scenario"] for r in report["results"]]
    assert order == ["bare-loop", "floor-small", "small", "floor-small", "bare-loop-after-small"]
    small = next(r for r in report["results"] if r["scenario"] == "small" and r["pairs"])
    best_bare = max(
        r["requests_per_s"] for r in report["results"] if r["scenario"].startswith("bare")
    )
    assert small["n"] == 4 and small["outcomes"] == {"succeeded": 4}
    assert small["ratio_to_bare"] == round(small["requests_per_s"] / best_bare, 3)
    assert len(small["pairs"]) == 1 and small["ratio_to_floor"] > 0


@pytest.mark.timeout(180)  # two S3 servers and the bench to boot: 12 s alone, 49 s under load
async def test_s3_head_bench_reports_both_checks() -> None:
    """`python -m bench.s3_head` prints CPU per check, both ways, against both servers."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.s3_head",
        "10",
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()[-3000:]
    report = orjson.loads(out)
    assert set(report) == {"moto", "keep_alive"}
    for figures in report.values():
        assert set(figures) == {"botocore_head_object_cpu_ms", "presigned_head_cpu_ms"}
        assert all(value > 0 for value in figures.values())


async def test_the_broker_measured_is_the_process_on_its_port() -> None:
    """Not any RabbitMQ: the one listening on the benchmark's port (tests start others)."""
    server = await asyncio.start_server(lambda _r, _w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        assert broker_pid(f"amqp://guest:guest@127.0.0.1:{port}/") == {"broker": os.getpid()}
    finally:
        server.close()
        await server.wait_closed()
    assert broker_pid(f"amqp://guest:guest@127.0.0.1:{port}/") == {}
