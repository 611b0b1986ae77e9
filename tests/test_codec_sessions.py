"""Codecs negotiated per session over real gRPC: uploads and downloads in float16, bfloat16
and int8 reach the same FedAvg model as float32 (up to each codec's rounding)."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import numpy as np
import pytest

from metis_async.client import RunSummary
from metis_async.v1 import controller_pb2 as pb
from tests.conftest import ControllerThread, RawLearner, ShiftLearner, sync_policy
from tests.test_server import _delta_result, _expect_abort, _start_learner

Factory = Callable[..., ControllerThread]
CODECS = ["float16", "bfloat16", "int8"]


def _run(ct: ControllerThread, shifts: list[float], codecs: list[int] | None = None) -> None:
    kw = {} if codecs is None else {"codecs": codecs}
    threads = [
        _start_learner(ct.address, ShiftLearner(s, examples=1, size=64), f"c{i}", **kw)
        for i, s in enumerate(shifts)
    ]
    assert ct.wait_finished(30)
    for thread, out in threads:
        thread.join(10)
        assert isinstance(out[0], RunSummary)


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("workers", [0, 2])
def test_codec_round_trip_gives_the_fedavg_model(
    controller_factory: Factory, codec: str, workers: int
) -> None:
    # 0.5 and 1.5 are exact in every codec (int8: the chunk's max maps to +-127 exactly).
    ct = controller_factory(
        sync_policy(min_learners=2, rounds=2),
        [np.zeros(64, np.float32)],
        upload_codec=codec,
        download_codec=codec,
        workers=workers,
    )

    _run(ct, [0.5, 1.5])

    np.testing.assert_allclose(ct.model(), np.full(64, 2.0, np.float32), rtol=1e-2)


def test_welcome_names_the_codecs_a_learner_offered(controller_factory: Factory) -> None:
    ct = controller_factory(upload_codec="int8", download_codec="bfloat16")

    offered = RawLearner(ct.address, "offers", codecs=[pb.DTYPE_INT8, pb.DTYPE_BFLOAT16])
    plain = RawLearner(ct.address, "plain")

    welcome = offered.until("welcome").welcome
    assert (welcome.upload_dtype, welcome.download_dtype) == (pb.DTYPE_INT8, pb.DTYPE_BFLOAT16)
    model = offered.until("model").model
    assert model.payload.dtype == pb.DTYPE_BFLOAT16
    welcome = plain.until("welcome").welcome
    assert welcome.upload_dtype in (pb.DTYPE_UNSPECIFIED, pb.DTYPE_FLOAT32)
    assert plain.until("model").model.payload.dtype == pb.DTYPE_FLOAT32
    offered.close()
    plain.close()


def test_an_upload_in_a_codec_not_negotiated_is_refused(controller_factory: Factory) -> None:
    ct = controller_factory(sync_policy(min_learners=1, rounds=0))  # float32 only
    raw = RawLearner(ct.address, "sneaky", codecs=[pb.DTYPE_FLOAT16])
    task = raw.until("train").train
    layout_id = ct.read(lambda: ct.controller.store.layout.layout_id)
    for message in _delta_result(task, np.zeros(10, np.float16), layout_id, dtype=pb.DTYPE_FLOAT16):
        raw.send(message)

    _expect_abort(raw, grpc.StatusCode.INVALID_ARGUMENT, "accepted: DTYPE_FLOAT32")


def test_unknown_codec_setting_is_refused() -> None:
    from metis_async.server import ControllerConfig

    with pytest.raises(ValueError, match="upload_codec"):
        ControllerConfig(upload_codec="float8")
