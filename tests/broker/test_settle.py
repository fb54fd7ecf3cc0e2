"""The settle decision, branch by branch, without a broker: retries, dead letters, holds."""

from __future__ import annotations

import ast
import dataclasses
import functools
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from service.copies import give_back_headers, replay_headers
from service.errors import CourierError, ErrorCode, PermanentError, RetryableError
from service.messages import Envelope, Properties
from service.outcome import Held, Outcome, PlatformFile
from service.redact import mask_text
from service.settle import (
    FOLLOW_BACKOFF,
    Finish,
    Follow,
    Ingested,
    Park,
    Policy,
    Retry,
    decide,
    decide_follow,
    nearest_delay,
    not_due,
    pick_delay,
    poisoned,
)
from service.topology import (
    ATTEMPT_HEADER,
    ATTEMPTS_HEADER,
    CHECKS_HEADER,
    COPY_ID_HEADER,
    DELIVERY_COUNT_HEADER,
    ERROR_CODE_HEADER,
    ERROR_MESSAGE_HEADER,
    FAILED_AT_HEADER,
    FOLLOW_SINCE_HEADER,
    HELD_SINCE_HEADER,
    READ_AT_HEADER,
    REDELIVERIES_HEADER,
)

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
POLICY = Policy(
    max_attempts=5,
    delays=(10, 60, 300, 1800),
    max_redeliveries=5,
    hold_max=3600.0,
)


def outcome(error: CourierError | None = None, held: Held | None = None) -> Outcome:
    return Outcome(duration_ms=1.0, destination="inconvo", error=error, held=held)


def unavailable(retry_after: float | None = None) -> RetryableError:
    return RetryableError(ErrorCode.DESTINATION_UNAVAILABLE, "503", retry_after=retry_after)


def rejected() -> PermanentError:
    return PermanentError(ErrorCode.DESTINATION_REJECTED, "422")


@dataclass(frozen=True)
class Case:
    name: str
    outcome: Outcome
    facts: Envelope
    kind: type
    delay: int | None = None  # for Retry / Park
    attempt_header: int | None = None  # the copy's x-courier-attempt
    attempts: int | None = None  # data.attempts of a Finish
    code: ErrorCode | None = None  # the final error code of a Finish


def facts(attempt: int = 1, redeliveries: int = 0, held_since: datetime | None = None) -> Envelope:
    return Envelope(attempt=attempt, redeliveries=redeliveries, held_since=held_since)


