//! Planning a TOML pipeline for Apache Spark (`millrace spark`, `docs/spark.md`): where the
//! pipeline is cut, what runs inside each partition, and what Spark does between the cuts.
//!
//! This module owns the plan and the segment files; it runs nothing. The driver program
//! (`integrations/spark/millrace_spark.py`) executes the plan's JSON; each [`Step::Segment`]
//! runs in every partition as `millrace segment PIPELINE --stages a,b --input lines|ndjson`,
//! whose pipeline [`segment_toml`] writes: the named stages between a stdin source and a stdout
//! sink.
//!
//! The cuts:
//!
//! - A keyed `count` runs at the end of the segment before it, in every partition: there it is
//!   the combiner, and its output, one `{key: value, "count": n}` per key and partition, is what
//!   the shuffle carries. [`Step::Counts`] sums the partial counts per key (Spark's
//!   `reduceByKey`) and sorts them as `count` sorts (count descending, then key), over every
//!   partition. The next segment starts after it (with no stages when the sink follows: it
//!   writes the records as `ndjson.write` would).
//! - A `window` starts a segment. [`Step::WindowSort`] shuffles the records by the window's
//!   key and sorts each partition by event time, so each key's events reach the window in time
//!   order with one watermark rising over them: no record can be late.
//! - A `limit` keeps the first `n` records over every partition, in partition order
//!   ([`Step::Limit`]).
//! - The sink (`ndjson.write`) becomes the job's output directory, one part file per
//!   partition, committed by Spark.
//!
//! What cannot run is refused with the stage and its line: a pipeline that is not one straight
//! line (several sources, a stage with several inputs or readers), stdin and stdout, late and
//! dead-letter outputs, and a `[checkpoint]` table (Spark re-runs lost tasks instead).

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::kinds::Kind;
use super::parse::{PolicySpec, StageSpec};
use super::window_kind::LatePolicy;
use super::PipelineSpec;
use crate::error::{ConfigError, ConfigErrorKind};

/// What a segment reads on stdin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SegmentInput {
    /// Text lines, as `lines.read` makes records of them (`{"line": text}`).
    Lines,
    /// One JSON object per line.
    Ndjson,
}

impl SegmentInput {
    /// The name used on the command line and in the plan.
    pub fn as_str(self) -> &'static str {
        match self {
            SegmentInput::Lines => "lines",
            SegmentInput::Ndjson => "ndjson",
        }
    }

    /// Parses [`as_str`](Self::as_str)'s names.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "lines" => Some(SegmentInput::Lines),
            "ndjson" => Some(SegmentInput::Ndjson),
            _ => None,
        }
    }

    fn source_kind(self) -> &'static str {
        match self {
            SegmentInput::Lines => "lines.read",
            SegmentInput::Ndjson => "ndjson.read",
        }
    }
}

/// One step of a [`SparkPlan`], in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// `stages` run as one millrace process per partition, reading `input` on stdin and
    /// writing NDJSON on stdout. No stages: the records are rewritten as `ndjson.write` writes
    /// them.
    Segment {
        /// The stages, in order.
        stages: Vec<String>,
        /// What the process reads.
        input: SegmentInput,
    },
    /// The shuffle after a `count` stage (which ended the segment before, as the combiner):
    /// partial counts summed per value of `key`, sorted as `count` sorts over every partition.
    Counts {
        /// The `count` stage.
        stage: String,
        /// Its `key` field.
        key: String,
    },
    /// The shuffle before a `window` stage: records partitioned by the value of `key_field`
    /// (null when absent) and each partition sorted by `time_field`.
    WindowSort {
        /// The `window` stage.
        stage: String,
        /// Its `key_field` (`None`: one key).
        key_field: Option<String>,
        /// Its `time_field`.
        time_field: String,
    },
    /// The first `n` records over every partition, in partition order.
    Limit {
        /// The `limit` stage.
        stage: String,
        /// Its `n`.
        n: u64,
    },
}

/// Where a pipeline is cut for Spark, and what runs between the cuts: see the module docs.
#[derive(Debug, Clone, PartialEq)]
pub struct SparkPlan {
    /// The pipeline's name.
    pub name: String,
    /// The pipeline file.
    pub file: PathBuf,
    /// The source stage.
    pub source: String,
    /// What the source reads: a file or a directory (every file in it), as Spark text input.
    pub input_path: PathBuf,
    /// How the source makes records of lines.
    pub input: SegmentInput,
    /// The steps, in order.
    pub steps: Vec<Step>,
    /// The sink stage (its records become the output directory's part files).
    pub sink: String,
}

