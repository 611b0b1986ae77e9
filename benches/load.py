"""Many-learner load test: simulated learners on the real wire contract against a real controller.

    python benches/load.py [--learners N] [--params P] [--rounds R] [--processes K] [--json]

Starts `metis-async serve` (synchronous FedAvg: every connected learner trains every round, a
round commits when all N updates arrived) as its own process with an initial model of P float32,
then K load processes that each hold N/K learners: asyncio streams, one TCP connection per
learner (`--connections-per-process C` multiplexes them on C connections instead). Learners are
"instant": each answers every train task with the same fixed delta (or sleeps a per-learner time
drawn from a log-normal, `--speed-seconds`). Every loop is bounded in count and time; traffic
stays on loopback.

Measured:
- `streams_held`: learners welcomed at the end of the connect phase (at least once; a learner
  whose stream broke and is being retried still counts); `streams_open_when_all_welcomed`:
  streams welcomed and not ended at that moment;
- `connect_seconds`: from the first learner dialing until every learner was welcomed
  (`start_to_all_welcomed_seconds` also counts starting the load processes);
- `broadcast_seconds`: per round, from the first learner's train task to the last learner's
  (median over rounds; the model for round 1 travels too, so round 1 is reported apart);
- `round_seconds`: between the first train tasks of consecutive versions (median over rounds
  2..R): one broadcast, N trainings and N uploads, the fold and the commit;
- `upload_to_next_task_p50_ms` / `_p99_ms`: from a learner's last upload chunk written to its next
  train task (the controller has no per-update acknowledgement yet: the next task is the first
  sign the update counted);
- `ingest_updates_per_second` / `ingest_MBps`: N updates of the round over the time from the
  first upload to the last upload written;
- `rss_bytes_per_stream` and `fds_per_stream`: controller RSS and open files with N streams
  held, minus the same before any learner connected, per stream;
- `cpu_seconds_per_round`: controller CPU (user + system, its workers included) per steady
  round, sampled every 0.2 s between the first tasks of version 1 and of the last version;
- `learners_shut_down`: learners that received the controller's final `Shutdown`;
- with `--learners-first` (learners start first and wait for the port):
  `start_to_first_version_seconds`, from launching the controller until a learner first holds
  version 1;
- `first_round_seconds`: from the first train task of version 0 to the last learner's first
  upload written (one broadcast, one upload each);
- with `--dashboard`: the controller also serves its dashboard and Admin service, and
  `dashboard` holds how fast they answered once a second during the run (summary, first page
  of learners, Admin status: p50/p99/max ms) and the most connected learners the page showed
  (`benches/dashboard_probe.py`);
- with `--compare-bare` (one round): the same load against `benches/bare_server.py` under
  `bare`, and `vs_bare`: ours / bare for connect time, the first broadcast, the first round
  and RSS per stream. The first run after a quiet spell is the slowest on this VM (connect
  1.15-1.4x the runs after it, whichever server it was; a 2,000-learner warm-up did not
  help), so a discarded warm-up run against the bare server, at full size, goes first.
  `--pairs K` runs K pairs, alternating which server goes first in a pair; `pairs` holds each
  pair's figures and ratios, and `vs_bare` is their median (the top-level figures are the
  first pair's).
- with `--codec C` (float16, bfloat16, int8): learners offer C, the controller sends models
  and asks for uploads in it, and `upload_dtypes` / `model_dtypes` count the learners that
  uploaded and received each dtype. The bare server of `--compare-bare` still moves float32:
  what the wire allows for the model, the floor a codec is meant to beat.
With --json the last line is one JSON object, also written to benches/results/load.json (--out).
The controller's event-loop lag is measured by `benches/loop_lag.py` (in process); here the
controller is a separate process with no metrics endpoint yet.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import datetime as dt
import itertools
import json
import multiprocessing as mp
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from learner_messages import delta_result  # benches/, beside this script

from metis_async import wire
from metis_async._core import encode_chunk_messages
from metis_async.v1 import controller_pb2 as pb

RESULTS = Path(__file__).resolve().parent / "results" / "load.json"
JOIN = "/metis_async.v1.Controller/Join"
CHUNK_FIELD = pb.LearnerMessage.DESCRIPTOR.fields_by_name["chunk"].number
RUN_SECONDS_LIMIT = 900.0  # every phase gives up after this
CODECS = {"float16": pb.DTYPE_FLOAT16, "bfloat16": pb.DTYPE_BFLOAT16, "int8": pb.DTYPE_INT8}

Encoded = tuple[int, list[bytes], int]
"""An upload pre-encoded once: (payload dtype, chunk messages with payload id 1, total bytes)."""


class UploadSet:
    """A load learner's fixed delta, encoded once per (dtype, chunk size) a Welcome asks for:
    the codec it offers (`--codec`) when the controller chose it, else float32, in chunks of at
    most `Welcome.max_chunk_bytes`, as a real learner sends them.

    Args:
        delta: the float32 update every learner of the process uploads.
        codec: the payload dtype offered in `Hello.codecs` (DTYPE_FLOAT32: none).
        rounds: uploads per learner (each needs its own payload id).
    """

    def __init__(self, delta: np.ndarray[Any, np.dtype[np.float32]], codec: int, rounds: int):
        self.delta, self.codec, self.rounds = delta, codec, rounds
        self._encoded: dict[tuple[int, int], Encoded] = {}
        self.default = self.for_welcome(None)  # built before anyone dials

    def for_welcome(self, welcome: pb.Welcome | None) -> Encoded:
        """The upload a learner sends after `welcome` (None: the defaults)."""
        dtype = pb.DTYPE_FLOAT32
        if welcome is not None and self.codec != dtype and welcome.upload_dtype == self.codec:
            dtype = self.codec
        size = wire.MAX_CHUNK_BYTES
        if welcome is not None and welcome.max_chunk_bytes:
            size = min(size, int(welcome.max_chunk_bytes))
        found = self._encoded.get((dtype, size))
        if found is None:
            found = self._encoded[(dtype, size)] = _encoded(self.delta, dtype, size)
            for payload_id in range(2, self.rounds + 1):  # uploads then do no protobuf work
                _renumbered(found[1], payload_id)
        return found


# ------------------------------------------------------------------------------ one learner


ATTEMPTS = 20
"""Failed streams in a row before a learner gives up (a real learner reconnects with backoff)."""


async def _learner(
    address: str,
    learner_id: str,
    channel: grpc.aio.Channel,
    payloads: UploadSet,
    rounds: int,
    sleep_seconds: float,
    report: dict[str, Any],
) -> None:
    report["dialed"] = time.time()
    report["tasks"], report["uploads"] = [], []
    errors: list[str] = []
    failures = 0  # in a row: a welcome resets it, as a real learner's backoff does
    deadline = time.monotonic() + RUN_SECONDS_LIMIT
    while failures < ATTEMPTS and time.monotonic() < deadline:
        welcomes = report.get("welcomes", 0)
        error = await _session(learner_id, channel, payloads, rounds, sleep_seconds, report)
        if error is None:
            break
        errors.append(error)
        _count(FAILED)
        failures = 1 if report.get("welcomes", 0) > welcomes else failures + 1
        await asyncio.sleep(random.uniform(0.5, 2.0) * min(failures, 8))  # jittered backoff
    report["attempts"] = len(errors) + 1
    report["retried_because"] = [e[:90] for e in errors]
    if errors and failures >= ATTEMPTS:
        report["error"] = errors[-1]
        if "welcomed" not in report:
            _count(GAVE_UP)  # never held a stream


async def _session(
    learner_id: str,
    channel: grpc.aio.Channel,
    payloads: UploadSet,
    rounds: int,
    sleep_seconds: float,
    report: dict[str, Any],
) -> str | None:
    """One stream until the learner is done; the error that ended it early, if any."""
    # Learners started before the controller (--learners-first) wait for it to listen.
    call = channel.stream_stream(JOIN)(wait_for_ready=_WAIT_FOR_READY[0])
    capabilities = ["train", "delta", "bundle", "grant", "receipt"]
    hello = pb.Hello(
        learner_id=learner_id,
        num_examples=10,
        capabilities=capabilities,
        codecs=[payloads.codec] if payloads.codec != pb.DTYPE_FLOAT32 else [],
    )
    dtype, chunks, nbytes = payloads.default  # until the welcome says what to send
    tasks: list[tuple[int, float]] = report["tasks"]  # (version, unix time it arrived)
    uploads: list[tuple[float, float]] = report["uploads"]  # (first, last chunk written)
    layout_id = 0
    ended = False
    waiting: tuple[str, float] | None = None  # (task id, header written) awaiting its grant
    receipt: list[int] = []  # [version, chunks received, chunks] of a model asking for receipts
    gate = _connecting()
    await gate.acquire()  # bounded dialing: a fleet's joins are spread out, not all at once
    dialing = True
    open_stream = False
    try:
        await call.write(pb.LearnerMessage(hello=hello).SerializeToString())
        while len(uploads) < rounds and not ended:
            raw = await call.read()
            if raw is grpc.aio.EOF:
                break
            for message in _opened(raw):
                kind = message.WhichOneof("body")
                if kind in ("model", "chunk"):
                    if kind == "model":
                        report["model_dtype"] = pb.DType.Name(message.model.payload.dtype)
                    if (answer := _receipt(message, receipt)) is not None:
                        await call.write(answer)
                elif kind == "welcome":
                    open_stream = True
                    _count(OPEN)
                    report["welcomes"] = report.get("welcomes", 0) + 1
                    if "welcomed" not in report:
                        report["welcomed"] = time.time()
                        _count(WELCOMED)
                    if dialing:
                        gate.release()
                        dialing = False
                    dtype, chunks, nbytes = payloads.for_welcome(message.welcome)
                    report["upload_dtype"] = pb.DType.Name(dtype)
                elif kind == "layout":
                    layout_id = message.layout.layout_id
                elif kind == "train":
                    task = message.train
                    tasks.append((int(task.model_version), time.time()))
                    _count(TASKS)
                    if sleep_seconds:
                        await asyncio.sleep(sleep_seconds)
                    first = time.time()
                    await call.write(
                        delta_result(task, len(uploads) + 1, nbytes, len(chunks), layout_id, dtype)
                    )
                    if task.upload_grant:  # the chunks go when the controller has a slot
                        waiting = (task.task_id, first)
                        continue
                    for chunk in _renumbered(chunks, len(uploads) + 1):
                        await call.write(chunk)
                    uploads.append((first, time.time()))
                    _count(UPLOADS)
                elif kind == "grant" and waiting and message.grant.task_id == waiting[0]:
                    for chunk in _renumbered(chunks, len(uploads) + 1):
                        await call.write(chunk)
                    uploads.append((waiting[1], time.time()))
                    _count(UPLOADS)
                    waiting = None
                elif kind == "shutdown":
                    report["shutdown"] = time.time()
                    ended = True
        # the task of the version after the last upload (or the shutdown) ends the round
        while not ended:
            raw = await asyncio.wait_for(call.read(), RUN_SECONDS_LIMIT)  # a round of all N
            if raw is grpc.aio.EOF:
                break
            for message in _opened(raw):
                if (answer := _receipt(message, receipt)) is not None:
                    await call.write(answer)
                elif message.WhichOneof("body") == "train":
                    tasks.append((int(message.train.model_version), time.time()))
                    ended = True
                elif message.WhichOneof("body") == "shutdown":
                    report["shutdown"] = time.time()
                    ended = True
    except asyncio.InvalidStateError:  # the call ended before our first write: say how
        with contextlib.suppress(Exception):
            return f"ended before hello: {await call.code()} {await call.details()}"[:200]
        return "ended before hello"
    except (grpc.RpcError, asyncio.TimeoutError) as error:
        return repr(error)[:200]
    finally:
        if dialing:
            gate.release()
        if open_stream:
            _count(OPEN, -1)
        call.cancel()
    return None


DIALING_PER_PROCESS = 64
"""Learners of one load process between dialing and welcome at once (more starves this box)."""
_GATE: list[asyncio.Semaphore] = []
_WAIT_FOR_READY = [False]
_WELCOMED: list[Any] = []
"""Counters shared by all load processes: learners welcomed (at least once), failed attempts,
learners that gave up, streams open now (welcomed and not ended), train tasks received, uploads
written, load processes ready to dial."""
WELCOMED, FAILED, GAVE_UP, OPEN, TASKS, UPLOADS, READY = range(7)


def _count(which: int, by: int = 1) -> None:
    counters = _WELCOMED[0]
    with counters.get_lock():
        counters[which] += by


def _connecting() -> asyncio.Semaphore:
    if not _GATE:
        _GATE.append(asyncio.Semaphore(DIALING_PER_PROCESS))
    return _GATE[0]


def _opened(raw: bytes) -> list[pb.ControllerMessage]:
    """A received ControllerMessage, or the messages of a bundle, in order."""
    message = pb.ControllerMessage.FromString(raw)
    if message.WhichOneof("body") != "bundle":
        return [message]
    return [pb.ControllerMessage.FromString(m) for m in message.bundle.messages]


def _receipt(message: pb.ControllerMessage, state: list[int]) -> bytes | None:
    """The ModelReceived to send for a model header or chunk, if one is due (DOWNLOAD RECEIPTS
    in the proto); `state` is the learner's [version, chunks received, chunks] of the model."""
    kind = message.WhichOneof("body")
    if kind == "model":
        model = message.model
        state[:] = [model.version, 0, model.payload.num_chunks] if model.receipt else []
        return None
    if kind != "chunk" or not state:
        return None
    state[1] += 1  # each chunk at once, as the reference client does
    version, received, total = state
    if received == total:
        state.clear()
    answer = pb.ModelReceived(version=version, chunks=received)
    return pb.LearnerMessage(received=answer).SerializeToString()


