//! Uploads kept where they arrived: `InPlaceAssembler` checks each chunk inside its message and
//! keeps the message, and `Segments` is the resulting update, which `Accumulator.add_many` folds
//! straight from the messages' bytes. An upload is then read twice (the check on arrival, the
//! fold) and never copied, instead of read, copied, and read again.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

use metis_async_core::wire::{ChunkAssembler, WireError};
use numpy::PyArray1;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::error::{BindingError, Result};
use crate::py_arrays::{detached, filled_array};
use crate::py_chunks::recycled_array;

/// The state behind an `InPlaceAssembler`: in place until a chunk ends inside a value, then
/// an ordinary copying assembler fed every message again.
struct InPlace {
    assembler: ChunkAssembler,
    copying: bool,
    messages: Vec<Py<PyBytes>>,
    segments: Vec<(usize, usize)>,
}

/// Like `ChunkAssembler`, but keeps no buffer: each chunk is checked (announcement, order,
/// size, NaN/infinity) where it lies in its message with the GIL released, and the message is
/// kept. `take()` returns `Segments` (the values, read from the messages) or, if some chunk
/// ended inside a float32 value, a float32 array (the assembler then copied instead).
#[pyclass(frozen, name = "InPlaceAssembler", module = "metis_async._core")]
pub struct PyInPlaceAssembler {
    state: Mutex<InPlace>,
    params: (u64, u64, u32, usize, u32, bool),
    num_chunks: u32,
    received: AtomicU32,
}

#[pymethods]
impl PyInPlaceAssembler {
    #[new]
    #[pyo3(signature = (total_bytes, payload_id, num_chunks, max_chunk_bytes, envelope_field, check_finite = true))]
    fn new(
        total_bytes: u64,
        payload_id: u64,
        num_chunks: u32,
        max_chunk_bytes: usize,
        envelope_field: u32,
        check_finite: bool,
    ) -> Result<Self> {
        let params = (
            total_bytes,
            payload_id,
            num_chunks,
            max_chunk_bytes,
            envelope_field,
            check_finite,
        );
        let assembler = ChunkAssembler::new_in_place(
            total_bytes,
            payload_id,
            num_chunks,
            max_chunk_bytes,
            envelope_field,
            check_finite,
        )?;
        Ok(Self {
            state: Mutex::new(InPlace {
                assembler,
                copying: false,
                messages: Vec::new(),
                segments: Vec::new(),
            }),
            params,
            num_chunks,
            received: AtomicU32::new(0),
        })
    }

    /// Adds the chunk in the serialized envelope message `raw` (kept, not copied); returns
    /// whether the payload is complete. After an error the payload is rejected for good.
    fn add_message(&self, py: Python<'_>, raw: Bound<'_, PyBytes>) -> Result<bool> {
        let mut state = self
            .state
            .lock()
            .map_err(|_| BindingError::AssemblerPoisoned)?;
        let bytes = raw.as_bytes();
        let state = &mut *state;
        let done = if state.copying {
            let assembler = &mut state.assembler;
            detached(py, || assembler.add_message(bytes))?
        } else {
            let assembler = &mut state.assembler;
            match detached(py, || assembler.add_message_in_place(bytes)) {
                Err(BindingError::Wire(WireError::NotInPlace)) => {
                    self.start_copying(py, state)?;
                    let assembler = &mut state.assembler;
                    detached(py, || assembler.add_message(bytes))?
                }
                other => {
                    let done = other?;
                    state.messages.push(raw.clone().unbind());
                    done
                }
            }
        };
        self.received
            .store(state.assembler.received(), Ordering::Relaxed);
        Ok(done)
    }

    /// The update (once, after the last chunk): `Segments` read from the kept messages, or a
    /// float32 array if the chunks had to be copied.
    fn take<'py>(&self, py: Python<'py>) -> Result<Bound<'py, PyAny>> {
        let mut state = self
            .state
            .lock()
            .map_err(|_| BindingError::AssemblerPoisoned)?;
        if state.copying {
            let values = state.assembler.take()?;
            return Ok(recycled_array(py, values)?.into_any());
        }
        let segments = state.assembler.take_segments()?;
        let messages = std::mem::take(&mut state.messages);
        let parts = messages.into_iter().zip(segments).collect();
        let len = (self.params.0 / 4) as usize;
        Ok(Bound::new(py, PySegments { parts, len })?.into_any())
    }

    /// Whether every announced chunk has arrived.
    #[getter]
    fn done(&self) -> bool {
        self.received.load(Ordering::Relaxed) == self.num_chunks
    }

    /// Whether some chunk ended inside a value, so the payload is being copied.
    #[getter]
    fn copying(&self) -> Result<bool> {
        Ok(self
            .state
            .lock()
            .map_err(|_| BindingError::AssemblerPoisoned)?
            .copying)
    }
}

impl PyInPlaceAssembler {
    /// Switches to an ordinary copying assembler and feeds it every message received so far
    /// (their values were checked already; the check runs again, cheaply, on the copy).
    fn start_copying(&self, py: Python<'_>, state: &mut InPlace) -> Result<()> {
        let (total, id, chunks, limit, field, check) = self.params;
        let mut copying = ChunkAssembler::new(total, id, chunks, limit, field, check)?;
        let earlier: Vec<&[u8]> = state.messages.iter().map(|m| m.as_bytes(py)).collect();
        detached(py, || {
            earlier
                .iter()
                .try_for_each(|raw| copying.add_message(raw).map(|_| ()))
        })?;
        state.assembler = copying;
        state.copying = true;
        state.messages.clear();
        state.segments.clear();
        Ok(())
    }
}

/// A float32 update that lies in the chunk messages it arrived in: each part is a message and
/// the (offset, length) of its data. `len()` is its number of values; `to_array()` copies it
/// into one array; `Accumulator.add_many` reads it where it lies.
#[pyclass(frozen, name = "Segments", module = "metis_async._core")]
pub struct PySegments {
    parts: Vec<(Py<PyBytes>, (usize, usize))>,
    len: usize,
}

impl PySegments {
    /// The byte slices of the update's values, in order (valid while `self` is alive).
    pub fn slices<'a>(&'a self, py: Python<'_>) -> Vec<&'a [u8]> {
        self.parts
            .iter()
            .map(|(message, (at, len))| &message.as_bytes(py)[*at..*at + *len])
            .collect()
    }
}

#[pymethods]
impl PySegments {
    fn __len__(&self) -> usize {
        self.len
    }

    /// The values copied into one new float32 array (GIL released).
    fn to_array<'py>(&self, py: Python<'py>) -> Result<Bound<'py, PyArray1<f32>>> {
        let slices = self.slices(py);
        let (array, ()) = filled_array(py, self.len, |out: &mut [f32]| {
            let mut at = 0;
            for slice in &slices {
                for (value, w) in out[at..].iter_mut().zip(slice.chunks_exact(4)) {
                    *value = f32::from_le_bytes([w[0], w[1], w[2], w[3]]);
                }
                at += slice.len() / 4;
            }
            Ok::<(), BindingError>(())
        })?;
        Ok(array)
    }

    fn __repr__(&self) -> String {
        format!("Segments(values={}, parts={})", self.len, self.parts.len())
    }
}
