//! The crate's layering, checked on its source: a module may refer (`crate::name`, in code or in
//! a doc link) only to modules of its own layer or the layers below it.
//!
//! | layer | modules |
//! | --- | --- |
//! | 0 core | error, sync, time, describe, metrics, snapshot, versioned, ndjson, pool, operator, par, runtime, channel, source, sink, window, stream, private_dir, dead_letter, checkpoint |
//! | 1 | sandbox |
//! | 2 | exec |
//! | 3 | plugin |
//! | 4 | config |
//! | 5 | job |
//! | 6 | http |
//! | 7 | fuzzing (the fuzz targets' properties, over every layer) |
//!
//! Inside the core, only the crate root may use the builder (`stream`) in code (a doc comment may
//! link to it): the run-time pieces (channels, heads, tails, windows) know nothing of how a
//! pipeline is assembled. Upward references count in doc links too: a link to a layer above
//! breaks when that layer's feature is off. Names that
//! the crate root re-exports (`crate::Pipeline`, `crate::Error`, ...) count as the module they
//! come from. The test fails naming each file, line and arrow that breaks the rule, and a second
//! test shows that it does catch an upward import.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

const LAYERS: &[(&str, u32)] = &[
    ("error", 0),
    ("sync", 0),
    ("time", 0),
    ("describe", 0),
    ("metrics", 0),
    ("snapshot", 0),
    ("versioned", 0),
    ("ndjson", 0),
    ("pool", 0),
    ("operator", 0),
    ("par", 0),
    ("runtime", 0),
    ("channel", 0),
    ("checkpoint", 0),
    ("source", 0),
    ("sink", 0),
    ("window", 0),
    ("stream", 0),
    ("private_dir", 0),
    ("dead_letter", 0),
    ("sandbox", 1),
    ("exec", 2),
    ("plugin", 3),
    ("config", 4),
    ("job", 5),
    ("http", 6),
    ("fuzzing", 7),
];

fn layer(module: &str) -> Option<u32> {
    LAYERS.iter().find(|(m, _)| *m == module).map(|(_, l)| *l)
}

/// The top-level module a file belongs to (`src/config/build.rs` -> `config`).
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?;
    let first = rel.components().next()?.as_os_str().to_str()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    (name != "lib" && name != "bin").then(|| name.to_string())
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// What `crate::NAME` means for each name the crate root re-exports: `pub use module::{A, B}`.
fn root_exports(lib: &str) -> BTreeMap<String, String> {
    let mut map = BTreeMap::new();
    let flat = lib.replace('\n', " ");
    for stmt in flat.split(';') {
        let Some(rest) = stmt.trim().strip_prefix("pub use ") else {
            continue;
        };
        let Some((module, names)) = rest.split_once("::") else {
            continue;
        };
        let names = names.trim().trim_start_matches('{').trim_end_matches('}');
        for n in names.split(',') {
            let n = n.trim();
            if !n.is_empty() {
                map.insert(n.to_string(), module.trim().to_string());
            }
        }
    }
    map
}

/// Every `crate::X` in `text` (and `X` inside `crate::{X, ...}`), with its line number and
/// whether that line is a comment.
fn references(text: &str) -> Vec<(usize, bool, String)> {
    let mut out = Vec::new();
    let bytes = text.as_bytes();
    let mut at = 0;
    while let Some(i) = text[at..].find("crate::") {
        let start = at + i;
        at = start + "crate::".len();
        if start > 0 && (bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_') {
            continue; // `millrace_crate::`, not ours
        }
        let line = text[..start].matches('\n').count() + 1;
        let line_start = text[..start].rfind('\n').map_or(0, |i| i + 1);
        let comment = text[line_start..start].trim_start().starts_with("//");
        let rest = &text[at..];
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for item in group[..end].split(',') {
                let name: String = item
                    .trim()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    out.push((line, comment, name));
                }
            }
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                out.push((line, comment, name));
            }
        }
    }
    out
}

