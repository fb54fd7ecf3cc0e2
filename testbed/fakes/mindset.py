"""A strict local fake of Mindset AI's context file ingestion API (JSON bodies)."""

from __future__ import annotations

import binascii
import json
import uuid
from base64 import b64decode
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web
from multidict import CIMultiDict

from testbed.fakes._server import FakeServer, drain, json_response, media_type

MIME_TYPES = frozenset(
    {
        "video/mp4",
        "audio/mpeg",
        "application/pdf",
        "application/vnd.openxmlformats-officedocument.presentationml.presentation",
        "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
        "text/html",
        "text/plain",
        "application/zip",
    }
)
# Types whose content must come from sourceUrl, and the one that needs documentContent.
SOURCE_URL_ONLY = frozenset(
    {
        "video/mp4",
        "audio/mpeg",
        "application/vnd.openxmlformats-officedocument.presentationml.presentation",
        "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
        "application/zip",
    }
)
DOCUMENT_CONTENT_ONLY = frozenset({"text/plain"})
# Optional string fields and their maximum lengths (None: no documented limit).
STRING_LIMITS: dict[str, int | None] = {
    "externalId": None,
    "zipType": 20,
    "sourceUrl": 2048,
    "documentContent": 65536,
    "knownAs": 200,
    "externalUrl": 2048,
    "thumbnailUrl": 2048,
    "thumbnail": 65536,
    "contentHash": 200,
    "runId": 200,
}
BOOLEAN_FIELDS = frozenset({"autoPublish", "hideContentSegments", "viewOriginalSource"})
URL_FIELDS = ("sourceUrl", "externalUrl", "thumbnailUrl")
MAX_NAME = 100
MAX_LABELS = 10
FIELDS = frozenset({"name", "mimeType", "labels", *STRING_LIMITS, *BOOLEAN_FIELDS})
# Optional fields echoed in the file object when given.
_ECHOED = ("externalId", "runId", "contentHash", "knownAs", "externalUrl")


@dataclass(frozen=True, slots=True)
class ReceivedIngest:
    """One accepted ingest request."""

    app_uid: str
    context_uid: str
    body: dict[str, Any]
    headers: CIMultiDict[str]


class _Invalid(Exception):
    pass


def js_length(text: str) -> int:
    """A string's length as JavaScript counts it (UTF-16 code units)."""
    return len(text.encode("utf-16-le", "surrogatepass")) // 2


def _is_base64(text: str) -> bool:
    try:
        b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return False
    return True


def validate_ingest(body: object) -> None:
    """Raise ``_Invalid`` with the reason if Mindset would refuse this ingest body."""
    if not isinstance(body, dict):
        raise _Invalid("Body must be a JSON object")
    unknown = sorted(set(body) - FIELDS)
    if unknown:
        raise _Invalid(f"Unknown field(s): {', '.join(unknown)}")
    name = body.get("name")
    if not isinstance(name, str):
        raise _Invalid("name is required and must be a string")
    if not 1 <= js_length(name) <= MAX_NAME:
        raise _Invalid(f"name must be 1-{MAX_NAME} characters")
    mime_type = body.get("mimeType")
    if not isinstance(mime_type, str):
        raise _Invalid("mimeType is required and must be a string")
    if mime_type not in MIME_TYPES:
        raise _Invalid(f"mimeType must be one of: {', '.join(sorted(MIME_TYPES))}")
    for field, limit in STRING_LIMITS.items():
        if field not in body:
            continue
        value = body[field]
        if not isinstance(value, str):
            raise _Invalid(f"{field} must be a string")
        if limit is not None and js_length(value) > limit:
            raise _Invalid(f"{field} must be at most {limit} characters")
    for field in BOOLEAN_FIELDS:
        if field in body and not isinstance(body[field], bool):
            raise _Invalid(f"{field} must be a boolean")
    if "labels" in body:
        labels = body["labels"]
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise _Invalid("labels must be an array of strings")
        if len(labels) > MAX_LABELS:
            raise _Invalid(f"labels must have at most {MAX_LABELS} items")
    for field in URL_FIELDS:
        if field in body:
            parts = urlsplit(body[field])
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise _Invalid(f"{field} must be an absolute http(s) URL")
    has_url, has_content = "sourceUrl" in body, "documentContent" in body
    if has_url and has_content:
        raise _Invalid("Provide either sourceUrl or documentContent, not both")
    if not has_url and not has_content:
        raise _Invalid("One of sourceUrl or documentContent is required")
    if has_content and body["documentContent"] == "":
        raise _Invalid("documentContent must not be empty")
    if mime_type in DOCUMENT_CONTENT_ONLY and not has_content:
        raise _Invalid(f"{mime_type} must be sent as documentContent")
    if mime_type in SOURCE_URL_ONLY and not has_url:
        raise _Invalid(f"{mime_type} must be sent as sourceUrl")
    if mime_type == "application/pdf" and has_content and not _is_base64(body["documentContent"]):
        raise _Invalid("documentContent of a PDF must be base64")
    if "thumbnail" in body and not _is_base64(body["thumbnail"]):
        raise _Invalid("thumbnail must be base64")


