//! [`ConfigError`]: a pipeline file that cannot be loaded, validated or built, with the file,
//! line and stage it is about and a [`ConfigErrorKind`] saying what kind of mistake it is.
//!
//! The type lives with the crate's other errors (it is a variant of [`Error`](super::Error));
//! the TOML layer constructs it and re-exports it.

use std::fmt;
use std::path::{Path, PathBuf};

/// What kind of mistake a [`ConfigError`] reports: what a caller can act on without reading
/// the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ConfigErrorKind {
    /// A file could not be read: the pipeline file, an input file it names, or a plugin's
    /// directory that had to be copied.
    Io,
    /// The file is not valid TOML (or not a pipeline's shape: an unknown top-level key).
    Syntax,
    /// The file has no `[stages.<name>]` table.
    NoStages,
    /// A stage's `kind` is neither built in nor a node of a plugin on the search path.
    UnknownKind,
    /// A parameter the stage's kind does not know (most often a typo), an unknown key of a
    /// parameter table, or an unknown `[options]` key.
    UnknownParameter,
    /// A required parameter is missing.
    MissingParameter,
    /// A parameter (or option) has the wrong type, is out of range, or conflicts with another.
    BadValue,
    /// An `input` (or a window's `late`) names a stage that does not exist.
    UnknownInput,
    /// The stages form a cycle (a stage reading its own output included).
    Cycle,
    /// The stages are connected in a way that cannot run: a source given an `input`, a stage
    /// without one, a sink read from, an output nothing reads, late records sent to two places.
    Wiring,
    /// A plugin stage's permissions and its `grant` disagree.
    Permission,
    /// A plugin could not be loaded or was refused (a native library's ABI version, compiler,
    /// name or engine requirement).
    Plugin,
    /// A reload was refused: the change cannot be applied while the pipeline runs.
    RestartRequired,
    /// The pipeline cannot run on Apache Spark as it is (`millrace spark`): a stage that needs
    /// stdin or stdout, a late or dead-letter output, a shape other than one straight line.
    NotOnSpark,
}

/// A pipeline file that cannot be loaded, validated or built.
///
/// Its `Display` is the message a user reads: `file:line: stage `name`: message`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConfigError {
    /// What kind of mistake it is.
    pub kind: ConfigErrorKind,
    /// The pipeline file.
    pub file: PathBuf,
    /// The 1-based line the error is about, when known.
    pub line: Option<usize>,
    /// The stage the error is about, when there is one.
    pub stage_name: Option<String>,
    /// The stage's parameter the error is about, when there is one (`input` for wiring
    /// errors of an input, `kind` for an unknown kind).
    pub param: Option<String>,
    /// What is wrong.
    pub message: String,
}

impl ConfigError {
    pub(crate) fn new(
        file: &Path,
        line: Option<usize>,
        stage: Option<&str>,
        kind: ConfigErrorKind,
        message: impl Into<String>,
    ) -> Self {
        ConfigError {
            kind,
            file: file.to_path_buf(),
            line,
            stage_name: stage.map(str::to_string),
            param: None,
            message: message.into(),
        }
    }

    /// The same error, about the stage's parameter `param`.
    pub(crate) fn with_param(mut self, param: &str) -> Self {
        self.param = Some(param.to_string());
        self
    }

    /// The parameter the error is about, when there is one.
    pub fn param(&self) -> Option<&str> {
        self.param.as_deref()
    }

    /// What kind of mistake it is.
    pub fn kind(&self) -> ConfigErrorKind {
        self.kind
    }

    /// The stage the error is about, when there is one.
    pub fn stage(&self) -> Option<&str> {
        self.stage_name.as_deref()
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if let Some(stage) = &self.stage_name {
            write!(f, ": stage `{stage}`")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}
