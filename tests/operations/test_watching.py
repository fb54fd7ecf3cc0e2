"""What comes back: `courier submit --wait`, `courier events`, and events nobody listens for."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest
from aio_pika.abc import AbstractRobustConnection

from service.runtime import Service
from testbed.fakes import FakeInconvo
from testbed.support import (
    LEDGER,
    CourierProc,
    FileServer,
    Names,
    courier,
    courier_env,
    inconvo_request,
    json_documents,
    start_courier,
)
from testbed.support import publish as publish_request


def _env(names: Names) -> dict[str, str]:
    return courier_env(COURIER_QUEUE=names.queue, COURIER_EVENTS_EXCHANGE=names.events_exchange)


async def test_submit_wait_prints_the_event_and_exits_by_it(
    service: Service, names: Names, files: FileServer, tmp_path: Path
) -> None:
    """`submit --wait`: the request's event on stdout; exit 0 when it succeeded, 1 when it failed."""
    good = tmp_path / "good.json"
    good.write_bytes(orjson.dumps(inconvo_request(files.add("/a.csv", b"x,y\n"), "wait-ok")))
    code, out, err = await courier("submit", "--wait", str(good), env=_env(names))
    assert code == 0, err.decode()
    upload, ingestion = json_documents(out)
    assert upload["type"] == "courier.upload.succeeded" and upload["subject"] == "wait-ok"
    assert ingestion["type"] == "courier.ingestion.completed", "it waits for the file's state"
    assert f"submitted wait-ok to {names.queue}" in err.decode()

    bad = tmp_path / "bad.json"
    bad.write_bytes(orjson.dumps(inconvo_request(files.url("/missing.csv"), "wait-bad")))
    code, out, _ = await courier("submit", "--wait", str(bad), env=_env(names))
    assert code == 1
    [event] = json_documents(out)
    assert event["type"] == "courier.upload.failed"
    assert event["data"]["error"]["code"] == "source_not_found"


class Tail:
    """`courier events ARGS` as a subprocess; ready once it says it is watching."""

    def __init__(self, names: Names, *args: str) -> None:
        self._env = _env(names)
        self._args = args
        self.proc: CourierProc | None = None

    async def __aenter__(self) -> Tail:
        self.proc = await start_courier("events", *self._args, env=self._env)
        assert self.proc.stderr is not None
        first = await asyncio.wait_for(self.proc.stderr.readline(), 30)
        assert b"watching" in first, first
        return self

    async def output(self) -> list[str]:
        """Everything it printed, once it stopped by itself (--count)."""
        assert self.proc is not None
        out, err = await asyncio.wait_for(self.proc.communicate(), 30)
        LEDGER.add("courier events output", out + err)
        assert self.proc.returncode == 0, err.decode()
        return out.decode().splitlines()

    async def __aexit__(self, *_: object) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


async def test_events_tails_with_filters(
    service: Service, names: Names, files: FileServer, amqp: AbstractRobustConnection
) -> None:
    """`courier events` filters by routing key and request id; `--json` prints the events whole."""
    ok = inconvo_request(files.add("/a.csv", b"x,y\n"), "tail-ok")
    other = inconvo_request(files.add("/b.csv", b"x,y\n"), "tail-other")
    bad = inconvo_request(files.url("/missing.csv"), "tail-bad")
    async with (
        Tail(names, "--key", "upload.failed", "--count", "1", "--json") as failed,
        Tail(names, "--request-id", "tail-ok", "--count", "1") as one,
    ):
        for request in (other, ok, bad):
            await publish_request(amqp, names.queue, request)
        [failed_line] = await failed.output()
        [ok_line] = await one.output()
    event = orjson.loads(failed_line)
    assert event["subject"] == "tail-bad" and event["data"]["error"]["code"] == "source_not_found"
    assert "upload.succeeded" in ok_line and "tail-ok" in ok_line and "inconvo" in ok_line
    assert "tail-other" not in ok_line


class _Keep(logging.Handler):
    def __init__(self, records: list[logging.LogRecord]) -> None:
        super().__init__(logging.WARNING)
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
async def no_listener(
    make_settings: object, names: Names
) -> AsyncIterator[tuple[Service, list[logging.LogRecord]]]:
    """The service running with nothing bound to its events exchange; its publisher's warnings."""
    from tests.conftest import running

    records: list[logging.LogRecord] = []
    handler = _Keep(records)
    logger = logging.getLogger("service.amqp.publisher")
    logger.addHandler(handler)
    try:
        async with running(make_settings()) as svc:  # type: ignore[operator]
            yield svc, records
    finally:
        logger.removeHandler(handler)


def _sample(service: Service, name: str, **labels: str) -> float:
    value = service.metrics.registry.get_sample_value(name, labels)
    return value or 0.0


async def test_an_event_nobody_listens_for_is_counted_and_warned_once(
    no_listener: tuple[Service, list[logging.LogRecord]],
    names: Names,
    files: FileServer,
    inconvo: FakeInconvo,
    amqp: AbstractRobustConnection,
) -> None:
    """Events are published mandatory: unroutable ones are counted and warned about once a
    period, and the requests still succeed (nothing retried, nothing dead-lettered)."""
    service, records = no_listener
    for rid in ("lonely-1", "lonely-2"):
        await publish_request(
            amqp, names.queue, inconvo_request(files.add(f"/{rid}.csv", b"1\n"), rid)
        )

    def settled() -> bool:
        unroutable = _sample(
            service, "courier_events_unroutable_total", routing_key="upload.succeeded"
        )
        done = _sample(
            service, "courier_requests_total", destination="inconvo", outcome="succeeded"
        )
        return unroutable == 2 and done == 2

    async with asyncio.timeout(20):
        while not settled():
            await asyncio.sleep(0.05)
    assert len(inconvo.uploads) == 2
    warnings = [r.getMessage() for r in records if "no queue is bound" in r.getMessage()]
    # Each routing key once a period: the uploads' events, and the files' ingestion events.
    assert sorted(warnings) == [
        f"no queue is bound to exchange {names.events_exchange} for routing key {key}: "
        "the event was dropped by the broker (bind a queue, or watch with `courier events`)"
        for key in ("ingestion.completed", "upload.succeeded")
    ]
    exposition = service.metrics.exposition().decode()
    assert "process_cpu_seconds_total" in exposition and "python_info" in exposition
