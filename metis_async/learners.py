"""What the federation core remembers of each learner id, across its sessions.

A learner's sessions come and go (reconnects, controller drains); its identity stays. The
`LearnerBook` keeps, per learner id: whether it is connected and known to the policy, what it
announced (examples, capabilities), the version its current session holds, its outstanding
tasks, the tasks that closed without a result (bounded, so a late or duplicate answer after a
reconnect gets a clear in-band reply), and participation counters. Disconnected learners are
forgotten oldest first beyond a bound, so memory stays bounded however many ids ever joined.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field

from metis_async.protocols.base import Task

DEFAULT_CAPABILITIES = frozenset({"train", "evaluate", "delta"})
"""What a learner that announces no capabilities can do."""


def task_key(wire_id: str, learner_id: str) -> str:
    """The core's key of task `wire_id` of `learner_id` (its exactly-once records).

    The train tasks the core hands out together share one wire id, so that their bytes are the
    same for every learner and a broadcast writes one object to every stream; a task is its
    wire id *and* its learner. Our wire ids hold no space, so the key splits at the first one
    (`wire_task_id`); the key of any other id (a learner's invention) starts with a space,
    which no stored key does."""
    if not wire_id or " " in wire_id:
        return " " + wire_id
    return f"{wire_id} {learner_id}"


def wire_task_id(key: str) -> str:
    """The wire id of task key `key` (`task_key`)."""
    return key.partition(" ")[0]


@dataclass(slots=True)
class Outstanding:
    """A task the learner holds: as it was sent (its `task_id` is the wire id, shared with the
    other tasks handed out with it) and the id its policy gave it."""

    task: Task
    policy_id: str


@dataclass
class LearnerRecord:
    """What the core remembers of one learner id."""

    learner_id: str
    num_examples: int = 0
    capabilities: frozenset[str] = DEFAULT_CAPABILITIES
    connected: bool = False
    admitted: bool = False  # the policy knows it is connected
    held_version: int | None = None  # the version its current session holds
    tasks: dict[str, Outstanding] = field(default_factory=dict)  # by wire task id
    closed: OrderedDict[str, str] = field(default_factory=OrderedDict)  # wire task id -> why
    tasks_assigned: int = 0
    updates_accepted: int = 0
    updates_rejected: int = 0
    evaluations: int = 0
    missed: int = 0  # tasks in a row cancelled without an answer
    benched_until: float = 0.0  # not handed to the policy before this time (events' clock)
    # For people (dashboard, `metis-async learners`), on the events' clock:
    joined_at: float = 0.0  # its current session began
    last_seen: float = 0.0  # its last join, result, evaluation or failure report
    examples_per_second: float | None = None  # from its last training report
    last_staleness: int | None = None  # versions behind, of its last accepted update


class LearnerBook:
    """Every learner id the core knows, connected or not (see the module docstring).

    Args:
        closed_tasks_kept: closed task ids remembered per learner.
        learners_remembered: disconnected learner ids remembered (oldest forgotten first).
    """

    def __init__(self, closed_tasks_kept: int = 256, learners_remembered: int = 1_000_000) -> None:
        self._closed_kept = closed_tasks_kept
        self._remembered = learners_remembered
        self._records: dict[str, LearnerRecord] = {}
        self._departed: OrderedDict[str, None] = OrderedDict()  # disconnected ids, oldest first
        self.connected = 0

    def get(self, learner_id: str) -> LearnerRecord | None:
        """The record of `learner_id`, if it is remembered."""
        return self._records.get(learner_id)

    def __getitem__(self, learner_id: str) -> LearnerRecord:
        return self._records[learner_id]

    def __iter__(self) -> Iterator[LearnerRecord]:
        return iter(self._records.values())

    def join(self, learner_id: str) -> LearnerRecord:
        """`learner_id` connected; its record (new, or remembered from an earlier session)."""
        record = self._records.get(learner_id)
        if record is None:
            record = self._records[learner_id] = LearnerRecord(learner_id)
        elif record.connected:
            raise RuntimeError(
                f"learner {learner_id!r} joined twice; the driver must drop it first"
            )
        self._departed.pop(learner_id, None)
        record.connected = True
        record.admitted = False
        record.held_version = None
        self.connected += 1
        return record

    def leave(self, record: LearnerRecord, reason: str) -> list[str]:
        """`record`'s session ended; returns its outstanding tasks, now closed with `reason`."""
        record.connected = False
        record.held_version = None
        self.connected -= 1
        void = list(record.tasks)
        record.tasks.clear()
        for task_id in void:
            self.remember_closed(record, task_id, reason)
        self._departed[record.learner_id] = None
        while len(self._departed) > self._remembered:
            old, _ = self._departed.popitem(last=False)
            self._records.pop(old, None)
        return void

    def remember_closed(self, record: LearnerRecord, task_id: str, reason: str) -> None:
        """Record why `task_id` closed, so a late answer gets a clear reply (bounded)."""
        record.closed[task_id] = reason
        while len(record.closed) > self._closed_kept:
            record.closed.popitem(last=False)

    def closed_reason(self, learner_id: str, task_id: str) -> str | None:
        """Why `task_id` of `learner_id` closed, if it is remembered."""
        record = self._records.get(learner_id)
        return record.closed.get(task_id) if record is not None else None

    def participation(self) -> dict[str, dict[str, int]]:
        """Per learner: tasks assigned, updates accepted and rejected, evaluations."""
        return {
            lid: {
                "tasks_assigned": r.tasks_assigned,
                "updates_accepted": r.updates_accepted,
                "updates_rejected": r.updates_rejected,
                "evaluations": r.evaluations,
            }
            for lid, r in self._records.items()
        }
