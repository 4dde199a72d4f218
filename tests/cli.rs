//! The `millrace` binary: the bundled example, `| head`, validate, graph, exit codes, and flat
//! memory over a gigabyte of NDJSON.
// A test drives the engine from outside with std's threads and atomics: the `crate::sync`
// rule (clippy.toml) is for the engine's own code.
#![allow(clippy::disallowed_types, clippy::disallowed_methods)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_millrace");

fn repo(p: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(p)
        .display()
        .to_string()
}

#[test]
fn wordcount_example_matches_an_independent_count() {
    let out = Command::new(BIN)
        .args(["run", "--quiet", &repo("examples/wordcount.toml")])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stderr.is_empty(),
        "--quiet prints nothing: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: Vec<(String, u64)> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["word"].as_str().unwrap().to_string(),
                v["count"].as_u64().unwrap(),
            )
        })
        .collect();

    let text = std::fs::read_to_string(repo("examples/data/millrace.txt")).unwrap();
    let mut counts: HashMap<String, u64> = HashMap::new();
    for w in text.split_whitespace() {
        *counts.entry(w.to_lowercase()).or_default() += 1;
    }
    let mut expect: Vec<(String, u64)> = counts.into_iter().collect();
    expect.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    expect.truncate(10);
    assert_eq!(got, expect);
}

#[test]
fn run_prints_a_summary_table_unless_quiet() {
    let out = Command::new(BIN)
        .args(["run", &repo("examples/wordcount.toml")])
        .output()
        .unwrap();
    assert!(out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.starts_with("stage "), "{err}");
    assert!(err.contains("count.sort+top+out#0"), "{err}");
    assert!(err.contains("records read in"), "{err}");
}

/// Runs `pipeline` (in a fresh directory, returned) with an endless writer on its stdin, reads
/// the first line of its stdout and closes it, like `| head -1`; checks that the run then ends
/// quietly with exit 0, promptly, and that the writer was stopped. Returns the first line.
fn first_line_then_close(pipeline: &str, line: &str) -> (String, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("p.toml");
    std::fs::write(&p, pipeline).unwrap();
    let mut child = Command::new(BIN)
        .args(["run", "--quiet", &p.display().to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    // An endless writer: it stops only when millrace stops reading.
    let chunk = line.repeat(1000);
    let writer = std::thread::spawn(move || {
        let mut written = 0u64;
        while stdin.write_all(chunk.as_bytes()).is_ok() {
            written += chunk.len() as u64;
        }
        written
    });
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    // Dropping the reader closes the pipe, like `head -1` exiting.
    let t0 = Instant::now();
    let status = child.wait().unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(status.success(), "exit {status:?}: {err}");
    assert_eq!(err, "");
    assert!(t0.elapsed() < Duration::from_secs(20));
    assert!(writer.join().unwrap() > 0);
    (first, dir)
}

/// `millrace run p.toml | head -1`: the closed stdout ends the run quietly with exit 0, and
/// the source stops reading.
#[test]
fn closed_stdout_ends_the_run_quietly() {
    let (first, _dir) = first_line_then_close(
        "[stages.read]\nkind=\"lines.read\"\npath=\"-\"\n[stages.out]\nkind=\"ndjson.write\"\ninput=\"read\"\npath=\"-\"\n",
        "a line of text that goes on\n",
    );
    assert_eq!(first, "{\"line\":\"a line of text that goes on\"}\n");
}

/// `millrace run p.toml | head -1` on the byte path (`read -> exec -> out`): the closed stdout
/// ends the run quietly, the child is killed and reaped, and the source stops reading.
#[test]
fn closed_stdout_on_the_byte_path_stops_the_child_and_the_source() {
    let (first, dir) = first_line_then_close(
        "[stages.read]\nkind=\"ndjson.read\"\npath=\"-\"\n\
         [stages.cat]\nkind=\"exec\"\ninput=\"read\"\ncommand=[\"sh\", \"-c\", \"echo $$ > pid; exec cat\"]\n\
         [stages.out]\nkind=\"ndjson.write\"\ninput=\"cat\"\npath=\"-\"\n",
        "{\"a\":\"a record that goes on\"}\n",
    );
    assert_eq!(first, "{\"a\":\"a record that goes on\"}\n");
    // The `cat` child is gone: millrace killed and reaped it before exiting.
    let pid = std::fs::read_to_string(dir.path().join("pid")).unwrap();
    assert!(
        !Path::new(&format!("/proc/{}", pid.trim())).exists(),
        "child {pid} outlived the run"
    );
}

#[test]
fn validate_and_graph() {
    let out = Command::new(BIN)
        .args(["validate", &repo("examples/wordcount.toml")])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).ends_with(": ok (5 stages)\n"));
    let out = Command::new(BIN)
        .args(["graph", &repo("examples/wordcount.toml")])
        .output()
        .unwrap();
    assert!(out.status.success());
    let dot = String::from_utf8(out.stdout).unwrap();
    assert!(dot.starts_with("digraph \"wordcount\" {"), "{dot}");
    assert!(dot.contains("\"count\" -> \"top\";"), "{dot}");
}

