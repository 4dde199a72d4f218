//! Hot reload of a running pipeline (`PipelineSpec::build_reloadable`, `ReloadHandle`): under
//! load, no record lost, duplicated or processed by two versions of a stage; failed reloads
//! leave the old version running; topology changes are refused.
//! `the_seed_field_rename_under_load` is the classic hot-reload bug: a stage's field is renamed
//! while records flow, and a batch half processed by the old version and half by the new one
//! loses or duplicates records.
// A test drives the engine from outside with std's threads and atomics: the `crate::sync`
// rule (clippy.toml) is for the engine's own code.
#![allow(clippy::disallowed_types, clippy::disallowed_methods)]

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{bundled, install};
use millrace::config::{ConfigErrorKind, PipelineSpec, ReloadHandle, WatchError};

fn mkfifo(path: &Path) {
    let ok = Command::new("mkfifo").arg(path).status().unwrap().success();
    assert!(ok, "mkfifo {}", path.display());
}

/// Replaces a file the way editors do: a temporary file renamed over it.
fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp~");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A pipeline reading `in.fifo` in `dir`, run on a thread while `feed` writes the input and
/// reloads; returns what `feed` returns and the handle.
fn run_with<R: Send>(
    dir: &Path,
    config: &str,
    feed: impl FnOnce(&ReloadHandle, &mut std::fs::File) -> R + Send,
) -> (Result<millrace::RunReport, String>, R, ReloadHandle) {
    let file = dir.join("p.toml");
    std::fs::write(&file, config).unwrap();
    mkfifo(&dir.join("in.fifo"));
    let spec = PipelineSpec::from_file(&file).unwrap();
    let (pipeline, handle) = spec.build_reloadable().unwrap();
    let (report, fed) = std::thread::scope(|s| {
        let h = handle.clone();
        let feeder = s.spawn(move || {
            // Opening a FIFO for writing waits for the pipeline to open it for reading.
            let mut input = std::fs::File::create(dir.join("in.fifo")).unwrap();
            feed(&h, &mut input)
            // `input` dropped: end of input
        });
        // The pipeline runs here (it is built on this thread).
        let report = pipeline.run().map_err(|e| e.to_string());
        (report, feeder.join().unwrap())
    });
    (report, fed, handle)
}

/// Writes records `seq` in `from..to` to the pipeline.
fn write_records(input: &mut std::fs::File, from: u64, to: u64) {
    let mut chunk = String::with_capacity(((to - from) * 12) as usize);
    for i in from..to {
        chunk.push_str(&format!("{{\"seq\":{i}}}\n"));
    }
    input.write_all(chunk.as_bytes()).unwrap();
}

/// The value of `"key":"…"` in a line of our own output (no parsing: millions of lines).
fn field<'a>(line: &'a str, key: &str) -> &'a str {
    let pat = format!("\"{key}\":");
    let start = line
        .find(&pat)
        .unwrap_or_else(|| panic!("no {key} in {line}"))
        + pat.len();
    let rest = line[start..].trim_start().strip_prefix('"').unwrap();
    &rest[..rest.find('"').unwrap()]
}

