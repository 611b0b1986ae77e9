"""Aggregation benchmark: the Rust core against the best plain numpy, side by side in one run.

    python benches/aggregation.py [--json] [--quick] [--repeats N]

Each case averages ``updates`` float32 updates of ``params`` parameters with random weights and
times one whole round (reset, fold every update, produce the float32 mean) per method:

- ``rust``: ``Accumulator`` fed one update at a time (streaming, memory O(model)).
- ``rust_batch``: ``weighted_average`` over all updates at once (tiled: each update read once).
- ``numpy_axpy``: the best in-place numpy loop over updates into a preallocated float64 sum,
  the faster of two variants: whole arrays (``np.multiply(u, w, out=tmp)``,
  ``np.add(acc, tmp, out=acc)``) and the same in L2-sized blocks so the temporary stays in cache.
- ``numpy_average``: ``np.average(stack, axis=0, weights=w)`` over a stacked 2-D array.

Then the receive pipeline the controller really runs (``pipeline`` in the JSON): 100 uploads of
10M float32 (16 x 1M with ``--quick``), each arriving as raw serialized 4 MiB ``LearnerMessage``
chunk messages, reassembled and checked by ``ChunkAssembler`` and folded 8 at a time with
``Accumulator.add_many(..., check_finite=False)``, against numpy copying the chunk data into
reused buffers, checking it with ``np.isfinite`` and folding it with an in-place axpy.

Run it from an installed package (``pip install ".[bench]"`` or ``maturin develop --release``):
it imports ``metis_async`` as installed, never from the source folder.

Updates are distinct memory (rows of one C-contiguous stack, filled from a pool of 8 random
vectors with a per-row scale), so every method reads every byte from DRAM as a real controller
would. When the stack does not fit the memory budget, the streaming methods cycle through the pool
instead (pool >= 4x the last-level cache, so it still comes from DRAM) and the methods that need
every update at once report null with the reason.

The memory-bandwidth reference is a numpy copy of 256 MiB measured in the same run (1 and 2
threads, the faster counts); bandwidth is bytes read + bytes written per second. A fraction above
1 is possible: the accumulator's traffic is mostly reads, which are cheaper than a copy's writes.
Times are medians of ``--repeats`` runs after one warm-up run per method (whose result is also
checked against the others). np.average runs last in each case: releasing its multi-GB float64
temporary keeps the kernel busy reclaiming memory for a while, which slowed whatever ran next.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from metis_async import _core
from metis_async._core import (
    ChunkAssembler,
    InPlaceAssembler,
    encode_chunk_messages,
    first_non_finite,
)
from metis_async.aggregation import Accumulator, weighted_average

FULL_CASES = [(10, 1_000_000), (100, 1_000_000), (10, 10_000_000), (100, 10_000_000)]
QUICK_CASES = [(10, 1_000_000), (10, 10_000_000)]
# The receive-to-model path: uploads of params float32, each as raw chunk messages.
FULL_PIPELINE = (100, 10_000_000)
QUICK_PIPELINE = (16, 1_000_000)
CHUNK_BYTES = 4 << 20  # Welcome.max_chunk_bytes
LEARNER_CHUNK_FIELD = 3  # LearnerMessage.chunk
POOL = 8
BLOCK = 1 << 15  # numpy blocked axpy: 32 Ki float64 temporaries = 256 KiB, fits L2
WINDOW = 8  # updates folded per Accumulator.add_many in the streaming path (ServerStep default)
COPY_BYTES = 256 << 20
RESULTS = Path(__file__).resolve().parent / "results" / "aggregation.json"

F32 = NDArray[np.float32]
F64 = NDArray[np.float64]

DEFINITIONS = {
    "rust_s": "median seconds per round: Accumulator.reset, add every update, mean",
    "rust_batch_s": "median seconds: weighted_average over all updates at once",
    "rust_window_s": "median seconds per round: Accumulator.reset, add_many every WINDOW "
    "updates in arrival order (the controller's streaming path), mean",
    "window_speedup": "numpy_s / rust_window_s",
    "window_bandwidth_fraction": "bytes the windowed round must move (per update 4 B/param to "
    "fold; per window 16 B/param for the float64 sums) / s / copy bandwidth",
    "receive_check_s": "extra seconds per update for the NaN/inf check the controller runs on "
    "each 4 MiB chunk as it copies it into place (copy+check minus copy, medians)",
    "pipeline.rust_s": "median seconds per round of the controller's receive path: every upload "
    "arrives as raw serialized LearnerMessage chunk messages (4 MiB of data each); one "
    "ChunkAssembler per upload reassembles it (protobuf decode, copy and NaN/inf check fused, "
    "GIL released), then Accumulator.add_many(..., check_finite=False) folds WINDOW uploads at "
    "a time; ends with the float32 mean",
    "pipeline.numpy_s": "the same round in the best numpy: each upload's chunk data (already "
    "extracted from the messages, which numpy would need protobuf for: a head start) copied "
    "into one of WINDOW reused buffers, checked with np.isfinite(...).all() per chunk, folded "
    "with np.multiply(u, w, out=tmp64) + np.add(acc, tmp64, out=acc); ends with the mean",
    "pipeline.speedup": "pipeline.numpy_s / pipeline.rust_s",
    "pipeline.receive_rust_s": "median seconds to reassemble and check one upload (ChunkAssembler)",
    "pipeline.receive_numpy_s": "median seconds for numpy to copy one upload's chunks into a "
    "reused buffer and check them with np.isfinite",
    "pipeline.receive_numpy_first_non_finite_s": "the same with the core's first_non_finite as "
    "the check (what metis_async.wire.PayloadAssembler does today)",
    "numpy_axpy_s": "median seconds per round, best in-place numpy loop (whole or blocked)",
    "numpy_average_s": "median seconds: np.average(stack, axis=0, weights=w) to float32",
    "numpy_s": "best of numpy_axpy_s and numpy_average_s",
    "speedup": "numpy_s / rust_s (streaming Rust against the best numpy)",
    "batch_speedup": "numpy_s / rust_batch_s",
    "bandwidth_fraction": (
        "streaming Rust's achieved bytes/s divided by the measured copy bandwidth, counting the "
        "bytes a round must move: per add 4 B/param read of the update plus 8 read + 8 written "
        "of the float64 sum; reset writes 8 and mean reads 8 and writes 4 B/param. The extra "
        "read that validates each update before it is added is not counted as useful bytes."
    ),
    "batch_bandwidth_fraction": (
        "weighted_average's bytes/s over the copy bandwidth, counting 4 B/param read per update "
        "and 4 B/param written for the result"
    ),
}


# --- machine --------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    blas: Any = None
    try:
        config = np.show_config(mode="dicts")
        found = config.get("Build Dependencies", {}).get("blas", {})
        blas = {key: found.get(key) for key in ("name", "version", "openblas configuration")}
    except (TypeError, AttributeError):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cores_usable": affinity,
        "rayon_threads": int(os.environ.get("RAYON_NUM_THREADS", "0")) or affinity,
        "numpy_threads": "1 (ufuncs and np.average are single-threaded; no BLAS call involved)",
        "numpy": np.__version__,
        "numpy_blas": blas,
        "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "core_version": _core.__version__,
        "core_build_profile": _core.build_profile,
        "last_level_cache_bytes": last_level_cache(),
        "mem_available_bytes": mem_available(),
    }


def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has spent busy since boot (from /proc/stat), or 0."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def last_level_cache() -> int:
    """Largest CPU cache in bytes (sysfs), or 32 MiB when unknown."""
    sizes = []
    for entry in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = entry.read_text().strip()
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        sizes.append(int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text))
    return max(sizes, default=32 << 20)


def mem_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


# --- timing ---------------------------------------------------------------------------------


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def copy_bandwidth(repeats: int) -> dict[str, float]:
    """numpy copy of COPY_BYTES with 1 and 2 threads; bytes read + written per second."""
    src = np.ones(COPY_BYTES // 8)
    dst = np.empty_like(src)
    half = src.size // 2

    def one() -> None:
        np.copyto(dst, src)

    def two() -> None:
        worker = threading.Thread(target=np.copyto, args=(dst[:half], src[:half]))
        worker.start()
        np.copyto(dst[half:], src[half:])
        worker.join()

    one()  # fault the pages in
    two()
    t1 = statistics.median(timed(one) for _ in range(max(repeats, 5)))
    t2 = statistics.median(timed(two) for _ in range(max(repeats, 5)))
    moved = 2 * COPY_BYTES
    return {
        "bytes": moved,
        "copy_1thread_GBps": moved / t1 / 1e9,
        "copy_2thread_GBps": moved / t2 / 1e9,
        "copy_GBps": max(moved / t1, moved / t2) / 1e9,
    }


# --- methods --------------------------------------------------------------------------------


def rust_round(acc: Accumulator, rows: list[F32], weights: list[float]) -> F32:
    acc.reset()
    for row, weight in zip(rows, weights, strict=True):
        acc.add(row, weight)
    return acc.mean()


def rust_window_round(acc: Accumulator, rows: list[F32], weights: list[float]) -> F32:
    """Streaming as the controller does it: fold arrivals WINDOW at a time. The controller has
    checked every value for NaN/inf chunk by chunk on receipt, while each chunk was in cache
    (its cost is measured apart, as receive_check_s), so the fold does not read them again."""
    acc.reset()
    for start in range(0, len(rows), WINDOW):
        acc.add_many(rows[start : start + WINDOW], weights[start : start + WINDOW], False)
    return acc.mean()


def receive_check_seconds(row: F32, repeats: int) -> dict[str, float]:
    """Cost of the controller's on-receipt check: copy one update in 4 MiB chunks into a buffer
    (what reassembly does anyway) with and without `first_non_finite` on each copied chunk."""
    chunk = (4 << 20) // 4
    buffer = np.empty_like(row)

    def copy(check: bool) -> None:
        for start in range(0, row.size, chunk):
            piece = buffer[start : start + chunk]
            np.copyto(piece, row[start : start + chunk])
            if check and first_non_finite(piece) is not None:
                raise ValueError("benchmark data must be finite")

    plain = statistics.median(timed(lambda: copy(False)) for _ in range(repeats))
    checked = statistics.median(timed(lambda: copy(True)) for _ in range(repeats))
    return {"receive_copy_s": plain, "receive_copy_and_check_s": checked}


def numpy_axpy_whole(acc: F64, tmp: F64, rows: list[F32], weights: list[float]) -> F32:
    acc.fill(0.0)
    for row, weight in zip(rows, weights, strict=True):
        np.multiply(row, weight, out=tmp)
        np.add(acc, tmp, out=acc)
    np.multiply(acc, 1.0 / sum(weights), out=acc)
    return acc.astype(np.float32)


def numpy_axpy_blocked(acc: F64, tmp: F64, rows: list[F32], weights: list[float]) -> F32:
    acc.fill(0.0)
    size = acc.size
    for row, weight in zip(rows, weights, strict=True):
        for start in range(0, size, BLOCK):
            stop = min(start + BLOCK, size)
            block = tmp[: stop - start]
            np.multiply(row[start:stop], weight, out=block)
            np.add(acc[start:stop], block, out=acc[start:stop])
    np.multiply(acc, 1.0 / sum(weights), out=acc)
    return acc.astype(np.float32)


def numpy_average(stack: F32, weights: list[float]) -> F32:
    return np.average(stack, axis=0, weights=weights).astype(np.float32)


# --- cases ----------------------------------------------------------------------------------


def run_case(updates: int, params: int, repeats: int, pool: list[F32]) -> dict[str, Any]:
    rng = np.random.default_rng(updates * 1_000_003 + params)
    weights = [float(w) for w in rng.uniform(0.5, 2.0, updates)]
    budget = 0.7 * mem_available()
    stack_bytes = updates * params * 4
    case: dict[str, Any] = {"updates": updates, "params": params, "repeats": repeats}

    stack: F32 | None = None
    if stack_bytes <= budget:
        stack = np.empty((updates, params), dtype=np.float32)
        for i in range(updates):
            np.multiply(pool[i % POOL], np.float32(1.0 + i / updates), out=stack[i])
        rows = list(stack)
        case["data"] = "distinct rows of a C-contiguous stack"
    else:
        rows = [pool[i % POOL] for i in range(updates)]
        case["data"] = f"cycled pool of {POOL} arrays (stack of {stack_bytes} B exceeds budget)"
        reason = f"needs all {stack_bytes} B of updates in memory; budget is {int(budget)} B"
        case["rust_batch_null_reason"] = case["numpy_average_null_reason"] = reason

    acc = Accumulator(params)
    acc64 = np.zeros(params)
    tmp = np.zeros(params)
    methods: dict[str, Callable[[], F32]] = {
        "rust": lambda: rust_round(acc, rows, weights),
        "rust_window": lambda: rust_window_round(acc, rows, weights),
    }
    if stack is not None:
        methods["rust_batch"] = lambda: weighted_average(rows, weights)
    methods["numpy_axpy_whole"] = lambda: numpy_axpy_whole(acc64, tmp, rows, weights)
    methods["numpy_axpy_blocked"] = lambda: numpy_axpy_blocked(acc64, tmp, rows, weights)
    if stack is not None:
        stack_ = stack
        # np.average multiplies into a float64 temporary as large as the stack, twice its size.
        if stack_bytes * 3 <= budget:
            methods["numpy_average"] = lambda: numpy_average(stack_, weights)
        else:
            case["numpy_average_null_reason"] = (
                f"np.average needs a {2 * stack_bytes} B float64 temporary; budget is "
                f"{int(budget)} B"
            )

    # Each method: one warm-up run (faults memory in, wakes the thread pool) checked against the
    # others, then its repeats back to back. np.average goes last: freeing its multi-GB
    # temporaries keeps the kernel busy for a while, which slowed whatever ran next.
    reference = methods["numpy_axpy_whole"]()
    median = {}
    for name, method in methods.items():
        np.testing.assert_allclose(method(), reference, rtol=1e-6, atol=1e-6, err_msg=name)
        median[name] = statistics.median(timed(method) for _ in range(repeats))

    whole, blocked = median["numpy_axpy_whole"], median["numpy_axpy_blocked"]
    case["rust_s"] = median["rust"]
    case["rust_batch_s"] = median.get("rust_batch")
    case["rust_window_s"] = median["rust_window"]
    receive = receive_check_seconds(rows[0], repeats)
    case.update(receive)
    case["receive_check_s"] = max(
        0.0, receive["receive_copy_and_check_s"] - receive["receive_copy_s"]
    )
    case["numpy_axpy_whole_s"] = whole
    case["numpy_axpy_blocked_s"] = blocked
    case["numpy_axpy_s"] = min(whole, blocked)
    case["numpy_axpy_variant"] = "blocked" if blocked < whole else "whole"
    case["numpy_average_s"] = median.get("numpy_average")
    candidates = [case["numpy_axpy_s"], case["numpy_average_s"]]
    case["numpy_s"] = min(t for t in candidates if t is not None)
    case["numpy_best"] = "np.average" if case["numpy_s"] == case["numpy_average_s"] else "axpy"
    case["speedup"] = case["numpy_s"] / case["rust_s"]
    case["batch_speedup"] = case["numpy_s"] / case["rust_batch_s"] if stack is not None else None
    case["window_speedup"] = case["numpy_s"] / case["rust_window_s"]
    windows = -(-updates // WINDOW)
    case["window_bytes"] = params * (4 * updates + 16 * windows + 20)
    case["stream_bytes"] = params * (20 * updates + 20)
    case["batch_bytes"] = params * (4 * updates + 4)
    return case


def add_fractions(case: dict[str, Any], copy_gbps: float) -> None:
    case["rust_GBps"] = case["stream_bytes"] / case["rust_s"] / 1e9
    case["bandwidth_fraction"] = case["rust_GBps"] / copy_gbps
    case["rust_window_GBps"] = case["window_bytes"] / case["rust_window_s"] / 1e9
    case["window_bandwidth_fraction"] = case["rust_window_GBps"] / copy_gbps
    if case["rust_batch_s"] is not None:
        case["rust_batch_GBps"] = case["batch_bytes"] / case["rust_batch_s"] / 1e9
        case["batch_bandwidth_fraction"] = case["rust_batch_GBps"] / copy_gbps
    else:
        case["rust_batch_GBps"] = case["batch_bandwidth_fraction"] = None


# --- receive pipeline -------------------------------------------------------------------------


def upload_messages(pool: list[F32], params: int) -> list[list[bytes]]:
    """Each pool vector's upload as serialized LearnerMessage chunk messages."""
    return [
        encode_chunk_messages(row[:params], i + 1, CHUNK_BYTES, LEARNER_CHUNK_FIELD)
        for i, row in enumerate(pool)
    ]


