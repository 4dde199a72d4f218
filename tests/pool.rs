//! Ordinary tests of `millrace::pool`: the seed scenario, timeouts (which loom cannot model),
//! factory errors, validation, discard, FIFO order, and a stress test with a watchdog.
//! Under `cfg(loom)` only `tests/loom_pool.rs` runs.
// A test drives the engine from outside with std's threads and atomics: the `crate::sync`
// rule (clippy.toml) is for the engine's own code.
#![allow(clippy::disallowed_types, clippy::disallowed_methods)]
#![cfg(not(loom))]

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Barrier, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use millrace::{Pool, PoolError, PoolMetrics, Registry, TaskId, WaitEdge};

/// A counter pool in its own registry whose factory numbers the resources it creates.
fn counting_pool(
    name: &str,
    capacity: usize,
    registry: &Registry,
) -> (Pool<usize>, Arc<AtomicUsize>) {
    let created = Arc::new(AtomicUsize::new(0));
    let c = created.clone();
    let pool = Pool::builder(name)
        .capacity(capacity)
        .factory(move || Ok::<_, std::io::Error>(c.fetch_add(1, Ordering::SeqCst)))
        .registry(registry)
        .build();
    (pool, created)
}

/// Spins (yielding, not sleeping) until `cond` holds; fails after five seconds.
fn spin_until(what: &str, cond: impl Fn() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "gave up waiting for {what}"
        );
        thread::yield_now();
    }
}

/// Seed bug 2: ten tasks each hold one of ten leases and each asks for a second one. The naive
/// pool blocks all ten until the 60 s timeout; this one refuses the request that closes the
/// cycle at once and everyone finishes.
#[test]
fn seed_nested_acquire_is_refused_not_timed_out() {
    let registry = Registry::new();
    let (pool, _) = counting_pool("db", 10, &registry);
    let barrier = Arc::new(Barrier::new(10));
    let start = Instant::now();
    let workers: Vec<_> = (0..10)
        .map(|_| {
            let (pool, barrier) = (pool.clone(), barrier.clone());
            thread::spawn(move || {
                let _conn = pool.acquire().unwrap();
                barrier.wait();
                // The seed's `run_subtask`: a nested acquisition with the 60 s timeout.
                pool.acquire_timeout(Duration::from_secs(60)).err()
            })
        })
        .collect();
    let errors: Vec<PoolError> = workers
        .into_iter()
        .filter_map(|w| w.join().unwrap())
        .collect();
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "took {:?}",
        start.elapsed()
    );
    assert!(!errors.is_empty(), "no deadlock reported");
    for e in &errors {
        let PoolError::WouldDeadlock { pool: name, cycle } = e else {
            panic!("unexpected error: {e}");
        };
        assert_eq!(name, "db");
        // All ten units are held by waiting tasks, the requester among them.
        assert_eq!(cycle.len(), 1, "{e}");
        assert_eq!(cycle[0].pool, "db");
        assert_eq!(cycle[0].holders.len(), 10, "{e}");
        assert!(cycle[0].holders.contains(&cycle[0].task), "{e}");
        let msg = e.to_string();
        assert!(
            msg.starts_with("acquiring 'db' would deadlock: task "),
            "{msg}"
        );
        assert!(msg.contains(" waits for 'db' held by tasks "), "{msg}");
    }
    let m = pool.metrics();
    assert_eq!(m.deadlocks, errors.len() as u64);
    assert_eq!((m.capacity, m.in_use, m.waiters, m.timeouts), (10, 0, 0, 0));
    assert!(m.idle <= 10);
}

