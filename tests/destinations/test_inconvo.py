"""The Inconvo adapter against the strict fake: routes, scopes, errors, prechecks."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
from pydantic import SecretStr

from service.destinations.base import error_message
from service.destinations.inconvo import Inconvo, dataset_path, upload_name
from service.errors import CourierError, ErrorCode
from service.messages import parse_request
from service.sources.guard import AddressPolicy, guarded_connector, parse_allowed_hosts
from service.sources.http import HttpSource
from testbed.fakes import FakeInconvo
from testbed.support import FileServer
from tests.conftest import INCONVO_KEY

pytestmark = pytest.mark.usefixtures("fast_retries")


@pytest.fixture
async def parts(files: FileServer) -> AsyncIterator[tuple[aiohttp.ClientSession, HttpSource]]:
    """An API session and a source that reaches only the file server."""
    policy = AddressPolicy(allowed_hosts=parse_allowed_hosts([f"127.0.0.1:{files.port}"]))
    async with (
        aiohttp.ClientSession(connector=guarded_connector(policy)) as source_session,
        aiohttp.ClientSession() as api,
    ):
        yield api, HttpSource(source_session, policy)


def _request(url: str, **destination: Any) -> Any:
    body = {"source": {"url": url}, "destination": {"type": "inconvo", **destination}}
    return parse_request(orjson.dumps(body), 1 << 20)


def _adapter(api: aiohttp.ClientSession, fake: FakeInconvo, **kwargs: Any) -> Inconvo:
    return Inconvo(
        api, base_url=fake.base_url, api_key=kwargs.pop("key", SecretStr(INCONVO_KEY)), **kwargs
    )


async def test_user_scope_upload(
    parts: tuple[aiohttp.ClientSession, HttpSource], files: FileServer, inconvo: FakeInconvo
) -> None:
    """A CSV is uploaded as a multipart file part with notes, and the answer is the result."""
    api, source = parts
    url = files.add("/q4/sales.csv", b"region,total\neu,10\n")
    delivered = await _adapter(api, inconvo).deliver(
        _request(url, userIdentifier="john.doe@example.com", notes="Q4"), source, "r-1"
    )
    [upload] = inconvo.uploads
    assert upload.user_identifier == "john.doe@example.com"
    assert (upload.file_name, upload.content, upload.notes) == (
        "sales.csv",
        b"region,total\neu,10\n",
        "Q4",
    )
    assert upload.content_type == "text/csv"
    assert upload.agent_id is None
    assert delivered.result == {"file": {"name": "sales.csv", "path": upload.path, "size": 19}}
    assert delivered.delivery == "multipart"
    assert delivered.source.bytes == 19


async def test_context_scope_and_agent_routes(
    parts: tuple[aiohttp.ClientSession, HttpSource], files: FileServer, inconvo: FakeInconvo
) -> None:
    """Context scope uses its route; an agent id (configured or per request) selects the agent route."""
    api, source = parts
    url = files.add("/p.json", b"[]", content_type="application/json")
    await _adapter(api, inconvo).deliver(
        _request(url, contextKey="orgId", contextValue="org_456"), source, "r-1"
    )
    await _adapter(api, inconvo, agent_id="agt_conf").deliver(
        _request(url, userIdentifier="u1"), source, "r-1"
    )
    await _adapter(api, inconvo, agent_id="agt_conf").deliver(
        _request(url, userIdentifier="u1", agentId="agt_req"), source, "r-1"
    )
    first, second, third = inconvo.uploads
    assert (first.context_key, first.context_value, first.agent_id) == ("orgId", "org_456", None)
    assert second.agent_id == "agt_conf"
    assert third.agent_id == "agt_req"
    assert first.content_type == "application/json"


async def test_destination_file_name_override(
    parts: tuple[aiohttp.ClientSession, HttpSource], files: FileServer, inconvo: FakeInconvo
) -> None:
    """destination.fileName replaces the source's name."""
    api, source = parts
    url = files.add("/export", b"a\n", content_type="text/plain")
    await _adapter(api, inconvo).deliver(
        _request(url, userIdentifier="u", fileName="renamed.csv"), source, "r-1"
    )
    assert inconvo.uploads[0].file_name == "renamed.csv"


