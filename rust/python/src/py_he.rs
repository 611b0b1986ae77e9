//! Python binding of homomorphic aggregation (`he`): `HeContext` (keys, encrypt, decrypt),
//! `CipherSum` (the controller's keyless weighted sum), and the multiparty mode: `HeParty` (a
//! committee member's secret share), `he_collective_public_key`, `he_combine`.
//!
//! Ciphertexts cross as `bytes` (`PyBackedBytes`: borrowed, no copy) and every O(model) call runs
//! with the GIL released. Errors become `metis_async._core.EncryptionError` (a `ValueError`).

use std::sync::{Mutex, MutexGuard, PoisonError};

use metis_async_core::he::{
    collective_public_key, combine, CipherSum, HeContext, HeParty, HeSettings, Smudging,
};
use numpy::PyArray1;
use pyo3::prelude::*;
use pyo3::pybacked::PyBackedBytes;
use pyo3::types::PyBytes;

use crate::error::{BindingError, Result};
use crate::py_arrays::{self, readonly};

fn not_f32(what: &'static str, got: String) -> BindingError {
    BindingError::not_float32(what, got)
}

fn slices(ciphertexts: &[PyBackedBytes]) -> Vec<&[u8]> {
    ciphertexts.iter().map(|c| c.as_ref()).collect()
}

fn to_list<'py>(py: Python<'py>, lists: Vec<Vec<u8>>) -> Vec<Bound<'py, PyBytes>> {
    lists.iter().map(|b| PyBytes::new(py, b)).collect()
}

/// BFV settings and parameters: what every party needs besides its key.
#[pyclass(name = "HeContext", module = "metis_async._core", frozen)]
pub struct PyHeContext {
    inner: HeContext,
}

#[pymethods]
impl PyHeContext {
    #[new]
    #[pyo3(signature = (
        degree = 4096,
        moduli_bits = vec![54, 55],
        plaintext_bits = 40,
        scale_bits = 16,
        clip = 4.0,
        max_total_weight = 1 << 20,
    ))]
    fn new(
        degree: usize,
        moduli_bits: Vec<usize>,
        plaintext_bits: u32,
        scale_bits: u32,
        clip: f64,
        max_total_weight: u64,
    ) -> Result<Self> {
        let settings = HeSettings {
            degree,
            moduli_bits,
            plaintext_bits,
            scale_bits,
            clip,
            max_total_weight,
        };
        Ok(Self {
            inner: HeContext::new(settings)?,
        })
    }

    #[getter]
    fn degree(&self) -> usize {
        self.inner.settings.degree
    }

    #[getter]
    fn moduli_bits(&self) -> Vec<usize> {
        self.inner.settings.moduli_bits.clone()
    }

    #[getter]
    fn plaintext_bits(&self) -> u32 {
        self.inner.settings.plaintext_bits
    }

    #[getter]
    fn scale_bits(&self) -> u32 {
        self.inner.settings.scale_bits
    }

    #[getter]
    fn clip(&self) -> f64 {
        self.inner.settings.clip
    }

    #[getter]
    fn max_total_weight(&self) -> u64 {
        self.inner.settings.max_total_weight
    }

    fn ciphertexts_for(&self, length: usize) -> usize {
        self.inner.ciphertexts_for(length)
    }

    fn generate_keys<'py>(&self, py: Python<'py>) -> (Bound<'py, PyBytes>, Bound<'py, PyBytes>) {
        let (secret, public) = py.detach(|| self.inner.generate_keys());
        (PyBytes::new(py, &secret), PyBytes::new(py, &public))
    }

    fn encrypt<'py>(
        &self,
        py: Python<'py>,
        public_key: PyBackedBytes,
        values: &Bound<'py, PyAny>,
    ) -> Result<Vec<Bound<'py, PyBytes>>> {
        let array = readonly::<f32>(values, "values", not_f32)?;
        let data = py_arrays::values(&array)?;
        let lists = py_arrays::detached(py, || self.inner.encrypt(&public_key, data))?;
        Ok(to_list(py, lists))
    }

    #[pyo3(signature = (secret_key, ciphertexts, length, divisor = 1.0))]
    fn decrypt<'py>(
        &self,
        py: Python<'py>,
        secret_key: PyBackedBytes,
        ciphertexts: Vec<PyBackedBytes>,
        length: usize,
        divisor: f64,
    ) -> Result<Bound<'py, PyArray1<f32>>> {
        let refs = slices(&ciphertexts);
        let out = py_arrays::detached(py, || {
            self.inner.decrypt(&secret_key, &refs, length, divisor)
        })?;
        Ok(PyArray1::from_vec(py, out))
    }

    fn sum(&self) -> PyCipherSum {
        PyCipherSum {
            inner: Mutex::new(CipherSum::new(self.inner.clone())),
        }
    }
}

/// A running weighted sum of ciphertext lists, computed without any key.
#[pyclass(name = "CipherSum", module = "metis_async._core", frozen)]
pub struct PyCipherSum {
    inner: Mutex<CipherSum>,
}

