//! Reading a pipeline file into a validated [`PipelineSpec`], keeping line numbers for errors.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::kinds::{self, Kind, Params};
use super::{ConfigError, ConfigErrorKind};
use crate::describe::describe_toml;
use crate::Options;

type RawTable = BTreeMap<Spanned<String>, Spanned<toml::Value>>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPipeline {
    name: Option<String>,
    /// Directories searched for plugins first (relative to the file).
    #[serde(default)]
    plugin_dirs: Vec<String>,
    options: Option<Spanned<RawTable>>,
    /// Checkpointing (see `checkpoint.rs`).
    checkpoint: Option<Spanned<RawTable>>,
    #[serde(default)]
    stages: BTreeMap<Spanned<String>, Spanned<RawTable>>,
}

/// Byte offset → 1-based line.
pub(crate) struct Lines(Vec<usize>);

impl Lines {
    fn new(text: &str) -> Self {
        Lines(
            std::iter::once(0)
                .chain(text.match_indices('\n').map(|(i, _)| i + 1))
                .collect(),
        )
    }
    pub(crate) fn line(&self, offset: usize) -> usize {
        self.0.partition_point(|&start| start <= offset)
    }
}

/// One stage of a pipeline file, validated.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct StageSpec {
    /// The stage's name (its table key).
    pub name: String,
    /// Its `kind`.
    pub kind: String,
    /// The stages it reads from, in order.
    pub inputs: Vec<String>,
    /// Instances to run: as declared; otherwise 1 for sources and aggregations, and the
    /// input's for stateless stages (so they fuse with it).
    pub parallelism: usize,
    /// Whether `parallelism` was written in the file.
    pub(crate) explicit_parallelism: bool,
    /// `ordered = true`: the stage's instances keep input order (a stateless stage or a source
    /// with `parallelism > 1`; see `Stream::ordered`).
    pub(crate) ordered: bool,
    /// Line of the stage's table header.
    pub line: usize,
    /// Line of its `input` parameter (the header's when absent).
    pub(crate) input_line: usize,
    /// The window stage whose late records this stage receives (its only input then).
    pub(crate) late_of: Option<String>,
    /// What the stage does with a bad record (`on_error`, `dead_letter`).
    pub(crate) on_error: PolicySpec,
    /// Line of its `dead_letter` parameter (the header's when absent).
    pub(crate) dead_letter_line: usize,
    /// Whether the stage receives dead letters (another stage names it in `dead_letter`).
    pub(crate) dead_letter_target: bool,
    pub(crate) params: kinds::Kind,
    /// The stage's table as written, for a reload to see whether it changed.
    pub(crate) raw: String,
    /// Files the stage depends on besides the pipeline file (a plugin's manifest, program or
    /// library), for a reload to watch.
    pub(crate) files: Vec<PathBuf>,
    /// Its kind and the parameters that shape its state, canonical (see
    /// `checkpoint::fingerprint`): a resume refuses a changed stateful stage.
    pub(crate) fingerprint: String,
}

/// A stage's error policy as written: `on_error = "fail" | "skip" | "dead_letter"` with
/// `dead_letter = "<stage>"`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) enum PolicySpec {
    #[default]
    Fail,
    Skip,
    DeadLetter(String),
}

/// A parsed and validated pipeline file, ready to [`build`](PipelineSpec::build).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct PipelineSpec {
    /// The pipeline's `name` (default: the file stem).
    pub name: String,
    /// The file it was read from; relative paths inside resolve against its directory.
    pub file: PathBuf,
    /// Run options from the `[options]` table.
    pub options: Options,
    /// The stages in a topological order: every stage after its inputs.
    pub stages: Vec<StageSpec>,
    /// Whether a pipeline that only moves records between `ndjson.read`, `exec` and
    /// `ndjson.write` may pass them as checked bytes instead of values (default true; see
    /// docs/config.md, "The byte path"). `[options] byte_path = false` (or setting this field
    /// to false) forces the value path.
    pub byte_path: bool,
    /// Checkpointing, from the `[checkpoint]` table (`None` without one). Its `dir` is
    /// resolved against the file's directory; its `start` is the default (refuse a directory
    /// holding checkpoints of an unfinished run) until the caller sets it (`run --resume`,
    /// `--fresh`).
    pub checkpoint: Option<crate::checkpoint::CheckpointOptions>,
    /// When reading began (before the pipeline file, manifests or libraries were read): a
    /// file changed since may not be what was read (see `reload.rs`, stamps).
    pub(crate) read_at: std::time::SystemTime,
}

