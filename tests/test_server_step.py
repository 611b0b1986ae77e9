"""ServerStep: how accepted updates become the next version (optimizers, robust rules, clipping)."""

from __future__ import annotations

import numpy as np
import pytest

from metis_async.aggregation.server_step import AggregationSettings, CommitRefused, ServerStep


def _vec(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32)


def test_fedavg_commit_is_base_plus_weighted_mean_of_deltas() -> None:
    step = ServerStep(2)
    step.add(_vec(1, 2), 1.0)
    step.add(_vec(5, 6), 3.0)

    new = step.commit(_vec(10, 10))

    np.testing.assert_allclose(new, _vec(14, 15))
    assert step.count == 0


def test_relative_commit_mixes_weights_like_fedasync() -> None:
    step = ServerStep(2)
    step.add(_vec(4, 8), 1.0)

    new = step.commit(_vec(0, 0), scale=0.25, relative=True)

    np.testing.assert_allclose(new, _vec(1, 2))  # (1 - 0.25) * 0 + 0.25 * x_new


def test_unnormalized_commit_scales_the_weighted_sum_like_fedbuff() -> None:
    step = ServerStep(1)
    step.add(_vec(2), 0.5)
    step.add(_vec(4), 1.0)

    new = step.commit(_vec(0), scale=0.5, normalize=False)

    np.testing.assert_allclose(new, _vec(0.5 * (0.5 * 2 + 4)))


def test_fedavgm_matches_a_numpy_momentum_reference() -> None:
    step = ServerStep(
        3, AggregationSettings(optimizer="fedavgm", optimizer_options={"lr": 1.0, "momentum": 0.9})
    )
    rng = np.random.default_rng(0)
    x = rng.standard_normal(3).astype(np.float32)
    ref, m = x.astype(np.float64), np.zeros(3)

    for _ in range(3):
        d = rng.standard_normal(3).astype(np.float32)
        step.add(d, 2.0)
        x = step.commit(x)
        m = 0.9 * m + d
        ref = ref + m

    np.testing.assert_allclose(x, ref, rtol=1e-5)
    assert set(step.state())


def test_fedadam_steps_in_the_direction_of_the_delta() -> None:
    step = ServerStep(2, AggregationSettings(optimizer="fedadam", optimizer_options={"lr": 0.1}))
    step.add(_vec(1, -1), 1.0)

    new = step.commit(_vec(0, 0))

    assert new[0] > 0 > new[1]


@pytest.mark.parametrize("rule", ["median", "trimmed_mean", "multi_krum", "krum"])
def test_robust_rules_ignore_a_sign_flipped_outlier(rule: str) -> None:
    settings = AggregationSettings(robust=rule, trim_beta=0.2, byzantine=1)  # type: ignore[arg-type]
    step = ServerStep(4, settings)
    rng = np.random.default_rng(1)
    for _ in range(6):
        step.add((1 + 0.01 * rng.standard_normal(4)).astype(np.float32), 1.0)
    step.add(np.full(4, -100.0, np.float32), 1.0)

    new = step.commit(np.zeros(4, np.float32))

    np.testing.assert_allclose(new, np.ones(4), atol=0.05)


def test_mean_is_dragged_by_the_same_outlier() -> None:
    step = ServerStep(4)
    for _ in range(6):
        step.add(np.ones(4, np.float32), 1.0)
    step.add(np.full(4, -100.0, np.float32), 1.0)

    new = step.commit(np.zeros(4, np.float32))

    assert new[0] < -10


def test_clip_norm_bounds_each_update() -> None:
    step = ServerStep(2, AggregationSettings(clip_norm=1.0))
    step.add(_vec(30, 40), 1.0)

    new = step.commit(_vec(0, 0))

    np.testing.assert_allclose(new, _vec(0.6, 0.8), rtol=1e-6)


def test_commit_without_updates_raises_and_keeps_nothing() -> None:
    step = ServerStep(2)

    with pytest.raises(ValueError, match="nothing to commit"):
        step.commit(_vec(0, 0))


