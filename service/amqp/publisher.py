"""Connections to the broker, and publishing with confirms.

:class:`Link` keeps one AMQP connection to the first node of
``COURIER_AMQP_URL`` that answers and, when it is lost, reconnects, trying the
next node first (a cluster's other nodes take over when one goes). Courier has
two links, one to consume and one to publish, as RabbitMQ advises.

:class:`Publisher` publishes on the publishing link and waits for the broker's
confirm for as long as the connection lives: a slow confirm (a stalled link, a
broker blocking publishers) is waited for, never given up on, so a delivery is
never returned to the broker while the copy it made may be live. Only when the
connection is lost before the confirm is the outcome unknown; the message is
then published again on the next connection (docs/reliability.md explains why
that leaves one live copy).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange

from service.amqp.declare import declare_events, declare_own_queues, declare_queue
from service.amqp.hooks import LinkHooks, PublishHooks
from service.amqp.topology import Topology
from service.redact import redact_url

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0
FIRST_BACKOFF = 0.5
MAX_BACKOFF = 2.0  # a node back from a restart is found within 2 s
UNROUTABLE_WARNING_PERIOD = 300.0  # at most one warning per routing key in this many seconds
# What a lost or refused connection raises in aio-pika, aiormq and the socket layer.
CONNECTION_ERRORS: tuple[type[Exception], ...] = (
    aiormq.exceptions.AMQPError,
    aio_pika.exceptions.AMQPException,
    ConnectionError,
    OSError,
    TimeoutError,
    RuntimeError,
)


class DeliveryGone(Exception):
    """The delivery a publish belonged to was lost with its channel: publish nothing more."""


class Tracked(Protocol):
    """The delivery a publish is made for, as the publisher sees it."""

    def alive(self) -> bool:
        """Whether the delivery is still ours (its channel open)."""

    def sent(self, generation: int) -> None:
        """A publish was handed to the publishing connection of ``generation``."""


class Link:
    """One connection to the first broker node that answers; reconnects and fails over."""

    def __init__(
        self,
        urls: Sequence[str],
        purpose: str,
        *,
        on_open: Callable[[AbstractConnection], Awaitable[None]],
        hooks: LinkHooks,
    ) -> None:
        self._urls = list(urls)
        self._index = 0
        self.purpose = purpose
        self._on_open = on_open
        self._hooks = hooks
        self.connection: AbstractConnection | None = None
        self.ready = asyncio.Event()  # connected, and on_open has set it up
        self.unblocked = asyncio.Event()
        self.unblocked.set()
        self.generation = 0
        self.on_blocked: list[Callable[[bool], None]] = []  # told of blocked / unblocked
        self._closing = False
        self._task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        """The node this link is connected to (or will try next), without credentials."""
        return redact_url(self._urls[self._index])

    def start(self) -> None:
        """Start connecting in the background (forever, until :meth:`close`)."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"courier-{self.purpose}-link")

    async def _run(self) -> None:
        backoff = FIRST_BACKOFF
        failures = 0
        while not self._closing:
            url = self._urls[self._index]
            connection = await self._connect(url)
            if connection is None:
                failures += 1
                self._index = (self._index + 1) % len(self._urls)
                if failures % len(self._urls) == 0:  # every node refused: back off
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, MAX_BACKOFF)
                continue
            failures, backoff = 0, FIRST_BACKOFF
            closed = asyncio.Event()
            connection.close_callbacks.add(lambda *_, event=closed: event.set())
            self.connection = connection
            self.generation += 1
            self.ready.set()
            self._hooks.link_up(self.purpose, self.generation > 1)
            log.info("%s connection open to %s", self.purpose, redact_url(url))
            await closed.wait()
            self.ready.clear()
            self.connection = None
            self._set_blocked(False)
            if self._closing:
                return
            self._hooks.link_down(self.purpose)
            log.warning("lost the %s connection to %s; reconnecting", self.purpose, redact_url(url))
            # A node that just went away is the least likely to answer: the next one first.
            self._index = (self._index + 1) % len(self._urls)

    async def _connect(self, url: str) -> AbstractConnection | None:
        try:
            connection = await aio_pika.connect(
                url,
                timeout=CONNECT_TIMEOUT,
                client_properties={"connection_name": f"courier-{self.purpose}"},
            )
        except CONNECTION_ERRORS as exc:
            log.error(
                "cannot reach RabbitMQ at %s (%s). Start a broker (for example "
                "`rabbitmq-server -detached`) or set COURIER_AMQP_URL.",
                redact_url(url),
                type(exc).__name__,
            )
            return None
        self._watch_blocked(connection)
        try:
            await self._on_open(connection)
        except CONNECTION_ERRORS as exc:
            log.warning("could not set up the %s connection (%r)", self.purpose, exc)
            await _close(connection, 2.0)
            return None
        return connection

    def _watch_blocked(self, connection: AbstractConnection) -> None:
        """Follow ``connection.blocked``/``unblocked``, which aio-pika does not report.

        aiormq handles both frames in name-mangled methods; wrapping them on this
        instance lets the link know while still letting aiormq do its part.
        """
        raw = getattr(getattr(connection, "transport", None), "connection", None)
        for frame, is_blocked in (("blocked", True), ("unblocked", False)):
            name = f"_Connection__handle_connection_{frame}"
            original = getattr(raw, name, None)
            if original is None:
                log.warning("this aiormq does not report connection.blocked; not watching it")
                return

            async def handler(
                payload: Any, _original: Any = original, _blocked: bool = is_blocked
            ) -> None:
                await _original(payload)
                self._set_blocked(_blocked)

            setattr(raw, name, handler)

    def _set_blocked(self, is_blocked: bool) -> None:
        if is_blocked == (not self.unblocked.is_set()):
            return
        if is_blocked:
            self.unblocked.clear()
            log.warning("RabbitMQ blocks the %s connection (a resource alarm)", self.purpose)
        else:
            self.unblocked.set()
            log.info("RabbitMQ unblocked the %s connection", self.purpose)
        self._hooks.blocked(self.purpose, is_blocked)
        for listener in self.on_blocked:
            listener(is_blocked)

    async def close(self, grace: float = 3.0) -> None:
        """Close the connection and stop reconnecting; at most ``grace`` seconds."""
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        connection, self.connection = self.connection, None
        self.ready.clear()
        if connection is not None:
            await _close(connection, grace)


