"""Addressed effects: what the federation core asks its driver to do.

The core (`metis_async.federation.FederationCore`) holds no sockets and no sessions. Every call
returns a list of effects addressed by learner id, which the driver carries out in order: the
gRPC server turns them into messages on streams, the simulator into simulated learners' work.
Effects are plain data (no protobuf, no numpy beyond the committed model reference), so both
drivers read them the same way and a test can compare them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import TypeAlias

import numpy as np
import numpy.typing as npt

from metis_async.protocols import Task


class Notice(str, Enum):
    """Why an answer to a learner's result is not an acceptance (in-band, non-fatal)."""

    STALE = "stale"  # the task closed (round over, cancelled, deadline) or the update was refused
    DUPLICATE = "duplicate"  # a result for this task was already received


class FederationState(str, Enum):
    """What the federation is doing, as learners and operators are told."""

    WAITING_FOR_MODEL = "waiting_for_model"
    WAITING_FOR_LEARNERS = "waiting_for_learners"
    TRAINING = "training"
    FINISHED = "finished"
    DRAINING = "draining"


@dataclass(frozen=True)
class SendModel:
    """Deliver model `version` (the current one) to the learner before its next task."""

    learner_id: str
    version: int


@dataclass(frozen=True)
class SendTask:
    """Send `task` (train or evaluate) to its learner; its model was sent before."""

    task: Task


@dataclass(frozen=True)
class SendCancel:
    """Tell the learner to drop `task_id`."""

    learner_id: str
    task_id: str
    reason: str


@dataclass(frozen=True)
class SendNotice:
    """Answer a result that was not taken, without ending the stream."""

    learner_id: str
    task_id: str
    notice: Notice
    message: str


@dataclass(frozen=True)
class SendSecure:
    """Send a learner one step of a secure-aggregation round (a `SecAggStep` message)."""

    learner_id: str
    step: object


@dataclass(frozen=True)
class SendAck:
    """Tell a learner its update is durably part of committed `version` (it may forget it)."""

    learner_id: str
    task_id: str
    version: int


@dataclass(frozen=True)
class RequestInitialModel:
    """Ask this learner to propose the first model (the controller started without one)."""

    learner_id: str


@dataclass(frozen=True)
class SendStatus:
    """Tell learners what the federation is doing; `learner_id` None means every learner."""

    learner_id: str | None
    state: FederationState
    learners_connected: int
    learners_needed: int
    message: str


@dataclass(frozen=True)
class CommitRecord:
    """What one committed version is made of.

    Attributes:
        version: the new version number.
        task_ids: the tasks whose updates were folded into it, in arrival order (the exactly-once
            accounting of checkpoints builds on this).
        total_weight: sum of their aggregation weights.
        reason: the policy's reason for committing.
    """

    version: int
    task_ids: tuple[str, ...]
    total_weight: float
    reason: str


@dataclass(frozen=True)
class VersionCommitted:
    """A new version exists; `model` is its flat float32 model, or an encrypted version (uint8)
    under homomorphic aggregation (read-only, never modified).

    `published` is whatever the driver's publish hook made of it while the commit ran in the
    core's thread (the gRPC driver: the version's encoded broadcast), so the driver switches to
    the new bytes exactly where this effect stands in the effect order.
    """

    record: CommitRecord
    model: npt.NDArray[np.float32] | npt.NDArray[np.uint8] = field(repr=False)
    published: object = field(default=None, repr=False)


@dataclass(frozen=True)
class CommitRefused:
    """A commit the policy asked for could not be made; the model did not change."""

    version: int
    reason: str
    task_ids: tuple[str, ...]


@dataclass(frozen=True)
class Shutdown:
    """End the federation for learners; `learner_id` None means every connected learner.

    Learners that announced the `final_model` capability were sent the final version before.
    """

    learner_id: str | None
    finished: bool  # True: the federation is over; False: the controller drains (come back)
    reason: str
    final_version: int


@dataclass(frozen=True)
class FederationFinished:
    """The policy finished the federation."""

    reason: str
    version: int


Effect: TypeAlias = (
    SendModel
    | SendTask
    | SendCancel
    | SendNotice
    | SendAck
    | SendSecure
    | RequestInitialModel
    | SendStatus
    | VersionCommitted
    | CommitRefused
    | Shutdown
    | FederationFinished
)
