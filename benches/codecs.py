"""Update codecs benchmark: encode and decode+fold per codec against float32, side by side.

    python benches/codecs.py [--json] [--params N] [--repeats N]

One float32 update of ``--params`` values (default 10M, 40 MB) of normal values times 3:

- ``encode``: ``encode_chunk_messages(dtype=...)`` (Rust, GIL released, 4 MiB chunks), against
  numpy's ``astype`` (float16; the cast alone, no chunking or serialization) and the numpy
  reference encoder of ``metis_async.codecs`` that the learner uses (all codecs).
- ``fold``: the controller's receive path, ``InPlaceAssembler(dtype=...)`` checking each chunk
  where it lies and ``Accumulator.add_many`` decoding the ``Segments`` straight into the float64
  sum, against the same in-place path for float32 and numpy (decode with ``astype`` then an
  in-place axpy into a float64 sum).
- ``error``: max absolute and max relative error (relative over |x| >= 1e-3) of the round trip.

GB/s counts float32 bytes (values x 4), so codecs compare by model size, not by wire bytes; the
wire bytes per codec are reported too. Times are the best of ``--repeats`` after a warm-up.
Results go to ``benches/results/codecs.json``; ``--json`` prints the result as one JSON object
on the last line. Runs in well under a minute.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from metis_async import codecs, wire
from metis_async._core import Accumulator, InPlaceAssembler, encode_chunk_messages
from metis_async.v1 import controller_pb2 as pb

RESULTS = Path(__file__).resolve().parent / "results" / "codecs.json"
CHUNK = wire.MAX_CHUNK_BYTES
FIELD = wire.LEARNER_CHUNK_FIELD
NAMES = {
    pb.DTYPE_FLOAT32: "float32",
    pb.DTYPE_FLOAT16: "float16",
    pb.DTYPE_BFLOAT16: "bfloat16",
    pb.DTYPE_INT8: "int8",
}


def best(fn: Callable[[], object], repeats: int) -> float:
    """Best wall time of `repeats` runs of `fn` after one warm-up (seconds)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def fold_in_place(messages: list[bytes], dtype: int, n: int, acc: Accumulator) -> None:
    """The controller's path: check each chunk in place, fold the Segments into `acc`."""
    assembler = InPlaceAssembler(
        n * codecs.item_size(dtype), 1, len(messages), CHUNK, FIELD, True, dtype
    )
    for raw in messages:
        assembler.add_message(raw)
    acc.add_many([assembler.take()], [1.5], check_finite=False)


def run(params: int, repeats: int) -> dict[str, Any]:
    flat = (np.random.default_rng(0).standard_normal(params) * 3).astype(np.float32)
    gb = flat.nbytes / 1e9
    acc = Accumulator(params)
    total = np.zeros(params)
    f32_messages = encode_chunk_messages(flat, 1, CHUNK, FIELD)
    f32_fold = best(lambda: fold_in_place(f32_messages, pb.DTYPE_FLOAT32, params, acc), repeats)
    half = flat.astype(np.float16)

    def numpy_fold() -> None:
        decoded = half.astype(np.float32)
        total.__iadd__(decoded * np.float64(1.5))

    baseline = {
        "float32_in_place_fold_gbps": gb / f32_fold,
        "numpy_astype_f16_encode_gbps": gb / best(lambda: flat.astype(np.float16), repeats),
        "numpy_f16_decode_fold_gbps": gb / best(numpy_fold, repeats),
    }
    per_codec: dict[str, Any] = {}
    for dtype in (pb.DTYPE_FLOAT16, pb.DTYPE_BFLOAT16, pb.DTYPE_INT8):
        messages = encode_chunk_messages(flat, 1, CHUNK, FIELD, dtype)
        encode = best(lambda d=dtype: encode_chunk_messages(flat, 1, CHUNK, FIELD, d), repeats)
        numpy_encode = best(
            lambda d=dtype: list(codecs.encode_chunks(flat, d, CHUNK)), max(1, repeats // 2)
        )
        fold = best(lambda m=messages, d=dtype: fold_in_place(m, d, params, acc), repeats)
        assembler = InPlaceAssembler(
            params * codecs.item_size(dtype), 1, len(messages), CHUNK, FIELD, True, dtype
        )
        for raw in messages:
            assembler.add_message(raw)
        back = assembler.take().to_array()  # type: ignore[union-attr]
        error = np.abs(back - flat)
        big = np.abs(flat) >= 1e-3
        per_codec[NAMES[dtype]] = {
            "wire_bytes": params * codecs.item_size(dtype),
            "encode_gbps": gb / encode,
            "numpy_reference_encode_gbps": gb / numpy_encode,
            "decode_fold_gbps": gb / fold,
            "fold_vs_float32_in_place": f32_fold / fold,
            "encode_vs_numpy_astype_f16": (gb / encode) / baseline["numpy_astype_f16_encode_gbps"],
            "max_abs_error": float(error.max()),
            "max_rel_error": float((error[big] / np.abs(flat[big])).max()),
        }
    return {
        "benchmark": "codecs",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "params": params,
        "chunk_bytes": CHUNK,
        "repeats": repeats,
        "baseline": baseline,
        "codecs": per_codec,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=int, default=10_000_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    args = parser.parse_args()
    result = run(args.params, args.repeats)
    base = result["baseline"]
    print(
        f"{args.params:,} values; float32 in-place fold {base['float32_in_place_fold_gbps']:.2f}"
        f" GB/s; numpy astype f16 {base['numpy_astype_f16_encode_gbps']:.2f} GB/s; numpy f16"
        f" decode+fold {base['numpy_f16_decode_fold_gbps']:.2f} GB/s"
    )
    print(f"{'codec':9} {'encode':>8} {'np ref':>8} {'fold':>8} {'fold/f32':>9} {'max abs':>9}")
    for name, row in result["codecs"].items():
        print(
            f"{name:9} {row['encode_gbps']:8.2f} {row['numpy_reference_encode_gbps']:8.2f}"
            f" {row['decode_fold_gbps']:8.2f} {row['fold_vs_float32_in_place']:9.2f}"
            f" {row['max_abs_error']:9.2e}"
        )
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