fn seq(line: &str) -> usize {
    let start = line.find("\"seq\":").unwrap() + 6;
    line[start..]
        .trim_start()
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

fn stress_config(plugins: &Path, version: &str) -> String {
    format!(
        r#"plugin_dirs = [{plugins:?}]

[stages.read]
kind = "ndjson.read"
path = "in.fifo"

[stages.tag]
kind = "tagger.tag"
input = "read"
field = "n"
value = "{version}"
batch_field = "nb"

[stages.proc]
kind = "exec"
input = "tag"
command = ["sed", "s/}}$/,\"p\":\"{version}\"}}/"]

[stages.out]
kind = "ndjson.write"
input = "proc"
path = "out.ndjson"
"#
    )
}

/// Ten million sequence-numbered records through a reloadable native-plugin stage and a
/// process stage while 50 reloads alternate between two versions (every other one also
/// replacing the plugin's library): every record comes out once, every batch of the native
/// stage carries one version, and the per-version counts match the tags.
#[test]
fn ten_million_records_through_fifty_reloads() {
    let total: u64 = if cfg!(debug_assertions) {
        200_000
    } else {
        10_000_000
    };
    const RELOADS: u64 = 50;
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins");
    install(&plugins, "tagger", &bundled("tagger"), "millrace_tagger");
    // The manifest points at the built library; reloads re-copy it to a library of our own.
    let library = plugins.join("tagger/libtagger.so");
    let manifest = plugins.join("tagger/plugin.toml");
    let text = std::fs::read_to_string(&manifest).unwrap();
    let built: PathBuf = text
        .lines()
        .find_map(|l| l.strip_prefix("entry = "))
        .map(|e| e.trim_matches('"').into())
        .unwrap();
    std::fs::copy(&built, &library).unwrap();
    let text: String = text
        .lines()
        .map(|l| {
            if l.starts_with("entry = ") {
                "entry = \"libtagger.so\"".to_string()
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(&manifest, text).unwrap();

    let p = dir.path().join("p.toml");
    let (report, (), handle) = run_with(dir.path(), &stress_config(&plugins, "a"), |h, input| {
        let chunks = RELOADS * 2 + 2;
        let per = total / chunks;
        for c in 0..chunks {
            let to = if c == chunks - 1 {
                total
            } else {
                (c + 1) * per
            };
            write_records(input, c * per, to);
            if c % 2 == 1 && c / 2 < RELOADS {
                let r = c / 2; // reload r+1 makes version r+1: odd "b", even "a"
                let v = if r % 2 == 0 { "b" } else { "a" };
                write_atomically(&p, &stress_config(&plugins, v));
                if r % 2 == 0 {
                    // A new build of the library: loaded beside the old one, from a copy.
                    let tmp = library.with_extension("new");
                    std::fs::copy(&built, &tmp).unwrap();
                    std::fs::rename(&tmp, &library).unwrap();
                }
                let e = h.reload().unwrap();
                assert!(e.error.is_none(), "{e}");
            }
        }
    });
    let report = report.unwrap();

    let mut seen = vec![false; total as usize];
    let mut batches: HashMap<String, String> = HashMap::new();
    let mut images = std::collections::HashSet::new();
    let (mut n_a, mut p_a) = (0u64, 0u64);
    let out = std::fs::File::open(dir.path().join("out.ndjson")).unwrap();
    for line in BufReader::with_capacity(1 << 20, out).lines() {
        let line = line.unwrap();
        let s = seq(&line);
        assert!(!seen[s], "seq {s} came out twice");
        seen[s] = true;
        let (n, p, nb) = (field(&line, "n"), field(&line, "p"), field(&line, "nb"));
        n_a += u64::from(n == "a");
        p_a += u64::from(p == "a");
        let first = batches
            .entry(nb.to_string())
            .or_insert_with(|| n.to_string());
        assert_eq!(first, n, "batch {nb} was processed by two versions");
        images.insert(nb.split('-').next().unwrap().to_string());
    }
    let missing = seen.iter().filter(|s| !**s).count();
    assert_eq!(missing, 0, "{missing} records lost");
    assert!(
        images.len() >= 2,
        "the library was never replaced: {images:?}"
    );

    // The report's records per version agree with the tags: even versions are "a".
    let versions = handle.records_per_version();
    for (stage, tagged_a) in [("tag", n_a), ("proc", p_a)] {
        let counts = &versions[stage];
        assert_eq!(counts.values().sum::<u64>(), total, "{stage}: {counts:?}");
        let a: u64 = counts
            .iter()
            .filter(|(v, _)| *v % 2 == 0)
            .map(|(_, n)| n)
            .sum();
        assert_eq!(a, tagged_a, "{stage}: {counts:?}");
        assert!(counts.len() > 2, "{stage} saw {} versions", counts.len());
    }
    assert_eq!(handle.version(), RELOADS);
    assert_eq!(handle.events().len() as u64, RELOADS);
    assert_eq!(report.stage("out").unwrap().records_out, total);
}

/// Seed bug 1: version 2 of a process plugin renames the parameter version 1 relied on
/// (`uid_field` becomes `user_field`, in the manifest, the program and the pipeline at once).
/// Reloaded under load, no batch meets a half-old, half-new plugin: no error, and every record
/// is marked by exactly one version.
#[test]
fn the_seed_field_rename_under_load() {
    let total: u64 = 60_000;
    let dir = tempfile::tempdir().unwrap();
    let plugin = dir.path().join("plugins/renamer");
    std::fs::create_dir_all(&plugin).unwrap();
    let version = |v: u32| {
        let param = if v == 1 { "uid_field" } else { "user_field" };
        let manifest = format!(
            "name = \"renamer\"\nversion = \"{v}.0.0\"\nkind = \"process\"\nentry = [\"python3\", \"mark.py\"]\nengine = \">=0.1\"\n[[nodes]]\nname = \"mark\"\n[nodes.params.{param}]\ntype = \"string\"\nrequired = true\n"
        );
        // Version 1 reads `uid_field`; version 2 `user_field`: a KeyError if they were mixed.
        let script = format!(
            "import json, os, sys\nfield = json.loads(os.environ['MILLRACE_PARAMS'])['{param}']\nfor line in sys.stdin:\n    r = json.loads(line)\n    r['by'] = 'v{v}:' + str(r[field])\n    sys.stdout.write(json.dumps(r) + '\\n')\n"
        );
        let config = format!(
            "plugin_dirs = [\"plugins\"]\n[stages.read]\nkind = \"ndjson.read\"\npath = \"in.fifo\"\n[stages.mark]\nkind = \"renamer.mark\"\ninput = \"read\"\n{param} = \"seq\"\n[stages.out]\nkind = \"ndjson.write\"\ninput = \"mark\"\npath = \"out.ndjson\"\n"
        );
        (manifest, script, config)
    };
    let install_version = |v: u32| {
        let (manifest, script, config) = version(v);
        write_atomically(&plugin.join("plugin.toml"), &manifest);
        write_atomically(&plugin.join("mark.py"), &script);
        write_atomically(&dir.path().join("p.toml"), &config);
    };
    install_version(1);
    let (_, _, config) = version(1);
    let (report, (), handle) = run_with(dir.path(), &config, |h, input| {
        for c in 0..6u64 {
            write_records(input, c * 10_000, (c + 1) * 10_000);
            install_version(if c % 2 == 0 { 2 } else { 1 });
            let e = h.reload().unwrap();
            assert!(e.changed.iter().any(|c| c.contains("stage `mark`")), "{e}");
        }
    });
    report.unwrap();
    let mut seen = vec![false; total as usize];
    let mut by_version = [0u64; 3];
    for line in std::fs::read_to_string(dir.path().join("out.ndjson"))
        .unwrap()
        .lines()
    {
        let s = seq(line);
        assert!(!seen[s], "seq {s} twice");
        seen[s] = true;
        let by = field(line, "by");
        assert_eq!(by, format!("{}:{s}", &by[..2]), "{line}");
        by_version[if by.starts_with("v1") { 1 } else { 2 }] += 1;
    }
    assert!(seen.iter().all(|s| *s), "records lost");
    assert!(by_version[1] > 0 && by_version[2] > 0, "{by_version:?}");
    let counts = &handle.records_per_version()["mark"];
    let odd: u64 = counts
        .iter()
        .filter(|(v, _)| *v % 2 == 1)
        .map(|(_, n)| n)
        .sum();
    assert_eq!(
        odd, by_version[2],
        "version 2 is every odd stage version: {counts:?}"
    );
}

fn simple_config(threshold: i64, extra: &str) -> String {
    format!(
        "[stages.read]\nkind = \"ndjson.read\"\npath = \"in.fifo\"\n[stages.keep]\nkind = \"filter\"\ninput = \"read\"\nfield = \"seq\"\nop = \"ge\"\nvalue = {threshold}\n{extra}[stages.out]\nkind = \"ndjson.write\"\ninput = \"keep\"\npath = \"out.ndjson\"\n"
    )
}

/// Waits until `stage` has processed `n` records (a reload applies from the next batch on).
fn wait_processed(h: &ReloadHandle, stage: &str, n: u64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while h.records_per_version()[stage].values().sum::<u64>() < n {
        assert!(
            std::time::Instant::now() < deadline,
            "{stage} never processed {n} records"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

fn output_seqs(dir: &Path) -> Vec<usize> {
    std::fs::read_to_string(dir.join("out.ndjson"))
        .unwrap()
        .lines()
        .map(seq)
        .collect()
}

/// An invalid new config, a stage added, and a kind that cannot reload: each is refused with
/// its reason, the old version keeps running, and no record is lost.
#[test]
fn refused_reloads_leave_the_old_version_running() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("p.toml");
    let (report, errors, handle) = run_with(dir.path(), &simple_config(0, ""), |h, input| {
        let mut errors = Vec::new();
        write_records(input, 0, 1000);
        for bad in [
            "[stages.read\nkind = ".to_string(),
            simple_config(
                0,
                "[stages.more]\nkind = \"limit\"\ninput = \"keep\"\nn = 5\n",
            )
            .replace("input = \"keep\"\npath", "input = \"more\"\npath"),
            "[stages.read]\nkind = \"ndjson.read\"\npath = \"in.fifo\"\n[stages.keep]\nkind = \"select\"\ninput = \"read\"\nfields = [\"seq\"]\n[stages.out]\nkind = \"ndjson.write\"\ninput = \"keep\"\npath = \"out.ndjson\"\n".to_string(),
            simple_config(0, "").replace("path = \"out.ndjson\"", "path = \"other.ndjson\""),
            // The error policy is fixed for the run.
            simple_config(0, "on_error = \"skip\"\n"),
        ] {
            write_atomically(&p, &bad);
            errors.push(h.reload().unwrap_err());
            write_records(
                input,
                1000 * errors.len() as u64,
                1000 * (errors.len() as u64 + 1),
            );
        }
        // A valid change still applies afterwards, from the next batch on.
        wait_processed(h, "keep", 6000);
        write_atomically(&p, &simple_config(4500, ""));
        let e = h.reload().unwrap();
        assert_eq!(e.changed, vec!["stage `keep`: parameters".to_string()]);
        write_records(input, 6000, 7000);
        errors
    });
    report.unwrap();
    let what: Vec<_> = errors.iter().map(|e| (e.kind(), e.stage())).collect();
    assert_eq!(
        what,
        [
            (ConfigErrorKind::Syntax, None),
            (ConfigErrorKind::RestartRequired, Some("more")),
            (ConfigErrorKind::RestartRequired, Some("keep")),
            (ConfigErrorKind::RestartRequired, Some("out")),
            (ConfigErrorKind::RestartRequired, Some("keep")),
        ],
        "{errors:?}"
    );
    assert_eq!(
        errors[2].to_string(),
        format!(
            "{}:4: stage `keep`: restart required: its kind changed",
            p.display()
        )
    );
    // Before the valid reload everything passed (threshold 0); after it, only seq >= 4500.
    let seqs = output_seqs(dir.path());
    assert!(
        errors[4]
            .to_string()
            .contains("its on_error (or dead_letter) changed"),
        "{}",
        errors[4]
    );
    let before: Vec<usize> = seqs.iter().copied().filter(|s| *s < 6000).collect();
    assert_eq!(
        before.len(),
        6000,
        "no record lost while reloads were refused"
    );
    assert_eq!(
        seqs.iter().filter(|s| **s >= 6000).count(),
        1000,
        "the new threshold lets 6000.. through"
    );
    let events = handle.events();
    assert_eq!(events.len(), 6);
    assert_eq!(events.iter().filter(|e| e.error.is_some()).count(), 5);
    assert_eq!(handle.version(), 1);
}

/// A native plugin whose new library cannot be loaded: the reload is refused, the old library
/// keeps processing, and a good library afterwards is picked up.
#[test]
fn a_plugin_that_fails_to_load_leaves_the_old_one_running() {
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins");
    install(&plugins, "tagger", &bundled("tagger"), "millrace_tagger");
    let built = common::lib("millrace_tagger");
    let library = plugins.join("tagger/libtagger.so");
    std::fs::copy(&built, &library).unwrap();
    let manifest = plugins.join("tagger/plugin.toml");
    let text = std::fs::read_to_string(&manifest).unwrap();
    let text = text.replace(
        &format!("{:?}", built.display().to_string()),
        "\"libtagger.so\"",
    );
    std::fs::write(&manifest, text).unwrap();
    let config = format!(
        "plugin_dirs = [{:?}]\n[stages.read]\nkind = \"ndjson.read\"\npath = \"in.fifo\"\n[stages.tag]\nkind = \"tagger.tag\"\ninput = \"read\"\nvalue = \"x\"\n[stages.out]\nkind = \"ndjson.write\"\ninput = \"tag\"\npath = \"out.ndjson\"\n",
        plugins.display().to_string()
    );
    let (report, (bad, good), _) = run_with(dir.path(), &config, |h, input| {
        write_records(input, 0, 3000);
        write_atomically(&library, "not a library");
        let bad = h.reload().unwrap_err();
        write_records(input, 3000, 6000);
        let tmp = library.with_extension("new");
        std::fs::copy(&built, &tmp).unwrap();
        std::fs::rename(&tmp, &library).unwrap();
        let good = h.reload().unwrap();
        write_records(input, 6000, 9000);
        (bad, good)
    });
    report.unwrap();
    assert_eq!(
        (bad.kind(), bad.stage()),
        (ConfigErrorKind::Plugin, Some("tag")),
        "{bad}"
    );
    assert!(bad.message.contains("native plugin `tagger`"), "{bad}");
    assert_eq!(good.changed, vec!["stage `tag`: plugin files".to_string()]);
    let mut seqs = output_seqs(dir.path());
    seqs.sort_unstable();
    assert_eq!(seqs, (0..9000).collect::<Vec<_>>());
}

/// `millrace run --watch`: editing the pipeline file while it runs reloads it, and the report
/// lists the reload with its latency and the records each version processed.
#[test]
fn run_watch_reloads_on_a_file_change() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("p.toml");
    std::fs::write(&p, simple_config(0, "")).unwrap();
    mkfifo(&dir.path().join("in.fifo"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_millrace"))
        .args([
            "run",
            "--watch",
            "--debounce-ms",
            "50",
            &p.display().to_string(),
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = std::fs::File::create(dir.path().join("in.fifo")).unwrap();
    write_records(&mut input, 0, 1000);
    // Let the first thousand pass the filter before the change (it applies from the next
    // batch on): wait until all thousand are in the output (the sink flushes when its input
    // goes idle). A record is written only after `keep` passed it, so then `keep` has processed
    // all of them under version 0.
    let out = dir.path().join("out.ndjson");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while std::fs::read(&out)
        .map(|b| b.iter().filter(|&&c| c == b'\n').count())
        .unwrap_or(0)
        < 1000
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the first thousand never reached the output"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    write_atomically(&p, &simple_config(1500, ""));
    // Wait for the reload to be live: its log line is on stderr.
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut log = String::new();
    let mut line = String::new();
    while stderr.read_line(&mut line).unwrap() > 0 {
        log.push_str(&line);
        if line.contains("version 1 live") {
            break;
        }
        line.clear();
    }
    assert!(log.contains("version 1 live"), "{log}");
    assert!(
        log.contains("after the change: stage `keep`: parameters"),
        "{log}"
    );
    write_records(&mut input, 1000, 2000);
    drop(input);
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut rest).unwrap();
    assert!(child.wait().unwrap().success(), "{rest}");
    assert!(rest.contains("reloads: 1 (0 refused)"), "{rest}");
    assert!(
        rest.contains("stage `keep` records per version: v0: 1000, v1: 1000"),
        "{rest}"
    );
    let seqs = output_seqs(dir.path());
    assert_eq!(seqs.len(), 1000 + 500);
}

fn window_config(lateness: &str, size: &str) -> String {
    format!(
        "[options]\nwatermark_every = 1\n[stages.read]\nkind = \"ndjson.read\"\npath = \"in.fifo\"\n[stages.w]\nkind = \"window\"\ninput = \"read\"\ntime_field = \"t\"\ntumbling = \"{size}\"\nallowed_lateness = \"{lateness}\"\naggregate = {{ n = \"count\" }}\nlate = \"error\"\n[stages.out]\nkind = \"ndjson.write\"\ninput = \"w\"\npath = \"out.ndjson\"\n"
    )
}

/// A window's `allowed_lateness` changes in place (its open windows kept), so a record that
/// would have been late under the old value updates its window; a change of its size is
/// refused, because the open windows belong to it.
#[test]
fn a_window_takes_a_new_lateness_and_refuses_a_new_size() {
    let feed = |reload: bool| {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("p.toml");
        let (report, refused, _) = run_with(dir.path(), &window_config("0s", "10s"), |h, input| {
            let mut send = |t: i64| {
                input
                    .write_all(format!("{{\"t\":{t}}}\n").as_bytes())
                    .unwrap()
            };
            send(1000);
            send(2000);
            wait_processed(h, "w", 2);
            let mut refused = None;
            if reload {
                write_atomically(&p, &window_config("0s", "20s"));
                refused = Some(h.reload().unwrap_err());
                write_atomically(&p, &window_config("1h", "10s"));
                let e = h.reload().unwrap();
                assert_eq!(e.changed, vec!["stage `w`: parameters".to_string()]);
            }
            send(15_000); // fires [0, 10 s)
            wait_processed(h, "w", 3);
            send(3000); // late for [0, 10 s): an update within 1 h, an error with none
            refused
        });
        let out = std::fs::read_to_string(dir.path().join("out.ndjson")).unwrap_or_default();
        (report, refused, out)
    };
    let (report, _, _) = feed(false);
    let e = report.unwrap_err();
    assert!(
        e.contains("arrived after every window it belongs to was closed"),
        "{e}"
    );

    let (report, refused, out) = feed(true);
    report.unwrap();
    let refused = refused.unwrap();
    assert_eq!(
        (refused.kind(), refused.stage()),
        (ConfigErrorKind::RestartRequired, Some("w")),
        "{refused}"
    );
    assert!(
        refused
            .message
            .contains("only `allowed_lateness` and `on_error` can change while a window runs"),
        "the reason says what can change: {refused}"
    );
    let first: Vec<&str> = out
        .lines()
        .filter(|l| l.contains("\"window_start\":0"))
        .collect();
    assert_eq!(first.len(), 2, "{out}");
    assert!(
        first[0].contains("\"n\":2") && first[1].contains("\"n\":3"),
        "{out}"
    );
    assert!(first[1].contains("\"update\":true"), "{out}");
}

/// Watching a pipeline whose directory is gone fails with the directory and the watcher's
/// error as source.
#[test]
fn watching_a_vanished_directory_is_a_watch_error() {
    let dir = tempfile::tempdir().unwrap();
    let gone = dir.path().to_path_buf();
    let spec = PipelineSpec::from_str(
        "[stages.read]\nkind = \"lines.read\"\npath = \"-\"\n[stages.out]\nkind = \"ndjson.write\"\ninput = \"read\"\npath = \"-\"\n",
        gone.join("p.toml"),
    )
    .unwrap();
    let (_pipeline, handle) = spec.build_reloadable().unwrap();
    drop(dir);
    let e = handle
        .watch(std::time::Duration::from_millis(10))
        .unwrap_err();
    assert!(
        matches!(&e, WatchError::Dir { dir, .. } if *dir == gone),
        "{e:?}"
    );
    assert!(std::error::Error::source(&e).is_some(), "{e:?}");
    assert!(
        e.to_string()
            .starts_with(&format!("cannot watch {}: ", gone.display())),
        "{e}"
    );
}

/// A plugin directory `plugins/<name>` under `root` whose manifest's `entry` is a library of
/// its own (`lib<name>.so`, a copy of the built one), so that a test can replace it; returns the
/// built library and the plugin's copy.
fn own_library(root: &Path, name: &str, crate_lib: &str) -> (PathBuf, PathBuf) {
    let plugins = root.join("plugins");
    install(&plugins, name, &bundled(name), crate_lib);
    let built = common::lib(crate_lib);
    let library = plugins.join(format!("{name}/lib{name}.so"));
    std::fs::copy(&built, &library).unwrap();
    let manifest = plugins.join(format!("{name}/plugin.toml"));
    let text = std::fs::read_to_string(&manifest).unwrap().replace(
        &format!("{:?}", built.display().to_string()),
        &format!("\"lib{name}.so\""),
    );
    std::fs::write(&manifest, text).unwrap();
    (built, library)
}

fn counter_config(plugins: &Path, label: &str) -> String {
    format!(
        r#"plugin_dirs = [{plugins:?}]

[stages.read]
kind = "ndjson.read"
path = "in.fifo"

[stages.count]
kind = "counter.count"
input = "read"
key = "k"
label = "{label}"
parallelism = 2

[stages.out]
kind = "ndjson.write"
input = "count"
path = "out.ndjson"
"#
    )
}

/// Issue 13, item 8: a stateful native node (the counter, which emits its per-key counts only
/// when its input ends) across 60 reloads under load, every tenth also replacing its library.
/// Each reload finishes the old version's node and emits its counts before the new node counts
/// a record, so every record is counted exactly once: the counts per key add up to the input,
/// and each version emitted exactly what it was given. (Before the fix the old node was
/// dropped unfinished, and every version but the last lost its counts.)
#[test]
fn a_stateful_native_node_hands_its_counts_over_on_every_reload() {
    const RELOADS: u64 = 60;
    const KEYS: u64 = 7;
    let per_version: u64 = if cfg!(debug_assertions) {
        2_000
    } else {
        20_000
    };
    let dir = tempfile::tempdir().unwrap();
    let (built, library) = own_library(dir.path(), "counter", "millrace_counter");
    let plugins = dir.path().join("plugins");
    let p = dir.path().join("p.toml");
    let keyed = |input: &mut std::fs::File, from: u64, to: u64| {
        let text: String = (from..to)
            .map(|i| format!("{{\"seq\":{i},\"k\":\"k{}\"}}\n", i % KEYS))
            .collect();
        input.write_all(text.as_bytes()).unwrap();
    };
    let (report, total, handle) =
        run_with(dir.path(), &counter_config(&plugins, "v0"), |h, input| {
            let mut sent = 0;
            for r in 1..=RELOADS {
                keyed(input, sent, sent + per_version);
                sent += per_version;
                // Reload while records are in flight, once the running version holds counts.
                wait_processed(h, "count", sent - per_version / 2);
                write_atomically(&p, &counter_config(&plugins, &format!("v{r}")));
                if r % 10 == 0 {
                    let tmp = library.with_extension("new");
                    std::fs::copy(&built, &tmp).unwrap();
                    std::fs::rename(&tmp, &library).unwrap();
                }
                let e = h.reload().unwrap();
                assert!(e.changed.iter().any(|c| c.contains("stage `count`")), "{e}");
            }
            keyed(input, sent, sent + per_version);
            sent + per_version
        });
    report.unwrap();

    let mut by_key: HashMap<String, u64> = HashMap::new();
    let mut by_label: HashMap<String, u64> = HashMap::new();
    for line in std::fs::read_to_string(dir.path().join("out.ndjson"))
        .unwrap()
        .lines()
    {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let n = v["count"].as_u64().unwrap();
        *by_key
            .entry(v["key"].as_str().unwrap().to_string())
            .or_default() += n;
        *by_label
            .entry(v["label"].as_str().unwrap().to_string())
            .or_default() += n;
    }
    let expected: HashMap<String, u64> = (0..KEYS)
        .map(|k| {
            (
                format!("k{k}"),
                (0..total).filter(|i| i % KEYS == k).count() as u64,
            )
        })
        .collect();
    assert_eq!(by_key, expected, "every record counted exactly once");
    // Each stage version emitted the counts of exactly the records it was given.
    let versions = &handle.records_per_version()["count"];
    let given: HashMap<String, u64> = versions
        .iter()
        .map(|(v, n)| (format!("v{v}"), *n))
        .filter(|(_, n)| *n > 0)
        .collect();
    assert_eq!(by_label, given);
    assert!(given.len() > RELOADS as usize / 2, "{versions:?}");
    assert_eq!(handle.version(), RELOADS);
}

/// Issue 13, item 9: a reloadable process plugin runs from a copy of its directory in a private
/// directory of its own (0700, an unpredictable name, removed when the last version using it
/// goes), not from the predictable `$TMPDIR/millrace-plugins/<name>-<pid>-<n>` it once went to:
/// links planted at those names are not followed. Inside the plugin's directory, a link to a
/// file of the directory is copied as that file, and a link leading out of it is refused,
/// naming it.
#[test]
fn a_process_plugin_copy_is_private_and_follows_no_link() {
    use std::os::unix::fs::{symlink, PermissionsExt};
    let dir = tempfile::tempdir().unwrap();
    let plugin = dir.path().join("plugins/planted");
    std::fs::create_dir_all(&plugin).unwrap();
    std::fs::write(
        plugin.join("plugin.toml"),
        "name = \"planted\"\nversion = \"1.0.0\"\nkind = \"process\"\nentry = [\"python3\", \"mark.py\"]\nengine = \">=0.1\"\n[[nodes]]\nname = \"mark\"\n",
    )
    .unwrap();
    std::fs::write(
        plugin.join("impl.py"),
        "import json, os, sys\nfor line in sys.stdin:\n    r = json.loads(line)\n    r['cwd'] = os.getcwd()\n    sys.stdout.write(json.dumps(r) + '\\n')\n",
    )
    .unwrap();
    symlink("impl.py", plugin.join("mark.py")).unwrap();
    // Where copies used to go: links planted at every name the old scheme would use next.
    let attacker = dir.path().join("attacker");
    std::fs::create_dir(&attacker).unwrap();
    let old = std::env::temp_dir().join("millrace-plugins");
    std::fs::create_dir_all(&old).unwrap();
    let planted: Vec<PathBuf> = (0..64)
        .map(|n| old.join(format!("planted-{}-{n}", std::process::id())))
        .collect();
    for p in &planted {
        let _ = std::fs::remove_file(p);
        symlink(&attacker, p).unwrap();
    }
    let file = dir.path().join("p.toml");
    std::fs::write(dir.path().join("in.ndjson"), "{\"seq\":0}\n").unwrap();
    std::fs::write(
        &file,
        "plugin_dirs = [\"plugins\"]\n[stages.read]\nkind = \"ndjson.read\"\npath = \"in.ndjson\"\n[stages.mark]\nkind = \"planted.mark\"\ninput = \"read\"\n[stages.out]\nkind = \"ndjson.write\"\ninput = \"mark\"\npath = \"out.ndjson\"\n",
    )
    .unwrap();
    let built = PipelineSpec::from_file(&file).unwrap().build_reloadable();
    for p in &planted {
        let _ = std::fs::remove_file(p);
    }
    let (pipeline, handle) = built.unwrap();
    assert_eq!(
        std::fs::read_dir(&attacker).unwrap().count(),
        0,
        "the copy went through a planted link"
    );
    pipeline.run().unwrap();
    let out: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("out.ndjson")).unwrap())
            .unwrap();
    // The child ran in `<private>/planted`, the private directory fresh, 0700 and ours alone.
    let cwd = PathBuf::from(out["cwd"].as_str().unwrap());
    assert_eq!(cwd.file_name().unwrap(), "planted");
    let private = cwd.parent().unwrap().to_path_buf();
    assert_eq!(private.parent().unwrap(), std::env::temp_dir());
    let name = private.file_name().unwrap().to_str().unwrap();
    let random = name.strip_prefix("millrace-plugin-").unwrap();
    assert!(
        random.len() == 32 && random.chars().all(|c| c.is_ascii_hexdigit()),
        "{name}"
    );
    let mode = |p: &Path| std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode(&private), 0o700, "{}", private.display());
    assert_eq!(mode(&cwd), 0o700, "{}", cwd.display());
    // The link to a file inside the directory became that file.
    let copied = std::fs::symlink_metadata(cwd.join("mark.py")).unwrap();
    assert!(copied.is_file(), "{copied:?}");
    // Removed with the last version using it (the handle holds the running version).
    drop(handle);
    assert!(!private.exists(), "{} was not removed", private.display());

    // A link leading out of the plugin's directory is refused, naming it.
    std::fs::write(dir.path().join("secret"), "s").unwrap();
    symlink(dir.path().join("secret"), plugin.join("leak")).unwrap();
    let e = PipelineSpec::from_file(&file)
        .unwrap()
        .build_reloadable()
        .expect_err("a link out of the plugin's directory is refused");
    assert_eq!(
        (e.kind(), e.stage()),
        (ConfigErrorKind::Io, Some("mark")),
        "{e}"
    );
    let leak = std::fs::canonicalize(&plugin).unwrap().join("leak");
    assert!(
        e.message.contains(&format!(
            "{} is a symbolic link to {}, which is outside the plugin's directory",
            leak.display(),
            dir.path().join("secret").display()
        )),
        "{e}"
    );
}

fn casefold_config(plugins: &Path, abi: &str, byte_path: bool) -> String {
    format!(
        r#"plugin_dirs = [{plugins:?}]

[options]
byte_path = {byte_path}

[stages.read]
kind = "ndjson.read"
path = "in.fifo"

[stages.up]
kind = "casefold.upper"
input = "read"
field = "s"
abi = "{abi}"

[stages.out]
kind = "ndjson.write"
input = "up"
path = "out.ndjson"
"#
    )
}

/// Item 6 of the performance issue: a native stage reloaded back and forth between the line
/// path (`abi = "lines"`, a `LineNode`) and the NDJSON path (`abi = "values"`, a `Node`) while
/// records flow, every fifth reload also replacing the library, on the byte path and on the
/// value path: every record comes out exactly once, processed, and the per-version counts add
/// up to the input.
#[test]
fn a_native_stage_reloads_between_the_line_path_and_the_ndjson_path() {
    const RELOADS: u64 = 20;
    let per: u64 = if cfg!(debug_assertions) {
        5_000
    } else {
        50_000
    };
    for byte_path in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let (built, library) = own_library(dir.path(), "casefold", "millrace_casefold");
        let plugins = dir.path().join("plugins");
        let p = dir.path().join("p.toml");
        let abi = |r: u64| if r % 2 == 0 { "lines" } else { "values" };
        let (report, total, handle) = run_with(
            dir.path(),
            &casefold_config(&plugins, abi(0), byte_path),
            |h, input| {
                let mut sent = 0;
                for r in 1..=RELOADS {
                    let text: String = (sent..sent + per)
                        .map(|i| format!("{{\"seq\":{i},\"s\":\"r\u{e9}{i}\"}}\n"))
                        .collect();
                    input.write_all(text.as_bytes()).unwrap();
                    sent += per;
                    write_atomically(&p, &casefold_config(&plugins, abi(r), byte_path));
                    if r % 5 == 0 {
                        let tmp = library.with_extension("new");
                        std::fs::copy(&built, &tmp).unwrap();
                        std::fs::rename(&tmp, &library).unwrap();
                    }
                    let e = h.reload().unwrap();
                    assert!(e.error.is_none(), "{e}");
                    assert!(e.changed.iter().any(|c| c.contains("stage `up`")), "{e}");
                }
                write_records(input, sent, sent + per);
                sent + per
            },
        );
        let report = report.unwrap();
        let mut seen = vec![false; total as usize];
        for line in std::fs::read_to_string(dir.path().join("out.ndjson"))
            .unwrap()
            .lines()
        {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let s = v["seq"].as_u64().unwrap() as usize;
            assert!(!seen[s], "seq {s} came out twice (byte path {byte_path})");
            seen[s] = true;
            if s < (total - per) as usize {
                assert_eq!(v["s"], format!("R\u{c9}{s}"), "byte path {byte_path}");
            }
        }
        let missing = seen.iter().filter(|s| !**s).count();
        assert_eq!(missing, 0, "{missing} records lost (byte path {byte_path})");
        let counts = &handle.records_per_version()["up"];
        assert_eq!(counts.values().sum::<u64>(), total, "{counts:?}");
        assert!(counts.len() > 2, "{counts:?}");
        assert_eq!(report.stage("out").unwrap().records_out, total);
        assert_eq!(report.stage("up").unwrap().records_in, total);
    }
}
