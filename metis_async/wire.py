"""Flat model buffers on the wire: layouts, chunking and reassembly.

A model travels as one contiguous little-endian float32 buffer plus a `ModelLayout` (tensor names,
shapes, original dtypes, byte offsets), or, once negotiated, encoded with a codec (float16,
bfloat16, int8 with a scale per chunk; `metis_async.codecs`). Large buffers are split into chunks
of at most `MAX_CHUNK_BYTES`. Both the learner and the controller use this module, so it imports
only numpy and the generated protobuf code (the controller-side helpers import the extension
when called).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Collection, Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from metis_async import codecs
from metis_async.v1 import controller_pb2 as pb

if TYPE_CHECKING:
    from metis_async._core import Segments

MAX_CHUNK_BYTES = 4 * 1024 * 1024
"""Largest chunk either side sends (bytes); gRPC's default message limit is 4 MiB plus framing."""

DOWNLOAD_CHUNK_BYTES = 256 * 1024
"""Chunk size of the models the controller sends (bytes): gRPC holds up to one message per stream
beyond the controller's send budget, so a broadcast's buffers grow with this times the streams."""

WIRE_DTYPE = np.dtype("<f4")
"""Element type of the flat model vector (layouts count its bytes), and the default encoding."""

FLOAT32_ONLY: frozenset[int] = frozenset({pb.DTYPE_FLOAT32})
"""Payload dtypes accepted when no codec was negotiated."""

FloatVector = npt.NDArray[np.float32]

ModelVector = npt.NDArray[np.float32] | npt.NDArray[np.uint8]
"""A committed version as the controller holds it: float32 values, or under homomorphic
aggregation an encrypted version (uint8 bytes, `metis_async.secure.aggregate`)."""


def plain(model: ModelVector) -> FloatVector:
    """`model` as float32 values; RuntimeError for an encrypted version (no key to read it)."""
    if model.dtype != WIRE_DTYPE:
        raise RuntimeError("this version is encrypted: the controller holds no key to read it")
    return model  # type: ignore[return-value]


_NP_TO_PB: dict[np.dtype[np.generic], pb.DType.ValueType] = {
    np.dtype("float32"): pb.DTYPE_FLOAT32,
    np.dtype("float64"): pb.DTYPE_FLOAT64,
    np.dtype("float16"): pb.DTYPE_FLOAT16,
    np.dtype("int8"): pb.DTYPE_INT8,
}
_PB_TO_NP = {v: k for k, v in _NP_TO_PB.items()}


class WireError(ValueError):
    """A message or payload that does not follow the wire contract."""


def dtype_name(code: int) -> str:
    """Human-readable name of a `DType` enum value, for error messages."""
    try:
        return pb.DType.Name(code)  # type: ignore[arg-type]
    except ValueError:
        return f"unknown dtype {code}"


def make_layout(arrays: Sequence[npt.NDArray[np.generic]]) -> pb.ModelLayout:
    """Describe `arrays` as consecutive float32 segments of one flat buffer.

    Tensors of other float dtypes are carried as float32 on the wire and cast back on arrival;
    `layout_id` is a hash of names, shapes and dtypes, so it changes only with the architecture.
    """
    layout = pb.ModelLayout()
    offset = 0
    digest = hashlib.blake2b(digest_size=8)
    for i, array in enumerate(arrays):
        dtype = np.dtype(array.dtype)
        if dtype not in _NP_TO_PB:
            raise WireError(
                f"tensor {i} has dtype {dtype}; supported: float16, float32, float64, int8"
            )
        nbytes = int(array.size) * WIRE_DTYPE.itemsize
        spec = layout.tensors.add(
            name=f"t{i}", shape=[int(s) for s in array.shape], dtype=_NP_TO_PB[dtype]
        )
        spec.offset = offset
        spec.nbytes = nbytes
        digest.update(f"{spec.name}:{tuple(spec.shape)}:{spec.dtype};".encode())
        offset += nbytes
    layout.total_bytes = offset
    layout.layout_id = int.from_bytes(digest.digest(), "little") >> 1  # keep it < 2**63
    return layout


def num_parameters(layout: pb.ModelLayout) -> int:
    """Number of float32 values in a flat buffer of this layout."""
    return int(layout.total_bytes) // WIRE_DTYPE.itemsize


