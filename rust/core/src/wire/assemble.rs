//! [`ChunkAssembler`]: one announced float32 payload, reassembled from its chunk messages into a
//! preallocated buffer.
//!
//! Each chunk is copied once, straight into place, and its values are checked for NaN and
//! infinity in the same pass, block by block while the block is still in L1: the copy and the
//! check together read the chunk once and write the buffer once. Large chunks are split into
//! 256 KiB regions filled in parallel. A chunk may end inside a float32 value; that value is
//! checked when the chunk that completes it arrives. Buffers come from the [`RECYCLED`] pool when
//! one of the right size is there.
//!
//! A payload encoded with a codec ([`Codec`]: float16, bfloat16, int8 with a scale per chunk)
//! has chunks of whole encoded values; each is checked (NaN/infinity bit patterns, int8 scales)
//! and decoded into the float32 buffer, or, in place, checked where it lies and recorded with
//! its scale so the fold decodes it straight into the float64 sums.

use rayon::prelude::*;

use super::pool::RECYCLED;
use super::protobuf::{check_field, peek_chunk, ChunkRef};
use super::{chunk_count, WireError};
use crate::codec::{self, Codec};

// The bytes on the wire are little-endian float32 and are copied into native floats as is.
const _: () = assert!(
    cfg!(target_endian = "little"),
    "needs a little-endian target"
);

/// Values per parallel region: 64 Ki float32 = 256 KiB of each of source and destination.
const REGION: usize = 1 << 16;

/// Values per block copied and then checked while in L1 (16 KiB).
const BLOCK: usize = 1 << 12;

/// Buffers at least this large are asked to use transparent huge pages (as numpy does): their
/// first touch then faults 2 MiB at a time instead of 4 KiB.
const HUGE_PAGE_MIN: usize = 4 << 20;

/// What a payload's header announces, as an assembler needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Announcement {
    /// Encoded size (values × the codec's item size).
    pub total_bytes: u64,
    pub payload_id: u64,
    pub num_chunks: u32,
    /// Largest chunk data accepted (bytes).
    pub max_chunk_bytes: usize,
    /// Field number of the chunk body in the envelope messages.
    pub envelope_field: u32,
    /// Check every value for NaN and infinity (and int8 scales) as it arrives.
    pub check_finite: bool,
    /// How the values are encoded (`Payload.dtype`).
    pub codec: Codec,
}

/// Reassembles one announced payload from its chunks, in order, as float32 values.
#[derive(Debug)]
pub struct ChunkAssembler {
    values: Vec<f32>,
    total_bytes: u64,
    payload_id: u64,
    num_chunks: u32,
    max_chunk_bytes: usize,
    envelope_field: u32,
    check_finite: bool,
    codec: Codec,
    /// Bytes received so far.
    filled: usize,
    next_index: u32,
    /// The first error; every later call reports it.
    rejected: Option<Box<WireError>>,
    taken: bool,
    /// In place: no buffer; each chunk's data is checked where it lies in its message, and
    /// `segments` records (offset in the message, length, int8 scale) so the caller can read
    /// the values from the messages it keeps.
    in_place: bool,
    segments: Vec<(usize, usize, f32)>,
}

impl ChunkAssembler {
    /// An assembler for the payload `payload_id` of `total_bytes` (a multiple of 4) announced
    /// in `num_chunks` chunks of at most `max_chunk_bytes`, carried in field `envelope_field` of
    /// the envelope messages. With `check_finite` every value is checked for NaN and infinity
    /// as it arrives. Fails for an inconsistent announcement or if memory runs out.
    pub fn new(
        total_bytes: u64,
        payload_id: u64,
        num_chunks: u32,
        max_chunk_bytes: usize,
        envelope_field: u32,
        check_finite: bool,
    ) -> Result<Self, WireError> {
        Self::copying(Announcement {
            total_bytes,
            payload_id,
            num_chunks,
            max_chunk_bytes,
            envelope_field,
            check_finite,
            codec: Codec::Float32,
        })
    }

