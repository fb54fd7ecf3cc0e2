"""The request and event models, and the checked-in JSON Schemas."""

from __future__ import annotations

import copy
import logging
import uuid
from dataclasses import dataclass
from typing import Any

import jsonschema
import orjson
import pytest

from service.contracts import (
    DeleteRequest,
    IngestionEvent,
    MindsetDestination,
    ResultEvent,
    SourceInfo,
    UploadRequest,
    json_schemas,
)
from service.errors import ErrorCode, PermanentError, RetryableError
from service.events import build_event, build_ingestion_event
from service.messages import Envelope, decode, parse_request
from service.outcome import Ingestion, Outcome, PlatformFile
from service.urls import parse_s3_url
from tests.regen_schemas import SCHEMA_DIR, rendered

INCONVO: dict[str, Any] = {
    "id": "req-1",
    "source": {"url": "s3://reports/2024/sales.csv"},
    "destination": {"type": "inconvo", "userIdentifier": "user_123", "notes": "Q4"},
    "metadata": {"tenant": "acme"},
}
MINDSET: dict[str, Any] = {
    "source": {"url": "https://files.example/doc.pdf"},
    "destination": {"type": "mindset", "appUid": "app", "contextUid": "ctx"},
}


def _with(base: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(base)
    *parents, last = path.split(".")
    node = doc
    for key in parents:
        node = node[key]
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value
    return doc


_DELETE = object()


def _invalid(doc: dict[str, Any]) -> str:
    with pytest.raises(PermanentError) as info:
        parse_request(orjson.dumps(doc), 1 << 20)
    assert info.value.code is ErrorCode.INVALID_REQUEST
    return info.value.message


def test_valid_requests_parse() -> None:
    """Both destination kinds parse, with defaults filled in."""
    inconvo = parse_request(orjson.dumps(INCONVO), 1 << 20)
    assert inconvo.destination.type == "inconvo"
    assert inconvo.metadata == {"tenant": "acme"}
    mindset = parse_request(orjson.dumps(MINDSET), 1 << 20)
    assert isinstance(mindset.destination, MindsetDestination)
    assert mindset.destination.delivery == "auto"
    assert mindset.metadata == {}


def test_null_counts_as_absent() -> None:
    """Optional fields given as null take their defaults."""
    doc = _with(_with(MINDSET, "metadata", None), "destination.delivery", None)
    request = parse_request(orjson.dumps(doc), 1 << 20)
    assert request.metadata == {}
    assert request.destination.delivery == "auto"  # type: ignore[union-attr]


@pytest.mark.parametrize("path", ["typo", "source.typo", "destination.userIdentifer"])
def test_unknown_field_is_rejected_even_when_null(path: str) -> None:
    """null stands for absent only for the contract's own fields: an unknown name is still an error."""
    assert path.rsplit(".", 1)[-1] in _invalid(_with(INCONVO, path, None))


def test_null_for_a_required_field_is_missing() -> None:
    """A required field given as null is reported as missing."""
    assert "source" in _invalid(_with(INCONVO, "source", None))


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:99999/x.csv",
        "http://127.0.0.1:0/x.csv",
        "http://xn--/x.csv",
        "http://xn--zz/x.csv",
        "http://[::1/x.csv",
        "http://exa mple.com/x.csv",
        "http://a..b/x.csv",
        "http://x.\u200b/x.csv",
        "https:///x.csv",
        "http://user:pw@/x.csv",
    ],
)
def test_unusable_http_url_is_invalid_request(url: str) -> None:
    """A URL no fetch could use (port out of range, no or impossible host) fails in the model."""
    message = _invalid(_with(INCONVO, "source.url", url))
    assert "source.url" in message
    assert "pw" not in message


