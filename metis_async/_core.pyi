"""Aggregation core of metis-async, implemented in Rust (``rust/core``; bindings ``rust/python``).

Private: import from :mod:`metis_async.aggregation` instead. Arrays are borrowed without copying
and must be 1-D, C-contiguous, float32 or float64. Every call that is O(model size) releases the
GIL. Any invalid input raises :class:`AggregationError` before any state changes.
"""

from collections.abc import Mapping, Sequence
from typing import Literal, final

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "Accumulator",
    "AggregationError",
    "__version__",
    "build_profile",
    "first_non_finite",
    "weighted_average",
]

__version__: str
build_profile: Literal["debug", "release"]

class WireFormatError(ValueError):
    """A chunk message that is not valid protobuf or does not fit the announced payload.

    Raised by :class:`ChunkAssembler`, :func:`peek_chunk` and :func:`encode_chunk_messages`;
    the message names the problem as ``metis_async.wire.PayloadAssembler`` does (e.g. "chunk 3
    arrived, expected chunk 2").
    """

class AggregationError(ValueError):
    """Invalid input to the aggregation core; raised before any state changes.

    Covers wrong lengths, weights that are not finite and > 0, non-finite values, arrays that are
    not 1-D, not float32/float64 or not C-contiguous, and a mean of nothing.
    """

@final
class Accumulator:
    """Streaming weighted accumulator: a float64 running sum of ``weight * update``.

    Memory is one float64 per parameter however many updates are added. Safe to share between
    threads (calls are serialized by an internal lock taken with the GIL released); ``count`` and
    ``total_weight`` answer at once even while another thread is inside :meth:`add`.
    """

    def __new__(cls, length: int) -> Accumulator:
        """An empty accumulator for models of ``length`` parameters."""

    def add(self, values: NDArray[np.float32] | NDArray[np.float64], weight: float) -> None:
        """Add ``weight * values`` to the running sum.

        ``values`` must have ``len(self)`` finite entries and ``weight`` must be finite and > 0
        (zero is rejected: drop such an update instead). On error nothing changes.
        """

    def add_many(
        self,
        updates: Sequence[NDArray[np.float32] | NDArray[np.float64] | Segments],
        weights: Sequence[float],
        check_finite: bool = True,
    ) -> None:
        """Add several updates at once (all float32 or all float64); same result as ``add``.

        Float32 updates may be :class:`Segments` (kept in the chunk messages they arrived in,
        float32 or encoded with a codec), folded where they lie (encoded values decoded straight
        into the float64 sums, no float32 copy), with the same bits as their assembled (decoded)
        arrays; they were checked on arrival, so pass ``check_finite=False``.

        ``check_finite=False`` skips the NaN/infinity pass: the caller vouches that it checked
        every value (e.g. with :func:`first_non_finite` on arrival); a non-finite value would
        then make the finalizers raise instead of returning a model.

        The float64 sums are read and written once per cache tile for the whole group instead of
        once per update, so a group of n updates moves about 4 + 16/n bytes per parameter each
        instead of 20. Raises :class:`AggregationError` naming the bad update; on error nothing
        changes. The arrays are borrowed, not copied, with the GIL released.
        """

    def mean(self) -> NDArray[np.float32]:
        """The weighted mean ``sum / total_weight``; fails if nothing was added."""

    def weighted_sum(self) -> NDArray[np.float32]:
        """The weighted sum ``Σ weight * values``; fails if a value overflows float32."""

    def apply(
        self, base: NDArray[np.float32], scale: float = 1.0, normalize: bool = True
    ) -> NDArray[np.float32]:
        """A new model ``base + scale * (mean if normalize else sum)``, computed in float64.

        ``base`` must be float32 with ``len(self)`` values and ``scale`` finite. The accumulator
        is not changed.
        """

    def export(self) -> tuple[NDArray[np.float64], float, int]:
        """The partial sum ``(sum, total_weight, count)``; ``sum`` is a float64 copy.

        Give it to :meth:`merge` of another accumulator (in another process, say) to combine
        partial aggregates exactly: the result equals one accumulator over all the updates up to
        the order of the float64 additions.
        """

    def merge(self, sum: NDArray[np.float64], total_weight: float, count: int) -> None:
        """Add a partial sum from :meth:`export`.

        ``sum`` must be a 1-D C-contiguous float64 array of ``len(self)`` finite values;
        ``total_weight`` finite and > 0 when ``count`` > 0, and 0 (with an all-zero ``sum``)
        when ``count`` is 0. Merging into an empty accumulator, or an empty partial, is exact.
        Validated before anything changes; raises :class:`AggregationError`.
        """

    def merge_from(self, other: Accumulator) -> None:
        """:meth:`merge` the partial sum of ``other`` without copying it (``other`` is not
        changed; it may be ``self``, which doubles the sums and counters)."""

    def reset(self) -> None:
        """Clear the sum, total weight and count (keeps the memory)."""

    @property
    def count(self) -> int:
        """Number of updates added since creation or the last :meth:`reset`."""

    @property
    def total_weight(self) -> float:
        """Sum of the weights added since creation or the last :meth:`reset`."""

    def __len__(self) -> int:
        """Number of parameters."""

