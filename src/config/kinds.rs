//! The built-in stage kinds of the TOML layer: their parameters (checked with line numbers) and
//! the record operations they perform on JSON objects.

use std::cmp::Ordering;
use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;

use serde_json::{Map, Value};
use toml::Spanned;

use super::parse::Ctx;
use super::{ConfigError, ConfigErrorKind};
use crate::describe::describe_toml as describe;

/// Every built-in kind, with a one-line description.
pub const KINDS: &[(&str, &str)] = &[
    ("lines.read", "source: {\"line\": text} per line of `path` (`-` is stdin)"),
    ("ndjson.read", "source: one JSON object per line of `path` (`-` is stdin)"),
    ("words", "splits string `field` (default \"line\") on whitespace into {\"word\": w} records"),
    ("count", "counts records per value of `key`; emits {key: value, \"count\": n} sorted at end of input"),
    ("filter", "keeps records where `field` `op` `value` holds (op: eq ne lt le gt ge exists contains)"),
    ("select", "keeps only the listed `fields`"),
    ("limit", "passes the first `n` records, then stops everything upstream"),
    ("exec", "runs `command`: records as NDJSON on its stdin, its stdout's NDJSON lines as records"),
    ("window", "event-time windows per `key_field` over `time_field`: tumbling, sliding or session, with `aggregate` outputs"),
    ("ndjson.write", "sink: one JSON object per line to `path` (`-` is stdout), or into part files of `dir`"),
];

/// A comparison of the `filter` kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FilterOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    Exists,
    Contains,
}

/// What `select` does with a listed field a record lacks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum SelectMissing {
    /// Leave it out (the default).
    #[default]
    Omit,
    /// Set it to null.
    Null,
    /// A record error (the stage's `on_error` decides).
    Error,
}

/// A stage kind with its validated parameters.
#[derive(Debug, Clone)]
pub(crate) enum Kind {
    LinesRead {
        path: PathBuf,
        /// The longest line accepted, not counting its `\r\n` or `\n`.
        max_line_bytes: usize,
    },
    NdjsonRead {
        path: PathBuf,
        /// The longest line accepted, not counting its `\r\n` or `\n`.
        max_line_bytes: usize,
    },
    Words {
        field: String,
        lowercase: bool,
    },
    Count {
        key: String,
    },
    Filter {
        field: String,
        op: FilterOp,
        value: Value,
    },
    Select {
        fields: Vec<String>,
        missing: SelectMissing,
    },
    Limit {
        n: u64,
    },
    Window(Box<super::window_kind::WindowParams>),
    Exec(Box<crate::exec::ExecSpec>),
    #[cfg(feature = "plugin")]
    Native(Box<crate::plugin::native::NativeSpec>),
    NdjsonWrite {
        /// The file (`-`: stdout), or with `dir` the directory of part files.
        path: PathBuf,
        /// `dir = "out/"` was given instead of `path`: part files committed at checkpoints.
        dir: bool,
    },
}

/// Structural facts about a kind.
pub(crate) struct KindInfo {
    /// Takes no input.
    pub source: bool,
    /// Runs on exactly one thread.
    pub single: bool,
}

