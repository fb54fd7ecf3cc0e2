"""The ``courier`` command: run, submit, process, dead, doctor, schema."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Iterable
from datetime import datetime
from typing import Any

import aio_pika
import orjson
from aio_pika.abc import AbstractConnection

from service import deadletters
from service.amqp.declare import declare_queue
from service.config import (
    SECRET_VARIABLES,
    ConfigError,
    Settings,
    load_settings,
    unknown_variables,
)
from service.contracts import DESTINATIONS
from service.errors import CourierError, ErrorCode
from service.logs import setup_logging
from service.messages import Envelope, parse_request, request_id
from service.redact import SecretFilter, mask_text, redact_url
from service.topology import Topology

EXIT_CONFIG = 2
log = logging.getLogger(__name__)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError("must be above 0")
    return value


def _codes(text: str) -> list[str]:
    codes = [code.strip() for code in text.split(",") if code.strip()]
    known = {code.value for code in ErrorCode}
    for code in codes:
        if code not in known:
            raise argparse.ArgumentTypeError(f"{code!r} is not one of {', '.join(sorted(known))}")
    return codes


def _since(text: str) -> datetime:
    try:
        return deadletters.parse_since(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _dead_parser(sub: Any) -> None:
    dead = sub.add_parser("dead", help="list, replay or purge dead letters, filtered")
    actions = dead.add_subparsers(dest="action", required=True)
    filters = argparse.ArgumentParser(add_help=False)
    filters.add_argument(
        "--code", type=_codes, action="extend", default=[], help="error code(s), comma-separated"
    )
    filters.add_argument("--destination", choices=DESTINATIONS, action="append", default=[])
    filters.add_argument(
        "--since", type=_since, help="failed at or after: a duration (2h, 30m) or an ISO 8601 time"
    )
    filters.add_argument("--request-id", action="append", default=[], help="request id(s)")
    filters.add_argument("--json", action="store_true", help="print JSON instead of a table")
    listing = actions.add_parser("list", parents=[filters], help="print dead letters; they stay")
    listing.add_argument("--limit", type=_positive_int, default=100, help="default 100")
    replay = actions.add_parser(
        "replay", parents=[filters], help="move matching letters back to the request queue"
    )
    purge = actions.add_parser("purge", parents=[filters], help="delete matching letters")
    for cmd in (replay, purge):
        cmd.add_argument("--limit", type=_positive_int, help="at most this many (default all)")
        cmd.add_argument(
            "--dry-run", action="store_true", help="print what would be done; change nothing"
        )
    replay.add_argument("--rate", type=_positive_float, help="at most this many per second")
    purge.add_argument("--yes", action="store_true", help="really delete")


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
    _dead_parser(sub)
    doctor = sub.add_parser("doctor", help="check the configuration and every dependency")
    doctor.add_argument("--json", action="store_true", help="print the checks as JSON")
    doctor.add_argument(
        "--management-url",
        help="RabbitMQ management API, to compare queue arguments "
        "(default: the first broker's host, port 15672)",
    )
    schema = sub.add_parser("schema", help="print the request and event JSON Schemas")
    schema.add_argument(
        "--asyncapi", action="store_true", help="print the AsyncAPI 3 document instead"
    )
    return parser


def _read(path: str) -> bytes:
    if path == "-":
        return sys.stdin.buffer.read()
    with open(path, "rb") as handle:
        return handle.read()


def _print(text: str, secrets: Iterable[str] = ()) -> None:
    """Write command output to stdout, every configured secret masked as the logs mask it."""
    sys.stdout.write(mask_text(text, SecretFilter(secrets).secrets) + "\n")
    sys.stdout.flush()


def _print_json(value: Any, secrets: Iterable[str] = ()) -> None:
    _print(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode(), secrets)


async def _connect(settings: Settings) -> AbstractConnection:
    """A connection to the first node of COURIER_AMQP_URL that answers."""
    urls = settings.amqp_urls
    for url in urls[:-1]:
        try:
            return await aio_pika.connect(url, timeout=10)
        except (aio_pika.exceptions.AMQPConnectionError, OSError, TimeoutError):
            log.warning("broker node %s does not answer; trying the next", redact_url(url))
    return await aio_pika.connect(urls[-1], timeout=10)


async def _process(settings: Settings, body: bytes) -> int:
    from service.events import build_event
    from service.runtime import pipeline_for

    envelope = Envelope()
    request = parse_request(body, settings.max_message_bytes)
    async with pipeline_for(settings) as pipeline:
        outcome = await pipeline.process(request, request_id(request.id, envelope, body))
    event = build_event(
        event_source=settings.event_source,
        request_id=request_id(request.id, envelope, body),
        attempts=1,
        metadata=request.metadata,
        outcome=outcome,
    )
    # The same masking as the logs of `courier run`: an event must not show a secret.
    _print_json(event, settings.secret_values())
    return 0 if outcome.succeeded else 1


async def _submit(settings: Settings, body: bytes) -> int:
    request = parse_request(body, settings.max_message_bytes)
    rid = request_id(request.id, Envelope(), body)
    connection = await _connect(settings)
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        # Declaring (idempotently) makes sure the request cannot vanish unrouted.
        await declare_queue(channel, Topology.from_settings(settings).requests)
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


async def _dead(settings: Settings, args: argparse.Namespace) -> int:
    if args.action == "purge" and not (args.yes or args.dry_run):
        sys.stderr.write(
            "courier: purge deletes dead letters for good: add --yes "
            "(--dry-run, or `courier dead list` with the same filters, shows which)\n"
        )
        return EXIT_CONFIG
    topology = Topology.from_settings(settings)
    selection = deadletters.Selection(
        codes=frozenset(args.code),
        destinations=frozenset(args.destination),
        since=args.since,
        request_ids=frozenset(args.request_id),
    )

    def progress(sweep: deadletters.Sweep) -> None:
        sys.stderr.write(
            f"courier dead {args.action}: {sweep.visited} of {sweep.in_queue} letters looked at, "
            f"{sweep.matching} matching\n"
        )
        sys.stderr.flush()

    connection = await _connect(settings)
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        result = await deadletters.sweep(
            channel,
            topology,
            args.action,
            selection,
            limit=args.limit,
            rate=getattr(args, "rate", None),
            dry_run=getattr(args, "dry_run", False),
            publish_timeout=settings.publish_timeout,
            progress=progress,
        )
        await channel.close()
    secrets = settings.secret_values()
    if args.json:
        _print_json(deadletters.as_json(result, topology), secrets)
        return 0
    if result.handled:
        _print(deadletters.table(result.handled), secrets)
    _print(deadletters.summary(result, topology, getattr(args, "rate", None)), secrets)
    return 0


def _environment_secrets() -> list[str]:
    # Read straight from the environment when the settings themselves cannot be loaded.
    return [value for name in SECRET_VARIABLES if (value := os.environ.get(name))]


def _doctor(args: argparse.Namespace) -> int:
    from service import doctor

    # Doctor reports connection failures itself; the libraries' own records would repeat them.
    setup_logging("console", "WARNING", _environment_secrets())
    logging.getLogger("aiormq").setLevel(logging.CRITICAL)
    checks = asyncio.run(doctor.diagnose(management_url=args.management_url))
    try:
        secrets = load_settings().secret_values()
    except ConfigError:
        secrets = []
    secrets += _environment_secrets()
    if args.json:
        _print_json(doctor.as_json(checks), secrets)
    else:
        _print(doctor.render(checks), secrets)
    return 0 if doctor.passed(checks) else 1


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``courier`` command."""
    args = _parser().parse_args(argv)
    if args.command == "schema" and not args.asyncapi:
        from service.contracts import json_schemas

        _print_json(json_schemas())
        return 0
    if args.command == "doctor":
        return _doctor(args)
    try:
        settings = load_settings()
    except ConfigError as exc:
        sys.stderr.write(f"courier: configuration error: {exc}\n")
        return EXIT_CONFIG
    setup_logging(settings.log_format, settings.log_level, settings.secret_values())
    try:
        if args.command == "schema":
            from service.asyncapi import document

            _print_json(document(settings))  # names and addresses only, never credentials
            return 0
        if args.command == "run":
            for name, nearest in unknown_variables():
                log.warning(
                    "%s is not a Courier variable and is ignored%s",
                    name,
                    f" (did you mean {nearest}?)" if nearest else "",
                )
            # Imported here: the other commands start faster without the service's machinery.
            from service.runtime import Service, limit_malloc_arenas
            from service.tracing import setup_otel, shutdown_otel

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
        return asyncio.run(_dead(settings, args))
    except CourierError as exc:
        sys.stderr.write(f"courier: {exc.code.value}: {exc.message}\n")
        return 1
    except KeyboardInterrupt:
        return 130
