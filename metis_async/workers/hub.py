"""The core's process of a multi-process controller: the federation core and its workers.

`WorkerHub` runs the `FederationCore` (on a `CoreRunner` thread, as the single-process
controller does) and N ingest worker processes (`workers.worker`), each connected by a
`Channel` over a Unix socket. It routes events from the workers into the core and the core's
effects to the worker holding the addressed learner; a new version is encoded once here and
sent to every worker once, which writes the same bytes to all its streams.

Learners are routed by id: a learner that reconnects to another worker keeps its identity
(and its closed-task memory, in the core); the stream it left behind is closed. A worker that
dies is restarted on the same port; its learners are lost to the core (their tasks are void)
until they reconnect, and the updates it had folded into its partial sum are lost with it, so
an accepted update is never counted twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
from collections import deque
from collections.abc import Sequence
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import structlog

from metis_async import wire
from metis_async.aggregation.server_step import AggregationSettings
from metis_async.delivery import CommitHook, CoreRunner, EffectDelivery
from metis_async.effects import (
    Effect,
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
from metis_async.federation import UpdateReport
from metis_async.protocols import Policy
from metis_async.server import ControllerConfig, ControllerFace
from metis_async.telemetry import ControllerStats
from metis_async.v1 import controller_pb2 as pb
from metis_async.workers import raise_open_file_limit
from metis_async.workers.channel import Channel, ChannelClosed
from metis_async.workers.partials import Partial, RemoteUpdate

log = structlog.get_logger("metis_async.workers")

COLLECT_TIMEOUT_SECONDS = 120.0
"""Longest wait for the workers' partial sums at a commit; a worker that does not answer in
time is treated as dead for this commit (its partial is lost)."""

START_TIMEOUT_SECONDS = 60.0


@dataclass
class _Worker:
    index: int
    process: subprocess.Popen[bytes] | None = None
    channel: Channel | None = None
    port: int = 0
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    learners: set[str] = field(default_factory=set)
    generation: int = 0  # incremented at each (re)start: stale frames are ignored
    pending: dict[int, asyncio.Future[Partial | None]] = field(default_factory=dict)
    restart_delay: float = 0.05


class WorkerHub(ControllerFace):
    """A controller of N ingest worker processes around one federation core.

    Same face as `server.Controller` (start, wait_finished, stop, version, ...). Args as for
    `Controller`, plus:
        workers: number of ingest worker processes (>= 1).
        log_level: log level of the workers.
        json_logs: whether workers log JSON lines.
    """

    def __init__(
        self,
        policy: Policy,
        config: ControllerConfig | None = None,
        *,
        workers: int = 2,
        initial_model: Sequence[npt.NDArray[np.generic]] | None = None,
        on_commit: CommitHook | None = None,
        aggregation: AggregationSettings | None = None,
        run_id: str | None = None,
        rng: random.Random | None = None,
        log_level: str = "warning",
        json_logs: bool = False,
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self._build_core(policy, config, aggregation, run_id, rng)
        agg = self.core.aggregation
        # Ciphertexts and masked vectors are summed in workers like float updates; encrypted
        # deltas of round-less policies are mixed at commit by the core: forwarded whole.
        self._secure = self.config.he is not None or self.config.secagg
        if self.config.he is not None:
            self.forward_updates = not self.core.rounds
        else:
            self.forward_updates = bool(policy.mixes_full_models or agg.robust or agg.clip_norm)
        self._initial = initial_model
        self._finished = asyncio.Event()
        self._local = EffectDelivery({}, self.store, on_commit, self._finished)
        self._runner = CoreRunner(self.core, self._deliver, self._reschedule, self._on_fatal)
        self._workers = [_Worker(i) for i in range(workers)]
        self._routes: dict[str, tuple[int, str]] = {}  # learner id -> (worker, session id)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup: asyncio.TimerHandle | None = None
        self._dir = ""
        self._socket = ""
        self._server: asyncio.AbstractServer | None = None
        self._watchers: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._log = (log_level, json_logs)
        self._request_ids = 0
        # Each worker's stream-side counters and event-loop lag, as it last reported them.
        self.worker_stats: dict[int, tuple[ControllerStats, float]] = {}
        self._events: list[tuple[Any, tuple[Any, ...]]] = []
        # Fold instructions from the core's thread, sent per worker in one frame per batch.
        self._outbox: deque[tuple[int, tuple[Any, ...]]] = deque()
        self.port = 0

    # ------------------------------------------------------------------------------ lifecycle

    async def start(self) -> int:
        """Start the workers on one port and wait until every one serves; returns the port."""
        self._loop = asyncio.get_running_loop()
        raise_open_file_limit()
        await self._adopt_initial_model()
        self.port = self.config.port or _free_port(self.config.host)
        self._dir = tempfile.mkdtemp(prefix="metis-async-")
        os.chmod(self._dir, 0o700)
        self._socket = str(Path(self._dir) / "hub.sock")
        self._server = await asyncio.start_unix_server(self._accept, self._socket, limit=1 << 20)
        for worker in self._workers:
            self._spawn(worker)
        waits = [asyncio.wait_for(w.ready.wait(), START_TIMEOUT_SECONDS) for w in self._workers]
        await asyncio.gather(*waits)
        log.info(
            "controller_started",
            address=f"{self.config.host}:{self.port}",
            protocol=self.core.policy.name,
            workers=len(self._workers),
            forward_updates=self.forward_updates,
            model_ready=self.store.ready,
            run_id=self.core.run_id,
        )
        return self.port

    def sessions(self) -> list[dict[str, object]]:
        """Connected learners (by worker)."""
        return [{"learner_id": lid, "worker": w} for lid, (w, _) in self._routes.items()]

    def worker_pids(self) -> list[int]:
        """Process ids of the running workers."""
        return [w.process.pid for w in self._workers if w.process is not None]

    async def stop(self, grace_seconds: float = 2.0) -> None:
        """Drain (learners are told to come back later), stop the workers and the core."""
        self._stopping = True
        if not self.finished:
            await self._runner.call(self.core.drain)
        if self._wakeup is not None:
            self._wakeup.cancel()
        for worker in self._workers:
            if worker.channel is not None:
                worker.channel.send(("stop", grace_seconds))
        deadline = asyncio.get_running_loop().time() + grace_seconds + 5.0
        for worker in self._workers:
            process = worker.process
            while process is not None and process.poll() is None:
                if asyncio.get_running_loop().time() > deadline:
                    process.kill()
                    process.wait()
                    break
                await asyncio.sleep(0.05)
        for task in list(self._watchers):
            task.cancel()
        for worker in self._workers:
            if worker.channel is not None:
                await worker.channel.aclose()
                worker.channel = None
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        self._local.close()
        self._runner.close()
        self._release_state()
        shutil.rmtree(self._dir, ignore_errors=True)
        log.info("controller_stopped", version=self.store.version, **self.stats.snapshot())

    # ------------------------------------------------------------------------------ workers

    def _spawn(self, worker: _Worker) -> None:
        worker.generation += 1
        worker.ready.clear()
        level, json_logs = self._log
        command = [
            sys.executable,
            "-c",
            _WORKER_BOOT,
            _PACKAGE_ROOT,
            str(worker.index),
            self._socket,
            str(self.port),
            level,
            "json" if json_logs else "console",
        ]
        # A fresh interpreter (not fork: this process has threads; not multiprocessing's spawn,
        # which re-imports the caller's main module), importing the very package this process
        # runs: `python -m` would put the working directory first on the path, and a source
        # checkout there (no built extension) would shadow the installed package.
        worker.process = subprocess.Popen(command, stdin=subprocess.DEVNULL)
        watcher = asyncio.create_task(self._watch(worker, worker.generation))
        self._watchers.add(watcher)
        watcher.add_done_callback(self._watchers.discard)

    async def _watch(self, worker: _Worker, generation: int) -> None:
        """Restart the worker when its process dies (unless the controller is stopping)."""
        process = worker.process
        assert process is not None
        started = asyncio.get_running_loop().time()
        await _wait_exit(process)
        if self._stopping or worker.generation != generation:
            return
        log.error("worker_died", worker=worker.index, exitcode=process.returncode)
        await self._worker_lost(worker)
        lived = asyncio.get_running_loop().time() - started
        worker.restart_delay = 0.1 if lived > 30 else min(10.0, max(0.1, worker.restart_delay * 2))
        await asyncio.sleep(worker.restart_delay)
        if not self._stopping:
            self._spawn(worker)

    async def _worker_lost(self, worker: _Worker) -> None:
        if worker.channel is not None:
            worker.channel.close()
            worker.channel = None
        for future in worker.pending.values():
            if not future.done():
                future.set_result(None)
        worker.pending.clear()
        for learner_id in sorted(worker.learners):
            route = self._routes.get(learner_id)
            if route is not None and route[0] == worker.index:
                del self._routes[learner_id]
                self._runner.submit(
                    self.core.learner_lost, self._now(), learner_id, "ingest worker died"
                )
        worker.learners.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        channel = Channel(reader, writer)
        try:
            header, _ = await channel.receive()
        except ChannelClosed:
            return
        kind, index = header[0], header[1]
        if kind != "hello" or not 0 <= index < len(self._workers):
            channel.close()
            return
        worker = self._workers[index]
        worker.channel = channel
        channel.send(
            (
                "config",
                self._worker_config(),
                self.core.run_id,
                self.core.policy.name,
                self.forward_updates,
            )
        )
        self._send_version(worker)
        self._send_state(worker)
        try:
            while True:
                header, body = await channel.receive()
                self._on_frame(worker, header, body)
        except ChannelClosed:
            pass

    # ------------------------------------------------------------------------------ events

    def _on_frame(self, worker: _Worker, header: tuple[Any, ...], body: bytes) -> None:
        kind = header[0]
        core, now = self.core, self._now()
        submit = self._queue_event
        if kind == "serving":
            worker.port = header[1]
            worker.ready.set()
            pid = worker.process.pid if worker.process is not None else 0
            log.info("worker_ready", worker=worker.index, pid=pid, port=header[1])
        elif kind == "joined":
            _, learner_id, session_id, num_examples, capabilities, held = header
            old = self._routes.get(learner_id)
            if old is not None:  # it reconnected elsewhere (or again): end the old stream
                self._close_remote(old, learner_id, "replaced by a newer session")
                submit(core.learner_lost, now, learner_id, "replaced by a newer session")
            self._routes[learner_id] = (worker.index, session_id)
            worker.learners.add(learner_id)
            submit(core.learner_joined, now, learner_id, num_examples, capabilities, held)
        elif kind == "lost":
            _, learner_id, session_id, reason = header
            if self._routes.get(learner_id) == (worker.index, session_id):
                del self._routes[learner_id]
                worker.learners.discard(learner_id)
                submit(core.learner_lost, now, learner_id, reason)
        elif kind == "heard":  # ages of its learners' last messages, for "last seen"
            submit(core.learners_heard, now, header[1])
        elif kind == "update":
            _, learner_id, report, handle, length = header
            update: wire.FloatVector | RemoteUpdate | bytes
            if handle < 0 and self._secure:  # ciphertexts or masked values, as they came
                update = body
            elif handle < 0:  # forwarded whole
                update = np.frombuffer(body, dtype=wire.WIRE_DTYPE)
            else:
                update = RemoteUpdate(self, worker.index, handle, length)
            assert isinstance(report, UpdateReport)
            submit(core.update_arrived, now, learner_id, report, update)
        elif kind == "share":  # a member's decryption shares: every other worker's relay too
            for other in self._workers:
                if other is not worker and other.channel is not None:
                    other.channel.send(("share",), body)
        elif kind == "secagg":
            step = pb.SecAggStep.FromString(body)
            submit(core.secure_step_arrived, now, header[1], step)
        elif kind == "evaluation":
            _, learner_id, task_id, num_examples, metrics = header
            submit(core.evaluation_arrived, now, learner_id, task_id, num_examples, metrics)
        elif kind == "task_failed":
            _, learner_id, task_id, reason = header
            submit(core.task_failed, now, learner_id, task_id, reason)
        elif kind == "initial_refused":
            _, learner_id, reason = header
            submit(core.initial_model_refused, now, learner_id, reason)
        elif kind == "initial_model":
            _, learner_id, layout_bytes = header
            if not core.ready:
                layout = pb.ModelLayout.FromString(layout_bytes)
                flat = np.frombuffer(body, dtype=wire.WIRE_DTYPE).copy()
                submit(core.initialize_model, now, layout, flat, learner_id)
        elif kind == "lookup":
            _, request, learner_id, task_id = header
            if worker.channel is not None:
                found = core.lookup(learner_id, task_id)
                worker.channel.send(("lookup_reply", request, found))
        elif kind == "stats":
            self.worker_stats[worker.index] = (header[1], float(header[2]))
        elif kind == "partial":
            _, request, weight, count = header
            future = worker.pending.pop(request, None)
            if future is not None and not future.done():
                future.set_result((bytes(body), weight, count) if count else None)
        else:
            log.error("worker_frame_unknown", worker=worker.index, kind=str(kind))

    def _queue_event(self, method: Any, *args: Any) -> None:
        """Queue a core event; the events read in one loop iteration go to the core at once."""
        if not self._events:
            asyncio.get_running_loop().call_soon(self._submit_events)
        self._events.append((method, args))

    def _submit_events(self) -> None:
        events, self._events = self._events, []
        self._runner.submit_batch(events)

    def _close_remote(
        self,
        route: tuple[int, str],
        learner_id: str,
        why: str,
        code: grpc.StatusCode = grpc.StatusCode.ALREADY_EXISTS,
    ) -> None:
        worker = self._workers[route[0]]
        worker.learners.discard(learner_id)
        if worker.channel is not None:
            worker.channel.send(("close_session", learner_id, route[1], why, code.name))

    def learner_workers(self) -> dict[str, int]:
        return {lid: worker for lid, (worker, _) in list(self._routes.items())}

    def kick(self, learner_id: str, reason: str, code: grpc.StatusCode) -> bool:
        route = self._routes.get(learner_id)
        if route is None:
            return False
        self._close_remote(route, learner_id, reason, code)
        return True

    # ------------------------------------------------------------------------------ effects

    def _deliver(self, effects: list[Effect]) -> None:
        """Carry out the core's effects (on the loop): here, and at the learners' workers."""
        self._send_outbox()
        self._local(effects)  # publishes versions, runs the commit hook, notes the finish
        batches: dict[int, list[Effect]] = {}
        for effect in effects:
            if isinstance(effect, VersionCommitted):
                self._flush(batches)
                for worker in self._workers:
                    self._send_version(worker)
                continue
            target = _addressee(effect)
            if target is None:
                if isinstance(effect, (SendStatus, Shutdown)):
                    self._flush(batches)
                    for worker in self._workers:
                        batches.setdefault(worker.index, []).append(effect)
                    self._flush(batches)
                continue
            route = self._routes.get(target)
            if route is not None:
                batches.setdefault(route[0], []).append(effect)
        self._flush(batches)
        for worker in self._workers:
            self._send_state(worker)

    def _flush(self, batches: dict[int, list[Effect]]) -> None:
        for index, batch in batches.items():
            channel = self._workers[index].channel
            if channel is None:
                continue
            # Frames of a bounded size: pickling holds the GIL, and a broadcast to 100,000
            # learners in one frame kept the dashboard's thread waiting for most of a second.
            for start in range(0, len(batch), EFFECTS_PER_FRAME):
                channel.send(("effects", batch[start : start + EFFECTS_PER_FRAME]))
        batches.clear()

    def _send_version(self, worker: _Worker) -> None:
        """The published version's encoded messages, once per worker."""
        channel = worker.channel
        if channel is None or not self.store.ready or self.store.layout is None:
            return
        encodings = self.store.encodings()  # float32 and each download codec in use
        lengths = {dtype: [len(m) for m in messages] for dtype, messages in encodings.items()}
        body = b"".join(m for messages in encodings.values() for m in messages)
        layout = self.store.layout.SerializeToString()
        channel.send(("version", self.store.version, layout, lengths), body)

    def _configured(self, config: ControllerConfig) -> None:
        for worker in self._workers:
            if worker.channel is not None:
                worker.channel.send(("reconfigure", self._worker_config()))

    def _worker_config(self) -> ControllerConfig:
        """The settings a worker serves with: its share of `max_learners`."""
        limit = self.config.max_learners
        share = -(-limit // len(self._workers)) if limit else 0
        return dataclasses.replace(self.config, max_learners=share)

    def _send_state(self, worker: _Worker) -> None:
        if worker.channel is not None:
            core = self.core
            worker.channel.send(("state", core.ready, core.provider, core.status_now()))

    # ------------------------------------------------------------------------------ PartialSums

    def fold(self, worker: int, handle: int, weight: float, generation: int) -> None:
        self._to_worker(worker, ("fold", handle, weight, generation))

    def drop(self, worker: int, handle: int) -> None:
        self._to_worker(worker, ("drop", handle))

    def reset(self, workers: set[int], generation: int) -> None:
        for worker in workers:
            self._to_worker(worker, ("reset", generation))

    def collect(self, workers: set[int], generation: int) -> dict[int, Partial | None]:
        """Blocks the core's thread until the listed workers sent their partial sums."""
        loop = self._loop
        assert loop is not None
        future = asyncio.run_coroutine_threadsafe(self._collect(workers, generation), loop)
        try:
            return future.result(COLLECT_TIMEOUT_SECONDS)
        except FutureTimeout:
            log.error("partial_sums_timeout", workers=sorted(workers), generation=generation)
            future.cancel()
            return {}

    async def _collect(self, workers: set[int], generation: int) -> dict[int, Partial | None]:
        self._send_outbox()  # every fold the core asked for reaches its worker first
        waits = []
        asked = []
        for index in sorted(workers):
            worker = self._workers[index]
            if worker.channel is None:
                continue
            self._request_ids += 1
            future: asyncio.Future[Partial | None] = asyncio.get_running_loop().create_future()
            worker.pending[self._request_ids] = future
            worker.channel.send(("export", self._request_ids, generation))
            waits.append(future)
            asked.append(index)
        partials = await asyncio.gather(*waits)
        return dict(zip(asked, partials, strict=True))

    def _to_worker(self, index: int, header: tuple[Any, ...]) -> None:
        """From the core's thread: queued, sent (in call order) after the core call ends."""
        self._outbox.append((index, header))

    def _send_outbox(self) -> None:
        """Send the queued fold instructions, one frame per worker (on the loop)."""
        batches: dict[int, list[tuple[Any, ...]]] = {}
        outbox = self._outbox
        while outbox:
            index, header = outbox.popleft()
            batches.setdefault(index, []).append(header)
        for index, headers in batches.items():
            channel = self._workers[index].channel
            if channel is not None:
                channel.send(("partials", headers))

    # ------------------------------------------------------------------------------ time

    def _now(self) -> float:
        loop = self._loop or asyncio.get_running_loop()
        return loop.time()

    def _reschedule(self, when: float | None) -> None:
        if self._wakeup is not None:
            self._wakeup.cancel()
            self._wakeup = None
        if when is None or self.finished or self._loop is None:
            return
        delay = max(0.0, when - self._now())
        self._wakeup = self._loop.call_later(delay, self._on_wakeup)

    def _on_wakeup(self) -> None:
        self._wakeup = None
        self._runner.submit(self.core.tick, self._now())


EFFECTS_PER_FRAME = 4096
"""Most effects pickled into one channel frame (the order across frames is kept)."""

_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])
"""The directory this process imported `metis_async` from."""
_WORKER_BOOT = (
    "import sys; sys.path[0] = sys.argv.pop(1); "
    "from metis_async.workers.worker import worker_main; worker_main(sys.argv[1:])"
)


def _addressee(effect: Effect) -> str | None:
    """The learner an effect is for; None for everyone or for the core's process itself."""
    if isinstance(effect, SendTask):
        return effect.task.learner_id
    if isinstance(
        effect, (SendModel, SendCancel, SendNotice, SendAck, SendSecure, RequestInitialModel)
    ):
        return effect.learner_id
    if isinstance(effect, (SendStatus, Shutdown)):
        return effect.learner_id
    return None


async def _wait_exit(process: subprocess.Popen[bytes]) -> None:
    """Wait (without blocking the loop) until `process` exits."""
    try:
        fd = os.pidfd_open(process.pid)  # Linux >= 5.3: readable when the process exits
    except (AttributeError, OSError):
        await asyncio.to_thread(process.wait)
        return
    loop = asyncio.get_running_loop()
    exited = asyncio.Event()
    loop.add_reader(fd, exited.set)
    try:
        await exited.wait()
    finally:
        loop.remove_reader(fd)
        os.close(fd)
    process.wait()


def _free_port(host: str) -> int:
    with contextlib.closing(socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