impl Kind {
    pub(crate) fn parse(kind: &str, p: &mut Params<'_>) -> Result<Kind, ConfigError> {
        // `KINDS` is the gate: a built-in kind is one it lists (and the palette describes, see
        // `palette.rs`); an arm below that it does not list is never reached.
        if !KINDS.iter().any(|(k, _)| *k == kind) {
            return other_kind(p, kind);
        }
        Ok(match kind {
            "lines.read" => Kind::LinesRead {
                path: p.source_path("path")?,
                max_line_bytes: source_max_line(p)?,
            },
            "ndjson.read" => Kind::NdjsonRead {
                path: p.source_path("path")?,
                max_line_bytes: source_max_line(p)?,
            },
            "words" => Kind::Words {
                field: p.opt_str("field")?.unwrap_or_else(|| "line".into()),
                lowercase: p.opt_bool("lowercase")?.unwrap_or(false),
            },
            "count" => Kind::Count {
                key: p.required_str("key")?,
            },
            "filter" => {
                let field = p.required_str("field")?;
                let op_name = p.required_str("op")?;
                let op = match op_name.as_str() {
                    "eq" => FilterOp::Eq,
                    "ne" => FilterOp::Ne,
                    "lt" => FilterOp::Lt,
                    "le" => FilterOp::Le,
                    "gt" => FilterOp::Gt,
                    "ge" => FilterOp::Ge,
                    "exists" => FilterOp::Exists,
                    "contains" => FilterOp::Contains,
                    other => {
                        return Err(p.error_at(
                            "op",
                            ConfigErrorKind::BadValue,
                            format!("parameter `op`: expected one of eq, ne, lt, le, gt, ge, exists, contains, found {other:?}"),
                        ))
                    }
                };
                let value = p.opt_value("value")?;
                let value = match (op, value) {
                    (FilterOp::Exists, None) => Value::Null,
                    (FilterOp::Exists, Some(_)) => {
                        return Err(p.error_at(
                            "value",
                            ConfigErrorKind::BadValue,
                            "parameter `value`: `exists` takes no value".to_string(),
                        ))
                    }
                    (_, Some(v)) => v,
                    (_, None) => return Err(p.missing("value", "a value to compare with")),
                };
                Kind::Filter { field, op, value }
            }
            "select" => Kind::Select {
                fields: p.required_str_list("fields")?,
                missing: match p.opt_str("missing")?.as_deref() {
                    None | Some("omit") => SelectMissing::Omit,
                    Some("null") => SelectMissing::Null,
                    Some("error") => SelectMissing::Error,
                    Some(other) => {
                        return Err(p.error_at(
                            "missing",
                            ConfigErrorKind::BadValue,
                            format!("parameter `missing`: expected \"omit\", \"null\" or \"error\", found {other:?}"),
                        ))
                    }
                },
            },
            "limit" => Kind::Limit {
                n: p.required_u64("n")?,
            },
            "window" => Kind::Window(Box::new(super::window_kind::WindowParams::parse(p)?)),
            "exec" => Kind::Exec(Box::new(parse_exec(p)?)),
            "ndjson.write" => match (p.has("path"), p.has("dir")) {
                (true, true) => {
                    return Err(p.error_at(
                        "dir",
                        ConfigErrorKind::BadValue,
                        "give one of `path` (a file, `-` for stdout) and `dir` (a directory of part files), not both".into(),
                    ))
                }
                (false, true) => Kind::NdjsonWrite {
                    path: p.output_path("dir")?,
                    dir: true,
                },
                _ => Kind::NdjsonWrite {
                    path: p.output_path("path")?,
                    dir: false,
                },
            },
            other => return other_kind(p, other),
        })
    }

    /// Why a stage of this kind takes no `on_error`, if it takes none: it meets no bad
    /// records.
    pub(crate) fn no_record_errors(&self) -> Option<&'static str> {
        match self {
            Kind::Limit { .. } => Some("it passes or stops, and never rejects a record"),
            Kind::Count { .. } => Some("it counts any record (a missing key counts as null)"),
            Kind::NdjsonWrite { .. } => {
                Some("it writes any record, and a write error fails the run")
            }
            // A node reports an error for a whole batch, not for one record, so no record can
            // be skipped or routed: the error fails the stage.
            #[cfg(feature = "plugin")]
            Kind::Native(_) => Some(
                "a native plugin node reports errors per batch, not per record, so an error fails the stage",
            ),
            _ => None,
        }
    }

    pub(crate) fn info(&self) -> KindInfo {
        match self {
            Kind::LinesRead { .. } | Kind::NdjsonRead { .. } => KindInfo {
                source: true,
                single: false,
            },
            Kind::NdjsonWrite { .. } => KindInfo {
                source: false,
                single: true,
            },
            _ => KindInfo {
                source: false,
                single: false,
            },
        }
    }
}

/// Whether a source path is a pattern (Spark's glob syntax: `*`, `?`, `[..]`, `{a,b}`).
pub(crate) fn is_glob(path: &str) -> bool {
    path.contains(['*', '?', '[', '{'])
}

/// Whether a source path is a URL of a file system Spark reads (`hdfs://`, `s3a://`, ...).
pub(crate) fn is_url(path: &str) -> bool {
    path.split_once("://").is_some_and(|(scheme, _)| {
        !scheme.is_empty()
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
    })
}

/// Whether a source path is Spark's to read: a directory, a glob or a URL. `millrace run`
/// reads one local file or stdin; `millrace spark` hands these to Spark (docs/spark.md).
pub(crate) fn many_files(path: &std::path::Path) -> bool {
    let text = path.to_string_lossy();
    is_glob(&text) || is_url(&text) || path.is_dir()
}

