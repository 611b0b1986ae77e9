"""The controller's side of homomorphic aggregation: a keyless sum of ciphertexts in place of
the float aggregate, and the encrypted versions it commits.

Under `HomomorphicAggregation` the federation core folds each accepted update (the bytes of
its BFV ciphertexts, see HOMOMORPHIC AGGREGATION in the proto) into a `_core.CipherSum` with
an integer weight, and a commit turns the sum into an **encrypted version**: a uint8 vector
holding the divisor (the sum of the integer weights, 8 bytes little-endian) and then the
ciphertexts one after the other. The controller never holds a key, so it cannot read that
version; it stores, checkpoints and sends it like any other, and learners decrypt it.

What it can commit: the weighted average of the round's trained models (FedAvg with server
learning rate 1, what synchronous and semi-synchronous rounds decide). Server optimizers,
robust rules, clipping and staleness-mixed asynchronous steps need the plaintext and are
refused when the controller's settings are checked (`config.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from metis_async.aggregation.server_step import CommitRefused
from metis_async.secure.he import HeSettings
from metis_async.v1 import controller_pb2 as pb

DIVISOR_BYTES = 8
"""Bytes of the divisor at the start of an encrypted version."""

EncryptedVersion = npt.NDArray[np.uint8]
"""An encrypted version: the divisor (little-endian u64), then the ciphertexts' bytes."""


@dataclass(frozen=True)
class HomomorphicAggregation:
    """The controller's homomorphic-aggregation settings (all public: no key).

    Attributes:
        settings: the BFV settings of the federation's keys (`he-controller.json`).
        key_id: hex SHA-256 of the federation's public key (learners check theirs against it;
            "" skips the check).
        weight_unit: examples per unit of integer weight (an update of n examples weighs
            round(n / weight_unit), at least 1).
        max_update_weight: the largest integer weight of one update; with
            `settings.max_total_weight` it bounds the updates one version can hold
            (`max_updates`).
        committee: MULTIPARTY KEYS: the learner ids of the committee members, in party order
            (member i holds key share i); () for the shared learner key pair.
    """

    settings: HeSettings
    key_id: str = ""
    weight_unit: float = 1.0
    max_update_weight: int = 1024
    committee: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.weight_unit > 0:
            raise ValueError(f"weight_unit must be > 0 examples, got {self.weight_unit}")
        if not 1 <= self.max_update_weight <= self.settings.max_total_weight:
            raise ValueError(
                f"max_update_weight must be in [1, max_total_weight = "
                f"{self.settings.max_total_weight}], got {self.max_update_weight}"
            )

    @property
    def max_updates(self) -> int:
        """Updates of the largest weight that fit one version without overflow."""
        return self.settings.max_total_weight // self.max_update_weight

    def integer_weight(self, weight: float) -> int:
        """The integer weight the controller multiplies an update of `weight` examples by."""
        units = round(weight / self.weight_unit) if np.isfinite(weight) else 1
        return int(min(max(units, 1), self.max_update_weight))

    def upload_bytes(self, values: int) -> int:
        """Bytes of the ciphertexts that carry `values` values."""
        return self.settings.ciphertexts_for(values) * self.settings.ciphertext_bytes

    def message(self, learner_id: str = "") -> pb.HomomorphicSettings:
        """The settings as sent in `Welcome.he` to `learner_id` (its party, if a member)."""
        s = self.settings
        member = learner_id in self.committee
        return pb.HomomorphicSettings(
            committee_size=len(self.committee),
            committee_member=member,
            party=self.committee.index(learner_id) if member else 0,
            degree=s.degree,
            moduli_bits=list(s.moduli_bits),
            plaintext_bits=s.plaintext_bits,
            scale_bits=s.scale_bits,
            clip=s.clip,
            max_total_weight=s.max_total_weight,
            ciphertext_bytes=s.ciphertext_bytes,
            key_id=self.key_id,
            weight_unit=self.weight_unit,
            max_update_weight=self.max_update_weight,
        )


def settings_from_message(message: pb.HomomorphicSettings) -> HeSettings:
    """The BFV settings a `Welcome.he` announces."""
    return HeSettings(
        degree=int(message.degree),
        moduli_bits=tuple(int(b) for b in message.moduli_bits),
        plaintext_bits=int(message.plaintext_bits),
        scale_bits=int(message.scale_bits),
        clip=float(message.clip),
        max_total_weight=int(message.max_total_weight),
    )


