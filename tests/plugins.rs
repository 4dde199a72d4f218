//! Plugin manifests, discovery, parameter checking against node specs, permissions, and the
//! bundled Python process plugin end to end.
// A test drives the engine from outside with std's threads and atomics: the `crate::sync`
// rule (clippy.toml) is for the engine's own code.
#![allow(clippy::disallowed_types, clippy::disallowed_methods)]

use std::path::{Path, PathBuf};

use millrace::config::{ConfigError, ConfigErrorKind, PipelineSpec};
use millrace::plugin::{search_path, PluginRegistry};

fn repo(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

/// A pipeline `read -> <stage> -> out` with `plugin_dirs = [dirs]`; its config error, if any.
/// The stage `p` starts at line 7; its first parameter is on line 9.
fn config_err(plugin_dir: &Path, stage: &str) -> ConfigError {
    let text = format!(
        "plugin_dirs = [{:?}]\n\n[stages.read]\nkind = \"ndjson.read\"\npath = \"-\"\n\n[stages.p]\ninput = \"read\"\n{stage}\n\n[stages.out]\nkind = \"ndjson.write\"\ninput = \"p\"\npath = \"-\"\n",
        plugin_dir.display().to_string()
    );
    match PipelineSpec::from_str(&text, "/tmp/plug.toml") {
        Ok(_) => panic!("expected an error for:\n{text}"),
        Err(e) => e,
    }
}

/// The error's kind and line (every error here is about stage `p`).
fn what(plugin_dir: &Path, stage: &str) -> (ConfigErrorKind, Option<usize>) {
    let e = config_err(plugin_dir, stage);
    assert_eq!(e.stage(), Some("p"), "{e}");
    (e.kind(), e.line)
}

fn write_plugin(root: &Path, dir: &str, manifest: &str) {
    let d = root.join(dir);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("plugin.toml"), manifest).unwrap();
}

const NET: &str = r#"
name = "fetch"
version = "1.2.3"
kind = "process"
entry = ["cat"]
engine = ">=0.1"
permissions = ["network"]

[[nodes]]
name = "get"
[nodes.params.retries]
type = "integer"
default = 3
min = 0
max = 10
"#;

#[test]
fn the_bundled_plugin_is_discovered_with_its_node_specs() {
    let reg = PluginRegistry::discover(&search_path(&[repo("plugins")]));
    let p = reg.get("textops").expect("plugins/textops is found");
    assert_eq!(p.manifest.version, "0.1.0");
    let palette = reg.palette_json();
    let kinds: Vec<&str> = palette
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["kind"].as_str().unwrap())
        .collect();
    assert!(
        kinds.contains(&"textops.case") && kinds.contains(&"textops.length"),
        "{kinds:?}"
    );
    // Each node says whether it holds state: the stateless ones say so, the counter does not.
    let stateless = |kind: &str| {
        palette
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["kind"] == kind)
            .unwrap_or_else(|| panic!("{kind} in {palette}"))["stateless"]
            .as_bool()
            .unwrap()
    };
    assert!(stateless("textops.case") && stateless("textops.length"));
    assert!(stateless("casefold.upper") && stateless("tagger.tag"));
    assert!(!stateless("counter.count") && !stateless("tagger.explode"));
}

