"""Ingest worker processes (`--workers N`) over real gRPC on 127.0.0.1: same federation, many
processes. Each test starts real worker processes sharing one port (SO_REUSEPORT)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

import grpc
import numpy as np
import pytest

from metis_async.aggregation.server_step import AggregationSettings
from metis_async.client import RunSummary
from metis_async.protocols import (
    AsynchronousPolicy,
    AsynchronousSettings,
    BufferedPolicy,
    BufferedSettings,
    TrainSettings,
)
from metis_async.workers import auto_workers
from tests.conftest import ControllerThread, RawLearner, ShiftLearner, sync_policy
from tests.test_server import FAST, _expect_abort, _start_learner

Factory = Callable[..., ControllerThread]
SHIFTS = [0.5, 1.25, -0.75, 2.0, 0.125, -1.5, 0.25, 1.0, -0.25, 0.375, 1.5, -2.0]


def _federate(ct: ControllerThread, learners: int = 12, size: int = 10) -> list[RunSummary]:
    threads = [
        _start_learner(
            ct.address, ShiftLearner(SHIFTS[i % len(SHIFTS)], examples=i + 1, size=size), f"l{i}"
        )
        for i in range(learners)
    ]
    assert ct.wait_finished(60)
    summaries = []
    for thread, out in threads:
        thread.join(20)
        assert out
        assert isinstance(out[0], RunSummary), out
        summaries.append(out[0])
    return summaries


def test_workers_give_the_same_model_as_one_process(controller_factory: Factory) -> None:
    # Dyadic shifts and integer weights: every float64 sum is exact, so any order of adding the
    # partial sums must give the same bits as one process.
    size = 5000
    model = [np.zeros(size, dtype=np.float32)]
    single = controller_factory(sync_policy(min_learners=12, rounds=3), model)
    _federate(single, size=size)
    multi = controller_factory(sync_policy(min_learners=12, rounds=3), model, workers=2)

    _federate(multi, size=size)

    assert multi.model().tobytes() == single.model().tobytes()
    assert multi.read(lambda: multi.controller.version) == 3


def test_learners_spread_over_the_workers(controller_factory: Factory) -> None:
    ct = controller_factory(sync_policy(min_learners=12, rounds=1), workers=2)
    raws = [RawLearner(ct.address, f"r{i}") for i in range(12)]
    for raw in raws:
        raw.until("train")

    workers = {s["worker"] for s in ct.read(ct.controller.sessions)}

    assert workers == {0, 1}
    for raw in raws:
        raw.close()


def test_buffered_policy_runs_over_workers(controller_factory: Factory) -> None:
    policy = BufferedPolicy(
        BufferedSettings(buffer_size=3, rounds=4, min_learners=3, train=TrainSettings(1))
    )
    ct = controller_factory(policy, workers=2)

    _federate(ct, learners=6)

    assert ct.read(lambda: ct.controller.version) == 4
    assert np.isfinite(ct.model()).all()


def test_asynchronous_policy_forwards_whole_updates(controller_factory: Factory) -> None:
    policy = AsynchronousPolicy(
        AsynchronousSettings(rounds=5, min_learners=2, train=TrainSettings(1), alpha=0.5)
    )
    ct = controller_factory(policy, workers=2)

    _federate(ct, learners=4)

    assert ct.read(lambda: ct.controller.forward_updates)
    assert ct.read(lambda: ct.controller.version) == 5
    assert (ct.model() != 0).all()


def test_robust_rule_over_workers_equals_one_process(controller_factory: Factory) -> None:
    median = AggregationSettings(robust="median")
    single = controller_factory(sync_policy(min_learners=5, rounds=2), aggregation=median)
    _federate(single, learners=5)
    multi = controller_factory(sync_policy(min_learners=5, rounds=2), aggregation=median, workers=2)

    _federate(multi, learners=5)

    np.testing.assert_array_equal(multi.model(), single.model())


def test_a_second_stream_of_one_learner_replaces_the_first(controller_factory: Factory) -> None:
    ct = controller_factory(sync_policy(min_learners=1, rounds=0), workers=2)
    first = RawLearner(ct.address, "same-id")
    first.until("train")

    second = RawLearner(ct.address, "same-id")
    second.until("welcome")

    _expect_abort(first, grpc.StatusCode.ALREADY_EXISTS, "replaced by a newer session")
    routes = ct.read(ct.controller.sessions)
    assert [r["learner_id"] for r in routes] == ["same-id"]
    second.close()


def test_garbage_through_a_worker_gets_a_clear_status(controller_factory: Factory) -> None:
    ct = controller_factory(sync_policy(min_learners=1, rounds=0), workers=2)
    raw = RawLearner(ct.address, "bad")
    raw.until("train")

    raw.send_raw(b"\xff\xff\xff garbage")

    _expect_abort(raw, grpc.StatusCode.INVALID_ARGUMENT, "could not parse LearnerMessage")


def test_killed_worker_is_restarted_and_its_learners_come_back(
    controller_factory: Factory,
) -> None:
    ct = controller_factory(sync_policy(min_learners=4, rounds=40), workers=2)
    threads = [
        _start_learner(ct.address, ShiftLearner(0.25, examples=1, delay=0.02), f"k{i}")
        for i in range(4)
    ]
    deadline = time.monotonic() + 30
    while ct.read(lambda: ct.controller.version) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    victim = ct.read(ct.controller.worker_pids)[0]

    os.kill(victim, signal.SIGKILL)

    assert ct.wait_finished(90)
    assert victim not in ct.read(ct.controller.worker_pids)
    commits = ct.read(lambda: list(ct.controller.core.commits))
    folded = [t for c in commits for t in c.task_ids]
    assert len(folded) == len(set(folded))  # no accepted update counted twice
    np.testing.assert_allclose(ct.model(), np.full(10, 0.25 * 40, np.float32), rtol=1e-5)
    for thread, _ in threads:
        thread.join(20)


def test_auto_workers_cover_the_target_within_the_open_file_limit() -> None:
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    workers = auto_workers(100_000)

    assert workers >= (os.cpu_count() or 1)
    if hard != resource.RLIM_INFINITY:
        assert workers * hard >= 100_000


@pytest.mark.parametrize("bad", ["-1", "two"])
def test_workers_setting_is_validated(bad: str) -> None:
    from metis_async.config import load_settings

    with pytest.raises(ValueError, match="workers"):
        load_settings(None, {"METIS_ASYNC_SERVER__WORKERS": bad})


_ = FAST


def test_workers_import_the_controllers_package_not_one_in_the_working_directory(
    controller_factory: Factory, tmp_path: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A source checkout without the built extension, where `serve` happens to be started.
    shadow = tmp_path / "metis_async"  # type: ignore[operator]
    shadow.mkdir()
    (shadow / "__init__.py").write_text("raise ImportError('the shadowing checkout')\n")
    monkeypatch.chdir(tmp_path)  # type: ignore[arg-type]

    ct = controller_factory(sync_policy(min_learners=1, rounds=0), workers=1)
    raw = RawLearner(ct.address, "here")

    assert raw.until("welcome").welcome.learner_id == "here"
    raw.close()
