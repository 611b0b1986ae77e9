//! Python bindings of the robust rules (`robust`): `coordinate_median`, `trimmed_mean`,
//! `krum_scores`, `krum`, `multi_krum`, `clip_by_norm`.
//!
//! `updates` is either a 2-D C-contiguous float32 array (one update per row) or a sequence of
//! 1-D C-contiguous float32 arrays; both are borrowed without copying. Results are new float32
//! arrays, computed with the GIL released.

use numpy::{
    dtype, PyArray1, PyArray2, PyArrayDescrMethods, PyArrayMethods, PyReadonlyArray1,
    PyReadonlyArray2, PyUntypedArray, PyUntypedArrayMethods,
};
use pyo3::prelude::*;

use metis_async_core::robust;

use crate::error::{BindingError, Result};
use crate::py_arrays::{
    borrow_error, detached, dtype_name, filled_array, readonly, type_name, values,
};

fn not_f32(what: &'static str, got: String) -> BindingError {
    BindingError::not_float32(what, got)
}

/// The updates of one call, borrowed.
enum Updates<'py> {
    Stack(PyReadonlyArray2<'py, f32>),
    Rows(Vec<PyReadonlyArray1<'py, f32>>),
}

impl<'py> Updates<'py> {
    fn borrow(object: &Bound<'py, PyAny>) -> Result<Self> {
        if let Ok(untyped) = object.cast::<PyUntypedArray>() {
            if untyped.ndim() != 2 {
                let got = format!("a {}-D array", untyped.ndim());
                return Err(BindingError::NotUpdates(got));
            }
            if !untyped.dtype().is_equiv_to(&dtype::<f32>(object.py())) {
                return Err(not_f32("updates", dtype_name(&untyped.dtype())));
            }
            if !untyped.is_c_contiguous() {
                return Err(BindingError::NotContiguous);
            }
            let stack = object
                .cast::<PyArray2<f32>>()
                .map_err(|_| BindingError::NotAnArray(type_name(object)))?;
            return Ok(Self::Stack(stack.try_readonly().map_err(borrow_error)?));
        }
        let rows: Vec<Bound<'py, PyAny>> = object
            .extract()
            .map_err(|_| BindingError::NotUpdates(type_name(object)))?;
        rows.iter()
            .enumerate()
            .map(|(i, row)| readonly(row, "update", not_f32).map_err(|e| e.in_update(i)))
            .collect::<Result<_>>()
            .map(Self::Rows)
    }

    /// One slice per update.
    fn rows(&self) -> Result<Vec<&[f32]>> {
        match self {
            Self::Stack(stack) => {
                let [n, d] = [stack.shape()[0], stack.shape()[1]];
                let data = stack
                    .as_slice()
                    .map_err(|_| BindingError::Borrow("array data is misaligned".into()))?;
                Ok(if d == 0 {
                    vec![&data[..0]; n]
                } else {
                    data.chunks_exact(d).collect()
                })
            }
            Self::Rows(rows) => rows.iter().map(values).collect(),
        }
    }
}

/// A count given as a Python int, checked to be >= 0.
fn count(name: &'static str, value: i64) -> Result<usize> {
    usize::try_from(value).map_err(|_| BindingError::Negative { name, value })
}

/// The per-coordinate median of the updates (mean of the two middle values for even n).
#[pyfunction]
pub fn coordinate_median<'py>(
    py: Python<'py>,
    updates: &Bound<'py, PyAny>,
) -> Result<Bound<'py, PyArray1<f32>>> {
    let updates = Updates::borrow(updates)?;
    let rows = updates.rows()?;
    let len = rows.first().map_or(0, |r| r.len());
    Ok(filled_array(py, len, |out| robust::coordinate_median_into(&rows, out))?.0)
}

/// The per-coordinate mean without the floor(beta·n) largest and smallest values.
#[pyfunction]
pub fn trimmed_mean<'py>(
    py: Python<'py>,
    updates: &Bound<'py, PyAny>,
    beta: f64,
) -> Result<Bound<'py, PyArray1<f32>>> {
    let updates = Updates::borrow(updates)?;
    let rows = updates.rows()?;
    let len = rows.first().map_or(0, |r| r.len());
    Ok(filled_array(py, len, |out| robust::trimmed_mean_into(&rows, beta, out))?.0)
}

/// Krum scores (float64): summed squared distances to the n − f − 2 nearest other updates.
#[pyfunction]
pub fn krum_scores<'py>(
    py: Python<'py>,
    updates: &Bound<'py, PyAny>,
    f: i64,
) -> Result<Bound<'py, PyArray1<f64>>> {
    let f = count("f", f)?;
    let updates = Updates::borrow(updates)?;
    let rows = updates.rows()?;
    let scores = detached(py, || robust::krum_scores(&rows, f))?;
    Ok(PyArray1::from_vec(py, scores))
}

/// Krum: the index of the update with the lowest score.
#[pyfunction]
pub fn krum(py: Python<'_>, updates: &Bound<'_, PyAny>, f: i64) -> Result<usize> {
    let f = count("f", f)?;
    let updates = Updates::borrow(updates)?;
    let rows = updates.rows()?;
    detached(py, || robust::krum(&rows, f))
}

/// Multi-Krum: the mean of the m updates with the lowest Krum scores (m defaults to n − f).
#[pyfunction]
#[pyo3(signature = (updates, f, m = None))]
pub fn multi_krum<'py>(
    py: Python<'py>,
    updates: &Bound<'py, PyAny>,
    f: i64,
    m: Option<i64>,
) -> Result<Bound<'py, PyArray1<f32>>> {
    let f = count("f", f)?;
    let m = m.map(|m| count("m", m)).transpose()?;
    let updates = Updates::borrow(updates)?;
    let rows = updates.rows()?;
    let len = rows.first().map_or(0, |r| r.len());
    Ok(filled_array(py, len, |out| robust::multi_krum_into(&rows, f, m, out))?.0)
}

/// A new array: `update · min(1, max_norm / ‖update‖)`.
#[pyfunction]
pub fn clip_by_norm<'py>(
    py: Python<'py>,
    update: &Bound<'py, PyAny>,
    max_norm: f64,
) -> Result<Bound<'py, PyArray1<f32>>> {
    let array = readonly(update, "update", not_f32)?;
    let update = values(&array)?;
    Ok(filled_array(py, update.len(), |out| {
        robust::clip_by_norm_into(update, max_norm, out)
    })?
    .0)
}
