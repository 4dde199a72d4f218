//! The synchronisation shim: the only module that names locks, condition variables, atomics,
//! thread-locals and threads. Under `cfg(loom)` it re-exports loom's modelled types so that the
//! same code can be model-checked; otherwise parking_lot's locks and std's atomics and `Arc`.
//!
//! All backends expose one API shape: parking_lot's (no poisoning, `lock()` returns the guard,
//! `Condvar::wait(&mut guard)`, `Condvar::wait_until(&mut guard, deadline)`).
//!
//! Loom cannot model time: under `cfg(loom)` the timed waits wait until notified and never report
//! a timeout, so timeout paths must be covered by ordinary tests.

#[cfg(not(loom))]
mod imp {
    pub use parking_lot::{Condvar, Mutex, MutexGuard, WaitTimeoutResult};
    pub use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
    pub use std::sync::Arc;
    pub use std::thread;
    pub use std::thread_local;
}

#[cfg(loom)]
mod imp {
    pub use loom::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
    pub use loom::sync::Arc;
    pub use loom::thread;
    pub use loom::thread_local;

    use std::fmt;
    use std::ops::{Deref, DerefMut};
    use std::time::{Duration, Instant};

    /// loom's `Mutex` given parking_lot's shape (no poisoning).
    #[derive(Debug, Default)]
    pub struct Mutex<T>(loom::sync::Mutex<T>);

    /// Guard of [`Mutex`].
    ///
    /// Invariant: `inner` is `Some` except while [`Condvar::wait`] has handed the loom guard to
    /// loom. If loom panics inside that wait (it reports a modelled deadlock by panicking), the
    /// guard is left empty and simply drops; nothing dereferences it during unwinding.
    pub struct MutexGuard<'a, T> {
        inner: Option<loom::sync::MutexGuard<'a, T>>,
    }

    impl<T> Mutex<T> {
        /// Creates a mutex holding `value`.
        pub fn new(value: T) -> Self {
            Mutex(loom::sync::Mutex::new(value))
        }

        /// Locks the mutex; a poisoned loom mutex is entered anyway, as parking_lot would.
        pub fn lock(&self) -> MutexGuard<'_, T> {
            let inner = self.0.lock().unwrap_or_else(|e| e.into_inner());
            MutexGuard { inner: Some(inner) }
        }
    }

    impl<T> Deref for MutexGuard<'_, T> {
        type Target = T;
        fn deref(&self) -> &T {
            self.inner
                .as_deref()
                .expect("mutex guard used during a condvar wait")
        }
    }

    impl<T> DerefMut for MutexGuard<'_, T> {
        fn deref_mut(&mut self) -> &mut T {
            self.inner
                .as_deref_mut()
                .expect("mutex guard used during a condvar wait")
        }
    }

    impl<T: fmt::Debug> fmt::Debug for MutexGuard<'_, T> {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            match &self.inner {
                Some(g) => fmt::Debug::fmt(&**g, f),
                None => f.write_str("<waiting>"),
            }
        }
    }

    /// The result of a timed wait; under loom it never times out.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct WaitTimeoutResult(bool);

    impl WaitTimeoutResult {
        /// Whether the wait ended because its time ran out (never, under loom).
        pub fn timed_out(self) -> bool {
            self.0
        }
    }

    /// loom's `Condvar` given parking_lot's shape (`wait(&mut guard)`).
    #[derive(Debug, Default)]
    pub struct Condvar(loom::sync::Condvar);

    impl Condvar {
        /// Creates a condition variable.
        pub fn new() -> Self {
            Condvar(loom::sync::Condvar::new())
        }

        /// Blocks until notified, releasing and re-acquiring the guard's lock.
        pub fn wait<T>(&self, guard: &mut MutexGuard<'_, T>) {
            let inner = guard
                .inner
                .take()
                .expect("mutex guard used during a condvar wait");
            // If loom panics here (a modelled deadlock), `guard.inner` stays `None` and the
            // wrapper drops harmlessly while unwinding.
            let inner = self.0.wait(inner).unwrap_or_else(|e| e.into_inner());
            guard.inner = Some(inner);
        }

        /// Waits until notified; loom cannot model time, so this never times out.
        pub fn wait_until<T>(
            &self,
            guard: &mut MutexGuard<'_, T>,
            _deadline: Instant,
        ) -> WaitTimeoutResult {
            self.wait(guard);
            WaitTimeoutResult(false)
        }

        /// Waits until notified; loom cannot model time, so this never times out.
        pub fn wait_for<T>(
            &self,
            guard: &mut MutexGuard<'_, T>,
            _timeout: Duration,
        ) -> WaitTimeoutResult {
            self.wait(guard);
            WaitTimeoutResult(false)
        }

        /// Wakes one waiter.
        pub fn notify_one(&self) -> bool {
            self.0.notify_one();
            true
        }

        /// Wakes every waiter.
        pub fn notify_all(&self) -> usize {
            self.0.notify_all();
            0
        }
    }
}

pub use imp::*;
