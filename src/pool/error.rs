//! The pool's error type and the wait-for edges a deadlock report is made of.

use std::fmt;
use std::time::Duration;

use super::task::TaskId;

/// A boxed error from a resource factory: the crate's [`BoxError`](crate::BoxError).
pub use crate::error::BoxError;

/// One edge of a deadlock cycle: `task` waits for a lease of `pool`, and every unit of `pool` is
/// held by `holders`, all of which are waiting too.
///
/// In a reported cycle the next edge's task is one of this edge's holders, and the first edge's
/// task (the one whose request failed) is one of the last edge's holders.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct WaitEdge {
    /// The waiting task.
    pub task: TaskId,
    /// The pool it waits for.
    pub pool: String,
    /// Every task holding a lease of `pool`, in ascending order.
    pub holders: Vec<TaskId>,
}

impl fmt::Display for WaitEdge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} waits for '{}' held by ", self.task, self.pool)?;
        match self.holders.as_slice() {
            [] => f.write_str("no one"),
            [one] => write!(f, "{one}"),
            many => {
                f.write_str("tasks ")?;
                for (i, h) in many.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{}", h.as_u64())?;
                }
                Ok(())
            }
        }
    }
}

/// Why a lease could not be granted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PoolError {
    /// Granting the request would have to wait for ever: every holder of the pool is itself
    /// waiting, transitively, on pools whose holders are all waiting. Returned at once, without
    /// sleeping; only the request that closes the cycle gets it.
    #[error("acquiring '{pool}' would deadlock: {}", DisplayCycle(cycle))]
    WouldDeadlock {
        /// The pool that was asked for.
        pool: String,
        /// The wait-for cycle, starting with the task whose request failed.
        cycle: Vec<WaitEdge>,
    },
    /// No lease became free within the time given to [`Pool::acquire_timeout`](super::Pool::acquire_timeout).
    #[error("timed out after {waited:?} waiting for a lease of '{pool}'")]
    Timeout {
        /// The pool that was asked for.
        pool: String,
        /// How long the request waited.
        waited: Duration,
    },
    /// The factory failed to create a resource.
    #[error("the factory of '{pool}' failed to create a resource")]
    Factory {
        /// The pool whose factory failed.
        pool: String,
        /// The factory's error.
        #[source]
        source: BoxError,
    },
    /// An idle resource failed validation on checkout and the pool has no factory to replace
    /// it; the unit is retired and the pool's capacity shrinks by one.
    #[error(
        "an idle resource of '{pool}' failed validation and the pool has no factory to replace it"
    )]
    Validation {
        /// The pool whose resource failed validation.
        pool: String,
    },
}

struct DisplayCycle<'a>(&'a [WaitEdge]);

impl fmt::Display for DisplayCycle<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, edge) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{edge}")?;
        }
        Ok(())
    }
}

impl PoolError {
    /// The name of the pool the failed request was for.
    pub fn pool(&self) -> &str {
        match self {
            PoolError::WouldDeadlock { pool, .. }
            | PoolError::Timeout { pool, .. }
            | PoolError::Factory { pool, .. }
            | PoolError::Validation { pool } => pool,
        }
    }

    /// Whether this is [`PoolError::WouldDeadlock`].
    pub fn is_deadlock(&self) -> bool {
        matches!(self, PoolError::WouldDeadlock { .. })
    }
}
