"""Multiparty homomorphic aggregation: a committee of learners holds the BFV key in shares.

In the shared-key mode (`metis_async.secure.he`) every learner holds the secret key. Here a
committee of P learners generates a collective public key together (Mouchet et al., PETS 2021;
`rust/core/src/he/multiparty.rs`), learners encrypt under it as before (`HeContext.encrypt`),
the controller adds the ciphertexts without any key (`CipherSum`), and decrypting the sum
takes a decryption share from **every** committee member (P-of-P):

1. The controller picks a CRS (`new_crs`, 32 public random bytes) and tells the committee.
2. Each member creates its party file (`create_party_file`, mode 0600) and sends the key
   share it returns; the controller builds the collective key (`Committee.with_public_key`)
   and publishes the committee file (`write_committee_file`: settings, CRS, size, key).
3. For each aggregate, every member sends `HeParty.decryption_shares(ciphertexts)`; whoever
   gathers all P (the controller or a learner) calls `Committee.decrypt`.

What this protects: no single party can decrypt, not the controller (it never holds a
secret: the committee file and shares are public) and not any P - 1 learners together; shares
are bound to their ciphertext, so a controller cannot have other ciphertexts decrypted with
shares given for a sum. What it does not: all P members colluding; a member that sends a
dishonest share (nothing proves shares honest, no zero-knowledge proofs: it can make the
result wrong); what members are asked to decrypt (a member makes shares for any ciphertext it
is sent, so a controller sending one learner's ciphertext instead of the sum would get it
decrypted; members that must rule this out have to check what they decrypt, not done here);
availability: one member that leaves or loses its party file blocks every later decryption
(P-of-P, there is no threshold), and a new committee and key are needed.

Smudging: each share carries noise of `Committee.smudging()[0]` bits, as much as the
noise budget allows with decryption still exact at `max_total_weight`; with the defaults
~19-23 bits above the worst-case noise it hides (`rust/core/src/he/multiparty.rs` has the
arithmetic and how to get more).
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from metis_async._core import (
    HeContext,
    HeParty,
    he_collective_public_key,
    he_combine,
    he_smudging,
)
from metis_async.secure.he import HeSettings, b64, key_id, read_document

COMMITTEE_FILE = "he-committee.json"
CRS_BYTES = 32
_FORMAT = "metis-async-he-multiparty/1"


def new_crs() -> bytes:
    """A fresh common reference string: 32 bytes from the OS's CSPRNG (public, not secret)."""
    return os.urandom(CRS_BYTES)


def party_file_name(index: int) -> str:
    """The conventional name of party `index`'s file (`he-party-3.key`)."""
    return f"he-party-{index}.key"


