"""The HTTP source: streaming, caps, names, types, errors, redirects and temp-file hygiene."""

from __future__ import annotations

import asyncio
import hashlib
import os
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import aiohttp
import pytest

from service.config import Settings
from service.contracts import SourceSpec, UploadRequest
from service.errors import CourierError, ErrorCode
from service.runtime import Service, pipeline_for
from service.sources.base import SizeLimit, spool
from service.sources.guard import AddressPolicy, guarded_connector, parse_allowed_hosts
from service.sources.http import HttpSource
from testbed.stage import Stage
from testbed.support import FileServer, inconvo_request, wait_until

LIMIT = SizeLimit(2 * 1024 * 1024, "test")


@pytest.fixture
def spool_dir() -> Iterator[Path]:
    """A private temp dir, so tests can see every spooled file."""
    with tempfile.TemporaryDirectory() as name:
        yield Path(name)


@pytest.fixture
async def source(files: FileServer, spool_dir: Path) -> AsyncIterator[HttpSource]:
    """An HttpSource that may reach only the test file server."""
    policy = AddressPolicy(allowed_hosts=parse_allowed_hosts([f"127.0.0.1:{files.port}"]))
    async with aiohttp.ClientSession(connector=guarded_connector(policy)) as session:
        yield HttpSource(session, policy, spool_dir)


pytestmark = pytest.mark.usefixtures("fast_retries")


async def _fail(source: HttpSource, spec: SourceSpec, limit: SizeLimit = LIMIT) -> CourierError:
    with pytest.raises(CourierError) as info:
        async with await source.fetch(spec, limit):
            pass
    return info.value


@pytest.mark.parametrize(("rows", "on_disk"), [(100, False), (200_000, True)])
async def test_fetch_spools_with_size_and_sha256(
    source: HttpSource, files: FileServer, spool_dir: Path, rows: int, on_disk: bool
) -> None:
    """The file arrives whole with its size, hash, name and type; big ones in a temp file, gone after."""
    body = b"a,b\n" * rows
    url = files.add("/reports/sales%20q4.csv", body, content_type="text/csv; charset=utf-8")
    async with await source.fetch(SourceSpec(url=url), LIMIT) as fetched:
        assert await fetched.read() == body
        assert fetched.size == len(body)
        assert fetched.sha256 == hashlib.sha256(body).hexdigest()
        assert fetched.file_name == "sales q4.csv"
        assert fetched.content_type == "text/csv"
        assert (fetched.path is not None) is on_disk
        assert len(os.listdir(spool_dir)) == int(on_disk)
        if fetched.path is not None:
            assert fetched.path.parent == spool_dir
            assert fetched.path.read_bytes() == body
    assert os.listdir(spool_dir) == []


async def test_spool_writes_many_small_chunks_whole(spool_dir: Path) -> None:
    """Thousands of tiny chunks (more than one writev takes) land in the file whole and in order."""
    chunks = [os.urandom(300) for _ in range(3000)]

    async def stream() -> AsyncIterator[bytes]:
        for chunk in chunks:
            yield chunk

    spooled = await spool(stream(), LIMIT, spool_dir)
    body = b"".join(chunks)
    assert spooled.path is not None and spooled.data is None
    try:
        assert spooled.path.read_bytes() == body
        assert spooled.size == len(body)
        assert spooled.sha256 == hashlib.sha256(body).hexdigest()
    finally:
        spooled.path.unlink()


async def test_name_and_type_precedence(source: HttpSource, files: FileServer) -> None:
    """Content-Disposition beats the URL; the request's overrides beat both; extension is the last resort."""
    url = files.add(
        "/download",
        b"{}",
        content_type="application/octet-stream",
        headers={"Content-Disposition": 'attachment; filename="../../evil/data.json"'},
    )
    async with await source.fetch(SourceSpec(url=url), LIMIT) as fetched:
        assert fetched.file_name == "data.json"
        assert fetched.content_type == "application/json"
    spec = SourceSpec(url=url, fileName="mine.csv", contentType="text/csv")
    async with await source.fetch(spec, LIMIT) as fetched:
        assert (fetched.file_name, fetched.content_type) == ("mine.csv", "text/csv")


async def test_content_length_over_cap_fails_before_reading(
    source: HttpSource, files: FileServer, spool_dir: Path
) -> None:
    """A declared size over the cap is too_large without spooling anything."""
    url = files.add("/big.csv", b"x" * 2000)
    error = await _fail(source, SourceSpec(url=url), SizeLimit(1000, "test"))
    assert error.code is ErrorCode.TOO_LARGE
    assert "2000" in error.message
    assert os.listdir(spool_dir) == []


