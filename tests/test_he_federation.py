"""Homomorphic aggregation through the real controller (HOMOMORPHIC AGGREGATION in the proto):
learners encrypt under the federation's key, the controller sums ciphertexts holding no key,
learners decrypt the new versions. Real gRPC on loopback, real BFV keys."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from metis_async.cli import main
from metis_async.client import Backoff, LearnerStopped, run_learner
from metis_async.config import load_settings
from metis_async.protocols import (
    AsynchronousPolicy,
    AsynchronousSettings,
    BufferedPolicy,
    BufferedSettings,
    SemiSynchronousPolicy,
    SemiSynchronousSettings,
    TrainSettings,
)
from metis_async.secure.aggregate import HomomorphicAggregation, split_version
from metis_async.secure.he import (
    HeSettings,
    LearnerKeys,
    create_he_keys,
    read_controller_file,
    read_learner_keys,
    read_public_file,
)
from metis_async.secure.multiparty import (
    COMMITTEE_FILE,
    Committee,
    PartyKeys,
    create_committee_files,
    party_file_name,
    read_committee_file,
    read_party_file,
)
from metis_async.server import Controller, ControllerConfig
from metis_async.v1 import controller_pb2 as pb
from tests.conftest import (
    ControllerThread,
    RawLearner,
    ShiftLearner,
    run_in_threads,
    sync_policy,
)

Factory = Callable[..., ControllerThread]
SETTINGS = HeSettings()  # the defaults: N 4096, 109-bit q, t 2^40


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[HomomorphicAggregation, LearnerKeys]:
    directory = tmp_path_factory.mktemp("he")
    controller_file, learner_file, _ = create_he_keys(directory, SETTINGS)
    settings, key_id = read_controller_file(controller_file)
    return HomomorphicAggregation(settings, key_id), read_learner_keys(learner_file)


def run_encrypted(
    address: str, learners: dict[str, tuple[float, int]], keys: LearnerKeys
) -> list[Any]:
    """Reference learners (shift, examples) with the federation's keys, in threads."""
    shifted = {lid: ShiftLearner(shift, n) for lid, (shift, n) in learners.items()}
    return run_in_threads(address, shifted, he_keys=keys)


def test_rounds_commit_the_encrypted_weighted_average(
    controller_factory: Factory, keys: tuple[HomomorphicAggregation, LearnerKeys]
) -> None:
    he, learner_keys = keys
    ct = controller_factory(sync_policy(min_learners=3, rounds=2), he=he)
    learners = {"a": (0.1, 1), "b": (0.2, 2), "c": (0.3, 3)}  # within the clip of 4

    summaries = run_encrypted(ct.address, learners, learner_keys)

    assert all(not isinstance(s, BaseException) for s in summaries), summaries
    step = (0.1 * 1 + 0.2 * 2 + 0.3 * 3) / 6  # weighted by num_examples, each round
    for summary in summaries:
        assert summary.final_version == 2
        np.testing.assert_allclose(summary.final_parameters[0], np.full(10, 2 * step), atol=1e-4)


def test_values_beyond_the_clip_are_clipped(
    controller_factory: Factory, keys: tuple[HomomorphicAggregation, LearnerKeys]
) -> None:
    he, learner_keys = keys
    ct = controller_factory(sync_policy(min_learners=2, rounds=1), he=he)

    summaries = run_encrypted(ct.address, {"a": (9.0, 1), "b": (-1.0, 1)}, learner_keys)

    expected = (he.settings.clip + -1.0) / 2  # 9 is clipped to 4 before encryption
    for summary in summaries:
        np.testing.assert_allclose(summary.final_parameters[0], np.full(10, expected), atol=1e-4)


def test_the_controller_holds_only_ciphertexts(
    controller_factory: Factory, keys: tuple[HomomorphicAggregation, LearnerKeys]
) -> None:
    he, learner_keys = keys
    ct = controller_factory(sync_policy(min_learners=2, rounds=1), he=he)

    run_encrypted(ct.address, {"a": (1.0, 1), "b": (2.0, 1)}, learner_keys)

    assert ct.wait_finished(10)
    assert ct.read(lambda: ct.controller.store.encrypted)
    with pytest.raises(RuntimeError, match="encrypted"):
        ct.model()
    blob = ct.read(lambda: np.array(ct.controller.core.model))
    divisor, body = split_version(blob, he.settings.ciphertext_bytes)
    assert divisor == 2
    assert len(body) == he.settings.ciphertext_bytes  # 10 values: one ciphertext
    # the learners' values (1.5 x 2^16 after averaging) appear nowhere in the clear
    assert np.frombuffer(body[4:], dtype="<u8").max() > 2**40


