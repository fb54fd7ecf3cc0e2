"""The fakes of the destination APIs accept good requests and refuse what the real ones would."""

from __future__ import annotations

import asyncio
import base64
import io
import math
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import urlencode

import aiohttp
import pytest

from testbed.fakes import DeletedDataset, DeletedFile, FakeInconvo, FakeMindset, IngestionRule
from testbed.fakes._server import SlidingWindow, retry_after_headers
from testbed.support import FileServer

KEY = "test-inconvo-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MINDSET_KEY = "test-mindset-key"
MINDSET_AUTH = {"x-api-key": MINDSET_KEY}
MIB10 = 10 * 1024 * 1024
MP4 = "video/mp4"
PDF = "application/pdf"
DOCX = "application/vnd.openxmlformats-officedocument.wordprocessingml.document"
PPTX = "application/vnd.openxmlformats-officedocument.presentationml.presentation"


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """A client session."""
    async with aiohttp.ClientSession() as client:
        yield client


@pytest.fixture
async def fake_inconvo() -> AsyncIterator[FakeInconvo]:
    """A running fake Inconvo."""
    async with FakeInconvo() as fake:
        yield fake


@pytest.fixture
async def fake_mindset() -> AsyncIterator[FakeMindset]:
    """A running fake Mindset."""
    async with FakeMindset() as fake:
        yield fake


def csv_form(
    name: str = "data.csv", content: bytes = b"a,b\n1,2\n", notes: str | None = None
) -> aiohttp.FormData:
    """A form with one CSV file part; the file name is sent unencoded, as browsers do."""
    form = aiohttp.FormData(quote_fields=False)
    form.add_field("file", io.BytesIO(content), filename=name, content_type="text/csv")
    if notes is not None:
        form.add_field("notes", notes)
    return form


def raw_form(*parts: tuple[str, bytes, str | None]) -> aiohttp.MultipartWriter:
    """A multipart/form-data body from (name, value, filename or None) parts."""
    writer = aiohttp.MultipartWriter("form-data")
    for name, value, filename in parts:
        params = {"name": name} if filename is None else {"name": name, "filename": filename}
        writer.append(value).set_content_disposition("form-data", quote_fields=False, **params)
    return writer


async def eventually(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Return once ``condition()`` holds, polling the fake's state; fail after ``timeout``."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.005)


async def call(
    session: aiohttp.ClientSession, method: str, url: str, **kwargs: Any
) -> tuple[int, Any]:
    """The status and JSON body of a request."""
    async with session.request(method, url, **kwargs) as response:
        return response.status, await response.json(content_type=None)


# -- Inconvo -------------------------------------------------------------------------------


async def test_inconvo_user_upload_accepted(
    fake_inconvo: FakeInconvo, session: aiohttp.ClientSession
) -> None:
    """A good user-scoped upload is answered with the file and recorded."""
    url = fake_inconvo.base_url + "/datasets/user/user_123"
    status, body = await call(session, "POST", url, data=csv_form(notes="Q4 data"), headers=AUTH)
    assert status == 200
    assert body == {
        "file": {
            "name": "data.csv",
            "path": "org_test/agt_default/userIdentifier/user_123/data.csv",
            "size": 8,
        }
    }
    [upload] = fake_inconvo.uploads
    assert (upload.scope, upload.agent_id, upload.user_identifier) == (
        "userIdentifier/user_123",
        None,
        "user_123",
    )
    assert (upload.content, upload.content_type, upload.notes) == (
        b"a,b\n1,2\n",
        "text/csv",
        "Q4 data",
    )
    assert upload.headers["authorization"] == f"Bearer {KEY}"
    assert fake_inconvo.files == {upload.path: b"a,b\n1,2\n"}


@pytest.mark.parametrize(
    ("route", "path"),
    [
        ("/datasets/context/orgId/org_456", "org_test/agt_default/userContext/orgId:org_456"),
        (
            "/agents/agt_x/datasets/user/john.doe%40example.com",
            "org_test/agt_x/userIdentifier/john.doe@example.com",
        ),
        ("/agents/agt_x/datasets/context/org.Id-1/v_1", "org_test/agt_x/userContext/org.Id-1:v_1"),
        ("/datasets/user/" + "u" * 256, "org_test/agt_default/userIdentifier/" + "u" * 256),
    ],
)
async def test_inconvo_scoped_routes(
    fake_inconvo: FakeInconvo, session: aiohttp.ClientSession, route: str, path: str
) -> None:
    """Context-scoped and agent-scoped routes store under the matching path."""
    status, body = await call(
        session, "POST", fake_inconvo.base_url + route, data=csv_form("x.json"), headers=AUTH
    )
    assert status == 200
    assert body["file"]["path"] == path + "/x.json"
    assert fake_inconvo.uploads[0].path == path + "/x.json"


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"X-Api-Key": KEY}],
)
async def test_inconvo_rejects_bad_auth(
    fake_inconvo: FakeInconvo, session: aiohttp.ClientSession, headers: dict[str, str]
) -> None:
    """A missing or wrong bearer key is a 401."""
    url = fake_inconvo.base_url + "/datasets/user/u1"
    status, body = await call(session, "POST", url, data=csv_form(), headers=headers)
    assert (status, body) == (401, {"error": "Unauthorized"})
    assert fake_inconvo.uploads == []
    assert [(r.method, r.status) for r in fake_inconvo.requests] == [("POST", 401)]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"json": {"file": "a,b"}},
        {"data": {"file": "a,b"}},
        {"data": b"a,b\n", "headers": {"Content-Type": "text/csv"}},
        {"data": b"a,b\n", "headers": {"Content-Type": "multipart/form-data"}},
    ],
)
async def test_inconvo_requires_multipart(
    fake_inconvo: FakeInconvo, session: aiohttp.ClientSession, kwargs: dict[str, Any]
) -> None:
    """A body that is not multipart/form-data is a 400."""
    headers = {**AUTH, **kwargs.pop("headers", {})}
    url = fake_inconvo.base_url + "/datasets/user/u1"
    status, body = await call(session, "POST", url, headers=headers, **kwargs)
    assert status == 400
    assert "multipart" in body["error"]


@pytest.mark.parametrize(
    "parts",
    [
        [("notes", b"only notes", None)],
        [("file", b"a,b", None)],
        [("file", b"a,b", "a.csv"), ("extra", b"x", None)],
        [("file", b"a,b", "a.csv"), ("file", b"c,d", "b.csv")],
        [("upload", b"a,b", "a.csv")],
        [("file", b"a,b", "a.csv"), ("notes", b"n", "notes.txt")],
        [("file", b"a,b", "a.csv"), ("notes", b"n", None), ("notes", b"m", None)],
    ],
    ids=["no-file", "no-filename", "extra", "two-files", "wrong-name", "notes-file", "two-notes"],
)
async def test_inconvo_rejects_bad_forms(
    fake_inconvo: FakeInconvo,
    session: aiohttp.ClientSession,
    parts: list[tuple[str, bytes, str | None]],
) -> None:
    """Only one `file` part with a filename and an optional text `notes` part are allowed."""
    url = fake_inconvo.base_url + "/datasets/user/u1"
    status, _ = await call(session, "POST", url, data=raw_form(*parts), headers=AUTH)
    assert status == 400
    assert fake_inconvo.uploads == []


