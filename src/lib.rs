//! millrace: placeholder while the crate is being built.
#![warn(missing_docs)]

mod channel;
pub mod config;
mod error;
mod metrics;
pub mod operator;
mod runtime;
mod sink;
mod source;
mod stream;
pub mod sync;

pub use error::{BoxError, Error, Location, Result};
pub use metrics::{RunReport, StageMetrics};
pub use runtime::{CancelHandle, Options};
pub use sink::Collected;
pub use stream::{KeyedStream, Pipeline, Stream};
pub mod pool;
pub use pool::{
    Lease, Pool, PoolBuilder, PoolError, PoolMetrics, Registry, TaskId, TaskScope, WaitEdge,
};
