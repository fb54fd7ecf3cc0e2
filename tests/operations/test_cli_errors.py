"""A user's ordinary mistakes: one `courier: ...` line and a documented exit status, never a traceback."""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
from pathlib import Path

import aio_pika
import orjson
import pytest
from aio_pika.abc import AbstractRobustConnection

from service import __version__
from service.amqp.declare import declare_queue
from service.cli_args import EXIT_FAILED, EXIT_TIMEOUT, EXIT_UNAVAILABLE, EXIT_USAGE
from service.config import Settings, load_settings
from service.topology import Topology
from testbed.fakes import FakeMindset
from testbed.support import CourierProcess, Names, courier, courier_env, free_port
from tests.conftest import INCONVO_KEY, MINDSET_KEY


def _one_line(err: bytes) -> str:
    lines = err.decode().strip().splitlines()
    assert len(lines) == 1, err.decode()
    assert lines[0].startswith("courier: ")
    return lines[0]


async def _declare_requests(amqp: AbstractRobustConnection, names: Names) -> None:
    channel = await amqp.channel()
    await declare_queue(channel, Topology.from_settings(Settings(queue=names.queue)).requests)
    await channel.close()


async def _depth(amqp: AbstractRobustConnection, queue: str) -> int | None:
    channel = await amqp.channel()
    try:
        declared = await channel.declare_queue(queue, passive=True)
    except aio_pika.exceptions.ChannelNotFoundEntity:
        return None
    count = declared.declaration_result.message_count
    await channel.close()
    return count


async def test_version() -> None:
    """`courier --version` names the version, from the installed script and from
    `python -m service`, each in a new interpreter (the other tests fork the CLI
    from an interpreter that has its imports done: testbed/zygote.py)."""
    script = Path(sys.executable).with_name("courier")
    proc = await asyncio.create_subprocess_exec(
        script, "--version", env=courier_env(), stdout=asyncio.subprocess.PIPE
    )
    out, _ = await proc.communicate()
    assert proc.returncode == 0 and out.decode().strip() == f"courier {__version__}"
    code, out, _ = await courier("--version", env=courier_env(), fresh=True)
    assert code == 0 and out.decode().strip() == f"courier {__version__}"


@pytest.mark.parametrize(
    "command", ["run", "submit", "process", "events", "dead", "doctor", "schema"]
)
async def test_help_says_configuration_is_the_environment(command: str) -> None:
    """Every command's help names the environment variables, an example and the exit statuses."""
    code, out, _ = await courier(command, "--help", env=courier_env())
    text = out.decode()
    assert code == 0
    assert "environment variables" in text and "COURIER_AMQP_URL" in text
    assert f"courier {command}" in text.split("example", 1)[1]
    assert "exit status:" in text


@pytest.mark.parametrize("command", ["submit", "process"])
@pytest.mark.parametrize("kind", ["missing", "directory"])
async def test_an_unreadable_file_is_one_line(command: str, kind: str, tmp_path: Path) -> None:
    """A request file that is missing, or a directory, is named in one line; exit 2."""
    path = tmp_path / "nope.json" if kind == "missing" else tmp_path
    code, out, err = await courier(command, str(path), env=courier_env())
    assert code == EXIT_USAGE and out == b""
    line = _one_line(err)
    assert line.startswith(f"courier: cannot read {path}: ")
    assert ("No such file" if kind == "missing" else "Is a directory") in line


@pytest.mark.parametrize(
    "args",
    [("submit", "request"), ("submit", "--wait", "request"), ("dead", "list"), ("events",)],
    ids=["submit", "submit-wait", "dead-list", "events"],
)
async def test_an_unreachable_broker_is_one_line(args: tuple[str, ...], tmp_path: Path) -> None:
    """No broker at COURIER_AMQP_URL: one line naming it (without the password); exit 3."""
    request = tmp_path / "request.json"
    request.write_text(
        '{"source": {"url": "https://files.example.com/a.csv"}, '
        '"destination": {"type": "inconvo", "userIdentifier": "u"}}'
    )
    port = free_port()
    env = courier_env(COURIER_AMQP_URL=f"amqp://guest:hunter2@127.0.0.1:{port}/")
    argv = [str(request) if a == "request" else a for a in args]
    code, out, err = await courier(*argv, env=env)
    assert code == EXIT_UNAVAILABLE and out == b""
    line = _one_line(err)
    assert f"cannot reach RabbitMQ at amqp://127.0.0.1:{port}/" in line
    assert "COURIER_AMQP_URL" in line and "hunter2" not in line


async def test_a_port_in_use_is_a_configuration_error() -> None:
    """`courier run` whose HTTP port is taken: exit 2 and one line naming COURIER_HTTP_PORT."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = courier_env(
            COURIER_HTTP_PORT=str(port),
            COURIER_INCONVO_API_KEY=INCONVO_KEY,
            COURIER_MINDSET_API_KEY=MINDSET_KEY,
        )
        code, out, err = await courier("run", env=env)
    assert code == EXIT_USAGE and out == b""
    line = _one_line(err)
    assert line.startswith("courier: configuration error: COURIER_HTTP_PORT: ")
    assert f"127.0.0.1:{port}" in line and "in use" in line


@pytest.mark.parametrize(
    ("body", "code", "mentions"),
    [
        ({"source": {"url": "ftp://files.example.com/a.csv"}}, "unsupported_source", "'ftp'"),
        ({"source": {"url": "files.example.com/a.csv"}}, "unsupported_source", "no scheme"),
        ({"source": {"url": "https://files.example.com/a.xlsx"}}, "unsupported_type", "a.xlsx"),
        (
            {"source": {"url": "https://files.example.com/a", "fileName": "a.exe"}},
            "unsupported_type",
            "a.exe",
        ),
        ({"source": {}}, "invalid_request", "source.url"),
    ],
    ids=["ftp", "no-scheme", "xlsx-to-inconvo", "exe-file-name", "no-url"],
)
async def test_submit_refuses_a_request_certain_to_fail(
    amqp: AbstractRobustConnection,
    names: Names,
    tmp_path: Path,
    body: dict[str, object],
    code: str,
    mentions: str,
) -> None:
    """submit runs the service's offline checks first: such a request is never published; exit 1."""
    await _declare_requests(amqp, names)
    request = tmp_path / "request.json"
    request.write_bytes(
        orjson.dumps({**body, "destination": {"type": "inconvo", "userIdentifier": "u"}})
    )
    status, out, err = await courier(
        "submit", str(request), env=courier_env(COURIER_QUEUE=names.queue)
    )
    assert status == EXIT_FAILED and out == b""
    line = _one_line(err)
    assert line.startswith(f"courier: {code}: ") and mentions in line
    assert await _depth(amqp, names.queue) == 0