def encrypted_version(divisor: int, ciphertexts: Sequence[bytes]) -> EncryptedVersion:
    """An encrypted version from a sum's `ciphertexts` and its `divisor`."""
    blob = b"".join([int(divisor).to_bytes(DIVISOR_BYTES, "little"), *ciphertexts])
    return np.frombuffer(blob, dtype=np.uint8)


def split_version(version: npt.NDArray[np.generic], ciphertext_bytes: int) -> tuple[int, bytes]:
    """(divisor, ciphertext bytes) of an encrypted version; ValueError if it is not one."""
    data = np.ascontiguousarray(version, dtype=np.uint8).tobytes()
    body = len(data) - DIVISOR_BYTES
    if body <= 0 or body % ciphertext_bytes:
        raise ValueError(
            f"an encrypted version of {len(data)} bytes is not {DIVISOR_BYTES} + a multiple of "
            f"{ciphertext_bytes}"
        )
    return int.from_bytes(data[:DIVISOR_BYTES], "little"), data[DIVISOR_BYTES:]


def split_ciphertexts(data: bytes, ciphertext_bytes: int) -> list[bytes]:
    """`data` cut into ciphertexts of `ciphertext_bytes` each (its length a multiple)."""
    if len(data) % ciphertext_bytes:
        raise ValueError(f"{len(data)} bytes are not whole ciphertexts of {ciphertext_bytes}")
    return [data[i : i + ciphertext_bytes] for i in range(0, len(data), ciphertext_bytes)]


class HomomorphicStep:
    """`ServerStep`'s counterpart under homomorphic aggregation: the open version's keyless
    ciphertext sum and the commit that turns it into an encrypted version.

    Args:
        length: float32 parameters of the model (values the ciphertexts carry).
        he: the controller's homomorphic-aggregation settings.
    """

    def __init__(self, length: int, he: HomomorphicAggregation) -> None:
        self.length = length
        self.he = he
        self._sum = he.settings.context().sum()
        self.ciphertexts = he.settings.ciphertexts_for(length)
        self.lost_workers: set[int] = set()  # ingest workers are not used under HE

    @property
    def count(self) -> int:
        """Updates added since the last commit or reset."""
        return int(self._sum.count)

    @property
    def total_weight(self) -> float:
        """Sum of the integer weights added (the divisor of the next version)."""
        return float(self._sum.total_weight)

    def has_room(self, weight: float) -> bool:
        """Whether an update of `weight` examples fits the open version without overflow."""
        total = int(self._sum.total_weight) + self.he.integer_weight(weight)
        return total <= self.he.settings.max_total_weight

    def add(self, update: object, weight: float, checked: bool = False) -> None:
        """Add one update's ciphertexts (bytes, as uploaded) times its integer weight. Every
        ciphertext is checked first (`_core.EncryptionError`), so an error changes nothing."""
        del checked  # ciphertexts are checked here, just before their add, whatever the caller
        if not isinstance(update, bytes | bytearray | memoryview):
            raise TypeError(f"an encrypted update is bytes, got {type(update).__name__}")
        parts = split_ciphertexts(bytes(update), self.he.settings.ciphertext_bytes)
        if len(parts) != self.ciphertexts:
            raise ValueError(f"{len(parts)} ciphertexts; the model needs {self.ciphertexts}")
        self._sum.add(parts, self.he.integer_weight(weight))

    def reset(self) -> None:
        """Drop the open sum."""
        self._sum.reset()

    def commit(
        self,
        base: npt.NDArray[np.generic],
        scale: float = 1.0,
        normalize: bool = True,
        relative: bool = False,
    ) -> EncryptedVersion:
        """The encrypted version of the open sum (the weighted average once decrypted); then
        reset. `base` is not needed: every update is a full trained model.

        Raises `CommitRefused` with nothing to commit, or for a step other than the weighted
        average (a server learning rate, a sum, a step relative to a stale base).
        """
        del base, relative  # full models: the average does not depend on the base
        try:
            if self._sum.count == 0:
                raise CommitRefused("nothing to commit: no update was accepted")
            if not normalize or scale != 1.0:
                raise CommitRefused(
                    "homomorphic aggregation commits the weighted average only "
                    f"(normalize, scale 1); the policy asked for scale {scale}, "
                    f"normalize {normalize}"
                )
            return encrypted_version(int(self._sum.total_weight), self._sum.ciphertexts())
        finally:
            self._sum.reset()

    def state(self) -> dict[str, npt.NDArray[np.float32]]:
        """No optimizer state (checkpoints carry none)."""
        return {}

    def load_state(self, state: object) -> None:
        """Nothing to restore (`state`)."""
        del state


