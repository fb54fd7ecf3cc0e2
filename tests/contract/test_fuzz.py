"""Property-based: hostile message bodies never crash or wedge the consumer."""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import aio_pika
import aiohttp
import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from service.config import Settings
from service.contracts import InconvoDestination, MindsetDestination, SourceSpec, UploadRequest
from service.runtime import Service
from testbed.support import AMQP_URL, EventCollector, Names, delete_topology, publish, quiesce

T = TypeVar("T")
MAX_BYTES = 64 * 1024
# The blocking run: the same bodies every time (derandomized), so a failure is the
# code's and repeats. The soak tier explores at random, many more.
CI_EXAMPLES = 100
SOAK_EXAMPLES = 1000


class Rig:
    """A service, a collector and a connection running on their own loop in a thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.names = Names.fresh()
        self.ids = itertools.count()
        self.published: list[str] = []

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        """Run ``coro`` on the rig's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def start(self) -> None:
        """Start the service and the collector."""
        self.connection = await aio_pika.connect_robust(AMQP_URL)
        self.collector = await EventCollector(self.connection, self.names.events_exchange).start()
        self.service = Service(
            Settings(
                amqp_url=AMQP_URL,
                queue=self.names.queue,
                events_exchange=self.names.events_exchange,
                http_host="127.0.0.1",
                http_port=0,
                max_message_bytes=MAX_BYTES,
                log_level="WARNING",
            )
        )
        self.task = asyncio.create_task(self.service.run(install_signals=False))
        async with asyncio.timeout(20):
            while not await self.service.ready():
                await asyncio.sleep(0.05)

    async def stop(self) -> None:
        """Stop everything and remove the test's queues."""
        self.service.request_stop()
        await self.task
        await self.connection.close()
        await delete_topology(self.names, (10, 60, 300, 1800))

    async def readyz(self) -> int:
        """The /readyz status code."""
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{self.service.http_port}/readyz") as answer,
        ):
            return answer.status


@pytest.fixture(scope="module")
def rig() -> Iterator[Rig]:
    """One running service for all the generated bodies."""
    rig = Rig()
    rig.thread.start()
    rig.call(rig.start())
    yield rig
    rig.call(rig.stop())
    rig.loop.call_soon_threadsafe(rig.loop.stop)
    rig.thread.join(10)
    rig.loop.close()


