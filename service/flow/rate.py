"""Per-destination rate control, as pure logic over passed-in times.

One :class:`RateControl` serves every in-flight request to a destination:

- ``Retry-After`` pauses: :meth:`pause` stops every call until then.
- A configured rate: a token bucket with a burst of one, spacing calls
  ``(1 + MARGIN) / rate`` apart. A burst of one is the only size a strict
  server-side window of N per second never sees exceeded (any burst ``b``
  lets ``N + b - 1`` calls into some second); the 5% margin absorbs the
  scheduling jitter between this process and the server (50 ms per second),
  which would otherwise turn about half of the calls at exactly N/s into 429s.
- No configured rate: adaptive, like TCP's congestion control (AIMD). Unlimited
  at first; a 429 sets the rate to ``BETA`` times the rate that drew it (the
  calls sent over the last second, or since the throttled call was sent if
  that is earlier, or the current rate if lower), once per round
  (a 429 for a call sent before the last decrease does not decrease again).
  Each success then adds ``GROWTH`` times that reference rate per second (per
  success ``GROWTH * reference / rate``), until twice the reference, where the
  limit is lifted again.

Calls reserve their slot (:meth:`take`), so concurrent waiters queue in order
instead of racing for each token. Changes that make earlier reservations too
early (a pause, a decrease) bump :attr:`epoch`; waiters that see it changed
reserve again.
"""

from __future__ import annotations

import math
from collections import deque

MARGIN = 0.05
BETA = 0.7
GROWTH = 0.1
PROBE_GROWTH = 0.01
NEAR = (0.9, 1.1)
UNLIMIT_FACTOR = 2.0
MIN_RATE = 0.2
WINDOW = 1.0
MAX_WINDOW = 10.0
MAX_PAUSE = 3600.0


class RateControl:
    """The shared pace of one destination's calls; ``rate`` None means unlimited."""

    def __init__(
        self,
        configured: float | None = None,
        *,
        beta: float = BETA,
        growth: float = GROWTH,
        probe_growth: float = PROBE_GROWTH,
        min_rate: float = MIN_RATE,
        max_pause: float = MAX_PAUSE,
    ) -> None:
        if configured is not None and configured <= 0:
            raise ValueError("a configured rate must be positive")
        self.configured = configured
        self.rate: float | None = configured
        self.beta = beta
        self.growth = growth
        self.probe_growth = probe_growth
        self.min_rate = min_rate
        self.max_pause = max_pause
        self.pause_until = -math.inf
        self.epoch = 0
        self._next = -math.inf  # the earliest time the next slot may be given
        self._sent: deque[float] = deque()
        self._decreased_at = -math.inf
        self._reference = math.inf

    @property
    def adaptive(self) -> bool:
        """Whether the rate adapts to 429s (no rate was configured)."""
        return self.configured is None

    def interval(self) -> float:
        """Seconds between two calls now (0 when unlimited)."""
        if self.rate is None:
            return 0.0
        margin = MARGIN if self.configured is not None else 0.0
        return (1 + margin) / self.rate

    def next_slot(self, now: float) -> float:
        """The earliest time a call may go (``now`` when it may go at once)."""
        return max(now, self.pause_until, self._next)

    def take(self, at: float) -> None:
        """Reserve the slot at ``at`` (a value :meth:`next_slot` returned)."""
        self._next = max(self._next, at) + self.interval()
        if self.adaptive:
            self._sent.append(at)
            while self._sent[0] < at - MAX_WINDOW:
                self._sent.popleft()

    def pause(self, now: float, seconds: float) -> bool:
        """Stop every call for ``seconds`` (<= ``max_pause``); True if that extended the pause."""
        until = now + min(max(seconds, 0.0), self.max_pause)
        if until <= self.pause_until:
            return False
        self.pause_until = until
        self._next = -math.inf  # earlier reservations are void; the pause spaces the next
        self.epoch += 1
        return True

    def throttled(self, now: float, sent_at: float) -> bool:
        """A 429 for a call sent at ``sent_at``; True when the rate changed."""
        if not self.adaptive or sent_at < self._decreased_at:
            return False
        drew = self.recent_rate(now, sent_at)
        if self.rate is not None:
            drew = min(drew, self.rate)
        self._reference = max(drew, self.min_rate)
        self.rate = max(self.beta * drew, self.min_rate)
        self._decreased_at = now
        self._next = now + 1 / self.rate  # earlier reservations are void (epoch)
        self.epoch += 1
        return True

    def succeeded(self, sent_at: float) -> bool:
        """A call sent at ``sent_at`` was answered without a 429; True when the rate changed."""
        if not self.adaptive or self.rate is None or sent_at < self._decreased_at:
            return False
        near = NEAR[0] * self._reference <= self.rate <= NEAR[1] * self._reference
        growth = self.probe_growth if near else self.growth
        self.rate += growth * self._reference / self.rate
        if self.rate >= UNLIMIT_FACTOR * self._reference:
            self.rate = None
            self._next = -math.inf
        return True

    def recent_rate(self, now: float, since: float | None = None) -> float:
        """Calls per second sent over the last second, or since ``since`` if earlier (<= 10 s).

        Only adaptive mode keeps the send times; elsewhere this is 0.
        """
        start = now - WINDOW if since is None else max(min(since, now - WINDOW), now - MAX_WINDOW)
        sent = sum(1 for at in self._sent if start <= at <= now)
        return sent / (now - start)
