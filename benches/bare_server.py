"""A bare grpc.aio server speaking just enough of the learner contract to be the floor in load.py.

    python benches/bare_server.py --port P --learners N [--hosts 127.0.0.2,...] [--params 1000]

What a controller cannot do with less, on the controller's own gRPC transport options: per
stream it reads the hello, writes one pre-encoded welcome, waits until all N learners are in,
writes the model's bytes in pre-encoded chunks and a train task (one bundle for a small
model), reads the upload (its header and chunks) and writes a shutdown. No federation, no
validation, no queues: `load.py --compare-bare` runs the same load processes against it and
against `metis-async serve`, so connect time, the first broadcast, the first round and memory
per stream are compared on the same machine in the same run. Loopback only; it exits once
every learner was shut down, or after --seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math

import grpc

from metis_async import wire
from metis_async.server import ControllerConfig
from metis_async.v1 import controller_pb2 as pb

SERVICE, METHOD = "metis_async.v1.Controller", "Join"


def _messages(params: int) -> tuple[bytes, list[bytes], bytes]:
    """The welcome, the broadcast (the model in chunks, then a task; one bundle when it is
    small, as the controller sends it) and the shutdown, each encoded once."""
    welcome = pb.ControllerMessage(
        welcome=pb.Welcome(
            learner_id="bare", session_id="bare", max_chunk_bytes=wire.MAX_CHUNK_BYTES
        )
    ).SerializeToString()
    data = bytes(4 * params)
    step = wire.MAX_CHUNK_BYTES
    chunks = [
        pb.ControllerMessage(
            chunk=pb.Chunk(payload_id=1, index=i, data=data[at : at + step])
        ).SerializeToString()
        for i, at in enumerate(range(0, max(len(data), 1), step))
    ]
    train = pb.ControllerMessage(train=pb.TrainTask(task_id="t1", model_version=0))
    broadcast = [*chunks, train.SerializeToString()]
    if len(data) <= 64 * 1024:
        broadcast = [pb.ControllerMessage(bundle=pb.Bundle(messages=broadcast)).SerializeToString()]
    shutdown = pb.ControllerMessage(
        shutdown=pb.Shutdown(reason="done", kind=pb.SHUTDOWN_KIND_FINISHED)
    ).SerializeToString()
    return welcome, broadcast, shutdown


async def serve(port: int, hosts: list[str], learners: int, params: int, seconds: float) -> None:
    welcome, broadcast, shutdown = _messages(params)
    upload_messages = 1 + max(1, math.ceil(4 * params / wire.MAX_CHUNK_BYTES))
    everyone_in = asyncio.Event()
    joined, done = [0], [0]
    finished = asyncio.Event()

    async def join(_requests: object, context: grpc.aio.ServicerContext) -> None:
        pb.LearnerMessage.FromString(await context.read())  # the hello
        await context.write(welcome)
        joined[0] += 1
        if joined[0] >= learners:
            everyone_in.set()
        await everyone_in.wait()
        for message in broadcast:
            await context.write(message)
        for _ in range(upload_messages):
            if await context.read() is grpc.aio.EOF:
                return
        await context.write(shutdown)
        done[0] += 1
        if done[0] >= learners:
            finished.set()

    # The controller's transport options (message limits, keepalive, pending-call limits):
    # with gRPC's defaults a mass join has calls dropped and retried, which is not the floor.
    server = grpc.aio.server(options=ControllerConfig().grpc_options())
    handler = grpc.stream_stream_rpc_method_handler(join)  # raw bytes both ways
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler(SERVICE, {METHOD: handler})]
    )
    for host in hosts:
        server.add_insecure_port(f"{host}:{port}")
    await server.start()
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(finished.wait(), seconds)
    await server.stop(5.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--learners", type=int, required=True)
    parser.add_argument("--hosts", default="127.0.0.1", help="comma-separated loopback addresses")
    parser.add_argument("--params", type=int, default=1000, help="float32 values in the broadcast")
    parser.add_argument(
        "--seconds", type=float, default=900.0, help="exit after this at the latest"
    )
    args = parser.parse_args()
    hosts = args.hosts.split(",")
    if not all(h.startswith("127.") or h == "::1" for h in hosts):
        parser.error("the bare server listens on loopback only")
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency off Windows
        asyncio.run(serve(args.port, hosts, args.learners, args.params, args.seconds))
    else:
        uvloop.run(serve(args.port, hosts, args.learners, args.params, args.seconds))


if __name__ == "__main__":
    main()
