"""Robust rules and server optimizers: the Rust core against the best plain numpy, side by side.

    python benches/robust.py [--updates N] [--params D] [--repeats R]

Robust rules run over one C-contiguous float32 stack of ``updates × params`` (default 20 × 1M,
80 MB); server optimizers step a model of ``params`` float32 values. numpy references:

- ``coordinate_median``: ``np.median(stack, axis=0)``;
- ``trimmed_mean``: the faster of ``np.sort`` and ``np.partition`` along axis 0, then the mean
  of the kept rows (β = 0.2);
- ``krum`` / ``multi_krum``: distances from the Gram matrix ``stack @ stack.T`` (multithreaded
  BLAS; less accurate than the core's direct differences), then per-row sorts; Multi-Krum adds
  the mean of the selected rows (f = 3, m = n − f);
- ``clip_by_norm``: ``np.linalg.norm`` and one multiply;
- optimizers: float32 numpy with ``out=`` arguments (no temporaries beyond one scratch vector).

Times are the median of ``--repeats`` runs after one warm-up (whose result is checked against
numpy). Results go to ``benches/results/robust.json``. The machine's other load is reported:
the Rust numbers use every core, numpy mostly one, so a shared machine hurts Rust most.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

# The installed package (`pip install ".[bench]"` or an editable install), never the source
# folder: a source checkout has no built `_core`.
from metis_async import _core
from metis_async.aggregation import robust
from metis_async.aggregation.optimizers import make_optimizer

RESULTS = Path(__file__).resolve().parent / "results" / "robust.json"
BETA, F = 0.2, 3

F32 = NDArray[np.float32]


def timed(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has spent busy since boot (from /proc/stat), or 0."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


# --- numpy references -----------------------------------------------------------------------


def numpy_trimmed_sort(stack: F32) -> F32:
    n = stack.shape[0]
    k = int(BETA * n)
    return np.sort(stack, axis=0)[k : n - k].mean(axis=0, dtype=np.float64).astype(np.float32)


def numpy_trimmed_partition(stack: F32) -> F32:
    n = stack.shape[0]
    k = int(BETA * n)
    middle = np.partition(stack, (k, n - k - 1), axis=0)[k : n - k]
    return middle.mean(axis=0, dtype=np.float64).astype(np.float32)


def numpy_krum_scores(stack: F32) -> NDArray[np.float64]:
    n = stack.shape[0]
    gram = (stack @ stack.T).astype(np.float64)
    norms = np.diag(gram)
    distances = norms[:, None] + norms[None, :] - 2 * gram
    np.fill_diagonal(distances, np.inf)
    return np.sort(distances, axis=1)[:, : n - F - 2].sum(axis=1)


def numpy_multi_krum(stack: F32) -> F32:
    chosen = np.argsort(numpy_krum_scores(stack), kind="stable")[: stack.shape[0] - F]
    return stack[chosen].mean(axis=0, dtype=np.float64).astype(np.float32)


def numpy_clip(update: F32, max_norm: float) -> F32:
    norm = float(np.linalg.norm(update))
    return update * np.float32(min(1.0, max_norm / norm))


class NumpyOptimizer:
    """The optimizers' formulas in float32 numpy, in place where numpy allows."""

    def __init__(self, kind: str, length: int) -> None:
        self.kind = kind
        self.m = np.zeros(length, dtype=np.float32)
        self.v = np.full(length, 1e-6, dtype=np.float32)
        self.tmp = np.empty(length, dtype=np.float32)

    def step(self, x: F32, d: F32) -> None:
        m, v, tmp = self.m, self.v, self.tmp
        if self.kind == "fedavg":
            np.add(x, d, out=x)
            return
        if self.kind == "fedavgm":
            np.multiply(m, np.float32(0.9), out=m)
            np.add(m, d, out=m)
            np.add(x, m, out=x)
            return
        np.multiply(m, np.float32(0.9), out=m)
        np.multiply(d, np.float32(0.1), out=tmp)
        np.add(m, tmp, out=m)
        np.multiply(d, d, out=tmp)  # d²
        if self.kind == "fedadam":
            np.multiply(v, np.float32(0.99), out=v)
            np.multiply(tmp, np.float32(0.01), out=tmp)
            np.add(v, tmp, out=v)
        else:  # fedyogi
            sign = np.sign(v - tmp)
            np.multiply(tmp, np.float32(0.01), out=tmp)
            np.multiply(tmp, sign, out=tmp)
            np.subtract(v, tmp, out=v)
        np.sqrt(v, out=tmp)
        np.add(tmp, np.float32(1e-3), out=tmp)
        np.divide(m, tmp, out=tmp)
        np.multiply(tmp, np.float32(0.01), out=tmp)
        np.add(x, tmp, out=x)


