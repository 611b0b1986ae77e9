"""The learner's run loop: one outbound stream, tasks in a worker thread, reconnect with backoff.

`run_learner(address, learner)` dials the controller, says hello, and then serves tasks until the
controller says the federation is over. Three threads share the work: the caller's thread reads the
stream (so cancellations and new models arrive while training runs), a worker thread runs `fit` and
`evaluate` one task at a time, and a heartbeat thread keeps the session alive.

The loop reconnects with jittered exponential backoff, keeping its learner id and the last model
it received, when the stream breaks, when the controller drains (`Shutdown` DRAINING: a restart),
and when the controller breaks the wire contract (the stream is closed cleanly first). Only
`Shutdown` FINISHED (or an older controller's unspecified kind) ends the run.

Only grpcio, protobuf and numpy are needed here.
"""

from __future__ import annotations

import enum
import itertools
import logging
import math
import queue
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc

from metis_async import codecs as wire_codecs
from metis_async import wire
from metis_async.client.encrypted import CommitteeEncryption, Encryption, LearnerEncryption
from metis_async.client.learner import Learner
from metis_async.client.models import HeldModel, ModelReceiver
from metis_async.client.stream import LearnerStream
from metis_async.client.summary import Backoff, RunSummary
from metis_async.client.tasks import TaskWorker, send_result
from metis_async.client.unacked import UnackedUpdates
from metis_async.v1 import controller_pb2 as pb

if TYPE_CHECKING:
    from metis_async.secure.he import LearnerKeys
    from metis_async.secure.multiparty import Committee, PartyKeys

log = logging.getLogger("metis_async.client")

JOIN_METHOD = "/metis_async.v1.Controller/Join"
FATAL_CODES = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
CAPABILITIES = (
    "train",
    "evaluate",
    "delta",
    "final_model",
    "bundle",
    "ack",
    "grant",
    "receipt",
    "secagg",
)
"""What this client announces in `Hello.capabilities` (see controller.proto)."""

DEFAULT_CODECS = wire_codecs.CODEC_DTYPES
"""Payload dtypes offered in `Hello.codecs` by default (float16, bfloat16, int8; float32 always
works): the controller may send models in them and pick one for uploads."""

CHANNEL_CHUNK_BYTES = 64 * 1024 * 1024
"""Largest chunk the channel accepts before any Welcome (bytes). The channel exists before the
controller announces its chunk size, and gRPC's message limit is only a ceiling (nothing is
allocated up front), so a generous limit costs nothing and saves a reconnect; a controller that
announces more makes the runner reconnect once with a channel sized for it."""

FRAMING_BYTES = 1024 * 1024
"""Room for the envelope around a chunk's data (bytes)."""

_GRPC_MAX_MESSAGE = 2**31 - 1  # gRPC message limits are C ints
_CLOSE_DRAIN_SECONDS = 1.0  # how long a clean close waits for the controller to end its side
_MAX_RETRY_AFTER_SECONDS = 3600.0  # a bogus retry_after must not park the learner forever


class LearnerStopped(Exception):
    """The learner gave up: a fatal status from the controller or too many failed attempts."""


class _End(enum.Enum):
    """How one session ended, which decides what the run loop does next."""

    FINISHED = "finished"  # Shutdown FINISHED: the run is over
    STOPPED = "stopped"  # the caller set `stop`
    BROKEN = "broken"  # welcomed, then the stream ended: reconnect, backoff reset
    FAILED = "failed"  # no welcome, or the controller broke the contract: backoff grows
    DRAINING = "draining"  # Shutdown DRAINING: reconnect after retry_after_seconds
    RESIZE = "resize"  # chunks larger than the channel allows: reconnect at once


@dataclass(frozen=True)
class _Outcome:
    end: _End
    retry_after_seconds: float = 0.0


def _log(event: str, **fields: object) -> None:
    log.info("%s %s", event, " ".join(f"{k}={v}" for k, v in fields.items()))


def _state_name(state: int) -> str:
    try:
        return pb.FederationState.Name(state).removeprefix("FEDERATION_STATE_").lower()  # type: ignore[arg-type]
    except ValueError:  # a state added after this client was built
        return f"state_{state}"


