//! `Stream::map_par`: the same records as `map`, in the documented order, correct accounts, a
//! panic that fails the run naming the stage, early stops (a `limit` after the step, a consumer
//! stage that stops) and cancellation that stop the pool's work promptly. The thread count of
//! the run's pool is checked in `tests/map_par_threads.rs`, alone in its binary.
// A test drives the engine from outside with std's threads and atomics: the `crate::sync` rule
// (clippy.toml) is for the engine's own code.
#![allow(clippy::disallowed_types, clippy::disallowed_methods)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use millrace::{Error, Options, Pipeline};

/// Some microseconds of integer mixing: what `map_par` is for.
fn score(x: u64) -> u64 {
    (0..200u64).fold(x, |h, i| {
        (h ^ i).wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(7)
    })
}

fn opts(batch: usize, threads: usize) -> Options {
    let mut o = Options::default();
    o.batch_size = batch;
    o.par_threads = Some(threads);
    o
}

#[test]
fn same_records_in_the_same_order_as_map() {
    // Batches of 100 (many of them, the last one partial), three pool threads, operators on both
    // sides of the step.
    let n = 20_011u64;
    let p = Pipeline::with_options(opts(100, 3));
    let out = p
        .source("n", 0..n)
        .filter(|x| x % 7 != 3)
        .map_par(score)
        .map(|x| x >> 3)
        .collect();
    let report = p.run().unwrap();
    let expect: Vec<u64> = (0..n)
        .filter(|x| x % 7 != 3)
        .map(score)
        .map(|x| x >> 3)
        .collect();
    assert_eq!(out.take(), expect);
    report.check_accounting().unwrap();
}

#[test]
fn the_type_may_change_and_order_holds_after_a_hop() {
    let p = Pipeline::with_options(opts(64, 2));
    let out = p
        .source("n", 0..5_000u32)
        .new_stage()
        .map_par(|x: u32| format!("{x:05}"))
        .collect();
    p.run().unwrap();
    let expect: Vec<String> = (0..5_000u32).map(|x| format!("{x:05}")).collect();
    assert_eq!(out.take(), expect);
}

#[test]
fn in_several_instances_every_record_comes_out_once() {
    let p = Pipeline::with_options(opts(128, 2));
    let out = p
        .source("n", 0..30_000u64)
        .rebalance(2)
        .map_par(score)
        .parallelism(2)
        .collect();
    let report = p.run().unwrap();
    let mut got = out.take();
    got.sort_unstable();
    let mut expect: Vec<u64> = (0..30_000u64).map(score).collect();
    expect.sort_unstable();
    assert_eq!(got, expect);
    report.check_accounting().unwrap();
    assert_eq!(report.account("map_par").unwrap().records_in, 30_000);
}

#[test]
fn the_step_and_the_stage_count_every_record() {
    let p = Pipeline::with_options(opts(256, 2));
    p.source("n", 0..10_000u64)
        .filter(|x| x % 2 == 0)
        .map_par(score)
        .name("heavy")
        .filter(|x| x % 3 != 0)
        .for_each(|_| {})
        .name("out");
    let report = p.run().unwrap();
    report.check_accounting().unwrap();
    assert_eq!(
        p_names(&report),
        vec!["n+filter+heavy+filter-2+out".to_string()]
    );
    let heavy = report.account("heavy").unwrap();
    assert_eq!((heavy.records_in, heavy.records_out), (5_000, 5_000));
    let kept = (0..10_000u64)
        .filter(|x| x % 2 == 0)
        .map(score)
        .filter(|x| x % 3 != 0)
        .count() as u64;
    let stage = report.stage("heavy").unwrap();
    assert_eq!((stage.records_in, stage.records_out), (10_000, kept));
    assert_eq!(report.account("out").unwrap().records_in, kept);
}

fn p_names(report: &millrace::RunReport) -> Vec<String> {
    let mut names: Vec<String> = report.stages.iter().map(|s| s.stage.clone()).collect();
    names.dedup();
    names
}

#[test]
fn a_panic_in_the_function_fails_the_run_naming_the_stage() {
    let p = Pipeline::with_options(opts(64, 2));
    p.source("nums", 0u64..)
        .map_par(|x| {
            if x == 777 {
                panic!("boom at {x}");
            }
            score(x)
        })
        .name("explode")
        .for_each(|_| {});
    match p.run() {
        Err(Error::Panic { stage, message }) => {
            assert_eq!(stage, "nums+explode+for_each");
            assert_eq!(message, "boom at 777");
        }
        other => panic!("expected the panic, got {other:?}"),
    }
}

#[test]
fn a_limit_after_the_step_stops_an_endless_source() {
    let mapped = Arc::new(AtomicU64::new(0));
    let m = Arc::clone(&mapped);
    let p = Pipeline::with_options(opts(64, 2));
    let out = p
        .source("endless", 0u64..)
        .map_par(move |x| {
            m.fetch_add(1, Ordering::Relaxed);
            score(x)
        })
        .limit(100)
        .collect();
    let report = p.run().unwrap();
    assert_eq!(out.take(), (0..100u64).map(score).collect::<Vec<_>>());
    // The batch that reached the limit is the last one mapped.
    assert!(mapped.load(Ordering::Relaxed) <= 128, "{mapped:?}");
    report.check_accounting().unwrap();
}

