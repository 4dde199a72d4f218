//! The `exec` stage: NDJSON through a child process, and every way a subprocess pipeline goes
//! wrong — a child flooding stderr while nobody reads it, a child that never answers, invalid
//! output lines, a consumer that stops early (no zombie left), EPIPE, and the environment a
//! child inherits; the silence timeout (what it measures), the end of a child whose process
//! group lives on, and a child that closes its stdout but does not exit.
// A test drives the engine from outside with std's threads: the `crate::sync` rule
// (clippy.toml) is for the engine's own code.
#![allow(clippy::disallowed_methods)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use millrace::config::{ConfigErrorKind, PipelineSpec};
use serde_json::{json, Value};

/// Runs `read(in.ndjson) -> exec -> [extra] -> out` in `dir`; the exec stage is `exec`.
///
/// A pipeline that is only `ndjson.read -> exec -> ndjson.write` runs on the byte path (blocks
/// of checked lines, never parsed); it is then run on the value path too, and both must give
/// the same records or the same error.
fn run(
    dir: &Path,
    input: &[Value],
    exec: &str,
    extra: &str,
    last: &str,
) -> Result<Vec<Value>, String> {
    let bytes = run_path(dir, input, exec, extra, last, true);
    if extra.is_empty() && last == "child" {
        let values = run_path(dir, input, exec, extra, last, false);
        assert_eq!(bytes, values, "the byte path and the value path disagree");
    }
    bytes
}

fn run_path(
    dir: &Path,
    input: &[Value],
    exec: &str,
    extra: &str,
    last: &str,
    byte_path: bool,
) -> Result<Vec<Value>, String> {
    let mut text = String::new();
    for v in input {
        text.push_str(&format!("{v}\n"));
    }
    std::fs::write(dir.join("in.ndjson"), text).unwrap();
    let pipeline = format!(
        "[stages.read]\nkind = \"ndjson.read\"\npath = \"in.ndjson\"\n\n[stages.child]\nkind = \"exec\"\ninput = \"read\"\n{exec}\n{extra}\n[stages.out]\nkind = \"ndjson.write\"\ninput = \"{last}\"\npath = \"out.ndjson\"\n"
    );
    let mut spec =
        PipelineSpec::from_str(&pipeline, dir.join("p.toml")).map_err(|e| e.to_string())?;
    spec.byte_path = byte_path;
    spec.build().unwrap().run().map_err(|e| e.to_string())?;
    Ok(std::fs::read_to_string(dir.join("out.ndjson"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect())
}

fn records(n: u64) -> Vec<Value> {
    (0..n)
        .map(|i| json!({"i": i, "s": format!("r{i}")}))
        .collect()
}

/// The pid a `sh -c 'echo $$ > pid; exec ...'` child wrote, and whether it is gone (reaped:
/// a zombie still has a /proc entry).
fn reaped(dir: &Path) -> (u32, bool) {
    reaped_from(&dir.join("pid"))
}

/// The pid in the file `file`, and whether that process is gone (see [`reaped`]).
fn reaped_from(file: &Path) -> (u32, bool) {
    let pid: u32 = std::fs::read_to_string(file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    (pid, !Path::new(&format!("/proc/{pid}")).exists())
}

#[test]
fn records_round_trip_through_cat_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let input = records(20_000);
    let out = run(dir.path(), &input, "command = [\"cat\"]", "", "child").unwrap();
    assert_eq!(out, input);
}

#[test]
fn a_child_that_fails_loudly_does_not_deadlock_and_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    // 1 MiB on stderr (far more than a pipe holds), then exit 1.
    let exec = r#"command = ["sh", "-c", "head -c 1048576 /dev/zero | tr '\\0' e >&2; echo >&2; echo 'the real problem' >&2; exit 1"]"#;
    let t0 = Instant::now();
    let e = run(dir.path(), &records(10), exec, "", "child").unwrap_err();
    assert!(t0.elapsed() < Duration::from_secs(20));
    assert!(
        e.contains("stage `child`") && e.contains("exited with status 1"),
        "{e}"
    );
    assert!(
        e.contains("the real problem"),
        "the last stderr lines are in the error: {e}"
    );
}

#[test]
fn a_silent_child_is_killed_after_its_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let exec = "command = [\"sh\", \"-c\", \"echo $$ > pid; exec sleep 30\"]\ntimeout = \"300ms\"";
    let t0 = Instant::now();
    let e = run(dir.path(), &records(3), exec, "", "child").unwrap_err();
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    assert!(e.contains("silent for longer than its timeout"), "{e}");
    let (pid, gone) = reaped(dir.path());
    assert!(gone, "child {pid} is still there (a zombie?)");
}

