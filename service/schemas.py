"""The JSON Schema side of the request and event models.

The models validate; these are the same rules written for JSON Schema, for the
published schemas only (``json_schema_extra``), so the schema gives Courier's
verdict wherever JSON Schema can say it: Courier rejects some of these with
``unsupported_source`` or ``unsupported_type`` rather than ``invalid_request``,
and a schema knows no error codes, only accept or reject. docs/producing.md
lists the rules a schema cannot express.
"""

from __future__ import annotations

from typing import Any

from pydantic.json_schema import GenerateJsonSchema, JsonSchemaMode
from pydantic_core import CoreSchema

DIALECT = "https://json-schema.org/draft/2020-12/schema"


def _anycase(word: str) -> str:
    """A regex for ``word`` in any case (JSON Schema's regex dialect has no flags)."""
    return "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else c for c in word)


_CONTROL = r"\x00-\x1f\x7f"
PRINTABLE = f"^[^{_CONTROL}]*$"
HTTP_URL = f"^{_anycase('http')}[sS]?://"
# s3://bucket/key[?versionId=v]: the bucket's characters, a key, no raw '#', one query.
S3_URL = r"^[sS]3://[A-Za-z0-9._-]{3,255}/[^?#]+(\?versionId=[^&=#]+)?$"
_INCONVO_EXTENSION = rf"\.({_anycase('csv')}|{_anycase('json')})"
# Ends .csv or .json (surrounding blanks are trimmed); no '..', '/', '\' or control character.
INCONVO_FILE_NAME = rf"^(?!.*\.\.)[^/\\{_CONTROL}]*{_INCONVO_EXTENSION}\s*$"
# What the last path segment of a URL tells Inconvo: no extension, or .csv / .json.
_SEGMENT_OK = rf"(\.*[^./?#]+\.*|\.+|[^/?#]*{_INCONVO_EXTENSION})"
INCONVO_URL_NAME = rf"^[^:/?#]+://[^/?#]*(/*|(/[^?#]*)?/{_SEGMENT_OK}/*)([?#].*)?$"

SOURCE_URL: dict[str, Any] = {
    "anyOf": [
        {"pattern": S3_URL},
        {"pattern": HTTP_URL, "maxLength": 2048},
    ],
    "examples": ["s3://reports/2024/sales_report_q4.csv", "https://files.example.com/q4.csv"],
}


def _has(field: str) -> dict[str, Any]:
    """``field`` is there, and not null (null counts as absent)."""
    return {"required": [field], "properties": {field: {"type": "string"}}}


def _lacks(field: str) -> dict[str, Any]:
    return {"not": _has(field)}


INCONVO_SCOPES: dict[str, Any] = {
    "oneOf": [
        {"allOf": [_has("userIdentifier"), _lacks("contextKey"), _lacks("contextValue")]},
        {"allOf": [_has("contextKey"), _has("contextValue"), _lacks("userIdentifier")]},
    ],
}


def mindset_delivery(source_only: frozenset[str]) -> dict[str, Any]:
    """The deliveries the API forbids for a type, as schema rules."""

    def forbid(mime_types: list[str], delivery: str) -> dict[str, Any]:
        return {
            "not": {
                "required": ["mimeType", "delivery"],
                "properties": {"mimeType": {"enum": mime_types}, "delivery": {"const": delivery}},
            }
        }

    return {
        "allOf": [
            forbid(["text/plain"], "sourceUrl"),
            forbid(sorted(source_only), "documentContent"),
        ]
    }


# Inconvo's file name is the destination's fileName, else the source's, else the URL's.
REQUEST_RULES: dict[str, Any] = {
    "allOf": [
        {
            "if": {
                "required": ["destination"],
                "properties": {"destination": {"properties": {"type": {"const": "inconvo"}}}},
            },
            "then": {
                "anyOf": [
                    {"properties": {"destination": _has("fileName")}},
                    {
                        "properties": {
                            "destination": _lacks("fileName"),
                            "source": {
                                "required": ["fileName"],
                                "properties": {
                                    "fileName": {"type": "string", "pattern": INCONVO_FILE_NAME}
                                },
                            },
                        }
                    },
                    {
                        "properties": {
                            "destination": _lacks("fileName"),
                            "source": {
                                "allOf": [_lacks("fileName")],
                                "properties": {"url": {"pattern": INCONVO_URL_NAME}},
                            },
                        }
                    },
                ]
            },
        }
    ]
}

METADATA: dict[str, Any] = {
    "propertyNames": {"minLength": 1, "maxLength": 200},
    "additionalProperties": {"type": "string", "maxLength": 2048},
    "examples": [{"tenant": "acme"}],
}

