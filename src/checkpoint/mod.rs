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

#[doc(hidden)]
pub mod coordinator;
pub mod fs;
pub(crate) mod keyed;
#[doc(hidden)]
pub mod spool;
mod start;
#[doc(hidden)]
pub mod state;
pub mod store;
pub mod verify;

pub(crate) use start::{start, StartInstance};

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
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use millrace::checkpoint::CheckpointOptions;
/// let mut opts = CheckpointOptions::new("/tmp/my-job-checkpoints");
/// opts.interval = Duration::from_millis(500);
/// opts.tolerable_failures = 2;
/// assert_eq!(opts.max_concurrent, 1);
/// assert_eq!(opts.retain, 3);
/// ```
#[derive(Clone)]
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
    /// Keep the checkpoints when the run succeeds (default: removed). Either way the directory
    /// is marked completed: a resume then does nothing, and the next run discards them.
    pub retain_on_success: bool,
    /// Exactly-once (aligned, default) or at-least-once.
    pub mode: Mode,
    /// Append stdin to a CRC-framed log in the checkpoint directory (`stdin.spool`, see
    /// [`spool`]) and read it from there, so that a pipeline reading stdin can be resumed
    /// (default false). A resumed run appends its own stdin after the log: give it the rest
    /// of the input, or nothing (`< /dev/null`) when the log already holds all of it.
    pub spool_stdin: bool,
    /// The number of key groups keyed state is stored by (default 128): fixed for the life of
    /// a checkpoint directory, so that a later restore can change the parallelism.
    pub max_parallelism: u16,
    /// What to do with existing checkpoints.
    pub start: Start,
    /// The store to use instead of the file-system store on `dir` (tests).
    #[doc(hidden)]
    pub store: Option<std::sync::Arc<dyn store::Store>>,
    /// Test hook: drop this instance's acknowledgement of this checkpoint (the real
    /// coordinator path then times it out).
    #[doc(hidden)]
    pub drop_ack: Option<(InstanceId, CheckpointId)>,
    /// The file system the run's checkpoint store *and* its file and directory sinks use
    /// (tests: one `SimFs` under both, so that a simulated crash hits them together); `None`:
    /// the operating system's ([`fs::RealFs`]).
    #[doc(hidden)]
    pub fs: Option<std::sync::Arc<dyn store::Fs>>,
    /// Test hook: when checkpoints may be triggered, and who hears when each was triggered
    /// and completed (see [`coordinator::TriggerHook`]).
    #[doc(hidden)]
    pub trigger_hook: Option<std::sync::Arc<dyn coordinator::TriggerHook>>,
}

/// The file system a run's sinks and store use: the hidden [`CheckpointOptions::fs`], or
/// [`fs::RealFs`] (also without checkpoints).
pub(crate) fn run_fs(opts: Option<&CheckpointOptions>) -> std::sync::Arc<dyn store::Fs> {
    match opts.and_then(|o| o.fs.as_ref()) {
        Some(fs) => std::sync::Arc::clone(fs),
        None => std::sync::Arc::new(fs::RealFs),
    }
}

impl std::fmt::Debug for CheckpointOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckpointOptions")
            .field("dir", &self.dir)
            .field("interval", &self.interval)
            .field("timeout", &self.timeout)
            .field("max_concurrent", &self.max_concurrent)
            .field("min_pause", &self.min_pause)
            .field("tolerable_failures", &self.tolerable_failures)
            .field("retain", &self.retain)
            .field("retain_on_success", &self.retain_on_success)
            .field("mode", &self.mode)
            .field("spool_stdin", &self.spool_stdin)
            .field("max_parallelism", &self.max_parallelism)
            .field("start", &self.start)
            .field("store", &self.store.as_ref().map(|_| "<custom>"))
            .field("fs", &self.fs.as_ref().map(|_| "<custom>"))
            .finish_non_exhaustive()
    }
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
            store: None,
            drop_ack: None,
            fs: None,
            trigger_hook: None,
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
    /// Reads stdin: replayable through the stdin spool when `spool_stdin` is on (it then
    /// snapshots its position in the spool), refused otherwise.
    StdinSpool,
}

