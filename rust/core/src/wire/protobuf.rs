//! Just enough of the protobuf wire format to find a `Chunk` inside an envelope message
//! (`LearnerMessage.chunk` = field 3, `ControllerMessage.chunk` = field 4) without parsing the
//! rest, and to write one.
//!
//! Decoding follows protobuf's rules where they matter here: fields may come in any order,
//! unknown fields (of any wire type, groups included) are skipped, a known field number with an
//! unexpected wire type is treated as unknown, and when a field repeats the last value wins
//! (repeated occurrences of the embedded `Chunk` merge, which for its scalar and bytes fields is
//! the same thing). Input that is not valid wire format is rejected: truncated varints or
//! payloads, varints longer than 10 bytes, field number 0, wire types 6 and 7, unbalanced groups.
//!
//! Every body of both envelopes is a message (length-delimited), and they form one `oneof`, so a
//! later length-delimited field replaces the chunk as the body. Unknown length-delimited envelope
//! fields after the chunk are therefore read conservatively as "another body": the caller falls
//! back to full protobuf parsing, which is always correct.

use super::WireError;

/// Wire types of the protobuf encoding.
const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LEN: u8 = 2;
const START_GROUP: u8 = 3;
const END_GROUP: u8 = 4;
const FIXED32: u8 = 5;

/// Largest field number protobuf allows (2^29 - 1).
pub const MAX_FIELD: u32 = (1 << 29) - 1;

/// The fields of a `Chunk { uint64 payload_id = 1; uint32 index = 2; bytes data = 3;
/// float scale = 4; }`, borrowing its data from the message.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ChunkRef<'a> {
    pub payload_id: u64,
    pub index: u32,
    pub data: &'a [u8],
    /// The int8 scale of the chunk's values (0.0 when unset, as for every other dtype).
    pub scale: f32,
}

impl<'a> ChunkRef<'a> {
    /// A chunk without a scale.
    pub fn new(payload_id: u64, index: u32, data: &'a [u8]) -> Self {
        Self {
            payload_id,
            index,
            data,
            scale: 0.0,
        }
    }
}

/// A cursor over one message's bytes.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, at: 0 }
    }

    fn is_empty(&self) -> bool {
        self.at == self.bytes.len()
    }

    fn varint(&mut self, what: &'static str) -> Result<u64, WireError> {
        let mut value = 0u64;
        for shift in 0..10 {
            let byte = *self
                .bytes
                .get(self.at)
                .ok_or(WireError::Malformed(match what {
                    "tag" => "truncated field tag",
                    "length" => "truncated length",
                    _ => "truncated varint",
                }))?;
            self.at += 1;
            // The tenth byte may only carry the top bit of a 64-bit value.
            if shift == 9 && byte > 1 {
                return Err(WireError::Malformed("varint overflows 64 bits"));
            }
            value |= u64::from(byte & 0x7f) << (7 * shift);
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(WireError::Malformed("varint longer than 10 bytes"))
    }

    fn take(&mut self, len: u64) -> Result<&'a [u8], WireError> {
        let left = (self.bytes.len() - self.at) as u64;
        if len > left {
            return Err(WireError::Malformed(
                "length-delimited field runs past the end of the message",
            ));
        }
        let start = self.at;
        self.at += len as usize;
        Ok(&self.bytes[start..self.at])
    }

    /// The next field's number and wire type.
    fn tag(&mut self) -> Result<(u32, u8), WireError> {
        let tag = self.varint("tag")?;
        let field = tag >> 3;
        if field == 0 {
            return Err(WireError::Malformed("field number 0"));
        }
        if field > u64::from(MAX_FIELD) {
            return Err(WireError::Malformed("field number above 2^29 - 1"));
        }
        Ok((field as u32, (tag & 7) as u8))
    }

    /// Reads the value of a field of `wire_type`, returning it when it is length-delimited.
    fn value(&mut self, field: u32, wire_type: u8) -> Result<Value<'a>, WireError> {
        Ok(match wire_type {
            VARINT => Value::Varint(self.varint("varint")?),
            FIXED64 => {
                self.take(8)?;
                Value::Fixed
            }
            LEN => {
                let len = self.varint("length")?;
                Value::Len(self.take(len)?)
            }
            FIXED32 => {
                let b = self.take(4)?;
                Value::Fixed32(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            }
            START_GROUP => {
                self.skip_group(field)?;
                Value::Fixed
            }
            END_GROUP => return Err(WireError::Malformed("end of a group that was not started")),
            _ => return Err(WireError::Malformed("invalid wire type (6 or 7)")),
        })
    }

    /// Skips a (deprecated) group up to its matching end, nested groups included.
    fn skip_group(&mut self, field: u32) -> Result<(), WireError> {
        let mut open = vec![field];
        while let Some(&innermost) = open.last() {
            if self.is_empty() {
                return Err(WireError::Malformed("group is not closed"));
            }
            let (number, wire_type) = self.tag()?;
            match wire_type {
                START_GROUP => open.push(number),
                END_GROUP if number == innermost => {
                    open.pop();
                }
                END_GROUP => return Err(WireError::Malformed("group closed by another field")),
                _ => {
                    self.value(number, wire_type)?;
                }
            }
        }
        Ok(())
    }
}

