"""Test bed pieces: a file server on loopback, an event collector, broker helpers."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import inspect
import json
import logging
import os
import re
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

import aio_pika
import aiohttp
import aiormq
import orjson
from aio_pika.abc import (
    AbstractConnection,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)
from aiohttp import web

from service.contracts import DEFAULT_TENANT
from service.topology import TENANT_INFIX
from testbed import zygote
from testbed.loopback import Loopback, serve
from testbed.producer import inconvo_request, publish, publish_many, publish_requests

__all__ = ["inconvo_request", "publish", "publish_many", "publish_requests"]

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
DEFAULT_DELAYS = (10, 60, 300, 1800)  # COURIER_RETRY_DELAYS' default, in seconds
ROOT = Path(__file__).resolve().parent.parent
# An unmasked presigned-URL signature (SigV4 signatures are 64 hex digits).
_SIGNATURE = re.compile(r"X-Amz-Signature=[0-9a-f]{64}")


class SecretLedger:
    """Everything Courier emitted during a test (logs, events, command output), to scan for secrets."""

    def __init__(self) -> None:
        self.secrets: tuple[str, ...] = ()
        self.texts: list[tuple[str, str]] = []
        self.enabled = False  # the test suite turns it on; benchmarks keep nothing
        self.invalid_events: list[str] = []  # events that break schemas/event.schema.json
        self._event_schema: Any = None

    def check_event(self, body: bytes) -> None:
        """Hold a published event against the checked-in event schema (tests only)."""
        if not self.enabled:
            return
        if self._event_schema is None:
            import jsonschema

            schema = orjson.loads((ROOT / "schemas" / "event.schema.json").read_bytes())
            self._event_schema = jsonschema.Draft202012Validator(schema)
        event = orjson.loads(body)
        self.invalid_events += [
            f"{event.get('id')}: {error.message}" for error in self._event_schema.iter_errors(event)
        ]

    def add(self, where: str, text: str | bytes) -> None:
        """Record ``text`` as seen in ``where``."""
        if not self.enabled:
            return
        self.texts.append(
            (where, text.decode("utf-8", "replace") if isinstance(text, bytes) else text)
        )

    def leaks(self) -> list[str]:
        """Where a configured secret or an unmasked presigned signature appeared."""
        found = []
        for where, text in self.texts:
            found += [f"{where}: {secret[:4]}..." for secret in self.secrets if secret in text]
            if _SIGNATURE.search(text):
                found.append(f"{where}: a presigned signature")
        return found


LEDGER = SecretLedger()


class LedgerHandler(logging.Handler):
    """Records every log record, fully formatted (tracebacks too), in the ledger."""

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith(("werkzeug", "moto")):
            return  # the S3 server's own access log: a test peer, not Courier
        LEDGER.add(f"log {record.name}", logging.Formatter().format(record) + repr(record.__dict__))


def json_documents(text: bytes) -> list[Any]:
    """The JSON documents printed one after another (as `courier submit --wait` does)."""
    decoder, body = json.JSONDecoder(), text.decode()
    found, at = [], 0
    while (at := len(body) - len(body[at:].lstrip())) < len(body):
        value, at = decoder.raw_decode(body, at)
        found.append(value)
    return found


def free_port() -> int:
    """A loopback port nobody listens on (right now).

    For a server of the caller's own that binds it at once. A child process should
    bind port 0 and report its port instead (``CourierProcess`` reads it from the
    log), and a port that must stay unanswered is :func:`closed_port`'s.
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def closed_port() -> Iterator[int]:
    """A loopback port that refuses connections for as long as the block runs.

    It is bound but never listened on, so a connection to it is refused and no other
    process can take it meanwhile (a port merely found free could be taken a moment
    later, and then answer).
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


class AppNode(Protocol):
    """A RabbitMQ node whose application can be stopped and started (testbed.rabbit)."""

    async def stop_app(self) -> None: ...

    async def start_app(self) -> None: ...


@contextlib.asynccontextmanager
async def app_stopped(node: AppNode, ready: Callable[[], Awaitable[bool]]) -> AsyncIterator[None]:
    """The node's RabbitMQ application stopped, the block entered once the service's
    ``ready`` has dropped; the application started again on leaving, whatever happened."""
    await node.stop_app()
    try:

        async def not_ready() -> bool:
            return not await ready()

        await wait_until(not_ready, 30, "readiness dropping")
        yield
    finally:
        await node.start_app()


async def wait_until(
    predicate: Callable[[], bool | Awaitable[bool]], timeout: float = 10.0, what: str = ""
) -> None:
    """Poll ``predicate`` (plain or async) until it holds; TimeoutError after ``timeout`` s.

    For a condition nothing signals (a log line, a metric, a queue's depth): the test
    waits for the evidence, however long the machine takes, never for a duration.
    """
    try:
        async with asyncio.timeout(timeout):
            while True:
                result = predicate()
                if await result if inspect.isawaitable(result) else result:
                    return
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise TimeoutError(f"not within {timeout}s: {what or predicate}") from None


class _HasMetrics(Protocol):
    @property
    def metrics(self) -> Any: ...


def in_flight(service: _HasMetrics) -> float:
    """The service's ``courier_inflight_requests``."""
    value = service.metrics.registry.get_sample_value("courier_inflight_requests")
    return float(value or 0.0)


async def quiesce(service: _HasMetrics, timeout: float = 20.0) -> None:
    """Wait until an in-process service has no request in flight.

    Call it once the events a test waits for have arrived: a request counts as in
    flight until everything Courier does for it after its event (the reply, the
    dead letter, the ack, the metrics) is done, so what those left is in place.
    """
    await wait_until(lambda: in_flight(service) == 0, timeout, "no request in flight")


async def queue_counts(connection: AbstractConnection, queue: str) -> tuple[int, int]:
    """(messages ready, consumers) of ``queue``, as the broker reports them now."""
    channel = await connection.channel()
    try:
        declared = await channel.declare_queue(queue, passive=True)
        result = declared.declaration_result
        return int(result.message_count or 0), int(result.consumer_count or 0)
    finally:
        await channel.close()


async def request_counts(
    connection: AbstractConnection, queue: str, tenants: Sequence[str] = (DEFAULT_TENANT,)
) -> tuple[int, int]:
    """(requests ready, consumers) over the request queue and ``tenants``' queues (a
    backlog moves there: docs/isolation.md); a tenant's queue not declared counts 0."""
    ready, consumers = await queue_counts(connection, queue)
    for tenant in tenants:
        try:
            more = await queue_counts(connection, f"{queue}{TENANT_INFIX}{tenant}")
        except aiormq.exceptions.ChannelNotFoundEntity:
            continue
        ready, consumers = ready + more[0], consumers + more[1]
    return ready, consumers


def courier_env(**extra: str) -> dict[str, str]:
    """A clean environment for a courier subprocess."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COURIER_", "INCONVO_"))}
    env.update({"COURIER_AMQP_URL": AMQP_URL, "COURIER_HTTP_HOST": "127.0.0.1"})
    env.update(extra)
    return env


CourierProc = asyncio.subprocess.Process | zygote.Forked


async def start_courier(
    *args: str, env: Mapping[str, str], stdin: bytes | None = None, fresh: bool = False
) -> CourierProc:
    """Start `python -m service ARGS` with piped stdout and stderr: forked from this
    test process's zygote (testbed/zygote.py), or, ``fresh``, a new interpreter."""
    if not fresh and zygote.enabled():
        return await zygote.spawn(args, env=env, cwd=ROOT, stdin=stdin)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "service",
        *args,
        env=dict(env),
        cwd=ROOT,
        stdin=asyncio.subprocess.PIPE if stdin else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    if stdin:
        assert proc.stdin is not None
        proc.stdin.write(stdin)
        proc.stdin.close()
    return proc


async def courier(
    *args: str,
    env: Mapping[str, str],
    stdin: bytes | None = None,
    timeout: float = 30,
    fresh: bool = False,
) -> tuple[int, bytes, bytes]:
    """Run `python -m service ARGS` to completion (``fresh``: in a new interpreter)."""
    proc = await start_courier(*args, env=env, stdin=stdin, fresh=fresh)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()  # a command that hangs must not outlive the test
        await proc.wait()
        raise
    assert proc.returncode is not None
    LEDGER.add(f"courier {args[0]} output", out + err)
    return proc.returncode, out, err


async def wait_status(url: str, status: int, timeout: float = 20) -> None:
    """Poll ``url`` until it answers ``status``."""
    async with aiohttp.ClientSession() as session, asyncio.timeout(timeout):
        while True:
            try:
                async with session.get(url) as response:
                    if response.status == status:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)