#[test]
fn config_errors_exit_2_naming_file_line_and_stage() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad.toml");
    std::fs::write(&p, "[stages.read]\nkind=\"lines.read\"\npath=\"missing.txt\"\n[stages.out]\nkind=\"ndjson.write\"\ninput=\"read\"\npath=\"-\"\n").unwrap();
    for cmd in ["run", "validate", "graph"] {
        let out = Command::new(BIN)
            .args([cmd, &p.display().to_string()])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{cmd}");
        let err = String::from_utf8(out.stderr).unwrap();
        let want = format!(
            "error: {}:3: stage `read`: cannot open input file {}:",
            p.display(),
            dir.path().join("missing.txt").display()
        );
        assert!(err.starts_with(&want), "{cmd}: {err}");
    }
}

/// `validate` reports every error, one a line, in the order the checks run.
#[test]
fn validate_reports_every_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad.toml");
    std::fs::write(
        &p,
        "[stages.read]\nkind=\"lines.read\"\npath=\"missing.txt\"\n[stages.top]\nkind=\"limit\"\ninput=\"read\"\nn=-1\n[stages.out]\nkind=\"ndjson.write\"\ninput=\"nowhere\"\npath=\"-\"\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["validate", &p.display().to_string()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    let lines: Vec<&str> = err.lines().collect();
    let f = p.display();
    assert_eq!(
        lines,
        [
            format!(
                "error: {f}:3: stage `read`: cannot open input file {}: No such file or directory (os error 2)",
                dir.path().join("missing.txt").display()
            ),
            format!("error: {f}:7: stage `top`: parameter `n`: expected an integer of at least 0, found the integer -1"),
            format!("error: {f}:10: stage `out`: unknown input `nowhere` (stages: out, read, top)"),
        ],
        "{err}"
    );
}

#[test]
fn runtime_errors_exit_1_naming_stage_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("in.ndjson");
    std::fs::write(&data, "{\"a\":1}\nnot json\n").unwrap();
    let p = dir.path().join("p.toml");
    std::fs::write(&p, "[stages.read]\nkind=\"ndjson.read\"\npath=\"in.ndjson\"\n[stages.out]\nkind=\"ndjson.write\"\ninput=\"read\"\npath=\"-\"\n").unwrap();
    let out = Command::new(BIN)
        .args(["run", &p.display().to_string()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.starts_with(&format!(
            "error: stage `read`: {}:2: invalid JSON",
            data.display()
        )),
        "{err}"
    );
}

/// Seed bug 3's OOM, end to end: a gigabyte of NDJSON through read → filter → select → write
/// keeps the peak resident set small. (Debug builds stream less, to stay quick.)
#[cfg(target_os = "linux")]
#[test]
fn a_gigabyte_of_ndjson_streams_in_flat_memory() {
    stream_a_gigabyte("read");
}

/// The same gigabyte through an `exec` stage running `cat`: stdin writer, stdout reader and
/// the child's pipes are all bounded.
#[cfg(target_os = "linux")]
#[test]
fn a_gigabyte_through_an_exec_cat_streams_in_flat_memory() {
    stream_a_gigabyte("cat");
}

/// The gigabyte on the byte path (`read -> exec cat -> out`: blocks of checked lines, never
/// parsed): blocks go one per message, so memory stays flat here too.
#[cfg(target_os = "linux")]
#[test]
fn a_gigabyte_on_the_byte_path_streams_in_flat_memory() {
    stream_a_gigabyte("bytes");
}

