"""The command line, run as a user would: subprocesses of `python -m service`."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest
from aio_pika.abc import AbstractRobustConnection

from service.amqp.declare import declare_queue
from service.config import Settings
from service.topology import Topology
from testbed.fakes import FakeInconvo, FakeMindset
from testbed.stage import Stage
from testbed.support import (
    CourierProcess,
    FileServer,
    Names,
    closed_port,
    courier,
    courier_env,
    drain,
    inconvo_request,
    publish,
    wait_status,
)
from tests.conftest import INCONVO_KEY, MINDSET_KEY


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("COURIER_CONCURRENCY", "many"),
        ("COURIER_CONCURRENCY", "0"),
        ("COURIER_RETRY_DELAYS", "10s,1x"),
        ("COURIER_PRESIGN_TTL", "30d"),
        ("COURIER_SOURCE_ALLOW_PRIVATE", "perhaps"),
        ("COURIER_LOG_FORMAT", "xml"),
        ("COURIER_INCONVO_BASE_URL", "ftp://x"),
        ("COURIER_SOURCE_ALLOWED_HOSTS", "host:notaport"),
    ],
)
async def test_bad_configuration_exits_2_naming_the_variable(variable: str, value: str) -> None:
    """A bad value stops `courier run` with status 2 and one line naming the variable."""
    code, _, err = await courier("run", env=courier_env(**{variable: value}))
    assert code == 2
    lines = err.decode().strip().splitlines()
    assert len(lines) == 1
    assert variable in lines[0]


async def test_file_variants_and_fallbacks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """_FILE variables are read (trimmed) and INCONVO_* is the fallback for COURIER_INCONVO_*."""
    from service.config import load_settings

    secret = tmp_path / "key"
    secret.write_text("  from-a-file\n")
    for key in list(os.environ):
        if key.startswith(("COURIER_", "INCONVO_")):
            monkeypatch.delenv(key)
    monkeypatch.setenv("COURIER_MINDSET_API_KEY_FILE", str(secret))
    monkeypatch.setenv("INCONVO_API_KEY", "fallback-key")
    monkeypatch.setenv("INCONVO_BASE_URL", "http://inconvo.internal/api/v1/")
    monkeypatch.setenv("COURIER_RETRY_DELAYS", "5s,2m,1h")
    monkeypatch.setenv("COURIER_S3_ALLOWED_BUCKETS", "a, b")
    settings = load_settings()
    assert settings.mindset_api_key is not None
    assert settings.mindset_api_key.get_secret_value() == "from-a-file"
    assert settings.inconvo_api_key is not None
    assert settings.inconvo_api_key.get_secret_value() == "fallback-key"
    assert settings.inconvo_base_url == "http://inconvo.internal/api/v1"
    assert settings.retry_delays == (5, 120, 3600)
    assert settings.s3_allowed_buckets == ("a", "b")
    assert settings.presign_ttl == 12 * 3600
    assert settings.concurrency == 32
    assert Topology.from_settings(settings).tier(120).name == "courier.uploads.retry.120s"
    monkeypatch.setenv("COURIER_INCONVO_API_KEY", "primary")
    assert load_settings().inconvo_api_key.get_secret_value() == "primary"  # type: ignore[union-attr]


async def test_schema_command_prints_both_schemas() -> None:
    """`courier schema` prints the request and event schemas as JSON on stdout."""
    code, out, _ = await courier("schema", env=courier_env())
    assert code == 0
    schemas = orjson.loads(out)
    assert set(schemas) == {"request", "event"}
    assert "destination" in schemas["request"]["$defs"]["UploadRequest"]["properties"]


async def test_process_runs_one_request_locally(files: FileServer, inconvo: FakeInconvo) -> None:
    """`courier process -` prints the event and exits 0 on success, 1 on failure."""
    env = courier_env(
        COURIER_INCONVO_API_KEY=INCONVO_KEY,
        COURIER_INCONVO_BASE_URL=inconvo.base_url,
        COURIER_SOURCE_ALLOWED_HOSTS=f"127.0.0.1:{files.port}",
    )
    request = inconvo_request(files.add("/a.csv", b"x,y\n"), "local-1")
    code, out, _ = await courier("process", "-", env=env, stdin=orjson.dumps(request))
    assert code == 0
    event = orjson.loads(out)
    assert event["data"]["status"] == "succeeded" and event["subject"] == "local-1"
    assert len(inconvo.uploads) == 1
    request["source"] = {"url": files.add("/b.pdf", b"%PDF")}
    code, out, _ = await courier("process", "-", env=env, stdin=orjson.dumps(request))
    assert code == 1
    assert orjson.loads(out)["data"]["error"]["code"] == "unsupported_type"


async def test_process_prints_the_event_of_an_invalid_request() -> None:
    """An invalid request read by `courier process` gets the invalid_request event `courier run`
    would publish, on stdout, and exit 1; never only a line on stderr."""
    body = b'{"id": "bad-1", "source": {"url": "https://x.example/a.csv"}, "destination": {"type": "inconvo"}}'
    code, out, _ = await courier("process", "-", env=courier_env(), stdin=body)
    assert code == 1
    event = orjson.loads(out)
    assert event["type"] == "courier.upload.failed" and event["subject"] == "bad-1"
    assert event["data"]["error"]["code"] == "invalid_request"
    assert event["data"]["destination"] == "inconvo"


async def test_process_prints_a_delete_event_for_an_invalid_delete() -> None:
    """An invalid delete gets courier.delete.failed (operation delete), not an upload's event."""
    body = (
        b'{"id": "bad-del", "operation": "delete", "destination": {"type": "inconvo",'
        b' "userIdentifier": "u1", "fileName": "a.csv", "notes": "n"}}'
    )
    code, out, _ = await courier("process", "-", env=courier_env(), stdin=body)
    assert code == 1
    event = orjson.loads(out)
    assert event["type"] == "courier.delete.failed" and event["subject"] == "bad-del"
    assert event["data"]["operation"] == "delete"
    assert event["data"]["error"]["code"] == "invalid_request"


