//! Resource pools whose lease graph detects deadlocks.
//!
//! This module owns [`Pool`] (named, fixed capacity, FIFO hand-off), [`Lease`] (the guard that
//! returns a resource on drop), the lease graph ([`Registry`]: which [`TaskId`] holds and waits
//! for which pool) and its deadlock check, and [`PoolMetrics`]. The design note `README.md` in
//! this folder describes the algorithm, its cost and its limits; `docs/pool.md` is the user guide.
//!
//! Files:
//! 1. `resource_pool.rs`: `Pool`, `PoolBuilder`, acquiring and checking out;
//! 2. `lease.rs`: `Lease`, returning, discarding, nested work on a held lease;
//! 3. `graph.rs`: `Registry`, the lease graph and the deadlock check;
//! 4. `task.rs`: `TaskId`, the current task, entering an explicit one;
//! 5. `error.rs`: `PoolError`, `WaitEdge`;
//! 6. `metrics.rs`: `PoolMetrics`.
//!
//! # Examples
//!
//! Ten tasks each hold one of ten connections and each asks for a second: instead of hanging
//! until a timeout, the request that closes the cycle fails at once and the others proceed.
//!
//! ```
//! use millrace::{Pool, PoolError, Registry};
//! use std::sync::{Arc, Barrier};
//!
//! let pool = Pool::builder("db")
//!     .capacity(10)
//!     .factory(|| Ok::<_, std::io::Error>(()))
//!     .registry(&Registry::new())
//!     .build();
//! let barrier = Arc::new(Barrier::new(10));
//! let workers: Vec<_> = (0..10)
//!     .map(|_| {
//!         let (pool, barrier) = (pool.clone(), barrier.clone());
//!         std::thread::spawn(move || {
//!             let _outer = pool.acquire().unwrap();
//!             barrier.wait();
//!             match pool.acquire() {
//!                 Ok(_inner) => false,
//!                 Err(PoolError::WouldDeadlock { .. }) => true,
//!                 Err(e) => panic!("{e}"),
//!             }
//!         })
//!     })
//!     .collect();
//! let refused = workers.into_iter().filter_map(|w| w.join().unwrap().then_some(())).count();
//! assert!(refused >= 1);
//! assert_eq!(pool.metrics().deadlocks, refused as u64);
//! assert_eq!(pool.metrics().in_use, 0);
//! ```

mod error;
mod graph;
mod lease;
mod metrics;
mod resource_pool;
mod task;

pub use error::{BoxError, PoolError, WaitEdge};
#[cfg(loom)]
pub use graph::Mutation;
pub use graph::Registry;
pub use lease::Lease;
pub use metrics::PoolMetrics;
pub use resource_pool::{Pool, PoolBuilder};
pub use task::{TaskId, TaskScope};
