"""A strict local fake of Inconvo's dataset file API (multipart CSV/JSON uploads)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from aiohttp import MultipartReader, hdrs, web
from aiohttp.multipart import content_disposition_filename, parse_content_disposition
from multidict import CIMultiDict

from testbed.fakes._server import FakeServer, drain, json_response, media_type

MAX_FILE_BYTES = 10 * 1024 * 1024
MAX_CONTEXT_SCOPES = 3
DEFAULT_AGENT = "agt_default"
ORG = "org_test"

ErrorShape = Literal["string", "object", "file"]

_IDENTIFIER = re.compile(r"[A-Za-z0-9_.@-]{1,256}")
_CONTEXT_KEY = re.compile(r"[A-Za-z0-9_.-]{1,256}")
_WHITESPACE = re.compile(r"\s+")
_ERROR_TYPES = {
    400: ("invalid_request_error", "bad_request"),
    401: ("authentication_error", "unauthorized"),
    403: ("permission_error", "forbidden"),
    404: ("not_found_error", "not_found"),
    409: ("conflict_error", "conflict"),
    429: ("rate_limit_error", "rate_limited"),
}


@dataclass(frozen=True, slots=True)
class ReceivedUpload:
    """One accepted upload, as the fake received it."""

    scope: str  # "userIdentifier/<id>" or "userContext/<key>:<value>"
    path: str  # the stored path, as in the response
    agent_id: str | None  # None for the routes without /agents/{agentId}
    user_identifier: str | None
    context_key: str | None
    context_value: str | None
    file_name: str  # after trimming and replacing spaces
    raw_file_name: str  # the filename of the multipart part
    content: bytes
    content_type: str | None  # of the file part
    notes: str | None
    headers: CIMultiDict[str]


@dataclass(frozen=True, slots=True)
class DeletedDataset:
    """One successful delete of a stored file."""

    scope: str  # "userIdentifier/<id>" or "userContext/<key>:<value>"
    file_name: str
    agent_id: str | None  # None for the routes without /agents/{agentId}
    path: str  # the stored path the file had


@dataclass(frozen=True, slots=True)
class _Scope:
    agent_id: str | None
    user_identifier: str | None
    context_key: str | None
    context_value: str | None

    @property
    def agent(self) -> str:
        return self.agent_id or DEFAULT_AGENT

    @property
    def name(self) -> str:
        if self.user_identifier is not None:
            return f"userIdentifier/{self.user_identifier}"
        return f"userContext/{self.context_key}:{self.context_value}"

    def path(self, file_name: str) -> str:
        return f"{ORG}/{self.agent}/{self.name}/{file_name}"


class _Rejected(Exception):
    def __init__(self, message: str, file_name: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.file_name = file_name


def sanitize_file_name(raw: str) -> str:
    """The stored name for an uploaded file name; ValueError if Inconvo refuses it."""
    if ".." in raw or "/" in raw or "\\" in raw:
        raise ValueError("Invalid file name")
    name = _WHITESPACE.sub("_", raw.strip())
    if not name.lower().endswith((".csv", ".json")):
        raise ValueError("Only .csv and .json files are supported")
    return name


class FakeInconvo(FakeServer):
    """Inconvo's dataset routes, with and without ``/agents/{agentId}``.

    ``start()`` returns the API base (``http://127.0.0.1:PORT/api/v1``). Enforces the
    bearer key, the multipart form (one ``file`` part with a filename, optional text
    ``notes``, nothing else), the path parameter patterns, the file name rules, the
    10 MiB limit (counted while streaming) and at most 3 context scopes holding files
    per agent (the agent-less routes count as agent ``agt_default``). Uploading the
    same name to the same scope overwrites. ``GET`` on an upload route lists the
    scope's names (``{"files": [name, ...]}``); ``DELETE <route>/{filename}`` answers
    ``{"file": name, "success": true}``, or 404 with ``{"file": name, "success":
    false, "error": "File not found"}`` when the scope holds no such file.

    Attributes: ``uploads`` (accepted uploads), ``deletes`` (successful deletes,
    :class:`DeletedDataset`), ``requests`` (all requests),
    ``error_shape`` (``"string"``: ``{"error": text}``, ``"object"``:
    ``{"error": {"message", "type", "code"}}``, ``"file"``: ``{"file": {"name",
    "error"}}``), ``delay``/``delay_after``, ``fail_next()``.
    """

    _api_prefix = "/api/v1"

    def __init__(
        self,
        api_key: str = "test-inconvo-key",
        *,
        error_shape: ErrorShape = "string",
        keep_content: bool = True,
    ) -> None:
        super().__init__()
        self.api_key = api_key
        # Benchmarks push gigabytes through: they count bytes and keep none.
        self.keep_content = keep_content
        self.error_shape: ErrorShape = error_shape
        self.uploads: list[ReceivedUpload] = []
        self.deletes: list[DeletedDataset] = []
        self._store: dict[tuple[str, str], dict[str, bytes]] = {}

    @property
    def files(self) -> dict[str, bytes]:
        """The stored files, by path (``org_test/<agent>/<scope>/<name>``)."""
        return {
            f"{ORG}/{agent}/{scope}/{name}": content
            for (agent, scope), files in self._store.items()
            for name, content in files.items()
        }

    def _routes(self) -> list[web.RouteDef]:
        routes: list[web.RouteDef] = []
        for agent in ("", "/agents/{agentId}"):
            for scope in (
                "/datasets/user/{userIdentifier}",
                "/datasets/context/{contextKey}/{contextValue}",
            ):
                path = self._api_prefix + agent + scope
                routes += [
                    web.post(path, self._upload),
                    web.get(path, self._list),
                    web.delete(path + "/{filename}", self._delete),
                ]
        return routes

    def _error_body(self, status: int, message: str) -> object:
        return self._shaped_error(status, message, None)

    def _shaped_error(self, status: int, message: str, file_name: str | None) -> object:
        if self.error_shape == "object":
            kind, code = _ERROR_TYPES.get(status, ("api_error", "internal_error"))
            return {"error": {"message": message, "type": kind, "code": code}}
        if self.error_shape == "file":
            return {"file": {"name": file_name, "error": message}}
        return {"error": message}

    def _reject(self, status: int, message: str, file_name: str | None = None) -> web.Response:
        return json_response(self._shaped_error(status, message, file_name), status=status)

    async def _check(self, request: web.Request) -> _Scope | web.Response:
        """The scope of an authorised request with valid path parameters, else the error."""
        if request.headers.get(hdrs.AUTHORIZATION) != f"Bearer {self.api_key}":
            await drain(request)
            return self._reject(401, "Unauthorized")
        info = request.match_info
        scope = _Scope(
            info.get("agentId"),
            info.get("userIdentifier"),
            info.get("contextKey"),
            info.get("contextValue"),
        )
        problem = None
        if scope.user_identifier is not None and not _IDENTIFIER.fullmatch(scope.user_identifier):
            problem = "Invalid userIdentifier"
        elif scope.context_key is not None and not _CONTEXT_KEY.fullmatch(scope.context_key):
            problem = "Invalid contextKey"
        elif scope.context_value is not None and not _IDENTIFIER.fullmatch(scope.context_value):
            problem = "Invalid contextValue"
        if problem is not None:
            await drain(request)
            return self._reject(400, problem)
        return scope

    async def _upload(self, request: web.Request) -> web.Response:
        scope = await self._check(request)
        if isinstance(scope, web.Response):
            return scope
        try:
            raw_name, content, size, content_type, notes = await self._read_form(request)
        except _Rejected as exc:
            await drain(request)
            return self._reject(400, exc.message, exc.file_name)
        try:
            name = sanitize_file_name(raw_name)
        except ValueError as exc:
            return self._reject(400, str(exc), raw_name)
        if size > MAX_FILE_BYTES:
            return self._reject(400, "File exceeds 10MB limit", name)
        key = (scope.agent, scope.name)
        if scope.context_key is not None and not self._store.get(key):
            used = sum(
                1
                for (agent, name_), files in self._store.items()
                if agent == scope.agent and name_.startswith("userContext/") and files
            )
            if used >= MAX_CONTEXT_SCOPES:
                return self._reject(
                    400, f"An agent can have at most {MAX_CONTEXT_SCOPES} context scopes", name
                )
        self._store.setdefault(key, {})[name] = content
        path = scope.path(name)
        self.uploads.append(
            ReceivedUpload(
                scope=scope.name,
                path=path,
                agent_id=scope.agent_id,
                user_identifier=scope.user_identifier,
                context_key=scope.context_key,
                context_value=scope.context_value,
                file_name=name,
                raw_file_name=raw_name,
                content=content,
                content_type=content_type,
                notes=notes,
                headers=CIMultiDict(request.headers),
            )
        )
        return json_response({"file": {"name": name, "path": path, "size": size}})

    async def _read_form(
        self, request: web.Request
    ) -> tuple[str, bytes, int, str | None, str | None]:
        """(file name, content up to the limit, size, part type, notes) of the form."""
        if media_type(request) != "multipart/form-data":
            raise _Rejected("Content-Type must be multipart/form-data")
        file_name: str | None = None
        content = bytearray()
        size = 0
        content_type: str | None = None
        notes: str | None = None
        seen: set[str] = set()
        try:
            reader = await request.multipart()
            while (part := await reader.next()) is not None:
                if isinstance(part, MultipartReader):
                    raise _Rejected("Nested multipart bodies are not supported")
                # One parse of Content-Disposition per part: aiohttp's ``part.name`` and
                # ``part.filename`` each parse it again, the fake's largest benchmark cost.
                _, params = parse_content_disposition(part.headers.get(hdrs.CONTENT_DISPOSITION))
                name = content_disposition_filename(params, "name")
                part_file = content_disposition_filename(params, "filename")
                if name not in ("file", "notes"):
                    raise _Rejected(f"Unexpected form field: {name!r}")
                if name in seen:
                    raise _Rejected(f"Form field {name!r} given more than once")
                seen.add(name)
                if name == "notes":
                    if part_file is not None:
                        raise _Rejected("notes must be a text field")
                    notes = await part.text()
                    continue
                if not part_file:
                    raise _Rejected("file must be a file with a file name")
                file_name = part_file
                content_type = part.headers.get(hdrs.CONTENT_TYPE)
                while chunk := await part.read_chunk():
                    size += len(chunk)
                    if size <= MAX_FILE_BYTES and self.keep_content:
                        content += chunk
        except (ValueError, AssertionError, RuntimeError) as exc:
            raise _Rejected(f"Malformed multipart body: {exc}") from None
        if file_name is None:
            raise _Rejected("No file provided")
        return file_name, bytes(content), size, content_type, notes

    async def _list(self, request: web.Request) -> web.Response:
        scope = await self._check(request)
        if isinstance(scope, web.Response):
            return scope
        return json_response({"files": list(self._store.get((scope.agent, scope.name), {}))})

    async def _delete(self, request: web.Request) -> web.Response:
        scope = await self._check(request)
        if isinstance(scope, web.Response):
            return scope
        name = request.match_info["filename"]
        files = self._store.get((scope.agent, scope.name), {})
        if files.pop(name, None) is None:
            return json_response(
                {"file": name, "success": False, "error": "File not found"}, status=404
            )
        self.deletes.append(DeletedDataset(scope.name, name, scope.agent_id, scope.path(name)))
        return json_response({"file": name, "success": True})