def test_a_learner_without_he_is_refused(
    controller_factory: Factory, keys: tuple[HomomorphicAggregation, LearnerKeys]
) -> None:
    ct = controller_factory(sync_policy(min_learners=1), he=keys[0])
    raw = RawLearner(ct.address, capabilities=["train"])

    with pytest.raises(grpc.RpcError) as failure:
        raw.drain()

    assert failure.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "homomorphic" in (failure.value.details() or "")
    raw.close()


def _first_task(raw: RawLearner) -> pb.TrainTask:
    welcome = raw.until("welcome").welcome
    assert welcome.HasField("he")
    return raw.until("train").train


def test_a_malformed_ciphertext_ends_the_stream_and_leaves_the_model(
    controller_factory: Factory, keys: tuple[HomomorphicAggregation, LearnerKeys]
) -> None:
    he = keys[0]
    ct = controller_factory(sync_policy(min_learners=1, rounds=1), he=he)
    raw = RawLearner(ct.address, capabilities=["train", "he"])
    task = _first_task(raw)
    assert not task.upload_delta  # full trained models under HE
    size = he.settings.ciphertext_bytes
    header = pb.Payload(
        payload_id=1,
        kind=pb.PAYLOAD_KIND_WEIGHTS,
        dtype=pb.DTYPE_BFV,
        total_bytes=size,
        num_chunks=1,
        layout_id=ct.read(lambda: ct.controller.store.layout.layout_id),
    )
    garbage = b"MAC2" + b"\xff" * (size - 4)  # every coefficient beyond its modulus

    result = pb.TaskResult(task_id=task.task_id, base_version=0, payload=header, num_examples=1)
    raw.send(pb.LearnerMessage(result=result))
    raw.send(pb.LearnerMessage(chunk=pb.Chunk(payload_id=1, index=0, data=garbage)))

    with pytest.raises(grpc.RpcError) as failure:
        raw.drain()
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "modulus" in (failure.value.details() or "")
    assert ct.read(lambda: ct.controller.version) == 0
    raw.close()


def test_a_plaintext_upload_is_refused(
    controller_factory: Factory, keys: tuple[HomomorphicAggregation, LearnerKeys]
) -> None:
    ct = controller_factory(sync_policy(min_learners=1, rounds=1), he=keys[0])
    raw = RawLearner(ct.address, capabilities=["train", "he"])
    task = _first_task(raw)
    header = pb.Payload(
        payload_id=1,
        kind=pb.PAYLOAD_KIND_WEIGHTS,
        dtype=pb.DTYPE_FLOAT32,
        total_bytes=40,
        num_chunks=1,
        layout_id=ct.read(lambda: ct.controller.store.layout.layout_id),
    )

    result = pb.TaskResult(task_id=task.task_id, base_version=0, payload=header, num_examples=1)
    raw.send(pb.LearnerMessage(result=result))

    with pytest.raises(grpc.RpcError) as failure:
        raw.drain()
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "DTYPE_BFV" in (failure.value.details() or "")
    raw.close()


def test_a_learner_with_another_key_stops(
    controller_factory: Factory,
    keys: tuple[HomomorphicAggregation, LearnerKeys],
    tmp_path: Path,
) -> None:
    ct = controller_factory(sync_policy(min_learners=1), he=keys[0])
    _, other_file, _ = create_he_keys(tmp_path, SETTINGS)

    with pytest.raises(LearnerStopped, match="another federation's key"):
        run_learner(
            ct.address,
            ShiftLearner(1.0, 1),
            he_keys=read_learner_keys(other_file),
            backoff=Backoff(initial_seconds=0.05, max_attempts=3),
        )


def test_round_less_policies_need_the_public_key(
    keys: tuple[HomomorphicAggregation, LearnerKeys],
) -> None:
    policy = BufferedPolicy(BufferedSettings(buffer_size=2))

    with pytest.raises(ValueError, match="needs the federation's public key"):
        Controller(policy, ControllerConfig(port=0, he=keys[0]))


