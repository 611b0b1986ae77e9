"""What the federation did over time, for people: committed versions and evaluation results.

The federation core records each commit and each evaluation here with the events' clock; the
dashboard and `metis-async status` show the last `kept` of each with wall-clock times
(`as_dicts`). Bounded memory whatever the run's length.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class VersionPoint:
    """One committed version: when (events' clock, seconds), how many updates it folded and
    their mean staleness (versions)."""

    version: int
    time: float
    updates: int
    mean_staleness: float


class FederationHistory:
    """The last `kept` committed versions and evaluated versions.

    Args:
        kept: points kept of each kind (oldest dropped first).
    """

    def __init__(self, kept: int = 500) -> None:
        self.kept = kept
        self.versions: deque[VersionPoint] = deque(maxlen=kept)
        # version -> (time of its latest evaluation, learners, metrics): updated as results come
        self.evaluations: OrderedDict[int, tuple[float, int, dict[str, float]]] = OrderedDict()

    def committed(self, now: float, version: int, updates: int, staleness_sum: float) -> None:
        """Version `version` committed at `now` with `updates` updates of total staleness."""
        mean = staleness_sum / updates if updates else 0.0
        self.versions.append(VersionPoint(version, now, updates, mean))

    def evaluated(self, now: float, version: int, summary: Mapping[str, float]) -> None:
        """The example-weighted mean metrics of `version` so far (`summary` holds "learners"
        and "examples" beside the metrics)."""
        learners = int(summary.get("learners", 0))
        metrics = {k: float(v) for k, v in summary.items() if k not in ("learners", "examples")}
        self.evaluations[version] = (now, learners, metrics)
        self.evaluations.move_to_end(version)
        while len(self.evaluations) > self.kept:
            self.evaluations.popitem(last=False)

    def as_dicts(self, now: float) -> tuple[list[dict[str, object]], list[dict[str, object]]]:
        """(versions, evaluations) as JSON-ready dicts with unix times (the events' clock `now`
        is this instant)."""
        offset = time.time() - now
        versions: list[dict[str, object]] = [
            {
                "version": p.version,
                "time": p.time + offset,
                "updates": p.updates,
                "mean_staleness": p.mean_staleness,
            }
            for p in self.versions
        ]
        evaluations: list[dict[str, object]] = [
            {"version": v, "time": t + offset, "learners": n, "metrics": m}
            for v, (t, n, m) in sorted(self.evaluations.items())
        ]
        return versions, evaluations
