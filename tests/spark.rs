//! `millrace spark` and `millrace segment` (docs/spark.md).
//!
//! The plan and the segment command are tested without Spark. The rest runs on a real Spark:
//! a standalone master and two workers started on 127.0.0.1 from an installed pyspark, the
//! same pipelines run by `millrace run` on one machine, and the outputs compared as sorted
//! multisets (and in order where the pipeline orders them): a word count over 50 MB of text, a
//! keyed tumbling window over 1 M events, the word count again with one executor JVM killed
//! (`kill -9`) while its tasks run, and a segment that fails on a bad record. Skipped, saying
//! so, where Java is missing; where pyspark is missing it is skipped too, except under CI
//! (`CI` set), which installs it (`.ci/run`).
// A test drives the binary and Spark from outside with std's threads: the `crate::sync` rule
// (clippy.toml) is for the engine's own code.
#![allow(clippy::disallowed_types, clippy::disallowed_methods)]

mod common;
#[path = "common/rng.rs"]
mod rng;

use std::io::{BufWriter, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use rng::Rng;

const BIN: &str = env!("CARGO_BIN_EXE_millrace");

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn wordcount_toml(input: &Path, out: &Path, limit: Option<u64>) -> String {
    let (last, limit) = match limit {
        Some(n) => (
            "top",
            format!("[stages.top]\nkind = \"limit\"\ninput = \"count\"\nn = {n}\n"),
        ),
        None => ("count", String::new()),
    };
    format!(
        r#"name = "wc"
[stages.read]
kind = "lines.read"
path = "{}"

[stages.words]
kind = "words"
input = "read"
lowercase = true

[stages.count]
kind = "count"
input = "words"
key = "word"
parallelism = 2

{limit}
[stages.out]
kind = "ndjson.write"
input = "{last}"
path = "{}"
"#,
        input.display(),
        out.display()
    )
}

#[test]
fn explain_prints_the_segments_shuffles_and_partitions() {
    let dir = tempfile::tempdir().unwrap();
    let text = write(dir.path(), "t.txt", "a b\n");
    let p = write(
        dir.path(),
        "wc.toml",
        &wordcount_toml(&text, &dir.path().join("o.ndjson"), Some(3)),
    );
    let out = Command::new(BIN)
        .args(["spark", "--explain", "--partitions", "6"])
        .arg(&p)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = s.lines().map(str::trim).collect();
    assert_eq!(lines.len(), 7, "{s}");
    assert!(
        lines[1].starts_with("read    `read`:") && lines[1].contains("at least 6 partitions"),
        "{s}"
    );
    assert_eq!(
        lines[2],
        "segment 0: words → count (lines on stdin), one millrace process per partition"
    );
    assert!(
        lines[3].starts_with("shuffle 1: `count`'s partial counts by `word` into 6 partitions"),
        "{s}"
    );
    assert!(
        lines[4].starts_with("limit   2: `top`: the first 3 records"),
        "{s}"
    );
    assert!(lines[5].starts_with("segment 3: no stages"), "{s}");
    assert!(lines[6].starts_with("write   `out`"), "{s}");
}

#[test]
fn what_cannot_run_on_spark_is_refused_naming_the_stage_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let text = write(dir.path(), "t.txt", "a b\n");
    let p = write(
        dir.path(),
        "wc.toml",
        &wordcount_toml(&text, Path::new("-"), None),
    );
    let out = Command::new(BIN)
        .args(["spark", "--output"])
        .arg(dir.path().join("o"))
        .arg(&p)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("wc.toml:18: stage `out`: writes stdout"),
        "{err}"
    );
    // An output directory that exists is refused before Spark starts.
    let p = write(
        dir.path(),
        "ok.toml",
        &wordcount_toml(&text, &dir.path().join("o.ndjson"), None),
    );
    std::fs::create_dir(dir.path().join("exists")).unwrap();
    // A directory is Spark's to read: a run on one machine refuses it, naming the stage.
    let on_dir = write(
        dir.path(),
        "dir.toml",
        &wordcount_toml(
            &dir.path().join("exists"),
            &dir.path().join("o.ndjson"),
            None,
        ),
    );
    let out = Command::new(BIN).arg("run").arg(&on_dir).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("dir.toml:2: stage `read`:")
            && err.contains("is a directory, a glob or a URL"),
        "{err}"
    );
    let out = Command::new(BIN)
        .args(["spark", "--output"])
        .arg(dir.path().join("exists"))
        .arg(&p)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("exists; Spark writes a new directory"));
}

