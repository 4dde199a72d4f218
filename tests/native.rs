//! Native (cdylib) plugins: built from the workspace by this test, loaded through libloading,
//! checked (ABI version, compiler, name, engine requirement), run in pipelines, failing cleanly
//! on a panic, and logging each at its own level under its own target.
// A test drives the engine from outside with std's threads and atomics: the `crate::sync`
// rule (clippy.toml) is for the engine's own code.
#![allow(clippy::disallowed_types, clippy::disallowed_methods)]

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use common::{bundled, install, lib, repo};

use log::{Level, LevelFilter};
use millrace::config::{ConfigError, ConfigErrorKind, PipelineSpec};
use millrace::plugin::native::{LoadErrorKind, NativeLibrary, NodeError};
use millrace::Error;
use serde_json::{json, Value};

/// A pipeline `ndjson.read (in) -> p -> ndjson.write (out)` with the given middle stage.
fn pipeline(plugins: &Path, input: &Path, output: &Path, stage: &str) -> String {
    format!(
        "plugin_dirs = [{:?}]\n\n[stages.read]\nkind = \"ndjson.read\"\npath = {:?}\n\n[stages.p]\ninput = \"read\"\n{stage}\n\n[stages.out]\nkind = \"ndjson.write\"\ninput = \"p\"\npath = {:?}\n",
        plugins.display().to_string(),
        input.display().to_string(),
        output.display().to_string()
    )
}

fn numbers(path: &Path, n: u64) {
    let text: String = (0..n).map(|i| format!("{{\"n\":{i}}}\n")).collect();
    std::fs::write(path, text).unwrap();
}

fn read_output(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        install(dir.path(), "tagger", &bundled("tagger"), "millrace_tagger");
        install(
            dir.path(),
            "casefold",
            &bundled("casefold"),
            "millrace_casefold",
        );
        Setup { dir }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    fn spec(&self, stage: &str, records: u64) -> Result<PipelineSpec, ConfigError> {
        numbers(&self.path("in.ndjson"), records);
        let text = pipeline(
            self.dir.path(),
            &self.path("in.ndjson"),
            &self.path("out.ndjson"),
            stage,
        );
        PipelineSpec::from_str(&text, self.path("p.toml"))
    }
}

#[test]
fn a_native_node_processes_every_record_in_order() {
    let s = Setup::new();
    let spec = s
        .spec(
            "kind = \"tagger.tag\"\nfield = \"by\"\nvalue = \"native\"",
            100_000,
        )
        .unwrap();
    let report = spec.build().unwrap().run().unwrap();
    let out = read_output(&s.path("out.ndjson"));
    assert_eq!(out.len(), 100_000);
    for (i, r) in out.iter().enumerate() {
        assert_eq!(r, &json!({"n": i, "by": "native"}));
    }
    assert_eq!(report.stage("p").unwrap().records_in, 100_000);
    assert_eq!(report.stage("p").unwrap().records_out, 100_000);
}

#[test]
fn parallel_instances_each_get_a_node_and_lose_nothing() {
    let s = Setup::new();
    let spec = s
        .spec(
            "kind = \"casefold.upper\"\nfield = \"s\"\nparallelism = 3",
            50_000,
        )
        .unwrap();
    spec.build().unwrap().run().unwrap();
    let seen: BTreeSet<u64> = read_output(&s.path("out.ndjson"))
        .iter()
        .map(|r| r["n"].as_u64().unwrap())
        .collect();
    assert_eq!(seen, (0..50_000).collect());
}

