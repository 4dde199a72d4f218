//! The checkpoint protocol end to end, through the typed API, on an in-memory store: barrier
//! order and alignment over 2 and 4 upstream instances, timeouts that leave nothing behind,
//! acknowledgements that do not wait for another instance's slow write, tolerable failures,
//! refusals at start-up and resume, and every thread (the coordinator's included) joined on
//! success, failure, panic and cancel.
//!
//! A stage instance's state carries the diagnostic part `runtime.records`: the records its
//! chain took before the barrier. With aligned barriers, the sums of that number over the
//! instances of every stage are equal at each checkpoint (a chain of 1:1 maps loses and
//! creates nothing), which is what "no record overtakes a barrier and every cut is
//! consistent" means here.

// A test drives the engine from outside with std's threads and locks: the `crate::sync` rule is
// for engine code.
#![allow(clippy::disallowed_types, clippy::disallowed_methods)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use millrace::checkpoint::coordinator::{Ack, Config, Coordinator, Expected, ManualClock, Stale};
use millrace::checkpoint::state::InstanceState;
use millrace::checkpoint::store::{FileEntry, Listing, Manifest, Store};
use millrace::checkpoint::{CheckpointId, CheckpointOptions, InstanceId, Outcome, Start};
use millrace::{Error, Options, Pipeline};

/// Serialises the cases that count threads.
static SERIAL: Mutex<()> = Mutex::new(());

/// A checkpoint's files and manifest.
type Cp = (BTreeMap<String, Vec<u8>>, Option<Manifest>);

/// A store in memory. `block` makes one file's `put` wait until `release` is called.
#[derive(Default)]
struct MemStore {
    cps: Mutex<BTreeMap<CheckpointId, Cp>>,
    block: Mutex<Option<(CheckpointId, String)>>,
    blocked: Mutex<bool>,
    cv: Condvar,
    /// `(checkpoint, file)` of every put, in order.
    puts: Mutex<Vec<(CheckpointId, String)>>,
    /// A put of this file fails as an fsync error would.
    fail: Mutex<Option<(CheckpointId, String)>>,
}

impl MemStore {
    fn new() -> Arc<Self> {
        Arc::new(MemStore::default())
    }

    fn blocking(id: CheckpointId, name: &str) -> Arc<Self> {
        let s = MemStore::default();
        *s.block.lock().unwrap() = Some((id, name.to_string()));
        Arc::new(s)
    }

    fn release(&self) {
        *self.block.lock().unwrap() = None;
        self.cv.notify_all();
    }

    fn ids(&self) -> Vec<CheckpointId> {
        self.cps.lock().unwrap().keys().copied().collect()
    }

    fn complete_ids(&self) -> Vec<CheckpointId> {
        let g = self.cps.lock().unwrap();
        g.iter()
            .filter(|(_, c)| c.1.is_some())
            .map(|(id, _)| *id)
            .collect()
    }

    /// Every instance's `runtime.records` at checkpoint `id`, by stage.
    fn records(&self, id: CheckpointId) -> BTreeMap<String, u64> {
        let g = self.cps.lock().unwrap();
        let (files, manifest) = g.get(&id).unwrap();
        let manifest = manifest.as_ref().unwrap();
        let mut out = BTreeMap::new();
        for e in &manifest.instances {
            let state = InstanceState::decode(&files[&e.file.name]).unwrap();
            let n: u64 = state.get("runtime.records").unwrap().unwrap_or(0);
            *out.entry(e.instance.stage.clone()).or_insert(0) += n;
        }
        out
    }
}

fn gone(id: CheckpointId) -> Error {
    Error::Checkpoint {
        message: format!("checkpoint {id} is not there"),
    }
}