async def test_chunked_body_capped_while_streaming(
    source: HttpSource, files: FileServer, spool_dir: Path
) -> None:
    """A body with no Content-Length stops at the cap and leaves no temp file."""
    url = files.add("/endless.csv", stream_bytes=5 * 1024 * 1024)
    error = await _fail(source, SourceSpec(url=url), SizeLimit(256 * 1024, "test"))
    assert error.code is ErrorCode.TOO_LARGE
    assert os.listdir(spool_dir) == []


async def test_gzip_counts_decoded_bytes(source: HttpSource, files: FileServer) -> None:
    """A small gzip body that inflates past the cap is too_large; one under it arrives decoded."""
    bomb = files.add("/bomb.csv", b"0" * 3_000_000, gzip=True)
    assert (await _fail(source, SourceSpec(url=bomb))).code is ErrorCode.TOO_LARGE
    ok = files.add("/ok.csv", b"1,2\n" * 100, gzip=True)
    async with await source.fetch(SourceSpec(url=ok), LIMIT) as fetched:
        assert await fetched.read() == b"1,2\n" * 100


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (404, ErrorCode.SOURCE_NOT_FOUND),
        (410, ErrorCode.SOURCE_NOT_FOUND),
        (401, ErrorCode.SOURCE_FORBIDDEN),
        (403, ErrorCode.SOURCE_FORBIDDEN),
        (500, ErrorCode.SOURCE_UNAVAILABLE),
        (503, ErrorCode.SOURCE_UNAVAILABLE),
        (429, ErrorCode.SOURCE_UNAVAILABLE),
    ],
)
async def test_status_codes_map_to_contract_codes(
    source: HttpSource, files: FileServer, status: int, code: ErrorCode
) -> None:
    """HTTP errors from the source map to the contract's codes, with httpStatus."""
    url = files.add("/x.csv", b"no", status=status)
    error = await _fail(source, SourceSpec(url=url))
    assert (error.code, error.http_status) == (code, status)
    assert error.retryable is (code is ErrorCode.SOURCE_UNAVAILABLE)


@pytest.mark.parametrize(
    ("status", "body", "code"),
    [
        (204, b"", ErrorCode.SOURCE_NOT_FOUND),
        (205, b"", ErrorCode.SOURCE_NOT_FOUND),
        (206, b"a,b", ErrorCode.SOURCE_NOT_FOUND),
        (201, b"created", ErrorCode.SOURCE_NOT_FOUND),
        (202, b"still preparing", ErrorCode.SOURCE_UNAVAILABLE),
        (300, b"choose", ErrorCode.SOURCE_NOT_FOUND),
        (302, b"", ErrorCode.SOURCE_NOT_FOUND),
        (304, b"", ErrorCode.SOURCE_NOT_FOUND),
    ],
)
async def test_only_a_200_answer_is_taken_as_the_file(
    source: HttpSource, files: FileServer, status: int, body: bytes, code: ErrorCode
) -> None:
    """A 2xx other than 200/203, or a redirect without Location, is no file: it is never uploaded."""
    url = files.add("/odd.csv", body, status=status)
    error = await _fail(source, SourceSpec(url=url))
    assert (error.code, error.http_status) == (code, status)
    assert error.retryable is (code is ErrorCode.SOURCE_UNAVAILABLE)


async def test_203_answer_is_the_file(source: HttpSource, files: FileServer) -> None:
    """203 (a transforming proxy's 200) carries the file."""
    url = files.add("/proxied.csv", b"1,2\n", status=203)
    async with await source.fetch(SourceSpec(url=url), LIMIT) as fetched:
        assert await fetched.read() == b"1,2\n"


@pytest.mark.parametrize(
    ("location", "code"),
    [
        ("http://127.0.0.1:99999/x.csv", ErrorCode.SOURCE_NOT_FOUND),
        ("http://[::1/x.csv", ErrorCode.SOURCE_NOT_FOUND),
        ("http://xn--/x.csv", ErrorCode.SOURCE_NOT_FOUND),
        ("http://exa mple.com/x.csv", ErrorCode.SOURCE_NOT_FOUND),
        ("", ErrorCode.SOURCE_NOT_FOUND),
        ("ftp://files.example/x.csv", ErrorCode.UNSUPPORTED_SOURCE),
    ],
)
async def test_redirect_to_an_unusable_url(
    source: HttpSource, files: FileServer, location: str, code: ErrorCode
) -> None:
    """A Location no fetch could follow is a permanent source error, never internal_error."""
    url = files.add("/moved.csv", status=302, headers={"Location": location})
    error = await _fail(source, SourceSpec(url=url))
    assert error.code is code
    assert not error.retryable
    assert files.hits == ["/moved.csv"]


