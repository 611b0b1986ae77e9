"""The command line's side of the Admin service: one blocking client per command.

Where the controller is and its token come from flags, else the environment
(`METIS_ASYNC_ADMIN` = HOST:PORT, `METIS_ASYNC_ADMIN_TOKEN_FILE`), else the controller's own
settings file (`--config controller.toml`: `[admin] host, port, token_file`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt

from metis_async import wire
from metis_async.v1 import admin_pb2 as apb
from metis_async.v1 import admin_pb2_grpc as apb_grpc

DEFAULT_ADDRESS = "127.0.0.1:50052"
"""Where the command line looks for the Admin service when nothing else says."""


class AdminError(RuntimeError):
    """A call the controller refused or could not take (the message says why)."""


@dataclass(frozen=True)
class Target:
    """Where the Admin service is and how to authenticate.

    Attributes:
        address: HOST:PORT.
        token: the admin token (None: none sent).
        ca: PEM of the CA that signed the controller's certificate (TLS), if it speaks TLS.
    """

    address: str = DEFAULT_ADDRESS
    token: str | None = None
    ca: bytes | None = None


def resolve_target(
    address: str | None,
    token_file: str | None,
    ca_file: str | None,
    config_file: str | None,
    environ: Mapping[str, str],
) -> Target:
    """The `Target` from flags, environment, then the controller's settings file."""
    from metis_async.config import load_settings, read_admin_token

    token_file = token_file or environ.get("METIS_ASYNC_ADMIN_TOKEN_FILE") or None
    address = address or environ.get("METIS_ASYNC_ADMIN") or None
    if config_file is not None and (address is None or token_file is None):
        admin = load_settings(config_file, {}, {}).admin
        if address is None and admin.port is not None:
            address = f"{admin.host}:{admin.port}"
        token_file = token_file or admin.token_file
    token = read_admin_token(token_file) if token_file else None
    ca = Path(ca_file).read_bytes() if ca_file else None
    return Target(address or DEFAULT_ADDRESS, token, ca)


class AdminClient:
    """Blocking calls to one controller's Admin service (a context manager).

    Args:
        target: where it is and the token.
        timeout_seconds: deadline of each call.
    """

    def __init__(self, target: Target, timeout_seconds: float = 30.0) -> None:
        self.target = target
        self.timeout = timeout_seconds
        if target.ca is not None:
            credentials = grpc.ssl_channel_credentials(root_certificates=target.ca)
            self._channel = grpc.secure_channel(target.address, credentials)
        else:
            self._channel = grpc.insecure_channel(target.address)
        self._stub = apb_grpc.AdminStub(self._channel)  # type: ignore[no-untyped-call]
        self._metadata = (
            (("authorization", f"Bearer {target.token}"),) if target.token is not None else ()
        )

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def _call(self, method: str, request: Any) -> Any:
        try:
            return getattr(self._stub, method)(
                request, timeout=self.timeout, metadata=self._metadata
            )
        except grpc.RpcError as error:
            raise AdminError(_describe(error, self.target.address)) from None

    def status(self) -> apb.ControllerStatus:
        """The controller's status."""
        return self._call("GetStatus", apb.StatusRequest())  # type: ignore[no-any-return]

    def summary(self) -> dict[str, Any]:
        """The dashboard's summary (versions, evaluations, participation, ...)."""
        return dict(json.loads(self.status().summary_json or "{}"))

    def learners(
        self, offset: int = 0, limit: int = 50, sort: str = "", descending: bool = False
    ) -> apb.LearnerPage:
        """One page of learners."""
        request = apb.ListLearnersRequest(
            offset=offset, limit=limit, sort=sort, descending=descending
        )
        return self._call("ListLearners", request)  # type: ignore[no-any-return]

    def kick(self, learner_id: str, reason: str = "") -> str:
        """End a learner's stream (it may reconnect)."""
        request = apb.LearnerRequest(learner_id=learner_id, reason=reason)
        return str(self._call("KickLearner", request).message)

    def revoke(self, learner_id: str, reason: str = "") -> str:
        """Refuse a learner from now on."""
        request = apb.LearnerRequest(learner_id=learner_id, reason=reason)
        return str(self._call("RevokeLearner", request).message)

    def pause(self, reason: str = "") -> str:
        """No new tasks and no commits until `resume`."""
        return str(self._call("Pause", apb.PauseRequest(reason=reason)).message)

    def resume(self, reason: str = "") -> str:
        """Undo `pause`."""
        return str(self._call("Resume", apb.PauseRequest(reason=reason)).message)

    def checkpoint(self) -> apb.CheckpointReply:
        """Write a checkpoint of the current version now."""
        return self._call("Checkpoint", apb.CheckpointRequest())  # type: ignore[no-any-return]

    def model(self, version: int = 0) -> tuple[int, list[npt.NDArray[np.generic]]]:
        """(version, tensors) of a committed model version (0: the current one)."""
        parts: Iterator[apb.ModelPart] = self._call(
            "GetModel", apb.GetModelRequest(version=version)
        )
        header: apb.ModelHeader | None = None
        chunks: list[bytes] = []
        try:
            for part in parts:
                if part.HasField("header"):
                    header = part.header
                else:
                    chunks.append(part.chunk)
        except grpc.RpcError as error:
            raise AdminError(_describe(error, self.target.address)) from None
        if header is None:
            raise AdminError("the controller sent no model header")
        flat = np.frombuffer(b"".join(chunks), dtype="<f4")
        expected = wire.num_parameters(header.layout)
        if flat.size != expected:
            raise AdminError(f"the controller sent {flat.size} values; the layout has {expected}")
        return int(header.version), [np.array(a) for a in wire.unflatten(flat, header.layout)]


def _describe(error: grpc.RpcError, address: str) -> str:
    code = error.code() if hasattr(error, "code") else None
    details = error.details() if hasattr(error, "details") else str(error)
    if code == grpc.StatusCode.UNAVAILABLE:
        return (
            f"no Admin service at {address} ({details}); is the controller running with "
            "[admin] port (serve --admin-port PORT)?"
        )
    name = code.name if code is not None else "ERROR"
    return f"{name}: {details}"
