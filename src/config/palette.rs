//! The built-in kinds as a node palette: each kind's category, description and parameter
//! specifications (type, required, default, range, choices), for a visual editor
//! ([`kinds_json`], served as `GET /kinds`).
//!
//! The parser (`kinds.rs`, `window_kind.rs`, `parse.rs`) stays the one authority on what a
//! stage may say; this table describes it and the tests below hold the two together, so the
//! palette cannot drift from what the parser accepts: every kind [`KINDS`] lists (the only
//! kinds `Kind::parse` dispatches) has an entry; a stage made of an entry's required
//! parameters parses; without any one of them it fails with that parameter missing; each
//! optional parameter (with its example value) is accepted; the parameters the parser reads
//! are exactly those listed; and the structural flags (source, one thread, bad records) are
//! the parsed kind's own.

use serde_json::{json, Map, Value};

use super::KINDS;

/// A parameter's type, as the editor chooses its control.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ty {
    /// Text (a select when it has `choices`).
    String,
    /// An integer (a slider or number field within `min`..=`max`).
    Integer,
    /// `true` or `false` (a checkbox).
    Boolean,
    /// A duration such as `"10s"` (text).
    Duration,
    /// An array of strings (a list editor).
    StringList,
    /// A TOML table, written inline (text).
    Table,
    /// Any TOML value, written as TOML (text).
    Value,
}

impl Ty {
    fn name(self) -> &'static str {
        match self {
            Ty::String => "string",
            Ty::Integer => "integer",
            Ty::Boolean => "boolean",
            Ty::Duration => "duration",
            Ty::StringList => "string_list",
            Ty::Table => "table",
            Ty::Value => "value",
        }
    }
}

/// One parameter of a built-in kind.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Param {
    pub name: &'static str,
    pub ty: Ty,
    pub required: bool,
    pub description: &'static str,
    /// The value taken when it is not given, as TOML.
    pub default: Option<&'static str>,
    pub min: Option<u64>,
    pub max: Option<u64>,
    /// The values it may take (strings).
    pub choices: &'static [&'static str],
    /// A valid value, as TOML (the tests parse it; the editor may offer it).
    pub example: &'static str,
    /// Parameters that cannot be given with this one.
    pub excludes: &'static [&'static str],
}

const fn p(name: &'static str, ty: Ty, description: &'static str, example: &'static str) -> Param {
    Param {
        name,
        ty,
        required: false,
        description,
        default: None,
        min: None,
        max: None,
        choices: &[],
        example,
        excludes: &[],
    }
}

impl Param {
    const fn required(mut self) -> Self {
        self.required = true;
        self
    }
    const fn default(mut self, d: &'static str) -> Self {
        self.default = Some(d);
        self
    }
    const fn range(mut self, min: u64, max: u64) -> Self {
        self.min = Some(min);
        self.max = Some(max);
        self
    }
    const fn choices(mut self, c: &'static [&'static str]) -> Self {
        self.choices = c;
        self
    }
    const fn excludes(mut self, e: &'static [&'static str]) -> Self {
        self.excludes = e;
        self
    }
}

/// A built-in kind as the palette shows it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct KindSpec {
    pub kind: &'static str,
    pub category: &'static str,
    /// Takes no input.
    pub source: bool,
    /// Nothing reads it.
    pub sink: bool,
    /// Runs on one thread (no `parallelism`).
    pub single: bool,
    /// Meets bad records, so takes `on_error` (and may send dead letters).
    pub record_errors: bool,
    /// Takes `ordered` (keeps input order at parallelism > 1).
    pub ordered: bool,
    /// Has a second output: its late records (`late = "<stage>"`).
    pub late_output: bool,
    pub params: &'static [Param],
    /// Parameters besides the required ones that a minimal stage needs (one of a choice).
    pub minimal: &'static [&'static str],
}

const MAX_LINE: Param = p(
    "max_line_bytes",
    Ty::Integer,
    "the longest line accepted, in bytes",
    "4096",
)
.range(1, 1 << 30)
.default("16777216");

