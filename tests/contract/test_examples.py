"""examples/: every request is one Courier accepts (offline checks included), and every sample
event is valid against the checked-in event schema and the event model."""

from __future__ import annotations

from pathlib import Path

import jsonschema
import orjson
import pytest

from service.contracts import IngestionEvent, ResultEvent, UploadRequest
from service.messages import parse_request
from service.prechecks import offline_checks
from testbed.support import ROOT

EXAMPLES = ROOT / "examples"
REQUESTS = sorted(EXAMPLES.glob("*.json")) + sorted((EXAMPLES / "failures").glob("*.json"))
EVENTS = sorted((EXAMPLES / "events").glob("*.json"))


@pytest.mark.parametrize("path", REQUESTS, ids=lambda p: p.name)
def test_example_requests_are_valid(path: Path) -> None:
    """Each example parses and passes the checks `courier submit` runs; its files exist."""
    request = parse_request(path.read_bytes(), 1024 * 1024)
    offline_checks(request)
    if not isinstance(request, UploadRequest):
        return  # a delete names no file to fetch
    url = request.source.url
    prefix = "http://127.0.0.1:8765/" if url.startswith("http") else "s3://courier-examples/"
    assert url.startswith(prefix)
    if "failures" not in path.parts:
        assert (EXAMPLES / "files" / url.removeprefix(prefix)).is_file()


def test_examples_cover_both_outcomes_a_file_state_and_a_delete() -> None:
    """A sample of each upload outcome, of an ingestion event, and of a delete."""
    assert {orjson.loads(p.read_bytes())["type"] for p in EVENTS} == {
        "courier.upload.succeeded",
        "courier.upload.failed",
        "courier.ingestion.completed",
        "courier.delete.succeeded",
    }


@pytest.mark.parametrize("path", EVENTS, ids=lambda p: p.name)
def test_sample_events_match_the_schema_and_the_model(path: Path) -> None:
    """Each sample event validates against schemas/event.schema.json and the ResultEvent model."""
    schema = orjson.loads((ROOT / "schemas" / "event.schema.json").read_bytes())
    event = orjson.loads(path.read_bytes())
    jsonschema.Draft202012Validator(schema).validate(event)
    model = IngestionEvent if event["type"].startswith("courier.ingestion.") else ResultEvent
    assert model.model_validate(event).to_json_dict() == event
    assert path.name == event["type"].removeprefix("courier.") + ".json"
