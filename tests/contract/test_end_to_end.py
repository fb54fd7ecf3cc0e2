"""The whole path through RabbitMQ: request in, file delivered, event out, ack or dead letter."""

from __future__ import annotations

import re
import uuid

import aio_pika
import orjson
import pytest
from aio_pika.abc import AbstractRobustConnection

from service.runtime import Service
from testbed.fakes import FakeInconvo
from testbed.stage import Stage
from testbed.support import (
    FileServer,
    inconvo_request,
    next_message,
    quiesce,
)

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


pytestmark = pytest.mark.usefixtures("fast_retries")


async def dead_letters(
    stage: Stage, service: Service | None = None
) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """Everything in the test's dead-letter queue, once nothing more can be on its way.

    Courier publishes a dead letter after the event is confirmed: with the service
    still running, its requests must be out of flight first.
    """
    if service is not None:
        await quiesce(service)
    return await stage.dead_letters()


async def queue_depth(amqp: AbstractRobustConnection, queue: str) -> int:
    """Messages ready in ``queue``."""
    channel = await amqp.channel()
    try:
        declared = await channel.declare_queue(queue, passive=True)
        return int(declared.declaration_result.message_count or 0)
    finally:
        await channel.close()


async def test_http_source_to_inconvo_succeeds(
    stage: Stage,
    service: Service,
) -> None:
    """A request is fetched, uploaded, and answered with a complete CloudEvent (also to reply_to)."""
    body = b"region,total\neu,10\nus,12\n"
    url = stage.files.add("/exports/sales_q4.csv?token=s3cr3t", body)
    reply = await (await stage.amqp.channel()).declare_queue(exclusive=True)
    await stage.publish(
        {**inconvo_request(url, "req-ok-1", notes="Q4"), "metadata": {"tenant": "acme"}},
        correlation_id="corr-7",
        reply_to=reply.name,
        headers={"traceparent": TRACEPARENT},
    )
    [event] = await stage.collector.wait_for(1)
    [message] = stage.collector.messages
    assert event["specversion"] == "1.0"
    assert event["type"] == "courier.upload.succeeded"
    assert event["source"] == "urn:courier:test"
    assert event["subject"] == "req-ok-1"
    assert event["datacontenttype"] == "application/json"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", event["time"])
    uuid.UUID(event["id"])
    assert message.content_type == "application/cloudevents+json"
    assert message.message_id == event["id"]
    assert message.correlation_id == "corr-7"
    assert message.routing_key == "upload.succeeded"
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert (message.headers or {}).get("traceparent") == TRACEPARENT
    data = event["data"]
    assert data["requestId"] == "req-ok-1"
    assert data["status"] == "succeeded"
    assert (data["destination"], data["delivery"], data["attempts"]) == ("inconvo", "multipart", 1)
    assert data["metadata"] == {"tenant": "acme"}
    assert data["durationMs"] >= 0
    assert data["source"]["url"] == stage.files.url("/exports/sales_q4.csv")  # query dropped
    assert data["source"]["bytes"] == len(body)
    assert data["source"]["contentType"] == "text/csv"
    assert len(data["source"]["sha256"]) == 64
    [upload] = stage.inconvo.uploads
    assert upload.content == body and upload.notes == "Q4"
    assert data["result"] == {
        "file": {"name": "sales_q4.csv", "path": upload.path, "size": len(body)}
    }
    assert "error" not in data
    replied = await next_message(reply)  # published just after the event
    assert orjson.loads(replied.body)["data"]["requestId"] == "req-ok-1"
    assert await queue_depth(stage.amqp, stage.queue) == 0
    assert await dead_letters(stage, service) == []


async def test_request_id_falls_back_to_message_id(
    stage: Stage,
    service: Service,
) -> None:
    """Without a body id, the AMQP message_id is the request id and the correlation id."""
    await stage.publish(inconvo_request(stage.files.add("/a.csv", b"1\n")), message_id="mid-42")
    [event] = await stage.collector.wait_for(1)
    assert event["subject"] == event["data"]["requestId"] == "mid-42"
    assert stage.collector.messages[0].correlation_id == "mid-42"


