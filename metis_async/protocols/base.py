"""Events, decisions and the `Policy` base class every protocol implements.

A policy is a pure object: the controller (or the simulator) feeds it events carrying the current
time, and it returns a list of decisions. It never touches sockets, threads or model arrays, so it
can be driven by a simulated clock with thousands of fake learners, and the same object runs in the
real server. Decisions are carried out in order before the next event is delivered.

A commit can fail (the aggregate would make a non-finite model, a robust rule lacks updates, ...).
The driver then follows one rule:

1. the aggregate is dropped and the model is unchanged (no version is created);
2. the decisions that follow the failed `CommitVersion` in the same list are NOT executed
   (a `Finish`, tasks of the next round or fresh tasks on the version that does not exist);
3. `CommitFailed` is delivered next, before any other event.

The policy treats the dropped decisions as never made: it undoes its version count
(`Policy.undo_commit`), forgets the tasks it assigned after the commit, withdraws a `Finish` it
declared because of that commit, and returns fresh decisions (the next round, new tasks). A
policy therefore emits at most one `CommitVersion` per list, and puts a `Finish` caused by a
commit in the same list, after it.
"""

from __future__ import annotations

import abc
import copy
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, TypeAlias

# --------------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------------


class TaskKind(str, Enum):
    """What a task asks a learner to do."""

    TRAIN = "train"
    EVALUATE = "evaluate"


@dataclass(frozen=True)
class TrainSettings:
    """Local training settings sent with a train task (mirrors `TrainConfig` on the wire).

    Attributes:
        local_steps: minibatch steps per task; 0 means `epochs` full passes.
        epochs: full passes over local data when `local_steps` is 0.
        batch_size: examples per minibatch.
        learning_rate: local SGD step size.
        proximal_mu: FedProx coefficient; 0 disables the proximal term.
    """

    local_steps: int = 20
    epochs: int = 1
    batch_size: int = 32
    learning_rate: float = 0.1
    proximal_mu: float = 0.0
    extra: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Task:
    """One unit of work for one learner, tagged with the model version it starts from."""

    task_id: str
    learner_id: str
    kind: TaskKind
    version: int
    settings: TrainSettings | None = None
    deadline_seconds: float = 0.0  # relative to assignment; 0 = none
    upload_delta: bool = True  # upload trained - base (True) or the trained weights (False)
    time_budget_seconds: float = 0.0  # learner should stop training after this long; 0 = none


# --------------------------------------------------------------------------------------------
# Events (controller -> policy)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LearnerJoined:
    """A learner opened a session and can take tasks."""

    now: float
    learner_id: str
    num_examples: int = 0
    can_evaluate: bool = True  # False: send this learner no evaluation tasks


@dataclass(frozen=True)
class LearnerLost:
    """A learner's session ended (disconnect, heartbeat timeout, error); its tasks are void."""

    now: float
    learner_id: str
    reason: str = ""


@dataclass(frozen=True)
class UpdateArrived:
    """A complete, well-formed training result arrived for an outstanding task.

    The controller has already checked the payload against the model layout; the policy decides
    whether and with which weight it enters the aggregate.
    """

    now: float
    learner_id: str
    task_id: str
    base_version: int
    num_examples: int
    completed_steps: int = 0
    train_seconds: float = 0.0
    metrics: Mapping[str, float] = field(default_factory=dict)
    seconds_per_batch: float = 0.0  # measured by the learner
    seconds_per_epoch: float = 0.0
    resent: bool = False
    """The learner resent it after reconnecting: its task is from an earlier controller start
    (never outstanding here). Policies that cannot place it reject it; the learner then drops
    it and trains the task it gets now."""


@dataclass(frozen=True)
class EvaluationArrived:
    """An evaluation result arrived."""

    now: float
    learner_id: str
    task_id: str
    version: int
    num_examples: int
    metrics: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class TaskFailed:
    """The learner reported it could not run a task."""

    now: float
    learner_id: str
    task_id: str
    reason: str = ""


@dataclass(frozen=True)
class Tick:
    """Time passed: the controller calls back at `Policy.next_wakeup()`."""

    now: float


@dataclass(frozen=True)
class CommitFailed:
    """The last `CommitVersion` could not be carried out: no version was created.

    Delivered right after the failed commit, before any other event; the decisions that followed
    the commit in its list were not executed (see the module docstring).

    Attributes:
        now: the time of the failure (same clock as every event).
        version: the version the commit would have created (the policy's `version` right after
            it emitted the `CommitVersion`).
        reason: why, for logs (e.g. the `CommitRefused` message).
        task_ids: the tasks whose accepted updates were in the dropped aggregate (for logs and
            counters; the updates are gone).
    """

    now: float
    version: int
    reason: str
    task_ids: tuple[str, ...] = ()


@dataclass(frozen=True)
class SecureStepArrived:
    """A learner's message of a secure-aggregation protocol step (a `SecAggStep`), for the
    wrapper running it (`protocols.secagg`); other policies never see one."""

    now: float
    learner_id: str
    step: Any


Event: TypeAlias = (
    LearnerJoined
    | LearnerLost
    | UpdateArrived
    | EvaluationArrived
    | TaskFailed
    | Tick
    | CommitFailed
    | SecureStepArrived
)

# --------------------------------------------------------------------------------------------
# Decisions (policy -> controller)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AssignTask:
    """Send `task` to its learner (after the model version it needs)."""

    task: Task


@dataclass(frozen=True)
class CancelTask:
    """Tell a learner to drop a task; any later result for it is stale."""

    learner_id: str
    task_id: str
    reason: str


@dataclass(frozen=True)
class AcceptUpdate:
    """Fold the update of `task_id` into the open aggregate with `weight` (> 0)."""

    task_id: str
    weight: float


@dataclass(frozen=True)
class RejectUpdate:
    """Discard the update of `task_id`; the learner is told `reason`."""

    task_id: str
    reason: str


@dataclass(frozen=True)
class CommitVersion:
    """Turn the open aggregate into the next model version, then clear the aggregate.

    The aggregate A is the weighted mean of the accepted uploads when `normalize`, else their
    weighted sum. With deltas (`relative` False) the server step is d = scale * A; with full
    weights (`relative` True) it is d = scale * (A - current), i.e. FedAsync's mixing
    current <- (1 - scale) * current + scale * A. The server optimizer (plain SGD with rate 1
    by default, i.e. new = current + d) turns d into the new version.
    """

    reason: str
    scale: float = 1.0
    normalize: bool = True
    relative: bool = False


@dataclass(frozen=True)
class DiscardAggregate:
    """Drop the open aggregate without changing the model (e.g. a round below quorum)."""

    reason: str


@dataclass(frozen=True)
class Finish:
    """The federation is over: tell every learner to stop."""

    reason: str


@dataclass(frozen=True)
class SendSecureStep:
    """Send `learner_id` a step of a secure-aggregation protocol (a `SecAggStep`)."""

    learner_id: str
    step: Any


Decision: TypeAlias = (
    AssignTask
    | CancelTask
    | AcceptUpdate
    | RejectUpdate
    | CommitVersion
    | DiscardAggregate
    | Finish
    | SendSecureStep
)


class Policy(abc.ABC):
    """Base class of a federation protocol.

    Subclasses implement `handle`; the named hooks keep policies small. The controller guarantees:
    events are delivered one at a time; decisions of one event are executed before the next event;
    every committed version increments `version` by one (the policy tracks it from its own
    `CommitVersion` decisions); a commit that fails is reported by `CommitFailed` at once, and the
    decisions after it in the same list are dropped (see the module docstring).
    """

    name: str = "policy"
    upload_delta = True
    """Whether learners upload deltas (trained − base) rather than trained weights."""
    mixes_full_models = False
    """Whether commits mix full uploaded models into the current one (`relative`): such an
    update cannot be pre-summed apart from the model, so ingest workers forward it whole."""

    checkpointed: tuple[str, ...] = ("version", "finished", "commits_failed", "_finished_by")
    """Attributes (plain JSON values) a checkpoint keeps: subclasses add their counters."""

    def __init__(self) -> None:
        self.version = 0
        self.finished = False
        self.commits_failed = 0
        # Every random choice (which learners train) draws from this generator: subclasses seed
        # it from their settings, and a driver may hand in its own (FederationCore(rng=...)).
        self.rng = random.Random(0)
        self._finished_by: int | None = None  # version whose commit made the policy finish

    def finish(self, reason: str) -> Finish:
        """Mark the policy finished because of the commit of `version`; returns the decision.

        Call it right after counting the commit, so `undo_commit` can withdraw it.
        """
        self.finished = True
        self._finished_by = self.version
        return Finish(reason)

    def undo_commit(self, event: CommitFailed) -> bool:
        """Uncount the version of a failed commit (and a `Finish` it caused).

        Returns False, changing nothing, when `event` is not about the policy's latest counted
        version (a duplicate or out-of-order report).
        """
        if event.version != self.version or self.version <= 0:
            return False
        self.version -= 1
        self.commits_failed += 1
        if self.finished and self._finished_by == event.version:
            self.finished = False
            self._finished_by = None
        return True

    @abc.abstractmethod
    def handle(self, event: Event) -> list[Decision]:
        """React to one event; return the decisions to execute in order."""

    def next_wakeup(self) -> float | None:
        """Earliest time (same clock as events) at which the policy wants a `Tick`, or None."""
        return None

    def snapshot(self) -> dict[str, Any]:
        """The state a checkpoint keeps: the `checkpointed` attributes and the generator's state.

        Taken at a commit, when no aggregate is open; work in flight (rounds, outstanding tasks)
        is not kept: learners reconnect to a restarted controller and get new tasks.
        """
        state: dict[str, Any] = {name: getattr(self, name) for name in self.checkpointed}
        version, internal, gauss = self.rng.getstate()
        state["rng"] = [version, list(internal), gauss]
        return state

    def resume(self, state: Mapping[str, Any]) -> None:
        """Take back a `snapshot` (of a policy of the same kind); unknown keys are ignored."""
        for name in self.checkpointed:
            if name in state:
                setattr(self, name, copy.deepcopy(state[name]))
        if "rng" in state:
            version, internal, gauss = state["rng"]
            self.rng.setstate((int(version), tuple(int(v) for v in internal), gauss))

    def describe(self) -> dict[str, object]:
        """Settings and counters for logs and the dashboard."""
        return {
            "protocol": self.name,
            "version": self.version,
            "finished": self.finished,
            "commits_failed": self.commits_failed,
        }