# `courier run` names the port it serves on (it binds the one configured, 0: any).
_HTTP_PORT_LINE = re.compile(rb"HTTP endpoints on port (\d+)")


def metric_sum(exposition: str, name: str) -> float:
    """The sum of sample ``name``'s values on a /metrics page (0 when absent)."""
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in exposition.splitlines()
        if line.startswith(name) and line[len(name) : len(name) + 1] in (" ", "{")
    )


class CourierProcess:
    """`courier run` as a subprocess, as a user runs it; its output is kept as it comes.

    With ``COURIER_HTTP_PORT=0`` (``process_env``'s default) it binds a port of the
    kernel's choosing and logs it; :attr:`port` is read from that line, so no port
    is picked here and bound there seconds later.
    """

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = dict(env)
        self.port = int(self.env.get("COURIER_HTTP_PORT", "0"))
        self.proc: CourierProc | None = None
        self._out = bytearray()
        self._err = bytearray()
        self._changed = asyncio.Condition()

    @property
    def stdout(self) -> bytes:
        """Everything it wrote to stdout so far."""
        return bytes(self._out)

    @property
    def stderr(self) -> bytes:
        """Everything it wrote to stderr (its log) so far."""
        return bytes(self._err)

    async def start(self, wait_ready: bool = True) -> CourierProcess:
        """Start it, learn its HTTP port and (by default) wait until /readyz answers 200."""
        self.proc = await start_courier("run", env=self.env)
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._reader = asyncio.gather(
            self._read(self.proc.stdout, self._out), self._read(self.proc.stderr, self._err)
        )
        if self.port == 0:
            await self.wait_output(_HTTP_PORT_LINE, timeout=30)
            found = _HTTP_PORT_LINE.search(self._err + self._out)
            assert found is not None
            self.port = int(found.group(1))
        if wait_ready:
            await wait_status(f"http://127.0.0.1:{self.port}/readyz", 200)
        return self

    async def _read(self, stream: asyncio.StreamReader, into: bytearray) -> None:
        while line := await stream.readline():
            async with self._changed:
                into += line
                self._changed.notify_all()
        async with self._changed:  # the end of output: waiters learn the process is gone
            self._changed.notify_all()

    def count(self, pattern: bytes | re.Pattern[bytes]) -> int:
        """How often ``pattern`` occurs in its output so far."""
        text = self._err + self._out
        if isinstance(pattern, bytes):
            return text.count(pattern)
        return len(pattern.findall(text))

    async def wait_output(
        self, pattern: bytes | re.Pattern[bytes], count: int = 1, timeout: float = 20.0
    ) -> None:
        """Wait until ``pattern`` occurred ``count`` times in its output (a log line)."""
        assert self.proc is not None

        def seen() -> bool:
            if self.count(pattern) >= count:
                return True
            if self._reader.done():
                raise AssertionError(
                    f"`courier run` exited ({self.proc and self.proc.returncode}) before "
                    f"{pattern!r} x{count}:\n{self.stderr.decode(errors='replace')[-3000:]}"
                )
            return False

        try:
            async with asyncio.timeout(timeout), self._changed:
                await self._changed.wait_for(seen)
        except TimeoutError:
            raise TimeoutError(
                f"{pattern!r} x{count} not in `courier run`'s output within {timeout}s "
                f"(seen {self.count(pattern)})"
            ) from None

    async def metric(self, name: str) -> float:
        """The sum of metric ``name``'s samples on its /metrics (0 when absent)."""
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{self.port}/metrics") as answer,
        ):
            return metric_sum(await answer.text(), name)

    def records(self) -> list[dict[str, Any]]:
        """Its log lines (JSON, `courier run`'s default format), parsed; other lines skipped."""
        found = []
        for line in self.stderr.splitlines():
            with contextlib.suppress(orjson.JSONDecodeError):
                record = orjson.loads(line)
                if isinstance(record, dict):
                    found.append(record)
        return found

    def logged_seconds(self, first: str, last: str) -> float | None:
        """Seconds from its first log line containing ``first`` to its last containing
        ``last``, by the lines' own time stamps: how long the process itself took,
        whatever the test process was doing meanwhile."""
        stamps = [
            (r["message"], datetime.strptime(r["time"], "%Y-%m-%d %H:%M:%S,%f"))
            for r in self.records()
            if "message" in r and "time" in r
        ]
        starts = [t for m, t in stamps if first in m]
        ends = [t for m, t in stamps if last in m]
        if not starts or not ends:
            return None
        return (ends[-1] - starts[0]).total_seconds()

    async def signal(self, sig: int, timeout: float = 60) -> int:
        """Send ``sig`` and wait for the exit status."""
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
        code = await asyncio.wait_for(self.proc.wait(), timeout)
        await self._reader
        LEDGER.add("courier run output", self.stdout + self.stderr)
        return code


