"""Mindset AI context files: JSON ingest by ``sourceUrl`` or ``documentContent``."""

from __future__ import annotations

import base64
from typing import Any

import aiohttp
from pydantic import SecretStr

from service.contracts import (
    MINDSET_MAX_NAME,
    MINDSET_MAX_URL,
    MINDSET_MIME_TYPES,
    DeleteRequest,
    DeliveryMode,
    MindsetDelete,
    MindsetDestination,
    SourceInfo,
    UploadRequest,
    api_cut,
    api_length,
    check_mindset_delivery,
)
from service.destinations.base import Removed, Uploaded
from service.destinations.mindset_files import GONE, Context, MindsetFiles, platform_file
from service.errors import ErrorCode, PermanentError, RetryableError
from service.outcome import PlatformFile
from service.sources.base import (
    SizeLimit,
    Source,
    SourceFacts,
    media_type,
    name_from_url,
    pick_name,
)
from service.sources.guard import (
    AddressPolicy,
    Resolve,
    check_fetched_by_destination,
    system_resolve,
)

MAX_CONTENT = 65536  # characters, as the API counts them (UTF-16 code units)
_TEXT = frozenset({"text/plain", "text/html"})
# What a UTF-8 text of MAX_CONTENT characters can take at most, and the bytes whose
# base64 fits in MAX_CONTENT characters: larger files are refused while streaming.
TEXT_LIMIT = SizeLimit(MAX_CONTENT * 4, "Mindset documentContent")
PDF_LIMIT = SizeLimit(MAX_CONTENT // 4 * 3, "Mindset documentContent")
_EXTENSIONS = {
    ".mp4": "video/mp4",
    ".mp3": "audio/mpeg",
    ".pdf": "application/pdf",
    ".pptx": "application/vnd.openxmlformats-officedocument.presentationml.presentation",
    ".docx": "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
    ".html": "text/html",
    ".htm": "text/html",
    ".txt": "text/plain",
    ".md": "text/plain",
    ".zip": "application/zip",
}
_ALIASES = {
    "text/markdown": "text/plain",
    "audio/mp3": "audio/mpeg",
    "application/x-zip-compressed": "application/zip",
    "application/x-pdf": "application/pdf",
}
_PASS_THROUGH = (
    "zipType",
    "autoPublish",
    "hideContentSegments",
    "knownAs",
    "externalUrl",
    "thumbnailUrl",
    "thumbnail",
    "viewOriginalSource",
    "labels",
    "runId",
)


def infer_mime_type(content_type: str | None, file_name: str) -> str | None:
    """One of the API's eight types from the content type, then the extension."""
    kind = media_type(content_type)
    kind = _ALIASES.get(kind or "", kind)
    if kind in MINDSET_MIME_TYPES:
        return kind
    dot = file_name.rfind(".")
    return _EXTENSIONS.get(file_name[dot:].lower()) if dot >= 0 else None


def _unsupported(name: str, content_type: str | None) -> PermanentError:
    hint = f" ({content_type})" if content_type else ""
    return PermanentError(
        ErrorCode.UNSUPPORTED_TYPE,
        f"no Mindset mimeType fits {name!r}{hint}; set destination.mimeType",
    )


def precheck(request: UploadRequest) -> None:
    """Fail early (no I/O) when neither the request nor the file name gives a usable type.

    Only when no source can add facts without fetching (an http ``sourceUrl``).
    """
    destination = request.destination
    assert isinstance(destination, MindsetDestination)  # noqa: S101 - routed by type
    if destination.mimeType is not None or not request.source.url.lower().startswith("http"):
        return
    if destination.delivery == "documentContent":
        return  # the response's Content-Type may still tell
    name = pick_name(request.source, None, name_from_url(request.source.url))
    if infer_mime_type(request.source.contentType, name) is None:
        raise _unsupported(name, request.source.contentType)


class Mindset:
    """The Mindset AI adapter; one instance per process, sharing one HTTP session."""

    name = "mindset"

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        base_url: str,
        api_key: SecretStr | None,
        timeout: float = 60.0,
        policy: AddressPolicy | None = None,
        resolve: Resolve = system_resolve,
    ) -> None:
        """``policy`` is the source address policy: the ``sourceUrl`` of an http source
        keeps it, a ``thumbnailUrl`` only its refusal of non-public addresses; without
        one, the default policy (public addresses only) applies."""
        self._files = MindsetFiles(session, base_url, api_key, timeout)
        self._api_key = api_key
        self._policy = policy or AddressPolicy()
        self._resolve = resolve

    def configured(self) -> bool:
        """Whether an API key is set."""
        return self._api_key is not None

    def precheck(self, request: UploadRequest) -> None:
        """Fail early when neither the request nor the file name gives a usable type."""
        precheck(request)

    @staticmethod
    def _destination(request: UploadRequest) -> MindsetDestination:
        destination = request.destination
        assert isinstance(destination, MindsetDestination)  # noqa: S101 - routed by type
        return destination

    async def deliver(self, request: UploadRequest, source: Source, request_id: str) -> Uploaded:
        """Pick the delivery mode, build the body and ingest it under the request's
        ``externalId`` (``courier:<request id>`` when it names none)."""
        destination = self._destination(request)
        if destination.thumbnailUrl is not None:
            await check_fetched_by_destination(
                destination.thumbnailUrl, self._policy, self._resolve
            )
        return await self._upload(request, destination, source, request_id)

    async def _upload(
        self, request: UploadRequest, destination: MindsetDestination, source: Source, rid: str
    ) -> Uploaded:
        mime: str | None = destination.mimeType
        delivery = destination.delivery
        if delivery == "auto" and mime is None:
            facts = await source.describe(request.source)
            mime = infer_mime_type(facts.content_type, facts.file_name)
            if mime is None:
                raise _unsupported(facts.file_name, facts.content_type)
            if mime != "text/plain":
                return await self._by_url(destination, mime, facts, rid)
        if delivery == "documentContent" or (delivery == "auto" and mime == "text/plain"):
            return await self._inline(request, destination, source, mime, rid)
        facts = await source.describe(request.source)
        mime = mime or infer_mime_type(facts.content_type, facts.file_name)
        if mime is None:
            raise _unsupported(facts.file_name, facts.content_type)
        return await self._by_url(destination, mime, facts, rid)

    async def _by_url(
        self, destination: MindsetDestination, mime: str, facts: SourceFacts, rid: str
    ) -> Uploaded:
        _check_delivery(mime, "sourceUrl")
        length = api_length(facts.fetch_url)
        if length > MINDSET_MAX_URL:
            # Not invalid_request: the request keeps the contract; Mindset would refuse
            # the URL Courier made of it, and asking again makes the same URL.
            presigned = facts.url.lower().startswith("s3:")
            why = (
                " (a presigned S3 URL: the key, and the session token of temporary AWS"
                " credentials, make it long)"
                if presigned
                else ""
            )
            raise PermanentError(
                ErrorCode.DESTINATION_REJECTED,
                f"the sourceUrl would be {length} characters, "
                f"over Mindset's {MINDSET_MAX_URL}{why}",
            )
        body = self._body(destination, facts.file_name, mime, sourceUrl=facts.fetch_url)
        info = SourceInfo(url=facts.url, bytes=facts.size, contentType=facts.content_type)
        return await self._ingest(destination, body, rid, facts.content_tag, "sourceUrl", info)

    async def _inline(
        self,
        request: UploadRequest,
        destination: MindsetDestination,
        source: Source,
        mime: str | None,
        rid: str,
    ) -> Uploaded:
        limit = PDF_LIMIT if mime == "application/pdf" else TEXT_LIMIT
        async with await source.fetch(request.source, limit) as fetched:
            mime = mime or infer_mime_type(fetched.content_type, fetched.file_name)
            if mime is None:
                raise _unsupported(fetched.file_name, fetched.content_type)
            _check_delivery(mime, "documentContent")
            content = _document_content(fetched.file_name, await fetched.read(), mime)
        body = self._body(destination, fetched.file_name, mime, documentContent=content)
        ours = f"sha256:{fetched.sha256}" if fetched.sha256 else None
        info = fetched.info()
        return await self._ingest(destination, body, rid, ours, "documentContent", info)

    def _body(
        self, destination: MindsetDestination, file_name: str, mime: str, **content: str
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "name": destination.name or api_cut(file_name, MINDSET_MAX_NAME) or "file",
            "mimeType": mime,
            **content,
        }
        for field in _PASS_THROUGH:
            value = getattr(destination, field)
            if value is not None:
                body[field] = value
        return body

    async def _ingest(
        self,
        destination: MindsetDestination,
        body: dict[str, Any],
        rid: str,
        content_hash: str | None,
        mode: DeliveryMode,
        info: SourceInfo,
    ) -> Uploaded:
        """Ingest under the request's externalId; a file already holding it is kept or
        replaced as ``onExisting`` says (delete by uid, then ingest again)."""
        where = Context(destination.appUid, destination.contextUid)
        external_id = destination.externalId or f"courier:{rid}"
        body["externalId"] = external_id
        ours = destination.contentHash or content_hash
        if ours is not None:
            body["contentHash"] = ours
        found, existed = await self._files.ingest(where, body, external_id)
        if not existed:
            return Uploaded(found, mode, info, platform_file(found, external_id))
        theirs = found.get("contentHash") if isinstance(found, dict) else None
        if destination.onExisting == "keep" or (
            destination.onExisting == "replaceChanged" and ours == theirs
        ):
            file = platform_file(found, external_id)
            return Uploaded(found, mode, info, file, deduplicated=True)
        old = platform_file(found, external_id).uid
        if old is None:
            raise RetryableError(
                ErrorCode.DESTINATION_UNAVAILABLE,
                f"Mindset's file for externalId {external_id!r} came without a uid",
            )
        await self._files.delete(where, old)
        # A failure from here is retried as any other: the next attempt finds no file.
        new, again = await self._files.ingest(where, body, external_id)
        if again:
            raise RetryableError(
                ErrorCode.DESTINATION_UNAVAILABLE,
                f"another file took externalId {external_id!r} while Courier replaced it",
            )
        return Uploaded(new, mode, info, platform_file(new, external_id), replaced_uid=old)

    async def delete(self, request: DeleteRequest) -> Removed:
        """Look the file up by externalId and delete it by uid; none is ``existed: false``."""
        destination = request.destination
        assert isinstance(destination, MindsetDelete)  # noqa: S101 - routed by type
        where = Context(destination.appUid, destination.contextUid)
        found = await self._files.by_external_id(where, destination.externalId)
        uid = platform_file(found, destination.externalId).uid
        if found is None or uid is None:
            return Removed(existed=False)
        answer = await self._files.delete(where, uid)
        return Removed(existed=answer is not None, result=answer or None)

    async def read(self, request: UploadRequest, request_id: str) -> PlatformFile:
        """The file the request made, as Mindset holds it now (one read by externalId)."""
        destination = self._destination(request)
        where = Context(destination.appUid, destination.contextUid)
        external_id = destination.externalId or f"courier:{request_id}"
        found = await self._files.by_external_id(where, external_id, once=True)
        return GONE if found is None else platform_file(found, external_id)


def _check_delivery(mime: str, delivery: str) -> None:
    try:
        check_mindset_delivery(mime, delivery)
    except ValueError as exc:
        raise PermanentError(ErrorCode.INVALID_REQUEST, str(exc)) from None


def _document_content(file_name: str, raw: bytes, mime: str) -> str:
    """The file inlined: UTF-8 text, or base64 for a PDF; ``too_large`` past the limit."""
    if mime in _TEXT:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise PermanentError(
                ErrorCode.UNSUPPORTED_TYPE, f"{file_name!r} is not UTF-8 text"
            ) from None
    else:
        text = base64.b64encode(raw).decode("ascii")
    length = api_length(text)
    if length > MAX_CONTENT:
        raise PermanentError(
            ErrorCode.TOO_LARGE,
            f"documentContent would be {length} characters; Mindset takes at most {MAX_CONTENT}",
        )
    if not text:
        raise PermanentError(ErrorCode.INVALID_REQUEST, "the file is empty")
    return text
