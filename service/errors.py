"""The contract's error codes and the two branches of :class:`CourierError`.

Adapters translate library exceptions into these at their edge, so nothing
above them sees aiohttp or botocore types.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    """The error codes a failed event carries (``data.error.code``)."""

    INVALID_REQUEST = "invalid_request"
    UNSUPPORTED_SOURCE = "unsupported_source"
    SOURCE_BLOCKED = "source_blocked"
    SOURCE_NOT_FOUND = "source_not_found"
    SOURCE_FORBIDDEN = "source_forbidden"
    SOURCE_UNAVAILABLE = "source_unavailable"
    TOO_LARGE = "too_large"
    UNSUPPORTED_TYPE = "unsupported_type"
    DESTINATION_NOT_CONFIGURED = "destination_not_configured"
    DESTINATION_REJECTED = "destination_rejected"
    DESTINATION_UNAVAILABLE = "destination_unavailable"
    POISON_MESSAGE = "poison_message"
    INTERNAL_ERROR = "internal_error"
    # Of ingestion.failed events: the destination could not ingest the file, or not in time.
    INGESTION_FAILED = "ingestion_failed"
    INGESTION_TIMEOUT = "ingestion_timeout"


RETRYABLE_CODES = frozenset({ErrorCode.SOURCE_UNAVAILABLE, ErrorCode.DESTINATION_UNAVAILABLE})


class CourierError(Exception):
    """A failure with a contract error code; the message must hold no secret."""

    retryable: bool = False

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        http_status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.http_status = http_status
        self.retry_after = retry_after

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code.value!r}, {self.message!r})"


class PermanentError(CourierError):
    """Retrying cannot help: the request fails and is dead-lettered."""

    retryable = False


class RetryableError(CourierError):
    """A transient failure: retried in-process, then through the delay tiers."""

    retryable = True


def error_for(
    code: ErrorCode,
    message: str,
    *,
    http_status: int | None = None,
    retry_after: float | None = None,
) -> CourierError:
    """Build the right branch of :class:`CourierError` for ``code``."""
    cls = RetryableError if code in RETRYABLE_CODES else PermanentError
    return cls(code, message, http_status=http_status, retry_after=retry_after)
