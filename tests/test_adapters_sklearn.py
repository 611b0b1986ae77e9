"""The scikit-learn adapter: shapes, exact round trips, and federations over real gRPC."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from sklearn.linear_model import LinearRegression, LogisticRegression, SGDClassifier, SGDRegressor

from metis_async.client import EvaluateConfig, FitConfig, NDArrays, RunSummary
from metis_async.client.sklearn import LinearEstimator, SklearnLearner, initial_parameters
from metis_async.examples import learner_command
from metis_async.examples.digits import load_digits_federated
from metis_async.examples.sklearn_digits import make_learner
from metis_async.protocols import SynchronousPolicy, SynchronousSettings, TrainSettings
from tests.conftest import ControllerThread, run_in_threads

Factory = Callable[..., ControllerThread]
DOC = Path(__file__).resolve().parents[1] / "docs" / "writing-a-learner.md"
DIGITS = range(10)


def _federate(
    controller_factory: Factory, make: Callable[[int], LinearEstimator], rounds: int
) -> tuple[list[RunSummary], np.ndarray, SklearnLearner]:
    """Train 3 learners on a non-IID digits split for `rounds` synchronous rounds; return their
    summaries, the controller's final flat model, and a learner scoring on held-out digits."""
    federation = load_digits_federated(3, alpha=0.5, seed=0)
    learners = {
        f"sk-{i}": SklearnLearner(make(i), x[:, :64], y, classes=DIGITS, seed=i)
        for i, (x, y) in enumerate(federation.partitions)
    }
    train = TrainSettings(local_steps=0, epochs=1, batch_size=32)
    policy = SynchronousPolicy(SynchronousSettings(min_learners=3, rounds=rounds, train=train))
    ct = controller_factory(policy, initial_model=initial_parameters(64, DIGITS))

    summaries = run_in_threads(ct.address, learners)

    assert ct.wait_finished(30)
    test_x, test_y = federation.test
    scorer = SklearnLearner(make(0), test_x[:, :64], test_y, classes=DIGITS)
    return summaries, ct.model(), scorer


def test_sgd_federation_reaches_accuracy_and_delivers_the_model_exactly(
    controller_factory: Factory,
) -> None:
    summaries, flat, scorer = _federate(
        controller_factory, lambda i: SGDClassifier(loss="log_loss", random_state=i), rounds=5
    )

    final = summaries[0].final_parameters
    assert final is not None
    assert [p.shape for p in final] == [(10, 64), (10,)]
    # the model every learner received is the controller's, value for value
    np.testing.assert_array_equal(np.concatenate([p.reshape(-1) for p in final]), flat)
    for summary in summaries:
        assert summary.tasks_completed == 5
        for got, want in zip(summary.final_parameters or [], final, strict=True):
            np.testing.assert_array_equal(got, want)
    _, _, metrics = scorer.evaluate(final, EvaluateConfig())
    # Measured 0.93 (seed 0) after 5 rounds; the in-process simulation gives 0.93..0.97.
    assert metrics["accuracy"] >= 0.85


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_warm_start_logistic_regression_federation_reaches_accuracy(
    controller_factory: Factory,
) -> None:
    summaries, _, scorer = _federate(
        controller_factory, lambda i: LogisticRegression(max_iter=20), rounds=3
    )

    final = summaries[0].final_parameters
    assert final is not None
    _, _, metrics = scorer.evaluate(final, EvaluateConfig())
    # Measured 0.88 (seed 0; 0.92..0.95 for seeds 1, 2): local optima of very skewed partitions.
    assert metrics["accuracy"] >= 0.8


def test_set_then_get_parameters_round_trips_exactly() -> None:
    x, y = _digits(0)
    learner = SklearnLearner(SGDClassifier(), x, y, classes=DIGITS)
    rng = np.random.default_rng(0)
    parameters = [rng.normal(size=(10, 64)), rng.normal(size=10)]

    learner.set_parameters(parameters)
    got = learner.get_parameters()

    for a, b in zip(got, parameters, strict=True):
        assert a.dtype == np.float64
        np.testing.assert_array_equal(a, b)
    assert got[0] is not learner.estimator.coef_  # type: ignore[attr-defined]


def test_initial_parameters_have_the_estimators_shapes() -> None:
    assert [p.shape for p in initial_parameters(64, DIGITS)] == [(10, 64), (10,)]
    assert [p.shape for p in initial_parameters(5, ["no", "yes"])] == [(1, 5), (1,)]
    assert [p.shape for p in initial_parameters(5)] == [(5,), (1,)]
    assert [p.shape for p in initial_parameters(5, n_targets=3)] == [(3, 5), (3,)]


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_learner_starts_from_zeros_of_the_federation_shapes_even_missing_classes() -> None:
    x, y = _digits(0)
    few = y < 3  # this learner holds three classes of ten
    learner = SklearnLearner(LogisticRegression(), x[few], y[few], classes=DIGITS)

    start = learner.get_parameters()
    trained, _, _ = learner.fit(start, FitConfig())

    assert [p.shape for p in start] == [p.shape for p in trained] == [(10, 64), (10,)]
    assert not np.any(start[0])
    assert np.any(trained[0])


