"""The job: one request in, one Outcome out. No AMQP in here."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from service.contracts import SourceInfo, UploadRequest
from service.destinations.base import Destination
from service.errors import CourierError, ErrorCode, PermanentError
from service.flow import DeferReason, Deferred, FlowControl, calls_made
from service.outcome import Held, Outcome
from service.redact import redact_url
from service.sources.base import Source
from service.urls import scheme_of

log = logging.getLogger(__name__)


class Pipeline:
    """Runs requests through the checks, the source and the destination."""

    def __init__(
        self,
        sources: Mapping[str, Source],
        destinations: Mapping[str, Destination],
        flows: FlowControl | None = None,
    ) -> None:
        self._sources = dict(sources)
        self._destinations = dict(destinations)
        self._flows = flows

    async def process(self, request: UploadRequest) -> Outcome:
        """Run one attempt; never raises for a failed request, only reports it."""
        started = time.perf_counter()
        kind = request.destination.type
        calls_made.set(0)
        try:
            delivered = await self._run(request)
        except Deferred as hold:
            return Outcome(
                duration_ms=_since(started),
                destination=kind,
                source=SourceInfo(url=redact_url(request.source.url)),
                held=Held(
                    hold.seconds, _HOLD_REASONS[hold.reason].format(kind), calls_made.get() > 0
                ),
            )
        except CourierError as exc:
            return Outcome(
                duration_ms=_since(started),
                destination=kind,
                source=SourceInfo(url=redact_url(request.source.url)),
                error=exc,
            )
        except Exception:
            log.exception("unexpected error while processing a request")
            return Outcome(
                duration_ms=_since(started),
                destination=kind,
                source=SourceInfo(url=redact_url(request.source.url)),
                error=PermanentError(ErrorCode.INTERNAL_ERROR, "unexpected error in Courier"),
            )
        return Outcome(
            duration_ms=_since(started),
            destination=kind,
            delivery=delivered.delivery,
            source=delivered.source,
            result=delivered.result,
            deduplicated=delivered.deduplicated,
        )

    async def _run(self, request: UploadRequest) -> Any:
        # Cheapest checks first; the first failure decides the error code.
        scheme = scheme_of(request.source.url)
        source = self._sources.get(scheme)
        if source is None:
            raise PermanentError(
                ErrorCode.UNSUPPORTED_SOURCE,
                f"unsupported source scheme {scheme!r}: use s3, http or https",
            )
        destination = self._destinations[request.destination.type]
        if not destination.configured():
            raise PermanentError(
                ErrorCode.DESTINATION_NOT_CONFIGURED,
                f"no API key is configured for {destination.name}",
            )
        destination.precheck(request)
        source.check(request.source)
        if self._flows is not None:
            # An open breaker or a long rate-limit wait: hold before fetching anything.
            self._flows.for_destination(destination.name).check()
        return await destination.deliver(request, source)


_HOLD_REASONS = {
    DeferReason.BREAKER_OPEN: "{}'s circuit breaker is open after repeated failures",
    DeferReason.PROBE_IN_FLIGHT: "{} is being probed after an outage",
    DeferReason.RATE_LIMITED: "{} is rate limited",
}


def _since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 1)