impl SparkPlan {
    /// Plans `spec` (see the module docs); an error names the stage that cannot run on Spark.
    pub fn new(spec: &PipelineSpec) -> Result<SparkPlan, ConfigError> {
        plan(spec)
    }

    /// The plan as the driver program reads it.
    pub fn to_json(&self) -> Value {
        let steps: Vec<Value> = self
            .steps
            .iter()
            .map(|s| match s {
                Step::Segment { stages, input } => {
                    json!({"op": "segment", "stages": stages, "input": input.as_str()})
                }
                Step::Counts { stage, key } => json!({"op": "counts", "stage": stage, "key": key}),
                Step::WindowSort {
                    stage,
                    key_field,
                    time_field,
                } => json!({
                    "op": "window_sort", "stage": stage, "key_field": key_field,
                    "time_field": time_field,
                }),
                Step::Limit { stage, n } => json!({"op": "limit", "stage": stage, "n": n}),
            })
            .collect();
        json!({
            "name": self.name,
            "file": self.file,
            "source": self.source,
            "input_path": self.input_path,
            "input": self.input.as_str(),
            "steps": steps,
            "sink": self.sink,
        })
    }

    /// The plan for people (`millrace spark --explain`): one line per step, with the
    /// partition counts.
    pub fn explain(&self, partitions: usize) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "pipeline `{}` ({}) on Spark:",
            self.name,
            self.file.display()
        );
        let _ = writeln!(
            s,
            "  read    `{}`: {} as Spark text input ({}), at least {partitions} partitions; a line is never cut",
            self.source,
            self.input_path.display(),
            self.input.as_str()
        );
        for (i, step) in self.steps.iter().enumerate() {
            match step {
                Step::Segment { stages, input } if stages.is_empty() => {
                    let _ = writeln!(
                        s,
                        "  segment {i}: no stages (records written as ndjson.write writes them), one millrace process per partition"
                    );
                    let _ = input;
                }
                Step::Segment { stages, input } => {
                    let _ = writeln!(
                        s,
                        "  segment {i}: {} ({} on stdin), one millrace process per partition",
                        stages.join(" → "),
                        input.as_str()
                    );
                }
                Step::Counts { stage, key } => {
                    let _ = writeln!(
                        s,
                        "  shuffle {i}: `{stage}`'s partial counts by `{key}` into {partitions} partitions (reduceByKey), then sorted by count, then `{key}`, over every partition"
                    );
                }
                Step::WindowSort {
                    stage,
                    key_field,
                    time_field,
                } => {
                    let key = key_field
                        .as_deref()
                        .map_or("(one key)".into(), |k| format!("`{k}`"));
                    let _ = writeln!(
                        s,
                        "  shuffle {i}: records by {key} into {partitions} partitions, each sorted by `{time_field}` (repartitionAndSortWithinPartitions) for window `{stage}`"
                    );
                }
                Step::Limit { stage, n } => {
                    let _ = writeln!(
                        s,
                        "  limit   {i}: `{stage}`: the first {n} records over every partition, in partition order"
                    );
                }
            }
        }
        let _ = writeln!(
            s,
            "  write   `{}`: the output directory, one part file per partition (Spark's output committer)",
            self.sink
        );
        s
    }
}

/// The driver program, built into the library so that the binary is all a user installs.
pub const DRIVER: &str = include_str!("../../integrations/spark/millrace_spark.py");

/// What `spark-submit` is given for one job: the plan as JSON and the [`DRIVER`], in a
/// directory of this process's own (mode 0700, an unpredictable name under the temporary
/// directory: see `private_dir.rs` for why), removed when this is dropped.
#[derive(Debug)]
pub struct JobFiles {
    dir: crate::private_dir::PrivateDir,
    plan: PathBuf,
    driver: PathBuf,
}

