//! Python bindings of metis-async-core, built by maturin as `metis_async._core`.
//!
//! This file is a table of contents: the binding modules, and the Python module that exports
//! their names. The only crate that says `pyo3`; the work itself is in `rust/core`.

mod error;
mod py_accumulate;
mod py_arrays;
mod py_chunks;
mod py_he;
mod py_optim;
mod py_robust;
mod py_secagg;
mod py_segments;

use pyo3::prelude::*;

/// Aggregation core of metis-async: streaming weighted accumulation and chunk reassembly in
/// Rust.
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
    let py = m.py();
    m.add(
        "AggregationError",
        py.get_type::<error::exceptions::AggregationError>(),
    )?;
    m.add(
        "EncryptionError",
        py.get_type::<error::exceptions::EncryptionError>(),
    )?;
    m.add(
        "SecAggError",
        py.get_type::<error::exceptions::SecAggError>(),
    )?;
    m.add(
        "WireFormatError",
        py.get_type::<error::exceptions::WireFormatError>(),
    )?;
    m.add_class::<py_accumulate::PyAccumulator>()?;
    m.add_function(wrap_pyfunction!(py_accumulate::weighted_average, m)?)?;
    m.add_function(wrap_pyfunction!(py_accumulate::first_non_finite, m)?)?;
    m.add_class::<py_optim::PyServerOptimizer>()?;
    m.add_function(wrap_pyfunction!(py_robust::coordinate_median, m)?)?;
    m.add_function(wrap_pyfunction!(py_robust::trimmed_mean, m)?)?;
    m.add_function(wrap_pyfunction!(py_robust::krum_scores, m)?)?;
    m.add_function(wrap_pyfunction!(py_robust::krum, m)?)?;
    m.add_function(wrap_pyfunction!(py_robust::multi_krum, m)?)?;
    m.add_function(wrap_pyfunction!(py_robust::clip_by_norm, m)?)?;
    m.add_class::<py_chunks::PyChunkAssembler>()?;
    m.add_class::<py_segments::PyInPlaceAssembler>()?;
    m.add_class::<py_segments::PySegments>()?;
    m.add_function(wrap_pyfunction!(py_chunks::peek_chunk, m)?)?;
    m.add_function(wrap_pyfunction!(py_chunks::encode_chunk_messages, m)?)?;
    m.add_class::<py_he::PyHeContext>()?;
    m.add_class::<py_he::PyCipherSum>()?;
    m.add_class::<py_he::PyHeParty>()?;
    m.add_function(wrap_pyfunction!(py_he::he_collective_public_key, m)?)?;
    m.add_function(wrap_pyfunction!(py_he::he_combine, m)?)?;
    m.add_function(wrap_pyfunction!(py_he::he_smudging, m)?)?;
    m.add_class::<py_secagg::PySecAggLearner>()?;
    m.add_function(wrap_pyfunction!(py_secagg::secagg_unmask_sum, m)?)?;
    m.add_function(wrap_pyfunction!(py_secagg::secagg_unmask_total, m)?)?;
    m.add_function(wrap_pyfunction!(py_secagg::secagg_mean, m)?)?;
    Ok(())
}
