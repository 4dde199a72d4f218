//! Bad records (issue #14, items 1 and 2): each error policy at each place a record can be bad,
//! the dead letters' exact fields, the dead-letter stream's end (no hang when the run fails, is
//! stopped early, or its dead-letter stage fails), `max_dead_letters`, and the per-step
//! accounting invariant of every run.
// A test drives the engine from outside with std's threads: the `crate::sync` rule
// (clippy.toml) is for the engine's own code.
#![allow(clippy::disallowed_types, clippy::disallowed_methods)]

use std::io::Write;
use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use millrace::config::{ConfigErrorKind, PipelineSpec};
use millrace::{DeadLetter, Error, OnError, Pipeline, RunReport};
use serde_json::{json, Value};

/// Runs `f` (a pipeline's run: pipelines are not `Send`) under a watchdog thread that ends the
/// test process if it has not finished within a minute — a hang fails loudly instead of hanging
/// the suite. The watchdog waits on the end itself (a channel), not on a sleep.
fn watchdog<T>(f: impl FnOnce() -> T) -> T {
    let (done, ended) = mpsc::channel::<()>();
    let dog = std::thread::spawn(move || {
        if let Err(mpsc::RecvTimeoutError::Timeout) = ended.recv_timeout(Duration::from_secs(60)) {
            eprintln!("the run did not end within 60 s: a hang");
            std::process::exit(101);
        }
    });
    let v = f();
    drop(done);
    dog.join().unwrap();
    v
}

/// A pipeline file `stages` in `dir` (with `in.ndjson` holding `input`) run to the end.
fn run_toml(dir: &Path, input: &str, stages: &str) -> Result<RunReport, Error> {
    std::fs::write(dir.join("in.ndjson"), input).unwrap();
    let file = dir.join("p.toml");
    std::fs::write(&file, stages).unwrap();
    let spec = PipelineSpec::from_file(&file)?;
    let p = spec.build()?;
    watchdog(move || p.run())
}

fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// A letter without its time (which is the wall clock), after checking the time is one.
fn untimed(mut v: Value) -> Value {
    let t = v["time"]
        .as_u64()
        .expect("a letter's time is ms since the epoch");
    assert!(t > 1_600_000_000_000, "time {t} is ms since the Unix epoch");
    v.as_object_mut().unwrap().remove("time");
    v
}

fn letters(dir: &Path) -> Vec<Value> {
    lines(&dir.join("dead.ndjson"))
        .into_iter()
        .map(untimed)
        .collect()
}

const DEAD: &str = "[stages.dead]\nkind = \"ndjson.write\"\npath = \"dead.ndjson\"\n";

/// `read → <mid> → out`, with the dead-letter stage, the policy on `policy_stage`.
fn pipeline(read_extra: &str, mid: &str) -> String {
    format!(
        "[stages.read]\nkind = \"ndjson.read\"\npath = \"in.ndjson\"\n{read_extra}\n{mid}\n\
         [stages.out]\nkind = \"ndjson.write\"\ninput = \"last\"\npath = \"out.ndjson\"\n\n{DEAD}"
    )
}

const DL: &str = "on_error = \"dead_letter\"\ndead_letter = \"dead\"\n";

// ---- ndjson.read -------------------------------------------------------------------------

const BAD_LINE: &str = "{\"n\":1}\n{\"n\":2\n\n{\"n\":3}\n[4]\n";

fn read_stages(policy: &str, par: usize) -> String {
    let mid = "[stages.last]\nkind = \"select\"\ninput = \"read\"\nfields = [\"n\"]\n";
    let mut read = policy.to_string();
    if par > 1 {
        read.push_str(&format!("parallelism = {par}\n"));
    }
    if policy.is_empty() {
        // No policy: the dead-letter stage would have no sender; leave it out.
        return format!(
            "[stages.read]\nkind = \"ndjson.read\"\npath = \"in.ndjson\"\n{read}\n{mid}\n\
             [stages.out]\nkind = \"ndjson.write\"\ninput = \"last\"\npath = \"out.ndjson\"\n"
        );
    }
    pipeline(&read, mid)
}

#[test]
fn ndjson_read_fail_names_file_line_and_stage() {
    let dir = tempfile::tempdir().unwrap();
    let err = run_toml(dir.path(), BAD_LINE, &read_stages("", 1)).unwrap_err();
    match &err {
        Error::Record {
            stage, location, ..
        } => {
            assert_eq!(stage, "read");
            assert_eq!(location.line, 2);
            assert!(location.path.ends_with("in.ndjson"), "{err}");
        }
        other => panic!("expected a record error, got {other}"),
    }
}

