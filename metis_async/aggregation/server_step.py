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
version: O(updates × model) memory.

Robust rules are UNWEIGHTED: with a normalized commit every update counts once whatever its
weight; with `normalize=False` (FedBuff) the rule runs on the weighted updates wᵢ·uᵢ and its
estimate is multiplied by their count (a robust stand-in for the weighted sum). The trimmed mean
drops ⌊β·n⌋ values at each end: with β·n < 1 it trims nothing and is the plain mean.
`metis_async.aggregation.compatibility.check_compatible` warns about both when settings are made.

Norm clipping bounds what each update can move the model. A delta is clipped to `clip_norm`
itself. A full-weight upload (a relative, FedAsync commit) is clipped as the move it makes:
u ← x + clip(u − x), with x the current model at commit time, the model the update is mixed into.
The controller keeps only the current model, not the version each learner started from, so this
clips x_new − x_current rather than x_new − x_base (the same at staleness 0); it bounds exactly
the step the commit takes, whatever the staleness. Uploads wait unclipped in the fold window
until a commit or a full window says which kind they are; a full window folds them as deltas.

A commit never produces a non-finite model: the new model is checked with `first_non_finite`
on every path (Rust fused step, server optimizer, robust rule, relative mixing) and, when any
value is NaN or infinite (float32 overflow of finite but huge uploads), the commit raises
`CommitRefused` (a ValueError): the aggregate is dropped, the base model is not touched, and the
optimizer's moments are not advanced (the Rust `ServerOptimizer.step` checks every new value
before it writes any). FedAsync mixing (1 − α)·x + α·u is computed in float64, so it never
overflows (it is a convex combination of finite values).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np
import numpy.typing as npt

from metis_async._core import Accumulator, AggregationError, Segments, first_non_finite
from metis_async.workers.partials import RemoteFolds, RemoteUpdate

if TYPE_CHECKING:
    from metis_async._core import ServerOptimizer

FloatVector = npt.NDArray[np.float32]
RobustRule = Literal["median", "trimmed_mean", "krum", "multi_krum"]
OPTIMIZERS = ("fedavg", "fedavgm", "fedadagrad", "fedadam", "fedyogi")
ROBUST_RULES = ("median", "trimmed_mean", "krum", "multi_krum")
_CHUNK = 1 << 20  # values per float64 pass of the relative (FedAsync) mixing: 8 MiB temporaries


class CommitRefused(ValueError):
    """A commit that cannot give a finite model; the aggregate was dropped, nothing else changed.

    The message names the rule, the number of updates and the reason (e.g. the first index
    that would overflow float32, or a robust rule that needs more updates).
    """


