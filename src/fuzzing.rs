//! The properties the fuzz targets check, one function per target (`fuzz/fuzz_targets/*.rs`),
//! so that `tests/fuzz_corpus.rs` replays every checked-in corpus file on a stable toolchain
//! through exactly the code the fuzzer runs. Each function takes the fuzzer's bytes, asserts
//! its property and panics, naming what broke, when it does not hold.
//!
//! Not an API: hidden from the docs and exempt from semver. `docs/fuzzing.md` says how to run
//! the targets and add a crash to a corpus.

use std::path::Path;

use serde_json::Value;

use crate::config::{ConfigErrorKind, PipelineSpec};
use crate::ndjson::{check_block, classify, Line};
use crate::window::{Session, Sliding, Tumbling};
use crate::{Timestamp, Window};

/// The name every fuzzed pipeline is given; every error must name it.
pub const CONFIG_FILE: &str = "fuzz.toml";

/// `config`: any text, as a pipeline file named [`CONFIG_FILE`], validates or fails with an
/// error that names the file (`fuzz.toml:LINE: ...`, with a line of the text, for every error
/// but "no stages"); it never panics. Nothing is built or run, and no plugin is discovered
/// or loaded (a made-up `plugin_dirs` must not `dlopen` what lies on the disk); validation only
/// looks at whether input files exist. Bytes that are not UTF-8 are decoded lossily.
pub fn config(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    match PipelineSpec::from_str_without_plugins(&text, CONFIG_FILE) {
        Ok(spec) => {
            assert!(!spec.stages.is_empty(), "a valid pipeline without stages");
            for s in &spec.stages {
                assert!(
                    s.line >= 1 && s.line <= line_count(&text),
                    "stage `{}` at line {} of a {}-line file",
                    s.name,
                    s.line,
                    line_count(&text)
                );
                for input in &s.inputs {
                    assert!(
                        spec.stages.iter().any(|t| &t.name == input),
                        "stage `{}` reads from `{input}`, which is not a stage",
                        s.name
                    );
                }
            }
            let _ = spec.to_dot();
        }
        Err(e) => {
            let msg = e.to_string();
            assert_eq!(e.file, Path::new(CONFIG_FILE), "{msg}");
            assert!(
                msg.starts_with(CONFIG_FILE),
                "the error does not start with the file's name: {msg}"
            );
            if let Some(line) = e.line {
                assert!(
                    msg.starts_with(&format!("{CONFIG_FILE}:{line}")),
                    "the line is not after the file: {msg}"
                );
                assert!(
                    line >= 1 && line <= line_count(&text),
                    "line {line} of a {}-line file: {msg}",
                    line_count(&text)
                );
            }
            assert!(!e.message.trim().is_empty(), "an error without a message");
            // Every mistake but a file with no stages is somewhere in the text.
            if e.kind() != ConfigErrorKind::NoStages {
                assert!(e.line.is_some(), "an error without a line: {msg}");
            }
        }
    }
}

/// Lines in `text` as an editor numbers them (a last line without `\n` counts, and an empty
/// text has one line).
fn line_count(text: &str) -> usize {
    text.matches('\n').count() + 1
}

