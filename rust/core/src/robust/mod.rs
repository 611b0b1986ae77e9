//! Byzantine-robust aggregation rules over `n` updates of `d` parameters each.
//!
//! Unlike the streaming [`Accumulator`](crate::accumulate::Accumulator), these rules need every
//! update of a round at once (`n·d` float32 values), so they suit synchronous rounds and FedBuff
//! with a large enough buffer, not FedAsync.
//!
//! - [`coordinate_median`]: per-coordinate median (the mean of the two middle values when `n` is
//!   even, as `numpy.median`).
//! - [`trimmed_mean`]: per coordinate, drop the `⌊β·n⌋` largest and smallest values and average
//!   the rest (`⌊β·n⌋` computed in float64, as `scipy.stats.trim_mean`).
//! - [`krum`], [`multi_krum`]: score each update by the summed squared distances to its
//!   `n − f − 2` nearest others; Krum picks the best, Multi-Krum averages the `m` best.
//! - [`clip_by_norm`]: scale an update by `min(1, M/‖u‖)`.
//!
//! Updates are borrowed as a slice of equally long rows (`&[&[f32]]`): the rows of a C-contiguous
//! 2-D array or separate 1-D arrays, without copying. Results are computed in float64 and rounded
//! once to float32, except that squared differences and squares (Krum, the norm) are summed in
//! float32 over runs of at most 16 terms before float64 takes over. Everything is deterministic: the work is split by the data's shape only,
//! never by the number of threads, and partial sums are added in a fixed order.
//!
//! Inputs with NaN or infinity are rejected. Median and trimmed mean check for them while
//! gathering the values they read anyway, Krum through its distances (NaN and infinity
//! propagate), so the happy path reads every update once.
//!
//! Files: `coordinate` (median, trimmed mean), `krum` (Krum, Multi-Krum); clipping and the
//! shared validation here.

use rayon::prelude::*;
use thiserror::Error;

use crate::accumulate::{first_non_finite, PARALLEL_MIN};

mod coordinate;
mod krum;

pub use coordinate::{coordinate_median, coordinate_median_into, trimmed_mean, trimmed_mean_into};
pub use krum::{
    krum, krum_scores, multi_krum, multi_krum_into, multi_krum_selection,
    pairwise_squared_distances,
};

/// Values per parallel chunk of the mean, the norm and the scaling.
const CHUNK: usize = 1 << 14;

/// Everything that can go wrong in a robust rule. The bindings turn it into a Python exception
/// (with their own input errors) in one place.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum RobustError {
    /// A rule called with no updates.
    #[error("robust rules need at least one update")]
    NoUpdates,

    /// Updates of different lengths.
    #[error("updates[{index}] has {got} values, updates[0] has {expected}")]
    Ragged {
        index: usize,
        got: usize,
        expected: usize,
    },

    /// An update with NaN or infinity in it.
    #[error("updates[{update}] contains non-finite values (first at index {index})")]
    NonFinite { update: usize, index: usize },

    /// The single update given to [`clip_by_norm`] has NaN or infinity in it.
    #[error("update contains non-finite values (first at index {index})")]
    NonFiniteUpdate { index: usize },

    /// A trimming fraction outside [0, 1/2).
    #[error("beta must be in [0, 0.5), got {}", py_float(*.0))]
    InvalidBeta(f64),

    /// Too few updates for Krum to tolerate `f` Byzantine ones.
    #[error("Krum with f={f} needs n >= 2f+3 = {} updates, got {n}", 2 * f + 3)]
    TooFewForKrum { n: usize, f: usize },

    /// A Multi-Krum selection size outside 1..=n.
    #[error("m must be in 1..={n}, got {m}")]
    InvalidM { m: usize, n: usize },

    /// A clipping norm that is not finite and > 0.
    #[error("max_norm must be finite and > 0, got {}", py_float(*.0))]
    InvalidMaxNorm(f64),

    /// An output buffer of the wrong length (a bug in the caller).
    #[error("output has {got} values, expected {expected}")]
    OutputLength { got: usize, expected: usize },
}

/// Result alias of this module.
pub type Result<T> = std::result::Result<T, RobustError>;

/// `update · min(1, max_norm/‖update‖)`: the update itself when its Euclidean norm is at most
/// `max_norm`, else scaled down to that norm.
pub fn clip_by_norm(update: &[f32], max_norm: f64) -> Result<Vec<f32>> {
    let mut out = vec![0.0; update.len()];
    clip_by_norm_into(update, max_norm, &mut out)?;
    Ok(out)
}

