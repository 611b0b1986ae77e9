//! Building the chunk envelope messages of one payload:
//! `ControllerMessage { chunk: Chunk { payload_id, index, data } }` (or any envelope whose
//! chunk body is field `envelope_field`), bit-identical to protobuf's own serialization, which
//! writes fields in number order and omits proto3 defaults (`payload_id` 0, `index` 0, empty
//! `data`) but always writes a set oneof body, even an empty one.
//!
//! The work is split so the caller can allocate each message where it likes (a Python `bytes`
//! object, say): [`plan`] says how long every message is and writes its short header, and
//! [`fill`] copies the payload bytes behind the headers, in parallel.
//!
//! With a codec ([`plan_values`], [`fill_values`]) the float32 values are encoded straight into
//! the messages, chunk by chunk in parallel: each chunk holds `max_chunk_bytes` rounded down to
//! whole encoded values, and an int8 chunk's scale (computed while planning, so every message's
//! length is known) follows its data as field 4 (`float scale`), omitted when 0 as protobuf does.

use rayon::prelude::*;

use super::protobuf::{check_field, put_varint, varint_len};
use super::{chunk_count, WireError};
use crate::codec::{self, Codec, CodecError};

/// The layout of one chunk message: the header bytes (envelope tag and length, `payload_id`,
/// `index`, data tag and length), `data_len` payload bytes, then the trailer (the int8 scale
/// field, or nothing).
#[derive(Debug, Clone, PartialEq)]
pub struct MessagePlan {
    pub header: Vec<u8>,
    /// Byte offset of this chunk's data in the (encoded) payload.
    pub data_start: usize,
    pub data_len: usize,
    /// The chunk's int8 scale (0.0 otherwise).
    pub scale: f32,
    pub trailer: Vec<u8>,
}

impl MessagePlan {
    /// Length of the whole serialized message.
    pub fn len(&self) -> usize {
        self.header.len() + self.data_len + self.trailer.len()
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
            let header = header(envelope_field, payload_id, i as u32, data_len, 0);
            MessagePlan {
                header,
                data_start,
                data_len,
                scale: 0.0,
                trailer: Vec::new(),
            }
        })
        .collect())
}

/// The messages carrying `values` encoded with `codec` as payload `payload_id`: chunks of at
/// most `max_chunk_bytes` rounded down to whole values (float32: byte slices, as [`plan`]).
/// For int8, computes each chunk's scale, refusing non-finite values.
pub fn plan_values(
    values: &[f32],
    codec: Codec,
    payload_id: u64,
    max_chunk_bytes: usize,
    envelope_field: u32,
) -> Result<Vec<MessagePlan>, WireError> {
    if codec == Codec::Float32 {
        return plan(
            values.len() * 4,
            payload_id,
            max_chunk_bytes,
            envelope_field,
        );
    }
    check_field(envelope_field)?;
    let item = codec.item_size();
    let per_chunk = max_chunk_bytes / item;
    if per_chunk == 0 {
        return Err(WireError::ChunkLimitBelowValue {
            limit: max_chunk_bytes,
            codec: codec.name(),
        });
    }
    let count = values.len().div_ceil(per_chunk);
    if count as u64 > u64::from(u32::MAX) + 1 {
        return Err(WireError::TooManyChunks {
            total: (values.len() * item) as u64,
            limit: max_chunk_bytes,
        });
    }
    (0..count)
        .into_par_iter()
        .map(|i| {
            let start = i * per_chunk;
            let chunk = &values[start..values.len().min(start + per_chunk)];
            let scale = if codec.has_scale() {
                if let Some(at) = codec::first_non_finite_f32(chunk) {
                    return Err(CodecError::NonFinite(start + at).into());
                }
                let scale = codec::int8_scale(chunk);
                if !codec::scale_is_valid(scale) {
                    return Err(overflow(codec, chunk, start));
                }
                scale
            } else {
                0.0
            };
            let mut trailer = Vec::new();
            if scale != 0.0 {
                trailer.push(0x25); // field 4, fixed32
                trailer.extend(scale.to_le_bytes());
            }
            let data_len = chunk.len() * item;
            Ok(MessagePlan {
                header: header(
                    envelope_field,
                    payload_id,
                    i as u32,
                    data_len,
                    trailer.len(),
                ),
                data_start: start * item,
                data_len,
                scale,
                trailer,
            })
        })
        .collect()
}

