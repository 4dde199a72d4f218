//! The checkpoint store: its commit protocol (asserted on the fault-injecting file system's
//! operation log), crash-point enumeration over every mutating operation of a checkpoint's
//! commit and of retention, torn and bit-flipped files, the directory lock (in this process
//! and another), safe file names, fsync errors, and `checkpoint verify`'s checks.
// A test drives the store from outside with std's atomics: the `crate::sync` rule
// (clippy.toml) is for the engine's own code.
#![allow(clippy::disallowed_types, clippy::disallowed_methods)]
#![cfg(not(loom))]

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use millrace::checkpoint::fs::{FaultKind, FsFile, LockGuard, OpKind, SimFs};
use millrace::checkpoint::store::{
    self, FileEntry, Fs, FsStore, InstanceEntry, Manifest, Store, FORMAT, MANIFEST,
};
use millrace::checkpoint::{verify, CheckpointId, InstanceId};
use millrace::Error;

const DIR: &str = "/ckpt";

fn inst(stage: &str, instance: usize) -> InstanceId {
    InstanceId {
        stage: stage.into(),
        instance,
    }
}

/// The bytes instance `i` of checkpoint `id` writes (distinct per checkpoint and instance).
fn state_bytes(id: CheckpointId, i: usize) -> Vec<u8> {
    (0..100 + 37 * i)
        .map(|b| (b as u64 * 31 + id * 7 + i as u64) as u8)
        .collect()
}

fn entry(instance: InstanceId, file: FileEntry) -> InstanceEntry {
    InstanceEntry {
        instance,
        fingerprint: "count(key=k)".into(),
        stateful: true,
        file,
        key_groups: None,
        positions: Vec::new(),
        precommitted: Vec::new(),
    }
}

fn manifest(id: CheckpointId, instances: Vec<InstanceEntry>) -> Manifest {
    Manifest {
        format: FORMAT,
        id,
        created_ms: 1_700_000_000_000 + id,
        max_parallelism: 128,
        instances,
    }
}

/// Checkpoint `id` of three instances of stage `count`: begin, put ×3, complete (stops at the
/// first error, as the coordinator does).
fn commit(store: &FsStore, id: CheckpointId) -> Result<(), Error> {
    store.begin(id)?;
    let mut instances = Vec::new();
    for i in 0..3 {
        let who = inst("count", i);
        let file = store.put(id, &store::state_file_name(&who), &state_bytes(id, i))?;
        instances.push(entry(who, file));
    }
    store.complete(&manifest(id, instances))?;
    Ok(())
}

/// Every checkpoint listed without a problem loads, and every one of its files reads back
/// byte-identical to what was written; every one listed with a problem fails to load.
/// Returns the newest that loads.
fn check_recovered(store: &FsStore, context: &str) -> Option<CheckpointId> {
    let listings = store.list().unwrap();
    let mut newest = None;
    for l in &listings {
        match &l.problem {
            None => {
                let m = store
                    .load(l.id)
                    .unwrap_or_else(|e| panic!("{context}: {} listed fine: {e}", l.id));
                assert_eq!(m.id, l.id, "{context}");
                assert_eq!(m.instances.len(), 3, "{context}");
                for (i, e) in m.instances.iter().enumerate() {
                    let bytes = store.read(l.id, &e.file).unwrap();
                    assert_eq!(bytes, state_bytes(l.id, i), "{context}: {} #{i}", l.id);
                }
                newest = Some(l.id);
            }
            Some(problem) => {
                let err = store.load(l.id).unwrap_err().to_string();
                assert!(
                    err.contains(problem.as_str()),
                    "{context}: {err} / {problem}"
                );
            }
        }
    }
    newest
}

/// Runs the scenario with an optional fault at the `k`-th mutating operation after
/// checkpoint 1 completed: checkpoint 2's begin, three puts and complete, then retention
/// (`retain = 1`: discard 1). As the coordinator does, a failed checkpoint 2 is discarded
/// (and retention does not run).
fn scenario(fault: Option<(u64, FaultKind)>) -> (SimFs, u64) {
    let fs = SimFs::new();
    let store = FsStore::open_with(DIR, Arc::new(fs.clone())).unwrap();
    commit(&store, 1).unwrap();
    let base = fs.op_count();
    if let Some((k, kind)) = fault {
        fs.fail_at(base + k, kind);
    }
    match commit(&store, 2) {
        Ok(()) => {
            let _ = store.discard(1);
        }
        Err(_) => {
            let _ = store.discard(2);
        }
    }
    drop(store);
    (fs, base)
}

