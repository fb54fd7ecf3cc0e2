"""The flow-control settings: defaults, durations, bad values."""

from __future__ import annotations

import os

import pytest

from service.config import ConfigError, load_settings
from testbed.support import courier, courier_env

FLOW_VARIABLES = (
    "COURIER_BREAKER_THRESHOLD",
    "COURIER_BREAKER_COOLDOWN",
    "COURIER_HOLD_MAX",
    "COURIER_INCONVO_RATE_LIMIT",
    "COURIER_MINDSET_RATE_LIMIT",
    "COURIER_SOURCE_TIMEOUT",
)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No flow-control variable from the developer's environment."""
    for name in list(os.environ):
        if name.upper().startswith(FLOW_VARIABLES):
            monkeypatch.delenv(name)


def test_defaults_are_the_contracts() -> None:
    """Threshold 5, cooldown 10 s, hold 1 h, no rate limits, source timeout 300 s."""
    settings = load_settings()
    assert settings.breaker_threshold == 5
    assert settings.breaker_cooldown == 10.0
    assert settings.hold_max == 3600.0
    assert settings.inconvo_rate_limit is None
    assert settings.mindset_rate_limit is None
    assert settings.source_timeout == 300.0


def test_durations_and_rates_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """Durations take seconds or s/m/h; rates are requests/s; an empty rate is no rate."""
    monkeypatch.setenv("COURIER_BREAKER_THRESHOLD", "3")
    monkeypatch.setenv("COURIER_BREAKER_COOLDOWN", "30s")
    monkeypatch.setenv("COURIER_HOLD_MAX", "2h")
    monkeypatch.setenv("COURIER_SOURCE_TIMEOUT", "45")
    monkeypatch.setenv("COURIER_INCONVO_RATE_LIMIT", "2.5")
    monkeypatch.setenv("COURIER_MINDSET_RATE_LIMIT", " ")
    settings = load_settings()
    assert settings.breaker_threshold == 3
    assert settings.breaker_cooldown == 30.0
    assert settings.hold_max == 7200.0
    assert settings.source_timeout == 45.0
    assert settings.inconvo_rate_limit == 2.5
    assert settings.mindset_rate_limit is None
    monkeypatch.setenv("COURIER_BREAKER_COOLDOWN", "5m")
    assert load_settings().breaker_cooldown == 300.0


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("COURIER_BREAKER_THRESHOLD", "0"),
        ("COURIER_BREAKER_THRESHOLD", "five"),
        ("COURIER_BREAKER_COOLDOWN", "0"),
        ("COURIER_BREAKER_COOLDOWN", "6m"),  # past the 5 min the cooldown may double to
        ("COURIER_BREAKER_COOLDOWN", "10x"),
        ("COURIER_HOLD_MAX", "-1h"),
        ("COURIER_INCONVO_RATE_LIMIT", "0"),
        ("COURIER_INCONVO_RATE_LIMIT", "fast"),
        ("COURIER_MINDSET_RATE_LIMIT", "inf"),
        ("COURIER_MINDSET_RATE_LIMIT", "nan"),
        ("COURIER_SOURCE_TIMEOUT", "0s"),
    ],
)
def test_bad_values_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    """Each bad value is a ConfigError naming its variable."""
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as raised:
        load_settings()
    assert raised.value.variable == variable


@pytest.mark.parametrize(
    ("variable", "value"),
    [("COURIER_BREAKER_THRESHOLD", "0"), ("COURIER_HOLD_MAX", "soon")],
)
async def test_bad_value_exits_2_naming_the_variable(variable: str, value: str) -> None:
    """`courier run` with a bad flow-control value exits 2 with one line naming the variable."""
    code, _, err = await courier("run", env=courier_env(**{variable: value}))
    assert code == 2
    lines = err.decode().strip().splitlines()
    assert len(lines) == 1
    assert variable in lines[0]