def test_partial_fit_runs_the_configured_minibatches() -> None:
    x, y = _digits(0)
    learner = SklearnLearner(SGDClassifier(), x, y, classes=DIGITS)

    by_steps = learner.fit(learner.get_parameters(), FitConfig(local_steps=3, batch_size=8))
    by_epochs = learner.fit(learner.get_parameters(), FitConfig(epochs=2, batch_size=100))

    assert by_steps.metrics["steps"] == 3
    assert by_epochs.metrics["steps"] == 2 * -(-y.size // 100)


def test_a_classifier_without_classes_is_rejected() -> None:
    x, y = _digits(0)

    with pytest.raises(ValueError, match="classes"):
        SklearnLearner(SGDClassifier(), x, y)


def test_parameters_of_the_wrong_shape_are_rejected() -> None:
    x, y = _digits(0)
    learner = SklearnLearner(SGDClassifier(), x, y, classes=DIGITS)

    with pytest.raises(ValueError, match="shapes"):
        learner.set_parameters([np.zeros((10, 65)), np.zeros(10)])


@pytest.mark.parametrize("estimator", [SGDRegressor(random_state=0), LinearRegression()])
def test_regressors_fit_a_linear_target(estimator: LinearEstimator) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 4))
    y = x @ np.array([1.0, -2.0, 0.5, 3.0]) + 0.7
    learner = SklearnLearner(estimator, x, y)

    trained, _, _ = learner.fit(learner.get_parameters(), FitConfig(epochs=5, batch_size=16))
    _, _, metrics = learner.evaluate(trained, EvaluateConfig())

    assert [p.shape for p in trained] == [(4,), (1,)]
    assert metrics["r2"] > 0.99


def test_client_import_pulls_in_neither_torch_nor_sklearn() -> None:
    code = "import sys, metis_async.client; print(sorted({'torch', 'sklearn'} & set(sys.modules)))"

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)

    assert out.stdout.strip() == "[]"


def test_the_docs_commands_train_the_sklearn_example(tmp_path: Path) -> None:
    outputs, model = run_doc_commands("metis_async.examples.sklearn_digits", tmp_path)

    for out in outputs:
        assert json.loads(out.strip().splitlines()[-1])["tasks_completed"] == 5
    test_x, test_y = learner_command.held_out_digits(2)
    _, _, metrics = make_learner(test_x, test_y).evaluate(model, EvaluateConfig())
    assert metrics["accuracy"] >= 0.85  # measured 0.93


def run_doc_commands(example: str, workdir: Path) -> tuple[list[str], NDArrays]:
    """Run the `$` lines of docs/writing-a-learner.md for `metis-async serve` and `example`,
    in `workdir` on a free port; return each learner's stdout and the model the controller
    saved (final.npz)."""
    lines = re.findall(r"^\$ (.+)$", DOC.read_text(), flags=re.MULTILINE)
    serve = next(line for line in lines if line.startswith("metis-async serve"))
    learns = [line for line in lines if f" -m {example} " in line]
    assert len(learns) == 2, learns
    port = _free_port()
    server = subprocess.Popen(
        _argv(serve, port),
        cwd=workdir,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    learners = [
        subprocess.Popen(
            _argv(line, port),
            cwd=workdir,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for line in learns
    ]
    try:
        _, server_log = server.communicate(timeout=120)
        results = [p.communicate(timeout=30) for p in learners]
    finally:
        for p in [server, *learners]:
            if p.poll() is None:
                p.kill()
    assert server.returncode == 0, server_log
    for p, (_, err) in zip(learners, results, strict=True):
        assert p.returncode == 0, err
    with np.load(workdir / "final.npz") as npz:
        model: NDArrays = [npz[f"arr_{i}"] for i in range(len(npz.files))]
    return [out for out, _ in results], model


def _digits(index: int) -> tuple[np.ndarray, np.ndarray]:
    x, y = load_digits_federated(3, seed=0).partitions[index]
    return x[:, :64], y


def _argv(command: str, port: int) -> list[str]:
    """A doc command line as argv for this interpreter, on `port` instead of 50051."""
    words = command.replace("50051", str(port)).split()
    if words[0] == "metis-async":
        return [sys.executable, "-m", "metis_async.cli", *words[1:]]
    assert words[0] == "python"
    return [sys.executable, *words[1:]]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
