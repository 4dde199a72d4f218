//! Plugin manifests, discovery, parameter checking against node specs, permissions, and the
//! bundled Python process plugin end to end.

use std::path::{Path, PathBuf};

use millrace::config::PipelineSpec;
use millrace::plugin::{search_path, PluginRegistry};

fn repo(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

/// A pipeline `read -> <stage> -> out` with `plugin_dirs = [dirs]`; its config error, if any.
fn config_err(plugin_dir: &Path, stage: &str) -> String {
    let text = format!(
        "plugin_dirs = [{:?}]\n\n[stages.read]\nkind = \"ndjson.read\"\npath = \"-\"\n\n[stages.p]\ninput = \"read\"\n{stage}\n\n[stages.out]\nkind = \"ndjson.write\"\ninput = \"p\"\npath = \"-\"\n",
        plugin_dir.display().to_string()
    );
    match PipelineSpec::from_str(&text, "/tmp/plug.toml") {
        Ok(_) => panic!("expected an error for:\n{text}"),
        Err(e) => e.to_string(),
    }
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
}

#[test]
fn node_parameters_are_checked_before_anything_runs() {
    let dir = repo("plugins");
    let e = config_err(
        &dir,
        "kind = \"textops.case\"\nfield = \"line\"\nmode = \"shout\"",
    );
    assert!(
        e.contains("/tmp/plug.toml:11: stage `p`: parameter `mode` of node `textops.case`: expected one of \"upper\", \"lower\", \"title\", found the string \"shout\""),
        "{e}"
    );
    let e = config_err(&dir, "kind = \"textops.case\"\nfield = 7");
    assert!(
        e.contains("parameter `field`") && e.contains("expected a string, found the integer 7"),
        "{e}"
    );
    let e = config_err(&dir, "kind = \"textops.case\"");
    assert!(
        e.contains("missing parameter `field`: expected a string (node `textops.case`)"),
        "{e}"
    );
    let e = config_err(
        &dir,
        "kind = \"textops.length\"\nfield = \"line\"\nmin = -1",
    );
    assert!(
        e.contains("expected a value at least 0, found the integer -1"),
        "{e}"
    );
    let e = config_err(
        &dir,
        "kind = \"textops.case\"\nfield = \"line\"\ncolour = \"red\"",
    );
    assert!(
        e.contains("unknown parameter `colour` for kind `textops.case`"),
        "{e}"
    );
    let e = config_err(&dir, "kind = \"textops.reverse\"");
    assert!(
        e.contains("plugin `textops` has no node `reverse` (nodes: case, length)"),
        "{e}"
    );
    let e = config_err(&dir, "kind = \"nosuch.node\"");
    assert!(
        e.contains("unknown kind `nosuch.node`") && e.contains("plugins: textops"),
        "{e}"
    );
}

#[test]
fn a_permission_must_be_granted() {
    let root = tempfile::tempdir().unwrap();
    write_plugin(root.path(), "fetch", NET);
    let e = config_err(root.path(), "kind = \"fetch.get\"");
    assert!(
        e.contains("plugin `fetch` requests permission \"network\", which this stage does not grant: add grant = [\"network\"]"),
        "{e}"
    );
    let e = config_err(
        root.path(),
        "kind = \"fetch.get\"\ngrant = [\"network\", \"filesystem.write\"]",
    );
    assert!(e.contains("does not request \"filesystem.write\""), "{e}");
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
    let e = config_err(root.path(), "kind = \"future.get\"");
    assert!(
        e.contains("manifests that could not be used") && e.contains("requires millrace >=9"),
        "{e}"
    );
    let e = config_err(root.path(), "kind = \"native.n\"");
    assert!(
        e.contains("native plugin; this build cannot load native plugins yet"),
        "{e}"
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
