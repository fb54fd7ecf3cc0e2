"""HTTP(S) sources: a streamed GET through the address guard, redirects re-checked."""

from __future__ import annotations

from collections.abc import AsyncIterator
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
    spool,
)
from service.sources.guard import (
    AddressPolicy,
    BlockedAddressError,
    Resolve,
    check_relayed_url,
    system_resolve,
)
from service.urls import check_http_url

MAX_REDIRECTS = 5
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
# The statuses whose body is the file; 203 is a 200 passed on by a transforming proxy.
_FILE_STATUSES = frozenset({200, 203})


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
    """Map a source's status that carries no file to the contract's code.

    An error status, but also a 2xx other than 200/203 (204 has no body, 206
    only part of one) and a redirect without a usable Location: none of them
    is the file. 202 (the server is still preparing it) may succeed later.
    """
    if status in (401, 403, 407):
        code = ErrorCode.SOURCE_FORBIDDEN
    elif status in (202, 408, 425, 429) or status >= 500:
        code = ErrorCode.SOURCE_UNAVAILABLE
    else:
        code = ErrorCode.SOURCE_NOT_FOUND
    detail = "" if status >= 400 else ", which is not a file"
    return error_for(
        code,
        f"{what} answered HTTP {status}{detail}",
        http_status=status,
        retry_after=retry_after,
    )


def _redirect_target(current: URL, location: str) -> URL:
    """Where a redirect leads; a target no fetch could use is ``source_not_found``.

    Not ``internal_error``: the source's own answer is what is broken, and
    asking again gives the same answer. A non-HTTP scheme is left to the hop's
    check, which calls it ``unsupported_source``.
    """
    try:
        target = current.join(URL(location))
        if target.scheme in ("http", "https"):
            check_http_url(str(target))
    except ValueError:
        raise PermanentError(
            ErrorCode.SOURCE_NOT_FOUND, "the source redirected to an unusable URL"
        ) from None
    return target


class HttpSource:
    """Fetches ``http``/``https`` URLs with a guarded session owned by the service."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        policy: AddressPolicy,
        tmp_dir: Path | None = None,
        resolve: Resolve = system_resolve,
    ) -> None:
        self._session = session
        self._policy = policy
        self._tmp_dir = tmp_dir
        self._resolve = resolve

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
        """The URL as given: the destination fetches it by itself.

        Courier does not connect, but the address policy still applies: the
        name is resolved and every address checked, as a fetch would.
        """
        await check_relayed_url(spec.url, self._policy, self._resolve)
        name = pick_name(spec, None, name_from_url(spec.url))
        return SourceFacts(
            fetch_url=spec.url,
            file_name=name,
            content_type=pick_type(spec, None, name),
            size=None,
            url=redact_url(spec.url),
        )

    async def fetch(self, spec: SourceSpec, limit: SizeLimit) -> FetchedFile:
        """Download the URL (following at most 5 re-checked redirects)."""
        return await retried(lambda: self._download(spec, limit))

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
            status = response.status
            if status in _FILE_STATUSES:
                return response
            response.release()
            location = response.headers.get("Location")
            if status in _REDIRECTS and location:
                url = _redirect_target(url, location)
                continue
            raise status_error(status, parse_retry_after(response.headers), "the source")
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
