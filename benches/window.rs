//! Keyed 10 s tumbling sum over 10 million events (10,000 keys, up to 2 s of disorder), through
//! the window stage at parallelism 1 and 2 (fed by one source thread, by a rebalance, or by a
//! parallel source over the shared events), next to a hand-written single-threaded loop over the
//! same events that does the same work: per-(window, key) sums, a watermark trailing the newest
//! time by 2 s, and windows emitted (and freed) as the watermark passes their end.
//!
//! Run with `cargo bench --bench window`; the ratios are recorded in docs/performance.md.
// A bench drives the engine from outside with std's threads and atomics: the `crate::sync`
// rule (clippy.toml) is for the engine's own code.
#![allow(clippy::disallowed_types, clippy::disallowed_methods)]
// `criterion_group!` generates an undocumented function.
#![allow(missing_docs)]

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use millrace::window::{Aggregate, Sum, Tumbling, WindowSpec};
use millrace::{Options, Pipeline, Timestamp};
use rustc_hash::FxHashMap;

#[path = "common/window_events.rs"]
mod window_events;
use window_events::{events, Ev, DISORDER_MS, EVENTS, SIZE_MS};

/// The hand-written loop: what a careful programmer would write for this one job.
fn hand_loop(data: &[Ev]) -> (u64, f64) {
    let mut open: BTreeMap<i64, FxHashMap<u32, f64>> = BTreeMap::new();
    let mut newest = i64::MIN;
    let (mut fired, mut checksum) = (0u64, 0.0f64);
    let mut fire = |open: &mut BTreeMap<i64, FxHashMap<u32, f64>>, wm: i64| {
        while let Some(entry) = open.first_entry() {
            if *entry.key() + SIZE_MS > wm {
                break;
            }
            for (_, sum) in entry.remove() {
                fired += 1;
                checksum += sum;
            }
        }
    };
    for (i, &(k, t, v)) in data.iter().enumerate() {
        let start = t - t.rem_euclid(SIZE_MS);
        *open.entry(start).or_default().entry(k).or_insert(0.0) += v;
        newest = newest.max(t);
        if i % 1024 == 1023 {
            fire(&mut open, newest - DISORDER_MS);
        }
    }
    fire(&mut open, i64::MAX);
    (fired, checksum)
}

/// How the events reach the keyed stage.
#[derive(Clone, Copy, PartialEq)]
enum Feed {
    /// One source thread iterates, keys and pre-aggregates.
    Source,
    /// One source thread iterates; `parallelism` threads behind a rebalance key and
    /// pre-aggregate.
    Rebalanced,
    /// A parallel source of `parallelism` instances over the shared events
    /// (`Pipeline::source_split`): iteration, keying and pre-aggregation on every thread.
    Split,
}

/// The shared events as a slice, for `Pipeline::source_split`.
struct Shared(Arc<Vec<Ev>>);

impl AsRef<[Ev]> for Shared {
    fn as_ref(&self) -> &[Ev] {
        &self.0
    }
}

/// The pipeline at `parallelism`, fed as `feed` says.
fn pipeline(data: Arc<Vec<Ev>>, parallelism: usize, feed: Feed) -> (u64, f64) {
    let p = Pipeline::with_options(Options::default());
    let total = Arc::new(parking_lot::Mutex::new((0u64, 0.0f64)));
    // The sink sums locally, as the hand loop does, and publishes when it is dropped at the
    // end of the run.
    let mut local = Published {
        fired: 0,
        sum: 0.0,
        to: Arc::clone(&total),
    };
    let n = data.len();
    let spec = WindowSpec::new(Tumbling::new(SIZE_MS, 0).unwrap(), |e: &Ev| Timestamp(e.1))
        .max_out_of_orderness(Duration::from_millis(DISORDER_MS as u64));
    let sink = move |v: f64| {
        let l = &mut local; // the whole struct moves into the sink, not just its fields
        l.fired += 1;
        l.sum += v;
    };
    let agg = Sum.on(|e: &Ev| e.2);
    // One arm per feed rather than one boxed stream: boxing would add a dynamic call per
    // record to the pipeline being measured.
    match feed {
        Feed::Split => {
            p.source_split("events", Shared(data), parallelism)
                .key_by(|e: &Ev| e.0)
                .parallelism(parallelism)
                .window(spec, agg)
                .results()
                .map(|r| r.value)
                .for_each(sink);
        }
        Feed::Rebalanced => {
            p.source("events", (0..n).map(move |i| data[i]))
                .rebalance(parallelism)
                .key_by(|e: &Ev| e.0)
                .parallelism(parallelism)
                .window(spec, agg)
                .results()
                .map(|r| r.value)
                .for_each(sink);
        }
        Feed::Source => {
            p.source("events", (0..n).map(move |i| data[i]))
                .key_by(|e: &Ev| e.0)
                .parallelism(parallelism)
                .window(spec, agg)
                .results()
                .map(|r| r.value)
                .for_each(sink);
        }
    }
    p.run().expect("the window pipeline runs");
    let total = *total.lock();
    total
}

/// A sink's running totals, added to `to` when the sink is dropped.
struct Published {
    fired: u64,
    sum: f64,
    to: Arc<parking_lot::Mutex<(u64, f64)>>,
}

impl Drop for Published {
    fn drop(&mut self) {
        let mut t = self.to.lock();
        t.0 += self.fired;
        t.1 += self.sum;
    }
}

fn window(c: &mut Criterion) {
    let data = events();
    let expect = hand_loop(&data);
    const RUNS: [(usize, Feed); 5] = [
        (1, Feed::Source),
        (1, Feed::Split),
        (2, Feed::Source),
        (2, Feed::Rebalanced),
        (2, Feed::Split),
    ];
    for (p, feed) in RUNS {
        let got = pipeline(Arc::clone(&data), p, feed);
        assert_eq!(got.0, expect.0, "same windows at parallelism {p}");
        assert!(
            (got.1 - expect.1).abs() < 1e-6 * expect.1.abs(),
            "same sums"
        );
    }
    let mut g = c.benchmark_group("window_tumbling_sum");
    g.throughput(Throughput::Elements(EVENTS as u64));
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(20));
    g.bench_function("hand_loop", |b| {
        b.iter(|| black_box(hand_loop(black_box(&data))))
    });
    for (p, feed) in RUNS {
        let name = match feed {
            Feed::Source => format!("pipeline_p{p}"),
            Feed::Rebalanced => format!("pipeline_p{p}_rebalanced"),
            Feed::Split => format!("pipeline_p{p}_source_split"),
        };
        g.bench_function(name, |b| {
            b.iter(|| black_box(pipeline(Arc::clone(&data), p, feed)))
        });
    }
    g.finish();
}

criterion_group!(benches, window);
criterion_main!(benches);
