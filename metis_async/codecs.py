"""Update codecs in numpy: float32 vectors as float16, bfloat16 or int8 with a scale per chunk.

The encodings `controller.proto` defines (CODECS), written with numpy alone so the edge learner
needs no compiled extension. The controller uses the Rust implementation (`metis_async._core`:
`encode_chunk_messages(dtype=...)`, the assemblers' `dtype=`); both give the same bits, which
`tests/test_codecs.py` checks:

- float16: numpy's float32 -> float16 cast (round to nearest, ties to even);
- bfloat16: the top 16 bits of the float32, rounded to nearest, ties to even, in integer
  arithmetic (numpy has no bfloat16);
- int8: per chunk `scale = max|x| / 127` in float32, `q = rint(x / scale)` (ties to even)
  clipped to [-127, 127]; a chunk of zeros has scale 0; decoded as `float32(q) * scale`.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import numpy.typing as npt

from metis_async.v1 import controller_pb2 as pb

FloatVector = npt.NDArray[np.float32]

CODEC_DTYPES: tuple[pb.DType.ValueType, ...] = (
    pb.DTYPE_FLOAT16,
    pb.DTYPE_BFLOAT16,
    pb.DTYPE_INT8,
)
"""The payload dtypes besides float32 (what a learner may list in `Hello.codecs`)."""

ITEM_SIZE: dict[int, int] = {
    pb.DTYPE_UNSPECIFIED: 4,
    pb.DTYPE_FLOAT32: 4,
    pb.DTYPE_FLOAT16: 2,
    pb.DTYPE_BFLOAT16: 2,
    pb.DTYPE_INT8: 1,
}
"""Bytes per encoded value of each payload dtype (UNSPECIFIED reads as float32)."""

_INT8_MAX = np.float32(127.0)


class CodecError(ValueError):
    """Values that a codec cannot encode (non-finite, or out of its range)."""


def item_size(dtype: int) -> int:
    """Bytes per value of payload dtype `dtype`; raises `CodecError` for a non-wire dtype."""
    try:
        return ITEM_SIZE[dtype]
    except KeyError:
        raise CodecError(f"dtype {dtype} is not a payload dtype") from None


def values_per_chunk(dtype: int, max_chunk_bytes: int) -> int:
    """Whole values in a chunk of at most `max_chunk_bytes` (codec chunks hold whole values)."""
    per = max_chunk_bytes // item_size(dtype)
    if per == 0:
        raise CodecError(f"max_chunk_bytes {max_chunk_bytes} cannot hold one value of {dtype}")
    return per


def int8_scale(values: FloatVector) -> np.float32:
    """The int8 scale of one chunk: `max|x| / 127` in float32 (0 for no values)."""
    largest = float(np.abs(values).max()) if values.size else 0.0
    # float32 division, as the Rust encoder does (float64 division would round differently)
    scale: np.float32 = np.float32(largest) / _INT8_MAX
    return scale


def encode(values: FloatVector, dtype: int) -> tuple[bytes, float]:
    """One chunk's data and scale (0.0 unless int8) for float32 `values`.

    Raises `CodecError` for NaN/infinity and for values the codec cannot hold.
    """
    values = np.ascontiguousarray(values, dtype=np.float32)
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        raise CodecError(f"values to encode contain NaN or infinity (first at value {bad[0]})")
    if dtype in (pb.DTYPE_FLOAT32, pb.DTYPE_UNSPECIFIED):
        return values.astype("<f4", copy=False).tobytes(), 0.0
    if dtype == pb.DTYPE_FLOAT16:
        with np.errstate(over="ignore"):
            half = values.astype("<f2")
        _check_range(np.isinf(half), "float16")
        return half.tobytes(), 0.0
    if dtype == pb.DTYPE_BFLOAT16:
        bits = values.view(np.uint32)
        rounded = ((bits + np.uint32(0x7FFF) + ((bits >> 16) & 1)) >> 16).astype("<u2")
        _check_range(rounded & 0x7F80 == 0x7F80, "bfloat16")
        return rounded.tobytes(), 0.0
    if dtype == pb.DTYPE_INT8:
        scale = int8_scale(values)
        if not np.isfinite(scale * _INT8_MAX):
            raise CodecError("a value within an ulp of float32's maximum does not fit int8")
        if scale == 0:
            return bytes(values.size), 0.0
        q = np.clip(np.rint(values / scale), -_INT8_MAX, _INT8_MAX).astype(np.int8)
        return q.tobytes(), float(scale)
    raise CodecError(f"dtype {dtype} is not a payload dtype")


def decode(data: bytes, dtype: int, scale: float = 0.0) -> FloatVector:
    """The float32 values of one chunk's `data` (whole values) encoded as `dtype`."""
    size = item_size(dtype)
    if len(data) % size:
        raise CodecError(f"{len(data)} bytes are not a whole number of {size}-byte values")
    if size == 4:
        return np.frombuffer(data, dtype="<f4").astype(np.float32)
    if dtype == pb.DTYPE_FLOAT16:
        return np.frombuffer(data, dtype="<f2").astype(np.float32)
    if dtype == pb.DTYPE_BFLOAT16:
        bits = np.frombuffer(data, dtype="<u2").astype(np.uint32) << 16
        widened: FloatVector = bits.view(np.float32)
        return widened
    q = np.frombuffer(data, dtype=np.int8).astype(np.float32)
    scaled: FloatVector = q * np.float32(scale)
    return scaled


def first_non_finite(data: bytes, dtype: int) -> int | None:
    """Index of the first encoded value that decodes to NaN or infinity (int8: never)."""
    if dtype == pb.DTYPE_INT8:
        return None
    if dtype in (pb.DTYPE_FLOAT16, pb.DTYPE_BFLOAT16):
        mask = 0x7C00 if dtype == pb.DTYPE_FLOAT16 else 0x7F80
        bits = np.frombuffer(data, dtype="<u2")
        bad = np.flatnonzero(bits & mask == mask)
    else:
        bad = np.flatnonzero(~np.isfinite(np.frombuffer(data, dtype="<f4")))
    return int(bad[0]) if bad.size else None


def scale_is_valid(scale: float) -> bool:
    """Whether an int8 chunk's scale is finite, >= 0, and 127 x scale finite (float32)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return bool(scale >= 0 and np.isfinite(np.float32(scale) * _INT8_MAX))


def encode_chunks(
    flat: FloatVector, dtype: int, max_chunk_bytes: int
) -> Iterator[tuple[bytes, float]]:
    """(data, scale) of each chunk of `flat` encoded as a codec `dtype`, lazily, in order:
    chunks of `max_chunk_bytes` rounded down to whole values."""
    per = values_per_chunk(dtype, max_chunk_bytes)
    for start in range(0, flat.size, per):
        try:
            yield encode(flat[start : start + per], dtype)
        except CodecError as error:
            raise CodecError(f"chunk starting at value {start}: {error}") from None


def _check_range(overflowed: npt.NDArray[np.bool_], codec: str) -> None:
    bad = np.flatnonzero(overflowed)
    if bad.size:
        raise CodecError(f"value {bad[0]} does not fit {codec} (it would round to infinity)")
