"""Multiparty BFV with the real extension and real keys (rust/core/src/he/multiparty.rs,
metis_async.secure.multiparty): a committee of 3 builds a collective key, learners encrypt
under it, a keyless sum adds, and only all 3 decryption shares together decrypt."""

from __future__ import annotations

import base64
import json
import stat
from pathlib import Path

import numpy as np
import pytest

from metis_async._core import EncryptionError, HeParty, he_smudging
from metis_async.secure.he import HeSettings
from metis_async.secure.multiparty import (
    COMMITTEE_FILE,
    Committee,
    PartyKeys,
    create_committee_files,
    create_party_file,
    new_crs,
    party_file_name,
    read_committee_file,
    read_party_file,
)

STEP = 2.0**-16  # the default fixed-point step
LENGTH = 10_000  # 3 ciphertexts at degree 4096


@pytest.fixture(scope="module")
def committee_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("committee")
    create_committee_files(directory, parties=3)
    return directory


@pytest.fixture(scope="module")
def committee(committee_dir: Path) -> Committee:
    return read_committee_file(committee_dir / COMMITTEE_FILE)


@pytest.fixture(scope="module")
def members(committee_dir: Path) -> list[PartyKeys]:
    return [read_party_file(committee_dir / party_file_name(i)) for i in range(3)]


def weighted_sum(committee: Committee) -> tuple[list[bytes], int, np.ndarray]:
    """Three learners' updates encrypted under the collective key, summed with weights 5, 1, 2
    by a context built from the committee file alone; and the expected weighted average."""
    rng = np.random.default_rng(1)
    updates = [rng.normal(0, 0.1, LENGTH).astype(np.float32) for _ in range(3)]
    weights = [5, 1, 2]
    ctx = committee.context()
    total = ctx.sum()
    for update, weight in zip(updates, weights, strict=True):
        total.add(ctx.encrypt(committee.public_key, update), weight)
    expected = np.average(np.stack(updates), axis=0, weights=weights)
    return total.ciphertexts(), total.total_weight, expected


def test_the_collective_key_of_three_parties_encrypts(committee: Committee) -> None:
    ctx = committee.context()

    ciphertexts = ctx.encrypt(committee.public_key, np.ones(LENGTH, np.float32))

    assert len(ciphertexts) == ctx.ciphertexts_for(LENGTH) == 3
    assert all(len(c) == committee.settings.ciphertext_bytes for c in ciphertexts)
    assert len(committee.key_id) == 64


def test_all_three_shares_decrypt_the_weighted_mean(
    committee: Committee, members: list[PartyKeys]
) -> None:
    ciphertexts, total_weight, expected = weighted_sum(committee)

    shares = [m.party.decryption_shares(ciphertexts) for m in members]
    average = committee.decrypt(ciphertexts, shares, LENGTH, total_weight)

    np.testing.assert_allclose(average, expected, atol=STEP)


def test_the_order_of_the_parties_does_not_matter(
    committee: Committee, members: list[PartyKeys]
) -> None:
    ciphertexts, total_weight, expected = weighted_sum(committee)

    shares = [m.party.decryption_shares(ciphertexts) for m in reversed(members)]
    average = committee.decrypt(ciphertexts, shares, LENGTH, total_weight)

    np.testing.assert_allclose(average, expected, atol=STEP)


def test_two_of_three_shares_cannot_decrypt(committee: Committee, members: list[PartyKeys]) -> None:
    ciphertexts, total_weight, _ = weighted_sum(committee)
    shares = [m.party.decryption_shares(ciphertexts) for m in members[:2]]

    with pytest.raises(EncryptionError, match=r"P-of-P\); missing parties \[2\]"):
        committee.decrypt(ciphertexts, shares, LENGTH, total_weight)


def test_a_share_for_another_ciphertext_is_refused(
    committee: Committee, members: list[PartyKeys]
) -> None:
    ciphertexts, total_weight, _ = weighted_sum(committee)
    shares = [m.party.decryption_shares(ciphertexts) for m in members]
    shares[2] = [shares[2][1], shares[2][0], shares[2][2]]

    with pytest.raises(EncryptionError, match=r"party 2 .* made for another ciphertext"):
        committee.decrypt(ciphertexts, shares, LENGTH, total_weight)


def test_the_controller_side_holds_no_secret(
    committee_dir: Path, committee: Committee, members: list[PartyKeys]
) -> None:
    secrets = [m.party.secret() for m in members]
    secret_forms = [form for s in secrets for form in (s[44:108], base64.b64encode(s)[60:124])]
    data = (committee_dir / COMMITTEE_FILE).read_bytes()

    document = json.loads(data)

    assert set(document) == {"format", "settings", "crs", "parties", "public_key", "key_id"}
    assert not any(form in data for form in secret_forms)
    assert set(Committee.__dataclass_fields__) == {"settings", "crs", "parties", "public_key"}


def test_party_files_are_private_and_survive_a_restart(
    committee_dir: Path, members: list[PartyKeys]
) -> None:
    path = committee_dir / party_file_name(1)

    again = read_party_file(path)

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert again.party.key_share() == members[1].party.key_share()
    assert (again.party.index, again.party.parties) == (1, 3)


def test_a_committee_assembled_share_by_share_decrypts(tmp_path: Path) -> None:
    settings = HeSettings()
    committee = Committee(settings, new_crs(), parties=2)
    shares = [
        create_party_file(tmp_path / party_file_name(i), settings, i, 2, committee.crs)
        for i in range(2)
    ]
    committee = committee.with_public_key(shares)
    members = [read_party_file(tmp_path / party_file_name(i)).party for i in range(2)]
    update = np.linspace(-1, 1, 5000, dtype=np.float32)
    ciphertexts = committee.context().encrypt(committee.public_key, update)

    out = committee.decrypt(ciphertexts, [m.decryption_shares(ciphertexts) for m in members], 5000)

    np.testing.assert_allclose(out, update, atol=STEP)


def test_key_shares_of_another_committee_are_refused(committee: Committee) -> None:
    stranger = HeParty(committee.context(), 0, 3, new_crs())
    shares = [stranger.key_share()] * 3

    with pytest.raises(EncryptionError, match="committee"):
        committee.with_public_key(shares)


def test_a_malformed_party_secret_is_refused(committee: Committee) -> None:
    with pytest.raises(EncryptionError, match="party secret"):
        HeParty.from_secret(committee.context(), b"MPS1 not a secret")


def test_the_smudging_noise_of_the_defaults_is_documented(committee: Committee) -> None:
    three = committee.smudging()
    bits, margin = he_smudging(committee.context(), 10)

    assert (three[0], bits) == (65, 63)
    assert (three[1], margin) == (pytest.approx(22.7, abs=0.1), pytest.approx(19.0, abs=0.1))
