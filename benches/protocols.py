"""Protocol benchmark: time to accuracy of every policy on the simulated digits federation.

    python benches/protocols.py [--json] [--quick] [--seeds N] [--seconds S] [--jobs J]

Every case runs `metis_async.simulation.run_digits` (ALGORITHMS.md, "Reference simulation
(digits)": 50 learners, Dirichlet α = 0.5, per-step time 0.01 s × exp(N(0, 1)), 10 % stragglers
×10, 0.05 s latency per task) for S simulated seconds on seeds 0..N-1, side by side in one run,
with the real policy objects and the real Rust `ServerStep`; the test accuracy of every committed
version is recorded. Cases:

- the four protocols with their `SIMULATION_PROFILES` (metis_async/profiles.py: ALGORITHMS.md's
  reference settings with a tuned local learning rate): synchronous FedAvg (10 of 50 per round,
  waits for its round up to a 60 s deadline), semi-synchronous (λ = 2, cap 200 steps), FedAsync
  (C = 10, α = 0.6, polynomial a = 0.5) and FedBuff (C = 10, K = 5);
- variants worth knowing: synchronous with 130 % over-selection (closes each round at the 10
  fastest of 13 and cancels the rest), FedAsync and FedBuff with 20 learners in flight.

Reported per case, over the seeds: the median simulated seconds to 0.90 test accuracy (a seed
that never reaches it counts as infinitely slow; null when the median is), how many seeds reached
it, the mean final accuracy, the time-weighted mean accuracy of the last quarter, committed
versions, mean staleness of accepted updates, and real CPU seconds per run. `speedup` is the
synchronous case's median time to 0.90 divided by the case's. With --json the last line is one
JSON object, also written to benches/results/protocols.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # one run per process; tiny matrices

# The installed package (`pip install ".[bench]"` or an editable install), never the source
# folder: a source checkout has no built `_core`.
from metis_async.profiles import SIMULATION_PROFILES
from metis_async.simulation import policy_settings, run_digits
from metis_async.telemetry import configure_logging

TARGET = 0.90
RESULTS = Path(__file__).resolve().parent / "results" / "protocols.json"
BASELINE = "synchronous"

CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "synchronous": ("synchronous", {}),
    "synchronous_overselect": ("synchronous", {"over_selection": 1.3}),
    "semi_synchronous": ("semi_synchronous", {}),
    "asynchronous": ("asynchronous", {}),
    "asynchronous_c20": ("asynchronous", {"concurrency": 20}),
    "buffered": ("buffered", {}),
    "buffered_c20": ("buffered", {"concurrency": 20}),
}
"""Case name -> (protocol, settings overriding SIMULATION_PROFILES)."""

DEFINITIONS = {
    "seconds_to_target": "median over seeds of simulated seconds to the first version scoring "
    ">= target on the test set (never = infinity; null if the median is infinite)",
    "reached": "seeds that reached the target within the simulated time",
    "final_accuracy": "mean over seeds of the test accuracy of the last version",
    "late_accuracy": "mean over seeds of the time-weighted mean accuracy of the last quarter",
    "versions": "mean committed versions per run",
    "mean_staleness": "mean over seeds of the mean staleness (versions) of accepted updates",
    "cpu_seconds": "mean real CPU seconds per run (training, aggregation, scoring)",
    "speedup": "baseline seconds_to_target / this case's (> 1: reaches the target sooner)",
    "speedup_at_least": "when the baseline's median never reached the target: simulated "
    "seconds / this case's seconds_to_target, a lower bound of the speedup",
}


def run_case(job: tuple[str, int, float]) -> dict[str, Any]:
    """One case on one seed (runs in a worker process)."""
    name, seed, seconds = job
    protocol, settings = CASES[name]
    result = run_digits(protocol, seconds=seconds, seed=seed, **settings)
    return {
        "seed": seed,
        "seconds_to_target": result.seconds_to_target(TARGET),
        "final_accuracy": result.final_accuracy,
        "late_accuracy": result.mean_accuracy(0.75 * seconds),
        "versions": result.versions,
        "updates_accepted": result.updates_accepted,
        "updates_rejected": result.updates_rejected,
        "mean_staleness": result.mean_staleness,
        "max_staleness": result.max_staleness,
        "cpu_seconds": result.cpu_seconds,
    }


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median time to target and means of the rest over one case's seeds."""
    times = [r["seconds_to_target"] for r in runs]
    median = statistics.median(math.inf if t is None else t for t in times)
    staleness = [r["mean_staleness"] for r in runs if r["mean_staleness"] is not None]
    return {
        "seconds_to_target": None if math.isinf(median) else median,
        "reached": sum(t is not None for t in times),
        "final_accuracy": statistics.fmean(r["final_accuracy"] for r in runs),
        "final_accuracy_range": [
            min(r["final_accuracy"] for r in runs),
            max(r["final_accuracy"] for r in runs),
        ],
        "late_accuracy": statistics.fmean(r["late_accuracy"] for r in runs),
        "versions": statistics.fmean(r["versions"] for r in runs),
        "mean_staleness": statistics.fmean(staleness) if staleness else None,
        "cpu_seconds": statistics.fmean(r["cpu_seconds"] for r in runs),
        "runs": runs,
    }