def first_non_finite(values: NDArray[np.float32] | NDArray[np.float64]) -> int | None:
    """Index of the first NaN or infinity in a 1-D float array, or None if every value is finite.

    Checked in parallel with the GIL released, without allocating (unlike ``np.isfinite``).
    """

def weighted_average(
    updates: Sequence[NDArray[np.float32] | NDArray[np.float64]], weights: Sequence[float]
) -> NDArray[np.float32]:
    """Weighted mean ``Σ wᵢ·xᵢ / Σ wᵢ`` of equally long updates, all float32 or all float64.

    Reads each update once, walking the parameters in cache-sized tiles; needs every update in
    memory. Bit-identical to adding the updates to an :class:`Accumulator` in order and calling
    :meth:`Accumulator.mean`.
    """

# --- server optimizers (rust/core/src/optim/) and robust rules (rust/core/src/robust/) --------

__all__ += [
    "ServerOptimizer",
    "clip_by_norm",
    "coordinate_median",
    "krum",
    "krum_scores",
    "multi_krum",
    "trimmed_mean",
]

_Kind = Literal["fedavg", "sgd", "fedavgm", "fedadagrad", "fedadam", "fedyogi"]

@final
class ServerOptimizer:
    """A server optimizer that keeps its moment vectors (float32) next to the model.

    With ``d`` the server delta (the aggregated ``mean(xᵢ − x)``, already scaled) and ``x`` the
    model, one :meth:`step` does:

    - ``fedavg`` (alias ``sgd``): ``x ← x + lr·d``; ``lr`` = 1.
    - ``fedavgm``: ``m ← momentum·m + d; x ← x + lr·m`` (heavy ball, no dampening, ``m`` = 0 at
      first); ``lr`` = 1, ``momentum`` = 0.9.
    - ``fedadagrad``, ``fedadam``, ``fedyogi`` (Reddi et al. 2021): ``m ← β₁·m + (1 − β₁)·d``;
      Adagrad ``v ← v + d²``, Adam ``v ← β₂·v + (1 − β₂)·d²``, Yogi
      ``v ← v − (1 − β₂)·d²·sign(v − d²)``; ``x ← x + lr·m/(√v + τ)``. No bias correction;
      ``v`` starts at τ². ``lr`` = 0.01, ``beta1`` = 0.9, ``beta2`` = 0.99 (not for Adagrad),
      ``tau`` = 1e-3.

    State and arithmetic are float32 (hyperparameters rounded to float32 once): 4 bytes per
    parameter for ``fedavgm``, 8 for the adaptive kinds, none for ``fedavg``. Safe to share between
    threads (an internal lock taken with the GIL released).
    """

    def __new__(
        cls,
        kind: _Kind,
        length: int,
        lr: float | None = None,
        *,
        momentum: float | None = None,
        beta1: float | None = None,
        beta2: float | None = None,
        tau: float | None = None,
    ) -> ServerOptimizer:
        """An optimizer of ``kind`` for models of ``length`` float32 parameters.

        Hyperparameters left at ``None`` take the kind's default. Raises
        :class:`AggregationError` for an unknown kind, a hyperparameter the kind does not use,
        ``lr`` or ``tau`` not finite and > 0, or ``momentum``/``beta1``/``beta2`` outside [0, 1).
        """

    def step(self, params: NDArray[np.float32], delta: NDArray[np.float32]) -> None:
        """Move ``params`` along ``delta`` in place and update the moments.

        Both are 1-D C-contiguous float32 arrays of ``len(self)`` values, ``params`` writeable.
        Raises :class:`AggregationError`, changing neither ``params`` nor the state, for a wrong
        length, dtype or layout, a non-finite ``delta``, or a result beyond float32.
        """

    def state(self) -> dict[str, NDArray[np.float32]]:
        """A copy of the moment vectors the kind keeps (float32, ``len(self)`` values each):
        none for fedavg, ``m`` for fedavgm, ``m`` and ``v`` for the adaptive kinds."""

    def load_state(self, state: Mapping[str, NDArray[np.float32]], steps: int = 0) -> None:
        """Restore the moments from :meth:`state` of an optimizer of the same kind and length,
        and set :attr:`steps` (save it alongside; the rules do not use it).

        Needs exactly the keys :meth:`state` gives, as 1-D C-contiguous float32 arrays, ``m``
        finite and ``v`` finite and >= 0. On error nothing changes. Also recovers an optimizer
        whose lock a panic poisoned.
        """

    @property
    def kind(self) -> str:
        """The canonical kind: ``fedavg``, ``fedavgm``, ``fedadagrad``, ``fedadam``, ``fedyogi``."""

    @property
    def hyperparameters(self) -> dict[str, float]:
        """The hyperparameters the kind uses, defaults filled in."""

    @property
    def steps(self) -> int:
        """Successful steps since creation (or as restored by :meth:`load_state`)."""

    def __len__(self) -> int:
        """Number of parameters."""

