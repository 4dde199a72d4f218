//! `ordered`: a parallel stateless stage (or a parallel source) whose output keeps input order.
//! Every test compares with the sequential output exactly, record for record; runs that must
//! fail or stop do so within a deadline (a hang fails the test instead of blocking it).
// A test drives the engine from outside with std's threads and atomics: the `crate::sync` rule
// (clippy.toml) is for the engine's own code.
#![allow(clippy::disallowed_types, clippy::disallowed_methods)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use millrace::{Error, Options, Pipeline};

/// Runs `f` on its own thread; fails the test if it takes longer than a minute (a hang).
fn within<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(60))
        .expect("the run did not end within a minute")
}

/// Small batches (so a run has many), as many records per channel as usual.
fn opts() -> Options {
    let mut o = Options::default();
    o.batch_size = 16;
    o
}

/// Work whose cost depends on the record: every other batch of 16 is ~50× dearer, so the
/// instances finish their batches out of turn.
fn uneven(x: u64) -> u64 {
    let rounds = if (x / 16) % 2 == 0 { 2_000 } else { 40 };
    (0..rounds).fold(x, |h, i| {
        (h ^ i).wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(7)
    })
}

fn checksum(v: &[u64]) -> u64 {
    v.iter().fold(0u64, |h, x| {
        h.rotate_left(5) ^ x.wrapping_mul(0x100_0000_01B3)
    })
}

fn assert_same(got: &[u64], want: &[u64]) {
    assert_eq!(got.len(), want.len(), "record count");
    if let Some(i) = (0..got.len()).find(|&i| got[i] != want[i]) {
        panic!(
            "first difference at record {i}: got {}, want {} (checksums {:x} vs {:x})",
            got[i],
            want[i],
            checksum(got),
            checksum(want)
        );
    }
}

#[test]
fn uneven_map_keeps_order_at_2_and_4() {
    let want: Vec<u64> = (0..20_000u64).map(uneven).collect();
    for n in [2, 4] {
        let got = within(move || {
            let p = Pipeline::with_options(opts());
            let out = p
                .source("n", 0..20_000u64)
                .rebalance(n)
                .ordered()
                .map(uneven)
                .collect();
            p.run().unwrap();
            out.take()
        });
        assert_same(&got, &want);
    }
}

/// A filter that drops whole batches (every third batch of 16 entirely, and odd records
/// elsewhere): an instance that made nothing of a batch still ends its turn.
#[test]
fn filter_dropping_whole_batches_keeps_order() {
    let keep = |x: &u64| (x / 16) % 3 != 1 && (x % 2 == 0 || x % 7 == 0);
    let want: Vec<u64> = (0..30_000u64)
        .map(uneven)
        .zip(0..)
        .filter(|(_, x)| keep(x))
        .map(|(y, _)| y)
        .collect();
    for n in [2, 4] {
        let got = within(move || {
            let p = Pipeline::with_options(opts());
            let out = p
                .source("n", 0..30_000u64)
                .rebalance(n)
                .ordered()
                .filter(keep)
                .map(uneven)
                .collect();
            p.run().unwrap();
            out.take()
        });
        assert_same(&got, &want);
    }
}

/// A flat_map making up to 40 records of one (several output batches of one input batch),
/// and none of some.
#[test]
fn flat_map_multiplying_records_keeps_order() {
    let f = |x: u64| (0..(x % 41)).map(move |k| uneven(x) ^ k);
    let want: Vec<u64> = (0..5_000u64).flat_map(f).collect();
    for n in [2, 4] {
        let got = within(move || {
            let p = Pipeline::with_options(opts());
            let out = p
                .source("n", 0..5_000u64)
                .rebalance(n)
                .ordered()
                .flat_map(f)
                .collect();
            p.run().unwrap();
            out.take()
        });
        assert_same(&got, &want);
    }
}