#[test]
fn a_panic_in_a_plugin_fails_its_stage_and_names_the_plugin() {
    let s = Setup::new();
    let spec = s
        .spec("kind = \"tagger.explode\"\nafter = 5000", 20_000)
        .unwrap();
    let err = spec.build().unwrap().run().unwrap_err();
    // The stage fails with the node's error as its source.
    let Error::Operator { stage, source } = &err else {
        panic!("expected a stage failure, got {err:?}");
    };
    assert_eq!(stage, "p");
    assert!(
        matches!(
            source.downcast_ref::<NodeError>(),
            Some(NodeError::Panicked { plugin, node, message })
                if plugin == "tagger" && node == "explode" && message == "exploded at record 5000 as asked"
        ),
        "{source:?}"
    );
    assert_eq!(
        err.to_string(),
        "stage `p` failed: plugin `tagger` (node `explode`) panicked: exploded at record 5000 as asked"
    );
    // The host is unharmed: the same plugin runs again in a new pipeline.
    let spec = s.spec("kind = \"tagger.explode\"\nafter = 50", 10).unwrap();
    spec.build().unwrap().run().unwrap();
    assert_eq!(read_output(&s.path("out.ndjson")).len(), 10);
}

/// The config error for `stage` with plugin `odd` installed: a plugin error of stage `p`.
fn config_error(manifest: &str, lib_name: &str, stage: &str) -> ConfigError {
    let s = Setup::new();
    install(s.dir.path(), "odd", manifest, lib_name);
    match s.spec(stage, 1) {
        Ok(_) => panic!("expected {stage} to be refused"),
        Err(e) => {
            assert_eq!(
                (e.kind(), e.stage()),
                (ConfigErrorKind::Plugin, Some("p")),
                "{e}"
            );
            e
        }
    }
}

#[test]
fn a_plugin_built_for_another_abi_version_is_refused() {
    let manifest = "name = \"bad_abi\"\nversion = \"0.1.0\"\nkind = \"native\"\nentry = \"x\"\nengine = \">=0.1\"\n[[nodes]]\nname = \"n\"\n";
    let e = config_error(manifest, "millrace_test_bad_abi", "kind = \"bad_abi.n\"");
    assert!(e.message.starts_with("native plugin `bad_abi`"), "{e}");
    // Loaded directly: the kind says what did not match; the message is the one a user reads.
    let path = lib("millrace_test_bad_abi");
    let e = NativeLibrary::load("bad_abi", &path).unwrap_err();
    assert!(
        matches!(
            e.kind(),
            LoadErrorKind::Abi {
                found: 1002,
                expected: 2
            }
        ),
        "{e:?}"
    );
    assert_eq!((e.plugin(), e.path()), ("bad_abi", path.as_path()));
    assert_eq!(
        e.to_string(),
        format!(
            "native plugin `bad_abi` ({}): it was built for plugin ABI version 1002, and this \
             millrace speaks ABI versions 1 to 2: rebuild it against millrace-plugin {}",
            path.display(),
            millrace_plugin::SDK_VERSION
        )
    );
}

#[test]
fn a_plugin_requiring_another_millrace_is_refused() {
    // The manifest claims compatibility; the library's own declaration does not.
    let manifest = "name = \"bad_engine\"\nversion = \"0.1.0\"\nkind = \"native\"\nentry = \"x\"\nengine = \">=0.1\"\n[[nodes]]\nname = \"n\"\n";
    config_error(
        manifest,
        "millrace_test_bad_engine",
        "kind = \"bad_engine.n\"",
    );
    let e = NativeLibrary::load("bad_engine", &lib("millrace_test_bad_engine")).unwrap_err();
    assert!(
        matches!(e.kind(), LoadErrorKind::Engine { requirement, version }
            if requirement == ">=99.0" && version == env!("CARGO_PKG_VERSION")),
        "{e:?}"
    );
}

