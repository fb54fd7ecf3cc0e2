"""`courier doctor` against the real broker, moto's S3 and the fake APIs, run as an operator runs it."""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import aio_pika
import orjson
import pytest
from aio_pika.abc import AbstractRobustConnection
from aiohttp import web

from service import doctor
from service.amqp.declare import declare_events, declare_own_queues, declare_queue
from service.config import Settings
from service.topology import Topology
from testbed.fakes import FakeInconvo, FakeMindset
from testbed.loopback import serve
from testbed.support import Names, closed_port, courier, courier_env
from tests.conftest import AWS_SECRET, INCONVO_KEY, MINDSET_KEY, TEST_DELAYS

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

BUCKET = "doctor-reports"


@pytest.fixture
async def bucket(s3: S3Client) -> str:
    """A bucket that exists on the moto server."""
    await s3.create_bucket(Bucket=BUCKET)
    return BUCKET


@pytest.fixture
def env(names: Names, inconvo: FakeInconvo, mindset: FakeMindset, bucket: str) -> dict[str, str]:
    """Everything configured and working: this test's queues, the fakes, moto with a bucket."""
    return courier_env(
        COURIER_QUEUE=names.queue,
        COURIER_EVENTS_EXCHANGE=names.events_exchange,
        COURIER_RETRY_DELAYS=",".join(f"{d}s" for d in TEST_DELAYS),
        COURIER_INCONVO_API_KEY=INCONVO_KEY,
        COURIER_INCONVO_BASE_URL=inconvo.base_url,
        COURIER_MINDSET_API_KEY=MINDSET_KEY,
        COURIER_MINDSET_BASE_URL=mindset.base_url,
        COURIER_S3_ALLOWED_BUCKETS=bucket,
        # Never ask a cloud's metadata address for credentials: the environment has them.
        AWS_EC2_METADATA_DISABLED="true",
    )


async def _declare_topology(amqp: AbstractRobustConnection, names: Names) -> Topology:
    topology = Topology.build(
        queue=names.queue,
        events_exchange=names.events_exchange,
        retry_delays=TEST_DELAYS,
        max_redeliveries=5,
    )
    channel = await amqp.channel()
    await declare_queue(channel, topology.requests)
    await declare_own_queues(channel, topology)
    await declare_events(channel, topology)
    await channel.close()
    return topology


async def _diagnose(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str]
) -> tuple[int, list[dict[str, Any]]]:
    """The doctor's checks in this process under ``env`` (the subprocess runs cover the CLI)."""
    for key in list(os.environ):
        if key not in env:
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    checks = await doctor.diagnose()
    report = doctor.as_json(checks)
    return (0 if report["ok"] else 1), report["checks"]


def _lines(checks: list[dict[str, Any]], area: str) -> list[dict[str, Any]]:
    return [check for check in checks if check["area"] == area]


