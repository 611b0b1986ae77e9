"""Learner streams: the gRPC `Join` service, from hello to close, in front of a `CoreLink`.

`StreamServer` owns the transport side of a controller process: the grpc.aio server, one
`Session` per stream, the hello checks (id length, example count, token), the stream's reader
(every message after hello goes to `Ingest`) and writer (the session's bounded queue), and the
reaper of silent learners. It holds no federation state: everything the federation needs goes
through the `CoreLink`, so the same class serves learners in a single-process controller
(`server.Controller`, a `LocalLink`) and in each ingest worker process (`workers.worker`, a
link over the worker's channel to the core's process).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import itertools
import uuid
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from metis_async.auth import AuthError
from metis_async.budget import ByteBudget, ReceiptLedger
from metis_async.deadlines import WaitDeadlines
from metis_async.delivery import PROTO_STATES, bundle_message
from metis_async.ingest import Ingest, parse_learner_message
from metis_async.learners import DEFAULT_CAPABILITIES
from metis_async.links import CoreLink
from metis_async.session import (
    EMPTY,
    BundleParts,
    ProtocolViolation,
    Session,
    controller_message,
)
from metis_async.store import ModelDownload
from metis_async.telemetry import ControllerStats, LogLimiter, short_id
from metis_async.v1 import controller_pb2 as pb

if TYPE_CHECKING:
    from metis_async.secure.relay import DecryptionRelay
    from metis_async.server import ControllerConfig

CODECS = {
    "float32": pb.DTYPE_FLOAT32,
    "float16": pb.DTYPE_FLOAT16,
    "bfloat16": pb.DTYPE_BFLOAT16,
    "int8": pb.DTYPE_INT8,
}
"""Payload codecs by their settings name."""

log = structlog.get_logger("metis_async.server")

INVALID = grpc.StatusCode.INVALID_ARGUMENT
SERVICE = "metis_async.v1.Controller"
FEDERATION = "metis_async.v1.Federation"
"""Health-check name that is SERVING only while the federation trains (readiness)."""
LARGE_MESSAGE_BYTES = 64 * 1024
"""Messages from this size on (model chunks) are written within `download_buffer_bytes`."""
BUNDLE_WRITE_SECONDS = 2.0
"""A bundle write holds its share of `bundle_buffer_bytes` this long at most: writes to learners
that stop reading never complete, and must not keep the budget from everyone else."""


class StreamServer:
    """The learner-facing gRPC service of one controller process (see the module docstring).

    Args:
        config: the controller's settings (`server.ControllerConfig`).
        link: the federation core, local or in another process.
        ingest: handles every message after hello.
        stats: counters to update.
        limiter: rate limit of repeated log lines per learner.
        sessions: the live sessions by learner id (shared with the effect delivery).
    """

    def __init__(
        self,
        config: ControllerConfig,
        link: CoreLink,
        ingest: Ingest,
        stats: ControllerStats,
        limiter: LogLimiter,
        sessions: dict[str, Session],
    ) -> None:
        self.config = config
        self.link = link
        self.sessions = sessions
        self.stats = stats
        self._ingest = ingest
        self._limiter = limiter
        self.relay: DecryptionRelay | None = None  # multiparty keys: members' shares
        self._asked: str | None = None  # the learner asked for the first model in its Welcome
        # gRPC copies each message it is given. This bounds the copies being handed over at
        # once; gRPC completes a write once the copy is queued in its transport, so each stream
        # can still hold one more until its learner reads it (benches/README.md).
        self._sending = ByteBudget(config.download_buffer_bytes)
        # Bundles joined for writes in flight (their parts stay shared until then).
        self._bundling = ByteBudget(config.bundle_buffer_bytes)
        # Session ids (informational, new for every stream): a random prefix per process and a
        # counter, so a join costs no system call for randomness (uuid4 did, ~10 us each).
        self._session_prefix = uuid.uuid4().hex[:12]
        self._session_numbers = itertools.count(1)
        self._server: grpc.aio.Server | None = None
        self._reaper: asyncio.Task[None] | None = None
        self._hellos = WaitDeadlines(config.hello_timeout_seconds)
        self.port = 0
        # The standard gRPC health service on the learners' port: "" and SERVICE are SERVING
        # while the controller takes learners; FEDERATION only while the federation trains.
        self.health = HealthServicer()
        self._health_updates: set[asyncio.Task[None]] = set()

    async def start(self, reuse_port: bool = False) -> int:
        """Bind and start serving; returns the bound port.

        `reuse_port` lets several processes bind the same port (SO_REUSEPORT): the kernel then
        spreads new connections over them.
        """
        options = self.config.grpc_options()
        options.append(("grpc.so_reuseport", 1 if reuse_port else 0))
        server = grpc.aio.server(options=options)
        handler = grpc.stream_stream_rpc_method_handler(self._join)  # raw bytes both ways
        service = grpc.method_handlers_generic_handler(SERVICE, {"Join": handler})
        server.add_generic_rpc_handlers((service,))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        address = f"{self.config.host}:{self.config.port}"
        credentials = self.config.server_credentials()

        def bind(where: str) -> int:
            if credentials is None:
                return int(server.add_insecure_port(where))
            return int(server.add_secure_port(where, credentials))

        self.port = bind(address)
        if self.port == 0:
            raise OSError(f"could not bind {address}")
        for host in self.config.extra_hosts:
            if bind(f"{host}:{self.port}") != self.port:
                raise OSError(f"could not bind {host}:{self.port}")
        await self.health.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
        await self.health.set(FEDERATION, health_pb2.HealthCheckResponse.NOT_SERVING)
        await server.start()
        self._server = server
        self._reaper = asyncio.create_task(self._reap_silent_learners())
        return self.port

    def finish_all(self) -> None:
        """End every stream once what is queued has been written."""
        for session in list(self.sessions.values()):
            session.finish()

    def set_health(self, accepting: bool, training: bool) -> None:
        """Health as the federation's state changes (on the loop)."""
        serving = health_pb2.HealthCheckResponse.SERVING
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        for name, up in (("", accepting), (SERVICE, accepting), (FEDERATION, training)):
            task = asyncio.ensure_future(self.health.set(name, serving if up else not_serving))
            self._health_updates.add(task)
            task.add_done_callback(self._health_updates.discard)

    async def stop(self, grace_seconds: float) -> None:
        """Close the server; streams get `grace_seconds` to finish."""
        await self.health.enter_graceful_shutdown()
        if self._reaper is not None:
            self._reaper.cancel()
        self._hellos.close()
        if self._server is not None:
            await self._server.stop(grace_seconds)

    def close_session(
        self, learner_id: str, session_id: str, code: grpc.StatusCode, why: str
    ) -> None:
        """End `learner_id`'s stream if it is still session `session_id` (or any, if empty)."""
        session = self.sessions.get(learner_id)
        if session is not None and session_id in ("", session.session_id):
            session.close(code, why)

    # ------------------------------------------------------------------------------ streams

    async def _join(self, _requests: object, context: grpc.aio.ServicerContext) -> None:
        """Serve one learner stream from hello to close.

        The stream is read in this handler's own task, which also writes the Welcome. Later
        messages are written by a writer task that exists only while the stream's queue holds
        something (`_writer`): an idle stream costs one task, as on a bare server, not a
        writer waiting on an empty queue as before.
        When the session closes, or a writer ends the stream (finished or failed), the handler
        is woken out of its read by a cancellation it asked for itself, and ends the stream.
        """
        session, joined = await self._open_session(context)
        handler = asyncio.current_task()
        assert handler is not None
        stream = _StreamTasks(self, session, context, handler)
        session.on_close = stream.wake
        try:
            try:
                # The Welcome, queued first, goes out from this task; what the core sent while
                # the learner joined (a model may wait for receipts this task reads) goes to a
                # writer.
                welcome = session.queue.pop()
                if isinstance(welcome, bytes):  # EMPTY only if the session closed already
                    await self._write(session, context, welcome)
                # The core took the join meanwhile (it was sent before the Welcome's write, so
                # a learner is welcomed without waiting for the core's thread); what the core
                # sent it is queued behind the Welcome.
                await joined
                if self.relay is not None:
                    self.relay.member_joined(session)
                if not session.closing.is_set():
                    session.wake_writer = stream.start_writer
                    if session.queue.qsize():
                        stream.start_writer()
                    stream.reading = True
                    await self._read_loop(session, context)
            except asyncio.CancelledError:
                if not stream.woken:
                    raise  # the server stops or the call was cancelled: not ours to swallow
                uncancel = getattr(handler, "uncancel", None)  # Python >= 3.11
                if uncancel is not None:
                    uncancel()
            except Exception as error:
                self._close_on_error(session, error)
            finally:
                stream.reading = False
                session.wake_writer = None
            await _quiesce(session)
            if session.close_code is not None:
                await context.abort(session.close_code, session.close_message)
        finally:
            joined.add_done_callback(_retrieve)  # not awaited if the Welcome's write failed
            session.on_close = None
            session.wake_writer = None
            if session.writer is not None:
                session.writer.cancel()
            if session.ledger is not None:
                session.ledger.release_all()
            await self._close_session(session)

    def _close_on_error(self, session: Session, error: BaseException | None) -> None:
        if isinstance(error, ProtocolViolation):
            self.stats.protocol_errors_total += 1
            if self._limiter.allow(session.learner_id, "protocol_violation"):
                log.warning(
                    "protocol_violation",
                    learner_id=short_id(session.learner_id),
                    code=error.code.name,
                    message=error.message,
                    suppressed=self._limiter.suppressed(session.learner_id, "protocol_violation"),
                )
            session.close(error.code, error.message)
        elif error is not None:
            log.error("session_failed", learner_id=short_id(session.learner_id), error=repr(error))
            session.close(grpc.StatusCode.INTERNAL, "internal error in the controller")

    async def _open_session(
        self, context: grpc.aio.ServicerContext
    ) -> tuple[Session, asyncio.Future[None]]:
        """Read and check the hello, register the session with its Welcome queued, and send
        the join to the core (done once the core took it)."""
        hello = await self._read_hello(context)
        learner_id = hello.learner_id or f"learner-{uuid.uuid4().hex[:12]}"
        await self._check_hello(hello, learner_id, context)
        capabilities = capability_set(hello.capabilities)
        if self.config.he is not None and "he" not in capabilities:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "this federation aggregates under homomorphic encryption: a learner must "
                "announce the 'he' capability and hold the federation's key pair",
            )
        if self.config.secagg and "secagg" not in capabilities:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "this federation runs SecAgg+ rounds: a learner must announce the 'secagg' "
                "capability",
            )
        session = Session(
            learner_id,
            f"{self._session_prefix}-{next(self._session_numbers):x}",
            asyncio.get_running_loop().time(),
            self.config.send_queue_limit,
            capabilities,
            peer=context.peer(),
        )
        if "receipt" in capabilities:
            session.ledger = ReceiptLedger(self._sending)
        old = self.sessions.get(learner_id)
        limit = self.config.max_learners
        if limit and old is None and len(self.sessions) >= limit:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the controller holds its maximum of {limit} learners; retry later",
            )
        if old is not None:
            old.close(grpc.StatusCode.ALREADY_EXISTS, "replaced by a newer session")
            await self._close_session(old)
        self.sessions[learner_id] = session
        self.stats.sessions_opened_total += 1
        offered = set(hello.codecs)
        for direction in ("upload", "download"):
            wanted = CODECS[getattr(self.config, f"{direction}_codec")]
            chosen = wanted if wanted in offered else pb.DTYPE_FLOAT32
            setattr(session, f"{direction}_dtype", chosen)
        link = self.link
        # One learner of this process is asked in its Welcome at a time: the core names the
        # provider a moment later, and asks the next one itself if that one fails.
        asked = self._asked
        if asked is not None and (link.ready or asked not in self.sessions):
            asked = self._asked = None
        need_model = not link.ready and link.provider is None and asked is None
        if need_model:
            self._asked = learner_id
        session.asked_for_model = need_model
        state, connected, needed = link.federation_status
        welcome = pb.Welcome(
            state=PROTO_STATES[state] if state is not None else pb.FEDERATION_STATE_UNSPECIFIED,
            learners_connected=connected,
            learners_needed=needed,
            learner_id=learner_id,
            session_id=session.session_id,
            heartbeat_interval_seconds=self.config.heartbeat_interval_seconds,
            max_chunk_bytes=self.config.max_chunk_bytes,
            protocol=link.protocol,
            need_initial_model=need_model,
            run_id=link.run_id,
            max_model_bytes=self.config.max_model_bytes,
            upload_dtype=session.upload_dtype,  # type: ignore[arg-type]
            download_dtype=session.download_dtype,  # type: ignore[arg-type]
        )
        if self.config.he is not None:
            welcome.he.CopyFrom(self.config.he.message(learner_id))
        welcome.secagg = self.config.secagg
        session.send(controller_message(welcome=welcome))
        log.info(
            "learner_joined",
            learner_id=short_id(learner_id),
            peer=session.peer,
            num_examples=int(hello.num_examples),
            sessions=len(self.sessions),
        )
        held = None
        if hello.holds_model:
            held = (hello.held_run_id, int(hello.held_version), int(hello.held_layout_id))
        joined = link.learner_joined(
            learner_id, session.session_id, int(hello.num_examples), capabilities, held
        )
        return session, joined

    async def _check_hello(
        self, hello: pb.Hello, learner_id: str, context: grpc.aio.ServicerContext
    ) -> None:
        limit = self.config.max_learner_id_length
        if len(learner_id.encode()) > limit:
            await context.abort(INVALID, f"learner_id is longer than {limit} bytes")
        if hello.num_examples > self.config.max_num_examples:
            await context.abort(
                INVALID,
                f"num_examples {hello.num_examples} exceeds the controller's limit "
                f"{self.config.max_num_examples}",
            )
        try:
            if learner_id in self.config.revoked:  # also without credentials (ids asserted)
                raise AuthError("this learner's credentials are revoked", denied=True)
            verifier = self.config.verifier()
            if verifier is not None:
                verifier.check(learner_id, hello.token)
            if self.config.tls_client_ca is not None:
                _check_certificate(context, learner_id)
        except AuthError as error:
            self.stats.auth_refused_total += 1
            if self._limiter.allow(learner_id, "auth_refused"):
                log.warning(
                    "auth_refused", learner_id=short_id(learner_id), reason=str(error)
                )  # never the token itself
            code = (
                grpc.StatusCode.PERMISSION_DENIED
                if error.denied
                else grpc.StatusCode.UNAUTHENTICATED
            )
            await context.abort(code, f"{error} (learner {short_id(learner_id)!r})")

    async def _read_hello(self, context: grpc.aio.ServicerContext) -> pb.Hello:
        handler = asyncio.current_task()
        assert handler is not None
        hellos = self._hellos
        hellos.start(handler)  # one timer for every stream's hello, not one each
        try:
            raw = await context.read()
        except asyncio.CancelledError:
            if not hellos.expired(handler):
                raise  # the server stops or the call was cancelled
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "no hello received in time")
            raise
        finally:
            hellos.end(handler)
        if raw is grpc.aio.EOF:
            await context.abort(INVALID, "stream closed before hello")
        try:
            msg = parse_learner_message(raw)
        except ProtocolViolation as error:
            await context.abort(error.code, error.message)
            raise
        kind = msg.WhichOneof("body")
        if kind != "hello":
            await context.abort(INVALID, f"the first message on a stream must be hello, got {kind}")
        return msg.hello

    async def _close_session(self, session: Session) -> None:
        self._ingest.release_upload_slot(session)
        if self.sessions.get(session.learner_id) is not session:
            return
        del self.sessions[session.learner_id]
        reason = session.close_message or "stream ended"
        log.info(
            "learner_left",
            learner_id=short_id(session.learner_id),
            reason=reason,
            sessions=len(self.sessions),
        )
        with contextlib.suppress(RuntimeError):  # the core thread is gone after stop()
            await self.link.learner_lost(session.learner_id, session.session_id, reason)

    async def _writer(self, session: Session, context: grpc.aio.ServicerContext) -> None:
        """A stream's writer task: drains the queue, then ends (the next send starts another)
        or ends the stream, when its end was queued (`Session.finish`) or the session closes."""
        queue = session.queue
        while (item := queue.pop()) is not EMPTY:
            if item is None:
                return
            if isinstance(item, ModelDownload):
                await self._write_model(session, context, item)
            else:
                await self._write(session, context, item)
            if session.closing.is_set():
                return
        session.writer = None  # idle, not ended: `_writer_done` leaves the stream open

    async def _write(
        self, session: Session, context: grpc.aio.ServicerContext, message: bytes | BundleParts
    ) -> None:
        """Hand one message to gRPC, a large one or a bundle within the send budget (a bundle
        is joined once it fits, so only the writes in flight hold joined bytes)."""
        budget, held = self._sending, 0
        give_back: Callable[[], None] | None = None
        try:
            if isinstance(message, BundleParts):
                # At most BUNDLE_WRITE_SECONDS of the bundle budget per write: a learner that
                # stops reading cannot hold the next broadcast back (its bytes stay its own).
                give_back = self._bundling.release_within(
                    await self._bundling.acquire(message.nbytes), BUNDLE_WRITE_SECONDS
                )
                joined = message.joined
                message = bundle_message(message.messages) if joined is None else joined
            elif len(message) >= LARGE_MESSAGE_BYTES:
                held = await budget.acquire(len(message))
            session.writing = True
            await context.write(message)
        finally:
            session.writing = False
            if held:
                budget.release(held)
            if give_back is not None:
                give_back()
        self.stats.bytes_sent_total += len(message)

    async def _write_model(
        self, session: Session, context: grpc.aio.ServicerContext, model: ModelDownload
    ) -> None:
        """A model's header and chunks; with receipts, each chunk's budget share stays held
        until the learner acknowledges it, and at most a window of chunks is unacknowledged."""
        header, *chunks = model.messages
        await self._write(session, context, header)
        ledger = session.ledger if model.receipt else None
        if ledger is None:
            for chunk in chunks:
                await self._write(session, context, chunk)
            return
        loop, budget = asyncio.get_running_loop(), self._sending
        for index, chunk in enumerate(chunks):
            await ledger.room()
            held = await budget.acquire(len(chunk))
            try:
                session.writing = True
                await context.write(chunk)
            except BaseException:
                budget.release(held)
                raise
            finally:
                session.writing = False
            ledger.written(model.version, index, held, loop.time())
            self.stats.bytes_sent_total += len(chunk)

    async def _read_loop(self, session: Session, context: grpc.aio.ServicerContext) -> None:
        loop = asyncio.get_running_loop()
        config = self.config
        rate, burst = config.max_messages_per_second, float(config.message_burst)
        byte_rate = config.max_learner_bytes_per_second
        tokens, byte_debt, last = burst, 0.0, loop.time()
        while (raw := await context.read()) is not grpc.aio.EOF:
            now = loop.time()
            session.last_seen = now
            self.stats.bytes_received_total += len(raw)
            if rate:  # token bucket: `burst` at once, `rate` a second sustained
                tokens = min(burst, tokens + (now - last) * rate) - 1.0
                if tokens < 0.0:
                    self.stats.learners_cut_off_total += 1
                    raise ProtocolViolation(
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"more than {rate:g} messages a second (burst {burst:g})",
                    )
            if byte_rate:  # read no faster than the byte rate: gRPC flow control holds it back
                byte_debt = max(0.0, byte_debt - (now - last) * byte_rate) + len(raw)
                if byte_debt > byte_rate:
                    await asyncio.sleep((byte_debt - byte_rate) / byte_rate)
            last = now
            ledger = session.ledger
            acknowledged = 0 if ledger is None else ledger.acknowledged
            if self._bundling.contended:
                # A broadcast is being written: bundled writes wait for room, so streams are
                # still without their task. Their writes go first; this stream's message waits
                # (its learner is held by flow control meanwhile). Stuck writes give their
                # room back within BUNDLE_WRITE_SECONDS, so the wait is bounded.
                await self._bundling.wait_uncontended()
                if session.closing.is_set():
                    return
            await self._ingest.handle(session, raw)
            if ledger is not None and ledger.acknowledged != acknowledged:
                tokens = min(burst, tokens + 1.0)  # a receipt our own chunks asked for is free
            if session.closing.is_set():
                return  # closed while this message was handled
            # A stream is often quiet for a whole round after an upload: holding its last
            # message (a model-sized chunk) until the next read would cost a model per stream.
            del raw

    async def _reap_silent_learners(self) -> None:
        timeout = self.config.heartbeat_timeout_seconds
        interval = self.config.heartbeat_interval_seconds
        reported = -float("inf")  # loop time of the last "last seen" report
        while True:
            await asyncio.sleep(max(interval / 2, 0.05))
            now = asyncio.get_running_loop().time()
            deadline = now - timeout
            # "Last seen" for people, heartbeats included (the core sees no heartbeats): once a
            # heartbeat interval, and only the streams heard from since the last report. A
            # report of every stream on every sweep took the core thread (and the GIL) ~2 s
            # a minute at 15,000 learners, much of it during broadcasts.
            report = now - reported >= interval * 0.75  # every other sweep, despite jitter
            heard: dict[str, float] = {}  # seconds since each stream's last message
            for session in list(self.sessions.values()):
                if report and session.last_seen > reported:
                    heard[session.learner_id] = now - session.last_seen
                if session.last_seen < deadline and not session.waiting_for_slot:
                    session.close(grpc.StatusCode.UNAVAILABLE, f"no message for {timeout:g} s")
                elif session.ledger is not None and session.ledger.stalled(deadline):
                    session.close(
                        grpc.StatusCode.UNAVAILABLE,
                        f"model chunks unacknowledged for {timeout:g} s (ModelReceived)",
                    )
            if report:
                reported = now
            if heard:
                try:
                    await self.link.learners_heard(heard)
                except Exception as error:  # the core is gone (stopping): reaping goes on
                    log.debug("learners_heard_not_delivered", error=repr(error))


