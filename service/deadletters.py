"""Dead letters: look at, replay or purge the ones that match a filter, each once.

One pass takes every letter present at the start with ``basic.get``, one at a
time, and decides: a letter that is handled (replayed or purged) is published
where it goes (confirmed) and then acked; every other letter, and every letter
that is only looked at, is published again to the tail of the dead-letter
queue, byte for byte with its headers (confirmed), and then acked. A pass of
the whole queue therefore leaves the letters it keeps in their order, never
loses one (nothing is acked before its copy is confirmed; a crash in between
leaves a duplicate, never a gap) and never visits a letter twice: it stops after
as many letters as the queue held at the start, so one that fails straight
back into the queue during the run is not seen again.

Letters are never handed back unacknowledged: on quorum queues each return
counts toward the broker's delivery limit (RabbitMQ 4.0 to 4.2 count every
return, and 4.x sets a default limit of 20), so looking at letters must not
wear them out.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import aio_pika
import orjson
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from service.amqp.declare import declare_queue
from service.amqp.wire import copy_message
from service.config import MAX_MESSAGE_BYTES, parse_duration
from service.copies import carried_headers, replay_headers
from service.messages import Envelope, peek, request_id
from service.topology import (
    ATTEMPTS_HEADER,
    ERROR_CODE_HEADER,
    ERROR_MESSAGE_HEADER,
    FAILED_AT_HEADER,
    Topology,
)

Action = Literal["list", "replay", "purge"]
_GET_TIMEOUT = 10.0
_PROGRESS_EVERY = 1.0  # seconds between progress lines on stderr


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """``2h``, ``30m``, ``1d`` (that long ago) or an ISO 8601 time (UTC when it has no zone)."""
    now = now or datetime.now(UTC)
    if re.fullmatch(r"\s*\d+\s*(ms|s|m|h|d)\s*", text, re.IGNORECASE):
        return now - timedelta(seconds=parse_duration(text))
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"{text!r} is neither a duration such as 2h nor a time such as 2026-11-24T10:00Z"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return None if value is None else str(value)


@dataclass(frozen=True, slots=True)
class Letter:
    """What an operator wants to know about one dead letter, read from its headers and body."""

    request_id: str
    code: str | None
    message: str | None
    attempts: int | None
    failed_at: str | None
    destination: str | None
    message_id: str | None
    body: bytes = field(repr=False)

    @classmethod
    def from_message(
        cls, message: AbstractIncomingMessage, max_bytes: int = MAX_MESSAGE_BYTES
    ) -> Letter:
        """Read a dead letter as Courier writes it; anything missing is None. Its
        ``request_id`` is the one its events carry (read as the service read the body,
        whose size limit is ``max_bytes``; derived from the body when it names none)."""
        headers = message.headers or {}
        body_id = peek(message.body, max_bytes).request_id
        attempts = headers.get(ATTEMPTS_HEADER)
        return cls(
            request_id=request_id(body_id, Envelope(message.message_id or None), message.body),
            code=_text(headers.get(ERROR_CODE_HEADER)),
            message=_text(headers.get(ERROR_MESSAGE_HEADER)),
            attempts=attempts if isinstance(attempts, int) else None,
            failed_at=_text(headers.get(FAILED_AT_HEADER)),
            destination=_destination_of(message.body),
            message_id=message.message_id,
            body=message.body,
        )

    @property
    def failed_time(self) -> datetime | None:
        """``failed_at`` as a time (UTC when it has no zone), or None when unreadable."""
        if not self.failed_at:
            return None
        try:
            moment = datetime.fromisoformat(self.failed_at)
        except ValueError:
            return None
        return moment if moment.tzinfo else moment.replace(tzinfo=UTC)

    def to_json(self) -> dict[str, Any]:
        """The letter as printed by ``--json``; the body as text."""
        return {
            "requestId": self.request_id,
            "errorCode": self.code,
            "errorMessage": self.message,
            "attempts": self.attempts,
            "failedAt": self.failed_at,
            "destination": self.destination,
            "messageId": self.message_id,
            "body": self.body.decode("utf-8", "replace"),
        }


def _destination_of(body: bytes) -> str | None:
    """The body's ``destination.type``, where it has one (any text: a filter may look for
    a wrong one)."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    destination = data.get("destination") if isinstance(data, dict) else None
    kind = destination.get("type") if isinstance(destination, dict) else None
    return kind if isinstance(kind, str) else None


@dataclass(frozen=True, slots=True)
class Selection:
    """Which letters a command applies to; an empty criterion matches everything."""

    codes: frozenset[str] = frozenset()
    destinations: frozenset[str] = frozenset()
    since: datetime | None = None
    request_ids: frozenset[str] = frozenset()

    def matches(self, letter: Letter) -> bool:
        """Whether ``letter`` meets every given criterion."""
        if self.codes and letter.code not in self.codes:
            return False
        if self.destinations and letter.destination not in self.destinations:
            return False
        if self.request_ids and not ({letter.request_id, letter.message_id} & self.request_ids):
            return False
        if self.since is not None:
            failed = letter.failed_time
            if failed is None or failed < self.since:
                return False
        return True


@dataclass(slots=True)
class Sweep:
    """What one pass did."""

    action: Action
    dry_run: bool
    in_queue: int  # letters present at the start
    visited: int = 0
    matching: int = 0  # matching letters seen (including those past the limit)
    handled: list[Letter] = field(default_factory=list)
    complete: bool = True  # False when it stopped early (the rest was left untouched)


Progress = Callable[[Sweep], None]