#[test]
fn a_library_that_is_not_the_named_plugin_is_refused() {
    let manifest = bundled("casefold").replace("name = \"casefold\"", "name = \"impostor\"");
    config_error(
        &manifest,
        "millrace_tagger",
        "kind = \"impostor.upper\"\nfield = \"x\"",
    );
    let e = NativeLibrary::load("impostor", &lib("millrace_tagger")).unwrap_err();
    assert!(
        matches!(e.kind(), LoadErrorKind::Name { declared, manifest }
            if declared == "tagger" && manifest == "impostor"),
        "{e:?}"
    );
    config_error(
        &bundled("casefold").replace("name = \"casefold\"", "name = \"nolib\""),
        "does_not_exist",
        "kind = \"nolib.upper\"\nfield = \"x\"",
    );
    let e = NativeLibrary::load("nolib", &lib("does_not_exist")).unwrap_err();
    assert!(matches!(e.kind(), LoadErrorKind::Missing), "{e:?}");
    // A file that is not a library: the loader's error is the source.
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("libjunk.so");
    std::fs::write(&junk, "not a library").unwrap();
    let e = NativeLibrary::load("junk", &junk).unwrap_err();
    assert!(matches!(e.kind(), LoadErrorKind::Open { .. }), "{e:?}");
    assert!(std::error::Error::source(&e).is_some(), "{e:?}");
    let e = NativeLibrary::load_copy("junk", &junk).unwrap_err();
    assert!(matches!(e.kind(), LoadErrorKind::Open { .. }), "{e:?}");
    assert_eq!(
        e.path(),
        junk.as_path(),
        "errors name the library, not its copy"
    );
    assert!(!e.to_string().contains("millrace-native"), "{e}");
}

#[test]
fn log_level_must_be_a_level() {
    let s = Setup::new();
    let e = s
        .spec(
            "kind = \"tagger.tag\"\nvalue = \"x\"\nlog_level = \"loud\"",
            1,
        )
        .err()
        .unwrap();
    assert_eq!(e.kind(), ConfigErrorKind::BadValue, "{e}");
    assert_eq!(
        e.message,
        "parameter `log_level`: expected one of off, error, warn, info, debug, trace, found \"loud\""
    );
}

/// Every log record this test binary sees: (target, level, message).
fn captured() -> &'static Mutex<Vec<(String, Level, String)>> {
    static LOGS: OnceLock<Mutex<Vec<(String, Level, String)>>> = OnceLock::new();
    struct Capture;
    impl log::Log for Capture {
        fn enabled(&self, _: &log::Metadata<'_>) -> bool {
            true
        }
        fn log(&self, r: &log::Record<'_>) {
            captured().lock().unwrap().push((
                r.target().to_string(),
                r.level(),
                r.args().to_string(),
            ));
        }
        fn flush(&self) {}
    }
    static INSTALL: OnceLock<()> = OnceLock::new();
    INSTALL.get_or_init(|| {
        log::set_logger(&Capture).unwrap();
        log::set_max_level(LevelFilter::Trace);
    });
    LOGS.get_or_init(|| Mutex::new(Vec::new()))
}

/// The (target, level) pairs logged by `stage`'s sink.
fn logged_by(stage: &str) -> Vec<(String, Level)> {
    let prefix = format!("[{stage}] ");
    captured()
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, _, m)| m.starts_with(&prefix))
        .map(|(t, l, _)| (t.clone(), *l))
        .collect()
}

