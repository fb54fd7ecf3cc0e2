"""Building the CloudEvents result event from an Outcome."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any, Literal

from service.outcome import Outcome

SUCCEEDED: Literal["courier.upload.succeeded"] = "courier.upload.succeeded"
FAILED: Literal["courier.upload.failed"] = "courier.upload.failed"
CONTENT_TYPE = "application/cloudevents+json"


Event = dict[str, Any]  # a result event as it goes on the wire (the ResultEvent model's JSON)


def build_event(
    *,
    event_source: str,
    request_id: str,
    attempts: int,
    metadata: dict[str, str],
    outcome: Outcome,
) -> Event:
    """The terminal event for a request whose last attempt ended in ``outcome``.

    Built as the wire's JSON object, not through the ResultEvent model: every
    value comes from a validated request or from Courier itself, and a test
    holds this to the model's own output. Building, validating and dumping a
    model for each event was a visible share of the happy path's CPU.
    Optional members are left out when unset, as ``ResultEvent.to_json_dict``
    leaves them out.
    """
    error, source = outcome.error, outcome.source
    data: Event = {
        "requestId": request_id,
        "status": "succeeded" if error is None else "failed",
        "destination": outcome.destination,
        "delivery": outcome.delivery,
        "attempts": attempts,
        "durationMs": outcome.duration_ms,
        "source": None
        if source is None
        else {
            "url": source.url,
            "bytes": source.bytes,
            "contentType": source.contentType,
            "sha256": source.sha256,
        },
    }
    if error is None:
        if outcome.result is not None:
            data["result"] = outcome.result
        if outcome.deduplicated:
            data["deduplicated"] = True
    else:
        info: Event = {
            "code": error.code.value,
            "message": error.message,
            "retryable": error.retryable,
        }
        if error.http_status is not None:
            info["httpStatus"] = error.http_status
        data["error"] = info
    data["metadata"] = metadata
    return {
        "specversion": "1.0",
        "id": str(uuid.uuid4()),
        "source": event_source,
        "type": SUCCEEDED if error is None else FAILED,
        "subject": request_id,
        "time": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "datacontenttype": "application/json",
        "data": data,
    }