/// A field's value, as far as the decoder cares.
enum Value<'a> {
    Varint(u64),
    Len(&'a [u8]),
    /// A fixed32 field's bits (a `float`).
    Fixed32(u32),
    /// A fixed64 or group field (skipped).
    Fixed,
}

/// Decodes a `Chunk` message.
pub fn decode_chunk(bytes: &[u8]) -> Result<ChunkRef<'_>, WireError> {
    let mut chunk = ChunkRef::new(0, 0, &[]);
    merge_chunk(&mut chunk, bytes)?;
    Ok(chunk)
}

/// Merges the fields present in `bytes` into `chunk` (protobuf's rule for a repeated message).
fn merge_chunk<'a>(chunk: &mut ChunkRef<'a>, bytes: &'a [u8]) -> Result<(), WireError> {
    let mut reader = Reader::new(bytes);
    while !reader.is_empty() {
        let (field, wire_type) = reader.tag()?;
        match (field, reader.value(field, wire_type)?) {
            (1, Value::Varint(id)) => chunk.payload_id = id,
            (2, Value::Varint(index)) => {
                chunk.index = u32::try_from(index)
                    .map_err(|_| WireError::Malformed("chunk index does not fit uint32"))?;
            }
            (3, Value::Len(data)) => chunk.data = data,
            (4, Value::Fixed32(bits)) => chunk.scale = f32::from_bits(bits),
            _ => {} // unknown field, or a known number with another wire type
        }
    }
    Ok(())
}

/// The `Chunk` carried by an envelope message in field `envelope_field`, or `None` when the
/// envelope's body is something else (see the module comment for how the body is decided).
pub fn peek_chunk(raw: &[u8], envelope_field: u32) -> Result<Option<ChunkRef<'_>>, WireError> {
    check_field(envelope_field)?;
    let mut reader = Reader::new(raw);
    let mut chunk: Option<ChunkRef<'_>> = None;
    while !reader.is_empty() {
        let (field, wire_type) = reader.tag()?;
        match (field == envelope_field, reader.value(field, wire_type)?) {
            (true, Value::Len(body)) => {
                let merged = chunk.get_or_insert(ChunkRef::new(0, 0, &[]));
                merge_chunk(merged, body)?;
            }
            // Another body of the oneof replaces the chunk.
            (false, Value::Len(_)) => chunk = None,
            _ => {}
        }
    }
    Ok(chunk)
}

/// Checks that `field` is a valid protobuf field number.
pub fn check_field(field: u32) -> Result<(), WireError> {
    if (1..=MAX_FIELD).contains(&field) {
        Ok(())
    } else {
        Err(WireError::EnvelopeField(field))
    }
}

