"""The learner's side of homomorphic aggregation (HOMOMORPHIC AGGREGATION in the proto).

A learner given the federation's key pair (`metis_async.secure.he.read_learner_keys`) announces
"he", checks the controller's `Welcome.he` against its keys, decrypts encrypted versions
(DTYPE_BFV models) and uploads its trained model encrypted. Under MULTIPARTY KEYS a learner
holds the committee's public file instead (`CommitteeEncryption`), and a committee member also
its party file: members answer each encrypted version with their decryption shares, and every
learner combines all members' shares into the model. Encryption and decryption run in Rust
(`_core`), in parallel, with the GIL released; nothing here loads the extension unless a
learner is given keys.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from metis_async import wire
from metis_async.v1 import controller_pb2 as pb

if TYPE_CHECKING:
    from metis_async.secure.he import HeSettings, LearnerKeys
    from metis_async.secure.multiparty import Committee, PartyKeys


class Encryption:
    """What every encrypting learner does: check the controller's settings, encrypt uploads.

    Args:
        settings: the federation's BFV settings.
        public_key: the key uploads are encrypted under (the shared or the collective key).
    """

    committee_size = 0

    def __init__(self, settings: HeSettings, public_key: bytes) -> None:
        from metis_async.secure.he import key_id  # the Rust extension: only learners using HE

        self.settings = settings
        self.public_key = public_key
        self.context = settings.context()
        self.key_id = key_id(public_key)

    def check_welcome(self, he: pb.HomomorphicSettings) -> None:
        """Refuse (ValueError, naming the difference) a controller whose settings or key id do
        not match this learner's keys: it could neither read the models nor use the updates."""
        from metis_async.secure.aggregate import settings_from_message

        theirs = settings_from_message(he)
        if theirs != self.settings:
            raise ValueError(
                f"the controller's encryption settings {theirs} differ from this learner's "
                f"keys' {self.settings}"
            )
        if he.key_id and he.key_id != self.key_id:
            raise ValueError(
                f"the controller's federation key is {he.key_id[:16]}..., this learner holds "
                f"{self.key_id[:16]}...: it was given another federation's key"
            )
        if he.committee_size != self.committee_size:
            raise ValueError(
                f"the controller's committee has {he.committee_size} members (0: one shared "
                f"key); this learner's keys are for {self.committee_size}"
            )

    def parts(self, data: bytes) -> list[bytes]:
        """An encrypted version's bytes cut into its ciphertexts."""
        from metis_async.secure.aggregate import split_ciphertexts

        return split_ciphertexts(data, self.settings.ciphertext_bytes)

    def encrypt_payload(
        self,
        flat: wire.FloatVector,
        payload_id: int,
        layout_id: int,
        max_chunk_bytes: int,
        kind: int = pb.PAYLOAD_KIND_WEIGHTS,
    ) -> tuple[pb.Payload, list[pb.Chunk]]:
        """`flat` (the trained model, or its delta: `kind`) clipped, encrypted, chunked."""
        data = b"".join(self.context.encrypt(self.public_key, flat))
        return wire.byte_payload(data, payload_id, kind, pb.DTYPE_BFV, layout_id, max_chunk_bytes)


class LearnerEncryption(Encryption):
    """A learner holding the federation's shared key pair (`he-learner.key`): it decrypts each
    encrypted version itself."""

    def __init__(self, keys: LearnerKeys) -> None:
        super().__init__(keys.settings, keys.public_key)
        self.keys = keys

    def decrypt(self, data: bytes, length: int, divisor: int) -> wire.FloatVector:
        """The `length` values of an encrypted version's ciphertexts divided by `divisor`."""
        if divisor < 1:
            raise wire.WireError(f"an encrypted model needs a divisor >= 1, got {divisor}")
        secret = self.keys.secret_key
        values = self.context.decrypt(secret, self.parts(data), length, float(divisor))
        return np.ascontiguousarray(values, dtype=wire.WIRE_DTYPE)


class CommitteeEncryption(Encryption):
    """A learner of a federation with MULTIPARTY KEYS: it encrypts under the collective key
    and reads a version once every member's decryption shares are in; as a member (`party`)
    it also makes its own shares.

    Args:
        committee: the committee's public file (`he-committee.json`).
        party: this learner's party file, if it is a member.
    """

    def __init__(self, committee: Committee, party: PartyKeys | None = None) -> None:
        if not committee.public_key:
            raise ValueError("the committee file has no collective public key yet")
        super().__init__(committee.settings, committee.public_key)
        self.committee = committee
        self.committee_size = committee.parties
        self.party = party

    def check_welcome(self, he: pb.HomomorphicSettings) -> None:
        """As `Encryption.check_welcome`, and the controller must agree on this learner's
        membership and party index."""
        super().check_welcome(he)
        mine = self.party.party.index if self.party is not None else None
        theirs = int(he.party) if he.committee_member else None
        if mine != theirs:
            raise ValueError(
                f"the controller counts this learner as committee party {theirs}; its keys "
                f"say {mine} (None: not a member)"
            )

    def shares(self, data: bytes) -> list[bytes]:
        """This member's decryption shares of an encrypted version's ciphertexts."""
        if self.party is None:
            raise RuntimeError("only committee members make decryption shares")
        return list(self.party.party.decryption_shares(self.parts(data)))

    def combine(
        self, data: bytes, shares: pb.DecryptionShares, length: int, divisor: int
    ) -> wire.FloatVector:
        """The version from its ciphertexts and every member's shares (`wire.WireError` if a
        member is missing or a share does not fit)."""
        from metis_async._core import EncryptionError

        if divisor < 1:
            raise wire.WireError(f"an encrypted model needs a divisor >= 1, got {divisor}")
        by_party = sorted(shares.parties, key=lambda p: p.party)
        try:
            values = self.committee.decrypt(
                self.parts(data), [list(p.shares) for p in by_party], length, float(divisor)
            )
        except EncryptionError as error:
            raise wire.WireError(
                f"decryption shares of version {shares.version}: {error}"
            ) from None
        return np.ascontiguousarray(values, dtype=wire.WIRE_DTYPE)


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