impl Store for MemStore {
    fn begin(&self, id: CheckpointId) -> Result<(), Error> {
        self.cps.lock().unwrap().entry(id).or_default();
        Ok(())
    }
    fn put(&self, id: CheckpointId, name: &str, bytes: &[u8]) -> Result<FileEntry, Error> {
        self.puts.lock().unwrap().push((id, name.to_string()));
        if self.fail.lock().unwrap().as_ref() == Some(&(id, name.to_string())) {
            return Err(Error::CheckpointIo {
                op: "fsync",
                path: format!("chk-{id}/{name}"),
                source: std::io::Error::from_raw_os_error(5),
            });
        }
        {
            let mut b = self.block.lock().unwrap();
            if b.as_ref() == Some(&(id, name.to_string())) {
                *self.blocked.lock().unwrap() = true;
                while b.is_some() {
                    b = self.cv.wait(b).unwrap();
                }
            }
        }
        let mut g = self.cps.lock().unwrap();
        let c = g.get_mut(&id).ok_or_else(|| gone(id))?;
        c.0.insert(name.to_string(), bytes.to_vec());
        Ok(FileEntry {
            name: name.to_string(),
            size: bytes.len() as u64,
            crc32c: 0,
        })
    }
    fn complete(&self, m: &Manifest) -> Result<u64, Error> {
        let mut g = self.cps.lock().unwrap();
        let c = g.get_mut(&m.id).ok_or_else(|| gone(m.id))?;
        for e in &m.instances {
            assert!(
                c.0.contains_key(&e.file.name),
                "manifest lists a missing file"
            );
        }
        c.1 = Some(m.clone());
        Ok(1)
    }
    fn discard(&self, id: CheckpointId) -> Result<(), Error> {
        self.cps.lock().unwrap().remove(&id);
        Ok(())
    }
    fn list(&self) -> Result<Vec<Listing>, Error> {
        Ok(self
            .cps
            .lock()
            .unwrap()
            .iter()
            .map(|(id, (files, m))| Listing {
                id: *id,
                created_ms: m.as_ref().map(|m| m.created_ms),
                bytes: files.values().map(|f| f.len() as u64).sum(),
                problem: m.is_none().then(|| "no manifest".to_string()),
            })
            .collect())
    }
    fn load(&self, id: CheckpointId) -> Result<Manifest, Error> {
        self.cps
            .lock()
            .unwrap()
            .get(&id)
            .and_then(|c| c.1.clone())
            .ok_or_else(|| gone(id))
    }
    fn read(&self, id: CheckpointId, entry: &FileEntry) -> Result<Vec<u8>, Error> {
        self.cps
            .lock()
            .unwrap()
            .get(&id)
            .and_then(|c| c.0.get(&entry.name).cloned())
            .ok_or_else(|| gone(id))
    }
}

/// A file of `n` lines `0`, `1`, …
fn numbers(n: u64) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("in.txt");
    let mut s = String::new();
    for i in 0..n {
        s.push_str(&i.to_string());
        s.push('\n');
    }
    std::fs::write(&path, s).unwrap();
    (dir, path)
}

fn opts(store: &Arc<MemStore>) -> CheckpointOptions {
    let mut o = CheckpointOptions::new("unused");
    o.store = Some(Arc::clone(store) as Arc<dyn Store>);
    o.interval = Duration::from_millis(2);
    o.retain = 1000;
    o.retain_on_success = true;
    o
}

fn small_batches() -> Options {
    let mut o = Options::default();
    o.batch_size = 32;
    o.channel_capacity = 2;
    o
}

/// This process's live engine threads (`millrace…`), by name.
fn engine_threads() -> Vec<String> {
    let mut names = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let (Ok(comm), Ok(stat)) = (
            std::fs::read_to_string(task.path().join("comm")),
            std::fs::read_to_string(task.path().join("stat")),
        ) else {
            continue;
        };
        let state = stat.rsplit_once(") ").map(|(_, rest)| &rest[..1]);
        if comm.starts_with("millrace") && !matches!(state, Some("Z" | "X")) {
            names.push(comm.trim_end().to_string());
        }
    }
    names.sort();
    names
}

/// Runs `body` and checks that it leaves no engine thread behind.
fn no_leak<T>(body: impl FnOnce() -> T) -> T {
    let _serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    let before = engine_threads();
    let out = body();
    assert_eq!(engine_threads(), before, "engine threads left running");
    out
}

