"""Secure rounds through the real controller: plaintext, `he`, `he-multiparty` and `secagg`
side by side, in one run.

    python benches/secure_rounds.py [--learners N] [--params P] [--rounds R] [--workers W] [--json]

A controller in this process (gRPC on 127.0.0.1) and N reference learners (`run_learner`, one
thread and one connection each) that train instantly: each adds a fixed step to the model, so
the time is the controller's and the cryptography's, not training. Synchronous FedAvg, R rounds;
the steady round time is the mean interval between commits after the first. Every learner
does its real work: it encrypts (BFV, in Rust, GIL released), makes SecAgg+ keys, shares and
masks, decrypts or combines decryption shares. All of it shares this machine's cores with the
controller, so a round here is slower than with one device per learner. With `--workers W`
the controller runs W ingest worker processes, which keep the partial sums (float, ciphertext or
masked; multiparty keys do not run with workers and are skipped).

Prints each mode's steady round and its ratio to plaintext; writes
`benches/results/secure_rounds.json`, and `--json` prints it as the last line. Run from an
installed package (`pip install ".[bench]"`).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from metis_async.client import Backoff, Learner, run_learner
from metis_async.client.learner import EvaluateConfig, FitConfig, NDArrays
from metis_async.protocols import SynchronousPolicy, SynchronousSettings, TrainSettings
from metis_async.secure.aggregate import HomomorphicAggregation
from metis_async.secure.he import create_he_keys, read_controller_file, read_learner_keys
from metis_async.secure.multiparty import (
    create_committee_files,
    read_committee_file,
    read_party_file,
)
from metis_async.server import Controller, ControllerConfig
from metis_async.workers.hub import WorkerHub

RESULTS = Path(__file__).parent / "results" / "secure_rounds.json"
MODES = ("plaintext", "he", "he-multiparty", "secagg")
COMMITTEE = 3


class Instant(Learner):
    """Adds `step` to every parameter: no training time at all."""

    def __init__(self, params: int, step: float) -> None:
        self.params, self.step = params, np.float32(step)

    def get_parameters(self) -> NDArrays:
        return [np.zeros(self.params, np.float32)]

    def fit(
        self, parameters: NDArrays, config: FitConfig
    ) -> tuple[NDArrays, int, dict[str, float]]:
        return [p + self.step for p in parameters], 1, {}

    def evaluate(
        self, parameters: NDArrays, config: EvaluateConfig
    ) -> tuple[float, int, dict[str, float]]:
        return 0.0, 1, {}

    def num_examples(self) -> int:
        return 1


async def _serve(
    config: ControllerConfig,
    learners: int,
    params: int,
    rounds: int,
    keys: dict[str, Any],
    workers: int = 0,
) -> list[tuple[int, float]]:
    commits: list[tuple[int, float]] = []

    def on_commit(version: int, _: list[npt.NDArray[np.generic]]) -> None:
        commits.append((version, time.perf_counter()))  # superseded versions are skipped

    policy = SynchronousPolicy(
        SynchronousSettings(
            min_learners=learners,
            rounds=rounds,
            round_deadline_seconds=600.0,
            train=TrainSettings(local_steps=1),
        )
    )
    model = [np.zeros(params, np.float32)]
    controller: Controller | WorkerHub
    if workers:
        controller = WorkerHub(
            policy, config, workers=workers, initial_model=model, on_commit=on_commit
        )
    else:
        controller = Controller(policy, config, initial_model=model, on_commit=on_commit)
    port = await controller.start()
    threads = [
        threading.Thread(
            target=run_learner,
            args=(f"127.0.0.1:{port}", Instant(params, 0.01)),
            kwargs={
                "learner_id": f"learner-{i}",
                "backoff": Backoff(initial_seconds=0.1, max_attempts=20),
                **{k: (v(i) if callable(v) else v) for k, v in keys.items()},
            },
            daemon=True,
        )
        for i in range(learners)
    ]
    for thread in threads:
        thread.start()
    await controller.wait_finished(1800)
    await controller.stop(grace_seconds=120.0)  # returns once the learners have their shutdown
    for thread in threads:
        await asyncio.to_thread(thread.join, 30)
    return commits


def run_mode(
    mode: str, learners: int, params: int, rounds: int, workers: int = 0
) -> dict[str, Any]:
    """One federation of `mode`; its steady round time."""
    with tempfile.TemporaryDirectory(prefix="metis-secure-rounds-") as keys_dir:
        config: dict[str, Any] = {"host": "127.0.0.1", "port": 0}
        keys: dict[str, Any] = {}
        if mode == "he":
            controller_file, learner_file, _ = create_he_keys(keys_dir)
            config["he"] = HomomorphicAggregation(*read_controller_file(controller_file))
            keys["he_keys"] = read_learner_keys(learner_file)
        elif mode == "he-multiparty":
            committee_file, *party_files = create_committee_files(keys_dir, COMMITTEE)
            committee = read_committee_file(committee_file)
            members = tuple(f"learner-{i}" for i in range(COMMITTEE))
            config["he"] = HomomorphicAggregation(
                committee.settings, committee.key_id, committee=members
            )
            parties = [read_party_file(p) for p in party_files]
            keys["he_committee"] = committee
            keys["he_party"] = lambda i: parties[i] if i < COMMITTEE else None
        elif mode == "secagg":
            config["secagg"] = True
        started = time.perf_counter()
        commits = asyncio.run(
            _serve(ControllerConfig(**config), learners, params, rounds, keys, workers)
        )
        wall = time.perf_counter() - started
    steady = None  # seconds a version from the first committed on
    if len(commits) >= 2:
        (v0, t0), (v1, t1) = commits[0], commits[-1]
        steady = (t1 - t0) / (v1 - v0)
    return {
        "mode": mode,
        "workers": workers,
        "versions": commits[-1][0] if commits else 0,
        "round_seconds": steady,
        "first_version_seconds": (commits[0][1] - started) if commits else None,
        "wall_seconds": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--learners", type=int, default=10)
    parser.add_argument("--params", type=int, default=100_000, help="float32 values")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated")
    parser.add_argument("--workers", type=int, default=0, help="ingest workers (0: one process)")
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    args = parser.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    unknown = set(modes) - set(MODES)
    if unknown:
        raise SystemExit(f"unknown modes {sorted(unknown)}; choose from {MODES}")
    if args.workers and "he-multiparty" in modes:
        print("he-multiparty: skipped (multiparty keys do not run with ingest workers)")
        modes.remove("he-multiparty")
    rows = [run_mode(m, args.learners, args.params, args.rounds, args.workers) for m in modes]
    plain = next((r["round_seconds"] for r in rows if r["mode"] == "plaintext"), None)
    for row in rows:
        ratio = row["round_seconds"] / plain if plain and row["round_seconds"] else None
        row["vs_plaintext"] = ratio
        shown = f"{row['round_seconds']:.3f} s" if row["round_seconds"] else "n/a"
        print(
            f"{row['mode']:>14}: {args.learners} learners x {args.params:,}"
            + (f", {args.workers} workers" if args.workers else "")
            + f": round {shown}"
            + (f" ({ratio:.1f}x plaintext)" if ratio else "")
            + f", {row['versions']} versions in {row['wall_seconds']:.1f} s"
        )
    result = {
        "benchmark": "secure_rounds",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "learners": args.learners,
        "params": args.params,
        "rounds": args.rounds,
        "workers": args.workers,
        "peak_rss_bytes_whole_process": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "modes": rows,
    }
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