/// A 1 GiB file through `read -> keep -> slim -> out` on the projected byte path, read by one
/// reader and by two (each over half the file): memory stays flat, under 150 MB, both ways.
#[cfg(target_os = "linux")]
#[test]
fn a_gigabyte_file_read_by_one_and_two_readers_streams_in_flat_memory() {
    use std::io::Write;
    let total: u64 = if cfg!(debug_assertions) {
        128 << 20
    } else {
        1 << 30
    };
    let dir = tempfile::tempdir().unwrap();
    let inp = dir.path().join("in.ndjson");
    let mut f = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&inp).unwrap());
    let (mut id, mut clicks, mut written, mut id_sum) = (0u64, 0u64, 0u64, 0u64);
    while written < total {
        let kind = if id % 3 == 0 { "click" } else { "view" };
        clicks += u64::from(id % 3 == 0);
        if id % 3 == 0 {
            id_sum += id;
        }
        let line = format!(
            "{{\"id\":{id},\"user\":\"u{}\",\"kind\":\"{kind}\",\"payload\":\"{}\"}}\n",
            id % 9973,
            "x".repeat((id % 64) as usize)
        );
        f.write_all(line.as_bytes()).unwrap();
        written += line.len() as u64;
        id += 1;
    }
    f.flush().unwrap();
    drop(f);
    for parallelism in [1, 2] {
        let out = dir.path().join("out.ndjson");
        let p = dir.path().join("p.toml");
        std::fs::write(
            &p,
            format!(
                "[stages.read]\nkind=\"ndjson.read\"\npath={:?}\nparallelism={parallelism}\n\
                 [stages.keep]\nkind=\"filter\"\ninput=\"read\"\nfield=\"kind\"\nop=\"eq\"\nvalue=\"click\"\n\
                 [stages.slim]\nkind=\"select\"\ninput=\"keep\"\nfields=[\"id\",\"user\"]\n\
                 [stages.out]\nkind=\"ndjson.write\"\ninput=\"slim\"\npath={:?}\n",
                inp.display().to_string(),
                out.display().to_string()
            ),
        )
        .unwrap();
        let (status, peak_mb) = run_measured(Command::new(BIN).args(["run", "--quiet"]).arg(&p));
        assert!(status.success(), "parallelism {parallelism}: {status:?}");
        // Read in pieces: this process's own size would count in the next child's peak (a
        // spawned child starts as a copy of it).
        let mut r = BufReader::new(std::fs::File::open(&out).unwrap());
        let (mut lines, mut line, mut first, mut sum) = (0u64, String::new(), String::new(), 0);
        while r.read_line(&mut line).unwrap() > 0 {
            if lines == 0 {
                first = line.clone();
            }
            let id = line["{\"id\":".len()..].split(',').next().unwrap();
            sum += id.parse::<u64>().unwrap();
            lines += 1;
            line.clear();
        }
        // Every click once (two readers interleave their blocks).
        assert_eq!((lines, sum), (clicks, id_sum), "parallelism {parallelism}");
        if parallelism == 1 {
            assert_eq!(first, "{\"id\":0,\"user\":\"u0\"}\n");
        }
        eprintln!(
            "parallelism {parallelism}: peak RSS {peak_mb:.1} MB over {} MB",
            total >> 20
        );
        assert!(
            peak_mb < 150.0,
            "parallelism {parallelism}: peak RSS {peak_mb:.1} MB"
        );
    }
}

/// Runs `cmd` to its end; its exit status and peak RSS in MB (read with `wait4`).
#[cfg(target_os = "linux")]
#[allow(clippy::zombie_processes)] // reaped by `wait4`, which also reports its peak RSS
fn run_measured(cmd: &mut Command) -> (std::process::ExitStatus, f64) {
    use std::os::unix::process::ExitStatusExt;
    let child = cmd.stdin(Stdio::null()).spawn().unwrap();
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value of this plain C struct.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `child` has not been waited for; `status` and `usage` are valid for writes.
    let pid = unsafe { libc::wait4(child.id() as libc::pid_t, &mut status, 0, &mut usage) };
    assert_eq!(pid, child.id() as libc::pid_t);
    (
        std::process::ExitStatus::from_raw(status),
        usage.ru_maxrss as f64 / 1024.0,
    )
}

