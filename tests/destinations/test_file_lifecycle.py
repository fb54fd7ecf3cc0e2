"""The file in the platform: once, current, really ingested, and deletable.

Real RabbitMQ and the strict fakes; the fakes' files are the truth each test checks.
"""

from __future__ import annotations

import asyncio
import hashlib
import signal
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import orjson
import pytest
from aio_pika.abc import AbstractRobustConnection
from prometheus_client.parser import text_string_to_metric_families

from service.config import Settings
from testbed.fakes import FakeInconvo, FakeMindset, IngestionRule
from testbed.stage import Stage
from testbed.support import (
    CourierProcess,
    EventCollector,
    FileServer,
    Names,
    inconvo_request,
    publish,
    publish_requests,
)
from tests.conftest import MINDSET_KEY, running

ALL_EVENTS = ("#",)


@pytest.fixture
async def everything(amqp: AbstractRobustConnection, names: Names) -> EventCollector:
    """Collects every event of this test's exchange, the ingestion events too."""
    return await EventCollector(amqp, names.events_exchange, keys=ALL_EVENTS).start()


def mindset_request(url: str, rid: str, **destination: Any) -> dict[str, Any]:
    return {
        "id": rid,
        "source": {"url": url},
        "destination": {"type": "mindset", "appUid": "app", "contextUid": "ctx", **destination},
    }


def of(collector: EventCollector, rid: str) -> list[str]:
    """The types of a request's events, in the order they came."""
    return [e["type"] for e in collector.events if e["data"]["requestId"] == rid]


def data(collector: EventCollector, rid: str, event_type: str) -> dict[str, Any]:
    """The data of a request's one event of ``event_type``."""
    found: dict[str, Any]
    [found] = [
        e["data"]
        for e in collector.events
        if e["data"]["requestId"] == rid and e["type"] == event_type
    ]
    return found


async def wait_types(
    collector: EventCollector, wanted: dict[str, str], timeout: float = 60
) -> None:
    """Wait until each request id has an event of its wanted type."""
    async with asyncio.timeout(timeout):
        while not all(kind in of(collector, rid) for rid, kind in wanted.items()):
            await asyncio.sleep(0.05)


# -- one file per request -------------------------------------------------------------


@pytest.mark.timeout(180)
async def test_a_killed_replica_makes_no_second_file(
    process_env: Callable[..., dict[str, str]],
    amqp: AbstractRobustConnection,
    names: Names,
    files: FileServer,
    mindset: FakeMindset,
    collector: EventCollector,
) -> None:
    """SIGKILL during 60 Mindset requests that carry no externalId, then a new replica:
    every request is exactly one file at Mindset (its externalId is courier:<id>)."""
    mindset.delay_after = 0.5  # the file exists before Courier hears back: the kill's window
    env = process_env(
        COURIER_CONCURRENCY="8",
        COURIER_MINDSET_API_KEY=MINDSET_KEY,
        COURIER_MINDSET_BASE_URL=mindset.base_url,
        COURIER_TRACK_INGESTION="false",
    )
    ids = [f"once-{i}" for i in range(60)]
    bodies = [mindset_request(files.add(f"/{rid}.pdf", b"%PDF-1.4"), rid) for rid in ids]
    first = await CourierProcess(env).start()
    await publish_requests(amqp, names.queue, bodies)
    async with asyncio.timeout(60):
        while len(mindset.ingests) < 12:  # some answered, eight more created and unanswered
            await asyncio.sleep(0.02)
    assert await first.signal(signal.SIGKILL) == -signal.SIGKILL
    created_at_kill = len(mindset.ingests)
    second = await CourierProcess(env).start()
    try:
        await collector.wait_for_ids(set(ids), timeout=120)
    finally:
        assert await second.signal(signal.SIGTERM) == 0
    assert created_at_kill < 60, "the kill came too late to prove anything"
    external_ids = Counter(file["externalId"] for file in mindset.files)
    assert external_ids == Counter({f"courier:{rid}": 1 for rid in ids})
    assert {e["data"]["status"] for e in collector.events} == {"succeeded"}