def test_robust_add_rejects_wrong_length_without_keeping_it() -> None:
    step = ServerStep(3, AggregationSettings(robust="median"))

    with pytest.raises(ValueError, match="update has 2 values, the model has 3"):
        step.add(_vec(1, 2), 1.0)
    assert step.count == 0


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("optimizer", "fedsgd", "unknown optimizer"),
        ("robust", "mode", "unknown robust rule"),
        ("trim_beta", 0.5, "trim_beta"),
        ("clip_norm", -1.0, "clip_norm"),
    ],
)
def test_invalid_aggregation_settings_are_named(field: str, value: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        AggregationSettings(**{field: value})  # type: ignore[arg-type]


def test_optimizer_hyperparameters_are_checked_when_settings_are_made() -> None:
    with pytest.raises(ValueError, match="fedadam does not take momentum"):
        AggregationSettings(optimizer="fedadam", optimizer_options={"momentum": 0.9})


# ------------------------------------------------------------------ finite commits (issue 7)

HUGE = 3e38  # finite in float32 (max 3.4e38); the sum or difference of two overflows


def test_fedasync_mix_of_huge_finite_values_is_exact_not_infinite() -> None:
    step = ServerStep(2)
    base = _vec(-HUGE, HUGE)
    step.add(_vec(HUGE, -HUGE), 1.0)

    new = step.commit(base, scale=0.6, relative=True)

    expected = 0.4 * base.astype(np.float64) + 0.6 * np.array([HUGE, -HUGE])
    np.testing.assert_allclose(new, expected, rtol=1e-6)


def test_fedasync_with_an_optimizer_refuses_an_overflowing_delta_and_keeps_its_state() -> None:
    settings = AggregationSettings(optimizer="fedavgm", optimizer_options={"momentum": 0.9})
    step = ServerStep(2, settings)
    base = _vec(-HUGE, HUGE)
    step.add(_vec(HUGE, -HUGE), 1.0)

    with pytest.raises(CommitRefused, match="not finite at index 0"):
        step.commit(base, scale=0.6, relative=True)

    np.testing.assert_array_equal(base, _vec(-HUGE, HUGE))
    assert step.count == 0
    np.testing.assert_array_equal(step.state()["m"], np.zeros(2, np.float32))


def test_buffered_robust_commit_that_overflows_is_refused_and_the_model_stays() -> None:
    step = ServerStep(2, AggregationSettings(robust="median"))
    base = _vec(HUGE, 0)
    for _ in range(2):
        step.add(_vec(HUGE, 1), 1.0)

    with pytest.raises(CommitRefused, match=r"2 updates with median refused.*index 0"):
        step.commit(base, scale=1 / 2, normalize=False)  # FedBuff: K = 2

    np.testing.assert_array_equal(base, _vec(HUGE, 0))
    assert step.count == 0


def test_robust_unnormalized_commit_does_not_overflow_on_the_way() -> None:
    step = ServerStep(1, AggregationSettings(robust="median"))
    for _ in range(2):
        step.add(_vec(HUGE), 1.0)

    new = step.commit(_vec(0), scale=1 / 2, normalize=False)

    np.testing.assert_allclose(new, _vec(HUGE), rtol=1e-6)


def test_fused_rust_commit_that_overflows_is_refused_and_the_aggregate_dropped() -> None:
    step = ServerStep(2)
    step.add(_vec(HUGE, 1), 1.0)

    with pytest.raises(CommitRefused, match="1 update with mean refused"):
        step.commit(_vec(HUGE, 0))

    assert step.count == 0


@pytest.mark.parametrize("optimizer", ["fedavgm", "fedadam", "fedyogi", "fedadagrad"])
def test_optimizer_commit_that_overflows_does_not_advance_the_optimizer(optimizer: str) -> None:
    step = ServerStep(2, AggregationSettings(optimizer=optimizer, optimizer_options={"lr": 1.0}))
    step.add(_vec(1, 1), 1.0)
    x = step.commit(_vec(0, 0))
    before = {k: v.copy() for k, v in step.state().items()}
    step.add(_vec(HUGE, 1), 1.0)
    big = _vec(HUGE, 0) if optimizer == "fedavgm" else np.full(2, np.finfo(np.float32).max)

    with pytest.raises(CommitRefused):
        step.commit(big.astype(np.float32))

    after = step.state()
    assert after.keys() == before.keys()
    for key in before:
        np.testing.assert_array_equal(after[key], before[key])
    assert step.count == 0
    assert np.isfinite(x).all()


def test_krum_with_too_few_updates_is_refused_naming_rule_and_count() -> None:
    step = ServerStep(2, AggregationSettings(robust="krum", byzantine=1))
    for _ in range(3):
        step.add(_vec(1, 1), 1.0)

    with pytest.raises(CommitRefused, match=r"3 updates with krum \(byzantine=1\)"):
        step.commit(_vec(0, 0))

    assert step.count == 0


# ------------------------------------------------------------- FedAsync clipping (issue 7)


@pytest.mark.parametrize("fold_window", [1, 8])
def test_fedasync_clip_norm_clips_the_move_not_the_uploaded_model(fold_window: int) -> None:
    rng = np.random.default_rng(2)
    base = rng.standard_normal(5).astype(np.float32) * 10
    upload = base + rng.standard_normal(5).astype(np.float32)
    step = ServerStep(5, AggregationSettings(clip_norm=0.5, fold_window=fold_window))
    step.add(upload, 1.0)

    new = step.commit(base, scale=0.6, relative=True)

    move = upload.astype(np.float64) - base
    expected = base + 0.6 * move * min(1.0, 0.5 / float(np.linalg.norm(move)))
    np.testing.assert_allclose(new, expected, rtol=1e-5, atol=1e-6)


def test_clip_norm_still_clips_deltas_beyond_the_fold_window() -> None:
    step = ServerStep(2, AggregationSettings(clip_norm=1.0, fold_window=2))
    for _ in range(5):
        step.add(_vec(30, 40), 1.0)

    new = step.commit(_vec(0, 0))

    np.testing.assert_allclose(new, _vec(0.6, 0.8), rtol=1e-6)
