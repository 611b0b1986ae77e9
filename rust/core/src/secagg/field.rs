//! Shamir secret sharing over GF(p), p = 2^61 - 1 (a Mersenne prime: reduction is a shift and
//! an add), for the 32-byte secrets of SecAgg+ (mask seeds and key-agreement secrets).
//!
//! A 32-byte secret is cut into five 7-byte limbs (each < 2^56 < p), and each limb is shared with
//! its own random polynomial of degree `threshold - 1`; a share is the five evaluations at the
//! holder's point x (1-based, never 0). Any `threshold` shares give the secret back by Lagrange
//! interpolation at 0; fewer reveal nothing (each limb is a uniformly random point).

use super::SecAggError;

/// The field's modulus.
pub const P: u64 = (1 << 61) - 1;
const LIMBS: usize = 5;
const LIMB_BYTES: usize = 7;

/// Bytes of one share: the x coordinate (u32) and five field elements (u64 each).
pub const SHARE_BYTES: usize = 4 + LIMBS * 8;

fn reduce(x: u128) -> u64 {
    let folded = (x & P as u128) + (x >> 61);
    let folded = (folded & P as u128) + (folded >> 61);
    let r = folded as u64;
    if r >= P {
        r - P
    } else {
        r
    }
}

fn mul(a: u64, b: u64) -> u64 {
    reduce(a as u128 * b as u128)
}

fn add(a: u64, b: u64) -> u64 {
    let s = a + b; // both < 2^61: no overflow
    if s >= P {
        s - P
    } else {
        s
    }
}

fn sub(a: u64, b: u64) -> u64 {
    add(a, P - b)
}

fn inverse(a: u64) -> u64 {
    // a^(p-2) by square and multiply (a != 0)
    let (mut base, mut exp, mut out) = (a, P - 2, 1u64);
    while exp > 0 {
        if exp & 1 == 1 {
            out = mul(out, base);
        }
        base = mul(base, base);
        exp >>= 1;
    }
    out
}

/// Split `secret` into `holders` shares (x = 1..=holders), any `threshold` of which recover it.
/// `random` supplies uniform 64-bit words for the polynomials' coefficients.
pub fn split(
    secret: &[u8; 32],
    threshold: usize,
    holders: usize,
    mut random: impl FnMut() -> u64,
) -> Result<Vec<[u8; SHARE_BYTES]>, SecAggError> {
    if threshold == 0 || threshold > holders || holders >= u32::MAX as usize {
        return Err(SecAggError::Settings(format!(
            "a threshold of {threshold} among {holders} share holders"
        )));
    }
    let mut padded = [0u8; LIMBS * LIMB_BYTES];
    padded[..32].copy_from_slice(secret);
    let polys: Vec<Vec<u64>> = padded
        .chunks_exact(LIMB_BYTES)
        .map(|limb| {
            let mut word = [0u8; 8];
            word[..LIMB_BYTES].copy_from_slice(limb);
            let mut coefficients = vec![u64::from_le_bytes(word)];
            // uniform in [0, p): rejection of the 2^61 - 1 .. 2^64 tail after masking to 61 bits
            while coefficients.len() < threshold {
                let r = random() & P;
                if r < P {
                    coefficients.push(r);
                }
            }
            coefficients
        })
        .collect();
    Ok((1..=holders as u64)
        .map(|x| {
            let mut share = [0u8; SHARE_BYTES];
            share[..4].copy_from_slice(&(x as u32).to_le_bytes());
            for (i, poly) in polys.iter().enumerate() {
                let y = poly.iter().rev().fold(0u64, |acc, &c| add(mul(acc, x), c));
                share[4 + 8 * i..12 + 8 * i].copy_from_slice(&y.to_le_bytes());
            }
            share
        })
        .collect())
}

