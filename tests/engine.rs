//! The typed engine: operators, partitioning, backpressure, early termination, failure, cancel.
// A test drives the engine from outside with std's threads and atomics: the `crate::sync`
// rule (clippy.toml) is for the engine's own code.
#![allow(clippy::disallowed_types, clippy::disallowed_methods)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use millrace::{Error, Options, Pipeline};

fn small_batches() -> Options {
    let mut o = Options::default();
    o.batch_size = 16;
    o.channel_capacity = 2;
    o
}

#[test]
fn map_filter_flat_map_inspect_collect() {
    let p = Pipeline::new();
    let seen = Arc::new(AtomicU64::new(0));
    let s2 = Arc::clone(&seen);
    let out = p
        .source("nums", 0..1000u64)
        .map(|x| x * 3)
        .filter(|x| x % 2 == 0)
        .flat_map(|x| vec![x, x + 1])
        .inspect(move |_| {
            s2.fetch_add(1, Ordering::Relaxed);
        })
        .collect();
    let report = p.run().unwrap();
    let v = out.take();
    let expect: Vec<u64> = (0..1000u64)
        .map(|x| x * 3)
        .filter(|x| x % 2 == 0)
        .flat_map(|x| [x, x + 1])
        .collect();
    assert_eq!(v, expect);
    assert_eq!(seen.load(Ordering::Relaxed), expect.len() as u64);
    assert_eq!(report.records_read(), 1000);
    report.check_accounting().unwrap();
    let fm = report.account("flat_map").unwrap();
    assert_eq!((fm.records_in, fm.records_out), (500, 1000));
    // Everything fused into one stage: one worker.
    assert_eq!(report.stages.len(), 1, "{report}");
}

#[test]
fn stages_forced_onto_threads_keep_order_with_parallelism_one() {
    let p = Pipeline::with_options(small_batches());
    let out = p
        .source("nums", 0..10_000u64)
        .map(|x| x + 1)
        .new_stage()
        .map(|x| x * 2)
        .new_stage()
        .map(|x| x - 1)
        .collect();
    let report = p.run().unwrap();
    assert_eq!(
        out.take(),
        (0..10_000u64).map(|x| (x + 1) * 2 - 1).collect::<Vec<_>>()
    );
    assert_eq!(report.stages.len(), 3, "{report}");
    report.check_accounting().unwrap();
}

#[test]
fn rebalance_processes_every_record_once() {
    let p = Pipeline::with_options(small_batches());
    let out = p
        .source("nums", 0..50_000u64)
        .rebalance(3)
        .map(|x| x * 2)
        .collect();
    let report = p.run().unwrap();
    let mut v = out.take();
    v.sort_unstable();
    assert_eq!(v, (0..50_000u64).map(|x| x * 2).collect::<Vec<_>>());
    report.check_accounting().unwrap();
    assert_eq!(
        report
            .stages
            .iter()
            .filter(|s| s.stage.starts_with("map"))
            .count(),
        3
    );
}

#[test]
fn keyed_count_matches_a_hand_count_with_parallelism_1_and_3() {
    let words: Vec<String> = (0..20_000u64)
        .map(|i| format!("w{}", (i * 7919) % 97 % (1 + i % 13)))
        .collect();
    let mut expect: HashMap<String, u64> = HashMap::new();
    for w in &words {
        *expect.entry(w.clone()).or_default() += 1;
    }
    for par in [1, 3] {
        let p = Pipeline::with_options(small_batches());
        let out = p
            .source("words", words.clone())
            .key_by(|w| w.clone())
            .parallelism(par)
            .count()
            .collect();
        p.run().unwrap();
        let got: HashMap<String, u64> = out.take().into_iter().collect();
        assert_eq!(got, expect, "parallelism {par}");
    }
}

