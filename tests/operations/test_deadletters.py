"""Dead letters by code, destination, time and request id: list, replay (paced, dry-run) and purge."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import aio_pika
import orjson
import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractRobustConnection

from service import deadletters
from service.amqp.declare import declare_queue
from service.deadletters import Selection
from service.messages import Envelope, decode
from service.runtime import Service
from service.topology import (
    ATTEMPT_HEADER,
    ATTEMPTS_HEADER,
    DELIVERY_COUNT_HEADER,
    ERROR_CODE_HEADER,
    ERROR_MESSAGE_HEADER,
    FAILED_AT_HEADER,
    Topology,
)
from testbed.support import (
    AMQP_URL,
    Names,
    closed_port,
    courier,
    courier_env,
    drain,
    inconvo_request,
    wait_until,
)
from testbed.timing import assert_at_least
from testbed.virtual_time import run_virtual
from tests.conftest import TEST_DELAYS

NOW = datetime.now(UTC)


@dataclass(frozen=True)
class Seed:
    """A dead letter as Courier writes it."""

    rid: str
    code: str
    destination: str
    age: timedelta
    body: bytes | None = None  # None: a valid request for ``destination``

    def raw(self) -> bytes:
        if self.body is not None:
            return self.body
        if self.destination == "mindset":
            destination = {"type": "mindset", "appUid": "app", "contextUid": "ctx"}
        else:
            destination = {"type": "inconvo", "userIdentifier": "user_123"}
        return orjson.dumps(
            {
                "id": self.rid,
                "source": {"url": f"s3://b/{self.rid}.csv"},
                "destination": destination,
            }
        )

    def headers(self) -> dict[str, Any]:
        return {
            ERROR_CODE_HEADER: self.code,
            ERROR_MESSAGE_HEADER: f"{self.code} for {self.rid}",
            ATTEMPTS_HEADER: 3,
            ATTEMPT_HEADER: 3,
            FAILED_AT_HEADER: (NOW - self.age).isoformat(timespec="milliseconds"),
        }


SEEDS = [
    Seed("a", "destination_unavailable", "inconvo", timedelta(hours=3)),
    Seed("b", "destination_rejected", "mindset", timedelta(minutes=30)),
    Seed("c", "source_not_found", "inconvo", timedelta(minutes=10)),
    Seed("d", "destination_unavailable", "mindset", timedelta(minutes=1)),
    Seed("e", "invalid_request", "inconvo", timedelta(days=5), body=b"{not json"),
    Seed("f", "destination_unavailable", "inconvo", timedelta(minutes=2)),
]


def _topology(names: Names) -> Topology:
    return Topology.build(
        queue=names.queue,
        events_exchange=names.events_exchange,
        retry_delays=TEST_DELAYS,
        max_redeliveries=5,
    )


async def _seed(amqp: AbstractRobustConnection, names: Names, seeds: list[Seed]) -> None:
    channel = await amqp.channel(publisher_confirms=True)
    await declare_queue(channel, _topology(names).dead)
    for seed in seeds:
        await channel.default_exchange.publish(
            aio_pika.Message(
                body=seed.raw(),
                headers=seed.headers(),
                message_id=seed.rid,
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            routing_key=names.dead_queue,
            timeout=10,
        )
    await channel.close()


@pytest.fixture
async def channel(amqp: AbstractRobustConnection) -> AsyncIterator[AbstractChannel]:
    """A channel with publisher confirms, as the dead commands use."""
    chan = await amqp.channel(publisher_confirms=True, on_return_raises=True)
    yield chan
    await chan.close()


async def _contents(amqp: AbstractRobustConnection, queue: str) -> list[AbstractIncomingMessage]:
    return [message async for message in drain(amqp, queue)]


def _ids(messages: list[AbstractIncomingMessage]) -> list[str | None]:
    return [message.message_id for message in messages]


@pytest.mark.parametrize(
    ("selection", "limit", "expected"),
    [
        (Selection(codes=frozenset({"destination_unavailable"})), None, "adf"),
        (Selection(destinations=frozenset({"mindset"})), None, "bd"),
        (Selection(since=NOW - timedelta(hours=1)), None, "bcdf"),
        (Selection(request_ids=frozenset({"c", "e"})), None, "ce"),
        (
            Selection(
                codes=frozenset({"destination_unavailable"}),
                destinations=frozenset({"inconvo"}),
                since=NOW - timedelta(hours=1),
            ),
            None,
            "f",
        ),
        (Selection(codes=frozenset({"destination_unavailable"})), 2, "ad"),
        (Selection(), None, "abcdef"),
    ],
    ids=["code", "destination", "since", "request-id", "all-three", "limit", "no-filter"],
)
async def test_each_filter_selects_exactly_its_letters(
    amqp: AbstractRobustConnection,
    names: Names,
    channel: AbstractChannel,
    selection: Selection,
    limit: int | None,
    expected: str,
) -> None:
    """A filter selects exactly its letters; listing leaves every letter, byte for byte, in its order."""
    await _seed(amqp, names, SEEDS)
    result = await deadletters.sweep(channel, _topology(names), "list", selection, limit=limit)
    assert [letter.request_id for letter in result.handled] == list(expected)
    assert result.visited == len(SEEDS)
    left = await _contents(amqp, names.dead_queue)
    assert _ids(left) == list("abcdef")
    for message, seed in zip(left, SEEDS, strict=True):
        assert message.body == seed.raw()
        headers = dict(message.headers or {})
        # Quorum queues count deliveries: still 0, as the letters were never handed back.
        assert headers.pop(DELIVERY_COUNT_HEADER, 0) == 0
        assert headers == seed.headers()
        assert message.content_type == "application/json"


async def test_replay_moves_only_matching_letters_and_keeps_the_rest_in_order(
    amqp: AbstractRobustConnection, names: Names, channel: AbstractChannel
) -> None:
    """Replay moves the matching letters (bookkeeping stripped, id kept); the others stay, in order."""
    await _seed(amqp, names, SEEDS)
    topology = _topology(names)
    # A request queue from an older Courier (classic): the broker refuses Courier's
    # declare and closes the channel, and the replay goes on with the queue as it is.
    classic = await amqp.channel()
    await classic.declare_queue(names.queue, durable=True)
    await classic.close()
    result = await deadletters.sweep(
        channel, topology, "replay", Selection(codes=frozenset({"destination_unavailable"}))
    )
    assert [letter.request_id for letter in result.handled] == ["a", "d", "f"]
    replayed = await _contents(amqp, names.queue)
    assert _ids(replayed) == ["a", "d", "f"]
    by_id = {seed.rid: seed for seed in SEEDS}
    for message in replayed:
        assert message.body == by_id[str(message.message_id)].raw()
        assert not any(k.startswith("x-courier-") for k in message.headers or {})
    assert _ids(await _contents(amqp, names.dead_queue)) == ["b", "c", "e"]


async def test_purge_deletes_only_the_matching_letters(
    amqp: AbstractRobustConnection, names: Names, channel: AbstractChannel
) -> None:
    """Purge deletes exactly the matching letters and moves nothing to the request queue."""
    await _seed(amqp, names, SEEDS)
    result = await deadletters.sweep(
        channel, _topology(names), "purge", Selection(destinations=frozenset({"mindset"}))
    )
    assert [letter.request_id for letter in result.handled] == ["b", "d"]
    assert _ids(await _contents(amqp, names.dead_queue)) == ["a", "c", "e", "f"]
    channel2 = await amqp.channel()
    with pytest.raises(aio_pika.exceptions.ChannelNotFoundEntity):
        await channel2.declare_queue(names.queue, passive=True)


def _dead_lettered(service: Service) -> float:
    return sum(
        sample.value
        for metric in service.metrics.registry.collect()
        if metric.name == "courier_dead_lettered"
        for sample in metric.samples
        if sample.name == "courier_dead_lettered_total"
    )


async def test_a_letter_that_fails_again_is_replayed_once(
    amqp: AbstractRobustConnection,
    names: Names,
    channel: AbstractChannel,
    service: Service,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A replayed letter that the running service fails straight back is not taken again in the same run."""
    pdf = [
        Seed(rid, "unsupported_type", "inconvo", timedelta(minutes=5), body=orjson.dumps(body))
        for rid, body in (
            ("x1", inconvo_request("https://files.example/x1.pdf", "x1")),
            ("x2", inconvo_request("https://files.example/x2.pdf", "x2")),
        )
    ]
    others = [
        Seed(rid, "source_not_found", "inconvo", timedelta(minutes=5)) for rid in ("n1", "n2")
    ]
    await _seed(amqp, names, [*pdf, *others])
    paced = deadletters._Pace.wait

    async def after_x1_is_back(pace: Any) -> None:
        # The pass goes on to x2 only once the service failed x1 straight back into the
        # dead queue (dead-lettered and confirmed), however long that takes.
        if pace._next:
            await wait_until(lambda: _dead_lettered(service) >= 1, 20, "x1 failed back")
        await paced(pace)

    monkeypatch.setattr(deadletters._Pace, "wait", after_x1_is_back)
    result = await deadletters.sweep(
        channel,
        _topology(names),
        "replay",
        Selection(codes=frozenset({"unsupported_type"})),
        limit=10,
        rate=100,
    )
    monkeypatch.undo()
    assert [letter.request_id for letter in result.handled] == ["x1", "x2"]
    assert result.visited == 4
    dead = await channel.declare_queue(names.dead_queue, passive=True)
    async with asyncio.timeout(10):
        while dead.declaration_result.message_count != 4:
            await asyncio.sleep(0.05)
            dead = await channel.declare_queue(names.dead_queue, passive=True)
    left = await _contents(amqp, names.dead_queue)
    ids = _ids(left)
    assert sorted(ids, key=str) == ["n1", "n2", "x1", "x2"]
    # x1 was back before the pass ended (it heads the queue) and was left alone.
    assert ids[0] == "x1" and ids.index("n1") < ids.index("n2")
    for message in left:
        if str(message.message_id).startswith("x"):
            assert message.headers is not None
            assert message.headers[ERROR_CODE_HEADER] == "unsupported_type"
            assert message.headers[ATTEMPTS_HEADER] == 1


