"""The learner's side of homomorphic aggregation (HOMOMORPHIC AGGREGATION in the proto).

A learner given the federation's key pair (`metis_async.secure.he.read_learner_keys`) announces
"he", checks the controller's `Welcome.he` against its keys, decrypts encrypted versions
(DTYPE_BFV models) and uploads its trained model encrypted. Encryption and decryption run in
Rust (`_core.HeContext`), in parallel, with the GIL released.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from metis_async import wire
from metis_async.v1 import controller_pb2 as pb

if TYPE_CHECKING:
    from metis_async.secure.he import LearnerKeys


class LearnerEncryption:
    """A learner's key pair and what it does with it.

    Args:
        keys: the federation's settings and key pair (`he-learner.key`).
    """

    def __init__(self, keys: LearnerKeys) -> None:
        from metis_async.secure.he import key_id  # the Rust extension: only learners using HE

        self.keys = keys
        self.context = keys.settings.context()
        self.key_id = key_id(keys.public_key)

    def check_welcome(self, he: pb.HomomorphicSettings) -> None:
        """Refuse (ValueError, naming the difference) a controller whose settings or key id do
        not match this learner's keys: it could neither read the models nor use the updates."""
        from metis_async.secure.aggregate import settings_from_message

        theirs = settings_from_message(he)
        if theirs != self.keys.settings:
            raise ValueError(
                f"the controller's encryption settings {theirs} differ from this learner's "
                f"keys' {self.keys.settings}"
            )
        if he.key_id and he.key_id != self.key_id:
            raise ValueError(
                f"the controller's federation key is {he.key_id[:16]}..., this learner holds "
                f"{self.key_id[:16]}...: it was given another federation's key"
            )

    def decrypt(self, data: bytes, length: int, divisor: int) -> wire.FloatVector:
        """The `length` values of an encrypted version's ciphertexts divided by `divisor`."""
        if divisor < 1:
            raise wire.WireError(f"an encrypted model needs a divisor >= 1, got {divisor}")
        from metis_async.secure.aggregate import split_ciphertexts

        parts = split_ciphertexts(data, self.keys.settings.ciphertext_bytes)
        values = self.context.decrypt(self.keys.secret_key, parts, length, float(divisor))
        return np.ascontiguousarray(values, dtype=wire.WIRE_DTYPE)

    def encrypt_payload(
        self, flat: wire.FloatVector, payload_id: int, layout_id: int, max_chunk_bytes: int
    ) -> tuple[pb.Payload, list[pb.Chunk]]:
        """`flat` (the trained model) clipped, encrypted and cut into chunks."""
        data = b"".join(self.context.encrypt(self.keys.public_key, flat))
        chunks = list(_chunks(data, payload_id, max_chunk_bytes))
        header = pb.Payload(
            payload_id=payload_id,
            kind=pb.PAYLOAD_KIND_WEIGHTS,
            dtype=pb.DTYPE_BFV,
            total_bytes=len(data),
            num_chunks=len(chunks),
            layout_id=layout_id,
        )
        return header, chunks


def _chunks(data: bytes, payload_id: int, size: int) -> Iterator[pb.Chunk]:
    for index, at in enumerate(range(0, len(data), size)):
        yield pb.Chunk(payload_id=payload_id, index=index, data=data[at : at + size])


class EncryptedDownload:
    """The chunks of one encrypted model (DTYPE_BFV), checked and collected.

    Args:
        model: its header.
        expected_bytes: the ciphertext bytes the layout's values need.
        max_chunk_bytes: largest chunk the controller may send.
    """

    def __init__(self, model: pb.Model, expected_bytes: int, max_chunk_bytes: int) -> None:
        payload = model.payload
        if payload.total_bytes != expected_bytes:
            raise wire.WireError(
                f"encrypted model has {payload.total_bytes} bytes; the layout's ciphertexts "
                f"are {expected_bytes}"
            )
        if not 1 <= payload.num_chunks <= expected_bytes:
            raise wire.WireError(f"encrypted model announces {payload.num_chunks} chunks")
        self.payload = payload
        self.divisor = int(model.divisor)
        self._max = max_chunk_bytes
        self._parts: list[bytes] = []
        self._size = 0
        self.done = False

    def add(self, chunk: pb.Chunk) -> None:
        """One chunk, in order; raises `wire.WireError` on any deviation."""
        if chunk.payload_id != self.payload.payload_id or chunk.index != len(self._parts):
            raise wire.WireError(
                f"expected chunk {len(self._parts)} of payload {self.payload.payload_id}, got "
                f"{chunk.index} of {chunk.payload_id}"
            )
        if len(chunk.data) > self._max or self._size + len(chunk.data) > self.payload.total_bytes:
            raise wire.WireError(f"chunk {chunk.index} is too large ({len(chunk.data)} bytes)")
        self._parts.append(chunk.data)
        self._size += len(chunk.data)
        if len(self._parts) == self.payload.num_chunks:
            if self._size != self.payload.total_bytes:
                raise wire.WireError(
                    f"encrypted model chunks hold {self._size} bytes, "
                    f"{self.payload.total_bytes} announced"
                )
            self.done = True

    def data(self) -> bytes:
        """The complete ciphertext bytes."""
        return b"".join(self._parts)
