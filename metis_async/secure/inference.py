"""Encrypted inference for the trained digits model: concrete-ml, run in its own environment.

The controller aggregates; it does not serve. But the model it trains can be served under fully
homomorphic encryption (TFHE, by concrete-ml): a client encrypts an image, a server computes the
class scores on the ciphertext with the model's weights in the clear, and only the client can
decrypt the result. The server sees ciphertexts of the inputs and outputs, never the values.

concrete-ml pins numpy 1.26, protobuf < 6 and torch, none of which fit the controller's
environment (numpy 2, protobuf 6), so it lives in a virtual environment of its own, created on
first use (`concrete_venv_path`), and `fhe_inference_script.py` runs there as a subprocess. This
module is the controller's side: it reads and checks the model, finds or creates the
environment, writes the script's inputs, runs it with a timeout and parses what it reports.

The exported model takes what `metis_async.examples.digits` feeds its weight matrix minus the
bias column: the 64 pixel intensities of an 8x8 image divided by 16, in [0, 1], row by row.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from metis_async.examples import digits

CONCRETE_ML_REQUIREMENT = "concrete-ml==1.9.0"
"""What the environment installs: the newest concrete-ml on PyPI that installs on Python 3.11."""
VENV_ENV_VAR = "METIS_ASYNC_CONCRETE_VENV"
"""Environment variable naming the concrete-ml environment (overridden by `--venv`)."""
SCRIPT_PATH = Path(__file__).with_name("fhe_inference_script.py")
INPUT_RANGE = (0.0, 1.0)
INPUT_DESCRIPTION = "64 pixel intensities of an 8x8 digit divided by 16, row by row, in [0, 1]"
INSTALL_TIMEOUT_SECONDS = 3600.0
EXPORT_TIMEOUT_SECONDS = 1800.0
_READY_MARKER = "metis-async-ready"
_INSTALL_LOG = "metis-async-install.log"
_SUPPORTED_PYTHON = ((3, 9), (3, 12))  # concrete-ml 1.9.0: Python >= 3.8.1, < 3.13

Progress = Callable[[str], None]


class FheExportError(ValueError):
    """The model cannot be exported: a bad model file, bad options, or concrete-ml failed."""


class ConcreteEnvironmentError(FheExportError):
    """The concrete-ml environment cannot be found, created or used."""


@dataclass(frozen=True)
class DigitsModel:
    """The trained digits model, checked.

    Attributes:
        weights: the 65x10 weight matrix of `metis_async.examples.digits` (float64): rows 0..63
            weigh the scaled pixels, row 64 is the bias.
        source: the file it came from.
        version: the committed model version, when the file says (checkpoints do).
    """

    weights: npt.NDArray[np.float64]
    source: str
    version: int | None = None


@dataclass(frozen=True)
class FheCheck:
    """Encrypted predictions of held-out digits compared with the clear model.

    Attributes:
        samples: how many test digits ran encrypted.
        agreement: fraction whose encrypted prediction equals the clear model's (0..1).
        clear_accuracy: accuracy of the clear model on them (0..1).
        fhe_accuracy: accuracy of the encrypted predictions (0..1).
        ms_per_sample: encrypt + server run + decrypt, one image at a time (milliseconds).
        server_ms_per_sample: the server's share of it (milliseconds).
        keygen_seconds: client key generation (seconds).
        evaluation_key_bytes: size of the evaluation keys the client sends the server (bytes).
        ciphertext_bytes_per_sample: size of one encrypted image (bytes).
        result_bytes_per_sample: size of one encrypted result, the 10 class scores (bytes).
    """

    samples: int
    agreement: float
    clear_accuracy: float
    fhe_accuracy: float
    ms_per_sample: float
    server_ms_per_sample: float
    keygen_seconds: float
    evaluation_key_bytes: int
    ciphertext_bytes_per_sample: int
    result_bytes_per_sample: int


@dataclass(frozen=True)
class FheExport:
    """What `export_fhe` wrote and measured.

    Attributes:
        out_dir: the directory with `client.zip`, `server.zip` and `manifest.json`.
        n_bits: quantization bits of inputs and weights.
        model_version: the model's version, when known.
        concrete_ml_version: the concrete-ml that compiled it.
        compile_seconds: conversion and compilation (seconds).
        total_seconds: the whole subprocess run, check included (seconds).
        environment_seconds: finding (or creating, the first time) the environment (seconds).
        client_zip_bytes: size of the client artefact (bytes).
        server_zip_bytes: size of the server artefact (bytes).
        check: the encrypted check, when one was asked for.
    """

    out_dir: str
    n_bits: int
    model_version: int | None
    concrete_ml_version: str
    compile_seconds: float
    total_seconds: float
    environment_seconds: float
    client_zip_bytes: int
    server_zip_bytes: int
    check: FheCheck | None = None

    def as_dict(self) -> dict[str, object]:
        """A JSON-ready dictionary of every field."""
        return asdict(self)

    def summary(self) -> str:
        """One or two human-readable lines."""
        line = (
            f"wrote {self.out_dir}/client.zip, server.zip, manifest.json "
            f"(n_bits {self.n_bits}, concrete-ml {self.concrete_ml_version}, "
            f"compiled in {self.compile_seconds:.1f} s)"
        )
        if self.check is None:
            return line
        c = self.check
        return (
            f"{line}\n{c.samples} held-out digits encrypted: agreement {c.agreement:.1%}, "
            f"clear accuracy {c.clear_accuracy:.3f}, FHE accuracy {c.fhe_accuracy:.3f}, "
            f"{c.ms_per_sample:.1f} ms per sample ({c.server_ms_per_sample:.1f} ms on the server)"
        )


def load_model(path: str | os.PathLike[str]) -> DigitsModel:
    """Read the digits model from `numpy.savez` output or a controller checkpoint.

    `demo --save-model` and `serve` (`model.save_model`) write the tensors as arr_0, arr_1, ...;
    a `checkpoint-<version>.npz` from a state directory carries the model flat with its layout.

    Raises:
        FheExportError: the file is missing or unreadable, is not the digits model (one 65x10
            matrix), holds non-finite values, or is an encrypted (homomorphic) checkpoint.
    """
    source = Path(path)
    try:
        with np.load(source, allow_pickle=False) as archive:
            names = list(archive.files)
            is_checkpoint = "document" in names and "layout" in names
            arrays = [] if is_checkpoint else [np.asarray(archive[n]) for n in _ordered(names)]
    except FileNotFoundError:
        raise FheExportError(f"{source}: no such file") from None
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise FheExportError(f"{source}: not a readable .npz archive ({error})") from None
    version = None
    if is_checkpoint:
        arrays, version = _from_checkpoint(source)
    return DigitsModel(_checked_weights(arrays, source), str(source), version)


def _ordered(names: list[str]) -> list[str]:
    """arr_0, arr_1, ... in numeric order; anything else is not `numpy.savez(path, *params)`."""
    expected = [f"arr_{i}" for i in range(len(names))]
    if sorted(names) != sorted(expected):
        raise FheExportError(
            f"expected tensors arr_0.. (numpy.savez(path, *parameters)), got keys {sorted(names)}"
        )
    return expected


def _from_checkpoint(source: Path) -> tuple[list[npt.NDArray[np.generic]], int]:
    from metis_async.checkpoints import Checkpoint
    from metis_async.wire import unflatten

    try:
        checkpoint = Checkpoint.from_bytes(source.read_bytes())
    except (OSError, ValueError) as error:
        raise FheExportError(f"{source}: {error}") from None
    if checkpoint.model.dtype == np.uint8:
        raise FheExportError(
            f"{source}: the checkpoint holds an encrypted model (homomorphic aggregation); "
            "export the decrypted model a learner saved instead"
        )
    flat = np.asarray(checkpoint.model, dtype=np.float32)
    try:
        return unflatten(flat, checkpoint.layout), checkpoint.version
    except ValueError as error:
        raise FheExportError(f"{source}: {error}") from None


def _checked_weights(
    arrays: list[npt.NDArray[np.generic]], source: Path
) -> npt.NDArray[np.float64]:
    shape = (digits.NUM_FEATURES, digits.NUM_CLASSES)
    if len(arrays) != 1 or arrays[0].shape != shape:
        shapes = [tuple(a.shape) for a in arrays]
        raise FheExportError(
            f"{source}: expected the digits model, one weight matrix of shape {shape} "
            f"(64 pixels + bias by 10 classes), got {len(arrays)} tensor(s) of shapes {shapes}"
        )
    if not np.issubdtype(arrays[0].dtype, np.floating):
        raise FheExportError(f"{source}: weights have dtype {arrays[0].dtype}, expected float")
    weights = np.array(arrays[0], dtype=np.float64)
    bad = int(np.size(weights) - np.count_nonzero(np.isfinite(weights)))
    if bad:
        raise FheExportError(f"{source}: {bad} weight(s) are not finite (NaN or infinity)")
    return weights


def concrete_venv_path(venv: str | os.PathLike[str] | None = None) -> Path:
    """The concrete-ml environment: `venv`, else $METIS_ASYNC_CONCRETE_VENV, else the cache.

    The default is `$XDG_CACHE_HOME/metis-async/concrete-venv` (`~/.cache/...`).
    """
    if venv:
        return Path(venv).expanduser()
    if os.environ.get(VENV_ENV_VAR):
        return Path(os.environ[VENV_ENV_VAR]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "metis-async" / "concrete-venv"


def ensure_environment(
    venv: str | os.PathLike[str] | None = None,
    *,
    progress: Progress | None = None,
    timeout_seconds: float = INSTALL_TIMEOUT_SECONDS,
) -> Path:
    """Return the python of the concrete-ml environment, creating it on first use.

    An existing environment is used as it is once it imports concrete-ml (so one made by hand,
    say with a CPU-only torch, works); an empty or missing directory becomes a new one with
    `python -m venv` and `pip install` of `CONCRETE_ML_REQUIREMENT` (with torch's CUDA wheels,
    about 6 GB; minutes). Two processes creating the same one wait for each other.

    Raises:
        ConcreteEnvironmentError: the directory is something else, this Python cannot host
            concrete-ml, or the creation failed (the message has the end of pip's log).
    """
    path = concrete_venv_path(venv)
    python = path / "bin" / "python"
    if (path / _READY_MARKER).is_file() and python.exists():
        return python
    if path.exists() and not path.is_dir():
        raise ConcreteEnvironmentError(f"concrete-ml environment {path} is not a directory")
    if path.is_dir() and not python.exists() and any(path.iterdir()):
        raise ConcreteEnvironmentError(
            f"{path} exists but is not a virtual environment (no bin/python); "
            "remove it or name another with --venv"
        )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConcreteEnvironmentError(f"cannot create {path.parent}: {error}") from None
    with _locked(path.parent / f".{path.name}.lock"):
        if (path / _READY_MARKER).is_file() and python.exists():
            return python  # another process finished it while we waited
        found = _probe(python) if python.exists() else None
        if found is not None:  # made by hand: use it as it is
            (path / _READY_MARKER).write_text(f"found concrete-ml {found}\n")
            return python
        _install(path, python, progress, timeout_seconds)
    return python


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    try:
        lock = open(lock_path, "a+")  # noqa: SIM115 - held for the block
    except OSError as error:
        raise ConcreteEnvironmentError(f"cannot lock {lock_path}: {error}") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
    finally:
        lock.close()


def _probe(python: Path) -> str | None:
    """concrete-ml's version in that environment; None when it does not import."""
    code = "from concrete.ml.version import __version__; print(__version__)"
    try:
        done = subprocess.run(
            [str(python), "-I", "-c", code], capture_output=True, text=True, timeout=300
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    return done.stdout.strip() or None


def _install(path: Path, python: Path, progress: Progress | None, timeout_seconds: float) -> None:
    lowest, highest = _SUPPORTED_PYTHON
    if not lowest <= sys.version_info[:2] <= highest:
        raise ConcreteEnvironmentError(
            f"{CONCRETE_ML_REQUIREMENT} needs Python {lowest[0]}.{lowest[1]} to "
            f"{highest[0]}.{highest[1]}, this is {sys.version.split()[0]}: create the "
            "environment with a supported python (python3.11 -m venv DIR; DIR/bin/pip install "
            f"{CONCRETE_ML_REQUIREMENT}) and pass --venv DIR"
        )
    if progress is not None:
        progress(
            f"creating the concrete-ml environment in {path} ({CONCRETE_ML_REQUIREMENT} with "
            "torch and its CUDA wheels: about 6 GB and a few minutes, once)"
        )
    log_path = path / _INSTALL_LOG
    steps = [
        [sys.executable, "-m", "venv", str(path)],
        [str(python), "-m", "pip", "install", "--no-input", CONCRETE_ML_REQUIREMENT],
    ]
    deadline = time.monotonic() + timeout_seconds
    for step in steps:
        path.mkdir(parents=True, exist_ok=True)
        with open(log_path, "a") as log:
            log.write(f"$ {' '.join(step)}\n")
            log.flush()
            try:
                done = subprocess.run(
                    step,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    timeout=max(1.0, deadline - time.monotonic()),
                )
            except subprocess.TimeoutExpired:
                raise ConcreteEnvironmentError(
                    f"creating {path} took over {timeout_seconds:.0f} s; see {log_path}"
                ) from None
            except OSError as error:
                raise ConcreteEnvironmentError(f"cannot run {step[0]}: {error}") from None
        if done.returncode != 0:
            raise ConcreteEnvironmentError(
                f"creating the concrete-ml environment {path} failed at `{' '.join(step[1:4])}` "
                f"(exit status {done.returncode}; is PyPI reachable?):\n{_tail(log_path)}"
            )
    version = _probe(python)
    if version is None:
        raise ConcreteEnvironmentError(f"{path}: concrete-ml installed but does not import")
    (path / _READY_MARKER).write_text(f"{CONCRETE_ML_REQUIREMENT}\nconcrete-ml {version}\n")


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def check_examples(count: int) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """The first `count` digits of the demo's held-out test set, as the exported model's inputs.

    The test split is the one `demo` evaluates on (it does not depend on the learner count).

    Raises:
        FheExportError: `count` is out of range, or scikit-learn (the data) is missing.
    """
    try:
        features, labels = digits.load_digits_federated(1).test
    except ModuleNotFoundError as error:
        raise FheExportError(
            f"the check needs {error.name}: pip install 'metis-async[demo]'"
        ) from None
    if not 0 < count <= labels.size:
        raise FheExportError(f"--check must be in [1, {labels.size}], got {count}")
    return features[:count, : digits.NUM_FEATURES - 1], labels[:count]


def export_fhe(
    model: DigitsModel,
    out_dir: str | os.PathLike[str],
    *,
    n_bits: int = 8,
    venv: str | os.PathLike[str] | None = None,
    check: int = 0,
    calibration_samples: int = 1000,
    seed: int = 0,
    progress: Progress | None = None,
    timeout_seconds: float = EXPORT_TIMEOUT_SECONDS,
) -> FheExport:
    """Compile `model` for encrypted inference and save the client and server artefacts.

    Writes `out_dir/client.zip` (quantizers and the client's circuit specification: what a client
    needs to make keys, encrypt and decrypt), `out_dir/server.zip` (the compiled circuit, with
    the weights in the clear) and `out_dir/manifest.json`. With `check` > 0 it then runs that
    many held-out digits encrypted through the saved artefacts and compares with the clear model.

    Args:
        model: the trained model (`load_model`).
        out_dir: output directory (created; existing artefacts are replaced).
        n_bits: quantization bits of inputs and weights (2..16).
        venv: the concrete-ml environment (`concrete_venv_path`).
        check: held-out digits to run encrypted (0 for none).
        calibration_samples: synthetic uniform inputs used to calibrate, besides the corners.
        seed: seed of the synthetic inputs.
        progress: called with one line before slow one-time work (creating the environment).
        timeout_seconds: limit of the compile-and-check subprocess (seconds).

    Raises:
        FheExportError: bad options, or the subprocess failed (the message says why).
        ConcreteEnvironmentError: the environment cannot be found or created.
    """
    if not 2 <= n_bits <= 16:
        raise FheExportError(f"n_bits must be in [2, 16], got {n_bits}")
    if calibration_samples < 0:
        raise FheExportError(f"calibration_samples must be >= 0, got {calibration_samples}")
    check_x, check_y = check_examples(check) if check else (None, None)
    started = time.perf_counter()
    python = ensure_environment(venv, progress=progress)
    environment_seconds = time.perf_counter() - started
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise FheExportError(f"cannot create {out}: {error}") from None

    with tempfile.TemporaryDirectory(prefix="metis-async-fhe-") as work:
        work_dir = Path(work)
        arrays: dict[str, npt.NDArray[np.generic]] = {
            "coef": np.ascontiguousarray(model.weights[:-1].T),  # (classes, 64 pixels)
            "intercept": np.ascontiguousarray(model.weights[-1]),
        }
        if check_x is not None and check_y is not None:
            arrays["check_x"], arrays["check_y"] = check_x, check_y
        np.savez(work_dir / "arrays.npz", allow_pickle=False, **arrays)
        request = {
            "arrays": str(work_dir / "arrays.npz"),
            "result": str(work_dir / "result.json"),
            "out_dir": str(out.resolve()),
            "n_bits": n_bits,
            "input_low": INPUT_RANGE[0],
            "input_high": INPUT_RANGE[1],
            "input_description": INPUT_DESCRIPTION,
            "calibration_samples": calibration_samples,
            "seed": seed,
            "model_version": model.version,
            "source": model.source,
        }
        (work_dir / "request.json").write_text(json.dumps(request))
        started = time.perf_counter()
        document = _run_script(python, work_dir, timeout_seconds)
        total_seconds = time.perf_counter() - started
    return _parse(document, out, environment_seconds, total_seconds)


def _run_script(python: Path, work_dir: Path, timeout_seconds: float) -> dict[str, Any]:
    log_path = work_dir / "script.log"
    command = [str(python), "-I", str(SCRIPT_PATH), str(work_dir / "request.json")]
    with open(log_path, "w") as log:
        try:
            done = subprocess.run(
                command,
                cwd=work_dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=timeout_seconds,
            )
        except subprocess.TimeoutExpired:
            raise FheExportError(
                f"concrete-ml compile took over {timeout_seconds:.0f} s:\n{_tail(log_path)}"
            ) from None
        except OSError as error:
            raise ConcreteEnvironmentError(f"cannot run {python}: {error}") from None
    try:
        document = json.loads((work_dir / "result.json").read_text())
    except (OSError, ValueError):
        document = None
    if not isinstance(document, dict) or "error" in document or done.returncode != 0:
        reason = document.get("error") if isinstance(document, dict) else None
        raise FheExportError(
            f"concrete-ml failed (exit status {done.returncode}): "
            f"{reason or 'no result'}\n{_tail(log_path)}"
        )
    return document


def _parse(
    document: dict[str, Any], out: Path, environment_seconds: float, total_seconds: float
) -> FheExport:
    """Type the script's JSON; a missing or mistyped field is a failure of the script."""
    try:
        manifest, raw = document["manifest"], document.get("check")
        check = None
        if raw is not None:
            if not raw["sklearn_matches_weights"]:
                raise FheExportError("the scikit-learn model does not reproduce the weights")
            check = FheCheck(
                samples=int(raw["samples"]),
                agreement=float(raw["agreement"]),
                clear_accuracy=float(raw["clear_accuracy"]),
                fhe_accuracy=float(raw["fhe_accuracy"]),
                ms_per_sample=float(raw["ms_per_sample"]),
                server_ms_per_sample=float(raw["server_ms_per_sample"]),
                keygen_seconds=float(raw["keygen_seconds"]),
                evaluation_key_bytes=int(raw["evaluation_key_bytes"]),
                ciphertext_bytes_per_sample=int(raw["ciphertext_bytes_per_sample"]),
                result_bytes_per_sample=int(raw["result_bytes_per_sample"]),
            )
        version = manifest["model_version"]
        return FheExport(
            out_dir=str(out),
            n_bits=int(manifest["n_bits"]),
            model_version=None if version is None else int(version),
            concrete_ml_version=str(manifest["concrete_ml_version"]),
            compile_seconds=float(manifest["compile_seconds"]),
            total_seconds=round(total_seconds, 3),
            environment_seconds=round(environment_seconds, 3),
            client_zip_bytes=int(manifest["files"]["client.zip"]),
            server_zip_bytes=int(manifest["files"]["server.zip"]),
            check=check,
        )
    except (KeyError, TypeError, ValueError) as error:
        if isinstance(error, FheExportError):
            raise
        raise FheExportError(f"unexpected result from the concrete-ml script: {error!r}") from None
