//! metis-async core: the O(model) work of the controller, in plain Rust with no Python in it.
//!
//! This file is a table of contents. The PyO3 bindings live in the `metis-async-python` crate
//! (`rust/python`), which exposes these modules as `metis_async._core`.

pub mod accumulate;
pub mod codec;
pub mod error;
pub mod he;
pub mod optim;
pub mod robust;
pub mod secagg;
pub mod wire;