/// The correct alternative to the seed's nested acquisition: the sub-task borrows the lease.
#[test]
fn seed_with_subtask_borrowing_never_deadlocks() {
    let registry = Registry::new();
    let (pool, created) = counting_pool("db", 10, &registry);
    let barrier = Arc::new(Barrier::new(10));
    let workers: Vec<_> = (0..10)
        .map(|_| {
            let (pool, barrier) = (pool.clone(), barrier.clone());
            thread::spawn(move || {
                let mut conn = pool.acquire().unwrap();
                barrier.wait();
                let me = TaskId::current();
                conn.subtask(|c| {
                    assert_eq!(TaskId::current(), me);
                    *c
                })
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    let m = pool.metrics();
    assert_eq!((m.deadlocks, m.in_use, m.acquires), (0, 0, 10));
    assert_eq!(created.load(Ordering::SeqCst), 10);
}

#[test]
fn enough_capacity_never_reports_a_deadlock() {
    let registry = Registry::new();
    let (pool, _) = counting_pool("wide", 20, &registry);
    let barrier = Arc::new(Barrier::new(10));
    let workers: Vec<_> = (0..10)
        .map(|_| {
            let (pool, barrier) = (pool.clone(), barrier.clone());
            thread::spawn(move || {
                let _a = pool.acquire().unwrap();
                barrier.wait();
                let _b = pool.acquire().unwrap();
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    assert_eq!(pool.metrics().deadlocks, 0);
    assert_eq!(pool.metrics().in_use, 0);
}

#[test]
fn same_task_asking_twice_for_the_only_unit_is_refused() {
    let registry = Registry::new();
    let (pool, _) = counting_pool("solo", 1, &registry);
    let lease = pool.acquire().unwrap();
    let err = pool.acquire().unwrap_err();
    let me = TaskId::current();
    assert_eq!(
        err.to_string(),
        format!("acquiring 'solo' would deadlock: {me} waits for 'solo' held by {me}")
    );
    assert!(err.is_deadlock());
    assert_eq!(err.pool(), "solo");
    drop(lease);
    assert!(pool.acquire().is_ok());
}

/// Two pools taken in opposite order: the second request that closes the cycle is refused and
/// names both pools and both tasks; the first waiter then gets its lease.
#[test]
fn opposite_order_over_two_pools_names_the_cycle() {
    let registry = Registry::new();
    let (a, _) = counting_pool("a", 1, &registry);
    let (b, _) = counting_pool("b", 1, &registry);
    let lease_b = b.acquire().unwrap();
    let (tx, rx) = mpsc::channel();
    let first = {
        let (a, b) = (a.clone(), b.clone());
        thread::spawn(move || {
            let _a = a.acquire().unwrap();
            tx.send(TaskId::current()).unwrap();
            let _b = b.acquire().unwrap(); // waits until the other task gives up `b`
        })
    };
    let t1 = rx.recv().unwrap();
    spin_until("the first task to wait for b", || b.metrics().waiters == 1);
    let err = a.acquire().unwrap_err();
    let t2 = TaskId::current();
    let PoolError::WouldDeadlock { pool, cycle } = &err else {
        panic!("unexpected error: {err}");
    };
    assert_eq!(pool, "a");
    assert_eq!(cycle.len(), 2);
    assert_eq!(
        (cycle[0].task, cycle[0].pool.as_str(), &cycle[0].holders[..]),
        (t2, "a", &[t1][..])
    );
    assert_eq!(
        (cycle[1].task, cycle[1].pool.as_str(), &cycle[1].holders[..]),
        (t1, "b", &[t2][..])
    );
    assert_eq!(
        err.to_string(),
        format!("acquiring 'a' would deadlock: {t2} waits for 'a' held by {t1}; {t1} waits for 'b' held by {t2}")
    );
    drop(lease_b);
    first.join().unwrap();
    assert_eq!(a.metrics().in_use + b.metrics().in_use, 0);
    assert_eq!(a.metrics().deadlocks, 1);
}

/// A holder blocked on something other than a pool counts as able to run: no deadlock, and the
/// timeout is the second line of defence.
#[test]
fn timeout_when_holder_is_busy_elsewhere() {
    let registry = Registry::new();
    let (pool, _) = counting_pool("slow", 1, &registry);
    let (hold_tx, hold_rx) = mpsc::channel::<()>();
    let (ready_tx, ready_rx) = mpsc::channel();
    let holder = {
        let pool = pool.clone();
        thread::spawn(move || {
            let _lease = pool.acquire().unwrap();
            ready_tx.send(()).unwrap();
            hold_rx.recv().unwrap();
        })
    };
    ready_rx.recv().unwrap();
    let start = Instant::now();
    let err = pool.acquire_timeout(Duration::from_millis(50)).unwrap_err();
    assert!(start.elapsed() >= Duration::from_millis(50));
    let PoolError::Timeout { pool: name, waited } = &err else {
        panic!("unexpected error: {err}");
    };
    assert_eq!(name, "slow");
    assert!(*waited >= Duration::from_millis(50));
    assert!(err.to_string().starts_with("timed out after "), "{err}");
    assert!(
        err.to_string().ends_with(" waiting for a lease of 'slow'"),
        "{err}"
    );
    let m = pool.metrics();
    assert_eq!((m.timeouts, m.waiters, m.deadlocks), (1, 0, 0));
    assert!(m.total_wait >= Duration::from_millis(50));
    assert!(pool.try_acquire().unwrap().is_none());

    hold_tx.send(()).unwrap();
    holder.join().unwrap();
    // The timed-out request left the queue: the unit is free for the next caller.
    assert!(pool.try_acquire().unwrap().is_some());
}

#[test]
fn timed_acquire_succeeds_when_released_in_time() {
    let registry = Registry::new();
    let (pool, _) = counting_pool("quick", 1, &registry);
    let lease = pool.acquire().unwrap();
    let waiter = {
        let pool = pool.clone();
        thread::spawn(move || *pool.acquire_timeout(Duration::from_secs(10)).unwrap())
    };
    spin_until("the waiter to queue", || pool.metrics().waiters == 1);
    drop(lease);
    assert_eq!(waiter.join().unwrap(), 0);
    let m = pool.metrics();
    assert_eq!((m.timeouts, m.acquires, m.in_use), (0, 2, 0));
}

#[test]
fn zero_timeout_with_a_busy_pool_times_out() {
    let registry = Registry::new();
    let (pool, _) = counting_pool("zero", 1, &registry);
    let holder = {
        let pool = pool.clone();
        let (tx, rx) = mpsc::channel();
        let h = thread::spawn(move || {
            let lease = pool.acquire().unwrap();
            tx.send(()).unwrap();
            lease
        });
        rx.recv().unwrap();
        h.join().unwrap() // the lease outlives its thread; its task is not waiting
    };
    let err = pool.acquire_timeout(Duration::ZERO).unwrap_err();
    assert!(matches!(err, PoolError::Timeout { .. }), "{err}");
    drop(holder);
}

#[test]
fn factory_error_is_returned_and_the_unit_comes_back() {
    let registry = Registry::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let pool = Pool::builder("flaky")
        .capacity(1)
        .factory(move || match c.fetch_add(1, Ordering::SeqCst) {
            0 => Err(std::io::Error::other("connection refused")),
            n => Ok(n),
        })
        .registry(&registry)
        .build();
    let err = pool.acquire().unwrap_err();
    assert_eq!(
        err.to_string(),
        "the factory of 'flaky' failed to create a resource"
    );
    let source = std::error::Error::source(&err).expect("factory error kept as source");
    assert_eq!(source.to_string(), "connection refused");
    let m = pool.metrics();
    assert_eq!((m.factory_errors, m.in_use, m.acquires), (1, 0, 1));
    assert_eq!(*pool.acquire().unwrap(), 1);
}

/// A waiter handed a unit whose resource must be created gets the factory's error itself, and
/// the unit then goes to the next waiter.
#[test]
fn factory_error_after_hand_off_passes_the_unit_on() {
    let registry = Registry::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let pool = Pool::builder("flaky")
        .capacity(1)
        .factory(move || match c.fetch_add(1, Ordering::SeqCst) {
            1 => Err("second call fails"),
            n => Ok(n),
        })
        .registry(&registry)
        .build();
    let lease = pool.acquire().unwrap();
    let first = {
        let pool = pool.clone();
        thread::spawn(move || pool.acquire().map(|l| *l).map_err(|e| e.to_string()))
    };
    spin_until("the first waiter", || pool.metrics().waiters == 1);
    let second = {
        let pool = pool.clone();
        thread::spawn(move || pool.acquire().map(|l| *l).map_err(|e| e.to_string()))
    };
    spin_until("the second waiter", || pool.metrics().waiters == 2);
    lease.discard(); // the first waiter must create a new resource: that call fails
    assert_eq!(
        first.join().unwrap(),
        Err("the factory of 'flaky' failed to create a resource".to_string())
    );
    assert_eq!(second.join().unwrap(), Ok(2));
    let m = pool.metrics();
    assert_eq!((m.factory_errors, m.in_use, m.capacity), (1, 0, 1));
}

#[test]
fn invalid_idle_resource_is_replaced_by_the_factory() {
    let registry = Registry::new();
    let (pool, created) = {
        let created = Arc::new(AtomicUsize::new(0));
        let c = created.clone();
        let pool = Pool::builder("checked")
            .capacity(1)
            .factory(move || Ok::<_, std::io::Error>(c.fetch_add(1, Ordering::SeqCst) as i64))
            .validate(|r: &mut i64| *r >= 0)
            .registry(&registry)
            .build();
        (pool, created)
    };
    {
        let mut lease = pool.acquire().unwrap();
        assert_eq!(*lease, 0);
        *lease = -1; // broken while in use
    }
    assert_eq!(*pool.acquire().unwrap(), 1);
    assert_eq!(created.load(Ordering::SeqCst), 2);
    assert_eq!(pool.metrics().invalid, 1);
}

#[test]
fn invalid_resource_without_factory_retires_the_unit() {
    let registry = Registry::new();
    let pool = Pool::builder("fixed")
        .resources(vec![-1i32, 5])
        .validate(|r: &mut i32| *r >= 0)
        .registry(&registry)
        .build();
    // Idle resources are taken last-in first-out: 5, then -1.
    let good = pool.acquire().unwrap();
    assert_eq!(*good, 5);
    let err = pool.acquire().unwrap_err();
    assert_eq!(
        err.to_string(),
        "an idle resource of 'fixed' failed validation and the pool has no factory to replace it"
    );
    let m = pool.metrics();
    assert_eq!((m.capacity, m.in_use, m.invalid), (1, 1, 1));
    drop(good);
    assert_eq!(*pool.acquire().unwrap(), 5);
}

#[test]
fn discard_lets_the_factory_replace_the_resource() {
    let registry = Registry::new();
    let (pool, created) = counting_pool("conns", 2, &registry);
    let a = pool.acquire().unwrap();
    assert_eq!(*a, 0);
    a.discard();
    let m = pool.metrics();
    assert_eq!((m.in_use, m.idle, m.capacity), (0, 0, 2));
    assert_eq!(*pool.acquire().unwrap(), 1);
    assert_eq!(created.load(Ordering::SeqCst), 2);
}

#[test]
fn discard_without_factory_shrinks_the_pool() {
    let registry = Registry::new();
    let pool = Pool::builder("fixed")
        .resources(vec!['x', 'y'])
        .registry(&registry)
        .build();
    pool.acquire().unwrap().discard();
    let m = pool.metrics();
    assert_eq!((m.capacity, m.in_use, m.idle), (1, 0, 1));
    let last = pool.acquire().unwrap();
    last.discard();
    assert_eq!(pool.metrics().capacity, 0);
    // Nothing can ever be granted again, and nobody holds a unit: waiting would never end.
    let err = pool.acquire().unwrap_err();
    let me = TaskId::current();
    assert_eq!(
        err.to_string(),
        format!("acquiring 'fixed' would deadlock: {me} waits for 'fixed' held by no one")
    );
}

/// A waiter woken without being served re-checks: when the last unit retires under it, it is
/// refused instead of sleeping for ever.
#[test]
fn queued_waiter_is_refused_when_the_last_unit_retires() {
    let registry = Registry::new();
    let pool = Pool::builder("fixed")
        .resources(vec![0u8])
        .registry(&registry)
        .build();
    let lease = pool.acquire().unwrap();
    let waiter = {
        let pool = pool.clone();
        thread::spawn(move || pool.acquire().map(|_| ()).unwrap_err().to_string())
    };
    spin_until("the waiter to queue", || pool.metrics().waiters == 1);
    lease.discard();
    let msg = waiter.join().unwrap();
    assert!(
        msg.starts_with("acquiring 'fixed' would deadlock: task "),
        "{msg}"
    );
    assert!(msg.ends_with(" waits for 'fixed' held by no one"), "{msg}");
    let m = pool.metrics();
    assert_eq!((m.capacity, m.waiters, m.deadlocks), (0, 0, 1));
}

#[test]
fn release_serves_the_oldest_waiter_first() {
    let registry = Registry::new();
    let (pool, _) = counting_pool("fifo", 1, &registry);
    let order = Arc::new(Mutex::new(Vec::new()));
    let lease = pool.acquire().unwrap();
    let mut waiters = Vec::new();
    for i in 0..5 {
        let (p, order) = (pool.clone(), order.clone());
        waiters.push(thread::spawn(move || {
            let _lease = p.acquire().unwrap();
            order.lock().unwrap().push(i);
        }));
        spin_until("the waiter to queue", || pool.metrics().waiters == i + 1);
    }
    // A newcomer may not barge ahead of the queue, even right after a release.
    assert!(pool.try_acquire().unwrap().is_none());
    drop(lease);
    for w in waiters {
        w.join().unwrap();
    }
    assert_eq!(*order.lock().unwrap(), vec![0, 1, 2, 3, 4]);
}

/// No thundering herd: with 64 waiters on 4 units, one release wakes exactly the waiter it
/// serves and runs no deadlock check; over the whole run each waiter wakes once and the check
/// runs once per request that had to wait. (The old pool woke all 64 on every hand-off and each
/// re-ran the check: 127 checks and more after the first release alone.)
#[test]
fn a_release_wakes_only_the_waiter_it_serves() {
    const WAITERS: usize = 64;
    let registry = Registry::new();
    let (pool, _) = counting_pool("herd", 4, &registry);
    let held: Vec<_> = (0..4).map(|_| pool.acquire().unwrap()).collect();
    let (got_tx, got_rx) = mpsc::channel();
    let mut releases = Vec::new();
    let waiters: Vec<_> = (0..WAITERS)
        .map(|i| {
            let got_tx = got_tx.clone();
            let (release_tx, release_rx) = mpsc::channel::<()>();
            releases.push(release_tx);
            let p = pool.clone();
            let t = thread::spawn(move || {
                let lease = p.acquire().unwrap();
                got_tx.send(i).unwrap();
                release_rx.recv().unwrap();
                drop(lease);
            });
            // One at a time, so that the queue order is the spawn order. Queued under the
            // registry lock and asleep in the same critical section: once the metrics (which
            // take that lock) show the waiter, it is asleep.
            spin_until("the waiter to queue", || pool.metrics().waiters == i + 1);
            t
        })
        .collect();
    let before = pool.metrics();
    assert_eq!(
        (before.wakeups, before.deadlock_checks),
        (0, WAITERS as u64)
    );

    let mut held = held.into_iter();
    drop(held.next());
    let first = got_rx.recv().unwrap();
    let after = pool.metrics();
    assert_eq!(after.waiters, WAITERS - 1);
    assert_eq!(
        after.wakeups - before.wakeups,
        1,
        "one release woke more than the waiter it served"
    );
    assert_eq!(
        after.deadlock_checks, before.deadlock_checks,
        "a release made waiters re-run the deadlock check"
    );
    assert_eq!(first, 0, "FIFO: the oldest waiter is served");

    // Everyone through: each waiter releases right after its grant.
    for r in &releases {
        r.send(()).unwrap();
    }
    drop(held);
    for w in waiters {
        w.join().unwrap();
    }
    let end = pool.metrics();
    assert_eq!((end.in_use, end.waiters), (0, 0));
    assert_eq!(end.acquires, 4 + WAITERS as u64);
    assert_eq!(
        end.wakeups, WAITERS as u64,
        "each waiter wakes exactly once"
    );
    assert_eq!(
        end.deadlock_checks, WAITERS as u64,
        "one deadlock check per request that waited"
    );
}

/// A retirement re-checks only the waiters it can have made hopeless: here the pool shrinks
/// from two units to one while the other unit's holder runs, so the waiter's wait can still end
/// and it is not woken; the later release serves it with its only wake-up.
#[test]
fn a_retirement_that_leaves_a_way_out_wakes_nobody() {
    let registry = Registry::new();
    let pool = Pool::builder("fixed")
        .resources(vec![0u8, 1])
        .registry(&registry)
        .build();
    let (a, b) = (pool.acquire().unwrap(), pool.acquire().unwrap());
    let waiter = {
        let pool = pool.clone();
        thread::spawn(move || pool.acquire().map(|l| *l))
    };
    spin_until("the waiter to queue", || pool.metrics().waiters == 1);
    a.discard();
    let m = pool.metrics();
    assert_eq!((m.capacity, m.waiters), (1, 1));
    assert_eq!(
        m.wakeups, 0,
        "the waiter was woken although its wait can still end"
    );
    // One check at enqueue, one pass after the retirement.
    assert_eq!(m.deadlock_checks, 2);
    let kept = *b;
    drop(b);
    assert_eq!(waiter.join().unwrap().unwrap(), kept);
    let m = pool.metrics();
    assert_eq!((m.wakeups, m.deadlock_checks, m.deadlocks), (1, 2, 0));
}

/// A retirement that makes waiters of *another* pool hopeless reaches them too: task A holds
/// the only unit of `x` and waits for `fixed`; task B waits for `x`. When `fixed`'s last unit
/// retires, A is refused, and B is served `x` once A gives it back.
#[test]
fn a_retirement_reaches_the_waiters_it_makes_stuck_through_other_pools() {
    let registry = Registry::new();
    let (x, _) = counting_pool("x", 1, &registry);
    let fixed = Pool::builder("fixed")
        .resources(vec![0u8])
        .registry(&registry)
        .build();
    let last = fixed.acquire().unwrap();
    let (a_holds_tx, a_holds_rx) = mpsc::channel();
    let a = {
        let (x, fixed) = (x.clone(), fixed.clone());
        thread::spawn(move || {
            let _x = x.acquire().unwrap();
            a_holds_tx.send(()).unwrap();
            fixed.acquire().map(|_| ()).unwrap_err()
        })
    };
    a_holds_rx.recv().unwrap();
    spin_until("A to queue", || fixed.metrics().waiters == 1);
    let b = {
        let x = x.clone();
        thread::spawn(move || x.acquire().map(|_| ()))
    };
    spin_until("B to queue", || x.metrics().waiters == 1);
    last.discard();
    let err = a.join().unwrap();
    assert!(err.is_deadlock(), "{err}");
    // B either re-checked after A's refusal (and kept waiting) or before it (and was refused:
    // at that moment A was stuck); either way it does not sleep for ever.
    match b.join().unwrap() {
        Ok(()) => assert_eq!(x.metrics().deadlocks, 0),
        Err(e) => assert!(e.is_deadlock(), "{e}"),
    }
    assert_eq!(fixed.metrics().deadlocks, 1);
}

#[test]
fn lease_dropped_while_panicking_comes_back() {
    let registry = Registry::new();
    let (pool, _) = counting_pool("panicky", 1, &registry);
    let p = pool.clone();
    let result = thread::spawn(move || {
        let _lease = p.acquire().unwrap();
        panic!("stage failed");
    })
    .join();
    assert!(result.is_err());
    let m = pool.metrics();
    assert_eq!((m.in_use, m.idle), (0, 1));
    assert!(pool.try_acquire().unwrap().is_some());
}

#[test]
fn panicking_factory_gives_the_unit_back() {
    let registry = Registry::new();
    let pool: Pool<u8> = Pool::builder("boom")
        .capacity(1)
        .factory(|| -> Result<u8, std::io::Error> { panic!("factory bug") })
        .registry(&registry)
        .build();
    let p = pool.clone();
    assert!(thread::spawn(move || p.acquire().map(|_| ()))
        .join()
        .is_err());
    assert_eq!(pool.metrics().in_use, 0);
}

#[test]
fn explicit_task_ids_follow_work_across_threads() {
    let registry = Registry::new();
    let (pool, _) = counting_pool("jobs", 1, &registry);
    let job = TaskId::new();
    let lease = pool.acquire_as(job).unwrap();
    assert_eq!(lease.task(), job);
    assert_eq!(lease.pool_name(), "jobs");
    assert_eq!(registry.leases_held_by(job), vec![("jobs".to_string(), 1)]);
    // The job continues on another thread: asking for a second unit is its own deadlock.
    let p = pool.clone();
    let err = thread::spawn(move || {
        let _scope = job.enter();
        p.acquire().unwrap_err()
    })
    .join()
    .unwrap();
    assert!(err.is_deadlock(), "{err}");
    // The lease itself can move and be dropped on yet another thread.
    thread::spawn(move || drop(lease)).join().unwrap();
    assert!(registry.leases_held_by(job).is_empty());
    assert_eq!(pool.metrics().in_use, 0);
}

#[test]
fn pools_in_different_registries_do_not_see_each_other() {
    let (r1, r2) = (Registry::new(), Registry::new());
    let (a, _) = counting_pool("a", 1, &r1);
    let (b, _) = counting_pool("b", 1, &r2);
    let _a = a.acquire().unwrap();
    let _b = b.acquire().unwrap();
    assert_eq!(
        r1.leases_held_by(TaskId::current()),
        vec![("a".to_string(), 1)]
    );
    assert_eq!(
        r2.leases_held_by(TaskId::current()),
        vec![("b".to_string(), 1)]
    );
}

#[test]
fn global_registry_is_the_default() {
    let pool = Pool::new("global-default", 1, || Ok::<_, std::io::Error>(7u8));
    assert!(std::ptr::eq(pool.registry(), pool.registry()));
    let lease = pool.acquire().unwrap();
    assert_eq!(
        Registry::global().leases_held_by(TaskId::current()),
        vec![("global-default".to_string(), 1)]
    );
    drop(lease);
}

#[test]
fn handles_leases_and_errors_cross_threads() {
    fn send_sync<T: Send + Sync + 'static>() {}
    send_sync::<Pool<String>>();
    send_sync::<millrace::Lease<String>>();
    send_sync::<PoolError>();
    send_sync::<Registry>();
}

#[test]
fn metrics_render_as_a_table_row() {
    let registry = Registry::new();
    let (pool, _) = counting_pool("db", 4, &registry);
    let _l = pool.acquire().unwrap();
    let row = pool.metrics().to_string();
    assert_eq!(
        row.len(),
        PoolMetrics::HEADER.len(),
        "\n{}\n{row}",
        PoolMetrics::HEADER
    );
    let cols: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cols[..6], ["db", "4", "1", "0", "0", "1"]);
    assert_eq!(cols[7..], ["0", "0"]);
}

// ---------------------------------------------------------------------------------------------
// Stress: random nested acquisitions over three pools, with a watchdog.

/// What the test itself believes each task holds and waits for.
#[derive(Default)]
struct Book {
    waiting: HashMap<TaskId, usize>,
    holding: HashMap<TaskId, Vec<usize>>,
}

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Checks a reported cycle against the book. While the reporter has not released anything, the
/// tasks on a real cycle cannot move, so the book is exact for them.
fn check_cycle(
    book: &Book,
    me: TaskId,
    asked: usize,
    cycle: &[WaitEdge],
    names: &[&str],
    caps: &[usize],
) {
    assert_eq!(cycle[0].task, me);
    assert_eq!(cycle[0].pool, names[asked]);
    for (i, edge) in cycle.iter().enumerate() {
        let pool = names
            .iter()
            .position(|n| *n == edge.pool)
            .expect("known pool");
        if edge.task != me {
            assert_eq!(
                book.waiting.get(&edge.task),
                Some(&pool),
                "{} is not waiting for {}",
                edge.task,
                edge.pool
            );
        }
        let mut holders: Vec<TaskId> = book
            .holding
            .iter()
            .filter(|(_, held)| held.contains(&pool))
            .map(|(t, _)| *t)
            .collect();
        holders.sort();
        assert_eq!(edge.holders, holders, "holders of {}", edge.pool);
        let units: usize = book
            .holding
            .values()
            .map(|h| h.iter().filter(|&&p| p == pool).count())
            .sum();
        assert_eq!(units, caps[pool], "{} is not full", edge.pool);
        for h in &holders {
            assert!(
                *h == me || book.waiting.contains_key(h),
                "holder {h} of {} is running",
                edge.pool
            );
        }
        let next = &cycle[(i + 1) % cycle.len()];
        assert!(
            edge.holders.contains(&next.task),
            "cycle broken after {edge}"
        );
    }
}

#[test]
fn stress_random_nested_acquisitions() {
    const THREADS: usize = 8;
    const ITERATIONS: usize = 2_000;
    let names = ["p0", "p1", "p2"];
    let caps = [1, 2, 3];
    let registry = Registry::new();
    let pools: Vec<Pool<usize>> = names
        .iter()
        .zip(caps)
        .map(|(n, c)| counting_pool(n, c, &registry).0)
        .collect();
    let book = Arc::new(Mutex::new(Book::default()));
    let (done_tx, done_rx) = mpsc::channel();
    for seed in 0..THREADS {
        let (pools, book, done_tx) = (pools.clone(), book.clone(), done_tx.clone());
        thread::spawn(move || {
            let body = std::panic::AssertUnwindSafe(|| {
                let me = TaskId::current();
                let mut rng = XorShift(
                    0x9E37_79B9_7F4A_7C15 ^ (seed as u64 + 1).wrapping_mul(0x2545_F491_4F6C_DD1D),
                );
                let mut deadlocks = 0u64;
                for _ in 0..ITERATIONS {
                    let depth = 1 + rng.below(3);
                    let mut held = Vec::new();
                    for _ in 0..depth {
                        let p = rng.below(3);
                        book.lock().unwrap().waiting.insert(me, p);
                        let got = pools[p].acquire();
                        let mut b = book.lock().unwrap();
                        match got {
                            Ok(lease) => {
                                b.waiting.remove(&me);
                                b.holding.entry(me).or_default().push(p);
                                held.push(lease);
                            }
                            Err(PoolError::WouldDeadlock { cycle, .. }) => {
                                check_cycle(&b, me, p, &cycle, &names, &caps);
                                b.waiting.remove(&me);
                                deadlocks += 1;
                                break;
                            }
                            Err(e) => panic!("unexpected error: {e}"),
                        }
                    }
                    if rng.below(2) == 0 {
                        thread::yield_now();
                    }
                    // Forget in the book before the leases really go.
                    book.lock().unwrap().holding.remove(&me);
                    drop(held);
                }
                deadlocks
            });
            let result = std::panic::catch_unwind(body).map_err(|e| {
                e.downcast_ref::<String>()
                    .cloned()
                    .unwrap_or_else(|| "worker panicked".into())
            });
            done_tx.send(result).unwrap();
        });
    }
    drop(done_tx);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut reported = 0;
    for _ in 0..THREADS {
        let left = deadline.saturating_duration_since(Instant::now());
        match done_rx.recv_timeout(left) {
            Ok(Ok(n)) => reported += n,
            Ok(Err(panic)) => panic!("stress worker failed: {panic}"),
            Err(_) => panic!(
                "watchdog: stress test hung; pools: {:?}",
                pools.iter().map(Pool::metrics).collect::<Vec<_>>()
            ),
        }
    }
    let counted: u64 = pools.iter().map(|p| p.metrics().deadlocks).sum();
    assert_eq!(reported, counted);
    for p in &pools {
        let m = p.metrics();
        assert_eq!((m.in_use, m.waiters), (0, 0), "leak in {m}");
        assert!(m.idle <= m.capacity);
    }
    eprintln!("stress: {reported} deadlocks refused");
    assert!(
        reported > 0,
        "the stress test should provoke some deadlocks"
    );
}
