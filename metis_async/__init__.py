"""metis-async: a fast federated-learning controller.

The learner side is light (grpcio, protobuf, numpy): `from metis_async.client import Learner,
run_learner`. The controller lives in `metis_async.server`, the Rust aggregation core behind
`metis_async.aggregation`. Nothing heavy is imported here, so embedding a learner stays cheap.
"""

from __future__ import annotations

__all__ = ["__version__"]


def __getattr__(name: str) -> str:
    # Looked up on first use: importlib.metadata costs ~40 ms of every start (PEP 562).
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            found = version("metis-async")
        except PackageNotFoundError:  # running from a source tree without an install
            found = "0.0.0+unknown"
        globals()["__version__"] = found
        return found
    raise AttributeError(f"module 'metis_async' has no attribute {name!r}")
