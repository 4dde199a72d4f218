//! `Pool<R>` and its builder: granting units in FIFO order, waiting, and checking resources out.

use std::fmt;
use std::mem::ManuallyDrop;
use std::sync::Arc as StdArc;
use std::time::{Duration, Instant};

use super::error::{BoxError, PoolError};
#[cfg(loom)]
use super::graph::Mutation;
use super::graph::{PoolId, Registry, Woken};
use super::lease::Lease;
use super::metrics::PoolMetrics;
use super::task::TaskId;
use crate::sync::{Arc, Mutex};

type Factory<R> = Box<dyn Fn() -> Result<R, BoxError> + Send + Sync>;
type Validate<R> = Box<dyn Fn(&mut R) -> bool + Send + Sync>;

/// State shared by a pool's handles and leases.
pub(crate) struct Shared<R> {
    pub(crate) name: StdArc<str>,
    id: PoolId,
    registry: Registry,
    /// Created resources not lent out. A leaf lock: never held while taking another lock.
    /// Invariant: `idle.len()` plus the resources inside leases never exceeds the capacity.
    pub(crate) idle: Mutex<Vec<R>>,
    pub(crate) factory: Option<Factory<R>>,
    validate: Option<Validate<R>>,
}

impl<R> Shared<R> {
    /// Returns a unit held by `task`, or retires it, and wakes exactly the waiters whose wait
    /// that changed: the one waiter served, or after a retirement the waiters whose wait can no
    /// longer end (they re-run the check). Notified under the registry lock, so a waiter cannot
    /// miss it: it is asleep on its condition variable or has not yet re-taken the lock, and then
    /// finds the served mark or re-check flag the moment it does.
    pub(crate) fn give_back(&self, task: TaskId, retire: bool) {
        let reg = &self.registry;
        let mut g = reg.lock();
        if retire {
            g.retire(self.id, task);
            #[cfg(loom)]
            if reg.mutated(Mutation::ShrinkNotRechecked) {
                return;
            }
            // The pool shrank: the only change that can make a waiting task stuck without a new
            // wait edge (see README.md). Wake those it made stuck, and only those.
            if reg.detection() {
                for wake in g.flag_stuck_waiters(self.id) {
                    wake.notify_one();
                }
            }
        } else if let Some(wake) = g.release(self.id, task) {
            #[cfg(loom)]
            if reg.mutated(Mutation::ServedNotNotified) {
                return;
            }
            wake.notify_one();
        }
    }
}

impl<R> Drop for Shared<R> {
    fn drop(&mut self) {
        self.registry.lock().remove_pool(self.id);
    }
}

/// A named pool of at most `capacity` resources, lent out as [`Lease`]s.
///
/// Requests are served in FIFO order; a request that could never be served because every holder
/// is itself waiting fails at once with [`PoolError::WouldDeadlock`]. Cloning a `Pool` gives
/// another handle to the same pool.
///
/// # Examples
///
/// ```
/// use millrace::{Pool, PoolError};
///
/// let pool = Pool::new("db", 1, || Ok::<_, std::io::Error>(42));
/// let first = pool.acquire().unwrap();
/// assert_eq!(*first, 42);
/// // This task already holds the only unit: asking again could never succeed.
/// let err = pool.acquire().unwrap_err();
/// assert!(matches!(err, PoolError::WouldDeadlock { .. }));
/// drop(first);
/// assert!(pool.try_acquire().unwrap().is_some());
/// ```
pub struct Pool<R> {
    shared: Arc<Shared<R>>,
}

impl<R> Clone for Pool<R> {
    fn clone(&self) -> Self {
        Pool {
            shared: self.shared.clone(),
        }
    }
}

impl<R> fmt::Debug for Pool<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let g = self.shared.registry.lock();
        let node = g.pool(self.shared.id);
        f.debug_struct("Pool")
            .field("name", &node.name)
            .field("capacity", &node.capacity)
            .field("in_use", &node.granted)
            .finish()
    }
}