#[test]
fn ndjson_read_skip_counts_the_bad_lines() {
    let dir = tempfile::tempdir().unwrap();
    let report = run_toml(
        dir.path(),
        BAD_LINE,
        &read_stages("on_error = \"skip\"\n", 1).replace(DEAD, ""),
    )
    .unwrap();
    assert_eq!(
        lines(&dir.path().join("out.ndjson")),
        vec![json!({"n": 1}), json!({"n": 3})]
    );
    let read = report.account("read").unwrap();
    assert_eq!((read.records_in, read.records_out, read.skipped), (4, 2, 2));
    report.check_accounting().unwrap();
}

#[test]
fn ndjson_read_dead_letters_carry_raw_file_and_line() {
    for par in [1, 2] {
        let dir = tempfile::tempdir().unwrap();
        let report = run_toml(dir.path(), BAD_LINE, &read_stages(DL, par)).unwrap();
        let mut out = lines(&dir.path().join("out.ndjson"));
        out.sort_by_key(|v| v["n"].as_u64());
        assert_eq!(out, vec![json!({"n": 1}), json!({"n": 3})]);
        let file = dir.path().join("in.ndjson").display().to_string();
        let mut got = letters(dir.path());
        got.sort_by_key(|v| v["line"].as_u64());
        assert_eq!(got.len(), 2, "parallelism {par}: {got:?}");
        assert_eq!(got[0]["stage"], "read");
        assert_eq!(got[0]["raw"], "{\"n\":2");
        assert_eq!(got[0]["file"], json!(file));
        assert_eq!(got[0]["line"], 2);
        assert!(got[0].get("record").is_none(), "record XOR raw");
        assert!(
            got[0]["error"].as_str().unwrap().contains("JSON"),
            "{got:?}"
        );
        assert_eq!(got[1]["raw"], "[4]");
        assert_eq!(got[1]["line"], 5);
        // The blank line is not a record, at parallelism 1 and with two readers (the
        // projected byte path) alike.
        let read = report.account("read").unwrap();
        let expect = (4, 2, 0, 2);
        assert_eq!(
            (
                read.records_in,
                read.records_out,
                read.filtered,
                read.dead_lettered
            ),
            expect,
            "parallelism {par}"
        );
        report.check_accounting().unwrap();
    }
}

#[test]
fn lines_read_dead_letters_invalid_utf8_lossily() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("in.txt"), b"good\nbad \xff here\nfine\n").unwrap();
    let text = format!(
        "[stages.read]\nkind = \"lines.read\"\npath = \"in.txt\"\n{DL}\n\
         [stages.out]\nkind = \"ndjson.write\"\ninput = \"read\"\npath = \"out.ndjson\"\n\n{DEAD}"
    );
    let report = run_toml(dir.path(), "", &text).unwrap();
    assert_eq!(
        lines(&dir.path().join("out.ndjson")),
        vec![json!({"line": "good"}), json!({"line": "fine"})]
    );
    let got = letters(dir.path());
    assert_eq!(got.len(), 1);
    assert_eq!(got[0]["raw"], "bad \u{fffd} here");
    assert_eq!(got[0]["line"], 2);
    assert!(got[0]["error"].as_str().unwrap().contains("UTF-8"));
    report.check_accounting().unwrap();
}

// ---- filter ------------------------------------------------------------------------------

const MIXED: &str = "{\"n\":5}\n{\"n\":\"five\"}\n{\"m\":1}\n{\"n\":1}\n";

fn filter_stages(policy: &str) -> String {
    pipeline(
        "",
        &format!(
            "[stages.last]\nkind = \"filter\"\ninput = \"read\"\nfield = \"n\"\nop = \"gt\"\nvalue = 2\n{policy}"
        ),
    )
}

#[test]
fn filter_mistyped_fails_by_default() {
    let dir = tempfile::tempdir().unwrap();
    let err = run_toml(dir.path(), MIXED, &filter_stages("").replace(DEAD, "")).unwrap_err();
    assert_eq!(err.stage(), Some("last"));
    assert!(
        err.to_string()
            .contains("field `n` is a string, not a number"),
        "{err}"
    );
}

