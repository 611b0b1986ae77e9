"""The controller: a grpc.aio service on uvloop that runs a federation policy.

Learners dial out and keep one `Join` stream each. For every stream a `Session` reads messages,
reassembles uploads chunk by chunk into a preallocated buffer, and hands complete updates to the
policy. Events reach the policy one at a time (under one lock) and its decisions are executed in
order: tasks are queued on sessions, accepted updates are folded into the Rust accumulator off
the event loop, and a commit turns the aggregate into a new version that is serialized once and
shared by every stream. Learners that break the wire contract get a gRPC status naming the problem;
nothing they send reaches the global model before it has been fully validated.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import math
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
import numpy as np
import numpy.typing as npt
import structlog

from metis_async import aggregation, wire
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
from metis_async.session import PendingUpload, ProtocolViolation, Session
from metis_async.store import ModelStore
from metis_async.telemetry import ControllerStats
from metis_async.v1 import controller_pb2 as pb

log = structlog.get_logger("metis_async.server")

JOIN_METHOD = "/metis_async.v1.Controller/Join"
INVALID = grpc.StatusCode.INVALID_ARGUMENT
RESULT_RECEIVED = "result already received"

T = TypeVar("T")

CommitHook = Callable[[int, list[npt.NDArray[np.generic]]], Awaitable[None] | None]


@dataclass(frozen=True)
class ControllerConfig:
    """Network and liveness settings of the controller.

    Attributes:
        host: address to listen on (loopback by default).
        port: TCP port; 0 picks a free one (see `Controller.port`).
        heartbeat_interval_seconds: learners send a heartbeat at least this often.
        heartbeat_timeout_seconds: a learner silent this long is disconnected and its tasks void.
        hello_timeout_seconds: a new stream must say hello within this time.
        max_chunk_bytes: largest chunk either side may send.
        send_queue_limit: messages queued per stream before a slow learner is dropped.
        tokens: learner id -> token; None disables authentication.
    """

    host: str = "127.0.0.1"
    port: int = 50051
    heartbeat_interval_seconds: float = 5.0
    heartbeat_timeout_seconds: float = 30.0
    hello_timeout_seconds: float = 10.0
    max_chunk_bytes: int = wire.MAX_CHUNK_BYTES
    send_queue_limit: int = 1024
    tokens: Mapping[str, str] | None = field(default=None, repr=False)

    def grpc_options(self) -> list[tuple[str, Any]]:
        """Channel arguments of the server (message limits, keepalive for NATed learners)."""
        limit = self.max_chunk_bytes + 1024 * 1024
        return [
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
            ("grpc.http2.max_ping_strikes", 0),
            # Thousands of learners reconnect at once after a restart; past these limits gRPC
            # drops new calls silently (shared/GRPC-NOTES.md).
            ("grpc.server.max_pending_requests", 200_000),
            ("grpc.server.max_pending_requests_hard_limit", 400_000),
        ]


class Controller:
    """Runs one federation: sessions, the policy, aggregation and the model store.

    Args:
        policy: the protocol deciding who trains what and when versions commit.
        config: network and liveness settings.
        initial_model: the first model; None asks the first learner to provide it.
        on_commit: called (in a worker thread if sync) with each new version and its arrays.
    """

    def __init__(
        self,
        policy: Policy,
        config: ControllerConfig | None = None,
        initial_model: Sequence[npt.NDArray[np.generic]] | None = None,
        on_commit: CommitHook | None = None,
    ) -> None:
        self.policy = policy
        self.config = config or ControllerConfig()
        self.store = ModelStore(self.config.max_chunk_bytes)
        self.stats = ControllerStats()
        self._on_commit = on_commit
        self._accumulator: aggregation.Accumulator | None = None
        self._sessions: dict[str, Session] = {}
        self._tasks: dict[str, tuple[Session, Task]] = {}
        self._waiting: list[Session] = []  # joined before any model existed
        self._model_provider: Session | None = None
        self._policy_lock = asyncio.Lock()
        self._finished = asyncio.Event()
        self._wakeup: asyncio.TimerHandle | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._server: grpc.aio.Server | None = None
        self._reaper: asyncio.Task[None] | None = None
        self.evaluations: dict[int, dict[str, float]] = {}  # version -> weighted mean metrics
        self._evaluation_sums: dict[int, dict[str, float]] = {}
        self.port = 0
        if initial_model is not None:
            self.store.initialize_from_arrays(initial_model)
            self._accumulator = aggregation.Accumulator(wire.num_parameters(self._layout))

    # ------------------------------------------------------------------------------ lifecycle

    async def start(self) -> int:
        """Bind and start serving; returns the bound port."""
        server = grpc.aio.server(options=self.config.grpc_options())
        handler = grpc.stream_stream_rpc_method_handler(self._join)  # raw bytes both ways
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("metis_async.v1.Controller", {"Join": handler}),)
        )
        address = f"{self.config.host}:{self.config.port}"
        self.port = server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"could not bind {address}")
        await server.start()
        self._server = server
        self._reaper = asyncio.create_task(self._reap_silent_learners())
        log.info(
            "controller_started",
            address=f"{self.config.host}:{self.port}",
            protocol=self.policy.name,
            model_ready=self.store.ready,
        )
        return self.port

    async def wait_finished(self, timeout: float | None = None) -> bool:
        """Wait until the policy finishes the federation; False on timeout."""
        try:
            await asyncio.wait_for(self._finished.wait(), timeout)
        except TimeoutError:
            return False
        return True

    @property
    def finished(self) -> bool:
        """Whether the policy has finished the federation."""
        return self._finished.is_set()

    async def stop(self, grace_seconds: float = 2.0) -> None:
        """Tell learners to stop, then close the server (waiting `grace_seconds` for streams)."""
        shutdown = _message(
            shutdown=pb.Shutdown(reason="controller stopping", final_version=self.store.version)
        )
        for session in list(self._sessions.values()):
            session.send(shutdown)
            session.finish()
        if self._wakeup is not None:
            self._wakeup.cancel()
        if self._reaper is not None:
            self._reaper.cancel()
        if self._server is not None:
            await self._server.stop(grace_seconds)
        for task in list(self._background):
            task.cancel()
        log.info("controller_stopped", version=self.store.version, **self.stats.snapshot())

    @property
    def version(self) -> int:
        """The current global model version."""
        return self.store.version

    def sessions(self) -> list[dict[str, object]]:
        """Connected learners, for the dashboard and tests."""
        return [s.describe() for s in self._sessions.values()]

    # ------------------------------------------------------------------------------ streams

    async def _join(self, _requests: object, context: grpc.aio.ServicerContext) -> None:
        """Serve one learner stream from hello to close."""
        session = await self._open_session(context)
        reader = asyncio.create_task(self._read_loop(session, context))
        writer = asyncio.create_task(self._write_loop(session, context))
        closer = asyncio.create_task(session.closing.wait())
        try:
            done, _ = await asyncio.wait(
                {reader, writer, closer}, return_when=asyncio.FIRST_COMPLETED
            )
            for task in (reader, writer, closer):
                task.cancel()
            if reader in done and not reader.cancelled():
                error = reader.exception()
                if isinstance(error, ProtocolViolation):
                    self.stats.protocol_errors_total += 1
                    log.warning(
                        "protocol_violation",
                        learner_id=session.learner_id,
                        code=error.code.name,
                        message=error.message,
                    )
                    session.close(error.code, error.message)
                elif error is not None:
                    log.error("session_failed", learner_id=session.learner_id, error=repr(error))
                    session.close(grpc.StatusCode.INTERNAL, "internal error in the controller")
            if session.close_code is not None:
                await context.abort(session.close_code, session.close_message)
        finally:
            for task in (reader, writer, closer):
                task.cancel()
            await self._close_session(session)

    async def _open_session(self, context: grpc.aio.ServicerContext) -> Session:
        try:
            raw = await asyncio.wait_for(context.read(), self.config.hello_timeout_seconds)
        except TimeoutError:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "no hello received in time")
            raise
        if raw is grpc.aio.EOF:
            await context.abort(INVALID, "stream closed before hello")
        try:
            msg = _parse(raw)
        except ProtocolViolation as error:
            await context.abort(error.code, error.message)
            raise
        if msg.WhichOneof("body") != "hello":
            await context.abort(
                INVALID,
                f"the first message on a stream must be hello, got {msg.WhichOneof('body')}",
            )
        hello = msg.hello
        learner_id = hello.learner_id or f"learner-{uuid.uuid4().hex[:12]}"
        tokens = self.config.tokens
        if tokens is not None and tokens.get(learner_id) != hello.token:
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED, f"invalid token for learner {learner_id!r}"
            )
        loop = asyncio.get_running_loop()
        session = Session(
            learner_id,
            uuid.uuid4().hex,
            int(hello.num_examples),
            loop.time(),
            self.config.send_queue_limit,
            peer=context.peer(),
        )
        if hello.holds_model:
            session.held_version = int(hello.held_version)
        old = self._sessions.get(learner_id)
        if old is not None:
            old.close(grpc.StatusCode.ALREADY_EXISTS, "replaced by a newer session")
            await self._close_session(old)
        self._sessions[learner_id] = session
        self.stats.sessions_opened_total += 1
        need_model = not self.store.ready and self._model_provider is None
        if need_model:
            self._model_provider = session
        session.send(
            _message(
                welcome=pb.Welcome(
                    learner_id=learner_id,
                    session_id=session.session_id,
                    heartbeat_interval_seconds=self.config.heartbeat_interval_seconds,
                    max_chunk_bytes=self.config.max_chunk_bytes,
                    protocol=self.policy.name,
                    need_initial_model=need_model,
                )
            )
        )
        log.info(
            "learner_joined",
            learner_id=learner_id,
            peer=session.peer,
            num_examples=session.num_examples,
            sessions=len(self._sessions),
        )
        if self.finished:
            session.send(
                _message(
                    shutdown=pb.Shutdown(
                        reason="federation finished", final_version=self.store.version
                    )
                )
            )
            session.finish()
        elif self.store.ready:
            await self._admit(session)
        else:
            self._waiting.append(session)
        return session

    async def _admit(self, session: Session) -> None:
        """Send the layout and let the policy know the learner can take tasks."""
        if not session.has_layout:
            session.send(self.store.layout_message)
            session.has_layout = True
        if not session.joined_policy and not session.closing.is_set():
            session.joined_policy = True
            await self._dispatch(
                LearnerJoined(self._now(), session.learner_id, session.num_examples)
            )

    async def _close_session(self, session: Session) -> None:
        if self._sessions.get(session.learner_id) is not session:
            return
        del self._sessions[session.learner_id]
        if session in self._waiting:
            self._waiting.remove(session)
        if self._model_provider is session:
            self._model_provider = None
        for task_id in [t for t, (s, _) in self._tasks.items() if s is session]:
            del self._tasks[task_id]
        log.info(
            "learner_left",
            learner_id=session.learner_id,
            reason=session.close_message or "stream ended",
            sessions=len(self._sessions),
        )
        if session.joined_policy:
            await self._dispatch(
                LearnerLost(
                    self._now(), session.learner_id, session.close_message or "stream ended"
                )
            )

    async def _write_loop(self, session: Session, context: grpc.aio.ServicerContext) -> None:
        while True:
            message = await session.queue.get()
            if message is None:
                return
            await context.write(message)

    async def _read_loop(self, session: Session, context: grpc.aio.ServicerContext) -> None:
        loop = asyncio.get_running_loop()
        while True:
            raw = await context.read()
            if raw is grpc.aio.EOF:
                return
            session.last_seen = loop.time()
            self.stats.bytes_received_total += len(raw)
            msg = _parse(raw)
            kind = msg.WhichOneof("body")
            if kind == "heartbeat":
                continue
            if kind == "chunk":
                await self._on_chunk(session, msg.chunk)
            elif kind == "result":
                await self._on_result(session, msg.result)
            elif kind == "error":
                await self._on_learner_error(session, msg.error)
            elif kind == "layout":
                self._on_initial_layout(session, msg.layout)
            elif kind == "initial_model":
                self._on_initial_model(session, msg.initial_model)
            elif kind == "hello":
                raise ProtocolViolation(INVALID, "hello sent twice on one stream")
            else:
                raise ProtocolViolation(INVALID, "message has no body")

    # ------------------------------------------------------------------------------ uploads

    async def _on_result(self, session: Session, result: pb.TaskResult) -> None:
        if session.pending is not None:
            raise ProtocolViolation(
                INVALID,
                f"result for {result.task_id!r} started before the chunks of "
                f"{session.pending.task.task_id!r} were complete",
            )
        entry = self._tasks.get(result.task_id)
        if entry is None or entry[0] is not session:
            reason = session.closed_tasks.get(result.task_id)
            if reason is None:
                raise ProtocolViolation(
                    INVALID,
                    f"unknown task id {result.task_id!r}: this controller never "
                    "assigned it to this learner",
                )
            self._skip_payload(session, result)
            duplicate = reason == RESULT_RECEIVED
            self._reject(
                session,
                result.task_id,
                pb.ERROR_CODE_DUPLICATE if duplicate else pb.ERROR_CODE_STALE_TASK,
                f"task {result.task_id!r} is closed ({reason}); result discarded",
            )
            return
        task = entry[1]
        if task.kind is TaskKind.EVALUATE:
            if result.payload.num_chunks:
                raise ProtocolViolation(INVALID, "evaluation results carry no payload")
            del self._tasks[task.task_id]
            session.remember_closed(task.task_id, RESULT_RECEIVED)
            self._record_evaluation(task.version, result)
            await self._dispatch(
                EvaluationArrived(
                    self._now(),
                    session.learner_id,
                    task.task_id,
                    task.version,
                    int(result.num_examples),
                    dict(result.metrics),
                )
            )
            return
        if result.base_version != task.version:
            raise ProtocolViolation(
                INVALID,
                f"result for {task.task_id!r} claims base version "
                f"{result.base_version}, the task was for version {task.version}",
            )
        if result.payload.kind != pb.PAYLOAD_KIND_DELTA:
            raise ProtocolViolation(INVALID, "train results must upload a DELTA payload")
        try:
            assembler = wire.PayloadAssembler(
                result.payload,
                self.store.nbytes,
                self._layout.layout_id,
                self.config.max_chunk_bytes,
            )
        except wire.WireError as error:
            raise ProtocolViolation(INVALID, f"task {task.task_id!r}: {error}") from None
        session.pending = PendingUpload(task, result, assembler)

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

    def _skip_payload(self, session: Session, result: pb.TaskResult) -> None:
        session.discard_chunks = int(result.payload.num_chunks)
        session.discard_payload_id = int(result.payload.payload_id)

    async def _on_chunk(self, session: Session, chunk: pb.Chunk) -> None:
        if session.discard_chunks and chunk.payload_id == session.discard_payload_id:
            session.discard_chunks -= 1
            return
        if session.pending is None:
            if self._model_provider is session and self._initial is not None:
                self._on_initial_chunk(session, chunk)
                return
            raise ProtocolViolation(
                INVALID, f"chunk of payload {chunk.payload_id} arrived with no payload announced"
            )
        pending = session.pending
        try:
            pending.assembler.add(chunk)
        except wire.WireError as error:
            raise ProtocolViolation(INVALID, f"task {pending.task.task_id!r}: {error}") from None
        if not pending.assembler.done:
            return
        session.pending = None
        update = pending.assembler.result()
        if not await asyncio.to_thread(_all_finite, update):
            raise ProtocolViolation(
                INVALID, f"task {pending.task.task_id!r}: update contains NaN or infinite values"
            )
        await self._deliver_update(session, pending, update)

    async def _deliver_update(
        self, session: Session, pending: PendingUpload, update: wire.FloatVector
    ) -> None:
        task, result = pending.task, pending.result
        async with self._policy_lock:
            if self._tasks.get(task.task_id, (None,))[0] is not session:
                reason = session.closed_tasks.get(task.task_id, "closed")
                self._reject(
                    session,
                    task.task_id,
                    pb.ERROR_CODE_STALE_TASK,
                    f"task {task.task_id!r} closed while uploading ({reason})",
                )
                return
            del self._tasks[task.task_id]
            session.remember_closed(task.task_id, RESULT_RECEIVED)
            self.stats.updates_received_total += 1
            event = UpdateArrived(
                self._now(),
                session.learner_id,
                task.task_id,
                int(result.base_version),
                int(result.num_examples),
                int(result.completed_steps),
                float(result.train_seconds),
                dict(result.metrics),
            )
            await self._run_policy(event, {task.task_id: (session, update)})

    async def _on_learner_error(self, session: Session, error: pb.Error) -> None:
        entry = self._tasks.get(error.task_id)
        log.warning(
            "learner_error",
            learner_id=session.learner_id,
            task_id=error.task_id,
            message=error.message,
        )
        if entry is not None and entry[0] is session:
            del self._tasks[error.task_id]
            session.remember_closed(error.task_id, "learner reported failure")
            await self._dispatch(
                TaskFailed(self._now(), session.learner_id, error.task_id, error.message)
            )

    # ------------------------------------------------------------------------------ first model

    _initial: tuple[pb.ModelLayout, wire.PayloadAssembler | None] | None = None

    def _on_initial_layout(self, session: Session, layout: pb.ModelLayout) -> None:
        if self._model_provider is not session or self.store.ready:
            raise ProtocolViolation(INVALID, "the controller did not ask this learner for a model")
        _check_layout(layout)
        self._initial = (layout, None)

    def _on_initial_model(self, session: Session, initial: pb.InitialModel) -> None:
        if self._model_provider is not session or self._initial is None:
            raise ProtocolViolation(INVALID, "initial model sent before its layout")
        layout = self._initial[0]
        try:
            assembler = wire.PayloadAssembler(
                initial.payload,
                int(layout.total_bytes),
                layout.layout_id,
                self.config.max_chunk_bytes,
            )
        except wire.WireError as error:
            raise ProtocolViolation(INVALID, f"initial model: {error}") from None
        self._initial = (layout, assembler)

    def _on_initial_chunk(self, session: Session, chunk: pb.Chunk) -> None:
        assert self._initial is not None
        layout, assembler = self._initial
        if assembler is None:
            raise ProtocolViolation(INVALID, "initial model chunk before its header")
        try:
            assembler.add(chunk)
        except wire.WireError as error:
            raise ProtocolViolation(INVALID, f"initial model: {error}") from None
        if not assembler.done:
            return
        flat = assembler.result().copy()
        if not _all_finite(flat):
            raise ProtocolViolation(INVALID, "initial model contains NaN or infinite values")
        self._initial = None
        self.store.initialize(layout, flat)
        self._accumulator = aggregation.Accumulator(wire.num_parameters(layout))
        log.info(
            "model_initialized",
            source=session.learner_id,
            parameters=wire.num_parameters(layout),
            tensors=len(layout.tensors),
        )
        waiting, self._waiting = self._waiting, []
        self._spawn(self._admit_all(waiting))

    async def _admit_all(self, sessions: list[Session]) -> None:
        for session in sessions:
            if self._sessions.get(session.learner_id) is session:
                await self._admit(session)

    # ------------------------------------------------------------------------------ policy

    async def _dispatch(self, event: Event) -> None:
        """Deliver one event to the policy and execute its decisions, serialized with others."""
        async with self._policy_lock:
            await self._run_policy(event, {})

    async def _run_policy(
        self, event: Event, updates: dict[str, tuple[Session, wire.FloatVector]]
    ) -> None:
        follow_up: list[Event] = [event]
        while follow_up:
            decisions = self.policy.handle(follow_up.pop(0))
            for decision in decisions:
                follow_up += await self._execute(decision, updates)
        self._schedule_wakeup()

    async def _execute(
        self, decision: Decision, updates: dict[str, tuple[Session, wire.FloatVector]]
    ) -> list[Event]:
        if isinstance(decision, AssignTask):
            return self._assign(decision.task)
        if isinstance(decision, AcceptUpdate):
            _, update = updates.pop(decision.task_id)
            await asyncio.to_thread(self._acc.add, update, decision.weight)
            self.stats.updates_accepted_total += 1
        elif isinstance(decision, RejectUpdate):
            if decision.task_id in updates:
                rejected, _ = updates.pop(decision.task_id)
                self.stats.updates_rejected_total += 1
                self._reject(rejected, decision.task_id, pb.ERROR_CODE_STALE_TASK, decision.reason)
        elif isinstance(decision, CancelTask):
            entry = self._tasks.pop(decision.task_id, None)
            holder = self._sessions.get(decision.learner_id)
            if holder is not None:
                holder.remember_closed(decision.task_id, decision.reason)
                if entry is not None:
                    holder.send(
                        _message(
                            cancel=pb.CancelTask(task_id=decision.task_id, reason=decision.reason)
                        )
                    )
        elif isinstance(decision, CommitVersion):
            await self._commit(decision)
        elif isinstance(decision, DiscardAggregate):
            self._acc.reset()
            log.info("aggregate_discarded", reason=decision.reason, version=self.store.version)
        elif isinstance(decision, Finish):
            self._finish(decision.reason)
        return []

    def _assign(self, task: Task) -> list[Event]:
        session = self._sessions.get(task.learner_id)
        if session is None or session.closing.is_set():
            return [TaskFailed(self._now(), task.learner_id, task.task_id, "learner gone")]
        if task.version != self.store.version:
            raise RuntimeError(
                f"policy assigned version {task.version}, the controller holds {self.store.version}"
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
            )
            message = _message(
                train=pb.TrainTask(
                    task_id=task.task_id,
                    model_version=task.version,
                    config=config,
                    deadline_seconds=task.deadline_seconds,
                    upload_delta=True,
                )
            )
        else:
            message = _message(
                evaluate=pb.EvaluateTask(task_id=task.task_id, model_version=task.version)
            )
        self._tasks[task.task_id] = (session, task)
        if not session.send(message):
            del self._tasks[task.task_id]
            return [TaskFailed(self._now(), task.learner_id, task.task_id, "send queue full")]
        return []

    async def _commit(self, decision: CommitVersion) -> None:
        acc = self._acc
        base = self.store.flat
        try:
            new = await asyncio.to_thread(acc.apply, base, decision.scale, decision.normalize)
        except ValueError as error:
            # The policy believed it had updates the aggregate lacks: keep the model as it is.
            log.error("commit_failed", reason=str(error), version=self.store.version)
            acc.reset()
            return
        version = self.store.version + 1
        await asyncio.to_thread(self.store.commit, new, version)
        updates, weight = acc.count, acc.total_weight
        acc.reset()
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
        assert self._on_commit is not None
        if version != self.store.version:
            return  # a newer version already replaced it
        params = self.store.parameters()
        hook = self._on_commit
        if inspect.iscoroutinefunction(hook):
            await hook(version, params)
        else:
            await asyncio.to_thread(hook, version, params)

    def _finish(self, reason: str) -> None:
        log.info("federation_finished", reason=reason, version=self.store.version)
        shutdown = _message(shutdown=pb.Shutdown(reason=reason, final_version=self.store.version))
        for session in self._sessions.values():
            session.send(shutdown)
            session.finish()
        self._finished.set()

    def _schedule_wakeup(self) -> None:
        when = self.policy.next_wakeup()
        if self._wakeup is not None:
            self._wakeup.cancel()
            self._wakeup = None
        if when is None or self.finished:
            return
        loop = asyncio.get_running_loop()
        delay = max(0.0, when - loop.time())
        self._wakeup = loop.call_later(delay, self._tick)

    def _tick(self) -> None:
        self._wakeup = None
        self._spawn(self._dispatch(Tick(self._now())))

    # ------------------------------------------------------------------------------ helpers

    def _reject(
        self, session: Session, task_id: str, code: pb.ErrorCode.ValueType, message: str
    ) -> None:
        log.info("update_rejected", learner_id=session.learner_id, task_id=task_id, reason=message)
        session.send(
            _message(
                error=pb.Error(
                    code=code,
                    message=message,
                    task_id=task_id,
                )
            )
        )

    async def _reap_silent_learners(self) -> None:
        interval = max(self.config.heartbeat_interval_seconds / 2, 0.05)
        while True:
            await asyncio.sleep(interval)
            deadline = self._now() - self.config.heartbeat_timeout_seconds
            for session in list(self._sessions.values()):
                if session.last_seen < deadline:
                    session.close(
                        grpc.StatusCode.UNAVAILABLE,
                        f"no message for {self.config.heartbeat_timeout_seconds:g} s",
                    )

    def _spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    @staticmethod
    def _now() -> float:
        return asyncio.get_running_loop().time()

    @property
    def _layout(self) -> pb.ModelLayout:
        assert self.store.layout is not None
        return self.store.layout

    @property
    def _acc(self) -> aggregation.Accumulator:
        assert self._accumulator is not None
        return self._accumulator


def _message(**body: Any) -> bytes:
    return pb.ControllerMessage(**body).SerializeToString()


def _parse(raw: bytes) -> pb.LearnerMessage:
    msg = pb.LearnerMessage()
    try:
        msg.ParseFromString(raw)
    except Exception as error:  # protobuf raises DecodeError (a Message.Error subclass)
        raise ProtocolViolation(INVALID, f"could not parse LearnerMessage: {error}") from None
    return msg


def _all_finite(values: wire.FloatVector) -> bool:
    return bool(np.isfinite(values).all())


def _check_layout(layout: pb.ModelLayout) -> None:
    offset = 0
    for spec in layout.tensors:
        count = math.prod(int(s) for s in spec.shape)
        if spec.offset != offset or spec.nbytes != count * wire.WIRE_DTYPE.itemsize:
            raise ProtocolViolation(
                INVALID,
                f"layout tensor {spec.name!r} is inconsistent: "
                f"offset {spec.offset}, {spec.nbytes} bytes",
            )
        offset += int(spec.nbytes)
    if not layout.tensors or offset != layout.total_bytes:
        raise ProtocolViolation(
            INVALID, f"layout totals {offset} bytes but announces {layout.total_bytes}"
        )


def run_event_loop(coro: Coroutine[Any, Any, T]) -> T:
    """Run `coro` to completion on uvloop where available (the standard loop elsewhere)."""
    try:
        import uvloop
    except ImportError:  # e.g. Windows: the standard loop works, slower
        return asyncio.run(coro)
    return uvloop.run(coro)


async def serve(controller: Controller, *, until_finished: bool = True) -> None:
    """Start `controller` and serve until it finishes (or forever), stopping cleanly on cancel."""
    await controller.start()
    try:
        if until_finished:
            await controller.wait_finished()
            await asyncio.sleep(0.5)  # let shutdown messages reach the learners
        else:
            await asyncio.Event().wait()
    finally:
        with contextlib.suppress(Exception):
            await controller.stop()
