"""Deterministic simulations of flow control on virtual time: an outage, a rate limit, a slow destination.

Clients run the real :class:`~service.flow.DestinationFlow` against a simulated
server: a strict N-per-second window answering 429 with ``Retry-After`` (and
optionally ``retry-after-ms``), or an outage answering 503. A request that gets
a 429 or a 503 is tried again at once (admission does the waiting); a request
held is put aside for ``Deferred.seconds`` and tried again. Nothing else is
modelled (no in-process retry limit, no delay tiers).

``python -m testbed.flow_sim`` prints the figures.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from service.flow import Breaker, Deferred, DestinationFlow, RateControl
from service.retry import parse_retry_after
from testbed.fakes._server import SlidingWindow, retry_after_headers
from testbed.virtual_time import run_virtual


@dataclass(frozen=True)
class Figures:
    """What one simulated run did."""

    requests: int
    seconds: float  # virtual time from the first call to the last answer
    calls: int  # HTTP calls made (429s and 503s included)
    refused: int  # 429 or 503 answers
    requests_refused: int  # requests that got at least one of them
    holds: int  # admissions that raised Deferred

    @property
    def throughput(self) -> float:
        """Requests completed per second."""
        return self.requests / self.seconds

    def __str__(self) -> str:
        return (
            f"{self.requests} requests in {self.seconds:.2f} s ({self.throughput:.2f}/s), "
            f"{self.calls} calls, {self.refused} refused ({self.refused / self.requests:.1%} "
            f"of requests; {self.requests_refused} requests got one), {self.holds} holds"
        )


@dataclass
class _Counts:
    calls: int = 0
    refused: int = 0
    requests_refused: int = 0
    holds: int = 0


async def _drive(
    flow: DestinationFlow,
    answer: _Answer,
    *,
    requests: int,
    concurrency: int,
    latency: float,
) -> Figures:
    loop = asyncio.get_running_loop()
    left = requests
    counts = _Counts()

    async def one_request() -> None:
        refused = False
        while True:
            try:
                ticket = await flow.admit()
            except Deferred as hold:
                counts.holds += 1
                await asyncio.sleep(hold.seconds)
                continue
            await asyncio.sleep(latency / 2)
            status, headers = answer(loop.time())
            await asyncio.sleep(latency / 2)
            counts.calls += 1
            if status < 400:
                ticket.record(status)
                break
            refused = True
            counts.refused += 1
            ticket.record(status, retry_after=parse_retry_after(headers))
        counts.requests_refused += refused

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await one_request()

    start = loop.time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return Figures(
        requests=requests,
        seconds=loop.time() - start,
        calls=counts.calls,
        refused=counts.refused,
        requests_refused=counts.requests_refused,
        holds=counts.holds,
    )


class _Answer:
    def __call__(self, now: float) -> tuple[int, dict[str, str]]:
        raise NotImplementedError


class _RateLimited(_Answer):
    def __init__(self, per_second: int, millis: bool) -> None:
        self.window = SlidingWindow(per_second)
        self.millis = millis

    def __call__(self, now: float) -> tuple[int, dict[str, str]]:
        wait = self.window.admit(now)
        if wait is None:
            return 200, {}
        return 429, retry_after_headers(wait, millis=self.millis)


class _Outage(_Answer):
    def __init__(self, until: float) -> None:
        self.until = until
        self.calls_during = 0

    def __call__(self, now: float) -> tuple[int, dict[str, str]]:
        if now < self.until:
            self.calls_during += 1
            return 503, {}
        return 200, {}


def rate_limited(
    *,
    limit: int = 20,
    configured: float | None = None,
    requests: int = 300,
    concurrency: int = 32,
    latency: float = 0.005,
    millis: bool = True,
) -> Figures:
    """``requests`` through a flow (adaptive, or a ``configured`` bucket) to a strict ``limit``/s."""

    async def run() -> Figures:
        flow = DestinationFlow("sim", breaker=Breaker(5, 10.0), rate=RateControl(configured))
        answer = _RateLimited(limit, millis)
        return await _drive(
            flow, answer, requests=requests, concurrency=concurrency, latency=latency
        )

    return run_virtual(run())


def outage(
    *,
    down_for: float = 20.0,
    requests: int = 60,
    concurrency: int = 32,
    latency: float = 0.005,
    threshold: int = 5,
    cooldown: float = 10.0,
) -> tuple[Figures, int]:
    """``requests`` to a destination answering 503 for ``down_for`` s: figures, calls during it."""

    async def run() -> tuple[Figures, int]:
        flow = DestinationFlow("sim", breaker=Breaker(threshold, cooldown), rate=RateControl())
        answer = _Outage(asyncio.get_running_loop().time() + down_for)
        figures = await _drive(
            flow, answer, requests=requests, concurrency=concurrency, latency=latency
        )
        return figures, answer.calls_during

    return run_virtual(run())


def main() -> None:
    """Print the figures of the simulated scenarios."""
    logging.getLogger("service.flow").setLevel(logging.ERROR)  # the breaker's own warnings
    for millis in (True, False):
        header = "Retry-After + retry-after-ms" if millis else "Retry-After (whole seconds)"
        print(f"adaptive, strict 20/s, {header}: {rate_limited(millis=millis)}")
    print(f"token bucket 20/s, strict 20/s: {rate_limited(configured=20)}")
    figures, during = outage()
    print(f"503 for 20 s, 60 requests: {figures}; {during} calls during the outage")


if __name__ == "__main__":
    main()
