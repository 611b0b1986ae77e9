"""metis-async: a fast federated-learning controller.

The learner side is light (grpcio, protobuf, numpy): `from metis_async.client import Learner,
run_learner`. The controller lives in `metis_async.server`, the Rust aggregation core behind
`metis_async.aggregation`. Nothing heavy is imported here, so embedding a learner stays cheap.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("metis-async")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
