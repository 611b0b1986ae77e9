//! The ciphertext bytes on the wire: the NTT coefficients as they are, as little-endian u64.
//!
//! fhe.rs's own serialization converts every polynomial to the power basis (an inverse NTT per
//! modulus) and back on reading (a forward NTT), and packs coefficients to their bit width:
//! parsing 1M parameters of updates cost ~110 ms, ~54 ms with the NTT form kept but still packed.
//! The controller only adds, and addition works on the NTT form, so the coefficients travel in
//! that form, unpacked: [`CipherSum`](super::CipherSum) adds them straight from the received
//! bytes after checking each is below its modulus. 2 polynomials x L moduli x N x 8 bytes + 4
//! (131,076 bytes for N = 4096, L = 2: 32.0 MB for 1M parameters, against 27.3 MB packed).

use std::sync::Arc;

use fhe::bfv::{BfvParameters, Ciphertext};
use fhe_math::rq::{traits::TryConvertFrom, Poly, Representation};

use super::{HeError, Result};

pub(crate) const MAGIC: &[u8; 4] = b"MAC2";

/// Bytes of one ciphertext of `params` (level 0).
pub(crate) fn ciphertext_bytes(params: &BfvParameters) -> usize {
    MAGIC.len() + 2 * params.moduli().len() * params.degree() * 8
}

/// `ciphertext` (two polynomials at level 0) as bytes.
pub(crate) fn encode(ciphertext: &Ciphertext) -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    for poly in ciphertext.iter() {
        for row in poly.coefficients().outer_iter() {
            out.extend(row.iter().flat_map(|c| c.to_le_bytes()));
        }
    }
    out
}

/// The coefficients of bytes written by [`encode`] (or by a sum), checked: exact length, the
/// magic, every coefficient below its modulus. Limb order: polynomial, modulus, coefficient.
pub(crate) fn limbs<'a>(bytes: &'a [u8], params: &BfvParameters) -> Result<&'a [u8]> {
    if bytes.len() != ciphertext_bytes(params) || &bytes[..MAGIC.len()] != MAGIC {
        return Err(malformed(format!(
            "{} bytes; expected {} starting with {MAGIC:?}",
            bytes.len(),
            ciphertext_bytes(params)
        )));
    }
    let body = &bytes[MAGIC.len()..];
    let degree = params.degree();
    for (row, limbs) in body.chunks_exact(degree * 8).enumerate() {
        let q = params.moduli()[row % params.moduli().len()];
        if limbs
            .chunks_exact(8)
            .any(|c| u64::from_le_bytes(word(c)) >= q)
        {
            return Err(malformed("a coefficient is not below its modulus".into()));
        }
    }
    Ok(body)
}

/// Bytes written by [`encode`], checked as [`limbs`] does, as a ciphertext (for decryption).
pub(crate) fn decode(bytes: &[u8], params: &Arc<BfvParameters>) -> Result<Ciphertext> {
    let body = limbs(bytes, params)?;
    let ctx = params
        .context_at_level(0)
        .map_err(|e| malformed(e.to_string()))?;
    let per_poly = params.moduli().len() * params.degree() * 8;
    let polys = body
        .chunks_exact(per_poly)
        .map(|poly| {
            let coefficients: Vec<u64> = poly
                .chunks_exact(8)
                .map(|c| u64::from_le_bytes(word(c)))
                .collect();
            Poly::try_convert_from(coefficients, ctx, false, Representation::Ntt)
                .map_err(|e| malformed(e.to_string()))
        })
        .collect::<Result<Vec<_>>>()?;
    Ciphertext::new(polys, params).map_err(|e| malformed(e.to_string()))
}

/// Eight bytes as an array (the callers' chunks are exactly eight).
pub(crate) fn word(bytes: &[u8]) -> [u8; 8] {
    let mut out = [0u8; 8];
    out.copy_from_slice(bytes);
    out
}

fn malformed(reason: String) -> HeError {
    HeError::Malformed {
        what: "ciphertext",
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::he::{HeContext, HeSettings};

    fn encrypted() -> (HeContext, Vec<u8>) {
        let ctx = HeContext::new(HeSettings::default()).unwrap();
        let (_, public) = ctx.generate_keys();
        let bytes = ctx.encrypt(&public, &[0.5; 100]).unwrap().remove(0);
        (ctx, bytes)
    }

    #[test]
    fn a_ciphertext_round_trips_through_its_bytes() {
        let (ctx, bytes) = encrypted();

        let parsed = decode(&bytes, &ctx.params).unwrap();

        assert_eq!(encode(&parsed), bytes);
        assert_eq!(bytes.len(), 4 + 2 * 2 * 4096 * 8);
    }

    #[test]
    fn truncated_bytes_are_refused() {
        let (ctx, bytes) = encrypted();

        assert!(decode(&bytes[..bytes.len() - 1], &ctx.params).is_err());
    }

    #[test]
    fn a_coefficient_beyond_its_modulus_is_refused() {
        let (ctx, mut bytes) = encrypted();
        bytes[4..12].fill(0xff); // the first coefficient: u64::MAX, above q_0

        assert!(matches!(
            decode(&bytes, &ctx.params),
            Err(HeError::Malformed { reason, .. }) if reason.contains("modulus")
        ));
    }
}