@pytest.mark.parametrize(
    "route",
    [
        "/datasets/user/a%20b",
        "/datasets/user/user:1",
        "/datasets/user/a%2Fb",
        "/datasets/user/" + "u" * 257,
        "/datasets/context/org@id/v1",
        "/datasets/context/orgId/v:1",
        "/datasets/context/orgId/" + "v" * 257,
        "/agents/agt_x/datasets/context/" + "k" * 257 + "/v1",
    ],
)
async def test_inconvo_rejects_bad_path_params(
    fake_inconvo: FakeInconvo, session: aiohttp.ClientSession, route: str
) -> None:
    """userIdentifier, contextKey and contextValue must match their patterns and lengths."""
    url = fake_inconvo.base_url + route
    status, body = await call(session, "POST", url, data=csv_form(), headers=AUTH)
    assert status == 400
    assert body["error"].startswith("Invalid")


@pytest.mark.parametrize(
    "name", ["data.txt", "data.csv.exe", "data", "../data.csv", "a/b.csv", "a\\b.csv", "a..csv"]
)
async def test_inconvo_rejects_bad_file_names(
    fake_inconvo: FakeInconvo, session: aiohttp.ClientSession, name: str
) -> None:
    """File names must end in .csv/.json and hold no `..`, `/` or `\\`."""
    url = fake_inconvo.base_url + "/datasets/user/u1"
    status, _ = await call(session, "POST", url, data=csv_form(name), headers=AUTH)
    assert status == 400


@pytest.mark.parametrize(
    ("sent", "stored"),
    [("  my  sales file.CSV ", "my_sales_file.CSV"), ("Data.Json", "Data.Json")],
)
async def test_inconvo_normalises_file_names(
    fake_inconvo: FakeInconvo, session: aiohttp.ClientSession, sent: str, stored: str
) -> None:
    """Extensions match case-insensitively; names are trimmed and spaces become `_`."""
    url = fake_inconvo.base_url + "/datasets/user/u1"
    status, body = await call(session, "POST", url, data=csv_form(sent), headers=AUTH)
    assert (status, body["file"]["name"]) == (200, stored)
    assert fake_inconvo.uploads[0].raw_file_name == sent


async def test_inconvo_size_limit(
    fake_inconvo: FakeInconvo, session: aiohttp.ClientSession
) -> None:
    """Exactly 10 MiB is accepted; one byte more is a 400 with the documented message."""
    url = fake_inconvo.base_url + "/datasets/user/u1"
    content = b"x" * MIB10
    status, body = await call(session, "POST", url, data=csv_form(content=content), headers=AUTH)
    assert (status, body["file"]["size"]) == (200, MIB10)
    status, body = await call(
        session, "POST", url, data=csv_form("big.csv", content + b"x"), headers=AUTH
    )
    assert (status, body) == (400, {"error": "File exceeds 10MB limit"})
    assert [u.file_name for u in fake_inconvo.uploads] == ["data.csv"]


async def test_inconvo_accepts_chunked_upload(
    fake_inconvo: FakeInconvo, session: aiohttp.ClientSession
) -> None:
    """A streamed body without Content-Length is measured while read."""

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(4):
            yield b"1,2\n"

    writer = aiohttp.MultipartWriter("form-data")
    writer.append(chunks()).set_content_disposition("form-data", name="file", filename="s.csv")
    url = fake_inconvo.base_url + "/datasets/user/u1"
    status, body = await call(session, "POST", url, data=writer, headers=AUTH)
    assert (status, body["file"]["size"]) == (200, 16)
    assert "Content-Length" not in fake_inconvo.uploads[0].headers


async def test_inconvo_context_scope_limit(
    fake_inconvo: FakeInconvo, session: aiohttp.ClientSession
) -> None:
    """A fourth context scope of one agent is a 400; user scopes and other agents don't count."""
    base = fake_inconvo.base_url

    async def upload(route: str) -> int:
        status, _ = await call(session, "POST", base + route, data=csv_form(), headers=AUTH)
        return status

    for value in ("v1", "v2", "v3"):
        assert await upload(f"/datasets/context/orgId/{value}") == 200
    assert await upload("/datasets/context/orgId/v1") == 200
    assert await upload("/datasets/user/u1") == 200
    assert await upload("/agents/agt_other/datasets/context/orgId/v4") == 200
    assert await upload("/datasets/context/orgId/v4") == 400
    assert await upload("/datasets/context/teamId/v1") == 400


async def test_inconvo_overwrite_list_delete(
    fake_inconvo: FakeInconvo, session: aiohttp.ClientSession
) -> None:
    """The same name in the same scope overwrites; GET lists and DELETE removes files."""
    url = fake_inconvo.base_url + "/agents/agt_x/datasets/user/u1"
    for content in (b"old\n", b"new\n"):
        status, _ = await call(session, "POST", url, data=csv_form(content=content), headers=AUTH)
        assert status == 200
    assert await call(session, "GET", url, headers=AUTH) == (200, {"files": ["data.csv"]})
    assert fake_inconvo.files == {"org_test/agt_x/userIdentifier/u1/data.csv": b"new\n"}
    deleted = await call(session, "DELETE", url + "/data.csv", headers=AUTH)
    assert deleted == (200, {"file": "data.csv", "success": True})
    assert fake_inconvo.deletes == [
        DeletedDataset(
            "userIdentifier/u1", "data.csv", "agt_x", "org_test/agt_x/userIdentifier/u1/data.csv"
        )
    ]
    assert await call(session, "GET", url, headers=AUTH) == (200, {"files": []})
    assert (await call(session, "GET", url))[0] == 401
    assert (await call(session, "DELETE", url + "/data.csv"))[0] == 401


@pytest.mark.parametrize(
    "route",
    [
        "/datasets/user/u1",
        "/datasets/context/orgId/org_1",
        "/agents/agt_x/datasets/user/u1",
        "/agents/agt_x/datasets/context/orgId/org_1",
    ],
)
async def test_inconvo_delete_of_missing_file_is_404(
    fake_inconvo: FakeInconvo, session: aiohttp.ClientSession, route: str
) -> None:
    """Deleting a name the scope does not hold (never uploaded, or deleted) is a 404 on every route."""
    url = fake_inconvo.base_url + route
    missing = (404, {"file": "data.csv", "success": False, "error": "File not found"})
    assert await call(session, "DELETE", url + "/data.csv", headers=AUTH) == missing
    assert (await call(session, "POST", url, data=csv_form(), headers=AUTH))[0] == 200
    other_scope = fake_inconvo.base_url + "/agents/agt_other/datasets/user/u1/data.csv"
    assert (await call(session, "DELETE", other_scope, headers=AUTH))[0] == 404
    assert (await call(session, "DELETE", url + "/data.csv", headers=AUTH))[0] == 200
    assert await call(session, "DELETE", url + "/data.csv", headers=AUTH) == missing
    [deleted] = fake_inconvo.deletes
    assert (deleted.file_name, deleted.path) == ("data.csv", fake_inconvo.uploads[0].path)


BAD_TYPE = "Only .csv and .json files are supported"