/// The order reaches a stage after the ordered one, through the merge (not only a sink), and
/// every output of a fan-out.
#[test]
fn order_reaches_the_next_stage_and_each_copy_of_a_split() {
    let want: Vec<u64> = (0..10_000u64).map(uneven).map(|x| x >> 3).collect();
    let (a, b) = within(|| {
        let p = Pipeline::with_options(opts());
        let mut copies = p
            .source("n", 0..10_000u64)
            .rebalance(3)
            .ordered()
            .map(uneven)
            .split(2)
            .into_iter();
        let a = copies.next().unwrap().map(|x| x >> 3).collect();
        let b = copies.next().unwrap().new_stage().map(|x| x >> 3).collect();
        p.run().unwrap();
        (a.take(), b.take())
    });
    assert_same(&a, &want);
    assert_same(&b, &want);
}

/// A source shorter than one batch per instance, an empty one, and one whose last batch is
/// partial.
#[test]
fn sources_that_end_early() {
    for (len, n) in [(3u64, 4usize), (0, 2), (16 * 5 + 7, 4), (16, 4)] {
        let want: Vec<u64> = (0..len).map(uneven).collect();
        let got = within(move || {
            let p = Pipeline::with_options(opts());
            let out = p
                .source("n", 0..len)
                .rebalance(n)
                .ordered()
                .map(uneven)
                .collect();
            p.run().unwrap();
            out.take()
        });
        assert_same(&got, &want);
    }
}

/// A consumer that stops early: a `limit` after the merge gets the first records of the
/// sequential output, and the endless source upstream stops.
#[test]
fn a_limit_after_the_merge_takes_the_first_records() {
    let want: Vec<u64> = (0..5_000u64).map(uneven).collect();
    for n in [2, 4] {
        let got = within(move || {
            let p = Pipeline::with_options(opts());
            let out = p
                .source("endless", 0u64..)
                .rebalance(n)
                .ordered()
                .map(uneven)
                .new_stage()
                .limit(5_000)
                .collect();
            p.run().unwrap();
            out.take()
        });
        assert_same(&got, &want);
    }
}

/// An error in one instance fails the run naming the step; nothing hangs.
#[test]
fn an_error_in_one_instance_fails_the_run_naming_the_stage() {
    for n in [2, 4] {
        let err = within(move || {
            let p = Pipeline::with_options(opts());
            p.source("n", 0..100_000u64)
                .rebalance(n)
                .ordered()
                .map(uneven)
                .try_map(|x| {
                    if x % 1_000 == 999 {
                        Err("bad record")
                    } else {
                        Ok(x)
                    }
                })
                .name("check")
                .collect();
            p.run().unwrap_err()
        });
        assert_eq!(err.stage(), Some("check"), "{err}");
        assert!(err.to_string().contains("bad record"), "{err}");
    }
}

/// A panic in one instance fails the run with the panic, naming the stage.
#[test]
fn a_panic_in_one_instance_fails_the_run() {
    let err = within(|| {
        let p = Pipeline::with_options(opts());
        p.source("n", 0..100_000u64)
            .rebalance(4)
            .ordered()
            .map(|x| {
                if x == 4_321 {
                    panic!("kaboom")
                } else {
                    uneven(x)
                }
            })
            .name("boom")
            .collect();
        p.run().unwrap_err()
    });
    match err {
        Error::Panic { stage, message } => {
            assert!(stage.contains("boom"), "{stage}");
            assert!(message.contains("kaboom"), "{message}");
        }
        other => panic!("expected the panic, got {other}"),
    }
}

/// Cancelling an ordered run of an endless source (once records flow) ends it promptly.
#[test]
fn cancellation_ends_an_ordered_run() {
    let result = within(|| {
        let p = Pipeline::with_options(opts());
        let handle = p.cancel_handle();
        let seen = Arc::new(AtomicU64::new(0));
        let s2 = Arc::clone(&seen);
        // In order: the sink sees 0, 1, 2, ... (checked while it runs).
        let next = Arc::new(AtomicU64::new(0));
        let n2 = Arc::clone(&next);
        p.source("endless", 0u64..)
            .rebalance(4)
            .ordered()
            .map(|x| (x, uneven(x)))
            .for_each(move |(x, _)| {
                assert_eq!(x, n2.fetch_add(1, Ordering::SeqCst), "out of order");
                s2.fetch_add(1, Ordering::SeqCst);
            });
        let canceller = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(30);
            while seen.load(Ordering::SeqCst) < 10_000 && Instant::now() < deadline {
                std::thread::yield_now();
            }
            handle.cancel();
        });
        let r = p.run();
        canceller.join().unwrap();
        (r, next.load(Ordering::SeqCst))
    });
    assert!(matches!(result.0, Err(Error::Cancelled)), "{:?}", result.0);
    assert!(result.1 >= 10_000, "{} records before the cancel", result.1);
}