/// Opens a fresh store over what survived and checks it; returns the newest loadable.
fn recover(fs: &SimFs, context: &str) -> CheckpointId {
    let store = FsStore::open_with(DIR, Arc::new(fs.clone())).unwrap();
    let newest = check_recovered(&store, context)
        .unwrap_or_else(|| panic!("{context}: no checkpoint loads"));
    assert!(newest == 1 || newest == 2, "{context}: newest {newest}");
    // Any torn checkpoint is listed with its problem (never silently fine).
    for l in store.list().unwrap() {
        if l.id > newest {
            assert!(l.problem.is_some(), "{context}: {l:?}");
        }
    }
    // The store goes on: the next checkpoint (numbered after every one found) commits.
    let next = store.list().unwrap().last().map_or(1, |l| l.id + 1);
    commit(&store, next).unwrap();
    store.load(next).unwrap();
    newest
}

#[test]
fn the_commit_protocol_orders_fsyncs_before_the_manifest_and_retention_after_it() {
    let (fs, base) = scenario(None);
    let ops: Vec<_> = fs.ops().into_iter().skip(base as usize).collect();
    assert!(ops.iter().all(|o| o.ok), "{ops:?}");
    let chk2 = PathBuf::from(DIR).join("chk-00000002");
    let pos = |pred: &dyn Fn(&millrace::checkpoint::fs::Op) -> bool| {
        ops.iter().position(pred).expect("op present")
    };
    // begin: mkdir, then the store's directory fsynced, before anything is written in it.
    assert_eq!(ops[0].kind, OpKind::CreateDir);
    assert_eq!(
        (ops[1].kind, ops[1].path.as_path()),
        (OpKind::FsyncDir, Path::new(DIR))
    );
    // Every file: write tmp, fsync tmp, rename tmp -> name, fsync the checkpoint's dir.
    let files = ops
        .iter()
        .filter(|o| o.kind == OpKind::Rename && o.path.starts_with(&chk2))
        .count();
    assert_eq!(files, 4, "three state files and the manifest");
    for (i, o) in ops.iter().enumerate() {
        if o.kind == OpKind::Rename {
            assert_eq!(
                (ops[i - 2].kind, &ops[i - 2].path),
                (OpKind::Write, &o.path)
            );
            assert_eq!(
                (ops[i - 1].kind, &ops[i - 1].path),
                (OpKind::Fsync, &o.path)
            );
            assert!(o.path.to_str().unwrap().contains(".tmp-"), "{o}");
            assert_eq!(
                (ops[i + 1].kind, &ops[i + 1].path),
                (OpKind::FsyncDir, &chk2)
            );
        }
    }
    let manifest_rename =
        pos(&|o| o.kind == OpKind::Rename && o.to.as_deref() == Some(&chk2.join(MANIFEST)));
    let last_state_dir_fsync = ops[..manifest_rename]
        .iter()
        .rposition(|o| o.kind == OpKind::FsyncDir && o.path == chk2)
        .unwrap();
    let state_renames = ops[..manifest_rename]
        .iter()
        .filter(|o| o.kind == OpKind::Rename)
        .count();
    assert_eq!(
        state_renames, 3,
        "the manifest is renamed after every state file"
    );
    assert!(last_state_dir_fsync < manifest_rename);
    // Retention starts only once the manifest's name is durable, and removes chk-1's
    // manifest first, durably.
    let chk1 = PathBuf::from(DIR).join("chk-00000001");
    let first_removal = pos(&|o| o.path.starts_with(&chk1));
    assert_eq!(first_removal, manifest_rename + 2);
    assert_eq!(ops[first_removal].kind, OpKind::RemoveFile);
    assert_eq!(ops[first_removal].path, chk1.join(MANIFEST));
    assert_eq!(
        (ops[first_removal + 1].kind, &ops[first_removal + 1].path),
        (OpKind::FsyncDir, &chk1)
    );
    let last = ops.last().unwrap();
    assert_eq!(
        (last.kind, last.path.as_path()),
        (OpKind::FsyncDir, Path::new(DIR))
    );
    assert_eq!(recover(&fs, "no fault"), 2);
}