@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        ("string", {"error": BAD_TYPE}),
        (
            "object",
            {
                "error": {
                    "message": BAD_TYPE,
                    "type": "invalid_request_error",
                    "code": "bad_request",
                }
            },
        ),
        ("file", {"file": {"name": "data.txt", "error": BAD_TYPE}}),
    ],
)
async def test_inconvo_error_shapes(
    fake_inconvo: FakeInconvo,
    session: aiohttp.ClientSession,
    shape: Any,
    expected: dict[str, Any],
) -> None:
    """Errors come in the configured one of the three known body shapes."""
    fake_inconvo.error_shape = shape
    url = fake_inconvo.base_url + "/datasets/user/u1"
    form = csv_form("data.txt")
    assert await call(session, "POST", url, data=form, headers=AUTH) == (400, expected)


async def test_inconvo_fail_next(fake_inconvo: FakeInconvo, session: aiohttp.ClientSession) -> None:
    """Queued failures answer instead of the API, in order, then normal service resumes."""
    fake_inconvo.fail_next(500, count=2)
    fake_inconvo.fail_next(429, headers={"Retry-After": "1"}, body={"error": "slow down"})
    url = fake_inconvo.base_url + "/datasets/user/u1"
    statuses = []
    for _ in range(3):
        async with session.post(url, data=csv_form(), headers=AUTH) as response:
            statuses.append(response.status)
            last = (response.headers.get("Retry-After"), await response.json())
    assert statuses == [500, 500, 429]
    assert last == ("1", {"error": "slow down"})
    assert fake_inconvo.uploads == []
    status, _ = await call(session, "POST", url, data=csv_form(), headers=AUTH)
    assert status == 200
    assert [r.status for r in fake_inconvo.requests] == [500, 500, 429, 200]


async def test_inconvo_fail_next_by_method_and_disconnect(
    fake_inconvo: FakeInconvo, session: aiohttp.ClientSession
) -> None:
    """A failure can target one method; a disconnect failure drops the connection."""
    fake_inconvo.fail_next(0, method="POST", disconnect=True)
    url = fake_inconvo.base_url + "/datasets/user/u1"
    assert (await call(session, "GET", url, headers=AUTH))[0] == 200
    with pytest.raises(aiohttp.ClientConnectionError):
        await call(session, "POST", url, data=csv_form(), headers=AUTH)
    assert fake_inconvo.uploads == []
    assert (await call(session, "POST", url, data=csv_form(), headers=AUTH))[0] == 200


async def test_fail_when_fails_one_user_until_cleared(
    fake_inconvo: FakeInconvo, session: aiohttp.ClientSession
) -> None:
    """A fail_when rule answers every upload of one user, forever, while others succeed; counted."""
    fake_inconvo.error_shape = "object"
    rule = fake_inconvo.fail_when(lambda r: r.match_info.get("userIdentifier") == "u1", 500)
    base = fake_inconvo.base_url
    for route in ("/datasets/user/u1", "/agents/agt_x/datasets/user/u1") * 2:
        answer = await call(session, "POST", base + route, data=csv_form(), headers=AUTH)
        assert answer == (
            500,
            {
                "error": {
                    "message": "Injected failure",
                    "type": "api_error",
                    "code": "internal_error",
                }
            },
        )
    assert (await call(session, "POST", base + "/datasets/user/u2", data=csv_form(), headers=AUTH))[
        0
    ] == 200
    assert rule.calls == 4
    assert [u.user_identifier for u in fake_inconvo.uploads] == ["u2"]
    fake_inconvo.clear_rule(rule)
    fake_inconvo.clear_rule(rule)  # idempotent
    assert (await call(session, "POST", base + "/datasets/user/u1", data=csv_form(), headers=AUTH))[
        0
    ] == 200
    assert rule.calls == 4


async def test_fail_when_precedes_queued_failures(
    fake_mindset: FakeMindset, session: aiohttp.ClientSession
) -> None:
    """A matching rule answers before the fail_next queue, which waits; clear_failures drops both."""
    url = files_url(fake_mindset)
    fake_mindset.fail_next(500)
    reads = fake_mindset.fail_when(
        lambda r: r.method == "GET", 503, headers={"Retry-After": "2"}, body="down"
    )
    cut = fake_mindset.fail_when(lambda r: "/externalId/cut" in r.path, disconnect=True)
    async with session.get(url + "/externalId/e1", headers=MINDSET_AUTH) as response:
        assert (response.status, response.headers["Retry-After"], await response.text()) == (
            503,
            "2",
            "down",
        )
    assert (await call(session, "POST", url, json=ingest_body(), headers=MINDSET_AUTH))[0] == 500
    assert (await call(session, "POST", url, json=ingest_body(), headers=MINDSET_AUTH))[0] == 200
    fake_mindset.clear_rule(reads)
    with pytest.raises(aiohttp.ClientConnectionError):
        await call(session, "GET", url + "/externalId/cut", headers=MINDSET_AUTH)
    # aiohttp retries an idempotent request once when a reused connection drops.
    cuts = sum(1 for r in fake_mindset.requests if r.path.endswith("/externalId/cut"))
    assert (reads.calls, cut.calls) == (1, cuts)
    assert cuts >= 1
    fake_mindset.fail_next(500)
    fake_mindset.clear_failures()
    assert (await call(session, "GET", url + "/externalId/cut", headers=MINDSET_AUTH))[0] == 404
    assert (await call(session, "POST", url, json=ingest_body(), headers=MINDSET_AUTH))[0] == 200
    assert cut.calls == cuts


async def test_inconvo_delays(fake_inconvo: FakeInconvo, session: aiohttp.ClientSession) -> None:
    """`delay` slows answers (a request whose client left is dropped); `delay_after` lands."""
    url = fake_inconvo.base_url + "/datasets/user/u1"
    fake_inconvo.delay = 0.2
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert (await call(session, "POST", url, data=csv_form(), headers=AUTH))[0] == 200
    assert loop.time() - started >= 0.2  # a lower bound: the fake sleeps on this loop
    # The client leaves while the fake sleeps (1 s, against a 5 ms poll): never handled.
    fake_inconvo.delay = 1.0
    gone = asyncio.create_task(call(session, "POST", url, data=csv_form("gone.csv"), headers=AUTH))
    await eventually(lambda: len(fake_inconvo.requests) == 2)
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    await eventually(lambda: fake_inconvo.requests[1].done)
    # The client leaves while the fake waits to answer: the upload has landed anyway.
    fake_inconvo.delay, fake_inconvo.delay_after = 0.0, 1.0
    late = asyncio.create_task(call(session, "POST", url, data=csv_form("late.csv"), headers=AUTH))
    await eventually(lambda: len(fake_inconvo.uploads) == 2)
    late.cancel()
    with pytest.raises(asyncio.CancelledError):
        await late
    assert [u.file_name for u in fake_inconvo.uploads] == ["data.csv", "late.csv"]
    await eventually(lambda: fake_inconvo.requests[2].done)
    assert [r.status for r in fake_inconvo.requests] == [200, 0, 200]


# -- Mindset -------------------------------------------------------------------------------


def files_url(fake: FakeMindset, app: str = "app1", context: str = "ctx1") -> str:
    """The ingest URL of an app's context."""
    return f"{fake.base_url}/api/v1/appuid/{app}/contexts/{context}/files"