    /// [`new`](Self::new) for a payload in any codec: its chunks are decoded into a float32
    /// buffer of `total_bytes / item size` values.
    pub fn copying(announced: Announcement) -> Result<Self, WireError> {
        let mut this = Self::announced(announced)?;
        let values = announced.total_bytes / announced.codec.item_size() as u64;
        let len = usize::try_from(values).map_err(|_| WireError::Allocation(values * 4))?;
        // A recycled buffer's stale contents are never seen: `take` needs every byte received.
        this.values = match RECYCLED.take(len) {
            Some(values) => values,
            None => zeroed(len).ok_or(WireError::Allocation(values * 4))?,
        };
        Ok(this)
    }

    /// An assembler that keeps no buffer: [`add_message_in_place`](Self::add_message_in_place)
    /// checks each chunk where it lies in its message, and
    /// [`take_segments`](Self::take_segments) says where the values are; the caller keeps the
    /// messages. The announcement is validated as by [`new`](Self::new).
    pub fn new_in_place(
        total_bytes: u64,
        payload_id: u64,
        num_chunks: u32,
        max_chunk_bytes: usize,
        envelope_field: u32,
        check_finite: bool,
    ) -> Result<Self, WireError> {
        Self::in_place_from(Announcement {
            total_bytes,
            payload_id,
            num_chunks,
            max_chunk_bytes,
            envelope_field,
            check_finite,
            codec: Codec::Float32,
        })
    }

    /// [`new_in_place`](Self::new_in_place) for a payload in any codec: chunks of whole encoded
    /// values, each checked where it lies; the segments carry each chunk's scale.
    pub fn in_place_from(announced: Announcement) -> Result<Self, WireError> {
        let mut this = Self::announced(announced)?;
        this.in_place = true;
        Ok(this)
    }

    /// Validates the announcement (every chunk but an empty payload's single one must carry at
    /// least one byte, and for a codec at least one whole value) and builds an assembler
    /// without a buffer yet.
    fn announced(announced: Announcement) -> Result<Self, WireError> {
        let Announcement {
            total_bytes,
            payload_id,
            num_chunks,
            max_chunk_bytes,
            envelope_field,
            check_finite,
            codec,
        } = announced;
        check_field(envelope_field)?;
        if max_chunk_bytes == 0 {
            return Err(WireError::ZeroChunkLimit);
        }
        let item = codec.item_size() as u64;
        if total_bytes % 4 != 0 && codec == Codec::Float32 {
            return Err(WireError::NotFloat32(total_bytes));
        }
        if total_bytes % item != 0 {
            return Err(WireError::NotWholeValues {
                bytes: total_bytes,
                codec: codec.name(),
            });
        }
        let needed = chunk_count(total_bytes, max_chunk_bytes);
        // float32 chunks are byte slices; a codec's chunks hold at least one whole value each
        let most = if codec == Codec::Float32 {
            total_bytes
        } else {
            total_bytes / item
        };
        if u64::from(num_chunks) < needed || u64::from(num_chunks) > most.max(1) {
            return Err(WireError::ChunkCount {
                announced: num_chunks.into(),
                total: total_bytes,
                needed,
                limit: max_chunk_bytes,
            });
        }
        Ok(Self {
            values: Vec::new(),
            total_bytes,
            payload_id,
            num_chunks,
            max_chunk_bytes,
            envelope_field,
            check_finite,
            codec,
            filled: 0,
            next_index: 0,
            rejected: None,
            taken: false,
            in_place: false,
            segments: Vec::new(),
        })
    }

    /// Whether every announced chunk has arrived.
    pub fn is_done(&self) -> bool {
        self.next_index == self.num_chunks
    }

    /// Chunks received so far.
    pub fn received(&self) -> u32 {
        self.next_index
    }

    /// Adds the chunk carried by the serialized envelope message `raw`; returns whether the
    /// payload is complete. After an error the payload is rejected for good.
    pub fn add_message(&mut self, raw: &[u8]) -> Result<bool, WireError> {
        self.guarded(|this| {
            let chunk = peek_chunk(raw, this.envelope_field)?
                .ok_or(WireError::NotAChunk(this.envelope_field))?;
            this.add_chunk(chunk)
        })
    }