async def test_process_runs_a_delete(inconvo: FakeInconvo) -> None:
    """`courier process` takes a delete too: a file that is not there is existed: false."""
    env = courier_env(
        COURIER_INCONVO_API_KEY=INCONVO_KEY, COURIER_INCONVO_BASE_URL=inconvo.base_url
    )
    body = {
        "id": "del-1",
        "operation": "delete",
        "destination": {"type": "inconvo", "userIdentifier": "u1", "fileName": "gone.csv"},
    }
    code, out, _ = await courier("process", "-", env=env, stdin=orjson.dumps(body))
    assert code == 0
    event = orjson.loads(out)
    assert event["type"] == "courier.delete.succeeded"
    assert event["data"]["existed"] is False and event["data"]["operation"] == "delete"


async def test_process_reports_a_held_request_as_failed(
    files: FileServer, mindset: FakeMindset
) -> None:
    """With no broker to hold it in, a request the rate limit would hold ends in its
    failed event (destination_unavailable, retryable), never a succeeded one without a
    result: here a Mindset delete whose second call (the DELETE after the lookup) would
    wait 100 s for its turn at 0.01 requests/s."""
    env = courier_env(
        COURIER_MINDSET_API_KEY=MINDSET_KEY,
        COURIER_MINDSET_BASE_URL=mindset.base_url,
        COURIER_SOURCE_ALLOWED_HOSTS=f"127.0.0.1:{files.port}",
    )
    where = {"type": "mindset", "appUid": "app", "contextUid": "ctx"}
    upload = {"id": "held-1", "source": {"url": files.add("/a.pdf", b"%PDF-1.4")}}
    code, _, err = await courier(
        "process", "-", env=env, stdin=orjson.dumps(upload | {"destination": where})
    )
    assert code == 0, err.decode()
    delete = {
        "id": "held-del",
        "operation": "delete",
        "destination": where | {"externalId": "courier:held-1"},
    }
    held = env | {"COURIER_MINDSET_RATE_LIMIT": "0.01"}
    code, out, _ = await courier("process", "-", env=held, stdin=orjson.dumps(delete))
    assert code == 1
    event = orjson.loads(out)
    assert event["type"] == "courier.delete.failed"
    assert event["data"]["error"]["code"] == "destination_unavailable"
    assert event["data"]["error"]["retryable"] is True
    assert len(mindset.files) == 1, "nothing was deleted"


