"""What many runs of the suite say about each test: ``python -m scripts.flake_report DIR``.

Reads every junit XML file in DIR (``make flake`` and ``make soak`` write one per
run and phase, with ``-o junit_duration_report=call``) and prints, per test id:
how many runs it had, how many failed (a failure or an error, in any phase), its
distinct failure messages, its call duration (p50 and p95), and for every timing
bound it checked (``testbed/timing.py`` records them as ``timing:<name>``
properties) the worst and the p95 margin over the runs. A margin is the share
of the bound used: over 0.5 at p95 is flagged as thin, a failure waiting to
happen. Every test's row also goes to DIR/report.tsv.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

TIMING = "timing:"
FLOOR = "floor:"
THIN = 0.5  # a p95 margin above this is flagged
MESSAGE_CHARS = 160


@dataclass
class TestStats:
    """Everything the runs said about one test id."""

    test_id: str
    runs: int = 0
    failures: int = 0
    skips: int = 0
    durations: list[float] = field(default_factory=list)
    messages: dict[str, int] = field(default_factory=dict)  # normalised message: how often
    margins: dict[str, list[float]] = field(default_factory=dict)  # bound: one per run
    floors: dict[str, list[float]] = field(default_factory=dict)  # floor: one per run

    @property
    def rate(self) -> float:
        """Failures per run."""
        return self.failures / self.runs if self.runs else 0.0


@dataclass
class Report:
    """The tests, and the files read."""

    tests: dict[str, TestStats]
    files: list[Path]
    runs: list[dict[str, object]]  # what the runner wrote to runs.json, if anything


def percentile(values: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile (``fraction`` in 0..1) of ``values``; NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def test_id(classname: str, name: str) -> str:
    """``tests.broker.test_gate`` and ``test_x`` as pytest names them:
    ``tests/broker/test_gate.py::test_x``."""
    parts = classname.split(".")
    classes: list[str] = []
    while parts and parts[-1][:1].isupper():  # test classes inside the module
        classes.insert(0, parts.pop())
    module = "/".join(parts) + ".py" if parts else "?"
    return "::".join([module, *classes, name])


def normalise(message: str) -> str:
    """A failure message's first line with numbers blurred: "took 8.3s" and "took 8.9s"
    are one message."""
    line = message.strip().splitlines()[0] if message.strip() else "(no message)"
    line = re.sub(r"0x[0-9a-f]+", "0x#", line)
    line = re.sub(r"\b[0-9a-f]{8,}\b", "<hex>", line)
    line = re.sub(r"\d+(\.\d+)?", "#", line)
    return line[:MESSAGE_CHARS]


def _cases(path: Path) -> Iterable[ET.Element]:
    root = ET.parse(path).getroot()  # noqa: S314 - see the import
    return root.iter("testcase")


def read(directory: Path) -> Report:
    """Every junit XML file under ``directory``, read into one report."""
    tests: dict[str, TestStats] = {}
    files = sorted(directory.glob("*.xml"))
    for path in files:
        seen: set[str] = set()
        failed: set[str] = set()  # a test whose call and teardown both failed: one failed run
        for case in _cases(path):
            tid = test_id(case.get("classname", ""), case.get("name", ""))
            stats = tests.setdefault(tid, TestStats(tid))
            if tid not in seen:  # a failing teardown repeats the test case in the file
                seen.add(tid)
                stats.runs += 1
                stats.durations.append(float(case.get("time", "0") or 0))
                stats.skips += any(e.tag == "skipped" for e in case)
            problems = [e for e in case if e.tag in ("failure", "error")]
            if problems and tid not in failed:
                failed.add(tid)
                stats.failures += 1
            for problem in problems:
                key = normalise(problem.get("message") or problem.text or "")
                stats.messages[key] = stats.messages.get(key, 0) + 1
            for prop in case.iter("property"):
                name = prop.get("name", "")
                for prefix, into in ((TIMING, stats.margins), (FLOOR, stats.floors)):
                    if name.startswith(prefix):
                        try:
                            value = float(prop.get("value", "nan"))
                        except ValueError:
                            continue
                        into.setdefault(name[len(prefix) :], []).append(value)
    runs: list[dict[str, object]] = []
    if (directory / "runs.json").exists():
        runs = json.loads((directory / "runs.json").read_text())
    return Report(tests, files, runs)


def _fmt(seconds: float) -> str:
    return "-" if math.isnan(seconds) else f"{seconds:.2f}"


def render(report: Report, *, show_all: bool = False, slowest: int = 20) -> str:
    """The report as text, for people."""
    tests = list(report.tests.values())
    lines = []
    total_runs = max((t.runs for t in tests), default=0)
    failing = sorted((t for t in tests if t.failures), key=lambda t: (-t.rate, t.test_id))
    lines.append(
        f"{len(report.files)} junit files, {len(tests)} test ids, up to {total_runs} runs each; "
        f"{len(failing)} tests failed at least once"
    )
    for run in report.runs:
        lines.append(
            "  run {run} {phase}: {args} -> exit {code} in {seconds}s".format_map(
                {k: run.get(k, "?") for k in ("run", "phase", "args", "code", "seconds")}
            )
        )
    header = f"{'runs':>5} {'fail':>5} {'rate':>6} {'p50 s':>7} {'p95 s':>7}  test"
    if failing:
        lines += ["", "Tests that failed:", header]
        for t in failing:
            lines.append(_row(t))
            for message, count in sorted(t.messages.items(), key=lambda kv: -kv[1]):
                lines.append(f"{'':>34}{count}x {message}")
    bounds = sorted(
        ((t, name, values) for t in tests for name, values in t.margins.items()),
        key=lambda item: -max(item[2]),
    )
    lines += ["", "Timing bounds (margin = share of the bound used; worst over the runs):"]
    if bounds:
        lines.append(f"{'runs':>5} {'worst':>6} {'p95':>6}  bound / test")
        for t, name, values in bounds:
            p95 = percentile(values, 0.95)
            flag = "  THIN" if p95 > THIN else ""
            lines.append(
                f"{len(values):>5} {max(values):>6.2f} {p95:>6.2f}  {name} / {t.test_id}{flag}"
            )
    else:
        lines.append("  (none recorded)")
    floors = sorted(
        ((t, name, v) for t in tests for name, v in t.floors.items()),
        key=lambda item: (item[0].test_id, item[1]),
    )
    if floors:
        lines += [
            "",
            "Floors (must take at least so long; floor/measured, load cannot break them):",
        ]
        lines.append(f"{'runs':>5} {'worst':>6}  floor / test")
        for t, name, values in floors:
            lines.append(f"{len(values):>5} {max(values):>6.2f}  {name} / {t.test_id}")
    if show_all:
        lines += ["", "Every test:", header]
        lines += [_row(t) for t in sorted(tests, key=lambda t: t.test_id)]
    else:
        slow = sorted(tests, key=lambda t: -percentile(t.durations, 0.95))[:slowest]
        lines += ["", f"Slowest {len(slow)} (p95 of the call):", header]
        lines += [_row(t) for t in slow]
    return "\n".join(lines)


def _row(t: TestStats) -> str:
    return (
        f"{t.runs:>5} {t.failures:>5} {t.rate:>6.1%} {_fmt(percentile(t.durations, 0.5)):>7} "
        f"{_fmt(percentile(t.durations, 0.95)):>7}  {t.test_id}"
    )


def write_tsv(report: Report, path: Path) -> None:
    """Every test id's row, tab-separated, for a spreadsheet or a diff between runs."""
    rows = ["test\truns\tfailures\tskips\tp50_s\tp95_s\tworst_margin\tmessages"]
    for t in sorted(report.tests.values(), key=lambda t: t.test_id):
        worst = max((max(v) for v in t.margins.values()), default=math.nan)
        messages = " | ".join(t.messages)
        rows.append(
            f"{t.test_id}\t{t.runs}\t{t.failures}\t{t.skips}\t{_fmt(percentile(t.durations, 0.5))}"
            f"\t{_fmt(percentile(t.durations, 0.95))}\t{_fmt(worst)}\t{messages}"
        )
    path.write_text("\n".join(rows) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Print the report of DIR; exit 1 when any test failed in any run."""
    parser = argparse.ArgumentParser(prog="python -m scripts.flake_report", description=__doc__)
    parser.add_argument("directory", type=Path)
    parser.add_argument("--all", action="store_true", help="list every test, not the slowest")
    args = parser.parse_args(argv)
    report = read(args.directory)
    if not report.files:
        print(f"no junit XML files in {args.directory}", file=sys.stderr)
        return 2
    print(render(report, show_all=args.all))
    write_tsv(report, args.directory / "report.tsv")
    return 1 if any(t.failures for t in report.tests.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