class CipherUpload:
    """One learner's encrypted (DTYPE_BFV) or masked (DTYPE_MASKED) upload, reassembled from
    its chunk messages into one buffer of exactly the announced size (the same interface as
    `wire.Upload`).

    Chunks are byte slices of the ciphertexts; they are checked for order, payload id and size
    as they arrive. The ciphertexts themselves are checked (length, magic, every coefficient
    below its modulus) by `check_ciphertexts` once the upload is complete.

    Args:
        header: the announcement (checked here).
        expected_bytes: the ciphertext bytes the model needs (`upload_bytes`).
        layout_id: the model's layout id.
        max_chunk_bytes: largest chunk accepted (bytes).
        dtype: the payload dtype the federation requires.
    """

    def __init__(
        self,
        header: pb.Payload,
        expected_bytes: int,
        layout_id: int,
        max_chunk_bytes: int,
        dtype: int = pb.DTYPE_BFV,
    ) -> None:
        from metis_async.wire import WireError, chunk_count, dtype_name

        if header.dtype != dtype:
            how = "under homomorphic encryption" if dtype == pb.DTYPE_BFV else "with SecAgg+"
            raise WireError(
                f"payload dtype is {dtype_name(header.dtype)}: this federation aggregates "
                f"{how} and accepts {dtype_name(dtype)} uploads only"
            )
        if header.total_bytes != expected_bytes:
            raise WireError(
                f"payload has {header.total_bytes} bytes; the model's ciphertexts are "
                f"{expected_bytes} bytes"
            )
        if header.layout_id != layout_id:
            raise WireError(
                f"payload layout {header.layout_id} does not match the model layout {layout_id}"
            )
        least = chunk_count(expected_bytes, max_chunk_bytes)
        if not least <= header.num_chunks <= max(expected_bytes, 1):
            raise WireError(
                f"payload announces {header.num_chunks} chunks; {expected_bytes} bytes need at "
                f"least {least} of at most {max_chunk_bytes} bytes"
            )
        self.header = header
        self._max_chunk = max_chunk_bytes
        self._data = bytearray(expected_bytes)
        self._filled = 0
        self._next = 0
        self.done = header.num_chunks == 0

    def add(self, raw: bytes) -> bool:
        """Add one raw chunk message; True once the payload is complete. Raises `WireError`."""
        from google.protobuf.message import DecodeError

        from metis_async.wire import WireError

        try:
            chunk = pb.LearnerMessage.FromString(raw).chunk
        except DecodeError:
            raise WireError("malformed chunk message") from None
        if chunk.payload_id != self.header.payload_id or chunk.index != self._next:
            raise WireError(
                f"expected chunk {self._next} of payload {self.header.payload_id}, got chunk "
                f"{chunk.index} of payload {chunk.payload_id}"
            )
        size = len(chunk.data)
        if size > self._max_chunk or self._filled + size > len(self._data):
            raise WireError(
                f"chunk {chunk.index} has {size} bytes: beyond max_chunk_bytes "
                f"({self._max_chunk}) or the announced total ({len(self._data)})"
            )
        if chunk.scale:
            raise WireError("Chunk.scale is for DTYPE_INT8 payloads only")
        self._data[self._filled : self._filled + size] = chunk.data
        self._filled += size
        self._next += 1
        last = self._next == self.header.num_chunks
        if last and self._filled != len(self._data):
            raise WireError(
                f"the {self._next} chunks hold {self._filled} bytes, {len(self._data)} announced"
            )
        self.done = last
        return last

    def take(self) -> bytes:
        """The complete upload's ciphertext bytes."""
        if not self.done:
            raise RuntimeError("the upload is not complete")
        return bytes(self._data)


def check_ciphertexts(he: HomomorphicAggregation, data: bytes) -> None:
    """Check an upload's ciphertexts as the sum will read them (exact length, magic, every
    coefficient below its modulus): `_core.EncryptionError` names the problem. Runs the same
    check-and-add into a scratch sum (no key needed, O(model))."""
    scratch = he.settings.context().sum()
    scratch.add(split_ciphertexts(data, he.settings.ciphertext_bytes), 1)
