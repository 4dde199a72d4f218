//! The run's rayon pool (`map_par`) is the run's own: its threads are up while the run maps, and
//! joined before `run()` returns — on success, panic, cancel and early stop. Alone in its test
//! binary, with one test that runs the scenarios one after the other, so that the process's
//! thread count is the engine's alone.
// A test drives the engine from outside with std's threads: the `crate::sync` rule
// (clippy.toml) is for the engine's own code.
#![allow(clippy::disallowed_types, clippy::disallowed_methods)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use millrace::{Error, Options, Pipeline};

const POOL: usize = 3;

/// Threads of this process (Linux).
fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Threads of this process whose name says they are a run's rayon pool's
/// (`millrace:rayon#i`, cut to 15 bytes by the kernel).
fn pool_threads() -> usize {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    dir.filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.starts_with("millrace:rayon"))
        .count()
}

/// Every thread above the baseline is gone, waiting (without sleeping) until a deadline: a
/// joined thread may still be listed for an instant (the kernel wakes the joiner before it
/// removes the task).
fn assert_no_leaked_threads(before: usize, scenario: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while (thread_count() > before || pool_threads() > 0) && Instant::now() < deadline {
        std::thread::yield_now();
    }
    assert_eq!(thread_count(), before, "{scenario}: threads leaked");
    assert_eq!(pool_threads(), 0, "{scenario}: pool threads leaked");
}

fn opts() -> Options {
    let mut o = Options::default();
    o.batch_size = 32;
    o.par_threads = Some(POOL);
    o
}

fn score(x: u64) -> u64 {
    (0..200u64).fold(x, |h, i| {
        (h ^ i).wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(7)
    })
}

#[test]
fn every_run_joins_its_pool() {
    let before = thread_count();
    assert_eq!(pool_threads(), 0);
    success_with_the_pool_up_during_the_run();
    assert_no_leaked_threads(before, "success");
    success_with_the_pool_up_during_the_run();
    assert_no_leaked_threads(before, "a second run, a pool of its own");
    panic_in_the_function();
    assert_no_leaked_threads(before, "panic");
    cancel_while_mapping();
    assert_no_leaked_threads(before, "cancel");
    limit_after_the_step();
    assert_no_leaked_threads(before, "limit");
    no_map_par_no_pool();
    assert_no_leaked_threads(before, "no map_par");
}

/// The sink sees the pool's threads while records flow: the pool is up during the run (so the
/// check after it is not vacuous).
fn success_with_the_pool_up_during_the_run() {
    let seen = Arc::new(AtomicUsize::new(0));
    let s = Arc::clone(&seen);
    let p = Pipeline::with_options(opts());
    p.source("n", 0..5_000u64)
        .map_par(score)
        .for_each(move |_| {
            s.fetch_max(pool_threads(), Ordering::Relaxed);
        });
    p.run().unwrap();
    assert_eq!(
        seen.load(Ordering::Relaxed),
        POOL,
        "the pool during the run"
    );
}

fn panic_in_the_function() {
    let p = Pipeline::with_options(opts());
    p.source("n", 0u64..)
        .map_par(|x| {
            if x == 500 {
                panic!("boom");
            }
            score(x)
        })
        .for_each(|_| {});
    let err = p.run().unwrap_err();
    assert!(matches!(err, Error::Panic { .. }), "{err}");
}

fn cancel_while_mapping() {
    let p = Pipeline::with_options(opts());
    let handle = p.cancel_handle();
    let (tx, rx) = std::sync::mpsc::sync_channel::<()>(1);
    p.source("endless", 0u64..)
        .map_par(move |x| {
            if x == 1_000 {
                let _ = tx.try_send(());
            }
            score(x)
        })
        .for_each(|_| {});
    let canceller = std::thread::spawn(move || {
        rx.recv_timeout(Duration::from_secs(30))
            .expect("records are mapped");
        handle.cancel();
    });
    assert!(matches!(p.run(), Err(Error::Cancelled)));
    canceller.join().unwrap();
}

fn limit_after_the_step() {
    let p = Pipeline::with_options(opts());
    let out = p
        .source("endless", 0u64..)
        .map_par(score)
        .limit(50)
        .collect();
    p.run().unwrap();
    assert_eq!(out.take().len(), 50);
}

fn no_map_par_no_pool() {
    let seen = Arc::new(AtomicUsize::new(0));
    let s = Arc::clone(&seen);
    let p = Pipeline::with_options(opts());
    p.source("n", 0..1_000u64).map(score).for_each(move |_| {
        s.fetch_max(pool_threads(), Ordering::Relaxed);
    });
    p.run().unwrap();
    assert_eq!(
        seen.load(Ordering::Relaxed),
        0,
        "a run without map_par starts no pool"
    );
}