#[test]
fn invalid_ndjson_from_the_child_names_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let exec = "command = [\"sh\", \"-c\", \"cat; echo '{oops'\"]";
    let e = run(dir.path(), &records(3), exec, "", "child").unwrap_err();
    assert!(e.contains("stdout:4: invalid JSON"), "{e}");
}

#[test]
fn an_over_long_line_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let exec = "command = [\"cat\"]\nmax_line_bytes = 16";
    let e = run(
        dir.path(),
        &[
            json!({"short": 1}),
            json!({"much longer": "than sixteen bytes"}),
        ],
        exec,
        "",
        "child",
    )
    .unwrap_err();
    assert!(
        e.contains("stdout:2: line longer than max_line_bytes (16)"),
        "{e}"
    );
}

/// Downstream stops early (a limit): the run ends promptly and the endless child is killed and
/// reaped.
#[test]
fn an_early_stop_downstream_kills_and_reaps_the_child() {
    let dir = tempfile::tempdir().unwrap();
    let exec = "command = [\"sh\", \"-c\", \"echo $$ > pid; exec yes '{\\\"y\\\": 1}'\"]";
    let limit = "[stages.first]\nkind = \"limit\"\ninput = \"child\"\nn = 5\n";
    let t0 = Instant::now();
    let out = run(dir.path(), &records(3), exec, limit, "first").unwrap();
    assert_eq!(out, vec![json!({"y": 1}); 5]);
    assert!(t0.elapsed() < Duration::from_secs(10));
    let (pid, gone) = reaped(dir.path());
    assert!(gone, "child {pid} is still there (a zombie?)");
}

/// The child stops reading its input early (EPIPE): a normal stop, not an error.
#[test]
fn a_child_that_stops_reading_ends_the_stage_normally() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(
        dir.path(),
        &records(200_000),
        "command = [\"head\", \"-n\", \"2\"]",
        "",
        "child",
    )
    .unwrap();
    assert_eq!(out, records(2));
}

#[test]
fn the_environment_is_scrubbed_to_an_allowlist() {
    let dir = tempfile::tempdir().unwrap();
    // Cargo sets CARGO_MANIFEST_DIR for this test process; the child must not inherit it.
    assert!(std::env::var("CARGO_MANIFEST_DIR").is_ok());
    let exec = "command = [\"sh\", \"-c\", \"cat > /dev/null; printf '{\\\"mine\\\": \\\"%s\\\", \\\"leaked\\\": \\\"%s\\\", \\\"path\\\": %s}\\\\n' \\\"$MINE\\\" \\\"$CARGO_MANIFEST_DIR\\\" \\\"${PATH:+true}\\\"\"]\nenv = { MINE = \"set by the stage\" }";
    let out = run(dir.path(), &records(1), exec, "", "child").unwrap();
    assert_eq!(
        out,
        vec![json!({"mine": "set by the stage", "leaked": "", "path": true})]
    );
}

