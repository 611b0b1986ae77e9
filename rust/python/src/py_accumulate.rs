//! Python binding of the streaming accumulator (`accumulate`): the `Accumulator` class,
//! `weighted_average` and `first_non_finite`.
//!
//! Arrays are borrowed zero-copy and every O(model) call runs with the GIL released through
//! [`detached`]. Errors are [`BindingError`]s, so wrong dtype, dimensionality and layout reach
//! Python as the same `AggregationError` as the core's own errors.

use std::sync::{Mutex, MutexGuard, PoisonError};

use metis_async_core::accumulate;
use metis_async_core::codec::Codec;
use numpy::{
    dtype, PyArray1, PyArrayDescrMethods, PyArrayMethods, PyReadonlyArray1, PyUntypedArray,
    PyUntypedArrayMethods,
};
use pyo3::prelude::*;

use crate::error::{BindingError, Result};
use crate::py_arrays::{self, dtype_name, type_name};
use crate::py_segments::PySegments;

/// Runs `work` with the GIL released ([`py_arrays::detached`]), typed to the bindings' error so
/// closures using `?` on core and binding errors alike infer it.
fn detached<T, F>(py: Python<'_>, work: F) -> Result<T>
where
    F: Send + FnOnce() -> Result<T>,
    T: Send,
{
    py_arrays::detached(py, work)
}

/// A new float32 array of `len` values, filled by `fill` with the GIL released.
fn filled_array<'py, F>(py: Python<'py>, len: usize, fill: F) -> Result<Bound<'py, PyArray1<f32>>>
where
    F: Send + FnOnce(&mut [f32]) -> Result<()>,
{
    py_arrays::filled_array(py, len, fill).map(|(array, ())| array)
}

/// A borrowed, C-contiguous, 1-D float32 or float64 numpy array.
enum Array<'py> {
    F32(PyReadonlyArray1<'py, f32>),
    F64(PyReadonlyArray1<'py, f64>),
}

/// The values of an [`Array`], ready to cross into GIL-free code.
#[derive(Clone, Copy)]
enum Values<'a> {
    F32(&'a [f32]),
    F64(&'a [f64]),
}

impl Values<'_> {
    fn len(&self) -> usize {
        match self {
            Self::F32(values) => values.len(),
            Self::F64(values) => values.len(),
        }
    }
}

impl PyAccumulator {
    /// `add_many` when some updates are `Segments` (kept in their chunk messages, float32 or a
    /// codec): every update is read (decoded) where it lies, float32 arrays as one segment; the
    /// same bits as assembling (decoding) first.
    fn add_many_segments(
        &self,
        py: Python<'_>,
        updates: &[Bound<'_, PyAny>],
        weights: Vec<f64>,
        check_finite: bool,
    ) -> Result<()> {
        if check_finite {
            return Err(BindingError::Borrow(
                "Segments are checked for NaN/infinity on arrival: pass check_finite=False".into(),
            ));
        }
        let arrays: Vec<Option<PyReadonlyArray1<'_, f32>>> = updates
            .iter()
            .enumerate()
            .map(|(i, u)| match u.cast::<PySegments>() {
                Ok(_) => Ok(None),
                Err(_) => readonly::<f32>(u).map(Some).map_err(|e| e.in_update(i)),
            })
            .collect::<Result<_>>()?;
        let segments: Vec<Option<Bound<'_, PySegments>>> = updates
            .iter()
            .map(|u| u.cast::<PySegments>().ok().cloned())
            .collect();
        let mut pieces: Vec<accumulate::EncodedUpdate<'_>> = Vec::with_capacity(updates.len());
        for (array, segment) in arrays.iter().zip(&segments) {
            pieces.push(match (array, segment) {
                (Some(array), _) => {
                    let values = array
                        .as_slice()
                        .map_err(|_| BindingError::Borrow("array data is misaligned".into()))?;
                    accumulate::EncodedUpdate {
                        codec: Codec::Float32,
                        parts: vec![(as_le_bytes(values), 0.0)],
                    }
                }
                (None, Some(segment)) => accumulate::EncodedUpdate {
                    codec: segment.get().codec(),
                    parts: segment.get().slices(py),
                },
                (None, None) => unreachable!("every update is an array or Segments"),
            });
        }
        detached(py, || {
            let mut state = self.state()?;
            state.add_many_encoded(&pieces, &weights)?;
            self.publish(&state);
            Ok(())
        })
    }
}

/// The bytes of float32 `values` (little-endian on every target this crate builds for).
fn as_le_bytes(values: &[f32]) -> &[u8] {
    // SAFETY: same memory and lifetime as `values`; u8 has alignment 1 and no invalid patterns.
    unsafe {
        std::slice::from_raw_parts(values.as_ptr().cast::<u8>(), std::mem::size_of_val(values))
    }
}

/// Borrows every update (float32 or float64 arrays); an error names the update.
fn borrow_all<'py>(updates: &[Bound<'py, PyAny>]) -> Result<Vec<Array<'py>>> {
    updates
        .iter()
        .enumerate()
        .map(|(i, update)| Array::borrow(update).map_err(|e| e.in_update(i)))
        .collect()
}