async def test_failed_request_is_dead_lettered_with_headers(
    stage: Stage,
    service: Service,
) -> None:
    """A non-CSV file fails unsupported_type before fetching; the original goes to the dead queue."""
    url = stage.files.add("/report.xlsx", b"PK")
    raw = orjson.dumps(inconvo_request(url, "req-bad-type"))
    await stage.publish(raw, headers={"x-custom": "kept"})
    [event] = await stage.collector.wait_for(1)
    assert stage.collector.messages[0].routing_key == "upload.failed"
    data = event["data"]
    assert data["status"] == "failed"
    assert data["error"]["code"] == "unsupported_type"
    assert data["error"]["retryable"] is False
    assert "result" not in data
    assert stage.files.hits == [] and stage.inconvo.requests == []
    [dead] = await dead_letters(stage, service)
    assert dead.body == raw
    headers = dead.headers or {}
    assert headers["x-courier-error-code"] == "unsupported_type"
    assert "xlsx" in str(headers["x-courier-error-message"])
    assert headers["x-courier-attempts"] == 1
    assert re.match(r"\d{4}-\d\d-\d\dT", str(headers["x-courier-failed-at"]))
    assert headers["x-custom"] == "kept"


@pytest.mark.parametrize(
    ("body", "message_id"),
    [
        (b"this is not json", "mid-garbage"),
        (b"\xff\xfe\x00 invalid utf-8", "mid-utf8"),
        (b"[1, 2, 3]", "mid-array"),
        (b"[" * 5000 + b"]" * 5000, "mid-deep"),
        (b'{"source": {"url": "http://x/a.csv"}, "destination": {"type": "inconvo"}}', "mid-scope"),
    ],
)
async def test_unparseable_bodies_get_a_failed_event(
    stage: Stage,
    service: Service,
    body: bytes,
    message_id: str,
) -> None:
    """A body that is not a valid request ends in one invalid_request event and the dead queue."""
    await stage.publish(body, message_id=message_id)
    [event] = await stage.collector.wait_for(1)
    data = event["data"]
    assert event["subject"] == data["requestId"] == message_id
    assert data["error"]["code"] == "invalid_request"
    assert data["attempts"] == 1 and data["metadata"] == {}
    assert data["delivery"] is None
    [dead] = await dead_letters(stage, service)
    assert dead.body == body


async def test_oversized_message_is_invalid(
    stage: Stage,
) -> None:
    """A body over COURIER_MAX_MESSAGE_BYTES is invalid_request, dead-lettered whole."""
    async with stage.running(max_message_bytes=2048):
        body = orjson.dumps({"pad": "x" * 4096})
        await stage.publish(body, message_id="mid-big")
        [event] = await stage.collector.wait_for(1)
    assert event["data"]["error"]["code"] == "invalid_request"
    assert "limit" in event["data"]["error"]["message"]
    [dead] = await dead_letters(stage)
    assert dead.body == body


@pytest.mark.parametrize(
    ("url_path", "status", "code"),
    [
        ("/missing.csv", 404, "source_not_found"),
        ("/secret.csv", 403, "source_forbidden"),
    ],
)
async def test_source_errors(
    stage: Stage,
    service: Service,
    url_path: str,
    status: int,
    code: str,
) -> None:
    """Source HTTP errors end as failed events with the contract code and httpStatus."""
    url = stage.files.add(url_path, b"no", status=status)
    await stage.publish(inconvo_request(url, f"req-{status}"))
    [event] = await stage.collector.wait_for(1)
    assert event["data"]["error"]["code"] == code
    assert event["data"]["error"]["httpStatus"] == status
    assert len(await dead_letters(stage, service)) == 1


async def test_unsupported_scheme_and_missing_key(
    stage: Stage,
) -> None:
    """ftp:// is unsupported_source; no Inconvo key is destination_not_configured."""
    async with stage.running(inconvo_api_key=None):
        await stage.publish(inconvo_request("ftp://host/a.csv", "req-ftp"))
        await stage.publish(inconvo_request(stage.files.add("/a.csv", b"1\n"), "req-nokey"))
        events = await stage.collector.wait_for(2)
    codes = {e["data"]["requestId"]: e["data"]["error"]["code"] for e in events}
    assert codes == {"req-ftp": "unsupported_source", "req-nokey": "destination_not_configured"}
    assert stage.files.hits == []