/// A source's `max_line_bytes`: 1 to 1 GiB, 16 MiB when not given.
fn source_max_line(p: &mut Params<'_>) -> Result<usize, ConfigError> {
    let max = p.opt_u64("max_line_bytes", 1, 1 << 30)?;
    Ok(max.map_or(crate::source::MAX_LINE_BYTES, |m| m as usize))
}

/// A stage's parameter table, read with line numbers and checked for unknown keys.
pub(crate) struct Params<'a> {
    ctx: &'a Ctx<'a>,
    stage: &'a str,
    line: usize,
    table: &'a BTreeMap<Spanned<String>, Spanned<toml::Value>>,
    used: HashSet<&'static str>,
    /// Keys read whose names are not static (plugin node parameters).
    used_dyn: HashSet<String>,
}

impl<'a> Params<'a> {
    pub(crate) fn new(
        ctx: &'a Ctx<'a>,
        stage: &'a str,
        line: usize,
        table: &'a BTreeMap<Spanned<String>, Spanned<toml::Value>>,
    ) -> Self {
        Params {
            ctx,
            stage,
            line,
            table,
            used: HashSet::new(),
            used_dyn: HashSet::new(),
        }
    }

    pub(crate) fn get(&mut self, key: &'static str) -> Option<&'a Spanned<toml::Value>> {
        self.used.insert(key);
        self.table
            .iter()
            .find(|(k, _)| k.get_ref() == key)
            .map(|(_, v)| v)
    }

    /// Like `get`, for a key known only at run time (a plugin node's parameter).
    #[cfg(feature = "plugin")]
    pub(crate) fn get_dyn(&mut self, key: &str) -> Option<&'a Spanned<toml::Value>> {
        self.used_dyn.insert(key.to_string());
        self.table
            .iter()
            .find(|(k, _)| k.get_ref() == key)
            .map(|(_, v)| v)
    }