def describe_settings(name: str) -> dict[str, Any]:
    """The case's policy settings as JSON-ready values."""
    protocol, overrides = CASES[name]
    settings = policy_settings(protocol, **overrides)
    return {k: v if isinstance(v, (int, float, str)) else repr(v) for k, v in settings.items()}


def print_table(result: dict[str, Any]) -> None:
    def fmt(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    def speedup(case: dict[str, Any]) -> str:
        if case["speedup_at_least"] is not None:
            return f">{case['speedup_at_least']:.1f}"
        return fmt(case["speedup"], ".1f")

    seeds = len(result["seeds"])
    print(
        "digits, 50 learners, Dirichlet 0.5, 10% stragglers x10, "
        f"{result['seconds']:g} simulated s, {seeds} seeds; target {TARGET:.2f}"
    )
    header = (
        f"{'case':<24}{'s to 0.90':>10}{'reached':>9}{'speedup':>9}{'final':>8}"
        f"{'late':>8}{'versions':>10}{'stale':>7}{'CPU s':>7}"
    )
    print(header)
    print("-" * len(header))
    for name, case in result["policies"].items():
        print(
            f"{name:<24}{fmt(case['seconds_to_target'], '.1f'):>10}"
            f"{case['reached']:>6}/{seeds:<2}{speedup(case):>9}"
            f"{case['final_accuracy']:>8.3f}{case['late_accuracy']:>8.3f}"
            f"{case['versions']:>10.0f}{fmt(case['mean_staleness'], '.1f'):>7}"
            f"{case['cpu_seconds']:>7.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    parser.add_argument("--quick", action="store_true", help="2 seeds, 20 simulated seconds")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per case (default 5)")
    parser.add_argument("--seconds", type=float, default=None, help="simulated seconds per run")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="worker processes")
    args = parser.parse_args()
    seeds = list(range(args.seeds or (2 if args.quick else 5)))
    seconds = args.seconds or (20.0 if args.quick else 30.0)

    started = time.perf_counter()
    jobs = [(name, seed, seconds) for name in CASES for seed in seeds]
    # The federation core logs every commit at info: thousands of lines per simulated run.
    with ProcessPoolExecutor(
        max(1, args.jobs), initializer=configure_logging, initargs=("warning",)
    ) as pool:
        runs = list(pool.map(run_case, jobs))
    by_case: dict[str, list[dict[str, Any]]] = {name: [] for name in CASES}
    for (name, _, _), run in zip(jobs, runs, strict=True):
        by_case[name].append(run)

    policies = {name: summarize(case_runs) for name, case_runs in by_case.items()}
    baseline = policies[BASELINE]["seconds_to_target"]
    for name, case in policies.items():
        mine = case["seconds_to_target"]
        case["speedup"] = baseline / mine if baseline is not None and mine else None
        # The baseline never got there: it is at least this many times slower.
        case["speedup_at_least"] = seconds / mine if baseline is None and mine else None
        case["protocol"] = CASES[name][0]
        case["settings"] = describe_settings(name)

    result = {
        "benchmark": "protocols",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", "benches/protocols.py", *sys.argv[1:]]),
        "quick": args.quick,
        "machine": {
            "cores": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "task": {
            "learners": 50,
            "alpha": 0.5,
            "stragglers": 0.1,
            "slowdown": 10.0,
            "step_seconds": 0.01,
            "latency_seconds": 0.05,
        },
        "target": TARGET,
        "seconds": seconds,
        "seeds": seeds,
        "baseline": BASELINE,
        "wall_seconds": time.perf_counter() - started,
        "defaults": sorted(SIMULATION_PROFILES),
        "definitions": DEFINITIONS,
        "policies": policies,
    }
    print_table(result)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
