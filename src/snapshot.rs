//! RCU-style snapshot cells for hot reload.
//!
//! This module owns [`Snapshot`], a cell holding the current version of a shared value (a stage's
//! parameters, a loaded plugin) behind an [`Arc`], together with a version number. Readers take a
//! cheap [`Arc`] to the current value with [`Snapshot::load`] and keep using it for as long as
//! they like; a writer publishes a new value with [`Snapshot::store`]. A retired value is dropped
//! by whichever holder releases its last [`Arc`]: the cell's own reference goes at the store,
//! each reader's when it is done. No grace period, sleep or epoch is involved.
//!
//! # Design and cost
//!
//! The cell is a `Mutex` around `(version, Arc<T>)`. [`load`](Snapshot::load) locks, clones
//! the `Arc` (one atomic increment) and unlocks; [`store`](Snapshot::store) locks, swaps in the
//! new `Arc`, bumps the version and unlocks, then drops the old `Arc` *outside* the lock, so a
//! value's destructor never runs while the lock is held. The critical sections are a handful of
//! instructions, so neither side blocks the other for long.
//!
//! A lock-free design (arc-swap, hazard pointers, epochs) would save that uncontended lock/unlock
//! pair — a few nanoseconds — at the price of a dependency or subtle unsafe code and a harder
//! proof. Workers load the snapshot once per *batch*, not once per record, so the lock is taken
//! a few thousand times a second at most, and its cost disappears next to the batch itself. Under
//! contention the lock is still fair enough: parking_lot spins briefly before parking, and the
//! sections are far shorter than a time slice.
//!
//! All locks and `Arc`s come from `crate::sync`, so under `cfg(loom)` the cell is the modelled
//! implementation checked by `tests/loom_snapshot.rs`.

use std::fmt;

use crate::sync::{Arc, Mutex};

/// An RCU cell: the current value of a reloadable `T`, with a version number.
///
/// Version 0 is the value given to [`new`](Snapshot::new); each [`store`](Snapshot::store)
/// publishes the next version. Guarantees:
///
/// - **No torn values:** [`load`](Snapshot::load) returns an `Arc` to a complete value that some
///   `new` or `store` published, and [`load_versioned`](Snapshot::load_versioned) returns that
///   value together with the version it was published as.
/// - **Linearizable:** versions strictly increase in the order the stores take effect, and a load
///   that starts after a store returned sees that store's value or a later one.
/// - **Drop exactly once, after the last reader:** a retired value is an ordinary `Arc`, dropped
///   once its last holder (the cell or a reader) lets go of it.
///
/// # Examples
///
/// ```
/// use millrace::Snapshot;
///
/// let config = Snapshot::new(String::from("v0"));
/// let held = config.load(); // a worker starts a batch with version 0
/// assert_eq!(config.store(String::from("v1")), 1); // a reload publishes version 1
/// assert_eq!(*held, "v0"); // the in-flight batch still sees the value it started with
/// assert_eq!(*config.load(), "v1"); // the next batch sees the new one
/// ```
pub struct Snapshot<T> {
    /// The current version and value, replaced together under the lock.
    current: Mutex<(u64, Arc<T>)>,
    /// A bug seeded on purpose for the loom models' demonstration (`tests/loom_snapshot.rs`):
    /// `store` publishes the value in one critical section and the version in another.
    #[cfg(loom)]
    split_store: bool,
}

impl<T> Snapshot<T> {
    /// Creates a cell holding `value` as version 0.
    ///
    /// # Examples
    ///
    /// ```
    /// let cell = millrace::Snapshot::new(42);
    /// assert_eq!(cell.version(), 0);
    /// assert_eq!(*cell.load(), 42);
    /// ```
    pub fn new(value: T) -> Self {
        Snapshot {
            current: Mutex::new((0, Arc::new(value))),
            #[cfg(loom)]
            split_store: false,
        }
    }