/// How long a request may block.
#[derive(Clone, Copy)]
enum Wait {
    Never,
    Forever,
    Until(Instant),
}

impl<R> Pool<R> {
    /// Starts building a pool called `name`.
    pub fn builder(name: impl Into<String>) -> PoolBuilder<R> {
        PoolBuilder {
            name: name.into(),
            capacity: None,
            resources: Vec::new(),
            factory: None,
            validate: None,
            registry: None,
        }
    }

    /// A pool of `capacity` resources created lazily by `factory`, in the global registry.
    pub fn new<F, E>(name: impl Into<String>, capacity: usize, factory: F) -> Pool<R>
    where
        F: Fn() -> Result<R, E> + Send + Sync + 'static,
        E: Into<BoxError>,
    {
        Pool::builder(name)
            .capacity(capacity)
            .factory(factory)
            .build()
    }

    /// A pool lending exactly the given resources, in the global registry.
    pub fn from_resources(name: impl Into<String>, resources: Vec<R>) -> Pool<R> {
        Pool::builder(name).resources(resources).build()
    }

    /// The pool's name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// The registry whose lease graph this pool is part of.
    pub fn registry(&self) -> &Registry {
        &self.shared.registry
    }

    /// Takes a lease for the current task ([`TaskId::current`]), blocking until one is free.
    ///
    /// # Errors
    ///
    /// [`PoolError::WouldDeadlock`] at once if the wait could never end;
    /// [`PoolError::Factory`] if a resource had to be created and the factory failed;
    /// [`PoolError::Validation`] if the resource failed validation and cannot be replaced.
    pub fn acquire(&self) -> Result<Lease<R>, PoolError> {
        self.acquire_as(TaskId::current())
    }

    /// Like [`acquire`](Pool::acquire), charged to `task` instead of the current thread's task.
    pub fn acquire_as(&self, task: TaskId) -> Result<Lease<R>, PoolError> {
        self.request(task, Wait::Forever)
            .map(|lease| lease.expect("a blocking request returns a lease"))
    }

    /// Like [`acquire`](Pool::acquire), but gives up with [`PoolError::Timeout`] after `timeout`.
    pub fn acquire_timeout(&self, timeout: Duration) -> Result<Lease<R>, PoolError> {
        let wait = match Instant::now().checked_add(timeout) {
            Some(deadline) => Wait::Until(deadline),
            None => Wait::Forever,
        };
        self.request(TaskId::current(), wait)
            .map(|lease| lease.expect("a blocking request returns a lease"))
    }

    /// Takes a lease only if one is free now and nobody queues ahead; `Ok(None)` otherwise.
    /// Never blocks and never reports a deadlock.
    ///
    /// # Errors
    ///
    /// [`PoolError::Factory`] or [`PoolError::Validation`] as for [`acquire`](Pool::acquire).
    pub fn try_acquire(&self) -> Result<Option<Lease<R>>, PoolError> {
        self.request(TaskId::current(), Wait::Never)
    }

    /// A snapshot of the pool's counters.
    pub fn metrics(&self) -> PoolMetrics {
        let idle = self.shared.idle.lock().len();
        let g = self.shared.registry.lock();
        let node = g.pool(self.shared.id);
        PoolMetrics {
            name: node.name.to_string(),
            capacity: node.capacity,
            in_use: node.granted,
            idle,
            waiters: node.waiters(),
            acquires: node.stats.acquires,
            total_wait: node.stats.total_wait,
            timeouts: node.stats.timeouts,
            deadlocks: node.stats.deadlocks,
            factory_errors: node.stats.factory_errors,
            invalid: node.stats.invalid,
            wakeups: node.stats.wakeups,
            deadlock_checks: node.stats.deadlock_checks,
        }
    }

