"""W3C trace context: the request's ``traceparent`` follows it into every HTTP call.

Without OpenTelemetry, outgoing calls carry the request's trace context
unchanged (propagation without spans of our own), so a tracing backend can
still join the producer, the source server and the destination API on one
trace id. With the ``otel`` extra installed and an exporter configured through
the standard ``OTEL_*`` variables, Courier also records spans: one per request
(a child of the producer's span), one per source fetch and one per outgoing
HTTP call, and the calls carry the current span's context instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from typing import TYPE_CHECKING

import aiohttp

from service import __version__

if TYPE_CHECKING:
    from opentelemetry.trace import Span, Tracer, TracerProvider

log = logging.getLogger(__name__)

traceparent: ContextVar[str | None] = ContextVar("courier_traceparent", default=None)
_tracer: Tracer | None = None
# Without OTel a span costs nothing but this (reusable) context manager.
NO_SPAN: contextlib.nullcontext[None] = contextlib.nullcontext()
_provider: TracerProvider | None = None


def otel_enabled() -> bool:
    """Whether OpenTelemetry spans are being recorded."""
    return _tracer is not None


def use_tracer_provider(provider: TracerProvider | None) -> None:
    """Record spans with ``provider`` (None turns spans off again)."""
    global _tracer, _provider  # one tracer for the process, set at start-up
    _provider = provider
    _tracer = None if provider is None else provider.get_tracer("courier", __version__)


def shutdown_otel() -> None:
    """Flush and stop span export (at exit); spans are off afterwards."""
    provider = _provider
    use_tracer_provider(None)
    shutdown = getattr(provider, "shutdown", None)
    if shutdown is not None:
        shutdown()


def setup_otel(environ: Mapping[str, str] | None = None) -> bool:
    """Turn spans on when an OTLP exporter is configured by the standard ``OTEL_*`` variables.

    Needs the ``otel`` extra (``pip install 'upload-courier[otel]'``); without it,
    or without an exporter configured, this does nothing and costs nothing.
    """
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporter = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    if exporter in ("", "none") and not endpoint:
        return False
    if exporter not in ("", "otlp"):
        log.warning("OTEL_TRACES_EXPORTER=%s is not supported; only otlp is", exporter)
        return False
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        log.warning(
            "an OTLP exporter is configured but the otel extra is not installed "
            "(pip install 'upload-courier[otel]'); no spans are recorded"
        )
        return False
    resource = Resource.create(
        {"service.name": env.get("OTEL_SERVICE_NAME", "courier"), "service.version": __version__}
    )
    provider = SdkTracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    use_tracer_provider(provider)
    log.info("OpenTelemetry spans are exported over OTLP")
    return True


def request_span(
    parent: str | None, **attributes: str | int
) -> contextlib.AbstractContextManager[Span | None]:
    """The span of one request, continuing the producer's trace; None without OTel."""
    if _tracer is None:
        return NO_SPAN
    from opentelemetry.trace import SpanKind
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    context = TraceContextTextMapPropagator().extract({"traceparent": parent}) if parent else None
    return _tracer.start_as_current_span(
        "courier.upload", context=context, kind=SpanKind.CONSUMER, attributes=attributes
    )


def record_outcome(span: Span | None, error_code: str | None) -> None:
    """Mark the request's span failed with the contract's error code (or leave it ok)."""
    if span is None or error_code is None:
        return
    from opentelemetry.trace import Status, StatusCode

    span.set_attribute("courier.error_code", error_code)
    span.set_status(Status(StatusCode.ERROR, error_code))


def child_span(
    name: str, **attributes: str | int
) -> contextlib.AbstractContextManager[Span | None]:
    """A span inside the current request's span; None without OTel."""
    if _tracer is None:
        return NO_SPAN
    return _tracer.start_as_current_span(name, attributes=attributes)


def _client_span(method: str, url: str) -> tuple[Span, dict[str, str]]:
    """Start a CLIENT span for an outgoing call; returns it and the headers that carry it."""
    from opentelemetry.trace import SpanKind, set_span_in_context
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    assert _tracer is not None  # noqa: S101 - only called when OTel is on
    span = _tracer.start_span(
        f"HTTP {method}",
        kind=SpanKind.CLIENT,
        attributes={"http.request.method": method, "server.address": url},
    )
    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier, context=set_span_in_context(span))
    return span, carrier


CallObserver = Callable[[str, float], None]


def client_middleware(observe: CallObserver | None = None) -> aiohttp.ClientMiddlewareType:
    """An aiohttp client middleware that adds ``traceparent`` and records client spans.

    ``observe(status, seconds)`` is called when each call's answer arrives
    (``status`` is the HTTP status code, or ``"error"`` when none came): metrics
    hook in here. Placed after flow control's middleware, it sees only the calls
    that were really made.
    """

    async def middleware(
        request: aiohttp.ClientRequest, handler: aiohttp.ClientHandlerType
    ) -> aiohttp.ClientResponse:
        started = time.perf_counter()
        span = None
        if "traceparent" not in request.headers:
            if _tracer is not None:
                # Only the host: paths and queries may carry identifiers or signatures.
                span, carrier = _client_span(request.method, request.url.host or "")
                request.headers.update(carrier)
            elif (value := traceparent.get()) is not None:
                request.headers["traceparent"] = value
        status = "error"
        try:
            response = await handler(request)
            status = str(response.status)
            return response
        finally:
            if span is not None:
                if status == "error":
                    span.set_attribute("error.type", status)
                else:
                    span.set_attribute("http.response.status_code", int(status))
                span.end()
            if observe is not None:
                observe(status, time.perf_counter() - started)

    return middleware
