//! metis-async aggregation core, exposed to Python as `metis_async._core`.
//!
//! This file is a table of contents: the pure-Rust modules, and the Python module that exports
//! the bindings from `py`.

pub mod accumulate;
pub mod error;
pub mod optim;
mod py;
mod py_arrays;
mod py_optim;
mod py_robust;
pub mod robust;

use pyo3::prelude::*;

/// Aggregation core of metis-async: streaming weighted accumulation in Rust.
#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add(
        "build_profile",
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
    )?;
    m.add(
        "AggregationError",
        m.py().get_type::<py::exceptions::AggregationError>(),
    )?;
    m.add_class::<py::PyAccumulator>()?;
    m.add_function(wrap_pyfunction!(py::weighted_average, m)?)?;
    m.add_function(wrap_pyfunction!(py::first_non_finite, m)?)?;
    m.add_class::<py_optim::PyServerOptimizer>()?;
    m.add_function(wrap_pyfunction!(py_robust::coordinate_median, m)?)?;
    m.add_function(wrap_pyfunction!(py_robust::trimmed_mean, m)?)?;
    m.add_function(wrap_pyfunction!(py_robust::krum_scores, m)?)?;
    m.add_function(wrap_pyfunction!(py_robust::krum, m)?)?;
    m.add_function(wrap_pyfunction!(py_robust::multi_krum, m)?)?;
    m.add_function(wrap_pyfunction!(py_robust::clip_by_norm, m)?)?;
    Ok(())
}