#[test]
fn keyed_fold_and_reduce() {
    let p = Pipeline::new();
    let sums = p
        .source("n", 1..=100u64)
        .key_by(|x| x % 3)
        .parallelism(2)
        .reduce(|a, b| a + b)
        .collect();
    p.run().unwrap();
    let mut v = sums.take();
    v.sort();
    let e = |r: u64| (1..=100u64).filter(|x| x % 3 == r).sum::<u64>();
    assert_eq!(v, vec![(0, e(0)), (1, e(1)), (2, e(2))]);
}

#[test]
fn hash_partitioning_sends_each_key_to_one_instance() {
    let p = Pipeline::with_options(small_batches());
    let out = p
        .source("n", 0..10_000u64)
        .key_by(|x| x % 50)
        .parallelism(4)
        .fold(Vec::new(), |v: &mut Vec<u64>, x| v.push(x))
        .collect();
    p.run().unwrap();
    let v = out.take();
    assert_eq!(v.len(), 50, "each key emitted exactly once");
    for (k, xs) in v {
        assert_eq!(xs.len(), 200);
        assert!(xs.iter().all(|x| x % 50 == k));
        assert!(xs.windows(2).all(|w| w[0] < w[1]), "per-key order kept");
    }
}

#[test]
fn union_and_split() {
    let p = Pipeline::new();
    let a = p.source("a", 0..100u64);
    let b = p.source("b", 1000..1100u64).map(|x| x + 1);
    let mut parts = a.union(b).split(2).into_iter();
    let evens = parts.next().unwrap().filter(|x| x % 2 == 0).collect();
    let all = parts.next().unwrap().collect();
    p.run().unwrap();
    assert_eq!(all.len(), 200);
    assert_eq!(evens.len(), 100);
}

#[test]
fn sort_by_orders_all_input() {
    let p = Pipeline::with_options(small_batches());
    let out = p
        .source("n", (0..1000u64).rev())
        .rebalance(2)
        .map(|x| x)
        .sort_by(|a, b| a.cmp(b))
        .collect();
    p.run().unwrap();
    assert_eq!(out.take(), (0..1000u64).collect::<Vec<_>>());
}

/// Seed bug 3 (inverted backpressure, unbounded buffer): a slow sink must throttle a fast
/// source. In flight = produced - consumed never exceeds the channel and batch buffers.
#[test]
fn slow_sink_throttles_fast_source() {
    let opts = small_batches();
    let (batch, cap) = (opts.batch_size as u64, opts.channel_capacity as u64);
    let p = Pipeline::with_options(opts);
    let produced = Arc::new(AtomicU64::new(0));
    let consumed = Arc::new(AtomicU64::new(0));
    let max_in_flight = Arc::new(AtomicU64::new(0));
    let (pr, co, mx) = (
        Arc::clone(&produced),
        Arc::clone(&consumed),
        Arc::clone(&max_in_flight),
    );
    let c2 = Arc::clone(&consumed);
    p.source("fast", 0..3000u64)
        .inspect(move |_| {
            let n = pr.fetch_add(1, Ordering::SeqCst) + 1;
            let in_flight = n - c2.load(Ordering::SeqCst);
            mx.fetch_max(in_flight, Ordering::SeqCst);
        })
        .new_stage()
        .map(|x| x)
        .new_stage()
        .for_each(move |_| {
            co.fetch_add(1, Ordering::SeqCst);
            if co.load(Ordering::SeqCst) % 64 == 0 {
                std::thread::sleep(Duration::from_millis(1));
            }
        });
    p.run().unwrap();
    assert_eq!(consumed.load(Ordering::SeqCst), 3000);
    // Per edge: `cap` queued batches, one being filled, one being sent, one being processed.
    let bound = 2 * (cap + 3) * batch;
    let seen = max_in_flight.load(Ordering::SeqCst);
    assert!(seen <= bound, "in flight {seen} > bound {bound}");
    assert!(
        seen >= batch,
        "the test must actually buffer something: {seen}"
    );
}

