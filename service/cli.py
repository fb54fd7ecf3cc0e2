"""The ``courier`` command: run, submit, process, events, dead, doctor, schema.

A user's mistake (a missing file, a broker that does not answer, a port in
use, a request that cannot succeed) ends in one ``courier: ...`` line on
stderr and a documented exit status (:mod:`service.cli_args`), never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Iterable, Mapping
from typing import Any

import aio_pika
import aiormq
import orjson
from aio_pika.abc import AbstractConnection

from service import deadletters
from service.amqp.link import CONNECTION_ERRORS
from service.cli_args import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_TIMEOUT,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    parser,
)
from service.config import (
    SECRET_VARIABLES,
    ConfigError,
    Settings,
    load_settings,
    unknown_variables,
)
from service.errors import CourierError
from service.logs import setup_logging
from service.messages import Envelope, decode, parse_request, request_id
from service.prechecks import offline_checks
from service.redact import SecretFilter, mask_text, redact_url
from service.topology import Topology
from service.watch import ExchangeMissing, events, final_events, line, request_of, watching

EXIT_CONFIG = EXIT_USAGE  # the name older callers know
log = logging.getLogger(__name__)
_DESTINATION_KEYS = {
    "inconvo": ("Inconvo", "inconvo_api_key", "COURIER_INCONVO_API_KEY"),
    "mindset": ("Mindset", "mindset_api_key", "COURIER_MINDSET_API_KEY"),
}


class UserError(Exception):
    """A mistake or a missing dependency the user can fix: one line and an exit status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def _read(path: str) -> bytes:
    if path == "-":
        return sys.stdin.buffer.read()
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}", EXIT_USAGE) from None


def _secrets() -> list[str]:
    try:
        secrets = load_settings().secret_values()
    except ConfigError:
        secrets = []
    # Read straight from the environment too: the settings themselves may not load.
    return secrets + [value for name in SECRET_VARIABLES if (value := os.environ.get(name))]


def _print(text: str, secrets: Iterable[str] = ()) -> None:
    """Write command output to stdout, every configured secret masked as the logs mask it."""
    sys.stdout.write(mask_text(text, SecretFilter(secrets).secrets) + "\n")
    sys.stdout.flush()


def _print_json(value: Any, secrets: Iterable[str] = ()) -> None:
    _print(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode(), secrets)


def _say(text: str) -> None:
    """A line for the person at the terminal (stderr: stdout is the command's output)."""
    sys.stderr.write(f"courier: {mask_text(text, SecretFilter(_secrets()).secrets)}\n")
    sys.stderr.flush()


async def _connect(settings: Settings) -> AbstractConnection:
    """A connection to the first node of COURIER_AMQP_URL that answers."""
    urls = settings.amqp_urls
    for url in urls:
        try:
            return await aio_pika.connect(url, timeout=10)
        except CONNECTION_ERRORS as exc:
            last = exc
            if url != urls[-1]:
                log.warning("broker node %s does not answer; trying the next", redact_url(url))
    shown = ", ".join(redact_url(url) for url in urls)
    raise UserError(
        f"cannot reach RabbitMQ at {shown} ({type(last).__name__}): start a broker "
        "(`make broker`) or set COURIER_AMQP_URL",
        EXIT_UNAVAILABLE,
    )


async def _process(settings: Settings, body: bytes) -> int:
    from service.attempt import refused
    from service.events import build_event
    from service.runtime import pipeline_for

    decoded = decode(body, Envelope(), settings.max_message_bytes)
    if decoded.request is None:  # the same invalid_request event `courier run` publishes
        outcome = refused(decoded)
    else:
        async with pipeline_for(settings) as pipeline:
            outcome = await pipeline.process(decoded.request, decoded.request_id)
        outcome = outcome.held_as_failure()  # no broker to hold it in
    event = build_event(
        event_source=settings.event_source,
        request_id=decoded.request_id,
        attempts=1,
        metadata=decoded.metadata,
        outcome=outcome,
    )
    # The same masking as the logs of `courier run`: an event must not show a secret.
    _print_json(event, settings.secret_values())
    return EXIT_OK if outcome.succeeded else EXIT_FAILED