/// Streams 1 GiB of NDJSON through `read [-> cat] -> keep -> slim -> out` and checks the output
/// and the peak RSS of the `millrace` process. `keep_input` is the stage the filter reads;
/// `bytes` runs `read -> cat -> out` instead.
#[cfg(target_os = "linux")]
#[allow(clippy::zombie_processes)] // reaped by `wait4` below, which also reports its peak RSS
fn stream_a_gigabyte(keep_input: &str) {
    let total: u64 = if cfg!(debug_assertions) {
        128 << 20
    } else {
        1 << 30
    };
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("p.toml");
    let text = if keep_input == "bytes" {
        "[stages.read]\nkind=\"ndjson.read\"\npath=\"-\"\n\
         [stages.cat]\nkind=\"exec\"\ninput=\"read\"\ncommand=[\"cat\"]\n\
         [stages.out]\nkind=\"ndjson.write\"\ninput=\"cat\"\npath=\"-\"\n"
            .to_string()
    } else {
        format!(
            "[stages.read]\nkind=\"ndjson.read\"\npath=\"-\"\n{}\
             [stages.keep]\nkind=\"filter\"\ninput=\"{keep_input}\"\nfield=\"kind\"\nop=\"eq\"\nvalue=\"click\"\n\
             [stages.slim]\nkind=\"select\"\ninput=\"keep\"\nfields=[\"id\",\"user\"]\n\
             [stages.out]\nkind=\"ndjson.write\"\ninput=\"slim\"\npath=\"-\"\n",
            if keep_input == "cat" {
                "[stages.cat]\nkind=\"exec\"\ninput=\"read\"\ncommand=[\"cat\"]\n"
            } else {
                ""
            }
        )
    };
    std::fs::write(&p, text).unwrap();
    let mut child = Command::new(BIN)
        .args(["run", "--quiet", &p.display().to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || {
        let mut id = 0u64;
        let mut clicks = 0u64;
        let mut written = 0u64;
        let mut chunk = String::with_capacity(1 << 20);
        while written < total {
            chunk.clear();
            while chunk.len() < (1 << 20) - 200 {
                let kind = if id % 3 == 0 { "click" } else { "view" };
                clicks += (id % 3 == 0) as u64;
                chunk.push_str(&format!(
                    "{{\"id\":{id},\"user\":\"u{}\",\"kind\":\"{kind}\",\"payload\":\"{}\"}}\n",
                    id % 9973,
                    "x".repeat((id % 64) as usize)
                ));
                id += 1;
            }
            stdin.write_all(chunk.as_bytes()).unwrap();
            written += chunk.len() as u64;
        }
        (clicks, id)
    });
    let stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut n = 0u64;
        let mut last = String::new();
        let mut r = BufReader::with_capacity(1 << 20, stdout);
        let mut line = String::new();
        while r.read_line(&mut line).unwrap() > 0 {
            n += 1;
            std::mem::swap(&mut last, &mut line);
            line.clear();
        }
        (n, last)
    });
    let (clicks, records) = writer.join().unwrap();
    let expected = if keep_input == "bytes" {
        records
    } else {
        clicks
    };
    let (lines, last) = reader.join().unwrap();
    // Reap this child with wait4 to read its own peak RSS.
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value of this plain C struct.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `child` has not been waited for; `status` and `usage` are valid for writes.
    let pid = unsafe { libc::wait4(child.id() as libc::pid_t, &mut status, 0, &mut usage) };
    assert_eq!(pid, child.id() as libc::pid_t);
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "status {status}"
    );
    assert_eq!(lines, expected, "every (click) record came out once");
    assert!(
        last.starts_with("{\"id\":") && last.contains("\"user\":"),
        "{last}"
    );
    let peak_mb = usage.ru_maxrss as f64 / 1024.0;
    eprintln!("peak RSS {peak_mb:.1} MB over {} MB", total >> 20);
    assert!(peak_mb < 150.0, "peak RSS {peak_mb:.1} MB");
}

