//! The projected byte path (`ndjson.read → filter / select → ndjson.write` on raw bytes, N
//! range readers at parallelism N) against the value path (`[options] byte_path = false`):
//! the same output, the same accounts, the same errors naming the same file lines; and
//! `lines.read` with N readers against one.

use millrace::config::PipelineSpec;
use serde_json::Value;

/// Runs the pipeline `stages` (TOML, `IN` and `OUT` replaced by the paths) over `input`; the
/// output file's bytes and the report, or the error.
fn run(
    dir: &std::path::Path,
    input: &[u8],
    stages: &str,
    byte_path: bool,
) -> Result<(Vec<u8>, millrace::RunReport), millrace::Error> {
    let inp = dir.join("in.ndjson");
    let out = dir.join(format!("out-{byte_path}.ndjson"));
    std::fs::write(&inp, input).unwrap();
    let text = format!("[options]\nbyte_path = {byte_path}\n{stages}")
        .replace("IN", &format!("{:?}", inp.display().to_string()))
        .replace("OUT", &format!("{:?}", out.display().to_string()));
    let report = PipelineSpec::from_str(&text, dir.join("p.toml"))
        .unwrap()
        .build()
        .unwrap()
        .run()?;
    Ok((std::fs::read(&out).unwrap_or_default(), report))
}

fn sorted_lines(b: &[u8]) -> Vec<String> {
    let mut v: Vec<String> = String::from_utf8_lossy(b)
        .lines()
        .map(str::to_string)
        .collect();
    v.sort();
    v
}

