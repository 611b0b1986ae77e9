"""Event-loop lag of the controller while many learners upload large updates into one version.

    python benches/loop_lag.py [--json] [--learners 100] [--params 10000000] [--processes 4]

A real `Controller` (synchronous policy: one round of `--learners` updates) runs on uvloop in
this process, with a probe task that sleeps 2 ms in a loop and records how late it wakes up:
that lateness is what every other stream waits while the loop is busy. Learner processes
(`--processes`, loopback gRPC, one stream per learner) join holding the current model (as after
its broadcast), wait for their task and upload a precomputed delta of `--params` float32 in
4 MiB chunks, all at once.

Side by side in one run:
- `controller`: the controller as it runs (chunks decoded, copied and checked in Rust in a
  worker thread; the federation core on its own thread);
- `controller_inline`: the same controller with every chunk copied and checked on the event
  loop (the way uploads were handled before the federation-core change);
- `controller_download`: `controller`, but the learners do not hold the model yet, so the
  window also covers sending every learner the 40 MB model (gRPC copies each write on the loop);
- `bare_grpc`: a bare grpc.aio server that reads the same uploads and drops them: the floor
  (gRPC's own receive work on the loop).

Reported per case: lag p50/p99/max (ms) over the upload window, upload wall seconds, MB/s of
update data received. With --json the last line is one JSON object, also written to
benches/results/loop_lag.json. Target (issue 7): controller p99 lag <= 20 ms on 2 cores.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import multiprocessing as mp
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from learner_messages import delta_result  # benches/, beside this script

# The installed package (`pip install ".[bench]"` or an editable install), never the source
# folder: a source checkout has no built `_core`.
from metis_async import ingest as ingest_module
from metis_async import wire
from metis_async._core import encode_chunk_messages
from metis_async.protocols import SynchronousPolicy, SynchronousSettings, TrainSettings
from metis_async.server import Controller, ControllerConfig
from metis_async.telemetry import configure_logging
from metis_async.v1 import controller_pb2 as pb

RESULTS = Path(__file__).resolve().parent / "results" / "loop_lag.json"
JOIN = "/metis_async.v1.Controller/Join"
LEARNER_CHUNK_FIELD = pb.LearnerMessage.DESCRIPTOR.fields_by_name["chunk"].number
PROBE_SECONDS = 0.002
RUN_ID = "loop-lag"
DEADLINE_SECONDS = 600.0


# ------------------------------------------------------------------------------ learners


async def _learner(
    address: str, learner_id: str, chunks: list[bytes], nbytes: int, held: pb.Hello
) -> float:
    """One learner: join, wait for the train task, upload the delta; returns upload seconds."""
    limit = 8 * 1024 * 1024
    options = [("grpc.max_receive_message_length", limit), ("grpc.use_local_subchannel_pool", 1)]
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        call = channel.stream_stream(JOIN)()
        hello = pb.Hello(learner_id=learner_id, num_examples=10, capabilities=["train", "delta"])
        hello.MergeFrom(held)
        await call.write(pb.LearnerMessage(hello=hello).SerializeToString())
        layout_id = 0
        while True:
            raw = await call.read()
            if raw is grpc.aio.EOF:
                return -1.0
            message = pb.ControllerMessage.FromString(raw)
            kind = message.WhichOneof("body")
            if kind == "layout":
                layout_id = message.layout.layout_id
            elif kind == "train":
                task = message.train
                break
        started = time.perf_counter()
        await call.write(delta_result(task, 1, nbytes, len(chunks), layout_id))
        for chunk in chunks:
            await call.write(chunk)
        seconds = time.perf_counter() - started
        while (raw := await call.read()) is not grpc.aio.EOF:
            if pb.ControllerMessage.FromString(raw).WhichOneof("body") == "shutdown":
                break
        call.cancel()
        return seconds


def _learner_process(address: str, first: int, count: int, params: int, download: bool) -> None:
    delta = np.full(params, 1e-3, dtype=np.float32)
    chunks = encode_chunk_messages(delta, 1, wire.MAX_CHUNK_BYTES, LEARNER_CHUNK_FIELD)
    held = pb.Hello()
    if not download:  # the learners hold version 0 already (as after a broadcast)
        layout = wire.make_layout([np.zeros(params, dtype=np.float32)])
        held = pb.Hello(
            holds_model=True, held_version=0, held_run_id=RUN_ID, held_layout_id=layout.layout_id
        )

    async def main() -> None:
        await asyncio.gather(
            *(_learner(address, f"l{first + i}", chunks, delta.nbytes, held) for i in range(count)),
            return_exceptions=True,  # the bare server just goes away at the end
        )

    asyncio.run(main())


def _start_learners(
    address: str, learners: int, processes: int, params: int, download: bool = False
) -> list[Any]:
    ctx = mp.get_context("spawn")
    per = -(-learners // processes)
    started = []
    for p in range(processes):
        count = min(per, learners - p * per)
        if count <= 0:
            break
        proc = ctx.Process(
            target=_learner_process, args=(address, p * per, count, params, download)
        )
        proc.start()
        started.append(proc)
    return started


# ------------------------------------------------------------------------------ probe


class LagProbe:
    """Sleeps PROBE_SECONDS in a loop on the event loop and records how late it wakes (s)."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self.recording = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        clock = time.perf_counter  # uvloop's loop.time() counts whole milliseconds
        while True:
            before = clock()
            await asyncio.sleep(PROBE_SECONDS)
            if self.recording:
                self.samples.append(max(0.0, clock() - before - PROBE_SECONDS))

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def summary(self) -> dict[str, float | int | None]:
        if not self.samples:
            return {"lag_p50_ms": None, "lag_p99_ms": None, "lag_max_ms": None, "samples": 0}
        ordered = sorted(self.samples)
        p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
        return {
            "lag_p50_ms": 1000 * statistics.median(ordered),
            "lag_p99_ms": 1000 * p99,
            "lag_max_ms": 1000 * ordered[-1],
            "samples": len(ordered),
        }