async def _submit(settings: Settings, body: bytes, wait: bool, patience: float) -> int:
    request = parse_request(body, settings.max_message_bytes)
    offline_checks(request)  # what is certain to fail is never published
    rid = request_id(request.id, Envelope(), body)
    connection = await _connect(settings)
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        try:
            # Passive: a producer needs no configure permission, and never makes the queue.
            await channel.declare_queue(settings.queue, passive=True)
        except aio_pika.exceptions.ChannelNotFoundEntity:
            raise UserError(
                f"queue {settings.queue} does not exist on this broker: start `courier run` "
                "once (it declares its queues), or correct COURIER_QUEUE",
                EXIT_UNAVAILABLE,
            ) from None
        message = aio_pika.Message(
            body=body,
            content_type="application/json",
            message_id=rid,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        if not wait:
            await _publish(channel, settings, message)
            _print_json({"submitted": rid, "queue": settings.queue})
            return EXIT_OK
        try:
            async with watching(connection, settings.events_exchange) as watch:
                await _publish(channel, settings, message)
                _say(f"submitted {rid} to {settings.queue}; waiting for its events")
                final = final_events(settings.track_ingestion)
                return await _follow(watch, rid, patience, final, settings.secret_values())
        except ExchangeMissing:
            raise UserError(
                f"exchange {settings.events_exchange} does not exist: start `courier run` once "
                "(it declares it), or correct COURIER_EVENTS_EXCHANGE",
                EXIT_UNAVAILABLE,
            ) from None


async def _publish(channel: Any, settings: Settings, message: aio_pika.Message) -> None:
    try:
        await channel.default_exchange.publish(
            message, routing_key=settings.queue, mandatory=True, timeout=settings.publish_timeout
        )
    except aio_pika.exceptions.DeliveryError:
        raise UserError(
            f"the broker did not take the request for queue {settings.queue}", EXIT_UNAVAILABLE
        ) from None


async def _follow(
    watch: Any, rid: str, patience: float, final: Mapping[str, int], secrets: list[str]
) -> int:
    try:
        async with asyncio.timeout(patience):
            async for _, event in events(watch):
                if request_of(event) != rid:
                    continue
                _print_json(event, secrets)
                status = final.get(str(event.get("type")))
                if status is not None:
                    return status
    except TimeoutError:
        pass
    _say(
        f"no final event for {rid} within {patience:g}s: is `courier run` running against "
        "this queue? (`courier events` shows what arrives)"
    )
    return EXIT_TIMEOUT


async def _events(settings: Settings, args: argparse.Namespace) -> int:
    secrets = settings.secret_values()
    wanted = set(args.request_id)
    connection = await _connect(settings)
    async with connection:
        try:
            async with watching(connection, settings.events_exchange, args.key) as watch:
                _say(
                    f"watching {settings.events_exchange} ({', '.join(args.key or ['#'])}); "
                    "Ctrl-C stops"
                )
                seen = 0
                async for _, event in events(watch):
                    if wanted and request_of(event) not in wanted:
                        continue
                    _print(orjson.dumps(event).decode() if args.json else line(event), secrets)
                    seen += 1
                    if args.count and seen >= args.count:
                        break
        except ExchangeMissing:
            raise UserError(
                f"exchange {settings.events_exchange} does not exist: start `courier run` once "
                "(it declares it), or correct COURIER_EVENTS_EXCHANGE",
                EXIT_UNAVAILABLE,
            ) from None
    return EXIT_OK


async def _dead(settings: Settings, args: argparse.Namespace) -> int:
    if args.action == "purge" and not (args.yes or args.dry_run):
        raise UserError(
            "purge deletes dead letters for good: add --yes "
            "(--dry-run, or `courier dead list` with the same filters, shows which)",
            EXIT_USAGE,
        )
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
        try:
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
                max_bytes=settings.max_message_bytes,
            )
        except aio_pika.exceptions.ChannelNotFoundEntity:
            raise UserError(
                f"queue {topology.dead.name} does not exist: Courier has not run against "
                "this broker yet (or COURIER_QUEUE names another queue)",
                EXIT_UNAVAILABLE,
            ) from None
        await channel.close()
    secrets = settings.secret_values()
    if args.json:
        _print_json(deadletters.as_json(result, topology), secrets)
        return EXIT_OK
    if result.handled:
        _print(deadletters.table(result.handled), secrets)
    _print(deadletters.summary(result, topology, getattr(args, "rate", None)), secrets)
    return EXIT_OK


