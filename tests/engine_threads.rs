//! The engine joins every thread it starts, on failure, panic and cancel too. Alone in its test
//! binary, with a single test that runs the scenarios one after the other, so that the thread
//! count of the process is the engine's alone (in `tests/engine.rs` other tests ran in parallel
//! and could hide a leak or fake one).
// A test drives the engine from outside with std's threads: the `crate::sync` rule
// (clippy.toml) is for the engine's own code.
#![allow(clippy::disallowed_types, clippy::disallowed_methods)]

use std::time::{Duration, Instant};

use millrace::{Error, Options, Pipeline};

/// Threads of this process (Linux), to check that no worker outlives `run()`.
fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|d| d.count())
        .unwrap_or(0)
}

/// No other test runs in this binary, so every thread above the baseline is the engine's. A
/// thread that `run()` joined may still be listed for an instant (the kernel wakes the joiner
/// before it removes the task), hence the short retry until a deadline.
fn assert_no_leaked_threads(before: usize) {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut now = thread_count();
    while now > before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
        now = thread_count();
    }
    assert_eq!(now, before, "threads leaked");
}

fn small_batches() -> Options {
    let mut o = Options::default();
    o.batch_size = 16;
    o.channel_capacity = 2;
    o
}

#[test]
fn every_run_joins_its_threads() {
    operator_error_names_the_stage_and_joins_threads();
    operator_panic_names_the_stage_and_joins_threads();
    cancel_from_another_thread_stops_an_endless_run();
}

fn operator_error_names_the_stage_and_joins_threads() {
    let before = thread_count();
    let p = Pipeline::with_options(small_batches());
    p.source("nums", 0u64..)
        .new_stage()
        .try_map(|x| {
            if x == 500 {
                Err(format!("bad record {x}"))
            } else {
                Ok(x)
            }
        })
        .name("parse")
        .rebalance(2)
        .map(|x| x)
        .for_each(|_| {});
    let err = p.run().unwrap_err();
    assert_eq!(err.stage(), Some("parse"));
    assert_eq!(err.to_string(), "stage `parse` failed: bad record 500");
    assert_no_leaked_threads(before);
}

fn operator_panic_names_the_stage_and_joins_threads() {
    let before = thread_count();
    let p = Pipeline::with_options(small_batches());
    p.source("nums", 0u64..)
        .rebalance(2)
        .map(|x| {
            if x == 777 {
                panic!("boom at {x}");
            }
            x
        })
        .name("explode")
        .new_stage()
        .for_each(|_| {});
    let err = p.run().unwrap_err();
    match &err {
        Error::Panic { stage, message } => {
            assert!(stage.starts_with("explode"), "{stage}");
            assert_eq!(message, "boom at 777");
        }
        other => panic!("expected a panic error, got {other}"),
    }
    assert_no_leaked_threads(before);
}

fn cancel_from_another_thread_stops_an_endless_run() {
    let before = thread_count();
    let p = Pipeline::with_options(small_batches());
    let h = p.cancel_handle();
    p.source("endless", 0u64..)
        .rebalance(2)
        .map(|x| x ^ 1)
        .for_each(|_| {});
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        h.cancel();
    });
    let t0 = Instant::now();
    assert!(matches!(p.run(), Err(Error::Cancelled)));
    assert!(t0.elapsed() < Duration::from_secs(10));
    t.join().unwrap();
    assert_no_leaked_threads(before);
}
