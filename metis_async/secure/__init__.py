"""Encrypted aggregation: the Python side of homomorphic aggregation (BFV) and SecAgg+ masking.

`he` holds the BFV settings and key files, `aggregate` the controller's keyless ciphertext sum
and encrypted versions, `multiparty` the committee keys (no single party can decrypt);
`secagg` the SecAgg+ round settings and an in-process round driver. The arithmetic lives in
`metis_async._core` (`rust/core/src/he`, `secagg`).
"""

from metis_async.secure.he import (
    CONTROLLER_FILE,
    LEARNER_FILE,
    PUBLIC_FILE,
    HeSettings,
    LearnerKeys,
    create_he_keys,
    key_id,
    read_controller_file,
    read_controller_settings,
    read_learner_keys,
)
from metis_async.secure.secagg import SecAggSettings, run_round

__all__ = [
    "CONTROLLER_FILE",
    "LEARNER_FILE",
    "PUBLIC_FILE",
    "HeSettings",
    "LearnerKeys",
    "SecAggSettings",
    "create_he_keys",
    "key_id",
    "read_controller_file",
    "read_controller_settings",
    "read_learner_keys",
    "run_round",
]