class _Pace:
    """At most ``rate`` events per second, the first at once."""

    def __init__(self, rate: float | None) -> None:
        self._interval = 1 / rate if rate else 0.0
        self._next = 0.0

    async def wait(self) -> None:
        if not self._interval:
            return
        now = time.monotonic()
        if self._next > now:
            await asyncio.sleep(self._next - now)
        self._next = max(now, self._next) + self._interval


async def sweep(
    channel: AbstractChannel,
    topology: Topology,
    action: Action,
    selection: Selection,
    *,
    limit: int | None = None,
    rate: float | None = None,
    dry_run: bool = False,
    publish_timeout: float = 10.0,
    progress: Progress | None = None,
    max_bytes: int = MAX_MESSAGE_BYTES,
) -> Sweep:
    """One pass over the dead-letter queue; ``channel`` must have publisher confirms.

    ``list`` and ``dry_run`` only look: every letter stays, in its order. ``replay``
    moves the matching letters to the request queue (Courier's and the broker's
    bookkeeping headers stripped, so the attempt count starts again; body and
    message id kept), at most ``rate`` per second; ``purge`` deletes them.
    ``limit`` caps how many matching letters are handled; ``max_bytes`` is the
    service's ``COURIER_MAX_MESSAGE_BYTES`` (letters are known by the ids it gave them).
    """
    moves = action != "list" and not dry_run
    try:
        dead = await channel.declare_queue(topology.dead.name, passive=True)
    except aio_pika.exceptions.ChannelNotFoundEntity:
        return Sweep(action, dry_run, in_queue=0)
    if action == "replay" and moves:
        # Declared (idempotently) so a replayed letter cannot vanish unrouted.
        await declare_queue(channel, topology.requests)
    result = Sweep(action, dry_run, in_queue=dead.declaration_result.message_count or 0)
    pace = _Pace(rate if action == "replay" and moves else None)
    kept = 0  # letters put back at the tail so far
    last_report = time.monotonic()
    for _ in range(result.in_queue):
        if limit is not None and len(result.handled) >= limit and kept == 0:
            # Everything taken so far left the queue: the rest is untouched and in order.
            result.complete = False
            break
        message = await dead.get(no_ack=False, fail=False, timeout=_GET_TIMEOUT)
        if message is None:  # someone else took the rest
            break
        result.visited += 1
        if progress is not None and time.monotonic() - last_report >= _PROGRESS_EVERY:
            last_report = time.monotonic()
            progress(result)
        letter = Letter.from_message(message, max_bytes)
        chosen = selection.matches(letter)
        result.matching += chosen
        if chosen and (limit is None or len(result.handled) < limit):
            result.handled.append(letter)
            if moves:
                if action == "replay":
                    await pace.wait()
                    await channel.default_exchange.publish(
                        copy_message(message, replay_headers(message.headers or {})),
                        routing_key=topology.requests.name,
                        mandatory=True,
                        timeout=publish_timeout,
                    )
                await message.ack()
                continue
        await channel.default_exchange.publish(
            copy_message(message, carried_headers(message.headers)),
            routing_key=topology.dead.name,
            mandatory=True,
            timeout=publish_timeout,
        )
        await message.ack()
        kept += 1
    return result


_COLUMNS = ("REQUEST ID", "CODE", "DESTINATION", "ATTEMPTS", "FAILED AT", "MESSAGE")
_MESSAGE_WIDTH = 70


def table(letters: list[Letter]) -> str:
    """The letters as a plain-text table, one line each (long messages cut)."""
    rows = [_COLUMNS]
    for letter in letters:
        text = " ".join((letter.message or "").split())
        if len(text) > _MESSAGE_WIDTH:
            text = text[: _MESSAGE_WIDTH - 3] + "..."
        rows.append(
            (
                letter.request_id,
                letter.code or "-",
                letter.destination or "-",
                "-" if letter.attempts is None else str(letter.attempts),
                letter.failed_at or "-",
                text or "-",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False))
        + "  "
        + row[-1]
        for row in rows
    )


def summary(result: Sweep, topology: Topology, rate: float | None = None) -> str:
    """One sentence saying what the pass did."""
    dead, n = topology.dead.name, len(result.handled)
    seen = (
        f"{result.matching} of {result.visited} letters in {dead} matched"
        if result.complete
        else f"stopped after {n} matching letters at the head of {dead}"
    )
    if result.action == "list":
        return f"{seen}; showing {n}"
    if result.action == "purge":
        if result.dry_run:
            return f"{seen}; dry run: would delete {n}, nothing was deleted"
        return f"{seen}; deleted {n}"
    target = topology.requests.name
    if result.dry_run:
        return f"{seen}; dry run: would replay {n} to {target}, nothing was moved"
    paced = f" at most {rate:g} per second" if rate else ""
    return f"{seen}; replayed {n} to {target}{paced}"


def as_json(result: Sweep, topology: Topology) -> dict[str, Any]:
    """The pass as printed by ``--json``."""
    doc: dict[str, Any] = {
        "action": result.action,
        "dryRun": result.dry_run,
        "queue": topology.dead.name,
        "inQueue": result.in_queue,
        "visited": result.visited,
        "matching": result.matching if result.complete else None,
        "letters": [letter.to_json() for letter in result.handled],
    }
    if result.action == "replay":
        doc["replayed"] = 0 if result.dry_run else len(result.handled)
        doc["to"] = topology.requests.name
    elif result.action == "purge":
        doc["purged"] = 0 if result.dry_run else len(result.handled)
    return doc
