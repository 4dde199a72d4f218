//! Input hardening of the file sources (issue 14, item 3): what `lines.read` and `ndjson.read`
//! do with bad or unusual input, on every path a line can take — the value path (`ndjson.read`
//! at parallelism 1), the parallel parse path (parallelism 2), the byte path (`ndjson.read →
//! exec → ndjson.write`), the projected byte path (`ndjson.read → ndjson.write`, two readers)
//! and `lines.read` — run through `millrace run`, and a file that grows or is truncated while
//! read, through the typed API.
// A test drives the engine from outside with std's threads: the `crate::sync` rule (clippy.toml)
// is for the engine's own code.
#![allow(clippy::disallowed_types, clippy::disallowed_methods)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_millrace");

/// The ways a line of `ndjson.read` can go.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Via {
    /// `ndjson.read` at parallelism 1: one line at a time into a value.
    Value,
    /// `ndjson.read` at parallelism 2: blocks of lines parsed on two threads.
    Parallel,
    /// `ndjson.read → exec cat → ndjson.write`: blocks of checked bytes.
    Bytes,
    /// `ndjson.read → ndjson.write` at parallelism 2 on the projected byte path: two readers
    /// over the two halves of the file (their lines interleave), printing what the value path
    /// prints.
    Projected,
}

const ALL: [Via; 4] = [Via::Value, Via::Parallel, Via::Bytes, Via::Projected];

struct Run {
    /// Output lines interleave (two readers): `ok` sorts them.
    unordered: bool,
    code: i32,
    out: String,
    err: String,
    input: PathBuf,
    _dir: tempfile::TempDir,
}

impl Run {
    /// The run succeeded: its output lines.
    fn ok(&self) -> Vec<&str> {
        assert_eq!(self.code, 0, "stderr: {}", self.err);
        let mut lines: Vec<&str> = self.out.lines().collect();
        if self.unordered {
            lines.sort_unstable();
        }
        lines
    }

    /// The run failed with exit code 1, naming the stage, the file and the line.
    fn fails_at(&self, line: u64, message: &str) {
        assert_eq!(self.code, 1, "stdout: {}\nstderr: {}", self.out, self.err);
        let at = format!("stage `read`: {}:{line}: ", self.input.display());
        assert!(
            self.err.contains(&at) && self.err.contains(message),
            "want {at:?} and {message:?} in: {}",
            self.err
        );
    }
}

/// Writes `input` and runs a pipeline reading it with `read` (`ndjson.read` along `via`, or
/// `lines.read` when `via` is `None`), with `params` added to the read stage, to `out.ndjson`.
fn run(via: Option<Via>, input: &[u8], params: &str) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let inp = dir.path().join("in.txt");
    std::fs::write(&inp, input).unwrap();
    run_on(via, &inp, params, dir)
}

/// Writes `dir/p.toml`: the read stage for `via` on `inp` with `params` (which may add whole
/// stages after it), then `out` writing `dir/out.ndjson`.
fn write_pipeline(via: Option<Via>, inp: &Path, params: &str, dir: &Path) -> PathBuf {
    let out = dir.join("out.ndjson");
    let (kind, par, middle, last) = match via {
        None => ("lines.read", 1, "", "read"),
        Some(Via::Value) => ("ndjson.read", 1, "", "read"),
        Some(Via::Parallel) => ("ndjson.read", 2, "", "read"),
        Some(Via::Projected) => ("ndjson.read", 2, "", "read"),
        Some(Via::Bytes) => (
            "ndjson.read",
            1,
            "[stages.cat]\nkind = \"exec\"\ninput = \"read\"\ncommand = [\"cat\"]\n\n",
            "cat",
        ),
    };
    // The value path's vias keep off the projected byte path.
    let options = if matches!(via, Some(Via::Value | Via::Parallel)) {
        "\n[options]\nbyte_path = false\n"
    } else {
        ""
    };
    let toml = format!(
        "[stages.read]\nkind = \"{kind}\"\npath = \"{}\"\nparallelism = {par}\n{params}\n\n\
         {middle}[stages.out]\nkind = \"ndjson.write\"\ninput = \"{last}\"\npath = \"{}\"\n{options}",
        inp.display(),
        out.display()
    );
    let p = dir.join("p.toml");
    std::fs::write(&p, toml).unwrap();
    p
}

