"""Declaring Courier's topology on a channel, idempotently."""

from __future__ import annotations

import logging

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue

from service.topology import QueueSpec, Topology

log = logging.getLogger(__name__)


async def declare_queue(channel: AbstractChannel, spec: QueueSpec) -> AbstractQueue:
    """Declare a durable queue; one that exists with other arguments is used as it is.

    (Say, a classic delay tier from an older Courier, or another delivery limit:
    better to run than to refuse to start. docs/reliability.md, "Migrating queues", says how to
    move to the current arguments.) The broker closes the channel on the
    mismatch, so it is reopened first.
    """
    try:
        return await channel.declare_queue(spec.name, durable=True, arguments=dict(spec.arguments))
    except aio_pika.exceptions.ChannelPreconditionFailed as exc:
        log.warning(
            "queue %s exists with other arguments than Courier declares (%s); using it as it is",
            spec.name,
            exc.args[0] if exc.args else exc,
        )
        await channel.reopen()
        return await channel.declare_queue(spec.name, passive=True)


async def declare_events(channel: AbstractChannel, topology: Topology) -> AbstractExchange:
    """Declare the durable topic exchange of result events."""
    return await channel.declare_exchange(
        topology.events_exchange, aio_pika.ExchangeType.TOPIC, durable=True
    )


async def declare_own_queues(channel: AbstractChannel, topology: Topology) -> None:
    """Declare the delay tiers and the dead-letter queue."""
    for spec in topology.own_queues().values():
        await declare_queue(channel, spec)