/// Records as a user's tools write them, and as they should not: every odd thing the
/// projection must treat exactly as the value path does.
fn input(n: usize) -> Vec<u8> {
    let mut s = String::from("\u{feff}");
    let kinds = ["view", "click", "purchase"];
    for i in 0..n {
        let kind = kinds[i * 7 % 3];
        let line = match i % 10 {
            0 => format!(
                r#"{{"id":{i},"kind":"{kind}","user":"u{i}","amount":{}.25}}"#,
                i % 100
            ),
            1 => format!(r#"{{ "kind" : "{kind}" , "id" : {i} , "user" : "caf\u00e9 \"{i}\"" }}"#),
            2 => format!(r#"{{"kind":"view","id":{i},"kind":"{kind}","user":"dup"}}"#),
            3 => format!(
                r#"{{"id":{i},"kind":"{kind}","geo":{{"kind":"purchase","id":[1, 2]}},"user":"n"}}"#
            ),
            4 => format!(r#"{{"ki\u006ed":"{kind}","id":{i},"user":"escaped key"}}"#),
            5 => format!(
                r#"{{"id":{i},"kind":"{kind}","amount":1e3,"user":"exp","big":12345678901234567}}"#
            ),
            6 => format!(r#"{{"id":-0,"kind":"pur\u0063hase","user":"u{i}"}}"#),
            7 => String::new(),
            8 => format!("{{\"id\":{i},\"kind\":\"{kind}\",\"user\":\"crlf\"}}\r"),
            _ => format!(
                r#"{{"user":"last","kind":"{kind}","id":{i},"tags":["a","b"],"amount":-1.5E-3}}"#
            ),
        };
        s.push_str(&line);
        s.push('\n');
    }
    s.into_bytes()
}

const PIPELINE: &str = r#"
[stages.read]
kind = "ndjson.read"
path = IN
parallelism = PAR
[stages.keep]
kind = "filter"
input = "read"
field = "kind"
op = "eq"
value = "purchase"
[stages.pick]
kind = "select"
input = "keep"
fields = ["user", "amount", "id", "geo", "missing"]
missing = "null"
[stages.out]
kind = "ndjson.write"
input = "pick"
path = OUT
"#;

#[test]
fn the_projected_path_prints_what_the_value_path_prints() {
    let dir = tempfile::tempdir().unwrap();
    // Enough lines for several blocks per part, so parts cut blocks and lines at boundaries.
    let data = input(40_000);
    for par in [1, 2, 3] {
        let stages = PIPELINE.replace("PAR", &par.to_string());
        let (fast, fr) = run(dir.path(), &data, &stages, true).unwrap();
        let (slow, sr) = run(dir.path(), &data, &stages, false).unwrap();
        assert!(
            fr.account("read.lines").is_none(),
            "the projected path ran:\n{fr}"
        );
        fr.check_accounting().unwrap();
        if par == 1 {
            assert_eq!(
                String::from_utf8_lossy(&fast),
                String::from_utf8_lossy(&slow),
                "parallelism 1: the same lines in the same order"
            );
        } else {
            assert_eq!(
                sorted_lines(&fast),
                sorted_lines(&slow),
                "parallelism {par}"
            );
        }
        assert!(fast.len() > 100_000, "{}", fast.len());
        let read = fr.account("read").unwrap();
        assert_eq!(
            (read.records_in, read.records_out),
            (36_000, 36_000),
            "{fr}"
        );
        for stage in ["keep", "pick", "out"] {
            let (f, s) = (fr.account(stage).unwrap(), sr.account(stage).unwrap());
            assert_eq!(
                (f.records_in, f.records_out, f.filtered),
                (s.records_in, s.records_out, s.filtered),
                "parallelism {par}, stage {stage}\n{fr}\n{sr}"
            );
        }
        // Blank lines are not records (the value path reading blocks on one thread at
        // parallelism > 1 counts them in, then filters them out).
        assert_eq!(fr.records_read(), 36_000, "parallelism {par}\n{fr}");
    }
}

#[test]
fn a_filter_alone_prints_whole_records_as_the_value_path_does() {
    let dir = tempfile::tempdir().unwrap();
    let data = input(3_000);
    let stages = r#"
[stages.read]
kind = "ndjson.read"
path = IN
parallelism = 2
[stages.keep]
kind = "filter"
input = "read"
field = "user"
op = "ne"
value = "dup"
[stages.out]
kind = "ndjson.write"
input = "keep"
path = OUT
"#;
    let (fast, _) = run(dir.path(), &data, stages, true).unwrap();
    let (slow, _) = run(dir.path(), &data, stages, false).unwrap();
    assert_eq!(sorted_lines(&fast), sorted_lines(&slow));
    // Keys sorted, one of each, as `serde_json` prints a value.
    let first: Value = serde_json::from_slice(fast.split(|&b| b == b'\n').next().unwrap()).unwrap();
    assert!(first.is_object());
}

/// A bad line far into the file, in the last part: the error names its line in the file, as
/// one reader would.
#[test]
fn a_bad_line_in_a_later_part_names_its_line_in_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut data = Vec::new();
    for i in 1..=30_000 {
        if i == 29_001 {
            data.extend_from_slice(b"{\"kind\":\n");
        } else {
            data.extend_from_slice(format!("{{\"id\":{i},\"kind\":\"purchase\"}}\n").as_bytes());
        }
    }
    for par in [1, 2, 3] {
        let stages = PIPELINE.replace("PAR", &par.to_string());
        let e = run(dir.path(), &data, &stages, true).unwrap_err();
        assert!(
            matches!(&e, millrace::Error::Record { stage, location, .. }
                if stage == "read" && location.line == 29_001),
            "parallelism {par}: {e:?}"
        );
    }
    // Dead letters name the line too; every other record comes out.
    let stages = PIPELINE.replace("PAR", "3").replace(
        "parallelism = 3",
        "parallelism = 3\non_error = \"dead_letter\"\ndead_letter = \"bad\"",
    ) + &format!(
        "[stages.bad]\nkind = \"ndjson.write\"\npath = {:?}\n",
        dir.path().join("bad.ndjson").display().to_string()
    );
    let (out, report) = run(dir.path(), &data, &stages, true).unwrap();
    assert_eq!(out.iter().filter(|&&b| b == b'\n').count(), 29_999);
    assert_eq!(report.account("read").unwrap().dead_lettered, 1);
    let letter: Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("bad.ndjson")).unwrap()).unwrap();
    assert_eq!(letter["line"], 29_001, "{letter}");
    assert_eq!(letter["raw"], "{\"kind\":", "{letter}");
}

/// A stage that fails on a record fails as on the value path: the same error, naming the stage
/// and showing the record; with `skip`, the same counts.
#[test]
fn a_failing_stage_fails_as_on_the_value_path() {
    let dir = tempfile::tempdir().unwrap();
    let data = b"{\"amount\":5}\n{\"id\":7}\n{\"amount\":1}\n".to_vec();
    let stages = |policy: &str| {
        format!(
            r#"
[stages.read]
kind = "ndjson.read"
path = IN
[stages.cheap]
kind = "filter"
input = "read"
field = "amount"
op = "lt"
value = 3
{policy}
[stages.out]
kind = "ndjson.write"
input = "cheap"
path = OUT
"#
        )
    };
    let fast = run(dir.path(), &data, &stages(""), true).unwrap_err();
    let slow = run(dir.path(), &data, &stages(""), false).unwrap_err();
    assert!(
        matches!(&fast, millrace::Error::Operator { stage, .. } if stage == "cheap"),
        "{fast:?}"
    );
    assert_eq!(fast.to_string(), slow.to_string());
    let (out, report) = run(dir.path(), &data, &stages("on_error = \"skip\""), true).unwrap();
    assert_eq!(out, b"{\"amount\":1}\n");
    let a = report.account("cheap").unwrap();
    assert_eq!(
        (a.records_in, a.filtered, a.skipped, a.records_out),
        (3, 1, 1, 1)
    );
}

/// `ordered = true` keeps input order: the projected path (whose readers interleave) steps
/// aside for the value path's ordered merge.
#[test]
fn ordered_reads_keep_input_order() {
    let dir = tempfile::tempdir().unwrap();
    let data = input(40_000);
    let stages = PIPELINE
        .replace("PAR", "2")
        .replace("parallelism = 2", "parallelism = 2\nordered = true");
    let (ordered, _) = run(dir.path(), &data, &stages, true).unwrap();
    let one = PIPELINE.replace("PAR", "1");
    let (sequential, _) = run(dir.path(), &data, &one, true).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&ordered),
        String::from_utf8_lossy(&sequential)
    );
}

