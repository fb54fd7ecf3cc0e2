"""W3C trace context: the request's ``traceparent`` follows it into every HTTP call.

Outgoing calls carry the request's trace context unchanged (propagation
without spans of our own), so a tracing backend can join the producer, the
source server and the destination API on one trace id.
"""

from __future__ import annotations

import time
from contextvars import ContextVar
from types import SimpleNamespace

import aiohttp

from service.metrics import Metrics

traceparent: ContextVar[str | None] = ContextVar("courier_traceparent", default=None)


def trace_config(
    metrics: Metrics | None = None, destination: str | None = None
) -> aiohttp.TraceConfig:
    """An aiohttp TraceConfig that adds ``traceparent`` and, for a destination, records metrics."""
    config = aiohttp.TraceConfig()

    async def on_start(
        _: aiohttp.ClientSession, context: SimpleNamespace, params: aiohttp.TraceRequestStartParams
    ) -> None:
        context.started = time.perf_counter()
        value = traceparent.get()
        if value is not None and "traceparent" not in params.headers:
            params.headers["traceparent"] = value

    config.on_request_start.append(on_start)
    if metrics is None or destination is None:
        return config

    def observe(context: SimpleNamespace, status: str) -> None:
        metrics.destination_requests.labels(destination, status).inc()
        metrics.destination_duration.labels(destination).observe(
            time.perf_counter() - context.started
        )

    async def on_end(
        _: aiohttp.ClientSession, context: SimpleNamespace, params: aiohttp.TraceRequestEndParams
    ) -> None:
        observe(context, str(params.response.status))

    async def on_error(
        _: aiohttp.ClientSession,
        context: SimpleNamespace,
        params: aiohttp.TraceRequestExceptionParams,
    ) -> None:
        observe(context, "error")

    config.on_request_end.append(on_end)
    config.on_request_exception.append(on_error)
    return config
