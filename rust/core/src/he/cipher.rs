//! Keys, encryption and decryption: the learner's side of encrypted aggregation.

use std::sync::Arc;

use fhe::bfv::{BfvParameters, Ciphertext, Encoding, Plaintext, PublicKey, SecretKey};
use fhe_traits::{
    DeserializeParametrized, FheDecoder, FheDecrypter, FheEncoder, FheEncrypter, Serialize,
};
use rayon::prelude::*;

use super::{format, HeError, HeSettings, Result};

/// Settings and their fhe.rs parameters; everything a party needs besides its key.
#[derive(Debug, Clone)]
pub struct HeContext {
    /// The settings these parameters were built from.
    pub settings: HeSettings,
    pub(crate) params: Arc<BfvParameters>,
}

impl HeContext {
    /// Check `settings` ([`HeSettings::check`]) and build the parameters.
    pub fn new(settings: HeSettings) -> Result<Self> {
        let params = settings.build()?;
        Ok(Self { settings, params })
    }

    /// Values per ciphertext (the ring degree).
    pub fn slots(&self) -> usize {
        self.settings.degree
    }

    /// Ciphertexts that carry `len` values.
    pub fn ciphertexts_for(&self, len: usize) -> usize {
        len.div_ceil(self.slots())
    }

    /// A new key pair from the operating system's randomness: (secret key, public key) bytes.
    pub fn generate_keys(&self) -> (Vec<u8>, Vec<u8>) {
        let mut rng = rand::rng();
        let secret = SecretKey::random(&self.params, &mut rng);
        let public = PublicKey::new(&secret, &mut rng);
        (secret.to_bytes(), public.to_bytes())
    }

    /// Clip `values` to [-clip, clip], encode them as fixed point and encrypt them under
    /// `public_key`, one ciphertext per [`slots`](Self::slots) values (the last zero-padded).
    /// Runs in parallel; refuses NaN and infinity before encrypting anything.
    pub fn encrypt(&self, public_key: &[u8], values: &[f32]) -> Result<Vec<Vec<u8>>> {
        if let Some(index) = values.iter().position(|v| !v.is_finite()) {
            return Err(HeError::NonFinite { index });
        }
        let public = PublicKey::from_bytes(public_key, &self.params)
            .map_err(|e| HeError::malformed("public key", e))?;
        let (clip, scale) = (
            self.settings.clip,
            2f64.powi(self.settings.scale_bits as i32),
        );
        values
            .par_chunks(self.slots())
            .map(|part| {
                let encoded: Vec<i64> = part
                    .iter()
                    .map(|&v| ((v as f64).clamp(-clip, clip) * scale).round() as i64)
                    .collect();
                let plaintext = Plaintext::try_encode(&encoded, Encoding::poly(), &self.params)
                    .map_err(|e| HeError::malformed("plaintext", e))?;
                let ciphertext: Ciphertext = public
                    .try_encrypt(&plaintext, &mut rand::rng())
                    .map_err(|e| HeError::malformed("plaintext", e))?;
                Ok(format::encode(&ciphertext))
            })
            .collect()
    }

    /// Decrypt a sum of `len` values with `secret_key` and divide it by `divisor` (the sum's
    /// total weight, for a weighted average) and the fixed-point scale.
    pub fn decrypt(
        &self,
        secret_key: &[u8],
        ciphertexts: &[&[u8]],
        len: usize,
        divisor: f64,
    ) -> Result<Vec<f32>> {
        let factor = self.decode_factor(ciphertexts.len(), len, divisor)?;
        let secret = SecretKey::from_bytes(secret_key, &self.params)
            .map_err(|e| HeError::malformed("secret key", e))?;
        let parts: Vec<Vec<f32>> = ciphertexts
            .par_iter()
            .map(|bytes| {
                let ciphertext = self.parse(bytes)?;
                let plaintext = secret
                    .try_decrypt(&ciphertext)
                    .map_err(|e| HeError::malformed("ciphertext", e))?;
                let sums = Vec::<i64>::try_decode(&plaintext, Encoding::poly())
                    .map_err(|e| HeError::malformed("ciphertext", e))?;
                Ok(scaled(&sums, factor))
            })
            .collect::<Result<_>>()?;
        let mut out: Vec<f32> = parts.into_iter().flatten().collect();
        out.truncate(len);
        Ok(out)
    }