/// Every built-in kind; `KINDS` gives their one-line descriptions.
pub(crate) const SPECS: &[KindSpec] = &[
    KindSpec {
        kind: "lines.read",
        category: "source",
        source: true,
        sink: false,
        single: false,
        record_errors: true,
        ordered: true,
        late_output: false,
        params: &[
            p("path", Ty::String, "the file to read (`-` is stdin); on Spark also a directory, a glob or a URL", "\"Cargo.toml\"").required(),
            MAX_LINE,
        ],
        minimal: &[],
    },
    KindSpec {
        kind: "ndjson.read",
        category: "source",
        source: true,
        sink: false,
        single: false,
        record_errors: true,
        ordered: true,
        late_output: false,
        params: &[
            p(
                "path",
                Ty::String,
                "the NDJSON file to read (`-` is stdin); on Spark also a directory, a glob or a URL",
                "\"Cargo.toml\"",
            )
            .required(),
            MAX_LINE,
        ],
        minimal: &[],
    },
    KindSpec {
        kind: "words",
        category: "transform",
        source: false,
        sink: false,
        single: false,
        record_errors: true,
        ordered: true,
        late_output: false,
        params: &[
            p("field", Ty::String, "the string field to split", "\"text\"").default("\"line\""),
            p("lowercase", Ty::Boolean, "lower-case every word", "true").default("false"),
        ],
        minimal: &[],
    },
    KindSpec {
        kind: "filter",
        category: "transform",
        source: false,
        sink: false,
        single: false,
        record_errors: true,
        ordered: true,
        late_output: false,
        params: &[
            p("field", Ty::String, "the field to test", "\"word\"").required(),
            p("op", Ty::String, "the comparison", "\"eq\"")
                .required()
                .choices(&["eq", "ne", "lt", "le", "gt", "ge", "exists", "contains"]),
            p(
                "value",
                Ty::Value,
                "what to compare with (none for `exists`), as TOML: \"text\", 3, true",
                "\"the\"",
            ),
        ],
        minimal: &["value"],
    },
    KindSpec {
        kind: "select",
        category: "transform",
        source: false,
        sink: false,
        single: false,
        record_errors: true,
        ordered: true,
        late_output: false,
        params: &[
            p("fields", Ty::StringList, "the fields to keep", "[\"word\"]").required(),
            p(
                "missing",
                Ty::String,
                "what to do with a listed field a record lacks",
                "\"null\"",
            )
            .choices(&["omit", "null", "error"])
            .default("\"omit\""),
        ],
        minimal: &[],
    },
    KindSpec {
        kind: "limit",
        category: "transform",
        source: false,
        sink: false,
        single: false,
        record_errors: false,
        ordered: false,
        late_output: false,
        params: &[p(
            "n",
            Ty::Integer,
            "how many records pass (then everything upstream stops)",
            "10",
        )
        .required()
        .range(0, u64::MAX)],
        minimal: &[],
    },
    KindSpec {
        kind: "count",
        category: "aggregate",
        source: false,
        sink: false,
        single: false,
        record_errors: false,
        ordered: false,
        late_output: false,
        params: &[p("key", Ty::String, "the field whose values are counted", "\"word\"").required()],
        minimal: &[],
    },
    KindSpec {
        kind: "window",
        category: "aggregate",
        source: false,
        sink: false,
        single: false,
        record_errors: true,
        ordered: false,
        late_output: true,
        params: &[
            p(
                "time_field",
                Ty::String,
                "the field holding the event time (ms since the epoch, or RFC 3339)",
                "\"ts\"",
            )
            .required(),
            p("key_field", Ty::String, "windows per value of this field", "\"user\""),
            p(
                "tumbling",
                Ty::Duration,
                "tumbling windows of this size (one of tumbling, sliding, session)",
                "\"10s\"",
            )
            .excludes(&["sliding", "session"]),
            p(
                "sliding",
                Ty::Table,
                "sliding windows: { size = \"10s\", slide = \"5s\" }",
                "{ size = \"10s\", slide = \"5s\" }",
            )
            .excludes(&["tumbling", "session"]),
            p(
                "session",
                Ty::Table,
                "session windows: { gap = \"30s\" }",
                "{ gap = \"30s\" }",
            )
            .excludes(&["tumbling", "sliding"]),
            p(
                "aggregate",
                Ty::Table,
                "the outputs: { n = \"count\", total = \"sum(amount)\" } (count, sum, min, max, mean)",
                "{ n = \"count\" }",
            )
            .required(),
            p(
                "max_out_of_orderness",
                Ty::Duration,
                "how far behind the newest event a record may be",
                "\"1s\"",
            )
            .default("\"0s\""),
            p(
                "allowed_lateness",
                Ty::Duration,
                "how long a fired window still takes late records",
                "\"5s\"",
            )
            .default("\"0s\""),
            p(
                "late",
                Ty::String,
                "records too late for every window: \"drop\", \"error\" or a stage that receives them",
                "\"drop\"",
            )
            .default("\"drop\""),
        ],
        minimal: &["tumbling"],
    },
    KindSpec {
        kind: "exec",
        category: "process",
        source: false,
        sink: false,
        single: false,
        record_errors: true,
        ordered: false,
        late_output: false,
        params: &[
            p(
                "command",
                Ty::StringList,
                "the program and its arguments: records as NDJSON on its stdin, records from its stdout",
                "[\"cat\"]",
            )
            .required(),
            p("env", Ty::Table, "environment variables: { NAME = \"value\" }", "{ A = \"1\" }"),
            p(
                "cwd",
                Ty::String,
                "its working directory (default: the pipeline file's)",
                "\".\"",
            ),
            p("timeout", Ty::Duration, "the longest a batch may take", "\"30s\""),
            p(
                "max_line_bytes",
                Ty::Integer,
                "the longest line it may print, in bytes",
                "4096",
            )
            .range(1, 1 << 30)
            .default("1048576"),
            p(
                "limits",
                Ty::Table,
                "resource limits: { address_space = \"1GiB\", cpu_seconds = 60, open_files = 64 }",
                "{ open_files = 64 }",
            ),
        ],
        minimal: &[],
    },
    KindSpec {
        kind: "ndjson.write",
        category: "sink",
        source: false,
        sink: true,
        single: true,
        record_errors: false,
        ordered: false,
        late_output: false,
        params: &[
            p(
                "path",
                Ty::String,
                "the file to write (`-` is stdout); or give `dir`",
                "\"/dev/null\"",
            )
            .excludes(&["dir"]),
            p(
                "dir",
                Ty::String,
                "a directory of part files, committed at checkpoints (instead of `path`)",
                "\"out/\"",
            )
            .excludes(&["path"]),
        ],
        minimal: &["path"],
    },
];