    /// A cell whose `store` swaps the value in one critical section and bumps the version in a
    /// second one, so that a reader can see the new value with the old version: only for the
    /// loom model that must show it catches that.
    #[cfg(loom)]
    #[doc(hidden)]
    pub fn with_split_store(value: T) -> Self {
        Snapshot {
            split_store: true,
            ..Snapshot::new(value)
        }
    }

    /// Returns the current value.
    ///
    /// Cheap: one short lock and one reference-count increment. The returned `Arc` keeps the
    /// value alive however many stores happen meanwhile; hot-reloadable stages call this once per
    /// batch so that a whole batch is processed by one version.
    ///
    /// # Examples
    ///
    /// ```
    /// let cell = millrace::Snapshot::new(vec![1, 2, 3]);
    /// let v = cell.load();
    /// assert_eq!(v.len(), 3);
    /// ```
    pub fn load(&self) -> Arc<T> {
        Arc::clone(&self.current.lock().1)
    }

    /// Returns the current version and value, taken together: the value is the one published
    /// as that version.
    ///
    /// # Examples
    ///
    /// ```
    /// let cell = millrace::Snapshot::new("a");
    /// cell.store("b");
    /// let (version, value) = cell.load_versioned();
    /// assert_eq!((version, *value), (1, "b"));
    /// ```
    pub fn load_versioned(&self) -> (u64, Arc<T>) {
        let current = self.current.lock();
        (current.0, Arc::clone(&current.1))
    }

    /// Returns the current version: 0 until the first [`store`](Snapshot::store), then the
    /// version that the latest store returned.
    ///
    /// To read a version together with its value, use
    /// [`load_versioned`](Snapshot::load_versioned); a separate `version()` and `load()` may
    /// straddle a store.
    ///
    /// # Examples
    ///
    /// ```
    /// let cell = millrace::Snapshot::new(0u8);
    /// assert_eq!(cell.version(), 0);
    /// cell.store(1);
    /// cell.store(2);
    /// assert_eq!(cell.version(), 2);
    /// ```
    pub fn version(&self) -> u64 {
        self.current.lock().0
    }

    /// Publishes `value` as the new current value and returns its version (one more than the
    /// previous one).
    ///
    /// The previous value is released by the cell; it is dropped here if no reader holds it,
    /// otherwise when its last reader drops its `Arc`. Its destructor never runs under the
    /// cell's lock, so a slow destructor (unloading a library, say) does not block loads.
    ///
    /// # Examples
    ///
    /// ```
    /// let cell = millrace::Snapshot::new(String::from("old"));
    /// let reader = cell.load();
    /// assert_eq!(cell.store(String::from("new")), 1);
    /// assert_eq!(*reader, "old"); // still alive: the reader holds it
    /// drop(reader); // the old value is dropped here
    /// ```
    ///
    /// # Panics
    ///
    /// Panics if the version would overflow `u64` (after 2⁶⁴ − 1 stores).
    pub fn store(&self, value: T) -> u64 {
        let new = Arc::new(value);
        #[cfg(loom)]
        if self.split_store {
            let old = std::mem::replace(&mut self.current.lock().1, new);
            let version = {
                let mut current = self.current.lock();
                current.0 += 1;
                current.0
            };
            drop(old);
            return version;
        }
        let (version, old) = {
            let mut current = self.current.lock();
            let version = current.0.checked_add(1).expect("snapshot version overflow");
            let old = std::mem::replace(&mut current.1, new);
            current.0 = version;
            (version, old)
        };
        // Released outside the lock: the value's destructor may be slow.
        drop(old);
        version
    }
}

impl<T: Default> Default for Snapshot<T> {
    /// A cell holding `T::default()` as version 0.
    fn default() -> Self {
        Snapshot::new(T::default())
    }
}

impl<T> From<T> for Snapshot<T> {
    /// A cell holding `value` as version 0.
    fn from(value: T) -> Self {
        Snapshot::new(value)
    }
}

impl<T: fmt::Debug> fmt::Debug for Snapshot<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (version, value) = self.load_versioned();
        f.debug_struct("Snapshot")
            .field("version", &version)
            .field("value", &value)
            .finish()
    }
}