def ingest_body(**fields: Any) -> dict[str, Any]:
    """A valid mp4 ingest body, with ``fields`` replaced (None removes a field)."""
    body: dict[str, Any] = {
        "name": "Intro video",
        "mimeType": MP4,
        "sourceUrl": "https://files.example.com/intro.mp4?X-Amz-Signature=abc",
    }
    body.update(fields)
    return {key: value for key, value in body.items() if value is not None}


async def test_mindset_ingest_accepted_and_looked_up(
    fake_mindset: FakeMindset, session: aiohttp.ClientSession
) -> None:
    """A full valid ingest returns the file object, is recorded and found by externalId."""
    body = ingest_body(
        externalId="ext-1",
        autoPublish=True,
        hideContentSegments=False,
        knownAs="video",
        externalUrl="https://example.com/v",
        thumbnailUrl="https://example.com/t.png",
        thumbnail=base64.b64encode(b"png").decode(),
        viewOriginalSource=True,
        contentHash="sha256:00",
        labels=["l1", "l2"],
        runId="run-9",
        zipType="",
    )
    url = files_url(fake_mindset)
    status, file = await call(session, "POST", url, json=body, headers=MINDSET_AUTH)
    assert status == 200
    assert file["status"] == "accepted"
    assert file["uid"]
    assert file["createdAt"].endswith("Z")
    echoed = {key: value for key, value in body.items() if key in file}
    assert set(echoed) == set(body) - {"sourceUrl", "zipType", "thumbnailUrl", "thumbnail"}
    assert echoed == {key: file[key] for key in echoed}
    [ingest] = fake_mindset.ingests
    assert (ingest.app_uid, ingest.context_uid, ingest.body) == ("app1", "ctx1", body)
    assert ingest.headers["X-API-KEY"] == MINDSET_KEY
    lookup = await call(session, "GET", url + "/externalId/ext-1", headers=MINDSET_AUTH)
    assert lookup == (200, file)
    fake_mindset.set_status(file["uid"], "published")
    lookup = await call(session, "GET", url + "/externalId/ext-1", headers=MINDSET_AUTH)
    assert lookup[1]["status"] == "published"
    missing = await call(session, "GET", url + "/externalId/nope", headers=MINDSET_AUTH)
    assert missing[0] == 404
    assert (await call(session, "GET", url + "/externalId/ext-1"))[0] == 401


@pytest.mark.parametrize("headers", [{}, {"x-api-key": "wrong"}, {"Authorization": MINDSET_KEY}])
async def test_mindset_rejects_bad_auth(
    fake_mindset: FakeMindset, session: aiohttp.ClientSession, headers: dict[str, str]
) -> None:
    """A missing or wrong x-api-key is a 401."""
    url = files_url(fake_mindset)
    status, _ = await call(session, "POST", url, json=ingest_body(), headers=headers)
    assert status == 401
    assert fake_mindset.ingests == []
    assert [r.status for r in fake_mindset.requests] == [401]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"data": "name=x", "headers": {"Content-Type": "application/x-www-form-urlencoded"}},
        {"data": "{not json", "headers": {"Content-Type": "application/json"}},
        {"json": [ingest_body()]},
    ],
    ids=["form", "bad-json", "array"],
)
async def test_mindset_requires_json_object(
    fake_mindset: FakeMindset, session: aiohttp.ClientSession, kwargs: dict[str, Any]
) -> None:
    """The body must be a JSON object sent as application/json."""
    headers = {**MINDSET_AUTH, **kwargs.pop("headers", {})}
    status, _ = await call(session, "POST", files_url(fake_mindset), headers=headers, **kwargs)
    assert status == 400


BAD_BODIES: dict[str, dict[str, Any]] = {
    "unknown-field": ingest_body(title="x"),
    "no-name": ingest_body(name=None),
    "empty-name": ingest_body(name=""),
    "long-name": ingest_body(name="n" * 101),
    "long-name-utf16": ingest_body(name="\U0001f600" * 51),
    "no-mime": ingest_body(mimeType=None),
    "bad-mime": ingest_body(mimeType="image/png"),
    "name-not-string": ingest_body(name=5),
    "externalId-number": ingest_body(externalId=12),
    "null-field": ingest_body(knownAs=None) | {"knownAs": None},
    "bool-as-string": ingest_body(autoPublish="true"),
    "bool-as-int": ingest_body(hideContentSegments=1),
    "view-as-string": ingest_body(viewOriginalSource="yes"),
    "labels-string": ingest_body(labels="l1"),
    "labels-numbers": ingest_body(labels=[1]),
    "labels-11": ingest_body(labels=[f"l{i}" for i in range(11)]),
    "zipType-21": ingest_body(mimeType="application/zip", zipType="z" * 21),
    "sourceUrl-2049": ingest_body(sourceUrl="https://e.com/" + "a" * 2035),
    "sourceUrl-not-url": ingest_body(sourceUrl="intro.mp4"),
    "documentContent-65537": ingest_body(
        mimeType="text/plain", sourceUrl=None, documentContent="d" * 65537
    ),
    "knownAs-201": ingest_body(knownAs="k" * 201),
    "externalUrl-2049": ingest_body(externalUrl="https://e.com/" + "a" * 2035),
    "thumbnailUrl-2049": ingest_body(thumbnailUrl="https://e.com/" + "a" * 2035),
    "thumbnail-65537": ingest_body(thumbnail="A" * 65537),
    "thumbnail-not-base64": ingest_body(thumbnail="not base64!"),
    "contentHash-201": ingest_body(contentHash="h" * 201),
    "runId-201": ingest_body(runId="r" * 201),
    "both-contents": ingest_body(mimeType="text/html", documentContent="<p>x</p>"),
    "no-content": ingest_body(sourceUrl=None),
    "empty-content": ingest_body(mimeType="text/plain", sourceUrl=None, documentContent=""),
    "text-by-url": ingest_body(mimeType="text/plain"),
    "pdf-not-base64": ingest_body(mimeType=PDF, sourceUrl=None, documentContent="%PDF-1.4 x"),
    **{
        f"{mime}-by-content": ingest_body(mimeType=mime, sourceUrl=None, documentContent="eA==")
        for mime in (MP4, "audio/mpeg", PPTX, DOCX, "application/zip")
    },
}


@pytest.mark.parametrize("body", list(BAD_BODIES.values()), ids=list(BAD_BODIES))
async def test_mindset_rejects_invalid_bodies(
    fake_mindset: FakeMindset, session: aiohttp.ClientSession, body: dict[str, Any]
) -> None:
    """Each documented field rule is enforced with a 400."""
    url = files_url(fake_mindset)
    status, answer = await call(session, "POST", url, json=body, headers=MINDSET_AUTH)
    assert status == 400, answer
    assert fake_mindset.ingests == []