    /// In place: checks the chunk carried by `raw` where it lies and records where its data is
    /// (see [`take_segments`](Self::take_segments)); returns whether the payload is complete.
    /// [`WireError::NotInPlace`] (a chunk ending inside a value) leaves the assembler as it was,
    /// so the caller can fall back to copying; any other error rejects the payload for good.
    pub fn add_message_in_place(&mut self, raw: &[u8]) -> Result<bool, WireError> {
        self.guarded(|this| {
            let chunk = peek_chunk(raw, this.envelope_field)?
                .ok_or(WireError::NotAChunk(this.envelope_field))?;
            let end = this.filled + chunk.data.len();
            let float32 = this.codec == Codec::Float32;
            if float32 && chunk.data.len() % 4 != 0 && (end as u64) < this.total_bytes {
                return Err(WireError::NotInPlace);
            }
            let offset = chunk.data.as_ptr() as usize - raw.as_ptr() as usize;
            let (len, scale) = (chunk.data.len(), chunk.scale);
            this.add_chunk(chunk)?;
            this.segments.push((offset, len, scale));
            Ok(this.is_done())
        })
    }

    /// In place, after the last chunk: (offset in its message, length, int8 scale) of each
    /// chunk's data, in order; their concatenation is the encoded payload (each a whole number
    /// of values; the scale is 0.0 for codecs without one).
    pub fn take_segments(&mut self) -> Result<Vec<(usize, usize, f32)>, WireError> {
        if let Some(first) = &self.rejected {
            return Err(WireError::Rejected(first.clone()));
        }
        if self.taken {
            return Err(WireError::Taken);
        }
        if !self.is_done() {
            return Err(WireError::Incomplete {
                received: self.next_index,
                num_chunks: self.num_chunks,
            });
        }
        self.taken = true;
        Ok(std::mem::take(&mut self.segments))
    }

    /// Adds one decoded chunk; returns whether the payload is complete. After an error the
    /// payload is rejected for good.
    pub fn add(&mut self, chunk: ChunkRef<'_>) -> Result<bool, WireError> {
        self.guarded(|this| this.add_chunk(chunk))
    }

    /// Hands the assembled values over (once, after the last chunk). Asking too early or twice
    /// is the caller's mistake, not the payload's: it does not reject the payload.
    pub fn take(&mut self) -> Result<Vec<f32>, WireError> {
        if let Some(first) = &self.rejected {
            return Err(WireError::Rejected(first.clone()));
        }
        if self.taken {
            return Err(WireError::Taken);
        }
        if !self.is_done() {
            return Err(WireError::Incomplete {
                received: self.next_index,
                num_chunks: self.num_chunks,
            });
        }
        self.taken = true;
        Ok(std::mem::take(&mut self.values))
    }

    /// Runs `op` unless an earlier call failed, and remembers its error (but `NotInPlace`).
    fn guarded<T>(
        &mut self,
        op: impl FnOnce(&mut Self) -> Result<T, WireError>,
    ) -> Result<T, WireError> {
        if let Some(first) = &self.rejected {
            return Err(WireError::Rejected(first.clone()));
        }
        let result = op(self);
        if let Err(error) = &result {
            // NotInPlace is no fault of the payload: the caller copies instead.
            if *error != WireError::NotInPlace {
                self.rejected = Some(Box::new(error.clone()));
            }
        }
        result
    }

    fn add_chunk(&mut self, chunk: ChunkRef<'_>) -> Result<bool, WireError> {
        if chunk.payload_id != self.payload_id {
            return Err(WireError::WrongPayload {
                got: chunk.payload_id,
                expected: self.payload_id,
            });
        }
        if self.is_done() {
            return Err(WireError::ExtraChunk {
                index: chunk.index,
                num_chunks: self.num_chunks,
            });
        }
        if chunk.index != self.next_index {
            return Err(WireError::OutOfOrder {
                got: chunk.index,
                expected: self.next_index,
            });
        }
        if chunk.data.len() > self.max_chunk_bytes {
            return Err(WireError::ChunkTooLarge {
                got: chunk.data.len(),
                limit: self.max_chunk_bytes,
            });
        }
        let end = self.filled + chunk.data.len();
        if end as u64 > self.total_bytes {
            return Err(WireError::Overflow(self.total_bytes));
        }
        let bad = if self.codec != Codec::Float32 {
            self.add_encoded(chunk)?
        } else if self.in_place {
            // whole values only (add_message_in_place checked), so the check starts at a value
            self.check_finite
                .then(|| first_non_finite_bytes(chunk.data))
                .flatten()
                .map(|i| self.filled / 4 + i)
        } else {
            copy_and_check(&mut self.values, self.filled, chunk.data, self.check_finite)
        };
        if let Some(index) = bad {
            return Err(WireError::NonFinite(index as u64));
        }
        self.filled = end;
        self.next_index += 1;
        if self.is_done() && end as u64 != self.total_bytes {
            return Err(WireError::Short {
                filled: end as u64,
                total: self.total_bytes,
            });
        }
        Ok(self.is_done())
    }
}