/// The first of the errors `parse` collected (there is at least one).
fn first(mut errors: Vec<ConfigError>) -> ConfigError {
    errors.swap_remove(0)
}

fn read_pipeline(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|e| {
        ConfigError::new(
            path,
            None,
            None,
            ConfigErrorKind::Io,
            format!("cannot read the pipeline file: {e}"),
        )
    })
}

impl PipelineSpec {
    /// Reads, parses and validates a pipeline file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let read_at = std::time::SystemTime::now();
        Self::parse(&read_pipeline(path)?, path, None, read_at, true, false).map_err(first)
    }

    /// Parses and validates pipeline text; `path` names it in errors and anchors relative paths.
    #[allow(clippy::should_implement_trait)]
    pub fn from_str(text: &str, path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        Self::parse(
            text,
            path.as_ref(),
            None,
            std::time::SystemTime::now(),
            true,
            false,
        )
        .map_err(first)
    }

    /// [`validate_str`](Self::validate_str) on a pipeline file: every error, not only the
    /// first (`millrace validate`).
    pub fn validate_file(path: impl AsRef<Path>) -> Result<Self, Vec<ConfigError>> {
        let path = path.as_ref();
        let read_at = std::time::SystemTime::now();
        let text = read_pipeline(path).map_err(|e| vec![e])?;
        Self::parse(&text, path, None, read_at, true, true)
    }

    /// [`from_str`](Self::from_str) that reports every error, not only the first: each
    /// stage's (a stage is read again without each parameter found wrong, so that one stage
    /// can report several; an error behind a missing or wrong required parameter stays
    /// hidden until it is fixed), the `[options]` and `[checkpoint]` tables', and the graph's
    /// (inputs, cycles, dead letters) among the stages that could be read. In the order the
    /// checks run: the first is the error [`from_str`](Self::from_str) returns.
    pub fn validate_str(text: &str, path: impl AsRef<Path>) -> Result<Self, Vec<ConfigError>> {
        Self::parse(
            text,
            path.as_ref(),
            None,
            std::time::SystemTime::now(),
            true,
            true,
        )
    }

    /// [`from_str`](Self::from_str) with no plugins: the search path is not read and no
    /// library is loaded, so a `kind` that is not built in is unknown (the fuzz target's: text
    /// it makes up must not load whatever plugin lies on the disk).
    #[cfg(feature = "http")]
    pub(crate) fn from_str_without_plugins(
        text: &str,
        path: impl AsRef<Path>,
    ) -> Result<Self, ConfigError> {
        Self::parse(
            text,
            path.as_ref(),
            None,
            std::time::SystemTime::now(),
            false,
            false,
        )
        .map_err(first)
    }

    /// Reads a pipeline file for a reload: as [`from_file`](Self::from_file), but native
    /// libraries are loaded from fresh copies, so that `dlopen` cannot hand back the image
    /// already loaded from the same path.
    ///
    /// `reuse`: libraries already loaded whose files did not change, by plugin name.
    pub(crate) fn from_file_for_reload(path: &Path, reuse: Natives) -> Result<Self, ConfigError> {
        let read_at = std::time::SystemTime::now();
        Self::parse(
            &read_pipeline(path)?,
            path,
            Some(reuse),
            read_at,
            true,
            false,
        )
        .map_err(first)
    }

    /// Parses; with `reload`, native libraries come from `reload` or fresh copies; without
    /// `discover`, there are no plugins.
    fn parse(
        text: &str,
        file: &Path,
        reload: Option<Natives>,
        read_at: std::time::SystemTime,
        discover: bool,
        all: bool,
    ) -> Result<Self, Vec<ConfigError>> {
        #[cfg(not(feature = "plugin"))]
        let _ = discover;
        let copy_natives = reload.is_some();
        let lines = Lines::new(text);
        let raw: RawPipeline = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|s| lines.line(s.start));
            let stage = line.and_then(|l| stage_at_line(text, l));
            vec![ConfigError::new(
                file,
                line,
                stage.as_deref(),
                ConfigErrorKind::Syntax,
                format!("invalid TOML: {}", e.message().trim_end()),
            )]
        })?;
        let base = file.parent().map(Path::to_path_buf).unwrap_or_default();
        let ctx = Ctx {
            file,
            text,
            lines: &lines,
            base: &base,
            plugin_dirs: raw.plugin_dirs.iter().map(|d| base.join(d)).collect(),
            #[cfg(feature = "plugin")]
            plugins: if discover {
                std::cell::OnceCell::new()
            } else {
                std::cell::OnceCell::from(crate::plugin::PluginRegistry::default())
            },
            natives: std::cell::RefCell::new(reload.unwrap_or_default()),
            copy_natives,
            plugin_files: Default::default(),
        };

        // With `all`, every error is collected, in the order the checks run; without it the
        // first one ends the parse, as it always did (nothing more is read or loaded), and it
        // is the first that `all` would have collected.
        let mut errors = Vec::new();
        macro_rules! stop_unless_all {
            () => {
                if !all && !errors.is_empty() {
                    return Err(errors);
                }
            };
        }
        let (options, byte_path) = match &raw.options {
            None => (Options::default(), true),
            Some(t) => parse_options(&ctx, t).unwrap_or_else(|e| {
                errors.push(e);
                (Options::default(), true)
            }),
        };
        let checkpoint = match &raw.checkpoint {
            None => None,
            Some(t) => match super::checkpoint::parse_checkpoint(&ctx, t) {
                Ok(c) => Some(c),
                Err(e) => {
                    errors.push(e);
                    None
                }
            },
        };

        stop_unless_all!();
        if raw.stages.is_empty() {
            errors.push(ConfigError::new(
                file,
                None,
                None,
                ConfigErrorKind::NoStages,
                "no stages: add a [stages.<name>] table",
            ));
            return Err(errors);
        }
        let late_targets = late_targets(&ctx, &raw.stages).unwrap_or_else(|e| {
            errors.push(e);
            HashMap::new()
        });
        let dl_targets = dead_letter_targets(&ctx, &raw.stages).unwrap_or_else(|e| {
            errors.push(e);
            HashMap::new()
        });
        stop_unless_all!();
        let mut stages = Vec::new();
        let mut failed = Vec::new();
        for (name, table) in &raw.stages {
            let parsed = parse_stage_all(
                &ctx,
                name.get_ref(),
                lines.line(name.span().start),
                table.get_ref(),
                late_targets
                    .get(name.get_ref().as_str())
                    .map(String::as_str),
                dl_targets.get(name.get_ref().as_str()).map(String::as_str),
                all,
                &mut errors,
            );
            match parsed {
                Some(s) => stages.push(s),
                None => failed.push(name.get_ref().as_str()),
            }
            stop_unless_all!();
        }
        let before = errors.len();
        let stages = check_graph(file, stages, &failed, &mut errors);
        if errors.len() == before && failed.is_empty() {
            if let Err(e) = check_dead_letters(file, &stages) {
                errors.push(e);
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let name = raw.name.unwrap_or_else(|| {
            file.file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default()
        });
        Ok(PipelineSpec {
            name,
            file: file.to_path_buf(),
            options,
            stages,
            byte_path,
            checkpoint,
            read_at,
        })
    }

    /// The stage graph as JSON, for the console: `{"stages": [{"name", "kind", "parallelism",
    /// "inputs", "line", "source", "sink"}], "edges": [{"from", "to", "type"}]}` with stages in
    /// topological order and `type` one of `data`, `late` (a window's late records) and
    /// `dead_letter` (a stage's bad records). A stage's live metrics are those of the run-time
    /// stage whose `+`-joined name includes it (stages fuse) and of its account.
    pub fn graph_json(&self) -> serde_json::Value {
        use serde_json::json;
        let read: std::collections::HashSet<&str> = self
            .stages
            .iter()
            .flat_map(|s| s.inputs.iter().map(String::as_str))
            .collect();
        let stages: Vec<serde_json::Value> = self
            .stages
            .iter()
            .map(|s| {
                let info = s.params.info();
                json!({
                    "name": s.name,
                    "kind": s.kind,
                    "parallelism": s.parallelism,
                    "inputs": s.inputs,
                    "line": s.line,
                    "source": info.source,
                    "sink": !read.contains(s.name.as_str()),
                })
            })
            .collect();
        let mut edges = Vec::new();
        for s in &self.stages {
            for i in &s.inputs {
                let ty = if s.late_of.as_deref() == Some(i.as_str()) {
                    "late"
                } else {
                    "data"
                };
                edges.push(json!({"from": i, "to": s.name, "type": ty}));
            }
            if let PolicySpec::DeadLetter(t) = &s.on_error {
                edges.push(json!({"from": s.name, "to": t, "type": "dead_letter"}));
            }
        }
        json!({"name": self.name, "stages": stages, "edges": edges})
    }

    /// The stage graph as Graphviz DOT.
    pub fn to_dot(&self) -> String {
        let mut s = format!(
            "digraph {:?} {{\n  rankdir=LR;\n  node [shape=box];\n",
            self.name
        );
        for st in &self.stages {
            let par = if st.parallelism > 1 {
                format!(" ×{}", st.parallelism)
            } else {
                String::new()
            };
            s.push_str(&format!(
                "  {:?} [label={:?}];\n",
                st.name,
                format!("{}\\n{}{}", st.name, st.kind, par)
            ));
        }
        for st in &self.stages {
            for i in &st.inputs {
                s.push_str(&format!("  {:?} -> {:?};\n", i, st.name));
            }
        }
        s.push_str("}\n");
        s
    }
}

