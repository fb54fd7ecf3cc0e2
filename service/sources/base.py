"""What every source shares: the port, the facts it returns, and the spooling code.

Bytes are streamed to a temporary file while the size cap, the SHA-256 and
the byte count are computed, so a file is never held in memory whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import mimetypes
import os
import posixpath
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol, TypeVar
from urllib.parse import unquote, urlsplit

import aiofiles.os

from service.contracts import SourceInfo, SourceSpec
from service.errors import ErrorCode, PermanentError, RetryableError
from service.redact import redact_url

CHUNK_SIZE = 256 * 1024
SPOOL_PREFIX = "courier-spool-"
T = TypeVar("T")
# Files up to this size never touch the disk: at most COURIER_CONCURRENCY x this in memory.
MEMORY_SPOOL = 256 * 1024
# Larger files are written in batches of this size: fewer thread hops per file.
WRITE_BATCH = 256 * 1024
_MAX_IOVECS = 512  # well under IOV_MAX (1024 on Linux)
_TYPES = mimetypes.MimeTypes()  # the built-in table only: the same answer on every host
for _ext, _type in {
    ".md": "text/markdown",
    ".docx": "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
    ".pptx": "application/vnd.openxmlformats-officedocument.presentationml.presentation",
}.items():
    _TYPES.add_type(_type, _ext)


@dataclass(frozen=True, slots=True)
class SizeLimit:
    """The most bytes a destination takes, and who imposes it (for the error message)."""

    max_bytes: int
    owner: str

    def exceeded(self, size: int | None = None) -> PermanentError:
        """The ``too_large`` error for this limit."""
        got = f" ({size} bytes)" if size is not None else ""
        return PermanentError(
            ErrorCode.TOO_LARGE,
            f"the file{got} is over the {self.owner} limit of {self.max_bytes} bytes",
        )


@dataclass(frozen=True, slots=True)
class FetchedFile:
    """A fetched source file: small ones held in memory, larger ones in a temporary file.

    The caller owns it: ``async with await source.fetch(...) as fetched`` removes
    the temporary file on the way out, whatever happens.
    """

    path: Path | None
    data: bytes | None
    size: int
    sha256: str
    content_type: str | None
    file_name: str
    url: str  # redacted, fit for events and logs

    async def __aenter__(self) -> FetchedFile:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.discard()

    async def discard(self) -> None:
        """Remove the temporary file, if there is one."""
        if self.path is not None:
            await remove_quietly(self.path)

    def info(self) -> SourceInfo:
        """What the event says about this file (built unvalidated: Courier's own values)."""
        return SourceInfo.model_construct(
            url=self.url, bytes=self.size, contentType=self.content_type, sha256=self.sha256
        )

    async def read(self) -> bytes:
        """The whole content (only for files already known to be small)."""
        if self.data is not None:
            return self.data
        assert self.path is not None  # noqa: S101 - one of the two is always set
        return await asyncio.to_thread(self.path.read_bytes)

    @asynccontextmanager
    async def body(self) -> AsyncIterator[bytes | BinaryIO]:
        """Something aiohttp can send: the bytes, or the open temporary file it streams."""
        if self.data is not None:
            yield self.data
            return
        assert self.path is not None  # noqa: S101
        handle = await asyncio.to_thread(self.path.open, "rb")
        try:
            yield handle
        finally:
            await asyncio.to_thread(handle.close)


@dataclass(frozen=True, slots=True)
class SourceFacts:
    """What is known about a source without reading its bytes."""

    fetch_url: str  # handed to the destination: the URL as given or a presigned one
    file_name: str
    content_type: str | None
    size: int | None
    url: str  # redacted


class Source(Protocol):
    """A source of files for one or more URL schemes."""

    def check(self, spec: SourceSpec) -> None:
        """Cheap pre-flight checks that need no I/O (allowlists); raise ``source_blocked``."""

    async def fetch(self, spec: SourceSpec, limit: SizeLimit) -> FetchedFile:
        """Fetch the file (into memory or a temporary file); the caller discards it."""

    async def describe(self, spec: SourceSpec) -> SourceFacts:
        """Facts and a URL the destination can fetch by itself."""


def guess_type(file_name: str) -> str | None:
    """The content type a file name's extension suggests."""
    return _TYPES.guess_type("x" + posixpath.splitext(file_name)[1].lower(), strict=False)[0]


def media_type(content_type: str | None) -> str | None:
    """``text/csv; charset=utf-8`` -> ``text/csv``; generic binary types count as unknown."""
    if not content_type:
        return None
    value = content_type.split(";", 1)[0].strip().lower()
    if not value or value in ("application/octet-stream", "binary/octet-stream"):
        return None
    return value


def name_from_url(url: str) -> str:
    """The last path segment of the URL, percent-decoded."""
    path = urlsplit(url).path
    return unquote(path.rstrip("/").rsplit("/", 1)[-1]) if path else ""


def pick_name(spec: SourceSpec, disposition_name: str | None, url_name: str) -> str:
    """The file name: the request's override, then Content-Disposition, then the URL."""
    if spec.fileName:
        return spec.fileName
    if disposition_name:
        # A server-chosen name is only a name: never a path.
        base = disposition_name.replace("\\", "/").rsplit("/", 1)[-1].strip()
        if base and base not in (".", ".."):
            return base
    return url_name or "download"


def pick_type(spec: SourceSpec, header: str | None, file_name: str) -> str | None:
    """The content type: the request's override, then the response header, then the extension."""
    return media_type(spec.contentType) or media_type(header) or guess_type(file_name)


class DeadlineSource:
    """A source whose every fetch must end within ``seconds`` (``COURIER_SOURCE_TIMEOUT``).

    The read timeout of a socket does not end a fetch that trickles a byte now
    and then; this total deadline does, with a retryable ``source_unavailable``.
    """

    def __init__(self, inner: Source, seconds: float) -> None:
        self._inner = inner
        self._seconds = seconds

    def check(self, spec: SourceSpec) -> None:
        """The inner source's checks; they need no time limit (no I/O)."""
        self._inner.check(spec)

    async def describe(self, spec: SourceSpec) -> SourceFacts:
        """Delegate, within the deadline."""
        try:
            async with asyncio.timeout(self._seconds):
                return await self._inner.describe(spec)
        except TimeoutError:
            raise self._expired() from None

    async def fetch(self, spec: SourceSpec, limit: SizeLimit) -> FetchedFile:
        """Fetch within the deadline; the file is then the caller's for as long as it likes."""
        try:
            async with asyncio.timeout(self._seconds):
                return await self._inner.fetch(spec, limit)
        except TimeoutError:
            raise self._expired() from None

    def _expired(self) -> RetryableError:
        return RetryableError(
            ErrorCode.SOURCE_UNAVAILABLE,
            f"fetching the source took longer than {self._seconds:g}s (COURIER_SOURCE_TIMEOUT)",
        )


@dataclass(frozen=True, slots=True)
class Spooled:
    """The result of :func:`spool`."""

    path: Path | None
    data: bytes | None
    size: int
    sha256: str

    def as_file(self, *, content_type: str | None, file_name: str, url: str) -> FetchedFile:
        """The fetched file these bytes make, its source ``url`` redacted."""
        return FetchedFile(
            path=self.path,
            data=self.data,
            size=self.size,
            sha256=self.sha256,
            content_type=content_type,
            file_name=file_name,
            url=redact_url(url),
        )


async def spool(chunks: AsyncIterator[bytes], limit: SizeLimit, tmp_dir: Path | None) -> Spooled:
    """Stream ``chunks`` in, enforcing ``limit``, hashing on the way.

    Up to MEMORY_SPOOL bytes stay in memory; past that everything goes to a new
    temporary file, written (and hashed) in batches of WRITE_BATCH bytes, one
    thread hop each. The file is removed again on any failure, cancellation
    included: a thread already working is waited for first, so its descriptor is
    closed exactly once and never written to after it was closed.
    """
    digest = hashlib.sha256()
    size = 0
    pending: list[bytes] = []
    pending_size = 0
    fd: int | None = None
    path: Path | None = None
    try:
        async for chunk in chunks:
            size += len(chunk)
            if size > limit.max_bytes:
                raise limit.exceeded()
            pending.append(chunk)
            pending_size += len(chunk)
            if fd is None:
                if size <= MEMORY_SPOOL:
                    continue
                new_fd, name = await in_thread(_new_temp_file, tmp_dir, abandon=_discard_temp_file)
                fd, path = new_fd, Path(name)
            if pending_size >= WRITE_BATCH:
                await in_thread(_write_hashed, fd, pending, digest)
                pending, pending_size = [], 0
        if fd is None:
            data = b"".join(pending)
            digest.update(data)
            return Spooled(None, data, size, digest.hexdigest())
        if pending:
            await in_thread(_write_hashed, fd, pending, digest)
        closing, fd = fd, None
        await in_thread(_close_file, closing)
    except BaseException:
        if fd is not None:
            os.close(fd)
        if path is not None:
            await remove_quietly(path)
        raise
    return Spooled(path, None, size, digest.hexdigest())


async def in_thread(
    func: Callable[..., T], *args: Any, abandon: Callable[[T], None] | None = None
) -> T:
    """``func(*args)`` in a worker thread; a cancelled caller still waits for the thread.

    Cancelling ``asyncio.to_thread`` does not stop the thread: without this the
    caller's cleanup could close a descriptor the thread is still writing to.
    ``abandon`` disposes of a result that arrives after the cancellation.
    """
    future = asyncio.ensure_future(asyncio.to_thread(func, *args))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        while not future.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait({future})
        if abandon is not None and not future.cancelled() and future.exception() is None:
            abandon(future.result())
        raise


def _new_temp_file(tmp_dir: Path | None) -> tuple[int, str]:
    return tempfile.mkstemp(prefix=SPOOL_PREFIX, dir=tmp_dir)


def _close_file(fd: int) -> None:
    os.close(fd)


def _discard_temp_file(made: tuple[int, str]) -> None:
    fd, name = made
    os.close(fd)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name)


