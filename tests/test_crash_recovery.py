"""Exactly-once updates across `kill -9`: a controller (`metis-async serve --state-dir`) is killed
at random instants and restarted on the same directory while real learners keep training; the
final model must be the one every acknowledged update, counted once, gives.

Learners' updates are small integers (times powers of two), so float sums are exact in any
order and a lost or double-counted update changes the final model.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from metis_async.checkpoints import Checkpoint
from metis_async.client import (
    Backoff,
    FitConfig,
    Learner,
    LearnerRunner,
    NDArrays,
    RunSummary,
    UnackedUpdates,
)
from metis_async.client.learner import EvaluateConfig
from metis_async.protocols import BufferedPolicy, BufferedSettings, TrainSettings
from metis_async.protocols.staleness import StalenessFunction
from metis_async.v1 import controller_pb2 as pb
from tests.conftest import ControllerThread

SIZE = 8  # parameters: one per learner, the last shared


class _RecordingUnacked(UnackedUpdates):
    """Remembers each update's values by task id and which updates were acknowledged."""

    def __init__(self) -> None:
        super().__init__(kept=16)
        self.sent: dict[str, np.ndarray] = {}
        self.acked: list[str] = []

    def keep(self, run_id: str, result: pb.TaskResult, chunks: list[pb.Chunk]) -> None:
        self.sent[result.task_id] = np.frombuffer(b"".join(c.data for c in chunks), np.float32)
        super().keep(run_id, result, chunks)

    def acknowledged(self, task_id: str) -> bool:
        known = super().acknowledged(task_id)
        if known:
            self.acked.append(task_id)
        return known


