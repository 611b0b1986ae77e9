//! The controller's side: a running weighted sum of ciphertexts, computed without any key.

use rayon::prelude::*;

use super::format::{self, word};
use super::{HeContext, HeError, Result};

/// sum_i w_i * E(x_i) over learners' ciphertext lists, with integer weights w_i. Holds no
/// secret: adding and scaling ciphertexts needs only the public moduli. The sum is kept as the
/// ciphertexts' NTT coefficients and updated straight from the received bytes (modular add, and
/// a Shoup multiplication for weights above 1), so memory is one ciphertext list however many
/// updates are added (streaming, like `Accumulator`).
#[derive(Debug, Clone)]
pub struct CipherSum {
    ctx: HeContext,
    /// Per ciphertext, its coefficients: polynomial, modulus, coefficient.
    sums: Vec<Vec<u64>>,
    /// Sum of the weights added (the divisor of the weighted average).
    pub total_weight: u64,
    /// Updates (or partial sums' updates) added.
    pub count: u64,
}

impl CipherSum {
    /// An empty sum under `ctx`'s parameters.
    pub fn new(ctx: HeContext) -> Self {
        Self {
            ctx,
            sums: Vec::new(),
            total_weight: 0,
            count: 0,
        }
    }

    /// Ciphertexts in the sum (0 until the first add).
    pub fn len(&self) -> usize {
        self.sums.len()
    }

    /// Whether nothing was added yet.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Add one update's ciphertexts times `weight`. Every ciphertext is checked first (length,
    /// every coefficient below its modulus), so an error leaves the sum unchanged.
    pub fn add(&mut self, ciphertexts: &[&[u8]], weight: u64) -> Result<()> {
        self.add_weighted(ciphertexts, weight, weight, 1)
    }

    /// Add another process's partial sum (its ciphertexts already weighted), with the total
    /// weight and count it carries: sums add exactly.
    pub fn add_partial(
        &mut self,
        ciphertexts: &[&[u8]],
        total_weight: u64,
        count: u64,
    ) -> Result<()> {
        self.add_weighted(ciphertexts, 1, total_weight, count)
    }

    fn add_weighted(
        &mut self,
        ciphertexts: &[&[u8]],
        factor: u64,
        weight: u64,
        count: u64,
    ) -> Result<()> {
        if weight == 0 || factor == 0 {
            return Err(HeError::ZeroWeight);
        }
        let limit = self.ctx.settings.max_total_weight;
        let total = self.total_weight.saturating_add(weight);
        if total > limit {
            return Err(HeError::WeightOverflow {
                weight,
                total,
                limit,
            });
        }
        if !self.sums.is_empty() && ciphertexts.len() != self.sums.len() {
            return Err(HeError::CiphertextCount {
                what: "the update",
                got: ciphertexts.len(),
                expected: self.sums.len(),
            });
        }
        let params = &self.ctx.params;
        let (moduli, degree) = (params.moduli(), params.degree());
        let limbs = format::ciphertext_bytes(params).saturating_sub(format::MAGIC.len()) / 8;
        let fresh = self.sums.is_empty();
        if fresh {
            self.sums = vec![vec![0u64; limbs]; ciphertexts.len()];
        }
        let shoup: Vec<(u64, u64, u64)> = moduli
            .iter()
            .map(|&q| {
                let w = factor % q;
                (q, w, (((w as u128) << 64) / q as u128) as u64)
            })
            .collect();
        let fold = |sum: &mut Vec<u64>, body: &[u8], undo: bool| {
            for (row, (out, limbs)) in sum
                .chunks_exact_mut(degree)
                .zip(body.chunks_exact(degree * 8))
                .enumerate()
            {
                let (q, w, w_shoup) = shoup[row % moduli.len()];
                add_row(out, limbs, q, (factor != 1).then_some((w, w_shoup)), undo);
            }
        };
        // One pass from memory: each ciphertext is checked (131 KB, then in cache) and added at
        // once; if any is malformed, the ones already added are taken out again.
        let added: Vec<Result<&[u8]>> = self
            .sums
            .par_iter_mut()
            .zip(ciphertexts.par_iter())
            .map(|(sum, bytes)| {
                let body = format::limbs(bytes, params)?;
                fold(sum, body, false);
                Ok(body)
            })
            .collect();
        if let Some(Err(error)) = added.iter().find(|r| r.is_err()) {
            let error = error.clone();
            if fresh {
                self.sums.clear();
            } else {
                self.sums
                    .par_iter_mut()
                    .zip(added.par_iter())
                    .for_each(|(sum, body)| {
                        if let Ok(body) = body {
                            fold(sum, body, true);
                        }
                    });
            }
            return Err(error);
        }
        self.total_weight = total;
        self.count += count;
        Ok(())
    }

