"""Building the CloudEvents result event from an Outcome."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Literal, cast

from service.contracts import ErrorInfo, EventData, ResultEvent
from service.pipeline import Outcome

SUCCEEDED = "courier.upload.succeeded"
FAILED = "courier.upload.failed"
CONTENT_TYPE = "application/cloudevents+json"


def routing_key(event: ResultEvent) -> str:
    """``upload.succeeded`` or ``upload.failed``."""
    return event.type.removeprefix("courier.")


def build_event(
    *,
    event_source: str,
    request_id: str,
    attempts: int,
    metadata: dict[str, str],
    outcome: Outcome,
) -> ResultEvent:
    """The terminal event for a request whose last attempt ended in ``outcome``."""
    error = outcome.error
    data = EventData(
        requestId=request_id,
        status="succeeded" if error is None else "failed",
        destination=cast(Literal["inconvo", "mindset"] | None, outcome.destination),
        delivery=outcome.delivery,
        attempts=attempts,
        durationMs=outcome.duration_ms,
        source=outcome.source,
        result=outcome.result if error is None else None,
        error=None
        if error is None
        else ErrorInfo(
            code=error.code.value,
            message=error.message,
            retryable=error.retryable,
            httpStatus=error.http_status,
        ),
        deduplicated=True if outcome.deduplicated and error is None else None,
        metadata=metadata,
    )
    return ResultEvent(
        id=str(uuid.uuid4()),
        source=event_source,
        type=SUCCEEDED if error is None else FAILED,
        subject=request_id,
        time=datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        data=data,
    )
