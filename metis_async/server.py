"""The controller service: a grpc.aio server on uvloop holding one stream per learner.

Learners dial out and keep one `Join` stream each. For every stream a `Session` reads messages,
checks them against the wire contract, and reassembles uploads chunk by chunk into a preallocated
buffer; complete, validated updates go to the `Federation` (the policy driver). Learners that
break the contract get a gRPC status naming the problem; nothing they send reaches the global
model before it has been fully validated.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import signal
import uuid
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
import numpy as np
import numpy.typing as npt
import structlog

from metis_async import wire
from metis_async._core import first_non_finite
from metis_async.aggregation.server_step import AggregationSettings
from metis_async.federation import RESULT_RECEIVED, CommitHook, Federation
from metis_async.protocols import Policy, TaskKind
from metis_async.session import PendingUpload, ProtocolViolation, Session, controller_message
from metis_async.store import ModelStore
from metis_async.telemetry import ControllerStats
from metis_async.v1 import controller_pb2 as pb

log = structlog.get_logger("metis_async.server")

JOIN_METHOD = "/metis_async.v1.Controller/Join"
INVALID = grpc.StatusCode.INVALID_ARGUMENT

T = TypeVar("T")


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
        max_model_bytes: largest flat model (bytes) a learner may propose or the controller
            holds; larger layouts are refused before anything is allocated.
        max_learner_id_length: longest `Hello.learner_id` accepted (UTF-8 bytes).
        max_num_examples: largest `num_examples` a learner may claim (hello or result); it is
            the aggregation weight, so an unbounded claim would let one learner own a round.
        tokens: learner id -> token; None disables authentication.
    """

    host: str = "127.0.0.1"
    port: int = 50051
    heartbeat_interval_seconds: float = 5.0
    heartbeat_timeout_seconds: float = 30.0
    hello_timeout_seconds: float = 10.0
    max_chunk_bytes: int = wire.MAX_CHUNK_BYTES
    send_queue_limit: int = 1024
    max_model_bytes: int = 2 * 1024**3
    max_learner_id_length: int = 128
    max_num_examples: int = 10**9
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
    """The controller service: learner streams in front of a `Federation`.

    Args:
        policy: the protocol deciding who trains what and when versions commit.
        config: network and liveness settings.
        initial_model: the first model; None asks the first learner to provide it.
        on_commit: called with each new version and its arrays (in a thread if not async).
        aggregation: server optimizer, robust rule, clipping (FedAvg with a streaming mean).
    """

    def __init__(
        self,
        policy: Policy,
        config: ControllerConfig | None = None,
        initial_model: Sequence[npt.NDArray[np.generic]] | None = None,
        on_commit: CommitHook | None = None,
        aggregation: AggregationSettings | None = None,
    ) -> None:
        self.config = config or ControllerConfig()
        self.store = ModelStore(self.config.max_chunk_bytes)
        self.stats = ControllerStats()
        if initial_model is not None:
            self.store.initialize_from_arrays(initial_model)
        self._sessions: dict[str, Session] = {}
        self.federation = Federation(
            policy, self.store, self.stats, self._sessions, on_commit, aggregation
        )
        self._waiting: list[Session] = []  # joined before any model existed
        self._model_provider: Session | None = None
        self._initial: tuple[pb.ModelLayout, wire.PayloadAssembler | None] | None = None
        self._server: grpc.aio.Server | None = None
        self._reaper: asyncio.Task[None] | None = None
        self._admitting: set[asyncio.Task[None]] = set()
        self.port = 0

    # ------------------------------------------------------------------------------ lifecycle

    async def start(self) -> int:
        """Bind and start serving; returns the bound port."""
        server = grpc.aio.server(options=self.config.grpc_options())
        handler = grpc.stream_stream_rpc_method_handler(self._join)  # raw bytes both ways
        service = grpc.method_handlers_generic_handler(
            "metis_async.v1.Controller", {"Join": handler}
        )
        server.add_generic_rpc_handlers((service,))
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
        """Wait until the policy finishes the federation; False on timeout (seconds)."""
        return await self.federation.wait_finished(timeout)

    @property
    def finished(self) -> bool:
        """Whether the policy has finished the federation."""
        return self.federation.finished

    async def stop(self, grace_seconds: float = 2.0) -> None:
        """Tell learners to stop, then close the server (waiting `grace_seconds` for streams)."""
        shutdown = pb.Shutdown(reason="controller stopping", final_version=self.store.version)
        message = controller_message(shutdown=shutdown)
        for session in list(self._sessions.values()):
            session.send(message)
            session.finish()
        self.federation.close()
        if self._reaper is not None:
            self._reaper.cancel()
        if self._server is not None:
            await self._server.stop(grace_seconds)
        log.info("controller_stopped", version=self.store.version, **self.stats.snapshot())

    @property
    def policy(self) -> Policy:
        """The federation's policy."""
        return self.federation.policy

    @property
    def version(self) -> int:
        """The current global model version."""
        return self.store.version

    @property
    def evaluations(self) -> dict[int, dict[str, float]]:
        """Example-weighted mean evaluation metrics by model version."""
        return self.federation.evaluations

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
            if reader in done and not reader.cancelled():
                self._close_on_error(session, reader.exception())
            if session.close_code is not None:
                await context.abort(session.close_code, session.close_message)
        finally:
            for task in (reader, writer, closer):
                task.cancel()
            await self._close_session(session)

    def _close_on_error(self, session: Session, error: BaseException | None) -> None:
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

    async def _open_session(self, context: grpc.aio.ServicerContext) -> Session:
        hello = await self._read_hello(context)
        learner_id = hello.learner_id or f"learner-{uuid.uuid4().hex[:12]}"
        tokens = self.config.tokens
        if tokens is not None and tokens.get(learner_id) != hello.token:
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED, f"invalid token for learner {learner_id!r}"
            )
        session = Session(
            learner_id,
            uuid.uuid4().hex,
            int(hello.num_examples),
            asyncio.get_running_loop().time(),
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
        welcome = pb.Welcome(
            learner_id=learner_id,
            session_id=session.session_id,
            heartbeat_interval_seconds=self.config.heartbeat_interval_seconds,
            max_chunk_bytes=self.config.max_chunk_bytes,
            protocol=self.policy.name,
            need_initial_model=need_model,
        )
        session.send(controller_message(welcome=welcome))
        log.info(
            "learner_joined",
            learner_id=learner_id,
            peer=session.peer,
            num_examples=session.num_examples,
            sessions=len(self._sessions),
        )
        if self.finished:
            shutdown = pb.Shutdown(reason="federation finished", final_version=self.version)
            session.send(controller_message(shutdown=shutdown))
            session.finish()
        elif self.store.ready:
            await self._admit(session)
        else:
            self._waiting.append(session)
        return session

    async def _read_hello(self, context: grpc.aio.ServicerContext) -> pb.Hello:
        try:
            raw = await asyncio.wait_for(context.read(), self.config.hello_timeout_seconds)
        except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "no hello received in time")
            raise
        if raw is grpc.aio.EOF:
            await context.abort(INVALID, "stream closed before hello")
        try:
            msg = _parse(raw)
        except ProtocolViolation as error:
            await context.abort(error.code, error.message)
            raise
        kind = msg.WhichOneof("body")
        if kind != "hello":
            await context.abort(INVALID, f"the first message on a stream must be hello, got {kind}")
        return msg.hello

    async def _admit(self, session: Session) -> None:
        """Send the layout and let the policy know the learner can take tasks."""
        if not session.has_layout:
            session.send(self.store.layout_message)
            session.has_layout = True
        if not session.joined_policy and not session.closing.is_set():
            session.joined_policy = True
            await self.federation.learner_joined(session)

    async def _close_session(self, session: Session) -> None:
        if self._sessions.get(session.learner_id) is not session:
            return
        del self._sessions[session.learner_id]
        if session in self._waiting:
            self._waiting.remove(session)
        if self._model_provider is session:
            self._model_provider = None
            self._initial = None
        reason = session.close_message or "stream ended"
        log.info(
            "learner_left",
            learner_id=session.learner_id,
            reason=reason,
            sessions=len(self._sessions),
        )
        if session.joined_policy:
            await self.federation.learner_lost(session, reason)
        else:
            self.federation.forget(session)

    async def _write_loop(self, session: Session, context: grpc.aio.ServicerContext) -> None:
        while (message := await session.queue.get()) is not None:
            await context.write(message)

    async def _read_loop(self, session: Session, context: grpc.aio.ServicerContext) -> None:
        loop = asyncio.get_running_loop()
        while (raw := await context.read()) is not grpc.aio.EOF:
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

    async def _reap_silent_learners(self) -> None:
        timeout = self.config.heartbeat_timeout_seconds
        while True:
            await asyncio.sleep(max(self.config.heartbeat_interval_seconds / 2, 0.05))
            deadline = asyncio.get_running_loop().time() - timeout
            for session in list(self._sessions.values()):
                if session.last_seen < deadline:
                    session.close(grpc.StatusCode.UNAVAILABLE, f"no message for {timeout:g} s")

    # ------------------------------------------------------------------------------ uploads

    async def _on_result(self, session: Session, result: pb.TaskResult) -> None:
        if session.pending is not None:
            raise ProtocolViolation(
                INVALID,
                f"result for {result.task_id!r} started before the chunks of "
                f"{session.pending.task.task_id!r} were complete",
            )
        task = self.federation.task_of(session, result.task_id)
        if task is None:
            self._answer_closed_task(session, result)
            return
        if task.kind is TaskKind.EVALUATE:
            if result.payload.num_chunks:
                raise ProtocolViolation(INVALID, "evaluation results carry no payload")
            await self.federation.evaluation_arrived(session, task, result)
            return
        if result.base_version != task.version:
            raise ProtocolViolation(
                INVALID,
                f"result for {task.task_id!r} claims base version "
                f"{result.base_version}, the task was for version {task.version}",
            )
        expected = pb.PAYLOAD_KIND_DELTA if task.upload_delta else pb.PAYLOAD_KIND_WEIGHTS
        if result.payload.kind != expected:
            raise ProtocolViolation(
                INVALID,
                f"task {task.task_id!r} asked for a {pb.PayloadKind.Name(expected)} payload, "
                f"got {pb.PayloadKind.Name(result.payload.kind)}",
            )
        assert self.store.layout is not None
        try:
            assembler = wire.PayloadAssembler(
                result.payload,
                self.store.nbytes,
                self.store.layout.layout_id,
                self.config.max_chunk_bytes,
                check=first_non_finite,  # each chunk while in cache: never re-read for this
            )
        except wire.WireError as error:
            raise ProtocolViolation(INVALID, f"task {task.task_id!r}: {error}") from None
        session.pending = PendingUpload(task, result, assembler)

    def _answer_closed_task(self, session: Session, result: pb.TaskResult) -> None:
        """A result for a task this session no longer holds: explain, and skip its chunks."""
        reason = session.closed_tasks.get(result.task_id)
        if reason is None:
            raise ProtocolViolation(
                INVALID,
                f"unknown task id {result.task_id!r}: "
                "this controller never assigned it to this learner",
            )
        session.discard_chunks = int(result.payload.num_chunks)
        session.discard_payload_id = int(result.payload.payload_id)
        code = pb.ERROR_CODE_DUPLICATE if reason == RESULT_RECEIVED else pb.ERROR_CODE_STALE_TASK
        message = f"task {result.task_id!r} is closed ({reason}); result discarded"
        log.info(
            "result_discarded", learner_id=session.learner_id, task_id=result.task_id, reason=reason
        )
        session.send_error(code, message, result.task_id)

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
        update = pending.assembler.result()  # every value already checked, chunk by chunk
        await self.federation.update_arrived(session, pending.task, pending.result, update)

    async def _on_learner_error(self, session: Session, error: pb.Error) -> None:
        log.warning(
            "learner_error",
            learner_id=session.learner_id,
            task_id=error.task_id,
            message=error.message,
        )
        await self.federation.task_failed(session, error.task_id, error.message)

    # ------------------------------------------------------------------------------ first model

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
                check=first_non_finite,
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
        flat = assembler.result().copy()  # every value already checked, chunk by chunk
        self._initial = None
        self.store.initialize(layout, flat)
        self.federation.model_ready()
        log.info(
            "model_initialized",
            source=session.learner_id,
            parameters=wire.num_parameters(layout),
            tensors=len(layout.tensors),
        )
        waiting, self._waiting = self._waiting, []
        task = asyncio.ensure_future(self._admit_all(waiting))
        self._admitting.add(task)
        task.add_done_callback(self._admitting.discard)

    async def _admit_all(self, sessions: list[Session]) -> None:
        for session in sessions:
            if self._sessions.get(session.learner_id) is session:
                await self._admit(session)