#[test]
fn a_segment_runs_its_stages_between_stdin_and_stdout_and_fails_loudly() {
    let dir = tempfile::tempdir().unwrap();
    let text = write(dir.path(), "t.txt", "x\n");
    let p = write(
        dir.path(),
        "wc.toml",
        &wordcount_toml(&text, &dir.path().join("o.ndjson"), None),
    );
    let run = |stages: &str, input: &str, stdin: &str| {
        let mut child = Command::new(BIN)
            .args(["segment", "--stages", stages, "--input", input])
            .arg(&p)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    };
    // The count stage as the combiner: this partition's counts, sorted as count sorts.
    let out = run("words,count", "lines", "b a\nA b c\n");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "{\"count\":2,\"word\":\"a\"}\n{\"count\":2,\"word\":\"b\"}\n{\"count\":1,\"word\":\"c\"}\n"
    );
    // No stages: records in, records out, written as ndjson.write writes them.
    let out = run("", "ndjson", "{\"b\":1.0,\"a\":\"\\u00e9\"}\n");
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "{\"a\":\"é\",\"b\":1.0}\n"
    );
    // A bad record fails the segment with a non-zero status and the stage's name.
    let out = run("count", "ndjson", "{\"word\":\"a\"}\nnot json\n");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("stage `__spark_in`: -:2: invalid JSON"),
        "{err}"
    );
    // An unknown stage.
    let out = run("words,nope", "lines", "");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no stage `nope`"));
}

// ------------------------------------------------------------------------------- on Spark

