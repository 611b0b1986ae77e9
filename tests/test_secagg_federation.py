"""SecAgg+ rounds through the real controller (SECURE AGGREGATION in the proto): learners mask
their deltas, the controller sums masked vectors and learns only each round's sum. Real gRPC
on loopback, the real Rust SecAgg+."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
import pytest

from metis_async.client.learner import FitConfig
from metis_async.protocols import (
    BufferedPolicy,
    BufferedSettings,
    SemiSynchronousPolicy,
    SemiSynchronousSettings,
    TrainSettings,
)
from metis_async.server import Controller, ControllerConfig
from metis_async.v1 import controller_pb2 as pb
from tests.conftest import (
    ControllerThread,
    RawLearner,
    ShiftLearner,
    run_in_threads,
    sync_policy,
)

Factory = Callable[..., ControllerThread]


class Vanishing(ShiftLearner):
    """Shares its keys, then fails its task in version `drop_in`: it never uploads."""

    def __init__(self, shift: float, drop_in: int) -> None:
        super().__init__(shift, 1)
        self.drop_in = drop_in

    def fit(self, parameters: Any, config: FitConfig) -> Any:
        if config.model_version == self.drop_in:
            raise RuntimeError("dropped after sharing")
        return super().fit(parameters, config)


def run_learners(address: str, learners: dict[str, ShiftLearner]) -> list[Any]:
    return run_in_threads(address, learners)


def test_rounds_commit_the_mean_of_masked_deltas(controller_factory: Factory) -> None:
    ct = controller_factory(sync_policy(min_learners=4, rounds=2), secagg=True)
    shifts = {"a": 0.1, "b": 0.2, "c": 0.3, "d": 0.4}

    summaries = run_learners(ct.address, {k: ShiftLearner(v, 1) for k, v in shifts.items()})

    assert all(not isinstance(s, BaseException) for s in summaries), summaries
    np.testing.assert_allclose(ct.model(), np.full(10, 2 * 0.25), atol=1e-4)
    assert ct.read(lambda: ct.controller.policy.rounds_run) == 2


def test_a_learner_lost_after_sharing_is_unmasked_around(controller_factory: Factory) -> None:
    policy = sync_policy(min_learners=4, rounds=1, round_deadline_seconds=3.0)
    ct = controller_factory(policy, secagg=True, secagg_step_timeout_seconds=2.0)
    learners: dict[str, ShiftLearner] = {
        k: ShiftLearner(v, 1) for k, v in (("a", 0.1), ("b", 0.2), ("c", 0.3))
    }
    learners["gone"] = Vanishing(5.0, drop_in=0)

    run_learners(ct.address, learners)

    assert ct.wait_finished(20)
    np.testing.assert_allclose(ct.model(), np.full(10, 0.2), atol=1e-4)  # mean of a, b, c


def test_the_controller_sees_only_uniform_masked_values(controller_factory: Factory) -> None:
    size = 16_384
    policy = sync_policy(min_learners=3, rounds=1)
    ct = controller_factory(policy, [np.zeros(size, np.float32)], secagg=True)
    seen: list[np.ndarray] = []
    original = ct.controller.core._new_step

    def watching(layout: pb.ModelLayout) -> Any:
        step = original(layout)
        add = step.add

        def spy(update: object, weight: float = 1.0, checked: bool = False) -> None:
            seen.append(np.frombuffer(update, dtype="<u4").copy())  # type: ignore[arg-type]
            add(update, weight, checked)

        step.add = spy  # type: ignore[method-assign]
        return step

    ct.controller.core._step = watching(ct.controller.core.layout)

    run_learners(ct.address, {k: ShiftLearner(0.0, 1, size=size) for k in ("a", "b", "c")})

    assert len(seen) == 3
    # every learner's update is 0.0 everywhere, yet each masked vector the controller holds
    # passes a chi-square test of uniformity over 64 bins of Z_2^32 (p > 1e-7: 139.6; a
    # constant or unmasked vector scores in the hundreds of thousands)
    for values in seen:
        counts = np.bincount(values >> 26, minlength=64)
        expected = size / 64
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        assert chi2 < 139.6


def test_a_learner_without_secagg_is_refused(controller_factory: Factory) -> None:
    ct = controller_factory(sync_policy(min_learners=3), secagg=True)
    raw = RawLearner(ct.address, capabilities=["train"])

    with pytest.raises(grpc.RpcError) as failure:
        raw.drain()

    assert failure.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    raw.close()


def test_rounds_of_fewer_than_three_learners_are_refused() -> None:
    # With two, each learner reads the other's update from the sum and its own.
    with pytest.raises(ValueError, match="at least 3 learners"):
        Controller(sync_policy(min_learners=2), ControllerConfig(port=0, secagg=True))


def test_roundless_policies_are_refused() -> None:
    policy = BufferedPolicy(BufferedSettings(buffer_size=2))

    with pytest.raises(ValueError, match="round-based"):
        Controller(policy, ControllerConfig(port=0, secagg=True))


def test_too_many_dropouts_refuse_the_round_and_keep_the_model(
    controller_factory: Factory,
) -> None:
    policy = sync_policy(
        min_learners=3, rounds=1, round_deadline_seconds=2.0, min_update_fraction=0.3
    )  # one update of three may commit: the masks decide
    ct = controller_factory(policy, secagg=True, secagg_step_timeout_seconds=1.0)
    learners: dict[str, ShiftLearner] = {"a": ShiftLearner(0.1, 1)}
    learners |= {k: Vanishing(0.5, drop_in=0) for k in ("b", "c")}  # both of a's neighbours
    threads = [threading.Thread(target=run_learners, args=(ct.address, learners), daemon=True)]
    threads[0].start()

    refused = 0
    for _ in range(100):  # up to 10 s
        refused = ct.read(lambda: ct.controller.stats.commits_refused_total)
        if refused:
            break
        threading.Event().wait(0.1)

    assert refused >= 1
    assert ct.read(lambda: ct.controller.version) == 0
    np.testing.assert_array_equal(ct.model(), np.zeros(10, np.float32))


def test_semi_synchronous_rounds_run_secagg(controller_factory: Factory) -> None:
    policy = SemiSynchronousPolicy(
        SemiSynchronousSettings(min_learners=3, rounds=2, train=TrainSettings(local_steps=1))
    )
    ct = controller_factory(policy, secagg=True)

    run_learners(ct.address, {k: ShiftLearner(0.1, 1) for k in ("a", "b", "c")})

    np.testing.assert_allclose(ct.model(), np.full(10, 0.2), atol=1e-4)


def test_ingest_workers_carry_secagg_rounds(controller_factory: Factory) -> None:
    ct = controller_factory(sync_policy(min_learners=4, rounds=2), secagg=True, workers=2)
    shifts = {"a": 0.1, "b": 0.2, "c": 0.3, "d": 0.4}

    summaries = run_learners(ct.address, {k: ShiftLearner(v, 1) for k, v in shifts.items()})

    assert all(not isinstance(s, BaseException) for s in summaries), summaries
    assert ct.wait_finished(10)
    assert ct.read(lambda: ct.controller.forward_updates) is False  # masked sums in the workers
    np.testing.assert_allclose(ct.model(), np.full(10, 2 * 0.25), atol=1e-4)
