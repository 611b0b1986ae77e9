"""Encrypted aggregation benchmark: BFV (Rust, fhe.rs) side by side with plaintext aggregation.

    python benches/secure.py [--params N] [--learners K] [--repeats R] [--json]

For one update of ``params`` float32 values (1M by default) it measures, in one run:

- the learner's side: ciphertext bytes (against the 4 bytes a value of float32), encryption and
  decryption time;
- the controller's side: adding one update's ciphertexts to the keyless sum (``CipherSum.add``)
  with weight 1 and with an integer weight, against ``Accumulator.add`` of the same float32
  update (the plaintext path), and the ratio;
- a whole aggregate of ``learners`` updates: every learner encrypts (timed once, times K),
  the controller adds K ciphertext lists, one learner decrypts the weighted average; its error
  against numpy's average of the plaintext updates.

Then one SecAgg+ round for each of ``--secagg-learners`` (10 and 100): key agreement and
sealed shares, every learner's masked input (per learner: they run in parallel in a
deployment), the server's unmasking, against plaintext aggregation of the same updates, with
the error of the mean. ``--flower NODES`` also runs Flower's SecAgg+ workflow (its deployment
runtime, NODES SuperNodes, instant clients, our neighbours and threshold) and the same run
without SecAgg+, in a Flower venv the benchmark creates (``benches/.flower-venv``); minutes.

Targets (issue 10): <= 34 MB of ciphertext and <= 5 ms of controller time per 1M-parameter
update; SecAgg+ >= 10x faster than Flower's on 100 learners x 1M. Results go to
``benches/results/secure.json``; ``--json`` prints them as the last line.
Run from an installed package (``pip install ".[bench]"``).
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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from metis_async._core import (
    Accumulator,
    HeParty,
    SecAggLearner,
    he_collective_public_key,
    he_combine,
    secagg_mean,
    secagg_unmask_sum,
)
from metis_async.secure import HeSettings, SecAggSettings
from metis_async.secure.multiparty import new_crs

RESULTS = Path(__file__).resolve().parent / "results" / "secure.json"


def _median_seconds(work: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(params: int, learners: int, repeats: int, secagg_learners: Sequence[int]) -> dict[str, Any]:
    """Measure everything for `params` values and an aggregate of `learners` updates."""
    settings = HeSettings()
    ctx = settings.context()
    secret, public = ctx.generate_keys()
    rng = np.random.default_rng(0)
    updates = [rng.normal(0.0, 0.01, params).astype(np.float32) for _ in range(learners)]
    update = updates[0]

    ciphertexts = ctx.encrypt(public, update)
    encrypt_s = _median_seconds(lambda: ctx.encrypt(public, update), repeats)
    total = ctx.sum()
    total.add(ciphertexts, 1)
    add_s = _median_seconds(lambda: total.add(ciphertexts, 1), repeats)
    weighted_add_s = _median_seconds(lambda: total.add(ciphertexts, 7), repeats)
    summed = total.ciphertexts()
    decrypt_s = _median_seconds(
        lambda: ctx.decrypt(secret, summed, params, total.total_weight), repeats
    )
    plain = Accumulator(params)
    plain.add(update, 1.0)
    plain_add_s = _median_seconds(lambda: plain.add(update, 1.0), repeats)

    weights = [int(w) for w in rng.integers(1, 100, size=learners)]
    encrypted = [ctx.encrypt(public, u) for u in updates]
    aggregate = ctx.sum()
    start = time.perf_counter()
    for cts, weight in zip(encrypted, weights, strict=True):
        aggregate.add(cts, weight)
    aggregate_add_s = time.perf_counter() - start
    start = time.perf_counter()
    average = ctx.decrypt(secret, aggregate.ciphertexts(), params, aggregate.total_weight)
    aggregate_decrypt_s = time.perf_counter() - start
    expected = np.average(np.stack(updates), axis=0, weights=weights)
    cipher_bytes = sum(len(c) for c in ciphertexts)
    return {
        "benchmark": "secure",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "params": params,
        "learners": learners,
        "repeats": repeats,
        "he": {
            "scheme": "BFV (fhe.rs 0.1.1), shared learner key",
            "settings": settings.to_json(),
            "ciphertexts": len(ciphertexts),
            "ciphertext_bytes": cipher_bytes,
            "ciphertext_bytes_per_1m_params": cipher_bytes * 1_000_000 / params,
            "vs_float32_bytes": cipher_bytes / update.nbytes,
            "encrypt_seconds": encrypt_s,
            "decrypt_seconds": decrypt_s,
            "controller_add_seconds": add_s,
            "controller_weighted_add_seconds": weighted_add_s,
            "controller_add_seconds_per_1m_params": add_s * 1_000_000 / params,
            "plaintext_add_seconds": plain_add_s,
            "add_vs_plaintext": add_s / plain_add_s,
            "aggregate_add_seconds": aggregate_add_s,
            "aggregate_decrypt_seconds": aggregate_decrypt_s,
            "aggregate_max_abs_error": float(np.abs(average - expected).max()),
        },
        "he_multiparty": {str(p): multiparty(settings, update, p, repeats) for p in (3, 10)},
        "secagg": {str(n): secagg_round(params, n) for n in secagg_learners},
    }


def multiparty(
    settings: HeSettings, update: np.ndarray, parties: int, repeats: int
) -> dict[str, Any]:
    """Multiparty keys: key shares, the collective key, one member's decryption shares of an
    update's ciphertexts and their combination, side by side with single-key decryption."""
    ctx = settings.context()
    crs = new_crs()
    members = [HeParty(ctx, i, parties, crs) for i in range(parties)]
    start = time.perf_counter()
    key_shares = [m.key_share() for m in members]
    key_share_s = (time.perf_counter() - start) / parties
    public = he_collective_public_key(ctx, crs, key_shares)
    ciphertexts = ctx.encrypt(public, update)
    shares_s = _median_seconds(lambda: members[0].decryption_shares(ciphertexts), repeats)
    shares = [m.decryption_shares(ciphertexts) for m in members]
    combine_s = _median_seconds(
        lambda: he_combine(ctx, ciphertexts, shares, update.size, 1.0), repeats
    )
    values = he_combine(ctx, ciphertexts, shares, update.size, 1.0)
    return {
        "parties": parties,
        "key_share_seconds": key_share_s,
        "member_shares_seconds": shares_s,
        "member_share_bytes": sum(len(s) for s in shares[0]),
        "combine_seconds": combine_s,
        "max_abs_error": float(np.abs(values - np.clip(update, -4, 4)).max()),
    }


