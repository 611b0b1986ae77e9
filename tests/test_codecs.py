"""Update codecs (float16, bfloat16, int8 with a scale per chunk) end to end, with the real
extension: numpy (learner) and Rust (controller) encode the same bits, uploads fold in place
exactly as their decoded arrays, and malformed chunks are refused with a clear error."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from metis_async import codecs, store, wire
from metis_async._core import Accumulator, ChunkAssembler, WireFormatError, encode_chunk_messages
from metis_async.client.models import ModelReceiver
from metis_async.client.stream import LearnerStream
from metis_async.client.summary import RunSummary
from metis_async.client.tasks import TaskWorker
from metis_async.v1 import controller_pb2 as pb

CODECS = [pb.DTYPE_FLOAT16, pb.DTYPE_BFLOAT16, pb.DTYPE_INT8]
LIMIT = 1000  # bytes per chunk: 500 float16 values, 1000 int8 values
LAYOUT_ID = 7


def vector(n: int = 2500, seed: int = 0) -> wire.FloatVector:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(n) * 3).astype(np.float32)


def upload(
    flat: wire.FloatVector, dtype: int, in_place: bool = True
) -> tuple[wire.Upload, list[bytes]]:
    """An Upload that accepts `dtype`, and the learner's serialized chunk messages of `flat`."""
    header, chunks = wire.encode_payload(
        flat, 3, pb.PAYLOAD_KIND_DELTA, LAYOUT_ID, LIMIT, dtype=dtype
    )
    received = wire.Upload(
        header,
        flat.nbytes,
        LAYOUT_ID,
        LIMIT,
        in_place=in_place,
        allowed={pb.DTYPE_FLOAT32, dtype},
    )
    return received, [pb.LearnerMessage(chunk=c).SerializeToString() for c in chunks]


def decoded(flat: wire.FloatVector, dtype: int) -> wire.FloatVector:
    """What `flat` decodes to, chunk by chunk, by the numpy reference."""
    parts = [codecs.decode(d, dtype, s) for d, s in codecs.encode_chunks(flat, dtype, LIMIT)]
    return np.concatenate(parts)


@pytest.mark.parametrize("dtype", CODECS)
def test_numpy_and_rust_encoders_write_the_same_messages(dtype: int) -> None:
    flat = vector()
    _, chunks = wire.encode_payload(flat, 3, pb.PAYLOAD_KIND_DELTA, LAYOUT_ID, LIMIT, dtype)

    rust = encode_chunk_messages(flat, 3, LIMIT, wire.LEARNER_CHUNK_FIELD, dtype)

    assert rust == [pb.LearnerMessage(chunk=c).SerializeToString() for c in chunks]


@pytest.mark.parametrize(
    ("dtype", "bound"),
    [(pb.DTYPE_FLOAT16, 2.0**-11), (pb.DTYPE_BFLOAT16, 2.0**-8)],
)
def test_half_precision_round_trips_within_half_an_ulp(dtype: int, bound: float) -> None:
    flat = vector()

    back = decoded(flat, dtype)

    assert np.all(np.abs(back - flat) <= np.abs(flat) * bound)


def test_int8_round_trips_within_half_a_step_per_chunk() -> None:
    flat = vector()
    chunks = list(codecs.encode_chunks(flat, pb.DTYPE_INT8, LIMIT))

    for i, (data, scale) in enumerate(chunks):
        values = flat[i * LIMIT : (i + 1) * LIMIT]
        error = np.abs(codecs.decode(data, pb.DTYPE_INT8, scale) - values)
        assert scale == np.float32(np.abs(values).max()) / np.float32(127)
        assert error.max() <= scale * (0.5 + 2**-16)


def test_a_chunk_of_zeros_has_scale_zero() -> None:
    data, scale = codecs.encode(np.zeros(4, dtype=np.float32), pb.DTYPE_INT8)

    assert (data, scale) == (bytes(4), 0.0)


