"""Which delivery runs next: tenants in weighted turns, and over-share work moved aside.

Every delivery the consumer takes (from the request queue or a tenant's queue) is
offered here. With a slot free and nothing waiting it starts at once, so a lone tenant
pays nothing for sharing. Otherwise it waits, by tenant, in a :class:`FairQueue`. When
more of the request queue's deliveries wait than :data:`LOOKAHEAD` allows, the newest
one of the tenant most over its share is moved into that tenant's queue (a confirmed
copy, then the ack), so the request queue keeps being read past a backlog and a
tenant that comes after it is seen within a turn, not after the backlog.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from aio_pika.abc import AbstractIncomingMessage

from service.fair import FairQueue, SpillBudget, Tenants, tenant_name, tenant_of
from service.messages import header_text
from service.topology import TENANT_HEADER, Topology

log = logging.getLogger(__name__)

# How many of the request queue's deliveries may wait in memory before the newest
# over-share one is moved to its tenant's queue.
LOOKAHEAD = 2
# When the budget allows no move now, it is asked again this much later (no delivery
# may come meanwhile: the prefetch window can be full of work waiting on slow uploads).
ASK_AGAIN = 0.1


@dataclass(eq=False, slots=True)
class Waiting:
    """A delivery waiting for a slot."""

    message: AbstractIncomingMessage
    channel: Any  # the (aiormq) channel it came on
    source: str  # the queue it came from
    tenant: str
    from_requests: bool  # from the request queue (it may be moved aside)


class Runner(Protocol):
    """What the dispatcher hands deliveries to (the settler)."""

    def take(
        self,
        message: AbstractIncomingMessage,
        channel: object,
        tenant: str,
        done: Callable[[], None],
    ) -> None:
        """Run and settle a delivery; ``done`` is called when it has ended."""

    def move(self, message: AbstractIncomingMessage, channel: object, tenant: str) -> None:
        """Move a delivery into ``tenant``'s queue (a confirmed copy, then the ack)."""

    def give_back(self, message: AbstractIncomingMessage, channel: object) -> None:
        """Hand a delivery that will not start back to the broker, as a fresh copy."""


class WaitingHooks(Protocol):
    """What the dispatcher reports (``courier_tenant_waiting``)."""

    def waiting(self, tenant: str, delta: int) -> None:
        """Deliveries of ``tenant`` waiting for a slot grew (or shrank) by ``delta``."""


class Dispatcher:
    """Starts deliveries as slots free up, in weighted turns between tenants."""

    def __init__(
        self,
        runner: Runner,
        topology: Topology,
        concurrency: int,
        tenants: Tenants,
        budget: SpillBudget,
        hooks: WaitingHooks,
        moved: Callable[[str], None],
    ) -> None:
        self._runner = runner
        self._topology = topology
        self._slots = concurrency
        self._budget = budget
        self._hooks = hooks
        self._moved = moved  # told of each tenant that got work moved into its queue
        self._fair: FairQueue[Waiting] = FairQueue(tenants)
        self._running = 0
        self._from_requests = 0  # the request queue's deliveries now waiting
        self._stopped = False
        self._again: asyncio.TimerHandle | None = None

    @property
    def running(self) -> int:
        """Deliveries started and not yet ended."""
        return self._running

    def offer(self, message: AbstractIncomingMessage, channel: object, source: str) -> None:
        """A delivery arrived on ``channel`` from queue ``source``."""
        headers = message.headers or {}
        tenant = tenant_name(header_text(headers.get(TENANT_HEADER))) or tenant_of(message.body)
        from_requests = source == self._topology.requests.name
        if self._stopped:  # it came before the broker saw the consumer's cancel
            self._runner.give_back(message, channel)
            return
        if not self._fair and self._running < self._slots:
            self._start(tenant, message, channel)
            return
        self._fair.push(tenant, Waiting(message, channel, source, tenant, from_requests))
        self._hooks.waiting(tenant, 1)
        self._from_requests += from_requests
        if self._again is None:
            self._move_over_share()
        self._pump()

    def waiting(self, source: str | None = None) -> int:
        """Deliveries waiting for a slot (from ``source`` only, when given)."""
        if source is None:
            return len(self._fair)
        return self._fair.count(lambda w: w.source == source)

    def channel_lost(self, channel: object) -> int:
        """The channel died: its waiting deliveries are the broker's again."""
        return len(self._forget(self._fair.remove(lambda w: w.channel is channel)))

    def stop(self) -> list[Waiting]:
        """Start nothing more; the deliveries still waiting, for the caller to give back."""
        self._stopped = True
        if self._again is not None:
            self._again.cancel()
        return self._forget(self._fair.remove(lambda w: True))

    def _forget(self, items: list[Waiting]) -> list[Waiting]:
        for item in items:
            self._hooks.waiting(item.tenant, -1)
            self._from_requests -= item.from_requests
        return items

    def _start(self, tenant: str, message: AbstractIncomingMessage, channel: object) -> None:
        self._running += 1
        self._runner.take(message, channel, tenant, self._ended)

    def _ended(self) -> None:
        self._running -= 1
        self._budget.finished()
        self._pump()

    def _pump(self) -> None:
        while self._running < self._slots and not self._stopped:
            taken = self._fair.pop()
            if taken is None:
                return
            tenant, item = taken
            self._forget([item])
            self._start(tenant, item.message, item.channel)

    def _move_over_share(self) -> None:
        self._again = None
        while self._from_requests > LOOKAHEAD and not self._stopped:
            if not self._budget.take():
                self._again = asyncio.get_running_loop().call_later(
                    ASK_AGAIN, self._move_over_share
                )
                return
            found = self._fair.newest_of_busiest(lambda w: w.from_requests)
            if found is None:
                return
            tenant, item = found
            self._forget([item])
            self._runner.move(item.message, item.channel, tenant)
            self._moved(tenant)