async def test_submit_to_a_missing_queue_declares_nothing(
    amqp: AbstractRobustConnection, names: Names, tmp_path: Path
) -> None:
    """submit only looks the queue up (no configure permission needed): a missing one is named; exit 3."""
    request = tmp_path / "request.json"
    request.write_text(
        '{"source": {"url": "https://files.example.com/a.csv"}, '
        '"destination": {"type": "inconvo", "userIdentifier": "u"}}'
    )
    code, _, err = await courier("submit", str(request), env=courier_env(COURIER_QUEUE=names.queue))
    assert code == EXIT_UNAVAILABLE
    line = _one_line(err)
    assert f"queue {names.queue} does not exist" in line and "courier run" in line
    assert await _depth(amqp, names.queue) is None


async def test_submit_wait_gives_up_after_its_timeout(
    amqp: AbstractRobustConnection, names: Names, tmp_path: Path
) -> None:
    """With nobody consuming, `submit --wait --timeout` ends with exit 4 and says why."""
    await _declare_requests(amqp, names)
    channel = await amqp.channel()
    await channel.declare_exchange(names.events_exchange, aio_pika.ExchangeType.TOPIC, durable=True)
    await channel.close()
    request = tmp_path / "request.json"
    request.write_text(
        '{"id": "w-0", "source": {"url": "https://files.example.com/a.csv"}, '
        '"destination": {"type": "inconvo", "userIdentifier": "u"}}'
    )
    env = courier_env(COURIER_QUEUE=names.queue, COURIER_EVENTS_EXCHANGE=names.events_exchange)
    code, out, err = await courier("submit", "--wait", "--timeout", "0.5", str(request), env=env)
    assert code == EXIT_TIMEOUT and out == b""
    lines = err.decode().strip().splitlines()
    assert lines[0] == f"courier: submitted w-0 to {names.queue}; waiting for its events"
    assert lines[1].startswith("courier: no final event for w-0 within 0.5s")
    assert await _depth(amqp, names.queue) == 1


def _doctor_env(**extra: str) -> dict[str, str]:
    env = courier_env(AWS_EC2_METADATA_DISABLED="true")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MINDSET_API_KEY"):
        env.pop(name, None)
    return env | extra


async def test_doctor_fails_when_no_destination_has_a_key() -> None:
    """No key for either destination: doctor fails (exit 1), naming the variables to set."""
    code, out, _ = await courier("doctor", "--json", env=_doctor_env())
    assert code == EXIT_FAILED
    failures = [c for c in orjson.loads(out)["checks"] if c["verdict"] == "fail"]
    [missing] = [c for c in failures if "no destination has an API key" in c["detail"]]
    assert (
        "COURIER_INCONVO_API_KEY" in missing["fix"] and "COURIER_MINDSET_API_KEY" in missing["fix"]
    )


async def test_mindset_api_key_is_accepted_like_inconvo_api_key(
    mindset: FakeMindset, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MINDSET_API_KEY sets Mindset's key as INCONVO_API_KEY sets Inconvo's; doctor says so."""
    monkeypatch.delenv("COURIER_MINDSET_API_KEY", raising=False)
    monkeypatch.setenv("MINDSET_API_KEY", MINDSET_KEY)
    key = load_settings().mindset_api_key
    assert key is not None and key.get_secret_value() == MINDSET_KEY
    env = _doctor_env(MINDSET_API_KEY=MINDSET_KEY, COURIER_MINDSET_BASE_URL=mindset.base_url)
    _, out, _ = await courier("doctor", "--json", env=env)
    checks = orjson.loads(out)["checks"]
    assert not [c for c in checks if "no destination has an API key" in c["detail"]]
    [check] = [c for c in checks if c["area"] == "mindset"]
    assert check["verdict"] == "ok" and "key from MINDSET_API_KEY" in check["detail"]


async def test_run_warns_about_each_unconfigured_destination(names: Names) -> None:
    """`courier run` with only Inconvo's key warns at start-up that Mindset requests will fail."""
    env = courier_env(
        COURIER_QUEUE=names.queue,
        COURIER_EVENTS_EXCHANGE=names.events_exchange,
        COURIER_HTTP_PORT=str(free_port()),
        COURIER_INCONVO_API_KEY=INCONVO_KEY,
    )
    env.pop("MINDSET_API_KEY", None)
    courier_run = await CourierProcess(env).start()
    assert await courier_run.signal(signal.SIGTERM) == 0
    warnings = [
        record["message"]
        for record in map(orjson.loads, courier_run.stderr.decode().splitlines())
        if record["level"] == "WARNING" and "destination_not_configured" in record["message"]
    ]
    assert warnings == [
        "COURIER_MINDSET_API_KEY is not set: every Mindset request fails as "
        "destination_not_configured"
    ]