/// The arrows in `files` (path, text) that break the layering, as `file:line: from -> to`.
fn violations(src: &Path, lib: &str, files: &[(PathBuf, String)]) -> Vec<String> {
    let exports = root_exports(lib);
    let mut bad = Vec::new();
    for (path, text) in files {
        let Some(from) = module_of(src, path) else {
            continue;
        };
        let Some(from_layer) = layer(&from) else {
            bad.push(format!(
                "{}: module `{from}` has no layer in tests/layers.rs",
                path.display()
            ));
            continue;
        };
        for (line, comment, name) in references(text) {
            let to = exports.get(&name).cloned().unwrap_or(name);
            if to == from {
                continue;
            }
            let Some(to_layer) = layer(&to) else {
                continue; // an item of the crate root (a macro, a crate re-export)
            };
            let upward = to_layer > from_layer;
            // Documentation may point a reader at the builder; code may not use it.
            let builder = from_layer == 0 && to == "stream" && !comment;
            if upward || builder {
                bad.push(format!(
                    "{}:{line}: `{from}` (layer {from_layer}) refers to `{to}` (layer {to_layer})",
                    path.display()
                ));
            }
        }
    }
    bad
}

fn crate_sources() -> (PathBuf, String, Vec<(PathBuf, String)>) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let lib = fs::read_to_string(src.join("lib.rs")).unwrap();
    let mut paths = Vec::new();
    rust_files(&src, &mut paths);
    paths.sort();
    let files = paths
        .into_iter()
        .map(|p| {
            let t = fs::read_to_string(&p).unwrap();
            (p, t)
        })
        .collect();
    (src, lib, files)
}

#[test]
fn no_module_refers_to_a_layer_above_it() {
    let (src, lib, files) = crate_sources();
    assert!(files.len() > 20, "found only {} source files", files.len());
    let bad = violations(&src, &lib, &files);
    assert!(
        bad.is_empty(),
        "layering broken ({} arrows):\n{}",
        bad.len(),
        bad.join("\n")
    );
}

#[test]
fn every_top_level_module_has_a_layer() {
    let (src, lib, files) = crate_sources();
    for (path, _) in &files {
        if let Some(m) = module_of(&src, path) {
            assert!(
                layer(&m).is_some(),
                "{}: `{m}` has no layer",
                path.display()
            );
        }
    }
    // And every module the crate root declares is a file that was read.
    for line in lib.lines() {
        let l = line.trim();
        let decl = l
            .strip_prefix("pub mod ")
            .or_else(|| l.strip_prefix("mod "))
            .or_else(|| l.strip_prefix("pub(crate) mod "));
        if let Some(m) = decl.and_then(|d| d.strip_suffix(';')) {
            assert!(
                layer(m).is_some(),
                "lib.rs declares `{m}`, which has no layer"
            );
        }
    }
}

/// The check catches what it is for: the crate's real files plus one upward import (the core's
/// error module reaching into the TOML layer, as it once did) and one core module using the
/// builder.
#[test]
fn the_check_catches_an_upward_import() {
    let (src, lib, mut files) = crate_sources();
    let error = files
        .iter_mut()
        .find(|(p, _)| p.ends_with("error.rs") || p.ends_with("error/mod.rs"))
        .expect("the error module");
    error.1.push_str("\nuse crate::config::PipelineSpec;\n");
    let channel = files
        .iter_mut()
        .find(|(p, _)| p.ends_with("channel.rs"))
        .expect("the channel module");
    channel.1.push_str("\nfn f(_: crate::Pipeline) {}\n");
    let bad = violations(&src, &lib, &files);
    assert_eq!(bad.len(), 2, "{bad:#?}");
    assert!(
        bad[0].contains("`channel` (layer 0) refers to `stream`"),
        "{}",
        bad[0]
    );
    assert!(
        bad[1].contains("`error` (layer 0) refers to `config` (layer 4)"),
        "{}",
        bad[1]
    );
}
