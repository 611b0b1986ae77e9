//! Errors of the aggregation core.
//!
//! Pure Rust: functions return [`AggregationError`] and use `?`; the bindings add their own input
//! errors (not an array, wrong dtype, ...) and turn both into the Python exception
//! `metis_async._core.AggregationError` (a `ValueError`) in one place.

use thiserror::Error;

/// Result alias used throughout the core.
pub type Result<T> = std::result::Result<T, AggregationError>;

/// Everything that can go wrong while aggregating. Every variant is detected before any state
/// is changed, so an `Err` never leaves an accumulator half-updated.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum AggregationError {
    /// An input array's length differs from the accumulator's.
    #[error("{what} has {got} values, accumulator expects {expected}")]
    LengthMismatch {
        what: &'static str,
        got: usize,
        expected: usize,
    },

    /// Updates given to one batch call have different lengths.
    #[error("updates[{index}] has {got} values, updates[0] has {expected}")]
    RaggedUpdates {
        index: usize,
        got: usize,
        expected: usize,
    },

    /// A weight that is NaN, infinite, zero or negative. Zero is rejected too: a zero-weight
    /// update would change `count` but nothing else, which usually hides a bug upstream (a learner
    /// reporting no samples); the policy should drop such an update instead.
    #[error("weight must be finite and > 0, got {}", Num(*.0))]
    InvalidWeight(f64),

    /// Adding this weight would make the total weight overflow to infinity.
    #[error("total weight would overflow: {} + {} is not finite", Num(*total), Num(*weight))]
    WeightOverflow { total: f64, weight: f64 },

    /// A segment of an update that is not a whole number of float32 values.
    #[error("updates[{update}] has a segment of {bytes} bytes, not a whole number of float32")]
    SegmentNotFloat32 { update: usize, bytes: usize },

    /// A segment of an encoded update that is not a whole number of its codec's values.
    #[error("updates[{update}] has a segment of {bytes} bytes, not a whole number of {codec}")]
    SegmentNotWholeValues {
        update: usize,
        bytes: usize,
        codec: &'static str,
    },

    /// A scale factor that is NaN or infinite.
    #[error("scale must be finite, got {}", Num(*.0))]
    InvalidScale(f64),

    /// An update with NaN or infinity in it.
    #[error("update contains non-finite values (first at index {index})")]
    NonFinite { index: usize },

    /// A result that does not fit in float32 (or became NaN, e.g. from a non-finite base).
    #[error("result is not finite at index {index} (float32 overflow or non-finite base)")]
    NonFiniteResult { index: usize },

    /// `mean` (or a normalized `apply`) before any update was added.
    #[error("mean is undefined: no updates have been added (total weight is 0)")]
    EmptyMean,

    /// A batch call with no updates.
    #[error("weighted_average needs at least one update")]
    NoUpdates,

    /// A batch call whose weights do not pair up with its updates.
    #[error("got {updates} updates but {weights} weights")]
    WeightCount { updates: usize, weights: usize },

    /// A partial sum to merge whose total weight does not fit its count: not finite and > 0
    /// for `count` > 0, or not 0 for `count` = 0.
    #[error(
        "total_weight must be finite and > 0 for a partial sum of {count} updates (0 for none), \
         got {}",
        Num(*total_weight)
    )]
    InvalidPartial { count: u64, total_weight: f64 },

    /// A partial sum to merge with NaN or infinity in it.
    #[error("partial sum contains non-finite values (first at index {index})")]
    NonFiniteSum { index: usize },

    /// A partial sum of no updates whose sums are not all zero.
    #[error("partial sum of 0 updates is not zero (first at index {index})")]
    NonzeroEmptySum { index: usize },

    /// Merging would overflow the update count.
    #[error("update count would overflow")]
    CountOverflow,

    /// Memory for an accumulator of this many values could not be allocated.
    #[error("cannot allocate a float64 accumulator of {values} values")]
    Allocation { values: usize },

    /// Wraps an error with the position of the update that caused it in a batch call.
    #[error("updates[{index}]: {source}")]
    InUpdate {
        index: usize,
        source: Box<AggregationError>,
    },
}

impl AggregationError {
    /// Tags an error with the index of the batch update it came from.
    pub fn in_update(self, index: usize) -> Self {
        Self::InUpdate {
            index,
            source: Box::new(self),
        }
    }
}

/// Formats a float close to Python's `repr` (`nan`, `inf`, `-1.0`, `1e300`), so messages read
/// naturally to Python callers.
struct Num(f64);

impl std::fmt::Display for Num {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            x if x.is_nan() => f.write_str("nan"),
            x if x.is_infinite() => f.write_str(if x > 0.0 { "inf" } else { "-inf" }),
            // Debug is the shortest round-trip form and switches to exponents for huge values.
            x => write!(f, "{x:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_problem() {
        let err = AggregationError::LengthMismatch {
            what: "update",
            got: 12,
            expected: 10,
        };
        assert_eq!(
            err.to_string(),
            "update has 12 values, accumulator expects 10"
        );
        assert_eq!(
            AggregationError::InvalidWeight(f64::NAN).to_string(),
            "weight must be finite and > 0, got nan"
        );
        assert_eq!(
            AggregationError::NonFinite { index: 3 }.to_string(),
            "update contains non-finite values (first at index 3)"
        );
    }

    #[test]
    fn in_update_prefixes_the_index() {
        let err = AggregationError::InvalidWeight(-1.0).in_update(2);
        assert_eq!(
            err.to_string(),
            "updates[2]: weight must be finite and > 0, got -1.0"
        );
    }
}
