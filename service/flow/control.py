"""Flow control per destination: admission before every call, outcomes after it.

The integrator's side, in short::

    flows = FlowControl.from_settings(settings, observer)
    session = aiohttp.ClientSession(
        middlewares=[flow_middleware(flows.for_destination("inconvo"))], ...
    )
    ...
    except Deferred as hold:   # the call was not made: hold the request hold.seconds
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from enum import StrEnum
from typing import TYPE_CHECKING, Protocol

from service.contracts import DESTINATIONS
from service.flow.breaker import Breaker, BreakerState
from service.flow.rate import RateControl

if TYPE_CHECKING:
    from service.config import Settings

log = logging.getLogger(__name__)

MAX_WAIT = 5.0
# Answers whose Retry-After / retry-after-ms pause every call to the destination.
PAUSE_STATUSES = frozenset({429, 503})


class DeferReason(StrEnum):
    """Why a call was held."""

    BREAKER_OPEN = "breaker_open"
    PROBE_IN_FLIGHT = "probe_in_flight"
    RATE_LIMITED = "rate_limited"


class Deferred(Exception):
    """The call was not made: the destination takes calls again in about ``seconds``.

    Deliberately not a :class:`~service.errors.CourierError`: holding a request
    spends no attempt and must not be retried in-process or dead-lettered.
    """

    def __init__(self, destination: str, seconds: float, reason: DeferReason) -> None:
        super().__init__(f"{destination} held for {seconds:.2f}s ({reason.value})")
        self.destination = destination
        self.seconds = max(seconds, 0.0)
        self.reason = reason


def is_transient(status: int | None) -> bool:
    """Whether an outcome counts against the breaker: no answer, 408 or 5xx (not 429)."""
    return status is None or status == 408 or status >= 500


class FlowObserver(Protocol):
    """Hooks for metrics; called synchronously on the event loop, so keep them cheap.

    - ``breaker_changed``: the breaker's new state (``courier_breaker_state``:
      its ``int`` value). Also called once per destination at start. An open
      breaker turns half-open when the first call after its cooldown arrives
      (no timer runs), so with no traffic at all it keeps reading open.
    - ``rate_changed``: the requests/s now allowed, None while unlimited
      (``courier_destination_rate_limit``, to be removed while None). Also
      called once per destination at start.
    - ``rate_limited``: once per call that rate control delayed or held, for a
      token or for a ``Retry-After`` pause (``courier_rate_limited_total``). The
      429 answers themselves are already counted by
      ``courier_destination_requests_total{status="429"}``.
    """

    def breaker_changed(self, destination: str, state: BreakerState) -> None:
        """The destination's breaker changed state."""

    def rate_changed(self, destination: str, rate: float | None) -> None:
        """The destination's allowed rate changed (None: unlimited)."""

    def rate_limited(self, destination: str) -> None:
        """A call to the destination waited for, or was held by, rate control."""


class NullObserver:
    """Observes nothing: for flows nobody measures (tests, simulations)."""

    def breaker_changed(self, destination: str, state: BreakerState) -> None:
        pass

    def rate_changed(self, destination: str, rate: float | None) -> None:
        pass

    def rate_limited(self, destination: str) -> None:
        pass


class Clock(Protocol):
    """Monotonic time and sleeping; injected so tests can run on virtual time."""

    def now(self) -> float:
        """Seconds on a monotonic clock."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Sleep ``seconds``."""


class LoopClock:
    """The running event loop's clock (virtual in a virtual-time loop)."""

    def now(self) -> float:
        """The loop's time."""
        return asyncio.get_running_loop().time()

    async def sleep(self, seconds: float) -> None:
        """``asyncio.sleep``."""
        await asyncio.sleep(seconds)


class Ticket:
    """One admitted call; report how it ended with :meth:`record` or :meth:`release`.

    Only the first report counts; later ones are ignored, so a ``finally:
    ticket.release()`` after a :meth:`record` is safe.
    """

    __slots__ = ("_done", "_flow", "generation", "probe", "sent_at")

    def __init__(self, flow: DestinationFlow, generation: int, probe: bool, sent_at: float) -> None:
        self._flow = flow
        self.generation = generation
        self.probe = probe
        self.sent_at = sent_at
        self._done = False

    def record(
        self,
        status: int | None,
        *,
        transient: bool | None = None,
        retry_after: float | None = None,
    ) -> None:
        """The call ended: ``status`` is the HTTP status, None when no answer came.

        ``transient`` (default :func:`is_transient` of ``status``) counts the
        outcome against the breaker; anything else is a success for it (the
        API is up), a 429 always (it is a rate signal). ``retry_after`` (seconds,
        from :func:`service.retry.parse_retry_after`) pauses every call to the
        destination when ``status`` is 429 or 503.
        """
        if self._done:
            return
        self._done = True
        self._flow._outcome(self, status, transient, retry_after)

    def release(self) -> None:
        """The call ended without an outcome (cancelled before an answer)."""
        if self._done:
            return
        self._done = True
        self._flow._release(self)


