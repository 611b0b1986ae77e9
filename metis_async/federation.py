"""The federation core: one synchronous, deterministic owner of all federation state.

`FederationCore` holds the policy, the single task table, the model and its version, the
aggregate of the open version (`ServerStep`, over the Rust accumulator), evaluation averaging,
the counters, per-learner memory (closed tasks, participation) and the record of which updates
each version folded in. It takes events (a learner joined or was lost, an update or evaluation
arrived with its payload already validated, time passed) and returns addressed effects
(`metis_async.effects`): send version V to learner L, send a task, cancel one, answer a result,
shut down, a version was committed. It holds no sockets and no sessions, so the gRPC server, the
ingest workers and the simulator drive the same object, and one recorded event trace gives the
same versions and bit-identical models through any of them.

Decisions of one event are carried out in order before the next event. A `CommitVersion` that
cannot be carried out (nothing accepted, or a model that would not be finite) is refused: the
model and version stay, the decisions after it in the same list are dropped, and the policy is
told with `CommitFailed` next. Nothing here sleeps or does I/O; O(model) work (folding, the
commit) runs in Rust with the GIL released, and drivers call the core from one thread that is
not the event loop.

Task ids on the wire are the policy's ids prefixed with the run id, so they are unique across
controller restarts; a learner's closed-task memory is kept by learner id, bounded, across
reconnects.
"""

from __future__ import annotations

import functools
import heapq
import math
import random
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import structlog

from metis_async import wire
from metis_async.admin.history import FederationHistory
from metis_async.aggregation.compatibility import check_compatible, check_homomorphic
from metis_async.aggregation.server_step import AggregationSettings, ServerStep
from metis_async.checkpoints import Checkpoint, CheckpointError, StateDirectory
from metis_async.effects import (
    CommitRecord,
    CommitRefused,
    Effect,
    FederationFinished,
    FederationState,
    Notice,
    RequestInitialModel,
    SendAck,
    SendCancel,
    SendModel,
    SendNotice,
    SendSecure,
    SendStatus,
    SendTask,
    Shutdown,
    VersionCommitted,
)
from metis_async.learners import (
    DEFAULT_CAPABILITIES,
    LearnerBook,
    LearnerRecord,
    Outstanding,
    task_key,
    wire_task_id,
)
from metis_async.protocols import (
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
    SynchronousPolicy,
    Task,
    TaskFailed,
    TaskKind,
    Tick,
    UpdateArrived,
)
from metis_async.protocols.secagg import SecureCommit
from metis_async.secure.aggregate import HomomorphicAggregation, HomomorphicStep
from metis_async.secure.masked import MaskedStep
from metis_async.telemetry import ControllerStats, short_id
from metis_async.v1 import controller_pb2 as pb
from metis_async.workers.partials import RemoteUpdate

if TYPE_CHECKING:
    from metis_async._core import Segments

log = structlog.get_logger("metis_async.federation")

RESULT_RECEIVED = "result already received"
RESENT = "resent:"
"""Prefix of the policy-side id of an update resent from an earlier controller start."""

_Updates = dict[str, tuple[str, "wire.FloatVector | Segments | RemoteUpdate | bytes", str]]

_Method = TypeVar("_Method", bound=Callable[..., list[Effect]])


def _counted(method: _Method) -> _Method:
    """Count an event in `events_handled` once it has been fully handled (drivers and tests
    wait on the count, so it must not move before the state it describes)."""

    @functools.wraps(method)
    def handle(self: FederationCore, *args: Any, **kwargs: Any) -> list[Effect]:
        effects = method(self, *args, **kwargs)
        self.events_handled += 1
        return effects

    return handle  # type: ignore[return-value]  # policy task id -> (learner, update, task key)


Publish = Callable[[int, wire.ModelVector], object]
"""Called in the core's thread with each new version and its model; returns what the driver
needs to send it (the gRPC driver: encoded messages). Must not modify the model."""


@dataclass(frozen=True)
class UpdateReport:
    """The metadata of a training result whose payload the driver has validated.

    Attributes:
        task_id: the task on the wire (run id prefix included).
        base_version: version the learner trained from.
        num_examples: examples used (the aggregation weight under example weighting).
        completed_steps: local steps run.
        train_seconds: wall time of the task (seconds).
        seconds_per_batch: measured speed (seconds).
        seconds_per_epoch: measured epoch time (seconds).
        metrics: the learner's training metrics.
    """

    task_id: str
    base_version: int
    num_examples: int
    completed_steps: int = 0
    train_seconds: float = 0.0
    seconds_per_batch: float = 0.0
    seconds_per_epoch: float = 0.0
    metrics: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class TaskLookup:
    """What the core knows of a task id a learner answers: outstanding, closed, committed (in
    `committed_version`), resendable (a task of this run from an earlier controller start, not
    yet counted: `resent_upload_delta` is the payload kind the policy takes), or unknown."""

    task: Task | None = None
    closed_reason: str | None = None
    committed_version: int | None = None
    resendable: bool = False
    resent_upload_delta: bool = True