/// The stage whose table encloses `line`, found from the nearest `[stages.NAME]` header above it
/// (used when the TOML is too broken to parse).
fn stage_at_line(text: &str, line: usize) -> Option<String> {
    text.lines()
        .take(line)
        .filter_map(|l| {
            let l = l.trim();
            let inner = l.strip_prefix('[')?.strip_suffix(']')?.trim();
            let name = inner.strip_prefix("stages.")?.trim();
            Some(name.trim_matches('"').to_string())
        })
        .last()
}

// Without the `plugin` feature the plugin fields are kept (they are set in one place) but unread.
#[cfg_attr(not(feature = "plugin"), allow(dead_code))]
pub(crate) struct Ctx<'a> {
    pub file: &'a Path,
    /// The pipeline file's text.
    pub text: &'a str,
    pub lines: &'a Lines,
    pub base: &'a Path,
    /// The pipeline's `plugin_dirs`, resolved.
    pub plugin_dirs: Vec<PathBuf>,
    /// Discovered on first use: only a pipeline naming a non-built-in kind reads the disk.
    #[cfg(feature = "plugin")]
    pub plugins: std::cell::OnceCell<crate::plugin::PluginRegistry>,
    /// Native libraries loaded so far, by plugin name: stages of one plugin share one load.
    pub natives: std::cell::RefCell<Natives>,
    /// Load native libraries from fresh copies (a reload).
    pub copy_natives: bool,
    /// Per plugin stage, the files it depends on (manifest, program, library): a reload
    /// watches them and reloads the stage when one changes.
    pub plugin_files: std::cell::RefCell<std::collections::BTreeMap<String, Vec<PathBuf>>>,
}

