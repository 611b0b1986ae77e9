"""Structured logs and counters.

Logs are structlog events (`log.info("version_committed", version=3, updates=10)`), rendered as
JSON lines for machines or as readable console lines for people. Counters carry their unit in the
name, ready to be exported as Prometheus metrics.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import asdict, dataclass

import structlog


def configure_logging(level: str = "info", json: bool = False) -> None:
    """Route structlog and stdlib logging to stderr at `level`, as JSON lines or console text."""
    numeric = logging.getLevelName(level.upper())  # an int for known names (3.10 has no mapping)
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")
    logging.basicConfig(level=numeric, stream=sys.stderr, format="%(message)s", force=True)
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


@dataclass
class ControllerStats:
    """Monotonic counters of one controller process."""

    sessions_opened_total: int = 0
    updates_received_total: int = 0
    updates_accepted_total: int = 0
    updates_rejected_total: int = 0
    versions_committed_total: int = 0
    protocol_errors_total: int = 0
    bytes_received_total: int = 0

    def snapshot(self) -> dict[str, int]:
        """The counters as a plain dict."""
        return asdict(self)
