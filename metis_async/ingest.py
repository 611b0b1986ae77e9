"""What arrives on a learner's stream after its hello: results, chunks, errors, the first model.

`Ingest` checks every message against the wire contract and reassembles payloads: a chunk
message is recognised by the Rust decoder (never parsed by protobuf), then decoded, copied into
place and checked for NaN/inf in one Rust call with the GIL released, in a low-priority worker
thread for large chunks. At most `upload_buffer_bytes` of training uploads (and at least
`max_uploads_in_flight` uploads) are reassembled at once; a result beyond that waits with its
stream unread (gRPC flow control holds the learner back), so memory stays O(bytes in flight).
A complete, validated update becomes one event for the federation core, through a `CoreLink`
(in this process, or over an ingest worker's channel). Anything that breaks the contract raises
`ProtocolViolation`, which ends the stream with a status naming the problem. The ingest workers
of a multi-process controller reuse this class as it is.
"""

from __future__ import annotations

import asyncio
import math
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
import structlog

from metis_async import wire
from metis_async._core import EncryptionError
from metis_async.delivery import keep_freed_memory, lower_thread_priority, start_bulk_threads
from metis_async.federation import RESULT_RECEIVED, UpdateReport
from metis_async.protocols import Task, TaskKind
from metis_async.secure.aggregate import CipherUpload, check_ciphertexts
from metis_async.session import PendingUpload, ProtocolViolation, Session, controller_message
from metis_async.store import ModelStore
from metis_async.telemetry import ControllerStats, LogLimiter, short_id
from metis_async.v1 import controller_pb2 as pb

if TYPE_CHECKING:
    from metis_async.links import CoreLink
    from metis_async.secure.relay import DecryptionRelay

log = structlog.get_logger("metis_async.server")

INVALID = grpc.StatusCode.INVALID_ARGUMENT
OFF_LOOP_CHUNK_BYTES = 256 * 1024
"""Chunks at least this large are copied and checked in a worker thread, not on the loop."""


