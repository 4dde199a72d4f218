//! Engine benchmarks, each next to a hand-written loop over the same data in the same group.
//!
//! - `fused_chain`: four maps over u64, fused on one thread and forced onto four threads (at
//!   the default batch size and at 1,024 records a batch), beside a hand-written pipeline of
//!   four threads and crossbeam channels of batches.
//! - `wordcount`: Zipf-like text of 10 million words, parallelism 1 and 2.
//! - `channel_hop`: one record per message against batches of 1,024 and the default (4,096
//!   `u64` a batch).
//! - `ndjson_cli`: `millrace run` over 1 GiB of NDJSON (read → filter → select → write), on the
//!   projected byte path and on the value path, beside DuckDB (and jq) when installed.
//! - `ndjson_policy`: the same pipeline on clean input with `on_error = "fail"` against
//!   `on_error = "dead_letter"` on every stage (issue #14: the policy must cost nothing on clean
//!   input, ≥ 0.98×).
//!
//! - `map_par`: about 1 µs of integer mixing per record (issue #16, item 7): a hand loop on one
//!   thread, rayon's `par_iter` over the whole input (what the machine allows), `map` in one
//!   stage, `map` in two stage instances (`rebalance(2)`, the engine's other way to use more
//!   cores) and `map_par` on the run's rayon pool.
//!
//! - `ordered`: the same ~1 µs map at parallelism 2, unordered (`rebalance(2)`) against ordered
//!   (`rebalance(2).ordered()`, issue item 5: ≥ 0.9× the unordered throughput), next to a hand
//!   loop; both runs end in a one-instance sink, so both pay the merge into it.
//! - `native_map`: a trivial map (upper-case one string field) over 2 million small NDJSON
//!   records, file to `/dev/null`: as a built-in stage (`read_ndjson → map → write_ndjson`),
//!   and as the native `casefold.upper` node through the NDJSON path (`abi = "values"`, the
//!   ABI 1 way) and the line path (`abi = "lines"`), each with the pipeline on the value path
//!   and on the byte path; and a line node that only copies its batch, for the boundary's own
//!   cost (issue: performance, item 6).
//!
//! Run: `cargo bench --bench engine` (or name one group: `cargo bench --bench engine -- wordcount`).
//! Results and their ratios are recorded in docs/performance.md.
// A bench drives the engine from outside with std's threads and atomics: the `crate::sync`
// rule (clippy.toml) is for the engine's own code.
#![allow(clippy::disallowed_types, clippy::disallowed_methods)]
// `criterion_group!` generates an undocumented function.
#![allow(missing_docs)]

use std::hint::black_box;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use criterion::{
    criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput,
};
use millrace::{Options, Pipeline};
use rustc_hash::FxHashMap;

#[inline]
fn f1(x: u64) -> u64 {
    x.wrapping_mul(0x9E37_79B9_7F4A_7C15)
}
#[inline]
fn f2(x: u64) -> u64 {
    x ^ (x >> 29)
}
#[inline]
fn f3(x: u64) -> u64 {
    x.wrapping_mul(0xBF58_476D_1CE4_E5B9)
}
#[inline]
fn f4(x: u64) -> u64 {
    x ^ (x >> 32)
}

