//! The lease graph: which task holds how many leases of which pool, which task waits for which
//! pool, and the deadlock check over it. See `README.md` in this folder for the algorithm.
//!
//! One [`Registry`] serves every pool attached to it. Its lock is the single authority for all
//! accounting (units granted, waiter queues, holders), so the deadlock check always sees a
//! consistent graph. Lock order: the registry lock may be taken while holding nothing, and a
//! pool's idle-list lock is a leaf that is never held while taking the registry lock.

use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc as StdArc;
use std::time::Duration;

use rustc_hash::{FxHashMap, FxHashSet};

use super::error::WaitEdge;
use super::task::TaskId;
use crate::sync::{Arc, AtomicBool, Condvar, Mutex, MutexGuard, Ordering};

/// Index of a pool's node in its registry.
pub(crate) type PoolId = usize;

/// The lease graph shared by a set of pools: one per process by default
/// ([`Registry::global`]), or one per engine or per test.
///
/// Pools only see deadlocks among pools of the same registry, so pools whose leases can be
/// held together should share one.
///
/// # Examples
///
/// ```
/// use millrace::{Pool, Registry};
///
/// let registry = Registry::new();
/// let pool = Pool::builder("conns")
///     .capacity(2)
///     .factory(|| Ok::<_, std::io::Error>(String::from("conn")))
///     .registry(&registry)
///     .build();
/// let lease = pool.acquire().unwrap();
/// assert_eq!(*lease, "conn");
/// ```
#[derive(Clone)]
pub struct Registry {
    inner: Arc<Inner>,
}

struct Inner {
    graph: Mutex<Graph>,
    /// Whether blocking requests run the deadlock check (test-only switch).
    detection: AtomicBool,
    /// A bug seeded on purpose into the wake protocol, for the loom models' demonstrations.
    #[cfg(loom)]
    mutation: Option<Mutation>,
}

/// A bug seeded on purpose into the pool's wake protocol, so that the loom models
/// (`tests/loom_pool.rs`) can show they catch it. Only under `cfg(loom)`.
#[cfg(loom)]
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mutation {
    /// A release hands the unit to the oldest waiter but does not notify it: a lost wake-up.
    ServedNotNotified,
    /// A unit retiring (the pool shrinks) wakes nobody, so a waiter whose wait can no longer
    /// end is never told to re-run the deadlock check.
    ShrinkNotRechecked,
}

impl Registry {
    /// Creates an empty registry, independent of the global one.
    #[allow(clippy::new_without_default)]
    pub fn new() -> Registry {
        Registry {
            inner: Arc::new(Inner {
                graph: Mutex::new(Graph::default()),
                detection: AtomicBool::new(true),
                #[cfg(loom)]
                mutation: None,
            }),
        }
    }

    /// A registry whose pools carry a seeded bug: only for the loom models that must show they
    /// catch it.
    #[cfg(loom)]
    #[doc(hidden)]
    pub fn with_mutation(mutation: Mutation) -> Registry {
        Registry {
            inner: Arc::new(Inner {
                graph: Mutex::new(Graph::default()),
                detection: AtomicBool::new(true),
                mutation: Some(mutation),
            }),
        }
    }

    /// Whether this registry carries the seeded bug `m` (always `false` outside loom).
    #[cfg(loom)]
    pub(crate) fn mutated(&self, m: Mutation) -> bool {
        self.inner.mutation == Some(m)
    }