def _slow_confirm_warning(key: str, seconds: float) -> None:
    log.warning(
        "the broker has not confirmed a publish to %s for %.0fs; still waiting", key, seconds
    )


async def _close(connection: AbstractConnection, grace: float) -> None:
    """Close politely; when the broker does not answer in time (down, or blocking us), drop it.

    Never a reset: what was written is still read by the broker before the end.
    """
    try:
        await asyncio.wait_for(connection.close(), grace)
    except CONNECTION_ERRORS:
        raw = getattr(getattr(connection, "transport", None), "connection", None)
        writer = getattr(raw, "_writer", None)
        if writer is not None:
            writer.transport.close()


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
        self._events: AbstractExchange | None = None
        self._reopening = asyncio.Lock()
        self._own = topology.own_queues()

    async def _open(self, connection: AbstractConnection) -> None:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        self._events = await declare_events(channel, self.topology)
        await declare_own_queues(channel, self.topology)
        self._channel = channel

    @property
    def ready(self) -> bool:
        """Connected, not blocked, with an open channel."""
        channel = self._channel
        return (
            self.link.ready.is_set()
            and self.link.unblocked.is_set()
            and channel is not None
            and not channel.is_closed
        )

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
        while True:
            await self._wait_ready(work)
            channel = self._channel
            assert channel is not None  # noqa: S101 - _wait_ready saw it open
            target = self._events if exchange is None else channel.default_exchange
            assert target is not None  # noqa: S101
            generation = self.link.generation
            if work is not None:
                work.sent(generation)
            # Only a warning when the confirm is slow: the wait itself has no end.
            slow = asyncio.get_running_loop().call_later(
                self._slow_confirm, _slow_confirm_warning, key, self._slow_confirm
            )
            try:
                await target.publish(message, routing_key=key, mandatory=mandatory, timeout=None)
                return
            except aio_pika.exceptions.DeliveryError as exc:
                if exchange is None and isinstance(exc.frame, aiormq.spec.Basic.Return):
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
        if isinstance(frame, aiormq.spec.Basic.Return) and key in self._own:
            log.warning("queue %s is missing; declaring it again", key)
            channel = self._channel
            if channel is not None and not channel.is_closed:
                with contextlib.suppress(*CONNECTION_ERRORS):
                    await declare_queue(channel, self._own[key])
            return
        # A nack: the broker could not take it now (a queue without quorum, a full queue).
        log.warning("the broker refused a publish to %s; trying again shortly", key)
        await asyncio.sleep(1.0)
