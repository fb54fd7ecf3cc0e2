"""Reading Retry-After and retry-after-ms."""

from __future__ import annotations

import calendar
import email.utils
import time

import pytest

from service.retry import parse_retry_after


@pytest.mark.parametrize(
    "value", ["\u00b2", "\u0663", "1\u00b2", "+5", "-5", "5.5", "1e3", " ", "soon"]
)
def test_retry_after_seconds_are_ascii_digits_only(value: str) -> None:
    """Anything but ASCII digits (or an HTTP-date) is ignored, never an exception."""
    assert parse_retry_after({"Retry-After": value}) is None


@pytest.mark.parametrize("value", ["²", "nan", "inf", "-inf", "1e999", "\u0661\u0665\u0660\u0660"])
def test_retry_after_ms_must_be_a_finite_ascii_number(value: str) -> None:
    """A retry-after-ms that is no finite ASCII number falls back to Retry-After."""
    assert parse_retry_after({"retry-after-ms": value, "Retry-After": "4"}) == 4.0


def _in(seconds: int) -> time.struct_time:
    return time.gmtime(time.time() + seconds)


@pytest.mark.parametrize(
    "layout",
    [
        "%a, %d %b %Y %H:%M:%S GMT",  # IMF-fixdate
        "%A, %d-%b-%y %H:%M:%S GMT",  # the obsolete RFC 850 form
        "%a %b %d %H:%M:%S %Y",  # the obsolete asctime form: GMT although it names no zone
    ],
)
def test_retry_after_http_dates_are_gmt(layout: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """All three HTTP-date forms are GMT, whatever the local time zone."""
    monkeypatch.setenv("TZ", "America/Los_Angeles")
    time.tzset()
    try:
        value = time.strftime(layout, _in(120))
        wait = parse_retry_after({"Retry-After": value})
    finally:
        monkeypatch.undo()
        time.tzset()
    assert wait is not None
    assert 110 <= wait <= 121


@pytest.mark.parametrize("zone", ["+0200", "EST", "-0000", ""])
def test_retry_after_date_outside_gmt_is_ignored(zone: str) -> None:
    """RFC 9110's HTTP-date is always GMT: a date naming another zone is not one."""
    when = calendar.timegm(_in(120))
    # An IMF-fixdate with another zone, or with none: no HTTP-date form looks like that.
    value = email.utils.formatdate(when, usegmt=True).replace(" GMT", f" {zone}".rstrip())
    assert parse_retry_after({"Retry-After": value}) is None
