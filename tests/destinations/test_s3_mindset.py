"""S3 sources and the Mindset adapter, end to end through RabbitMQ."""

from __future__ import annotations

import base64
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, quote, urlsplit

import aiohttp
import pytest
from aiobotocore.config import AioConfig
from aiobotocore.credentials import AioRefreshableCredentials
from aiobotocore.session import get_session
from aiohttp import web
from botocore.exceptions import ParamValidationError
from multidict import CIMultiDict, CIMultiDictProxy

from service.contracts import SourceSpec, api_length
from service.destinations.mindset import infer_mime_type
from service.errors import CourierError, ErrorCode, RetryableError
from service.sources.base import SizeLimit
from service.sources.s3 import S3Source, content_tag, env_proxy
from service.sources.s3_errors import S3Location, map_error
from testbed.loopback import serve
from testbed.stage import Stage
from tests.conftest import AWS_SECRET

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

SIGV4 = AioConfig(signature_version="s3v4")  # as the service's client
# botocore's own retries off: the tests count Courier's tries, without botocore's backoff.
ONE_TRY = AioConfig(signature_version="s3v4", retries={"max_attempts": 1})
LIMIT = SizeLimit(1 << 20, "test")
PDF = b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n"


pytestmark = pytest.mark.usefixtures("fast_retries")


@pytest.fixture
async def bucket(s3: S3Client) -> str:
    """A fresh versioned bucket."""
    name = f"courier-{uuid.uuid4().hex[:12]}"
    await s3.create_bucket(Bucket=name)
    await s3.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
    return name


def mindset_request(url: str, rid: str, **destination: Any) -> dict[str, Any]:
    """A Mindset request."""
    return {
        "id": rid,
        "source": {"url": url},
        "destination": {"type": "mindset", "appUid": "app-1", "contextUid": "ctx-1", **destination},
    }


async def test_s3_to_inconvo_with_version_and_errors(
    stage: Stage,
    s3: S3Client,
    bucket: str,
) -> None:
    """An S3 object (latest and by versionId) reaches Inconvo; NoSuchKey is source_not_found."""
    old = await s3.put_object(
        Bucket=bucket, Key="2024/q4 sales.csv", Body=b"v,1\n", ContentType="text/csv"
    )
    await s3.put_object(
        Bucket=bucket, Key="2024/q4 sales.csv", Body=b"v,2\n", ContentType="text/csv"
    )
    base = f"s3://{bucket}/2024/q4%20sales.csv"
    async with stage.running():
        for rid, url in (
            ("latest", base),
            ("v1", f"{base}?versionId={old['VersionId']}"),
            ("missing", f"s3://{bucket}/nope.csv"),
        ):
            await stage.publish(
                {
                    "id": rid,
                    "source": {"url": url},
                    "destination": {"type": "inconvo", "userIdentifier": "u"},
                },
            )
        events = {e["data"]["requestId"]: e["data"] for e in await stage.collector.wait_for(3)}
    assert [u.content for u in stage.inconvo.uploads if u.file_name == "q4_sales.csv"] != []
    contents = sorted(u.content for u in stage.inconvo.uploads)
    assert contents == [b"v,1\n", b"v,2\n"]
    assert events["latest"]["status"] == events["v1"]["status"] == "succeeded"
    assert events["v1"]["source"]["url"] == f"{base}?versionId={old['VersionId']}"
    assert events["latest"]["source"]["contentType"] == "text/csv"
    assert events["missing"]["error"]["code"] == "source_not_found"