CASES = [
    Case("success on the first try", outcome(), facts(), Finish, attempts=1),
    Case("success on the third attempt", outcome(), facts(3), Finish, attempts=3),
    Case(
        "permanent failure is final",
        outcome(rejected()),
        facts(),
        Finish,
        attempts=1,
        code=ErrorCode.DESTINATION_REJECTED,
    ),
    Case("first retryable failure: the first tier", outcome(unavailable()), facts(1), Retry, 10, 2),
    Case("second: the second tier", outcome(unavailable()), facts(2), Retry, 60, 3),
    Case("fourth: the last tier", outcome(unavailable()), facts(4), Retry, 1800, 5),
    Case(
        "max attempts reached: final",
        outcome(unavailable()),
        facts(5),
        Finish,
        attempts=5,
        code=ErrorCode.DESTINATION_UNAVAILABLE,
    ),
    Case(
        "Retry-After longer than the tier picks the first tier at least that long",
        outcome(unavailable(45.0)),
        facts(1),
        Retry,
        60,
        2,
    ),
    Case(
        "Retry-After beyond every tier: the last tier",
        outcome(unavailable(5000.0)),
        facts(1),
        Retry,
        1800,
        2,
    ),
    Case(
        "Retry-After shorter than the tier: the tier",
        outcome(unavailable(2.0)),
        facts(2),
        Retry,
        60,
        3,
    ),
    Case(
        "held before any try: parked, same attempt",
        outcome(held=Held(9.0, "breaker open")),
        facts(2),
        Park,
        10,
        2,
    ),
    Case(
        "held with a long cooldown: the nearest tier",
        outcome(held=Held(240.0, "breaker open")),
        facts(1),
        Park,
        300,
        1,
    ),
    Case(
        "held again: the hold does not end before COURIER_HOLD_MAX",
        outcome(held=Held(40.0, "breaker open")),
        facts(1, held_since=NOW - timedelta(minutes=59, seconds=50)),
        Park,
        10,
        1,
    ),
    Case(
        "held past COURIER_HOLD_MAX: fails, counting only real tries",
        outcome(held=Held(10.0, "breaker open")),
        facts(3, held_since=NOW - timedelta(hours=1)),
        Finish,
        attempts=2,
        code=ErrorCode.DESTINATION_UNAVAILABLE,
    ),
    Case(
        "held past COURIER_HOLD_MAX on the first attempt: zero tries",
        outcome(held=Held(10.0, "breaker open")),
        facts(1, held_since=NOW - timedelta(hours=2)),
        Finish,
        attempts=0,
        code=ErrorCode.DESTINATION_UNAVAILABLE,
    ),
    Case(
        "tried, then held: a real failed try, retried after the cooldown",
        outcome(held=Held(50.0, "breaker open", tried=True)),
        facts(1),
        Retry,
        60,
        2,
    ),
    Case(
        "tried, then held on the last attempt: final",
        outcome(held=Held(50.0, "breaker open", tried=True)),
        facts(5),
        Finish,
        attempts=5,
        code=ErrorCode.DESTINATION_UNAVAILABLE,
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_decide(case: Case) -> None:
    """Each branch of the retry rules (and the hold) yields its one decision."""
    decision = decide(case.outcome, case.facts, POLICY, now=NOW)
    assert type(decision) is case.kind
    if isinstance(decision, Finish):
        assert decision.attempts == case.attempts
        error = decision.outcome.error
        assert (error.code if error else None) == case.code
        assert decision.failed == (case.code is not None)
        return
    assert isinstance(decision, Retry | Park)
    assert decision.delay == case.delay
    headers = decision.headers(
        {DELIVERY_COUNT_HEADER: 2, HELD_SINCE_HEADER: "x", "keep": "me", REDELIVERIES_HEADER: 1}
    )
    assert headers[ATTEMPT_HEADER] == case.attempt_header
    assert headers["keep"] == "me"
    assert DELIVERY_COUNT_HEADER not in headers, "a new copy has not been delivered yet"
    assert headers[REDELIVERIES_HEADER] == case.facts.redeliveries
    assert len(str(headers[COPY_ID_HEADER])) == 36
    if isinstance(decision, Park):
        since = case.facts.held_since or NOW
        assert headers[HELD_SINCE_HEADER] == since.isoformat(timespec="milliseconds")
    else:
        assert HELD_SINCE_HEADER not in headers, "a retried request is no longer held"


def test_every_decision_kind_is_covered() -> None:
    """The table above reaches every kind of decision and every tier choice rule."""
    kinds = {c.kind for c in CASES}
    assert kinds == {Finish, Retry, Park}


def test_hold_past_the_limit_says_how_long() -> None:
    """A request held too long fails with a message naming how long and the knob."""
    decision = decide(
        outcome(held=Held(10.0, "inconvo's breaker is open")),
        facts(1, held_since=NOW - timedelta(hours=1, minutes=5)),
        POLICY,
        now=NOW,
    )
    assert isinstance(decision, Finish)
    error = decision.outcome.error
    assert error is not None and error.retryable
    assert "held for 1h05m" in error.message and "COURIER_HOLD_MAX" in error.message
    assert decision.outcome.held is None


def test_two_copies_never_share_a_copy_id() -> None:
    """Every republished copy gets its own id (the duplicate check relies on it)."""
    ids = {
        str(decide(outcome(unavailable()), facts(), POLICY, now=NOW).written[COPY_ID_HEADER])  # type: ignore[union-attr]
        for _ in range(50)
    }
    assert len(ids) == 50


@pytest.mark.parametrize(
    ("message", "leaked"),
    [
        ("inconvo answered 401: bad key sk-live-secret-1234", "sk-live-secret-1234"),
        ("cannot fetch https://alice:hunter2@files.example/x.csv", "hunter2"),
        (
            "mindset echoed https://b.s3.amazonaws.com/k?X-Amz-Signature=" + "a" * 64,
            "a" * 64,
        ),
    ],
)
def test_messages_are_masked(message: str, leaked: str) -> None:
    """An outcome masked as the settler masks it carries no API key, URL user-info or
    presigned signature into a decision, its event or its dead letter."""
    mask = functools.partial(mask_text, secrets=("sk-live-secret-1234",))
    for error in (PermanentError(ErrorCode.DESTINATION_REJECTED, message), unavailable()):
        error.message = message
        for attempt in (1, 5):
            masked = outcome(error).masked(mask)
            assert type(masked.error) is type(error) and masked.error.code == error.code
            decision = decide(masked, facts(attempt), POLICY, now=NOW)
            if isinstance(decision, Finish):
                headers = decision.dead_letter_headers({}, NOW)
                assert leaked not in str(headers) and leaked not in repr(decision.outcome)
            else:
                assert isinstance(decision, Retry)
                assert leaked not in decision.error.message


def test_dead_letter_headers() -> None:
    """A failure's dead letter carries the code, message, attempts and time."""
    decision = decide(outcome(rejected()), facts(2), POLICY, now=NOW)
    assert isinstance(decision, Finish)
    original = {"producer": "kept", DELIVERY_COUNT_HEADER: 1}
    assert decision.dead_letter_headers(original, NOW) == {
        "producer": "kept",
        ERROR_CODE_HEADER: "destination_rejected",
        ERROR_MESSAGE_HEADER: "422",
        ATTEMPTS_HEADER: 2,
        FAILED_AT_HEADER: "2026-11-27T12:00:00.000+00:00",
    }


@pytest.mark.parametrize(
    ("redeliveries", "max_redeliveries", "poison"),
    [(0, 5, False), (4, 5, False), (5, 5, True), (9, 5, True), (1, 1, True)],
)
def test_poison(redeliveries: int, max_redeliveries: int, poison: bool) -> None:
    """A request that crashed consumers COURIER_MAX_REDELIVERIES times is poison_message."""
    policy = Policy(max_attempts=5, delays=(10,), max_redeliveries=max_redeliveries)
    error = poisoned(facts(redeliveries=redeliveries), policy)
    assert (error is not None) == poison
    if error is not None:
        assert error.code == ErrorCode.POISON_MESSAGE and not error.retryable


@dataclass(frozen=True)
class Props:
    """A delivery's properties, as :meth:`Envelope.read` reads them."""

    headers: Mapping[str, Any] | None = None
    message_id: str | None = None
    correlation_id: str | None = None
    reply_to: str | None = None


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        (None, Envelope()),
        ({DELIVERY_COUNT_HEADER: 3}, Envelope(redeliveries=3)),
        ({REDELIVERIES_HEADER: 2, DELIVERY_COUNT_HEADER: 1}, Envelope(redeliveries=3)),
        ({REDELIVERIES_HEADER: b"2"}, Envelope(redeliveries=2)),
        ({REDELIVERIES_HEADER: "junk"}, Envelope()),
        ({REDELIVERIES_HEADER: -4}, Envelope()),
        ({REDELIVERIES_HEADER: True}, Envelope()),
        ({ATTEMPT_HEADER: 3}, Envelope(attempt=3)),
        ({ATTEMPT_HEADER: "2"}, Envelope(attempt=2)),
        ({ATTEMPT_HEADER: 0}, Envelope(attempt=1)),
        ({ATTEMPT_HEADER: False}, Envelope(attempt=1)),
        (
            {HELD_SINCE_HEADER: "2026-11-27T11:00:00.000+00:00", COPY_ID_HEADER: b"c-1"},
            Envelope(held_since=datetime(2026, 11, 27, 11, tzinfo=UTC), copy_id="c-1"),
        ),
        ({HELD_SINCE_HEADER: "yesterday"}, Envelope()),
    ],
)
def test_envelope_read(headers: dict[str, Any] | None, expected: Envelope) -> None:
    """Crash counts add the carried header to the broker's count; odd values count as absent."""
    assert Envelope.read(Props(headers)) == expected