/// Every mutating operation of checkpoint 2's commit and of retention, failed (EIO) or
/// crashed at: recovery always finds checkpoint 1 or 2 intact, never a corrupt one, and
/// which one is exactly what the protocol promises.
#[test]
fn crash_point_enumeration_finds_the_previous_or_the_new_checkpoint_every_time() {
    let (clean, base) = scenario(None);
    let ops: Vec<_> = clean.ops().into_iter().skip(base as usize).collect();
    let n = ops.len() as u64;
    let chk2 = PathBuf::from(DIR).join("chk-00000002");
    // The operation after which checkpoint 2 is durable: the dir fsync after its manifest's
    // rename (1-based, relative to `base`).
    let durable_at = ops
        .iter()
        .position(|o| o.kind == OpKind::Rename && o.to.as_deref() == Some(&chk2.join(MANIFEST)))
        .unwrap() as u64
        + 2;
    assert_eq!(ops[durable_at as usize - 1].kind, OpKind::FsyncDir);
    let mut scenarios = 0;
    for k in 1..=n {
        for kind in [FaultKind::Error, FaultKind::Crash] {
            let context = format!("fault {kind:?} at op {k}/{n} ({})", ops[k as usize - 1]);
            let (fs, _) = scenario(Some((k, kind)));
            let expected = if k <= durable_at { 1 } else { 2 };
            if kind == FaultKind::Error {
                // The live state (the run goes on), then a power cut on top of it.
                let live = FsStore::open_with(DIR, Arc::new(fs.clone())).unwrap();
                let newest = check_recovered(&live, &context).expect("one loads");
                assert_eq!(newest, expected, "{context} (live)");
                drop(live);
            }
            fs.crash();
            assert_eq!(recover(&fs, &context), expected, "{context}");
            scenarios += 1;
        }
    }
    assert_eq!(scenarios, 2 * n);
    // 2 (begin) + 3 × 4 (put) + 4 (complete) + retention 2 + 3 + 1 + 1 = 25 operations.
    assert_eq!(n, 25, "{ops:#?}");
    println!("crash points: {n} operations × 2 fault kinds = {scenarios} scenarios, all passed");
}

#[test]
fn an_fsync_error_is_fatal_and_never_retried() {
    for (offset, kind) in [(2u64, OpKind::Fsync), (4, OpKind::FsyncDir)] {
        let fs = SimFs::new();
        let store = FsStore::open_with(DIR, Arc::new(fs.clone())).unwrap();
        store.begin(1).unwrap();
        // put: write (+1), fsync (+2), rename (+3), fsync_dir (+4).
        let at = fs.op_count() + offset;
        fs.fail_at(at, FaultKind::Error);
        let err = store.put(1, "a#0.state", b"abc").unwrap_err();
        assert_eq!(fs.ops()[at as usize - 1].kind, kind);
        match &err {
            Error::CheckpointIo { op, path, .. } => {
                assert_eq!(*op, "fsync", "{err}");
                assert!(path.contains("chk-00000001"), "{err}");
            }
            other => panic!("{other:?}"),
        }
        // The fault was one-shot, but the store takes no more writes: nothing may complete
        // on top of data the kernel may have dropped.
        let again = store.put(1, "b#0.state", b"abc").unwrap_err().to_string();
        assert!(again.contains("fsync error is fatal"), "{again}");
        assert!(store.begin(2).is_err());
        let m = manifest(1, Vec::new());
        assert!(store.complete(&m).is_err());
        // Cleaning up still works.
        store.discard(1).unwrap();
        assert!(store.list().unwrap().is_empty());
    }
}

#[test]
fn put_after_discard_fails_and_never_recreates_the_checkpoint() {
    let fs = SimFs::new();
    let store = FsStore::open_with(DIR, Arc::new(fs.clone())).unwrap();
    store.begin(4).unwrap();
    store.put(4, "a#0.state", b"early").unwrap();
    store.discard(4).unwrap();
    let err = store.put(4, "a#1.state", b"late").unwrap_err().to_string();
    assert!(err.contains("discarded"), "{err}");
    assert!(store.list().unwrap().is_empty());
    // Discarding what is not there succeeds.
    store.discard(4).unwrap();
    store.discard(99).unwrap();
}