def flatten(arrays: Sequence[npt.NDArray[np.generic]], layout: pb.ModelLayout) -> FloatVector:
    """Copy `arrays` into one new float32 vector laid out as `layout` says."""
    if len(arrays) != len(layout.tensors):
        raise WireError(f"model has {len(arrays)} tensors, layout expects {len(layout.tensors)}")
    flat = np.empty(num_parameters(layout), dtype=np.float32)
    for i, (array, spec) in enumerate(zip(arrays, layout.tensors, strict=True)):
        if tuple(array.shape) != tuple(spec.shape):
            raise WireError(
                f"tensor {i} has shape {tuple(array.shape)}, layout expects {tuple(spec.shape)}"
            )
        start = int(spec.offset) // WIRE_DTYPE.itemsize
        flat[start : start + array.size] = np.asarray(array).reshape(-1)
    return flat


def unflatten(flat: FloatVector, layout: pb.ModelLayout) -> list[npt.NDArray[np.generic]]:
    """Split a flat vector into tensors of the layout's shapes and dtypes.

    float32 tensors are views into `flat` (no copy); other dtypes are cast copies.
    """
    if flat.size * WIRE_DTYPE.itemsize != layout.total_bytes:
        raise WireError(f"buffer has {flat.nbytes} bytes, layout expects {layout.total_bytes}")
    out: list[npt.NDArray[np.generic]] = []
    for spec in layout.tensors:
        start = int(spec.offset) // WIRE_DTYPE.itemsize
        count = int(spec.nbytes) // WIRE_DTYPE.itemsize
        view = flat[start : start + count].reshape(tuple(int(s) for s in spec.shape))
        dtype = _PB_TO_NP.get(spec.dtype, WIRE_DTYPE)
        out.append(view if dtype == np.float32 else view.astype(dtype))
    return out