/// An installed pyspark (its directory is SPARK_HOME), or why the Spark tests are skipped.
fn pyspark_home() -> Option<PathBuf> {
    let java = Command::new("java").arg("-version").output();
    if !java.is_ok_and(|o| o.status.success()) {
        eprintln!("SKIPPED: the Spark tests need Java (17 or newer) on PATH, and there is none");
        return None;
    }
    let out = Command::new("python3")
        .args([
            "-c",
            "import os, pyspark; print(os.path.dirname(pyspark.__file__))",
        ])
        .output();
    match out {
        Ok(o) if o.status.success() => {
            Some(PathBuf::from(String::from_utf8(o.stdout).unwrap().trim()))
        }
        _ if std::env::var_os("CI").is_some() => {
            panic!("CI must install pyspark for the Spark tests (.ci/run: pip install pyspark)")
        }
        _ => {
            eprintln!(
                "SKIPPED: the Spark tests need pyspark for python3: pip install pyspark==4.3.0"
            );
            None
        }
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A standalone master and its workers on 127.0.0.1, stopped (with every process they
/// started) when dropped.
struct Cluster {
    home: PathBuf,
    dir: tempfile::TempDir,
    master: Child,
    workers: Vec<Child>,
    url: String,
}

impl Cluster {
    fn start(home: &Path, workers: usize) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let (port, ui) = (free_port(), free_port());
        let logs = dir.path().to_path_buf();
        let spawn = |name: &str, args: &[String]| {
            let log = std::fs::File::create(logs.join(format!("{name}.log"))).unwrap();
            Command::new(home.join("bin/spark-class"))
                .args(args)
                .env("SPARK_HOME", home)
                .env("SPARK_LOCAL_IP", "127.0.0.1")
                .env("SPARK_LOG_DIR", &logs)
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap()
        };
        let master = spawn(
            "master",
            &[
                "org.apache.spark.deploy.master.Master".into(),
                "--host".into(),
                "127.0.0.1".into(),
                "--port".into(),
                port.to_string(),
                "--webui-port".into(),
                ui.to_string(),
            ],
        );
        let url = format!("spark://127.0.0.1:{port}");
        let mut c = Cluster {
            home: home.to_path_buf(),
            dir,
            master,
            workers: Vec::new(),
            url,
        };
        for i in 0..workers {
            let work = logs.join(format!("work{i}"));
            let w = spawn(
                &format!("worker{i}"),
                &[
                    "org.apache.spark.deploy.worker.Worker".into(),
                    "--host".into(),
                    "127.0.0.1".into(),
                    "--cores".into(),
                    "1".into(),
                    "--memory".into(),
                    "2g".into(),
                    "--webui-port".into(),
                    free_port().to_string(),
                    "--work-dir".into(),
                    work.display().to_string(),
                    c.url.clone(),
                ],
            );
            c.workers.push(w);
        }
        // Ready when the master's status page lists every worker alive.
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let alive = http_get(ui, "/json/").and_then(|body| {
                let v: serde_json::Value = serde_json::from_str(&body).ok()?;
                let ws = v.get("workers")?.as_array()?;
                Some(ws.iter().filter(|w| w["state"] == "ALIVE").count())
            });
            if alive == Some(workers) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the cluster did not start within 2 minutes; logs in {}:\n{}",
                c.dir.path().display(),
                c.logs()
            );
            std::thread::sleep(Duration::from_millis(200)); // polling a server: no event to wait on
        }
        c
    }

    fn logs(&self) -> String {
        let mut s = String::new();
        for e in std::fs::read_dir(self.dir.path()).unwrap().flatten() {
            if e.path().extension().is_some_and(|x| x == "log") {
                let text = std::fs::read_to_string(e.path()).unwrap_or_default();
                let tail: String = text
                    .chars()
                    .rev()
                    .take(3000)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect();
                s.push_str(&format!("--- {}\n{tail}\n", e.path().display()));
            }
        }
        s
    }

    /// Runs `millrace spark` on the cluster; `during` runs while it does (given its pid).
    fn run(
        &self,
        pipeline: &Path,
        output: &Path,
        extra: &[&str],
        during: impl FnOnce(u32),
    ) -> Output {
        let child = Command::new(BIN)
            .arg("spark")
            .arg(pipeline)
            .args(extra)
            .args(["--master", &self.url, "--partitions", "4"])
            .arg("--output")
            .arg(output)
            .args(["--conf", "spark.executor.memory=1g"])
            .env("SPARK_HOME", &self.home)
            .env("SPARK_LOCAL_IP", "127.0.0.1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id();
        let (tx, rx) = std::sync::mpsc::channel();
        let waiter = std::thread::spawn(move || tx.send(child.wait_with_output()).unwrap());
        during(pid);
        let out = match rx.recv_timeout(Duration::from_secs(600)) {
            Ok(out) => out.unwrap(),
            Err(_) => {
                kill_tree(pid);
                panic!("millrace spark did not finish within 10 minutes")
            }
        };
        waiter.join().unwrap();
        out
    }
}

impl Cluster {
    /// [`run`](Self::run) with an executor JVM killed while it runs a segment: the job must
    /// succeed, and Spark must have noticed the loss.
    fn run_losing_an_executor(&self, pipeline: &Path, output: &Path, extra: &[&str]) {
        let mut killed = None;
        let out = self.run(pipeline, output, extra, |job| {
            killed = kill_an_executor_running_a_segment(job)
        });
        assert!(
            killed.is_some(),
            "no executor running a segment was found to kill"
        );
        assert_ran(&out);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("Lost executor"),
            "Spark did not notice the kill:\n{stderr}"
        );
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for w in &mut self.workers {
            kill_tree(w.id());
            let _ = w.wait();
        }
        kill_tree(self.master.id());
        let _ = self.master.wait();
    }
}

/// A minimal HTTP GET of 127.0.0.1:port (the master's status page).
fn http_get(port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    let at = body.find("\r\n\r\n")?;
    Some(body[at + 4..].to_string())
}

/// Every process: (pid, parent pid, command line).
fn processes() -> Vec<(u32, u32, String)> {
    let mut v = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid ...: the command may hold spaces and parentheses.
        let Some(after) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
            continue;
        };
        let ppid = after
            .split(' ')
            .nth(1)
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        let cmd = std::fs::read(e.path().join("cmdline"))
            .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
            .unwrap_or_default();
        v.push((pid, ppid, cmd));
    }
    v
}

