"""The suite's own machinery: a leak is blamed on the test that leaked (tests/conftest.py),
the CLI forked from a zygote behaves as a new interpreter, files start longest first."""

from __future__ import annotations

import asyncio
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import aio_pika
import orjson
import pytest
from aio_pika.abc import AbstractRobustConnection

from testbed.schedule import longest_first
from testbed.support import ROOT, Names, courier, courier_env, start_courier

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


def _comparable(out: bytes) -> object:
    """A command's output without what differs from run to run (event ids and times)."""
    try:
        event = orjson.loads(out)
    except orjson.JSONDecodeError:
        return out
    return {k: v for k, v in event.items() if k not in ("id", "time")}


async def test_a_forked_command_is_what_a_new_interpreter_runs() -> None:
    """The zygote's fork (testbed/zygote.py) gives the caller's stdin, stdout, stderr,
    environment and exit status, as `python -m service` in a new interpreter does; a
    run's environment does not reach the next run."""
    cases: list[tuple[tuple[str, ...], dict[str, str], bytes | None]] = [
        (("--version",), {}, None),
        (("submit", "README.md"), {"COURIER_RETRY_DELAYS": "zz"}, None),  # exit 2, stderr
        (("process", "-"), {}, b"not json"),  # stdin read, an event on stdout, exit 1
        (("submit", "missing.json"), {}, None),  # COURIER_RETRY_DELAYS is gone again
    ]
    for args, extra, stdin in cases:
        env = courier_env(**extra)
        forked = await courier(*args, env=env, stdin=stdin)
        fresh = await courier(*args, env=env, stdin=stdin, fresh=True)
        assert forked[0] == fresh[0], (args, forked, fresh)
        assert _comparable(forked[1]) == _comparable(fresh[1]), args
        assert forked[2] == fresh[2], args
    assert forked[0] != 0 and b"missing.json" in forked[2]


async def test_a_signal_reaches_the_forked_process(
    amqp: AbstractRobustConnection, names: Names
) -> None:
    """A signal sent to a forked run's pid ends that process, and its exit status says so."""
    channel = await amqp.channel()
    await channel.declare_exchange(names.events_exchange, aio_pika.ExchangeType.TOPIC)
    await channel.close()
    env = courier_env(COURIER_EVENTS_EXCHANGE=names.events_exchange)
    proc = await start_courier("events", env=env)
    assert proc.stderr is not None
    line = await asyncio.wait_for(proc.stderr.readline(), 30)
    assert b"watching" in line, line
    proc.kill()
    assert await asyncio.wait_for(proc.wait(), 30) == -signal.SIGKILL
    assert proc.stdout is not None
    assert await proc.stdout.read() == b""  # its pipes closed with it


def test_files_start_longest_first() -> None:
    """testbed/schedule.py orders files by their stored seconds, longest first and the
    unknown last, and keeps the order of tests inside a file."""

    @dataclass
    class Item:
        nodeid: str

    items = [Item(n) for n in ("a.py::1", "b.py::1", "a.py::2", "c.py::1", "b.py::2", "d.py::1")]
    ordered = longest_first(items, {"a.py": 1.0, "b.py": 9.0, "d.py": 1.0})  # type: ignore[arg-type]
    assert [i.nodeid for i in ordered] == [
        "b.py::1",
        "b.py::2",
        "a.py::1",
        "a.py::2",
        "d.py::1",
        "c.py::1",
    ]