    /// Marks keys as known without reading them.
    #[cfg(feature = "plugin")]
    pub(crate) fn allow(&mut self, keys: &[&'static str]) {
        self.used.extend(keys.iter().copied());
    }

    /// Whether the table has `key`, without marking it as read.
    pub(crate) fn has(&self, key: &str) -> bool {
        self.table.iter().any(|(k, _)| k.get_ref() == key)
    }

    pub(crate) fn line_of(&self, key: &str) -> usize {
        self.table
            .iter()
            .find(|(k, _)| k.get_ref() == key)
            .map(|(_, v)| self.ctx.lines.line(v.span().start))
            .unwrap_or(self.line)
    }

    pub(crate) fn error_at(
        &self,
        key: &str,
        kind: ConfigErrorKind,
        message: String,
    ) -> ConfigError {
        ConfigError::new(
            self.ctx.file,
            Some(self.line_of(key)),
            Some(self.stage),
            kind,
            message,
        )
        .with_param(key)
    }

    pub(crate) fn missing(&self, key: &str, what: &str) -> ConfigError {
        ConfigError::new(
            self.ctx.file,
            Some(self.line),
            Some(self.stage),
            ConfigErrorKind::MissingParameter,
            format!("missing parameter `{key}`: expected {what}"),
        )
        .with_param(key)
    }

    pub(crate) fn wrong(&self, key: &str, expected: &str, found: &toml::Value) -> ConfigError {
        self.error_at(
            key,
            ConfigErrorKind::BadValue,
            format!(
                "parameter `{key}`: expected {expected}, found {}",
                describe(found)
            ),
        )
    }

    pub(crate) fn opt_str(&mut self, key: &'static str) -> Result<Option<String>, ConfigError> {
        match self.get(key).map(Spanned::get_ref) {
            None => Ok(None),
            Some(toml::Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(self.wrong(key, "a string", other)),
        }
    }

    pub(crate) fn required_str(&mut self, key: &'static str) -> Result<String, ConfigError> {
        self.opt_str(key)?
            .ok_or_else(|| self.missing(key, "a string"))
    }

    pub(crate) fn opt_bool(&mut self, key: &'static str) -> Result<Option<bool>, ConfigError> {
        match self.get(key).map(Spanned::get_ref) {
            None => Ok(None),
            Some(toml::Value::Boolean(b)) => Ok(Some(*b)),
            Some(other) => Err(self.wrong(key, "a boolean", other)),
        }
    }

    pub(crate) fn opt_u64(
        &mut self,
        key: &'static str,
        min: u64,
        max: u64,
    ) -> Result<Option<u64>, ConfigError> {
        match self.get(key).map(Spanned::get_ref) {
            None => Ok(None),
            Some(toml::Value::Integer(i)) if *i >= min as i64 && (*i as u64) <= max => {
                Ok(Some(*i as u64))
            }
            Some(other) if max >= i64::MAX as u64 => {
                Err(self.wrong(key, &format!("an integer of at least {min}"), other))
            }
            Some(other) => Err(self.wrong(key, &format!("an integer from {min} to {max}"), other)),
        }
    }

    pub(crate) fn required_u64(&mut self, key: &'static str) -> Result<u64, ConfigError> {
        self.opt_u64(key, 0, u64::MAX)?
            .ok_or_else(|| self.missing(key, "an integer"))
    }

    pub(crate) fn opt_value(&mut self, key: &'static str) -> Result<Option<Value>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => serde_json::to_value(v.get_ref()).map(Some).map_err(|e| {
                self.error_at(
                    key,
                    ConfigErrorKind::BadValue,
                    format!("parameter `{key}`: {e}"),
                )
            }),
        }
    }

    pub(crate) fn required_str_list(
        &mut self,
        key: &'static str,
    ) -> Result<Vec<String>, ConfigError> {
        match self.get(key).map(Spanned::get_ref) {
            None => Err(self.missing(key, "an array of strings")),
            Some(toml::Value::Array(items)) => items
                .iter()
                .map(|v| match v {
                    toml::Value::String(s) => Ok(s.clone()),
                    other => Err(self.wrong(key, "an array of strings", other)),
                })
                .collect(),
            Some(other) => Err(self.wrong(key, "an array of strings", other)),
        }
    }

    /// `input`: a stage name or a list of them.
    pub(crate) fn inputs(&mut self) -> Result<Vec<String>, ConfigError> {
        match self.get("input").map(Spanned::get_ref) {
            None => Ok(Vec::new()),
            Some(toml::Value::String(s)) => Ok(vec![s.clone()]),
            Some(toml::Value::Array(items)) if !items.is_empty() => items
                .iter()
                .map(|v| match v {
                    toml::Value::String(s) => Ok(s.clone()),
                    other => Err(self.wrong("input", "a stage name or a list of them", other)),
                })
                .collect(),
            Some(other) => Err(self.wrong("input", "a stage name or a list of them", other)),
        }
    }

    /// A directory relative to the pipeline file.
    pub(crate) fn resolve_dir(&self, path: &str) -> PathBuf {
        self.resolve(path)
    }

    fn resolve(&self, path: &str) -> PathBuf {
        let p = PathBuf::from(path);
        if path == "-" || p.is_absolute() {
            p
        } else {
            self.ctx.base.join(p)
        }
    }

    /// A file to read, which must exist (`-` is stdin).
    pub(crate) fn input_path(&mut self, key: &'static str) -> Result<PathBuf, ConfigError> {
        let raw = self.required_str(key)?;
        let path = self.resolve(&raw);
        if raw != "-" {
            if let Err(e) = std::fs::metadata(&path) {
                return Err(self.error_at(
                    key,
                    ConfigErrorKind::Io,
                    format!("cannot open input file {}: {e}", path.display()),
                ));
            }
        }
        Ok(path)
    }

    /// A source's file (`-` is stdin), or a directory, a glob (`*`, `?`, `[`, `{`) or a URL
    /// (`hdfs://..`), which only `millrace spark` reads ([`many_files`]; `build` refuses them):
    /// a directory must exist, and so must a glob's directory before its first pattern; a URL
    /// is not looked at.
    pub(crate) fn source_path(&mut self, key: &'static str) -> Result<PathBuf, ConfigError> {
        let raw = self.required_str(key)?;
        if is_url(&raw) {
            // `hdfs://..`, `s3a://..`: Spark's to open, as written.
            return Ok(PathBuf::from(raw));
        }
        if !is_glob(&raw) {
            return self.input_path(key);
        }
        let path = self.resolve(&raw);
        let fixed: PathBuf = path
            .components()
            .take_while(|c| !is_glob(&c.as_os_str().to_string_lossy()))
            .collect();
        if !fixed.is_dir() {
            return Err(self.error_at(
                key,
                ConfigErrorKind::Io,
                format!(
                    "the glob {}: no directory {}",
                    path.display(),
                    fixed.display()
                ),
            ));
        }
        Ok(path)
    }

    /// A file to write (`-` is stdout).
    pub(crate) fn output_path(&mut self, key: &'static str) -> Result<PathBuf, ConfigError> {
        let raw = self.required_str(key)?;
        Ok(self.resolve(&raw))
    }

    /// Rejects parameters the kind does not know (most often a typo).
    pub(crate) fn finish(&self, kind: &str) -> Result<(), ConfigError> {
        for (k, v) in self.table {
            if !self.used.contains(k.get_ref().as_str()) && !self.used_dyn.contains(k.get_ref()) {
                let mut known: Vec<&str> = self.used.iter().copied().collect();
                known.extend(self.used_dyn.iter().map(String::as_str));
                known.sort_unstable();
                return Err(ConfigError::new(
                    self.ctx.file,
                    Some(self.ctx.lines.line(v.span().start)),
                    Some(self.stage),
                    ConfigErrorKind::UnknownParameter,
                    format!(
                        "unknown parameter `{}` for kind `{kind}` (known: {})",
                        k.get_ref(),
                        known.join(", ")
                    ),
                )
                .with_param(k.get_ref()));
            }
        }
        Ok(())
    }
}