def test_envelope_reads_the_ids() -> None:
    """Empty AMQP properties count as absent."""
    envelope = Envelope.read(Props(None, "m-1", "", "replies"))
    assert (envelope.message_id, envelope.correlation_id, envelope.reply_to) == (
        "m-1",
        None,
        "replies",
    )


def test_a_graceful_give_back_is_not_a_crash() -> None:
    """Handing work back at shutdown keeps the attempt and adds no redelivery."""
    original = {ATTEMPT_HEADER: 3, DELIVERY_COUNT_HEADER: 1, REDELIVERIES_HEADER: 1}
    envelope = Envelope.read(Props(original))
    headers = give_back_headers(original, envelope)
    assert headers[REDELIVERIES_HEADER] == 2
    assert headers[ATTEMPT_HEADER] == 3, "the copy keeps the original's attempt"
    assert DELIVERY_COUNT_HEADER not in headers
    again = Envelope.read(Props(headers))
    assert again.redeliveries == 2 and again.attempt == 3 and poisoned(again, POLICY) is None


def test_a_replay_starts_afresh() -> None:
    """A replayed dead letter keeps the producer's headers and none of the bookkeeping."""
    letter = {
        "traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01",
        ATTEMPT_HEADER: 5,
        ERROR_CODE_HEADER: "destination_unavailable",
        DELIVERY_COUNT_HEADER: 2,
        "x-death": [{}],
        "x-first-death-queue": "q",
    }
    assert replay_headers(letter) == {"traceparent": letter["traceparent"]}


