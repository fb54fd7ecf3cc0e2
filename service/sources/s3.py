"""S3 sources on aiobotocore: streamed GetObject, presigned HEAD and presigned GET URLs.

One client for the process, created at start-up from the standard AWS chain
(environment, web identity for IRSA, instance profile; ``AWS_ENDPOINT_URL_S3``).
"""

from __future__ import annotations

import functools
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit

import aiohttp
from aiohttp import hdrs
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError
from multidict import CIMultiDictProxy

from service.contracts import SourceSpec
from service.errors import CourierError, ErrorCode, PermanentError, RetryableError
from service.redact import redact_url
from service.retry import parse_retry_after, retried
from service.sources.base import (
    CHUNK_SIZE,
    FetchedFile,
    SizeLimit,
    SourceFacts,
    pick_name,
    pick_type,
    removing,
    spool,
)

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

_NOT_FOUND = frozenset({"NoSuchKey", "NoSuchBucket", "NoSuchVersion", "404", "NotFound"})
_FORBIDDEN = frozenset(
    {
        "AccessDenied",
        "403",
        "Forbidden",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "AllAccessDisabled",
    }
)

# The HEAD's URL is used at once: a short validity keeps a leaked one worthless.
_HEAD_URL_TTL = 60


@dataclass(frozen=True, slots=True)
class S3Location:
    """``s3://bucket/key?versionId=v``, the key percent-decoded."""

    bucket: str
    key: str
    version_id: str | None

    @classmethod
    def parse(cls, url: str) -> S3Location:
        """Parse an s3 URL; ``invalid_request`` when it has no bucket or key."""
        parts = urlsplit(url)
        key = unquote(parts.path.lstrip("/"))
        if parts.scheme.lower() != "s3" or not parts.netloc or not key:
            raise PermanentError(ErrorCode.INVALID_REQUEST, "an s3 URL is s3://bucket/key")
        versions = parse_qs(parts.query).get("versionId")
        return cls(bucket=parts.netloc, key=key, version_id=versions[0] if versions else None)

    def params(self) -> dict[str, str]:
        """Bucket, Key and (when given) VersionId, as the S3 API takes them."""
        params = {"Bucket": self.bucket, "Key": self.key}
        if self.version_id:
            params["VersionId"] = self.version_id
        return params


@functools.lru_cache(maxsize=256)
def env_proxy(scheme: str, host: str) -> str | None:
    """The proxy the environment names for ``scheme://host`` (``HTTPS_PROXY``, ``NO_PROXY``).

    As botocore reads it for its own calls; looked up once per host, where
    aiohttp's ``trust_env`` would read the environment (and netrc) on every request.
    """
    if urllib.request.proxy_bypass(host):
        return None
    return urllib.request.getproxies().get(scheme)


def answer_error(
    where: S3Location, code: str, status: int | None, retry_after: float | None = None
) -> CourierError:
    """The contract's code for an S3 error answer (its error code, HTTP status or both)."""
    what = f"s3://{where.bucket}/{where.key}"
    if code in _NOT_FOUND or status == 404:
        return PermanentError(
            ErrorCode.SOURCE_NOT_FOUND,
            f"{what} does not exist ({code or status})",
            http_status=status,
        )
    if code in _FORBIDDEN or status in (401, 403):
        return PermanentError(
            ErrorCode.SOURCE_FORBIDDEN,
            f"access to {what} was denied ({code or status})",
            http_status=status,
        )
    return RetryableError(
        ErrorCode.SOURCE_UNAVAILABLE,
        f"S3 answered {code or status} for {what}",
        http_status=status,
        retry_after=retry_after,
    )


def map_error(exc: Exception, where: S3Location) -> CourierError:
    """Translate a botocore or transport failure into the contract's codes."""
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0) or None
        return answer_error(where, str(error.get("Code", "")), status)
    if isinstance(exc, NoCredentialsError):
        return PermanentError(ErrorCode.SOURCE_FORBIDDEN, "no AWS credentials were found")
    what = "did not answer in time" if isinstance(exc, TimeoutError) else "could not be reached"
    return RetryableError(ErrorCode.SOURCE_UNAVAILABLE, f"S3 {what} ({type(exc).__name__})")


