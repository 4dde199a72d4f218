//! The synchronisation shim: the only module that names locks, condition variables, atomics and
//! threads. Under `cfg(loom)` it re-exports loom's modelled types so that the same code can be
//! model-checked; otherwise parking_lot's locks and std's atomics and `Arc`.
//!
//! All backends expose one API shape: parking_lot's (no poisoning, `lock()` returns the guard,
//! `Condvar::wait(&mut guard)`).

#[cfg(not(loom))]
mod imp {
    pub use parking_lot::{Condvar, Mutex, MutexGuard};
    pub use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
    pub use std::sync::Arc;
    pub use std::thread;
}

#[cfg(loom)]
mod imp {
    pub use loom::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
    pub use loom::sync::Arc;
    pub use loom::thread;

    /// loom's `Mutex` given parking_lot's shape (no poisoning).
    #[derive(Debug, Default)]
    pub struct Mutex<T>(loom::sync::Mutex<T>);
    /// Guard of [`Mutex`].
    pub type MutexGuard<'a, T> = loom::sync::MutexGuard<'a, T>;

    impl<T> Mutex<T> {
        /// Creates a mutex holding `value`.
        pub fn new(value: T) -> Self {
            Mutex(loom::sync::Mutex::new(value))
        }
        /// Locks the mutex; loom's locks cannot be poisoned in a passing model.
        pub fn lock(&self) -> MutexGuard<'_, T> {
            self.0.lock().expect("loom mutex poisoned")
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
        pub fn wait<'a, T>(&self, guard: &mut MutexGuard<'a, T>) {
            // loom's wait consumes the guard; swap it through a temporary.
            take_mut(guard, |g| self.0.wait(g).expect("loom mutex poisoned"));
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

    fn take_mut<T>(slot: &mut T, f: impl FnOnce(T) -> T) {
        // SAFETY: `slot` is read out and written back before anything else can observe it; if `f`
        // panics we abort, so no one ever sees the moved-out value twice.
        unsafe {
            let old = std::ptr::read(slot);
            let guard = AbortOnDrop;
            let new = f(old);
            std::mem::forget(guard);
            std::ptr::write(slot, new);
        }
    }

    struct AbortOnDrop;
    impl Drop for AbortOnDrop {
        fn drop(&mut self) {
            std::process::abort();
        }
    }
}

pub use imp::*;
