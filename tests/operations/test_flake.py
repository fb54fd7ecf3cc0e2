"""`make flake`'s parts: the timing helper's margins, the report over junit files, the shuffle."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from scripts import flake, flake_report
from testbed.timing import assert_at_least, assert_within

RUN_1 = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" tests="4">
  <testcase classname="tests.broker.test_gate" name="test_probe" time="2.0">
    <properties><property name="timing:cancel" value="0.30"/></properties>
  </testcase>
  <testcase classname="tests.broker.test_gate" name="test_probe[x]" time="1.0">
    <failure message="AssertionError: took 8.3s, over the bound">trace</failure>
  </testcase>
  <testcase classname="tests.flow.test_flow.TestBreaker" name="test_opens" time="0.5">
    <skipped message="why"/>
  </testcase>
  <testcase classname="tests.sources.test_spool" name="test_fd" time="0.1">
    <properties><property name="floor:paced" value="0.97"/></properties>
  </testcase>
  <testcase classname="tests.sources.test_spool" name="test_fd" time="0.0">
    <error message="failed on teardown with ResourceWarning">trace</error>
  </testcase>
</testsuite></testsuites>
"""

RUN_2 = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" tests="3">
  <testcase classname="tests.broker.test_gate" name="test_probe" time="4.0">
    <properties><property name="timing:cancel" value="0.70"/></properties>
  </testcase>
  <testcase classname="tests.broker.test_gate" name="test_probe[x]" time="3.0">
    <failure message="AssertionError: took 8.9s, over the bound">trace</failure>
  </testcase>
  <testcase classname="tests.sources.test_spool" name="test_fd" time="0.2">
    <properties><property name="floor:paced" value="0.98"/></properties>
  </testcase>
</testsuite></testsuites>
"""


def test_the_report_counts_each_test_over_the_runs(tmp_path: Path) -> None:
    """Runs, failures (a failed call plus teardown once), distinct messages, p50/p95, worst margin."""
    (tmp_path / "run-001-default.xml").write_text(RUN_1)
    (tmp_path / "run-002-default.xml").write_text(RUN_2)
    report = flake_report.read(tmp_path)
    probe = report.tests["tests/broker/test_gate.py::test_probe"]
    assert (probe.runs, probe.failures) == (2, 0)
    assert probe.durations == [2.0, 4.0]
    assert probe.margins == {"cancel": [0.30, 0.70]}
    failing = report.tests["tests/broker/test_gate.py::test_probe[x]"]
    assert (failing.runs, failing.failures, failing.rate) == (2, 2, 1.0)
    assert failing.messages == {"AssertionError: took #s, over the bound": 2}
    spool = report.tests["tests/sources/test_spool.py::test_fd"]
    assert (spool.runs, spool.failures) == (2, 1)
    assert report.tests["tests/flow/test_flow.py::TestBreaker::test_opens"].skips == 1
    text = flake_report.render(report)
    assert "2 junit files, 4 test ids" in text
    assert "    2     2 100.0%    1.00    3.00  tests/broker/test_gate.py::test_probe[x]" in text
    assert "2x AssertionError: took #s, over the bound" in text
    assert "    2   0.70   0.70  cancel / tests/broker/test_gate.py::test_probe  THIN" in text
    assert spool.floors == {"paced": [0.97, 0.98]}
    assert "    2   0.98  paced / tests/sources/test_spool.py::test_fd" in text
    probe.floors["slept"] = [0.5]  # two tests with floors: ordered by test id
    assert "slept / tests/broker/test_gate.py::test_probe" in flake_report.render(report)
    assert "THIN" not in text.split("Floors")[1]
    assert flake_report.main([str(tmp_path)]) == 1
    rows = (tmp_path / "report.tsv").read_text().splitlines()
    assert rows[0].startswith("test\truns\tfailures")
    assert len(rows) == 1 + 4


def test_percentiles_are_nearest_rank() -> None:
    """p50 and p95 of a handful of durations are durations that happened."""
    values = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert flake_report.percentile(values, 0.5) == 3.0
    assert flake_report.percentile(values, 0.95) == 5.0
    assert flake_report.percentile([7.0], 0.95) == 7.0


def test_an_empty_directory_is_no_report(tmp_path: Path) -> None:
    """No junit file: an error, not an empty report that looks like a clean one."""
    assert flake_report.main([str(tmp_path)]) == 2


def test_a_bound_records_its_margin(request: pytest.FixtureRequest) -> None:
    """assert_within records measured/bound as a `timing:` property, the worst of its calls."""
    assert_within("ready", 2.0, 10.0)
    assert_within("ready", 5.0, 10.0)
    assert_within("ready", 1.0, 10.0)
    assert_at_least("paced", 2.0, 1.5)
    assert ("timing:ready", 0.5) in request.node.user_properties
    assert ("floor:paced", 0.75) in request.node.user_properties
    assert [k for k, _ in request.node.user_properties].count("timing:ready") == 1


def test_a_broken_bound_fails_with_its_name_and_is_recorded(
    request: pytest.FixtureRequest,
) -> None:
    """Over the bound (or under the floor): an AssertionError naming it; the margin is kept."""
    with pytest.raises(AssertionError, match=r"exit: 9\.000s, over the bound of 8\.000s"):
        assert_within("exit", 9.0, 8.0)
    with pytest.raises(AssertionError, match="under the floor"):
        assert_at_least("paced", 1.0, 1.75)
    assert ("timing:exit", 1.125) in request.node.user_properties


def test_each_run_draws_workers_and_a_distribution() -> None:
    """The default tier gets a drawn -n and --dist, then the timing tier runs serially."""
    rng = random.Random(7)
    drawn = {
        tuple(flake.phases("blocking", rng, [2, 4, 6], ["load", "loadfile"])[0][1][3:])
        for _ in range(50)
    }
    assert drawn == {(str(n), "--dist", d) for n in (2, 4, 6) for d in ("load", "loadfile")}
    default, timing = flake.phases("blocking", rng, [2], ["load"])
    assert default == ("default", ["-m", flake.DEFAULT_TIER, "-n", "2", "--dist", "load"])
    assert timing == ("timing", ["-m", "timing", "-p", "no:xdist"])
    assert flake.phases("soak", rng, [2], ["load"]) == [("soak", ["-m", "soak", "-p", "no:xdist"])]