@pytest.mark.parametrize(
    "url",
    [
        "s3://bucket/reports/q4#final.csv",
        "s3://bucket/k.csv?foo=1",
        "s3://bucket/k.csv?versionId=",
        "s3://bucket/k.csv?versionId=1&x=2",
        "s3://bucket/k.csv?",
        "s3://user:pw@bucket/k.csv",
        "s3://bucket:443/k.csv",
        "s3://ab/k.csv",
        "s3://bucket/%FF.csv",
        "s3://bucket/" + "k" * 1025,
        "s3:///k.csv",
        "s3://bucket",
        "s3://bucket/",
    ],
)
def test_s3_url_rules(url: str) -> None:
    """An s3 URL is s3://bucket/key[?versionId=v]: anything else fails before any S3 call."""
    message = _invalid(_with(INCONVO, "source.url", url))
    assert "source.url" in message
    assert "pw" not in message


@pytest.mark.parametrize(
    ("url", "parts"),
    [
        ("s3://bucket//a.csv", ("bucket", "/a.csv", None)),
        ("s3://bucket/reports/q4%23final.csv", ("bucket", "reports/q4#final.csv", None)),
        ("s3://bucket/a%3Fb.csv?versionId=v%2B1", ("bucket", "a?b.csv", "v+1")),
        ("s3://Legacy_Bucket.2017/k.csv", ("Legacy_Bucket.2017", "k.csv", None)),
    ],
)
def test_s3_url_key_is_everything_after_the_bucket(
    url: str, parts: tuple[str, str, str | None]
) -> None:
    """The key keeps a leading '/', and percent-encoded '#' and '?' are part of it."""
    assert parse_s3_url(url) == parts
    assert parse_request(orjson.dumps(_with(INCONVO, "source.url", url)), 1 << 20)


@pytest.mark.parametrize(
    ("path", "value", "mentions"),
    [
        ("extra", 1, "extra"),
        ("source.typo", "x", "typo"),
        ("destination.userIdentifer", "x", "userIdentifer"),
        ("id", "", "id"),
        ("id", "x" * 201, "id"),
        ("id", 7, "id"),
        ("source.url", "https://" + "a" * 2050, "2048"),
        ("source", _DELETE, "source"),
        ("destination", _DELETE, "destination"),
        ("destination.type", "dropbox", "destination"),
        ("destination.userIdentifier", "user 1", "userIdentifier"),
        ("destination.userIdentifier", "u" * 257, "userIdentifier"),
        ("destination.fileName", "../etc/passwd.csv", "fileName"),
        ("destination.fileName", "a/b.csv", "fileName"),
        ("destination.fileName", "a\r\nb.csv", "fileName"),
        ("metadata", {"k": 1}, "metadata"),
        ("metadata", {f"k{i}": "v" for i in range(51)}, "metadata"),
        ("metadata", ["a"], "metadata"),
    ],
)
def test_inconvo_rules(path: str, value: Any, mentions: str) -> None:
    """Each broken rule of the Inconvo request is invalid_request naming the field."""
    assert mentions in _invalid(_with(INCONVO, path, value))


def test_inconvo_needs_exactly_one_scope() -> None:
    """userIdentifier and a context scope exclude each other; one is required."""
    both = _with(_with(INCONVO, "destination.contextKey", "orgId"), "destination.contextValue", "o")
    assert "exactly one scope" in _invalid(both)
    neither = _with(INCONVO, "destination.userIdentifier", _DELETE)
    assert "exactly one scope" in _invalid(neither)
    half = _with(neither, "destination.contextKey", "orgId")
    assert "contextValue" in _invalid(half)
    context = _with(half, "destination.contextValue", "org_456")
    assert parse_request(orjson.dumps(context), 1 << 20).destination.type == "inconvo"
    assert "contextKey" in _invalid(_with(context, "destination.contextKey", "org@id"))


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("destination.appUid", ""),
        ("destination.name", "n" * 101),
        ("destination.mimeType", "image/png"),
        ("destination.delivery", "email"),
        ("destination.zipType", "z" * 21),
        ("destination.knownAs", "k" * 201),
        ("destination.externalUrl", "u" * 2049),
        ("destination.thumbnail", "t" * 65537),
        ("destination.contentHash", "h" * 201),
        ("destination.runId", "r" * 201),
        ("destination.labels", [f"l{i}" for i in range(11)]),
        ("destination.autoPublish", "true"),
        ("destination.labels", "one"),
        ("destination.thumbnailUrl", "ftp://files.example/t.png"),
        ("destination.thumbnailUrl", "http://127.0.0.1:99999/t.png"),
        ("destination.externalUrl", "not a URL"),
        ("destination.externalUrl", "javascript:alert(1)"),
    ],
)
def test_mindset_limits(path: str, value: Any) -> None:
    """The Mindset API's field limits are checked up front."""
    _invalid(_with(MINDSET, path, value))


