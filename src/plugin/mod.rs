//! Plugins: manifests (`plugin.toml`), discovery on a search path, and the registry of node
//! types that pipelines use as `kind = "<plugin>.<node>"`.
//!
//! A plugin is a directory holding a `plugin.toml`. Process plugins run as `exec` stages (NDJSON
//! on stdin and stdout, the TOML layer's `exec` kind); their node's parameters are checked against the
//! manifest before anything runs and reach the process as JSON in `MILLRACE_PARAMS`, the node's
//! name in `MILLRACE_NODE`. Native (`cdylib`) plugins are loaded in-process by [`native`].

pub mod native;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::{json, Value};

/// Permissions a manifest may request; a pipeline must grant each one.
pub const PERMISSIONS: &[&str] = &["filesystem.read", "filesystem.write", "network"];

/// How a plugin runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PluginKind {
    /// A `cdylib` built with the `millrace-plugin` SDK, loaded into the engine.
    Native,
    /// An external process speaking NDJSON on stdin and stdout.
    Process,
}

/// What a plugin starts: a library path (native) or a command (process).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Entry {
    /// A library, relative to the plugin's directory.
    Library(String),
    /// A program and its arguments, run in the plugin's directory.
    Command(Vec<String>),
}

/// The type of a node parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ParamType {
    /// A string.
    String,
    /// An integer.
    Integer,
    /// A number (integer or float).
    Number,
    /// `true` or `false`.
    Boolean,
}

impl ParamSpec {
    /// What the parameter's type is, in words ("an integer").
    pub fn ty_name(&self) -> &'static str {
        self.ty.name()
    }
}

impl ParamType {
    fn name(self) -> &'static str {
        match self {
            ParamType::String => "a string",
            ParamType::Integer => "an integer",
            ParamType::Number => "a number",
            ParamType::Boolean => "a boolean",
        }
    }
}

/// One parameter of a node.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParamSpec {
    /// Its type.
    #[serde(rename = "type")]
    pub ty: ParamType,
    /// What it means.
    #[serde(default)]
    pub description: String,
    /// Whether a stage must set it.
    #[serde(default)]
    pub required: bool,
    /// Its value when a stage does not set it.
    pub default: Option<toml::Value>,
    /// The values it may take.
    #[serde(rename = "enum")]
    pub one_of: Option<Vec<toml::Value>>,
    /// Smallest allowed value (numbers).
    pub min: Option<f64>,
    /// Largest allowed value (numbers).
    pub max: Option<f64>,
}

/// A node type a plugin provides.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSpec {
    /// Its name (`kind = "<plugin>.<name>"`).
    pub name: String,
    /// What it does.
    #[serde(default)]
    pub description: String,
    /// What records it takes.
    #[serde(default)]
    pub takes: String,
    /// What records it emits.
    #[serde(default)]
    pub emits: String,
    /// Its parameters by name.
    #[serde(default)]
    pub params: BTreeMap<String, ParamSpec>,
    /// Whether the node holds no state across records (each output depends only on the
    /// records of one batch and the parameters). Default false: a pipeline with checkpoints
    /// refuses to start with a stage of a node that does not declare `stateless = true`,
    /// since its state cannot be snapshotted.
    #[serde(default)]
    pub stateless: bool,
}

impl NodeSpec {
    /// Why a stage `kind = "<plugin>.<node>"` of this node cannot be checkpointed; `None` when
    /// it is stateless.
    pub(crate) fn checkpoint_refusal(&self, plugin: &Plugin) -> Option<String> {
        (!self.stateless).then(|| {
            format!(
                "plugin `{}` node `{}` may hold state it cannot snapshot: its manifest ({}) does not declare `stateless = true` for it",
                plugin.manifest.name,
                self.name,
                plugin.dir.join("plugin.toml").display()
            )
        })
    }
}

/// A `plugin.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// The plugin's name (`kind = "<name>.<node>"`).
    pub name: String,
    /// Its version (semver).
    pub version: String,
    /// What it is for.
    #[serde(default)]
    pub description: String,
    /// Who wrote it.
    #[serde(default)]
    pub authors: Vec<String>,
    /// Its licence.
    pub license: Option<String>,
    /// Native or process.
    pub kind: PluginKind,
    /// What to load or run.
    pub entry: Entry,
    /// The millrace versions it works with (a semver requirement, e.g. `">=0.1, <0.3"`).
    pub engine: String,
    /// Permissions it needs; each must be granted by the pipeline.
    #[serde(default)]
    pub permissions: Vec<String>,
    /// Resource limits for its processes (`[limits]`); a stage's `limits` overrides each key.
    #[serde(default)]
    pub limits: crate::sandbox::Limits,
    /// Its node types.
    #[serde(default)]
    pub nodes: Vec<NodeSpec>,
}

