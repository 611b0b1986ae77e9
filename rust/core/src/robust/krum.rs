//! Krum and Multi-Krum (Blanchard et al., NeurIPS 2017): score every update by the summed
//! squared distances to its `n − f − 2` nearest others; Krum picks the best update, Multi-Krum
//! averages the `m` best. Needs all `n(n−1)/2` pairwise distances: O(n²·d).

use rayon::prelude::*;

use super::{mean_into, non_finite, width, Result, RobustError};
use crate::accumulate::PARALLEL_MIN;

/// Coordinates per block of the pairwise distances: `n` rows of 256 float32 (20 KiB for n = 20)
/// stay in L1 while all pairs are compared.
const DISTANCE_BLOCK: usize = 1 << 8;

/// At most this many partial distance matrices (one per group of coordinate blocks), so the
/// partials stay small however long the model; they are summed in group order.
const DISTANCE_GROUPS: usize = 64;

/// Krum scores: for each update, the sum of squared distances to its `n − f − 2` nearest other
/// updates, in float64. Needs `n ≥ 2f + 3`.
pub fn krum_scores(updates: &[&[f32]], f: usize) -> Result<Vec<f64>> {
    let n = updates.len();
    width(updates)?;
    if n < 2 * f + 3 {
        return Err(RobustError::TooFewForKrum { n, f });
    }
    let distances = pairwise_squared_distances(updates)?;
    let nearest = n - f - 2;
    Ok((0..n)
        .map(|i| {
            let mut others: Vec<f64> = (0..n)
                .filter(|&j| j != i)
                .map(|j| distances[i * n + j])
                .collect();
            others.select_nth_unstable_by(nearest - 1, f64::total_cmp);
            // Sorted before summing, so the score does not depend on the selection's order.
            let closest = &mut others[..nearest];
            closest.sort_unstable_by(f64::total_cmp);
            closest.iter().sum()
        })
        .collect())
}

/// Krum: the index of the update with the lowest score (the first of equal ones).
pub fn krum(updates: &[&[f32]], f: usize) -> Result<usize> {
    Ok(best(&krum_scores(updates, f)?, 1)[0])
}

/// Multi-Krum: the indices of the `m` updates with the lowest Krum scores, best first (ties by
/// index); `m` defaults to `n − f`.
pub fn multi_krum_selection(updates: &[&[f32]], f: usize, m: Option<usize>) -> Result<Vec<usize>> {
    let scores = krum_scores(updates, f)?;
    let n = updates.len();
    let m = m.unwrap_or(n - f);
    if !(1..=n).contains(&m) {
        return Err(RobustError::InvalidM { m, n });
    }
    Ok(best(&scores, m))
}

/// Multi-Krum: the mean of the `m` updates with the lowest Krum scores (`m` defaults to `n − f`).
pub fn multi_krum(updates: &[&[f32]], f: usize, m: Option<usize>) -> Result<Vec<f32>> {
    let mut out = vec![0.0; width(updates)?];
    multi_krum_into(updates, f, m, &mut out)?;
    Ok(out)
}

/// [`multi_krum`] written into `out`.
pub fn multi_krum_into(
    updates: &[&[f32]],
    f: usize,
    m: Option<usize>,
    out: &mut [f32],
) -> Result<()> {
    let chosen: Vec<&[f32]> = multi_krum_selection(updates, f, m)?
        .into_iter()
        .map(|i| updates[i])
        .collect();
    mean_into(&chosen, out)
}

