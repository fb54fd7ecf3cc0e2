"""Shared fixtures: real RabbitMQ, a file server, fake APIs and the service in-process.

Before any test, the session checks the environment (:func:`pytest_sessionstart`): a
broken environment fails the whole session with a message starting
``infrastructure:``, never one test that happened to meet it.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aio_pika
import aiormq
import orjson
import pytest
import stamina
from aio_pika.abc import AbstractRobustConnection
from aiobotocore.session import get_session
from moto.server import ThreadedMotoServer

from service.config import Settings
from service.runtime import Service
from testbed import timing
from testbed.fakes import FakeInconvo, FakeMindset
from testbed.rabbit import RabbitNode, start_cluster
from testbed.stage import Stage, running
from testbed.support import (
    AMQP_URL,
    LEDGER,
    TEST_PREFIX,
    EventCollector,
    FileServer,
    LedgerHandler,
    Names,
    courier_env,
    delete_topology,
    stale_test_queue,
)

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

__all__ = ["running"]  # tests import it from here
pytest_plugins = ["testbed.schedule"]  # the longest test files start first

INCONVO_KEY = "test-inconvo-key-5f1e"
MINDSET_KEY = "test-mindset-key-9c3a"
AWS_KEY_ID = "AKIATESTCOURIER0001"
AWS_SECRET = "test-aws-secret-7d2b4e"
TEST_DELAYS = (1, 2)

# No service start in any test walks botocore's credential chain out to the cloud's
# instance metadata address (a second's timeout, or worse, an answer), whichever
# tests ran in this worker before: fake keys where no S3 test set real fake ones.
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
os.environ.setdefault("AWS_ACCESS_KEY_ID", AWS_KEY_ID)
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", AWS_SECRET)

# -- the environment, checked once per session -------------------------------------------

INFRASTRUCTURE_EXIT = 75  # sysexits' EX_TEMPFAIL: the machine, not the code; try again
BROKER_SERIES = "3.10."  # the suite relies on 3.10's counting of returns in x-delivery-count
MIN_FREE_BYTES = 1 << 30
RABBITMQ_DATA = Path("/var/lib/rabbitmq")


def pytest_sessionstart(session: pytest.Session) -> None:
    """Check the environment the suite needs before any test runs.

    The broker on 127.0.0.1:5672 answers, is RabbitMQ 3.10.x and has no resource
    alarm; the disks have room; queues that killed runs of this suite left behind
    are removed. Nothing of the node's configuration is changed. Under pytest-xdist
    the controller checks, once, for all its workers.
    """
    if hasattr(session.config, "workerinput"):
        return
    try:
        summary = asyncio.run(_check_environment())
    except _Infrastructure as problem:
        pytest.exit(f"infrastructure: {problem}", returncode=INFRASTRUCTURE_EXIT)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"environment: {summary}")


class _Infrastructure(Exception):
    """The machine cannot run the suite (a broker down or alarmed, a full disk)."""


async def _check_environment() -> str:
    host, port = "127.0.0.1", 5672
    try:
        with socket.create_connection((host, port), timeout=5):
            pass
    except OSError as exc:
        raise _Infrastructure(
            f"RabbitMQ does not answer on {host}:{port} ({exc.strerror or exc}); "
            "start it (`make broker`)"
        ) from None
    try:
        connection = await asyncio.wait_for(aiormq.connect(AMQP_URL), 15)
    except (aiormq.exceptions.AMQPError, OSError, TimeoutError) as exc:
        raise _Infrastructure(
            f"RabbitMQ on {host}:{port} refused an AMQP connection: {exc!r}"
        ) from None
    try:
        version = _text(connection.server_properties.get("version"))
        if not version.startswith(BROKER_SERIES):
            raise _Infrastructure(
                f"the broker on {host}:{port} is RabbitMQ {version}; the suite needs "
                f"{BROKER_SERIES}x (its quorum queues count returns in x-delivery-count)"
            )
        alarms = await _alarms()
        if alarms:
            raise _Infrastructure(f"RabbitMQ on {host}:{port} has resource alarms: {alarms}")
        await _publish_probe(connection)
        _check_disks()
        removed = await _remove_stale_test_queues(connection)
    finally:
        await connection.close()
    return f"RabbitMQ {version} on {host}:{port}, no alarm, disks have room" + (
        f"; removed {removed} stale test queues" if removed else ""
    )


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def _tool(*args: str) -> str:
    """The standard output of a RabbitMQ command-line tool."""
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise _Infrastructure(f"`{' '.join(args)}` did not answer within 60 s") from None
    return out.decode(errors="replace")


async def _alarms() -> list[object]:
    """The broker's resource alarms as ``rabbitmq-diagnostics`` reports them."""
    tool = shutil.which("rabbitmq-diagnostics")
    if tool is None:
        return []  # _publish_probe still finds an alarm: a blocked publish is never confirmed
    out = await _tool(tool, "-q", "alarms", "--formatter", "json")
    try:
        report = orjson.loads(out)
    except orjson.JSONDecodeError:
        raise _Infrastructure(f"`rabbitmq-diagnostics alarms` answered {out[-500:]!r}") from None
    return list(report.get("alarms", []))


