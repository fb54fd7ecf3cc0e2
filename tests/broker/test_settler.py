"""The settler's carry-out without a broker: what it publishes, in which order, and when it acks.

A stub outbox (testbed/stub_broker.py) stands in for the publisher and records every
publish beside the acks, so the order is asserted exactly; the real-broker tests in
this folder prove the same under faults.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import orjson
import pytest
from aio_pika.abc import AbstractIncomingMessage

from service.amqp.gate import AckGate
from service.amqp.settler import Settler
from service.config import Settings
from service.contracts import Request, UploadRequest
from service.errors import ErrorCode, PermanentError, RetryableError
from service.instrument import Instruments
from service.metrics import Metrics
from service.outcome import Held, Outcome, PlatformFile
from service.topology import (
    ATTEMPT_HEADER,
    ATTEMPTS_HEADER,
    CHECKS_HEADER,
    COPY_ID_HEADER,
    ERROR_CODE_HEADER,
    FOLLOW_SINCE_HEADER,
    HELD_SINCE_HEADER,
    READ_AT_HEADER,
    REDELIVERIES_HEADER,
    Topology,
)
from testbed.stub_broker import StubDelivery, StubOutbox
from testbed.virtual_time import run_virtual

Handler = Callable[[Request, str], Awaitable[Outcome]]
QUEUE = "t-settler"
BODY = orjson.dumps(
    {
        "id": "r-1",
        "source": {"url": "https://files.example/a.csv"},
        "destination": {"type": "inconvo", "userIdentifier": "u1"},
        "metadata": {"k": "v"},
    }
)
SECRET = "sk-test-secret-8f2a"


def settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "queue": QUEUE,
        "retry_delays": (1, 2),
        "max_attempts": 3,
        "shutdown_timeout": 5.0,
        "event_source": "urn:courier:test",
        "inconvo_api_key": SECRET,
    }
    return Settings(**(values | overrides))


def returning(outcome: Outcome) -> Handler:
    async def handler(request: Request, request_id: str) -> Outcome:
        return outcome

    return handler


SUCCEEDED = Outcome(12.0, "inconvo", delivery="multipart", result={"file": {"name": "a.csv"}})


@dataclass
class Script:
    """The work, as scripted: what an attempt and a status read each return."""

    attempt: Handler
    read: Handler | None = None

    async def process(self, request: Request, request_id: str) -> Outcome:
        return await self.attempt(request, request_id)

    async def follow(self, request: UploadRequest, request_id: str) -> Outcome:
        assert self.read is not None, "this test reads no file"
        return await self.read(request, request_id)


class Rig:
    """One settler over a stub outbox."""

    def __init__(self, handler: Handler, read: Handler | None = None, **overrides: Any) -> None:
        self.settings = settings(**overrides)
        self.topology = Topology.from_settings(self.settings)
        self.outbox = StubOutbox()
        self.metrics = Metrics()
        self.settler = Settler(
            self.settings,
            self.topology,
            Script(handler, read),
            self.outbox,
            Instruments(self.metrics),
            AckGate(),
        )

    def deliver(self, body: bytes = BODY, **fields: Any) -> StubDelivery:
        delivery = StubDelivery(self.outbox, body, **fields)
        self.settler.take(cast(AbstractIncomingMessage, delivery), delivery.channel)
        return delivery

    async def settled(self) -> None:
        """Wait until every delivery taken has ended (its task done)."""
        while self.settler.unacked() or self.settler._work:
            await asyncio.sleep(0)


async def test_a_success_publishes_its_event_then_acks() -> None:
    """The event is confirmed before the ack; a reply_to copy follows the event."""
    rig = Rig(returning(SUCCEEDED))
    delivery = rig.deliver(reply_to="replies", correlation_id="c-9")
    await rig.settled()
    assert rig.outbox.kinds() == [
        "sent exchange:upload.succeeded",
        "confirmed exchange:upload.succeeded",
        "reply queue:replies",
        f"ack {delivery.delivery_tag}",
    ]
    event = rig.outbox.log[0]
    assert event.body["type"] == "courier.upload.succeeded"
    assert event.body["data"]["requestId"] == "r-1"
    assert event.body["data"]["metadata"] == {"k": "v"}
    assert event.message is not None and event.message.correlation_id == "c-9"
    assert rig.outbox.log[2].body == event.body


async def test_a_failure_publishes_event_then_dead_letter_then_acks() -> None:
    """A permanent failure: the failed event, the original body dead-lettered, then the ack."""
    failed = Outcome(3.0, "inconvo", error=PermanentError(ErrorCode.DESTINATION_REJECTED, "422"))
    rig = Rig(returning(failed))
    delivery = rig.deliver(headers={"producer": "kept"})
    await rig.settled()
    dead = f"queue:{rig.topology.dead.name}"
    assert rig.outbox.kinds() == [
        "sent exchange:upload.failed",
        "confirmed exchange:upload.failed",
        f"sent {dead}",
        f"confirmed {dead}",
        f"ack {delivery.delivery_tag}",
    ]
    letter = rig.outbox.log[2]
    assert letter.message is not None and letter.message.body == BODY
    assert letter.headers["producer"] == "kept"
    assert letter.headers[ERROR_CODE_HEADER] == "destination_rejected"


async def test_a_retryable_failure_goes_to_the_first_tier_with_the_next_attempt() -> None:
    """No event for a retry: one confirmed copy in the first tier, attempt 2, then the ack."""
    unavailable = RetryableError(ErrorCode.DESTINATION_UNAVAILABLE, "503")
    rig = Rig(returning(Outcome(3.0, "inconvo", error=unavailable)))
    delivery = rig.deliver()
    await rig.settled()
    tier = f"queue:{rig.topology.tier(1).name}"
    assert rig.outbox.kinds() == [
        f"sent {tier}",
        f"confirmed {tier}",
        f"ack {delivery.delivery_tag}",
    ]
    copy = rig.outbox.log[0]
    assert copy.headers[ATTEMPT_HEADER] == 2 and copy.headers[COPY_ID_HEADER]


async def test_a_held_request_is_parked_at_the_same_attempt() -> None:
    """A hold spends no attempt and marks since when the request is held."""
    rig = Rig(returning(Outcome(0.5, "inconvo", held=Held(1.0, "breaker open"))))
    rig.deliver(headers={ATTEMPT_HEADER: 2})
    await rig.settled()
    copy = rig.outbox.entries("confirmed")[0]
    assert copy.target == f"queue:{rig.topology.tier(1).name}"
    assert copy.headers[ATTEMPT_HEADER] == 2 and copy.headers[HELD_SINCE_HEADER]


async def test_the_ack_waits_for_the_confirm() -> None:
    """While the broker has not confirmed the event, the delivery stays unacked."""
    rig = Rig(returning(SUCCEEDED))
    with rig.outbox.hold():
        delivery = rig.deliver()
        while not rig.outbox.waiting:
            await asyncio.sleep(0)
        for _ in range(20):
            await asyncio.sleep(0)
        assert delivery.acks == 0 and rig.settler.unacked() == 1
    await rig.settled()
    assert delivery.acks == 1


async def test_a_settle_s_publishes_go_out_together_and_in_order() -> None:
    """A failure's event and dead letter are both handed over before either is confirmed,
    event first; the ack waits for both confirms."""
    failed = Outcome(3.0, "inconvo", error=PermanentError(ErrorCode.DESTINATION_REJECTED, "422"))
    rig = Rig(returning(failed))
    with rig.outbox.hold():
        delivery = rig.deliver()
        while rig.outbox.waiting < 2:
            await asyncio.sleep(0)
        assert [e.target for e in rig.outbox.entries("sent")] == [
            "exchange:upload.failed",
            f"queue:{rig.topology.dead.name}",
        ]
        assert delivery.acks == 0
    await rig.settled()
    assert delivery.acks == 1


async def test_a_channel_lost_mid_settle_acks_nothing() -> None:
    """The channel died while the settle's confirms were outstanding: no ack (the tag means
    nothing now); the broker's redelivery is the copy that carries on."""
    failed = Outcome(3.0, "inconvo", error=PermanentError(ErrorCode.DESTINATION_REJECTED, "422"))
    rig = Rig(returning(failed))
    with rig.outbox.hold():
        delivery = rig.deliver()
        while not rig.outbox.waiting:
            await asyncio.sleep(0)
        delivery.channel.close()
        assert rig.settler.channel_lost(delivery.channel) == 0, "a settle is never cancelled"
    await rig.settled()
    assert delivery.acks == 0
    assert rig.outbox.entries("ack") == []


