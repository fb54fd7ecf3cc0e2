"""Reading a delivery whole: its properties and headers (:class:`Envelope`) and its body."""

from __future__ import annotations

import hashlib
import logging
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import orjson
from pydantic import ValidationError

from service.contracts import DESTINATIONS, REQUEST, Request
from service.errors import CourierError, ErrorCode, PermanentError
from service.outcome import Operation
from service.redact import redact_url
from service.topology import (
    ATTEMPT_HEADER,
    CHECKS_HEADER,
    COPY_ID_HEADER,
    DELIVERY_COUNT_HEADER,
    FOLLOW_SINCE_HEADER,
    HELD_SINCE_HEADER,
    READ_AT_HEADER,
    REDELIVERIES_HEADER,
    TRACEPARENT_HEADER,
)
from service.validation import describe

MAX_DEPTH = 32
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}")
log = logging.getLogger(__name__)


def valid_traceparent(value: str) -> bool:
    """Whether ``value`` is a W3C ``traceparent`` Courier may send on.

    The whole value must match (a trailing newline would break every outgoing
    HTTP call), version ``ff`` and all-zero trace or parent ids are invalid.
    """
    match = _TRACEPARENT.fullmatch(value)
    return match is not None and match[1] != "ff" and match[2] != "0" * 32 and match[3] != "0" * 16


def _traceparent(value: Any) -> str | None:
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if value is None or (isinstance(value, str) and valid_traceparent(value)):
        return value
    # Never fatal: the request runs, it only starts a trace of its own.
    log.debug("ignoring an invalid traceparent header: %.80r", value)
    return None


class Properties(Protocol):
    """The parts of an AMQP delivery besides its body that Courier reads."""

    @property
    def message_id(self) -> str | None: ...

    @property
    def correlation_id(self) -> str | None: ...

    @property
    def reply_to(self) -> str | None: ...

    @property
    def headers(self) -> Mapping[str, Any] | None: ...


@dataclass(frozen=True, slots=True)
class Envelope:
    """What one delivery tells besides its body, read once by :meth:`read`.

    ``redeliveries`` counts the times this request crashed or stalled a consumer:
    the broker's ``x-delivery-count`` of this copy plus the crashes of earlier
    copies, carried over in ``x-courier-redeliveries``. Courier never returns a
    delivery itself (a graceful give-back is a fresh copy), so on every RabbitMQ
    version each return the broker counted is a crash, a lost connection or a stall.
    """

    message_id: str | None = None
    correlation_id: str | None = None
    reply_to: str | None = None
    traceparent: str | None = None
    attempt: int = 1  # the attempt this copy runs: 1 for a producer's message
    redeliveries: int = 0
    held_since: datetime | None = None  # when it was first held, while it is being held
    copy_id: str | None = None  # set on every copy Courier publishes
    follow_since: datetime | None = None  # a copy following its uploaded file: since when
    checks: int = 0  # the status reads made so far for such a copy
    read_at: datetime | None = None  # when such a copy's next read is due

    @classmethod
    def read(cls, message: Properties) -> Envelope:
        """Read a delivery's properties and headers; odd header values count as absent."""
        headers = message.headers
        if not headers:  # a producer's message, as most are: nothing to read in headers
            return cls(
                message.message_id or None, message.correlation_id or None, message.reply_to or None
            )
        return cls(
            message_id=message.message_id or None,
            correlation_id=message.correlation_id or None,
            reply_to=message.reply_to or None,
            traceparent=_traceparent(headers.get(TRACEPARENT_HEADER)),
            attempt=header_int(headers.get(ATTEMPT_HEADER), default=1, least=1),
            redeliveries=crashes(headers),
            held_since=header_time(headers.get(HELD_SINCE_HEADER)),
            copy_id=header_text(headers.get(COPY_ID_HEADER)),
            follow_since=header_time(headers.get(FOLLOW_SINCE_HEADER)),
            checks=header_int(headers.get(CHECKS_HEADER)),
            read_at=header_time(headers.get(READ_AT_HEADER)),
        )


def crashes(headers: Mapping[str, Any]) -> int:
    """The crashes a delivery's headers count: earlier copies' (``x-courier-redeliveries``)
    plus the broker's count of this copy (``x-delivery-count``)."""
    return header_int(headers.get(REDELIVERIES_HEADER)) + header_int(
        headers.get(DELIVERY_COUNT_HEADER)
    )


def header_int(value: Any, *, default: int = 0, least: int = 0) -> int:
    """A header's whole number (an int, or its text); ``default`` when absent or odd."""
    if isinstance(value, bool):
        return default
    if isinstance(value, bytes | str):
        try:
            value = int(value)
        except ValueError:
            return default
    return max(value, least) if isinstance(value, int) else default