#[test]
fn each_plugin_logs_at_its_own_level_and_outlives_the_others_unload() {
    captured();
    let tagger = NativeLibrary::load("tagger", &lib("millrace_tagger")).unwrap();
    let casefold = NativeLibrary::load("casefold", &lib("millrace_casefold")).unwrap();
    let mut a = tagger
        .node(
            "tag",
            &json!({"field": "t", "value": "x", "chatty": true}),
            "iso-a",
            LevelFilter::Debug,
        )
        .unwrap();
    let mut b = casefold
        .node(
            "upper",
            &json!({"field": "w", "chatty": true}),
            "iso-b",
            LevelFilter::Warn,
        )
        .unwrap();
    let mut out = Vec::new();
    a.process(&[json!({"w": "hi"})], &mut out).unwrap();
    b.process(&[json!({"w": "hi"})], &mut out).unwrap();
    assert_eq!(out, vec![json!({"w": "hi", "t": "x"}), json!({"w": "HI"})]);

    let t = |l| ("plugin::tagger".to_string(), l);
    let c = |l| ("plugin::casefold".to_string(), l);
    assert_eq!(
        logged_by("iso-a"),
        vec![
            t(Level::Debug),
            t(Level::Info),
            t(Level::Warn),
            t(Level::Error)
        ]
    );
    assert_eq!(logged_by("iso-b"), vec![c(Level::Warn), c(Level::Error)]);

    // Unload tagger: its node, then the library (the last reference).
    drop(a);
    assert_eq!(Arc::strong_count(&tagger), 1);
    drop(tagger);
    // casefold still logs, at its own level, under its own target.
    b.process(&[json!({"w": "again"})], &mut out).unwrap();
    assert_eq!(
        logged_by("iso-b"),
        vec![
            c(Level::Warn),
            c(Level::Error),
            c(Level::Warn),
            c(Level::Error)
        ]
    );
    assert_eq!(
        logged_by("iso-a").len(),
        4,
        "nothing more from the unloaded one"
    );
}

#[test]
fn a_stage_log_level_applies_in_a_pipeline() {
    captured();
    let s = Setup::new();
    let spec = s
        .spec(
            "kind = \"tagger.tag\"\nvalue = \"x\"\nchatty = true\nlog_level = \"error\"",
            10,
        )
        .unwrap();
    spec.build().unwrap().run().unwrap();
    let logs = logged_by("p");
    assert!(!logs.is_empty());
    assert!(
        logs.iter()
            .all(|(t, l)| t == "plugin::tagger" && *l == Level::Error),
        "{logs:?}"
    );
}

/// The bundled example with both kinds of plugin, its plugin directory replaced by one holding
/// the freshly built tagger and the bundled Python plugin.
#[test]
fn the_example_with_a_native_and_a_process_plugin_runs() {
    let s = Setup::new();
    std::os::unix::fs::symlink(repo("plugins/textops"), s.path("textops")).unwrap();
    let out = s.path("out.ndjson");
    let text = std::fs::read_to_string(repo("examples/native.toml"))
        .unwrap()
        .replace(
            "plugin_dirs = [\"../plugins\"]",
            &format!("plugin_dirs = [{:?}]", s.dir.path().display().to_string()),
        )
        .replace(
            "path = \"-\"",
            &format!("path = {:?}", out.display().to_string()),
        );
    let spec = PipelineSpec::from_str(&text, repo("examples/native.toml")).unwrap();
    let report = spec.build().unwrap().run().unwrap();
    let lines = read_output(&out);
    assert!(!lines.is_empty());
    for l in &lines {
        assert!(l["line_len"].as_u64().unwrap() >= 40, "{l}");
        assert_eq!(l["source"], "millrace.txt");
    }
    assert_eq!(report.stage("out").unwrap().records_out, lines.len() as u64);
}

