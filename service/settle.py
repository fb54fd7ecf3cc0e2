"""The settle decision: what becomes of a delivery once its attempt has ended.

One pure function, :func:`decide`, maps an attempt's :class:`Outcome` and the
delivery's :class:`Envelope` to one :class:`Decision`:

- ``Finish``: publish the terminal event (and, for a failure, the dead letter);
- ``Retry``: republish to a delay tier with the next attempt number;
- ``Park``: republish to a delay tier at the same attempt (a destination that cannot
  take the request now: an open breaker, a rate limit);
- ``Follow``: park a copy that reads the uploaded file's state after a delay (after a
  fresh upload, its terminal event goes first);
- ``Ingested``: the file's state is final: publish the ingestion event.

A delivery that follows a file (:func:`decide_follow`) never spends an attempt, and
one whose next read is not due yet goes round the delay tiers unread (:func:`not_due`).

Each decision also names the headers its copies carry (the other copies Courier
makes of a delivery are in :mod:`service.copies`). :mod:`service.amqp.settler`
carries decisions out and is the only code that acks; nothing here talks to a
broker, so every branch is tested without one.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from service.config import Settings
from service.copies import failure_headers, next_copy
from service.errors import CourierError, ErrorCode, PermanentError, RetryableError
from service.messages import Envelope
from service.outcome import Ingestion, Outcome, PlatformFile
from service.topology import (
    ATTEMPT_HEADER,
    CHECKS_HEADER,
    COPY_ID_HEADER,
    FOLLOW_SINCE_HEADER,
    HELD_SINCE_HEADER,
    READ_AT_HEADER,
    REDELIVERIES_HEADER,
)

# Between reads of a file's state, after 0, 1, 2, ... reads, at most the longest delay
# tier. A wait no tier has is made of rounds through them, unread until the read is due.
FOLLOW_BACKOFF = (5, 15, 60, 300, 900)


@dataclass(frozen=True, slots=True)
class Policy:
    """The retry, redelivery and hold limits the decision reads."""

    max_attempts: int
    delays: tuple[int, ...]
    max_redeliveries: int
    hold_max: float = 3600.0
    track_ingestion: bool = True
    ingestion_timeout: float = 6 * 3600.0

    @classmethod
    def from_settings(cls, settings: Settings, delays: tuple[int, ...]) -> Policy:
        """The policy the settings configure, with the delay tiers in use."""
        return cls(
            max_attempts=settings.max_attempts,
            delays=delays,
            max_redeliveries=settings.max_redeliveries,
            hold_max=settings.hold_max,
            track_ingestion=settings.track_ingestion,
            ingestion_timeout=settings.ingestion_timeout,
        )


@dataclass(frozen=True, slots=True)
class Finish:
    """Publish the terminal event; for a failure also the dead letter; then ack."""

    outcome: Outcome
    attempts: int  # ``data.attempts``: real tries only
    ingestion: Ingestion | None = None  # already final at the upload: its event goes next

    @property
    def failed(self) -> bool:
        """Whether the request failed (and so is dead-lettered)."""
        return self.outcome.error is not None

    def dead_letter_headers(
        self, original: Mapping[str, Any] | None, now: datetime
    ) -> dict[str, Any]:
        """The dead letter's headers: the request's own, plus why and when it failed."""
        error = self.outcome.error
        assert error is not None  # noqa: S101 - only called for failures
        return failure_headers(original, error, self.attempts, now)


@dataclass(frozen=True, slots=True)
class Republish:
    """Copy the message to the delay tier of ``delay`` seconds, writing ``written``; then ack."""

    delay: int
    written: Mapping[str, Any]
    error: CourierError  # why: the failure retried, or the reason it is parked

    def headers(self, original: Mapping[str, Any] | None) -> dict[str, Any]:
        """The copy's headers: the original's, less the marks of its own copy, plus ours."""
        return next_copy(original, self.written)


class Retry(Republish):
    """A retryable failure with attempts left: the next attempt after ``delay``."""


class Park(Republish):
    """A destination that cannot take the request now: the same attempt after ``delay``."""


@dataclass(frozen=True, slots=True)
class Follow:
    """Copy the message to the delay tier of ``delay`` seconds to read its file's state
    then, writing ``written``; after a fresh upload, ``upload``'s event goes first."""

    delay: int
    written: Mapping[str, Any]
    upload: Finish | None = None

    def headers(self, original: Mapping[str, Any] | None) -> dict[str, Any]:
        """The copy's headers: the original's, less the marks of its own copy, plus ours."""
        return next_copy(original, self.written)


