//! `millrace::Pool` next to r2d2 in one criterion group: uncontended acquire + release, two
//! threads contending for one unit, and 64 threads on 4 units (the thundering-herd case; the
//! millrace run also prints its wake-ups and deadlock checks per acquisition). Run with
//!
//! ```text
//! cargo bench --bench pool -- --warm-up-time 1 --measurement-time 3
//! ```
//!
//! Results and the ratio to r2d2 are recorded in `docs/performance.md`.
// A bench drives the engine from outside with std's threads and atomics: the `crate::sync`
// rule (clippy.toml) is for the engine's own code.
#![allow(clippy::disallowed_types, clippy::disallowed_methods)]
// `criterion_group!` generates an undocumented function.
#![allow(missing_docs)]

use std::hint::black_box;
use std::sync::Barrier;
use std::thread;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use millrace::{Pool, Registry};

/// An r2d2 manager of trivial connections, so both pools measure only their own bookkeeping.
struct Manager;

impl r2d2::ManageConnection for Manager {
    type Connection = u64;
    type Error = std::io::Error;

    fn connect(&self) -> Result<u64, std::io::Error> {
        Ok(0)
    }

    fn is_valid(&self, _conn: &mut u64) -> Result<(), std::io::Error> {
        Ok(())
    }

    fn has_broken(&self, _conn: &mut u64) -> bool {
        false
    }
}

fn r2d2_pool(size: u32, test_on_check_out: bool) -> r2d2::Pool<Manager> {
    r2d2::Pool::builder()
        .max_size(size)
        .min_idle(Some(size))
        .test_on_check_out(test_on_check_out)
        .connection_timeout(Duration::from_secs(30))
        .build(Manager)
        .expect("r2d2 pool")
}

fn millrace_pool(size: usize, registry: &Registry) -> Pool<u64> {
    let pool = Pool::builder("bench")
        .capacity(size)
        .factory(|| Ok::<_, std::io::Error>(0))
        .registry(registry)
        .build();
    // Create every resource up front, as r2d2's `min_idle` does.
    let leases: Vec<_> = (0..size).map(|_| pool.acquire().unwrap()).collect();
    drop(leases);
    pool
}

/// Two threads each doing `iters` acquire + release pairs on `op`; returns the wall time.
fn contended(iters: u64, op: impl Fn() + Sync) -> Duration {
    many_threads(2, iters, op)
}

/// `threads` threads each doing `iters` acquire + release pairs on `op`; returns the wall time
/// from the moment all of them are ready until the last one is done.
fn many_threads(threads: usize, iters: u64, op: impl Fn() + Sync) -> Duration {
    let barrier = Barrier::new(threads + 1);
    thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                barrier.wait();
                for _ in 0..iters {
                    op();
                }
            });
        }
        barrier.wait();
        let start = Instant::now();
        // Leaving the scope joins both threads.
        start
    })
    .elapsed()
}

fn bench_pools(c: &mut Criterion) {
    let mut group = c.benchmark_group("pool");

    let registry = Registry::new();
    let ours = millrace_pool(4, &registry);
    group.bench_function("uncontended/millrace", |b| {
        b.iter(|| {
            let lease = ours.acquire().unwrap();
            black_box(*lease);
        })
    });
    let theirs = r2d2_pool(4, true);
    group.bench_function("uncontended/r2d2", |b| {
        b.iter(|| {
            let conn = theirs.get().unwrap();
            black_box(*conn);
        })
    });
    let theirs_unchecked = r2d2_pool(4, false);
    group.bench_function("uncontended/r2d2-no-test-on-check-out", |b| {
        b.iter(|| {
            let conn = theirs_unchecked.get().unwrap();
            black_box(*conn);
        })
    });

    // Two threads, one unit: every acquire may have to wait for the other thread's release.
    group.throughput(Throughput::Elements(2));
    let ours = millrace_pool(1, &registry);
    group.bench_function("contended-2-threads-1-unit/millrace", |b| {
        b.iter_custom(|iters| {
            contended(iters, || {
                let lease = ours.acquire().unwrap();
                black_box(*lease);
            })
        })
    });
    let theirs = r2d2_pool(1, true);
    group.bench_function("contended-2-threads-1-unit/r2d2", |b| {
        b.iter_custom(|iters| {
            contended(iters, || {
                let conn = theirs.get().unwrap();
                black_box(*conn);
            })
        })
    });

    // The herd: 64 threads on 4 units. Each iteration is one acquire + release per thread, with
    // the lease held across a yield so that most acquires queue.
    const HERD: usize = 64;
    group.throughput(Throughput::Elements(HERD as u64));
    let ours = millrace_pool(4, &registry);
    group.bench_function("herd-64-threads-4-units/millrace", |b| {
        b.iter_custom(|iters| {
            many_threads(HERD, iters, || {
                let lease = ours.acquire().unwrap();
                thread::yield_now();
                black_box(*lease);
            })
        })
    });
    let m = ours.metrics();
    let per = |n: u64| n as f64 / m.acquires.max(1) as f64;
    eprintln!(
        "herd-64-threads-4-units/millrace: {} acquisitions, {:.3} wake-ups and {:.3} deadlock \
         checks per acquisition, {} waiters woken per {} checks",
        m.acquires,
        per(m.wakeups),
        per(m.deadlock_checks),
        m.wakeups,
        m.deadlock_checks
    );
    let theirs = r2d2_pool(4, true);
    group.bench_function("herd-64-threads-4-units/r2d2", |b| {
        b.iter_custom(|iters| {
            many_threads(HERD, iters, || {
                let conn = theirs.get().unwrap();
                thread::yield_now();
                black_box(*conn);
            })
        })
    });
    group.finish();
}

criterion_group!(benches, bench_pools);
criterion_main!(benches);