def _encoded(delta: np.ndarray[Any, np.dtype[np.float32]], dtype: int, size: int) -> Encoded:
    """`delta` as the chunk messages (payload id 1, at most `size` bytes of data each) of a
    `dtype` payload."""
    if dtype == pb.DTYPE_FLOAT32:
        return dtype, encode_chunk_messages(delta, 1, size, CHUNK_FIELD), delta.nbytes
    header, chunks = wire.encode_payload(
        delta, 1, pb.PAYLOAD_KIND_DELTA, 0, max_chunk_bytes=size, dtype=dtype
    )
    messages = [pb.LearnerMessage(chunk=c).SerializeToString() for c in chunks]
    return dtype, messages, int(header.total_bytes)


def _renumbered(chunks: list[bytes], payload_id: int) -> list[bytes]:
    """The precomputed chunk messages carry payload id 1; later uploads need their own id."""
    if payload_id == 1:
        return chunks
    return [_with_payload_id(c, payload_id) for c in chunks]


_RENUMBERED: dict[tuple[int, int], bytes] = {}


def _with_payload_id(chunk: bytes, payload_id: int) -> bytes:
    key = (id(chunk), payload_id)
    cached = _RENUMBERED.get(key)
    if cached is None:
        message = pb.LearnerMessage.FromString(chunk)
        message.chunk.payload_id = payload_id
        cached = _RENUMBERED[key] = message.SerializeToString()
    return cached