/// Native plugin libraries by plugin name.
#[cfg(feature = "plugin")]
pub(crate) type Natives =
    std::collections::BTreeMap<String, std::sync::Arc<crate::plugin::native::NativeLibrary>>;
/// Native plugin libraries by plugin name: none without the `plugin` feature.
#[cfg(not(feature = "plugin"))]
pub(crate) type Natives = std::collections::BTreeMap<String, std::convert::Infallible>;

#[cfg(feature = "plugin")]
impl Ctx<'_> {
    /// The plugins on the search path (`plugin_dirs` first).
    pub(crate) fn plugins(&self) -> &crate::plugin::PluginRegistry {
        self.plugins.get_or_init(|| {
            crate::plugin::PluginRegistry::discover(&crate::plugin::search_path(&self.plugin_dirs))
        })
    }
}

/// The `[options]` table: run options, and whether the byte path may be used.
fn parse_options(ctx: &Ctx<'_>, t: &Spanned<RawTable>) -> Result<(Options, bool), ConfigError> {
    let mut o = Options::default();
    let mut byte_path = true;
    for (k, v) in t.get_ref() {
        let line = Some(ctx.lines.line(v.span().start));
        let err_of = |kind, m: String| {
            ConfigError::new(
                ctx.file,
                line,
                None,
                kind,
                format!("[options] {}: {m}", k.get_ref()),
            )
            .with_param(k.get_ref())
        };
        let err = |m: String| err_of(ConfigErrorKind::BadValue, m);
        let int = || match v.get_ref() {
            toml::Value::Integer(i) if *i > 0 => Ok(*i as u64),
            other => Err(err(format!(
                "expected a positive integer, found {}",
                describe_toml(other)
            ))),
        };
        let duration = || match v.get_ref() {
            toml::Value::String(s) => crate::parse_duration_ms(s)
                .map(|ms| Duration::from_millis(ms as u64))
                .map_err(|e| err(e.to_string())),
            other => Err(err(format!(
                "expected a duration such as \"5s\", found {}",
                describe_toml(other)
            ))),
        };
        match k.get_ref().as_str() {
            "batch_size" => o.batch_size = int()? as usize,
            "channel_capacity" => o.channel_capacity = int()? as usize,
            "linger_ms" => o.linger = Duration::from_millis(int()?),
            "watermark_every" => o.watermark_every = int()? as usize,
            "idle_timeout" => o.idle_timeout = Some(duration()?),
            "max_dead_letters" => {
                o.max_dead_letters = Some(match v.get_ref() {
                    toml::Value::Integer(i) if *i >= 0 => crate::DeadLetterLimit::Count(*i as u64),
                    toml::Value::Float(r) if *r >= 0.0 && *r <= 1.0 => {
                        crate::DeadLetterLimit::Ratio(*r)
                    }
                    other => {
                        return Err(err(format!(
                            "expected a count (an integer, e.g. 100) or a ratio of the records read (a number from 0.0 to 1.0, e.g. 0.01), found {}",
                            describe_toml(other)
                        )))
                    }
                })
            }
            "byte_path" => match v.get_ref() {
                toml::Value::Boolean(b) => byte_path = *b,
                other => {
                    return Err(err(format!(
                        "expected true or false, found {}",
                        describe_toml(other)
                    )))
                }
            },
            other => {
                return Err(err_of(
                    ConfigErrorKind::UnknownParameter,
                    format!(
                    "unknown option `{other}` (known: batch_size, channel_capacity, linger_ms, watermark_every, idle_timeout, max_dead_letters, byte_path)"
                    ),
                ))
            }
        }
    }
    Ok((o, byte_path))
}

