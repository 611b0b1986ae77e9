"""What people see of a running controller: one summary and pages of learners, read from the
federation core on its own thread (a consistent view), shared by the dashboard and the Admin
service.

`ControllerView` refreshes the summary every `interval_seconds` (one core query however many
browsers watch) and keeps it for `summary()`, which the dashboard calls from its own thread
(the summary and the rows are replaced whole, never changed in place, so that is safe). The
learner table is built only while someone looks at it (`learners()` asked within the last
`LEARNERS_WANTED_SECONDS`), as compact tuples sorted on demand: 100,000 learners cost one pass
on the core's thread per refresh and a page costs a sort of the cached tuples, never a dict per
learner. The Admin service's `ListLearners` reads the core directly (`page`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import heapq
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from metis_async.dashboard.source import MAX_PAGE, SORT_KEYS, empty_summary
from metis_async.effects import FederationState
from metis_async.telemetry import STALENESS_BUCKETS, ControllerStats

if TYPE_CHECKING:
    from metis_async.federation import FederationCore
    from metis_async.server import ControllerFace

LEARNERS_WANTED_SECONDS = 10.0
"""The learner table is refreshed while it was asked for within this many seconds."""

ROWS_PER_INTERVAL = 20_000
"""Learners whose table rows may be rebuilt every refresh interval (more: less often)."""

STATES = {
    FederationState.WAITING_FOR_MODEL: "waiting",
    FederationState.WAITING_FOR_LEARNERS: "waiting",
    FederationState.TRAINING: "training",
    FederationState.DRAINING: "draining",
    FederationState.FINISHED: "finished",
}


class LearnerRow(NamedTuple):
    """One learner as the table shows it (times in seconds before the snapshot)."""

    learner_id: str
    connected: bool
    worker: int
    connected_seconds: float
    last_seen_seconds: float
    speed_examples_per_second: float | None
    accepted: int
    rejected: int
    last_staleness: int | None
    tasks_assigned: int
    benched: bool

    def as_dict(self) -> dict[str, object]:
        """JSON-ready."""
        return self._asdict()


def learner_rows(
    core: FederationCore, now: float, routes: Callable[[], Mapping[str, int]] | None = None
) -> list[LearnerRow]:
    """Every learner the core knows (run on the core's thread)."""
    workers = routes() if routes is not None else {}
    rows = []
    for r in core.learner_records():
        rows.append(
            LearnerRow(
                r.learner_id,
                r.connected,
                workers.get(r.learner_id, -1),
                now - r.joined_at if r.connected else 0.0,
                now - r.last_seen,
                r.examples_per_second,
                r.updates_accepted,
                r.updates_rejected,
                r.last_staleness,
                r.tasks_assigned,
                r.benched_until > now,
            )
        )
    return rows


def sort_rows(
    rows: Sequence[LearnerRow], sort: str, descending: bool, first: int | None = None
) -> list[LearnerRow]:
    """`rows` by `sort` (a `SORT_KEYS` name; "" connected first, then by id); unknown keys raise
    ValueError. Missing values (None) sort last either way. With `first`, only the first
    `first` rows are sure to be there (fewer when that many are cheaper to find)."""
    if not sort:
        return sorted(rows, key=lambda r: (not r.connected, r.learner_id))
    if sort not in SORT_KEYS:
        raise ValueError(f"unknown sort key {sort!r}; choose from {', '.join(SORT_KEYS)}")
    index = LearnerRow._fields.index(sort)
    known = [r for r in rows if r[index] is not None]
    missing = [r for r in rows if r[index] is None]

    def value(row: LearnerRow) -> Any:
        return row[index]

    if first is not None and first < len(known) // 4:  # a first page: a heap, not a full sort
        pick = heapq.nlargest if descending else heapq.nsmallest
        return pick(first, known, key=value)
    return sorted(known, key=value, reverse=descending) + missing


def page(
    rows: Sequence[LearnerRow], offset: int, limit: int, sort: str, descending: bool
) -> dict[str, object]:
    """One page of the learner table (the dashboard's schema)."""
    limit = min(max(limit, 1), MAX_PAGE)
    offset = max(offset, 0)
    ordered = sort_rows(rows, sort, descending, offset + limit)
    return {
        "total": len(rows),
        "offset": offset,
        "limit": limit,
        "sort": sort,
        "learners": [r.as_dict() for r in ordered[offset : offset + limit]],
    }


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p10": None, "p50": None, "p90": None}
    values.sort()
    return {"p10": _pick(values, 0.1), "p50": _pick(values, 0.5), "p90": _pick(values, 0.9)}


def _pick(ordered: Sequence[float], q: float) -> float:
    """The `q` quantile of sorted, non-empty `ordered` (nearest rank)."""
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _scalar(value: object) -> object:
    if isinstance(value, bool | int | str) or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    return str(value)


def policy_parameters(policy: object) -> dict[str, object]:
    """The policy's settings as flat JSON scalars (`train.local_steps`, ...)."""
    settings = getattr(policy, "inner", policy)  # SecAgg+ wraps a policy
    found = getattr(settings, "settings", None)
    out: dict[str, object] = {}
    if found is not None and dataclasses.is_dataclass(found):
        for field in dataclasses.fields(found):
            value = getattr(found, field.name)
            if dataclasses.is_dataclass(value):
                for inner in dataclasses.fields(value):
                    out[f"{field.name}.{inner.name}"] = _scalar(getattr(value, inner.name))
            else:
                out[field.name] = _scalar(value)
    if getattr(policy, "inner", None) is not None:
        out["secure"] = "secagg+"
    return out


def core_summary(core: FederationCore, now: float) -> dict[str, Any]:
    """The core's part of the summary (run on the core's thread; O(learners))."""
    connected = training = benched = never = 0
    speeds: list[float] = []
    accepted: list[int] = []
    top: list[tuple[int, str]] = []
    for r in core.learner_records():
        accepted.append(r.updates_accepted)
        if r.updates_accepted:
            top.append((r.updates_accepted, r.learner_id))
        if not r.connected:
            continue
        connected += 1
        training += bool(r.tasks)
        benched += r.benched_until > now
        never += r.updates_accepted == 0
        if r.examples_per_second is not None:
            speeds.append(r.examples_per_second)
    top.sort(key=lambda t: (-t[0], t[1]))
    accepted.sort()
    versions, evaluations = core.history.as_dicts(now)
    state, _, needed = core.status_now()
    layout = core.layout
    return {
        "run_id": core.run_id,
        "protocol": core.policy.name,
        "policy": {"name": core.policy.name, "parameters": policy_parameters(core.policy)},
        "state": "paused" if core.paused else STATES.get(state, "waiting") if state else "waiting",
        "version": core.version,
        "model_parameters": int(layout.total_bytes // 4) if layout is not None else 0,
        "encrypted": core.he is not None,
        "learners_needed": needed,
        "learners": {
            "connected": connected,
            "training": training,
            "benched": benched,
            "never_contributed": never,
            "speed_examples_per_second": _percentiles(speeds),
        },
        "versions": versions,
        "evaluations": evaluations,
        "participation": {
            "learners": len(accepted),
            "contributing": len(top),
            "accepted": {
                "p10": int(_pick(accepted, 0.1)) if accepted else 0,
                "p50": int(_pick(accepted, 0.5)) if accepted else 0,
                "p90": int(_pick(accepted, 0.9)) if accepted else 0,
                "max": accepted[-1] if accepted else 0,
            },
            "top": [{"learner_id": lid, "accepted": n} for n, lid in top[:10]],
        },
    }


def process_stats(controller: ControllerFace) -> list[ControllerStats]:
    """The counters of every process: the core's and each ingest worker's (stream side)."""
    workers: dict[int, tuple[ControllerStats, float]] = getattr(controller, "worker_stats", {})
    return [controller.stats, *(stats for stats, _ in workers.values())]


def staleness_histogram(stats: ControllerStats) -> dict[str, list[int]]:
    """Accepted updates by staleness: bucket i holds [edges[i], edges[i+1]) versions."""
    edges = [0, *(int(b) + 1 for b in STALENESS_BUCKETS)]
    return {"edges": edges, "counts": list(stats.staleness.counts)}


class ControllerView:
    """The dashboard's `DashboardSource` for one controller (see the module docstring).

    Args:
        controller: a `Controller` or a `WorkerHub`.
        interval_seconds: how often the summary is refreshed.
    """

    def __init__(self, controller: ControllerFace, interval_seconds: float = 1.0) -> None:
        self.controller = controller
        self.interval_seconds = interval_seconds
        self.started = time.time()
        self._summary: dict[str, object] = empty_summary()
        self._refreshed_at = -math.inf
        self._rows: list[LearnerRow] = []
        self._rows_at = -math.inf
        self._wanted = 0.0
        self._last: tuple[float, int, int, int] | None = None  # (time, updates, in, out)
        self._rates = {"updates_per_second": 0.0, "bytes_in_per_second": 0.0}
        self._rates["bytes_out_per_second"] = 0.0
        self._task: asyncio.Task[None] | None = None
        self._soon: object = None  # a refresh asked for by `learners`, while it runs
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        """Refresh in the background from now on (on the running loop, the controller's)."""
        if self._task is None:
            self._loop = asyncio.get_running_loop()
            self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        """Stop refreshing."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(Exception):  # a failed refresh keeps the last view
                await self.refresh()
            await asyncio.sleep(self.interval_seconds)

    async def refresh(self) -> None:
        """Read the core once (its thread) and rebuild the summary."""
        controller = self.controller
        core = controller.core
        now = controller.clock()
        # The table costs a pass over every learner on the core's thread (~0.1-0.2 s at
        # 100,000 on 2 cores): rebuilt at most every interval x (learners / ROWS_PER_INTERVAL).
        rows_every = self.interval_seconds * max(1.0, len(self._rows) / ROWS_PER_INTERVAL)
        want_rows = time.monotonic() - self._wanted < LEARNERS_WANTED_SECONDS and (
            time.monotonic() - self._rows_at >= rows_every
        )
        routes = controller.learner_workers

        def read() -> tuple[dict[str, Any], list[LearnerRow] | None]:
            rows = learner_rows(core, now, routes) if want_rows else None
            return core_summary(core, now), rows

        summary, rows = await controller.query(read)
        if rows is not None:
            self._rows, self._rows_at = rows, time.monotonic()
        stats = process_stats(controller)
        totals = {
            "updates_accepted": controller.stats.updates_accepted_total,
            "updates_rejected": controller.stats.updates_rejected_total,
            "bytes_in": sum(s.bytes_received_total for s in stats),
            "bytes_out": sum(s.bytes_sent_total for s in stats),
        }
        self._update_rates(totals)
        summary.update(
            now=time.time(),
            started=self.started,
            workers=len(getattr(controller, "_workers", ())),
            staleness=staleness_histogram(controller.stats),
            rates=dict(self._rates),
            totals=totals,
            rejected=dict(controller.stats.rejected_by_reason),
        )
        self._summary = summary
        self._refreshed_at = time.monotonic()

    def age_seconds(self) -> float:
        """Seconds since the summary was last refreshed (infinite before the first)."""
        return time.monotonic() - self._refreshed_at

    def _update_rates(self, totals: Mapping[str, int]) -> None:
        t = time.monotonic()
        sample = (t, totals["updates_accepted"], totals["bytes_in"], totals["bytes_out"])
        if self._last is not None and t > self._last[0]:
            span = t - self._last[0]
            self._rates = {
                "updates_per_second": (sample[1] - self._last[1]) / span,
                "bytes_in_per_second": (sample[2] - self._last[2]) / span,
                "bytes_out_per_second": (sample[3] - self._last[3]) / span,
            }
        self._last = sample

    def _refreshed(self, done: concurrent.futures.Future[None]) -> None:
        self._soon = None
        if not done.cancelled():
            done.exception()  # a failed refresh keeps the last view

    # ------------------------------------------------------------------------ DashboardSource

    def summary(self) -> dict[str, object]:
        """The latest summary (the dashboard's schema; nothing counted before the first
        refresh)."""
        return self._summary

    def learners(self, offset: int, limit: int, sort: str, descending: bool) -> dict[str, object]:
        """A page of the learner table as of the last refresh (asking keeps it refreshed; the
        first ask in a while refreshes at once, for the next page)."""
        idle = time.monotonic() - self._wanted >= LEARNERS_WANTED_SECONDS
        self._wanted = time.monotonic()
        if idle and self._loop is not None and self._soon is None:
            # Called from the page's thread: the refresh runs on the controller's loop.
            soon = asyncio.run_coroutine_threadsafe(self.refresh(), self._loop)
            self._soon = soon
            soon.add_done_callback(self._refreshed)
        return page(self._rows, offset, limit, sort, descending)