    /// The process-wide registry, created on first use; pools built without
    /// [`PoolBuilder::registry`](super::PoolBuilder::registry) attach to it.
    #[cfg(not(loom))]
    pub fn global() -> &'static Registry {
        static GLOBAL: crate::sync::statics::OnceLock<Registry> =
            crate::sync::statics::OnceLock::new();
        GLOBAL.get_or_init(Registry::new)
    }

    /// Switches the deadlock check on or off. Only for tests that must show that, without the
    /// check, the models find the deadlock.
    #[doc(hidden)]
    pub fn set_deadlock_detection(&self, on: bool) {
        self.inner.detection.store(on, Ordering::Relaxed);
    }

    /// The leases `task` holds, as `(pool name, count)` pairs sorted by name.
    pub fn leases_held_by(&self, task: TaskId) -> Vec<(String, usize)> {
        let g = self.lock();
        let mut held: Vec<(String, usize)> = g
            .tasks
            .get(&task)
            .map(|node| {
                node.held
                    .iter()
                    .map(|&(p, n)| (g.pool(p).name.to_string(), n))
                    .collect()
            })
            .unwrap_or_default();
        held.sort();
        held
    }

    pub(crate) fn detection(&self) -> bool {
        self.inner.detection.load(Ordering::Relaxed)
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Graph> {
        self.inner.graph.lock()
    }
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let g = self.lock();
        f.debug_struct("Registry")
            .field("pools", &g.pools.iter().flatten().count())
            .field("tasks", &g.tasks.len())
            .finish()
    }
}

/// Counters kept per pool under the registry lock.
#[derive(Debug, Default, Clone)]
pub(crate) struct Stats {
    pub(crate) acquires: u64,
    pub(crate) total_wait: Duration,
    pub(crate) timeouts: u64,
    pub(crate) deadlocks: u64,
    pub(crate) factory_errors: u64,
    pub(crate) invalid: u64,
    /// Returns of a waiter of this pool from its condition variable (served, told to re-check,
    /// timed out, or spurious).
    pub(crate) wakeups: u64,
    /// Runs of the deadlock check (the liveness pass) charged to this pool.
    pub(crate) deadlock_checks: u64,
}

/// A queued request: its ticket, its task, the condition variable its thread sleeps on (its
/// own, so that a hand-off wakes exactly the waiter it serves), and whether the graph changed
/// under it in a way that may have made its wait hopeless.
struct Waiter {
    ticket: u64,
    task: TaskId,
    wake: Arc<Condvar>,
    recheck: bool,
}

/// Why a waiter's thread returned from its wait, as the graph says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Woken {
    /// The request was handed a unit.
    Served,
    /// The pool shrank and the request may now be hopeless: re-run the deadlock check.
    Recheck,
    /// Nothing changed for this request (a spurious wake-up or a timeout): keep waiting.
    Nothing,
}

/// A pool's node in the lease graph.
///
/// Invariants: `granted <= capacity`; `granted` equals the sum of the pool's entries in the
/// tasks' `held` lists; if `queue` is non-empty then `granted == capacity` (a freed unit goes
/// straight to the oldest waiter, so a free unit and a waiter never coexist).
pub(crate) struct PoolNode {
    pub(crate) name: StdArc<str>,
    /// Units this pool can lend; shrinks only when a unit of a pool without a factory retires.
    pub(crate) capacity: usize,
    /// Units lent out, including units whose resource is still being created.
    pub(crate) granted: usize,
    /// Waiting requests, oldest first.
    queue: VecDeque<Waiter>,
    /// Tickets that were handed a unit but whose waiter has not woken yet.
    served: Vec<u64>,
    pub(crate) stats: Stats,
}

impl PoolNode {
    pub(crate) fn waiters(&self) -> usize {
        self.queue.len()
    }
}

/// A task's node: what it holds and what it waits for. Present only while it holds or waits.
#[derive(Default)]
struct TaskNode {
    /// (pool, units held), one entry per pool.
    held: Vec<(PoolId, usize)>,
    /// The pool this task is blocked on, if any.
    waiting: Option<PoolId>,
}

impl TaskNode {
    fn is_empty(&self) -> bool {
        self.held.is_empty() && self.waiting.is_none()
    }
}

/// Everything the registry lock protects.
#[derive(Default)]
pub(crate) struct Graph {
    pools: Vec<Option<PoolNode>>,
    free_ids: Vec<PoolId>,
    tasks: FxHashMap<TaskId, TaskNode>,
    /// Emptied `held` lists kept for reuse, so the uncontended path does not allocate.
    spare: Vec<Vec<(PoolId, usize)>>,
    /// Condition variables of finished waits kept for reuse, so a wait does not allocate.
    spare_wakers: Vec<Arc<Condvar>>,
    next_ticket: u64,
}

