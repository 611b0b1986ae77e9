"""From accepted updates to the next model version, in one place for the server and simulator.

`ServerStep` folds accepted uploads (deltas or full weights) into an aggregate A and, on commit,
turns it into a server delta d and then into the new model:

- deltas: d = scale · A, A the weighted mean (or sum) of the deltas;
- full weights (FedAsync): d = scale · (A − x), so x + d = (1 − scale) · x + scale · A;
- the server optimizer maps (x, d) to the new model: FedAvg is x + d; FedAvgM, FedAdam, FedYogi
  and FedAdagrad keep their moment vectors in Rust next to the model.

With the default streaming mean, memory is O(model) however many updates arrive: accepted updates
are held (by reference, not copied) until `fold_window` of them are waiting, then folded into the
float64 sum in one cache-tiled pass (`Accumulator.add_many`). The server checks every value for
NaN/inf while each upload chunk is still in cache, so the fold reads each update once: about
4 + 16/window bytes per parameter and update instead of 24. Peak memory is (window + 2) × model.
A robust rule
(median, trimmed mean, Krum, Multi-Krum) replaces the mean and must keep every update of the
version: O(updates × model) memory. Norm clipping bounds each update before it is folded in.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np
import numpy.typing as npt

from metis_async._core import Accumulator, first_non_finite

if TYPE_CHECKING:
    from metis_async._core import ServerOptimizer

FloatVector = npt.NDArray[np.float32]
RobustRule = Literal["median", "trimmed_mean", "krum", "multi_krum"]
OPTIMIZERS = ("fedavg", "fedavgm", "fedadagrad", "fedadam", "fedyogi")
ROBUST_RULES = ("median", "trimmed_mean", "krum", "multi_krum")


@dataclass(frozen=True)
class AggregationSettings:
    """How the controller combines updates and steps the model.

    Attributes:
        optimizer: server optimizer: fedavg (x + d), fedavgm, fedadagrad, fedadam, fedyogi.
        optimizer_options: its hyperparameters (lr, beta1, beta2, tau, momentum).
        robust: a robust rule replacing the weighted mean; None streams the mean.
        trim_beta: trimmed mean: fraction dropped at each end per coordinate (< 0.5).
        byzantine: Krum / Multi-Krum: number f of Byzantine learners tolerated.
        clip_norm: clip every update to this L2 norm before aggregation; 0 disables.
        fold_window: accepted updates held before they are folded together (1 folds each at
            once); callers must not modify an update after handing it over.
    """

    optimizer: str = "fedavg"
    optimizer_options: Mapping[str, float] = field(default_factory=dict)
    robust: RobustRule | None = None
    trim_beta: float = 0.1
    byzantine: int = 0
    clip_norm: float = 0.0
    fold_window: int = 8

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose from {OPTIMIZERS}")
        if self.robust is not None and self.robust not in ROBUST_RULES:
            raise ValueError(f"unknown robust rule {self.robust!r}; choose from {ROBUST_RULES}")
        if not 0.0 <= self.trim_beta < 0.5:
            raise ValueError(f"trim_beta must be in [0, 0.5), got {self.trim_beta}")
        if self.byzantine < 0:
            raise ValueError(f"byzantine must be >= 0, got {self.byzantine}")
        if self.fold_window < 1:
            raise ValueError(f"fold_window must be >= 1, got {self.fold_window}")
        if not (self.clip_norm >= 0 and np.isfinite(self.clip_norm)):
            raise ValueError(f"clip_norm must be finite and >= 0, got {self.clip_norm}")
        if self.optimizer_options:
            from metis_async.aggregation.optimizers import make_optimizer

            # Fail now, naming the bad hyperparameter, not when the first model arrives.
            make_optimizer(self.optimizer, 1, **self.optimizer_options)


class ServerStep:
    """The aggregate of the open version and the step that commits it.

    Args:
        length: number of float32 parameters of the flat model.
        settings: optimizer, robust rule and clipping; FedAvg with a streaming mean by default.
    """

    def __init__(self, length: int, settings: AggregationSettings | None = None) -> None:
        self.length = length
        self.settings = settings or AggregationSettings()
        self._acc = Accumulator(length)
        self._kept: list[tuple[FloatVector, float]] = []  # robust rules: all; else the window
        self._optimizer: ServerOptimizer | None = None
        if self.settings.optimizer != "fedavg" or self.settings.optimizer_options:
            from metis_async.aggregation.optimizers import make_optimizer

            options = self.settings.optimizer_options
            self._optimizer = make_optimizer(self.settings.optimizer, length, **options)

    @property
    def count(self) -> int:
        """Updates accepted since the last commit or reset."""
        return self._acc.count + len(self._kept)

    @property
    def total_weight(self) -> float:
        """Sum of the weights accepted since the last commit or reset."""
        return self._acc.total_weight + float(sum(w for _, w in self._kept))

    def add(self, update: FloatVector, weight: float, validated: bool = False) -> None:
        """Accept one update with `weight` (> 0); raises ValueError, state unchanged.

        `validated` says the caller already checked that every value is finite (the server does,
        with `first_non_finite`, when an upload completes), so the values are not read again.
        """
        if self.settings.clip_norm:
            from metis_async.aggregation.robust import clip_by_norm

            update = clip_by_norm(update, self.settings.clip_norm)
        if len(update) != self.length:
            raise ValueError(f"update has {len(update)} values, the model has {self.length}")
        if not (weight > 0 and np.isfinite(weight)):
            raise ValueError(f"weight must be finite and > 0, got {weight}")
        if not validated:
            bad = first_non_finite(update)
            if bad is not None:
                raise ValueError(f"update contains non-finite values (first at index {bad})")
        if self.settings.robust:
            self._kept.append((np.array(update, dtype=np.float32), float(weight)))
            return
        if update.dtype != np.float32 or not update.flags.c_contiguous:
            update = np.ascontiguousarray(update, dtype=np.float32)
        if self.settings.fold_window == 1:
            self._acc.add(update, weight)
            return
        self._kept.append((update, float(weight)))
        if len(self._kept) >= self.settings.fold_window:
            self._fold()

    def _fold(self) -> None:
        """Fold the waiting updates into the float64 sum in one tiled pass."""
        if not self._kept or self.settings.robust:
            return
        waiting, self._kept = self._kept, []
        try:
            # Every value was checked on arrival (add): skip the second read.
            self._acc.add_many([u for u, _ in waiting], [w for _, w in waiting], check_finite=False)
        except ValueError:
            # Should not happen (callers validate first); keep every good update regardless.
            for update, weight in waiting:
                try:
                    self._acc.add(update, weight)
                except ValueError:
                    continue

    def reset(self) -> None:
        """Drop the aggregate."""
        self._acc.reset()
        self._kept.clear()

    def commit(
        self, base: FloatVector, scale: float = 1.0, normalize: bool = True, relative: bool = False
    ) -> FloatVector:
        """The new model from `base` and the aggregate (see the module docstring); then reset.

        Raises ValueError (the aggregate is kept) if there is nothing to commit.
        """
        if self.count == 0:
            raise ValueError("nothing to commit: no update was accepted")
        self._fold()
        if self._optimizer is None and not relative and not self.settings.robust:
            new = self._acc.apply(base, scale, normalize)  # FedAvg: one fused pass in Rust
        else:
            delta = self._aggregate(normalize)
            if relative:
                delta -= base
            delta *= np.float32(scale)
            new = np.array(base, dtype=np.float32)
            if self._optimizer is None:
                new += delta
            else:
                self._optimizer.step(new, delta)
        self.reset()
        return new

    def _aggregate(self, normalize: bool) -> FloatVector:
        """A: the weighted mean (or sum) of the updates, or the robust rule's estimate."""
        if not self.settings.robust:
            return self._acc.mean() if normalize else self._acc.weighted_sum()
        from metis_async.aggregation import robust

        updates = np.stack([u for u, _ in self._kept])
        if not normalize:
            # A sum of weighted updates: the rule over weighted updates, times their count.
            weights = np.array([w for _, w in self._kept], dtype=np.float32)
            updates *= weights[:, None]
        rule = self.settings.robust
        if rule == "median":
            estimate = robust.coordinate_median(updates)
        elif rule == "trimmed_mean":
            estimate = robust.trimmed_mean(updates, self.settings.trim_beta)
        elif rule == "krum":
            estimate = updates[robust.krum(updates, self.settings.byzantine)].copy()
        else:
            estimate = robust.multi_krum(updates, self.settings.byzantine)
        if not normalize:
            estimate *= np.float32(len(self._kept))
        return estimate

    def state(self) -> dict[str, FloatVector]:
        """The optimizer's state vectors (for checkpoints)."""
        return {} if self._optimizer is None else dict(self._optimizer.state())
