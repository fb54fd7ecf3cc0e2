"""A strict local fake of Mindset AI's context file API: ingest, read, list, delete."""

from __future__ import annotations

import asyncio
import binascii
import json
import uuid
from base64 import b64decode
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, get_args
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
# The statuses the list filters on: `accepted` is not one of them.
LIST_STATUSES = ("fail", "readyForPublication", "published")
LIST_PARAMS = frozenset({"runId", "status", "startAfter", "limit"})
MAX_PAGE_SIZE = 100

Fate = Literal["accepted", "readyForPublication", "published", "fail", "ingested", "gone"]
FATES: tuple[str, ...] = get_args(Fate)


@dataclass(frozen=True, slots=True)
class IngestionRule:
    """What becomes of a newly ingested file (which always starts ``accepted``), and when.

    ``fate``: ``"accepted"`` (the default) stays accepted forever;
    ``"readyForPublication"``, ``"published"`` or ``"fail"`` is the status it moves
    to; ``"ingested"`` moves to ``published`` if the ingest set ``autoPublish`` true,
    else to ``readyForPublication`` (what the real API does on success);
    ``"gone"``: the file disappears (reads 404, its externalId is free again).

    When: ``after_reads=k``: the first k status reads of the file still answer
    ``accepted``, the change happens right after the k-th (0: right after the
    ingest's answer); ``after_seconds``: that long after the ingest, on the event
    loop clock. With both, whichever comes first; with neither, as ``after_reads=0``.
    """

    fate: Fate = "accepted"
    after_reads: int | None = None
    after_seconds: float | None = None

    def __post_init__(self) -> None:
        if self.fate not in FATES:
            raise ValueError(f"fate must be one of {', '.join(FATES)}")
        if self.after_reads is not None and self.after_reads < 0:
            raise ValueError("after_reads must not be negative")
        if self.after_seconds is not None and self.after_seconds < 0:
            raise ValueError("after_seconds must not be negative")


# A rule for every file, or a function of the ingest body choosing one per file.
Ingestion = IngestionRule | Callable[[dict[str, Any]], IngestionRule]


@dataclass(frozen=True, slots=True)
class FileRead:
    """One status read: a lookup by uid or externalId, or a list page that held the file.

    ``uid`` and ``external_id`` are the file's, or what was asked for when nothing
    answered; ``status`` is what the read answered (None: a 404).
    """

    app_uid: str
    context_uid: str
    via: Literal["uid", "externalId", "list"]
    uid: str | None
    external_id: str | None
    status: str | None


@dataclass(frozen=True, slots=True)
class DeletedFile:
    """One successful ``DELETE .../files/uid/{uid}``; ``file`` is the object as it was."""

    app_uid: str
    context_uid: str
    uid: str
    external_id: str | None
    file: dict[str, Any]


