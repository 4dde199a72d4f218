//! Checkpoints end to end through the `millrace` binary: a sequence-checked input, `kill -9` at
//! random moments and `--resume` (≥ 50 times, at parallelism 1 and 2), torn and bit-flipped
//! checkpoint files, the refusals, `checkpoint list` / `verify`, and the report.
//!
//! The input: 1,000,000 records `{"key":"kNN","seq":S}`, 50 keys, each key's `seq` counting
//! 0, 1, 2, … in file order, the keys shuffled (a seeded generator). The pipeline counts per key
//! (`count`, sorted by count) and writes every record through to a file and to a directory of
//! part files. A failure-free run at parallelism 1 writes the input back byte for byte (the
//! records are written canonically, as serde_json does) and counts that the generator knows;
//! after any number of kills and resumes the outputs must be the same bytes (the parts
//! concatenated in name order; at parallelism 2, the same multiset of lines), and every key's
//! `seq` must appear exactly once: lost = duplicated = 0.
// A test drives the binary from outside with std's threads and processes: the `crate::sync`
// rule (clippy.toml) is for the engine's own code.
#![allow(clippy::disallowed_types, clippy::disallowed_methods)]

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_millrace");
const KEYS: usize = 50;
const RECORDS: usize = 1_000_000;
/// Longest any one wait for a run may take before the test fails (generous: 2 shared cores).
const PATIENCE: Duration = Duration::from_secs(120);

/// The tests that run the binary hard take turns, so that one's kill times are not skewed by
/// another's load (and the file stays within its time budget on 2 cores).
fn heavy() -> MutexGuard<'static, ()> {
    static HEAVY: Mutex<()> = Mutex::new(());
    HEAVY.lock().unwrap_or_else(|e| e.into_inner())
}

#[path = "common/rng.rs"]
mod rng;
use rng::Rng;

/// The input (canonical JSON lines) and each key's record count.
struct Input {
    bytes: Vec<u8>,
    per_key: BTreeMap<String, u64>,
}

fn input() -> &'static Input {
    static INPUT: OnceLock<Input> = OnceLock::new();
    INPUT.get_or_init(|| {
        let mut rng = Rng(15);
        let mut seq = [0u64; KEYS];
        let mut bytes = Vec::with_capacity(RECORDS * 24);
        for _ in 0..RECORDS {
            let k = rng.below(KEYS as u64) as usize;
            writeln!(bytes, "{{\"key\":\"k{k:02}\",\"seq\":{}}}", seq[k]).unwrap();
            seq[k] += 1;
        }
        let per_key = (0..KEYS).map(|k| (format!("k{k:02}"), seq[k])).collect();
        Input { bytes, per_key }
    })
}

/// What the `count` stage must write: by count descending, then key.
fn expected_counts() -> Vec<u8> {
    let mut rows: Vec<(&String, &u64)> = input().per_key.iter().collect();
    rows.sort_by(|a, b| b.1.cmp(a.1).then_with(|| a.0.cmp(b.0)));
    let mut out = Vec::new();
    for (k, n) in rows {
        writeln!(out, "{{\"count\":{n},\"key\":\"{k}\"}}").unwrap();
    }
    out
}

fn pipeline(parallelism: usize, extra: &str) -> String {
    let par = if parallelism > 1 {
        format!("parallelism = {parallelism}\n")
    } else {
        String::new()
    };
    format!(
        r#"[checkpoint]
dir = "cp"
interval = "100ms"
{extra}
[stages.read]
kind = "ndjson.read"
path = "input.ndjson"
{par}
[stages.counts]
kind = "count"
input = "read"
key = "key"
{par}
[stages.counts_out]
kind = "ndjson.write"
input = "counts"
path = "out/counts.ndjson"

[stages.all]
kind = "ndjson.write"
input = "read"
path = "out/all.ndjson"

[stages.parts]
kind = "ndjson.write"
input = "read"
dir = "out/parts"
"#
    )
}

/// A fresh directory with the input and the pipeline `p.toml`.
fn setup(parallelism: usize) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("input.ndjson"), &input().bytes).unwrap();
    std::fs::write(dir.path().join("p.toml"), pipeline(parallelism, "")).unwrap();
    dir
}

fn millrace(dir: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.current_dir(dir).args(args).stdin(Stdio::null());
    c
}