impl JobFiles {
    /// Writes `plan` and the driver.
    pub fn write(plan: &SparkPlan) -> std::io::Result<JobFiles> {
        let dir = crate::private_dir::PrivateDir::new("millrace-spark-")?;
        let put = |name: &str, text: &str| -> std::io::Result<PathBuf> {
            let path = dir.path().join(name);
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)?;
            f.write_all(text.as_bytes())?;
            Ok(path)
        };
        let plan = put("plan.json", &plan.to_json().to_string())?;
        let driver = put("millrace_spark.py", DRIVER)?;
        Ok(JobFiles { dir, plan, driver })
    }

    /// The plan's file.
    pub fn plan(&self) -> &Path {
        &self.plan
    }

    /// The driver program's file.
    pub fn driver(&self) -> &Path {
        &self.driver
    }

    /// The directory holding both.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

fn refuse(spec: &PipelineSpec, st: Option<&StageSpec>, why: impl Into<String>) -> ConfigError {
    ConfigError::new(
        &spec.file,
        st.map(|s| s.line),
        st.map(|s| s.name.as_str()),
        ConfigErrorKind::NotOnSpark,
        why,
    )
}

fn plan(spec: &PipelineSpec) -> Result<SparkPlan, ConfigError> {
    if spec.checkpoint.is_some() {
        return Err(refuse(
            spec,
            None,
            "a pipeline with a [checkpoint] table cannot run on Spark: Spark re-runs the tasks a lost worker had instead; remove the table",
        ));
    }
    // Every stage but the source has one input; every stage but the sink one reader.
    let readers = |name: &str| {
        spec.stages
            .iter()
            .filter(|s| s.inputs.iter().any(|i| i == name))
            .collect::<Vec<_>>()
    };
    for st in &spec.stages {
        if st.late_of.is_some() {
            return Err(refuse(
                spec,
                Some(st),
                "receives a window's late records: late outputs cannot run on Spark (each partition is sorted by event time, so no record is late there); remove the stage and the window's `late`",
            ));
        }
        if st.dead_letter_target || matches!(st.on_error, PolicySpec::DeadLetter(_)) {
            return Err(refuse(
                spec,
                Some(st),
                "dead letters cannot run on Spark yet: use on_error = \"fail\" or \"skip\"",
            ));
        }
    }
    for st in &spec.stages {
        if st.inputs.len() > 1 {
            return Err(refuse(
                spec,
                Some(st),
                "reads from several stages: only a straight line of stages can run on Spark",
            ));
        }
        if readers(&st.name).len() > 1 {
            return Err(refuse(
                spec,
                Some(st),
                "is read by several stages: only a straight line of stages can run on Spark",
            ));
        }
    }
    let sources: Vec<&StageSpec> = spec.stages.iter().filter(|s| s.inputs.is_empty()).collect();
    let [source] = sources[..] else {
        return Err(refuse(
            spec,
            sources.get(1).copied(),
            "has a second source: a pipeline on Spark reads one source",
        ));
    };
    let (input_path, input) = match &source.params {
        Kind::LinesRead { path, .. } => (path, SegmentInput::Lines),
        Kind::NdjsonRead { path, .. } => (path, SegmentInput::Ndjson),
        _ => {
            return Err(refuse(
                spec,
                Some(source),
                format!(
                    "kind `{}` cannot be a source on Spark: use lines.read or ndjson.read",
                    source.kind
                ),
            ))
        }
    };
    if input_path.as_os_str() == "-" {
        return Err(refuse(
            spec,
            Some(source),
            "reads stdin: a pipeline on Spark reads a file or a directory (Spark splits it across partitions)",
        ));
    }
    let mut steps = Vec::new();
    let mut segment: Vec<String> = Vec::new();
    let mut seg_input = input;
    let mut at = source;
    let sink = loop {
        let next = readers(&at.name);
        let Some(&st) = next.first() else {
            return Err(refuse(
                spec,
                Some(at),
                "is read by no stage and is not an ndjson.write: a pipeline on Spark ends in one ndjson.write",
            ));
        };
        at = st;
        let close = |segment: &mut Vec<String>, steps: &mut Vec<Step>, input: SegmentInput| {
            if !segment.is_empty() {
                steps.push(Step::Segment {
                    stages: std::mem::take(segment),
                    input,
                });
            }
        };
        match &st.params {
            Kind::NdjsonWrite { path, .. } => {
                if path.as_os_str() == "-" {
                    return Err(refuse(
                        spec,
                        Some(st),
                        "writes stdout: on Spark the output is a directory of part files (--output DIR)",
                    ));
                }
                if !readers(&st.name).is_empty() {
                    return Err(refuse(spec, Some(st), "a sink that is read from"));
                }
                // After a step the driver runs, a segment with no stages writes the records as
                // ndjson.write does (sorted keys, the same number formatting).
                if segment.is_empty() && !matches!(steps.last(), Some(Step::Segment { .. })) {
                    steps.push(Step::Segment {
                        stages: Vec::new(),
                        input: seg_input,
                    });
                }
                close(&mut segment, &mut steps, seg_input);
                break st;
            }
            Kind::Count { key } => {
                segment.push(st.name.clone());
                close(&mut segment, &mut steps, seg_input);
                steps.push(Step::Counts {
                    stage: st.name.clone(),
                    key: key.clone(),
                });
                seg_input = SegmentInput::Ndjson;
            }
            Kind::Window(w) => {
                if let LatePolicy::Stage(_) = w.late {
                    return Err(refuse(
                        spec,
                        Some(st),
                        "sends late records to a stage: late outputs cannot run on Spark (each partition is sorted by event time, so no record is late there); use late = \"drop\" or \"error\"",
                    ));
                }
                close(&mut segment, &mut steps, seg_input);
                steps.push(Step::WindowSort {
                    stage: st.name.clone(),
                    key_field: w.key_field.clone(),
                    time_field: w.time_field.clone(),
                });
                seg_input = SegmentInput::Ndjson;
                segment.push(st.name.clone());
            }
            Kind::Limit { n } => {
                close(&mut segment, &mut steps, seg_input);
                steps.push(Step::Limit {
                    stage: st.name.clone(),
                    n: *n,
                });
                seg_input = SegmentInput::Ndjson;
            }
            Kind::LinesRead { .. } | Kind::NdjsonRead { .. } => {
                unreachable!("a source has no input")
            }
            // Stateless: words, filter, select, exec, plugin nodes.
            _ => segment.push(st.name.clone()),
        }
    };
    // The input is read by millrace first, always: a bad line fails (or is skipped) as the
    // source's `on_error` says, with its message, and the steps in between read what millrace
    // wrote (JSON objects, UTF-8).
    if !matches!(steps.first(), Some(Step::Segment { .. })) {
        steps.insert(
            0,
            Step::Segment {
                stages: Vec::new(),
                input,
            },
        );
    }
    Ok(SparkPlan {
        name: spec.name.clone(),
        file: spec.file.clone(),
        source: source.name.clone(),
        input_path: input_path.clone(),
        input,
        steps,
        sink: sink.name.clone(),
    })
}