class FakeMindset(FakeServer):
    """Mindset's ``/api/v1/appuid/{appUid}/contexts/{contextUid}/files`` routes.

    ``start()`` returns the API root (``http://127.0.0.1:PORT``). Enforces the
    ``x-api-key`` header, a JSON object body with only the documented fields, their
    types and lengths (counted in UTF-16 units, as JavaScript does), which of
    ``sourceUrl``/``documentContent`` each MIME type takes, base64 for PDF content and
    thumbnails, and unique ``externalId`` per (app, context) (409). Never fetches URLs.

    Attributes: ``ingests`` (accepted ingests), ``requests`` (all requests), ``files``
    (the stored file objects; change ``status`` with :meth:`set_status`),
    ``delay``/``delay_after``, ``fail_next()``.
    """

    def __init__(self, api_key: str = "test-mindset-key") -> None:
        super().__init__()
        self.api_key = api_key
        self.ingests: list[ReceivedIngest] = []
        self.files: list[dict[str, Any]] = []
        self._by_external_id: dict[tuple[str, str, str], dict[str, Any]] = {}

    def _routes(self) -> list[web.RouteDef]:
        files = "/api/v1/appuid/{appUid}/contexts/{contextUid}/files"
        return [
            web.post(files, self._ingest),
            web.get(files + "/externalId/{externalId}", self._by_external),
        ]

    def set_status(self, uid: str, status: str) -> None:
        """Set a stored file's status (``readyForPublication``, ``published``, ``fail``)."""
        for file in self.files:
            if file["uid"] == uid:
                file["status"] = status
                return
        raise KeyError(uid)

    def _authorised(self, request: web.Request) -> bool:
        return request.headers.get("x-api-key") == self.api_key

    async def _ingest(self, request: web.Request) -> web.Response:
        if not self._authorised(request):
            await drain(request)
            return self.error(401, "Unauthorized")
        if media_type(request) != "application/json":
            await drain(request)
            return self.error(400, "Content-Type must be application/json")
        try:
            body = json.loads(await request.text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return self.error(400, "Body is not valid JSON")
        try:
            validate_ingest(body)
        except _Invalid as exc:
            return self.error(400, str(exc))
        app_uid, context_uid = request.match_info["appUid"], request.match_info["contextUid"]
        external_id = body.get("externalId")
        key = (app_uid, context_uid, external_id) if external_id is not None else None
        if key is not None and key in self._by_external_id:
            return self.error(409, "externalId already exists")
        file: dict[str, Any] = {
            "uid": uuid.uuid4().hex,
            "createdAt": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "name": body["name"],
            "status": "accepted",
            "mimeType": body["mimeType"],
            "autoPublish": body.get("autoPublish", False),
            "hideContentSegments": body.get("hideContentSegments", False),
            "labels": list(body.get("labels", [])),
            "viewOriginalSource": body.get("viewOriginalSource", False),
            "thumbnailUpdatedByAdmin": False,
        }
        file.update({field: body[field] for field in _ECHOED if field in body})
        self.files.append(file)
        if key is not None:
            self._by_external_id[key] = file
        self.ingests.append(
            ReceivedIngest(app_uid, context_uid, body, CIMultiDict(request.headers))
        )
        return json_response(file)

    async def _by_external(self, request: web.Request) -> web.Response:
        if not self._authorised(request):
            return self.error(401, "Unauthorized")
        info = request.match_info
        file = self._by_external_id.get((info["appUid"], info["contextUid"], info["externalId"]))
        if file is None:
            return self.error(404, "File not found")
        return json_response(file)