@dataclass
class Served:
    """A file the file server answers with."""

    body: bytes = b""
    content_type: str | None = "text/csv"
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    chunked: bool = False  # stream without Content-Length
    gzip: bool = False  # send gzip-encoded with Content-Encoding
    redirect: str | None = None
    stream_bytes: int = 0  # stream this many zero bytes instead of body
    delay: float = 0.0
    trickle: float = 0.0  # send the body one byte every `trickle` seconds
    _gzipped: bytes | None = None

    def encoded(self) -> bytes:
        """The body as sent: gzip-compressed once when ``gzip`` is set."""
        if not self.gzip:
            return self.body
        if self._gzipped is None:
            self._gzipped = gzip.compress(self.body, compresslevel=6)
        return self._gzipped


class FileServer:
    """An aiohttp server on 127.0.0.1 answering from ``files``; counts every hit.

    ``trickling`` is how many trickled bodies are being sent right now; they end
    when the client goes, or, unfinished, at :meth:`stop_trickles` / :meth:`close`.
    """

    def __init__(self) -> None:
        self.files: dict[str, Served] = {}
        self.hits: list[str] = []
        self.hit_headers: list[dict[str, str]] = []
        self._runner: Loopback | None = None
        self.port = 0
        self.trickling = 0
        self._stop_trickles = asyncio.Event()

    def url(self, path: str) -> str:
        """The URL of ``path`` on this server."""
        return f"http://127.0.0.1:{self.port}/{path.lstrip('/')}"

    def add(self, path: str, body: bytes = b"", **kwargs: Any) -> str:
        """Serve ``body`` at ``path``; returns its URL."""
        key = unquote(urlsplit("/" + path.lstrip("/")).path)
        self.files[key] = Served(body=body, **kwargs)
        return self.url(path)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.hits.append(request.path)
        self.hit_headers.append(dict(request.headers))
        served = self.files.get(request.path)
        if served is None:
            return web.Response(status=404, text="not found")
        if served.delay:
            await asyncio.sleep(served.delay)
        if served.redirect is not None:
            raise web.HTTPFound(served.redirect)
        headers = dict(served.headers)
        if served.content_type:
            headers["Content-Type"] = served.content_type
        if served.status != 200:  # an error, or a status that carries no file (204, 3xx, ...)
            return web.Response(status=served.status, body=served.body, headers=headers)
        body = served.encoded()
        if served.gzip:
            headers["Content-Encoding"] = "gzip"
        if served.trickle:
            return await self._trickle(request, served, headers, body)
        if not (served.chunked or served.stream_bytes):
            return web.Response(body=body, headers=headers)
        response = web.StreamResponse(headers=headers)
        response.enable_chunked_encoding()
        await response.prepare(request)
        if served.stream_bytes:
            chunk = b"0" * 65536
            sent = 0
            try:
                while sent < served.stream_bytes:
                    await response.write(chunk)
                    sent += len(chunk)
            except (ConnectionResetError, RuntimeError):
                return response
        else:
            for start in range(0, len(body), 65536):
                await response.write(body[start : start + 65536])
        await response.write_eof()
        return response

    async def _trickle(
        self, request: web.Request, served: Served, headers: dict[str, str], body: bytes
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers=headers)
        if served.chunked:
            response.enable_chunked_encoding()
        else:
            response.content_length = len(body)
        await response.prepare(request)
        self.trickling += 1
        try:
            for index in range(len(body)):
                await response.write(body[index : index + 1])
                if await self._stopped_within(served.trickle):
                    if request.transport is not None:
                        request.transport.close()  # the body stays unfinished
                    return response
            await response.write_eof()
        except (ConnectionResetError, RuntimeError):
            pass  # the client went away
        finally:
            self.trickling -= 1
        return response

    async def _stopped_within(self, seconds: float) -> bool:
        try:
            async with asyncio.timeout(seconds):
                await self._stop_trickles.wait()
        except TimeoutError:
            return False
        return True

    def stop_trickles(self) -> None:
        """End every trickled body now (the connections are dropped unfinished)."""
        self._stop_trickles.set()

    async def start(self) -> FileServer:
        """Bind a free loopback port."""
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = await serve(app)
        self.port = self._runner.port
        return self

    async def close(self) -> None:
        """Stop serving (trickled bodies are cut off first)."""
        self.stop_trickles()
        if self._runner is not None:
            await self._runner.close()


