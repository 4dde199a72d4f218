//! A point-in-time snapshot of one pool's counters, for the run report.

use std::fmt;
use std::time::Duration;

/// Counters of one pool, taken by [`Pool::metrics`](super::Pool::metrics).
///
/// `Display` renders one row of a table whose header is [`PoolMetrics::HEADER`].
///
/// # Examples
///
/// ```
/// use millrace::{Pool, PoolMetrics};
///
/// let pool = Pool::from_resources("files", vec![1, 2]);
/// let lease = pool.acquire().unwrap();
/// let m = pool.metrics();
/// assert_eq!((m.capacity, m.in_use, m.idle, m.acquires), (2, 1, 1, 1));
/// println!("{}\n{m}", PoolMetrics::HEADER);
/// # drop(lease);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PoolMetrics {
    /// The pool's name.
    pub name: String,
    /// Units the pool can lend.
    pub capacity: usize,
    /// Units lent out now (including resources being created).
    pub in_use: usize,
    /// Created resources waiting in the pool.
    pub idle: usize,
    /// Requests blocked now.
    pub waiters: usize,
    /// Leases granted so far.
    pub acquires: u64,
    /// Time spent blocked by all requests that had to wait.
    pub total_wait: Duration,
    /// Requests that gave up after their timeout.
    pub timeouts: u64,
    /// Requests refused with [`PoolError::WouldDeadlock`](super::PoolError::WouldDeadlock).
    pub deadlocks: u64,
    /// Failed factory calls.
    pub factory_errors: u64,
    /// Idle resources that failed validation on checkout.
    pub invalid: u64,
    /// Times a blocked request's thread woke up (served, told to re-check after the pool
    /// shrank, timed out, or spuriously). A release wakes only the waiter it serves, so this is
    /// about one per request that had to wait.
    pub wakeups: u64,
    /// Runs of the deadlock check charged to this pool: one per request that could not be
    /// granted at once, plus one pass per retired unit and one per waiter it flagged.
    pub deadlock_checks: u64,
}

impl PoolMetrics {
    /// The header row matching `Display`.
    pub const HEADER: &'static str =
        "pool               cap  used  idle queued  acquires   wait_time  timeouts  deadlocks";
}

impl fmt::Display for PoolMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let wait = format!("{:.1?}", self.total_wait);
        write!(
            f,
            "{:<16} {:>5} {:>5} {:>5} {:>6} {:>9} {:>11} {:>9} {:>10}",
            self.name,
            self.capacity,
            self.in_use,
            self.idle,
            self.waiters,
            self.acquires,
            wait,
            self.timeouts,
            self.deadlocks
        )
    }
}