    fn request(&self, task: TaskId, wait: Wait) -> Result<Option<Lease<R>>, PoolError> {
        let sh = &*self.shared;
        let mut g = sh.registry.lock();
        if g.try_grant(sh.id, task) {
            drop(g);
            return self.checkout(task).map(Some);
        }
        if let Wait::Never = wait {
            return Ok(None);
        }
        let detect = sh.registry.detection();
        let (ticket, wake) = g.enqueue(sh.id, task);
        // Handed back to the graph (`end_wait`) on every return. Not dropped if a wait unwinds:
        // parking_lot's never does, and loom's panics when it finds a deadlock, and a loom `Arc`
        // dropped while unwinding from a failed execution aborts the test binary instead of
        // failing the model.
        let wake = ManuallyDrop::new(wake);
        let refusal = |cycle| PoolError::WouldDeadlock {
            pool: sh.name.to_string(),
            cycle,
        };
        // The one new wait edge: the only check a request needs unless its pool shrinks later.
        if let Some(cycle) = detect
            .then(|| g.refuse_if_stuck(sh.id, ticket, task))
            .flatten()
        {
            g.end_wait(ManuallyDrop::into_inner(wake));
            return Err(refusal(cycle));
        }
        let start = Instant::now();
        loop {
            // Our own condition variable: notified only when we are served or must re-check.
            let timed_out = match wait {
                Wait::Until(deadline) => wake.wait_until(&mut g, deadline).timed_out(),
                _ => {
                    wake.wait(&mut g);
                    false
                }
            };
            let woken = g.woken(sh.id, ticket);
            if woken == Woken::Served {
                g.pool_mut(sh.id).stats.total_wait += start.elapsed();
                g.end_wait(ManuallyDrop::into_inner(wake));
                drop(g);
                return self.checkout(task).map(Some);
            }
            if timed_out {
                g.dequeue(sh.id, ticket, task);
                g.end_wait(ManuallyDrop::into_inner(wake));
                let waited = start.elapsed();
                let stats = &mut g.pool_mut(sh.id).stats;
                stats.timeouts += 1;
                stats.total_wait += waited;
                return Err(PoolError::Timeout {
                    pool: sh.name.to_string(),
                    waited,
                });
            }
            // Flagged by a retirement: the graph changed under us, so re-check. (Otherwise, a
            // spurious wake-up: nothing changed, and the check made at enqueue still holds.)
            if woken == Woken::Recheck && detect {
                if let Some(cycle) = g.refuse_if_stuck(sh.id, ticket, task) {
                    g.end_wait(ManuallyDrop::into_inner(wake));
                    return Err(refusal(cycle));
                }
            }
        }
    }

    /// Turns a granted unit into a lease, outside every lock: reuses an idle resource (validated
    /// if the pool validates) or creates one. On failure the unit goes back (to the next waiter).
    fn checkout(&self, task: TaskId) -> Result<Lease<R>, PoolError> {
        let sh = &*self.shared;
        // From here on, dropping `lease` (also by a panicking factory or validator) gives the
        // unit back.
        let mut lease = Lease {
            shared: self.shared.clone(),
            resource: None,
            task,
            retire: false,
        };
        let idle = sh.idle.lock().pop();
        if let Some(mut r) = idle {
            match &sh.validate {
                Some(valid) if !valid(&mut r) => {
                    drop(r);
                    sh.registry.lock().pool_mut(sh.id).stats.invalid += 1;
                }
                _ => {
                    lease.resource = Some(r);
                    return Ok(lease);
                }
            }
        }
        let Some(factory) = &sh.factory else {
            // Only reachable after a failed validation: the unit has lost its resource for good.
            lease.retire = true;
            drop(lease);
            return Err(PoolError::Validation {
                pool: sh.name.to_string(),
            });
        };
        match factory() {
            Ok(r) => {
                lease.resource = Some(r);
                Ok(lease)
            }
            Err(source) => {
                drop(lease);
                sh.registry.lock().pool_mut(sh.id).stats.factory_errors += 1;
                Err(PoolError::Factory {
                    pool: sh.name.to_string(),
                    source,
                })
            }
        }
    }
}

