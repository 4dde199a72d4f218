//! The sequence checker (issue #15's proof, in the style of Flink's `SemanticsCheckMapper` and
//! `UnalignedCheckpointITCase`): every record carries a key and that key's sequence number; a
//! keyed stage whose **checkpointed** state holds each key's next expected sequence number
//! counts every gap (lost records) and every repeat (duplicated ones). Over at least 20
//! injected failures of every kind, each followed by `Start::Resume`, at parallelism 1, 2 and 4:
//!
//! - (a) an operator panics after N records of its attempt (N seeded), in a `map` before the
//!   keyed stage (`chaos_before`) or after it (`chaos_after`, during the stage's final
//!   emission): the run fails with `Error::Panic` naming that stage and the panic;
//! - (b) `kill -9` of the process running the pipeline: right after it restored, a random
//!   delay after it completed 1 to 4 new checkpoints, **while a checkpoint is being written** (a
//!   new checkpoint directory without its MANIFEST is seen, and is still incomplete after the
//!   kill), or a random time after it was started (start-up, restore);
//! - (c) between attempts, the newest complete checkpoint is damaged — a state file or its
//!   MANIFEST torn (truncated) or bit-flipped: the next resume skips it, naming it, and uses the
//!   previous one.
//!
//! Then a last resume runs to the end, and: the checker's final state says lost = duplicated =
//! 0 and every key's sequence reached its count; the records written through the pipeline to an
//! exactly-once sink (a file at parallelism 1, a directory of part files at 2 and 4) hold every
//! key's sequence exactly once; at parallelism 1 both outputs are **byte-identical** to a
//! failure-free run's, at 2 and 4 equal as multisets; every checkpoint is removed; every child
//! process was reaped.
//!
//! Every attempt runs in a child process: this test binary again, `--exact sequence_child`,
//! with `MILLRACE_SEQ_CHILD` naming the attempt's description; a guard kills and waits for the
//! child on every path. The randomness is seeded: the seed is printed, and `MILLRACE_SEQ_SEED`
//! replays it (kill times are wall-clock and vary anyway; what is killed when is printed).
//!
//! The source is paced (`RATE`), so that a failure-free run takes about 1 s on any machine fast
//! enough and the failures land at the same points of the input everywhere. The failures are
//! dealt from a shuffled deck; once more than 60 % of the input was written, only failures that
//! cannot run the input out are dealt (a kill right after the restore, a panic within a few
//! thousand records), and the last two are panics in the checker's final emission.
// A test drives the pipeline from outside with std's threads, atomics and processes: the
// `crate::sync` rule (clippy.toml) is for the engine's own code.
#![allow(clippy::disallowed_types, clippy::disallowed_methods)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use millrace::checkpoint::{CheckpointOptions, Start};
use millrace::{Error, Options, Pipeline};
use serde::{Deserialize, Serialize};

/// Records in the input.
const RECORDS: usize = 400_000;
/// The source's pace (records per second, from where a run starts reading): a failure-free run
/// takes about `RECORDS / RATE` = 1 s on any machine fast enough, so that every failure
/// lands at a point of the input that does not depend on the machine's speed.
const RATE: u64 = 400_000;
/// Distinct keys.
const KEYS: u32 = 61;
/// Failures each scenario injects, at least (panics + kills + damaged checkpoints).
const FAILURES: usize = 24;
/// Checkpoint interval of every run.
const INTERVAL: Duration = Duration::from_millis(25);
/// Longest any one wait may take before the test fails (generous: 2 shared cores).
const PATIENCE: Duration = Duration::from_secs(60);
/// The child's environment variable: the path of its attempt's description.
const CHILD_ENV: &str = "MILLRACE_SEQ_CHILD";
/// Replays a seed.
const SEED_ENV: &str = "MILLRACE_SEQ_SEED";
/// The child test's name.
const CHILD_TEST: &str = "sequence_child";

// ---------------------------------------------------------------------------------------------
// The data and the pipeline (shared by the parent's reference run and the children).

/// One input record: its key and that key's sequence number (0, 1, 2, … in input order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Rec {
    key: u32,
    seq: u64,
}

/// The checker's checkpointed state for one key.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Check {
    /// The sequence number expected next.
    next: u64,
    /// Records seen.
    records: u64,
    /// Sequence numbers skipped over (a gap: records lost).
    lost: u64,
    /// Records whose sequence number was already seen (a repeat: records duplicated).
    duplicated: u64,
}

impl Check {
    fn see(&mut self, seq: u64) {
        self.records += 1;
        if seq >= self.next {
            self.lost += seq - self.next;
            self.next = seq + 1;
        } else {
            self.duplicated += 1;
        }
    }
}

/// What the checker emits per key at the end (one NDJSON line each).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
struct Summary {
    key: u32,
    next: u64,
    records: u64,
    lost: u64,
    duplicated: u64,
}

#[path = "common/rng.rs"]
mod rng;
use rng::Rng;

/// The input (fixed: it does not depend on the failures' seed) and each key's record count.
struct Input {
    records: Vec<Rec>,
    per_key: BTreeMap<u32, u64>,
}

fn input() -> &'static Input {
    static INPUT: OnceLock<Input> = OnceLock::new();
    INPUT.get_or_init(|| {
        let mut rng = Rng(0x15_5e9);
        let mut next = vec![0u64; KEYS as usize];
        let records = (0..RECORDS)
            .map(|_| {
                let key = rng.below(KEYS as u64) as u32;
                let seq = next[key as usize];
                next[key as usize] += 1;
                Rec { key, seq }
            })
            .collect();
        let per_key = (0..KEYS).map(|k| (k, next[k as usize])).collect();
        Input { records, per_key }
    })
}