/// Waits for `cond` for at most 20 s.
fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::yield_now();
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Paces a source so that the run lasts long enough for several checkpoints (not a
/// synchronisation: no assertion depends on the timing). Pacing the source, not the sink, keeps
/// the channels short, so alignments stay well inside the hold buffer's bound.
fn pace(l: String) -> u64 {
    let x: u64 = l.parse().unwrap();
    if x % 200 == 0 {
        std::thread::sleep(Duration::from_millis(1));
    }
    x
}

/// Source → 2 maps → 4 maps → 1 sink: every stage's records at each complete checkpoint are
/// the source's (the sink aligns over 4 upstream instances, the 4 over 2 each); the counts never
/// go down from one checkpoint to the next; the final checkpoint (every instance ended) holds
/// every record.
#[test]
fn barriers_are_never_overtaken_and_cuts_are_consistent() {
    no_leak(|| {
        let n = 60_000;
        let (_dir, path) = numbers(n);
        let store = MemStore::new();
        let p = Pipeline::with_options(small_batches());
        let mut o = opts(&store);
        // Under bursts an alignment may overflow its hold buffer and be declined (tested on
        // its own in `channel::tests`); the point here is the cut of every completed one.
        o.tolerable_failures = u32::MAX;
        p.checkpoints(o);
        let seen = Arc::new(Mutex::new(0u64));
        let s2 = Arc::clone(&seen);
        p.read_lines(&path)
            .map(pace)
            .rebalance(2)
            .map(|x| x + 1)
            .name("two")
            .rebalance(4)
            .map(|x| x - 1)
            .name("four")
            .rebalance(1)
            .for_each(move |_| {
                *s2.lock().unwrap() += 1;
            })
            .name("sink");
        let report = p.run().unwrap();
        assert_eq!(*seen.lock().unwrap(), n);
        let complete = store.complete_ids();
        let done: Vec<_> = report
            .checkpoints
            .iter()
            .filter(|c| c.outcome == Outcome::Completed)
            .map(|c| c.id)
            .collect();
        assert_eq!(complete, done, "the store holds exactly the completed ones");
        assert!(complete.len() >= 3, "too few checkpoints: {complete:?}");
        let mut last = 0;
        for id in &complete {
            let r = store.records(*id);
            assert_eq!(r.len(), 4, "{r:?}");
            let source = r["lines.read+map"];
            assert!(r.contains_key("two") && r.contains_key("four"), "{r:?}");
            for (stage, got) in &r {
                assert_eq!(
                    *got, source,
                    "checkpoint {id}: {stage} at the barrier: {r:?}"
                );
            }
            assert!(source >= last, "checkpoint {id} behind the previous one");
            last = source;
        }
        assert_eq!(last, n, "the final checkpoint holds every record");
        let s = report.stage("four").unwrap();
        let _ = s.aligning;
    });
}

/// A stage instance whose acknowledgement of checkpoint 1 is dropped: after `timeout`,
/// checkpoint 1 is failed, nothing of it is in the coordinator or the store, and later ones
/// complete.
#[test]
fn a_checkpoint_that_misses_its_timeout_is_removed_and_the_next_succeeds() {
    no_leak(|| {
        let (_dir, path) = numbers(60_000);
        let store = MemStore::new();
        let p = Pipeline::with_options(small_batches());
        let mut o = opts(&store);
        o.timeout = Duration::from_millis(40);
        o.tolerable_failures = 1;
        o.drop_ack = Some((
            InstanceId {
                stage: "sink".into(),
                instance: 0,
            },
            1,
        ));
        p.checkpoints(o);
        let handle = p.cancel_handle();
        let h2 = handle.clone();
        let checked = Arc::new(Mutex::new(false));
        let c2 = Arc::clone(&checked);
        p.read_lines(&path)
            .map(pace)
            .rebalance(2)
            .map(|x| x + 1)
            .rebalance(1)
            .for_each(move |_| {
                let mut c = c2.lock().unwrap();
                if !*c {
                    if let Some(coord) = h2.checkpoint_coordinator() {
                        let stats = coord.stats();
                        if stats.iter().any(|s| s.id == 1) {
                            assert!(!coord.pending_ids().contains(&1));
                            assert!(coord.acked(1).is_empty());
                            *c = true;
                        }
                    }
                }
            })
            .name("sink");
        let report = p.run().unwrap();
        assert!(
            *checked.lock().unwrap(),
            "the sink saw checkpoint 1 end while running"
        );
        let first = &report.checkpoints[0];
        assert_eq!((first.id, first.outcome), (1, Outcome::Failed));
        assert!(
            first.error.as_deref().unwrap().contains("timed out"),
            "{first:?}"
        );
        assert!(
            !store.ids().contains(&1),
            "checkpoint 1 left files: {:?}",
            store.ids()
        );
        assert!(
            store
                .puts
                .lock()
                .unwrap()
                .iter()
                .any(|(id, f)| *id == 1 && f == "sink#0.state"),
            "the dropped ack's file was written (and then removed)"
        );
        assert!(report
            .checkpoints
            .iter()
            .any(|c| c.id > 1 && c.outcome == Outcome::Completed));
        let _ = handle;
    });
}

/// Beyond `tolerable_failures` consecutive failures the run fails with `CheckpointFailed`, and
/// every thread (the coordinator's too) is joined.
#[test]
fn tolerable_failures_exceeded_fails_the_run() {
    no_leak(|| {
        let (_dir, path) = numbers(60_000);
        let store = MemStore::new();
        let p = Pipeline::with_options(small_batches());
        let mut o = opts(&store);
        o.timeout = Duration::from_millis(30);
        o.tolerable_failures = 0;
        o.drop_ack = Some((
            InstanceId {
                stage: "sink".into(),
                instance: 0,
            },
            1,
        ));
        p.checkpoints(o);
        p.read_lines(&path)
            .map(pace)
            .rebalance(1)
            .for_each(|_| {})
            .name("sink");
        match p.run() {
            Err(Error::CheckpointFailed {
                id,
                failures,
                tolerable,
                reason,
            }) => {
                assert_eq!((id, failures, tolerable), (1, 1, 0));
                assert!(reason.contains("timed out"), "{reason}");
            }
            other => panic!("expected CheckpointFailed, got {other:?}"),
        }
        assert!(!store.ids().contains(&1));
    });
}

/// One instance's state write blocks: the other instances' acknowledgements of the same
/// checkpoint are recorded meanwhile (no lock is held across a write), and once it is released
/// the checkpoint completes.
#[test]
fn a_slow_write_does_not_hold_up_other_acknowledgements() {
    no_leak(|| {
        let (_dir, path) = numbers(20_000);
        let store = MemStore::blocking(1, "slow#0.state");
        let p = Pipeline::with_options(small_batches());
        p.checkpoints(opts(&store));
        let handle = p.cancel_handle();
        p.read_lines(&path)
            .map(pace)
            .rebalance(2)
            .map(|x| x + 1)
            .name("slow")
            .rebalance(1)
            .for_each(|_| {})
            .name("sink");
        let s2 = Arc::clone(&store);
        let watcher = std::thread::spawn(move || {
            wait_for("the blocked write", || *s2.blocked.lock().unwrap());
            let coord = handle.checkpoint_coordinator().unwrap();
            let others =
                [("lines.read+map", 0), ("slow", 1), ("sink", 0)].map(|(s, i)| InstanceId {
                    stage: s.into(),
                    instance: i,
                });
            wait_for("the other acks", || {
                let acked = coord.acked(1);
                others.iter().all(|o| acked.contains(o))
            });
            assert!(
                coord.is_pending(1),
                "not complete while slow#0's write blocks"
            );
            assert!(s2.block.lock().unwrap().is_some(), "still blocked");
            s2.release();
        });
        let report = p.run().unwrap();
        watcher.join().unwrap();
        let first = &report.checkpoints[0];
        assert_eq!(
            (first.id, first.outcome),
            (1, Outcome::Completed),
            "{first:?}"
        );
    });
}

/// A panic in a stage fails the run; a cancel cancels it: either way every thread, the
/// coordinator's included, is joined, and the complete checkpoints stay for a resume.
#[test]
fn panics_and_cancels_join_the_coordinator() {
    no_leak(|| {
        let (_dir, path) = numbers(60_000);
        let store = MemStore::new();
        let p = Pipeline::with_options(small_batches());
        let mut o = opts(&store);
        o.retain_on_success = false;
        p.checkpoints(o);
        p.read_lines(&path)
            .map(pace)
            .rebalance(1)
            .for_each(|x| {
                assert!(x < 30_000, "boom");
            })
            .name("sink");
        match p.run() {
            Err(Error::Panic { stage, .. }) => assert_eq!(stage, "sink"),
            other => panic!("expected a panic error, got {other:?}"),
        }
        assert!(
            store.list().unwrap().iter().all(|l| l.problem.is_none()),
            "no partial checkpoint left"
        );
        assert!(
            !store.complete_ids().is_empty(),
            "complete checkpoints kept for a resume"
        );
    });
    no_leak(|| {
        let (_dir, path) = numbers(60_000);
        let store = MemStore::new();
        let p = Pipeline::with_options(small_batches());
        p.checkpoints(opts(&store));
        let handle = p.cancel_handle();
        p.read_lines(&path)
            .map(pace)
            .rebalance(1)
            .for_each(move |x| {
                if x == 20_000 {
                    handle.cancel();
                }
            });
        assert!(matches!(p.run(), Err(Error::Cancelled)));
    });
}

/// A successful run removes its checkpoints unless asked to keep them.
#[test]
fn a_successful_run_removes_its_checkpoints() {
    // Engine threads of this test must not show in another's leak check.
    let _serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    let (_dir, path) = numbers(5_000);
    let store = MemStore::new();
    let p = Pipeline::new();
    let mut o = opts(&store);
    o.retain_on_success = false;
    p.checkpoints(o);
    p.read_lines(&path).rebalance(1).for_each(|_| {});
    let report = p.run().unwrap();
    assert!(
        !report.checkpoints.is_empty(),
        "at least the final checkpoint"
    );
    assert!(store.ids().is_empty(), "left: {:?}", store.ids());
}

/// Start-up refusals: a stage wider than `max_parallelism`; checkpoints present without
/// `--resume`/`--fresh`; a resume whose stateful stage changed.
#[test]
fn start_up_refusals() {
    // Engine threads of this test must not show in another's leak check.
    let _serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    let (_dir, path) = numbers(100);
    // Too wide.
    let store = MemStore::new();
    let p = Pipeline::new();
    let mut o = opts(&store);
    o.max_parallelism = 2;
    p.checkpoints(o);
    p.read_lines(&path)
        .rebalance(3)
        .map(|l| l.len())
        .name("wide")
        .for_each(|_| {});
    match p.run() {
        Err(e @ Error::CheckpointUnsupported { .. }) => {
            assert_eq!(e.stage(), Some("wide"), "{e:?}");
            assert!(e.to_string().contains("max_parallelism = 2"), "{e}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }

    // A run that leaves a complete checkpoint, then one that neither resumes nor starts afresh.
    let store = MemStore::new();
    let build = |store: &Arc<MemStore>, start: Start, version: usize| {
        let p = Pipeline::new();
        let mut o = opts(store);
        o.start = start;
        p.checkpoints(o);
        p.read_lines(&path)
            .rebalance(1)
            .for_each(|_| {})
            .name("out");
        if version > 1 {
            p.set_stage_fingerprint("out", &format!("out v{version}"));
        }
        p
    };
    build(&store, Start::RefuseExisting, 1).run().unwrap();
    assert!(!store.complete_ids().is_empty());
    match build(&store, Start::RefuseExisting, 1).run() {
        Err(e @ Error::CheckpointsExist { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("--resume") && msg.contains("--fresh"), "{msg}");
        }
        other => panic!("expected CheckpointsExist, got {other:?}"),
    }
    // The sink stage changed (its fingerprint): refused on resume, naming it.
    match build(&store, Start::Resume, 2).run() {
        Err(Error::Checkpoint { message }) => {
            assert!(
                message.contains("`out`") && message.contains("changed"),
                "{message}"
            )
        }
        other => panic!("expected a refused resume, got {other:?}"),
    }
    // Unchanged: resumes from the newest complete checkpoint and numbers on after it.
    let newest = *store.complete_ids().last().unwrap();
    let report = build(&store, Start::Resume, 1).run().unwrap();
    assert_eq!(report.resumed_from, Some(newest));
    assert!(report.checkpoints.iter().all(|c| c.id > newest));
    // Fresh: discards them.
    let report = build(&store, Start::Fresh, 1).run().unwrap();
    assert_eq!(report.resumed_from, None);
}

/// A resume skips a checkpoint that does not verify (here: no manifest) in favour of the
/// previous complete one, and reports it.
#[test]
fn resume_skips_a_checkpoint_that_does_not_verify() {
    // Engine threads of this test must not show in another's leak check.
    let _serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    let (_dir, path) = numbers(100);
    let store = MemStore::new();
    let build = |start: Start| {
        let p = Pipeline::new();
        let mut o = opts(&store);
        o.start = start;
        p.checkpoints(o);
        p.read_lines(&path)
            .rebalance(1)
            .for_each(|_| {})
            .name("out");
        p
    };
    build(Start::Fresh).run().unwrap();
    let good = *store.complete_ids().last().unwrap();
    store.begin(good + 1).unwrap();
    let report = build(Start::Resume).run().unwrap();
    assert_eq!(report.resumed_from, Some(good));
    // The start-up lists ids only (`Store::ids`): a checkpoint without its manifest is
    // skipped with the engine's reason, without reading its files.
    assert_eq!(report.skipped_checkpoints.len(), 1);
    assert_eq!(report.skipped_checkpoints[0].0, good + 1);
    assert!(
        report.skipped_checkpoints[0]
            .1
            .starts_with("incomplete: no MANIFEST"),
        "{:?}",
        report.skipped_checkpoints
    );
    assert!(
        report.checkpoints.iter().all(|c| c.id > good + 1),
        "numbering continues after the newest present"
    );
    assert!(
        !store.ids().contains(&(good + 1)),
        "the torn one is removed once a newer one completes"
    );
}

// --- The coordinator on its own, with a manual clock: deterministic. ---

fn who(stage: &str, i: usize) -> InstanceId {
    InstanceId {
        stage: stage.into(),
        instance: i,
    }
}

fn coordinator(
    store: Arc<MemStore>,
    clock: Arc<ManualClock>,
    n: usize,
    concurrent: usize,
) -> Coordinator {
    let cfg = Config {
        interval: Duration::from_millis(10),
        timeout: Duration::from_millis(100),
        max_concurrent: concurrent,
        min_pause: Duration::ZERO,
        tolerable_failures: 10,
        retain: 2,
        max_parallelism: 128,
    };
    let expected = (0..n)
        .map(|i| Expected {
            instance: who("s", i),
            fingerprint: "s p=n".into(),
            stateful: true,
            dead_letter_side: false,
        })
        .collect();
    Coordinator::new(cfg, store, clock, expected, 0, Vec::new(), Vec::new())
}

fn ack(store: &MemStore, id: CheckpointId, w: &InstanceId) -> Ack {
    Ack {
        file: store.put(id, &format!("{w}.state"), b"x").unwrap(),
        key_groups: None,
        positions: Vec::new(),
        precommitted: Vec::new(),
        align_ns: 0,
    }
}

/// A timed-out checkpoint is gone from memory at once and from the store after the same step;
/// a late ack is refused as stale; the next checkpoint completes.
#[test]
fn coordinator_timeout_removes_everything_and_refuses_late_acks() {
    // Engine threads of this test must not show in another's leak check.
    let _serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    let store = MemStore::new();
    let clock = Arc::new(ManualClock::new());
    let c = coordinator(Arc::clone(&store), Arc::clone(&clock), 2, 1);
    c.step();
    assert_eq!(c.triggered(), 1);
    c.ack(1, &who("s", 0), ack(&store, 1, &who("s", 0)))
        .unwrap();
    clock.advance(Duration::from_millis(100));
    c.step();
    assert!(c.pending_ids().is_empty() || c.pending_ids() == vec![2]);
    assert!(!c.pending_ids().contains(&1));
    assert!(!store.ids().contains(&1), "checkpoint 1's files removed");
    let late = ack(&store, 2, &who("s", 1));
    assert_eq!(c.ack(1, &who("s", 1), late), Err(Stale));
    assert_eq!(c.stats()[0].outcome, Outcome::Failed);
    // Checkpoint 2 was triggered in the same step (1 was removed first); both ack it.
    assert_eq!(c.triggered(), 2);
    for i in 0..2 {
        c.ack(2, &who("s", i), ack(&store, 2, &who("s", i)))
            .unwrap();
    }
    c.step();
    assert_eq!(store.complete_ids(), vec![2]);
    assert_eq!(c.stats()[1].outcome, Outcome::Completed);
}

/// The coordinator's own I/O (a finished instance's file, written at completion) blocks:
/// acknowledgements of the next checkpoint are recorded meanwhile.
#[test]
fn coordinator_io_does_not_block_acknowledgements() {
    // Engine threads of this test must not show in another's leak check.
    let _serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    let store = MemStore::blocking(1, "s#1.state");
    let clock = Arc::new(ManualClock::new());
    let c = Arc::new(coordinator(Arc::clone(&store), Arc::clone(&clock), 2, 2));
    c.step();
    c.ack(1, &who("s", 0), ack(&store, 1, &who("s", 0)))
        .unwrap();
    clock.advance(Duration::from_millis(10));
    c.step();
    assert_eq!(c.triggered(), 2);
    // s#1 ends: its final state counts for 1 and 2; the coordinator writes it into 1 (blocked).
    c.finish(&who("s", 1), &InstanceState::default(), vec![1, 2, 3]);
    let c2 = Arc::clone(&c);
    let stepper = std::thread::spawn(move || {
        c2.step();
    });
    wait_for("the coordinator's blocked write", || {
        *store.blocked.lock().unwrap()
    });
    // Meanwhile: an ack of checkpoint 2 is recorded at once.
    c.ack(2, &who("s", 0), ack(&store, 2, &who("s", 0)))
        .unwrap();
    assert_eq!(c.acked(2), vec![who("s", 0)]);
    store.release();
    stepper.join().unwrap();
    c.step();
    assert_eq!(store.complete_ids(), vec![1, 2]);
}

/// A pipeline with a dead-letter stream: the dead-letter side's barriers follow the main
/// side's acknowledgements, so checkpoints complete (none times out waiting for the letters'
/// sink), and every letter arrives.
#[test]
fn checkpoints_complete_with_a_dead_letter_stream() {
    no_leak(|| {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("in.txt");
        let mut s = String::new();
        for i in 0..40_000u64 {
            if i % 1000 == 7 {
                s.push_str("bad\n");
            } else {
                s.push_str(&format!("{i}\n"));
            }
        }
        std::fs::write(&path, s).unwrap();
        let store = MemStore::new();
        let p = Pipeline::with_options(small_batches());
        let mut o = opts(&store);
        o.timeout = Duration::from_secs(10);
        p.checkpoints(o);
        let (dl, letters) = p.dead_letters("bad");
        let count = Arc::new(Mutex::new(0usize));
        let c2 = Arc::clone(&count);
        letters
            .for_each(move |_| *c2.lock().unwrap() += 1)
            .name("letters");
        p.read_lines(&path)
            .map(|l| {
                if let Ok(x) = l.parse::<u64>() {
                    pace(x.to_string());
                }
                l
            })
            .try_map(|l: String| l.parse::<u64>())
            .on_error(millrace::OnError::DeadLetter(dl))
            .name("parse")
            .rebalance(1)
            .for_each(|_| {})
            .name("sink");
        let report = p.run().unwrap();
        assert_eq!(*count.lock().unwrap(), 40);
        let done = report
            .checkpoints
            .iter()
            .filter(|c| c.outcome == Outcome::Completed)
            .count();
        assert!(done >= 3, "{:?}", report.checkpoints);
        assert!(
            report
                .checkpoints
                .iter()
                .all(|c| c.outcome == Outcome::Completed),
            "{:?}",
            report.checkpoints
        );
        let last = *store.complete_ids().last().unwrap();
        let m = store.load(last).unwrap();
        assert!(
            m.instances
                .iter()
                .any(|e| e.instance.stage == "bad+letters"),
            "{:?}",
            m.instances
        );
    });
}

/// An iterator cannot be replayed after a crash: with checkpoints on, a pipeline reading one is
/// refused before anything runs, naming the source (`IterHead` declares `Unsupported`).
#[test]
fn an_iterator_source_is_refused() {
    // Engine threads of this test must not show in another's leak check.
    let _serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    let store = MemStore::new();
    let p = Pipeline::new();
    p.checkpoints(opts(&store));
    let ran = Arc::new(Mutex::new(false));
    let r2 = Arc::clone(&ran);
    p.source("numbers", 0..10u32)
        .for_each(move |_| *r2.lock().unwrap() = true);
    match p.run() {
        Err(e @ Error::CheckpointUnsupported { .. }) => assert_eq!(e.stage(), Some("numbers")),
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(!*ran.lock().unwrap(), "nothing ran");
    assert!(store.ids().is_empty(), "nothing written");
}

/// At-least-once: nothing is held, so a downstream instance's cut may include records sent
/// after the barrier on its faster inputs — never fewer than upstream's, never more than all.
#[test]
fn at_least_once_cuts_are_never_behind_upstream() {
    no_leak(|| {
        let n = 40_000;
        let (_dir, path) = numbers(n);
        let store = MemStore::new();
        let p = Pipeline::with_options(small_batches());
        let mut o = opts(&store);
        o.mode = millrace::checkpoint::Mode::AtLeastOnce;
        p.checkpoints(o);
        p.read_lines(&path)
            .map(pace)
            .rebalance(2)
            .map(|x| x + 1)
            .name("two")
            .rebalance(1)
            .for_each(|_| {})
            .name("sink");
        let report = p.run().unwrap();
        assert!(report
            .checkpoints
            .iter()
            .all(|c| c.outcome == Outcome::Completed));
        let complete = store.complete_ids();
        assert!(complete.len() >= 3, "{complete:?}");
        for id in &complete {
            let r = store.records(*id);
            let source = r["lines.read+map"];
            assert!(
                r["two"] >= source && r["sink"] >= r["two"],
                "checkpoint {id}: {r:?}"
            );
            assert!(r["sink"] <= n);
        }
    });
}

/// A state write that fails while its checkpoint is pending fails the run with the store's
/// error (never retried, never taken for a success); the threads are joined.
#[test]
fn a_failed_state_write_fails_the_run() {
    no_leak(|| {
        let (_dir, path) = numbers(40_000);
        let store = MemStore::new();
        *store.fail.lock().unwrap() = Some((2, "sink#0.state".into()));
        let p = Pipeline::with_options(small_batches());
        p.checkpoints(opts(&store));
        p.read_lines(&path)
            .map(pace)
            .rebalance(1)
            .for_each(|_| {})
            .name("sink");
        match p.run() {
            Err(Error::CheckpointIo { op, path, .. }) => {
                assert_eq!((op, path.as_str()), ("fsync", "chk-2/sink#0.state"))
            }
            other => panic!("expected the write's error, got {other:?}"),
        }
        assert!(!store.complete_ids().contains(&2));
    });
}

/// The default store (the file system): a run's checkpoints verify; a successful run without
/// `retain_on_success` leaves none.
#[test]
fn checkpoints_on_the_file_system_store() {
    // Engine threads of this test must not show in another's leak check.
    let _serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    let (dir, path) = numbers(20_000);
    let cps = dir.path().join("checkpoints");
    for keep in [true, false] {
        let p = Pipeline::with_options(small_batches());
        let mut o = CheckpointOptions::new(&cps);
        o.interval = Duration::from_millis(5);
        o.retain_on_success = keep;
        o.retain = 2;
        o.start = Start::Fresh;
        p.checkpoints(o);
        p.read_lines(&path)
            .map(pace)
            .rebalance(2)
            .map(|x| x + 1)
            .rebalance(1)
            .for_each(|_| {});
        let report = p.run().unwrap();
        assert!(report
            .checkpoints
            .iter()
            .any(|c| c.outcome == Outcome::Completed));
        let store = millrace::checkpoint::store::FsStore::open(&cps).unwrap();
        let listed = store.list().unwrap();
        if keep {
            assert!(!listed.is_empty() && listed.len() <= 2, "{listed:?}");
            assert!(listed.iter().all(|l| l.problem.is_none()), "{listed:?}");
        } else {
            assert!(listed.is_empty(), "{listed:?}");
        }
    }
}
