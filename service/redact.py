"""Keeping secrets out of logs and events: one place for URL redaction and masking."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

MASK = "***"
# Query parameters that carry credentials in presigned or signed URLs.
_SECRET_QUERY = re.compile(
    r"(?i)\b(X-Amz-(?:Signature|Credential|Security-Token)|Signature|AWSAccessKeyId|"
    r"x-goog-signature|x-goog-credential|sig|token|access_token|api_key|apikey|key)=([^&\s\"']+)"
)
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/@\s\"'<>]+@")
# A password holding '/', '?' or '#' (unencoded): "user:pa/ss@host". May over-mask a path
# with an '@' after a port ("host:8080/@me"), which errs on the safe side.
_USERINFO_ODD = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/@\s\"'<>:]*:[^@\s\"'<>]*@")
# User-info without a scheme, as a name such as an S3 bucket "user:pw@bucket" shows it.
_USERINFO_BARE = re.compile(r"(?<![\w.+/:@-])[^\s/@\"'<>:=]+:[^\s/@\"'<>]+@(?=[\w\[])")


def redact_url(url: str) -> str:
    """The URL without user-info and without its query (an s3 URL keeps ``versionId``)."""
    try:
        parts = urlsplit(url)
        # A "port" that is no number is user-info whose password holds '/', '?' or '#':
        # the rest of it would show in the host, path or fragment.
        _ = parts.port
    except ValueError:
        return "<unparseable URL>"
    netloc = parts.netloc.rsplit("@", 1)[-1]
    query = ""
    if parts.scheme.lower() == "s3" and parts.query:
        kept = [(k, v) for k, v in parse_qsl(parts.query) if k == "versionId"]
        query = urlencode(kept)
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def mask_text(text: str, secrets: Iterable[str] = ()) -> str:
    """Mask known secret values, URL user-info and signed-URL parameters in free text."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, MASK)
    text = _USERINFO_ODD.sub(lambda m: m.group(1) + MASK + "@", text)
    text = _USERINFO.sub(lambda m: m.group(1) + MASK + "@", text)
    text = _USERINFO_BARE.sub(MASK + "@", text)
    return _SECRET_QUERY.sub(lambda m: f"{m.group(1)}={MASK}", text)


class SecretFilter(logging.Filter):
    """A logging filter that masks secrets in every record's message and arguments."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        # Longest first, so a secret containing another is masked whole.
        self.secrets = tuple(sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True))

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = mask_text(message, self.secrets)
        if masked != message:
            record.msg, record.args = masked, None
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = mask_text(
                logging.Formatter().formatException(record.exc_info), self.secrets
            )
            record.exc_info = None
        for key, value in list(record.__dict__.items()):
            if key not in _STANDARD_ATTRS and isinstance(value, str):
                setattr(record, key, mask_text(value, self.secrets))
        return True


_STANDARD_ATTRS = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
}