/// The input as a [`Replayable`](millrace::Replayable) source that reads at `RATE` records per
/// second (it sleeps when it is ahead: a throttle, not a synchronisation). Its position is the
/// index of the next record.
struct Paced {
    next: usize,
    /// When this run read its first record, and that record's index.
    since: Option<(Instant, usize)>,
}

impl millrace::Replayable for Paced {
    type Item = Rec;
    type Position = u64;
    fn position(&self) -> u64 {
        self.next as u64
    }
    fn seek(&mut self, position: u64) -> Result<(), millrace::BoxError> {
        if position > RECORDS as u64 {
            return Err(format!("position {position} is past the end").into());
        }
        self.next = position as usize;
        Ok(())
    }
    fn next(&mut self) -> Option<Rec> {
        let r = *input().records.get(self.next)?;
        let (t0, first) = *self.since.get_or_insert((Instant::now(), self.next));
        let due = t0 + Duration::from_micros((self.next - first) as u64 * 1_000_000 / RATE);
        let now = Instant::now();
        if due > now + Duration::from_millis(1) {
            std::thread::sleep(due - now);
        }
        self.next += 1;
        Some(r)
    }
    fn offset(position: &u64) -> Option<u64> {
        Some(*position)
    }
}

/// Where the injected panic is, and after how many records of the attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum PanicAt {
    /// The `chaos_before` map, between the source and the split (every record passes it).
    Before(u64),
    /// The `chaos_after` map, after the checker (its final emission: one record per key).
    After(u64),
}

/// One attempt, as the parent tells a child.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Attempt {
    /// The scenario's directory: `cp/` (checkpoints) and `out/` (the sinks) in it.
    dir: PathBuf,
    parallelism: usize,
    /// Resume (there is a checkpoint that verifies) or start afresh (there is none).
    resume: bool,
    panic: Option<PanicAt>,
}

/// A `map` that passes records through and panics at the `n`-th one of this run.
fn chaos<T>(name: &'static str, arm: Option<u64>) -> impl Fn(T) -> T + Send + Sync + 'static {
    let seen = AtomicU64::new(0);
    move |x| {
        if let Some(n) = arm {
            if seen.fetch_add(1, Ordering::Relaxed) + 1 == n {
                panic!("injected panic in {name} after {n} records of this attempt");
            }
        }
        x
    }
}

fn out_records(dir: &Path, parallelism: usize) -> PathBuf {
    if parallelism == 1 {
        dir.join("out/records.ndjson")
    } else {
        dir.join("out/records")
    }
}

fn out_summary(dir: &Path, parallelism: usize) -> PathBuf {
    if parallelism == 1 {
        dir.join("out/summary.ndjson")
    } else {
        dir.join("out/summary")
    }
}

/// The pipeline:
///
/// ```text
/// input ─ chaos_before ─ split ─┬─ [rebalance(p)] ─ records (file at p = 1, else directory)
///                               └─ key_by(key) ─ checker (checkpointed fold, p instances)
///                                    ─ chaos_after ─ summary (file at p = 1, else directory)
/// ```
///
/// `input` and the split run on one thread, so each key's records reach its checker instance
/// in sequence order at every parallelism.
fn build(a: &Attempt, start: Start) -> Pipeline {
    let p = Pipeline::new();
    let mut cp = CheckpointOptions::new(a.dir.join("cp"));
    cp.interval = INTERVAL;
    cp.start = start;
    p.checkpoints(cp);
    let par = a.parallelism;
    let before = match a.panic {
        Some(PanicAt::Before(n)) => Some(n),
        _ => None,
    };
    let after = match a.panic {
        Some(PanicAt::After(n)) => Some(n),
        _ => None,
    };
    let mut forks = p
        .replayable_source(
            "input",
            Paced {
                next: 0,
                since: None,
            },
        )
        .map(chaos("chaos_before", before))
        .name("chaos_before")
        .split(2)
        .into_iter();
    let (to_sink, to_check) = (forks.next().unwrap(), forks.next().unwrap());
    if par == 1 {
        to_sink
            .write_ndjson(out_records(&a.dir, par))
            .name("records");
    } else {
        to_sink
            .rebalance(par)
            .write_ndjson_dir(out_records(&a.dir, par))
            .name("records");
    }
    let summary = to_check
        // A string key (as most keys are): its hash order, unlike small integers', depends
        // on the order the keys were inserted in.
        .key_by(|r: &Rec| format!("key-{:02}", r.key))
        .checkpointed()
        .parallelism(par)
        .fold(Check::default(), |c, r: Rec| c.see(r.seq))
        .name("checker")
        .map(chaos("chaos_after", after))
        .name("chaos_after")
        .map(|(key, c): (String, Check)| Summary {
            key: key["key-".len()..].parse().unwrap(),
            next: c.next,
            records: c.records,
            lost: c.lost,
            duplicated: c.duplicated,
        });
    if par == 1 {
        summary
            .write_ndjson(out_summary(&a.dir, par))
            .name("summary");
    } else {
        summary
            .write_ndjson_dir(out_summary(&a.dir, par))
            .name("summary");
    }
    p
}

/// How a child's run ended (or, in `started.json`, how it began), as it reports it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Report {
    ok: bool,
    /// The error's text, when the run failed.
    error: Option<String>,
    /// `Error::Panic`'s stage and message.
    panic: Option<(String, String)>,
    resumed_from: Option<u64>,
    skipped: Vec<u64>,
    completed_checkpoints: usize,
}

