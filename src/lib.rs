//! millrace is a blocking, batched, backpressured dataflow engine.
//!
//! Stages run on their own threads, linked by bounded channels that carry batches of records.
//! Consecutive stateless operators fuse into one loop on one thread; a slow stage throttles
//! everything upstream; a consumer that stops early (a `limit`, a closed stdout) stops its
//! producers; an error or panic anywhere stops the run with an error naming the stage; and every
//! thread is joined before [`Pipeline::run`] returns.
//!
//! ```
//! use millrace::Pipeline;
//!
//! let p = Pipeline::new();
//! let counts = p
//!     .source("lines", vec!["the cat", "the dog", "a cat"])
//!     .flat_map(|line: &str| line.split_whitespace().map(str::to_string).collect::<Vec<_>>())
//!     .key_by(|word| word.clone())
//!     .parallelism(2)
//!     .count()
//!     .sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)))
//!     .collect();
//! let report = p.run()?;
//! assert_eq!(counts.take(), vec![("cat".into(), 2), ("the".into(), 2), ("a".into(), 1), ("dog".into(), 1)]);
//! println!("{report}"); // a table of per-stage metrics
//! # Ok::<(), millrace::Error>(())
//! ```
//!
//! Pipelines can also be written in TOML and run by the `millrace` binary; see [`config`] and
//! `docs/config.md`. The [`pool`] module shares scarce resources between stages and reports a
//! would-be deadlock instead of hanging.
//!
//! Stage closures must be `Send + Sync + 'static`, since they run on other threads:
//!
//! ```compile_fail,E0277
//! let p = millrace::Pipeline::new();
//! let local = std::rc::Rc::new(1u32);
//! p.source("n", 0..3u32).map(move |x| x + *local).for_each(|_| {});
//! ```
#![warn(missing_docs)]

mod channel;
pub mod checkpoint;
pub mod config;
mod dead_letter;
mod describe;
mod error;
mod exec;
#[cfg(feature = "http")]
#[doc(hidden)]
pub mod fuzzing;
#[cfg(feature = "http")]
pub mod http;
#[cfg(feature = "job")]
pub mod job;
mod metrics;
mod ndjson;
pub mod operator;
mod par;
#[cfg(feature = "plugin")]
pub mod plugin;
pub mod pool;
mod private_dir;
mod runtime;
pub mod sandbox;
mod sink;
pub mod snapshot;
mod source;
mod stream;
pub(crate) mod sync;
mod time;
mod versioned;
pub mod window;

/// The README's Rust example, compiled and run by `cargo test --doc` so that it stays true.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;

/// The channel crate the engine is built on, for [`Pipeline::source_channel`]'s receiver.
pub use crossbeam_channel;
pub use dead_letter::{DeadLetter, DeadLetterLimit, DeadLetters, OnError};
pub use error::{BoxError, Error, Location, Result};
pub use metrics::{RunReport, Shape, StageAccount, StageMetrics};
pub use pool::{
    Lease, Pool, PoolBuilder, PoolError, PoolMetrics, Registry, TaskId, TaskScope, WaitEdge,
};
pub use runtime::{CancelHandle, Options};
pub use sink::Collected;
pub use snapshot::Snapshot;
#[doc(hidden)]
pub use source::{Deal, PartDeal};
pub use source::{ReplayVec, Replayable};
pub use stream::{BoxedKeyed, CheckpointedKeyed, KeyedStream, Pipeline, Sink, Stream, Windowed};
pub use time::{
    parse_duration_ms, parse_rfc3339_ms, ParseDurationError, ParseTimeError, ParseTimeErrorKind,
    Timestamp, Window,
};
