"""The events Courier publishes, as event consumers read them (CloudEvents 1.0)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from service import schemas
from service.contracts.request import DeliveryMode, DestinationName
from service.errors import ErrorCode


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SourceInfo(_Out):
    """What was learnt about the source; ``url`` is redacted."""

    url: str
    bytes: int | None = None
    contentType: str | None = None
    sha256: str | None = None


class ErrorInfo(_Out):
    """Why a request failed."""

    code: ErrorCode
    message: str
    retryable: bool
    httpStatus: int | None = None


class EventData(_Out):
    """The ``data`` of an upload's or a delete's result event."""

    requestId: str
    status: Literal["succeeded", "failed"]
    operation: Literal["delete"] | None = None  # present on deletes only
    destination: DestinationName | None
    delivery: DeliveryMode | None
    attempts: int = Field(
        ge=0,
        description="Real tries of the pipeline: 1 for a first-try success, plus one per "
        "delayed retry; 0 for a request held (destination unavailable) until COURIER_HOLD_MAX.",
    )
    durationMs: float = Field(ge=0)
    source: SourceInfo | None
    result: Any = None
    error: ErrorInfo | None = None
    deduplicated: bool | None = None
    replaced: bool | None = None
    replacedUid: str | None = None
    existed: bool | None = None  # deletes: whether there was a file to delete
    metadata: dict[str, str]


class IngestionData(_Out):
    """The ``data`` of an ingestion event: the file's final state at the destination."""

    requestId: str
    status: Literal["completed", "failed"]
    destination: DestinationName
    fileStatus: str | None = Field(
        description="The destination's last status of the file (stored, for Inconvo)"
    )
    result: Any = None
    waitedMs: float = Field(ge=0, description="From the upload's success to this event")
    checks: int = Field(ge=0, description="Status reads made")
    error: ErrorInfo | None = None
    metadata: dict[str, str]


class ResultEvent(_Out):
    """A CloudEvents 1.0 structured-mode result event of an upload or a delete."""

    model_config = ConfigDict(json_schema_extra=schemas.EVENT_EXTENSIONS)

    specversion: Literal["1.0"] = "1.0"
    id: str
    source: str
    type: Literal[
        "courier.upload.succeeded",
        "courier.upload.failed",
        "courier.delete.succeeded",
        "courier.delete.failed",
    ]
    subject: str
    time: str
    datacontenttype: Literal["application/json"] = "application/json"
    data: EventData

    def to_json_dict(self) -> dict[str, Any]:
        """The event as it goes on the wire: optional members left out when unset."""
        return _wire(self, ("result", "error", "deduplicated", "replaced", "replacedUid"))


class IngestionEvent(_Out):
    """A CloudEvents 1.0 structured-mode event of a file's final state at the destination."""

    model_config = ConfigDict(json_schema_extra=schemas.EVENT_EXTENSIONS)

    specversion: Literal["1.0"] = "1.0"
    id: str
    source: str
    type: Literal["courier.ingestion.completed", "courier.ingestion.failed"]
    subject: str
    time: str
    datacontenttype: Literal["application/json"] = "application/json"
    data: IngestionData

    def to_json_dict(self) -> dict[str, Any]:
        """The event as it goes on the wire: optional members left out when unset."""
        return _wire(self, ("error",))


def _wire(event: BaseModel, optional: tuple[str, ...]) -> dict[str, Any]:
    body = event.model_dump(mode="json")
    data = body["data"]
    for key in (*optional, "operation", "existed"):
        if data.get(key) is None:
            data.pop(key, None)
    if "error" in data and data["error"].get("httpStatus") is None:
        data["error"].pop("httpStatus")
    return body
