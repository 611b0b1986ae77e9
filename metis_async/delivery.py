"""The gRPC driver's side of the federation core: one core thread, effects onto streams.

`CoreRunner` runs every call into the `FederationCore` on one dedicated thread, so O(model) work
(folding updates, committing, encoding a new version) never runs on the event loop, and calls
are serialized: the core stays single-threaded and deterministic. The effects of each call are
handed back to the loop with `call_soon_threadsafe` before the call's future resolves, so they
are carried out on the loop in exactly the order the core produced them.

`EffectDelivery` carries effects out on the loop: it turns each into serialized
`ControllerMessage` bytes on the addressed sessions' bounded queues (never blocking), publishes
new versions to the `ModelStore`, and runs the commit hook off the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import inspect
import os
import threading
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
import structlog

from metis_async import wire
from metis_async.checkpoints import CheckpointError
from metis_async.effects import (
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
from metis_async.federation import FederationCore
from metis_async.protocols import Task, TaskKind
from metis_async.secure.aggregate import HomomorphicAggregation
from metis_async.secure.relay import DecryptionRelay
from metis_async.session import BundleParts, Outgoing, Session, controller_message
from metis_async.store import EncodedVersion, ModelStore
from metis_async.v1 import controller_pb2 as pb

log = structlog.get_logger("metis_async.server")

T = TypeVar("T")
CoreCall = tuple[Callable[..., list["Effect"]], tuple[Any, ...]]
"""A core method and its arguments."""
CommitHook = Callable[[int, list[npt.NDArray[np.generic]]], Awaitable[None] | None]

_NOTICE_CODES = {Notice.STALE: pb.ERROR_CODE_STALE_TASK, Notice.DUPLICATE: pb.ERROR_CODE_DUPLICATE}
PROTO_STATES = {
    FederationState.WAITING_FOR_MODEL: pb.FEDERATION_STATE_WAITING_FOR_MODEL,
    FederationState.WAITING_FOR_LEARNERS: pb.FEDERATION_STATE_WAITING_FOR_LEARNERS,
    FederationState.TRAINING: pb.FEDERATION_STATE_TRAINING,
    FederationState.FINISHED: pb.FEDERATION_STATE_FINISHED,
    FederationState.DRAINING: pb.FEDERATION_STATE_DRAINING,
}
"""The wire value of each federation state."""
DRAIN_RETRY_SECONDS = 5.0
"""How long draining learners are asked to wait before they reconnect (seconds)."""


BULK_NICE = 10
"""Nice value of the threads doing bulk byte work (core, ingest, Rust's pool): the event loop
thread keeps the default, so under CPU pressure the scheduler runs the loop first."""


def lower_thread_priority() -> None:
    """Lower the calling thread's CPU priority (Linux: nice is per thread); no-op elsewhere."""
    with contextlib.suppress(AttributeError, OSError):  # not Linux, or not permitted
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BULK_NICE)


def keep_freed_memory() -> None:
    """Ask glibc to serve large blocks from its heap and keep freed memory for reuse.

    Received chunk messages (4 MiB bytes objects, allocated by gRPC on the event loop) live
    until their upload is folded. With glibc's defaults each is a fresh mmap, so every new
    message costs the loop a page fault per 4 KiB; keeping blocks up to 64 MiB in the heap and
    not trimming below 512 MiB lets new messages reuse freed memory. Memory stays bounded by the
    uploads in flight and the fold window. At most 4 malloc arenas (glibc's default is 8 per
    core): gRPC's threads each took one and kept its freed blocks, 35 MB more peak RSS with 100
    learners x 4 MB uploads (0.36 vs 0.32 GB with 4, same run). Arenas already created keep
    theirs, so this runs before gRPC starts. A no-op where glibc is absent.
    """
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        # glibc's mallopt parameter numbers
        m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8
        libc.mallopt(m_mmap_threshold, 64 << 20)
        libc.mallopt(m_trim_threshold, 512 << 20)
        if "MALLOC_ARENA_MAX" not in os.environ:  # an operator's own choice stands
            libc.mallopt(m_arena_max, 4)


