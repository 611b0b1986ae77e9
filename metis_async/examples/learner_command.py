"""The command line the example learners share: which controller, which partition of the digits.

`metis-async learner` runs the numpy digits learner; the adapter examples
(`python -m metis_async.examples.sklearn_digits`, `...torch_digits`) take the same flags for the
controller and the partition, so one `metis-async serve` can train any of them. TLS and
homomorphic encryption flags are left to `metis-async learner`.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from metis_async.client import Learner, run_learner
from metis_async.examples import digits
from metis_async.examples.flags import add_partition_flags

PIXELS = digits.NUM_FEATURES - 1
"""Features the adapter examples use: the 64 pixels, without the numpy model's bias column (the
adapters' models have their own intercept)."""

Pixels = npt.NDArray[np.float32]
"""Examples as rows of `PIXELS` intensities in [0, 1]."""


def parse_args(description: str, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the flags of an example learner (those of `metis-async learner`, less TLS and HE).

    `--server` and `--address` name the same flag: the controller's host:port.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--server", "--address", dest="address", default="127.0.0.1:50051")
    parser.add_argument("--learner-id", default="", help="stable identity (default: assigned)")
    parser.add_argument("--token", default="")
    add_partition_flags(parser)
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    args = parser.parse_args(argv)
    if not 0 <= args.index < args.num_learners:
        parser.error(f"--index must be in [0, {args.num_learners}), got {args.index}")
    return args


def digits_partition(args: argparse.Namespace) -> tuple[Pixels, digits.Labels]:
    """The learner's partition of the digits (the split of `metis-async learner`), pixels only."""
    federation = digits.load_digits_federated(args.num_learners, args.alpha, args.seed)
    features, labels = federation.partitions[args.index]
    return features[:, :PIXELS], labels


def held_out_digits(
    num_learners: int, alpha: float = 0.5, seed: int = 0
) -> tuple[Pixels, digits.Labels]:
    """The digits test set of that split, pixels only (disjoint from every partition)."""
    features, labels = digits.load_digits_federated(num_learners, alpha, seed).test
    return features[:, :PIXELS], labels


def serve(learner: Learner, args: argparse.Namespace) -> int:
    """Run `learner` against the controller until the federation ends; print the summary as JSON.

    Returns the process exit status (0).
    """
    logging.basicConfig(level=args.log_level.upper(), format="%(name)s %(message)s")
    summary = run_learner(args.address, learner, learner_id=args.learner_id, token=args.token)
    print(json.dumps(summary.as_dict()))
    return 0