/// Issue 13, item 9: a library loaded from a copy (as every reload does) is copied into a
/// private directory of its own, not to the predictable `$TMPDIR/millrace-native/<name>-<pid>-<n>.so`
/// it once went to: links planted at those names, pointing at a file of the "attacker's", are
/// not written through. The private directory is gone once the copy is loaded.
#[test]
fn a_library_copy_goes_to_a_private_place_and_follows_no_planted_link() {
    let dir = tempfile::tempdir().unwrap();
    let victim = dir.path().join("victim");
    std::fs::write(&victim, "precious").unwrap();
    let old = std::env::temp_dir().join("millrace-native");
    std::fs::create_dir_all(&old).unwrap();
    let planted: Vec<PathBuf> = (0..64)
        .map(|n| old.join(format!("casefold-{}-{n}.so", std::process::id())))
        .collect();
    for p in &planted {
        let _ = std::fs::remove_file(p);
        std::os::unix::fs::symlink(&victim, p).unwrap();
    }
    let loaded = NativeLibrary::load_copy("casefold", &lib("millrace_casefold"));
    for p in &planted {
        let _ = std::fs::remove_file(p);
    }
    let loaded = loaded.unwrap();
    assert_eq!(
        loaded.path(),
        lib("millrace_casefold"),
        "named by its source"
    );
    assert!(
        std::fs::read(&victim).unwrap() == b"precious",
        "the copy was written through a planted link"
    );
    // The image is mapped from the copy, whose directory was removed once it was loaded.
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    let copies: BTreeSet<PathBuf> = maps
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .filter(|p| p.contains("/millrace-native-") && p.ends_with("/casefold.so"))
        .map(PathBuf::from)
        .collect();
    assert!(!copies.is_empty(), "mapped from a private copy:\n{maps}");
    for copy in &copies {
        let private = copy.parent().unwrap();
        assert_eq!(private.parent().unwrap(), std::env::temp_dir());
        let name = private.file_name().unwrap().to_str().unwrap();
        let random = name.strip_prefix("millrace-native-").unwrap();
        assert!(
            random.len() == 32 && random.chars().all(|c| c.is_ascii_hexdigit()),
            "{name}"
        );
        assert!(!private.exists(), "{} was not removed", private.display());
    }
}

/// A native node reports an error for a whole batch, so no policy can skip or route one record:
/// `on_error` on its stage is refused when the pipeline is loaded, naming the stage and the key.
#[test]
fn a_native_stage_refuses_an_error_policy() {
    let s = Setup::new();
    let err = s
        .spec(
            "kind = \"tagger.tag\"\nfield = \"by\"\nvalue = \"native\"\non_error = \"skip\"",
            10,
        )
        .unwrap_err();
    assert_eq!(err.stage(), Some("p"), "{err}");
    assert!(
        err.to_string()
            .contains("takes no `on_error`: a native plugin node reports errors per batch"),
        "{err}"
    );
}

// ---- The line path (ABI 2) ----

/// Runs `ndjson.read (in) -> p -> ndjson.write (out)` over `input` with the plugins of a
/// [`Setup`] plus the line-path test plugin and the ABI 1 one, on the byte path or forced onto
/// the value path; returns the output's raw text and the report.
fn run_on(
    input: &str,
    stage: &str,
    byte_path: bool,
) -> Result<(String, millrace::RunReport), Error> {
    let s = Setup::new();
    for (name, lib_name) in [
        ("linetest", "millrace_test_linetest"),
        ("abi_v1", "millrace_test_abi_v1"),
    ] {
        let manifest =
            std::fs::read_to_string(repo(&format!("tests/native/{name}/plugin.toml"))).unwrap();
        install(s.dir.path(), name, &manifest, lib_name);
    }
    std::fs::write(s.path("in.ndjson"), input).unwrap();
    let text = pipeline(
        s.dir.path(),
        &s.path("in.ndjson"),
        &s.path("out.ndjson"),
        stage,
    )
    .replacen(
        "\n\n[stages.read]",
        &format!("\n\n[options]\nbyte_path = {byte_path}\n\n[stages.read]"),
        1,
    );
    let spec = PipelineSpec::from_str(&text, s.path("p.toml")).unwrap();
    let report = spec.build().unwrap().run()?;
    Ok((
        std::fs::read_to_string(s.path("out.ndjson")).unwrap(),
        report,
    ))
}

