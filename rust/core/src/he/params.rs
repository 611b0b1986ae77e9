//! The settings of encrypted aggregation and the arithmetic that makes them safe (module docs of
//! `he`).

use std::sync::Arc;

use fhe::bfv::{BfvParameters, BfvParametersBuilder};

use super::{HeError, Result};

/// Largest log2 q for 128-bit classical security per ring degree (HomomorphicEncryption.org
/// standard, ternary secret, sigma 3.2).
const MAX_Q_BITS_128: [(usize, usize); 4] = [(2048, 54), (4096, 109), (8192, 218), (16384, 438)];

/// fhe.rs's error variance (sigma^2 = 10); B = 10 sigma bounds one error coefficient.
const ERROR_BOUND: f64 = 31.7;

/// Encryption settings, shared by learners and controller (none of it is secret).
#[derive(Debug, Clone, PartialEq)]
pub struct HeSettings {
    /// Ring degree N: values per ciphertext (2048, 4096, 8192 or 16384).
    pub degree: usize,
    /// Bit sizes of the ciphertext moduli (each 10..=62; their sum is log2 q).
    pub moduli_bits: Vec<usize>,
    /// log2 of the plaintext modulus t (a power of two).
    pub plaintext_bits: u32,
    /// Fractional bits of the fixed-point encoding: x becomes round(x * 2^scale_bits).
    pub scale_bits: u32,
    /// Values are clipped to [-clip, clip] before encoding.
    pub clip: f64,
    /// Largest total of integer weights one sum may reach.
    pub max_total_weight: u64,
}

impl Default for HeSettings {
    fn default() -> Self {
        Self {
            degree: 4096,
            moduli_bits: vec![54, 55],
            plaintext_bits: 40,
            scale_bits: 16,
            clip: 4.0,
            max_total_weight: 1 << 20,
        }
    }
}

impl HeSettings {
    /// Refuse settings that are insecure or could let a sum overflow (module docs of `he`).
    pub fn check(&self) -> Result<()> {
        let settings = |message: String| Err(HeError::Settings(message));
        let Some(&(_, max_q)) = MAX_Q_BITS_128.iter().find(|(n, _)| *n == self.degree) else {
            return settings(format!(
                "degree must be 2048, 4096, 8192 or 16384, got {}",
                self.degree
            ));
        };
        if self.moduli_bits.is_empty() || self.moduli_bits.iter().any(|b| !(10..=62).contains(b)) {
            return settings(format!(
                "moduli_bits must be 1 or more sizes of 10 to 62 bits, got {:?}",
                self.moduli_bits
            ));
        }
        let q_bits: usize = self.moduli_bits.iter().sum();
        if q_bits > max_q {
            return settings(format!(
                "a ciphertext modulus of {q_bits} bits with degree {} is below 128-bit security \
                 (at most {max_q} bits)",
                self.degree
            ));
        }
        if !(2..=60).contains(&self.plaintext_bits) || self.plaintext_bits as usize >= q_bits {
            return settings(format!(
                "plaintext_bits must be 2 to 60 and below the {q_bits} ciphertext bits, got {}",
                self.plaintext_bits
            ));
        }
        if !(self.clip.is_finite() && self.clip > 0.0) || self.scale_bits > 40 {
            return settings(format!(
                "clip must be finite and > 0 and scale_bits at most 40, got {} and {}",
                self.clip, self.scale_bits
            ));
        }
        if self.max_total_weight == 0 {
            return settings("max_total_weight must be >= 1".into());
        }
        let weight = self.max_total_weight as f64;
        let t = 2f64.powi(self.plaintext_bits as i32);
        let largest = weight * self.max_abs_encoded() as f64;
        if largest >= t / 2.0 {
            return settings(format!(
                "a sum of total weight {} of values up to {} at {} fractional bits reaches \
                 {largest:.3e}, beyond half the plaintext modulus 2^{}: lower clip, scale_bits \
                 or max_total_weight, or raise plaintext_bits",
                self.max_total_weight, self.clip, self.scale_bits, self.plaintext_bits
            ));
        }
        let noise = weight * ((2 * self.degree + 1) as f64 * ERROR_BOUND + t);
        let room = 2f64.powi(q_bits as i32 - 1) / t; // q / (2t), q >= 2^(q_bits - 1)
        if noise >= room {
            return settings(format!(
                "the noise of a sum of total weight {} ({noise:.3e}) could exceed q/2t \
                 ({room:.3e}): lower max_total_weight or plaintext_bits, or add modulus bits",
                self.max_total_weight
            ));
        }
        Ok(())
    }

    /// The largest |encoded value|: clip * 2^scale_bits, rounded.
    pub fn max_abs_encoded(&self) -> i64 {
        (self.clip * 2f64.powi(self.scale_bits as i32)).round() as i64
    }

    /// The fhe.rs parameters (after [`check`](Self::check)).
    pub fn build(&self) -> Result<Arc<BfvParameters>> {
        self.check()?;
        BfvParametersBuilder::new()
            .set_degree(self.degree)
            .set_moduli_sizes(&self.moduli_bits)
            .set_plaintext_modulus(1u64 << self.plaintext_bits)
            .build_arc()
            .map_err(|e| HeError::Settings(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_are_accepted() {
        assert_eq!(HeSettings::default().check(), Ok(()));
    }

    #[test]
    fn a_modulus_beyond_128_bit_security_is_refused() {
        let settings = HeSettings {
            moduli_bits: vec![55, 55],
            ..HeSettings::default()
        };
        assert!(matches!(settings.check(), Err(HeError::Settings(m)) if m.contains("128-bit")));
    }

    #[test]
    fn a_total_weight_that_could_overflow_the_plaintext_is_refused() {
        let settings = HeSettings {
            max_total_weight: 1 << 21, // 2^21 * 4 * 2^16 = 2^39 = t/2
            ..HeSettings::default()
        };
        assert!(matches!(settings.check(), Err(HeError::Settings(m)) if m.contains("plaintext")));
    }

    #[test]
    fn a_total_weight_the_noise_cannot_carry_is_refused() {
        let settings = HeSettings {
            plaintext_bits: 58,
            scale_bits: 8,
            clip: 1.0,
            max_total_weight: 1 << 20,
            ..HeSettings::default()
        };
        assert!(matches!(settings.check(), Err(HeError::Settings(m)) if m.contains("noise")));
    }

    #[test]
    fn an_unknown_degree_is_refused() {
        let settings = HeSettings {
            degree: 1000,
            ..HeSettings::default()
        };
        assert!(settings.check().is_err());
    }
}