fn fused_chain(c: &mut Criterion) {
    const N: u64 = 10_000_000;
    let mut g = c.benchmark_group("fused_chain");
    g.throughput(Throughput::Elements(N));
    g.sample_size(10);
    // The input goes through `black_box`: otherwise LLVM strength-reduces `f1` over the range
    // (one add instead of a multiply per record), which no real input allows and which the
    // engine, reading its input from a batch, cannot do either. `hand_loop_range` keeps that
    // version for reference.
    g.bench_function("hand_loop", |b| {
        b.iter(|| {
            for x in 0..black_box(N) {
                black_box(f4(f3(f2(f1(black_box(x))))));
            }
        })
    });
    g.bench_function("hand_loop_range", |b| {
        b.iter(|| {
            for x in 0..black_box(N) {
                black_box(f4(f3(f2(f1(x)))));
            }
        })
    });
    g.bench_function("engine_fused", |b| {
        b.iter(|| {
            let p = Pipeline::new();
            p.source("n", 0..black_box(N))
                .map(f1)
                .map(f2)
                .map(f3)
                .map(f4)
                .for_each(|x| {
                    black_box(x);
                });
            p.run().unwrap()
        })
    });
    g.bench_function("engine_4_threads", |b| {
        b.iter(|| four_threads(Pipeline::new(), N))
    });
    // The same four threads with every link at the batch size all links had before
    // 2026-12-07 (1,024 records; the default now sizes a `u64` link's batches at 4,096).
    g.bench_function("engine_4_threads_batch_1024", |b| {
        b.iter(|| {
            let mut o = Options::default();
            o.batch_size = 1024;
            four_threads(Pipeline::with_options(o), N)
        })
    });
    // A naive pipeline written by hand (the peers harness's "crossbeam batched"): the same
    // four threads, each map in its own, linked by crossbeam channels of `Vec` batches of
    // 1,024 records, 8 batches deep.
    g.bench_function("crossbeam_batched_4_threads", |b| {
        b.iter(|| crossbeam_batched(black_box(N)))
    });
    g.finish();
}

/// `0..n` through `f1`..`f4` in `p`, a new stage (thread) before each of `f2`, `f3` and `f4`.
fn four_threads(p: Pipeline, n: u64) -> millrace::RunReport {
    p.source("n", 0..black_box(n))
        .map(f1)
        .new_stage()
        .map(f2)
        .new_stage()
        .map(f3)
        .new_stage()
        .map(f4)
        .for_each(|x| {
            black_box(x);
        });
    p.run().unwrap()
}

/// `0..n` through `f1`..`f4` on four threads linked by bounded crossbeam channels of batches;
/// returns how many records reached the end.
fn crossbeam_batched(n: u64) -> u64 {
    use crossbeam_channel::{bounded, Receiver};
    const BATCH: usize = 1024;
    fn stage<'scope>(
        s: &'scope std::thread::Scope<'scope, '_>,
        rx: Receiver<Vec<u64>>,
        f: fn(u64) -> u64,
    ) -> Receiver<Vec<u64>> {
        let (tx, out) = bounded::<Vec<u64>>(8);
        s.spawn(move || {
            for mut batch in rx {
                for x in &mut batch {
                    *x = f(*x);
                }
                if tx.send(batch).is_err() {
                    return;
                }
            }
        });
        out
    }
    std::thread::scope(|s| {
        let (tx, rx) = bounded::<Vec<u64>>(8);
        s.spawn(move || {
            let mut buf = Vec::with_capacity(BATCH);
            for x in 0..n {
                buf.push(f1(x));
                if buf.len() == BATCH {
                    let full = std::mem::replace(&mut buf, Vec::with_capacity(BATCH));
                    if tx.send(full).is_err() {
                        return;
                    }
                }
            }
            if !buf.is_empty() {
                let _ = tx.send(buf);
            }
        });
        let rx = stage(s, stage(s, rx, f2), f3);
        let mut seen = 0;
        for batch in rx {
            for x in batch {
                black_box(f4(x));
                seen += 1;
            }
        }
        assert_eq!(seen, n);
        seen
    })
}

/// About a microsecond of integer mixing on this machine: 768 dependent rounds of
/// xor, multiply and rotate, which LLVM can neither vectorise nor shorten.
#[inline(never)]
fn expensive(x: u64) -> u64 {
    let mut h = x;
    for i in 0..768u64 {
        h = (h ^ i).wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(23);
    }
    h
}