_Updates = NDArray[np.float32] | Sequence[NDArray[np.float32]]
"""A round's updates: a 2-D C-contiguous float32 array (one update per row) or a sequence of
1-D C-contiguous float32 arrays of one length; borrowed without copying. The robust rules raise
:class:`AggregationError` for no updates, ragged lengths, NaN or infinity, or a bad parameter."""

def coordinate_median(updates: _Updates) -> NDArray[np.float32]:
    """Per-coordinate median (the mean of the two middle values for an even count)."""

def trimmed_mean(updates: _Updates, beta: float) -> NDArray[np.float32]:
    """Per-coordinate mean without the ``⌊beta·n⌋`` largest and smallest values; ``0 <= beta
    < 0.5``."""

def krum_scores(updates: _Updates, f: int) -> NDArray[np.float64]:
    """Per update, the summed squared distances to its ``n − f − 2`` nearest others; needs
    ``n >= 2f + 3``."""

def krum(updates: _Updates, f: int) -> int:
    """Index of the update with the lowest Krum score (the first of equal ones)."""

def multi_krum(updates: _Updates, f: int, m: int | None = None) -> NDArray[np.float32]:
    """Mean of the ``m`` updates with the lowest Krum scores; ``m`` defaults to ``n − f``."""

def clip_by_norm(update: NDArray[np.float32], max_norm: float) -> NDArray[np.float32]:
    """A new array ``update·min(1, max_norm/‖update‖)``; ``max_norm`` finite and > 0."""

# --- chunk messages (rust/core/src/wire/) ----------------------------------------------------

__all__ += ["ChunkAssembler", "WireFormatError", "encode_chunk_messages", "peek_chunk"]

