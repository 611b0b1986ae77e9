"""Federation protocols: pure policy objects that turn events into decisions.

`make_policy(name, **settings)` builds one by name, as the CLI and the demo do.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from metis_async.protocols.asynchronous import AsynchronousPolicy, AsynchronousSettings
from metis_async.protocols.base import (
    AcceptUpdate,
    AssignTask,
    CancelTask,
    CommitFailed,
    CommitVersion,
    Decision,
    DiscardAggregate,
    EvaluationArrived,
    Event,
    Finish,
    LearnerJoined,
    LearnerLost,
    Policy,
    RejectUpdate,
    SecureStepArrived,
    SendSecureStep,
    Task,
    TaskFailed,
    TaskKind,
    Tick,
    TrainSettings,
    UpdateArrived,
)
from metis_async.protocols.buffered import BufferedPolicy, BufferedSettings
from metis_async.protocols.continuous import ContinuousPolicy, ContinuousSettings
from metis_async.protocols.semi_synchronous import SemiSynchronousPolicy, SemiSynchronousSettings
from metis_async.protocols.staleness import StalenessFunction
from metis_async.protocols.synchronous import SynchronousPolicy, SynchronousSettings

POLICIES: dict[str, tuple[Callable[[Any], Policy], type[Any]]] = {
    "synchronous": (SynchronousPolicy, SynchronousSettings),
    "semi_synchronous": (SemiSynchronousPolicy, SemiSynchronousSettings),
    "asynchronous": (AsynchronousPolicy, AsynchronousSettings),
    "buffered": (BufferedPolicy, BufferedSettings),
}
"""Policy class and settings class by protocol name."""


def make_policy(name: str, **settings: object) -> Policy:
    """Build the policy called `name` with `settings` (fields of its settings dataclass).

    Raises ValueError naming the problem: an unknown protocol, a setting the protocol does not
    have, or an invalid value.
    """
    try:
        policy_class, settings_class = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown protocol {name!r}; choose from {sorted(POLICIES)}") from None
    known = {f.name for f in dataclasses.fields(settings_class)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ValueError(
            f"protocol {name!r} has no setting {', '.join(unknown)}; it has {sorted(known)}"
        )
    return policy_class(settings_class(**settings))


__all__ = [
    "POLICIES",
    "AcceptUpdate",
    "AssignTask",
    "AsynchronousPolicy",
    "AsynchronousSettings",
    "BufferedPolicy",
    "BufferedSettings",
    "CancelTask",
    "CommitFailed",
    "CommitVersion",
    "ContinuousPolicy",
    "ContinuousSettings",
    "Decision",
    "DiscardAggregate",
    "EvaluationArrived",
    "Event",
    "Finish",
    "LearnerJoined",
    "LearnerLost",
    "Policy",
    "RejectUpdate",
    "SecureStepArrived",
    "SemiSynchronousPolicy",
    "SemiSynchronousSettings",
    "SendSecureStep",
    "StalenessFunction",
    "SynchronousPolicy",
    "SynchronousSettings",
    "Task",
    "TaskFailed",
    "TaskKind",
    "Tick",
    "TrainSettings",
    "UpdateArrived",
    "make_policy",
]