impl Graph {
    pub(crate) fn add_pool(&mut self, name: StdArc<str>, capacity: usize) -> PoolId {
        let node = PoolNode {
            name,
            capacity,
            granted: 0,
            queue: VecDeque::new(),
            served: Vec::new(),
            stats: Stats::default(),
        };
        match self.free_ids.pop() {
            Some(id) => {
                self.pools[id] = Some(node);
                id
            }
            None => {
                self.pools.push(Some(node));
                self.pools.len() - 1
            }
        }
    }

    /// Forgets a pool; called when its last handle and lease are gone.
    pub(crate) fn remove_pool(&mut self, id: PoolId) {
        self.pools[id] = None;
        self.free_ids.push(id);
    }

    pub(crate) fn pool(&self, id: PoolId) -> &PoolNode {
        self.pools[id].as_ref().expect("pool is registered")
    }

    pub(crate) fn pool_mut(&mut self, id: PoolId) -> &mut PoolNode {
        self.pools[id].as_mut().expect("pool is registered")
    }

    /// Grants a unit at once if one is free and nobody queues ahead (FIFO: no barging).
    pub(crate) fn try_grant(&mut self, id: PoolId, task: TaskId) -> bool {
        let p = self.pool_mut(id);
        if p.queue.is_empty() && p.granted < p.capacity {
            p.granted += 1;
            p.stats.acquires += 1;
            self.hold(id, task);
            true
        } else {
            false
        }
    }

    fn hold(&mut self, id: PoolId, task: TaskId) {
        let spare = &mut self.spare;
        let node = self.tasks.entry(task).or_insert_with(|| TaskNode {
            held: spare.pop().unwrap_or_default(),
            waiting: None,
        });
        match node.held.iter_mut().find(|(p, _)| *p == id) {
            Some((_, n)) => *n += 1,
            None => node.held.push((id, 1)),
        }
    }

    fn unhold(&mut self, id: PoolId, task: TaskId) {
        // Every lease is recorded under its task when granted, so the node exists. (No assertion:
        // this runs in `Lease::drop`, possibly while unwinding.)
        let Some(node) = self.tasks.get_mut(&task) else {
            return;
        };
        if let Some(i) = node.held.iter().position(|(p, _)| *p == id) {
            node.held[i].1 -= 1;
            if node.held[i].1 == 0 {
                node.held.swap_remove(i);
            }
        }
        self.forget_if_idle(task);
    }

    fn forget_if_idle(&mut self, task: TaskId) {
        if self.tasks.get(&task).is_some_and(TaskNode::is_empty) {
            let node = self.tasks.remove(&task).expect("present");
            self.spare.push(node.held);
        }
    }

    /// Returns a unit held by `task`: to the oldest waiter if any (returns that waiter's condition
    /// variable, for the caller to notify: the only thread this release must wake), else to the
    /// free units (returns `None`: nobody's wait changed).
    pub(crate) fn release(&mut self, id: PoolId, task: TaskId) -> Option<Arc<Condvar>> {
        self.unhold(id, task);
        let p = self.pool_mut(id);
        match p.queue.pop_front() {
            Some(w) => {
                p.served.push(w.ticket);
                p.stats.acquires += 1;
                if let Some(node) = self.tasks.get_mut(&w.task) {
                    node.waiting = None;
                }
                self.hold(id, w.task);
                Some(w.wake)
            }
            None => {
                p.granted -= 1;
                None
            }
        }
    }

    /// Retires a unit held by `task` for good: the pool's capacity shrinks by one.
    pub(crate) fn retire(&mut self, id: PoolId, task: TaskId) {
        self.unhold(id, task);
        let p = self.pool_mut(id);
        p.granted -= 1;
        p.capacity -= 1;
    }

