"""Run the suite many times under CPU stress and report what flakes: ``make flake`` / ``make soak``.

Each run reshuffles what runs together: the default tier gets a worker count and
an xdist distribution drawn at random (``-n 2/4/6``, ``--dist load/loadfile``),
then the timing tier runs serially, as ``make test`` runs them; ``--tier soak``
runs the soak probes serially instead. A CPU load runs meanwhile: stress-ng when
installed (``apt-get install stress-ng``), else busy Python processes at partial
load, niced. Every phase of every run writes its junit XML (call durations,
timing margins) to the output directory, then ``scripts.flake_report`` reads
them all and prints the report.

    python -m scripts.flake --runs 20                       # the blocking tiers, 20 times
    python -m scripts.flake --runs 2 tests/broker/test_settle.py
    python -m scripts.flake --tier soak --runs 50 tests/broker/test_gate.py
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from scripts import flake_report

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TIER = "not timing and not soak"
NO_TESTS = 5  # pytest's exit status when the selection holds no test of a phase

# A duty cycle for the fallback load: busy for `load` of every 100 ms.
_BUSY = """
import sys, time
load = float(sys.argv[1])
while True:
    end = time.monotonic() + 0.1 * load
    while time.monotonic() < end:
        pass
    time.sleep(0.1 * (1 - load))
"""


@contextlib.contextmanager
def cpu_stress(load: float, nice: int) -> Iterator[str]:
    """A CPU load of ``load`` (0..1) on every core while the block runs; yields what it is."""
    if load <= 0:
        yield "no stress"
        return
    cores = os.cpu_count() or 1
    if shutil.which("stress-ng"):
        command = [
            "stress-ng",
            "--cpu",
            str(cores),
            "--cpu-load",
            str(round(load * 100)),
            "--quiet",
        ]
        procs = [
            subprocess.Popen(  # noqa: S603
                command,
                start_new_session=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,  # its "finished prematurely" when stopped
            )
        ]
        what = f"stress-ng --cpu {cores} --cpu-load {round(load * 100)}"
    else:
        command = ["nice", "-n", str(nice), sys.executable, "-c", _BUSY, str(load)]
        procs = [
            subprocess.Popen(command, start_new_session=True)  # noqa: S603
            for _ in range(cores)
        ]
        what = f"{cores} busy Python processes at {load:.0%}, nice {nice} (no stress-ng)"
    try:
        yield what
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def phases(
    tier: str, rng: random.Random, workers: Sequence[int], dists: Sequence[str]
) -> list[tuple[str, list[str]]]:
    """The pytest phases of one run: (name, arguments)."""
    if tier == "soak":
        return [("soak", ["-m", "soak", "-p", "no:xdist"])]
    n, dist = rng.choice(workers), rng.choice(dists)
    return [
        ("default", ["-m", DEFAULT_TIER, "-n", str(n), "--dist", dist]),
        ("timing", ["-m", "timing", "-p", "no:xdist"]),
    ]


def main(argv: Sequence[str] | None = None) -> int:
    """Run, then print the report; exit 1 when any test failed in any run."""
    parser = argparse.ArgumentParser(
        prog="python -m scripts.flake", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "tests", nargs="*", default=["tests"], help="test paths or ids (default: tests)"
    )
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--tier", choices=["blocking", "soak"], default="blocking")
    parser.add_argument("--out", type=Path, default=None, help="default: .flake or .soak")
    parser.add_argument(
        "--stress", type=float, default=0.6, help="CPU load per core, 0..1 (0: none)"
    )
    parser.add_argument("--nice", type=int, default=5, help="niceness of the fallback load")
    parser.add_argument("--workers", default="2,4,6", help="worker counts to draw from")
    parser.add_argument("--dists", default="load,loadfile", help="xdist distributions to draw from")
    parser.add_argument("--seed", type=int, default=None, help="for a repeatable shuffle")
    parser.add_argument("--all", action="store_true", help="list every test in the report")
    args = parser.parse_args(argv)

    out = args.out or ROOT / (".soak" if args.tier == "soak" else ".flake")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 30)
    rng = random.Random(seed)  # noqa: S311 - a shuffle, not a secret
    workers = [int(w) for w in args.workers.split(",")]
    dists = args.dists.split(",")
    runs: list[dict[str, object]] = []
    print(f"{args.runs} runs of {' '.join(args.tests)} ({args.tier}), seed {seed}, into {out}")
    for run in range(1, args.runs + 1):
        for phase, extra in phases(args.tier, rng, workers, dists):
            stem = f"run-{run:03d}-{phase}"
            command = [
                sys.executable,
                "-m",
                "pytest",
                *args.tests,
                *extra,
                "-p",
                "no:cacheprovider",
                "-q",
                f"--junitxml={out / (stem + '.xml')}",
                "-o",
                "junit_duration_report=call",
            ]
            began = time.monotonic()
            with (
                cpu_stress(args.stress, args.nice) as stress,
                (out / f"{stem}.log").open("wb") as log,
            ):
                code = subprocess.call(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)  # noqa: S603
            seconds = round(time.monotonic() - began, 1)
            shown = " ".join(shlex.quote(a) for a in extra)
            runs.append(
                {"run": run, "phase": phase, "args": shown, "code": code, "seconds": seconds}
            )
            tail = (out / f"{stem}.log").read_text(errors="replace").strip().splitlines()[-1:]
            verdict = "no tests" if code == NO_TESTS else (tail[0] if tail else f"exit {code}")
            print(f"run {run}/{args.runs} {phase} ({shown}; {stress}): {verdict}", flush=True)
    (out / "runs.json").write_text(json.dumps(runs, indent=1))
    print()
    # A soak run has few tests, each a probe: every one's failure rate is shown.
    show_all = args.all or args.tier == "soak"
    status = flake_report.main([str(out), *(["--all"] if show_all else [])])
    broken = [r for r in runs if r["code"] not in (0, 1, NO_TESTS)]
    if broken:
        print(f"\n{len(broken)} phases ended abnormally (interrupted, internal error): {broken}")
        return 2
    return status


if __name__ == "__main__":
    sys.exit(main())