class DestinationFlow:
    """Breaker and rate control shared by every call to one destination."""

    def __init__(
        self,
        name: str,
        *,
        breaker: Breaker,
        rate: RateControl,
        observer: FlowObserver | None = None,
        clock: Clock | None = None,
        max_wait: float = MAX_WAIT,
    ) -> None:
        self.name = name
        self.breaker = breaker
        self.rate_control = rate
        self.max_wait = max_wait
        self._observer = observer or NullObserver()
        self._clock = clock or LoopClock()

    @property
    def state(self) -> BreakerState:
        """The breaker's state."""
        return self.breaker.state

    @property
    def rate(self) -> float | None:
        """The requests/s now allowed; None while unlimited."""
        return self.rate_control.rate

    def announce(self) -> None:
        """Tell the observer the current state and rate (the gauges' first values)."""
        self._observer.breaker_changed(self.name, self.breaker.state)
        self._observer.rate_changed(self.name, self.rate_control.rate)

    def check(self) -> None:
        """Raise :class:`Deferred` if a call now would be held; reserves nothing.

        For the pipeline, before fetching a source that could not be delivered.
        """
        now = self._clock.now()
        self._check_breaker(now)
        wait = self.rate_control.next_slot(now) - now
        if wait > self.max_wait:
            raise Deferred(self.name, wait, DeferReason.RATE_LIMITED)

    async def admit(self) -> Ticket:
        """Wait until a call may go (at most ``max_wait`` in total) and return its ticket.

        Call it before every HTTP call, in-process retries included, and report
        the outcome on the ticket. Raises :class:`Deferred` when the breaker is open,
        when another caller's probe is out, or when the rate would make this
        caller wait longer than ``max_wait``.
        """
        rate = self.rate_control
        deadline = self._clock.now() + self.max_wait
        counted = False
        while True:
            now = self._clock.now()
            self._check_breaker(now)
            slot = rate.next_slot(now)
            if slot <= now:
                rate.take(now)
                return self._issue(now)
            if not counted:
                counted = True
                self._observer.rate_limited(self.name)
            if slot > deadline:
                raise Deferred(self.name, slot - now, DeferReason.RATE_LIMITED)
            epoch = rate.epoch
            rate.take(slot)
            await self._clock.sleep(slot - now)
            if rate.epoch == epoch:
                now = self._clock.now()
                self._check_breaker(now)
                return self._issue(now)
            # A pause or a lower rate came while waiting: the reservation is void.

    def _check_breaker(self, now: float) -> None:
        blocked = self.breaker.blocked_for(now)
        if blocked is not None:
            seconds, probe_out = blocked
            reason = DeferReason.PROBE_IN_FLIGHT if probe_out else DeferReason.BREAKER_OPEN
            # A Retry-After longer than the cooldown delays the probe too.
            seconds = max(seconds, self.rate_control.pause_until - now)
            raise Deferred(self.name, seconds, reason)

    def _issue(self, now: float) -> Ticket:
        before = self.breaker.state
        generation, probe = self.breaker.enter(now)
        if self.breaker.state is not before:
            self._changed_state()
        return Ticket(self, generation, probe, now)

    def _outcome(
        self, ticket: Ticket, status: int | None, transient: bool | None, retry_after: float | None
    ) -> None:
        now = self._clock.now()
        rate = self.rate_control
        before = rate.rate
        if retry_after is not None and status in PAUSE_STATUSES:
            rate.pause(now, retry_after)
        if status == 429:
            rate.throttled(now, ticket.sent_at)
            changed = self.breaker.succeeded(ticket.generation)
        else:
            if transient is None:
                transient = is_transient(status)
            if transient:
                changed = self.breaker.failed(now, ticket.generation)
            else:
                changed = self.breaker.succeeded(ticket.generation)
                rate.succeeded(ticket.sent_at)
        if changed:
            self._changed_state()
        if rate.rate != before:
            self._observer.rate_changed(self.name, rate.rate)

    def _release(self, ticket: Ticket) -> None:
        if ticket.probe:
            self.breaker.released(ticket.generation)

    def _changed_state(self) -> None:
        state = self.breaker.state
        if state is BreakerState.OPEN:
            log.warning(
                "%s circuit breaker open for %.0f s",
                self.name,
                self.breaker.cooldown,
                extra={"destination": self.name},
            )
        else:
            log.info(
                "%s circuit breaker %s",
                self.name,
                state.name.lower().replace("_", "-"),
                extra={"destination": self.name},
            )
        self._observer.breaker_changed(self.name, state)


class FlowControl:
    """The flows of all destinations, built once at start-up."""

    def __init__(self, flows: Mapping[str, DestinationFlow]) -> None:
        self._flows = dict(flows)
        for flow in self._flows.values():
            flow.announce()

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        observer: FlowObserver | None = None,
        *,
        clock: Clock | None = None,
        max_wait: float = MAX_WAIT,
    ) -> FlowControl:
        """One flow per destination, from ``COURIER_BREAKER_*`` and ``COURIER_*_RATE_LIMIT``."""
        return cls(
            {
                name: DestinationFlow(
                    name,
                    breaker=Breaker(settings.breaker_threshold, settings.breaker_cooldown),
                    rate=RateControl(settings.rate_limit(name)),
                    observer=observer,
                    clock=clock,
                    max_wait=max_wait,
                )
                for name in DESTINATIONS
            }
        )

    def for_destination(self, name: str) -> DestinationFlow:
        """The flow of destination ``name`` (``inconvo`` or ``mindset``); KeyError otherwise."""
        return self._flows[name]
