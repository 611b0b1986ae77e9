"""Fuzzing the decoders with hypothesis: random and mutated bytes never crash the Rust
decoders (no panic crossing into Python: only `WireFormatError`, a `ValueError`), never slip
a non-finite value through, and never take a live controller down.

`HYPOTHESIS_PROFILE=slow pytest tests/test_fuzz.py` runs 500 examples per property instead of
40. A coverage-guided run (atheris, or `cargo fuzz` over `rust/core`) is documented in
docs/DESIGN-NOTES.md as the longer option.
"""

from __future__ import annotations

from collections.abc import Callable

import grpc
import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from metis_async import wire
from metis_async._core import (
    ChunkAssembler,
    InPlaceAssembler,
    WireFormatError,
    encode_chunk_messages,
    peek_chunk,
)
from metis_async.ingest import parse_learner_message
from metis_async.session import ProtocolViolation
from metis_async.v1 import controller_pb2 as pb
from tests.conftest import ControllerThread, RawLearner, ShiftLearner, sync_policy
from tests.test_server import _start_learner

CHUNK_FIELD = 3  # LearnerMessage.chunk
DTYPES = st.sampled_from([1, 3, 4, 5])


def _mutated(data: bytes, flips: list[tuple[int, int]]) -> bytes:
    raw = bytearray(data)
    for position, value in flips:
        if raw:
            raw[position % len(raw)] = value
    return bytes(raw)


@given(st.binary(max_size=512), st.integers(1, 20))
def test_peek_chunk_reads_any_bytes_or_says_why_not(raw: bytes, field: int) -> None:
    try:
        found = peek_chunk(raw, field)
    except WireFormatError:
        return
    if found is not None:
        payload_id, index, length = found
        assert min(payload_id, index, length) >= 0
        assert length <= len(raw)


@given(
    st.lists(st.floats(-1e3, 1e3, width=32), min_size=1, max_size=64),
    DTYPES,
    st.integers(4, 64),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4),
    st.booleans(),
)
def test_assemblers_take_mutated_uploads_or_refuse_them(
    values: list[float],
    dtype: int,
    chunk_bytes: int,
    flips: list[tuple[int, int]],
    in_place: bool,
) -> None:
    data = np.asarray(values, dtype=np.float32)
    messages = encode_chunk_messages(data, 7, chunk_bytes, CHUNK_FIELD, dtype)
    item = {1: 4, 3: 2, 4: 2, 5: 1}[dtype]
    kind: Callable[..., ChunkAssembler | InPlaceAssembler] = (
        InPlaceAssembler if in_place else ChunkAssembler
    )
    assembler = kind(data.size * item, 7, len(messages), chunk_bytes, CHUNK_FIELD, True, dtype)
    mutated = [_mutated(m, flips) if i == 0 else m for i, m in enumerate(messages)]
    try:
        for raw in mutated:
            assembler.add_message(raw)
        result = assembler.take()
    except WireFormatError:
        return  # a clear refusal
    array = result if isinstance(result, np.ndarray) else result.to_array()
    assert array.shape == data.shape
    assert np.isfinite(array).all()  # nothing non-finite gets through
    if mutated == messages and dtype == 1:
        np.testing.assert_array_equal(array, data)


@given(st.binary(max_size=256))
def test_learner_messages_parse_or_give_a_protocol_violation(raw: bytes) -> None:
    code = None
    try:
        parse_learner_message(raw)
    except ProtocolViolation as error:
        code = error.code

    assert code in (None, grpc.StatusCode.INVALID_ARGUMENT)


@given(
    st.integers(0, 2**40),
    st.integers(0, 2**20),
    st.integers(1, 1 << 22),
    DTYPES,
    st.integers(0, 10),
)
def test_payload_headers_are_checked_before_anything_is_allocated(
    total: int, chunks: int, chunk_bytes: int, dtype: int, layout_id: int
) -> None:
    header = pb.Payload(
        payload_id=1,
        kind=pb.PAYLOAD_KIND_DELTA,
        dtype=dtype,  # type: ignore[arg-type]
        total_bytes=total,
        num_chunks=chunks,
        layout_id=layout_id,
    )
    try:
        wire.check_header(header, 4000, 3, chunk_bytes, {1, 3, 4, 5})
    except wire.WireError:
        return
    assert layout_id == 3  # accepted headers describe this model exactly


def test_a_controller_survives_a_stream_of_garbage(
    controller_factory: Callable[..., ControllerThread],
) -> None:
    rng = np.random.default_rng(0)
    ct = controller_factory(sync_policy(min_learners=1, rounds=1), hello_timeout_seconds=0.5)
    codes = set()
    for index in range(30):
        raw = RawLearner(ct.address, f"g{index}")
        for _ in range(int(rng.integers(1, 6))):
            raw.send_raw(rng.bytes(int(rng.integers(0, 300))))
        raw.send_raw(None)  # half-close: the controller must answer, not wait
        try:
            raw.drain()
            codes.add(grpc.StatusCode.OK)
        except grpc.RpcError as error:
            codes.add(error.code())  # type: ignore[attr-defined]
        raw.channel.close()

    thread, _ = _start_learner(ct.address, ShiftLearner(1.0, 1), "honest")
    assert ct.wait_finished(30)
    thread.join(10)

    np.testing.assert_array_equal(ct.model(), np.full(10, 1.0, np.float32))
    assert codes <= {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.DEADLINE_EXCEEDED}
