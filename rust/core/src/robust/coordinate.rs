//! Coordinate-wise rules: median and trimmed mean.
//!
//! Both need the `n` values of every coordinate in order. Coordinates are processed in blocks
//! that fit L1; each block is copied out of the updates (reading every row contiguously, checking
//! for NaN and infinity on the way) and then ordered in one of two ways:
//!
//! - up to [`NETWORK_MAX`] updates, by a sorting network applied to whole rows of the block:
//!   every comparator is an elementwise min/max of two rows, branch-free and vectorized over the
//!   block's coordinates. For n = 20 that is ~10× faster than selecting per coordinate;
//! - beyond it, where the network's O(n log² n) comparators cost more than selection's O(n), the
//!   block is transposed and each coordinate's values are selected with `select_nth_unstable`.
//!
//! The network sorts fully, so the trimmed mean sums the kept values in ascending order; the
//! selection path sums them in selection order. Either way the float64 sum rounds to the same
//! float32 result except, rarely, by one ulp.

use rayon::prelude::*;

use super::{check_out, non_finite, width, Result, RobustError};
use crate::accumulate::PARALLEL_MIN;

/// Largest number of updates ordered by a sorting network; selection beyond it.
const NETWORK_MAX: usize = 256;

/// Floats per block buffer: 32 KiB, an L1 data cache.
const BLOCK_FLOATS: usize = 1 << 13;

/// Coordinates per block of the selection path (its buffer is allowed to spill to L2).
const SELECT_BLOCK: usize = 1 << 10;

/// The per-coordinate median of `updates` (all of one length); for an even count, the mean of
/// the two middle values (as `numpy.median`).
pub fn coordinate_median(updates: &[&[f32]]) -> Result<Vec<f32>> {
    let mut out = vec![0.0; width(updates)?];
    coordinate_median_into(updates, &mut out)?;
    Ok(out)
}

/// [`coordinate_median`] written into `out`.
pub fn coordinate_median_into(updates: &[&[f32]], out: &mut [f32]) -> Result<()> {
    by_coordinate(updates, out, Statistic::Median)
}

/// The per-coordinate mean after dropping the `⌊beta·n⌋` largest and smallest values;
/// `beta` in [0, 1/2) (0 is the plain mean).
pub fn trimmed_mean(updates: &[&[f32]], beta: f64) -> Result<Vec<f32>> {
    let mut out = vec![0.0; width(updates)?];
    trimmed_mean_into(updates, beta, &mut out)?;
    Ok(out)
}

/// [`trimmed_mean`] written into `out`.
pub fn trimmed_mean_into(updates: &[&[f32]], beta: f64, out: &mut [f32]) -> Result<()> {
    if !(0.0..0.5).contains(&beta) {
        return Err(RobustError::InvalidBeta(beta));
    }
    // β < 1/2 keeps n − 2k ≥ 1.
    let k = (beta * updates.len() as f64).floor() as usize;
    by_coordinate(updates, out, Statistic::Trimmed(k))
}

/// What to compute from each coordinate's ordered values.
#[derive(Clone, Copy)]
enum Statistic {
    Median,
    /// The mean without the `k` smallest and `k` largest.
    Trimmed(usize),
}

impl Statistic {
    /// From a block sorted row-wise: `rows[i·w .. (i+1)·w]` holds the i-th smallest value of
    /// each of the block's `w` coordinates.
    fn of_sorted_rows(self, rows: &[f32], n: usize, sums: &mut [f64], out: &mut [f32]) {
        let w = out.len();
        let row = |i: usize| &rows[i * w..(i + 1) * w];
        match self {
            Self::Median if n % 2 == 1 => out.copy_from_slice(row(n / 2)),
            Self::Median => {
                for ((o, &a), &b) in out.iter_mut().zip(row(n / 2 - 1)).zip(row(n / 2)) {
                    *o = ((f64::from(a) + f64::from(b)) / 2.0) as f32;
                }
            }
            Self::Trimmed(k) => {
                let sums = &mut sums[..w];
                sums.fill(0.0);
                for i in k..n - k {
                    for (s, &x) in sums.iter_mut().zip(row(i)) {
                        *s += f64::from(x);
                    }
                }
                let kept = (n - 2 * k) as f64;
                for (o, &s) in out.iter_mut().zip(sums.iter()) {
                    *o = (s / kept) as f32;
                }
            }
        }
    }