#[test]
fn filter_mistyped_and_missing_skip_or_dead_letter() {
    let dir = tempfile::tempdir().unwrap();
    let report = run_toml(
        dir.path(),
        MIXED,
        &filter_stages("on_error = \"skip\"\n").replace(DEAD, ""),
    )
    .unwrap();
    assert_eq!(lines(&dir.path().join("out.ndjson")), vec![json!({"n": 5})]);
    let f = report.account("last").unwrap();
    assert_eq!(
        (f.records_in, f.records_out, f.filtered, f.skipped),
        (4, 1, 1, 2)
    );
    report.check_accounting().unwrap();

    let dir = tempfile::tempdir().unwrap();
    let report = run_toml(dir.path(), MIXED, &filter_stages(DL)).unwrap();
    assert_eq!(lines(&dir.path().join("out.ndjson")), vec![json!({"n": 5})]);
    assert_eq!(
        letters(dir.path()),
        vec![
            json!({"stage": "last", "error": "field `n` is a string, not a number like 2: {\"n\":\"five\"}", "record": {"n": "five"}, "file": null, "line": null}),
            json!({"stage": "last", "error": "record has no field `n` to compare: {\"m\":1}", "record": {"m": 1}, "file": null, "line": null}),
        ]
    );
    let f = report.account("last").unwrap();
    assert_eq!((f.filtered, f.dead_lettered), (1, 2));
    report.check_accounting().unwrap();
}

// ---- select ------------------------------------------------------------------------------

fn select_stages(extra: &str) -> String {
    pipeline(
        "",
        &format!("[stages.last]\nkind = \"select\"\ninput = \"read\"\nfields = [\"n\"]\n{extra}"),
    )
}

