//! Checkpoints: consistent snapshots of a running pipeline, and recovery from them.
//!
//! This module owns the protocol's types and its three parts:
//! - [`coordinator`]: triggers checkpoint `n` every `interval`, collects one acknowledgement per
//!   stage instance, fails a checkpoint that misses its `timeout` and removes it from memory and
//!   disk, and completes one by writing its manifest (outside its lock).
//! - [`store`]: the crash-safe, verified store behind the [`store::Store`] trait (a directory
//!   per checkpoint, files written by temp + fsync + rename + directory fsync, a CRC32C per
//!   file, a manifest written last that makes a checkpoint complete), with a fault-injecting
//!   file system for crash-point enumeration.
//! - [`state`]: how one stage instance's state is encoded ([`state::InstanceState`], with
//!   keyed state stored by key group).
//!
//! How barriers travel is the runtime's and the channels' business (`runtime.rs`,
//! `channel.rs`): a source records its position and sends `Barrier(n)` after the records
//! before it; a stage with several inputs aligns. See docs/checkpoints.md.

pub(crate) mod coordinator;
pub(crate) mod keyed;
#[doc(hidden)]
pub mod state;
pub mod store;

use std::path::PathBuf;
use std::time::Duration;

/// A checkpoint's number: 1, 2, 3, … within one checkpoint directory (resumed runs continue
/// the numbering).
pub type CheckpointId = u64;

/// Which guarantee checkpoints give.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Mode {
    /// Barriers are aligned and sinks commit at checkpoints: after a crash and `--resume`,
    /// every record's effect is in the output exactly once. Pipelines reading stdin (without
    /// `spool_stdin`) or writing stdout are refused.
    #[default]
    ExactlyOnce,
    /// Barriers are not aligned (a stage keeps reading an input that already delivered the
    /// barrier): lower latency under skew, but records after the barrier can be in the
    /// snapshot, so a resumed run may repeat some output.
    AtLeastOnce,
}

/// What a run does with the checkpoints it finds in its directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Start {
    /// Refuse to start if the directory holds checkpoints of an unfinished run (the default:
    /// the message names both choices below).
    #[default]
    RefuseExisting,
    /// Restore every stage's state and every source's position from the newest checkpoint
    /// that verifies (`--resume`); start afresh when there is none.
    Resume,
    /// Discard the checkpoints found and start from the beginning (`--fresh`).
    Fresh,
}

/// Checkpointing options (the TOML `[checkpoint]` table; `Pipeline::checkpoints` in the typed
/// API).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct CheckpointOptions {
    /// The checkpoint directory (locked for the run's life: a second run on it is refused).
    pub dir: PathBuf,
    /// Time between the start of one checkpoint and the trigger of the next (default 1 s).
    pub interval: Duration,
    /// A checkpoint not complete this long after its trigger is failed and removed (default
    /// 1 min).
    pub timeout: Duration,
    /// How many checkpoints may be in progress at once (default 1).
    pub max_concurrent: usize,
    /// The least time between the end of one checkpoint and the trigger of the next (default
    /// 0).
    pub min_pause: Duration,
    /// How many checkpoints in a row may fail before the run fails (default 0).
    pub tolerable_failures: u32,
    /// How many complete checkpoints to keep (default 3, at least 1).
    pub retain: usize,
    /// Keep the checkpoints when the run succeeds (default: removed).
    pub retain_on_success: bool,
    /// Exactly-once (aligned, default) or at-least-once.
    pub mode: Mode,
    /// Append stdin to a CRC-framed log in the checkpoint directory and read it from there,
    /// so that a pipeline reading stdin can be resumed (default false).
    pub spool_stdin: bool,
    /// The number of key groups keyed state is stored by (default 128): fixed for the life of
    /// a checkpoint directory, so that a later restore can change the parallelism.
    pub max_parallelism: u16,
    /// What to do with existing checkpoints.
    pub start: Start,
}

impl CheckpointOptions {
    /// Options with the defaults, storing checkpoints in `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        CheckpointOptions {
            dir: dir.into(),
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(60),
            max_concurrent: 1,
            min_pause: Duration::ZERO,
            tolerable_failures: 0,
            retain: 3,
            retain_on_success: false,
            mode: Mode::ExactlyOnce,
            spool_stdin: false,
            max_parallelism: state::DEFAULT_MAX_PARALLELISM,
            start: Start::RefuseExisting,
        }
    }
}

/// One checkpoint's outcome, as the report and the progress stream show it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[non_exhaustive]
pub struct CheckpointStats {
    /// Its number.
    pub id: CheckpointId,
    /// `completed`, `failed` (with the reason in `error`) or `declined`.
    pub outcome: Outcome,
    /// From trigger to completion or failure.
    pub duration_ms: u64,
    /// Bytes of state written (all files, manifest included).
    pub bytes: u64,
    /// The longest time any stage instance spent aligning its inputs for it.
    pub max_alignment_ms: u64,
    /// The stage instance that aligned longest (`stage#instance`), if any aligned.
    pub slowest_alignment: Option<String>,
    /// Why it failed.
    pub error: Option<String>,
}

/// How a checkpoint ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Outcome {
    /// Every instance acknowledged and the manifest is durable.
    Completed,
    /// It missed its timeout, an instance declined it, or writing it failed; nothing of it is
    /// left in memory or on disk.
    Failed,
}

/// A stage instance, as checkpoints name it.
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct InstanceId {
    /// The stage's name.
    pub stage: String,
    /// Which instance (0-based).
    pub instance: usize,
}

impl std::fmt::Display for InstanceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}#{}", self.stage, self.instance)
    }
}

/// Whether a stage's state can be checkpointed (declared by each head, chain step and tail;
/// checked before a run with checkpoints starts).
#[doc(hidden)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateSupport {
    /// Holds no state across records (`filter`, `select`, `exec`, …).
    Stateless,
    /// Holds state and snapshots it.
    Snapshots,
    /// Fine under [`Mode::AtLeastOnce`], refused under [`Mode::ExactlyOnce`] with this reason
    /// (stdout, which cannot be rolled back).
    AtLeastOnce(String),
    /// Holds state it cannot snapshot, or reads input it cannot replay: checkpointing refuses
    /// to start, naming the stage and this reason.
    Unsupported(String),
}