/// SIGKILLs `pid` and every process below it.
fn kill_tree(pid: u32) {
    let procs = processes();
    let mut doomed = vec![pid];
    let mut i = 0;
    while i < doomed.len() {
        let p = doomed[i];
        doomed.extend(procs.iter().filter(|x| x.1 == p).map(|x| x.0));
        i += 1;
    }
    for p in doomed.iter().rev() {
        let _ = Command::new("kill").args(["-9", &p.to_string()]).output();
    }
}

fn lines_of(dir_or_file: &Path) -> Vec<String> {
    let mut v = Vec::new();
    if dir_or_file.is_dir() {
        let mut parts: Vec<PathBuf> = std::fs::read_dir(dir_or_file)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("part-")
            })
            .collect();
        parts.sort();
        for p in parts {
            v.extend(
                std::fs::read_to_string(p)
                    .unwrap()
                    .lines()
                    .map(String::from),
            );
        }
    } else {
        v.extend(
            std::fs::read_to_string(dir_or_file)
                .unwrap()
                .lines()
                .map(String::from),
        );
    }
    v
}

/// The single run's output and Spark's are the same multiset of lines, of `at_least` lines.
fn assert_same_multiset(single: &Path, spark: &Path, what: &str, at_least: usize) {
    let (mut one, mut many) = (lines_of(single), lines_of(spark));
    assert!(one.len() >= at_least, "{what}: {} lines", one.len());
    one.sort();
    many.sort();
    assert!(
        one == many,
        "{what} differ: {} against {} lines",
        one.len(),
        many.len()
    );
}