GOOD_BODIES: dict[str, dict[str, Any]] = {
    "limits": ingest_body(
        name="n" * 100,
        mimeType="application/zip",
        zipType="z" * 20,
        sourceUrl="https://e.com/" + "a" * 2034,
        knownAs="k" * 200,
        externalUrl="https://e.com/" + "a" * 2034,
        thumbnailUrl="https://e.com/" + "a" * 2034,
        thumbnail="A" * 65536,
        contentHash="h" * 200,
        runId="r" * 200,
        labels=[f"l{i}" for i in range(10)],
    ),
    "text": ingest_body(mimeType="text/plain", sourceUrl=None, documentContent="d" * 65536),
    "html-content": ingest_body(mimeType="text/html", sourceUrl=None, documentContent="<p>x</p>"),
    "html-url": ingest_body(mimeType="text/html", sourceUrl="http://e.com/p.html"),
    "pdf-base64": ingest_body(
        mimeType=PDF, sourceUrl=None, documentContent=base64.b64encode(b"%PDF-1.4").decode()
    ),
    "pdf-url": ingest_body(mimeType=PDF, sourceUrl="https://e.com/a.pdf"),
    "docx-url": ingest_body(mimeType=DOCX),
}


@pytest.mark.parametrize("body", list(GOOD_BODIES.values()), ids=list(GOOD_BODIES))
async def test_mindset_accepts_valid_bodies(
    fake_mindset: FakeMindset, session: aiohttp.ClientSession, body: dict[str, Any]
) -> None:
    """Values at the limits and every allowed content/MIME type pairing are accepted."""
    url = files_url(fake_mindset)
    status, answer = await call(session, "POST", url, json=body, headers=MINDSET_AUTH)
    assert status == 200, answer
    assert fake_mindset.ingests[0].body == body


async def test_mindset_external_id_unique(
    fake_mindset: FakeMindset, session: aiohttp.ClientSession
) -> None:
    """A repeated externalId in one app context is a 409; other contexts are separate."""

    async def ingest(context: str, **fields: Any) -> tuple[int, Any]:
        url = files_url(fake_mindset, context=context)
        return await call(session, "POST", url, json=ingest_body(**fields), headers=MINDSET_AUTH)

    assert (await ingest("ctx1", externalId="e1"))[0] == 200
    assert await ingest("ctx1", externalId="e1", name="Other") == (
        409,
        {"error": "externalId already exists"},
    )
    assert (await ingest("ctx2", externalId="e1"))[0] == 200
    assert (await ingest("ctx1"))[0] == 200
    assert (await ingest("ctx1"))[0] == 200
    assert len(fake_mindset.ingests) == 4


async def test_mindset_fail_next_and_delay(
    fake_mindset: FakeMindset, session: aiohttp.ClientSession
) -> None:
    """Queued failures answer first; `delay` slows answers; requests are all logged."""
    fake_mindset.fail_next(503, headers={"Retry-After": "0"}, body="unavailable")
    url = files_url(fake_mindset)
    async with session.post(url, json=ingest_body(), headers=MINDSET_AUTH) as response:
        assert (response.status, await response.text()) == (503, "unavailable")
        assert response.headers["Retry-After"] == "0"
    fake_mindset.delay = 0.1
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert (await call(session, "POST", url, json=ingest_body(), headers=MINDSET_AUTH))[0] == 200
    assert loop.time() - started >= 0.1
    assert [(r.method, r.status) for r in fake_mindset.requests] == [("POST", 503), ("POST", 200)]
    assert len(fake_mindset.ingests) == 1


# -- Mindset: a file's life -----------------------------------------------------------


async def ingest(
    session: aiohttp.ClientSession, fake: FakeMindset, context: str = "ctx1", **fields: Any
) -> dict[str, Any]:
    """Ingest a valid mp4 body with ``fields`` into app1/``context``; the file object."""
    url = files_url(fake, context=context)
    status, file = await call(
        session, "POST", url, json=ingest_body(**fields), headers=MINDSET_AUTH
    )
    assert status == 200, file
    assert file["status"] == "accepted"
    return dict(file)


async def read(
    session: aiohttp.ClientSession, fake: FakeMindset, suffix: str, context: str = "ctx1"
) -> tuple[int, Any]:
    """GET ``files_url + suffix`` (``/uid/...``, ``/externalId/...`` or ``?query``)."""
    return await call(
        session, "GET", files_url(fake, context=context) + suffix, headers=MINDSET_AUTH
    )


async def test_mindset_default_rule_stays_accepted(
    fake_mindset: FakeMindset, session: aiohttp.ClientSession
) -> None:
    """By default a file stays accepted however often it is read, even with autoPublish."""
    file = await ingest(session, fake_mindset, externalId="e1", autoPublish=True)
    for suffix in ("/uid/" + file["uid"], "/externalId/e1") * 3:
        assert await read(session, fake_mindset, suffix) == (200, file)
    assert fake_mindset.ingestion == IngestionRule()
    assert fake_mindset.reads_of(uid=file["uid"]) == 6


async def test_mindset_count_based_transition(
    fake_mindset: FakeMindset, session: aiohttp.ClientSession
) -> None:
    """after_reads=2: the first two reads (by uid or externalId) answer accepted, the third the fate."""
    fake_mindset.ingestion = IngestionRule("published", after_reads=2)
    file = await ingest(session, fake_mindset, externalId="e1")
    uid = file["uid"]
    assert (await read(session, fake_mindset, "/uid/" + uid))[1]["status"] == "accepted"
    assert (await read(session, fake_mindset, "/externalId/e1"))[1]["status"] == "accepted"
    assert fake_mindset.file(uid) == {**file, "status": "published"}
    assert await read(session, fake_mindset, "/uid/" + uid) == (
        200,
        {**file, "status": "published"},
    )
    assert (await read(session, fake_mindset, "/externalId/e1"))[1]["status"] == "published"
    assert fake_mindset.reads_of(uid=uid) == 4
    assert fake_mindset.reads_of(external_id="e1") == 4
    assert [(r.via, r.status) for r in fake_mindset.reads] == [
        ("uid", "accepted"),
        ("externalId", "accepted"),
        ("uid", "published"),
        ("externalId", "published"),
    ]


@pytest.mark.parametrize(
    ("fate", "auto_publish", "status"),
    [
        ("readyForPublication", None, "readyForPublication"),
        ("published", False, "published"),
        ("fail", True, "fail"),
        ("ingested", True, "published"),
        ("ingested", False, "readyForPublication"),
        ("ingested", None, "readyForPublication"),
    ],
)
async def test_mindset_fates_on_first_read(
    fake_mindset: FakeMindset,
    session: aiohttp.ClientSession,
    fate: Any,
    auto_publish: bool | None,
    status: str,
) -> None:
    """The ingest answers accepted; with after_reads=0 (or no when) the first read sees the fate."""
    for when in ({"after_reads": 0}, {}):
        fake_mindset.ingestion = IngestionRule(fate, **when)
        file = await ingest(session, fake_mindset, autoPublish=auto_publish)
        assert (await read(session, fake_mindset, "/uid/" + file["uid"]))[1]["status"] == status


async def test_mindset_gone_after_reads_frees_external_id(
    fake_mindset: FakeMindset, session: aiohttp.ClientSession
) -> None:
    """A file whose fate is gone vanishes after its reads: 404 by uid and externalId, which is free."""
    fake_mindset.ingestion = IngestionRule("gone", after_reads=1)
    file = await ingest(session, fake_mindset, externalId="e1")
    uid = file["uid"]
    assert await read(session, fake_mindset, "/externalId/e1") == (200, file)
    assert (await read(session, fake_mindset, "/uid/" + uid))[0] == 404
    assert (await read(session, fake_mindset, "/externalId/e1"))[0] == 404
    assert fake_mindset.file(uid) is None
    assert fake_mindset.files == []
    assert fake_mindset.reads_of(uid=uid) == 2  # the hit, and the 404 asked by uid
    assert fake_mindset.reads_of(external_id="e1") == 2  # the hit, and the 404 asked by externalId
    fake_mindset.ingestion = IngestionRule()
    again = await ingest(session, fake_mindset, externalId="e1")
    assert again["uid"] != uid
    assert await read(session, fake_mindset, "/externalId/e1") == (200, again)