/// What the running workers share of checkpointing (present only when it is on).
pub(crate) struct CheckpointRun {
    /// The coordinator.
    pub coord: std::sync::Arc<coordinator::Coordinator>,
    /// Where instances write their state files.
    pub store: std::sync::Arc<dyn store::Store>,
    /// Aligned or not.
    pub mode: Mode,
    /// Each instance's restored state, when the run resumes.
    pub restored: std::collections::BTreeMap<InstanceId, state::InstanceState>,
    /// Keep the checkpoints when the run succeeds.
    pub retain_on_success: bool,
    /// The checkpoint the run resumed from.
    pub resumed_from: Option<CheckpointId>,
    /// Checkpoints skipped at resume, with why.
    pub skipped: Vec<(CheckpointId, String)>,
    /// Test hook: this instance's acknowledgement of this checkpoint is dropped.
    pub drop_ack: Option<(InstanceId, CheckpointId)>,
    /// Under `Start::Fresh`, or a plain start on the directory of a completed run: the
    /// earlier run's checkpoints to discard, with its stdin spool and completion mark, when
    /// the start gate opens ([`open_gate`](Self::open_gate)).
    pub fresh_discards: Option<Vec<CheckpointId>>,
    /// The checkpoint directory (where `stdin.spool` lives).
    pub dir: std::path::PathBuf,
    /// Whether stdin is read through the spool (`spool_stdin`).
    pub spool_stdin: bool,
    /// Whether a source has taken the spool (only one source may read stdin).
    pub spool_taken: crate::sync::AtomicBool,
    /// A resume found the directory's run completed (when, ms since the epoch): the run does
    /// nothing.
    pub already_completed: Option<u64>,
}

impl CheckpointRun {
    /// What the start gate does once every worker has checked its tail, before any record
    /// moves: under `Start::Fresh` (or a plain start after a completed run), discards the
    /// earlier run's checkpoints, stdin spool and completion mark.
    /// (Done here rather than when the store is opened, so that a run refused at the gate —
    /// a stdout sink in exactly-once mode, say — leaves them as they were.)
    pub(crate) fn open_gate(&self) -> Result<(), crate::Error> {
        let Some(ids) = &self.fresh_discards else {
            return Ok(());
        };
        for &id in ids {
            self.store.discard(id)?;
        }
        spool::remove(&self.dir)?;
        self.store.clear_completed()
    }

    /// After a successful run that does not keep its checkpoints: removes the stdin spool.
    pub(crate) fn remove_spool(&self) -> Result<(), crate::Error> {
        spool::remove(&self.dir)
    }

    /// Writes instance `who`'s state for checkpoint `id` and acknowledges it (on the worker
    /// thread, no lock held during the write). A write that fails while `id` is still pending
    /// fails the run; one that fails because `id` was removed meanwhile is ignored. An ack
    /// refused as stale discards the file, so that a late file never outlives its checkpoint.
    pub(crate) fn write_and_ack(
        &self,
        who: &InstanceId,
        id: CheckpointId,
        state: &state::InstanceState,
        align_ns: u64,
    ) -> Result<(), crate::Error> {
        let bytes = state.encode()?;
        let name = store::state_file_name(who);
        let file = match self.store.put(id, &name, &bytes) {
            Ok(f) => f,
            Err(_) if !self.coord.is_pending(id) => return Ok(()),
            Err(e) => return Err(e),
        };
        if self.drop_ack.as_ref() == Some(&(who.clone(), id)) {
            log::debug!("test hook: dropping {who}'s ack of checkpoint {id}");
            return Ok(());
        }
        let ack = coordinator::Ack {
            file,
            key_groups: state.key_groups,
            positions: state.positions.clone(),
            precommitted: state.precommitted.clone(),
            align_ns,
        };
        if self.coord.ack(id, who, ack).is_err() {
            self.store.discard(id)?;
        }
        Ok(())
    }
}

/// The id `Tail::barrier` is called with once more after `Tail::finish`, to collect an ended
/// instance's final state (a sink's final committed length and parts).
pub(crate) const FINAL: CheckpointId = u64::MAX;