fn parsed(text: &str) -> Vec<Value> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Records with unicode, escapes, the field missing or not a string, nested values, odd
/// spacing, blank lines and a CRLF ending.
fn awkward_input() -> String {
    let mut text = String::new();
    for i in 0..3000 {
        let line = match i % 8 {
            0 => format!("{{\"n\":{i},\"s\":\"plain ascii {i}\"}}"),
            1 => format!("{{\"s\":\"caf\u{e9} \u{df} \u{3c3}\u{3c2} \u{1f600} {i}\",\"n\":{i}}}"),
            2 => format!("{{\"n\":{i},\"s\":\"esc \\\"q\\\" \\\\ \\n \\t \\u00e9 \\ud83d\\ude00\"}}"),
            3 => format!("{{\"n\":{i}}}"),
            4 => format!("{{\"n\":{i},\"s\":42,\"t\":\"lower\"}}"),
            5 => format!("{{ \"n\" : {i} ,  \"s\" : \"spaced\" , \"o\":{{\"s\":\"inner\",\"a\":[\"}}\",{{}}]}} }}"),
            6 => format!("{{\"n\":{i},\"\\u0073\":\"escaped key\"}}\r"),
            _ => format!("\n{{\"n\":{i},\"s\":\"\"}}"),
        };
        text.push_str(&line);
        text.push('\n');
    }
    text
}

/// What `casefold.upper` must make of a record.
fn upper(mut v: Value) -> Value {
    if let Some(Value::String(s)) = v.get_mut("s") {
        *s = s.to_uppercase();
    }
    v
}

#[test]
fn the_line_path_gives_the_records_of_the_value_path() {
    let input = awkward_input();
    let expected: Vec<Value> = parsed(&input.replace('\r', ""))
        .into_iter()
        .map(upper)
        .collect();
    assert_eq!(expected.len(), 3000);
    for byte_path in [true, false] {
        for abi in ["lines", "values"] {
            let stage = format!("kind = \"casefold.upper\"\nfield = \"s\"\nabi = \"{abi}\"");
            let (out, report) = run_on(&input, &stage, byte_path).unwrap();
            assert_eq!(parsed(&out), expected, "abi {abi}, byte path {byte_path}");
            let p = report.stage("p").unwrap();
            assert_eq!(
                (p.records_in, p.records_out),
                (3000, 3000),
                "{abi} {byte_path}"
            );
            assert_eq!(report.stage("out").unwrap().records_out, 3000);
            // On the byte path the records are the node's bytes (spacing kept); on the
            // value path they are re-serialised.
            assert_eq!(
                out.contains("\"s\" : \"SPACED\" ,"),
                byte_path && abi == "lines",
                "abi {abi}, byte path {byte_path}"
            );
        }
    }
}

#[test]
fn empty_input_and_empty_batches_give_nothing_on_either_path() {
    for byte_path in [true, false] {
        for (input, kind, param) in [
            ("", "casefold.upper", "field = \"s\""),
            ("\n\n  \n", "casefold.upper", "field = \"s\""),
            ("", "linetest.echo", ""),
            ("{\"a\":1}\n{\"a\":2}\n", "linetest.drop", "every = 1000"),
        ] {
            let stage = format!("kind = \"{kind}\"\n{param}");
            let (out, report) = run_on(input, &stage, byte_path).unwrap();
            let kept = usize::from(input.starts_with('{'));
            assert_eq!(out.lines().count(), kept, "{kind:?} on {input:?}");
            assert_eq!(report.stage("p").unwrap().records_out, kept as u64);
        }
    }
}

#[test]
fn line_nodes_that_drop_or_add_records_match_their_value_twins() {
    let input: String = (0..5000)
        .map(|i| format!("{{\"n\":{i},\"u\":\"\u{e9}\\n{i}\"}}\n"))
        .collect();
    for byte_path in [true, false] {
        for (node, param, records) in [
            ("drop", "every = 3", 1667),
            ("dup", "times = 3", 15001),
            ("dup", "times = 0", 1),
        ] {
            let run = |kind: String| {
                let stage = format!("kind = \"{kind}\"\n{param}");
                run_on(&input, &stage, byte_path).unwrap()
            };
            let (lines, report) = run(format!("linetest.{node}"));
            let (values, _) = run(format!("linetest.{node}_values"));
            assert_eq!(
                parsed(&lines),
                parsed(&values),
                "{node} {param} {byte_path}"
            );
            let p = report.stage("p").unwrap();
            assert_eq!(
                (p.records_in, p.records_out),
                (5000, records),
                "{node} {param}"
            );
            assert_eq!(report.stage("out").unwrap().records_out, records);
            if node == "dup" {
                assert_eq!(parsed(&lines).last().unwrap(), &json!({"seen": 5000}));
            }
        }
    }
}