/// Stages named by a window's `late` parameter: target stage → window stage.
fn late_targets(
    ctx: &Ctx<'_>,
    stages: &BTreeMap<Spanned<String>, Spanned<RawTable>>,
) -> Result<HashMap<String, String>, ConfigError> {
    let mut targets: HashMap<String, String> = HashMap::new();
    for (name, table) in stages {
        let table = table.get_ref();
        let get = |key: &str| {
            table
                .iter()
                .find(|(k, _)| k.get_ref() == key)
                .map(|(_, v)| v)
        };
        let is_window = matches!(get("kind").map(|v| v.get_ref()), Some(toml::Value::String(k)) if k == "window");
        let Some(late) = get("late").filter(|_| is_window) else {
            continue;
        };
        let toml::Value::String(target) = late.get_ref() else {
            continue; // reported with the window's own parameters
        };
        if target == "drop" || target == "error" {
            continue;
        }
        let err = |kind, m: String| {
            ConfigError::new(
                ctx.file,
                Some(ctx.lines.line(late.span().start)),
                Some(name.get_ref()),
                kind,
                m,
            )
            .with_param("late")
        };
        if target == name.get_ref() {
            return Err(err(
                ConfigErrorKind::Cycle,
                "a window cannot receive its own late records".into(),
            ));
        }
        if !stages.keys().any(|k| k.get_ref() == target) {
            let mut known: Vec<&str> = stages.keys().map(|k| k.get_ref().as_str()).collect();
            known.sort_unstable();
            return Err(err(
                ConfigErrorKind::UnknownInput,
                format!(
                    "parameter `late`: expected \"drop\", \"error\" or a stage name, found {target:?} (stages: {})",
                    known.join(", ")
                ),
            ));
        }
        if let Some(other) = targets.insert(target.clone(), name.get_ref().clone()) {
            return Err(err(
                ConfigErrorKind::Wiring,
                format!("stage `{target}` already receives the late records of `{other}`"),
            ));
        }
    }
    Ok(targets)
}

/// Stages named by some stage's `dead_letter`: target → the first stage naming it. A name that
/// is no stage is an error here, at the `dead_letter` line, before the stages are read: read
/// first, the stage meant to receive the letters would be reported as lacking an `input`.
fn dead_letter_targets(
    ctx: &Ctx<'_>,
    stages: &BTreeMap<Spanned<String>, Spanned<RawTable>>,
) -> Result<HashMap<String, String>, ConfigError> {
    let mut targets = HashMap::new();
    for (name, table) in stages {
        if let Some((_, v)) = table
            .get_ref()
            .iter()
            .find(|(k, _)| k.get_ref() == "dead_letter")
        {
            if let toml::Value::String(t) = v.get_ref() {
                if !stages.keys().any(|k| k.get_ref() == t) {
                    let known: Vec<&str> = stages.keys().map(|k| k.get_ref().as_str()).collect();
                    return Err(ConfigError::new(
                        ctx.file,
                        Some(ctx.lines.line(v.span().start)),
                        Some(name.get_ref()),
                        ConfigErrorKind::UnknownInput,
                        format!(
                            "parameter `dead_letter`: no stage named {t:?} (stages: {})",
                            known.join(", ")
                        ),
                    )
                    .with_param("dead_letter"));
                }
                targets
                    .entry(t.clone())
                    .or_insert_with(|| name.get_ref().clone());
            }
        }
    }
    Ok(targets)
}

