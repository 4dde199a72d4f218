//! The TOML layer: every kind's behaviour, and every config error naming file, line and stage.

use std::io::Write;

use millrace::config::PipelineSpec;
use serde_json::{json, Value};

fn spec(text: &str) -> Result<PipelineSpec, millrace::config::ConfigError> {
    PipelineSpec::from_str(text, "/tmp/test-pipeline.toml")
}

fn err(text: &str) -> String {
    match spec(text).and_then(|s| s.build().map(|_| s)) {
        Ok(_) => panic!("expected an error for:\n{text}"),
        Err(e) => e.to_string(),
    }
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
    PipelineSpec::from_str(&text, dir.path().join("p.toml"))
        .unwrap()
        .build()
        .unwrap()
        .run()
        .unwrap();
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
    assert_eq!(
        n("lt", "\"3\""),
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
    let e = err(
        "[stages.read]\nkind = \"lines.read\"\npath = \"-\"\n\n[stages.out]\nkind = ndjson.write\n",
    );
    assert!(
        e.starts_with(&format!("{F}:6: stage `out`: invalid TOML")),
        "{e}"
    );
}

#[test]
fn unknown_kind_names_file_line_and_stage() {
    let e = err("[stages.read]\nkind = \"lines.read\"\npath = \"-\"\n[stages.x]\ninput = \"read\"\nkind = \"frobnicate\"\n");
    assert!(
        e.starts_with(&format!(
            "{F}:6: stage `x`: unknown kind `frobnicate` (built-in kinds: lines.read,"
        )),
        "{e}"
    );
}

#[test]
fn unknown_input_names_file_line_and_stage() {
    let e = err("[stages.read]\nkind = \"lines.read\"\npath = \"-\"\n[stages.out]\nkind = \"ndjson.write\"\npath = \"-\"\ninput = \"raed\"\n");
    assert_eq!(
        e,
        format!("{F}:7: stage `out`: unknown input `raed` (stages: out, read)")
    );
}

#[test]
fn cycle_names_file_line_and_stage() {
    let e = err("[stages.read]\nkind = \"lines.read\"\npath = \"-\"\n\
                 [stages.a]\nkind = \"limit\"\nn = 1\ninput = [\"read\", \"b\"]\n\
                 [stages.b]\nkind = \"limit\"\nn = 1\ninput = \"a\"\n\
                 [stages.out]\nkind = \"ndjson.write\"\npath = \"-\"\ninput = \"b\"\n");
    assert_eq!(
        e,
        format!("{F}:7: stage `a`: cycle in the stage graph: a -> b -> a")
    );
}

#[test]
fn wrong_parameter_type_names_file_line_stage_and_parameter() {
    let e = err("[stages.read]\nkind = \"lines.read\"\npath = \"-\"\n[stages.top]\nkind = \"limit\"\ninput = \"read\"\nn = \"ten\"\n[stages.out]\nkind = \"ndjson.write\"\npath = \"-\"\ninput = \"top\"\n");
    assert_eq!(e, format!("{F}:7: stage `top`: parameter `n`: expected an integer of at least 0, found the string \"ten\""));
}

#[test]
fn missing_input_file_names_file_line_and_stage() {
    let e = err("[stages.read]\nkind = \"lines.read\"\npath = \"no/such/file.txt\"\n[stages.out]\nkind = \"ndjson.write\"\npath = \"-\"\ninput = \"read\"\n");
    assert!(
        e.starts_with(&format!(
            "{F}:3: stage `read`: cannot open input file /tmp/no/such/file.txt:"
        )),
        "{e}"
    );
}

#[test]
fn unknown_parameter_is_reported_as_a_typo() {
    let e = err("[stages.read]\nkind = \"lines.read\"\npath = \"-\"\n[stages.w]\nkind = \"words\"\ninput = \"read\"\nlowercas = true\n[stages.out]\nkind = \"ndjson.write\"\npath = \"-\"\ninput = \"w\"\n");
    assert_eq!(e, format!("{F}:7: stage `w`: unknown parameter `lowercas` for kind `words` (known: field, input, kind, lowercase, parallelism)"));
}

#[test]
fn missing_parameter_source_with_input_unused_output_and_bad_options() {
    let e = err("[stages.read]\nkind = \"lines.read\"\n");
    assert_eq!(
        e,
        format!("{F}:1: stage `read`: missing parameter `path`: expected a string")
    );
    let e = err("[stages.read]\nkind = \"lines.read\"\npath = \"-\"\ninput = \"x\"\n");
    assert_eq!(
        e,
        format!("{F}:4: stage `read`: a `lines.read` stage is a source and takes no `input`")
    );
    let e = err("[stages.read]\nkind = \"lines.read\"\npath = \"-\"\n");
    assert!(
        e.starts_with(&format!(
            "{F}:1: stage `read`: the output of this `lines.read` stage is not used"
        )),
        "{e}"
    );
    let e = err("[options]\nbatch_size = 0\n[stages.read]\nkind = \"lines.read\"\npath = \"-\"\n");
    assert_eq!(
        e,
        format!("{F}:2: [options] batch_size: expected a positive integer, found the integer 0")
    );
    let e = err("[stages.read]\nkind = \"lines.read\"\npath = \"-\"\n[stages.out]\nkind = \"ndjson.write\"\npath = \"-\"\ninput = \"read\"\nparallelism = 2\n");
    assert_eq!(
        e,
        format!(
            "{F}:8: stage `out`: a `ndjson.write` stage runs on one thread; remove `parallelism`"
        )
    );
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
        assert!(e.contains("/dev/zero:1: line longer than 16 MiB"), "{e}");
    }
}