fn single_run(pipeline: &Path) {
    let out = Command::new(BIN)
        .args(["run", "--quiet"])
        .arg(pipeline)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn assert_ran(out: &Output) {
    assert!(
        out.status.success(),
        "millrace spark failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("millrace spark: application app-"),
        "{stdout}"
    );
}

/// ~`bytes` of text: lines of 4–16 words from a 20,000-word vocabulary, skewed.
fn text(path: &Path, bytes: usize) {
    let mut rng = Rng(7);
    let vocab: Vec<String> = (0..20_000)
        .map(|i| {
            let len = 2 + (i % 9);
            (0..len)
                .map(|j| (b'a' + ((i * 7 + j * 13) % 26) as u8) as char)
                .collect::<String>()
                + &i.to_string()
        })
        .collect();
    let mut w = BufWriter::new(std::fs::File::create(path).unwrap());
    let mut written = 0;
    while written < bytes {
        let n = rng.between(4, 16);
        let mut line = String::new();
        for k in 0..n {
            let r = rng.below(vocab.len() as u64);
            let word = &vocab[rng.below(r + 1) as usize];
            if k > 0 {
                line.push(' ');
            }
            if rng.below(10) == 0 {
                line.push_str(&word.to_uppercase());
            } else {
                line.push_str(word);
            }
        }
        line.push('\n');
        written += line.len();
        w.write_all(line.as_bytes()).unwrap();
    }
}

/// `n` events in arrival order: 1,000 keys, event time advancing 20 per millisecond, each up
/// to 1,999 ms older than the newest (less than the window's bound of 2 s: none is late).
fn events(path: &Path, n: u64) {
    let mut rng = Rng(11);
    let t0: u64 = 1_700_000_000_000;
    let mut w = BufWriter::new(std::fs::File::create(path).unwrap());
    for i in 0..n {
        let ts = t0 + i / 20 - rng.below(2000);
        writeln!(
            w,
            "{{\"k\":\"u{}\",\"ts\":{ts},\"v\":{}}}",
            rng.below(1000),
            rng.below(100)
        )
        .unwrap();
    }
}

/// Waits (while the job `job` runs) for a `millrace segment` process and SIGKILLs the executor
/// JVM it descends from; the executor's pid, or `None` if the job ended first.
fn kill_an_executor_running_a_segment(job: u32) -> Option<u32> {
    let deadline = Instant::now() + Duration::from_secs(300);
    let running = || Path::new(&format!("/proc/{job}")).exists();
    while Instant::now() < deadline && running() {
        let procs = processes();
        let executor = procs
            .iter()
            .filter(|p| p.2.contains(" segment ") && p.2.contains(" --stages "))
            .find_map(|seg| {
                let mut at = seg.1;
                for _ in 0..10 {
                    let p = procs.iter().find(|p| p.0 == at)?;
                    if p.2.contains("CoarseGrainedExecutorBackend") {
                        return Some(p.0);
                    }
                    at = p.1;
                }
                None
            });
        match executor {
            Some(pid) => {
                let k = Command::new("kill")
                    .args(["-9", &pid.to_string()])
                    .status()
                    .unwrap();
                assert!(k.success());
                return Some(pid);
            }
            None => std::thread::sleep(Duration::from_millis(50)), // polling /proc: no event to wait on
        }
    }
    None
}

#[test]
fn on_a_standalone_cluster_the_outputs_equal_a_single_machine_run() {
    let Some(home) = pyspark_home() else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let started = Instant::now();
    text(&d.join("text.txt"), 50 << 20);
    events(&d.join("events.ndjson"), 1_000_000);
    let cluster = Cluster::start(&home, 2);
    eprintln!("cluster up in {:?}", started.elapsed());

    // Word count over 50 MB, every count.
    let wc = write(
        d,
        "wc.toml",
        &wordcount_toml(&d.join("text.txt"), &d.join("wc.ndjson"), None),
    );
    single_run(&wc);
    let out = cluster.run(&wc, &d.join("wc-spark"), &[], |_| {});
    assert_ran(&out);
    assert_same_multiset(
        &d.join("wc.ndjson"),
        &d.join("wc-spark"),
        "word counts",
        10_000,
    );
    eprintln!("word count done at {:?}", started.elapsed());

    // A keyed tumbling window over 1 M events, after an exec stage (a child of the segment),
    // with an executor killed mid-job.
    let win = write(
        d,
        "win.toml",
        &format!(
            r#"[stages.read]
kind = "ndjson.read"
path = "{}"

[stages.pass]
kind = "exec"
input = "read"
command = ["cat"]

[stages.some]
kind = "filter"
input = "pass"
field = "v"
op = "ge"
value = 10

[stages.per_key]
kind = "window"
input = "some"
key_field = "k"
time_field = "ts"
tumbling = "10s"
max_out_of_orderness = "2s"
late = "error"
aggregate = {{ n = "count", total = "sum(v)", top = "max(v)" }}

[stages.out]
kind = "ndjson.write"
input = "per_key"
path = "{}"
"#,
            d.join("events.ndjson").display(),
            d.join("win.ndjson").display()
        ),
    );
    single_run(&win);
    // With a binary every worker has, instead of the shipped one; an executor is killed while
    // the job runs (after the shuffle's map side has written, its lost outputs are computed
    // again).
    cluster.run_losing_an_executor(&win, &d.join("win-spark"), &["--binary", BIN]);
    assert_same_multiset(
        &d.join("win.ndjson"),
        &d.join("win-spark"),
        "window results",
        5_000,
    );
    eprintln!("window done at {:?}", started.elapsed());

    // The word count with its top 20, one executor JVM killed while its segments run: Spark
    // re-runs the lost tasks, and the output is the same, in the same order.
    let top = write(
        d,
        "top.toml",
        &wordcount_toml(&d.join("text.txt"), &d.join("top.ndjson"), Some(20)),
    );
    single_run(&top);
    // Spark reads the text from three files matched by a glob.
    let parts = d.join("parts");
    std::fs::create_dir(&parts).unwrap();
    let all = std::fs::read_to_string(d.join("text.txt")).unwrap();
    let lines: Vec<&str> = all.lines().collect();
    for (i, chunk) in lines.chunks(lines.len().div_ceil(3)).enumerate() {
        std::fs::write(parts.join(format!("part{i}.txt")), chunk.join("\n") + "\n").unwrap();
    }
    let top = write(
        d,
        "top-glob.toml",
        &wordcount_toml(
            &parts.join("part[0-9].txt"),
            &d.join("unused.ndjson"),
            Some(20),
        ),
    );
    cluster.run_losing_an_executor(&top, &d.join("top-spark"), &[]);
    assert_eq!(
        lines_of(&d.join("top-spark")),
        lines_of(&d.join("top.ndjson")),
        "top 20 after a lost executor"
    );
    eprintln!("kill done at {:?}", started.elapsed());

    // A process plugin and a native one run on the executors (found through the pipeline's
    // plugin_dirs; the native library at its path on every worker), over a
    // text with a line of invalid UTF-8: the source skips it on one machine (on_error =
    // "skip"); on Spark it arrives decoded by the JVM, with U+FFFD for the bad bytes
    // (docs/spark.md, "Invalid UTF-8"). Every other line is the same, in input order.
    let mut text =
        std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/data/millrace.txt"))
            .unwrap();
    text.extend_from_slice(b"a line of forty bytes or more, with \xff\xfe in the middle\n");
    text.extend_from_slice(b"and the last line after it, also long enough to pass the filter\n");
    std::fs::write(d.join("plugin.txt"), text).unwrap();
    let plug = write(
        d,
        "plugin.toml",
        &format!(
            r#"plugin_dirs = ["{}", "{}"]
[stages.read]
kind = "lines.read"
path = "{}"
on_error = "skip"
[stages.long]
kind = "textops.length"
input = "read"
field = "line"
min = 40
[stages.loud]
kind = "casefold.upper"
input = "long"
field = "line"
[stages.out]
kind = "ndjson.write"
input = "loud"
path = "{}"
"#,
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("plugins")
                .display(),
            d.join("native").display(),
            d.join("plugin.txt").display(),
            d.join("plugin.ndjson").display()
        ),
    );
    common::install(
        &d.join("native"),
        "casefold",
        &common::bundled("casefold"),
        "millrace_casefold",
    );
    single_run(&plug);
    let out = cluster.run(&plug, &d.join("plugin-spark"), &[], |_| {});
    assert_ran(&out);
    let one = lines_of(&d.join("plugin.ndjson"));
    assert!(one.len() > 20 && one[0].contains("\"line\":\""), "{one:?}");
    assert!(
        one.last().unwrap().contains("AND THE LAST LINE AFTER IT"),
        "{one:?}"
    );
    let mut many = lines_of(&d.join("plugin-spark"));
    let replaced = "{\"line\":\"A LINE OF FORTY BYTES OR MORE, WITH \u{fffd}\u{fffd} IN THE MIDDLE\",\"line_len\":52}";
    let at = many.iter().position(|l| l == replaced);
    assert!(
        at.is_some(),
        "the invalid line as Spark decodes it: {many:?}"
    );
    many.remove(at.unwrap());
    assert_eq!(many, one, "a plugin's output, in input order");
    eprintln!("plugins done at {:?}", started.elapsed());

    // A bad record under on_error = "fail" (in a directory Spark reads): the job fails with
    // millrace's message.
    std::fs::create_dir(d.join("bad")).unwrap();
    let bad_input = d.join("bad/events.ndjson");
    let mut good = std::fs::read_to_string(d.join("events.ndjson")).unwrap();
    good.truncate(good.len() / 2);
    let cut = good.rfind('\n').unwrap() + 1;
    good.truncate(cut);
    good.push_str("{\"k\": \"u1\", \"ts\": oops}\n");
    std::fs::write(&bad_input, good).unwrap();
    let bad = write(
        d,
        "bad.toml",
        &std::fs::read_to_string(&win).unwrap().replace(
            &d.join("events.ndjson").display().to_string(),
            &d.join("bad").display().to_string(),
        ),
    );
    let out = cluster.run(&bad, &d.join("bad-spark"), &[], |_| {});
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The driver's stderr reaches spark-submit's stdout (PythonRunner merges them).
    let output = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    let line = output
        .lines()
        .find(|l| l.starts_with("error: millrace spark: the job failed:"))
        .unwrap_or_else(|| panic!("no failure line:\n{output}"));
    assert!(
        line.contains("millrace segment 0 (pass -> some) failed in partition"),
        "{line}"
    );
    assert!(
        line.contains("stage `read`: -:") && line.contains("invalid JSON"),
        "{line}"
    );
    assert!(
        !d.join("bad-spark/_SUCCESS").exists(),
        "a failed job committed its output"
    );
    eprintln!("all done at {:?}", started.elapsed());
}
