"""The shape the code keeps: one place acks, no god module, the test bed shared."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SERVICE = sorted((ROOT / "service").rglob("*.py"))


# The operator's dead-letter tool takes letters off the dead-letter queue (never requests).
DEAD_LETTER_TOOL = {"service/cli.py", "service/deadletters.py"}


def test_only_the_settler_acks() -> None:
    """Requests are acked (or nacked) in service/amqp/settler.py and nowhere else."""
    settling = re.compile(r"\.(ack|nack|reject)\(")
    ackers = {p.relative_to(ROOT).as_posix() for p in SERVICE if settling.search(p.read_text())}
    assert ackers - DEAD_LETTER_TOOL == {"service/amqp/settler.py"}


def test_the_consumer_and_the_settler_stay_small() -> None:
    """The subscription and the settling each read in one pass."""
    for name in ("consumer", "settler"):
        assert len((ROOT / "service" / "amqp" / f"{name}.py").read_text().splitlines()) < 300


def test_no_service_module_over_400_lines() -> None:
    """No module of service/ grows into a god module."""
    sizes = {p.relative_to(ROOT).as_posix(): len(p.read_text().splitlines()) for p in SERVICE}
    assert {name: n for name, n in sizes.items() if n > 400} == {}


def test_nothing_outside_tests_imports_tests() -> None:
    """bench/, scripts/ and testbed/ import the test bed, never the test suite."""
    offenders = []
    for folder in ("bench", "scripts", "testbed", "service"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = []
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom):
                    names = [node.module or ""]
                offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] == "tests"]
    assert offenders == []