async def _publish_probe(connection: aiormq.abc.AbstractConnection) -> None:
    """A confirmed publish to a queue of its own: a broker that blocks publishers (any
    alarm, seen or not by the tools) never confirms it."""
    channel = await connection.channel(publisher_confirms=True)
    try:
        declared = await channel.queue_declare("", exclusive=True, auto_delete=True)
        await asyncio.wait_for(
            channel.basic_publish(b"probe", routing_key=declared.queue or ""), 10
        )
    except TimeoutError:
        raise _Infrastructure(
            "RabbitMQ on 127.0.0.1:5672 did not confirm a publish within 10 s "
            "(a resource alarm blocks publishers)"
        ) from None
    finally:
        await channel.close()


def _check_disks() -> None:
    for where in (Path(tempfile.gettempdir()), RABBITMQ_DATA):
        if where.exists() and (free := shutil.disk_usage(where).free) < MIN_FREE_BYTES:
            raise _Infrastructure(
                f"only {free >> 20} MiB free under {where}; the suite needs "
                f"{MIN_FREE_BYTES >> 20} MiB (spooled files, test nodes' data)"
            )


async def _remove_stale_test_queues(connection: aiormq.abc.AbstractConnection) -> int:
    """Delete the test queues and exchanges (``t-...``) that a killed run left, by their
    names' time stamps (testbed.support.Names): never another run's live ones."""
    tool = shutil.which("rabbitmqctl")
    if tool is None:
        return 0
    listed = {}
    for what in ("list_queues", "list_exchanges"):
        out = await _tool(tool, "-q", what, "name", "--no-table-headers")
        listed[what] = [n for n in out.split() if n.startswith(TEST_PREFIX) and stale_test_queue(n)]
    channel = await connection.channel()
    for queue in listed["list_queues"]:
        await channel.queue_delete(queue)
    for exchange in listed["list_exchanges"]:
        await channel.exchange_delete(exchange)
    await channel.close()
    return len(listed["list_queues"])


# -- every test ------------------------------------------------------------------------------


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item: pytest.Item) -> None:
    """Collect the garbage the test left, after its fixtures are torn down, and fail the
    test itself for what it leaked.

    With ``filterwarnings = error`` a ResourceWarning (an unclosed socket, transport or
    session) is raised from ``__del__`` when the collector gets to the object: left to
    the collector's own timing, during whichever test runs next. Here the collection
    runs as the last step of this test's teardown, what ``__del__`` raises is caught and
    raised again as this test's teardown error. What survives is frozen, so the next
    test's collection only looks at objects made since (a full collection of this
    process takes 70 ms).
    """
    caught: list[Any] = []
    previous, sys.unraisablehook = sys.unraisablehook, caught.append
    try:
        gc.collect()
    finally:
        sys.unraisablehook = previous
    gc.freeze()
    if caught:
        leaked = "; ".join(
            f"{u.err_msg or 'Exception ignored in'}: {u.object!r}: {u.exc_value!r}" for u in caught
        )
        first = caught[0].exc_value
        raise AssertionError(f"{item.nodeid} left garbage that complained: {leaked}") from first