/// The overflow error of an int8 chunk whose scale is unusable (a value near float32's max).
fn overflow(codec: Codec, chunk: &[f32], start: usize) -> WireError {
    let big = chunk.iter().map(|x| x.abs()).fold(0.0f32, f32::max);
    let at = chunk.iter().position(|x| x.abs() == big).unwrap_or(0);
    CodecError::Overflow {
        index: start + at,
        codec: codec.name(),
    }
    .into()
}

/// The bytes of a chunk message that precede its data (`trailer_len` bytes follow the data).
fn header(
    envelope_field: u32,
    payload_id: u64,
    index: u32,
    data_len: usize,
    trailer_len: usize,
) -> Vec<u8> {
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
    body_len += trailer_len;
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

/// Encodes each message's values behind the header already written at the start of its buffer,
/// and writes its trailer; `messages[i]` is the buffer of `plans[i]` (from [`plan_values`] with
/// the same `values` and `codec`). Runs the chunks in parallel. Fails on a value that the codec
/// cannot represent (non-finite, or out of float16's range), naming the first such value.
pub fn fill_values(
    values: &[f32],
    codec: Codec,
    plans: &[MessagePlan],
    messages: Vec<&mut [u8]>,
) -> Result<(), WireError> {
    if codec == Codec::Float32 {
        // SAFETY: the bytes of a live f32 slice; u8 has alignment 1 and no invalid patterns.
        let payload = unsafe {
            std::slice::from_raw_parts(values.as_ptr().cast::<u8>(), std::mem::size_of_val(values))
        };
        fill(payload, plans, messages);
        return Ok(());
    }
    let item = codec.item_size();
    let failures: Vec<WireError> = messages
        .into_par_iter()
        .zip(plans)
        .filter_map(|(message, plan)| {
            let start = plan.data_start / item;
            let chunk = &values[start..start + plan.data_len / item];
            let (head, rest) = message.split_at_mut(plan.header.len());
            debug_assert_eq!(head, plan.header.as_slice());
            let (data, trailer) = rest.split_at_mut(plan.data_len);
            trailer.copy_from_slice(&plan.trailer);
            match codec::encode_with_scale(codec, chunk, plan.scale, data) {
                Ok(()) => None,
                // a NaN or infinity in the input encodes as one too: name it as such
                Err(CodecError::Overflow { index, codec }) => Some(
                    if chunk[index].is_finite() {
                        CodecError::Overflow {
                            index: start + index,
                            codec,
                        }
                    } else {
                        CodecError::NonFinite(start + index)
                    }
                    .into(),
                ),
                Err(other) => Some(other.into()),
            }
        })
        .collect();
    // chunks are collected in order, so the first failure names the first bad value
    match failures.into_iter().next() {
        Some(error) => Err(error),
        None => Ok(()),
    }
}

/// The messages of `values` encoded with `codec`, as owned byte vectors.
pub fn encode_values(
    values: &[f32],
    codec: Codec,
    payload_id: u64,
    max_chunk_bytes: usize,
    envelope_field: u32,
) -> Result<Vec<Vec<u8>>, WireError> {
    let plans = plan_values(values, codec, payload_id, max_chunk_bytes, envelope_field)?;
    let mut messages = allocated(&plans);
    fill_values(
        values,
        codec,
        &plans,
        messages.iter_mut().map(Vec::as_mut_slice).collect(),
    )?;
    Ok(messages)
}

/// A buffer per plan, its header written.
fn allocated(plans: &[MessagePlan]) -> Vec<Vec<u8>> {
    plans
        .iter()
        .map(|p| {
            let mut message = vec![0; p.len()];
            message[..p.header.len()].copy_from_slice(&p.header);
            message
        })
        .collect()
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
    let mut messages = allocated(&plans);
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
    fn an_int8_scale_follows_the_data_as_field_4() {
        let messages = encode_values(&[0.0, 254.0], Codec::Int8, 1, 4, 3).unwrap();

        // 1a 0a | 08 01 | 1a 02 00 7f | 25 <2.0f32 LE>
        let mut expected = vec![0x1a, 0x0b, 0x08, 0x01, 0x1a, 0x02, 0x00, 0x7f, 0x25];
        expected.extend(2.0f32.to_le_bytes());
        assert_eq!(messages, vec![expected]);
        assert_eq!(peek_chunk(&messages[0], 3).unwrap().unwrap().scale, 2.0);
    }

    #[test]
    fn unencodable_values_are_named() {
        let mut values = vec![1.0f32; 10];
        values[7] = 1e6;
        assert_eq!(
            encode_values(&values, Codec::Float16, 1, 4, 3),
            Err(WireError::Codec(CodecError::Overflow {
                index: 7,
                codec: "float16"
            }))
        );
        values[3] = f32::NAN;
        for codec in [Codec::Float16, Codec::Int8] {
            assert_eq!(
                encode_values(&values, codec, 1, 4, 3),
                Err(WireError::Codec(CodecError::NonFinite(3)))
            );
        }
        assert_eq!(
            encode_values(&values, Codec::BFloat16, 1, 1, 3),
            Err(WireError::ChunkLimitBelowValue {
                limit: 1,
                codec: "bfloat16"
            })
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

        /// With a codec, every chunk holds whole values, and the copying assembler decodes the
        /// messages to what each chunk's values decode to on their own (int8: its own scale).
        #[test]
        fn encoded_messages_round_trip_through_the_assembler(
            values in proptest::collection::vec(-1e4f32..1e4, 0..600),
            limit in 1usize..300,
            codec in prop_oneof![Just(Codec::Float16), Just(Codec::BFloat16), Just(Codec::Int8)],
        ) {
            let item = codec.item_size();
            let per = limit / item;
            let messages = match encode_values(&values, codec, 7, limit, 3) {
                Err(WireError::ChunkLimitBelowValue { .. }) => {
                    prop_assert_eq!(per, 0);
                    return Ok(());
                }
                other => other.unwrap(),
            };
            let mut expected = Vec::new();
            for chunk in values.chunks(per) {
                let mut bytes = vec![0; chunk.len() * item];
                let scale = codec::encode(codec, chunk, &mut bytes).unwrap();
                let mut back = vec![0.0; chunk.len()];
                codec::decode(codec, &bytes, scale, &mut back).unwrap();
                expected.extend(back);
            }
            let announced = super::super::Announcement {
                total_bytes: (values.len() * item) as u64,
                payload_id: 7,
                num_chunks: messages.len() as u32,
                max_chunk_bytes: limit,
                envelope_field: 3,
                check_finite: true,
                codec,
            };
            let mut asm = ChunkAssembler::copying(announced).unwrap();
            let mut in_place = ChunkAssembler::in_place_from(announced).unwrap();
            for message in &messages {
                let chunk = peek_chunk(message, 3).unwrap().unwrap();
                prop_assert_eq!(chunk.data.len() % item, 0);
                asm.add_message(message).unwrap();
                in_place.add_message_in_place(message).unwrap();
            }
            prop_assert_eq!(asm.take().unwrap(), expected);
            prop_assert_eq!(in_place.take_segments().unwrap().len(), messages.len());
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
                        .flat_map(|(&(at, len, _), m)| m[at..at + len].to_vec())
                        .collect();
                    prop_assert_eq!(joined, payload);
                }
                Err(other) => prop_assert!(false, "unexpected {other}"),
            }
        }
    }
}