def rust_receive(messages: list[bytes], payload_id: int, nbytes: int) -> F32:
    """The upload copied into one buffer (checked as it lands)."""
    assembler = ChunkAssembler(nbytes, payload_id, len(messages), CHUNK_BYTES, LEARNER_CHUNK_FIELD)
    for message in messages:
        assembler.add_message(message)
    return assembler.take()


def rust_receive_in_place(messages: list[bytes], payload_id: int, nbytes: int) -> Any:
    """The upload checked where it lies and kept in its messages, as the controller does."""
    assembler = InPlaceAssembler(
        nbytes, payload_id, len(messages), CHUNK_BYTES, LEARNER_CHUNK_FIELD
    )
    for message in messages:
        assembler.add_message(message)
    return assembler.take()


def numpy_receive(chunks: list[bytes], out: NDArray[np.uint8], check: Callable[[F32], bool]) -> F32:
    """Copy chunk data into `out` and check every completed float32 value as it lands."""
    filled = checked = 0
    for data in chunks:
        end = filled + len(data)
        out[filled:end] = np.frombuffer(data, dtype=np.uint8)
        complete = end // 4
        if not check(out[checked * 4 : complete * 4].view(np.float32)):
            raise ValueError("benchmark data must be finite")
        filled, checked = end, complete
    return out.view(np.float32)