    /// Queues `task` for a unit of pool `id` and marks it waiting; returns its ticket and the
    /// condition variable its thread must wait on (hand it back with [`Graph::end_wait`]).
    pub(crate) fn enqueue(&mut self, id: PoolId, task: TaskId) -> (u64, Arc<Condvar>) {
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        let wake = self
            .spare_wakers
            .pop()
            .unwrap_or_else(|| Arc::new(Condvar::new()));
        self.pool_mut(id).queue.push_back(Waiter {
            ticket,
            task,
            wake: wake.clone(),
            recheck: false,
        });
        // A task waits in one place at a time (see `TaskId`). If a caller breaks that contract, the
        // task sits in several queues and counts as live as soon as any of those pools is live.
        self.tasks.entry(task).or_default().waiting = Some(id);
        (ticket, wake)
    }

    /// Takes back a finished wait's condition variable for reuse. The request has left the queue
    /// (served, timed out or refused), so no release can notify it any more.
    pub(crate) fn end_wait(&mut self, wake: Arc<Condvar>) {
        self.spare_wakers.push(wake);
    }

    /// Takes a still-waiting request out of the queue (timeout or deadlock).
    pub(crate) fn dequeue(&mut self, id: PoolId, ticket: u64, task: TaskId) {
        let p = self.pool_mut(id);
        p.queue.retain(|w| w.ticket != ticket);
        if let Some(node) = self.tasks.get_mut(&task) {
            node.waiting = None;
        }
        self.forget_if_idle(task);
    }

    /// Why the waiter of `ticket` was woken; consumes the notice (the served mark or the
    /// re-check flag), and counts the wake-up.
    pub(crate) fn woken(&mut self, id: PoolId, ticket: u64) -> Woken {
        let p = self.pool_mut(id);
        p.stats.wakeups += 1;
        if let Some(i) = p.served.iter().position(|&t| t == ticket) {
            p.served.swap_remove(i);
            return Woken::Served;
        }
        match p.queue.iter_mut().find(|w| w.ticket == ticket) {
            Some(w) if w.recheck => {
                w.recheck = false;
                Woken::Recheck
            }
            _ => Woken::Nothing,
        }
    }

    /// Runs the deadlock check for the queued request `ticket` and, when its wait can never end,
    /// takes it out of the queue, counts the refusal and returns the cycle to report.
    pub(crate) fn refuse_if_stuck(
        &mut self,
        id: PoolId,
        ticket: u64,
        me: TaskId,
    ) -> Option<Vec<WaitEdge>> {
        self.pool_mut(id).stats.deadlock_checks += 1;
        let cycle = self.find_deadlock(id, me)?;
        self.dequeue(id, ticket, me);
        self.pool_mut(id).stats.deadlocks += 1;
        Some(cycle)
    }

    /// After pool `id` shrank: finds the waiters (of any pool) whose wait can no longer end,
    /// flags them to re-run the deadlock check and returns their condition variables for the
    /// caller to notify. Waiters that can still be served are left asleep: their answer did not
    /// change. One liveness pass, charged to pool `id`.
    pub(crate) fn flag_stuck_waiters(&mut self, id: PoolId) -> Vec<Arc<Condvar>> {
        self.pool_mut(id).stats.deadlock_checks += 1;
        let pool_live = self.liveness(None);
        let mut wake = Vec::new();
        for (i, p) in self.pools.iter_mut().enumerate() {
            let Some(p) = p else { continue };
            if pool_live[i] {
                continue;
            }
            // Every waiter of a stuck pool is stuck.
            for w in &mut p.queue {
                w.recheck = true;
                wake.push(w.wake.clone());
            }
        }
        wake
    }

    /// The deadlock check. `me` must already be queued on pool `id`. Returns the wait-for cycle
    /// through `me` if its wait can never end, `None` if it may.
    ///
    /// `me` is stuck exactly when its pool ends up not live (see [`Graph::liveness`]).
    /// O(tasks + pools + held entries + queued waiters).
    pub(crate) fn find_deadlock(&self, id: PoolId, me: TaskId) -> Option<Vec<WaitEdge>> {
        let pool_live = self.liveness(Some(id));
        if pool_live[id] {
            return None;
        }
        Some(self.cycle_through(id, me, &pool_live))
    }

