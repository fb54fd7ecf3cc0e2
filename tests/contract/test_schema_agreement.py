"""The published request schema against Courier: the fuzz corpus and near-valid requests fed
to both, the disagreements counted. Only the rules docs/producing.md lists as beyond JSON
Schema may disagree, and only one way: the schema accepting what Courier refuses."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import jsonschema
import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from service.contracts import json_schemas
from service.errors import CourierError
from service.messages import parse_request
from service.prechecks import offline_checks
from testbed.support import ROOT
from tests.contract.test_fuzz import MAX_BYTES, hostile

VALIDATOR = jsonschema.Draft202012Validator(json_schemas()["request"])
PRODUCING = (ROOT / "docs" / "producing.md").read_text()
# Courier's reasons that no JSON Schema can state, each with the words docs/producing.md
# uses for it in "What the JSON Schema cannot tell".
BEYOND_SCHEMA: dict[str, tuple[re.Pattern[str], str]] = {
    "utf16": (re.compile(r"UTF-16"), "UTF-16 code units"),
    "url": (
        re.compile(r"usable URL|has no host|port must be|host is neither"),
        "well formed beyond its scheme",
    ),
    "s3-key": (re.compile(r"percent-encoding is not UTF-8|S3 key has at most"), "S3 key"),
    "body": (re.compile(r"the body is \d+ bytes|nests deeper"), "nesting depth"),
}
BASES: dict[str, dict[str, Any]] = {
    "inconvo-user": {
        "id": "req-1",
        "source": {"url": "https://files.example.com/2024/q4.csv"},
        "destination": {"type": "inconvo", "userIdentifier": "user_123"},
        "metadata": {"tenant": "acme"},
    },
    "inconvo-context": {
        "source": {"url": "s3://reports/2024/q4.json"},
        "destination": {"type": "inconvo", "contextKey": "orgId", "contextValue": "org_456"},
    },
    "mindset": {
        "source": {"url": "https://files.example.com/handbook.pdf"},
        "destination": {"type": "mindset", "appUid": "app", "contextUid": "ctx"},
    },
}
ABSENT = object()
NAMES = ["a.csv", "b.JSON ", "a.exe", "../a.csv", "a/b.csv", "a\nb.csv", "", " ", "x" * 256, None]
MUTATIONS: dict[str, list[Any]] = {
    "id": ["", "x" * 201, 7, None, "ok", ABSENT],
    "source.url": [
        "x",
        "ftp://files.example.com/a.csv",
        "HTTPS://files.example.com/a.csv",
        "https://files.example.com/a.xlsx",
        "https://files.example.com/dir.xlsx/",
        "https://files.example.com",
        "https://files.example.com/",
        "https://files.example.com/a",
        "https://files.example.com/a.CSV?x=1",
        "https://files.example.com/a.b.pdf#frag",
        "https://files.example.com/.hidden",
        "https://files.example.com/...",
        "https://files.example.com/" + "a" * 2040 + ".csv",
        "http://127.0.0.1:99999/a.csv",
        "s3://reports/a.csv",
        "s3://reports/a.csv?versionId=v1",
        "s3://reports/a.csv?other=1",
        "s3://ab/a.csv",
        "s3://reports/a#b.csv",
        "s3://reports/",
        "s3://reports/k.txt",
        "s3://reports/" + "k" * 4090,
        7,
        None,
    ],
    "source.fileName": [*NAMES, ABSENT],
    "source.contentType": ["text/csv", "ab", "te\x01xt", None, ABSENT],
    "source.typo": ["x"],
    "destination.type": ["inconvo", "mindset", "other", 7, ABSENT],
    "destination.userIdentifier": ["u", "u u", "u" * 257, "a@b.c", None, ABSENT],
    "destination.contextKey": ["orgId", "org@id", None, ABSENT],
    "destination.contextValue": ["org_456", "o o", None, ABSENT],
    "destination.fileName": [*NAMES, ABSENT],
    "destination.userId": ["u"],
    "destination.appUid": ["app", "", None, ABSENT],
    "destination.contextUid": ["ctx", "", ABSENT],
    "destination.mimeType": ["text/plain", "video/mp4", "application/pdf", "image/png", ABSENT],
    "destination.delivery": ["auto", "sourceUrl", "documentContent", "email", ABSENT],
    "destination.name": ["n" * 100, "n" * 101, "\U0001f600" * 60, ""],
    "destination.externalUrl": ["https://x.example/t", "ftp://x.example/t", "javascript:alert(1)"],
    "destination.thumbnailUrl": ["https://x.example/t.png", "http://127.0.0.1:99999/t.png"],
    "destination.labels": [["a"], [""], ["l"] * 11, "one"],
    "destination.autoPublish": [True, "true"],
    "metadata": [{}, {"k": "v"}, {"": "v"}, {"k" * 201: "v"}, {"k": "v" * 2049}, {"k": 1}, []],
}


def _mutated(base: str, changes: list[tuple[str, Any]]) -> bytes:
    doc = copy.deepcopy(BASES[base])
    for path, value in changes:
        *parents, last = path.split(".")
        node = doc
        for key in parents:
            node = node.setdefault(key, {}) if isinstance(node, dict) else {}
        if not isinstance(node, dict):
            continue
        if value is ABSENT:
            node.pop(last, None)
        else:
            node[last] = value
    return orjson.dumps(doc)


near_valid = st.builds(
    _mutated,
    st.sampled_from(sorted(BASES)),
    st.lists(
        st.sampled_from(sorted(MUTATIONS)).flatmap(
            lambda path: st.tuples(st.just(path), st.sampled_from(MUTATIONS[path]))
        ),
        max_size=3,
    ),
)


def courier_verdict(body: bytes) -> CourierError | None:
    """What Courier decides before any I/O: None for accepted, else the error."""
    try:
        offline_checks(parse_request(body, MAX_BYTES))
    except CourierError as error:
        return error
    return None


def beyond_schema(error: CourierError, document: Any) -> str | None:
    """Which listed rule refused it, when it is one no schema can state."""
    for name, (pattern, _) in BEYOND_SCHEMA.items():
        if pattern.search(error.message):
            return name
    destination = document.get("destination") if isinstance(document, dict) else None
    kind = destination.get("type") if isinstance(destination, dict) else None
    if error.code.value == "unsupported_type" and kind == "mindset":
        return "mindset-type"  # inferred from the file name and contentType
    if error.code.value == "unsupported_type" and "%" in str(document["source"].get("url")):
        return "percent-encoded-name"
    return None


def disagreement(body: bytes) -> str | None:
    """None when the schema and Courier agree (or the schema cannot see the body)."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None  # not JSON: nothing for a schema to judge; Courier refuses it
    error = courier_verdict(body)
    schema_accepts = VALIDATOR.is_valid(document)
    if schema_accepts == (error is None):
        return None
    if error is None:
        return f"the schema refuses what Courier accepts: {body[:300]!r}"
    if beyond_schema(error, document):
        return None
    return f"the schema accepts what Courier refuses ({error.code.value}: {error.message})"