impl<'py> Array<'py> {
    fn borrow(object: &Bound<'py, PyAny>) -> Result<Self> {
        let untyped = object
            .cast::<PyUntypedArray>()
            .map_err(|_| BindingError::NotAnArray(type_name(object)))?;
        if untyped.ndim() != 1 {
            return Err(BindingError::NotOneDimensional(untyped.ndim()));
        }
        let py = object.py();
        let descr = untyped.dtype();
        let is_f32 = descr.is_equiv_to(&dtype::<f32>(py));
        if !is_f32 && !descr.is_equiv_to(&dtype::<f64>(py)) {
            return Err(BindingError::DType(dtype_name(&descr)));
        }
        if !untyped.is_c_contiguous() {
            return Err(BindingError::NotContiguous);
        }
        Ok(if is_f32 {
            Self::F32(readonly(object)?)
        } else {
            Self::F64(readonly(object)?)
        })
    }

    fn values(&self) -> Result<Values<'_>> {
        let misaligned = |_| BindingError::Borrow("array data is misaligned".into());
        Ok(match self {
            Self::F32(array) => Values::F32(array.as_slice().map_err(misaligned)?),
            Self::F64(array) => Values::F64(array.as_slice().map_err(misaligned)?),
        })
    }
}

fn readonly<'py, T: numpy::Element>(
    object: &Bound<'py, PyAny>,
) -> Result<PyReadonlyArray1<'py, T>> {
    let array = object
        .cast::<PyArray1<T>>()
        .map_err(|_| BindingError::NotAnArray(type_name(object)))?;
    array
        .try_readonly()
        .map_err(|e| BindingError::Borrow(e.to_string()))
}

/// Counters mirrored out of the locked state after every change, so `count` and `total_weight`
/// answer at once even while another thread is inside a long `add`.
#[derive(Clone, Copy, Default)]
struct Counters {
    count: u64,
    total_weight: f64,
}

/// Streaming weighted accumulator: a float64 running sum of `weight * update`.
///
/// Safe to share between Python threads: calls are serialized by an internal lock that is taken
/// with the GIL released.
#[pyclass(frozen, name = "Accumulator", module = "metis_async._core")]
pub struct PyAccumulator {
    len: usize,
    state: Mutex<accumulate::Accumulator>,
    counters: Mutex<Counters>,
}

impl PyAccumulator {
    fn state(&self) -> Result<MutexGuard<'_, accumulate::Accumulator>> {
        self.state
            .lock()
            .map_err(|_| BindingError::AccumulatorPoisoned)
    }

    fn counters(&self) -> Counters {
        *self.counters.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Publishes the counters of `state`; called with the state lock held, so they stay in step.
    fn publish(&self, state: &accumulate::Accumulator) {
        *self.counters.lock().unwrap_or_else(PoisonError::into_inner) = Counters {
            count: state.count(),
            total_weight: state.total_weight(),
        };
    }
}

#[pymethods]
impl PyAccumulator {
    #[new]
    fn new(py: Python<'_>, length: usize) -> Result<Self> {
        let state = detached(py, || Ok(accumulate::Accumulator::try_new(length)?))?;
        Ok(Self {
            len: length,
            state: Mutex::new(state),
            counters: Mutex::new(Counters::default()),
        })
    }

