"""One ingest worker process: learner streams on the shared port, uploads folded in place.

The worker runs the same `StreamServer` and `Ingest` as a single-process controller, with a
`HubLink` for a core: events go over the worker's channel to the core's process (`hub`), and
the effects for this worker's learners come back as effect lists, carried out by the same
`EffectDelivery`. A new version arrives once, already encoded; every stream is sent the same
bytes.

A training upload stays here. With summable updates (no robust rule, no clipping, no full-model
mixing; under homomorphic aggregation, rounds) the worker tells the core only the update's
report and a handle; when the core accepts it, the worker folds it into its partial sum for the
open version in Rust (one fold thread, so folds and the partial's export run in the order the
core asked), then frees it. Partial sums are float64 sums, ciphertext sums or masked sums by the
federation's aggregate (`sums`). Otherwise the update's values are forwarded whole (one copy over
the channel per update). Updates waiting
for the core's answer are bounded by `upload_buffer_bytes`, like the uploads being assembled.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import signal
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
import structlog

from metis_async import wire
from metis_async.delivery import EffectDelivery, health_of, lower_thread_priority
from metis_async.effects import FederationState
from metis_async.federation import TaskLookup, UpdateReport
from metis_async.ingest import Ingest
from metis_async.metrics import STATS_INTERVAL_SECONDS, LoopLag
from metis_async.server import ControllerConfig, run_event_loop
from metis_async.session import Session
from metis_async.store import ModelStore
from metis_async.streams import StreamServer
from metis_async.telemetry import ControllerStats, LogLimiter, configure_logging
from metis_async.v1 import controller_pb2 as pb
from metis_async.workers import raise_open_file_limit
from metis_async.workers.channel import Channel, ChannelClosed
from metis_async.workers.sums import PartialSum, new_partial, partial_kind

if TYPE_CHECKING:
    from metis_async._core import Segments
    from metis_async.secure.aggregate import HomomorphicAggregation

log = structlog.get_logger("metis_async.workers")


class HubLink:
    """A `CoreLink` over a worker's channel to the core's process (see the module docstring).

    Args:
        channel: the worker's channel.
        store: this worker's copy of the published version (its size sizes the budget).
        budget_bytes: bytes of updates that may wait here for the core's answer.
    """

    def __init__(
        self,
        channel: Channel,
        store: ModelStore,
        budget_bytes: int,
        he: HomomorphicAggregation | None = None,
        secagg: bool = False,
    ) -> None:
        self.channel = channel
        self.store = store
        self.run_id = ""
        self.protocol = ""
        self.ready = False
        self.provider: str | None = None
        self.federation_status: tuple[FederationState | None, int, int] = (None, 0, 0)
        self.forward = False
        self._budget_bytes = budget_bytes
        self._budget: asyncio.Semaphore | None = None
        self._held: dict[int, wire.FloatVector | Segments | bytes] = {}
        self._handles = 0
        self._lookups: dict[int, asyncio.Future[TaskLookup]] = {}
        self._requests = 0
        self._folder = ThreadPoolExecutor(
            1, thread_name_prefix="fold", initializer=lower_thread_priority
        )
        self._he = he
        self._kind = partial_kind(he, secagg)
        self._partials: dict[int, PartialSum] = {}

    # ------------------------------------------------------------------------------ CoreLink

    async def lookup(self, learner_id: str, task_id: str) -> TaskLookup:
        self._requests += 1
        future: asyncio.Future[TaskLookup] = asyncio.get_running_loop().create_future()
        self._lookups[self._requests] = future
        self.channel.send(("lookup", self._requests, learner_id, task_id))
        return await future

    def learner_joined(
        self,
        learner_id: str,
        session_id: str,
        num_examples: int,
        capabilities: frozenset[str],
        held: tuple[str, int, int] | None,
    ) -> asyncio.Future[None]:
        self.channel.send(("joined", learner_id, session_id, num_examples, capabilities, held))
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)  # the hub has it in order; nothing here waits for the core
        return done

    async def learner_lost(self, learner_id: str, session_id: str, reason: str) -> None:
        self.channel.send(("lost", learner_id, session_id, reason))

    async def learners_heard(self, ages: Mapping[str, float]) -> None:
        self.channel.send(("heard", dict(ages)))

    async def update_arrived(
        self, learner_id: str, report: UpdateReport, update: wire.FloatVector | Segments | bytes
    ) -> None:
        length = len(update)
        if self.forward:
            if isinstance(update, bytes):  # ciphertexts or masked values, as they came
                values: bytes | memoryview = update
            else:
                values = (update if isinstance(update, np.ndarray) else update.to_array()).data
            self.channel.send(("update", learner_id, report, -1, length), values)
            await self.channel.drain()  # the channel's buffer bounds what waits to be sent
            return
        if self._budget is None:
            size = length if isinstance(update, bytes) else length * wire.WIRE_DTYPE.itemsize
            per_update = max(size, 1)
            self._budget = asyncio.Semaphore(max(4, self._budget_bytes // per_update))
        await self._budget.acquire()
        self._handles += 1
        self._held[self._handles] = update
        self.channel.send(("update", learner_id, report, self._handles, length))

    async def evaluation_arrived(
        self, learner_id: str, task_id: str, num_examples: int, metrics: Mapping[str, float]
    ) -> None:
        self.channel.send(("evaluation", learner_id, task_id, num_examples, dict(metrics)))

    async def task_failed(self, learner_id: str, task_id: str, reason: str) -> None:
        self.channel.send(("task_failed", learner_id, task_id, reason))

    async def secure_step_arrived(self, learner_id: str, step: pb.SecAggStep) -> None:
        self.channel.send(("secagg", learner_id), step.SerializeToString())

    async def initial_model_refused(self, learner_id: str, reason: str) -> None:
        self.channel.send(("initial_refused", learner_id, reason))

    async def initialize_model(
        self, layout: pb.ModelLayout, flat: wire.FloatVector, source: str
    ) -> None:
        self.channel.send(("initial_model", source, layout.SerializeToString()), flat.data)

    # ------------------------------------------------------------------------------ the hub's asks

    def lookup_answered(self, request: int, found: TaskLookup) -> None:
        future = self._lookups.pop(request, None)
        if future is not None and not future.done():
            future.set_result(found)

    def on_partials(self, instructions: list[tuple[Any, ...]]) -> None:
        """The core's fold, drop and reset instructions, in order; consecutive folds into one
        partial go to the fold thread as one `add_many`."""
        updates: list[wire.FloatVector | Segments | bytes] = []
        weights: list[float] = []
        target = -1
        for instruction in instructions:
            kind = instruction[0]
            if kind == "fold":
                _, handle, weight, generation = instruction
                if generation != target:
                    self._fold(target, updates, weights)
                    updates, weights, target = [], [], generation
                update = self._held.pop(handle, None)
                if update is not None:
                    updates.append(update)
                    weights.append(weight)
                continue
            self._fold(target, updates, weights)
            updates, weights = [], []
            if kind == "drop":
                self.drop(instruction[1])
            elif kind == "reset":
                self.reset(instruction[1])
        self._fold(target, updates, weights)

    def _fold(
        self,
        generation: int,
        updates: list[wire.FloatVector | Segments | bytes],
        weights: list[float],
    ) -> None:
        """Fold held updates into partial `generation` (in order, on the fold thread)."""
        if not updates:
            return
        partial = self._partials.get(generation)
        if partial is None:
            partial = new_partial(self._kind, updates[0], self._he)
            self._partials[generation] = partial
        loop = asyncio.get_running_loop()
        done = loop.run_in_executor(self._folder, partial.add_many, updates, weights)
        count = len(updates)
        done.add_done_callback(lambda _: self._release_budget(count))

    def drop(self, handle: int) -> None:
        if self._held.pop(handle, None) is not None:
            self._release_budget()

    def reset(self, generation: int) -> None:
        partial = self._partials.pop(generation, None)
        if partial is not None:  # after the folds queued before it
            asyncio.get_running_loop().run_in_executor(self._folder, partial.reset)

    async def export(self, request: int, generation: int) -> None:
        """Send partial `generation` to the core once the folds before it are done."""
        partial = self._partials.pop(generation, None)
        if partial is None:
            self.channel.send(("partial", request, 0.0, 0))
            return
        loop = asyncio.get_running_loop()
        total, weight, count = await loop.run_in_executor(self._folder, partial.export)
        self.channel.send(("partial", request, weight, count), total)

    def _release_budget(self, count: int = 1) -> None:
        if self._budget is not None:
            for _ in range(count):
                self._budget.release()

    def close(self) -> None:
        self._folder.shutdown(wait=False, cancel_futures=True)


def worker_main(argv: list[str]) -> None:
    """Entry point of a worker process, with arguments INDEX SOCKET PORT LEVEL json|console
    (started by `hub.WorkerHub`; its settings come over the channel)."""
    index, hub_socket, port, level, log_format = argv
    configure_logging(level, log_format == "json")
    raise_open_file_limit()
    # The core's process decides when to stop (SIGTERM/Ctrl-C reach the whole process group).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    run_event_loop(_serve(int(index), hub_socket, int(port)))


async def _serve(index: int, hub_socket: str, port: int) -> None:
    reader, writer = await asyncio.open_unix_connection(hub_socket, limit=1 << 20)
    channel = Channel(reader, writer)
    channel.send(("hello", index))
    header, _ = await channel.receive()
    if header[0] != "config":
        raise RuntimeError(f"worker {index}: expected the controller's settings, got {header[0]}")
    config: ControllerConfig = header[1]
    store = ModelStore(config.download_chunk())
    stats = ControllerStats()
    limiter = LogLimiter()
    sessions: dict[str, Session] = {}
    link = HubLink(channel, store, config.upload_buffer_bytes, config.he, config.secagg)
    ingest = Ingest(config, link, store, stats, limiter)
    streams = StreamServer(config, link, ingest, stats, limiter, sessions)

    def state_changed(state: FederationState) -> None:
        streams.set_health(*health_of(state))

    delivery = EffectDelivery(sessions, store, None, asyncio.Event(), state_changed)
    delivery.upload_grant_bytes = config.grant_threshold()
    delivery.download_receipt_bytes = config.receipt_threshold()
    relay = None
    if config.he is not None and config.he.committee:  # multiparty keys: this worker's members
        relay = delivery.enable_relay(config.he)
        relay.forward = lambda share: channel.send(("share",), share.SerializeToString())
        streams.relay = ingest.relay = relay
    link.run_id, link.protocol, link.forward = header[2], header[3], header[4]
    streams.config = dataclasses.replace(config, port=port)
    await streams.start(reuse_port=True)
    channel.send(("serving", streams.port))
    lag = LoopLag()
    monitors = [
        asyncio.ensure_future(lag.run()),
        asyncio.ensure_future(_report(channel, stats, lag)),
    ]
    grace = 2.0
    try:
        while True:
            header, body = await channel.receive()
            kind = header[0]
            if kind == "effects":
                delivery(header[1])
            elif kind == "version":
                _, version, layout_bytes, lengths = header
                encodings = _split(body, lengths)
                plain = encodings.pop(pb.DTYPE_FLOAT32)
                layout = pb.ModelLayout.FromString(layout_bytes)
                # The core's process has the values; the dtype says what the version is.
                no_values = np.empty(0, dtype=np.uint8 if config.he else wire.WIRE_DTYPE)
                store.publish(layout, version, no_values, plain, encodings)
                if relay is not None:
                    values = wire.num_parameters(layout)
                    relay.published(version, relay.he.settings.ciphertexts_for(values))
            elif kind == "share" and relay is not None:  # checked by another worker's relay
                relay.peer_share(pb.DecryptionShare.FromString(body))
            elif kind == "reconfigure":  # credentials reloaded (SIGHUP)
                streams.config = dataclasses.replace(header[1], port=port)
            elif kind == "state":
                link.ready, link.provider, link.federation_status = header[1], header[2], header[3]
            elif kind == "lookup_reply":
                link.lookup_answered(header[1], header[2])
            elif kind == "partials":
                link.on_partials(header[1])
            elif kind == "export":
                await link.export(header[1], header[2])
            elif kind == "close_session":
                _, learner_id, session_id, why, code = header
                streams.close_session(learner_id, session_id, grpc.StatusCode[code], why)
            elif kind == "stop":
                grace = float(header[1])
                break
    except ChannelClosed:
        log.warning("worker_orphaned", worker=index, reason="the core's process went away")
    for monitor in monitors:
        monitor.cancel()
    if relay is not None:  # the final version's shares are on their way
        await relay.released(grace)
    streams.finish_all()
    with contextlib.suppress(Exception):
        await asyncio.sleep(0.2)  # let the last messages (shutdown) reach the learners
        await streams.stop(grace)
    delivery.close()
    ingest.close()
    link.close()
    channel.close()


async def _report(channel: Channel, stats: ControllerStats, lag: LoopLag) -> None:
    """Send this worker's counters and loop lag to the core's process (for /metrics)."""
    while True:
        await asyncio.sleep(STATS_INTERVAL_SECONDS)
        with contextlib.suppress(ChannelClosed, ConnectionError):
            channel.send(("stats", stats, lag.last_seconds))


def _split(body: bytes, lengths: dict[int, list[int]]) -> dict[int, list[bytes]]:
    """A version's encoded messages by dtype, one bytes object each (one copy per worker)."""
    view = memoryview(body)
    out: dict[int, list[bytes]] = {}
    offset = 0
    for dtype, sizes in lengths.items():
        messages = out[dtype] = []
        for size in sizes:
            messages.append(bytes(view[offset : offset + size]))
            offset += size
    return out


if __name__ == "__main__":
    import sys

    worker_main(sys.argv[1:])