fn run_on(via: Option<Via>, inp: &Path, params: &str, dir: tempfile::TempDir) -> Run {
    let p = write_pipeline(via, inp, params, dir.path());
    let out = dir.path().join("out.ndjson");
    let o = Command::new(BIN).arg("run").arg(&p).output().unwrap();
    Run {
        unordered: via == Some(Via::Projected),
        code: o.status.code().unwrap_or(-1),
        out: std::fs::read_to_string(&out).unwrap_or_default(),
        err: String::from_utf8_lossy(&o.stderr).into_owned(),
        input: inp.to_path_buf(),
        _dir: dir,
    }
}

/// The line `n` of `lines.read`'s output, as the text it read.
fn texts(lines: &[&str]) -> Vec<String> {
    lines
        .iter()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["line"].as_str().unwrap().to_string()
        })
        .collect()
}

#[test]
fn invalid_utf8_fails_naming_the_line() {
    for via in ALL {
        run(Some(via), b"{\"a\":1}\n{\"a\":\"\xff\"}\n", "").fails_at(2, "invalid");
    }
    run(None, b"ok\nbad \xc3\x28\n", "").fails_at(2, "invalid UTF-8");
}

#[test]
fn a_nul_byte_is_invalid_json_but_text_to_lines_read() {
    for via in ALL {
        run(Some(via), b"{\"a\":1}\n{\"a\":\"x\0y\"}\n", "").fails_at(2, "control character");
        run(Some(via), b"{\"a\":1}\n{\"a\":1}\0\n", "").fails_at(2, "invalid JSON");
    }
    let r = run(None, b"a\0b\n", "");
    assert_eq!(texts(&r.ok()), ["a\0b"]);
}