def _load_process(
    address: str,
    first: int,
    count: int,
    params: int,
    rounds: int,
    connections: int,
    speed_seconds: float,
    seed: int,
    welcomed: Any,
    out: Any,
    learners_first: bool,
    codec: int,
) -> None:
    _WELCOMED.append(welcomed)
    _WAIT_FOR_READY[0] = learners_first
    delta = np.full(params, 1e-3, dtype=np.float32)
    payloads = UploadSet(delta, codec, rounds)
    rng = np.random.default_rng(seed)
    sleeps = (
        speed_seconds * rng.lognormal(0.0, 0.5, size=count) if speed_seconds else np.zeros(count)
    )

    async def main() -> list[dict[str, Any]]:
        limit = wire.MAX_CHUNK_BYTES + (1 << 20)
        if learners_first:
            _count(READY)  # the controller is launched once every load process waits
            await _until_listening(address)
        channels = []
        for c in range(connections or count):
            options = [
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                ("grpc.use_local_subchannel_pool", 1),  # a connection of its own
                ("grpc.http2.settings_timeout", 60_000),  # a busy box acks SETTINGS late
                ("metis_async.load.connection", f"{first}-{c}"),
            ]
            channels.append(grpc.aio.insecure_channel(address, options=options))
        if not learners_first:
            _count(READY)
        reports: list[dict[str, Any]] = [{} for _ in range(count)]
        learners = [
            _learner(
                address,
                f"load-{first + i}",
                channels[i % len(channels)],
                payloads,
                rounds,
                float(sleeps[i]),
                reports[i],
            )
            for i in range(count)
        ]
        try:
            await asyncio.wait_for(asyncio.gather(*learners), RUN_SECONDS_LIMIT)
        finally:
            for channel in channels:
                await channel.close()
        return reports

    out.send(asyncio.run(main()))
    out.close()


