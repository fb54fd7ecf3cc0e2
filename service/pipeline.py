"""The job: one request in, one Outcome out. No AMQP in here."""

from __future__ import annotations

import logging
import time
from collections.abc import Coroutine, Mapping
from typing import Any

from service.contracts import DeleteRequest, Request, SourceInfo, UploadRequest
from service.destinations.base import Destination, Removed, Uploaded
from service.errors import CourierError, ErrorCode, PermanentError
from service.flow import DeferReason, Deferred, FlowControl, calls_made, current_request
from service.outcome import Held, Outcome, PlatformFile
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
        if isinstance(request, DeleteRequest):
            return await self._guarded(request_id, request, self._delete(request))
        return await self._guarded(request_id, request, self._upload(request, request_id))

    async def follow(self, request: UploadRequest, request_id: str) -> Outcome:
        """Read the state of the file an upload of ``request`` made; never raises."""
        return await self._guarded(request_id, request, self._read(request, request_id))

    async def _guarded(
        self,
        request_id: str,
        request: Request,
        work: Coroutine[Any, Any, Uploaded | Removed | PlatformFile],
    ) -> Outcome:
        """Run ``work`` for ``request_id``: its result, or any failure, as the outcome."""
        started = time.perf_counter()
        calls_made.set(0)
        current_request.set(request_id)
        kind = request.destination.type
        try:
            done = await work
        except Deferred as hold:
            reason = _HOLD_REASONS[hold.reason].format(kind)
            held = Held(hold.seconds, reason, calls_made.get() > 0)
            return _unfinished(request, _since(started), held=held)
        except CourierError as exc:
            return _unfinished(request, _since(started), error=exc)
        except Exception:
            log.exception("unexpected error while processing a request")
            error = PermanentError(ErrorCode.INTERNAL_ERROR, "unexpected error in Courier")
            return _unfinished(request, _since(started), error=error)
        duration = _since(started)
        if isinstance(done, Uploaded):
            return Outcome(
                duration,
                kind,
                done.delivery,
                done.source,
                done.result,
                deduplicated=done.deduplicated,
                replaced_uid=done.replaced_uid,
                file=done.file,
            )
        if isinstance(done, Removed):
            return Outcome(
                duration, kind, operation="delete", result=done.result, existed=done.existed
            )
        return Outcome(duration, kind, source=_source_of(request), file=done)

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

    async def _upload(self, request: UploadRequest, request_id: str) -> Uploaded:
        # Cheapest checks first; the first failure decides the error code.
        check_scheme(request.source.url)
        source = self._sources[scheme_of(request.source.url)]
        destination = self._destination(request.destination.type)
        destination.precheck(request)
        source.check(request.source)
        self._admit(destination)
        return await destination.deliver(request, source, request_id)

    async def _read(self, request: UploadRequest, request_id: str) -> PlatformFile:
        destination = self._destination(request.destination.type)
        self._admit(destination)
        return await destination.read(request, request_id)

    async def _delete(self, request: DeleteRequest) -> Removed:
        destination = self._destination(request.destination.type)
        self._admit(destination)
        return await destination.delete(request)


def _source_of(request: Request) -> SourceInfo | None:
    if isinstance(request, UploadRequest):
        return SourceInfo(url=redact_url(request.source.url))
    return None


def _unfinished(
    request: Request,
    duration: float,
    *,
    held: Held | None = None,
    error: CourierError | None = None,
) -> Outcome:
    """The outcome of an attempt that was held or failed: what the request itself tells."""
    return Outcome(
        duration,
        request.destination.type,
        source=_source_of(request),
        error=error,
        held=held,
        operation=request.operation,
    )


_HOLD_REASONS = {
    DeferReason.BREAKER_OPEN: "{}'s circuit breaker is open after repeated failures",
    DeferReason.PROBE_IN_FLIGHT: "{} is being probed after an outage",
    DeferReason.RATE_LIMITED: "{} is rate limited",
}


def _since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 1)