async def test_bucket_outside_allowlist_makes_no_s3_call(
    s3_endpoint: str, s3: S3Client, bucket: str
) -> None:
    """A bucket outside COURIER_S3_ALLOWED_BUCKETS is source_blocked before any S3 request is sent."""
    await s3.put_object(Bucket=bucket, Key="a.csv", Body=b"1\n")
    sent: list[str] = []
    async with (
        get_session().create_client("s3", region_name="us-east-1") as client,
        aiohttp.ClientSession() as http,
    ):
        client.meta.events.register("before-send.s3", lambda request, **_: sent.append(request.url))
        source = S3Source(client, http, allowed_buckets=("some-other-bucket",))
        spec = SourceSpec(url=f"s3://{bucket}/a.csv")
        with pytest.raises(CourierError) as info:
            source.check(spec)
        assert info.value.code is ErrorCode.SOURCE_BLOCKED
        assert sent == []
        allowed = S3Source(client, http, allowed_buckets=(bucket,))
        allowed.check(spec)
        async with await allowed.fetch(spec, SizeLimit(1024, "t")) as fetched:
            assert await fetched.read() == b"1\n"
        assert len(sent) == 1  # the positive control: a real call is seen


async def test_s3_error_mapping(s3_endpoint: str, s3: S3Client, bucket: str) -> None:
    """NoSuchBucket is source_not_found; bad credentials are source_forbidden; a big object is too_large."""
    async with (
        get_session().create_client("s3", region_name="us-east-1") as client,
        aiohttp.ClientSession() as http,
    ):
        source = S3Source(client, http)
        with pytest.raises(CourierError) as info:
            async with await source.fetch(
                SourceSpec(url=f"s3://{bucket}-missing/a.csv"), SizeLimit(10, "t")
            ):
                pass
        assert info.value.code is ErrorCode.SOURCE_NOT_FOUND
        await s3.put_object(Bucket=bucket, Key="big.csv", Body=b"x" * 100)
        with pytest.raises(CourierError) as info:
            async with await source.fetch(
                SourceSpec(url=f"s3://{bucket}/big.csv"), SizeLimit(10, "t")
            ):
                pass
        assert info.value.code is ErrorCode.TOO_LARGE
    assert S3Location.parse(f"s3://{bucket}/a%2Fb%20c.csv?versionId=x").key == "a/b c.csv"


async def test_describe_heads_a_presigned_url(s3: S3Client, bucket: str) -> None:
    """describe() reads size, type and name from a presigned HEAD; its GET URL fetches the object."""
    await s3.put_object(
        Bucket=bucket,
        Key="talks/keynote.pdf",
        Body=PDF,
        ContentType="application/pdf",
        ContentDisposition='attachment; filename="Keynote 2026.pdf"',
    )
    first = await s3.put_object(Bucket=bucket, Key="notes.txt", Body=b"first")
    await s3.put_object(Bucket=bucket, Key="notes.txt", Body=b"second, longer")
    heads: list[str] = []

    async def on_start(_: Any, __: Any, params: aiohttp.TraceRequestStartParams) -> None:
        heads.append(params.method)

    tracing = aiohttp.TraceConfig()
    tracing.on_request_start.append(on_start)
    async with (
        get_session().create_client("s3", region_name="us-east-1", config=SIGV4) as client,
        aiohttp.ClientSession(trace_configs=[tracing]) as http,
    ):
        source = S3Source(client, http, presign_ttl=600)
        facts = await source.describe(SourceSpec(url=f"s3://{bucket}/talks/keynote.pdf"))
        assert heads == ["HEAD"]
        assert (facts.file_name, facts.content_type, facts.size) == (
            "Keynote 2026.pdf",
            "application/pdf",
            len(PDF),
        )
        assert facts.url == f"s3://{bucket}/talks/keynote.pdf"
        query = parse_qs(urlsplit(facts.fetch_url).query)
        assert query["X-Amz-Expires"] == ["600"]
        async with http.get(facts.fetch_url) as response:
            assert await response.read() == PDF
        old = await source.describe(
            SourceSpec(url=f"s3://{bucket}/notes.txt?versionId={first['VersionId']}")
        )
        assert old.size == len(b"first")
        assert old.content_tag == f"s3-version:{first['VersionId']}"
        async with http.get(old.fetch_url) as response:
            assert await response.read() == b"first"
        latest = await source.describe(SourceSpec(url=f"s3://{bucket}/notes.txt"))
        assert latest.content_tag is not None and latest.content_tag != old.content_tag
        with pytest.raises(CourierError) as info:
            await source.describe(SourceSpec(url=f"s3://{bucket}/talks/missing.pdf"))
        assert info.value.code is ErrorCode.SOURCE_NOT_FOUND
        assert info.value.http_status == 404


