"""The learner's side of SecAgg+ rounds (SECURE AGGREGATION in the proto).

`SecAggParty` answers the controller's `SecAggStep` messages of one stream: it makes a
`_core.SecAggLearner` per round (`setup`), advertises its keys, seals its shares for its
neighbours (`keys`), keeps the shares sealed to it (`shares`), masks the round's update
(`mask`, for the upload) and reveals what unmasking needs (`unmask`). The cryptography runs in
Rust; nothing here loads the extension until a round starts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from metis_async import wire
from metis_async.v1 import controller_pb2 as pb

if TYPE_CHECKING:
    from metis_async._core import SecAggLearner


class SecAggParty:
    """One stream's SecAgg+ state: the round in progress, if any."""

    def __init__(self) -> None:
        self.round_id = b""
        self._learner: SecAggLearner | None = None

    def on_step(self, step: pb.SecAggStep) -> pb.SecAggStep | None:
        """The answer to one controller step (None: none is due); `wire.WireError` for a step
        that breaks the contract."""
        from metis_async._core import SecAggError, SecAggLearner

        kind = step.WhichOneof("step")
        try:
            if kind == "setup":
                s = step.setup
                self.round_id = bytes(step.round_id)
                self._learner = SecAggLearner(
                    self.round_id,
                    s.learners,
                    s.neighbours,
                    s.threshold,
                    s.index,
                    s.clip,
                    s.bits,
                )
                sealing, masking = self._learner.advertise()
                key = pb.SecAggKey(index=s.index, sealing_key=sealing, masking_key=masking)
                return self._reply(keys=pb.SecAggKeys(keys=[key]))
            learner = self._learner
            if learner is None or step.round_id != self.round_id:
                return None  # a step of a round this stream did not set up
            if kind == "keys":
                keys = {
                    k.index: (bytes(k.sealing_key), bytes(k.masking_key)) for k in step.keys.keys
                }
                sealed = learner.share(keys)
                shares = [pb.SecAggShare(index=to, sealed=data) for to, data in sealed]
                return self._reply(shares=pb.SecAggShares(shares=shares))
            if kind == "shares":
                for share in step.shares.shares:
                    learner.receive(share.index, bytes(share.sealed))
                return None
            if kind == "unmask":
                answers = learner.unmask(set(step.unmask.survivors), set(step.unmask.dropped))
                revealed = [pb.SecAggRevealed(owner=o, share=data) for o, data in answers]
                return self._reply(reveal=pb.SecAggReveal(shares=revealed))
        except SecAggError as error:
            raise wire.WireError(f"SecAgg+ {kind} step: {error}") from None
        return None

    def _reply(self, **body: Any) -> pb.SecAggStep:
        return pb.SecAggStep(round_id=self.round_id, **body)

    def mask(
        self, delta: wire.FloatVector, payload_id: int, layout_id: int, max_chunk_bytes: int
    ) -> tuple[pb.Payload, list[pb.Chunk]]:
        """The round's masked upload of `delta` (DTYPE_MASKED, uint32 little-endian)."""
        if self._learner is None:
            raise RuntimeError("no SecAgg+ round was set up for this upload")
        masked = self._learner.masked_input(np.ascontiguousarray(delta, dtype=np.float32))
        data = np.ascontiguousarray(masked, dtype="<u4").tobytes()
        kind, dtype = pb.PAYLOAD_KIND_DELTA, pb.DTYPE_MASKED
        return wire.byte_payload(data, payload_id, kind, dtype, layout_id, max_chunk_bytes)