/// [`clip_by_norm`] written into `out`; returns the factor applied (1 when not clipped).
pub fn clip_by_norm_into(update: &[f32], max_norm: f64, out: &mut [f32]) -> Result<f64> {
    if !(max_norm.is_finite() && max_norm > 0.0) {
        return Err(RobustError::InvalidMaxNorm(max_norm));
    }
    check_out(out, update.len())?;
    // Partial sums per fixed chunk, added in order: deterministic whatever the thread count.
    let squares = |c: &[f32]| -> f64 { c.chunks(256).map(sum_of_squares).sum() };
    let partials: Vec<f64> = if update.len() >= PARALLEL_MIN {
        update.par_chunks(CHUNK).map(squares).collect()
    } else {
        update.chunks(CHUNK).map(squares).collect()
    };
    let norm = partials.iter().sum::<f64>().sqrt();
    if !norm.is_finite() {
        // Squares of finite float32 cannot overflow float64: a value is NaN or infinite.
        let index = first_non_finite(update).unwrap_or(0);
        return Err(RobustError::NonFiniteUpdate { index });
    }
    let scale = if norm > max_norm {
        max_norm / norm
    } else {
        1.0
    };
    let kernel = |(out, update): (&mut [f32], &[f32])| {
        for (o, &x) in out.iter_mut().zip(update) {
            *o = (f64::from(x) * scale) as f32;
        }
    };
    if update.len() >= PARALLEL_MIN {
        out.par_chunks_mut(CHUNK)
            .zip(update.par_chunks(CHUNK))
            .for_each(kernel);
    } else {
        kernel((out, update));
    }
    Ok(scale)
}

/// `Σ x²` of a short block (≤ 256 values): squares summed in float32 over 16 lanes (at most 16
/// terms each, so the relative error stays near 1e-7) and the lanes in float64; four times the
/// speed of float64 arithmetic. A block whose float32 squares overflow (values beyond ~1e18) is
/// redone in float64; NaN and infinity stay non-finite.
fn sum_of_squares(block: &[f32]) -> f64 {
    const LANES: usize = 16;
    let mut lanes = [0.0_f32; LANES];
    let values = block.chunks_exact(LANES);
    let tail: f64 = values
        .remainder()
        .iter()
        .map(|&x| f64::from(x).powi(2))
        .sum();
    for values in values {
        for (lane, &x) in lanes.iter_mut().zip(values) {
            *lane += x * x;
        }
    }
    let total = lanes.iter().map(|&x| f64::from(x)).sum::<f64>() + tail;
    if total.is_finite() {
        total
    } else {
        block.iter().map(|&x| f64::from(x).powi(2)).sum()
    }
}

/// The common length of the updates, after checking there is at least one and none is ragged.
fn width(updates: &[&[f32]]) -> Result<usize> {
    let expected = updates.first().ok_or(RobustError::NoUpdates)?.len();
    match updates.iter().position(|u| u.len() != expected) {
        Some(index) => Err(RobustError::Ragged {
            index,
            got: updates[index].len(),
            expected,
        }),
        None => Ok(expected),
    }
}

fn check_out(out: &[f32], expected: usize) -> Result<()> {
    if out.len() == expected {
        Ok(())
    } else {
        Err(RobustError::OutputLength {
            got: out.len(),
            expected,
        })
    }
}

/// The first NaN or infinity among `updates`, as an error.
fn non_finite(updates: &[&[f32]]) -> Result<()> {
    for (update, values) in updates.iter().enumerate() {
        if let Some(index) = first_non_finite(values) {
            return Err(RobustError::NonFinite { update, index });
        }
    }
    Ok(())
}

/// The plain mean of equally long rows, summed in float64 in row order, into `out`. Divides
/// (rather than multiplying by `1/n`) so it matches [`trimmed_mean`] with β = 0 bit for bit.
fn mean_into(rows: &[&[f32]], out: &mut [f32]) -> Result<()> {
    let d = width(rows)?;
    check_out(out, d)?;
    let count = rows.len() as f64;
    let kernel = |sums: &mut Vec<f64>, (c, out): (usize, &mut [f32])| {
        let start = c * CHUNK;
        let sums = &mut sums[..out.len()];
        sums.fill(0.0);
        for row in rows {
            for (s, &x) in sums.iter_mut().zip(&row[start..start + out.len()]) {
                *s += f64::from(x);
            }
        }
        for (o, &s) in out.iter_mut().zip(sums.iter()) {
            *o = (s / count) as f32;
        }
    };
    if rows.len() * d >= PARALLEL_MIN {
        out.par_chunks_mut(CHUNK)
            .enumerate()
            .for_each_init(|| vec![0.0; CHUNK], kernel);
    } else {
        let mut sums = vec![0.0; CHUNK.min(d)];
        out.chunks_mut(CHUNK)
            .enumerate()
            .for_each(|item| kernel(&mut sums, item));
    }
    Ok(())
}

