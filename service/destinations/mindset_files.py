"""Mindset's context-files routes: ingest, read by externalId or uid, delete by uid.

Each call answers with the file object (a dict) or None where the API says 404, and
raises a :class:`~service.errors.CourierError` for everything else it cannot take
(``destination_rejected`` / ``destination_unavailable`` by the status), retried
in-process where that can help. What a file's status means is decided here too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp
from pydantic import SecretStr

from service.destinations.base import TRANSPORT_ERRORS, read_json, response_error, transport_error
from service.errors import CourierError
from service.outcome import FileState, PlatformFile
from service.retry import retried

# Mindset's statuses: readyForPublication is final while autoPublish is off.
_STATES: dict[str, FileState] = {
    "published": "completed",
    "readyForPublication": "completed",
    "fail": "failed",
}


def platform_file(found: Any, external_id: str | None) -> PlatformFile:
    """What a file object says: its status and what that means for following it."""
    data = found if isinstance(found, dict) else {}
    status = data.get("status") if isinstance(data.get("status"), str) else None
    state = _STATES.get(status or "", "pending")
    uid = data.get("uid") if isinstance(data.get("uid"), str) else None
    reason = "Mindset could not ingest the file (status fail)" if state == "failed" else None
    return PlatformFile(status, state, data, uid=uid, external_id=external_id, reason=reason)


GONE = PlatformFile(None, "failed", None, reason="the file is no longer in Mindset")


@dataclass(frozen=True, slots=True)
class Context:
    """One Mindset context of one app: where files live."""

    app_uid: str
    context_uid: str


class MindsetFiles:
    """The context-files routes of one Mindset API root, with one API key."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        api_key: SecretStr | None,
        timeout: float,
    ) -> None:
        self._session = session
        self._base_url = base_url.rstrip("/")
        self._api_key = api_key
        self._timeout = aiohttp.ClientTimeout(total=timeout)

    def _files(self, where: Context) -> str:
        app, context = quote(where.app_uid, safe=""), quote(where.context_uid, safe="")
        return f"{self._base_url}/api/v1/appuid/{app}/contexts/{context}/files"

    def _headers(self) -> dict[str, str]:
        assert self._api_key is not None  # noqa: S101 - the pipeline checks configured()
        return {"x-api-key": self._api_key.get_secret_value()}

    async def ingest(
        self, where: Context, body: dict[str, Any], external_id: str
    ) -> tuple[Any, bool]:
        """POST the ingest: ``(the new file, False)``, or ``(the file, True)`` when a file
        already holds ``external_id``. The API does not say which 4xx it answers then
        (409 is likely), so any 4xx but 429 is looked into before it counts."""

        async def once() -> tuple[Any, bool]:
            try:
                return await self._call("POST", self._files(where), body), False
            except Refused as refused:
                existing = await self._call("GET", self._by_external_id(where, external_id))
                if existing is None:
                    raise refused.error from None
                return existing, True

        return await retried(once)

    async def by_external_id(
        self, where: Context, external_id: str, *, once: bool = False
    ) -> Any | None:
        """The file holding ``external_id``, or None; ``once``: one GET, not retried here
        (a followed file's read: a failed one is read again from the broker, later)."""
        url = self._by_external_id(where, external_id)
        return await (self._call("GET", url) if once else retried(lambda: self._call("GET", url)))

    def _by_external_id(self, where: Context, external_id: str) -> str:
        return f"{self._files(where)}/externalId/{quote(external_id, safe='')}"

    async def by_uid(self, where: Context, uid: str) -> Any | None:
        """The file ``uid``, or None."""
        return await retried(lambda: self._call("GET", f"{self._files(where)}/uid/{quote(uid)}"))

    async def delete(self, where: Context, uid: str) -> Any | None:
        """Delete the file ``uid``: the answer (``{}`` when it has no JSON), or None when
        there was no such file."""
        url = f"{self._files(where)}/uid/{quote(uid, safe='')}"
        return await retried(lambda: self._call("DELETE", url, empty_ok=True))

    async def _call(
        self, method: str, url: str, body: Any = None, *, empty_ok: bool = False
    ) -> Any | None:
        try:
            async with self._session.request(
                method, url, json=body, headers=self._headers(), timeout=self._timeout
            ) as response:
                if response.status == 404 and method != "POST":
                    await response.read()
                    return None
                if response.status >= 400:
                    error = response_error(
                        "Mindset", response.status, response.headers, await response.read()
                    )
                    if method == "POST" and 400 <= response.status < 500 and response.status != 429:
                        raise Refused(error)
                    raise error
                if empty_ok and not (await response.read()).strip():
                    return {}
                return await read_json("Mindset", response)
        except TRANSPORT_ERRORS as exc:
            raise transport_error("Mindset", exc) from None


class Refused(Exception):
    """An ingest refused with a 4xx (not 429): maybe the externalId is taken; never leaves
    this module."""

    def __init__(self, error: CourierError) -> None:
        super().__init__(error.message)
        self.error = error
