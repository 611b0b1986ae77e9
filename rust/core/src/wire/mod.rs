//! Payload chunks on the wire: reassembling an announced payload (float32 or a codec) from its
//! `Chunk` messages ([`ChunkAssembler`]) and building the `Chunk` envelope messages of one
//! ([`encode`]), straight from and to the serialized protobuf bytes.
//!
//! The checks and messages mirror `metis_async.wire.PayloadAssembler`, so a learner sees the
//! same complaint whichever path rejected its upload.

pub mod assemble;
pub mod encode;
pub mod pool;
pub mod protobuf;

pub use assemble::{Announcement, ChunkAssembler};
pub use protobuf::{peek_chunk, ChunkRef};

use thiserror::Error;

/// Everything that can go wrong reading or writing chunk messages. Validation happens before
/// any byte is copied, except for [`WireError::NonFinite`], which is found while copying.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum WireError {
    /// Bytes that are not valid protobuf wire format.
    #[error("malformed protobuf message: {0}")]
    Malformed(&'static str),

    /// An envelope field number outside protobuf's 1..=2^29-1.
    #[error("envelope field must be in 1..=536870911, got {0}")]
    EnvelopeField(u32),

    /// A message given to the assembler whose body is not a chunk.
    #[error("message is not a chunk (no field {0} in the envelope)")]
    NotAChunk(u32),

    /// A payload size that is not a whole number of float32 values.
    #[error("payload has {0} bytes, not a whole number of float32 values")]
    NotFloat32(u64),

    /// A codec payload size that is not a whole number of encoded values.
    #[error("payload has {bytes} bytes, not a whole number of {codec} values")]
    NotWholeValues { bytes: u64, codec: &'static str },

    /// A chunk of a codec payload that is not a whole number of encoded values.
    #[error("chunk {index} has {bytes} bytes, not a whole number of {codec} values")]
    ChunkNotWholeValues {
        index: u32,
        bytes: usize,
        codec: &'static str,
    },

    /// An int8 chunk whose scale is negative, NaN, infinite or too large for 127 × scale.
    #[error(
        "chunk {index} has int8 scale {}, expected finite, >= 0 and 127 x scale finite",
        f32::from_bits(*bits)
    )]
    InvalidScale { index: u32, bits: u32 },

    /// A scale on a chunk of a payload whose codec has none.
    #[error("chunk {index} has a scale, but {codec} payloads carry none (leave it 0)")]
    UnexpectedScale { index: u32, codec: &'static str },

    /// Values that cannot be encoded (non-finite, or out of the codec's range).
    #[error(transparent)]
    Codec(#[from] crate::codec::CodecError),

    /// A chunk limit smaller than one encoded value.
    #[error("max_chunk_bytes {limit} cannot hold one {codec} value")]
    ChunkLimitBelowValue { limit: usize, codec: &'static str },

    /// A chunk size limit of zero.
    #[error("max_chunk_bytes must be > 0")]
    ZeroChunkLimit,

    /// A chunk count that cannot carry the payload within the chunk size limit (or has
    /// chunks that must be empty).
    #[error(
        "payload announces {announced} chunks; {total} bytes need at least {needed} of at most \
         {limit} bytes"
    )]
    ChunkCount {
        announced: u64,
        total: u64,
        needed: u64,
        limit: usize,
    },

    /// A chunk of another payload.
    #[error("chunk for payload {got} while payload {expected} is incomplete")]
    WrongPayload { got: u64, expected: u64 },

    /// A chunk out of order.
    #[error("chunk {got} arrived, expected chunk {expected}")]
    OutOfOrder { got: u32, expected: u32 },

    /// A chunk after the last announced one.
    #[error("chunk {index} arrived after the announced {num_chunks} chunks")]
    ExtraChunk { index: u32, num_chunks: u32 },

    /// A chunk larger than the limit.
    #[error("chunk has {got} bytes, the limit is {limit}")]
    ChunkTooLarge { got: usize, limit: usize },

    /// Chunks adding up to more than announced.
    #[error("chunks exceed the announced {0} bytes")]
    Overflow(u64),

    /// The last chunk arrived before the announced bytes did.
    #[error("payload ended after {filled} of {total} bytes")]
    Short { filled: u64, total: u64 },

    /// A NaN or infinity in the values received.
    #[error("update contains NaN or infinite values (first at value {0})")]
    NonFinite(u64),

    /// The payload was asked for before its last chunk.
    #[error("payload incomplete: {received} of {num_chunks} chunks")]
    Incomplete { received: u32, num_chunks: u32 },

    /// The payload was already handed over.
    #[error("payload was already taken")]
    Taken,

    /// A call after an error: the assembler's payload is rejected for good.
    #[error("payload was rejected earlier: {0}")]
    Rejected(Box<WireError>),

    /// Memory for the payload could not be allocated.
    #[error("cannot allocate a payload of {0} bytes")]
    Allocation(u64),

    /// In place, a chunk that ends inside a float32 value (before the payload's end): the
    /// payload cannot be read from its messages as whole values and must be copied instead.
    /// Not a contract violation: the assembler is not rejected by it.
    #[error("chunk ends inside a float32 value: the payload cannot be kept in place")]
    NotInPlace,

    /// A payload too long for uint32 chunk indices at this chunk size.
    #[error("payload of {total} bytes needs more than 2^32 chunks of {limit} bytes")]
    TooManyChunks { total: u64, limit: usize },
}

/// Number of chunks of at most `max_chunk_bytes` a payload of `total_bytes` is split into (0
/// for an empty payload), as `metis_async.wire.chunk_count`.
pub fn chunk_count(total_bytes: u64, max_chunk_bytes: usize) -> u64 {
    total_bytes.div_ceil(max_chunk_bytes.max(1) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_match_the_python_assembler() {
        assert_eq!(
            WireError::OutOfOrder {
                got: 3,
                expected: 2
            }
            .to_string(),
            "chunk 3 arrived, expected chunk 2"
        );
        assert_eq!(
            WireError::NonFinite(123).to_string(),
            "update contains NaN or infinite values (first at value 123)"
        );
        assert_eq!(
            WireError::Rejected(Box::new(WireError::Overflow(8))).to_string(),
            "payload was rejected earlier: chunks exceed the announced 8 bytes"
        );
    }

    #[test]
    fn chunk_count_rounds_up_and_is_zero_for_nothing() {
        assert_eq!(chunk_count(0, 4), 0);
        assert_eq!(chunk_count(1, 4), 1);
        assert_eq!(chunk_count(8, 4), 2);
        assert_eq!(chunk_count(9, 4), 3);
    }
}
