"""The suite's own machinery (tests/conftest.py): a leak is blamed on the test that leaked."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from testbed.support import ROOT

LEAKY = """
import socket


class Holder:
    def __init__(self) -> None:
        self.sock = socket.socket()
        self.me = self  # a cycle: only the garbage collector frees it


def test_a_leaks() -> None:
    Holder()


def test_b_innocent() -> None:
    assert True
"""


@pytest.mark.timeout(180)  # a pytest of its own to boot: 5 s alone, 55 s under the flake load
async def test_a_leaked_socket_fails_the_test_that_leaked_it(tmp_path: Path) -> None:
    """An unclosed socket the collector finds fails its own test's teardown, not the next test."""
    (tmp_path / "test_leaky.py").write_text(LEAKY)
    (tmp_path / "pytest.ini").write_text(
        "[pytest]\nfilterwarnings = error\nasyncio_default_fixture_loop_scope = function\n"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "tests.conftest",  # the suite's hooks and fixtures, on a test file of its own
        "-p",
        "no:cacheprovider",
        "-q",
        "--rootdir",
        str(tmp_path),
        "-c",
        str(tmp_path / "pytest.ini"),
        str(tmp_path / "test_leaky.py"),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    text = out.decode()
    assert proc.returncode == 1, text
    assert "ERROR at teardown of test_a_leaks" in text, text
    assert "test_leaky.py::test_a_leaks left garbage that complained" in text
    assert "unclosed <socket.socket" in text
    assert "2 passed, 1 error" in text, text