# ------------------------------------------------------------------------------ cases


async def _controller_case(
    args: argparse.Namespace, inline: bool, download: bool = False
) -> dict[str, Any]:
    saved = ingest_module.OFF_LOOP_CHUNK_BYTES
    if inline:
        ingest_module.OFF_LOOP_CHUNK_BYTES = 1 << 62  # every chunk copied on the loop
    try:
        settings = SynchronousSettings(
            rounds=1,
            min_learners=args.learners,
            learners_per_round=args.learners,
            round_deadline_seconds=DEADLINE_SECONDS,
            min_update_fraction=1.0,
            train=TrainSettings(local_steps=1),
        )
        config = ControllerConfig(
            port=0,
            heartbeat_timeout_seconds=DEADLINE_SECONDS,
            max_uploads_in_flight=args.uploads_in_flight,
        )
        model = [np.zeros(args.params, dtype=np.float32)]
        policy = SynchronousPolicy(settings)
        controller = Controller(policy, config, initial_model=model, run_id=RUN_ID)
        port = await controller.start()
        probe = LagProbe()
        probe.start()
        address = f"127.0.0.1:{port}"
        procs = _start_learners(address, args.learners, args.processes, args.params, download)
        loop = asyncio.get_running_loop()
        while controller.stats.sessions_opened_total < args.learners:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        probe.recording = True
        started = loop.time()
        finished = await controller.wait_finished(DEADLINE_SECONDS)
        seconds = loop.time() - started
        probe.recording = False
        probe.stop()
        await controller.stop(grace_seconds=1.0)
        for proc in procs:
            proc.join(30)
        ok = finished and controller.version == 1
        expected = np.full(args.params, 1e-3, dtype=np.float32)
        ok = ok and bool(np.allclose(controller.store.flat, expected, atol=1e-6))
        return {**probe.summary(), "seconds": seconds, "ok": ok}
    finally:
        ingest_module.OFF_LOOP_CHUNK_BYTES = saved


async def _bare_case(args: argparse.Namespace) -> dict[str, Any]:
    """A bare grpc.aio server: says hello, sends a train task, reads and drops the upload."""
    nbytes = args.params * 4
    received = 0
    joined = 0
    done = asyncio.Event()
    layout = pb.ControllerMessage(layout=pb.ModelLayout(layout_id=1, total_bytes=nbytes))
    train = pb.ControllerMessage(train=pb.TrainTask(task_id="t", model_version=0))

    async def join(_requests: object, context: grpc.aio.ServicerContext) -> None:
        nonlocal received, joined
        await context.read()  # hello
        joined += 1
        await context.write(layout.SerializeToString())
        await context.write(train.SerializeToString())
        while (raw := await context.read()) is not grpc.aio.EOF:
            received += len(raw)
            if received >= args.learners * nbytes:
                done.set()
        return None

    server = grpc.aio.server(options=ControllerConfig().grpc_options())
    handler = grpc.stream_stream_rpc_method_handler(join)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("metis_async.v1.Controller", {"Join": handler}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    probe = LagProbe()
    probe.start()
    procs = _start_learners(f"127.0.0.1:{port}", args.learners, args.processes, args.params)
    loop = asyncio.get_running_loop()
    while joined < args.learners:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    probe.recording = True
    started = loop.time()
    try:
        await asyncio.wait_for(done.wait(), DEADLINE_SECONDS)
    finally:
        seconds = loop.time() - started
        probe.recording = False
        probe.stop()
        await server.stop(0.5)
        for proc in procs:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
    return {**probe.summary(), "seconds": seconds, "ok": True}


def _run(case: str, args: argparse.Namespace) -> dict[str, Any]:
    import uvloop

    if case == "bare_grpc":
        result = uvloop.run(_bare_case(args))
    else:
        inline, download = case == "controller_inline", case == "controller_download"
        result = uvloop.run(_controller_case(args, inline, download))
    data_mb = args.learners * args.params * 4 / 1e6
    result["update_MBps"] = data_mb / result["seconds"] if result["seconds"] else None
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--learners", type=int, default=100)
    parser.add_argument("--params", type=int, default=10_000_000)
    parser.add_argument("--processes", type=int, default=4, help="learner processes")
    parser.add_argument(
        "--uploads-in-flight", type=int, default=ControllerConfig().max_uploads_in_flight
    )
    parser.add_argument(
        "--cases", default="controller,controller_inline,bare_grpc", help="comma-separated"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    configure_logging("error")
    results: dict[str, Any] = {}
    for case in args.cases.split(","):
        results[case] = _run(case, args)
        r = results[case]
        lags = "  ".join(
            f"{name} {r[f'lag_{name}_ms'] or 0:7.2f} ms" for name in ("p50", "p99", "max")
        )
        print(
            f"{case:18s} lag {lags}  upload {r['seconds']:6.2f} s  "
            f"{r['update_MBps'] or 0:7.1f} MB/s  samples {r['samples']}  ok={r['ok']}",
            flush=True,
        )
    if "controller" in results and "controller_inline" in results:
        ours, inline = results["controller"], results["controller_inline"]
        if ours["lag_p99_ms"]:
            print(f"p99 lag, inline / off-loop: {inline['lag_p99_ms'] / ours['lag_p99_ms']:.2f}x")
    out = {
        "benchmark": "loop_lag",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "learners": args.learners,
        "params": args.params,
        "processes": args.processes,
        "uploads_in_flight": args.uploads_in_flight,
        "target_p99_ms": 20.0,
        "cases": results,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2))
    if args.json:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