/// A plugin found on the search path.
#[derive(Debug, Clone)]
pub struct Plugin {
    /// Its manifest.
    pub manifest: Manifest,
    /// Its directory.
    pub dir: PathBuf,
}

impl Plugin {
    /// The files the plugin is made of, for a reload to watch: its manifest, the files in its
    /// directory (two levels deep, at most 256), and a native plugin's library wherever it is.
    pub fn files(&self) -> Vec<PathBuf> {
        let mut files = vec![self.dir.join("plugin.toml")];
        let mut dirs = vec![(self.dir.clone(), 0)];
        while let Some((dir, depth)) = dirs.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                let path = e.path();
                match e.file_type() {
                    Ok(t) if t.is_dir() && depth < 1 => dirs.push((path, depth + 1)),
                    Ok(t) if t.is_file() && !files.contains(&path) && files.len() < 256 => {
                        files.push(path)
                    }
                    _ => {}
                }
            }
        }
        if let Entry::Library(lib) = &self.manifest.entry {
            let lib = self.dir.join(lib);
            if !files.contains(&lib) {
                files.push(lib);
            }
        }
        files
    }
}

/// Every plugin found, by name, and the manifests that could not be used.
#[derive(Debug, Clone, Default)]
pub struct PluginRegistry {
    plugins: BTreeMap<String, Plugin>,
    /// Manifest file → why it was refused.
    pub broken: BTreeMap<PathBuf, String>,
}

/// The directories searched for plugins: `extra` (a pipeline's `plugin_dirs`), then each entry
/// of `MILLRACE_PLUGIN_PATH` (colon-separated), then the per-user directory
/// (`$XDG_DATA_HOME/millrace/plugins`, or `~/.local/share/millrace/plugins`).
pub fn search_path(extra: &[PathBuf]) -> Vec<PathBuf> {
    let mut dirs = extra.to_vec();
    if let Some(p) = std::env::var_os("MILLRACE_PLUGIN_PATH") {
        dirs.extend(std::env::split_paths(&p).filter(|d| !d.as_os_str().is_empty()));
    }
    let data = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".local/share")));
    if let Some(d) = data {
        dirs.push(d.join("millrace/plugins"));
    }
    dirs
}

impl PluginRegistry {
    /// Loads every `<dir>/<plugin>/plugin.toml` under `dirs` (missing directories are skipped).
    /// A plugin name found twice keeps the first; the second is recorded as broken.
    pub fn discover(dirs: &[PathBuf]) -> Self {
        let mut reg = PluginRegistry::default();
        for dir in dirs {
            let Ok(entries) = std::fs::read_dir(dir) else {
                continue;
            };
            let mut found: Vec<PathBuf> = entries
                .filter_map(|e| Some(e.ok()?.path().join("plugin.toml")))
                .filter(|m| m.is_file())
                .collect();
            found.sort();
            for manifest in found {
                match load(&manifest) {
                    Ok(p) => {
                        let name = p.manifest.name.clone();
                        if let Some(first) = reg.plugins.get(&name) {
                            reg.broken.insert(
                                manifest,
                                format!(
                                    "a plugin named `{name}` was already found in {}",
                                    first.dir.display()
                                ),
                            );
                        } else {
                            reg.plugins.insert(name, p);
                        }
                    }
                    Err(e) => {
                        reg.broken.insert(manifest, e);
                    }
                }
            }
        }
        reg
    }

    /// The plugin named `name`.
    pub fn get(&self, name: &str) -> Option<&Plugin> {
        self.plugins.get(name)
    }

    /// Every plugin, by name.
    pub fn plugins(&self) -> impl Iterator<Item = &Plugin> {
        self.plugins.values()
    }

    /// The node palette: every node of every plugin with its parameter specs, as JSON (for a
    /// visual editor).
    pub fn palette_json(&self) -> Value {
        let nodes: Vec<Value> = self
            .plugins
            .values()
            .flat_map(|p| {
                p.manifest.nodes.iter().map(move |n| {
                    let params: serde_json::Map<String, Value> = n
                        .params
                        .iter()
                        .map(|(k, s)| {
                            (
                                k.clone(),
                                json!({
                                    "type": format!("{:?}", s.ty).to_lowercase(),
                                    "description": s.description,
                                    "required": s.required,
                                    "default": s.default.as_ref().map(toml_to_json),
                                    "enum": s.one_of.as_ref().map(|v| v.iter().map(toml_to_json).collect::<Vec<_>>()),
                                    "min": s.min,
                                    "max": s.max,
                                }),
                            )
                        })
                        .collect();
                    json!({
                        "kind": format!("{}.{}", p.manifest.name, n.name),
                        "plugin": p.manifest.name,
                        "plugin_kind": format!("{:?}", p.manifest.kind).to_lowercase(),
                        "version": p.manifest.version,
                        "description": n.description,
                        "takes": n.takes,
                        "emits": n.emits,
                        "params": params,
                        "permissions": p.manifest.permissions,
                        "stateless": n.stateless,
                    })
                })
            })
            .collect();
        Value::Array(nodes)
    }
}