/// The spec of a built-in kind.
pub(crate) fn spec(kind: &str) -> Option<&'static KindSpec> {
    SPECS.iter().find(|s| s.kind == kind)
}

/// The parameters every stage of a kind takes besides its own (`input` aside, which the
/// editor draws as edges): `parallelism`, `ordered`, `on_error`.
fn common(s: &KindSpec) -> Vec<Param> {
    let mut out = Vec::new();
    if !s.single {
        out.push(
            p(
                "parallelism",
                Ty::Integer,
                "instances to run (default: 1 for sources and aggregations, the input's for stateless stages)",
                "2",
            )
            .range(1, 1024),
        );
    }
    if s.ordered {
        out.push(
            p(
                "ordered",
                Ty::Boolean,
                "keep input order across instances (parallelism > 1)",
                "true",
            )
            .default("false"),
        );
    }
    if s.record_errors {
        out.push(
            p(
                "on_error",
                Ty::String,
                "a bad record fails the run, is skipped (counted), or goes to the dead-letter stage",
                "\"skip\"",
            )
            .choices(&["fail", "skip", "dead_letter"])
            .default("\"fail\""),
        );
    }
    out
}

fn toml_json(text: &str) -> Value {
    text.parse::<toml::Value>()
        .ok()
        .or_else(|| {
            // A bare value is not a document: parse it as one key's value.
            toml::from_str::<toml::Table>(&format!("v = {text}"))
                .ok()
                .and_then(|mut t| t.remove("v"))
        })
        .and_then(|v| serde_json::to_value(v).ok())
        .unwrap_or(Value::Null)
}

