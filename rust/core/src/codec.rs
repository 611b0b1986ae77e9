//! Update codecs: float32 values encoded as float16, bfloat16 or int8 with one float32 scale per
//! chunk, and decoded back, as `controller.proto` (`DType`, `Chunk.scale`) defines them.
//!
//! - float16 / bfloat16: each value rounded to the nearest representable one, ties to even (the
//!   `half` crate, F16C or NEON when the CPU has them, detected at run time). Relative error at
//!   most 2^-11 (float16, normal range 2^-14..65504) or 2^-8 (bfloat16); a finite float32 beyond
//!   float16's range becomes infinite and is refused by the encoder ([`CodecError::Overflow`]).
//! - int8: per chunk, `scale = max|x| / 127` (float32 division) and `q = round(x / scale)`,
//!   ties to even, clamped to [-127, 127] (-128 is never written); decoded as `q as f32 * scale`.
//!   A chunk of zeros has scale 0 and decodes to zeros (so does a chunk whose max|x| is so small
//!   that max|x| / 127 underflows to 0, below 2^-142). Absolute error at most `scale / 2` plus
//!   float32 rounding (`scale * (1/2 + 2^-16)` in all).
//!
//! Decoding is defined as producing float32 values, and every fold of encoded bytes
//! ([`add_scaled`]) widens exactly those float32 values to float64, so folding encoded data gives
//! the same bits as decoding it first and folding the float32 array.
//!
//! Encoded bytes may lie at any alignment (inside a received message): values are read with
//! `from_le_bytes` into small stack blocks, never through a typed pointer.

use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
use half::{bf16, f16};
use thiserror::Error;

/// Values decoded or encoded at once through a stack block (4 KiB of float32).
const BLOCK: usize = 1024;

/// Largest int8 magnitude written.
const INT8_MAX: f32 = 127.0;

/// An element type of a payload on the wire (the `DType` enum of `controller.proto`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Codec {
    /// Little-endian IEEE-754 binary32, as is (`DTYPE_FLOAT32` = 1; 0 means it too).
    Float32,
    /// Little-endian IEEE-754 binary16 (`DTYPE_FLOAT16` = 3).
    Float16,
    /// Little-endian bfloat16: the top 16 bits of a float32 (`DTYPE_BFLOAT16` = 4).
    BFloat16,
    /// Signed bytes times the chunk's float32 scale (`DTYPE_INT8` = 5).
    Int8,
}

/// What can go wrong encoding or naming a codec.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CodecError {
    /// A `DType` number that is not a wire codec.
    #[error("dtype {0} is not a wire dtype (1 float32, 3 float16, 4 bfloat16, 5 int8)")]
    UnknownDType(i32),

    /// A NaN or infinity among the values to encode.
    #[error("values to encode contain NaN or infinity (first at value {0})")]
    NonFinite(usize),

    /// A finite float32 that the codec cannot represent (it would round to infinity).
    #[error("value {index} does not fit {codec} (it would round to infinity)")]
    Overflow { index: usize, codec: &'static str },

    /// Output or input buffers whose lengths do not match the values.
    #[error("{codec} needs {expected} bytes for these values, got {got}")]
    Length {
        codec: &'static str,
        expected: usize,
        got: usize,
    },
}

impl Codec {
    /// Every codec, float32 first.
    pub const ALL: [Codec; 4] = [Codec::Float32, Codec::Float16, Codec::BFloat16, Codec::Int8];

    /// The codec of a `DType` enum value; `DTYPE_UNSPECIFIED` (0) means float32.
    pub fn from_dtype(dtype: i32) -> Result<Self, CodecError> {
        match dtype {
            0 | 1 => Ok(Self::Float32),
            3 => Ok(Self::Float16),
            4 => Ok(Self::BFloat16),
            5 => Ok(Self::Int8),
            other => Err(CodecError::UnknownDType(other)),
        }
    }

