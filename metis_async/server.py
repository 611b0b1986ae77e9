"""The controller service: a grpc.aio server on uvloop, a thin driver of the federation core.

Learners dial out and keep one `Join` stream each. For every stream a `Session` reads messages,
checks them against the wire contract (`proto/metis_async/v1/controller.proto`) and reassembles
uploads chunk by chunk in Rust (decode, copy, NaN/inf check in one pass with the GIL released,
off the loop for large chunks). Complete, validated updates become events for the
`FederationCore`, which runs on its own thread (`delivery.CoreRunner`); its effects come back to
the loop as messages on the sessions' queues. Learners that break the contract get a gRPC status
naming the problem; nothing they send reaches the global model before it has been validated.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import random
import signal
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import numpy as np
import numpy.typing as npt
import structlog

from metis_async import wire
from metis_async.aggregation.server_step import AggregationSettings
from metis_async.auth import TokenVerifier
from metis_async.checkpoints import StateDirectory
from metis_async.delivery import CommitHook, CoreRunner, EffectDelivery, health_of
from metis_async.effects import Effect, FederationState
from metis_async.federation import FederationCore
from metis_async.ingest import Ingest
from metis_async.links import LocalLink
from metis_async.metrics import LoopLag, start_metrics_server
from metis_async.protocols import Policy
from metis_async.runtime import collector_tuned_for_serving
from metis_async.secure.aggregate import HomomorphicAggregation
from metis_async.secure.relay import DecryptionRelay
from metis_async.session import Session
from metis_async.store import ModelStore, encode_for_learners
from metis_async.streams import CODECS, StreamServer
from metis_async.systemd import Notifier
from metis_async.telemetry import ControllerStats, LogLimiter

if TYPE_CHECKING:
    from metis_async.admin.run import AdminOptions
    from metis_async.workers.hub import WorkerHub

log = structlog.get_logger("metis_async.server")

JOIN_METHOD = "/metis_async.v1.Controller/Join"

T = TypeVar("T")


@dataclass(frozen=True)
class ControllerConfig:
    """Network and liveness settings of the controller.

    Attributes:
        host: address to listen on (loopback by default).
        port: TCP port; 0 picks a free one (see `Controller.port`).
        extra_hosts: more addresses to listen on, at the same port (e.g. several loopback
            addresses, so that more than ~28K local connections fit the ephemeral ports).
        heartbeat_interval_seconds: learners send a heartbeat at least this often.
        heartbeat_timeout_seconds: a learner silent this long is disconnected and its tasks void.
        hello_timeout_seconds: a new stream must say hello within this time.
        drain_seconds: when `serve` stops (finished, or a signal), how long streams get to
            take their last messages (shutdown, final model); it ends sooner once all are done.
        max_chunk_bytes: largest chunk either side may send.
        download_chunk_bytes: chunk size of the models the controller sends (capped at
            `max_chunk_bytes`). gRPC takes one message per stream off the send budget
            (`download_buffer_bytes`) before the learner reads it, so a broadcast to N streams
            costs up to N x this in gRPC's buffers: small chunks keep that small.
        send_queue_limit: messages queued per stream before a slow learner is dropped.
        max_model_bytes: largest flat model (bytes) a learner may propose or the controller
            holds; larger layouts are refused before anything is allocated.
        max_learner_id_length: longest `Hello.learner_id` accepted (UTF-8 bytes).
        max_num_examples: largest `num_examples` a learner may claim (hello or result); it is
            the aggregation weight, so an unbounded claim would let one learner own a round.
        initial_model_timeout_seconds: how long the learner asked for the first model may take
            before another waiting learner is asked.
        max_uploads_in_flight: fewest training uploads reassembled at once, whatever
            `upload_buffer_bytes` allows.
        upload_buffer_bytes: bytes of training uploads reassembled at once (each upload holds
            its model-sized payload until it is folded); a result beyond it waits with its
            stream unread, so gRPC flow control holds that learner back and controller memory
            stays O(model + this).
        download_buffer_bytes: bytes of large messages (model chunks) handed to gRPC for
            sending at once, per process; the rest wait in their streams' queues, so a
            broadcast costs this much send buffer, not a model copy per stream.
        bundle_buffer_bytes: bytes of bundles (a task with its small model, one write)
            handed to gRPC for sending at once, per process. A broadcast's streams share one
            joined bundle, but gRPC copies what each write is given until it is sent; writes
            beyond the budget wait for earlier ones to complete. It holds a 15,000-stream
            broadcast of a 4 KB model at once: a budget the broadcast outgrows paces its writes
            by their completions (8 MiB: 1.57-1.88x the bare server's broadcast time, 256 MiB:
            1.17-1.34x, the same peak memory; benches/README.md).
        upload_grant_bytes: learners announcing "grant" wait for the controller's go-ahead
            (UploadGrant, sent when an upload slot is free) before sending the chunks of models
            of at least this many bytes, so waiting uploads cost no memory at all; -1: never.
        download_receipt_bytes: models of at least this many bytes are sent to learners
            announcing "receipt" with `Model.receipt`: each chunk's share of
            `download_buffer_bytes` stays held until the learner acknowledges it, so the budget
            bounds the model bytes on their way wherever they wait; -1: never.
        stream_window_bytes: HTTP/2 receive window of each learner stream, fixed (0: gRPC's
            automatic sizing from the bandwidth-delay product, which on fast links grows to
            megabytes per stream, so uploads waiting for a slot sit in gRPC's buffers). A fixed
            window bounds that memory to this much per uploading stream, and caps one stream's
            upload rate at window / round-trip time (1 MiB over 50 ms: 20 MB/s).
        read_buffer_bytes: largest buffer gRPC reads one connection into (0: gRPC's own
            limit). gRPC grows a connection's read buffer to its largest burst and keeps the
            spare room for the connection's life, so without a limit every learner that
            uploaded a 4 MB model costs ~4 MB until it disconnects (100 learners x 1M
            parameters: peak 0.42-0.49 GB after 8 rounds, 0.21-0.25 GB with 256 KiB).
            Reads stay as large as this; the TCP window is not affected.
        upload_codec: what learners that offer it upload in (`Hello.codecs`; the others
            upload float32): float32, float16, bfloat16 or int8 (a scale per chunk).
        download_codec: what learners that offer it are sent models in.
        tokens: learner id -> token; None disables authentication.
        state_dir: directory of the controller's checkpoints (every committed version; a
            controller started on it resumes); None keeps nothing.
        checkpoints_kept: newest checkpoints kept in `state_dir`.
        metrics_port: port of the Prometheus endpoint `serve` starts (None: none; 0: free).
        metrics_host: address of the Prometheus endpoint.
        token_secret: secret that signs learner tokens (`auth.issue_token`); None accepts only
            the fixed `tokens`.
        revoked: learner ids refused whatever their credentials.
        tls_cert: PEM server certificate chain; with `tls_key`, the learners' port is TLS.
        tls_key: PEM private key of `tls_cert`.
        tls_client_ca: PEM CA of learner certificates: mutual TLS, and a certificate's common
            name must equal the learner id of its hello.
        max_learners: learners connected at once (per process: each ingest worker holds its
            share); more are refused with RESOURCE_EXHAUSTED; 0 means no limit.
        max_messages_per_second: sustained messages a learner may send; beyond the burst its
            stream ends with RESOURCE_EXHAUSTED (a flood costs others nothing); 0: no limit.
        message_burst: messages a learner may send at once (an upload is one per chunk).
        max_learner_bytes_per_second: a learner's stream is read no faster than this (its
            upload waits in gRPC flow control); 0: as fast as it comes.
        max_missed_tasks: tasks in a row a learner may leave unanswered until cancelled before
            it is benched (no work for `bench_seconds`: fake or hung learners stop holding
            rounds up); 0 never benches.
        bench_seconds: how long a benched learner gets no work.
        he: aggregate under homomorphic encryption (`metis_async.secure.aggregate`): only
            learners announcing "he" join, updates are ciphertexts the controller sums with
            no key, and versions after the first are encrypted. None: plaintext.
        secagg: every round runs SecAgg+ (`protocols.secagg.SecAggRounds` around the policy):
            only learners announcing "secagg" join, and the controller learns only each round's
            sum of masked updates.
        secagg_clip: SecAgg+: update values are clipped to [-clip, clip] before quantization.
        secagg_step_timeout_seconds: SecAgg+: how long each step of a round waits for answers.
    """

    host: str = "127.0.0.1"
    port: int = 50051
    extra_hosts: tuple[str, ...] = ()
    heartbeat_interval_seconds: float = 5.0
    heartbeat_timeout_seconds: float = 30.0
    hello_timeout_seconds: float = 10.0
    drain_seconds: float = 30.0
    max_chunk_bytes: int = wire.MAX_CHUNK_BYTES
    download_chunk_bytes: int = wire.DOWNLOAD_CHUNK_BYTES
    send_queue_limit: int = 1024
    max_model_bytes: int = 2 * 1024**3
    max_learner_id_length: int = 128
    max_num_examples: int = 10**9
    initial_model_timeout_seconds: float = 60.0
    max_uploads_in_flight: int = 4
    upload_buffer_bytes: int = 32 * 1024**2
    download_buffer_bytes: int = 32 * 1024**2
    bundle_buffer_bytes: int = 128 * 1024**2
    stream_window_bytes: int = 0
    read_buffer_bytes: int = 256 * 1024
    upload_grant_bytes: int = 1024 * 1024
    download_receipt_bytes: int = 1024 * 1024
    upload_codec: str = "float32"
    download_codec: str = "float32"
    tokens: Mapping[str, str] | None = field(default=None, repr=False)
    state_dir: str | None = None
    checkpoints_kept: int = 3
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    token_secret: bytes | None = field(default=None, repr=False)
    revoked: frozenset[str] = frozenset()
    tls_cert: bytes | None = field(default=None, repr=False)
    tls_key: bytes | None = field(default=None, repr=False)
    tls_client_ca: bytes | None = field(default=None, repr=False)
    max_learners: int = 0
    max_messages_per_second: float = 200.0
    message_burst: int = 2000
    max_learner_bytes_per_second: float = 0.0
    max_missed_tasks: int = 5
    bench_seconds: float = 300.0
    he: HomomorphicAggregation | None = None
    secagg: bool = False
    secagg_clip: float = 1.0
    secagg_step_timeout_seconds: float = 10.0

    def __post_init__(self) -> None:
        if self.he is not None and self.secagg:
            raise ValueError("choose homomorphic aggregation (he) or SecAgg+ (secagg), not both")
        if self.secagg and not (self.secagg_clip > 0 and self.secagg_step_timeout_seconds > 0):
            raise ValueError("secagg_clip and secagg_step_timeout_seconds must be > 0")
        for name in ("upload_codec", "download_codec"):
            value = getattr(self, name)
            if value not in CODECS:
                raise ValueError(f"{name} must be one of {sorted(CODECS)}, got {value!r}")
        if self.he is not None and self.upload_codec != "float32":
            raise ValueError(
                "upload_codec does not apply under homomorphic aggregation: uploads are "
                "ciphertexts (leave it float32)"
            )
        if self.download_chunk_bytes < 1024:
            raise ValueError(
                f"download_chunk_bytes must be >= 1024, got {self.download_chunk_bytes}"
            )

    def verifier(self) -> TokenVerifier | None:
        """The learner credential check in effect (None: authentication is off)."""
        if self.tokens is None and self.token_secret is None:
            return None
        # No copy of the token table: this runs at every hello.
        return TokenVerifier(self.token_secret, self.tokens or {}, self.revoked)

    def server_credentials(self) -> Any:
        """gRPC server credentials when TLS is configured, else None."""
        if self.tls_cert is None or self.tls_key is None:
            return None
        return grpc.ssl_server_credentials(
            [(self.tls_key, self.tls_cert)],
            root_certificates=self.tls_client_ca,
            require_client_auth=self.tls_client_ca is not None,
        )

    def grpc_options(self) -> list[tuple[str, Any]]:
        """Channel arguments of the server (message limits, keepalive for NATed learners)."""
        limit = self.max_chunk_bytes + 1024 * 1024
        return [
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            # Learners ping every 20 s themselves (NAT) and heartbeats find dead ones; pinging
            # 100K connections more often only costs the controller.
            ("grpc.keepalive_time_ms", 120_000),
            # Generous: at a mass (re)connect a busy learner host answers pings and SETTINGS
            # late, and gRPC's defaults (10 s) then drop connections that would have worked.
            ("grpc.keepalive_timeout_ms", 20_000),
            ("grpc.http2.settings_timeout", 60_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
            ("grpc.http2.max_ping_strikes", 0),
            # Thousands of learners reconnect at once after a restart; past these limits gRPC
            # drops new calls silently (shared/GRPC-NOTES.md).
            ("grpc.server.max_pending_requests", 200_000),
            ("grpc.server.max_pending_requests_hard_limit", 400_000),
            *self._window_options(),
            *self._read_buffer_options(),
        ]

    def grant_threshold(self) -> int | None:
        """Model bytes from which uploads wait for a grant (None: never)."""
        return None if self.upload_grant_bytes < 0 else self.upload_grant_bytes

    def download_chunk(self) -> int:
        """Chunk size of the models sent: `download_chunk_bytes`, at most `max_chunk_bytes`."""
        return min(self.download_chunk_bytes, self.max_chunk_bytes)

    def receipt_threshold(self) -> int | None:
        """Model bytes from which downloads wait for receipts (None: never)."""
        return None if self.download_receipt_bytes < 0 else self.download_receipt_bytes

    def _read_buffer_options(self) -> list[tuple[str, Any]]:
        if not self.read_buffer_bytes:
            return []
        return [("grpc.experimental.tcp_max_read_buffer_size", self.read_buffer_bytes)]

    def _window_options(self) -> list[tuple[str, Any]]:
        if not self.stream_window_bytes:
            return []  # gRPC sizes each stream's window from its measured bandwidth-delay product
        return [
            ("grpc.http2.bdp_probe", 0),
            ("grpc.http2.lookahead_bytes", self.stream_window_bytes),
        ]


RELOADABLE = (
    "tokens",
    "token_secret",
    "revoked",
    "max_learners",
    "max_messages_per_second",
    "message_burst",
    "max_learner_bytes_per_second",
)
"""ControllerConfig fields a SIGHUP takes over (`ControllerFace.reload_credentials`)."""


class ControllerFace:
    """What every controller offers its operator, whatever drives its learners' streams
    (`Controller` in one process, `workers.hub.WorkerHub` with ingest workers).

    Subclasses set `config`, `core`, `store`, `_runner`, `_finished` and `_initial`.
    """

    config: ControllerConfig
    stats: ControllerStats
    core: FederationCore
    store: ModelStore
    _runner: CoreRunner
    _finished: asyncio.Event
    _initial: Sequence[npt.NDArray[np.generic]] | None
    state: StateDirectory | None = None
    failure: BaseException | None = None
    """Why the controller stopped on its own (a checkpoint it could not write), if it did."""

    async def wait_finished(self, timeout: float | None = None) -> bool:
        """Wait until the policy finishes the federation; False on timeout (seconds)."""
        try:
            await asyncio.wait_for(self._finished.wait(), timeout)
        except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
            return False
        return True

    @property
    def finished(self) -> bool:
        """Whether the policy has finished the federation."""
        return self._finished.is_set()

    @property
    def policy(self) -> Policy:
        """The federation's policy."""
        return self.core.policy

    @property
    def version(self) -> int:
        """The published global model version."""
        return self.store.version

    @property
    def evaluations(self) -> dict[int, dict[str, float]]:
        """Example-weighted mean evaluation metrics by model version."""
        return dict(self.core.evaluations)

    async def participation(self) -> dict[str, dict[str, int]]:
        """Per learner: tasks assigned, updates accepted and rejected, evaluations."""
        return await self._runner.query(self.core.participation)

    async def query(self, fn: Callable[[], T]) -> T:
        """Run a read-only `fn` on the core's thread (a consistent view of the core)."""
        return await self._runner.query(fn)

    async def command(self, method: Callable[..., list[Effect]], *args: Any) -> None:
        """Run a core method that changes state (`pause`, `unpause`) at the current time and
        carry out its effects."""
        await self._runner.call(method, self._now(), *args)

    def clock(self) -> float:
        """The federation's clock now (seconds; the core's events carry it)."""
        return self._now()

    def learner_workers(self) -> Mapping[str, int]:
        """The ingest worker holding each connected learner's stream (none in one process)."""
        return {}

    def kick(self, learner_id: str, reason: str, code: grpc.StatusCode) -> bool:
        """End `learner_id`'s stream now with `code` and `reason`; False if not connected."""
        raise NotImplementedError

    def revoke(self, learner_id: str, reason: str) -> bool:
        """Refuse `learner_id` from now on (every later hello) and end its stream; False if it
        was not connected. Kept until a restart or a reload of `revoked_file`."""
        revoked = self.config.revoked | {learner_id}
        self.config = dataclasses.replace(self.config, revoked=revoked)
        self._configured(self.config)
        log.info("learner_revoked", learner_id=learner_id, reason=reason)
        return self.kick(learner_id, f"revoked: {reason}", grpc.StatusCode.PERMISSION_DENIED)

    def _build_core(
        self,
        policy: Policy,
        config: ControllerConfig | None,
        aggregation: AggregationSettings | None,
        run_id: str | None,
        rng: random.Random | None,
    ) -> None:
        """Set `config`, `stats`, `store` and the `core` whose versions `_encode` publishes."""
        self.config = config or ControllerConfig()
        self.stats = ControllerStats()
        self.store = ModelStore(self.config.download_chunk())
        if self.config.state_dir is not None:
            self.state = StateDirectory(self.config.state_dir, self.config.checkpoints_kept)
        if self.config.secagg:
            from metis_async.protocols.secagg import SecAggRounds

            policy = SecAggRounds(
                policy, self.config.secagg_clip, self.config.secagg_step_timeout_seconds
            )
        self.core = FederationCore(
            policy,
            aggregation=aggregation,
            run_id=run_id,
            publish=self._encode,
            stats=self.stats,
            initial_model_timeout_seconds=self.config.initial_model_timeout_seconds,
            rng=rng,
            state=self.state,
            max_missed_tasks=self.config.max_missed_tasks,
            bench_seconds=self.config.bench_seconds,
            he=self.config.he,
            secagg=self.config.secagg,
        )
        self.core.status_in_welcome = True  # StreamServer puts it in every Welcome

    def reload_credentials(self, fresh: ControllerConfig) -> None:
        """Take `fresh`'s learner credentials (tokens, token secret, revocations) and abuse
        limits without a restart (SIGHUP: new streams get them); the rest needs a restart."""
        self.config = dataclasses.replace(
            self.config, **{name: getattr(fresh, name) for name in RELOADABLE}
        )
        self._configured(self.config)
        log.info("settings_reloaded", revoked=len(fresh.revoked))

    def _configured(self, config: ControllerConfig) -> None:
        """Hook: hand a changed `config` to whatever checks hellos."""

    def _on_fatal(self, error: BaseException) -> None:
        """The core cannot go on (a commit it could not make durable): stop serving."""
        if self.failure is None:
            log.critical("controller_failed", error=str(error))
            self.failure = error
        self._finished.set()

    def _release_state(self) -> None:
        if self.state is not None:
            self.state.close()

    def _encode(self, version: int, flat: wire.ModelVector) -> object:
        """Publish hook (core thread): encode the version once for every stream."""
        layout = self.core.layout
        assert layout is not None
        config = self.config
        return encode_for_learners(
            layout, version, flat, config.download_chunk(), CODECS[config.download_codec]
        )

    async def _adopt_initial_model(self) -> None:
        """Resume from the state directory's newest checkpoint if there is one; else check the
        initial model given to the constructor (size, finite) and adopt it."""
        checkpoint = self.state.latest() if self.state is not None else None
        if checkpoint is not None:
            if self._initial is not None:
                log.info("initial_model_ignored", reason="resuming from a checkpoint")
            try:
                await self._runner.call(self.core.resume, self._now(), checkpoint)
            except Exception:
                self._release_state()  # the directory is free for a controller that fits it
                raise
            self._initial = None
            return
        if self._initial is None:
            return
        layout = wire.make_layout(self._initial)
        if layout.total_bytes > self.config.max_model_bytes:
            raise ValueError(
                f"the initial model has {layout.total_bytes} bytes, more than "
                f"max_model_bytes={self.config.max_model_bytes}"
            )
        flat = wire.flatten(self._initial, layout)
        bad = wire.first_non_finite(flat)
        if bad is not None:
            raise ValueError(f"the initial model is not finite (first at value {bad})")
        await self._runner.call(self.core.initialize_model, self._now(), layout, flat)
        self._initial = None

    def _now(self) -> float:
        """The federation's clock (seconds): the event loop's unless a subclass owns time."""
        return asyncio.get_running_loop().time()