/// A file system on which a late writer adds a file to a checkpoint between `discard`'s
/// listing and its `rmdir` (twice).
struct RacingFs {
    inner: SimFs,
    races: std::sync::atomic::AtomicU32,
}

impl Fs for RacingFs {
    fn create_dir(&self, p: &Path) -> std::io::Result<()> {
        self.inner.create_dir(p)
    }
    fn write(&self, p: &Path, b: &[u8]) -> std::io::Result<()> {
        self.inner.write(p, b)
    }
    fn fsync(&self, p: &Path) -> std::io::Result<()> {
        self.inner.fsync(p)
    }
    fn rename(&self, f: &Path, t: &Path) -> std::io::Result<()> {
        self.inner.rename(f, t)
    }
    fn fsync_dir(&self, p: &Path) -> std::io::Result<()> {
        self.inner.fsync_dir(p)
    }
    fn remove_file(&self, p: &Path) -> std::io::Result<()> {
        self.inner.remove_file(p)
    }
    fn remove_dir(&self, p: &Path) -> std::io::Result<()> {
        if self.races.fetch_add(1, Ordering::SeqCst) < 2 {
            self.inner.write(
                &p.join("late#0.state.tmp-0123456789abcdef0123456789abcdef"),
                b"x",
            )?;
        }
        self.inner.remove_dir(p)
    }
    fn read_dir(&self, p: &Path) -> std::io::Result<Vec<String>> {
        self.inner.read_dir(p)
    }
    fn read(&self, p: &Path) -> std::io::Result<Vec<u8>> {
        self.inner.read(p)
    }
    fn lock_exclusive(&self, p: &Path) -> std::io::Result<LockGuard> {
        self.inner.lock_exclusive(p)
    }
    fn create(&self, p: &Path) -> std::io::Result<Box<dyn FsFile>> {
        self.inner.create(p)
    }
    fn open_append(&self, p: &Path) -> std::io::Result<Box<dyn FsFile>> {
        self.inner.open_append(p)
    }
    fn truncate(&self, p: &Path, len: u64) -> std::io::Result<()> {
        self.inner.truncate(p, len)
    }
    fn file_len(&self, p: &Path) -> std::io::Result<u64> {
        self.inner.file_len(p)
    }
    fn create_dir_all(&self, p: &Path) -> std::io::Result<()> {
        self.inner.create_dir_all(p)
    }
    fn canonicalize(&self, p: &Path) -> std::io::Result<PathBuf> {
        self.inner.canonicalize(p)
    }
}

#[test]
fn discard_outlasts_a_late_writer() {
    let sim = SimFs::new();
    let fs = Arc::new(RacingFs {
        inner: sim.clone(),
        races: Default::default(),
    });
    let store = FsStore::open_with(DIR, fs.clone()).unwrap();
    commit(&store, 1).unwrap();
    store.discard(1).unwrap();
    assert_eq!(
        fs.races.load(Ordering::SeqCst),
        3,
        "two ENOTEMPTY, then removed"
    );
    assert_eq!(sim.read_dir(Path::new(DIR)).unwrap(), Vec::<String>::new());
    let rmdirs = sim
        .ops()
        .iter()
        .filter(|o| o.kind == OpKind::RemoveDir)
        .map(|o| o.ok)
        .collect::<Vec<_>>();
    assert_eq!(rmdirs, vec![false, false, true]);
}

#[test]
fn stale_temporary_files_are_removed_on_open_and_never_listed() {
    let dir = tempfile::tempdir().unwrap();
    let store = FsStore::open(dir.path()).unwrap();
    commit(&store, 1).unwrap();
    drop(store);
    let chk = dir.path().join("chk-00000001");
    let stale = chk.join("count#9.state.tmp-00000000000000000000000000000000");
    let stale_top = dir.path().join("x.tmp-ffffffffffffffffffffffffffffffff");
    std::fs::write(&stale, b"half").unwrap();
    std::fs::write(&stale_top, b"half").unwrap();
    // A name that only looks like one stays.
    let keep = chk.join("count.tmp-x#0.state");
    std::fs::write(&keep, b"not mine").unwrap();
    let store = FsStore::open(dir.path()).unwrap();
    assert!(!stale.exists() && !stale_top.exists());
    assert!(keep.exists());
    let l = store.list().unwrap();
    assert_eq!(l.len(), 1);
    assert_eq!(l[0].problem, None);
    assert_eq!(l[0].created_ms, Some(1_700_000_000_001));
}

