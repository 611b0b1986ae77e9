"""The Admin service and its commands against a real controller on loopback: status, learners,
kick, revoke, pause/resume, checkpoint and model get (gRPC with the admin token)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from metis_async.admin.client import AdminClient, AdminError, Target
from metis_async.admin.run import AdminEndpoints, AdminOptions
from metis_async.client import Backoff, run_learner
from metis_async.client.runner import LearnerStopped
from metis_async.keys import create_admin_token
from tests.conftest import (
    ControllerThread,
    ShiftLearner,
    ShiftLearners,
    run_in_threads,
    sync_policy,
)

TOKEN = "admin-token-for-tests-0123456789"


class Admin:
    """A controller thread with its Admin service, and a client holding the token."""

    def __init__(self, ct: ControllerThread, revoked_file: str | None = None) -> None:
        self.ct = ct
        options = AdminOptions(port=0, token=TOKEN, revoked_file=revoked_file)
        self.endpoints = AdminEndpoints(ct.controller, options)
        ct.call(self.endpoints.start())
        self.address = f"127.0.0.1:{self.endpoints.admin_port}"
        self.client = AdminClient(Target(self.address, TOKEN), timeout_seconds=10)
        self.closed = False

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.client.close()
        self.ct.call(self.endpoints.stop())
        self.ct.close()


@pytest.fixture
def admin_factory(tmp_path: Path) -> Iterator[Any]:
    made: list[Admin] = []

    def make(policy: Any = None, revoked_file: str | None = None, **config: Any) -> Admin:
        config.setdefault("state_dir", str(tmp_path / "state"))
        ct = ControllerThread(
            policy or sync_policy(min_learners=2, rounds=3), [np.zeros(10, np.float32)], **config
        )
        admin = Admin(ct, revoked_file)
        made.append(admin)
        return admin

    yield make
    for admin in made:
        admin.close()


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "metis_async.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_a_call_without_the_token_is_refused(admin_factory: Any) -> None:
    admin = admin_factory()
    stranger = AdminClient(Target(admin.address, "wrong-token-wrong-token"), timeout_seconds=5)

    with pytest.raises(AdminError, match="UNAUTHENTICATED"):
        stranger.status()
    with pytest.raises(AdminError, match="UNAUTHENTICATED"):
        stranger.pause()
    stranger.close()

    assert admin.client.status().state != "paused"


@pytest.mark.parametrize("workers", [0, 2], ids=["one-process", "two-workers"])
def test_status_and_learners_describe_the_rounds(admin_factory: Any, workers: int) -> None:
    admin = admin_factory(workers=workers)

    summaries = ShiftLearners(admin.ct.address, {"a": 0.1, "b": 0.3}).join(20)
    assert all(not isinstance(s, BaseException) for s in summaries), summaries
    status = admin.client.status()
    page = admin.client.learners(sort="learner_id")

    assert (status.version, status.versions_committed, status.state) == (3, 3, "finished")
    assert status.updates_accepted == 6
    summary = json.loads(status.summary_json)
    assert [v["version"] for v in summary["versions"]] == [1, 2, 3]
    assert all(v["updates"] == 2 for v in summary["versions"])
    assert summary["policy"]["parameters"]["min_learners"] == 2
    assert summary["participation"]["contributing"] == 2
    assert [(r.learner_id, r.accepted, r.last_staleness) for r in page.learners] == [
        ("a", 3, 0),
        ("b", 3, 0),
    ]
    assert page.total == 2
    assert status.workers == workers


def _status_while_paused_then_resume(admin: Admin, learners: ShiftLearners) -> tuple[Any, Any]:
    """The status once the learners have connected and waited; then resume and run them out."""
    threading.Event().wait(1.5)
    paused = admin.client.status()
    admin.client.resume()
    return paused, learners.join(20)


def test_a_paused_federation_commits_nothing_until_resumed(admin_factory: Any) -> None:
    admin = admin_factory()
    admin.client.pause("maintenance")
    learners = ShiftLearners(admin.ct.address, {"a": 0.1, "b": 0.3})

    paused, summaries = _status_while_paused_then_resume(admin, learners)

    assert (paused.state, paused.version, paused.learners_connected) == ("paused", 0, 2)
    assert all(not isinstance(s, BaseException) for s in summaries), summaries
    assert admin.client.status().version == 3
    np.testing.assert_allclose(admin.ct.model(), np.full(10, 3 * 0.2), atol=1e-6)


def test_a_pause_survives_a_restart_until_resumed(admin_factory: Any, tmp_path: Path) -> None:
    before = admin_factory(sync_policy(min_learners=1, rounds=2))
    before.client.pause("maintenance")
    before.close()  # the controller stops (a crash or a systemd restart) while paused

    after = admin_factory(sync_policy(min_learners=1, rounds=2))
    learners = ShiftLearners(after.ct.address, {"a": 0.5})

    restarted, summaries = _status_while_paused_then_resume(after, learners)

    assert (restarted.state, restarted.version, restarted.learners_connected) == ("paused", 0, 1)
    assert all(not isinstance(s, BaseException) for s in summaries), summaries
    assert after.client.status().version == 2
    assert not (tmp_path / "state" / "paused.json").exists()  # the next restart trains


@pytest.mark.parametrize("workers", [0, 2], ids=["one-process", "two-workers"])
def test_last_seen_counts_the_heartbeats_of_a_waiting_learner(
    admin_factory: Any, workers: int
) -> None:
    # the federation needs two: the only learner waits, sending nothing but heartbeats
    admin = admin_factory(
        sync_policy(min_learners=2, rounds=1), heartbeat_interval_seconds=0.2, workers=workers
    )
    ShiftLearners(admin.ct.address, {"waiting": 0.1})  # stopped with the controller

    threading.Event().wait(2.0)
    [row] = admin.client.learners().learners

    assert row.learner_id == "waiting"
    assert row.connected_seconds > 1.5
    assert row.last_seen_seconds < 1.0  # a heartbeat, not its join 2 s ago


def test_updates_that_arrive_while_paused_wait_and_then_count(admin_factory: Any) -> None:
    admin = admin_factory(sync_policy(min_learners=2, rounds=1))
    learners = {"a": ShiftLearner(0.1, 1, delay=0.8), "b": ShiftLearner(0.3, 1, delay=0.8)}
    runner = threading.Thread(target=run_in_threads, args=(admin.ct.address, learners))
    runner.start()
    for _ in range(200):  # both are training
        if admin.client.summary()["learners"]["training"] == 2:
            break
        threading.Event().wait(0.02)

    admin.client.pause()
    threading.Event().wait(1.5)  # their uploads arrive and wait
    held = admin.client.status()
    admin.client.resume()
    runner.join(30)
    summary = admin.client.summary()

    assert (held.state, held.version) == ("paused", 0)
    assert held.updates_accepted == 0
    assert summary["version"] == 1
    assert summary["totals"]["updates_accepted"] == 2
    assert sum(summary["staleness"]["counts"]) == 2  # each held update's staleness counted
    np.testing.assert_allclose(admin.ct.model(), np.full(10, 0.2), atol=1e-6)


@pytest.mark.parametrize("workers", [0, 2], ids=["one-process", "two-workers"])
def test_a_kicked_learner_reconnects_and_a_revoked_one_is_refused(
    admin_factory: Any, tmp_path: Path, workers: int
) -> None:
    revoked = tmp_path / "revoked.txt"
    admin = admin_factory(
        sync_policy(min_learners=3, rounds=1), revoked_file=str(revoked), workers=workers
    )
    slow = threading.Thread(
        target=run_in_threads,
        args=(admin.ct.address, {"a": ShiftLearner(0.1, 1), "b": ShiftLearner(0.1, 1)}),
        daemon=True,
    )
    slow.start()  # two of three: the round waits
    for _ in range(100):
        if admin.client.status().learners_connected == 2:
            break
        threading.Event().wait(0.05)
    threading.Event().wait(0.3)  # `a` has been connected a while

    kicked = admin.client.kick("a", "testing")
    kicked_at = time.monotonic()
    rejoined = False
    for _ in range(100):  # its reconnect: connected again, in a session younger than the kick
        (row,) = [r for r in admin.client.learners().learners if r.learner_id == "a"]
        if row.connected and row.connected_seconds < time.monotonic() - kicked_at:
            rejoined = True
            break
        threading.Event().wait(0.05)
    revoked_reply = admin.client.revoke("b", "compromised")
    with pytest.raises(AdminError, match="NOT_FOUND"):
        admin.client.kick("nobody")
    backoff = Backoff(initial_seconds=0.05, max_attempts=2)
    with pytest.raises(LearnerStopped, match="credentials are revoked"):
        run_learner(admin.ct.address, ShiftLearner(0.1, 1), learner_id="b", backoff=backoff)

    assert "disconnected" in kicked
    assert rejoined
    assert "disconnected and refused" in revoked_reply
    assert revoked.read_text().splitlines() == ["b"]


def test_checkpoint_and_model_get_through_the_command_line(
    admin_factory: Any, tmp_path: Path
) -> None:
    versions: dict[int, np.ndarray] = {}
    admin = admin_factory(on_commit=lambda v, params: versions.update({v: np.array(params[0])}))
    token_file = create_admin_token(tmp_path / "admin.token")
    token_file.write_text(TOKEN + "\n")  # the token this controller was started with
    summaries = ShiftLearners(admin.ct.address, {"a": 0.1, "b": 0.3}).join(20)
    assert all(not isinstance(s, BaseException) for s in summaries), summaries
    target = ["--admin", admin.address, "--token-file", str(token_file)]

    checkpoint = _cli("checkpoint", *target)
    current = _cli("model", "get", "-o", str(tmp_path / "now.npz"), *target)
    older = _cli("model", "get", "--version", "2", "-o", str(tmp_path / "v2.npz"), *target)
    missing = _cli("model", "get", "--version", "99", "-o", str(tmp_path / "x.npz"), *target)
    status = _cli("status", "--json", *target)
    learners = _cli("learners", "--sort", "accepted", "--desc", *target)

    assert checkpoint.returncode == 0, checkpoint.stderr
    assert checkpoint.stdout.startswith("version 3: ")
    assert Path(checkpoint.stdout.split(": ", 1)[1].strip()).is_file()
    assert current.returncode == 0, current.stderr
    with np.load(tmp_path / "now.npz") as npz:
        np.testing.assert_array_equal(npz["arr_0"], admin.ct.model())
    assert older.returncode == 0, older.stderr
    with np.load(tmp_path / "v2.npz") as npz:
        np.testing.assert_array_equal(npz["arr_0"], versions[2])
    assert missing.returncode == 1
    assert "NOT_FOUND" in missing.stderr
    assert "version 99" in missing.stderr
    assert json.loads(status.stdout)["version"] == 3
    assert learners.returncode == 0, learners.stderr
    assert "learners 1-2 of 2" in learners.stdout


def test_the_command_line_says_where_it_looked(tmp_path: Path) -> None:
    result = _cli("status", "--admin", "127.0.0.1:1")

    assert result.returncode == 1
    assert "no Admin service at 127.0.0.1:1" in result.stderr


def test_an_encrypted_model_is_not_handed_out(admin_factory: Any, tmp_path: Path) -> None:
    from metis_async.secure.aggregate import HomomorphicAggregation
    from metis_async.secure.he import create_he_keys, read_controller_file

    controller_file, _, _ = create_he_keys(tmp_path / "he")
    he = HomomorphicAggregation(*read_controller_file(controller_file))
    admin = admin_factory(he=he)
    encrypted = np.zeros(64, dtype=np.uint8)  # what a committed encrypted version is: bytes

    def publish_encrypted() -> None:
        store = admin.ct.controller.store
        assert store.layout is not None
        store.publish(store.layout, 1, encrypted, [], {})

    admin.ct.read(publish_encrypted)
    with pytest.raises(AdminError, match=r"FAILED_PRECONDITION.*encrypted"):
        admin.client.model()


def test_a_checkpoint_needs_a_state_directory(admin_factory: Any) -> None:
    admin = admin_factory(state_dir=None)

    with pytest.raises(AdminError, match=r"FAILED_PRECONDITION.*state directory"):
        admin.client.checkpoint()


def test_the_summary_counts_staleness_of_asynchronous_updates(admin_factory: Any) -> None:
    from metis_async.protocols import AsynchronousPolicy, AsynchronousSettings, TrainSettings

    policy = AsynchronousPolicy(AsynchronousSettings(rounds=12, train=TrainSettings(local_steps=1)))
    admin = admin_factory(policy)
    learners = {"a": 0.1, "b": 0.2, "c": 0.3}

    summaries = ShiftLearners(admin.ct.address, learners).join(30)
    summary = admin.client.summary()

    assert all(not isinstance(s, BaseException) for s in summaries), summaries
    accepted = summary["totals"]["updates_accepted"]
    assert sum(summary["staleness"]["counts"]) == accepted
    assert [v["version"] for v in summary["versions"]] == list(range(1, 13))
    stale = [v["mean_staleness"] for v in summary["versions"]]
    assert any(s > 0 for s in stale)  # three learners, one update a version: some lag behind
    assert summary["policy"]["name"] == "asynchronous"
