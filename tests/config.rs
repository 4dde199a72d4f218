//! The TOML layer: every kind's behaviour, and every config error naming file, line and stage.

use std::io::Write;

use millrace::config::{ConfigError, ConfigErrorKind, PipelineSpec};
use serde_json::{json, Value};

fn spec(text: &str) -> Result<PipelineSpec, ConfigError> {
    PipelineSpec::from_str(text, "/tmp/test-pipeline.toml")
}

fn config_error(text: &str) -> ConfigError {
    match spec(text).and_then(|s| s.build().map(|_| s)) {
        Ok(_) => panic!("expected an error for:\n{text}"),
        Err(e) => e,
    }
}

/// The message a user reads.
fn err(text: &str) -> String {
    config_error(text).to_string()
}

/// The error's kind, line and stage.
fn what(text: &str) -> (ConfigErrorKind, Option<usize>, Option<String>) {
    let e = config_error(text);
    (e.kind(), e.line, e.stage().map(str::to_string))
}

/// Runs a pipeline over `input` lines of NDJSON; returns the output records.
fn run_over(input: &[Value], stages: &str) -> Vec<Value> {
    let dir = tempfile::tempdir().unwrap();
    let inp = dir.path().join("in.ndjson");
    let mut f = std::fs::File::create(&inp).unwrap();
    for v in input {
        writeln!(f, "{v}").unwrap();
    }
    let out = dir.path().join("out.ndjson");
    let text = format!(
        "[stages.read]\nkind = \"ndjson.read\"\npath = {:?}\n{stages}\n[stages.out]\nkind = \"ndjson.write\"\ninput = \"last\"\npath = {:?}\n",
        inp.display().to_string(),
        out.display().to_string()
    );
    let report = PipelineSpec::from_str(&text, dir.path().join("p.toml"))
        .unwrap()
        .build()
        .unwrap()
        .run()
        .unwrap();
    report.check_accounting().unwrap();
    std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn filter_ops() {
    let input: Vec<Value> = (0..10)
        .map(|i| json!({"n": i, "s": format!("x{i}"), "tags": [i % 3]}))
        .collect();
    let n = |op: &str, v: &str| -> Vec<i64> {
        run_over(&input, &format!("[stages.last]\nkind=\"filter\"\ninput=\"read\"\nfield=\"n\"\nop=\"{op}\"\nvalue={v}\n"))
            .iter()
            .map(|r| r["n"].as_i64().unwrap())
            .collect()
    };
    assert_eq!(n("eq", "3"), vec![3]);
    assert_eq!(n("ne", "3").len(), 9);
    assert_eq!(n("lt", "3"), vec![0, 1, 2]);
    assert_eq!(n("le", "3"), vec![0, 1, 2, 3]);
    assert_eq!(n("gt", "7"), vec![8, 9]);
    assert_eq!(n("ge", "7.5"), vec![8, 9]);
    // No cross-type ordering: a number compared with a string is a record error (skipped here).
    assert_eq!(
        n("lt", "\"3\"\non_error=\"skip\""),
        Vec::<i64>::new(),
        "no cross-type ordering"
    );
    let contains = run_over(
        &input,
        "[stages.last]\nkind=\"filter\"\ninput=\"read\"\nfield=\"tags\"\nop=\"contains\"\nvalue=2\n",
    );
    assert_eq!(contains.len(), 3);
    let exists = run_over(
        &[json!({"a": 1}), json!({"b": 2})],
        "[stages.last]\nkind=\"filter\"\ninput=\"read\"\nfield=\"a\"\nop=\"exists\"\n",
    );
    assert_eq!(exists, vec![json!({"a": 1})]);
}

#[test]
fn select_keeps_only_listed_fields() {
    let out = run_over(
        &[json!({"a": 1, "b": 2, "c": 3})],
        "[stages.last]\nkind=\"select\"\ninput=\"read\"\nfields=[\"c\",\"a\",\"zz\"]\n",
    );
    // Objects are written with their keys sorted (serde_json's map).
    assert_eq!(serde_json::to_string(&out[0]).unwrap(), r#"{"a":1,"c":3}"#);
}

#[test]
fn count_orders_by_count_then_value() {
    let input: Vec<Value> = ["b", "a", "c", "b", "a", "d", "b"]
        .iter()
        .map(|w| json!({ "w": w }))
        .collect();
    let out = run_over(
        &input,
        "[stages.last]\nkind=\"count\"\ninput=\"read\"\nkey=\"w\"\nparallelism=3\n",
    );
    assert_eq!(
        out,
        vec![
            json!({"w": "b", "count": 3}),
            json!({"w": "a", "count": 2}),
            json!({"w": "c", "count": 1}),
            json!({"w": "d", "count": 1})
        ]
    );
    assert_eq!(
        serde_json::to_string(&out[0]).unwrap(),
        r#"{"count":3,"w":"b"}"#
    );
}

#[test]
fn words_limit_parallel_parse_and_fan_out_in() {
    let input: Vec<Value> = (0..500)
        .map(|i| json!({"line": format!("w{} W{}", i % 7, i % 5)}))
        .collect();
    let out = run_over(
        &input,
        "[stages.words]\nkind=\"words\"\ninput=\"read\"\nlowercase=true\nparallelism=2\n\
         [stages.a]\nkind=\"filter\"\ninput=\"words\"\nfield=\"word\"\nop=\"eq\"\nvalue=\"w1\"\n\
         [stages.b]\nkind=\"filter\"\ninput=\"words\"\nfield=\"word\"\nop=\"eq\"\nvalue=\"w2\"\n\
         [stages.last]\nkind=\"count\"\ninput=[\"a\",\"b\"]\nkey=\"word\"\n",
    );
    // w1 from `w{i%7}` (i%7==1) plus `W{i%5}` lowercased (i%5==1); same for w2.
    let c = |r: u64| {
        (0..500u64).filter(|i| i % 7 == r).count() + (0..500u64).filter(|i| i % 5 == r).count()
    };
    let mut expect = vec![
        json!({"word": "w1", "count": c(1)}),
        json!({"word": "w2", "count": c(2)}),
    ];
    expect.sort_by_key(|v| std::cmp::Reverse(v["count"].as_u64()));
    assert_eq!(out, expect);
}

#[test]
fn ndjson_read_parallel_parse_keeps_every_record() {
    let input: Vec<Value> = (0..5000).map(|i| json!({"i": i})).collect();
    let dir = tempfile::tempdir().unwrap();
    let inp = dir.path().join("in.ndjson");
    std::fs::write(
        &inp,
        input.iter().map(|v| format!("{v}\n")).collect::<String>(),
    )
    .unwrap();
    let out = dir.path().join("out.ndjson");
    let text = format!(
        "[stages.read]\nkind=\"ndjson.read\"\npath={:?}\nparallelism=2\n[stages.out]\nkind=\"ndjson.write\"\ninput=\"read\"\npath={:?}\n",
        inp.display().to_string(),
        out.display().to_string()
    );
    let report = PipelineSpec::from_str(&text, "p.toml")
        .unwrap()
        .build()
        .unwrap()
        .run()
        .unwrap();
    // The reading stage counts lines, not the blocks it sends.
    assert_eq!(report.records_read(), 5000, "{report}");
    let mut got: Vec<i64> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["i"]
                .as_i64()
                .unwrap()
        })
        .collect();
    got.sort_unstable();
    assert_eq!(got, (0..5000).collect::<Vec<i64>>());
}