/// Formats a float as Python's `repr` would for the common cases (`nan`, `inf`, `0.5`).
fn py_float(x: f64) -> String {
    match x {
        x if x.is_nan() => "nan".into(),
        x if x.is_infinite() => (if x > 0.0 { "inf" } else { "-inf" }).into(),
        x => format!("{x:?}"),
    }
}

/// Deterministic test data shared by the rule files.
#[cfg(test)]
mod testing {
    /// Pseudo-random values in [-8, 8) (xorshift64*): cheap to make, and proptest shrinks the
    /// seed rather than a long vector.
    pub fn values(len: usize, seed: u64) -> Vec<f32> {
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

    /// `n` updates of `d` values.
    pub fn rows(n: usize, d: usize, seed: u64) -> Vec<Vec<f32>> {
        (0..n)
            .map(|i| values(d, seed.wrapping_add(i as u64)))
            .collect()
    }

    pub fn views(rows: &[Vec<f32>]) -> Vec<&[f32]> {
        rows.iter().map(Vec::as_slice).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{rows, values, views};
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn clip_scales_long_updates_to_the_max_norm_only() {
        let update = [3.0_f32, 4.0];

        assert_eq!(clip_by_norm(&update, 10.0), Ok(vec![3.0, 4.0]));
        assert_eq!(clip_by_norm(&update, 1.0), Ok(vec![0.6, 0.8]));
        assert_eq!(clip_by_norm(&[0.0; 3], 1.0), Ok(vec![0.0; 3]));
        // 3e38² overflows float32 but not the float64 norm: 3e38·√20 scaled to 3e38.
        let big = clip_by_norm(&[3e38; 20], 3e38).unwrap();
        assert!((big[0] - 3e38 / 20_f32.sqrt()).abs() <= 1e-6 * big[0]);
    }

    #[test]
    fn clip_validates_its_inputs() {
        let nan = [1.0_f32, f32::NAN];

        assert_eq!(
            clip_by_norm(&[1.0], 0.0).unwrap_err().to_string(),
            "max_norm must be finite and > 0, got 0.0"
        );
        assert_eq!(
            clip_by_norm(&[1.0], f64::INFINITY),
            Err(RobustError::InvalidMaxNorm(f64::INFINITY))
        );
        assert_eq!(
            clip_by_norm(&nan, 1.0).unwrap_err().to_string(),
            "update contains non-finite values (first at index 1)"
        );
    }

    #[test]
    fn every_rule_rejects_no_updates_and_ragged_ones() {
        let (a, short) = ([1.0_f32, 2.0], [1.0_f32]);
        let ragged = [&a[..], &a[..], &short[..]];

        assert_eq!(coordinate_median(&[]), Err(RobustError::NoUpdates));
        assert_eq!(trimmed_mean(&[], 0.1), Err(RobustError::NoUpdates));
        assert_eq!(multi_krum(&[], 0, None), Err(RobustError::NoUpdates));
        assert_eq!(
            trimmed_mean(&ragged, 0.1).unwrap_err().to_string(),
            "updates[2] has 1 values, updates[0] has 2"
        );
        assert!(matches!(
            krum_scores(&ragged, 0),
            Err(RobustError::Ragged { index: 2, .. })
        ));
    }

    #[test]
    fn results_do_not_depend_on_the_number_of_threads() {
        let updates = rows(9, PARALLEL_MIN + 3 * CHUNK + 5, 4);
        let views = views(&updates);
        let run = || {
            (
                coordinate_median(&views).unwrap(),
                trimmed_mean(&views, 0.25).unwrap(),
                krum_scores(&views, 2).unwrap(),
                multi_krum(&views, 2, None).unwrap(),
                clip_by_norm(views[0], 1.0).unwrap(),
            )
        };
        let single = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();

        let parallel = run();

        assert_eq!(single.install(run), parallel);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        #[test]
        fn clip_matches_the_reference(
            d in prop_oneof![1_usize..300, PARALLEL_MIN..PARALLEL_MIN + CHUNK],
            max_norm in 1e-3_f64..1e4,
            seed in any::<u64>(),
        ) {
            let update = values(d, seed);
            let norm = update.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt();
            let scale = (max_norm / norm).min(1.0);

            let clipped = clip_by_norm(&update, max_norm).unwrap();

            let expected: Vec<f32> = update.iter().map(|&x| (f64::from(x) * scale) as f32).collect();
            for (c, e) in clipped.iter().zip(&expected) {
                prop_assert!((c - e).abs() <= 2.0 * f32::EPSILON * e.abs());
            }
        }
    }
}