async def test_a_channel_lost_while_working_cancels_the_attempt() -> None:
    """Work still running when its channel dies is cancelled before anything is published."""
    started = asyncio.Event()

    async def slow(request: Request, request_id: str) -> Outcome:
        started.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    rig = Rig(slow)
    delivery = rig.deliver()
    await started.wait()
    delivery.channel.close()
    assert rig.settler.channel_lost(delivery.channel) == 1
    await rig.settled()
    assert rig.outbox.log == []


async def test_an_invalid_body_fails_with_its_event_and_is_dead_lettered() -> None:
    """A body that is not a request never reaches the handler; it ends like any failure."""

    async def never(request: Request, request_id: str) -> Outcome:
        raise AssertionError("an invalid request must not run")

    rig = Rig(never)
    rig.deliver(b'{"id": "bad-1", "source": {}}', message_id="m-1")
    await rig.settled()
    event = rig.outbox.entries("confirmed")[0]
    assert event.body["data"]["requestId"] == "bad-1"
    assert event.body["data"]["error"]["code"] == "invalid_request"
    assert rig.outbox.entries("confirmed")[1].target == f"queue:{rig.topology.dead.name}"


@pytest.mark.parametrize(
    ("body", "headers", "code"),
    [
        (
            b'{"id": "del-1", "operation": "delete", "source": {"url": "https://x.example/a.csv"},'
            b' "destination": {"type": "inconvo", "userIdentifier": "u", "fileName": "a.csv"}}',
            {},
            "invalid_request",
        ),
        (
            b'{"id": "del-1", "operation": "delete",'
            b' "destination": {"type": "inconvo", "userIdentifier": "u", "fileName": "a.csv"}}',
            {"x-delivery-count": 99},
            "poison_message",
        ),
    ],
)
async def test_a_refused_delete_ends_in_a_delete_event(
    body: bytes, headers: dict[str, Any], code: str
) -> None:
    """A delete that is never run (invalid, or poisoned) ends in courier.delete.failed with
    operation delete and no source, as every delete does; never in an upload's event."""

    async def never(request: Request, request_id: str) -> Outcome:
        raise AssertionError("a refused request must not run")

    rig = Rig(never)
    rig.deliver(body, headers=headers)
    await rig.settled()
    event = rig.outbox.entries("confirmed")[0].body
    assert event["type"] == "courier.delete.failed"
    assert event["data"]["operation"] == "delete" and event["data"]["source"] is None
    assert event["data"]["error"]["code"] == code and event["data"]["destination"] == "inconvo"