async def _until_listening(address: str) -> None:
    """Dial `address` every 5 ms until it accepts a TCP connection (bounded by the run's limit).

    Learners started before the controller (--learners-first) open their channels only then:
    gRPC's own reconnect backoff, even at 20-50 ms, spread the joins of 10 waiting learners over
    ~100 ms after the port opened (measured), which timed the client's backoff, not the
    controller.
    """
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + RUN_SECONDS_LIMIT
    while time.monotonic() < deadline:
        try:
            _, writer = await asyncio.open_connection(host.strip("[]"), int(port))
        except OSError:
            await asyncio.sleep(0.005)
            continue
        writer.close()
        return
    raise TimeoutError(f"{address} did not listen within {RUN_SECONDS_LIMIT} s")


# ------------------------------------------------------------------------------ the controller


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tree_stats(pid: int) -> dict[str, int]:
    """`_proc_stats` summed over process `pid` and its children (the ingest workers)."""
    pids = [pid]
    # The children of every thread: workers are started from the core process's threads too.
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError, ValueError):
            pids += [int(c) for c in children.read_text().split()]
    total = {"rss": 0, "fds": 0, "ticks": 0, "processes": 0}
    for p in pids:
        try:
            stats = _proc_stats(p)
        except OSError:  # a worker that just exited
            continue
        for key in ("rss", "fds", "ticks"):
            total[key] += stats[key]
        total["processes"] += 1
    return total


def _proc_stats(pid: int) -> dict[str, int]:
    """RSS (bytes), open files and CPU ticks of process `pid` (Linux /proc): user + system,
    its own and its reaped children's, so workers that exited before the last sample still
    count (without them the CPU of a run with workers came out negative)."""
    rss = 0
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = sum(int(f) for f in fields[11:15])  # utime, stime, cutime, cstime
    return {"rss": rss, "fds": len(os.listdir(f"/proc/{pid}/fd")), "ticks": ticks}


