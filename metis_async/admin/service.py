"""The Admin gRPC service (`proto/metis_async/v1/admin.proto`): the operator's handle on a
running controller, served by the process that runs the federation core.

Every call is checked for the admin token (`authorization: Bearer <token>`, compared in
constant time) before it touches anything. Reads go through the core's thread
(`ControllerFace.query`), so they see one consistent state; pause and resume are core events
like any other.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
import structlog

from metis_async import wire
from metis_async.admin.view import ControllerView, learner_rows, sort_rows
from metis_async.dashboard.source import MAX_PAGE
from metis_async.v1 import admin_pb2 as apb
from metis_async.v1 import admin_pb2_grpc as apb_grpc
from metis_async.v1 import controller_pb2 as pb

if TYPE_CHECKING:
    from metis_async.server import ControllerFace

log = structlog.get_logger("metis_async.admin")

MODEL_CHUNK_BYTES = 4 * 1024 * 1024
"""Values per `ModelPart.chunk` (bytes)."""

STATUS_WAIT_SECONDS = 2.0
"""How long `GetStatus` waits for a fresh read of the core before it answers with the view's
last summary."""


class AdminService(apb_grpc.AdminServicer):
    """The Admin service of one controller.

    Args:
        controller: a `Controller` or a `WorkerHub`.
        view: the controller's view (its summary is the status's `summary_json`).
        token: the admin token; None takes calls without one (loopback only, `config.py`).
        revoked_file: where revocations are appended (`server.revoked_file`), if anywhere.
    """

    def __init__(
        self,
        controller: ControllerFace,
        view: ControllerView,
        token: str | None,
        revoked_file: str | None = None,
    ) -> None:
        self.controller = controller
        self.view = view
        self._token = f"Bearer {token}".encode() if token is not None else None
        self._revoked_file = revoked_file

    async def _authorize(self, context: grpc.aio.ServicerContext) -> None:
        if self._token is None:
            return
        metadata = dict(context.invocation_metadata() or ())
        given = str(metadata.get("authorization", "")).encode()
        if not hmac.compare_digest(given, self._token):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong admin token")

    # ------------------------------------------------------------------------------ reads

    async def GetStatus(
        self, request: apb.StatusRequest, context: grpc.aio.ServicerContext
    ) -> apb.ControllerStatus:
        await self._authorize(context)
        # A fresh read, unless the core is too busy to answer soon (100,000 learners in a
        # round): then the view's last summary, with its age.
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.view.refresh()), STATUS_WAIT_SECONDS)
        summary: dict[str, Any] = dict(self.view.summary())
        summary["age_seconds"] = round(self.view.age_seconds(), 3)
        stats = self.controller.stats
        learners: dict[str, Any] = summary.get("learners", {})
        return apb.ControllerStatus(
            run_id=str(summary.get("run_id", "")),
            protocol=str(summary.get("protocol", "")),
            state=str(summary.get("state", "")),
            version=int(summary.get("version", 0)),
            learners_connected=int(learners.get("connected", 0)),
            learners_needed=int(summary.get("learners_needed", 0)),
            workers=int(summary.get("workers", 0)),
            model_parameters=int(summary.get("model_parameters", 0)),
            encrypted=bool(summary.get("encrypted", False)),
            updates_accepted=stats.updates_accepted_total,
            updates_rejected=stats.updates_rejected_total,
            versions_committed=stats.versions_committed_total,
            uptime_seconds=float(summary.get("now", 0.0)) - float(summary.get("started", 0.0)),
            summary_json=json.dumps(summary),
        )

    async def ListLearners(
        self, request: apb.ListLearnersRequest, context: grpc.aio.ServicerContext
    ) -> apb.LearnerPage:
        await self._authorize(context)
        controller = self.controller
        core, now, routes = controller.core, controller.clock(), controller.learner_workers
        limit = min(request.limit or 50, MAX_PAGE)
        try:
            rows = await controller.query(lambda: learner_rows(core, now, routes))
            ordered = sort_rows(rows, request.sort, request.descending)
        except ValueError as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
            raise
        chosen = ordered[request.offset : request.offset + limit]
        return apb.LearnerPage(
            total=len(rows),
            offset=request.offset,
            learners=[
                apb.LearnerInfo(
                    learner_id=r.learner_id,
                    connected=r.connected,
                    worker=r.worker,
                    connected_seconds=r.connected_seconds,
                    last_seen_seconds=r.last_seen_seconds,
                    speed_examples_per_second=r.speed_examples_per_second or 0.0,
                    accepted=r.accepted,
                    rejected=r.rejected,
                    last_staleness=-1 if r.last_staleness is None else r.last_staleness,
                    tasks_assigned=r.tasks_assigned,
                    benched=r.benched,
                )
                for r in chosen
            ],
        )

    # ------------------------------------------------------------------------------ steering

    async def KickLearner(
        self, request: apb.LearnerRequest, context: grpc.aio.ServicerContext
    ) -> apb.AdminReply:
        await self._authorize(context)
        reason = request.reason or "kicked by the operator"
        if not self.controller.kick(request.learner_id, reason, grpc.StatusCode.UNAVAILABLE):
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"learner {request.learner_id!r} is not connected"
            )
        log.info("learner_kicked", learner_id=request.learner_id, reason=reason)
        return apb.AdminReply(message=f"learner {request.learner_id!r} disconnected")

    async def RevokeLearner(
        self, request: apb.LearnerRequest, context: grpc.aio.ServicerContext
    ) -> apb.AdminReply:
        await self._authorize(context)
        if not request.learner_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "learner_id is empty")
        reason = request.reason or "revoked by the operator"
        connected = self.controller.revoke(request.learner_id, reason)
        kept = ""
        if self._revoked_file is not None:
            await asyncio.to_thread(_append_line, Path(self._revoked_file), request.learner_id)
            kept = f"; written to {self._revoked_file}"
        state = "disconnected and refused" if connected else "refused (not connected)"
        return apb.AdminReply(message=f"learner {request.learner_id!r} {state}{kept}")

    async def Pause(
        self, request: apb.PauseRequest, context: grpc.aio.ServicerContext
    ) -> apb.AdminReply:
        await self._authorize(context)
        await self.controller.command(self.controller.core.pause, request.reason)
        return apb.AdminReply(message="paused: no new tasks, no commits until resume")

    async def Resume(
        self, request: apb.PauseRequest, context: grpc.aio.ServicerContext
    ) -> apb.AdminReply:
        await self._authorize(context)
        await self.controller.command(self.controller.core.unpause, request.reason)
        return apb.AdminReply(message="resumed")

    async def Checkpoint(
        self, request: apb.CheckpointRequest, context: grpc.aio.ServicerContext
    ) -> apb.CheckpointReply:
        await self._authorize(context)
        core = self.controller.core
        if self.controller.state is None:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "this controller has no state directory (server.state_dir): nothing to write",
            )
        path = await self.controller.query(core.checkpoint_now)
        if path is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no model yet")
        return apb.CheckpointReply(version=core.version, path=str(path))

    async def GetModel(
        self, request: apb.GetModelRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[apb.ModelPart]:
        await self._authorize(context)
        found = await self._model(request.version, context)
        version, layout, flat = found
        yield apb.ModelPart(header=apb.ModelHeader(version=version, layout=layout))
        data = np.ascontiguousarray(flat, dtype="<f4").view(np.uint8).data
        for start in range(0, len(data), MODEL_CHUNK_BYTES):
            yield apb.ModelPart(chunk=bytes(data[start : start + MODEL_CHUNK_BYTES]))

    async def _model(
        self, version: int, context: grpc.aio.ServicerContext
    ) -> tuple[int, pb.ModelLayout, wire.FloatVector]:
        store = self.controller.store
        if not store.ready or store.layout is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no model yet")
        assert store.layout is not None
        if version in (0, store.version):
            if store.encrypted:
                await context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    "the model is encrypted (homomorphic aggregation): the controller cannot "
                    "read it; learners decrypt it",
                )
            return store.version, store.layout, store.flat
        state = self.controller.state
        if state is not None:
            found = await asyncio.to_thread(_from_checkpoints, state.checkpoints(), version)
            if found is not None:
                return found
        kept = "no state directory" if state is None else "not among the checkpoints kept"
        await context.abort(
            grpc.StatusCode.NOT_FOUND,
            f"version {version} is not available ({kept}); the current one is {store.version}",
        )
        raise AssertionError("unreachable")


def _from_checkpoints(
    paths: list[Path], version: int
) -> tuple[int, pb.ModelLayout, wire.FloatVector] | None:
    from metis_async.checkpoints import Checkpoint

    for path in paths:
        if path.name != f"checkpoint-{version:010d}.npz":
            continue
        checkpoint = Checkpoint.from_bytes(path.read_bytes())
        if checkpoint.model.dtype == np.uint8:
            return None  # encrypted: not values
        return checkpoint.version, checkpoint.layout, wire.plain(checkpoint.model)
    return None


def _append_line(path: Path, line: str) -> None:
    existing = path.read_text().splitlines() if path.exists() else []
    if line not in existing:
        with path.open("a") as out:
            out.write(line + "\n")


async def start_admin_server(
    controller: ControllerFace,
    view: ControllerView,
    host: str,
    port: int,
    token: str | None,
    revoked_file: str | None = None,
) -> tuple[grpc.aio.Server, int]:
    """Serve the Admin service on `host:port` (0: any free port); returns the server and port.
    Speaks TLS with the learners' certificate when the controller has one."""
    server = grpc.aio.server()
    service = AdminService(controller, view, token, revoked_file)
    apb_grpc.add_AdminServicer_to_server(service, server)  # type: ignore[no-untyped-call]
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    config = controller.config
    credentials = None
    if config.tls_cert is not None and config.tls_key is not None:  # no client certificates
        credentials = grpc.ssl_server_credentials([(config.tls_key, config.tls_cert)])
    if credentials is not None:
        bound = server.add_secure_port(address, credentials)
    else:
        bound = server.add_insecure_port(address)
    await server.start()
    log.info("admin_serving", address=f"{host}:{bound}", tls=credentials is not None)
    return server, bound