fn run(dir: &Path, args: &[&str]) -> Output {
    millrace(dir, args).output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Starts a run whose stderr goes to `dir/stderr.<n>` (a pipe nobody reads could fill).
fn spawn(dir: &Path, args: &[&str], n: usize) -> Child {
    let err = std::fs::File::create(dir.join(format!("stderr.{n}"))).unwrap();
    millrace(dir, args)
        .stdout(Stdio::null())
        .stderr(Stdio::from(err))
        .spawn()
        .unwrap()
}

/// The checkpoints in `dir/cp`: (id, complete — its MANIFEST is there).
fn checkpoints(dir: &Path) -> Vec<(u64, bool)> {
    let Ok(rd) = std::fs::read_dir(dir.join("cp")) else {
        return Vec::new();
    };
    let mut v: Vec<(u64, bool)> = rd
        .filter_map(|e| {
            let e = e.ok()?;
            let name = e.file_name().into_string().ok()?;
            let id = name.strip_prefix("chk-")?.parse().ok()?;
            Some((id, e.path().join("MANIFEST").exists()))
        })
        .collect();
    v.sort_unstable();
    v
}

fn complete(dir: &Path) -> Vec<u64> {
    checkpoints(dir)
        .into_iter()
        .filter(|c| c.1)
        .map(|c| c.0)
        .collect()
}

/// Waits until `until` holds or the child exits; true if it holds.
fn wait_for(child: &mut Child, what: &str, mut until: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if until() {
            return true;
        }
        if child.try_wait().unwrap().is_some() {
            return until();
        }
        assert!(start.elapsed() < PATIENCE, "no {what} within {PATIENCE:?}");
        std::thread::sleep(Duration::from_millis(2)); // polling, not synchronisation
    }
}

/// Starts a run and kills it (SIGKILL) once `n` complete checkpoints exist; returns them.
fn run_until_checkpoints(dir: &Path, n: usize) -> Vec<u64> {
    let mut child = spawn(dir, &["run", "-q", "p.toml"], 0);
    let reached = wait_for(&mut child, "checkpoints", || complete(dir).len() >= n);
    let _ = child.kill();
    let status = child.wait().unwrap();
    assert!(
        reached,
        "the run ended ({status}) before {n} checkpoints completed: {}",
        std::fs::read_to_string(dir.join("stderr.0")).unwrap_or_default()
    );
    complete(dir)
}

/// The committed outputs: counts, the pass-through file, and the parts concatenated in name
/// order (in-progress parts are hidden: their names start with a dot).
struct Outputs {
    counts: Vec<u8>,
    all: Vec<u8>,
    parts: Vec<u8>,
    part_files: usize,
}

fn outputs(dir: &Path) -> Outputs {
    let read = |p: &str| std::fs::read(dir.join(p)).unwrap_or_else(|e| panic!("{p}: {e}"));
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir.join("out/parts"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| !p.file_name().unwrap().to_string_lossy().starts_with('.'))
        .collect();
    names.sort();
    let mut parts = Vec::new();
    for n in &names {
        parts.extend(std::fs::read(n).unwrap());
    }
    Outputs {
        counts: read("out/counts.ndjson"),
        all: read("out/all.ndjson"),
        parts,
        part_files: names.len(),
    }
}

fn sorted_lines(b: &[u8]) -> Vec<&[u8]> {
    let mut v: Vec<&[u8]> = b.split(|&c| c == b'\n').collect();
    v.sort_unstable();
    v
}

/// Every key's `seq` exactly once (and, `in_order`, in order); the number of lost and of
/// duplicated records otherwise, in the panic message.
fn check_sequences(what: &str, bytes: &[u8], in_order: bool) {
    assert!(
        bytes.is_empty() || bytes.ends_with(b"\n"),
        "{what}: a torn last line"
    );
    let mut seen: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for line in bytes.split(|&c| c == b'\n').filter(|l| !l.is_empty()) {
        let v: serde_json::Value = serde_json::from_slice(line)
            .unwrap_or_else(|e| panic!("{what}: {e}: {:?}", text(line)));
        seen.entry(v["key"].as_str().unwrap().to_string())
            .or_default()
            .push(v["seq"].as_u64().unwrap());
    }
    let (mut lost, mut duplicated, mut disordered) = (0u64, 0u64, 0u64);
    for (k, &n) in &input().per_key {
        let mut seqs = seen.remove(k).unwrap_or_default();
        if seqs.windows(2).any(|w| w[1] != w[0] + 1) {
            disordered += 1;
        }
        seqs.sort_unstable();
        let before = seqs.len() as u64;
        seqs.dedup();
        duplicated += before - seqs.len() as u64;
        lost += n - seqs.iter().filter(|&&s| s < n).count() as u64;
    }
    assert!(seen.is_empty(), "{what}: unknown keys {:?}", seen.keys());
    assert_eq!((lost, duplicated), (0, 0), "{what}: lost, duplicated");
    if in_order {
        assert_eq!(disordered, 0, "{what}: keys whose seq did not advance by 1");
    }
}

