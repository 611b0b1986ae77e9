"""Upload grants (UPLOAD GRANTS in the proto): a learner announcing "grant" sends its chunks only
when the controller has a slot for them, so a waiting upload costs the controller nothing."""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np

from metis_async.client import RunSummary
from metis_async.v1 import controller_pb2 as pb
from tests.conftest import ControllerThread, RawLearner, ShiftLearners, sync_policy

Factory = Callable[..., ControllerThread]
GRANT = ["train", "delta", "grant"]
MODEL = [np.zeros(1000, dtype=np.float32)]


def _messages(task: pb.TrainTask, layout_id: int) -> tuple[pb.LearnerMessage, pb.LearnerMessage]:
    data = np.full(1000, 1.0, np.float32).tobytes()
    payload = pb.Payload(
        payload_id=1,
        kind=pb.PAYLOAD_KIND_DELTA,
        dtype=pb.DTYPE_FLOAT32,
        total_bytes=len(data),
        num_chunks=1,
        layout_id=layout_id,
    )
    result = pb.TaskResult(
        task_id=task.task_id, base_version=task.model_version, payload=payload, num_examples=1
    )
    chunk = pb.Chunk(payload_id=1, index=0, data=data)
    return pb.LearnerMessage(result=result), pb.LearnerMessage(chunk=chunk)


def _layout_id(ct: ControllerThread) -> int:
    return ct.read(lambda: ct.controller.store.layout.layout_id)  # type: ignore[union-attr]


def test_a_second_upload_is_granted_only_when_the_first_is_done(
    controller_factory: Factory,
) -> None:
    # one upload slot: upload_buffer_bytes smaller than the model, max_uploads_in_flight 1
    ct = controller_factory(
        sync_policy(min_learners=2, rounds=1),
        MODEL,
        upload_grant_bytes=0,
        max_uploads_in_flight=1,
        upload_buffer_bytes=1,
    )
    a, b = (RawLearner(ct.address, lid, capabilities=GRANT) for lid in ("a", "b"))
    task_a, task_b = a.until("train").train, b.until("train").train
    header_a, chunk_a = _messages(task_a, _layout_id(ct))
    header_b, chunk_b = _messages(task_b, _layout_id(ct))
    a.send(header_a)
    assert a.until("grant").grant.task_id == task_a.task_id
    granted_b = threading.Event()

    def wait_for_b() -> None:
        if b.until("grant").grant.task_id == task_b.task_id:
            granted_b.set()

    threading.Thread(target=wait_for_b, daemon=True).start()

    b.send(header_b)
    held_back = not granted_b.wait(0.5)  # a holds the only slot
    a.send(chunk_a)
    granted_after_a = granted_b.wait(10)
    b.send(chunk_b)

    assert held_back
    assert granted_after_a
    assert task_a.upload_grant
    assert task_b.upload_grant
    assert ct.wait_finished(10)
    np.testing.assert_allclose(ct.model(), np.full(1000, 1.0, np.float32))
    a.close()
    b.close()


def test_tasks_ask_for_grants_only_from_learners_that_announce_them(
    controller_factory: Factory,
) -> None:
    ct = controller_factory(sync_policy(min_learners=2, rounds=1), MODEL, upload_grant_bytes=0)
    plain = RawLearner(ct.address, "plain", capabilities=["train", "delta"])
    granting = RawLearner(ct.address, "granting", capabilities=GRANT)

    assert not plain.until("train").train.upload_grant
    assert granting.until("train").train.upload_grant
    plain.close()
    granting.close()


def test_models_below_the_threshold_are_uploaded_without_a_grant(
    controller_factory: Factory,
) -> None:
    ct = controller_factory(sync_policy(min_learners=1, rounds=1), MODEL)  # 4 KB < 1 MiB
    raw = RawLearner(ct.address, "small", capabilities=GRANT)

    assert not raw.until("train").train.upload_grant
    raw.close()


def test_a_stale_result_is_refused_instead_of_granted(controller_factory: Factory) -> None:
    # a round of one learner out of two closes at the deadline: the late result is stale
    ct = controller_factory(
        sync_policy(min_learners=2, rounds=2, round_deadline_seconds=0.5, min_update_fraction=0.5),
        MODEL,
        upload_grant_bytes=0,
    )
    late = RawLearner(ct.address, "late", capabilities=GRANT)
    other = RawLearner(ct.address, "other", capabilities=GRANT)
    task_late, task_other = late.until("train").train, other.until("train").train
    header, chunk = _messages(task_other, _layout_id(ct))
    other.send(header)
    other.until("grant")
    other.send(chunk)
    late.until("cancel")  # the round closed without it
    late_header, _ = _messages(task_late, _layout_id(ct))

    late.send(late_header)
    answer = late.next()
    while answer.WhichOneof("body") not in ("grant", "error"):
        answer = late.next()

    assert answer.WhichOneof("body") == "error"
    assert answer.error.code == pb.ERROR_CODE_STALE_TASK
    assert answer.error.task_id == task_late.task_id
    late.close()
    other.close()


def test_the_client_waits_for_its_grants_and_finishes(controller_factory: Factory) -> None:
    ct = controller_factory(sync_policy(min_learners=2, rounds=2), upload_grant_bytes=0)

    learners = ShiftLearners(ct.address, {"x": 1.0, "y": 3.0})

    assert ct.wait_finished(20)
    np.testing.assert_allclose(ct.model(), np.full(10, 4.0, np.float32))  # 2 rounds of +2
    assert all(isinstance(o, RunSummary) for o in learners.join())
