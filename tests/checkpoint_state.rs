//! The public face of checkpointable state: the checkpointed aggregations give the results of
//! the plain ones, replayable sources read what iterators read, the directory sink's parts
//! and its refusal of an earlier run's parts, the file sink's truncation of a fresh run, and
//! the TOML `ndjson.write dir`. (Snapshot and restore of every hook are tested against an
//! uninterrupted run in `src/stream/checkpoint_tests.rs`; barriers end to end come with the
//! coordinator.)

use std::collections::BTreeMap;
use std::path::Path;

use millrace::window::{Aggregate, Count, Session, Sum, Tumbling, WindowSpec};
use millrace::{Pipeline, ReplayVec, Timestamp};

fn words() -> Vec<String> {
    (0..5000u32)
        .map(|i| format!("w{}", (i * 7919) % 113))
        .collect()
}

#[test]
fn checkpointed_aggregations_give_the_plain_results() {
    for p in [1, 3] {
        let plain = Pipeline::new();
        let c1 = plain
            .source("w", words())
            .key_by(|w| w.clone())
            .parallelism(p)
            .count()
            .collect();
        let f1 = plain
            .source("w2", words())
            .key_by(|w| w.len())
            .parallelism(p)
            .fold(0u64, |a, w| *a += w.len() as u64)
            .collect();
        let r1 = plain
            .source("w3", words())
            .key_by(|w| w.as_bytes()[1])
            .parallelism(p)
            .reduce(|a, b| a.max(b))
            .collect();
        plain.run().unwrap();

        let cp = Pipeline::new();
        let c2 = cp
            .source("w", words())
            .key_by(|w| w.clone())
            .checkpointed()
            .parallelism(p)
            .count()
            .collect();
        let f2 = cp
            .source("w2", words())
            .key_by(|w| w.len())
            .checkpointed()
            .parallelism(p)
            .fold(0u64, |a, w| *a += w.len() as u64)
            .collect();
        let r2 = cp
            .source("w3", words())
            .key_by(|w| w.as_bytes()[1])
            .checkpointed()
            .parallelism(p)
            .reduce(|a, b| a.max(b))
            .collect();
        cp.run().unwrap();
        fn sorted<T: Ord>(mut v: Vec<T>) -> Vec<T> {
            v.sort();
            v
        }
        let counts = sorted(c1.take());
        assert_eq!(counts.len(), 113);
        assert_eq!(counts.iter().map(|(_, n)| n).sum::<u64>(), 5000);
        assert_eq!(counts, sorted(c2.take()), "p={p}");
        assert_eq!(sorted(f1.take()), sorted(f2.take()), "p={p}");
        assert_eq!(sorted(r1.take()), sorted(r2.take()), "p={p}");
    }
}

#[test]
fn a_checkpointed_window_gives_the_plain_results() {
    let events: Vec<(u8, i64, f64)> = (0..3000i64)
        .map(|i| ((i % 5) as u8, i * 3 - (i % 7) * 11, (i % 13) as f64))
        .collect();
    let mut opts = millrace::Options::default();
    opts.watermark_every = 16;
    let run = |checkpointed: bool, session: bool| {
        let p = Pipeline::with_options(opts.clone());
        let time = |e: &(u8, i64, f64)| Timestamp(e.1);
        let keyed = p.source("e", events.clone()).key_by(|e| e.0);
        let late;
        let results;
        if session {
            let spec = WindowSpec::new(Session::new(5).unwrap(), time)
                .allowed_lateness(std::time::Duration::from_millis(20));
            let w = if checkpointed {
                keyed.checkpointed().window(spec, Count)
            } else {
                keyed.window(spec, Count)
            };
            let (r, l) = w.with_late();
            results = r
                .map(|r| format!("{} {:?} {} {}", r.key, r.window, r.value, r.update))
                .collect();
            late = l.map(|l| l.time.0).collect();
        } else {
            let spec = WindowSpec::new(Tumbling::new(100, 0).unwrap(), time);
            let agg = Sum.on(|e: &(u8, i64, f64)| e.2);
            let w = if checkpointed {
                keyed.checkpointed().window(spec, agg)
            } else {
                keyed.window(spec, agg)
            };
            let (r, l) = w.with_late();
            results = r
                .map(|r| format!("{} {:?} {} {}", r.key, r.window, r.value, r.update))
                .collect();
            late = l.map(|l| l.time.0).collect();
        }
        p.run().unwrap();
        let mut r = results.take();
        r.sort();
        (r, late.take())
    };
    for session in [false, true] {
        let (r1, l1) = run(false, session);
        let (r2, l2) = run(true, session);
        assert!(
            !r1.is_empty() && !l1.is_empty(),
            "the data has results and late records"
        );
        assert_eq!(r1, r2, "session={session}");
        assert_eq!(l1, l2, "session={session}");
    }
}

#[test]
fn a_checkpointed_sort_sorts() {
    let p = Pipeline::new();
    let out = p
        .source("w", words())
        .checkpointed_sort_by(|a, b| b.cmp(a))
        .collect();
    p.run().unwrap();
    let mut want = words();
    want.sort_by(|a, b| b.cmp(a));
    assert_eq!(out.take(), want);
}