/// A kind that is not built in: a plugin node (`<plugin>.<node>`), or an error listing what
/// there is.
#[cfg(feature = "plugin")]
fn other_kind(p: &mut Params<'_>, other: &str) -> Result<Kind, ConfigError> {
    let plugins = p.ctx.plugins();
    if let Some((plugin, node)) = other.split_once('.') {
        if let Some(pl) = plugins.get(plugin) {
            return parse_plugin_node(p, pl, node);
        }
    }
    let known: Vec<&str> = KINDS.iter().map(|(k, _)| *k).collect();
    let mut names: Vec<&str> = plugins
        .plugins()
        .map(|pl| pl.manifest.name.as_str())
        .collect();
    names.sort_unstable();
    let plugins_note = if names.is_empty() {
        "no plugins found".to_string()
    } else {
        format!("plugins: {}", names.join(", "))
    };
    let broken: Vec<String> = plugins
        .broken
        .iter()
        .map(|(m, why)| format!("{}: {why}", m.display()))
        .collect();
    let broken = if broken.is_empty() {
        String::new()
    } else {
        format!("; manifests that could not be used: {}", broken.join("; "))
    };
    Err(p.error_at(
        "kind",
        ConfigErrorKind::UnknownKind,
        format!(
            "unknown kind `{other}` (built-in kinds: {}; {plugins_note}{broken})",
            known.join(", ")
        ),
    ))
}

/// A kind that is not built in: without the `plugin` feature, always an error.
#[cfg(not(feature = "plugin"))]
fn other_kind(p: &mut Params<'_>, other: &str) -> Result<Kind, ConfigError> {
    let known: Vec<&str> = KINDS.iter().map(|(k, _)| *k).collect();
    Err(p.error_at(
        "kind",
        ConfigErrorKind::UnknownKind,
        format!(
            "unknown kind `{other}` (built-in kinds: {}; plugins are not available: millrace was built without its `plugin` feature)",
            known.join(", ")
        ),
    ))
}

/// Keys a plugin node stage has besides its node's parameters.
#[cfg(feature = "plugin")]
const PLUGIN_STAGE_KEYS: &[&str] = &[
    "kind",
    "input",
    "parallelism",
    "grant",
    "timeout",
    "log_level",
    "limits",
];

