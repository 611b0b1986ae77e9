"""The controller's side of SecAgg+ (`protocols.secagg`): masked updates added mod 2^32 as they
arrive, unmasked once per round.

`MaskedStep` takes `ServerStep`'s place in the federation core when secure aggregation is on.
Each accepted update is a learner's masked, quantized delta (DTYPE_MASKED: uint32); the step
keeps only their running sum (wrapping, O(model) memory however many learners report). The
commit of a round (`SecureCommit`) brings the survivors' revealed shares: the masks are
removed in Rust (`_core.secagg_unmask_total`), the sum dequantized into the survivors' mean
delta, and that mean goes through an ordinary `ServerStep` (so FedAvg, FedAvgM, FedAdam and the
other server optimizers work on it; robust rules and clipping need single updates and are
refused).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from metis_async.aggregation.server_step import AggregationSettings, CommitRefused, ServerStep
from metis_async.workers.partials import RemoteFolds, RemoteUpdate

if TYPE_CHECKING:
    from metis_async.protocols.secagg import SecAggUnmasking


class MaskedStep:
    """The open round's sum of masked updates and the commit that unmasks it.

    Args:
        length: float32 parameters of the model (values per masked update).
        settings: the server optimizer applied to the unmasked mean (FedAvg by default).
    """

    def __init__(self, length: int, settings: AggregationSettings | None = None) -> None:
        self.length = length
        self.settings = settings or AggregationSettings()
        if self.settings.robust or self.settings.clip_norm:
            raise ValueError(
                "robust rules and norm clipping need single updates; under SecAgg+ the "
                "controller sees only the sum (learners clip to the round's clip instead)"
            )
        self._server = ServerStep(length, self.settings)
        self._total = np.zeros(length, dtype=np.uint32)
        self._count = 0
        # Ingest workers keep their learners' masked sums (mod 2^32 too), merged at commit.
        self._remote = RemoteFolds()

    @property
    def lost_workers(self) -> set[int]:
        """Workers whose partial of the last commit was lost (the core un-counts their updates)."""
        return self._remote.lost_workers

    @property
    def count(self) -> int:
        """Masked updates added since the last commit or reset."""
        return self._count + self._remote.count

    @property
    def total_weight(self) -> float:
        """Updates added: each survivor counts once."""
        return float(self.count)

    def add(self, update: object, weight: float = 1.0, checked: bool = False) -> None:
        """Add one masked update (DTYPE_MASKED bytes) mod 2^32; the weight is not used."""
        del weight, checked
        if isinstance(update, RemoteUpdate):  # summed by the worker that holds it
            if len(update) != 4 * self.length:
                raise ValueError(f"{len(update)} masked bytes; the model has {self.length} values")
            self._remote.add(update, 1.0)
            return
        if not isinstance(update, bytes | bytearray | memoryview):
            raise TypeError(f"a masked update is bytes, got {type(update).__name__}")
        values = np.frombuffer(update, dtype="<u4")
        if values.size != self.length:
            raise ValueError(f"{values.size} masked values; the model has {self.length}")
        np.add(self._total, values, out=self._total)  # wraps mod 2^32, as the masks need
        self._count += 1

    def reset(self) -> None:
        """Drop the round's sum."""
        self._total[:] = 0
        self._count = 0
        self._server.reset()
        self._remote.reset()

    def commit(
        self,
        base: npt.NDArray[np.float32],
        scale: float,
        normalize: bool,
        relative: bool,
        material: SecAggUnmasking | None,
    ) -> npt.NDArray[np.float32]:
        """The new model from `base` and the round's unmasked mean delta; then reset.

        Raises `CommitRefused` without material, with nothing added, or when unmasking fails
        (too many learners dropped: `SecAggError`); the model is then unchanged.
        """
        from metis_async._core import SecAggError, secagg_mean, secagg_unmask_total

        try:
            if material is None:
                raise CommitRefused("a SecAgg+ commit needs the round's revealed shares")
            for body, _, count in self._remote.collect():
                np.add(self._total, np.frombuffer(body, dtype="<u4"), out=self._total)
                self._count += count
            if self.lost_workers:
                raise CommitRefused(
                    "an ingest worker was lost with its learners' masked sum: the survivors' "
                    "masks cannot be removed from a sum without them"
                )
            if self._count == 0 or self._count != len(material.survivors):
                raise CommitRefused(
                    f"{self._count} masked updates were added; the round counts "
                    f"{len(material.survivors)} survivors"
                )
            s = material.settings
            try:
                total = secagg_unmask_total(
                    s.round_id,
                    s.learners,
                    s.neighbours,
                    s.threshold,
                    dict(material.keys),
                    set(material.shared),
                    set(material.survivors),
                    self._total,
                    list(material.reveals),
                    s.clip,
                    s.bits,
                )
            except SecAggError as error:
                raise CommitRefused(f"SecAgg+ unmasking failed: {error}") from None
            mean = secagg_mean(total, self._count, s.clip, s.bits)
            self._server.add(mean, 1.0, True)
            return self._server.commit(base, scale, normalize, relative)
        finally:
            self.reset()

    def state(self) -> dict[str, npt.NDArray[np.float32]]:
        """The server optimizer's state."""
        return self._server.state()

    def load_state(self, state: object) -> None:
        """Restore the server optimizer's state."""
        self._server.load_state(state)  # type: ignore[arg-type]
