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
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from metis_async.aggregation.server_step import CommitRefused
from metis_async.secure.he import HeSettings
from metis_async.v1 import controller_pb2 as pb
from metis_async.workers.partials import RemoteFolds, RemoteUpdate

HEADER_BYTES = 16
"""Bytes before the ciphertexts of an encrypted version: the divisor learners divide the
decrypted values by, and the total integer weight its noise has grown from (u64 LE each)."""

EncryptedVersion = npt.NDArray[np.uint8]
"""An encrypted version: divisor, weight (`HEADER_BYTES`), then the ciphertexts' bytes."""


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
        public_key: the federation's public key (the collective key under multiparty keys):
            only round-less policies need it, to encrypt the first model (public) once.
        model_divisor: round-less policies: the fixed divisor of every encrypted version
            (mixing weights are quantized to multiples of 1 / model_divisor).
    """

    settings: HeSettings
    key_id: str = ""
    weight_unit: float = 1.0
    max_update_weight: int = 1024
    committee: tuple[str, ...] = ()
    public_key: bytes = field(default=b"", repr=False)
    model_divisor: int = 4096

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


def encrypted_version(
    divisor: int, ciphertexts: Sequence[bytes], weight: int | None = None
) -> EncryptedVersion:
    """An encrypted version from a sum's `ciphertexts`, its `divisor` and the total integer
    `weight` its noise grew from (the divisor unless given)."""
    header = int(divisor).to_bytes(8, "little") + int(weight or divisor).to_bytes(8, "little")
    return np.frombuffer(b"".join([header, *ciphertexts]), dtype=np.uint8)


def split_version(version: npt.NDArray[np.generic], ciphertext_bytes: int) -> tuple[int, bytes]:
    """(divisor, ciphertext bytes) of an encrypted version; ValueError if it is not one."""
    divisor, _, body = read_version(version, ciphertext_bytes)
    return divisor, body


def read_version(version: npt.NDArray[np.generic], ciphertext_bytes: int) -> tuple[int, int, bytes]:
    """(divisor, noise weight, ciphertext bytes) of an encrypted version."""
    data = np.ascontiguousarray(version, dtype=np.uint8).tobytes()
    body = len(data) - HEADER_BYTES
    if body <= 0 or body % ciphertext_bytes:
        raise ValueError(
            f"an encrypted version of {len(data)} bytes is not {HEADER_BYTES} + a multiple of "
            f"{ciphertext_bytes}"
        )
    divisor = int.from_bytes(data[:8], "little")
    return divisor, int.from_bytes(data[8:HEADER_BYTES], "little"), data[HEADER_BYTES:]


def split_ciphertexts(data: bytes, ciphertext_bytes: int) -> list[bytes]:
    """`data` cut into ciphertexts of `ciphertext_bytes` each (its length a multiple)."""
    if len(data) % ciphertext_bytes:
        raise ValueError(f"{len(data)} bytes are not whole ciphertexts of {ciphertext_bytes}")
    return [data[i : i + ciphertext_bytes] for i in range(0, len(data), ciphertext_bytes)]


class HomomorphicStep:
    """`ServerStep`'s counterpart under homomorphic aggregation: the open version's keyless
    ciphertext sum and the commit that turns it into an encrypted version.

    Two modes, by what the policy commits:
    - rounds (synchronous, semi-synchronous; `continuous` False): learners upload their
      encrypted trained models; the sum of `integer_weight` x ciphertexts, streamed, becomes the
      version, divided by its total weight: the weighted average, FedAvg. Fresh every round.
    - round-less policies (buffered, asynchronous; `continuous` True): learners upload
      encrypted deltas; the version is a running ciphertext of model_divisor x the model, and a
      commit adds round(model_divisor x scale x w_i / sum w) x each delta, the policy's step with
      its staleness weights quantized to 1 / model_divisor. The first model is encrypted once
      with the public key. Each commit grows the noise by the weights it adds; a commit that
      would pass max_total_weight is refused ("noise budget spent"). A buffered version holds
      its K updates' ciphertexts until it commits (O(K x model)).

    Args:
        length: float32 parameters of the model (values the ciphertexts carry).
        he: the controller's homomorphic-aggregation settings.
        continuous: the round-less mode above.
    """

    def __init__(self, length: int, he: HomomorphicAggregation, continuous: bool = False) -> None:
        self.length = length
        self.he = he
        self.continuous = continuous
        if continuous and not he.public_key:
            raise ValueError(
                "round-less policies under homomorphic aggregation need the federation's public "
                "key (he-public.key, or the committee file) to encrypt the first model"
            )
        self._context = he.settings.context()
        self._sum = self._context.sum()
        self._held: list[tuple[bytes, float]] = []  # continuous: the open version's deltas
        self.ciphertexts = he.settings.ciphertexts_for(length)
        # Rounds with ingest workers: updates summed in the workers' ciphertext partials.
        self._remote = RemoteFolds()

    @property
    def lost_workers(self) -> set[int]:
        """Workers whose partial of the last commit was lost (the core un-counts their updates)."""
        return self._remote.lost_workers

    @property
    def count(self) -> int:
        """Updates added since the last commit or reset."""
        if self.continuous:
            return len(self._held)
        return int(self._sum.count) + self._remote.count

    @property
    def total_weight(self) -> float:
        """Sum of the (integer) weights added."""
        if self.continuous:
            return float(sum(w for _, w in self._held))
        return float(self._sum.total_weight) + self._remote.total_weight

    def has_room(self, weight: float) -> bool:
        """Whether an update of `weight` examples fits the open version without overflow."""
        if self.continuous:
            return True  # checked at commit, against the version's noise weight
        total = self.total_weight + self.he.integer_weight(weight)
        return total <= self.he.settings.max_total_weight

    def add(self, update: object, weight: float, checked: bool = False) -> None:
        """Add one update's ciphertexts (bytes, as uploaded) times its integer weight. Every
        ciphertext is checked first (`_core.EncryptionError`), so an error changes nothing."""
        del checked  # ciphertexts are checked here, just before their add, whatever the caller
        if isinstance(update, RemoteUpdate):  # checked by its worker, which sums it there
            if self.continuous:
                raise TypeError("round-less policies take encrypted deltas forwarded whole")
            expected = self.ciphertexts * self.he.settings.ciphertext_bytes
            if len(update) != expected:
                raise ValueError(f"{len(update)} bytes of ciphertexts; the model's are {expected}")
            self._remote.add(update, float(self.he.integer_weight(weight)))
            return
        if not isinstance(update, bytes | bytearray | memoryview):
            raise TypeError(f"an encrypted update is bytes, got {type(update).__name__}")
        parts = split_ciphertexts(bytes(update), self.he.settings.ciphertext_bytes)
        if len(parts) != self.ciphertexts:
            raise ValueError(f"{len(parts)} ciphertexts; the model needs {self.ciphertexts}")
        if self.continuous:
            self._held.append((bytes(update), float(weight)))
        else:
            self._sum.add(parts, self.he.integer_weight(weight))

    def reset(self) -> None:
        """Drop the open sum."""
        self._sum.reset()
        self._held = []
        self._remote.reset()

    def commit(
        self,
        base: npt.NDArray[np.generic],
        scale: float = 1.0,
        normalize: bool = True,
        relative: bool = False,
    ) -> EncryptedVersion:
        """The encrypted version of the open sum; then reset (see the class docstring).

        Raises `CommitRefused` with nothing to commit, for a rounds step other than the
        weighted average, or when the noise budget of a round-less version is spent.
        """
        try:
            if self.count == 0:
                raise CommitRefused("nothing to commit: no update was accepted")
            size = self.he.settings.ciphertext_bytes
            for body, weight, count in self._remote.collect():
                self._sum.add_partial(split_ciphertexts(body, size), int(weight), count)
            if self.count == 0:
                raise CommitRefused("nothing to commit: every update was lost with a worker")
            if self.continuous:
                return self._step(base, scale, normalize)
            del relative  # full models: the average does not depend on the base
            if not normalize or scale != 1.0:
                raise CommitRefused(
                    "homomorphic aggregation of rounds commits the weighted average only "
                    f"(normalize, scale 1); the policy asked for scale {scale}, "
                    f"normalize {normalize}"
                )
            return encrypted_version(int(self._sum.total_weight), self._sum.ciphertexts())
        finally:
            self.reset()

    def _step(
        self, base: npt.NDArray[np.generic], scale: float, normalize: bool
    ) -> EncryptedVersion:
        """model + scale x the (normalized) weighted deltas, on ciphertexts of fixed divisor."""
        from metis_async._core import EncryptionError

        divisor = self.he.model_divisor
        size = self.he.settings.ciphertext_bytes
        total = self._context.sum()
        try:
            if base.dtype == np.uint8:  # an encrypted version: go on from its ciphertexts
                held_divisor, noise_weight, body = read_version(base, size)
                if held_divisor != divisor:
                    raise CommitRefused(
                        f"the encrypted model has divisor {held_divisor}, model_divisor is "
                        f"{divisor}: it was made by other settings"
                    )
                total.add_partial(split_ciphertexts(body, size), noise_weight, 1)
            else:  # the first model, public: encrypt it once
                values = np.ascontiguousarray(base, dtype=np.float32)
                total.add(self._context.encrypt(self.he.public_key, values), divisor)
            weights: float = sum(w for _, w in self._held) if normalize else 1.0
            for data, w in self._held:
                factor = round(divisor * scale * w / weights)
                if factor > 0:
                    total.add(split_ciphertexts(data, size), factor)
        except EncryptionError as error:
            raise CommitRefused(
                f"the encrypted model's noise budget is spent ({error}); this run cannot "
                "commit more versions under these settings"
            ) from None
        return encrypted_version(divisor, total.ciphertexts(), int(total.total_weight))

    def state(self) -> dict[str, npt.NDArray[np.float32]]:
        """No optimizer state (checkpoints carry none: the version holds all of it)."""
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