#[test]
fn stage_names_become_safe_distinct_reversible_file_names() {
    let names = [
        "a/b", "a%2Fb", "../x", "a#1", "a", "über", "", ".", "MANIFEST", "x y",
    ];
    let mut files = std::collections::BTreeSet::new();
    for stage in names {
        for i in [0usize, 1, 12] {
            let who = inst(stage, i);
            let f = store::state_file_name(&who);
            assert!(!f.contains('/') && f.matches('#').count() == 1, "{f}");
            assert_eq!(store::parse_state_file_name(&f), Some(who), "{f}");
            assert!(files.insert(f));
        }
    }
    assert_eq!(store::state_file_name(&inst("a/b", 0)), "a%2Fb#0.state");
    assert_eq!(store::state_file_name(&inst("a%2Fb", 0)), "a%252Fb#0.state");
    // Every escaped name is accepted and stays in the checkpoint's directory.
    let dir = tempfile::tempdir().unwrap();
    let store = FsStore::open(dir.path()).unwrap();
    store.begin(1).unwrap();
    for f in &files {
        store.put(1, f, f.as_bytes()).unwrap();
    }
    let on_disk = std::fs::read_dir(dir.path().join("chk-00000001"))
        .unwrap()
        .count();
    assert_eq!(on_disk, files.len());
    // A raw name that could leave the directory, or clash with the store's own, is refused.
    for bad in [
        "../evil",
        "a/b",
        "MANIFEST",
        "",
        "..",
        "x.tmp-0123456789abcdef0123456789abcdef",
    ] {
        let e = store.put(1, bad, b"x").unwrap_err();
        assert!(matches!(e, Error::Checkpoint { .. }), "{bad}: {e:?}");
    }
    assert!(!dir.path().join("evil").exists());
}

/// Set in the child process of `the_directory_lock_refuses_a_second_run`.
const LOCK_CHILD: &str = "MILLRACE_TEST_CHECKPOINT_LOCK_CHILD";