/// A `<plugin>.<node>` stage: its parameters checked against the node's spec, its permissions
/// against the stage's `grant`, run as an exec stage in the plugin's directory.
#[cfg(feature = "plugin")]
fn parse_plugin_node(
    p: &mut Params<'_>,
    plugin: &crate::plugin::Plugin,
    node: &str,
) -> Result<Kind, ConfigError> {
    use crate::plugin::{check_value, toml_to_json, Entry};
    let m = &plugin.manifest;
    let Some(spec) = m.nodes.iter().find(|n| n.name == node) else {
        let nodes: Vec<&str> = m.nodes.iter().map(|n| n.name.as_str()).collect();
        return Err(p.error_at(
            "kind",
            ConfigErrorKind::UnknownKind,
            format!(
                "plugin `{}` has no node `{node}` (nodes: {})",
                m.name,
                nodes.join(", ")
            ),
        ));
    };
    let grant = match p.get("grant").map(toml::Spanned::get_ref) {
        None => Vec::new(),
        Some(toml::Value::Array(items)) => items
            .iter()
            .map(|v| match v {
                toml::Value::String(s) => Ok(s.clone()),
                other => Err(p.wrong("grant", "an array of permission names", other)),
            })
            .collect::<Result<Vec<_>, _>>()?,
        Some(other) => return Err(p.wrong("grant", "an array of permission names", other)),
    };
    for g in &grant {
        if !m.permissions.contains(g) {
            return Err(p.error_at(
                "grant",
                ConfigErrorKind::Permission,
                format!(
                    "parameter `grant`: plugin `{}` does not request {g:?} (it requests: {})",
                    m.name,
                    if m.permissions.is_empty() {
                        "nothing".to_string()
                    } else {
                        m.permissions.join(", ")
                    }
                ),
            ));
        }
    }
    if let Some(missing) = m.permissions.iter().find(|perm| !grant.contains(perm)) {
        return Err(p.error_at(
            "kind",
            ConfigErrorKind::Permission,
            format!(
                "plugin `{}` requests permission {missing:?}, which this stage does not grant: add grant = [{}] to allow it",
                m.name,
                m.permissions.iter().map(|x| format!("{x:?}")).collect::<Vec<_>>().join(", ")
            ),
        ));
    }
    let timeout = p
        .opt_duration("timeout")?
        .map(|ms| std::time::Duration::from_millis(ms.max(1) as u64));
    let mut params = serde_json::Map::new();
    for (name, ps) in &spec.params {
        let value = match p.get_dyn(name) {
            Some(v) => {
                let v = v.get_ref();
                check_value(ps, v).map_err(|e| {
                    p.error_at(
                        name,
                        ConfigErrorKind::BadValue,
                        format!("parameter `{name}` of node `{}.{node}`: {e}", m.name),
                    )
                })?;
                Some(v.clone())
            }
            None if ps.required => {
                return Err(p.missing(
                    name,
                    &format!("{} (node `{}.{node}`)", ps.ty_name(), m.name),
                ))
            }
            None => ps.default.clone(),
        };
        if let Some(v) = value {
            params.insert(name.clone(), toml_to_json(&v));
        }
    }
    let log_level = match p.opt_str("log_level")? {
        None => log::LevelFilter::Info,
        Some(l) => l.parse::<log::LevelFilter>().map_err(|_| {
            p.error_at(
                "log_level",
                ConfigErrorKind::BadValue,
                format!(
                    "parameter `log_level`: expected one of off, error, warn, info, debug, trace, found {l:?}"
                ),
            )
        })?,
    };
    p.allow(PLUGIN_STAGE_KEYS);
    p.ctx
        .plugin_files
        .borrow_mut()
        .insert(p.stage.to_string(), plugin.files());
    let entry = match &m.entry {
        Entry::Library(lib) => {
            let lib = load_native(p, plugin, lib)?;
            return Ok(Kind::Native(Box::new(crate::plugin::native::NativeSpec {
                lib,
                node: node.to_string(),
                params: serde_json::Value::Object(params),
                log_level,
                checkpoint_refusal: spec.checkpoint_refusal(plugin),
            })));
        }
        Entry::Command(entry) => entry,
    };
    let mut command = entry.clone();
    if command[0].contains('/') && std::path::Path::new(&command[0]).is_relative() {
        command[0] = plugin.dir.join(&command[0]).display().to_string();
    }
    let (limits, sandbox) = super::limits::plugin_sandbox(p, plugin, &grant)?;
    Ok(Kind::Exec(Box::new(crate::exec::ExecSpec {
        command,
        env: vec![
            ("MILLRACE_NODE".into(), node.to_string()),
            (
                "MILLRACE_PARAMS".into(),
                serde_json::Value::Object(params).to_string(),
            ),
            (
                "MILLRACE_LOG_LEVEL".into(),
                log_level.to_string().to_lowercase(),
            ),
        ],
        cwd: Some(plugin.dir.clone()),
        timeout,
        max_line_bytes: 1 << 20,
        limits,
        sandbox,
        plugin: Some(m.name.clone()),
        log_level,
        plugin_copy: None,
        on_error: crate::OnError::Fail,
        checkpoint_refusal: spec.checkpoint_refusal(plugin),
    })))
}