/// Writes `bytes` to `path` by a rename, so that a reader never sees it half written (the
/// child may be killed while writing).
fn write_atomically(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Runs attempt `a` in this process: writes `started.json` once the run is under way (after
/// its restore), and returns how it ended.
fn run_attempt(a: &Attempt) -> Report {
    let start = if a.resume {
        Start::Resume
    } else {
        Start::Fresh
    };
    let p = build(a, start);
    let handle = p.cancel_handle();
    let done = AtomicBool::new(false);
    let started = a.dir.join("started.json");
    let result = std::thread::scope(|s| {
        s.spawn(|| {
            // The snapshot has stage rows once the run's workers exist: by then the
            // checkpoints were opened and the one to resume from chosen.
            while !done.load(Ordering::Acquire) {
                let snap = handle.snapshot();
                if !snap.stages.is_empty() {
                    let r = Report {
                        ok: true,
                        resumed_from: snap.resumed_from,
                        skipped: snap.skipped_checkpoints.iter().map(|s| s.0).collect(),
                        ..Report::default()
                    };
                    write_atomically(&started, &serde_json::to_vec(&r).unwrap());
                    return;
                }
                std::thread::sleep(Duration::from_micros(500)); // polling, not synchronisation
            }
        });
        let result = p.run();
        done.store(true, Ordering::Release);
        result
    });
    let snap = handle.snapshot();
    let mut r = Report {
        ok: result.is_ok(),
        resumed_from: snap.resumed_from,
        skipped: snap.skipped_checkpoints.iter().map(|s| s.0).collect(),
        ..Report::default()
    };
    match result {
        Ok(report) => {
            r.completed_checkpoints = report
                .checkpoints
                .iter()
                .filter(|c| c.outcome == millrace::checkpoint::Outcome::Completed)
                .count()
        }
        Err(e) => {
            if let Error::Panic { stage, message } = &e {
                r.panic = Some((stage.clone(), message.clone()));
            }
            r.error = Some(e.to_string());
        }
    }
    r
}

/// The child: runs the attempt `MILLRACE_SEQ_CHILD` describes and writes `result.json`. (In
/// a normal test run the variable is unset and this does nothing.)
#[test]
fn sequence_child() {
    let Ok(path) = std::env::var(CHILD_ENV) else {
        return;
    };
    let a: Attempt = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let r = run_attempt(&a);
    write_atomically(&a.dir.join("result.json"), &serde_json::to_vec(&r).unwrap());
}

// ---------------------------------------------------------------------------------------------
// Outputs.

/// A file's bytes, or the committed parts of a directory concatenated in name order (hidden
/// names — in-progress and pending parts — are not output).
fn committed(path: &Path) -> Vec<u8> {
    if path.is_file() {
        return std::fs::read(path).unwrap();
    }
    let mut names: Vec<PathBuf> = std::fs::read_dir(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| !p.file_name().unwrap().to_string_lossy().starts_with('.'))
        .collect();
    names.sort();
    names
        .iter()
        .flat_map(|n| std::fs::read(n).unwrap())
        .collect()
}

/// Lines written so far, committed or not (every part file of a directory, hidden or not): an
/// upper bound on how far the input was consumed.
fn lines_written(path: &Path) -> u64 {
    let count = |p: &Path| {
        std::fs::read(p)
            .map(|b| b.iter().filter(|&&c| c == b'\n').count() as u64)
            .unwrap_or(0)
    };
    match std::fs::read_dir(path) {
        Ok(rd) => rd.map(|e| count(&e.unwrap().path())).sum(),
        Err(_) => count(path),
    }
}

fn sorted_lines(b: &[u8]) -> Vec<&[u8]> {
    let mut v: Vec<&[u8]> = b.split(|&c| c == b'\n').collect();
    v.sort_unstable();
    v
}

/// Lost and duplicated records of `bytes` (NDJSON `Rec`s) against the input, and whether every
/// key's sequence is in order.
fn sequence_errors(bytes: &[u8]) -> (u64, u64, bool) {
    let mut seen: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
    for line in bytes.split(|&c| c == b'\n').filter(|l| !l.is_empty()) {
        let r: Rec = serde_json::from_slice(line)
            .unwrap_or_else(|e| panic!("{e}: {:?}", String::from_utf8_lossy(line)));
        seen.entry(r.key).or_default().push(r.seq);
    }
    let (mut lost, mut duplicated, mut in_order) = (0, 0, true);
    for (k, &n) in &input().per_key {
        let mut seqs = seen.remove(k).unwrap_or_default();
        in_order &= seqs.iter().enumerate().all(|(i, &s)| s == i as u64);
        seqs.sort_unstable();
        let before = seqs.len() as u64;
        seqs.dedup();
        duplicated += before - seqs.len() as u64;
        lost += n - seqs.iter().filter(|&&s| s < n).count() as u64;
    }
    assert!(seen.is_empty(), "unknown keys {:?}", seen.keys());
    (lost, duplicated, in_order)
}

/// The summary's rows, by key.
fn summaries(bytes: &[u8]) -> BTreeMap<u32, Summary> {
    bytes
        .split(|&c| c == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| {
            let s: Summary = serde_json::from_slice(l)
                .unwrap_or_else(|e| panic!("{e}: {:?}", String::from_utf8_lossy(l)));
            (s.key, s)
        })
        .collect()
}

/// The checker's verdict: one row per key, each with lost = duplicated = 0 and its sequence
/// complete.
fn assert_checker_clean(what: &str, summary: &[u8]) {
    let rows = summaries(summary);
    assert_eq!(
        summary.iter().filter(|&&c| c == b'\n').count(),
        rows.len(),
        "{what}: a key summarised twice"
    );
    let want: BTreeMap<u32, Summary> = input()
        .per_key
        .iter()
        .map(|(&key, &n)| {
            let s = Summary {
                key,
                next: n,
                records: n,
                lost: 0,
                duplicated: 0,
            };
            (key, s)
        })
        .collect();
    let lost: u64 = rows.values().map(|s| s.lost).sum();
    let duplicated: u64 = rows.values().map(|s| s.duplicated).sum();
    assert_eq!(
        (lost, duplicated),
        (0, 0),
        "{what}: the checker's lost, duplicated"
    );
    assert_eq!(rows, want, "{what}: the checker's final state per key");
}

/// The checkpoints in `dir/cp`: id → complete (its MANIFEST is there).
fn checkpoints(dir: &Path) -> BTreeMap<u64, bool> {
    let Ok(rd) = std::fs::read_dir(dir.join("cp")) else {
        return BTreeMap::new();
    };
    rd.filter_map(|e| {
        let e = e.ok()?;
        let name = e.file_name().into_string().ok()?;
        let id = name.strip_prefix("chk-")?.parse().ok()?;
        Some((id, e.path().join("MANIFEST").exists()))
    })
    .collect()
}

fn chk_dir(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("cp/chk-{id:08}"))
}

/// The reference: a failure-free run at parallelism 1 (in this process), its records and its
/// summary. Its records are the input, byte for byte, and its checker is clean.
fn reference() -> &'static (Vec<u8>, Vec<u8>) {
    static REF: OnceLock<(Vec<u8>, Vec<u8>)> = OnceLock::new();
    REF.get_or_init(|| {
        let tmp = tempfile::tempdir().unwrap();
        let a = Attempt {
            dir: tmp.path().to_path_buf(),
            parallelism: 1,
            resume: false,
            panic: None,
        };
        let t = Instant::now();
        let report = build(&a, Start::RefuseExisting).run().unwrap();
        eprintln!(
            "reference run: {:?}, {} checkpoints",
            t.elapsed(),
            report.checkpoints.len()
        );
        assert!(
            report
                .checkpoints
                .iter()
                .any(|c| c.outcome == millrace::checkpoint::Outcome::Completed),
            "the reference run is long enough for a checkpoint to complete"
        );
        let records = committed(&out_records(&a.dir, 1));
        let mut want = Vec::new();
        for r in &input().records {
            serde_json::to_writer(&mut want, r).unwrap();
            want.push(b'\n');
        }
        assert!(records == want, "the reference's records are the input");
        let summary = committed(&out_summary(&a.dir, 1));
        assert_checker_clean("reference", &summary);
        assert_eq!(checkpoints(&a.dir), BTreeMap::new(), "checkpoints left");
        (records, summary)
    })
}