pub(crate) fn toml_to_json(v: &toml::Value) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

/// Reads and checks one manifest.
fn load(path: &Path) -> Result<Plugin, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read it: {e}"))?;
    parse_manifest(&text, path)
}

/// Parses and checks the text of the manifest at `path` (which only names the plugin's
/// directory: nothing is read). The error is what [`PluginRegistry::broken`] records for the
/// file: `line N: ` first where the TOML says where.
pub(crate) fn parse_manifest(text: &str, path: &Path) -> Result<Plugin, String> {
    let manifest: Manifest = toml::from_str(text).map_err(|e| {
        let line = e
            .span()
            .map(|s| text[..s.start].matches('\n').count() + 1)
            .map(|l| format!("line {l}: "))
            .unwrap_or_default();
        format!("{line}{}", e.message().trim_end())
    })?;
    let name = &manifest.name;
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(format!(
            "name {name:?}: expected letters, digits, `_` and `-`"
        ));
    }
    semver::Version::parse(&manifest.version)
        .map_err(|e| format!("version {:?}: {e}", manifest.version))?;
    let req = semver::VersionReq::parse(&manifest.engine)
        .map_err(|e| format!("engine {:?}: {e}", manifest.engine))?;
    let ours = semver::Version::parse(env!("CARGO_PKG_VERSION")).expect("our own version");
    if !req.matches(&ours) {
        return Err(format!(
            "plugin `{name}` requires millrace {} (engine = {:?}); this is millrace {ours}",
            manifest.engine, manifest.engine
        ));
    }
    for p in &manifest.permissions {
        if !PERMISSIONS.contains(&p.as_str()) {
            return Err(format!(
                "unknown permission {p:?} (known: {})",
                PERMISSIONS.join(", ")
            ));
        }
    }
    match (&manifest.kind, &manifest.entry) {
        (PluginKind::Process, Entry::Command(c)) if !c.is_empty() => {}
        (PluginKind::Process, _) => {
            return Err(
                "a process plugin's entry is a command: entry = [\"program\", \"arg\", ...]".into(),
            )
        }
        (PluginKind::Native, Entry::Library(_)) => {}
        (PluginKind::Native, _) => {
            return Err("a native plugin's entry is a library path: entry = \"lib/libx.so\"".into())
        }
    }
    let mut seen = std::collections::HashSet::new();
    for n in &manifest.nodes {
        if !seen.insert(&n.name) {
            return Err(format!("node `{}` is declared twice", n.name));
        }
        for (k, s) in &n.params {
            if let Some(d) = &s.default {
                check_value(s, d)
                    .map_err(|e| format!("node `{}`, parameter `{k}`: default {e}", n.name))?;
            }
        }
    }
    Ok(Plugin {
        manifest,
        dir: path.parent().unwrap_or(Path::new(".")).to_path_buf(),
    })
}

/// Checks a value against a parameter spec; the error says what was expected and found.
pub(crate) fn check_value(spec: &ParamSpec, v: &toml::Value) -> Result<(), String> {
    let describe = crate::describe::describe_toml;
    let ok = matches!(
        (spec.ty, v),
        (ParamType::String, toml::Value::String(_))
            | (ParamType::Integer, toml::Value::Integer(_))
            | (
                ParamType::Number,
                toml::Value::Integer(_) | toml::Value::Float(_)
            )
            | (ParamType::Boolean, toml::Value::Boolean(_))
    );
    if !ok {
        return Err(format!(
            "expected {}, found {}",
            spec.ty.name(),
            describe(v)
        ));
    }
    if let Some(allowed) = &spec.one_of {
        if !allowed.contains(v) {
            let list: Vec<String> = allowed.iter().map(|a| a.to_string()).collect();
            return Err(format!(
                "expected one of {}, found {}",
                list.join(", "),
                describe(v)
            ));
        }
    }
    let n = match v {
        toml::Value::Integer(i) => Some(*i as f64),
        toml::Value::Float(f) => Some(*f),
        _ => None,
    };
    if let Some(n) = n {
        if spec.min.is_some_and(|m| n < m) || spec.max.is_some_and(|m| n > m) {
            let range = match (spec.min, spec.max) {
                (Some(a), Some(b)) => format!("between {a} and {b}"),
                (Some(a), None) => format!("at least {a}"),
                (None, Some(b)) => format!("at most {b}"),
                (None, None) => unreachable!("a bound was exceeded"),
            };
            return Err(format!("expected a value {range}, found {}", describe(v)));
        }
    }
    Ok(())
}