    /// From one coordinate's values, in any order (reordered here).
    fn of_values(self, values: &mut [f32]) -> f32 {
        let n = values.len();
        match self {
            Self::Median => {
                let (lower, &mut upper, _) = values.select_nth_unstable_by(n / 2, f32::total_cmp);
                if n % 2 == 1 {
                    return upper;
                }
                // The largest value below the upper middle is the lower middle.
                let below = lower.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                ((f64::from(below) + f64::from(upper)) / 2.0) as f32
            }
            Self::Trimmed(k) => {
                let kept = if k == 0 {
                    &values[..]
                } else {
                    values.select_nth_unstable_by(k, f32::total_cmp);
                    let rest = &mut values[k..];
                    rest.select_nth_unstable_by(n - 2 * k, f32::total_cmp);
                    &rest[..n - 2 * k]
                };
                let sum: f64 = kept.iter().map(|&x| f64::from(x)).sum();
                (sum / kept.len() as f64) as f32
            }
        }
    }
}

/// Computes `statistic` for every coordinate into `out`, block by block (in parallel for large
/// inputs); fails on ragged or non-finite updates.
fn by_coordinate(updates: &[&[f32]], out: &mut [f32], statistic: Statistic) -> Result<()> {
    let d = width(updates)?;
    check_out(out, d)?;
    let n = updates.len();
    let network = (n <= NETWORK_MAX).then(|| {
        let needed = match statistic {
            Statistic::Median => (n - 1) / 2..n / 2 + 1,
            Statistic::Trimmed(k) => k..n - k,
        };
        pruned(sorting_network(n), needed)
    });
    let block_width = match network {
        // Multiples of 16 keep the rows aligned for vector loads.
        Some(_) => (BLOCK_FLOATS / n / 16 * 16).max(16),
        None => SELECT_BLOCK,
    };
    // Each block reports whether it saw a non-finite value (and then skips computing).
    let block = |buffers: &mut (Vec<f32>, Vec<f64>), (b, out): (usize, &mut [f32])| -> bool {
        let (buffer, sums) = buffers;
        let (start, w) = (b * block_width, out.len());
        let buffer = &mut buffer[..n * w];
        let mut finite = true;
        for (i, row) in updates.iter().enumerate() {
            let row = &row[start..start + w];
            finite &= row.iter().fold(true, |ok, x| ok & x.is_finite());
            match network {
                Some(_) => buffer[i * w..(i + 1) * w].copy_from_slice(row),
                None => {
                    for (j, &x) in row.iter().enumerate() {
                        buffer[j * n + i] = x;
                    }
                }
            }
        }
        if !finite {
            return true;
        }
        match &network {
            Some(comparators) => {
                sort_rows(buffer, w, comparators);
                statistic.of_sorted_rows(buffer, n, sums, out);
            }
            None => {
                for (o, values) in out.iter_mut().zip(buffer.chunks_exact_mut(n)) {
                    *o = statistic.of_values(values);
                }
            }
        }
        false
    };
    let buffers = || (vec![0.0_f32; n * block_width], vec![0.0_f64; block_width]);
    let bad = if n * d >= PARALLEL_MIN {
        out.par_chunks_mut(block_width)
            .enumerate()
            .map_init(buffers, block)
            .any(|bad| bad)
    } else {
        let mut buffers = buffers();
        out.chunks_mut(block_width)
            .enumerate()
            .any(|item| block(&mut buffers, item))
    };
    if bad {
        non_finite(updates)?;
    }
    Ok(())
}

/// Batcher's merge-exchange sorting network for `n` inputs (Knuth, TAOCP vol. 3, §5.2.2,
/// Algorithm M): comparators `(i, j)`, `i < j`, that sort when applied in order. Works for any
/// `n`, with about `n/4 · log₂²n` comparators (93 for n = 20).
fn sorting_network(n: usize) -> Vec<(usize, usize)> {
    let mut comparators = Vec::new();
    if n < 2 {
        return comparators;
    }
    let top = 1 << (usize::BITS - (n - 1).leading_zeros() - 1); // 2^(⌈log₂ n⌉ − 1)
    let mut p = top;
    while p > 0 {
        let (mut q, mut r, mut d) = (top, 0, p);
        loop {
            comparators.extend((0..n - d).filter(|i| i & p == r).map(|i| (i, i + d)));
            if q == p {
                break;
            }
            (d, q, r) = (q - p, q / 2, p);
        }
        p /= 2;
    }
    comparators
}

