"""The synchronous policy as a pure object: simulated clock, fake learners, no sockets."""

from __future__ import annotations

import pytest

from metis_async.protocols import (
    AcceptUpdate,
    AssignTask,
    CancelTask,
    CommitVersion,
    Decision,
    DiscardAggregate,
    Finish,
    LearnerJoined,
    LearnerLost,
    RejectUpdate,
    SynchronousPolicy,
    SynchronousSettings,
    TaskFailed,
    TaskKind,
    Tick,
    UpdateArrived,
)


def _join_all(policy: SynchronousPolicy, n: int, now: float = 0.0) -> list[Decision]:
    decisions: list[Decision] = []
    for i in range(n):
        decisions += policy.handle(LearnerJoined(now, f"l{i}", num_examples=10 * (i + 1)))
    return decisions


def _train_tasks(decisions: list[Decision]) -> list[AssignTask]:
    return [d for d in decisions if isinstance(d, AssignTask) and d.task.kind is TaskKind.TRAIN]


def _update(task: AssignTask, now: float = 1.0, examples: int = 10) -> UpdateArrived:
    return UpdateArrived(now, task.task.learner_id, task.task.task_id, task.task.version, examples)


def test_round_starts_only_when_min_learners_connected() -> None:
    policy = SynchronousPolicy(SynchronousSettings(min_learners=3))

    decisions = _join_all(policy, 2)

    assert decisions == []


def test_round_assigns_every_connected_learner_by_default() -> None:
    policy = SynchronousPolicy(SynchronousSettings(min_learners=3))

    tasks = _train_tasks(_join_all(policy, 3))

    assert sorted(t.task.learner_id for t in tasks) == ["l0", "l1", "l2"]
    assert all(t.task.version == 0 for t in tasks)


def test_round_commits_when_all_selected_report_and_weights_are_examples() -> None:
    policy = SynchronousPolicy(SynchronousSettings(min_learners=2))
    tasks = _train_tasks(_join_all(policy, 2))

    first = policy.handle(_update(tasks[0], examples=7))
    second = policy.handle(_update(tasks[1], examples=3))

    assert first == [AcceptUpdate(tasks[0].task.task_id, 7.0)]
    assert second[0] == AcceptUpdate(tasks[1].task.task_id, 3.0)
    assert isinstance(second[1], CommitVersion)
    assert policy.version == 1
    next_round = _train_tasks(second)
    assert {t.task.version for t in next_round} == {1}


def test_uniform_weighting_gives_every_update_weight_one() -> None:
    policy = SynchronousPolicy(SynchronousSettings(min_learners=1, weighting="uniform"))
    tasks = _train_tasks(_join_all(policy, 1))

    decisions = policy.handle(_update(tasks[0], examples=500))

    assert decisions[0] == AcceptUpdate(tasks[0].task.task_id, 1.0)


def test_deadline_commits_partial_round_and_cancels_stragglers() -> None:
    settings = SynchronousSettings(min_learners=4, round_deadline_seconds=10.0)
    policy = SynchronousPolicy(settings)
    tasks = _train_tasks(_join_all(policy, 4))
    policy.handle(_update(tasks[0]))
    policy.handle(_update(tasks[1]))

    assert policy.next_wakeup() == 10.0
    decisions = policy.handle(Tick(10.0))

    cancelled = {d.task_id for d in decisions if isinstance(d, CancelTask)}
    assert cancelled == {tasks[2].task.task_id, tasks[3].task.task_id}
    assert any(isinstance(d, CommitVersion) for d in decisions)
    assert policy.version == 1


def test_deadline_below_quorum_discards_round_and_keeps_version() -> None:
    settings = SynchronousSettings(min_learners=4, round_deadline_seconds=10.0)
    policy = SynchronousPolicy(settings)
    tasks = _train_tasks(_join_all(policy, 4))
    policy.handle(_update(tasks[0]))

    decisions = policy.handle(Tick(10.0))

    assert any(isinstance(d, DiscardAggregate) for d in decisions)
    assert policy.version == 0
    assert len(_train_tasks(decisions)) == 4  # a fresh round starts at once


def test_tick_before_deadline_does_nothing() -> None:
    policy = SynchronousPolicy(SynchronousSettings(min_learners=2, round_deadline_seconds=10.0))
    _join_all(policy, 2)

    assert policy.handle(Tick(9.9)) == []


