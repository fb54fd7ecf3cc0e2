"""`python -m service` for the tests without paying its imports every time.

A test that runs the CLI wants a new process: its own exit status, signals, stdio
and sockets. Most of such a process's start is importing aiohttp, aio-pika,
pydantic and botocore, about a second of CPU each time, and the suite starts about
a hundred. So each test process keeps one *zygote*: an interpreter that has done
those imports and waits. Asked for a run, it forks; the child takes the caller's
pipes as its stdin, stdout and stderr, its environment, directory and arguments,
and runs :func:`service.cli.main` as ``python -m service`` does, exiting through
the interpreter's own shutdown. The zygote reports the child's pid, then its wait
status; signals go straight to the child.

The same code runs in the same kind of process, so what a test sees is what a
user sees; the entry point itself (``python -m service``, the ``courier`` script)
is still started fresh by the tests that are about it (``fresh=True``), and
``TESTBED_SPAWN=exec`` starts every one fresh.

Usage: ``python -m testbed.zygote SOCKET``: it prints ``ready`` once it listens and
exits when its standard input closes (its test process is gone).
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import os
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import orjson

_MAX_REQUEST = 1 << 20  # argv and environment of one run


@dataclass(frozen=True)
class Job:
    """One run the zygote was asked for, as its forked child receives it."""

    argv: list[str]
    env: dict[str, str]
    cwd: str
    fds: list[int]  # the caller's stdin, stdout, stderr


def _serve(listener: socket.socket) -> Job:
    """Fork a child per request until standard input closes; return only in a child."""
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ, None)
    selector.register(sys.stdin.fileno(), selectors.EVENT_READ, None)
    children: dict[int, tuple[int, socket.socket]] = {}  # pidfd -> (pid, caller)
    while True:
        for key, _ in selector.select():
            if key.fileobj is listener:
                caller, _ = listener.accept()
                message, fds, _, _ = socket.recv_fds(caller, _MAX_REQUEST, 3)
                request = orjson.loads(message)
                pid = os.fork()
                if pid == 0:  # the child: close the zygote's own files by their owners
                    selector.close()
                    listener.close()
                    caller.close()
                    for pidfd, (_, other) in children.items():
                        os.close(pidfd)
                        other.close()
                    return Job(request["argv"], request["env"], request["cwd"], fds)
                for fd in fds:
                    os.close(fd)
                pidfd = os.pidfd_open(pid)
                children[pidfd] = (pid, caller)
                selector.register(pidfd, selectors.EVENT_READ, None)
                with contextlib.suppress(OSError):  # a caller gone does not stop the zygote
                    caller.send(b"%d" % pid)
            elif key.fileobj == sys.stdin.fileno():
                if not os.read(sys.stdin.fileno(), 4096):
                    raise SystemExit(0)
            else:
                pidfd = int(key.fd)
                pid, caller = children.pop(pidfd)
                selector.unregister(pidfd)
                os.close(pidfd)
                _, status = os.waitpid(pid, 0)
                with contextlib.suppress(OSError):
                    caller.send(b"%d" % status)
                caller.close()


def _become(job: Job) -> None:
    """Turn the forked child into ``python -m service ARGV`` (its caller's stdio, env, cwd)."""
    for target, fd in enumerate(job.fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(job.cwd)
    os.environ.clear()
    os.environ.update(job.env)
    sys.argv = [str(Path(job.cwd) / "service" / "__main__.py"), *job.argv]


def _preload() -> None:
    """Import what the CLI's commands import, ``courier run``'s service included."""
    import service.asyncapi
    import service.cli
    import service.doctor
    import service.runtime
    import service.tracing  # noqa: F401


def main(path: str) -> Job:
    """Listen on ``path`` and serve; returns (in a forked child) the job to run."""
    _preload()
    # A fork with other threads running could copy a lock held mid-operation.
    assert threading.active_count() == 1, "the zygote must stay single-threaded"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    listener.listen(64)
    print("ready", flush=True)
    return _serve(listener)


class Forked:
    """A process the zygote forked: the part of :class:`asyncio.subprocess.Process` the
    tests use (``pid``, ``returncode``, ``stdout``, ``stderr``, ``wait``, ``communicate``,
    ``send_signal``, ``terminate``, ``kill``)."""

    def __init__(
        self,
        pid: int,
        caller: socket.socket,
        stdout: asyncio.StreamReader,
        stderr: asyncio.StreamReader,
        feeding: asyncio.Future[None] | None = None,
    ) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self.stdout = stdout
        self.stderr = stderr
        self._caller = caller
        self._exit: asyncio.Future[int] | None = None
        self._feeding = feeding  # the write of its stdin, which ends when the process does

    async def _receive_exit(self) -> int:
        status = await asyncio.get_running_loop().sock_recv(self._caller, 64)
        self._caller.close()
        if self._feeding is not None:
            await self._feeding  # a failed write is the test's error, not a lost one
        if not status:
            raise RuntimeError("the zygote went away before the process ended")
        self.returncode = os.waitstatus_to_exitcode(int(status))
        return self.returncode

    async def wait(self) -> int:
        """Wait for the process to end; its exit code (negative: the signal that ended it)."""
        if self._exit is None:
            self._exit = asyncio.ensure_future(self._receive_exit())
        return await asyncio.shield(self._exit)

    async def communicate(self) -> tuple[bytes, bytes]:
        """Read stdout and stderr to their end, then wait for the exit."""
        out, err = await asyncio.gather(self.stdout.read(), self.stderr.read())
        await self.wait()
        return out, err

    def send_signal(self, sig: int) -> None:
        """Send ``sig`` unless the process has already been seen to end."""
        if self.returncode is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        """SIGTERM."""
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL."""
        self.send_signal(signal.SIGKILL)


class _Zygote:
    """This test process's zygote: started on first use, ended with the process."""

    def __init__(self, root: Path) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="courier-zygote-")
        self.path = str(Path(self._dir.name) / "socket")
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "testbed.zygote", self.path],
            cwd=root,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="zygote")
        self.ready = self._pool.submit(self._await_ready)
        atexit.register(self.close)

    def _await_ready(self) -> None:
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        self._pool.shutdown(wait=False)
        if line.strip() != b"ready":
            raise RuntimeError(f"the test zygote did not start (exit {self._proc.wait()})")

    def close(self) -> None:
        """End the zygote (its stdin closes) and remove its socket."""
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.close()
        self._proc.stdout.close()
        self._proc.wait()
        self._dir.cleanup()