// ---------------------------------------------------------------------------------------------
// The parent: children, failures, scenarios.

/// The scenarios take turns: one's kill times are not skewed by another's load.
fn heavy() -> MutexGuard<'static, ()> {
    static HEAVY: Mutex<()> = Mutex::new(());
    HEAVY.lock().unwrap_or_else(|e| e.into_inner())
}

/// The seed: `MILLRACE_SEQ_SEED` (decimal or 0x-hex), or one from the clock.
fn base_seed() -> u64 {
    static SEED: OnceLock<u64> = OnceLock::new();
    *SEED.get_or_init(|| match std::env::var(SEED_ENV) {
        Ok(s) => {
            let s = s.trim();
            match s.strip_prefix("0x") {
                Some(h) => u64::from_str_radix(h, 16),
                None => s.parse(),
            }
            .unwrap_or_else(|e| panic!("{SEED_ENV}={s}: {e}"))
        }
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    })
}

/// Counts the children spawned and reaped (waited for), over the whole test binary.
static SPAWNED: AtomicU64 = AtomicU64::new(0);
static REAPED: AtomicU64 = AtomicU64::new(0);

/// A child running one attempt; dropping it kills (SIGKILL) and waits for it, on every path.
struct Running {
    child: Option<Child>,
}

impl Running {
    fn spawn(dir: &Path, a: &Attempt, n: usize) -> Running {
        let desc = dir.join("attempt.json");
        std::fs::write(&desc, serde_json::to_vec(a).unwrap()).unwrap();
        for f in ["result.json", "started.json"] {
            let _ = std::fs::remove_file(dir.join(f));
        }
        let err = std::fs::File::create(dir.join(format!("stderr.{n}"))).unwrap();
        let child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", CHILD_TEST, "--nocapture", "--test-threads", "1"])
            .env(CHILD_ENV, &desc)
            .env_remove(SEED_ENV)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(err))
            .spawn()
            .unwrap();
        SPAWNED.fetch_add(1, Ordering::SeqCst);
        Running { child: Some(child) }
    }

    /// Whether it has exited (then it is reaped).
    fn exited(&mut self) -> bool {
        let c = self.child.as_mut().expect("not reaped yet");
        if c.try_wait().unwrap().is_some() {
            self.child = None;
            REAPED.fetch_add(1, Ordering::SeqCst);
            true
        } else {
            false
        }
    }

    /// Polls `until` until it holds (true) or the child exits (false), failing after
    /// `PATIENCE`.
    fn wait_for(&mut self, what: &str, mut until: impl FnMut() -> bool) -> bool {
        let start = Instant::now();
        loop {
            if until() {
                return true;
            }
            if self.exited() {
                return until();
            }
            assert!(start.elapsed() < PATIENCE, "no {what} within {PATIENCE:?}");
            std::thread::sleep(Duration::from_micros(250)); // polling, not synchronisation
        }
    }

    /// SIGKILL and reap; false if it had exited already.
    fn kill(&mut self) -> bool {
        let Some(mut c) = self.child.take() else {
            return false;
        };
        let killed = c.try_wait().unwrap().is_none() && c.kill().is_ok();
        c.wait().unwrap();
        REAPED.fetch_add(1, Ordering::SeqCst);
        killed
    }

    /// Waits for it to exit by itself.
    fn wait(&mut self) {
        let ok = self.wait_for("exit", || false);
        assert!(!ok);
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.kill();
    }
}