async def test_describe_tags_an_unversioned_object_by_its_etag(s3: S3Client) -> None:
    """Without versioning the content tag is the ETag, which follows the bytes."""
    bucket = f"courier-{uuid.uuid4().hex[:12]}"
    await s3.create_bucket(Bucket=bucket)
    async with (
        get_session().create_client("s3", region_name="us-east-1", config=SIGV4) as client,
        aiohttp.ClientSession() as http,
    ):
        source = S3Source(client, http)
        tags = []
        for body in (b"one", b"two", b"one"):
            put = await s3.put_object(Bucket=bucket, Key="a.txt", Body=body)
            facts = await source.describe(SourceSpec(url=f"s3://{bucket}/a.txt"))
            assert facts.content_tag == f"s3-etag:{put['ETag'].strip(chr(34))}"
            tags.append(facts.content_tag)
    assert tags[0] == tags[2] != tags[1]


def test_content_tag_fits_mindset_and_needs_a_version_or_etag() -> None:
    """A "null" version (an unversioned write) falls back to the ETag; a tag too long
    for Mindset's contentHash is hashed; nothing to go by gives no tag."""
    assert (
        content_tag(CIMultiDictProxy(CIMultiDict({"x-amz-version-id": "null", "ETag": '"e1"'})))
        == "s3-etag:e1"
    )
    long = content_tag(CIMultiDictProxy(CIMultiDict({"x-amz-version-id": "v" * 300})))
    assert long is not None and long.startswith("s3-tag-sha256:") and len(long) <= 200
    assert content_tag(CIMultiDictProxy(CIMultiDict())) is None