def flower_secagg(params: int, nodes: int, rounds: int) -> dict[str, Any]:
    """Flower's SecAgg+ workflow (deployment runtime: SuperLink, `nodes` SuperNodes, instant
    clients) with our round's neighbours and threshold, and the same run without SecAgg+, so
    its cost is isolated from the runtime's own."""
    from flower_runtime import ensure_flower_venv, run_deployment  # benches/, beside this script

    venv = ensure_flower_venv(Path(__file__).resolve().parent / ".flower-venv")
    if venv["python"] is None:
        return {"status": venv["status"]}
    s = SecAggSettings.for_learners(nodes)
    python = Path(venv["python"])
    # Flower's num_shares counts the node's own share (an odd number: (num_shares - 1) / 2
    # neighbours each side; an even one ends the workflow before any aggregate): k + 1.
    shares = s.neighbours + 1
    secagg = run_deployment(python, nodes, params, rounds, secagg=(shares, s.threshold))
    plain = run_deployment(python, nodes, params, rounds)
    for run in (secagg, plain):
        run.pop("events", None)
    return {
        "flwr": venv["version"],
        "nodes": nodes,
        "num_shares": shares,
        "reconstruction_threshold": s.threshold,
        "secagg": secagg,
        "plain": plain,
    }


def secagg_round(params: int, learners: int) -> dict[str, Any]:
    """One SecAgg+ round of `learners` x `params`, every step timed (learners' steps are per
    learner: in a deployment they run in parallel), against plaintext aggregation."""
    settings = SecAggSettings.for_learners(learners)
    s = settings
    args = (s.round_id, s.learners, s.neighbours, s.threshold)
    rng = np.random.default_rng(1)
    updates = [rng.uniform(-0.1, 0.1, params).astype(np.float32) for _ in range(learners)]
    start = time.perf_counter()
    nodes = [SecAggLearner(*args, i, s.clip, s.bits) for i in range(learners)]
    keys = {i: node.advertise() for i, node in enumerate(nodes)}
    for i, node in enumerate(nodes):
        for to, sealed in node.share(keys):
            nodes[to].receive(i, sealed)
    setup_s = time.perf_counter() - start
    inputs, mask_times = {}, []
    for i, node in enumerate(nodes):
        begin = time.perf_counter()
        inputs[i] = node.masked_input(updates[i])
        mask_times.append(time.perf_counter() - begin)
    start = time.perf_counter()
    survivors = set(inputs)
    answers = [a for node in nodes for a in node.unmask(survivors, set())]
    total = secagg_unmask_sum(*args, keys, set(range(learners)), inputs, answers, s.clip, s.bits)
    mean = secagg_mean(total, learners, s.clip, s.bits)
    unmask_s = time.perf_counter() - start
    plain = Accumulator(params)
    start = time.perf_counter()
    for update in updates:
        plain.add(update, 1.0)
    plain_mean = plain.mean()
    plain_s = time.perf_counter() - start
    learner_s = setup_s / learners + statistics.median(mask_times)
    step = 2 * s.clip / (2**s.bits - 1)
    return {
        "settings": {"neighbours": s.neighbours, "threshold": s.threshold, "bits": s.bits},
        "setup_seconds_all_learners": setup_s,
        "masked_input_seconds_per_learner": statistics.median(mask_times),
        "server_unmask_seconds": unmask_s,
        "round_seconds": learner_s + unmask_s,
        "plaintext_aggregation_seconds": plain_s,
        "vs_plaintext": (learner_s + unmask_s) / plain_s,
        "max_abs_error": float(np.abs(mean - plain_mean).max()),
        "quantization_step": step,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=int, default=1_000_000, help="float32 values")
    parser.add_argument("--learners", type=int, default=10, help="updates in the aggregate")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--secagg-learners", default="10,100", help="SecAgg+ round sizes, comma-separated"
    )
    parser.add_argument(
        "--flower",
        type=int,
        default=0,
        metavar="NODES",
        help="also run Flower's SecAgg+ workflow with NODES SuperNodes (minutes; its own venv)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    args = parser.parse_args()
    sizes = [int(n) for n in args.secagg_learners.split(",") if n]
    result = run(args.params, args.learners, args.repeats, sizes)
    result["flower_secagg"] = flower_secagg(args.params, args.flower, 3) if args.flower else None
    he = result["he"]
    mb = he["ciphertext_bytes"] / 1e6
    print(
        f"BFV, {args.params:,} float32 values: {he['ciphertexts']} ciphertexts, {mb:.1f} MB "
        f"({he['vs_float32_bytes']:.1f}x float32); learner encrypt "
        f"{he['encrypt_seconds'] * 1e3:.0f} ms, decrypt {he['decrypt_seconds'] * 1e3:.0f} ms"
    )
    print(
        f"controller add {he['controller_add_seconds'] * 1e3:.2f} ms (weighted "
        f"{he['controller_weighted_add_seconds'] * 1e3:.2f} ms) vs plaintext Accumulator.add "
        f"{he['plaintext_add_seconds'] * 1e3:.2f} ms: {he['add_vs_plaintext']:.1f}x"
    )
    print(
        f"aggregate of {args.learners}: adds {he['aggregate_add_seconds'] * 1e3:.0f} ms, decrypt "
        f"{he['aggregate_decrypt_seconds'] * 1e3:.0f} ms, max error "
        f"{he['aggregate_max_abs_error']:.2e}"
    )
    for p, row in result["he_multiparty"].items():
        print(
            f"multiparty keys, {p} parties: a member's decryption shares "
            f"{row['member_shares_seconds'] * 1e3:.0f} ms ({row['member_share_bytes'] / 1e6:.1f} "
            f"MB), combining all {row['combine_seconds'] * 1e3:.0f} ms (single-key decrypt "
            f"{he['decrypt_seconds'] * 1e3:.0f} ms); max error {row['max_abs_error']:.1e}"
        )
    for n, row in result["secagg"].items():
        print(
            f"SecAgg+ {n} learners (k={row['settings']['neighbours']}, "
            f"t={row['settings']['threshold']}): per learner setup+mask "
            f"{row['round_seconds'] - row['server_unmask_seconds']:.3f} s, server unmask "
            f"{row['server_unmask_seconds']:.3f} s, round {row['round_seconds']:.3f} s vs "
            f"plaintext {row['plaintext_aggregation_seconds']:.3f} s "
            f"({row['vs_plaintext']:.0f}x); max error {row['max_abs_error']:.1e}"
        )
    flower = result["flower_secagg"]
    if flower and "secagg" in flower:
        theirs, plain = flower["secagg"], flower["plain"]
        ours = result["secagg"].get(str(flower["nodes"]))
        line = f"Flower {flower['flwr']} SecAgg+ {flower['nodes']} nodes: {theirs['status']}"
        if theirs.get("round_s") and plain.get("round_s"):
            cost = theirs["round_s"] - plain["round_s"]
            line += (
                f", round {theirs['round_s']:.1f} s (without SecAgg+ {plain['round_s']:.1f} s:"
                f" SecAgg+ costs {cost:.1f} s)"
            )
            if ours:
                flower["ours_round_s"] = ours["round_seconds"]
                flower["ratio"] = theirs["round_s"] / ours["round_seconds"]
                flower["secagg_cost_ratio"] = cost / ours["round_seconds"]
                line += f"; ours {ours['round_seconds']:.3f} s: {flower['ratio']:.0f}x"
        print(line)
    elif flower:
        print(f"Flower SecAgg+: {flower['status']}")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