#[test]
fn endless_source_with_limit_returns_with_bounded_overproduction() {
    let opts = small_batches();
    let bound = (opts.channel_capacity as u64 + 3) * opts.batch_size as u64 * 3;
    let p = Pipeline::with_options(opts);
    let produced = Arc::new(AtomicU64::new(0));
    let pr = Arc::clone(&produced);
    let out = p
        .source("endless", 0u64..)
        .inspect(move |_| {
            pr.fetch_add(1, Ordering::Relaxed);
        })
        .new_stage()
        .map(|x| x + 1)
        .new_stage()
        .limit(10)
        .collect();
    p.run().unwrap();
    assert_eq!(out.take(), (1..=10u64).collect::<Vec<_>>());
    let made = produced.load(Ordering::Relaxed);
    assert!(
        made <= 10 + bound,
        "source overproduced: {made} > {}",
        10 + bound
    );
}

#[test]
fn limit_in_the_source_stage_stops_at_once() {
    let p = Pipeline::new();
    let out = p.source("endless", 0u64..).limit(5).collect();
    p.run().unwrap();
    assert_eq!(out.take(), vec![0, 1, 2, 3, 4]);
}

#[test]
fn sink_error_fails_the_run() {
    let p = Pipeline::new();
    p.source("n", 0..100u32)
        .try_for_each(|x| if x == 50 { Err("disk full") } else { Ok(()) });
    let err = p.run().unwrap_err();
    assert_eq!(err.to_string(), "stage `for_each` failed: disk full");
}

/// A slow trickle must still flow: records reach the sink long before the source ends.
#[test]
fn idle_source_flushes_partial_batches() {
    let p = Pipeline::new(); // batch 1024, linger 10 ms
    let arrived = Arc::new(AtomicU64::new(0));
    let a2 = Arc::clone(&arrived);
    let seen_while_running = Arc::new(AtomicU64::new(0));
    let s2 = Arc::clone(&seen_while_running);
    let trickle = (0..6u64).inspect(move |&i| {
        if i == 5 {
            // Before the last record, wait (the source is stalled) until the first four have
            // arrived: only linger flushes can have delivered them, each when the 30 ms gap
            // after it ended. (The fifth may still sit in the source's open batch: a source
            // stalled inside its iterator cannot flush.) Without flushes they never arrive, and
            // the deadline fails the test.
            let deadline = Instant::now() + Duration::from_secs(10);
            while a2.load(Ordering::SeqCst) < 4 && Instant::now() < deadline {
                std::thread::yield_now();
            }
            s2.store(a2.load(Ordering::SeqCst), Ordering::SeqCst);
        } else {
            std::thread::sleep(Duration::from_millis(30));
        }
    });
    let a3 = Arc::clone(&arrived);
    p.source("trickle", trickle)
        .new_stage()
        .map(|x| x)
        .new_stage()
        .for_each(move |_| {
            a3.fetch_add(1, Ordering::SeqCst);
        });
    p.run().unwrap();
    assert_eq!(arrived.load(Ordering::SeqCst), 6);
    assert!(
        seen_while_running.load(Ordering::SeqCst) >= 4,
        "partial batches were not flushed"
    );
}

#[test]
fn duplicate_stage_name_is_an_error() {
    let p = Pipeline::new();
    p.source("a", 0..1u8)
        .map(|x| x)
        .name("x")
        .map(|x| x)
        .name("x")
        .for_each(|_| {});
    let err = p.run().unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid pipeline: duplicate stage name `x`"
    );
}

#[test]
fn report_counts_records_and_prints_a_table() {
    let p = Pipeline::with_options(small_batches());
    p.source("nums", 0..1000u64)
        .new_stage()
        .filter(|x| x % 10 == 0)
        .new_stage()
        .for_each(|_| {});
    let r = p.run().unwrap();
    let f = r.stage("filter").unwrap();
    assert_eq!((f.records_in, f.records_out), (1000, 100));
    let table = r.to_string();
    assert!(table.starts_with("stage"), "{table}");
    assert!(table.contains("filter#0"), "{table}");
    assert!(table.contains("1000 records read"), "{table}");
}

