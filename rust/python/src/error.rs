//! The bindings' error type and its conversion into Python exceptions, the one place where a
//! Rust error becomes a Python one.
//!
//! [`BindingError`] wraps the core's errors and adds the input errors only the bindings can
//! produce (not a numpy array, wrong dtype or layout, a poisoned lock, ...). Binding functions
//! return [`Result`] and use `?` on core results, on their own errors and on `PyErr`s alike.
//! Wire-format errors become `WireFormatError`, encryption errors `EncryptionError`, SecAgg+
//! errors `SecAggError`; everything else `AggregationError`. All are `ValueError`s.

use metis_async_core::error::AggregationError;
use metis_async_core::he::HeError;
use metis_async_core::optim::OptimError;
use metis_async_core::robust::RobustError;
use metis_async_core::secagg::SecAggError;
use metis_async_core::wire::WireError;
use pyo3::PyErr;
use thiserror::Error;

/// The Python exception types, in their own module so their names can match the Rust enums'.
pub mod exceptions {
    pyo3::create_exception!(
        metis_async._core,
        AggregationError,
        pyo3::exceptions::PyValueError,
        "Invalid input to the aggregation core; raised before any state changes."
    );
    pyo3::create_exception!(
        metis_async._core,
        EncryptionError,
        pyo3::exceptions::PyValueError,
        "Invalid encryption settings, key or ciphertext; raised before any sum changes."
    );
    pyo3::create_exception!(
        metis_async._core,
        SecAggError,
        pyo3::exceptions::PyValueError,
        "Invalid secure-aggregation settings or message, or a round that cannot be unmasked."
    );
    pyo3::create_exception!(
        metis_async._core,
        WireFormatError,
        pyo3::exceptions::PyValueError,
        "A chunk message that is not valid protobuf or does not fit the announced payload."
    );
}

/// Result alias of the binding functions.
pub type Result<T> = std::result::Result<T, BindingError>;

/// Everything a binding call can fail with.
#[derive(Debug, Error)]
pub enum BindingError {
    #[error(transparent)]
    Aggregation(#[from] AggregationError),

    #[error(transparent)]
    Optimizer(#[from] OptimError),

    #[error(transparent)]
    Robust(#[from] RobustError),

    #[error(transparent)]
    Wire(#[from] WireError),

    #[error(transparent)]
    Encryption(#[from] HeError),

    #[error(transparent)]
    SecAgg(#[from] SecAggError),

    /// A Python error raised while talking to Python (extracting an argument, say); passed
    /// through unchanged.
    #[error(transparent)]
    Python(#[from] PyErr),

    /// An input that is not a numpy array.
    #[error("expected a numpy.ndarray, got {0}")]
    NotAnArray(String),

    /// An array with the wrong number of dimensions.
    #[error("expected a 1-D array, got {0}-D")]
    NotOneDimensional(usize),

    /// An update of a dtype other than float32 or float64.
    #[error("expected a float32 or float64 array, got {0}")]
    DType(String),

    /// A base model that is not float32 (the model's own dtype).
    #[error("base must be a float32 array, got {0}")]
    BaseDType(String),

    /// An array argument of the wrong dtype, where exactly one dtype is accepted.
    #[error("{what} must be {expected}, got {got}")]
    WrongDType {
        what: &'static str,
        expected: &'static str,
        got: String,
    },

    /// An array whose values are not C-contiguous (a strided view, for instance).
    #[error("array must be C-contiguous (use numpy.ascontiguousarray)")]
    NotContiguous,

    /// An array that cannot be borrowed (mutably borrowed elsewhere, read-only, misaligned).
    #[error("cannot borrow array: {0}")]
    Borrow(String),

    /// A batch call mixing float32 and float64 updates.
    #[error("updates mix float32 and float64 (updates[{index}] differs from updates[0])")]
    MixedDTypes { index: usize },

    /// A panic poisoned the accumulator's lock; its state may be inconsistent.
    #[error("accumulator state is poisoned by an earlier panic; call reset()")]
    AccumulatorPoisoned,

    /// A panic poisoned the optimizer's lock.
    #[error("optimizer state is poisoned by an earlier panic; restore it with load_state()")]
    OptimizerPoisoned,

    /// A panic poisoned a chunk assembler's lock.
    #[error("chunk assembler is poisoned by an earlier panic; discard it")]
    AssemblerPoisoned,

    /// An optimizer state that is not a mapping.
    #[error("state must be a mapping as returned by state(), got {0}")]
    NotAState(String),

    /// Robust-rule `updates` that are neither a 2-D array nor a sequence of arrays.
    #[error("updates must be a 2-D float32 array or a sequence of 1-D float32 arrays, got {0}")]
    NotUpdates(String),

    /// A negative count given as a Python int.
    #[error("{name} must be >= 0, got {value}")]
    Negative { name: &'static str, value: i64 },

    /// Wraps an error with the position of the update that caused it in a batch call.
    #[error("updates[{index}]: {source}")]
    InUpdate {
        index: usize,
        source: Box<BindingError>,
    },
}

impl BindingError {
    /// Tags an error with the index of the batch update it came from.
    pub fn in_update(self, index: usize) -> Self {
        Self::InUpdate {
            index,
            source: Box::new(self),
        }
    }

    /// A float32-only argument of another dtype.
    pub fn not_float32(what: &'static str, got: String) -> Self {
        Self::WrongDType {
            what,
            expected: "float32",
            got,
        }
    }
}

impl From<BindingError> for PyErr {
    fn from(error: BindingError) -> Self {
        match error {
            BindingError::Python(error) => error,
            BindingError::Wire(error) => exceptions::WireFormatError::new_err(error.to_string()),
            BindingError::Encryption(error) => {
                exceptions::EncryptionError::new_err(error.to_string())
            }
            BindingError::SecAgg(error) => exceptions::SecAggError::new_err(error.to_string()),
            error => exceptions::AggregationError::new_err(error.to_string()),
        }
    }
}