class _CountingLearner(Learner):
    """Update k of learner i adds 2**k at index i (buffered) or (version + 1) at index i and 1
    at the last index (synchronous: a function of the version, so a retrained update equals
    the lost one)."""

    def __init__(self, index: int, by_version: bool, seconds: float) -> None:
        self.index, self.by_version, self.seconds = index, by_version, seconds
        self.fits = 0

    def get_parameters(self) -> NDArrays:
        return [np.zeros(SIZE, np.float32)]

    def fit(
        self, parameters: NDArrays, config: FitConfig
    ) -> tuple[NDArrays, int, dict[str, float]]:
        time.sleep(self.seconds)
        delta = np.zeros(SIZE, np.float32)
        if self.by_version:
            delta[self.index] = config.model_version + 1
            delta[-1] = 1.0
        else:
            delta[self.index] = 2.0 ** min(self.fits, 20)
        self.fits += 1
        return [parameters[0] + delta], 1, {}

    def evaluate(
        self, parameters: NDArrays, config: EvaluateConfig
    ) -> tuple[float, int, dict[str, float]]:
        return 0.0, 1, {}

    def num_examples(self) -> int:
        return 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for_port(port: int, process: subprocess.Popen[bytes], seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the controller exited with {process.returncode} at start")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError("the controller did not listen in time")


class _Service:
    """`metis-async serve` as a process that the test kills and restarts (as systemd would)."""

    def __init__(self, args: list[str], state_dir: Path, port: int) -> None:
        self.command = [
            sys.executable,
            "-m",
            "metis_async.cli",
            "serve",
            "--port",
            str(port),
            "--state-dir",
            str(state_dir),
            "--log-level",
            "warning",
            *args,
        ]
        self.port = port
        self.process: subprocess.Popen[bytes] | None = None
        self.kills = 0

    def start(self) -> None:
        self.process = subprocess.Popen(self.command, stderr=subprocess.DEVNULL)
        _wait_for_port(self.port, self.process)

    def kill(self) -> None:
        """SIGKILL to the controller process alone (its ingest workers notice and exit)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)
        self.kills += 1

    def wait(self, seconds: float) -> int:
        assert self.process is not None
        return self.process.wait(seconds)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


def _run(
    tmp_path: Path,
    args: list[str],
    learners: int,
    by_version: bool,
    seed: int,
    kills: int,
    seconds: float,
) -> tuple[Checkpoint, list[_RecordingUnacked], list[RunSummary], int]:
    model = tmp_path / "init.npz"
    np.savez(model, np.zeros(SIZE, np.float32))
    service = _Service([*args, "--init-model", str(model)], tmp_path / "state", _free_port())
    service.start()
    address = f"127.0.0.1:{service.port}"
    records = [_RecordingUnacked() for _ in range(learners)]
    summaries: list[RunSummary] = []
    threads = []
    for i in range(learners):
        runner = LearnerRunner(
            address,
            _CountingLearner(i, by_version, seconds),
            learner_id=f"learner-{i}",
            backoff=Backoff(initial_seconds=0.05, max_seconds=0.4),
            seed=seed * 100 + i,
            unacked=records[i],
        )
        thread = threading.Thread(target=lambda r=runner: summaries.append(r.run()), daemon=True)
        thread.start()
        threads.append(thread)
    rng = random.Random(seed)
    try:
        for _ in range(kills):
            time.sleep(rng.uniform(0.2, 1.0))
            if service.process is not None and service.process.poll() is not None:
                break  # finished before this kill
            service.kill()
            time.sleep(rng.uniform(0.0, 0.3))
            service.start()
        assert service.wait(120) == 0
        for thread in threads:
            thread.join(60)
    finally:
        service.stop()
    newest = sorted((tmp_path / "state").glob("checkpoint-*.npz"))[-1]
    return Checkpoint.from_bytes(newest.read_bytes()), records, summaries, service.kills


def _buffered_args(rounds: int, buffer_size: int) -> list[str]:
    return [
        "--protocol",
        "buffered",
        "--rounds",
        str(rounds),
        "--buffer-size",
        str(buffer_size),
        "--staleness",
        "constant",
        "--local-steps",
        "1",
    ]


def _check_buffered(tmp_path: Path, seed: int, kills: int) -> None:
    rounds, buffer_size = 12, 4
    final, records, summaries, _ = _run(
        tmp_path, _buffered_args(rounds, buffer_size), 6, False, seed, kills, 0.05
    )

    acked = [(r, task) for r in records for task in r.acked]
    expected = np.zeros(SIZE, np.float64)
    for record, task in acked:
        expected += record.sent[task]
    expected /= buffer_size

    assert final.version == rounds
    assert len(acked) == rounds * buffer_size  # every counted update was acknowledged once
    assert len({task for _, task in acked}) == len(acked)
    np.testing.assert_array_equal(final.model, expected.astype(np.float32))
    assert len(summaries) == 6
    assert all(s.shutdown_reason for s in summaries)


def test_buffered_run_survives_kill_9_with_every_update_counted_once(tmp_path: Path) -> None:
    _check_buffered(tmp_path, seed=1, kills=2)


def _synchronous_args(rounds: int, learners: int, workers: int) -> list[str]:
    return [
        "--protocol",
        "synchronous",
        "--rounds",
        str(rounds),
        "--min-learners",
        str(learners),
        "--learners-per-round",
        str(learners),
        "--min-update-fraction",
        "1.0",
        "--round-deadline",
        "60",
        "--local-steps",
        "1",
        "--workers",
        str(workers),
    ]


def _check_synchronous(tmp_path: Path, seed: int, kills: int) -> None:
    rounds, learners = 6, 4
    final, _, summaries, _ = _run(
        tmp_path, _synchronous_args(rounds, learners, 2), learners, True, seed, kills, 0.1
    )

    expected = np.zeros(SIZE, np.float32)  # the same run without crashes, computed
    for version in range(rounds):
        delta = np.zeros(SIZE, np.float64)
        for i in range(learners):
            delta[i] += version + 1
            delta[-1] += 1.0
        expected += (delta / learners).astype(np.float32)

    assert final.version == rounds
    np.testing.assert_array_equal(final.model, expected)
    assert len(summaries) == learners


def test_synchronous_run_with_workers_survives_kill_9(tmp_path: Path) -> None:
    _check_synchronous(tmp_path, seed=2, kills=2)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(10, 20))
def test_buffered_crashes_over_many_seeds(tmp_path: Path, seed: int) -> None:
    _check_buffered(tmp_path, seed=seed, kills=4)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(20, 26))
def test_synchronous_crashes_over_many_seeds(tmp_path: Path, seed: int) -> None:
    _check_synchronous(tmp_path, seed=seed, kills=3)


def test_updates_lost_with_a_killed_worker_are_resent_and_counted_once(tmp_path: Path) -> None:
    """A worker killed mid-run takes its partial sum with it: its updates are not acknowledged,
    their learners resend them (they reconnect anyway), and each counts once."""
    rounds, buffer_size, learners = 10, 4, 6
    policy = BufferedPolicy(
        BufferedSettings(
            buffer_size=buffer_size,
            rounds=rounds,
            staleness=StalenessFunction("constant"),
            train=TrainSettings(local_steps=1),
        )
    )
    ct = ControllerThread(policy, [np.zeros(SIZE, np.float32)], workers=2)
    records = [_RecordingUnacked() for _ in range(learners)]
    summaries: list[RunSummary] = []
    threads = []
    for i in range(learners):
        runner = LearnerRunner(
            ct.address,
            _CountingLearner(i, False, 0.05),
            learner_id=f"learner-{i}",
            backoff=Backoff(initial_seconds=0.05, max_seconds=0.4),
            seed=i,
            unacked=records[i],
        )
        thread = threading.Thread(target=lambda r=runner: summaries.append(r.run()), daemon=True)
        thread.start()
        threads.append(thread)
    try:
        deadline = time.monotonic() + 30
        core = ct.controller.core
        while time.monotonic() < deadline and not (
            ct.controller.version >= 3 and ct.read(lambda: 0 in core._open_workers)
        ):
            time.sleep(0.005)  # until worker 0 holds part of the open version's sum
        os.kill(ct.read(lambda: ct.controller.worker_pids())[0], signal.SIGKILL)
        assert ct.wait_finished(90)
        for thread in threads:
            thread.join(30)
        model = ct.model()
    finally:
        ct.close()

    acked = [(r, task) for r in records for task in r.acked]
    expected = np.zeros(SIZE, np.float64)
    for record, task in acked:
        expected += record.sent[task]
    assert len({task for _, task in acked}) == len(acked)
    np.testing.assert_array_equal(model, (expected / buffer_size).astype(np.float32))
