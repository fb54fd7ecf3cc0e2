"""The spool: cancelled at any await point it leaves no file and no descriptor; stale spool
files of a crashed container are removed at start-up."""

from __future__ import annotations

import asyncio
import gc
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from service.config import Settings
from service.sources import base
from service.sources.base import SPOOL_PREFIX, SizeLimit, remove_stale_spool_files, spool
from tests.conftest import running

LIMIT = SizeLimit(64 * 1024 * 1024, "test")
CHUNK = b"x" * (base.WRITE_BATCH + 1)  # every chunk goes to disk and fills a write batch


def open_descriptors(directory: Path) -> int:
    """How many of this process's file descriptors are open on files under ``directory``.

    Only those: the process's other descriptors come and go with whatever the garbage
    collector happens to close from other tests.
    """
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # closed meanwhile (the listing's own descriptor, say)
            continue
        count += target.startswith(f"{directory}{os.sep}")
    return count


def spool_files(directory: Path) -> list[str]:
    """The spool files left in ``directory``."""
    return [p.name for p in directory.iterdir() if p.name.startswith(SPOOL_PREFIX)]


class Gate:
    """Holds a worker thread inside a wrapped function until released."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def wrap(self, func: Callable[..., Any]) -> Callable[..., Any]:
        def held(*args: Any) -> Any:
            self.entered.set()
            self.release.wait(10)
            return func(*args)

        return held


async def chunks(
    count: int, stall: asyncio.Event | None = None, waiting: asyncio.Event | None = None
) -> AsyncIterator[bytes]:
    """``count`` chunks; with ``stall``, then wait for it (a source that went quiet), and
    set ``waiting`` when it starts to."""
    for _ in range(count):
        yield CHUNK
    if stall is not None:
        if waiting is not None:
            waiting.set()
        await stall.wait()


async def settle_cancelled(task: asyncio.Task[Any]) -> None:
    """Give a cancelled task every chance to end, in loop turns rather than time: one that
    does not wait for its thread ends within a few turns."""
    for _ in range(20):
        await asyncio.sleep(0)


@pytest.mark.parametrize("point", ["mkstemp", "write", "close", "next chunk"])
async def test_cancelling_the_spool_leaves_no_file_and_no_descriptor(
    point: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancelled while a thread creates, writes or closes the file, or while waiting for bytes: nothing is left behind, nothing is closed twice."""
    gate = Gate()
    if point == "mkstemp":
        monkeypatch.setattr(base, "_new_temp_file", gate.wrap(base._new_temp_file))
    elif point == "write":
        monkeypatch.setattr(base, "_write_hashed", gate.wrap(base._write_hashed))
    elif point == "close":
        monkeypatch.setattr(base, "_close_file", gate.wrap(base._close_file))
    stall, waiting = asyncio.Event(), asyncio.Event()
    before = open_descriptors(tmp_path)
    task = asyncio.create_task(spool(chunks(2, stall, waiting), LIMIT, tmp_path))
    if point == "next chunk":
        async with asyncio.timeout(10):  # both chunks taken, the source gone quiet
            await waiting.wait()
    else:
        if point == "close":
            stall.set()  # let the body end, so the spool reaches its final close
        await asyncio.to_thread(gate.entered.wait, 10)
        assert gate.entered.is_set()
    task.cancel()
    await settle_cancelled(task)
    assert not task.done() or point == "next chunk", "a thread's work must be waited for"
    gate.release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    monkeypatch.undo()
    assert spool_files(tmp_path) == []
    gc.collect()  # a descriptor only garbage still held is as good as closed
    assert open_descriptors(tmp_path) == before == 0


async def test_a_whole_spool_still_works(tmp_path: Path) -> None:
    """The happy path: the file holds every byte, hashed."""
    spooled = await spool(chunks(3), LIMIT, tmp_path)
    assert spooled.path is not None and spooled.size == 3 * len(CHUNK)
    assert spooled.path.read_bytes() == CHUNK * 3
    spooled.path.unlink()


def test_stale_spool_files_are_removed(tmp_path: Path) -> None:
    """Only this service's spool files older than the longest attempt go."""
    old = tmp_path / f"{SPOOL_PREFIX}old"
    fresh = tmp_path / f"{SPOOL_PREFIX}fresh"
    foreign = tmp_path / "someone-elses-file"
    for path in (old, fresh, foreign):
        path.write_bytes(b"x")
    long_ago = time.time() - 3600
    os.utime(old, (long_ago, long_ago))
    os.utime(foreign, (long_ago, long_ago))
    assert remove_stale_spool_files(tmp_path, older_than=600) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([fresh.name, foreign.name])


async def test_start_up_removes_a_crashed_run_s_spool(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    """`courier run` clears the spool files a crashed container left in COURIER_TMP_DIR."""
    left = tmp_path / f"{SPOOL_PREFIX}crashed"
    left.write_bytes(b"x" * 1000)
    long_ago = time.time() - 24 * 3600
    os.utime(left, (long_ago, long_ago))
    async with running(make_settings(tmp_dir=tmp_path)):
        assert not left.exists()
