//! Hot reload's cost (`cargo bench --bench reload`): a reloadable stage with no reloads next to
//! the same stage built non-reloadable, the same during one reload per second, and the latency
//! from a file write to the new version going live. Results in `docs/performance.md`.
//!
//! Stages measured: a native plugin node (the tagger, built by this bench), an `exec` stage
//! running `cat`, and a `filter`. Each pipeline reads 2 million records from a file and writes
//! to /dev/null.
// A bench drives the engine from outside with std's threads and atomics: the `crate::sync`
// rule (clippy.toml) is for the engine's own code.
#![allow(clippy::disallowed_types, clippy::disallowed_methods)]
// `criterion_group!` generates an undocumented function.
#![allow(missing_docs)]

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use millrace::config::PipelineSpec;

/// The allocator `millrace run` uses, so that these numbers are those of the command.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const RECORDS: u64 = 2_000_000;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The input file, generated once under `target/bench-data`.
fn data() -> PathBuf {
    let dir = root().join("target/bench-data");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("reload-2m.ndjson");
    if !path.exists() {
        let tmp = path.with_extension("tmp");
        let mut w = BufWriter::new(std::fs::File::create(&tmp).unwrap());
        for i in 0..RECORDS {
            writeln!(
                w,
                "{{\"seq\":{i},\"user\":\"user-{}\",\"kind\":\"click\",\"amount\":{}.5}}",
                i % 9973,
                i % 500
            )
            .unwrap();
        }
        w.flush().unwrap();
        std::fs::rename(&tmp, &path).unwrap();
    }
    path
}