#[test]
fn select_missing_omit_null_error() {
    let input = "{\"n\":1,\"x\":2}\n{\"x\":3}\n";
    let dir = tempfile::tempdir().unwrap();
    run_toml(dir.path(), input, &select_stages("").replace(DEAD, "")).unwrap();
    assert_eq!(
        lines(&dir.path().join("out.ndjson")),
        vec![json!({"n": 1}), json!({})]
    );
    run_toml(
        dir.path(),
        input,
        &select_stages("missing = \"null\"\n").replace(DEAD, ""),
    )
    .unwrap();
    assert_eq!(
        lines(&dir.path().join("out.ndjson")),
        vec![json!({"n": 1}), json!({"n": null})]
    );
    let err = run_toml(
        dir.path(),
        input,
        &select_stages("missing = \"error\"\n").replace(DEAD, ""),
    )
    .unwrap_err();
    assert_eq!(err.stage(), Some("last"));
    assert!(err.to_string().contains("no field `n` to select"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let report = run_toml(
        dir.path(),
        input,
        &select_stages(&format!("missing = \"error\"\n{DL}")),
    )
    .unwrap();
    assert_eq!(lines(&dir.path().join("out.ndjson")), vec![json!({"n": 1})]);
    assert_eq!(
        letters(dir.path()),
        vec![
            json!({"stage": "last", "error": "record has no field `n` to select: {\"x\":3}", "record": {"x": 3}, "file": null, "line": null})
        ]
    );
    let s = report.account("last").unwrap();
    assert_eq!((s.records_in, s.records_out, s.dead_lettered), (2, 1, 1));
    report.check_accounting().unwrap();
}

// ---- window ------------------------------------------------------------------------------

#[test]
fn window_bad_time_is_dead_lettered() {
    let input = "{\"t\":0,\"k\":\"a\"}\n{\"t\":\"soon\",\"k\":\"a\"}\n{\"k\":\"a\"}\n{\"t\":500,\"k\":\"a\"}\n";
    let dir = tempfile::tempdir().unwrap();
    let report = run_toml(
        dir.path(),
        input,
        &pipeline(
            "",
            &format!(
                "[stages.last]\nkind = \"window\"\ninput = \"read\"\ntime_field = \"t\"\nkey_field = \"k\"\ntumbling = \"1s\"\naggregate = {{ n = \"count\" }}\n{DL}"
            ),
        ),
    )
    .unwrap();
    let out = lines(&dir.path().join("out.ndjson"));
    assert_eq!(out.len(), 1);
    assert_eq!(out[0]["n"], 2);
    let got = letters(dir.path());
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got[0]["stage"], "last");
    assert_eq!(got[0]["record"], json!({"t": "soon", "k": "a"}));
    assert_eq!(got[1]["record"], json!({"k": "a"}));
    assert!(got[1]["error"]
        .as_str()
        .unwrap()
        .contains("no time field `t`"));
    let w = report.account("last").unwrap();
    assert_eq!((w.records_in, w.dead_lettered), (4, 2));
    report.check_accounting().unwrap();
}

// ---- typed try_map -----------------------------------------------------------------------

fn parse(s: String) -> Result<u32, std::num::ParseIntError> {
    s.parse::<u32>()
}

fn words() -> Vec<String> {
    ["1", "x", "3", "", "5"].map(String::from).to_vec()
}

#[test]
fn typed_try_map_each_policy() {
    let p = Pipeline::new();
    p.source("s", words())
        .try_map(parse)
        .name("parse")
        .for_each(|_| {});
    let err = p.run().unwrap_err();
    assert_eq!(err.stage(), Some("parse"));

    let p = Pipeline::new();
    let out = p
        .source("s", words())
        .try_map(parse)
        .on_error(OnError::Skip)
        .name("parse")
        .collect();
    let report = p.run().unwrap();
    assert_eq!(out.take(), vec![1, 3, 5]);
    let a = report.account("parse").unwrap();
    assert_eq!((a.records_in, a.records_out, a.skipped), (5, 3, 2));
    report.check_accounting().unwrap();

    let p = Pipeline::new();
    let (dl, letters) = p.dead_letters("bad");
    let bad = letters.collect();
    let out = p
        .source("s", words())
        .try_map(parse)
        .on_error(OnError::DeadLetter(dl.clone()))
        .name("parse")
        .map(|n| vec![n; n as usize])
        .try_flat_map(|v: Vec<u32>| if v.len() > 3 { Err("long") } else { Ok(v) })
        .on_error(OnError::DeadLetter(dl))
        .name("expand")
        .collect();
    let report = watchdog(move || p.run()).unwrap();
    assert_eq!(out.take(), vec![1, 3, 3, 3]);
    let bad: Vec<DeadLetter> = bad.take();
    let shown: Vec<(String, Option<Value>)> = bad
        .iter()
        .map(|l| (l.stage.clone(), l.record.clone()))
        .collect();
    assert_eq!(
        shown,
        vec![
            ("parse".into(), Some(json!("x"))),
            ("parse".into(), Some(json!(""))),
            ("expand".into(), Some(json!([5, 5, 5, 5, 5]))),
        ]
    );
    assert_eq!(bad[0].error, "invalid digit found in string");
    let e = report.account("expand").unwrap();
    assert_eq!((e.records_in, e.records_out, e.dead_lettered), (3, 4, 1));
    report.check_accounting().unwrap();
}

// ---- the dead-letter stream's end --------------------------------------------------------

#[test]
fn a_failing_dead_letter_stage_fails_the_run_without_a_hang() {
    let dir = tempfile::tempdir().unwrap();
    let mut input = String::new();
    for i in 0..5000 {
        input.push_str(&format!("{{\"n\":{i}}}\nnot json {i}\n"));
    }
    // ENOSPC on every write.
    let text = read_stages(DL, 1).replace("path = \"dead.ndjson\"", "path = \"/dev/full\"");
    let err = run_toml(dir.path(), &input, &text).unwrap_err();
    assert_eq!(err.stage(), Some("dead"), "{err}");
}

#[test]
fn an_early_stop_with_letters_pending_ends_and_keeps_them() {
    let p = Pipeline::new();
    let (dl, letters) = p.dead_letters("bad");
    let bad = letters.collect();
    let out = p
        .source("n", 0u64..)
        .try_map(|n| if n % 2 == 1 { Err("odd") } else { Ok(n) })
        .on_error(OnError::DeadLetter(dl))
        .name("even")
        .limit(100)
        .collect();
    let report = watchdog(move || p.run()).unwrap();
    assert_eq!(out.take().len(), 100);
    let sent = report.account("even").unwrap().dead_lettered;
    assert!(sent >= 99, "{sent}");
    assert_eq!(bad.take().len() as u64, sent, "every letter sent arrived");
    report.check_accounting().unwrap();
}

#[test]
fn a_cancelled_run_with_a_blocked_letter_sender_ends() {
    // The dead-letter sink is slow; the main side fills the letter channel and blocks on it,
    // then a downstream failure cancels the run.
    let p = Pipeline::new();
    let (dl, letters) = p.dead_letters("bad");
    // Slow, not a synchronisation: the letters outpace the sink, so senders block.
    letters.for_each(|_| std::thread::sleep(Duration::from_micros(50)));
    p.source("n", 0u64..100_000)
        .try_map(|n| if n < 5000 { Err("early") } else { Ok(n) })
        .on_error(OnError::DeadLetter(dl))
        .try_map(|n| if n == 5000 { Err("boom") } else { Ok(n) })
        .name("boom")
        .for_each(|_| {});
    let err = watchdog(move || p.run()).unwrap_err();
    assert_eq!(err.stage(), Some("boom"), "{err}");
}

// ---- max_dead_letters --------------------------------------------------------------------

fn with_limit(limit: &str) -> String {
    format!(
        "[options]\nmax_dead_letters = {limit}\n\n{}",
        read_stages(DL, 1)
    )
}

fn one_in(every: usize, n: usize) -> String {
    let mut s = String::new();
    for i in 0..n {
        if i % every == every - 1 {
            s.push_str("garbage\n");
        } else {
            s.push_str(&format!("{{\"n\":{i}}}\n"));
        }
    }
    s
}

#[test]
fn max_dead_letters_count_and_ratio() {
    let dir = tempfile::tempdir().unwrap();
    // 10 bad lines of 1000.
    let input = one_in(100, 1000);
    let report = run_toml(dir.path(), &input, &with_limit("10")).unwrap();
    assert_eq!(report.account("read").unwrap().dead_lettered, 10);
    report.check_accounting().unwrap();
    match run_toml(dir.path(), &input, &with_limit("9")).unwrap_err() {
        Error::TooManyDeadLetters {
            count,
            limit,
            stage,
        } => {
            assert_eq!((count, limit.as_str(), stage.as_str()), (10, "9", "read"));
        }
        other => panic!("expected TooManyDeadLetters, got {other}"),
    }
    // 1 % of 5000: under 0.02, over 0.005 (found per letter once 1000 records were read).
    let input = one_in(100, 5000);
    let report = run_toml(dir.path(), &input, &with_limit("0.02")).unwrap();
    assert_eq!(report.account("read").unwrap().dead_lettered, 50);
    let err = run_toml(dir.path(), &input, &with_limit("0.005")).unwrap_err();
    assert!(
        matches!(&err, Error::TooManyDeadLetters { stage, .. } if stage == "read"),
        "{err}"
    );
    // Under 1000 records the ratio is checked at the end: 10 of 500 is over 1 %.
    let err = run_toml(dir.path(), &one_in(50, 500), &with_limit("0.01")).unwrap_err();
    assert!(matches!(err, Error::TooManyDeadLetters { .. }), "{err}");
}

// ---- validation --------------------------------------------------------------------------

fn config_error(text: &str) -> (ConfigErrorKind, Option<usize>, Option<String>, String) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("in.ndjson"), "").unwrap();
    let file = dir.path().join("p.toml");
    std::fs::write(&file, text).unwrap();
    let e = PipelineSpec::from_file(&file)
        .and_then(|s| s.build().map(|_| s))
        .expect_err("a config error");
    assert!(e.to_string().contains("p.toml"), "names the file: {e}");
    (
        e.kind(),
        e.line,
        e.stage().map(str::to_string),
        e.to_string(),
    )
}

