"""Effect delivery on real sessions and a real published version: what each stream is queued
for a broadcast (the sessions have no stream attached, so their queues keep what they got)."""

from __future__ import annotations

import asyncio

import numpy as np

from metis_async import wire
from metis_async.delivery import EffectDelivery, bundle_message
from metis_async.effects import SendModel, SendTask
from metis_async.protocols import TaskKind, TrainSettings
from metis_async.protocols.base import Task
from metis_async.session import BundleParts, Session
from metis_async.store import ModelStore, encode_version
from metis_async.v1 import controller_pb2 as pb

SETTINGS = TrainSettings(local_steps=3)


def _broadcast(tasks: dict[str, str], kind: TaskKind = TaskKind.TRAIN) -> dict[str, list[object]]:
    """Deliver version 1 and a task of `kind` (`tasks`: learner id -> wire task id) to
    sessions that take bundles; what each session's queue holds afterwards."""
    values = np.arange(16, dtype=np.float32)
    layout = wire.make_layout([values])
    store = ModelStore(wire.MAX_CHUNK_BYTES)
    encoded = encode_version(layout, 1, values, wire.MAX_CHUNK_BYTES)
    store.publish(layout, 1, values, encoded.messages)
    sessions = {lid: Session(lid, f"s-{lid}", 0.0, 64, frozenset({"bundle"})) for lid in tasks}
    for session in sessions.values():
        session.has_layout = True  # as after their Welcome
    effects: list[object] = []
    for lid, wire_id in tasks.items():
        effects.append(SendModel(lid, 1))
        effects.append(SendTask(Task(wire_id, lid, kind, 1, SETTINGS)))

    async def deliver() -> None:
        delivery = EffectDelivery(sessions, store, None, asyncio.Event())
        delivery(effects)  # type: ignore[arg-type]

    asyncio.run(deliver())
    queued: dict[str, list[object]] = {}
    for lid, session in sessions.items():
        items = []
        while session.queue.qsize():
            items.append(session.queue.pop())
        queued[lid] = items
    return queued


def test_a_broadcast_queues_every_stream_one_shared_bundle() -> None:
    queued = _broadcast({"a": "run.1-t5", "b": "run.1-t5", "c": "run.1-t5"})

    first, second, third = queued["a"], queued["b"], queued["c"]
    assert len(first) == len(second) == len(third) == 1
    parts = first[0]
    assert isinstance(parts, BundleParts)
    assert second[0] is parts  # one object for every stream
    assert third[0] is parts
    assert parts.joined == bundle_message(parts.messages)  # joined once, not per stream
    bundle = pb.ControllerMessage.FromString(parts.joined).bundle
    kinds = [pb.ControllerMessage.FromString(m).WhichOneof("body") for m in bundle.messages]
    assert kinds == ["model", "chunk", "train"]


def test_streams_with_tasks_of_their_own_each_get_their_parts() -> None:
    queued = _broadcast({"a": "run.1-u1", "b": "run.1-u2"})

    assert all(isinstance(items[0], BundleParts) for items in queued.values())
    assert all(items[0].joined is None for items in queued.values())  # type: ignore[union-attr]
    tasks = [
        pb.ControllerMessage.FromString(items[0].messages[-1]).train.task_id  # type: ignore[union-attr]
        for items in queued.values()
    ]
    assert tasks == ["run.1-u1", "run.1-u2"]


def test_a_rounds_evaluation_tasks_share_one_bundle_too() -> None:
    queued = _broadcast({"a": "run.1-e5", "b": "run.1-e5"}, TaskKind.EVALUATE)

    parts = queued["a"][0]
    assert queued["b"][0] is parts
    assert isinstance(parts, BundleParts)
    assert parts.joined is not None
    evaluate = pb.ControllerMessage.FromString(parts.messages[-1]).evaluate
    assert (evaluate.task_id, evaluate.model_version) == ("run.1-e5", 1)