def _parse(raw: bytes) -> pb.LearnerMessage:
    msg = pb.LearnerMessage()
    try:
        msg.ParseFromString(raw)
    except Exception as error:  # protobuf raises DecodeError (a Message.Error subclass)
        raise ProtocolViolation(INVALID, f"could not parse LearnerMessage: {error}") from None
    return msg


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


async def serve(
    controller: Controller, *, until_finished: bool = True, grace_seconds: float = 5.0
) -> str:
    """Serve until the federation finishes (or forever), or until SIGTERM/SIGINT.

    On a signal (systemd's stop, Ctrl-C) the controller drains: every learner is told to stop,
    streams get `grace_seconds` to finish, then the server closes. Returns why it stopped.
    """
    await controller.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    reason = "finished"
    handled: list[signal.Signals] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):  # not on Windows
            loop.add_signal_handler(sig, stop.set)
            handled.append(sig)
    try:
        waiters: set[asyncio.Future[bool]] = {asyncio.ensure_future(stop.wait())}
        if until_finished:
            waiters.add(asyncio.ensure_future(controller.wait_finished()))
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for waiter in waiters:
            waiter.cancel()
        if stop.is_set():
            reason = "signal"
            log.info("draining", reason="signal", sessions=len(controller.sessions()))
        else:
            await asyncio.sleep(0.5)  # let shutdown messages reach the learners
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)
        with contextlib.suppress(Exception):
            await controller.stop(grace_seconds)
    return reason