async def test_mindset_time_based_transition(
    fake_mindset: FakeMindset, session: aiohttp.ClientSession
) -> None:
    """after_seconds moves the file on by itself on the loop clock, without any read."""
    fake_mindset.ingestion = IngestionRule("fail", after_seconds=0.05)
    file = await ingest(session, fake_mindset, externalId="e1")
    await eventually(lambda: fake_mindset.files[0]["status"] == "fail")
    assert fake_mindset.reads == []
    assert (await read(session, fake_mindset, "/externalId/e1"))[1] == {**file, "status": "fail"}


async def test_mindset_time_based_gone(
    fake_mindset: FakeMindset, session: aiohttp.ClientSession
) -> None:
    """A timed gone fate removes the file by itself; its externalId can be ingested again."""
    fake_mindset.ingestion = IngestionRule("gone", after_seconds=0.05)
    file = await ingest(session, fake_mindset, externalId="e1")
    await eventually(lambda: fake_mindset.file(file["uid"]) is None)
    assert (await read(session, fake_mindset, "/uid/" + file["uid"]))[0] == 404
    fake_mindset.ingestion = IngestionRule()
    await ingest(session, fake_mindset, externalId="e1")


async def test_mindset_reads_or_seconds_whichever_first(
    fake_mindset: FakeMindset, session: aiohttp.ClientSession
) -> None:
    """With both whens the first to come wins: here the read, long before an hour's timer."""
    fake_mindset.ingestion = IngestionRule("readyForPublication", after_reads=1, after_seconds=3600)
    file = await ingest(session, fake_mindset)
    assert (await read(session, fake_mindset, "/uid/" + file["uid"]))[1]["status"] == "accepted"
    assert (await read(session, fake_mindset, "/uid/" + file["uid"]))[1]["status"] == (
        "readyForPublication"
    )
    fake_mindset.ingestion = IngestionRule("published", after_reads=1000, after_seconds=0.01)
    timed = await ingest(session, fake_mindset)
    await eventually(lambda: fake_mindset.file(timed["uid"]) == {**timed, "status": "published"})


async def test_mindset_rule_per_file_from_body(
    fake_mindset: FakeMindset, session: aiohttp.ClientSession
) -> None:
    """A callable rule picks each file's fate from its ingest body."""
    bodies: list[dict[str, Any]] = []

    def rule(body: dict[str, Any]) -> IngestionRule:
        bodies.append(body)
        if body["mimeType"] == MP4:
            return IngestionRule("fail", after_reads=0)
        return IngestionRule("ingested", after_reads=0)

    fake_mindset.ingestion = rule
    video = await ingest(session, fake_mindset, externalId="v")
    pdf = await ingest(session, fake_mindset, mimeType=PDF, autoPublish=True)
    assert (await read(session, fake_mindset, "/uid/" + video["uid"]))[1]["status"] == "fail"
    assert (await read(session, fake_mindset, "/uid/" + pdf["uid"]))[1]["status"] == "published"
    assert [b["mimeType"] for b in bodies] == [MP4, PDF]
    assert bodies[0] == ingest_body(externalId="v")


async def test_mindset_rule_not_a_rule_is_a_500(
    fake_mindset: FakeMindset, session: aiohttp.ClientSession
) -> None:
    """A callable rule returning something else fails the ingest loudly and stores nothing."""
    fake_mindset.ingestion = lambda body: "published"  # type: ignore[assignment,return-value]
    url = files_url(fake_mindset)
    async with session.post(url, json=ingest_body(), headers=MINDSET_AUTH) as response:
        assert response.status == 500
    assert fake_mindset.files == []


def test_ingestion_rule_validates() -> None:
    """An unknown fate or a negative when is refused when the rule is made."""
    with pytest.raises(ValueError, match="fate"):
        IngestionRule("done")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="after_reads"):
        IngestionRule("fail", after_reads=-1)
    with pytest.raises(ValueError, match="after_seconds"):
        IngestionRule("fail", after_seconds=-0.1)


async def test_mindset_set_status_overrides_the_rule(
    fake_mindset: FakeMindset, session: aiohttp.ClientSession
) -> None:
    """set_status sets the status now and cancels what the rule had pending; unknown uids raise."""
    fake_mindset.ingestion = IngestionRule("published", after_reads=1)
    file = await ingest(session, fake_mindset)
    fake_mindset.set_status(file["uid"], "fail")
    for _ in range(3):
        assert (await read(session, fake_mindset, "/uid/" + file["uid"]))[1]["status"] == "fail"
    with pytest.raises(KeyError):
        fake_mindset.set_status("nope", "published")


async def test_mindset_read_by_uid_is_strict(
    fake_mindset: FakeMindset, session: aiohttp.ClientSession
) -> None:
    """A uid is found only in its own app context; unknown uids are 404; the key is required."""
    file = await ingest(session, fake_mindset)
    uid = file["uid"]
    assert await read(session, fake_mindset, "/uid/" + uid) == (200, file)
    assert (await read(session, fake_mindset, "/uid/" + uid, context="ctx2"))[0] == 404
    assert (await read(session, fake_mindset, "/uid/nope"))[0] == 404
    assert (await call(session, "GET", files_url(fake_mindset) + "/uid/" + uid))[0] == 401
    assert fake_mindset.reads_of(uid=uid) == 2  # the 401 is no read
    assert [r.status for r in fake_mindset.reads] == ["accepted", None, None]
    with pytest.raises(TypeError):
        fake_mindset.reads_of()


async def test_mindset_content_hash_is_kept(
    fake_mindset: FakeMindset, session: aiohttp.ClientSession
) -> None:
    """contentHash given at ingest is in the file object it answers and in every later read."""
    fake_mindset.ingestion = IngestionRule("published", after_reads=0)
    file = await ingest(session, fake_mindset, externalId="e1", contentHash="sha256:ab", runId="r1")
    assert (file["contentHash"], file["runId"]) == ("sha256:ab", "r1")
    for suffix in ("/uid/" + file["uid"], "/externalId/e1", "?runId=r1"):
        status, answer = await read(session, fake_mindset, suffix)
        found = answer[0] if isinstance(answer, list) else answer
        assert (status, found["contentHash"], found["status"]) == (200, "sha256:ab", "published")
    plain = await ingest(session, fake_mindset)
    assert "contentHash" not in plain


# -- Mindset: listing and deleting files ----------------------------------------------


