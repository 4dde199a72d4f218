//! The combiners of keyed `count` and tumbling windows (src/window/combine.rs, `CountTail`):
//! the stage feeding the aggregation pre-aggregates per key (and window) and sends one partial
//! per key instead of every record. These tests pin what that must not change — results,
//! emission order at parallelism 1, late records, the accounts — and what it must change: the
//! number of messages that cross the channel.

use std::time::Duration;

use millrace::window::{Aggregate, Count, Sum, Tumbling, WindowSpec};
use millrace::{Pipeline, Timestamp};

/// `(key, time ms, value)`.
type Ev = (u32, i64, f64);

/// 200,000 events over 50 keys, time advancing 1 ms per 10 events with up to 500 ms of
/// disorder: 21 windows of 1 s (times 501..21,000 ms), about 10,000 events per window.
fn events() -> Vec<Ev> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    (0..200_000i64)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let jitter = (x % 500) as i64;
            // Values in 1/8 steps: every sum is exact in any order.
            (
                (x >> 20) as u32 % 50,
                i / 10 - jitter + 1_000,
                ((x >> 40) % 64) as f64 / 8.0,
            )
        })
        .collect()
}

fn spec() -> WindowSpec<impl Fn(&Ev) -> Timestamp + Clone + Send + Sync + 'static> {
    WindowSpec::new(Tumbling::new(1_000, 0).unwrap(), |e: &Ev| Timestamp(e.1))
        .max_out_of_orderness(Duration::from_millis(500))
}

/// The window results in the order they came out, the report, and the late records.
fn run(parallelism: usize, checkpointed: bool) -> (Vec<(u32, i64, f64)>, millrace::RunReport) {
    let p = Pipeline::new();
    let keyed = p
        .source("events", events())
        .key_by(|e: &Ev| e.0)
        .parallelism(parallelism);
    let agg = Sum.on(|e: &Ev| e.2);
    let results = if checkpointed {
        // The checkpointed API is never combined: the reference.
        keyed.checkpointed().window(spec(), agg).results()
    } else {
        keyed.window(spec(), agg).results()
    };
    let out = results
        .map(|r| (r.key, r.window.start.0, r.value))
        .collect();
    let report = p.run().unwrap();
    (out.take(), report)
}

#[test]
fn a_combined_window_emits_what_an_uncombined_one_does_in_the_same_order() {
    let (plain, plain_report) = run(1, true);
    let (combined, report) = run(1, false);
    assert_eq!(plain.len(), 1_050, "50 keys x 21 windows");
    // Parallelism 1: the same results in the same order (by window, keys first seen first).
    assert_eq!(combined, plain);
    let w = report.stage("window").unwrap();
    let wp = plain_report.stage("window").unwrap();
    // The accounts count records, not partials.
    assert_eq!(w.records_in, 200_000);
    assert_eq!(wp.records_in, 200_000);
    assert_eq!(report.stage("events+key_by").unwrap().records_out, 200_000);
    report.check_accounting().unwrap();
    // What crossed the channel: one partial per key and window (1,050, in a few batches per
    // watermark) instead of 200,000 records in batches of 1,024.
    assert!(
        wp.batches_in >= 195,
        "uncombined: {} batches",
        wp.batches_in
    );
    assert!(w.batches_in < 100, "combined: {} batches", w.batches_in);
}

#[test]
fn combined_windows_at_parallelism_2_match_as_a_multiset() {
    let (mut plain, _) = run(1, true);
    let (mut combined, report) = run(2, false);
    plain.sort_by(|a, b| a.partial_cmp(b).unwrap());
    combined.sort_by(|a, b| a.partial_cmp(b).unwrap());
    assert_eq!(combined, plain);
    assert_eq!(report.stage("window").unwrap().records_in, 200_000);
    report.check_accounting().unwrap();
}