/// `ndjson`: the byte path's scanner and `serde_json` agree, line by line, on what is a JSON
/// object: a line `check_block` accepts as a record parses as an object with
/// `serde_json::from_slice::<Value>`, and a line it refuses does not; a line of ASCII
/// whitespace only is skipped by both paths (it is never a record). The fast recogniser
/// (`classify`) is held to the same: `Object` only for objects, `Blank` only for blank
/// lines. Over the whole input as one block, `check_block` counts the records or names the
/// first line that is not one.
pub fn ndjson(data: &[u8]) {
    let show = |line: &[u8]| format!("{:?}", String::from_utf8_lossy(line));
    let mut records = 0u64;
    let mut first_bad = None;
    let mut lines: Vec<&[u8]> = data.split(|b| *b == b'\n').collect();
    if data.ends_with(b"\n") {
        lines.pop(); // the empty "line" after the last newline
    }
    for (i, line) in lines.iter().enumerate() {
        let blank = line.iter().all(u8::is_ascii_whitespace);
        let object = matches!(serde_json::from_slice::<Value>(line), Ok(Value::Object(_)));
        let mut one = line.to_vec();
        let ours = check_block(&mut one, 1, usize::MAX);
        match (&ours, blank, object) {
            (Ok(0), true, _) => {}
            (Ok(1), false, true) => {}
            (Err(e), false, false) => assert_eq!(e.line, 1, "{}", show(line)),
            _ => panic!(
                "line {}: check_block says {:?}; serde_json says object = {object}, blank = {blank}: {}",
                i + 1,
                ours.as_ref().map_err(|e| &e.message),
                show(line)
            ),
        }
        // `classify` leaves UTF-8 to its caller (`check_block` checks whole blocks).
        if std::str::from_utf8(line).is_ok() {
            match classify(line) {
                Line::Object => {
                    assert!(object, "classify: Object, serde_json: not: {}", show(line))
                }
                Line::Blank => assert!(blank, "classify: Blank for {}", show(line)),
                Line::Doubt => {}
            }
        }
        if object {
            records += 1;
        } else if !blank && first_bad.is_none() {
            first_bad = Some(i as u64 + 1);
        }
    }
    let mut block = data.to_vec();
    match (check_block(&mut block, 1, usize::MAX), first_bad) {
        (Ok(n), None) => {
            assert_eq!(n, records, "records in the block");
            let kept = block
                .split(|b| *b == b'\n')
                .filter(|l| !l.is_empty())
                .count();
            assert_eq!(
                kept as u64, n,
                "the block as passed on keeps every record, only"
            );
        }
        (Err(e), Some(line)) => assert_eq!(e.line, line, "the first bad line: {}", e.message),
        (ours, theirs) => panic!(
            "check_block on the block: {:?}; the first line serde_json refuses: {theirs:?}",
            ours.map_err(|e| (e.line, e.message))
        ),
    }
}

/// `manifest`: any text, as a plugin's `plugin.toml`, is a manifest or an error; it never
/// panics. The error is what the plugin registry records against the file (and the CLI and an
/// unknown `kind` print after the file's path): non-empty, and a `line N: ` it starts with
/// names a line of the text. A manifest that parses keeps the checks `load` promises.
pub fn manifest(data: &[u8]) {
    let path = Path::new("fuzz/plugin.toml");
    let text = String::from_utf8_lossy(data);
    match crate::plugin::parse_manifest(&text, path) {
        Ok(p) => {
            let m = &p.manifest;
            assert!(
                !m.name.is_empty()
                    && m.name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'),
                "accepted the name {:?}",
                m.name
            );
            assert_eq!(p.dir, Path::new("fuzz"));
            for perm in &m.permissions {
                assert!(
                    crate::plugin::PERMISSIONS.contains(&perm.as_str()),
                    "accepted the permission {perm:?}"
                );
            }
            let mut names: Vec<&str> = m.nodes.iter().map(|n| n.name.as_str()).collect();
            names.sort_unstable();
            names.dedup();
            assert_eq!(
                names.len(),
                m.nodes.len(),
                "a node declared twice was accepted"
            );
        }
        Err(e) => {
            assert!(!e.trim().is_empty(), "an error without a message");
            if let Some(rest) = e.strip_prefix("line ") {
                let n: usize = rest
                    .split(':')
                    .next()
                    .and_then(|n| n.parse().ok())
                    .unwrap_or_else(|| panic!("`line` without a number: {e}"));
                assert!(
                    n >= 1 && n <= line_count(&text),
                    "line {n} of a {}-line manifest: {e}",
                    line_count(&text)
                );
            }
        }
    }
}

