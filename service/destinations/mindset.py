"""Mindset AI context files: JSON ingest by ``sourceUrl`` or ``documentContent``."""

from __future__ import annotations

import base64
from typing import Any
from urllib.parse import quote

import aiohttp
from pydantic import SecretStr

from service.contracts import (
    MINDSET_MAX_NAME,
    MINDSET_MAX_URL,
    MINDSET_MIME_TYPES,
    MindsetDestination,
    SourceInfo,
    UploadRequest,
    api_cut,
    api_length,
    check_mindset_delivery,
)
from service.destinations.base import (
    TRANSPORT_ERRORS,
    Uploaded,
    read_json,
    response_error,
    transport_error,
)
from service.errors import ErrorCode, PermanentError
from service.retry import retried
from service.sources.base import (
    SizeLimit,
    Source,
    SourceFacts,
    media_type,
    name_from_url,
    pick_name,
)
from service.sources.guard import AddressPolicy, Resolve, check_relayed_url, system_resolve

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
    "externalId",
    "zipType",
    "autoPublish",
    "hideContentSegments",
    "knownAs",
    "externalUrl",
    "thumbnailUrl",
    "thumbnail",
    "viewOriginalSource",
    "contentHash",
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
        """``policy`` is the source address policy, applied to the URLs Mindset
        fetches on Courier's word (``thumbnailUrl``, ``externalUrl``); without one,
        the default policy (public addresses only) applies."""
        self._session = session
        self._base_url = base_url.rstrip("/")
        self._api_key = api_key
        self._timeout = aiohttp.ClientTimeout(total=timeout)
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

    async def deliver(self, request: UploadRequest, source: Source) -> Uploaded:
        """Pick the delivery mode, build the body and ingest it."""
        destination = self._destination(request)
        for url in (destination.thumbnailUrl, destination.externalUrl):
            if url is not None:
                await check_relayed_url(url, self._policy, self._resolve)
        mime: str | None = destination.mimeType
        delivery = destination.delivery
        if delivery == "auto" and mime is None:
            facts = await source.describe(request.source)
            mime = infer_mime_type(facts.content_type, facts.file_name)
            if mime is None:
                raise _unsupported(facts.file_name, facts.content_type)
            if mime != "text/plain":
                return await self._by_url(request, destination, mime, facts)
        if delivery == "documentContent" or (delivery == "auto" and mime == "text/plain"):
            return await self._inline(request, destination, source, mime)
        facts = await source.describe(request.source)
        mime = mime or infer_mime_type(facts.content_type, facts.file_name)
        if mime is None:
            raise _unsupported(facts.file_name, facts.content_type)
        return await self._by_url(request, destination, mime, facts)

    async def _by_url(
        self, request: UploadRequest, destination: MindsetDestination, mime: str, facts: SourceFacts
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
        result, deduplicated = await self._ingest(destination, body)
        info = SourceInfo(url=facts.url, bytes=facts.size, contentType=facts.content_type)
        return Uploaded(result, "sourceUrl", info, deduplicated)

    async def _inline(
        self,
        request: UploadRequest,
        destination: MindsetDestination,
        source: Source,
        mime: str | None,
    ) -> Uploaded:
        limit = PDF_LIMIT if mime == "application/pdf" else TEXT_LIMIT
        async with await source.fetch(request.source, limit) as fetched:
            mime = mime or infer_mime_type(fetched.content_type, fetched.file_name)
            if mime is None:
                raise _unsupported(fetched.file_name, fetched.content_type)
            _check_delivery(mime, "documentContent")
            content = _document_content(fetched.file_name, await fetched.read(), mime)
        body = self._body(destination, fetched.file_name, mime, documentContent=content)
        result, deduplicated = await self._ingest(destination, body)
        return Uploaded(result, "documentContent", fetched.info(), deduplicated)

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

    def _files_url(self, destination: MindsetDestination) -> str:
        app, context = quote(destination.appUid, safe=""), quote(destination.contextUid, safe="")
        return f"{self._base_url}/api/v1/appuid/{app}/contexts/{context}/files"

    def _headers(self) -> dict[str, str]:
        assert self._api_key is not None  # noqa: S101 - the pipeline checks configured()
        return {"x-api-key": self._api_key.get_secret_value()}

    async def _ingest(
        self, destination: MindsetDestination, body: dict[str, Any]
    ) -> tuple[Any, bool]:
        return await retried(lambda: self._post(destination, body))

    async def _post(
        self, destination: MindsetDestination, body: dict[str, Any]
    ) -> tuple[Any, bool]:
        try:
            async with self._session.post(
                self._files_url(destination),
                json=body,
                headers=self._headers(),
                timeout=self._timeout,
            ) as response:
                if response.status < 400:
                    return await read_json("Mindset", response), False
                error = response_error(
                    "Mindset", response.status, response.headers, await response.read()
                )
        except TRANSPORT_ERRORS as exc:
            raise transport_error("Mindset", exc) from None
        if destination.externalId and 400 <= response.status < 500:
            existing = await self._lookup(destination)
            if existing is not None:
                return existing, True
        raise error

    async def _lookup(self, destination: MindsetDestination) -> Any:
        """The file already ingested under the request's externalId, or None."""
        assert destination.externalId is not None  # noqa: S101
        url = f"{self._files_url(destination)}/externalId/{quote(destination.externalId, safe='')}"
        try:
            async with self._session.get(
                url, headers=self._headers(), timeout=self._timeout
            ) as response:
                if response.status == 404:
                    return None
                if response.status >= 400:
                    raise response_error(
                        "Mindset", response.status, response.headers, await response.read()
                    )
                return await read_json("Mindset", response)
        except TRANSPORT_ERRORS as exc:
            raise transport_error("Mindset", exc) from None


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