async def test_process_masks_secrets_in_the_printed_event(
    files: FileServer, inconvo: FakeInconvo
) -> None:
    """An API that echoes the key in its error: `courier process` prints the event masked, as `courier run` logs it."""
    env = courier_env(
        COURIER_INCONVO_API_KEY=INCONVO_KEY,
        COURIER_INCONVO_BASE_URL=inconvo.base_url,
        COURIER_SOURCE_ALLOWED_HOSTS=f"127.0.0.1:{files.port}",
    )
    inconvo.fail_next(400, body={"error": f"key {INCONVO_KEY} may not write to this scope"})
    request = inconvo_request(files.add("/a.csv", b"x,y\n"), "local-2")
    code, out, _ = await courier("process", "-", env=env, stdin=orjson.dumps(request))
    assert code == 1
    error = orjson.loads(out)["data"]["error"]
    assert error["code"] == "destination_rejected"
    assert error["message"] == "Inconvo answered HTTP 400: key *** may not write to this scope"
    assert INCONVO_KEY not in out.decode()


async def test_run_serves_readiness_and_stops_on_sigterm(stage: Stage) -> None:
    """`courier run` consumes, answers /readyz 200, logs JSON lines, and exits 0 on SIGTERM."""
    # It binds port 0 and logs the port it got: CourierProcess reads it from there.
    courier_run = stage.process(COURIER_CONCURENCY="4")  # a typo: warned about, not ignored
    await courier_run.start()
    try:
        await wait_status(f"http://127.0.0.1:{courier_run.port}/healthz", 200)
        request = inconvo_request(stage.files.add("/a.csv", b"1\n"), "sub-1")
        await stage.publish(request)
        [event] = await stage.collector.wait_for(1)
        assert event["data"]["status"] == "succeeded"
    finally:
        code = await courier_run.signal(signal.SIGTERM, timeout=30)
    assert code == 0
    assert courier_run.stdout == b""
    err = courier_run.stderr.decode()
    records = [orjson.loads(line) for line in err.strip().splitlines()]
    assert any(r.get("requestId") == "sub-1" for r in records)
    assert INCONVO_KEY not in err
    [typo] = [r for r in records if "COURIER_CONCURENCY" in r["message"]]
    assert typo["level"] == "WARNING"
    assert typo["message"] == (
        "COURIER_CONCURENCY is not a Courier variable and is ignored "
        "(did you mean COURIER_CONCURRENCY?)"
    )


async def test_unreachable_broker_is_reported_and_retried(
    make_settings: Callable[..., Settings],
) -> None:
    """With no broker, `courier run` says which URL and how to start one, and goes on trying; /readyz stays 503."""
    with closed_port() as amqp_port:  # refuses connections; nobody can take it meanwhile
        env = courier_env(
            COURIER_AMQP_URL=f"amqp://guest:hunter2@127.0.0.1:{amqp_port}/",
            COURIER_HTTP_PORT="0",
            COURIER_LOG_FORMAT="console",
        )
        courier_run = await CourierProcess(env).start(wait_ready=False)
        readyz = f"http://127.0.0.1:{courier_run.port}/readyz"
        try:
            await wait_status(readyz, 503)
            # Both links tried twice each: it retried, and was never ready meanwhile.
            await courier_run.wait_output(b"cannot reach RabbitMQ", count=4, timeout=60)
            await wait_status(readyz, 503)
        finally:
            code = await courier_run.signal(signal.SIGTERM, timeout=30)
    assert code == 0
    text = courier_run.stderr.decode()
    assert f"cannot reach RabbitMQ at amqp://127.0.0.1:{amqp_port}/" in text
    assert "rabbitmq-server -detached" in text
    assert text.count("cannot reach RabbitMQ") >= 2
    assert "hunter2" not in text


