"""Decoding request messages: the body, the request id and the attempt count."""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from pydantic import ValidationError

from service.amqp.topology import (
    ATTEMPT_HEADER,
    DELIVERY_COUNT_HEADER,
    TRACEPARENT_HEADER,
)
from service.contracts import SourceSpec, UploadRequest
from service.errors import ErrorCode, PermanentError
from service.redact import redact_url

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


@dataclass(frozen=True, slots=True)
class Envelope:
    """What the AMQP layer tells about one delivery."""

    message_id: str | None
    correlation_id: str | None
    reply_to: str | None
    traceparent: str | None
    attempt: int
    delivery_count: int

    @classmethod
    def from_properties(
        cls,
        *,
        message_id: str | None,
        correlation_id: str | None,
        reply_to: str | None,
        headers: Mapping[str, Any] | None,
    ) -> Envelope:
        """Read the envelope from message properties; odd header values count as absent."""
        headers = headers or {}
        return cls(
            message_id=message_id or None,
            correlation_id=correlation_id or None,
            reply_to=reply_to or None,
            traceparent=_traceparent(headers.get(TRACEPARENT_HEADER)),
            attempt=_count(headers.get(ATTEMPT_HEADER), default=1),
            delivery_count=_count(headers.get(DELIVERY_COUNT_HEADER), default=0),
        )


def _count(value: Any, default: int) -> int:
    if isinstance(value, bool):
        return default
    if isinstance(value, int):
        return max(value, 0) if default == 0 else max(value, 1)
    if isinstance(value, bytes | str):
        try:
            return _count(int(value), default)
        except ValueError:
            return default
    return default


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


def _summarise(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors(include_input=False)[:3]:
        where = ".".join(str(p) for p in error["loc"]) or "body"
        parts.append(f"{where}: {error['msg']}")
    more = exc.error_count() - len(parts)
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


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


def parse_request(body: bytes, max_bytes: int) -> UploadRequest:
    """The validated request, or ``invalid_request`` saying what is wrong."""
    data = parse_body(body, max_bytes)
    if not isinstance(data, dict):
        raise PermanentError(ErrorCode.INVALID_REQUEST, "the body must be a JSON object")
    try:
        return UploadRequest.model_validate(data)
    except ValidationError as exc:
        raise PermanentError(ErrorCode.INVALID_REQUEST, _summarise(exc)) from None


@dataclass(frozen=True, slots=True)
class Peek:
    """What can be salvaged from a request that failed validation, for its event."""

    request_id: str | None = None
    destination: str | None = None
    source_url: str | None = None
    metadata: dict[str, str] | None = None


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
        destination=kind if kind in ("inconvo", "mindset") else None,
        source_url=redact_url(url) if isinstance(url, str) and len(url) <= 4096 else None,
        metadata=dict(metadata) if valid_metadata else None,  # type: ignore[arg-type]
    )


def request_id(body_id: str | None, envelope: Envelope) -> str:
    """The request id: the body's, else the AMQP ``message_id``, else a new UUID."""
    if body_id:
        return body_id
    if envelope.message_id and len(envelope.message_id) <= 200:
        return envelope.message_id
    return str(uuid.uuid4())


__all__ = ["Envelope", "Peek", "SourceSpec", "parse_request", "peek", "request_id"]