@contextlib.asynccontextmanager
async def fake_s3(
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[S3Source]:
    """An S3Source whose S3 endpoint is ``handler`` on loopback."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    server = await serve(app)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", server.url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test-key-id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", AWS_SECRET)
    try:
        async with (
            get_session().create_client("s3", region_name="us-east-1", config=ONE_TRY) as client,
            aiohttp.ClientSession() as http,
        ):
            yield S3Source(client, http)
    finally:
        await server.close()


def s3_error(status: int, code: str, **headers: str) -> web.Response:
    """An S3 error answer as S3 writes it."""
    body = f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code><Message>m</Message></Error>"
    return web.Response(
        status=status, body=body.encode(), content_type="application/xml", headers=headers
    )


@pytest.mark.parametrize(
    ("status", "code", "retryable"),
    [
        (403, ErrorCode.SOURCE_FORBIDDEN, False),
        (503, ErrorCode.SOURCE_UNAVAILABLE, True),
        (307, ErrorCode.SOURCE_UNAVAILABLE, True),
        (301, ErrorCode.SOURCE_NOT_FOUND, False),
        (400, ErrorCode.SOURCE_NOT_FOUND, False),
    ],
)
async def test_describe_maps_head_answers(
    status: int, code: ErrorCode, retryable: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A HEAD answered 403 is source_forbidden; 503 and 307 (retried first) source_unavailable;
    301 (another region, none named) and 400 (a bad versionId) fail at once, never retried."""
    seen: list[str] = []

    async def answer(request: web.Request) -> web.Response:
        seen.append(request.method)
        return web.Response(status=status, headers={"Retry-After": "0"})

    async with fake_s3(answer, monkeypatch) as source:
        with pytest.raises(CourierError) as info:
            await source.describe(SourceSpec(url="s3://media/a.mp4?versionId=v1"))
    assert info.value.code is code
    assert info.value.http_status == status
    assert isinstance(info.value, RetryableError) is retryable
    assert seen == ["HEAD"] * (3 if retryable else 1)


async def test_describe_presigns_for_the_bucket_region(monkeypatch: pytest.MonkeyPatch) -> None:
    """A HEAD answered 301 with x-amz-bucket-region is signed again for that region, and so is the GET URL."""
    credentials: list[str] = []

    async def answer(request: web.Request) -> web.Response:
        credentials.append(request.query["X-Amz-Credential"].split("/")[2])
        if request.query["X-Amz-Credential"].split("/")[2] != "eu-west-1":
            return web.Response(status=301, headers={"x-amz-bucket-region": "eu-west-1"})
        return web.Response(body=b"0123456789", content_type="video/mp4")

    async with fake_s3(answer, monkeypatch) as source:
        facts = await source.describe(SourceSpec(url="s3://far-away/talk.mp4"))
        again = await source.describe(SourceSpec(url="s3://far-away/other.mp4"))
    assert credentials == ["us-east-1", "eu-west-1", "eu-west-1"]  # the region is remembered
    for found in (facts, again):
        assert "/eu-west-1/" in parse_qs(urlsplit(found.fetch_url).query)["X-Amz-Credential"][0]
    assert (facts.size, facts.content_type) == (10, "video/mp4")


@pytest.mark.parametrize(
    ("status", "s3_code", "code"),
    [
        (400, "InvalidArgument", ErrorCode.SOURCE_NOT_FOUND),  # a malformed versionId
        (301, "PermanentRedirect", ErrorCode.SOURCE_NOT_FOUND),  # another region, none named
        (405, "MethodNotAllowed", ErrorCode.SOURCE_NOT_FOUND),  # the version is a delete marker
        (400, "RequestTimeout", ErrorCode.SOURCE_UNAVAILABLE),
    ],
)
async def test_get_object_answers_that_cannot_change_are_not_retried(
    status: int, s3_code: str, code: ErrorCode, monkeypatch: pytest.MonkeyPatch
) -> None:
    """S3 errors other than 404/403 are retried only when a retry can help."""
    seen: list[str] = []

    async def answer(request: web.Request) -> web.Response:
        seen.append(request.method)
        # As S3 does; here a region botocore's redirect cannot help with (one endpoint).
        return s3_error(status, s3_code, **{"x-amz-bucket-region": "eu-west-1"})

    async with fake_s3(answer, monkeypatch) as source:
        with pytest.raises(CourierError) as info:
            async with await source.fetch(SourceSpec(url="s3://media/a.csv?versionId=x"), LIMIT):
                pass
    assert info.value.code is code
    assert info.value.retryable is (code is ErrorCode.SOURCE_UNAVAILABLE)
    if info.value.retryable:
        assert len(seen) >= 3  # Courier's three tries (botocore may add its own)
    else:
        assert len(seen) <= 2  # botocore may follow a redirect once; Courier adds nothing
    if s3_code == "PermanentRedirect":
        assert "eu-west-1" in info.value.message and "AWS_REGION" in info.value.message


def test_parameters_botocore_refuses_are_invalid_request() -> None:
    """A parameter botocore refuses before any call cannot succeed later: invalid_request."""
    where = S3Location("bad:bucket", "k", None)
    error = map_error(ParamValidationError(report="Invalid bucket name"), where)
    assert error.code is ErrorCode.INVALID_REQUEST
    assert not error.retryable


async def test_connection_lost_mid_body_is_retryable(monkeypatch: pytest.MonkeyPatch) -> None:
    """An S3 body cut short (aiohttp's ClientPayloadError) is source_unavailable, retried."""
    sent: list[int] = []

    async def answer(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Length": "100000"})
        await response.prepare(request)
        await response.write(b"a," * 500)
        sent.append(1)
        assert request.transport is not None
        request.transport.close()  # the connection drops mid-body
        return response

    async with fake_s3(answer, monkeypatch) as source:
        with pytest.raises(CourierError) as info:
            async with await source.fetch(SourceSpec(url="s3://media/a.csv"), LIMIT):
                pass
    assert info.value.code is ErrorCode.SOURCE_UNAVAILABLE
    assert info.value.retryable
    assert len(sent) == 3


class _TemporaryCredentials:
    """A credential provider handing out refreshable credentials that expire, as IRSA's do."""

    METHOD = "test-temporary"

    def __init__(self, lifetime: float, token: str) -> None:
        self.metadata = {
            "access_key": "ASIATESTCOURIER0002",
            "secret_key": AWS_SECRET,
            "token": token,
            "expiry_time": (datetime.now(UTC) + timedelta(seconds=lifetime)).isoformat(),
        }

    async def load(self) -> AioRefreshableCredentials:
        async def refresh() -> dict[str, str]:
            return self.metadata

        return AioRefreshableCredentials.create_from_metadata(
            metadata=self.metadata, refresh_using=refresh, method=self.METHOD
        )


@contextlib.asynccontextmanager
async def temporary_credentials_source(
    lifetime: float, token: str = "IQoJb3JpZ2luX2VjE" + "x" * 300, ttl: int = 12 * 3600
) -> AsyncIterator[S3Source]:
    """An S3Source (on moto) whose client signs with temporary credentials."""
    session = get_session()
    session.get_component("credential_provider").insert_before(
        "env", _TemporaryCredentials(lifetime, token)
    )
    async with (
        session.create_client("s3", region_name="us-east-1", config=SIGV4) as client,
        aiohttp.ClientSession() as http,
    ):
        yield S3Source(client, http, presign_ttl=ttl)


async def test_presigned_url_lives_no_longer_than_its_credentials(
    s3: S3Client, bucket: str, caplog: pytest.LogCaptureFixture
) -> None:
    """With credentials expiring in an hour, a 12 h COURIER_PRESIGN_TTL is capped to the hour, said once."""
    await s3.put_object(Bucket=bucket, Key="talk.mp4", Body=b"0" * 10)
    caplog.set_level(logging.INFO, logger="service.sources.s3")
    async with temporary_credentials_source(3600) as source:
        first = await source.describe(SourceSpec(url=f"s3://{bucket}/talk.mp4"))
        second = await source.describe(SourceSpec(url=f"s3://{bucket}/talk.mp4"))
    for facts in (first, second):
        query = parse_qs(urlsplit(facts.fetch_url).query)
        assert 3500 <= int(query["X-Amz-Expires"][0]) <= 3600
        assert "X-Amz-Security-Token" in query
    warnings = [r for r in caplog.records if "COURIER_PRESIGN_TTL" in r.getMessage()]
    assert len(warnings) == 1
    assert warnings[0].levelno == logging.WARNING


async def test_presign_report(s3_endpoint: str) -> None:
    """The start-up check names COURIER_PRESIGN_TTL when credentials expire first, and a session
    token that leaves presigned URLs little room under Mindset's 2048 characters."""
    async with temporary_credentials_source(3600, ttl=600) as fine:
        assert await fine.presign_report() is None
    async with temporary_credentials_source(3600) as short:
        report = await short.presign_report()
        assert report is not None and "COURIER_PRESIGN_TTL" in report and "12h" in report
    async with temporary_credentials_source(7200, token="T" * 1900, ttl=3600) as long:
        report = await long.presign_report()
        assert report is not None and "2048" in report and "session token" in report
    assert AWS_SECRET not in report


async def test_presigned_url_over_mindset_limit(
    stage: Stage,
    s3: S3Client,
    bucket: str,
) -> None:
    """A presigned URL over Mindset's 2048 characters is a permanent destination_rejected, not invalid_request."""
    key = "\u00e9" * 500 + ".mp4"  # 1004 bytes, three characters each when percent-encoded
    await s3.put_object(Bucket=bucket, Key=key, Body=b"0" * 10)
    async with stage.running():
        await stage.publish(mindset_request(f"s3://{bucket}/{quote(key)}", "long"))
        [event] = await stage.collector.wait_for(1)
    error = event["data"]["error"]
    assert (error["code"], error["retryable"]) == ("destination_rejected", False)
    assert "2048" in error["message"]
    assert stage.mindset.requests == []


def test_env_proxy_follows_https_proxy_and_no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """The S3 HEADs take the environment's proxy as botocore does, NO_PROXY hosts excepted."""
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    monkeypatch.setenv("NO_PROXY", "minio.local,.svc.cluster.local")
    env_proxy.cache_clear()
    try:
        assert env_proxy("https", "bucket.s3.eu-west-1.amazonaws.com") == (
            "http://proxy.internal:3128"
        )
        assert env_proxy("https", "minio.local") is None
        assert env_proxy("https", "s3.storage.svc.cluster.local") is None
        assert env_proxy("http", "bucket.s3.amazonaws.com") is None  # no HTTP_PROXY set
    finally:
        env_proxy.cache_clear()


async def test_mindset_source_url_from_http_and_s3(
    stage: Stage,
    s3: S3Client,
    bucket: str,
) -> None:
    """http sources pass as given (mimeType inferred), with no contentHash; S3 sources
    become presigned URLs that serve the object, their version as the contentHash unless
    the request brings its own."""
    video = b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 40
    put = await s3.put_object(Bucket=bucket, Key="media/talk.mp4", Body=video)
    await s3.put_object(Bucket=bucket, Key="media/own.mp4", Body=video)
    http_url = stage.files.add("/decks/intro.pptx?sig=abc", b"PK\x03\x04")
    async with stage.running():
        await stage.publish(
            mindset_request(http_url, "http-1", externalId="ext-1", labels=["l1"]),
        )
        await stage.publish(mindset_request(f"s3://{bucket}/media/talk.mp4", "s3-1"))
        own = mindset_request(f"s3://{bucket}/media/own.mp4", "s3-own", contentHash="mine:v7")
        await stage.publish(own)
        events = {e["data"]["requestId"]: e["data"] for e in await stage.collector.wait_for(3)}
    assert events["http-1"]["status"] == "succeeded", events["http-1"]
    assert events["s3-1"]["status"] == "succeeded", events["s3-1"]
    assert events["http-1"]["delivery"] == events["s3-1"]["delivery"] == "sourceUrl"
    bodies = {i.body["name"]: i.body for i in stage.mindset.ingests}
    pptx = bodies["intro.pptx"]
    assert pptx["sourceUrl"] == http_url
    assert (
        pptx["mimeType"]
        == "application/vnd.openxmlformats-officedocument.presentationml.presentation"
    )
    assert pptx["externalId"] == "ext-1" and pptx["labels"] == ["l1"]
    assert "documentContent" not in pptx and "contentHash" not in pptx
    assert bodies["own.mp4"]["contentHash"] == "mine:v7"
    assert stage.files.hits == []  # no bytes passed through Courier
    mp4 = bodies["talk.mp4"]
    assert mp4["mimeType"] == "video/mp4"
    assert mp4["contentHash"] == f"s3-version:{put['VersionId']}"
    presigned = mp4["sourceUrl"]
    assert AWS_SECRET not in presigned
    query = parse_qs(urlsplit(presigned).query)
    assert "X-Amz-Signature" in query and "X-Amz-Expires" in query
    assert query["X-Amz-Expires"] == [str(12 * 3600)]
    async with aiohttp.ClientSession() as session, session.get(presigned) as response:
        assert response.status == 200
        assert await response.read() == video
    assert events["s3-1"]["source"]["url"] == f"s3://{bucket}/media/talk.mp4"
    assert events["s3-1"]["source"]["bytes"] == len(video)
    assert events["s3-1"]["result"]["uid"] in {f["uid"] for f in stage.mindset.files}


async def test_mindset_document_content(
    stage: Stage,
    s3: S3Client,
    bucket: str,
) -> None:
    """text/plain is inlined exactly, text/html as text, a PDF as base64; >65,536 characters is too_large."""
    text = "Grüße — a plain note\nline two 🚀\n"
    html = "<html><body><h1>Hello</h1></body></html>"
    await s3.put_object(
        Bucket=bucket, Key="notes.txt", Body=text.encode(), ContentType="text/plain; charset=utf-8"
    )
    page = stage.files.add("/page.html", html.encode(), content_type="text/html")
    pdf = stage.files.add("/small.pdf", PDF, content_type="application/pdf")
    huge = stage.files.add("/huge.txt", ("x" * 65537).encode(), content_type="text/plain")
    async with stage.running():
        await stage.publish(mindset_request(f"s3://{bucket}/notes.txt", "txt"))
        await stage.publish(mindset_request(page, "html", delivery="documentContent"))
        await stage.publish(
            mindset_request(pdf, "pdf", delivery="documentContent", name="Small PDF"),
        )
        await stage.publish(mindset_request(huge, "huge"))
        events = {e["data"]["requestId"]: e["data"] for e in await stage.collector.wait_for(4)}
    by_name = {i.body["name"]: i.body for i in stage.mindset.ingests}
    assert by_name["notes.txt"]["documentContent"] == text
    assert by_name["notes.txt"]["mimeType"] == "text/plain"
    assert by_name["page.html"]["documentContent"] == html
    assert by_name["page.html"]["mimeType"] == "text/html"
    assert base64.b64decode(by_name["Small PDF"]["documentContent"]) == PDF
    assert by_name["Small PDF"]["mimeType"] == "application/pdf"
    for rid in ("txt", "html", "pdf"):
        assert events[rid]["delivery"] == "documentContent", events[rid]
    assert events["huge"]["error"]["code"] == "too_large"
    assert len(stage.mindset.ingests) == 3  # nothing sent for the huge one
    assert all("sourceUrl" not in body for body in by_name.values())


async def test_mindset_unsupported_and_invalid_send_nothing(
    stage: Stage,
) -> None:
    """An unknown extension without mimeType is unsupported_type; 11 labels are invalid_request."""
    async with stage.running():
        await stage.publish(mindset_request(stage.files.add("/data.xyz", b"?"), "xyz"))
        await stage.publish(
            mindset_request(
                stage.files.add("/a.pdf", PDF), "labels", labels=[f"l{i}" for i in range(11)]
            ),
        )
        await stage.publish(
            mindset_request(
                stage.files.add("/b.txt", b"t"),
                "plain-url",
                delivery="sourceUrl",
                mimeType="text/plain",
            ),
        )
        events = {e["data"]["requestId"]: e["data"] for e in await stage.collector.wait_for(3)}
    assert events["xyz"]["error"]["code"] == "unsupported_type"
    assert events["labels"]["error"]["code"] == "invalid_request"
    assert "labels" in events["labels"]["error"]["message"]
    assert events["plain-url"]["error"]["code"] == "invalid_request"
    assert stage.mindset.requests == [] and stage.files.hits == []
    assert len(await stage.dead_letters()) == 3


async def test_mindset_externalid_deduplicates(
    stage: Stage,
) -> None:
    """A second request with the same externalId succeeds with deduplicated: true and the existing file."""
    url = stage.files.add("/doc.pdf", PDF)
    async with stage.running():
        await stage.publish(mindset_request(url, "first", externalId="ext-42"))
        await stage.collector.wait_for(1)
        await stage.publish(mindset_request(url, "second", externalId="ext-42"))
        events = {e["data"]["requestId"]: e["data"] for e in await stage.collector.wait_for(2)}
    assert events["first"]["status"] == events["second"]["status"] == "succeeded"
    assert "deduplicated" not in events["first"]
    assert events["second"]["deduplicated"] is True
    assert events["second"]["result"]["uid"] == events["first"]["result"]["uid"]
    assert len(stage.mindset.ingests) == 1


async def test_a_new_s3_version_replaces_the_file_and_the_same_is_kept(
    stage: Stage, s3: S3Client, bucket: str
) -> None:
    """A presigned S3 source under one externalId: a new version of the object replaces
    the file (its version as the contentHash); the same version again is deduplicated."""
    url = f"s3://{bucket}/handbook.pdf"
    v1 = await s3.put_object(Bucket=bucket, Key="handbook.pdf", Body=PDF)
    async with stage.running():
        await stage.publish(mindset_request(url, "v1", externalId="handbook"))
        await stage.collector.wait_for(1)
        [old] = stage.mindset.files
        v2 = await s3.put_object(Bucket=bucket, Key="handbook.pdf", Body=PDF + b"%v2\n")
        await stage.publish(mindset_request(url, "v2", externalId="handbook"))
        await stage.collector.wait_for(2)
        await stage.publish(mindset_request(url, "v2-again", externalId="handbook"))
        events = {e["data"]["requestId"]: e["data"] for e in await stage.collector.wait_for(3)}
    assert old["contentHash"] == f"s3-version:{v1['VersionId']}"
    [new] = stage.mindset.files
    assert new["contentHash"] == f"s3-version:{v2['VersionId']}" and new["uid"] != old["uid"]
    assert events["v2"]["replaced"] is True and events["v2"]["replacedUid"] == old["uid"]
    assert events["v2-again"]["deduplicated"] is True
    assert events["v2-again"]["result"]["uid"] == new["uid"]
    assert len(stage.mindset.ingests) == 2


@pytest.mark.parametrize(
    ("content_type", "name", "expected"),
    [
        ("video/mp4", "x", "video/mp4"),
        ("text/markdown", "x", "text/plain"),
        ("application/octet-stream", "talk.MP3", "audio/mpeg"),
        (None, "notes.md", "text/plain"),
        (None, "page.htm", "text/html"),
        (None, "a.docx", "application/vnd.openxmlformats-officedocument.wordprocessingml.document"),
        (None, "a.zip", "application/zip"),
        ("image/png", "photo.png", None),
        (None, "README", None),
    ],
)
def test_mime_inference(content_type: str | None, name: str, expected: str | None) -> None:
    """The content type wins, then the extension; nothing fitting gives None."""
    assert infer_mime_type(content_type, name) == expected


def test_api_length_counts_utf16_units() -> None:
    """Characters outside the BMP count twice, as the API (JavaScript) counts them."""
    assert api_length("a🚀") == 3


async def test_default_name_is_cut_as_the_api_counts(
    stage: Stage,
) -> None:
    """A file name over 100 UTF-16 code units becomes a name of at most 100, never half a character."""
    name = "🚀" * 60 + ".pdf"  # 64 code points, 124 code units
    url = stage.files.add("/" + quote(name), PDF, content_type="application/pdf")
    async with stage.running():
        await stage.publish(mindset_request(url, "rockets"))
        [event] = await stage.collector.wait_for(1)
    assert event["data"]["status"] == "succeeded", event["data"]
    [ingest] = stage.mindset.ingests
    assert ingest.body["name"] == "🚀" * 50
    assert api_length(ingest.body["name"]) == 100


@pytest.mark.parametrize(
    ("url", "bucket", "key", "version"),
    [
        ("s3://b-1/reports/q4%23final.csv", "b-1", "reports/q4#final.csv", None),
        ("s3://b-1//leading.csv", "b-1", "/leading.csv", None),
        ("s3://b-1/a.csv?versionId=3%2Fx", "b-1", "a.csv", "3/x"),
    ],
)
def test_s3_location_key_is_everything_after_the_bucket(
    url: str, bucket: str, key: str, version: str | None
) -> None:
    """No part of the key is cut: a leading '/' stays, an encoded '#' is part of it."""
    location = S3Location.parse(url)
    assert (location.bucket, location.key, location.version_id) == (bucket, key, version)


@pytest.mark.parametrize(
    "url", ["s3://b-1/reports/q4#final.csv", "s3://b-1/a.csv?x=1", "s3://user:pw@b-1/a.csv"]
)
def test_s3_location_refuses_what_would_name_another_object(url: str) -> None:
    """A raw '#', a foreign query or user-info is invalid_request, never a different object."""
    with pytest.raises(CourierError) as info:
        S3Location.parse(url)
    assert info.value.code is ErrorCode.INVALID_REQUEST
    assert "pw" not in info.value.message