#[test]
fn replayable_sources_read_what_iterators_read() {
    let p = Pipeline::new();
    let a = p
        .replayable_source("range", 0..10_000u64)
        .map(|x| x * 2)
        .collect();
    let b = p
        .replayable_source("vec", ReplayVec::from(words()))
        .collect();
    let c = p.replayable_source("neg", -5..5i32).collect();
    p.run().unwrap();
    assert_eq!(a.take(), (0..10_000u64).map(|x| x * 2).collect::<Vec<_>>());
    assert_eq!(b.take(), words());
    assert_eq!(c.take(), (-5..5).collect::<Vec<_>>());
}

/// Every file of `dir`, name → contents.
fn files(dir: &Path) -> BTreeMap<String, String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read_to_string(e.path()).unwrap(),
            )
        })
        .collect()
}

#[test]
fn a_directory_sink_writes_one_part_per_instance_and_refuses_an_earlier_runs_parts() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    // Small batches, so that the round robin hands both instances some.
    let mut opts = millrace::Options::default();
    opts.batch_size = 10;
    let p = Pipeline::with_options(opts);
    p.source("n", 0..1000u32)
        .rebalance(2)
        .map(|x| x + 1)
        .write_ndjson_dir(&out)
        .name("parts");
    let report = p.run().unwrap();
    assert_eq!(report.stage("parts").unwrap().records_out, 1000);
    let parts = files(&out);
    assert_eq!(
        parts.keys().collect::<Vec<_>>(),
        ["part-00000-000000.ndjson", "part-00001-000000.ndjson"]
    );
    let mut all: Vec<u32> = parts
        .values()
        .flat_map(|t| t.lines().map(|l| l.parse::<u32>().unwrap()))
        .collect();
    all.sort();
    assert_eq!(all, (1..=1000).collect::<Vec<_>>());

    // Again into the same directory: refused, naming the sink and the directory; nothing
    // changed.
    let p = Pipeline::new();
    p.source("n", 0..10u32).write_ndjson_dir(&out).name("parts");
    let e = p.run().unwrap_err();
    assert_eq!(e.stage(), Some("parts"));
    let msg = e.to_string();
    assert!(
        msg.contains("earlier run") && msg.contains("part-00000-000000.ndjson"),
        "{msg}"
    );
    assert_eq!(files(&out), parts);

    // Lines into an empty (new) directory.
    let lines = tmp.path().join("lines");
    let p = Pipeline::new();
    p.source("n", vec!["a", "b"]).write_lines_dir(&lines);
    p.run().unwrap();
    assert_eq!(
        files(&lines),
        BTreeMap::from([("part-00000-000000.txt".to_string(), "a\nb\n".to_string())])
    );
}

#[test]
fn a_file_sink_of_a_fresh_run_replaces_the_old_contents() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("out.txt");
    std::fs::write(
        &path,
        "a much longer line left by an earlier run\n".repeat(100),
    )
    .unwrap();
    let p = Pipeline::new();
    p.source("n", 1..=3u32).write_lines(&path);
    p.run().unwrap();
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "1\n2\n3\n");
    // No record at all: empty, as a truncating open left it before.
    let p = Pipeline::new();
    p.source("n", Vec::<u32>::new()).write_ndjson(&path);
    p.run().unwrap();
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "");
}

#[test]
fn toml_ndjson_write_takes_a_directory_or_a_path_not_both() {
    use millrace::config::PipelineSpec;
    let tmp = tempfile::tempdir().unwrap();
    let inp = tmp.path().join("in.ndjson");
    std::fs::write(&inp, "{\"k\":\"a\"}\n{\"k\":\"b\"}\n{\"k\":\"a\"}\n").unwrap();
    let text = format!(
        "[stages.read]\nkind=\"ndjson.read\"\npath={:?}\n[stages.count]\nkind=\"count\"\ninput=\"read\"\nkey=\"k\"\n[stages.out]\nkind=\"ndjson.write\"\ninput=\"count\"\ndir=\"out\"\n",
        inp.display().to_string()
    );
    PipelineSpec::from_str(&text, tmp.path().join("p.toml"))
        .unwrap()
        .build()
        .unwrap()
        .run()
        .unwrap();
    assert_eq!(
        files(&tmp.path().join("out")),
        BTreeMap::from([(
            "part-00000-000000.ndjson".to_string(),
            "{\"count\":2,\"k\":\"a\"}\n{\"count\":1,\"k\":\"b\"}\n".to_string()
        )])
    );
    let both = text.replace("dir=\"out\"", "dir=\"out\"\npath=\"x.ndjson\"");
    let e = PipelineSpec::from_str(&both, tmp.path().join("p.toml"))
        .and_then(|s| s.build().map(|_| ()))
        .unwrap_err();
    assert_eq!(e.stage(), Some("out"));
    assert!(e.to_string().contains("not both"), "{e}");
}