def _doctor(args: argparse.Namespace) -> int:
    from service import doctor

    # Doctor reports connection failures itself; the libraries' own records would repeat them.
    setup_logging("console", "WARNING", _secrets())
    logging.getLogger("aiormq").setLevel(logging.CRITICAL)
    checks = asyncio.run(doctor.diagnose(management_url=args.management_url))
    secrets = _secrets()
    if args.json:
        _print_json(doctor.as_json(checks), secrets)
    else:
        _print(doctor.render(checks), secrets)
    return EXIT_OK if doctor.passed(checks) else EXIT_FAILED


def _run(settings: Settings) -> int:
    for name, nearest in unknown_variables():
        log.warning(
            "%s is not a Courier variable and is ignored%s",
            name,
            f" (did you mean {nearest}?)" if nearest else "",
        )
    for label, field, variable in _DESTINATION_KEYS.values():
        if getattr(settings, field) is None:
            log.warning(
                "%s is not set: every %s request fails as destination_not_configured",
                variable,
                label,
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
    return EXIT_OK


def _dispatch(args: argparse.Namespace, settings: Settings) -> int:
    if args.command == "schema":
        from service.asyncapi import document

        _print_json(document(settings))  # names and addresses only, never credentials
        return EXIT_OK
    if args.command == "run":
        return _run(settings)
    # A one-shot command says in one line why it cannot reach the broker; aiormq's own
    # records of the same failure would only repeat it.
    logging.getLogger("aiormq").setLevel(logging.CRITICAL)
    if args.command == "process":
        return asyncio.run(_process(settings, _read(args.file)))
    if args.command == "submit":
        body = _read(args.file)
        return asyncio.run(_submit(settings, body, args.wait, args.timeout))
    if args.command == "events":
        return asyncio.run(_events(settings, args))
    return asyncio.run(_dead(settings, args))


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``courier`` command."""
    args = parser().parse_args(argv)
    if args.command == "schema" and not args.asyncapi:
        from service.contracts import json_schemas

        _print_json(json_schemas())
        return EXIT_OK
    if args.command == "doctor":
        return _doctor(args)
    try:
        settings = load_settings()
    except ConfigError as exc:
        _say(f"configuration error: {exc}")
        return EXIT_USAGE
    setup_logging(settings.log_format, settings.log_level, settings.secret_values())
    try:
        return _dispatch(args, settings)
    except UserError as exc:
        _say(str(exc))
        return exc.status
    except ConfigError as exc:
        _say(f"configuration error: {exc}")
        return EXIT_USAGE
    except CourierError as exc:
        _say(f"{exc.code.value}: {exc.message}")
        return EXIT_FAILED
    except (aiormq.exceptions.AMQPError, aio_pika.exceptions.AMQPException, ConnectionError) as exc:
        _say(f"lost the connection to RabbitMQ ({type(exc).__name__}); nothing more was done")
        return EXIT_UNAVAILABLE
    except KeyboardInterrupt:
        return EXIT_OK if args.command == "events" else EXIT_INTERRUPTED