#[test]
fn a_node_is_stateful_unless_its_manifest_says_stateless() {
    let dir = tempfile::tempdir().unwrap();
    let plug = dir.path().join("cat");
    std::fs::create_dir(&plug).unwrap();
    std::fs::write(
        plug.join("plugin.toml"),
        "name = \"cat\"\nversion = \"0.1.0\"\nkind = \"process\"\nentry = [\"cat\"]\nengine = \">=0.1\"\n\n[[nodes]]\nname = \"keep\"\n\n[[nodes]]\nname = \"pass\"\nstateless = true\n\n[[nodes]]\nname = \"bad\"\nstateless = \"yes\"\n",
    )
    .unwrap();
    let reg = PluginRegistry::discover(&search_path(&[dir.path().to_path_buf()]));
    // A mistyped `stateless` breaks the manifest, at its line.
    let (_, why) = reg.broken.iter().next().expect("the manifest is refused");
    assert!(
        why.contains("line 16") && why.contains("expected a boolean"),
        "{why}"
    );
    std::fs::write(
        plug.join("plugin.toml"),
        "name = \"cat\"\nversion = \"0.1.0\"\nkind = \"process\"\nentry = [\"cat\"]\nengine = \">=0.1\"\n\n[[nodes]]\nname = \"keep\"\n\n[[nodes]]\nname = \"pass\"\nstateless = true\n",
    )
    .unwrap();
    let reg = PluginRegistry::discover(&search_path(&[dir.path().to_path_buf()]));
    let nodes = &reg.get("cat").expect("found").manifest.nodes;
    assert_eq!(
        nodes
            .iter()
            .map(|n| (n.name.as_str(), n.stateless))
            .collect::<Vec<_>>(),
        [("keep", false), ("pass", true)]
    );
}

#[test]
fn node_parameters_are_checked_before_anything_runs() {
    use ConfigErrorKind::{BadValue, MissingParameter, UnknownKind, UnknownParameter};
    let dir = repo("plugins");
    let e = config_err(
        &dir,
        "kind = \"textops.case\"\nfield = \"line\"\nmode = \"shout\"",
    );
    assert_eq!(e.kind(), BadValue);
    assert_eq!(
        e.to_string(),
        "/tmp/plug.toml:11: stage `p`: parameter `mode` of node `textops.case`: expected one of \"upper\", \"lower\", \"title\", found the string \"shout\""
    );
    assert_eq!(
        what(&dir, "kind = \"textops.case\"\nfield = 7"),
        (BadValue, Some(10))
    );
    let e = config_err(&dir, "kind = \"textops.case\"");
    assert_eq!((e.kind(), e.line), (MissingParameter, Some(7)));
    assert_eq!(
        e.to_string(),
        "/tmp/plug.toml:7: stage `p`: missing parameter `field`: expected a string (node `textops.case`)"
    );
    assert_eq!(
        what(
            &dir,
            "kind = \"textops.length\"\nfield = \"line\"\nmin = -1"
        ),
        (BadValue, Some(11))
    );
    assert_eq!(
        what(
            &dir,
            "kind = \"textops.case\"\nfield = \"line\"\ncolour = \"red\""
        ),
        (UnknownParameter, Some(11))
    );
    assert_eq!(
        what(&dir, "kind = \"textops.reverse\""),
        (UnknownKind, Some(9))
    );
    // An unknown kind lists the plugins found, for the user to pick from.
    let e = config_err(&dir, "kind = \"nosuch.node\"");
    assert_eq!(e.kind(), UnknownKind);
    assert!(
        e.to_string()
            .contains("plugins: casefold, counter, tagger, textops"),
        "{e}"
    );
}

#[test]
fn a_permission_must_be_granted() {
    let root = tempfile::tempdir().unwrap();
    write_plugin(root.path(), "fetch", NET);
    let e = config_err(root.path(), "kind = \"fetch.get\"");
    assert_eq!(e.kind(), ConfigErrorKind::Permission);
    assert_eq!(
        e.to_string(),
        "/tmp/plug.toml:9: stage `p`: plugin `fetch` requests permission \"network\", which this stage does not grant: add grant = [\"network\"] to allow it"
    );
    assert_eq!(
        what(
            root.path(),
            "kind = \"fetch.get\"\ngrant = [\"network\", \"filesystem.write\"]",
        ),
        (ConfigErrorKind::Permission, Some(10))
    );
    // Granted: the pipeline builds.
    let text = format!(
        "plugin_dirs = [{:?}]\n[stages.read]\nkind = \"ndjson.read\"\npath = \"-\"\n[stages.p]\ninput = \"read\"\nkind = \"fetch.get\"\ngrant = [\"network\"]\nretries = 5\n[stages.out]\nkind = \"ndjson.write\"\ninput = \"p\"\npath = \"-\"\n",
        root.path().display().to_string()
    );
    PipelineSpec::from_str(&text, "/tmp/ok.toml")
        .unwrap()
        .build()
        .unwrap();
}