fn param_json(p: &Param) -> Value {
    json!({
        "type": p.ty.name(),
        "description": p.description,
        "required": p.required,
        "default": p.default.map(toml_json),
        "enum": (!p.choices.is_empty()).then_some(p.choices),
        "min": p.min,
        "max": p.max,
        "example": toml_json(p.example),
        "excludes": p.excludes,
    })
}

/// Every built-in kind as palette entries (the shape of `GET /plugins/nodes`' nodes):
/// `{"kind", "category", "description", "source", "sink", "record_errors", "late_output",
/// "params": {name: {"type", "description", "required", "default", "enum", "min", "max",
/// "example", "excludes"}}, "minimal"}`, in [`KINDS`] order.
pub fn kinds_json() -> Value {
    let entries = KINDS
        .iter()
        .filter_map(|(kind, description)| {
            let s = spec(kind)?;
            let mut params = Map::new();
            for p in s.params.iter().copied().chain(common(s)) {
                params.insert(p.name.into(), param_json(&p));
            }
            Some(json!({
                "kind": s.kind,
                "category": s.category,
                "description": description,
                "source": s.source,
                "sink": s.sink,
                "record_errors": s.record_errors,
                "late_output": s.late_output,
                // Parameters that are not required alone but one of which is (a window's
                // tumbling, sliding or session; a sink's path or dir): the one to offer first.
                "minimal": s.minimal,
                "params": params,
            }))
        })
        .collect();
    Value::Array(entries)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::config::{ConfigErrorKind, PipelineSpec};

    /// A pipeline around one stage `s` of `kind` with `params` (TOML `key = value` lines): a
    /// source before it unless it is one, a sink after it unless it is one.
    fn pipeline(spec: &KindSpec, params: &[(&str, &str)]) -> String {
        let mut text = String::new();
        if !spec.source {
            text.push_str("[stages.src]\nkind = \"lines.read\"\npath = \"Cargo.toml\"\n\n");
        }
        text.push_str(&format!("[stages.s]\nkind = {:?}\n", spec.kind));
        if !spec.source {
            text.push_str("input = \"src\"\n");
        }
        for (k, v) in params {
            text.push_str(&format!("{k} = {v}\n"));
        }
        if !spec.sink {
            text.push_str(
                "\n[stages.out]\nkind = \"ndjson.write\"\ninput = \"s\"\npath = \"/dev/null\"\n",
            );
        }
        text
    }

    fn minimal(spec: &KindSpec) -> Vec<(&'static str, &'static str)> {
        spec.params
            .iter()
            .filter(|p| p.required || spec.minimal.contains(&p.name))
            .map(|p| (p.name, p.example))
            .collect()
    }

    /// The keys the parser read for stage `s` (what its "unknown parameter" error lists as
    /// known): the parser's own account of the kind's parameters.
    fn read_by_parser(spec: &KindSpec, params: &[(&str, &str)]) -> BTreeSet<String> {
        let mut with_typo = params.to_vec();
        with_typo.push(("zz_not_a_parameter", "1"));
        let e = PipelineSpec::from_str(&pipeline(spec, &with_typo), "palette.toml")
            .expect_err("an unknown parameter");
        assert_eq!(e.kind, ConfigErrorKind::UnknownParameter, "{e}");
        let known = e
            .message
            .split("(known: ")
            .nth(1)
            .and_then(|k| k.strip_suffix(')'))
            .unwrap_or_else(|| panic!("no known list: {e}"));
        known.split(", ").map(str::to_string).collect()
    }

    #[test]
    fn every_kind_the_parser_dispatches_has_an_entry() {
        let listed: Vec<&str> = SPECS.iter().map(|s| s.kind).collect();
        let kinds: Vec<&str> = KINDS.iter().map(|(k, _)| *k).collect();
        assert_eq!(listed.len(), kinds.len());
        for k in &kinds {
            assert!(listed.contains(k), "kind `{k}` has no palette entry");
        }
        let json = kinds_json();
        assert_eq!(json.as_array().map(Vec::len), Some(KINDS.len()));
        // A kind outside KINDS is not built in, whatever `Kind::parse` matches.
        let e = PipelineSpec::from_str(
            "[stages.s]\nkind = \"no.such\"\npath = \"x\"\n",
            "palette.toml",
        )
        .unwrap_err();
        assert_eq!(e.kind, ConfigErrorKind::UnknownKind);
    }

    #[test]
    fn required_parameters_suffice_and_each_is_required() {
        for spec in SPECS {
            let min = minimal(spec);
            let text = pipeline(spec, &min);
            let parsed = PipelineSpec::from_str(&text, "palette.toml")
                .unwrap_or_else(|e| panic!("{}: {e}\n{text}", spec.kind));
            let stage = parsed.stages.iter().find(|s| s.name == "s").unwrap();
            let info = stage.params.info();
            assert_eq!(info.source, spec.source, "{}: source", spec.kind);
            assert_eq!(info.single, spec.single, "{}: one thread", spec.kind);
            assert_eq!(
                stage.params.no_record_errors().is_none(),
                spec.record_errors,
                "{}: bad records",
                spec.kind
            );
            for req in spec.params.iter().filter(|p| p.required) {
                let without: Vec<_> = min
                    .iter()
                    .copied()
                    .filter(|(k, _)| *k != req.name)
                    .collect();
                let e = PipelineSpec::from_str(&pipeline(spec, &without), "palette.toml")
                    .expect_err(req.name);
                assert_eq!(
                    e.kind,
                    ConfigErrorKind::MissingParameter,
                    "{}: {e}",
                    spec.kind
                );
                assert_eq!(e.param(), Some(req.name), "{}: {e}", spec.kind);
                assert_eq!(e.stage(), Some("s"));
            }
        }
    }

    #[test]
    fn optional_parameters_are_accepted_and_the_list_is_what_the_parser_reads() {
        for spec in SPECS {
            let min = minimal(spec);
            let mut read = read_by_parser(spec, &min);
            let mut all = common(spec);
            all.extend(spec.params.iter().copied());
            for opt in all
                .iter()
                .filter(|p| !p.required && !spec.minimal.contains(&p.name))
            {
                let mut params: Vec<_> = min
                    .iter()
                    .copied()
                    .filter(|(k, _)| !opt.excludes.contains(k))
                    .collect();
                params.push((opt.name, opt.example));
                if opt.name == "ordered" {
                    params.push(("parallelism", "2"));
                }
                let text = pipeline(spec, &params);
                if let Err(e) = PipelineSpec::from_str(&text, "palette.toml") {
                    panic!("{} with {}: {e}\n{text}", spec.kind, opt.name);
                }
                read.extend(read_by_parser(spec, &params));
            }
            let mut listed: BTreeSet<String> = all.iter().map(|p| p.name.to_string()).collect();
            listed.extend(["kind", "input"].map(String::from));
            if spec.record_errors {
                listed.insert("dead_letter".into());
            } else {
                // Read only to refuse it (a kind that meets no bad records).
                read.remove("on_error");
                read.remove("dead_letter");
            }
            if spec.single {
                listed.insert("parallelism".into()); // read to refuse more than 1
            }
            if !spec.ordered {
                listed.insert("ordered".into()); // read to refuse it
            }
            assert_eq!(
                read, listed,
                "{}: the parser's parameters and the palette's",
                spec.kind
            );
        }
    }
}
