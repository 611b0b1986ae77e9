"""`metis-async export-fhe`: the trained digits model compiled by concrete-ml, run encrypted.

The fast tests check the controller's side (model files, options, the environment) without
concrete-ml. The slow one runs the real thing: it creates the concrete-ml environment on first
use (about 6 GB, minutes; `METIS_ASYNC_CONCRETE_VENV` picks where), compiles, and predicts
held-out digits under FHE.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from metis_async.checkpoints import Checkpoint
from metis_async.cli import main
from metis_async.examples import digits
from metis_async.secure import inference
from metis_async.wire import flatten, make_layout


def _trained_weights() -> np.ndarray:
    """A quick centralized fit of the digits model (about 0.95 test accuracy)."""
    x, y = digits.load_digits_federated(1, alpha=100.0).partitions[0]
    weights, _ = digits.sgd(
        np.zeros((digits.NUM_FEATURES, digits.NUM_CLASSES)),
        x,
        y,
        steps=600,
        batch_size=32,
        learning_rate=0.5,
        rng=np.random.default_rng(0),
    )
    return weights.astype(np.float32)


def _checkpoint_bytes(weights: np.ndarray, *, encrypted: bool = False) -> bytes:
    layout = make_layout([weights])
    model = np.zeros(16, dtype=np.uint8) if encrypted else flatten([weights], layout)
    return Checkpoint(run_id="r", version=7, incarnation=1, layout=layout, model=model).to_bytes()


def test_a_model_of_the_wrong_shape_is_refused_with_its_shapes(tmp_path: Path) -> None:
    path = tmp_path / "model.npz"
    np.savez(path, np.zeros((64, 10), np.float32), np.zeros(10, np.float32))

    with pytest.raises(inference.FheExportError, match=r"\(65, 10\).*\[\(64, 10\), \(10,\)\]"):
        inference.load_model(path)


def test_non_finite_weights_are_refused(tmp_path: Path) -> None:
    weights = np.zeros((65, 10), np.float32)
    weights[3, 4] = np.nan
    weights[0, 0] = np.inf
    path = tmp_path / "model.npz"
    np.savez(path, weights)

    with pytest.raises(inference.FheExportError, match="2 weight"):
        inference.load_model(path)


def test_a_file_that_is_not_an_npz_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.npz"
    path.write_text("not a model")

    with pytest.raises(inference.FheExportError, match=r"not a readable \.npz"):
        inference.load_model(path)


def test_a_clear_checkpoint_gives_the_model_and_its_version(tmp_path: Path) -> None:
    weights = np.arange(650, dtype=np.float32).reshape(65, 10)
    path = tmp_path / "checkpoint-0000000007.npz"
    path.write_bytes(_checkpoint_bytes(weights))

    model = inference.load_model(path)

    assert model.version == 7
    np.testing.assert_array_equal(model.weights, weights)


def test_an_encrypted_checkpoint_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint-0000000007.npz"
    path.write_bytes(_checkpoint_bytes(np.zeros((65, 10), np.float32), encrypted=True))

    with pytest.raises(inference.FheExportError, match="encrypted model"):
        inference.load_model(path)


def test_a_venv_directory_without_python_is_refused(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    venv.mkdir()
    (venv / "something").write_text("")

    with pytest.raises(inference.ConcreteEnvironmentError, match="no bin/python"):
        inference.ensure_environment(venv)


def test_a_failing_environment_python_is_reported_with_its_output(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    fake = venv / "bin" / "python"
    fake.write_text("#!/bin/sh\necho 'ImportError: no concrete here' >&2\nexit 3\n")
    fake.chmod(0o755)
    (venv / "metis-async-ready").write_text("")
    model = inference.DigitsModel(np.zeros((65, 10)), "zeros")

    with pytest.raises(inference.FheExportError, match=r"exit status 3(.|\n)*no concrete here"):
        inference.export_fhe(model, tmp_path / "out", venv=venv)


def test_options_out_of_range_are_refused_before_any_work(tmp_path: Path) -> None:
    model = inference.DigitsModel(np.zeros((65, 10)), "zeros")
    missing = tmp_path / "never-created"

    with pytest.raises(inference.FheExportError, match="n_bits"):
        inference.export_fhe(model, tmp_path / "out", n_bits=1, venv=missing)
    with pytest.raises(inference.FheExportError, match="--check"):
        inference.export_fhe(model, tmp_path / "out", check=100_000, venv=missing)
    assert not missing.exists()


def test_the_command_reports_a_bad_model_as_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "model.npz"
    np.savez(path, np.full((65, 10), np.nan, np.float32))

    status = main(["export-fhe", str(path), "-o", str(tmp_path / "out")])

    assert status == 2
    assert "650 weight(s) are not finite" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.timeout(3600)  # the first run creates the concrete-ml environment
def test_encrypted_predictions_agree_with_the_clear_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        inference.ensure_environment()
    except inference.ConcreteEnvironmentError as error:
        pytest.skip(f"no concrete-ml environment (PyPI unreachable?): {error}")
    model_path = tmp_path / "model.npz"
    np.savez(model_path, _trained_weights())
    out = tmp_path / "fhe"

    status = main(["export-fhe", str(model_path), "-o", str(out), "--check", "20", "--json"])

    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert status == 0
    assert report["check"]["samples"] == 20
    assert report["check"]["agreement"] >= 0.95
    assert report["check"]["clear_accuracy"] >= 0.85
    assert {p.name for p in out.iterdir()} == {"client.zip", "server.zip", "manifest.json"}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["n_bits"] == 8
    assert manifest["concrete_ml_version"] == report["concrete_ml_version"]
