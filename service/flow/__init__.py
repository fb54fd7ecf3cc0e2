"""Flow control (CONTRACT section 7): per-destination circuit breakers and rate limits.

No aio-pika here: the AMQP layer decides what holding a request means. See
:mod:`service.flow.control` for the API and how to wire it.
"""

from service.flow.breaker import MAX_COOLDOWN, Breaker, BreakerState
from service.flow.control import (
    DESTINATIONS,
    MAX_WAIT,
    Clock,
    DestinationFlow,
    FlowControl,
    FlowObserver,
    Hold,
    HoldReason,
    LoopClock,
    NullObserver,
    Ticket,
    is_transient,
)
from service.flow.middleware import calls_made, flow_middleware
from service.flow.rate import RateControl

__all__ = [
    "DESTINATIONS",
    "MAX_COOLDOWN",
    "MAX_WAIT",
    "Breaker",
    "BreakerState",
    "Clock",
    "DestinationFlow",
    "FlowControl",
    "FlowObserver",
    "Hold",
    "HoldReason",
    "LoopClock",
    "NullObserver",
    "RateControl",
    "Ticket",
    "calls_made",
    "flow_middleware",
    "is_transient",
]
