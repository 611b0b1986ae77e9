"""Compile a trained linear classifier for encrypted inference; runs inside the concrete-ml venv.

This file is not imported by `metis_async`: `metis_async.secure.inference` runs it by path with
the python of a separate virtual environment that holds concrete-ml (which pins numpy 1.26,
protobuf < 6 and torch, none of which can share the controller's environment). So it imports
only the standard library, numpy, scikit-learn and concrete-ml, and works on numpy 1.26 and 2.

    python -I fhe_inference_script.py REQUEST.json

REQUEST.json (written by `inference.py`) names an `.npz` with the model (`coef`, shape
(classes, features); `intercept`, shape (classes,)) and optional check data (`check_x`,
`check_y`), the output directory, the quantization bits and the input range. The script builds
a scikit-learn `LogisticRegression` with those weights, converts it with concrete-ml's
`from_sklearn_model`, compiles it on synthetic inputs spanning the input range (the controller
holds no data; see `_calibration_inputs`), and saves `client.zip`, `server.zip` and
`manifest.json`. With check data it then loads the saved artefacts, makes keys, and runs every
check example encrypted: encrypt (client), run (server, ciphertexts only), decrypt (client).
It writes its result as JSON to the request's `result` path, `{"error": ...}` on failure.
"""

from __future__ import annotations

import importlib
import json
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

MANIFEST_FORMAT = 1


def _classifier(coef: Any, intercept: Any) -> Any:
    """A fitted scikit-learn `LogisticRegression` that scores `x @ coef.T + intercept`."""
    linear_model = importlib.import_module("sklearn.linear_model")
    n_classes, n_features = coef.shape
    model = linear_model.LogisticRegression()  # multinomial for > 2 classes
    # Setting the fitted attributes is how scikit-learn models are restored without refitting.
    model.coef_ = np.array(coef, dtype=np.float64)
    model.intercept_ = np.array(intercept, dtype=np.float64)
    model.classes_ = np.arange(n_classes)
    model.n_features_in_ = n_features
    return model


def _calibration_inputs(request: dict[str, Any], coef: Any) -> Any:
    """Synthetic inputs that bound every value the encrypted circuit can meet.

    concrete-ml sizes the circuit's integers from the values the calibration inputs produce, and
    an encrypted accumulator that leaves that range wraps around (a wrong class, silently).
    Uniform samples of the input box make small class scores; real inputs (images aligned with
    the weights) make larger ones. So besides the uniform samples the set holds, for each class,
    the two corners of the box that maximize and minimize its score (each pixel at the top of
    the range where the class's weight is positive, at the bottom elsewhere, and the reverse):
    no input inside the range can then overflow, and the input range is calibrated exactly.
    """
    low, high = float(request["input_low"]), float(request["input_high"])
    rng = np.random.default_rng(int(request["seed"]))
    n_features = coef.shape[1]
    samples = rng.uniform(low, high, size=(int(request["calibration_samples"]), n_features))
    maximizing = np.where(coef > 0, high, low)
    minimizing = np.where(coef > 0, low, high)
    corners = np.array([[low] * n_features, [high] * n_features])
    return np.vstack([samples, maximizing, minimizing, corners])


