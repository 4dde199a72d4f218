//! What checkpoints cost, in one criterion group (`checkpoint_overhead`): the keyed window
//! workload of `benches/window.rs` (10 million events, 10,000 keys, a 10 s tumbling sum,
//! parallelism 1, a replayable source) and the NDJSON CLI pipeline of `benches/engine.rs`
//! (filter + select over 256 MiB, parallelism 2, written to a file), each without
//! checkpoints, with one every 1 s and one every 100 ms, to a checkpoint directory on the
//! same disk. The targets (issue #15) are ≥ 0.95× at 1 s and ≥ 0.90× at 100 ms; the ratios
//! are recorded in docs/performance.md.
//!
//! Run with `cargo bench --bench checkpoint`.
// A bench drives the engine from outside with std's threads and atomics: the `crate::sync`
// rule (clippy.toml) is for the engine's own code.
#![allow(clippy::disallowed_types, clippy::disallowed_methods)]
// `criterion_group!` generates an undocumented function.
#![allow(missing_docs)]

use std::hint::black_box;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use millrace::checkpoint::CheckpointOptions;
use millrace::window::{Aggregate, Sum, Tumbling, WindowSpec};
use millrace::{Pipeline, Timestamp};

#[path = "common/window_events.rs"]
mod window_events;
use window_events::{events, mix, Ev, DISORDER_MS, SIZE_MS};

/// The workload's events, as the count a replayable range reads.
const EVENTS: u64 = window_events::EVENTS as u64;

/// The window pipeline, checkpointing every `every` into `dir` (none: no checkpoints).
/// Returns (windows fired, checksum).
fn window_pipeline(data: Arc<Vec<Ev>>, every: Option<Duration>, dir: &Path) -> (u64, f64) {
    let p = Pipeline::new();
    if let Some(every) = every {
        let mut opts = CheckpointOptions::new(dir);
        opts.interval = every;
        opts.start = millrace::checkpoint::Start::Fresh;
        p.checkpoints(opts);
    }
    let spec = WindowSpec::new(Tumbling::new(SIZE_MS, 0).unwrap(), |e: &Ev| Timestamp(e.1))
        .max_out_of_orderness(Duration::from_millis(DISORDER_MS as u64));
    let out = p
        .replayable_source("events", 0..EVENTS)
        .map(move |i| data[i as usize])
        .key_by(|e: &Ev| e.0)
        .checkpointed()
        .window(spec, Sum.on(|e: &Ev| e.2))
        .results()
        .map(|r| r.value)
        .collect();
    let report = p.run().expect("the window pipeline runs");
    if every.is_some() {
        assert!(
            !report.checkpoints.is_empty(),
            "checkpoints were taken: {:?}",
            report.checkpoints
        );
    }
    let v = out.take();
    (v.len() as u64, v.iter().sum())
}

/// 256 MiB of event records, written once under target/ and reused.
fn ndjson_data() -> (PathBuf, u64) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench-data");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("events-256m.ndjson");
    const SIZE: u64 = 256 << 20;
    if let Ok(m) = std::fs::metadata(&path) {
        if m.len() >= SIZE {
            return (path, m.len());
        }
    }
    let mut w = BufWriter::with_capacity(1 << 20, std::fs::File::create(&path).unwrap());
    let kinds = ["click", "view", "view", "scroll", "purchase"];
    let (mut written, mut id) = (0u64, 0u64);
    while written < SIZE {
        let r = mix(id);
        let line = format!(
            "{{\"id\":{id},\"user\":\"user-{}\",\"kind\":\"{}\",\"amount\":{}.{:02},\"country\":\"{}\"}}\n",
            r % 100_000,
            kinds[(r >> 20) as usize % kinds.len()],
            (r >> 30) % 500,
            (r >> 40) % 100,
            ["DE", "FR", "US", "JP", "BR"][(r >> 50) as usize % 5],
        );
        w.write_all(line.as_bytes()).unwrap();
        written += line.len() as u64;
        id += 1;
    }
    w.flush().unwrap();
    (path, written)
}

/// The CLI pipeline's TOML, with a `[checkpoint]` table when `every` is given.
fn ndjson_toml(dir: &Path, data: &Path, every: Option<&str>) -> PathBuf {
    let name = every.unwrap_or("none");
    let toml = dir.join(format!("{name}.toml"));
    let mut text = format!(
        "[stages.read]\nkind=\"ndjson.read\"\npath={:?}\nparallelism=2\n\
         [stages.keep]\nkind=\"filter\"\ninput=\"read\"\nfield=\"kind\"\nop=\"eq\"\nvalue=\"purchase\"\n\
         [stages.slim]\nkind=\"select\"\ninput=\"keep\"\nfields=[\"id\",\"user\",\"amount\"]\n\
         [stages.out]\nkind=\"ndjson.write\"\ninput=\"slim\"\npath={:?}\n",
        data.display().to_string(),
        dir.join(format!("out-{name}.ndjson")).display().to_string()
    );
    if let Some(every) = every {
        text.push_str(&format!(
            "[checkpoint]\ndir={:?}\ninterval=\"{every}\"\n",
            dir.join(format!("chk-{name}")).display().to_string()
        ));
    }
    std::fs::write(&toml, text).unwrap();
    toml
}

fn run_cli(toml: &Path) {
    let st = Command::new(env!("CARGO_BIN_EXE_millrace"))
        .args(["run", "--quiet", "--fresh"])
        .arg(toml)
        .status()
        .unwrap();
    assert!(st.success());
}

fn run_cli_plain(toml: &Path) {
    let st = Command::new(env!("CARGO_BIN_EXE_millrace"))
        .args(["run", "--quiet"])
        .arg(toml)
        .status()
        .unwrap();
    assert!(st.success());
}

fn checkpoint_overhead(c: &mut Criterion) {
    let tmp = tempfile::tempdir().unwrap();
    let data = events();
    let plain = window_pipeline(Arc::clone(&data), None, tmp.path());
    let checked = window_pipeline(
        Arc::clone(&data),
        Some(Duration::from_millis(100)),
        &tmp.path().join("w-check"),
    );
    assert_eq!(plain.0, checked.0, "same windows with checkpoints");
    assert!(
        (plain.1 - checked.1).abs() <= 1e-6 * plain.1.abs(),
        "same sums"
    );

    let mut g = c.benchmark_group("checkpoint_overhead");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(20));
    g.throughput(Throughput::Elements(EVENTS));
    for (name, every) in [
        ("window/none", None),
        ("window/every_1s", Some(Duration::from_secs(1))),
        ("window/every_100ms", Some(Duration::from_millis(100))),
    ] {
        let dir = tmp.path().join(name.replace('/', "-"));
        g.bench_function(name, |b| {
            b.iter(|| black_box(window_pipeline(Arc::clone(&data), every, &dir)))
        });
    }

    let (file, bytes) = ndjson_data();
    g.throughput(Throughput::Bytes(bytes));
    for (name, every) in [
        ("ndjson_cli/none", None),
        ("ndjson_cli/every_1s", Some("1s")),
        ("ndjson_cli/every_100ms", Some("100ms")),
    ] {
        let toml = ndjson_toml(tmp.path(), &file, every);
        g.bench_function(name, |b| {
            b.iter(|| {
                if every.is_some() {
                    run_cli(&toml)
                } else {
                    run_cli_plain(&toml)
                }
            })
        });
    }
    g.finish();
}

criterion_group!(benches, checkpoint_overhead);
criterion_main!(benches);