    /// The `DType` enum value.
    pub fn dtype(self) -> i32 {
        match self {
            Self::Float32 => 1,
            Self::Float16 => 3,
            Self::BFloat16 => 4,
            Self::Int8 => 5,
        }
    }

    /// Bytes per encoded value.
    pub fn item_size(self) -> usize {
        match self {
            Self::Float32 => 4,
            Self::Float16 | Self::BFloat16 => 2,
            Self::Int8 => 1,
        }
    }

    /// Whether each chunk carries a scale (`Chunk.scale`).
    pub fn has_scale(self) -> bool {
        self == Self::Int8
    }

    /// Lower-case name, for messages.
    pub fn name(self) -> &'static str {
        match self {
            Self::Float32 => "float32",
            Self::Float16 => "float16",
            Self::BFloat16 => "bfloat16",
            Self::Int8 => "int8",
        }
    }
}

/// The int8 scale of a chunk of `values`: `max|x| / 127` in float32 (0 for no values). NaN is
/// ignored by the maximum: check the values first ([`first_non_finite_f32`]).
pub fn int8_scale(values: &[f32]) -> f32 {
    // Sixteen lanes so the compiler vectorizes the maximum.
    const LANES: usize = 16;
    let mut lanes = [0.0f32; LANES];
    let mut blocks = values.chunks_exact(LANES);
    for block in &mut blocks {
        for (lane, &x) in lanes.iter_mut().zip(block) {
            *lane = lane.max(x.abs());
        }
    }
    let tail = blocks
        .remainder()
        .iter()
        .fold(0.0f32, |m, x| m.max(x.abs()));
    lanes.iter().fold(tail, |m, &l| m.max(l)) / INT8_MAX
}

/// Whether an int8 chunk's scale is usable: finite, >= 0, and small enough that 127 × scale is
/// finite (every decoded value finite).
pub fn scale_is_valid(scale: f32) -> bool {
    scale >= 0.0 && (scale * INT8_MAX).is_finite()
}

/// Index of the first NaN or infinity in `values`.
pub fn first_non_finite_f32(values: &[f32]) -> Option<usize> {
    values.iter().position(|x| !x.is_finite())
}

/// Encodes `values` into `out` (`values.len() × item_size` bytes) and returns the scale written
/// with them (the int8 scale of `values`; 0 for the other codecs). Refuses non-finite values and,
/// for float16/bfloat16, values that round to infinity; `out` is then partly written.
pub fn encode(codec: Codec, values: &[f32], out: &mut [u8]) -> Result<f32, CodecError> {
    check_bytes(codec, values.len(), out.len())?;
    if let Some(index) = first_non_finite_f32(values) {
        return Err(CodecError::NonFinite(index));
    }
    let scale = if codec == Codec::Int8 {
        int8_scale(values)
    } else {
        0.0
    };
    if !scale_is_valid(scale) {
        // |x| within an ulp of float32's maximum: 127 × scale would round to infinity.
        let index = values.iter().position(|x| x.abs() / INT8_MAX == scale);
        return Err(CodecError::Overflow {
            index: index.unwrap_or(0),
            codec: codec.name(),
        });
    }
    encode_with_scale(codec, values, scale, out)?;
    Ok(scale)
}

