//! The synchronisation shim: the only module that names locks, condition variables, atomics,
//! thread-locals and threads. Under `cfg(loom)` it re-exports loom's modelled types so that the
//! same code can be model-checked; otherwise parking_lot's locks and std's atomics and `Arc`.
//!
//! The rule is enforced: `clippy.toml` disallows parking_lot's and std's locks, condition
//! variables, atomics, once-cells and thread spawns everywhere, and this module is the one place
//! that allows them. Under normal builds the names here are *type aliases* (or thin wrappers),
//! not re-exports: clippy's `disallowed-types` matches the definition a path resolves to, and a
//! re-export resolves to the disallowed type itself.
//!
//! All backends expose one API shape: parking_lot's for locks (no poisoning, `lock()` returns
//! the guard, `Condvar::wait(&mut guard)`, `Condvar::wait_until(&mut guard, deadline)`) and
//! std's for atomics and threads.
//!
//! Loom cannot model time: under `cfg(loom)` the timed waits wait until notified and never report
//! a timeout, so timeout paths must be covered by ordinary tests.
//!
//! What loom cannot model at all is std's in every build, and said so where it is exported:
//! scoped threads ([`thread::scope`], [`thread::Builder::spawn_scoped`]) and `static`s
//! ([`statics`]). The runtime's stage threads are scoped and talk over crossbeam channels, which
//! loom cannot model either; the protocols built from the locks and atomics here are modelled on
//! their own (`tests/loom_*.rs`).
//!
//! `RwLock` is not exported: nothing needs one yet (add it here, over loom's, when something
//! does).
#![allow(clippy::disallowed_types, clippy::disallowed_methods)]
// The shim's surface is one set of primitives with one shape in both builds; not every build
// uses every one of them.
#![allow(dead_code, unused_imports)]
// The module is `pub(crate)`; its items are `pub` so that both backends read alike.
#![allow(unreachable_pub)]

#[cfg(not(loom))]
mod imp {
    pub use parking_lot::{MutexGuard, WaitTimeoutResult};
    pub use std::sync::atomic::Ordering;
    pub use std::sync::Arc;
    pub use std::thread_local;

    /// parking_lot's mutex.
    pub type Mutex<T> = parking_lot::Mutex<T>;
    /// parking_lot's condition variable.
    pub type Condvar = parking_lot::Condvar;
    /// std's atomic.
    pub type AtomicBool = std::sync::atomic::AtomicBool;
    /// std's atomic.
    pub type AtomicU32 = std::sync::atomic::AtomicU32;
    /// std's atomic.
    pub type AtomicU64 = std::sync::atomic::AtomicU64;
    /// std's atomic.
    pub type AtomicI64 = std::sync::atomic::AtomicI64;
    /// std's atomic.
    pub type AtomicUsize = std::sync::atomic::AtomicUsize;
}

#[cfg(loom)]
mod imp {
    pub use loom::sync::atomic::{
        AtomicBool, AtomicI64, AtomicU32, AtomicU64, AtomicUsize, Ordering,
    };
    pub use loom::sync::Arc;
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

/// Threads: std's normally, loom's under `cfg(loom)`, with std's API shape.
pub mod thread {
    use std::io;

    pub use std::thread::{Scope, ScopedJoinHandle};

    #[cfg(not(loom))]
    pub use std::thread::JoinHandle;

    #[cfg(loom)]
    pub use loom_join::JoinHandle;

    /// Runs `f` with a scope whose threads are all joined before `scope` returns.
    ///
    /// std's in every build: loom has no scoped threads, so code on scoped threads (the
    /// runtime's stage threads) is not modelled.
    pub fn scope<'env, F, T>(f: F) -> T
    where
        F: for<'scope> FnOnce(&'scope Scope<'scope, 'env>) -> T,
    {
        std::thread::scope(f)
    }

    /// Spawns a thread (loom's under `cfg(loom)`).
    pub fn spawn<F, T>(f: F) -> JoinHandle<T>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        Builder::new().spawn(f).expect("failed to spawn thread")
    }

    /// A thread factory with std's shape (only the name is configurable).
    #[derive(Debug, Default)]
    pub struct Builder {
        name: Option<String>,
    }

    impl Builder {
        /// A builder for an unnamed thread.
        pub fn new() -> Builder {
            Builder { name: None }
        }

        /// Names the thread.
        pub fn name(mut self, name: String) -> Builder {
            self.name = Some(name);
            self
        }

        /// Spawns the thread (loom's under `cfg(loom)`).
        pub fn spawn<F, T>(self, f: F) -> io::Result<JoinHandle<T>>
        where
            F: FnOnce() -> T + Send + 'static,
            T: Send + 'static,
        {
            #[cfg(not(loom))]
            {
                self.std().spawn(f)
            }
            #[cfg(loom)]
            {
                loom_join::spawn(self.name, f)
            }
        }

        /// Spawns a thread in `scope`. std's in every build: loom has no scoped threads.
        pub fn spawn_scoped<'scope, 'env, F, T>(
            self,
            scope: &'scope Scope<'scope, 'env>,
            f: F,
        ) -> io::Result<ScopedJoinHandle<'scope, T>>
        where
            F: FnOnce() -> T + Send + 'scope,
            T: Send + 'scope,
        {
            self.std().spawn_scoped(scope, f)
        }

        fn std(self) -> std::thread::Builder {
            let b = std::thread::Builder::new();
            match self.name {
                Some(name) => b.name(name),
                None => b,
            }
        }
    }

    /// loom's `JoinHandle` has no `is_finished`: this one gets it from a modelled flag that the
    /// thread sets as its closure returns or unwinds.
    #[cfg(loom)]
    mod loom_join {
        use std::io;

        use loom::sync::atomic::{AtomicBool, Ordering};
        use loom::sync::Arc;

        /// A loom thread's handle, with std's `is_finished`.
        #[derive(Debug)]
        pub struct JoinHandle<T> {
            inner: loom::thread::JoinHandle<T>,
            finished: Arc<AtomicBool>,
        }

        struct SetOnDrop(Arc<AtomicBool>);

        impl Drop for SetOnDrop {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Release);
            }
        }

        pub(super) fn spawn<F, T>(name: Option<String>, f: F) -> io::Result<JoinHandle<T>>
        where
            F: FnOnce() -> T + Send + 'static,
            T: Send + 'static,
        {
            let finished = Arc::new(AtomicBool::new(false));
            let flag = SetOnDrop(Arc::clone(&finished));
            let body = move || {
                let _flag = flag;
                f()
            };
            let b = loom::thread::Builder::new();
            let b = match name {
                Some(name) => b.name(name),
                None => b,
            };
            Ok(JoinHandle {
                inner: b.spawn(body)?,
                finished,
            })
        }

        impl<T> JoinHandle<T> {
            /// Waits for the thread to finish.
            pub fn join(self) -> std::thread::Result<T> {
                self.inner.join()
            }

            /// Whether the thread's closure has returned (or unwound).
            pub fn is_finished(&self) -> bool {
                self.finished.load(Ordering::Acquire)
            }
        }
    }
}

/// For `static`s: std's types in every build. loom's objects have no `const` constructors and
/// belong to one model execution, so a `static` cannot hold one. What lives in a static here (id
/// counters, once-initialised caches) only hands out values and is part of no modelled protocol.
pub mod statics {
    /// std's atomic, for a `static` counter.
    pub type AtomicU64 = std::sync::atomic::AtomicU64;
    /// std's once-cell, for a `static` cache.
    pub type OnceLock<T> = std::sync::OnceLock<T>;
}
