"""Structured logs and counters.

Logs are structlog events (`log.info("version_committed", version=3, updates=10)`), rendered as
JSON lines for machines or as readable console lines for people. Counters carry their unit in the
name, ready to be exported as Prometheus metrics.
"""

from __future__ import annotations

import bisect
import logging
import sys
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

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
        # One shared printer: the default factory builds a PrintLogger (and looks up its file
        # lock) on every log call, filtered or not, a few percent of a mass join. Loggers stay
        # uncached so a reload's new level applies at once.
        logger_factory=_shared_printer(),
        cache_logger_on_first_use=False,
    )


def _shared_printer() -> Callable[..., structlog.PrintLogger]:
    printer = structlog.PrintLogger(file=sys.stderr)
    return lambda *_args: printer


STALENESS_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64, 128)
"""Upper bounds (versions) of the staleness histogram; one more bucket holds the rest."""

SECONDS_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0)
"""Upper bounds (seconds) of the commit-time histogram; one more bucket holds the rest."""


@dataclass
class Histogram:
    """Counts of observations per bucket (not cumulative; the last is above every bound)."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        """Count one observation."""
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def cumulative(self) -> list[tuple[str, int]]:
        """Prometheus buckets: (upper bound, observations at or below it), +Inf last."""
        out, running = [], 0
        for bound, count in zip([*map(str, self.bounds), "+Inf"], self.counts, strict=True):
            running += count
            out.append((bound, running))
        return out


def reason_key(reason: str) -> str:
    """A short, bounded label for why an update was rejected (metrics must not have free text
    as label values)."""
    text = reason.lower()
    for key, words in _REASONS:
        if any(w in text for w in words):
            return key
    return "policy"


_REASONS = (
    ("stale", ("stale", "trained from version", "base version")),
    ("finished", ("finished",)),
    ("not_outstanding", ("not outstanding", "not part of", "fits no task")),
    ("not_finite", ("finite",)),
)


@dataclass
class ControllerStats:
    """Monotonic counters of one controller process."""

    sessions_opened_total: int = 0
    updates_received_total: int = 0
    updates_accepted_total: int = 0
    updates_rejected_total: int = 0
    updates_discarded_total: int = 0  # accepted, then dropped: round abandoned, commit refused
    evaluations_received_total: int = 0
    versions_committed_total: int = 0
    commits_refused_total: int = 0
    protocol_errors_total: int = 0
    bytes_received_total: int = 0
    bytes_sent_total: int = 0
    auth_refused_total: int = 0
    learners_benched_total: int = 0
    learners_cut_off_total: int = 0
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    staleness: Histogram = field(default_factory=lambda: Histogram(STALENESS_BUCKETS))
    commit_seconds: Histogram = field(default_factory=lambda: Histogram(SECONDS_BUCKETS))

    def reject(self, reason: str) -> None:
        """Count one rejected update under its reason's label."""
        self.updates_rejected_total += 1
        key = reason_key(reason)
        self.rejected_by_reason[key] = self.rejected_by_reason.get(key, 0) + 1

    def snapshot(self) -> dict[str, int]:
        """The plain counters as a dict (what checkpoints keep and logs show)."""
        return {k: v for k, v in asdict(self).items() if isinstance(v, int)}


ID_LOG_CHARS = 64
"""Learner ids longer than this are shortened in logs."""


def short_id(learner_id: str) -> str:
    """`learner_id` for a log line: long (possibly hostile) identities are truncated."""
    if len(learner_id) <= ID_LOG_CHARS:
        return learner_id
    return f"{learner_id[:ID_LOG_CHARS]}...(+{len(learner_id) - ID_LOG_CHARS})"


class LogLimiter:
    """Rate-limits repeated log events per learner: a token bucket per (learner, event).

    A learner that repeats an error thousands of times a second costs at most `burst` lines,
    then `per_minute` lines a minute; the next line it gets says how many were suppressed.

    Args:
        burst: lines allowed at once (per learner and event).
        per_minute: sustained lines a minute (per learner and event).
        tracked: (learner, event) pairs remembered, oldest forgotten first.
    """

    def __init__(self, burst: int = 5, per_minute: float = 6.0, tracked: int = 10_000) -> None:
        self._burst = float(burst)
        self._rate = per_minute / 60.0
        self._tracked = tracked
        self._buckets: OrderedDict[tuple[str, str], list[float]] = OrderedDict()

    def allow(self, learner_id: str, event: str) -> bool:
        """Whether to log `event` for `learner_id` now (counts it as suppressed if not)."""
        key = (learner_id, event)
        now = time.monotonic()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = [self._burst, now, 0.0]
            while len(self._buckets) > self._tracked:
                self._buckets.popitem(last=False)
        tokens = min(self._burst, bucket[0] + (now - bucket[1]) * self._rate)
        bucket[1] = now
        if tokens >= 1.0:
            bucket[0] = tokens - 1.0
            return True
        bucket[0] = tokens
        bucket[2] += 1
        return False

    def suppressed(self, learner_id: str, event: str) -> int:
        """Lines suppressed since the last call for this learner and event (then reset)."""
        bucket = self._buckets.get((learner_id, event))
        if bucket is None:
            return 0
        count, bucket[2] = int(bucket[2]), 0.0
        return count
