"""The policy driver: delivers events to the policy and carries out its decisions.

`Federation` owns what a federation is made of apart from the network: the task table, the
aggregate of the open version, the model store and the policy's clock. It knows sessions only as
queues to put serialized messages on, so the same driver can later sit behind ingest workers that
forward partial sums (ARCHITECTURE.md, decision 9).

Events reach the policy one at a time under one lock, and the decisions of one event are executed,
in order, before the next event: accepted updates are folded into the Rust accumulator off the
event loop, and a commit turns the aggregate into a new version that is serialized once.
"""

from __future__ import annotations

import asyncio
import inspect
import math
from collections.abc import Awaitable, Callable, Mapping

import numpy as np
import numpy.typing as npt
import structlog

from metis_async import wire
from metis_async.aggregation.server_step import AggregationSettings, ServerStep
from metis_async.protocols import (
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
    UpdateArrived,
)
from metis_async.session import Session, controller_message
from metis_async.store import ModelStore
from metis_async.telemetry import ControllerStats
from metis_async.v1 import controller_pb2 as pb

log = structlog.get_logger("metis_async.federation")

RESULT_RECEIVED = "result already received"

CommitHook = Callable[[int, list[npt.NDArray[np.generic]]], Awaitable[None] | None]
Updates = dict[str, tuple[Session, wire.FloatVector]]


