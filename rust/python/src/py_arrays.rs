//! Shared helpers of the bindings: borrowing numpy arrays zero-copy, releasing the GIL, and
//! filling new arrays.
//!
//! Every O(model) call leaves Python through [`detached`]; errors are [`BindingError`]s, which
//! become Python exceptions in one place (`error.rs`).

use numpy::{
    dtype, Element, PyArray1, PyArrayDescrMethods, PyArrayMethods, PyReadonlyArray1,
    PyReadwriteArray1, PyUntypedArray, PyUntypedArrayMethods,
};
use pyo3::prelude::*;

use crate::error::{BindingError, Result};

/// Builds the dtype error of the calling module from the argument's name and the dtype found.
pub type DTypeError = fn(&'static str, String) -> BindingError;

/// Runs `work` with the GIL released, so other Python threads (the asyncio loop among them)
/// keep running meanwhile.
pub fn detached<T, E, F>(py: Python<'_>, work: F) -> Result<T>
where
    F: Send + FnOnce() -> std::result::Result<T, E>,
    T: Send,
    E: Send + Into<BindingError>,
{
    py.detach(work).map_err(Into::into)
}

/// A new array of `len` values, filled by `fill` with the GIL released. numpy allocates it
/// (rather than a `Vec`) so that large results get transparent huge pages.
pub fn filled_array<'py, T, R, E, F>(
    py: Python<'py>,
    len: usize,
    fill: F,
) -> Result<(Bound<'py, PyArray1<T>>, R)>
where
    T: Element + Send,
    F: Send + FnOnce(&mut [T]) -> std::result::Result<R, E>,
    R: Send,
    E: Send + Into<BindingError>,
{
    let array = PyArray1::<T>::zeros(py, len, false);
    let result = {
        let mut guard = array.try_readwrite().map_err(borrow_error)?;
        let out = guard.as_slice_mut().map_err(borrow_error)?;
        detached(py, || fill(out))?
    };
    Ok((array, result))
}

/// The array behind `object` after checking it is a 1-D, C-contiguous numpy array of `T`.
fn checked<'a, 'py, T: Element>(
    object: &'a Bound<'py, PyAny>,
    what: &'static str,
    wrong_dtype: DTypeError,
) -> Result<&'a Bound<'py, PyArray1<T>>> {
    let untyped = object
        .cast::<PyUntypedArray>()
        .map_err(|_| BindingError::NotAnArray(type_name(object)))?;
    if untyped.ndim() != 1 {
        return Err(BindingError::NotOneDimensional(untyped.ndim()));
    }
    let descr = untyped.dtype();
    if !descr.is_equiv_to(&dtype::<T>(object.py())) {
        return Err(wrong_dtype(what, dtype_name(&descr)));
    }
    if !untyped.is_c_contiguous() {
        return Err(BindingError::NotContiguous);
    }
    object
        .cast::<PyArray1<T>>()
        .map_err(|_| BindingError::NotAnArray(type_name(object)))
}

/// Borrows a 1-D, C-contiguous array of `T` for reading, without copying.
pub fn readonly<'py, T: Element>(
    object: &Bound<'py, PyAny>,
    what: &'static str,
    wrong_dtype: DTypeError,
) -> Result<PyReadonlyArray1<'py, T>> {
    checked(object, what, wrong_dtype)?
        .try_readonly()
        .map_err(borrow_error)
}

/// Borrows a 1-D, C-contiguous float32 array for writing in place, without copying. Fails for
/// read-only arrays and for an array already borrowed (passed twice to one call, say).
pub fn readwrite<'py>(
    object: &Bound<'py, PyAny>,
    what: &'static str,
    wrong_dtype: DTypeError,
) -> Result<PyReadwriteArray1<'py, f32>> {
    checked(object, what, wrong_dtype)?
        .try_readwrite()
        .map_err(borrow_error)
}

/// The values of a borrowed array (contiguity was checked when it was borrowed).
pub fn values<'a, T: Element>(array: &'a PyReadonlyArray1<'_, T>) -> Result<&'a [T]> {
    array
        .as_slice()
        .map_err(|_| BindingError::Borrow("array data is misaligned".into()))
}

/// A failed numpy borrow (already borrowed, read-only, misaligned) as the shared error.
pub fn borrow_error(error: impl ToString) -> BindingError {
    BindingError::Borrow(error.to_string())
}

/// The name of a numpy dtype, for error messages.
pub fn dtype_name(descr: &Bound<'_, numpy::PyArrayDescr>) -> String {
    descr.str().map_or_else(|_| "?".into(), |s| s.to_string())
}

/// The Python type name of `object`, for error messages.
pub fn type_name(object: &Bound<'_, PyAny>) -> String {
    object
        .get_type()
        .name()
        .map_or_else(|_| "?".into(), |n| n.to_string())
}
