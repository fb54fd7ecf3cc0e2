"""One connection to the broker that reconnects and fails over across a cluster's nodes.

:class:`Link` keeps one AMQP connection to the first node of
``COURIER_AMQP_URL`` that answers and, when it is lost, reconnects, trying the
next node first (a cluster's other nodes take over when one goes). Courier has
two links, one to consume and one to publish, as RabbitMQ advises.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractConnection

from service.amqp.hooks import LinkHooks
from service.redact import redact_url

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0
FIRST_BACKOFF = 0.5
MAX_BACKOFF = 2.0  # a node back from a restart is found within 2 s
# What a lost or refused connection raises in aio-pika, aiormq and the socket layer.
CONNECTION_ERRORS: tuple[type[Exception], ...] = (
    aiormq.exceptions.AMQPError,
    aio_pika.exceptions.AMQPException,
    ConnectionError,
    OSError,
    TimeoutError,
    RuntimeError,
)


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