#[test]
fn manifests_that_cannot_be_used_are_refused_with_the_reason() {
    let root = tempfile::tempdir().unwrap();
    write_plugin(
        root.path(),
        "future",
        &NET.replace("name = \"fetch\"", "name = \"future\"")
            .replace(">=0.1", ">=9"),
    );
    write_plugin(root.path(), "bad", "name = \"bad\"\nversion = \"one\"\nkind = \"process\"\nentry = [\"cat\"]\nengine = \"*\"\n");
    write_plugin(root.path(), "native", "name = \"native\"\nversion = \"0.1.0\"\nkind = \"native\"\nentry = \"libnative.so\"\nengine = \"*\"\n[[nodes]]\nname = \"n\"\n");
    let reg = PluginRegistry::discover(&[root.path().to_path_buf()]);
    let why = |dir: &str| reg.broken[&root.path().join(dir).join("plugin.toml")].clone();
    assert!(
        why("future").contains("requires millrace >=9"),
        "{}",
        why("future")
    );
    assert!(why("bad").contains("version \"one\""), "{}", why("bad"));
    // The unknown kind's message says why the manifest that would have provided it is unusable.
    let e = config_err(root.path(), "kind = \"future.get\"");
    assert_eq!(e.kind(), ConfigErrorKind::UnknownKind);
    let e = e.to_string();
    assert!(
        e.contains("manifests that could not be used") && e.contains("requires millrace >=9"),
        "{e}"
    );
    assert_eq!(
        what(root.path(), "kind = \"native.n\""),
        (ConfigErrorKind::Plugin, Some(9))
    );
}

/// The Python plugin (standard library only) in a pipeline, end to end.
#[test]
fn the_python_plugin_runs_in_a_pipeline() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.ndjson");
    let text = std::fs::read_to_string(repo("examples/plugin.toml"))
        .unwrap()
        .replace(
            "path = \"-\"",
            &format!("path = {:?}", out.display().to_string()),
        );
    let spec = PipelineSpec::from_str(&text, repo("examples/plugin.toml")).unwrap();
    let report = spec.build().unwrap().run().unwrap();
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(!lines.is_empty());
    for l in &lines {
        let s = l["line"].as_str().unwrap();
        assert_eq!(s, s.to_uppercase());
        assert!(l["line_len"].as_u64().unwrap() >= 40);
        assert_eq!(l["line_len"].as_u64().unwrap(), s.chars().count() as u64);
    }
    assert_eq!(report.stage("out").unwrap().records_out, lines.len() as u64);
}

// ---- the sandbox ----------------------------------------------------------------------------

/// A process plugin `probe` with one node `run` whose entry is `entry`, `extra` appended to the
/// manifest (`permissions`, `[limits]`) and `script` written as `probe.py` in its directory.
fn probe_plugin(root: &Path, entry: &str, extra: &str, script: &str) {
    write_plugin(
        root,
        "probe",
        &format!("name = \"probe\"\nversion = \"0.1.0\"\nkind = \"process\"\nentry = {entry}\nengine = \"*\"\n{extra}\n[[nodes]]\nname = \"run\"\n"),
    );
    std::fs::write(root.join("probe/probe.py"), script).unwrap();
}