async def test_mindset_list_pages_by_created_at(
    fake_mindset: FakeMindset, session: aiohttp.ClientSession
) -> None:
    """The list pages oldest first by startAfter=<last createdAt>; past the end: [] with a 404."""
    made = [await ingest(session, fake_mindset, name=f"f{i}") for i in range(5)]
    await ingest(session, fake_mindset, context="ctx2")  # another context: never listed
    pages: list[list[str]] = []
    suffix = "?limit=2"
    while True:
        status, page = await read(session, fake_mindset, suffix)
        if status == 404:
            assert page == []
            break
        assert status == 200
        pages.append([file["name"] for file in page])
        suffix = "?" + urlencode({"limit": 2, "startAfter": page[-1]["createdAt"]})
    assert pages == [["f0", "f1"], ["f2", "f3"], ["f4"]]
    assert [f["createdAt"] for f in made] == sorted({f["createdAt"] for f in made})
    assert (await read(session, fake_mindset, ""))[1] == made  # default page size: 20
    assert fake_mindset.reads_of(uid=made[0]["uid"]) == 2
    assert {r.via for r in fake_mindset.reads} == {"list"}


async def test_mindset_list_page_size_default(
    fake_mindset: FakeMindset, session: aiohttp.ClientSession
) -> None:
    """Without limit a page holds page_size files; limit=100 is the largest page."""
    fake_mindset.page_size = 3
    for _ in range(4):
        await ingest(session, fake_mindset)
    assert len((await read(session, fake_mindset, ""))[1]) == 3
    assert len((await read(session, fake_mindset, "?limit=100"))[1]) == 4


async def test_mindset_list_filters(
    fake_mindset: FakeMindset, session: aiohttp.ClientSession
) -> None:
    """runId and status (fail, readyForPublication, published) filter; nothing matching is a 404."""

    def rule(body: dict[str, Any]) -> IngestionRule:
        return IngestionRule(body["name"], after_reads=0)

    fake_mindset.ingestion = rule
    for status, run in [("fail", "r1"), ("published", "r1"), ("readyForPublication", "r2")]:
        await ingest(session, fake_mindset, name=status, runId=run)
    await ingest(session, fake_mindset, name="accepted", runId="r1")

    async def names(query: dict[str, str]) -> tuple[int, list[str]]:
        status, page = await read(session, fake_mindset, "?" + urlencode(query))
        return status, [file["name"] for file in page]

    assert await names({"runId": "r1"}) == (200, ["fail", "published", "accepted"])
    assert await names({"status": "fail"}) == (200, ["fail"])
    assert await names({"status": "published", "runId": "r1"}) == (200, ["published"])
    assert await names({"status": "readyForPublication", "runId": "r1"}) == (404, [])
    assert await names({"runId": "r9"}) == (404, [])
    assert await names({}) == (200, ["fail", "published", "readyForPublication", "accepted"])


@pytest.mark.parametrize(
    "query",
    [
        "status=accepted",
        "status=Published",
        "status=",
        "state=fail",
        "status=fail&status=published",
        "limit=0",
        "limit=101",
        "limit=ten",
        "limit=-1",
        "startAfter=yesterday",
    ],
)
async def test_mindset_list_rejects_bad_queries(
    fake_mindset: FakeMindset, session: aiohttp.ClientSession, query: str
) -> None:
    """accepted is no status filter; unknown, repeated or malformed parameters are a 400."""
    await ingest(session, fake_mindset)
    status, body = await read(session, fake_mindset, "?" + query)
    assert status == 400, body
    assert "error" in body
    assert fake_mindset.reads == []


async def test_mindset_list_needs_the_key_and_counts_reads(
    fake_mindset: FakeMindset, session: aiohttp.ClientSession
) -> None:
    """The list needs the key, and a listed file counts a status read toward its rule."""
    fake_mindset.ingestion = IngestionRule("published", after_reads=1)
    file = await ingest(session, fake_mindset, externalId="e1")
    assert (await call(session, "GET", files_url(fake_mindset)))[0] == 401
    assert (await read(session, fake_mindset, "?status=published"))[0] == 404
    assert (await read(session, fake_mindset, ""))[1] == [file]
    assert (await read(session, fake_mindset, "?status=published"))[1] == [
        {**file, "status": "published"}
    ]
    assert fake_mindset.reads_of(external_id="e1") == 2


async def test_mindset_delete_then_reads_and_reingest(
    fake_mindset: FakeMindset, session: aiohttp.ClientSession
) -> None:
    """A delete answers 200 and is recorded; the file is then 404 everywhere and its externalId free."""
    file = await ingest(session, fake_mindset, externalId="e1", contentHash="h1")
    uid, url = file["uid"], files_url(fake_mindset)
    assert await call(session, "DELETE", url + "/uid/" + uid, headers=MINDSET_AUTH) == (
        200,
        {"uid": uid, "deleted": True},
    )
    assert fake_mindset.deletes == [DeletedFile("app1", "ctx1", uid, "e1", file)]
    assert (await read(session, fake_mindset, "/uid/" + uid))[0] == 404
    assert (await read(session, fake_mindset, "/externalId/e1"))[0] == 404
    assert await read(session, fake_mindset, "") == (404, [])
    assert fake_mindset.files == []
    again = await ingest(session, fake_mindset, externalId="e1", contentHash="h2")
    assert (again["uid"], again["contentHash"]) != (uid, "h1")
    assert await read(session, fake_mindset, "/externalId/e1") == (200, again)
    conflict = await call(
        session, "POST", url, json=ingest_body(externalId="e1"), headers=MINDSET_AUTH
    )
    assert conflict[0] == 409  # a live file holds it again


async def test_mindset_delete_is_strict(
    fake_mindset: FakeMindset, session: aiohttp.ClientSession
) -> None:
    """Deleting a missing, already deleted or other context's uid is a 404; by externalId is no route."""
    file = await ingest(session, fake_mindset, externalId="e1")
    url, uid = files_url(fake_mindset), file["uid"]
    other = files_url(fake_mindset, context="ctx2")
    assert (await call(session, "DELETE", other + "/uid/" + uid, headers=MINDSET_AUTH))[0] == 404
    assert (await call(session, "DELETE", url + "/uid/nope", headers=MINDSET_AUTH))[0] == 404
    assert (await call(session, "DELETE", url + "/externalId/e1", headers=MINDSET_AUTH))[0] == 405
    assert (await call(session, "DELETE", url + "/uid/" + uid))[0] == 401
    assert fake_mindset.deletes == []
    assert (await call(session, "DELETE", url + "/uid/" + uid, headers=MINDSET_AUTH))[0] == 200
    again = await call(session, "DELETE", url + "/uid/" + uid, headers=MINDSET_AUTH)
    assert again == (404, {"error": "File not found"})
    assert len(fake_mindset.deletes) == 1


async def test_mindset_delete_can_answer_204(
    fake_mindset: FakeMindset, session: aiohttp.ClientSession
) -> None:
    """delete_status=204 answers an empty 204, for clients that must take any 2xx."""
    fake_mindset.delete_status = 204
    file = await ingest(session, fake_mindset)
    url = files_url(fake_mindset) + "/uid/" + file["uid"]
    async with session.delete(url, headers=MINDSET_AUTH) as response:
        assert (response.status, await response.read()) == (204, b"")
    assert [d.uid for d in fake_mindset.deletes] == [file["uid"]]