@pytest.mark.parametrize("dtype", CODECS)
def test_in_place_fold_equals_adding_the_decoded_array(dtype: int) -> None:
    flat = vector()
    received, messages = upload(flat, dtype)
    for raw in messages:
        received.add(raw)
    segments = received.take()

    folded = Accumulator(flat.size)
    folded.add_many([segments], [2.5], check_finite=False)
    reference = Accumulator(flat.size)
    reference.add(decoded(flat, dtype), 2.5)

    assert not isinstance(segments, np.ndarray)
    assert segments.dtype == dtype
    assert np.array_equal(segments.to_array(), decoded(flat, dtype))
    assert np.array_equal(folded.weighted_sum(), reference.weighted_sum())


@pytest.mark.parametrize("dtype", CODECS)
def test_copying_upload_decodes_to_the_reference(dtype: int) -> None:
    flat = vector()
    received, messages = upload(flat, dtype, in_place=False)
    for raw in messages:
        received.add(raw)

    assert np.array_equal(received.take(), decoded(flat, dtype))


@pytest.mark.parametrize("dtype", CODECS)
def test_the_learner_decodes_a_model_the_controller_encoded(dtype: int) -> None:
    flat = vector()
    layout = wire.make_layout([flat])
    messages = store.encode_version(layout, 4, flat, LIMIT, dtype).messages
    model = pb.ControllerMessage.FromString(messages[0]).model
    receiver = ModelReceiver(None, codecs=CODECS)
    receiver.on_layout(layout)
    receiver.on_model(model)

    for raw in messages[1:]:
        held = receiver.on_chunk(pb.ControllerMessage.FromString(raw).chunk)

    assert model.payload.total_bytes == flat.size * codecs.item_size(dtype)
    assert held is not None
    assert np.array_equal(held.flat, decoded(flat, dtype))


def test_the_controller_refuses_codecs_it_did_not_negotiate() -> None:
    header, _ = wire.encode_payload(vector(), 3, pb.PAYLOAD_KIND_DELTA, LAYOUT_ID, LIMIT, 3)

    with pytest.raises(wire.WireError, match="payload dtype is DTYPE_FLOAT16, accepted"):
        wire.check_header(header, 2500 * 4, LAYOUT_ID, LIMIT)


def test_a_codec_payload_must_announce_its_encoded_size() -> None:
    header, _ = wire.encode_payload(vector(), 3, pb.PAYLOAD_KIND_DELTA, LAYOUT_ID, LIMIT, 5)
    header.total_bytes = 2500 * 4

    with pytest.raises(wire.WireError, match="the model has 2500 as DTYPE_INT8"):
        wire.check_header(header, 2500 * 4, LAYOUT_ID, LIMIT, {pb.DTYPE_INT8})


def malformed(dtype: int, chunk: pb.Chunk, values: int = 4) -> str:
    """The error the controller's Upload raises for `chunk` as the only chunk of a payload."""
    header = pb.Payload(
        payload_id=1,
        kind=pb.PAYLOAD_KIND_DELTA,
        dtype=dtype,  # type: ignore[arg-type]
        total_bytes=values * codecs.item_size(dtype),
        num_chunks=1,
        layout_id=LAYOUT_ID,
    )
    received = wire.Upload(header, values * 4, LAYOUT_ID, LIMIT, allowed={dtype})
    with pytest.raises(wire.WireError) as error:
        received.add(pb.LearnerMessage(chunk=chunk).SerializeToString())
    return str(error.value)


def test_a_float16_chunk_of_partial_values_is_refused() -> None:
    message = malformed(pb.DTYPE_FLOAT16, pb.Chunk(payload_id=1, data=bytes(7)))

    assert message == "chunk 0 has 7 bytes, not a whole number of float16 values"


def test_a_float16_nan_is_refused_at_its_index() -> None:
    data = np.array([0, 1, np.nan, 2], dtype="<f2").tobytes()

    message = malformed(pb.DTYPE_FLOAT16, pb.Chunk(payload_id=1, data=data))

    assert message == "update contains NaN or infinite values (first at value 2)"