class _StreamTasks:
    """One stream's handler (it reads) and, while the queue holds something, its writer.

    A slotted object whose bound methods are the session's callbacks: closures over the
    handler's locals and their cells took ~0.6 KB a stream.
    """

    __slots__ = ("context", "handler", "reading", "server", "session", "woken")

    def __init__(
        self,
        server: StreamServer,
        session: Session,
        context: grpc.aio.ServicerContext,
        handler: asyncio.Task[object],
    ) -> None:
        self.server = server
        self.session = session
        self.context = context
        self.handler = handler
        self.reading = False  # the handler is in its read loop
        self.woken = False  # the handler was cancelled out of it by `wake`

    def wake(self) -> None:
        """End the stream: cancel the handler out of its read (the session closed, or the
        writer ended the stream)."""
        # Not from inside the handler's own step: its read loop then sees `closing` itself.
        if self.reading and not self.woken and asyncio.current_task() is not self.handler:
            self.woken = True
            self.handler.cancel()

    def start_writer(self) -> None:
        """Start a writer for what the session's queue holds (`Session.wake_writer`)."""
        session = self.session
        writer = session.writer = asyncio.create_task(self.server._writer(session, self.context))
        writer.add_done_callback(self._writer_done)

    def _writer_done(self, writer: asyncio.Task[None]) -> None:
        if not writer.cancelled() and writer.exception() is not None:
            log.debug("stream_write_failed", error=repr(writer.exception()))
        if self.session.writer is writer:  # it did not end idle: the stream ends
            self.wake()