/// The outputs after a failure-free run, or after crashes and resumes: at parallelism 1 the
/// same bytes as the input (and the counts the generator knows); otherwise the same lines.
fn assert_exact(dir: &Path, parallelism: usize) {
    let o = outputs(dir);
    let expect = &input().bytes;
    assert!(
        o.counts == expected_counts(),
        "counts differ:\n{}",
        text(&o.counts)
    );
    assert!(o.part_files >= 1, "no committed part file");
    if parallelism == 1 {
        assert!(
            &o.all == expect,
            "out/all.ndjson differs from the reference ({} bytes, expected {})",
            o.all.len(),
            expect.len()
        );
        assert!(
            &o.parts == expect,
            "the parts differ from the reference ({} bytes, expected {})",
            o.parts.len(),
            expect.len()
        );
    } else {
        assert!(
            sorted_lines(&o.all) == sorted_lines(expect),
            "out/all.ndjson is not the input's multiset of lines"
        );
        assert!(
            sorted_lines(&o.parts) == sorted_lines(expect),
            "the parts are not the input's multiset of lines"
        );
    }
    check_sequences("out/all.ndjson", &o.all, parallelism == 1);
    check_sequences("out/parts", &o.parts, parallelism == 1);
}

#[test]
fn a_failure_free_run_is_the_reference() {
    let _g = heavy();
    let dir = setup(1);
    let out = run(dir.path(), &["run", "p.toml"]);
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert_exact(dir.path(), 1);
    // The report's checkpoint line: the run took long enough for some to complete.
    let line = err
        .lines()
        .find(|l| l.starts_with("checkpoints: "))
        .unwrap_or_else(|| panic!("no checkpoints line in the report:\n{err}"));
    let completed: u64 = line["checkpoints: ".len()..]
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap_or_else(|_| panic!("{line}"));
    assert!(completed >= 1, "{line}");
    assert!(line.contains("0 failed"), "{line}");
    assert!(
        !err.contains("resumed from"),
        "a fresh run resumes nothing: {err}"
    );
    // A completed run removes its checkpoints.
    assert_eq!(
        checkpoints(dir.path()),
        [],
        "checkpoints left after success"
    );
}

/// `kills` times: start `run --resume` (the first without), SIGKILL it at a random moment —
/// most often a random delay after it completed a new checkpoint (so every round makes
/// progress), sometimes a random delay after it started (during its restore, or before its
/// first checkpoint) — then run it to completion and compare.
fn kill_loop(parallelism: usize, kills: usize, seed: u64) {
    let _g = heavy();
    let dir = setup(parallelism);
    let d = dir.path();
    let mut rng = Rng(seed);
    let (mut killed, mut finished, mut round) = (0, 0, 0);
    let mut fresh = true;
    let started = Instant::now();
    while killed < kills {
        round += 1;
        let args: &[&str] = if std::mem::take(&mut fresh) {
            &["run", "-q", "p.toml"]
        } else {
            &["run", "-q", "--resume", "p.toml"]
        };
        let before = complete(d).last().copied().unwrap_or(0);
        let mut child = spawn(d, args, round);
        if rng.below(5) > 0 {
            wait_for(&mut child, "new checkpoint", || {
                complete(d).last().copied().unwrap_or(0) > before
            });
        }
        std::thread::sleep(Duration::from_millis(rng.below(150))); // the kill time
        match child.try_wait().unwrap() {
            Some(status) => {
                let err = std::fs::read_to_string(d.join(format!("stderr.{round}"))).unwrap();
                assert!(status.success(), "round {round}: {status}: {err}");
                // It completed first (or, killed while it removed its checkpoints after it
                // completed, the resume found nothing to do): its output is complete. A
                // directory sink refuses to write over a finished run's parts, so clear the
                // output as a user starting over would: the next round starts afresh.
                assert_exact(d, parallelism);
                finished += 1;
                fresh = true;
                std::fs::remove_dir_all(d.join("out")).unwrap();
                // A round waits for a new checkpoint, which a ~1 s run reaches long before
                // its end: many runs completing first means checkpoints do not complete.
                assert!(
                    finished <= kills / 5,
                    "{finished} runs completed before their kill ({killed} kills): are checkpoints completing? {err}"
                );
            }
            None => {
                child.kill().unwrap();
                child.wait().unwrap();
                killed += 1;
            }
        }
    }
    let out = run(d, &["run", "--resume", "p.toml"]);
    let err = text(&out.stderr);
    assert!(out.status.success(), "the last resume failed: {err}");
    assert_exact(d, parallelism);
    // (Nothing to resume when the last kill came after the run had completed.)
    assert!(
        err.contains("checkpoints: ") || err.contains("nothing to resume"),
        "{err}"
    );
    assert_eq!(checkpoints(d), [], "checkpoints left after success");
    eprintln!(
        "parallelism {parallelism}: {killed} kills, {finished} runs completed on their own, {:?}",
        started.elapsed()
    );
}