/// How an attempt is ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// It panics after N records in `chaos_before`.
    PanicBefore,
    /// It panics in `chaos_after`, during the checker's final emission.
    PanicAfter,
    /// SIGKILL once it has restored (and a random 0–10 ms).
    KillAfterRestore,
    /// SIGKILL a random 0–40 ms after it completed 1 to 4 new checkpoints.
    KillAfterCheckpoint,
    /// SIGKILL as soon as a new checkpoint's directory exists without its MANIFEST.
    KillDuringCheckpoint,
    /// SIGKILL a random 0–60 ms after it was started (start-up, restore, first records).
    KillAnytime,
}

/// How the newest complete checkpoint is damaged between attempts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Damage {
    TornState,
    FlippedState,
    TornManifest,
    FlippedManifest,
}

/// A card of the scenario's deck.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Card {
    End(Ending),
    Damage(Damage),
}

/// What a scenario injected.
#[derive(Debug, Default)]
struct Tally {
    panics_before: usize,
    panics_after: usize,
    kills: usize,
    /// Kills that left a new checkpoint directory without its MANIFEST behind.
    kills_mid_checkpoint: usize,
    damaged: usize,
    torn: usize,
    flipped: usize,
    /// Which of the four damages were done.
    damage_kinds: BTreeSet<String>,
    /// Damaged checkpoints whose skipping a later resume reported.
    damage_seen_skipped: usize,
    attempts: usize,
}

impl Tally {
    fn failures(&self) -> usize {
        self.panics_before + self.panics_after + self.kills + self.damaged
    }
}

/// Damages checkpoint `id`: a state file or the MANIFEST, torn or one bit flipped.
fn damage(dir: &Path, id: u64, how: Damage, rng: &mut Rng) -> String {
    let chk = chk_dir(dir, id);
    let target = match how {
        Damage::TornManifest | Damage::FlippedManifest => chk.join("MANIFEST"),
        Damage::TornState | Damage::FlippedState => {
            let mut states: Vec<PathBuf> = std::fs::read_dir(&chk)
                .unwrap()
                .map(|e| e.unwrap().path())
                .filter(|p| p.extension().is_some_and(|e| e == "state"))
                .collect();
            states.sort();
            assert!(!states.is_empty(), "no state file in {}", chk.display());
            states[rng.below(states.len() as u64) as usize].clone()
        }
    };
    let mut bytes = std::fs::read(&target).unwrap();
    assert!(!bytes.is_empty(), "{} is empty", target.display());
    let what = match how {
        Damage::TornManifest | Damage::TornState => {
            let keep = rng.below(bytes.len() as u64) as usize;
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&target)
                .unwrap();
            f.set_len(keep as u64).unwrap();
            format!("torn to {keep} of {} bytes", bytes.len())
        }
        Damage::FlippedManifest | Damage::FlippedState => {
            let at = rng.below(bytes.len() as u64) as usize;
            let bit = rng.below(8);
            bytes[at] ^= 1 << bit;
            std::fs::write(&target, &bytes).unwrap();
            format!("bit {bit} of byte {at} of {} flipped", bytes.len())
        }
    };
    format!(
        "checkpoint {id}: {} {what}",
        target.file_name().unwrap().to_string_lossy()
    )
}