# A test's names start with "t-" and the hour they were made (UTC, hex seconds);
# the session check removes queues of this form older than this, left by a killed run.
TEST_PREFIX = "t-"
STALE_AFTER = 3 * 3600.0
_STAMPED = re.compile(r"t-([0-9a-f]{8})-[0-9a-f]{6}\.")


@dataclass
class Names:
    """Per-test queue and exchange names, so tests never share state."""

    queue: str
    events_exchange: str
    # The tenants whose queues a test may have made (docs/isolation.md), to remove after.
    tenants: set[str] = field(default_factory=lambda: {DEFAULT_TENANT})

    @classmethod
    def fresh(cls) -> Names:
        """New unique names, stamped with the time they were made."""
        tag = f"{TEST_PREFIX}{int(time.time()):08x}-{uuid.uuid4().hex[:6]}"
        return cls(queue=f"{tag}.uploads", events_exchange=f"{tag}.events")

    @property
    def dead_queue(self) -> str:
        """The dead-letter queue."""
        return f"{self.queue}.dead"


def stale_test_queue(name: str, now: float | None = None) -> bool:
    """Whether ``name`` is a test's queue made more than :data:`STALE_AFTER` ago.

    Queues of other checkouts' runs (unstamped names) are never judged stale: a
    run of theirs may be using them right now on the same broker.
    """
    found = _STAMPED.match(name)
    if found is None:
        return False
    made = int(found.group(1), 16)
    return (time.time() if now is None else now) - made > STALE_AFTER