#[test]
fn policy_keys_are_validated_with_file_line_and_stage() {
    use ConfigErrorKind::*;
    let read = "[stages.read]\nkind = \"ndjson.read\"\npath = \"in.ndjson\"\n";
    let out = "[stages.out]\nkind = \"ndjson.write\"\ninput = \"read\"\npath = \"out.ndjson\"\n";
    let case =
        |extra_read: &str, tail: &str| config_error(&format!("{read}{extra_read}\n{out}\n{tail}"));
    let (k, line, stage, msg) = case("on_error = \"ignore\"\n", "");
    assert_eq!(
        (k, line, stage.as_deref()),
        (BadValue, Some(4), Some("read"))
    );
    assert!(
        msg.contains("expected \"fail\", \"skip\" or \"dead_letter\""),
        "{msg}"
    );
    let (k, _, stage, msg) = case("on_error = \"dead_letter\"\n", "");
    assert_eq!((k, stage.as_deref()), (MissingParameter, Some("read")));
    assert!(msg.contains("dead_letter"), "{msg}");
    let (k, line, _, msg) = case("dead_letter = \"dead\"\n", DEAD);
    assert_eq!((k, line), (Wiring, Some(4)));
    assert!(msg.contains("needs on_error = \"dead_letter\""), "{msg}");
    let (k, line, _, msg) = case(
        "on_error = \"dead_letter\"\ndead_letter = \"nowhere\"\n",
        "",
    );
    assert_eq!((k, line), (UnknownInput, Some(5)));
    assert!(msg.contains("no stage named \"nowhere\""), "{msg}");
    // A misspelt target is reported as such, not as the intended target lacking an `input`.
    let (k, line, stage, msg) = case(
        "on_error = \"dead_letter\"\ndead_letter = \"deadd\"\n",
        DEAD,
    );
    assert_eq!(
        (k, line, stage.as_deref()),
        (UnknownInput, Some(5), Some("read"))
    );
    assert!(
        msg.contains("no stage named \"deadd\" (stages: dead, out, read)"),
        "{msg}"
    );
    // The target has an input.
    let (k, _, stage, msg) = case(
        DL,
        "[stages.dead]\nkind = \"ndjson.write\"\ninput = \"read\"\npath = \"d\"\n",
    );
    assert_eq!((k, stage.as_deref()), (Wiring, Some("dead")));
    assert!(msg.contains("receives the dead letters of `read`"), "{msg}");
    // The target is a source.
    let (k, _, stage, msg) = case(
        DL,
        "[stages.dead]\nkind = \"ndjson.read\"\npath = \"in.ndjson\"\n",
    );
    assert_eq!((k, stage.as_deref()), (Wiring, Some("dead")));
    assert!(msg.contains("is a source"), "{msg}");
    // A stage on the dead-letter side sends dead letters.
    let (k, _, stage, msg) = case(
        DL,
        "[stages.dead]\nkind = \"select\"\nfields = [\"raw\"]\non_error = \"dead_letter\"\ndead_letter = \"dead\"\n\
         [stages.dead_out]\nkind = \"ndjson.write\"\ninput = \"dead\"\npath = \"d\"\n",
    );
    assert_eq!((k, stage.as_deref()), (Cycle, Some("dead")));
    assert!(msg.contains("dead letters of dead letters"), "{msg}");
    // Kinds without record errors.
    for (kind, params) in [
        ("limit", "n = 1\n"),
        ("count", "key = \"n\"\n"),
        ("ndjson.write", "path = \"o\"\n"),
    ] {
        let text = format!(
            "{read}\n[stages.x]\nkind = \"{kind}\"\ninput = \"read\"\n{params}on_error = \"skip\"\n\
             [stages.out]\nkind = \"ndjson.write\"\ninput = \"x\"\npath = \"o2\"\n"
        );
        let text = if kind == "ndjson.write" {
            format!("{read}\n[stages.x]\nkind = \"{kind}\"\ninput = \"read\"\n{params}on_error = \"skip\"\n")
        } else {
            text
        };
        let (k, _, stage, msg) = config_error(&text);
        assert_eq!((k, stage.as_deref()), (BadValue, Some("x")), "{msg}");
        assert!(
            msg.contains(&format!("a `{kind}` stage takes no `on_error`")),
            "{msg}"
        );
        // Nor does it list the policy keys among those it knows.
        let typo = text.replace("on_error = \"skip\"", "retries = 3");
        let (k, _, _, msg) = config_error(&typo);
        assert_eq!(k, UnknownParameter, "{msg}");
        assert!(msg.contains("unknown parameter `retries`"), "{msg}");
        assert!(
            !msg.contains("on_error") && !msg.contains("dead_letter"),
            "{msg}"
        );
    }
    let (k, _, _, msg) = config_error(&format!(
        "[options]\nmax_dead_letters = \"many\"\n{read}{out}"
    ));
    assert_eq!(k, BadValue);
    assert!(msg.contains("max_dead_letters"), "{msg}");
    let (k, _, _, _) = config_error(&format!(
        "{read}\n[stages.s]\nkind = \"select\"\ninput = \"read\"\nfields = [\"a\"]\nmissing = \"maybe\"\n{}",
        out.replace("input = \"read\"", "input = \"s\"")
    ));
    assert_eq!(k, BadValue);
}