json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False),
    st.text(max_size=50),
)
json_value = st.recursive(
    json_leaf,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


def _dumps(value: Any) -> bytes:
    # The standard library writes integers of any size, as a hostile producer might.
    return json.dumps(value).encode()


def _nested(depth: int) -> bytes:
    return b'{"a":' * depth + b"1" + b"}" * depth


# Bodies that would be valid but for one thing: an unknown field set to null, or a URL
# no fetch could use. Without an API key configured, a valid one would end
# destination_not_configured, so the test tells them apart.
VALID_SOURCE = {"url": "https://files.example/a.pdf"}
DESTINATIONS: dict[str, dict[str, Any]] = {
    "inconvo": {"type": "inconvo", "userIdentifier": "user_1"},
    "mindset": {"type": "mindset", "appUid": "app", "contextUid": "ctx"},
}
KNOWN_FIELDS = {
    *UploadRequest.model_fields,
    *SourceSpec.model_fields,
    *InconvoDestination.model_fields,
    *MindsetDestination.model_fields,
}


def _with_unknown_null(where: str, kind: str, name: str) -> bytes:
    body: dict[str, Any] = {"source": dict(VALID_SOURCE), "destination": dict(DESTINATIONS[kind])}
    target = {"top": body, "source": body["source"]}.get(where, body["destination"])
    target[name] = None
    return _dumps(body)


unknown_null = st.builds(
    _with_unknown_null,
    st.sampled_from(["top", "source", "destination"]),
    st.sampled_from(sorted(DESTINATIONS)),
    st.text(min_size=1, max_size=12).filter(lambda name: name not in KNOWN_FIELDS),
)

label = st.sampled_from(["a", "files", "x9", "example", "courier-test"])
out_of_range_port = st.one_of(st.just(0), st.integers(min_value=65536, max_value=10**9))
odd_host = st.one_of(
    st.sampled_from(["xn--", "xn--zz", "xn--zz.example", "[::1", "[zz]", "-", ".", "..", ".a"]),
    st.builds(  # two labels joined by something no host name holds
        lambda a, sep, b: a + sep + b,
        label,
        st.sampled_from(["..", " ", "\u200b", "%", "<", ">", "^", "|", "\u3002\u3002"]),
        label,
    ),
)
bad_url = st.builds(
    "{}://{}/a.pdf".format,
    st.sampled_from(["http", "https"]),
    st.one_of(
        st.builds(
            "{}:{}".format,
            st.sampled_from(["127.0.0.1", "files.example", "[::1]", "localhost"]),
            out_of_range_port,
        ),
        odd_host,
    ),
)


def _with_url(where: str, url: str) -> bytes:
    kind = "inconvo" if where == "inconvo source" else "mindset"
    body: dict[str, Any] = {"source": dict(VALID_SOURCE), "destination": dict(DESTINATIONS[kind])}
    if where.endswith("source"):
        body["source"]["url"] = url
    else:
        body["destination"][where] = url
    return _dumps(body)


unusable_url = st.builds(
    _with_url,
    st.sampled_from(["inconvo source", "mindset source", "thumbnailUrl", "externalUrl"]),
    bad_url,
)


hostile = st.one_of(
    unknown_null,
    unusable_url,
    st.binary(max_size=200),  # arbitrary bytes, mostly invalid UTF-8 / not JSON
    st.text(max_size=200).map(str.encode),
    json_value.map(_dumps),  # valid JSON of the wrong shape
    st.integers(min_value=33, max_value=20000).map(_nested),  # absurd nesting
    st.integers(min_value=MAX_BYTES + 1, max_value=MAX_BYTES * 3).map(
        lambda n: b'{"id":"' + b"x" * n + b'"}'
    ),
    st.builds(  # the right shape with wrong types or unknown fields
        lambda source, destination, extra: _dumps(
            {"source": source, "destination": destination, **extra}
        ),
        json_value,
        st.fixed_dictionaries(
            {"type": st.sampled_from(["inconvo", "mindset", "other", 7])},
            optional={"userIdentifier": json_value, "appUid": json_value},
        ),
        st.dictionaries(
            st.sampled_from(["metadata", "id", "unknown", "Source"]), json_value, max_size=2
        ),
    ),
    st.integers(min_value=10**30, max_value=10**60).map(
        lambda n: b'{"source": {"url": "http://x/a.csv"}, "destination": ' + str(n).encode() + b"}"
    ),
    st.sampled_from(
        [
            b"\xff\xfe\xfd",
            b"\xc3\x28",
            b'{"a": "\xed\xa0\x80"}',
            b"",
            b"null",
            b"[]",
            b'"str"',
            b"1e999999",
        ]
    ),
)


def check_one(rig: Rig, body: bytes) -> None:
    """One hostile body ends in exactly one invalid_request event; the service stays ready."""
    mid = f"fuzz-{next(rig.ids)}"
    rig.published.append(mid)
    # A body may carry a valid "id" of its own, which then names the request; the
    # correlation id finds the event either way.
    rig.call(publish(rig.connection, rig.names.queue, body, message_id=mid, correlation_id=mid))
    [event] = rig.call(rig.collector.for_correlation(mid))
    assert event["data"]["status"] == "failed"
    assert event["data"]["error"]["code"] == "invalid_request"
    assert event["subject"] == event["data"]["requestId"]
    if event["subject"] != mid:
        assert orjson.loads(body)["id"] == event["subject"]
    assert rig.call(rig.readyz()) == 200


def fuzz(rig: Rig, *, examples: int, derandomize: bool) -> None:
    """``examples`` hostile bodies (and the known hard ones), each through :func:`check_one`."""

    @settings(
        max_examples=examples,
        derandomize=derandomize,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(body=hostile)
    @example(body=b'{"id": "its-own-id", "source": {"url": 7}}')
    @example(body=_with_url("inconvo source", "http://127.0.0.1:99999/x.csv"))
    @example(body=_with_url("inconvo source", "http://xn--/x.csv"))
    @example(body=_with_unknown_null("top", "inconvo", "typo"))
    @example(body=_with_unknown_null("destination", "mindset", "nmae"))
    def each(body: bytes) -> None:
        check_one(rig, body)

    each()


def check_drained(rig: Rig) -> None:
    """All generated bodies were settled: queue empty, all dead-lettered, /readyz 200."""

    async def check() -> tuple[int, int, int]:
        # Each dead letter is published after its event: wait until none is in flight.
        await quiesce(rig.service)
        channel = await rig.connection.channel()
        main = await channel.declare_queue(rig.names.queue, passive=True)
        dead = await channel.declare_queue(rig.names.dead_queue, passive=True)
        await channel.close()
        return (
            main.declaration_result.message_count or 0,
            dead.declaration_result.message_count or 0,
            await rig.readyz(),
        )

    queued, dead, status = rig.call(check())
    assert queued == 0
    assert dead == len(rig.published)
    assert status == 200
    assert len(rig.collector.events) == len(rig.published)


@pytest.mark.timeout(180)
def test_hostile_bodies_each_get_one_invalid_request_event(rig: Rig) -> None:
    """Each of 100 hostile bodies (the same ones every run) ends in exactly one invalid_request event, the service stays ready, and afterwards the queue is drained and every body dead-lettered."""
    fuzz(rig, examples=CI_EXAMPLES, derandomize=True)
    assert len(rig.published) >= CI_EXAMPLES
    check_drained(rig)


@pytest.mark.soak
@pytest.mark.timeout(1800)
def test_hostile_bodies_at_random(rig: Rig) -> None:
    """The same property over 1,000 random hostile bodies, new ones every run: exploration for the soak tier (a failure prints the body to add as an @example)."""
    fuzz(rig, examples=SOAK_EXAMPLES, derandomize=False)
    check_drained(rig)
