//! `Pipeline::source_split`: the head reads stripes (one batch's worth of the shared data) and
//! the chain's first step (`operator::Stripes`) hands their records on one by one. These tests
//! pin what that must not change: the records, their order, and the accounts, which count
//! records, never stripes — also when a limit stops the stage in the middle of a stripe, when
//! the stage's chain is moved into a head (`map_par`), and in front of a combined window.

use millrace::window::{Aggregate, Sum, Tumbling, WindowSpec};
use millrace::{Options, Pipeline, RunReport, Timestamp};

/// Options with small batches, so that a stripe is 100 records.
fn small_batches() -> Options {
    let mut opts = Options::default();
    opts.batch_size = 100;
    opts
}

/// The account of step `name`: (in, out, filtered).
fn account(report: &RunReport, name: &str) -> (u64, u64, u64) {
    let a = report
        .accounts
        .iter()
        .find(|a| a.stage == name)
        .unwrap_or_else(|| panic!("no account for `{name}`: {:?}", report.accounts));
    (a.records_in, a.records_out, a.filtered)
}

/// Records the source stage's instances read (their `records_in` metrics).
fn read_by(report: &RunReport, stage: &str) -> u64 {
    report
        .stages
        .iter()
        .filter(|s| s.stage == stage)
        .map(|s| s.records_in)
        .sum()
}

#[test]
fn a_split_source_counts_records_not_stripes() {
    let p = Pipeline::with_options(small_batches());
    let data: Vec<u32> = (0..10_050).collect();
    let evens = p
        .source_split("data", data, 2)
        .filter(|x| x % 2 == 0)
        .name("evens")
        .collect();
    let report = p.run().unwrap();
    let mut evens = evens.take();
    evens.sort_unstable();
    assert_eq!(evens, (0..10_050).step_by(2).collect::<Vec<u32>>());
    report.check_accounting().unwrap();
    // 101 stripes (the last of 50 records), 10,050 records.
    assert_eq!(account(&report, "data"), (10_050, 10_050, 0));
    assert_eq!(account(&report, "evens"), (10_050, 5_025, 5_025));
    // The collect sink is fused into the source's stage.
    assert_eq!(read_by(&report, "data+evens+collect"), 10_050);
}

#[test]
fn a_limit_that_stops_mid_stripe_counts_only_what_was_handed_on() {
    let p = Pipeline::with_options(small_batches());
    let data: Vec<u64> = (0..1_000).collect();
    // 150 is in the middle of the second stripe (100..200).
    let first = p.source_split("data", data, 1).limit(150).collect();
    let report = p.run().unwrap();
    assert_eq!(first.take(), (0..150).collect::<Vec<u64>>());
    report.check_accounting().unwrap();
    let (taken, _, _) = account(&report, "data");
    assert!(
        (150..=151).contains(&taken),
        "the source handed on {taken} records: only those up to the limit's stop count"
    );
    let (limit_in, limit_out, limit_filtered) = account(&report, "limit");
    assert_eq!(limit_in, taken);
    assert_eq!(limit_out, 150);
    assert_eq!(limit_in, limit_out + limit_filtered);
}

#[test]
fn a_split_source_moved_into_a_head_keeps_its_accounts() {
    // `map_par` moves the chain before it (here `Stripes` and a filter) into a head.
    let p = Pipeline::with_options(small_batches());
    let data: Vec<u64> = (0..5_000).collect();
    let out = p
        .source_split("data", data, 2)
        .filter(|x| x % 5 != 0)
        .name("no-fives")
        .map_par(|x: u64| x * 3)
        .collect();
    let report = p.run().unwrap();
    let mut out = out.take();
    out.sort_unstable();
    let want: Vec<u64> = (0..5_000).filter(|x| x % 5 != 0).map(|x| x * 3).collect();
    assert_eq!(out, want);
    report.check_accounting().unwrap();
    assert_eq!(account(&report, "data"), (5_000, 5_000, 0));
    assert_eq!(account(&report, "no-fives"), (5_000, 4_000, 1_000));
}

