//! Uploads kept where they arrived: `InPlaceAssembler` checks each chunk inside its message and
//! keeps the message, and `Segments` is the resulting update, which `Accumulator.add_many` folds
//! straight from the messages' bytes. An upload is then read twice (the check on arrival, the
//! fold) and never copied, instead of read, copied, and read again.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

use metis_async_core::codec::{self, Codec};
use metis_async_core::wire::{Announcement, ChunkAssembler, WireError};
use numpy::PyArray1;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::error::{BindingError, Result};
use crate::py_arrays::{detached, filled_array};
use crate::py_chunks::{codec_of, recycled_array};

/// The state behind an `InPlaceAssembler`: in place until a chunk ends inside a value, then
/// an ordinary copying assembler fed every message again.
struct InPlace {
    assembler: ChunkAssembler,
    copying: bool,
    messages: Vec<Py<PyBytes>>,
}

/// Like `ChunkAssembler`, but keeps no buffer: each chunk is checked (announcement, order,
/// size, NaN/infinity, int8 scales) where it lies in its message with the GIL released, and the
/// message is kept. `take()` returns `Segments` (the values, read from the messages) or, if
/// some chunk of a float32 payload ended inside a value, a float32 array (the assembler then
/// copied instead). Codec payloads (`dtype`) always stay in place: their chunks hold whole
/// values.
#[pyclass(frozen, name = "InPlaceAssembler", module = "metis_async._core")]
pub struct PyInPlaceAssembler {
    state: Mutex<InPlace>,
    announced: Announcement,
    received: AtomicU32,
}

#[pymethods]
impl PyInPlaceAssembler {
    #[new]
    #[pyo3(signature = (total_bytes, payload_id, num_chunks, max_chunk_bytes, envelope_field, check_finite = true, dtype = 1))]
    #[allow(clippy::too_many_arguments)] // the Python constructor's keyword arguments
    fn new(
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
        let assembler = ChunkAssembler::in_place_from(announced)?;
        Ok(Self {
            state: Mutex::new(InPlace {
                assembler,
                copying: false,
                messages: Vec::new(),
            }),
            announced,
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
        let codec = self.announced.codec;
        let len = (self.announced.total_bytes / codec.item_size() as u64) as usize;
        Ok(Bound::new(py, PySegments { parts, len, codec })?.into_any())
    }

    /// Whether every announced chunk has arrived.
    #[getter]
    fn done(&self) -> bool {
        self.received.load(Ordering::Relaxed) == self.announced.num_chunks
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
        let mut copying = ChunkAssembler::copying(self.announced)?;
        let earlier: Vec<&[u8]> = state.messages.iter().map(|m| m.as_bytes(py)).collect();
        detached(py, || {
            earlier
                .iter()
                .try_for_each(|raw| copying.add_message(raw).map(|_| ()))
        })?;
        state.assembler = copying;
        state.copying = true;
        state.messages.clear();
        Ok(())
    }
}

/// An update that lies in the chunk messages it arrived in, encoded as float32 or a codec:
/// each part is a message and the (offset, length, int8 scale) of its data. `len()` is its
/// number of values; `to_array()` decodes it into one float32 array; `Accumulator.add_many`
/// decodes it where it lies, straight into the float64 sums.
#[pyclass(frozen, name = "Segments", module = "metis_async._core")]
pub struct PySegments {
    parts: Vec<(Py<PyBytes>, (usize, usize, f32))>,
    len: usize,
    codec: Codec,
}

impl PySegments {
    /// The codec of the values.
    pub fn codec(&self) -> Codec {
        self.codec
    }

    /// The encoded bytes of the update's values with each part's scale, in order (valid while
    /// `self` is alive).
    pub fn slices<'a>(&'a self, py: Python<'_>) -> Vec<(&'a [u8], f32)> {
        self.parts
            .iter()
            .map(|(message, (at, len, scale))| (&message.as_bytes(py)[*at..*at + *len], *scale))
            .collect()
    }
}

#[pymethods]
impl PySegments {
    fn __len__(&self) -> usize {
        self.len
    }

    /// The values decoded into one new float32 array (GIL released).
    fn to_array<'py>(&self, py: Python<'py>) -> Result<Bound<'py, PyArray1<f32>>> {
        let slices = self.slices(py);
        let codec = self.codec;
        let item = codec.item_size();
        let (array, ()) = filled_array(py, self.len, |out: &mut [f32]| {
            let mut at = 0;
            for (slice, scale) in &slices {
                let n = slice.len() / item;
                codec::decode(codec, slice, *scale, &mut out[at..at + n])
                    .map_err(WireError::from)?;
                at += n;
            }
            Ok::<(), BindingError>(())
        })?;
        Ok(array)
    }

    /// The `DType` enum value of the encoded values (1 float32, 3 float16, 4 bfloat16, 5 int8).
    #[getter]
    fn dtype(&self) -> i32 {
        self.codec.dtype()
    }

    /// Bytes of encoded values (the scales not counted).
    #[getter]
    fn nbytes(&self) -> usize {
        self.len * self.codec.item_size()
    }

    fn __repr__(&self) -> String {
        format!(
            "Segments(values={}, parts={}, dtype={})",
            self.len,
            self.parts.len(),
            self.codec.name()
        )
    }
}
