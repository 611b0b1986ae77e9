//! Streaming weighted accumulation: the controller folds each update into a float64 running sum
//! as it arrives, so memory stays O(model) however many learners report.
//!
//! Everything here is elementwise, so results do not depend on how the work is split across
//! threads: the parallel and sequential paths give bit-identical answers, and
//! [`weighted_average`] gives the same bits as folding the same updates into an [`Accumulator`]
//! in order and taking its [`Accumulator::mean`].
//!
//! Inputs are validated completely before any state changes: an `Err` leaves the accumulator
//! exactly as it was. Checking for NaN and infinity therefore costs one extra read of each update
//! (in parallel); fusing the check into the add would be cheaper but cannot be undone exactly,
//! since `(s + w * x) - w * x` is not `s` in floating point.
//!
//! Means multiply by `1 / Σ wᵢ` rather than divide (division is slow enough to make `mean` compute
//! bound); that differs from `sum / Σ wᵢ` by at most an ulp of float64, far below float32's.
//!
//! The float64 sums cannot overflow for float32 inputs unless weights exceed about 1e269; if they
//! do, the finalizers report [`AggregationError::NonFiniteResult`] instead of returning infinities.

use std::ops::{Add, Mul};

use rayon::prelude::*;

use crate::codec::{self, Codec};
use crate::error::{AggregationError, Result};

/// Inputs shorter than this run on the calling thread: below it, splitting costs more than it
/// saves.
pub const PARALLEL_MIN: usize = 1 << 16;

/// Values per parallel work item of the streaming add. 32 Ki values are 128 KiB of float32
/// input plus 256 KiB of float64 sums: one item's working set fits a 512 KiB L2.
const CHUNK: usize = 1 << 15;

/// Parameters per tile of [`weighted_average`]: the tile's float64 sums (64 KiB) stay in L2 while
/// every update's slice of the tile is folded in, so the sums never travel to memory.
const TILE: usize = 1 << 13;

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for f64 {}
}

/// The floating-point types an update may arrive in (`f32`, `f64`).
pub trait Element:
    sealed::Sealed + Copy + Send + Sync + Add<Output = Self> + Mul<Output = Self>
{
    /// Additive identity.
    const ZERO: Self;

    /// Exact widening to float64.
    fn to_f64(self) -> f64;
}

impl Element for f32 {
    const ZERO: Self = 0.0;

    #[inline(always)]
    fn to_f64(self) -> f64 {
        f64::from(self)
    }
}

impl Element for f64 {
    const ZERO: Self = 0.0;

    #[inline(always)]
    fn to_f64(self) -> f64 {
        self
    }
}

/// An update that lies in pieces, encoded with `codec`: `parts` are (bytes, int8 scale) in
/// order, each a whole number of encoded values (any alignment); their concatenation is the
/// update. The scale is ignored by codecs without one.
#[derive(Debug, Clone)]
pub struct EncodedUpdate<'a> {
    pub codec: Codec,
    pub parts: Vec<(&'a [u8], f32)>,
}

/// A running weighted sum `Σ wᵢ·xᵢ` in float64, with `Σ wᵢ` and the number of updates.
#[derive(Debug, Clone, PartialEq)]
pub struct Accumulator {
    sum: Vec<f64>,
    total_weight: f64,
    count: u64,
}

impl Accumulator {
    /// An empty accumulator for models of `len` parameters.
    pub fn new(len: usize) -> Self {
        Self {
            sum: vec![0.0; len],
            total_weight: 0.0,
            count: 0,
        }
    }

    /// Like [`new`](Self::new), but reports a failed allocation (an absurd `len` from a corrupt
    /// message, say) as an error instead of aborting the process.
    pub fn try_new(len: usize) -> Result<Self> {
        let mut sum = Vec::new();
        sum.try_reserve_exact(len)
            .map_err(|_| AggregationError::Allocation { values: len })?;
        sum.resize(len, 0.0);
        Ok(Self {
            sum,
            total_weight: 0.0,
            count: 0,
        })
    }

    /// Number of parameters.
    pub fn len(&self) -> usize {
        self.sum.len()
    }

    /// Whether the model has no parameters.
    pub fn is_empty(&self) -> bool {
        self.sum.is_empty()
    }

    /// Number of updates added since creation or the last [`reset`](Self::reset).
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Sum of the weights added so far.
    pub fn total_weight(&self) -> f64 {
        self.total_weight
    }

    /// The running sum `Σ wᵢ·xᵢ` in float64.
    pub fn sum(&self) -> &[f64] {
        &self.sum
    }

    /// Adds `weight · values` to the sum. `weight` must be finite and > 0, `values` must have
    /// [`len`](Self::len) finite entries; on error nothing changes.
    pub fn add<T: Element>(&mut self, values: &[T], weight: f64) -> Result<()> {
        check_len("update", values.len(), self.len())?;
        let total = checked_total(self.total_weight, weight)?;
        if let Some(index) = first_non_finite(values) {
            return Err(AggregationError::NonFinite { index });
        }
        if self.len() >= PARALLEL_MIN {
            self.sum
                .par_chunks_mut(CHUNK)
                .zip(values.par_chunks(CHUNK))
                .for_each(|(sum, values)| add_scaled(sum, values, weight));
        } else {
            add_scaled(&mut self.sum, values, weight);
        }
        self.total_weight = total;
        self.count += 1;
        Ok(())
    }

