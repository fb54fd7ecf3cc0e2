"""The job: one request in, one Outcome out. No AMQP in here."""

from __future__ import annotations

import logging
import time
from collections.abc import Coroutine, Mapping
from dataclasses import replace
from typing import Any

from service.contracts import DeleteRequest, Request, SourceInfo, UploadRequest
from service.destinations.base import Destination
from service.errors import CourierError, ErrorCode, PermanentError
from service.flow import DeferReason, Deferred, FlowControl, calls_made, current_request
from service.outcome import Held, Outcome
from service.prechecks import check_scheme
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

    async def process(self, request: Request, request_id: str) -> Outcome:
        """Run one attempt; never raises for a failed request, only reports it."""
        source = (
            SourceInfo(url=redact_url(request.source.url))
            if isinstance(request, UploadRequest)
            else None
        )
        base = Outcome(0.0, request.destination.type, source=source, operation=request.operation)
        if isinstance(request, DeleteRequest):
            return await self._guarded(request_id, base, self._delete(request, base))
        return await self._guarded(request_id, base, self._upload(request, request_id, base))

    async def follow(self, request: UploadRequest, request_id: str) -> Outcome:
        """Read the state of the file an upload of ``request`` made; never raises."""
        kind = request.destination.type
        base = Outcome(0.0, kind, source=SourceInfo(url=redact_url(request.source.url)))
        return await self._guarded(request_id, base, self._read(request, request_id, base))

    async def _guarded(
        self, request_id: str, base: Outcome, work: Coroutine[Any, Any, Outcome]
    ) -> Outcome:
        """Run ``work`` for ``request_id``: any failure becomes part of the outcome."""
        started = time.perf_counter()
        calls_made.set(0)
        current_request.set(request_id)
        try:
            outcome = await work
        except Deferred as hold:
            reason = _HOLD_REASONS[hold.reason].format(base.destination)
            outcome = replace(base, held=Held(hold.seconds, reason, calls_made.get() > 0))
        except CourierError as exc:
            outcome = replace(base, error=exc)
        except Exception:
            log.exception("unexpected error while processing a request")
            error = PermanentError(ErrorCode.INTERNAL_ERROR, "unexpected error in Courier")
            outcome = replace(base, error=error)
        return replace(outcome, duration_ms=_since(started))

    def _destination(self, name: str) -> Destination:
        destination = self._destinations[name]
        if not destination.configured():
            raise PermanentError(
                ErrorCode.DESTINATION_NOT_CONFIGURED,
                f"no API key is configured for {destination.name}",
            )
        return destination

    def _admit(self, destination: Destination) -> None:
        """An open breaker or a long rate-limit wait: hold before fetching anything."""
        if self._flows is not None:
            self._flows.for_destination(destination.name).check()

    async def _upload(self, request: UploadRequest, request_id: str, base: Outcome) -> Outcome:
        # Cheapest checks first; the first failure decides the error code.
        check_scheme(request.source.url)
        source = self._sources[scheme_of(request.source.url)]
        destination = self._destination(request.destination.type)
        destination.precheck(request)
        source.check(request.source)
        self._admit(destination)
        uploaded = await destination.deliver(request, source, request_id)
        return replace(
            base,
            delivery=uploaded.delivery,
            source=uploaded.source,
            result=uploaded.result,
            deduplicated=uploaded.deduplicated,
            replaced_uid=uploaded.replaced_uid,
            file=uploaded.file,
        )

    async def _read(self, request: UploadRequest, request_id: str, base: Outcome) -> Outcome:
        destination = self._destination(request.destination.type)
        self._admit(destination)
        return replace(base, file=await destination.read(request, request_id))

    async def _delete(self, request: DeleteRequest, base: Outcome) -> Outcome:
        destination = self._destination(request.destination.type)
        self._admit(destination)
        removed = await destination.delete(request)
        return replace(base, result=removed.result, existed=removed.existed)


_HOLD_REASONS = {
    DeferReason.BREAKER_OPEN: "{}'s circuit breaker is open after repeated failures",
    DeferReason.PROBE_IN_FLIGHT: "{} is being probed after an outage",
    DeferReason.RATE_LIMITED: "{} is rate limited",
}


def _since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 1)
