"""Hostile sources and secret hygiene, through the real service."""

from __future__ import annotations

import logging
import re
import signal
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlsplit

import pytest

from service.logs import setup_logging
from service.redact import mask_text, redact_url
from testbed.stage import Stage
from testbed.support import (
    FileServer,
    inconvo_request,
)
from tests.conftest import AWS_SECRET, INCONVO_KEY, MINDSET_KEY, running

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

pytestmark = pytest.mark.usefixtures("fast_retries")


@pytest.fixture
async def other() -> AsyncIterator[FileServer]:
    """A second loopback server that sources must never reach."""
    server = await FileServer().start()
    server.add("/a.csv", b"secret,data\n")
    yield server
    await server.close()


def loopback_spellings(port: int) -> dict[str, str]:
    """The same loopback server written five ways."""
    return {
        "dotted": f"http://127.0.0.1:{port}/a.csv",
        "name": f"http://localhost:{port}/a.csv",
        "ipv6": f"http://[::1]:{port}/a.csv",
        "decimal": f"http://2130706433:{port}/a.csv",
        "hex-short": f"http://0x7f.1:{port}/a.csv",
    }


async def test_only_the_allowed_server_is_reachable_through_courier_run(
    stage: Stage,
    other: FileServer,
) -> None:
    """With only the file server allowed, every spelling of another loopback port, and a redirect to it, is source_blocked."""
    urls = loopback_spellings(other.port)
    urls["redirect"] = stage.files.add("/hop.csv", redirect=other.url("/a.csv"))
    service = await stage.process().start()  # only the file server allowed
    try:
        for rid, url in urls.items():
            await stage.publish(inconvo_request(url, rid))
        events = await stage.collector.wait_for(len(urls))
    finally:
        assert await service.signal(signal.SIGTERM) == 0
    codes = {e["data"]["requestId"]: e["data"]["error"]["code"] for e in events}
    assert codes == dict.fromkeys(urls, "source_blocked")
    assert other.hits == []
    assert stage.files.hits == ["/hop.csv"]  # the allowed server was asked, then the hop refused
    assert stage.inconvo.requests == []


async def test_default_policy_blocks_every_loopback_spelling(
    stage: Stage,
    other: FileServer,
) -> None:
    """With no allowlist, loopback is refused in every spelling, before any packet is sent."""
    urls = loopback_spellings(other.port)
    urls["metadata"] = "http://169.254.169.254/latest/meta-data/iam.csv"
    urls["mapped"] = f"http://[::ffff:127.0.0.1]:{other.port}/a.csv"
    async with stage.running(source_allowed_hosts=()):
        for rid, url in urls.items():
            if rid == "metadata":
                continue  # decided below without any connection attempt
            await stage.publish(inconvo_request(url, rid))
        events = await stage.collector.wait_for(len(urls) - 1)
    for event in events:
        assert event["data"]["error"]["code"] == "source_blocked", event
        assert "loopback" in event["data"]["error"]["message"]
    assert other.hits == []
    from service.sources.guard import AddressPolicy

    assert AddressPolicy().check_host("169.254.169.254", 80) is not None