@pytest.mark.parametrize(
    ("policy", "step", "workers"),
    [
        # FedAsync: alpha 0.6 at staleness 0, quantized to multiples of 1/4096
        (AsynchronousPolicy(AsynchronousSettings(rounds=3)), round(4096 * 0.6) / 4096, 1),
        (BufferedPolicy(BufferedSettings(buffer_size=1, rounds=3)), 1.0, 1),
        # with ingest workers, encrypted deltas are forwarded whole to the core
        (BufferedPolicy(BufferedSettings(buffer_size=1, rounds=3)), 1.0, 2),
    ],
    ids=["asynchronous", "buffered", "buffered-workers"],
)
def test_round_less_policies_step_on_ciphertexts(
    controller_factory: Factory,
    keys: tuple[HomomorphicAggregation, LearnerKeys],
    policy: Any,
    step: float,
    workers: int,
) -> None:
    he, learner_keys = keys
    with_key = replace(he, public_key=learner_keys.public_key)
    ct = controller_factory(policy, he=with_key, workers=workers)

    (summary,) = run_encrypted(ct.address, {"a": (0.1, 1)}, learner_keys)

    assert summary.final_version == 3
    np.testing.assert_allclose(summary.final_parameters[0], np.full(10, 3 * step * 0.1), atol=1e-4)


# ------------------------------------------------------------------------- multiparty keys


@pytest.fixture(scope="module")
def committee(tmp_path_factory: pytest.TempPathFactory) -> tuple[Committee, list[PartyKeys]]:
    paths = create_committee_files(tmp_path_factory.mktemp("committee"), 3)
    return read_committee_file(paths[0]), [read_party_file(p) for p in paths[1:]]


def run_committee(
    address: str,
    learners: dict[str, tuple[float, int]],
    committee: Committee,
    parties: dict[str, PartyKeys],
    size: int = 10,
) -> list[Any]:
    """Reference learners under multiparty keys; those in `parties` are committee members."""
    shifted = {lid: ShiftLearner(shift, n, size=size) for lid, (shift, n) in learners.items()}
    return run_in_threads(
        address,
        shifted,
        lambda lid: {"he_party": parties.get(lid)},
        he_committee=committee,
    )


def test_a_committee_decrypts_each_version_together(
    controller_factory: Factory, committee: tuple[Committee, list[PartyKeys]]
) -> None:
    public, parties = committee
    members = ("a", "b", "c")
    he = HomomorphicAggregation(public.settings, public.key_id, committee=members)
    ct = controller_factory(sync_policy(min_learners=4, rounds=2), he=he)
    learners = {"a": (0.1, 1), "b": (0.2, 2), "c": (0.3, 3), "outsider": (0.0, 4)}

    summaries = run_committee(
        ct.address, learners, public, dict(zip(members, parties, strict=True))
    )

    assert all(not isinstance(s, BaseException) for s in summaries), summaries
    step = (0.1 * 1 + 0.2 * 2 + 0.3 * 3 + 0.0 * 4) / 10
    for summary in summaries:
        assert summary.final_version == 2
        np.testing.assert_allclose(summary.final_parameters[0], np.full(10, 2 * step), atol=1e-4)


def test_a_committee_decrypts_through_ingest_workers(
    controller_factory: Factory, committee: tuple[Committee, list[PartyKeys]]
) -> None:
    # Members land on either worker: each worker's relay gets the others' shares via the core.
    public, parties = committee
    members = ("a", "b", "c")
    he = HomomorphicAggregation(public.settings, public.key_id, committee=members)
    ct = controller_factory(sync_policy(min_learners=5, rounds=2), he=he, workers=2)
    learners = {"a": (0.1, 1), "b": (0.2, 2), "c": (0.3, 3), "d": (0.0, 4), "e": (0.5, 2)}

    summaries = run_committee(
        ct.address, learners, public, dict(zip(members, parties, strict=True))
    )

    assert all(not isinstance(s, BaseException) for s in summaries), summaries
    step = (0.1 * 1 + 0.2 * 2 + 0.3 * 3 + 0.0 * 4 + 0.5 * 2) / 12
    for summary in summaries:
        assert summary.final_version == 2
        np.testing.assert_allclose(summary.final_parameters[0], np.full(10, 2 * step), atol=1e-4)


