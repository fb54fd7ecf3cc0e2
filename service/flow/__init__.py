"""Flow control: per-destination circuit breakers and rate limits.

No aio-pika here: the AMQP layer decides what holding a request means. See
:mod:`service.flow.control` for the API and how to wire it.
"""

from service.flow.breaker import MAX_COOLDOWN, Breaker, BreakerState
from service.flow.control import (
    MAX_WAIT,
    Clock,
    DeferReason,
    Deferred,
    DestinationFlow,
    FlowControl,
    FlowObserver,
    LoopClock,
    NullObserver,
    Ticket,
    is_transient,
)
from service.flow.middleware import calls_made, flow_middleware
from service.flow.rate import RateControl

__all__ = [
    "MAX_COOLDOWN",
    "MAX_WAIT",
    "Breaker",
    "BreakerState",
    "Clock",
    "DeferReason",
    "Deferred",
    "DestinationFlow",
    "FlowControl",
    "FlowObserver",
    "LoopClock",
    "NullObserver",
    "RateControl",
    "Ticket",
    "calls_made",
    "flow_middleware",
    "is_transient",
]