#[test]
fn exec_parameter_errors_name_the_line() {
    let e = PipelineSpec::from_str(
        "[stages.read]\nkind = \"ndjson.read\"\npath = \"-\"\n\n[stages.x]\nkind = \"exec\"\ninput = \"read\"\ncommand = []\n\n[stages.out]\nkind = \"ndjson.write\"\ninput = \"x\"\npath = \"-\"\n",
        "/tmp/e.toml",
    )
    .unwrap_err();
    assert_eq!(
        (e.kind(), e.line, e.stage()),
        (ConfigErrorKind::BadValue, Some(8), Some("x")),
        "{e}"
    );
    let dir = tempfile::tempdir().unwrap();
    let e = run(
        dir.path(),
        &records(1),
        "command = [\"/no/such/program\"]",
        "",
        "child",
    )
    .unwrap_err();
    assert!(e.contains("cannot start `/no/such/program`"), "{e}");
}

/// A child over its CPU limit is stopped by the kernel (SIGXCPU) and the error names the limit.
#[test]
fn a_child_over_its_cpu_limit_is_stopped_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let exec = "command = [\"sh\", \"-c\", \"echo $$ > pid; while :; do :; done\"]\nlimits = { cpu_seconds = 1 }";
    let t0 = Instant::now();
    let e = run(dir.path(), &records(3), exec, "", "child").unwrap_err();
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    assert!(
        e.contains("stage `child`") && e.contains("exceeded its CPU limit (cpu_seconds = 1)"),
        "{e}"
    );
    let (pid, gone) = reaped(dir.path());
    assert!(gone, "child {pid} is still there (a zombie?)");
}

/// A child over its address-space limit fails to allocate; the error carries its own
/// message (Python's MemoryError) and the limit.
#[test]
fn a_child_over_its_memory_limit_fails_and_the_error_names_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let exec = "command = [\"python3\", \"-c\", \"import sys; sys.stdin.read(); b = bytes(1 << 30)\"]\nlimits = { address_space = \"256MiB\" }";
    let e = run(dir.path(), &records(3), exec, "", "child").unwrap_err();
    assert!(
        e.contains("exited with status 1 (limits: address_space = 256 MiB)"),
        "{e}"
    );
    assert!(e.contains("MemoryError"), "{e}");
    // Without the limit the same child allocates its gigabyte and succeeds.
    let exec =
        "command = [\"python3\", \"-c\", \"import sys; sys.stdin.read(); b = bytes(1 << 30)\"]";
    run(dir.path(), &records(3), exec, "", "child").unwrap();
}

#[test]
fn the_open_files_limit_is_what_the_child_sees() {
    let dir = tempfile::tempdir().unwrap();
    let exec = "command = [\"sh\", \"-c\", \"cat > /dev/null; echo \\\"{\\\\\\\"n\\\\\\\": $(ulimit -n)}\\\"\"]\nlimits = { open_files = 37 }";
    let out = run(dir.path(), &records(2), exec, "", "child").unwrap();
    assert_eq!(out, vec![json!({"n": 37})]);
}

#[test]
fn limits_errors_name_the_stage_the_parameter_and_what_was_found() {
    let err = |limits: &str| {
        PipelineSpec::from_str(
            &format!("[stages.read]\nkind = \"ndjson.read\"\npath = \"-\"\n\n[stages.x]\nkind = \"exec\"\ninput = \"read\"\ncommand = [\"cat\"]\n{limits}\n\n[stages.out]\nkind = \"ndjson.write\"\ninput = \"x\"\npath = \"-\"\n"),
            "/tmp/e.toml",
        )
        .unwrap_err()
    };
    let what = |limits: &str| {
        let e = err(limits);
        (e.kind(), e.line, e.stage().map(str::to_string))
    };
    let x = Some("x".to_string());
    // The full message a user reads.
    let e = err("limits = { cpu_seconds = \"1s\" }");
    assert_eq!(e.kind(), ConfigErrorKind::BadValue);
    assert_eq!(
        e.to_string(),
        "/tmp/e.toml:9: stage `x`: parameter `limits.cpu_seconds`: expected an integer of at least 1, found the string \"1s\""
    );
    assert_eq!(
        what("limits = { address_space = \"lots\" }"),
        (ConfigErrorKind::BadValue, Some(9), x.clone())
    );
    let e = err("limits = { memory = 1 }");
    assert_eq!(e.kind(), ConfigErrorKind::UnknownParameter);
    assert_eq!(
        e.to_string(),
        "/tmp/e.toml:9: stage `x`: parameter `limits.memory`: unknown limit (known: address_space, cpu_seconds, open_files)"
    );
    assert_eq!(what("limits = 5"), (ConfigErrorKind::BadValue, Some(9), x));
}

