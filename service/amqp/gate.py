"""Holding acks while the consumer is cancelled, so no delivery is on its way to it.

RabbitMQ 3.10's quorum queues count a delivery that was on its way to a consumer
when that consumer was cancelled as a return: it comes back with ``x-delivery-count``
raised although no client ever saw it (up to the whole prefetch window per cancel).
With acks held, the prefetch window fills up (or the queue runs dry), so by
the time the cancel reaches the broker it has nothing under way to this consumer.

A quiet spell alone does not prove the queue dry: a busy broker (quorum queues write
each settle to disk before the next delivery goes out) can pause longer than
:data:`QUIET`. So a quiet spell ends the wait only when the broker reports no ready
message; while it holds some and the window has room, more deliveries are on their way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from aio_pika.abc import AbstractQueue

log = logging.getLogger(__name__)

# With no delivery for this long, ask the broker whether the queue has run dry.
QUIET = 0.1


class AckGate:
    """Acks wait at the gate while it is closed; deliveries are noted as they arrive."""

    def __init__(self) -> None:
        self._open = asyncio.Event()
        self._open.set()
        self._holding = 0  # cancels holding acks now (those of several queues may overlap)
        self._arrived = asyncio.Event()
        self._cancels: set[asyncio.Future[Any]] = set()
        self.released_by = ""  # why the last cancel went out: "window full", "queue dry", ...

    async def passed(self) -> None:
        """Wait until acks may go out, and return only while they may.

        An ack woken by one cancel's end must not go out if the next cancel (the
        consumer's next queue, at once) has closed the gate again before it ran.
        """
        while not self._open.is_set():
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
        async with self._closed(queue, unacked, window, min(0.5, wait / 2)):
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
        self, queue: AbstractQueue, unacked: Callable[[], int], window: int, limit: float
    ) -> AsyncIterator[None]:
        """Hold acks until the window of ``window`` unacked deliveries is full, or the
        queue has run dry, or ``limit`` seconds passed; then run the body (the cancel)
        with acks still held, and let them go."""
        self._holding += 1
        self._open.clear()
        try:
            self.released_by = await self._hold(queue, unacked, window, limit)
            log.debug("cancelling the consumer of %s: %s", queue.name, self.released_by)
            yield
        finally:
            self._holding -= 1
            if not self._holding:
                self._open.set()

    async def _hold(
        self, queue: AbstractQueue, unacked: Callable[[], int], window: int, limit: float
    ) -> str:
        end = _now() + limit
        while unacked() < window:
            if (left := end - _now()) <= 0:
                return "time limit"
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), min(QUIET, left))
            except TimeoutError:
                if not await _holds_ready(queue, end - _now()):
                    return "queue dry" if _now() < end else "time limit"
        return "window full"


async def _holds_ready(queue: AbstractQueue, wait: float) -> bool:
    """Whether the broker reports ready messages in ``queue`` (a passive declare); a
    broker that does not answer within ``wait`` seconds counts as "no".

    The declare is never cancelled: aiormq closes a channel whose RPC was abandoned,
    and every delivery held on it would go back to the queue.
    """
    declare = asyncio.ensure_future(_ready_count(queue))
    declare.add_done_callback(_quietly)
    done, _ = await asyncio.wait({declare}, timeout=max(0.0, wait))
    return bool(done and not declare.exception() and declare.result())


async def _ready_count(queue: AbstractQueue) -> int:
    channel = await queue.channel.get_underlay_channel()
    declared = await channel.queue_declare(queue.name, passive=True)
    return int(declared.message_count or 0)


def _quietly(declare: asyncio.Future[int]) -> None:
    # A broker that went away while it was asked: "no" was the answer already.
    if not declare.cancelled():
        declare.exception()


def _now() -> float:
    # The loop's clock (monotonic), so tests can run this on virtual time.
    return asyncio.get_running_loop().time()
