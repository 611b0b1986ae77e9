"""Checkpoints: the format, the state directory, and a controller that resumes from one."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from metis_async import wire
from metis_async.aggregation.server_step import AggregationSettings
from metis_async.checkpoints import Checkpoint, CheckpointError, StateDirectory
from metis_async.learners import task_key, wire_task_id
from metis_async.protocols import BufferedPolicy, BufferedSettings, TrainSettings
from metis_async.protocols.staleness import StalenessFunction
from tests.conftest import ControllerThread, RawLearner, sync_policy

# ------------------------------------------------------------------------------ the format


def _checkpoint(version: int, value: float = 1.5, incarnation: int = 1) -> Checkpoint:
    model = np.full(6, value, dtype=np.float32)
    return Checkpoint(
        run_id="run1",
        version=version,
        incarnation=incarnation,
        layout=wire.make_layout([model]),
        model=model,
        optimizer={"m": np.arange(6, dtype=np.float32)},
        protocol="buffered",
        policy={"version": version, "rng": [3, [1, 2], None]},
        stats={"versions_committed_total": version},
        evaluations={version: {"accuracy": 0.5}},
        committed={task_key("run1.1-t1", "a"): ("a", version)},
    )


def test_checkpoint_round_trips_every_field() -> None:
    original = _checkpoint(7)

    back = Checkpoint.from_bytes(original.to_bytes())

    assert (back.run_id, back.version, back.incarnation, back.protocol) == (
        "run1",
        7,
        1,
        "buffered",
    )
    assert back.layout == original.layout
    np.testing.assert_array_equal(back.model, original.model)
    np.testing.assert_array_equal(back.optimizer["m"], original.optimizer["m"])
    assert back.policy == original.policy
    assert back.committed == {task_key("run1.1-t1", "a"): ("a", 7)}
    assert back.evaluations == {7: {"accuracy": 0.5}}


def test_committed_tasks_are_stored_as_wire_ids_with_their_learners() -> None:
    # The same wire id for two learners (a round's tasks share it) stays two records, and a
    # checkpoint written before ids were shared (a unique wire id each) loads the same way.
    original = _checkpoint(3)
    original.committed = {
        task_key("run1.1-t9", "a"): ("a", 3),
        task_key("run1.1-t9", "b"): ("b", 3),
    }

    back = Checkpoint.from_bytes(original.to_bytes())

    assert back.committed == original.committed
    assert wire_task_id(next(iter(back.committed))) == "run1.1-t9"


def test_garbage_is_not_a_checkpoint() -> None:
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        Checkpoint.from_bytes(b"PK\x03\x04 not really a zip")


# ------------------------------------------------------------------------------ the directory


def test_save_keeps_the_newest_and_leaves_no_temporary_files(tmp_path: Path) -> None:
    state = StateDirectory(tmp_path, keep=2)

    for version in range(5):
        state.save(_checkpoint(version))

    names = sorted(os.listdir(tmp_path))
    assert names == [
        "checkpoint-0000000003.npz",
        "checkpoint-0000000004.npz",
        "incarnation",
        "lock",
    ]
    latest = state.latest()
    assert latest is not None
    assert latest.version == 4
    state.close()


def test_an_unreadable_newest_checkpoint_falls_back_to_the_one_before(tmp_path: Path) -> None:
    state = StateDirectory(tmp_path)
    state.save(_checkpoint(1, value=1.0))
    state.save(_checkpoint(2, value=2.0))
    (tmp_path / "checkpoint-0000000002.npz").write_bytes(b"torn")

    latest = state.latest()

    assert latest is not None
    assert latest.version == 1
    state.close()


def test_a_second_controller_cannot_share_the_directory(tmp_path: Path) -> None:
    first = StateDirectory(tmp_path)

    with pytest.raises(CheckpointError, match="in use by another controller"):
        StateDirectory(tmp_path)
    first.close()


def test_every_start_is_a_new_incarnation(tmp_path: Path) -> None:
    incarnations = []
    for _ in range(3):
        state = StateDirectory(tmp_path)
        incarnations.append(state.incarnation)
        state.close()

    assert incarnations == [1, 2, 3]


# ------------------------------------------------------------------------------ resuming


def _train_once(ct: ControllerThread, learner_id: str, delta: float) -> None:
    """One raw learner trains one task with a constant delta and leaves."""
    raw = RawLearner(ct.address, learner_id, capabilities=["train", "delta", "ack"])
    task = raw.until("train").train
    layout_id = ct.read(lambda: ct.controller.store.layout.layout_id)
    header, chunks = wire.make_payload(
        np.full(10, delta, np.float32), 1, 2, layout_id, wire.MAX_CHUNK_BYTES
    )
    raw.send(
        wire_message(result=_result(task, header)),
    )
    for chunk in chunks:
        raw.send(wire_message(chunk=chunk))
    ack = raw.until("ack").ack
    assert ack.task_id == task.task_id
    raw.close()


def wire_message(**body: object):  # type: ignore[no-untyped-def]
    from metis_async.v1 import controller_pb2 as pb

    return pb.LearnerMessage(**body)


def _result(task, header):  # type: ignore[no-untyped-def]
    from metis_async.v1 import controller_pb2 as pb

    return pb.TaskResult(
        task_id=task.task_id, base_version=task.model_version, payload=header, num_examples=1
    )


def _buffered(rounds: int = 0) -> BufferedPolicy:
    return BufferedPolicy(
        BufferedSettings(
            buffer_size=1,
            rounds=rounds,
            staleness=StalenessFunction("constant"),
            train=TrainSettings(local_steps=1),
        )
    )


def test_a_controller_resumes_the_run_where_the_last_one_stopped(tmp_path: Path) -> None:
    momentum = AggregationSettings(optimizer="fedavgm", optimizer_options={"momentum": 0.5})
    first = ControllerThread(
        _buffered(), [np.zeros(10, np.float32)], momentum, state_dir=str(tmp_path)
    )
    run_id = first.read(lambda: first.controller.core.run_id)
    _train_once(first, "a", 1.0)
    _train_once(first, "a", 1.0)
    model = first.model()
    first.close()

    second = ControllerThread(
        _buffered(), [np.full(10, 9.0, np.float32)], momentum, state_dir=str(tmp_path)
    )
    resumed = (second.read(lambda: second.controller.core.run_id), second.controller.version)
    np.testing.assert_array_equal(second.model(), model)  # the given initial model is ignored
    _train_once(second, "a", 1.0)
    after = second.model()
    second.close()

    assert resumed == (run_id, 2)
    # FedAvgM with momentum 0.5 and the same delta: steps 1, 1.5, then 1.75 only if the
    # momentum vector came back from the checkpoint (a fresh optimizer would step 1 again).
    np.testing.assert_allclose(model, np.full(10, 2.5, np.float32))
    np.testing.assert_allclose(after, np.full(10, 4.25, np.float32))


def test_a_run_of_another_protocol_is_refused(tmp_path: Path) -> None:
    first = ControllerThread(_buffered(), [np.zeros(10, np.float32)], state_dir=str(tmp_path))
    first.close()

    with pytest.raises(CheckpointError, match="holds a buffered run"):
        ControllerThread(sync_policy(), [np.zeros(10, np.float32)], state_dir=str(tmp_path))


def test_the_state_directory_keeps_a_pause_until_it_is_cleared(tmp_path: Path) -> None:
    state = StateDirectory(tmp_path)
    assert state.paused() is None

    state.save_pause("maintenance", 7)
    kept = state.paused()
    state.clear_pause()

    assert kept == "maintenance"
    assert state.paused() is None
    state.close()


def test_an_unreadable_pause_record_still_means_paused(tmp_path: Path) -> None:
    state = StateDirectory(tmp_path)
    (tmp_path / "paused.json").write_bytes(b"\x00not json")

    assert state.paused() is not None
    state.close()
