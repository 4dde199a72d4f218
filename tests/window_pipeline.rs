//! Windows inside running pipelines: watermarks travelling through channels, results against a
//! brute-force reference (parallelism 1 and 2), late records routed and counted, and window
//! state freed by the watermark while the run is still going.
// A test drives the engine from outside with std's threads and atomics: the `crate::sync`
// rule (clippy.toml) is for the engine's own code.
#![allow(clippy::disallowed_types, clippy::disallowed_methods)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use millrace::window::{
    Aggregate, Assigner, Count, LateRecord, Session, Sliding, Sum, Tumbling, WindowSpec,
};
use millrace::{Options, Pipeline, Timestamp, Window};
use proptest::prelude::*;

/// (key, event time ms, value)
type Ev = (u32, i64, f64);

fn time(e: &Ev) -> Timestamp {
    Timestamp(e.1)
}

/// Options under which every record is its own batch and every watermark rise is sent at once:
/// the order of records and watermarks is then fully determined by the input.
fn lockstep() -> Options {
    let mut o = Options::default();
    o.batch_size = 1;
    o.watermark_every = 1;
    o
}

/// The final result per (key, window): the last one emitted, after removing the session windows
/// that a later result replaced.
fn finals(results: Vec<millrace::window::WindowResult<u32, f64>>) -> BTreeMap<(u32, Window), f64> {
    let mut out = BTreeMap::new();
    for r in results {
        for gone in &r.replaces {
            out.remove(&(r.key, *gone));
        }
        out.insert((r.key, r.window), r.value);
    }
    out
}

/// Every window's sum computed from scratch.
fn reference(assigner: Assigner, events: &[Ev]) -> BTreeMap<(u32, Window), f64> {
    let mut out: BTreeMap<(u32, Window), f64> = BTreeMap::new();
    match assigner {
        Assigner::Tumbling(a) => {
            for &(k, t, v) in events {
                *out.entry((k, a.assign(Timestamp(t)))).or_default() += v;
            }
        }
        Assigner::Sliding(a) => {
            for &(k, t, v) in events {
                for w in a.assign(Timestamp(t)) {
                    assert!(w.contains(Timestamp(t)));
                    *out.entry((k, w)).or_default() += v;
                }
            }
        }
        Assigner::Session(s) => {
            let mut by_key: BTreeMap<u32, Vec<(i64, f64)>> = BTreeMap::new();
            for &(k, t, v) in events {
                by_key.entry(k).or_default().push((t, v));
            }
            for (k, mut evs) in by_key {
                evs.sort_by_key(|e| e.0);
                let mut cur: Option<(Window, f64)> = None;
                for (t, v) in evs {
                    let w = s.assign(Timestamp(t));
                    cur = match cur {
                        Some((c, sum)) if c.overlaps(&w) => Some((c.cover(&w), sum + v)),
                        Some((c, sum)) => {
                            out.insert((k, c), sum);
                            Some((w, v))
                        }
                        None => Some((w, v)),
                    };
                }
                if let Some((c, sum)) = cur {
                    out.insert((k, c), sum);
                }
            }
        }
    }
    out
}

/// Final results, late records, report.
type Outcome = (
    BTreeMap<(u32, Window), f64>,
    Vec<LateRecord<u32, Ev>>,
    millrace::RunReport,
);

/// Runs the events through source -> (rebalance upstream) -> key_by -> window; returns the
/// final results, the late records and the report.
fn run_window(
    events: Vec<Ev>,
    assigner: Assigner,
    parallelism: usize,
    bound_ms: u64,
    lateness_ms: u64,
    opts: Options,
) -> Outcome {
    let p = Pipeline::with_options(opts);
    let spec = WindowSpec::new(assigner, time)
        .max_out_of_orderness(Duration::from_millis(bound_ms))
        .allowed_lateness(Duration::from_millis(lateness_ms));
    let src = p.source("events", events);
    // Two ways of building the keyed stream: `boxed` gives them one type.
    let keyed = if parallelism > 1 {
        src.rebalance(parallelism).key_by(|e: &Ev| e.0).boxed()
    } else {
        src.key_by(|e: &Ev| e.0).boxed()
    };
    let (results, late) = keyed
        .parallelism(parallelism)
        .window(spec, Sum.on(|e: &Ev| e.2))
        .with_late();
    let results = results.collect();
    let late = late.collect();
    let report = p.run().expect("the run succeeds");
    (finals(results.take()), late.take(), report)
}