# -- the real outcome -----------------------------------------------------------------


async def test_each_uploaded_file_gets_one_ingestion_event(
    make_settings: Callable[..., Settings],
    amqp: AbstractRobustConnection,
    names: Names,
    files: FileServer,
    inconvo: FakeInconvo,
    mindset: FakeMindset,
    everything: EventCollector,
) -> None:
    """Files the fake moves to published, readyForPublication and fail after some reads:
    one ingestion event each, with its fileStatus and code; an Inconvo upload gets
    ingestion.completed right after its upload event."""
    fates = {"published": 2, "readyForPublication": 1, "fail": 1}

    def rule(body: dict[str, Any]) -> IngestionRule:
        fate = body["name"].split(".")[0]
        return IngestionRule(fate, after_reads=fates[fate])

    mindset.ingestion = rule
    async with running(make_settings()):
        for fate in fates:
            await publish(
                amqp, names.queue, mindset_request(files.add(f"/{fate}.pdf", b"%PDF"), fate)
            )
        await publish(amqp, names.queue, inconvo_request(files.add("/a.csv", b"1\n"), "csv"))
        await wait_types(
            everything,
            {
                "published": "courier.ingestion.completed",
                "readyForPublication": "courier.ingestion.completed",
                "fail": "courier.ingestion.failed",
                "csv": "courier.ingestion.completed",
            },
        )
    for rid in (*fates, "csv"):
        kinds = of(everything, rid)
        assert kinds[0] == "courier.upload.succeeded" and len(kinds) == 2, kinds
    for fate, reads in fates.items():
        event_type = "courier.ingestion.failed" if fate == "fail" else "courier.ingestion.completed"
        ingestion = data(everything, fate, event_type)
        assert ingestion["fileStatus"] == fate
        assert ingestion["checks"] == reads + 1, "a read that still saw accepted, then the last"
        assert ingestion["destination"] == "mindset" and ingestion["waitedMs"] > 0
        assert ingestion["result"]["externalId"] == f"courier:{fate}"
    failed = data(everything, "fail", "courier.ingestion.failed")
    assert failed["error"]["code"] == "ingestion_failed" and not failed["error"]["retryable"]
    stored = data(everything, "csv", "courier.ingestion.completed")
    assert (stored["fileStatus"], stored["checks"], stored["waitedMs"]) == ("stored", 0, 0.0)
    for fate in fates:
        assert mindset.reads_of(external_id=f"courier:{fate}") == fates[fate] + 1


async def test_a_read_that_fails_is_one_get_and_the_next_comes_from_the_broker(
    stage: Stage, everything: EventCollector
) -> None:
    """A status read answered 503 is one GET, counted as a check, not retried on the
    spot: the next read comes after the next delay, and the file ends completed."""
    stage.mindset.ingestion = lambda body: IngestionRule("published", after_reads=1)
    stage.mindset.fail_next(503, method="GET")
    async with stage.running():
        await stage.publish(mindset_request(stage.files.add("/r.pdf", b"%PDF"), "r"))
        await wait_types(everything, {"r": "courier.ingestion.completed"})
    ingestion = data(everything, "r", "courier.ingestion.completed")
    assert ingestion["checks"] == 3, "the refused read, one that saw accepted, the last"
    assert stage.mindset.reads_of(external_id="courier:r") == 2
    assert len([r for r in stage.mindset.requests if r.method == "GET"]) == 3


