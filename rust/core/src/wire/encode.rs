//! Building the chunk envelope messages of one payload:
//! `ControllerMessage { chunk: Chunk { payload_id, index, data } }` (or any envelope whose
//! chunk body is field `envelope_field`), bit-identical to protobuf's own serialization, which
//! writes fields in number order and omits proto3 defaults (`payload_id` 0, `index` 0, empty
//! `data`) but always writes a set oneof body, even an empty one.
//!
//! The work is split so the caller can allocate each message where it likes (a Python `bytes`
//! object, say): [`plan`] says how long every message is and writes its short header, and
//! [`fill`] copies the payload bytes behind the headers, in parallel.

use rayon::prelude::*;

use super::protobuf::{check_field, put_varint, varint_len};
use super::{chunk_count, WireError};

/// The layout of one chunk message: the header bytes (envelope tag and length, `payload_id`,
/// `index`, data tag and length) followed by `data_len` payload bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessagePlan {
    pub header: Vec<u8>,
    /// Byte offset of this chunk's data in the payload.
    pub data_start: usize,
    pub data_len: usize,
}

impl MessagePlan {
    /// Length of the whole serialized message.
    pub fn len(&self) -> usize {
        self.header.len() + self.data_len
    }

    /// Whether the message is empty (never: the envelope tag is always written).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The messages carrying `total_bytes` of payload `payload_id` in chunks of at most
/// `max_chunk_bytes` (none for an empty payload, as `metis_async.wire.chunk_count`).
pub fn plan(
    total_bytes: usize,
    payload_id: u64,
    max_chunk_bytes: usize,
    envelope_field: u32,
) -> Result<Vec<MessagePlan>, WireError> {
    check_field(envelope_field)?;
    if max_chunk_bytes == 0 {
        return Err(WireError::ZeroChunkLimit);
    }
    let count = chunk_count(total_bytes as u64, max_chunk_bytes);
    if count > u64::from(u32::MAX) + 1 {
        return Err(WireError::TooManyChunks {
            total: total_bytes as u64,
            limit: max_chunk_bytes,
        });
    }
    Ok((0..count as usize)
        .map(|i| {
            let data_start = i * max_chunk_bytes;
            let data_len = max_chunk_bytes.min(total_bytes - data_start);
            let header = header(envelope_field, payload_id, i as u32, data_len);
            MessagePlan {
                header,
                data_start,
                data_len,
            }
        })
        .collect())
}

/// The bytes of a chunk message that precede its data.
fn header(envelope_field: u32, payload_id: u64, index: u32, data_len: usize) -> Vec<u8> {
    let mut body = Vec::with_capacity(24);
    if payload_id != 0 {
        body.push(0x08); // field 1, varint
        put_varint(&mut body, payload_id);
    }
    if index != 0 {
        body.push(0x10); // field 2, varint
        put_varint(&mut body, index.into());
    }
    let mut body_len = body.len();
    if data_len != 0 {
        body.push(0x1a); // field 3, length-delimited
        put_varint(&mut body, data_len as u64);
        body_len = body.len() + data_len;
    }
    let mut out = Vec::with_capacity(body.len() + 16);
    put_varint(&mut out, u64::from(envelope_field) << 3 | 2);
    put_varint(&mut out, body_len as u64);
    debug_assert_eq!(
        out.len(),
        1 + varint_len(body_len as u64) + extra_tag(envelope_field)
    );
    out.extend_from_slice(&body);
    out
}

/// Tag bytes beyond the first for field numbers of 16 and above.
fn extra_tag(field: u32) -> usize {
    varint_len(u64::from(field) << 3) - 1
}

/// Copies each message's data from `payload` behind the header already written at the start
/// of its buffer; `messages[i]` is the buffer of `plans[i]`. Runs the copies in parallel.
pub fn fill(payload: &[u8], plans: &[MessagePlan], messages: Vec<&mut [u8]>) {
    messages
        .into_par_iter()
        .zip(plans)
        .for_each(|(message, plan)| {
            message[plan.header.len()..]
                .copy_from_slice(&payload[plan.data_start..plan.data_start + plan.data_len]);
        });
}

/// The chunk messages of `payload` as owned byte vectors (headers and data), for callers
/// without their own allocation.
pub fn encode(
    payload: &[u8],
    payload_id: u64,
    max_chunk_bytes: usize,
    envelope_field: u32,
) -> Result<Vec<Vec<u8>>, WireError> {
    let plans = plan(payload.len(), payload_id, max_chunk_bytes, envelope_field)?;
    let mut messages: Vec<Vec<u8>> = plans
        .iter()
        .map(|p| {
            let mut message = vec![0; p.len()];
            message[..p.header.len()].copy_from_slice(&p.header);
            message
        })
        .collect();
    fill(
        payload,
        &plans,
        messages.iter_mut().map(Vec::as_mut_slice).collect(),
    );
    Ok(messages)
}

#[cfg(test)]
mod tests {
    use super::super::protobuf::peek_chunk;
    use super::super::ChunkAssembler;
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn defaults_are_omitted_like_protobuf_does() {
        // ControllerMessage(chunk=Chunk(payload_id=0, index=0, data=b"ab")): 22 04 1a 02 61 62.
        let messages = encode(b"ab", 0, 4, 4).unwrap();
        assert_eq!(messages, vec![vec![0x22, 0x04, 0x1a, 0x02, b'a', b'b']]);

        // payload_id=300, index=1, data=b"c": 22 06 08 ac 02 10 01 1a 01 63 (second chunk).
        let messages = encode(b"abc", 300, 2, 4).unwrap();
        assert_eq!(
            messages[1],
            vec![0x22, 0x08, 0x08, 0xac, 0x02, 0x10, 0x01, 0x1a, 0x01, b'c']
        );
    }