def start_bulk_threads(executor: ThreadPoolExecutor) -> None:
    """Start Rust's worker pool from a low-priority thread, so its threads inherit that priority.

    Rust (rayon) creates its workers on first use, and a new thread takes its creator's nice
    value; calling into Rust from `executor`'s (lowered) thread first makes every later parallel
    copy, check and fold run below the event loop.
    """
    from metis_async._core import first_non_finite

    executor.submit(first_non_finite, np.zeros(1 << 16, dtype=np.float32)).result()


class CoreRunner:
    """Runs calls into `core` on one thread; effects are carried out on the loop, in order.

    Args:
        core: the federation core (touched only from the runner's thread after start).
        deliver: carries out a list of effects on the loop.
        reschedule: called on the loop after each call with the core's next wake-up time.
        on_fatal: called on the loop when the core cannot go on (a `CheckpointError`: a commit
            that could not be made durable); every later call raises that error.
    """

    def __init__(
        self,
        core: FederationCore,
        deliver: Callable[[list[Effect]], None],
        reschedule: Callable[[float | None], None],
        on_fatal: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.core = core
        self._deliver = deliver
        self._reschedule = reschedule
        self._on_fatal = on_fatal
        self.failure: CheckpointError | None = None
        self.closed = False
        """True once `close` ran: later batches are dropped (the run is over)."""
        self._thread = ThreadPoolExecutor(
            1, thread_name_prefix="federation-core", initializer=lower_thread_priority
        )
        self._pending: list[tuple[Callable[..., list[Effect]], tuple[Any, ...], Any]] = []

    async def call(self, method: Callable[..., list[Effect]], *args: Any) -> list[Effect]:
        """Run `method(*args)` (a core method returning effects) on the core thread."""
        loop = asyncio.get_running_loop()

        def run() -> list[Effect]:
            if self.failure is not None:
                raise self.failure
            try:
                effects = method(*args)
            except CheckpointError as error:
                self._fail(loop, error)
                raise
            wakeup = self.core.next_wakeup()
            loop.call_soon_threadsafe(self._apply, effects, wakeup)
            return effects

        # Shielded: a stream cancelled while its event waits in the queue (a learner that
        # vanishes) must still have that event reach the core, or the core would never learn
        # that the learner left.
        return await asyncio.shield(loop.run_in_executor(self._thread, run))

    async def call_batched(self, method: Callable[..., list[Effect]], *args: Any) -> None:
        """Like `call`, but the calls made in one loop iteration reach the core in one hop (a
        mass join costs a thread switch per iteration, not per learner). Returns once the
        call's effects are delivered; the call runs even if the caller is cancelled. Calls that
        must stay in order with each other (a learner's join and its loss) all go this way."""
        await self.submit_batched(method, *args)

    def submit_batched(
        self, method: Callable[..., list[Effect]], *args: Any
    ) -> asyncio.Future[None]:
        """Queue a `call_batched` call now, in order with the others; the result is done once
        its effects are delivered (the caller may do other work meanwhile)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        if not self._pending:
            loop.call_soon(self._run_pending)
        self._pending.append((method, args, future))
        return future

    def _run_pending(self) -> None:
        batch, self._pending = self._pending, []
        loop = asyncio.get_running_loop()
        if self.closed:
            for _, _, future in batch:
                future.cancel()
            return

        def run() -> None:
            effects, errors = self._run_calls(loop, [(method, args) for method, args, _ in batch])
            loop.call_soon_threadsafe(self._settle, batch, errors, effects, self.core.next_wakeup())

        done = loop.run_in_executor(self._thread, run)
        done.add_done_callback(_log_core_failure)

    def _run_calls(
        self, loop: asyncio.AbstractEventLoop, calls: list[CoreCall]
    ) -> tuple[list[Effect], list[BaseException | None]]:
        """On the core thread: run `calls` in order; their effects, and each one's error (a
        failing event must not lose the others; after a CheckpointError none runs)."""
        effects: list[Effect] = []
        errors: list[BaseException | None] = []
        for method, args in calls:
            if self.failure is not None:
                errors.append(self.failure)
                continue
            try:
                effects += method(*args)
                errors.append(None)
            except CheckpointError as error:
                self._fail(loop, error)
                errors.append(error)
            except Exception as error:
                errors.append(error)
        return effects, errors

    def _settle(
        self,
        batch: list[tuple[Callable[..., list[Effect]], tuple[Any, ...], Any]],
        errors: list[BaseException | None],
        effects: list[Effect],
        wakeup: float | None,
    ) -> None:
        self._apply(effects, wakeup)
        for (_, _, future), error in zip(batch, errors, strict=True):
            if future.done():  # its caller was cancelled
                continue
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error)

    def submit(self, method: Callable[..., list[Effect]], *args: Any) -> asyncio.Future[Any]:
        """Queue `method(*args)` on the core thread without waiting (calls run in the order
        submitted; a failure is logged)."""
        future = asyncio.ensure_future(self.call(method, *args))
        future.add_done_callback(_log_core_failure)
        return future

    def submit_batch(self, calls: list[CoreCall]) -> None:
        """Run several core calls, in order, in one hop to the core thread; their effects are
        delivered together (an ingest hub's many small events cost one thread switch)."""
        loop = asyncio.get_running_loop()
        if self.closed:
            return  # events read while the controller shuts down have no core left to reach

        def run() -> None:
            effects, errors = self._run_calls(loop, calls)
            for (method, _), error in zip(calls, errors, strict=True):
                if error is not None and not isinstance(error, CheckpointError):
                    log.error("core_call_failed", method=method.__name__, error=repr(error))
            if self.failure is None:
                loop.call_soon_threadsafe(self._apply, effects, self.core.next_wakeup())

        future = loop.run_in_executor(self._thread, run)
        future.add_done_callback(_log_core_failure)

    async def query(self, fn: Callable[[], T]) -> T:
        """Run a read-only `fn` on the core thread (a consistent view of core state)."""
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn)

    def _fail(self, loop: asyncio.AbstractEventLoop, error: CheckpointError) -> None:
        """From the core thread: no further call touches the core (its state may be half a
        commit ahead of what was made durable)."""
        self.failure = error
        if self._on_fatal is not None:
            loop.call_soon_threadsafe(self._on_fatal, error)

    def _apply(self, effects: list[Effect], wakeup: float | None) -> None:
        self._deliver(effects)
        self._reschedule(wakeup)

    def close(self) -> None:
        """Stop the core thread once the calls in flight are done."""
        self.closed = True
        self._thread.shutdown(wait=False, cancel_futures=True)