def header_text(value: Any) -> str | None:
    """A header's non-empty text (bytes decoded), else None."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return value if isinstance(value, str) and value else None


def header_time(value: Any) -> datetime | None:
    """A header's ISO 8601 time (UTC when it names no zone), else None."""
    text = header_text(value)
    if text is None:
        return None
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def _depth_ok(value: Any, limit: int) -> bool:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return False
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return True


def parse_body(body: bytes, max_bytes: int) -> Any:
    """Decode the JSON body, refusing oversized, non-UTF-8 or deeply nested input."""
    if len(body) > max_bytes:
        raise PermanentError(
            ErrorCode.INVALID_REQUEST, f"the body is {len(body)} bytes; the limit is {max_bytes}"
        )
    try:
        body.decode("utf-8")
    except UnicodeDecodeError:
        raise PermanentError(ErrorCode.INVALID_REQUEST, "the body is not valid UTF-8") from None
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise PermanentError(
            ErrorCode.INVALID_REQUEST, f"the body is not JSON: {str(exc)[:200]}"
        ) from None
    # Fewer brackets than the limit (those inside strings counted too) cannot nest past it.
    if body.count(b"{") + body.count(b"[") >= MAX_DEPTH and not _depth_ok(data, MAX_DEPTH):
        raise PermanentError(ErrorCode.INVALID_REQUEST, f"the body nests deeper than {MAX_DEPTH}")
    return data


def parse_request(body: bytes, max_bytes: int) -> Request:
    """The validated request, or ``invalid_request`` saying what is wrong."""
    data = parse_body(body, max_bytes)
    if not isinstance(data, dict):
        raise PermanentError(ErrorCode.INVALID_REQUEST, "the body must be a JSON object")
    try:
        return REQUEST.validate_python(data)
    except ValidationError as exc:
        raise PermanentError(ErrorCode.INVALID_REQUEST, describe(exc)) from None


@dataclass(frozen=True, slots=True)
class Peek:
    """What can be salvaged from a request that failed validation, for its event."""

    request_id: str | None = None
    destination: str | None = None
    source_url: str | None = None
    metadata: dict[str, str] | None = None
    operation: Operation = "upload"


def peek(body: bytes, max_bytes: int) -> Peek:
    """Best-effort facts from an invalid request; never raises."""
    try:
        data = parse_body(body, max_bytes)
    except PermanentError:
        return Peek()
    if not isinstance(data, dict):
        return Peek()
    rid = data.get("id")
    destination = data.get("destination")
    kind = destination.get("type") if isinstance(destination, dict) else None
    source = data.get("source")
    url = source.get("url") if isinstance(source, dict) else None
    metadata = data.get("metadata")
    valid_metadata = (
        isinstance(metadata, dict)
        and len(metadata) <= 50
        and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    )
    return Peek(
        request_id=rid if isinstance(rid, str) and 1 <= len(rid) <= 200 else None,
        destination=kind if kind in DESTINATIONS else None,
        source_url=redact_url(url) if isinstance(url, str) and len(url) <= 4096 else None,
        metadata=dict(metadata) if valid_metadata else None,  # type: ignore[arg-type]
        operation="delete" if data.get("operation") == "delete" else "upload",
    )


# The namespace of the ids derived from a body (UUID version 5 over its SHA-256).
_BODY_IDS = uuid.uuid5(uuid.NAMESPACE_URL, "urn:courier:request")


def request_id(body_id: str | None, envelope: Envelope, body: bytes) -> str:
    """The request id: the body's, else the AMQP ``message_id``, else one derived from the
    body, so every redelivery and replay of the same message has the same id."""
    if body_id:
        return body_id
    if envelope.message_id and len(envelope.message_id) <= 200:
        return envelope.message_id
    return str(uuid.uuid5(_BODY_IDS, hashlib.sha256(body).hexdigest()))


@dataclass(frozen=True, slots=True)
class Decoded:
    """A delivery's body as the settle needs it: the request, or why there is none."""

    request: Request | None
    request_id: str
    metadata: dict[str, str]
    error: CourierError | None = None
    destination: str | None = None  # what could be salvaged for the event of a refused one
    source_url: str | None = None
    operation: Operation = "upload"  # a refused one's, as its body says


def decode(body: bytes, envelope: Envelope, max_bytes: int) -> Decoded:
    """The validated request, or an ``invalid_request`` with what the body still tells."""
    try:
        request = parse_request(body, max_bytes)
    except CourierError as invalid:
        return refuse(body, envelope, max_bytes, invalid)
    return Decoded(request, request_id(request.id, envelope, body), request.metadata)


def refuse(body: bytes, envelope: Envelope, max_bytes: int, error: CourierError) -> Decoded:
    """A body that is not run (``error`` says why), with what can be salvaged of it."""
    info = peek(body, max_bytes)
    return Decoded(
        None,
        request_id(info.request_id, envelope, body),
        info.metadata or {},
        error,
        info.destination,
        info.source_url,
        info.operation,
    )