/// Checks every `dead_letter` names a stage, and that no stage downstream of a dead-letter
/// stage (or the stage itself) sends dead letters.
fn check_dead_letters(file: &Path, stages: &[StageSpec]) -> Result<(), ConfigError> {
    // Stages in topological order: the dead-letter side is each target and what reads it.
    let mut side: HashMap<&str, &str> = HashMap::new();
    for s in stages {
        if s.dead_letter_target {
            side.insert(&s.name, &s.name);
        } else if let Some(t) = s.inputs.iter().find_map(|i| side.get(i.as_str()).copied()) {
            side.insert(&s.name, t);
        }
    }
    for s in stages {
        let PolicySpec::DeadLetter(t) = &s.on_error else {
            continue;
        };
        let err = |kind, m: String| {
            ConfigError::new(file, Some(s.dead_letter_line), Some(&s.name), kind, m)
                .with_param("dead_letter")
        };
        if !stages.iter().any(|o| &o.name == t) {
            let mut known: Vec<&str> = stages.iter().map(|o| o.name.as_str()).collect();
            known.sort_unstable();
            return Err(err(
                ConfigErrorKind::UnknownInput,
                format!(
                    "parameter `dead_letter`: no stage named {t:?} (stages: {})",
                    known.join(", ")
                ),
            ));
        }
        if let Some(target) = side.get(s.name.as_str()) {
            return Err(err(
                ConfigErrorKind::Cycle,
                format!("dead letters of dead letters: this stage receives the dead letters of `{target}` (or reads a stage that does), so it cannot send its own to `{t}`"),
            ));
        }
    }
    Ok(())
}

/// The `on_error` and `dead_letter` parameters of a stage of kind `kind`.
fn parse_policy(
    params: &mut Params<'_>,
    spec: &Kind,
    kind: &str,
) -> Result<PolicySpec, ConfigError> {
    // A kind that meets no bad records refuses both keys, and does not list them as known.
    if let Some(why) = spec.no_record_errors() {
        return match ["on_error", "dead_letter"]
            .into_iter()
            .find(|k| params.has(k))
        {
            Some(key) => Err(params.error_at(
                key,
                ConfigErrorKind::BadValue,
                format!("a `{kind}` stage takes no `{key}`: {why}"),
            )),
            None => Ok(PolicySpec::Fail),
        };
    }
    let on_error = params.opt_str("on_error")?;
    let target = params.opt_str("dead_letter")?;
    let policy = match on_error.as_deref() {
        None | Some("fail") => PolicySpec::Fail,
        Some("skip") => PolicySpec::Skip,
        Some("dead_letter") => match target.clone() {
            Some(t) => PolicySpec::DeadLetter(t),
            None => {
                return Err(params.missing(
                    "dead_letter",
                    "the name of the stage that receives the dead letters (a stage with no `input`, e.g. an ndjson.write)",
                ))
            }
        },
        Some(other) => {
            return Err(params.error_at(
                "on_error",
                ConfigErrorKind::BadValue,
                format!("parameter `on_error`: expected \"fail\", \"skip\" or \"dead_letter\", found {other:?}"),
            ))
        }
    };
    if target.is_some() && !matches!(policy, PolicySpec::DeadLetter(_)) {
        return Err(params.error_at(
            "dead_letter",
            ConfigErrorKind::Wiring,
            "parameter `dead_letter` needs on_error = \"dead_letter\"".into(),
        ));
    }
    Ok(policy)
}