# --- cases ----------------------------------------------------------------------------------


def rule_cases(stack: F32, repeats: int) -> list[dict[str, Any]]:
    update = stack[0]
    cases: list[tuple[str, Callable[[], Any], list[Callable[[], Any]]]] = [
        (
            "coordinate_median",
            lambda: robust.coordinate_median(stack),
            [lambda: np.median(stack, axis=0)],
        ),
        (
            "trimmed_mean",
            lambda: robust.trimmed_mean(stack, BETA),
            [lambda: numpy_trimmed_sort(stack), lambda: numpy_trimmed_partition(stack)],
        ),
        ("krum_scores", lambda: robust.krum_scores(stack, F), [lambda: numpy_krum_scores(stack)]),
        ("multi_krum", lambda: robust.multi_krum(stack, F), [lambda: numpy_multi_krum(stack)]),
        (
            "clip_by_norm",
            lambda: robust.clip_by_norm(update, 1.0),
            [lambda: numpy_clip(update, 1.0)],
        ),
    ]
    results = []
    for name, rust, numpys in cases:
        np.testing.assert_allclose(rust(), numpys[0](), rtol=1e-4, atol=1e-5)
        rust_s = timed(rust, repeats)
        numpy_s = min(timed(fn, repeats) for fn in numpys)
        results.append({"name": name, "rust_s": rust_s, "numpy_s": numpy_s})
    return results


def optimizer_cases(params: int, repeats: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(1)
    delta = (rng.standard_normal(params) * 1e-3).astype(np.float32)
    results = []
    for kind in ("fedavg", "fedavgm", "fedadam", "fedyogi"):
        x_rust = np.zeros(params, dtype=np.float32)
        x_numpy = x_rust.copy()
        rust, reference = make_optimizer(kind, params), NumpyOptimizer(kind, params)
        rust.step(x_rust, delta)
        reference.step(x_numpy, delta)
        np.testing.assert_allclose(x_rust, x_numpy, rtol=1e-5, atol=1e-9)
        rust_s = timed(lambda: rust.step(x_rust, delta), repeats)  # noqa: B023
        numpy_s = timed(lambda: reference.step(x_numpy, delta), repeats)  # noqa: B023
        results.append({"name": f"step {kind}", "rust_s": rust_s, "numpy_s": numpy_s})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--updates", type=int, default=20, help="n, updates per round")
    parser.add_argument("--params", type=int, default=1_000_000, help="d, model parameters")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per method")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    stack = rng.standard_normal((args.updates, args.params), dtype=np.float32)
    busy_before, own_before, wall_before = busy_cpu_seconds(), os.times(), time.time()
    cases = rule_cases(stack, args.repeats) + optimizer_cases(args.params, args.repeats)
    own_after = os.times()
    own = (own_after.user + own_after.system) - (own_before.user + own_before.system)
    others = max(busy_cpu_seconds() - busy_before - own, 0.0)
    wall = time.time() - wall_before
    for case in cases:
        case["speedup"] = case["numpy_s"] / case["rust_s"]

    result = {
        "benchmark": "robust",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", "benches/robust.py", *sys.argv[1:]]),
        "updates": args.updates,
        "params": args.params,
        "machine": {
            "cores": os.cpu_count(),
            "numpy": np.__version__,
            "python": platform.python_version(),
            "core_build_profile": _core.build_profile,
        },
        "other_processes_share_of_machine": others / (wall * (os.cpu_count() or 1)),
        "cases": cases,
    }
    print(
        f"{args.updates} updates x {args.params} params, {os.cpu_count()} cores, "
        f"core {_core.build_profile}; other processes used "
        f"{result['other_processes_share_of_machine']:.0%} of the machine"
    )
    print(f"{'case':>18} {'rust ms':>9} {'numpy ms':>9} {'speedup':>8}")
    for case in cases:
        print(
            f"{case['name']:>18} {case['rust_s'] * 1e3:9.2f} {case['numpy_s'] * 1e3:9.2f} "
            f"{case['speedup']:7.1f}x"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