class EffectDelivery:
    """Carries out the core's effects on the sessions of one controller process.

    Args:
        sessions: the live sessions by learner id (owned by the server).
        store: the published model.
        on_commit: called with each new version and its arrays (in a thread if not async).
        finished: set when the federation finishes.
        on_state: called with the federation's state whenever it changes (health checks).
    """

    def __init__(
        self,
        sessions: Mapping[str, Session],
        store: ModelStore,
        on_commit: CommitHook | None,
        finished: asyncio.Event,
        on_state: Callable[[FederationState], None] | None = None,
    ) -> None:
        self._on_state = on_state
        self._sessions = sessions
        self._store = store
        self._on_commit = on_commit
        self._finished = finished
        self._background: set[asyncio.Task[None]] = set()
        self._staged: list[Session] = []
        # The bundles of this call by their parts' identities (a broadcast's streams share one).
        self._runs: dict[tuple[int, ...], BundleParts] = {}
        self.upload_grant_bytes: int | None = None
        """Models from this size on (bytes) are uploaded on grant by learners announcing
        "grant" (TrainTask.upload_grant); None: never."""
        self.download_receipt_bytes: int | None = None
        """Models from this size on (bytes) are sent with `Model.receipt` to learners
        announcing "receipt" (their chunks wait for ModelReceived); None: never."""
        self.relay: DecryptionRelay | None = None
        """MULTIPARTY KEYS: the committee's decryption shares of each encrypted version."""

    def enable_relay(self, he: HomomorphicAggregation) -> DecryptionRelay:
        """Relay decryption shares for the committee of `he` (multiparty keys)."""
        budget = self._store.max_chunk_bytes
        self.relay = DecryptionRelay(he, self._sessions, self._queue_model, self._out, budget)
        return self.relay

    def __call__(self, effects: list[Effect]) -> None:
        """Carry out `effects` in order (on the event loop; never blocks).

        Messages for a learner that takes bundles are staged and go out at the end, small ones
        bundled into one write (a task with its small model: one write, not three).
        """
        for effect in effects:
            self._one(effect)
        for session in self._staged:
            self._flush(session)
        self._staged.clear()
        self._runs.clear()

    def _out(self, session: Session, *messages: Outgoing) -> bool:
        """Queue `messages` for `session` (staged for bundling where it takes bundles)."""
        if not session.takes_bundles:
            return session.send(*messages)
        if not session.staged:
            self._staged.append(session)
        session.staged.extend(messages)
        return not session.closing.is_set()

    def _flush(self, session: Session) -> None:
        staged, session.staged = session.staged, []
        run: list[bytes] = []
        for message in staged:
            if isinstance(message, bytes) and len(message) <= BUNDLE_ITEM_BYTES:
                run.append(message)
                continue
            self._send_run(session, run)
            run = []
            session.send(message)
        self._send_run(session, run)

    def _send_run(self, session: Session, run: list[bytes]) -> None:
        """Send consecutive small messages: the message itself for one, one bundle for several.

        A broadcast stages the same objects for every stream (the small model's header and
        chunk, the round's task, a status), so every stream with the same parts is queued one
        shared `BundleParts`, joined once from the second such stream on (parts seen once, a
        task of its own, are joined when written). The writes still take their share of the
        bundle budget (`bundle_buffer_bytes`): gRPC copies each message it is given, so the
        budget bounds those copies; at its default a 15,000-stream broadcast of a small model
        fits whole."""
        if len(run) < 2:
            if run:
                session.send(run[0])
            return
        key = tuple(map(id, run))
        parts = self._runs.get(key)
        if parts is None:
            parts = self._runs[key] = BundleParts(run)  # it holds the run: the ids stay its own
        elif parts.joined is None:
            parts.joined = bundle_message(run)
        session.send(parts)

    def _one(self, effect: Effect) -> None:
        if isinstance(effect, SendModel):
            self._send_model(effect)
        elif isinstance(effect, SendTask):
            self._send_task(effect)
        elif isinstance(effect, SendCancel):
            cancel = pb.CancelTask(task_id=effect.task_id, reason=effect.reason)
            self._send(effect.learner_id, controller_message(cancel=cancel))
        elif isinstance(effect, SendNotice):
            session = self._sessions.get(effect.learner_id)
            if session is not None:
                code = _NOTICE_CODES[effect.notice]
                error = pb.Error(code=code, message=effect.message, task_id=effect.task_id)
                self._out(session, controller_message(error=error))
        elif isinstance(effect, SendAck):
            ack = pb.Ack(task_id=effect.task_id, version=effect.version)
            self._send(effect.learner_id, controller_message(ack=ack))
        elif isinstance(effect, SendSecure):
            session = self._sessions.get(effect.learner_id)
            if session is not None:  # in order with the tasks staged for it
                self._out(session, controller_message(secagg=effect.step))
        elif isinstance(effect, SendStatus):
            self._send_status(effect)
        elif isinstance(effect, RequestInitialModel):
            self._request_model(effect.learner_id)
        elif isinstance(effect, VersionCommitted):
            self._publish(effect)
        elif isinstance(effect, Shutdown):
            self._shutdown(effect)
        elif isinstance(effect, FederationFinished):
            self._finished.set()
        elif isinstance(effect, CommitRefused):
            pass  # logged by the core; the policy was told
        else:  # pragma: no cover - the Effect union is closed
            raise TypeError(f"unknown effect {effect!r}")

    def _send(self, learner_id: str, message: bytes) -> None:
        session = self._sessions.get(learner_id)
        if session is not None:
            self._out(session, message)

    def _send_task(self, effect: SendTask) -> None:
        session = self._sessions.get(effect.task.learner_id)
        if session is None:
            return
        if not session.has_layout:  # a learner holding the model still gets the layout once
            session.has_layout = self._out(session, self._store.layout_message)
        task = effect.task
        threshold = self.upload_grant_bytes
        grant = (
            threshold is not None
            and task.kind is TaskKind.TRAIN
            and "grant" in session.capabilities
            and self._store.nbytes >= threshold
        )
        if grant:
            session.expect_grant(task.task_id)
        self._out(session, task_message(task, upload_grant=grant))

    def _send_model(self, effect: SendModel) -> None:
        session = self._sessions.get(effect.learner_id)
        if session is None:
            return
        if self._store.version != effect.version:  # effects run in core order: cannot happen
            log.error("model_out_of_order", wanted=effect.version, published=self._store.version)
            return
        if session.model_sent == effect.version:
            return  # sent already (a committee member gets every encrypted version at once)
        self._queue_model(session)

    def _queue_model(self, session: Session) -> None:
        """Queue the published version for `session` (and its decryption shares, if any)."""
        if not session.has_layout:
            session.has_layout = self._out(session, self._store.layout_message)
        session.model_sent = self._store.version
        store, threshold = self._store, self.download_receipt_bytes
        receipt = threshold is not None and session.ledger is not None and store.nbytes >= threshold
        if receipt or store.nbytes > BUNDLE_ITEM_BYTES:  # its chunks go alone anyway
            self._out(session, store.download(session.download_dtype, receipt))
        else:  # header and chunk may share a bundle with the task
            self._out(session, *store.broadcast(session.download_dtype))
        if self.relay is not None and store.encrypted:
            self.relay.model_sent(session, store.version)

    def _send_status(self, effect: SendStatus) -> None:
        status = pb.Status(
            state=PROTO_STATES[effect.state],
            learners_connected=effect.learners_connected,
            learners_needed=effect.learners_needed,
            message=effect.message,
        )
        message = controller_message(status=status)
        if effect.learner_id is not None:
            self._send(effect.learner_id, message)
            return
        if self._on_state is not None:
            self._on_state(effect.state)
        for session in self._sessions.values():
            self._out(session, message)

    def _request_model(self, learner_id: str) -> None:
        session = self._sessions.get(learner_id)
        if session is None or session.asked_for_model:
            return  # its Welcome already asked
        session.asked_for_model = True
        status = pb.Status(
            state=pb.FEDERATION_STATE_WAITING_FOR_MODEL,
            message="send the initial model",
            need_initial_model=True,
        )
        self._out(session, controller_message(status=status))

    def _publish(self, effect: VersionCommitted) -> None:
        encoded = effect.published
        if not isinstance(encoded, EncodedVersion):
            raise TypeError("the controller's publish hook must produce an EncodedVersion")
        record, layout = effect.record, encoded.layout
        store = self._store
        store.publish(layout, record.version, effect.model, encoded.messages, encoded.codecs)
        if self.relay is not None and store.encrypted:
            he = self.relay.he
            values = wire.num_parameters(layout)
            self.relay.published(record.version, he.settings.ciphertexts_for(values))
        if self._on_commit is not None and record.version > 0:
            self._spawn(self._run_commit_hook(record.version, effect.model, layout))

    async def _run_commit_hook(
        self, version: int, model: wire.ModelVector, layout: pb.ModelLayout
    ) -> None:
        hook = self._on_commit
        if hook is None or version != self._store.version:
            return  # a newer version already replaced it
        if model.dtype == np.uint8:  # an encrypted version: the hook gets its bytes as they are
            params: list[npt.NDArray[np.generic]] = [model]
        else:  # the copy into per-tensor arrays is O(model): off the loop
            flat = wire.plain(model)
            params = await asyncio.to_thread(
                lambda: [np.array(a) for a in wire.unflatten(flat, layout)]
            )
        if inspect.iscoroutinefunction(hook):
            await hook(version, params)
        else:
            await asyncio.to_thread(hook, version, params)

    def _shutdown(self, effect: Shutdown) -> None:
        kind = pb.SHUTDOWN_KIND_FINISHED if effect.finished else pb.SHUTDOWN_KIND_DRAINING
        shutdown = pb.Shutdown(
            reason=effect.reason,
            final_version=effect.final_version,
            kind=kind,
            retry_after_seconds=0.0 if effect.finished else DRAIN_RETRY_SECONDS,
        )
        message = controller_message(shutdown=shutdown)
        if effect.learner_id is None and self._on_state is not None:
            done = FederationState.FINISHED if effect.finished else FederationState.DRAINING
            self._on_state(done)
        targets = (
            list(self._sessions.values())
            if effect.learner_id is None
            else [s for s in (self._sessions.get(effect.learner_id),) if s is not None]
        )
        for session in targets:
            if self.relay is not None and self.relay.hold_shutdown(session, message):
                continue  # it ends once the committee's shares of the final version are out
            self._out(session, message)
            self._flush(session)  # everything before the shutdown goes out before the end
            session.finish()

    def _spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def close(self) -> None:
        """Cancel background work (the controller is going away)."""
        for task in list(self._background):
            task.cancel()