@dataclass(frozen=True, slots=True)
class Ingested:
    """The followed file's state is final: publish its ingestion event (None: publish
    nothing, ingestion is no longer followed). ``dead_letter_attempts`` set: the
    following itself failed, and the copy goes to the dead letters too, after the
    upload's attempts."""

    ingestion: Ingestion | None
    dead_letter_attempts: int | None = None

    @property
    def dead_lettered(self) -> CourierError | None:
        """The error the copy is dead-lettered for; None when it is not."""
        if self.dead_letter_attempts is None or self.ingestion is None:
            return None
        return self.ingestion.error

    def dead_letter_headers(
        self, original: Mapping[str, Any] | None, now: datetime
    ) -> dict[str, Any] | None:
        """The dead letter's headers; None when the copy is not dead-lettered."""
        error = self.dead_lettered
        if error is None or self.dead_letter_attempts is None:
            return None
        return failure_headers(original, error, self.dead_letter_attempts, now)


Decision = Finish | Retry | Park | Follow | Ingested


def poisoned(envelope: Envelope, policy: Policy) -> CourierError | None:
    """``poison_message`` when the request has crashed consumers too often, else None."""
    if envelope.redeliveries < policy.max_redeliveries:
        return None
    return PermanentError(
        ErrorCode.POISON_MESSAGE,
        f"the message was delivered {envelope.redeliveries} times without being settled; "
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
    outcome: Outcome, envelope: Envelope, policy: Policy, *, now: datetime | None = None
) -> Decision:
    """The one decision for a delivery whose attempt ended in ``outcome``."""
    now = now or datetime.now(UTC)
    error = outcome.error
    held = outcome.held
    if held is not None and not held.tried:
        held_since = envelope.held_since or now
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
                attempts=envelope.attempt - 1,
            )
        wait = min(held.seconds, policy.hold_max - held_for)
        return Park(
            delay=nearest_delay(policy.delays, wait),
            written=_copy_marks(envelope.attempt, envelope)
            | {HELD_SINCE_HEADER: held_since.isoformat(timespec="milliseconds")},
            error=RetryableError(ErrorCode.DESTINATION_UNAVAILABLE, held.reason),
        )
    if held is not None:  # tried and then held (the breaker opened meanwhile): a real try
        outcome = outcome.held_as_failure()
        error = outcome.error
    if error is not None and error.retryable and envelope.attempt < policy.max_attempts:
        return Retry(
            delay=pick_delay(policy.delays, envelope.attempt, error.retry_after),
            written=_copy_marks(envelope.attempt + 1, envelope),
            error=error,
        )
    finish = Finish(outcome, attempts=envelope.attempt)
    file = outcome.file
    if not policy.track_ingestion or error is not None or file is None:
        return finish
    if file.final:
        return Finish(outcome, envelope.attempt, _ingestion(outcome, file, 0.0, 0))
    return _follow(policy, envelope, now, 0, now, _read_due(policy, now, FOLLOW_BACKOFF[0]), finish)


# A copy refused before it ran: no read was made.
_NOT_RUN = frozenset(
    {ErrorCode.POISON_MESSAGE, ErrorCode.INVALID_REQUEST, ErrorCode.DESTINATION_NOT_CONFIGURED}
)
# Section 8's own endings: the platform's word on the file. Any other error that ends
# the following is the request's failure, dead-lettered as section 4 says.
_FILE_ENDINGS = frozenset(
    {ErrorCode.INGESTION_FAILED, ErrorCode.INGESTION_TIMEOUT, ErrorCode.DESTINATION_REJECTED}
)


def decide_follow(
    outcome: Outcome, envelope: Envelope, policy: Policy, *, now: datetime | None = None
) -> Decision:
    """The decision for a delivery that read its uploaded file's state (``outcome.file``).

    Final states, a read that cannot succeed (401/403) or the ingestion timeout end the
    following with an ingestion event; anything else reads again later, without
    spending an attempt.
    """
    now = now or datetime.now(UTC)
    since = envelope.follow_since or now
    waited = max((now - since).total_seconds(), 0.0)
    if not policy.track_ingestion:
        return Ingested(None)
    error, file = outcome.error, outcome.file
    read = file is not None or (error is not None and error.code not in _NOT_RUN)
    checks = envelope.checks + (1 if read else 0)
    if error is not None and not error.retryable:
        ingestion = _ingestion(outcome, file, waited, checks, error)
        if error.code in _FILE_ENDINGS:
            return Ingested(ingestion)
        return Ingested(ingestion, dead_letter_attempts=envelope.attempt)
    if file is not None and file.final:
        failure = None
        if file.state == "failed":
            failure = PermanentError(ErrorCode.INGESTION_FAILED, file.reason or file.status or "")
        return Ingested(_ingestion(outcome, file, waited, checks, failure))
    if waited >= policy.ingestion_timeout:
        status = file.status if file is not None else None
        timeout = PermanentError(
            ErrorCode.INGESTION_TIMEOUT,
            f"{outcome.destination or 'the destination'} gave no final state in "
            f"{_duration(waited)} (COURIER_INGESTION_TIMEOUT); last status: {status}",
        )
        return Ingested(_ingestion(outcome, file, waited, checks, timeout))
    held = outcome.held
    wait = (
        nearest_delay(policy.delays, held.seconds)
        if held is not None
        else FOLLOW_BACKOFF[min(checks, len(FOLLOW_BACKOFF) - 1)]
    )
    return _follow(policy, envelope, since, checks, now, _read_due(policy, now, wait))


