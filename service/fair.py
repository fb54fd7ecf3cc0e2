"""Fair share between tenants, as pure logic: whose waiting work starts next, and how
much work may be moved aside to look past a backlog.

:class:`FairQueue` serves tenants in weighted turns (start-time fair queuing): each
tenant's next turn comes ``1 / weight`` of virtual time after its last, and a tenant
that had nothing waiting starts level with the others, so idleness banks no credit.
:class:`SpillBudget` decides how fast over-share work may be moved out of the request
queue into tenant queues: freely while the process has CPU to spare, and only a small
share of its throughput while it is CPU-bound (moving would then cost throughput, and
a CPU-bound replica drains its backlog at full speed anyway).
"""

from __future__ import annotations

import re
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import orjson

from service.contracts.request import DEFAULT_TENANT, TENANT_PATTERN

T = TypeVar("T")
OTHER = "other"  # the metric label of every tenant not named in COURIER_TENANT_WEIGHTS
_TENANT = re.compile(TENANT_PATTERN)


def tenant_name(value: object) -> str | None:
    """``value`` when it is a tenant name the contract allows (1-64 of A-Za-z0-9_.:-),
    else None."""
    return value if isinstance(value, str) and _TENANT.fullmatch(value) else None


def parse_weights(text: str) -> dict[str, float]:
    """``web=4,backfill=1`` -> ``{"web": 4.0, "backfill": 1.0}``; ValueError for nonsense."""
    weights: dict[str, float] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or not tenant_name(name):
            raise ValueError(f"{item!r} is not tenant=weight (a tenant is 1-64 of A-Za-z0-9_.:-)")
        try:
            weight = float(value)
        except ValueError:
            raise ValueError(f"{item!r}: the weight must be a number") from None
        if not 0 < weight <= 1000:
            raise ValueError(f"{item!r}: the weight must be above 0 and at most 1000")
        weights[name] = weight
    return weights


@dataclass(frozen=True, slots=True)
class Tenants:
    """The configured weights: a tenant not named weighs 1 and is labelled ``other``."""

    weights: Mapping[str, float] = field(default_factory=dict)

    def weight(self, tenant: str) -> float:
        """The tenant's weight."""
        return self.weights.get(tenant, 1.0)

    def label(self, tenant: str) -> str:
        """The tenant's metric label: its name when named in the weights, else ``other``."""
        return tenant if tenant in self.weights else OTHER


def tenant_of(body: bytes) -> str:
    """The ``tenant`` a request body names (``default`` when it names none, or an invalid
    one: such a body ends as ``invalid_request`` whoever's turn it runs in)."""
    if b'"tenant"' not in body:
        return DEFAULT_TENANT
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return DEFAULT_TENANT
    tenant = tenant_name(data.get("tenant")) if isinstance(data, dict) else None
    return tenant or DEFAULT_TENANT


class FairQueue(Generic[T]):
    """Work waiting by tenant, taken out in weighted turns; FIFO within a tenant."""

    def __init__(self, tenants: Tenants) -> None:
        self._tenants = tenants
        self._queues: dict[str, deque[T]] = {}
        self._turn: dict[str, float] = {}  # each tenant's next turn, in virtual time
        self._now = 0.0  # virtual time: the turn of the last item taken
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def waiting(self, tenant: str) -> int:
        """How many items of ``tenant`` wait."""
        queue = self._queues.get(tenant)
        return len(queue) if queue is not None else 0

    def count(self, predicate: Callable[[T], bool]) -> int:
        """How many waiting items ``predicate`` accepts."""
        return sum(1 for queue in self._queues.values() for item in queue if predicate(item))

    def tenants(self) -> Iterator[tuple[str, int]]:
        """Each tenant with waiting items, and how many."""
        for tenant, queue in self._queues.items():
            yield tenant, len(queue)

    def push(self, tenant: str, item: T) -> None:
        """``item`` waits for ``tenant``'s turn."""
        queue = self._queues.get(tenant)
        if queue is None:
            queue = self._queues[tenant] = deque()
            # Waking up, a tenant is level with the others: idle time banks no credit.
            self._turn[tenant] = max(self._turn.get(tenant, 0.0), self._now)
        queue.append(item)
        self._size += 1

    def pop(self) -> tuple[str, T] | None:
        """The next item: the oldest of the tenant whose turn comes first; None when empty."""
        if not self._queues:
            return None
        tenant = min(self._queues, key=self._turn.__getitem__)
        queue = self._queues[tenant]
        item = queue.popleft()
        self._size -= 1
        self._now = self._turn[tenant]
        self._turn[tenant] = self._now + 1.0 / self._tenants.weight(tenant)
        if not queue:
            del self._queues[tenant]
        return tenant, item

    def newest_of_busiest(self, eligible: Callable[[T], bool]) -> tuple[str, T] | None:
        """Take the newest eligible item of the tenant with the most waiting (the one most
        over its share), or None; the order of what stays is kept."""
        for tenant, queue in sorted(self._queues.items(), key=lambda kv: -len(kv[1])):
            for index in range(len(queue) - 1, -1, -1):
                if eligible(queue[index]):
                    item = queue[index]
                    del queue[index]
                    self._size -= 1
                    if not queue:
                        del self._queues[tenant]
                    return tenant, item
        return None

    def remove(self, predicate: Callable[[T], bool]) -> list[T]:
        """Take out every item ``predicate`` accepts (a lost channel's)."""
        removed: list[T] = []
        for tenant in list(self._queues):
            queue = self._queues[tenant]
            kept = deque(item for item in queue if not predicate(item))
            removed += [item for item in queue if predicate(item)]
            if kept:
                self._queues[tenant] = kept
            else:
                del self._queues[tenant]
        self._size -= len(removed)
        return removed


