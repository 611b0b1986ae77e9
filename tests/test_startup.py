"""What the controller's entry points import; what an embedded learner does not."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys

import pytest


def _modules_after(code: str) -> dict[str, bool]:
    probe = (
        f"{code}\nimport json, sys\n"
        "print(json.dumps({m: m in sys.modules for m in ('rich', 'structlog')}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("entry", ["metis_async.cli", "metis_async.workers.worker"])
def test_the_controller_entry_points_load_structlog_without_rich(entry: str) -> None:
    assert _modules_after(f"import {entry}") == {"rich": False, "structlog": True}


def test_rich_stays_importable_after_the_cli() -> None:
    seen = _modules_after("import metis_async.cli\nimport rich.console")
    assert seen["rich"] is True


def test_an_embedded_learner_leaves_structlog_alone() -> None:
    # A program that embeds the learner and uses structlog itself gets structlog as installed.
    assert _modules_after("import metis_async.client") == {"rich": False, "structlog": False}
    seen = _modules_after("import metis_async.client\nimport structlog.dev")
    assert seen == {"rich": True, "structlog": True}


def _plugins_setting(env: dict[str, str]) -> str | None:
    probe = "import metis_async.cli, os\nprint(repr(os.environ.get('PYDANTIC_DISABLE_PLUGINS')))"
    out = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        env=env,
    )
    value: str | None = ast.literal_eval(out.stdout.strip().splitlines()[-1])
    return value


def test_the_controller_skips_pydantic_plugin_discovery() -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYDANTIC_DISABLE_PLUGINS"}
    assert _plugins_setting(env) == "1"


def test_a_pydantic_plugin_setting_of_the_environment_is_kept() -> None:
    env = {**os.environ, "PYDANTIC_DISABLE_PLUGINS": ""}  # empty: plugins load
    assert _plugins_setting(env) == ""