class LearnerRunner:
    """Runs a `Learner` against a controller; `run_learner` is the one-call form.

    Args:
        address: controller address, host:port.
        learner: the user's learner.
        learner_id: stable identity; empty lets the controller assign one (reused on reconnect).
        token: credential when the controller checks tokens.
        backoff: reconnect policy.
        stop: set it from another thread to end the run after the current message.
        seed: seed of the backoff jitter (tests).
        codecs: payload dtypes besides float32 offered in `Hello.codecs` (see `DEFAULT_CODECS`);
            () offers float32 only.
        unacked: where train results wait for the controller's acknowledgement (keeps the
            newest `UNACKED_KEPT` by default), resent after a reconnect.
        credentials: TLS to the controller (`tls_credentials`); None dials in plaintext.
        he_keys: the federation's key pair (`secure.he.read_learner_keys`) for a controller
            that aggregates under homomorphic encryption; the learner then announces "he".
        he_committee: instead of `he_keys`, under multiparty keys: the committee's public file
            (`secure.multiparty.read_committee_file`).
        he_party: with `he_committee`, this learner's party file if it is a committee member
            (`secure.multiparty.read_party_file`).
    """

    def __init__(
        self,
        address: str,
        learner: Learner,
        *,
        learner_id: str = "",
        token: str = "",
        backoff: Backoff | None = None,
        stop: threading.Event | None = None,
        seed: int | None = None,
        codecs: Sequence[int] = DEFAULT_CODECS,
        unacked: UnackedUpdates | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        he_keys: LearnerKeys | None = None,
        he_committee: Committee | None = None,
        he_party: PartyKeys | None = None,
    ) -> None:
        self.credentials = credentials
        self.encryption: Encryption | None = None
        if he_keys is not None and he_committee is not None:
            raise ValueError("give he_keys (one shared key pair) or he_committee, not both")
        if he_keys is not None:
            self.encryption = LearnerEncryption(he_keys)
        elif he_committee is not None:
            self.encryption = CommitteeEncryption(he_committee, he_party)
        elif he_party is not None:
            raise ValueError("he_party needs he_committee (the committee's public file)")
        unknown = [c for c in codecs if c not in wire_codecs.CODEC_DTYPES]
        if unknown:
            raise ValueError(f"codecs must be among {wire_codecs.CODEC_DTYPES}, got {unknown}")
        self.codecs = tuple(codecs)
        self.address = address
        self.learner = learner
        self.token = token
        self.backoff = backoff or Backoff()
        self.stop = stop or threading.Event()
        self.summary = RunSummary(learner_id=learner_id)
        self._rng = random.Random(seed)
        self._payload_ids = itertools.count(1)
        self._chunk_limit = CHANNEL_CHUNK_BYTES
        self._held: HeldModel | None = None  # last model received, kept across sessions
        self._worker = TaskWorker(learner, self.summary, self._payload_ids, unacked)

    def run(self) -> RunSummary:
        """Serve tasks until the controller finishes the federation or `stop` is set.

        Raises `LearnerStopped` on a fatal status or after `backoff.max_attempts` consecutive
        failed attempts. Exceptions from `Learner.on_federation_finished` propagate.
        """
        failures = 0
        outcome = _Outcome(_End.STOPPED)
        while not self.stop.is_set():
            try:
                outcome = self._session()
            except grpc.RpcError as error:
                code = error.code()
                detail = error.details()
                self.summary.errors.append(f"{code.name}: {detail}")
                if code in FATAL_CODES:
                    raise LearnerStopped(f"controller refused this learner: {detail}") from None
                outcome = _Outcome(_End.FAILED)
                _log("stream_broken", code=code.name, detail=detail)
            if outcome.end in (_End.FINISHED, _End.STOPPED):
                break
            if outcome.end is _End.RESIZE:
                continue
            failures = failures + 1 if outcome.end is _End.FAILED else 0
            if self.backoff.max_attempts is not None and failures >= self.backoff.max_attempts:
                raise LearnerStopped(
                    f"gave up after {failures} failed attempts to reach "
                    f"{self.address}: {self.summary.errors[-1:]}"
                )
            delay = outcome.retry_after_seconds + self.backoff.delay(max(failures, 1), self._rng)
            _log("reconnecting", in_seconds=round(delay, 3), failures=failures)
            self.stop.wait(delay)
        final = self.summary.final_parameters
        if outcome.end is _End.FINISHED and final is not None:
            assert self.summary.final_version is not None
            self.learner.on_federation_finished(final, self.summary.final_version)
        return self.summary

    # ------------------------------------------------------------------------------ one session

    def _hello(self, held: HeldModel | None) -> pb.Hello:
        hello = pb.Hello(
            learner_id=self.summary.learner_id,
            token=self.token,
            num_examples=self.learner.num_examples(),
            capabilities=CAPABILITIES + (("he",) if self.encryption is not None else ()),
            client_version="metis-async",
            codecs=self.codecs,  # type: ignore[arg-type]
        )
        if held is not None:
            hello.holds_model = True
            hello.held_version = held.version
            hello.held_run_id = held.run_id
            hello.held_layout_id = held.layout.layout_id
        return hello

    def _channel(self) -> grpc.Channel:
        options = self._channel_options()
        if self.credentials is None:
            return grpc.insecure_channel(self.address, options=options)
        return grpc.secure_channel(self.address, self.credentials, options=options)

    def _channel_options(self) -> list[tuple[str, int]]:
        limit = self._chunk_limit + FRAMING_BYTES
        return [
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.keepalive_time_ms", 20_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
            # One connection per learner, even for several learners in one process (tests,
            # simulations): a controller with ingest workers spreads connections, not streams.
            ("grpc.use_local_subchannel_pool", 1),
        ]

    def _session(self) -> _Outcome:
        """One stream from hello to its end."""
        # A model from a controller without run ids could be mistaken for the same version
        # number of a restarted run, so only a model with a run id is carried over.
        held = self._held if self._held is not None and self._held.run_id else None
        models = ModelReceiver(held, self.codecs, self.encryption)
        stream = LearnerStream(self._hello(held), models)
        tasks: queue.SimpleQueue[pb.ControllerMessage | None] = queue.SimpleQueue()
        with self._channel() as channel:
            join = channel.stream_stream(
                JOIN_METHOD,
                request_serializer=pb.LearnerMessage.SerializeToString,
                response_deserializer=pb.ControllerMessage.FromString,
            )
            responses = join(stream.requests())
            worker = threading.Thread(target=self._worker.run, args=(stream, tasks), daemon=True)
            worker.start()
            try:
                try:
                    return self._serve(stream, responses, tasks)
                except wire.WireError as error:
                    self._abandon(stream, responses, responses.cancel, error)
                    return _Outcome(_End.FAILED)
            finally:
                tasks.put(None)
                stream.close()
                responses.cancel()
                worker.join(timeout=5.0)

    def _serve(
        self,
        stream: LearnerStream,
        responses: Iterator[pb.ControllerMessage],
        tasks: queue.SimpleQueue[pb.ControllerMessage | None],
    ) -> _Outcome:
        """Read the stream until it ends; raises `wire.WireError` on a contract violation."""
        for message in _unbundled(responses):
            kind = message.WhichOneof("body")
            if kind == "welcome":
                if stream.welcomed:
                    raise wire.WireError("a second welcome arrived on one stream")
                if (resize := self._on_welcome(stream, message.welcome)) is not None:
                    return resize
                self._resend(stream, message.welcome)
                beat = threading.Thread(target=self._heartbeat, args=(stream,), daemon=True)
                beat.start()
            elif not stream.welcomed:
                raise wire.WireError(f"the controller sent {kind} before welcome")
            elif kind == "layout":
                stream.models.on_layout(message.layout)
            elif kind == "model":
                stream.model_announced(message.model)
                self._received(stream.models.on_model(message.model))
            elif kind == "chunk":
                held = stream.models.on_chunk(message.chunk)
                downloaded = stream.models.take_downloaded()  # encrypted, awaiting shares
                stream.chunk_received(complete=held is not None or downloaded is not None)
                self._received(held)
                if downloaded is not None:
                    self._share(stream, *downloaded)
            elif kind == "secagg":
                reply = stream.secagg.on_step(message.secagg)
                if reply is not None:
                    stream.send(pb.LearnerMessage(secagg=reply))
            elif kind == "decryption_shares":
                self._received(stream.models.on_shares(message.decryption_shares))
            elif kind in ("train", "evaluate"):
                tasks.put(message)
            elif kind == "cancel":
                stream.cancelled.add(message.cancel.task_id)
            elif kind == "status":
                self._on_status(message.status)
                if message.status.need_initial_model:
                    self._send_initial_model(stream)
            elif kind == "grant":
                stream.answer_grant(message.grant.task_id, True)
            elif kind == "ack":
                stream.answer_grant(message.ack.task_id, False)  # already counted: no chunks
                if self._worker.unacked.acknowledged(message.ack.task_id):
                    self.summary.updates_acknowledged += 1
            elif kind == "error":
                error = message.error
                if error.task_id and error.code in (
                    pb.ERROR_CODE_STALE_TASK,
                    pb.ERROR_CODE_DUPLICATE,
                ):
                    stream.answer_grant(error.task_id, False)  # not taken: no chunks
                if error.code == pb.ERROR_CODE_STALE_TASK and error.task_id:
                    self._worker.unacked.forget(error.task_id)  # it will never be counted
                _log("controller_error", task_id=error.task_id, message=error.message)
            elif kind == "shutdown":
                return self._on_shutdown(stream, message.shutdown)
            # heartbeats, and bodies added after this client was built, need no answer
            if self.stop.is_set():
                return _Outcome(_End.STOPPED)
        return _Outcome(_End.BROKEN if stream.welcomed else _End.FAILED)

    def _abandon(
        self,
        stream: LearnerStream,
        responses: Iterator[pb.ControllerMessage],
        cancel: Callable[[], object],
        error: wire.WireError,
    ) -> None:
        """Close the stream cleanly after the controller broke the contract: say why, half-close,
        and give the controller a moment to end its side before cancelling."""
        detail = str(error)
        self.summary.errors.append(f"WireError: {detail}")
        log.warning("controller_broke_contract detail=%s", detail)
        stream.send(
            pb.LearnerMessage(error=pb.Error(code=pb.ERROR_CODE_INVALID_ARGUMENT, message=detail))
        )
        stream.close()
        timer = threading.Timer(_CLOSE_DRAIN_SECONDS, cancel)
        timer.start()
        try:
            for _ in responses:
                pass
        except grpc.RpcError:
            pass  # cancelled by the timer, or the controller ended with a status
        finally:
            timer.cancel()

    def _on_welcome(self, stream: LearnerStream, welcome: pb.Welcome) -> _Outcome | None:
        self.summary.learner_id = welcome.learner_id
        chunk_bytes = welcome.max_chunk_bytes or wire.MAX_CHUNK_BYTES
        if chunk_bytes + FRAMING_BYTES > _GRPC_MAX_MESSAGE:
            raise wire.WireError(f"max_chunk_bytes {chunk_bytes} is beyond what gRPC can carry")
        if chunk_bytes > self._chunk_limit:
            self._chunk_limit = chunk_bytes
            _log("channel_resized", max_chunk_bytes=chunk_bytes)
            return _Outcome(_End.RESIZE)
        stream.welcomed = True
        self.summary.sessions += 1
        stream.heartbeat_seconds = welcome.heartbeat_interval_seconds or 5.0
        try:
            stream.models.on_welcome(welcome)
            stream.masked = welcome.secagg
        except wire.WireError:
            raise
        except ValueError as error:  # keys that cannot work with this controller, ever
            raise LearnerStopped(str(error)) from None
        _log(
            "welcomed",
            learner_id=welcome.learner_id,
            protocol=welcome.protocol,
            state=_state_name(welcome.state),
            learners_connected=welcome.learners_connected,
            learners_needed=welcome.learners_needed,
        )
        if welcome.need_initial_model:
            self._send_initial_model(stream)
        return None

    def _resend(self, stream: LearnerStream, welcome: pb.Welcome) -> None:
        """Send again, before anything else, the updates the controller has not acknowledged."""
        unacked = self._worker.unacked.to_resend(welcome.run_id, stream.models.upload_dtype)
        for result, chunks in unacked:
            send_result(stream, result, chunks)
            self.summary.updates_resent += 1
        if unacked:
            _log("updates_resent", count=len(unacked))

    def _send_initial_model(self, stream: LearnerStream) -> None:
        """Answer a request for the first model: layout, header, chunks; or an Error saying why
        not (empty task id), so the controller asks another learner."""
        if stream.sent_initial_model:
            return  # asked twice on one stream: the first answer stands
        stream.sent_initial_model = True
        try:
            arrays = self.learner.get_parameters()
            layout = wire.make_layout(arrays)
            flat = wire.flatten(arrays, layout)
        except Exception as error:  # the learner's own code or model: refuse, keep serving
            log.exception("initial_model_failed")
            reason = f"{type(error).__name__}: {error}"
            stream.send(
                pb.LearnerMessage(error=pb.Error(code=pb.ERROR_CODE_TASK_FAILED, message=reason))
            )
            return
        header, chunks = wire.make_payload(
            flat,
            next(self._payload_ids),
            pb.PAYLOAD_KIND_WEIGHTS,
            layout.layout_id,
            stream.models.max_chunk_bytes,
        )
        stream.send(pb.LearnerMessage(layout=layout))
        stream.send(pb.LearnerMessage(initial_model=pb.InitialModel(payload=header)))
        for chunk in chunks:
            stream.send(pb.LearnerMessage(chunk=chunk))

    def _share(self, stream: LearnerStream, version: int, data: bytes, _: int) -> None:
        """A committee member's decryption shares of the encrypted `version` just received."""
        encryption = self.encryption
        if not isinstance(encryption, CommitteeEncryption) or encryption.party is None:
            return  # not a member: it waits for the members' shares
        party, shares = encryption.party.party.index, encryption.shares(data)
        for first, run in wire.batches(shares, stream.models.max_chunk_bytes):
            batch = pb.DecryptionShare(version=version, party=party, shares=run, first=first)
            stream.send(pb.LearnerMessage(decryption_share=batch))

    def _received(self, model: HeldModel | None) -> None:
        if model is not None:
            self._held = model
            self.summary.last_version = model.version

    def _on_status(self, status: pb.Status) -> None:
        _log(
            "federation_status",
            state=_state_name(status.state),
            connected=status.learners_connected,
            needed=status.learners_needed,
            message=repr(status.message),
        )

    def _on_shutdown(self, stream: LearnerStream, shutdown: pb.Shutdown) -> _Outcome:
        if shutdown.kind == pb.SHUTDOWN_KIND_DRAINING:
            retry = shutdown.retry_after_seconds
            retry = min(retry, _MAX_RETRY_AFTER_SECONDS) if math.isfinite(retry) else 0.0
            _log("controller_draining", reason=repr(shutdown.reason), retry_after_seconds=retry)
            return _Outcome(_End.DRAINING, max(retry, 0.0))
        self.summary.shutdown_reason = shutdown.reason or "shutdown"
        model = stream.models.model
        if model is not None and model.version == shutdown.final_version:
            self.summary.final_parameters = model.parameters()
            self.summary.final_version = model.version
        _log("shutdown", reason=repr(self.summary.shutdown_reason), final=shutdown.final_version)
        return _Outcome(_End.FINISHED)

    def _heartbeat(self, stream: LearnerStream) -> None:
        while not stream.closed.wait(stream.heartbeat_seconds):
            stream.send(pb.LearnerMessage(heartbeat=pb.Heartbeat(sent_unix_seconds=time.time())))