/// Configures a [`Pool`]: capacity, resources given up front, factory, validation, registry.
///
/// # Examples
///
/// ```
/// use millrace::{Pool, Registry};
///
/// let registry = Registry::new();
/// let pool = Pool::builder("sockets")
///     .capacity(4)
///     .resources(vec![1, 2]) // two now, two more from the factory when needed
///     .factory(|| Ok::<_, std::io::Error>(0))
///     .validate(|n: &mut i32| *n >= 0)
///     .registry(&registry)
///     .build();
/// assert_eq!(pool.metrics().capacity, 4);
/// ```
#[must_use = "a builder does nothing until `build` is called"]
pub struct PoolBuilder<R> {
    name: String,
    capacity: Option<usize>,
    resources: Vec<R>,
    factory: Option<Factory<R>>,
    validate: Option<Validate<R>>,
    registry: Option<Registry>,
}

impl<R> std::fmt::Debug for PoolBuilder<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolBuilder")
            .field("name", &self.name)
            .field("capacity", &self.capacity)
            .field("resources", &self.resources.len())
            .finish_non_exhaustive()
    }
}

impl<R> PoolBuilder<R> {
    /// The number of units; defaults to the number of resources given up front.
    pub fn capacity(mut self, capacity: usize) -> Self {
        self.capacity = Some(capacity);
        self
    }

    /// Resources lent before the factory is asked for any.
    pub fn resources(mut self, resources: impl IntoIterator<Item = R>) -> Self {
        self.resources.extend(resources);
        self
    }

    /// Creates resources lazily, when a granted unit finds no idle resource; also replaces
    /// discarded and invalid ones. Its errors are returned to the requester as
    /// [`PoolError::Factory`]. It runs outside every lock.
    pub fn factory<F, E>(mut self, factory: F) -> Self
    where
        F: Fn() -> Result<R, E> + Send + Sync + 'static,
        E: Into<BoxError>,
    {
        self.factory = Some(Box::new(move || factory().map_err(Into::into)));
        self
    }

    /// Checks an idle resource on checkout; one that fails is dropped and replaced by the
    /// factory (without a factory the request fails with [`PoolError::Validation`]). Runs
    /// outside every lock.
    pub fn validate<F>(mut self, validate: F) -> Self
    where
        F: Fn(&mut R) -> bool + Send + Sync + 'static,
    {
        self.validate = Some(Box::new(validate));
        self
    }

    /// Attaches the pool to `registry` instead of [`Registry::global`]. Pools whose leases may
    /// be held together must share a registry for their deadlocks to be seen.
    pub fn registry(mut self, registry: &Registry) -> Self {
        self.registry = Some(registry.clone());
        self
    }

    /// Builds the pool.
    ///
    /// # Panics
    ///
    /// If the capacity is smaller than the number of resources given, or larger without a
    /// factory to create the rest; under `cfg(loom)`, if no registry was given.
    pub fn build(self) -> Pool<R> {
        let capacity = self.capacity.unwrap_or(self.resources.len());
        assert!(
            capacity >= self.resources.len(),
            "pool '{}': {} resources given for a capacity of {capacity}",
            self.name,
            self.resources.len()
        );
        assert!(
            self.factory.is_some() || capacity == self.resources.len(),
            "pool '{}': capacity {capacity} but only {} resources and no factory",
            self.name,
            self.resources.len()
        );
        #[cfg(not(loom))]
        let registry = self.registry.unwrap_or_else(|| Registry::global().clone());
        #[cfg(loom)]
        let registry = self
            .registry
            .expect("under loom, attach pools to a Registry created inside the model");
        let name: StdArc<str> = self.name.into();
        let id = registry.lock().add_pool(name.clone(), capacity);
        Pool {
            shared: Arc::new(Shared {
                name,
                id,
                registry,
                idle: Mutex::new(self.resources),
                factory: self.factory,
                validate: self.validate,
            }),
        }
    }
}