#[test]
fn late_records_still_come_out_one_by_one() {
    // Event time jumps ahead, then records for the windows the jump closed follow: they are
    // late at the window stage and must come out as records, not be folded into a partial.
    let mut evs: Vec<Ev> = (0..1_000).map(|i| (i % 7, i64::from(i), 1.0)).collect();
    evs.push((0, 100_000, 1.0));
    // Force the watermark out: the generator checks every 8,192 records by default.
    evs.extend((0..9_000).map(|i| (1, 100_000 + i64::from(i % 100), 1.0)));
    evs.extend((0..50).map(|i| (i % 3, i64::from(i), 1.0)));
    let p = Pipeline::new();
    let spec = WindowSpec::new(Tumbling::new(1_000, 0).unwrap(), |e: &Ev| Timestamp(e.1));
    let (results, late) = p
        .source("events", evs)
        .key_by(|e: &Ev| e.0)
        .window(spec, Count)
        .with_late();
    let results = results.collect();
    let late = late.collect();
    let report = p.run().unwrap();
    let late = late.take();
    assert_eq!(late.len(), 50);
    assert!(late.iter().all(|l| l.record.1 < 50 && l.time.0 < 50));
    let total: u64 = results.take().iter().map(|r| r.value).sum();
    assert_eq!(total, 1_000 + 1 + 9_000);
    assert_eq!(report.stage("window").unwrap().late, 50);
    report.check_accounting().unwrap();
}

#[test]
fn a_combined_count_counts_records_and_keeps_first_seen_order() {
    let words: Vec<String> = (0..100_000u32)
        .map(|i| format!("w{}", (i * 7919) % 1_000))
        .collect();
    let mut first_seen = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for w in &words {
        if seen.insert(w.clone()) {
            first_seen.push(w.clone());
        }
    }
    let p = Pipeline::new();
    let out = p
        .source("words", words)
        .key_by(|w: &String| w.clone())
        .count()
        .collect();
    let report = p.run().unwrap();
    let out = out.take();
    assert_eq!(out.len(), 1_000);
    assert!(out.iter().all(|(_, n)| *n == 100));
    let order: Vec<String> = out.into_iter().map(|(w, _)| w).collect();
    assert_eq!(
        order, first_seen,
        "parallelism 1 emits keys in first-seen order"
    );
    let count = report.stage("count").unwrap();
    assert_eq!(count.records_in, 100_000);
    assert!(
        count.batches_in <= 2,
        "one partial per key: {} batches",
        count.batches_in
    );
    report.check_accounting().unwrap();
}

#[test]
fn a_combined_count_over_a_parallel_source_sums_every_part() {
    let p = Pipeline::new();
    let out = p
        .parallel_source("n", 3, |part, parts| (part as u64..30_000).step_by(parts))
        .key_by(|x: &u64| x % 10)
        .parallelism(2)
        .count()
        .collect();
    let report = p.run().unwrap();
    let mut out = out.take();
    out.sort_unstable();
    assert_eq!(out, (0..10).map(|k| (k, 3_000)).collect::<Vec<_>>());
    assert_eq!(report.stage("count").unwrap().records_in, 30_000);
    report.check_accounting().unwrap();
}

/// More distinct keys in one window than a combiner may hold (`MAX_ENTRIES`, 2^18): it sends
/// what it holds when it passes the bound and goes on. The results are those of the uncombined
/// window, in the same order; what crossed the channel shows the sends at the bound.
#[test]
fn a_combiner_over_its_bound_sends_what_it_holds_and_loses_nothing() {
    const KEYS: u32 = 300_000;
    // Every key twice, all in the window [0, 1 s), values exact in any order.
    let events: Vec<Ev> = (0..2 * KEYS)
        .map(|i| (i % KEYS, i64::from(i % 1_000), f64::from(i % 8) / 8.0))
        .collect();
    let run = |checkpointed: bool| {
        // No watermark until the end: only the bound makes the combiner send early.
        let mut opts = millrace::Options::default();
        opts.watermark_every = 1 << 30;
        let p = Pipeline::with_options(opts);
        let keyed = p.source("events", events.clone()).key_by(|e: &Ev| e.0);
        let agg = Sum.on(|e: &Ev| e.2);
        let results = if checkpointed {
            keyed.checkpointed().window(spec(), agg).results()
        } else {
            keyed.window(spec(), agg).results()
        };
        let out = results.map(|r| (r.key, r.value)).collect();
        let report = p.run().unwrap();
        report.check_accounting().unwrap();
        (out.take(), report)
    };
    let (plain, _) = run(true);
    let (combined, report) = run(false);
    assert_eq!(plain.len(), KEYS as usize);
    assert_eq!(combined, plain);
    let w = report.stage("window").unwrap();
    assert_eq!(w.records_in, 2 * u64::from(KEYS));
    // Held until the end, 300,000 partials would cross in about 293 batches; sent at the
    // bound, about one partial per record does (the keys are dropped when they are sent).
    assert!(
        w.batches_in > 450,
        "{} batches: nothing sent at the bound",
        w.batches_in
    );
}