/// Encodes finite `values` into `out` with a given int8 `scale` (ignored by the other codecs);
/// for float16/bfloat16 fails on a value that rounds to infinity.
pub fn encode_with_scale(
    codec: Codec,
    values: &[f32],
    scale: f32,
    out: &mut [u8],
) -> Result<(), CodecError> {
    check_bytes(codec, values.len(), out.len())?;
    match codec {
        Codec::Float32 => {
            for (o, x) in out.chunks_exact_mut(4).zip(values) {
                o.copy_from_slice(&x.to_le_bytes());
            }
        }
        Codec::Float16 | Codec::BFloat16 => {
            let mut half = [0u16; BLOCK];
            for (b, (values, out)) in values
                .chunks(BLOCK)
                .zip(out.chunks_mut(2 * BLOCK))
                .enumerate()
            {
                let half = &mut half[..values.len()];
                if codec == Codec::Float16 {
                    half.reinterpret_cast_mut::<f16>()
                        .convert_from_f32_slice(values);
                } else {
                    half.reinterpret_cast_mut::<bf16>()
                        .convert_from_f32_slice(values);
                }
                if let Some(i) = first_non_finite_half(codec, half) {
                    return Err(CodecError::Overflow {
                        index: b * BLOCK + i,
                        codec: codec.name(),
                    });
                }
                for (o, h) in out.chunks_exact_mut(2).zip(half.iter()) {
                    o.copy_from_slice(&h.to_le_bytes());
                }
            }
        }
        Codec::Int8 => {
            if scale == 0.0 {
                out.fill(0);
            } else {
                for (o, &x) in out.iter_mut().zip(values) {
                    *o = round_ties_even_small((x / scale).clamp(-INT8_MAX, INT8_MAX)) as i8 as u8;
                }
            }
        }
    }
    Ok(())
}

/// `x.round_ties_even()` for |x| <= 2^22, in two additions the compiler vectorizes (the
/// library call does not): adding 1.5 × 2^23 leaves no fraction bits, so the sum is rounded to
/// an integer in the default rounding mode, which is ties to even.
#[inline(always)]
fn round_ties_even_small(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 × 2^23
    (x + MAGIC) - MAGIC
}

/// Decodes the whole values of `bytes` into `out` (one value per `item_size` bytes).
pub fn decode(codec: Codec, bytes: &[u8], scale: f32, out: &mut [f32]) -> Result<(), CodecError> {
    check_bytes(codec, out.len(), bytes.len())?;
    for_each_block(codec, bytes, scale, |at, block| {
        out[at..at + block.len()].copy_from_slice(block);
    });
    Ok(())
}

/// `sum += weight · decode(bytes)`, elementwise, in float64: the same bits as decoding first and
/// adding the float32 array. `bytes` holds `sum.len()` whole values.
pub fn add_scaled(codec: Codec, sum: &mut [f64], bytes: &[u8], scale: f32, weight: f64) {
    debug_assert_eq!(bytes.len(), sum.len() * codec.item_size());
    match codec {
        // The common case without a stack block: read and widen in one loop.
        Codec::Float32 => {
            for (s, w) in sum.iter_mut().zip(bytes.chunks_exact(4)) {
                *s += weight * f64::from(f32::from_le_bytes([w[0], w[1], w[2], w[3]]));
            }
        }
        Codec::BFloat16 => {
            for (s, w) in sum.iter_mut().zip(bytes.chunks_exact(2)) {
                let x = f32::from_bits(u32::from(u16::from_le_bytes([w[0], w[1]])) << 16);
                *s += weight * f64::from(x);
            }
        }
        Codec::Int8 => {
            for (s, &q) in sum.iter_mut().zip(bytes) {
                *s += weight * f64::from(f32::from(q as i8) * scale);
            }
        }
        Codec::Float16 => for_each_block(codec, bytes, scale, |at, block| {
            for (s, &x) in sum[at..at + block.len()].iter_mut().zip(block) {
                *s += weight * f64::from(x);
            }
        }),
    }
}

/// Index of the first encoded value of `bytes` that decodes to NaN or infinity (float32,
/// float16, bfloat16; int8 values are always finite, their scale is checked separately).
/// Trailing bytes that do not make a whole value are ignored.
pub fn first_non_finite(codec: Codec, bytes: &[u8]) -> Option<usize> {
    match codec {
        Codec::Float32 => bytes
            .chunks_exact(4)
            .position(|w| !f32::from_le_bytes([w[0], w[1], w[2], w[3]]).is_finite()),
        Codec::Float16 | Codec::BFloat16 => {
            let exponent = half_exponent(codec);
            // A branch-free OR over the block first: finite data is read once.
            bytes.chunks(2 * BLOCK).enumerate().find_map(|(b, block)| {
                let bad = block
                    .chunks_exact(2)
                    .fold(false, |bad, w| bad | is_special(w, exponent));
                bad.then(|| {
                    block
                        .chunks_exact(2)
                        .position(|w| is_special(w, exponent))
                        .map(|i| b * BLOCK + i)
                })
                .flatten()
            })
        }
        Codec::Int8 => None,
    }
}

