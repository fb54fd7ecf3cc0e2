"""The order in which test files reach pytest-xdist's workers: the longest first.

`make test` gives each worker whole files (``--dist loadfile``). Handed out in
collection order, one worker could start a 30 s file when the others were nearly
done and the run waited for it alone. Handed out longest first (``--no-loadscope-
reorder`` keeps this order), the last files to start are the short ones and the
workers finish close together: the longest-processing-time rule.

Each file's seconds (set-up, call and teardown of its tests, summed) are in
``tests/durations.json``; ``make durations`` measures them again. A file it does not
know yet goes after those it knows. The order only decides when a file starts, never
what it does: tests inside a file keep theirs.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import orjson
import pytest

DURATIONS = Path(__file__).resolve().parent.parent / "tests" / "durations.json"
_STORE = "--store-durations"


def pytest_addoption(parser: pytest.Parser) -> None:
    """``--store-durations``: write each file's seconds of this run to tests/durations.json."""
    parser.addoption(_STORE, action="store_true", help="write tests/durations.json")


def _file(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


def known() -> dict[str, float]:
    """The stored seconds per test file (none when the file is missing)."""
    if not DURATIONS.is_file():
        return {}
    return {str(k): float(v) for k, v in orjson.loads(DURATIONS.read_bytes()).items()}


def longest_first(items: list[pytest.Item], seconds: dict[str, float]) -> list[pytest.Item]:
    """``items`` with their files ordered by ``seconds``, longest first (unknown last);
    within a file, and between files of equal seconds, the collection order stays."""
    first_seen: dict[str, int] = {}
    for index, item in enumerate(items):
        first_seen.setdefault(_file(item.nodeid), index)

    def key(pair: tuple[int, pytest.Item]) -> tuple[float, int, int]:
        name = _file(pair[1].nodeid)
        return (-seconds.get(name, -1.0), first_seen[name], pair[0])

    return [item for _, item in sorted(enumerate(items), key=key)]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Order the collected files longest first (every worker computes the same order)."""
    items[:] = longest_first(items, known())


class _Recorder:
    """Sums each file's test seconds as the reports arrive (in the controller, with xdist)."""

    def __init__(self) -> None:
        self.seconds: defaultdict[str, float] = defaultdict(float)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.seconds[_file(report.nodeid)] += report.duration

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        merged = known() | {name: round(s, 1) for name, s in self.seconds.items()}
        DURATIONS.write_bytes(
            orjson.dumps(dict(sorted(merged.items())), option=orjson.OPT_INDENT_2) + b"\n"
        )


@pytest.hookimpl(trylast=True)
def pytest_configure(config: pytest.Config) -> None:
    """With ``--store-durations``, record in the process that sees every report."""
    if config.getoption(_STORE) and not hasattr(config, "workerinput"):
        config.pluginmanager.register(_Recorder(), "courier-durations")