#[test]
fn kill_9_loop_at_parallelism_1_is_byte_identical() {
    kill_loop(1, 50, 0x5eed_0001);
}

#[test]
fn kill_9_loop_at_parallelism_2_is_the_same_multiset() {
    kill_loop(2, 50, 0x5eed_0002);
}

/// Kills a run once two checkpoints completed, damages the newest, resumes: the resume says
/// it skipped it and used the one before, and the output is still exact.
fn resume_past_damage(damage: impl FnOnce(&Path) -> String) {
    let _g = heavy();
    let dir = setup(1);
    let d = dir.path();
    let done = run_until_checkpoints(d, 2);
    let (newest, previous) = (done[done.len() - 1], done[done.len() - 2]);
    let what = damage(&d.join(format!("cp/chk-{newest:08}")));
    let out = run(d, &["run", "--resume", "p.toml"]);
    let err = text(&out.stderr);
    assert!(out.status.success(), "{what}: {err}");
    assert!(
        err.contains(&format!(
            "resumed from checkpoint {previous} (skipped 1: {newest}: "
        )),
        "{what}: the report names the checkpoint used and the one skipped:\n{err}"
    );
    assert_exact(d, 1);
}

/// The largest state file of a checkpoint (the counts', most likely).
fn state_file(chk: &Path) -> PathBuf {
    std::fs::read_dir(chk)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "state"))
        .max_by_key(|p| p.metadata().unwrap().len())
        .unwrap_or_else(|| panic!("no state file in {}", chk.display()))
}

fn flip_bit(path: &Path) {
    let mut b = std::fs::read(path).unwrap();
    let at = b.len() / 2;
    b[at] ^= 0x10;
    std::fs::write(path, b).unwrap();
}

#[test]
fn a_torn_state_file_is_skipped_for_the_previous_checkpoint() {
    resume_past_damage(|chk| {
        let f = state_file(chk);
        let len = f.metadata().unwrap().len();
        let file = std::fs::OpenOptions::new().write(true).open(&f).unwrap();
        file.set_len(len / 2).unwrap();
        format!("torn {}", f.display())
    });
}

#[test]
fn a_bit_flipped_manifest_is_skipped_for_the_previous_checkpoint() {
    resume_past_damage(|chk| {
        let f = chk.join("MANIFEST");
        flip_bit(&f);
        format!("bit-flipped {}", f.display())
    });
}