/// Loads (once per pipeline) and checks a native plugin's library; errors name the stage.
#[cfg(feature = "plugin")]
fn load_native(
    p: &mut Params<'_>,
    plugin: &crate::plugin::Plugin,
    lib: &str,
) -> Result<std::sync::Arc<crate::plugin::native::NativeLibrary>, ConfigError> {
    let name = &plugin.manifest.name;
    if let Some(l) = p.ctx.natives.borrow().get(name) {
        return Ok(std::sync::Arc::clone(l));
    }
    let path = plugin.dir.join(lib);
    let loaded = if p.ctx.copy_natives {
        crate::plugin::native::NativeLibrary::load_copy(name, &path)
    } else {
        crate::plugin::native::NativeLibrary::load(name, &path)
    }
    .map_err(|e| p.error_at("kind", ConfigErrorKind::Plugin, e.to_string()))?;
    p.ctx
        .natives
        .borrow_mut()
        .insert(name.clone(), std::sync::Arc::clone(&loaded));
    Ok(loaded)
}

/// The `exec` kind's parameters.
fn parse_exec(p: &mut Params<'_>) -> Result<crate::exec::ExecSpec, ConfigError> {
    let command = p.required_str_list("command")?;
    if command.is_empty() || command[0].is_empty() {
        return Err(p.error_at(
            "command",
            ConfigErrorKind::BadValue,
            "parameter `command`: expected a program and its arguments, found an empty list".into(),
        ));
    }
    let env = match p.opt_table("env")? {
        None => Vec::new(),
        Some(t) => t
            .into_iter()
            .map(|(k, v)| match v {
                toml::Value::String(s) => Ok((k, s)),
                other => Err(p.error_at(
                    "env",
                    ConfigErrorKind::BadValue,
                    format!(
                        "parameter `env.{k}`: expected a string, found {}",
                        describe(&other)
                    ),
                )),
            })
            .collect::<Result<_, _>>()?,
    };
    // The working directory is always set: the pipeline file's directory unless `cwd` says.
    let dir = p.opt_str("cwd")?.unwrap_or_else(|| ".".into());
    let cwd = Some(p.resolve_dir(&dir));
    let timeout = p
        .opt_duration("timeout")?
        .map(|ms| std::time::Duration::from_millis(ms.max(1) as u64));
    let max_line_bytes = p.opt_u64("max_line_bytes", 1, 1 << 30)?.unwrap_or(1 << 20) as usize;
    Ok(crate::exec::ExecSpec {
        command,
        env,
        cwd,
        timeout,
        max_line_bytes,
        limits: p.opt_limits()?,
        sandbox: None,
        plugin: None,
        log_level: log::LevelFilter::Trace,
        plugin_copy: None,
        on_error: crate::OnError::Fail,
        // A plain `exec` stage is stateless: its program sees a stream of records, and after a
        // resume it is started afresh on the records after the checkpoint.
        checkpoint_refusal: None,
    })
}

// ---- record operations -------------------------------------------------------------------

/// `words`: one `{"word": w}` per whitespace-separated word of `field`.
pub(crate) fn words(rec: &Value, field: &str, lowercase: bool) -> Result<Vec<Value>, String> {
    let text = match rec.get(field) {
        Some(Value::String(s)) => s,
        Some(other) => return Err(format!("field `{field}` is not a string: {other}")),
        None => return Err(format!("record has no field `{field}`: {rec}")),
    };
    Ok(text
        .split_whitespace()
        .map(|w| {
            let w = if lowercase {
                w.to_lowercase()
            } else {
                w.to_string()
            };
            let mut m = Map::with_capacity(1);
            m.insert("word".into(), Value::String(w));
            Value::Object(m)
        })
        .collect())
}