async def test_secrets_are_masked_in_the_event_and_the_dead_letter() -> None:
    """A destination that echoes the API key: neither the event nor the dead letter shows it."""
    leaky = PermanentError(ErrorCode.DESTINATION_REJECTED, f"bad key {SECRET}")
    rig = Rig(returning(Outcome(1.0, "inconvo", error=leaky)))
    rig.deliver()
    await rig.settled()
    for entry in rig.outbox.entries("confirmed"):
        assert entry.message is not None
        assert SECRET not in entry.message.body.decode()
        assert SECRET not in str(entry.headers)


async def test_a_second_copy_of_a_settled_request_is_dropped() -> None:
    """A copy whose copy id this replica already settled is acked without running again."""
    runs = 0

    async def counting(request: Request, request_id: str) -> Outcome:
        nonlocal runs
        runs += 1
        return SUCCEEDED

    rig = Rig(counting)
    rig.deliver(headers={COPY_ID_HEADER: "copy-1"})
    await rig.settled()
    second = rig.deliver(headers={COPY_ID_HEADER: "copy-1"})
    await rig.settled()
    assert runs == 1 and second.acks == 1
    assert len(rig.outbox.entries("confirmed")) == 1


def test_shutdown_gives_back_unfinished_work_as_a_fresh_copy() -> None:
    """At the shutdown timeout, work still running is handed back to the request queue
    (same attempt, this return not counted as a crash), then acked."""

    async def scenario() -> None:
        started = asyncio.Event()

        async def endless(request: Request, request_id: str) -> Outcome:
            started.set()
            await asyncio.Event().wait()
            raise AssertionError("unreachable")

        rig = Rig(endless, shutdown_timeout=2.0)
        delivery = rig.deliver(headers={ATTEMPT_HEADER: 2, "x-delivery-count": 1})
        await started.wait()
        loop = asyncio.get_running_loop()
        began = loop.time()
        await rig.settler.drain(loop.time() + 2.0)
        assert loop.time() - began == pytest.approx(2.0, abs=0.01)
        requests = f"queue:{rig.topology.requests.name}"
        assert rig.outbox.kinds() == [
            f"sent {requests}",
            f"confirmed {requests}",
            f"ack {delivery.delivery_tag}",
        ]
        copy = rig.outbox.log[0]
        assert copy.headers[ATTEMPT_HEADER] == 2
        assert copy.headers[REDELIVERIES_HEADER] == 1
        assert "x-delivery-count" not in copy.headers

    run_virtual(scenario())


