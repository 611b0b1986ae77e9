"""What the dashboard shows: the `DashboardSource` interface and the two JSON shapes it returns.

The dashboard never reaches into the controller; it asks a `DashboardSource` for two things.

`summary()` — aggregates only, whatever the number of learners. All keys are always present
(lists may be empty, percentiles `None` when nobody has a speed yet). Times are unix seconds.

    {"run_id": str, "protocol": str,
     "policy": {"name": str, "parameters": {str: number | str | bool}},
     "state": "waiting" | "training" | "paused" | "draining" | "finished",
     "now": float, "started": float,
     "version": int, "model_parameters": int, "encrypted": bool, "workers": int,
     "learners": {"connected": int, "training": int, "benched": int, "never_contributed": int,
                  "speed_examples_per_second": {"p10": float | None, "p50": ..., "p90": ...}},
     "versions": [{"version": int, "time": float, "updates": int, "mean_staleness": float}],
     "evaluations": [{"version": int, "time": float, "learners": int,
                      "metrics": {str: float}}],
     "staleness": {"edges": [0, 1, 2, 4, 8, 16, 32], "counts": [int, ...]},
     "rates": {"updates_per_second": float, "bytes_in_per_second": float,
               "bytes_out_per_second": float},
     "totals": {"updates_accepted": int, "updates_rejected": int, "bytes_in": int,
                "bytes_out": int},
     "rejected": {reason: int},
     "participation": {"learners": int, "contributing": int,
                       "accepted": {"p10": int, "p50": int, "p90": int, "max": int},
                       "top": [{"learner_id": str, "accepted": int}]}}

`versions` and `evaluations` hold the last `HISTORY_LIMIT` entries, oldest first. The staleness
histogram has one count per edge: count i covers staleness in [edges[i], edges[i+1]) (versions),
the last one everything at or above the last edge. `learners.never_contributed` counts connected
learners with no accepted update yet — over-selection and asynchronous policies can starve slow
learners without any error. `participation` covers every learner seen in the run.

`learners(offset, limit, sort, descending)` — one page of the learner table, sorted by the
controller (the page never holds more than `MAX_PAGE` rows, however many learners there are):

    {"total": int, "offset": int, "limit": int, "sort": str,
     "learners": [{"learner_id": str, "connected": bool, "worker": int,
                   "connected_seconds": float, "last_seen_seconds": float,
                   "speed_examples_per_second": float | None, "accepted": int,
                   "rejected": int, "last_staleness": int | None}]}

`sort` is one of `SORT_KEYS`; `last_seen_seconds` is the age of the learner's last message,
heartbeats included (the stream drivers report them every heartbeat interval / 2).
`learner_page` builds such a page from plain rows, for sources that keep no sorted index.

Both methods run on the event loop thread (no locking needed against the controller), so they
must be cheap: `summary()` every `interval_seconds`, shared by all open pages; `learners()` on
each table fetch.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping
from typing import Protocol

SORT_KEYS = (
    "learner_id",
    "last_seen_seconds",
    "speed_examples_per_second",
    "accepted",
    "rejected",
    "last_staleness",
)
"""Columns the learner table can be sorted by."""

MAX_PAGE = 500
"""The most learner rows one `/api/learners` answer holds."""

HISTORY_LIMIT = 500
"""How many versions and evaluations a summary keeps (the most recent)."""

STALENESS_EDGES = (0, 1, 2, 4, 8, 16, 32)
"""Lower edges of the staleness histogram's buckets (versions)."""


class DashboardSource(Protocol):
    """Where the dashboard reads the controller's state (see the module docstring for shapes)."""

    def summary(self) -> dict[str, object]:
        """Aggregates of the run; called on the event loop thread, so it must be cheap."""
        ...

    def learners(self, offset: int, limit: int, sort: str, descending: bool) -> dict[str, object]:
        """Rows `offset` to `offset + limit` of the learner table sorted by `sort` (a SORT_KEYS
        member), largest first when `descending`."""
        ...


def empty_summary(run_id: str = "", protocol: str = "", policy: str = "") -> dict[str, object]:
    """A summary with every key present and nothing happened yet: a base for sources to fill."""
    no_speed: dict[str, float | None] = {"p10": None, "p50": None, "p90": None}
    return {
        "run_id": run_id,
        "protocol": protocol,
        "policy": {"name": policy, "parameters": {}},
        "state": "waiting",
        "now": 0.0,
        "started": 0.0,
        "version": 0,
        "model_parameters": 0,
        "encrypted": False,
        "workers": 0,
        "learners": {
            "connected": 0,
            "training": 0,
            "benched": 0,
            "never_contributed": 0,
            "speed_examples_per_second": no_speed,
        },
        "versions": [],
        "evaluations": [],
        "staleness": {"edges": list(STALENESS_EDGES), "counts": [0] * len(STALENESS_EDGES)},
        "rates": {
            "updates_per_second": 0.0,
            "bytes_in_per_second": 0.0,
            "bytes_out_per_second": 0.0,
        },
        "totals": {"updates_accepted": 0, "updates_rejected": 0, "bytes_in": 0, "bytes_out": 0},
        "rejected": {},
        "participation": {
            "learners": 0,
            "contributing": 0,
            "accepted": {"p10": 0, "p50": 0, "p90": 0, "max": 0},
            "top": [],
        },
    }


def learner_page(
    rows: Iterable[Mapping[str, object]], offset: int, limit: int, sort: str, descending: bool
) -> dict[str, object]:
    """One page of `rows` (learner rows as in the module docstring) in the learners() shape.

    Rows without a value for `sort` (`None`: no speed or staleness yet) come last either way;
    ties are broken by learner id, so pages neither overlap nor skip rows. Only the first
    `offset + limit` rows are ordered (a heap), so a first page of 100,000 learners is cheap.

    Raises:
        ValueError: `sort` is not one of `SORT_KEYS`, or `offset` or `limit` is negative.
    """
    if sort not in SORT_KEYS:
        raise ValueError(f"unknown sort key {sort!r}; one of {', '.join(SORT_KEYS)}")
    if offset < 0 or limit < 0:
        raise ValueError("offset and limit must not be negative")
    valued: list[Mapping[str, object]] = []
    missing: list[Mapping[str, object]] = []
    for row in rows:
        (missing if row.get(sort) is None else valued).append(row)

    def key(row: Mapping[str, object]) -> tuple[object, str]:
        return row[sort], str(row["learner_id"])

    wanted = offset + limit
    select = heapq.nlargest if descending else heapq.nsmallest
    first = select(wanted, valued, key=key)
    if len(first) < wanted:
        first += heapq.nsmallest(wanted - len(first), missing, key=lambda r: str(r["learner_id"]))
    return {
        "total": len(valued) + len(missing),
        "offset": offset,
        "limit": limit,
        "sort": sort,
        "learners": [dict(row) for row in first[offset:wanted]],
    }