#[test]
fn checkpoint_list_and_verify_on_a_good_and_a_corrupted_dir() {
    let _g = heavy();
    let dir = setup(1);
    let d = dir.path();
    let done = run_until_checkpoints(d, 2);
    let newest = *done.last().unwrap();

    let out = run(d, &["checkpoint", "list", "cp"]);
    let listing = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let header = listing.lines().next().unwrap();
    for col in ["id", "created (UTC)", "size", "status"] {
        assert!(header.contains(col), "{listing}");
    }
    for id in &done {
        let row = listing
            .lines()
            .find(|l| l.split_whitespace().next() == Some(&id.to_string()))
            .unwrap_or_else(|| panic!("no row for checkpoint {id}:\n{listing}"));
        assert!(row.ends_with("  complete"), "{row}");
        assert!(row.contains(" 20"), "a time this century: {row}");
    }
    let out = run(d, &["checkpoint", "verify", "cp"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stdout));
    assert!(text(&out.stdout).contains("no problems"));

    let damaged = state_file(&d.join(format!("cp/chk-{newest:08}")));
    flip_bit(&damaged);
    let name = damaged.file_name().unwrap().to_string_lossy().into_owned();
    let out = run(d, &["checkpoint", "verify", "cp"]);
    let report = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{report}");
    assert!(
        report.contains(&name),
        "the problem names the file: {report}"
    );
    assert!(report.contains("1 problem in"), "{report}");
    let out = run(d, &["checkpoint", "list", "cp"]);
    let listing = text(&out.stdout);
    let row = listing
        .lines()
        .find(|l| l.split_whitespace().next() == Some(&newest.to_string()))
        .unwrap();
    assert!(row.contains("not complete: "), "{row}");

    for sub in ["list", "verify"] {
        let out = run(d, &["checkpoint", sub, "no-such-dir"]);
        assert_eq!(out.status.code(), Some(2), "{sub}: {}", text(&out.stderr));
    }
    let out = run(d, &["checkpoint", "verify"]);
    assert_eq!(out.status.code(), Some(2), "usage error");
}