#[test]
fn malformed_ndjson_line_names_file_and_line() {
    for parallelism in [1, 2] {
        let dir = tempfile::tempdir().unwrap();
        let inp = dir.path().join("bad.ndjson");
        std::fs::write(&inp, "{\"a\":1}\n{\"a\":2}\n{\"a\":\n{\"a\":4}\n").unwrap();
        let text = format!(
            "[stages.read]\nkind=\"ndjson.read\"\npath={:?}\nparallelism={parallelism}\n[stages.out]\nkind=\"ndjson.write\"\ninput=\"read\"\npath=\"/dev/null\"\n",
            inp.display().to_string()
        );
        let e = PipelineSpec::from_str(&text, "p.toml")
            .unwrap()
            .build()
            .unwrap()
            .run()
            .unwrap_err();
        assert!(
            matches!(&e, millrace::Error::Record { stage, location, .. } if stage == "read" && location.line == 3),
            "{e:?}"
        );
        let msg = e.to_string();
        assert!(
            msg.starts_with(&format!("stage `read`: {}:3: invalid JSON", inp.display())),
            "{msg}"
        );
    }
}

#[test]
fn non_object_json_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let inp = dir.path().join("arr.ndjson");
    std::fs::write(&inp, "[1,2]\n").unwrap();
    let text = format!(
        "[stages.read]\nkind=\"ndjson.read\"\npath={:?}\n[stages.out]\nkind=\"ndjson.write\"\ninput=\"read\"\npath=\"/dev/null\"\n",
        inp.display().to_string()
    );
    let e = PipelineSpec::from_str(&text, "p.toml")
        .unwrap()
        .build()
        .unwrap()
        .run()
        .unwrap_err();
    assert!(
        e.to_string()
            .ends_with(":1: expected a JSON object, found an array"),
        "{e}"
    );
}

