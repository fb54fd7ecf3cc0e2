"""In-process retries: jittered exponential backoff via stamina."""

from __future__ import annotations

import calendar
import email.utils
import math
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import stamina

from service.errors import RetryableError

ATTEMPTS = 3
WAIT_INITIAL = 0.5
MAX_RETRY_AFTER = 30.0
T = TypeVar("T")
_SECONDS = re.compile(r"[0-9]+")
_MILLIS = re.compile(r"[0-9]+(?:\.[0-9]+)?")
_ASCTIME = re.compile(r"[A-Z][a-z]{2} [A-Z][a-z]{2} [ 0-9][0-9] [0-9]{2}(?::[0-9]{2}){2} [0-9]{4}")


def parse_retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``Retry-After`` (seconds or HTTP date).

    Only what RFC 9110 allows counts: ASCII digits, or an HTTP-date, which is
    always GMT. Anything else is ignored (None), never an exception.
    """
    millis = headers.get("retry-after-ms")
    if millis and _MILLIS.fullmatch(millis.strip()):
        wait = float(millis) / 1000
        if math.isfinite(wait):
            return wait
    value = headers.get("Retry-After")
    if not value:
        return None
    value = value.strip()
    if _SECONDS.fullmatch(value):
        seconds = float(value)
        return seconds if math.isfinite(seconds) else None
    when = _http_date(value)
    return None if when is None else max(0.0, when - time.time())


def _http_date(value: str) -> float | None:
    """The POSIX time of an HTTP-date (IMF-fixdate, RFC 850 or asctime form), else None."""
    # IMF-fixdate and the RFC 850 form end in "GMT"; asctime names no zone but is GMT too.
    if not (value.endswith(" GMT") or _ASCTIME.fullmatch(value)):
        return None
    parsed = email.utils.parsedate_tz(value)
    if parsed is None:
        return None
    try:
        return float(calendar.timegm(parsed[:6]))
    except (OverflowError, ValueError):
        return None


def backoff(exc: Exception) -> bool | float:
    """stamina's hook: retry retryable errors, waiting what the server asked (up to 30 s).

    A longer ``Retry-After`` ends the in-process retries, so the delay tiers take over.
    """
    if not isinstance(exc, RetryableError):
        return False
    if exc.retry_after is None:
        return True
    return exc.retry_after if exc.retry_after <= MAX_RETRY_AFTER else False


async def retried(call: Callable[[], Awaitable[T]]) -> T:
    """``await call()``, with transient failures retried in-process.

    The first try runs bare; stamina's retry context is entered only once it has
    failed, with that failure re-raised as its first attempt's, so the waits and
    ``Retry-After`` handling are stamina's own. Building the context for every
    call was a visible share of the happy path's CPU (``make bench`` with ``--profile``).
    """
    try:
        return await call()
    except RetryableError as exc:
        if backoff(exc) is False:
            raise
        failed: RetryableError | None = exc
    async for attempt in _retry_context():
        with attempt:
            if failed is not None:
                error, failed = failed, None
                raise error
            return await call()
    raise AssertionError("unreachable")  # pragma: no cover - stamina re-raises the last error


def _retry_context() -> Any:
    """A ``stamina.retry_context`` for one attempt's transient failures."""
    return stamina.retry_context(
        on=backoff,
        attempts=ATTEMPTS,
        timeout=None,
        wait_initial=WAIT_INITIAL,
        wait_exp_base=2,
        wait_max=8.0,
        wait_jitter=WAIT_INITIAL,
    )
