//! `millrace run` over bad records: a real-world-shaped file with 1 % corrupted lines, every
//! line accounted for (output or dead letter, line for line), the summary's "records" table,
//! the accounts in `--progress json`, and the exit code and message when the policy fails.

use std::collections::HashSet;
use std::path::Path;
use std::process::Command;

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_millrace");

/// A small deterministic generator (xorshift), so the test needs no random crate and fails
/// the same way every time.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// What kind of line number `n` of the file is.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Line {
    Good,
    Truncated,
    Garbage,
    WrongType,
}

/// ~20k lines of click events; 1 % are a truncated object, binary garbage or a string where the
/// filter compares a number. Returns the file's bytes and each line's kind (index = line - 1).
fn corrupted_file(n: usize) -> (Vec<u8>, Vec<Line>) {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut data = Vec::new();
    let mut kinds = Vec::with_capacity(n);
    for i in 1..=n {
        let user = rng.next() % 500;
        let ms = 1_700_000_000_000u64 + i as u64 * 37;
        let good = format!(
            "{{\"id\":{i},\"user\":\"u{user}\",\"time\":{ms},\"page\":\"/p/{}\",\"v\":{}}}",
            rng.next() % 40,
            rng.next() % 1000
        );
        let kind = match rng.next() % 300 {
            0 => Line::Truncated,
            1 => Line::Garbage,
            2 => Line::WrongType,
            _ => Line::Good,
        };
        match kind {
            Line::Good => data.extend_from_slice(good.as_bytes()),
            Line::Truncated => data.extend_from_slice(&good.as_bytes()[..good.len() / 2]),
            Line::Garbage => {
                // Not UTF-8, never a newline.
                data.push(0xff);
                for _ in 0..(rng.next() % 60) {
                    let b = (rng.next() % 256) as u8;
                    data.push(if b == b'\n' || b == b'\r' { 0xfe } else { b });
                }
            }
            Line::WrongType => {
                data.extend_from_slice(good.replace("\"v\":", "\"v\":\"n/a\",\"was\":").as_bytes())
            }
        }
        data.push(b'\n');
        kinds.push(kind);
    }
    (data, kinds)
}

fn pipeline(dir: &Path) -> std::path::PathBuf {
    let file = dir.join("clicks.toml");
    std::fs::write(
        &file,
        "[stages.read]\nkind = \"ndjson.read\"\npath = \"clicks.ndjson\"\non_error = \"dead_letter\"\ndead_letter = \"dead\"\n\n\
         [stages.valid]\nkind = \"filter\"\ninput = \"read\"\nfield = \"v\"\nop = \"ge\"\nvalue = 0\non_error = \"dead_letter\"\ndead_letter = \"dead\"\n\n\
         [stages.out]\nkind = \"ndjson.write\"\ninput = \"valid\"\npath = \"out.ndjson\"\n\n\
         [stages.dead]\nkind = \"ndjson.write\"\npath = \"dead.ndjson\"\n",
    )
    .unwrap();
    file
}