def test_lost_learners_never_stall_the_round() -> None:
    policy = SynchronousPolicy(SynchronousSettings(min_learners=3, min_update_fraction=0.3))
    tasks = _train_tasks(_join_all(policy, 3))
    policy.handle(_update(tasks[0]))

    policy.handle(LearnerLost(2.0, tasks[1].task.learner_id))
    decisions = policy.handle(LearnerLost(2.0, tasks[2].task.learner_id))

    assert any(isinstance(d, CommitVersion) for d in decisions)
    assert policy.version == 1


def test_failed_task_counts_as_done_for_closing() -> None:
    policy = SynchronousPolicy(SynchronousSettings(min_learners=2))
    tasks = _train_tasks(_join_all(policy, 2))
    policy.handle(_update(tasks[0]))

    decisions = policy.handle(TaskFailed(2.0, tasks[1].task.learner_id, tasks[1].task.task_id))

    assert any(isinstance(d, CommitVersion) for d in decisions)


def test_over_selection_cancels_the_slowest_once_goal_met() -> None:
    policy = SynchronousPolicy(
        SynchronousSettings(min_learners=13, learners_per_round=10, over_selection=1.3)
    )
    tasks = _train_tasks(_join_all(policy, 13))
    assert len(tasks) == 13

    decisions: list[Decision] = []
    for task in tasks[:10]:
        decisions = policy.handle(_update(task))

    assert any(isinstance(d, CommitVersion) for d in decisions)
    cancelled = {d.task_id for d in decisions if isinstance(d, CancelTask)}
    assert cancelled == {t.task.task_id for t in tasks[10:]}


def test_update_for_unknown_task_is_rejected() -> None:
    policy = SynchronousPolicy(SynchronousSettings(min_learners=1))
    _join_all(policy, 1)

    decisions = policy.handle(UpdateArrived(1.0, "l0", "bogus", 0, 5))

    assert decisions == [RejectUpdate("bogus", "task is not part of the open round")]


def test_finishes_after_configured_rounds_and_rejects_later_updates() -> None:
    policy = SynchronousPolicy(SynchronousSettings(min_learners=1, rounds=2))
    tasks = _train_tasks(_join_all(policy, 1))
    tasks = _train_tasks(policy.handle(_update(tasks[0])))

    decisions = policy.handle(_update(tasks[0]))

    assert isinstance(decisions[-1], Finish)
    assert policy.finished
    late = policy.handle(UpdateArrived(3.0, "l0", "x", 2, 1))
    assert isinstance(late[0], RejectUpdate)


def test_late_joiner_fills_an_underfilled_round() -> None:
    policy = SynchronousPolicy(SynchronousSettings(min_learners=1))
    _join_all(policy, 1)

    decisions = policy.handle(LearnerJoined(0.5, "late", 10))

    assert [t.task.learner_id for t in _train_tasks(decisions)] == ["late"]


def test_evaluation_tasks_are_sent_on_schedule() -> None:
    policy = SynchronousPolicy(SynchronousSettings(min_learners=2, evaluate_every=1))

    decisions = _join_all(policy, 2)

    kinds = [d.task.kind for d in decisions if isinstance(d, AssignTask)]
    assert kinds.count(TaskKind.EVALUATE) == 2


def test_thousands_of_learners_simulated_rounds_complete_in_order() -> None:
    n = 5000
    policy = SynchronousPolicy(
        SynchronousSettings(min_learners=n, learners_per_round=500, rounds=5, seed=1)
    )
    pending = _train_tasks(_join_all(policy, n))
    commits = 0
    now = 0.0
    while not policy.finished:
        now += 1.0
        next_pending: list[AssignTask] = []
        for task in pending:
            for d in policy.handle(_update(task, now=now)):
                commits += isinstance(d, CommitVersion)
                if isinstance(d, AssignTask) and d.task.kind is TaskKind.TRAIN:
                    next_pending.append(d)
        pending = next_pending

    assert commits == 5
    assert policy.version == 5


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("min_learners", 0),
        ("over_selection", 0.9),
        ("round_deadline_seconds", 0.0),
        ("min_update_fraction", 1.5),
        ("rounds", -1),
    ],
)
def test_invalid_settings_raise_value_error_naming_the_field(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field):
        SynchronousSettings(**{field: value})  # type: ignore[arg-type]
