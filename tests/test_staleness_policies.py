"""Semi-synchronous, asynchronous and buffered policies as pure objects (no sockets)."""

from __future__ import annotations

import math

import pytest

from metis_async.protocols import (
    AcceptUpdate,
    AssignTask,
    AsynchronousPolicy,
    AsynchronousSettings,
    BufferedPolicy,
    BufferedSettings,
    CommitVersion,
    Decision,
    Finish,
    LearnerJoined,
    LearnerLost,
    RejectUpdate,
    SemiSynchronousPolicy,
    SemiSynchronousSettings,
    StalenessFunction,
    TrainSettings,
    UpdateArrived,
)


def _tasks(decisions: list[Decision]) -> dict[str, AssignTask]:
    return {d.task.learner_id: d for d in decisions if isinstance(d, AssignTask)}


def _update(task: AssignTask, **kw: float) -> UpdateArrived:
    t = task.task
    return UpdateArrived(1.0, t.learner_id, t.task_id, t.version, 10, **kw)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ staleness


@pytest.mark.parametrize(
    ("function", "tau", "expected"),
    [
        (StalenessFunction("constant"), 7, 1.0),
        (StalenessFunction("polynomial", a=0.5), 3, 0.5),
        (StalenessFunction("hinge", a=10, b=4), 4, 1.0),
        (StalenessFunction("hinge", a=10, b=4), 6, 1 / 21),
        (StalenessFunction("inverse_sqrt"), 8, 1 / 3),
    ],
)
def test_staleness_functions_match_their_formulas(
    function: StalenessFunction, tau: int, expected: float
) -> None:
    assert function(tau) == pytest.approx(expected)


def test_staleness_parse_reads_kind_and_parameters() -> None:
    assert StalenessFunction.parse("hinge:5:2") == StalenessFunction("hinge", 5.0, 2.0)
    assert StalenessFunction.parse("constant").kind == "constant"


def test_unknown_staleness_kind_is_named() -> None:
    with pytest.raises(ValueError, match="staleness kind"):
        StalenessFunction("linear")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ asynchronous


def test_async_hands_work_to_every_learner_up_to_concurrency_with_full_weights() -> None:
    policy = AsynchronousPolicy(AsynchronousSettings(concurrency=2))

    decisions = [d for i in range(3) for d in policy.handle(LearnerJoined(0.0, f"l{i}", 10))]

    tasks = _tasks(decisions)
    assert len(tasks) == 2
    assert all(not t.task.upload_delta for t in tasks.values())


def test_async_commits_every_update_with_staleness_weighted_alpha() -> None:
    settings = AsynchronousSettings(alpha=0.8, staleness=StalenessFunction("polynomial", 0.5))
    policy = AsynchronousPolicy(settings)
    first = _tasks(policy.handle(LearnerJoined(0.0, "a", 10)))["a"]
    slow = _tasks(policy.handle(LearnerJoined(0.0, "b", 10)))["b"]
    for _ in range(3):  # "a" commits three versions while "b" trains from version 0
        first = _tasks(policy.handle(_update(first)))["a"]

    decisions = policy.handle(_update(slow))

    assert decisions[0] == AcceptUpdate(slow.task.task_id, 1.0)
    commit = decisions[1]
    assert isinstance(commit, CommitVersion)
    assert commit.relative
    assert commit.scale == pytest.approx(0.8 * (3 + 1) ** -0.5)
    assert policy.version == 4
    assert _tasks(decisions)["b"].task.version == 4  # fresh work at once


def test_async_rejects_updates_beyond_max_staleness_and_reassigns() -> None:
    policy = AsynchronousPolicy(AsynchronousSettings(max_staleness=1))
    fast = _tasks(policy.handle(LearnerJoined(0.0, "a", 10)))["a"]
    slow = _tasks(policy.handle(LearnerJoined(0.0, "b", 10)))["b"]
    for _ in range(2):
        fast = _tasks(policy.handle(_update(fast)))["a"]

    decisions = policy.handle(_update(slow))

    assert isinstance(decisions[0], RejectUpdate)
    assert "2 versions stale, max_staleness is 1" in decisions[0].reason
    assert "b" in _tasks(decisions)
    assert policy.version == 2


def test_async_finishes_after_rounds_versions() -> None:
    policy = AsynchronousPolicy(AsynchronousSettings(rounds=2))
    task = _tasks(policy.handle(LearnerJoined(0.0, "a", 10)))["a"]
    task = _tasks(policy.handle(_update(task)))["a"]

    decisions = policy.handle(_update(task))

    assert isinstance(decisions[-1], Finish)
    assert policy.finished


def test_async_lost_learner_frees_its_slot() -> None:
    policy = AsynchronousPolicy(AsynchronousSettings(concurrency=1))
    assert list(_tasks(policy.handle(LearnerJoined(0.0, "a", 10)))) == ["a"]
    assert policy.handle(LearnerJoined(0.0, "b", 10)) == []  # the one slot is taken

    decisions = policy.handle(LearnerLost(1.0, "a"))

    assert list(_tasks(decisions)) == ["b"]


# ------------------------------------------------------------------------------ buffered


def test_buffered_commits_every_k_updates_with_server_learning_rate() -> None:
    policy = BufferedPolicy(BufferedSettings(buffer_size=3, server_learning_rate=0.9))
    tasks = _tasks([d for i in range(3) for d in policy.handle(LearnerJoined(0.0, f"l{i}", 10))])

    decisions = [d for t in tasks.values() for d in policy.handle(_update(t))]

    commits = [d for d in decisions if isinstance(d, CommitVersion)]
    assert len(commits) == 1
    assert commits[0].scale == pytest.approx(0.9 / 3)
    assert not commits[0].normalize
    assert not commits[0].relative
    assert policy.version == 1


def test_buffered_weights_stale_updates_by_inverse_sqrt() -> None:
    policy = BufferedPolicy(BufferedSettings(buffer_size=1))
    fast = _tasks(policy.handle(LearnerJoined(0.0, "a", 10)))["a"]
    slow = _tasks(policy.handle(LearnerJoined(0.0, "b", 10)))["b"]
    for _ in range(3):
        fast = _tasks(policy.handle(_update(fast)))["a"]

    decisions = policy.handle(_update(slow))

    accept = decisions[0]
    assert isinstance(accept, AcceptUpdate)
    assert accept.weight == pytest.approx(1 / math.sqrt(1 + 3))


def test_buffered_example_weighting_divides_by_the_base_weights() -> None:
    # Behaviour changed (issue 7): example weighting no longer needs normalize_weights; the
    # buffer is divided by the sum of the base weights, so staleness stays an absolute factor.
    policy = BufferedPolicy(BufferedSettings(buffer_size=1, weighting="examples"))
    task = _tasks(policy.handle(LearnerJoined(0.0, "a", 10)))["a"]

    decisions = policy.handle(_update(task))

    commit = next(d for d in decisions if isinstance(d, CommitVersion))
    assert not commit.normalize
    assert commit.scale == pytest.approx(1 / 10)


# ------------------------------------------------------------------------------ semi-synchronous


def _semi(**kw: object) -> SemiSynchronousPolicy:
    train = TrainSettings(local_steps=10, batch_size=10)
    return SemiSynchronousPolicy(SemiSynchronousSettings(min_learners=2, train=train, **kw))  # type: ignore[arg-type]


def test_semi_sync_first_round_measures_with_one_epoch() -> None:
    policy = _semi()

    tasks = _tasks([d for lid in "ab" for d in policy.handle(LearnerJoined(0.0, lid, 100))])

    assert {t.task.settings.epochs for t in tasks.values() if t.task.settings} == {1}
    assert {t.task.settings.local_steps for t in tasks.values() if t.task.settings} == {0}


def test_semi_sync_gives_each_learner_the_steps_that_fit_the_budget() -> None:
    policy = _semi(budget_factor=2.0, max_local_steps=500)
    tasks = _tasks([d for lid in "ab" for d in policy.handle(LearnerJoined(0.0, lid, 100))])
    # 100 examples, batch 10: a epoch = 10 batches. "a": 0.01 s/batch, "b": 0.1 s/batch.
    policy.handle(_update(tasks["a"], seconds_per_batch=0.01, seconds_per_epoch=0.1))
    decisions = policy.handle(_update(tasks["b"], seconds_per_batch=0.1, seconds_per_epoch=1.0))

    steps = {
        lid: t.task.settings.local_steps for lid, t in _tasks(decisions).items() if t.task.settings
    }
    assert policy.budget_seconds == pytest.approx(2.0)  # λ × slowest epoch
    assert steps == {"a": 200, "b": 20}


def test_semi_sync_caps_fast_learners_at_max_local_steps() -> None:
    policy = _semi(budget_factor=2.0, max_local_steps=50)
    tasks = _tasks([d for lid in "ab" for d in policy.handle(LearnerJoined(0.0, lid, 100))])
    policy.handle(_update(tasks["a"], seconds_per_batch=0.001, seconds_per_epoch=0.01))
    decisions = policy.handle(_update(tasks["b"], seconds_per_batch=0.1, seconds_per_epoch=1.0))

    assert _tasks(decisions)["a"].task.settings.local_steps == 50  # type: ignore[union-attr]


def test_semi_sync_round_deadline_is_budget_plus_slack() -> None:
    policy = _semi(budget_factor=2.0, round_deadline_seconds=5.0)
    tasks = _tasks([d for lid in "ab" for d in policy.handle(LearnerJoined(0.0, lid, 100))])
    policy.handle(_update(tasks["a"], seconds_per_batch=0.01, seconds_per_epoch=0.1))

    policy.handle(_update(tasks["b"], seconds_per_batch=0.1, seconds_per_epoch=1.0))

    assert policy.next_wakeup() == pytest.approx(1.0 + 2.0 + 5.0)


@pytest.mark.parametrize("policy_class", [AsynchronousPolicy, BufferedPolicy])
def test_every_learner_takes_part_when_concurrency_is_below_the_learner_count(
    policy_class: type[AsynchronousPolicy] | type[BufferedPolicy],
) -> None:
    settings_class = (
        AsynchronousSettings if policy_class is AsynchronousPolicy else BufferedSettings
    )
    policy = policy_class(settings_class(concurrency=2, seed=3))  # type: ignore[arg-type]
    pending = _tasks([d for i in range(10) for d in policy.handle(LearnerJoined(0.0, f"l{i}", 10))])
    trained: set[str] = set()

    for step in range(200):
        learner_id = sorted(pending)[step % len(pending)]
        task = pending.pop(learner_id)
        trained.add(learner_id)
        pending.update(_tasks(policy.handle(_update(task))))

    assert trained == {f"l{i}" for i in range(10)}
