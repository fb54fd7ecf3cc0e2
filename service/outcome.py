"""How one attempt at a request ended: what the pipeline reports and the settle decides on."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from service.contracts import DeliveryMode, SourceInfo
from service.errors import CourierError


@dataclass(frozen=True, slots=True)
class Held:
    """The destination could not take the request now: an open breaker or a rate limit."""

    seconds: float  # until it is expected to take requests again
    reason: str
    tried: bool = False  # whether this attempt had made a real call before it was held


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one attempt at a request ended."""

    duration_ms: float
    destination: str | None
    delivery: DeliveryMode | None = None
    source: SourceInfo | None = None
    result: Any = None
    error: CourierError | None = None
    deduplicated: bool = False
    held: Held | None = None

    @property
    def succeeded(self) -> bool:
        """Whether the attempt succeeded."""
        return self.error is None and self.held is None

    @classmethod
    def refused(
        cls, error: CourierError, *, destination: str | None, source_url: str | None
    ) -> Outcome:
        """A request that never started: unreadable, invalid or poisoned."""
        source = SourceInfo(url=source_url) if source_url else None
        return cls(0.0, destination, source=source, error=error)

    def masked(self, mask: Callable[[str], str]) -> Outcome:
        """This outcome with ``mask`` applied to its error message (an API may echo secrets)."""
        error = self.error
        if error is None:
            return self
        text = mask(error.message)
        if text == error.message:
            return self
        copy = type(error)(
            error.code, text, http_status=error.http_status, retry_after=error.retry_after
        )
        return dataclasses.replace(self, error=copy)