def test_members_that_do_not_train_still_decrypt(
    controller_factory: Factory, committee: tuple[Committee, list[PartyKeys]]
) -> None:
    public, parties = committee
    members = ("a", "b", "c")
    he = HomomorphicAggregation(public.settings, public.key_id, committee=members)
    policy = sync_policy(min_learners=3, learners_per_round=2, rounds=3)
    ct = controller_factory(policy, he=he)
    learners = {lid: (0.1, 1) for lid in members}  # any two of them: +0.1 a round

    summaries = run_committee(
        ct.address, learners, public, dict(zip(members, parties, strict=True))
    )

    assert all(not isinstance(s, BaseException) for s in summaries), summaries
    for summary in summaries:
        np.testing.assert_allclose(summary.final_parameters[0], np.full(10, 0.3), atol=1e-4)


def test_a_share_from_a_non_member_ends_its_stream(
    controller_factory: Factory, committee: tuple[Committee, list[PartyKeys]]
) -> None:
    public, _ = committee
    he = HomomorphicAggregation(public.settings, public.key_id, committee=("a", "b", "c"))
    ct = controller_factory(sync_policy(min_learners=1), he=he)
    raw = RawLearner(ct.address, learner_id="intruder", capabilities=["train", "he"])
    raw.until("welcome")

    share = pb.DecryptionShare(version=1, party=0, shares=[b"x"])
    raw.send(pb.LearnerMessage(decryption_share=share))

    with pytest.raises(grpc.RpcError) as failure:
        raw.drain()
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "no committee member" in (failure.value.details() or "")
    raw.close()


def test_committee_keys_from_the_cli_serve_a_federation(
    controller_factory: Factory, tmp_path: Path
) -> None:
    assert main(["keys", "he-committee-init", str(tmp_path), "--parties", "2"]) == 0
    committee_file = tmp_path / COMMITTEE_FILE
    for index in (0, 1):  # each on its member's own machine
        out = tmp_path / f"member-{index}"
        assert (
            main(["keys", "he-party", str(committee_file), "--index", str(index), "-o", str(out)])
            == 0
        )
    shares = [str(tmp_path / f"member-{i}" / f"he-share-{i}.bin") for i in (0, 1)]
    assert main(["keys", "he-committee", str(committee_file), *shares]) == 0
    toml = tmp_path / "controller.toml"
    toml.write_text(
        f'[secure]\nmode = "he-multiparty"\nhe_file = "{committee_file}"\ncommittee = "m0,m1"\n'
    )

    he = load_settings(toml).controller_config().he
    assert he is not None
    assert he.committee == ("m0", "m1")
    ct = controller_factory(sync_policy(min_learners=2, rounds=1), he=he)
    parties = {
        f"m{i}": read_party_file(tmp_path / f"member-{i}" / party_file_name(i)) for i in (0, 1)
    }
    summaries = run_committee(
        ct.address, {"m0": (0.1, 1), "m1": (0.3, 1)}, read_committee_file(committee_file), parties
    )

    for summary in summaries:
        np.testing.assert_allclose(summary.final_parameters[0], np.full(10, 0.2), atol=1e-4)


def test_semi_synchronous_rounds_work_encrypted(
    controller_factory: Factory, keys: tuple[HomomorphicAggregation, LearnerKeys]
) -> None:
    he, learner_keys = keys
    policy = SemiSynchronousPolicy(
        SemiSynchronousSettings(min_learners=2, rounds=2, train=TrainSettings(local_steps=1))
    )
    ct = controller_factory(policy, he=he)

    summaries = run_encrypted(ct.address, {"a": (0.1, 1), "b": (0.3, 1)}, learner_keys)

    for summary in summaries:
        np.testing.assert_allclose(summary.final_parameters[0], np.full(10, 0.4), atol=1e-4)


def test_an_encrypted_version_survives_a_restart(
    keys: tuple[HomomorphicAggregation, LearnerKeys], tmp_path: Path
) -> None:
    he, learner_keys = keys
    first = ControllerThread(
        sync_policy(min_learners=2, rounds=1),
        [np.zeros(10, np.float32)],
        he=he,
        state_dir=str(tmp_path),
    )
    run_encrypted(first.address, {"a": (0.1, 1), "b": (0.3, 1)}, learner_keys)
    assert first.wait_finished(10)
    blob = first.read(lambda: np.array(first.controller.core.model))
    first.close()

    second = ControllerThread(
        sync_policy(min_learners=2, rounds=1), None, he=he, state_dir=str(tmp_path)
    )
    try:
        resumed = second.read(lambda: np.array(second.controller.core.model))
        assert resumed.dtype == np.uint8
        np.testing.assert_array_equal(resumed, blob)  # the ciphertexts, byte for byte
        divisor, body = split_version(resumed, he.settings.ciphertext_bytes)
        ctx = learner_keys.settings.context()
        values = ctx.decrypt(learner_keys.secret_key, [body], 10, float(divisor))
        np.testing.assert_allclose(values, np.full(10, 0.2), atol=1e-4)
    finally:
        second.close()


