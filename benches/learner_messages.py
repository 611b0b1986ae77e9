"""Wire messages the benchmarks' simulated learners send (shared by load.py and loop_lag.py)."""

from __future__ import annotations

from metis_async.v1 import controller_pb2 as pb


def delta_result(
    task: pb.TrainTask,
    payload_id: int,
    nbytes: int,
    num_chunks: int,
    layout_id: int,
    dtype: int = pb.DTYPE_FLOAT32,
) -> bytes:
    """The serialized `LearnerMessage` announcing a delta upload for `task` (float32, or the
    codec `dtype` with `nbytes` encoded bytes)."""
    payload = pb.Payload(
        payload_id=payload_id,
        kind=pb.PAYLOAD_KIND_DELTA,
        dtype=dtype,  # type: ignore[arg-type]
        total_bytes=nbytes,
        num_chunks=num_chunks,
        layout_id=layout_id,
    )
    result = pb.TaskResult(
        task_id=task.task_id, base_version=task.model_version, payload=payload, num_examples=10
    )
    return pb.LearnerMessage(result=result).SerializeToString()
