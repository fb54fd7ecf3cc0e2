"""The AsyncAPI 3.0 document: checked in, valid by the specification's published JSON Schema,
every reference resolvable, payloads usable, and the configured names in it."""

from __future__ import annotations

import copy
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import orjson

from service.asyncapi import default_document
from service.contracts import json_schemas
from testbed.support import ROOT, courier, courier_env
from tests.regen_schemas import ASYNCAPI_FILE, SCHEMA_DIR, rendered_asyncapi

# The AsyncAPI 3.0.0 JSON Schema from @asyncapi/specs (tests/data/README.md says which release).
SPEC_SCHEMA = Path(__file__).resolve().parents[1] / "data" / "asyncapi-3.0.0.schema.json"


@cache
def _validator() -> jsonschema.Draft7Validator:
    schema = orjson.loads(SPEC_SCHEMA.read_bytes())
    assert schema["$id"] == "http://asyncapi.com/definitions/3.0.0/asyncapi.json"
    return jsonschema.Draft7Validator(schema)


def _problems(document: dict[str, Any]) -> list[str]:
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in _validator().iter_errors(document)
    ]


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [ref for value in node.values() for ref in _refs(value)]
    if isinstance(node, list):
        return [ref for item in node for ref in _refs(item)]
    return []


def _resolve(document: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), f"{ref} points outside the document"
    node: Any = document
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def test_checked_in_document_matches_the_code() -> None:
    """schemas/asyncapi.json is exactly what the code generates (run `make schemas` after a change)."""
    assert (SCHEMA_DIR / ASYNCAPI_FILE).read_bytes() == rendered_asyncapi(), "drifted"


def test_document_is_valid_asyncapi_3() -> None:
    """The published AsyncAPI 3.0.0 JSON Schema accepts the document and rejects a broken copy."""
    document = orjson.loads((SCHEMA_DIR / ASYNCAPI_FILE).read_bytes())
    assert document["asyncapi"] == "3.0.0"
    assert _problems(document) == []
    broken = copy.deepcopy(document)
    broken["channels"]["requests"]["address"] = 42
    del broken["operations"]["receiveRequest"]["action"]
    assert len(_problems(broken)) >= 2


def test_every_reference_resolves_within_the_document() -> None:
    """Each $ref (channels, messages, payload schemas and their definitions) points at something."""
    document = default_document()
    refs = _refs(document)
    assert "#/components/schemas/UploadRequest" in refs
    assert "#/components/schemas/InconvoDestination" in refs
    for ref in refs:
        assert _resolve(document, ref) is not None, ref


def test_payloads_are_the_json_schemas() -> None:
    """The request payload accepts the examples and rejects an unknown field, as schemas/request.schema.json does."""
    document = default_document()
    schemas = document["components"]["schemas"]
    assert set(schemas["UploadRequest"]["properties"]) == set(
        json_schemas()["request"]["properties"]
    )
    assert set(schemas["ResultEvent"]["properties"]) == set(json_schemas()["event"]["properties"])
    request = jsonschema.Draft202012Validator(
        {"$ref": "#/components/schemas/UploadRequest", "components": document["components"]}
    )
    for example in sorted((ROOT / "examples").glob("*.json")):
        body = orjson.loads(example.read_text().replace("${FILES}", "https://files.example"))
        assert list(request.iter_errors(body)) == [], example.name
        assert not request.is_valid({**body, "sourceUrl": "typo"})


def test_defaults_are_the_contract_names() -> None:
    """With no configuration the document names the default queues, tiers and exchange."""
    channels = default_document()["channels"]
    assert [channel["address"] for channel in channels.values()] == [
        "courier.uploads",
        "courier.uploads.retry.10s",
        "courier.uploads.retry.60s",
        "courier.uploads.retry.300s",
        "courier.uploads.retry.1800s",
        "courier.uploads.dead",
        "upload.succeeded",
        "upload.failed",
    ]
    assert channels["requests"]["x-queue-arguments"]["x-queue-type"] == "quorum"
    assert channels["uploadSucceeded"]["bindings"]["amqp"]["exchange"] == {
        "name": "courier.events",
        "type": "topic",
        "durable": True,
        "autoDelete": False,
        "vhost": "/",
    }


async def test_command_names_the_configured_queues_and_exchange() -> None:
    """`courier schema --asyncapi` describes the configured queue, tiers, exchange and broker, no password."""
    env = courier_env(
        COURIER_QUEUE="acme.uploads",
        COURIER_EVENTS_EXCHANGE="acme.events",
        COURIER_RETRY_DELAYS="15s,2m",
        # A one-letter password: the document carries no credentials, and nothing of it is masked.
        COURIER_AMQP_URL="amqp://courier:e@rabbit.internal:5673/prod",
    )
    code, out, _ = await courier("schema", "--asyncapi", env=env)
    assert code == 0
    assert b"courier:e@" not in out and b"***" not in out
    document = orjson.loads(out)
    assert _problems(document) == []
    channels = document["channels"]
    assert {name: channel["address"] for name, channel in channels.items()} == {
        "requests": "acme.uploads",
        "retry15s": "acme.uploads.retry.15s",
        "retry120s": "acme.uploads.retry.120s",
        "dead": "acme.uploads.dead",
        "uploadSucceeded": "upload.succeeded",
        "uploadFailed": "upload.failed",
    }
    for key in ("uploadSucceeded", "uploadFailed"):
        assert channels[key]["bindings"]["amqp"]["exchange"]["name"] == "acme.events"
        assert channels[key]["bindings"]["amqp"]["exchange"]["vhost"] == "prod"
    assert channels["retry15s"]["x-queue-arguments"]["x-dead-letter-routing-key"] == "acme.uploads"
    assert channels["retry15s"]["x-queue-arguments"]["x-message-ttl"] == 15_000
    assert document["servers"] == {
        "rabbitmq": {
            "host": "rabbit.internal:5673",
            "protocol": "amqp",
            "protocolVersion": "0.9.1",
            "pathname": "/prod",
            "description": "A RabbitMQ node of COURIER_AMQP_URL.",
        }
    }
    operations = document["operations"]
    assert operations["receiveRequest"]["action"] == "receive"
    assert operations["publishUploadFailed"]["channel"] == {"$ref": "#/channels/uploadFailed"}
