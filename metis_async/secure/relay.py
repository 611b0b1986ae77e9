"""Multiparty keys on the controller: relaying the committee's decryption shares.

Under MULTIPARTY KEYS (the proto) no one holds the secret key. Each encrypted version is sent
to every committee member as soon as it is committed; each member answers with its decryption
shares; once all P are in, the controller sends them (one `DecryptionShares` message, encoded
once) to every learner that was sent the version, and learners combine them into the model.

The controller itself never decrypts: the shares are public, and whoever holds all P of them
and the ciphertexts can read the version, the controller included, so what this mode keeps from
the controller is every individual update (the sum is all that is ever decrypted) and the model
until the whole committee has agreed to decrypt it. Lives on the event loop.

With ingest workers each worker runs a relay for its own sessions: a member's shares arrive at
the worker that holds its stream, which checks them and hands them (`forward`) to the core's
process, which passes them to every other worker (`peer_share`). Each relay completes once it
holds all P parties' shares and sends them to its own learners.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping, Sequence

import grpc
import structlog

from metis_async.secure.aggregate import HomomorphicAggregation
from metis_async.session import ProtocolViolation, Session, controller_message
from metis_async.v1 import controller_pb2 as pb
from metis_async.wire import batches

log = structlog.get_logger("metis_async.secure")

INVALID = grpc.StatusCode.INVALID_ARGUMENT


class DecryptionRelay:
    """Collects the committee's shares of the published encrypted version and hands them out.

    Args:
        he: the controller's homomorphic-aggregation settings (`committee` in party order).
        sessions: the live sessions by learner id.
        send_model: queues the published version for a session (as a `SendModel` would).
        send: queues messages for a session in order with what the delivery staged for it.
    """

    def __init__(
        self,
        he: HomomorphicAggregation,
        sessions: Mapping[str, Session],
        send_model: Callable[[Session], None],
        send: Callable[..., object],
        max_batch_bytes: int = 4 * 1024 * 1024,
    ) -> None:
        self.he = he
        self._max_batch = max_batch_bytes
        self._sessions = sessions
        self._send_model = send_model
        self._send = send
        self._party = {lid: index for index, lid in enumerate(he.committee)}
        self.version: int | None = None  # the encrypted version whose shares are collected
        self._ciphertexts = 0
        self._shares: dict[int, list[bytes | None]] = {}  # party -> share by ciphertext
        self._message: list[bytes] | None = None  # the DecryptionShares batches, once complete
        self._complete: pb.DecryptionShares | None = None
        self._waiting: set[str] = set()  # learners sent the version, not yet its shares
        self._shutdowns: dict[str, bytes] = {}  # learner -> Shutdown held until the shares
        self._released: asyncio.Event | None = None
        self.forward: Callable[[pb.DecryptionShare], None] | None = None
        """Ingest workers: called with each member share this relay checked and recorded."""

    @property
    def complete(self) -> bool:
        """Whether all P shares of the current version are in."""
        return self._message is not None

    def published(self, version: int, ciphertexts: int) -> None:
        """A new encrypted version: collect its shares; send it to every member at once."""
        self.version, self._ciphertexts = version, ciphertexts
        self._shares, self._message, self._waiting = {}, None, set()
        for learner_id in self.he.committee:
            session = self._sessions.get(learner_id)
            if session is not None and not session.closing.is_set():
                self._send_model(session)

    def member_joined(self, session: Session) -> None:
        """A member (re)connected while its share is missing: send it the version."""
        party = self._party.get(session.learner_id)
        if self.version is None or party is None or self._message is not None:
            return
        if not all(s is not None for s in self._shares.get(party, [None])):
            self._send_model(session)

    def model_sent(self, session: Session, version: int) -> None:
        """`session` was sent encrypted `version`: it gets the shares now or when complete."""
        if version != self.version:
            return
        if self._message is not None:
            self._send(session, *self._message)
        else:
            self._waiting.add(session.learner_id)

    async def released(self, timeout: float) -> None:
        """Wait up to `timeout` seconds until no Shutdown waits for decryption shares (a
        controller that stops lets the final version's shares reach its learners first)."""
        if not self._shutdowns:
            return
        self._released = asyncio.Event()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._released.wait(), timeout)

    def shares_of(self, version: int) -> pb.DecryptionShares | None:
        """All members' shares of `version` once complete (what every learner is sent)."""
        done = self._complete
        return done if done is not None and done.version == version else None

    def _batches(self, version: int) -> tuple[list[bytes], pb.DecryptionShares]:
        """The complete shares as messages of at most `max_batch_bytes` of shares each, and
        as one message (for a local reader, `shares_of`)."""
        messages: list[bytes] = []
        every: list[pb.PartyShares] = []
        for party in sorted(self._shares):
            shares = [s for s in self._shares[party] if s is not None]
            every.append(pb.PartyShares(party=party, shares=shares))
            for first, run in batches(shares, self._max_batch):
                messages.append(self._batch(version, party, first, run))
        return messages, pb.DecryptionShares(version=version, parties=every)

    @staticmethod
    def _batch(version: int, party: int, first: int, shares: Sequence[bytes]) -> bytes:
        batch = pb.PartyShares(party=party, shares=shares, first=first)
        return controller_message(
            decryption_shares=pb.DecryptionShares(version=version, parties=[batch])
        )

    def hold_shutdown(self, session: Session, message: bytes) -> bool:
        """Whether `session`'s Shutdown must wait for the shares of the version it was sent
        last (the final model; members must also still be read to give theirs). If so, the
        relay sends it, and ends the stream, once the shares are out."""
        if self._message is not None or session.learner_id not in self._waiting:
            return False
        self._shutdowns[session.learner_id] = message
        return True

    def share_arrived(self, session: Session, share: pb.DecryptionShare) -> None:
        """A member's shares; raises `ProtocolViolation` for one that breaks the contract."""
        party = self._party.get(session.learner_id)
        if party is None or party != share.party:
            raise ProtocolViolation(
                INVALID,
                f"decryption share for party {share.party} from a learner that is "
                + ("no committee member" if party is None else f"party {party}"),
            )
        if share.version != self.version or self._message is not None:
            return  # an older version's share, or all are in: nothing to do
        first, count = int(share.first), len(share.shares)
        if first + count > self._ciphertexts:
            raise ProtocolViolation(
                INVALID,
                f"decryption shares for ciphertexts {first}..{first + count - 1}; version "
                f"{share.version} has {self._ciphertexts}",
            )
        if self.forward is not None:
            self.forward(share)
        self._record(share, party)

    def peer_share(self, share: pb.DecryptionShare) -> None:
        """A member's shares checked by another worker's relay (ingest workers)."""
        first, count = int(share.first), len(share.shares)
        if share.version != self.version or self._message is not None:
            return
        if share.party not in self._party.values() or first + count > self._ciphertexts:
            log.error("decryption_share_misrouted", version=share.version, party=share.party)
            return
        self._record(share, int(share.party))

    def _record(self, share: pb.DecryptionShare, party: int) -> None:
        """Keep a share; once all P are in, send them to every learner waiting for them."""
        first = int(share.first)
        slots = self._shares.setdefault(party, [None] * self._ciphertexts)
        for offset, data in enumerate(share.shares):
            if slots[first + offset] is None:  # a repeated share changes nothing
                slots[first + offset] = bytes(data)
        complete = len(self._shares) == len(self.he.committee) and all(
            s is not None for slots in self._shares.values() for s in slots
        )
        if not complete:
            return
        self._message, self._complete = self._batches(share.version)
        log.info("decryption_shares_complete", version=share.version, parties=len(self._shares))
        for learner_id in self._waiting:
            waiting = self._sessions.get(learner_id)
            if waiting is None:
                continue
            waiting.send(*self._message)
            shutdown = self._shutdowns.pop(learner_id, None)
            if shutdown is not None:
                waiting.send(shutdown)
                waiting.finish()
        self._waiting = set()
        self._shutdowns.clear()
        if self._released is not None:
            self._released.set()