    /// Adds `weight * values`; on error nothing changes.
    fn add(&self, py: Python<'_>, values: &Bound<'_, PyAny>, weight: f64) -> Result<()> {
        let array = Array::borrow(values)?;
        let values = array.values()?;
        detached(py, || {
            let mut state = self.state()?;
            match values {
                Values::F32(values) => state.add(values, weight)?,
                Values::F64(values) => state.add(values, weight)?,
            }
            self.publish(&state);
            Ok(())
        })
    }

    /// Adds several updates at once (all float32 or all float64), reading the float64 sums once
    /// for the whole group; the same result as adding them one by one. On error nothing
    /// changes. `check_finite=False` skips the NaN/infinity pass for values the caller checked.
    #[pyo3(signature = (updates, weights, check_finite = true))]
    fn add_many(
        &self,
        py: Python<'_>,
        updates: Vec<Bound<'_, PyAny>>,
        weights: Vec<f64>,
        check_finite: bool,
    ) -> Result<()> {
        if updates.iter().any(|u| u.cast::<PySegments>().is_ok()) {
            return self.add_many_segments(py, &updates, weights, check_finite);
        }
        let arrays = borrow_all(&updates)?;
        let values = arrays
            .iter()
            .map(Array::values)
            .collect::<Result<Vec<_>>>()?;
        detached(py, || {
            let mut state = self.state()?;
            match values.first() {
                Some(Values::F64(_)) => {
                    let slices = same_dtype(&values, |v| match v {
                        Values::F64(s) => Some(s),
                        Values::F32(_) => None,
                    })?;
                    state.add_many(&slices, &weights, check_finite)?;
                }
                _ => {
                    let slices = same_dtype(&values, |v| match v {
                        Values::F32(s) => Some(s),
                        Values::F64(_) => None,
                    })?;
                    state.add_many(&slices, &weights, check_finite)?;
                }
            }
            self.publish(&state);
            Ok(())
        })
    }

    /// The weighted mean `sum / total_weight` as float32.
    fn mean<'py>(&self, py: Python<'py>) -> Result<Bound<'py, PyArray1<f32>>> {
        filled_array(py, self.len, |out| Ok(self.state()?.mean_into(out)?))
    }

    /// The weighted sum as float32.
    fn weighted_sum<'py>(&self, py: Python<'py>) -> Result<Bound<'py, PyArray1<f32>>> {
        filled_array(py, self.len, |out| {
            Ok(self.state()?.weighted_sum_into(out)?)
        })
    }

    /// `base + scale * (mean if normalize else sum)`, computed in float64.
    #[pyo3(signature = (base, scale = 1.0, normalize = true))]
    fn apply<'py>(
        &self,
        py: Python<'py>,
        base: &Bound<'py, PyAny>,
        scale: f64,
        normalize: bool,
    ) -> Result<Bound<'py, PyArray1<f32>>> {
        let array = Array::borrow(base)?;
        let Values::F32(base) = array.values()? else {
            return Err(BindingError::BaseDType("float64".into()));
        };
        filled_array(py, self.len, |out| {
            Ok(self.state()?.apply_into(base, scale, normalize, out)?)
        })
    }

    /// The partial sum `(sum, total_weight, count)`, `sum` a float64 copy, for
    /// [`merge`](Self::merge) into another accumulator (another process's, say).
    fn export<'py>(&self, py: Python<'py>) -> Result<(Bound<'py, PyArray1<f64>>, f64, u64)> {
        let (array, (total_weight, count)) = py_arrays::filled_array(py, self.len, |out| {
            let state = self.state()?;
            out.copy_from_slice(state.sum());
            Ok::<_, BindingError>((state.total_weight(), state.count()))
        })?;
        Ok((array, total_weight, count))
    }

    /// Adds an exported partial sum: `sum` float64 of `len(self)` finite values, and the
    /// `total_weight` and `count` of the updates in it. Validated first; on error nothing
    /// changes.
    fn merge(
        &self,
        py: Python<'_>,
        sum: &Bound<'_, PyAny>,
        total_weight: f64,
        count: u64,
    ) -> Result<()> {
        let array: PyReadonlyArray1<'_, f64> =
            py_arrays::readonly(sum, "sum", |what, got| BindingError::WrongDType {
                what,
                expected: "float64",
                got,
            })?;
        let sum = py_arrays::values(&array)?;
        detached(py, || {
            let mut state = self.state()?;
            state.merge(sum, total_weight, count)?;
            self.publish(&state);
            Ok(())
        })
    }

    /// Adds the partial sum of `other` (which is not changed; it may be `self`, which doubles
    /// the sums and counters).
    fn merge_from(&self, py: Python<'_>, other: &Bound<'_, PyAccumulator>) -> Result<()> {
        let other = other.get();
        detached(py, || {
            if std::ptr::eq(self, other) {
                let mut state = self.state()?;
                let (sum, total_weight, count) = state.export();
                state.merge(&sum, total_weight, count)?;
                self.publish(&state);
                return Ok(());
            }
            // Both locks, always in address order, so two threads merging a into b and b into
            // a cannot deadlock.
            let (mut state, theirs) = if (self as *const Self) < (other as *const Self) {
                let state = self.state()?;
                (state, other.state()?)
            } else {
                let theirs = other.state()?;
                (self.state()?, theirs)
            };
            state.merge_from(&theirs)?;
            drop(theirs);
            self.publish(&state);
            Ok(())
        })
    }

    /// Clears the sum, total weight and count (also recovers from a poisoned lock).
    fn reset(&self, py: Python<'_>) -> Result<()> {
        detached(py, || {
            let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            state.reset();
            self.state.clear_poison();
            self.publish(&state);
            Ok(())
        })
    }

    /// Number of updates added.
    #[getter]
    fn count(&self) -> u64 {
        self.counters().count
    }

    /// Sum of the weights added.
    #[getter]
    fn total_weight(&self) -> f64 {
        self.counters().total_weight
    }

    fn __len__(&self) -> usize {
        self.len
    }

    fn __repr__(&self) -> String {
        let Counters {
            count,
            total_weight,
        } = self.counters();
        format!(
            "Accumulator(length={}, count={count}, total_weight={total_weight:?})",
            self.len
        )
    }
}

