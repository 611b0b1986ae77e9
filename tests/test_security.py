"""Learner credentials and TLS: signed tokens, revocation, server TLS and mutual TLS, on a real
controller over loopback with keys made by `metis-async keys`."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
import structlog.testing

from metis_async import cli, keys
from metis_async.auth import AuthError, TokenVerifier, issue_token, new_secret, read_secret
from metis_async.client import tls_credentials
from metis_async.telemetry import configure_logging
from tests.conftest import ControllerThread, RawLearner, ShiftLearner, sync_policy
from tests.test_server import _expect_abort, _start_learner

Factory = Callable[..., ControllerThread]
SECRET = new_secret()

# ------------------------------------------------------------------------------ tokens


def test_a_signed_token_admits_its_learner() -> None:
    TokenVerifier(SECRET).check("alice", issue_token(SECRET, "alice", 60))


@pytest.mark.parametrize(
    ("token", "learner_id", "denied", "message"),
    [
        (issue_token(SECRET, "alice", 60), "bob", True, "another learner id"),
        (issue_token(SECRET, "alice", -1), "alice", False, "expired"),
        (issue_token(new_secret(), "alice", 60), "alice", False, "invalid token"),
        ("mat1.bad", "alice", False, "malformed"),
        ("", "alice", False, "invalid token"),
    ],
)
def test_bad_tokens_are_refused(token: str, learner_id: str, denied: bool, message: str) -> None:
    with pytest.raises(AuthError, match=message) as info:
        TokenVerifier(SECRET).check(learner_id, token)

    assert info.value.denied is denied


def test_a_revoked_learner_is_denied_whatever_its_token() -> None:
    verifier = TokenVerifier(SECRET, revoked=frozenset({"alice"}))

    with pytest.raises(AuthError, match="revoked") as info:
        verifier.check("alice", issue_token(SECRET, "alice", 60))
    assert info.value.denied


def test_the_cli_issues_tokens_the_controller_accepts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    secret_file = tmp_path / "secret"
    assert cli.main(["keys", "token-secret", str(secret_file)]) == 0
    capsys.readouterr()

    assert cli.main(["keys", "learner-token", "carol", "--secret", str(secret_file)]) == 0
    token = capsys.readouterr().out.strip()

    TokenVerifier(read_secret(secret_file)).check("carol", token)
    assert secret_file.stat().st_mode & 0o077 == 0  # readable by its owner alone


def test_the_controller_checks_tokens_before_a_session_exists(controller_factory: Factory) -> None:
    ct = controller_factory(sync_policy(min_learners=1, rounds=1), token_secret=SECRET)
    stolen = RawLearner(ct.address, "mallory", token=issue_token(SECRET, "alice", 60))
    forged = RawLearner(ct.address, "alice", token=issue_token(new_secret(), "alice", 60))

    _expect_abort(stolen, grpc.StatusCode.PERMISSION_DENIED, "another learner id")
    _expect_abort(forged, grpc.StatusCode.UNAUTHENTICATED, "invalid token")
    thread, _out = _start_learner(
        ct.address, ShiftLearner(1.0, 1), "alice", token=issue_token(SECRET, "alice", 60)
    )
    assert ct.wait_finished(30)
    thread.join(10)

    assert ct.controller.version == 1
    assert ct.read(lambda: ct.controller.stats.auth_refused_total) == 2


# ------------------------------------------------------------------------------ TLS


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("pki")
    keys.create_ca(directory)
    keys.create_server_certificate(directory, ["localhost", "127.0.0.1"])
    keys.create_learner_certificate(directory, "alice")
    return directory


def _tls(pki: Path, **extra: object) -> dict[str, object]:
    return {
        "tls_cert": (pki / "server.crt").read_bytes(),
        "tls_key": (pki / "server.key").read_bytes(),
        **extra,
    }


def test_learners_train_over_tls(controller_factory: Factory, pki: Path) -> None:
    ct = controller_factory(sync_policy(min_learners=1, rounds=1), **_tls(pki))
    credentials = tls_credentials((pki / "ca.crt").read_bytes())

    thread, _out = _start_learner(ct.address, ShiftLearner(2.0, 1), "a", credentials=credentials)
    assert ct.wait_finished(30)
    thread.join(10)

    np.testing.assert_array_equal(ct.model(), np.full(10, 2.0, np.float32))


def test_a_plaintext_learner_cannot_reach_a_tls_controller(
    controller_factory: Factory, pki: Path
) -> None:
    ct = controller_factory(sync_policy(min_learners=1), **_tls(pki))
    raw = RawLearner(ct.address, "plain")

    with pytest.raises(grpc.RpcError) as info:
        raw.drain()
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]


def test_mutual_tls_binds_the_learner_id_to_its_certificate(
    controller_factory: Factory, pki: Path
) -> None:
    ca = (pki / "ca.crt").read_bytes()
    ct = controller_factory(sync_policy(min_learners=1), **_tls(pki, tls_client_ca=ca))
    alice = tls_credentials(
        ca, (pki / "learner-alice.crt").read_bytes(), (pki / "learner-alice.key").read_bytes()
    )

    welcomed = RawLearner(ct.address, "alice", credentials=alice).until("welcome")
    impostor = RawLearner(ct.address, "bob", credentials=alice)

    assert welcomed.welcome.learner_id == "alice"
    _expect_abort(impostor, grpc.StatusCode.PERMISSION_DENIED, "another learner id")


@pytest.mark.parametrize("workers", [0, 2])
def test_revocations_take_effect_without_a_restart(
    controller_factory: Factory, workers: int
) -> None:
    ct = controller_factory(sync_policy(min_learners=5), token_secret=SECRET, workers=workers)
    token = issue_token(SECRET, "dave", 60)
    before = RawLearner(ct.address, "dave", token=token).until("welcome")
    fresh = dataclasses.replace(ct.controller.config, revoked=frozenset({"dave"}))

    ct.read(lambda: ct.controller.reload_credentials(fresh))
    deadline = time.monotonic() + 10
    refused = False
    while not refused and time.monotonic() < deadline:  # workers take it over their channel
        try:
            RawLearner(ct.address, "dave", token=token).drain()
        except grpc.RpcError as error:
            refused = error.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]
        time.sleep(0.05)

    assert before.welcome.learner_id == "dave"
    assert refused


def test_tokens_never_reach_the_logs(controller_factory: Factory) -> None:
    ct = controller_factory(sync_policy(min_learners=1), token_secret=SECRET)
    token = issue_token(SECRET, "erin", 60)
    wrong = issue_token(new_secret(), "erin", 60)

    configure_logging("debug")  # every event, whatever the suite's level
    try:
        with structlog.testing.capture_logs() as events:
            RawLearner(ct.address, "erin", token=token).until("welcome")
            _expect_abort(
                RawLearner(ct.address, "erin", token=wrong),
                grpc.StatusCode.UNAUTHENTICATED,
                "invalid token",
            )
    finally:
        configure_logging("error")

    assert any(e["event"] == "auth_refused" for e in events), events
    text = repr(events)
    assert token not in text
    assert wrong not in text
    assert SECRET.hex() not in text
