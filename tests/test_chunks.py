"""Chunk messages in Rust (built extension): `encode_chunk_messages`, `peek_chunk` and
`ChunkAssembler`, checked against the protobuf runtime's own serialization and parsing."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.typing import NDArray

from metis_async._core import (
    Accumulator,
    AggregationError,
    ChunkAssembler,
    InPlaceAssembler,
    Segments,
    WireFormatError,
    encode_chunk_messages,
    peek_chunk,
)
from metis_async.v1 import controller_pb2 as pb

CONTROLLER_CHUNK = 4  # ControllerMessage.chunk
LEARNER_CHUNK = 3  # LearnerMessage.chunk

F32 = NDArray[np.float32]


def values(count: int, seed: int = 0) -> F32:
    return np.random.default_rng(seed).standard_normal(count).astype(np.float32)


def controller_chunks(data: F32, payload_id: int, limit: int) -> list[bytes]:
    """What the protobuf runtime makes of the same chunks."""
    raw = data.tobytes()
    return [
        pb.ControllerMessage(
            chunk=pb.Chunk(payload_id=payload_id, index=i, data=raw[start : start + limit])
        ).SerializeToString()
        for i, start in enumerate(range(0, len(raw), limit))
    ]


def learner_chunks(data: F32, payload_id: int, limit: int) -> list[bytes]:
    raw = data.tobytes()
    return [
        pb.LearnerMessage(
            chunk=pb.Chunk(payload_id=payload_id, index=i, data=raw[start : start + limit])
        ).SerializeToString()
        for i, start in enumerate(range(0, len(raw), limit))
    ]


def assembler(data: F32, limit: int, payload_id: int = 7, field: int = 4) -> ChunkAssembler:
    chunks = -(-data.nbytes // limit)
    return ChunkAssembler(data.nbytes, payload_id, chunks, limit, field)


# --- encode_chunk_messages ------------------------------------------------------------------


@pytest.mark.parametrize("payload_id", [0, 1, 300, 2**64 - 1])
@pytest.mark.parametrize(("count", "limit"), [(1, 4), (10, 8), (10, 12), (1000, 1000), (5, 64)])
def test_encoded_messages_are_bit_identical_to_protobuf(
    payload_id: int, count: int, limit: int
) -> None:
    data = values(count, seed=count)

    messages = encode_chunk_messages(data, payload_id, limit, CONTROLLER_CHUNK)

    assert messages == controller_chunks(data, payload_id, limit)


def test_an_empty_array_has_no_messages() -> None:
    assert encode_chunk_messages(np.zeros(0, np.float32), 1, 16, CONTROLLER_CHUNK) == []


def test_encode_rejects_arrays_it_cannot_borrow() -> None:
    with pytest.raises(AggregationError, match="data must be float32, got float64"):
        encode_chunk_messages(np.zeros(4), 1, 16, CONTROLLER_CHUNK)  # type: ignore[arg-type]
    with pytest.raises(AggregationError, match="C-contiguous"):
        encode_chunk_messages(np.zeros(8, np.float32)[::2], 1, 16, CONTROLLER_CHUNK)


def test_encode_rejects_a_zero_chunk_limit() -> None:
    with pytest.raises(WireFormatError, match="max_chunk_bytes must be > 0"):
        encode_chunk_messages(np.zeros(4, np.float32), 1, 0, CONTROLLER_CHUNK)


# --- round trips ----------------------------------------------------------------------------


def test_encoded_messages_reassemble_to_the_same_values() -> None:
    data = values(300_000, seed=1)  # 1.2 MB: several parallel regions per chunk
    limit = 4 << 18
    messages = encode_chunk_messages(data, 5, limit, CONTROLLER_CHUNK)
    asm = assembler(data, limit, payload_id=5)

    done = [asm.add_message(message) for message in messages]

    assert done == [False] * (len(messages) - 1) + [True]
    np.testing.assert_array_equal(asm.take(), data)


def test_protobuf_learner_chunks_reassemble_with_field_3() -> None:
    data = values(1001, seed=2)
    asm = assembler(data, 1000, payload_id=9, field=LEARNER_CHUNK)

    for message in learner_chunks(data, 9, 1000):  # 1000 B chunks end inside values
        asm.add_message(message)

    result = asm.take()
    assert result.dtype == np.float32
    np.testing.assert_array_equal(result, data)


def test_take_hands_over_the_buffer_without_copying() -> None:
    data = values(16)
    asm = assembler(data, 64)
    asm.add_message(encode_chunk_messages(data, 7, 64, CONTROLLER_CHUNK)[0])

    result = asm.take()

    assert not result.flags.owndata  # backed by the Rust Vec
    assert result.flags.writeable


def test_peek_chunk_reads_the_header_and_skips_other_bodies() -> None:
    message = encode_chunk_messages(values(10), 12, 24, CONTROLLER_CHUNK)[1]
    heartbeat = pb.ControllerMessage(heartbeat=pb.Heartbeat()).SerializeToString()

    assert peek_chunk(message, CONTROLLER_CHUNK) == (12, 1, 16)
    assert peek_chunk(heartbeat, CONTROLLER_CHUNK) is None


def test_unknown_fields_and_any_order_are_tolerated() -> None:
    data = values(4, seed=3)
    # Chunk fields in reverse order with an unknown varint field 9 and fixed32 field 10, inside
    # an envelope with an unknown varint field 20 before it.
    chunk = b"\x1a\x10" + data.tobytes() + b"\x48\x05" + b"\x55\x01\x02\x03\x04" + b"\x08\x07"
    raw = b"\xa0\x01\x01" + b"\x22" + bytes([len(chunk)]) + chunk
    parsed = pb.ControllerMessage.FromString(raw)  # the protobuf runtime agrees it is valid
    assert parsed.chunk.payload_id == 7
    asm = assembler(data, 64)

    assert asm.add_message(raw)
    np.testing.assert_array_equal(asm.take(), data)


@pytest.mark.parametrize(
    "raw",
    [
        b"\xff" * 11,  # an endless varint tag
        b"\x22\x05\x08",  # length past the end
        b"\x22",  # no length
        b"\x00\x01",  # field number 0
        b"\x26\x00",  # wire type 6
        b"\x22\x02\x10\x80",  # truncated varint inside the chunk
    ],
)
def test_garbage_is_rejected(raw: bytes) -> None:
    with pytest.raises(WireFormatError, match="malformed protobuf message"):
        peek_chunk(raw, CONTROLLER_CHUNK)
    with pytest.raises(WireFormatError, match="malformed protobuf message"):
        ChunkAssembler(4, 0, 1, 4, CONTROLLER_CHUNK).add_message(raw)


def test_a_truncated_message_is_rejected() -> None:
    message = encode_chunk_messages(values(8), 1, 64, CONTROLLER_CHUNK)[0]

    with pytest.raises(WireFormatError, match="runs past the end"):
        assembler(values(8), 64, payload_id=1).add_message(message[:-1])


# --- validation, as wire.PayloadAssembler -----------------------------------------------------


def chunk(payload_id: int, index: int, data: bytes) -> bytes:
    return pb.ControllerMessage(
        chunk=pb.Chunk(payload_id=payload_id, index=index, data=data)
    ).SerializeToString()


def test_a_chunk_of_another_payload() -> None:
    asm = ChunkAssembler(16, 5, 2, 8, CONTROLLER_CHUNK)

    with pytest.raises(WireFormatError, match="chunk for payload 6 while payload 5 is incomplete"):
        asm.add_message(chunk(6, 0, bytes(8)))


def test_a_chunk_out_of_order() -> None:
    asm = ChunkAssembler(24, 5, 3, 8, CONTROLLER_CHUNK)
    asm.add_message(chunk(5, 0, bytes(8)))

    with pytest.raises(WireFormatError, match="chunk 2 arrived, expected chunk 1"):
        asm.add_message(chunk(5, 2, bytes(8)))


def test_a_chunk_over_the_limit() -> None:
    asm = ChunkAssembler(16, 5, 2, 8, CONTROLLER_CHUNK)

    with pytest.raises(WireFormatError, match="chunk has 12 bytes, the limit is 8"):
        asm.add_message(chunk(5, 0, bytes(12)))


def test_chunks_beyond_the_announced_size() -> None:
    asm = ChunkAssembler(12, 5, 2, 8, CONTROLLER_CHUNK)
    asm.add_message(chunk(5, 0, bytes(8)))

    with pytest.raises(WireFormatError, match="chunks exceed the announced 12 bytes"):
        asm.add_message(chunk(5, 1, bytes(8)))


def test_a_payload_that_ends_short() -> None:
    asm = ChunkAssembler(16, 5, 2, 8, CONTROLLER_CHUNK)
    asm.add_message(chunk(5, 0, bytes(8)))

    with pytest.raises(WireFormatError, match="payload ended after 12 of 16 bytes"):
        asm.add_message(chunk(5, 1, bytes(4)))


def test_a_chunk_after_the_last() -> None:
    asm = ChunkAssembler(8, 5, 1, 8, CONTROLLER_CHUNK)
    asm.add_message(chunk(5, 0, bytes(8)))

    with pytest.raises(WireFormatError, match="chunk 1 arrived after the announced 1 chunks"):
        asm.add_message(chunk(5, 1, bytes(8)))


def test_a_message_that_is_not_a_chunk() -> None:
    asm = ChunkAssembler(8, 5, 1, 8, CONTROLLER_CHUNK)
    heartbeat = pb.ControllerMessage(heartbeat=pb.Heartbeat()).SerializeToString()

    with pytest.raises(WireFormatError, match="message is not a chunk"):
        asm.add_message(heartbeat)


def test_a_non_finite_value_is_named_by_index() -> None:
    data = values(10)
    data[7] = np.inf
    asm = assembler(data, 64)

    with pytest.raises(WireFormatError, match=r"NaN or infinite values \(first at value 7\)"):
        asm.add_message(encode_chunk_messages(data, 7, 64, CONTROLLER_CHUNK)[0])


def test_a_nan_split_across_a_chunk_boundary_is_found() -> None:
    data = values(8)
    data[2] = np.nan  # bytes 8..12; the first chunk ends at byte 10
    messages = controller_chunks(data, 7, 10)
    asm = assembler(data, 10)
    assert not asm.add_message(messages[0])

    with pytest.raises(WireFormatError, match=r"first at value 2\)"):
        asm.add_message(messages[1])


def test_non_finite_values_pass_without_the_check() -> None:
    data = np.array([np.nan, 1.0], dtype=np.float32)
    asm = ChunkAssembler(8, 1, 1, 8, CONTROLLER_CHUNK, check_finite=False)

    asm.add_message(chunk(1, 0, data.tobytes()))

    assert np.isnan(asm.take()[0])


def test_an_error_rejects_the_payload_for_good() -> None:
    asm = ChunkAssembler(16, 5, 2, 8, CONTROLLER_CHUNK)
    with pytest.raises(WireFormatError):
        asm.add_message(chunk(5, 1, bytes(8)))

    with pytest.raises(WireFormatError, match="payload was rejected earlier: chunk 1 arrived"):
        asm.add_message(chunk(5, 0, bytes(8)))


def test_take_before_the_last_chunk_and_twice() -> None:
    asm = ChunkAssembler(16, 5, 2, 8, CONTROLLER_CHUNK)
    asm.add_message(chunk(5, 0, bytes(8)))
    with pytest.raises(WireFormatError, match="payload incomplete: 1 of 2 chunks"):
        asm.take()
    asm.add_message(chunk(5, 1, bytes(8)))
    asm.take()

    with pytest.raises(WireFormatError, match="payload was already taken"):
        asm.take()


def test_progress_properties() -> None:
    asm = ChunkAssembler(16, 5, 2, 8, CONTROLLER_CHUNK)
    asm.add_message(chunk(5, 0, bytes(8)))

    assert (asm.received, asm.done, asm.num_chunks, asm.total_bytes, asm.payload_id) == (
        1,
        False,
        2,
        16,
        5,
    )


def test_an_empty_payload_with_no_chunks_is_done_at_once() -> None:
    asm = ChunkAssembler(0, 5, 0, 8, CONTROLLER_CHUNK)

    assert asm.done
    assert asm.take().size == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((6, 0, 1, 8, 4), "payload has 6 bytes, not a whole number of float32 values"),
        ((16, 0, 1, 8, 4), "payload announces 1 chunks; 16 bytes need at least 2 of at most 8"),
        ((8, 0, 9, 8, 4), "payload announces 9 chunks"),
        ((8, 0, 1, 0, 4), "max_chunk_bytes must be > 0"),
        ((8, 0, 1, 8, 0), "envelope field must be in 1..=536870911, got 0"),
    ],
)
def test_inconsistent_announcements_are_rejected(
    args: tuple[int, int, int, int, int], message: str
) -> None:
    with pytest.raises(WireFormatError, match=message):
        ChunkAssembler(*args)


def test_a_recycled_buffer_carries_only_the_new_payload() -> None:
    first, second = values(300_000, seed=4), values(300_000, seed=5)  # pooled sizes (>= 1 MiB)
    limit = 1 << 20
    asm_first = assembler(first, limit)
    for message in encode_chunk_messages(first, 7, limit, CONTROLLER_CHUNK):
        asm_first.add_message(message)
    asm_first.take()  # freed at once: its buffer goes back to the pool
    asm = assembler(second, limit)

    for message in encode_chunk_messages(second, 7, limit, CONTROLLER_CHUNK):
        asm.add_message(message)

    np.testing.assert_array_equal(asm.take(), second)


# ------------------------------------------------------------------------------ in place


def _in_place(values: np.ndarray, limit: int, payload_id: int = 3) -> InPlaceAssembler:
    messages = encode_chunk_messages(values, payload_id, limit, 3)
    assembler = InPlaceAssembler(values.nbytes, payload_id, len(messages), limit, 3)
    for message in messages:
        assembler.add_message(message)
    return assembler


def test_in_place_upload_is_kept_in_its_messages_and_reads_back_exactly() -> None:
    data = values(10_003)

    update = _in_place(data, 1024).take()

    assert isinstance(update, Segments)
    assert len(update) == data.size
    np.testing.assert_array_equal(update.to_array(), data)


def test_segments_fold_to_the_same_bits_as_their_arrays() -> None:
    rows = [values(70_001, seed) for seed in range(5)]
    weights = [0.5, 1.0, 2.0, 3.0, 0.25]
    updates = [_in_place(r, 4000 + 4 * i).take() for i, r in enumerate(rows[:3])] + rows[3:]
    expected, folded = Accumulator(70_001), Accumulator(70_001)
    expected.add_many(rows, weights, check_finite=False)

    folded.add_many(updates, weights, check_finite=False)

    np.testing.assert_array_equal(folded.mean(), expected.mean())


def test_a_chunk_ending_inside_a_value_makes_the_assembler_copy() -> None:
    data = values(1000)

    assembler = _in_place(data, 1022)  # not a multiple of 4 bytes

    assert assembler.copying
    update = assembler.take()
    assert isinstance(update, np.ndarray)
    np.testing.assert_array_equal(update, data)


def test_in_place_finds_a_nan_at_its_index_and_rejects_the_payload() -> None:
    data = values(5000)
    data[4321] = np.nan
    messages = encode_chunk_messages(data, 1, 4096, 3)
    assembler = InPlaceAssembler(data.nbytes, 1, len(messages), 4096, 3)
    for message in messages[:4]:  # values 0..4095: finite
        assembler.add_message(message)

    with pytest.raises(WireFormatError, match="first at value 4321"):
        assembler.add_message(messages[4])
    with pytest.raises(WireFormatError, match="rejected earlier"):
        assembler.add_message(messages[4])


def test_segments_need_check_finite_false() -> None:
    update = _in_place(values(100), 64).take()

    with pytest.raises(ValueError, match="check_finite=False"):
        Accumulator(100).add_many([update], [1.0])