#[test]
fn the_directory_lock_refuses_a_second_run() {
    if let Some(dir) = std::env::var_os(LOCK_CHILD) {
        // The child: report what opening the store gave.
        match FsStore::open(&dir) {
            Ok(_) => println!("CHILD: opened"),
            Err(Error::CheckpointDirLocked { .. }) => println!("CHILD: locked"),
            Err(e) => println!("CHILD: error {e}"),
        }
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("nested/ckpt");
    let store = FsStore::open(&ckpt).unwrap();
    // In this process.
    let err = FsStore::open(&ckpt).unwrap_err();
    assert!(matches!(err, Error::CheckpointDirLocked { .. }), "{err:?}");
    assert!(err.to_string().contains("in use by another run"), "{err}");
    // In another process.
    let child = || {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "the_directory_lock_refuses_a_second_run",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(LOCK_CHILD, &ckpt)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        // The test harness prints "test NAME ... " before the child's line.
        stdout
            .lines()
            .find_map(|l| l.find("CHILD: ").map(|at| l[at..].to_string()))
            .unwrap_or_else(|| panic!("{stdout}"))
    };
    assert_eq!(child(), "CHILD: locked");
    drop(store);
    assert_eq!(child(), "CHILD: opened");
    FsStore::open(&ckpt).unwrap();
}

/// Corrupts one file of checkpoint 2 of a real directory holding 1 and 2.
fn corrupted(file: &str, change: impl FnOnce(&mut Vec<u8>)) -> (tempfile::TempDir, Arc<FsStore>) {
    let dir = tempfile::tempdir().unwrap();
    let store = FsStore::open(dir.path()).unwrap();
    commit(&store, 1).unwrap();
    commit(&store, 2).unwrap();
    let path = dir.path().join("chk-00000002").join(file);
    let mut bytes = std::fs::read(&path).unwrap();
    change(&mut bytes);
    std::fs::write(&path, bytes).unwrap();
    (dir, store)
}

#[test]
fn torn_and_bit_flipped_files_fail_to_load_naming_the_file_and_the_reason() {
    let state = store::state_file_name(&inst("count", 1));
    let state = state.as_str();
    type Change = Box<dyn FnOnce(&mut Vec<u8>)>;
    let cases: Vec<(&str, Change, &str)> = vec![
        (
            state,
            Box::new(|b: &mut Vec<u8>| b.truncate(b.len() / 2)),
            "truncated",
        ),
        (
            state,
            Box::new(|b: &mut Vec<u8>| b[17] ^= 0x10),
            "checksum mismatch",
        ),
        (state, Box::new(|b: &mut Vec<u8>| b.push(0)), "too long"),
        (
            MANIFEST,
            Box::new(|b: &mut Vec<u8>| b.truncate(b.len() - 3)),
            "torn or truncated",
        ),
        (
            MANIFEST,
            Box::new(|b: &mut Vec<u8>| b.truncate(b.len() / 2)),
            "torn or truncated",
        ),
        (
            MANIFEST,
            Box::new(|b: &mut Vec<u8>| b[40] ^= 0x01),
            "checksum mismatch",
        ),
        (
            MANIFEST,
            Box::new(|b: &mut Vec<u8>| b[3] ^= 0x01),
            "not a millrace manifest",
        ),
        (
            MANIFEST,
            Box::new(|b: &mut Vec<u8>| b.clear()),
            "torn or truncated",
        ),
    ];
    for (file, change, reason) in cases {
        let (dir, store) = corrupted(file, change);
        let err = store.load(2).unwrap_err().to_string();
        assert!(err.contains(reason), "{file}: {err}");
        assert!(err.contains("checkpoint 2"), "{err}");
        if file != MANIFEST {
            assert!(err.contains(&format!("file `{file}`")), "{err}");
        } else {
            assert!(err.contains("MANIFEST: "), "{err}");
        }
        let listed = store.list().unwrap();
        assert_eq!(listed[0].problem, None);
        assert!(
            listed[1].problem.as_deref().unwrap().contains(reason),
            "{listed:?}"
        );
        // The previous one loads, and the tool says the same, read-only, lock held or not.
        assert_eq!(check_recovered(&store, file), Some(1));
        let problems = verify::verify(dir.path()).unwrap().problems;
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].checkpoint, 2);
        assert!(problems[0].message.contains(reason));
        assert_eq!(verify::list(dir.path()).unwrap(), listed);
    }
}

#[test]
fn read_verifies_against_the_entry() {
    let dir = tempfile::tempdir().unwrap();
    let store = FsStore::open(dir.path()).unwrap();
    store.begin(1).unwrap();
    let e = store.put(1, "a#0.state", b"hello").unwrap();
    assert_eq!((e.size, e.crc32c), (5, crc32c::crc32c(b"hello")));
    assert_eq!(store.read(1, &e).unwrap(), b"hello");
    let wrong = FileEntry {
        crc32c: e.crc32c ^ 1,
        ..e.clone()
    };
    let err = store.read(1, &wrong).unwrap_err().to_string();
    assert!(
        err.contains("a#0.state") && err.contains("checksum mismatch"),
        "{err}"
    );
    let missing = FileEntry {
        name: "b#0.state".into(),
        ..e
    };
    assert!(store
        .read(1, &missing)
        .unwrap_err()
        .to_string()
        .contains("missing"));
    // Not complete yet: listed as in progress by its writer.
    let l = store.list().unwrap();
    assert!(
        l[0].problem.as_deref().unwrap().contains("in progress"),
        "{l:?}"
    );
    // Another reader sees it as incomplete, and verify reports it.
    let p = verify::verify(dir.path()).unwrap().problems;
    assert!(p[0].message.contains("no MANIFEST"), "{p:?}");
}

#[test]
fn the_manifest_is_versioned_and_carries_its_own_checksum() {
    let m = manifest(3, Vec::new());
    let bytes = store::encode_manifest(&m).unwrap();
    let text = String::from_utf8(bytes.clone()).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert_eq!(lines[0], "MILLRACE-MANIFEST v1");
    let crc = crc32c::crc32c(&bytes[..bytes.len() - "crc32c 00000000\n".len()]);
    assert_eq!(lines[2], format!("crc32c {crc:08x}"));
    assert_eq!(store::decode_manifest(&bytes).unwrap(), m);
    // Every proper prefix of a manifest is rejected (a torn write never parses).
    for n in 0..bytes.len() {
        assert!(store::decode_manifest(&bytes[..n]).is_err(), "prefix {n}");
    }
    let v2 = text.replacen("v1", "v2", 1);
    let err = store::decode_manifest(v2.as_bytes()).unwrap_err();
    assert!(err.contains("version 2 is not supported"), "{err}");
}

