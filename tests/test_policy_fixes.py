"""Issue 7, algorithm correctness: policies as pure objects (events with a fake clock).

Failed commits, evaluation capabilities, task deadlines, semi-synchronous probes, and rounds that
close as soon as nobody is left working.
"""

from __future__ import annotations

import pytest

from metis_async.protocols import (
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
    SynchronousPolicy,
    SynchronousSettings,
    TaskKind,
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
    policy = policy_class(settings_class(min_learners=2))  # type: ignore[arg-type]
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
