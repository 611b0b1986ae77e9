"""The global model: current version, flat parameters, and its broadcast serialized once.

Every committed version is serialized exactly once into the byte strings of its `Model` header and
chunks; each stream that needs the version gets the same bytes objects (no per-stream copies).
Checkpoints to disk come with the persistence work (ARCHITECTURE.md, decision 8).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from metis_async import wire
from metis_async.v1 import controller_pb2 as pb


class ModelStore:
    """Holds the current global model version and its ready-to-send messages.

    Args:
        max_chunk_bytes: chunk size of the broadcast (bytes).
    """

    def __init__(self, max_chunk_bytes: int = wire.MAX_CHUNK_BYTES) -> None:
        self.max_chunk_bytes = max_chunk_bytes
        self.version = 0
        self.layout: pb.ModelLayout | None = None
        self.layout_message = b""
        self._flat: wire.FloatVector | None = None
        self._broadcast: list[bytes] = []

    @property
    def ready(self) -> bool:
        """Whether a model exists yet."""
        return self._flat is not None

    @property
    def flat(self) -> wire.FloatVector:
        """The current parameters as one float32 vector (read-only view)."""
        if self._flat is None:
            raise RuntimeError("the controller has no model yet")
        view = self._flat.view()
        view.flags.writeable = False
        return view

    @property
    def nbytes(self) -> int:
        """Size of the flat model in bytes."""
        return 0 if self.layout is None else int(self.layout.total_bytes)

    def parameters(self) -> list[npt.NDArray[np.generic]]:
        """The current model as a list of arrays in the layout's shapes (copies)."""
        assert self.layout is not None
        return [np.array(a) for a in wire.unflatten(self.flat, self.layout)]

    def initialize(self, layout: pb.ModelLayout, flat: wire.FloatVector, version: int = 0) -> None:
        """Adopt a first model (from a file, the operator, or a learner)."""
        self.layout = layout
        self.layout_message = pb.ControllerMessage(layout=layout).SerializeToString()
        self.commit(flat, version)

    def initialize_from_arrays(self, arrays: Sequence[npt.NDArray[np.generic]]) -> None:
        """Adopt a first model given as a list of arrays."""
        layout = wire.make_layout(arrays)
        self.initialize(layout, wire.flatten(arrays, layout))

    def commit(self, flat: wire.FloatVector, version: int) -> None:
        """Make `flat` the current model at `version` and serialize its broadcast once."""
        assert self.layout is not None
        if flat.dtype != np.float32 or flat.nbytes != self.layout.total_bytes:
            raise ValueError(
                f"new model has {flat.nbytes} bytes of {flat.dtype}, "
                f"expected {self.layout.total_bytes} bytes of float32"
            )
        header, chunks = wire.make_payload(
            flat,
            payload_id=version,
            kind=pb.PAYLOAD_KIND_WEIGHTS,
            layout_id=self.layout.layout_id,
            max_chunk_bytes=self.max_chunk_bytes,
        )
        messages = [pb.ControllerMessage(model=pb.Model(version=version, payload=header))]
        messages += [pb.ControllerMessage(chunk=c) for c in chunks]
        self._broadcast = [m.SerializeToString() for m in messages]
        self._flat = flat
        self.version = version

    def broadcast(self) -> list[bytes]:
        """Serialized messages (header, then chunks) that deliver the current version."""
        return self._broadcast
