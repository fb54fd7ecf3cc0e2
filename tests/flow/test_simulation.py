"""Issue 12's targets, met by the real flow control in deterministic virtual-time simulations."""

from __future__ import annotations

import pytest

from testbed import flow_sim


@pytest.mark.parametrize("millis", [True, False], ids=["retry-after-ms", "whole-seconds"])
def test_adaptive_rate_against_a_strict_20_per_second_limit(millis: bool) -> None:
    """No configured rate, 32 concurrent, 5 ms API, 300 requests: < 20% 429s, >= 70% of 20/s."""
    figures = flow_sim.rate_limited(limit=20, millis=millis)
    assert figures.refused / figures.requests < 0.20, figures
    assert figures.throughput >= 0.70 * 20, figures


def test_token_bucket_against_a_strict_20_per_second_limit() -> None:
    """COURIER_*_RATE_LIMIT=20 against a strict 20/s: at most 1% 429s, at least 80% of 20/s."""
    figures = flow_sim.rate_limited(limit=20, configured=20)
    assert figures.refused <= 0.01 * figures.requests, figures
    assert figures.throughput >= 0.80 * 20, figures


def test_the_same_simulation_gives_the_same_figures() -> None:
    """Virtual time makes a run exactly repeatable."""
    assert flow_sim.rate_limited(requests=100) == flow_sim.rate_limited(requests=100)


def test_an_outage_is_held_instead_of_hammered() -> None:
    """503 for 20 s with 60 requests: only the calls in flight and the probes reach the API."""
    figures, during = flow_sim.outage(down_for=20, requests=60, concurrency=32)
    # 32 in flight when it went down, a few immediate re-tries before the 5th failure
    # opened the breaker, then one probe at 10 s (failed) and one at 30 s (succeeded).
    assert during <= 32 + 5 + 1, (figures, during)
    assert figures.calls - during == 60, (figures, during)  # after it: one call each
    assert figures.holds > 0
    assert 30 <= figures.seconds < 31.5, figures