fn read_report(path: &Path) -> Option<Report> {
    let b = std::fs::read(path).ok()?;
    Some(serde_json::from_slice(&b).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
}

/// A scenario: failures at `parallelism` until at least `FAILURES` were injected, then a last
/// resume to the end, then every check.
fn scenario(parallelism: usize) {
    let _g = heavy();
    let (ref_records, ref_summary) = reference();
    let seed = base_seed() ^ (parallelism as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let replay = format!("{SEED_ENV}={:#x}", base_seed());
    eprintln!("parallelism {parallelism}: seed {seed:#x} ({replay} replays)");
    let ctx = |msg: &str| format!("parallelism {parallelism}, {replay}: {msg}");
    let mut rng = Rng(seed);
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let total = RECORDS as u64;
    let mut tally = Tally::default();
    // Checkpoints we damaged (they must be skipped while they exist), and those a resume
    // reported skipped.
    let mut damaged: BTreeSet<u64> = BTreeSet::new();
    let mut seen_skipped: BTreeSet<u64> = BTreeSet::new();
    let mut deck: Vec<Card> = Vec::new();
    let mut deferred: Vec<Damage> = Vec::new();
    let mut last_damage = false;
    let started = Instant::now();

    loop {
        let written = lines_written(&out_records(d, parallelism));
        let cps = checkpoints(d);
        let good: Vec<u64> = cps
            .iter()
            .filter(|(id, &complete)| complete && !damaged.contains(id))
            .map(|(&id, _)| id)
            .collect();
        let remaining = tally.failures() < FAILURES;
        // The tail: only failures that cannot run the input out (the last two panic in the
        // final emission, which comes after the input ended).
        let tail = written > total / 10 * 6 || tally.failures() + 2 >= FAILURES;
        let card = if !remaining {
            None
        } else if tally.failures() + 2 >= FAILURES {
            Some(Card::End(Ending::PanicAfter))
        } else {
            if deck.is_empty() {
                deck = vec![
                    Card::End(Ending::PanicBefore),
                    Card::End(Ending::PanicBefore),
                    Card::End(Ending::KillAfterRestore),
                    Card::End(Ending::KillAfterCheckpoint),
                    Card::End(Ending::KillAfterCheckpoint),
                    Card::End(Ending::KillDuringCheckpoint),
                    Card::End(Ending::KillDuringCheckpoint),
                    Card::End(Ending::KillAnytime),
                    Card::Damage(Damage::TornState),
                    Card::Damage(Damage::FlippedState),
                    Card::Damage(Damage::TornManifest),
                    Card::Damage(Damage::FlippedManifest),
                ];
                for i in (1..deck.len()).rev() {
                    deck.swap(i, rng.below(i as u64 + 1) as usize);
                }
            }
            // A damage put off (below) comes first once it can be done.
            match deferred.pop() {
                Some(how) if good.len() >= 2 => Some(Card::Damage(how)),
                other => {
                    deferred.extend(other);
                    Some(deck.pop().unwrap())
                }
            }
        };
        // A damage needs two good checkpoints (the resume must have one to fall back on):
        // without them it is put off, and an attempt makes some.
        let card = match card {
            Some(Card::Damage(how)) if good.len() < 2 => {
                deferred.push(how);
                Some(Card::End(Ending::KillAfterCheckpoint))
            }
            c => c,
        };
        if let Some(Card::Damage(how)) = card {
            {
                let newest = *good.last().unwrap();
                let what = damage(d, newest, how, &mut rng);
                eprintln!("  damaged {what}");
                damaged.insert(newest);
                tally.damaged += 1;
                match how {
                    Damage::TornManifest | Damage::TornState => tally.torn += 1,
                    Damage::FlippedManifest | Damage::FlippedState => tally.flipped += 1,
                }
                tally.damage_kinds.insert(format!("{how:?}"));
                last_damage = true;
            }
            continue;
        }
        let mut ending = card.map(|c| match c {
            Card::End(e) => e,
            Card::Damage(_) => unreachable!(),
        });
        // In the tail, an ending that waits for a new checkpoint could meet the end of the
        // input instead: end it before that.
        if tail {
            ending = ending.map(|e| match e {
                Ending::KillAfterCheckpoint
                | Ending::KillDuringCheckpoint
                | Ending::KillAnytime => Ending::KillAfterRestore,
                e => e,
            });
        }
        // Near the end of the input, no panic before the checker (it might find no record).
        let left = total - written.min(total);
        if ending == Some(Ending::PanicBefore) && left < 100 {
            ending = Some(Ending::KillAfterRestore);
        }
        // After a damage, an ending that sees the resume (to check it skipped the damage).
        if last_damage && ending == Some(Ending::KillAnytime) {
            ending = Some(Ending::KillAfterCheckpoint);
        }
        let expect_from = good.last().copied();
        let panic = match ending {
            Some(Ending::PanicBefore) => {
                // At least as many records are left to read as have not been written yet.
                let most = if tail { 3_000 } else { 60_000 };
                Some(PanicAt::Before(rng.between(1, most.min(left))))
            }
            Some(Ending::PanicAfter) => Some(PanicAt::After(rng.between(1, KEYS as u64))),
            _ => None,
        };
        let a = Attempt {
            dir: d.to_path_buf(),
            parallelism,
            resume: expect_from.is_some(),
            panic,
        };
        tally.attempts += 1;
        let n = tally.attempts;
        let newest_complete = cps.iter().filter(|c| *c.1).map(|c| *c.0).max().unwrap_or(0);
        let newest_present = cps.keys().max().copied().unwrap_or(0);
        let mut child = Running::spawn(d, &a, n);
        let stderr = |n: usize| std::fs::read_to_string(d.join(format!("stderr.{n}"))).unwrap();
        let started_file = d.join("started.json");
        let is_started = || started_file.exists();
        let mut killed = false;
        match ending {
            None | Some(Ending::PanicBefore) | Some(Ending::PanicAfter) => child.wait(),
            Some(Ending::KillAnytime) => {
                let at = Duration::from_millis(rng.below(60));
                let t = Instant::now();
                child.wait_for("time", || t.elapsed() >= at);
                killed = child.kill();
            }
            Some(Ending::KillAfterRestore) => {
                if child.wait_for("start", is_started) {
                    let at = Duration::from_millis(rng.below(10));
                    let t = Instant::now();
                    child.wait_for("time", || t.elapsed() >= at);
                }
                killed = child.kill();
            }
            Some(Ending::KillAfterCheckpoint) => {
                // 1 to 4 new checkpoints, so that the kills spread over the input. (Only the
                // last `retain` = 3 are kept: count by id. Ids go on after the newest present
                // at the start, so the k-th checkpoint of this attempt is at least that + k.)
                let k = rng.between(1, 4);
                let new_one = || {
                    checkpoints(d)
                        .iter()
                        .any(|(&id, &complete)| complete && id >= newest_present + k)
                };
                if child.wait_for("start", is_started)
                    && child.wait_for("a new checkpoint", new_one)
                {
                    let at = Duration::from_millis(rng.below(40));
                    let t = Instant::now();
                    child.wait_for("time", || t.elapsed() >= at);
                }
                killed = child.kill();
            }
            Some(Ending::KillDuringCheckpoint) => {
                // A new checkpoint first (progress), then the next one caught in the act: its
                // directory exists, its MANIFEST does not yet.
                let new_one = || {
                    checkpoints(d)
                        .iter()
                        .any(|(&id, &complete)| complete && id > newest_complete)
                };
                if child.wait_for("start", is_started)
                    && child.wait_for("a new checkpoint", new_one)
                {
                    let mut floor = checkpoints(d).keys().max().copied().unwrap_or(0);
                    child.wait_for("a checkpoint in progress", || {
                        match checkpoints(d).iter().next_back() {
                            Some((&id, &complete)) if id > floor => {
                                floor = id;
                                !complete
                            }
                            _ => false,
                        }
                    });
                }
                killed = child.kill();
                if killed && checkpoints(d).iter().next_back().is_some_and(|(_, &c)| !c) {
                    tally.kills_mid_checkpoint += 1;
                }
            }
        }
        // What the run reported about its start: the resume chose the newest good checkpoint
        // and skipped every newer one (damaged or incomplete), naming them.
        let report = read_report(&d.join("result.json"));
        let began = report
            .clone()
            .or_else(|| read_report(&d.join("started.json")));
        if let Some(b) = &began {
            assert_eq!(
                b.resumed_from,
                expect_from,
                "{}",
                ctx(&format!(
                    "attempt {n} resumed from the newest good checkpoint ({cps:?}, damaged {damaged:?}): {}",
                    stderr(n)
                ))
            );
            let newer: Vec<u64> = match expect_from {
                Some(from) => cps.keys().copied().filter(|&id| id > from).collect(),
                None => Vec::new(),
            };
            let mut skipped = b.skipped.clone();
            skipped.sort_unstable();
            assert_eq!(
                skipped,
                newer,
                "{}",
                ctx(&format!(
                    "attempt {n} skipped every newer checkpoint ({cps:?})"
                ))
            );
            for id in &skipped {
                if damaged.contains(id) && seen_skipped.insert(*id) {
                    tally.damage_seen_skipped += 1;
                }
            }
            last_damage = false;
        }
        let outcome = match (killed, &report) {
            (true, _) => {
                tally.kills += 1;
                "killed".to_string()
            }
            (false, Some(r)) if r.ok => {
                assert!(
                    ending.is_none(),
                    "{}",
                    ctx(&format!(
                        "attempt {n} ({ending:?}) ran to the end before its failure: the input is too short for this machine"
                    ))
                );
                "completed".to_string()
            }
            (false, Some(r)) => {
                let (stage, message) = r.panic.clone().unwrap_or_else(|| {
                    panic!(
                        "{}",
                        ctx(&format!(
                            "attempt {n} failed, not by a panic: {:?}",
                            r.error
                        ))
                    )
                });
                let (want, counter) = match panic {
                    Some(PanicAt::Before(_)) => ("chaos_before", &mut tally.panics_before),
                    Some(PanicAt::After(_)) => ("chaos_after", &mut tally.panics_after),
                    None => panic!(
                        "{}",
                        ctx(&format!("attempt {n} panicked: {stage}: {message}"))
                    ),
                };
                assert!(
                    stage.split('+').any(|s| s == want),
                    "{}",
                    ctx(&format!("the error names the stage: {stage}"))
                );
                assert!(
                    message.contains(&format!("injected panic in {want}")),
                    "{}",
                    ctx(&format!("the error carries the panic: {message}"))
                );
                assert!(r.error.as_ref().unwrap().contains(&message));
                *counter += 1;
                format!("panicked in `{stage}`")
            }
            (false, None) => panic!(
                "{}",
                ctx(&format!(
                    "attempt {n} ({ending:?}) exited without a result: {}",
                    stderr(n)
                ))
            ),
        };
        eprintln!(
            "  attempt {n}: {ending:?} {panic:?}, from {expect_from:?}: {outcome}; {} of {total} records written, checkpoints {:?}",
            lines_written(&out_records(d, parallelism)),
            checkpoints(d)
        );
        if ending.is_none() {
            break;
        }
    }

    // The last resume ran to the end. Its outputs:
    let records = committed(&out_records(d, parallelism));
    let summary = committed(&out_summary(d, parallelism));
    assert_checker_clean(&ctx("after the failures"), &summary);
    let (lost, duplicated, in_order) = sequence_errors(&records);
    assert_eq!(
        (lost, duplicated),
        (0, 0),
        "{}",
        ctx("the records written: lost, duplicated")
    );
    if parallelism == 1 {
        assert!(in_order, "{}", ctx("every key's sequence in order"));
        assert!(
            &records == ref_records,
            "{}",
            ctx(&format!(
                "the records are byte-identical to the failure-free run's ({} bytes, expected {})",
                records.len(),
                ref_records.len()
            ))
        );
        assert!(
            &summary == ref_summary,
            "{}",
            ctx(&format!(
                "the summary is byte-identical to the failure-free run's:\n{}\nexpected\n{}",
                String::from_utf8_lossy(&summary),
                String::from_utf8_lossy(ref_summary)
            ))
        );
    } else {
        assert!(
            sorted_lines(&records) == sorted_lines(ref_records),
            "{}",
            ctx("the records are the failure-free run's multiset of lines")
        );
        assert!(
            sorted_lines(&summary) == sorted_lines(ref_summary),
            "{}",
            ctx("the summary is the failure-free run's multiset of lines")
        );
        for dir in [out_records(d, parallelism), out_summary(d, parallelism)] {
            let hidden: Vec<String> = std::fs::read_dir(&dir)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with('.'))
                .collect();
            assert!(
                hidden.is_empty(),
                "{}",
                ctx(&format!(
                    "uncommitted parts left in {}: {hidden:?}",
                    dir.display()
                ))
            );
        }
    }
    // A completed run removes its checkpoints: only the lock file (and the mark that the run
    // completed, where the engine writes one) may be left.
    let left: Vec<String> = std::fs::read_dir(d.join("cp"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "LOCK" && n != "COMPLETED")
        .collect();
    assert!(
        left.is_empty(),
        "{}",
        ctx(&format!("left in the checkpoint directory: {left:?}"))
    );
    // The failures: enough of them, and of every kind.
    eprintln!(
        "parallelism {parallelism}: {tally:?}, {} failures in {:?}",
        tally.failures(),
        started.elapsed()
    );
    assert!(tally.failures() >= 20, "{}", ctx(&format!("{tally:?}")));
    assert!(
        tally.panics_before >= 1 && tally.panics_after >= 1,
        "{}",
        ctx(&format!("{tally:?}"))
    );
    assert!(tally.kills >= 5, "{}", ctx(&format!("{tally:?}")));
    assert!(
        tally.kills_mid_checkpoint >= 1,
        "{}",
        ctx(&format!("no kill landed during a checkpoint: {tally:?}"))
    );
    assert!(
        tally.torn >= 1 && tally.flipped >= 1 && tally.damage_kinds.len() == 4,
        "{}",
        ctx(&format!("every kind of damage: {tally:?}"))
    );
    assert_eq!(
        tally.damage_seen_skipped,
        tally.damaged,
        "{}",
        ctx(&format!(
            "every damaged checkpoint was reported skipped: {tally:?}"
        ))
    );
    drop(tmp);
    assert_eq!(
        SPAWNED.load(Ordering::SeqCst),
        REAPED.load(Ordering::SeqCst),
        "every child was reaped"
    );
    assert_no_children();
}

/// This process has no child left, running or a zombie: `waitpid(-1, WNOHANG)` finds none.
/// (Only the scenarios spawn children, and they take turns.)
fn assert_no_children() {
    let mut status = 0;
    // SAFETY: waitpid with WNOHANG only reads the process table and writes `status`, a valid
    // `c_int` of ours.
    let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
    let err = std::io::Error::last_os_error();
    assert!(
        pid == -1 && err.raw_os_error() == Some(libc::ECHILD),
        "a child was left behind: waitpid gave {pid} ({err})"
    );
}

/// Regression: a checkpointed keyed fold emitted its keys in the order of its hash map, which
/// after a restore (entries inserted by key group) differs from a failure-free run's (entries
/// inserted as first seen): the same rows, not the same bytes, at parallelism 1. One panic,
/// one resume, in this process.
#[test]
fn a_resumed_keyed_fold_emits_its_keys_in_the_failure_free_order() {
    let _g = heavy();
    let (ref_records, ref_summary) = reference();
    let tmp = tempfile::tempdir().unwrap();
    let mut a = Attempt {
        dir: tmp.path().to_path_buf(),
        parallelism: 1,
        resume: false,
        // About half-way: many checkpoints complete before.
        panic: Some(PanicAt::Before(RECORDS as u64 / 2)),
    };
    let e = build(&a, Start::RefuseExisting).run().unwrap_err();
    assert!(matches!(e, Error::Panic { .. }), "{e}");
    a.panic = None;
    let report = build(&a, Start::Resume).run().unwrap();
    assert!(report.resumed_from.is_some());
    assert!(&committed(&out_records(&a.dir, 1)) == ref_records);
    let summary = committed(&out_summary(&a.dir, 1));
    assert_checker_clean("resumed once", &summary);
    assert_eq!(
        String::from_utf8_lossy(&summary),
        String::from_utf8_lossy(ref_summary),
        "byte-identical to the failure-free run"
    );
}

#[test]
fn a_failure_free_run_is_the_reference() {
    let _g = heavy();
    reference();
}

#[test]
fn sequence_check_over_mixed_failures_at_parallelism_1_is_byte_identical() {
    scenario(1);
}

#[test]
fn sequence_check_over_mixed_failures_at_parallelism_2_is_the_same_multiset() {
    scenario(2);
}

#[test]
fn sequence_check_over_mixed_failures_at_parallelism_4_is_the_same_multiset() {
    scenario(4);
}

/// A checkpointed tumbling window fires each window's keys in first-seen order, which a
/// snapshot records and a restore rebuilds, so at parallelism 1 a resumed run writes the same
/// results in the same order (it used to emit one firing's keys in hash-map order, which a
/// restore changed). Sliding and session windows: `a_window_restored_gives_the_same_results_
/// and_late_records` in the library's tests.
#[test]
fn a_resumed_window_emits_in_the_failure_free_order() {
    use millrace::window::{Count, Tumbling, WindowSpec};
    let _g = heavy();
    let run = |dir: &Path, start: Start, panic: Option<u64>| {
        // The keys advance at random rates, so some records are late, and which ones depends on
        // when watermarks are sent. They are sent every `watermark_every` records and also
        // when the input "goes idle", which includes a partial batch waiting `linger`: on a
        // loaded machine the paced source was descheduled that long, a watermark went out
        // early, and the failure-free reference itself came out different from run to run
        // (CI, 2026-12-07; 3 of 3 failed under a CPU hog, 4 of 4 passed without the idle
        // watermark). A linger longer than the run keeps the sends to the record count,
        // which is what this test is about.
        let mut opts = Options::default();
        opts.linger = Duration::from_secs(3600);
        let p = Pipeline::with_options(opts);
        let mut cp = CheckpointOptions::new(dir.join("cp"));
        cp.interval = INTERVAL;
        cp.start = start;
        p.checkpoints(cp);
        let spec = WindowSpec::new(Tumbling::new(1000, 0).unwrap(), |r: &(u64, Rec)| {
            millrace::Timestamp(r.0 as i64)
        });
        p.replayable_source(
            "input",
            Paced {
                next: 0,
                since: None,
            },
        )
        .map(|r: Rec| (r.seq * KEYS as u64 + r.key as u64, r))
        .map(chaos("chaos_before", panic))
        .key_by(|r: &(u64, Rec)| format!("key-{:02}", r.1.key))
        .checkpointed()
        .window(spec, Count)
        .results()
        .map(|r| format!("{} {:?} {}", r.key, r.window, r.value))
        .write_lines(dir.join("w.txt"));
        p.run()
    };
    let a = tempfile::tempdir().unwrap();
    run(a.path(), Start::RefuseExisting, None).unwrap();
    let b = tempfile::tempdir().unwrap();
    assert!(run(b.path(), Start::RefuseExisting, Some(RECORDS as u64 / 2)).is_err());
    let r = run(b.path(), Start::Resume, None).unwrap();
    assert!(r.resumed_from.is_some());
    let x = std::fs::read_to_string(a.path().join("w.txt")).unwrap();
    let y = std::fs::read_to_string(b.path().join("w.txt")).unwrap();
    assert_eq!(sorted_lines(x.as_bytes()), sorted_lines(y.as_bytes()));
    assert!(x == y, "window output order differs after a resume");
}