async def test_transient_errors_are_retried_in_process(
    source: HttpSource, files: FileServer
) -> None:
    """A 503 is tried three times in all before giving up."""
    url = files.add("/flaky.csv", b"", status=503)
    assert (await _fail(source, SourceSpec(url=url))).code is ErrorCode.SOURCE_UNAVAILABLE
    assert files.hits.count("/flaky.csv") == 3


async def test_redirects_followed_and_capped(source: HttpSource, files: FileServer) -> None:
    """Redirects are followed (each re-checked); more than five is source_not_found."""
    files.add("/final.csv", b"1\n")
    url = files.add("/r1", redirect=files.url("/final.csv"))
    async with await source.fetch(SourceSpec(url=url), LIMIT) as fetched:
        assert await fetched.read() == b"1\n"
        assert fetched.file_name == "r1"  # the name comes from the URL as given
    for i in range(7):
        files.add(f"/loop{i}", redirect=files.url(f"/loop{i + 1}"))
    error = await _fail(source, SourceSpec(url=files.url("/loop0")))
    assert error.code is ErrorCode.SOURCE_NOT_FOUND
    assert "redirects" in error.message


async def test_unreachable_source_is_unavailable(source: HttpSource, files: FileServer) -> None:
    """A refused connection is source_unavailable (retryable)."""
    port = files.port
    await files.close()
    error = await _fail(source, SourceSpec(url=f"http://127.0.0.1:{port}/gone.csv"))
    assert error.code is ErrorCode.SOURCE_UNAVAILABLE
    assert error.retryable


async def test_temp_file_removed_on_cancellation(
    source: HttpSource, files: FileServer, spool_dir: Path
) -> None:
    """Cancelling a download mid-stream leaves no temp file behind."""
    url = files.add("/slow.csv", stream_bytes=50 * 1024 * 1024)

    async def fetch() -> None:
        async with await source.fetch(SourceSpec(url=url), SizeLimit(100 * 1024 * 1024, "t")):
            pass

    task = asyncio.create_task(fetch())
    await wait_until(lambda: bool(os.listdir(spool_dir)), 10, "the download spooling")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # Removing the file may take a thread's hop after the task ended: wait for it.
    await wait_until(lambda: os.listdir(spool_dir) == [], 10, "the temp file removed")


async def test_source_cookies_are_not_kept(
    files: FileServer, make_settings: Callable[..., Settings]
) -> None:
    """A cookie a source server sets is not sent back on a later request (sources are unrelated)."""
    files.add("/tracked.csv", b"a,b\n1,2\n", headers={"Set-Cookie": "session=from-source; Path=/"})
    # By name: aiohttp's jar would ignore cookies of a bare IP address anyway.
    url = f"http://localhost:{files.port}/tracked.csv"
    request = UploadRequest.model_validate(inconvo_request(url))
    settings = make_settings(source_allowed_hosts=(f"localhost:{files.port}",))
    async with pipeline_for(settings) as pipeline:
        first = await pipeline.process(request, "r-1")
        second = await pipeline.process(request, "r-2")
    assert first.error is None and second.error is None
    assert len(files.hit_headers) == 2
    assert "Cookie" not in files.hit_headers[1]


async def test_request_with_a_broken_traceparent_still_succeeds(
    stage: Stage,
    service: Service,
) -> None:
    """A traceparent with a trailing newline is dropped: the upload succeeds, nothing carries it on."""
    url = stage.files.add("/traced.csv", b"a\n1\n")
    broken = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\n"
    await stage.publish(inconvo_request(url, "traced"), headers={"traceparent": broken})
    [event] = await stage.collector.wait_for(1)
    assert event["data"]["status"] == "succeeded", event["data"]
    assert "traceparent" not in (stage.collector.messages[0].headers or {})
    assert "traceparent" not in stage.files.hit_headers[0]
    assert len(stage.inconvo.uploads) == 1