def test_shutdown_acks_a_settle_whose_last_publish_went_out() -> None:
    """A settle whose last publish went out on a live connection is acked at the hard deadline
    even without its confirm (leaving it unacked would repeat that publish); one whose last
    publish never went out stays unacked for the broker to redeliver."""

    async def scenario() -> None:
        rig = Rig(returning(SUCCEEDED), shutdown_timeout=1.0)
        with rig.outbox.hold():
            delivery = rig.deliver()
            while not rig.outbox.waiting:
                await asyncio.sleep(0)
            loop = asyncio.get_running_loop()
            await rig.settler.drain(loop.time() + 1.0)
            assert delivery.acks == 1, "the event went out: acked"

        rig = Rig(returning(SUCCEEDED), shutdown_timeout=1.0)
        rig.outbox.up = False  # the connection is down: nothing goes out
        rig.outbox.generation = 2
        with rig.outbox.hold():
            delivery = rig.deliver()
            while not rig.outbox.waiting:
                await asyncio.sleep(0)
            rig.outbox.generation = 3  # the connection it was handed to is gone
            await rig.settler.drain(asyncio.get_running_loop().time() + 1.0)
            assert delivery.acks == 0, "its publish may be lost: the broker redelivers it"

    run_virtual(scenario())


STORED = PlatformFile("stored", "completed", {"file": {"name": "a.csv"}})
ACCEPTED = PlatformFile("accepted", "pending", {"uid": "f1", "status": "accepted"}, uid="f1")


async def test_a_file_final_at_once_gets_its_ingestion_event_after_the_upload_s() -> None:
    """Inconvo's upload is final: upload.succeeded, then ingestion.completed, then the ack."""
    rig = Rig(returning(dataclasses.replace(SUCCEEDED, file=STORED)))
    delivery = rig.deliver()
    await rig.settled()
    assert [e.target for e in rig.outbox.entries("sent")] == [
        "exchange:upload.succeeded",
        "exchange:ingestion.completed",
    ]
    ingestion = rig.outbox.entries("sent")[1].body
    assert ingestion["type"] == "courier.ingestion.completed"
    assert ingestion["subject"] == "r-1"
    assert ingestion["data"]["fileStatus"] == "stored"
    assert (ingestion["data"]["checks"], ingestion["data"]["waitedMs"]) == (0, 0.0)
    assert rig.outbox.kinds()[-1] == f"ack {delivery.delivery_tag}"


