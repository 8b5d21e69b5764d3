"""Structured logging: JSON lines on stderr for every process, secrets redacted before they are written."""

from __future__ import annotations

import logging
import re
import sys
from typing import Any, TextIO

import structlog

# Values under these names, and anything shaped like a bearer token or API key, never reach a log.
_SECRET_NAME = re.compile(r"(key|token|secret|password|passwd|dsn|auth|credential|cookie)", re.IGNORECASE)
_SECRET_VALUE = re.compile(r"(sk-[A-Za-z0-9_\-]{8,}|(?:redis|postgres(?:ql)?(?:\+\w+)?)://[^@\s]*:[^@\s]*@)")


def redact_value(value: str) -> str:
    """Mask credentials inside a string (API-key shapes, passwords in URLs)."""
    return _SECRET_VALUE.sub("[redacted]", value)


def _redact(_logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
    for name, value in list(event.items()):
        if name != "event" and _SECRET_NAME.search(name) and not name.endswith(("_id", "_count")):
            event[name] = "[redacted]"
        elif isinstance(value, str):
            event[name] = redact_value(value)
    return event


def configure(process: str, level: str = "INFO", stream: TextIO | None = None) -> None:
    """Send every log line of this process, ours and the libraries', as JSON to stderr (or `stream`)."""
    target = stream or _real_stderr()
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _redact,
    ]
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, structlog.processors.JSONRenderer()],
        logger_factory=structlog.PrintLoggerFactory(target),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(target)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        processor=structlog.processors.JSONRenderer(),
        foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name, structlog.processors.format_exc_info],
    ))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    structlog.contextvars.bind_contextvars(process=process)


def _real_stderr() -> Any:
    # Celery swaps sys.stderr for a proxy that feeds the logging system: writing log lines to it
    # would loop back into logging, so write to the process's real stderr.
    return sys.__stderr__ or sys.stderr


def get(name: str) -> Any:
    """A structured logger."""
    return structlog.get_logger(name)