def remove_stale_spool_files(tmp_dir: Path | None, older_than: float) -> int:
    """Remove this service's spool files older than ``older_than`` seconds; returns how many.

    A crashed container leaves its spool behind, and an ``emptyDir`` survives
    container restarts. Files younger than the longest attempt may belong to a
    running process sharing the directory, so they stay.
    """
    directory = tmp_dir or Path(tempfile.gettempdir())
    cutoff = time.time() - older_than
    removed = 0
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return 0
    for entry in entries:
        if not entry.name.startswith(SPOOL_PREFIX):
            continue
        with contextlib.suppress(OSError):
            if entry.is_file(follow_symlinks=False) and entry.stat().st_mtime < cutoff:
                os.unlink(entry.path)
                removed += 1
    return removed


def _write_hashed(fd: int, chunks: list[bytes], digest: Any) -> None:
    """Hash ``chunks`` and write them all (hashlib and os.writev release the GIL)."""
    for chunk in chunks:
        digest.update(chunk)
    views = [memoryview(chunk) for chunk in chunks if chunk]
    while views:
        written = os.writev(fd, views[:_MAX_IOVECS])
        while views and written >= len(views[0]):
            written -= len(views[0])
            views.pop(0)
        if written:
            views[0] = views[0][written:]


async def remove_quietly(path: Path) -> None:
    """Remove ``path``; a file already gone is fine."""
    with contextlib.suppress(FileNotFoundError):
        await aiofiles.os.remove(path)
