"""Aggregation core of metis-async, implemented in Rust (``rust/src``).

Private: import from :mod:`metis_async.aggregation` instead. Arrays are borrowed without copying
and must be 1-D, C-contiguous, float32 or float64. Every call that is O(model size) releases the
GIL. Any invalid input raises :class:`AggregationError` before any state changes.
"""

from collections.abc import Sequence
from typing import Literal, final

import numpy as np
from numpy.typing import NDArray

__all__ = ["Accumulator", "AggregationError", "__version__", "build_profile", "weighted_average"]

__version__: str
build_profile: Literal["debug", "release"]

class AggregationError(ValueError):
    """Invalid input to the aggregation core; raised before any state changes.

    Covers wrong lengths, weights that are not finite and > 0, non-finite values, arrays that are
    not 1-D, not float32/float64 or not C-contiguous, and a mean of nothing.
    """

@final
class Accumulator:
    """Streaming weighted accumulator: a float64 running sum of ``weight * update``.

    Memory is one float64 per parameter however many updates are added. Safe to share between
    threads (calls are serialized by an internal lock taken with the GIL released); ``count`` and
    ``total_weight`` answer at once even while another thread is inside :meth:`add`.
    """

    def __new__(cls, length: int) -> Accumulator:
        """An empty accumulator for models of ``length`` parameters."""

    def add(self, values: NDArray[np.float32] | NDArray[np.float64], weight: float) -> None:
        """Add ``weight * values`` to the running sum.

        ``values`` must have ``len(self)`` finite entries and ``weight`` must be finite and > 0
        (zero is rejected: drop such an update instead). On error nothing changes.
        """

    def mean(self) -> NDArray[np.float32]:
        """The weighted mean ``sum / total_weight``; fails if nothing was added."""

    def weighted_sum(self) -> NDArray[np.float32]:
        """The weighted sum ``Σ weight * values``; fails if a value overflows float32."""

    def apply(
        self, base: NDArray[np.float32], scale: float = 1.0, normalize: bool = True
    ) -> NDArray[np.float32]:
        """A new model ``base + scale * (mean if normalize else sum)``, computed in float64.

        ``base`` must be float32 with ``len(self)`` values and ``scale`` finite. The accumulator
        is not changed.
        """

    def reset(self) -> None:
        """Clear the sum, total weight and count (keeps the memory)."""

    @property
    def count(self) -> int:
        """Number of updates added since creation or the last :meth:`reset`."""

    @property
    def total_weight(self) -> float:
        """Sum of the weights added since creation or the last :meth:`reset`."""

    def __len__(self) -> int:
        """Number of parameters."""

def weighted_average(
    updates: Sequence[NDArray[np.float32] | NDArray[np.float64]], weights: Sequence[float]
) -> NDArray[np.float32]:
    """Weighted mean ``Σ wᵢ·xᵢ / Σ wᵢ`` of equally long updates, all float32 or all float64.

    Reads each update once, walking the parameters in cache-sized tiles; needs every update in
    memory. Bit-identical to adding the updates to an :class:`Accumulator` in order and calling
    :meth:`Accumulator.mean`.
    """
