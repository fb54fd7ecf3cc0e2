"""The producer snippets' runtimes: the Python of the suite, and Node.js with its AMQP client."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from testbed.support import ROOT

SNIPPETS = ROOT / "examples" / "producers"


@pytest.fixture(scope="session")
def node() -> str:
    """The `node` binary, with examples/producers/node's locked dependencies installed."""
    binary = shutil.which("node")
    if binary is None:
        pytest.skip("node is not installed: the Node.js producer snippets cannot run here")
    folder = SNIPPETS / "node"
    if not (folder / "node_modules" / "amqplib").is_dir():
        npm = shutil.which("npm")
        if npm is None:
            pytest.skip("npm is not installed: cannot install the Node.js snippets' amqplib")
        subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--silent"], cwd=folder, check=True)
    return binary


def command(language: str, script: str, node: str | None) -> list[str]:
    """How to run one snippet (``script`` without its extension)."""
    if language == "python":
        return [sys.executable, str(SNIPPETS / "python" / f"{script}.py")]
    assert node is not None
    return [node, str(SNIPPETS / "node" / f"{script}.js")]