def test_a_spent_noise_budget_refuses_the_commit(
    controller_factory: Factory, tmp_path: Path
) -> None:
    settings = HeSettings(max_total_weight=3 * 4096)  # the first model and two steps of 1
    _, learner_file, public_file = create_he_keys(tmp_path, settings)
    learner_keys = read_learner_keys(learner_file)
    he = HomomorphicAggregation(
        *read_public_file(public_file)[:2], public_key=learner_keys.public_key
    )
    ct = controller_factory(BufferedPolicy(BufferedSettings(buffer_size=1, rounds=5)), he=he)
    threading.Thread(
        target=run_encrypted, args=(ct.address, {"a": (0.1, 1)}, learner_keys), daemon=True
    ).start()

    refused = 0
    for _ in range(100):  # up to 10 s
        refused = ct.read(lambda: ct.controller.stats.commits_refused_total)
        if refused:
            break
        threading.Event().wait(0.1)

    assert refused >= 1
    assert ct.read(lambda: ct.controller.version) == 2  # the budget held two versions


def test_ingest_workers_give_the_same_encrypted_rounds(
    controller_factory: Factory, keys: tuple[HomomorphicAggregation, LearnerKeys]
) -> None:
    he, learner_keys = keys
    ct = controller_factory(sync_policy(min_learners=3, rounds=2), he=he, workers=2)
    learners = {"a": (0.1, 1), "b": (0.2, 2), "c": (0.3, 3)}

    summaries = run_encrypted(ct.address, learners, learner_keys)

    assert all(not isinstance(s, BaseException) for s in summaries), summaries
    assert ct.read(lambda: ct.controller.forward_updates) is False  # summed in the workers
    step = (0.1 * 1 + 0.2 * 2 + 0.3 * 3) / 6  # as in one process
    for summary in summaries:
        np.testing.assert_allclose(summary.final_parameters[0], np.full(10, 2 * step), atol=1e-4)


def test_a_controller_stopping_at_once_still_hands_out_the_final_shares(
    committee: tuple[Committee, list[PartyKeys]],
) -> None:
    public, parties = committee
    members = ("a", "b", "c")
    he = HomomorphicAggregation(public.settings, public.key_id, committee=members)
    ct = ControllerThread(sync_policy(min_learners=3, rounds=1), [np.zeros(10, np.float32)], he=he)
    out: list[Any] = []
    runner = threading.Thread(
        target=lambda: out.extend(
            run_committee(
                ct.address,
                {m: (0.1, 1) for m in members},
                public,
                dict(zip(members, parties, strict=True)),
            )
        ),
        daemon=True,
    )
    runner.start()

    assert ct.wait_finished(20)
    ct.close()  # at once, as `serve` does when the federation finishes
    runner.join(30)

    assert [s.final_version for s in out] == [1, 1, 1]


def test_decryption_shares_travel_in_batches_within_the_chunk_limit(
    controller_factory: Factory, committee: tuple[Committee, list[PartyKeys]]
) -> None:
    public, parties = committee
    members = ("a", "b", "c")
    he = HomomorphicAggregation(public.settings, public.key_id, committee=members)
    # 20 ciphertexts: 20 shares of ~66 KB a member, 1.3 MB, beyond the 1.1 MB message limit
    size = 20 * public.settings.degree - 5
    limit = 100_000  # max_chunk_bytes: messages up to 1.1 MB; shares go one a message
    policy = sync_policy(min_learners=3, rounds=1)
    ct = controller_factory(policy, [np.zeros(size, np.float32)], he=he, max_chunk_bytes=limit)

    summaries = run_committee(
        ct.address,
        {m: (0.1, 1) for m in members},
        public,
        dict(zip(members, parties, strict=True)),
        size,
    )

    assert all(not isinstance(s, BaseException) for s in summaries), summaries
    for summary in summaries:
        np.testing.assert_allclose(summary.final_parameters[0], np.full(size, 0.1), atol=1e-4)