    /// Which pools are live (indexed by id). A pool is *live* if it has a free unit or
    /// a live holder; a task is live if it is not waiting or waits for a live pool. Liveness is
    /// propagated from the running tasks (the least fixed point). With `stop_at`, returns as
    /// soon as that pool is known to be live (the rest is then incomplete).
    fn liveness(&self, stop_at: Option<PoolId>) -> Vec<bool> {
        let mut pool_live = vec![false; self.pools.len()];
        let mut pools_todo = Vec::new();
        for (i, p) in self.pools.iter().enumerate() {
            if let Some(p) = p {
                if p.granted < p.capacity {
                    pool_live[i] = true;
                    pools_todo.push(i);
                }
            }
        }
        let mut task_live: FxHashSet<TaskId> = FxHashSet::default();
        let mut tasks_todo = Vec::new();
        for (&t, node) in &self.tasks {
            if node.waiting.is_none() {
                task_live.insert(t);
                tasks_todo.push(t);
            }
        }
        loop {
            if let Some(t) = tasks_todo.pop() {
                for &(p, _) in &self.tasks[&t].held {
                    if !pool_live[p] {
                        pool_live[p] = true;
                        pools_todo.push(p);
                    }
                }
            } else if let Some(p) = pools_todo.pop() {
                if Some(p) == stop_at {
                    break;
                }
                for w in &self.pool(p).queue {
                    if task_live.insert(w.task) {
                        tasks_todo.push(w.task);
                    }
                }
            } else {
                break;
            }
        }
        pool_live
    }

    /// Builds the report for a stuck `me`: the shortest wait-for path from `me` back to itself
    /// over stuck tasks (breadth-first). Every holder of a stuck pool is stuck, and if no stuck
    /// set existed before `me` queued, every stuck task leads back to `me`.
    fn cycle_through(&self, id: PoolId, me: TaskId, pool_live: &[bool]) -> Vec<WaitEdge> {
        let mut holders: FxHashMap<PoolId, Vec<TaskId>> = FxHashMap::default();
        for (&t, node) in &self.tasks {
            for &(p, _) in &node.held {
                if !pool_live[p] {
                    holders.entry(p).or_default().push(t);
                }
            }
        }
        for hs in holders.values_mut() {
            hs.sort_unstable();
        }
        let waits_for = |t: TaskId| -> PoolId {
            if t == me {
                id
            } else {
                self.tasks[&t].waiting.expect("a stuck task waits")
            }
        };
        let edge = |t: TaskId| {
            let p = waits_for(t);
            WaitEdge {
                task: t,
                pool: self.pool(p).name.to_string(),
                holders: holders.get(&p).cloned().unwrap_or_default(),
            }
        };
        let mut parent: FxHashMap<TaskId, TaskId> = FxHashMap::default();
        let mut frontier = VecDeque::from([me]);
        while let Some(t) = frontier.pop_front() {
            let hs = holders.get(&waits_for(t)).map(Vec::as_slice).unwrap_or(&[]);
            if hs.contains(&me) {
                let mut path = vec![t];
                let mut cur = t;
                while let Some(&prev) = parent.get(&cur) {
                    path.push(prev);
                    cur = prev;
                }
                path.reverse();
                return path.into_iter().map(edge).collect();
            }
            for &h in hs {
                if h != me && !parent.contains_key(&h) {
                    parent.insert(h, t);
                    frontier.push_back(h);
                }
            }
        }
        // No path back to `me`: the pool has no holders at all (its last unit retired), or a
        // stuck set predates this request (only if a task id was used by two threads at once).
        // Report the chain from `me` until it repeats.
        let mut chain = vec![me];
        loop {
            let t = *chain.last().expect("non-empty");
            match holders.get(&waits_for(t)).and_then(|hs| hs.first()) {
                Some(&h) if !chain.contains(&h) => chain.push(h),
                _ => return chain.into_iter().map(edge).collect(),
            }
        }
    }
}