fn read_json_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn one_percent_corrupted_every_line_is_output_or_dead_letter() {
    let dir = tempfile::tempdir().unwrap();
    let (data, kinds) = corrupted_file(20_000);
    std::fs::write(dir.path().join("clicks.ndjson"), &data).unwrap();
    let bad = kinds.iter().filter(|k| **k != Line::Good).count();
    assert!((150..=260).contains(&bad), "about 1 % corrupted: {bad}");
    for k in [Line::Truncated, Line::Garbage, Line::WrongType] {
        assert!(kinds.contains(&k), "the file has {k:?} lines");
    }

    let out = Command::new(BIN)
        .args(["run"])
        .arg(pipeline(dir.path()))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // The summary's records table: one row per step.
    assert!(stderr.contains("records"), "{stderr}");
    let row = |name: &str| -> Vec<u64> {
        let line = stderr
            .lines()
            .find(|l| {
                l.split_whitespace().next() == Some(name) && l.split_whitespace().count() == 7
            })
            .unwrap_or_else(|| panic!("no records row for {name}:\n{stderr}"));
        line.split_whitespace()
            .skip(1)
            .map(|x| x.parse().unwrap())
            .collect()
    };
    let parse_errors = kinds
        .iter()
        .filter(|k| matches!(k, Line::Truncated | Line::Garbage))
        .count() as u64;
    let wrong = kinds.iter().filter(|k| **k == Line::WrongType).count() as u64;
    // in, out, filtered, skipped, dead, late
    assert_eq!(
        row("read"),
        vec![20_000, 20_000 - parse_errors, 0, 0, parse_errors, 0]
    );
    assert_eq!(
        row("valid"),
        vec![
            20_000 - parse_errors,
            20_000 - parse_errors - wrong,
            0,
            0,
            wrong,
            0
        ]
    );

    // Line for line: each input line number is in exactly one of the outputs.
    let mut seen: HashSet<u64> = HashSet::new();
    for rec in read_json_lines(&dir.path().join("out.ndjson")) {
        let id = rec["id"].as_u64().unwrap();
        assert_eq!(
            kinds[id as usize - 1],
            Line::Good,
            "line {id} passed: {rec}"
        );
        assert!(seen.insert(id), "line {id} twice");
    }
    let letters = read_json_lines(&dir.path().join("dead.ndjson"));
    let file = dir.path().join("clicks.ndjson").display().to_string();
    for l in &letters {
        let (id, expected) = match l["stage"].as_str().unwrap() {
            "read" => {
                assert_eq!(l["file"], Value::String(file.clone()));
                assert!(l.get("record").is_none() && l["raw"].is_string(), "{l}");
                let line = l["line"].as_u64().unwrap();
                let k = kinds[line as usize - 1];
                assert!(
                    matches!(k, Line::Truncated | Line::Garbage),
                    "line {line}: {l}"
                );
                (line, k)
            }
            "valid" => {
                assert!(l["file"].is_null() && l["line"].is_null(), "{l}");
                assert_eq!(l["record"]["v"], "n/a", "{l}");
                assert!(
                    l["error"]
                        .as_str()
                        .unwrap()
                        .contains("field `v` is a string"),
                    "{l}"
                );
                (l["record"]["id"].as_u64().unwrap(), Line::WrongType)
            }
            other => panic!("letter from stage {other}: {l}"),
        };
        assert_eq!(kinds[id as usize - 1], expected);
        assert!(l["time"].as_u64().unwrap() > 1_600_000_000_000);
        assert!(seen.insert(id), "line {id} twice");
    }
    assert_eq!(
        seen.len(),
        20_000,
        "output + dead letters = input, line for line"
    );
    assert_eq!(letters.len(), bad);
}

#[test]
fn progress_json_carries_the_accounts() {
    let dir = tempfile::tempdir().unwrap();
    let (data, _) = corrupted_file(2_000);
    std::fs::write(dir.path().join("clicks.ndjson"), &data).unwrap();
    let out = Command::new(BIN)
        .args(["run", "--progress", "json"])
        .arg(pipeline(dir.path()))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let done: Value = stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|e| e["event"] == "finished")
        .unwrap_or_else(|| panic!("no finished event:\n{stderr}"));
    let accounts = done["report"]["accounts"].as_array().unwrap();
    let read = accounts.iter().find(|a| a["stage"] == "read").unwrap();
    assert_eq!(
        done["report"]["records_read"], read["records_out"],
        "letters are not records read"
    );
    assert_eq!(read["shape"], "source");
    assert_eq!(read["records_in"], 2_000);
    let dead = read["dead_lettered"].as_u64().unwrap();
    assert_eq!(read["records_out"].as_u64().unwrap() + dead, 2_000);
}

#[test]
fn the_default_policy_exits_1_naming_stage_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("in.ndjson"), "{\"v\":1}\n{\"v\":\n").unwrap();
    let file = dir.path().join("p.toml");
    std::fs::write(
        &file,
        "[stages.read]\nkind = \"ndjson.read\"\npath = \"in.ndjson\"\n\
         [stages.out]\nkind = \"ndjson.write\"\ninput = \"read\"\npath = \"out.ndjson\"\n",
    )
    .unwrap();
    let out = Command::new(BIN).arg("run").arg(&file).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("stage `read`"), "{stderr}");
    assert!(stderr.contains("in.ndjson:2"), "{stderr}");
}

#[test]
fn a_dead_letter_stage_on_dev_full_fails_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let (data, _) = corrupted_file(5_000);
    std::fs::write(dir.path().join("clicks.ndjson"), &data).unwrap();
    let file = pipeline(dir.path());
    let text = std::fs::read_to_string(&file)
        .unwrap()
        .replace("path = \"dead.ndjson\"", "path = \"/dev/full\"");
    std::fs::write(&file, text).unwrap();
    let out = Command::new(BIN).arg("run").arg(&file).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("stage `dead`"), "{stderr}");
}
