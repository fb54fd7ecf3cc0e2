"""`make run` on a fresh clone: with no key set it runs against the local fakes, and the README's
second terminal (`courier submit --wait examples/...`) shows the request's event."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
from collections.abc import AsyncIterator

import orjson
import pytest

from scripts.local_stack import real_keys_configured
from testbed.support import (
    LEDGER,
    ROOT,
    Names,
    courier,
    courier_env,
    free_port,
    json_documents,
    wait_status,
)


@pytest.fixture
async def make_run(names: Names) -> AsyncIterator[tuple[dict[str, str], list[str]]]:
    """`make run` with no destination key, on this test's queues; its stderr lines so far."""
    env = courier_env(
        COURIER_QUEUE=names.queue,
        COURIER_EVENTS_EXCHANGE=names.events_exchange,
        COURIER_HTTP_PORT=str(free_port()),
    )
    for name in ("MINDSET_API_KEY", "COURIER_LOG_FORMAT"):
        env.pop(name, None)
    proc = await asyncio.create_subprocess_exec(
        "make",
        "-s",
        "run",
        env=env,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,  # its own process group: make, the runner and courier run
    )
    lines: list[str] = []

    async def read() -> None:
        assert proc.stderr is not None
        async for raw in proc.stderr:
            lines.append(raw.decode().rstrip("\n"))

    reader = asyncio.create_task(read())
    try:
        await wait_status(f"http://127.0.0.1:{env['COURIER_HTTP_PORT']}/readyz", 200, timeout=60)
        yield env, lines
    finally:
        if proc.returncode is None:
            os.killpg(proc.pid, signal.SIGTERM)  # as Ctrl-C reaches every process of a terminal
        await asyncio.wait_for(proc.wait(), 60)  # make itself reports the signal as a failure
        await reader
        LEDGER.add("make run output", "\n".join(lines))
    # Courier itself stopped as it should, after finishing its work.
    assert any(
        line.startswith("{") and orjson.loads(line)["message"] == "stopped" for line in lines
    )


async def test_make_run_then_submit_wait_shows_the_event(
    make_run: tuple[dict[str, str], list[str]],
) -> None:
    """The README's quick start, as written: the event arrives, and the failure too."""
    env, lines = make_run
    banner = [line for line in lines if line.startswith("make run: ")]
    assert banner == [next(line for line in lines if "no destination key set" in line)]
    assert "using the local fakes of Inconvo" in banner[0]
    logs = lines[lines.index(banner[0]) + 1 :]
    code, out, err = await courier("submit", "--wait", "examples/inconvo-http.json", env=env)
    assert code == 0, err.decode()
    event, ingestion = json_documents(out)
    assert ingestion["type"] == "courier.ingestion.completed"
    assert event["type"] == "courier.upload.succeeded"
    assert event["data"]["requestId"] == "example-inconvo-http"
    assert event["data"]["result"]["file"]["name"] == "sales_report_q4.csv"
    code, out, _ = await courier(
        "submit", "--wait", "examples/failures/source-not-found.json", env=env
    )
    assert code == 1
    [failed] = json_documents(out)
    assert failed["data"]["error"]["code"] == "source_not_found"
    # Not a terminal: the service logs JSON lines, as the contract's default says.
    assert logs and all(orjson.loads(line)["level"] for line in logs)


def test_real_keys_switch_the_fakes_off() -> None:
    """Any destination key (or its _FILE form) in the environment means the real APIs."""
    assert not real_keys_configured({"COURIER_QUEUE": "q", "COURIER_INCONVO_API_KEY": " "})
    for name in ("COURIER_INCONVO_API_KEY", "INCONVO_API_KEY", "MINDSET_API_KEY"):
        assert real_keys_configured({name: "k"})
    assert real_keys_configured({"COURIER_MINDSET_API_KEY_FILE": "/run/secrets/mindset"})


def test_make_run_installs_only_the_service() -> None:
    """`make run` installs the package without its dev extras (the test toolchain)."""
    result = subprocess.run(
        ["make", "-n", "-W", "pyproject.toml", "run"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    installs = [line for line in result.stdout.splitlines() if "pip install" in line]
    assert installs and all("[dev]" not in line for line in installs), result.stdout
    assert any(re.search(r"install (--\S+ )*-e \.( |;|$)", line) for line in installs)
