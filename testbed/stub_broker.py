"""A broker-free stand-in for the settler's publisher and deliveries, for fast tests.

:class:`StubOutbox` takes the publisher's place (it satisfies
``service.amqp.publisher.Outbox``): it records every publish in one
:attr:`StubOutbox.log` beside the acks of :class:`StubDelivery`, and confirms at
once or only when told. A :class:`StubChannel` can be closed under a delivery, as
a lost channel is. Nothing here opens a socket; everything runs on any event
loop, virtual time included.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import aio_pika
import orjson

from service.amqp.publisher import DeliveryGone, Tracked


@dataclass(frozen=True, slots=True)
class Entry:
    """One thing that happened, in order: a publish handed over, confirmed, or an ack."""

    kind: Literal["sent", "confirmed", "ack", "reply"]
    target: str  # "exchange:<routing key>", "queue:<name>", or the acked delivery's tag
    message: aio_pika.Message | None = None

    @property
    def body(self) -> Any:
        """The published message's JSON body."""
        assert self.message is not None
        return orjson.loads(self.message.body)

    @property
    def headers(self) -> Mapping[str, Any]:
        """The published message's headers."""
        assert self.message is not None
        return self.message.headers or {}


class StubOutbox:
    """Publishes into a log instead of a broker; confirms at once unless :meth:`hold`."""

    def __init__(self) -> None:
        self.log: list[Entry] = []
        self.generation = 1
        self.up = True
        self.reply_ok = True  # what best-effort (reply_to) publishes report
        self._held = False
        self._pending: list[asyncio.Future[None]] = []

    @property
    def ready(self) -> bool:
        """Connected (:attr:`up`)."""
        return self.up

    def live(self, generation: int | None) -> bool:
        """A publish of ``generation`` counts while that connection is up."""
        return self.up and generation == self.generation

    async def event(self, key: str, message: aio_pika.Message, work: Tracked | None = None) -> None:
        """Publish an event to the exchange; wait for its confirm."""
        await self._publish(f"exchange:{key}", message, work)

    async def to_queue(
        self, queue: str, message: aio_pika.Message, work: Tracked | None = None
    ) -> None:
        """Publish to a queue; wait for its confirm."""
        await self._publish(f"queue:{queue}", message, work)

    async def best_effort(self, queue: str, message: aio_pika.Message, grace: float) -> bool:
        """Record a reply_to publish; report :attr:`reply_ok`."""
        self.log.append(Entry("reply", f"queue:{queue}", message))
        return self.reply_ok

    async def _publish(self, target: str, message: aio_pika.Message, work: Tracked | None) -> None:
        if work is not None and not work.alive():
            raise DeliveryGone
        if work is not None:
            work.sent(self.generation)
        self.log.append(Entry("sent", target, message))
        if self._held:
            confirm = asyncio.get_running_loop().create_future()
            self._pending.append(confirm)
            await confirm
        self.log.append(Entry("confirmed", target, message))

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Within the block, confirms wait for :meth:`confirm`; at its end all are given."""
        self._held = True
        try:
            yield
        finally:
            self._held = False
            self.confirm()

    def confirm(self) -> int:
        """Confirm every publish waiting for it; how many there were."""
        pending, self._pending = self._pending, []
        for future in pending:
            if not future.done():
                future.set_result(None)
        return len(pending)

    @property
    def waiting(self) -> int:
        """Publishes handed over and not yet confirmed."""
        return sum(not f.done() for f in self._pending)

    def entries(self, kind: str) -> list[Entry]:
        """The log's entries of one kind, in order."""
        return [entry for entry in self.log if entry.kind == kind]

    def kinds(self) -> list[str]:
        """``kind target`` for each entry, in order (for asserting the sequence)."""
        return [f"{entry.kind} {entry.target}" for entry in self.log]


class StubChannel:
    """The channel a delivery came on; :meth:`close` loses it."""

    def __init__(self) -> None:
        self.is_closed = False

    def close(self) -> None:
        """The channel is gone: its deliveries' tags mean nothing any more."""
        self.is_closed = True


@dataclass
class StubDelivery:
    """A delivery as the settler reads it; its ack goes into the outbox's log."""

    outbox: StubOutbox
    body: bytes
    channel: StubChannel = field(default_factory=StubChannel)
    headers: dict[str, Any] = field(default_factory=dict)
    message_id: str | None = None
    correlation_id: str | None = None
    reply_to: str | None = None
    routing_key: str | None = None  # the queue it came from (None: the request queue)
    delivery_tag: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    content_type: str | None = "application/json"
    content_encoding: str | None = None
    priority: int | None = None
    timestamp: datetime | None = None
    type: str | None = None
    app_id: str | None = None
    acks: int = 0

    async def ack(self, multiple: bool = False) -> None:
        """Ack on the delivery's channel; a closed one refuses, as aio-pika's does."""
        if self.channel.is_closed:
            raise aio_pika.exceptions.ChannelInvalidStateError("the channel is closed")
        self.acks += 1
        self.outbox.log.append(Entry("ack", self.delivery_tag))
