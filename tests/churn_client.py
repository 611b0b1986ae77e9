"""Churning learners for tests/test_churn.py, run as a separate process:

    python tests/churn_client.py ADDRESS LEARNERS SECONDS SEED

Each learner joins, and at random answers its task with a small delta, hangs up mid-task, or
sends garbage, then rejoins after a short random pause, until SECONDS have passed; then every
learner leaves. Prints one JSON line of counts. Every loop is bounded in time; loopback only.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time

import grpc
import numpy as np

from metis_async import wire
from metis_async.v1 import controller_pb2 as pb

JOIN = "/metis_async.v1.Controller/Join"


async def _session(
    channel: grpc.aio.Channel, learner_id: str, rng: random.Random, counts: dict[str, int]
) -> None:
    call = channel.stream_stream(JOIN)()
    hello = pb.Hello(learner_id=learner_id, num_examples=1, capabilities=["train", "delta"])
    try:
        await call.write(pb.LearnerMessage(hello=hello).SerializeToString())
        layout_id = 0
        while True:
            raw = await asyncio.wait_for(call.read(), 10.0)
            if raw is grpc.aio.EOF:
                return
            message = pb.ControllerMessage.FromString(raw)
            kind = message.WhichOneof("body")
            if kind == "layout":
                layout_id = message.layout.layout_id
            elif kind == "train":
                roll = rng.random()
                if roll < 0.4:
                    task = message.train
                    header, chunks = wire.make_payload(
                        np.full(10, 0.5, np.float32), 1, pb.PAYLOAD_KIND_DELTA, layout_id, 1 << 20
                    )
                    result = pb.TaskResult(
                        task_id=task.task_id,
                        base_version=task.model_version,
                        payload=header,
                        num_examples=1,
                    )
                    await call.write(pb.LearnerMessage(result=result).SerializeToString())
                    for chunk in chunks:
                        await call.write(pb.LearnerMessage(chunk=chunk).SerializeToString())
                    counts["answered"] += 1
                    return
                if roll < 0.9:
                    counts["hung_up"] += 1
                    return  # leaves mid-task
                await call.write(b"\xff\xff garbage")
                counts["garbage"] += 1
                return
    except (grpc.RpcError, asyncio.TimeoutError, asyncio.InvalidStateError):
        counts["errors"] += 1
    finally:
        call.cancel()


async def main(address: str, learners: int, seconds: float, seed: int) -> dict[str, int]:
    rng = random.Random(seed)
    counts = {"sessions": 0, "answered": 0, "hung_up": 0, "garbage": 0, "errors": 0}
    channels = [
        grpc.aio.insecure_channel(
            address, options=[("grpc.use_local_subchannel_pool", 1), ("c", i)]
        )
        for i in range(8)
    ]
    deadline = time.monotonic() + seconds

    async def learner(index: int) -> None:
        while time.monotonic() < deadline:
            counts["sessions"] += 1
            await _session(channels[index % len(channels)], f"churn-{index}", rng, counts)
            await asyncio.sleep(rng.uniform(0.0, 0.3))

    await asyncio.gather(*(learner(i) for i in range(learners)))
    for channel in channels:
        await channel.close()
    return counts


if __name__ == "__main__":
    address, learners, seconds, seed = (
        sys.argv[1],
        int(sys.argv[2]),
        float(sys.argv[3]),
        int(sys.argv[4]),
    )
    print(json.dumps(asyncio.run(main(address, learners, seconds, seed))))
