"""Command-line flags the example learners share (no heavy imports: `metis-async --help` loads
this)."""

from __future__ import annotations

import argparse


def add_partition_flags(parser: argparse.ArgumentParser) -> None:
    """`--index`, `--of`, `--alpha`, `--seed`: which non-IID partition of digits a learner holds
    (shared by `metis-async learner` and the adapter examples)."""
    parser.add_argument("--index", type=int, default=0, help="which partition of the data")
    parser.add_argument(
        "--of",
        type=int,
        default=10,
        dest="num_learners",
        help="how many partitions the data is split into",
    )
    parser.add_argument("--alpha", type=float, default=0.5, help="Dirichlet non-IID-ness")
    parser.add_argument("--seed", type=int, default=0)