/// Events whose times never fall more than `bound` behind the newest before them: none is
/// late, so the pipeline's final results must equal the reference exactly.
fn in_bound_stream(bound: i64) -> impl Strategy<Value = Vec<Ev>> {
    prop::collection::vec((0u32..4, -bound..=60i64, 0u8..10), 1..120).prop_map(move |steps| {
        let mut max = -50_000i64;
        steps
            .into_iter()
            .map(|(k, delta, v)| {
                // Mostly forward, sometimes back by at most `bound`.
                let t = (max + delta * 37).max(max - bound);
                max = max.max(t);
                (k, t, f64::from(v))
            })
            .collect()
    })
}

fn assigners() -> impl Strategy<Value = Assigner> {
    prop_oneof![
        (1i64..3_000, -2_000i64..2_000)
            .prop_map(|(size, off)| Assigner::Tumbling(Tumbling::new(size, off).unwrap())),
        (1i64..6, 1i64..1_500).prop_map(|(k, slide)| {
            // Sizes that are and are not multiples of the slide.
            let size = slide * k + (k % 2) * slide / 3;
            Assigner::Sliding(Sliding::new(size.max(slide), slide, 0).unwrap())
        }),
        (1i64..2_000).prop_map(|gap| Assigner::Session(Session::new(gap).unwrap())),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Random out-of-order streams through a real pipeline, parallelism 1 and 2, every
    /// assigner: the final results equal the brute-force reference and nothing is late.
    #[test]
    fn pipeline_windows_match_the_reference(
        events in in_bound_stream(2_000),
        assigner in assigners(),
        parallelism in 1usize..=2,
        lockstep_run in any::<bool>(),
    ) {
        let opts = if lockstep_run { lockstep() } else { Options::default() };
        let (got, late, report) = run_window(events.clone(), assigner, parallelism, 2_000, 0, opts);
        prop_assert!(late.is_empty(), "no record is beyond the bound: {late:?}");
        prop_assert_eq!(got, reference(assigner, &events));
        let w = report.stage("window").expect("the window stage is in the report");
        prop_assert_eq!(w.records_in, events.len() as u64);
        prop_assert_eq!(w.late, 0);
        prop_assert_eq!(w.open_windows, 0, "every window is freed at end of input");
    }
}

#[test]
fn a_boundary_event_lands_in_exactly_one_tumbling_window() {
    let events = vec![(1, 0, 1.0), (1, 9_999, 2.0), (1, 10_000, 4.0), (1, -1, 8.0)];
    let a = Assigner::Tumbling(Tumbling::new(10_000, 0).unwrap());
    let (got, late, _) = run_window(events, a, 1, 10_000, 0, Options::default());
    assert!(late.is_empty());
    let w = |s: i64| Window::new(Timestamp(s), Timestamp(s + 10_000));
    let want: BTreeMap<_, _> = [
        ((1, w(-10_000)), 8.0),
        ((1, w(0)), 3.0),
        ((1, w(10_000)), 4.0),
    ]
    .into();
    assert_eq!(got, want);
}

/// Late records: in lockstep, the watermark reaches the window stage before the record that
/// follows it, so which records are late is determined by the input alone.
#[test]
fn late_records_are_routed_and_counted() {
    let a = Assigner::Tumbling(Tumbling::new(10, 0).unwrap());
    let events = vec![
        (1, 1, 1.0),   // [0, 10)
        (1, 25, 1.0),  // watermark 25 - 0: [0, 10) fires and is freed (lateness 0)
        (1, 5, 10.0),  // late: its only window is gone
        (2, 9, 100.0), // late as well, for another key
        (1, 26, 1.0),  // on time
    ];
    let (got, late, report) = run_window(events, a, 1, 0, 0, lockstep());
    let w = |s: i64| Window::new(Timestamp(s), Timestamp(s + 10));
    assert_eq!(got, [((1, w(0)), 1.0), ((1, w(20)), 2.0)].into());
    let late: Vec<(u32, i64)> = late.iter().map(|l| (l.key, l.time.0)).collect();
    assert_eq!(late, vec![(1, 5), (2, 9)]);
    let stage = report.stage("window").unwrap();
    assert_eq!(stage.late, 2, "late records are counted in the report");
    assert!(report.to_string().contains("2 late"), "{report}");
}

#[test]
fn a_late_record_within_the_allowed_lateness_updates_its_window() {
    let a = Assigner::Tumbling(Tumbling::new(10, 0).unwrap());
    let events = vec![
        (1, 1, 1.0),
        (1, 12, 1.0),
        (1, 3, 5.0),
        (1, 40, 1.0),
        (1, 4, 7.0),
    ];
    let p = Pipeline::with_options(lockstep());
    let spec = WindowSpec::new(a, time).allowed_lateness(Duration::from_millis(20));
    let (results, late) = p
        .source("events", events)
        .key_by(|e: &Ev| e.0)
        .window(spec, Sum.on(|e: &Ev| e.2))
        .with_late();
    let results = results
        .map(|r| (r.window.start.0, r.value, r.update))
        .collect();
    let late = late.map(|l| l.time.0).collect();
    p.run().unwrap();
    assert_eq!(
        results.take(),
        vec![
            (0, 1.0, false), // fired by the watermark 12
            (0, 6.0, true),  // the record at 3 is late but within the lateness: an update
            (10, 1.0, false),
            (40, 1.0, false),
        ]
    );
    // At watermark 40, [0, 10) is past 10 + 20: freed, so the record at 4 is late.
    assert_eq!(late.take(), vec![4]);
}

#[test]
fn results_alone_drop_late_records_but_count_them() {
    let a = Assigner::Tumbling(Tumbling::new(10, 0).unwrap());
    let p = Pipeline::with_options(lockstep());
    let out = p
        .source(
            "events",
            vec![(1u32, 1i64, 1.0f64), (1, 30, 1.0), (1, 2, 1.0)],
        )
        .key_by(|e: &Ev| e.0)
        .window(WindowSpec::new(a, time), Count)
        .results()
        .map(|r| (r.window.start.0, r.value))
        .collect();
    let report = p.run().unwrap();
    assert_eq!(out.take(), vec![(0, 1), (30, 1)]);
    assert_eq!(report.stage("window").unwrap().late, 1);
}

/// Two upstream instances, one slowed down: the window's watermark is the minimum of theirs,
/// so the fast one cannot make the slow one's records late (with the maximum, or the last
/// watermark heard, it would).
#[test]
fn the_watermark_is_the_minimum_over_upstream_instances() {
    let p = Pipeline::with_options(lockstep());
    let spec = WindowSpec::new(Tumbling::new(10, 0).unwrap(), time);
    let (results, late) = p
        .source(
            "events",
            (0..400).map(|i| (i as u32 % 3, i64::from(i), 1.0f64)),
        )
        .rebalance(2)
        .inspect(|e: &Ev| {
            if e.1 % 2 == 1 {
                std::thread::sleep(Duration::from_micros(300));
            }
        })
        .key_by(|e: &Ev| e.0)
        .window(spec, Count)
        .with_late();
    let results = results.map(|r| r.value).collect();
    let late = late.collect();
    let report = p.run().unwrap();
    assert_eq!(late.take(), vec![], "no record may be late");
    assert_eq!(results.take().iter().sum::<u64>(), 400);
    assert_eq!(report.stage("window").unwrap().late, 0);
}

/// A long run: window state rises and falls with the watermark while the run goes on (it is
/// not merely dropped at end of input), and is zero at the end.
#[test]
fn window_state_is_freed_by_the_watermark_during_a_long_run() {
    let mut opts = Options::default();
    opts.watermark_every = 10;
    opts.batch_size = 100;
    let p = Pipeline::with_options(opts);
    let handle = p.cancel_handle();
    let (tx, rx) = millrace::crossbeam_channel::bounded::<Ev>(8);
    let src = p.source_channel("events", rx);
    let spec = WindowSpec::new(Tumbling::new(1_000, 0).unwrap(), time);
    let out = src
        .key_by(|e: &Ev| e.0)
        .parallelism(2)
        .window(spec, Count)
        .results()
        .map(|r| r.value)
        .collect();
    let keys = 100u32;
    let feeder = std::thread::spawn(move || {
        let open = |h: &millrace::CancelHandle| {
            h.snapshot()
                .stages
                .iter()
                // The window stage's windows and those its feeding stage's combiner holds
                // partials of (src/window/combine.rs).
                .map(|s| s.open_windows)
                .sum::<u64>()
        };
        let mut peak = 0;
        for second in 0..200i64 {
            for k in 0..keys {
                tx.send((k, second * 1_000 + i64::from(k), 1.0)).unwrap();
            }
            peak = peak.max(open(&handle));
        }
        // One record far ahead: every earlier window can now fire and be freed, while the
        // source stays open.
        tx.send((0, 1_000_000, 1.0)).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut last = open(&handle);
        while last != 1 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
            last = open(&handle);
        }
        (peak, last)
    });
    let report = p.run().unwrap();
    let (peak, open_before_end) = feeder.join().unwrap();
    assert_eq!(
        open_before_end, 1,
        "before end of input, only the newest window is still held"
    );
    // 200 seconds of event time went through; at most the batches in flight (a few channels
    // of a few 100-record batches, one second each) may be held at once.
    assert!(
        peak <= u64::from(keys) * 40,
        "state stays bounded by the windows in flight, peak {peak}"
    );
    assert_eq!(report.stage("window").unwrap().open_windows, 0);
    let counts = out.take();
    assert_eq!(counts.iter().sum::<u64>(), 200 * u64::from(keys) + 1);
    assert_eq!(counts.len(), 200 * keys as usize + 1);
}

