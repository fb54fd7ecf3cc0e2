"""A per-destination circuit breaker, as a pure state machine.

Times are passed in (seconds on any monotonic clock), so the logic is tested
without sleeping. :class:`~service.flow.control.DestinationFlow` drives it.
"""

from __future__ import annotations

from enum import IntEnum

MAX_COOLDOWN = 300.0
# While the probe is out, other callers are told to come back after this long:
# its outcome is unknown, and a success lets everyone through at once.
PROBE_HOLD = 1.0
# A probe that never reports (a bug, a lost task) frees its slot after this long.
PROBE_TIMEOUT = 120.0


class BreakerState(IntEnum):
    """The value of ``courier_breaker_state``."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class Breaker:
    """Closed, open or half-open; counts consecutive transient failures.

    ``threshold`` consecutive failures open it for ``cooldown`` seconds; then one
    probe may go (half-open). The probe's success closes it and resets the
    cooldown; its failure re-opens it with the cooldown doubled, up to
    ``max_cooldown``. Each call carries the ``generation`` it was admitted in:
    outcomes of calls admitted before the last state change are ignored, so a
    straggler from before an outage cannot close or re-open the breaker.
    """

    def __init__(
        self,
        threshold: int,
        cooldown: float,
        *,
        max_cooldown: float = MAX_COOLDOWN,
        probe_timeout: float = PROBE_TIMEOUT,
    ) -> None:
        if threshold < 1:
            raise ValueError("threshold must be at least 1")
        if cooldown <= 0:
            raise ValueError("cooldown must be positive")
        self.threshold = threshold
        self.base_cooldown = cooldown
        self.max_cooldown = max(max_cooldown, cooldown)
        self.probe_timeout = probe_timeout
        self.state = BreakerState.CLOSED
        self.failures = 0
        self.cooldown = cooldown
        self.open_until = 0.0
        self.generation = 0
        self._probe_since: float | None = None

    def blocked_for(self, now: float) -> tuple[float, bool] | None:
        """``(seconds, probe_out)`` a call must wait, or None when one may go now.

        ``probe_out`` is True when the wait is for a probe already in flight.
        """
        if self.state is BreakerState.OPEN:
            return (self.open_until - now, False) if now < self.open_until else None
        if self.state is BreakerState.HALF_OPEN and self._probe_out(now):
            return PROBE_HOLD, True
        return None

    def enter(self, now: float) -> tuple[int, bool]:
        """Let a call go (after :meth:`blocked_for` said None): ``(generation, is_probe)``."""
        if self.state is BreakerState.CLOSED:
            return self.generation, False
        if self.blocked_for(now) is not None:
            raise RuntimeError("the breaker does not let a call go now")
        # Each probe gets a generation of its own: a timed-out probe's late
        # answer must not decide for the one that replaced it.
        self.state = BreakerState.HALF_OPEN
        self.generation += 1
        self._probe_since = now
        return self.generation, True

    def succeeded(self, generation: int) -> bool:
        """The API answered (not transiently); True when that changed the state."""
        if generation != self.generation:
            return False
        self.failures = 0
        if self.state is not BreakerState.HALF_OPEN:
            return False
        self.state = BreakerState.CLOSED
        self.cooldown = self.base_cooldown
        self.generation += 1
        self._probe_since = None
        return True

    def failed(self, now: float, generation: int) -> bool:
        """A transient failure; True when that changed the state (it opened)."""
        if generation != self.generation:
            return False
        if self.state is BreakerState.HALF_OPEN:
            self.cooldown = min(self.cooldown * 2, self.max_cooldown)
        else:
            self.failures += 1
            if self.failures < self.threshold:
                return False
        self.state = BreakerState.OPEN
        self.open_until = now + self.cooldown
        self.failures = 0
        self.generation += 1
        self._probe_since = None
        return True

    def released(self, generation: int) -> None:
        """A call ended without an outcome (cancelled): a probe frees its slot."""
        if generation == self.generation and self.state is BreakerState.HALF_OPEN:
            self._probe_since = None

    def _probe_out(self, now: float) -> bool:
        return self._probe_since is not None and now - self._probe_since < self.probe_timeout
