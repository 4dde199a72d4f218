//! The fault suite (issue 14, item 5): operators, native plugins, children (`exec` stages and a
//! process plugin), sinks and sources that fail in every way we know, each ending in a clear
//! error naming the stage (and the file) or in the documented recovery.
//!
//! Every case runs under [`case`]: a watchdog (the body runs on a thread of its own; a body
//! that has not finished after [`DEADLINE`] fails the test as "hung"), and a leak check: the
//! engine's threads (named `millrace...`) and this process's child processes are counted
//! before and right after the body, and must be the same (the engine joins and reaps
//! everything before `run` returns). The cases are serialised so that the counts are this
//! case's own. Fixtures: `tests/faults/plugins/faultyproc` (a shell script that misbehaves on
//! purpose, run as an `exec` stage and as a process plugin) and `tests/native/faulty` (a native
//! plugin that panics or fails on purpose).
// A test drives the engine from outside with std's threads and locks: the `crate::sync` rule
// (clippy.toml) is for the engine's own code.
#![allow(clippy::disallowed_types, clippy::disallowed_methods)]

mod common;

use std::io::{self, Read, Write};
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{mpsc, Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use millrace::config::PipelineSpec;
use millrace::plugin::native::NodeError;
use millrace::{Error, Pipeline};
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_millrace");

/// Longest a case may take before it counts as hung (the whole suite takes seconds).
const DEADLINE: Duration = Duration::from_secs(60);

/// Serialises the cases: thread and child counts are per process.
static SERIAL: Mutex<()> = Mutex::new(());

/// This process's live threads whose name starts with `millrace` (the engine's: stage workers
/// `millrace:<stage>#<i>`, exec helpers `millrace:<stage>:stdin`, ...), by name. Threads that
/// have exited and are only waiting to be released (state `Z` or `X`) are not counted.
fn engine_threads() -> Vec<String> {
    let mut names = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let (Ok(comm), Ok(stat)) = (
            std::fs::read_to_string(task.path().join("comm")),
            std::fs::read_to_string(task.path().join("stat")),
        ) else {
            continue; // gone meanwhile
        };
        let state = stat.rsplit_once(") ").map(|(_, rest)| &rest[..1]);
        if comm.starts_with("millrace") && !matches!(state, Some("Z" | "X")) {
            names.push(comm.trim_end().to_string());
        }
    }
    names.sort();
    names
}

/// The pids of this process's children (of any of its threads), zombies included.
fn children() -> Vec<u32> {
    let mut pids = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        if let Ok(list) = std::fs::read_to_string(task.path().join("children")) {
            pids.extend(list.split_whitespace().map(|p| p.parse::<u32>().unwrap()));
        }
    }
    pids.sort_unstable();
    pids
}

/// Runs `body` under the watchdog and the leak check (see the module documentation).
fn case<T: Send + 'static>(what: &str, body: impl FnOnce() -> T + Send + 'static) -> T {
    let _serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    let (threads, kids) = (engine_threads(), children());
    let (tx, rx) = mpsc::channel();
    let runner = std::thread::Builder::new()
        .name("fault-case".into())
        .spawn(move || {
            let _ = tx.send(catch_unwind(AssertUnwindSafe(body)));
        })
        .unwrap();
    let out = match rx.recv_timeout(DEADLINE) {
        Ok(Ok(out)) => out,
        Ok(Err(panic)) => {
            let _ = runner.join();
            resume_unwind(panic)
        }
        Err(_) => panic!("hung: `{what}` did not finish within {DEADLINE:?}"),
    };
    runner.join().unwrap();
    assert_eq!(
        engine_threads(),
        threads,
        "{what}: engine threads left running"
    );
    assert_eq!(children(), kids, "{what}: child processes left behind");
    out
}

/// Builds the workspace's native plugins (once; `cargo` is a child process, so this holds the
/// cases' lock), outside any watchdog.
fn plugins_built() {
    let _serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    common::built();
}