async def test_urls_handed_to_mindset_obey_the_address_policy(
    stage: Stage,
    s3: S3Client,
    other: FileServer,
) -> None:
    """An http sourceUrl and a thumbnailUrl at loopback, dotted or metadata forms are
    source_blocked, and Mindset is never sent there; an externalUrl is a link for people,
    fetched by nobody: any http(s) URL passes."""
    await s3.create_bucket(Bucket="relay")
    await s3.put_object(Bucket="relay", Key="talk.mp4", Body=b"\x00" * 64)
    talk = "s3://relay/talk.mp4"
    blocked = {
        "source-localhost": (f"http://localhost:{other.port}/a.pdf", {}),
        "source-dot": (f"http://127.0.0.1.:{other.port}/a.pdf", {}),
        "thumbnail": (talk, {"thumbnailUrl": f"http://localhost:{other.port}/t.png"}),
        "thumbnail-dot": (talk, {"thumbnailUrl": "http://127.0.0.1./t.png"}),
        "thumbnail-metadata": (talk, {"thumbnailUrl": "http://169.254.169.254/t.png"}),
    }
    passed = {
        "external-metadata": (talk, {"externalUrl": "http://169.254.169.254/latest/meta-data/"}),
        "thumbnail-public": (talk, {"thumbnailUrl": "https://8.8.8.8/t.png"}),
    }
    async with stage.running(source_allowed_hosts=()):
        for rid, (url, extra) in {**blocked, **passed}.items():
            body = {
                "id": rid,
                "source": {"url": url},
                "destination": {"type": "mindset", "appUid": "a", "contextUid": "c", **extra},
            }
            await stage.publish(body)
        await stage.collector.wait_for_ids({*blocked, *passed})
    by_id = {e["data"]["requestId"]: e["data"] for e in stage.collector.events}
    assert {rid: by_id[rid]["error"]["code"] for rid in blocked} == dict.fromkeys(
        blocked, "source_blocked"
    )
    assert {rid: by_id[rid]["status"] for rid in passed} == dict.fromkeys(passed, "succeeded")
    links = {
        str(b.get("externalUrl") or b.get("thumbnailUrl"))
        for b in (i.body for i in stage.mindset.ingests)
    }
    assert links == {str(x.get("externalUrl") or x.get("thumbnailUrl")) for _, x in passed.values()}
    assert other.hits == []


async def test_an_allowlist_restricts_sources_not_links(stage: Stage, s3: S3Client) -> None:
    """With COURIER_SOURCE_ALLOWED_HOSTS set, an externalUrl or a public thumbnailUrl on a
    host outside it still passes: the allowlist says what Courier may fetch."""
    await s3.create_bucket(Bucket="links")
    await s3.put_object(Bucket="links", Key="talk.mp4", Body=b"\x00" * 64)
    destination = {
        "type": "mindset",
        "appUid": "a",
        "contextUid": "c",
        "externalUrl": "https://example.invalid/doc",
        "thumbnailUrl": "https://8.8.4.4/t.png",
    }
    async with stage.running(source_allowed_hosts=("files.example",)):
        body = {"id": "links", "source": {"url": "s3://links/talk.mp4"}, "destination": destination}
        await stage.publish(body)
        [event] = await stage.collector.wait_for(1)
    assert event["data"]["status"] == "succeeded", event["data"]
    [ingest] = stage.mindset.ingests
    assert ingest.body["externalUrl"] == "https://example.invalid/doc"


async def test_gzip_bomb_and_endless_chunked_body_are_too_large(
    stage: Stage,
) -> None:
    """A gzip body inflating past 10 MiB and a 20 MiB chunked body both fail too_large; nothing is uploaded."""
    bomb = stage.files.add("/bomb.csv", b"0" * (11 * 1024 * 1024), gzip=True)
    endless = stage.files.add("/endless.csv", stream_bytes=20 * 1024 * 1024)
    async with stage.running():
        await stage.publish(inconvo_request(bomb, "bomb"))
        await stage.publish(inconvo_request(endless, "endless"))
        events = await stage.collector.wait_for(2)
    assert {e["data"]["error"]["code"] for e in events} == {"too_large"}
    assert stage.inconvo.requests == []


