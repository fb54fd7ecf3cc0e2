"""The ``courier`` command's arguments, help texts and exit statuses."""

from __future__ import annotations

import argparse
from datetime import datetime
from typing import Any

from service import __version__, deadletters
from service.contracts import DESTINATIONS
from service.errors import ErrorCode

EXIT_OK = 0
EXIT_FAILED = 1  # the request failed or was refused; doctor found a problem
EXIT_USAGE = 2  # bad arguments or configuration, a file that cannot be read, a port in use
EXIT_UNAVAILABLE = 3  # the broker cannot be reached, or the queue or exchange is missing
EXIT_TIMEOUT = 4  # submit --wait: no final event in time
EXIT_INTERRUPTED = 130

EXIT_CODES = f"""\
exit status: {EXIT_OK} done; {EXIT_FAILED} the request failed or was refused (doctor: a \
problem found); {EXIT_USAGE} bad arguments or configuration, an unreadable file, a port in \
use; {EXIT_UNAVAILABLE} RabbitMQ unreachable or the queue missing; {EXIT_TIMEOUT} no event \
within --timeout; {EXIT_INTERRUPTED} interrupted."""

ENVIRONMENT = """\
configuration comes from environment variables (any may be given as <NAME>_FILE naming a
file that holds it), for example:
  COURIER_AMQP_URL          amqp://guest:guest@localhost:5672/
  COURIER_QUEUE             courier.uploads
  COURIER_EVENTS_EXCHANGE   courier.events
  COURIER_INCONVO_API_KEY   (or INCONVO_API_KEY) Inconvo's key
  COURIER_MINDSET_API_KEY   (or MINDSET_API_KEY) Mindset AI's key
  AWS_*                     the standard AWS chain, for s3:// sources
README.md lists every variable."""

_EPILOGS = {
    "run": "example:\n  COURIER_INCONVO_API_KEY=... courier run",
    "submit": "examples:\n  courier submit request.json\n"
    "  courier submit --wait examples/inconvo-http.json\n"
    "  echo '{...}' | courier submit -",
    "process": "example:\n  courier process examples/inconvo-http.json",
    "events": "examples:\n  courier events\n  courier events --key 'upload.failed' --json\n"
    "  courier events --request-id req-1 --count 1",
    "dead": "examples:\n  courier dead list --code destination_unavailable --since 6h\n"
    "  courier dead replay --destination inconvo --rate 20 --dry-run",
    "doctor": "example:\n  courier doctor --json",
    "schema": "example:\n  courier schema > schemas.json",
}


def _epilog(command: str | None) -> str:
    parts = [_EPILOGS[command]] if command else []
    return "\n\n".join([*parts, ENVIRONMENT, EXIT_CODES])


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


def _command(sub: Any, name: str, text: str) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(
        name,
        help=text,
        description=text,
        epilog=_epilog(name),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return parser


def _dead_parser(sub: Any) -> None:
    dead = _command(sub, "dead", "list, replay or purge dead letters, filtered")
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


def parser() -> argparse.ArgumentParser:
    """The whole command line."""
    top = argparse.ArgumentParser(
        prog="courier",
        description="Courier: upload requests from RabbitMQ, delivered to Inconvo or Mindset AI.",
        epilog=_epilog(None),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    top.add_argument("--version", action="version", version=f"courier {__version__}")
    sub = top.add_subparsers(dest="command", required=True)
    _command(sub, "run", "consume requests until SIGTERM/SIGINT")
    submit = _command(
        sub, "submit", "check a request as the service would, then publish it (confirmed)"
    )
    submit.add_argument("file", help="request JSON file, or - for stdin")
    submit.add_argument(
        "--wait", action="store_true", help="print the request's events as they come; exit by them"
    )
    submit.add_argument(
        "--timeout",
        type=_positive_float,
        default=120.0,
        help="with --wait: give up after this many seconds (default 120)",
    )
    process = _command(sub, "process", "run one request locally, without a broker; print its event")
    process.add_argument("file", help="request JSON file, or - for stdin")
    events = _command(sub, "events", "print result events as they are published (Ctrl-C stops)")
    events.add_argument(
        "--key",
        action="append",
        default=[],
        help="routing-key pattern to bind, repeatable (default '#': all), e.g. upload.failed",
    )
    events.add_argument("--request-id", action="append", default=[], help="only these requests")
    events.add_argument("--json", action="store_true", help="one event per line, as JSON")
    events.add_argument("--count", type=_positive_int, help="stop after this many events")
    _dead_parser(sub)
    doctor = _command(sub, "doctor", "check the configuration and every dependency")
    doctor.add_argument("--json", action="store_true", help="print the checks as JSON")
    doctor.add_argument(
        "--management-url",
        help="RabbitMQ management API, to compare queue arguments "
        "(default: the first broker's host, port 15672)",
    )
    schema = _command(sub, "schema", "print the request and event JSON Schemas")
    schema.add_argument(
        "--asyncapi", action="store_true", help="print the AsyncAPI 3 document instead"
    )
    return top
