//! Homomorphic aggregation: learners encrypt fixed-point updates under BFV, the controller adds
//! (and scales by integer weights) ciphertexts it cannot read, learners decrypt the sum.
//!
//! # Why the `fhe` crate (fhe.rs)
//!
//! It is pure Rust (no C++ toolchain, no CMake, builds wherever this crate builds), MIT
//! licensed, implements BFV with public-key encryption, ciphertext addition and plaintext
//! multiplication in RNS/NTT form (additions and scalar products are coefficient-wise on NTT
//! polynomials), serializes keys and ciphertexts, zeroizes secret keys on drop, and has
//! multiparty BFV (`fhe::mbfv`: collective public keys, threshold decryption shares) for a
//! mode in which no single party holds the secret key. OpenFHE and SEAL are C++ (bindings
//! need their toolchains); TFHE-rs is a different scheme (boolean/short integers, no cheap
//! SIMD-style addition of large vectors); concrete-ml cannot aggregate encrypted updates.
//! `fhe::mbfv`'s shares cannot be serialized, so `multiparty` implements the same protocols
//! on `fhe_math` polynomials.
//!
//! # What one ciphertext holds
//!
//! With the default settings (degree N = 4096, ciphertext modulus q of 54 + 55 = 109 bits,
//! plaintext modulus t = 2^40) a ciphertext holds N values in its coefficients (`Encoding::poly`:
//! addition and multiplication by a constant are coefficient-wise, no SIMD slots are needed)
//! and is 111,620 bytes on the wire (`format`): 27.3 bytes a value, 27.3 MB for a million
//! parameters.
//!
//! # Security
//!
//! N = 4096 with log2 q <= 109 is the HomomorphicEncryption.org standard's bound for 128-bit
//! classical security with a ternary secret and error of standard deviation 3.2 (fhe.rs: variance
//! 10); [`HeSettings::check`] refuses moduli beyond the table for each degree.
//!
//! # Why the sum cannot overflow (see [`HeSettings::check`])
//!
//! A value x is clipped to [-clip, clip] and encoded as the integer round(x * 2^scale_bits), so
//! |m| <= clip * 2^scale_bits. The controller computes sum_i w_i m_i with integer weights whose
//! total is at most `max_total_weight` (W). Two conditions make the decrypted sum exact:
//!
//! 1. Plaintext: |sum_i w_i m_i| <= W * clip * 2^scale_bits < t / 2, so the centered residue
//!    mod t is the true sum.
//! 2. Noise: a fresh public-key ciphertext is Delta*m + v with Delta = floor(q / t) and
//!    |v| <= (2N + 1) * B (B = 10 sigma bounds one error coefficient, ternary u and s). Storing
//!    negative values mod t makes the plaintext sum wrap up to W times; each wrap adds
//!    -(q mod t) < t to the noise. The sum decrypts correctly while
//!    W * ((2N + 1) * B + t) < q / (2t).
//!
//! With the defaults (t = 2^40, scale 2^16, clip 4) condition 1 allows W < 2^21 and condition 2
//! W < 2^28; `max_total_weight` defaults to 2^20 (e.g. 1,000 learners of weight up to 1,048).

mod cipher;
mod format;
mod multiparty;
mod params;
mod sum;

pub use cipher::HeContext;
pub use multiparty::{collective_public_key, combine, HeParty, Smudging, CRS_BYTES};
pub use params::HeSettings;
pub use sum::CipherSum;

use thiserror::Error;

/// Result alias of the homomorphic-aggregation functions.
pub type Result<T> = std::result::Result<T, HeError>;

/// Everything encrypted aggregation can refuse; detected before any state changes.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum HeError {
    /// Settings that are insecure, invalid, or could let a sum overflow.
    #[error("encryption settings: {0}")]
    Settings(String),

    /// A key, ciphertext or parameter set that does not deserialize under these settings.
    #[error("{what} is not valid under these encryption settings: {reason}")]
    Malformed { what: &'static str, reason: String },

    /// Ciphertext lists of different lengths (different model sizes).
    #[error("{what} has {got} ciphertexts, expected {expected}")]
    CiphertextCount {
        what: &'static str,
        got: usize,
        expected: usize,
    },

    /// A weight of zero, or a sum whose total weight would exceed `max_total_weight`.
    #[error("weight {weight}: the total would be {total}, above max_total_weight {limit}")]
    WeightOverflow { weight: u64, total: u64, limit: u64 },

    /// A zero weight (the update would change nothing but the count).
    #[error("weight must be >= 1")]
    ZeroWeight,

    /// A value to encrypt that is NaN or infinite.
    #[error("value at index {index} is not finite")]
    NonFinite { index: usize },

    /// Decrypting a sum of nothing, or for a length beyond what the ciphertexts hold.
    #[error("{0}")]
    Decrypt(String),

    /// Multiparty shares that do not make up one whole committee: a party missing (all must
    /// take part) or given twice, shares of different committees, a party index beyond the
    /// committee.
    #[error("committee: {0}")]
    Committee(String),

    /// A decryption share made for another ciphertext than the one it is combined with.
    #[error("the decryption share of party {party} for ciphertext {ciphertext} was made for another ciphertext")]
    ShareMismatch { party: usize, ciphertext: usize },
}

impl HeError {
    fn malformed(what: &'static str, error: impl std::fmt::Display) -> Self {
        Self::Malformed {
            what,
            reason: error.to_string(),
        }
    }
}