// ---- config errors: file, line and stage ------------------------------------------------

const F: &str = "/tmp/test-pipeline.toml";

#[test]
fn bad_toml_names_file_line_and_stage() {
    let e = config_error(
        "[stages.read]\nkind = \"lines.read\"\npath = \"-\"\n\n[stages.out]\nkind = ndjson.write\n",
    );
    assert_eq!(e.kind(), ConfigErrorKind::Syntax, "{e}");
    assert_eq!((e.line, e.stage()), (Some(6), Some("out")), "{e}");
    assert_eq!(e.file, std::path::Path::new(F));
    let e = config_error("nmae = \"typo\"\n[stages.read]\nkind = \"lines.read\"\npath = \"-\"\n");
    assert!(matches!(e.kind(), ConfigErrorKind::Syntax), "{e}");
}

#[test]
fn unknown_kind_names_file_line_and_stage() {
    let text = "[stages.read]\nkind = \"lines.read\"\npath = \"-\"\n[stages.x]\ninput = \"read\"\nkind = \"frobnicate\"\n";
    assert_eq!(
        what(text),
        (ConfigErrorKind::UnknownKind, Some(6), Some("x".into()))
    );
}

#[test]
fn unknown_input_names_file_line_and_stage() {
    let text = "[stages.read]\nkind = \"lines.read\"\npath = \"-\"\n[stages.out]\nkind = \"ndjson.write\"\npath = \"-\"\ninput = \"raed\"\n";
    assert_eq!(config_error(text).kind(), ConfigErrorKind::UnknownInput);
    let e = err(text);
    assert_eq!(
        e,
        format!("{F}:7: stage `out`: unknown input `raed` (stages: out, read)")
    );
}

#[test]
fn cycle_names_file_line_and_stage() {
    let text = "[stages.read]\nkind = \"lines.read\"\npath = \"-\"\n\
                 [stages.a]\nkind = \"limit\"\nn = 1\ninput = [\"read\", \"b\"]\n\
                 [stages.b]\nkind = \"limit\"\nn = 1\ninput = \"a\"\n\
                 [stages.out]\nkind = \"ndjson.write\"\npath = \"-\"\ninput = \"b\"\n";
    assert_eq!(config_error(text).kind(), ConfigErrorKind::Cycle);
    let e = err(text);
    assert_eq!(
        e,
        format!("{F}:7: stage `a`: cycle in the stage graph: a -> b -> a")
    );
}

#[test]
fn wrong_parameter_type_names_file_line_stage_and_parameter() {
    let text = "[stages.read]\nkind = \"lines.read\"\npath = \"-\"\n[stages.top]\nkind = \"limit\"\ninput = \"read\"\nn = \"ten\"\n[stages.out]\nkind = \"ndjson.write\"\npath = \"-\"\ninput = \"top\"\n";
    assert_eq!(config_error(text).kind(), ConfigErrorKind::BadValue);
    let e = err(text);
    assert_eq!(e, format!("{F}:7: stage `top`: parameter `n`: expected an integer of at least 0, found the string \"ten\""));
}

