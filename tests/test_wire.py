"""Flat buffers: layouts, chunking and reassembly, and the errors they raise."""

from __future__ import annotations

import numpy as np
import pytest

from metis_async import wire
from metis_async.v1 import controller_pb2 as pb


def _model() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [
        rng.standard_normal((65, 10)).astype(np.float32),
        rng.standard_normal(7).astype(np.float64),
        np.float32(3.5) * np.ones((2, 3, 4), dtype=np.float32),
    ]


def test_flatten_unflatten_round_trips_shapes_dtypes_and_values() -> None:
    arrays = _model()
    layout = wire.make_layout(arrays)

    restored = wire.unflatten(wire.flatten(arrays, layout), layout)

    for original, back in zip(arrays, restored, strict=True):
        assert back.shape == original.shape
        assert back.dtype == original.dtype
        np.testing.assert_allclose(back, original.astype(np.float32), rtol=0, atol=0)


def test_layout_id_depends_on_architecture_only() -> None:
    arrays = _model()
    same = [a * 2 for a in arrays]
    other = [*arrays, np.zeros(1, dtype=np.float32)]

    assert wire.make_layout(arrays).layout_id == wire.make_layout(same).layout_id
    assert wire.make_layout(arrays).layout_id != wire.make_layout(other).layout_id


def test_unsupported_dtype_is_named() -> None:
    with pytest.raises(wire.WireError, match="int64"):
        wire.make_layout([np.zeros(3, dtype=np.int64)])


@pytest.mark.parametrize("chunk_bytes", [4, 100, 1 << 20])
def test_chunks_reassemble_to_the_same_vector(chunk_bytes: int) -> None:
    flat = np.arange(1001, dtype=np.float32)
    header, chunks = wire.make_payload(flat, 7, pb.PAYLOAD_KIND_DELTA, 42, chunk_bytes)
    assembler = wire.PayloadAssembler(header, flat.nbytes, 42, chunk_bytes)

    for chunk in chunks:
        assembler.add(chunk)

    assert assembler.done
    np.testing.assert_array_equal(assembler.result(), flat)
    assert header.num_chunks == wire.chunk_count(flat.nbytes, chunk_bytes)


def test_assembler_rejects_wrong_total_size() -> None:
    header, _ = wire.make_payload(np.zeros(10, np.float32), 1, pb.PAYLOAD_KIND_DELTA, 1)

    with pytest.raises(wire.WireError, match="payload has 40 bytes, the model has 44"):
        wire.PayloadAssembler(header, 44, 1)


def test_assembler_rejects_wrong_dtype() -> None:
    header, _ = wire.make_payload(np.zeros(10, np.float32), 1, pb.PAYLOAD_KIND_DELTA, 1)
    header.dtype = pb.DTYPE_FLOAT64

    with pytest.raises(wire.WireError, match="DTYPE_FLOAT64"):
        wire.PayloadAssembler(header, 40, 1)


def test_assembler_rejects_out_of_order_chunks() -> None:
    header, chunks = wire.make_payload(np.zeros(10, np.float32), 1, pb.PAYLOAD_KIND_DELTA, 1, 8)
    assembler = wire.PayloadAssembler(header, 40, 1, 8)
    first, second = next(chunks), next(chunks)

    with pytest.raises(wire.WireError, match="chunk 1 arrived, expected chunk 0"):
        assembler.add(second)
    assert first.index == 0


def test_assembler_rejects_overflowing_chunk() -> None:
    header, _ = wire.make_payload(np.zeros(4, np.float32), 1, pb.PAYLOAD_KIND_DELTA, 1, 8)
    assembler = wire.PayloadAssembler(header, 16, 1, 8)
    assembler.add(pb.Chunk(payload_id=1, index=0, data=b"\0" * 8))

    with pytest.raises(wire.WireError, match="limit is 8"):
        assembler.add(pb.Chunk(payload_id=1, index=1, data=b"\0" * 12))


def test_assembler_rejects_short_payload() -> None:
    header = pb.Payload(payload_id=1, dtype=pb.DTYPE_FLOAT32, total_bytes=16, num_chunks=2)
    assembler = wire.PayloadAssembler(header, 16, 0, 8)
    assembler.add(pb.Chunk(payload_id=1, index=0, data=b"\0" * 8))

    with pytest.raises(wire.WireError, match="ended after 12 of 16 bytes"):
        assembler.add(pb.Chunk(payload_id=1, index=1, data=b"\0" * 4))


def test_assembler_check_rejects_a_nan_in_a_chunk_as_it_arrives() -> None:
    flat = np.zeros(10, np.float32)
    flat[7] = np.nan
    header, chunks = wire.make_payload(flat, 1, pb.PAYLOAD_KIND_DELTA, 1, 8)
    seen: list[int] = []

    def check(values: np.ndarray) -> int | None:
        seen.append(values.size)
        bad = np.flatnonzero(~np.isfinite(values))
        return int(bad[0]) if bad.size else None

    assembler = wire.PayloadAssembler(header, 40, 1, 8, check=check)
    for _ in range(3):
        assembler.add(next(chunks))  # values 0..5 are fine

    with pytest.raises(wire.WireError, match="first at value 7"):
        assembler.add(next(chunks))
    assert seen == [2, 2, 2, 2]


def test_bundle_bytes_are_what_protobuf_writes() -> None:
    from metis_async.delivery import bundle_message
    from metis_async.v1 import controller_pb2 as pb

    messages = [b"", b"x" * 200, bytes(range(256)) * 70]

    expected = pb.ControllerMessage(bundle=pb.Bundle(messages=messages)).SerializeToString()
    assert bundle_message(messages) == expected


def test_train_task_bytes_are_what_protobuf_writes() -> None:
    from metis_async.delivery import task_message
    from metis_async.protocols.base import Task, TaskKind, TrainSettings
    from metis_async.v1 import controller_pb2 as pb

    shared = TrainSettings(local_steps=3, learning_rate=0.1, extra={"mu": 0.5})
    tasks = [  # a run of tasks sharing a template, then ones that each need another
        (Task("r1-a", "a", TaskKind.TRAIN, 4, shared, 60.0), False),
        (Task("r1-" + "b" * 300, "b", TaskKind.TRAIN, 4, shared, 60.0), False),
        (Task("r1-c", "c", TaskKind.TRAIN, 4, shared, 60.0), True),
        (Task("r2-a", "a", TaskKind.TRAIN, 5, shared, 0.0, False, 2.5), False),
        (Task("r2-b", "b", TaskKind.TRAIN, 5, TrainSettings(epochs=2), 60.0), False),
    ]

    for task, grant in tasks:
        s = task.settings
        assert s is not None
        config = pb.TrainConfig(
            local_steps=s.local_steps,
            epochs=s.epochs,
            batch_size=s.batch_size,
            learning_rate=s.learning_rate,
            proximal_mu=s.proximal_mu,
            extra=dict(s.extra),
            time_budget_seconds=task.time_budget_seconds,
        )
        train = pb.TrainTask(
            task_id=task.task_id,
            model_version=task.version,
            config=config,
            deadline_seconds=task.deadline_seconds,
            upload_delta=task.upload_delta,
            upload_grant=grant,
        )
        expected = pb.ControllerMessage(train=train).SerializeToString()
        assert task_message(task, upload_grant=grant) == expected, task.task_id