impl PyCipherSum {
    fn lock(&self) -> Result<MutexGuard<'_, CipherSum>> {
        self.inner
            .lock()
            .map_err(|_: PoisonError<_>| BindingError::AccumulatorPoisoned)
    }
}

#[pymethods]
impl PyCipherSum {
    fn add(&self, py: Python<'_>, ciphertexts: Vec<PyBackedBytes>, weight: u64) -> Result<()> {
        let refs = slices(&ciphertexts);
        py_arrays::detached(py, || -> Result<()> {
            Ok(self.lock()?.add(&refs, weight)?)
        })
    }

    fn add_partial(
        &self,
        py: Python<'_>,
        ciphertexts: Vec<PyBackedBytes>,
        total_weight: u64,
        count: u64,
    ) -> Result<()> {
        let refs = slices(&ciphertexts);
        py_arrays::detached(py, || -> Result<()> {
            Ok(self.lock()?.add_partial(&refs, total_weight, count)?)
        })
    }

    fn ciphertexts<'py>(&self, py: Python<'py>) -> Result<Vec<Bound<'py, PyBytes>>> {
        let lists = py_arrays::detached(py, || Ok::<_, BindingError>(self.lock()?.to_bytes()))?;
        Ok(to_list(py, lists))
    }

    #[getter]
    fn total_weight(&self) -> Result<u64> {
        Ok(self.lock()?.total_weight)
    }

    #[getter]
    fn count(&self) -> Result<u64> {
        Ok(self.lock()?.count)
    }

    fn __len__(&self) -> Result<usize> {
        Ok(self.lock()?.len())
    }

    fn reset(&self) -> Result<()> {
        self.lock()?.reset();
        Ok(())
    }
}

/// One member of a multiparty committee: its secret share of the collective key.
#[pyclass(name = "HeParty", module = "metis_async._core", frozen)]
pub struct PyHeParty {
    inner: HeParty,
}

#[pymethods]
impl PyHeParty {
    #[new]
    fn new(
        context: &PyHeContext,
        index: usize,
        parties: usize,
        crs: PyBackedBytes,
    ) -> Result<Self> {
        Ok(Self {
            inner: HeParty::generate(context.inner.clone(), index, parties, &crs)?,
        })
    }

    #[staticmethod]
    fn from_secret(context: &PyHeContext, secret: PyBackedBytes) -> Result<Self> {
        Ok(Self {
            inner: HeParty::from_secret(context.inner.clone(), &secret)?,
        })
    }

    #[getter]
    fn index(&self) -> usize {
        self.inner.index()
    }

    #[getter]
    fn parties(&self) -> usize {
        self.inner.parties()
    }

    #[getter]
    fn crs<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.inner.crs())
    }

    #[getter]
    fn smudging_bits(&self) -> u32 {
        self.inner.smudging().bits
    }

    fn secret<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.inner.secret())
    }

    fn key_share<'py>(&self, py: Python<'py>) -> Result<Bound<'py, PyBytes>> {
        let share = py_arrays::detached(py, || self.inner.key_share())?;
        Ok(PyBytes::new(py, &share))
    }

    fn decryption_shares<'py>(
        &self,
        py: Python<'py>,
        ciphertexts: Vec<PyBackedBytes>,
    ) -> Result<Vec<Bound<'py, PyBytes>>> {
        let refs = slices(&ciphertexts);
        let lists = py_arrays::detached(py, || self.inner.decryption_shares(&refs))?;
        Ok(to_list(py, lists))
    }
}

/// The collective public key from every party's key share.
#[pyfunction]
pub fn he_collective_public_key<'py>(
    py: Python<'py>,
    context: &PyHeContext,
    crs: PyBackedBytes,
    shares: Vec<PyBackedBytes>,
) -> Result<Bound<'py, PyBytes>> {
    let refs = slices(&shares);
    let key = py_arrays::detached(py, || collective_public_key(&context.inner, &crs, &refs))?;
    Ok(PyBytes::new(py, &key))
}

/// Decrypt a sum from its ciphertexts and every party's decryption shares.
#[pyfunction]
#[pyo3(signature = (context, ciphertexts, shares_per_party, length, divisor = 1.0))]
pub fn he_combine<'py>(
    py: Python<'py>,
    context: &PyHeContext,
    ciphertexts: Vec<PyBackedBytes>,
    shares_per_party: Vec<Vec<PyBackedBytes>>,
    length: usize,
    divisor: f64,
) -> Result<Bound<'py, PyArray1<f32>>> {
    let refs = slices(&ciphertexts);
    let shares: Vec<Vec<&[u8]>> = shares_per_party.iter().map(|s| slices(s)).collect();
    let out = py_arrays::detached(py, || {
        combine(&context.inner, &refs, &shares, length, divisor)
    })?;
    Ok(PyArray1::from_vec(py, out))
}

/// The smudging noise of a committee of `parties`: (bits, margin_bits).
#[pyfunction]
pub fn he_smudging(context: &PyHeContext, parties: usize) -> Result<(u32, f64)> {
    let smudging = Smudging::new(&context.inner, parties)?;
    Ok((smudging.bits, smudging.margin_bits))
}
