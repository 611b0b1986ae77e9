"""Which aggregation settings a protocol can commit with, checked when the settings are made.

A robust rule needs several updates per version, and Krum / Multi-Krum need n ≥ 2f + 3 of them.
A protocol that can commit with fewer would fail every such commit and run on with a frozen
model, so `check_compatible` refuses the combination up front, naming the settings. It returns
warnings (strings) for settings that work but do less than their names say: a trimmed mean
that trims nothing for the smallest possible n, and robust rules, which are unweighted, under
example or step weighting.

The smallest number of updates a version can be committed with:

- synchronous and semi-synchronous rounds: max(1, ⌈goal × min_update_fraction⌉), the goal being
  `learners_per_round`, or `min_learners` when that is 0 (every connected learner);
- buffered (FedBuff): exactly the buffer size K;
- asynchronous (FedAsync): one update per version, so no robust rule can work.
"""

from __future__ import annotations

import math

from metis_async.aggregation.server_step import AggregationSettings
from metis_async.protocols.asynchronous import AsynchronousPolicy
from metis_async.protocols.base import Policy
from metis_async.protocols.buffered import BufferedPolicy
from metis_async.protocols.synchronous import SynchronousPolicy

__all__ = ["check_compatible", "check_homomorphic", "min_updates_per_version"]


def min_updates_per_version(policy: Policy) -> tuple[int, str] | None:
    """The fewest updates `policy` can commit a version with, and how that follows from its
    settings (for messages); None for a protocol this module does not know."""
    if isinstance(policy, SynchronousPolicy):
        s = policy.settings
        goal, goal_name = (
            (s.learners_per_round, f"learners_per_round={s.learners_per_round}")
            if s.learners_per_round
            else (s.min_learners, f"min_learners={s.min_learners}")
        )
        n = max(1, math.ceil(goal * s.min_update_fraction))
        return n, f"max(1, ceil({goal_name} x min_update_fraction={s.min_update_fraction}))"
    if isinstance(policy, BufferedPolicy):
        k = policy.settings.buffer_size
        return k, f"buffer_size={k}"
    if isinstance(policy, AsynchronousPolicy):
        return 1, "FedAsync commits every update on its own"
    return None


def check_compatible(policy: Policy, aggregation: AggregationSettings) -> list[str]:
    """Refuse aggregation settings the protocol cannot commit with; return warnings.

    Raises:
        ValueError: naming the settings, e.g. a robust rule under FedAsync, or Krum / Multi-Krum
            with `byzantine` f when a version can commit with fewer than 2f + 3 updates.

    Returns:
        Warnings (one sentence each) about settings that work but do less than expected.
    """
    rule = aggregation.robust
    if rule is None:
        return []
    found = min_updates_per_version(policy)
    if found is None:
        return [f"robust={rule!r}: cannot tell how many updates protocol {policy.name!r} commits"]
    n, why = found
    prefix = f"robust={rule!r} with protocol {policy.name!r}"
    if isinstance(policy, AsynchronousPolicy):
        raise ValueError(
            f"{prefix}: no robustness with one update per version (FedAsync mixes every update "
            "in on its own); use protocol 'buffered' with a buffer_size the rule can work with"
        )
    errors: list[str] = []
    warnings: list[str] = []
    f = aggregation.byzantine
    if rule in ("krum", "multi_krum") and n < 2 * f + 3:
        errors.append(
            f"{prefix} and byzantine={f} needs at least 2f + 3 = {2 * f + 3} updates per "
            f"version, but a version can commit with {n} ({why})"
        )
    if rule == "median" and n < 2:
        warnings.append(f"{prefix}: a version can commit with 1 update ({why}): no robustness")
    if rule == "trimmed_mean" and math.floor(aggregation.trim_beta * n) == 0:
        warnings.append(
            f"{prefix} and trim_beta={aggregation.trim_beta}: a version can commit with {n} "
            f"updates ({why}), and floor(trim_beta x {n}) = 0 trims nothing (the plain mean)"
        )
    weighting = policy.settings.weighting if isinstance(policy, SynchronousPolicy) else "uniform"
    if isinstance(policy, BufferedPolicy):
        weighting = policy.settings.weighting
    if weighting != "uniform":
        warnings.append(
            f"{prefix}: robust rules are unweighted, so weighting={weighting!r} is not honoured "
            "as a weight (rounds: each update counts once; FedBuff: the rule sees w x delta)"
        )
    if errors:
        raise ValueError("; ".join(errors))
    return warnings


def check_homomorphic(
    policy: Policy, aggregation: AggregationSettings, public_key: bool = False
) -> None:
    """Refuse what homomorphic aggregation cannot do: the controller holds ciphertexts it
    cannot read, so it can only add them, times integer weights.

    Raises:
        ValueError: naming the setting: a round-less policy (buffered, asynchronous) without
            the federation's public key (`public_key`: the first model must be encrypted once),
            a server optimizer, a robust rule or clipping (each needs the plaintext update).
    """
    if not isinstance(policy, SynchronousPolicy) and not public_key:
        raise ValueError(
            f"{policy.name} under homomorphic aggregation needs the federation's public key "
            "(he-public.key, or the committee file) to encrypt the first model; "
            "synchronous and semi_synchronous rounds need none"
        )
    if aggregation.optimizer != "fedavg" or aggregation.optimizer_options:
        raise ValueError(
            "homomorphic aggregation commits the plain weighted average: server optimizer "
            f"{aggregation.optimizer!r} with options {dict(aggregation.optimizer_options)} "
            "needs the plaintext aggregate (use fedavg without options)"
        )
    if aggregation.robust is not None or aggregation.clip_norm:
        raise ValueError(
            "robust rules and norm clipping need plaintext updates; under homomorphic "
            "aggregation learners clip their values to the encryption settings' clip instead"
        )