/// A plugin directory holding the tagger, built in release mode for this bench.
fn plugins(dir: &Path) -> PathBuf {
    let status = Command::new(env!("CARGO"))
        .current_dir(root())
        .args(["build", "--release", "--quiet", "-p", "millrace-tagger"])
        .status()
        .unwrap();
    assert!(status.success());
    let lib = root().join("target/release/libmillrace_tagger.so");
    let plugin = dir.join("plugins/tagger");
    std::fs::create_dir_all(&plugin).unwrap();
    let manifest = std::fs::read_to_string(root().join("plugins/tagger/plugin.toml")).unwrap();
    let manifest: String = manifest
        .lines()
        .map(|l| match l.starts_with("entry = ") {
            true => format!("entry = {:?}", lib.display().to_string()),
            false => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(plugin.join("plugin.toml"), manifest).unwrap();
    dir.join("plugins")
}

/// `read -> <stage> -> out`, the stage's changing value set to `v`.
fn config(plugins: &Path, input: &Path, stage: &str, v: u32) -> String {
    let middle = match stage {
        "native" => format!("kind = \"tagger.tag\"\nvalue = \"v{v}\""),
        // `env` changes the version without changing what cat does.
        "exec" => format!("kind = \"exec\"\ncommand = [\"cat\"]\nenv = {{ V = \"{v}\" }}"),
        "filter" => format!("kind = \"filter\"\nfield = \"amount\"\nop = \"ge\"\nvalue = {v}"),
        other => unreachable!("{other}"),
    };
    format!(
        "plugin_dirs = [{:?}]\n[stages.read]\nkind = \"ndjson.read\"\npath = {:?}\n[stages.s]\ninput = \"read\"\n{middle}\n[stages.out]\nkind = \"ndjson.write\"\ninput = \"s\"\npath = \"/dev/null\"\n",
        plugins.display().to_string(),
        input.display().to_string()
    )
}

fn reload(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let plugins = plugins(dir.path());
    let input = data();
    let file = dir.path().join("p.toml");
    let mut g = c.benchmark_group("reload");
    g.throughput(Throughput::Elements(RECORDS));
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(15));
    for stage in ["native", "exec", "filter"] {
        std::fs::write(&file, config(&plugins, &input, stage, 0)).unwrap();
        g.bench_function(BenchmarkId::new("fixed", stage), |b| {
            b.iter(|| {
                let spec = PipelineSpec::from_file(&file).unwrap();
                spec.build().unwrap().run().unwrap();
            })
        });
        g.bench_function(BenchmarkId::new("reloadable", stage), |b| {
            b.iter(|| {
                let spec = PipelineSpec::from_file(&file).unwrap();
                let (p, _handle) = spec.build_reloadable().unwrap();
                p.run().unwrap();
            })
        });
        // One reload per second of benchmark time: the schedule runs across iterations, so
        // runs shorter than a second see their share of reloads too.
        let next = Mutex::new(Instant::now() + Duration::from_secs(1));
        let mut v = 0u32;
        let reloads = AtomicU64::new(0);
        g.bench_function(BenchmarkId::new("reloading_every_second", stage), |b| {
            b.iter(|| {
                std::fs::write(&file, config(&plugins, &input, stage, v % 2)).unwrap();
                let spec = PipelineSpec::from_file(&file).unwrap();
                let (p, handle) = spec.build_reloadable().unwrap();
                let done = AtomicBool::new(false);
                std::thread::scope(|s| {
                    s.spawn(|| {
                        while !done.load(Ordering::Acquire) {
                            let mut at = next.lock().unwrap();
                            if Instant::now() >= *at {
                                v += 1;
                                std::fs::write(&file, config(&plugins, &input, stage, v % 2))
                                    .unwrap();
                                handle.reload().unwrap();
                                reloads.fetch_add(1, Ordering::Relaxed);
                                *at += Duration::from_secs(1);
                            }
                            drop(at);
                            std::thread::sleep(Duration::from_millis(5));
                        }
                    });
                    p.run().unwrap();
                    done.store(true, Ordering::Release);
                });
            })
        });
        eprintln!(
            "reload/reloading_every_second/{stage}: {} reloads during the measurement",
            reloads.load(Ordering::Relaxed)
        );
    }
    g.finish();
}

/// From writing the file to the new version being live: through `ReloadHandle::reload`
/// (parse, check, build, publish), and through the watcher (plus its 50 ms debounce).
fn latency(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let plugins = plugins(dir.path());
    let fifo = dir.path().join("in.fifo");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let file = dir.path().join("p.toml");
    std::fs::write(&file, config(&plugins, &fifo, "native", 0)).unwrap();
    let mut g = c.benchmark_group("reload_latency");
    g.sample_size(20);
    std::thread::scope(|s| {
        // The pipeline is built and run on a thread of its own (it is not `Send`); it reads a
        // FIFO kept open, with no records, until the measurements are done.
        let (handle_tx, handle_rx) = std::sync::mpsc::channel();
        let file2 = file.clone();
        s.spawn(move || {
            let spec = PipelineSpec::from_file(&file2).unwrap();
            let (p, handle) = spec.build_reloadable().unwrap();
            handle_tx.send(handle).unwrap();
            p.run().unwrap();
        });
        let input = std::fs::File::create(&fifo).unwrap();
        let handle = handle_rx.recv().unwrap();
        let mut v = 0;
        g.bench_function("api", |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    v += 1;
                    std::fs::write(&file, config(&plugins, &fifo, "native", v)).unwrap();
                    let t = Instant::now();
                    handle.reload().unwrap();
                    total += t.elapsed();
                }
                total
            })
        });
        let watcher = handle.watch(Duration::from_millis(50)).unwrap();
        g.bench_function("watch_debounce_50ms", |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    v += 1;
                    let before = handle.version();
                    let t = Instant::now();
                    std::fs::write(&file, config(&plugins, &fifo, "native", v)).unwrap();
                    while handle.version() == before {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    total += t.elapsed();
                }
                total
            })
        });
        drop(watcher);
        g.finish();
        drop(input); // end of input: the pipeline ends
    });
}

criterion_group!(benches, reload, latency);
criterion_main!(benches);