#[test]
fn sliding_windows_count_each_event_size_over_slide_times() {
    let a = Sliding::new(30, 10, 0).unwrap();
    let events: Vec<Ev> = (0..100).map(|t| (1, t, 1.0)).collect();
    let (got, _, _) = run_window(
        events.clone(),
        Assigner::Sliding(a),
        2,
        0,
        0,
        Options::default(),
    );
    assert_eq!(got, reference(Assigner::Sliding(a), &events));
    let windows: BTreeSet<i64> = got.keys().map(|(_, w)| w.start.0).collect();
    assert_eq!(windows.len(), 12, "starts -20..=90 step 10");
    assert_eq!(
        got.values().sum::<f64>(),
        300.0,
        "each event in size/slide = 3 windows"
    );
}

/// Runs a window behind two upstream instances of which only the first ever receives records,
/// while the source stays open; returns whether the window fired before end of input.
fn fires_while_an_input_is_silent(idle_timeout: Option<Duration>) -> bool {
    let mut opts = Options::default();
    opts.idle_timeout = idle_timeout;
    let p = Pipeline::with_options(opts);
    let (tx, rx) = millrace::crossbeam_channel::bounded::<Ev>(8);
    let (seen_tx, seen_rx) = millrace::crossbeam_channel::unbounded();
    let spec = WindowSpec::new(Tumbling::new(10, 0).unwrap(), time);
    p.source_channel("events", rx)
        .rebalance(2)
        .key_by(|e: &Ev| e.0)
        .window(spec, Count)
        .results()
        .for_each(move |r| {
            let _ = seen_tx.send(r.window.start.0);
        });
    let feeder = std::thread::spawn(move || {
        // One batch: the rebalance deals it to its first instance; the second stays silent.
        tx.send((1, 5, 1.0)).unwrap();
        tx.send((1, 100, 1.0)).unwrap();
        let early = seen_rx.recv_timeout(Duration::from_millis(1_500)).ok();
        drop(tx);
        let rest: Vec<i64> = seen_rx.iter().collect();
        (early, rest)
    });
    p.run().unwrap();
    let (early, rest) = feeder.join().unwrap();
    let mut all: Vec<i64> = early.into_iter().chain(rest).collect();
    all.sort();
    assert_eq!(all, vec![0, 100], "both windows fire by the end");
    early.is_some()
}