@settings(
    max_examples=600,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(body=st.one_of(hostile, near_valid, near_valid))
@example(body=b'{"source": {"url": "x"}, "destination": {"type": "inconvo"}}')
def test_schema_and_courier_agree_on_the_fuzz_corpus(body: bytes) -> None:
    """Zero disagreements beyond the listed rules."""
    assert disagreement(body) is None


def _single_and_paired_mutations(base: str) -> list[bytes]:
    """``base`` with every single change, and with every pair of changes to the source and
    the destination (for ``mindset``, also every mimeType with every delivery): the corpus
    no random draw is needed for."""
    source = [(p, v) for p in MUTATIONS if p.startswith("source.") for v in MUTATIONS[p]]
    destination = [(p, v) for p in MUTATIONS if p.startswith("destination.") for v in MUTATIONS[p]]
    bodies = [_mutated(base, [(p, v)]) for p in MUTATIONS for v in MUTATIONS[p]]
    bodies += [_mutated(base, [a, b]) for a in source for b in destination]
    if base == "mindset":
        bodies += [
            _mutated(base, [("destination.mimeType", m), ("destination.delivery", d)])
            for m in MUTATIONS["destination.mimeType"]
            for d in MUTATIONS["destination.delivery"]
        ]
    return bodies


# One base at a time: each is CPU work alone (seconds here, several times that under
# `make flake`'s load), kept well inside the per-test timeout, which guards against hangs.
@pytest.mark.parametrize("base", sorted(BASES))
def test_schema_and_courier_agree_on_every_single_and_paired_change(base: str) -> None:
    """Zero disagreements beyond the listed rules, over hundreds of near-valid requests
    per base."""
    bodies = _single_and_paired_mutations(base)
    found = [d for d in map(disagreement, bodies) if d is not None]
    assert len(bodies) > 2500
    assert not found, f"{len(found)} disagreements, first: {found[:5]}"


@pytest.mark.parametrize(
    "document",
    [
        {"source": {"url": "x"}, "destination": {"type": "inconvo"}},
        {
            "source": {"url": "https://f.example/a.csv"},
            "destination": {
                "type": "inconvo",
                "userIdentifier": "u",
                "contextKey": "k",
                "contextValue": "v",
            },
        },
        {
            "source": {"url": "https://f.example/a.csv"},
            "destination": {"type": "inconvo", "userIdentifier": "u", "fileName": "a.exe"},
        },
        {
            "source": {"url": "https://f.example/" + "a" * 2040 + ".csv"},
            "destination": {"type": "inconvo", "userIdentifier": "u"},
        },
        {
            "source": {"url": "ftp://f.example/a.csv"},
            "destination": {"type": "inconvo", "userIdentifier": "u"},
        },
        {
            "source": {"url": "https://f.example/a.xlsx"},
            "destination": {"type": "inconvo", "userIdentifier": "u"},
        },
    ],
    ids=["no-scope-no-scheme", "both-scopes", "exe-file-name", "url-2049", "ftp", "xlsx"],
)
def test_requests_courier_refuses_the_schema_refuses(document: dict[str, Any]) -> None:
    """The cases a producer met: each fails both."""
    assert courier_verdict(orjson.dumps(document)) is not None
    assert not VALIDATOR.is_valid(document)


def test_the_docs_list_every_rule_beyond_the_schema() -> None:
    """docs/producing.md names each rule the agreement test lets through."""
    section = PRODUCING.split("### What the JSON Schema cannot tell", 1)[1]
    for _, words in BEYOND_SCHEMA.values():
        assert words in section
    assert "type Courier infers" in section and "percent-encoded" in section


def test_the_schemas_describe_themselves() -> None:
    """$schema, a description for every property, examples, no pydantic property titles."""
    for name, schema in json_schemas().items():
        jsonschema.Draft202012Validator.check_schema(schema)
        assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        for where, definition in [("", schema), *schema.get("$defs", {}).items()]:
            for prop, rules in definition.get("properties", {}).items():
                assert rules.get("description"), f"{name} {where}.{prop}"
                assert "title" not in rules, f"{name} {where}.{prop}"
    request = json_schemas()["request"]
    assert request["$defs"]["UploadRequest"]["properties"]["id"]["examples"] == ["req-2024-q4-0001"]


def test_the_event_schema_takes_extensions_and_names_every_error_code() -> None:
    """CloudEvents extension attributes pass; error.code is an enum of the codes."""
    schema = json_schemas()["event"]
    validator = jsonschema.Draft202012Validator(schema)
    sample = orjson.loads(Path(ROOT / "examples/events/upload.failed.json").read_bytes())
    assert validator.is_valid({**sample, "traceparent": "00-ab-cd-01", "partitionkey": "acme"})
    assert not validator.is_valid({**sample, "Not-An-Extension": 1})
    assert not validator.is_valid(
        {
            **sample,
            "data": {**sample["data"], "error": {**sample["data"]["error"], "code": "made_up"}},
        }
    )
    codes = schema["$defs"]["ErrorCode"]["enum"]
    assert "source_not_found" in codes and "invalid_request" in codes