def _failures(checks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [check for check in checks if check["verdict"] == "fail"]


async def test_all_well_in_both_formats_and_no_secret_shown(
    amqp: AbstractRobustConnection, names: Names, env: dict[str, str]
) -> None:
    """Everything configured and working: exit 0, every dependency ok, no key or secret in either format."""
    topology = await _declare_topology(amqp, names)
    code, out, err = await courier("doctor", env=env)
    text = out.decode()
    assert code == 0, text + err.decode()
    assert "FAIL" not in text and text.rstrip().endswith("all well")
    for queue in (topology.requests.name, *(t.name for t in topology.tiers), topology.dead.name):
        assert f"OK    topology   queue {queue}: present" in text
    assert f"exchange {names.events_exchange}: present" in text
    code, out, _ = await courier("doctor", "--json", env=env)
    assert code == 0
    report = orjson.loads(out)
    assert report["ok"] is True
    checks = report["checks"]
    assert [c["verdict"] for c in _lines(checks, "broker")] == ["ok"]
    assert [c["verdict"] for c in _lines(checks, "inconvo")] == ["ok"]
    assert [c["verdict"] for c in _lines(checks, "mindset")] == ["ok"]
    s3 = _lines(checks, "s3")
    assert "credentials from the environment" in s3[0]["detail"]
    assert "region us-east-1" in s3[0]["detail"]
    assert s3[1] == {
        "area": "s3",
        "verdict": "ok",
        "detail": f"bucket {BUCKET}: readable (HeadBucket)",
        "fix": None,
    }
    policy = " ".join(c["detail"] for c in _lines(checks, "sources"))
    assert "HTTP(S) sources: any public address" in policy and "169.254.169.254" in policy
    assert f"only buckets {BUCKET}" in policy
    # The test keys and the AWS secret never appear (the autouse fixture scans both outputs too).
    for output in (text, orjson.dumps(checks).decode()):
        for secret in (INCONVO_KEY, MINDSET_KEY, AWS_SECRET):
            assert secret not in output


@pytest.mark.parametrize(
    ("change", "area", "detail", "fix"),
    [
        (
            {"COURIER_INCONVO_API_KEY": "wrong-inconvo-key"},
            "inconvo",
            "the API key was refused (HTTP 401",
            "set COURIER_INCONVO_API_KEY to a valid key",
        ),
        (
            {"COURIER_MINDSET_API_KEY": "wrong-mindset-key"},
            "mindset",
            "the API key was refused (HTTP 401",
            "set COURIER_MINDSET_API_KEY to a valid key",
        ),
        (
            {"COURIER_S3_ALLOWED_BUCKETS": f"{BUCKET},no-such-bucket"},
            "s3",
            "bucket no-such-bucket: does not exist",
            "remove no-such-bucket from COURIER_S3_ALLOWED_BUCKETS or correct its name",
        ),
        (
            {"COURIER_CONCURENCY": "8"},
            "config",
            "COURIER_CONCURENCY is not a Courier variable and is ignored (did you mean COURIER_CONCURRENCY?)",
            "rename COURIER_CONCURENCY to COURIER_CONCURRENCY",
        ),
    ],
    ids=["wrong-inconvo-key", "wrong-mindset-key", "missing-bucket", "unknown-variable"],
)
async def test_one_broken_thing_fails_with_its_fix(
    monkeypatch: pytest.MonkeyPatch,
    env: dict[str, str],
    change: dict[str, str],
    area: str,
    detail: str,
    fix: str,
) -> None:
    """One thing broken: a failure, exactly that check fails, and its fix names the variable."""
    code, checks = await _diagnose(monkeypatch, {**env, **change})
    assert code == 1
    [failure] = _failures(checks)
    assert failure["area"] == area
    assert failure["detail"].startswith(detail)
    assert failure["fix"] == fix


async def test_no_broker(env: dict[str, str]) -> None:
    """A closed loopback port: the node fails with its fix, the topology is not checked, secrets stay hidden."""
    with closed_port() as port:
        code, out, _ = await courier(
            "doctor", env={**env, "COURIER_AMQP_URL": f"amqp://courier:hunter2@127.0.0.1:{port}/"}
        )
    text = out.decode()
    assert code == 1
    assert (
        f"FAIL  broker     amqp://127.0.0.1:{port}/: unreachable" in text
        and "fix: point COURIER_AMQP_URL at a running RabbitMQ (host and port)" in text
    )
    assert "SKIP  topology   not checked: no broker node answered" in text
    assert "OK    inconvo" in text and "OK    mindset" in text
    assert "hunter2" not in text
    assert text.rstrip().endswith("1 problem found")


async def test_bad_value_is_reported_not_crashed_on(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str]
) -> None:
    """A value `courier run` would refuse is one failing line naming the variable; nothing else is tried."""
    code, checks = await _diagnose(monkeypatch, {**env, "COURIER_CONCURRENCY": "many"})
    assert code == 1
    [failure] = _failures(checks)
    assert failure["detail"].startswith("COURIER_CONCURRENCY:")
    assert failure["fix"] == "correct COURIER_CONCURRENCY, then run doctor again"
    assert checks[-1]["verdict"] == "skip"


class FakeManagement:
    """The RabbitMQ management API's queue and exchange pages, with chosen arguments."""

    def __init__(self, queues: dict[str, dict[str, Any]], exchanges: dict[str, str]) -> None:
        self.queues = queues
        self.exchanges = exchanges
        self.depths: dict[str, int] = {}
        self.auth: list[str | None] = []

    async def _overview(self, request: web.Request) -> web.Response:
        self.auth.append(request.headers.get("Authorization"))
        return web.json_response({"rabbitmq_version": "3.13.7"})

    async def _queue(self, request: web.Request) -> web.Response:
        arguments = self.queues.get(request.match_info["name"])
        if arguments is None:
            return web.json_response({"error": "Object Not Found"}, status=404)
        return web.json_response({"name": request.match_info["name"], "arguments": arguments})

    async def _queues(self, request: web.Request) -> web.Response:
        """The paginated listing, filtered by ``name`` as a regular expression."""
        assert request.query["use_regex"] == "true" and request.query["page"] == "1"
        pattern = re.compile(request.query["name"])
        items = [
            {"name": name, "messages_ready": self.depths.get(name, 0), "consumers": 0}
            for name in self.queues
            if pattern.search(name)
        ]
        return web.json_response({"items": items, "page": 1, "page_count": 1})

    async def _exchange(self, request: web.Request) -> web.Response:
        kind = self.exchanges.get(request.match_info["name"])
        if kind is None:
            return web.json_response({"error": "Object Not Found"}, status=404)
        return web.json_response({"type": kind, "durable": True})

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/api/overview", self._overview)
        app.router.add_get("/api/queues/{vhost}", self._queues)
        app.router.add_get("/api/queues/{vhost}/{name}", self._queue)
        app.router.add_get("/api/exchanges/{vhost}/{name}", self._exchange)
        return app


