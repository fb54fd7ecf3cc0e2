"""What producers send and event consumers receive: the request and event models.

The JSON Schemas printed by ``courier schema`` and checked in under ``schemas/``
are generated from these models (:func:`json_schemas`).
"""

from __future__ import annotations

from typing import Any

from pydantic import TypeAdapter

from service import schemas
from service.contracts.event import (
    ErrorInfo,
    EventData,
    IngestionData,
    IngestionEvent,
    ResultEvent,
    SourceInfo,
)
from service.contracts.request import (
    DEFAULT_TENANT,
    DESTINATIONS,
    INCONVO_EXTENSIONS,
    MINDSET_MAX_HASH,
    MINDSET_MAX_NAME,
    MINDSET_MAX_URL,
    MINDSET_MIME_TYPES,
    REQUEST,
    DeleteRequest,
    DeliveryMode,
    DestinationName,
    InconvoDelete,
    InconvoDestination,
    MindsetDelete,
    MindsetDestination,
    Request,
    SourceSpec,
    UploadRequest,
    api_cut,
    api_length,
    check_mindset_delivery,
    check_upload_file_name,
)


def json_schemas() -> dict[str, Any]:
    """The JSON Schemas of the request and the event."""
    generator = schemas.CourierSchema
    request = REQUEST.json_schema(schema_generator=generator)
    events = TypeAdapter(ResultEvent | IngestionEvent).json_schema(schema_generator=generator)
    return {
        "request": {**request, "title": "Courier request", "$id": "urn:courier:schema:request"},
        "event": {**events, "title": "Courier event", "$id": "urn:courier:schema:event"},
    }


__all__ = [
    "DEFAULT_TENANT",
    "DESTINATIONS",
    "INCONVO_EXTENSIONS",
    "MINDSET_MAX_HASH",
    "MINDSET_MAX_NAME",
    "MINDSET_MAX_URL",
    "MINDSET_MIME_TYPES",
    "REQUEST",
    "DeleteRequest",
    "DeliveryMode",
    "DestinationName",
    "ErrorInfo",
    "EventData",
    "InconvoDelete",
    "InconvoDestination",
    "IngestionData",
    "IngestionEvent",
    "MindsetDelete",
    "MindsetDestination",
    "Request",
    "ResultEvent",
    "SourceInfo",
    "SourceSpec",
    "UploadRequest",
    "api_cut",
    "api_length",
    "check_mindset_delivery",
    "check_upload_file_name",
    "json_schemas",
]