#[test]
fn a_window_over_a_split_source_gives_what_one_over_a_plain_source_gives() {
    // (key, time ms, value): 100,000 events, 1 ms per 10 events, up to 300 ms out of order.
    let events: Vec<(u32, i64, f64)> = (0..100_000i64)
        .map(|i| {
            let x = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            (
                (x >> 40) as u32 % 37,
                i / 10 - (x % 300) as i64 + 1_000,
                (x % 64) as f64 / 8.0,
            )
        })
        .collect();
    let run = |split: Option<usize>| {
        let p = Pipeline::with_options(small_batches());
        let spec = WindowSpec::new(Tumbling::new(1_000, 0).unwrap(), |e: &(u32, i64, f64)| {
            Timestamp(e.1)
        })
        .max_out_of_orderness(std::time::Duration::from_millis(300));
        let keyed = match split {
            Some(parts) => p
                .source_split("events", events.clone(), parts)
                .key_by(|e| e.0)
                .boxed(),
            None => p.source("events", events.clone()).key_by(|e| e.0).boxed(),
        };
        let (results, late) = keyed
            .parallelism(2)
            .window(spec, Sum.on(|e: &(u32, i64, f64)| e.2))
            .with_late();
        let (results, late) = (results.collect(), late.collect());
        let report = p.run().unwrap();
        report.check_accounting().unwrap();
        assert!(late.take().is_empty());
        let mut r: Vec<(u32, i64, f64)> = results
            .take()
            .into_iter()
            .map(|r| (r.key, r.window.start.0, r.value))
            .collect();
        r.sort_by_key(|x| (x.0, x.1));
        (r, account(&report, "events").1)
    };
    let (plain, plain_n) = run(None);
    assert_eq!(plain_n, 100_000);
    for parts in [1, 2, 3] {
        let (split, n) = run(Some(parts));
        assert_eq!(n, 100_000, "parts = {parts}");
        assert_eq!(split, plain, "parts = {parts}");
    }
}

/// Parts take stripes as they are ready for them, so a part that stalls does not keep half of
/// the data behind it: here the part that reads record 0 waits (with a deadline) until the
/// other part has handed on every record outside that first stripe. Dealt by `k % parts` (the
/// old way), the other part could only ever read its own half, so the wait ran out with 5,000
/// of 9,900 records done and a window stage downstream held every window of the stalled half.
/// With `.ordered()` the parts keep the fixed deal, which the order needs.
#[test]
#[allow(clippy::disallowed_types, clippy::disallowed_methods)]
fn a_stalled_part_does_not_hold_back_the_stripes_of_the_others() {
    use std::sync::{Arc, Condvar, Mutex};
    use std::time::{Duration, Instant};
    const N: u32 = 10_000;
    // Records handed on by every thread but the stalled one; the stalled thread.
    let state = Arc::new((Mutex::new((0u32, None)), Condvar::new()));
    let s = Arc::clone(&state);
    let p = Pipeline::with_options(small_batches());
    let out = p
        .source_split("data", (0..N).collect::<Vec<u32>>(), 2)
        .map(move |x| {
            let (lock, cv) = &*s;
            let me = std::thread::current().id();
            let mut g = lock.lock().unwrap();
            if x == 0 {
                g.1 = Some(me);
                let deadline = Instant::now() + Duration::from_secs(20);
                while g.0 < N - 100 && Instant::now() < deadline {
                    g = cv.wait_timeout(g, Duration::from_millis(50)).unwrap().0;
                }
            } else if g.1 != Some(me) {
                g.0 += 1;
                cv.notify_all();
            }
            x
        })
        .collect();
    let report = p.run().unwrap();
    let mut out = out.take();
    out.sort_unstable();
    assert_eq!(out, (0..N).collect::<Vec<u32>>());
    report.check_accounting().unwrap();
    let others = state.0.lock().unwrap().0;
    assert_eq!(
        others,
        N - 100,
        "the other part read every stripe but the stalled one"
    );
}
