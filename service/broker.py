"""RabbitMQ: topology, the consumer, the publisher, and the one place that acks.

Two connections, as RabbitMQ advises: one consumes requests, the other
publishes events, retries and dead letters with publisher confirms.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import aio_pika
import aiormq
import orjson
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)

from service.config import Settings
from service.contracts import SourceInfo, UploadRequest
from service.errors import CourierError, ErrorCode, PermanentError
from service.events import CONTENT_TYPE, build_event, routing_key
from service.logs import add_log_context, log_context
from service.messages import ATTEMPT_HEADER, TRACEPARENT, Envelope, parse_request, peek, request_id
from service.metrics import Metrics
from service.pipeline import Outcome
from service.redact import mask_text, redact_url
from service.tracing import record_outcome, request_span, traceparent

log = logging.getLogger(__name__)

Handler = Callable[[UploadRequest], Awaitable[Outcome]]
COURIER_HEADERS = (
    "x-courier-error-code",
    "x-courier-error-message",
    "x-courier-attempts",
    "x-courier-failed-at",
)
RECONNECT_INTERVAL = 2.0
_SETTLE_ERRORS = (
    aiormq.exceptions.AMQPError,
    aio_pika.exceptions.AMQPException,
    ConnectionError,
    TimeoutError,
    RuntimeError,
)


def main_queue_arguments(settings: Settings) -> dict[str, Any]:
    """The main quorum queue: the broker dead-letters what crashed consumers too often."""
    return {
        "x-queue-type": "quorum",
        "x-delivery-limit": settings.max_redeliveries + 2,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": settings.dead_queue,
    }


async def declare_queue(
    channel: AbstractChannel, name: str, arguments: dict[str, Any]
) -> AbstractQueue:
    """Declare a durable queue; one that exists with other arguments is used as it is.

    (Say, an older delivery limit: better to run than to refuse to start. The
    broker closes the channel on the mismatch, so it is reopened first.)
    """
    try:
        return await channel.declare_queue(name, durable=True, arguments=arguments)
    except aio_pika.exceptions.ChannelPreconditionFailed:
        log.warning("queue %s exists with different arguments; using it as is", name)
        await channel.reopen()
        return await channel.declare_queue(name, passive=True)


def pick_delay(delays: tuple[int, ...], attempt: int, retry_after: float | None) -> int:
    """The delay tier after ``attempt`` failed: one tier per attempt, or the first
    tier at least as long as the server's ``Retry-After``."""
    delay = delays[min(attempt - 1, len(delays) - 1)]
    if retry_after is not None and retry_after > delay:
        delay = next((d for d in delays if d >= retry_after), delays[-1])
    return delay


async def connect(url: str, purpose: str, stopping: asyncio.Event) -> AbstractRobustConnection:
    """Connect robustly, retrying with backoff (forever) until connected or stopping."""
    wait = 1.0
    while True:
        try:
            return await aio_pika.connect_robust(
                url,
                reconnect_interval=RECONNECT_INTERVAL,
                client_properties={"connection_name": f"courier-{purpose}"},
                timeout=10,
            )
        except (OSError, aiormq.exceptions.AMQPError, TimeoutError) as exc:
            log.error(
                "cannot reach RabbitMQ at %s (%s); retrying in %.0fs. Start a broker "
                "(for example `rabbitmq-server -detached`) or set COURIER_AMQP_URL.",
                redact_url(url),
                type(exc).__name__,
                wait,
            )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), wait)
        if stopping.is_set():
            raise asyncio.CancelledError
        wait = min(wait * 2, 30.0)


class Publisher:
    """Publishes with confirms (and a timeout) on its own connection."""

    def __init__(self, settings: Settings, channel: AbstractChannel, events: AbstractExchange):
        self._settings = settings
        self._channel = channel
        self._events = events

    @property
    def channel(self) -> AbstractChannel:
        """The confirmed channel everything is published on."""
        return self._channel

    async def publish(
        self,
        exchange: AbstractExchange,
        message: aio_pika.Message,
        key: str,
        *,
        mandatory: bool = False,
    ) -> None:
        """Publish and wait for the broker's confirm, at most ``publish_timeout`` seconds.

        ``mandatory``: a message no queue takes raises ``DeliveryError`` instead of
        being confirmed into nowhere.
        """
        await exchange.publish(
            message, routing_key=key, mandatory=mandatory, timeout=self._settings.publish_timeout
        )

    async def to_queue(
        self, queue: str, message: aio_pika.Message, *, mandatory: bool = False
    ) -> None:
        """Publish to a queue through the default exchange."""
        await self.publish(self._channel.default_exchange, message, queue, mandatory=mandatory)

    async def event(self, key: str, message: aio_pika.Message) -> None:
        """Publish a result event to the events exchange."""
        await self.publish(self._events, message, key)