async def test_a_file_the_platform_loses_ends_in_ingestion_failed_saying_so(
    stage: Stage, everything: EventCollector
) -> None:
    """The file disappears while Courier follows it (a read finds no file by its
    externalId): ingestion.failed, code ingestion_failed, the message saying so."""
    stage.mindset.ingestion = lambda body: IngestionRule("gone", after_reads=1)
    async with stage.running():
        await stage.publish(mindset_request(stage.files.add("/lost.pdf", b"%PDF"), "lost"))
        await wait_types(everything, {"lost": "courier.ingestion.failed"})
    assert of(everything, "lost") == ["courier.upload.succeeded", "courier.ingestion.failed"]
    failed = data(everything, "lost", "courier.ingestion.failed")
    assert failed["error"]["code"] == "ingestion_failed" and not failed["error"]["retryable"]
    assert "no longer in Mindset" in failed["error"]["message"]
    assert failed["checks"] == 2, "one read that saw accepted, one that found nothing"
    assert stage.mindset.files == []


async def test_a_deduplicated_upload_is_followed_as_well(
    stage: Stage, everything: EventCollector
) -> None:
    """A second request for a file already there (the same externalId and content):
    deduplicated, then its own ingestion event from the existing file's state."""
    stage.mindset.ingestion = lambda body: IngestionRule("published", after_reads=1)
    url = stage.files.add("/kb.txt", b"the handbook", content_type="text/plain")
    async with stage.running():
        await stage.publish(mindset_request(url, "first", externalId="kb"))
        await wait_types(everything, {"first": "courier.ingestion.completed"})
        await stage.publish(mindset_request(url, "again", externalId="kb"))
        await wait_types(everything, {"again": "courier.ingestion.completed"})
    assert of(everything, "again") == ["courier.upload.succeeded", "courier.ingestion.completed"]
    assert data(everything, "again", "courier.upload.succeeded")["deduplicated"] is True
    ingestion = data(everything, "again", "courier.ingestion.completed")
    first = data(everything, "first", "courier.ingestion.completed")
    assert ingestion["fileStatus"] == "published" and ingestion["checks"] == 0
    assert ingestion["result"]["uid"] == first["result"]["uid"]
    assert len(stage.mindset.files) == 1


async def test_a_file_never_final_ends_in_ingestion_timeout(
    make_settings: Callable[..., Settings],
    amqp: AbstractRobustConnection,
    names: Names,
    files: FileServer,
    mindset: FakeMindset,
    everything: EventCollector,
) -> None:
    """A file still accepted past a short COURIER_INGESTION_TIMEOUT: ingestion.failed,
    code ingestion_timeout, with the last status read."""
    async with running(make_settings(ingestion_timeout=2)):
        await publish(amqp, names.queue, mindset_request(files.add("/slow.pdf", b"%PDF"), "slow"))
        await wait_types(everything, {"slow": "courier.ingestion.failed"})
    failed = data(everything, "slow", "courier.ingestion.failed")
    assert failed["error"]["code"] == "ingestion_timeout"
    assert failed["fileStatus"] == "accepted" and failed["waitedMs"] >= 2000
    assert "COURIER_INGESTION_TIMEOUT" in failed["error"]["message"]


def _sample(exposition: str, name: str) -> float:
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name == name:
                return sample.value
    return 0.0


@pytest.mark.timeout(180)
async def test_following_survives_the_replica_s_death(
    process_env: Callable[..., dict[str, str]],
    amqp: AbstractRobustConnection,
    names: Names,
    files: FileServer,
    mindset: FakeMindset,
    everything: EventCollector,
) -> None:
    """The replica following ten files is killed while their copies wait between reads;
    a new replica reads them on: every file still gets its one ingestion event."""
    mindset.ingestion = IngestionRule("published", after_reads=2)
    env = process_env(
        COURIER_MINDSET_API_KEY=MINDSET_KEY, COURIER_MINDSET_BASE_URL=mindset.base_url
    )
    ids = [f"follow-{i}" for i in range(10)]
    first = await CourierProcess(env).start()
    bodies = [mindset_request(files.add(f"/{rid}.pdf", b"%PDF"), rid) for rid in ids]
    await publish_requests(amqp, names.queue, bodies)
    metrics = f"http://127.0.0.1:{first.port}/metrics"
    async with asyncio.timeout(60), aiohttp.ClientSession() as http:
        while True:  # every file followed, its copy in a delay tier, nothing in flight
            async with http.get(metrics) as response:
                exposition = await response.text()
            parked = _sample(exposition, "courier_tracked_files")
            if parked == len(ids) and _sample(exposition, "courier_inflight_requests") == 0:
                break
            await asyncio.sleep(0.05)
    assert await first.signal(signal.SIGKILL) == -signal.SIGKILL
    second = await CourierProcess(env).start()
    try:
        await wait_types(everything, dict.fromkeys(ids, "courier.ingestion.completed"), 90)
    finally:
        assert await second.signal(signal.SIGTERM) == 0
    for rid in ids:
        assert of(everything, rid) == ["courier.upload.succeeded", "courier.ingestion.completed"]


