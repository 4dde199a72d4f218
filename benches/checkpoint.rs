//! What checkpoints cost, in one criterion group (`checkpoint_overhead`): the keyed window
//! workload of `benches/window.rs` continued to 200 million events (10,000 keys, a 10 s
//! tumbling sum, parallelism 1, a replayable source: a run of about 3 s) and the NDJSON CLI
//! pipeline of `benches/engine.rs` (filter + select over 256 MiB, parallelism 2, written to a
//! file), each without checkpoints, with one every 1 s and one every 100 ms, to a checkpoint
//! directory on the same disk. The targets (issue #15) are ≥ 0.95× at 1 s and ≥ 0.90× at
//! 100 ms. In the same group, `recovery_1gb`: the time to resume a job with about 1.1 GB of
//! keyed state up to its first record, next to reading as many bytes from a file on the same
//! disk, both cold. The numbers are recorded in docs/performance.md.
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
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use millrace::checkpoint::CheckpointOptions;
use millrace::window::{Aggregate, Sum, Tumbling, WindowSpec};
use millrace::{Pipeline, Timestamp};

#[path = "common/window_events.rs"]
mod window_events;
use window_events::{event, mix, Ev, DISORDER_MS, SIZE_MS};

/// The window workload's events: 20 times `benches/window.rs`'s 10 M (the same pattern,
/// continued), so that a run lasts several seconds and "every 1 s" takes periodic
/// checkpoints, not only the final one. Generated as the source reads them (200 M events
/// would not fit in memory beside the others' builds).
const EVENTS: u64 = 20 * window_events::EVENTS as u64;

/// The window pipeline, checkpointing every `every` into `dir` (none: no checkpoints).
/// Returns (windows fired, checksum, periodic checkpoints completed).
fn window_pipeline(every: Option<Duration>, dir: &Path) -> (u64, f64, usize) {
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
        .map(event)
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
    (v.len() as u64, v.iter().sum(), report.checkpoints.len())
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
    let plain = window_pipeline(None, tmp.path());
    let checked = window_pipeline(
        Some(Duration::from_millis(100)),
        &tmp.path().join("w-check"),
    );
    assert_eq!(plain.0, checked.0, "same windows with checkpoints");
    assert!(
        (plain.1 - checked.1).abs() <= 1e-6 * plain.1.abs(),
        "same sums"
    );
    // A 3 s run at 100 ms: periodic checkpoints, not only the final one.
    assert!(checked.2 >= 5, "checkpoints taken: {}", checked.2);
    eprintln!("window run every 100 ms: {} checkpoints", checked.2);

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
        g.bench_function(name, |b| b.iter(|| black_box(window_pipeline(every, &dir))));
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

    recovery(&mut g);
    g.finish();
}

// ---- recovery time of 1 GB of keyed state ----

/// Keys of the recovery job's state.
const STATE_KEYS: u64 = 100_000;
/// Values per key: 1,250 u64s, about 11 KB of MessagePack each (full-width values take 9
/// bytes), so 100,000 keys hold about 1.1 GB encoded.
const STATE_VALUES: u64 = 1_250;
/// The state the job must have checkpointed before it is stopped (encoded bytes).
const STATE_BYTES: u64 = 1 << 30;

/// What makes a record of the recovery job end its run: the first job stops once a
/// checkpoint of ≥ 1 GB is complete, a resumed one at its first record.
const STOP: &str = "millrace-bench: stop";

/// The first record a resumed job's aggregate folded, when.
static FIRST_FOLD: std::sync::Mutex<Option<std::time::Instant>> = std::sync::Mutex::new(None);

/// `dir`'s newest complete checkpoint (the highest-numbered `chk-N` with a MANIFEST).
fn newest_complete(dir: &Path) -> Option<PathBuf> {
    let mut chks: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("MANIFEST").exists())
        .collect();
    // `chk-` and 8 digits or more: longer names are higher numbers.
    chks.sort_by_key(|p| (p.as_os_str().len(), p.clone()));
    chks.pop()
}

/// Bytes of `*.state` files in `dir`'s newest complete checkpoint (0: none complete).
fn complete_state_bytes(dir: &Path) -> u64 {
    newest_complete(dir).map_or(0, |chk| {
        state_files(&chk)
            .iter()
            .map(|f| std::fs::metadata(f).map(|m| m.len()).unwrap_or(0))
            .sum()
    })
}

fn state_files(chk: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(chk)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "state"))
                .collect()
        })
        .unwrap_or_default()
}