@pytest.mark.parametrize(
    ("status", "code", "retryable"),
    [
        (400, ErrorCode.DESTINATION_REJECTED, False),
        (401, ErrorCode.DESTINATION_REJECTED, False),
        (403, ErrorCode.DESTINATION_REJECTED, False),
        (404, ErrorCode.DESTINATION_REJECTED, False),
        (408, ErrorCode.DESTINATION_UNAVAILABLE, True),
        (409, ErrorCode.DESTINATION_UNAVAILABLE, True),
        (429, ErrorCode.DESTINATION_UNAVAILABLE, True),
        (500, ErrorCode.DESTINATION_UNAVAILABLE, True),
        (503, ErrorCode.DESTINATION_UNAVAILABLE, True),
    ],
)
async def test_error_statuses(
    parts: tuple[aiohttp.ClientSession, HttpSource],
    files: FileServer,
    inconvo: FakeInconvo,
    status: int,
    code: ErrorCode,
    retryable: bool,
) -> None:
    """Each documented status maps to the contract's code, with httpStatus and the API's message."""
    api, source = parts
    url = files.add("/a.csv", b"1\n")
    inconvo.fail_next(status, count=3, body={"error": "nope from inconvo"})
    with pytest.raises(CourierError) as info:
        await _adapter(api, inconvo).deliver(_request(url, userIdentifier="u"), source, "r-1")
    error = info.value
    assert (error.code, error.http_status, error.retryable) == (code, status, retryable)
    assert "nope from inconvo" in error.message
    assert len(inconvo.requests) == (3 if retryable else 1)


async def test_transient_error_then_success(
    parts: tuple[aiohttp.ClientSession, HttpSource], files: FileServer, inconvo: FakeInconvo
) -> None:
    """A 500 followed by success is retried in-process and succeeds."""
    api, source = parts
    url = files.add("/a.csv", b"1\n")
    inconvo.fail_next(500, count=2)
    delivered = await _adapter(api, inconvo).deliver(
        _request(url, userIdentifier="u"), source, "r-1"
    )
    assert delivered.result["file"]["name"] == "a.csv"
    assert len(inconvo.uploads) == 1


async def test_wrong_key_is_rejected(
    parts: tuple[aiohttp.ClientSession, HttpSource], files: FileServer, inconvo: FakeInconvo
) -> None:
    """A wrong key is destination_rejected with the 401 the fake answered."""
    api, source = parts
    url = files.add("/a.csv", b"1\n")
    adapter = _adapter(api, inconvo, key=SecretStr("wrong-key"))
    with pytest.raises(CourierError) as info:
        await adapter.deliver(_request(url, userIdentifier="u"), source, "r-1")
    assert (info.value.code, info.value.http_status) == (ErrorCode.DESTINATION_REJECTED, 401)
    assert inconvo.uploads == []


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"error": "File exceeds 10MB limit"}', "File exceeds 10MB limit"),
        (b'{"error": {"message": "Bad scope", "type": "invalid", "code": "scope"}}', "Bad scope"),
        (b'{"file": {"name": "a.csv", "error": "Invalid file type"}}', "Invalid file type"),
        (b"plain text failure", "plain text failure"),
        (b"", None),
    ],
)
def test_error_body_shapes(body: bytes, message: str | None) -> None:
    """All three error-body shapes (and plain text) yield the API's message."""
    assert error_message(body) == message


@pytest.mark.parametrize(
    ("name", "code"),
    [
        ("report.xlsx", ErrorCode.UNSUPPORTED_TYPE),
        ("report", ErrorCode.UNSUPPORTED_TYPE),
        ("..csv", ErrorCode.INVALID_REQUEST),
        ("a\\b.csv", ErrorCode.INVALID_REQUEST),
        ("a\nb.csv", ErrorCode.INVALID_REQUEST),
    ],
)
def test_upload_name_rules(name: str, code: ErrorCode) -> None:
    """File names are checked as Inconvo would, before any upload."""
    with pytest.raises(CourierError) as info:
        upload_name(name)
    assert info.value.code is code


def test_upload_name_accepts_case_insensitive_extensions() -> None:
    """.CSV and .Json are fine; surrounding spaces are trimmed."""
    assert upload_name(" DATA.CSV ") == "DATA.CSV"
    assert upload_name("x.Json") == "x.Json"


async def test_oversized_file_is_too_large_with_nothing_uploaded(
    parts: tuple[aiohttp.ClientSession, HttpSource], files: FileServer, inconvo: FakeInconvo
) -> None:
    """Over 10 MiB fails too_large before any upload is attempted."""
    api, source = parts
    url = files.add("/big.csv", stream_bytes=10 * 1024 * 1024 + 65536)
    with pytest.raises(CourierError) as info:
        await _adapter(api, inconvo).deliver(_request(url, userIdentifier="u"), source, "r-1")
    assert info.value.code is ErrorCode.TOO_LARGE
    assert inconvo.requests == []


async def test_path_segments_are_url_encoded(
    parts: tuple[aiohttp.ClientSession, HttpSource], files: FileServer, inconvo: FakeInconvo
) -> None:
    """Identifiers are percent-encoded into the path and reach the API intact."""
    api, source = parts
    request = _request(files.add("/a.csv", b"1\n"), userIdentifier="a.b@c-d_e", agentId="ag@1")
    assert dataset_path(request.destination, None) == "/agents/ag%401/datasets/user/a.b%40c-d_e"
    await _adapter(api, inconvo).deliver(request, source, "r-1")
    assert (inconvo.uploads[0].user_identifier, inconvo.uploads[0].agent_id) == (
        "a.b@c-d_e",
        "ag@1",
    )
