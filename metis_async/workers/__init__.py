"""Ingest worker processes: many learner streams on one port, one federation core.

`metis-async serve --workers N` runs N worker processes that bind the learners' port together
(SO_REUSEPORT: the kernel spreads connections over them) and one process that runs the
`FederationCore` (`hub.WorkerHub`). Workers hold the streams, check and reassemble uploads and
fold accepted updates into partial sums in Rust; the core's process decides, merges the partial
sums at each commit and sends every new version, encoded once, to each worker.
"""

from __future__ import annotations

import math
import os
import resource

import metis_async._startup  # noqa: F401  (a worker's start: structlog without rich)

TARGET_LEARNERS = 100_000
"""`--workers auto` sizes the workers so that together they can hold this many streams."""

FILES_PER_STREAM = 1.1
"""Open files per learner stream, with headroom for the process's own (measured: ~1.0)."""


def raise_open_file_limit() -> int:
    """Raise this process's soft open-file limit to its hard limit; returns the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return int(soft) if soft != resource.RLIM_INFINITY else 1 << 20


def auto_workers(target_learners: int = TARGET_LEARNERS) -> int:
    """Workers for `--workers auto`: one per core, more where the open-file limit needs it."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = (1 << 20) if hard == resource.RLIM_INFINITY else int(hard)
    per_worker = max(1, int(limit / FILES_PER_STREAM) - 64)
    return max(os.cpu_count() or 1, math.ceil(target_learners / per_worker))