#[test]
fn a_stream_left_without_a_sink_is_an_error_naming_its_stage() {
    let p = Pipeline::new();
    let dangling = p.source("nums", 0..10u32).map(|x| x + 1).rebalance(2);
    drop(dangling);
    let err = p.run().unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid pipeline: the output of stage `nums+map` is never consumed: end the stream in a sink"
    );
}

#[test]
fn read_lines_and_write_lines_round_trip_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.txt");
    let text: String = (0..5000).map(|i| format!("line {i}\r\n")).collect();
    std::fs::write(&input, &text).unwrap();
    let output = dir.path().join("sub/out.txt");
    let p = Pipeline::with_options(small_batches());
    p.read_lines(&input)
        .map(|l| l.to_uppercase())
        .write_lines(&output);
    let report = p.run().unwrap();
    let expect: String = (0..5000).map(|i| format!("LINE {i}\n")).collect();
    assert_eq!(std::fs::read_to_string(&output).unwrap(), expect);
    assert_eq!(report.stage("lines.write").unwrap().records_out, 5000);
}

#[test]
fn read_ndjson_typed_and_write_ndjson() {
    #[derive(serde::Deserialize, serde::Serialize, Debug, PartialEq)]
    struct Ev {
        id: u32,
        user: String,
    }
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.ndjson");
    std::fs::write(
        &input,
        "{\"id\":1,\"user\":\"a\"}\n\n{\"id\":2,\"user\":\"b\"}\n",
    )
    .unwrap();
    let output = dir.path().join("out.ndjson");
    let p = Pipeline::new();
    p.read_ndjson::<Ev>(&input)
        .filter(|e| e.id > 1)
        .write_ndjson(&output);
    p.run().unwrap();
    assert_eq!(
        std::fs::read_to_string(&output).unwrap(),
        "{\"id\":2,\"user\":\"b\"}\n"
    );

    std::fs::write(&input, "{\"id\":1,\"user\":\"a\"}\n{\"id\":\"x\"}\n").unwrap();
    let p = Pipeline::new();
    p.read_ndjson::<Ev>(&input).for_each(|_| {});
    let err = p.run().unwrap_err();
    assert!(
        matches!(&err, Error::Record { stage, location, .. }
            if stage == "ndjson.read" && location.line == 2 && location.path == input.display().to_string()),
        "{err:?}"
    );
    let err = err.to_string();
    let want = format!(
        "stage `ndjson.read`: {}:2: invalid JSON: invalid type",
        input.display()
    );
    assert!(err.starts_with(&want), "{err}");
}

#[test]
fn forward_keeps_instances_paired() {
    let p = Pipeline::with_options(small_batches());
    let out = p
        .source("n", 0..4000u64)
        .rebalance(2)
        .map(|x| (x, std::thread::current().name().unwrap_or("").to_string()))
        .forward()
        .map(|(x, upstream)| {
            (
                x,
                upstream,
                std::thread::current().name().unwrap_or("").to_string(),
            )
        })
        .collect();
    let report = p.run().unwrap();
    let v = out.take();
    assert_eq!(v.len(), 4000);
    // Instance i of the first stage feeds instance i of the second, and only it.
    for (_, up, down) in &v {
        assert_eq!(up.chars().last(), down.chars().last(), "{up} -> {down}");
    }
    assert_eq!(report.stages.len(), 5, "{report}");
}