def _hosts(args: argparse.Namespace) -> list[str]:
    """Loopback addresses the controller listens on: one per 25,000 learners, as one address
    pair has ~28K ephemeral ports."""
    return [f"127.0.0.{1 + i}" for i in range(max(1, -(-args.learners // 25_000)))]


def _start_bare(
    args: argparse.Namespace, workdir: Path, port: int
) -> tuple[subprocess.Popen[str], str]:
    """`bare_server.py` (the floor: hello, welcome, one broadcast, shutdown) on `port`."""
    command = [
        sys.executable,
        str(Path(__file__).resolve().parent / "bare_server.py"),
        "--port",
        str(port),
        "--learners",
        str(args.learners),
        "--params",
        str(args.params),
        "--hosts",
        ",".join(_hosts(args)),
        "--seconds",
        str(RUN_SECONDS_LIMIT),
    ]
    log_file = open(workdir / "bare.log", "w")  # noqa: SIM115 - closed with the run
    server = subprocess.Popen(command, stderr=log_file, text=True, cwd=workdir)
    return _wait_listening(server, port, 1), f"{{host}}:{port}"


def _wait_listening(
    server: subprocess.Popen[str], port: int, processes: int
) -> subprocess.Popen[str]:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        # With workers, the port answers once the first worker serves: wait for all of them.
        with socket.socket() as s:
            up = s.connect_ex(("127.0.0.1", port)) == 0
        if up and _tree_stats(server.pid)["processes"] >= processes:
            time.sleep(1.0 if processes > 1 else 0.0)
            return server
        time.sleep(0.1)
    server.kill()
    raise RuntimeError("the server did not start listening within 90 s")


def _start_controller(
    args: argparse.Namespace, workdir: Path, port: int
) -> tuple[subprocess.Popen[str], str]:
    model = workdir / "model.npz"
    np.savez(model, np.zeros(args.params, dtype=np.float32))
    # The installed command beside this interpreter; run from the temporary directory, so a
    # source checkout in the working directory never shadows the installed (built) package.
    exe = Path(sys.executable).with_name("metis-async")
    cli = [str(exe)] if exe.exists() else [sys.executable, "-m", "metis_async.cli"]
    command = [
        *cli,
        "serve",
        "--port",
        str(port),
        "--init-model",
        str(model),
        "--protocol",
        "synchronous",
        "--rounds",
        str(args.rounds),
        "--min-learners",
        str(args.learners),
        "--learners-per-round",
        str(args.learners),
        "--min-update-fraction",
        "1.0",
        "--round-deadline",
        str(RUN_SECONDS_LIMIT),
        "--heartbeat-timeout",
        str(RUN_SECONDS_LIMIT),
        # A mass join on two shared cores delays hellos past the 10 s default, and every
        # timed-out hello is a reconnect that costs more than the wait.
        "--hello-timeout",
        "120",
        "--local-steps",
        "1",
        "--log-level",
        "warning",
        "--log-json",
    ]
    hosts = _hosts(args)
    if len(hosts) > 1:
        command += ["--extra-hosts", ",".join(hosts[1:])]
    if args.workers:
        command += ["--workers", str(args.workers)]
    if args.dashboard:
        args.dashboard_ports = (_free_port(), _free_port())
        command += ["--dashboard-port", str(args.dashboard_ports[0])]
        command += ["--admin-port", str(args.dashboard_ports[1])]
    command += args.controller_arg
    # Logs to a file: an unread pipe would block the controller once 64 KB of warnings wait.
    log_file = open(workdir / "controller.log", "w")  # noqa: SIM115 - closed with the run
    controller = subprocess.Popen(command, stderr=log_file, text=True, cwd=workdir)
    return _wait_listening(controller, port, 1 + args.workers), f"{{host}}:{port}"


# ------------------------------------------------------------------------------ the run


def run(args: argparse.Namespace, bare: bool = False) -> dict[str, Any]:
    """One load run against `metis-async serve` (or, `bare`, against `bare_server.py`)."""
    with tempfile.TemporaryDirectory(prefix="metis-load-") as tmp:
        start = _start_bare if bare else _start_controller
        port = _free_port()
        address = f"{{host}}:{port}"
        hosts = _hosts(args)
        ctx = mp.get_context("spawn")
        per = -(-args.learners // args.processes)
        procs, pipes = [], []
        welcomed = ctx.Array("q", 7)
        controller = None
        launched = None
        watched: dict[str, Any] | None = None
        if not args.learners_first:
            controller, _ = start(args, Path(tmp), port)
        try:
            if controller is not None:
                time.sleep(0.5)
                idle = _tree_stats(controller.pid)
            started = time.time()
            for p in range(args.processes):
                count = min(per, args.learners - p * per)
                if count <= 0:
                    break
                receive, send = ctx.Pipe(duplex=False)
                proc = ctx.Process(
                    target=_load_process,
                    args=(
                        address.format(host=hosts[p % len(hosts)]),
                        p * per,
                        count,
                        args.params,
                        args.rounds,
                        args.connections_per_process,
                        args.speed_seconds,
                        p,
                        welcomed,
                        send,
                        args.learners_first,
                        CODECS.get(args.codec, pb.DTYPE_FLOAT32) if not bare else pb.DTYPE_FLOAT32,
                    ),
                )
                proc.start()
                procs.append(proc)
                pipes.append(receive)
            if controller is None:  # --learners-first: the learners wait for it to listen
                while welcomed[READY] < len(procs):
                    _guard_memory(procs, time.monotonic() + RUN_SECONDS_LIMIT)
                    time.sleep(0.05)
                launched = time.time()
                controller, _ = start(args, Path(tmp), port)
                idle = _tree_stats(controller.pid)
            probe = None
            if args.dashboard and not bare:
                from dashboard_probe import DashboardProbe  # benches/, beside this script

                probe = DashboardProbe(*args.dashboard_ports)
                probe.start()
            held = _wait_for_streams(controller.pid, welcomed, args.learners, procs)
            reports: list[dict[str, Any]] = []
            deadline = time.monotonic() + RUN_SECONDS_LIMIT
            peak_rss = held["rss"]
            cpu_samples: list[tuple[float, int]] = [(time.time(), held["ticks"])]
            shown = time.monotonic()
            for receive in pipes:
                while not receive.poll(0.2):
                    _guard_memory(procs, deadline)
                    with contextlib.suppress(OSError):
                        now = _tree_stats(controller.pid)
                        peak_rss = max(peak_rss, now["rss"])
                        cpu_samples.append((time.time(), now["ticks"]))
                    if time.monotonic() - shown >= 10.0:
                        shown = time.monotonic()
                        print(
                            f"load: {welcomed[TASKS]} train tasks, {welcomed[UPLOADS]} uploads, "
                            f"{welcomed[OPEN]} streams open, {welcomed[FAILED]} failed attempts, "
                            f"controller peak RSS {peak_rss / 1e9:.2f} GB",
                            file=sys.stderr,
                            flush=True,
                        )
                reports += receive.recv()
            held["peak_rss"] = peak_rss
            for proc in procs:
                proc.join(30)
                if proc.is_alive():
                    proc.kill()
            watched = probe.stop() if probe is not None else None
        finally:
            for proc in procs:
                if proc.is_alive():
                    proc.kill()
            if controller is not None and controller.poll() is None:
                controller.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                if controller is not None:
                    controller.wait(30)
            if controller is not None and controller.poll() is None:
                controller.kill()
    result = _summarize(args, started, idle, held, cpu_samples, reports)
    if watched is not None:
        result["dashboard"] = watched
    if launched is not None:
        result["start_to_first_version_seconds"] = _first_version_after(reports, launched)
    return result


def _first_version_after(reports: list[dict[str, Any]], launched: float) -> float | None:
    """Seconds from launching the controller until a learner first saw version 1 committed
    (a task of version >= 1, or the shutdown that ends a one-round run)."""
    seen = [at for r in reports for version, at in r.get("tasks", []) if version >= 1]
    seen += [r["shutdown"] for r in reports if "shutdown" in r]
    return min(seen) - launched if seen else None


MIN_AVAILABLE_BYTES = 1_500_000_000
"""The run is stopped when the machine has less memory available than this."""


def _guard_memory(procs: list[Any], deadline: float) -> None:
    """Stop the load processes when memory runs out or time is up (raises)."""
    available = 0
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    if available < MIN_AVAILABLE_BYTES or time.monotonic() > deadline:
        for proc in procs:
            proc.kill()
        why = "time is up" if available >= MIN_AVAILABLE_BYTES else "memory ran out"
        raise RuntimeError(f"load run stopped: {why} ({available / 1e9:.1f} GB available)")


def _wait_for_streams(pid: int, welcomed: Any, learners: int, procs: list[Any]) -> dict[str, int]:
    """Controller stats once every learner was welcomed (or the load processes ended, or time is
    up: then the stats at the most learners welcomed)."""
    deadline = time.monotonic() + RUN_SECONDS_LIMIT
    best, most = _tree_stats(pid), -1
    started = shown = time.monotonic()
    while time.monotonic() < deadline and any(p.is_alive() for p in procs):
        _guard_memory(procs, deadline)
        count, failed, gave_up = welcomed[WELCOMED], welcomed[FAILED], welcomed[GAVE_UP]
        held = welcomed[OPEN]
        if time.monotonic() - shown >= 10.0:  # progress on stderr: a big run takes minutes
            shown = time.monotonic()
            print(
                f"load: {count}/{learners} welcomed, {held} streams open after "
                f"{shown - started:.0f} s "
                f"({failed} failed attempts, {gave_up} gave up), controller "
                f"RSS {best['rss'] / 1e9:.2f} GB",
                file=sys.stderr,
                flush=True,
            )
        if count + gave_up >= learners and count < learners:
            return best  # the rest gave up
        with contextlib.suppress(OSError):
            if count > most:
                best, most = _tree_stats(pid), count
                best["open"] = held
        if count >= learners:
            best["open"] = welcomed[OPEN]
            return best
        time.sleep(0.2)
    return best


def _summarize(
    args: argparse.Namespace,
    started: float,
    idle: dict[str, int],
    held: dict[str, int],
    cpu_samples: list[tuple[float, int]],
    reports: list[dict[str, Any]],
) -> dict[str, Any]:
    welcomed = [r["welcomed"] for r in reports if "welcomed" in r]
    dialed = [r["dialed"] for r in reports if "dialed" in r]
    errors = [r["error"] for r in reports if "error" in r]
    by_version: dict[int, list[float]] = {}
    for r in reports:
        for version, at in r.get("tasks", []):
            by_version.setdefault(version, []).append(at)
    firsts = {v: min(ts) for v, ts in by_version.items()}
    versions = sorted(firsts)
    broadcasts = [max(by_version[v]) - min(by_version[v]) for v in versions]
    rounds = [firsts[b] - firsts[a] for a, b in itertools.pairwise(versions)]
    latencies: list[float] = []
    ingest: list[float] = []
    for v in versions[:-1]:
        ups = [r["uploads"][v] for r in reports if len(r.get("uploads", [])) > v]
        if len(ups) == len(reports) and ups:
            ingest.append(max(end for _, end in ups) - min(start for start, _ in ups))
    for r in reports:
        tasks = dict(r.get("tasks", []))
        for index, (_, end) in enumerate(r.get("uploads", [])):
            nxt = tasks.get(index + 1)
            if nxt is not None:
                latencies.append(nxt - end)
    n = max(len(reports), 1)
    mb = args.params * 4 / 1e6
    steady_rounds = rounds[1:] or rounds
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = None
    if len(versions) >= 2:  # steady rounds: from version 1's first task to the last version's
        first = versions[1] if len(versions) >= 3 else versions[0]
        spent = _ticks_at(cpu_samples, firsts[versions[-1]]) - _ticks_at(cpu_samples, firsts[first])
        cpu = spent / ticks / (len(versions) - 1 - versions.index(first))
    ordered = sorted(latencies)
    return {
        "benchmark": "load",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", "benches/load.py", *sys.argv[1:]]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "learners": args.learners,
        "params": args.params,
        "rounds": args.rounds,
        "processes": args.processes,
        "workers": args.workers,
        "controller_processes": held.get("processes", 1),
        "connections_per_process": args.connections_per_process or "one per learner",
        "streams_held": len(welcomed),
        "errors": len(errors),
        "reconnects": sum(r.get("attempts", 1) - 1 for r in reports),
        "first_errors": errors[:3],
        "reconnect_reasons": collections.Counter(
            why for r in reports for why in r.get("retried_because", [])
        ).most_common(3),
        "connect_seconds": (max(welcomed) - min(dialed)) if welcomed else None,
        "start_to_all_welcomed_seconds": (max(welcomed) - started) if welcomed else None,
        "broadcast_seconds": statistics.median(broadcasts[1:]) if len(broadcasts) > 1 else None,
        "codec": args.codec,
        "upload_dtypes": dict(collections.Counter(r.get("upload_dtype") for r in reports)),
        "model_dtypes": dict(collections.Counter(r.get("model_dtype") for r in reports)),
        "first_broadcast_seconds": broadcasts[0] if broadcasts else None,
        "first_round_seconds": _first_round(reports, firsts),
        "round_seconds": statistics.median(steady_rounds) if steady_rounds else None,
        "upload_to_next_task_p50_ms": 1000 * statistics.median(ordered) if ordered else None,
        "upload_to_next_task_p99_ms": (
            1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] if ordered else None
        ),
        "ingest_updates_per_second": n / statistics.median(ingest) if ingest else None,
        "ingest_MBps": n * mb / statistics.median(ingest) if ingest else None,
        "streams_open_when_all_welcomed": held.get("open"),
        "learners_shut_down": sum(1 for r in reports if "shutdown" in r),
        "rss_bytes_per_stream": (held["rss"] - idle["rss"]) / n,
        "fds_per_stream": (held["fds"] - idle["fds"]) / n,
        "controller_rss_bytes": held["rss"],
        "controller_peak_rss_bytes": held.get("peak_rss"),
        "cpu_seconds_per_round": cpu,
    }


COMPARED = (
    "connect_seconds",
    "first_broadcast_seconds",
    "first_round_seconds",
    "rss_bytes_per_stream",
)


def _ticks_at(samples: list[tuple[float, int]], at: float) -> float:
    """The controller's CPU ticks at unix time `at`, interpolated between (time, ticks) samples
    taken every 0.2 s."""
    before = max((x for x in samples if x[0] <= at), default=samples[0])
    after = min((x for x in samples if x[0] >= at), default=samples[-1])
    if after[0] <= before[0]:
        return float(before[1])
    return before[1] + (after[1] - before[1]) * (at - before[0]) / (after[0] - before[0])


def _first_round(reports: list[dict[str, Any]], firsts: dict[int, float]) -> float | None:
    """From the first train task of version 0 to the last learner's first upload written: one
    broadcast and one upload each (what `--compare-bare` compares with the bare server)."""
    ends = [r["uploads"][0][1] for r in reports if r.get("uploads")]
    if 0 not in firsts or len(ends) < len(reports):
        return None
    return max(ends) - firsts[0]


def _ratios(ours: dict[str, Any], bare: dict[str, Any]) -> dict[str, float | None]:
    """ours / bare for what both measure (> 1: we are slower or bigger)."""
    ratios: dict[str, float | None] = {}
    for key in COMPARED:
        a, b = ours.get(key), bare.get(key)
        ratios[key] = round(a / b, 3) if a is not None and b else None
    return ratios


def compare_with_bare(args: argparse.Namespace) -> dict[str, Any]:
    """`--compare-bare`: a warm-up against the bare server, then `args.pairs` pairs of runs
    (ours and bare, alternating which goes first); ours of the first pair, with the pairs."""
    warm_up = run(args, bare=True)
    pairs: list[dict[str, Any]] = []
    result: dict[str, Any] = {}
    for index in range(args.pairs):
        order = (True, False) if index % 2 == 0 else (False, True)
        runs = {bare: run(args, bare=bare) for bare in order}
        ours, bare = runs[False], runs[True]
        if not result:  # the first pair's runs are the top-level figures
            result = ours
            result["bare"] = bare
        pairs.append(
            {
                "first": "bare" if order[0] else "ours",
                "ours": {key: ours.get(key) for key in COMPARED},
                "bare": {key: bare.get(key) for key in COMPARED},
                "vs_bare": _ratios(ours, bare),
            }
        )
    result["warm_up_connect_seconds"] = warm_up.get("connect_seconds")
    result["pairs"] = pairs
    result["vs_bare"] = {
        key: statistics.median(values)
        if (values := [p["vs_bare"][key] for p in pairs if p["vs_bare"][key] is not None])
        else None
        for key in COMPARED
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--learners", type=int, default=1000)
    parser.add_argument("--params", type=int, default=1000, help="float32 parameters")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--processes", type=int, default=0, help="load processes (default: one per 5,000)"
    )
    parser.add_argument(
        "--connections-per-process", type=int, default=0, help="0: one TCP connection each"
    )
    parser.add_argument(
        "--speed-seconds", type=float, default=0.0, help="median training sleep (0: instant)"
    )
    parser.add_argument(
        "--workers",
        default="auto",
        help="controller ingest workers (auto: none up to 12,000 learners, then one per 14,000)",
    )
    parser.add_argument(
        "--controller-arg",
        action="append",
        default=[],
        metavar="FLAG",
        help="one more flag for `metis-async serve` (repeatable), e.g. "
        "--controller-arg=--stream-window-bytes=65536",
    )
    parser.add_argument(
        "--learners-first",
        action="store_true",
        help="start the learners first (they wait for the port) and report "
        "start_to_first_version_seconds from launching the controller",
    )
    parser.add_argument(
        "--compare-bare",
        action="store_true",
        help="also run the same load against a bare grpc.aio server (one round) and print ratios",
    )
    parser.add_argument(
        "--pairs",
        type=int,
        default=1,
        help="--compare-bare: pairs of runs (ours and bare, alternating which goes first); "
        "vs_bare is the median of the pairs' ratios",
    )
    parser.add_argument(
        "--dashboard",
        action="store_true",
        help="serve the dashboard and Admin service too and time their answers under the load",
    )
    parser.add_argument(
        "--codec",
        choices=["float32", *CODECS],
        default="float32",
        help="learners offer this codec and the controller uses it for uploads and models "
        "(--compare-bare: the bare server still moves float32, the model's wire floor)",
    )
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--out", type=Path, default=RESULTS, help=f"results file (default {RESULTS.name} here)"
    )
    args = parser.parse_args()
    if args.codec != "float32":
        args.controller_arg += [f"--upload-codec={args.codec}", f"--download-codec={args.codec}"]
    if args.workers == "auto":
        args.workers = 0 if args.learners <= 12_000 else max(2, -(-args.learners // 14_000))
    args.workers = int(args.workers)
    if args.learners > 18_000 and not args.workers:
        parser.error("one controller process holds at most ~19,000 streams here: use --workers")
    args.processes = args.processes or max(1, -(-args.learners // 5000))
    if args.compare_bare:
        args.rounds = 1  # the bare server broadcasts once
    if args.pairs < 1:
        parser.error("--pairs needs at least one pair")
    result = compare_with_bare(args) if args.compare_bare else run(args)
    for key, value in result.items():
        if key not in ("machine", "first_errors", "command", "reconnect_reasons", "bare", "pairs"):
            print(f"{key:28s} {value}")
    for pair in result.get("pairs", []):
        print(f"pair, {pair['first']} first: vs_bare {pair['vs_bare']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
