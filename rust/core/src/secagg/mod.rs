//! SecAgg+ secure aggregation (Bell et al., CCS 2020): learners mask their quantized updates so
//! that the masks cancel in the sum; the server learns the sum of the survivors' updates and
//! nothing about any one of them, and survives learners dropping out after sharing.
//!
//! - `crypto`: X25519, HKDF-SHA256, ChaCha20 masks keyed by the full 32-byte secret,
//!   ChaCha20-Poly1305 for shares (why each crate: that module's docs);
//! - `field`: Shamir sharing over GF(2^61 - 1), small and property-tested;
//! - `quantize`: unbiased stochastic quantization into Z_2^32;
//! - `round`: the learner's four steps and the server's unmasking.
//!
//! The federation core drives the rounds (a wrapper around a policy); that is not built yet.

mod crypto;
mod field;
mod quantize;
mod round;

pub use field::SHARE_BYTES;
pub use quantize::{mean_of_sum, quantize};
pub use round::{unmask_sum, unmask_total, AdvertisedKeys, RoundSettings, SecAggLearner};

use thiserror::Error;

/// Everything SecAgg+ can refuse.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SecAggError {
    /// Round settings that cannot work or would leak.
    #[error("secure aggregation settings: {0}")]
    Settings(String),

    /// A message that does not fit the round (altered, misaddressed, out of step).
    #[error("secure aggregation: {0}")]
    Malformed(String),

    /// A neighbour whose keys were never advertised.
    #[error("secure aggregation: no keys for neighbour {0}")]
    MissingKeys(u32),

    /// Fewer shares than the threshold.
    #[error("secure aggregation: {got} shares, {needed} needed")]
    TooFewShares { got: usize, needed: usize },

    /// Too many learners dropped for a survivor's or a dropped learner's secret to be rebuilt:
    /// the round's sum cannot be unmasked and nothing is aggregated.
    #[error(
        "secure aggregation: too many learners dropped: learner {learner}'s secret has {got} \
         shares, {needed} needed; the round is void"
    )]
    TooManyDropped {
        learner: u32,
        got: usize,
        needed: usize,
    },
}
