"""Publishing with confirms on the publishing link.

:class:`Publisher` publishes on its :class:`~service.amqp.link.Link` and waits for
the broker's confirm for as long as the connection lives: a slow confirm (a stalled
link, a broker blocking publishers) is waited for, never given up on, so a delivery
is never returned to the broker while the copy it made may be live. Only when the
connection is lost before the confirm is the outcome unknown; the message is then
published again on the next connection (docs/reliability.md explains why that
leaves one live copy).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Protocol, cast

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection

from service.amqp.declare import declare_events, declare_own_queues, declare_queue
from service.amqp.hooks import PublishHooks
from service.amqp.link import CONNECTION_ERRORS, Link
from service.topology import Topology

log = logging.getLogger(__name__)
UNROUTABLE_WARNING_PERIOD = 300.0  # at most one warning per routing key in this many seconds


class DeliveryGone(Exception):
    """The delivery a publish belonged to was lost with its channel: publish nothing more."""


class Tracked(Protocol):
    """The delivery a publish is made for, as the publisher sees it."""

    def alive(self) -> bool:
        """Whether the delivery is still ours (its channel open)."""

    def sent(self, generation: int) -> None:
        """A publish was handed to the publishing connection of ``generation``."""


class Outbox(Protocol):
    """What settling a delivery needs of the publisher (:class:`Publisher`, or a stub)."""

    @property
    def ready(self) -> bool:
        """Connected, not blocked, able to publish now."""

    def live(self, generation: int | None) -> bool:
        """Whether a publish handed to connection ``generation`` will be read by the broker."""

    async def event(self, key: str, message: aio_pika.Message, work: Tracked | None = None) -> None:
        """Publish a result event and wait for its confirm."""

    async def to_queue(
        self, queue: str, message: aio_pika.Message, work: Tracked | None = None
    ) -> None:
        """Publish to one of Courier's own queues and wait for its confirm."""

    async def best_effort(self, queue: str, message: aio_pika.Message, grace: float) -> bool:
        """Publish once to a queue that is not Courier's; never raises."""


def _slow_confirm_warning(key: str, seconds: float) -> None:
    log.warning(
        "the broker has not confirmed a publish to %s for %.0fs; still waiting", key, seconds
    )


