"""The request and event models, and the checked-in JSON Schemas."""

from __future__ import annotations

import copy
from typing import Any

import jsonschema
import orjson
import pytest

from service.contracts import UploadRequest, json_schemas
from service.errors import ErrorCode, PermanentError
from service.messages import parse_request
from tests.regen_schemas import SCHEMA_DIR, rendered

INCONVO: dict[str, Any] = {
    "id": "req-1",
    "source": {"url": "s3://reports/2024/sales.csv"},
    "destination": {"type": "inconvo", "userIdentifier": "user_123", "notes": "Q4"},
    "metadata": {"tenant": "acme"},
}
MINDSET: dict[str, Any] = {
    "source": {"url": "https://files.example/doc.pdf"},
    "destination": {"type": "mindset", "appUid": "app", "contextUid": "ctx"},
}


def _with(base: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(base)
    *parents, last = path.split(".")
    node = doc
    for key in parents:
        node = node[key]
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value
    return doc


_DELETE = object()


def _invalid(doc: dict[str, Any]) -> str:
    with pytest.raises(PermanentError) as info:
        parse_request(orjson.dumps(doc), 1 << 20)
    assert info.value.code is ErrorCode.INVALID_REQUEST
    return info.value.message


def test_valid_requests_parse() -> None:
    """Both destination kinds parse, with defaults filled in."""
    inconvo = parse_request(orjson.dumps(INCONVO), 1 << 20)
    assert inconvo.destination.type == "inconvo"
    assert inconvo.metadata == {"tenant": "acme"}
    mindset = parse_request(orjson.dumps(MINDSET), 1 << 20)
    assert mindset.destination.type == "mindset"
    assert mindset.destination.delivery == "auto"
    assert mindset.metadata == {}


def test_null_counts_as_absent() -> None:
    """Optional fields given as null take their defaults."""
    doc = _with(_with(MINDSET, "metadata", None), "destination.delivery", None)
    request = parse_request(orjson.dumps(doc), 1 << 20)
    assert request.metadata == {}
    assert request.destination.delivery == "auto"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("path", "value", "mentions"),
    [
        ("extra", 1, "extra"),
        ("source.typo", "x", "typo"),
        ("destination.userIdentifer", "x", "userIdentifer"),
        ("id", "", "id"),
        ("id", "x" * 201, "id"),
        ("id", 7, "id"),
        ("source.url", "https://" + "a" * 2050, "2048"),
        ("source", _DELETE, "source"),
        ("destination", _DELETE, "destination"),
        ("destination.type", "dropbox", "destination"),
        ("destination.userIdentifier", "user 1", "userIdentifier"),
        ("destination.userIdentifier", "u" * 257, "userIdentifier"),
        ("destination.fileName", "../etc/passwd.csv", "fileName"),
        ("destination.fileName", "a/b.csv", "fileName"),
        ("destination.fileName", "a\r\nb.csv", "fileName"),
        ("metadata", {"k": 1}, "metadata"),
        ("metadata", {f"k{i}": "v" for i in range(51)}, "metadata"),
        ("metadata", ["a"], "metadata"),
    ],
)
def test_inconvo_rules(path: str, value: Any, mentions: str) -> None:
    """Each broken rule of the Inconvo request is invalid_request naming the field."""
    assert mentions in _invalid(_with(INCONVO, path, value))


def test_inconvo_needs_exactly_one_scope() -> None:
    """userIdentifier and a context scope exclude each other; one is required."""
    both = _with(_with(INCONVO, "destination.contextKey", "orgId"), "destination.contextValue", "o")
    assert "exactly one scope" in _invalid(both)
    neither = _with(INCONVO, "destination.userIdentifier", _DELETE)
    assert "exactly one scope" in _invalid(neither)
    half = _with(neither, "destination.contextKey", "orgId")
    assert "contextValue" in _invalid(half)
    context = _with(half, "destination.contextValue", "org_456")
    assert parse_request(orjson.dumps(context), 1 << 20).destination.type == "inconvo"
    assert "contextKey" in _invalid(_with(context, "destination.contextKey", "org@id"))


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("destination.appUid", ""),
        ("destination.name", "n" * 101),
        ("destination.mimeType", "image/png"),
        ("destination.delivery", "email"),
        ("destination.zipType", "z" * 21),
        ("destination.knownAs", "k" * 201),
        ("destination.externalUrl", "u" * 2049),
        ("destination.thumbnail", "t" * 65537),
        ("destination.contentHash", "h" * 201),
        ("destination.runId", "r" * 201),
        ("destination.labels", [f"l{i}" for i in range(11)]),
        ("destination.autoPublish", "true"),
        ("destination.labels", "one"),
    ],
)
def test_mindset_limits(path: str, value: Any) -> None:
    """The Mindset API's field limits are checked up front."""
    _invalid(_with(MINDSET, path, value))


@pytest.mark.parametrize(
    ("mime", "delivery"),
    [
        ("text/plain", "sourceUrl"),
        ("video/mp4", "documentContent"),
        ("application/zip", "documentContent"),
        (
            "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
            "documentContent",
        ),
    ],
)
def test_mindset_forbidden_delivery(mime: str, delivery: str) -> None:
    """An explicit delivery the API forbids for the type is invalid_request."""
    doc = _with(_with(MINDSET, "destination.mimeType", mime), "destination.delivery", delivery)
    assert "delivered" in _invalid(doc)


def test_checked_in_schemas_match_the_models() -> None:
    """schemas/*.json are exactly what the models generate (run `make schemas` after a change)."""
    for file_name, content in rendered().items():
        assert (SCHEMA_DIR / file_name).read_bytes() == content, f"{file_name} drifted"


def test_schema_agrees_with_the_model() -> None:
    """The published request schema accepts what the model accepts and rejects unknown fields."""
    schema = json_schemas()["request"]
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    assert validator.is_valid(INCONVO)
    assert validator.is_valid(MINDSET)
    assert not validator.is_valid(_with(INCONVO, "typo", 1))
    assert not validator.is_valid(_with(INCONVO, "destination.type", "dropbox"))
    assert UploadRequest.model_validate(INCONVO).id == "req-1"