def not_due(envelope: Envelope, policy: Policy, *, now: datetime | None = None) -> Follow | None:
    """For a copy following its file whose next read is not due yet: another round
    through the delay tiers, unread (None: read now).

    Read now when one more round would end further from the time due than now is, and
    once the ingestion timeout has passed (the read ends the following).
    """
    since, due = envelope.follow_since, envelope.read_at
    if since is None or due is None or not policy.track_ingestion:
        return None
    now = now or datetime.now(UTC)
    left = (due - now).total_seconds()
    if (now - since).total_seconds() >= policy.ingestion_timeout:
        return None
    if follow_hop(policy.delays, left) >= 2 * left:
        return None
    return _follow(policy, envelope, since, envelope.checks, now, due)


def _ingestion(
    outcome: Outcome,
    file: PlatformFile | None,
    waited: float,
    checks: int,
    error: CourierError | None = None,
) -> Ingestion:
    return Ingestion(outcome.destination or "unknown", file, round(waited * 1000, 1), checks, error)


def follow_hop(delays: tuple[int, ...], seconds: float) -> int:
    """The delay tier of the next round towards a read due in ``seconds``: the longest
    tier no longer than that, or the shortest tier."""
    return max((d for d in delays if d <= seconds), default=min(delays))


def _read_due(policy: Policy, now: datetime, wait: float) -> datetime:
    """When a read ``wait`` seconds from ``now`` is due: at most the longest delay tier
    away (short tiers, as in a test setup, make short waits)."""
    return now + timedelta(seconds=min(wait, max(policy.delays)))


def _follow(
    policy: Policy,
    envelope: Envelope,
    since: datetime,
    checks: int,
    now: datetime,
    due: datetime,
    upload: Finish | None = None,
) -> Follow:
    """Follow on: the next read is due at ``due``; one round through the tiers towards it."""
    marks = {
        FOLLOW_SINCE_HEADER: since.isoformat(timespec="milliseconds"),
        CHECKS_HEADER: checks,
        READ_AT_HEADER: due.isoformat(timespec="milliseconds"),
        REDELIVERIES_HEADER: envelope.redeliveries,
        COPY_ID_HEADER: str(uuid.uuid4()),
    }
    hop = follow_hop(policy.delays, (due - now).total_seconds())
    return Follow(delay=hop, written=marks, upload=upload)


def describe(decision: Decision, attempt: int) -> tuple[int, str, str | None]:
    """How a decision is logged: its level, what happened, and the error code."""
    if isinstance(decision, Retry | Park):
        code = decision.error.code.value
        kind = "held" if isinstance(decision, Park) else "retrying"
        return logging.INFO, f"attempt {attempt} {kind} ({code}); back in {decision.delay}s", code
    if isinstance(decision, Follow):
        done = "succeeded; " if decision.upload is not None else ""
        return logging.INFO, f"{done}its file's state is read again in {decision.delay}s", None
    if isinstance(decision, Ingested):
        ingestion = decision.ingestion
        if ingestion is None or ingestion.error is None:
            return logging.INFO, "ingestion completed", None
        return logging.WARNING, "ingestion failed", ingestion.error.code.value
    error = decision.outcome.error
    if error is not None:
        return logging.WARNING, "failed", error.code.value
    return logging.INFO, "succeeded", None


def _copy_marks(attempt: int, envelope: Envelope) -> dict[str, Any]:
    return {
        ATTEMPT_HEADER: attempt,
        REDELIVERIES_HEADER: envelope.redeliveries,
        COPY_ID_HEADER: str(uuid.uuid4()),
    }


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
