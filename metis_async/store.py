"""The published model: the version every stream is sent, encoded once.

`encode_version` turns a committed version into the `ControllerMessage` bytes that deliver it
(a `Model` header, then its chunks). It runs in the federation core's thread as the commit's
publish hook; the chunk messages are built in Rust with the GIL released, so the event loop keeps
running while a large model is encoded. `ModelStore` lives on the event loop: it switches to a
new version's bytes exactly where the `VersionCommitted` effect stands in the effect order, so a
`SendModel` effect always finds the bytes of the version it names, and every stream that needs
the version gets the same bytes objects (no per-stream copies). Checkpoints to disk come with
the persistence work (ARCHITECTURE.md, decision 9).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import structlog

from metis_async import wire
from metis_async._core import WireFormatError, encode_chunk_messages
from metis_async.secure.aggregate import HEADER_BYTES
from metis_async.v1 import controller_pb2 as pb

log = structlog.get_logger("metis_async.store")

CONTROLLER_CHUNK_FIELD = pb.ControllerMessage.DESCRIPTOR.fields_by_name["chunk"].number


@dataclass(frozen=True, slots=True)
class ModelDownload:
    """A version's messages (header, then chunks) as one item of a stream's send queue, so the
    stream's writer paces the chunks (send budget, download receipts) and a model of thousands of
    chunks takes one queue slot.

    Attributes:
        version: the model version.
        messages: the serialized `ControllerMessage`s: `Model` header first, then its chunks.
        receipt: the header asks the learner for `ModelReceived` (DOWNLOAD RECEIPTS).
    """

    version: int
    messages: list[bytes]
    receipt: bool = False


@dataclass(frozen=True)
class EncodedVersion:
    """A version's layout and the serialized messages (header, then chunks) that deliver it:
    `messages` in float32, `codecs` in each download codec learners were offered."""

    layout: pb.ModelLayout
    messages: list[bytes]
    codecs: dict[int, list[bytes]] = field(default_factory=dict)


def encode_for_learners(
    layout: pb.ModelLayout,
    version: int,
    flat: wire.ModelVector,
    max_chunk_bytes: int,
    download_dtype: int = pb.DTYPE_FLOAT32,
) -> EncodedVersion:
    """Version `version` encoded once in float32 and once in `download_dtype` (if another);
    an encrypted version once, as its ciphertexts (DTYPE_BFV).

    A model that does not fit the codec (float16: |x| >= 65520) is sent in float32 to every
    learner; learners decode whatever dtype a `Model` header announces.
    """
    if flat.dtype == np.uint8:
        return encode_encrypted_version(layout, version, flat, max_chunk_bytes)
    values = wire.plain(flat)
    plain = encode_version(layout, version, values, max_chunk_bytes)
    if download_dtype in (pb.DTYPE_FLOAT32, pb.DTYPE_UNSPECIFIED):
        return plain
    try:
        coded = encode_version(layout, version, values, max_chunk_bytes, download_dtype)
    except WireFormatError as error:
        log.warning("download_codec_skipped", version=version, reason=str(error))
        return plain
    return EncodedVersion(layout, plain.messages, {download_dtype: coded.messages})


def encode_version(
    layout: pb.ModelLayout,
    version: int,
    flat: wire.FloatVector,
    max_chunk_bytes: int,
    dtype: int = pb.DTYPE_FLOAT32,
) -> EncodedVersion:
    """The messages that deliver `flat` as model `version`, encoded as `dtype` (float32, or a
    codec for learners that offered it: `Welcome.download_dtype`).

    Raises `_core.WireFormatError` when a value does not fit the codec (float16: |x| >= 65520).
    """
    data = np.ascontiguousarray(flat, dtype=wire.WIRE_DTYPE)
    # Built in Rust, in parallel, with the GIL released: the event loop keeps running.
    chunks = encode_chunk_messages(data, version, max_chunk_bytes, CONTROLLER_CHUNK_FIELD, dtype)
    header = pb.Payload(
        payload_id=version,
        kind=pb.PAYLOAD_KIND_WEIGHTS,
        dtype=dtype,  # type: ignore[arg-type]
        total_bytes=wire.payload_bytes(data.size, dtype),
        num_chunks=len(chunks),
        layout_id=layout.layout_id,
    )
    model = pb.ControllerMessage(model=pb.Model(version=version, payload=header))
    return EncodedVersion(layout, [model.SerializeToString(), *chunks])


def encode_encrypted_version(
    layout: pb.ModelLayout, version: int, encrypted: wire.ModelVector, max_chunk_bytes: int
) -> EncodedVersion:
    """The messages that deliver an encrypted version (`metis_async.secure.aggregate`): a
    `Model` with dtype DTYPE_BFV and its divisor, then the ciphertext bytes in chunks."""
    data = np.ascontiguousarray(encrypted, dtype=np.uint8).tobytes()
    divisor, body = int.from_bytes(data[:8], "little"), data[HEADER_BYTES:]
    header, chunks = wire.byte_payload(
        body, version, pb.PAYLOAD_KIND_WEIGHTS, pb.DTYPE_BFV, layout.layout_id, max_chunk_bytes
    )
    model = pb.ControllerMessage(model=pb.Model(version=version, payload=header, divisor=divisor))
    messages = [pb.ControllerMessage(chunk=c).SerializeToString() for c in chunks]
    return EncodedVersion(layout, [model.SerializeToString(), *messages])


class ModelStore:
    """The published version, its layout and its ready-to-send messages (event-loop side).

    Args:
        max_chunk_bytes: chunk size of the broadcast (bytes).
    """

    def __init__(self, max_chunk_bytes: int = wire.MAX_CHUNK_BYTES) -> None:
        self.max_chunk_bytes = max_chunk_bytes
        self.version = 0
        self.layout: pb.ModelLayout | None = None
        self.layout_message = b""
        self._flat: wire.ModelVector | None = None
        self._broadcast: list[bytes] = []
        self._codecs: dict[int, list[bytes]] = {}
        self._downloads: dict[tuple[int, bool], ModelDownload] = {}

    @property
    def ready(self) -> bool:
        """Whether a model has been published."""
        return self._flat is not None

    @property
    def encrypted(self) -> bool:
        """Whether the published version is encrypted (homomorphic aggregation)."""
        return self._flat is not None and self._flat.dtype == np.uint8

    @property
    def flat(self) -> wire.FloatVector:
        """The published parameters as one float32 vector (read-only view); RuntimeError for an
        encrypted version."""
        if self._flat is None:
            raise RuntimeError("the controller has no model yet")
        view: wire.FloatVector = wire.plain(self._flat).view()
        view.flags.writeable = False
        return view

    @property
    def nbytes(self) -> int:
        """Size of the flat model in bytes."""
        return 0 if self.layout is None else int(self.layout.total_bytes)

    def published(self) -> list[npt.NDArray[np.generic]]:
        """The published version as the commit hook gets it: arrays in the layout's shapes, or
        an encrypted version as its one uint8 vector (copies)."""
        if self._flat is not None and self._flat.dtype == np.uint8:
            return [np.array(self._flat)]
        return self.parameters()

    def parameters(self) -> list[npt.NDArray[np.generic]]:
        """The published model as a list of arrays in the layout's shapes (copies)."""
        if self.layout is None:
            raise RuntimeError("the controller has no model yet")
        return [np.array(a) for a in wire.unflatten(self.flat, self.layout)]

    def publish(
        self,
        layout: pb.ModelLayout,
        version: int,
        flat: wire.ModelVector,
        messages: list[bytes],
        codecs: dict[int, list[bytes]] | None = None,
    ) -> None:
        """Make `version` (its model and encoded `messages`, float32, and `codecs`, by download
        dtype) the one streams are sent."""
        if self.layout is None or self.layout.layout_id != layout.layout_id:
            self.layout = layout
            self.layout_message = pb.ControllerMessage(layout=layout).SerializeToString()
        self._flat = flat
        self._broadcast = messages
        self._codecs = codecs or {}
        self._downloads = {}
        self.version = version

    def encodings(self) -> dict[int, list[bytes]]:
        """The published version's messages by download dtype (float32 included)."""
        return {pb.DTYPE_FLOAT32: self._broadcast, **self._codecs}

    def broadcast(self, dtype: int = pb.DTYPE_FLOAT32) -> list[bytes]:
        """Serialized messages (header, then chunks) that deliver the published version, in
        download `dtype` where it was encoded so (float32 otherwise)."""
        return self._codecs.get(dtype, self._broadcast)

    def download(self, dtype: int = pb.DTYPE_FLOAT32, receipt: bool = False) -> ModelDownload:
        """The published version as one send-queue item, in download `dtype` (as `broadcast`);
        with `receipt`, its header asks for `ModelReceived`. Built once per version and kind,
        and shared by every stream."""
        key = (dtype if dtype in self._codecs else pb.DTYPE_FLOAT32, receipt)
        item = self._downloads.get(key)
        if item is None:
            messages = self.broadcast(dtype)
            if receipt:
                header = pb.ControllerMessage.FromString(messages[0])
                header.model.receipt = True
                messages = [header.SerializeToString(), *messages[1:]]
            item = self._downloads[key] = ModelDownload(self.version, messages, receipt)
        return item
