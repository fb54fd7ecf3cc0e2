"""The one way a test asserts a wall-clock bound, so every bound's margin is measured.

``assert_within(name, measured, bound)`` asserts ``measured <= bound`` and records
``measured / bound`` (how much of the budget was used: 0.3 is a wide margin, 0.9 a
thin one) as the test's property ``timing:<name>``. pytest writes it into the junit
XML, and ``python -m scripts.flake_report`` prints each bound's worst margin over
many runs, so a bound that is about to fail shows before it does.

An upper bound (something must happen within so long) fails when the machine is
slow, so a test holding one belongs to the ``timing`` tier: serial, on a quiet
broker node. A lower bound (``assert_at_least``: something must take at least so
long, a pacing or a Retry-After honoured) can only be broken by the code, never by
load, so it may stay in the default tier; it is recorded as ``floor:<name>`` with
``floor / measured`` (near 1 is normal: the code waits what it must, no longer).
"""

from __future__ import annotations

from collections.abc import Callable

PREFIX = "timing:"
FLOOR_PREFIX = "floor:"

# Set by the test suite (tests/conftest.py) to the running test's record_property;
# outside pytest (benchmarks, the demo) bounds are asserted and nothing is recorded.
_record: Callable[[str, object], None] | None = None
_worst: dict[str, float] = {}


def set_recorder(record: Callable[[str, object], None] | None) -> None:
    """Record margins with ``record`` (pytest's ``record_property``) from now on."""
    global _record
    _record = record
    _worst.clear()


def _note(key: str, margin: float) -> None:
    # One value per bound and test: the worst of the calls (a bound checked in a loop).
    worst = max(margin, _worst.get(key, 0.0))
    _worst[key] = worst
    if _record is not None:
        _record(key, round(worst, 4))


def assert_within(name: str, measured: float, bound: float) -> None:
    """Assert that ``measured`` seconds is at most ``bound``; record the margin used."""
    if bound <= 0:
        raise ValueError(f"{name}: the bound must be positive, not {bound}")
    _note(PREFIX + name, measured / bound)
    assert measured <= bound, f"{name}: {measured:.3f}s, over the bound of {bound:.3f}s"


def assert_at_least(name: str, measured: float, floor: float) -> None:
    """Assert that ``measured`` seconds is at least ``floor``; record ``floor / measured``."""
    if floor <= 0:
        raise ValueError(f"{name}: the floor must be positive, not {floor}")
    _note(FLOOR_PREFIX + name, floor / measured if measured > 0 else float("inf"))
    assert measured >= floor, f"{name}: {measured:.3f}s, under the floor of {floor:.3f}s"