def numpy_is_finite(values: F32) -> bool:
    return bool(np.isfinite(values).all())


def core_is_finite(values: F32) -> bool:
    return first_non_finite(values) is None


def run_pipeline(updates: int, params: int, repeats: int, pool: list[F32]) -> dict[str, Any]:
    """100 uploads of 10M float32 (full size), from raw chunk messages to the new mean."""
    rng = np.random.default_rng(7)
    weights = [float(w) for w in rng.uniform(0.5, 2.0, updates)]
    nbytes = params * 4
    messages = upload_messages(pool, params)
    chunk_data = [
        [row[:params].tobytes()[s : s + CHUNK_BYTES] for s in range(0, nbytes, CHUNK_BYTES)]
        for row in pool
    ]
    acc = Accumulator(params)
    acc64, tmp = np.zeros(params), np.zeros(params)
    buffers = [np.empty(nbytes, dtype=np.uint8) for _ in range(WINDOW)]

    def rust_round(receive: Callable[[list[bytes], int, int], Any]) -> F32:
        acc.reset()
        window: list[Any] = []
        for i in range(updates):
            window.append(receive(messages[i % POOL], i % POOL + 1, nbytes))
            if len(window) == WINDOW or i == updates - 1:
                start = i + 1 - len(window)
                acc.add_many(window, weights[start : i + 1], False)
                window = []
        return acc.mean()

    def rust() -> F32:
        return rust_round(rust_receive_in_place)

    def rust_copy() -> F32:
        return rust_round(rust_receive)

    def numpy() -> F32:
        acc64.fill(0.0)
        for i in range(updates):
            update = numpy_receive(chunk_data[i % POOL], buffers[i % WINDOW], numpy_is_finite)
            np.multiply(update, weights[i], out=tmp)
            np.add(acc64, tmp, out=acc64)
        np.multiply(acc64, 1.0 / sum(weights), out=acc64)
        return acc64.astype(np.float32)

    np.testing.assert_allclose(rust(), numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(rust(), rust_copy())  # in place: the same bits
    rust_s = statistics.median(timed(rust) for _ in range(repeats))
    rust_copy_s = statistics.median(timed(rust_copy) for _ in range(repeats))
    numpy_s = statistics.median(timed(numpy) for _ in range(repeats))

    receive_repeats = max(repeats, 10)
    row = messages[0]
    receive_rust = statistics.median(
        timed(lambda: rust_receive(row, 1, nbytes)) for _ in range(receive_repeats)
    )

    def numpy_receive_seconds(check: Callable[[F32], bool]) -> float:
        return statistics.median(
            timed(lambda: numpy_receive(chunk_data[0], buffers[0], check))
            for _ in range(receive_repeats)
        )

    receive_numpy = {
        "isfinite": numpy_receive_seconds(numpy_is_finite),
        "core": numpy_receive_seconds(core_is_finite),
    }
    return {
        "updates": updates,
        "params": params,
        "chunk_bytes": CHUNK_BYTES,
        "window": WINDOW,
        "repeats": repeats,
        "rust_s": rust_s,
        "rust_copy_s": rust_copy_s,
        "numpy_s": numpy_s,
        "speedup": numpy_s / rust_s,
        "copy_speedup": numpy_s / rust_copy_s,
        "receive_rust_s": receive_rust,
        "receive_numpy_s": receive_numpy["isfinite"],
        "receive_numpy_first_non_finite_s": receive_numpy["core"],
        "receive_speedup": receive_numpy["isfinite"] / receive_rust,
        "receive_speedup_vs_first_non_finite": receive_numpy["core"] / receive_rust,
    }


def print_pipeline(pipeline: dict[str, Any]) -> None:
    name = f"{pipeline['updates']} x {pipeline['params'] / 1e6:g}M"
    print()
    print(
        f"receive pipeline {name} (raw {pipeline['chunk_bytes'] >> 20} MiB chunk messages -> "
        f"InPlaceAssembler -> add_many window {pipeline['window']}, vs numpy copy + isfinite + "
        "axpy):"
    )
    print(
        f"  round: rust in place {ms(pipeline['rust_s'])} ms, numpy {ms(pipeline['numpy_s'])} "
        f"ms, speedup {ratio(pipeline['speedup'])}; rust assembling a copy first "
        f"{ms(pipeline['rust_copy_s'])} ms ({ratio(pipeline['copy_speedup'])})"
    )
    print(
        f"  one upload received and checked: rust {ms(pipeline['receive_rust_s'])} ms, numpy "
        f"isfinite {ms(pipeline['receive_numpy_s'])} ms "
        f"({ratio(pipeline['receive_speedup'])}), numpy copy + first_non_finite "
        f"{ms(pipeline['receive_numpy_first_non_finite_s'])} ms "
        f"({ratio(pipeline['receive_speedup_vs_first_non_finite'])})"
    )


# --- report ---------------------------------------------------------------------------------


def ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1e3:9.1f}"


def ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:5.2f}x"


def print_table(result: dict[str, Any]) -> None:
    machine, reference = result["machine"], result["bandwidth_reference"]
    print(f"metis-async aggregation benchmark  {result['date']}  ({result['command']})")
    print(
        f"machine: {machine['cpu']}, {machine['cores_usable']} cores, rayon threads "
        f"{machine['rayon_threads']}, numpy {machine['numpy']} (single-threaded ufuncs), "
        f"core {machine['core_version']} {machine['core_build_profile']}"
    )
    print(
        f"copy bandwidth (read+write): 1 thread {reference['copy_1thread_GBps']:.1f} GB/s, "
        f"2 threads {reference['copy_2thread_GBps']:.1f} GB/s -> reference "
        f"{reference['copy_GBps']:.1f} GB/s"
    )
    others = result["other_processes"]
    print(
        f"other processes used {others['cpu_seconds']:.1f} CPU s during the "
        f"{others['run_seconds']:.0f} s run ({others['share_of_machine']:.0%} of the machine)"
    )
    if others["share_of_machine"] > 0.05:
        print("WARNING: the machine was shared during the run; Rust (2 threads) suffers most")
    if machine["core_build_profile"] != "release":
        print("WARNING: the Rust core is a debug build; rebuild with `maturin develop --release`")
    header = (
        f"{'case':>12} {'rust ms':>9} {'window ms':>9} {'batch ms':>9} {'axpy ms':>9} "
        f"{'average ms':>10} {'numpy ms':>9} {'speedup':>8} {'window':>7} {'batch':>7} "
        f"{'rust GB/s':>9} {'bw frac':>7} {'win frac':>8}"
    )
    print(header)
    print("-" * len(header))
    for case in result["cases"]:
        name = f"{case['updates']} x {case['params'] / 1e6:g}M"
        print(
            f"{name:>12} {ms(case['rust_s'])} {ms(case['rust_window_s'])} "
            f"{ms(case['rust_batch_s'])} {ms(case['numpy_axpy_s'])} "
            f"{ms(case['numpy_average_s']):>10} {ms(case['numpy_s'])} "
            f"{ratio(case['speedup']):>8} {ratio(case['window_speedup']):>7} "
            f"{ratio(case['batch_speedup']):>7} {case['rust_GBps']:9.1f} "
            f"{case['bandwidth_fraction']:7.2f} {case['window_bandwidth_fraction']:8.2f}"
        )
    print()
    print("speedup = best numpy / streaming Rust (one add per update); window = best numpy /")
    print(f"streaming Rust folding arrivals {WINDOW} at a time (Accumulator.add_many, as the")
    print("controller's ServerStep does); batch = best numpy / weighted_average;")
    print("bw frac = streaming Rust bytes/s (20 B/param per add) / copy reference.")
    print("axpy = faster of whole-array and L2-blocked numpy loops (see JSON for both).")
    for case in result["cases"]:
        for key in ("rust_batch_null_reason", "numpy_average_null_reason"):
            if key in case:
                print(f"{case['updates']} x {case['params']}: {key[:-12]} n/a: {case[key]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    parser.add_argument("--quick", action="store_true", help="two small cases, 3 repeats")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per method")
    args = parser.parse_args()
    repeats = args.repeats or (3 if args.quick else 5)
    cases = QUICK_CASES if args.quick else FULL_CASES

    biggest = max(params for _, params in cases)
    rng = np.random.default_rng(0)
    pool = [rng.standard_normal(biggest, dtype=np.float32) for _ in range(POOL)]

    load_before = os.getloadavg()[0]
    busy_before, own_before, wall_before = busy_cpu_seconds(), own_cpu_seconds(), time.time()
    reference = copy_bandwidth(repeats)
    results = []
    for updates, params in cases:
        view = [p[:params] for p in pool]
        results.append(run_case(updates, params, repeats, view))
    for case in results:
        add_fractions(case, reference["copy_GBps"])
    pipe_updates, pipe_params = QUICK_PIPELINE if args.quick else FULL_PIPELINE
    pipeline = run_pipeline(pipe_updates, pipe_params, repeats, pool)
    # CPU time other processes took during the run: the honest measure of how noisy it was.
    others = (busy_cpu_seconds() - busy_before) - (own_cpu_seconds() - own_before)
    wall = time.time() - wall_before

    result = {
        "benchmark": "aggregation",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", "benches/aggregation.py", *sys.argv[1:]]),
        "quick": args.quick,
        "machine": machine_info(),
        # Other processes on the machine distort the 2-thread Rust numbers most: a busy core
        # halves rayon's throughput while single-threaded numpy barely notices.
        "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},
        "other_processes": {
            "cpu_seconds": max(others, 0.0),
            "share_of_machine": max(others, 0.0) / (wall * (os.cpu_count() or 1)),
            "run_seconds": wall,
        },
        "bandwidth_reference": reference,
        "definitions": DEFINITIONS,
        "cases": results,
        "pipeline": pipeline,
    }
    print_table(result)
    print_pipeline(pipeline)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