/// `--progress json`: one JSON event per line on stderr, from `started` to `finished`.
#[test]
fn progress_json_writes_one_event_per_line() {
    let out = Command::new(BIN)
        .args(["run", "--progress", "json"])
        .arg(repo("examples/wordcount.toml"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let events: Vec<serde_json::Value> = String::from_utf8(out.stderr)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert_eq!(events.first().unwrap()["event"], "started");
    let last = events.last().unwrap();
    assert_eq!(last["event"], "finished");
    assert!(last["report"]["records_read"].as_u64().unwrap() > 0);
    assert_eq!(String::from_utf8(out.stdout).unwrap().lines().count(), 10);
}

/// Kills and reaps a child however the test ends.
struct Reaped(std::process::Child);
impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `millrace` with `args` (and `env`) and returns it with the lines it wrote to stderr
/// before `lines` of them.
fn started(args: &[&str], env: &[(&str, &str)], lines: usize) -> (Reaped, Vec<String>) {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_remove("MILLRACE_TOKEN")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = Reaped(cmd.spawn().unwrap());
    let mut err = BufReader::new(child.0.stderr.take().unwrap());
    let out = (0..lines)
        .map(|_| {
            let mut l = String::new();
            err.read_line(&mut l).unwrap();
            l.trim_end().to_string()
        })
        .collect();
    (child, out)
}

/// The address and token in a `serving on http://ADDR/?token=TOKEN` line.
fn served(line: &str) -> (String, String) {
    let url = line
        .strip_prefix("serving on http://")
        .unwrap_or_else(|| panic!("{line}"));
    let (addr, token) = url
        .split_once("/?token=")
        .unwrap_or_else(|| panic!("{line}"));
    (addr.to_string(), token.to_string())
}

/// One request to a server; the status and the JSON body.
fn http_call(
    addr: &str,
    token: &str,
    method: &str,
    path: &str,
    body: &str,
) -> (u16, serde_json::Value) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nContent-Type: application/toml\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let status = raw.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = raw.split_once("\r\n\r\n").unwrap().1;
    (status, serde_json::from_str(body).unwrap())
}

/// `millrace serve`: it prints the URL with a generated token, submits a pipeline over HTTP
/// and watches it finish; a non-loopback address needs the explicit flag.
#[test]
fn serve_runs_submitted_pipelines() {
    let refused = Command::new(BIN)
        .args(["serve", "--listen", "0.0.0.0:0"])
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--allow-remote"));
    // A busy port is an environment failure (exit 1), not an invalid pipeline (exit 2).
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let busy = Command::new(BIN)
        .args(["serve", "--listen", &addr])
        .output()
        .unwrap();
    assert_eq!(busy.status.code(), Some(1));
    let err = String::from_utf8_lossy(&busy.stderr);
    assert!(
        err.starts_with(&format!(
            "error: cannot listen on {addr}: Address already in use"
        )),
        "{err}"
    );

    let (child, lines) = started(&["serve", "--listen", "127.0.0.1:0"], &[], 1);
    let (addr, token) = served(&lines[0]);
    assert!(addr.starts_with("127.0.0.1:"), "{addr}");
    assert_eq!(token.len(), 48, "a generated token: {token}");
    assert!(token.bytes().all(|b| b.is_ascii_hexdigit()), "{token}");
    assert_eq!(http_call(&addr, "wrong-token", "GET", "/jobs", "").0, 401);
    let pipeline = std::fs::read_to_string(repo("examples/wordcount.toml"))
        .unwrap()
        .replace("data/millrace.txt", &repo("examples/data/millrace.txt"))
        .replace("path = \"-\"", "path = \"/dev/null\"");
    let (status, body) = http_call(&addr, &token, "POST", "/jobs?name=words", &pipeline);
    assert_eq!(status, 201, "{body}");
    let id = body["id"].as_u64().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, job) = http_call(&addr, &token, "GET", &format!("/jobs/{id}"), "");
        assert_eq!(status, 200);
        if job["status"] == "succeeded" {
            assert_eq!(
                job["name"], "wordcount",
                "the file's own name wins over ?name="
            );
            assert!(job["report"]["records_read"].as_u64().unwrap() > 0);
            // GET /jobs/{id} carries the per-step accounts; the source's holds.
            let accounts = job["report"]["accounts"].as_array().unwrap();
            let read = accounts
                .iter()
                .find(|a| a["shape"] == "source")
                .unwrap_or_else(|| panic!("{job}"));
            assert_eq!(read["records_in"], job["report"]["records_read"], "{job}");
            assert_eq!(read["records_in"], read["records_out"], "{job}");
            break;
        }
        assert_eq!(job["status"], "running", "{job}");
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(child);
}