class Federation:
    """Runs `policy` over the learners in `sessions` and the model in `store`.

    Args:
        policy: the protocol deciding who trains what and when versions commit.
        store: the global model (may be empty until a learner provides one).
        stats: counters to update.
        sessions: the live sessions by learner id (owned by the server; read here).
        on_commit: called with each new version and its arrays (in a thread if not async).
        aggregation: server optimizer, robust rule, clipping (FedAvg with a streaming mean).
    """

    def __init__(
        self,
        policy: Policy,
        store: ModelStore,
        stats: ControllerStats,
        sessions: Mapping[str, Session],
        on_commit: CommitHook | None = None,
        aggregation: AggregationSettings | None = None,
    ) -> None:
        self.policy = policy
        self.aggregation = aggregation or AggregationSettings()
        self.store = store
        self.stats = stats
        self.evaluations: dict[int, dict[str, float]] = {}  # version -> weighted mean metrics
        self._sessions = sessions
        self._on_commit = on_commit
        self._tasks: dict[str, tuple[Session, Task]] = {}
        self._step: ServerStep | None = None
        self._evaluation_sums: dict[int, dict[str, float]] = {}
        self._lock = asyncio.Lock()
        self._finished = asyncio.Event()
        self._wakeup: asyncio.TimerHandle | None = None
        self._background: set[asyncio.Task[None]] = set()
        if store.ready:
            self.model_ready()

    # ------------------------------------------------------------------------------ state

    def model_ready(self) -> None:
        """The store holds its first model: size the aggregate to it."""
        assert self.store.layout is not None
        self._step = ServerStep(wire.num_parameters(self.store.layout), self.aggregation)

    @property
    def finished(self) -> bool:
        """Whether the policy has finished the federation."""
        return self._finished.is_set()

    async def wait_finished(self, timeout: float | None = None) -> bool:
        """Wait until the policy finishes; False on timeout (seconds)."""
        try:
            await asyncio.wait_for(self._finished.wait(), timeout)
        except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
            return False
        return True

    def task_of(self, session: Session, task_id: str) -> Task | None:
        """The outstanding task `task_id` if it belongs to `session`."""
        entry = self._tasks.get(task_id)
        return entry[1] if entry is not None and entry[0] is session else None

    def _pop_task(self, task_id: str) -> tuple[Session, Task] | None:
        """Remove an outstanding task from the table and from its session's set."""
        entry = self._tasks.pop(task_id, None)
        if entry is not None:
            entry[0].tasks.discard(task_id)
        return entry

    def forget(self, session: Session) -> None:
        """Drop the outstanding tasks of a session that ended."""
        for task_id in list(session.tasks):
            self._pop_task(task_id)

    def close(self) -> None:
        """Stop timers and background work (the server is going away)."""
        if self._wakeup is not None:
            self._wakeup.cancel()
        for task in list(self._background):
            task.cancel()

    # ------------------------------------------------------------------------------ inputs

    async def dispatch(self, event: Event) -> None:
        """Deliver one event to the policy and execute its decisions."""
        async with self._lock:
            await self._run_policy(event, {})

    async def learner_joined(self, session: Session) -> None:
        """A session can take tasks."""
        await self.dispatch(LearnerJoined(_now(), session.learner_id, session.num_examples))

    async def learner_lost(self, session: Session, reason: str) -> None:
        """A session ended; its tasks are void."""
        self.forget(session)
        await self.dispatch(LearnerLost(_now(), session.learner_id, reason))

    async def update_arrived(
        self, session: Session, task: Task, result: pb.TaskResult, update: wire.FloatVector
    ) -> None:
        """A complete, validated training update for `task` arrived on `session`."""
        async with self._lock:
            if self.task_of(session, task.task_id) is None:  # cancelled while uploading
                reason = session.closed_tasks.get(task.task_id, "closed")
                session.send_error(
                    pb.ERROR_CODE_STALE_TASK,
                    f"task {task.task_id!r} closed while uploading ({reason})",
                    task.task_id,
                )
                return
            self._pop_task(task.task_id)
            session.remember_closed(task.task_id, RESULT_RECEIVED)
            self.stats.updates_received_total += 1
            event = UpdateArrived(
                _now(),
                session.learner_id,
                task.task_id,
                int(result.base_version),
                int(result.num_examples),
                int(result.completed_steps),
                float(result.train_seconds),
                dict(result.metrics),
                float(result.seconds_per_batch),
                float(result.seconds_per_epoch),
            )
            await self._run_policy(event, {task.task_id: (session, update)})

    async def evaluation_arrived(self, session: Session, task: Task, result: pb.TaskResult) -> None:
        """An evaluation result for `task` arrived on `session`."""
        self._pop_task(task.task_id)
        session.remember_closed(task.task_id, RESULT_RECEIVED)
        self._record_evaluation(task.version, result)
        await self.dispatch(
            EvaluationArrived(
                _now(),
                session.learner_id,
                task.task_id,
                task.version,
                int(result.num_examples),
                dict(result.metrics),
            )
        )

    async def task_failed(self, session: Session, task_id: str, message: str) -> None:
        """The learner reported that it could not run `task_id`."""
        if self.task_of(session, task_id) is None:
            return
        self._pop_task(task_id)
        session.remember_closed(task_id, "learner reported failure")
        await self.dispatch(TaskFailed(_now(), session.learner_id, task_id, message))

    # ------------------------------------------------------------------------------ decisions

    async def _run_policy(self, event: Event, updates: Updates) -> None:
        pending: list[Event] = [event]
        while pending:
            for decision in self.policy.handle(pending.pop(0)):
                pending += await self._execute(decision, updates)
        self._schedule_wakeup()

    async def _execute(self, decision: Decision, updates: Updates) -> list[Event]:
        """Carry out one decision; returns follow-up events (e.g. a task that could not go out)."""
        if isinstance(decision, AssignTask):
            return self._assign(decision.task)
        if isinstance(decision, AcceptUpdate):
            _, update = updates.pop(decision.task_id)
            # The server checked every value when the upload completed.
            await asyncio.to_thread(self._aggregate.add, update, decision.weight, True)
            self.stats.updates_accepted_total += 1
        elif isinstance(decision, RejectUpdate):
            if decision.task_id in updates:
                session, _ = updates.pop(decision.task_id)
                self.stats.updates_rejected_total += 1
                session.send_error(pb.ERROR_CODE_STALE_TASK, decision.reason, decision.task_id)
        elif isinstance(decision, CancelTask):
            entry = self._pop_task(decision.task_id)
            holder = self._sessions.get(decision.learner_id)
            if holder is not None:
                holder.remember_closed(decision.task_id, decision.reason)
                if entry is not None:
                    cancel = pb.CancelTask(task_id=decision.task_id, reason=decision.reason)
                    holder.send(controller_message(cancel=cancel))
        elif isinstance(decision, CommitVersion):
            await self._commit(decision)
        elif isinstance(decision, DiscardAggregate):
            self._aggregate.reset()
            log.info("aggregate_discarded", reason=decision.reason, version=self.store.version)
        elif isinstance(decision, Finish):
            self._finish(decision.reason)
        return []

    def _assign(self, task: Task) -> list[Event]:
        session = self._sessions.get(task.learner_id)
        if session is None or session.closing.is_set():
            return [TaskFailed(_now(), task.learner_id, task.task_id, "learner gone")]
        if task.version != self.store.version:
            raise RuntimeError(
                f"policy assigned version {task.version}, the store holds {self.store.version}"
            )
        if session.held_version != task.version:
            session.send(*self.store.broadcast())
            session.held_version = task.version
        if task.kind is TaskKind.TRAIN:
            s = task.settings
            assert s is not None
            config = pb.TrainConfig(
                local_steps=s.local_steps,
                epochs=s.epochs,
                batch_size=s.batch_size,
                learning_rate=s.learning_rate,
                proximal_mu=s.proximal_mu,
                extra=dict(s.extra),
                time_budget_seconds=task.time_budget_seconds,
            )
            train = pb.TrainTask(
                task_id=task.task_id,
                model_version=task.version,
                config=config,
                deadline_seconds=task.deadline_seconds,
                upload_delta=task.upload_delta,
            )
            message = controller_message(train=train)
        else:
            evaluate = pb.EvaluateTask(task_id=task.task_id, model_version=task.version)
            message = controller_message(evaluate=evaluate)
        self._tasks[task.task_id] = (session, task)
        session.tasks.add(task.task_id)
        if not session.send(message):
            self._pop_task(task.task_id)
            return [TaskFailed(_now(), task.learner_id, task.task_id, "send queue full")]
        return []

    async def _commit(self, decision: CommitVersion) -> None:
        step = self._aggregate
        updates, weight = step.count, step.total_weight
        try:
            new = await asyncio.to_thread(
                step.commit,
                self.store.flat,
                decision.scale,
                decision.normalize,
                decision.relative,
            )
        except ValueError as error:
            # The policy believed it had updates the aggregate lacks. Keep the parameters but
            # still advance the version, so the store and the policy agree on version numbers.
            log.error("commit_failed", reason=str(error), version=self.store.version)
            step.reset()
            new = self.store.flat.copy()
        version = self.store.version + 1
        await asyncio.to_thread(self.store.commit, new, version)
        self.stats.versions_committed_total += 1
        log.info(
            "version_committed",
            version=version,
            updates=updates,
            total_weight=weight,
            reason=decision.reason,
        )
        if self._on_commit is not None:
            self._spawn(self._run_commit_hook(version))

    async def _run_commit_hook(self, version: int) -> None:
        hook = self._on_commit
        if hook is None or version != self.store.version:
            return  # a newer version already replaced it
        params = self.store.parameters()
        if inspect.iscoroutinefunction(hook):
            await hook(version, params)
        else:
            await asyncio.to_thread(hook, version, params)

    def _finish(self, reason: str) -> None:
        log.info("federation_finished", reason=reason, version=self.store.version)
        shutdown = pb.Shutdown(reason=reason, final_version=self.store.version)
        message = controller_message(shutdown=shutdown)
        for session in self._sessions.values():
            session.send(message)
            session.finish()
        self._finished.set()

    def _record_evaluation(self, version: int, result: pb.TaskResult) -> None:
        """Fold one evaluation into the example-weighted mean metrics of its version."""
        n = float(max(result.num_examples, 1))
        sums = self._evaluation_sums.setdefault(version, {"learners": 0.0, "examples": 0.0})
        sums["learners"] += 1
        sums["examples"] += n
        for name, value in result.metrics.items():
            if math.isfinite(value):
                sums[name] = sums.get(name, 0.0) + n * value
        weight = sums["examples"]
        summary = {k: (v if k in ("learners", "examples") else v / weight) for k, v in sums.items()}
        self.evaluations[version] = summary
        log.info("evaluation_received", version=version, **summary)

    # ------------------------------------------------------------------------------ timers

    def _schedule_wakeup(self) -> None:
        when = self.policy.next_wakeup()
        if self._wakeup is not None:
            self._wakeup.cancel()
            self._wakeup = None
        if when is None or self.finished:
            return
        loop = asyncio.get_running_loop()
        self._wakeup = loop.call_later(max(0.0, when - loop.time()), self._tick)

    def _tick(self) -> None:
        self._wakeup = None
        self._spawn(self.dispatch(Tick(_now())))

    def _spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    @property
    def _aggregate(self) -> ServerStep:
        assert self._step is not None, "no model yet"
        return self._step


def _now() -> float:
    """The policy clock: the event loop's monotonic time (seconds)."""
    return asyncio.get_running_loop().time()
