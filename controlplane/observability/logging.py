"""structlog setup: JSON lines when stderr is not a terminal, readable lines when it is.

No line carries a PEM private key: every string in an event (in nested dicts and lists too)
passes through redaction.redact_pem_keys before it is rendered, so an Envoy NACK text that
quotes its config, say, is logged without the key.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

from controlplane.redaction import redact_pem_keys

LEVELS = ("debug", "info", "warning", "error")


def configure(level: str = "info", *, json: bool | None = None) -> None:
    if json is None:
        json = not sys.stderr.isatty()
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            redact_private_keys,  # after format_exc_info: tracebacks are text by then
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )


def redact_private_keys(
    logger: object, method_name: str, event_dict: structlog.typing.EventDict
) -> structlog.typing.EventDict:
    """A structlog processor: PEM private key blocks out of every string of the event."""
    return {key: _scrubbed(value) for key, value in event_dict.items()}


def _scrubbed(value: Any) -> Any:
    if isinstance(value, str):
        return redact_pem_keys(value)
    if isinstance(value, dict):
        return {key: _scrubbed(item) for key, item in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_scrubbed(item) for item in value]
    return value