_SCHEDSTAT = "/proc/self/schedstat"


def cpu_clock() -> tuple[float, float]:
    """Seconds of CPU the process used, and seconds its event loop's thread waited for a
    core (Linux's schedstat; 0 where there is none)."""
    try:
        with open(_SCHEDSTAT, "rb") as stat:
            waited_ns = int(stat.read().split()[1])
    except (OSError, IndexError, ValueError):
        waited_ns = 0
    return time.process_time(), waited_ns / 1e9


class SpillBudget:
    """How many moves out of the request queue are allowed now (a token bucket).

    Moves may use the CPU that the requests leave idle, and only that. The budget keeps
    one of two modes, decided each ``window`` seconds of moving:

    - *share*: only ``share`` of the requests finished earn a move; a window in this
      mode measures what the requests alone take of one core. Under ``idle``, the
      next windows are *free*.
    - *free*: moves refill at ``free_rate`` per second. After ``recheck`` free windows,
      or one in which the process reached ``ceiling`` of a core, a share window
      measures the requests alone again.

    So a CPU-bound replica (where every move would cost a request) moves a trickle,
    and one waiting on slow destinations moves as fast as the broker takes it. A pause
    in moving longer than a window starts in share mode: a burst is measured first,
    and its first window only warms up (its requests are still starting, so the CPU
    they take is not yet what they will take: read as idle, a replica at full load
    would move its whole backlog through a tenant queue for nothing).

    A window's utilization is the CPU used over the time the process did not wait for a
    core: a process starved by its neighbours is always runnable (it runs or waits, it
    never sleeps) and reads as busy; one that sleeps between its requests reads as
    having room, however long it waits for a core each time it wakes on a loaded
    machine. ``cpu`` gives the CPU used and the time waited (:func:`cpu_clock`),
    ``clock`` is a monotonic clock.
    """

    def __init__(
        self,
        cpu: Callable[[], tuple[float, float]],
        clock: Callable[[], float],
        *,
        idle: float = 0.8,
        ceiling: float = 0.95,
        free_rate: float = 20_000.0,
        share: float = 0.03,
        window: float = 1.0,
        recheck: int = 10,
    ) -> None:
        self._cpu, self._clock = cpu, clock
        self.idle, self.ceiling, self.recheck = idle, ceiling, recheck
        self.free_rate, self.share, self.window = free_rate, share, window
        self._burst = max(1.0, free_rate / 10)  # moves saved up at most
        self._tokens = 0.0
        self._last = clock()
        self._sample = (self._last, *cpu())
        self.free = False
        self._warming = True  # the first window after a pause is not measured
        self._free_windows = 0
        self.utilization = 0.0  # of the last window
        self.requests_alone = 0.0  # the utilization of the last share window

    def finished(self, count: int = 1) -> None:
        """Requests finished: each earns a share of a move."""
        self._tokens = min(self._tokens + self.share * count, self._burst)

    def take(self) -> bool:
        """Spend one move if the budget allows it now."""
        now = self._clock()
        if now - self._last > self.window:  # moving paused: measure afresh
            self._sample, self.free, self._warming = (now, *self._cpu()), False, True
        if now - self._sample[0] >= self.window:
            self._end_window(now)
        if self.free:
            self._tokens = min(self._tokens + (now - self._last) * self.free_rate, self._burst)
        self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def _end_window(self, now: float) -> None:
        since, used, waited = self._sample
        used_now, waited_now = self._cpu()
        wall = now - since
        awake = wall - (waited_now - waited)  # running or sleeping, not waiting for a core
        utilization = (used_now - used) / awake if awake > 0.05 * wall else 1.0
        self.utilization = utilization
        self._sample = (now, used_now, waited_now)
        if self._warming:
            self._warming = False
        elif self.free:
            self._free_windows += 1
            if utilization >= self.ceiling or self._free_windows >= self.recheck:
                self.free = False
        else:
            self.requests_alone = utilization
            self.free, self._free_windows = utilization < self.idle, 0
