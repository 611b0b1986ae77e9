//! Shared helpers of the server-optimizer and robust-rule bindings: borrowing float32 numpy
//! arrays zero-copy, releasing the GIL, and filling new float32 arrays.
//!
//! `py.rs` uses them too: every O(model) call leaves Python
//! through [`detached`], input errors become `AggregationError` (a `ValueError`) through the one
//! `From<AggregationError> for PyErr`.

use numpy::{
    dtype, PyArray1, PyArrayDescrMethods, PyArrayMethods, PyReadonlyArray1, PyReadwriteArray1,
    PyUntypedArray, PyUntypedArrayMethods,
};
use pyo3::prelude::*;

use crate::error::AggregationError;
use crate::optim::OptimError;
use crate::robust::RobustError;

// The modules' errors reach Python through the shared enum and its one conversion.
impl From<OptimError> for PyErr {
    fn from(error: OptimError) -> Self {
        AggregationError::from(error).into()
    }
}

impl From<RobustError> for PyErr {
    fn from(error: RobustError) -> Self {
        AggregationError::from(error).into()
    }
}

/// Builds the dtype error of the calling module from the argument's name and the dtype found.
pub type DTypeError = fn(&'static str, String) -> AggregationError;

/// Runs `work` with the GIL released, so other Python threads (the asyncio loop among them)
/// keep running meanwhile.
pub fn detached<T, E, F>(py: Python<'_>, work: F) -> PyResult<T>
where
    F: Send + FnOnce() -> Result<T, E>,
    T: Send,
    E: Send + Into<AggregationError>,
{
    py.detach(work).map_err(|error| PyErr::from(error.into()))
}

/// A new float32 array of `len` values, filled by `fill` with the GIL released. numpy allocates
/// it (rather than a `Vec`) so that large results get transparent huge pages, as in `py.rs`.
pub fn filled_array<'py, R, E, F>(
    py: Python<'py>,
    len: usize,
    fill: F,
) -> PyResult<(Bound<'py, PyArray1<f32>>, R)>
where
    F: Send + FnOnce(&mut [f32]) -> Result<R, E>,
    R: Send,
    E: Send + Into<AggregationError>,
{
    let array = PyArray1::<f32>::zeros(py, len, false);
    let result = {
        let mut guard = array.try_readwrite().map_err(borrow_error)?;
        let out = guard.as_slice_mut().map_err(borrow_error)?;
        detached(py, || fill(out))?
    };
    Ok((array, result))
}

/// The array behind `object` after checking it is a 1-D, C-contiguous float32 numpy array.
fn checked<'a, 'py>(
    object: &'a Bound<'py, PyAny>,
    what: &'static str,
    not_f32: DTypeError,
) -> Result<&'a Bound<'py, PyArray1<f32>>, AggregationError> {
    let untyped = object
        .cast::<PyUntypedArray>()
        .map_err(|_| AggregationError::NotAnArray(type_name(object)))?;
    if untyped.ndim() != 1 {
        return Err(AggregationError::NotOneDimensional(untyped.ndim()));
    }
    let descr = untyped.dtype();
    if !descr.is_equiv_to(&dtype::<f32>(object.py())) {
        let name = descr.str().map_or_else(|_| "?".into(), |s| s.to_string());
        return Err(not_f32(what, name));
    }
    if !untyped.is_c_contiguous() {
        return Err(AggregationError::NotContiguous);
    }
    object
        .cast::<PyArray1<f32>>()
        .map_err(|_| AggregationError::NotAnArray(type_name(object)))
}

/// Borrows a 1-D, C-contiguous float32 array for reading, without copying.
pub fn readonly<'py>(
    object: &Bound<'py, PyAny>,
    what: &'static str,
    not_f32: DTypeError,
) -> Result<PyReadonlyArray1<'py, f32>, AggregationError> {
    checked(object, what, not_f32)?
        .try_readonly()
        .map_err(borrow_error)
}

/// Borrows a 1-D, C-contiguous float32 array for writing in place, without copying. Fails for
/// read-only arrays and for an array already borrowed (passed twice to one call, say).
pub fn readwrite<'py>(
    object: &Bound<'py, PyAny>,
    what: &'static str,
    not_f32: DTypeError,
) -> Result<PyReadwriteArray1<'py, f32>, AggregationError> {
    checked(object, what, not_f32)?
        .try_readwrite()
        .map_err(borrow_error)
}

/// The values of a borrowed array (contiguity was checked when it was borrowed).
pub fn values<'a>(array: &'a PyReadonlyArray1<'_, f32>) -> Result<&'a [f32], AggregationError> {
    array
        .as_slice()
        .map_err(|_| AggregationError::Borrow("array data is misaligned".into()))
}

/// A failed numpy borrow (already borrowed, read-only, misaligned) as the shared error.
pub fn borrow_error(error: impl ToString) -> AggregationError {
    AggregationError::Borrow(error.to_string())
}

/// The Python type name of `object`, for error messages.
pub fn type_name(object: &Bound<'_, PyAny>) -> String {
    object
        .get_type()
        .name()
        .map_or_else(|_| "?".into(), |n| n.to_string())
}
