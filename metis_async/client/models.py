"""Models on the learner side: the one it holds, and the downloads of one session.

A learner keeps the last model it received (`HeldModel`) across reconnects and announces it in
`Hello`, so a controller of the same run can skip the resend. `ModelReceiver` checks everything a
session delivers (layout, model header, chunks) against the wire contract and raises
`wire.WireError` on any deviation; the run loop turns that into a clean reconnect.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from metis_async import wire
from metis_async.client.encrypted import (
    CommitteeEncryption,
    EncryptedDownload,
    LearnerEncryption,
)
from metis_async.client.learner import NDArrays
from metis_async.v1 import controller_pb2 as pb

if TYPE_CHECKING:
    from metis_async.client.encrypted import Encryption


@dataclass(frozen=True)
class HeldModel:
    """A complete model version the learner holds.

    Attributes:
        version: the controller's version number.
        run_id: `Welcome.run_id` of the session that delivered it ("" from older controllers).
        layout: its layout (shapes, original dtypes, byte offsets).
        flat: the float32 wire buffer; never modified after assembly.
    """

    version: int
    run_id: str
    layout: pb.ModelLayout
    flat: wire.FloatVector

    def parameters(self) -> NDArrays:
        """The model as fresh arrays in the layout's shapes and dtypes, the caller's to keep."""
        return [np.array(a) for a in wire.unflatten(self.flat, self.layout)]


def check_layout(layout: pb.ModelLayout, max_model_bytes: int = 0) -> None:
    """Raise `wire.WireError` unless `layout` describes consecutive float32 segments.

    Args:
        layout: the layout to check.
        max_model_bytes: largest model accepted (bytes); 0 = no limit.
    """
    offset = 0
    for spec in layout.tensors:
        count = math.prod(int(s) for s in spec.shape)
        if spec.offset != offset or spec.nbytes != count * wire.WIRE_DTYPE.itemsize:
            raise wire.WireError(
                f"layout tensor {spec.name!r} is inconsistent: offset {spec.offset} "
                f"(expected {offset}), {spec.nbytes} bytes for shape {tuple(spec.shape)}"
            )
        offset += int(spec.nbytes)
    if offset != layout.total_bytes:
        raise wire.WireError(f"layout totals {offset} bytes but announces {layout.total_bytes}")
    if max_model_bytes and layout.total_bytes > max_model_bytes:
        raise wire.WireError(
            f"layout has {layout.total_bytes} bytes, the controller's limit is {max_model_bytes}"
        )


class ModelReceiver:
    """Layouts, models and chunks of one session, checked as they arrive.

    Args:
        held: the model kept from an earlier session; it stays usable only if this session's
            Welcome carries the same run id and any layout sent matches it.
        codecs: payload dtypes besides float32 this learner offered in `Hello.codecs`: models
            may arrive in any of them, and the controller may pick one for uploads.
        encryption: the learner's federation keys: encrypted models (DTYPE_BFV) are decrypted
            on arrival; None refuses them.
    """

    def __init__(
        self,
        held: HeldModel | None,
        codecs: Collection[int] = (),
        encryption: Encryption | None = None,
    ) -> None:
        self.encryption = encryption
        # MULTIPARTY KEYS: (version, ciphertext bytes, divisor) of a downloaded encrypted
        # version waiting for the committee's decryption shares
        self.awaiting_shares: tuple[int, bytes, int] | None = None
        self._downloaded = False
        self._shares: dict[int, list[bytes]] = {}  # party -> share by ciphertext, arriving
        self._changed = threading.Condition()
        self.encrypted = False  # the controller aggregates under HE (Welcome.he)
        self.layout: pb.ModelLayout | None = held.layout if held is not None else None
        self.model = held  # newest complete model valid on this session (read by the worker)
        self.run_id = ""
        self.max_chunk_bytes = wire.MAX_CHUNK_BYTES
        self.max_model_bytes = 0
        self.accepted = frozenset({pb.DTYPE_FLOAT32, *codecs})
        self.upload_dtype: int = pb.DTYPE_FLOAT32  # Welcome.upload_dtype, checked
        self._pending: tuple[int, wire.PayloadAssembler | EncryptedDownload] | None = None

    def on_welcome(self, welcome: pb.Welcome) -> None:
        """Adopt the session's limits; forget a held model of another (or unknown) run."""
        self.run_id = welcome.run_id
        self.max_chunk_bytes = welcome.max_chunk_bytes or wire.MAX_CHUNK_BYTES
        self.max_model_bytes = int(welcome.max_model_bytes)
        upload = welcome.upload_dtype or pb.DTYPE_FLOAT32
        if upload not in self.accepted:
            raise wire.WireError(
                f"the controller chose upload dtype {wire.dtype_name(upload)}, which this "
                "learner did not offer"
            )
        self.upload_dtype = upload
        self.encrypted = welcome.HasField("he")
        if self.encrypted:
            if self.encryption is None:
                raise ValueError(
                    "the controller aggregates under homomorphic encryption and this learner "
                    "holds no federation key (he_keys)"
                )
            self.encryption.check_welcome(welcome.he)
        if self.model is not None and (not welcome.run_id or welcome.run_id != self.model.run_id):
            self.model = None  # its version numbers belong to another run

    def on_layout(self, layout: pb.ModelLayout) -> None:
        """A layout for the models that follow."""
        if self._pending is not None:
            raise wire.WireError("layout arrived while a model's chunks were incomplete")
        check_layout(layout, self.max_model_bytes)
        if self.model is not None and self.model.layout.layout_id != layout.layout_id:
            self.model = None
        self.layout = layout

    def on_model(self, model: pb.Model) -> HeldModel | None:
        """A model header; returns the model at once if it has no chunks (an empty model)."""
        if self.layout is None:
            raise wire.WireError("model arrived before its layout")
        if self._pending is not None:
            raise wire.WireError(
                "model announced while the previous model's chunks were incomplete"
            )
        if model.payload.kind != pb.PAYLOAD_KIND_WEIGHTS:
            raise wire.WireError(
                f"model payload kind is {model.payload.kind}, expected PAYLOAD_KIND_WEIGHTS"
            )
        if model.payload.dtype == pb.DTYPE_BFV:
            if self.encryption is None:
                raise wire.WireError("an encrypted model arrived and this learner holds no key")
            values = wire.num_parameters(self.layout)
            settings = self.encryption.settings
            expected = settings.ciphertexts_for(values) * settings.ciphertext_bytes
            download = EncryptedDownload(model, expected, self.max_chunk_bytes)
            self._pending = (int(model.version), download)
            return None
        assembler = wire.PayloadAssembler(
            model.payload,
            int(self.layout.total_bytes),
            self.layout.layout_id,
            self.max_chunk_bytes,
            allowed=self.accepted,
        )
        self._pending = (int(model.version), assembler)
        return self._complete() if assembler.done else None

    def on_chunk(self, chunk: pb.Chunk) -> HeldModel | None:
        """One chunk of the announced model; returns the model when it is complete."""
        if self._pending is None:
            raise wire.WireError(f"chunk of payload {chunk.payload_id} with no model announced")
        self._pending[1].add(chunk)
        return self._complete() if self._pending[1].done else None

    def _complete(self) -> HeldModel | None:
        assert self._pending is not None
        assert self.layout is not None
        version, assembler = self._pending
        self._pending = None
        if isinstance(assembler, EncryptedDownload):
            encryption = self.encryption
            if not isinstance(encryption, LearnerEncryption):  # the committee must decrypt it
                with self._changed:  # read together with `model` by `model_for`
                    self.awaiting_shares = (version, assembler.data(), assembler.divisor)
                    self._downloaded, self._shares = True, {}
                return None
            values = wire.num_parameters(self.layout)
            flat = encryption.decrypt(assembler.data(), values, assembler.divisor)
        else:
            flat = assembler.result()
        return self._hold(HeldModel(version, self.run_id, self.layout, flat))

    def take_downloaded(self) -> tuple[int, bytes, int] | None:
        """The encrypted version whose download just completed and that waits for decryption
        shares (once: a member answers it with its own shares)."""
        if not self._downloaded:
            return None
        self._downloaded = False
        return self.awaiting_shares

    def _hold(self, model: HeldModel, shares_done: bool = False) -> HeldModel:
        with self._changed:  # the model and the end of a wait for shares change together
            if shares_done:
                self.awaiting_shares, self._shares = None, {}
            self.model = model
            self._changed.notify_all()
        return model

    def on_shares(self, shares: pb.DecryptionShares) -> HeldModel | None:
        """A batch of committee members' decryption shares of a version (MULTIPARTY KEYS);
        returns the model once every member's share of every ciphertext of the encrypted
        version just downloaded is in."""
        pending = self.awaiting_shares
        if pending is None or pending[0] != shares.version:
            return None  # of a version this learner does not wait for: nothing to do
        encryption = self.encryption
        if not isinstance(encryption, CommitteeEncryption) or self.layout is None:
            raise wire.WireError("decryption shares arrived for a learner without a committee")
        count = len(encryption.parts(pending[1]))
        for batch in shares.parties:
            if batch.party >= encryption.committee_size or batch.first + len(batch.shares) > count:
                raise wire.WireError(
                    f"decryption shares of party {batch.party} for ciphertexts from "
                    f"{batch.first}: the committee has {encryption.committee_size} parties, "
                    f"the version {count} ciphertexts"
                )
            slots = self._shares.setdefault(batch.party, [b""] * count)
            slots[batch.first : batch.first + len(batch.shares)] = list(batch.shares)
        done = len(self._shares) == encryption.committee_size and all(
            all(slots) for slots in self._shares.values()
        )
        if not done:
            return None
        every = pb.DecryptionShares(
            version=shares.version,
            parties=[pb.PartyShares(party=p, shares=s) for p, s in sorted(self._shares.items())],
        )
        values = wire.num_parameters(self.layout)
        flat = encryption.combine(pending[1], every, values, pending[2])
        return self._hold(HeldModel(pending[0], self.run_id, self.layout, flat), shares_done=True)

    def model_for(self, version: int, timeout: float) -> HeldModel | None:
        """The held model for a task on `version`. Under multiparty keys a task may arrive
        before the committee's shares complete its model: then wait up to `timeout` seconds
        for them. The held model and the wait are read under one lock, so shares completing
        meanwhile (on the receiving thread) are never missed."""
        with self._changed:
            self._changed.wait_for(
                lambda: (
                    (self.model is not None and self.model.version == version)
                    or self.awaiting_shares is None
                    or self.awaiting_shares[0] != version
                ),
                timeout,
            )
            return self.model