@dataclass(eq=False, slots=True)
class _Life:
    """A live file and what its rule still has in store for it."""

    app_uid: str
    context_uid: str
    file: dict[str, Any]
    created: datetime
    target: str | None  # the status (or "gone") it will move to; None: none pending
    after_reads: int | None
    reads: int = 0
    timer: asyncio.TimerHandle | None = None

    @property
    def external_id(self) -> str | None:
        value = self.file.get("externalId")
        return value if isinstance(value, str) else None


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
    thumbnails, and unique ``externalId`` per (app, context) among live files (409).
    Never fetches URLs.

    Routes, under ``.../files``: ``POST`` ingests (the file object, ``accepted``);
    ``GET /uid/{uid}`` and ``GET /externalId/{externalId}`` answer the file object
    or 404; ``GET`` lists the context's files oldest first, a JSON array, with query
    parameters ``runId``, ``status`` (``fail``, ``readyForPublication`` or
    ``published``), ``startAfter`` (a ``createdAt``: files created after it) and
    ``limit`` (page size, 1-100, default ``page_size``; the fake's name, the real
    one is not documented); any other parameter, or one given twice, is a 400; an
    empty page is ``[]`` with HTTP 404. ``DELETE /uid/{uid}`` answers
    ``delete_status``: 200 with ``{"uid": uid, "deleted": true}`` (default) or 204
    without a body; 404 when no such file. A deleted file's externalId is free again.
    ``createdAt`` has milliseconds and grows strictly, so paging never skips a file.

    What happens to each file: ``ingestion``, an :class:`IngestionRule` or a function
    of the ingest body returning one, read at ingest time; the default keeps every
    file ``accepted`` forever. :meth:`set_status` overrides it for one file.

    Attributes: ``ingests`` (accepted ingests), ``requests`` (all requests), ``files``
    (the live file objects, oldest first), ``reads`` (:class:`FileRead`, see
    :meth:`reads_of`), ``deletes`` (:class:`DeletedFile`), ``page_size``,
    ``delete_status``, ``delay``/``delay_after``, ``fail_next()``, ``fail_when()``.
    """

    def __init__(self, api_key: str = "test-mindset-key") -> None:
        super().__init__()
        self.api_key = api_key
        self.ingestion: Ingestion = IngestionRule()
        self.page_size = 20
        self.delete_status: Literal[200, 204] = 200
        self.ingests: list[ReceivedIngest] = []
        self.files: list[dict[str, Any]] = []
        self.reads: list[FileRead] = []
        self.deletes: list[DeletedFile] = []
        self._lives: dict[str, _Life] = {}
        self._by_external_id: dict[tuple[str, str, str], _Life] = {}
        self._last_created = datetime.min.replace(tzinfo=UTC)

    def _routes(self) -> list[web.RouteDef]:
        files = "/api/v1/appuid/{appUid}/contexts/{contextUid}/files"
        return [
            web.post(files, self._ingest),
            web.get(files, self._list),
            web.get(files + "/externalId/{externalId}", self._by_external),
            web.get(files + "/uid/{uid}", self._by_uid),
            web.delete(files + "/uid/{uid}", self._delete),
        ]

    async def close(self) -> None:
        """Stop serving and cancel pending timed transitions (idempotent)."""
        for life in self._lives.values():
            self._cancel_timer(life)
        await super().close()

    # -- for tests -----------------------------------------------------------------------

    def file(self, uid: str) -> dict[str, Any] | None:
        """The live file object with this uid, or None (never ingested, deleted or gone)."""
        life = self._lives.get(uid)
        return None if life is None else life.file

    def set_status(self, uid: str, status: str) -> None:
        """Set a live file's status now; whatever its rule still had pending is cancelled."""
        life = self._lives.get(uid)
        if life is None:
            raise KeyError(uid)
        self._cancel_timer(life)
        life.target = None
        life.file["status"] = status

    def reads_of(self, *, uid: str | None = None, external_id: str | None = None) -> int:
        """How many status reads were about this uid, or this externalId (give one)."""
        if (uid is None) == (external_id is None):
            raise TypeError("give exactly one of uid and external_id")
        if uid is not None:
            return sum(1 for read in self.reads if read.uid == uid)
        return sum(1 for read in self.reads if read.external_id == external_id)

    # -- life of a file ------------------------------------------------------------------

    def _rule_for(self, body: dict[str, Any]) -> IngestionRule:
        rule = self.ingestion
        if not isinstance(rule, IngestionRule):
            rule = rule(dict(body))
            if not isinstance(rule, IngestionRule):
                raise TypeError(f"ingestion returned {rule!r}, not an IngestionRule")
        return rule

    def _begin(self, life: _Life, rule: IngestionRule) -> None:
        """Arm the rule's transition, once the ingest has been answered."""
        if life.target is None:
            return
        if rule.after_reads == 0 or (rule.after_reads is None and rule.after_seconds is None):
            self._settle(life)
        elif rule.after_seconds is not None:
            life.timer = asyncio.get_running_loop().call_later(
                rule.after_seconds, self._settle, life
            )

    def _settle(self, life: _Life) -> None:
        """Apply the pending transition: a final status, or the file disappears."""
        self._cancel_timer(life)
        target, life.target = life.target, None
        if target == "gone":
            self._forget(life)
        elif target is not None:
            life.file["status"] = target

    def _cancel_timer(self, life: _Life) -> None:
        if life.timer is not None:
            life.timer.cancel()
            life.timer = None

    def _forget(self, life: _Life) -> None:
        self._cancel_timer(life)
        life.target = None
        del self._lives[life.file["uid"]]
        self.files.remove(life.file)
        external_id = life.external_id
        if external_id is not None:
            self._by_external_id.pop((life.app_uid, life.context_uid, external_id), None)

    def _read(self, life: _Life, via: Literal["uid", "externalId", "list"]) -> dict[str, Any]:
        """A status read of a live file: its object now; the rule may move it afterwards."""
        snapshot = dict(life.file)
        life.reads += 1
        self.reads.append(
            FileRead(
                life.app_uid,
                life.context_uid,
                via,
                life.file["uid"],
                life.external_id,
                snapshot["status"],
            )
        )
        due = life.after_reads is not None and life.reads >= life.after_reads
        if life.target is not None and due:
            self._settle(life)
        return snapshot

    def _created_at(self) -> datetime:
        # Strictly growing, so that paging by createdAt never skips or repeats a file.
        now = datetime.now(UTC)
        now = now.replace(microsecond=now.microsecond // 1000 * 1000)
        now = max(now, self._last_created + timedelta(milliseconds=1))
        self._last_created = now
        return now

    # -- handlers ------------------------------------------------------------------------

    def _authorised(self, request: web.Request) -> bool:
        return request.headers.get("x-api-key") == self.api_key

    def _live(self, request: web.Request, uid: str) -> _Life | None:
        life = self._lives.get(uid)
        info = request.match_info
        if life is None or (life.app_uid, life.context_uid) != (
            info["appUid"],
            info["contextUid"],
        ):
            return None
        return life

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
        rule = self._rule_for(body)
        created = self._created_at()
        file: dict[str, Any] = {
            "uid": uuid.uuid4().hex,
            "createdAt": created.strftime("%Y-%m-%dT%H:%M:%S.")
            + f"{created.microsecond // 1000:03d}Z",
            "name": body["name"],
            "status": "accepted",
            "mimeType": body["mimeType"],
            "autoPublish": body.get("autoPublish", False),
            "hideContentSegments": body.get("hideContentSegments", False),
            "labels": list(body.get("labels", [])),
            "viewOriginalSource": body.get("viewOriginalSource", False),
            "thumbnailUpdatedByAdmin": False,
        }
        file.update({name: body[name] for name in _ECHOED if name in body})
        target: str | None = rule.fate
        if target == "accepted":
            target = None
        elif target == "ingested":
            target = "published" if file["autoPublish"] else "readyForPublication"
        life = _Life(app_uid, context_uid, file, created, target, rule.after_reads)
        self.files.append(file)
        self._lives[file["uid"]] = life
        if key is not None:
            self._by_external_id[key] = life
        self.ingests.append(
            ReceivedIngest(app_uid, context_uid, body, CIMultiDict(request.headers))
        )
        response = json_response(file)  # encoded now: what follows does not change it
        self._begin(life, rule)
        return response

    async def _by_external(self, request: web.Request) -> web.Response:
        if not self._authorised(request):
            return self.error(401, "Unauthorized")
        info = request.match_info
        external_id = info["externalId"]
        life = self._by_external_id.get((info["appUid"], info["contextUid"], external_id))
        if life is None:
            self._record_miss(request, "externalId", None, external_id)
            return self.error(404, "File not found")
        return json_response(self._read(life, "externalId"))

    async def _by_uid(self, request: web.Request) -> web.Response:
        if not self._authorised(request):
            return self.error(401, "Unauthorized")
        uid = request.match_info["uid"]
        life = self._live(request, uid)
        if life is None:
            self._record_miss(request, "uid", uid, None)
            return self.error(404, "File not found")
        return json_response(self._read(life, "uid"))

    def _record_miss(
        self,
        request: web.Request,
        via: Literal["uid", "externalId"],
        uid: str | None,
        external_id: str | None,
    ) -> None:
        info = request.match_info
        self.reads.append(FileRead(info["appUid"], info["contextUid"], via, uid, external_id, None))

    async def _list(self, request: web.Request) -> web.Response:
        if not self._authorised(request):
            return self.error(401, "Unauthorized")
        query = request.query
        unknown = sorted(set(query) - LIST_PARAMS)
        if unknown:
            return self.error(400, f"Unknown query parameter(s): {', '.join(unknown)}")
        repeated = sorted(name for name in set(query) if len(query.getall(name)) > 1)
        if repeated:
            return self.error(
                400, f"Query parameter(s) given more than once: {', '.join(repeated)}"
            )
        status = query.get("status")
        if status is not None and status not in LIST_STATUSES:
            return self.error(400, f"status must be one of: {', '.join(LIST_STATUSES)}")
        after: datetime | None = None
        if "startAfter" in query:
            try:
                after = datetime.fromisoformat(query["startAfter"])
            except ValueError:
                return self.error(400, "startAfter must be an ISO 8601 date-time")
            if after.tzinfo is None:
                after = after.replace(tzinfo=UTC)
        limit = self.page_size
        if "limit" in query:
            text = query["limit"]
            if not text.isdigit() or not 1 <= int(text) <= MAX_PAGE_SIZE:
                return self.error(400, f"limit must be an integer from 1 to {MAX_PAGE_SIZE}")
            limit = int(text)
        run_id = query.get("runId")
        app_uid, context_uid = request.match_info["appUid"], request.match_info["contextUid"]
        page: list[_Life] = []
        for life in list(self._lives.values()):
            if (life.app_uid, life.context_uid) != (app_uid, context_uid):
                continue
            if after is not None and life.created <= after:
                continue
            if run_id is not None and life.file.get("runId") != run_id:
                continue
            if status is not None and life.file["status"] != status:
                continue
            page.append(life)
            if len(page) == limit:
                break
        if not page:
            return json_response([], status=404)  # the pages have run out: not an error
        return json_response([self._read(life, "list") for life in page])

    async def _delete(self, request: web.Request) -> web.Response:
        if not self._authorised(request):
            return self.error(401, "Unauthorized")
        uid = request.match_info["uid"]
        life = self._live(request, uid)
        if life is None:
            return self.error(404, "File not found")
        self._forget(life)
        self.deletes.append(
            DeletedFile(life.app_uid, life.context_uid, uid, life.external_id, life.file)
        )
        if self.delete_status == 204:
            return web.Response(status=204)
        return json_response({"uid": uid, "deleted": True})