#[test]
fn a_clean_run_accounts_for_every_record() {
    let p = Pipeline::new();
    let out = p
        .source("n", 0u64..10_000)
        .map(|x| x + 1)
        .name("inc")
        .filter(|x| x % 3 == 0)
        .name("thirds")
        .rebalance(2)
        .flat_map(|x| vec![x, x])
        .name("twice")
        .limit(1000)
        .name("cap")
        .collect();
    let report = watchdog(move || p.run()).unwrap();
    assert_eq!(out.take().len(), 1000);
    report.check_accounting().unwrap();
    let t = report.account("thirds").unwrap();
    assert_eq!(t.records_in, t.records_out + t.filtered);
    let cap = report.account("cap").unwrap();
    assert_eq!(cap.records_out, 1000);
    let mut f = std::fs::File::create(tempfile::tempdir().unwrap().path().join("x")).unwrap();
    writeln!(f, "{report}").unwrap();
}

// ---- exec --------------------------------------------------------------------------------

fn exec_stages(policy: &str) -> String {
    pipeline(
        "",
        &format!(
            "[stages.last]\nkind = \"exec\"\ninput = \"read\"\ncommand = [\"sh\", \"-c\", \"cat; echo 'not json'; echo '[1]'; echo '{{\\\"n\\\":9}}'\"]\n{policy}"
        ),
    )
}

