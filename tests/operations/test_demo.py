"""`make demo`: a short story, the failure and the dead-letter queue included, peers quiet."""

from __future__ import annotations

import asyncio
import sys

from testbed.support import LEDGER, ROOT


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
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
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
