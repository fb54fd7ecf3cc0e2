"""The settle decision: what becomes of a delivery once its attempt has ended.

One pure function, :func:`decide`, maps an attempt's :class:`Outcome` and the
facts of the delivery to one :class:`Decision` (CONTRACT section 4 and 7):

- ``Finish``: publish the terminal event (and, for a failure, the dead letter);
- ``Retry``: republish to a delay tier with the next attempt number;
- ``Hold``: park in a delay tier without spending an attempt (a sick destination).

The consumer carries the decision out and is the only code that acks; nothing
here knows about AMQP connections, so every branch is tested without a broker.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from service.amqp.topology import (
    ATTEMPT_HEADER,
    ATTEMPTS_HEADER,
    COPY_ID_HEADER,
    DELIVERY_COUNT_HEADER,
    ERROR_CODE_HEADER,
    ERROR_MESSAGE_HEADER,
    FAILED_AT_HEADER,
    HELD_SINCE_HEADER,
    REDELIVERIES_HEADER,
)
from service.config import Settings
from service.errors import CourierError, ErrorCode, PermanentError, RetryableError
from service.pipeline import Outcome
from service.redact import mask_text

MAX_HEADER_MESSAGE = 1000


@dataclass(frozen=True, slots=True)
class Policy:
    """The knobs of CONTRACT sections 4 and 7 that the decision reads."""

    max_attempts: int
    delays: tuple[int, ...]
    max_redeliveries: int
    hold_max: float = 3600.0
    secrets: tuple[str, ...] = ()

    @classmethod
    def from_settings(cls, settings: Settings, delays: tuple[int, ...]) -> Policy:
        """The policy the settings configure, with the delay tiers in use."""
        return cls(
            max_attempts=settings.max_attempts,
            delays=delays,
            max_redeliveries=settings.max_redeliveries,
            hold_max=settings.hold_max,
            secrets=tuple(settings.secret_values()),
        )


@dataclass(frozen=True, slots=True)
class DeliveryFacts:
    """What the delivery itself tells (its headers), read by :func:`delivery_facts`."""

    attempt: int  # the attempt this copy runs: 1 for a producer's message
    redeliveries: int  # times this request crashed or stalled a consumer so far
    held_since: datetime | None = None  # when it was first held, while it is being held
    copy_id: str | None = None


@dataclass(frozen=True, slots=True)
class Finish:
    """Publish the terminal event; for a failure also the dead letter; then ack."""

    outcome: Outcome  # with secrets masked
    attempts: int  # ``data.attempts``: real tries only

    @property
    def failed(self) -> bool:
        """Whether the request failed (and so is dead-lettered)."""
        return self.outcome.error is not None

    def dead_letter_headers(self, now: datetime) -> dict[str, Any]:
        """The ``x-courier-*`` headers a dead letter carries."""
        error = self.outcome.error
        assert error is not None  # noqa: S101 - only called for failures
        return {
            ERROR_CODE_HEADER: error.code.value,
            ERROR_MESSAGE_HEADER: error.message[:MAX_HEADER_MESSAGE],
            ATTEMPTS_HEADER: self.attempts,
            FAILED_AT_HEADER: now.isoformat(timespec="milliseconds"),
        }


@dataclass(frozen=True, slots=True)
class Republish:
    """Copy the message to the delay tier of ``delay`` seconds with ``headers`` set; then ack."""

    delay: int
    headers: Mapping[str, Any]
    error: CourierError  # why: the failure retried, or the hold's reason

    def copy_headers(self, original: Mapping[str, Any] | None) -> dict[str, Any]:
        """The copy's headers: the original's, without the broker's count, plus ours."""
        kept = {
            k: v
            for k, v in (original or {}).items()
            if k not in (DELIVERY_COUNT_HEADER, HELD_SINCE_HEADER)
        }
        return kept | dict(self.headers)


class Retry(Republish):
    """A retryable failure with attempts left: the next attempt after ``delay``."""


class Hold(Republish):
    """A destination that cannot take the request now: the same attempt after ``delay``."""


Decision = Finish | Retry | Hold


def delivery_facts(
    headers: Mapping[str, Any] | None, *, attempt: int, delivery_count: int
) -> DeliveryFacts:
    """Read the facts from a delivery's headers (odd values count as absent).

    ``delivery_count`` is the broker's ``x-delivery-count``: returns of this copy
    that the broker counted. Courier never returns a delivery itself (a graceful
    give-back is a fresh copy carrying ``x-courier-redeliveries``), so on every
    RabbitMQ version each counted return is a crash, a lost connection or a
    stall; the copies' counts are carried over in ``x-courier-redeliveries``.
    """
    headers = headers or {}
    return DeliveryFacts(
        attempt=attempt,
        redeliveries=_int(headers.get(REDELIVERIES_HEADER)) + max(delivery_count, 0),
        held_since=_time(headers.get(HELD_SINCE_HEADER)),
        copy_id=_text(headers.get(COPY_ID_HEADER)),
    )