/// Runs a pipeline file text in `dir` on one path; its report or error.
fn run_text(dir: &Path, text: &str, byte_path: bool) -> Result<millrace::RunReport, String> {
    let mut spec = PipelineSpec::from_str(text, dir.join("p.toml")).map_err(|e| e.to_string())?;
    spec.byte_path = byte_path;
    spec.build().unwrap().run().map_err(|e| e.to_string())
}

/// `ndjson.read -> exec cat -> exec cat -> exec cat -> ndjson.write`: lines pass through byte
/// for byte (big integers, key order and spacing kept), blank lines and `\r` are dropped as the
/// value path drops them, and every stage counts records, not blocks.
#[test]
fn the_byte_path_passes_lines_through_unparsed_and_counts_records() {
    let dir = tempfile::tempdir().unwrap();
    let mut input = String::new();
    let mut want = String::new();
    for i in 0..30_000u64 {
        let line = format!(
            "{{\"z\": {}, \"a\":[1, {{\"b\":null}}], \"s\":\"r\\u00e9{i}\"}}",
            u64::MAX - i
        );
        input.push_str(&line);
        input.push_str(if i % 1000 == 0 { "\r\n\n   \n" } else { "\n" });
        want.push_str(&line);
        want.push('\n');
    }
    std::fs::write(dir.path().join("in.ndjson"), &input).unwrap();
    let text = "[stages.read]\nkind = \"ndjson.read\"\npath = \"in.ndjson\"\n\
        [stages.a]\nkind = \"exec\"\ninput = \"read\"\ncommand = [\"cat\"]\n\
        [stages.b]\nkind = \"exec\"\ninput = \"a\"\ncommand = [\"cat\"]\n\
        [stages.c]\nkind = \"exec\"\ninput = \"b\"\ncommand = [\"cat\"]\n\
        [stages.out]\nkind = \"ndjson.write\"\ninput = \"c\"\npath = \"out.ndjson\"\n";
    let report = run_text(dir.path(), text, true).unwrap();
    let out = std::fs::read_to_string(dir.path().join("out.ndjson")).unwrap();
    assert!(
        out == want,
        "the output is not the input's lines, byte for byte"
    );
    for stage in ["a", "b", "c", "out"] {
        let s = report.stage(stage).unwrap();
        assert_eq!(s.records_in, 30_000, "{stage} in");
    }
    for stage in ["read", "a", "b", "c", "out"] {
        assert_eq!(
            report.stage(stage).unwrap().records_out,
            30_000,
            "{stage} out"
        );
    }
    // The value path gives the same records (re-serialised, so compared as values).
    run_text(dir.path(), text, false).unwrap();
    let values: Vec<Value> = std::fs::read_to_string(dir.path().join("out.ndjson"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let bytes: Vec<Value> = want
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(values, bytes);
}

/// An invalid input line fails the run naming the file and the line, on both paths alike.
#[test]
fn an_invalid_input_line_names_its_file_and_line_on_both_paths() {
    let dir = tempfile::tempdir().unwrap();
    let mut input = String::new();
    for i in 0..5000 {
        input.push_str(&format!("{{\"i\":{i}}}\n"));
    }
    input.push_str("{\"i\": 5000,}\n{\"i\":5001}\n");
    std::fs::write(dir.path().join("in.ndjson"), &input).unwrap();
    let text = "[stages.read]\nkind = \"ndjson.read\"\npath = \"in.ndjson\"\n\
        [stages.a]\nkind = \"exec\"\ninput = \"read\"\ncommand = [\"cat\"]\n\
        [stages.out]\nkind = \"ndjson.write\"\ninput = \"a\"\npath = \"out.ndjson\"\n";
    let bytes = run_text(dir.path(), text, true).unwrap_err();
    let values = run_text(dir.path(), text, false).unwrap_err();
    assert_eq!(bytes, values);
    assert!(bytes.contains("in.ndjson:5001"), "{bytes}");
    assert!(
        bytes.contains("stage `read`") && bytes.contains("invalid JSON"),
        "{bytes}"
    );
}

/// A child's last line without a newline still counts, on both paths.
#[test]
fn a_last_line_without_a_newline_is_a_record() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(
        dir.path(),
        &records(3),
        "command = [\"sh\", \"-c\", \"cat > /dev/null; printf '{\\\"end\\\":1}\\\\n\\\\n{\\\"end\\\":2}'\"]",
        "",
        "child",
    )
    .unwrap();
    assert_eq!(out, vec![json!({"end": 1}), json!({"end": 2})]);
}

/// `[options] byte_path = false` forces the value path: output is re-serialised.
#[test]
fn the_byte_path_option_chooses_the_path() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("in.ndjson"), "{ \"b\" : 1,  \"a\":2 }\n").unwrap();
    let text = |opt: &str| {
        format!(
            "[options]\n{opt}\n[stages.read]\nkind = \"ndjson.read\"\npath = \"in.ndjson\"\n\
             [stages.a]\nkind = \"exec\"\ninput = \"read\"\ncommand = [\"cat\"]\n\
             [stages.out]\nkind = \"ndjson.write\"\ninput = \"a\"\npath = \"out.ndjson\"\n"
        )
    };
    let out = |opt: &str| {
        let spec = PipelineSpec::from_str(&text(opt), dir.path().join("p.toml")).unwrap();
        spec.build().unwrap().run().unwrap();
        std::fs::read_to_string(dir.path().join("out.ndjson")).unwrap()
    };
    assert_eq!(out("byte_path = true"), "{ \"b\" : 1,  \"a\":2 }\n");
    assert_eq!(out("byte_path = false"), "{\"a\":2,\"b\":1}\n");
    let e = PipelineSpec::from_str(&text("byte_path = \"yes\""), dir.path().join("p.toml"))
        .unwrap_err();
    assert_eq!(
        (e.kind(), e.stage()),
        (ConfigErrorKind::BadValue, None),
        "{e}"
    );
}