@pytest.fixture(autouse=True)
def timing_margins(request: pytest.FixtureRequest) -> Iterator[None]:
    """testbed.timing records each bound's margin as a property of this test (junit XML)."""
    properties = request.node.user_properties

    def record(name: str, value: object) -> None:
        properties[:] = [(k, v) for k, v in properties if k != name]
        properties.append((name, value))

    timing.set_recorder(record)
    yield
    timing.set_recorder(None)


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """Every logger's level back as it was: a test that sets up Courier's logging (root at
    INFO, aiormq at WARNING) must not change what later tests in this worker log."""
    loggers = [logging.getLogger()] + [
        logger
        for logger in logging.Logger.manager.loggerDict.values()
        if isinstance(logger, logging.Logger)
    ]
    levels = {logger: logger.level for logger in loggers}
    yield
    for logger, level in levels.items():
        logger.setLevel(level)


@pytest.fixture(autouse=True)
def no_secret_leaks() -> Iterator[None]:
    """Every test: no API key, AWS secret or presigned signature in what Courier emitted, and
    every event it published (and a test collected) valid against schemas/event.schema.json."""
    LEDGER.secrets = (INCONVO_KEY, MINDSET_KEY, AWS_SECRET)
    LEDGER.enabled = True
    LEDGER.texts.clear()
    LEDGER.invalid_events.clear()
    handler = LedgerHandler(level=logging.DEBUG)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
    leaks = LEDGER.leaks()
    LEDGER.texts.clear()
    assert not leaks, f"secrets leaked: {leaks}"
    invalid, LEDGER.invalid_events = LEDGER.invalid_events, []
    assert not invalid, f"events that break the event schema: {invalid[:5]}"


# -- brokers ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def own_node() -> Iterator[RabbitNode]:
    """A RabbitMQ node of the tests' own, booted once per session (worker) that needs it.

    The timing and soak tiers run on it, one test at a time, so their bounds are
    measured on a broker no other test loads; the broker-fault tests stop and block
    it (and restore it). A node of the installed server on ports of its own
    (testbed/rabbit.py): the machine's node on 5672 is never stopped or reconfigured.
    Its boot is no test's: ``timeout_func_only`` keeps it out of every test's budget.
    """
    cluster = asyncio.run(start_cluster(1))
    yield cluster.nodes[0]
    asyncio.run(cluster.stop())


@pytest.fixture
def broker_url(request: pytest.FixtureRequest) -> str:
    """The broker this test runs against: the machine's, or for a ``timing`` or ``soak``
    test the quiet node of the tests' own."""
    if request.node.get_closest_marker("timing") or request.node.get_closest_marker("soak"):
        node: RabbitNode = request.getfixturevalue("own_node")
        return node.url
    return AMQP_URL


@pytest.fixture
def fast_retries() -> Iterator[None]:
    """In-process retries keep their count but skip the real backoff waits."""
    stamina.set_testing(True, attempts=3)
    yield
    stamina.set_testing(False)


@pytest.fixture
async def amqp(broker_url: str) -> AsyncIterator[AbstractRobustConnection]:
    """A connection to this test's broker (loopback)."""
    connection = await aio_pika.connect_robust(broker_url)
    yield connection
    await connection.close()


@pytest.fixture
async def names(broker_url: str) -> AsyncIterator[Names]:
    """Fresh queue/exchange names for this test, deleted afterwards."""
    fresh = Names.fresh()
    yield fresh
    await delete_topology(fresh, TEST_DELAYS, url=broker_url)


# -- servers and fakes -----------------------------------------------------------------------


@pytest.fixture
async def files() -> AsyncIterator[FileServer]:
    """A file server on 127.0.0.1."""
    server = await FileServer().start()
    yield server
    await server.close()