# The terminal events of requests: what most tests and the benchmark count.
TERMINAL_KEYS = ("upload.*", "delete.*")


class EventCollector:
    """Binds a private queue to the events exchange and gathers events by request id.

    By default it binds the terminal events (``TERMINAL_KEYS``); ``keys=("#",)`` takes
    the ingestion events too.
    """

    def __init__(
        self,
        connection: AbstractRobustConnection,
        exchange: str,
        *,
        durable: bool = False,
        keys: tuple[str, ...] = TERMINAL_KEYS,
    ) -> None:
        self._connection = connection
        self._exchange = exchange
        self._keys = keys
        # A durable queue survives a broker restart, so no event is missed meanwhile.
        self._durable = durable
        self.events: list[dict[str, Any]] = []
        self.messages: list[AbstractIncomingMessage] = []
        self.arrivals: list[float] = []
        self._ids: set[str | None] = set()
        self._changed = asyncio.Condition()

    async def start(self) -> EventCollector:
        """Declare the exchange and bind an exclusive queue to the collector's keys."""
        channel = await self._connection.channel()
        exchange = await channel.declare_exchange(
            self._exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )
        if self._durable:
            # A quorum queue: a classic one lost events delivered just as the node stopped.
            queue = await channel.declare_queue(
                f"{self._exchange}.collector", durable=True, arguments={"x-queue-type": "quorum"}
            )
        else:
            queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        for key in self._keys:
            await queue.bind(exchange, routing_key=key)
        # A durable collector acks what it has recorded: an event delivered just as the
        # broker goes away is delivered again, and counted once (by its event id).
        await queue.consume(self._on_message, no_ack=not self._durable)
        return self

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        first = message.message_id not in self._ids
        self._ids.add(message.message_id)
        if first or not self._durable:
            if LEDGER.enabled:  # the headers' repr is not free: benchmarks skip it
                LEDGER.add("event", message.body + repr(message.headers).encode())
                LEDGER.check_event(message.body)
            async with self._changed:
                self.messages.append(message)
                self.events.append(orjson.loads(message.body))
                self.arrivals.append(time.monotonic())
                self._changed.notify_all()
        if self._durable:
            # Acked once recorded: an event delivered just as the broker goes away is
            # delivered again, and counted once (by its event id).
            with contextlib.suppress(aio_pika.exceptions.AMQPError, RuntimeError):
                await message.ack()

    async def wait_for(self, count: int, timeout: float = 20.0) -> list[dict[str, Any]]:
        """Wait until at least ``count`` events arrived; returns them all."""
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: len(self.events) >= count)
        return list(self.events)

    async def wait_for_ids(self, ids: set[str], timeout: float = 60.0) -> None:
        """Wait until every request id in ``ids`` has at least one event."""
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: ids <= self.request_ids())

    async def wait_for_event(self, request_id: str, event_type: str, timeout: float = 60.0) -> None:
        """Wait until the request has an event of ``event_type``."""

        def seen() -> bool:
            return any(
                e.get("type") == event_type and (e.get("data") or {}).get("requestId") == request_id
                for e in self.events
            )

        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(seen)

    async def for_correlation(
        self, correlation_id: str, timeout: float = 20.0
    ) -> list[dict[str, Any]]:
        """Wait for the events whose AMQP ``correlation_id`` is ``correlation_id``; returns them."""

        def found() -> list[dict[str, Any]]:
            return [
                event
                for event, message in zip(self.events, self.messages, strict=True)
                if message.correlation_id == correlation_id
            ]

        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(found)
        return found()

    def request_ids(self) -> set[str]:
        """The request ids seen so far."""
        return {e["data"]["requestId"] for e in self.events}

    def by_request(self, request_id: str) -> list[dict[str, Any]]:
        """The events for one request id."""
        return [e for e in self.events if e["data"]["requestId"] == request_id]