    #[test]
    fn an_empty_payload_has_no_chunks() {
        assert_eq!(encode(b"", 1, 4, 4), Ok(vec![]));
    }

    #[test]
    fn bad_arguments_are_rejected() {
        assert_eq!(encode(b"a", 1, 0, 4), Err(WireError::ZeroChunkLimit));
        assert_eq!(encode(b"a", 1, 1, 0), Err(WireError::EnvelopeField(0)));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Every message decodes back to its chunk, and the chunks reassemble the payload.
        #[test]
        fn messages_round_trip_through_the_assembler(
            values in proptest::collection::vec(-1e6f32..1e6, 0..600),
            payload_id in any::<u64>(),
            limit in 1usize..300,
            field in prop_oneof![Just(3u32), Just(4), Just(16), Just(2047), Just(536_870_911)],
        ) {
            let payload: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();

            let messages = encode(&payload, payload_id, limit, field).unwrap();

            let mut asm = ChunkAssembler::new(
                payload.len() as u64, payload_id, messages.len() as u32, limit, field, true,
            ).unwrap();
            for (i, message) in messages.iter().enumerate() {
                let chunk = peek_chunk(message, field).unwrap().unwrap();
                prop_assert_eq!(chunk.index as usize, i);
                asm.add_message(message).unwrap();
            }
            prop_assert_eq!(asm.take().unwrap(), values);
        }

        /// In place, the recorded segments of the messages are the payload, and a NaN is found
        /// at its index; a limit that cuts through values is refused with `NotInPlace` only.
        #[test]
        fn messages_are_read_in_place(
            values in proptest::collection::vec(-1e6f32..1e6, 1..600),
            limit in 1usize..300,
            nan_at in proptest::option::of(0usize..600),
        ) {
            let mut values = values;
            if let Some(at) = nan_at.filter(|&at| at < values.len()) {
                values[at] = f32::NAN;
            }
            let payload: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            let messages = encode(&payload, 5, limit, 3).unwrap();
            let mut asm = ChunkAssembler::new_in_place(
                payload.len() as u64, 5, messages.len() as u32, limit, 3, true,
            ).unwrap();
            let mut outcome = Ok(false);
            for message in &messages {
                outcome = asm.add_message_in_place(message);
                if outcome.is_err() {
                    break;
                }
            }
            match outcome {
                Err(WireError::NotInPlace) => prop_assert!(limit % 4 != 0),
                Err(WireError::NonFinite(at)) => {
                    prop_assert_eq!(Some(at as usize), values.iter().position(|v| v.is_nan()));
                }
                Ok(done) => {
                    prop_assert!(done);
                    prop_assert!(values.iter().all(|v| v.is_finite()));
                    let segments = asm.take_segments().unwrap();
                    let joined: Vec<u8> = segments
                        .iter()
                        .zip(&messages)
                        .flat_map(|(&(at, len), m)| m[at..at + len].to_vec())
                        .collect();
                    prop_assert_eq!(joined, payload);
                }
                Err(other) => prop_assert!(false, "unexpected {other}"),
            }
        }
    }
}