/// `source_split(..).ordered()`: the parts' stripes read in turn are the data's order.
#[test]
fn an_ordered_split_source_keeps_the_data_order() {
    let data: Vec<u64> = (0..20_000).collect();
    let want: Vec<u64> = data
        .iter()
        .copied()
        .filter(|x| x % 5 != 0)
        .map(uneven)
        .collect();
    for n in [2, 4] {
        let data = data.clone();
        let got = within(move || {
            let p = Pipeline::with_options(opts());
            let out = p
                .source_split("data", data, n)
                .ordered()
                .filter(|x| x % 5 != 0)
                .map(uneven)
                .collect();
            p.run().unwrap();
            out.take()
        });
        assert_same(&got, &want);
    }
}

/// `parallel_source(..).ordered()`: a batch (16 records) of each part in turn; a part that ends
/// leaves the turn.
#[test]
fn an_ordered_parallel_source_reads_a_batch_of_each_part_in_turn() {
    // Part `i` of 3 yields `1000 * i + 0 .. 1000 * i + len(i)`, of different lengths.
    let len = |part: usize| [100u64, 37, 250][part];
    let parts: Vec<Vec<u64>> = (0..3)
        .map(|i| (0..len(i)).map(|k| 1_000 * i as u64 + k).collect())
        .collect();
    let mut want = Vec::new();
    for b in 0.. {
        let mut any = false;
        for part in &parts {
            let chunk: Vec<u64> = part.iter().skip(16 * b).take(16).copied().collect();
            any |= !chunk.is_empty();
            want.extend(chunk.into_iter().map(uneven));
        }
        if !any {
            break;
        }
    }
    let got = within(move || {
        let p = Pipeline::with_options(opts());
        let out = p
            .parallel_source("parts", 3, move |part, _| {
                (0..len(part)).map(move |k| 1_000 * part as u64 + k)
            })
            .ordered()
            .map(uneven)
            .collect();
        p.run().unwrap();
        out.take()
    });
    assert_same(&got, &want);
}

/// Unordered, the same pipeline gives the same records in another order: the uneven cost
/// really makes the instances finish out of turn (so the tests above test something).
#[test]
fn without_ordered_the_instances_finish_out_of_turn() {
    let want: Vec<u64> = (0..20_000u64).map(uneven).collect();
    let got = within(|| {
        let p = Pipeline::with_options(opts());
        let out = p
            .source("n", 0..20_000u64)
            .rebalance(2)
            .map(uneven)
            .collect();
        p.run().unwrap();
        out.take()
    });
    assert_ne!(got, want, "the unordered output happened to be in order");
    let (mut a, mut b) = (got, want);
    a.sort_unstable();
    b.sort_unstable();
    assert_eq!(a, b);
}

/// What cannot be ordered is a build error naming the stage.
#[test]
fn ordering_what_has_no_order_is_a_build_error() {
    // Fed by several instances: no one input order.
    let p = Pipeline::new();
    p.source_split("data", vec![1u64, 2, 3], 2)
        .rebalance(2)
        .ordered()
        .map(|x| x + 1)
        .name("inc")
        .collect();
    let e = p.run().unwrap_err().to_string();
    assert!(
        e.contains("stage `inc` is ordered") && e.contains("2 instances"),
        "{e}"
    );

    // Merged with another stream.
    let p = Pipeline::new();
    let other = p.source("other", vec![0u64]);
    p.source("n", vec![1u64, 2])
        .rebalance(2)
        .ordered()
        .map(|x| x + 1)
        .name("inc")
        .union(other)
        .collect();
    let e = p.run().unwrap_err().to_string();
    assert!(
        e.contains("stage `inc` is ordered") && e.contains("union"),
        "{e}"
    );

    // A keyed aggregation's output has no input order to keep.
    let p = Pipeline::new();
    p.source("n", vec![1u64, 2])
        .key_by(|x| *x)
        .parallelism(2)
        .count()
        .ordered()
        .map(|(k, c)| k + c)
        .name("sum")
        .collect();
    let e = p.run().unwrap_err().to_string();
    assert!(e.contains("is ordered, but only a stage fed by"), "{e}");
}