# -- the current version ----------------------------------------------------------------


@pytest.fixture
async def service_for_mindset(
    make_settings: Callable[..., Settings],
) -> AsyncIterator[None]:
    """The service with ingestion following off: these tests look at the files alone."""
    async with running(make_settings(track_ingestion=False)):
        yield


def _hash(content: bytes) -> str:
    return "sha256:" + hashlib.sha256(content).hexdigest()


async def _send(
    amqp: AbstractRobustConnection,
    names: Names,
    collector: EventCollector,
    files: FileServer,
    rid: str,
    content: bytes,
    **destination: Any,
) -> dict[str, Any]:
    url = files.add(f"/{rid}.txt", content, content_type="text/plain")
    await publish(
        amqp, names.queue, mindset_request(url, rid, externalId="handbook", **destination)
    )
    await collector.wait_for_ids({rid})
    return data(collector, rid, "courier.upload.succeeded")


async def test_changed_content_replaces_the_file_and_the_same_content_is_kept(
    service_for_mindset: None,
    amqp: AbstractRobustConnection,
    names: Names,
    files: FileServer,
    mindset: FakeMindset,
    collector: EventCollector,
) -> None:
    """The same externalId: changed content deletes the old file and ingests the new
    (replaced, replacedUid); the same content again is deduplicated, nothing ingested."""
    first = await _send(amqp, names, collector, files, "v1", b"version one")
    [old] = mindset.files
    assert old["contentHash"] == _hash(b"version one")
    second = await _send(amqp, names, collector, files, "v2", b"version two")
    [new] = mindset.files
    assert new["contentHash"] == _hash(b"version two") and new["uid"] != old["uid"]
    assert second["replaced"] is True and second["replacedUid"] == old["uid"]
    assert [d.uid for d in mindset.deletes] == [old["uid"]]
    ingests = len(mindset.ingests)
    third = await _send(amqp, names, collector, files, "v2-again", b"version two")
    assert third["deduplicated"] is True and "replaced" not in third
    assert len(mindset.ingests) == ingests and mindset.files == [new]
    assert "replaced" not in first and "deduplicated" not in first


async def test_keep_and_replace_do_what_they_say(
    service_for_mindset: None,
    amqp: AbstractRobustConnection,
    names: Names,
    files: FileServer,
    mindset: FakeMindset,
    collector: EventCollector,
) -> None:
    """onExisting keep: changed content keeps the old file; replace: the same content is
    ingested again all the same."""
    await _send(amqp, names, collector, files, "base", b"base")
    [base] = mindset.files
    kept = await _send(amqp, names, collector, files, "keep", b"changed", onExisting="keep")
    assert kept["deduplicated"] is True and mindset.files == [base]
    replaced = await _send(amqp, names, collector, files, "again", b"base", onExisting="replace")
    [new] = mindset.files
    assert replaced["replaced"] is True and replaced["replacedUid"] == base["uid"]
    assert new["uid"] != base["uid"] and new["contentHash"] == base["contentHash"]


