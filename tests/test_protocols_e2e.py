"""Every protocol over real gRPC on 127.0.0.1, with learners of different (injected) speeds."""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np
import pytest

from metis_async.aggregation.server_step import AggregationSettings
from metis_async.client import Backoff, run_learner
from metis_async.examples import digits
from metis_async.protocols import (
    AsynchronousPolicy,
    AsynchronousSettings,
    BufferedPolicy,
    BufferedSettings,
    SemiSynchronousPolicy,
    SemiSynchronousSettings,
    StalenessFunction,
    SynchronousPolicy,
    SynchronousSettings,
    TrainSettings,
)
from tests.conftest import ControllerThread, ShiftLearner

Factory = Callable[..., ControllerThread]
FAST = Backoff(initial_seconds=0.05, max_seconds=0.5, max_attempts=40)
TRAIN = TrainSettings(local_steps=1)


def _run(address: str, learner: object, learner_id: str) -> threading.Thread:
    thread = threading.Thread(
        target=run_learner,
        args=(address, learner),
        kwargs={"learner_id": learner_id, "backoff": FAST},
        daemon=True,
    )
    thread.start()
    return thread


def test_asynchronous_mixes_full_weights_exactly(controller_factory: Factory) -> None:
    settings = AsynchronousSettings(rounds=4, alpha=0.5, train=TRAIN)
    ct = controller_factory(AsynchronousPolicy(settings))
    _run(ct.address, ShiftLearner(shift=1.0, examples=1), "solo")

    assert ct.wait_finished(20)

    # One learner: staleness 0 every time, x <- x + 0.5 * ((x + 1) - x) four times.
    np.testing.assert_allclose(ct.model(), np.full(10, 2.0, np.float32), rtol=1e-6)


def test_buffered_commits_buffer_mean_with_server_rate(controller_factory: Factory) -> None:
    settings = BufferedSettings(rounds=3, buffer_size=2, server_learning_rate=1.0, train=TRAIN)
    ct = controller_factory(BufferedPolicy(settings))
    _run(ct.address, ShiftLearner(shift=1.0, examples=1), "solo")

    assert ct.wait_finished(20)

    # Per version: two fresh deltas of +1 (staleness 0), x <- x + 1 * (1 + 1) / 2.
    np.testing.assert_allclose(ct.model(), np.full(10, 3.0, np.float32), rtol=1e-6)


@pytest.mark.parametrize("protocol", ["asynchronous", "buffered"])
def test_fast_learners_are_not_held_back_by_a_straggler(
    controller_factory: Factory, protocol: str
) -> None:
    common = {"rounds": 12, "train": TRAIN, "staleness": StalenessFunction("polynomial", 0.5)}
    policy = (
        AsynchronousPolicy(AsynchronousSettings(**common))  # type: ignore[arg-type]
        if protocol == "asynchronous"
        else BufferedPolicy(BufferedSettings(buffer_size=2, **common))  # type: ignore[arg-type]
    )
    ct = controller_factory(policy)
    fast = ShiftLearner(shift=1.0, examples=1, delay=0.01)
    slow = ShiftLearner(shift=1.0, examples=1, delay=1.0)
    _run(ct.address, fast, "fast")
    _run(ct.address, slow, "slow")

    assert ct.wait_finished(30)

    assert len(fast.fits) >= 5 * max(len(slow.fits), 1)
    assert np.isfinite(ct.model()).all()


def test_synchronous_waits_for_the_straggler(controller_factory: Factory) -> None:
    ct = controller_factory(
        SynchronousPolicy(SynchronousSettings(min_learners=2, rounds=2, train=TRAIN))
    )
    fast = ShiftLearner(shift=1.0, examples=1, delay=0.01)
    slow = ShiftLearner(shift=1.0, examples=1, delay=0.3)
    _run(ct.address, fast, "fast")
    _run(ct.address, slow, "slow")

    assert ct.wait_finished(30)

    assert len(fast.fits) == len(slow.fits) == 2


def test_semi_synchronous_gives_fast_learners_more_steps(controller_factory: Factory) -> None:
    federation = digits.load_digits_federated(2, alpha=100.0, seed=0)
    settings = SemiSynchronousSettings(
        min_learners=2,
        rounds=3,
        budget_factor=1.0,
        max_local_steps=400,
        round_deadline_seconds=10.0,
        train=TrainSettings(batch_size=32, learning_rate=0.5),
    )
    policy = SemiSynchronousPolicy(settings)
    ct = controller_factory(policy, initial_model=digits.initial_parameters())
    (xf, yf), (xs, ys) = federation.partitions
    _run(ct.address, digits.DigitsLearner(xf, yf, step_delay_seconds=0.001), "fast")
    _run(ct.address, digits.DigitsLearner(xs, ys, step_delay_seconds=0.01), "slow")

    assert ct.wait_finished(60)

    steps = ct.read(lambda: dict(policy.assigned_steps))
    assert steps["fast"] > 3 * steps["slow"] > 0
    assert ct.read(lambda: policy.budget_seconds) > 0


def test_robust_median_keeps_a_sign_flipping_attacker_out(controller_factory: Factory) -> None:
    policy = SynchronousPolicy(SynchronousSettings(min_learners=4, rounds=1, train=TRAIN))
    ct = controller_factory(policy, aggregation=AggregationSettings(robust="median"))
    for i in range(3):
        _run(ct.address, ShiftLearner(shift=1.0, examples=1), f"honest-{i}")
    _run(ct.address, ShiftLearner(shift=-100.0, examples=1), "attacker")

    assert ct.wait_finished(20)

    np.testing.assert_allclose(ct.model(), np.full(10, 1.0, np.float32))


def test_server_optimizer_runs_inside_the_controller(controller_factory: Factory) -> None:
    policy = SynchronousPolicy(SynchronousSettings(min_learners=1, rounds=2, train=TRAIN))
    settings = AggregationSettings(optimizer="fedavgm", optimizer_options={"momentum": 0.5})
    ct = controller_factory(policy, aggregation=settings)
    _run(ct.address, ShiftLearner(shift=1.0, examples=1), "solo")

    assert ct.wait_finished(20)

    # m1 = 1, x1 = 1; m2 = 0.5 * 1 + 1 = 1.5, x2 = 2.5
    np.testing.assert_allclose(ct.model(), np.full(10, 2.5, np.float32), rtol=1e-6)
