"""The benchmark runs end to end (tiny N); it asserts what it reports, never timings."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import orjson

from tests.support import ROOT

SCENARIOS = ("small", "big", "presign", "inline", "caps")


async def test_bench_runs_every_scenario(tmp_path: Path) -> None:
    """`python -m bench.run` with a tiny N prints the table, a JSON report and a profile for every scenario."""
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
    # The bare loop before and after every scenario.
    assert order == ["bare-loop"] + [
        row for name in SCENARIOS for row in (name, f"bare-loop-after-{name}")
    ]
    rows = {r["scenario"]: r for r in report["results"]}
    for name in SCENARIOS:
        row = rows[name]
        neighbours = order[order.index(name) - 1], order[order.index(name) + 1]
        best_bare = max(rows[other]["requests_per_s"] for other in neighbours)
        assert row["n"] == 4
        assert row["requests_per_s"] > 0 and row["peak_rss_mib"] >= row["idle_rss_mib"] > 0
        # With N = 4 the CPU time may round to zero clock ticks.
        assert row["cpu_ms_per_request"] >= 0
        assert row["ratio_to_bare"] == round(row["requests_per_s"] / best_bare, 3)
        assert f"| {name} | 4 |" in text
    assert rows["small"]["outcomes"] == {"succeeded": 4}
    assert rows["caps"]["outcomes"] == {"too_large": 4}
    assert report["copy_baseline"]["files"] == 4
    # --profile: the service ran under cProfile; where its time went is printed per scenario.
    for name in SCENARIOS:
        assert (tmp_path / "profiles" / f"{name}.prof").stat().st_size > 0
        assert f"{name}: own time by component" in err.decode()
    assert "courier" in err.decode() and "aiohttp" in err.decode()
    assert rows["big"]["ratio_to_copy"] == round(
        rows["big"]["mb_per_s"] / report["copy_baseline"]["mb_per_s"], 3
    )


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
