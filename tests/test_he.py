"""Homomorphic aggregation with the real BFV encryption (rust/core/src/he, metis_async.secure):
learners encrypt, a keyless sum adds, learners decrypt the weighted average."""

from __future__ import annotations

import base64
import json
import stat
from pathlib import Path

import numpy as np
import pytest

from metis_async._core import EncryptionError, HeContext
from metis_async.cli import main
from metis_async.secure import (
    CONTROLLER_FILE,
    LEARNER_FILE,
    PUBLIC_FILE,
    HeSettings,
    key_id,
    read_controller_settings,
    read_learner_keys,
)

STEP = 2.0**-16  # the default fixed-point step


@pytest.fixture(scope="module")
def keys() -> tuple[HeContext, bytes, bytes]:
    ctx = HeSettings().context()
    secret, public = ctx.generate_keys()
    return ctx, secret, public


def test_the_decrypted_sum_is_the_weighted_average_of_the_updates(
    keys: tuple[HeContext, bytes, bytes],
) -> None:
    ctx, secret, public = keys
    rng = np.random.default_rng(1)
    updates = [rng.normal(0, 0.1, 10_000).astype(np.float32) for _ in range(3)]
    weights = [5, 1, 2]
    total = ctx.sum()

    for update, weight in zip(updates, weights, strict=True):
        total.add(ctx.encrypt(public, update), weight)
    average = ctx.decrypt(secret, total.ciphertexts(), 10_000, total.total_weight)

    expected = np.average(np.stack(updates), axis=0, weights=weights)
    np.testing.assert_allclose(average, expected, atol=STEP)
    assert (total.total_weight, total.count, len(total)) == (8, 3, ctx.ciphertexts_for(10_000))


def test_ciphertexts_reveal_nothing_to_a_different_key(
    keys: tuple[HeContext, bytes, bytes],
) -> None:
    ctx, _, public = keys
    other_secret, _ = ctx.generate_keys()
    update = np.full(4096, 0.5, np.float32)

    wrong = ctx.decrypt(other_secret, ctx.encrypt(public, update), 4096)

    assert np.abs(wrong - update).mean() > 1.0  # noise, not the update


def test_encrypting_twice_gives_different_ciphertexts(
    keys: tuple[HeContext, bytes, bytes],
) -> None:
    ctx, _, public = keys
    update = np.zeros(100, np.float32)

    assert ctx.encrypt(public, update) != ctx.encrypt(public, update)


def test_a_tampered_ciphertext_is_refused_and_the_sum_is_unchanged(
    keys: tuple[HeContext, bytes, bytes],
) -> None:
    ctx, _, public = keys
    total = ctx.sum()
    good = ctx.encrypt(public, np.ones(5000, np.float32))
    total.add(good, 1)
    before = total.ciphertexts()
    tampered = [good[0], good[1][:-8]]

    with pytest.raises(EncryptionError, match="bytes; expected"):
        total.add(tampered, 1)

    assert total.ciphertexts() == before
    assert (total.total_weight, total.count) == (1, 1)


def test_a_sum_beyond_the_settings_total_weight_is_refused(
    keys: tuple[HeContext, bytes, bytes],
) -> None:
    ctx, _, public = keys
    total = ctx.sum()

    with pytest.raises(EncryptionError, match="max_total_weight"):
        total.add(ctx.encrypt(public, np.ones(10, np.float32)), ctx.max_total_weight + 1)


def test_settings_that_could_overflow_are_refused_with_the_bound_named() -> None:
    with pytest.raises(EncryptionError, match="plaintext modulus"):
        HeSettings(max_total_weight=1 << 22).context()


def test_settings_below_128_bit_security_are_refused() -> None:
    with pytest.raises(EncryptionError, match="128-bit"):
        HeSettings(moduli_bits=(60, 60)).context()


def test_nan_is_refused_before_encryption(keys: tuple[HeContext, bytes, bytes]) -> None:
    ctx, _, public = keys

    with pytest.raises(EncryptionError, match="index 2"):
        ctx.encrypt(public, np.array([0.0, 1.0, np.nan], np.float32))


# ---------------------------------------------------------------------------------- key files


def test_he_init_gives_the_controller_no_key(tmp_path: Path) -> None:
    assert main(["keys", "he-init", str(tmp_path)]) == 0
    learner = read_learner_keys(tmp_path / LEARNER_FILE)
    secret_forms = [learner.secret_key, base64.b64encode(learner.secret_key)]
    controller_files = [tmp_path / CONTROLLER_FILE]  # all `serve` is given

    for path in controller_files:
        data = path.read_bytes()
        document = json.loads(data)
        assert set(document) == {"format", "settings", "fingerprint"}
        assert document["fingerprint"] == key_id(learner.public_key)  # SHA-256: public
        assert not any(form[:64] in data for form in secret_forms)
        assert b"key" not in data
    assert stat.S_IMODE((tmp_path / LEARNER_FILE).stat().st_mode) == 0o600


def test_the_controller_sums_with_its_file_alone_and_learners_decrypt(tmp_path: Path) -> None:
    main(["keys", "he-init", str(tmp_path)])
    learner = read_learner_keys(tmp_path / LEARNER_FILE)
    controller = read_controller_settings(tmp_path / CONTROLLER_FILE).context()
    learner_ctx = learner.settings.context()
    updates = [np.full(100, v, np.float32) for v in (0.25, 0.75)]
    total = controller.sum()

    for update in updates:
        total.add(learner_ctx.encrypt(learner.public_key, update), 1)
    average = learner_ctx.decrypt(learner.secret_key, total.ciphertexts(), 100, 2)

    np.testing.assert_array_equal(average, np.full(100, 0.5, np.float32))


def test_a_key_file_is_refused_as_the_controllers_settings(tmp_path: Path) -> None:
    main(["keys", "he-init", str(tmp_path)])

    for name in (LEARNER_FILE, PUBLIC_FILE):
        with pytest.raises(ValueError, match="must carry no key"):
            read_controller_settings(tmp_path / name)


def test_he_init_refuses_settings_that_could_overflow(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["keys", "he-init", str(tmp_path), "--max-total-weight", "4000000"])

    assert code == 2
    assert "plaintext modulus" in capsys.readouterr().err
    assert not (tmp_path / LEARNER_FILE).exists()