/// A pipeline `read -> child (exec) -> out` running on a thread of its own, with a cancel
/// handle and its result awaited with a deadline. With `fed`, `read` reads a FIFO that the
/// test writes to (and holds open: upstream is alive until [`Running::close`]); otherwise
/// `in.ndjson`.
struct Running {
    dir: PathBuf,
    feed: Option<std::fs::File>,
    cancel: millrace::CancelHandle,
    done: mpsc::Receiver<Result<(), String>>,
    t0: Instant,
}

impl Running {
    fn start(dir: &Path, exec: &str, fed: bool, byte_path: bool) -> Running {
        let (path, feed) = if fed {
            let fifo = dir.join("feed");
            let made = std::process::Command::new("mkfifo")
                .arg(&fifo)
                .status()
                .unwrap();
            assert!(made.success());
            // Read and write: never blocks on Linux, and keeps the FIFO open for writing.
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&fifo)
                .unwrap();
            ("feed", Some(f))
        } else {
            ("in.ndjson", None)
        };
        let text = format!(
            "[stages.read]\nkind = \"ndjson.read\"\npath = \"{path}\"\n\n[stages.child]\nkind = \"exec\"\ninput = \"read\"\n{exec}\n\n[stages.out]\nkind = \"ndjson.write\"\ninput = \"child\"\npath = \"out.ndjson\"\n"
        );
        let mut spec = PipelineSpec::from_str(&text, dir.join("p.toml")).unwrap();
        spec.byte_path = byte_path;
        let (tx, done) = mpsc::channel();
        let (handle_tx, handle) = mpsc::channel();
        // A pipeline is built and run on one thread (it is not `Send`).
        std::thread::spawn(move || {
            let pipeline = spec.build().unwrap();
            handle_tx.send(pipeline.cancel_handle()).unwrap();
            let _ = tx.send(pipeline.run().map(|_| ()).map_err(|e| e.to_string()));
        });
        let cancel = handle.recv().unwrap();
        Running {
            dir: dir.to_path_buf(),
            feed,
            cancel,
            done,
            t0: Instant::now(),
        }
    }

    fn send(&mut self, v: &Value) {
        let f = self.feed.as_mut().expect("fed");
        writeln!(f, "{v}").unwrap();
    }

    /// Ends the input (the FIFO's last writer closes it).
    fn close(&mut self) {
        self.feed = None;
    }

    /// The run's result if it ends within `d`.
    fn ended_within(&self, d: Duration) -> Option<Result<(), String>> {
        self.done.recv_timeout(d).ok()
    }

    /// The run's result, which must come within `d` of its start; else the run is cancelled
    /// and the test fails (saying whether the cancel ended it).
    fn result_within(&self, d: Duration) -> Result<(), String> {
        let left = d.saturating_sub(self.t0.elapsed());
        match self.done.recv_timeout(left) {
            Ok(r) => r,
            Err(_) => {
                self.cancel.cancel();
                let after = self.done.recv_timeout(Duration::from_secs(5));
                panic!("the run did not end within {d:?}; after a cancel: {after:?}")
            }
        }
    }

    fn output(&self) -> Vec<Value> {
        std::fs::read_to_string(self.dir.join("out.ndjson"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

/// Waits (up to 10 s) until `file` exists and is not empty.
fn wait_for_file(file: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::metadata(file).map_or(true, |m| m.len() == 0) {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            file.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A child that reads one record and hangs (it owes an answer), its upstream alive but quiet:
/// killed after its timeout, and reaped, on both paths.
#[test]
fn a_hung_child_is_killed_while_upstream_is_quiet() {
    for byte_path in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let exec = "command = [\"sh\", \"-c\", \"echo $$ > pid; read line; exec sleep 30\"]\ntimeout = \"400ms\"";
        let mut run = Running::start(dir.path(), exec, true, byte_path);
        run.send(&json!({"i": 0}));
        let e = run.result_within(Duration::from_secs(10)).unwrap_err();
        assert!(
            e.contains("stage `child`") && e.contains("silent for longer than its timeout"),
            "{e}"
        );
        let (pid, gone) = reaped(dir.path());
        assert!(gone, "child {pid} is still there (a zombie?)");
    }
}

/// The same hung child while upstream trickles a record every 100 ms (well within the
/// timeout): input handed to it does not keep it alive.
#[test]
fn a_hung_child_is_killed_while_upstream_trickles() {
    for byte_path in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let exec = "command = [\"sh\", \"-c\", \"echo $$ > pid; read line; exec sleep 30\"]\ntimeout = \"400ms\"";
        let mut run = Running::start(dir.path(), exec, true, byte_path);
        let mut i = 0;
        let e = loop {
            run.send(&json!({ "i": i }));
            i += 1;
            if let Some(r) = run.ended_within(Duration::from_millis(100)) {
                break r.unwrap_err();
            }
            if run.t0.elapsed() > Duration::from_secs(10) {
                run.result_within(Duration::from_secs(10)).unwrap_err(); // cancels, fails
            }
        };
        assert!(e.contains("silent for longer than its timeout"), "{e}");
        assert!(i >= 3, "upstream trickled ({i} records) before the kill");
        let (pid, gone) = reaped(dir.path());
        assert!(gone, "child {pid} is still there (a zombie?)");
    }
}

/// A child that answered everything it was given is waiting for input, not silent: upstream
/// quiet for several times the timeout does not kill it.
#[test]
fn a_child_waiting_for_input_is_not_killed() {
    for byte_path in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let exec = "command = [\"sh\", \"-c\", \"while read l; do echo \\\"$l\\\"; echo x >> answered; done\"]\ntimeout = \"500ms\"";
        let mut run = Running::start(dir.path(), exec, true, byte_path);
        run.send(&json!({"i": 0}));
        wait_for_file(&dir.path().join("answered"));
        // Quiet upstream for four timeouts: the run must go on.
        let early = run.ended_within(Duration::from_secs(2));
        assert!(early.is_none(), "the waiting child was stopped: {early:?}");
        run.send(&json!({"i": 1}));
        run.close();
        run.result_within(Duration::from_secs(10)).unwrap();
        assert_eq!(run.output(), vec![json!({"i": 0}), json!({"i": 1})]);
    }
}

/// A child that writes part of a line and hangs owes the rest: the timeout kills it on the
/// value path too (whose line reader once blocked on the missing newline, where neither the
/// timeout nor a cancel could reach it).
#[test]
fn a_child_hung_in_the_middle_of_a_line_is_killed() {
    for byte_path in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let exec = "command = [\"sh\", \"-c\", \"echo $$ > pid; read line; printf '{\\\"half\\\": '; exec sleep 30\"]\ntimeout = \"400ms\"";
        let mut run = Running::start(dir.path(), exec, true, byte_path);
        run.send(&json!({"i": 0}));
        let e = run.result_within(Duration::from_secs(10)).unwrap_err();
        assert!(e.contains("silent for longer than its timeout"), "{e}");
        let (pid, gone) = reaped(dir.path());
        assert!(gone, "child {pid} is still there (a zombie?)");
    }
}

/// At the normal end the rest of the child's process group is killed: a background
/// grandchild holding stderr open neither holds up the run nor outlives it.
#[test]
fn a_grandchild_holding_stderr_does_not_hold_up_the_end() {
    for byte_path in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("in.ndjson"), "{\"i\":0}\n{\"i\":1}\n").unwrap();
        let exec = "command = [\"sh\", \"-c\", \"sleep 30 > /dev/null & echo $! > gpid; cat\"]";
        let run = Running::start(dir.path(), exec, false, byte_path);
        run.result_within(Duration::from_secs(10)).unwrap();
        assert_eq!(run.output(), vec![json!({"i": 0}), json!({"i": 1})]);
        let (pid, gone) = reaped_from(&dir.path().join("gpid"));
        assert!(gone, "grandchild {pid} outlived the run");
    }
}