    /// The sum's ciphertexts in the wire format (what learners decrypt, or a worker forwards).
    pub fn to_bytes(&self) -> Vec<Vec<u8>> {
        self.sums
            .par_iter()
            .map(|limbs| {
                let mut out = Vec::with_capacity(4 + limbs.len() * 8);
                out.extend_from_slice(format::MAGIC);
                out.extend(limbs.iter().flat_map(|c| c.to_le_bytes()));
                out
            })
            .collect()
    }

    /// Empty the sum (after a commit).
    pub fn reset(&mut self) {
        self.sums.clear();
        self.total_weight = 0;
        self.count = 0;
    }
}

/// out = (out + w * c) mod q for one modulus' row (out - w * c with `undo`), c read from
/// little-endian bytes (each already checked below q); `weight` is (w mod q, its Shoup
/// constant), None for w = 1.
fn add_row(out: &mut [u64], limbs: &[u8], q: u64, weight: Option<(u64, u64)>, undo: bool) {
    let reduce = |x: u64| if x >= q { x - q } else { x };
    let values = limbs.chunks_exact(8).map(|c| u64::from_le_bytes(word(c)));
    let product = |c: u64| match weight {
        None => c,
        Some((w, w_shoup)) => {
            let quotient = ((c as u128 * w_shoup as u128) >> 64) as u64;
            reduce(c.wrapping_mul(w).wrapping_sub(quotient.wrapping_mul(q)))
        }
    };
    if undo {
        out.iter_mut()
            .zip(values)
            .for_each(|(s, c)| *s = reduce(*s + (q - product(c))));
    } else {
        out.iter_mut()
            .zip(values)
            .for_each(|(s, c)| *s = reduce(*s + product(c)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::he::HeSettings;

    fn refs(lists: &[Vec<u8>]) -> Vec<&[u8]> {
        lists.iter().map(Vec::as_slice).collect()
    }

    #[test]
    fn the_decrypted_weighted_sum_is_the_weighted_average() {
        let ctx = HeContext::new(HeSettings::default()).unwrap();
        let (secret, public) = ctx.generate_keys();
        let a: Vec<f32> = (0..5000).map(|i| (i % 7) as f32 * 0.25 - 0.5).collect();
        let b: Vec<f32> = (0..5000).map(|i| -((i % 5) as f32) * 0.125).collect();
        let mut sum = CipherSum::new(ctx.clone());

        sum.add(&refs(&ctx.encrypt(&public, &a).unwrap()), 3)
            .unwrap();
        sum.add(&refs(&ctx.encrypt(&public, &b).unwrap()), 1)
            .unwrap();
        let out = ctx
            .decrypt(
                &secret,
                &refs(&sum.to_bytes()),
                5000,
                sum.total_weight as f64,
            )
            .unwrap();

        // multiples of 1/8 are exact in fixed point: the average is exact too
        for i in 0..5000 {
            assert_eq!(out[i], (3.0 * a[i] + b[i]) / 4.0, "index {i}");
        }
        assert_eq!((sum.total_weight, sum.count), (4, 2));
    }

    #[test]
    fn partial_sums_add_up_to_the_whole() {
        let ctx = HeContext::new(HeSettings::default()).unwrap();
        let (secret, public) = ctx.generate_keys();
        let updates: Vec<Vec<Vec<u8>>> = (0..4)
            .map(|k| ctx.encrypt(&public, &vec![k as f32 * 0.5; 100]).unwrap())
            .collect();
        let mut whole = CipherSum::new(ctx.clone());
        let (mut left, mut right) = (CipherSum::new(ctx.clone()), CipherSum::new(ctx.clone()));
        for (k, update) in updates.iter().enumerate() {
            whole.add(&refs(update), 2).unwrap();
            let half = if k < 2 { &mut left } else { &mut right };
            half.add(&refs(update), 2).unwrap();
        }
        let mut merged = CipherSum::new(ctx.clone());

        merged
            .add_partial(&refs(&left.to_bytes()), left.total_weight, left.count)
            .unwrap();
        merged
            .add_partial(&refs(&right.to_bytes()), right.total_weight, right.count)
            .unwrap();

        let decrypt = |s: &CipherSum| {
            ctx.decrypt(&secret, &refs(&s.to_bytes()), 100, 1.0)
                .unwrap()
        };
        assert_eq!(decrypt(&merged), decrypt(&whole));
        assert_eq!((merged.total_weight, merged.count), (8, 4));
    }

    #[test]
    fn a_weight_beyond_the_limit_leaves_the_sum_unchanged() {
        let ctx = HeContext::new(HeSettings::default()).unwrap();
        let (_, public) = ctx.generate_keys();
        let update = ctx.encrypt(&public, &[1.0; 10]).unwrap();
        let mut sum = CipherSum::new(ctx);
        sum.add(&refs(&update), 1).unwrap();
        let before = sum.to_bytes();

        let error = sum.add(&refs(&update), 1 << 20).unwrap_err();

        assert!(matches!(error, HeError::WeightOverflow { .. }));
        assert_eq!((sum.total_weight, sum.to_bytes()), (1, before));
    }

    #[test]
    fn a_malformed_ciphertext_leaves_the_sum_unchanged() {
        let ctx = HeContext::new(HeSettings::default()).unwrap();
        let (_, public) = ctx.generate_keys();
        let update = ctx.encrypt(&public, &[1.0; 5000]).unwrap();
        let mut sum = CipherSum::new(ctx);
        sum.add(&refs(&update), 1).unwrap();

        let before = sum.to_bytes();

        let error = sum.add(&[update[0].as_slice(), b"garbage"], 3).unwrap_err();

        assert!(matches!(error, HeError::Malformed { .. }));
        assert_eq!((sum.total_weight, sum.count), (1, 1));
        assert_eq!(sum.to_bytes(), before); // the first ciphertext was added, then taken out
    }

    #[test]
    fn a_malformed_first_update_leaves_the_sum_empty() {
        let ctx = HeContext::new(HeSettings::default()).unwrap();
        let (_, public) = ctx.generate_keys();
        let update = ctx.encrypt(&public, &[1.0; 5000]).unwrap();
        let mut sum = CipherSum::new(ctx);

        assert!(sum.add(&[update[0].as_slice(), b"garbage"], 1).is_err());

        assert_eq!((sum.len(), sum.count), (0, 0));
    }

    #[test]
    fn the_shoup_product_matches_plain_modular_arithmetic() {
        let q = 0x3fffffff000001u64; // a 54-bit NTT prime
        let values: Vec<u64> = (0..1000u64)
            .map(|i| i.wrapping_mul(0x9e3779b97f4a7c15) % q)
            .collect();
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        for w in [2u64, 3, 1000, (1 << 20) - 1] {
            let mut out: Vec<u64> = values.iter().rev().copied().collect();
            let expected: Vec<u64> = out
                .iter()
                .zip(&values)
                .map(|(s, c)| ((*s as u128 + *c as u128 * w as u128) % q as u128) as u64)
                .collect();
            let shoup = (((w as u128) << 64) / q as u128) as u64;

            add_row(&mut out, &bytes, q, Some((w, shoup)), false);

            assert_eq!(out, expected, "weight {w}");
        }
    }

    #[test]
    fn a_zero_weight_is_refused() {
        let ctx = HeContext::new(HeSettings::default()).unwrap();
        assert_eq!(CipherSum::new(ctx).add(&[], 0), Err(HeError::ZeroWeight));
    }
}
