//! Recycled payload buffers. A fresh 40 MB buffer costs about as much in page faults (the
//! kernel zeroing every page on first touch) as copying the payload into it; the controller
//! receives payloads of one size over and over, so buffers that Python has finished with come
//! back here and the next [`ChunkAssembler`](super::ChunkAssembler) of that size takes one.
//!
//! Bounded by count and bytes, so an idle controller holds at most [`MAX_POOLED_BYTES`].

use std::sync::{Mutex, PoisonError};

/// Buffers kept at most.
pub const MAX_POOLED: usize = 16;

/// Bytes kept at most (over all buffers).
pub const MAX_POOLED_BYTES: usize = 1 << 30;

/// Buffers smaller than this are not worth keeping: the allocator serves them from its own free
/// lists.
pub const MIN_POOLED_BYTES: usize = 1 << 20;

/// A bounded set of float32 buffers for reuse.
#[derive(Debug)]
pub struct BufferPool {
    buffers: Mutex<Vec<Vec<f32>>>,
}

/// The pool the assemblers draw from and the bindings return buffers to.
pub static RECYCLED: BufferPool = BufferPool::new();

impl BufferPool {
    /// An empty pool.
    pub const fn new() -> Self {
        Self {
            buffers: Mutex::new(Vec::new()),
        }
    }

    /// A buffer of exactly `len` values with arbitrary (stale) contents, if one is pooled.
    pub fn take(&self, len: usize) -> Option<Vec<f32>> {
        let mut buffers = self.buffers.lock().unwrap_or_else(PoisonError::into_inner);
        let at = buffers.iter().rposition(|b| b.len() == len)?;
        Some(buffers.swap_remove(at))
    }

    /// Keeps `values` for reuse, dropping the oldest buffers beyond the bounds.
    pub fn give(&self, values: Vec<f32>) {
        let bytes = std::mem::size_of_val(values.as_slice());
        if !(MIN_POOLED_BYTES..=MAX_POOLED_BYTES).contains(&bytes) {
            return;
        }
        let mut buffers = self.buffers.lock().unwrap_or_else(PoisonError::into_inner);
        buffers.push(values);
        let mut total: usize = buffers.iter().map(|b| b.len() * 4).sum();
        while buffers.len() > MAX_POOLED || total > MAX_POOLED_BYTES {
            total -= buffers[0].len() * 4;
            // Freed outside the lock would be nicer, but freeing is quick next to the faults.
            buffers.remove(0);
        }
    }

    /// Number of pooled buffers.
    pub fn len(&self) -> usize {
        self.buffers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Whether no buffer is pooled.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Default for BufferPool {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BIG: usize = MIN_POOLED_BYTES / 4;

    #[test]
    fn gives_back_a_buffer_of_the_asked_length() {
        let pool = BufferPool::new();
        pool.give(vec![1.0; BIG]);
        pool.give(vec![2.0; BIG + 1]);

        assert_eq!(pool.take(BIG + 1).map(|b| b[0]), Some(2.0));
        assert_eq!(pool.take(BIG + 1), None);
        assert_eq!(pool.len(), 1);
    }

    #[test]
    fn small_buffers_are_not_kept_and_the_count_is_bounded() {
        let pool = BufferPool::new();
        pool.give(vec![0.0; 10]);
        assert!(pool.is_empty());

        for i in 0..MAX_POOLED + 3 {
            pool.give(vec![i as f32; BIG]);
        }

        assert_eq!(pool.len(), MAX_POOLED);
        assert_eq!(pool.take(BIG).map(|b| b[0]), Some((MAX_POOLED + 2) as f32));
    }
}
