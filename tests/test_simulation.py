"""The simulation harness (simulated clock, speeds, dropouts, decisions) and protocol convergence.

Convergence figures are calibrated on seeds 0..4 of `run_digits` (50 learners, Dirichlet 0.5,
10 % stragglers ×10): see the report in benches/README.md. The tests use seeds 0 and 1 (0 is the
hardest of the five) and keep a 0.02 margin or a factor of 2 on relative claims.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import statistics
import time
from typing import Any

import numpy as np
import pytest

from metis_async.client import EvaluateConfig, FitConfig, Learner, NDArrays
from metis_async.protocols import (
    AcceptUpdate,
    AssignTask,
    BufferedPolicy,
    BufferedSettings,
    CancelTask,
    CommitVersion,
    Decision,
    EvaluationArrived,
    Event,
    LearnerJoined,
    LearnerLost,
    Policy,
    SynchronousPolicy,
    SynchronousSettings,
    Task,
    TaskKind,
    Tick,
    TrainSettings,
    UpdateArrived,
)
from metis_async.simulation import (
    EvaluationSchedule,
    HistoryPoint,
    SimulatedFederation,
    SimulationResult,
    SpeedModel,
    run_digits,
)

TARGET = 0.90
SEEDS = (0, 1)

# ------------------------------------------------------------------------------ helpers


class PlusOneLearner(Learner):
    """Adds 1 to every parameter per task; reports the steps it was asked for."""

    def __init__(self, examples: int = 40) -> None:
        self.examples = examples

    def get_parameters(self) -> NDArrays:
        return [np.zeros(4, dtype=np.float32)]

    def fit(
        self, parameters: NDArrays, config: FitConfig
    ) -> tuple[NDArrays, int, dict[str, float]]:
        trained: NDArrays = [np.asarray(p, dtype=np.float32) + np.float32(1.0) for p in parameters]
        return trained, self.examples, {"steps": float(config.local_steps)}

    def evaluate(
        self, parameters: NDArrays, config: EvaluateConfig
    ) -> tuple[float, int, dict[str, float]]:
        return 0.0, self.examples, {"accuracy": 1.0}

    def num_examples(self) -> int:
        return self.examples


class Recorder(Policy):
    """Wraps a policy and records every event it is given with the decisions it made."""

    def __init__(self, inner: Policy) -> None:
        super().__init__()
        self.inner = inner
        self.name = inner.name
        self.log: list[tuple[Event, list[Decision]]] = []

    @property
    def events(self) -> list[Event]:
        return [event for event, _ in self.log]

    @property
    def decisions(self) -> list[Decision]:
        return [decision for _, decisions in self.log for decision in decisions]

    def handle(self, event: Event) -> list[Decision]:
        decisions = self.inner.handle(event)
        self.log.append((event, decisions))
        return decisions

    def next_wakeup(self) -> float | None:
        return self.inner.next_wakeup()

    @property  # type: ignore[override]
    def version(self) -> int:  # the federation core checks the policy's version count
        return self.inner.version

    @version.setter
    def version(self, value: int) -> None:
        pass  # Policy.__init__ sets it; the inner policy counts


class OneTaskPolicy(Policy):
    """Gives the first learner to join one training task, then commits its update with `commit`."""

    def __init__(
        self, commit: CommitVersion, upload_delta: bool = True, time_budget_seconds: float = 0.0
    ) -> None:
        super().__init__()
        self.commit = commit
        self.task = Task(
            "t1",
            "",
            TaskKind.TRAIN,
            0,
            TrainSettings(local_steps=20, batch_size=16),
            upload_delta=upload_delta,
            time_budget_seconds=time_budget_seconds,
        )
        self.updates: list[UpdateArrived] = []

    def handle(self, event: Event) -> list[Decision]:
        if isinstance(event, LearnerJoined) and not self.task.learner_id:
            self.task = dataclasses.replace(self.task, learner_id=event.learner_id)
            return [AssignTask(self.task)]
        if isinstance(event, UpdateArrived):
            self.updates.append(event)
            self.version += 1
            return [AcceptUpdate(event.task_id, 1.0), self.commit]
        return []


def mean_parameter(parameters: NDArrays) -> float:
    return float(np.mean(np.asarray(parameters[0], dtype=np.float64)))


def simulate(
    policy: Policy,
    seconds: float,
    *,
    learners: int = 10,
    initial: float = 0.0,
    seed: int = 0,
    **speeds: float,
) -> tuple[SimulationResult, SimulatedFederation]:
    federation = SimulatedFederation(
        policy,
        [PlusOneLearner() for _ in range(learners)],
        [np.full(4, initial, dtype=np.float32)],
        mean_parameter,
        speeds=SpeedModel(**speeds),
        seed=seed,
    )
    return federation.run(seconds), federation


def sync_recorder(**settings: Any) -> Recorder:
    settings.setdefault("train", TrainSettings(local_steps=20, batch_size=16))
    return Recorder(SynchronousPolicy(SynchronousSettings(**settings)))


# ------------------------------------------------------------------------------ speeds


def test_speed_model_makes_the_given_fraction_stragglers() -> None:
    model = SpeedModel(straggler_fraction=0.1)

    speeds = model.sample(1000, np.random.default_rng(0))

    assert sum(s.straggler for s in speeds) == 100


def test_stragglers_steps_are_slowdown_times_slower_in_the_median() -> None:
    model = SpeedModel(straggler_fraction=0.5, straggler_slowdown=10.0)

    speeds = model.sample(2000, np.random.default_rng(0))

    slow = statistics.median(s.step_seconds for s in speeds if s.straggler)
    fast = statistics.median(s.step_seconds for s in speeds if not s.straggler)
    assert 8.0 < slow / fast < 12.5


def test_task_time_is_latency_plus_steps_times_step_seconds() -> None:
    policy = Recorder(BufferedPolicy(BufferedSettings(concurrency=4, buffer_size=2)))

    _, federation = simulate(policy, 5.0, spread=0.0, straggler_fraction=0.5)

    assigned = {
        d.task.task_id: (d.task.learner_id, event.now)
        for event, decisions in policy.log
        for d in decisions
        if isinstance(d, AssignTask)
    }
    updates = [e for e in policy.events if isinstance(e, UpdateArrived)]
    kinds = {federation.learners[assigned[u.task_id][0]].speed.straggler for u in updates}
    assert kinds == {True, False}
    for update in updates:
        learner_id, at = assigned[update.task_id]
        slowdown = 10.0 if federation.learners[learner_id].speed.straggler else 1.0
        assert update.now - at == pytest.approx(0.05 + 20 * 0.01 * slowdown)


# ------------------------------------------------------------------------------ the clock


def test_same_seed_repeats_the_run_exactly() -> None:
    first = run_digits("buffered", learners=10, seconds=3.0, seed=3, dropout=0.1)

    second = run_digits("buffered", learners=10, seconds=3.0, seed=3, dropout=0.1)

    assert first.history == second.history
    assert first.staleness == second.staleness
    assert first.events == second.events


def test_simulated_time_advances_without_sleeping(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_sleep(seconds: float) -> None:
        raise AssertionError("the simulation slept")

    monkeypatch.setattr(time, "sleep", no_sleep)
    started = time.perf_counter()

    result, _ = simulate(sync_recorder(min_learners=10), 600.0)

    assert result.simulated_seconds == 600.0
    assert result.versions > 100
    assert time.perf_counter() - started < 60.0


def test_tick_arrives_at_the_policys_wakeup_time() -> None:
    policy = sync_recorder(min_learners=10, round_deadline_seconds=1.5)

    simulate(policy, 4.0, step_seconds=10.0)  # nobody finishes: every round ends by deadline

    ticks = [e.now for e in policy.events if isinstance(e, Tick)]
    assert ticks == [1.5, 3.0]


# ------------------------------------------------------------------------------ decisions


def test_cancelled_tasks_never_deliver() -> None:
    policy = sync_recorder(min_learners=10, learners_per_round=4, over_selection=2.0)

    simulate(policy, 20.0)

    cancelled = {d.task_id for d in policy.decisions if isinstance(d, CancelTask)}
    delivered = {e.task_id for e in policy.events if isinstance(e, UpdateArrived)}
    assert cancelled
    assert not cancelled & delivered


def test_dropouts_lose_learners_and_bring_them_back() -> None:
    policy = Recorder(BufferedPolicy(BufferedSettings(concurrency=5, buffer_size=2)))

    simulate(policy, 60.0, dropout_probability=0.3, downtime_seconds=2.0)

    lost = [e.learner_id for e in policy.events if isinstance(e, LearnerLost)]
    joined = [e.learner_id for e in policy.events if isinstance(e, LearnerJoined)]
    assert lost
    assert len(joined) > 10
    assert set(joined[10:]) <= set(lost)


def test_a_lost_learners_task_never_delivers() -> None:
    policy = Recorder(BufferedPolicy(BufferedSettings(concurrency=5, buffer_size=2)))

    simulate(policy, 60.0, dropout_probability=0.3)

    outstanding: dict[str, str] = {}  # learner id -> its training task
    lost: set[str] = set()
    for event, decisions in policy.log:
        if isinstance(event, LearnerLost) and event.learner_id in outstanding:
            lost.add(outstanding.pop(event.learner_id))
        for d in decisions:
            if isinstance(d, AssignTask):
                outstanding[d.task.learner_id] = d.task.task_id
    delivered = {e.task_id for e in policy.events if isinstance(e, UpdateArrived)}
    assert lost
    assert not lost & delivered


@pytest.mark.parametrize(
    ("protocol", "size"),
    [
        ("synchronous", "learners_per_round"),
        ("semi_synchronous", "learners_per_round"),
        ("asynchronous", "concurrency"),
        ("buffered", "concurrency"),
    ],
)
def test_every_protocol_keeps_committing_through_dropouts(protocol: str, size: str) -> None:
    settings: dict[str, Any] = {size: 5}

    result = run_digits(protocol, learners=20, seconds=15.0, dropout=0.3, **settings)

    assert result.events["LearnerLost"] > 0
    assert result.simulated_seconds == 15.0
    assert result.versions >= 3


def test_a_learner_uploading_nan_is_disconnected_like_the_server_does() -> None:
    class NanLearner(PlusOneLearner):
        def fit(
            self, parameters: NDArrays, config: FitConfig
        ) -> tuple[NDArrays, int, dict[str, float]]:
            return [np.full(4, np.nan, dtype=np.float32)], self.examples, {}

    policy = Recorder(BufferedPolicy(BufferedSettings(concurrency=1, buffer_size=1)))
    federation = SimulatedFederation(
        policy, [NanLearner()], [np.zeros(4, dtype=np.float32)], mean_parameter
    )

    result = federation.run(1.0)

    lost = [e for e in policy.events if isinstance(e, LearnerLost)]
    assert lost
    assert "NaN" in lost[0].reason
    assert result.versions == 0


@pytest.mark.parametrize(("upload_delta", "expected"), [(True, 3.0), (False, 5.0)])
def test_upload_is_a_delta_or_the_trained_weights_as_the_task_says(
    upload_delta: bool, expected: float
) -> None:
    # From 2.0 the learner trains to 3.0; a non-relative commit adds the upload to the model.
    policy = OneTaskPolicy(CommitVersion("one", relative=False), upload_delta=upload_delta)

    result, _ = simulate(policy, 10.0, initial=2.0)

    assert result.final_accuracy == pytest.approx(expected)


def test_time_budget_runs_only_the_steps_that_fit() -> None:
    policy = OneTaskPolicy(CommitVersion("one"), time_budget_seconds=0.035)

    simulate(policy, 10.0, learners=1, spread=0.0, straggler_fraction=0.0)

    (update,) = policy.updates
    assert update.completed_steps == 3
    assert update.now == pytest.approx(0.05 + 3 * 0.01)


def test_update_reports_the_learners_simulated_speed() -> None:
    policy = OneTaskPolicy(CommitVersion("one"))

    simulate(policy, 10.0, learners=1, spread=0.0, straggler_fraction=0.0)

    (update,) = policy.updates
    assert update.completed_steps == 20
    assert update.seconds_per_batch == pytest.approx(0.01)
    assert update.seconds_per_epoch == pytest.approx(0.01 * math.ceil(40 / 16))
    assert update.train_seconds == pytest.approx(0.2)
    assert update.num_examples == 40


def test_evaluation_tasks_are_answered() -> None:
    policy = sync_recorder(min_learners=10, learners_per_round=3, evaluate_every=1)

    simulate(policy, 5.0)

    evaluations = [e for e in policy.events if isinstance(e, EvaluationArrived)]
    assert evaluations
    assert all(e.metrics["accuracy"] == 1.0 for e in evaluations)


def test_every_commit_is_scored_by_default() -> None:
    policy = sync_recorder(min_learners=10, learners_per_round=5)

    result, _ = simulate(policy, 5.0)

    assert [p.version for p in result.history] == list(range(result.versions + 1))
    assert [p.accuracy for p in result.history] == [float(v) for v in range(result.versions + 1)]


def test_evaluation_schedule_scores_every_nth_version_and_the_last() -> None:
    result = run_digits(
        "buffered", learners=10, seconds=4.0, evaluation=EvaluationSchedule(every_versions=5)
    )

    versions = [p.version for p in result.history]
    assert versions[:-1] == list(range(0, versions[-2] + 1, 5))
    assert versions[-1] == result.versions


# ------------------------------------------------------------------------------ the result


def _result(points: list[tuple[float, float]], end: float) -> SimulationResult:
    history = [HistoryPoint(t, v, a) for v, (t, a) in enumerate(points)]
    return SimulationResult("p", history, end, 0.0, len(points) - 1, 0, 0)


def test_seconds_to_target_is_the_first_scored_time_at_or_above_it() -> None:
    result = _result([(0.0, 0.1), (2.0, 0.95), (3.0, 0.85), (5.0, 0.97)], end=10.0)

    assert result.seconds_to_target(0.9) == 2.0
    assert result.seconds_to_target(0.99) is None


def test_mean_accuracy_weights_each_version_by_the_time_it_held() -> None:
    result = _result([(0.0, 0.0), (5.0, 1.0), (6.0, 0.5)], end=10.0)

    assert result.mean_accuracy(4.0) == pytest.approx((1 * 0.0 + 1 * 1.0 + 4 * 0.5) / 6)


# ------------------------------------------------------------------------------ convergence


@functools.cache
def digits_run(protocol: str, seed: int, seconds: float) -> SimulationResult:
    return run_digits(protocol, seconds=seconds, seed=seed)


HORIZONS = {"synchronous": 120.0, "semi_synchronous": 60.0, "asynchronous": 30.0, "buffered": 20.0}


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("protocol", sorted(HORIZONS))
def test_every_protocol_reaches_90_percent(protocol: str, seed: int) -> None:
    seconds = HORIZONS[protocol]

    result = digits_run(protocol, seed, seconds)

    assert result.final_accuracy >= TARGET
    assert result.mean_accuracy(0.75 * seconds) >= TARGET


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("protocol", ["asynchronous", "buffered"])
def test_async_protocols_reach_90_percent_in_under_half_the_synchronous_time(
    protocol: str, seed: int
) -> None:
    synchronous = digits_run("synchronous", seed, HORIZONS["synchronous"])

    result = digits_run(protocol, seed, HORIZONS[protocol])

    reached, baseline = result.seconds_to_target(TARGET), synchronous.seconds_to_target(TARGET)
    assert reached is not None
    assert baseline is not None
    assert reached < 0.5 * baseline


def test_polynomial_staleness_is_steadier_than_constant_under_high_staleness() -> None:
    # 40 of 50 learners in flight: updates are ~35 versions stale; alpha 0.9 mixes them in hard.
    runs = {
        kind: run_digits(
            "asynchronous",
            seconds=6.0,
            seed=0,
            concurrency=40,
            alpha=0.9,
            staleness=kind,
            train_local_steps=40,
            train_learning_rate=0.3,
        )
        for kind in ("constant", "polynomial:0.5")
    }

    late = {k: [p.accuracy for p in r.history if p.seconds >= 3.0] for k, r in runs.items()}
    assert (runs["polynomial:0.5"].mean_staleness or 0.0) > 25
    assert runs["polynomial:0.5"].mean_accuracy(3.0) >= runs["constant"].mean_accuracy(3.0) + 0.02
    assert statistics.pstdev(late["polynomial:0.5"]) < 0.5 * statistics.pstdev(late["constant"])
    assert min(late["polynomial:0.5"]) > min(late["constant"]) + 0.1
