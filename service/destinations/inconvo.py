"""Inconvo datasets: a multipart upload of one CSV or JSON file (at most 10 MiB)."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import quote

import aiohttp
from aiohttp import hdrs
from pydantic import SecretStr

from service.contracts import (
    INCONVO_EXTENSIONS,
    DeleteRequest,
    InconvoDelete,
    InconvoDestination,
    UploadRequest,
    check_upload_file_name,
)
from service.destinations.base import (
    TRANSPORT_ERRORS,
    Removed,
    Uploaded,
    read_json,
    response_error,
    transport_error,
)
from service.errors import ErrorCode, PermanentError
from service.outcome import PlatformFile
from service.retry import retried
from service.sources.base import FetchedFile, SizeLimit, Source, name_from_url

MAX_BYTES = 10 * 1024 * 1024
LIMIT = SizeLimit(MAX_BYTES, "Inconvo")
_PART_TYPES = {".csv": "text/csv", ".json": "application/json"}
_SPACES = re.compile(r"\s+")


def upload_name(name: str) -> str:
    """Check a file name as Inconvo would and return the name to send.

    ``unsupported_type`` for anything but ``.csv``/``.json``; ``invalid_request``
    for path tricks or control characters.
    """
    try:
        check_upload_file_name(name)
    except ValueError as exc:
        raise PermanentError(ErrorCode.INVALID_REQUEST, f"file name {name!r}: {exc}") from None
    name = name.strip()
    if not name.lower().endswith(INCONVO_EXTENSIONS):
        raise PermanentError(
            ErrorCode.UNSUPPORTED_TYPE, f"Inconvo takes only .csv or .json files, not {name!r}"
        )
    return name


def stored_name(name: str) -> str:
    """The name Inconvo stores an upload of ``name`` under: trimmed, inner spaces ``_``."""
    return _SPACES.sub("_", name.strip())


def dataset_path(destination: InconvoDestination | InconvoDelete, agent_id: str | None) -> str:
    """The upload route for the destination's scope, path segments URL-encoded."""
    agent = destination.agentId or agent_id
    prefix = f"/agents/{quote(agent, safe='')}" if agent else ""
    if destination.userIdentifier is not None:
        return f"{prefix}/datasets/user/{quote(destination.userIdentifier, safe='')}"
    assert destination.contextKey is not None  # noqa: S101 - guaranteed by the model
    assert destination.contextValue is not None  # noqa: S101
    key, value = quote(destination.contextKey, safe=""), quote(destination.contextValue, safe="")
    return f"{prefix}/datasets/context/{key}/{value}"


def precheck(request: UploadRequest) -> None:
    """Reject, before fetching, a file name that Inconvo would refuse (no I/O)."""
    destination = request.destination
    assert isinstance(destination, InconvoDestination)  # noqa: S101
    name = destination.fileName or request.source.fileName
    if name:
        upload_name(name)
        return
    # The URL's name may still be replaced by Content-Disposition, but a name
    # with another extension already tells the type: no need to fetch.
    url_name = name_from_url(request.source.url)
    if "." in url_name.strip(".") and not url_name.lower().endswith(INCONVO_EXTENSIONS):
        upload_name(url_name)


class Inconvo:
    """The Inconvo adapter; one instance per process, sharing one HTTP session."""

    name = "inconvo"

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        base_url: str,
        api_key: SecretStr | None,
        agent_id: str | None = None,
        timeout: float = 60.0,
    ) -> None:
        self._session = session
        self._base_url = base_url.rstrip("/")
        self._api_key = api_key
        self._agent_id = agent_id
        self._timeout = aiohttp.ClientTimeout(total=timeout)

    def configured(self) -> bool:
        """Whether an API key is set."""
        return self._api_key is not None

    def precheck(self, request: UploadRequest) -> None:
        """Reject, before fetching, a file name that Inconvo would refuse."""
        precheck(request)

    async def deliver(self, request: UploadRequest, source: Source, request_id: str) -> Uploaded:
        """Fetch the source (capped at 10 MiB) and upload it."""
        destination = request.destination
        assert isinstance(destination, InconvoDestination)  # noqa: S101
        url = self._base_url + dataset_path(destination, self._agent_id)
        async with await source.fetch(request.source, LIMIT) as fetched:
            name = upload_name(destination.fileName or fetched.file_name)
            result = await retried(lambda: self._upload(url, fetched, name, destination.notes))
        # Inconvo's upload is synchronous: its 2xx is the file, stored and final.
        file = PlatformFile("stored", "completed", result)
        return Uploaded(result, "multipart", fetched.info(), file)

    async def read(self, request: UploadRequest, request_id: str) -> PlatformFile:
        """Never needed: an Inconvo upload is final when it succeeds (no status API)."""
        raise NotImplementedError("Inconvo has no status to read")

    async def delete(self, request: DeleteRequest) -> Removed:
        """Delete the scope's file by name; a file that is not there is ``existed: false``."""
        destination = request.destination
        assert isinstance(destination, InconvoDelete)  # noqa: S101 - routed by type
        name = quote(stored_name(destination.fileName), safe="")
        url = f"{self._base_url}{dataset_path(destination, self._agent_id)}/{name}"
        return await retried(lambda: self._delete(url))

    async def _delete(self, url: str) -> Removed:
        try:
            async with self._session.delete(
                url, headers=self._headers(), timeout=self._timeout
            ) as response:
                if response.status == 404:
                    await response.read()
                    return Removed(existed=False)
                if response.status >= 400:
                    raise response_error(
                        "Inconvo", response.status, response.headers, await response.read()
                    )
                return Removed(existed=True, result=await read_json("Inconvo", response))
        except TRANSPORT_ERRORS as exc:
            raise transport_error("Inconvo", exc) from None

    def _headers(self) -> dict[str, str]:
        assert self._api_key is not None  # noqa: S101 - the pipeline checks configured()
        return {"Authorization": f"Bearer {self._api_key.get_secret_value()}"}

    async def _upload(self, url: str, fetched: FetchedFile, name: str, notes: str | None) -> Any:
        part_type = _PART_TYPES[name[name.rfind(".") :].lower()]
        # A spooled file is streamed by aiohttp from disk, in its executor.
        async with fetched.body() as body:
            form = aiohttp.FormData(quote_fields=False)
            form.add_field("file", body, filename=name, content_type=part_type)
            if notes is not None:
                form.add_field("notes", notes)
            headers = self._headers()
            multipart = form()
            data: aiohttp.Payload | bytes = multipart
            if isinstance(body, bytes):
                # A file held in memory goes as one buffer: aiohttp writes each
                # boundary and part separately otherwise, five sends per upload.
                headers[hdrs.CONTENT_TYPE] = multipart.content_type
                data = await multipart.as_bytes()
            try:
                async with self._session.post(
                    url, data=data, headers=headers, timeout=self._timeout
                ) as response:
                    if response.status >= 400:
                        raise response_error(
                            "Inconvo", response.status, response.headers, await response.read()
                        )
                    return await read_json("Inconvo", response)
            except TRANSPORT_ERRORS as exc:
                raise transport_error("Inconvo", exc) from None