fn map_par(c: &mut Criterion) {
    const N: u64 = 100_000;
    let data: Vec<u64> = (0..N).collect();
    // Every way computes the same sum of results (checked once, outside the timing).
    let expect = data.iter().fold(0u64, |s, &x| s.wrapping_add(expensive(x)));
    let sum =
        |out: &millrace::Collected<u64>| out.take().iter().fold(0u64, |s, &x| s.wrapping_add(x));
    let engine = |how: &str| -> u64 {
        let p = Pipeline::new();
        let src = p.source("n", 0..black_box(N));
        let out = match how {
            "map" => src.map(expensive).collect(),
            "rebalance_2" => src.rebalance(2).map(expensive).parallelism(2).collect(),
            "map_par" => src.map_par(expensive).collect(),
            _ => unreachable!(),
        };
        p.run().unwrap();
        sum(&out)
    };
    for how in ["map", "rebalance_2", "map_par"] {
        assert_eq!(engine(how), expect, "{how}");
    }
    let mut g = c.benchmark_group("map_par");
    g.throughput(Throughput::Elements(N));
    g.sample_size(10);
    g.sampling_mode(SamplingMode::Flat);
    g.warm_up_time(Duration::from_secs(1));
    g.measurement_time(Duration::from_secs(4));
    g.bench_function("hand_loop", |b| {
        b.iter(|| {
            for &x in black_box(&data) {
                black_box(expensive(x));
            }
        })
    });
    g.bench_function("rayon_par_iter", |b| {
        use rayon::prelude::*;
        b.iter(|| {
            black_box(&data).par_iter().for_each(|&x| {
                black_box(expensive(x));
            })
        })
    });
    g.bench_function("engine_map_p1", |b| {
        b.iter(|| {
            let p = Pipeline::new();
            p.source("n", 0..black_box(N)).map(expensive).for_each(|x| {
                black_box(x);
            });
            p.run().unwrap()
        })
    });
    g.bench_function("engine_rebalance_2", |b| {
        b.iter(|| {
            let p = Pipeline::new();
            p.source("n", 0..black_box(N))
                .rebalance(2)
                .map(expensive)
                .parallelism(2)
                .for_each(|x| {
                    black_box(x);
                });
            p.run().unwrap()
        })
    });
    g.bench_function("engine_map_par", |b| {
        b.iter(|| {
            let p = Pipeline::new();
            p.source("n", 0..black_box(N))
                .map_par(expensive)
                .for_each(|x| {
                    black_box(x);
                });
            p.run().unwrap()
        })
    });
    g.finish();
}

fn ordered(c: &mut Criterion) {
    const N: u64 = 100_000;
    let data: Vec<u64> = (0..N).collect();
    let want: Vec<u64> = data.iter().map(|&x| expensive(x)).collect();
    let engine = |ordered: bool| -> Vec<u64> {
        let p = Pipeline::new();
        let s = p.source("n", 0..black_box(N)).rebalance(2);
        let s = if ordered { s.ordered() } else { s };
        let out = s.map(expensive).new_stage().collect();
        p.run().unwrap();
        out.take()
    };
    // Checked once, outside the timing: ordered gives the sequential output; unordered the
    // same records.
    assert_eq!(engine(true), want);
    let mut unordered = engine(false);
    unordered.sort_unstable();
    let mut sorted = want.clone();
    sorted.sort_unstable();
    assert_eq!(unordered, sorted);
    let mut g = c.benchmark_group("ordered");
    g.throughput(Throughput::Elements(N));
    g.sample_size(10);
    g.sampling_mode(SamplingMode::Flat);
    g.warm_up_time(Duration::from_secs(1));
    g.measurement_time(Duration::from_secs(4));
    g.bench_function("hand_loop", |b| {
        b.iter(|| {
            for &x in black_box(&data) {
                black_box(expensive(x));
            }
        })
    });
    for (id, ordered) in [("unordered_p2", false), ("ordered_p2", true)] {
        g.bench_function(id, |b| {
            b.iter(|| {
                let p = Pipeline::new();
                let s = p.source("n", 0..black_box(N)).rebalance(2);
                let s = if ordered { s.ordered() } else { s };
                s.map(expensive).new_stage().for_each(|x| {
                    black_box(x);
                });
                p.run().unwrap()
            })
        });
    }
    g.finish();
}

