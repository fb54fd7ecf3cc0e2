"""Holding acks while the consumer is cancelled, so no delivery is on its way to it.

RabbitMQ 3.10's quorum queues count a delivery that was on its way to a consumer
when that consumer was cancelled as a return: it comes back with ``x-delivery-count``
raised although no client ever saw it (measured here: 0 to 8 of a prefetch of 8 per
cancel). With acks held, the prefetch window fills up (or the queue runs dry), so by
the time the cancel reaches the broker it has nothing under way to this consumer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from aio_pika.abc import AbstractQueue

log = logging.getLogger(__name__)

# With no delivery for this long the queue has run dry: nothing is on its way.
QUIET = 0.1


class AckGate:
    """Acks wait at the gate while it is closed; deliveries are noted as they arrive."""

    def __init__(self) -> None:
        self._open = asyncio.Event()
        self._open.set()
        self._arrived = asyncio.Event()
        self._cancels: set[asyncio.Future[Any]] = set()

    async def passed(self) -> None:
        """Wait until acks may go out."""
        await self._open.wait()

    def delivered(self) -> None:
        """A delivery arrived."""
        self._arrived.set()

    async def cancel(
        self, queue: AbstractQueue, tag: str, unacked: Callable[[], int], window: int, wait: float
    ) -> None:
        """Cancel consumer ``tag`` with acks held, waiting at most ``wait`` s for cancel-ok.

        Deliveries still arrive until cancel-ok (with nowait aiormq drops them, unacked).
        The wait is bounded, the cancel never given up on: aiormq closes a channel whose
        RPC was abandoned, and its deliveries with it.
        """
        async with self._closed(unacked, window, min(0.5, wait / 2)):
            cancel = asyncio.ensure_future(queue.cancel(tag))
            self._cancels.add(cancel)
            cancel.add_done_callback(self._cancelled)
            await asyncio.wait({cancel}, timeout=wait)

    def _cancelled(self, cancel: asyncio.Future[Any]) -> None:
        self._cancels.discard(cancel)
        if not cancel.cancelled() and (exc := cancel.exception()) is not None:
            log.info("could not cancel the consumer (%s)", type(exc).__name__)

    @contextlib.asynccontextmanager
    async def _closed(
        self, unacked: Callable[[], int], window: int, limit: float
    ) -> AsyncIterator[None]:
        """Hold acks until the window of ``window`` unacked deliveries is full, or none
        has arrived for :data:`QUIET` seconds, or ``limit`` seconds passed; then run the
        body (the cancel) with acks still held, and let them go."""
        self._open.clear()
        try:
            end = time.monotonic() + limit
            while unacked() < window and (left := end - time.monotonic()) > 0:
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), min(QUIET, left))
                except TimeoutError:
                    break
            yield
        finally:
            self._open.set()
