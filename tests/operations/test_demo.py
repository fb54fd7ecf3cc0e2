"""`make demo`: a short story, the failure and the dead-letter queue included, peers quiet."""

from __future__ import annotations

import asyncio
import sys

import pytest

from testbed.support import LEDGER, ROOT

# The demo runs a dozen `courier` commands (each a Python process to boot) beside the
# service and an S3 server: about 10 s alone, 27-60 s under the flake run's load.
DEMO_TIME = 150


@pytest.mark.timeout(DEMO_TIME + 30)
async def test_demo_shows_successes_a_dead_letter_and_a_summary() -> None:
    """Every example succeeds, the failing one ends in `courier dead list`, and one file lives
    its whole life (upload, ingestion, replacement, delete), in a few dozen lines."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "scripts.demo",
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert proc.stdout is not None
    out = bytearray()

    async def read_all(stream: asyncio.StreamReader) -> None:
        while chunk := await stream.read(65536):
            out.extend(chunk)

    try:
        await asyncio.wait_for(asyncio.gather(read_all(proc.stdout), proc.wait()), DEMO_TIME)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        pytest.fail(f"the demo did not end within {DEMO_TIME} s; it wrote:\n{out.decode()}")
    text = out.decode()
    LEDGER.add("make demo output", text)
    assert proc.returncode == 0, text
    lines = text.splitlines()
    assert len(lines) < 40, text
    table = lines[lines.index("") + 1 :]
    assert table[0].split() == ["REQUEST", "DESTINATION", "SOURCE", "OUTCOME", "DETAIL"]
    outcomes = {line.split()[0]: line.split()[3] for line in table[1:6]}
    assert outcomes == {
        "example-inconvo-http": "succeeded",
        "example-inconvo-s3": "succeeded",
        "example-mindset-http": "succeeded",
        "example-mindset-s3": "succeeded",
        "example-source-not-found": "failed",
    }
    listing = lines[lines.index("$ courier dead list") + 1 :]
    assert listing[1].split()[:2] == ["example-source-not-found", "source_not_found"]
    assert lines[-1].startswith("4 succeeded, 1 failed as expected")
    life = [line.split()[:2] for line in lines[lines.index("The life of one file in Mindset:") :]]
    assert [kind for kind in life if kind and kind[0].endswith(("succeeded", "completed"))] == [
        ["upload.succeeded", "life-v1"],
        ["ingestion.completed", "life-v1"],
        ["upload.succeeded", "life-v2"],
        ["ingestion.completed", "life-v2"],
        ["delete.succeeded", "life-del"],
    ]
    assert "replaced=True" in text and "existed=True" in text
    assert text.count("$ courier submit examples/") == 5
    assert "X-Amz-Signature" not in text and "werkzeug" not in text