/// Deterministic xorshift.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Lines of Zipf-distributed words (s = 1 over a 50,000-word vocabulary), about 12 per line.
fn zipf_text(words: usize) -> Vec<&'static str> {
    let mut rng = Rng(0x2545_F491_4F6C_DD1D);
    let vocab: Vec<String> = (0..50_000)
        .map(|_| {
            let len = 2 + rng.next() % 9;
            (0..len)
                .map(|_| (b'a' + (rng.next() % 26) as u8) as char)
                .collect()
        })
        .collect();
    let mut cdf = Vec::with_capacity(vocab.len());
    let mut acc = 0.0;
    for r in 1..=vocab.len() {
        acc += 1.0 / r as f64;
        cdf.push(acc);
    }
    let mut lines = Vec::new();
    let mut line = String::new();
    for i in 0..words {
        let u = (rng.next() >> 11) as f64 / (1u64 << 53) as f64 * acc;
        let w = &vocab[cdf.partition_point(|&c| c < u).min(vocab.len() - 1)];
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(w);
        if i % 12 == 11 {
            lines.push(&*Box::leak(std::mem::take(&mut line).into_boxed_str()));
        }
    }
    if !line.is_empty() {
        lines.push(Box::leak(line.into_boxed_str()));
    }
    lines
}

const WORDS: usize = 10_000_000;

