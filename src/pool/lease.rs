//! `Lease<R>`: the guard that returns a resource to its pool on drop, also while unwinding.

use std::fmt;
use std::ops::{Deref, DerefMut};

use super::resource_pool::Shared;
use super::task::TaskId;
use crate::sync::Arc;

/// A resource lent by a [`Pool`](super::Pool). Dereferences to the resource; dropping the lease
/// returns it (to the oldest waiter first), even when the drop happens during a panic.
///
/// A lease belongs to the task that acquired it, not to a thread: it may be sent to and dropped
/// on another thread.
///
/// # Examples
///
/// ```
/// use millrace::Pool;
///
/// let pool = Pool::from_resources("buffers", vec![Vec::<u8>::new()]);
/// {
///     let mut buf = pool.acquire().unwrap();
///     buf.extend_from_slice(b"hello");
/// } // returned here
/// assert_eq!(*pool.acquire().unwrap(), b"hello");
/// ```
pub struct Lease<R> {
    pub(crate) shared: Arc<Shared<R>>,
    /// `Some` for every lease a caller sees; `None` only while a unit is reserved and its
    /// resource is still being created, or after `discard` took it.
    pub(crate) resource: Option<R>,
    pub(crate) task: TaskId,
    /// On drop, retire the unit instead of returning it (a pool without a factory lost it).
    pub(crate) retire: bool,
}

impl<R> Lease<R> {
    /// The task this lease is charged to in the lease graph.
    pub fn task(&self) -> TaskId {
        self.task
    }

    /// The name of the pool the lease came from.
    pub fn pool_name(&self) -> &str {
        &self.shared.name
    }

    /// Drops a broken resource instead of returning it. The unit goes back to the pool empty and
    /// the factory creates a replacement for the next request; a pool without a factory retires
    /// the unit and its capacity shrinks by one.
    pub fn discard(mut self) {
        drop(self.resource.take());
        self.retire = self.shared.factory.is_none();
    }

    /// Runs nested work on this lease instead of acquiring a second one (the seed's
    /// `run_subtask`). The closure gets the resource and runs as this lease's task, so anything
    /// else it acquires is charged to the task that holds this lease, and the deadlock check
    /// stays exact.
    ///
    /// # Examples
    ///
    /// ```
    /// use millrace::Pool;
    ///
    /// fn run_subtask(conn: &mut String) -> usize {
    ///     conn.push_str(" used by subtask");
    ///     conn.len()
    /// }
    ///
    /// let pool = Pool::from_resources("db", vec![String::from("conn")]);
    /// let mut conn = pool.acquire().unwrap();
    /// // Not `pool.acquire()` again: with one unit that could never be granted.
    /// let n = conn.subtask(run_subtask);
    /// assert_eq!(n, "conn used by subtask".len());
    /// ```
    pub fn subtask<T>(&mut self, f: impl FnOnce(&mut R) -> T) -> T {
        let _scope = self.task.enter();
        f(self.resource.as_mut().expect("a lease holds its resource"))
    }
}

impl<R> Deref for Lease<R> {
    type Target = R;
    fn deref(&self) -> &R {
        self.resource.as_ref().expect("a lease holds its resource")
    }
}

impl<R> DerefMut for Lease<R> {
    fn deref_mut(&mut self) -> &mut R {
        self.resource.as_mut().expect("a lease holds its resource")
    }
}

impl<R> Drop for Lease<R> {
    fn drop(&mut self) {
        // Resource first, then the unit: a waiter handed the unit must find the resource.
        if let Some(r) = self.resource.take() {
            self.shared.idle.lock().push(r);
        }
        self.shared.give_back(self.task, self.retire);
    }
}

impl<R: fmt::Debug> fmt::Debug for Lease<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lease")
            .field("pool", &self.pool_name())
            .field("task", &self.task)
            .field("resource", &self.resource)
            .finish()
    }
}
