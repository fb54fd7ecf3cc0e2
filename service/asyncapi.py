"""The AsyncAPI 3.0 document of Courier's queues, exchange and messages.

``courier schema --asyncapi`` prints it; ``schemas/asyncapi.json`` holds it for the default names.

Written from Courier's side: it receives requests, sends events, delay-tier
copies and dead letters. Payloads are the JSON Schemas of ``service.contracts``,
their ``$defs`` moved to ``components/schemas`` so every ``$ref`` resolves
within this one document.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any
from urllib.parse import unquote, urlsplit

from service.config import Settings
from service.contracts import json_schemas
from service.errors import ErrorCode
from service.topology import (
    ATTEMPT_HEADER,
    ATTEMPTS_HEADER,
    ERROR_CODE_HEADER,
    ERROR_MESSAGE_HEADER,
    FAILED_AT_HEADER,
    FAILED_KEY,
    SUCCEEDED_KEY,
    TRACEPARENT_HEADER,
    QueueSpec,
    Topology,
)

ASYNCAPI_VERSION = "3.0.0"
_AMQP_BINDING = "0.3.0"
_SCHEMAS = "#/components/schemas/"
_MESSAGES = "#/components/messages/"


def _courier_version() -> str:
    try:
        return version("upload-courier")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0.0.0"


def _payload_schemas() -> dict[str, Any]:
    """The request and event schemas and their definitions, all under one namespace."""
    schemas: dict[str, Any] = {}
    for name, schema in (
        ("UploadRequest", json_schemas()["request"]),
        ("ResultEvent", json_schemas()["event"]),
    ):
        body = {k: v for k, v in schema.items() if k not in ("$defs", "$id")}
        for def_name, definition in schema.get("$defs", {}).items():
            if def_name in schemas:
                raise ValueError(f"two payload schemas define {def_name}")
            schemas[def_name] = definition
        schemas[name] = body
    rewritten: dict[str, Any] = _rewrite_refs(schemas)
    return rewritten


def _rewrite_refs(node: Any) -> Any:
    """``$defs`` references made document-wide; OpenAPI's discriminator object becomes the
    AsyncAPI Schema Object's discriminator, the property name."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                out[key] = value.replace("#/$defs/", _SCHEMAS)
            elif key == "discriminator" and isinstance(value, dict):
                out[key] = value["propertyName"]
            else:
                out[key] = _rewrite_refs(value)
        return out
    if isinstance(node, list):
        return [_rewrite_refs(item) for item in node]
    return node


def _queue_channel(spec: QueueSpec, vhost: str, description: str, message: str) -> dict[str, Any]:
    return {
        "address": spec.name,
        "title": spec.name,
        "description": description,
        "messages": {message: {"$ref": _MESSAGES + message}},
        "bindings": {
            "amqp": {
                "is": "queue",
                "queue": {
                    "name": spec.name,
                    "durable": True,
                    "exclusive": False,
                    "autoDelete": False,
                    "vhost": vhost,
                },
                "bindingVersion": _AMQP_BINDING,
            }
        },
        "x-queue-arguments": dict(spec.arguments),
    }


def _event_channel(routing_key: str, exchange: str, vhost: str, message: str) -> dict[str, Any]:
    return {
        "address": routing_key,
        "title": f"{exchange} {routing_key}",
        "description": f"Result events on the topic exchange {exchange}, routing key "
        f"{routing_key}. Event consumers bind their own queues to it.",
        "messages": {message: {"$ref": _MESSAGES + message}},
        "bindings": {
            "amqp": {
                "is": "routingKey",
                "exchange": {
                    "name": exchange,
                    "type": "topic",
                    "durable": True,
                    "autoDelete": False,
                    "vhost": vhost,
                },
                "bindingVersion": _AMQP_BINDING,
            }
        },
    }


def _operation(action: str, channel: str, message: str, text: str) -> dict[str, Any]:
    return {
        "action": action,
        "channel": {"$ref": f"#/channels/{channel}"},
        "messages": [{"$ref": f"#/channels/{channel}/messages/{message}"}],
        "summary": text,
        "bindings": {"amqp": _operation_binding(action)},
    }


def _operation_binding(action: str) -> dict[str, Any]:
    if action == "send":  # persistent, confirmed, returned when unroutable
        return {"deliveryMode": 2, "mandatory": True, "bindingVersion": _AMQP_BINDING}
    return {"ack": True, "bindingVersion": _AMQP_BINDING}


def _servers(amqp_urls: tuple[str, ...]) -> dict[str, Any]:
    servers: dict[str, Any] = {}
    for number, url in enumerate(amqp_urls, start=1):
        parts = urlsplit(url)
        port = parts.port or (5671 if parts.scheme == "amqps" else 5672)
        name = "rabbitmq" if len(amqp_urls) == 1 else f"rabbitmq-{number}"
        servers[name] = {
            "host": f"{parts.hostname}:{port}",
            "protocol": parts.scheme,
            "protocolVersion": "0.9.1",
            "pathname": "/" + unquote(parts.path[1:]) if len(parts.path) > 1 else "/",
            "description": "A RabbitMQ node of COURIER_AMQP_URL.",
        }
    return servers


def _vhost(amqp_url: str) -> str:
    path = urlsplit(amqp_url).path
    return unquote(path[1:]) if len(path) > 1 else "/"


