"""An asyncio event loop on virtual time: sleeps take no real time, results are deterministic.

Whenever every task is waiting on a timer, the loop jumps its clock to the
next one instead of blocking. For simulations of time-driven logic (flow
control, the ack gate) with many concurrent tasks; no real I/O should happen
inside. Code that reads ``time.monotonic()`` itself is given the loop's clock
instead: ``run_virtual(coro, clocks=[module])`` swaps that module's ``time``.
"""

from __future__ import annotations

import asyncio
import selectors
import time
from collections.abc import Coroutine, Iterable
from types import ModuleType
from typing import Any, TypeVar

T = TypeVar("T")


class _Selector(selectors.SelectSelector):
    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        ready = super().select(0)
        if ready:
            return ready
        if timeout is None:
            raise RuntimeError("virtual time: every task waits and no timer is set (a deadlock)")
        self.now += timeout
        return []


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """A selector event loop whose ``time()`` only advances when everything waits."""

    def __init__(self) -> None:
        self._virtual = _Selector()
        super().__init__(self._virtual)

    def time(self) -> float:
        """Virtual seconds since the loop was made."""
        return self._virtual.now


class _Clock:
    """Stands in for the ``time`` module: ``monotonic()`` is the virtual loop's clock."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def monotonic(self) -> float:
        return self._loop.time()

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def run_virtual(coro: Coroutine[Any, Any, T], *, clocks: Iterable[ModuleType] = ()) -> T:
    """Run ``coro`` to completion on a fresh :class:`VirtualTimeLoop`.

    ``clocks``: modules that call ``time.monotonic()``; for the run their ``time``
    is the loop's virtual clock.
    """
    loop = VirtualTimeLoop()
    swapped = [(module, module.time) for module in clocks]
    for module, _ in swapped:
        module.time = _Clock(loop)  # type: ignore[attr-defined]
    try:
        return loop.run_until_complete(coro)
    finally:
        for module, real in swapped:
            module.time = real  # type: ignore[attr-defined]
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