/// `lines.read` with parallelism N reads with N readers: every line once, a byte-order mark
/// kept where it is data (a later part may start at it), a bad line named by its number in the
/// file.
#[test]
fn lines_read_with_several_readers_reads_every_line_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut data = "\u{feff}first\n".to_string();
    for i in 0..50_000 {
        data.push_str(&format!("line {i} {}\n", "x".repeat(i % 50)));
        if i == 25_000 {
            data.push_str("\u{feff}mark inside\n");
        }
    }
    let stages = |par: usize| {
        format!(
            "[stages.read]\nkind = \"lines.read\"\npath = IN\nparallelism = {par}\n\
             [stages.out]\nkind = \"ndjson.write\"\ninput = \"read\"\npath = OUT\n"
        )
    };
    let (one, _) = run(dir.path(), data.as_bytes(), &stages(1), true).unwrap();
    assert!(String::from_utf8_lossy(&one).starts_with("{\"line\":\"first\"}\n"));
    for par in [2, 3] {
        let (many, report) = run(dir.path(), data.as_bytes(), &stages(par), true).unwrap();
        assert_eq!(sorted_lines(&many), sorted_lines(&one), "parallelism {par}");
        assert_eq!(report.records_read(), 50_002, "parallelism {par}");
        assert_eq!(
            report
                .stages
                .iter()
                .filter(|s| s.stage.starts_with("read"))
                .count(),
            par
        );
    }
    let mut bad = data.into_bytes();
    let at = bad.len() - 10;
    bad[at] = 0xff;
    let lines_before = bad[..at].iter().filter(|&&b| b == b'\n').count() as u64;
    for par in [1, 3] {
        let e = run(dir.path(), &bad, &stages(par), true).unwrap_err();
        assert!(
            matches!(&e, millrace::Error::Record { location, .. } if location.line == lines_before + 1),
            "parallelism {par}: {e:?}"
        );
    }
}