/// A line node that writes a bad line fails the run with an error naming the stage, the plugin
/// and the node; on the byte path the line's check says what is wrong with it.
#[test]
fn a_line_node_writing_garbage_fails_its_stage() {
    let input: String = (0..3000).map(|i| format!("{{\"n\":{i}}}\n")).collect();
    for byte_path in [true, false] {
        for (mode, byte_message) in [
            ("not_json", "EOF while parsing"),
            ("not_utf8", "invalid unicode code point"),
            ("not_object", "expected a JSON object, found an array"),
            ("two_lines", "EOF while parsing"),
        ] {
            let stage = format!("kind = \"linetest.garbage\"\nmode = \"{mode}\"\nat = 2500");
            let err = match run_on(&input, &stage, byte_path) {
                // The value path takes any JSON value, as it always has.
                Ok((out, _)) if !byte_path && mode == "not_object" => {
                    assert!(out.contains("\n[1,2]\n"), "{mode}");
                    continue;
                }
                Ok(_) => panic!("{mode} on the byte path {byte_path} did not fail"),
                Err(e) => e,
            };
            let Error::Operator { stage, source } = &err else {
                panic!("expected a stage failure, got {err:?}");
            };
            assert_eq!(stage, "p", "{err}");
            let e = source.downcast_ref::<NodeError>().unwrap();
            let text = err.to_string();
            assert!(
                text.starts_with(
                    "stage `p` failed: plugin `linetest` (node `garbage`): output record "
                ),
                "{text}"
            );
            if byte_path {
                assert!(
                    matches!(e, NodeError::BadLine { plugin, node, message, record: 2500 }
                        if plugin == "linetest" && node == "garbage" && message.contains(byte_message)),
                    "{mode}: {e:?}"
                );
            } else {
                assert!(matches!(e, NodeError::BadOutput { .. }), "{mode}: {e:?}");
            }
        }
    }
}

#[test]
fn an_abi_1_plugin_still_loads_and_runs_on_the_ndjson_path() {
    let v1 = NativeLibrary::load("abi_v1", &lib("millrace_test_abi_v1")).unwrap();
    assert_eq!(v1.abi_version(), 1);
    let mut node = v1.node("echo", &json!({}), "s", LevelFilter::Off).unwrap();
    assert!(!node.takes_lines());
    let mut out = Vec::new();
    node.process(&[json!({"a": "\u{e9}"})], &mut out).unwrap();
    assert_eq!(out, vec![json!({"a": "\u{e9}", "v1": true})]);
    let input: String = (0..2000).map(|i| format!("{{\"n\":{i}}}\n")).collect();
    for byte_path in [true, false] {
        let (out, report) = run_on(&input, "kind = \"abi_v1.echo\"", byte_path).unwrap();
        let out = parsed(&out);
        assert_eq!(out.len(), 2000);
        assert!(out
            .iter()
            .enumerate()
            .all(|(i, r)| r == &json!({"n": i, "v1": true})));
        assert_eq!(report.stage("p").unwrap().records_out, 2000);
    }
    // The SDK's own plugins speak ABI 2; an instance takes the line path when it is a
    // `LineNode`.
    let casefold = NativeLibrary::load("casefold", &lib("millrace_casefold")).unwrap();
    assert_eq!(casefold.abi_version(), millrace_plugin::ABI_VERSION);
    let lines = casefold
        .node("upper", &json!({"field": "s"}), "s", LevelFilter::Off)
        .unwrap();
    let values = casefold
        .node(
            "upper",
            &json!({"field": "s", "abi": "values"}),
            "s",
            LevelFilter::Off,
        )
        .unwrap();
    assert!(lines.takes_lines() && !values.takes_lines());
}
