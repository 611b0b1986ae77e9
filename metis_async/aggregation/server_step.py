"""From accepted updates to the next model version, in one place for the server and simulator.

`ServerStep` folds accepted uploads (deltas or full weights) into an aggregate and, on commit,
turns it into a server delta d and then into the new model:

- deltas: d = scale · A, A the weighted mean (or sum) of the deltas;
- full weights (FedAsync): d = scale · (A − x), so x + d = (1 − scale) · x + scale · A;
- the server optimizer maps (x, d) to the new model; plain FedAvg is x + d.

Streaming rules keep memory O(model) whatever the number of updates.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from metis_async._core import Accumulator

FloatVector = npt.NDArray[np.float32]


class ServerStep:
    """The aggregate of the open version and the step that commits it.

    Args:
        length: number of float32 parameters of the flat model.
    """

    def __init__(self, length: int) -> None:
        self.length = length
        self._acc = Accumulator(length)

    @property
    def count(self) -> int:
        """Updates folded in since the last commit or reset."""
        return self._acc.count

    @property
    def total_weight(self) -> float:
        """Sum of the weights folded in since the last commit or reset."""
        return self._acc.total_weight

    def add(self, update: FloatVector, weight: float) -> None:
        """Fold one validated update in with `weight` (> 0); raises ValueError, state unchanged."""
        self._acc.add(update, weight)

    def reset(self) -> None:
        """Drop the aggregate."""
        self._acc.reset()

    def commit(
        self, base: FloatVector, scale: float = 1.0, normalize: bool = True, relative: bool = False
    ) -> FloatVector:
        """The new model from `base` and the aggregate (see the module docstring); then reset.

        Raises ValueError (the aggregate is kept) if there is nothing to commit.
        """
        if relative:
            mean = self._acc.mean() if normalize else self._acc.weighted_sum()
            new = np.subtract(mean, base, dtype=np.float32)
            new *= np.float32(scale)
            new += base
        else:
            new = self._acc.apply(base, scale, normalize)
        self._acc.reset()
        return new
