//! Task identity: who holds a lease and who waits for one.
//!
//! A task is the current thread by default. Work that moves between threads (a job handed to
//! another worker, a scoped sub-thread doing the parent's work) carries its [`TaskId`] and enters
//! it with [`TaskId::enter`], so the lease graph sees one task, not several unrelated threads.

use std::cell::Cell;
use std::fmt;
use std::marker::PhantomData;

use crate::sync::statics::AtomicU64;
use crate::sync::Ordering;

/// Source of task ids, shared by implicit (per-thread) and explicit ids so they never collide.
///
/// A plain std atomic even under loom: it only hands out unique numbers and is not part of any
/// modelled synchronisation.
static NEXT_TASK: AtomicU64 = AtomicU64::new(1);

crate::sync::thread_local! {
    /// The task this thread acts for: an entered explicit id, or the thread's own id, allocated
    /// on first use.
    // loom's `thread_local!` does not accept a `const { .. }` initialiser.
    #[allow(clippy::missing_const_for_thread_local)]
    static CURRENT: Cell<Option<TaskId>> = Cell::new(None);
}

/// The identity of a task in the lease graph: the unit that holds leases and waits for them.
///
/// The deadlock check assumes a task is sequential: while it waits in one `acquire`, nothing else
/// acts for it. Do not enter the same id on two threads that acquire concurrently.
///
/// # Examples
///
/// ```
/// use millrace::TaskId;
///
/// let me = TaskId::current();
/// assert_eq!(me, TaskId::current());
/// let job = TaskId::new();
/// {
///     let _scope = job.enter();
///     assert_eq!(TaskId::current(), job);
/// }
/// assert_eq!(TaskId::current(), me);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TaskId(u64);

impl TaskId {
    /// Allocates a fresh task id, distinct from every thread's own id.
    #[allow(clippy::new_without_default)]
    pub fn new() -> TaskId {
        TaskId(NEXT_TASK.fetch_add(1, Ordering::Relaxed))
    }

    /// The task the current thread acts for: the innermost entered id, or the thread's own.
    pub fn current() -> TaskId {
        CURRENT.with(|cur| match cur.get() {
            Some(id) => id,
            None => {
                let id = TaskId::new();
                cur.set(Some(id));
                id
            }
        })
    }

    /// Makes the current thread act for this task until the returned scope drops.
    pub fn enter(self) -> TaskScope {
        let previous = CURRENT.with(|cur| cur.replace(Some(self)));
        TaskScope {
            previous,
            _not_send: PhantomData,
        }
    }

    /// The raw number, for logs and reports.
    pub fn as_u64(self) -> u64 {
        self.0
    }
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "task {}", self.0)
    }
}

/// Guard returned by [`TaskId::enter`]; restores the previous task of this thread on drop.
///
/// A scope belongs to the thread that entered it and cannot be sent to another:
///
/// ```compile_fail,E0277
/// fn send<T: Send>(_: T) {}
/// send(millrace::TaskId::new().enter());
/// ```
#[derive(Debug)]
#[must_use = "the task is left again as soon as the scope drops"]
pub struct TaskScope {
    previous: Option<TaskId>,
    /// A scope belongs to the thread that entered it.
    _not_send: PhantomData<*const ()>,
}

impl Drop for TaskScope {
    fn drop(&mut self) {
        let previous = self.previous;
        CURRENT.with(|cur| cur.set(previous));
    }
}