async def test_a_replace_interrupted_after_the_delete_still_ends(
    make_settings: Callable[..., Settings],
    amqp: AbstractRobustConnection,
    names: Names,
    files: FileServer,
    mindset: FakeMindset,
    collector: EventCollector,
) -> None:
    """The old file is deleted, then the new ingest fails: the request is retried as any
    other, its next attempt finds no file and ingests; one live file, one event."""
    async with running(make_settings(track_ingestion=False, max_attempts=3)):
        await _send(amqp, names, collector, files, "old", b"old")
        deleted = len(mindset.deletes)

        def after_the_delete(request: Any) -> bool:
            return request.method == "POST" and len(mindset.deletes) > deleted

        rule = mindset.fail_when(after_the_delete, 500)
        url = files.add("/new.txt", b"new", content_type="text/plain")
        await publish(amqp, names.queue, mindset_request(url, "new", externalId="handbook"))
        async with asyncio.timeout(30):
            while rule.calls < 3:  # the new ingest's three in-process tries failed
                await asyncio.sleep(0.05)
        mindset.clear_rule(rule)
        await collector.wait_for_ids({"new"})
    event = data(collector, "new", "courier.upload.succeeded")
    assert event["attempts"] == 2
    [live] = mindset.files
    assert live["contentHash"] == _hash(b"new")


# -- delete ---------------------------------------------------------------------------


def inconvo_delete(rid: str, file_name: str) -> dict[str, Any]:
    return {
        "id": rid,
        "operation": "delete",
        "destination": {"type": "inconvo", "userIdentifier": "user_123", "fileName": file_name},
    }


def mindset_delete(rid: str, external_id: str) -> dict[str, Any]:
    return {
        "id": rid,
        "operation": "delete",
        "destination": {
            "type": "mindset",
            "appUid": "app",
            "contextUid": "ctx",
            "externalId": external_id,
        },
    }


async def test_deletes_at_both_destinations_are_idempotent(
    service_for_mindset: None,
    amqp: AbstractRobustConnection,
    names: Names,
    files: FileServer,
    inconvo: FakeInconvo,
    mindset: FakeMindset,
    collector: EventCollector,
) -> None:
    """A delete of an existing file removes it (existed: true); of a missing one succeeds
    with existed: false; at Inconvo by scope and file name, at Mindset by externalId."""
    await publish(amqp, names.queue, inconvo_request(files.add("/q4.csv", b"1\n"), "up-csv"))
    await publish(
        amqp, names.queue, mindset_request(files.add("/h.pdf", b"%PDF"), "up-pdf", externalId="h")
    )
    await collector.wait_for_ids({"up-csv", "up-pdf"})
    assert len(inconvo.files) == 1 and len(mindset.files) == 1
    deletes = {
        "del-csv": inconvo_delete("del-csv", "q4.csv"),
        "del-csv-again": inconvo_delete("del-csv-again", "q4.csv"),
        "del-pdf": mindset_delete("del-pdf", "h"),
        "del-pdf-again": mindset_delete("del-pdf-again", "h"),
    }
    for rid in ("del-csv", "del-pdf"):
        await publish(amqp, names.queue, deletes[rid])
    await collector.wait_for_ids({"del-csv", "del-pdf"})
    for rid in ("del-csv-again", "del-pdf-again"):
        await publish(amqp, names.queue, deletes[rid])
    await collector.wait_for_ids(set(deletes))
    for rid, existed in (
        ("del-csv", True),
        ("del-pdf", True),
        ("del-csv-again", False),
        ("del-pdf-again", False),
    ):
        event = data(collector, rid, "courier.delete.succeeded")
        assert event["existed"] is existed and event["operation"] == "delete"
        assert event["source"] is None and event["delivery"] is None
    assert inconvo.files == {} and mindset.files == []
    assert [d.file_name for d in inconvo.deletes] == ["q4.csv"]
    assert len(mindset.deletes) == 1


