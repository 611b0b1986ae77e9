"""Federation protocols: pure policy objects that turn events into decisions.

`make_policy(name, **settings)` builds one by name, as the CLI and the demo do.
"""

from __future__ import annotations

from collections.abc import Callable

from metis_async.protocols.asynchronous import AsynchronousPolicy, AsynchronousSettings
from metis_async.protocols.base import (
    AcceptUpdate,
    AssignTask,
    CancelTask,
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

POLICIES: dict[str, Callable[..., Policy]] = {
    "synchronous": lambda **kw: SynchronousPolicy(SynchronousSettings(**kw)),
    "semi_synchronous": lambda **kw: SemiSynchronousPolicy(SemiSynchronousSettings(**kw)),
    "asynchronous": lambda **kw: AsynchronousPolicy(AsynchronousSettings(**kw)),
    "buffered": lambda **kw: BufferedPolicy(BufferedSettings(**kw)),
}
"""Policy factories by protocol name; each takes the policy's settings as keyword arguments."""


def make_policy(name: str, **settings: object) -> Policy:
    """Build the policy called `name` with `settings`; raises ValueError for an unknown name."""
    try:
        factory = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown protocol {name!r}; choose from {sorted(POLICIES)}") from None
    return factory(**settings)


__all__ = [
    "POLICIES",
    "AcceptUpdate",
    "AssignTask",
    "AsynchronousPolicy",
    "AsynchronousSettings",
    "BufferedPolicy",
    "BufferedSettings",
    "CancelTask",
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
    "SemiSynchronousPolicy",
    "SemiSynchronousSettings",
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