class S3Source:
    """Reads ``s3://`` URLs with the process's one S3 client.

    ``http`` makes the existence checks: a HEAD of a URL that ``client`` presigned.
    """

    def __init__(
        self,
        client: S3Client,
        http: aiohttp.ClientSession,
        *,
        allowed_buckets: tuple[str, ...] = (),
        presign_ttl: int = 12 * 3600,
        tmp_dir: Path | None = None,
    ) -> None:
        self._client = client
        self._http = http
        self._allowed = frozenset(allowed_buckets)
        self._ttl = presign_ttl
        self._tmp_dir = tmp_dir

    def check(self, spec: SourceSpec) -> None:
        """Refuse a bucket outside ``COURIER_S3_ALLOWED_BUCKETS`` before any S3 call."""
        location = S3Location.parse(spec.url)
        if self._allowed and location.bucket not in self._allowed:
            raise PermanentError(
                ErrorCode.SOURCE_BLOCKED,
                f"bucket {location.bucket!r} is not in the allowed buckets",
            )

    @asynccontextmanager
    async def open(self, spec: SourceSpec, limit: SizeLimit) -> AsyncIterator[FetchedFile]:
        """Stream the object into a temporary file, capped at ``limit``."""
        location = S3Location.parse(spec.url)
        fetched = await retried(lambda: self._download(spec, location, limit))
        async with removing(fetched):
            yield fetched

    async def _download(
        self, spec: SourceSpec, location: S3Location, limit: SizeLimit
    ) -> FetchedFile:
        try:
            response = await self._client.get_object(**location.params())  # type: ignore[arg-type]
        except (ClientError, BotoCoreError) as exc:
            raise map_error(exc, location) from None
        body = response["Body"]
        try:
            length = response.get("ContentLength")
            if length is not None and length > limit.max_bytes:
                raise limit.exceeded(length)
            name = pick_name(
                spec,
                _disposition_name(response.get("ContentDisposition")),
                location.key.rsplit("/", 1)[-1],
            )
            content_type = pick_type(spec, response.get("ContentType"), name)
            spooled = await spool(self._chunks(body, location), limit, self._tmp_dir)
        finally:
            body.close()
        return spooled.as_file(content_type=content_type, file_name=name, url=spec.url)

    async def _chunks(self, body: Any, location: S3Location) -> AsyncIterator[bytes]:
        try:
            async for chunk in body.iter_chunks(CHUNK_SIZE):
                yield chunk
        except (BotoCoreError, OSError, TimeoutError) as exc:
            raise map_error(exc, location) from None

    async def _presign(self, method: str, location: S3Location, ttl: int) -> str:
        try:
            return await self._client.generate_presigned_url(
                method, Params=location.params(), ExpiresIn=ttl
            )
        except (ClientError, BotoCoreError) as exc:
            raise map_error(exc, location) from None

    async def _head(self, location: S3Location) -> CIMultiDictProxy[str]:
        # A HEAD of a presigned URL rather than the client's HeadObject: the same
        # credentials and signer at a third to a half of the CPU (`python -m
        # bench.s3_head`, README Performance), and it proves that S3 takes the
        # signatures this client makes.
        url = await self._presign("head_object", location, _HEAD_URL_TTL)
        parts = urlsplit(url)
        try:
            async with self._http.head(
                url, allow_redirects=False, proxy=env_proxy(parts.scheme, parts.hostname or "")
            ) as response:
                if response.status >= 300:
                    raise answer_error(
                        location,
                        response.headers.get("x-amz-error-code", ""),
                        response.status,
                        parse_retry_after(response.headers),
                    )
                return response.headers
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise map_error(exc, location) from None

    async def describe(self, spec: SourceSpec) -> SourceFacts:
        """HEAD the object, then a presigned GET URL valid for ``COURIER_PRESIGN_TTL``."""
        location = S3Location.parse(spec.url)
        head = await retried(lambda: self._head(location))
        url = await self._presign("get_object", location, self._ttl)
        name = pick_name(
            spec,
            _disposition_name(head.get(hdrs.CONTENT_DISPOSITION)),
            location.key.rsplit("/", 1)[-1],
        )
        length = head.get(hdrs.CONTENT_LENGTH)
        return SourceFacts(
            fetch_url=url,
            file_name=name,
            content_type=pick_type(spec, head.get(hdrs.CONTENT_TYPE), name),
            size=int(length) if length and length.isdigit() else None,
            url=redact_url(spec.url),
        )


def _disposition_name(value: str | None) -> str | None:
    if not value:
        return None
    from email.message import Message

    message = Message()
    message["Content-Disposition"] = value
    name = message.get_filename()
    return str(name) if name else None