fn parse_stage(
    ctx: &Ctx<'_>,
    name: &str,
    line: usize,
    table: &RawTable,
    late_of: Option<&str>,
    dead_letters_of: Option<&str>,
) -> Result<StageSpec, ConfigError> {
    let mut params = Params::new(ctx, name, line, table);
    let kind = params.required_str("kind")?;
    let mut inputs = params.inputs()?;
    if let Some(sender) = dead_letters_of {
        if !inputs.is_empty() {
            return Err(params.error_at(
                "input",
                ConfigErrorKind::Wiring,
                format!("this stage receives the dead letters of `{sender}` (its `dead_letter`), so it takes no `input`"),
            ));
        }
    }
    if let Some(window) = late_of {
        if !inputs.is_empty() {
            return Err(params.error_at(
                "input",
                ConfigErrorKind::Wiring,
                format!("this stage receives the late records of window `{window}` (its `late`), so it takes no `input`"),
            ));
        }
        inputs.push(window.to_string());
    }
    let input_line = params.line_of("input");
    let declared = params.opt_u64("parallelism", 1, 1024)?;
    let parallelism = declared.unwrap_or(1) as usize;
    let ordered = params.opt_bool("ordered")?.unwrap_or(false);
    let ordered_line_err =
        |p: &Params<'_>, m: String| p.error_at("ordered", ConfigErrorKind::BadValue, m);
    let mut spec = Kind::parse(&kind, &mut params)?;
    let on_error = parse_policy(&mut params, &spec, &kind)?;
    if let Kind::Window(w) = &mut spec {
        w.on_error = match on_error {
            PolicySpec::Skip => crate::OnError::Skip,
            // A dead-letter policy gets its handle when the pipeline is built.
            _ => crate::OnError::Fail,
        };
    }
    let dead_letter_line = params.line_of("dead_letter");
    params.finish(&kind)?;
    // What a reload compares: the stage's table as written (keys in order).
    let raw: String = table
        .iter()
        .map(|(k, v)| format!("{} = {}\n", k.get_ref(), v.get_ref()))
        .collect();
    let files = ctx
        .plugin_files
        .borrow_mut()
        .remove(name)
        .unwrap_or_default();
    let info = spec.info();
    if let (Some(sender), true) = (dead_letters_of, info.source) {
        return Err(params.error_at(
            "kind",
            ConfigErrorKind::Wiring,
            format!(
                "a `{kind}` stage is a source and cannot receive the dead letters of `{sender}`"
            ),
        ));
    }
    if info.source && !inputs.is_empty() {
        if let Some(window) = late_of {
            return Err(params.error_at(
                "kind",
                ConfigErrorKind::Wiring,
                format!("a `{kind}` stage is a source and cannot receive the late records of `{window}`"),
            ));
        }
        return Err(params.error_at(
            "input",
            ConfigErrorKind::Wiring,
            format!("a `{kind}` stage is a source and takes no `input`"),
        ));
    }
    if !info.source && inputs.is_empty() && dead_letters_of.is_none() {
        return Err(ConfigError::new(
            ctx.file,
            Some(line),
            Some(name),
            ConfigErrorKind::Wiring,
            format!("a `{kind}` stage needs an `input`"),
        )
        .with_param("input"));
    }
    if info.single && parallelism > 1 {
        return Err(params.error_at(
            "parallelism",
            ConfigErrorKind::BadValue,
            format!("a `{kind}` stage runs on one thread; remove `parallelism`"),
        ));
    }
    if ordered {
        let keeps_order = matches!(
            spec,
            Kind::LinesRead { .. }
                | Kind::NdjsonRead { .. }
                | Kind::Filter { .. }
                | Kind::Select { .. }
                | Kind::Words { .. }
        );
        if !keeps_order {
            return Err(ordered_line_err(
                &params,
                format!(
                    "`ordered` applies to a stateless stage (filter, select, words) or a source \
                     (lines.read, ndjson.read) with parallelism > 1, not to a `{kind}` stage{}",
                    if matches!(spec, Kind::Exec(_)) {
                        " (a child process does not keep batch boundaries)"
                    } else {
                        ""
                    }
                ),
            ));
        }
        if parallelism < 2 {
            return Err(ordered_line_err(
                &params,
                "`ordered = true` needs parallelism > 1 (one instance keeps order anyway)".into(),
            ));
        }
    }
    Ok(StageSpec {
        name: name.to_string(),
        fingerprint: super::checkpoint::fingerprint(&kind, table),
        kind,
        inputs,
        parallelism,
        explicit_parallelism: declared.is_some(),
        ordered,
        line,
        input_line,
        late_of: late_of.map(str::to_string),
        on_error,
        dead_letter_line,
        dead_letter_target: dead_letters_of.is_some(),
        params: spec,
        raw,
        files,
    })
}

/// A stage's errors: only the first unless `all`; with it, all that can be told apart. After
/// each error about a parameter, the stage is read again without that parameter (an optional
/// one then takes its default), until it reads, an error names no parameter (or `kind`), or
/// the next error is the removed parameter's own absence (a required one: its error is
/// already there). At most one retry per parameter.
#[allow(clippy::too_many_arguments)]
fn parse_stage_all(
    ctx: &Ctx<'_>,
    name: &str,
    line: usize,
    table: &RawTable,
    late_of: Option<&str>,
    dead_letters_of: Option<&str>,
    all: bool,
    errors: &mut Vec<ConfigError>,
) -> Option<StageSpec> {
    let mut e = match parse_stage(ctx, name, line, table, late_of, dead_letters_of) {
        Ok(s) => return Some(s),
        Err(e) => e,
    };
    if !all {
        errors.push(e);
        return None;
    }
    let mut table = table.clone();
    loop {
        let param = e.param.clone();
        errors.push(e);
        let param = param.filter(|p| p != "kind")?;
        let before = table.len();
        table.retain(|k, _| k.get_ref() != &param);
        if table.len() == before {
            return None;
        }
        match parse_stage(ctx, name, line, &table, late_of, dead_letters_of) {
            Ok(_) => return None,
            Err(next) if next.param.as_deref() == Some(param.as_str()) => return None,
            Err(next) => e = next,
        }
    }
}