@dataclass(frozen=True)
class Committee:
    """The public side of a committee, all the controller keeps: no secret of any kind.

    Attributes:
        settings: the BFV settings every member and the controller share.
        crs: the common reference string (32 bytes) of the collective key.
        parties: committee size P; decryption needs a share from each of the P members.
        public_key: the collective public key (b"" until `with_public_key`).
    """

    settings: HeSettings
    crs: bytes = field(repr=False)
    parties: int
    public_key: bytes = field(default=b"", repr=False)

    @property
    def key_id(self) -> str:
        """The collective key's identity (hex SHA-256, as `he.key_id`); "" before it exists."""
        return key_id(self.public_key) if self.public_key else ""

    def context(self) -> HeContext:
        """The Rust context of the settings."""
        return self.settings.context()

    def smudging(self) -> tuple[int, float]:
        """(bits, margin_bits): each decryption share carries noise uniform in
        [-2**bits, 2**bits), margin_bits above the worst-case noise it hides at
        `max_total_weight`."""
        return he_smudging(self.context(), self.parties)

    def with_public_key(self, key_shares: Sequence[bytes]) -> Committee:
        """This committee with its collective public key, from all P members' key shares (any
        order); `EncryptionError` on a missing or repeated member or a share of another
        committee."""
        if len(key_shares) != self.parties:
            raise ValueError(f"{len(key_shares)} key shares for a committee of {self.parties}")
        key = he_collective_public_key(self.context(), self.crs, key_shares)
        return replace(self, public_key=key)

    def decrypt(
        self,
        ciphertexts: Sequence[bytes],
        shares_per_party: Sequence[Sequence[bytes]],
        length: int,
        divisor: float = 1.0,
    ) -> npt.NDArray[np.float32]:
        """The sum of `length` values in `ciphertexts` divided by `divisor` (its total weight,
        for a weighted average), from every member's decryption shares
        (`shares_per_party[p][k]`: a member's share of ciphertext k); `EncryptionError` if a
        member is missing or a share was made for another ciphertext."""
        return he_combine(self.context(), ciphertexts, shares_per_party, length, divisor)

    def to_json(self) -> dict[str, Any]:
        """The committee as JSON values (what `write_committee_file` writes)."""
        return {
            "format": _FORMAT,
            "settings": self.settings.to_json(),
            "crs": b64(self.crs),
            "parties": self.parties,
            "public_key": b64(self.public_key),
            "key_id": self.key_id,
        }

    @classmethod
    def from_json(cls, document: dict[str, Any]) -> Committee:
        """A committee from `to_json`'s output; refuses documents carrying a secret."""
        if document.get("format") != _FORMAT:
            raise ValueError(f"not a {_FORMAT} document")
        if "secret" in document:
            raise ValueError("a committee document must carry no secret")
        return cls(
            settings=HeSettings.from_json(document["settings"]),
            crs=base64.b64decode(document["crs"]),
            parties=int(document["parties"]),
            public_key=base64.b64decode(document.get("public_key", "")),
        )


@dataclass(frozen=True)
class PartyKeys:
    """What a committee member holds: the settings and its party (secret share)."""

    settings: HeSettings
    party: HeParty = field(repr=False)


def create_party_file(
    path: str | Path, settings: HeSettings, index: int, parties: int, crs: bytes
) -> bytes:
    """A member's first step: a new secret share for member `index` of `parties` under the
    committee's `crs`, written to `path` (mode 0600). Returns the key share to send to the
    controller (public)."""
    party = HeParty(settings.context(), index, parties, crs)
    document = {"format": _FORMAT, "settings": settings.to_json(), "secret": b64(party.secret())}
    _write_private(Path(path), json.dumps(document))
    return party.key_share()


def read_party_file(path: str | Path) -> PartyKeys:
    """The settings and party in a member's file (a learner restarting)."""
    document = _read(path)
    if "secret" not in document:
        raise ValueError(f"{path}: not a party file (no secret)")
    settings = HeSettings.from_json(document["settings"])
    party = HeParty.from_secret(settings.context(), base64.b64decode(document["secret"]))
    return PartyKeys(settings, party)


def write_committee_file(path: str | Path, committee: Committee) -> Path:
    """Write the committee's public file (settings, CRS, size, collective key)."""
    out = Path(path)
    out.write_text(json.dumps(committee.to_json(), indent=2) + "\n", encoding="utf-8")
    return out


def read_committee_file(path: str | Path) -> Committee:
    """The committee in a file written by `write_committee_file`."""
    try:
        return Committee.from_json(_read(path))
    except (KeyError, ValueError) as error:
        raise ValueError(f"{path}: {error}") from None


def create_committee_files(
    directory: str | Path, parties: int, settings: HeSettings | None = None
) -> tuple[Path, ...]:
    """A whole committee in one directory, for tests and demos: the committee file and one
    party file (0600) for each of `parties` members. The machine that runs this saw every
    secret share, so it could decrypt alone: in a deployment each member runs
    `create_party_file` on its own machine. Returns the committee file, then the party files."""
    settings = settings or HeSettings()
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    committee = Committee(settings, new_crs(), parties)
    paths = [out / party_file_name(index) for index in range(parties)]
    shares = [
        create_party_file(path, settings, index, parties, committee.crs)
        for index, path in enumerate(paths)
    ]
    committee_path = write_committee_file(out / COMMITTEE_FILE, committee.with_public_key(shares))
    return (committee_path, *paths)


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an existing file keeps its mode through O_CREAT
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)


def _read(path: str | Path) -> dict[str, Any]:
    return read_document(path, _FORMAT, "the committee file")