/// A child that closes its stdout but does not exit: with a timeout, it gets that long to
/// exit and is then killed; without one, a cancel ends the run at once. Either way it is
/// reaped.
#[test]
fn a_child_that_closes_stdout_but_lives_on_is_bounded() {
    let exec = "command = [\"sh\", \"-c\", \"echo $$ > pid; exec sleep 30 >&-\"]";
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("in.ndjson"), "{\"i\":0}\n").unwrap();
    let run = Running::start(
        dir.path(),
        &format!("{exec}\ntimeout = \"300ms\""),
        false,
        true,
    );
    let e = run.result_within(Duration::from_secs(10)).unwrap_err();
    assert!(
        e.contains("closed its stdout but did not exit within its timeout"),
        "{e}"
    );
    let (pid, gone) = reaped(dir.path());
    assert!(gone, "child {pid} is still there (a zombie?)");

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("in.ndjson"), "{\"i\":0}\n").unwrap();
    let run = Running::start(dir.path(), exec, false, true);
    wait_for_file(&dir.path().join("pid"));
    run.cancel.cancel();
    let e = run.result_within(Duration::from_secs(10)).unwrap_err();
    assert!(e.contains("cancelled"), "{e}");
    let (pid, gone) = reaped(dir.path());
    assert!(gone, "child {pid} is still there (a zombie?)");
}