class Controller(ControllerFace):
    """The controller service: learner streams in front of a `FederationCore`.

    Args:
        policy: the protocol deciding who trains what and when versions commit.
        config: network, liveness and limit settings.
        initial_model: the first model; None asks a learner to provide it.
        on_commit: called with each new version and its arrays (in a thread if not async).
        aggregation: server optimizer, robust rule, clipping (FedAvg with a streaming mean).
        run_id: identity of this run's version sequence; fresh by default.
        clock: the federation's clock (seconds, monotonic); the event loop's by default. Whoever
            passes a clock owns time: the controller then sets no wake-up timers of its own, and
            the caller calls `tick()` (a replay, a test).
        rng: the generator of the policy's random choices (which learners train); None keeps
            the policy's own, seeded from its settings.
    """

    def __init__(
        self,
        policy: Policy,
        config: ControllerConfig | None = None,
        initial_model: Sequence[npt.NDArray[np.generic]] | None = None,
        on_commit: CommitHook | None = None,
        aggregation: AggregationSettings | None = None,
        run_id: str | None = None,
        clock: Callable[[], float] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._build_core(policy, config, aggregation, run_id, rng)
        self._initial = initial_model
        self._finished = asyncio.Event()
        self._clock = clock
        self._wakeup: asyncio.TimerHandle | None = None
        sessions: dict[str, Session] = {}
        self._delivery = EffectDelivery(
            sessions, self.store, on_commit, self._finished, self._state_changed
        )
        self._delivery.upload_grant_bytes = self.config.grant_threshold()
        self._delivery.download_receipt_bytes = self.config.receipt_threshold()
        relay = None
        if self.config.he is not None and self.config.he.committee:
            relay = self._delivery.enable_relay(self.config.he)
        self._runner = CoreRunner(self.core, self._delivery, self._reschedule, self._on_fatal)
        link = LocalLink(self.core, self._runner, self._now)
        limiter = LogLimiter()
        self._ingest = Ingest(self.config, link, self.store, self.stats, limiter)
        self.streams = StreamServer(self.config, link, self._ingest, self.stats, limiter, sessions)
        self.streams.relay = self._ingest.relay = relay
        self.port = 0

    # ------------------------------------------------------------------------------ lifecycle

    async def start(self) -> int:
        """Adopt the initial model (if given), bind and start serving; returns the bound port."""
        await self._adopt_initial_model()
        self.port = await self.streams.start()
        log.info(
            "controller_started",
            address=f"{self.config.host}:{self.port}",
            protocol=self.policy.name,
            model_ready=self.store.ready,
            run_id=self.core.run_id,
        )
        return self.port

    async def stop(self, grace_seconds: float = 2.0) -> None:
        """Tell learners to come back later (or that it is over), then close the server."""
        if not self.finished:
            await self._call_raw(self.core.drain)
        if self._delivery.relay is not None:  # the final version's shares are on their way
            await self._delivery.relay.released(grace_seconds)
        self.streams.finish_all()
        if self._wakeup is not None:
            self._wakeup.cancel()
        self._delivery.close()
        await self.streams.stop(grace_seconds)
        self._runner.close()
        self._ingest.close()
        self._release_state()
        log.info("controller_stopped", version=self.store.version, **self.stats.snapshot())

    @property
    def relay(self) -> DecryptionRelay | None:
        """Multiparty keys: the committee's decryption shares of the published version."""
        return self._delivery.relay

    def sessions(self) -> list[dict[str, object]]:
        """Connected learners, for the dashboard and tests."""
        return [s.describe() for s in self.streams.sessions.values()]

    def kick(self, learner_id: str, reason: str, code: grpc.StatusCode) -> bool:
        if learner_id not in self.streams.sessions:
            return False
        self.streams.close_session(learner_id, "", code, reason)
        return True

    def _state_changed(self, state: FederationState) -> None:
        self.streams.set_health(*health_of(state))

    def _configured(self, config: ControllerConfig) -> None:
        self.streams.config = config

    async def tick(self) -> None:
        """Deliver the passing of time to the core now (the wake-up timer does it on its own)."""
        await self._call(self.core.tick)

    # ------------------------------------------------------------------------------ the core

    def _now(self) -> float:
        return self._clock() if self._clock is not None else asyncio.get_running_loop().time()

    async def _call(self, method: Callable[..., list[Effect]], *args: Any) -> list[Effect]:
        """A core event at the current time (the first argument of every event method)."""
        return await self._runner.call(method, self._now(), *args)

    async def _call_raw(self, method: Callable[..., list[Effect]], *args: Any) -> list[Effect]:
        return await self._runner.call(method, *args)

    def _reschedule(self, when: float | None) -> None:
        if self._wakeup is not None:
            self._wakeup.cancel()
            self._wakeup = None
        if when is None or self.finished or self._clock is not None:
            return
        loop = asyncio.get_running_loop()
        self._wakeup = loop.call_later(max(0.0, when - self._now()), self._on_wakeup)

    def _on_wakeup(self) -> None:
        self._wakeup = None
        task = asyncio.ensure_future(self.tick())
        task.add_done_callback(_log_failure)


def _log_failure(task: asyncio.Future[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("tick_failed", error=repr(task.exception()))


def run_event_loop(coro: Coroutine[Any, Any, T]) -> T:
    """Run `coro` to completion on uvloop where available (the standard loop elsewhere), with
    the garbage collector tuned for many long-lived objects (`runtime`)."""
    with collector_tuned_for_serving():
        try:
            import uvloop
        except ImportError:  # e.g. Windows: the standard loop works, slower
            return asyncio.run(coro)
        return uvloop.run(coro)


async def serve(
    controller: Controller | WorkerHub,
    *,
    until_finished: bool = True,
    grace_seconds: float | None = None,
    notifier: Notifier | None = None,
    reload: Callable[[], None] | None = None,
    admin: AdminOptions | None = None,
) -> str:
    """Serve until the federation finishes (or forever), or until SIGTERM/SIGINT.

    On a signal (systemd's stop, Ctrl-C) the controller drains: every learner is told to come
    back later (`Shutdown` of kind DRAINING), streams get `grace_seconds` (default: the
    config's `drain_seconds`) to finish, then the server closes. Every committed version is
    already checkpointed (with a state directory), so the open aggregate is all a drain gives
    up; learners resend those updates to the next controller. Under systemd (`Type=notify`) it
    sends READY once serving, WATCHDOG from the event loop and STOPPING on drain; SIGHUP calls
    `reload`. With `admin`, the Admin service and the dashboard are served while it runs.
    Returns why it stopped.
    """
    notifier = notifier or Notifier()
    await controller.start()
    endpoints = None
    if admin is not None and admin.enabled:
        from metis_async.admin.run import AdminEndpoints

        endpoints = AdminEndpoints(controller, admin)
        await endpoints.start()
    notifier.notify(
        "READY=1",
        f"STATUS=serving {controller.policy.name} on port {controller.port}, "
        f"version {controller.version}",
    )
    lag = LoopLag()
    monitors = [asyncio.ensure_future(notifier.keep_alive()), asyncio.ensure_future(lag.run())]
    metrics = None
    config = controller.config
    if config.metrics_port is not None:
        metrics = start_metrics_server(controller, config.metrics_host, config.metrics_port, lag)
        address = f"http://{config.metrics_host}:{metrics.port}/metrics"
        log.info("metrics_serving", address=address)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    reason = "finished"
    handled: list[signal.Signals] = []
    handlers: list[tuple[signal.Signals, Callable[[], object]]] = [
        (signal.SIGTERM, stop.set),
        (signal.SIGINT, stop.set),
    ]
    if reload is not None:
        handlers.append((signal.SIGHUP, functools.partial(_reload, reload)))
    for sig, handler in handlers:
        with contextlib.suppress(NotImplementedError, RuntimeError):  # not on Windows
            loop.add_signal_handler(sig, handler)
            handled.append(sig)
    try:
        waiters: set[asyncio.Future[bool]] = {asyncio.ensure_future(stop.wait())}
        # A controller that failed (a checkpoint it could not write) also sets finished.
        if until_finished or controller.state is not None:
            waiters.add(asyncio.ensure_future(controller.wait_finished()))
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for waiter in waiters:
            waiter.cancel()
        if stop.is_set():
            reason = "signal"
            log.info("draining", reason="signal", sessions=len(controller.sessions()))
        elif controller.failure is not None:
            reason = "failed"
        else:
            await asyncio.sleep(0.5)  # let shutdown messages reach the learners
    finally:
        notifier.notify("STOPPING=1", f"STATUS=stopping ({reason})")
        for monitor in monitors:
            monitor.cancel()
        if metrics is not None:
            metrics.close()
        if endpoints is not None:
            with contextlib.suppress(Exception):
                await endpoints.stop()
        for sig in handled:
            loop.remove_signal_handler(sig)
        with contextlib.suppress(Exception):
            grace = config.drain_seconds if grace_seconds is None else grace_seconds
            await controller.stop(grace)
    return reason


def _reload(reload: Callable[[], None]) -> None:
    try:
        reload()
    except Exception as error:  # a bad file must not take the controller down
        log.error("reload_failed", error=str(error))
    else:
        log.info("reloaded")
