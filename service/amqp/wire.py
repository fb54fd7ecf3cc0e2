"""The AMQP messages Courier publishes: copies of a delivery, and result events."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import aio_pika
import orjson
from aio_pika.abc import AbstractIncomingMessage

from service.events import CONTENT_TYPE, Event
from service.fair import tenant_name
from service.messages import header_text
from service.topology import BEACON_HEADER, COPY_ID_HEADER, TRACEPARENT_HEADER


def copy_message(incoming: AbstractIncomingMessage, headers: dict[str, Any]) -> aio_pika.Message:
    """The incoming message, byte for byte, with ``headers`` (:mod:`service.settle` names
    them); persistent."""
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


def event_message(event: Event, correlation_id: str, traceparent: str | None) -> aio_pika.Message:
    """A result event in CloudEvents' structured mode: persistent, id as message id."""
    return aio_pika.Message(
        body=orjson.dumps(event),
        content_type=CONTENT_TYPE,
        message_id=event["id"],
        correlation_id=correlation_id,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        headers={TRACEPARENT_HEADER: traceparent} if traceparent else {},
        type=event["type"],
        timestamp=datetime.now(UTC),
    )


def beacon_of(message: AbstractIncomingMessage) -> str | None:
    """The tenant a beacon names; None for anything else. A beacon's body is its tenant's
    name, so a request that carries the header by mistake is still a request."""
    tenant = tenant_name(header_text((message.headers or {}).get(BEACON_HEADER)))
    return tenant if tenant is not None and message.body == tenant.encode() else None


def beacon_message(tenant: str) -> aio_pika.Message:
    """A beacon naming ``tenant``'s queue (see :data:`~service.topology.BEACON_HEADER`);
    persistent, with its own copy id so the settler can tell it apart."""
    return aio_pika.Message(
        body=tenant.encode(),
        headers={BEACON_HEADER: tenant, COPY_ID_HEADER: str(uuid.uuid4())},
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )
