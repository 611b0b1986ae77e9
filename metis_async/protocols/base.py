"""Events, decisions and the `Policy` base class every protocol implements.

A policy is a pure object: the controller (or the simulator) feeds it events carrying the current
time, and it returns a list of decisions. It never touches sockets, threads or model arrays, so it
can be driven by a simulated clock with thousands of fake learners, and the same object runs in the
real server. Decisions are carried out in order before the next event is delivered.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import TypeAlias

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


Event: TypeAlias = (
    LearnerJoined | LearnerLost | UpdateArrived | EvaluationArrived | TaskFailed | Tick
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


Decision: TypeAlias = (
    AssignTask
    | CancelTask
    | AcceptUpdate
    | RejectUpdate
    | CommitVersion
    | DiscardAggregate
    | Finish
)


class Policy(abc.ABC):
    """Base class of a federation protocol.

    Subclasses implement `handle`; the named hooks keep policies small. The controller guarantees:
    events are delivered one at a time; decisions of one event are executed before the next event;
    every committed version increments `version` by one (the policy tracks it from its own
    `CommitVersion` decisions).
    """

    name: str = "policy"

    def __init__(self) -> None:
        self.version = 0
        self.finished = False

    @abc.abstractmethod
    def handle(self, event: Event) -> list[Decision]:
        """React to one event; return the decisions to execute in order."""

    def next_wakeup(self) -> float | None:
        """Earliest time (same clock as events) at which the policy wants a `Tick`, or None."""
        return None

    def describe(self) -> dict[str, object]:
        """Settings and counters for logs and the dashboard."""
        return {"protocol": self.name, "version": self.version, "finished": self.finished}