def copy_message(incoming: AbstractIncomingMessage, headers: dict[str, Any]) -> aio_pika.Message:
    """The incoming message, byte for byte, with new headers; persistent."""
    return aio_pika.Message(
        body=incoming.body,
        headers=headers,
        content_type=incoming.content_type,
        content_encoding=incoming.content_encoding,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        priority=incoming.priority,
        correlation_id=incoming.correlation_id,
        reply_to=incoming.reply_to,
        message_id=incoming.message_id,
        timestamp=incoming.timestamp,
        type=incoming.type,
        user_id=None,
        app_id=incoming.app_id,
    )


class Broker:
    """Consumes requests and settles each one exactly once: event, retry or dead letter."""

    def __init__(self, settings: Settings, handler: Handler, metrics: Metrics) -> None:
        self.settings = settings
        self._handler = handler
        self._metrics = metrics
        self._stopping = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._consume_conn: AbstractRobustConnection | None = None
        self._publish_conn: AbstractRobustConnection | None = None
        self._queue: AbstractQueue | None = None
        self._consumer_tag: str | None = None
        self._consume_channel: AbstractChannel | None = None
        self._publisher: Publisher | None = None
        self._secrets = settings.secret_values()
        self._reopening = asyncio.Lock()
        # The queues Courier publishes to itself, with their arguments.
        self._own_queues: dict[str, dict[str, Any]] = {settings.dead_queue: {}}
        for delay in settings.retry_delays:
            self._own_queues[settings.retry_queue(delay)] = {
                "x-message-ttl": delay * 1000,
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": settings.queue,
            }

    # -- lifecycle ---------------------------------------------------------

    async def start(self) -> None:
        """Connect (retrying until the broker answers), declare the topology, consume."""
        s = self.settings
        self._publish_conn = await connect(s.amqp_url, "publish", self._stopping)
        self._consume_conn = await connect(s.amqp_url, "consume", self._stopping)
        for conn in (self._publish_conn, self._consume_conn):
            conn.reconnect_callbacks.add(self._on_reconnect)
            conn.close_callbacks.add(self._on_close)
        pub_channel = await self._publish_conn.channel(
            publisher_confirms=True, on_return_raises=True
        )
        events = await pub_channel.declare_exchange(
            s.events_exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )
        for name, arguments in self._own_queues.items():
            await declare_queue(pub_channel, name, arguments)
        self._publisher = Publisher(s, pub_channel, events)
        channel = await self._consume_conn.channel(publisher_confirms=False)
        await channel.set_qos(prefetch_count=s.concurrency)
        self._consume_channel = channel
        self._queue = await declare_queue(channel, s.queue, main_queue_arguments(s))
        self._consumer_tag = await self._queue.consume(self._on_message, no_ack=False)
        self._metrics.broker_connected.set(1)
        self._metrics.consumer_active.set(1)
        log.info("consuming %s with prefetch %d", s.queue, s.concurrency)

    async def _to_own_queue(self, name: str, message: aio_pika.Message) -> None:
        """Publish to a retry tier or the dead letters, confirmed and routed.

        Should the queue have been deleted (by an operator, say), it is declared
        again and the publish retried once, rather than the message being
        confirmed into nowhere; a second failure leaves the request unsettled.
        """
        publisher = self._publisher
        assert publisher is not None  # noqa: S101 - start() sets it before consuming
        try:
            await publisher.to_queue(name, message, mandatory=True)
        except aio_pika.exceptions.DeliveryError:
            log.warning("queue %s is missing; declaring it again", name)
            await declare_queue(publisher.channel, name, self._own_queues[name])
            await publisher.to_queue(name, message, mandatory=True)

    async def _reopen_publisher(self) -> None:
        """Reopen the publishing channel if the broker closed it.

        The broker closes a channel on a channel-level error (a publish to an
        events exchange that an operator deleted, say), and aio-pika restores
        channels only after connection losses; without this every later publish
        would fail. Reopening declares its exchange and queues again.
        """
        publisher, conn = self._publisher, self._publish_conn
        if publisher is None or conn is None or not publisher.channel.is_closed:
            return
        async with self._reopening:
            if not publisher.channel.is_closed or not conn.connected.is_set():
                return  # reopened meanwhile, or the connection's own recovery will
            log.warning("the broker closed the publishing channel; reopening it")
            try:
                await publisher.channel.reopen()
            except _SETTLE_ERRORS as exc:
                log.warning("could not reopen the publishing channel (%s)", type(exc).__name__)

    async def ready(self) -> bool:
        """True only while both connections are up and the consumer is registered."""
        if self._stopping.is_set() or self._consumer_tag is None:
            return False
        conns = (self._consume_conn, self._publish_conn)
        if not all(c is not None and c.connected.is_set() and not c.is_closed for c in conns):
            return False
        channel = self._consume_channel
        publisher = self._publisher
        if channel is None or channel.is_closed or publisher is None or publisher.channel.is_closed:
            return False
        try:
            underlay = await asyncio.wait_for(channel.get_underlay_channel(), 0.5)
        except (TimeoutError, RuntimeError, aiormq.exceptions.AMQPError):
            return False
        # aiormq's channel tracks the consumers the broker has not cancelled.
        consumers = getattr(underlay, "consumers", {})
        return self._consumer_tag in consumers

    def _on_reconnect(self, *_: Any) -> None:
        self._metrics.reconnects.inc()
        self._metrics.broker_connected.set(1)
        log.info("reconnected to RabbitMQ")

    def _on_close(self, *_: Any) -> None:
        if not self._stopping.is_set():
            self._metrics.broker_connected.set(0)
            log.warning("lost the connection to RabbitMQ; reconnecting")

    async def stop(self) -> None:
        """Stop consuming, let in-flight work finish within the shutdown timeout,
        requeue the rest and close both connections."""
        self._stopping.set()
        self._metrics.consumer_active.set(0)
        if self._queue is not None and self._consumer_tag is not None:
            with contextlib.suppress(*_SETTLE_ERRORS):
                await self._queue.cancel(self._consumer_tag, timeout=5)
        self._consumer_tag = None
        if self._tasks:
            log.info(
                "waiting up to %.0fs for %d in-flight requests",
                self.settings.shutdown_timeout,
                len(self._tasks),
            )
            _, pending = await asyncio.wait(
                set(self._tasks), timeout=self.settings.shutdown_timeout
            )
            for task in pending:
                task.cancel()
            if pending:
                log.warning("requeueing %d unfinished requests", len(pending))
                await asyncio.gather(*pending, return_exceptions=True)
        for conn in (self._consume_conn, self._publish_conn):
            if conn is not None:
                with contextlib.suppress(*_SETTLE_ERRORS):
                    await conn.close()
        self._metrics.broker_connected.set(0)

    # -- consuming ---------------------------------------------------------

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        if self._stopping.is_set():
            await self._nack(message)
            return
        task = asyncio.create_task(self._handle(message))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle(self, message: AbstractIncomingMessage) -> None:
        envelope = Envelope.from_properties(
            message_id=message.message_id,
            correlation_id=message.correlation_id,
            reply_to=message.reply_to,
            headers=message.headers,
        )
        started = time.perf_counter()
        self._metrics.in_flight.inc()
        traceparent.set(envelope.traceparent)  # this task's context: outgoing calls carry it
        try:
            with (
                log_context(attempt=envelope.attempt, correlationId=envelope.correlation_id),
                request_span(envelope.traceparent, **{"courier.attempt": envelope.attempt}) as span,
            ):
                request, outcome, rid, metadata = await self._run(message, envelope)
                add_log_context(requestId=rid, destination=outcome.destination)
                record_outcome(span, outcome.error.code.value if outcome.error else None)
                await asyncio.shield(
                    self._settle(message, envelope, request, outcome, rid, metadata)
                )
                self._metrics.request_duration.labels(outcome.destination or "unknown").observe(
                    time.perf_counter() - started
                )
        except asyncio.CancelledError:
            # Shutdown ran out of time: give the message back to the broker.
            await asyncio.shield(self._nack(message))
            raise
        except Exception:
            log.exception("could not settle a message; leaving it to the broker to redeliver")
            await asyncio.shield(self._nack(message))
        finally:
            self._metrics.in_flight.dec()

    async def _run(
        self, message: AbstractIncomingMessage, envelope: Envelope
    ) -> tuple[UploadRequest | None, Outcome, str, dict[str, str]]:
        s = self.settings
        if envelope.delivery_count >= s.max_redeliveries:
            info = peek(message.body, s.max_message_bytes)
            error = PermanentError(
                ErrorCode.POISON_MESSAGE,
                f"the message was delivered {envelope.delivery_count} times without being "
                "settled; it crashes or stalls the consumer",
            )
            return (
                None,
                _failure(info.destination, info.source_url, error),
                request_id(info.request_id, envelope),
                info.metadata or {},
            )
        try:
            request = parse_request(message.body, s.max_message_bytes)
        except CourierError as error:
            info = peek(message.body, s.max_message_bytes)
            return (
                None,
                _failure(info.destination, info.source_url, error),
                request_id(info.request_id, envelope),
                info.metadata or {},
            )
        rid = request_id(request.id, envelope)
        with log_context(requestId=rid, destination=request.destination.type):
            outcome = await self._handler(request)
        return request, outcome, rid, request.metadata

    # -- settling: the only place that acks --------------------------------

    async def _settle(
        self,
        message: AbstractIncomingMessage,
        envelope: Envelope,
        request: UploadRequest | None,
        outcome: Outcome,
        rid: str,
        metadata: dict[str, str],
    ) -> None:
        s = self.settings
        error = outcome.error
        if error is not None:
            # An API may echo what it was sent; nothing secret leaves in an event.
            error.message = mask_text(error.message, self._secrets)
        destination = outcome.destination or "unknown"
        try:
            if (
                error is not None
                and error.retryable
                and request is not None
                and (envelope.attempt < s.max_attempts)
            ):
                delay = pick_delay(s.retry_delays, envelope.attempt, error.retry_after)
                headers = dict(message.headers or {})
                headers[ATTEMPT_HEADER] = envelope.attempt + 1
                await self._to_own_queue(s.retry_queue(delay), copy_message(message, headers))
                self._metrics.retries.labels(destination, error.code.value).inc()
                log.info(
                    "attempt %d failed (%s); retrying in %ds",
                    envelope.attempt,
                    error.code.value,
                    delay,
                    extra={"errorCode": error.code.value},
                )
            else:
                await self._publish_event(envelope, rid, metadata, outcome)
                if error is not None:
                    await self._dead_letter(message, envelope, error)
            await message.ack()
        except _SETTLE_ERRORS as exc:
            log.warning(
                "could not settle the message (%s); the broker will redeliver it",
                type(exc).__name__,
            )
            await self._reopen_publisher()
            await self._nack(message)
            return
        outcome_label = "succeeded" if error is None else "failed"
        if (
            error is None
            or not error.retryable
            or request is None
            or envelope.attempt >= s.max_attempts
        ):
            self._metrics.requests.labels(destination, outcome_label).inc()

    async def _publish_event(
        self, envelope: Envelope, rid: str, metadata: dict[str, str], outcome: Outcome
    ) -> None:
        publisher = self._publisher
        assert publisher is not None  # noqa: S101
        event = build_event(
            event_source=self.settings.event_source,
            request_id=rid,
            attempts=envelope.attempt,
            metadata=metadata,
            outcome=outcome,
        )
        body = event.to_json_dict()
        headers: dict[str, Any] = {}
        if envelope.traceparent:
            headers[TRACEPARENT] = envelope.traceparent

        def make() -> aio_pika.Message:
            return aio_pika.Message(
                body=orjson.dumps(body),
                content_type=CONTENT_TYPE,
                message_id=event.id,
                correlation_id=envelope.correlation_id or rid,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                headers=headers,
                type=event.type,
                timestamp=datetime.now(UTC),
            )

        key = routing_key(event)
        await publisher.event(key, make())
        if envelope.reply_to:
            await publisher.to_queue(envelope.reply_to, make())
        self._metrics.events.labels(event.type).inc()
        level = logging.INFO if outcome.error is None else logging.WARNING
        log.log(
            level,
            "request %s %s",
            rid,
            event.data.status,
            extra={"errorCode": outcome.error.code.value if outcome.error else None},
        )

    async def _dead_letter(
        self, message: AbstractIncomingMessage, envelope: Envelope, error: CourierError
    ) -> None:
        headers = dict(message.headers or {})
        headers.update(
            {
                "x-courier-error-code": error.code.value,
                "x-courier-error-message": error.message[:1000],
                "x-courier-attempts": envelope.attempt,
                "x-courier-failed-at": datetime.now(UTC).isoformat(timespec="milliseconds"),
            }
        )
        await self._to_own_queue(self.settings.dead_queue, copy_message(message, headers))
        self._metrics.dead_lettered.labels(error.code.value).inc()

    async def _nack(self, message: AbstractIncomingMessage) -> None:
        try:
            await asyncio.wait_for(message.nack(requeue=True), 5)
        except (*_SETTLE_ERRORS, aio_pika.exceptions.MessageProcessError) as exc:
            # The channel is gone: the broker requeues the delivery by itself.
            log.info("could not nack (%s); the broker will redeliver", type(exc).__name__)


def _failure(destination: str | None, url: str | None, error: CourierError) -> Outcome:
    return Outcome(
        duration_ms=0.0,
        destination=destination,
        source=SourceInfo(url=url) if url else None,
        error=error,
    )