/// The token comes from --token, else MILLRACE_TOKEN; a bad one is a usage error; a
/// non-loopback address, once allowed, prints a warning.
#[test]
fn serve_token_and_public_address() {
    let (child, lines) = started(
        &["serve", "--listen", "127.0.0.1:0"],
        &[("MILLRACE_TOKEN", "from-the-environment")],
        1,
    );
    let (addr, token) = served(&lines[0]);
    assert_eq!(token, "from-the-environment");
    assert_eq!(http_call(&addr, &token, "GET", "/jobs", "").0, 200);
    drop(child);
    let (child, lines) = started(
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--token",
            "from-the-flag",
        ],
        &[("MILLRACE_TOKEN", "from-the-environment")],
        1,
    );
    assert_eq!(served(&lines[0]).1, "from-the-flag");
    drop(child);
    let bad = Command::new(BIN)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--token",
            "has spaces in it",
        ])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&bad.stderr).starts_with("error: invalid token: "),
        "{bad:?}"
    );
    let (child, lines) = started(
        &["serve", "--listen", "0.0.0.0:0", "--allow-remote"],
        &[],
        2,
    );
    let (addr, _) = served(&lines[0]);
    assert!(
        addr.starts_with("127.0.0.1:"),
        "a URL this machine can open: {addr}"
    );
    assert!(
        lines[1].starts_with("warning: listening on 0.0.0.0:")
            && lines[1].contains("the token is the only protection"),
        "{}",
        lines[1]
    );
    drop(child);
}

/// `run --serve` serves with the same rules and prints its URL.
#[test]
fn run_serve_prints_its_url() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("feed");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: `c` is a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let pipeline = dir.path().join("p.toml");
    std::fs::write(
        &pipeline,
        format!(
            "[stages.read]\nkind = \"lines.read\"\npath = {:?}\n\n[stages.out]\nkind = \"ndjson.write\"\ninput = \"read\"\npath = \"/dev/null\"\n",
            fifo.display().to_string()
        ),
    )
    .unwrap();
    let (mut child, lines) = started(
        &[
            "run",
            "--quiet",
            "--serve",
            "127.0.0.1:0",
            "--token",
            "run-serve-token",
            pipeline.to_str().unwrap(),
        ],
        &[],
        1,
    );
    let (addr, token) = served(&lines[0]);
    assert_eq!(token, "run-serve-token");
    assert_eq!(http_call(&addr, "", "GET", "/jobs", "").0, 401);
    let (status, jobs) = http_call(&addr, &token, "GET", "/jobs", "");
    assert_eq!(status, 200);
    assert_eq!(jobs[0]["status"], "running", "{jobs}");
    // Ends the run: the pipeline reads the FIFO to its end.
    drop(std::fs::OpenOptions::new().write(true).open(&fifo).unwrap());
    let status = child.0.wait().unwrap();
    assert!(status.success(), "{status:?}");
}

/// `plugins inspect` shows the sandbox a process plugin gets on this kernel, and says a native
/// plugin cannot be sandboxed.
#[test]
fn plugins_inspect_shows_the_sandbox() {
    let root = tempfile::tempdir().unwrap();
    let write = |dir: &str, manifest: &str| {
        std::fs::create_dir_all(root.path().join(dir)).unwrap();
        std::fs::write(root.path().join(dir).join("plugin.toml"), manifest).unwrap();
    };
    write("proc", "name = \"proc\"\nversion = \"0.1.0\"\nkind = \"process\"\nentry = [\"cat\"]\nengine = \"*\"\npermissions = [\"filesystem.read\"]\n[limits]\ncpu_seconds = 3\naddress_space = \"512MiB\"\n");
    write("nat", "name = \"nat\"\nversion = \"0.1.0\"\nkind = \"native\"\nentry = \"libnat.so\"\nengine = \"*\"\n");
    let inspect = |name: &str| {
        let out = Command::new(BIN)
            .args(["plugins", "inspect", name, "--dir"])
            .arg(root.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let text = inspect("proc");
    let sup = millrace::sandbox::support();
    assert!(
        text.contains("limits: address_space = 512 MiB, cpu_seconds = 3"),
        "{text}"
    );
    match &sup.landlock {
        Ok(abi) => assert!(
            text.contains(&format!(
                "landlock (ABI {abi} on this kernel): reads everywhere (filesystem.read)"
            )),
            "{text}"
        ),
        Err(_) => assert!(
            text.contains("landlock: not supported on this kernel"),
            "{text}"
        ),
    }
    match &sup.seccomp {
        Ok(()) => assert!(
            text.contains("seccomp: socket() other than AF_UNIX"),
            "{text}"
        ),
        Err(_) => assert!(text.contains("seccomp: not supported here"), "{text}"),
    }
    let text = inspect("nat");
    assert!(
        text.contains("native plugins run inside the engine process and cannot be sandboxed"),
        "{text}"
    );
}
