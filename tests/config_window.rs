//! The TOML `window` stage: results, late routing, error policies and parameter errors.

use std::io::Write;
use std::path::Path;

use millrace::config::{ConfigError, ConfigErrorKind, PipelineSpec};
use millrace::Error;
use serde_json::{json, Value};

fn write_ndjson(path: &Path, records: &[Value]) {
    let mut f = std::fs::File::create(path).unwrap();
    for v in records {
        writeln!(f, "{v}").unwrap();
    }
}

fn read_ndjson(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Runs `read -> <window stage "win"> -> out` (plus `extra` stages) over `input`; returns the
/// run's result, the output records and the records of `late.ndjson` when a stage writes it.
fn run_window(
    input: &[Value],
    window: &str,
    extra: &str,
) -> (
    Result<millrace::RunReport, millrace::Error>,
    Vec<Value>,
    Vec<Value>,
) {
    let dir = tempfile::tempdir().unwrap();
    write_ndjson(&dir.path().join("in.ndjson"), input);
    let text = format!(
        r#"
[options]
batch_size = 1
watermark_every = 1

[stages.read]
kind = "ndjson.read"
path = "in.ndjson"

[stages.win]
kind = "window"
input = "read"
{window}

[stages.out]
kind = "ndjson.write"
input = "win"
path = "out.ndjson"
{extra}
"#
    );
    let run = PipelineSpec::from_str(&text, dir.path().join("p.toml"))
        .unwrap()
        .build()
        .unwrap()
        .run();
    let out = read_ndjson(&dir.path().join("out.ndjson"));
    let late = read_ndjson(&dir.path().join("late.ndjson"));
    (run, out, late)
}

fn sorted(mut v: Vec<Value>) -> Vec<Value> {
    v.sort_by_key(|r| (r["key"].to_string(), r["window_start"].as_i64()));
    v
}

#[test]
fn tumbling_count_sum_min_max_mean_per_key() {
    let input = vec![
        json!({"t": 0, "user": "a", "ms": 10}),
        json!({"t": 9_999, "user": "a", "ms": 30}),
        json!({"t": 10_000, "user": "a", "ms": 5}),
        json!({"t": 4_000, "user": "b", "ms": 1.5}),
    ];
    let (run, out, _) = run_window(
        &input,
        r#"time_field = "t"
key_field = "user"
tumbling = "10s"
max_out_of_orderness = "10s"
aggregate = { n = "count", total = "sum(ms)", low = "min(ms)", high = "max(ms)", avg = "mean(ms)" }"#,
        "",
    );
    let report = run.unwrap();
    assert_eq!(
        sorted(out),
        vec![
            json!({"key": "a", "window_start": 0, "window_end": 10_000, "n": 2, "total": 40, "low": 10, "high": 30, "avg": 20.0}),
            json!({"key": "a", "window_start": 10_000, "window_end": 20_000, "n": 1, "total": 5, "low": 5, "high": 5, "avg": 5.0}),
            json!({"key": "b", "window_start": 0, "window_end": 10_000, "n": 1, "total": 1.5, "low": 1.5, "high": 1.5, "avg": 1.5}),
        ],
        "the event at exactly 10 s is in [10 s, 20 s) only"
    );
    assert_eq!(report.stage("win").unwrap().records_in, 4);
}

#[test]
fn rfc3339_times_sliding_and_no_key_field() {
    let input = vec![
        json!({"ts": "1970-01-01T00:00:01Z"}),
        json!({"ts": "1970-01-01T00:00:06.500+00:00"}),
    ];
    let (run, out, _) = run_window(
        &input,
        r#"time_field = "ts"
sliding = { size = "10s", slide = "5s" }
max_out_of_orderness = "10s"
aggregate = { n = "count" }"#,
        "",
    );
    run.unwrap();
    let got: Vec<(i64, u64)> = sorted(out)
        .iter()
        .map(|r| {
            assert_eq!(r["key"], Value::Null, "no key_field: one key, null");
            (
                r["window_start"].as_i64().unwrap(),
                r["n"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(got, vec![(-5_000, 1), (0, 2), (5_000, 1)]);
}

#[test]
fn sessions_merge_and_report_their_bounds() {
    let input = vec![
        json!({"t": 0, "k": 1}),
        json!({"t": 15_000, "k": 1}),
        json!({"t": 9_999, "k": 1}),
        json!({"t": 100_000, "k": 1}),
        json!({"t": 110_000, "k": 1}),
    ];
    let (run, out, _) = run_window(
        &input,
        r#"time_field = "t"
key_field = "k"
session = { gap = "10s" }
max_out_of_orderness = "30s"
aggregate = { n = "count" }"#,
        "",
    );
    run.unwrap();
    let got: Vec<(i64, i64, u64)> = sorted(out)
        .iter()
        .map(|r| {
            (
                r["window_start"].as_i64().unwrap(),
                r["window_end"].as_i64().unwrap(),
                r["n"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![(0, 25_000, 3), (100_000, 110_000, 1), (110_000, 120_000, 1)],
        "9.999 s bridges [0, 10 s) and [15 s, 25 s); [100 s, 110 s) and [110 s, 120 s) touch but do not overlap"
    );
}

const LATE_INPUT: &[(i64, &str)] = &[(1, "a"), (25, "a"), (5, "a"), (9, "b"), (26, "a")];

fn late_input() -> Vec<Value> {
    LATE_INPUT
        .iter()
        .map(|(t, k)| json!({"t": t, "k": k}))
        .collect()
}

const LATE_WINDOW: &str = r#"time_field = "t"
key_field = "k"
tumbling = "10ms"
aggregate = { n = "count" }"#;

#[test]
fn late_records_go_to_the_named_stage_and_are_counted() {
    let (run, out, late) = run_window(
        &late_input(),
        &format!("{LATE_WINDOW}\nlate = \"late_out\""),
        "[stages.late_out]\nkind = \"ndjson.write\"\npath = \"late.ndjson\"\n",
    );
    let report = run.unwrap();
    assert_eq!(
        late,
        vec![json!({"t": 5, "k": "a"}), json!({"t": 9, "k": "b"})],
        "late records reach the late stage unchanged"
    );
    assert_eq!(out.len(), 2, "[0,10) and [20,30) for key a: {out:?}");
    assert_eq!(report.stage("win").unwrap().late, 2);
    assert_eq!(report.stage("late_out").unwrap().records_out, 2);
}

#[test]
fn late_records_are_dropped_and_counted_by_default() {
    let (run, out, _) = run_window(&late_input(), LATE_WINDOW, "");
    let report = run.unwrap();
    assert_eq!(out.len(), 2);
    assert_eq!(report.stage("win").unwrap().late, 2);
    assert!(report.to_string().contains("2 late"), "{report}");
}

#[test]
fn late_error_fails_the_run_naming_the_stage_and_record() {
    let (run, _, _) = run_window(
        &late_input(),
        &format!("{LATE_WINDOW}\nlate = \"error\""),
        "",
    );
    let e = run.unwrap_err();
    // The window's results stage (`win.json`) fails; the message names the window.
    assert!(
        matches!(&e, Error::Operator { stage, .. } if stage.split('.').next() == Some("win")),
        "{e:?}"
    );
    assert!(
        e.to_string().contains("window `win`: a record at 5 ms"),
        "{e}"
    );
}

#[test]
fn a_record_without_a_usable_time_fails_with_its_position_or_is_skipped() {
    let input = vec![
        json!({"t": 1, "v": 1}),
        json!({"t": "yesterday", "v": 2}),
        json!({"v": 3}),
        json!({"t": 2, "v": "x"}),
        json!({"t": 3, "v": 4}),
    ];
    let window = r#"time_field = "t"
tumbling = "1s"
aggregate = { total = "sum(v)" }"#;
    let (run, _, _) = run_window(&input, window, "");
    let e = run.unwrap_err();
    assert!(
        matches!(&e, Error::Operator { stage, .. } if stage == "win"),
        "{e:?}"
    );
    let e = e.to_string();
    assert!(e.contains("input record 2 of instance 0"), "{e}");
    assert!(
        e.contains("\"yesterday\""),
        "the reason shows the value: {e}"
    );

    let (run, out, _) = run_window(&input, &format!("{window}\non_error = \"skip\""), "");
    let report = run.unwrap();
    assert_eq!(
        out,
        vec![json!({"key": null, "window_start": 0, "window_end": 1000, "total": 5})]
    );
    assert_eq!(report.stage("win").unwrap().skipped, 3);
}

#[test]
fn allowed_lateness_re_emits_an_update() {
    let input = vec![json!({"t": 1}), json!({"t": 12}), json!({"t": 3})];
    let (run, out, _) = run_window(
        &input,
        r#"time_field = "t"
tumbling = "10ms"
allowed_lateness = "20ms"
aggregate = { n = "count" }"#,
        "",
    );
    run.unwrap();
    assert_eq!(
        out,
        vec![
            json!({"key": null, "window_start": 0, "window_end": 10, "n": 1}),
            json!({"key": null, "window_start": 0, "window_end": 10, "n": 2, "update": true}),
            json!({"key": null, "window_start": 10, "window_end": 20, "n": 1}),
        ]
    );
}

#[test]
fn parallel_window_matches_serial() {
    let input: Vec<Value> = (0..3_000)
        .map(|i| json!({"t": (i * 7919) % 60_000, "k": i % 17, "v": i}))
        .collect();
    let window = |p: usize| {
        format!(
            "time_field = \"t\"\nkey_field = \"k\"\ntumbling = \"5s\"\nmax_out_of_orderness = \"60s\"\nparallelism = {p}\naggregate = {{ n = \"count\", total = \"sum(v)\" }}"
        )
    };
    let (r1, one, _) = run_window(&input, &window(1), "");
    let (r2, two, _) = run_window(&input, &window(2), "");
    r1.unwrap();
    r2.unwrap();
    assert_eq!(one.len(), 17 * 12);
    assert_eq!(sorted(one), sorted(two));
}

fn config_err(window: &str, extra: &str) -> ConfigError {
    let text = format!(
        "[stages.read]\nkind = \"ndjson.read\"\npath = \"-\"\n\n[stages.win]\nkind = \"window\"\ninput = \"read\"\n{window}\n\n[stages.out]\nkind = \"ndjson.write\"\ninput = \"win\"\npath = \"-\"\n{extra}"
    );
    match PipelineSpec::from_str(&text, "/tmp/w.toml").and_then(|s| s.build().map(|_| s)) {
        Ok(_) => panic!("expected an error for:\n{text}"),
        Err(e) => e,
    }
}

/// Kind, line and stage of the error for `window` (the window's own lines start at line 8).
fn what(window: &str, extra: &str) -> (ConfigErrorKind, Option<usize>, Option<String>) {
    let e = config_err(window, extra);
    (e.kind(), e.line, e.stage().map(str::to_string))
}

#[test]
fn window_parameter_errors_name_the_line_and_what_was_expected() {
    use ConfigErrorKind::{BadValue, MissingParameter, UnknownInput, UnknownParameter, Wiring};
    let win = |line| (line, Some("win".to_string()));
    let of = |(kind, line, stage)| (kind, (line, stage));
    let agg = "aggregate = { n = \"count\" }";
    let e = config_err(&format!("time_field = \"t\"\n{agg}"), "");
    assert_eq!(e.kind(), MissingParameter, "{e}");
    assert!(
        e.to_string()
            .starts_with("/tmp/w.toml:5: stage `win`: missing parameter `tumbling`: expected exactly one of `tumbling"),
        "{e}"
    );
    assert_eq!(
        of(what(
            &format!("time_field = \"t\"\ntumbling = \"10s\"\nsession = {{ gap = \"1s\" }}\n{agg}"),
            "",
        )),
        (BadValue, win(Some(10)))
    );
    // The full message, as a user reads it.
    let e = config_err(
        &format!("time_field = \"t\"\ntumbling = \"ten\"\n{agg}"),
        "",
    );
    assert_eq!(e.kind(), BadValue);
    assert_eq!(
        e.to_string(),
        "/tmp/w.toml:9: stage `win`: parameter `tumbling`: invalid duration \"ten\": expected e.g. \"500ms\", \"10s\", \"2m\", \"1h\", \"1d\" or \"1m30s\""
    );
    assert_eq!(
        of(what(
            &format!("time_field = \"t\"\nsliding = {{ size = \"10s\" }}\n{agg}"),
            "",
        )),
        (MissingParameter, win(Some(9)))
    );
    assert_eq!(
        of(what(
            &format!("time_field = \"t\"\nsliding = {{ size = \"10s\", slide = \"5s\", step = \"1s\" }}\n{agg}"),
            "",
        )),
        (UnknownParameter, win(Some(9)))
    );
    assert_eq!(
        of(what(
            "time_field = \"t\"\ntumbling = \"1s\"\naggregate = { n = \"median(x)\" }",
            "",
        )),
        (BadValue, win(Some(10)))
    );
    assert_eq!(
        of(what(
            "time_field = \"t\"\ntumbling = \"1s\"\naggregate = { key = \"count\" }",
            "",
        )),
        (BadValue, win(Some(10)))
    );
    let e = config_err(
        &format!("time_field = \"t\"\ntumbling = \"1s\"\n{agg}\nlate = \"nowhere\""),
        "",
    );
    assert_eq!(e.kind(), UnknownInput);
    assert_eq!(
        e.to_string(),
        "/tmp/w.toml:11: stage `win`: parameter `late`: expected \"drop\", \"error\" or a stage name, found \"nowhere\" (stages: out, read, win)"
    );
    // The late stage has an `input` of its own.
    assert_eq!(
        what(
            &format!("time_field = \"t\"\ntumbling = \"1s\"\n{agg}\nlate = \"sink\""),
            "[stages.sink]\nkind = \"ndjson.write\"\ninput = \"win\"\npath = \"-\"\n",
        ),
        (Wiring, Some(19), Some("sink".into()))
    );
    assert_eq!(
        of(what(
            &format!("time_field = \"t\"\ntumbling = \"1s\"\n{agg}\non_error = \"ignore\""),
            "",
        )),
        (BadValue, win(Some(11)))
    );
}

#[test]
fn the_bundled_window_example_runs() {
    let spec = PipelineSpec::from_file("examples/windows.toml").unwrap();
    let report = spec.build().unwrap().run().unwrap();
    let win = report.stage("per_minute").unwrap();
    assert!(win.records_in > 100);
    assert_eq!(win.late, 2, "the example data holds two late clicks");
    report.check_accounting().unwrap();
    let w = report.account("per_minute").unwrap();
    assert_eq!((w.records_in, w.late), (402, 2), "{report}");
}