def chunk_count(total_bytes: int, max_chunk_bytes: int = MAX_CHUNK_BYTES) -> int:
    """Number of chunks a buffer of `total_bytes` is split into (0 for an empty buffer)."""
    return -(-total_bytes // max_chunk_bytes)


def payload_bytes(num_values: int, dtype: int) -> int:
    """`Payload.total_bytes` of `num_values` values encoded as `dtype` (scales not counted)."""
    return num_values * codecs.item_size(dtype)


def make_payload(
    flat: FloatVector,
    payload_id: int,
    kind: int,
    layout_id: int,
    max_chunk_bytes: int = MAX_CHUNK_BYTES,
    dtype: int = pb.DTYPE_FLOAT32,
) -> tuple[pb.Payload, Iterator[pb.Chunk]]:
    """Announce `flat` as a payload and return its header and a lazy iterator of chunks.

    With a codec `dtype` (float16, bfloat16, int8; numpy, no extension needed) the chunks hold
    `max_chunk_bytes` rounded down to whole encoded values, int8 chunks with their scale; the
    values are encoded as the chunks are drawn, so `codecs.CodecError` (a value the codec cannot
    hold) comes from the iterator. `encode_payload` checks everything up front instead.
    """
    if dtype != pb.DTYPE_FLOAT32:
        return _make_encoded_payload(flat, payload_id, kind, layout_id, max_chunk_bytes, dtype)
    data = np.ascontiguousarray(flat, dtype=WIRE_DTYPE).view(np.uint8).data
    header = pb.Payload(
        payload_id=payload_id,
        kind=kind,  # type: ignore[arg-type]
        dtype=pb.DTYPE_FLOAT32,
        total_bytes=len(data),
        num_chunks=chunk_count(len(data), max_chunk_bytes),
        layout_id=layout_id,
    )

    def chunks() -> Iterator[pb.Chunk]:
        for index, start in enumerate(range(0, len(data), max_chunk_bytes)):
            # bytes() is the one copy protobuf needs; it does not accept memoryview.
            piece = bytes(data[start : start + max_chunk_bytes])
            yield pb.Chunk(payload_id=payload_id, index=index, data=piece)

    return header, chunks()


def _make_encoded_payload(
    flat: FloatVector,
    payload_id: int,
    kind: int,
    layout_id: int,
    max_chunk_bytes: int,
    dtype: int,
) -> tuple[pb.Payload, Iterator[pb.Chunk]]:
    values = np.ascontiguousarray(flat, dtype=np.float32).reshape(-1)
    per = codecs.values_per_chunk(dtype, max_chunk_bytes)
    header = pb.Payload(
        payload_id=payload_id,
        kind=kind,  # type: ignore[arg-type]
        dtype=dtype,  # type: ignore[arg-type]
        total_bytes=payload_bytes(values.size, dtype),
        num_chunks=-(-values.size // per),
        layout_id=layout_id,
    )

    def chunks() -> Iterator[pb.Chunk]:
        encoded = codecs.encode_chunks(values, dtype, max_chunk_bytes)
        for index, (data, scale) in enumerate(encoded):
            yield pb.Chunk(payload_id=payload_id, index=index, data=data, scale=scale)

    return header, chunks()


def encode_payload(
    flat: FloatVector,
    payload_id: int,
    kind: int,
    layout_id: int,
    max_chunk_bytes: int = MAX_CHUNK_BYTES,
    dtype: int = pb.DTYPE_FLOAT32,
) -> tuple[pb.Payload, list[pb.Chunk]]:
    """`make_payload` with every chunk encoded now: a learner's upload, header and chunks.

    Raises `codecs.CodecError` before anything is sent when a value does not fit the codec
    (float16: |x| >= 65520) or is not finite; the client then uploads float32 instead.
    """
    header, chunks = make_payload(flat, payload_id, kind, layout_id, max_chunk_bytes, dtype)
    return header, list(chunks)


def batches(items: Sequence[bytes], limit: int) -> list[tuple[int, Sequence[bytes]]]:
    """`items` cut into consecutive runs of at most `limit` bytes each (an item larger than
    `limit` goes alone): (index of the run's first item, the run)."""
    out: list[tuple[int, Sequence[bytes]]] = []
    first, size = 0, 0
    for index, item in enumerate(items):
        if size and size + len(item) > limit:
            out.append((first, items[first:index]))
            first, size = index, 0
        size += len(item)
    out.append((first, items[first:]))
    return out


def byte_payload(
    data: bytes, payload_id: int, kind: int, dtype: int, layout_id: int, max_chunk_bytes: int
) -> tuple[pb.Payload, list[pb.Chunk]]:
    """`data` (opaque bytes: ciphertexts, masked values) announced as one payload of `dtype` and
    cut into chunks of at most `max_chunk_bytes` (byte slices, in order)."""
    chunks = [
        pb.Chunk(payload_id=payload_id, index=i, data=data[at : at + max_chunk_bytes])
        for i, at in enumerate(range(0, len(data), max_chunk_bytes))
    ]
    header = pb.Payload(
        payload_id=payload_id,
        kind=kind,  # type: ignore[arg-type]
        dtype=dtype,  # type: ignore[arg-type]
        total_bytes=len(data),
        num_chunks=len(chunks),
        layout_id=layout_id,
    )
    return header, chunks


def check_header(
    header: pb.Payload,
    expected_bytes: int,
    layout_id: int,
    max_chunk_bytes: int,
    allowed: Collection[int] = FLOAT32_ONLY,
) -> None:
    """Check a payload announcement against the model; raises `WireError` naming the problem.

    Args:
        header: the announcement.
        expected_bytes: the model's size as float32 (`ModelLayout.total_bytes`); a codec
            payload must announce the same number of values at its own item size.
        layout_id: the model's layout id.
        max_chunk_bytes: largest chunk accepted (bytes).
        allowed: payload dtypes accepted (the controller: float32 and the negotiated upload
            dtype; a learner: float32 and the codecs it offered).
    """
    if header.dtype not in allowed:
        names = ", ".join(dtype_name(d) for d in sorted(allowed))
        raise WireError(f"payload dtype is {dtype_name(header.dtype)}, accepted: {names}")
    values = expected_bytes // WIRE_DTYPE.itemsize
    encoded = payload_bytes(values, header.dtype)
    if header.total_bytes != encoded:
        codec = "" if header.dtype == pb.DTYPE_FLOAT32 else f" as {dtype_name(header.dtype)}"
        raise WireError(
            f"payload has {header.total_bytes} bytes, the model has {encoded}{codec} "
            f"({values} values)"
        )
    if header.layout_id != layout_id:
        raise WireError(
            f"payload layout {header.layout_id} does not match the model layout {layout_id}"
        )
    expected_chunks = chunk_count(encoded, max_chunk_bytes)
    # float32 chunks are byte slices; a codec's chunks hold at least one whole value each
    most = encoded if header.dtype == pb.DTYPE_FLOAT32 else values
    if header.num_chunks < expected_chunks or header.num_chunks > max(most, 1):
        raise WireError(
            f"payload announces {header.num_chunks} chunks; {encoded} bytes need at "
            f"least {expected_chunks} of at most {max_chunk_bytes} bytes"
        )


class PayloadAssembler:
    """Reassembles one announced payload from its chunks into a preallocated float32 vector.

    Each chunk is copied once, straight into place (no joining of byte strings); a codec
    payload's chunks (whole values, int8 with a valid scale) are decoded into place with numpy.
    Any deviation from the header (wrong payload id, order, size, scale) raises `WireError`
    naming the problem.

    Args:
        check: optional finiteness check (index of the first NaN/inf in a vector, or None) run on
            each chunk's values right after the copy, while they are still in cache; the
            controller passes the Rust `first_non_finite` so uploads are never read again for it.
        allowed: payload dtypes accepted (see `check_header`).
    """

    def __init__(
        self,
        header: pb.Payload,
        expected_bytes: int,
        layout_id: int,
        max_chunk_bytes: int = MAX_CHUNK_BYTES,
        check: Callable[[FloatVector], int | None] | None = None,
        allowed: Collection[int] = FLOAT32_ONLY,
    ) -> None:
        check_header(header, expected_bytes, layout_id, max_chunk_bytes, allowed)
        self.header = header
        self._codec = header.dtype if header.dtype != pb.DTYPE_FLOAT32 else None
        if self._codec is not None:
            self._values = np.empty(expected_bytes // WIRE_DTYPE.itemsize, dtype=np.float32)
        self._max_chunk_bytes = max_chunk_bytes
        self._buffer = np.empty(0 if self._codec is not None else expected_bytes, dtype=np.uint8)
        self._filled = 0
        self._next_index = 0
        self._check = check
        self._checked = 0  # float32 values checked so far

    @property
    def done(self) -> bool:
        """Whether every announced chunk has arrived."""
        return self._next_index == self.header.num_chunks

    def add(self, chunk: pb.Chunk) -> None:
        """Copy one chunk into place; raises `WireError` if it does not fit the announcement."""
        if chunk.payload_id != self.header.payload_id:
            raise WireError(
                f"chunk for payload {chunk.payload_id} while payload {self.header.payload_id} "
                "is incomplete"
            )
        if chunk.index != self._next_index:
            raise WireError(f"chunk {chunk.index} arrived, expected chunk {self._next_index}")
        data = chunk.data  # each access copies: read it once
        if len(data) > self._max_chunk_bytes:
            raise WireError(f"chunk has {len(data)} bytes, the limit is {self._max_chunk_bytes}")
        if self._codec is not None:
            self._add_encoded(chunk, data)
            return
        end = self._filled + len(data)
        if end > self._buffer.size:
            raise WireError(f"chunks exceed the announced {self._buffer.size} bytes")
        self._buffer[self._filled : end] = np.frombuffer(data, dtype=np.uint8)
        self._filled = end
        if self._check is not None:
            complete = end // WIRE_DTYPE.itemsize  # a chunk may end inside a value
            values = self._buffer[: complete * WIRE_DTYPE.itemsize].view(WIRE_DTYPE)
            bad = self._check(values[self._checked : complete].astype(np.float32, copy=False))
            if bad is not None:
                raise WireError(
                    f"update contains NaN or infinite values (first at value {self._checked + bad})"
                )
            self._checked = complete
        self._next_index += 1
        if self.done and self._filled != self._buffer.size:
            raise WireError(f"payload ended after {self._filled} of {self._buffer.size} bytes")

    def _add_encoded(self, chunk: pb.Chunk, data: bytes) -> None:
        codec = int(self.header.dtype)
        size = codecs.item_size(codec)
        name = dtype_name(codec)
        if len(data) % size:
            raise WireError(
                f"chunk {chunk.index} has {len(data)} bytes, not a whole number of {name} values"
            )
        if codec == pb.DTYPE_INT8:
            if not codecs.scale_is_valid(chunk.scale):
                raise WireError(
                    f"chunk {chunk.index} has int8 scale {chunk.scale}, expected finite, >= 0 "
                    "and 127 x scale finite"
                )
        elif chunk.scale != 0:
            raise WireError(f"chunk {chunk.index} has a scale, but {name} payloads carry none")
        end = self._filled + len(data)
        if end > self.header.total_bytes:
            raise WireError(f"chunks exceed the announced {self.header.total_bytes} bytes")
        first = self._filled // size
        if self._check is not None and (bad := codecs.first_non_finite(data, codec)) is not None:
            raise WireError(
                f"update contains NaN or infinite values (first at value {first + bad})"
            )
        self._values[first : first + len(data) // size] = codecs.decode(data, codec, chunk.scale)
        self._filled = end
        self._next_index += 1
        if self.done and self._filled != self.header.total_bytes:
            raise WireError(
                f"payload ended after {self._filled} of {self.header.total_bytes} bytes"
            )

    def result(self) -> FloatVector:
        """The assembled (decoded) vector (a view of the internal buffer, no copy)."""
        if not self.done:
            raise WireError(
                f"payload incomplete: {self._next_index} of {self.header.num_chunks} chunks"
            )
        if self._codec is not None:
            return self._values
        return self._buffer.view(WIRE_DTYPE).astype(np.float32, copy=False)


def first_non_finite(values: FloatVector) -> int | None:
    """Index of the first NaN or infinity in `values` (Rust, parallel), None if all are finite.

    Controller-side only: it needs the compiled extension, which the edge learner does not.
    """
    from metis_async._core import first_non_finite as _first

    bad = _first(np.ascontiguousarray(values, dtype=np.float32))
    return None if bad is None else int(bad)


LEARNER_CHUNK_FIELD = pb.LearnerMessage.DESCRIPTOR.fields_by_name["chunk"].number
"""Field number of `chunk` in `LearnerMessage` (the envelope of upload chunks)."""


def peek_chunk(raw: bytes) -> tuple[int, int, int] | None:
    """(payload id, index, data bytes) if the serialized `LearnerMessage` is a chunk, else None.

    Decoded in Rust from the wire format, so chunk messages are never parsed by protobuf.
    """
    from metis_async._core import WireFormatError
    from metis_async._core import peek_chunk as _peek

    try:
        return _peek(raw, LEARNER_CHUNK_FIELD)
    except WireFormatError:
        return None  # not a well-formed chunk: protobuf parsing will name the problem


class Upload:
    """One announced payload (float32, or a negotiated codec), received from raw chunk messages
    in Rust.

    Each `add` is one Rust call that decodes the chunk envelope, checks it against the
    announcement and checks its values for NaN/inf where they lie in the message, with the GIL
    released (so it may run in a worker thread). The message is kept, not copied: `take()`
    returns `Segments`, which the accumulator folds straight from the messages. If a chunk ends
    inside a float32 value (legal, unusual), the payload is copied into one buffer instead and
    `take()` returns a float32 array. A codec payload (`header.dtype` in `allowed`) is checked
    chunk by chunk in its encoding (whole values, NaN/inf patterns, int8 scales) and folded by
    the accumulator straight from its encoded bytes.

    Args:
        header: the announcement (checked here against the model).
        expected_bytes: the model's size in bytes as float32 (`ModelLayout.total_bytes`).
        layout_id: the model's layout id.
        max_chunk_bytes: largest chunk accepted (bytes).
        envelope_field: field number of `chunk` in the envelope message.
        in_place: keep the messages (True) or copy (decode) each chunk into one buffer (False).
        allowed: payload dtypes accepted: float32 only unless the controller negotiated a codec
            for this stream (then `{DTYPE_FLOAT32, Welcome.upload_dtype}`).
    """

    def __init__(
        self,
        header: pb.Payload,
        expected_bytes: int,
        layout_id: int,
        max_chunk_bytes: int = MAX_CHUNK_BYTES,
        envelope_field: int = LEARNER_CHUNK_FIELD,
        in_place: bool = True,
        allowed: Collection[int] = FLOAT32_ONLY,
    ) -> None:
        from metis_async._core import ChunkAssembler, InPlaceAssembler

        check_header(header, expected_bytes, layout_id, max_chunk_bytes, allowed)
        self.header = header
        kind = InPlaceAssembler if in_place else ChunkAssembler
        self._assembler = kind(
            int(header.total_bytes),
            header.payload_id,
            header.num_chunks,
            max_chunk_bytes,
            envelope_field,
            dtype=int(header.dtype),
        )
        self.done = header.num_chunks == 0

    def add(self, raw: bytes) -> bool:
        """Add one raw chunk message; True once the payload is complete. Raises `WireError`."""
        from metis_async._core import WireFormatError

        try:
            self.done = bool(self._assembler.add_message(raw))
        except WireFormatError as error:
            raise WireError(str(error)) from None
        return self.done

    def take(self) -> FloatVector | Segments:
        """The update, handed over without a copy (once): `Segments` or a float32 array."""
        if not self.done:
            raise WireError(f"payload {self.header.payload_id} is incomplete")
        update: FloatVector | Segments = self._assembler.take()
        return update