@final
class ChunkAssembler:
    """Reassembles one announced payload from its raw chunk messages into float32 values.

    Each :meth:`add_message` takes the serialized envelope (``LearnerMessage``, chunk in field
    3, or ``ControllerMessage``, field 4), finds the ``Chunk`` in it without a protobuf parser,
    validates it against the announcement, and copies its data into a preallocated buffer while
    checking the values completed so far for NaN and infinity, in one parallel pass with the GIL
    released. Any problem raises :class:`WireFormatError`, after which the payload is rejected
    for good (every later call raises too).

    With a codec (``dtype`` 3 float16, 4 bfloat16, 5 int8: the ``DType`` enum of
    controller.proto) every chunk must hold whole encoded values; each is checked (float16 /
    bfloat16 infinity and NaN bit patterns; int8: ``Chunk.scale`` finite, >= 0, 127 x scale
    finite; other dtypes: no scale) and decoded into the float32 buffer.
    """

    def __new__(
        cls,
        total_bytes: int,
        payload_id: int,
        num_chunks: int,
        max_chunk_bytes: int,
        envelope_field: int,
        check_finite: bool = True,
        dtype: int = 1,
    ) -> ChunkAssembler:
        """An assembler for payload ``payload_id`` of ``total_bytes`` bytes announced as
        ``num_chunks`` chunks of at most ``max_chunk_bytes`` bytes each, carried in field
        ``envelope_field`` of the envelope messages, encoded as ``dtype`` (``Payload.dtype``;
        0 and 1 mean float32).

        ``total_bytes`` is the encoded size: values x 4 (float32), x 2 (float16, bfloat16) or
        x 1 (int8). ``num_chunks`` must be at least ``ceil(total_bytes / max_chunk_bytes)`` and
        at most ``max(total_bytes, 1)`` (for a codec at most the number of values).
        ``check_finite=False`` skips the NaN/infinity and scale checks. An unknown ``dtype``
        raises :class:`WireFormatError`.
        """

    def add_message(self, raw: bytes) -> bool:
        """Add the chunk in the serialized envelope message ``raw``; True once complete.

        The chunk must belong to this payload, come in order, be at most ``max_chunk_bytes``
        long and not overflow ``total_bytes``; the last one must fill it exactly. Unknown fields
        are tolerated. Raises :class:`WireFormatError` otherwise, and for malformed protobuf,
        an envelope whose body is not a chunk, or (with ``check_finite``) a NaN or infinity,
        named by its value index even when its bytes were split across two chunks.
        """

    def take(self) -> NDArray[np.float32]:
        """The assembled (decoded) float32 values, handed over without copying; raises
        :class:`WireFormatError` before the last chunk and on a second call (neither rejects the
        payload).

        When the array is freed, its buffer returns to a small pool (at most 16 buffers, 1 GiB)
        that later assemblers of the same size draw from, skipping the page faults of fresh
        memory."""

    @property
    def done(self) -> bool:
        """Whether every announced chunk has arrived."""

    @property
    def received(self) -> int:
        """Chunks received so far."""

    @property
    def total_bytes(self) -> int:
        """The announced payload size in bytes."""

    @property
    def payload_id(self) -> int:
        """The payload's id."""

    @property
    def num_chunks(self) -> int:
        """The announced number of chunks."""

def peek_chunk(raw: bytes, envelope_field: int) -> tuple[int, int, int] | None:
    """``(payload_id, index, data_len)`` of the chunk in the serialized envelope ``raw`` (chunk
    body in field ``envelope_field``), or None when its body is another message.

    Reads only field headers, so a server can route chunk messages without protobuf parsing.
    An unknown length-delimited envelope field after the chunk counts as another body (None):
    fall back to protobuf then. Raises :class:`WireFormatError` for malformed input.
    """

def encode_chunk_messages(
    data: NDArray[np.float32],
    payload_id: int,
    max_chunk_bytes: int,
    envelope_field: int,
    dtype: int = 1,
) -> list[bytes]:
    """The serialized envelope messages ``{chunk: Chunk{payload_id, index, data, scale}}``
    (chunk body in field ``envelope_field``) carrying ``data`` (1-D C-contiguous float32)
    encoded as ``dtype`` in chunks of at most ``max_chunk_bytes`` bytes; none for an empty array.

    float32 (``dtype`` 0 or 1) chunks are byte slices of the values. With a codec (3 float16,
    4 bfloat16: round to nearest even; 5 int8: per chunk ``scale = max|x| / 127``,
    ``q = round_half_even(x / scale)`` clamped to [-127, 127], ``Chunk.scale`` written after
    the data) every chunk holds ``max_chunk_bytes`` rounded down to whole values, so the payload
    has ``ceil(values / (max_chunk_bytes // item_size))`` chunks and ``values x item_size``
    bytes. Bit-identical to ``pb.ControllerMessage(chunk=pb.Chunk(...)).SerializeToString()``
    for ``envelope_field=4``. Each ``bytes`` object is allocated uninitialized, gets its short
    header, and all of them are filled (encoded) from ``data`` in parallel with the GIL
    released. Raises :class:`AggregationError` for an array that is not 1-D C-contiguous
    float32, and :class:`WireFormatError` for ``max_chunk_bytes`` 0 (or below one value), an
    invalid field number, an unknown ``dtype``, and, with a codec, a NaN or infinity in
    ``data`` or a value the codec cannot hold (float16: ``|x| >= 65520``), named by its index.
    """

