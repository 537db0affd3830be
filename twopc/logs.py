"""structlog set-up for the daemons (the SDK never configures logging).

Production chain: contextvars (``txid`` is bound there), level, ISO UTC timestamp, JSON lines.
``console=True`` renders for people instead.
"""

from __future__ import annotations

import logging
import re
import sys

import structlog


def configure_logging(level: str = "info", *, console: bool = False, component: str = "") -> None:
    renderer: structlog.typing.Processor = (
        structlog.dev.ConsoleRenderer(colors=False)
        if console
        else structlog.processors.JSONRenderer()
    )
    processors: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        renderer,
    ]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    if component:
        structlog.contextvars.bind_contextvars(component=component)


_DATABASE_MESSAGE = re.compile(r"\((\d{3,5})\) [^;]*")


def redact(reason: str) -> str:
    """``reason`` without the database's own message text, which may quote row data
    ("Duplicate entry 'alice@example.com' for key ..."): only the error number stays."""
    return _DATABASE_MESSAGE.sub(r"(\1) [database message not logged]", reason)