def _env(names: Names) -> dict[str, str]:
    return courier_env(
        COURIER_QUEUE=names.queue, COURIER_RETRY_DELAYS=",".join(f"{d}s" for d in TEST_DELAYS)
    )


async def test_list_prints_a_table_or_json(amqp: AbstractRobustConnection, names: Names) -> None:
    """`courier dead list` prints a readable table, `--json` the letters; both leave them in place."""
    await _seed(amqp, names, SEEDS)
    code, out, _ = await courier(
        "dead", "list", "--code", "destination_unavailable", "--since", "1h", env=_env(names)
    )
    assert code == 0
    lines = out.decode().splitlines()
    assert lines[0].split() == [
        "REQUEST",
        "ID",
        "CODE",
        "DESTINATION",
        "ATTEMPTS",
        "FAILED",
        "AT",
        "MESSAGE",
    ]
    assert [line.split()[:4] for line in lines[1:3]] == [
        ["d", "destination_unavailable", "mindset", "3"],
        ["f", "destination_unavailable", "inconvo", "3"],
    ]
    assert lines[1].endswith("destination_unavailable for d")
    assert lines[-1] == f"2 of 6 letters in {names.dead_queue} matched; showing 2"
    # A cluster whose first node is down: the next one is used.
    with closed_port() as down:
        cluster = f"amqp://guest:guest@127.0.0.1:{down}/,{AMQP_URL}"
        code, out, err = await courier(
            "dead",
            "list",
            "--request-id",
            "e",
            "--json",
            env={**_env(names), "COURIER_AMQP_URL": cluster},
        )
    assert code == 0, err.decode()
    report = orjson.loads(out)
    [letter] = report["letters"]
    assert letter["requestId"] == "e" and letter["errorCode"] == "invalid_request"
    assert letter["body"] == "{not json" and letter["destination"] is None
    assert report["matching"] == 1 and report["inQueue"] == 6
    assert _ids(await _contents(amqp, names.dead_queue)) == list("abcdef")