async def test_ingestion_events_carry_the_correlation_and_go_to_reply_to() -> None:
    """The ingestion event is correlated as the upload event is, and copied to reply_to
    too: after an upload final at once, and from a copy that read its file."""
    rig = Rig(returning(dataclasses.replace(SUCCEEDED, file=STORED)))
    rig.deliver(reply_to="replies", correlation_id="c-9")
    await rig.settled()
    confirmed = [e for e in rig.outbox.entries("confirmed") if e.target.startswith("exchange:")]
    replies = [e for e in rig.outbox.log if e.target == "queue:replies"]
    assert (
        [e.body["type"] for e in replies]
        == [e.body["type"] for e in confirmed]
        == [
            "courier.upload.succeeded",
            "courier.ingestion.completed",
        ]
    )
    for entry in (*confirmed, *replies):
        assert entry.message is not None and entry.message.correlation_id == "c-9"
    published = dataclasses.replace(ACCEPTED, status="published", state="completed")
    reader = Rig(returning(SUCCEEDED), returning(Outcome(2.0, "mindset", file=published)))
    since = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    reader.deliver(
        headers={FOLLOW_SINCE_HEADER: since, CHECKS_HEADER: 1},
        reply_to="replies",
        correlation_id="c-10",
    )
    await reader.settled()
    [event] = reader.outbox.entries("confirmed")
    [reply] = [e for e in reader.outbox.log if e.target == "queue:replies"]
    assert event.body["type"] == reply.body["type"] == "courier.ingestion.completed"
    assert event.message is not None and event.message.correlation_id == "c-10"
    assert reply.message is not None and reply.message.correlation_id == "c-10"


async def test_a_file_still_ingesting_is_parked_to_be_read_again() -> None:
    """Mindset accepted the file: upload.succeeded, then a copy in a delay tier that will
    read the file's state; nothing is kept in memory."""
    rig = Rig(returning(dataclasses.replace(SUCCEEDED, destination="mindset", file=ACCEPTED)))
    rig.deliver()
    await rig.settled()
    event, copy = rig.outbox.entries("confirmed")
    assert event.target == "exchange:upload.succeeded"
    assert copy.target == f"queue:{rig.topology.tier(2).name}", "about 5 s: the nearest tier"
    assert copy.message is not None and copy.message.body == BODY
    assert copy.headers[CHECKS_HEADER] == 0 and copy.headers[FOLLOW_SINCE_HEADER]
    assert rig.metrics.tracked._value.get() == 1


async def test_a_read_copy_ends_with_the_ingestion_event_alone() -> None:
    """A copy that follows its file reads the state: published ends the following with
    ingestion.completed (no upload runs, no second upload event)."""
    published = dataclasses.replace(ACCEPTED, status="published", state="completed")

    async def never(request: Request, request_id: str) -> Outcome:
        raise AssertionError("a follow-up never uploads")

    read = returning(Outcome(2.0, "mindset", file=published))
    rig = Rig(never, read)
    since = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    rig.deliver(headers={FOLLOW_SINCE_HEADER: since, CHECKS_HEADER: 2})
    await rig.settled()
    [event] = rig.outbox.entries("confirmed")
    assert event.body["type"] == "courier.ingestion.completed"
    assert event.body["data"]["checks"] == 3
    assert event.body["data"]["fileStatus"] == "published"
    assert rig.metrics.tracked._value.get() == -1, "this replica saw one followed file return"