#[test]
fn a_consumer_that_stops_stops_the_step() {
    let mapped = Arc::new(AtomicU64::new(0));
    let m = Arc::clone(&mapped);
    let p = Pipeline::with_options(opts(64, 2));
    let out = p
        .source("endless", 0u64..)
        .map_par(move |x| {
            m.fetch_add(1, Ordering::Relaxed);
            score(x)
        })
        .new_stage()
        .limit(10)
        .collect();
    p.run().unwrap();
    assert_eq!(out.take().len(), 10);
    // Bounded by what the channel between the stages holds, not by the endless input.
    assert!(mapped.load(Ordering::Relaxed) < 100_000, "{mapped:?}");
}

#[test]
fn cancel_stops_the_batch_in_the_pool_at_the_next_record() {
    // Batches of 1,024 on 2 pool threads. The 10th record tells the test to cancel; every record
    // after it waits (up to a deadline) until the cancel has been made, so at most one record
    // per pool thread is in flight at the cancel. The rest of the batch must not be mapped.
    const THREADS: u64 = 2;
    let mapped = Arc::new(AtomicU64::new(0));
    let cancelled = Arc::new(AtomicBool::new(false));
    let (tx, rx) = std::sync::mpsc::sync_channel::<()>(1);
    let p = Pipeline::with_options(opts(1024, THREADS as usize));
    let handle = p.cancel_handle();
    let (m, c) = (Arc::clone(&mapped), Arc::clone(&cancelled));
    p.source("endless", 0u64..)
        .map_par(move |x| {
            let k = m.fetch_add(1, Ordering::SeqCst) + 1;
            if k == 10 {
                let _ = tx.try_send(());
            }
            if k > 10 {
                let deadline = Instant::now() + Duration::from_secs(10);
                while !c.load(Ordering::SeqCst) && Instant::now() < deadline {
                    std::thread::yield_now();
                }
            }
            score(x)
        })
        .for_each(|_| {});
    let canceller = std::thread::spawn(move || {
        rx.recv_timeout(Duration::from_secs(30))
            .expect("ten records are mapped");
        handle.cancel();
        cancelled.store(true, Ordering::SeqCst);
    });
    let started = Instant::now();
    assert!(matches!(p.run(), Err(Error::Cancelled)));
    canceller.join().unwrap();
    assert!(started.elapsed() < Duration::from_secs(10), "the run hung");
    let n = mapped.load(Ordering::SeqCst);
    assert!(
        n <= 10 + THREADS,
        "{n} records mapped: the batch went on after the cancel"
    );
}

#[test]
fn the_pool_size_is_the_option() {
    // Each record reports the rayon pool it runs on; the run's pool has `par_threads` threads
    // (and is not rayon's global pool, whose size is the CPU count).
    let seen = Arc::new(AtomicU64::new(0));
    let s = Arc::clone(&seen);
    let p = Pipeline::with_options(opts(64, 3));
    p.source("n", 0..1_000u64)
        .map_par(move |x| {
            s.fetch_max(rayon::current_num_threads() as u64, Ordering::Relaxed);
            assert!(
                rayon::current_thread_index().is_some(),
                "not on a pool thread"
            );
            x
        })
        .for_each(|_| {});
    p.run().unwrap();
    assert_eq!(seen.load(Ordering::Relaxed), 3);
}

/// Pool threads that touched [`SLOW`], and those whose teardown of it finished.
static TOUCHED: AtomicU64 = AtomicU64::new(0);
static TORN_DOWN: AtomicU64 = AtomicU64::new(0);

/// A thread-local whose destructor (run as its pool thread exits) takes a while: a stand-in for
/// a slow teardown of a pool thread.
struct SlowTeardown;

impl SlowTeardown {
    fn new() -> Self {
        TOUCHED.fetch_add(1, Ordering::SeqCst);
        SlowTeardown
    }
}

impl Drop for SlowTeardown {
    fn drop(&mut self) {
        // Nothing ever sends: this only makes the teardown slow (300 ms).
        let (_tx, rx) = std::sync::mpsc::channel::<()>();
        let _ = rx.recv_timeout(Duration::from_millis(300));
        TORN_DOWN.fetch_add(1, Ordering::SeqCst);
    }
}

thread_local! {
    static SLOW: SlowTeardown = SlowTeardown::new();
}

/// `run` returns once the pool's threads have exited, not once they were told to: dropping a
/// rayon pool only signals its threads, so without the join a pool thread would still be
/// running (here, its thread-local destructor) after `run` returned.
#[test]
fn run_returns_only_once_every_pool_thread_has_exited() {
    let p = Pipeline::with_options(opts(16, 2));
    p.source("n", 0..2_000u64)
        .map_par(|x| {
            SLOW.with(|_| {});
            score(x)
        })
        .for_each(|_| {});
    p.run().unwrap();
    let touched = TOUCHED.load(Ordering::SeqCst);
    assert!(touched >= 1, "no pool thread ran a record");
    assert_eq!(
        TORN_DOWN.load(Ordering::SeqCst),
        touched,
        "run returned while a pool thread was still exiting"
    );
}