/// The pipeline a segment runs: `stages` of the pipeline `text` (in this order, each reading
/// the one before), the first reading `input` from stdin, the last written to stdout as NDJSON.
/// Top-level settings (`name`, `plugin_dirs`, `[options]`) are kept; `[checkpoint]` is not.
/// The stdin source is named after the pipeline's source when the first stage reads it (else
/// `__spark_in`), the stdout sink `__spark_out`.
/// `file` names the pipeline in errors.
pub fn segment_toml(
    text: &str,
    file: &Path,
    stages: &[String],
    input: SegmentInput,
) -> Result<String, ConfigError> {
    let bad = |why: String| ConfigError::new(file, None, None, ConfigErrorKind::NotOnSpark, why);
    let mut doc: toml::Table = toml::from_str(text)
        .map_err(|e| bad(format!("invalid TOML: {}", e.message().trim_end())))?;
    let mut all = match doc.remove("stages") {
        Some(toml::Value::Table(t)) => t,
        _ => return Err(bad("the file has no [stages] table".into())),
    };
    doc.remove("checkpoint");
    // The stdin source takes the name of the pipeline's source when the segment reads it, so
    // that an error in a bad input line names the stage the user wrote.
    let source_name = stages
        .first()
        .and_then(|first| all.get(first)?.get("input")?.as_str())
        .filter(|input| {
            let kind = all
                .get(*input)
                .and_then(|t| t.get("kind"))
                .and_then(|k| k.as_str());
            matches!(kind, Some("lines.read" | "ndjson.read"))
        })
        .map(str::to_string);
    let source_name = source_name.unwrap_or_else(|| "__spark_in".to_string());
    let in_name = source_name.as_str();
    const OUT: &str = "__spark_out";
    let mut out = toml::Table::new();
    let mut source = toml::Table::new();
    source.insert("kind".into(), input.source_kind().into());
    source.insert("path".into(), "-".into());
    out.insert(in_name.into(), source.into());
    let mut prev = in_name.to_string();
    for name in stages {
        let Some(toml::Value::Table(mut st)) = all.remove(name) else {
            return Err(bad(format!(
                "no stage `{name}` in the pipeline (or named twice in --stages)"
            )));
        };
        st.insert("input".into(), prev.clone().into());
        out.insert(name.clone(), st.into());
        prev = name.clone();
    }
    let mut sink = toml::Table::new();
    sink.insert("kind".into(), "ndjson.write".into());
    sink.insert("input".into(), prev.into());
    sink.insert("path".into(), "-".into());
    out.insert(OUT.into(), sink.into());
    doc.insert("stages".into(), out.into());
    toml::to_string(&doc).map_err(|e| bad(format!("cannot write the segment: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(text: &str) -> PipelineSpec {
        PipelineSpec::from_str(text, Path::new("Cargo.toml")).expect("valid")
    }

    const WORDS: &str = r#"
name = "wc"
[stages.read]
kind = "lines.read"
path = "Cargo.toml"
[stages.words]
kind = "words"
input = "read"
[stages.count]
kind = "count"
input = "words"
key = "word"
[stages.top]
kind = "limit"
input = "count"
n = 10
[stages.out]
kind = "ndjson.write"
input = "top"
path = "out.ndjson"
"#;

    #[test]
    fn count_is_the_combiner_and_the_sink_gets_a_formatting_segment() {
        let p = SparkPlan::new(&spec(WORDS)).unwrap();
        assert_eq!(p.input, SegmentInput::Lines);
        assert_eq!(
            p.steps,
            vec![
                Step::Segment {
                    stages: vec!["words".into(), "count".into()],
                    input: SegmentInput::Lines
                },
                Step::Counts {
                    stage: "count".into(),
                    key: "word".into()
                },
                Step::Limit {
                    stage: "top".into(),
                    n: 10
                },
                Step::Segment {
                    stages: vec![],
                    input: SegmentInput::Ndjson
                },
            ]
        );
        assert_eq!(p.sink, "out");
        let e = p.explain(4);
        assert!(
            e.contains("segment 0: words → count (lines on stdin)"),
            "{e}"
        );
        assert!(e.contains("into 4 partitions (reduceByKey)"), "{e}");
        assert_eq!(p.to_json()["steps"][1]["op"], "counts");
    }

    #[test]
    fn a_window_starts_a_segment_after_its_shuffle() {
        let text = r#"
[stages.read]
kind = "ndjson.read"
path = "Cargo.toml"
[stages.big]
kind = "filter"
input = "read"
field = "v"
op = "gt"
value = 1
[stages.w]
kind = "window"
input = "big"
key_field = "k"
time_field = "ts"
tumbling = "10s"
aggregate = { n = "count" }
[stages.keep]
kind = "select"
input = "w"
fields = ["key", "n"]
[stages.out]
kind = "ndjson.write"
input = "keep"
path = "out.ndjson"
"#;
        let p = SparkPlan::new(&spec(text)).unwrap();
        assert_eq!(
            p.steps,
            vec![
                Step::Segment {
                    stages: vec!["big".into()],
                    input: SegmentInput::Ndjson
                },
                Step::WindowSort {
                    stage: "w".into(),
                    key_field: Some("k".into()),
                    time_field: "ts".into()
                },
                Step::Segment {
                    stages: vec!["w".into(), "keep".into()],
                    input: SegmentInput::Ndjson
                },
            ]
        );
    }

    #[test]
    fn the_source_is_read_by_millrace_first() {
        let text = r#"
[stages.read]
kind = "ndjson.read"
path = "Cargo.toml"
[stages.w]
kind = "window"
input = "read"
time_field = "ts"
tumbling = "10s"
aggregate = { n = "count" }
[stages.out]
kind = "ndjson.write"
input = "w"
path = "out.ndjson"
"#;
        let p = SparkPlan::new(&spec(text)).unwrap();
        assert_eq!(
            p.steps[..2],
            [
                Step::Segment {
                    stages: vec![],
                    input: SegmentInput::Ndjson
                },
                Step::WindowSort {
                    stage: "w".into(),
                    key_field: None,
                    time_field: "ts".into()
                },
            ]
        );
    }

    #[test]
    fn stdin_stdout_late_outputs_and_checkpoints_are_refused_naming_the_stage() {
        let stdout = WORDS.replace("path = \"out.ndjson\"", "path = \"-\"");
        let e = SparkPlan::new(&spec(&stdout)).unwrap_err();
        assert_eq!(e.kind, ConfigErrorKind::NotOnSpark);
        assert_eq!(e.stage_name.as_deref(), Some("out"));
        assert!(e.message.contains("writes stdout"), "{e}");
        assert_eq!(e.line, Some(17));

        let stdin = WORDS.replace("path = \"Cargo.toml\"", "path = \"-\"");
        let e = SparkPlan::new(&spec(&stdin)).unwrap_err();
        assert_eq!(e.stage_name.as_deref(), Some("read"));
        assert!(e.message.contains("reads stdin"), "{e}");

        let late = r#"
[stages.read]
kind = "ndjson.read"
path = "Cargo.toml"
[stages.w]
kind = "window"
input = "read"
time_field = "ts"
tumbling = "10s"
aggregate = { n = "count" }
late = "late"
[stages.out]
kind = "ndjson.write"
input = "w"
path = "out.ndjson"
[stages.late]
kind = "ndjson.write"
path = "late.ndjson"
"#;
        let e = SparkPlan::new(&spec(late)).unwrap_err();
        assert_eq!(e.kind, ConfigErrorKind::NotOnSpark);
        assert_eq!(e.stage_name.as_deref(), Some("late"));
        assert!(
            e.message.contains("receives a window's late records"),
            "{e}"
        );

        let cp = format!("{WORDS}\n[checkpoint]\ndir = \"cp\"\n");
        let e = SparkPlan::new(&spec(&cp)).unwrap_err();
        assert!(e.message.contains("[checkpoint]"), "{e}");
    }

    #[test]
    fn directories_globs_and_urls_are_for_spark_only() {
        let dir = std::env::temp_dir().join(format!("millrace-spark-glob-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (path, shown) in [
            (dir.display().to_string(), dir.display().to_string()),
            (
                format!("{}/part-*.txt", dir.display()),
                format!("{}/part-*.txt", dir.display()),
            ),
        ] {
            let text = WORDS.replace("path = \"Cargo.toml\"", &format!("path = {path:?}"));
            let s = spec(&text);
            let p = SparkPlan::new(&s).unwrap();
            assert_eq!(p.input_path, PathBuf::from(&shown));
            let Err(e) = s.build() else {
                panic!("a run on one machine refuses {path}")
            };
            assert_eq!(e.kind, ConfigErrorKind::BadValue);
            assert_eq!((e.stage_name.as_deref(), e.line), (Some("read"), Some(3)));
            assert!(e.message.contains("is a directory, a glob or a URL"), "{e}");
        }
        let text = WORDS.replace(
            "path = \"Cargo.toml\"",
            "path = \"hdfs://nn:8020/logs/day=1/\"",
        );
        let s = spec(&text);
        assert_eq!(
            SparkPlan::new(&s).unwrap().input_path,
            PathBuf::from("hdfs://nn:8020/logs/day=1/")
        );
        assert!(s.build().is_err());
        let text = WORDS.replace("path = \"Cargo.toml\"", "path = \"/no/such/dir/*.txt\"");
        let e = PipelineSpec::from_str(&text, Path::new("Cargo.toml")).unwrap_err();
        assert_eq!(e.kind, ConfigErrorKind::Io);
        assert!(e.message.contains("no directory /no/such/dir"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_segment_is_the_named_stages_between_stdin_and_stdout() {
        let seg = segment_toml(
            WORDS,
            Path::new("wc.toml"),
            &["words".into(), "count".into()],
            SegmentInput::Lines,
        )
        .unwrap();
        let s = spec(&seg);
        let names: Vec<(&str, &str, Vec<String>)> = s
            .stages
            .iter()
            .map(|s| (s.name.as_str(), s.kind.as_str(), s.inputs.clone()))
            .collect();
        assert_eq!(
            names,
            vec![
                ("read", "lines.read", vec![]),
                ("words", "words", vec!["read".to_string()]),
                ("count", "count", vec!["words".to_string()]),
                ("__spark_out", "ndjson.write", vec!["count".to_string()]),
            ]
        );
        let e = segment_toml(
            WORDS,
            Path::new("wc.toml"),
            &["nope".into()],
            SegmentInput::Ndjson,
        )
        .unwrap_err();
        assert!(e.message.contains("no stage `nope`"), "{e}");
    }
}
