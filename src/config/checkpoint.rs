//! The `[checkpoint]` table of a pipeline file, and each stage's fingerprint.
//!
//! This module owns how the table's keys are read into [`CheckpointOptions`] (errors at the
//! key's line, with the kind, like the rest of the parser) and what a stage's fingerprint is:
//! its kind and the parameters that shape its state, in a canonical form, so that a resume
//! whose pipeline changed a stateful stage (a `count`'s `key`, a window's size) is refused,
//! while a change to a stateless stage (a `filter`'s predicate) is not.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use toml::Spanned;

use super::parse::Ctx;
use super::{ConfigError, ConfigErrorKind};
use crate::checkpoint::{CheckpointOptions, Mode};
use crate::describe::describe_toml;

type RawTable = BTreeMap<Spanned<String>, Spanned<toml::Value>>;

/// The keys the table takes, as the unknown-key error lists them.
const KEYS: &str = "interval, dir, timeout, max_concurrent, min_pause, tolerable_failures, retain, retain_on_success, mode, spool_stdin, max_parallelism";

/// Reads the `[checkpoint]` table. `dir` is required and resolves against the pipeline file's
/// directory (for a job submitted over HTTP, the server's working directory: see
/// `http::submit`).
pub(crate) fn parse_checkpoint(
    ctx: &Ctx<'_>,
    t: &Spanned<RawTable>,
) -> Result<CheckpointOptions, ConfigError> {
    let mut o = CheckpointOptions::new("");
    let mut dir = None;
    for (k, v) in t.get_ref() {
        let key = k.get_ref().as_str();
        let line = Some(ctx.lines.line(v.span().start));
        let err_of = |kind, m: String| {
            ConfigError::new(
                ctx.file,
                line,
                None,
                kind,
                format!("[checkpoint] {key}: {m}"),
            )
        };
        let err = |m: String| err_of(ConfigErrorKind::BadValue, m);
        let int = |min: i64, max: i64| match v.get_ref() {
            toml::Value::Integer(i) if (min..=max).contains(i) => Ok(*i),
            toml::Value::Integer(i) => Err(err(format!(
                "expected an integer from {min} to {max}, found {i}"
            ))),
            other => Err(err(format!(
                "expected an integer, found {}",
                describe_toml(other)
            ))),
        };
        let duration = |positive: bool| match v.get_ref() {
            toml::Value::String(s) => match crate::parse_duration_ms(s) {
                Ok(ms) if ms < 0 || (positive && ms == 0) => Err(err(format!(
                    "expected a duration {}, found {s:?}",
                    if positive {
                        "above zero"
                    } else {
                        "of zero or more"
                    }
                ))),
                Ok(ms) => Ok(Duration::from_millis(ms as u64)),
                Err(e) => Err(err(e.to_string())),
            },
            other => Err(err(format!(
                "expected a duration such as \"1s\", found {}",
                describe_toml(other)
            ))),
        };
        let boolean = || match v.get_ref() {
            toml::Value::Boolean(b) => Ok(*b),
            other => Err(err(format!(
                "expected true or false, found {}",
                describe_toml(other)
            ))),
        };
        match key {
            "interval" => o.interval = duration(true)?,
            "timeout" => o.timeout = duration(true)?,
            "min_pause" => o.min_pause = duration(false)?,
            "max_concurrent" => o.max_concurrent = int(1, 64)? as usize,
            "tolerable_failures" => o.tolerable_failures = int(0, u32::MAX as i64)? as u32,
            "retain" => o.retain = int(1, 1_000_000)? as usize,
            "retain_on_success" => o.retain_on_success = boolean()?,
            "spool_stdin" => o.spool_stdin = boolean()?,
            "max_parallelism" => o.max_parallelism = int(1, 32_768)? as u16,
            "mode" => {
                o.mode = match v.get_ref() {
                    toml::Value::String(s) if s == "exactly_once" => Mode::ExactlyOnce,
                    toml::Value::String(s) if s == "at_least_once" => Mode::AtLeastOnce,
                    other => {
                        return Err(err(format!(
                            "expected \"exactly_once\" or \"at_least_once\", found {}",
                            describe_toml(other)
                        )))
                    }
                }
            }
            "dir" => match v.get_ref() {
                toml::Value::String(s) if !s.trim().is_empty() => {
                    let p = Path::new(s);
                    dir = Some(if p.is_absolute() {
                        p.to_path_buf()
                    } else {
                        ctx.base.join(p)
                    });
                }
                other => {
                    return Err(err(format!(
                        "expected a directory path, found {}",
                        describe_toml(other)
                    )))
                }
            },
            other => {
                return Err(err_of(
                    ConfigErrorKind::UnknownParameter,
                    format!("unknown key `{other}` (known: {KEYS})"),
                ))
            }
        }
    }
    match dir {
        Some(d) => o.dir = d,
        None => {
            return Err(ConfigError::new(
                ctx.file,
                Some(table_line(ctx, t)),
                None,
                ConfigErrorKind::MissingParameter,
                "[checkpoint] dir: missing: the directory checkpoints are kept in (relative to the pipeline file), e.g. dir = \"checkpoints\"",
            ))
        }
    }
    Ok(o)
}

