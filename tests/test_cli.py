"""The `metis-async` command end to end: demo, serve + learner processes, and the light client."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

CLI = [sys.executable, "-m", "metis_async.cli"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_demo_json_reports_a_trained_model() -> None:
    result = subprocess.run(
        [*CLI, "demo", "--json", "--no-progress", "--learners", "4", "--rounds", "6"],
        capture_output=True,
        text=True,
        timeout=180,
        check=True,
    )

    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["protocol"] == "synchronous"
    assert report["learners"] == 4
    assert report["versions"] == 6
    assert report["final_accuracy"] >= 0.85
    assert report["wall_seconds"] > 0
    assert report["learner_exit_codes"] == [0, 0, 0, 0]


def test_serve_and_learner_commands_train_and_save_the_model(tmp_path: Path) -> None:
    port = _free_port()
    saved = tmp_path / "final.npz"
    server = subprocess.Popen(
        [
            *CLI,
            "serve",
            "--port",
            str(port),
            "--rounds",
            "3",
            "--min-learners",
            "2",
            "--local-steps",
            "10",
            "--lr",
            "0.5",
            "--save-model",
            str(saved),
            "--log-json",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    learners = [
        subprocess.Popen(
            [
                *CLI,
                "learner",
                "--address",
                f"127.0.0.1:{port}",
                "--index",
                str(i),
                "--of",
                "2",
                "--log-level",
                "warning",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    try:
        _, server_log = server.communicate(timeout=120)
        outputs = [p.communicate(timeout=30)[0] for p in learners]
    finally:
        for p in [server, *learners]:
            if p.poll() is None:
                p.kill()

    assert server.returncode == 0, server_log
    events = [json.loads(line) for line in server_log.splitlines() if line.startswith("{")]
    committed = [e["version"] for e in events if e["event"] == "version_committed"]
    assert committed == [1, 2, 3]
    with np.load(saved) as npz:
        assert npz["arr_0"].shape == (65, 10)
        assert np.abs(npz["arr_0"]).sum() > 0  # trained away from the zero start
    for out in outputs:
        summary = json.loads(out.strip().splitlines()[-1])
        assert summary["tasks_completed"] == 3


def test_client_import_needs_no_server_side_packages() -> None:
    code = (
        "import sys; import metis_async.client, metis_async.examples.digits; "
        "heavy = {'uvloop', 'structlog', 'rich', 'metis_async.server', 'metis_async._core'}; "
        "print(sorted(heavy & set(sys.modules)))"
    )

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)

    assert out.stdout.strip() == "[]"


def test_serve_rejects_bad_settings_with_a_clear_message() -> None:
    result = subprocess.run(
        [*CLI, "serve", "--port", "0", "--over-selection", "0.5"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 2
    assert "over_selection must be >= 1.0" in result.stderr


def test_serve_drains_on_sigterm_and_learners_come_back_after_a_restart() -> None:
    port = _free_port()
    serve = [*CLI, "serve", "--port", str(port), "--log-json"]
    server = subprocess.Popen(
        [*serve, "--min-learners", "5"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    learner = subprocess.Popen(
        [*CLI, "learner", "--address", f"127.0.0.1:{port}", "--log-level", "info"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    restarted: subprocess.Popen[str] | None = None
    try:
        _wait_for_line(server, '"learner_joined"')
        server.send_signal(signal.SIGTERM)
        _, server_log = server.communicate(timeout=30)
        # systemctl restart: a new controller on the same port; the learner comes back to it.
        restarted = subprocess.Popen(
            [*serve, "--rounds", "1", "--min-learners", "1", "--local-steps", "1"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        _, restarted_log = restarted.communicate(timeout=60)
        learner_out, _ = learner.communicate(timeout=30)
    finally:
        for p in (server, learner, restarted):
            if p is not None and p.poll() is None:
                p.kill()

    assert server.returncode == 0, server_log
    assert '"draining"' in server_log
    assert restarted.returncode == 0, restarted_log
    summary = json.loads(learner_out.strip().splitlines()[-1])
    assert summary["sessions"] == 2
    assert summary["shutdown_reason"] == "1 versions committed"


def _wait_for_line(process: subprocess.Popen[str], text: str, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        line = process.stderr.readline() if process.stderr else ""
        if text in line:
            return
    raise AssertionError(f"no {text} from the process in {seconds} s")
