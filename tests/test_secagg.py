"""SecAgg+ through the real Rust core (X25519, ChaCha20, ChaCha20-Poly1305, Shamir): the mean
of the survivors' updates comes out of masked inputs, dropouts are survived, and too many
dropouts void the round with a clear error."""

from __future__ import annotations

import numpy as np
import pytest

from metis_async._core import SecAggError, SecAggLearner
from metis_async.secure import SecAggSettings, run_round


def _updates(n: int, size: int = 2000) -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    return [rng.uniform(-0.5, 0.5, size).astype(np.float32) for _ in range(n)]


def test_the_round_gives_the_mean_of_the_updates() -> None:
    settings = SecAggSettings.for_learners(10)
    updates = _updates(10)

    mean = run_round(settings, updates)

    step = 2 * settings.clip / (2**settings.bits - 1)
    np.testing.assert_allclose(mean, np.mean(updates, axis=0), atol=step)


def test_learners_dropping_after_sharing_are_left_out_of_the_mean() -> None:
    settings = SecAggSettings(learners=12, neighbours=6, threshold=4, bits=20)
    updates = _updates(12)

    mean = run_round(settings, updates, drop_after_sharing={3, 8})

    kept = [u for i, u in enumerate(updates) if i not in {3, 8}]
    np.testing.assert_allclose(mean, np.mean(kept, axis=0), atol=2 / (2**20 - 1))


def test_learners_dropping_after_their_input_are_counted() -> None:
    settings = SecAggSettings(learners=12, neighbours=6, threshold=4, bits=20)
    updates = _updates(12)

    mean = run_round(settings, updates, drop_after_input={5})

    np.testing.assert_allclose(mean, np.mean(updates, axis=0), atol=2 / (2**20 - 1))


def test_too_many_dropouts_raise_and_aggregate_nothing() -> None:
    settings = SecAggSettings(learners=10, neighbours=4, threshold=3)

    with pytest.raises(SecAggError, match="too many learners dropped"):
        run_round(settings, _updates(10), drop_after_sharing={8, 9, 1})


def test_a_masked_input_hides_the_update() -> None:
    settings = SecAggSettings(learners=6, neighbours=4, threshold=3, round_id=b"r")
    args = (settings.round_id, 6, 4, 3)
    learners = [SecAggLearner(*args, i) for i in range(6)]
    keys = {i: learner.advertise() for i, learner in enumerate(learners)}
    for i, learner in enumerate(learners):
        for to, sealed in learner.share(keys):
            learners[to].receive(i, sealed)

    masked = learners[0].masked_input(np.zeros(100_000, np.float32))  # a constant update

    counts = np.bincount(masked >> 28, minlength=16)
    expected = masked.size / 16
    assert ((counts - expected) ** 2 / expected).sum() < 45.0  # chi-square, 15 dof, p < 1e-4


def test_a_tampered_share_is_refused() -> None:
    args = (b"r", 4, 3, 2)
    learners = [SecAggLearner(*args, i) for i in range(4)]
    keys = {i: learner.advertise() for i, learner in enumerate(learners)}
    mail = learners[1].share(keys)
    to, sealed = mail[0]
    tampered = bytes([sealed[0] ^ 1]) + sealed[1:]
    learners[to].share(keys)  # learns its neighbours' keys
    learners[to].receive(1, tampered)

    with pytest.raises(SecAggError, match="do not authenticate"):
        learners[to].unmask({to, 1}, set())


def test_settings_whose_sum_could_wrap_are_refused() -> None:
    with pytest.raises(SecAggError, match="wrap"):
        SecAggLearner(b"r", 300, 10, 6, 0, 1.0, 24)