/// Squared Euclidean distances between all pairs of updates, as a symmetric `n×n` matrix in
/// float64 (zero diagonal). Fails on non-finite input.
///
/// Each block of [`DISTANCE_BLOCK`] coordinates is compared for all pairs while it sits in L1;
/// its squared differences are summed in float32 over 16 lanes (16 terms per lane) and the block
/// total is added in float64, which keeps float32's speed with a relative error near 1e-7. A block
/// whose float32 sum overflows (differences beyond ~1e18) is redone in float64.
pub fn pairwise_squared_distances(updates: &[&[f32]]) -> Result<Vec<f64>> {
    let d = width(updates)?;
    let n = updates.len();
    let pairs = n * (n - 1) / 2;
    let blocks = d.div_ceil(DISTANCE_BLOCK);
    let groups = blocks.clamp(1, DISTANCE_GROUPS);
    let blocks_per_group = blocks.div_ceil(groups).max(1);
    let group = |g: usize| -> Vec<f64> {
        let mut sums = vec![0.0; pairs];
        let first = g * blocks_per_group * DISTANCE_BLOCK;
        let last = ((g + 1) * blocks_per_group * DISTANCE_BLOCK).min(d);
        let mut start = first;
        while start < last {
            let end = (start + DISTANCE_BLOCK).min(last);
            let mut p = 0;
            for i in 0..n {
                let a = &updates[i][start..end];
                for b in &updates[i + 1..] {
                    sums[p] += squared_distance(a, &b[start..end]);
                    p += 1;
                }
            }
            start = end;
        }
        sums
    };
    let partials: Vec<Vec<f64>> = if n * d >= PARALLEL_MIN {
        (0..groups).into_par_iter().map(group).collect()
    } else {
        (0..groups).map(group).collect()
    };
    let mut matrix = vec![0.0; n * n];
    let mut p = 0;
    for i in 0..n {
        for j in i + 1..n {
            let total: f64 = partials.iter().map(|partial| partial[p]).sum();
            matrix[i * n + j] = total;
            matrix[j * n + i] = total;
            p += 1;
        }
    }
    if matrix.iter().any(|x| !x.is_finite()) {
        non_finite(updates)?;
    }
    Ok(matrix)
}

/// `Σ (aᵢ − bᵢ)²` over a block: float32 lanes, float64 total, float64 redo on overflow.
#[inline]
fn squared_distance(a: &[f32], b: &[f32]) -> f64 {
    const LANES: usize = 16;
    let mut lanes = [0.0_f32; LANES];
    let (a_blocks, b_blocks) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (a_tail, b_tail) = (a_blocks.remainder(), b_blocks.remainder());
    for (a, b) in a_blocks.zip(b_blocks) {
        for ((lane, &x), &y) in lanes.iter_mut().zip(a).zip(b) {
            let t = x - y;
            *lane += t * t;
        }
    }
    let mut total: f64 = lanes.iter().map(|&x| f64::from(x)).sum();
    for (&x, &y) in a_tail.iter().zip(b_tail) {
        let t = f64::from(x) - f64::from(y);
        total += t * t;
    }
    if total.is_finite() || a.iter().chain(b).any(|x| !x.is_finite()) {
        return total;
    }
    // Finite inputs whose float32 squares overflowed: redo in float64 (rare; huge values only).
    a.iter()
        .zip(b)
        .map(|(&x, &y)| (f64::from(x) - f64::from(y)).powi(2))
        .sum()
}

/// Indices of the `m` smallest scores, best first; equal scores by index.
fn best(scores: &[f64], m: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&i, &j| scores[i].total_cmp(&scores[j]).then(i.cmp(&j)));
    order.truncate(m);
    order
}

#[cfg(test)]
mod tests {
    use super::super::testing::{rows, views};
    use super::*;
    use proptest::prelude::*;

    /// Krum scores from float64 distances, sorted per update.
    fn reference_scores(rows: &[Vec<f32>], f: usize) -> Vec<f64> {
        let n = rows.len();
        let distance = |a: &[f32], b: &[f32]| -> f64 {
            a.iter()
                .zip(b)
                .map(|(&x, &y)| (f64::from(x) - f64::from(y)).powi(2))
                .sum()
        };
        (0..n)
            .map(|i| {
                let mut others: Vec<f64> = (0..n)
                    .filter(|&j| j != i)
                    .map(|j| distance(&rows[i], &rows[j]))
                    .collect();
                others.sort_by(f64::total_cmp);
                others[..n - f - 2].iter().sum()
            })
            .collect()
    }