/// The secret from at least `threshold` distinct shares (more are fine; all are used).
pub fn combine(shares: &[[u8; SHARE_BYTES]], threshold: usize) -> Result<[u8; 32], SecAggError> {
    let mut points: Vec<(u64, [u64; LIMBS])> = Vec::with_capacity(shares.len());
    for share in shares {
        let mut x_bytes = [0u8; 4];
        x_bytes.copy_from_slice(&share[..4]);
        let x = u32::from_le_bytes(x_bytes) as u64;
        let mut ys = [0u64; LIMBS];
        for (i, y) in ys.iter_mut().enumerate() {
            let mut word = [0u8; 8];
            word.copy_from_slice(&share[4 + 8 * i..12 + 8 * i]);
            *y = u64::from_le_bytes(word);
        }
        if x == 0 || ys.iter().any(|&y| y >= P) || points.iter().any(|(px, _)| *px == x) {
            return Err(SecAggError::Malformed(
                "a share with x = 0, a duplicate x or a value \
                 outside the field"
                    .into(),
            ));
        }
        points.push((x, ys));
    }
    if points.len() < threshold || threshold == 0 {
        return Err(SecAggError::TooFewShares {
            got: points.len(),
            needed: threshold,
        });
    }
    let points = &points[..threshold];
    let mut limbs = [0u64; LIMBS];
    for (j, (xj, yj)) in points.iter().enumerate() {
        // Lagrange basis at 0: prod_{m != j} x_m / (x_m - x_j)
        let (mut num, mut den) = (1u64, 1u64);
        for (m, (xm, _)) in points.iter().enumerate() {
            if m != j {
                num = mul(num, *xm);
                den = mul(den, sub(*xm, *xj));
            }
        }
        let basis = mul(num, inverse(den));
        for (limb, y) in limbs.iter_mut().zip(yj) {
            *limb = add(*limb, mul(*y, basis));
        }
    }
    let mut padded = [0u8; LIMBS * LIMB_BYTES];
    for (chunk, limb) in padded.chunks_exact_mut(LIMB_BYTES).zip(limbs) {
        if limb >> 56 != 0 {
            return Err(SecAggError::Malformed(
                "the shares do not come from one secret".into(),
            ));
        }
        chunk.copy_from_slice(&limb.to_le_bytes()[..LIMB_BYTES]);
    }
    if padded[32..].iter().any(|&b| b != 0) {
        return Err(SecAggError::Malformed(
            "the shares do not come from one secret".into(),
        ));
    }
    let mut secret = [0u8; 32];
    secret.copy_from_slice(&padded[..32]);
    Ok(secret)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn counter(start: u64) -> impl FnMut() -> u64 {
        let mut state = start;
        move || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            state
        }
    }

    #[test]
    fn any_threshold_of_shares_recovers_the_secret() {
        let secret = [0xa5u8; 32];
        let shares = split(&secret, 3, 5, counter(1)).unwrap();

        for picked in [[0, 1, 2], [4, 2, 0], [1, 3, 4]] {
            let subset: Vec<_> = picked.iter().map(|&i| shares[i]).collect();
            assert_eq!(combine(&subset, 3).unwrap(), secret);
        }
    }

    #[test]
    fn fewer_shares_than_the_threshold_are_refused() {
        let shares = split(&[1u8; 32], 3, 5, counter(2)).unwrap();

        assert_eq!(
            combine(&shares[..2], 3),
            Err(SecAggError::TooFewShares { got: 2, needed: 3 })
        );
    }

    #[test]
    fn a_duplicate_share_is_refused() {
        let shares = split(&[1u8; 32], 2, 3, counter(3)).unwrap();

        assert!(matches!(
            combine(&[shares[0], shares[0]], 2),
            Err(SecAggError::Malformed(_))
        ));
    }

    #[test]
    fn the_field_inverse_inverts() {
        for a in [1u64, 2, 12345, P - 1, 1 << 60] {
            assert_eq!(mul(a, inverse(a)), 1);
        }
    }

    proptest! {
        #[test]
        fn split_then_combine_is_the_identity(
            secret in proptest::array::uniform32(any::<u8>()),
            threshold in 1usize..6,
            extra in 0usize..4,
            seed in any::<u64>(),
        ) {
            let shares = split(&secret, threshold, threshold + extra, counter(seed)).unwrap();
            prop_assert_eq!(combine(&shares[extra..], threshold).unwrap(), secret);
        }
    }
}