impl ChunkAssembler {
    /// Checks a chunk of a codec payload (whole values, its scale, NaN/infinity patterns) and,
    /// unless in place, decodes it into the buffer; returns the index of a non-finite value.
    fn add_encoded(&mut self, chunk: ChunkRef<'_>) -> Result<Option<usize>, WireError> {
        let (codec, item) = (self.codec, self.codec.item_size());
        if chunk.data.len() % item != 0 {
            return Err(WireError::ChunkNotWholeValues {
                index: chunk.index,
                bytes: chunk.data.len(),
                codec: codec.name(),
            });
        }
        if codec.has_scale() {
            if !codec::scale_is_valid(chunk.scale) {
                return Err(WireError::InvalidScale {
                    index: chunk.index,
                    bits: chunk.scale.to_bits(),
                });
            }
        } else if chunk.scale != 0.0 {
            return Err(WireError::UnexpectedScale {
                index: chunk.index,
                codec: codec.name(),
            });
        }
        let first = self.filled / item;
        if self.check_finite {
            if let Some(i) = codec::first_non_finite(codec, chunk.data) {
                return Ok(Some(first + i));
            }
        }
        if !self.in_place {
            let out = &mut self.values[first..first + chunk.data.len() / item];
            let decode = |(out, bytes): (&mut [f32], &[u8])| {
                Ok::<_, WireError>(codec::decode(codec, bytes, chunk.scale, out)?)
            };
            if out.len() >= 2 * REGION {
                out.par_chunks_mut(REGION)
                    .zip(chunk.data.par_chunks(item * REGION))
                    .try_for_each(decode)?;
            } else {
                decode((out, chunk.data))?;
            }
        }
        Ok(None)
    }
}

/// `len` zeroed floats from the allocator's zeroed path (fresh pages are not touched until the
/// copy writes them), or `None` if the memory is not available.
fn zeroed(len: usize) -> Option<Vec<f32>> {
    if len == 0 {
        return Some(Vec::new());
    }
    let layout = std::alloc::Layout::array::<f32>(len).ok()?;
    // SAFETY: `layout` has a non-zero size. A non-null result points to `len` zeroed (hence
    // valid) f32 values allocated by the global allocator with exactly the layout `Vec` uses
    // for a capacity of `len`, so `Vec` may own and free it.
    let values = unsafe {
        let ptr = std::alloc::alloc_zeroed(layout).cast::<f32>();
        if ptr.is_null() {
            return None;
        }
        Vec::from_raw_parts(ptr, len, len)
    };
    advise_huge_pages(&values);
    Some(values)
}