#[test]
fn exec_invalid_output_lines_meet_the_policy() {
    let input = "{\"n\":1}\n{\"n\":2}\n";
    let dir = tempfile::tempdir().unwrap();
    let err = run_toml(dir.path(), input, &exec_stages("").replace(DEAD, "")).unwrap_err();
    match &err {
        Error::Record {
            stage, location, ..
        } => {
            assert_eq!((stage.as_str(), location.line), ("last", 3), "{err}");
        }
        other => panic!("expected a record error, got {other}"),
    }

    let report = run_toml(
        dir.path(),
        input,
        &exec_stages("on_error = \"skip\"\n").replace(DEAD, ""),
    )
    .unwrap();
    assert_eq!(
        lines(&dir.path().join("out.ndjson")),
        vec![json!({"n": 1}), json!({"n": 2}), json!({"n": 9})]
    );
    let e = report.account("last").unwrap();
    assert_eq!((e.records_in, e.records_out, e.skipped), (2, 3, 2));
    report.check_accounting().unwrap();

    let dir = tempfile::tempdir().unwrap();
    let report = run_toml(dir.path(), input, &exec_stages(DL)).unwrap();
    assert_eq!(lines(&dir.path().join("out.ndjson")).len(), 3);
    let got = letters(dir.path());
    assert_eq!(got.len(), 2);
    assert_eq!(got[0]["stage"], "last");
    assert_eq!(got[0]["raw"], "not json");
    assert_eq!(got[0]["line"], 3);
    assert!(got[0]["file"].is_null());
    assert_eq!(got[1]["raw"], "[1]");
    assert_eq!(got[1]["line"], 4);
    assert!(
        got[1]["error"].as_str().unwrap().contains("object"),
        "{got:?}"
    );
    let e = report.account("last").unwrap();
    assert_eq!((e.records_out, e.dead_lettered), (3, 2));
    report.check_accounting().unwrap();
}

/// An exec child's stdout line over `max_line_bytes` meets the policy too: the letter carries
/// its first `max_line_bytes` bytes, the rest of it (here many pipe reads' worth) is dropped,
/// and the lines after it are read as usual.
#[test]
fn an_exec_output_line_over_the_cap_meets_the_policy() {
    let input = "{\"n\":1}\n{\"n\":2}\n";
    let stages = |policy: &str| {
        pipeline(
            "",
            &format!(
                "[stages.last]\nkind = \"exec\"\ninput = \"read\"\nmax_line_bytes = 1024\ncommand = [\"sh\", \"-c\", \"cat; head -c 300000 /dev/zero | tr '\\\\0' x; echo; echo '{{\\\"n\\\":9}}'\"]\n{policy}"
            ),
        )
    };
    let dir = tempfile::tempdir().unwrap();
    let err = run_toml(dir.path(), input, &stages("").replace(DEAD, "")).unwrap_err();
    match &err {
        Error::Record {
            stage,
            location,
            message,
        } => {
            assert_eq!((stage.as_str(), location.line), ("last", 3), "{err}");
            assert_eq!(message, "line longer than max_line_bytes (1024)");
        }
        other => panic!("expected a record error, got {other}"),
    }

    let report = run_toml(
        dir.path(),
        input,
        &stages("on_error = \"skip\"\n").replace(DEAD, ""),
    )
    .unwrap();
    assert_eq!(
        lines(&dir.path().join("out.ndjson")),
        vec![json!({"n": 1}), json!({"n": 2}), json!({"n": 9})]
    );
    let e = report.account("last").unwrap();
    assert_eq!((e.records_in, e.records_out, e.skipped), (2, 3, 1));
    report.check_accounting().unwrap();

    let dir = tempfile::tempdir().unwrap();
    let report = run_toml(dir.path(), input, &stages(DL)).unwrap();
    assert_eq!(lines(&dir.path().join("out.ndjson")).len(), 3);
    let got = letters(dir.path());
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0]["stage"], "last");
    assert_eq!(got[0]["line"], 3);
    assert_eq!(got[0]["raw"], "x".repeat(1024));
    assert_eq!(got[0]["error"], "line longer than max_line_bytes (1024)");
    let e = report.account("last").unwrap();
    assert_eq!((e.records_out, e.dead_lettered), (3, 1));
    report.check_accounting().unwrap();
}