async def test_dry_run_moves_nothing_and_purge_needs_yes(
    amqp: AbstractRobustConnection, names: Names
) -> None:
    """`replay --dry-run` and `purge` without --yes change nothing; `purge --yes` deletes the matching letters."""
    await _seed(amqp, names, SEEDS)
    code, out, _ = await courier(
        "dead", "replay", "--destination", "mindset", "--dry-run", env=_env(names)
    )
    assert code == 0
    text = out.decode()
    assert text.splitlines()[-1] == (
        f"2 of 6 letters in {names.dead_queue} matched; dry run: would replay 2 to "
        f"{names.queue}, nothing was moved"
    )
    code, _, err = await courier("dead", "purge", "--destination", "mindset", env=_env(names))
    assert code == 2 and b"--yes" in err
    channel = await amqp.channel()
    dead = await channel.declare_queue(names.dead_queue, passive=True)
    assert dead.declaration_result.message_count == 6
    with pytest.raises(aio_pika.exceptions.ChannelNotFoundEntity):
        await channel.declare_queue(names.queue, passive=True)
    code, out, _ = await courier(
        "dead", "purge", "--destination", "mindset", "--yes", "--json", env=_env(names)
    )
    assert code == 0 and orjson.loads(out)["purged"] == 2
    assert _ids(await _contents(amqp, names.dead_queue)) == list("acef")