@pytest.mark.parametrize(
    ("headers", "read_error", "code", "checks"),
    [
        ({REDELIVERIES_HEADER: 9}, None, "poison_message", 2),
        ({}, PermanentError(ErrorCode.INTERNAL_ERROR, "unexpected"), "internal_error", 3),
        ({}, PermanentError(ErrorCode.DESTINATION_NOT_CONFIGURED, "no key"), None, 2),
    ],
    ids=["poisoned", "internal-error", "not-configured"],
)
async def test_a_follow_that_fails_itself_is_dead_lettered(
    headers: dict[str, Any], read_error: PermanentError | None, code: str | None, checks: int
) -> None:
    """A followed file's copy that crashes consumers, or whose read fails for a reason
    other than the file's own fate, ends with ingestion.failed and is dead-lettered
    (then acked), never dropped; a copy refused before its read counts no check."""

    async def never(request: Request, request_id: str) -> Outcome:
        raise AssertionError("a follow-up never uploads")

    rig = Rig(never, returning(Outcome(2.0, "mindset", error=read_error)))
    code = code or (read_error.code.value if read_error else "")
    since = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    delivery = rig.deliver(
        headers={FOLLOW_SINCE_HEADER: since, CHECKS_HEADER: 2, ATTEMPT_HEADER: 2, **headers}
    )
    await rig.settled()
    dead_queue = f"queue:{rig.topology.dead.name}"
    kinds = rig.outbox.kinds()
    assert kinds[-1] == f"ack {delivery.delivery_tag}"
    assert {"confirmed exchange:ingestion.failed", f"confirmed {dead_queue}"} <= set(kinds[:-1])
    event, dead = rig.outbox.entries("confirmed")
    assert event.body["data"]["error"]["code"] == code
    assert event.body["data"]["checks"] == checks
    assert dead.target == dead_queue
    assert dead.message is not None and dead.message.body == BODY
    assert dead.headers[ERROR_CODE_HEADER] == code and dead.headers[ATTEMPTS_HEADER] == 2
    dead_lettered = {"error_code": code}
    assert rig.metrics.registry.get_sample_value("courier_dead_lettered_total", dead_lettered) == 1


@pytest.mark.parametrize("code", [ErrorCode.INGESTION_FAILED, ErrorCode.DESTINATION_REJECTED])
async def test_the_files_own_fate_ends_the_following_without_a_dead_letter(
    code: ErrorCode,
) -> None:
    """A file gone (ingestion_failed) or a read the destination refuses (401/403): the
    ingestion.failed event alone; the request itself had succeeded."""

    async def never(request: Request, request_id: str) -> Outcome:
        raise AssertionError("a follow-up never uploads")

    rig = Rig(never, returning(Outcome(2.0, "mindset", error=PermanentError(code, "x"))))
    since = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    rig.deliver(headers={FOLLOW_SINCE_HEADER: since, CHECKS_HEADER: 2})
    await rig.settled()
    [event] = rig.outbox.entries("confirmed")
    assert event.body["type"] == "courier.ingestion.failed"
    assert event.body["data"]["error"]["code"] == code.value
    assert event.body["data"]["checks"] == 3


async def test_a_copy_whose_read_is_not_due_goes_round_unread() -> None:
    """A followed file's copy back before its next read is due: one more round through
    the longest tier that fits, the same marks kept, the file not read, no event."""

    async def never(request: Request, request_id: str) -> Outcome:
        raise AssertionError("a round reads nothing and uploads nothing")

    rig = Rig(never, never)
    since = (datetime.now(UTC) - timedelta(minutes=1)).isoformat(timespec="milliseconds")
    due = (datetime.now(UTC) + timedelta(minutes=10)).isoformat(timespec="milliseconds")
    delivery = rig.deliver(
        headers={FOLLOW_SINCE_HEADER: since, CHECKS_HEADER: 4, READ_AT_HEADER: due}
    )
    await rig.settled()
    [copy] = rig.outbox.entries("confirmed")
    assert copy.target == f"queue:{rig.topology.tier(2).name}"
    assert copy.message is not None and copy.message.body == BODY
    assert copy.headers[CHECKS_HEADER] == 4 and copy.headers[FOLLOW_SINCE_HEADER] == since
    assert copy.headers[READ_AT_HEADER] == due
    assert rig.outbox.kinds()[-1] == f"ack {delivery.delivery_tag}"
    assert rig.metrics.tracked._value.get() == 0, "still followed: gone out and back in"


async def test_a_read_copy_still_pending_is_parked_again_without_an_event() -> None:
    """Still accepted: a new copy to a delay tier, the reads so far counted, no event."""

    async def never(request: Request, request_id: str) -> Outcome:
        raise AssertionError("a follow-up never uploads")

    rig = Rig(never, returning(Outcome(2.0, "mindset", file=ACCEPTED)))
    since = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    rig.deliver(headers={FOLLOW_SINCE_HEADER: since, CHECKS_HEADER: 0})
    await rig.settled()
    [copy] = rig.outbox.entries("confirmed")
    assert copy.target.startswith("queue:") and copy.headers[CHECKS_HEADER] == 1