/// Runs a TOML pipeline reading `n` NDJSON records `{"i": i, "v": i % 7}` through `middle`
/// (whose last stage is `last`); returns the `i` of every output record, in output order.
fn run_toml(n: u64, read_extra: &str, middle: &str) -> Vec<u64> {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let inp = dir.path().join("in.ndjson");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&inp).unwrap());
    for i in 0..n {
        writeln!(f, "{{\"i\": {i}, \"v\": {}}}", i % 7).unwrap();
    }
    drop(f);
    let out = dir.path().join("out.ndjson");
    let text = format!(
        "[options]\nbatch_size = 16\n[stages.read]\nkind = \"ndjson.read\"\npath = {:?}\n{read_extra}\n{middle}\n[stages.out]\nkind = \"ndjson.write\"\ninput = \"last\"\npath = {:?}\n",
        inp.display().to_string(),
        out.display().to_string()
    );
    let spec = millrace::config::PipelineSpec::from_str(&text, dir.path().join("p.toml")).unwrap();
    within(move || spec.build().unwrap().run().map(|_| ()).unwrap());
    std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["i"]
                .as_u64()
                .unwrap()
        })
        .collect()
}

/// `ordered = true` in a pipeline file: a filter on four threads (and a select fused with it)
/// keeps the file's order; so does an ordered `ndjson.read` parsing on four threads.
#[test]
fn toml_ordered_stages_keep_the_file_order() {
    let n = 20_000;
    let want: Vec<u64> = (0..n).filter(|i| i % 7 != 3).collect();
    let middle = "[stages.f]\nkind = \"filter\"\ninput = \"read\"\nfield = \"v\"\nop = \"ne\"\nvalue = 3\nparallelism = 4\nordered = true\n[stages.last]\nkind = \"select\"\ninput = \"f\"\nfields = [\"i\"]\nparallelism = 4\n";
    assert_eq!(run_toml(n, "", middle), want);
    let middle = "[stages.last]\nkind = \"filter\"\ninput = \"read\"\nfield = \"v\"\nop = \"ne\"\nvalue = 3\n";
    let got = run_toml(n, "parallelism = 4\nordered = true\n", middle);
    assert_eq!(got, want);
}

/// `ordered` where it means nothing is an error naming the stage, the file and the line.
#[test]
fn toml_ordered_elsewhere_is_an_error_naming_stage_and_line() {
    let text = |stage: &str| {
        format!(
            "[stages.read]\nkind = \"lines.read\"\npath = \"-\"\n{stage}\n[stages.out]\nkind = \"ndjson.write\"\ninput = \"s\"\npath = \"-\"\n"
        )
    };
    for (stage, says) in [
        (
            "[stages.s]\nkind = \"filter\"\ninput = \"read\"\nfield = \"line\"\nop = \"exists\"\nordered = true\n",
            "needs parallelism > 1",
        ),
        (
            "[stages.s]\nkind = \"count\"\ninput = \"read\"\nkey = \"line\"\nparallelism = 2\nordered = true\n",
            "not to a `count` stage",
        ),
        (
            "[stages.s]\nkind = \"filter\"\ninput = \"read\"\nfield = \"line\"\nop = \"exists\"\nparallelism = 2\nordered = \"yes\"\n",
            "boolean",
        ),
    ] {
        let e = millrace::config::PipelineSpec::from_str(&text(stage), "/tmp/p.toml").unwrap_err();
        assert_eq!(e.stage(), Some("s"), "{e}");
        // The `[stages.s]` header is line 4; `ordered` is its table's last line.
        let ordered_line = 4 + stage.lines().count() - 1;
        assert_eq!(e.line, Some(ordered_line), "{e}");
        let msg = e.to_string();
        assert!(msg.contains(says) && msg.contains("/tmp/p.toml"), "{msg}");
    }
}
