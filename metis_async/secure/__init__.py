"""Encrypted aggregation: the Python side of homomorphic aggregation (BFV, in Rust).

`he` holds the settings, the key files and the learner's and controller's operations; the
arithmetic lives in `metis_async._core` (`rust/core/src/he`).
"""

from metis_async.secure.he import (
    CONTROLLER_FILE,
    LEARNER_FILE,
    PUBLIC_FILE,
    HeSettings,
    LearnerKeys,
    create_he_keys,
    read_controller_settings,
    read_learner_keys,
)

__all__ = [
    "CONTROLLER_FILE",
    "LEARNER_FILE",
    "PUBLIC_FILE",
    "HeSettings",
    "LearnerKeys",
    "create_he_keys",
    "read_controller_settings",
    "read_learner_keys",
]