BUNDLE_ITEM_BYTES = 64 * 1024
"""Messages up to this size are bundled (`ControllerMessage.bundle`); larger ones (chunks of
big models) go alone, so a bundle never copies much."""


_BUNDLE_FIELD = pb.ControllerMessage.DESCRIPTOR.fields_by_name["bundle"].number
_MESSAGES_FIELD = pb.Bundle.DESCRIPTOR.fields_by_name["messages"].number


def _varint(value: int) -> bytes:
    if value < 0x80:
        return _SMALL_VARINTS[value]
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_SMALL_VARINTS = [bytes((value,)) for value in range(0x80)]
_BUNDLE_TAG = _varint(_BUNDLE_FIELD << 3 | 2)
_MESSAGES_TAG = _varint(_MESSAGES_FIELD << 3 | 2)


def bundle_message(messages: list[bytes]) -> bytes:
    """`ControllerMessage(bundle=Bundle(messages=...))` serialized by joining bytes: the same
    bytes protobuf writes, without building (and copying into) message objects per stream.
    Written once per stream per broadcast, so it joins once and computes little."""
    tag, length = _MESSAGES_TAG, _varint
    inner = sum(len(message) for message in messages)
    lengths = [length(len(message)) for message in messages]
    inner += len(messages) + sum(len(prefix) for prefix in lengths)
    parts = [_BUNDLE_TAG, length(inner)]
    for prefix, message in zip(lengths, messages, strict=True):
        parts += (tag, prefix, message)
    return b"".join(parts)