def _check_certificate(context: grpc.aio.ServicerContext, learner_id: str) -> None:
    """With mutual TLS, the client certificate's common name is the learner's identity."""
    names = list(context.auth_context().get("x509_common_name", []))
    if not names:
        raise AuthError("no client certificate")
    named = names[0].decode(errors="replace")
    if not hmac.compare_digest(named.encode(), learner_id.encode()):
        raise AuthError("the client certificate is for another learner id", denied=True)


CAPABILITY_SETS_KEPT = 64
"""Distinct `Hello.capabilities` lists whose sets are shared (more are built per stream)."""
_CAPABILITY_SETS: dict[tuple[str, ...], frozenset[str]] = {}


def capability_set(announced: Sequence[str]) -> frozenset[str]:
    """A learner's capabilities (`DEFAULT_CAPABILITIES` when it announced none), as one set
    shared by every learner announcing the same list: protobuf makes new strings on each read,
    and a set of its own cost ~1 KB a stream. At most `CAPABILITY_SETS_KEPT` lists are kept,
    so learners sending random lists cannot grow the cache."""
    key = tuple(announced)
    found = _CAPABILITY_SETS.get(key)
    if found is None:
        found = frozenset(key) or DEFAULT_CAPABILITIES
        if len(_CAPABILITY_SETS) < CAPABILITY_SETS_KEPT:
            _CAPABILITY_SETS[key] = found
    return found


WRITE_DRAIN_SECONDS = 2.0
"""How long a closing stream waits for a write already handed to gRPC."""


def _retrieve(future: asyncio.Future[None]) -> None:
    """Take a future's outcome, so an unawaited failure is not reported as never retrieved."""
    if not future.cancelled():
        future.exception()


async def _quiesce(session: Session) -> None:
    """Stop the stream's writer without leaving a write in flight: gRPC refuses to send the
    final status while a message is still being sent (found by fuzzing: the stream hung)."""
    writer = session.writer
    if writer is None or writer.done():
        return
    if session.writing:  # it returns after this write: the session is closing
        await asyncio.wait({writer}, timeout=WRITE_DRAIN_SECONDS)
    writer.cancel()