async def test_retryable_failure_goes_through_delay_tiers_then_dead(
    stage: Stage,
) -> None:
    """A destination that keeps failing is retried via the tiers, then fails once with attempts = max."""
    stage.inconvo.fail_next(500, count=100)
    # The breaker would hold the last tries (tests/flow/test_end_to_end.py); here, the tiers alone.
    async with stage.running(max_attempts=2, breaker_threshold=100):
        await stage.publish(inconvo_request(stage.files.add("/a.csv", b"1\n"), "req-500"))
        [event] = await stage.collector.wait_for(1, timeout=30)
    data = event["data"]
    assert data["attempts"] == 2
    assert data["error"]["code"] == "destination_unavailable"
    assert data["error"]["retryable"] is True
    assert data["error"]["httpStatus"] == 500
    assert len(stage.inconvo.requests) == 6  # 3 in-process tries per attempt
    [dead] = await dead_letters(stage)
    assert (dead.headers or {})["x-courier-attempts"] == 2
    assert len(stage.collector.events) == 1


MIB = 1024 * 1024
# (case, expected code, httpStatus, whether the source is fetched, whether Inconvo is called)
FAILURES: list[tuple[str, str, int | None, bool, bool]] = [
    ("not-json", "invalid_request", None, False, False),
    ("unknown-field", "invalid_request", None, False, False),
    ("bad-user", "invalid_request", None, False, False),
    ("xlsx", "unsupported_type", None, False, False),
    ("11mib", "too_large", None, True, False),
    ("chunked-20mib", "too_large", None, True, False),
    ("source-404", "source_not_found", 404, True, False),
    ("destination-422", "destination_rejected", 422, True, True),
    ("no-key", "destination_not_configured", None, False, False),
]


def failing_body(case: str, files: FileServer, inconvo: FakeInconvo) -> bytes:
    """The request body for one failure case of the table below."""
    if case == "not-json":
        return b"{not json"
    good = files.add("/ok.csv", b"a,b\n1,2\n")
    request = inconvo_request(good, f"req-{case}")
    if case == "unknown-field":
        request["destination"]["userIdentifer"] = "typo"
    elif case == "bad-user":
        request["destination"]["userIdentifier"] = "user 123!"
    elif case == "xlsx":
        request["source"]["url"] = files.add("/book.xlsx", b"PK")
    elif case == "11mib":
        request["source"]["url"] = files.add("/big.csv", b"0" * (11 * MIB))
    elif case == "chunked-20mib":
        request["source"]["url"] = files.add("/stream.csv", stream_bytes=20 * MIB)
    elif case == "source-404":
        request["source"]["url"] = files.url("/missing.csv")
    elif case == "destination-422":
        inconvo.fail_next(422, body={"error": "Unprocessable dataset"})
    return orjson.dumps(request)


@pytest.mark.parametrize(
    ("case", "code", "http_status", "fetches", "uploads"), FAILURES, ids=[f[0] for f in FAILURES]
)
async def test_each_failure_ends_in_one_event_and_the_dead_queue(
    stage: Stage,
    case: str,
    code: str,
    http_status: int | None,
    fetches: bool,
    uploads: bool,
) -> None:
    """Each failure of the list gets exactly one failed event with its code, the original in the dead queue, and no call it could have avoided."""
    overrides = {"inconvo_api_key": None} if case == "no-key" else {}
    body = failing_body(case, stage.files, stage.inconvo)
    async with stage.running(**overrides):
        await stage.publish(body, message_id=f"mid-{case}")
        [event] = await stage.collector.wait_for(1)
        assert await queue_depth(stage.amqp, stage.queue) == 0
    error = event["data"]["error"]
    assert (event["data"]["status"], error["code"]) == ("failed", code)
    assert error.get("httpStatus") == http_status
    assert len(stage.collector.events) == 1
    [dead] = await dead_letters(stage)
    assert dead.body == body
    assert (dead.headers or {})["x-courier-error-code"] == code
    assert bool(stage.files.hits) is fetches
    assert bool(stage.inconvo.requests) is uploads
    assert stage.inconvo.uploads == []