fn keyed(
    store: &FsStore,
    id: CheckpointId,
    stage: &str,
    ranges: &[(u16, u16)],
    positions: &[(&str, u64)],
    precommitted: &[String],
) {
    store.begin(id).unwrap();
    let mut instances = Vec::new();
    for (i, r) in ranges.iter().enumerate() {
        let who = inst(stage, i);
        let file = store.put(id, &store::state_file_name(&who), b"s").unwrap();
        let mut e = entry(who, file);
        e.key_groups = Some(*r);
        instances.push(e);
    }
    let who = inst("src", 0);
    let file = store.put(id, &store::state_file_name(&who), b"p").unwrap();
    let mut e = entry(who, file);
    e.positions = positions.iter().map(|(p, o)| (p.to_string(), *o)).collect();
    e.precommitted = precommitted.to_vec();
    instances.push(e);
    store.complete(&manifest(id, instances)).unwrap();
}

#[test]
fn verify_checks_key_groups_positions_and_precommitted_files() {
    let dir = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let pending = out.path().join(".part-1.pending");
    let committed = out.path().join(".part-2.pending");
    let gone = out.path().join(".part-3.pending");
    std::fs::write(&pending, b"").unwrap();
    std::fs::write(out.path().join("part-2"), b"").unwrap();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let store = FsStore::open(dir.path()).unwrap();
    keyed(
        &store,
        1,
        "count",
        &[(0, 64), (64, 128)],
        &[("a.txt", 100)],
        &[s(&pending)],
    );
    keyed(
        &store,
        2,
        "count",
        &[(0, 43), (43, 85), (85, 128)],
        &[("a.txt", 150)],
        &[s(&committed)],
    );
    assert_eq!(verify::verify(dir.path()).unwrap().problems, vec![]);
    keyed(
        &store,
        3,
        "count",
        &[(0, 60), (64, 128)],
        &[("a.txt", 150)],
        &[],
    );
    keyed(
        &store,
        4,
        "count",
        &[(0, 70), (64, 120)],
        &[("a.txt", 149)],
        &[s(&gone)],
    );
    let problems: Vec<String> = verify::verify(dir.path())
        .unwrap()
        .problems
        .iter()
        .map(|p| p.to_string())
        .collect();
    let expected = vec![
        "checkpoint 3: stage `count`: key groups 60..64 are not covered by any instance"
            .to_string(),
        "checkpoint 4: stage `count`: key groups 64..70 of instance count#1 overlap another \
         instance's"
            .to_string(),
        "checkpoint 4: stage `count`: key groups 120..128 are not covered by any instance"
            .to_string(),
        "checkpoint 4: source src#0: position in `a.txt` is 149, behind 150 in checkpoint 3"
            .to_string(),
        format!(
            "checkpoint 4: sink src#0: pre-committed file {} is missing (neither pending nor \
             committed)",
            gone.display()
        ),
    ];
    assert_eq!(problems, expected);
}

#[test]
fn listing_a_missing_directory_is_an_error_naming_it() {
    let err = verify::list("/nonexistent/millrace-ckpt").unwrap_err();
    match &err {
        Error::CheckpointIo { path, .. } => assert!(path.contains("millrace-ckpt"), "{err}"),
        other => panic!("{other:?}"),
    }
    // A read-only look never creates it.
    assert!(!Path::new("/nonexistent/millrace-ckpt").exists());
}

#[test]
fn list_never_removes_a_temporary_file_of_a_checkpoint_in_progress() {
    let fs = SimFs::new();
    let store = FsStore::open_with(DIR, Arc::new(fs.clone())).unwrap();
    store.begin(1).unwrap();
    let tmp = Path::new(DIR).join("chk-00000001/a#0.state.tmp-0123456789abcdef0123456789abcdef");
    // A writer between its write and its fsync.
    fs.write(&tmp, b"in flight").unwrap();
    let l = store.list().unwrap();
    assert!(l[0].problem.as_deref().unwrap().contains("in progress"));
    assert_eq!(fs.read(&tmp).unwrap(), b"in flight");
    store.complete(&manifest(1, Vec::new())).unwrap();
    // Finished: a temporary file left there is stale now.
    assert_eq!(store.list().unwrap()[0].problem, None);
    assert!(fs.read(&tmp).is_err());
}