/// Exponent mask of a 16-bit codec (all ones: infinity or NaN).
fn half_exponent(codec: Codec) -> u16 {
    if codec == Codec::Float16 {
        0x7c00
    } else {
        0x7f80
    }
}

#[inline(always)]
fn is_special(w: &[u8], exponent: u16) -> bool {
    u16::from_le_bytes([w[0], w[1]]) & exponent == exponent
}

fn first_non_finite_half(codec: Codec, half: &[u16]) -> Option<usize> {
    let exponent = half_exponent(codec);
    half.iter().position(|h| h & exponent == exponent)
}

/// Calls `f(first value index, decoded block)` for consecutive float32 blocks of `bytes`.
fn for_each_block(codec: Codec, bytes: &[u8], scale: f32, mut f: impl FnMut(usize, &[f32])) {
    let item = codec.item_size();
    let mut decoded = [0.0f32; BLOCK];
    let mut raw = [0u16; BLOCK];
    for (b, block) in bytes.chunks(item * BLOCK).enumerate() {
        let n = block.len() / item;
        let out = &mut decoded[..n];
        match codec {
            Codec::Float32 => {
                for (o, w) in out.iter_mut().zip(block.chunks_exact(4)) {
                    *o = f32::from_le_bytes([w[0], w[1], w[2], w[3]]);
                }
            }
            Codec::Float16 => {
                let raw = &mut raw[..n];
                for (r, w) in raw.iter_mut().zip(block.chunks_exact(2)) {
                    *r = u16::from_le_bytes([w[0], w[1]]);
                }
                raw.reinterpret_cast::<f16>().convert_to_f32_slice(out);
            }
            Codec::BFloat16 => {
                for (o, w) in out.iter_mut().zip(block.chunks_exact(2)) {
                    *o = f32::from_bits(u32::from(u16::from_le_bytes([w[0], w[1]])) << 16);
                }
            }
            Codec::Int8 => {
                for (o, &q) in out.iter_mut().zip(block) {
                    *o = f32::from(q as i8) * scale;
                }
            }
        }
        f(b * BLOCK, out);
    }
}