__all__ += ["InPlaceAssembler", "Segments"]

@final
class InPlaceAssembler:
    """Like :class:`ChunkAssembler`, but keeps no buffer: each chunk is checked where it lies in
    its message (GIL released) and the message is kept. :meth:`take` returns :class:`Segments`,
    or a float32 array if some chunk of a float32 payload ended inside a value (the payload is
    then copied). Codec payloads (``dtype``) are checked as by :class:`ChunkAssembler` and
    always stay in place: their chunks must hold whole values.
    """

    def __new__(
        cls,
        total_bytes: int,
        payload_id: int,
        num_chunks: int,
        max_chunk_bytes: int,
        envelope_field: int,
        check_finite: bool = True,
        dtype: int = 1,
    ) -> InPlaceAssembler:
        """An assembler for one announced payload (validated as by :class:`ChunkAssembler`,
        ``dtype`` included)."""

    def add_message(self, raw: bytes) -> bool:
        """Add the chunk in the serialized envelope ``raw``; True once complete. Raises
        :class:`WireFormatError` as :meth:`ChunkAssembler.add_message` does."""

    def take(self) -> Segments | NDArray[np.float32]:
        """The update, once, after the last chunk."""

    @property
    def done(self) -> bool:
        """Whether every announced chunk has arrived."""

    @property
    def copying(self) -> bool:
        """Whether some chunk ended inside a value, so the payload is being copied."""

@final
class Segments:
    """An update kept in the chunk messages it arrived in, float32 or encoded (``dtype``, with
    each int8 chunk's scale). :meth:`Accumulator.add_many` decodes it where it lies, straight
    into the float64 sums, with the same bits as adding :meth:`to_array`."""

    def __len__(self) -> int:
        """Number of values."""

    def to_array(self) -> NDArray[np.float32]:
        """The values decoded into one new float32 array (GIL released)."""

    @property
    def dtype(self) -> int:
        """``DType`` enum value of the encoded values (1 float32, 3 float16, 4 bfloat16, 5 int8)."""

    @property
    def nbytes(self) -> int:
        """Bytes of encoded values (int8 scales not counted)."""

# ------------------------------------------------------------------ homomorphic aggregation (BFV)

__all__ += ["CipherSum", "EncryptionError", "HeContext"]

class EncryptionError(ValueError):
    """Invalid encryption settings, key or ciphertext; raised before any sum changes.

    Covers settings below 128-bit security or that could let a sum overflow (the message says
    which bound and what to change), keys and ciphertexts of other settings or malformed
    (wrong length, a coefficient beyond its modulus), a total weight beyond
    ``max_total_weight``, a zero weight, non-finite values to encrypt.
    """