/// Reads the fuzzer's bytes as numbers, zero when they run out.
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn u8(&mut self) -> u8 {
        let (b, rest) = self.0.split_first().map_or((0, &[][..]), |(b, r)| (*b, r));
        self.0 = rest;
        b
    }

    fn i64(&mut self) -> i64 {
        let mut b = [0u8; 8];
        for x in &mut b {
            *x = self.u8();
        }
        i64::from_le_bytes(b)
    }

    /// A time: anywhere, small, or within 100 ms of either end of the range.
    fn time(&mut self) -> i64 {
        let (mode, raw) = (self.u8() % 4, self.i64());
        match mode {
            0 => raw,
            1 => raw % 100_000,
            2 => i64::MAX - raw.rem_euclid(100),
            _ => i64::MIN + raw.rem_euclid(100),
        }
    }

    /// A positive length: any, small, or near `i64::MAX`.
    fn length(&mut self) -> i64 {
        let (mode, raw) = (self.u8() % 3, self.i64());
        match mode {
            0 => (raw & i64::MAX).max(1),
            1 => raw.rem_euclid(1000) + 1,
            _ => i64::MAX - raw.rem_euclid(100),
        }
    }
}

/// `[start, start + size)` in i128, as a window clamped to the i64 range.
fn clamp_window(start: i128, size: i64) -> Window {
    let c = |v: i128| v.clamp(i64::MIN as i128, i64::MAX as i128) as i64;
    Window {
        start: Timestamp(c(start)),
        end: Timestamp(c(start + size as i128)),
    }
}

/// `window`: for the tumbling, sliding and session assigners, decoded from the bytes with a
/// timestamp, each timestamp is in exactly the windows whose `contains` is true, with windows
/// half-open (`[start, end)`). The reference enumerates, in i128 (no overflow), the windows of
/// the assigner's grid around the timestamp, including one past each end, and keeps those that
/// contain it; the assigner must return exactly those, each of whose `contains(t)` is true.
/// Sessions: each event's window contains it, and the merged sessions are disjoint, sorted, and
/// hold each event in exactly one.
pub fn window(data: &[u8]) {
    let mut b = Bytes(data);
    let t = b.time();
    let (size, slide, gap, offset) = (b.length(), b.length(), b.length(), b.i64());
    let ts = Timestamp(t);
    // The one instant no half-open window with an i64 end can hold: the end-of-input
    // watermark. The assigners treat an event there as at `i64::MAX - 1` (see assign.rs).
    let held = Timestamp(t.min(i64::MAX - 1));
    let holds = |start: i128, len: i64| {
        let w = clamp_window(start, len);
        w.contains(held).then_some(w)
    };

    // Tumbling: one window; its neighbours on the grid do not hold t.
    let tumbling = Tumbling::new(size, offset).expect("a positive size");
    let w = tumbling.assign(ts);
    let off = offset.rem_euclid(size) as i128;
    let start = held.0 as i128 - (held.0 as i128 - off).rem_euclid(size as i128);
    let grid: Vec<Window> = (-2..=2)
        .filter_map(|k| holds(start + k * size as i128, size))
        .collect();
    assert_eq!(
        grid,
        vec![w],
        "tumbling size {size} offset {offset} at {t}: assigned {w:?}"
    );
    assert!(w.contains(held), "tumbling {w:?} does not contain {t}");

    // Sliding: every window on the grid whose start is in (t - size, t], and none other. At
    // most 1024 windows per instant (the fuzzer's bound, not the assigner's).
    let slide = slide.max(size / 1024 + 1);
    let sliding = Sliding::new(size, slide, offset).expect("positive size and slide");
    let got = sliding.assign(ts);
    let off = offset.rem_euclid(slide) as i128;
    let last = held.0 as i128 - (held.0 as i128 - off).rem_euclid(slide as i128);
    let mut want = Vec::new();
    let mut s = last + slide as i128; // one past the latest: must not hold t
    while s + (size as i128) > held.0 as i128 - slide as i128 {
        if let Some(w) = holds(s, size) {
            if want.last() != Some(&w) {
                want.push(w); // windows below i64::MIN clamp to one
            }
        }
        s -= slide as i128;
    }
    assert_eq!(
        got, want,
        "sliding size {size} slide {slide} offset {offset} at {t}"
    );
    for w in &got {
        assert!(w.contains(held), "sliding {w:?} does not contain {t}");
    }

    // Sessions: the event's own window, then merging with more events.
    let session = Session::new(gap).expect("a positive gap");
    let own = session.assign(ts);
    assert!(own.contains(held), "session {own:?} does not contain {t}");
    let mut events = vec![held];
    while !b.0.is_empty() && events.len() < 32 {
        events.push(Timestamp(b.time().min(i64::MAX - 1)));
    }
    let merged = session.merge(events.iter().map(|&e| session.assign(e)).collect());
    for pair in merged.windows(2) {
        assert!(
            pair[0].end <= pair[1].start,
            "sessions overlap or are unsorted: {pair:?}"
        );
    }
    for e in &events {
        let n = merged.iter().filter(|w| w.contains(*e)).count();
        assert_eq!(
            n, 1,
            "event {e:?} in {n} of the sessions {merged:?} (gap {gap})"
        );
    }
    for w in &merged {
        assert!(
            events.iter().any(|e| e == &w.start),
            "session {w:?} starts at no event"
        );
    }
}