async def test_no_secret_reaches_logs_or_events(
    stage: Stage,
    s3: S3Client,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """With distinctive keys, success and failure paths log and publish no key, secret or signature."""
    await s3.create_bucket(Bucket="hygiene")
    await s3.put_object(Bucket="hygiene", Key="talk.mp4", Body=b"\x00" * 64)
    await s3.put_object(Bucket="hygiene", Key="t.csv", Body=b"1\n")
    settings = stage.settings(log_level="DEBUG", log_format="json")
    setup_logging("json", "DEBUG", settings.secret_values())
    try:
        stage.inconvo.fail_next(401, body={"error": f"bad key {INCONVO_KEY}"})
        async with running(settings):
            await stage.publish(inconvo_request(stage.files.add("/a.csv", b"1\n"), "echo"))
            await stage.publish(inconvo_request("s3://hygiene/t.csv", "s3"))
            await stage.publish(
                {
                    "id": "presign",
                    "source": {"url": "s3://hygiene/talk.mp4"},
                    "destination": {"type": "mindset", "appUid": "a", "contextUid": "c"},
                },
            )
            await stage.publish(
                inconvo_request(
                    f"http://user:pa55w0rd@127.0.0.1:{stage.files.port}/x.csv?X-Amz-Signature=abc123",
                    "userinfo",
                ),
            )
            events = await stage.collector.wait_for(4)
    finally:
        for handler in list(logging.getLogger().handlers):
            logging.getLogger().removeHandler(handler)
    logs = capsys.readouterr().err
    [ingest] = stage.mindset.ingests
    signature = parse_qs(urlsplit(ingest.body["sourceUrl"]).query)["X-Amz-Signature"][0]
    published = "".join(m.body.decode() for m in stage.collector.messages)
    assert "bad key ***" in published  # the echoed key was masked, the rest kept
    assert len(logs) > 1000, "the run should have logged plenty at DEBUG"
    for text in (logs, published):
        for secret in (INCONVO_KEY, MINDSET_KEY, AWS_SECRET, signature, "pa55w0rd", "abc123"):
            assert secret not in text
    assert {e["data"]["requestId"] for e in events} == {"echo", "s3", "presign", "userinfo"}


async def test_user_info_is_never_echoed(
    stage: Stage,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """User-info in an S3 URL (bucket allowlist set) or cut short by a '#' reaches no event, header or log."""
    caplog.set_level(logging.DEBUG)
    secret = "s3cr3t-pw"
    urls = {
        "s3": f"s3://user:{secret}@refused-bucket/k.csv",
        "s3-allowed": f"s3://user:{secret}@allowed-bucket/k.csv",
        "cut": f"http://user:{secret}#x@127.0.0.1/k.csv",
    }
    async with stage.running(s3_allowed_buckets=("allowed-bucket",)):
        for rid, url in urls.items():
            await stage.publish(inconvo_request(url, rid))
        events = await stage.collector.wait_for(len(urls))
    dead = await stage.dead_letters()  # the service has stopped: every dead letter is in
    assert {e["data"]["error"]["code"] for e in events} == {"invalid_request"}
    assert len(dead) == len(urls)
    published = [m.body.decode() + repr(m.headers) for m in stage.collector.messages]
    headers = [repr(m.headers) for m in dead]
    # Courier's own records; aiormq's DEBUG frame dumps show the producer's body as sent.
    logs = [r.getMessage() for r in caplog.records if r.name.startswith("service")]
    assert logs
    for text in (*published, *headers, *logs):
        assert secret not in text


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://user:pw@files.example/a.csv?sig=1#x", "https://files.example/a.csv"),
        ("s3://user:pw@b/k.csv", "s3://b/k.csv"),
        ("http://user:p#w@host/x.csv", "<unparseable URL>"),
        ("http://user:pa/ss@host/x.csv", "<unparseable URL>"),
        ("http://user:pa?ss@host/x.csv", "<unparseable URL>"),
        ("s3://b/k.csv?versionId=v1&X-Amz-Signature=s", "s3://b/k.csv?versionId=v1"),
        (
            "https://b.s3.amazonaws.com/k?X-Amz-Credential=AKIA&X-Amz-Signature=ff",
            "https://b.s3.amazonaws.com/k",
        ),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    """Event URLs lose user-info and query (an s3 URL keeps versionId)."""
    assert redact_url(url) == shown


@pytest.mark.parametrize(
    "text",
    [
        "bucket 'user:pw-9@refused' is not in the allowed buckets",
        "cannot fetch s3://user:pw-9@bucket/k.csv",
        "cannot fetch http://user:pw-9/x@host/k.csv",
        "cannot fetch http://user:pw-9?x@host/k.csv",
        "see user:pw-9@host for details",
    ],
)
def test_mask_text_masks_user_info_in_any_form(text: str) -> None:
    """User-info is masked with or without a scheme, and when the password holds '/' or '?'."""
    masked = mask_text(text)
    assert "pw-9" not in masked
    assert "***@" in masked


def test_mask_text() -> None:
    """Free text loses configured secrets, URL user-info and signed-URL parameters."""
    text = "key=K3Y amqp://u:pw@h/ https://x/?X-Amz-Signature=abc&X-Amz-Security-Token=tok&a=1"
    masked = mask_text(text, ["K3Y"])
    assert "K3Y" not in masked and "pw@" not in masked
    assert "abc" not in masked and "tok" not in masked
    assert "a=1" in masked
    assert re.search(r"X-Amz-Signature=\*\*\*", masked)
