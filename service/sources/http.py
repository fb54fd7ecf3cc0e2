"""HTTP(S) sources: a streamed GET through the address guard, redirects re-checked."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
from yarl import URL

from service.contracts import SourceSpec
from service.errors import CourierError, ErrorCode, PermanentError, RetryableError, error_for
from service.redact import redact_url
from service.retry import parse_retry_after, retried
from service.sources.base import (
    FetchedFile,
    SizeLimit,
    SourceFacts,
    name_from_url,
    pick_name,
    pick_type,
    removing,
    spool,
)
from service.sources.guard import AddressPolicy, BlockedAddressError

MAX_REDIRECTS = 5
_REDIRECTS = frozenset({301, 302, 303, 307, 308})


def _blocked_cause(exc: BaseException) -> BlockedAddressError | None:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, BlockedAddressError):
            return current
        os_error = getattr(current, "os_error", None)
        if isinstance(os_error, BlockedAddressError):
            return os_error
        current = current.__cause__ or current.__context__
    return None


def status_error(status: int, retry_after: float | None, what: str) -> CourierError:
    """Map a source's HTTP error status to the contract's code."""
    if status in (401, 403, 407):
        code = ErrorCode.SOURCE_FORBIDDEN
    elif status in (408, 425, 429) or status >= 500:
        code = ErrorCode.SOURCE_UNAVAILABLE
    else:
        code = ErrorCode.SOURCE_NOT_FOUND
    return error_for(
        code, f"{what} answered HTTP {status}", http_status=status, retry_after=retry_after
    )


class HttpSource:
    """Fetches ``http``/``https`` URLs with a guarded session owned by the service."""

    def __init__(
        self, session: aiohttp.ClientSession, policy: AddressPolicy, tmp_dir: Path | None = None
    ) -> None:
        self._session = session
        self._policy = policy
        self._tmp_dir = tmp_dir

    def _check_url(self, url: URL) -> None:
        if url.scheme not in ("http", "https") or not url.host:
            raise PermanentError(ErrorCode.UNSUPPORTED_SOURCE, "redirected to a non-HTTP URL")
        reason = self._policy.check_host(url.host, url.explicit_port or url.port or 0)
        if reason is not None:
            raise PermanentError(ErrorCode.SOURCE_BLOCKED, reason)

    def check(self, spec: SourceSpec) -> None:
        """Refuse hosts outside the allowlist before any DNS lookup."""
        self._check_url(URL(spec.url))

    async def describe(self, spec: SourceSpec) -> SourceFacts:
        """The URL as given: the destination fetches it by itself."""
        name = pick_name(spec, None, name_from_url(spec.url))
        return SourceFacts(
            fetch_url=spec.url,
            file_name=name,
            content_type=pick_type(spec, None, name),
            size=None,
            url=redact_url(spec.url),
        )

    @asynccontextmanager
    async def open(self, spec: SourceSpec, limit: SizeLimit) -> AsyncIterator[FetchedFile]:
        """Download the URL (following at most 5 re-checked redirects) into a temp file."""
        fetched = await retried(lambda: self._download(spec, limit))
        async with removing(fetched):
            yield fetched

    async def _download(self, spec: SourceSpec, limit: SizeLimit) -> FetchedFile:
        response = await self._get(URL(spec.url))
        try:
            length = response.content_length
            if length is not None and length > limit.max_bytes:
                raise limit.exceeded(length)
            disposition = response.content_disposition
            name = pick_name(
                spec, disposition.filename if disposition else None, name_from_url(spec.url)
            )
            content_type = pick_type(spec, response.headers.get("Content-Type"), name)
            spooled = await spool(self._chunks(response), limit, self._tmp_dir)
        finally:
            response.release()
        return spooled.as_file(content_type=content_type, file_name=name, url=spec.url)

    async def _get(self, url: URL) -> aiohttp.ClientResponse:
        for _hop in range(MAX_REDIRECTS + 1):
            self._check_url(url)
            try:
                response = await self._session.get(url, allow_redirects=False)
            except aiohttp.ClientError as exc:
                blocked = _blocked_cause(exc)
                if blocked is not None:
                    raise PermanentError(ErrorCode.SOURCE_BLOCKED, blocked.reason) from None
                raise RetryableError(
                    ErrorCode.SOURCE_UNAVAILABLE, f"cannot reach the source: {type(exc).__name__}"
                ) from None
            except TimeoutError:
                raise RetryableError(
                    ErrorCode.SOURCE_UNAVAILABLE, "the source did not answer in time"
                ) from None
            if response.status in _REDIRECTS and "Location" in response.headers:
                response.release()
                url = url.join(URL(response.headers["Location"]))
                continue
            if response.status >= 400:
                response.release()
                raise status_error(
                    response.status, parse_retry_after(response.headers), "the source"
                )
            return response
        raise PermanentError(ErrorCode.SOURCE_NOT_FOUND, f"more than {MAX_REDIRECTS} redirects")

    async def _chunks(self, response: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
        try:
            # The chunks as received: iter_chunked() would join and slice them into a copy.
            async for chunk, _ in response.content.iter_chunks():
                yield chunk
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise RetryableError(
                ErrorCode.SOURCE_UNAVAILABLE,
                f"the source broke off the download: {type(exc).__name__}",
            ) from None
