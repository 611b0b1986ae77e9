"""Issue 7, algorithm correctness: policies as pure objects (events with a fake clock).

Failed commits, evaluation capabilities, task deadlines, semi-synchronous probes, and rounds that
close as soon as nobody is left working.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from metis_async.aggregation.compatibility import check_compatible
from metis_async.aggregation.server_step import AggregationSettings, ServerStep
from metis_async.protocols import (
    AcceptUpdate,
    AssignTask,
    AsynchronousPolicy,
    AsynchronousSettings,
    BufferedPolicy,
    BufferedSettings,
    CancelTask,
    CommitFailed,
    CommitVersion,
    Decision,
    Finish,
    LearnerJoined,
    RejectUpdate,
    SemiSynchronousPolicy,
    SemiSynchronousSettings,
    StalenessFunction,
    SynchronousPolicy,
    SynchronousSettings,
    TaskKind,
    Tick,
    TrainSettings,
    UpdateArrived,
)


def _train(decisions: list[Decision]) -> dict[str, AssignTask]:
    """Train tasks by learner id."""
    return {
        d.task.learner_id: d
        for d in decisions
        if isinstance(d, AssignTask) and d.task.kind is TaskKind.TRAIN
    }


def _done(task: AssignTask, now: float = 1.0, examples: int = 10, **kw: float) -> UpdateArrived:
    t = task.task
    return UpdateArrived(now, t.learner_id, t.task_id, t.version, examples, **kw)  # type: ignore[arg-type]


def _join(policy: object, ids: str, now: float = 0.0, **kw: object) -> list[Decision]:
    handle = policy.handle  # type: ignore[attr-defined]
    return [d for lid in ids for d in handle(LearnerJoined(now, lid, 10, **kw))]  # type: ignore[arg-type]


def _commit_round(policy: SynchronousPolicy, tasks: dict[str, AssignTask]) -> list[Decision]:
    decisions: list[Decision] = []
    for task in tasks.values():
        decisions += policy.handle(_done(task))
    assert any(isinstance(d, CommitVersion) for d in decisions)
    return decisions


# ------------------------------------------------------------------------ CommitFailed: rounds


@pytest.mark.parametrize("policy_class", [SynchronousPolicy, SemiSynchronousPolicy])
def test_failed_round_commit_is_uncounted_abandoned_and_the_next_round_starts(
    policy_class: type[SynchronousPolicy],
) -> None:
    settings_class = (
        SemiSynchronousSettings if policy_class is SemiSynchronousPolicy else SynchronousSettings
    )
    policy = policy_class(settings_class(min_learners=2))
    after = _commit_round(policy, _train(_join(policy, "ab")))
    dropped = {t.task.task_id for t in _train(after).values()}
    assert policy.version == 1

    decisions = policy.handle(CommitFailed(2.0, 1, "refused"))

    assert policy.version == 0
    assert (policy.rounds_committed, policy.rounds_abandoned) == (0, 1)
    fresh = _train(decisions)
    assert sorted(fresh) == ["a", "b"]
    assert {t.task.version for t in fresh.values()} == {0}
    assert not {t.task.task_id for t in fresh.values()} & dropped
    assert not any(isinstance(d, CancelTask) for d in decisions)  # dropped tasks were never sent


def test_round_after_a_failed_commit_commits_the_same_version_number() -> None:
    policy = SynchronousPolicy(SynchronousSettings(min_learners=2))
    _commit_round(policy, _train(_join(policy, "ab")))
    fresh = _train(policy.handle(CommitFailed(2.0, 1, "refused")))

    decisions = _commit_round(policy, fresh)

    assert policy.version == 1
    assert {t.task.version for t in _train(decisions).values()} == {1}


def test_finish_declared_with_a_failed_commit_is_withdrawn() -> None:
    policy = SynchronousPolicy(SynchronousSettings(min_learners=1, rounds=1))
    decisions = _commit_round(policy, _train(_join(policy, "a")))
    assert isinstance(decisions[-1], Finish)

    again = policy.handle(CommitFailed(2.0, 1, "refused"))

    assert not policy.finished
    assert list(_train(again)) == ["a"]


def test_commit_failed_for_another_version_changes_nothing() -> None:
    policy = SynchronousPolicy(SynchronousSettings(min_learners=1))
    _commit_round(policy, _train(_join(policy, "a")))

    decisions = policy.handle(CommitFailed(2.0, 7, "refused"))

    assert decisions == []
    assert policy.version == 1


# -------------------------------------------------------------------- CommitFailed: round-less


def test_buffered_failed_commit_resets_the_buffer_and_reassigns_the_dropped_tasks() -> None:
    policy = BufferedPolicy(BufferedSettings(buffer_size=2))
    tasks = _train(_join(policy, "ab"))
    policy.handle(_done(tasks["a"]))  # "a" gets new work before the commit: that task stands
    dropped = _train(policy.handle(_done(tasks["b"])))["b"]  # assigned after the commit
    assert policy.version == 1

    decisions = policy.handle(CommitFailed(2.0, 1, "refused"))

    assert policy.version == 0
    assert policy.buffered == 0
    fresh = _train(decisions)
    assert list(fresh) == ["b"]
    assert fresh["b"].task.version == 0
    assert isinstance(policy.handle(_done(dropped))[0], RejectUpdate)


def test_buffered_after_a_failed_commit_needs_k_new_updates() -> None:
    policy = BufferedPolicy(BufferedSettings(buffer_size=2))
    tasks = _train(_join(policy, "ab"))
    fresh = _train(policy.handle(_done(tasks["a"])))
    policy.handle(_done(tasks["b"]))
    fresh.update(_train(policy.handle(CommitFailed(2.0, 1, "refused"))))

    first = policy.handle(_done(fresh["a"]))

    assert not any(isinstance(d, CommitVersion) for d in first)
    second = policy.handle(_done(fresh["b"]))
    assert any(isinstance(d, CommitVersion) for d in second)
    assert policy.version == 1


def test_async_failed_commit_is_uncounted_and_work_continues() -> None:
    policy = AsynchronousPolicy(AsynchronousSettings())
    task = _train(_join(policy, "a"))["a"]
    policy.handle(_done(task))
    assert policy.version == 1

    decisions = policy.handle(CommitFailed(2.0, 1, "refused"))

    assert policy.version == 0
    assert [t.task.version for t in _train(decisions).values()] == [0]


def test_async_finish_with_a_failed_commit_is_withdrawn() -> None:
    policy = AsynchronousPolicy(AsynchronousSettings(rounds=1))
    task = _train(_join(policy, "a"))["a"]
    assert isinstance(policy.handle(_done(task))[-1], Finish)

    decisions = policy.handle(CommitFailed(2.0, 1, "refused"))

    assert not policy.finished
    assert list(_train(decisions)) == ["a"]


# ------------------------------------------------------------------------ evaluation capability


def test_evaluation_tasks_go_only_to_learners_that_can_evaluate() -> None:
    policy = SynchronousPolicy(SynchronousSettings(min_learners=2, evaluate_every=1))
    decisions = policy.handle(LearnerJoined(0.0, "trainer", 10, can_evaluate=False))

    decisions += policy.handle(LearnerJoined(0.0, "both", 10))

    evaluations = [
        d.task.learner_id
        for d in decisions
        if isinstance(d, AssignTask) and d.task.kind is TaskKind.EVALUATE
    ]
    assert evaluations == ["both"]
    assert sorted(_train(decisions)) == ["both", "trainer"]


# ------------------------------------------------------------- FedBuff staleness with weights


def _buffered_step_norm(weighting: str, staleness: int) -> float:
    """Norm of the model step of a K = 1 buffer whose one update is `staleness` versions old."""
    policy = BufferedPolicy(BufferedSettings(buffer_size=1, weighting=weighting))  # type: ignore[arg-type]
    tasks = _train(_join(policy, "ab"))
    fast = tasks["a"]
    for _ in range(staleness):  # "a" commits a version per update while "b" trains from 0
        fast = _train(policy.handle(_done(fast)))["a"]
    decisions = policy.handle(_done(tasks["b"], examples=40))
    step = ServerStep(3)
    new = np.zeros(3, np.float32)
    for d in decisions:
        if isinstance(d, AcceptUpdate):
            step.add(np.ones(3, np.float32), d.weight)
        elif isinstance(d, CommitVersion):
            new = step.commit(new, d.scale, d.normalize, d.relative)
    return float(np.linalg.norm(new))


@pytest.mark.parametrize("weighting", ["examples", "steps", "uniform"])
def test_buffered_stale_step_keeps_the_inverse_sqrt_penalty_under_any_weighting(
    weighting: str,
) -> None:
    fresh = _buffered_step_norm(weighting, 0)

    stale = _buffered_step_norm(weighting, 100)

    assert stale / fresh == pytest.approx(1 / math.sqrt(101))


# ------------------------------------------------------------ aggregation compatibility


def test_krum_with_rounds_smaller_than_2f_plus_3_is_refused_naming_the_settings() -> None:
    policy = SynchronousPolicy(SynchronousSettings(learners_per_round=8, min_update_fraction=0.5))

    with pytest.raises(ValueError, match=r"byzantine=1 needs at least 2f \+ 3 = 5.*commit with 4"):
        check_compatible(policy, AggregationSettings(robust="krum", byzantine=1))


def test_multi_krum_with_a_buffer_smaller_than_2f_plus_3_is_refused() -> None:
    policy = BufferedPolicy(BufferedSettings(buffer_size=4))

    with pytest.raises(ValueError, match="buffer_size=4"):
        check_compatible(policy, AggregationSettings(robust="multi_krum", byzantine=1))


@pytest.mark.parametrize("rule", ["median", "trimmed_mean", "krum", "multi_krum"])
def test_fedasync_refuses_every_robust_rule(rule: str) -> None:
    with pytest.raises(ValueError, match="no robustness with one update per version"):
        check_compatible(AsynchronousPolicy(), AggregationSettings(robust=rule))  # type: ignore[arg-type]


def test_krum_with_large_enough_rounds_and_uniform_weights_has_no_warning() -> None:
    policy = SynchronousPolicy(
        SynchronousSettings(learners_per_round=10, min_update_fraction=1.0, weighting="uniform")
    )

    assert check_compatible(policy, AggregationSettings(robust="krum", byzantine=2)) == []


def test_trimmed_mean_that_trims_nothing_is_warned_about() -> None:
    policy = BufferedPolicy(BufferedSettings(buffer_size=5))

    warnings = check_compatible(policy, AggregationSettings(robust="trimmed_mean", trim_beta=0.1))

    assert len(warnings) == 1
    assert "trims nothing" in warnings[0]


def test_robust_rule_with_example_weighting_warns_that_it_is_unweighted() -> None:
    policy = SynchronousPolicy(SynchronousSettings(learners_per_round=10, weighting="examples"))

    warnings = check_compatible(policy, AggregationSettings(robust="median"))

    assert any("unweighted" in w and "'examples'" in w for w in warnings)


def test_plain_mean_is_compatible_with_every_protocol() -> None:
    for policy in (SynchronousPolicy(), BufferedPolicy(), AsynchronousPolicy()):
        assert check_compatible(policy, AggregationSettings()) == []


# ------------------------------------------------------------------ hinge staleness defaults


def test_hinge_defaults_are_the_papers_however_it_is_spelled() -> None:
    made = StalenessFunction("hinge")

    parsed = StalenessFunction.parse("hinge")

    assert made == parsed == StalenessFunction("hinge", 10.0, 4.0)
    assert made(6) == pytest.approx(1 / 21)


def test_polynomial_default_exponent_is_one_half() -> None:
    assert StalenessFunction().a == StalenessFunction.parse("polynomial").a == 0.5


# ------------------------------------------------------------- semi-synchronous probes


def _semi_round(policy: SemiSynchronousPolicy, now: float) -> dict[str, AssignTask]:
    return _train(_join(policy, "fs", now=now))


def test_semi_sync_probe_of_an_unmeasured_learner_has_a_budget_that_fits_the_round() -> None:
    train = TrainSettings(batch_size=10)
    policy = SemiSynchronousPolicy(
        SemiSynchronousSettings(min_learners=2, round_deadline_seconds=4.0, train=train)
    )

    tasks = _semi_round(policy, 0.0)

    deadline = policy.next_wakeup()
    assert deadline is not None
    for task in tasks.values():
        assert 0 < task.task.time_budget_seconds < deadline


def test_semi_sync_learner_slower_than_the_round_is_measured_and_then_gets_steps_that_fit() -> None:
    train = TrainSettings(batch_size=10)
    policy = SemiSynchronousPolicy(
        SemiSynchronousSettings(
            min_learners=2, round_deadline_seconds=4.0, budget_factor=2.0, train=train
        )
    )
    tasks = _semi_round(policy, 0.0)
    # 10 examples per learner, batch 10: an epoch is one batch. "s" needs 10 s a batch, longer
    # than the 4 s round; with the probe's budget it stops after 3.2 s and reports its speed.
    budget = tasks["s"].task.time_budget_seconds
    assert 0 < budget < 4.0
    policy.handle(_done(tasks["f"], now=0.2, completed_steps=1, seconds_per_batch=0.1))
    decisions = policy.handle(
        _done(tasks["s"], now=budget, completed_steps=1, train_seconds=10.0, seconds_per_batch=10.0)
    )

    assert any(isinstance(d, CommitVersion) for d in decisions)
    assert policy.seconds_per_batch["s"] == pytest.approx(10.0)
    steps = {lid: t.task.settings.local_steps for lid, t in _train(decisions).items()}  # type: ignore[union-attr]
    assert steps == {"f": 200, "s": 2}  # budget 2 x 10 s epoch = 20 s: 200 fast steps (cap), 2 slow


# --------------------------------------------------------- synchronous: nobody left working


def test_round_whose_last_worker_is_rejected_as_stale_closes_at_once() -> None:
    policy = SynchronousPolicy(SynchronousSettings(min_learners=2))
    tasks = _train(_join(policy, "ab"))
    policy.handle(_done(tasks["a"]))
    b = tasks["b"].task

    decisions = policy.handle(UpdateArrived(1.5, "b", b.task_id, b.version + 3, 10))

    assert isinstance(decisions[0], RejectUpdate)
    assert any(isinstance(d, CommitVersion) for d in decisions)
    assert policy.version == 1


# ------------------------------------------------------------- round-less task deadlines


def test_round_less_tasks_carry_the_default_deadline() -> None:
    policy = BufferedPolicy()

    task = _train(_join(policy, "a", now=5.0))["a"]

    assert task.task.deadline_seconds == 600.0
    assert policy.next_wakeup() == pytest.approx(605.0)


@pytest.mark.parametrize("policy_class", [AsynchronousPolicy, BufferedPolicy])
def test_expired_task_is_cancelled_and_its_slot_goes_to_another_learner(
    policy_class: type[AsynchronousPolicy] | type[BufferedPolicy],
) -> None:
    settings_class = (
        AsynchronousSettings if policy_class is AsynchronousPolicy else BufferedSettings
    )
    policy = policy_class(settings_class(concurrency=1, task_deadline_seconds=10.0))  # type: ignore[arg-type]
    hung = _train(_join(policy, "h"))["h"]
    _join(policy, "o", now=1.0)  # idle: the one slot is taken

    decisions = policy.handle(Tick(10.0))

    assert CancelTask("h", hung.task.task_id, "no result within 10 s") in decisions
    assert list(_train(decisions)) == ["o"]
    assert policy.next_wakeup() == pytest.approx(20.0)
    assert isinstance(policy.handle(_done(hung, now=11.0))[0], RejectUpdate)


def test_expired_task_of_the_only_learner_is_given_back_to_it() -> None:
    policy = AsynchronousPolicy(AsynchronousSettings(task_deadline_seconds=10.0))
    _join(policy, "a")

    decisions = policy.handle(Tick(12.0))

    assert any(isinstance(d, CancelTask) for d in decisions)
    assert list(_train(decisions)) == ["a"]
    assert policy.next_wakeup() == pytest.approx(22.0)


def test_tick_before_any_deadline_cancels_nothing() -> None:
    policy = BufferedPolicy(BufferedSettings(task_deadline_seconds=10.0))
    _join(policy, "a")

    assert policy.handle(Tick(9.0)) == []


@pytest.mark.parametrize("value", [0.0, -1.0, math.inf])
def test_task_deadline_must_be_finite_and_positive(value: float) -> None:
    with pytest.raises(ValueError, match="task_deadline_seconds"):
        BufferedSettings(task_deadline_seconds=value)


def test_deadline_heap_stays_bounded_by_outstanding_tasks() -> None:
    policy = BufferedPolicy(BufferedSettings(concurrency=2))
    pending = _train(_join(policy, "abcd"))

    for step in range(2000):
        task = pending.pop(sorted(pending)[step % len(pending)])
        pending.update(_train(policy.handle(_done(task, now=float(step)))))

    assert len(policy._deadlines) <= 2 * 2 + 64 + 1


# ----------------------------------------------------------------- bounded staleness counters


def test_round_less_policies_keep_bounded_staleness_counters_not_lists() -> None:
    policy = AsynchronousPolicy()
    tasks = _train(_join(policy, "ab"))
    fast = _train(policy.handle(_done(tasks["a"])))["a"]
    policy.handle(_done(fast))

    policy.handle(_done(tasks["b"]))  # 2 versions stale

    info = policy.describe()
    assert (info["staleness_max"], info["staleness_mean"]) == (2, pytest.approx(2 / 3))
    assert not hasattr(policy, "staleness_seen")
    assert not hasattr(policy, "alphas")