    /// Adds several updates at once: the same result, bit for bit, as [`add`](Self::add)ing
    /// them in order, but the float64 sums are read and written once per tile for the whole
    /// group instead of once per update (each update's slice of a tile is folded in while the
    /// tile's sums sit in cache). Memory traffic per update drops from 20 B/param to about
    /// 4 + 16/n B/param. Every length and weight is validated first, and with `check_finite`
    /// every value too (one more read of each update); on error nothing changes and the error
    /// names the update. Without `check_finite` the caller vouches that every value is finite
    /// (it checked them on arrival): a NaN or infinity would then reach the sums, and the
    /// finalizers would report it as [`AggregationError::NonFiniteResult`].
    pub fn add_many<T: Element>(
        &mut self,
        updates: &[&[T]],
        weights: &[f64],
        check_finite: bool,
    ) -> Result<()> {
        if updates.len() != weights.len() {
            return Err(AggregationError::WeightCount {
                updates: updates.len(),
                weights: weights.len(),
            });
        }
        let mut total = self.total_weight;
        for (index, (update, &weight)) in updates.iter().zip(weights).enumerate() {
            check_len("update", update.len(), self.len()).map_err(|e| e.in_update(index))?;
            total = checked_total(total, weight).map_err(|e| e.in_update(index))?;
        }
        if check_finite {
            for (index, update) in updates.iter().enumerate() {
                if let Some(at) = first_non_finite(update) {
                    return Err(AggregationError::NonFinite { index: at }.in_update(index));
                }
            }
        }
        let fold_tile = |(tile, sums): (usize, &mut [f64])| {
            let start = tile * TILE;
            for (update, &weight) in updates.iter().zip(weights) {
                add_scaled(sums, &update[start..start + sums.len()], weight);
            }
        };
        if self.len() >= PARALLEL_MIN {
            self.sum
                .par_chunks_mut(TILE)
                .enumerate()
                .for_each(fold_tile);
        } else {
            self.sum.chunks_mut(TILE).enumerate().for_each(fold_tile);
        }
        self.total_weight = total;
        self.count += updates.len() as u64;
        Ok(())
    }

    /// [`add_many`](Self::add_many) for float32 updates that lie in pieces: each update is
    /// given as byte segments (little-endian float32, any alignment, each a whole number of
    /// values) whose concatenation is the update, e.g. the data of the chunk messages it arrived
    /// in, read where they lie instead of being copied into one buffer first. The result is bit
    /// for bit that of `add_many` on the assembled updates. Lengths and weights are validated
    /// first; the values are not checked (the caller checked them on arrival).
    pub fn add_many_segments(&mut self, updates: &[&[&[u8]]], weights: &[f64]) -> Result<()> {
        let encoded: Vec<EncodedUpdate<'_>> = updates
            .iter()
            .map(|segments| EncodedUpdate {
                codec: Codec::Float32,
                parts: segments.iter().map(|&s| (s, 0.0)).collect(),
            })
            .collect();
        self.add_many_encoded(&encoded, weights)
    }