/// Runs `read -> probe.run (+ stage) -> out` from a pipeline file in `work`; the records out.
fn run_probe(root: &Path, work: &Path, stage: &str) -> Result<Vec<serde_json::Value>, String> {
    std::fs::write(work.join("in.ndjson"), "{\"i\": 1}\n").unwrap();
    let text = format!(
        "plugin_dirs = [{:?}]\n[stages.read]\nkind = \"ndjson.read\"\npath = \"in.ndjson\"\n[stages.p]\ninput = \"read\"\nkind = \"probe.run\"\n{stage}\n[stages.out]\nkind = \"ndjson.write\"\ninput = \"p\"\npath = \"out.ndjson\"\n",
        root.display().to_string()
    );
    let spec = PipelineSpec::from_str(&text, work.join("p.toml")).map_err(|e| e.to_string())?;
    spec.build()
        .map_err(|e| e.to_string())?
        .run()
        .map_err(|e| e.to_string())?;
    Ok(std::fs::read_to_string(work.join("out.ndjson"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect())
}

/// A Python probe: reads its input, tries `action` (an expression), prints {"ok": result} or
/// {"err": the exception's class name}.
fn probe_script(action: &str) -> String {
    format!(
        "import json, os, socket, sys\nsys.stdin.read()\ntry:\n    out = {{\"ok\": {action}}}\nexcept OSError as e:\n    out = {{\"err\": type(e).__name__}}\nprint(json.dumps(out), flush=True)\n"
    )
}

const PY: &str = "[\"python3\", \"probe.py\"]";

#[test]
fn a_plugin_over_its_manifest_cpu_limit_is_stopped_and_reported() {
    let root = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    probe_plugin(
        root.path(),
        "[\"sh\", \"-c\", \"while :; do :; done\"]",
        "[limits]\ncpu_seconds = 1",
        "",
    );
    let t0 = std::time::Instant::now();
    let e = run_probe(root.path(), work.path(), "").unwrap_err();
    assert!(
        t0.elapsed() < std::time::Duration::from_secs(10),
        "{:?}",
        t0.elapsed()
    );
    assert!(
        e.contains("stage `p`") && e.contains("exceeded its CPU limit (cpu_seconds = 1)"),
        "{e}"
    );
}

#[test]
fn a_plugin_over_its_memory_limit_fails_with_the_limit_in_the_error() {
    let root = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    probe_plugin(
        root.path(),
        PY,
        "[limits]\naddress_space = \"2GiB\"",
        &probe_script("len(bytes(1 << 30))"),
    );
    // The manifest's 2 GiB allows it; the stage's 256 MiB overrides that.
    let out = run_probe(root.path(), work.path(), "").unwrap();
    assert_eq!(out, vec![serde_json::json!({"ok": 1u64 << 30})]);
    let e = run_probe(
        root.path(),
        work.path(),
        "limits = { address_space = \"256MiB\" }",
    )
    .unwrap_err();
    assert!(
        e.contains("exited with status 1 (limits: address_space = 256 MiB)")
            && e.contains("MemoryError"),
        "{e}"
    );
}

#[test]
fn manifest_limits_apply_and_a_stage_overrides_them_key_by_key() {
    let root = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    probe_plugin(
        root.path(),
        PY,
        "[limits]\nopen_files = 40\ncpu_seconds = 30",
        &probe_script("[__import__('resource').getrlimit(r)[0] for r in (__import__('resource').RLIMIT_NOFILE, __import__('resource').RLIMIT_CPU)]"),
    );
    let out = run_probe(root.path(), work.path(), "").unwrap();
    assert_eq!(out, vec![serde_json::json!({"ok": [40, 30]})]);
    let out = run_probe(root.path(), work.path(), "limits = { open_files = 50 }").unwrap();
    assert_eq!(out, vec![serde_json::json!({"ok": [50, 30]})]);
    // A bad `[limits]` makes the manifest unusable, with the reason.
    write_plugin(
        root.path(),
        "probe",
        "name = \"probe\"\nversion = \"0.1.0\"\nkind = \"process\"\nentry = [\"cat\"]\nengine = \"*\"\n[limits]\ncpu = 1\n",
    );
    let reg = PluginRegistry::discover(&[root.path().to_path_buf()]);
    let why = &reg.broken[&root.path().join("probe/plugin.toml")];
    assert!(
        why.contains("`limits.cpu`: unknown limit (known: address_space, cpu_seconds, open_files)"),
        "{why}"
    );
}

/// Without `network`, `socket(AF_INET)` fails with EACCES (seccomp) while `AF_UNIX` works;
/// granted, it succeeds. On a kernel without seccomp the filter is reported missing instead.
#[test]
fn without_network_a_plugin_cannot_open_an_inet_socket() {
    let sup = millrace::sandbox::support();
    let root = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let inet = "socket.socket(socket.AF_INET, socket.SOCK_STREAM).family == socket.AF_INET";
    probe_plugin(root.path(), PY, "", &probe_script(inet));
    let out = run_probe(root.path(), work.path(), "").unwrap();
    if sup.seccomp.is_ok() {
        assert_eq!(out, vec![serde_json::json!({"err": "PermissionError"})]);
    } else {
        assert_eq!(out, vec![serde_json::json!({"ok": true})], "{sup}");
    }
    let unix = "socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).family == socket.AF_UNIX";
    probe_plugin(root.path(), PY, "", &probe_script(unix));
    let out = run_probe(root.path(), work.path(), "").unwrap();
    assert_eq!(out, vec![serde_json::json!({"ok": true})]);
    probe_plugin(
        root.path(),
        PY,
        "permissions = [\"network\"]",
        &probe_script(inet),
    );
    let out = run_probe(root.path(), work.path(), "grant = [\"network\"]").unwrap();
    assert_eq!(out, vec![serde_json::json!({"ok": true})]);
}

/// Without `filesystem.read` a plugin cannot read a file outside its directory and the system
/// directories; with it, it can. On a kernel without Landlock both succeed (reported instead).
#[test]
fn without_filesystem_read_a_plugin_cannot_read_outside_its_directory() {
    let sup = millrace::sandbox::support();
    let root = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let other = tempfile::tempdir().unwrap();
    let secret = other.path().join("secret.txt");
    std::fs::write(&secret, "hush").unwrap();
    let read = format!("open({:?}).read()", secret.display().to_string());
    probe_plugin(root.path(), PY, "", &probe_script(&read));
    let out = run_probe(root.path(), work.path(), "").unwrap();
    if sup.landlock.is_ok() {
        assert_eq!(out, vec![serde_json::json!({"err": "PermissionError"})]);
    } else {
        assert_eq!(out, vec![serde_json::json!({"ok": "hush"})], "{sup}");
    }
    // Its own directory stays readable.
    let own = "open('plugin.toml').read().startswith('name')";
    probe_plugin(root.path(), PY, "", &probe_script(own));
    let out = run_probe(root.path(), work.path(), "").unwrap();
    assert_eq!(out, vec![serde_json::json!({"ok": true})]);
    probe_plugin(
        root.path(),
        PY,
        "permissions = [\"filesystem.read\"]",
        &probe_script(&read),
    );
    let out = run_probe(root.path(), work.path(), "grant = [\"filesystem.read\"]").unwrap();
    assert_eq!(out, vec![serde_json::json!({"ok": "hush"})]);
}

/// Without `filesystem.write` a plugin cannot create a file, even in its working directory;
/// with it, it can write under the pipeline's directory.
#[test]
fn without_filesystem_write_a_plugin_cannot_create_files() {
    let sup = millrace::sandbox::support();
    let root = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let create = "open('made.txt', 'w').write('x')";
    probe_plugin(root.path(), PY, "", &probe_script(create));
    let out = run_probe(root.path(), work.path(), "").unwrap();
    if sup.landlock.is_ok() {
        assert_eq!(out, vec![serde_json::json!({"err": "PermissionError"})]);
        assert!(!root.path().join("probe/made.txt").exists());
    } else {
        assert_eq!(out, vec![serde_json::json!({"ok": 1})], "{sup}");
    }
    let target = work.path().join("made.txt");
    let create = format!("open({:?}, 'w').write('x')", target.display().to_string());
    probe_plugin(
        root.path(),
        PY,
        "permissions = [\"filesystem.write\"]",
        &probe_script(&create),
    );
    let out = run_probe(root.path(), work.path(), "grant = [\"filesystem.write\"]").unwrap();
    assert_eq!(out, vec![serde_json::json!({"ok": 1})]);
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "x");
}

/// Landlock ABI 6 scopes signals: a plugin cannot signal the engine (its parent), only its own
/// processes. Below ABI 6 it can (and `plugins inspect` does not claim otherwise).
#[test]
fn a_plugin_cannot_signal_the_engine_where_landlock_scopes_signals() {
    let sup = millrace::sandbox::support();
    let root = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    // Signal 0 only checks whether the signal could be sent.
    probe_plugin(
        root.path(),
        PY,
        "",
        &probe_script("os.kill(os.getppid(), 0) is None and os.kill(os.getpid(), 0) is None"),
    );
    let out = run_probe(root.path(), work.path(), "").unwrap();
    if sup.landlock.as_ref().is_ok_and(|abi| *abi >= 6) {
        assert_eq!(out, vec![serde_json::json!({"err": "PermissionError"})]);
    } else {
        assert_eq!(out, vec![serde_json::json!({"ok": true})], "{sup}");
    }
}

/// A process plugin's stderr is logged under `plugin::<name>`, each line at the level it
/// announces, filtered by the stage's `log_level`; the child is told the level.
#[test]
fn a_process_plugin_logs_at_its_stage_level_under_its_own_target() {
    static LOGS: std::sync::Mutex<Vec<(String, log::Level, String)>> =
        std::sync::Mutex::new(Vec::new());
    struct Capture;
    impl log::Log for Capture {
        fn enabled(&self, _: &log::Metadata<'_>) -> bool {
            true
        }
        fn log(&self, r: &log::Record<'_>) {
            LOGS.lock()
                .unwrap()
                .push((r.target().to_string(), r.level(), r.args().to_string()));
        }
        fn flush(&self) {}
    }
    let _ = log::set_logger(&Capture);
    log::set_max_level(log::LevelFilter::Trace);

    let root = tempfile::tempdir().unwrap();
    write_plugin(
        root.path(),
        "talk",
        r#"
name = "talk"
version = "1.0.0"
kind = "process"
entry = ["sh", "-c", "cat; echo \"level=$MILLRACE_LOG_LEVEL\" >&2; echo 'DEBUG: d' >&2; echo 'INFO:talk:i' >&2; echo 'WARNING: w' >&2; echo 'plain' >&2; echo '[ERROR] e' >&2"]
engine = ">=0.1"
[[nodes]]
name = "n"
"#,
    );
    let text = format!(
        "plugin_dirs = [{:?}]\n[stages.read]\nkind = \"ndjson.read\"\npath = {:?}\n[stages.t]\nkind = \"talk.n\"\ninput = \"read\"\nlog_level = \"info\"\n[stages.out]\nkind = \"ndjson.write\"\ninput = \"t\"\npath = \"/dev/null\"\n",
        root.path().display().to_string(),
        repo("examples/data/clicks.ndjson").display().to_string()
    );
    let spec = PipelineSpec::from_str(&text, root.path().join("p.toml")).unwrap();
    spec.build().unwrap().run().unwrap();
    let logs: Vec<(log::Level, String)> = LOGS
        .lock()
        .unwrap()
        .iter()
        .filter(|(t, _, _)| t == "plugin::talk")
        .map(|(_, l, m)| (*l, m.clone()))
        .collect();
    use log::Level::*;
    assert_eq!(
        logs,
        vec![
            (Warn, "[t] level=info".to_string()),
            (Info, "[t] INFO:talk:i".to_string()),
            (Warn, "[t] WARNING: w".to_string()),
            (Warn, "[t] plain".to_string()),
            (Error, "[t] [ERROR] e".to_string()),
        ]
    );
}
