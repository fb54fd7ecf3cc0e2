"""The destination port and what the two HTTP adapters share: error mapping."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
import orjson

from service.contracts import DeliveryMode, SourceInfo, UploadRequest
from service.errors import CourierError, ErrorCode, RetryableError, error_for
from service.retry import parse_retry_after
from service.sources.base import Source

# 409 is retryable by the contract: a conflicting concurrent write may clear.
_RETRY_STATUSES = frozenset({408, 409, 425, 429})


@dataclass(frozen=True, slots=True)
class Uploaded:
    """A successful delivery: the destination's answer and what was sent."""

    result: Any
    delivery: DeliveryMode
    source: SourceInfo
    deduplicated: bool = False


class Destination(Protocol):
    """One destination API."""

    name: str

    def configured(self) -> bool:
        """Whether the destination has what it needs (an API key)."""

    def precheck(self, request: UploadRequest) -> None:
        """Checks that need nothing fetched (file name, types); raise a CourierError."""

    async def deliver(self, request: UploadRequest, source: Source) -> Uploaded:
        """Deliver the request's file; raise a CourierError on failure."""


def error_message(body: bytes) -> str | None:
    """The error text from any of the known error body shapes, cut to 300 characters."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        text = body.decode("utf-8", "replace").strip()
        return text[:300] or None
    message: Any = None
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, str):
            message = error
        elif isinstance(error, dict):
            message = error.get("message") or error.get("code") or error.get("type")
        elif isinstance(data.get("file"), dict):
            message = data["file"].get("error")
        elif isinstance(data.get("message"), str):
            message = data["message"]
    return str(message)[:300] if message else None


def response_error(destination: str, status: int, headers: Any, body: bytes) -> CourierError:
    """Map a destination's error answer to ``destination_rejected`` or ``_unavailable``."""
    detail = error_message(body)
    text = f"{destination} answered HTTP {status}" + (f": {detail}" if detail else "")
    if status in _RETRY_STATUSES or status >= 500:
        return RetryableError(
            ErrorCode.DESTINATION_UNAVAILABLE,
            text,
            http_status=status,
            retry_after=parse_retry_after(headers),
        )
    return error_for(ErrorCode.DESTINATION_REJECTED, text, http_status=status)


def transport_error(destination: str, exc: BaseException) -> RetryableError:
    """A connection failure or timeout talking to the destination."""
    what = "did not answer in time" if isinstance(exc, TimeoutError) else "could not be reached"
    return RetryableError(
        ErrorCode.DESTINATION_UNAVAILABLE, f"{destination} {what} ({type(exc).__name__})"
    )


TRANSPORT_ERRORS = (aiohttp.ClientError, TimeoutError)


async def read_json(destination: str, response: aiohttp.ClientResponse) -> Any:
    """The JSON body of a successful answer; anything else is ``destination_unavailable``."""
    body = await response.read()
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        raise RetryableError(
            ErrorCode.DESTINATION_UNAVAILABLE,
            f"{destination} answered HTTP {response.status} without JSON",
            http_status=response.status,
        ) from None