#[test]
fn the_byte_path_cuts_bad_lines_out_of_its_blocks() {
    // Spaces survive only on the byte path (the value path re-serialises).
    let mut input = String::new();
    let mut bad = Vec::new();
    for i in 1..=3000u64 {
        if i % 97 == 0 {
            input.push_str(&format!("{{\"n\": {i}, broken\n"));
            bad.push(i);
        } else if i % 101 == 0 {
            input.push_str("\u{1}\u{2} not json\n");
            bad.push(i);
        } else {
            input.push_str(&format!("{{\"n\": {i}}}\n"));
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[stages.read]\nkind = \"ndjson.read\"\npath = \"in.ndjson\"\n{DL}\n\
         [stages.child]\nkind = \"exec\"\ninput = \"read\"\ncommand = [\"cat\"]\n\n\
         [stages.out]\nkind = \"ndjson.write\"\ninput = \"child\"\npath = \"out.ndjson\"\n\n{DEAD}"
    );
    let report = run_toml(dir.path(), &input, &text).unwrap();
    let out = std::fs::read_to_string(dir.path().join("out.ndjson")).unwrap();
    let good: Vec<u64> = (1..=3000).filter(|i| !bad.contains(i)).collect();
    let expect: String = good.iter().map(|i| format!("{{\"n\": {i}}}\n")).collect();
    assert_eq!(
        out, expect,
        "the byte path keeps the good lines as they are"
    );
    let got = letters(dir.path());
    let lines_got: Vec<u64> = got.iter().map(|l| l["line"].as_u64().unwrap()).collect();
    assert_eq!(lines_got, bad);
    assert_eq!(got[0]["raw"], "{\"n\": 97, broken");
    assert_eq!(got[0]["stage"], "read");
    let read = report.stage("read").unwrap();
    assert_eq!(read.dead_lettered, bad.len() as u64);
    let read = report.account("read").unwrap();
    assert_eq!(
        (read.records_in, read.records_out, read.dead_lettered),
        (3000, good.len() as u64, bad.len() as u64)
    );
    assert_eq!(
        report.account("out").unwrap().records_out,
        good.len() as u64
    );
    report.check_accounting().unwrap();
}

#[test]
fn words_without_their_field_are_dead_lettered() {
    let input = "{\"line\":\"a b\"}\n{\"text\":\"c\"}\n{\"line\":7}\n{\"line\":\"d\"}\n";
    let dir = tempfile::tempdir().unwrap();
    let report = run_toml(
        dir.path(),
        input,
        &pipeline(
            "",
            &format!("[stages.last]\nkind = \"words\"\ninput = \"read\"\n{DL}"),
        ),
    )
    .unwrap();
    assert_eq!(
        lines(&dir.path().join("out.ndjson")),
        vec![
            json!({"word": "a"}),
            json!({"word": "b"}),
            json!({"word": "d"})
        ]
    );
    let got = letters(dir.path());
    assert_eq!(
        got.iter().map(|l| l["record"].clone()).collect::<Vec<_>>(),
        vec![json!({"text": "c"}), json!({"line": 7})]
    );
    let w = report.account("last").unwrap();
    assert_eq!((w.records_in, w.records_out, w.dead_lettered), (4, 3, 2));
    report.check_accounting().unwrap();
}

#[test]
fn an_exec_child_that_exits_non_zero_still_fails_under_dead_letter() {
    let dir = tempfile::tempdir().unwrap();
    let text = pipeline(
        "",
        &format!(
            "[stages.last]\nkind = \"exec\"\ninput = \"read\"\ncommand = [\"sh\", \"-c\", \"cat >/dev/null; echo oops; exit 3\"]\n{DL}"
        ),
    );
    let err = run_toml(dir.path(), "{\"n\":1}\n", &text).unwrap_err();
    assert_eq!(err.stage(), Some("last"), "{err}");
    assert!(err.to_string().contains('3'), "{err}");
}

#[test]
fn a_dead_letter_handle_of_another_pipeline_is_refused() {
    let other = Pipeline::new();
    let (dl, letters) = other.dead_letters("bad");
    letters.for_each(|_| {});
    let p = Pipeline::new();
    p.source("s", vec!["x".to_string()])
        .try_map(parse)
        .on_error(OnError::DeadLetter(dl))
        .name("parse")
        .for_each(|_| {});
    let err = watchdog(move || p.run()).unwrap_err();
    assert!(
        matches!(&err, Error::Build(m) if m.contains("dead-letter stream of another pipeline")),
        "{err}"
    );
}

#[test]
fn letters_from_four_instances_all_arrive_through_a_full_stream() {
    // More letters than the stream holds (1,024), from four instances at once, into a sink
    // slower than they are sent: senders block under backpressure, and the stream ends only
    // after the last sender's thread did, with every letter.
    let p = Pipeline::new();
    let (dl, letters) = p.dead_letters("bad");
    let got = letters
        .inspect(|_| std::thread::yield_now())
        .map(|l: DeadLetter| l.record.unwrap().as_u64().unwrap())
        .collect();
    let out = p
        .source("n", 0u64..20_000)
        .rebalance(4)
        .try_map(|n| if n % 3 == 0 { Err("third") } else { Ok(n) })
        .on_error(OnError::DeadLetter(dl))
        .name("thirds")
        .collect();
    let report = watchdog(move || p.run()).unwrap();
    assert_eq!(out.take().len(), 20_000 - 6_667);
    let mut got = got.take();
    got.sort_unstable();
    assert_eq!(got, (0..20_000).step_by(3).collect::<Vec<u64>>());
    assert_eq!(report.account("thirds").unwrap().dead_lettered, 6_667);
    report.check_accounting().unwrap();
}