/// The completion mark: durable once written (a crash right after keeps it), at every crash
/// point of its write either there or not (never half), invisible to `list`, and cleared
/// durably.
#[test]
fn the_completion_mark_is_durable_and_never_a_checkpoint() {
    let fs = SimFs::new();
    let store = FsStore::open_with(DIR, Arc::new(fs.clone())).unwrap();
    commit(&store, 1).unwrap();
    assert_eq!(store.completed().unwrap(), None);
    let base = fs.op_count();
    store.mark_completed().unwrap();
    let ops = fs.op_count() - base;
    assert!(store.completed().unwrap().is_some_and(|ms| ms > 0));
    drop(store);
    fs.crash();
    let store = FsStore::open_with(DIR, Arc::new(fs.clone())).unwrap();
    assert!(store.completed().unwrap().is_some(), "lost by a crash");
    let ids: Vec<_> = store.list().unwrap().iter().map(|l| l.id).collect();
    assert_eq!(ids, [1], "the mark is no checkpoint");
    store.clear_completed().unwrap();
    drop(store);
    fs.crash();
    let store = FsStore::open_with(DIR, Arc::new(fs.clone())).unwrap();
    assert_eq!(store.completed().unwrap(), None, "the clearing was lost");
    drop(store);

    // Every crash point of the write.
    for k in 1..=ops {
        let fs = SimFs::new();
        let store = FsStore::open_with(DIR, Arc::new(fs.clone())).unwrap();
        commit(&store, 1).unwrap();
        fs.fail_at(fs.op_count() + k, FaultKind::Crash);
        let written = store.mark_completed().is_ok();
        drop(store);
        fs.crash();
        let store = FsStore::open_with(DIR, Arc::new(fs.clone())).unwrap();
        let mark = store.completed().unwrap();
        assert!(!written, "k = {k}: the write went through a crash");
        assert!(
            mark.is_none() || mark.is_some_and(|ms| ms > 0),
            "k = {k}: {mark:?}"
        );
        store.load(1).unwrap();
    }
}

/// A checkpoint directory that exists only in the page cache (an earlier run created it and
/// failed, fatally, on its parent's fsync) is made durable when a store opens on it, so that
/// the checkpoints written into it survive a crash.
#[test]
fn opening_an_existing_directory_makes_its_entry_durable() {
    let fs = SimFs::new();
    fs.create_dir(Path::new(DIR)).unwrap(); // never fsynced into its parent
    let store = FsStore::open_with(DIR, Arc::new(fs.clone())).unwrap();
    commit(&store, 1).unwrap();
    drop(store);
    fs.crash();
    let store = FsStore::open_with(DIR, Arc::new(fs.clone())).unwrap();
    store
        .load(1)
        .expect("checkpoint 1 survives the crash with its directory");
}

/// A start-up lists checkpoint ids without reading their files (`ids`), and a resume reads the
/// one it restores once (`load_files`, verified on the bytes it returns): a damaged file is
/// not seen by `ids`, and fails `load_files` naming it.
#[test]
fn ids_read_no_file_and_load_files_verifies_what_it_returns() {
    let fs = SimFs::new();
    let store = FsStore::open_with(DIR, Arc::new(fs.clone())).unwrap();
    commit(&store, 1).unwrap();
    commit(&store, 2).unwrap();
    let (m, files) = store.load_files(2).unwrap();
    assert_eq!(files.len(), m.instances.len());
    for (e, bytes) in m.instances.iter().zip(&files) {
        assert_eq!(bytes, &store.read(2, &e.file).unwrap());
    }
    let name = &m.instances[0].file.name;
    fs.corrupt(&Path::new(DIR).join("chk-00000002").join(name), |b| {
        b[0] ^= 1
    })
    .unwrap();
    assert_eq!(store.ids().unwrap(), [(1, true), (2, true)]);
    let e = store.load_files(2).unwrap_err().to_string();
    assert!(e.contains(name.as_str()) && e.contains("checksum"), "{e}");
    store.load_files(1).unwrap();
}