def _unbundled(responses: Iterator[pb.ControllerMessage]) -> Iterator[pb.ControllerMessage]:
    """The stream's messages with each `Bundle` opened in place, in order."""
    for message in responses:
        if message.WhichOneof("body") != "bundle":
            yield message
            continue
        for raw in message.bundle.messages:
            try:
                inner = pb.ControllerMessage.FromString(raw)
            except Exception as error:  # protobuf's DecodeError
                raise wire.WireError(f"unreadable message in a bundle: {error}") from None
            if inner.WhichOneof("body") in ("bundle", "welcome"):
                raise wire.WireError(f"a bundle carried {inner.WhichOneof('body')}")
            yield inner


def tls_credentials(
    ca: bytes | None = None, certificate: bytes | None = None, key: bytes | None = None
) -> grpc.ChannelCredentials:
    """TLS to the controller: trust `ca` (PEM; None: the system's roots), and present
    `certificate` and `key` (PEM) where the controller asks for learner certificates."""
    return grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=certificate
    )


def run_learner(
    address: str,
    learner: Learner,
    *,
    learner_id: str = "",
    token: str = "",
    credentials: grpc.ChannelCredentials | None = None,
    backoff: Backoff | None = None,
    stop: threading.Event | None = None,
    seed: int | None = None,
    codecs: Sequence[int] = DEFAULT_CODECS,
    he_keys: LearnerKeys | None = None,
    he_committee: Committee | None = None,
    he_party: PartyKeys | None = None,
) -> RunSummary:
    """Connect `learner` to the controller at `address` and serve tasks until the run ends.

    Reconnects with jittered exponential backoff when the stream breaks or the controller drains;
    raises `LearnerStopped` on a fatal status (bad token), keys that do not fit the controller's
    encryption, or after `backoff.max_attempts` consecutive failed attempts. `codecs`: payload
    dtypes offered besides float32; `he_keys`: the federation's key pair under homomorphic
    aggregation; `he_committee` and `he_party`: the same under multiparty keys (see
    `LearnerRunner`).
    """
    runner = LearnerRunner(
        address,
        learner,
        learner_id=learner_id,
        token=token,
        backoff=backoff,
        stop=stop,
        seed=seed,
        codecs=codecs,
        credentials=credentials,
        he_keys=he_keys,
        he_committee=he_committee,
        he_party=he_party,
    )
    return runner.run()
