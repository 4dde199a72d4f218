//! The crate's error types: every variant names the stage (and file, line or plugin) it came
//! from, so a caller can act on it without guessing.

use std::fmt;

mod config;

pub use config::{ConfigError, ConfigErrorKind};

/// A boxed error from user code (an operator closure, a sink), kept as the `source` of an
/// [`Error::Operator`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Everything that can make a pipeline fail to build or to run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An operator returned an error for a record.
    #[error("stage `{stage}` failed: {source}")]
    Operator {
        /// The operator's stage name.
        stage: String,
        /// What the operator returned.
        #[source]
        source: BoxError,
    },
    /// An operator, source or sink panicked; the run was stopped.
    #[error("stage `{stage}` panicked: {message}")]
    Panic {
        /// The stage whose thread panicked.
        stage: String,
        /// The panic message.
        message: String,
    },
    /// Reading or writing a file (or stdin/stdout) failed.
    #[error("stage `{stage}`: {path}: {source}")]
    Io {
        /// The stage doing the I/O.
        stage: String,
        /// The file (`-` for stdin or stdout).
        path: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// One input record was malformed (bad JSON, bad UTF-8, a missing field, ...).
    #[error("stage `{stage}`: {location}: {message}")]
    Record {
        /// The stage that read the record.
        stage: String,
        /// Where the record came from: `file:line`.
        location: Location,
        /// What was wrong with it.
        message: String,
    },
    /// The pipeline as described cannot be built (a dangling stream, a bad parameter).
    #[error("invalid pipeline: {0}")]
    Build(String),
    /// A pipeline file could not be loaded.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The run was cancelled through a [`CancelHandle`](crate::CancelHandle).
    #[error("run cancelled")]
    Cancelled,
    /// The engine running jobs is shutting down and takes no new jobs.
    #[error("the engine is shutting down")]
    ShuttingDown,
}

impl Error {
    /// The stage the error is about, when there is one.
    pub fn stage(&self) -> Option<&str> {
        match self {
            Error::Operator { stage, .. }
            | Error::Panic { stage, .. }
            | Error::Io { stage, .. }
            | Error::Record { stage, .. } => Some(stage),
            Error::Config(e) => e.stage(),
            Error::Build(_) | Error::Cancelled | Error::ShuttingDown => None,
        }
    }
}

/// A position in an input: a file (or `-` for stdin) and a 1-based line number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// The file, or `-` for stdin.
    pub path: String,
    /// The 1-based line number.
    pub line: u64,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.path, self.line)
    }
}

/// Shorthand for results whose error is [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