/// The text and its number of distinct words, generated on first use (criterion calls every
/// group function even when a filter skips its benchmarks).
fn text() -> &'static (Vec<&'static str>, usize) {
    static TEXT: std::sync::OnceLock<(Vec<&'static str>, usize)> = std::sync::OnceLock::new();
    TEXT.get_or_init(|| {
        let lines = zipf_text(WORDS);
        let mut m: FxHashMap<&str, u64> = FxHashMap::default();
        for l in &lines {
            for w in l.split_whitespace() {
                *m.entry(w).or_insert(0) += 1;
            }
        }
        let distinct = m.len();
        (lines, distinct)
    })
}

fn wordcount(c: &mut Criterion) {
    let mut g = c.benchmark_group("wordcount");
    g.throughput(Throughput::Elements(WORDS as u64));
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(15));
    g.bench_function("hand_loop", |b| {
        let (lines, expect) = text();
        let expect = *expect;
        b.iter(|| {
            let mut m: FxHashMap<&str, u64> = FxHashMap::default();
            for l in black_box(lines) {
                for w in l.split_whitespace() {
                    *m.entry(w).or_insert(0) += 1;
                }
            }
            assert_eq!(m.len(), expect);
            m
        })
    });
    for par in [1usize, 2] {
        g.bench_with_input(BenchmarkId::new("engine", par), &par, |b, &par| {
            let (lines, expect) = text();
            let expect = *expect;
            b.iter(|| {
                let p = Pipeline::new();
                let src = p.source("lines", lines.clone());
                let words = if par == 1 {
                    src.flat_map(|l: &'static str| l.split_whitespace())
                        .key_by(|w| *w)
                        .count()
                } else {
                    src.rebalance(par)
                        .flat_map(|l: &'static str| l.split_whitespace())
                        .key_by(|w| *w)
                        .parallelism(par)
                        .count()
                };
                let out = words.collect();
                p.run().unwrap();
                assert_eq!(out.len(), expect);
            })
        });
    }
    // A parallel source: two readers, each over every other line, so the tokenising runs on
    // both threads without a rebalance hop.
    g.bench_function("engine_parallel_source/2", |b| {
        let (lines, expect) = text();
        let expect = *expect;
        b.iter(|| {
            let p = Pipeline::new();
            let out = p
                .parallel_source("lines", 2, move |part, parts| {
                    lines.iter().copied().skip(part).step_by(parts)
                })
                .flat_map(|l: &'static str| l.split_whitespace())
                .key_by(|w| *w)
                .parallelism(2)
                .count()
                .collect();
            p.run().unwrap();
            assert_eq!(out.len(), expect);
        })
    });
    g.finish();
}

fn channel_hop(c: &mut Criterion) {
    const N: u64 = 2_000_000;
    let mut g = c.benchmark_group("channel_hop");
    g.throughput(Throughput::Elements(N));
    g.sample_size(10);
    g.bench_function("hand_loop", |b| {
        b.iter(|| {
            for x in 0..black_box(N) {
                black_box(x);
            }
        })
    });
    // 0: the default, sized by the record type (4,096 `u64` a batch).
    for batch in [1usize, 1024, 0] {
        g.bench_with_input(BenchmarkId::new("batch", batch), &batch, |b, &batch| {
            b.iter(|| {
                let mut o = Options::default();
                o.batch_size = batch;
                o.channel_capacity = if batch == 1 { 1024 } else { 4 };
                let p = Pipeline::with_options(o);
                p.source("n", 0..black_box(N)).new_stage().for_each(|x| {
                    black_box(x);
                });
                p.run().unwrap()
            })
        });
    }
    g.finish();
}

/// 1 GiB of event records, written once under target/ and reused.
fn ndjson_data() -> (PathBuf, u64) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench-data");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("events-1g.ndjson");
    const SIZE: u64 = 1 << 30;
    if std::fs::metadata(&path)
        .map(|m| m.len() >= SIZE)
        .unwrap_or(false)
    {
        return (path.clone(), std::fs::metadata(&path).unwrap().len());
    }
    let mut w = BufWriter::with_capacity(1 << 20, std::fs::File::create(&path).unwrap());
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let kinds = ["click", "view", "view", "scroll", "purchase"];
    let mut written = 0u64;
    let mut id = 0u64;
    while written < SIZE {
        let r = rng.next();
        let line = format!(
            "{{\"id\":{id},\"ts\":{},\"user\":\"user-{}\",\"kind\":\"{}\",\"url\":\"https://example.com/shop/item/{}?ref=feed\",\"amount\":{}.{:02},\"country\":\"{}\",\"tags\":[\"t{}\",\"t{}\"]}}\n",
            1_700_000_000_000u64 + id * 17,
            r % 100_000,
            kinds[(r >> 20) as usize % kinds.len()],
            (r >> 8) % 1_000_000,
            (r >> 30) % 500,
            (r >> 40) % 100,
            ["DE", "FR", "US", "JP", "BR"][(r >> 50) as usize % 5],
            (r >> 3) % 50,
            (r >> 13) % 50,
        );
        w.write_all(line.as_bytes()).unwrap();
        written += line.len() as u64;
        id += 1;
    }
    w.flush().unwrap();
    (path, written)
}

/// Whether the command line's benchmark filter selects `group` (the gigabyte groups skip
/// writing their data otherwise).
fn selected(group: &str) -> bool {
    let filter = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .unwrap_or_default();
    group.contains(filter.as_str()) || filter.starts_with(group)
}

/// Runs `millrace run --quiet <toml>` once.
fn run_cli(toml: &Path) {
    let st = Command::new(env!("CARGO_BIN_EXE_millrace"))
        .args(["run", "--quiet"])
        .arg(toml)
        .status()
        .unwrap();
    assert!(st.success());
}

fn ndjson_cli(c: &mut Criterion) {
    if !selected("ndjson_cli") {
        return; // Do not write a gigabyte for nothing.
    }
    let (data, bytes) = ndjson_data();
    let dir = tempfile::tempdir().unwrap();
    let mut g = c.benchmark_group("ndjson_cli");
    g.throughput(Throughput::Bytes(bytes));
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(60));
    g.bench_function("hand_loop", |b| {
        b.iter(|| {
            let r = BufReader::with_capacity(1 << 18, std::fs::File::open(&data).unwrap());
            let mut out =
                BufWriter::with_capacity(1 << 18, std::fs::File::create("/dev/null").unwrap());
            for line in r.lines() {
                let v: serde_json::Value = serde_json::from_str(&line.unwrap()).unwrap();
                if v.get("kind").and_then(|k| k.as_str()) == Some("purchase") {
                    let mut m = serde_json::Map::new();
                    for f in ["id", "user", "amount"] {
                        if let Some(x) = v.get(f) {
                            m.insert(f.to_string(), x.clone());
                        }
                    }
                    serde_json::to_writer(&mut out, &m).unwrap();
                    out.write_all(b"\n").unwrap();
                }
            }
        })
    });
    for par in [1usize, 2] {
        let toml = dir.path().join(format!("p{par}.toml"));
        std::fs::write(
            &toml,
            format!(
                "[stages.read]\nkind=\"ndjson.read\"\npath={:?}\nparallelism={par}\n\
                 [stages.keep]\nkind=\"filter\"\ninput=\"read\"\nfield=\"kind\"\nop=\"eq\"\nvalue=\"purchase\"\n\
                 [stages.slim]\nkind=\"select\"\ninput=\"keep\"\nfields=[\"id\",\"user\",\"amount\"]\n\
                 [stages.out]\nkind=\"ndjson.write\"\ninput=\"slim\"\npath=\"/dev/null\"\n",
                data.display().to_string()
            ),
        )
        .unwrap();
        g.bench_with_input(BenchmarkId::new("cli", par), &par, |b, _| {
            b.iter(|| run_cli(&toml))
        });
        // The same pipeline on the value path (every record parsed into a `Value`): the
        // projected byte path's before.
        let value = dir.path().join(format!("v{par}.toml"));
        let text = std::fs::read_to_string(&toml).unwrap();
        std::fs::write(&value, format!("[options]\nbyte_path=false\n{text}")).unwrap();
        g.bench_with_input(BenchmarkId::new("cli_value_path", par), &par, |b, _| {
            b.iter(|| run_cli(&value))
        });
    }
    // The peers, when installed: DuckDB (Python package) with two threads, and jq (single
    // threaded, about 40 s a run here, so only with MILLRACE_BENCH_JQ=1).
    let duckdb = dir.path().join("duckdb.py");
    std::fs::write(
        &duckdb,
        format!(
            "import duckdb\nduckdb.sql('SET threads=2')\nduckdb.sql(\"COPY (SELECT amount, id, \\\"user\\\" FROM read_ndjson('{}') WHERE kind = 'purchase') TO '/dev/null' (FORMAT json)\")\n",
            data.display()
        ),
    )
    .unwrap();
    let has = |cmd: &mut Command| cmd.output().is_ok_and(|o| o.status.success());
    if has(Command::new("python3").args(["-c", "import duckdb"])) {
        g.bench_function(BenchmarkId::new("duckdb", 2), |b| {
            b.iter(|| assert!(has(Command::new("python3").arg(&duckdb))))
        });
    }
    if std::env::var_os("MILLRACE_BENCH_JQ").is_some() && has(Command::new("jq").arg("--version")) {
        g.bench_function(BenchmarkId::new("jq", 1), |b| {
            b.iter(|| {
                let out = std::fs::File::create("/dev/null").unwrap();
                let st = Command::new("jq")
                    .args(["-c", r#"select(.kind == "purchase") | {id, user, amount}"#])
                    .arg(&data)
                    .stdout(out)
                    .status()
                    .unwrap();
                assert!(st.success());
            })
        });
    }
    g.finish();
}

/// `ndjson_cli`'s pipeline (parallelism 1) with each error policy on every stage, over clean
/// input: what the dead-letter policy costs when nothing is bad.
fn ndjson_policy(c: &mut Criterion) {
    if !selected("ndjson_policy") {
        return; // Do not write a gigabyte for nothing.
    }
    let (data, bytes) = ndjson_data();
    let dir = tempfile::tempdir().unwrap();
    let mut g = c.benchmark_group("ndjson_policy");
    g.throughput(Throughput::Bytes(bytes));
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(60));
    for (id, policy, dead) in [
        ("fail", "on_error=\"fail\"\n", ""),
        (
            "dead_letter",
            "on_error=\"dead_letter\"\ndead_letter=\"dead\"\n",
            "[stages.dead]\nkind=\"ndjson.write\"\npath=\"/dev/null\"\n",
        ),
    ] {
        let toml = dir.path().join(format!("{id}.toml"));
        std::fs::write(
            &toml,
            format!(
                "[stages.read]\nkind=\"ndjson.read\"\npath={:?}\n{policy}\
                 [stages.keep]\nkind=\"filter\"\ninput=\"read\"\nfield=\"kind\"\nop=\"eq\"\nvalue=\"purchase\"\n{policy}\
                 [stages.slim]\nkind=\"select\"\ninput=\"keep\"\nfields=[\"id\",\"user\",\"amount\"]\n{policy}\
                 [stages.out]\nkind=\"ndjson.write\"\ninput=\"slim\"\npath=\"/dev/null\"\n{dead}",
                data.display().to_string()
            ),
        )
        .unwrap();
        g.bench_function(id, |b| b.iter(|| run_cli(&toml)));
    }
    g.finish();
}

/// The `exec` stage through `cat` next to a plain shell pipe through `cat`, over the same 1 GiB
/// of NDJSON. The shell pipe copies bytes; the pipeline parses every line, writes it to the
/// child as JSON, and parses what comes back (the price of records being values, not bytes).
fn exec_cat(c: &mut Criterion) {
    if !selected("exec_cat") {
        return; // Do not write a gigabyte for nothing.
    }
    let (data, bytes) = ndjson_data();
    let dir = tempfile::tempdir().unwrap();
    let mut g = c.benchmark_group("exec_cat");
    g.throughput(Throughput::Bytes(bytes));
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(20));
    g.bench_function("shell_pipe", |b| {
        b.iter(|| {
            let st = Command::new("sh")
                .arg("-c")
                .arg(format!("cat '{}' | cat > /dev/null", data.display()))
                .status()
                .unwrap();
            assert!(st.success());
        })
    });
    for (id, byte_path) in [("millrace_exec", true), ("millrace_exec_value_path", false)] {
        // The first takes the byte path (checked lines, never parsed); the second is forced
        // onto the value path (every record parsed and re-serialised).
        let toml = dir.path().join(format!("{id}.toml"));
        std::fs::write(
            &toml,
            format!(
                "[options]\nbyte_path={byte_path}\n\
                 [stages.read]\nkind=\"ndjson.read\"\npath={:?}\n\
                 [stages.cat]\nkind=\"exec\"\ninput=\"read\"\ncommand=[\"cat\"]\n\
                 [stages.out]\nkind=\"ndjson.write\"\ninput=\"cat\"\npath=\"/dev/null\"\n",
                data.display().to_string()
            ),
        )
        .unwrap();
        g.bench_function(id, |b| b.iter(|| run_cli(&toml)));
    }
    g.finish();
}

/// The casefold plugin and the line-path test plugin, built for this profile (as `tests/common`
/// builds the plugins), and a plugin directory holding their manifests with `entry` pointing at
/// them.
fn native_plugins(dir: &Path) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().unwrap().parent().unwrap().to_path_buf();
    let target = profile_dir.parent().unwrap().to_path_buf();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let st = Command::new(cargo)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("CARGO_TARGET_DIR", &target)
        .args(["build", "--quiet", "--release"])
        .args(["-p", "millrace-casefold", "-p", "millrace-test-linetest"])
        .status()
        .unwrap();
    assert!(st.success());
    let plugins = dir.join("plugins");
    for (name, manifest, lib) in [
        (
            "casefold",
            "plugins/casefold/plugin.toml",
            "millrace_casefold",
        ),
        (
            "linetest",
            "tests/native/linetest/plugin.toml",
            "millrace_test_linetest",
        ),
    ] {
        let lib = target.join(format!("release/lib{lib}.so"));
        std::fs::create_dir_all(plugins.join(name)).unwrap();
        let manifest =
            std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(manifest))
                .unwrap();
        let manifest: String = manifest
            .lines()
            .map(|l| {
                if l.starts_with("entry = ") {
                    format!("entry = {:?}\n", lib.display().to_string())
                } else {
                    format!("{l}\n")
                }
            })
            .collect();
        std::fs::write(plugins.join(format!("{name}/plugin.toml")), manifest).unwrap();
    }
    plugins
}