#[test]
fn missing_input_file_names_file_line_and_stage() {
    let e = config_error("[stages.read]\nkind = \"lines.read\"\npath = \"no/such/file.txt\"\n[stages.out]\nkind = \"ndjson.write\"\npath = \"-\"\ninput = \"read\"\n");
    assert_eq!(e.kind(), ConfigErrorKind::Io, "{e}");
    assert_eq!((e.line, e.stage()), (Some(3), Some("read")), "{e}");
    let e = PipelineSpec::from_file("/tmp/no/such/pipeline.toml").unwrap_err();
    assert!(matches!(e.kind(), ConfigErrorKind::Io), "{e}");
    assert_eq!((e.line, e.stage()), (None, None), "{e}");
}

#[test]
fn unknown_parameter_is_reported_as_a_typo() {
    let text = "[stages.read]\nkind = \"lines.read\"\npath = \"-\"\n[stages.w]\nkind = \"words\"\ninput = \"read\"\nlowercas = true\n[stages.out]\nkind = \"ndjson.write\"\npath = \"-\"\ninput = \"w\"\n";
    assert_eq!(config_error(text).kind(), ConfigErrorKind::UnknownParameter);
    let e = err(text);
    assert_eq!(e, format!("{F}:7: stage `w`: unknown parameter `lowercas` for kind `words` (known: dead_letter, field, input, kind, lowercase, on_error, ordered, parallelism)"));
}

#[test]
fn missing_parameter_source_with_input_unused_output_and_bad_options() {
    let text = "[stages.read]\nkind = \"lines.read\"\n";
    assert_eq!(config_error(text).kind(), ConfigErrorKind::MissingParameter);
    assert_eq!(
        err(text),
        format!("{F}:1: stage `read`: missing parameter `path`: expected a string")
    );
    let text = "[stages.read]\nkind = \"lines.read\"\npath = \"-\"\ninput = \"x\"\n";
    assert_eq!(config_error(text).kind(), ConfigErrorKind::Wiring);
    assert_eq!(
        err(text),
        format!("{F}:4: stage `read`: a `lines.read` stage is a source and takes no `input`")
    );
    // The output of a source nothing reads.
    assert_eq!(
        what("[stages.read]\nkind = \"lines.read\"\npath = \"-\"\n"),
        (ConfigErrorKind::Wiring, Some(1), Some("read".into()))
    );
    // A stage that is not a source, without an input.
    assert_eq!(
        what("[stages.out]\nkind = \"ndjson.write\"\npath = \"-\"\n"),
        (ConfigErrorKind::Wiring, Some(1), Some("out".into()))
    );
    let text = "[options]\nbatch_size = 0\n[stages.read]\nkind = \"lines.read\"\npath = \"-\"\n";
    assert_eq!(config_error(text).kind(), ConfigErrorKind::BadValue);
    assert_eq!(
        err(text),
        format!("{F}:2: [options] batch_size: expected a positive integer, found the integer 0")
    );
    assert_eq!(
        what("[options]\nbatch_sise = 1\n[stages.read]\nkind = \"lines.read\"\npath = \"-\"\n"),
        (ConfigErrorKind::UnknownParameter, Some(2), None)
    );
    assert_eq!(
        what("[options]\nidle_timeout = \"soon\"\n[stages.read]\nkind = \"lines.read\"\npath = \"-\"\n"),
        (ConfigErrorKind::BadValue, Some(2), None)
    );
    let text = "[stages.read]\nkind = \"lines.read\"\npath = \"-\"\n[stages.out]\nkind = \"ndjson.write\"\npath = \"-\"\ninput = \"read\"\nparallelism = 2\n";
    assert_eq!(
        what(text),
        (ConfigErrorKind::BadValue, Some(8), Some("out".into()))
    );
    assert_eq!(
        err(text),
        format!(
            "{F}:8: stage `out`: a `ndjson.write` stage runs on one thread; remove `parallelism`"
        )
    );
}

