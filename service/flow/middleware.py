"""The aiohttp client middleware that puts a destination's session under flow control."""

from __future__ import annotations

import asyncio
from contextvars import ContextVar

import aiohttp
from aiohttp import ClientHandlerType, ClientMiddlewareType, ClientRequest, ClientResponse

from service.flow.control import PAUSE_STATUSES, DestinationFlow
from service.retry import parse_retry_after

# Calls admitted in the current task: the pipeline resets it for each attempt, so a
# held attempt knows whether it had made a real call before (then it counts). A
# half-open breaker's probe is not counted: it tests the destination for everyone,
# and its failure must not cost the request that happened to carry it an attempt.
calls_made: ContextVar[int] = ContextVar("courier_calls_made", default=0)

# No usable answer: the connection failed, the answer broke off or was garbage, or it
# timed out. (aiohttp raises its argument errors, a bad URL say, before middlewares run.)
_NO_ANSWER = (aiohttp.ClientError, TimeoutError, OSError)


def flow_middleware(flow: DestinationFlow) -> ClientMiddlewareType:
    """Admission before each request the session sends, the outcome recorded after it.

    Pass it to the destination's session: ``ClientSession(middlewares=[...])``.
    Each request (every redirect hop, every in-process retry) first awaits
    :meth:`DestinationFlow.admit`, so :class:`~service.flow.Deferred` may come out of
    ``session.post(...)``; the adapters' ``except (ClientError, TimeoutError)``
    does not catch it. The outcome is taken when the answer's head arrives
    (status and ``Retry-After`` / ``retry-after-ms``); a failure while reading
    the body later is not seen. The admission wait counts toward the session's
    total timeout, so keep ``max_wait`` well below it. A request cancelled by
    the session's own timeout counts as a timeout (transient); one cancelled for
    any other reason is released without an outcome.
    """

    async def middleware(request: ClientRequest, handler: ClientHandlerType) -> ClientResponse:
        ticket = await flow.admit()
        if not ticket.probe:
            calls_made.set(calls_made.get() + 1)
        try:
            response = await handler(request)
        except asyncio.CancelledError:
            if _timed_out(request):
                ticket.record(None)
            else:
                ticket.release()
            raise
        except _NO_ANSWER:
            ticket.record(None)
            raise
        except BaseException:
            ticket.release()
            raise
        status = response.status
        retry_after = parse_retry_after(response.headers) if status in PAUSE_STATUSES else None
        ticket.record(status, retry_after=retry_after)
        return response

    return middleware


def _timed_out(request: ClientRequest) -> bool:
    """Whether the session's total timeout fired (aiohttp cancels, then raises TimeoutError)."""
    # aiohttp exposes no public way to tell its timeout's cancellation from others.
    timer = getattr(request, "_timer", None)
    return bool(getattr(timer, "_cancelled", False))