@pytest.mark.parametrize("scale", [float("inf"), float("nan"), -1.0, 3e38])
def test_an_unusable_int8_scale_is_refused(scale: float) -> None:
    message = malformed(pb.DTYPE_INT8, pb.Chunk(payload_id=1, data=bytes(4), scale=scale))

    assert message.startswith("chunk 0 has int8 scale")


def test_a_scale_on_a_bfloat16_chunk_is_refused() -> None:
    message = malformed(pb.DTYPE_BFLOAT16, pb.Chunk(payload_id=1, data=bytes(8), scale=1.0))

    assert "bfloat16 payloads carry none" in message


def test_the_learner_refuses_an_infinite_int8_scale_too() -> None:
    header = pb.Payload(
        payload_id=1, dtype=pb.DTYPE_INT8, total_bytes=4, num_chunks=1, layout_id=LAYOUT_ID
    )
    assembler = wire.PayloadAssembler(header, 16, LAYOUT_ID, LIMIT, allowed={pb.DTYPE_INT8})

    with pytest.raises(wire.WireError, match="int8 scale inf"):
        assembler.add(pb.Chunk(payload_id=1, data=bytes(4), scale=float("inf")))


def test_values_beyond_float16_are_refused_by_both_encoders() -> None:
    flat = np.array([1.0, 70000.0], dtype=np.float32)

    with pytest.raises(codecs.CodecError, match="value 1 does not fit float16"):
        wire.encode_payload(flat, 1, pb.PAYLOAD_KIND_DELTA, LAYOUT_ID, LIMIT, pb.DTYPE_FLOAT16)
    with pytest.raises(WireFormatError, match="value 1 does not fit float16"):
        encode_chunk_messages(flat, 1, LIMIT, 3, pb.DTYPE_FLOAT16)


def test_an_unknown_dtype_is_a_wire_format_error() -> None:
    with pytest.raises(WireFormatError, match="dtype 2 is not a wire dtype"):
        ChunkAssembler(8, 1, 1, LIMIT, 3, dtype=pb.DTYPE_FLOAT64)


def test_the_learner_refuses_an_upload_dtype_it_did_not_offer() -> None:
    receiver = ModelReceiver(None, codecs=[pb.DTYPE_FLOAT16])

    with pytest.raises(wire.WireError, match="did not offer"):
        receiver.on_welcome(pb.Welcome(upload_dtype=pb.DTYPE_INT8))


def worker_stream(upload_dtype: int) -> tuple[TaskWorker, LearnerStream]:
    """A task worker and a stream welcomed with `upload_dtype` (the learner offers all codecs)."""
    stream = LearnerStream(pb.Hello(), ModelReceiver(None, codecs=CODECS))
    stream.models.on_welcome(pb.Welcome(upload_dtype=upload_dtype, max_chunk_bytes=LIMIT))
    return TaskWorker(None, RunSummary(), itertools.count(1)), stream  # type: ignore[arg-type]


def test_the_client_uploads_in_the_welcomed_dtype() -> None:
    worker, stream = worker_stream(pb.DTYPE_INT8)

    header, chunks = worker._upload(stream, vector(), pb.PAYLOAD_KIND_DELTA, LAYOUT_ID)

    assert header.dtype == pb.DTYPE_INT8
    assert header.total_bytes == 2500
    assert all(c.scale > 0 for c in chunks)


def test_the_client_falls_back_to_float32_when_float16_cannot_hold_a_value() -> None:
    worker, stream = worker_stream(pb.DTYPE_FLOAT16)
    flat = np.array([1.0, 1e6], dtype=np.float32)

    header, _ = worker._upload(stream, flat, pb.PAYLOAD_KIND_DELTA, LAYOUT_ID)

    assert header.dtype == pb.DTYPE_FLOAT32
