"""Settings the broker would refuse fail at start-up, naming the variable."""

from __future__ import annotations

import os

import pytest

from service.config import ConfigError, load_settings
from service.topology import MAX_TTL_MS, Topology
from testbed.support import Names, courier, courier_env


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only what a test sets: no COURIER_* from the caller's shell."""
    for key in list(os.environ):
        if key.startswith(("COURIER_", "INCONVO_")):
            monkeypatch.delenv(key)


LONGEST = MAX_TTL_MS // 1000  # whole seconds RabbitMQ's x-message-ttl can hold


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("COURIER_RETRY_DELAYS", "10s,50d"),
        ("COURIER_RETRY_DELAYS", f"{LONGEST + 1}s"),
        ("COURIER_QUEUE", "amq.uploads"),
        ("COURIER_QUEUE", "\u00e9" * 121),  # 121 characters, 242 bytes: its tiers' names pass 255
        ("COURIER_EVENTS_EXCHANGE", "amq.courier"),
        ("COURIER_EVENTS_EXCHANGE", "\u00e9" * 128),
    ],
)
def test_values_the_broker_would_refuse_are_config_errors(variable: str, value: str) -> None:
    """Delays over RabbitMQ's TTL limit, reserved or over-long names: ConfigError naming the variable."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(variable, value)
        with pytest.raises(ConfigError) as info:
            load_settings()
    assert info.value.variable == variable


def test_values_at_the_broker_limits_are_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    """The longest delay RabbitMQ takes, and names at the byte limit, are fine."""
    monkeypatch.setenv("COURIER_RETRY_DELAYS", f"10s,{LONGEST}s")
    monkeypatch.setenv("COURIER_QUEUE", "q" * 183)  # leaves room for ".tenant.<64>"
    monkeypatch.setenv("COURIER_EVENTS_EXCHANGE", "\u00e9" * 127)
    settings = load_settings()
    assert settings.retry_delays == (10, LONGEST)
    topology = Topology.from_settings(settings)
    assert len(topology.tier(LONGEST).name.encode()) <= 255
    assert len(topology.tenant("t" * 64).name.encode()) <= 255


async def test_courier_run_exits_2_on_a_delay_over_the_ttl_limit(names: Names) -> None:
    """`courier run` stops with status 2 and one line naming COURIER_RETRY_DELAYS, before any broker call."""
    env = courier_env(COURIER_QUEUE=names.queue, COURIER_RETRY_DELAYS="10s,1m,60d")
    code, _, err = await courier("run", env=env)
    lines = err.decode().strip().splitlines()
    assert code == 2, lines
    assert len(lines) == 1 and "COURIER_RETRY_DELAYS" in lines[0]
