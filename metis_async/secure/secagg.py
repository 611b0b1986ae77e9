"""SecAgg+ secure aggregation (Bell et al. 2020) on the Rust core (`rust/core/src/secagg`).

Learners mask their clipped, stochastically quantized updates with pairwise masks (X25519 +
HKDF-SHA256, ChaCha20 keyed by the full 32-byte secret) and a self mask; masks cancel in the
sum; Shamir shares (threshold `threshold` among `neighbours` neighbours on a k-regular graph)
let the server remove the masks of learners that dropped after sharing. The server learns the
sum of the survivors' updates and nothing about any one of them unless `threshold` of a
learner's neighbours collude with it.

`run_round` drives one round between learners and server in one process: the same messages a
deployment carries, every step real (the benchmark and the tests use it). The federation core's
multi-phase driver over the wire is not built yet.
"""

from __future__ import annotations

import math
import os
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from metis_async._core import SecAggLearner, secagg_mean, secagg_unmask_sum


@dataclass(frozen=True)
class SecAggSettings:
    """One round's public settings (field for field the Rust `RoundSettings`).

    Attributes:
        learners: learners taking part (indices 0..learners-1).
        neighbours: neighbours of each learner (even; learners - 1 for the complete graph).
        threshold: shares needed to rebuild a learner's secrets (more than half the neighbours).
        clip: update values are clipped to [-clip, clip].
        bits: quantization bits (learners x (2**bits - 1) < 2**32).
        round_id: mixed into every derived key; fresh per round.
    """

    learners: int
    neighbours: int
    threshold: int
    clip: float = 1.0
    bits: int = 16
    round_id: bytes = b""

    @classmethod
    def for_learners(cls, learners: int, clip: float = 1.0) -> SecAggSettings:
        """SecAgg+'s logarithmic graph: about 2 log2(n) neighbours (all for small n), a
        threshold of just over half, and the most quantization bits the sum allows."""
        k = min(learners - 1, 2 * math.ceil(math.log2(max(learners, 2))))
        if k != learners - 1 and k % 2:
            k -= 1
        bits = min(24, 31 - math.ceil(math.log2(learners + 1)))
        return cls(learners, k, k // 2 + 1, clip, bits, os.urandom(16))


def run_round(
    settings: SecAggSettings,
    updates: Sequence[npt.NDArray[np.float32]],
    drop_after_sharing: Collection[int] = (),
    drop_after_input: Collection[int] = (),
) -> npt.NDArray[np.float32]:
    """One round: the mean of the updates of the learners that sent their masked input.

    `updates[i]` is learner i's update. Learners in `drop_after_sharing` leave after step 2 (their
    update is not counted), those in `drop_after_input` after step 3 (it is). Raises
    `_core.SecAggError` when too many dropped for the masks to be removed.
    """
    s = settings
    args = (s.round_id, s.learners, s.neighbours, s.threshold)
    learners = [SecAggLearner(*args, i, s.clip, s.bits) for i in range(s.learners)]
    keys = {i: learner.advertise() for i, learner in enumerate(learners)}
    for i, learner in enumerate(learners):
        for to, sealed in learner.share(keys):
            learners[to].receive(i, sealed)
    shared = set(range(s.learners))
    inputs = {
        i: learner.masked_input(updates[i])
        for i, learner in enumerate(learners)
        if i not in drop_after_sharing
    }
    survivors, dropped = set(inputs), shared - set(inputs)
    answers = [
        answer
        for i, learner in enumerate(learners)
        if i in survivors and i not in drop_after_input
        for answer in learner.unmask(survivors, dropped)
    ]
    total = secagg_unmask_sum(*args, keys, shared, inputs, answers, s.clip, s.bits)
    return secagg_mean(total, len(inputs), s.clip, s.bits)