#[test]
fn checkpoints_of_an_unfinished_run_need_resume_or_fresh() {
    let _g = heavy();
    let dir = setup(1);
    let d = dir.path();
    run_until_checkpoints(d, 1);
    let out = run(d, &["run", "p.toml"]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("--resume") && err.contains("--fresh") && err.contains("cp"),
        "{err}"
    );
    // The refusal left them as they were.
    assert!(!complete(d).is_empty());

    let out = run(d, &["run", "--resume", "--fresh", "p.toml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("cannot be used with"));

    let out = run(d, &["run", "--fresh", "p.toml"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_exact(d, 1);
    assert_eq!(checkpoints(d), []);
}

/// A small pipeline in a fresh directory: `[checkpoint]` with `extra`, then `stages`.
fn small(extra: &str, stages: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("in.ndjson"),
        "{\"a\":1}\n{\"a\":2}\n{\"a\":3}\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("p.toml"),
        format!("[checkpoint]\ndir = \"cp\"\n{extra}\n{stages}"),
    )
    .unwrap();
    dir
}

fn read_write(from: &str, to: &str) -> String {
    format!("[stages.read]\nkind = \"ndjson.read\"\npath = \"{from}\"\n\n[stages.out]\nkind = \"ndjson.write\"\ninput = \"read\"\npath = \"{to}\"\n")
}

#[test]
fn stdin_needs_spool_stdin_and_stdout_needs_at_least_once() {
    let dir = small("", &read_write("-", "out.ndjson"));
    let out = run(dir.path(), &["run", "p.toml"]);
    let err = text(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("stage `read`"), "{err}");
    assert!(
        err.contains("stdin") && err.contains("spool_stdin"),
        "{err}"
    );

    // With spool_stdin, stdin is logged in the checkpoint directory and read from there; a
    // completed run removes the log with its checkpoints.
    let dir = small("spool_stdin = true", &read_write("-", "out.ndjson"));
    let mut child = millrace(dir.path(), &["run", "-q", "p.toml"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"{\"a\":1}\n{\"a\":2}\n").unwrap();
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert_eq!(
        std::fs::read_to_string(dir.path().join("out.ndjson")).unwrap(),
        "{\"a\":1}\n{\"a\":2}\n"
    );
    assert!(
        !dir.path().join("cp/stdin.spool").exists(),
        "the spool outlived a completed run"
    );

    let dir = small("", &read_write("in.ndjson", "-"));
    let out = run(dir.path(), &["run", "p.toml"]);
    let err = text(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        // `read` and `out` fuse into one stage, `read+out`.
        err.contains("out`") && err.contains("stdout"),
        "{err}"
    );
    assert!(out.stdout.is_empty(), "refused before anything ran");

    // At least once, stdout is fine.
    let dir = small("mode = \"at_least_once\"", &read_write("in.ndjson", "-"));
    let out = run(dir.path(), &["run", "-q", "p.toml"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "{\"a\":1}\n{\"a\":2}\n{\"a\":3}\n");
}

#[test]
fn a_stateful_plugin_node_is_refused_naming_the_stage_and_the_plugin() {
    let stages = "plugin_dirs = [\"plugins\"]\n";
    let pipeline = |node: &str| {
        format!(
            "{}\n[stages.p]\nkind = \"cat.{node}\"\ninput = \"read\"\n\n[stages.out]\nkind = \"ndjson.write\"\ninput = \"p\"\npath = \"out.ndjson\"\n",
            "[stages.read]\nkind = \"ndjson.read\"\npath = \"in.ndjson\"\n"
        )
    };
    let dir = small("", "");
    let d = dir.path();
    std::fs::create_dir_all(d.join("plugins/cat")).unwrap();
    std::fs::write(
        d.join("plugins/cat/plugin.toml"),
        "name = \"cat\"\nversion = \"0.1.0\"\nkind = \"process\"\nentry = [\"cat\"]\nengine = \">=0.1\"\n\n[[nodes]]\nname = \"keep\"\n\n[[nodes]]\nname = \"pass\"\nstateless = true\n",
    )
    .unwrap();
    let write = |node: &str| {
        std::fs::write(
            d.join("p.toml"),
            format!("{stages}[checkpoint]\ndir = \"cp\"\n\n{}", pipeline(node)),
        )
        .unwrap()
    };
    write("keep");
    let out = run(d, &["run", "p.toml"]);
    let err = text(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("stage `p`: cannot checkpoint") && err.contains("plugin `cat` node `keep`"),
        "{err}"
    );
    assert!(
        err.contains("stateless = true"),
        "says what to change: {err}"
    );
    assert!(
        !d.join("out.ndjson").exists() || std::fs::read(d.join("out.ndjson")).unwrap().is_empty()
    );

    write("pass");
    let out = run(d, &["run", "-q", "p.toml"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        std::fs::read_to_string(d.join("out.ndjson")).unwrap(),
        "{\"a\":1}\n{\"a\":2}\n{\"a\":3}\n"
    );
}

#[test]
fn usage_errors_exit_2() {
    let dir = small("", &read_write("in.ndjson", "out.ndjson"));
    let d = dir.path();
    let out = run(d, &["run", "--watch", "p.toml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("--watch cannot be combined with a [checkpoint] table"),
        "{}",
        text(&out.stderr)
    );
    std::fs::write(d.join("plain.toml"), read_write("in.ndjson", "out.ndjson")).unwrap();
    for flag in ["--resume", "--fresh"] {
        let out = run(d, &["run", flag, "plain.toml"]);
        assert_eq!(out.status.code(), Some(2));
        assert!(
            text(&out.stderr).contains(&format!("{flag} needs a [checkpoint] table")),
            "{}",
            text(&out.stderr)
        );
    }
    std::fs::write(
        d.join("bad.toml"),
        format!(
            "[checkpoint]\ndir = \"cp\"\nretain = 0\n\n{}",
            read_write("in.ndjson", "out.ndjson")
        ),
    )
    .unwrap();
    let out = run(d, &["run", "bad.toml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("bad.toml:3: [checkpoint] retain"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn progress_json_and_the_final_report_carry_checkpoints() {
    let _g = heavy();
    let dir = setup(1);
    let out = run(dir.path(), &["run", "--progress", "json", "p.toml"]);
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    let events: Vec<serde_json::Value> = err
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let last = events.last().unwrap();
    assert_eq!(last["event"], "finished", "{last}");
    let c = &last["report"]["checkpoints"];
    assert!(c["completed"].as_u64().unwrap() >= 1, "{c}");
    assert_eq!(c["failed"], 0, "{c}");
    assert!(c["bytes"].as_u64().unwrap() > 0, "{c}");
    assert_eq!(c["resumed_from"], serde_json::Value::Null, "{c}");
    assert!(!c["recent"].as_array().unwrap().is_empty(), "{c}");
    for e in events.iter().filter(|e| e["event"] == "progress") {
        assert!(e["report"].get("checkpoints").is_some(), "{e}");
    }
    // Each stage instance's barrier alignment time.
    for s in last["report"]["stages"].as_array().unwrap() {
        assert!(s["aligning_ms"].as_f64().is_some(), "{s}");
    }
    assert_exact(dir.path(), 1);
}

/// The pipeline of [`pipeline`] reading its input from stdin, through the spool.
fn stdin_pipeline() -> String {
    pipeline(1, "spool_stdin = true").replace("path = \"input.ndjson\"", "path = \"-\"")
}

/// The bytes of stdin the spool in `dir/cp` holds, as `checkpoint list` reports them (0
/// without a spool).
fn spooled(dir: &Path) -> usize {
    let out = run(dir, &["checkpoint", "list", "cp"]);
    let listing = text(&out.stdout);
    listing
        .lines()
        .find_map(|l| l.strip_prefix("stdin spool: "))
        .map_or(0, |rest| {
            rest.split(' ')
                .next()
                .unwrap()
                .parse()
                .unwrap_or_else(|_| panic!("{listing}"))
        })
}

/// Starts a run of `p.toml` whose stdin is `input` (from a file, as `< file` would give it).
fn spawn_with_stdin(dir: &Path, args: &[&str], n: usize, input: &[u8]) -> Child {
    let path = dir.join(format!("stdin.{n}"));
    std::fs::write(&path, input).unwrap();
    let err = std::fs::File::create(dir.join(format!("stderr.{n}"))).unwrap();
    millrace(dir, args)
        .stdin(Stdio::from(std::fs::File::open(&path).unwrap()))
        .stdout(Stdio::null())
        .stderr(Stdio::from(err))
        .spawn()
        .unwrap()
}

/// `kill -9` loop over a pipeline reading stdin with `spool_stdin`: each resume is given the
/// rest of the input — what the spool does not hold yet, by `checkpoint list`'s count — as a
/// user re-piping it would; the output is the failure-free run's, byte for byte.
#[test]
fn kill_9_loop_over_spooled_stdin_is_byte_identical() {
    let _g = heavy();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("p.toml"), stdin_pipeline()).unwrap();
    let bytes = &input().bytes;
    let mut rng = Rng(0x5eed_0003);
    let (mut killed, mut round, mut finished) = (0, 0, 0);
    let mut fresh = true;
    while killed < 12 {
        round += 1;
        let fresh_round = std::mem::take(&mut fresh);
        let args: &[&str] = if fresh_round {
            &["run", "-q", "p.toml"]
        } else {
            &["run", "-q", "--resume", "p.toml"]
        };
        // A new run reads all of its input; a resume the rest of what the spool holds.
        let have = if fresh_round { 0 } else { spooled(d) };
        assert!(have <= bytes.len(), "the spool holds more than the input");
        let before = complete(d).last().copied().unwrap_or(0);
        let mut child = spawn_with_stdin(d, args, round, &bytes[have..]);
        if rng.below(4) > 0 {
            wait_for(&mut child, "new checkpoint", || {
                complete(d).last().copied().unwrap_or(0) > before
            });
        }
        std::thread::sleep(Duration::from_millis(rng.below(100))); // the kill time
        match child.try_wait().unwrap() {
            Some(status) => {
                // It completed before its kill, or a kill after it had completed left nothing
                // to resume: start over, as in `kill_loop`.
                let err = std::fs::read_to_string(d.join(format!("stderr.{round}"))).unwrap();
                assert!(status.success(), "round {round}: {status}: {err}");
                assert_exact(d, 1);
                finished += 1;
                assert!(
                    finished <= 3,
                    "{finished} runs completed before their kill: {err}"
                );
                fresh = true;
                std::fs::remove_dir_all(d.join("out")).unwrap();
            }
            None => {
                child.kill().unwrap();
                child.wait().unwrap();
                killed += 1;
            }
        }
    }
    let have = spooled(d);
    let mut child = spawn_with_stdin(d, &["run", "--resume", "p.toml"], 0, &bytes[have..]);
    let status = child.wait().unwrap();
    let err = std::fs::read_to_string(d.join("stderr.0")).unwrap();
    assert!(status.success(), "the last resume failed: {err}");
    assert!(
        err.contains("resumed from checkpoint") || err.contains("nothing to resume"),
        "{err}"
    );
    assert_exact(d, 1);
    assert_eq!(checkpoints(d), [], "checkpoints left after success");
    assert!(
        !d.join("cp/stdin.spool").exists(),
        "the spool left after success"
    );
}

/// A spool left by a run that died before its first checkpoint holds the start of that run's
/// input: a new run is refused (naming it) until `--resume` (which reads it first) or
/// `--fresh` (which removes it).
#[test]
fn a_spool_without_checkpoints_needs_resume_or_fresh() {
    let _g = heavy();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // No periodic checkpoint within the test's time.
    std::fs::write(
        d.join("p.toml"),
        stdin_pipeline().replace("interval = \"100ms\"", "interval = \"1h\""),
    )
    .unwrap();
    let bytes = &input().bytes;
    let mut child = spawn_with_stdin(d, &["run", "-q", "p.toml"], 1, bytes);
    let spool = d.join("cp/stdin.spool");
    let grew = wait_for(&mut child, "a spooled byte", || {
        spool.metadata().is_ok_and(|m| m.len() > 0)
    });
    let _ = child.kill();
    child.wait().unwrap();
    assert!(
        grew,
        "{}",
        std::fs::read_to_string(d.join("stderr.1")).unwrap()
    );
    // The first checkpoint is triggered at the start: remove what it left, as if the run had
    // died before it (the spool's writer starts first).
    for (id, _) in checkpoints(d) {
        std::fs::remove_dir_all(d.join(format!("cp/chk-{id:08}"))).unwrap();
    }

    let mut child = spawn_with_stdin(d, &["run", "-q", "p.toml"], 2, bytes);
    let status = child.wait().unwrap();
    let err = std::fs::read_to_string(d.join("stderr.2")).unwrap();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        err.contains("stdin spool") && err.contains("--resume") && err.contains("--fresh"),
        "{err}"
    );
    assert!(spool.exists(), "the refusal removed the spool");

    let mut child = spawn_with_stdin(d, &["run", "-q", "--fresh", "p.toml"], 3, bytes);
    let status = child.wait().unwrap();
    let err = std::fs::read_to_string(d.join("stderr.3")).unwrap();
    assert!(status.success(), "{err}");
    assert_exact(d, 1);
    assert!(!spool.exists(), "the spool left after success");
}

/// `--fresh` discards the earlier run's checkpoints only once the run is known to start: a
/// run refused at the start gate (here: a stdout sink in exactly-once mode, found when the
/// sinks are made) leaves them, and the earlier run can still be resumed.
#[test]
fn a_fresh_run_refused_at_the_gate_keeps_the_earlier_checkpoints() {
    let _g = heavy();
    let dir = setup(1);
    let d = dir.path();
    let done = run_until_checkpoints(d, 1);
    std::fs::write(
        d.join("stdout.toml"),
        format!(
            "{}\n[stages.echo]\nkind = \"ndjson.write\"\ninput = \"read\"\npath = \"-\"\n",
            pipeline(1, "")
        ),
    )
    .unwrap();
    let out = run(d, &["run", "--fresh", "stdout.toml"]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("stdout"), "{err}");
    assert_eq!(
        complete(d),
        done,
        "a refused --fresh run discarded the checkpoints: {err}"
    );
    let out = run(d, &["run", "--resume", "p.toml"]);
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains(&format!("resumed from checkpoint {}", done.last().unwrap())),
        "{err}"
    );
    assert_exact(d, 1);
}

/// A completed run marks its directory (`COMPLETED`) before it removes its checkpoints, so a
/// crash during the removal leaves a completed run: `--resume` then does nothing (exit 0,
/// saying so) and finishes the removal, rather than starting over from the beginning — which
/// would refuse the directory sink's parts, or rewrite the files.
#[test]
fn a_resume_after_the_run_completed_does_nothing() {
    let _g = heavy();
    let dir = setup(1);
    let d = dir.path();
    // Keep the checkpoints, then damage the newest as an interrupted removal does (its
    // MANIFEST goes first).
    std::fs::write(d.join("keep.toml"), pipeline(1, "retain_on_success = true")).unwrap();
    let out = run(d, &["run", "-q", "keep.toml"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(d.join("cp/COMPLETED").exists());
    let kept = complete(d);
    assert!(!kept.is_empty());
    std::fs::remove_file(d.join(format!("cp/chk-{:08}/MANIFEST", kept.last().unwrap()))).unwrap();
    let listing = text(&run(d, &["checkpoint", "list", "cp"]).stdout);
    assert!(listing.contains("the run completed at 20"), "{listing}");

    let before = outputs(d);
    let out = run(d, &["run", "--resume", "p.toml"]);
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("nothing to resume: the run of this checkpoint directory completed at 20"),
        "{err}"
    );
    assert_exact(d, 1);
    assert_eq!(outputs(d).all, before.all, "the output was rewritten");
    assert_eq!(checkpoints(d), [], "the interrupted removal was finished");

    // A plain run starts a new run (here refused by the directory sink, as after any
    // completed run: its parts are there), and a fresh one replaces everything.
    let out = run(d, &["run", "p.toml"]);
    assert!(
        text(&out.stderr).contains("holds part files of an earlier run"),
        "{}",
        text(&out.stderr)
    );
    let out = run(d, &["run", "-q", "--fresh", "p.toml"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_exact(d, 1);
}
