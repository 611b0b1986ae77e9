//! Python bindings of the chunk wire format (`wire`): the `ChunkAssembler` class,
//! `peek_chunk` and `encode_chunk_messages`.
//!
//! They work on serialized protobuf envelopes, so the server hands each received message's
//! bytes to Rust once and never builds a Python `Chunk` object (nor copies its data) for it.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard};

use metis_async_core::codec::Codec;
use metis_async_core::wire::pool::RECYCLED;
use metis_async_core::wire::{encode, peek_chunk as peek, Announcement, ChunkAssembler, WireError};
use numpy::PyArray1;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList};

use crate::error::{BindingError, Result};
use crate::py_arrays::{detached, readonly, values};

/// Reassembles one announced payload (float32, or a codec given by `dtype`, decoded) from its raw
/// chunk messages into a preallocated float32 buffer; each message costs one Rust call with the
/// GIL released.
///
/// Safe to share between Python threads (an internal lock taken with the GIL released), though
/// chunks of one payload arrive on one stream in order.
#[pyclass(frozen, name = "ChunkAssembler", module = "metis_async._core")]
pub struct PyChunkAssembler {
    state: Mutex<ChunkAssembler>,
    total_bytes: u64,
    payload_id: u64,
    num_chunks: u32,
    /// Mirrors the chunks received so far, so `done` answers at once even during an add.
    received: AtomicU32,
}

impl PyChunkAssembler {
    fn locked(&self) -> Result<MutexGuard<'_, ChunkAssembler>> {
        self.state
            .lock()
            .map_err(|_| BindingError::AssemblerPoisoned)
    }
}

#[pymethods]
impl PyChunkAssembler {
    #[new]
    #[pyo3(signature = (total_bytes, payload_id, num_chunks, max_chunk_bytes, envelope_field, check_finite = true, dtype = 1))]
    #[allow(clippy::too_many_arguments)] // the Python constructor's keyword arguments
    fn new(
        py: Python<'_>,
        total_bytes: u64,
        payload_id: u64,
        num_chunks: u32,
        max_chunk_bytes: usize,
        envelope_field: u32,
        check_finite: bool,
        dtype: i32,
    ) -> Result<Self> {
        let announced = Announcement {
            total_bytes,
            payload_id,
            num_chunks,
            max_chunk_bytes,
            envelope_field,
            check_finite,
            codec: codec_of(dtype)?,
        };
        let state = detached(py, || ChunkAssembler::copying(announced))?;
        Ok(Self {
            state: Mutex::new(state),
            total_bytes,
            payload_id,
            num_chunks,
            received: AtomicU32::new(0),
        })
    }

    /// Adds the chunk in the serialized envelope message `raw`; returns whether the payload is
    /// complete. After an error the payload is rejected for good.
    fn add_message(&self, py: Python<'_>, raw: &[u8]) -> Result<bool> {
        detached(py, || {
            let mut state = self.locked()?;
            let result = state.add_message(raw);
            self.received.store(state.received(), Ordering::Relaxed);
            Ok::<_, BindingError>(result?)
        })
    }

    /// The assembled float32 values, handed over without copying (once, after the last chunk).
    /// When the array is freed its buffer goes back to the pool for the next payload.
    fn take<'py>(&self, py: Python<'py>) -> Result<Bound<'py, PyArray1<f32>>> {
        let values = detached(py, || Ok::<_, BindingError>(self.locked()?.take()?))?;
        recycled_array(py, values)
    }

    /// Whether every announced chunk has arrived.
    #[getter]
    fn done(&self) -> bool {
        self.received.load(Ordering::Relaxed) == self.num_chunks
    }

    /// Chunks received so far.
    #[getter]
    fn received(&self) -> u32 {
        self.received.load(Ordering::Relaxed)
    }

    /// The payload's announced size in bytes.
    #[getter]
    fn total_bytes(&self) -> u64 {
        self.total_bytes
    }

    /// The payload's id.
    #[getter]
    fn payload_id(&self) -> u64 {
        self.payload_id
    }

    /// The announced number of chunks.
    #[getter]
    fn num_chunks(&self) -> u32 {
        self.num_chunks
    }

    fn __repr__(&self) -> String {
        format!(
            "ChunkAssembler(payload_id={}, total_bytes={}, chunks={}/{})",
            self.payload_id,
            self.total_bytes,
            self.received(),
            self.num_chunks
        )
    }
}

/// The owner of a numpy array's memory that hands the buffer back to [`RECYCLED`] when numpy
/// frees the array. Holds the `Vec`'s raw parts, like numpy's own `from_vec` container, so no
/// Rust reference to the values exists while numpy reads and writes them.
#[pyclass(frozen, name = "_RecycledBuffer", module = "metis_async._core")]
struct RecycledBuffer {
    ptr: *mut f32,
    len: usize,
    capacity: usize,
}

// SAFETY: the buffer is plain heap memory owned by this object alone (no thread affinity).
unsafe impl Send for RecycledBuffer {}
unsafe impl Sync for RecycledBuffer {}

