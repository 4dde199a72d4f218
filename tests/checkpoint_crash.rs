//! Crash-point enumeration through the sinks' commits: the checkpoint store *and* the sinks
//! (the directory sink's part files, the file sink's fsync + committed length + truncation)
//! write through one `SimFs` (the hidden `CheckpointOptions::fs`), so that a simulated crash
//! drops everything either of them had not made durable.
//!
//! A run is made deterministic: a gated source asks for a checkpoint every `BLOCK` records
//! (through the hidden `trigger_hook`) and waits until it was triggered, then, at the first
//! record after its barrier, until it completed (manifest durable, parts committed,
//! retention done). Every file-system operation of the run then happens in one order, the
//! same in every run, so that "the k-th operation" means the same thing for every k.
//!
//! For every k from 1 to the number of operations of a failure-free run, and for both sinks:
//! - `FaultKind::Crash` at op k (that op and every later one fail: the machine is down), then
//!   a reboot (`SimFs::crash`: only what was durable is left), then a resumed run on the same
//!   file system: it must resume from the newest checkpoint whose manifest is durable (the
//!   previous or the new one, never one that fails verification) and the committed output
//!   must be exactly the expected records, each once, in order.
//! - `FaultKind::Error` at op k (only that op fails): a run that still succeeds must have
//!   written the whole output, durably (checked after a reboot); a run that fails is resumed
//!   (without a reboot: the process died, not the machine) and must then have.
//! - A crash during recovery: after each first crash, the resumed run crashes at each of its
//!   first operations, and a second resume must still end exactly once.
//!
//! Found by this enumeration and kept as named regressions: a directory sink that refused its
//! own pending part on a resume with no checkpoint, a file sink whose new file's directory
//! entry was never fsynced, and an output directory left non-durable by a failed fsync.
//! A fault after the run marked its directory COMPLETED (while it removes its checkpoints)
//! leaves a resume with nothing to do: counted as `already_completed`, output checked.

// A test drives the engine from outside with std's threads and locks: the `crate::sync` rule is
// for engine code.
#![allow(clippy::disallowed_types, clippy::disallowed_methods)]

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use millrace::checkpoint::coordinator::TriggerHook;
use millrace::checkpoint::fs::{FaultKind, Op, OpKind, SimFs};
use millrace::checkpoint::store::{Fs, MANIFEST};
use millrace::checkpoint::{CheckpointId, CheckpointOptions, Start};
use millrace::{Options, Pipeline, Replayable};

/// Records the source yields.
const RECORDS: u64 = 300;
/// The limit step's count: the output is `0..LIMIT`.
const LIMIT: u64 = 275;
/// A checkpoint every `BLOCK` records.
const BLOCK: u64 = 50;
/// The batch size (divides `BLOCK`: a block starts a batch).
const BATCH: u64 = 10;

const ROOT: &str = "/millrace-crash-sim";
const CKPT: &str = "/millrace-crash-sim/ckpt";
const OUT_DIR: &str = "/millrace-crash-sim/out";
const OUT_FILE: &str = "/millrace-crash-sim/out.txt";

/// The test's trigger gate: the source asks, the coordinator's hook answers.
#[derive(Default)]
struct Gate {
    state: Mutex<GateState>,
    cv: Condvar,
    /// Stop waiting once the injected fault struck (op number): the run is failing, and
    /// what it waits for may never come.
    fault: Option<(SimFs, u64)>,
}

#[derive(Default)]
struct GateState {
    asked: u64,
    triggered: u64,
    completed: u64,
}

impl Gate {
    fn new(sim: &SimFs, fault_at: Option<u64>) -> Arc<Self> {
        Arc::new(Gate {
            fault: fault_at.map(|k| (sim.clone(), k)),
            ..Gate::default()
        })
    }

    fn failing(&self) -> bool {
        self.fault.as_ref().is_some_and(|(s, k)| s.op_count() >= *k)
    }

