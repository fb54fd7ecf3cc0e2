"""One test's whole world in one object: the ``stage`` fixture (tests/conftest.py).

A broker (the machine's, or for the timing and soak tiers a quiet node of the
tests' own), this test's queue and exchange names, a file server, the strict fake
Inconvo and Mindset, an event collector, and Courier's settings and environment
pointing at all of them: what most end-to-end tests used to ask for as six
fixtures, again and again.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

from service.config import Settings
from service.runtime import Service
from testbed.fakes import FakeInconvo, FakeMindset
from testbed.support import (
    CourierProcess,
    EventCollector,
    FileServer,
    Names,
    drain,
    publish,
    publish_many,
)

READY_TIMEOUT = 20.0
STOP_TIMEOUT = 30.0


@contextlib.asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[Service]:
    """Run the service in-process until the block ends; waits until it is ready.

    When the block ends the service stops as `courier run` does at SIGTERM: by then
    every request it took is settled (its event, dead letter and ack are done).
    """
    service = Service(settings)
    task = asyncio.create_task(service.run(install_signals=False))
    try:
        async with asyncio.timeout(READY_TIMEOUT):
            while not await service.ready():
                if task.done():
                    task.result()
                await asyncio.sleep(0.05)
        yield service
    finally:
        service.request_stop()
        await asyncio.wait_for(task, STOP_TIMEOUT)


@dataclass
class Stage:
    """This test's broker, names, file server, fakes and collector, and Courier's settings."""

    broker_url: str
    amqp: AbstractRobustConnection
    names: Names
    files: FileServer
    inconvo: FakeInconvo
    mindset: FakeMindset
    collector: EventCollector
    settings: Callable[..., Settings]  # Settings for an in-process service, with overrides
    env: Callable[..., dict[str, str]]  # the environment of a `courier run` subprocess

    @property
    def queue(self) -> str:
        """The request queue."""
        return self.names.queue

    @property
    def broker_port(self) -> int:
        """The AMQP port of this test's broker (for a proxy in front of it)."""
        return int(urlsplit(self.broker_url).port or 5672)

    def running(self, **overrides: Any) -> contextlib.AbstractAsyncContextManager[Service]:
        """The service in-process with this stage's settings (and ``overrides``)."""
        return running(self.settings(**overrides))

    def process(self, **extra: str) -> CourierProcess:
        """A `courier run` subprocess with this stage's environment (and ``extra``)."""
        return CourierProcess(self.env(**extra))

    async def publish(self, body: bytes | dict[str, Any], **properties: Any) -> None:
        """Publish one request to the request queue (confirmed)."""
        await publish(self.amqp, self.names.queue, body, **properties)

    async def publish_many(self, url: str, count: int, prefix: str, **options: Any) -> set[str]:
        """Publish ``count`` Inconvo requests for ``url``; returns their ids."""
        return await publish_many(self.amqp, self.names.queue, url, count, prefix, **options)

    async def dead_letters(self) -> list[AbstractIncomingMessage]:
        """Take every message in the dead-letter queue.

        Only once nothing can still be on its way there: after the service stopped,
        or after ``quiesce(service)`` (testbed.support).
        """
        return [message async for message in drain(self.amqp, self.names.dead_queue)]