#[test]
fn an_idle_input_stops_holding_the_watermark_back() {
    assert!(
        fires_while_an_input_is_silent(Some(Duration::from_millis(100))),
        "with an idle timeout the silent instance is released and [0, 10) fires"
    );
    assert!(
        !fires_while_an_input_is_silent(None),
        "without one, the silent instance holds the watermark back until end of input"
    );
}

/// The worked example of docs/semantics.md ("Watermarks in a running pipeline"), row by row.
#[test]
fn the_documented_boundary_example() {
    let p = Pipeline::with_options(lockstep());
    let spec = WindowSpec::new(Tumbling::new(10_000, 0).unwrap(), time)
        .max_out_of_orderness(Duration::from_millis(2_000));
    let events: Vec<Ev> = [9_999, 10_000, 11_500, 12_000, 8_000]
        .iter()
        .map(|&t| (1, t, 1.0))
        .collect();
    let (results, late) = p
        .source("events", events)
        .key_by(|e: &Ev| e.0)
        .window(spec, Count)
        .with_late();
    let results = results.map(|r| (r.window.start.0, r.value)).collect();
    let late = late.map(|l| l.time.0).collect();
    p.run().unwrap();
    assert_eq!(results.take(), vec![(0, 1), (10_000, 3)]);
    assert_eq!(late.take(), vec![8_000]);
}