_zygote: _Zygote | None = None


async def _reader(fd: int) -> asyncio.StreamReader:
    reader = asyncio.StreamReader(limit=2**16)  # asyncio.subprocess's default
    await asyncio.get_running_loop().connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", buffering=0)
    )
    return reader


def _feed(fd: int, data: bytes) -> None:
    # The suppress outside: a child gone before reading also breaks the flush at close.
    with contextlib.suppress(BrokenPipeError), os.fdopen(fd, "wb") as pipe:
        pipe.write(data)


async def spawn(
    args: Sequence[str], *, env: Mapping[str, str], cwd: Path, stdin: bytes | None = None
) -> Forked:
    """Start ``python -m service ARGS`` by a fork of this test process's zygote.

    ``stdin``: bytes the process reads on its standard input (then end of file);
    ``None``: an empty standard input.
    """
    global _zygote
    if _zygote is None:
        _zygote = _Zygote(cwd)
    await asyncio.wrap_future(_zygote.ready)
    loop = asyncio.get_running_loop()
    in_read, in_write = os.pipe()
    out_read, out_write = os.pipe()
    err_read, err_write = os.pipe()
    caller = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        caller.connect(_zygote.path)
        request = orjson.dumps({"argv": list(args), "env": dict(env), "cwd": str(cwd)})
        socket.send_fds(caller, [request], [in_read, out_write, err_write])
    finally:
        for fd in (in_read, out_write, err_write):
            os.close(fd)
    caller.setblocking(False)
    pid = int(await loop.sock_recv(caller, 64))
    feeding = None
    if stdin:
        feeding = loop.run_in_executor(None, _feed, in_write, stdin)
    else:
        os.close(in_write)
    return Forked(pid, caller, await _reader(out_read), await _reader(err_read), feeding)


def enabled() -> bool:
    """Whether runs go through the zygote (Linux, and ``TESTBED_SPAWN`` is not ``exec``)."""
    return hasattr(os, "pidfd_open") and os.environ.get("TESTBED_SPAWN", "zygote") != "exec"


if __name__ == "__main__":
    job = main(sys.argv[1])
    _become(job)
    from service.cli import main as courier

    raise SystemExit(courier())
