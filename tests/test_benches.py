"""The many-learner benchmark runs end to end at a small size (its figures are in
benches/README.md; here only that it works and reports what it measured)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
LOAD = ROOT / "benches" / "load.py"


def _load(tmp_path: Path, *flags: str) -> dict[str, Any]:
    out = tmp_path / "load.json"
    done = subprocess.run(
        [sys.executable, str(LOAD), *flags, "--json", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    assert json.loads(out.read_text()) == result
    return result


def test_load_runs_rounds_with_every_learner(tmp_path: Path) -> None:
    result = _load(tmp_path, "--learners", "20", "--params", "1000", "--rounds", "3")

    assert result["streams_held"] == 20
    assert result["errors"] == 0
    assert result["learners_shut_down"] == 20
    assert result["round_seconds"] > 0
    assert result["upload_dtypes"] == {"DTYPE_FLOAT32": 20}


def test_load_with_a_codec_uploads_and_downloads_it_and_compares_with_the_bare_server(
    tmp_path: Path,
) -> None:
    result = _load(
        tmp_path, "--learners", "6", "--params", "100000", "--codec", "int8", "--compare-bare"
    )

    assert result["upload_dtypes"] == {"DTYPE_INT8": 6}
    assert result["model_dtypes"] == {"DTYPE_INT8": 6}
    assert result["bare"]["streams_held"] == 6
    assert result["bare"]["upload_dtypes"] == {"DTYPE_FLOAT32": 6}  # the floor moves float32
    assert result["vs_bare"]["first_round_seconds"] > 0
    assert [pair["first"] for pair in result["pairs"]] == ["bare"]  # after a warm-up run