fn repo(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

fn records(n: u64) -> Vec<Value> {
    (1..=n)
        .map(|i| json!({"i": i, "s": format!("r{i}")}))
        .collect()
}

fn write_records(path: &Path, recs: &[Value]) {
    let text: String = recs.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(path, text).unwrap();
}

fn read_records(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// `what` is a prefix of `of`: records in order, none twice, none made up.
fn assert_prefix(what: &[Value], of: &[Value]) {
    assert!(what.len() <= of.len(), "{} > {}", what.len(), of.len());
    assert_eq!(what, &of[..what.len()]);
}

/// `text` with `dir` (a test's temporary directory) shown as `$DIR`.
fn shown(text: &str, dir: &Path) -> String {
    text.replace(&dir.display().to_string(), "$DIR")
}

// ---------------------------------------------------------------------------------------------
// Operators

/// A `map` that panics at record `at` of 10 000.
fn map_panics(parallelism: usize, at: u64) -> (Error, Vec<u64>) {
    let p = Pipeline::new();
    let src = p.source("numbers", 1..=10_000u64);
    let boom = move |x: u64| {
        if x == at {
            panic!("bad record {x}");
        }
        x
    };
    let out = if parallelism == 1 {
        src.map(boom).name("explode").collect()
    } else {
        src.rebalance(parallelism)
            .map(boom)
            .name("explode")
            .parallelism(parallelism)
            .collect()
    };
    let err = p.run().unwrap_err();
    (err, out.take())
}

#[test]
fn a_map_that_panics_fails_the_run_naming_its_stage_at_parallelism_1() {
    let (err, got) = case("map panics, parallelism 1", || map_panics(1, 5000));
    // One instance: the map is fused into the source's stage (and the sink), whose name says
    // so.
    match &err {
        Error::Panic { stage, message } => {
            assert_eq!(
                (stage.as_str(), message.as_str()),
                ("numbers+explode+collect", "bad record 5000")
            )
        }
        other => panic!("expected a panic, got {other:?}"),
    }
    assert_eq!(
        err.to_string(),
        "stage `numbers+explode+collect` panicked: bad record 5000"
    );
    // Whatever reached the sink came before the bad record, once each.
    assert!(got.iter().all(|&x| x < 5000), "{got:?}");
    assert!(got.windows(2).all(|w| w[0] < w[1]), "in order, once each");
}

#[test]
fn a_map_that_panics_fails_the_run_naming_its_stage_at_parallelism_4() {
    let (err, got) = case("map panics, parallelism 4", || map_panics(4, 5000));
    match &err {
        Error::Panic { stage, message } => {
            assert_eq!(
                (stage.as_str(), message.as_str()),
                ("explode+collect", "bad record 5000")
            )
        }
        other => panic!("expected a panic, got {other:?}"),
    }
    assert_eq!(
        err.to_string(),
        "stage `explode+collect` panicked: bad record 5000"
    );
    let mut got = got;
    got.sort_unstable();
    assert!(!got.contains(&5000));
    assert!(got.windows(2).all(|w| w[0] < w[1]), "none twice");
}

// ---------------------------------------------------------------------------------------------
// Native plugins

/// Runs `ndjson.read -> p (faulty.<node>, with the TOML `params`) -> ndjson.write` over `n`
/// records: the run's result, the output read back (empty if there is none) and the input.
fn run_native(
    node: &str,
    params: &str,
    n: u64,
) -> (Result<millrace::RunReport, Error>, Vec<Value>, Vec<Value>) {
    let dir = tempfile::tempdir().unwrap();
    let manifest = std::fs::read_to_string(repo("tests/native/faulty/plugin.toml")).unwrap();
    common::install(dir.path(), "faulty", &manifest, "millrace_test_faulty");
    let input = records(n);
    write_records(&dir.path().join("in.ndjson"), &input);
    let text = format!(
        "plugin_dirs = [{:?}]\n[stages.read]\nkind = \"ndjson.read\"\npath = \"in.ndjson\"\n\
         [stages.p]\ninput = \"read\"\nkind = \"faulty.{node}\"\n{params}\n\
         [stages.out]\nkind = \"ndjson.write\"\ninput = \"p\"\npath = \"out.ndjson\"\n",
        dir.path().display().to_string()
    );
    let spec = PipelineSpec::from_str(&text, dir.path().join("p.toml")).unwrap();
    let result = spec.build().map_err(Error::from).and_then(|p| p.run());
    let out = dir.path().join("out.ndjson");
    let out = if out.exists() {
        read_records(&out)
    } else {
        Vec::new()
    };
    (result, out, input)
}

/// The plugin's error inside a stage failure of stage `p`.
fn node_error(result: Result<millrace::RunReport, Error>) -> (String, NodeError) {
    let err = result.unwrap_err();
    let text = err.to_string();
    match err {
        Error::Operator { stage, source } => {
            assert_eq!(stage, "p", "{text}");
            let e = *source
                .downcast::<NodeError>()
                .unwrap_or_else(|s| panic!("not a node error: {s:?}"));
            (text, e)
        }
        other => panic!("expected a stage failure, got {other:?}"),
    }
}

#[test]
fn a_native_node_that_panics_fails_its_stage_without_unwinding_into_the_host() {
    plugins_built();
    case("native panic in process", || {
        let (result, out, input) = run_native("panic", "at = 3000", 10_000);
        let (text, e) = node_error(result);
        assert!(
            matches!(&e, NodeError::Panicked { plugin, node, message }
                if plugin == "faulty" && node == "panic" && message == "faulty panic at record 3000"),
            "{e:?}"
        );
        assert_eq!(
            text,
            "stage `p` failed: plugin `faulty` (node `panic`) panicked: faulty panic at record 3000"
        );
        assert!(out.len() < 3000);
        assert_prefix(&out, &input);
    });
    case("native panic in finish", || {
        let (result, _, _) = run_native("panic", "during = \"finish\"", 100);
        let (text, _) = node_error(result);
        assert_eq!(
            text,
            "stage `p` failed: plugin `faulty` (node `panic`) panicked: faulty panic in finish after 100 records"
        );
    });
    case("native panic in create", || {
        let (result, _, _) = run_native("panic", "during = \"create\"", 10);
        let err = result.unwrap_err();
        assert_eq!(err.stage(), Some("p"), "{err}");
        assert!(err.to_string().contains("faulty panic in create"), "{err}");
    });
    // A panic while the node is dropped is caught and the node leaked: the run is unharmed.
    case("native panic in drop", || {
        let (result, out, input) = run_native("panic", "during = \"drop\"", 1000);
        let report = result.unwrap();
        assert_eq!(out, input);
        assert_eq!(report.stage("p").unwrap().records_out, 1000);
        report.check_accounting().unwrap();
    });
}

#[test]
fn a_native_node_that_returns_an_error_fails_its_stage() {
    plugins_built();
    case("native error code", || {
        let (result, out, input) = run_native("fail", "at = 700", 2000);
        let (text, e) = node_error(result);
        assert!(
            matches!(&e, NodeError::Failed { plugin, node, message }
                if plugin == "faulty" && node == "fail" && message == "faulty error at record 700"),
            "{e:?}"
        );
        assert_eq!(
            text,
            "stage `p` failed: plugin `faulty` (node `fail`): faulty error at record 700"
        );
        assert!(out.len() < 700);
        assert_prefix(&out, &input);
    });
}

// ---------------------------------------------------------------------------------------------
// Children: `exec` stages and a process plugin

fn script() -> String {
    repo("tests/faults/plugins/faultyproc/faulty.sh")
        .display()
        .to_string()
}

/// A finished run of `ndjson.read -> child -> ndjson.write` in its own directory.
struct ChildRun {
    dir: tempfile::TempDir,
    result: Result<millrace::RunReport, Error>,
    out: Vec<Value>,
}

impl ChildRun {
    /// The error's text, the temporary directory shown as `$DIR`.
    fn error(&self) -> String {
        match &self.result {
            Ok(_) => panic!("expected the run to fail"),
            Err(e) => shown(&e.to_string(), self.dir.path()),
        }
    }

    /// The pid the child wrote, once it is gone and its process group with it.
    fn assert_child_gone(&self) {
        let pid: i32 = std::fs::read_to_string(self.dir.path().join("pid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "child {pid} is still there"
        );
        // Its group (the child led one): a grandchild (`sleep`, `yes`) must be gone too. An
        // orphan killed is reaped by init, not by us: wait for that with a deadline.
        let deadline = Instant::now() + Duration::from_secs(10);
        // SAFETY: kill with signal 0 only checks whether the group has a process.
        while unsafe { libc::kill(-pid, 0) } == 0 {
            assert!(
                Instant::now() < deadline,
                "process group {pid} outlived the run"
            );
            std::thread::yield_now();
        }
    }
}

/// Runs `ndjson.read (200 records) -> child -> ndjson.write`; `child` is the middle stage's
/// body (an `exec` command or a plugin kind). `cancel_on_marker`: cancel the run once the
/// child has written its marker file.
fn run_child(child: &str, byte_path: bool, cancel_on_marker: bool) -> (ChildRun, Vec<Value>) {
    let dir = tempfile::tempdir().unwrap();
    let input = records(200);
    write_records(&dir.path().join("in.ndjson"), &input);
    let d = dir.path().display().to_string();
    let text = format!(
        "plugin_dirs = [{:?}]\n[stages.read]\nkind = \"ndjson.read\"\npath = \"in.ndjson\"\n\
         [stages.child]\ninput = \"read\"\n{child}\n\
         [stages.out]\nkind = \"ndjson.write\"\ninput = \"child\"\npath = \"out.ndjson\"\n",
        repo("tests/faults/plugins").display().to_string()
    )
    .replace("$DIR", &d);
    let mut spec = PipelineSpec::from_str(&text, dir.path().join("p.toml")).unwrap();
    spec.byte_path = byte_path;
    let p = spec.build().unwrap();
    let result = if cancel_on_marker {
        let handle = p.cancel_handle();
        let marker = dir.path().join("marker");
        // The pipeline runs here (it is built on this thread); a helper cancels it.
        std::thread::scope(|s| {
            s.spawn(move || {
                // Wait for the event itself (the child is hanging), with a deadline.
                let deadline = Instant::now() + Duration::from_secs(20);
                while !marker.exists() {
                    if Instant::now() > deadline {
                        break; // the child never reached its hang: cancel anyway, and fail below
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                handle.cancel();
            });
            p.run()
        })
    } else {
        p.run()
    };
    let out = dir.path().join("out.ndjson");
    let out = if out.exists() {
        read_records(&out)
    } else {
        Vec::new()
    };
    (ChildRun { dir, result, out }, input)
}

/// An `exec` stage running the script in `mode` at record `at`, its pid in `$DIR/pid`.
fn exec(mode: &str, at: u64, extra: &str) -> String {
    format!(
        "kind = \"exec\"\ncommand = [\"sh\", {:?}, \"{mode}\", \"{at}\"]\n\
         env = {{ PIDFILE = \"$DIR/pid\", MARKER = \"$DIR/marker\" }}\n{extra}",
        script()
    )
}

/// The command an exec stage shows in its errors.
fn command(mode: &str, at: u64) -> String {
    format!("sh {} {mode} {at}", script())
}

#[test]
fn a_hung_child_is_killed_at_its_timeout_naming_the_stage() {
    for byte_path in [true, false] {
        let (run, input) = case("exec hangs, timeout", move || {
            run_child(&exec("hang", 50, "timeout = \"500ms\""), byte_path, false)
        });
        assert!(matches!(run.result, Err(Error::Operator { ref stage, .. }) if stage == "child"));
        assert_eq!(
            run.error(),
            format!(
                "stage `child` failed: `{}` was silent for longer than its timeout (500ms) while it owed output: killed",
                command("hang", 50)
            )
        );
        run.assert_child_gone();
        assert_prefix(&run.out, &input);
        assert!(run.out.len() < 50);
    }
}

#[test]
fn a_hung_child_without_a_timeout_is_ended_by_a_cancel() {
    for byte_path in [true, false] {
        let (run, input) = case("exec hangs, cancelled", move || {
            run_child(&exec("hang", 50, ""), byte_path, true)
        });
        assert!(
            matches!(run.result, Err(Error::Cancelled)),
            "{:?}",
            run.result
        );
        run.assert_child_gone();
        assert_prefix(&run.out, &input);
    }
}

#[test]
fn a_child_that_exits_non_zero_mid_stream_fails_its_stage_with_its_stderr() {
    for byte_path in [true, false] {
        let (run, input) = case("exec exits 3", move || {
            run_child(&exec("exit", 50, ""), byte_path, false)
        });
        assert!(matches!(run.result, Err(Error::Operator { ref stage, .. }) if stage == "child"));
        assert_eq!(
            run.error(),
            format!(
                "stage `child` failed: `{}` exited with status 3; last stderr lines:\n  faulty: exiting with status 3 at record 50",
                command("exit", 50)
            )
        );
        run.assert_child_gone();
        assert_prefix(&run.out, &input);
        assert!(run.out.len() < 50);
    }
}

#[test]
fn a_child_killed_by_sigkill_mid_stream_fails_its_stage() {
    for byte_path in [true, false] {
        let (run, input) = case("exec killed", move || {
            run_child(&exec("kill", 50, ""), byte_path, false)
        });
        assert!(matches!(run.result, Err(Error::Operator { ref stage, .. }) if stage == "child"));
        assert_eq!(
            run.error(),
            format!(
                "stage `child` failed: `{}` was killed (signal: 9 (SIGKILL))",
                command("kill", 50)
            )
        );
        run.assert_child_gone();
        assert_prefix(&run.out, &input);
        assert!(run.out.len() < 50);
    }
}

#[test]
fn garbage_on_a_childs_stdout_fails_its_stage_naming_the_line() {
    for byte_path in [true, false] {
        let (run, input) = case("exec garbage", move || {
            run_child(&exec("garbage", 50, ""), byte_path, false)
        });
        let Err(Error::Record {
            stage, location, ..
        }) = &run.result
        else {
            panic!("expected a record error, got {:?}", run.result);
        };
        assert_eq!(stage, "child");
        assert_eq!(location.line, 50, "the garbage is stdout's line 50");
        let e = run.error();
        assert!(
            e.starts_with(&format!(
                "stage `child`: `{}` stdout:50: ",
                command("garbage", 50)
            )),
            "{e}"
        );
        run.assert_child_gone();
        assert_prefix(&run.out, &input);
        assert!(run.out.len() < 50);
    }
}

#[test]
fn a_child_flooding_stderr_does_not_deadlock_and_loses_nothing() {
    for byte_path in [true, false] {
        let (run, input) = case("exec floods stderr", move || {
            run_child(&exec("flood", 50, ""), byte_path, false)
        });
        let report = run.result.as_ref().unwrap();
        assert_eq!(run.out, input, "every record, in order, once");
        assert_eq!(report.stage("out").unwrap().records_out, 200);
        report.check_accounting().unwrap();
        run.assert_child_gone();
    }
}

#[test]
fn a_process_plugin_that_misbehaves_fails_its_stage_naming_it() {
    let plugin =
        |node: &str, extra: &str| format!("kind = \"faultyproc.{node}\"\nat = 50\n{extra}");
    let (run, _) = case("plugin hangs, timeout", move || {
        run_child(&plugin("hang", "timeout = \"500ms\""), true, false)
    });
    assert_eq!(
        run.error(),
        "stage `child` failed: `sh faulty.sh` was silent for longer than its timeout (500ms) while it owed output: killed"
    );
    let (run, _) = case("plugin exits 3", move || {
        run_child(&plugin("exit", ""), true, false)
    });
    assert_eq!(
        run.error(),
        "stage `child` failed: `sh faulty.sh` exited with status 3; last stderr lines:\n  faulty: exiting with status 3 at record 50"
    );
    let (run, _) = case("plugin killed", move || {
        run_child(&plugin("kill", ""), true, false)
    });
    assert_eq!(
        run.error(),
        "stage `child` failed: `sh faulty.sh` was killed (signal: 9 (SIGKILL))"
    );
    let (run, _) = case("plugin garbage", move || {
        run_child(&plugin("garbage", ""), false, false)
    });
    assert!(
        run.error()
            .starts_with("stage `child`: `sh faulty.sh` stdout:50: "),
        "{}",
        run.error()
    );
    let (run, input) = case("plugin floods stderr", move || {
        run_child(&plugin("flood", ""), true, false)
    });
    assert!(run.result.is_ok(), "{:?}", run.result);
    assert_eq!(run.out, input);
}

// ---------------------------------------------------------------------------------------------
// Sinks

/// A writer that takes the bytes of the first `ok` lines and fails from the first byte of the
/// next line on (a partly accepted write returns the count it took, as a real short write
/// does).
struct FailingWriter {
    taken: Arc<Mutex<Vec<u8>>>,
    ok: usize,
    lines: usize,
}

impl Write for FailingWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut n = 0;
        while n < buf.len() && self.lines < self.ok {
            if buf[n] == b'\n' {
                self.lines += 1;
            }
            n += 1;
        }
        self.taken.lock().unwrap().extend_from_slice(&buf[..n]);
        if n == 0 && !buf.is_empty() {
            return Err(io::Error::other(format!(
                "injected fault at record {}",
                self.ok + 1
            )));
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Writes `n` records through a sink that fails at record `fail_at`: the error and the bytes
/// the writer took.
fn failing_sink(n: u64, fail_at: usize, ndjson: bool) -> (Error, String) {
    let taken = Arc::new(Mutex::new(Vec::new()));
    let w = FailingWriter {
        taken: Arc::clone(&taken),
        ok: fail_at - 1,
        lines: 0,
    };
    let p = Pipeline::new();
    let s = p.source("numbers", 1..=n).map(|i| format!("record {i:06}"));
    if ndjson {
        s.write_ndjson_to(w).name("out");
    } else {
        s.write_lines_to(w).name("out");
    }
    let err = p.run().unwrap_err();
    let taken = String::from_utf8(taken.lock().unwrap().clone()).unwrap();
    (err, taken)
}

#[test]
fn a_sink_that_fails_on_the_nth_write_names_itself_and_wrote_the_rest_once() {
    // Record 100 of 1000: the fault comes at the final flush. Record 150 000 of 200 000: in the
    // middle of the stream, many buffer flushes in.
    for (n, fail_at, ndjson) in [(1000, 100, false), (200_000, 150_000, true)] {
        let (err, taken) = case("sink fails", move || failing_sink(n, fail_at, ndjson));
        match &err {
            Error::Io {
                stage,
                path,
                source,
            } => {
                assert_eq!((stage.as_str(), path.as_str()), ("out", "<writer>"));
                assert_eq!(
                    source.to_string(),
                    format!("injected fault at record {fail_at}")
                );
            }
            other => panic!("expected an I/O error, got {other:?}"),
        }
        assert_eq!(
            err.to_string(),
            format!("stage `out`: <writer>: injected fault at record {fail_at}")
        );
        let expect: String = (1..fail_at)
            .map(|i| {
                if ndjson {
                    format!("\"record {i:06}\"\n")
                } else {
                    format!("record {i:06}\n")
                }
            })
            .collect();
        assert!(taken == expect, "the records before the fault, each once");
    }
}

/// Runs the binary on `pipeline` (in `dir`) with `--quiet`; its stdout is a pipe whose reader
/// is closed at once when `close_stdout`. Exit code, stdout, stderr.
fn cli(dir: &Path, pipeline: &str, close_stdout: bool) -> (Option<i32>, String, String) {
    let p = dir.join("p.toml");
    std::fs::write(&p, pipeline).unwrap();
    let mut child = Command::new(BIN)
        .args(["run", "--quiet", &p.display().to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = String::new();
    let stdout = child.stdout.take().unwrap();
    if close_stdout {
        drop(stdout);
    } else {
        let mut stdout = stdout;
        stdout.read_to_string(&mut out).unwrap();
    }
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let status = child.wait().unwrap();
    (status.code(), out, err)
}

#[test]
fn writing_to_a_full_device_from_the_cli_exits_1_naming_the_stage_and_file() {
    let (code, _, err) = case("cli writes /dev/full", || {
        let dir = tempfile::tempdir().unwrap();
        write_records(&dir.path().join("in.ndjson"), &records(10_000));
        cli(
            dir.path(),
            "[stages.read]\nkind = \"ndjson.read\"\npath = \"in.ndjson\"\n\
             [stages.out]\nkind = \"ndjson.write\"\ninput = \"read\"\npath = \"/dev/full\"\n",
            false,
        )
    });
    assert_eq!(code, Some(1), "{err}");
    // One line: the error, once.
    assert_eq!(
        err,
        "error: stage `out`: /dev/full: No space left on device (os error 28)\n"
    );
}

#[test]
fn a_stdout_closed_before_the_first_write_ends_the_run_quietly_with_exit_0() {
    for pipeline in [
        // The byte path (blocks of lines)...
        "[stages.read]\nkind = \"ndjson.read\"\npath = \"in.ndjson\"\n\
         [stages.out]\nkind = \"ndjson.write\"\ninput = \"read\"\npath = \"-\"\n",
        // ... and the value path (a filter parses each record).
        "[stages.read]\nkind = \"ndjson.read\"\npath = \"in.ndjson\"\n\
         [stages.keep]\nkind = \"filter\"\ninput = \"read\"\nfield = \"i\"\nop = \"gt\"\nvalue = 0\n\
         [stages.out]\nkind = \"ndjson.write\"\ninput = \"keep\"\npath = \"-\"\n",
    ] {
        let (code, _, err) = case("cli stdout closed", move || {
            let dir = tempfile::tempdir().unwrap();
            write_records(&dir.path().join("in.ndjson"), &records(200_000));
            cli(dir.path(), pipeline, true)
        });
        assert_eq!((code, err.as_str()), (Some(0), ""));
    }
}

// ---------------------------------------------------------------------------------------------
// Sources

/// Lines `line 1`, `line 2`, ..., then EIO once `fail_after` bytes have been read.
struct FailingReader {
    data: Vec<u8>,
    pos: usize,
    fail_after: usize,
}

impl Read for FailingReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos >= self.fail_after {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        let end = self
            .data
            .len()
            .min(self.fail_after)
            .min(self.pos + buf.len());
        let n = end - self.pos;
        buf[..n].copy_from_slice(&self.data[self.pos..end]);
        self.pos = end;
        Ok(n)
    }
}

#[test]
fn a_reader_failing_with_eio_fails_its_stage_and_no_partial_line_gets_through() {
    let lines: Vec<String> = (1..=100_000).map(|i| format!("line {i}")).collect();
    let data: Vec<u8> = lines
        .iter()
        .flat_map(|l| format!("{l}\n").into_bytes())
        .collect();
    // Mid-line, well past the first 256 KiB read.
    let fail_after = data.len() / 2 + 3;
    let (err, got) = case("reader EIO", move || {
        let p = Pipeline::new();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = Arc::clone(&seen);
        p.read_lines_from(
            "src",
            FailingReader {
                data,
                pos: 0,
                fail_after,
            },
        )
        .new_stage()
        .for_each(move |l| s.lock().unwrap().push(l));
        let err = p.run().unwrap_err();
        let got = std::mem::take(&mut *seen.lock().unwrap());
        (err, got)
    });
    match &err {
        Error::Io {
            stage,
            path,
            source,
        } => {
            assert_eq!((stage.as_str(), path.as_str()), ("src", "<reader>"));
            assert_eq!(source.raw_os_error(), Some(libc::EIO));
        }
        other => panic!("expected an I/O error, got {other:?}"),
    }
    assert_eq!(
        err.to_string(),
        "stage `src`: <reader>: Input/output error (os error 5)"
    );
    // What got through is whole lines from the start, none after the fault.
    let whole = lines
        .iter()
        .scan(0, |end, l| {
            *end += l.len() + 1;
            Some(*end)
        })
        .take_while(|&end| end <= fail_after)
        .count();
    assert!(got.len() <= whole, "{} > {whole}", got.len());
    assert_eq!(got, lines[..got.len()]);
}

#[test]
fn a_source_file_deleted_while_read_is_read_to_its_end() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.txt");
    let n = 200_000u64;
    let text: String = (1..=n).map(|i| format!("line {i}\n")).collect();
    std::fs::write(&path, &text).unwrap();
    let (count, sum, existed) = case("source deleted", move || {
        let p = Pipeline::new();
        let gone = path.clone();
        let out = p
            .read_lines(&path)
            // At the first record (the first 256 KiB read), the file is deleted.
            .inspect(move |_| {
                if gone.exists() {
                    std::fs::remove_file(&gone).unwrap();
                }
            })
            .map(|l: String| l["line ".len()..].parse::<u64>().unwrap())
            .collect();
        let report = p.run().unwrap();
        report.check_accounting().unwrap();
        assert_eq!(report.account("lines.read").map(|a| a.records_in), Some(n));
        let got = out.take();
        (got.len() as u64, got.iter().sum::<u64>(), path.exists())
    });
    assert!(!existed, "the file was deleted during the run");
    // On Linux the open descriptor still reads the whole file.
    assert_eq!((count, sum), (n, n * (n + 1) / 2));
}

// ---------------------------------------------------------------------------------------------
// The engine's own promise

/// Set by [`SlowTeardown`]'s drop when it is done.
static TORN_DOWN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// A thread-local whose destructor (run as its thread exits, after the stage's code returned)
/// takes a while: a stand-in for a slow teardown of a stage thread.
struct SlowTeardown;

impl Drop for SlowTeardown {
    fn drop(&mut self) {
        // Nothing ever sends: this only makes the teardown slow (300 ms).
        let (_tx, rx) = mpsc::channel::<()>();
        let _ = rx.recv_timeout(Duration::from_millis(300));
        TORN_DOWN.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

thread_local! {
    static SLOW: SlowTeardown = const { SlowTeardown };
}

/// `run` returns once every stage thread has exited, not only once their code has returned:
/// it once relied on `thread::scope`, which waits for the threads' closures only, so a stage
/// thread could still be running (its thread-local destructors; a native plugin's, whose
/// library may be unloaded next) after `run` returned.
#[test]
fn run_returns_only_once_every_stage_thread_has_exited() {
    let torn_down = case("slow thread teardown", || {
        TORN_DOWN.store(false, std::sync::atomic::Ordering::SeqCst);
        let p = Pipeline::new();
        p.source("numbers", 1..=10u64)
            .map(|x| {
                SLOW.with(|_| {});
                x
            })
            .for_each(|_| {});
        p.run().unwrap();
        TORN_DOWN.load(std::sync::atomic::Ordering::SeqCst)
    });
    assert!(
        torn_down,
        "run returned while a stage thread was still exiting"
    );
}