async def test_mindset_delete_cancels_a_pending_fate(
    fake_mindset: FakeMindset, session: aiohttp.ClientSession
) -> None:
    """A file deleted before its timed fate stays deleted; a new file with its externalId is untouched."""
    fake_mindset.ingestion = IngestionRule("fail", after_seconds=0.05)
    file = await ingest(session, fake_mindset, externalId="e1")
    url = files_url(fake_mindset) + "/uid/" + file["uid"]
    assert (await call(session, "DELETE", url, headers=MINDSET_AUTH))[0] == 200
    fake_mindset.ingestion = IngestionRule("published", after_seconds=0.1)
    again = await ingest(session, fake_mindset, externalId="e1")
    await eventually(lambda: fake_mindset.files[0]["status"] == "published")
    # The deleted file's timer was due first (0.05 s before 0.1 s): it would have fired.
    assert fake_mindset.files == [{**again, "status": "published"}]
    assert fake_mindset.deletes[0].file["status"] == "accepted"


# -- outages, rate limits, trickling sources -------------------------------------------


def test_sliding_window_is_strict() -> None:
    """At most N accepted calls in any one-second window; refused calls do not count."""
    window = SlidingWindow(2)
    assert window.admit(0.0) is None
    assert window.admit(0.4) is None
    assert window.admit(0.5) == pytest.approx(0.5)
    assert window.admit(0.999) == pytest.approx(0.001)
    assert window.admit(1.0) is None  # the call at 0.0 has left the window
    assert window.admit(1.3) == pytest.approx(0.1)
    assert window.admit(1.45) is None


def test_retry_after_headers_round_up() -> None:
    """Retry-After is whole seconds rounded up; retry-after-ms is optional."""
    assert retry_after_headers(0.0101) == {"Retry-After": "1", "retry-after-ms": "11"}
    assert retry_after_headers(2.5, millis=False) == {"Retry-After": "3"}


async def test_outage_answers_everything_until_healed(
    fake_inconvo: FakeInconvo, session: aiohttp.ClientSession
) -> None:
    """During an outage every request gets the outage status and is counted; heal() ends it."""
    url = fake_inconvo.base_url + "/datasets/user/u1"
    fake_inconvo.fail_next(500)
    fake_inconvo.outage(503, headers={"Retry-After": "7"})
    assert fake_inconvo.down
    for method in ("POST", "GET", "POST"):
        async with session.request(method, url, data=csv_form(), headers=AUTH) as response:
            assert (response.status, response.headers["Retry-After"]) == (503, "7")
    assert fake_inconvo.outage_calls == 3
    assert fake_inconvo.uploads == []
    fake_inconvo.heal()
    assert not fake_inconvo.down
    assert (await call(session, "POST", url, data=csv_form(), headers=AUTH))[0] == 500
    assert (await call(session, "POST", url, data=csv_form(), headers=AUTH))[0] == 200
    assert fake_inconvo.outage_calls == 3


async def test_outage_heals_by_itself(
    fake_mindset: FakeMindset, session: aiohttp.ClientSession
) -> None:
    """An outage given a duration ends on its own, and wait_healed() sees it end."""
    fake_mindset.outage(502, seconds=1.0)  # long against one local request
    url = files_url(fake_mindset)
    assert (await call(session, "POST", url, json=ingest_body(), headers=MINDSET_AUTH))[0] == 502
    assert fake_mindset.down
    await fake_mindset.wait_healed(timeout=30)
    assert not fake_mindset.down
    assert (await call(session, "POST", url, json=ingest_body(), headers=MINDSET_AUTH))[0] == 200
    assert fake_mindset.outage_calls == 1


async def test_outage_heals_after_calls(
    fake_mindset: FakeMindset, session: aiohttp.ClientSession
) -> None:
    """An outage given a number of calls answers exactly that many, then heals: no clock involved."""
    fake_mindset.outage(503, calls=2, headers={"Retry-After": "1"})
    url = files_url(fake_mindset)
    statuses = []
    for _ in range(3):
        statuses.append(
            (await call(session, "POST", url, json=ingest_body(), headers=MINDSET_AUTH))[0]
        )
    assert statuses == [503, 503, 200]
    assert not fake_mindset.down
    await fake_mindset.wait_healed(timeout=0.1)  # already healed: returns at once
    assert fake_mindset.outage_calls == 2
    with pytest.raises(ValueError, match="calls"):
        fake_mindset.outage(503, calls=0)


async def test_wait_healed_times_out_while_down(fake_mindset: FakeMindset) -> None:
    """wait_healed() raises TimeoutError while an outage without an end goes on."""
    fake_mindset.outage(503)
    with pytest.raises(TimeoutError):
        await fake_mindset.wait_healed(timeout=0.01)
    fake_mindset.heal()
    await fake_mindset.wait_healed(timeout=1)


async def test_rate_limit_answers_429_with_retry_after(
    fake_inconvo: FakeInconvo, session: aiohttp.ClientSession
) -> None:
    """Beyond N requests in the window: 429 with Retry-After and retry-after-ms, counted."""
    loop = asyncio.get_running_loop()
    fake_inconvo.rate_limit(per_second=3, window=60)
    url = fake_inconvo.base_url + "/datasets/user/u1"
    answers = []
    started = loop.time()  # the fake runs on this loop: its clock is this one
    for _ in range(5):
        async with session.post(url, data=csv_form(), headers=AUTH) as response:
            answers.append((response.status, dict(response.headers), loop.time()))
    assert [status for status, _, _ in answers] == [200, 200, 200, 429, 429]
    for _, headers, answered in answers[3:]:
        # The window opens 60 s after the first call, which came after `started`.
        at_least = math.floor((started + 60 - answered) * 1000)
        millis = int(headers["retry-after-ms"])
        assert at_least <= millis <= 60_000
        assert int(headers["Retry-After"]) == -(-millis // 1000)
    assert fake_inconvo.throttled == 2
    assert len(fake_inconvo.uploads) == 3
    fake_inconvo.rate_limit(per_second=1, window=60, millis=False)
    async with session.post(url, data=csv_form(), headers=AUTH) as response:
        assert response.status == 200
    async with session.post(url, data=csv_form(), headers=AUTH) as response:
        assert response.status == 429
        assert "retry-after-ms" not in response.headers
    fake_inconvo.rate_limit(None)
    assert (await call(session, "POST", url, data=csv_form(), headers=AUTH))[0] == 200
    assert fake_inconvo.throttled == 3


async def test_file_server_trickles_until_stopped(session: aiohttp.ClientSession) -> None:
    """A trickled body sends a byte per interval: a short timeout expires; stop_trickles cuts it."""
    files = await FileServer().start()
    try:
        slow = files.add("slow.csv", b"a,b\n" * 100, trickle=0.02)
        quick = files.add("quick.csv", b"a,b\n", trickle=0.001)
        async with session.get(quick) as response:
            assert await response.read() == b"a,b\n"
        with pytest.raises(TimeoutError):
            async with session.get(slow, timeout=aiohttp.ClientTimeout(total=0.1)) as response:
                await response.read()
        async with session.get(slow) as response:
            assert response.content_length == 400
            assert await response.content.readexactly(1) == b"a"
            assert files.trickling >= 1
            files.stop_trickles()
            with pytest.raises(aiohttp.ClientPayloadError):
                await response.read()
        async with asyncio.timeout(5):
            while files.trickling:
                await asyncio.sleep(0.01)
    finally:
        await files.close()
    assert files.trickling == 0
