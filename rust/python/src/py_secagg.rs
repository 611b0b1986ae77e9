//! Python binding of SecAgg+ (`secagg`): `SecAggLearner` (a learner's four steps) and
//! `secagg_unmask_sum` / `secagg_unmask_total` / `secagg_mean` (the server's side).
//!
//! Randomness comes from the operating system's CSPRNG (`rand::rng()`, ChaCha seeded from the
//! OS). O(model) steps run with the GIL released. Errors become `SecAggError` (a `ValueError`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Mutex, MutexGuard};

use metis_async_core::secagg::{
    mean_of_sum, unmask_sum, unmask_total, AdvertisedKeys, RoundSettings, SecAggError,
    SecAggLearner, SHARE_BYTES,
};
use numpy::{PyArray1, PyReadonlyArray1};
use pyo3::prelude::*;
use pyo3::pybacked::PyBackedBytes;
use pyo3::types::PyBytes;
use rand::Rng;

use crate::error::{BindingError, Result};
use crate::py_arrays::{self, readonly};

fn not_f32(what: &'static str, got: String) -> BindingError {
    BindingError::not_float32(what, got)
}

fn key32(bytes: &[u8], what: &str) -> Result<[u8; 32]> {
    bytes.try_into().map_err(|_| {
        SecAggError::Malformed(format!("{what} must be 32 bytes, got {}", bytes.len())).into()
    })
}

type Keys = BTreeMap<u32, (PyBackedBytes, PyBackedBytes)>;

fn advertised(keys: &Keys) -> Result<BTreeMap<u32, AdvertisedKeys>> {
    keys.iter()
        .map(|(&i, (sealing, masking))| {
            Ok((
                i,
                AdvertisedKeys {
                    sealing: key32(sealing, "a sealing key")?,
                    masking: key32(masking, "a masking key")?,
                },
            ))
        })
        .collect()
}

#[allow(clippy::too_many_arguments)]
fn settings(
    round: &[u8],
    learners: u32,
    neighbours: u32,
    threshold: u32,
    clip: f32,
    bits: u32,
) -> RoundSettings {
    RoundSettings {
        round: round.to_vec(),
        learners,
        neighbours,
        threshold,
        clip,
        bits,
    }
}

/// One learner's state through a SecAgg+ round.
#[pyclass(name = "SecAggLearner", module = "metis_async._core", frozen)]
pub struct PySecAggLearner {
    inner: Mutex<SecAggLearner>,
}

impl PySecAggLearner {
    fn lock(&self) -> Result<MutexGuard<'_, SecAggLearner>> {
        self.inner
            .lock()
            .map_err(|_| BindingError::AccumulatorPoisoned)
    }
}

#[pymethods]
impl PySecAggLearner {
    #[new]
    #[pyo3(signature = (round, learners, neighbours, threshold, index, clip = 1.0, bits = 16))]
    fn new(
        round: &[u8],
        learners: u32,
        neighbours: u32,
        threshold: u32,
        index: u32,
        clip: f32,
        bits: u32,
    ) -> Result<Self> {
        let s = settings(round, learners, neighbours, threshold, clip, bits);
        let mut rng = rand::rng();
        let learner = SecAggLearner::new(s, index, || rng.random())?;
        Ok(Self {
            inner: Mutex::new(learner),
        })
    }

    fn advertise<'py>(
        &self,
        py: Python<'py>,
    ) -> Result<(Bound<'py, PyBytes>, Bound<'py, PyBytes>)> {
        let keys = self.lock()?.advertise();
        Ok((
            PyBytes::new(py, &keys.sealing),
            PyBytes::new(py, &keys.masking),
        ))
    }

    fn share<'py>(&self, py: Python<'py>, keys: Keys) -> Result<Vec<(u32, Bound<'py, PyBytes>)>> {
        let keys = advertised(&keys)?;
        let mut rng = rand::rng();
        let mail = self.lock()?.share(&keys, || rng.random())?;
        Ok(mail
            .into_iter()
            .map(|(to, sealed)| (to, PyBytes::new(py, &sealed)))
            .collect())
    }

    fn receive(&self, sender: u32, sealed: Vec<u8>) -> Result<()> {
        Ok(self.lock()?.receive(sender, sealed)?)
    }

    fn masked_input<'py>(
        &self,
        py: Python<'py>,
        values: &Bound<'py, PyAny>,
    ) -> Result<Bound<'py, PyArray1<u32>>> {
        let array = readonly::<f32>(values, "values", not_f32)?;
        let data = py_arrays::values(&array)?;
        let learner = self.lock()?;
        let masked = py_arrays::detached(py, || {
            let mut rng = rand::rng();
            learner.masked_input(data, || rng.random::<f64>())
        })?;
        Ok(PyArray1::from_vec(py, masked))
    }

    fn unmask<'py>(
        &self,
        py: Python<'py>,
        survivors: BTreeSet<u32>,
        dropped: BTreeSet<u32>,
    ) -> Result<Vec<(u32, Bound<'py, PyBytes>)>> {
        let answers = self.lock()?.unmask(&survivors, &dropped)?;
        Ok(answers
            .into_iter()
            .map(|(owner, share)| (owner, PyBytes::new(py, &share)))
            .collect())
    }
}