@dataclass(frozen=True)
class AggregationSettings:
    """How the controller combines updates and steps the model.

    Attributes:
        optimizer: server optimizer: fedavg (x + d), fedavgm, fedadagrad, fedadam, fedyogi.
        optimizer_options: its hyperparameters (lr, beta1, beta2, tau, momentum).
        robust: a robust rule replacing the weighted mean; None streams the mean. Robust rules
            are unweighted (see the module docstring).
        trim_beta: trimmed mean: fraction dropped at each end per coordinate (< 0.5); with
            n updates ⌊trim_beta·n⌋ are dropped, none when that is 0.
        byzantine: Krum / Multi-Krum: number f of Byzantine learners tolerated.
        clip_norm: clip every update to this L2 norm before aggregation (a full-weight upload:
            its move from the current model); 0 disables.
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
        self._clipped_as_deltas = False  # a full window was folded as clipped deltas
        # Updates folded in ingest workers' partial sums (RemoteUpdate), merged at commit.
        self._remote = RemoteFolds()
        if self.settings.optimizer != "fedavg" or self.settings.optimizer_options:
            from metis_async.aggregation.optimizers import make_optimizer

            options = self.settings.optimizer_options
            self._optimizer = make_optimizer(self.settings.optimizer, length, **options)

    @property
    def lost_workers(self) -> set[int]:
        """Workers whose partial of the last commit was lost (the core un-counts their updates)."""
        return self._remote.lost_workers

    @property
    def count(self) -> int:
        """Updates accepted since the last commit or reset."""
        return self._acc.count + len(self._kept) + self._remote.count

    @property
    def total_weight(self) -> float:
        """Sum of the weights accepted since the last commit or reset."""
        kept = float(sum(w for _, w in self._kept))
        return self._acc.total_weight + kept + self._remote.total_weight

    def add(
        self,
        update: FloatVector | Segments | RemoteUpdate,
        weight: float,
        validated: bool = False,
    ) -> None:
        """Accept one update with `weight` (> 0); raises ValueError, state unchanged.

        `update` may be `Segments` (an upload kept in the chunk messages it arrived in): the
        streaming mean folds it where it lies; robust rules and clipping take a copy.

        `validated` says the caller already checked that every value is finite (the server does,
        with `first_non_finite`, when an upload completes), so the values are not read again.
        """
        if len(update) != self.length:
            raise ValueError(f"update has {len(update)} values, the model has {self.length}")
        if not (weight > 0 and np.isfinite(weight)):
            raise ValueError(f"weight must be finite and > 0, got {weight}")
        if isinstance(update, RemoteUpdate):
            self._add_remote(update, weight)
            return
        if isinstance(update, Segments):
            plain = not (self.settings.robust or self.settings.clip_norm)
            if validated and plain and self.settings.fold_window > 1:
                # Folded straight from the chunk messages it arrived in: never copied.
                self._kept.append((update, float(weight)))  # type: ignore[arg-type]
                if len(self._kept) >= self.settings.fold_window:
                    self._fold()
                return
            update = update.to_array()
        if not validated:
            bad = first_non_finite(update)
            if bad is not None:
                raise ValueError(f"update contains non-finite values (first at index {bad})")
        if self.settings.robust:
            self._kept.append((np.array(update, dtype=np.float32), float(weight)))
            return
        if update.dtype != np.float32 or not update.flags.c_contiguous:
            update = np.ascontiguousarray(update, dtype=np.float32)
        if self.settings.clip_norm:
            # Held unclipped: only the commit says whether this is a delta or full weights.
            if len(self._kept) >= self.settings.fold_window:
                self._fold()
            self._kept.append((update, float(weight)))
            return
        if self.settings.fold_window == 1:
            self._acc.add(update, weight)
            return
        self._kept.append((update, float(weight)))
        if len(self._kept) >= self.settings.fold_window:
            self._fold()

    def _add_remote(self, update: RemoteUpdate, weight: float) -> None:
        """An update an ingest worker holds: folded into that worker's partial sum."""
        if self.settings.robust or self.settings.clip_norm:
            raise ValueError(
                "robust rules and clipping need the update itself: workers forward such updates"
            )
        self._remote.add(update, float(weight))

    def _merge_remote(self) -> None:
        """Merge the workers' partial sums into the accumulator (blocks on the workers)."""
        for body, weight, count in self._remote.collect():
            self._acc.merge(np.frombuffer(body, dtype=np.float64), weight, count)

    def _fold(self) -> None:
        """Fold the waiting updates (as deltas, clipped if set) into the float64 sum."""
        if not self._kept or self.settings.robust:
            return
        waiting, self._kept = self._kept, []
        updates = [u for u, _ in waiting]
        if self.settings.clip_norm:
            from metis_async.aggregation.robust import clip_by_norm

            updates = [clip_by_norm(u, self.settings.clip_norm) for u in updates]
            self._clipped_as_deltas = True
        # Every value was checked on arrival (add), and clipping keeps them finite.
        self._acc.add_many(updates, [w for _, w in waiting], check_finite=False)

    def reset(self) -> None:
        """Drop the aggregate."""
        self._acc.reset()
        self._kept.clear()
        self._clipped_as_deltas = False
        self._remote.reset()

    def commit(
        self, base: FloatVector, scale: float = 1.0, normalize: bool = True, relative: bool = False
    ) -> FloatVector:
        """The new model from `base` and the aggregate (see the module docstring); then reset.

        `base` is never modified. Raises `CommitRefused` (a ValueError) when there is nothing
        to commit, when the aggregate cannot be computed (a robust rule with too few updates) or
        when the new model would not be finite; the aggregate is dropped, `base` and the
        optimizer's state are unchanged.
        """
        updates = self.count
        self._remote.lost_workers = set()
        if updates == 0:
            raise CommitRefused("nothing to commit: no update was accepted")
        self._merge_remote()
        if self.count == 0:
            raise CommitRefused("nothing to commit: every accepted update was lost with a worker")
        try:
            with np.errstate(over="ignore", invalid="ignore"):  # overflows are reported below
                new = self._new_model(base, scale, normalize, relative)
        except AggregationError as error:
            raise CommitRefused(f"{self._describe(updates)} refused: {error}") from error
        finally:
            self.reset()
        bad = first_non_finite(new)
        if bad is not None:
            raise CommitRefused(
                f"{self._describe(updates)} refused: the new model is not finite at index {bad} "
                f"(float32 overflow: |value| > {float(np.finfo(np.float32).max):.3g})"
            )
        return new

    def _describe(self, updates: int) -> str:
        rule: str = self.settings.robust or "mean"
        if self.settings.robust in ("krum", "multi_krum"):
            rule += f" (byzantine={self.settings.byzantine})"
        elif self.settings.robust == "trimmed_mean":
            rule += f" (trim_beta={self.settings.trim_beta})"
        return f"commit of {updates} update{'s' * (updates != 1)} with {rule}"

    def _new_model(
        self, base: FloatVector, scale: float, normalize: bool, relative: bool
    ) -> FloatVector:
        if relative and self.settings.clip_norm:
            delta = self._clipped_moves(base, normalize)
            delta *= np.float32(scale)
            return self._stepped(base, delta)
        self._fold()
        if self._optimizer is None and not relative and not self.settings.robust:
            return self._acc.apply(base, scale, normalize)  # FedAvg: one fused pass in Rust
        if not relative:
            return self._stepped(base, self._aggregate(normalize, scale))
        aggregate = self._aggregate(normalize, 1.0)
        if self._optimizer is None:
            return _mix(base, aggregate, scale)
        return self._stepped(base, _scaled_difference(aggregate, base, scale))

    def _stepped(self, base: FloatVector, delta: FloatVector) -> FloatVector:
        """base + d through the optimizer; raises before any state changes if not finite."""
        bad = first_non_finite(delta)
        if bad is not None:
            raise AggregationError(
                f"the server delta is not finite at index {bad} (float32 overflow)"
            )
        new = np.array(base, dtype=np.float32)
        if self._optimizer is None:
            new += delta
        else:
            self._optimizer.step(new, delta)  # checks every new value before writing any
        return new

    def _clipped_moves(self, base: FloatVector, normalize: bool) -> FloatVector:
        """A − base with every full-weight upload u replaced by base + clip(u − base)."""
        if self._clipped_as_deltas:
            raise AggregationError(
                f"a full-weight commit with clip_norm takes at most fold_window="
                f"{self.settings.fold_window} updates; more were folded as deltas"
            )
        from metis_async.aggregation.robust import clip_by_norm

        base32 = np.asarray(base, dtype=np.float32)
        moves: list[tuple[FloatVector, float]] = []
        for update, weight in self._kept:
            move = update - base32
            bad = first_non_finite(move)
            if bad is not None:
                raise AggregationError(f"upload minus model overflows float32 at index {bad}")
            moves.append((clip_by_norm(move, self.settings.clip_norm), weight))
        total = float(sum(w for _, w in moves))
        self._kept = moves
        if self.settings.robust:
            estimate = self._aggregate(normalize, 1.0)
        else:
            from metis_async.aggregation import weighted_average

            estimate = weighted_average([m for m, _ in moves], [w for _, w in moves])
            if not normalize:
                estimate *= np.float32(total)
        if not normalize:  # Σ wᵢ(base + cᵢ) − base
            estimate += np.float32(total - 1.0) * base32
        return estimate

    def _aggregate(self, normalize: bool, scale: float) -> FloatVector:
        """scale · A: the weighted mean (or sum) of the updates, or the robust rule's estimate."""
        if not self.settings.robust:
            aggregate = self._acc.mean() if normalize else self._acc.weighted_sum()
            if scale != 1.0:
                aggregate *= np.float32(scale)
            return aggregate
        from metis_async.aggregation import robust

        updates = np.stack([u for u, _ in self._kept])
        factor = scale
        if not normalize:
            # A sum of weighted updates: the rule over weighted updates, times their count
            # (one scalar with `scale`, so huge but finite values do not overflow on the way).
            weights = np.array([w for _, w in self._kept], dtype=np.float32)
            updates *= weights[:, None]
            factor *= len(self._kept)
        rule = self.settings.robust
        if rule == "median":
            estimate = robust.coordinate_median(updates)
        elif rule == "trimmed_mean":
            estimate = robust.trimmed_mean(updates, self.settings.trim_beta)
        elif rule == "krum":
            estimate = updates[robust.krum(updates, self.settings.byzantine)].copy()
        else:
            estimate = robust.multi_krum(updates, self.settings.byzantine)
        if factor != 1.0:
            estimate *= np.float32(factor)
        return estimate

    def state(self) -> dict[str, FloatVector]:
        """The optimizer's state vectors (for checkpoints); `steps` is kept as `steps`."""
        if self._optimizer is None:
            return {}
        state = dict(self._optimizer.state())
        state["steps"] = np.array([self._optimizer.steps], dtype=np.float32)
        return state

    def load_state(self, state: Mapping[str, FloatVector]) -> None:
        """Take back `state()` of a step with the same settings (a checkpoint's)."""
        vectors = {k: v for k, v in state.items() if k != "steps"}
        if self._optimizer is None:
            if vectors:
                raise ValueError(
                    f"the checkpoint holds optimizer state ({', '.join(sorted(vectors))}); "
                    f"the configured optimizer {self.settings.optimizer} keeps none"
                )
            return
        steps = int(state["steps"][0]) if "steps" in state else 0
        self._optimizer.load_state(vectors, steps)


def _mix(base: FloatVector, target: FloatVector, scale: float) -> FloatVector:
    """(1 − scale)·base + scale·target in float64, chunk by chunk (no float32 overflow)."""
    new = np.empty(len(base), dtype=np.float32)
    for start in range(0, len(base), _CHUNK):
        x = base[start : start + _CHUNK].astype(np.float64)
        x += scale * (target[start : start + _CHUNK].astype(np.float64) - x)
        new[start : start + _CHUNK] = x
    return new


def _scaled_difference(target: FloatVector, base: FloatVector, scale: float) -> FloatVector:
    """scale·(target − base) as float32, computed in float64 chunk by chunk."""
    out = np.empty(len(base), dtype=np.float32)
    for start in range(0, len(base), _CHUNK):
        x = target[start : start + _CHUNK].astype(np.float64)
        x -= base[start : start + _CHUNK]
        x *= scale
        out[start : start + _CHUNK] = x  # an overflow becomes inf: the caller refuses it
    return out