# CloudEvents extension attributes: lower-case letters and digits (the spec's naming rule).
EVENT_EXTENSIONS: dict[str, Any] = {"patternProperties": {"^[a-z0-9]{1,20}$": {}}}


_ENVELOPE = {
    "specversion": "CloudEvents version.",
    "id": "The event's id (also its AMQP message_id); a repeat of an event keeps it.",
    "source": "COURIER_EVENT_SOURCE: urn:courier:<hostname> by default.",
    "type": "courier. + the routing key.",
    "subject": "The request id.",
    "time": "When the event was built, RFC 3339 in UTC.",
    "datacontenttype": "Always JSON.",
    "data": "What happened to the request.",
}

# Descriptions of the properties whose fields carry none (the Mindset API's pass-through
# fields, the event's members), by the schema's definition name, "" for the root.
DESCRIPTIONS: dict[str, dict[str, str]] = {
    "UploadRequest": {
        "source": "Where the file comes from.",
        "destination": "Where it goes: `type` selects Inconvo or Mindset AI.",
    },
    "DeleteRequest": {
        "destination": "The file to delete: `type` selects Inconvo or Mindset AI.",
    },
    "MindsetDestination": {
        name: f"Passed to the Mindset API as it is ({rule})."
        for name, rule in {
            "zipType": "at most 20 characters",
            "autoPublish": "publish once ingested",
            "hideContentSegments": "true or false",
            "knownAs": "at most 200 characters",
            "externalUrl": "an http(s) link shown to people, at most 2048 characters",
            "thumbnailUrl": "an http(s) URL Mindset fetches, at most 2048 characters",
            "thumbnail": "at most 65,536 characters",
            "viewOriginalSource": "true or false",
            "contentHash": "at most 200 characters",
            "labels": "at most 10 non-empty strings",
            "runId": "at most 200 characters",
        }.items()
    },
    **dict.fromkeys(("ResultEvent", "IngestionEvent"), _ENVELOPE),
    "EventData": {
        "requestId": "The request id: the body's id, else the AMQP message_id, else one "
        "derived from the body.",
        "status": "The outcome.",
        "destination": "The destination's type; null when the body could not be read.",
        "delivery": "How the file was delivered; null when it never was.",
        "durationMs": "How long the last attempt took.",
        "source": "What was learnt about the source; null when the body could not be read.",
        "result": "The destination's answer, verbatim (only on success).",
        "error": "Why the request failed (only on failure).",
        "deduplicated": "True when Mindset already had the file under its externalId "
        "(and kept it).",
        "replaced": "True when an older file under the externalId was deleted for this one.",
        "replacedUid": "The uid of the file that was replaced.",
        "existed": "A delete: whether there was a file to delete.",
        "operation": "delete, on a delete's events (absent on an upload's).",
        "metadata": "The request's metadata, echoed ({} when none).",
    },
    "IngestionData": {
        "requestId": "The request id, as on the upload's event.",
        "status": "completed: the file is usable; failed: it is not going to be.",
        "destination": "The destination's type.",
        "result": "The file as the destination last showed it.",
        "error": "Why the ingestion failed (only on failure).",
        "metadata": "The request's metadata, echoed ({} when none).",
    },
    "SourceInfo": {
        "url": "The source URL without user-info or query (an s3 URL keeps versionId).",
        "bytes": "The file's size, when it was fetched or described.",
        "contentType": "The file's content type, when known.",
        "sha256": "The SHA-256 of the bytes, when Courier read them.",
    },
    "ErrorInfo": {
        "code": "The error code (docs/events.md lists each).",
        "message": "What went wrong, for people; never holds a secret.",
        "retryable": "Whether the failure was of the kind Courier retries.",
        "httpStatus": "The HTTP status that caused it, when one did.",
    },
}


def _describe(schema: dict[str, Any], descriptions: dict[str, str]) -> None:
    for name, prop in schema.get("properties", {}).items():
        if "description" not in prop and name in descriptions:
            prop["description"] = descriptions[name]


class CourierSchema(GenerateJsonSchema):
    """Pydantic's generator, with ``$schema``, described properties, and no property titles."""

    def generate(self, schema: CoreSchema, mode: JsonSchemaMode = "validation") -> Any:
        """The schema, naming its dialect first."""
        generated = super().generate(schema, mode)
        _describe(generated, DESCRIPTIONS.get(generated.get("title", ""), {}))
        for name, definition in generated.get("$defs", {}).items():
            _describe(definition, DESCRIPTIONS.get(name, {}))
        return {"$schema": DIALECT, **generated}

    def field_title_should_be_set(self, schema: Any) -> bool:
        """Never: a property's name says it ("Useridentifier" says nothing more)."""
        return False
