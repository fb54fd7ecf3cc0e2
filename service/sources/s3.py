"""S3 sources on aiobotocore: streamed GetObject, HeadObject and presigned GET URLs.

One client for the process, created at start-up from the standard AWS chain
(environment, web identity for IRSA, instance profile; ``AWS_ENDPOINT_URL_S3``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit

from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from service.contracts import SourceSpec
from service.errors import CourierError, ErrorCode, PermanentError, RetryableError
from service.redact import redact_url
from service.retry import retried
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


def map_error(exc: Exception, where: S3Location) -> CourierError:
    """Translate a botocore failure into the contract's codes."""
    what = f"s3://{where.bucket}/{where.key}"
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0) or None
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
        )
    if isinstance(exc, NoCredentialsError):
        return PermanentError(ErrorCode.SOURCE_FORBIDDEN, "no AWS credentials were found")
    return RetryableError(
        ErrorCode.SOURCE_UNAVAILABLE, f"S3 could not be reached ({type(exc).__name__})"
    )


class S3Source:
    """Reads ``s3://`` URLs with the process's one S3 client."""

    def __init__(
        self,
        client: S3Client,
        *,
        allowed_buckets: tuple[str, ...] = (),
        presign_ttl: int = 12 * 3600,
        tmp_dir: Path | None = None,
    ) -> None:
        self._client = client
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

    async def _head(self, location: S3Location) -> Any:
        try:
            return await self._client.head_object(**location.params())  # type: ignore[arg-type]
        except (ClientError, BotoCoreError) as exc:
            raise map_error(exc, location) from None

    async def describe(self, spec: SourceSpec) -> SourceFacts:
        """HEAD the object, then a presigned GET URL valid for ``COURIER_PRESIGN_TTL``."""
        location = S3Location.parse(spec.url)
        head = await retried(lambda: self._head(location))
        try:
            url = await self._client.generate_presigned_url(
                "get_object", Params=location.params(), ExpiresIn=self._ttl
            )
        except (ClientError, BotoCoreError) as exc:
            raise map_error(exc, location) from None
        name = pick_name(
            spec, _disposition_name(head.get("ContentDisposition")), location.key.rsplit("/", 1)[-1]
        )
        return SourceFacts(
            fetch_url=url,
            file_name=name,
            content_type=pick_type(spec, head.get("ContentType"), name),
            size=head.get("ContentLength"),
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
