"""Shared fixtures: real RabbitMQ, a file server, fake APIs and the service in-process."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING, Any

import aio_pika
import pytest
import stamina
from aio_pika.abc import AbstractRobustConnection
from aiobotocore.session import get_session
from moto.server import ThreadedMotoServer

from service.config import Settings
from service.runtime import Service
from testbed.fakes import FakeInconvo, FakeMindset
from testbed.rabbit import RabbitNode, start_cluster
from testbed.support import (
    AMQP_URL,
    LEDGER,
    EventCollector,
    FileServer,
    LedgerHandler,
    Names,
    courier_env,
    delete_topology,
    free_port,
)

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

INCONVO_KEY = "test-inconvo-key-5f1e"
MINDSET_KEY = "test-mindset-key-9c3a"
AWS_KEY_ID = "AKIATESTCOURIER0001"
AWS_SECRET = "test-aws-secret-7d2b4e"
TEST_DELAYS = (1, 2)


@pytest.fixture(scope="session")
def own_node() -> Iterator[RabbitNode]:
    """A RabbitMQ node of the tests' own: stopping or blocking it disturbs no other test.

    A node of the installed server on ports of its own (testbed/rabbit.py); the
    machine's node on 5672 is never stopped or reconfigured by a test.
    """
    cluster = asyncio.run(start_cluster(1))
    yield cluster.nodes[0]
    asyncio.run(cluster.stop())


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


@pytest.fixture
def fast_retries() -> Iterator[None]:
    """In-process retries keep their count but skip the real backoff waits."""
    stamina.set_testing(True, attempts=3)
    yield
    stamina.set_testing(False)


@pytest.fixture
async def amqp() -> AsyncIterator[AbstractRobustConnection]:
    """A connection to the real RabbitMQ on loopback."""
    connection = await aio_pika.connect_robust(AMQP_URL)
    yield connection
    await connection.close()


@pytest.fixture
async def names() -> AsyncIterator[Names]:
    """Fresh queue/exchange names for this test, deleted afterwards."""
    fresh = Names.fresh()
    yield fresh
    await delete_topology(fresh, TEST_DELAYS)


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


@pytest.fixture
def make_settings(
    names: Names, files: FileServer, inconvo: FakeInconvo, mindset: FakeMindset
) -> Callable[..., Settings]:
    """Settings pointing at this test's queues, file server and fakes."""

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "amqp_url": AMQP_URL,
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
    names: Names, files: FileServer, inconvo: FakeInconvo
) -> Callable[..., dict[str, str]]:
    """The environment for a `courier run` subprocess on this test's queues."""

    def make(**extra: str) -> dict[str, str]:
        return courier_env(
            COURIER_QUEUE=names.queue,
            COURIER_EVENTS_EXCHANGE=names.events_exchange,
            COURIER_HTTP_PORT=str(free_port()),
            COURIER_INCONVO_API_KEY=INCONVO_KEY,
            COURIER_INCONVO_BASE_URL=inconvo.base_url,
            COURIER_SOURCE_ALLOWED_HOSTS=f"127.0.0.1:{files.port}",
            COURIER_RETRY_DELAYS="1s,2s",
            **extra,
        )

    return make


@contextlib.asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[Service]:
    """Run the service in-process until the block ends; waits until it is ready."""
    service = Service(settings)
    task = asyncio.create_task(service.run(install_signals=False))
    try:
        async with asyncio.timeout(20):
            while not await service.ready():
                if task.done():
                    task.result()
                await asyncio.sleep(0.05)
        yield service
    finally:
        service.request_stop()
        await asyncio.wait_for(task, 30)


@pytest.fixture
async def service(make_settings: Callable[..., Settings]) -> AsyncIterator[Service]:
    """The service, running with the default test settings."""
    async with running(make_settings()) as svc:
        yield svc