def document(settings: Settings) -> dict[str, Any]:
    """The AsyncAPI 3.0 document for the names and knobs of ``settings``."""
    topology = Topology.from_settings(settings)
    vhost = _vhost(settings.amqp_urls[0])
    exchange = topology.events_exchange
    channels: dict[str, Any] = {
        "requests": _queue_channel(
            topology.requests,
            vhost,
            "Upload requests. Producers publish to the default exchange with this queue's "
            "name as the routing key; Courier consumes them.",
            "uploadRequest",
        ),
    }
    operations: dict[str, Any] = {
        "receiveRequest": _operation(
            "receive", "requests", "uploadRequest", "Take an upload request and carry it out."
        ),
    }
    for spec in topology.tiers:
        channel = f"retry{spec.delay}s"
        channels[channel] = _queue_channel(
            spec,
            vhost,
            f"Delay tier: a request that failed transiently waits {spec.delay} s here, then "
            f"the broker dead-letters it back to {topology.requests.name}.",
            "retryRequest",
        )
        operations[f"scheduleRetry{spec.delay}s"] = _operation(
            "send", channel, "retryRequest", f"Retry a request in {spec.delay} s."
        )
    channels["dead"] = _queue_channel(
        topology.dead,
        vhost,
        "Requests that ended in failure, kept byte for byte with the reason in headers; "
        "`courier dead list|replay|purge` handles them.",
        "deadLetter",
    )
    operations["deadLetter"] = _operation(
        "send", "dead", "deadLetter", "Keep a failed request, with why it failed."
    )
    for key, channel, message, text in (
        (SUCCEEDED_KEY, "uploadSucceeded", "uploadSucceeded", "An upload succeeded."),
        (FAILED_KEY, "uploadFailed", "uploadFailed", "An upload failed for good."),
    ):
        channels[channel] = _event_channel(key, exchange, vhost, message)
        operations[f"publish{channel[0].upper()}{channel[1:]}"] = _operation(
            "send", channel, message, text
        )
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": "Courier",
            "version": _courier_version(),
            "description": "Takes upload requests off RabbitMQ, fetches each file from S3 or "
            "HTTP(S), delivers it to Inconvo or Mindset AI, and publishes the outcome as a "
            "CloudEvent. Every request taken ends in one terminal event (at-least-once), a "
            "delay tier, or the dead-letter queue.",
            "license": {"name": "Apache-2.0"},
        },
        "servers": _servers(settings.amqp_urls),
        "defaultContentType": "application/json",
        "channels": channels,
        "operations": operations,
        "components": {"messages": _messages(), "schemas": _payload_schemas()},
    }


def _messages() -> dict[str, Any]:
    trace = {
        TRACEPARENT_HEADER: {
            "type": "string",
            "description": "W3C trace context; continued into the fetch, the upload and "
            "the result event.",
        }
    }
    request = {"$ref": _SCHEMAS + "UploadRequest"}
    event = {"$ref": _SCHEMAS + "ResultEvent"}
    return {
        "uploadRequest": {
            "name": "uploadRequest",
            "title": "Upload request",
            "contentType": "application/json",
            "summary": "AMQP properties used: message_id (the request id when the body "
            "has none), correlation_id (copied to the event), reply_to (the event is "
            "also sent there).",
            "headers": {"type": "object", "properties": trace},
            "payload": request,
        },
        "retryRequest": {
            "name": "retryRequest",
            "title": "Delayed retry",
            "contentType": "application/json",
            "summary": "The request byte for byte, with the attempt it runs next.",
            "headers": {
                "type": "object",
                "properties": {
                    **trace,
                    ATTEMPT_HEADER: {"type": "integer", "minimum": 2},
                },
            },
            "payload": request,
        },
        "deadLetter": {
            "name": "deadLetter",
            "title": "Dead letter",
            "contentType": "application/json",
            "summary": "The original request byte for byte (a body too broken to parse is "
            "kept as it came), with why it failed.",
            "headers": {
                "type": "object",
                "required": [ERROR_CODE_HEADER, ATTEMPTS_HEADER, FAILED_AT_HEADER],
                "properties": {
                    **trace,
                    ERROR_CODE_HEADER: {"type": "string", "enum": [c.value for c in ErrorCode]},
                    ERROR_MESSAGE_HEADER: {"type": "string"},
                    ATTEMPTS_HEADER: {"type": "integer", "minimum": 0},
                    FAILED_AT_HEADER: {"type": "string", "format": "date-time"},
                },
            },
            "payload": request,
        },
        "uploadSucceeded": {
            "name": "uploadSucceeded",
            "title": "courier.upload.succeeded",
            "contentType": "application/cloudevents+json",
            "summary": "CloudEvents 1.0, structured mode; message_id is the event id.",
            "headers": {"type": "object", "properties": trace},
            "payload": event,
        },
        "uploadFailed": {
            "name": "uploadFailed",
            "title": "courier.upload.failed",
            "contentType": "application/cloudevents+json",
            "summary": "CloudEvents 1.0, structured mode; data.error says why.",
            "headers": {"type": "object", "properties": trace},
            "payload": event,
        },
    }


def default_document() -> dict[str, Any]:
    """The document for the default settings, whatever the environment says (``schemas/``)."""
    return document(Settings.model_construct())