fn check_bytes(codec: Codec, values: usize, bytes: usize) -> Result<(), CodecError> {
    let expected = values * codec.item_size();
    if bytes == expected {
        Ok(())
    } else {
        Err(CodecError::Length {
            codec: codec.name(),
            expected,
            got: bytes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn encoded(codec: Codec, values: &[f32]) -> (Vec<u8>, f32) {
        let mut out = vec![0; values.len() * codec.item_size()];
        let scale = encode(codec, values, &mut out).unwrap();
        (out, scale)
    }

    fn decoded(codec: Codec, bytes: &[u8], scale: f32) -> Vec<f32> {
        let mut out = vec![0.0; bytes.len() / codec.item_size()];
        decode(codec, bytes, scale, &mut out).unwrap();
        out
    }

    /// Round to nearest, ties to even, of a float32 to bfloat16, by the bit-level definition.
    fn reference_bf16(x: f32) -> f32 {
        let bits = x.to_bits();
        let rounded = bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) & 0xffff_0000;
        f32::from_bits(rounded)
    }

    /// The int8 definition written out plainly.
    fn reference_int8(values: &[f32]) -> (Vec<i8>, f32) {
        let max = values.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        let scale = max / 127.0;
        let q = values
            .iter()
            .map(|&x| {
                if scale == 0.0 {
                    0
                } else {
                    (x / scale).round_ties_even().clamp(-127.0, 127.0) as i8
                }
            })
            .collect();
        (q, scale)
    }

    #[test]
    fn dtypes_map_to_codecs_and_back() {
        for codec in Codec::ALL {
            assert_eq!(Codec::from_dtype(codec.dtype()), Ok(codec));
        }
        assert_eq!(Codec::from_dtype(0), Ok(Codec::Float32));
        assert_eq!(Codec::from_dtype(2), Err(CodecError::UnknownDType(2)));
    }

    #[test]
    fn float16_rounds_ties_to_even_and_refuses_overflow() {
        // 1 + 2^-11 is halfway between 1 and 1 + 2^-10: ties to even gives 1.
        let (bytes, _) = encoded(Codec::Float16, &[1.0 + 2f32.powi(-11), 65504.0]);
        assert_eq!(decoded(Codec::Float16, &bytes, 0.0), vec![1.0, 65504.0]);

        let mut out = [0u8; 4];
        assert_eq!(
            encode(Codec::Float16, &[1.0, 70000.0], &mut out),
            Err(CodecError::Overflow {
                index: 1,
                codec: "float16"
            })
        );
        assert_eq!(
            encode(Codec::BFloat16, &[f32::NAN, 1.0], &mut out),
            Err(CodecError::NonFinite(0))
        );
    }

    #[test]
    fn int8_of_zeros_has_scale_zero_and_minus_128_is_never_written() {
        let (bytes, scale) = encoded(Codec::Int8, &[0.0; 5]);
        assert_eq!((bytes, scale), (vec![0; 5], 0.0));

        let (bytes, scale) = encoded(Codec::Int8, &[-2.0, 1.0, 2.0]);
        assert_eq!(scale, 2.0 / 127.0);
        assert_eq!(
            bytes.iter().map(|&b| b as i8).collect::<Vec<_>>(),
            [-127, 64, 127]
        );
    }

    #[test]
    fn special_bit_patterns_are_found_at_their_index() {
        let f16_inf = 0x7c00u16.to_le_bytes();
        let bf16_nan = 0x7fc1u16.to_le_bytes();
        let mut bytes = vec![0u8; 2 * 3000];
        bytes[2 * 2500..2 * 2501].copy_from_slice(&f16_inf);
        assert_eq!(first_non_finite(Codec::Float16, &bytes), Some(2500));
        // 0x7c00 is a finite bfloat16 (an ordinary large value)
        assert_eq!(first_non_finite(Codec::BFloat16, &bytes), None);
        bytes[2..4].copy_from_slice(&bf16_nan);
        assert_eq!(first_non_finite(Codec::BFloat16, &bytes), Some(1));
        assert_eq!(first_non_finite(Codec::Int8, &bytes), None);
    }

    #[test]
    fn scales_must_keep_every_decoded_value_finite() {
        assert!(scale_is_valid(0.0));
        assert!(scale_is_valid(f32::MAX / 128.0));
        for bad in [-1.0, f32::NAN, f32::INFINITY, f32::MAX] {
            assert!(!scale_is_valid(bad), "{bad}");
        }
    }

    #[test]
    fn small_rounding_matches_round_ties_even() {
        let mut x = -130.0f32;
        while x <= 130.0 {
            assert_eq!(round_ties_even_small(x), x.round_ties_even(), "{x}");
            x += 0.125;
        }
        for x in [
            0.5f32, 1.5, 2.5, -0.5, -2.5, 126.5, -126.5, 0.49999997, -0.0,
        ] {
            assert_eq!(round_ties_even_small(x), x.round_ties_even(), "{x}");
        }
    }

    #[test]
    fn lengths_must_match() {
        let mut out = [0u8; 3];
        assert!(matches!(
            encode(Codec::Float16, &[1.0, 2.0], &mut out),
            Err(CodecError::Length {
                expected: 4,
                got: 3,
                ..
            })
        ));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// float16 matches IEEE rounding (through float64, exact for these values) within
        /// 2^-11 relative error for normal values.
        #[test]
        fn float16_error_is_within_half_an_ulp(
            values in proptest::collection::vec(
                prop_oneof![-65504.0f32..65504.0, -1.0f32..1.0, -1e-4f32..1e-4], 0..3000),
        ) {
            let (bytes, _) = encoded(Codec::Float16, &values);
            let back = decoded(Codec::Float16, &bytes, 0.0);
            for (&x, &y) in values.iter().zip(&back) {
                prop_assert_eq!(y.to_bits(), f16::from_f64(f64::from(x)).to_f32().to_bits());
                if x.abs() >= 2f32.powi(-14) {
                    prop_assert!((y - x).abs() <= x.abs() * 2f32.powi(-11), "{} -> {}", x, y);
                }
            }
        }

        /// bfloat16 matches the bit-level ties-to-even definition, within 2^-8 relative error.
        #[test]
        fn bfloat16_matches_the_bit_definition(
            values in proptest::collection::vec(
                prop_oneof![-1e30f32..1e30, -1.0f32..1.0, -1e-30f32..1e-30], 0..3000),
        ) {
            let (bytes, _) = encoded(Codec::BFloat16, &values);
            let back = decoded(Codec::BFloat16, &bytes, 0.0);
            for (&x, &y) in values.iter().zip(&back) {
                prop_assert_eq!(y.to_bits(), reference_bf16(x).to_bits());
                if x.abs() >= f32::MIN_POSITIVE {
                    prop_assert!((y - x).abs() <= x.abs() * 2f32.powi(-8), "{} -> {}", x, y);
                }
            }
        }

        /// int8 matches the plain definition; the error is at most half a scale step (plus
        /// float32 rounding).
        #[test]
        fn int8_matches_the_definition_within_half_a_step(
            values in proptest::collection::vec(-1e6f32..1e6, 0..3000),
            magnitude in -30i32..30,
        ) {
            let values: Vec<f32> = values.iter().map(|x| x * 2f32.powi(magnitude)).collect();
            let (bytes, scale) = encoded(Codec::Int8, &values);
            let (q, expected_scale) = reference_int8(&values);
            prop_assert_eq!(scale.to_bits(), expected_scale.to_bits());
            prop_assert_eq!(bytes.iter().map(|&b| b as i8).collect::<Vec<_>>(), q);
            let back = decoded(Codec::Int8, &bytes, scale);
            for (&x, &y) in values.iter().zip(&back) {
                prop_assert!((y - x).abs() <= scale * (0.5 + 2f32.powi(-16)), "{} -> {}", x, y);
            }
        }

        /// Folding encoded bytes (any alignment) gives the bits of folding the decoded values.
        #[test]
        fn fold_of_encoded_equals_fold_of_decoded(
            values in proptest::collection::vec(-1e4f32..1e4, 0..2500),
            codec in prop_oneof![
                Just(Codec::Float32), Just(Codec::Float16), Just(Codec::BFloat16), Just(Codec::Int8)
            ],
            weight in 0.01f64..100.0,
            shift in 0usize..4,
        ) {
            let (bytes, scale) = encoded(codec, &values);
            let mut shifted = vec![0u8; shift];
            shifted.extend(&bytes);
            let back = decoded(codec, &bytes, scale);
            let start: Vec<f64> = (0..values.len()).map(|i| i as f64 * 0.25).collect();

            let mut folded = start.clone();
            add_scaled(codec, &mut folded, &shifted[shift..], scale, weight);

            let expected: Vec<u64> = start
                .iter()
                .zip(&back)
                .map(|(s, &x)| (s + weight * f64::from(x)).to_bits())
                .collect();
            prop_assert_eq!(folded.iter().map(|s| s.to_bits()).collect::<Vec<_>>(), expected);
        }
    }
}