/// The server's unmasking: the sum (mod 2^32) of the survivors' quantized values.
#[pyfunction]
#[pyo3(signature = (round, learners, neighbours, threshold, keys, shared, inputs, shares, clip = 1.0, bits = 16))]
#[allow(clippy::too_many_arguments)]
pub fn secagg_unmask_sum<'py>(
    py: Python<'py>,
    round: &[u8],
    learners: u32,
    neighbours: u32,
    threshold: u32,
    keys: Keys,
    shared: BTreeSet<u32>,
    inputs: BTreeMap<u32, PyReadonlyArray1<'py, u32>>,
    shares: Vec<(u32, PyBackedBytes)>,
    clip: f32,
    bits: u32,
) -> Result<Bound<'py, PyArray1<u32>>> {
    let s = settings(round, learners, neighbours, threshold, clip, bits);
    let keys = advertised(&keys)?;
    let inputs: BTreeMap<u32, &[u32]> = inputs
        .iter()
        .map(|(&i, y)| Ok((i, py_arrays::values(y)?)))
        .collect::<Result<_>>()?;
    let shares = share_array(&shares)?;
    let sum = py_arrays::detached(py, || unmask_sum(&s, &keys, &shared, &inputs, &shares))?;
    Ok(PyArray1::from_vec(py, sum))
}

fn share_array(shares: &[(u32, PyBackedBytes)]) -> Result<Vec<(u32, [u8; SHARE_BYTES])>> {
    shares
        .iter()
        .map(|(owner, share)| {
            let share: [u8; SHARE_BYTES] = share
                .as_ref()
                .try_into()
                .map_err(|_| SecAggError::Malformed(format!("a share of {} bytes", share.len())))?;
            Ok((*owner, share))
        })
        .collect()
}

/// The server's unmasking of a running sum: `total` is the survivors' masked inputs added
/// mod 2^32 as they arrived; returns it unmasked (a new array).
#[pyfunction]
#[pyo3(signature = (round, learners, neighbours, threshold, keys, shared, survivors, total, shares, clip = 1.0, bits = 16))]
#[allow(clippy::too_many_arguments)]
pub fn secagg_unmask_total<'py>(
    py: Python<'py>,
    round: &[u8],
    learners: u32,
    neighbours: u32,
    threshold: u32,
    keys: Keys,
    shared: BTreeSet<u32>,
    survivors: BTreeSet<u32>,
    total: PyReadonlyArray1<'py, u32>,
    shares: Vec<(u32, PyBackedBytes)>,
    clip: f32,
    bits: u32,
) -> Result<Bound<'py, PyArray1<u32>>> {
    let s = settings(round, learners, neighbours, threshold, clip, bits);
    let keys = advertised(&keys)?;
    let mut sum = py_arrays::values(&total)?.to_vec();
    let shares = share_array(&shares)?;
    py_arrays::detached(py, || {
        unmask_total(&s, &keys, &shared, &survivors, &mut sum, &shares)
    })?;
    Ok(PyArray1::from_vec(py, sum))
}

/// The mean of `count` learners' values from the unmasked sum.
#[pyfunction]
#[pyo3(signature = (sum, count, clip = 1.0, bits = 16))]
pub fn secagg_mean<'py>(
    py: Python<'py>,
    sum: PyReadonlyArray1<'py, u32>,
    count: u32,
    clip: f32,
    bits: u32,
) -> Result<Bound<'py, PyArray1<f32>>> {
    let values = py_arrays::values(&sum)?;
    Ok(PyArray1::from_vec(
        py,
        mean_of_sum(values, count, clip, bits),
    ))
}