/// Appends `value` as a varint.
pub fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// Bytes `value` takes as a varint.
pub fn varint_len(value: u64) -> usize {
    // One byte per started group of 7 bits; 0 still takes one byte.
    (64 - (value | 1).leading_zeros() as usize).div_ceil(7)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn varint(value: u64) -> Vec<u8> {
        let mut out = Vec::new();
        put_varint(&mut out, value);
        out
    }

    /// Field `field` of wire type 2 holding `body`.
    fn len_field(field: u32, body: &[u8]) -> Vec<u8> {
        let mut out = varint(u64::from(field) << 3 | 2);
        out.extend(varint(body.len() as u64));
        out.extend_from_slice(body);
        out
    }

    fn chunk_body(payload_id: u64, index: u64, data: &[u8]) -> Vec<u8> {
        let mut out = vec![0x08];
        out.extend(varint(payload_id));
        out.push(0x10);
        out.extend(varint(index));
        out.extend(len_field(3, data));
        out
    }

    #[test]
    fn varints_round_trip_and_report_their_length() {
        for value in [0, 1, 127, 128, 300, u64::from(u32::MAX), u64::MAX] {
            let bytes = varint(value);
            assert_eq!(bytes.len(), varint_len(value), "{value}");
            assert_eq!(Reader::new(&bytes).varint("varint"), Ok(value));
        }
    }

    #[test]
    fn overlong_and_truncated_varints_are_rejected() {
        let eleven = [0xffu8; 10]
            .iter()
            .copied()
            .chain([0x01])
            .collect::<Vec<_>>();
        assert!(Reader::new(&eleven).varint("varint").is_err());
        assert!(Reader::new(&[0x80, 0x80]).varint("varint").is_err());
        assert!(
            Reader::new(&[0xff; 9].iter().copied().chain([0x02]).collect::<Vec<_>>())
                .varint("varint")
                .is_err()
        );
    }

    #[test]
    fn finds_the_chunk_in_any_field_order_with_unknown_fields() {
        let mut body = len_field(3, b"abc");
        body.extend([0x10, 0x07]); // index 7
        body.extend([0x2d, 1, 2, 3, 4]); // unknown fixed32 field 5
        body.extend([0x08, 0x2a]); // payload_id 42
        let mut raw = vec![0x48, 0x01]; // unknown varint field 9 before the body
        raw.extend(len_field(4, &body));
        raw.extend([0x31, 0, 0, 0, 0, 0, 0, 0, 0]); // unknown fixed64 field 6 after it

        let chunk = peek_chunk(&raw, 4).unwrap().unwrap();

        assert_eq!(chunk, ChunkRef::new(42, 7, b"abc"));
    }

    #[test]
    fn reads_the_scale_as_a_float() {
        let mut body = chunk_body(1, 0, b"q");
        body.push(0x25); // field 4, fixed32
        body.extend(0.25f32.to_le_bytes());
        let raw = len_field(3, &body);

        let chunk = peek_chunk(&raw, 3).unwrap().unwrap();

        assert_eq!(chunk.scale, 0.25);
        assert_eq!(chunk.data, b"q");
    }

    #[test]
    fn another_body_is_not_a_chunk() {
        let raw = len_field(1, b"\x0a\x02id");

        assert_eq!(peek_chunk(&raw, 4), Ok(None));
        assert_eq!(peek_chunk(&[], 4), Ok(None));
    }

    #[test]
    fn the_last_body_wins() {
        let mut raw = len_field(4, &chunk_body(1, 0, b"x"));
        raw.extend(len_field(8, b""));
        assert_eq!(peek_chunk(&raw, 4), Ok(None));

        let mut raw = len_field(8, b"");
        raw.extend(len_field(4, &chunk_body(1, 2, b"x")));
        assert_eq!(peek_chunk(&raw, 4).unwrap().map(|c| c.index), Some(2));
    }

    #[test]
    fn groups_are_skipped() {
        // Field 7 as a group containing a varint and a nested group 8.
        let mut raw = vec![0x3b, 0x08, 0x01, 0x43, 0x44, 0x3c];
        raw.extend(len_field(3, &chunk_body(5, 1, b"zz")));

        assert_eq!(peek_chunk(&raw, 3).unwrap().map(|c| c.payload_id), Some(5));
        assert!(peek_chunk(&[0x3b, 0x08, 0x01], 3).is_err());
        assert!(peek_chunk(&[0x3c], 3).is_err());
    }

    #[test]
    fn malformed_envelopes_are_rejected() {
        let cases: [&[u8]; 6] = [
            &[0x22, 0x05, 0x08],       // length past the end
            &[0x22],                   // missing length
            &[0x00, 0x01],             // field number 0
            &[0x26, 0x00],             // wire type 6
            &[0x22, 0x02, 0x10, 0x80], // truncated varint inside the chunk
            &[0x80],                   // truncated tag
        ];
        for raw in cases {
            assert!(
                matches!(peek_chunk(raw, 4), Err(WireError::Malformed(_))),
                "{raw:?}"
            );
        }
    }

    #[test]
    fn an_index_beyond_uint32_is_rejected() {
        let raw = len_field(4, &chunk_body(1, 1 << 32, b""));

        assert!(peek_chunk(&raw, 4).is_err());
    }

    #[test]
    fn invalid_envelope_fields_are_rejected() {
        assert_eq!(peek_chunk(&[], 0), Err(WireError::EnvelopeField(0)));
        assert!(peek_chunk(&[], MAX_FIELD + 1).is_err());
    }
}