/// The default request body limit of the job server (`ServeOptions::max_body`).
pub const HTTP_MAX_BODY: usize = crate::http::DEFAULT_MAX_BODY;
/// The request head limit of the job server.
pub const HTTP_MAX_HEAD: usize = crate::http::MAX_HEAD;

/// `http_request`: the job server's request parser (the same steps as on a socket, with every
/// host and token let in) never panics, keeps no more than the head limit of head and the
/// body limit of body, and answers each bad request with one of the documented statuses:
/// `400` (malformed), `411` (chunked), `413` (body too long), `415` (body type), `431` (head
/// too long). (`408` is the socket's: a slice never times out.) A head longer than the limit is
/// always `431`, and a request the parser takes is one whose head ends within the limit.
pub fn http_request(data: &[u8]) {
    match crate::http::parse_request_for_fuzzing(data, HTTP_MAX_BODY) {
        Ok(req) => {
            assert!(
                req.method.len() + req.path.len() + req.query.len() + req.header_bytes
                    <= HTTP_MAX_HEAD,
                "more head kept than the limit"
            );
            assert!(
                req.body.len() <= HTTP_MAX_BODY,
                "more body kept than the limit"
            );
            assert!(
                req.body.len() <= data.len(),
                "a body longer than the request"
            );
            assert!(!req.method.is_empty(), "a request without a method");
        }
        Err(None) => assert!(data.is_empty(), "`nothing sent` for {} bytes", data.len()),
        Err(Some((status, body))) => {
            assert!(
                matches!(status, 400 | 411 | 413 | 415 | 431),
                "status {status}: {body}"
            );
            let v: Value = serde_json::from_str(&body).expect("an error body is JSON");
            assert!(
                v["error"].as_str().is_some_and(|m| !m.is_empty()),
                "an error body without a message: {body}"
            );
            let ends = [&b"\r\n\r\n"[..], b"\n\n"]
                .iter()
                .filter_map(|end| {
                    data.windows(end.len())
                        .position(|w| w == *end)
                        .map(|i| i + end.len())
                })
                .min();
            if ends.map_or(data.len() > HTTP_MAX_HEAD, |e| e > HTTP_MAX_HEAD) {
                assert_eq!(status, 431, "a head over the limit: {body}");
            } else {
                assert_ne!(status, 431, "a head within the limit: {body}");
            }
        }
    }
}