ROCKET = "\U0001f680"  # one code point, two UTF-16 code units (as the API counts)


@pytest.mark.parametrize(
    ("path", "limit"),
    [
        ("destination.name", 100),
        ("destination.knownAs", 200),
        ("destination.thumbnail", 65536),
        ("destination.zipType", 20),
        ("destination.contentHash", 200),
        ("destination.runId", 200),
    ],
)
def test_mindset_limits_count_utf16_code_units(path: str, limit: int) -> None:
    """Every limited Mindset field counts as the API does: a character outside the BMP counts twice."""
    fits = ROCKET * (limit // 2)
    assert parse_request(orjson.dumps(_with(MINDSET, path, fits)), 1 << 20)
    assert str(limit) in _invalid(_with(MINDSET, path, fits + "a"))


@pytest.mark.parametrize(
    "path", ["destination.externalUrl", "destination.thumbnailUrl", "source.url"]
)
def test_url_limits_count_utf16_code_units(path: str) -> None:
    """URLs Mindset is handed are limited to 2048 UTF-16 code units too."""
    base = "https://files.example/"
    fits = base + ROCKET * ((2048 - len(base)) // 2)
    assert parse_request(orjson.dumps(_with(MINDSET, path, fits)), 1 << 20)
    assert "2048" in _invalid(_with(MINDSET, path, fits + "ab"))


@pytest.mark.parametrize(
    ("mime", "delivery"),
    [
        ("text/plain", "sourceUrl"),
        ("video/mp4", "documentContent"),
        ("application/zip", "documentContent"),
        (
            "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
            "documentContent",
        ),
    ],
)
def test_mindset_forbidden_delivery(mime: str, delivery: str) -> None:
    """An explicit delivery the API forbids for the type is invalid_request."""
    doc = _with(_with(MINDSET, "destination.mimeType", mime), "destination.delivery", delivery)
    assert "delivered" in _invalid(doc)


def test_checked_in_schemas_match_the_models() -> None:
    """schemas/*.json are exactly what the models generate (run `make schemas` after a change)."""
    for file_name, content in rendered().items():
        assert (SCHEMA_DIR / file_name).read_bytes() == content, f"{file_name} drifted"


def test_schema_agrees_with_the_model() -> None:
    """The published request schema accepts what the model accepts and rejects unknown fields."""
    schema = json_schemas()["request"]
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    assert validator.is_valid(INCONVO)
    assert validator.is_valid(MINDSET)
    assert not validator.is_valid(_with(INCONVO, "typo", 1))
    assert not validator.is_valid(_with(INCONVO, "destination.type", "dropbox"))
    assert UploadRequest.model_validate(INCONVO).id == "req-1"


TRACE = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def _trace(value: object) -> str | None:
    @dataclass(frozen=True)
    class Props:
        headers: dict[str, object]
        message_id: str | None = None
        correlation_id: str | None = None
        reply_to: str | None = None

    return Envelope.read(Props({"traceparent": value})).traceparent


@pytest.mark.parametrize(
    "value",
    [
        TRACE + "\n",
        TRACE + "\r\n",
        TRACE + " ",
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
        TRACE.upper(),
        (TRACE + "\n").encode(),
    ],
)
def test_invalid_traceparent_is_dropped(value: object, caplog: pytest.LogCaptureFixture) -> None:
    """Only a W3C-valid traceparent is kept (and so sent on and copied to the event); the rest is dropped and logged."""
    caplog.set_level(logging.DEBUG, logger="service.messages")
    assert _trace(value) is None
    assert "traceparent" in caplog.text


def test_valid_traceparent_is_kept() -> None:
    """A valid header, as str or bytes, is kept as is."""
    assert _trace(TRACE) == TRACE
    assert _trace(TRACE.encode()) == TRACE
    assert _trace(TRACE.replace("-01", "-00").replace("00-", "01-", 1)) is not None


_SOURCE = SourceInfo(
    url="https://files.example/a.csv", bytes=3, contentType="text/csv", sha256="0" * 64
)


@pytest.mark.parametrize(
    "outcome",
    [
        Outcome(12.5, "inconvo", "multipart", _SOURCE, result={"file": {"name": "a.csv"}}),
        Outcome(3.0, "mindset", "sourceUrl", SourceInfo(url="s3://b/k"), result=None),
        Outcome(3.0, "mindset", "documentContent", _SOURCE, result=[1, "x"], deduplicated=True),
        Outcome(0.0, None, error=PermanentError(ErrorCode.INVALID_REQUEST, "bad")),
        Outcome(
            7.25,
            "inconvo",
            source=_SOURCE,
            result={"ignored": True},
            deduplicated=True,
            error=RetryableError(ErrorCode.DESTINATION_UNAVAILABLE, "503", http_status=503),
        ),
    ],
)
def test_built_events_are_what_the_event_model_publishes(outcome: Outcome) -> None:
    """The hot path builds the event's JSON directly: it must be the model's JSON, key order too."""
    event = build_event(
        event_source="urn:courier:test",
        request_id="req-1",
        attempts=2,
        metadata={"tenant": "acme"},
        outcome=outcome,
    )
    model = ResultEvent.model_validate(event)
    assert orjson.dumps(event) == orjson.dumps(model.to_json_dict())
    jsonschema.Draft202012Validator(json_schemas()["event"]).validate(event)


@pytest.mark.parametrize(
    "outcome",
    [
        Outcome(4.0, "inconvo", operation="delete", result={"file": "a.csv"}, existed=True),
        Outcome(4.0, "mindset", operation="delete", existed=False),
        Outcome(
            4.0,
            "mindset",
            operation="delete",
            error=RetryableError(ErrorCode.DESTINATION_UNAVAILABLE, "503"),
        ),
        Outcome(3.0, "mindset", "documentContent", _SOURCE, result={"uid": "n"}, replaced_uid="o"),
    ],
)
def test_delete_and_replace_events_are_what_the_model_publishes(outcome: Outcome) -> None:
    """A delete's events (courier.delete.*, operation, existed) and a replacing upload's
    (replaced, replacedUid) are the model's JSON too, and valid by the event schema."""
    event = build_event(
        event_source="urn:courier:test",
        request_id="req-1",
        attempts=1,
        metadata={},
        outcome=outcome,
    )
    assert event["type"].startswith(f"courier.{outcome.operation}.")
    model = ResultEvent.model_validate(event)
    assert orjson.dumps(event) == orjson.dumps(model.to_json_dict())
    jsonschema.Draft202012Validator(json_schemas()["event"]).validate(event)


@pytest.mark.parametrize(
    "ingestion",
    [
        Ingestion("inconvo", PlatformFile("stored", "completed", {"file": {}}), 0.0, 0),
        Ingestion(
            "mindset",
            PlatformFile("fail", "failed", {"uid": "f"}, uid="f"),
            1234.5,
            3,
            PermanentError(ErrorCode.INGESTION_FAILED, "Mindset could not ingest the file"),
        ),
        Ingestion(
            "mindset",
            None,
            9.0,
            1,
            PermanentError(ErrorCode.DESTINATION_REJECTED, "403", http_status=403),
        ),
    ],
)
def test_ingestion_events_are_what_the_model_publishes(ingestion: Ingestion) -> None:
    """The ingestion event's JSON is the IngestionEvent model's, and valid by the schema."""
    event = build_ingestion_event(
        event_source="urn:courier:test", request_id="req-1", metadata={}, ingestion=ingestion
    )
    model = IngestionEvent.model_validate(event)
    assert orjson.dumps(event) == orjson.dumps(model.to_json_dict())
    jsonschema.Draft202012Validator(json_schemas()["event"]).validate(event)


INCONVO_DELETE: dict[str, Any] = {
    "operation": "delete",
    "destination": {
        "type": "inconvo",
        "contextKey": "orgId",
        "contextValue": "o1",
        "fileName": "q.csv",
    },
}
MINDSET_DELETE: dict[str, Any] = {
    "operation": "delete",
    "destination": {"type": "mindset", "appUid": "a", "contextUid": "c", "externalId": "x"},
}


def test_a_request_is_an_upload_or_a_delete() -> None:
    """operation picks the kind (upload when absent or null); every request has a tenant."""
    assert isinstance(parse_request(orjson.dumps(INCONVO), 1 << 20), UploadRequest)
    nulled = _with(INCONVO, "operation", None)
    assert isinstance(parse_request(orjson.dumps(nulled), 1 << 20), UploadRequest)
    for body in (INCONVO_DELETE, MINDSET_DELETE):
        request = parse_request(orjson.dumps(body), 1 << 20)
        assert isinstance(request, DeleteRequest) and request.tenant == "default"
    assert (
        parse_request(orjson.dumps({**INCONVO, "tenant": "acme:web"}), 1 << 20).tenant == "acme:web"
    )


@pytest.mark.parametrize(
    ("doc", "mentions"),
    [
        ({**INCONVO, "operation": "move"}, "operation"),
        ({**INCONVO, "tenant": "has space"}, "tenant"),
        ({**INCONVO, "tenant": "t" * 65}, "tenant"),
        ({**INCONVO_DELETE, "source": {"url": "https://x.example/q.csv"}}, "source"),
        (_with(INCONVO_DELETE, "destination.notes", "n"), "notes"),
        (_with(INCONVO_DELETE, "destination.fileName", _DELETE), "fileName"),
        (_with(INCONVO_DELETE, "destination.fileName", "q.xlsx"), "fileName"),
        (_with(INCONVO_DELETE, "destination.userIdentifier", "u"), "scope"),
        (_with(MINDSET_DELETE, "destination.externalId", _DELETE), "externalId"),
        (_with(MINDSET_DELETE, "destination.delivery", "auto"), "delivery"),
        (_with(MINDSET, "destination.onExisting", "overwrite"), "onExisting"),
    ],
)
def test_delete_and_new_field_rules(doc: dict[str, Any], mentions: str) -> None:
    """Deletes take no source and none of an upload's fields; tenants and onExisting are
    checked; each message names the field."""
    assert mentions in _invalid(doc)


def test_a_request_without_any_id_gets_one_derived_from_its_body() -> None:
    """Neither id nor message_id: the same body always gets the same id, another body
    another (so a redelivery finds the file it made)."""
    body = orjson.dumps(MINDSET)
    first = decode(body, Envelope(), 1 << 20).request_id
    assert first == decode(body, Envelope(), 1 << 20).request_id
    assert (
        first
        != decode(orjson.dumps({**MINDSET, "metadata": {"k": "v"}}), Envelope(), 1 << 20).request_id
    )
    assert str(uuid.UUID(first)) == first and uuid.UUID(first).version == 5
    assert decode(body, Envelope(message_id="m-1"), 1 << 20).request_id == "m-1"