/// The recovery job: a replayable range whose first `STATE_KEYS` records each fill one key
/// with `STATE_VALUES` values under `.checkpointed().fold`, and whose later records only
/// count (so the state stays the size it has). Its first run (`resume` false) checkpoints
/// every second and stops, with a panic, once a complete checkpoint holds ≥ 1 GB; a resumed
/// run stops at the first record its aggregate folds, having noted when in `FIRST_FOLD`.
fn recovery_job(dir: &Path, resume: bool) -> Pipeline {
    let p = Pipeline::new();
    let mut opts = CheckpointOptions::new(dir);
    opts.start = if resume {
        millrace::checkpoint::Start::Resume
    } else {
        millrace::checkpoint::Start::Fresh
    };
    // A resumed run takes no checkpoint before it stops.
    opts.interval = if resume {
        Duration::from_secs(3600)
    } else {
        Duration::from_secs(1)
    };
    opts.timeout = Duration::from_secs(600);
    opts.retain = 1;
    p.checkpoints(opts);
    let watch = dir.to_path_buf();
    let started = std::time::Instant::now();
    p.replayable_source("fill", 0..u64::MAX / 2)
        .map(move |i| {
            if !resume && i >= STATE_KEYS && i % (1 << 16) == 0 {
                if complete_state_bytes(&watch) >= STATE_BYTES {
                    panic!("{STOP}");
                }
                assert!(
                    started.elapsed() < Duration::from_secs(600),
                    "no 1 GB checkpoint within 10 minutes"
                );
            }
            (i % STATE_KEYS, i < STATE_KEYS)
        })
        .key_by(|r: &(u64, bool)| r.0)
        .checkpointed()
        .fold((0u64, Vec::<u64>::new()), move |a, (k, fill)| {
            if resume {
                *FIRST_FOLD.lock().unwrap() = Some(std::time::Instant::now());
                panic!("{STOP}");
            }
            if fill {
                a.1.extend((0..STATE_VALUES).map(|j| mix(k * STATE_VALUES + j) | 1 << 63));
            } else {
                a.0 += 1;
            }
        })
        .for_each(|_| {});
    p
}

/// Drops `path`'s pages from the page cache (`POSIX_FADV_DONTNEED`: clean pages only, and
/// every file here was fsynced or synced), so that the next read of it comes from the disk.
fn drop_cache(path: &Path) {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).unwrap();
    f.sync_all().unwrap();
    // SAFETY: a plain syscall on a descriptor this function owns for the call's duration.
    let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(rc, 0, "posix_fadvise");
}

/// The time to resume the job from its 1 GB checkpoint up to its first folded record, next
/// to reading 1 GB from the same disk; both read cold (their pages dropped before each
/// iteration), throughput in bytes of state.
fn recovery(g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>) {
    let base = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench-data");
    std::fs::create_dir_all(&base).unwrap();
    let tmp = tempfile::tempdir_in(&base).unwrap();
    let dir = tmp.path().join("recovery-chk");

    // Setup, once: run the job until a complete checkpoint holds 1 GB.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let stop = info
            .payload()
            .downcast_ref::<String>()
            .is_some_and(|m| m == STOP);
        if !stop {
            hook(info)
        }
    }));
    let t = std::time::Instant::now();
    let err = recovery_job(&dir, false).run().expect_err("the job stops");
    assert!(err.to_string().contains(STOP), "{err}");
    let state = complete_state_bytes(&dir);
    assert!(state >= STATE_BYTES, "checkpointed {state} bytes");
    eprintln!(
        "recovery: checkpointed {:.2} GB of keyed state in {:.1?}",
        state as f64 / 1e9,
        t.elapsed()
    );

    // The same number of bytes in one plain file beside it.
    let plain = tmp.path().join("plain-1g");
    {
        let mut w = BufWriter::with_capacity(1 << 20, std::fs::File::create(&plain).unwrap());
        let block: Vec<u8> = (0..1u64 << 20).map(|i| mix(i) as u8).collect();
        let mut left = state;
        while left > 0 {
            let n = left.min(block.len() as u64) as usize;
            w.write_all(&block[..n]).unwrap();
            left -= n as u64;
        }
        w.into_inner().unwrap().sync_all().unwrap();
    }

    g.throughput(Throughput::Bytes(state));
    g.sampling_mode(criterion::SamplingMode::Flat);
    g.warm_up_time(Duration::from_millis(1));
    g.measurement_time(Duration::from_secs(10));
    g.bench_function("recovery_1gb/resume_to_first_record", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                // The checkpoint this resume reads (a stopped run may complete one more as
                // it stops; every one holds the whole state).
                let chk = newest_complete(&dir).unwrap();
                for f in state_files(&chk) {
                    drop_cache(&f);
                }
                drop_cache(&chk.join("MANIFEST"));
                *FIRST_FOLD.lock().unwrap() = None;
                let t = std::time::Instant::now();
                let err = recovery_job(&dir, true).run().expect_err("the job stops");
                assert!(err.to_string().contains(STOP), "{err}");
                let first = FIRST_FOLD.lock().unwrap().expect("a record was folded");
                total += first - t;
            }
            // The resumes left a checkpoint of the whole state.
            assert!(complete_state_bytes(&dir) >= STATE_BYTES);
            total
        })
    });
    g.bench_function("recovery_1gb/read_1gb_file", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut buf = vec![0u8; 1 << 20];
            for _ in 0..iters {
                drop_cache(&plain);
                let t = std::time::Instant::now();
                let mut f = std::fs::File::open(&plain).unwrap();
                let mut n = 0u64;
                loop {
                    let k = std::io::Read::read(&mut f, &mut buf).unwrap();
                    if k == 0 {
                        break;
                    }
                    n += k as u64;
                }
                total += t.elapsed();
                assert_eq!(black_box(n), state);
            }
            total
        })
    });
    let _ = std::panic::take_hook();
}

criterion_group!(benches, checkpoint_overhead);
criterion_main!(benches);