#[test]
fn every_stage_graph_mistake_has_its_kind() {
    assert_eq!(
        config_error("name = \"empty\"\n").kind(),
        ConfigErrorKind::NoStages
    );
    // A stage reading its own output is a cycle of one.
    assert_eq!(
        what("[stages.read]\nkind = \"lines.read\"\npath = \"-\"\n[stages.a]\nkind = \"limit\"\nn = 1\ninput = \"a\"\n"),
        (ConfigErrorKind::Cycle, Some(7), Some("a".into()))
    );
    // A sink read by another stage.
    assert_eq!(
        what("[stages.read]\nkind = \"lines.read\"\npath = \"-\"\n[stages.out]\nkind = \"ndjson.write\"\npath = \"-\"\ninput = \"read\"\n[stages.more]\nkind = \"ndjson.write\"\npath = \"-\"\ninput = \"out\"\n"),
        (ConfigErrorKind::Wiring, Some(4), Some("out".into()))
    );
    // Parameters: missing, of the wrong value, unknown.
    let filter = |rest: &str| {
        format!("[stages.read]\nkind = \"lines.read\"\npath = \"-\"\n[stages.f]\nkind = \"filter\"\ninput = \"read\"\nfield = \"line\"\n{rest}\n[stages.out]\nkind = \"ndjson.write\"\npath = \"-\"\ninput = \"f\"\n")
    };
    assert!(matches!(
        what(&filter("op = \"eq\"")),
        (ConfigErrorKind::MissingParameter, Some(4), _)
    ));
    assert!(matches!(
        what(&filter("op = \"near\"\nvalue = 1")),
        (ConfigErrorKind::BadValue, Some(8), _)
    ));
    assert!(matches!(
        what(&filter("op = \"exists\"\nvalue = 1")),
        (ConfigErrorKind::BadValue, Some(9), _)
    ));
    assert!(matches!(
        what(&filter("op = \"eq\"\nvalue = 1\nvalu = 2")),
        (ConfigErrorKind::UnknownParameter, Some(10), _)
    ));
    let exec = |rest: &str| {
        format!("[stages.read]\nkind = \"lines.read\"\npath = \"-\"\n[stages.x]\nkind = \"exec\"\ninput = \"read\"\n{rest}\n[stages.out]\nkind = \"ndjson.write\"\npath = \"-\"\ninput = \"x\"\n")
    };
    assert!(matches!(
        what(&exec("command = [\"cat\"]\nlimits = { cpu = 1 }")).0,
        ConfigErrorKind::UnknownParameter
    ));
    assert!(matches!(
        what(&exec("command = [\"cat\"]\nlimits = { cpu_seconds = 0 }")).0,
        ConfigErrorKind::BadValue
    ));
    assert!(matches!(
        what(&exec("command = []")).0,
        ConfigErrorKind::BadValue
    ));
}

#[test]
fn graph_is_dot() {
    let s = spec("[stages.read]\nkind = \"lines.read\"\npath = \"-\"\n[stages.out]\nkind = \"ndjson.write\"\npath = \"-\"\ninput = \"read\"\n").unwrap();
    let dot = s.to_dot();
    assert!(dot.starts_with("digraph \"test-pipeline\" {"), "{dot}");
    assert!(dot.contains("\"read\" -> \"out\";"), "{dot}");
}

/// Input without newlines fails with its position instead of buffering without bound.
#[test]
fn a_line_without_end_fails_instead_of_filling_memory() {
    for parallelism in [1, 2] {
        let text = format!(
            "[stages.read]\nkind = \"ndjson.read\"\npath = \"/dev/zero\"\nparallelism = {parallelism}\n\n[stages.out]\nkind = \"ndjson.write\"\ninput = \"read\"\npath = \"/dev/null\"\n"
        );
        let e = spec(&text)
            .unwrap()
            .build()
            .unwrap()
            .run()
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("/dev/zero:1: line longer than max_line_bytes (16777216)"),
            "{e}"
        );
    }
}