    /// Check a decryption's arguments (`count` ciphertexts for `len` values, a finite
    /// `divisor` > 0); the factor from decoded sums to values: 1 / (divisor * 2^scale_bits).
    pub(crate) fn decode_factor(&self, count: usize, len: usize, divisor: f64) -> Result<f64> {
        if count != self.ciphertexts_for(len) {
            return Err(HeError::CiphertextCount {
                what: "the sum",
                got: count,
                expected: self.ciphertexts_for(len),
            });
        }
        if !(divisor.is_finite() && divisor > 0.0) {
            return Err(HeError::Decrypt(format!(
                "divisor must be finite and > 0, got {divisor}"
            )));
        }
        Ok(1.0 / (divisor * 2f64.powi(self.settings.scale_bits as i32)))
    }

    /// A ciphertext in the wire format (`format`): two polynomials at level 0, each
    /// coefficient checked, so anything parsed can be added to a sum.
    pub(crate) fn parse(&self, bytes: &[u8]) -> Result<Ciphertext> {
        format::decode(bytes, &self.params)
    }
}

/// Decoded fixed-point sums times `factor` ([`HeContext::decode_factor`]) as values.
pub(crate) fn scaled(sums: &[i64], factor: f64) -> Vec<f32> {
    sums.iter().map(|&m| (m as f64 * factor) as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn context() -> HeContext {
        HeContext::new(HeSettings::default()).unwrap()
    }

    #[test]
    fn encryption_round_trips_within_the_fixed_point_step() {
        let ctx = context();
        let (secret, public) = ctx.generate_keys();
        let values: Vec<f32> = (0..5000).map(|i| (i as f32 - 2500.0) / 700.0).collect();

        let ciphertexts = ctx.encrypt(&public, &values).unwrap();
        let refs: Vec<&[u8]> = ciphertexts.iter().map(Vec::as_slice).collect();
        let back = ctx.decrypt(&secret, &refs, values.len(), 1.0).unwrap();

        assert_eq!(ciphertexts.len(), 2);
        let step = 1.0 / 65536.0;
        for (a, b) in values.iter().zip(&back) {
            assert!((a.clamp(-4.0, 4.0) - b).abs() <= step, "{a} vs {b}");
        }
    }

    #[test]
    fn values_beyond_the_clip_are_clipped() {
        let ctx = context();
        let (secret, public) = ctx.generate_keys();

        let ciphertexts = ctx.encrypt(&public, &[100.0, -100.0]).unwrap();
        let back = ctx
            .decrypt(&secret, &[ciphertexts[0].as_slice()], 2, 1.0)
            .unwrap();

        assert_eq!(back, vec![4.0, -4.0]);
    }

    #[test]
    fn non_finite_values_are_refused() {
        let ctx = context();
        let (_, public) = ctx.generate_keys();

        let error = ctx.encrypt(&public, &[0.0, f32::NAN]).unwrap_err();

        assert_eq!(error, HeError::NonFinite { index: 1 });
    }

    #[test]
    fn a_key_of_other_settings_is_refused() {
        let ctx = context();
        let other = HeContext::new(HeSettings {
            degree: 2048,
            moduli_bits: vec![54],
            plaintext_bits: 20,
            scale_bits: 8,
            clip: 1.0,
            max_total_weight: 1 << 8,
        })
        .unwrap();
        let (_, public) = other.generate_keys();

        assert!(matches!(
            ctx.encrypt(&public, &[1.0]),
            Err(HeError::Malformed { .. })
        ));
    }

    #[test]
    fn garbage_is_not_a_ciphertext() {
        assert!(matches!(
            context().parse(b"not a ciphertext"),
            Err(HeError::Malformed { .. })
        ));
    }
}