class Ingest:
    """Handles the messages of learner streams after hello (see the module docstring).

    Args:
        config: the controller's limits (`ControllerConfig`).
        link: the federation core, in this process or another.
        store: the published model (its layout and size).
        stats: counters to update.
        limiter: rate limit of repeated log lines per learner.
    """

    def __init__(
        self,
        config: Any,
        link: CoreLink,
        store: ModelStore,
        stats: ControllerStats,
        limiter: LogLimiter,
    ) -> None:
        self.config = config
        self.link = link
        self.store = store
        self.stats = stats
        self._limiter = limiter
        self.relay: DecryptionRelay | None = None  # multiparty keys: members' shares
        self._slots: asyncio.Semaphore | None = None  # sized once the model's size is known
        keep_freed_memory()  # first: threads started before it keep glibc's default arenas
        self._pool = ThreadPoolExecutor(
            2, thread_name_prefix="ingest", initializer=lower_thread_priority
        )
        start_bulk_threads(self._pool)

    def close(self) -> None:
        """Stop the worker threads (the controller is going away)."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def handle(self, session: Session, raw: bytes) -> None:
        """One serialized `LearnerMessage` received on `session`'s stream."""
        chunk = wire.peek_chunk(raw)
        if chunk is not None:
            await self._on_chunk(session, raw, chunk)
            return
        msg = parse_learner_message(raw)
        kind = msg.WhichOneof("body")
        if kind == "heartbeat":
            return
        if kind == "received":
            if session.ledger is not None:  # a receipt the stream did not ask for is ignored
                received = msg.received
                now = asyncio.get_running_loop().time()
                session.ledger.received(int(received.version), int(received.chunks), now)
            return
        if kind == "result":
            await self._on_result(session, msg.result)
        elif kind == "error":
            await self._on_learner_error(session, msg.error)
        elif kind == "layout":
            self._on_initial_layout(session, msg.layout)
        elif kind == "initial_model":
            self._on_initial_model(session, msg.initial_model)
        elif kind == "secagg":
            if not self.config.secagg:
                raise ProtocolViolation(INVALID, "SecAgg+ step sent to a controller without it")
            await self.link.secure_step_arrived(session.learner_id, msg.secagg)
        elif kind == "decryption_share":
            if self.relay is None:
                raise ProtocolViolation(
                    INVALID, "decryption share sent to a controller without multiparty keys"
                )
            self.relay.share_arrived(session, msg.decryption_share)
        elif kind == "hello":
            raise ProtocolViolation(INVALID, "hello sent twice on one stream")
        elif kind == "chunk":  # a chunk the Rust decoder could not read as one
            raise ProtocolViolation(INVALID, "malformed chunk message")
        else:
            raise ProtocolViolation(INVALID, "message has no body")

    async def _on_result(self, session: Session, result: pb.TaskResult) -> None:
        if session.pending is not None:
            raise ProtocolViolation(
                INVALID,
                f"result for {result.task_id!r} started before the chunks of "
                f"{session.pending.task.task_id!r} were complete",
            )
        found = await self.link.lookup(session.learner_id, result.task_id)
        task = found.task
        if task is None and found.committed_version is not None:
            self._skip_chunks(session, result)
            ack = pb.Ack(task_id=result.task_id, version=found.committed_version)
            session.send(controller_message(ack=ack))
            return
        if task is None and found.resendable:
            task = _resent_task(session.learner_id, result, found.resent_upload_delta)
        if task is None:
            self._answer_closed_task(session, result, found.closed_reason)
            return
        if result.num_examples > self.config.max_num_examples:
            raise ProtocolViolation(
                INVALID,
                f"result for {task.task_id!r} claims {result.num_examples} examples; the "
                f"controller's limit is {self.config.max_num_examples}",
            )
        if task.kind is TaskKind.EVALUATE:
            if result.payload.num_chunks:
                raise ProtocolViolation(INVALID, "evaluation results carry no payload")
            metrics = {k: float(v) for k, v in result.metrics.items()}
            await self.link.evaluation_arrived(
                session.learner_id,
                task.task_id,
                int(result.num_examples),
                metrics,
            )
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
        layout = self.store.layout
        assert layout is not None
        if self.config.he is not None or self.config.secagg:
            await self._take_encrypted(session, task, result, layout)
            return
        try:
            wire.check_header(
                result.payload,
                self.store.nbytes,
                layout.layout_id,
                self.config.max_chunk_bytes,
                _accepted(session),
            )
        except wire.WireError as error:
            raise ProtocolViolation(INVALID, f"task {task.task_id!r}: {error}") from None
        await self._take_upload_slot(session)
        if session.take_grant(result.task_id):  # the learner waits for this to send chunks
            session.send(controller_message(grant=pb.UploadGrant(task_id=result.task_id)))
        upload = wire.Upload(
            result.payload,
            self.store.nbytes,
            layout.layout_id,
            self.config.max_chunk_bytes,
            allowed=_accepted(session),
        )
        session.pending = PendingUpload(task, result, upload)
        if upload.done:
            await self._upload_complete(session)

    async def _take_encrypted(
        self, session: Session, task: Task, result: pb.TaskResult, layout: pb.ModelLayout
    ) -> None:
        """Start receiving an encrypted (HOMOMORPHIC AGGREGATION in the proto) or masked
        (SECURE AGGREGATION) upload."""
        he = self.config.he
        values = wire.num_parameters(layout)
        expected, dtype = (
            (he.upload_bytes(values), pb.DTYPE_BFV)
            if he is not None
            else (4 * values, pb.DTYPE_MASKED)
        )
        try:
            upload = CipherUpload(
                result.payload, expected, layout.layout_id, self.config.max_chunk_bytes, dtype
            )
        except wire.WireError as error:
            raise ProtocolViolation(INVALID, f"task {task.task_id!r}: {error}") from None
        await self._take_upload_slot(session)
        if session.take_grant(result.task_id):
            session.send(controller_message(grant=pb.UploadGrant(task_id=result.task_id)))
        session.pending = PendingUpload(task, result, upload)
        if upload.done:
            await self._upload_complete(session)

    def _answer_closed_task(
        self, session: Session, result: pb.TaskResult, reason: str | None
    ) -> None:
        """A result for a task this learner no longer holds: explain, and skip its chunks."""
        if reason is None:
            raise ProtocolViolation(
                INVALID,
                f"unknown task id {result.task_id!r}: "
                "this controller never assigned it to this learner",
            )
        self._skip_chunks(session, result)
        code = pb.ERROR_CODE_DUPLICATE if reason == RESULT_RECEIVED else pb.ERROR_CODE_STALE_TASK
        message = f"task {result.task_id!r} is closed ({reason}); result discarded"
        if self._limiter.allow(session.learner_id, "result_discarded"):
            log.info(
                "result_discarded",
                learner_id=short_id(session.learner_id),
                task_id=result.task_id,
                reason=reason,
            )
        session.send_error(code, message, result.task_id)

    @staticmethod
    def _skip_chunks(session: Session, result: pb.TaskResult) -> None:
        if session.take_grant(result.task_id):
            return  # it waits for a grant that will not come: it sends no chunks
        session.discard_chunks = int(result.payload.num_chunks)
        session.discard_payload_id = int(result.payload.payload_id)

    async def _on_chunk(self, session: Session, raw: bytes, chunk: tuple[int, int, int]) -> None:
        payload_id, _, nbytes = chunk
        if session.discard_chunks and payload_id == session.discard_payload_id:
            session.discard_chunks -= 1
            return
        upload = session.pending.upload if session.pending is not None else None
        if upload is None:
            upload = session.initial_upload
        if upload is None:
            raise ProtocolViolation(
                INVALID, f"chunk of payload {payload_id} arrived with no payload announced"
            )
        try:
            if nbytes >= OFF_LOOP_CHUNK_BYTES:  # copy and check in a worker, GIL released
                loop = asyncio.get_running_loop()
                done = await loop.run_in_executor(self._pool, upload.add, raw)
            else:
                done = upload.add(raw)
        except wire.WireError as error:
            what = (
                "initial model" if session.pending is None else repr(session.pending.task.task_id)
            )
            raise ProtocolViolation(INVALID, f"{what}: {error}") from None
        if not done:
            return
        if session.pending is not None:
            await self._upload_complete(session)
        else:
            await self._initial_model_complete(session)

    async def _take_upload_slot(self, session: Session) -> None:
        """Wait for an upload slot (not reading the stream meanwhile).

        Slots bound the uploads being reassembled at once: `upload_buffer_bytes` worth of
        model-sized uploads, and never fewer than `max_uploads_in_flight`.
        """
        if self._slots is None:
            per_upload = max(self.store.nbytes, 1)
            budget = self.config.upload_buffer_bytes // per_upload
            self._slots = asyncio.Semaphore(max(self.config.max_uploads_in_flight, budget))
        session.waiting_for_slot = True
        try:
            await self._slots.acquire()
        finally:
            session.waiting_for_slot = False
            session.last_seen = asyncio.get_running_loop().time()  # we were not reading it
        session.holds_slot = True

    def release_upload_slot(self, session: Session) -> None:
        if session.holds_slot and self._slots is not None:
            session.holds_slot = False
            self._slots.release()

    async def _upload_complete(self, session: Session) -> None:
        pending = session.pending
        assert pending is not None
        session.pending = None
        result = pending.result
        report = UpdateReport(
            task_id=pending.task.task_id,
            base_version=int(result.base_version),
            num_examples=int(result.num_examples),
            completed_steps=int(result.completed_steps),
            train_seconds=float(result.train_seconds),
            seconds_per_batch=float(result.seconds_per_batch),
            seconds_per_epoch=float(result.seconds_per_epoch),
            metrics={k: float(v) for k, v in result.metrics.items()},
        )
        # Every value was checked chunk by chunk on arrival. The slot is held until the core has
        # taken the update: released earlier, uploads of every stream would queue for the core
        # thread, each holding its model-sized messages (100 x 4 MB took 700 MB of RSS).
        try:
            update = pending.upload.take()
            if isinstance(update, bytes) and self.config.he is not None:  # ciphertexts: checked
                await self._check_ciphertexts(pending.task, update)
            await self.link.update_arrived(session.learner_id, report, update)
        finally:
            self.release_upload_slot(session)

    async def _check_ciphertexts(self, task: Task, data: bytes) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._pool, check_ciphertexts, self.config.he, data)
        except EncryptionError as error:
            raise ProtocolViolation(INVALID, f"task {task.task_id!r}: {error}") from None

    async def _on_learner_error(self, session: Session, error: pb.Error) -> None:
        if self._limiter.allow(session.learner_id, "learner_error"):
            log.warning(
                "learner_error",
                learner_id=short_id(session.learner_id),
                task_id=error.task_id,
                message=error.message[:256],
                suppressed=self._limiter.suppressed(session.learner_id, "learner_error"),
            )
        if session.asked_for_model and not self.link.ready and not error.task_id:
            await self.link.initial_model_refused(session.learner_id, error.message)
            return
        await self.link.task_failed(session.learner_id, error.task_id, error.message)

    # ------------------------------------------------------------------------------ first model

    def check_model_size(self, nbytes: int) -> None:
        if nbytes > self.config.max_model_bytes:
            raise ProtocolViolation(
                INVALID,
                f"model of {nbytes} bytes exceeds the controller's limit "
                f"max_model_bytes={self.config.max_model_bytes}",
            )

    def _on_initial_layout(self, session: Session, layout: pb.ModelLayout) -> None:
        # A learner that was asked may still answer after the core chose another provider (one
        # asked by another ingest worker): its model is received, bounded by max_model_bytes,
        # and dropped if another arrived first. One that was never asked breaks the contract.
        if not session.asked_for_model:
            raise ProtocolViolation(INVALID, "the controller did not ask this learner for a model")
        check_layout(layout)
        self.check_model_size(int(layout.total_bytes))
        session.initial_layout = layout
        session.initial_upload = None

    def _on_initial_model(self, session: Session, initial: pb.InitialModel) -> None:
        layout = session.initial_layout
        if not session.asked_for_model or layout is None:
            raise ProtocolViolation(INVALID, "initial model sent before its layout")
        try:
            session.initial_upload = wire.Upload(
                initial.payload,
                int(layout.total_bytes),
                layout.layout_id,
                self.config.max_chunk_bytes,
                in_place=False,  # the first model becomes the model: one buffer of its own
            )
        except wire.WireError as error:
            raise ProtocolViolation(INVALID, f"initial model: {error}") from None

    async def _initial_model_complete(self, session: Session) -> None:
        upload, layout = session.initial_upload, session.initial_layout
        assert upload is not None
        assert layout is not None
        session.initial_upload = session.initial_layout = None
        session.asked_for_model = False  # one answer per ask
        flat = upload.take()  # every value already checked, chunk by chunk
        assert isinstance(flat, np.ndarray)
        if self.link.ready:
            return  # another learner's model arrived first
        await self.link.initialize_model(layout, flat, session.learner_id)


def _accepted(session: Session) -> frozenset[int]:
    """Upload dtypes this session may use: its negotiated codec, and float32 (a learner falls
    back to float32 when a value does not fit the codec)."""
    return frozenset((pb.DTYPE_FLOAT32, session.upload_dtype))


def parse_learner_message(raw: bytes) -> pb.LearnerMessage:
    msg = pb.LearnerMessage()
    try:
        msg.ParseFromString(raw)
    except Exception as error:  # protobuf raises DecodeError (a Message.Error subclass)
        raise ProtocolViolation(INVALID, f"could not parse LearnerMessage: {error}") from None
    return msg


def check_layout(layout: pb.ModelLayout) -> None:
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


def _resent_task(learner_id: str, result: pb.TaskResult, upload_delta: bool) -> Task:
    """The task a resent update answers, as far as its checks go (its own was issued by an
    earlier controller start): training from the version it names, in the kind the policy takes
    now. The core decides whether the update is used."""
    return Task(
        task_id=result.task_id,
        learner_id=learner_id,
        kind=TaskKind.TRAIN,
        version=int(result.base_version),
        upload_delta=upload_delta,
    )