/// A channel source flushes on time while its sender is silent: the records sent before a long
/// pause reach the sink during the pause, not at the end.
#[test]
fn channel_source_flushes_while_the_sender_is_silent() {
    let (tx, rx) = millrace::crossbeam_channel::bounded(64);
    let p = Pipeline::new(); // batch 1024, linger 10 ms
    let arrived = Arc::new(AtomicU64::new(0));
    let a2 = Arc::clone(&arrived);
    p.source_channel("events", rx)
        .new_stage()
        .map(|x: u64| x)
        .for_each(move |_| {
            a2.fetch_add(1, Ordering::SeqCst);
        });
    let a3 = Arc::clone(&arrived);
    let feeder = std::thread::spawn(move || {
        for i in 0..5u64 {
            tx.send(i).unwrap();
        }
        // Silent until the five have arrived (only a linger flush can deliver them while the
        // sender is silent), or until a deadline that fails the test.
        let deadline = Instant::now() + Duration::from_secs(10);
        while a3.load(Ordering::SeqCst) < 5 && Instant::now() < deadline {
            std::thread::yield_now();
        }
        let seen = a3.load(Ordering::SeqCst);
        tx.send(5).unwrap();
        seen // dropping `tx` ends the source
    });
    p.run().unwrap();
    assert_eq!(
        feeder.join().unwrap(),
        5,
        "all five arrived during the pause"
    );
    assert_eq!(arrived.load(Ordering::SeqCst), 6);
}

/// Regression: an instance that fails drops its channels; the consumer that sees them close
/// must find the run already failing, and the error reported must be the instance's own, not
/// "input closed after 1 of 2 end-of-stream markers" (seen about 2 % of the time before the
/// failure was recorded ahead of the drop).
#[test]
fn a_failing_instance_is_reported_not_the_disconnect_it_causes() {
    for round in 0..200u64 {
        let p = Pipeline::with_options(small_batches());
        p.source("n", 0..64u64)
            .rebalance(2)
            .try_map(move |x| if x == round % 64 { Err("boom") } else { Ok(x) })
            .name("bad")
            .new_stage()
            .for_each(|_| {});
        assert_eq!(p.run().unwrap_err().to_string(), "stage `bad` failed: boom");

        let p = Pipeline::with_options(small_batches());
        p.source("n", 0..64u64)
            .rebalance(2)
            .map(move |x| if x == round % 64 { panic!("kaboom") } else { x })
            .name("bad")
            .new_stage()
            .for_each(|_| {});
        match p.run().unwrap_err() {
            Error::Panic { stage, message } => {
                assert_eq!((stage.as_str(), message.as_str()), ("bad", "kaboom"))
            }
            other => panic!("round {round}: expected the panic, got {other}"),
        }
    }
}

/// By default a link's batches are sized by its record type: 32 KiB of records, at least
/// 1,024 and at most 8,192 of them; a `batch_size` that is set is kept on every link. (Before
/// 2026-12-07 every link carried 1,024 records a batch: the `u64` case saw 40 batches.)
#[test]
fn default_batches_are_sized_by_the_record_type() {
    fn batches_in<T: Clone + Send + 'static>(batch_size: usize, make: fn(u64) -> T) -> u64 {
        let mut o = Options::default();
        o.batch_size = batch_size;
        // No partial batch goes out early, however slowly the test runs.
        o.linger = Duration::from_secs(3600);
        let p = Pipeline::with_options(o);
        let out = p
            .source("nums", 0..40_960u64)
            .map(make)
            .new_stage()
            .name("hop")
            .map(|x| x)
            .collect();
        let report = p.run().unwrap();
        assert_eq!(out.take().len(), 40_960);
        report.stage("hop").unwrap().batches_in
    }
    assert_eq!(Options::default().batch_size, 0);
    // 8 bytes: 4,096 a batch.
    assert_eq!(batches_in(0, |x| x), 10);
    // 4 bytes: at most 8,192.
    assert_eq!(batches_in(0, |x| x as u32), 5);
    // 40 bytes: at least 1,024.
    assert_eq!(batches_in(0, |x| [x; 5]), 40);
    // Set: kept, whatever the type.
    assert_eq!(batches_in(1000, |x| x), 41);
    assert_eq!(batches_in(4096, |x| [x; 5]), 10);
}