class Publisher:
    """Confirmed publishing on the publishing link, to the events exchange or a queue."""

    def __init__(
        self,
        link_urls: Sequence[str],
        topology: Topology,
        hooks: PublishHooks,
        *,
        slow_confirm: float = 10.0,
    ) -> None:
        self.topology = topology
        self._hooks = hooks
        self._unroutable: dict[str, tuple[float, int]] = {}  # key: (last warned, since)
        self.link = Link(link_urls, "publish", on_open=self._open, hooks=hooks)
        self._slow_confirm = slow_confirm
        self._channel: AbstractChannel | None = None
        self._reopening = asyncio.Lock()

    async def _open(self, connection: AbstractConnection) -> None:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        await declare_events(channel, self.topology)
        await declare_own_queues(channel, self.topology)
        self._channel = channel

    def start(self, on_blocked: Callable[[bool], None] | None = None) -> None:
        """Start connecting; ``on_blocked`` hears when the broker blocks or unblocks us."""
        if on_blocked is not None:
            self.link.on_blocked.append(on_blocked)
        self.link.start()

    async def close(self, grace: float) -> None:
        """Close the publishing connection (at most ``grace`` seconds)."""
        await self.link.close(grace=grace)

    @property
    def ready(self) -> bool:
        """Connected, not blocked, with an open channel."""
        channel = self._channel
        return self._up() and channel is not None and not channel.is_closed

    @property
    def blocked(self) -> bool:
        """Whether the broker blocks the publishing connection now (a resource alarm)."""
        return not self.link.unblocked.is_set()

    def live(self, generation: int | None) -> bool:
        """Whether a publish handed to connection ``generation`` is read by the broker: that
        connection is still up and unblocked, so it reads what was written before its end."""
        return generation == self.link.generation and self._up()

    def _up(self) -> bool:
        return self.link.ready.is_set() and self.link.unblocked.is_set()

    async def event(self, key: str, message: aio_pika.Message, work: Tracked | None = None) -> None:
        """Publish a result event and wait for its confirm.

        Published ``mandatory``: an event that no queue is bound for comes back, and
        is counted and warned about instead of vanishing unseen. It is not a failure
        of the request: the event was taken by the broker, only nobody listens yet.
        """
        await self._publish(None, key, message, work=work, mandatory=True)

    async def to_queue(
        self, queue: str, message: aio_pika.Message, work: Tracked | None = None
    ) -> None:
        """Publish to one of Courier's own queues (routed, or the queue is declared again)."""
        await self._publish("", queue, message, work=work, mandatory=True)

    async def best_effort(self, queue: str, message: aio_pika.Message, grace: float) -> bool:
        """Publish once to a queue that is not Courier's (``reply_to``); never raises."""
        try:
            await asyncio.wait_for(self._wait_ready(None), grace)
            channel = self._channel
            assert channel is not None  # noqa: S101 - _wait_ready saw it open
            await channel.default_exchange.publish(message, routing_key=queue, timeout=grace)
        except (*CONNECTION_ERRORS, aio_pika.exceptions.DeliveryError) as exc:  # type: ignore[misc]
            log.warning("could not publish to reply_to queue %s (%s)", queue, type(exc).__name__)
            return False
        return True

    async def _wait_ready(self, work: Tracked | None) -> None:
        while True:
            if work is not None and not work.alive():
                raise DeliveryGone
            await self.link.ready.wait()
            await self.link.unblocked.wait()
            channel = self._channel
            if channel is not None and not channel.is_closed:
                return
            await self._reopen()

    async def _reopen(self) -> None:
        """Reopen a channel the broker closed (after a channel error), declaring again."""
        async with self._reopening:
            channel, connection = self._channel, self.link.connection
            if channel is not None and not channel.is_closed:
                return
            if connection is None:
                await asyncio.sleep(0.1)
                return
            log.warning("the broker closed the publishing channel; opening a new one")
            try:
                await self._open(connection)
            except CONNECTION_ERRORS as exc:
                log.warning("could not reopen the publishing channel (%r)", exc)
                await asyncio.sleep(0.5)

    async def _publish(
        self,
        exchange: str | None,
        key: str,
        message: aio_pika.Message,
        *,
        work: Tracked | None,
        mandatory: bool,
    ) -> None:
        """Publish until the broker confirms; ``work`` is the delivery it is for.

        A broker that refused the message (a nack, an unroutable message, a missing
        exchange) did not take it: it is safe to publish again. A connection lost
        before the confirm leaves the outcome unknown: it is published again too,
        under the same message id and headers.
        """
        events = exchange is None
        name = self.topology.events_exchange if exchange is None else exchange
        while True:
            await self._wait_ready(work)
            channel = self._channel
            assert channel is not None  # noqa: S101 - _wait_ready saw it open
            generation = self.link.generation
            if work is not None:
                work.sent(generation)
            # Only a warning when the confirm is slow: the wait itself has no end.
            slow = asyncio.get_running_loop().call_later(
                self._slow_confirm, _slow_confirm_warning, key, self._slow_confirm
            )
            try:
                # aiormq's own channel: not waiting for the frames to be written before
                # waiting for the confirm (``wait=False``, not in its abstract API)
                # saves a wakeup per publish; the confirm comes once the broker has them.
                underlay = cast(aiormq.Channel, await channel.get_underlay_channel())
                await underlay.basic_publish(
                    message.body,
                    exchange=name,
                    routing_key=key,
                    properties=message.properties,
                    mandatory=mandatory,
                    wait=False,
                )
                return
            except aio_pika.exceptions.DeliveryError as exc:
                if events and isinstance(exc.frame, aiormq.spec.Basic.Return):
                    self._event_unroutable(key)
                    return
                await self._refused(exc, key)
            except aio_pika.exceptions.ChannelNotFoundEntity:
                log.warning("publishing to %s found an entity missing; declaring again", key)
            except CONNECTION_ERRORS as exc:
                if self.link.generation == generation and self.link.ready.is_set():
                    # The channel, not the connection, failed: the broker refused this
                    # publish, or closed the channel; a new channel is opened above.
                    log.warning("publishing to %s failed on its channel (%r)", key, exc)
                else:
                    log.warning(
                        "lost the connection before the broker confirmed a publish to %s; "
                        "publishing it again once reconnected",
                        key,
                    )
            finally:
                slow.cancel()

    def _event_unroutable(self, key: str) -> None:
        self._hooks.event_unroutable(key)
        now = asyncio.get_running_loop().time()
        warned, since = self._unroutable.get(key, (None, 0))
        if warned is not None and now - warned < UNROUTABLE_WARNING_PERIOD:
            self._unroutable[key] = (warned, since + 1)
            return
        self._unroutable[key] = (now, 0)
        log.warning(
            "no queue is bound to exchange %s for routing key %s: the event was dropped by the "
            "broker%s (bind a queue, or watch with `courier events`)",
            self.topology.events_exchange,
            key,
            f"; {since} more since the last warning" if since else "",
        )

    async def _refused(self, exc: aio_pika.exceptions.DeliveryError, key: str) -> None:
        frame = exc.frame
        spec = self.topology.spec_of(key)
        if isinstance(frame, aiormq.spec.Basic.Return) and spec is not None:
            # A tenant's queue is declared on first use, an expired one again.
            log.info("queue %s is missing; declaring it", key)
            channel = self._channel
            if channel is not None and not channel.is_closed:
                with contextlib.suppress(*CONNECTION_ERRORS):
                    await declare_queue(channel, spec)
            return
        # A nack: the broker could not take it now (a queue without quorum, a full queue).
        log.warning("the broker refused a publish to %s; trying again shortly", key)
        await asyncio.sleep(1.0)
