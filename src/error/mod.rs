//! The crate's error types: every variant names what it came from (the stage, file and line,
//! address or thread), and keeps the underlying error as its `source` where there is one, so a
//! caller can act on it without guessing.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

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
    /// The pipeline as described cannot be built (a dangling stream, no sink, a bad
    /// parameter).
    #[error("invalid pipeline: {0}")]
    Build(String),
    /// A pipeline file could not be loaded.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A listening socket could not be opened: the address is in use, not available here, or
    /// not permitted.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address asked for.
        addr: SocketAddr,
        /// The underlying error (`AddrInUse` for a busy port).
        #[source]
        source: io::Error,
    },
    /// Listening on a non-loopback address was asked for without allowing it explicitly.
    #[error(
        "refusing to listen on {addr}: not a loopback address (allow it explicitly: --allow-remote)"
    )]
    NotLoopback {
        /// The address asked for.
        addr: SocketAddr,
    },
    /// The job server's token given (`--token`, `MILLRACE_TOKEN`) cannot be used.
    #[error("invalid token: {reason}")]
    InvalidToken {
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The operating system's random number generator could not be read (to generate the job
    /// server's token).
    #[error("cannot read random bytes from {path}: {source}")]
    Random {
        /// The device read.
        path: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A thread could not be started (the system's limit on threads or memory was reached).
    #[error("cannot spawn {what}: {source}")]
    Spawn {
        /// What the thread was for: "a thread for stage `x`", "the HTTP thread", ...
        what: String,
        /// The stage it was to run, when it was a stage's.
        stage: Option<String>,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A shutdown's deadline passed with jobs still running (a closure that never returns
    /// cannot be interrupted); their threads are left to finish.
    #[error("shutdown deadline passed with jobs still running: {}", ids(.running))]
    ShutdownTimeout {
        /// The deadline that passed.
        deadline: Duration,
        /// The ids of the jobs still running.
        running: Vec<u64>,
    },
    /// A stage's input broke the channel protocol (it closed before every upstream instance
    /// sent its end-of-stream marker). An internal invariant: this is a bug in the engine.
    #[error("stage `{stage}`: channel protocol violated: {message}")]
    Protocol {
        /// The stage whose input it was.
        stage: String,
        /// What was seen.
        message: String,
    },
    /// The closure building a job's pipeline panicked.
    #[error("job `{job}` panicked while building: {message}")]
    BuildPanicked {
        /// The job's name.
        job: String,
        /// The panic message.
        message: String,
    },
    /// More records were sent to dead-letter streams than `Options::max_dead_letters` allows
    /// (a wrong schema must not quietly divert everything).
    #[error("stage `{stage}`: too many dead letters: {count} exceeds the limit of {limit} (max_dead_letters)")]
    TooManyDeadLetters {
        /// Letters sent when the limit was found exceeded.
        count: u64,
        /// The limit, as configured (`100`, or `0.01 of the records read`).
        limit: String,
        /// The stage whose letter crossed the limit.
        stage: String,
    },
    /// A stage's state cannot be checkpointed, or its input cannot be replayed: a run with
    /// checkpoints refuses to start.
    #[error("stage `{stage}`: cannot checkpoint: {reason}")]
    CheckpointUnsupported {
        /// The stage.
        stage: String,
        /// Why, and what to change.
        reason: String,
    },
    /// The checkpoint directory holds checkpoints of an unfinished run and the run was asked
    /// neither to resume nor to start afresh.
    #[error("{dir} holds checkpoints of an unfinished run (newest: {newest}): pass --resume to continue it, or --fresh to discard them")]
    CheckpointsExist {
        /// The checkpoint directory.
        dir: String,
        /// The newest checkpoint found there.
        newest: String,
    },
    /// Another run holds the checkpoint directory's lock.
    #[error("{dir} is in use by another run (its lock is held)")]
    CheckpointDirLocked {
        /// The checkpoint directory.
        dir: String,
    },
    /// Writing or reading a checkpoint failed at the file system: fatal (an fsync error is
    /// never retried as if it had succeeded).
    #[error("checkpoint store: {op} {path}: {source}")]
    CheckpointIo {
        /// What was being done (`fsync`, `rename`, …).
        op: &'static str,
        /// The file or directory.
        path: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// More checkpoints failed in a row than `tolerable_failures` allows.
    #[error(
        "checkpoint {id} failed ({failures} in a row, tolerable_failures = {tolerable}): {reason}"
    )]
    CheckpointFailed {
        /// The last failed checkpoint.
        id: u64,
        /// Consecutive failures.
        failures: u32,
        /// The configured tolerance.
        tolerable: u32,
        /// Why the last one failed.
        reason: String,
    },
    /// Any other checkpoint or recovery error (a state that does not decode, a resume whose
    /// pipeline changed a stateful stage, …).
    #[error("checkpoint: {message}")]
    Checkpoint {
        /// What went wrong, naming the stage and the checkpoint where known.
        message: String,
    },
    /// The run was cancelled through a [`CancelHandle`](crate::CancelHandle).
    #[error("run cancelled")]
    Cancelled,
    /// The engine running jobs is shutting down and takes no new jobs.
    #[error("the engine is shutting down")]
    ShuttingDown,
}

fn ids(running: &[u64]) -> String {
    let ids: Vec<String> = running.iter().map(u64::to_string).collect();
    ids.join(", ")
}

impl Error {
    /// The stage the error is about, when there is one.
    pub fn stage(&self) -> Option<&str> {
        match self {
            Error::Operator { stage, .. }
            | Error::Panic { stage, .. }
            | Error::Io { stage, .. }
            | Error::Record { stage, .. }
            | Error::Protocol { stage, .. }
            | Error::TooManyDeadLetters { stage, .. }
            | Error::CheckpointUnsupported { stage, .. } => Some(stage),
            Error::Spawn { stage, .. } => stage.as_deref(),
            Error::Config(e) => e.stage(),
            Error::Build(_)
            | Error::Listen { .. }
            | Error::NotLoopback { .. }
            | Error::InvalidToken { .. }
            | Error::Random { .. }
            | Error::ShutdownTimeout { .. }
            | Error::BuildPanicked { .. }
            | Error::CheckpointsExist { .. }
            | Error::CheckpointDirLocked { .. }
            | Error::CheckpointIo { .. }
            | Error::CheckpointFailed { .. }
            | Error::Checkpoint { .. }
            | Error::Cancelled
            | Error::ShuttingDown => None,
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