def _log_core_failure(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("core_call_failed", error=repr(future.exception()))


def task_message(task: Task, upload_grant: bool = False) -> bytes:
    """The serialized `ControllerMessage` carrying `task` (`upload_grant`: the learner waits
    for UploadGrant before sending the result's chunks).

    A round gives every learner a train task that differs only in its id, so the rest of the
    `TrainTask` is serialized once (`_TrainTemplate`) and each task is its id's field joined
    to it: the bytes protobuf writes (the id is field 1, written first), ~5x cheaper, which a
    broadcast to thousands of streams pays once per stream."""
    if task.kind is TaskKind.TRAIN:
        template = _TRAIN_TEMPLATE[0]
        if template is None or not template.fits(task, upload_grant):
            template = _TRAIN_TEMPLATE[0] = _TrainTemplate(task, upload_grant)
        return template.message(task.task_id)
    batch = task.settings.batch_size if task.settings is not None else 0
    key = (task.task_id, task.version, batch)
    last_key, last = _EVALUATE_LAST[0]
    if key != last_key:  # a round's evaluations share their id: the same object for each
        evaluate = pb.EvaluateTask(
            task_id=task.task_id, model_version=task.version, batch_size=batch
        )
        last = controller_message(evaluate=evaluate)
        _EVALUATE_LAST[0] = (key, last)
    return last


_EVALUATE_LAST: list[tuple[tuple[str, int, int], bytes]] = [(("", -1, -1), b"")]
"""The last evaluation task message and what it was made of (one loop thread uses it)."""


class _TrainTemplate:
    """A `TrainTask` without its id, serialized, for the tasks that share everything else."""

    __slots__ = (
        "budget",
        "deadline",
        "delta",
        "grant",
        "last",
        "rest",
        "settings",
        "version",
    )

    def __init__(self, task: Task, upload_grant: bool) -> None:
        self.settings = task.settings
        self.version = task.version
        self.deadline = task.deadline_seconds
        self.delta = task.upload_delta
        self.budget = task.time_budget_seconds
        self.grant = upload_grant
        s = task.settings
        if s is None:
            raise ValueError(f"train task {task.task_id!r} has no settings")
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
            model_version=task.version,
            config=config,
            deadline_seconds=task.deadline_seconds,
            upload_delta=task.upload_delta,
            upload_grant=upload_grant,
        )
        self.rest = train.SerializeToString()
        self.last: tuple[str, bytes] = ("", b"")  # the last task id and its message

    def fits(self, task: Task, upload_grant: bool) -> bool:
        """Whether `task` differs from the template's tasks in its id only (the settings object
        itself: settings are frozen, and an equal copy merely makes a new template)."""
        return (
            task.settings is self.settings
            and task.version == self.version
            and task.deadline_seconds == self.deadline
            and task.upload_delta == self.delta
            and task.time_budget_seconds == self.budget
            and upload_grant == self.grant
        )

    def message(self, task_id: str) -> bytes:
        """The serialized `ControllerMessage(train=TrainTask(task_id=task_id, ...))`: the same
        object again for the same id (a round's train tasks share their wire id, so every
        stream of a broadcast is written the same bytes)."""
        last_id, last = self.last
        if task_id == last_id:
            return last
        tid = task_id.encode()
        inner = b"".join((_TASK_ID_TAG, _varint(len(tid)), tid, self.rest))
        message = b"".join((_TRAIN_TAG, _varint(len(inner)), inner))
        self.last = (task_id, message)
        return message


_TRAIN_TAG = _varint(pb.ControllerMessage.DESCRIPTOR.fields_by_name["train"].number << 3 | 2)
_TASK_ID_TAG = _varint(pb.TrainTask.DESCRIPTOR.fields_by_name["task_id"].number << 3 | 2)
_TRAIN_TEMPLATE: list[_TrainTemplate | None] = [None]
"""The last template made (one loop thread uses it: a list, so `task_message` can replace it)."""


def health_of(state: FederationState) -> tuple[bool, bool]:
    """(takes learners, trains) in federation state `state`, for health checks."""
    accepting = state not in (FederationState.DRAINING, FederationState.FINISHED)
    return accepting, state is FederationState.TRAINING