def poisoned(facts: DeliveryFacts, policy: Policy) -> CourierError | None:
    """``poison_message`` when the request has crashed consumers too often, else None."""
    if facts.redeliveries < policy.max_redeliveries:
        return None
    return PermanentError(
        ErrorCode.POISON_MESSAGE,
        f"the message was delivered {facts.redeliveries} times without being settled; "
        "it crashes or stalls the consumer",
    )


def pick_delay(delays: tuple[int, ...], attempt: int, retry_after: float | None) -> int:
    """The delay tier after ``attempt`` failed: one tier per attempt, or the first
    tier at least as long as the server's ``Retry-After``."""
    delay = delays[min(attempt - 1, len(delays) - 1)]
    if retry_after is not None and retry_after > delay:
        delay = next((d for d in delays if d >= retry_after), delays[-1])
    return delay


def nearest_delay(delays: tuple[int, ...], seconds: float) -> int:
    """The tier whose delay is nearest to ``seconds`` (the shorter one on a tie)."""
    return min(delays, key=lambda d: (abs(d - seconds), d))


def decide(
    outcome: Outcome, facts: DeliveryFacts, policy: Policy, *, now: datetime | None = None
) -> Decision:
    """The one decision for a delivery whose attempt ended in ``outcome``."""
    now = now or datetime.now(UTC)
    outcome = _masked(outcome, policy.secrets)
    error = outcome.error
    held = outcome.held
    if held is not None and not held.tried:
        held_since = facts.held_since or now
        held_for = (now - held_since).total_seconds()
        if held_for >= policy.hold_max:
            return Finish(
                dataclasses.replace(
                    outcome,
                    held=None,
                    error=RetryableError(
                        ErrorCode.DESTINATION_UNAVAILABLE,
                        f"{outcome.destination or 'the destination'} was unavailable; the request "
                        f"was held for {_duration(held_for)} (COURIER_HOLD_MAX): {held.reason}",
                    ),
                ),
                attempts=facts.attempt - 1,
            )
        wait = min(held.seconds, policy.hold_max - held_for)
        return Hold(
            delay=nearest_delay(policy.delays, wait),
            headers=_copy_headers(facts.attempt, facts)
            | {HELD_SINCE_HEADER: held_since.isoformat(timespec="milliseconds")},
            error=RetryableError(ErrorCode.DESTINATION_UNAVAILABLE, held.reason),
        )
    if held is not None:
        # Tried and then held (the breaker opened meanwhile): a real, failed try.
        error = RetryableError(
            ErrorCode.DESTINATION_UNAVAILABLE, held.reason, retry_after=held.seconds
        )
        outcome = dataclasses.replace(outcome, held=None, error=error)
    if error is not None and error.retryable and facts.attempt < policy.max_attempts:
        return Retry(
            delay=pick_delay(policy.delays, facts.attempt, error.retry_after),
            headers=_copy_headers(facts.attempt + 1, facts),
            error=error,
        )
    return Finish(outcome, attempts=facts.attempt)


def give_back_headers(facts: DeliveryFacts) -> dict[str, Any]:
    """Headers of a fresh copy handing unfinished work back (a shutdown ran out of time).

    Same attempt; the crashes counted so far carried over, this return not among them.
    """
    return {REDELIVERIES_HEADER: facts.redeliveries, COPY_ID_HEADER: str(uuid.uuid4())}


def _copy_headers(attempt: int, facts: DeliveryFacts) -> dict[str, Any]:
    return {
        ATTEMPT_HEADER: attempt,
        REDELIVERIES_HEADER: facts.redeliveries,
        COPY_ID_HEADER: str(uuid.uuid4()),
    }


def _masked(outcome: Outcome, secrets: tuple[str, ...]) -> Outcome:
    """The outcome with secrets masked in its error message (an API may echo them)."""
    error = outcome.error
    if error is None:
        return outcome
    masked = mask_text(error.message, secrets)
    if masked == error.message:
        return outcome
    copy = type(error)(
        error.code, masked, http_status=error.http_status, retry_after=error.retry_after
    )
    return dataclasses.replace(outcome, error=copy)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _int(value: Any) -> int:
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return max(value, 0)
    if isinstance(value, bytes | str):
        try:
            return max(int(value), 0)
        except ValueError:
            return 0
    return 0


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return value if isinstance(value, str) and value else None


def _time(value: Any) -> datetime | None:
    text = _text(value)
    if text is None:
        return None
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)
