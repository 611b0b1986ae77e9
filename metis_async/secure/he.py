"""Homomorphic aggregation with a shared learner key pair (MetisFL's model), on BFV in Rust.

Learners clip their update, encode it as fixed point and encrypt it under the federation's
public key (`_core.HeContext.encrypt`); the controller adds the ciphertexts with integer weights
(`_core.CipherSum`) holding **no key at all**, only the public settings; learners decrypt the
sum and divide by its total weight.

What this mode protects: the controller, its disk, its logs and anyone reading the wire between
learners and controller (TLS aside) learn nothing about any update or the model beyond its size.
What it does not: every learner holds the secret key, so a learner that also sees another
learner's ciphertexts (a learner colluding with the controller, or one that can read the
controller's traffic) can decrypt them; and nothing stops a learner from encrypting a poisoned
update (robust rules need plaintext and cannot run on ciphertexts). Multiparty keys, where no
single party can decrypt, are the mode that closes the first gap.

`metis-async keys he-init DIR` writes three files:

- `he-controller.json`: the settings only, for the controller (no key of any kind);
- `he-learner.key` (mode 0600): settings, secret and public key, for every learner;
- `he-public.key`: settings and public key, for parties that only encrypt.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from metis_async._core import HeContext

CONTROLLER_FILE = "he-controller.json"
LEARNER_FILE = "he-learner.key"
PUBLIC_FILE = "he-public.key"
_FORMAT = "metis-async-he/1"


@dataclass(frozen=True)
class HeSettings:
    """BFV settings, field for field the Rust `HeSettings` (rust/core/src/he/params.rs).

    Attributes:
        degree: ring degree N, values per ciphertext (2048, 4096, 8192 or 16384).
        moduli_bits: bit sizes of the ciphertext moduli (their sum is log2 q; 128-bit security
            bounds it per degree: 4096 -> 109).
        plaintext_bits: log2 of the plaintext modulus t.
        scale_bits: fractional bits of the fixed-point encoding (2**-16: steps of 1.5e-5).
        clip: update values are clipped to [-clip, clip] before encoding.
        max_total_weight: the largest total of integer weights of one aggregate; sums beyond it
            are refused, and the settings are refused if such a sum could overflow.
    """

    degree: int = 4096
    moduli_bits: tuple[int, ...] = (54, 55)
    plaintext_bits: int = 40
    scale_bits: int = 16
    clip: float = 4.0
    max_total_weight: int = 1 << 20

    @property
    def ciphertext_bytes(self) -> int:
        """Bytes of one ciphertext on the wire ("MAC2", then 2 polynomials x moduli x degree
        little-endian u64 coefficients: `rust/core/src/he/format.rs`)."""
        return 4 + 2 * len(self.moduli_bits) * self.degree * 8

    def ciphertexts_for(self, values: int) -> int:
        """Ciphertexts that carry `values` values (one per `degree`)."""
        return -(-values // self.degree)

    def context(self) -> HeContext:
        """The Rust context (checks the settings: `EncryptionError` names the bound broken)."""
        return HeContext(
            self.degree,
            list(self.moduli_bits),
            self.plaintext_bits,
            self.scale_bits,
            self.clip,
            self.max_total_weight,
        )

    def to_json(self) -> dict[str, Any]:
        """The settings as JSON values."""
        values = asdict(self)
        values["moduli_bits"] = list(self.moduli_bits)
        return values

    @classmethod
    def from_json(cls, values: dict[str, Any]) -> HeSettings:
        """Settings from `to_json`'s output; unknown keys are an error."""
        known = set(cls.__dataclass_fields__)
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown encryption settings: {sorted(unknown)}")
        values = dict(values)
        if "moduli_bits" in values:
            values["moduli_bits"] = tuple(values["moduli_bits"])
        return cls(**values)


@dataclass(frozen=True)
class LearnerKeys:
    """What a learner holds in the shared-key mode."""

    settings: HeSettings
    secret_key: bytes = field(repr=False)
    public_key: bytes = field(repr=False)


def create_he_keys(directory: str | Path, settings: HeSettings | None = None) -> tuple[Path, ...]:
    """A new key pair under `settings` (checked first) in `directory`: the controller's file,
    the learners' secret file (0600) and the public file. Returns the paths written."""
    settings = settings or HeSettings()
    secret, public = settings.context().generate_keys()
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    header = {"format": _FORMAT, "settings": settings.to_json(), "fingerprint": key_id(public)}
    controller = out / CONTROLLER_FILE
    controller.write_text(json.dumps(header, indent=2) + "\n", encoding="utf-8")
    learner = out / LEARNER_FILE
    learner_doc = {**header, "secret_key": b64(secret), "public_key": b64(public)}
    fd = os.open(learner, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(learner_doc, handle)
    public_path = out / PUBLIC_FILE
    public_path.write_text(json.dumps({**header, "public_key": b64(public)}), encoding="utf-8")
    return controller, learner, public_path


def key_id(public_key: bytes) -> str:
    """The public key's identity in `Welcome.he.key_id`: hex SHA-256 of its bytes (nothing
    about the secret key can be learnt from it)."""
    return hashlib.sha256(public_key).hexdigest()


def read_controller_settings(path: str | Path) -> HeSettings:
    """The settings in a controller file; refuses a file carrying any key."""
    return read_controller_file(path)[0]


def read_controller_file(path: str | Path) -> tuple[HeSettings, str]:
    """The settings and the public key's fingerprint (`key_id`; "" in files without one) in a
    controller file; refuses a file carrying any key."""
    document = _read(path)
    if {"secret_key", "public_key"} & set(document):
        raise ValueError(f"{path}: the controller's file must carry no key; use {CONTROLLER_FILE}")
    return HeSettings.from_json(document["settings"]), str(document.get("fingerprint", ""))


def read_public_file(path: str | Path) -> tuple[HeSettings, str, bytes]:
    """The settings, fingerprint and public key in `he-public.key` (what a controller running
    a round-less policy needs to encrypt the first model); refuses a file with a secret key."""
    document = _read(path)
    if "secret_key" in document:
        raise ValueError(f"{path}: carries the secret key; give the controller {PUBLIC_FILE}")
    if "public_key" not in document:
        raise ValueError(f"{path}: not a public key file (no public_key); use {PUBLIC_FILE}")
    public = base64.b64decode(document["public_key"])
    return HeSettings.from_json(document["settings"]), key_id(public), public


def read_learner_keys(path: str | Path) -> LearnerKeys:
    """The settings and key pair in a learner's file."""
    document = _read(path)
    try:
        secret, public = document["secret_key"], document["public_key"]
    except KeyError as missing:
        raise ValueError(f"{path}: not a learner key file (no {missing.args[0]})") from None
    settings = HeSettings.from_json(document["settings"])
    return LearnerKeys(settings, base64.b64decode(secret), base64.b64decode(public))


def _read(path: str | Path) -> dict[str, Any]:
    return read_document(path, _FORMAT, "encryption settings")


def read_document(path: str | Path, kind: str, what: str) -> dict[str, Any]:
    """The JSON object in `path` whose "format" is `kind`; ValueError naming `what` (for the
    message) and the problem otherwise."""
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: cannot read {what}: {error}") from None
    if not isinstance(document, dict) or document.get("format") != kind:
        raise ValueError(f"{path}: not a {kind} file")
    return document


def b64(data: bytes) -> str:
    """`data` as base64 text (key files)."""
    return base64.b64encode(data).decode("ascii")