/// Upper-cases the string field `s` (what `casefold.upper` does).
fn upper_s(mut v: serde_json::Value) -> serde_json::Value {
    if let Some(serde_json::Value::String(s)) = v.get_mut("s") {
        *s = s.to_uppercase();
    }
    v
}

fn native_map(c: &mut Criterion) {
    if !selected("native_map") {
        return; // Do not build the plugin and write the data for nothing.
    }
    const N: u64 = 2_000_000;
    let dir = tempfile::tempdir().unwrap();
    let plugins = native_plugins(dir.path());
    let data = dir.path().join("in.ndjson");
    let mut w = BufWriter::with_capacity(1 << 20, std::fs::File::create(&data).unwrap());
    for i in 0..N {
        writeln!(w, "{{\"n\":{i},\"s\":\"record {i}\"}}").unwrap();
    }
    w.flush().unwrap();
    drop(w);
    let mut g = c.benchmark_group("native_map");
    g.throughput(Throughput::Elements(N));
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(10));
    g.bench_function("builtin", |b| {
        b.iter(|| {
            let p = Pipeline::new();
            p.read_ndjson::<serde_json::Value>(&data)
                .map(upper_s)
                .write_ndjson("/dev/null");
            p.run().unwrap();
        })
    });
    let upper = |abi| format!("kind = \"casefold.upper\"\nfield = \"s\"\nabi = \"{abi}\"");
    for (id, stage, byte_path) in [
        ("native_ndjson_value_path", upper("values"), false),
        ("native_ndjson_byte_path", upper("values"), true),
        ("native_lines_value_path", upper("lines"), false),
        ("native_lines_byte_path", upper("lines"), true),
        // The boundary alone: a line node that copies its batch (no map at all).
        (
            "native_echo_byte_path",
            "kind = \"linetest.echo\"".into(),
            true,
        ),
    ] {
        let text = format!(
            "plugin_dirs = [{:?}]\n[options]\nbyte_path = {byte_path}\n\
             [stages.read]\nkind = \"ndjson.read\"\npath = {:?}\n\
             [stages.up]\ninput = \"read\"\n{stage}\n\
             [stages.out]\nkind = \"ndjson.write\"\ninput = \"up\"\npath = \"/dev/null\"\n",
            plugins.display().to_string(),
            data.display().to_string()
        );
        let spec =
            millrace::config::PipelineSpec::from_str(&text, dir.path().join("p.toml")).unwrap();
        g.bench_function(id, |b| {
            b.iter(|| {
                let report = spec.build().unwrap().run().unwrap();
                assert_eq!(report.stage("out").unwrap().records_out, N);
            })
        });
    }
    g.finish();
}

criterion_group!(
    benches,
    fused_chain,
    map_par,
    ordered,
    channel_hop,
    wordcount,
    ndjson_cli,
    ndjson_policy,
    exec_cat,
    native_map
);
criterion_main!(benches);
