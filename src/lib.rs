//! millrace: placeholder while the crate is being built.

pub mod sync;
