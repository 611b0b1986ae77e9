//! Python binding of the server optimizers (`optim`): the `ServerOptimizer` class.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use numpy::PyArray1;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyMapping, PyMappingMethods};

use metis_async_core::optim::{self, Hyperparameters, OptimError, Rule};

use crate::error::{BindingError, Result};
use crate::py_arrays::{borrow_error, detached, readonly, readwrite, type_name, values};

fn not_f32(what: &'static str, got: String) -> BindingError {
    BindingError::not_float32(what, got)
}

/// A server optimizer that owns its moment vectors (float32, next to the model): FedAvg, FedAvgM,
/// FedAdagrad, FedAdam, FedYogi.
///
/// Safe to share between Python threads: calls are serialized by an internal lock that is taken
/// with the GIL released.
#[pyclass(frozen, name = "ServerOptimizer", module = "metis_async._core")]
pub struct PyServerOptimizer {
    rule: Rule,
    len: usize,
    state: Mutex<optim::ServerOptimizer>,
    /// Mirrors the step count so `steps` answers at once even during a long `step`.
    steps: AtomicU64,
}

impl PyServerOptimizer {
    fn locked(&self) -> Result<MutexGuard<'_, optim::ServerOptimizer>> {
        self.state
            .lock()
            .map_err(|_| BindingError::OptimizerPoisoned)
    }
}

#[pymethods]
impl PyServerOptimizer {
    #[new]
    #[pyo3(signature = (kind, length, lr = None, *, momentum = None, beta1 = None, beta2 = None, tau = None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        kind: &str,
        length: usize,
        lr: Option<f64>,
        momentum: Option<f64>,
        beta1: Option<f64>,
        beta2: Option<f64>,
        tau: Option<f64>,
    ) -> Result<Self> {
        let hyper = Hyperparameters {
            lr,
            momentum,
            beta1,
            beta2,
            tau,
        };
        let rule = Rule::from_name(kind, hyper)?;
        let state = detached(py, || optim::ServerOptimizer::new(rule, length))?;
        Ok(Self {
            rule,
            len: length,
            state: Mutex::new(state),
            steps: AtomicU64::new(0),
        })
    }

    /// Moves `params` (float32, updated in place) along the server `delta` (float32).
    fn step(
        &self,
        py: Python<'_>,
        params: &Bound<'_, PyAny>,
        delta: &Bound<'_, PyAny>,
    ) -> Result<()> {
        let delta = readonly(delta, "delta", not_f32)?;
        let delta = values(&delta)?;
        let mut params = readwrite(params, "params", not_f32)?;
        let params = params.as_slice_mut().map_err(borrow_error)?;
        detached(py, || {
            let mut state = self.locked()?;
            state.step(params, delta)?;
            self.steps.store(state.steps(), Ordering::Relaxed);
            Ok::<_, BindingError>(())
        })
    }

    /// A copy of the moment vectors the kind keeps (float32): `m`, and `v` where kept.
    fn state<'py>(&self, py: Python<'py>) -> Result<Bound<'py, PyDict>> {
        let (m, v) = detached(py, || {
            let state = self.locked()?;
            let saved = state.state();
            Ok::<_, BindingError>((saved.m.map(<[f32]>::to_vec), saved.v.map(<[f32]>::to_vec)))
        })?;
        let dict = PyDict::new(py);
        for (name, values) in [("m", m), ("v", v)] {
            if let Some(values) = values {
                // The Vec's memory becomes the array's: no second copy.
                dict.set_item(name, PyArray1::from_vec(py, values))?;
            }
        }
        Ok(dict)
    }

    /// Restores the moments from `state()` of an optimizer of the same kind and length, and
    /// the step count; on error nothing changes. Also recovers from a poisoned lock.
    #[pyo3(signature = (state, steps = 0))]
    fn load_state(&self, py: Python<'_>, state: &Bound<'_, PyAny>, steps: u64) -> Result<()> {
        let kind = self.rule.name();
        let items = state
            .cast::<PyMapping>()
            .map_err(|_| BindingError::NotAState(type_name(state)))?
            .items()?;
        let (mut m, mut v) = (None, None);
        for item in items.iter() {
            let (key, value): (Bound<'_, PyAny>, Bound<'_, PyAny>) = item.extract()?;
            let name = key.str()?.to_string();
            match name.as_str() {
                "m" => m = Some(readonly(&value, "state['m']", not_f32)?),
                "v" => v = Some(readonly(&value, "state['v']", not_f32)?),
                _ => return Err(OptimError::UnexpectedState { kind, name }.into()),
            }
        }
        let m = m.as_ref().map(values).transpose()?;
        let v = v.as_ref().map(values).transpose()?;
        detached(py, || {
            let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            state.load_state(optim::State { steps, m, v })?;
            self.state.clear_poison();
            self.steps.store(steps, Ordering::Relaxed);
            Ok::<_, BindingError>(())
        })
    }

    /// The canonical kind: fedavg, fedavgm, fedadagrad, fedadam or fedyogi.
    #[getter]
    fn kind(&self) -> &'static str {
        self.rule.name()
    }

    /// The hyperparameters this kind uses, defaults filled in.
    #[getter]
    fn hyperparameters<'py>(&self, py: Python<'py>) -> Result<Bound<'py, PyDict>> {
        let dict = PyDict::new(py);
        for (name, value) in self.rule.hyperparameters() {
            dict.set_item(name, value)?;
        }
        Ok(dict)
    }

    /// Number of successful steps (as restored by `load_state`).
    #[getter]
    fn steps(&self) -> u64 {
        self.steps.load(Ordering::Relaxed)
    }

    fn __len__(&self) -> usize {
        self.len
    }

    fn __repr__(&self) -> String {
        let hyper: Vec<String> = self
            .rule
            .hyperparameters()
            .iter()
            .map(|(name, value)| format!("{name}={value:?}"))
            .collect();
        format!(
            "ServerOptimizer(kind='{}', length={}, {}, steps={})",
            self.rule.name(),
            self.len,
            hyper.join(", "),
            self.steps()
        )
    }
}