/// The comparators of `network` that can change what ends up at the `needed` positions: going
/// backwards, a comparator matters if it touches a position that matters, and then both its
/// inputs matter. (For the median of 20, 64 of 93 comparators remain.)
fn pruned(network: Vec<(usize, usize)>, needed: std::ops::Range<usize>) -> Vec<(usize, usize)> {
    let mut matters: Vec<bool> = (0..=network.iter().map(|&(_, j)| j).max().unwrap_or(0))
        .map(|i| needed.contains(&i))
        .collect();
    let mut kept: Vec<(usize, usize)> = network
        .into_iter()
        .rev()
        .filter(|&(i, j)| {
            let keep = matters[i] || matters[j];
            if keep {
                (matters[i], matters[j]) = (true, true);
            }
            keep
        })
        .collect();
    kept.reverse();
    kept
}

/// Sorts each column of `rows` (row-major, `w` columns) by applying `comparators` to whole rows.
fn sort_rows(rows: &mut [f32], w: usize, comparators: &[(usize, usize)]) {
    /// Columns per step: two SSE (or one AVX) register's worth, written out as fixed-size
    /// arrays so the compiler emits packed compares and blends instead of a branch per value.
    const LANES: usize = 8;
    for &(i, j) in comparators {
        let (head, tail) = rows.split_at_mut(j * w);
        let (low, high) = (&mut head[i * w..(i + 1) * w], &mut tail[..w]);
        let mut lows = low.chunks_exact_mut(LANES);
        let mut highs = high.chunks_exact_mut(LANES);
        for (a, b) in (&mut lows).zip(&mut highs) {
            let (mut x, mut y) = ([0.0_f32; LANES], [0.0_f32; LANES]);
            x.copy_from_slice(a);
            y.copy_from_slice(b);
            let mut min = [0.0_f32; LANES];
            let mut max = [0.0_f32; LANES];
            for k in 0..LANES {
                // Plain comparisons (not f32::min/max, whose NaN handling costs extra
                // instructions); the values are finite here.
                min[k] = if y[k] < x[k] { y[k] } else { x[k] }; // minps
                max[k] = if x[k] > y[k] { x[k] } else { y[k] }; // maxps
            }
            a.copy_from_slice(&min);
            b.copy_from_slice(&max);
        }
        for (a, b) in lows.into_remainder().iter_mut().zip(highs.into_remainder()) {
            if *b < *a {
                std::mem::swap(a, b);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{rows, views};
    use super::*;
    use proptest::prelude::*;

    /// The plain definitions: sort every coordinate's values.
    fn sorted_column(rows: &[Vec<f32>], j: usize) -> Vec<f64> {
        let mut column: Vec<f64> = rows.iter().map(|r| f64::from(r[j])).collect();
        column.sort_by(f64::total_cmp);
        column
    }

    fn reference_median(rows: &[Vec<f32>]) -> Vec<f32> {
        let n = rows.len();
        (0..rows[0].len())
            .map(|j| {
                let c = sorted_column(rows, j);
                let median = if n % 2 == 1 {
                    c[n / 2]
                } else {
                    (c[n / 2 - 1] + c[n / 2]) / 2.0
                };
                median as f32
            })
            .collect()
    }

    fn reference_trimmed(rows: &[Vec<f32>], k: usize) -> Vec<f32> {
        let n = rows.len();
        (0..rows[0].len())
            .map(|j| {
                let c = sorted_column(rows, j);
                (c[k..n - k].iter().sum::<f64>() / (n - 2 * k) as f64) as f32
            })
            .collect()
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        let odd = [&[3.0_f32, -1.0][..], &[1.0, -5.0], &[2.0, 7.0]];
        let even = [&[4.0_f32][..], &[1.0], &[3.0], &[2.0]];

        assert_eq!(coordinate_median(&odd), Ok(vec![2.0, -1.0]));
        assert_eq!(coordinate_median(&even), Ok(vec![2.5]));
    }

    #[test]
    fn trimmed_mean_drops_the_extremes() {
        let updates = [&[1.0_f32][..], &[2.0], &[3.0], &[100.0], &[-100.0]];

        assert_eq!(trimmed_mean(&updates, 0.2), Ok(vec![2.0]));
        assert_eq!(trimmed_mean(&updates, 0.0), Ok(vec![1.2]));
    }

    #[test]
    fn the_network_sorts_every_input_of_zeros_and_ones() {
        // The 0-1 principle: a comparator network sorts everything if it sorts all 2ⁿ
        // sequences of zeros and ones.
        for n in 1..=12 {
            let comparators = sorting_network(n);
            for bits in 0..1_u32 << n {
                let mut values: Vec<f32> = (0..n).map(|i| ((bits >> i) & 1) as f32).collect();

                sort_rows(&mut values, 1, &comparators);

                assert!(values.is_sorted(), "n={n}, input {bits:b}");
            }
        }
    }

    #[test]
    fn pruned_networks_still_place_the_needed_values() {
        for n in 1..=12 {
            let needed = (n - 1) / 2..n / 2 + 1;
            let comparators = pruned(sorting_network(n), needed.clone());
            for bits in 0..1_u32 << n {
                let mut values: Vec<f32> = (0..n).map(|i| ((bits >> i) & 1) as f32).collect();
                let mut sorted = values.clone();
                sorted.sort_by(f32::total_cmp);

                sort_rows(&mut values, 1, &comparators);

                assert_eq!(values[needed.clone()], sorted[needed.clone()], "n={n}");
            }
        }
    }

    #[test]
    fn rejects_beta_out_of_range_and_non_finite_values() {
        let a = [1.0_f32, 2.0];
        let nan = [1.0_f32, f32::NAN];
        let many: Vec<&[f32]> = vec![&a[..]; NETWORK_MAX + 1];
        let mut poisoned = many.clone();
        poisoned[NETWORK_MAX] = &nan;

        assert_eq!(
            trimmed_mean(&[&a[..]; 5], 0.5).unwrap_err().to_string(),
            "beta must be in [0, 0.5), got 0.5"
        );
        assert_eq!(
            trimmed_mean(&[&a[..]; 5], f64::NAN)
                .unwrap_err()
                .to_string(),
            "beta must be in [0, 0.5), got nan"
        );
        assert_eq!(
            coordinate_median(&[&a[..], &nan[..]])
                .unwrap_err()
                .to_string(),
            "updates[1] contains non-finite values (first at index 1)"
        );
        assert_eq!(
            coordinate_median(&poisoned),
            Err(RobustError::NonFinite {
                update: NETWORK_MAX,
                index: 1
            })
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        #[test]
        fn median_and_trimmed_mean_match_the_reference(
            (n, d) in prop_oneof![
                // Few updates, short and long enough for the parallel path.
                (1_usize..24, prop_oneof![1_usize..1200, PARALLEL_MIN / 16..PARALLEL_MIN / 8]),
                // Both sides of the network limit; 400 × 260 also takes the parallel path.
                (NETWORK_MAX - 2..NETWORK_MAX + 4, 1_usize..400),
            ],
            beta in 0.0_f64..0.5,
            seed in any::<u64>(),
        ) {
            let updates = rows(n, d, seed);
            let views = views(&updates);
            let k = (beta * n as f64).floor() as usize;

            let median = coordinate_median(&views).unwrap();
            let trimmed = trimmed_mean(&views, beta).unwrap();

            prop_assert_eq!(median, reference_median(&updates));
            let expected = reference_trimmed(&updates, k);
            if n <= NETWORK_MAX {
                // Sorted like the reference, so summed in the same order.
                prop_assert_eq!(trimmed, expected);
            } else {
                // Summed in selection order: allow one float32 ulp and float64 rounding at 0.
                for (t, e) in trimmed.iter().zip(&expected) {
                    prop_assert!((t - e).abs() <= f32::EPSILON * e.abs() + 1e-12);
                }
            }
        }
    }
}
