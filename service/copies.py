"""The headers of every copy Courier makes of a delivery, in one place.

A copy carries the producer's headers and Courier's bookkeeping over, never the
broker's delivery count (a new copy has not been delivered yet); the decisions of
:mod:`service.settle` add their own marks (:func:`next_copy`).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from service.errors import CourierError
from service.messages import Envelope, crashes
from service.topology import (
    ATTEMPTS_HEADER,
    BROKER_HEADERS,
    COPY_ID_HEADER,
    COURIER_HEADER_PREFIX,
    DELIVERY_COUNT_HEADER,
    ERROR_CODE_HEADER,
    ERROR_MESSAGE_HEADER,
    FAILED_AT_HEADER,
    HELD_SINCE_HEADER,
    REDELIVERIES_HEADER,
    TENANT_HEADER,
)

MAX_HEADER_MESSAGE = 1000  # a dead letter's x-courier-error-message, in characters
_OWN_MARKS = (DELIVERY_COUNT_HEADER, HELD_SINCE_HEADER)  # a copy's own, never carried over


def next_copy(original: Mapping[str, Any] | None, written: Mapping[str, Any]) -> dict[str, Any]:
    """A delay tier's copy: the original's headers, less the marks of the delivery's own
    copy (its delivery count, since when it was held), plus ``written``."""
    kept = {k: v for k, v in (original or {}).items() if k not in _OWN_MARKS}
    return kept | dict(written)


def carried_headers(original: Mapping[str, Any] | None) -> dict[str, Any]:
    """A copy's headers, carried over from the delivery, less the broker's delivery count
    (a new copy has not been delivered yet)."""
    return {k: v for k, v in (original or {}).items() if k != DELIVERY_COUNT_HEADER}


def give_back_headers(original: Mapping[str, Any] | None, envelope: Envelope) -> dict[str, Any]:
    """Headers of a fresh copy handing unfinished work back (a shutdown ran out of time).

    Same attempt; the crashes counted so far carried over, this return not among them.
    """
    return carried_headers(original) | {
        REDELIVERIES_HEADER: envelope.redeliveries,
        COPY_ID_HEADER: str(uuid.uuid4()),
    }


def moved_headers(original: Mapping[str, Any] | None, tenant: str) -> dict[str, Any]:
    """A request moved into its tenant's queue: untouched, but for whose it is and the
    crashes counted so far (the broker's count of this copy is not carried over)."""
    headers = carried_headers(original) | {TENANT_HEADER: tenant}
    if counted := crashes(original or {}):
        headers[REDELIVERIES_HEADER] = counted
    return headers


def beacon_headers(original: Mapping[str, Any] | None) -> dict[str, Any]:
    """A beacon parked for another round: a fresh copy."""
    return carried_headers(original) | {COPY_ID_HEADER: str(uuid.uuid4())}


def replay_headers(original: Mapping[str, Any]) -> dict[str, Any]:
    """A replayed dead letter's headers: the producer's own, without Courier's and the
    broker's bookkeeping (so its attempt count starts again)."""
    return {
        k: v
        for k, v in original.items()
        if not k.startswith(COURIER_HEADER_PREFIX) and not k.startswith(BROKER_HEADERS)
    }


def failure_headers(
    original: Mapping[str, Any] | None, error: CourierError, attempts: int, now: datetime
) -> dict[str, Any]:
    """A dead letter's headers: the request's own, plus why and when it failed."""
    return carried_headers(original) | {
        ERROR_CODE_HEADER: error.code.value,
        ERROR_MESSAGE_HEADER: error.message[:MAX_HEADER_MESSAGE],
        ATTEMPTS_HEADER: attempts,
        FAILED_AT_HEADER: now.isoformat(timespec="milliseconds"),
    }