@pytest.fixture
async def inconvo() -> AsyncIterator[FakeInconvo]:
    """The strict fake Inconvo."""
    fake = FakeInconvo(api_key=INCONVO_KEY)
    await fake.start()
    yield fake
    await fake.close()


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server on loopback for the whole session; AWS_* point at it."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in _AWS_ENV}
    os.environ.update(
        {
            "AWS_ACCESS_KEY_ID": AWS_KEY_ID,
            "AWS_SECRET_ACCESS_KEY": AWS_SECRET,
            "AWS_REGION": "us-east-1",
            "AWS_ENDPOINT_URL_S3": endpoint,
        }
    )
    yield endpoint
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


_AWS_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_ENDPOINT_URL_S3")


@pytest.fixture
async def s3(s3_endpoint: str) -> AsyncIterator[S3Client]:
    """An S3 client for the tests themselves (setting up buckets and objects)."""
    async with get_session().create_client("s3", region_name="us-east-1") as client:
        yield client


@pytest.fixture
async def mindset() -> AsyncIterator[FakeMindset]:
    """The strict fake Mindset."""
    fake = FakeMindset(api_key=MINDSET_KEY)
    await fake.start()
    yield fake
    await fake.close()


# -- Courier, configured for this test ---------------------------------------------------------


@pytest.fixture
def make_settings(
    broker_url: str, names: Names, files: FileServer, inconvo: FakeInconvo, mindset: FakeMindset
) -> Callable[..., Settings]:
    """Settings pointing at this test's broker, queues, file server and fakes."""

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "amqp_url": broker_url,
            "queue": names.queue,
            "events_exchange": names.events_exchange,
            "http_host": "127.0.0.1",
            "http_port": 0,
            "inconvo_api_key": INCONVO_KEY,
            "inconvo_base_url": inconvo.base_url,
            "mindset_api_key": MINDSET_KEY,
            "mindset_base_url": mindset.base_url,
            "source_allowed_hosts": (f"127.0.0.1:{files.port}",),
            "retry_delays": TEST_DELAYS,
            "log_format": "console",
            "event_source": "urn:courier:test",
            "shutdown_timeout": 5.0,
        }
        values.update(overrides)
        return Settings(**values)

    return make


@pytest.fixture
async def collector(amqp: AbstractRobustConnection, names: Names) -> EventCollector:
    """Collects the result events of this test's exchange."""
    return await EventCollector(amqp, names.events_exchange).start()


@pytest.fixture
def process_env(
    broker_url: str, names: Names, files: FileServer, inconvo: FakeInconvo
) -> Callable[..., dict[str, str]]:
    """The environment for a `courier run` subprocess on this test's broker and queues.

    Its HTTP port is 0: the process binds one of the kernel's choosing and logs it,
    and CourierProcess reads it from there (a port picked here would be bound there
    only seconds later, by when another process may have it).
    """

    def make(**extra: str) -> dict[str, str]:
        values = {
            "COURIER_AMQP_URL": broker_url,
            "COURIER_QUEUE": names.queue,
            "COURIER_EVENTS_EXCHANGE": names.events_exchange,
            "COURIER_HTTP_PORT": "0",
            "COURIER_INCONVO_API_KEY": INCONVO_KEY,
            "COURIER_INCONVO_BASE_URL": inconvo.base_url,
            "COURIER_SOURCE_ALLOWED_HOSTS": f"127.0.0.1:{files.port}",
            "COURIER_RETRY_DELAYS": "1s,2s",
        }
        return courier_env(**(values | extra))

    return make


@pytest.fixture
def stage(
    broker_url: str,
    amqp: AbstractRobustConnection,
    names: Names,
    files: FileServer,
    inconvo: FakeInconvo,
    mindset: FakeMindset,
    collector: EventCollector,
    make_settings: Callable[..., Settings],
    process_env: Callable[..., dict[str, str]],
) -> Stage:
    """This test's broker, names, file server, fakes, collector and Courier's configuration,
    as one object (testbed/stage.py)."""
    return Stage(
        broker_url=broker_url,
        amqp=amqp,
        names=names,
        files=files,
        inconvo=inconvo,
        mindset=mindset,
        collector=collector,
        settings=make_settings,
        env=process_env,
    )


@pytest.fixture
async def service(make_settings: Callable[..., Settings]) -> AsyncIterator[Service]:
    """The service, running with the default test settings."""
    async with running(make_settings()) as svc:
        yield svc