@final
class HeContext:
    """BFV settings (fhe.rs) and their parameters: all a party needs besides its key. Nothing in
    it is secret.

    Values are clipped to ``[-clip, clip]`` and encoded as ``round(x * 2**scale_bits)``; one
    ciphertext holds ``degree`` values. Construction refuses settings below 128-bit security or
    whose sums of total weight up to ``max_total_weight`` could overflow (``rust/core/src/he``
    documents the arithmetic).
    """

    def __new__(
        cls,
        degree: int = 4096,
        moduli_bits: Sequence[int] = ...,
        plaintext_bits: int = 40,
        scale_bits: int = 16,
        clip: float = 4.0,
        max_total_weight: int = ...,
    ) -> HeContext: ...
    @property
    def degree(self) -> int:
        """Ring degree: values per ciphertext."""

    @property
    def moduli_bits(self) -> list[int]:
        """Bit sizes of the ciphertext moduli."""

    @property
    def plaintext_bits(self) -> int:
        """log2 of the plaintext modulus."""

    @property
    def scale_bits(self) -> int:
        """Fractional bits of the fixed-point encoding."""

    @property
    def clip(self) -> float:
        """Values are clipped to ``[-clip, clip]`` before encoding."""

    @property
    def max_total_weight(self) -> int:
        """Largest total of integer weights one sum may reach."""

    def ciphertexts_for(self, length: int) -> int:
        """Ciphertexts that carry ``length`` values."""

    def generate_keys(self) -> tuple[bytes, bytes]:
        """A new key pair from the operating system's randomness: ``(secret, public)``."""

    def encrypt(self, public_key: bytes, values: NDArray[np.float32]) -> list[bytes]:
        """Clip, encode and encrypt ``values`` (float32, 1-D), one ciphertext per ``degree``
        values, in parallel with the GIL released."""

    def decrypt(
        self, secret_key: bytes, ciphertexts: Sequence[bytes], length: int, divisor: float = 1.0
    ) -> NDArray[np.float32]:
        """Decrypt a (weighted) sum of ``length`` values and divide it by ``divisor`` (the
        sum's total weight, for an average)."""

    def sum(self) -> CipherSum:
        """An empty keyless sum under these settings."""

@final
class CipherSum:
    """A running sum of ``weight * ciphertexts`` with integer weights, computed without any key
    (modular additions on the ciphertexts' NTT coefficients, straight from the bytes). Memory is
    one ciphertext list however many updates are added."""

    def __len__(self) -> int:
        """Ciphertexts in the sum (0 until the first add)."""

    def add(self, ciphertexts: Sequence[bytes], weight: int) -> None:
        """Add one update's ciphertexts times ``weight`` (>= 1); every ciphertext is checked
        first, so an error leaves the sum unchanged."""

    def add_partial(self, ciphertexts: Sequence[bytes], total_weight: int, count: int) -> None:
        """Add another sum's ciphertexts (already weighted) with its total weight and count."""

    def ciphertexts(self) -> list[bytes]:
        """The sum's ciphertexts (what learners decrypt, or a worker forwards)."""

    def reset(self) -> None:
        """Empty the sum."""

    @property
    def total_weight(self) -> int:
        """Sum of the weights added (the divisor of the weighted average)."""

    @property
    def count(self) -> int:
        """Updates added (partial sums add their counts)."""

# multiparty keys (rust/core/src/he/multiparty.rs): P-of-P, no single party can decrypt

__all__ += ["HeParty", "he_collective_public_key", "he_combine", "he_smudging"]

@final
class HeParty:
    """One member of a committee of ``parties`` that holds the BFV key in shares: its ternary
    secret share s_i. Decrypting anything takes a share from **every** party (P-of-P, no
    threshold: one party that leaves blocks decryption). Shares are not proven honest (no
    zero-knowledge proofs); all parties together can decrypt anything.

    ``crs`` (32 bytes, public, the same for the whole committee) seeds the common random
    polynomial of the key. The secret comes from the operating system's randomness.
    """

    def __new__(cls, context: HeContext, index: int, parties: int, crs: bytes) -> HeParty: ...
    @staticmethod
    def from_secret(context: HeContext, secret: bytes) -> HeParty:
        """The party saved by :meth:`secret` (a learner restarting)."""

    @property
    def index(self) -> int:
        """This party's index in the committee (0-based)."""

    @property
    def parties(self) -> int:
        """Parties in the committee."""

    @property
    def crs(self) -> bytes:
        """The committee's common reference string (32 bytes)."""

    @property
    def smudging_bits(self) -> int:
        """Each decryption share carries noise uniform in ``[-2**bits, 2**bits)``."""

    def secret(self) -> bytes:
        """The party's state to persist like a private key: index, parties, CRS and s_i
        (``degree / 4 + 44`` bytes)."""

    def key_share(self) -> bytes:
        """This party's share of the collective public key (the same bytes on every call)."""

    def decryption_shares(self, ciphertexts: Sequence[bytes]) -> list[bytes]:
        """This party's decryption share of each ciphertext (e.g. a :class:`CipherSum`'s),
        bound to that ciphertext by its SHA-256; in parallel with the GIL released."""