async def next_message(queue: AbstractQueue, timeout: float = 5.0) -> AbstractIncomingMessage:
    """The next message of ``queue``, waiting for it (``queue.get`` only looks once).

    For what Courier publishes after a result event (the reply, the dead letter):
    the event may arrive first.
    """
    async with asyncio.timeout(timeout):
        while (message := await queue.get(fail=False)) is None:
            await asyncio.sleep(0.02)
    return message


async def drain(
    connection: AbstractRobustConnection, queue: str, limit: int = 1000
) -> AsyncIterator[AbstractIncomingMessage]:
    """Take (and ack) every message waiting in ``queue``."""
    channel = await connection.channel()
    try:
        q = await channel.declare_queue(queue, passive=True)
        for _ in range(limit):
            message = await q.get(no_ack=True, fail=False, timeout=5)
            if message is None:
                return
            yield message
    finally:
        await channel.close()


async def delete_topology(names: Names, delays: tuple[int, ...], url: str = AMQP_URL) -> None:
    """Remove a test's queues and exchange."""
    # A connection of its own: the test's may still be reconnecting after a broker restart.
    async with await aio_pika.connect(url) as own:
        await _delete(own, names, delays)


async def _delete(connection: AbstractConnection, names: Names, delays: tuple[int, ...]) -> None:
    channel = await connection.channel()
    queues = (
        names.queue,
        names.dead_queue,
        f"{names.events_exchange}.collector",
        # The default tiers too: `courier run` subprocesses may use them.
        *(f"{names.queue}.retry.{d}s" for d in {*delays, *DEFAULT_DELAYS}),
        *(f"{names.queue}{TENANT_INFIX}{tenant}" for tenant in names.tenants),
    )
    for queue in queues:
        try:
            await channel.queue_delete(queue)
        except aio_pika.exceptions.AMQPError:
            channel = await connection.channel()
    with contextlib.suppress(aio_pika.exceptions.AMQPError):
        await channel.exchange_delete(names.events_exchange)
    await channel.close()