/// Orders JSON values: by type (null, bool, number, string, array, object), then by value.
pub(crate) fn cmp_values(a: &Value, b: &Value) -> Ordering {
    fn rank(v: &Value) -> u8 {
        match v {
            Value::Null => 0,
            Value::Bool(_) => 1,
            Value::Number(_) => 2,
            Value::String(_) => 3,
            Value::Array(_) => 4,
            Value::Object(_) => 5,
        }
    }
    match (a, b) {
        (Value::Bool(x), Value::Bool(y)) => x.cmp(y),
        (Value::Number(x), Value::Number(y)) => match (x.as_i64(), y.as_i64()) {
            (Some(i), Some(j)) => i.cmp(&j),
            _ => {
                let (f, g) = (
                    x.as_f64().unwrap_or(f64::NAN),
                    y.as_f64().unwrap_or(f64::NAN),
                );
                f.partial_cmp(&g).unwrap_or(Ordering::Equal)
            }
        },
        (Value::String(x), Value::String(y)) => x.cmp(y),
        _ if rank(a) == rank(b) => a.to_string().cmp(&b.to_string()),
        _ => rank(a).cmp(&rank(b)),
    }
}

fn json_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(_), Value::Number(_)) => cmp_values(a, b) == Ordering::Equal,
        _ => a == b,
    }
}

/// `filter`: whether `rec` passes, or why it cannot be tested. `eq` and `ne` compare a missing
/// field as `null` and `exists` tests presence: they never fail. `lt`, `le`, `gt` and `ge` fail
/// on a missing field or one of another type than `value`; `contains` on a missing field or one
/// that is neither a string nor an array.
pub(crate) fn filter(
    rec: &Value,
    field: &str,
    op: FilterOp,
    value: &Value,
) -> Result<bool, String> {
    filter_got(rec.get(field), field, op, value)
}

/// [`filter`] on the record's field `field` (`None`: the record has no such field).
pub(crate) fn filter_got(
    got: Option<&Value>,
    field: &str,
    op: FilterOp,
    value: &Value,
) -> Result<bool, String> {
    let v = got.unwrap_or(&Value::Null);
    let ordered = |want: fn(Ordering) -> bool| match got {
        None => Err(format!("record has no field `{field}` to compare")),
        Some(v) if std::mem::discriminant(v) != std::mem::discriminant(value) => Err(format!(
            "field `{field}` is {}, not {} like {value}",
            crate::describe::kind_of(v),
            crate::describe::kind_of(value)
        )),
        Some(v) => Ok(want(cmp_values(v, value))),
    };
    match op {
        FilterOp::Exists => Ok(got.is_some()),
        FilterOp::Eq => Ok(json_eq(v, value)),
        FilterOp::Ne => Ok(!json_eq(v, value)),
        FilterOp::Lt => ordered(|o| o == Ordering::Less),
        FilterOp::Le => ordered(|o| o != Ordering::Greater),
        FilterOp::Gt => ordered(|o| o == Ordering::Greater),
        FilterOp::Ge => ordered(|o| o != Ordering::Less),
        FilterOp::Contains => match (got, value) {
            (None, _) => Err(format!("record has no field `{field}` to search")),
            (Some(Value::String(s)), Value::String(needle)) => Ok(s.contains(needle.as_str())),
            (Some(Value::String(_)), _) => Ok(false),
            (Some(Value::Array(items)), x) => Ok(items.iter().any(|i| json_eq(i, x))),
            (Some(other), _) => Err(format!(
                "field `{field}` is {}, not a string or an array",
                crate::describe::kind_of(other)
            )),
        },
    }
}

/// `select`: keeps only `fields` (objects keep their keys sorted); a listed field the record
/// lacks is left out, set to null, or (`SelectMissing::Error`) an error that gives the record
/// back.
pub(crate) fn select(
    rec: Value,
    fields: &[String],
    missing: SelectMissing,
) -> Result<Value, (Value, String)> {
    let Value::Object(mut m) = rec else {
        return Ok(rec);
    };
    if missing == SelectMissing::Error {
        if let Some(f) = fields.iter().find(|f| !m.contains_key(f.as_str())) {
            let msg = format!("record has no field `{f}` to select");
            return Err((Value::Object(m), msg));
        }
    }
    let mut out = Map::with_capacity(fields.len());
    for f in fields {
        match m.remove(f) {
            Some(v) => {
                out.insert(f.clone(), v);
            }
            None if missing == SelectMissing::Null => {
                out.insert(f.clone(), Value::Null);
            }
            None => {}
        }
    }
    Ok(Value::Object(out))
}
