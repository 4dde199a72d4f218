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

/// The corpora are not vacuous: they hold inputs on both sides of each property (a pipeline
/// that validates and ones that fail in different ways; NDJSON with records and with bad
/// lines), so the replay exercises the success and the error paths.
#[test]
fn corpora_hold_valid_and_invalid_inputs() {
    use millrace::config::{ConfigErrorKind, PipelineSpec};
    let text = |name: &str| {
        let p = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/corpus/config")
            .join(name);
        String::from_utf8(std::fs::read(p).unwrap()).unwrap()
    };
    assert!(PipelineSpec::from_str(&text("minimal.toml"), "fuzz.toml").is_ok());
    for (file, kind) in [
        ("cycle.toml", ConfigErrorKind::Cycle),
        ("syntax.toml", ConfigErrorKind::Syntax),
        ("unknown_kind.toml", ConfigErrorKind::UnknownKind),
        ("missing_file.toml", ConfigErrorKind::Io),
        ("no_stages.toml", ConfigErrorKind::NoStages),
    ] {
        let e = PipelineSpec::from_str(&text(file), "fuzz.toml").unwrap_err();
        assert_eq!(e.kind(), kind, "{file}: {e}");
    }
    let (mut good, mut bad) = (0, 0);
    for (_, data) in corpus("ndjson") {
        for line in data.split(|b| *b == b'\n') {
            match serde_json::from_slice::<serde_json::Value>(line) {
                Ok(serde_json::Value::Object(_)) => good += 1,
                _ if !line.iter().all(u8::is_ascii_whitespace) => bad += 1,
                _ => {}
            }
        }
    }
    assert!(good >= 20 && bad >= 20, "{good} records, {bad} bad lines");
}

/// Counts, per thread, the largest single allocation: the request parser must not allocate in
/// proportion to what a client sends beyond the head and body limits.
mod alloc_watch {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    pub(crate) struct Watch;

    thread_local! {
        static LARGEST: Cell<usize> = const { Cell::new(0) };
    }

    // SAFETY: every call is passed on to the system allocator unchanged; the bookkeeping only
    // touches a const-initialised thread-local cell, which neither allocates nor panics
    // (`try_with` after the thread's locals are gone).
    unsafe impl GlobalAlloc for Watch {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            let _ = LARGEST.try_with(|l| l.set(l.get().max(layout.size())));
            // SAFETY: the caller's contract is System's.
            unsafe { System.alloc(layout) }
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            // SAFETY: `ptr` came from `alloc` above, that is from System, with this layout.
            unsafe { System.dealloc(ptr, layout) }
        }
        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            let _ = LARGEST.try_with(|l| l.set(l.get().max(new_size)));
            // SAFETY: as `dealloc`; the caller's contract is System's.
            unsafe { System.realloc(ptr, layout, new_size) }
        }
    }

    /// The largest allocation `f` makes on this thread.
    pub(crate) fn largest(f: impl FnOnce()) -> usize {
        LARGEST.with(|l| l.set(0));
        f();
        LARGEST.with(Cell::get)
    }
}

#[global_allocator]
static WATCH: alloc_watch::Watch = alloc_watch::Watch;

/// Whatever a client sends, the parser allocates no more than the head limit for the head and
/// the request's (bounded) body: megabytes without a head end, a body longer than its
/// `Content-Length`, a `Content-Length` over the body limit.
#[test]
fn the_request_parser_allocates_within_its_limits() {
    use millrace::fuzzing::{http_request, HTTP_MAX_HEAD};
    let watched = alloc_watch::largest(|| drop(std::hint::black_box(vec![0u8; 100_000])));
    assert!(watched >= 100_000, "the watch sees allocations ({watched})");
    let big = vec![b'x'; 8 << 20];
    let n = alloc_watch::largest(|| http_request(&big));
    assert!(n <= HTTP_MAX_HEAD, "{n} bytes for 8 MiB without a head end");

    let mut body = b"POST /jobs HTTP/1.1\r\nHost: a\r\nContent-Type: application/toml\r\nContent-Length: 10\r\n\r\n".to_vec();
    body.resize(body.len() + (8 << 20), b'y');
    let n = alloc_watch::largest(|| http_request(&body));
    assert!(
        n <= HTTP_MAX_HEAD,
        "{n} bytes for a 10-byte body followed by 8 MiB"
    );

    let mut over = b"POST /jobs HTTP/1.1\r\nHost: a\r\nContent-Type: application/toml\r\nContent-Length: 1048577\r\n\r\n".to_vec();
    over.resize(over.len() + (2 << 20), b'z');
    let n = alloc_watch::largest(|| http_request(&over));
    assert!(n <= HTTP_MAX_HEAD, "{n} bytes for a body over the limit");
}