/// Weighted mean of equally long float32 (or float64) updates, as float32.
#[pyfunction]
pub fn weighted_average<'py>(
    py: Python<'py>,
    updates: Vec<Bound<'py, PyAny>>,
    weights: Vec<f64>,
) -> Result<Bound<'py, PyArray1<f32>>> {
    let arrays = borrow_all(&updates)?;
    let values = arrays
        .iter()
        .map(Array::values)
        .collect::<Result<Vec<_>>>()?;
    let len = values.first().map_or(0, Values::len);
    match values.first() {
        Some(Values::F64(_)) => {
            let slices = same_dtype(&values, |v| match v {
                Values::F64(s) => Some(s),
                Values::F32(_) => None,
            })?;
            filled_array(py, len, |out| {
                Ok(accumulate::weighted_average_into(&slices, &weights, out)?)
            })
        }
        _ => {
            let slices = same_dtype(&values, |v| match v {
                Values::F32(s) => Some(s),
                Values::F64(_) => None,
            })?;
            filled_array(py, len, |out| {
                Ok(accumulate::weighted_average_into(&slices, &weights, out)?)
            })
        }
    }
}

/// Unwraps every update as one element type, naming the first that differs.
fn same_dtype<'a, T>(
    values: &[Values<'a>],
    pick: impl Fn(Values<'a>) -> Option<&'a [T]>,
) -> Result<Vec<&'a [T]>> {
    values
        .iter()
        .enumerate()
        .map(|(index, &v)| pick(v).ok_or(BindingError::MixedDTypes { index }))
        .collect()
}

/// Index of the first NaN or infinity in a float32 or float64 1-D array, or None if all are
/// finite. Checked in parallel with the GIL released, without allocating.
#[pyfunction]
pub fn first_non_finite(py: Python<'_>, values: &Bound<'_, PyAny>) -> Result<Option<usize>> {
    let array = Array::borrow(values)?;
    let values = array.values()?;
    detached(py, || {
        Ok(match values {
            Values::F32(values) => accumulate::first_non_finite(values),
            Values::F64(values) => accumulate::first_non_finite(values),
        })
    })
}