#[cfg(target_os = "linux")]
fn advise_huge_pages(values: &[f32]) {
    const HUGE: usize = 2 << 20;
    let bytes = std::mem::size_of_val(values);
    if bytes < HUGE_PAGE_MIN {
        return;
    }
    let start = values.as_ptr() as usize;
    let first = start.next_multiple_of(HUGE);
    let stop = (start + bytes) / HUGE * HUGE;
    if stop > first {
        // SAFETY: the range lies inside our own allocation; MADV_HUGEPAGE only changes how the
        // kernel backs it, never its contents. Failure (THP disabled) is harmless.
        unsafe {
            libc::madvise(
                first as *mut libc::c_void,
                stop - first,
                libc::MADV_HUGEPAGE,
            );
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn advise_huge_pages(_values: &[f32]) {}

/// Copies `src` into the bytes of `values` starting at byte `filled`, and with `check` returns
/// the index of the first non-finite value completed by it.
fn copy_and_check(values: &mut [f32], filled: usize, src: &[u8], check: bool) -> Option<usize> {
    let mut src = src;
    let mut at = filled;
    // The value an earlier chunk left half-written.
    let offset = at % 4;
    if offset != 0 && !src.is_empty() {
        let index = at / 4;
        let take = (4 - offset).min(src.len());
        let mut bytes = values[index].to_le_bytes();
        bytes[offset..offset + take].copy_from_slice(&src[..take]);
        values[index] = f32::from_le_bytes(bytes);
        src = &src[take..];
        at += take;
        if at % 4 == 0 && check && !values[index].is_finite() {
            return Some(index);
        }
    }
    if src.is_empty() {
        return None;
    }
    let start = at / 4;
    let dst = &mut values[start..start + src.len().div_ceil(4)];
    let region = |(r, (dst, src)): (usize, (&mut [f32], &[u8]))| {
        fill_region(dst, src, check).map(|i| start + r * REGION + i)
    };
    if dst.len() >= 2 * REGION {
        dst.par_chunks_mut(REGION)
            .zip(src.par_chunks(4 * REGION))
            .enumerate()
            .filter_map(region)
            .min()
    } else {
        region((0, (dst, src)))
    }
}

/// Copies `src` into the first bytes of `dst` (`dst` has `ceil(src.len() / 4)` values), block
/// by block, checking each block's complete values as it is read.
///
/// The check reads the source block (bringing it into L1), then the copy reads it again from L1
/// and writes the destination with non-temporal stores where the target has them (x86-64): the
/// buffer is read next by the fold, long after it has left every cache, so a normal store would
/// only add a read of each destination line (write-allocate) and evict the cache for nothing.
fn fill_region(dst: &mut [f32], src: &[u8], check: bool) -> Option<usize> {
    let mut bad = None;
    for (b, (dst, src)) in dst.chunks_mut(BLOCK).zip(src.chunks(4 * BLOCK)).enumerate() {
        if check && !all_finite_bytes(src) {
            let at = src
                .chunks_exact(4)
                .position(|w| !f32::from_le_bytes([w[0], w[1], w[2], w[3]]).is_finite());
            bad = at.map(|i| b * BLOCK + i);
            break;
        }
        stream_copy(&mut as_bytes_mut(dst)[..src.len()], src);
    }
    store_fence();
    bad
}

/// `dst.copy_from_slice(src)`, with non-temporal stores for the 16-byte-aligned middle on x86-64.
#[cfg(target_arch = "x86_64")]
fn stream_copy(dst: &mut [u8], src: &[u8]) {
    use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_stream_si128};
    let len = dst.len().min(src.len());
    let head = dst.as_ptr().align_offset(16).min(len);
    dst[..head].copy_from_slice(&src[..head]);
    let body = (len - head) / 16 * 16;
    let (d, s) = (
        dst[head..head + body].as_mut_ptr(),
        src[head..head + body].as_ptr(),
    );
    let mut i = 0;
    while i < body {
        // SAFETY: SSE2 is part of every x86-64 target. `d.add(i)` and `s.add(i)` stay inside
        // the `body` bytes sliced above (i + 16 <= body); `d` is 16-byte aligned by
        // `align_offset`, as `_mm_stream_si128` requires, and `_mm_loadu_si128` takes any
        // alignment. Non-temporal stores are ordered by `store_fence` before the buffer is used.
        unsafe {
            _mm_stream_si128(d.add(i).cast::<__m128i>(), _mm_loadu_si128(s.add(i).cast()));
        }
        i += 16;
    }
    dst[head + body..len].copy_from_slice(&src[head + body..len]);
}

#[cfg(not(target_arch = "x86_64"))]
fn stream_copy(dst: &mut [u8], src: &[u8]) {
    dst.copy_from_slice(src);
}

/// Orders this thread's non-temporal stores before anything it does next.
fn store_fence() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: SSE is part of every x86-64 target; `sfence` has no other effect.
    unsafe {
        std::arch::x86_64::_mm_sfence();
    }
}

/// Index of the first NaN or infinity among the complete little-endian float32 values of
/// `bytes` (any alignment), block by block so that finite data is read once, branch-free.
fn first_non_finite_bytes(bytes: &[u8]) -> Option<usize> {
    let find = |(b, block): (usize, &[u8])| {
        if all_finite_bytes(block) {
            return None;
        }
        let at = block
            .chunks_exact(4)
            .position(|w| !f32::from_le_bytes([w[0], w[1], w[2], w[3]]).is_finite());
        at.map(|i| b * BLOCK + i)
    };
    if bytes.len() >= 8 * REGION {
        bytes
            .par_chunks(4 * BLOCK)
            .enumerate()
            .filter_map(find)
            .min()
    } else {
        bytes.chunks(4 * BLOCK).enumerate().find_map(find)
    }
}

/// Whether no complete little-endian float32 value in `bytes` (any alignment) has an all-ones
/// exponent (NaN, ±∞), without a branch per value: adding 2^23 to the masked exponent carries
/// into bit 31 exactly for an all-ones exponent, and the flags are OR-ed over sixteen
/// independent lanes (integer SIMD on any x86-64 or aarch64).
#[inline]
fn all_finite_bytes(bytes: &[u8]) -> bool {
    const LANES: usize = 16;
    const EXPONENT: u32 = 0x7f80_0000;
    let flag = |w: &[u8]| {
        (u32::from_le_bytes([w[0], w[1], w[2], w[3]]) & EXPONENT).wrapping_add(0x0080_0000)
    };
    let mut lanes = [0u32; LANES];
    let mut blocks = bytes.chunks_exact(4 * LANES);
    for block in &mut blocks {
        for (lane, w) in lanes.iter_mut().zip(block.chunks_exact(4)) {
            *lane |= flag(w);
        }
    }
    let tail = blocks
        .remainder()
        .chunks_exact(4)
        .fold(0, |acc, w| acc | flag(w));
    (lanes.iter().fold(tail, |acc, &l| acc | l) & 0x8000_0000) == 0
}

/// The bytes of `values`.
fn as_bytes_mut(values: &mut [f32]) -> &mut [u8] {
    let len = std::mem::size_of_val(values);
    // SAFETY: same memory and lifetime as `values`; u8 has alignment 1, and every byte pattern
    // is a valid f32, so writes through the byte view cannot make `values` invalid.
    unsafe { std::slice::from_raw_parts_mut(values.as_mut_ptr().cast::<u8>(), len) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn bytes_of(values: &[f32]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    fn chunk(payload_id: u64, index: u32, data: &[u8]) -> ChunkRef<'_> {
        ChunkRef::new(payload_id, index, data)
    }

    /// An assembler for `values` in chunks of `limit` bytes, fed all chunks; returns it with
    /// the result of the last add.
    fn assemble(values: &[f32], limit: usize) -> (ChunkAssembler, Result<bool, WireError>) {
        let data = bytes_of(values);
        let n = chunk_count(data.len() as u64, limit) as u32;
        let mut asm = ChunkAssembler::new(data.len() as u64, 9, n, limit, 4, true).unwrap();
        let mut last = Ok(asm.is_done());
        for (i, piece) in data.chunks(limit).enumerate() {
            last = asm.add(chunk(9, i as u32, piece));
            if last.is_err() {
                break;
            }
        }
        (asm, last)
    }

    #[test]
    fn all_finite_bytes_matches_is_finite_for_special_values() {
        let specials = [
            0.0,
            -0.0,
            f32::MIN_POSITIVE,
            f32::MAX,
            f32::MIN,
            1e-45,
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::from_bits(0x7f80_0001),
            f32::from_bits(0xffc0_0000),
        ];
        for x in specials {
            assert_eq!(all_finite_bytes(&bytes_of(&[x])), x.is_finite(), "{x:?}");
            let mut many = [1.0_f32; 40];
            many[37] = x;
            assert_eq!(all_finite_bytes(&bytes_of(&many)), x.is_finite());
            // at any alignment of the bytes
            let mut shifted = vec![0_u8; 3];
            shifted.extend(bytes_of(&many));
            assert_eq!(all_finite_bytes(&shifted[3..]), x.is_finite());
        }
    }

    #[test]
    fn reassembles_the_values_across_parallel_regions() {
        let values: Vec<f32> = (0..5 * REGION + 3).map(|i| i as f32 * 0.5).collect();

        let (mut asm, last) = assemble(&values, 4 * REGION * 2 + 7);

        assert_eq!(last, Ok(true));
        assert_eq!(asm.take().unwrap(), values);
    }

    #[test]
    fn a_nan_split_across_chunks_is_found_where_it_completes() {
        let mut values = vec![1.0_f32; 8];
        values[2] = f32::NAN;
        let data = bytes_of(&values);
        let mut asm = ChunkAssembler::new(32, 1, 4, 10, 4, true).unwrap();

        assert_eq!(asm.add(chunk(1, 0, &data[..10])), Ok(false)); // ends inside value 2
        assert_eq!(
            asm.add(chunk(1, 1, &data[10..20])),
            Err(WireError::NonFinite(2))
        );
    }

    #[test]
    fn without_check_non_finite_values_pass() {
        let data = bytes_of(&[f32::INFINITY, 1.0]);
        let mut asm = ChunkAssembler::new(8, 0, 1, 8, 3, false).unwrap();

        assert_eq!(asm.add(chunk(0, 0, &data)), Ok(true));
        assert!(asm.take().unwrap()[0].is_infinite());
    }

    #[test]
    fn announcement_errors() {
        let new = |total, chunks, limit| ChunkAssembler::new(total, 0, chunks, limit, 4, true);
        assert_eq!(new(6, 1, 8).unwrap_err(), WireError::NotFloat32(6));
        assert_eq!(new(8, 1, 0).unwrap_err(), WireError::ZeroChunkLimit);
        assert!(matches!(
            new(16, 1, 8),
            Err(WireError::ChunkCount { needed: 2, .. })
        ));
        assert!(matches!(
            new(8, 9, 8),
            Err(WireError::ChunkCount { announced: 9, .. })
        ));
        assert!(new(0, 0, 8).unwrap().is_done());
        assert!(!new(0, 1, 8).unwrap().is_done());
        assert_eq!(
            ChunkAssembler::new(8, 0, 1, 8, 0, true).unwrap_err(),
            WireError::EnvelopeField(0)
        );
    }

    #[test]
    fn chunk_errors_name_the_problem_and_stick() {
        let data = [0u8; 12];
        let fresh = || ChunkAssembler::new(16, 5, 2, 8, 4, true).unwrap();
        let first = |chunk: ChunkRef<'_>| fresh().add(chunk).unwrap_err();

        assert_eq!(
            first(chunk(6, 0, &data[..8])),
            WireError::WrongPayload {
                got: 6,
                expected: 5
            }
        );
        assert_eq!(
            first(chunk(5, 1, &data[..8])),
            WireError::OutOfOrder {
                got: 1,
                expected: 0
            }
        );
        assert_eq!(
            first(chunk(5, 0, &data[..9])),
            WireError::ChunkTooLarge { got: 9, limit: 8 }
        );
        let mut asm = fresh();
        asm.add(chunk(5, 0, &data[..4])).unwrap();
        assert_eq!(
            asm.add(chunk(5, 1, &data[..4])),
            Err(WireError::Short {
                filled: 8,
                total: 16
            })
        );
        assert!(matches!(
            asm.add(chunk(5, 2, &data[..4])),
            Err(WireError::Rejected(_))
        ));
        assert!(matches!(asm.take(), Err(WireError::Rejected(_))));
    }

    #[test]
    fn overflow_extra_chunks_and_take_misuse() {
        let data = [0u8; 8];
        let mut asm = ChunkAssembler::new(12, 0, 2, 8, 4, true).unwrap();
        asm.add(chunk(0, 0, &data)).unwrap();
        assert_eq!(asm.add(chunk(0, 1, &data)), Err(WireError::Overflow(12)));

        let mut asm = ChunkAssembler::new(8, 0, 1, 8, 4, true).unwrap();
        assert_eq!(
            asm.take(),
            Err(WireError::Incomplete {
                received: 0,
                num_chunks: 1
            })
        );
        asm.add(chunk(0, 0, &data)).unwrap();
        assert_eq!(asm.take(), Ok(vec![0.0, 0.0]));
        assert_eq!(asm.take(), Err(WireError::Taken));
        assert_eq!(asm.take(), Err(WireError::Taken));
        assert!(matches!(
            asm.add(chunk(0, 1, &data)),
            Err(WireError::ExtraChunk { .. })
        ));
    }

    #[test]
    fn add_message_reads_the_envelope() {
        let mut raw = vec![0x1a, 0x0a, 0x08, 0x03, 0x1a, 0x06]; // field 3: Chunk{1: 3, 3: 6 B}
        raw.extend(bytes_of(&[2.5]));
        raw.extend([0, 0]);
        let mut asm = ChunkAssembler::new(8, 3, 2, 6, 3, true).unwrap();

        assert_eq!(asm.add_message(&raw), Ok(false));
        assert_eq!(
            ChunkAssembler::new(8, 3, 2, 6, 4, true)
                .unwrap()
                .add_message(&raw),
            Err(WireError::NotAChunk(4))
        );
    }

    fn encoded_assembler(codec: Codec, values: u64, chunks: u32, in_place: bool) -> ChunkAssembler {
        let announced = Announcement {
            total_bytes: values * codec.item_size() as u64,
            payload_id: 1,
            num_chunks: chunks,
            max_chunk_bytes: 64,
            envelope_field: 3,
            check_finite: true,
            codec,
        };
        if in_place {
            ChunkAssembler::in_place_from(announced).unwrap()
        } else {
            ChunkAssembler::copying(announced).unwrap()
        }
    }

    #[test]
    fn encoded_chunks_must_hold_whole_finite_values() {
        for in_place in [false, true] {
            let mut asm = encoded_assembler(Codec::Float16, 4, 2, in_place);
            assert_eq!(
                asm.add(chunk(1, 0, &[0, 0, 0])),
                Err(WireError::ChunkNotWholeValues {
                    index: 0,
                    bytes: 3,
                    codec: "float16"
                })
            );
            let mut asm = encoded_assembler(Codec::Float16, 4, 2, in_place);
            asm.add(chunk(1, 0, &[0, 0, 0, 0x3c])).unwrap(); // 0.0, 1.0
            assert_eq!(
                asm.add(chunk(1, 1, &[0, 0, 0, 0x7e])), // 0.0, NaN
                Err(WireError::NonFinite(3))
            );
        }
    }

    #[test]
    fn int8_scales_are_checked_and_others_refused() {
        let scaled = |scale| ChunkRef {
            scale,
            ..chunk(1, 0, &[1, 2])
        };
        let mut asm = encoded_assembler(Codec::Int8, 2, 1, false);
        assert_eq!(
            asm.add(scaled(f32::INFINITY)),
            Err(WireError::InvalidScale {
                index: 0,
                bits: f32::INFINITY.to_bits()
            })
        );
        let mut asm = encoded_assembler(Codec::Int8, 2, 1, false);
        assert_eq!(asm.add(scaled(0.5)), Ok(true));
        assert_eq!(asm.take().unwrap(), vec![0.5, 1.0]);
        let mut asm = encoded_assembler(Codec::BFloat16, 1, 1, true);
        assert!(matches!(
            asm.add(scaled(0.5)),
            Err(WireError::UnexpectedScale { index: 0, .. })
        ));
    }

    #[test]
    fn encoded_announcements_need_whole_values_per_chunk() {
        let announced = |total_bytes, num_chunks| Announcement {
            total_bytes,
            payload_id: 0,
            num_chunks,
            max_chunk_bytes: 8,
            envelope_field: 3,
            check_finite: true,
            codec: Codec::Float16,
        };
        assert!(matches!(
            ChunkAssembler::copying(announced(5, 1)),
            Err(WireError::NotWholeValues { bytes: 5, .. })
        ));
        assert!(ChunkAssembler::copying(announced(6, 3)).is_ok());
        assert!(matches!(
            ChunkAssembler::copying(announced(6, 4)),
            Err(WireError::ChunkCount { announced: 4, .. })
        ));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Any split into chunks gives back the values, and the first non-finite value is
        /// reported at its index however the chunks cut through values.
        #[test]
        fn chunked_copy_matches_the_plain_definition(
            len in 0usize..3000,
            limit in 1usize..700,
            bad in proptest::option::of((0usize..3000, 0usize..3)),
        ) {
            let mut values: Vec<f32> = (0..len).map(|i| (i as f32).sin() * 1e30).collect();
            if let Some((at, kind)) = bad {
                if at < len {
                    values[at] = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY][kind];
                }
            }
            let expected_bad = values.iter().position(|x| !x.is_finite());

            let (mut asm, last) = assemble(&values, limit);

            match expected_bad {
                Some(at) => prop_assert_eq!(last, Err(WireError::NonFinite(at as u64))),
                None => {
                    prop_assert_eq!(last, Ok(true));
                    prop_assert_eq!(
                        asm.take().unwrap().iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        values.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
                    );
                }
            }
        }
    }
}