impl Drop for RecycledBuffer {
    fn drop(&mut self) {
        // SAFETY: the parts of a Vec<f32> taken apart in `recycled_array` and used by nothing
        // else now: numpy drops the base object after the last array viewing it.
        let values = unsafe { Vec::from_raw_parts(self.ptr, self.len, self.capacity) };
        RECYCLED.give(values);
    }
}

/// A 1-D numpy array over `values` without copying, whose buffer is recycled when freed.
pub fn recycled_array(py: Python<'_>, values: Vec<f32>) -> Result<Bound<'_, PyArray1<f32>>> {
    let mut values = std::mem::ManuallyDrop::new(values);
    let (ptr, len, capacity) = (values.as_mut_ptr(), values.len(), values.capacity());
    // On failure the initializer drops the RecycledBuffer, which frees (recycles) the Vec.
    let owner = Bound::new(py, RecycledBuffer { ptr, len, capacity })?;
    // SAFETY: `ptr` points to `len` initialized f32 values (or is dangling with len 0), which
    // stay alive as long as `owner`, and `owner` becomes the array's base object.
    let array = unsafe {
        let view = numpy::ndarray::ArrayView1::from_shape_ptr(len, ptr.cast_const());
        PyArray1::borrow_from_array(&view, owner.into_any())
    };
    Ok(array)
}

/// `(payload_id, index, data_len)` of the chunk in the serialized envelope `raw` (chunk body in
/// field `envelope_field`), or None when its body is something else. Reads only field headers.
#[pyfunction]
pub fn peek_chunk(raw: &[u8], envelope_field: u32) -> Result<Option<(u64, u32, usize)>> {
    let chunk = peek(raw, envelope_field)?;
    Ok(chunk.map(|c| (c.payload_id, c.index, c.data.len())))
}

/// A `bytes` object's buffer, to be filled with the GIL released.
struct Target {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: see `encode_chunk_messages`: each target is a distinct, not yet shared allocation.
unsafe impl Send for Target {}
unsafe impl Sync for Target {}

/// The codec of a `DType` enum value (a `WireFormatError` for one that is not a wire dtype).
pub fn codec_of(dtype: i32) -> Result<Codec> {
    Codec::from_dtype(dtype).map_err(|e| WireError::from(e).into())
}

/// The serialized envelope messages carrying `data` (1-D C-contiguous float32) encoded as
/// `dtype` as payload `payload_id` in chunks of at most `max_chunk_bytes`, chunk body in field
/// `envelope_field`.
#[pyfunction]
#[pyo3(signature = (data, payload_id, max_chunk_bytes, envelope_field, dtype = 1))]
pub fn encode_chunk_messages<'py>(
    py: Python<'py>,
    data: &Bound<'py, PyAny>,
    payload_id: u64,
    max_chunk_bytes: usize,
    envelope_field: u32,
    dtype: i32,
) -> Result<Bound<'py, PyList>> {
    let codec = codec_of(dtype)?;
    let array = readonly::<f32>(data, "data", BindingError::not_float32)?;
    let floats = values(&array)?;
    // int8 plans compute each chunk's scale: O(n), so without the GIL
    let plans = detached(py, || {
        encode::plan_values(floats, codec, payload_id, max_chunk_bytes, envelope_field)
    })?;
    let mut messages = Vec::with_capacity(plans.len());
    let mut targets = Vec::with_capacity(plans.len());
    for plan in &plans {
        let len = isize::try_from(plan.len())
            .map_err(|_| BindingError::Borrow("chunk too large".into()))?;
        // SAFETY: with a NULL source, PyBytes_FromStringAndSize allocates an uninitialized
        // bytes object of `len` bytes that the caller must fill before anyone reads it. We own
        // its only reference (`messages`) until this function returns.
        let message = unsafe {
            let ptr = pyo3::ffi::PyBytes_FromStringAndSize(std::ptr::null(), len);
            Bound::from_owned_ptr_or_err(py, ptr)?.cast_into_unchecked::<PyBytes>()
        };
        // SAFETY: a bytes object's buffer is `len` (+1 NUL) bytes that live as long as it does;
        // we write the header now, under the GIL.
        let ptr = unsafe { pyo3::ffi::PyBytes_AsString(message.as_ptr()) }.cast::<u8>();
        unsafe { std::ptr::copy_nonoverlapping(plan.header.as_ptr(), ptr, plan.header.len()) };
        targets.push(Target {
            ptr,
            len: plan.len(),
        });
        messages.push(message);
    }
    detached(py, || {
        // SAFETY: every target is the buffer of a distinct bytes object created above, kept
        // alive by `messages` (which this closure does not touch, and which outlives it). No
        // other code has a reference to those objects yet, so nothing reads (or hashes) them
        // while we write without the GIL; they become visible only when the list is returned.
        let buffers = targets
            .iter()
            .map(|t| unsafe { std::slice::from_raw_parts_mut(t.ptr, t.len) })
            .collect();
        encode::fill_values(floats, codec, &plans, buffers)
    })?;
    Ok(PyList::new(py, messages)?)
}