/// The line of the `[checkpoint]` header: the table's span starts at its first key (or at the
/// header when it has none), so search back for the header.
fn table_line(ctx: &Ctx<'_>, t: &Spanned<RawTable>) -> usize {
    let at = ctx.lines.line(t.span().start);
    let text = ctx.text;
    text.lines()
        .take(at)
        .enumerate()
        .filter(|(_, l)| l.trim().trim_start_matches('[').starts_with("checkpoint"))
        .map(|(i, _)| i + 1)
        .last()
        .unwrap_or(at)
}

/// Parameters that do not shape a stage's state or output: a resume may change them freely.
/// (`parallelism` is not among them: keyed state is stored by key group so that a later
/// version can restore at another parallelism, but this one restores at the same.)
const NEUTRAL: &[&str] = &[
    "input",
    "on_error",
    "dead_letter",
    "log_level",
    "timeout",
    "limits",
    "grant",
];

/// A stage's fingerprint: its kind and every parameter but the [`NEUTRAL`] ones, as
/// `kind{"key":value,…}` with keys sorted and values as canonical JSON (object keys sorted).
pub(crate) fn fingerprint(kind: &str, table: &RawTable) -> String {
    let params: BTreeMap<&str, serde_json::Value> = table
        .iter()
        .filter(|(k, _)| k.get_ref() != "kind" && !NEUTRAL.contains(&k.get_ref().as_str()))
        .map(|(k, v)| {
            (
                k.get_ref().as_str(),
                serde_json::to_value(v.get_ref()).unwrap_or(serde_json::Value::Null),
            )
        })
        .collect();
    format!(
        "{kind}{}",
        serde_json::to_string(&params).unwrap_or_default()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PipelineSpec;

    const STAGES: &str = r#"
[stages.read]
kind = "lines.read"
path = "Cargo.toml"

[stages.out]
kind = "ndjson.write"
input = "read"
path = "/dev/null"
"#;

    fn parse(table: &str) -> Result<PipelineSpec, ConfigError> {
        PipelineSpec::from_str(
            &format!("{table}\n{STAGES}"),
            Path::new(env!("CARGO_MANIFEST_DIR")).join("p.toml"),
        )
    }

    #[test]
    fn every_key_is_read_and_dir_resolves_against_the_file() {
        let s = parse(
            r#"[checkpoint]
interval = "250ms"
dir = "cp"
timeout = "2m"
max_concurrent = 2
min_pause = "10ms"
tolerable_failures = 3
retain = 5
retain_on_success = true
mode = "at_least_once"
spool_stdin = true
max_parallelism = 64
"#,
        )
        .unwrap();
        let c = s.checkpoint.expect("a [checkpoint] table");
        assert_eq!(c.dir, Path::new(env!("CARGO_MANIFEST_DIR")).join("cp"));
        assert_eq!(c.interval, Duration::from_millis(250));
        assert_eq!(c.timeout, Duration::from_secs(120));
        assert_eq!(c.max_concurrent, 2);
        assert_eq!(c.min_pause, Duration::from_millis(10));
        assert_eq!(c.tolerable_failures, 3);
        assert_eq!(c.retain, 5);
        assert!(c.retain_on_success);
        assert_eq!(c.mode, Mode::AtLeastOnce);
        assert!(c.spool_stdin);
        assert_eq!(c.max_parallelism, 64);
    }

    #[test]
    fn defaults_apply_and_no_table_means_no_checkpoints() {
        let c = parse("[checkpoint]\ndir = \"/tmp/x\"\n")
            .unwrap()
            .checkpoint
            .unwrap();
        assert_eq!(c.dir, Path::new("/tmp/x"));
        assert_eq!(c.interval, Duration::from_secs(1));
        assert_eq!(c.timeout, Duration::from_secs(60));
        assert_eq!(c.max_concurrent, 1);
        assert_eq!(c.min_pause, Duration::ZERO);
        assert_eq!(c.tolerable_failures, 0);
        assert_eq!(c.retain, 3);
        assert!(!c.retain_on_success);
        assert_eq!(c.mode, Mode::ExactlyOnce);
        assert!(!c.spool_stdin);
        assert_eq!(c.max_parallelism, 128);
        assert!(parse("").unwrap().checkpoint.is_none());
    }

    #[test]
    fn errors_name_the_key_its_line_and_the_kind() {
        let cases: &[(&str, usize, ConfigErrorKind, &str)] = &[
            (
                "[checkpoint]\ndir = \"c\"\ninterval = \"soon\"\n",
                3,
                ConfigErrorKind::BadValue,
                "[checkpoint] interval",
            ),
            (
                "[checkpoint]\ndir = \"c\"\ninterval = \"0s\"\n",
                3,
                ConfigErrorKind::BadValue,
                "above zero",
            ),
            (
                "[checkpoint]\ndir = \"c\"\n\nretain = 0\n",
                4,
                ConfigErrorKind::BadValue,
                "[checkpoint] retain: expected an integer from 1",
            ),
            (
                "[checkpoint]\ndir = \"c\"\nmode = \"twice\"\n",
                3,
                ConfigErrorKind::BadValue,
                "\"exactly_once\" or \"at_least_once\"",
            ),
            (
                "[checkpoint]\ndir = \"c\"\nspool_stdin = 1\n",
                3,
                ConfigErrorKind::BadValue,
                "expected true or false",
            ),
            (
                "[checkpoint]\ndir = \"c\"\nintervall = \"1s\"\n",
                3,
                ConfigErrorKind::UnknownParameter,
                "unknown key `intervall`",
            ),
            (
                "[checkpoint]\ndir = 3\n",
                2,
                ConfigErrorKind::BadValue,
                "[checkpoint] dir: expected a directory path",
            ),
            (
                "name = \"x\"\n[checkpoint]\ninterval = \"1s\"\n",
                2,
                ConfigErrorKind::MissingParameter,
                "[checkpoint] dir: missing",
            ),
            (
                "[checkpoint]\ndir = \"c\"\nmax_parallelism = 40000\n",
                3,
                ConfigErrorKind::BadValue,
                "max_parallelism",
            ),
        ];
        for (text, line, kind, needle) in cases {
            let e = parse(text).expect_err(text);
            assert_eq!(e.kind, *kind, "{text}: {e}");
            assert_eq!(e.line, Some(*line), "{text}: {e}");
            assert!(e.to_string().contains(needle), "{text}: {e}");
        }
    }

    fn stage_fp(stage: &str) -> impl Fn(&str) -> String + '_ {
        move |text| {
            PipelineSpec::from_str(text, Path::new(env!("CARGO_MANIFEST_DIR")).join("p.toml"))
                .unwrap()
                .stages
                .iter()
                .find(|s| s.name == stage)
                .unwrap()
                .fingerprint
                .clone()
        }
    }

    const COUNT: &str = r#"
[stages.read]
kind = "ndjson.read"
path = "Cargo.toml"

[stages.c]
kind = "count"
input = "read"
key = "KEY"
parallelism = 1

[stages.out]
kind = "ndjson.write"
input = "c"
path = "/dev/null"
"#;

    #[test]
    fn a_fingerprint_changes_with_the_state_shaping_parameters_only() {
        let fp = stage_fp("c");
        let a = fp(&COUNT.replace("KEY", "user"));
        assert!(a.starts_with("count{"), "{a}");
        assert!(a.contains("\"key\":\"user\""), "{a}");
        assert_ne!(a, fp(&COUNT.replace("KEY", "page")), "a changed key");
        // The input does not shape the count's state.
        let renamed = COUNT
            .replace("KEY", "user")
            .replace("[stages.read]", "[stages.src]")
            .replace("input = \"read\"", "input = \"src\"");
        assert_eq!(a, fp(&renamed));
        // Order of keys in the file does not matter.
        let reordered = COUNT.replace(
            "key = \"KEY\"\nparallelism = 1",
            "parallelism = 1\nkey = \"user\"",
        );
        assert_eq!(a, fp(&reordered));
    }
}
