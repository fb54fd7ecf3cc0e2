"""Building the CloudEvents events: a request's terminal event, and a file's ingestion event."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from service.outcome import Ingestion, Outcome

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
        **({"operation": "delete"} if outcome.operation == "delete" else {}),
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
        if outcome.replaced_uid is not None:
            data["replaced"] = True
            data["replacedUid"] = outcome.replaced_uid
        if outcome.existed is not None:
            data["existed"] = outcome.existed
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
    return _envelope(event_source, event_type(outcome), request_id, data)


def event_type(outcome: Outcome) -> str:
    """``courier.upload.succeeded``, ``courier.delete.failed``, ...: the terminal event's type."""
    return f"courier.{outcome.operation}.{'failed' if outcome.error else 'succeeded'}"


def build_ingestion_event(
    *, event_source: str, request_id: str, metadata: dict[str, str], ingestion: Ingestion
) -> Event:
    """The event of a followed file's final state (``courier.ingestion.completed|failed``).

    Built as the wire's JSON object, as :func:`build_event` is, and held by a test to the
    IngestionEvent model's own output.
    """
    file, error = ingestion.file, ingestion.error
    data: Event = {
        "requestId": request_id,
        "status": "completed" if error is None else "failed",
        "destination": ingestion.destination,
        "fileStatus": file.status if file is not None else None,
        "result": file.result if file is not None else None,
        "waitedMs": ingestion.waited_ms,
        "checks": ingestion.checks,
    }
    if error is not None:
        info: Event = {"code": error.code.value, "message": error.message, "retryable": False}
        if error.http_status is not None:
            info["httpStatus"] = error.http_status
        data["error"] = info
    data["metadata"] = metadata
    return _envelope(
        event_source,
        "courier.ingestion." + ("completed" if error is None else "failed"),
        request_id,
        data,
    )


def _envelope(event_source: str, event_type: str, request_id: str, data: Event) -> Event:
    return {
        "specversion": "1.0",
        "id": str(uuid.uuid4()),
        "source": event_source,
        "type": event_type,
        "subject": request_id,
        "time": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "datacontenttype": "application/json",
        "data": data,
    }