    fn assert_close(actual: &[f64], expected: &[f64], rtol: f64) {
        assert_eq!(actual.len(), expected.len());
        for (a, e) in actual.iter().zip(expected) {
            assert!((a - e).abs() <= rtol * e.abs(), "{a} vs {e}");
        }
    }

    #[test]
    fn krum_picks_an_update_from_the_honest_cluster() {
        let mut updates = rows(7, 40, 1);
        for row in &mut updates[..5] {
            row.iter_mut().for_each(|x| *x *= 0.01);
        }
        for row in &mut updates[5..] {
            row.iter_mut().for_each(|x| *x *= -1000.0);
        }
        let updates = views(&updates);

        let chosen = krum(&updates, 2).unwrap();
        let selection = multi_krum_selection(&updates, 2, None).unwrap();

        assert!(chosen < 5);
        assert_eq!(selection.len(), 5);
        assert!(selection.iter().all(|&i| i < 5));
    }

    #[test]
    fn multi_krum_of_every_update_is_the_plain_mean() {
        let updates = rows(5, 300, 2);
        let views = views(&updates);

        let result = multi_krum(&views, 1, Some(5)).unwrap();

        let expected: Vec<f32> = (0..300)
            .map(|j| (updates.iter().map(|r| f64::from(r[j])).sum::<f64>() / 5.0) as f32)
            .collect();
        assert_eq!(result, expected);
    }

    #[test]
    fn validates_n_f_and_m() {
        let a = [1.0_f32, 2.0];
        let five = [&a[..]; 5];

        assert_eq!(
            krum(&five, 2).unwrap_err().to_string(),
            "Krum with f=2 needs n >= 2f+3 = 7 updates, got 5"
        );
        assert_eq!(
            multi_krum(&five, 1, Some(0)).unwrap_err().to_string(),
            "m must be in 1..=5, got 0"
        );
        assert_eq!(
            multi_krum(&five, 1, Some(6)),
            Err(RobustError::InvalidM { m: 6, n: 5 })
        );
        assert_eq!(krum(&[], 0), Err(RobustError::NoUpdates));
    }

    #[test]
    fn finds_non_finite_values_on_the_parallel_path() {
        let mut updates = rows(5, PARALLEL_MIN, 3);
        updates[3][PARALLEL_MIN - 1] = f32::INFINITY;

        let result = krum(&views(&updates), 1);

        assert_eq!(
            result,
            Err(RobustError::NonFinite {
                update: 3,
                index: PARALLEL_MIN - 1
            })
        );
    }

    #[test]
    fn huge_finite_differences_do_not_overflow_the_distances() {
        let big = [&[3e38_f32; 40][..], &[-3e38; 40], &[0.0; 40]];

        let scores = krum_scores(&big, 0).unwrap();

        // Each one's nearest other is at distance² 40·(3e38)²: finite in float64.
        assert_close(&scores, &[40.0 * 9e76; 3], 1e-6);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        #[test]
        fn scores_match_the_reference(
            f in 0_usize..4,
            extra in 0_usize..4,
            d in prop_oneof![1_usize..600, 3000_usize..3 * DISTANCE_BLOCK * DISTANCE_GROUPS],
            seed in any::<u64>(),
        ) {
            let n = 2 * f + 3 + extra;
            let updates = rows(n, d, seed);
            let views = views(&updates);
            let expected = reference_scores(&updates, f);

            let scores = krum_scores(&views, f).unwrap();
            let chosen = krum(&views, f).unwrap();

            assert_close(&scores, &expected, 1e-5);
            let lowest = expected.iter().copied().fold(f64::INFINITY, f64::min);
            prop_assert!(expected[chosen] <= lowest * (1.0 + 2e-5));
        }
    }
}
