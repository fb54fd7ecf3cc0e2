"""The URL rules of the contract: what an http(s) or s3 URL must be before any I/O."""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import unquote

from yarl import URL

# A DNS name's label (RFC 1123, with `_` as some real hosts use it); IDNA already applied.
_LABEL = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)", re.IGNORECASE)
# S3's bucket rules, widened to the legacy us-east-1 names (upper case, `_`, up to 255
# characters) that botocore still accepts; anything else botocore refuses before a call.
_BUCKET = re.compile(r"[A-Za-z0-9._-]{3,255}")
_VERSION_QUERY = re.compile(r"versionId=([^&=]+)")
MAX_S3_KEY_BYTES = 1024


def scheme_of(url: str) -> str:
    """The URL's scheme in lower case ('' when there is none)."""
    return url.split(":", 1)[0].lower() if ":" in url else ""


def _valid_host(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
        return True
    except ValueError:
        pass
    name = host[:-1] if host.endswith(".") else host
    return 0 < len(name) <= 253 and all(_LABEL.fullmatch(label) for label in name.split("."))


def check_http_url(url: str) -> URL:
    """The URL as aiohttp will use it; ValueError when no fetch could (bad port or host).

    The message never repeats the URL: it may hold user-info.
    """
    try:
        parsed = URL(url)
        host, port = parsed.raw_host, parsed.port
        _ = parsed.host  # decodes IDNA ("xn--zz" cannot be decoded)
    except ValueError:  # yarl: port out of range, broken IPv6 brackets, bad IDNA
        raise ValueError("not a usable URL (its host or port cannot be parsed)") from None
    if parsed.scheme not in ("http", "https"):
        raise ValueError("not an http(s) URL")
    if not host:
        raise ValueError("the URL has no host")
    if port is None or not 0 < port < 65536:
        raise ValueError("the URL's port must be 1-65535")
    if not _valid_host(host):
        raise ValueError("the URL's host is neither a host name nor an IP address")
    return parsed


def parse_s3_url(url: str) -> tuple[str, str, str | None]:
    """Bucket, key and versionId of ``s3://bucket/key[?versionId=v]``.

    The key is everything after the ``/`` that ends the bucket, percent-decoded
    (so ``s3://b//k`` names the key ``/k``). ValueError for a raw ``#``, any
    query other than ``?versionId=``, or a bucket name S3 cannot have; the
    message never repeats the URL.
    """
    scheme, sep, rest = url.partition("://")
    if scheme.lower() != "s3" or not sep:
        raise ValueError("an s3 URL is s3://bucket/key")
    if "#" in rest:
        raise ValueError("an s3 URL may not contain a raw '#' (write %23 in a key)")
    bucket, slash, tail = rest.partition("/")
    path, question, query = tail.partition("?")
    if not slash or not path:
        raise ValueError("an s3 URL needs a bucket and a key: s3://bucket/key")
    if not _BUCKET.fullmatch(bucket):
        raise ValueError("the s3 URL's bucket is not a valid bucket name")
    version: str | None = None
    try:
        key = unquote(path, errors="strict")
        if question:
            match = _VERSION_QUERY.fullmatch(query)
            if match is None:
                raise ValueError("the only query an s3 URL takes is ?versionId=... (write %3F)")
            version = unquote(match.group(1), errors="strict")
    except UnicodeDecodeError:
        raise ValueError("the s3 URL's percent-encoding is not UTF-8") from None
    if len(key.encode()) > MAX_S3_KEY_BYTES:
        raise ValueError(f"an S3 key has at most {MAX_S3_KEY_BYTES} bytes")
    return bucket, key, version
