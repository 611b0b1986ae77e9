"""Churn: a thousand learners joining, answering, hanging up mid-task and sending garbage at
random for a bounded time. Afterwards no session, task or concurrency slot is left behind, the
controller's memory is back near its baseline, and the federation still commits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from metis_async.protocols import BufferedPolicy, BufferedSettings, TrainSettings
from tests.conftest import ControllerThread, ShiftLearner
from tests.test_server import _start_learner

Factory = Callable[..., ControllerThread]
CLIENT = Path(__file__).with_name("churn_client.py")


def _rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _churn(address: str, learners: int, seconds: float, seed: int) -> dict[str, int]:
    env = {**os.environ, "PYTHONPATH": str(CLIENT.parents[1])}
    out = subprocess.run(
        [sys.executable, str(CLIENT), address, str(learners), str(seconds), str(seed)],
        capture_output=True,
        text=True,
        timeout=seconds + 120,
        env=env,
        check=True,
    )
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def _settle(ct: ControllerThread, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while ct.read(lambda: len(ct.controller.streams.sessions) + ct.controller.core.connected):
        assert time.monotonic() < deadline, "sessions were left behind"
        time.sleep(0.1)


def _run(controller_factory: Factory, learners: int, seconds: float) -> None:
    policy = BufferedPolicy(
        BufferedSettings(buffer_size=20, concurrency=200, train=TrainSettings(local_steps=1))
    )
    ct = controller_factory(policy, hello_timeout_seconds=2.0, max_missed_tasks=0)
    _churn(ct.address, learners, 2.0, seed=1)  # warm up: pools, buffers, code paths
    _settle(ct)
    baseline = _rss_bytes()

    counts = _churn(ct.address, learners, seconds, seed=2)
    _settle(ct)
    after = _rss_bytes()
    version = ct.controller.version
    thread, _ = _start_learner(ct.address, ShiftLearner(1.0, 1), "after-churn")
    deadline = time.monotonic() + 30
    while ct.controller.version < version + 1 and time.monotonic() < deadline:
        time.sleep(0.1)  # its 20 updates fill a buffer alone: nothing is stuck

    core = ct.controller.core
    assert counts["sessions"] > 2 * learners
    assert counts["answered"] > 0
    assert counts["hung_up"] > 0
    assert counts["garbage"] > 0
    assert ct.read(lambda: sum(len(r.tasks) for r in core.learner_records())) <= 1  # one at most
    assert ct.read(lambda: len(policy._busy)) <= 1
    assert ct.controller.version >= version + 1
    assert after - baseline < 64 * 1024**2, f"RSS grew by {(after - baseline) / 1e6:.0f} MB"
    assert np.isfinite(ct.model()).all()
    del thread


def test_churn_leaves_nothing_behind(controller_factory: Factory) -> None:
    _run(controller_factory, learners=1000, seconds=6.0)


@pytest.mark.slow
def test_long_churn_leaves_nothing_behind(controller_factory: Factory) -> None:
    _run(controller_factory, learners=4000, seconds=60.0)
