"""SecAgg+ rounds around a round-based policy (SECURE AGGREGATION in the proto).

`SecAggRounds` wraps a synchronous (or semi-synchronous) policy the way Flower's SecAgg+
workflow wraps a strategy: the inner policy still decides who trains, what is accepted and when
a round commits; the wrapper runs the SecAgg+ steps around it, all as ordinary decisions and
events of the federation core (`SendSecureStep` out, `SecureStepArrived` in), so the gRPC
server and any other driver carry them without knowing what they mean.

1. The inner policy assigns a round's training tasks: the wrapper holds them and sends each
   picked learner `setup`; it collects their public keys, sends every answering learner all
   keys, collects the sealed shares and routes them to their recipients, and only then
   releases the tasks (to the learners that shared; the others' tasks fail).
2. Masked updates arrive and the core adds them mod 2^32 (`metis_async.secure.masked`); the
   inner policy accepts or rejects them as usual.
3. The inner policy commits: the wrapper holds the commit, asks the survivors to reveal
   (`unmask`), and once the reveals are in (or the step's deadline passed) hands the core a
   `SecureCommit` carrying what unmasking needs; the decisions the inner policy made after its
   commit (the next round's tasks) follow it.

Each step has `step_timeout_seconds`; a learner that misses one is left out of the round (the
masks of learners that drop after sharing are removed with their neighbours' shares).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from metis_async.protocols.base import (
    AcceptUpdate,
    AssignTask,
    CommitFailed,
    CommitVersion,
    Decision,
    DiscardAggregate,
    Event,
    Policy,
    SecureStepArrived,
    SendSecureStep,
    TaskFailed,
    TaskKind,
    Tick,
)
from metis_async.protocols.synchronous import SynchronousPolicy
from metis_async.secure.secagg import SecAggSettings
from metis_async.v1 import controller_pb2 as pb


@dataclass(frozen=True)
class SecAggUnmasking:
    """What the core needs to remove a round's masks (the `material` of a `SecureCommit`).

    Attributes:
        settings: the round's public settings.
        keys: every advertising learner's (sealing, masking) public keys by index.
        shared: the learners whose shares were delivered.
        survivors: the learners whose masked update was accepted (their sum is the aggregate).
        reveals: (owner, share) answers of the survivors.
    """

    settings: SecAggSettings
    keys: Mapping[int, tuple[bytes, bytes]]
    shared: frozenset[int]
    survivors: frozenset[int]
    reveals: tuple[tuple[int, bytes], ...]


@dataclass(frozen=True)
class SecureCommit(CommitVersion):
    """A `CommitVersion` of a SecAgg+ round, with what removing its masks takes."""

    material: SecAggUnmasking | None = None


@dataclass
class _Round:
    """One SecAgg+ round in progress."""

    settings: SecAggSettings
    members: list[str]  # learner id by index
    tasks: dict[str, AssignTask]  # held training task by learner id
    deadline: float
    phase: str = "keys"  # keys -> shares -> training -> reveal
    keys: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)
    sealed: dict[int, list[tuple[int, bytes]]] = field(default_factory=dict)  # sender -> (to, ..)
    shared: frozenset[int] = frozenset()
    task_of: dict[str, int] = field(default_factory=dict)  # released task id -> index
    survivors: set[int] = field(default_factory=set)
    reveals: dict[int, list[tuple[int, bytes]]] = field(default_factory=dict)
    held: list[Decision] = field(default_factory=list)  # the commit and what followed it

    @property
    def index_of(self) -> dict[str, int]:
        return {lid: i for i, lid in enumerate(self.members)}


MIN_COHORT = 3
"""The fewest learners a SecAgg+ round may sum: with two, each learns the other's update from
the sum and its own."""


def check_secagg_cohort(policy: Policy) -> None:
    """ValueError unless every round of `policy` needs at least `MIN_COHORT` learners."""
    settings = getattr(policy, "settings", None)
    least = int(getattr(settings, "min_learners", 0) or 0)
    per_round = int(getattr(settings, "learners_per_round", 0) or 0)
    if least < MIN_COHORT or 0 < per_round < MIN_COHORT:
        raise ValueError(
            f"SecAgg+ needs rounds of at least {MIN_COHORT} learners (min_learners and "
            f"learners_per_round >= {MIN_COHORT}); with 2, each learner reads the other's "
            f"update from the sum; got min_learners={least}, learners_per_round={per_round}"
        )


class SecAggRounds(Policy):
    """SecAgg+ around `inner` (see the module docstring).

    Args:
        inner: a synchronous or semi-synchronous policy.
        clip: update values (deltas) are clipped to [-clip, clip] before quantization.
        step_timeout_seconds: how long each step waits for the learners' answers.
    """

    def __init__(
        self, inner: Policy, clip: float = 1.0, step_timeout_seconds: float = 10.0
    ) -> None:
        if not isinstance(inner, SynchronousPolicy):
            raise ValueError(
                f"SecAgg+ runs around round-based protocols (synchronous, semi_synchronous); "
                f"{inner.name} commits without rounds"
            )
        check_secagg_cohort(inner)
        self.inner = inner
        self.clip = clip
        self.step_timeout = step_timeout_seconds
        self.name = inner.name
        self.upload_delta = inner.upload_delta
        self.mixes_full_models = inner.mixes_full_models
        self.settings = getattr(inner, "settings", None)
        self.checkpointed = inner.checkpointed
        self._round: _Round | None = None
        self._now = 0.0
        self.rounds_run = 0

    # The core reads and sets these; they are the inner policy's, less a commit held back.
    @property
    def version(self) -> int:
        held = self._round is not None and bool(self._round.held)
        return self.inner.version - (1 if held else 0)

    @version.setter
    def version(self, value: int) -> None:
        if hasattr(self, "inner"):
            self.inner.version = value

    @property
    def finished(self) -> bool:
        return self.inner.finished and not (self._round is not None and self._round.held)

    @finished.setter
    def finished(self, value: bool) -> None:
        if hasattr(self, "inner"):
            self.inner.finished = value

    @property
    def rng(self) -> Any:
        return self.inner.rng

    @rng.setter
    def rng(self, value: Any) -> None:
        if hasattr(self, "inner"):
            self.inner.rng = value

    def snapshot(self) -> dict[str, Any]:
        return self.inner.snapshot()

    def resume(self, state: Mapping[str, Any]) -> None:
        self.inner.resume(state)

    def describe(self) -> dict[str, object]:
        return {**self.inner.describe(), "secure": "secagg+", "secagg_rounds": self.rounds_run}

    def next_wakeup(self) -> float | None:
        inner = self.inner.next_wakeup()
        mine = self._round.deadline if self._round is not None else None
        times = [t for t in (inner, mine) if t is not None]
        return min(times) if times else None

    # ------------------------------------------------------------------------------ events

    def handle(self, event: Event) -> list[Decision]:
        self._now = getattr(event, "now", self._now)
        if isinstance(event, SecureStepArrived):
            return self._on_step(event)
        out: list[Decision] = []
        if isinstance(event, Tick):
            out += self._on_tick(event.now)
        if isinstance(event, CommitFailed) and self._round is not None:
            self._round = None  # the aggregate is gone: this round is over
        out += self._filter(self.inner.handle(event))
        return out

    def _filter(self, decisions: Iterable[Decision]) -> list[Decision]:
        """The inner policy's decisions, with a round's tasks and commit held back."""
        out: list[Decision] = []
        pending = list(decisions)
        fresh: list[AssignTask] = []
        while pending:
            decision = pending.pop(0)
            rnd = self._round
            if rnd is not None and rnd.held:
                rnd.held.append(decision)
            elif isinstance(decision, AssignTask) and decision.task.kind is TaskKind.TRAIN:
                if rnd is None:
                    fresh.append(decision)
                else:  # a round is set up: a task for someone outside it cannot join
                    reason = "the SecAgg+ round was already set up"
                    task = decision.task
                    failed = TaskFailed(self._now, task.learner_id, task.task_id, reason)
                    pending += self.inner.handle(failed)
            elif isinstance(decision, CommitVersion) and rnd is not None:
                rnd.held.append(decision)
                out += self._ask_reveals(rnd)
            elif isinstance(decision, DiscardAggregate):
                self._round = None
                out.append(decision)
            else:
                if rnd is not None and isinstance(decision, AcceptUpdate):
                    index = rnd.task_of.get(decision.task_id)
                    if index is not None:
                        rnd.survivors.add(index)
                out.append(decision)
        if fresh:
            out += self._start(fresh)
        return out

    def _start(self, tasks: list[AssignTask]) -> list[Decision]:
        members = [t.task.learner_id for t in tasks]
        settings = SecAggSettings.for_learners(len(members), self.clip)
        settings = SecAggSettings(
            settings.learners,
            settings.neighbours,
            settings.threshold,
            settings.clip,
            settings.bits,
            os.urandom(16),
        )
        self._round = _Round(
            settings,
            members,
            {t.task.learner_id: t for t in tasks},
            self._now + self.step_timeout,
        )
        self.rounds_run += 1
        out: list[Decision] = []
        for index, learner_id in enumerate(members):
            setup = pb.SecAggSetup(
                index=index,
                learners=settings.learners,
                neighbours=settings.neighbours,
                threshold=settings.threshold,
                clip=settings.clip,
                bits=settings.bits,
            )
            out.append(SendSecureStep(learner_id, self._step(setup=setup)))
        return out

    def _step(self, **body: Any) -> pb.SecAggStep:
        assert self._round is not None
        return pb.SecAggStep(round_id=self._round.settings.round_id, **body)

    def _on_step(self, event: SecureStepArrived) -> list[Decision]:
        rnd = self._round
        step = event.step
        if rnd is None or step.round_id != rnd.settings.round_id:
            return []  # a step of another round
        index = rnd.index_of.get(event.learner_id)
        if index is None:
            return []
        kind = step.WhichOneof("step")
        if kind == "keys" and rnd.phase == "keys" and len(step.keys.keys) == 1:
            key = step.keys.keys[0]
            if key.index == index:
                rnd.keys[index] = (bytes(key.sealing_key), bytes(key.masking_key))
            if len(rnd.keys) == len(rnd.members):
                return self._send_keys(rnd)
        elif kind == "shares" and rnd.phase == "shares" and index in rnd.keys:
            rnd.sealed[index] = [(s.index, bytes(s.sealed)) for s in step.shares.shares]
            if len(rnd.sealed) == len(rnd.keys):
                return self._send_shares(rnd)
        elif kind == "reveal" and rnd.phase == "reveal" and index in rnd.survivors:
            rnd.reveals[index] = [(r.owner, bytes(r.share)) for r in step.reveal.shares]
            if len(rnd.reveals) == len(rnd.survivors):
                return self._commit(rnd)
        return []

    def _on_tick(self, now: float) -> list[Decision]:
        rnd = self._round
        if rnd is None or now < rnd.deadline:
            return []
        if rnd.phase == "keys":
            return self._send_keys(rnd)
        if rnd.phase == "shares":
            return self._send_shares(rnd)
        if rnd.phase == "reveal":
            return self._commit(rnd)
        return []

    def _send_keys(self, rnd: _Round) -> list[Decision]:
        rnd.phase, rnd.deadline = "shares", self._now + self.step_timeout
        keys = pb.SecAggKeys(
            keys=[
                pb.SecAggKey(index=i, sealing_key=sealing, masking_key=masking)
                for i, (sealing, masking) in sorted(rnd.keys.items())
            ]
        )
        if not rnd.keys:
            return self._release(rnd)
        return [SendSecureStep(rnd.members[i], self._step(keys=keys)) for i in sorted(rnd.keys)]

    def _send_shares(self, rnd: _Round) -> list[Decision]:
        rnd.shared = frozenset(rnd.sealed)
        inbox: dict[int, list[pb.SecAggShare]] = {i: [] for i in rnd.shared}
        for sender, entries in sorted(rnd.sealed.items()):
            for to, sealed in entries:
                if to in inbox:
                    inbox[to].append(pb.SecAggShare(index=sender, sealed=sealed))
        out: list[Decision] = [
            SendSecureStep(rnd.members[i], self._step(shares=pb.SecAggShares(shares=inbox[i])))
            for i in sorted(rnd.shared)
        ]
        return out + self._release(rnd)

    def _release(self, rnd: _Round) -> list[Decision]:
        """Hand out the round's tasks to the learners that shared; fail the others'."""
        rnd.phase, rnd.deadline = "training", float("inf")
        out: list[Decision] = []
        failed: list[Decision] = []
        for index, learner_id in enumerate(rnd.members):
            assign = rnd.tasks[learner_id]
            if index in rnd.shared:
                rnd.task_of[assign.task.task_id] = index
                out.append(assign)
            else:
                reason = "missed a SecAgg+ setup step"
                event = TaskFailed(self._now, learner_id, assign.task.task_id, reason)
                failed += self.inner.handle(event)
        if not rnd.shared:
            self._round = None
        return out + self._filter(failed)

    def _ask_reveals(self, rnd: _Round) -> list[Decision]:
        rnd.phase, rnd.deadline = "reveal", self._now + self.step_timeout
        if not rnd.survivors:
            return self._commit(rnd)
        dropped = sorted(rnd.shared - rnd.survivors)
        unmask = pb.SecAggUnmask(survivors=sorted(rnd.survivors), dropped=dropped)
        return [SendSecureStep(rnd.members[i], self._step(unmask=unmask)) for i in rnd.survivors]

    def _commit(self, rnd: _Round) -> list[Decision]:
        held, self._round = rnd.held, None
        commit = held[0]
        assert isinstance(commit, CommitVersion)
        material = SecAggUnmasking(
            rnd.settings,
            dict(rnd.keys),
            rnd.shared,
            frozenset(rnd.survivors),
            tuple(share for answers in rnd.reveals.values() for share in answers),
        )
        secure = SecureCommit(
            commit.reason, commit.scale, commit.normalize, commit.relative, material
        )
        return [secure, *self._filter(held[1:])]