@pytest.mark.timeout(180)  # seven `courier` processes: 15 s alone, 52 s under the flake load
async def test_submit_and_dead_commands(
    amqp: AbstractRobustConnection, names: Names, tmp_path: Path
) -> None:
    """`courier submit` validates and publishes; `courier dead list/replay` show and move dead letters."""
    env = courier_env(COURIER_QUEUE=names.queue)
    # The queue as `courier run` declares it: submit itself only looks it up (passively).
    channel = await amqp.channel()
    await declare_queue(channel, Topology.from_settings(Settings(queue=names.queue)).requests)
    await channel.close()
    bad = tmp_path / "bad.json"
    bad.write_text('{"source": {}}')
    code, _, err = await courier("submit", str(bad), env=env)
    assert code == 1 and b"invalid_request" in err
    good = tmp_path / "good.json"
    good.write_text(
        '{"id": "sub-2", "source": {"url": "https://x.example/a.csv"}, '
        '"destination": {"type": "inconvo", "userIdentifier": "u"}}'
    )
    code, out, _ = await courier("submit", str(good), env=env)
    assert code == 0 and orjson.loads(out)["submitted"] == "sub-2"
    [message] = [m async for m in drain(amqp, names.queue)]
    assert message.message_id == "sub-2" and message.body == good.read_bytes()
    # A queue declared by a service with another delivery limit is used as it is.
    other = {**env, "COURIER_MAX_REDELIVERIES": "9"}
    code, out, err = await courier("submit", str(good), env=other)
    assert code == 0, err.decode()
    assert [m.message_id async for m in drain(amqp, names.queue)] == ["sub-2"]

    # Put a dead letter in place as the service would, then list and replay it.
    channel = await amqp.channel()
    await channel.declare_queue(names.dead_queue, durable=True)
    await channel.close()
    await publish(
        amqp,
        names.dead_queue,
        good.read_bytes(),
        message_id="sub-2",
        headers={
            "x-courier-error-code": "destination_unavailable",
            "x-courier-attempts": 5,
            "x-courier-attempt": 5,
            "x-courier-error-message": "down",
            "x-courier-failed-at": "2026-11-24T00:00:00.000+00:00",
        },
    )
    code, out, _ = await courier("dead", "list", "--json", env=env)
    assert code == 0
    [listed] = orjson.loads(out)["letters"]
    assert listed["messageId"] == "sub-2" and listed["errorCode"] == "destination_unavailable"
    code, out, _ = await courier("dead", "list", env=env)
    assert out.decode().splitlines()[1].startswith("sub-2 "), (
        "list must leave dead letters in place"
    )
    code, out, _ = await courier("dead", "replay", "--limit", "10", "--json", env=env)
    assert code == 0 and orjson.loads(out)["replayed"] == 1
    [replayed] = [m async for m in drain(amqp, names.queue)]
    assert replayed.message_id == "sub-2" and replayed.body == good.read_bytes()
    assert not any(k.startswith("x-courier") for k in (replayed.headers or {}))
    assert [m async for m in drain(amqp, names.dead_queue)] == []


@pytest.mark.parametrize(
    ("environ", "applied"), [({}, "True"), ({"MALLOC_ARENA_MAX": "4"}, "False")]
)
async def test_malloc_arena_cap_yields_to_the_operator(
    environ: dict[str, str], applied: str
) -> None:
    """`courier run` caps glibc's malloc arenas, unless the operator set MALLOC_ARENA_MAX."""
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"} | environ
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "from service.runtime import limit_malloc_arenas; print(limit_malloc_arenas())",
        env=env,
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await proc.communicate()
    assert out.decode().strip() == applied