@pytest.mark.parametrize(
    ("attempt", "retry_after", "expected"),
    [(1, None, 10), (2, None, 60), (4, None, 1800), (9, None, 1800), (1, 45.0, 60), (3, 20.0, 300)],
)
def test_pick_delay(attempt: int, retry_after: float | None, expected: int) -> None:
    """One tier per attempt; a longer Retry-After picks the first tier at least that long."""
    assert pick_delay((10, 60, 300, 1800), attempt, retry_after) == expected


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [(0.0, 10), (10.0, 10), (34.0, 10), (35.0, 10), (36.0, 60), (1e9, 1800)],
)
def test_nearest_delay(seconds: float, expected: int) -> None:
    """A hold parks in the tier nearest to the time left (the shorter one on a tie)."""
    assert nearest_delay((10, 60, 300, 1800), seconds) == expected


def test_decide_imports_no_amqp_client() -> None:
    """settle.py decides without aio-pika: nothing in it can ack, nack or publish."""
    source = Path(__file__).resolve().parents[2] / "service" / "settle.py"
    tree = ast.parse(source.read_text())
    imported = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    } | {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not any(name.startswith(("aio_pika", "aiormq", "pamqp")) for name in imported)


# -- following a file after its upload ----------------------------------------------------

PENDING = PlatformFile("accepted", "pending", {"uid": "f1"}, uid="f1", external_id="x")
PUBLISHED = PlatformFile("published", "completed", {"uid": "f1"}, uid="f1", external_id="x")
FAILED_FILE = PlatformFile("fail", "failed", {"uid": "f1"}, reason="could not ingest")
STORED = PlatformFile("stored", "completed", {"file": {"name": "a.csv"}})


def uploaded(file: PlatformFile) -> Outcome:
    return Outcome(duration_ms=1.0, destination="mindset", file=file)


def following(checks: int = 0, since: timedelta = timedelta(0)) -> Envelope:
    return Envelope(follow_since=NOW - since, checks=checks)


def test_an_upload_whose_file_is_final_at_once_ends_with_both_events() -> None:
    """Inconvo (stored, final): the upload's event and ingestion.completed, nothing parked."""
    decision = decide(uploaded(STORED), facts(), POLICY, now=NOW)
    assert isinstance(decision, Finish) and decision.ingestion is not None
    assert decision.ingestion.completed
    assert (decision.ingestion.waited_ms, decision.ingestion.checks) == (0.0, 0)


def test_an_upload_whose_file_is_still_ingesting_is_followed() -> None:
    """Mindset accepted: the upload's event first, then a copy parked to read the state."""
    decision = decide(uploaded(PENDING), facts(2), POLICY, now=NOW)
    assert isinstance(decision, Follow) and decision.upload is not None
    assert decision.upload.attempts == 2 and not decision.upload.failed
    assert decision.delay == 10, "the first read comes after about 5 s: the nearest tier"
    headers = decision.headers({DELIVERY_COUNT_HEADER: 1, HELD_SINCE_HEADER: "x"})
    assert headers[FOLLOW_SINCE_HEADER] == NOW.isoformat(timespec="milliseconds")
    assert headers[CHECKS_HEADER] == 0
    assert DELIVERY_COUNT_HEADER not in headers and HELD_SINCE_HEADER not in headers


def test_nothing_is_followed_when_tracking_is_off() -> None:
    """COURIER_TRACK_INGESTION=false: an upload ends with its own event only."""
    off = dataclasses.replace(POLICY, track_ingestion=False)
    for file in (STORED, PENDING):
        decision = decide(uploaded(file), facts(), off, now=NOW)
        assert isinstance(decision, Finish) and decision.ingestion is None
    assert decide_follow(uploaded(PUBLISHED), following(), off, now=NOW) == Ingested(None)


def test_a_failed_upload_is_never_followed() -> None:
    """Only a success is followed: a failure ends as it always did."""
    failed = dataclasses.replace(uploaded(PENDING), error=rejected())
    assert isinstance(decide(failed, facts(), POLICY, now=NOW), Finish)


@dataclass(frozen=True)
class Read:
    name: str
    outcome: Outcome
    envelope: Envelope
    code: ErrorCode | None  # the ingestion event's error code; None: completed
    delay: int | None = None  # for a read again later: the tier
    checks: int | None = None


HELD = Outcome(0.0, "mindset", held=Held(40.0, "breaker open"))
READS = [
    Read("published", uploaded(PUBLISHED), following(2), None, checks=3),
    Read(
        "readyForPublication",
        uploaded(dataclasses.replace(PUBLISHED, status="readyForPublication")),
        following(),
        None,
        checks=1,
    ),
    Read("fail", uploaded(FAILED_FILE), following(), ErrorCode.INGESTION_FAILED, checks=1),
    Read("still accepted", uploaded(PENDING), following(1), None, delay=60, checks=2),
    Read("still accepted, later", uploaded(PENDING), following(3), None, delay=300, checks=4),
    Read("held by the breaker: no read made", HELD, following(2), None, delay=60, checks=2),
    Read(
        "a read that failed transiently: read again",
        Outcome(0.0, "mindset", error=unavailable()),
        following(4),
        None,
        delay=300,
        checks=5,
    ),
    Read(
        "a read refused (401/403)",
        Outcome(0.0, "mindset", error=rejected()),
        following(),
        ErrorCode.DESTINATION_REJECTED,
        checks=1,
    ),
    Read(
        "past COURIER_INGESTION_TIMEOUT, still accepted",
        uploaded(PENDING),
        following(9, since=timedelta(hours=6)),
        ErrorCode.INGESTION_TIMEOUT,
        checks=10,
    ),
    Read(
        "past the timeout, held",
        HELD,
        following(9, since=timedelta(hours=7)),
        ErrorCode.INGESTION_TIMEOUT,
        checks=9,
    ),
]


@pytest.mark.parametrize("read", READS, ids=[r.name for r in READS])
def test_decide_follow(read: Read) -> None:
    """Each read of a followed file ends the following with one event or reads again later."""
    decision = decide_follow(read.outcome, read.envelope, POLICY, now=NOW)
    if read.delay is not None:
        assert isinstance(decision, Follow) and decision.upload is None
        assert decision.delay == read.delay
        assert decision.written[CHECKS_HEADER] == read.checks
        since = read.envelope.follow_since
        assert since is not None
        assert decision.written[FOLLOW_SINCE_HEADER] == since.isoformat(timespec="milliseconds")
        return
    assert isinstance(decision, Ingested) and decision.ingestion is not None
    ingestion = decision.ingestion
    assert ingestion.checks == read.checks
    assert (ingestion.error.code if ingestion.error else None) == read.code
    assert ingestion.completed == (read.code is None)
    assert ingestion.waited_ms == (NOW - (read.envelope.follow_since or NOW)).total_seconds() * 1000


def test_reads_keep_their_backoff_with_the_default_tiers() -> None:
    """The default tiers (10 s, 1 m, 5 m, 30 m) have no 15 m: that wait goes round the 5 m
    tier three times, the copy unread until its read is due. So a file still pending is
    read after about 5 s (the shortest tier), 15 s, 1 m, 5 m, then every 15 m until the
    6 h timeout: 28 reads, where reading at every tier's return made one every 5 m (72)."""
    now = NOW
    decision = decide(uploaded(PENDING), facts(), POLICY, now=now)
    headers: dict[str, Any] = {}
    reads: list[float] = []
    rounds = 0
    while not isinstance(decision, Ingested):
        assert isinstance(decision, Follow)
        headers = decision.headers(headers)
        now += timedelta(seconds=decision.delay)
        envelope = Envelope.read(
            cast(
                Properties,
                SimpleNamespace(
                    message_id=None, correlation_id=None, reply_to=None, headers=headers
                ),
            )
        )
        hop = not_due(envelope, POLICY, now=now)
        if hop is not None:
            assert hop.headers(headers)[CHECKS_HEADER] == envelope.checks, "no read, no check"
            decision, rounds = hop, rounds + 1
            continue
        reads.append((now - NOW).total_seconds())
        decision = decide_follow(uploaded(PENDING), envelope, POLICY, now=now)
    gaps = [b - a for a, b in zip([0.0, *reads], reads, strict=False)]
    assert gaps[:4] == [10, 10, 60, 300]
    assert set(gaps[4:-1]) == {900} and gaps[-1] <= 900
    assert len(reads) == 28 and rounds == 2 * 23 + 1
    assert decision.ingestion is not None and decision.ingestion.checks == 28
    assert decision.ingestion.error is not None
    assert decision.ingestion.error.code is ErrorCode.INGESTION_TIMEOUT


def test_a_round_unread_keeps_the_marks_and_the_timeout_reads_at_once() -> None:
    """A round through the tiers keeps since-when and the checks; once the ingestion
    timeout has passed, or tracking is off, the copy is read (which ends it) at once."""
    due = NOW + timedelta(seconds=600)
    envelope = Envelope(follow_since=NOW - timedelta(hours=1), checks=7, read_at=due)
    hop = not_due(envelope, POLICY, now=NOW)
    assert hop is not None and hop.delay == 300 and hop.upload is None
    written = hop.headers({})
    assert written[FOLLOW_SINCE_HEADER] == (NOW - timedelta(hours=1)).isoformat(
        timespec="milliseconds"
    )
    assert written[CHECKS_HEADER] == 7 and written[READ_AT_HEADER] == due.isoformat(
        timespec="milliseconds"
    )
    assert (
        not_due(dataclasses.replace(envelope, read_at=NOW + timedelta(seconds=4)), POLICY, now=NOW)
        is None
    )
    late = dataclasses.replace(envelope, follow_since=NOW - timedelta(hours=6))
    assert not_due(late, POLICY, now=NOW) is None
    off = dataclasses.replace(POLICY, track_ingestion=False)
    assert not_due(envelope, off, now=NOW) is None
    assert not_due(facts(), POLICY, now=NOW) is None, "an upload, not a follow"
    assert not_due(following(2), POLICY, now=NOW) is None, "a copy from before read-at: read"


def test_reads_wait_no_longer_than_the_longest_tier() -> None:
    """Short tiers (a test setup's 1 s and 2 s) make short waits: a read every tier's
    return at most, as before waits were made of rounds."""
    short = dataclasses.replace(POLICY, delays=(1, 2))
    first = decide(uploaded(PENDING), facts(), short, now=NOW)
    assert isinstance(first, Follow) and first.delay == 2
    for checks in range(6):
        later = decide_follow(uploaded(PENDING), following(checks), short, now=NOW)
        assert isinstance(later, Follow) and later.delay == 2
        due = later.headers({})[READ_AT_HEADER]
        assert due == (NOW + timedelta(seconds=2)).isoformat(timespec="milliseconds")


def test_reads_back_off() -> None:
    """About 5 s, 15 s, 1 m, 5 m, then every 15 m, each the nearest delay tier."""
    delays = (1, 5, 15, 60, 300, 900)
    policy = dataclasses.replace(POLICY, delays=delays)
    seen = [
        decide_follow(uploaded(PENDING), following(n), policy, now=NOW).delay  # type: ignore[union-attr]
        for n in range(7)
    ]
    assert seen == [15, 60, 300, 900, 900, 900, 900], "after n reads, the n+1-th wait"
    assert FOLLOW_BACKOFF == (5, 15, 60, 300, 900)