def _export(request: dict[str, Any], coef: Any, intercept: Any) -> dict[str, Any]:
    """Convert, compile and save; return the manifest."""
    concrete_sklearn = importlib.import_module("concrete.ml.sklearn")
    deployment = importlib.import_module("concrete.ml.deployment")
    version = importlib.import_module("concrete.ml.version").__version__

    clear = _classifier(coef, intercept)
    calibration = _calibration_inputs(request, coef)
    n_bits = int(request["n_bits"])
    started = time.perf_counter()
    model = concrete_sklearn.LogisticRegression.from_sklearn_model(
        clear, calibration, n_bits=n_bits
    )
    model.compile(calibration)
    compile_seconds = time.perf_counter() - started

    out_dir = Path(request["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    # FHEModelDev refuses a non-empty directory: save into a fresh one, then move the files in.
    staging = Path(tempfile.mkdtemp(prefix=".fhe-staging-", dir=out_dir))
    try:
        started = time.perf_counter()
        deployment.FHEModelDev(str(staging), model).save()
        save_seconds = time.perf_counter() - started
        for name in ("client.zip", "server.zip"):
            (staging / name).replace(out_dir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "model": "multinomial logistic regression",
        "n_features": int(coef.shape[1]),
        "n_classes": int(coef.shape[0]),
        "input": request["input_description"],
        "input_range": [float(request["input_low"]), float(request["input_high"])],
        "n_bits": n_bits,
        "model_version": request["model_version"],
        "source": request["source"],
        "calibration": {
            "distribution": "uniform in input_range, plus the corners that bound each class score",
            "samples": int(calibration.shape[0]),
            "seed": int(request["seed"]),
        },
        "concrete_ml_version": version,
        "python": ".".join(str(part) for part in sys.version_info[:3]),
        "compile_seconds": round(compile_seconds, 3),
        "save_seconds": round(save_seconds, 3),
        "files": {name: (out_dir / name).stat().st_size for name in ("client.zip", "server.zip")},
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _check(out_dir: Path, x: Any, y: Any, coef: Any, intercept: Any) -> dict[str, Any]:
    """Run `x` encrypted through the saved artefacts and compare with the clear model."""
    deployment = importlib.import_module("concrete.ml.deployment")
    clear = _classifier(coef, intercept)
    clear_predictions = clear.predict(x)
    scores = x @ np.asarray(coef, dtype=np.float64).T + np.asarray(intercept, dtype=np.float64)
    sklearn_faithful = bool(np.array_equal(clear_predictions, np.argmax(scores, axis=1)))

    with tempfile.TemporaryDirectory(prefix="fhe-keys-") as key_dir:
        client = deployment.FHEModelClient(str(out_dir), key_dir=key_dir)
        server = deployment.FHEModelServer(str(out_dir))
        started = time.perf_counter()
        client.generate_private_and_evaluation_keys()
        evaluation_keys = client.get_serialized_evaluation_keys()
        keygen_seconds = time.perf_counter() - started

        fhe_predictions = np.empty(len(x), dtype=np.int64)
        server_seconds = 0.0
        ciphertext_bytes = result_bytes = 0
        started = time.perf_counter()
        for i in range(len(x)):
            encrypted = client.quantize_encrypt_serialize(x[i : i + 1])
            ciphertext_bytes += len(encrypted)
            server_started = time.perf_counter()
            result = server.run(encrypted, evaluation_keys)
            server_seconds += time.perf_counter() - server_started
            result_bytes += len(result)
            probabilities = client.deserialize_decrypt_dequantize(result)
            fhe_predictions[i] = int(np.argmax(probabilities, axis=1)[0])
        total_seconds = time.perf_counter() - started

    n = max(len(x), 1)
    return {
        "samples": len(x),
        "agreement": float(np.mean(fhe_predictions == clear_predictions)),
        "clear_accuracy": float(np.mean(clear_predictions == y)),
        "fhe_accuracy": float(np.mean(fhe_predictions == y)),
        "ms_per_sample": round(1000.0 * total_seconds / n, 3),
        "server_ms_per_sample": round(1000.0 * server_seconds / n, 3),
        "keygen_seconds": round(keygen_seconds, 3),
        "evaluation_key_bytes": len(evaluation_keys),
        "ciphertext_bytes_per_sample": ciphertext_bytes // n,
        "result_bytes_per_sample": result_bytes // n,
        "sklearn_matches_weights": sklearn_faithful,
        "fhe_predictions": [int(p) for p in fhe_predictions],
        "clear_predictions": [int(p) for p in clear_predictions],
    }


def run(request: dict[str, Any]) -> dict[str, Any]:
    """Export (and check, when the request carries check data); return the result document."""
    with np.load(request["arrays"], allow_pickle=False) as arrays:
        coef = np.array(arrays["coef"], dtype=np.float64)
        intercept = np.array(arrays["intercept"], dtype=np.float64)
        check_x = np.array(arrays["check_x"], dtype=np.float64) if "check_x" in arrays else None
        check_y = np.array(arrays["check_y"], dtype=np.int64) if "check_y" in arrays else None
    result: dict[str, Any] = {"manifest": _export(request, coef, intercept)}
    if check_x is not None and check_y is not None and len(check_x):
        result["check"] = _check(Path(request["out_dir"]), check_x, check_y, coef, intercept)
    return result


def main(argv: list[str]) -> int:
    """Entry point: `fhe_inference_script.py REQUEST.json`; exit status 0 on success."""
    if len(argv) != 1:
        print("usage: fhe_inference_script.py REQUEST.json", file=sys.stderr)
        return 2
    request = json.loads(Path(argv[0]).read_text())
    result_path = Path(request["result"])
    try:
        document = run(request)
    except Exception as error:  # reported to the controller side, which raises it there
        traceback.print_exc()
        result_path.write_text(json.dumps({"error": f"{type(error).__name__}: {error}"}))
        return 1
    result_path.write_text(json.dumps(document))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