class FederationCore:
    """The one executor of a federation's decisions (see the module docstring).

    Args:
        policy: the protocol deciding who trains what and when versions commit.
        aggregation: server optimizer, robust rule, clipping (FedAvg with a streaming mean).
        run_id: identity of this run's version sequence (prefix of every task id); a fresh one
            by default.
        publish: called with every new version in the core's thread (see `Publish`).
        stats: counters to update (a fresh set by default).
        initial_model_timeout_seconds: how long a learner asked for the first model may take
            before another waiting learner is asked.
        closed_tasks_kept: closed task ids remembered per learner (for stale/duplicate answers).
        learners_remembered: disconnected learner ids remembered (oldest forgotten first).
        commits_kept: recent commit records kept in memory.
        rng: the generator of every random choice the policy makes (which learners train);
            None keeps the policy's own, seeded from its settings (the same in every driver).
        state: where every committed version is checkpointed before it is published (None:
            nothing is kept; acknowledgements then mean "committed", not "durable").
        committed_kept: ids of committed updates remembered (and checkpointed) so a resent
            update is acknowledged instead of counted twice.
        max_missed_tasks: a learner whose tasks are cancelled unanswered this many times in a
            row (it holds rounds up: a hung or fake learner) is benched: the policy stops
            seeing it for `bench_seconds`, though it stays connected; 0 never benches.
        bench_seconds: how long a benched learner gets no work.
        he: aggregate under homomorphic encryption (`metis_async.secure.aggregate`): updates
            are ciphertext bytes, every version after 0 is an encrypted version the core
            cannot read, and tasks ask for full trained models (upload_delta off).
        secagg: the policy runs SecAgg+ rounds (`protocols.secagg.SecAggRounds`): updates are
            masked bytes summed mod 2^32 (`secure.masked.MaskedStep`), unmasked at commit.
    """

    def __init__(
        self,
        policy: Policy,
        *,
        aggregation: AggregationSettings | None = None,
        run_id: str | None = None,
        publish: Publish | None = None,
        stats: ControllerStats | None = None,
        initial_model_timeout_seconds: float = 60.0,
        closed_tasks_kept: int = 256,
        learners_remembered: int = 1_000_000,
        commits_kept: int = 1024,
        rng: random.Random | None = None,
        state: StateDirectory | None = None,
        committed_kept: int = 200_000,
        max_missed_tasks: int = 5,
        bench_seconds: float = 300.0,
        he: HomomorphicAggregation | None = None,
        secagg: bool = False,
    ) -> None:
        self.policy = policy
        self.he = he
        self.secagg = secagg
        if he is not None and secagg:
            raise ValueError("choose homomorphic aggregation or SecAgg+, not both")
        if rng is not None:
            policy.rng = rng
        self.aggregation = aggregation or AggregationSettings()
        for warning in check_compatible(policy, self.aggregation):  # raises if impossible
            log.warning("settings_warning", protocol=policy.name, warning=warning)
        if he is not None:
            check_homomorphic(policy, self.aggregation, bool(he.public_key))
        self._rounds = isinstance(policy, SynchronousPolicy)  # HE: full models, else deltas
        self.run_id = run_id or uuid.uuid4().hex[:12]
        self.stats = stats or ControllerStats()
        self.evaluations: OrderedDict[int, dict[str, float]] = OrderedDict()
        self.commits: deque[CommitRecord] = deque(maxlen=commits_kept)
        self.finished = False
        self.events_handled = 0
        self._state_dir = state
        self.incarnation = state.incarnation if state is not None else 1
        self._prefix = f"{self.run_id}.{self.incarnation}-"
        self._batch = 0  # counts `_deliver` calls: the tasks assigned in one share a wire id
        self._unique = 0  # wire ids of tasks that cannot share their batch's
        self._shared: tuple[int, dict[str, str]] = (0, {})  # batch -> wire id by task kind
        # task key (`task_key`) -> (learner id, version) of recently committed updates, oldest first
        self._committed: OrderedDict[str, tuple[str, int]] = OrderedDict()
        self._committed_kept = committed_kept
        self._open_learners: list[str] = []  # the learner of each entry of _open
        self._open_workers: list[int] = []  # the ingest worker holding each (-1: none)
        # Accepted updates lost with an ingest worker's partial sum: a resend is taken again.
        self._lost: OrderedDict[str, None] = OrderedDict()
        self._base_of: tuple[str, int] = ("", 0)  # (policy task id, base version) arriving
        self._max_missed = max_missed_tasks
        self._bench_seconds = bench_seconds
        self._benched: list[tuple[float, str]] = []  # (until, learner id) heap
        self._publish = publish
        self._initial_timeout = initial_model_timeout_seconds
        self._layout: pb.ModelLayout | None = None
        self._flat: wire.ModelVector | None = None
        self.version = 0
        self._step: ServerStep | HomomorphicStep | MaskedStep | None = None
        self._open: list[str] = []  # task keys of the updates folded into the open aggregate
        self._open_policy: list[str] = []  # the policy's task id of each entry of _open
        self._learners = LearnerBook(closed_tasks_kept, learners_remembered)
        self._evaluation_sums: dict[int, dict[str, float]] = {}
        self._provider: str | None = None  # asked for the initial model
        self._provider_deadline: float | None = None
        self._failed_providers: set[str] = set()
        self._state: FederationState | None = None
        self.history = FederationHistory()
        self._open_staleness = 0.0  # total staleness of the open aggregate's updates
        self.paused = False
        """Paused by the operator: events wait in `_held` and the policy sees none until resumed
        (no task goes out, nothing commits; time keeps running for the policy)."""
        self._held: list[tuple[Event, _Updates]] = []
        self.status_in_welcome = False
        """Set by drivers that put `status_now()` in every new learner's Welcome: a learner that
        joins while the federation waits then gets no Status of its own (one write less each)."""

    # ------------------------------------------------------------------------------ queries

    @property
    def ready(self) -> bool:
        """Whether a model exists."""
        return self._flat is not None

    @property
    def model(self) -> wire.ModelVector:
        """The current model (read-only; a new array on every commit): float32 values, or under
        homomorphic aggregation an encrypted version (uint8) after version 0."""
        if self._flat is None:
            raise RuntimeError("the federation has no model yet")
        return self._flat

    @property
    def plain_model(self) -> wire.FloatVector:
        """The current model as float32 values; RuntimeError for an encrypted version."""
        return wire.plain(self.model)

    def _new_step(self, layout: pb.ModelLayout) -> ServerStep | HomomorphicStep | MaskedStep:
        if self.he is not None:
            return HomomorphicStep(wire.num_parameters(layout), self.he, not self._rounds)
        if self.secagg:
            return MaskedStep(wire.num_parameters(layout), self.aggregation)
        return ServerStep(wire.num_parameters(layout), self.aggregation)

    @property
    def rounds(self) -> bool:
        """Whether the policy runs rounds (learners upload trained models under HE, not
        deltas; sums of ciphertexts can be kept in ingest workers)."""
        return self._rounds

    @property
    def layout(self) -> pb.ModelLayout | None:
        """The model's layout, once a model exists."""
        return self._layout

    @property
    def connected(self) -> int:
        """Learners connected now."""
        return self._learners.connected

    @property
    def provider(self) -> str | None:
        """The learner asked for the initial model, if one is being waited for."""
        return self._provider

    def lookup(self, learner_id: str, task_id: str) -> TaskLookup:
        """Whether `task_id` is outstanding for `learner_id`, closed (and why), committed,
        resendable, or unknown."""
        record = self._learners.get(learner_id)
        held = record.tasks.get(task_id) if record is not None else None
        if held is not None:
            return TaskLookup(task=held.task)
        key = task_key(task_id, learner_id)
        committed = self._committed.get(key)
        if committed is not None:
            return TaskLookup(committed_version=committed[1])
        closed = self._learners.closed_reason(learner_id, task_id)
        if closed is None and self._resendable(key):
            return TaskLookup(resendable=True, resent_upload_delta=self.policy.upload_delta)
        return TaskLookup(closed_reason=closed)

    def _resendable(self, key: str) -> bool:
        """A task (key) of this run from an earlier controller start (never outstanding here),
        or one whose accepted update was lost with an ingest worker."""
        if key in self._lost:
            return True
        wire_id = wire_task_id(key)
        return (
            self._state_dir is not None
            and wire_id.startswith(f"{self.run_id}.")
            and not wire_id.startswith(self._prefix)
            and key not in self._committed
        )

    def learner_records(self) -> Iterator[LearnerRecord]:
        """Every learner the core knows, connected or remembered (read on the core's thread)."""
        return iter(self._learners)

    def participation(self) -> dict[str, dict[str, int]]:
        """Per learner: tasks assigned, updates accepted and rejected, evaluations."""
        return self._learners.participation()

    def next_wakeup(self) -> float | None:
        """Earliest time (the events' clock) at which the core wants `tick`."""
        bench = self._benched[0][0] if self._benched else None
        policy = None if self.paused else self.policy.next_wakeup()
        times = [t for t in (policy, self._provider_deadline, bench) if t is not None]
        return None if self.finished or not times else min(times)

    # ------------------------------------------------------------------------------ model

    def initialize_model(
        self, now: float, layout: pb.ModelLayout, flat: wire.FloatVector, source: str = ""
    ) -> list[Effect]:
        """Adopt the first model (from a file, the operator, or a learner), checked by the caller.

        Every learner that joined while there was no model is handed to the policy.
        """
        if self._flat is not None:
            raise RuntimeError("the federation already has a model")
        self._layout = layout
        self._flat = flat
        self._flat.flags.writeable = False
        self._step = self._new_step(layout)
        self._provider = None
        self._provider_deadline = None
        effects: list[Effect] = []
        if source:
            log.info(
                "model_initialized",
                source=source,
                parameters=wire.num_parameters(layout),
                tensors=len(layout.tensors),
            )
        self._save_checkpoint()
        published = self._publish(0, flat) if self._publish is not None else None
        effects.append(VersionCommitted(self._record(0, (), 0.0, "initial model"), flat, published))
        self._pause_as_before_restart()
        return effects + self._admit_waiting(now)

    def resume(self, now: float, checkpoint: Checkpoint) -> list[Effect]:
        """Continue from `checkpoint` (the newest in the state directory) instead of a first
        model: the same run id and version sequence, optimizer state, policy counters and the
        ids of recently committed updates.

        Raises:
            CheckpointError: the checkpoint is of another policy or does not fit the settings.
        """
        if self._flat is not None:
            raise RuntimeError("the federation already has a model")
        if checkpoint.protocol != self.policy.name:
            raise CheckpointError(
                f"the state directory holds a {checkpoint.protocol} run; this controller runs "
                f"{self.policy.name} (use another state directory to start a new run)"
            )
        step = self._new_step(checkpoint.layout)
        try:
            step.load_state(checkpoint.optimizer)
        except ValueError as error:
            raise CheckpointError(f"checkpoint does not fit the settings: {error}") from error
        self.run_id = checkpoint.run_id
        self._prefix = f"{self.run_id}.{self.incarnation}-"
        self._layout = checkpoint.layout
        self._flat = checkpoint.model
        self._flat.flags.writeable = False
        self._step = step
        self.version = checkpoint.version
        self.policy.resume(checkpoint.policy)
        self.policy.version = checkpoint.version
        for name, value in checkpoint.stats.items():
            if hasattr(self.stats, name):
                setattr(self.stats, name, value)
        self.evaluations = OrderedDict(sorted(checkpoint.evaluations.items()))
        self._committed = OrderedDict(checkpoint.committed)  # keyed by task key
        log.info(
            "resumed_from_checkpoint",
            run_id=self.run_id,
            version=self.version,
            incarnation=self.incarnation,
            committed_ids=len(self._committed),
        )
        published = self._publish(self.version, self._flat) if self._publish is not None else None
        record = self._record(self.version, (), 0.0, "resumed from checkpoint")
        effects: list[Effect] = [VersionCommitted(record, self._flat, published)]
        if self.policy.finished:
            self._finish("finished before the restart", effects)
            return effects
        self._pause_as_before_restart()
        return effects + self._admit_waiting(now)

    def _pause_as_before_restart(self) -> None:
        """A run the operator paused stays paused across a restart (the state directory keeps
        the pause): training goes on only after `resume`."""
        reason = self._state_dir.paused() if self._state_dir is not None else None
        if reason is not None:
            self.paused = True
            log.warning(
                "federation_paused", reason=f"before the restart: {reason}", version=self.version
            )

    def _admit_waiting(self, now: float) -> list[Effect]:
        """Hand every learner that joined while there was no model to the policy."""
        effects: list[Effect] = []
        for record in list(self._learners):
            if record.connected and not record.admitted:
                effects += self._admit(now, record)
        effects += self._status(now)
        return effects

    # ------------------------------------------------------------------------------ learners

    @_counted
    def learner_joined(
        self,
        now: float,
        learner_id: str,
        num_examples: int = 0,
        capabilities: frozenset[str] = DEFAULT_CAPABILITIES,
        held: tuple[str, int, int] | None = None,
    ) -> list[Effect]:
        """A learner's session can take tasks.

        `held` is its claim (run id, version, layout id) of a model it already holds; the claim
        is trusted only for this run and this model's layout.
        """
        record = self._learners.join(learner_id)
        record.num_examples = num_examples
        record.capabilities = capabilities
        record.joined_at = record.last_seen = now
        if held is not None and self._layout is not None:
            run, version, layout_id = held
            # A version above ours was never committed by this run's checkpoints: ignore it.
            ours = run == self.run_id and layout_id == self._layout.layout_id
            if ours and version <= self.version:
                record.held_version = version
        if self.finished:
            return [
                *self._final_model(record),
                Shutdown(learner_id, True, "federation finished", self.version),
            ]
        effects: list[Effect] = []
        if self._flat is None:
            if self._provider is None:
                effects += self._ask_provider(now)
            return effects + self._status(now, learner_id)
        effects += self._admit(now, record)
        return effects + self._status(now, learner_id)

    @_counted
    def learner_lost(self, now: float, learner_id: str, reason: str = "") -> list[Effect]:
        """A learner's session ended; its outstanding tasks are void."""
        record = self._learners.get(learner_id)
        if record is None or not record.connected:
            return []
        self._learners.leave(record, f"learner lost: {reason or 'disconnected'}")
        effects: list[Effect] = []
        if self._provider == learner_id:
            self._provider = None
            self._provider_deadline = None
            effects += self._ask_provider(now)
        if record.admitted:
            record.admitted = False
            effects += self._deliver(LearnerLost(now, learner_id, reason))
        return effects + self._status(now)

    def _admit(self, now: float, record: LearnerRecord) -> list[Effect]:
        if record.benched_until > now:
            return []  # it gets work once its bench time is over (tick)
        record.admitted = True
        can_evaluate = "evaluate" in record.capabilities
        return self._deliver(
            LearnerJoined(now, record.learner_id, record.num_examples, can_evaluate=can_evaluate)
        )

    def _ask_provider(self, now: float) -> list[Effect]:
        """Ask the longest-waiting connected learner that has not failed for the first model."""
        waiting = [r.learner_id for r in self._learners if r.connected]
        fresh = [lid for lid in waiting if lid not in self._failed_providers]
        if not fresh and waiting:
            self._failed_providers.clear()  # everyone failed once: try them all again
            fresh = waiting
        if not fresh:
            return []
        self._provider = fresh[0]
        self._provider_deadline = now + self._initial_timeout
        log.info("initial_model_requested", learner_id=self._provider)
        return [RequestInitialModel(self._provider)]

    @_counted
    def initial_model_refused(self, now: float, learner_id: str, reason: str) -> list[Effect]:
        """The provider's proposal was refused (or it reported it cannot): ask another."""
        if self._provider != learner_id:
            return []
        log.warning("initial_model_refused", learner_id=learner_id, reason=reason)
        self._failed_providers.add(learner_id)
        self._provider = None
        self._provider_deadline = None
        return self._ask_provider(now)

    # ------------------------------------------------------------------------------ results

    @_counted
    def update_arrived(
        self,
        now: float,
        learner_id: str,
        report: UpdateReport,
        update: wire.FloatVector | Segments | RemoteUpdate | bytes,
    ) -> list[Effect]:
        """A complete, validated training update for `report.task_id` arrived (an array,
        `Segments`: the upload still in the chunk messages it arrived in, or a `RemoteUpdate`
        an ingest worker holds)."""
        held = self._close_task(learner_id, report.task_id, RESULT_RECEIVED)
        key = task_key(report.task_id, learner_id)
        resent = held is None and self._take_resent(learner_id, report.task_id, key)
        if held is None and not resent:
            _release(update)
            return [self._stale_answer(learner_id, report.task_id, "closed while uploading")]
        self.stats.updates_received_total += 1
        self._answered(learner_id)
        self._seen(now, learner_id, report)
        event = UpdateArrived(
            now,
            learner_id,
            RESENT + key if held is None else held.policy_id,
            report.base_version,
            report.num_examples,
            report.completed_steps,
            report.train_seconds,
            dict(report.metrics),
            report.seconds_per_batch,
            report.seconds_per_epoch,
            resent,
        )
        self._base_of = (event.task_id, report.base_version)
        return self._deliver(event, {event.task_id: (learner_id, update, key)})

    def _take_resent(self, learner_id: str, task_id: str, key: str) -> bool:
        """Whether an answer to an unknown task (`key`: its task key) is a resent update to hand
        to the policy (then remembered as answered, so a second resend is a duplicate)."""
        record = self._learners.get(learner_id)
        if record is None or not record.connected or not self._resendable(key):
            return False
        if self._learners.closed_reason(learner_id, task_id) is not None:
            return False
        self._lost.pop(key, None)
        self._learners.remember_closed(record, task_id, RESULT_RECEIVED)
        return True

    @_counted
    def evaluation_arrived(
        self,
        now: float,
        learner_id: str,
        task_id: str,
        num_examples: int,
        metrics: Mapping[str, float],
    ) -> list[Effect]:
        """An evaluation result for `task_id` arrived."""
        held = self._close_task(learner_id, task_id, RESULT_RECEIVED)
        if held is None:
            return [self._stale_answer(learner_id, task_id, "closed before its result")]
        task = held.task
        self._learners[learner_id].evaluations += 1
        self._answered(learner_id)
        self._seen(now, learner_id)
        self.stats.evaluations_received_total += 1
        self._record_evaluation(now, task.version, num_examples, metrics)
        return self._deliver(
            EvaluationArrived(now, learner_id, held.policy_id, task.version, num_examples, metrics)
        )

    @_counted
    def secure_step_arrived(self, now: float, learner_id: str, step: object) -> list[Effect]:
        """A learner's step of a secure-aggregation round (a `SecAggStep`)."""
        if self._flat is None or self.finished:
            return []
        return self._deliver(SecureStepArrived(now, learner_id, step))

    @_counted
    def task_failed(self, now: float, learner_id: str, task_id: str, reason: str) -> list[Effect]:
        """The learner reported that it could not run `task_id`."""
        held = self._close_task(learner_id, task_id, "learner reported failure")
        if held is None:
            return []
        self._answered(learner_id)
        self._seen(now, learner_id)
        return self._deliver(TaskFailed(now, learner_id, held.policy_id, reason))

    @_counted
    def tick(self, now: float) -> list[Effect]:
        """Time passed (the driver calls at `next_wakeup()`)."""
        return self._advance(now)

    def _advance(self, now: float) -> list[Effect]:
        effects: list[Effect] = []
        if self._provider_deadline is not None and now >= self._provider_deadline:
            stalled = self._provider
            log.warning("initial_model_timeout", learner_id=stalled)
            if stalled is not None:
                self._failed_providers.add(stalled)
            self._provider = None
            self._provider_deadline = None
            effects += self._ask_provider(now)
        while self._benched and self._benched[0][0] <= now:
            _, learner_id = heapq.heappop(self._benched)
            record = self._learners.get(learner_id)
            idle = record is not None and record.connected and not record.admitted
            if idle and record is not None and record.benched_until <= now and self.ready:
                log.info("learner_unbenched", learner_id=short_id(learner_id))
                effects += self._admit(now, record)
        if self._flat is not None and not self.finished:
            effects += self._deliver(Tick(now))
        return effects

    @_counted
    def pause(self, now: float, reason: str = "") -> list[Effect]:
        """The operator pauses the federation: no new task goes out and no version commits;
        results that arrive wait for `unpause` (bounded by the tasks already out)."""
        if not self.paused and not self.finished:
            self.paused = True
            log.info("federation_paused", reason=reason, version=self.version)
            if self._state_dir is not None:
                try:
                    self._state_dir.save_pause(reason, self.version)
                except CheckpointError as error:  # paused all the same, until a restart
                    log.error("pause_not_durable", reason=str(error))
        return []

    @_counted
    def unpause(self, now: float, reason: str = "") -> list[Effect]:
        """Resume a paused federation: the waiting events reach the policy in order, then
        the time that passed (a round whose deadline passed closes now)."""
        if not self.paused:
            return []
        self.paused = False
        if self._state_dir is not None:
            try:
                self._state_dir.clear_pause()
            except CheckpointError as error:  # a restart would start paused again
                log.error("resume_not_durable", reason=str(error))
        held, self._held = self._held, []
        log.info("federation_resumed", reason=reason, version=self.version, events=len(held))
        effects: list[Effect] = []
        for event, updates in held:
            if isinstance(event, UpdateArrived):  # its staleness is counted when accepted
                self._base_of = (event.task_id, event.base_version)
            effects += self._deliver(event, updates)
        return effects + self._advance(now)

    def learners_heard(self, now: float, ages: Mapping[str, float]) -> list[Effect]:
        """The drivers' report of when each connected learner's stream last had a message,
        heartbeats included (`ages`: seconds before `now`). Only what people are shown changes
        (`LearnerRecord.last_seen`); no decision reads it. Not counted in `events_handled`."""
        records = self._learners
        for learner_id, age in ages.items():
            record = records.get(learner_id)
            if record is not None and record.connected:
                record.last_seen = max(record.last_seen, now - max(float(age), 0.0))
        return []

    def _seen(self, now: float, learner_id: str, report: UpdateReport | None = None) -> None:
        """`learner_id` was heard from at `now` (with a training report: its speed)."""
        record = self._learners.get(learner_id)
        if record is None:
            return
        record.last_seen = now
        if report is not None and report.num_examples > 0:
            if report.seconds_per_epoch > 0:
                record.examples_per_second = report.num_examples / report.seconds_per_epoch
            elif report.train_seconds > 0:
                record.examples_per_second = report.num_examples / report.train_seconds

    def drain(self, reason: str = "controller stopping") -> list[Effect]:
        """The controller stops: learners are told to come back later."""
        self._state = FederationState.DRAINING
        log.info("draining", reason=reason, learners=self.connected, version=self.version)
        return [Shutdown(None, False, reason, self.version)]

    def _close_task(self, learner_id: str, task_id: str, reason: str) -> Outstanding | None:
        """Close outstanding task `task_id` (its wire id) of `learner_id`, if it is one."""
        record = self._learners.get(learner_id)
        held = record.tasks.pop(task_id, None) if record is not None else None
        if record is None or held is None:
            return None
        self._learners.remember_closed(record, task_id, reason)
        return held

    def _stale_answer(self, learner_id: str, task_id: str, what: str) -> SendNotice:
        reason = self._learners.closed_reason(learner_id, task_id) or "closed"
        notice = Notice.DUPLICATE if reason == RESULT_RECEIVED else Notice.STALE
        return SendNotice(learner_id, task_id, notice, f"task {task_id!r} {what} ({reason})")

    # ------------------------------------------------------------------------------ decisions

    def _deliver(self, event: Event, updates: _Updates | None = None) -> list[Effect]:
        """Hand events to the policy and carry out its decisions, in order (held while
        paused; ticks then change nothing and are dropped)."""
        updates = updates if updates is not None else {}
        if self.paused:
            if not isinstance(event, Tick):
                self._held.append((event, updates))
            return []
        effects: list[Effect] = []
        self._batch += 1
        pending: deque[Event] = deque([event])
        while pending:
            current = pending.popleft()
            for decision in self.policy.handle(current):
                follow = self._execute(decision, current.now, updates, effects)
                if isinstance(follow, CommitFailed):
                    pending.append(follow)  # the rest of this decision list is void
                    break
                pending.extend(follow)
        for task_id, (_, update, _) in updates.items():  # neither accepted nor rejected: loudly
            log.error("update_unanswered", task_id=task_id, protocol=self.policy.name)
            _release(update)
        if self.policy.version != self.version:
            raise RuntimeError(
                f"{self.policy.name} counts version {self.policy.version}, "
                f"the federation holds {self.version}"
            )
        return effects

    def _execute(
        self,
        decision: Decision,
        now: float,
        updates: _Updates,
        effects: list[Effect],
    ) -> list[Event] | CommitFailed:
        if isinstance(decision, AssignTask):
            return self._assign(decision.task, now, effects)
        if isinstance(decision, AcceptUpdate):
            self._accept(decision, updates, effects)
        elif isinstance(decision, RejectUpdate):
            answered = updates.pop(decision.task_id, None)
            if answered is not None:
                lid, update, key = answered
                _release(update)
                self.stats.reject(decision.reason)
                self._learners[lid].updates_rejected += 1
                notice = SendNotice(lid, wire_task_id(key), Notice.STALE, decision.reason)
                effects.append(notice)
        elif isinstance(decision, CancelTask):
            wire_id = self._wire_of(decision.learner_id, decision.task_id)
            if wire_id is not None:
                self._close_task(decision.learner_id, wire_id, decision.reason)
                effects.append(SendCancel(decision.learner_id, wire_id, decision.reason))
                return self._missed(now, decision.learner_id)
        elif isinstance(decision, CommitVersion):
            return self._commit(decision, now, effects) or []
        elif isinstance(decision, DiscardAggregate):
            self._discard(decision.reason)
        elif isinstance(decision, SendSecureStep):
            record = self._learners.get(decision.learner_id)
            if record is not None and record.connected:
                effects.append(SendSecure(decision.learner_id, decision.step))
        elif isinstance(decision, Finish):
            self._finish(decision.reason, effects)
        return []

    def _missed(self, now: float, learner_id: str) -> list[Event]:
        """A task of `learner_id` was cancelled unanswered; bench it after too many in a row
        (the policy is told it is lost, after the decisions in progress)."""
        record = self._learners.get(learner_id)
        if record is None:
            return []
        record.missed += 1
        if not self._max_missed or record.missed < self._max_missed or not record.admitted:
            return []
        record.missed = 0
        record.admitted = False
        record.benched_until = now + self._bench_seconds
        heapq.heappush(self._benched, (record.benched_until, learner_id))
        self.stats.learners_benched_total += 1
        log.warning(
            "learner_benched",
            learner_id=short_id(learner_id),
            missed=self._max_missed,
            seconds=self._bench_seconds,
        )
        return [LearnerLost(now, learner_id, "benched: tasks cancelled unanswered")]

    def _answered(self, learner_id: str) -> None:
        record = self._learners.get(learner_id)
        if record is not None:
            record.missed = 0

    def _assign(self, task: Task, now: float, effects: list[Effect]) -> list[Event]:
        record = self._learners.get(task.learner_id)
        if record is None or not record.connected:
            return [TaskFailed(now, task.learner_id, task.task_id, "learner gone")]
        if task.kind is TaskKind.EVALUATE and "evaluate" not in record.capabilities:
            return [TaskFailed(now, task.learner_id, task.task_id, "learner cannot evaluate")]
        if task.version != self.version:
            raise RuntimeError(
                f"{self.policy.name} assigned version {task.version}, the model is {self.version}"
            )
        wired = replace(task, task_id=self._wire_for(task, record))
        if self.he is not None and wired.kind is TaskKind.TRAIN:
            # rounds: ciphertexts of full trained models; round-less: of deltas
            wired = replace(wired, upload_delta=not self._rounds)
        if record.held_version != task.version:
            effects.append(SendModel(task.learner_id, task.version))
            record.held_version = task.version
        record.tasks[wired.task_id] = Outstanding(wired, task.task_id)
        record.tasks_assigned += 1
        effects.append(SendTask(wired))
        return []

    def _accept(self, decision: AcceptUpdate, updates: _Updates, effects: list[Effect]) -> None:
        step = self._aggregate
        if isinstance(step, HomomorphicStep) and not step.has_room(decision.weight):
            reason = "the encrypted aggregate is full (max_total_weight)"
            self._execute(RejectUpdate(decision.task_id, reason), 0.0, updates, effects)
            return
        lid, update, key = updates.pop(decision.task_id)
        # The driver checked every value when the upload arrived: the fold does not re-read.
        if isinstance(step, HomomorphicStep | MaskedStep):
            step.add(update, decision.weight)
        elif isinstance(update, bytes):
            raise TypeError("ciphertext bytes arrived for a plaintext aggregate")
        else:
            step.add(update, decision.weight, True)
        self._open.append(key)
        self._open_policy.append(decision.task_id)
        self._open_learners.append(lid)
        self._open_workers.append(update.worker if isinstance(update, RemoteUpdate) else -1)
        record = self._learners[lid]
        if self._base_of[0] == decision.task_id:
            staleness = max(self.version - self._base_of[1], 0)
            self.stats.staleness.observe(staleness)
            record.last_staleness = staleness
            self._open_staleness += staleness
        self.stats.updates_accepted_total += 1
        record.updates_accepted += 1

    def _commit(
        self, decision: CommitVersion, now: float, effects: list[Effect]
    ) -> CommitFailed | None:
        started = time.perf_counter()
        target = self.version + 1
        step = self._aggregate
        folded, weight = tuple(self._open), step.total_weight
        learners, workers = self._open_learners, self._open_workers
        policy_ids = tuple(self._open_policy)
        self._open, self._open_learners, self._open_workers, self._open_policy = [], [], [], []
        staleness, self._open_staleness = self._open_staleness, 0.0
        try:
            new: wire.ModelVector
            if isinstance(step, HomomorphicStep):
                new = step.commit(self.model, decision.scale, decision.normalize, decision.relative)
                bad = None  # ciphertexts: checked as they were added
            elif isinstance(step, MaskedStep):
                material = decision.material if isinstance(decision, SecureCommit) else None
                new = step.commit(
                    self.plain_model,
                    decision.scale,
                    decision.normalize,
                    decision.relative,
                    material,
                )
                bad = wire.first_non_finite(new)
            else:
                new = step.commit(
                    self.plain_model, decision.scale, decision.normalize, decision.relative
                )
                bad = wire.first_non_finite(new)
            if bad is not None:
                raise ValueError(f"the new model is not finite at value {bad}")
        except ValueError as error:
            self._drop_lost(folded, learners, workers, step.lost_workers)
            step.reset()
            self.stats.commits_refused_total += 1
            self.stats.updates_discarded_total += len(folded)
            log.error(
                "commit_failed",
                version=target,
                reason=str(error),
                updates=len(folded),
                task_ids=list(folded[:32]),
            )
            effects.append(CommitRefused(target, str(error), folded))
            return CommitFailed(now, target, str(error), policy_ids)
        counted, learners = self._drop_lost(folded, learners, workers, step.lost_workers)
        self.stats.updates_discarded_total += len(folded) - len(counted)
        folded = counted
        new.flags.writeable = False
        self._flat = new
        self.version = target
        record = self._record(target, folded, weight, decision.reason)
        self.history.committed(now, target, len(folded), staleness)
        self.stats.versions_committed_total += 1
        self._remember_committed(folded, learners, target)
        self._save_checkpoint()  # before anyone sees the version; raises CheckpointError
        published = self._publish(target, new) if self._publish is not None else None
        effects.append(VersionCommitted(record, new, published))
        self.stats.commit_seconds.observe(time.perf_counter() - started)
        for key, lid in zip(folded, learners, strict=True):
            learner = self._learners.get(lid)
            if learner is not None and learner.connected and "ack" in learner.capabilities:
                effects.append(SendAck(lid, wire_task_id(key), target))
        log.info(
            "version_committed",
            version=target,
            updates=len(folded),
            total_weight=weight,
            reason=decision.reason,
        )
        return None

    def _record(
        self, version: int, task_ids: tuple[str, ...], weight: float, reason: str
    ) -> CommitRecord:
        record = CommitRecord(version, task_ids, weight, reason)
        self.commits.append(record)
        return record

    def _drop_lost(
        self,
        folded: tuple[str, ...],
        learners: list[str],
        workers: list[int],
        lost: set[int],
    ) -> tuple[tuple[str, ...], list[str]]:
        """The updates a commit really holds: those in a lost worker partial are not counted,
        not acknowledged, and taken again when their learner resends them."""
        if not lost:
            return folded, learners
        kept: list[tuple[str, str]] = []
        for key, lid, worker in zip(folded, learners, workers, strict=True):
            if worker in lost:
                self._lost[key] = None
                record = self._learners.get(lid)
                if record is not None:
                    record.closed.pop(wire_task_id(key), None)
            else:
                kept.append((key, lid))
        while len(self._lost) > self._committed_kept:
            self._lost.popitem(last=False)
        return tuple(t for t, _ in kept), [lid for _, lid in kept]

    def _remember_committed(
        self, task_ids: tuple[str, ...], learners: list[str], version: int
    ) -> None:
        committed = self._committed
        for task_id, lid in zip(task_ids, learners, strict=True):
            committed[task_id] = (lid, version)
        while len(committed) > self._committed_kept:
            committed.popitem(last=False)

    def checkpoint_now(self) -> Path | None:
        """Write the current version's checkpoint again (the operator asked); its path, or None
        without a state directory or a model."""
        return self._save_checkpoint()

    def _save_checkpoint(self) -> Path | None:
        """Make the current version durable (a no-op without a state directory)."""
        if self._state_dir is None or self._flat is None or self._layout is None:
            return None
        checkpoint = Checkpoint(
            run_id=self.run_id,
            version=self.version,
            incarnation=self.incarnation,
            layout=self._layout,
            model=self._flat,
            optimizer=self._aggregate.state(),
            protocol=self.policy.name,
            policy=self.policy.snapshot(),
            stats=self.stats.snapshot(),
            evaluations=dict(self.evaluations),
            committed=self._committed,  # written out before the core goes on: no copy
        )
        try:
            return self._state_dir.save(checkpoint)
        except CheckpointError as error:
            log.critical("checkpoint_failed", version=self.version, reason=str(error))
            raise

    def _discard(self, reason: str) -> None:
        self._open_staleness = 0.0
        dropped = len(self._open)
        self._aggregate.reset()
        self._open, self._open_learners, self._open_workers, self._open_policy = [], [], [], []
        self.stats.updates_discarded_total += dropped
        log.info("aggregate_discarded", reason=reason, version=self.version, updates=dropped)

    def _finish(self, reason: str, effects: list[Effect]) -> None:
        self.finished = True
        self._state = FederationState.FINISHED
        log.info("federation_finished", reason=reason, version=self.version)
        for record in self._learners:
            if record.connected:
                effects += self._final_model(record)
        effects.append(Shutdown(None, True, reason, self.version))
        effects.append(FederationFinished(reason, self.version))

    def _final_model(self, record: LearnerRecord) -> list[Effect]:
        """The final version, for a learner that asked for it and does not hold it."""
        if "final_model" not in record.capabilities or record.held_version == self.version:
            return []
        record.held_version = self.version
        return [SendModel(record.learner_id, self.version)]

    # ------------------------------------------------------------------------------ status

    def learners_needed(self) -> int:
        """Connected learners the policy waits for before it hands out work."""
        settings = getattr(self.policy, "settings", None)
        needed = int(getattr(settings, "min_learners", 1))
        return max(needed, int(getattr(settings, "learners_per_round", 0) or 0))

    def status_now(self) -> tuple[FederationState | None, int, int]:
        """(state, learners connected, learners needed), for a new learner's Welcome."""
        return self._state, self.connected, self.learners_needed()

    def _status(self, now: float, joined: str | None = None) -> list[Effect]:
        """Say when the federation starts or stops waiting; tell a new learner if it waits."""
        if self.finished or self._state is FederationState.DRAINING:
            return []
        needed = self.learners_needed()
        if self._flat is None:
            state = FederationState.WAITING_FOR_MODEL
            message = "waiting for the initial model"
        elif self.connected < needed:
            state = FederationState.WAITING_FOR_LEARNERS
            message = f"waiting for learners: {self.connected} connected, {needed} needed"
        else:
            state = FederationState.TRAINING
            message = "training"
        changed, was = state is not self._state, self._state
        self._state = state
        if changed and state is FederationState.WAITING_FOR_LEARNERS:
            # a warning when learners were lost mid-training; at start-up it is expected
            emit = log.warning if was is FederationState.TRAINING else log.info
            emit("waiting_for_learners", connected=self.connected, needed=needed)
        elif changed and state is FederationState.TRAINING:
            log.info("learners_sufficient", connected=self.connected, needed=needed)
        if changed and state is not FederationState.WAITING_FOR_MODEL:
            return [SendStatus(None, state, self.connected, needed, message)]
        if joined is not None and state is not FederationState.TRAINING:
            if self.status_in_welcome:
                return []  # the driver told it in its Welcome
            return [SendStatus(joined, state, self.connected, needed, message)]
        return []

    # ------------------------------------------------------------------------------ evaluation

    def _record_evaluation(
        self, now: float, version: int, num_examples: int, metrics: Mapping[str, float]
    ) -> None:
        """Fold one evaluation into the example-weighted mean metrics of its version."""
        n = float(max(num_examples, 1))
        sums = self._evaluation_sums.setdefault(version, {"learners": 0.0, "examples": 0.0})
        sums["learners"] += 1
        sums["examples"] += n
        for name, value in metrics.items():
            if math.isfinite(value):
                sums[name] = sums.get(name, 0.0) + n * value
        weight = sums["examples"]
        summary = {k: (v if k in ("learners", "examples") else v / weight) for k, v in sums.items()}
        self.evaluations[version] = summary
        self.history.evaluated(now, version, summary)
        while len(self.evaluations) > 4096:
            old, _ = self.evaluations.popitem(last=False)
            self._evaluation_sums.pop(old, None)
        log.info("evaluation_received", version=version, **summary)

    # ------------------------------------------------------------------------------ helpers

    def _wire_for(self, task: Task, record: LearnerRecord) -> str:
        """The wire id of `task`, new for `record`'s learner: the one every task of its kind
        assigned in this `_deliver` call shares (so a round's train tasks are the same bytes
        for every learner), or one of its own where the learner had the shared one already."""
        kind = "e" if task.kind is TaskKind.EVALUATE else "t"
        if self._shared[0] != self._batch:
            self._shared = (self._batch, {})
        wire_id = self._shared[1].get(kind)
        if wire_id is None:  # one string object for all: learners' records share it
            wire_id = self._shared[1][kind] = f"{self._prefix}{kind}{self._batch}"
        if wire_id in record.tasks or wire_id in record.closed:
            self._unique += 1
            wire_id = f"{self._prefix}u{self._unique}"
        return wire_id

    def _wire_of(self, learner_id: str, policy_id: str) -> str | None:
        """The wire id of `learner_id`'s outstanding task `policy_id` (None: not outstanding).
        A learner holds a task or two, so this looks through them."""
        record = self._learners.get(learner_id)
        if record is not None:
            for wire_id, held in record.tasks.items():
                if held.policy_id == policy_id:
                    return wire_id
        return None

    @property
    def _aggregate(self) -> ServerStep | HomomorphicStep | MaskedStep:
        if self._step is None:
            raise RuntimeError("no model yet")
        return self._step


def _release(update: object) -> None:
    """An update that will not be folded: one an ingest worker holds is dropped there."""
    if isinstance(update, RemoteUpdate):
        update.release()


def summarize_participation(participation: Mapping[str, Mapping[str, int]]) -> dict[str, object]:
    """How evenly learners contributed, from `FederationCore.participation()`.

    Accepted updates per learner (min, median, max), learners that never contributed, and the
    share of all accepted updates that came from the top 10% of learners: over-selection and
    round-less policies favour fast learners, and this is where that bias shows.
    """
    accepted = sorted(int(p["updates_accepted"]) for p in participation.values())
    if not accepted:
        return {"learners": 0}
    top = accepted[-max(1, len(accepted) // 10) :]
    return {
        "learners": len(accepted),
        "never_contributed": sum(1 for a in accepted if a == 0),
        "accepted_min": accepted[0],
        "accepted_median": accepted[len(accepted) // 2],
        "accepted_max": accepted[-1],
        "top_decile_share": sum(top) / max(sum(accepted), 1),
    }