    /// [`add_many_segments`](Self::add_many_segments) for updates in any codec: each value is
    /// decoded to float32 where it lies and widened into the float64 sums (no float32 copy of
    /// the update is made), so the result is bit for bit that of `add_many` on the decoded
    /// updates. Lengths and weights are validated first; the values and scales are not checked
    /// (the caller checked them on arrival).
    pub fn add_many_encoded(
        &mut self,
        updates: &[EncodedUpdate<'_>],
        weights: &[f64],
    ) -> Result<()> {
        if updates.len() != weights.len() {
            return Err(AggregationError::WeightCount {
                updates: updates.len(),
                weights: weights.len(),
            });
        }
        let mut total = self.total_weight;
        let mut starts = Vec::with_capacity(updates.len()); // first value of every segment
        for (index, (update, &weight)) in updates.iter().zip(weights).enumerate() {
            let item = update.codec.item_size();
            let mut at = 0;
            let mut first = Vec::with_capacity(update.parts.len());
            for (segment, _) in &update.parts {
                if segment.len() % item != 0 {
                    return Err(if update.codec == Codec::Float32 {
                        AggregationError::SegmentNotFloat32 {
                            update: index,
                            bytes: segment.len(),
                        }
                    } else {
                        AggregationError::SegmentNotWholeValues {
                            update: index,
                            bytes: segment.len(),
                            codec: update.codec.name(),
                        }
                    });
                }
                first.push(at);
                at += segment.len() / item;
            }
            check_len("update", at, self.len()).map_err(|e| e.in_update(index))?;
            total = checked_total(total, weight).map_err(|e| e.in_update(index))?;
            starts.push(first);
        }
        let fold_tile = |(tile, sums): (usize, &mut [f64])| {
            let start = tile * TILE;
            for ((update, first), &weight) in updates.iter().zip(&starts).zip(weights) {
                let (codec, item) = (update.codec, update.codec.item_size());
                let mut done = 0; // values of this tile folded so far
                let mut s = first.partition_point(|&f| f <= start) - 1;
                while done < sums.len() {
                    let skip = start + done - first[s];
                    let (segment, scale) = update.parts[s];
                    let segment = &segment[item * skip..];
                    let take = (segment.len() / item).min(sums.len() - done);
                    let (sums, bytes) = (&mut sums[done..done + take], &segment[..item * take]);
                    if codec == Codec::Float32 {
                        add_scaled_le(sums, bytes, weight);
                    } else {
                        codec::add_scaled(codec, sums, bytes, scale, weight);
                    }
                    done += take;
                    s += 1;
                }
            }
        };
        if self.len() >= PARALLEL_MIN {
            self.sum
                .par_chunks_mut(TILE)
                .enumerate()
                .for_each(fold_tile);
        } else {
            self.sum.chunks_mut(TILE).enumerate().for_each(fold_tile);
        }
        self.total_weight = total;
        self.count += updates.len() as u64;
        Ok(())
    }

    /// The weighted mean `Σ wᵢ·xᵢ / Σ wᵢ` as float32. Fails before any update was added.
    pub fn mean(&self) -> Result<Vec<f32>> {
        let mut out = vec![0.0; self.len()];
        self.mean_into(&mut out)?;
        Ok(out)
    }

    /// [`mean`](Self::mean) written into `out` (of [`len`](Self::len) values).
    pub fn mean_into(&self, out: &mut [f32]) -> Result<()> {
        let scale = 1.0 / self.nonzero_total()?;
        finish(&self.sum, None, out, |s, _| s * scale)
    }

    /// The weighted sum `Σ wᵢ·xᵢ` as float32. Fails if a value overflows float32.
    pub fn weighted_sum(&self) -> Result<Vec<f32>> {
        let mut out = vec![0.0; self.len()];
        self.weighted_sum_into(&mut out)?;
        Ok(out)
    }

    /// [`weighted_sum`](Self::weighted_sum) written into `out` (of [`len`](Self::len) values).
    pub fn weighted_sum_into(&self, out: &mut [f32]) -> Result<()> {
        finish(&self.sum, None, out, |s, _| s)
    }

    /// `base + scale · mean` (`normalize`) or `base + scale · sum` (not `normalize`), computed in
    /// float64 and rounded once to float32: the new global model from a delta aggregate.
    pub fn apply(&self, base: &[f32], scale: f64, normalize: bool) -> Result<Vec<f32>> {
        let mut out = vec![0.0; self.len()];
        self.apply_into(base, scale, normalize, &mut out)?;
        Ok(out)
    }

    /// [`apply`](Self::apply) written into `out` (of [`len`](Self::len) values).
    pub fn apply_into(
        &self,
        base: &[f32],
        scale: f64,
        normalize: bool,
        out: &mut [f32],
    ) -> Result<()> {
        check_len("base", base.len(), self.len())?;
        if !scale.is_finite() {
            return Err(AggregationError::InvalidScale(scale));
        }
        if normalize {
            let inverse = 1.0 / self.nonzero_total()?;
            finish(&self.sum, Some(base), out, |s, b| b + scale * (s * inverse))
        } else {
            finish(&self.sum, Some(base), out, |s, b| b + scale * s)
        }
    }

    /// The partial sum as `(sum, total_weight, count)`: a copy of the float64 sums that
    /// [`merge`](Self::merge) into another accumulator adds exactly as the updates themselves
    /// would have (up to the order of the float64 additions).
    pub fn export(&self) -> (Vec<f64>, f64, u64) {
        (self.sum.clone(), self.total_weight, self.count)
    }

    /// Adds a partial sum exported by another accumulator (of `count` updates weighing
    /// `total_weight` in all) to this one. Each sum is then the float64 sum of the same terms,
    /// added in another order; merging into an empty accumulator, or merging an empty partial,
    /// is exact. Everything is validated first (length, finite sums, a weight that is finite
    /// and > 0 exactly when `count` > 0, an empty partial's sums all zero, no overflow of the
    /// totals); on error nothing changes.
    pub fn merge(&mut self, sum: &[f64], total_weight: f64, count: u64) -> Result<()> {
        check_len("sum", sum.len(), self.len())?;
        let consistent = if count == 0 {
            total_weight == 0.0
        } else {
            total_weight.is_finite() && total_weight > 0.0
        };
        if !consistent {
            return Err(AggregationError::InvalidPartial {
                count,
                total_weight,
            });
        }
        let total = self.total_weight + total_weight;
        if !total.is_finite() {
            return Err(AggregationError::WeightOverflow {
                total: self.total_weight,
                weight: total_weight,
            });
        }
        let merged_count = self
            .count
            .checked_add(count)
            .ok_or(AggregationError::CountOverflow)?;
        if let Some(index) = first_non_finite(sum) {
            return Err(AggregationError::NonFiniteSum { index });
        }
        if count == 0 {
            return match sum.iter().position(|&s| s != 0.0) {
                Some(index) => Err(AggregationError::NonzeroEmptySum { index }),
                None => Ok(()),
            };
        }
        // An empty accumulator holds zeros: copying is exact, adding to 0.0 would be too except
        // that it turns -0.0 into 0.0.
        let empty = self.count == 0;
        let merge_chunk = |(own, theirs): (&mut [f64], &[f64])| {
            if empty {
                own.copy_from_slice(theirs);
            } else {
                for (s, &t) in own.iter_mut().zip(theirs) {
                    *s += t;
                }
            }
        };
        if self.len() >= PARALLEL_MIN {
            self.sum
                .par_chunks_mut(CHUNK)
                .zip(sum.par_chunks(CHUNK))
                .for_each(merge_chunk);
        } else {
            merge_chunk((&mut self.sum, sum));
        }
        self.total_weight = total;
        self.count = merged_count;
        Ok(())
    }

    /// [`merge`](Self::merge)s the partial sum of `other`.
    pub fn merge_from(&mut self, other: &Accumulator) -> Result<()> {
        self.merge(&other.sum, other.total_weight, other.count)
    }

    /// Clears the sum, the total weight and the count; keeps the allocation.
    pub fn reset(&mut self) {
        if self.len() >= PARALLEL_MIN {
            self.sum.par_chunks_mut(CHUNK).for_each(|c| c.fill(0.0));
        } else {
            self.sum.fill(0.0);
        }
        self.total_weight = 0.0;
        self.count = 0;
    }

    fn nonzero_total(&self) -> Result<f64> {
        // Weights are > 0, so the total is 0 exactly when nothing was added.
        if self.count == 0 {
            Err(AggregationError::EmptyMean)
        } else {
            Ok(self.total_weight)
        }
    }
}

/// The weighted mean `Σ wᵢ·xᵢ / Σ wᵢ` of equally long updates, as float32.
///
/// Needs every update at once but moves far fewer bytes than folding them one by one: it walks
/// the parameters in tiles whose float64 sums stay in cache while every update's slice is added,
/// so each update is read once and the sums never go to memory. Bit-identical to adding the
/// updates to an [`Accumulator`] in order and calling [`Accumulator::mean`].
pub fn weighted_average<T: Element>(updates: &[&[T]], weights: &[f64]) -> Result<Vec<f32>> {
    let mut out = vec![0.0; updates.first().map_or(0, |u| u.len())];
    weighted_average_into(updates, weights, &mut out)?;
    Ok(out)
}

/// [`weighted_average`] written into `out` (as long as each update).
pub fn weighted_average_into<T: Element>(
    updates: &[&[T]],
    weights: &[f64],
    out: &mut [f32],
) -> Result<()> {
    if updates.len() != weights.len() {
        return Err(AggregationError::WeightCount {
            updates: updates.len(),
            weights: weights.len(),
        });
    }
    let len = updates.first().ok_or(AggregationError::NoUpdates)?.len();
    let mut total = 0.0;
    for (index, (update, &weight)) in updates.iter().zip(weights).enumerate() {
        if update.len() != len {
            return Err(AggregationError::RaggedUpdates {
                index,
                got: update.len(),
                expected: len,
            });
        }
        total = checked_total(total, weight).map_err(|e| e.in_update(index))?;
    }
    check_len("output", out.len(), len)?;
    let inverse = 1.0 / total;

    // Each tile reports whether its results came out non-finite; only then do we look for the
    // cause, so the happy path never reads the updates twice.
    let fold_tile = |sums: &mut Vec<f64>, (tile, out): (usize, &mut [f32])| -> bool {
        let start = tile * TILE;
        let sums = &mut sums[..out.len()];
        sums.fill(0.0);
        for (update, &weight) in updates.iter().zip(weights) {
            add_scaled(sums, &update[start..start + out.len()], weight);
        }
        for (o, &s) in out.iter_mut().zip(sums.iter()) {
            *o = (s * inverse) as f32;
        }
        !all_finite(out)
    };
    let overflowed = if len >= PARALLEL_MIN {
        out.par_chunks_mut(TILE)
            .enumerate()
            .map_init(|| vec![0.0; TILE], fold_tile)
            .any(|bad| bad)
    } else {
        let mut sums = vec![0.0; TILE.min(len)];
        out.chunks_mut(TILE)
            .enumerate()
            .any(|item| fold_tile(&mut sums, item))
    };
    if overflowed {
        for (index, update) in updates.iter().enumerate() {
            if let Some(at) = first_non_finite(update) {
                return Err(AggregationError::NonFinite { index: at }.in_update(index));
            }
        }
        // Finite inputs with a non-finite sum: the weights were large enough to overflow.
        let index = first_non_finite(out).unwrap_or(0);
        return Err(AggregationError::NonFiniteResult { index });
    }
    Ok(())
}

/// Index of the first NaN or infinity in `values`, checked in parallel for long inputs.
pub fn first_non_finite<T: Element>(values: &[T]) -> Option<usize> {
    let chunk = if values.len() >= PARALLEL_MIN {
        values.par_chunks(CHUNK).position_first(|c| !all_finite(c))
    } else {
        values.chunks(CHUNK).position(|c| !all_finite(c))
    }?;
    let start = chunk * CHUNK;
    values[start..]
        .iter()
        .position(|&x| !x.to_f64().is_finite())
        .map(|i| start + i)
}

fn check_len(what: &'static str, got: usize, expected: usize) -> Result<()> {
    if got == expected {
        Ok(())
    } else {
        Err(AggregationError::LengthMismatch {
            what,
            got,
            expected,
        })
    }
}

/// `total + weight`, after checking that `weight` is finite and > 0 and the total stays finite.
fn checked_total(total: f64, weight: f64) -> Result<f64> {
    if !(weight.is_finite() && weight > 0.0) {
        return Err(AggregationError::InvalidWeight(weight));
    }
    let next = total + weight;
    if next.is_finite() {
        Ok(next)
    } else {
        Err(AggregationError::WeightOverflow { total, weight })
    }
}

/// `sum += weight · values`, elementwise. A plain loop that the compiler vectorizes.
#[inline]
fn add_scaled<T: Element>(sum: &mut [f64], values: &[T], weight: f64) {
    for (s, &x) in sum.iter_mut().zip(values) {
        *s += weight * x.to_f64();
    }
}

/// `sum += weight · values` for little-endian float32 `bytes` (any alignment): the same
/// arithmetic as [`add_scaled`], so both give the same bits.
#[inline]
fn add_scaled_le(sum: &mut [f64], bytes: &[u8], weight: f64) {
    for (s, w) in sum.iter_mut().zip(bytes.chunks_exact(4)) {
        *s += weight * f64::from(f32::from_le_bytes([w[0], w[1], w[2], w[3]]));
    }
}

/// Whether every value is finite, without branching per value: `x · 0` is 0 for finite `x` and
/// NaN for NaN or ±∞, and NaN is sticky under addition. Sixteen independent lanes let the
/// compiler vectorize the loop (a single running sum would be a serial dependency chain).
#[inline]
fn all_finite<T: Element>(values: &[T]) -> bool {
    const LANES: usize = 16;
    let mut lanes = [T::ZERO; LANES];
    let mut blocks = values.chunks_exact(LANES);
    for block in &mut blocks {
        for (lane, &x) in lanes.iter_mut().zip(block) {
            *lane = *lane + x * T::ZERO;
        }
    }
    for &x in blocks.remainder() {
        lanes[0] = lanes[0] + x * T::ZERO;
    }
    lanes.iter().all(|&lane| lane.to_f64().is_finite())
}

/// Maps the float64 sums (and an optional float32 base) through `op` into `out` as float32, and
/// checks each chunk for non-finite results while it is still in cache.
fn finish<F>(sum: &[f64], base: Option<&[f32]>, out: &mut [f32], op: F) -> Result<()>
where
    F: Fn(f64, f64) -> f64 + Sync,
{
    check_len("output", out.len(), sum.len())?;
    let kernel = |(chunk, out): (usize, &mut [f32])| -> Option<usize> {
        let start = chunk * CHUNK;
        let sum = &sum[start..start + out.len()];
        match base {
            Some(base) => {
                let base = &base[start..start + out.len()];
                for ((o, &s), &b) in out.iter_mut().zip(sum).zip(base) {
                    *o = op(s, f64::from(b)) as f32;
                }
            }
            None => {
                for (o, &s) in out.iter_mut().zip(sum) {
                    *o = op(s, 0.0) as f32;
                }
            }
        }
        first_non_finite(out).map(|i| start + i)
    };
    let first_bad = if sum.len() >= PARALLEL_MIN {
        out.par_chunks_mut(CHUNK)
            .enumerate()
            .filter_map(kernel)
            .min()
    } else {
        out.chunks_mut(CHUNK).enumerate().filter_map(kernel).min()
    };
    match first_bad {
        Some(index) => Err(AggregationError::NonFiniteResult { index }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Deterministic pseudo-random values in [-8, 8) (xorshift64*), so large inputs are cheap to
    /// make and shrink well: proptest varies the seed, not a million-element vector.
    fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut state = seed | 1;
        (0..len)
            .map(|_| {
                state ^= state >> 12;
                state ^= state << 25;
                state ^= state >> 27;
                let bits = state.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 40;
                (bits as f32 / (1u64 << 24) as f32) * 16.0 - 8.0
            })
            .collect()
    }

    /// The plain definition: sequential float64 loops.
    fn reference_sum(updates: &[Vec<f32>], weights: &[f64]) -> Vec<f64> {
        let mut sum = vec![0.0; updates[0].len()];
        for (update, &weight) in updates.iter().zip(weights) {
            for (s, &x) in sum.iter_mut().zip(update) {
                *s += weight * f64::from(x);
            }
        }
        sum
    }

    /// The mean as the module documents it: the sum times the reciprocal of the total weight.
    fn reference_mean(updates: &[Vec<f32>], weights: &[f64]) -> Vec<f32> {
        let inverse = 1.0 / weights.iter().fold(0.0, |t, &w| t + w);
        reference_sum(updates, weights)
            .iter()
            .map(|&s| (s * inverse) as f32)
            .collect()
    }

    fn filled(updates: &[Vec<f32>], weights: &[f64]) -> Accumulator {
        let mut acc = Accumulator::new(updates[0].len());
        for (update, &weight) in updates.iter().zip(weights) {
            acc.add(update, weight).unwrap();
        }
        acc
    }

    fn case(len: usize, n: usize, seed: u64) -> (Vec<Vec<f32>>, Vec<f64>) {
        let updates = (0..n).map(|i| values(len, seed + i as u64)).collect();
        let weights = (0..n).map(|i| 0.5 + i as f64 * 0.75).collect();
        (updates, weights)
    }

    #[test]
    fn mean_matches_reference_on_the_parallel_path() {
        let (updates, weights) = case(3 * PARALLEL_MIN + 17, 3, 7);

        let mean = filled(&updates, &weights).mean().unwrap();

        assert_eq!(mean, reference_mean(&updates, &weights));
    }

    #[test]
    fn float64_updates_accumulate_without_rounding_to_float32() {
        let mut acc = Accumulator::new(1);

        acc.add(&[0.1_f64], 1.0).unwrap();

        assert_eq!(acc.sum(), &[0.1_f64]);
    }

    #[test]
    fn weighted_sum_and_counters() {
        let (updates, weights) = case(10, 2, 1);

        let acc = filled(&updates, &weights);

        let expected: Vec<f32> = reference_sum(&updates, &weights)
            .iter()
            .map(|&s| s as f32)
            .collect();
        assert_eq!(acc.weighted_sum().unwrap(), expected);
        assert_eq!(acc.count(), 2);
        assert_eq!(acc.total_weight(), 0.5 + 1.25);
    }

    #[test]
    fn apply_adds_the_scaled_mean_or_sum_to_the_base() {
        let mut acc = Accumulator::new(2);
        acc.add(&[2.0_f32, 4.0], 1.0).unwrap();
        acc.add(&[4.0_f32, 8.0], 3.0).unwrap();
        let base = [1.0_f32, -1.0];

        let normalized = acc.apply(&base, 0.5, true).unwrap();
        let raw = acc.apply(&base, 0.5, false).unwrap();

        assert_eq!(normalized, vec![1.0 + 0.5 * 3.5, -1.0 + 0.5 * 7.0]);
        assert_eq!(raw, vec![1.0 + 0.5 * 14.0, -1.0 + 0.5 * 28.0]);
    }

    #[test]
    fn add_many_equals_adding_one_by_one_bit_for_bit() {
        for len in [10, PARALLEL_MIN + 12_345] {
            let (updates, weights) = case(len, 5, 7);
            let slices: Vec<&[f32]> = updates.iter().map(Vec::as_slice).collect();
            let mut grouped = Accumulator::new(len);
            grouped.add(&updates[0], 2.0).unwrap();
            grouped.add_many(&slices, &weights, true).unwrap();
            let mut single = Accumulator::new(len);
            single.add(&updates[0], 2.0).unwrap();
            for (u, &w) in updates.iter().zip(&weights) {
                single.add(u, w).unwrap();
            }
            assert_eq!(grouped.sum(), single.sum());
            assert_eq!(grouped.count(), 6);
            assert_eq!(grouped.total_weight(), single.total_weight());
        }
    }

    #[test]
    fn add_many_segments_equals_add_many_bit_for_bit_however_cut() {
        for len in [10, 3 * TILE + 5, PARALLEL_MIN + 12_345] {
            let (updates, weights) = case(len, 4, 11);
            let slices: Vec<&[f32]> = updates.iter().map(Vec::as_slice).collect();
            let mut expected = Accumulator::new(len);
            expected.add_many(&slices, &weights, true).unwrap();
            // each update as misaligned byte segments of varying length (one empty)
            let owned: Vec<Vec<Vec<u8>>> = updates
                .iter()
                .enumerate()
                .map(|(u, values)| {
                    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
                    let mut segments = vec![Vec::new()];
                    let mut at = 0;
                    let mut step = 4 * (1 + u * 997 % (TILE + 3));
                    while at < bytes.len() {
                        let end = (at + step).min(bytes.len());
                        let mut shifted = vec![0u8; 1 + u % 3]; // odd offsets in memory
                        shifted.extend_from_slice(&bytes[at..end]);
                        segments.push(shifted);
                        at = end;
                        step = 4 * (1 + (step / 4 * 31 + 7) % (2 * TILE));
                    }
                    segments
                })
                .collect();
            let views: Vec<Vec<&[u8]>> = owned
                .iter()
                .enumerate()
                .map(|(u, segs)| {
                    segs.iter()
                        .map(|s| {
                            if s.is_empty() {
                                &s[..]
                            } else {
                                &s[1 + u % 3..]
                            }
                        })
                        .collect()
                })
                .collect();
            let refs: Vec<&[&[u8]]> = views.iter().map(Vec::as_slice).collect();
            let mut segmented = Accumulator::new(len);
            segmented.add_many_segments(&refs, &weights).unwrap();
            assert_eq!(segmented, expected);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        /// Folding encoded updates in pieces (tiles crossing pieces, the parallel path included)
        /// gives the bits of adding the decoded float32 arrays one by one.
        #[test]
        fn add_many_encoded_equals_adding_the_decoded_arrays(
            len in prop_oneof![0usize..3000, Just(PARALLEL_MIN + 12_345)],
            piece in 1usize..5000,
            seed in any::<u64>(),
        ) {
            let (updates, weights) = case(len, 4, seed);
            let mut bytes = Vec::new();
            let mut decoded = Vec::new();
            for (update, codec) in updates.iter().zip(Codec::ALL) {
                let mut parts = Vec::new();
                let mut flat = Vec::new();
                for values in update.chunks(piece) {
                    let mut out = vec![0; values.len() * codec.item_size()];
                    let scale = codec::encode(codec, values, &mut out).unwrap();
                    let mut back = vec![0.0; values.len()];
                    codec::decode(codec, &out, scale, &mut back).unwrap();
                    flat.extend(back);
                    parts.push((out, scale));
                }
                bytes.push((codec, parts));
                decoded.push(flat);
            }
            let encoded: Vec<EncodedUpdate<'_>> = bytes
                .iter()
                .map(|(codec, parts)| EncodedUpdate {
                    codec: *codec,
                    parts: parts.iter().map(|(b, s)| (b.as_slice(), *s)).collect(),
                })
                .collect();

            let mut folded = Accumulator::new(len);
            folded.add_many_encoded(&encoded, &weights).unwrap();

            prop_assert_eq!(folded, filled(&decoded, &weights));
        }
    }

    #[test]
    fn add_many_encoded_refuses_partial_values() {
        let mut acc = Accumulator::new(2);
        let bytes = [0u8; 3];
        let update = EncodedUpdate {
            codec: Codec::Float16,
            parts: vec![(&bytes[..], 0.0)],
        };

        assert_eq!(
            acc.add_many_encoded(&[update], &[1.0]),
            Err(AggregationError::SegmentNotWholeValues {
                update: 0,
                bytes: 3,
                codec: "float16"
            })
        );
    }

    #[test]
    fn add_many_segments_validates_before_changing_anything() {
        let mut acc = Accumulator::new(2);
        let whole = 1.0f32.to_le_bytes().repeat(2);
        let bad: &[&[u8]] = &[&whole[..5], &whole[5..]];
        assert_eq!(
            acc.add_many_segments(&[bad], &[1.0]),
            Err(AggregationError::SegmentNotFloat32 {
                update: 0,
                bytes: 5
            })
        );
        let short: &[&[u8]] = &[&whole[..4]];
        assert!(acc.add_many_segments(&[short], &[1.0]).is_err());
        assert_eq!(acc.count(), 0);
    }

    #[test]
    fn add_many_errors_name_the_update_and_change_nothing() {
        let (mut updates, weights) = case(100, 3, 1);
        updates[2][40] = f32::NAN;
        let slices: Vec<&[f32]> = updates.iter().map(Vec::as_slice).collect();
        let mut acc = Accumulator::new(100);
        let err = acc.add_many(&slices, &weights, true).unwrap_err();
        assert!(err.to_string().contains("updates[2]"), "{err}");
        assert_eq!(acc.count(), 0);
        assert!(acc.sum().iter().all(|&s| s == 0.0));
        let err = acc.add_many(&slices[..2], &[1.0, -1.0], false).unwrap_err();
        assert!(err.to_string().contains("updates[1]"), "{err}");
        assert!(acc.add_many(&slices[..2], &[1.0], true).is_err());
        assert_eq!(acc.count(), 0);
    }

    #[test]
    fn merging_into_an_empty_accumulator_or_an_empty_partial_is_exact() {
        let (updates, weights) = case(PARALLEL_MIN + 3, 3, 4);
        let full = filled(&updates, &weights);

        let mut into_empty = Accumulator::new(full.len());
        into_empty.merge_from(&full).unwrap();
        let mut with_empty = full.clone();
        with_empty
            .merge_from(&Accumulator::new(full.len()))
            .unwrap();

        assert_eq!(into_empty, full);
        assert_eq!(with_empty, full);
    }

    #[test]
    fn merge_validates_before_changing_anything() {
        let (updates, weights) = case(8, 2, 2);
        let mut acc = filled(&updates, &weights);
        let before = acc.clone();
        let mut bad = vec![1.0; 8];
        bad[5] = f64::NAN;

        let errors = [
            acc.merge(&[1.0; 7], 1.0, 1).unwrap_err(),
            acc.merge(&bad, 1.0, 1).unwrap_err(),
            acc.merge(&[1.0; 8], 0.0, 1).unwrap_err(),
            acc.merge(&[1.0; 8], f64::NAN, 1).unwrap_err(),
            acc.merge(&[0.0; 8], 2.0, 0).unwrap_err(),
            acc.merge(&[1.0; 8], 0.0, 0).unwrap_err(),
            acc.merge(&[1.0; 8], 1.0, u64::MAX).unwrap_err(),
        ];

        assert_eq!(acc, before);
        assert!(matches!(
            errors[0],
            AggregationError::LengthMismatch { what: "sum", .. }
        ));
        assert_eq!(errors[1], AggregationError::NonFiniteSum { index: 5 });
        assert!(matches!(
            errors[2],
            AggregationError::InvalidPartial { count: 1, .. }
        ));
        assert!(matches!(errors[3], AggregationError::InvalidPartial { .. }));
        assert!(matches!(
            errors[4],
            AggregationError::InvalidPartial { count: 0, .. }
        ));
        assert_eq!(errors[5], AggregationError::NonzeroEmptySum { index: 0 });
        assert_eq!(errors[6], AggregationError::CountOverflow);
        let mut heavy = Accumulator::new(8);
        heavy.merge(&[1.0; 8], f64::MAX, 1).unwrap();
        assert!(matches!(
            heavy.merge(&[1.0; 8], f64::MAX, 1),
            Err(AggregationError::WeightOverflow { .. })
        ));
    }

    #[test]
    fn reset_clears_everything() {
        let (updates, weights) = case(PARALLEL_MIN + 1, 2, 3);
        let mut acc = filled(&updates, &weights);

        acc.reset();

        assert_eq!(acc, Accumulator::new(PARALLEL_MIN + 1));
    }

    #[test]
    fn errors_leave_the_state_unchanged() {
        let (updates, weights) = case(PARALLEL_MIN + 5, 2, 11);
        let mut acc = filled(&updates, &weights);
        let before = acc.clone();
        let mut poisoned = values(PARALLEL_MIN + 5, 99);
        poisoned[PARALLEL_MIN + 3] = f32::INFINITY;
        poisoned[PARALLEL_MIN + 4] = f32::NAN;

        let errors = [
            acc.add(&poisoned, 1.0).unwrap_err(),
            acc.add(&updates[0][..10], 1.0).unwrap_err(),
            acc.add(&updates[0], f64::NAN).unwrap_err(),
            acc.add(&updates[0], 0.0).unwrap_err(),
            acc.add(&updates[0], -1.0).unwrap_err(),
            acc.add(&updates[0], f64::INFINITY).unwrap_err(),
        ];

        assert_eq!(acc, before);
        assert_eq!(
            errors[0],
            AggregationError::NonFinite {
                index: PARALLEL_MIN + 3
            }
        );
        assert!(matches!(
            errors[1],
            AggregationError::LengthMismatch { got: 10, .. }
        ));
        assert!(matches!(errors[2], AggregationError::InvalidWeight(w) if w.is_nan()));
        assert_eq!(errors[3], AggregationError::InvalidWeight(0.0));
        assert_eq!(errors[4], AggregationError::InvalidWeight(-1.0));
        assert_eq!(errors[5], AggregationError::InvalidWeight(f64::INFINITY));
    }

    #[test]
    fn total_weight_overflow_is_rejected() {
        let mut acc = Accumulator::new(3);
        acc.add(&[0.0_f32; 3], f64::MAX).unwrap();
        let before = acc.clone();

        let result = acc.add(&[0.0_f32; 3], f64::MAX);

        assert!(matches!(
            result,
            Err(AggregationError::WeightOverflow { .. })
        ));
        assert_eq!(acc, before);
    }

    #[test]
    fn mean_of_nothing_is_an_error() {
        let acc = Accumulator::new(4);

        assert_eq!(acc.mean(), Err(AggregationError::EmptyMean));
        assert_eq!(
            acc.apply(&[0.0; 4], 1.0, true),
            Err(AggregationError::EmptyMean)
        );
        assert_eq!(acc.weighted_sum(), Ok(vec![0.0; 4]));
    }

    #[test]
    fn float32_overflow_is_reported() {
        let mut acc = Accumulator::new(2);
        acc.add(&[1.0_f32, f32::MAX], 4.0).unwrap();

        assert_eq!(
            acc.weighted_sum(),
            Err(AggregationError::NonFiniteResult { index: 1 })
        );
    }

    #[test]
    fn apply_rejects_bad_scale_and_base_length() {
        let mut acc = Accumulator::new(2);
        acc.add(&[1.0_f32, 2.0], 1.0).unwrap();

        assert_eq!(
            acc.apply(&[0.0; 2], f64::INFINITY, true),
            Err(AggregationError::InvalidScale(f64::INFINITY))
        );
        assert!(matches!(
            acc.apply(&[0.0; 3], 1.0, true),
            Err(AggregationError::LengthMismatch { what: "base", .. })
        ));
    }

    #[test]
    fn weighted_average_validates_its_inputs() {
        let a = [1.0_f32, 2.0];
        let b = [1.0_f32, f32::NAN];
        let short = [1.0_f32];

        assert_eq!(
            weighted_average::<f32>(&[], &[]),
            Err(AggregationError::NoUpdates)
        );
        assert!(matches!(
            weighted_average(&[&a[..]], &[1.0, 2.0]),
            Err(AggregationError::WeightCount { .. })
        ));
        assert!(matches!(
            weighted_average(&[&a[..], &short[..]], &[1.0, 2.0]),
            Err(AggregationError::RaggedUpdates { index: 1, .. })
        ));
        assert_eq!(
            weighted_average(&[&a[..], &a[..]], &[1.0, -2.0]),
            Err(AggregationError::InvalidWeight(-2.0).in_update(1))
        );
        assert_eq!(
            weighted_average(&[&a[..], &b[..]], &[1.0, 2.0]),
            Err(AggregationError::NonFinite { index: 1 }.in_update(1))
        );
    }

    #[test]
    fn weighted_average_reports_overflow_of_finite_inputs() {
        let a = [f32::MAX; 3];

        let result = weighted_average(&[&a[..], &a[..]], &[f64::MAX / 2.0, f64::MAX / 2.0]);

        assert_eq!(result, Err(AggregationError::NonFiniteResult { index: 0 }));
    }

    #[test]
    fn first_non_finite_finds_the_earliest() {
        let mut xs = vec![0.0_f32; 2 * PARALLEL_MIN];
        xs[PARALLEL_MIN + 1] = f32::NEG_INFINITY;
        xs[2 * PARALLEL_MIN - 1] = f32::NAN;

        assert_eq!(first_non_finite(&xs), Some(PARALLEL_MIN + 1));
        assert_eq!(first_non_finite(&[f64::MAX, f64::MIN]), None);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        #[test]
        fn accumulator_matches_reference(
            len in prop_oneof![0_usize..300, PARALLEL_MIN - 3..PARALLEL_MIN + 3 * CHUNK],
            weights in prop::collection::vec(1e-3_f64..1e3, 1..5),
            seed in any::<u64>(),
        ) {
            let updates: Vec<Vec<f32>> =
                (0..weights.len()).map(|i| values(len, seed ^ i as u64)).collect();

            let acc = filled(&updates, &weights);

            prop_assert_eq!(acc.mean().unwrap(), reference_mean(&updates, &weights));
            prop_assert_eq!(acc.sum(), &reference_sum(&updates, &weights)[..]);
        }

        /// Partial sums of any split of the updates, merged, equal one accumulator over all of
        /// them up to the order of the float64 additions: within a few ulps of Σ|wᵢ·xᵢ|.
        #[test]
        fn merged_partials_equal_one_accumulator(
            len in prop_oneof![1_usize..300, PARALLEL_MIN..PARALLEL_MIN + 2 * CHUNK + 7],
            weights in prop::collection::vec(1e-3_f64..1e3, 1..7),
            split in any::<prop::sample::Index>(),
            seed in any::<u64>(),
        ) {
            let updates: Vec<Vec<f32>> =
                (0..weights.len()).map(|i| values(len, seed ^ i as u64)).collect();
            let cut = split.index(weights.len() + 1);
            let mut left = Accumulator::new(len);
            let mut right = Accumulator::new(len);
            for (i, (update, &weight)) in updates.iter().zip(&weights).enumerate() {
                let side = if i < cut { &mut left } else { &mut right };
                side.add(update, weight).unwrap();
            }
            let all = filled(&updates, &weights);

            let (sum, total_weight, count) = right.export();
            left.merge(&sum, total_weight, count).unwrap();

            prop_assert_eq!(left.count(), all.count());
            let magnitude: Vec<f64> = (0..len)
                .map(|j| updates.iter().zip(&weights).map(|(u, &w)| (w * f64::from(u[j])).abs()).sum())
                .collect();
            for ((&merged, &single), &scale) in left.sum().iter().zip(all.sum()).zip(&magnitude) {
                prop_assert!((merged - single).abs() <= 8.0 * f64::EPSILON * scale,
                    "{merged} vs {single}");
            }
            let tw = all.total_weight();
            prop_assert!((left.total_weight() - tw).abs() <= 8.0 * f64::EPSILON * tw);
            if cut == 0 || cut == weights.len() {
                prop_assert_eq!(left.sum(), all.sum());
            }
        }

        #[test]
        fn batch_equals_streaming(
            len in prop_oneof![1_usize..300, PARALLEL_MIN..PARALLEL_MIN + 2 * TILE + 7],
            weights in prop::collection::vec(1e-3_f64..1e3, 1..6),
            seed in any::<u64>(),
        ) {
            let updates: Vec<Vec<f32>> =
                (0..weights.len()).map(|i| values(len, seed ^ i as u64)).collect();
            let views: Vec<&[f32]> = updates.iter().map(Vec::as_slice).collect();

            let batch = weighted_average(&views, &weights).unwrap();

            prop_assert_eq!(batch, filled(&updates, &weights).mean().unwrap());
        }

        #[test]
        fn non_finite_anywhere_is_found(
            len in 1_usize..PARALLEL_MIN + 2 * CHUNK,
            at in any::<prop::sample::Index>(),
            bad in prop_oneof![Just(f32::NAN), Just(f32::INFINITY), Just(f32::NEG_INFINITY)],
        ) {
            let mut xs = values(len, 5);
            let index = at.index(len);
            xs[index] = bad;
            let mut acc = Accumulator::new(len);

            let result = acc.add(&xs, 1.0);

            prop_assert_eq!(result, Err(AggregationError::NonFinite { index }));
            prop_assert_eq!(acc, Accumulator::new(len));
        }
    }
}
