"""Checkpoints: every committed version on disk, atomically, so a restarted controller resumes.

A `StateDirectory` (`serve --state-dir DIR`) holds:

- `checkpoint-<version>.npz`, one per committed version, the newest `keep` of them. Each is a
  numpy `.npz` archive without pickles: the model (float32), the server optimizer's state
  vectors, the model layout (serialized `ModelLayout`) and a JSON document with everything else
  (run id, version, the policy's counters, the controller's counters, evaluation history and the
  ids of the updates recent versions folded in, which make resent updates detectable as
  duplicates after a restart).
- `incarnation`: how many times a controller started on this directory. Task ids carry it, so
  a task id is never reused, even after several restarts without a commit in between.
- `lock`: held (`flock`) by the running controller; a second one on the same directory fails.

A checkpoint is written to a temporary file, flushed and fsynced, renamed over its final name,
and the directory is fsynced: after a crash at any instant the directory holds complete
checkpoints only. Reading skips (and reports) a checkpoint that does not parse, so the newest
readable one wins.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import re
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import structlog

from metis_async.learners import task_key, wire_task_id
from metis_async.v1 import controller_pb2 as pb

log = structlog.get_logger("metis_async.checkpoints")

FORMAT = 1
"""Version of the checkpoint format (the JSON document's `format`)."""

_NAME = re.compile(r"^checkpoint-(\d{10})\.npz$")
PAUSED_FILE = "paused.json"
"""In the state directory while the operator has the run paused (see `StateDirectory.paused`)."""


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or the state directory cannot be used.

    A controller that cannot make a commit durable stops rather than publish a version a restart
    would not know (systemd restarts it; learners resend what was not acknowledged).
    """


@dataclass
class Checkpoint:
    """One committed version and the controller state that goes with it.

    Attributes:
        run_id: identity of the run's version sequence (kept across restarts).
        version: the committed version.
        incarnation: the controller start that wrote it.
        layout: the model's layout.
        model: the model of `version` (float32, flat), or its encrypted version (uint8, under
            homomorphic aggregation: stored as the bytes it is, as "model_encrypted").
        optimizer: the server optimizer's state vectors by name (empty for plain FedAvg).
        protocol: the policy's name (a checkpoint resumes only under the same policy).
        policy: the policy's counters (`Policy.snapshot`).
        stats: the controller's counters.
        evaluations: mean evaluation metrics by version.
        committed: update task key (`learners.task_key`: wire task id and learner id) ->
            (learner id, version it was folded into), recent ones. On disk the wire ids and
            the learners are stored apart, so checkpoints of every wire-id scheme load.
        created_unix_seconds: when it was written.
    """

    run_id: str
    version: int
    incarnation: int
    layout: pb.ModelLayout
    model: npt.NDArray[np.float32] | npt.NDArray[np.uint8]
    optimizer: dict[str, npt.NDArray[np.float32]] = field(default_factory=dict)
    protocol: str = ""
    policy: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, int] = field(default_factory=dict)
    evaluations: dict[int, dict[str, float]] = field(default_factory=dict)
    committed: dict[str, tuple[str, int]] = field(default_factory=dict)
    created_unix_seconds: float = 0.0

    def to_bytes(self) -> bytes:
        """The checkpoint as an `.npz` archive (no pickled objects)."""
        document = {
            "format": FORMAT,
            "run_id": self.run_id,
            "version": self.version,
            "incarnation": self.incarnation,
            "protocol": self.protocol,
            "policy": self.policy,
            "stats": self.stats,
            "evaluations": {str(v): m for v, m in self.evaluations.items()},
            "committed_tasks": [wire_task_id(key) for key in self.committed],
            "committed_learners": [lid for lid, _ in self.committed.values()],
            "committed_versions": [v for _, v in self.committed.values()],
            "optimizer": sorted(self.optimizer),
            "created_unix_seconds": self.created_unix_seconds or time.time(),
        }
        arrays: dict[str, npt.NDArray[Any]] = {
            "document": np.frombuffer(json.dumps(document).encode(), dtype=np.uint8),
            "layout": np.frombuffer(self.layout.SerializeToString(), dtype=np.uint8),
        }
        if self.model.dtype == np.uint8:
            arrays["model_encrypted"] = np.ascontiguousarray(self.model)
        else:
            arrays["model"] = np.ascontiguousarray(self.model, dtype=np.float32)
        for name, vector in self.optimizer.items():
            arrays[f"optimizer_{name}"] = np.ascontiguousarray(vector, dtype=np.float32)
        out = io.BytesIO()
        np.savez(out, allow_pickle=False, **arrays)
        return out.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> Checkpoint:
        """Parse `to_bytes` output; raises `ValueError` naming what is wrong."""
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as archive:
                document = json.loads(archive["document"].tobytes())
                layout = pb.ModelLayout.FromString(archive["layout"].tobytes())
                model: npt.NDArray[np.float32] | npt.NDArray[np.uint8]
                if "model_encrypted" in archive.files:
                    model = np.array(archive["model_encrypted"], dtype=np.uint8)
                else:
                    model = np.array(archive["model"], dtype=np.float32)
                optimizer = {
                    name: np.array(archive[f"optimizer_{name}"], dtype=np.float32)
                    for name in document["optimizer"]
                }
        except (OSError, EOFError, KeyError, ValueError, TypeError, zipfile.BadZipFile) as error:
            raise ValueError(f"not a readable checkpoint: {error}") from error
        if document.get("format") != FORMAT:
            raise ValueError(f"checkpoint format {document.get('format')!r}, expected {FORMAT}")
        if model.dtype != np.uint8 and model.nbytes != layout.total_bytes:
            raise ValueError(
                f"model has {model.nbytes} bytes, its layout says {layout.total_bytes}"
            )
        committed = {
            task_key(str(task), str(lid)): (str(lid), int(v))
            for task, lid, v in zip(
                document["committed_tasks"],
                document["committed_learners"],
                document["committed_versions"],
                strict=True,
            )
        }
        model.flags.writeable = False
        return cls(
            run_id=str(document["run_id"]),
            version=int(document["version"]),
            incarnation=int(document["incarnation"]),
            layout=layout,
            model=model,
            optimizer=optimizer,
            protocol=str(document["protocol"]),
            policy=dict(document["policy"]),
            stats={k: int(v) for k, v in document["stats"].items()},
            evaluations={int(v): m for v, m in document["evaluations"].items()},
            committed=committed,
            created_unix_seconds=float(document["created_unix_seconds"]),
        )


class StateDirectory:
    """The controller's state directory (see the module docstring).

    Args:
        path: the directory (created if missing, mode 0700).
        keep: checkpoints kept (>= 1); older ones are deleted after each write.

    Raises:
        CheckpointError: the directory cannot be created, or another controller holds it.
    """

    def __init__(self, path: str | os.PathLike[str], keep: int = 3) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.path = Path(path)
        self.keep = keep
        try:
            self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._lock = open(self.path / "lock", "a+")  # noqa: SIM115 - held while we run
        except OSError as error:
            raise CheckpointError(f"cannot use state directory {self.path}: {error}") from error
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock.close()
            raise CheckpointError(
                f"state directory {self.path} is in use by another controller"
            ) from None
        self.incarnation = self._next_incarnation()

    def close(self) -> None:
        """Release the directory."""
        with contextlib.suppress(OSError):
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()

    def _next_incarnation(self) -> int:
        path = self.path / "incarnation"
        previous = 0
        with contextlib.suppress(OSError, ValueError):
            previous = int(path.read_text().strip() or 0)
        newest = self.latest()
        current = max(previous, newest.incarnation if newest is not None else 0) + 1
        self._write_atomic(path, f"{current}\n".encode())
        return current

    def checkpoints(self) -> list[Path]:
        """Checkpoint files, oldest first."""
        found = [p for p in self.path.iterdir() if _NAME.match(p.name)]
        return sorted(found, key=lambda p: p.name)

    def latest(self) -> Checkpoint | None:
        """The newest readable checkpoint; None when there is none."""
        for path in reversed(self.checkpoints()):
            try:
                return Checkpoint.from_bytes(path.read_bytes())
            except (OSError, ValueError) as error:
                log.error("checkpoint_unreadable", path=str(path), reason=str(error))
        return None

    def save(self, checkpoint: Checkpoint) -> Path:
        """Write `checkpoint` durably, then delete all but the newest `keep`.

        Raises:
            CheckpointError: it could not be written (disk full, permissions).
        """
        started = time.perf_counter()
        path = self.path / f"checkpoint-{checkpoint.version:010d}.npz"
        try:
            data = checkpoint.to_bytes()
            self._write_atomic(path, data)
        except OSError as error:
            raise CheckpointError(f"cannot write {path}: {error}") from error
        for old in self.checkpoints()[: -self.keep]:
            with contextlib.suppress(OSError):
                old.unlink()
        log.debug(
            "checkpoint_written",
            version=checkpoint.version,
            bytes=len(data),
            seconds=round(time.perf_counter() - started, 4),
        )
        return path

    def save_pause(self, reason: str, version: int) -> None:
        """Record that the operator paused the run at `version`, so a restarted controller
        starts paused too (`paused`); `clear_pause` removes the record.

        Raises:
            CheckpointError: it could not be written.
        """
        record = {"reason": reason, "version": version, "since_unix_seconds": time.time()}
        path = self.path / PAUSED_FILE
        try:
            self._write_atomic(path, json.dumps(record).encode())
        except OSError as error:
            raise CheckpointError(f"cannot write {path}: {error}") from error

    def clear_pause(self) -> None:
        """The run was resumed: a restart no longer starts paused.

        Raises:
            CheckpointError: the record exists and could not be removed.
        """
        path = self.path / PAUSED_FILE
        try:
            path.unlink(missing_ok=True)
        except OSError as error:
            raise CheckpointError(f"cannot remove {path}: {error}") from error

    def paused(self) -> str | None:
        """Why the run was paused when the controller stopped (None: it was not). A record
        that cannot be read still means paused: resuming is the operator's decision."""
        path = self.path / PAUSED_FILE
        try:
            record = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as error:
            log.error("pause_record_unreadable", path=str(path), reason=str(error))
            return "paused (the pause record is unreadable)"
        reason = record.get("reason") if isinstance(record, dict) else None
        return str(reason) if reason else "paused by the operator"

    def _write_atomic(self, path: Path, data: bytes) -> None:
        """Temporary file, fsync, rename, fsync of the directory."""
        temporary = path.with_name(f".{path.name}.tmp")
        with open(temporary, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
        directory = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
