"""Logging of every liveloop process: text for people, or one JSON object a line for log pipelines.

``LIVELOOP_LOG_FORMAT=json`` adds to each line what is known of the request that caused it (``request_id``,
``completion_id``, ``version``, ``user``), taken from context variables: an HTTP request sets them as it goes
(``serving.observability``, the chat and feedback routes), and each request runs in a context of its own.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from pythonjsonlogger.json import JsonFormatter

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
CONTEXT_FIELDS = ("request_id", "completion_id", "version", "user")
_context: dict[str, ContextVar[str | None]] = {name: ContextVar(name, default=None) for name in CONTEXT_FIELDS}


def bind_log_context(**fields: str | None) -> None:
    """Set context fields for the rest of the current request (its task and what it starts)."""
    for name, value in fields.items():
        _context[name].set(value)


@contextmanager
def log_context(**fields: str | None) -> Iterator[None]:
    """Context fields for the duration of a block; the values before it come back after."""
    tokens = {name: _context[name].set(value) for name, value in fields.items()}
    try:
        yield
    finally:
        for name, token in tokens.items():
            _context[name].reset(token)


class _ContextFilter(logging.Filter):
    """Puts the known context fields on each record, where the JSON formatter finds them."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, var in _context.items():
            value = var.get()
            if value is not None:
                setattr(record, name, value)
        return True


def configure_logging(log_format: str = "text", level: int = logging.INFO) -> None:
    """The root logger's one handler, on stderr; third-party loggers (uvicorn's too) propagate to it."""
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(JsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s",
                                           rename_fields={"levelname": "level", "name": "logger"}))
        handler.addFilter(_ContextFilter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level, handlers=[handler], force=True)