#[test]
fn a_byte_order_mark_is_dropped_from_the_first_line_only() {
    for via in ALL {
        let r = run(Some(via), b"\xef\xbb\xbf{\"a\":1}\n{\"b\":2}\n", "");
        assert_eq!(r.ok(), [r#"{"a":1}"#, r#"{"b":2}"#], "{via:?}");
        run(Some(via), b"{\"a\":1}\n\xef\xbb\xbf{\"b\":2}\n", "").fails_at(2, "invalid JSON");
    }
    let r = run(None, "\u{feff}one\n\u{feff}two\n".as_bytes(), "");
    assert_eq!(texts(&r.ok()), ["one", "\u{feff}two"]);
    // A file that is only a mark holds no record.
    for via in ALL {
        assert!(run(Some(via), b"\xef\xbb\xbf", "").ok().is_empty());
    }
}

#[test]
fn crlf_endings_lose_their_cr_on_every_path_and_a_lone_cr_is_data() {
    for via in ALL {
        let r = run(Some(via), b"{\"a\":1}\r\n\r\n{\"b\":2}\r\n{\"c\":3}\r", "");
        assert_eq!(
            r.ok(),
            [r#"{"a":1}"#, r#"{"b":2}"#, r#"{"c":3}"#],
            "{via:?}"
        );
        // Inside a string a raw CR is a control character; between values it is whitespace.
        run(Some(via), b"{\"a\":1}\n{\"a\":\"x\ry\"}\n", "").fails_at(2, "control character");
        let want = if via == Via::Bytes {
            "{\"a\":\r1}" // bytes kept as they are
        } else {
            r#"{"a":1}"#
        };
        assert_eq!(run(Some(via), b"{\"a\":\r1}\n", "").ok(), [want]);
        run(Some(via), b"{\"a\":1}\r{\"b\":2}\n", "").fails_at(1, "trailing characters");
    }
    let r = run(None, b"one\r\ntw\ro\r\nthree\r", "");
    assert_eq!(texts(&r.ok()), ["one", "tw\ro", "three"]);
}

#[test]
fn a_line_over_max_line_bytes_fails_naming_the_line_and_the_cap() {
    // 16 bytes is the cap: `{"a":"12345678"}` is exactly that, with either ending.
    let input = b"{\"a\":\"12345678\"}\n{\"a\":\"12345678\"}\r\n{\"a\":\"123456789\"}\n{\"b\":1}\n";
    for via in ALL {
        run(Some(via), input, "max_line_bytes = 16")
            .fails_at(3, "line longer than max_line_bytes (16)");
        assert_eq!(
            run(Some(via), &input[..35], "max_line_bytes = 16")
                .ok()
                .len(),
            2
        );
    }
    run(None, b"1234\n12345\n", "max_line_bytes = 4")
        .fails_at(2, "line longer than max_line_bytes (4)");
    // A line far over the cap is not buffered: the error comes at the cap.
    let mut long = b"{\"a\":1}\n{\"a\":\"".to_vec();
    long.resize(long.len() + (8 << 20), b'x');
    long.extend_from_slice(b"\"}\n");
    for via in ALL {
        run(Some(via), &long, "max_line_bytes = 1024")
            .fails_at(2, "line longer than max_line_bytes (1024)");
    }
}

/// Input without newlines (`/dev/zero`) fails at the cap on every path, without waiting for a
/// newline that never comes.
#[test]
fn endless_input_without_newlines_fails_at_the_cap() {
    for via in [
        None,
        Some(Via::Value),
        Some(Via::Parallel),
        Some(Via::Bytes),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let r = run_on(via, Path::new("/dev/zero"), "max_line_bytes = 4096", dir);
        assert_eq!(r.code, 1, "{via:?}: {}", r.err);
        assert!(
            r.err
                .contains("stage `read`: /dev/zero:1: line longer than max_line_bytes (4096)"),
            "{via:?}: {}",
            r.err
        );
    }
}

#[test]
fn max_line_bytes_is_checked_when_the_pipeline_is_loaded() {
    for (value, want) in [
        (
            "0",
            "expected an integer from 1 to 1073741824, found the integer 0",
        ),
        (
            "1073741825",
            "expected an integer from 1 to 1073741824, found the integer 1073741825",
        ),
        (
            "\"big\"",
            "expected an integer from 1 to 1073741824, found the string \"big\"",
        ),
    ] {
        for via in [None, Some(Via::Value)] {
            let r = run(via, b"", &format!("max_line_bytes = {value}"));
            // A pipeline that does not load exits with 2, naming the file and line.
            assert_eq!(r.code, 2, "{value}: {}", r.err);
            assert!(
                r.err
                    .contains("p.toml:5: stage `read`: parameter `max_line_bytes`: ")
                    && r.err.contains(want),
                "{value}: {}",
                r.err
            );
        }
    }
    assert!(
        run(Some(Via::Value), b"{}\n", "max_line_bytes = 1073741824")
            .ok()
            .len()
            == 1
    );
}

/// The nesting depth `serde_json` accepts is the limit on every path: the byte path's scanner
/// leaves deep lines to it.
#[test]
fn nesting_deeper_than_the_parser_allows_fails_on_every_path() {
    let nested = |depth: usize| {
        // An object holding arrays: `depth` levels in all.
        format!(
            "{{\"a\":{}1{}}}",
            "[".repeat(depth - 1),
            "]".repeat(depth - 1)
        )
    };
    let limit = (1..300)
        .find(|&d| serde_json::from_str::<serde_json::Value>(&nested(d)).is_err())
        .unwrap()
        - 1;
    // serde_json's recursion limit (128) allows 127 levels.
    assert_eq!(limit, 127, "serde_json's limit changed");
    for via in ALL {
        let ok = format!("{{}}\n{}\n", nested(limit));
        assert_eq!(run(Some(via), ok.as_bytes(), "").ok().len(), 2, "{via:?}");
        let deep = format!("{{}}\n{}\n", nested(limit + 1));
        run(Some(via), deep.as_bytes(), "").fails_at(2, "recursion limit exceeded");
    }
}

#[test]
fn integers_outside_64_bits_are_refused_as_values_and_kept_as_bytes() {
    let input =
        b"{\"n\":18446744073709551615,\"m\":-9223372036854775808}\n{\"n\":18446744073709551616}\n";
    for via in [Via::Value, Via::Parallel, Via::Projected] {
        run(Some(via), input, "").fails_at(
            2,
            "integer 18446744073709551616 is out of the 64-bit range (it would lose digits)",
        );
    }
    let r = run(Some(Via::Bytes), input, "");
    assert_eq!(
        r.ok(),
        [
            r#"{"n":18446744073709551615,"m":-9223372036854775808}"#,
            r#"{"n":18446744073709551616}"#
        ]
    );
    // Beyond f64 `serde_json` refuses it, on every path.
    for via in ALL {
        run(Some(via), b"{\"a\":1}\n{\"n\":1e400}\n", "").fails_at(2, "number out of range");
    }
}

#[test]
fn with_duplicate_keys_the_last_wins_as_a_value_and_bytes_are_kept() {
    for via in [Via::Value, Via::Parallel, Via::Projected] {
        assert_eq!(
            run(Some(via), b"{\"a\":1,\"b\":0,\"a\":2}\n", "").ok(),
            [r#"{"a":2,"b":0}"#]
        );
    }
    assert_eq!(
        run(Some(Via::Bytes), b"{\"a\":1,\"b\":0,\"a\":2}\n", "").ok(),
        [r#"{"a":1,"b":0,"a":2}"#]
    );
}

#[test]
fn an_empty_file_is_zero_records() {
    for via in [
        None,
        Some(Via::Value),
        Some(Via::Parallel),
        Some(Via::Bytes),
    ] {
        let r = run(via, b"", "");
        assert!(r.ok().is_empty(), "{via:?}");
        assert!(r.err.contains("\n0 records read in "), "{via:?}: {}", r.err);
    }
}

#[test]
fn the_last_line_without_a_newline_is_a_record() {
    for via in ALL {
        let r = run(Some(via), b"{\"a\":1}\n{\"a\":2}", "");
        let mut got = r.ok();
        // Two readers (one line each) interleave.
        got.sort();
        assert_eq!(got, [r#"{"a":1}"#, r#"{"a":2}"#], "{via:?}");
        assert!(r.err.contains("\n2 records read in "), "{via:?}: {}", r.err);
    }
    assert_eq!(texts(&run(None, b"one\ntwo", "").ok()), ["one", "two"]);
}

/// A file larger than the reader's buffer, so that the first record is seen while most of the
/// file is still unread.
fn big_file(dir: &Path) -> (PathBuf, usize) {
    let path = dir.join("in.txt");
    let lines = 300_000;
    let text: String = (0..lines).map(|i| format!("line {i:07}\n")).collect();
    std::fs::write(&path, text).unwrap();
    (path, lines)
}

/// Runs `read_lines(path)` on a thread, calling `at_first` (in the pipeline, before the first
/// record goes on) once.
fn read_with_hook(
    path: &Path,
    at_first: impl FnOnce() + Send + 'static,
) -> std::thread::JoinHandle<Result<Vec<String>, millrace::Error>> {
    let path = path.to_path_buf();
    std::thread::spawn(move || {
        let p = millrace::Pipeline::new();
        let hook = std::sync::Mutex::new(Some(at_first));
        let got = p
            .read_lines(&path)
            .inspect(move |_| {
                let f = hook.lock().unwrap().take();
                if let Some(f) = f {
                    f()
                }
            })
            .collect();
        p.run().map(|_| got.take())
    })
}

#[test]
fn a_file_that_grows_while_read_is_read_to_the_end_found() {
    let dir = tempfile::tempdir().unwrap();
    let (path, lines) = big_file(dir.path());
    let appended = path.clone();
    let run = read_with_hook(&path, move || {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&appended)
            .unwrap();
        f.write_all(b"appended 1\nappended 2\n").unwrap();
    });
    let got = run.join().unwrap().unwrap();
    assert_eq!(got.len(), lines + 2);
    assert_eq!(got[0], "line 0000000");
    assert_eq!(&got[lines..], ["appended 1", "appended 2"]);
}

#[test]
fn a_file_truncated_while_read_fails_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = big_file(dir.path());
    let (seen_tx, seen_rx) = crossbeam_channel::bounded::<()>(1);
    let (go_tx, go_rx) = crossbeam_channel::bounded::<()>(1);
    let run = read_with_hook(&path, move || {
        seen_tx.send(()).unwrap();
        go_rx.recv_timeout(Duration::from_secs(60)).unwrap();
    });
    // Wait for the first record (the pipeline now waits for us), truncate, let it go on.
    seen_rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the first record");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(1000)
        .unwrap();
    go_tx.send(()).unwrap();
    let e = run.join().unwrap().unwrap_err().to_string();
    assert!(
        e.contains(&format!("{}: truncated while read (read ", path.display()))
            && e.ends_with(" bytes, now 1000)"),
        "{e}"
    );
}

/// What a run under an error policy left: exit code, stderr, output lines, dead letters, and
/// the accounts of the `finished` event of `--progress json`.
struct PolicyRun {
    code: i32,
    err: String,
    out: Vec<serde_json::Value>,
    letters: Vec<serde_json::Value>,
    accounts: Vec<serde_json::Value>,
    input: PathBuf,
}

/// Runs `input` through the read stage along `via` (`None`: `lines.read`) with `on_error =
/// policy` (and, for `dead_letter`, a dead-letter stage `dead` writing `dead.ndjson`), plus the
/// read stage's `params`, with `--progress json`.
fn run_policy(via: Option<Via>, input: &[u8], params: &str, policy: &str) -> PolicyRun {
    let dir = tempfile::tempdir().unwrap();
    let inp = dir.path().join("in.txt");
    std::fs::write(&inp, input).unwrap();
    let out = dir.path().join("out.ndjson");
    let dead = dir.path().join("dead.ndjson");
    let letters = if policy == "dead_letter" {
        format!(
            "dead_letter = \"dead\"\n\n[stages.dead]\nkind = \"ndjson.write\"\npath = \"{}\"\n",
            dead.display()
        )
    } else {
        String::new()
    };
    let params = format!("{params}\non_error = \"{policy}\"\n{letters}");
    let p = write_pipeline(via, &inp, &params, dir.path());
    let o = Command::new(BIN)
        .args(["run", "--progress", "json"])
        .arg(&p)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    let json_lines = |path: &Path| -> Vec<serde_json::Value> {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let accounts = err
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|e| e["event"] == "finished")
        .and_then(|e| e["report"]["accounts"].as_array().cloned())
        .unwrap_or_default();
    PolicyRun {
        code: o.status.code().unwrap_or(-1),
        out: json_lines(&out),
        letters: json_lines(&dead),
        accounts,
        err,
        input: inp,
    }
}

impl PolicyRun {
    fn account(&self, stage: &str) -> &serde_json::Value {
        self.accounts
            .iter()
            .find(|a| a["stage"] == stage)
            .unwrap_or_else(|| panic!("no account for `{stage}` in {:?}", self.accounts))
    }

    /// Every step's invariant, as `StageAccount::check` states it, and that each step took what
    /// the one before it handed on (the pipelines here are linear).
    fn assert_accounts_hold(&self) {
        let n = |a: &serde_json::Value, k: &str| a[k].as_u64().unwrap();
        assert!(!self.accounts.is_empty(), "no accounts in: {}", self.err);
        let mut prev_out = None;
        for a in &self.accounts {
            let lost = n(a, "filtered") + n(a, "skipped") + n(a, "dead_lettered") + n(a, "late");
            if matches!(
                a["shape"].as_str().unwrap(),
                "source" | "one_to_one" | "filtering" | "sink"
            ) {
                assert_eq!(n(a, "records_in"), n(a, "records_out") + lost, "{a}");
            }
            // A source starts a new line of steps (the dead letters' is one).
            if a["shape"] == "source" {
                prev_out = None;
            }
            if let Some(p) = prev_out {
                assert_eq!(n(a, "records_in"), p, "{a} after {:?}", self.accounts);
            }
            prev_out = Some(n(a, "records_out"));
        }
        // Every letter reached the dead-letter stage.
        let letters: u64 = self.accounts.iter().map(|a| n(a, "dead_lettered")).sum();
        let written = self
            .accounts
            .iter()
            .find(|a| a["stage"] == "dead")
            .map_or(0, |a| n(a, "records_out"));
        assert_eq!(letters, written, "{:?}", self.accounts);
    }
}

/// A bad-input case: what it is, the bad line, the read stage's parameters, the error's
/// message, and the paths it applies to.
type Case = (
    &'static str,
    Vec<u8>,
    &'static str,
    &'static str,
    Vec<Option<Via>>,
);

/// Each bad-input case of item 3 under each policy of item 1, on every path it applies to:
/// `fail` exits 1 naming the stage, file and line; `skip` drops the line and counts it;
/// `dead_letter` routes it (as `raw` text, with the file and line) to the dead-letter stage.
/// Good lines come through in every case, and the accounts hold.
#[test]
fn every_bad_input_meets_every_policy() {
    let deep = format!("{{\"a\":{}1{}}}", "[".repeat(128), "]".repeat(128));
    let long = b"{\"a\":\"this line is longer than the cap\"}".to_vec();
    let cases: Vec<Case> = vec![
        (
            "invalid UTF-8",
            b"{\"a\":\"\xff\"}".to_vec(),
            "",
            "invalid",
            ALL.map(Some).to_vec(),
        ),
        (
            "invalid UTF-8 (lines)",
            b"bad \xc3\x28".to_vec(),
            "",
            "invalid UTF-8",
            vec![None],
        ),
        (
            "NUL in a string",
            b"{\"a\":\"x\0y\"}".to_vec(),
            "",
            "control character",
            ALL.map(Some).to_vec(),
        ),
        (
            "a BOM after the first line",
            b"\xef\xbb\xbf{\"b\":2}".to_vec(),
            "",
            "invalid JSON",
            ALL.map(Some).to_vec(),
        ),
        (
            "a line over the cap",
            long.clone(),
            "max_line_bytes = 16",
            "line longer than max_line_bytes (16)",
            ALL.map(Some).to_vec(),
        ),
        (
            "a line over the cap (lines)",
            long,
            "max_line_bytes = 16",
            "line longer than max_line_bytes (16)",
            vec![None],
        ),
        (
            "nested too deep",
            deep.into_bytes(),
            "",
            "recursion limit exceeded",
            ALL.map(Some).to_vec(),
        ),
        (
            "an integer beyond 64 bits",
            b"{\"n\":18446744073709551616}".to_vec(),
            "",
            "out of the 64-bit range",
            vec![Some(Via::Value), Some(Via::Parallel), Some(Via::Projected)],
        ),
        (
            "a number beyond f64",
            b"{\"n\":1e400}".to_vec(),
            "",
            "number out of range",
            ALL.map(Some).to_vec(),
        ),
        (
            "a truncated object",
            b"{\"a\":1,\"b\":".to_vec(),
            "",
            "invalid JSON",
            ALL.map(Some).to_vec(),
        ),
        (
            "not an object",
            b"[1,2]".to_vec(),
            "",
            "object",
            ALL.map(Some).to_vec(),
        ),
    ];
    for (what, bad, params, message, vias) in cases {
        for via in vias {
            let (first, last): (&[u8], &[u8]) = if via.is_none() {
                (b"one", b"three")
            } else {
                (b"{\"a\":1}", b"{\"a\":3}")
            };
            let input = [first, b"\n", &bad, b"\n", last, b"\n"].concat();
            let ctx = format!("{what} via {via:?}");

            let r = run_policy(via, &input, params, "fail");
            assert_eq!(r.code, 1, "{ctx}: {}", r.err);
            let at = format!("stage `read`: {}:2: ", r.input.display());
            assert!(
                r.err.contains(&at) && r.err.contains(message),
                "{ctx}: want {at:?} and {message:?} in {}",
                r.err
            );

            for policy in ["skip", "dead_letter"] {
                let r = run_policy(via, &input, params, policy);
                let ctx = format!("{ctx}, {policy}");
                assert_eq!(r.code, 0, "{ctx}: {}", r.err);
                assert_eq!(r.out.len(), 2, "{ctx}: the good lines: {:?}", r.out);
                r.assert_accounts_hold();
                let read = r.account("read");
                assert_eq!(read["records_in"], 3, "{ctx}: {read}");
                assert_eq!(read["records_out"], 2, "{ctx}: {read}");
                let (skipped, dead) = if policy == "skip" { (1, 0) } else { (0, 1) };
                assert_eq!(read["skipped"], skipped, "{ctx}: {read}");
                assert_eq!(read["dead_lettered"], dead, "{ctx}: {read}");
                if policy == "skip" {
                    assert!(r.letters.is_empty(), "{ctx}");
                    continue;
                }
                assert_eq!(r.letters.len(), 1, "{ctx}: {:?}", r.letters);
                let l = &r.letters[0];
                assert_eq!(l["stage"], "read", "{ctx}: {l}");
                assert_eq!(l["line"], 2, "{ctx}: {l}");
                assert_eq!(l["file"], r.input.display().to_string(), "{ctx}: {l}");
                assert!(l["error"].as_str().unwrap().contains(message), "{ctx}: {l}");
                assert!(
                    l.get("record").is_none() || l["record"].is_null(),
                    "{ctx}: {l}"
                );
                let raw = l["raw"].as_str().unwrap();
                let want = String::from_utf8_lossy(&bad);
                assert!(
                    want.starts_with(raw) && !raw.is_empty(),
                    "{ctx}: raw {raw:?} is not (a prefix of) the line {want:?}"
                );
                assert!(
                    l["time"].as_u64().unwrap() > 1_700_000_000_000,
                    "{ctx}: {l}"
                );
            }
        }
    }
}