/// Checks inputs exist and the graph is acyclic; returns the stages in topological order.
/// Errors go to `errors`: every unknown input (an input naming a stage in `failed`, which
/// could not be read, is not one, and is left out of the order), then a cycle, looked for only
/// when every input is known.
fn check_graph(
    file: &Path,
    mut stages: Vec<StageSpec>,
    failed: &[&str],
    errors: &mut Vec<ConfigError>,
) -> Vec<StageSpec> {
    let mut unknown = false;
    {
        let index: HashMap<&str, usize> = stages
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name.as_str(), i))
            .collect();
        for s in &stages {
            for i in &s.inputs {
                if failed.contains(&i.as_str()) {
                    continue;
                }
                if !index.contains_key(i.as_str()) {
                    let mut known: Vec<&str> = index
                        .keys()
                        .copied()
                        .chain(failed.iter().copied())
                        .collect();
                    known.sort_unstable();
                    unknown = true;
                    errors.push(
                        ConfigError::new(
                            file,
                            Some(s.input_line),
                            Some(&s.name),
                            ConfigErrorKind::UnknownInput,
                            format!("unknown input `{i}` (stages: {})", known.join(", ")),
                        )
                        .with_param("input"),
                    );
                } else if i == &s.name {
                    unknown = true;
                    errors.push(
                        ConfigError::new(
                            file,
                            Some(s.input_line),
                            Some(&s.name),
                            ConfigErrorKind::Cycle,
                            "a stage cannot read its own output",
                        )
                        .with_param("input"),
                    );
                }
            }
        }
    }
    if unknown {
        return stages;
    }
    // The order is over the stages that could be read.
    let edges: Vec<Vec<String>> = stages
        .iter()
        .map(|s| {
            s.inputs
                .iter()
                .filter(|i| !failed.contains(&i.as_str()))
                .cloned()
                .collect()
        })
        .collect();
    match topological(&stages, &edges) {
        Ok(order) => {
            let mut slots: Vec<Option<StageSpec>> = stages.drain(..).map(Some).collect();
            order
                .into_iter()
                .map(|i| slots[i].take().expect("each stage once"))
                .collect()
        }
        Err(cycle) => {
            let names: Vec<&str> = cycle
                .iter()
                .rev()
                .map(|&c| stages[c].name.as_str())
                .collect();
            let first = &stages[cycle[0]];
            errors.push(
                ConfigError::new(
                    file,
                    Some(first.input_line),
                    Some(&first.name),
                    ConfigErrorKind::Cycle,
                    format!("cycle in the stage graph: {}", names.join(" -> ")),
                )
                .with_param("input"),
            );
            stages
        }
    }
}

/// A topological order of `stages` whose inputs are `edges` (every name among the stages), or
/// the first cycle found.
fn topological(stages: &[StageSpec], edges: &[Vec<String>]) -> Result<Vec<usize>, Vec<usize>> {
    let index: HashMap<&str, usize> = stages
        .iter()
        .enumerate()
        .map(|(i, s)| (s.name.as_str(), i))
        .collect();
    // Depth-first topological sort with cycle reporting.
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Active,
        Done,
    }
    fn visit(
        i: usize,
        edges: &[Vec<String>],
        index: &HashMap<&str, usize>,
        marks: &mut [Mark],
        path: &mut Vec<usize>,
        order: &mut Vec<usize>,
    ) -> Result<(), Vec<usize>> {
        match marks[i] {
            Mark::Done => return Ok(()),
            Mark::Active => {
                let from = path.iter().position(|&p| p == i).unwrap_or(0);
                let mut cycle = path[from..].to_vec();
                cycle.push(i);
                return Err(cycle);
            }
            Mark::New => {}
        }
        marks[i] = Mark::Active;
        path.push(i);
        for input in &edges[i] {
            visit(index[input.as_str()], edges, index, marks, path, order)?;
        }
        path.pop();
        marks[i] = Mark::Done;
        order.push(i);
        Ok(())
    }
    let mut marks = vec![Mark::New; stages.len()];
    let mut order = Vec::with_capacity(stages.len());
    for i in 0..stages.len() {
        let mut path = Vec::new();
        visit(i, edges, &index, &mut marks, &mut path, &mut order)?;
    }
    Ok(order)
}