def test_the_pace_spaces_replays_by_the_rate() -> None:
    """At most ``rate`` per second, the first at once: on virtual time, exactly 0.25 s apart."""

    async def paced() -> list[float]:
        loop = asyncio.get_running_loop()
        pace, times = deadletters._Pace(4), []
        for _ in range(8):
            await pace.wait()
            times.append(loop.time())
        return times

    times = run_virtual(paced(), clocks=[deadletters])
    assert times == pytest.approx([i * 0.25 for i in range(8)])


def test_a_late_replay_does_not_let_the_pace_run_ahead() -> None:
    """A publish that took long (a slow broker) is no licence to burst: the k-th replay never
    goes before k intervals from the first."""

    async def paced() -> list[float]:
        loop = asyncio.get_running_loop()
        pace, times = deadletters._Pace(4), []
        for i in range(8):
            await pace.wait()
            times.append(loop.time())
            if i == 2:
                await asyncio.sleep(1.0)  # this publish took a second
        return times

    times = run_virtual(paced(), clocks=[deadletters])
    assert all(t >= i * 0.25 - 1e-9 for i, t in enumerate(times)), times
    assert all(b - a >= 0.25 - 1e-9 for a, b in itertools.pairwise(times[3:])), times


async def test_replay_is_paced_as_it_publishes(
    amqp: AbstractRobustConnection,
    names: Names,
    channel: AbstractChannel,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A replay at rate 4 against the real broker: timed where it publishes (not where a
    consumer happens to see the letters), the k-th goes at least k/4 s after the first."""
    seeds = [Seed(f"r{i}", "destination_unavailable", "inconvo", timedelta()) for i in range(8)]
    await _seed(amqp, names, seeds)
    published: list[float] = []
    paced = deadletters._Pace.wait

    async def timed(pace: Any) -> None:
        await paced(pace)
        published.append(asyncio.get_running_loop().time())

    monkeypatch.setattr(deadletters._Pace, "wait", timed)
    result = await deadletters.sweep(channel, _topology(names), "replay", Selection(), rate=4)
    assert len(result.handled) == 8
    for k, at in enumerate(published):
        if k:
            # A floor: load can only make the replay slower than its rate.
            assert_at_least(f"replay {k} after the first", at - published[0], k / 4)
    assert _ids(await _contents(amqp, names.queue)) == [f"r{i}" for i in range(8)]


async def test_replay_rate_reaches_the_command(
    amqp: AbstractRobustConnection, names: Names
) -> None:
    """`courier dead replay --rate 4` replays every letter, says its rate, and how far it got on stderr (the pace itself: the tests above)."""
    seeds = [Seed(f"r{i}", "destination_unavailable", "inconvo", timedelta()) for i in range(8)]
    await _seed(amqp, names, seeds)
    code, out, err = await courier("dead", "replay", "--rate", "4", env=_env(names))
    assert code == 0
    assert (
        out.decode().splitlines()[-1].endswith(f"replayed 8 to {names.queue} at most 4 per second")
    )
    assert _ids(await _contents(amqp, names.queue)) == [f"r{i}" for i in range(8)]
    assert b"courier dead replay: " in err and b"letters looked at" in err


@dataclass
class _Letter:
    """A dead letter as the broker hands it over, without a message_id (aio-pika and
    aiormq make one up for every publish; other clients, pika or amqplib, do not)."""

    body: bytes
    headers: dict[str, Any]
    message_id: str | None = None


_DEEP = b'{"id": "r-deep", "x": ' + b"[" * 40 + b"]" * 40 + b"}"


@pytest.mark.parametrize(
    "body",
    [orjson.dumps(inconvo_request("https://files.example/a.csv")), _DEEP],
    ids=["no-id", "unreadable-with-an-id"],
)
def test_a_letter_is_found_by_the_id_its_event_carries(body: bytes) -> None:
    """A request with neither `id` nor `message_id`, or a body the service could not read
    (nested too deep) and so gave a derived id, is listed, replayed or purged by the id
    its events carry."""
    event_id = decode(body, Envelope(), 1 << 20).request_id
    letter = deadletters.Letter.from_message(
        cast(
            AbstractIncomingMessage,
            _Letter(body, Seed("-", "invalid_request", "inconvo", timedelta()).headers()),
        ),
        1 << 20,
    )
    assert letter.request_id == event_id
    assert Selection(request_ids=frozenset({event_id})).matches(letter)
