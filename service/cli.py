"""The ``courier`` command: run, submit, process, dead list|replay, schema."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

import aio_pika
import orjson

from service.broker import copy_message, declare_queue, main_queue_arguments
from service.config import ConfigError, Settings, load_settings
from service.errors import CourierError
from service.events import build_event
from service.logs import setup_logging
from service.messages import ATTEMPT_HEADER, Envelope, parse_request, request_id
from service.runtime import Service, limit_malloc_arenas, pipeline_for
from service.tracing import setup_otel, shutdown_otel

EXIT_CONFIG = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="courier", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="consume requests until SIGTERM/SIGINT")
    for name, text in (
        ("submit", "validate a request and publish it"),
        ("process", "run one request locally, without a broker; print its event"),
    ):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("file", help="request JSON file, or - for stdin")
    dead = sub.add_parser("dead", help="inspect or replay dead letters")
    dead.add_argument("action", choices=("list", "replay"))
    dead.add_argument("--limit", type=int, default=100, help="at most this many (default 100)")
    sub.add_parser("schema", help="print the request and event JSON Schemas")
    return parser


def _read(path: str) -> bytes:
    if path == "-":
        return sys.stdin.buffer.read()
    with open(path, "rb") as handle:
        return handle.read()


def _print_json(value: Any) -> None:
    sys.stdout.write(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode() + "\n")
    sys.stdout.flush()


async def _process(settings: Settings, body: bytes) -> int:
    envelope = Envelope.from_properties(
        message_id=None, correlation_id=None, reply_to=None, headers=None
    )
    request = parse_request(body, settings.max_message_bytes)
    async with pipeline_for(settings) as pipeline:
        outcome = await pipeline.process(request)
    event = build_event(
        event_source=settings.event_source,
        request_id=request_id(request.id, envelope),
        attempts=1,
        metadata=request.metadata,
        outcome=outcome,
    )
    _print_json(event.to_json_dict())
    return 0 if outcome.succeeded else 1


async def _submit(settings: Settings, body: bytes) -> int:
    request = parse_request(body, settings.max_message_bytes)
    rid = request.id or request_id(None, Envelope(None, None, None, None, 1, 0))
    connection = await aio_pika.connect(settings.amqp_url, timeout=10)
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        # Declaring (idempotently) makes sure the request cannot vanish unrouted.
        await declare_queue(channel, settings.queue, main_queue_arguments(settings))
        await channel.default_exchange.publish(
            aio_pika.Message(
                body=body,
                content_type="application/json",
                message_id=rid,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            routing_key=settings.queue,
            timeout=settings.publish_timeout,
        )
    _print_json({"submitted": rid, "queue": settings.queue})
    return 0


def _dead_entry(message: aio_pika.abc.AbstractIncomingMessage) -> dict[str, Any]:
    headers = message.headers or {}
    return {
        "messageId": message.message_id,
        "errorCode": headers.get("x-courier-error-code"),
        "errorMessage": headers.get("x-courier-error-message"),
        "attempts": headers.get("x-courier-attempts"),
        "failedAt": headers.get("x-courier-failed-at"),
        "body": message.body.decode("utf-8", "replace"),
    }


async def _dead(settings: Settings, action: str, limit: int) -> int:
    connection = await aio_pika.connect(settings.amqp_url, timeout=10)
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        queue = await declare_queue(channel, settings.dead_queue, {})
        await declare_queue(channel, settings.queue, main_queue_arguments(settings))
        done = 0
        while done < limit:
            message = await queue.get(no_ack=False, fail=False, timeout=10)
            if message is None:
                break
            done += 1
            if action == "list":
                _print_json(_dead_entry(message))
                continue  # left unacked: closing the channel puts it back
            headers = {
                k: v
                for k, v in (message.headers or {}).items()
                if k not in (ATTEMPT_HEADER, "x-death", "x-delivery-count")
                and not k.startswith("x-courier-")
                and not k.startswith("x-first-death")
                and not k.startswith("x-last-death")
            }
            await channel.default_exchange.publish(
                copy_message(message, headers),
                routing_key=settings.queue,
                timeout=settings.publish_timeout,
            )
            await message.ack()
        if action == "replay":
            _print_json({"replayed": done, "queue": settings.queue})
        await channel.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``courier`` command."""
    args = _parser().parse_args(argv)
    if args.command == "schema":
        from service.contracts import json_schemas

        _print_json(json_schemas())
        return 0
    try:
        settings = load_settings()
    except ConfigError as exc:
        sys.stderr.write(f"courier: configuration error: {exc}\n")
        return EXIT_CONFIG
    setup_logging(settings.log_format, settings.log_level, settings.secret_values())
    try:
        if args.command == "run":
            limit_malloc_arenas()
            setup_otel()
            try:
                asyncio.run(Service(settings).run())
            finally:
                shutdown_otel()
            return 0
        if args.command == "process":
            return asyncio.run(_process(settings, _read(args.file)))
        if args.command == "submit":
            return asyncio.run(_submit(settings, _read(args.file)))
        return asyncio.run(_dead(settings, args.action, args.limit))
    except CourierError as exc:
        sys.stderr.write(f"courier: {exc.code.value}: {exc.message}\n")
        return 1
    except KeyboardInterrupt:
        return 130
