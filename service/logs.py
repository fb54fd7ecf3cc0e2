"""Logging: JSON lines (or console text) on stderr, request context attached, secrets masked."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from pythonjsonlogger.json import JsonFormatter

from service.redact import SecretFilter

_context: ContextVar[dict[str, Any] | None] = ContextVar("courier_log_context", default=None)
CONTEXT_FIELDS = ("requestId", "correlationId", "destination", "attempt", "errorCode")


@contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Attach ``fields`` (requestId, correlationId, ...) to every record logged inside."""
    current = dict(_context.get() or {})
    current.update({k: v for k, v in fields.items() if v is not None})
    token = _context.set(current)
    try:
        yield
    finally:
        _context.reset(token)


def add_log_context(**fields: Any) -> None:
    """Add fields to the current request's logging context."""
    current = _context.get()
    if current is not None:
        current.update({k: v for k, v in fields.items() if v is not None})


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in (_context.get() or {}).items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


class _ConsoleFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        extra = [f"{k}={getattr(record, k)}" for k in CONTEXT_FIELDS if hasattr(record, k)]
        return f"{text} [{' '.join(extra)}]" if extra else text


def setup_logging(fmt: str = "json", level: str = "INFO", secrets: Iterable[str] = ()) -> None:
    """Send every record (third-party libraries' too) to stderr in ``fmt``."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(
            JsonFormatter(
                "%(asctime)s %(levelname)s %(name)s %(message)s",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
                timestamp=False,
            )
        )
    else:
        handler.setFormatter(_ConsoleFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    handler.addFilter(_ContextFilter())
    handler.addFilter(SecretFilter(secrets))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # aiormq is chatty at INFO about every reconnect attempt; botocore's DEBUG
    # records carry request signatures, so they never go below INFO.
    logging.getLogger("aiormq").setLevel(max(logging.WARNING, root.level))
    for name in ("botocore", "aiobotocore", "urllib3"):
        logging.getLogger(name).setLevel(max(logging.INFO, root.level))
