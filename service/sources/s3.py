"""S3 sources on aiobotocore: streamed GetObject, presigned HEAD and presigned GET URLs.

One client for the process, created at start-up from the standard AWS chain
(environment, web identity for IRSA, instance profile; ``AWS_ENDPOINT_URL_S3``).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import re
import urllib.request
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp import hdrs
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    NoCredentialsError,
)
from multidict import CIMultiDictProxy

from service.contracts import MINDSET_MAX_HASH, MINDSET_MAX_URL, SourceSpec
from service.errors import ErrorCode, PermanentError
from service.redact import redact_url
from service.retry import parse_retry_after, retried
from service.sources.base import (
    CHUNK_SIZE,
    FetchedFile,
    SizeLimit,
    SourceFacts,
    pick_name,
    pick_type,
    spool,
)
from service.sources.s3_errors import S3Location, answer_error, map_error

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

_REGION = re.compile(r"[a-z0-9-]{1,50}")
# presign_report(): a bucket name of usual length, and the least room a URL should leave
# for bucket and key within Mindset's sourceUrl limit.
_PROBE_BUCKET = "example-bucket-name"
_MIN_NAME_ROOM = 300
_MAX_KNOWN_REGIONS = 4096

log = logging.getLogger(__name__)

# The HEAD's URL is used at once: a short validity keeps a leaked one worthless.
_HEAD_URL_TTL = 60


@functools.lru_cache(maxsize=256)
def env_proxy(scheme: str, host: str) -> str | None:
    """The proxy the environment names for ``scheme://host`` (``HTTPS_PROXY``, ``NO_PROXY``).

    As botocore reads it for its own calls; looked up once per host, where
    aiohttp's ``trust_env`` would read the environment (and netrc) on every request.
    """
    if urllib.request.proxy_bypass(host):
        return None
    return urllib.request.getproxies().get(scheme)


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
        self._ttl_capped_said = False
        self._tmp_dir = tmp_dir
        # Buckets found in another region than the client's, by presigned HEADs.
        self._regions: dict[str, str] = {}
        client.meta.events.register("before-parameter-build.s3", self._sign_for_region)
        client.meta.events.register("before-endpoint-resolution.s3", self._route_to_region)

    def _sign_for_region(self, params: dict[str, Any], context: dict[str, Any], **_: Any) -> None:
        # A presigned URL is signed for the client's region unless the context names another.
        region = self._regions.get(params.get("Bucket", ""))
        if region is not None:
            context.setdefault("signing", {})["region"] = region

    def _route_to_region(self, builtins: dict[str, Any], params: dict[str, Any], **_: Any) -> None:
        # ... and addressed to the client's region's endpoint unless the builtin says otherwise.
        region = self._regions.get(params.get("Bucket", ""))
        if region is not None:
            builtins["AWS::Region"] = region

    def check(self, spec: SourceSpec) -> None:
        """Refuse a bucket outside ``COURIER_S3_ALLOWED_BUCKETS`` before any S3 call."""
        location = S3Location.parse(spec.url)
        if self._allowed and location.bucket not in self._allowed:
            raise PermanentError(
                ErrorCode.SOURCE_BLOCKED,
                f"the bucket of {redact_url(spec.url)} is not in COURIER_S3_ALLOWED_BUCKETS",
            )

    async def fetch(self, spec: SourceSpec, limit: SizeLimit) -> FetchedFile:
        """Stream the object in (to a temporary file past a size), capped at ``limit``."""
        location = S3Location.parse(spec.url)
        return await retried(lambda: self._download(spec, location, limit))

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
        except (BotoCoreError, aiohttp.ClientError, OSError, TimeoutError) as exc:
            # aiohttp's ClientPayloadError (the connection lost mid-body) is no OSError.
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
        for _ in range(2):
            headers, status = await self._head_once(location)
            if status < 300:
                return headers
            region = headers.get("x-amz-bucket-region")
            if not self._learn_region(location.bucket, region):
                break
        raise answer_error(
            location,
            headers.get("x-amz-error-code", ""),
            status,
            parse_retry_after(headers),
            region=region,
        )

    async def _head_once(self, location: S3Location) -> tuple[CIMultiDictProxy[str], int]:
        url = await self._presign("head_object", location, _HEAD_URL_TTL)
        parts = urlsplit(url)
        try:
            async with self._http.head(
                url, allow_redirects=False, proxy=env_proxy(parts.scheme, parts.hostname or "")
            ) as response:
                return response.headers, response.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise map_error(exc, location) from None

    def _learn_region(self, bucket: str, region: str | None) -> bool:
        """Remember that ``bucket`` lives in ``region``; False when that is nothing new.

        S3 names the bucket's region on a request signed for the wrong one (a
        301, or a 400 for a HEAD); presigning for it is what botocore's own
        region redirector does for the client's calls.
        """
        current = self._regions.get(bucket, self._client.meta.region_name)
        if region is None or region == current or not _REGION.fullmatch(region):
            return False
        if len(self._regions) >= _MAX_KNOWN_REGIONS:
            self._regions.clear()
        self._regions[bucket] = region
        log.info("bucket %s is in region %s: presigning for it", bucket, region)
        return True

    async def _credentials_left(self) -> float | None:
        """Seconds until the signing credentials expire; None when they do not expire.

        Temporary credentials (IRSA, an assumed role, SSO) are refreshed first when
        due, as signing would: what is left is what the next URL gets.
        """
        # botocore's accessor for the client's credentials, and RefreshableCredentials'
        # expiry, are private: anything unexpected counts as "does not expire".
        get = getattr(self._client, "_get_credentials", None)
        credentials = get() if callable(get) else None
        if credentials is None:
            return None
        refresh = getattr(credentials, "get_frozen_credentials", None)
        if refresh is not None:
            await refresh()
        expiry = getattr(credentials, "_expiry_time", None)
        if not isinstance(expiry, datetime):
            return None
        return (expiry - datetime.now(UTC)).total_seconds()

    async def _presign_ttl(self) -> int:
        """``COURIER_PRESIGN_TTL``, capped at what the credentials have left (said once)."""
        left = await self._credentials_left()
        if left is None or left >= self._ttl:
            return self._ttl
        if not self._ttl_capped_said:
            self._ttl_capped_said = True
            log.warning("%s", _ttl_capped(self._ttl, left))
        return max(1, int(left))

    async def presign_report(self) -> str | None:
        """What keeps presigned URLs from working as configured; None when nothing does.

        For start-up and ``courier doctor``: credentials that expire before
        ``COURIER_PRESIGN_TTL``, and presigned URLs (a session token makes them
        long) leaving too little of Mindset's 2048 characters for bucket and key.
        None also without credentials: there is nothing to presign with.
        """
        bucket = min(self._allowed, default=_PROBE_BUCKET)
        try:
            left = await self._credentials_left()
            probe = await self._client.generate_presigned_url(
                "get_object", Params={"Bucket": bucket, "Key": "k"}, ExpiresIn=self._ttl
            )
        except NoCredentialsError:
            return None
        except (ClientError, BotoCoreError) as exc:
            return f"presigning an S3 URL failed ({type(exc).__name__})"
        problems = []
        if left is not None and left < self._ttl:
            problems.append(_ttl_capped(self._ttl, left))
        room = MINDSET_MAX_URL - (len(probe) - len(bucket) - 1)
        if room < _MIN_NAME_ROOM:
            problems.append(
                f"a presigned S3 URL leaves {room} of Mindset's {MINDSET_MAX_URL} sourceUrl"
                " characters for bucket and key (the session token of temporary credentials"
                " makes it long): Mindset sourceUrl deliveries of S3 objects with longer names"
                " fail as destination_rejected"
            )
        return "; ".join(problems) or None

    async def describe(self, spec: SourceSpec) -> SourceFacts:
        """HEAD the object, then a presigned GET URL valid for ``COURIER_PRESIGN_TTL``.

        At most as long as the signing credentials live: a URL outliving them
        would be refused by S3 anyway.
        """
        location = S3Location.parse(spec.url)
        head = await retried(lambda: self._head(location))
        url = await self._presign("get_object", location, await self._presign_ttl())
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
            content_tag=content_tag(head),
        )


def content_tag(head: CIMultiDictProxy[str]) -> str | None:
    """What changes with the object's content, from its HEAD: ``s3-version:<id>`` in a
    versioned bucket, else ``s3-etag:<etag>``; hashed when longer than Mindset's
    ``contentHash`` takes (:data:`MINDSET_MAX_HASH`)."""
    version = head.get("x-amz-version-id")
    etag = (head.get(hdrs.ETAG) or "").strip('"')
    if version and version != "null":  # "null": the version of an unversioned write
        tag = f"s3-version:{version}"
    elif etag:
        tag = f"s3-etag:{etag}"
    else:
        return None
    if len(tag) > MINDSET_MAX_HASH:
        tag = f"s3-tag-sha256:{hashlib.sha256(tag.encode()).hexdigest()}"
    return tag


def _ttl_capped(ttl: float, left: float) -> str:
    return (
        f"COURIER_PRESIGN_TTL is {_duration(ttl)} but the AWS credentials expire in"
        f" {_duration(left)}: presigned URLs are valid no longer than the credentials"
        " (temporary credentials, such as IRSA's, live about an hour); Mindset must"
        " fetch within that time"
    )


def _duration(seconds: float) -> str:
    """``43200`` -> ``12h``, ``3540`` -> ``59m``, ``5400`` -> ``1h30m``."""
    whole = max(0, int(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m" if minutes else f"{hours}h"
    return f"{minutes}m" if minutes else f"{secs}s"


def _disposition_name(value: str | None) -> str | None:
    if not value:
        return None
    from email.message import Message

    message = Message()
    message["Content-Disposition"] = value
    name = message.get_filename()
    return str(name) if name else None