@pytest.fixture
async def management(
    amqp: AbstractRobustConnection, names: Names
) -> AsyncIterator[tuple[FakeManagement, str]]:
    """A management API that shows the dead-letter queue as classic, everything else as declared."""
    topology = await _declare_topology(amqp, names)
    queues = {spec.name: dict(spec.arguments) for spec in (topology.requests, *topology.tiers)}
    queues[topology.dead.name] = {"x-queue-type": "classic"}
    fake = FakeManagement(queues, {names.events_exchange: "topic"})
    server = await serve(fake.app())
    yield fake, server.url
    await server.close()


async def test_queue_arguments_compared_through_the_management_api(
    make_settings: Callable[..., Settings],
    management: tuple[FakeManagement, str],
    names: Names,
) -> None:
    """Where the management API answers, a queue declared with other arguments fails by name."""
    fake, url = management
    checks = await doctor.broker_checks(make_settings(), management_url=url)
    failures = [c for c in checks if c.verdict == "fail"]
    assert [c.detail.split(":")[0] for c in failures] == [f"queue {names.dead_queue}"]
    assert "x-queue-type is 'classic' (expected 'quorum')" in failures[0].detail
    assert "COURIER_QUEUE" in (failures[0].fix or "")
    assert f"queue {names.queue}: present, arguments as expected" in " ".join(
        c.detail for c in checks
    )
    assert fake.auth and fake.auth[0] is not None and fake.auth[0].startswith("Basic ")


async def test_absent_topology_is_noted_and_left_absent(
    make_settings: Callable[..., Settings], amqp: AbstractRobustConnection, names: Names
) -> None:
    """Absent queues are noted, not failed; doctor declares nothing; without a management API it says arguments went uncompared."""
    with closed_port() as port:
        checks = await doctor.broker_checks(
            make_settings(), management_url=f"http://127.0.0.1:{port}"
        )
    assert all(c.verdict in ("ok", "note") for c in checks)
    absent = [c.detail for c in checks if "absent; `courier run` declares it" in c.detail]
    assert len(absent) == 2 + len(TEST_DELAYS) + 1  # requests, tiers, dead, exchange
    assert "arguments not compared" in checks[-1].detail
    channel = await amqp.channel()
    for queue in (names.queue, names.dead_queue):
        with pytest.raises(aio_pika.exceptions.ChannelNotFoundEntity):
            await channel.declare_queue(queue, passive=True)
        channel = await amqp.channel()
    await channel.close()


async def test_tenant_weights_and_queues_are_reported_with_their_depth(
    make_settings: Callable[..., Settings],
    amqp: AbstractRobustConnection,
    names: Names,
    management: tuple[FakeManagement, str],
) -> None:
    """Doctor names the weights and every tenant queue with its depth: through the
    management API all of them, without it the default tenant's and the named ones'."""
    fake, url = management
    topology = Topology.build(
        queue=names.queue, events_exchange=names.events_exchange, retry_delays=TEST_DELAYS,
        max_redeliveries=5,
    )  # fmt: skip
    names.tenants |= {"web", "acme"}
    channel = await amqp.channel()
    for tenant, count in (("default", 2), ("web", 1), ("acme", 3)):
        await declare_queue(channel, topology.tenant(tenant))
        for _ in range(count):
            body = aio_pika.Message(b"{}", delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
            await channel.default_exchange.publish(body, routing_key=topology.tenant(tenant).name)
        fake.queues[topology.tenant(tenant).name] = dict(topology.tenant(tenant).arguments)
        fake.depths[topology.tenant(tenant).name] = count
    await channel.close()
    settings = make_settings(tenant_weights="web=4")

    listed = await doctor.broker_checks(settings, management_url=url)
    lines = [c.detail for c in listed if c.area == "tenants"]
    assert lines[0] == "COURIER_TENANT_WEIGHTS: web=4; any other tenant weighs 1"
    assert sorted(lines[1:]) == sorted(
        f"tenant {t}: queue {names.queue}.tenant.{t}, {n} messages ready, 0 consumers"
        for t, n in (("default", 2), ("web", 1), ("acme", 3))
    )

    with closed_port() as port:
        declared = await doctor.broker_checks(settings, management_url=f"http://127.0.0.1:{port}")
    lines = [c.detail for c in declared if c.area == "tenants"]
    assert f"tenant web: queue {names.queue}.tenant.web, 1 messages ready, 0 consumers" in lines
    assert f"tenant default: queue {names.queue}.tenant.default, 2 messages ready" in " ".join(
        lines
    )
    assert not any("tenant acme" in line for line in lines), "acme is named nowhere"
    assert "the management API lists the others" in lines[-1]