async def test_context_and_agent_scoped_deletes_take_their_routes(stage: Stage) -> None:
    """A context-scoped delete, with an agent and without, removes the file that the
    upload of the same scope made, through the route of that scope."""
    scopes = {
        "ctx": {"contextKey": "team", "contextValue": "blue"},
        "agent-ctx": {"contextKey": "team", "contextValue": "blue", "agentId": "agent-7"},
    }
    async with stage.running(track_ingestion=False):
        for rid, scope in scopes.items():
            url = stage.files.add(f"/{rid}.csv", b"1\n")
            await stage.publish(
                {"id": rid, "source": {"url": url}, "destination": {"type": "inconvo", **scope}}
            )
        await stage.collector.wait_for_ids(set(scopes))
        assert len(stage.inconvo.files) == 2
        for rid, scope in scopes.items():
            destination = {"type": "inconvo", "fileName": f"{rid}.csv", **scope}
            await stage.publish(
                {"id": f"del-{rid}", "operation": "delete", "destination": destination}
            )
        await stage.collector.wait_for_ids({f"del-{rid}" for rid in scopes})
    for rid in scopes:
        assert data(stage.collector, f"del-{rid}", "courier.delete.succeeded")["existed"] is True
    assert stage.inconvo.files == {}
    assert {(d.scope, d.agent_id, d.file_name) for d in stage.inconvo.deletes} == {
        ("userContext/team:blue", None, "ctx.csv"),
        ("userContext/team:blue", "agent-7", "agent-ctx.csv"),
    }


async def test_a_delete_that_keeps_failing_is_retried_then_dead_lettered(stage: Stage) -> None:
    """Inconvo answers every DELETE 500: the delete spends its attempts through the delay
    tiers, as an upload would, then ends in delete.failed and the dead-letter queue."""
    rule = stage.inconvo.fail_when(lambda request: request.method == "DELETE", 500)
    async with stage.running(max_attempts=3):
        await stage.publish(inconvo_delete("del-bad", "x.csv"))
        await stage.collector.wait_for_ids({"del-bad"}, timeout=60)
    event = data(stage.collector, "del-bad", "courier.delete.failed")
    assert event["operation"] == "delete" and event["attempts"] == 3
    assert event["error"]["code"] == "destination_unavailable" and event["error"]["retryable"]
    assert rule.calls >= 3
    letters = await stage.dead_letters()
    assert [orjson.loads(m.body)["id"] for m in letters] == ["del-bad"]
    assert letters[0].headers["x-courier-error-code"] == "destination_unavailable"


async def test_a_delete_is_held_by_an_open_breaker(
    make_settings: Callable[..., Settings],
    amqp: AbstractRobustConnection,
    names: Names,
    files: FileServer,
    inconvo: FakeInconvo,
    collector: EventCollector,
) -> None:
    """Inconvo down: a delete waits, unsent and spending no attempt, while the breaker is
    open, and succeeds once Inconvo is back."""
    settings = make_settings(breaker_threshold=2, breaker_min_requests=2, breaker_cooldown=2)
    inconvo.outage(503)
    async with running(settings) as service:
        bodies = [inconvo_request(files.add(f"/{r}.csv", b"1\n"), r) for r in ("o-1", "o-2")]
        await publish_requests(amqp, names.queue, bodies)
        async with asyncio.timeout(20):
            while service.metrics.breaker_state.labels("inconvo")._value.get() != 2:
                await asyncio.sleep(0.05)
        calls = inconvo.outage_calls
        await publish(amqp, names.queue, inconvo_delete("del-held", "o-1.csv"))
        async with asyncio.timeout(20):
            while service.metrics.held.labels("inconvo")._value.get() < 1:
                await asyncio.sleep(0.05)
        assert not [r for r in inconvo.requests[calls:] if r.method == "DELETE"]
        inconvo.heal()
        await collector.wait_for_ids({"del-held"}, timeout=60)
    event = data(collector, "del-held", "courier.delete.succeeded")
    assert event["attempts"] == 1 and event["existed"] is False