    /// Waits until `done` holds of the state (or an operation failed), for at most 30 s.
    fn wait(&self, what: &str, done: impl Fn(&GateState) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut g = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        while !done(&g) && !self.failing() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            g = self
                .cv
                .wait_timeout(g, Duration::from_millis(2))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Asks for the next checkpoint and waits until it was triggered.
    fn ask(&self) {
        let n = {
            let mut g = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            g.asked += 1;
            g.asked
        };
        self.wait("a trigger", |g| g.triggered >= n);
    }

    /// Waits until every checkpoint asked for completed.
    fn settle(&self) {
        self.wait("a completion", |g| g.completed >= g.asked);
    }

    fn bump(&self, f: impl FnOnce(&mut GateState)) {
        f(&mut self.state.lock().unwrap_or_else(PoisonError::into_inner));
        self.cv.notify_all();
    }
}

impl TriggerHook for Gate {
    fn may_trigger(&self, _id: CheckpointId) -> bool {
        let g = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        g.asked > g.triggered
    }
    fn triggered(&self, _id: CheckpointId) {
        self.bump(|g| g.triggered += 1);
    }
    fn completed(&self, _id: CheckpointId) {
        self.bump(|g| g.completed += 1);
    }
}

/// `0..RECORDS`, asking for a checkpoint at every `BLOCK`-th record after its start and
/// holding the first record after that checkpoint's barrier until it completed.
struct GatedSource {
    next: u64,
    start: u64,
    gate: Arc<Gate>,
}

impl Replayable for GatedSource {
    type Item = u64;
    type Position = u64;
    fn position(&self) -> u64 {
        self.next
    }
    fn seek(&mut self, position: u64) -> Result<(), millrace::BoxError> {
        self.next = position;
        self.start = position;
        Ok(())
    }
    fn next(&mut self) -> Option<u64> {
        let p = self.next;
        if p >= RECORDS {
            return None;
        }
        if p > self.start {
            // The barrier goes in after the batch that holds the asking record: hold the
            // batch after it until the checkpoint is complete, so that the coordinator's
            // I/O never interleaves with the sink's.
            match p % BLOCK {
                0 => self.gate.ask(),
                BATCH if p > self.start + BATCH => self.gate.settle(),
                _ => {}
            }
        }
        self.next += 1;
        Some(p)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SinkKind {
    Dir,
    File,
}

/// One run on `sim`; `resume` resumes, otherwise starts fresh. The error, if it failed.
fn run(
    sim: &SimFs,
    sink: SinkKind,
    resume: bool,
    fault_at: Option<u64>,
) -> Result<millrace::RunReport, millrace::Error> {
    let gate = Gate::new(sim, fault_at);
    let mut o = Options::default();
    o.batch_size = BATCH as usize;
    let p = Pipeline::with_options(o);
    let mut c = CheckpointOptions::new(CKPT);
    c.fs = Some(Arc::new(sim.clone()) as Arc<dyn Fs>);
    c.trigger_hook = Some(Arc::clone(&gate) as Arc<dyn TriggerHook>);
    c.interval = Duration::from_millis(1);
    c.retain = 2;
    c.start = if resume {
        Start::Resume
    } else {
        Start::RefuseExisting
    };
    p.checkpoints(c);
    let s = p
        .replayable_source(
            "n",
            GatedSource {
                next: 0,
                start: 0,
                gate,
            },
        )
        .limit(LIMIT);
    match sink {
        SinkKind::Dir => s.write_lines_dir(OUT_DIR),
        SinkKind::File => s.write_lines(OUT_FILE),
    };
    p.run()
}

/// The committed output: the final part files in name order, or the file.
fn output(sim: &SimFs, sink: SinkKind) -> String {
    let bytes = match sink {
        SinkKind::Dir => {
            let mut all = Vec::new();
            for name in sim.read_dir(Path::new(OUT_DIR)).unwrap_or_default() {
                if !name.starts_with('.') {
                    all.extend(sim.read(&Path::new(OUT_DIR).join(name)).unwrap());
                }
            }
            all
        }
        SinkKind::File => sim.read(Path::new(OUT_FILE)).unwrap_or_default(),
    };
    String::from_utf8(bytes).unwrap()
}

fn expected() -> String {
    (0..LIMIT).map(|i| format!("{i}\n")).collect()
}

/// Checks the committed output is `0..LIMIT`, each once, in order (with a readable diff of
/// the line numbers when not).
#[track_caller]
fn assert_exactly_once(sim: &SimFs, sink: SinkKind, what: &str) {
    let got = output(sim, sink);
    if got != expected() {
        let lines: Vec<&str> = got.lines().collect();
        let mut seen = BTreeMap::<&str, usize>::new();
        for l in &lines {
            *seen.entry(l).or_default() += 1;
        }
        let dups: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).take(5).collect();
        panic!(
            "{what}: {} lines (want {LIMIT}), first {:?}, last {:?}, duplicates {:?}\nops:\n{}",
            lines.len(),
            lines.first(),
            lines.last(),
            dups,
            sim.ops()
                .iter()
                .map(|o| o.to_string())
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    if sink == SinkKind::Dir {
        let hidden: Vec<String> = sim
            .read_dir(Path::new(OUT_DIR))
            .unwrap()
            .into_iter()
            .filter(|n| n.starts_with('.'))
            .collect();
        assert!(
            hidden.is_empty(),
            "{what}: parts left uncommitted: {hidden:?}"
        );
    }
}

/// A fresh file system with the job's directory, durable.
fn fresh_sim() -> SimFs {
    let sim = SimFs::new();
    sim.create_dir_all(Path::new(ROOT)).unwrap();
    sim
}

/// The checkpoints whose manifest is durable (present after the reboot), ascending.
fn with_manifest(sim: &SimFs) -> Vec<CheckpointId> {
    let mut ids = Vec::new();
    for name in sim.read_dir(Path::new(CKPT)).unwrap_or_default() {
        let Some(id) = millrace::checkpoint::store::parse_checkpoint_dir_name(&name) else {
            continue;
        };
        let dir = Path::new(CKPT).join(&name);
        if sim
            .read_dir(&dir)
            .unwrap_or_default()
            .iter()
            .any(|n| n == MANIFEST)
        {
            ids.push(id);
        }
    }
    ids
}

/// What one enumeration saw.
#[derive(Debug, Default)]
struct Tally {
    points: u64,
    /// Resumed from checkpoint n (0: from the beginning), how often.
    resumed_from: BTreeMap<CheckpointId, u64>,
    /// Error faults the run survived (and still wrote everything).
    survived: u64,
    /// Faults after the run marked its directory COMPLETED: the resume did nothing.
    already_completed: u64,
}

/// What the failure-free run did.
struct Baseline {
    /// The set-up's operations (the run's are numbered after them).
    base: u64,
    /// The run's operations.
    n: u64,
    /// Its checkpoints.
    completed: usize,
    /// The (run-relative) number of its last operation on the output.
    last_output_op: u64,
    /// The run's operations.
    ops: Vec<Op>,
}

impl Baseline {
    /// The (run-relative) number of the first operation matching `pred`.
    fn find(&self, what: &str, pred: impl Fn(&Op) -> bool) -> u64 {
        let i = self
            .ops
            .iter()
            .position(pred)
            .unwrap_or_else(|| panic!("no operation {what}"));
        i as u64 + 1
    }
}

/// The failure-free run, checked: exactly once, durable, and deterministic.
fn baseline(sink: SinkKind) -> Baseline {
    let sim = fresh_sim();
    let base = sim.op_count();
    let report = run(&sim, sink, false, None).expect("the failure-free run");
    let n = sim.op_count() - base;
    let out = match sink {
        SinkKind::Dir => OUT_DIR,
        SinkKind::File => OUT_FILE,
    };
    let ops: Vec<Op> = sim.ops().split_off(base as usize);
    let last_output_op = ops
        .iter()
        .rposition(|o| o.path.starts_with(out))
        .map_or(0, |i| i as u64 + 1);
    assert_exactly_once(&sim, sink, "failure-free run");
    // A run that reported success has made all of its output durable.
    sim.crash();
    assert_exactly_once(&sim, sink, "failure-free run, after a reboot");
    // Deterministic: a second run does the same operations. (Temporary names end in a
    // random suffix: compared without it.)
    let again = fresh_sim();
    run(&again, sink, false, None).unwrap();
    let plain = |p: &Path| {
        let s = p.display().to_string();
        match s.find(".tmp-") {
            Some(i) => s[..i].to_string(),
            None => s,
        }
    };
    let kinds = |ops: &[Op]| {
        ops.iter()
            .map(|o| (o.kind, plain(&o.path), o.to.as_deref().map(plain)))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        kinds(&ops),
        kinds(&again.ops()[base as usize..]),
        "two failure-free runs did different operations: the enumeration would not be exhaustive"
    );
    Baseline {
        base,
        n,
        completed: report.checkpoints.len(),
        last_output_op,
        ops,
    }
}

/// Faults op `k` of the run as `kind`, reboots (after a crash), resumes, and checks the
/// recovery and the output.
fn check_point(sink: SinkKind, kind: FaultKind, b: &Baseline, k: u64, tally: &mut Tally) {
    let Baseline { base, n, .. } = *b;
    let sim = fresh_sim();
    sim.fail_at(base + k, kind);
    let first = run(&sim, sink, false, Some(base + k));
    let failed_op = sim
        .ops()
        .get((base + k - 1) as usize)
        .map_or_else(String::new, |o| o.to_string());
    let what = format!("{sink:?}, {kind:?} at op {k} of {n} ({failed_op})");
    tally.points += 1;
    match (&first, kind) {
        (Ok(_), FaultKind::Crash) => panic!("{what}: the run succeeded on a crashed machine"),
        (Ok(_), FaultKind::Error) => {
            // The failed op was one the run can do without: everything must be there, and
            // durable.
            tally.survived += 1;
            assert_exactly_once(&sim, sink, &format!("{what}, survived"));
            sim.crash();
            assert_exactly_once(&sim, sink, &format!("{what}, survived, after a reboot"));
            return;
        }
        (Err(_), _) => {}
    }
    if kind == FaultKind::Crash {
        sim.crash();
    } else {
        // The process died, not the machine.
        sim.clear_fault();
    }
    let output_was_complete = k > b.last_output_op;
    resume_and_check(&sim, sink, &what, output_was_complete, tally);
}

/// Resumes on `sim` (after the fault and, for a crash, the reboot) and checks: recovery from
/// the newest checkpoint whose MANIFEST is durable, none with a MANIFEST skipped, the output
/// exactly once and durable. `output_was_complete`: the fault struck after the run's last
/// operation on the output (see the clean-up case below).
fn resume_and_check(
    sim: &SimFs,
    sink: SinkKind,
    what: &str,
    output_was_complete: bool,
    tally: &mut Tally,
) {
    let durable = with_manifest(sim);
    let report = run(sim, sink, true, None)
        .unwrap_or_else(|e| panic!("{what}: the resumed run failed: {e}"));
    if report.already_completed.is_some() {
        // The crash came after the run marked its directory COMPLETED (its output complete
        // and durable), while it removed its checkpoints: the resume does nothing.
        assert!(
            output_was_complete,
            "{what}: COMPLETED before the output was"
        );
        assert_exactly_once(sim, sink, &format!("{what}, already completed"));
        sim.crash();
        assert_exactly_once(
            sim,
            sink,
            &format!("{what}, already completed, after a reboot"),
        );
        tally.already_completed += 1;
        return;
    }
    // Recovery used the newest checkpoint whose manifest is durable — the new one if its
    // manifest made it, the previous one if not — and never skipped one that has a manifest
    // (which would mean a corrupt checkpoint).
    let newest = durable.last().copied();
    assert_eq!(
        report.resumed_from, newest,
        "{what}: resumed from {:?}, the newest checkpoint with a manifest is {newest:?} \
         (skipped: {:?})",
        report.resumed_from, report.skipped_checkpoints
    );
    for (id, why) in &report.skipped_checkpoints {
        assert!(
            !durable.contains(id),
            "{what}: checkpoint {id} has a durable manifest but did not verify: {why}"
        );
    }
    assert_exactly_once(sim, sink, what);
    sim.crash();
    assert_exactly_once(sim, sink, &format!("{what}, resumed, after a reboot"));
    *tally
        .resumed_from
        .entry(report.resumed_from.unwrap_or(0))
        .or_default() += 1;
}

fn enumerate(sink: SinkKind, kind: FaultKind) -> Tally {
    let b = baseline(sink);
    assert!(
        b.completed >= 5,
        "only {} checkpoints: {} ops",
        b.completed,
        b.n
    );
    let mut tally = Tally::default();
    for k in 1..=b.n {
        check_point(sink, kind, &b, k, &mut tally);
    }
    eprintln!("{sink:?} {kind:?}: {} fault points, {tally:?}", b.n);
    assert_eq!(tally.points, b.n);
    tally
}

#[test]
fn every_crash_point_of_the_dir_sink_recovers_exactly_once() {
    let t = enumerate(SinkKind::Dir, FaultKind::Crash);
    // Both the previous and the new checkpoint were recovered from, at many points.
    assert!(t.resumed_from.len() >= 6, "{t:?}");
}

#[test]
fn every_failed_op_of_the_dir_sink_recovers_exactly_once() {
    enumerate(SinkKind::Dir, FaultKind::Error);
}

#[test]
fn every_crash_point_of_the_file_sink_recovers_exactly_once() {
    let t = enumerate(SinkKind::File, FaultKind::Crash);
    assert!(t.resumed_from.len() >= 6, "{t:?}");
}

#[test]
fn every_failed_op_of_the_file_sink_recovers_exactly_once() {
    enumerate(SinkKind::File, FaultKind::Error);
}

// Regressions: the bugs the enumeration found, each at its crash point.

/// A crash after the dir sink pre-committed its first part (pending, durable) but before the
/// first checkpoint's manifest: `--resume` finds no checkpoint and starts from the beginning.
/// It used to refuse its own pending part as "an earlier run's", so every resume failed.
#[test]
fn a_resume_with_no_checkpoint_removes_the_crashed_runs_pending_parts() {
    let b = baseline(SinkKind::Dir);
    let k = b.find("writing checkpoint 1's state", |o| {
        o.kind == OpKind::Write && o.path.starts_with(format!("{CKPT}/chk-00000001"))
    });
    assert!(
        b.ops[..k as usize].iter().any(|o| o
            .to
            .as_ref()
            .is_some_and(|t| t.display().to_string().ends_with(".pending"))),
        "the part is pending before op {k}"
    );
    let mut t = Tally::default();
    check_point(SinkKind::Dir, FaultKind::Crash, &b, k, &mut t);
    assert_eq!(t.resumed_from.get(&0), Some(&1), "{t:?}");
}

/// A successful run with a file sink: its new file's directory entry was never fsynced, so
/// a crash after the run reported success could take the whole output away. (The
/// failure-free baseline reboots and checks; this names it.)
#[test]
fn a_successful_runs_output_survives_a_crash() {
    for sink in [SinkKind::File, SinkKind::Dir] {
        baseline(sink);
    }
}

/// `EIO` on the fsync that makes a new output directory's entry durable: the run fails; the
/// resumed run found the directory there and used to skip that fsync, so its whole output
/// went at the next crash.
#[test]
fn a_resume_makes_an_existing_output_directory_durable() {
    let b = baseline(SinkKind::Dir);
    let made = b.find("creating the output directory", |o| {
        o.kind == OpKind::CreateDir && o.path == Path::new(OUT_DIR)
    });
    assert_eq!(b.ops[made as usize].kind, OpKind::FsyncDir);
    let mut t = Tally::default();
    check_point(SinkKind::Dir, FaultKind::Error, &b, made + 1, &mut t);
    assert_eq!(t.resumed_from.get(&0), Some(&1), "{t:?}");
}

/// Recovery crashes too: for every first crash point k, the resumed run crashes at each of
/// its first `SECOND` operations (its restore: commits, removals, directory fsyncs, and its
/// first writes), and a second resume must still end exactly once — restoring twice is
/// harmless.
#[test]
fn a_crash_during_recovery_still_recovers_exactly_once() {
    const SECOND: u64 = 6;
    let sink = SinkKind::Dir;
    let b = baseline(sink);
    let mut tally = Tally::default();
    let mut finished_first = 0;
    for k in 1..=b.n {
        for j in 1..=SECOND {
            let sim = fresh_sim();
            sim.fail_at(b.base + k, FaultKind::Crash);
            assert!(run(&sim, sink, false, Some(b.base + k)).is_err());
            sim.crash();
            let base2 = sim.op_count();
            sim.fail_at(base2 + j, FaultKind::Crash);
            let what = format!("{sink:?}, crash at op {k}, then at op {j} of the resume");
            tally.points += 1;
            if run(&sim, sink, true, Some(base2 + j)).is_ok() {
                // The resume had fewer operations: nothing was faulted.
                finished_first += 1;
                assert_exactly_once(&sim, sink, &what);
                continue;
            }
            sim.crash();
            resume_and_check(&sim, sink, &what, k > b.last_output_op, &mut tally);
        }
    }
    eprintln!("second crashes: {tally:?}, {finished_first} resumes ended before the fault");
    assert!(tally.resumed_from.len() >= 6, "{tally:?}");
}