def he_collective_public_key(context: HeContext, crs: bytes, shares: Sequence[bytes]) -> bytes:
    """The collective public key from every party's :meth:`HeParty.key_share`, in any order,
    for :meth:`HeContext.encrypt`. Raises :class:`EncryptionError` on a missing or repeated
    party or shares of another committee."""

def he_combine(
    context: HeContext,
    ciphertexts: Sequence[bytes],
    shares_per_party: Sequence[Sequence[bytes]],
    length: int,
    divisor: float = 1.0,
) -> NDArray[np.float32]:
    """Decrypt a sum of ``length`` values from its ciphertexts and every party's decryption
    shares (``shares_per_party[p][k]``: one party's share of ciphertext ``k``), divided by
    ``divisor``; needs no secret. Raises :class:`EncryptionError`, decrypting nothing, when a
    party is missing or a share was made for another ciphertext or committee."""

def he_smudging(context: HeContext, parties: int) -> tuple[int, float]:
    """The smudging noise of a committee of ``parties`` under these settings: ``(bits,
    margin_bits)``, the margin over the worst-case noise it hides at ``max_total_weight``.
    Raises :class:`EncryptionError` when the noise budget leaves less than 16 bits."""

# --------------------------------------------------------------------------------------- SecAgg+

__all__ += [
    "SecAggError",
    "SecAggLearner",
    "secagg_mean",
    "secagg_unmask_sum",
    "secagg_unmask_total",
]

class SecAggError(ValueError):
    """Invalid SecAgg+ settings (a threshold of half the neighbours or less, a sum that could
    wrap 2**32), a message that does not fit the round (altered, misaddressed, out of step), or
    a round that cannot be unmasked because too many learners dropped."""

@final
class SecAggLearner:
    """One learner's state through a SecAgg+ round; randomness from the OS's CSPRNG."""

    def __new__(
        cls,
        round: bytes,
        learners: int,
        neighbours: int,
        threshold: int,
        index: int,
        clip: float = 1.0,
        bits: int = 16,
    ) -> SecAggLearner: ...
    def advertise(self) -> tuple[bytes, bytes]:
        """Step 1: the (sealing, masking) X25519 public keys."""

    def share(self, keys: Mapping[int, tuple[bytes, bytes]]) -> list[tuple[int, bytes]]:
        """Step 2: given the neighbours' keys, the sealed shares for each neighbour."""

    def receive(self, sender: int, sealed: bytes) -> None:
        """Keep the shares neighbour ``sender`` sealed to this learner."""

    def masked_input(self, values: NDArray[np.float32]) -> NDArray[np.uint32]:
        """Step 3: the quantized, masked update (GIL released)."""

    def unmask(self, survivors: set[int], dropped: set[int]) -> list[tuple[int, bytes]]:
        """Step 4: (owner, share) for each neighbour: a survivor's self-mask share or a dropped
        learner's masking-secret share. Answered once per round."""

def secagg_unmask_sum(
    round: bytes,
    learners: int,
    neighbours: int,
    threshold: int,
    keys: Mapping[int, tuple[bytes, bytes]],
    shared: set[int],
    inputs: Mapping[int, NDArray[np.uint32]],
    shares: Sequence[tuple[int, bytes]],
    clip: float = 1.0,
    bits: int = 16,
) -> NDArray[np.uint32]:
    """The server's step: the sum (mod 2**32) of the survivors' quantized values; raises
    :class:`SecAggError`, changing nothing, when too many learners dropped."""

def secagg_unmask_total(
    round: bytes,
    learners: int,
    neighbours: int,
    threshold: int,
    keys: Mapping[int, tuple[bytes, bytes]],
    shared: set[int],
    survivors: set[int],
    total: NDArray[np.uint32],
    shares: Sequence[tuple[int, bytes]],
    clip: float = 1.0,
    bits: int = 16,
) -> NDArray[np.uint32]:
    """``secagg_unmask_sum`` for a server that added the ``survivors``' masked inputs into
    ``total`` (mod 2**32) as they arrived: ``total`` with the masks removed (a new array)."""

def secagg_mean(
    sum: NDArray[np.uint32], count: int, clip: float = 1.0, bits: int = 16
) -> NDArray[np.float32]:
    """The mean of ``count`` learners' values from their unmasked quantized sum."""
