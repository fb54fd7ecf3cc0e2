"""What operators see: metrics (checked by promtool), JSON logs, and trace propagation."""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import Iterator

import aiohttp
import orjson
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from service.logs import log_context, setup_logging
from service.tracing import otel_enabled, setup_otel, shutdown_otel, use_tracer_provider
from testbed.stage import Stage
from testbed.support import inconvo_request, quiesce
from tests.conftest import INCONVO_KEY, MINDSET_KEY, running

pytestmark = pytest.mark.usefixtures("fast_retries")
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def promtool() -> str:
    """The promtool binary (Debian's prometheus package; `make test` installs it)."""
    path = shutil.which("promtool")
    assert path, "promtool is missing: apt-get install prometheus (make test does this)"
    return path


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape, by name and labels."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


async def test_metrics_scrape_matches_what_happened(
    stage: Stage,
) -> None:
    """After a mixed run, /metrics passes `promtool check metrics` and its counters match the events."""
    good = stage.files.add("/a.csv", b"1,2\n3,4\n")
    # Six 503s in a row would open the breaker (its metrics: tests/flow/test_end_to_end.py).
    async with stage.running(max_attempts=2, breaker_threshold=100) as service:
        for i in range(3):
            await stage.publish(
                {
                    "id": f"ok-{i}",
                    "source": {"url": good},
                    "destination": {"type": "inconvo", "userIdentifier": "u"},
                },
            )
        await stage.publish(b"not json", message_id="garbage")
        await stage.publish(
            inconvo_request(stage.files.url("/none.csv"), "missing"),
        )
        await stage.collector.wait_for(5)
        stage.inconvo.fail_next(503, count=6)
        await stage.publish(
            inconvo_request(good, "retried"),
        )
        await stage.collector.wait_for(6, timeout=30)
        # The counters move once the request is settled, a moment after its event.
        await quiesce(service)
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{service.http_port}/metrics") as answer,
        ):
            assert answer.status == 200
            text = await answer.text()
    check = await asyncio.create_subprocess_exec(
        promtool(),
        "check",
        "metrics",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await check.communicate(text.encode())
    assert check.returncode == 0, out.decode()
    got = samples(text)
    statuses = [e["data"]["status"] for e in stage.collector.events]
    assert (
        got[("courier_requests_total", (("destination", "inconvo"), ("outcome", "succeeded")))]
        == statuses.count("succeeded")
        == 3
    )
    assert got[("courier_requests_total", (("destination", "inconvo"), ("outcome", "failed")))] == 2
    assert got[("courier_requests_total", (("destination", "unknown"), ("outcome", "failed")))] == 1
    assert got[("courier_events_published_total", (("type", "courier.upload.succeeded"),))] == 3
    assert got[("courier_events_published_total", (("type", "courier.upload.failed"),))] == 3
    assert got[("courier_dead_lettered_total", (("error_code", "invalid_request"),))] == 1
    assert got[("courier_dead_lettered_total", (("error_code", "source_not_found"),))] == 1
    assert got[("courier_dead_lettered_total", (("error_code", "destination_unavailable"),))] == 1
    assert (
        got[
            (
                "courier_retries_scheduled_total",
                (("destination", "inconvo"), ("error_code", "destination_unavailable")),
            )
        ]
        == 1
    )
    assert (
        got[
            (
                "courier_destination_requests_total",
                (("destination", "inconvo"), ("status", "200")),
            )
        ]
        == 3
    )
    assert (
        got[
            (
                "courier_destination_requests_total",
                (("destination", "inconvo"), ("status", "503")),
            )
        ]
        == 6
    )
    assert (
        got[("courier_source_bytes_total", (("scheme", "http"),))] == 8 * 5
    )  # 3 successes + 2 attempts
    assert got[("courier_inflight_requests", ())] == 0
    assert got[("courier_broker_connected", ())] == 1
    assert got[("courier_consumer_active", ())] == 1
    assert ("courier_build_info", (("version", "0.1.0"),)) in got
    for _name, labels in got:
        # labels are small fixed sets: never URLs or request ids
        assert all(
            "://" not in v and v not in {"ok-0", "garbage", "missing", "retried"} for _, v in labels
        )


async def test_log_lines_are_json_with_context(
    stage: Stage,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Every log line is one JSON object; request lines carry requestId, correlationId, destination, attempt, errorCode."""
    settings = stage.settings(log_format="json", log_level="INFO")
    setup_logging("json", "INFO", settings.secret_values())
    try:
        async with running(settings):
            await stage.publish(
                inconvo_request(stage.files.url("/nope.csv"), "logged"),
                correlation_id="corr-log",
            )
            await stage.collector.wait_for(1)
        logging.getLogger("third.party").warning("a library speaks")
        with log_context(requestId="r-9"):
            logging.getLogger("service.test").info("inside a request")
    finally:
        for handler in list(logging.getLogger().handlers):
            logging.getLogger().removeHandler(handler)
    lines = capsys.readouterr().err.strip().splitlines()
    records = [orjson.loads(line) for line in lines]
    assert all({"time", "level", "logger", "message"} <= set(r) for r in records)
    failed = [r for r in records if r.get("requestId") == "logged" and r["level"] == "WARNING"]
    assert failed, records
    assert failed[0]["correlationId"] == "corr-log"
    assert failed[0]["destination"] == "inconvo"
    assert failed[0]["attempt"] == 1
    assert failed[0]["errorCode"] == "source_not_found"
    assert any(r["logger"] == "third.party" for r in records)
    assert any(r.get("requestId") == "r-9" for r in records)
    text = "\n".join(lines)
    assert INCONVO_KEY not in text and MINDSET_KEY not in text


async def test_traceparent_flows_through_fetch_delivery_and_event(
    stage: Stage,
) -> None:
    """A request's traceparent reaches the source server, the destination API and the result event."""
    url = stage.files.add("/t.csv", b"1\n")
    async with stage.running():
        await stage.publish(
            inconvo_request(url, "traced"),
            headers={"traceparent": TRACEPARENT},
        )
        await stage.publish(
            inconvo_request(url, "untraced"),
            headers={"traceparent": "not-a-trace"},
        )
        await stage.collector.wait_for(2)
    by_id = {
        e["data"]["requestId"]: m
        for e, m in zip(stage.collector.events, stage.collector.messages, strict=True)
    }
    assert (by_id["traced"].headers or {}).get("traceparent") == TRACEPARENT
    assert "traceparent" not in (by_id["untraced"].headers or {})
    traced_upload = [u for u in stage.inconvo.uploads if u.headers.get("traceparent")]
    assert [u.headers["traceparent"] for u in traced_upload] == [TRACEPARENT]
    seen = [h.get("traceparent") for h in stage.files.hit_headers]
    assert sorted(seen, key=str) == sorted([TRACEPARENT, None], key=str)


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """OpenTelemetry on (as the `otel` extra does), exporting to memory."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    use_tracer_provider(provider)
    yield exporter
    shutdown_otel()


async def test_otel_spans_continue_the_producers_trace(
    stage: Stage,
    spans: InMemorySpanExporter,
) -> None:
    """With OTel on, the request span is a child of the producer's span; fetch and upload are its children, and the calls carry their own span ids."""
    url = stage.files.add("/o.csv", b"1\n")
    async with stage.running():
        await stage.publish(
            inconvo_request(url, "otel"),
            headers={"traceparent": TRACEPARENT},
        )
        await stage.collector.wait_for(1)
    trace_id = int(TRACEPARENT.split("-")[1], 16)
    finished = [s for s in spans.get_finished_spans() if s.context.trace_id == trace_id]
    by_name = {s.name: s for s in finished}
    root = by_name["courier.upload"]
    assert root.parent is not None and root.parent.span_id == int(TRACEPARENT.split("-")[2], 16)
    fetch = by_name["courier.source.fetch"]
    assert fetch.parent is not None and fetch.parent.span_id == root.context.span_id
    http = [s for s in finished if s.name.startswith("HTTP ")]
    assert sorted(s.name for s in http) == ["HTTP GET", "HTTP POST"]
    assert {s.attributes["http.response.status_code"] for s in http if s.attributes} == {200}
    # The destination saw the upload span's id, on the producer's trace.
    (upload,) = stage.inconvo.uploads
    post = next(s for s in http if s.name == "HTTP POST")
    assert upload.headers["traceparent"] == f"00-{trace_id:032x}-{post.context.span_id:016x}-01"
    # The event still carries the request's own traceparent.
    assert (stage.collector.messages[0].headers or {}).get("traceparent") == TRACEPARENT
    assert "://" not in str([s.attributes for s in finished])


def test_otel_stays_off_without_an_exporter() -> None:
    """No OTEL_* exporter configured: no spans, nothing set up."""
    assert setup_otel({}) is False
    assert setup_otel({"OTEL_TRACES_EXPORTER": "none"}) is False
    assert (
        setup_otel(
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", "OTEL_SDK_DISABLED": "true"}
        )
        is False
    )
    assert not otel_enabled()


def test_otel_turns_on_with_an_otlp_endpoint() -> None:
    """An OTLP endpoint in the environment turns spans on (nothing is exported without spans)."""
    try:
        assert setup_otel({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}) is True
        assert otel_enabled()
    finally:
        shutdown_otel()
    assert not otel_enabled()
