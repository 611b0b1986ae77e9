//! The elementwise work of a step: cut the model, the moments and the delta into aligned chunks,
//! check every new value in a first sweep, write them in a second.

use rayon::prelude::*;

use super::{Adaptive, OptimError, Result, Rule, CHUNK};
use crate::accumulate::PARALLEL_MIN;

/// Applies `rule` to `x` and the moments `m`, `v` (empty when the rule keeps none) with the delta
/// `d`, all of one length. Writes nothing unless every new value is finite in float32.
pub(super) fn apply(
    rule: Rule,
    x: &mut [f32],
    m: &mut [f32],
    v: &mut [f32],
    d: &[f32],
) -> Result<()> {
    if let Some(index) = first_bad(rule, x, m, v, d) {
        return Err(if d[index].is_finite() {
            OptimError::NonFiniteResult { index }
        } else {
            OptimError::NonFiniteDelta { index }
        });
    }
    let write = |mut c: Chunk<'_>| {
        sweep::<true>(rule, &mut c);
    };
    let parallel = x.len() >= PARALLEL_MIN;
    let chunks = split(x, m, v, d);
    if parallel {
        chunks.into_par_iter().for_each(write);
    } else {
        chunks.into_iter().for_each(write);
    }
    Ok(())
}

/// Matching pieces of the model, the moments (empty when the rule has none) and the delta.
struct Chunk<'a> {
    x: &'a mut [f32],
    m: &'a mut [f32],
    v: &'a mut [f32],
    d: &'a [f32],
}

/// Values per chunk: [`CHUNK`] on the parallel path, everything in one chunk below it.
fn chunk_size(len: usize) -> usize {
    if len >= PARALLEL_MIN {
        CHUNK
    } else {
        len.max(1)
    }
}

/// Cuts the four vectors into aligned chunks of [`CHUNK`] values (one chunk when short).
fn split<'a>(
    mut x: &'a mut [f32],
    mut m: &'a mut [f32],
    mut v: &'a mut [f32],
    mut d: &'a [f32],
) -> Vec<Chunk<'a>> {
    fn take<'a>(s: &mut &'a mut [f32], n: usize) -> &'a mut [f32] {
        let n = n.min(s.len()); // the moments are empty when the rule has none
        let (head, tail) = std::mem::take(s).split_at_mut(n);
        *s = tail;
        head
    }
    let size = chunk_size(x.len());
    let mut chunks = Vec::with_capacity(x.len().div_ceil(size));
    while !x.is_empty() {
        let n = size.min(x.len());
        let (head, tail) = d.split_at(n);
        d = tail;
        chunks.push(Chunk {
            x: take(&mut x, n),
            m: take(&mut m, n),
            v: take(&mut v, n),
            d: head,
        });
    }
    chunks
}

/// The first index whose step would be non-finite (from a non-finite delta or an overflow), or
/// `None` when the whole step is safe to write. Writes nothing.
fn first_bad(rule: Rule, x: &mut [f32], m: &mut [f32], v: &mut [f32], d: &[f32]) -> Option<usize> {
    let len = x.len();
    let bad = |mut c: Chunk<'_>| !sweep::<false>(rule, &mut c);
    let chunks = split(x, m, v, d);
    let first = if len >= PARALLEL_MIN {
        chunks.into_par_iter().position_first(bad)
    } else {
        chunks.into_iter().position(bad)
    }?;
    // Only on error: find the element within the failing chunk.
    let mut chunk = split(x, m, v, d).into_iter().nth(first)?;
    let start = first * chunk_size(len);
    (0..chunk.x.len())
        .find(|&i| !sweep::<false>(rule, &mut chunk.element(i)))
        .map(|i| start + i)
}

impl Chunk<'_> {
    /// The one-element chunk at `i`.
    fn element(&mut self, i: usize) -> Chunk<'_> {
        fn at(s: &mut [f32], i: usize) -> &mut [f32] {
            if s.is_empty() {
                s
            } else {
                &mut s[i..=i]
            }
        }
        Chunk {
            x: &mut self.x[i..=i],
            m: at(self.m, i),
            v: at(self.v, i),
            d: &self.d[i..=i],
        }
    }
}

/// Computes the rule's new values for one chunk, stores them if `WRITE`, and returns whether
/// they are all finite in float32. One code path for checking and writing, so the check cannot
/// disagree with what is written. The rule is matched once per chunk, outside the loops, so
/// each loop is specialized and vectorizable.
fn sweep<const WRITE: bool>(rule: Rule, c: &mut Chunk<'_>) -> bool {
    let mut finite = true;
    match rule {
        Rule::Sgd { lr } => {
            let lr = lr as f32;
            for (x, &d) in c.x.iter_mut().zip(c.d.iter()) {
                let new = *x + lr * d;
                finite &= new.is_finite();
                if WRITE {
                    *x = new;
                }
            }
        }
        Rule::Momentum { lr, beta } => {
            let (lr, beta) = (lr as f32, beta as f32);
            for ((x, m), &d) in c.x.iter_mut().zip(c.m.iter_mut()).zip(c.d.iter()) {
                let m_new = beta * *m + d;
                let x_new = *x + lr * m_new;
                finite &= x_new.is_finite() & m_new.is_finite();
                if WRITE {
                    (*x, *m) = (x_new, m_new);
                }
            }
        }
        Rule::Adagrad(a) => finite = adaptive::<WRITE>(a, c, |v, d2| v + d2),
        Rule::Adam(a) => {
            let (beta2, rest) = (a.beta2 as f32, (1.0 - a.beta2) as f32);
            finite = adaptive::<WRITE>(a, c, |v, d2| beta2 * v + rest * d2);
        }
        Rule::Yogi(a) => {
            let rest = (1.0 - a.beta2) as f32;
            finite = adaptive::<WRITE>(a, c, |v, d2| v - rest * d2 * sign(v - d2));
        }
    }
    finite
}

/// The adaptive rules' sweep; `second` maps `(v, d²)` to the new `v`.
#[inline(always)]
fn adaptive<const WRITE: bool>(
    a: Adaptive,
    c: &mut Chunk<'_>,
    second: impl Fn(f32, f32) -> f32,
) -> bool {
    let (lr, beta1, rest1, tau) = (
        a.lr as f32,
        a.beta1 as f32,
        (1.0 - a.beta1) as f32,
        a.tau as f32,
    );
    let mut finite = true;
    let elements = c.x.iter_mut().zip(c.m.iter_mut()).zip(c.v.iter_mut());
    for (((x, m), v), &d) in elements.zip(c.d.iter()) {
        let m_new = beta1 * *m + rest1 * d;
        let v_new = second(*v, d * d);
        let x_new = *x + lr * m_new / (v_new.sqrt() + tau);
        finite &= x_new.is_finite() & m_new.is_finite() & v_new.is_finite();
        if WRITE {
            (*x, *m, *v) = (x_new, m_new, v_new);
        }
    }
    finite
}

/// The sign as Yogi uses it: 0 at 0 (`f32::signum` would give 1).
#[inline(always)]
fn sign(x: f32) -> f32 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        0.0
    }
}
