//! The engine that runs many jobs: a job registry behind one lock, progress streams to any number
//! of subscribers, cancellation, and a shutdown that joins every thread it started.
//!
//! Each job runs on a thread of its own (which builds the pipeline there — a `Pipeline` is not
//! `Send`) and its stages on scoped threads under it, so joining the job thread joins them all.
//! One engine-wide ticker thread samples the running jobs' metrics into their progress streams.
//!
//! ```
//! use millrace::job::{Engine, Event, Received};
//! use millrace::Pipeline;
//!
//! let engine = Engine::new();
//! let id = engine
//!     .submit("evens", || {
//!         let p = Pipeline::new();
//!         p.source("n", 0..1000u64).filter(|x| x % 2 == 0).for_each(|_| {});
//!         Ok(p)
//!     })
//!     .unwrap();
//! let events = engine.subscribe(id).unwrap();
//! let info = engine.wait(id).unwrap();
//! assert_eq!(info.status, millrace::job::JobStatus::Succeeded);
//! // Whenever it subscribed, a subscriber gets the final event.
//! let last = std::iter::from_fn(|| events.recv()).last().unwrap();
//! assert!(matches!(last, Received::Event(Event::Finished { .. })));
//! engine.shutdown(std::time::Duration::from_secs(5)).unwrap();
//! ```

mod checkpoints;
pub mod hub;
pub mod registry;
mod supervisor;

use std::time::Duration;

use crossbeam_channel::{bounded, Sender};
use serde_json::{json, Value};

pub use hub::{ProgressHub, Received, RecvTimeoutError, Subscription};
pub use registry::Registry;
/// The engine's job bookkeeping, public only to the loom models (`tests/loom_engine.rs`).
#[cfg(loom)]
#[doc(hidden)]
pub use supervisor::{Control, Handle, Mutation, Supervisor};

use crate::sync::thread::{self, JoinHandle};
use crate::sync::Mutex;
use crate::{CancelHandle, Error, Pipeline, RunReport};
#[cfg(not(loom))]
use supervisor::Supervisor;

/// What [`Engine::try_cancel`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelOutcome {
    /// The job was running: it has been asked to stop (it ends `cancelled`, or with the
    /// outcome it reached before it noticed).
    Requested,
    /// The job had already ended, with this status; nothing was done.
    Ended(JobStatus),
    /// No such job (or it was forgotten).
    Unknown,
}

/// A job's identifier, unique within one engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct JobId(pub u64);

impl std::fmt::Display for JobId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobStatus {
    /// Building or running.
    Running,
    /// Ran to completion.
    Succeeded,
    /// Failed to build or run.
    Failed,
    /// Cancelled (also by shutdown).
    Cancelled,
}

impl JobStatus {
    /// `running`, `succeeded`, `failed` or `cancelled`.
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Running => "running",
            JobStatus::Succeeded => "succeeded",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
        }
    }

    /// Whether the job has ended.
    pub fn is_final(self) -> bool {
        self != JobStatus::Running
    }
}

/// One event of a job's progress stream.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Event {
    /// The job's thread started.
    Started {
        /// The job.
        job: JobId,
        /// Its name.
        name: String,
    },
    /// Periodic per-stage metrics while it runs.
    Progress {
        /// The job.
        job: JobId,
        /// A snapshot of the live metrics.
        report: RunReport,
    },
    /// Something worth knowing that does not stop the job.
    Warning {
        /// The job.
        job: JobId,
        /// What happened.
        message: String,
    },
    /// The job ran to completion (final).
    Finished {
        /// The job.
        job: JobId,
        /// Its final report.
        report: RunReport,
    },
    /// The job failed (final).
    Failed {
        /// The job.
        job: JobId,
        /// The error.
        error: String,
        /// The stage the error names, if any.
        stage: Option<String>,
    },
    /// The job was cancelled (final).
    Cancelled {
        /// The job.
        job: JobId,
    },
}

impl Event {
    /// `started`, `progress`, `warning`, `finished`, `failed` or `cancelled`.
    pub fn kind(&self) -> &'static str {
        match self {
            Event::Started { .. } => "started",
            Event::Progress { .. } => "progress",
            Event::Warning { .. } => "warning",
            Event::Finished { .. } => "finished",
            Event::Failed { .. } => "failed",
            Event::Cancelled { .. } => "cancelled",
        }
    }

    /// The job it is about.
    pub fn job(&self) -> JobId {
        match self {
            Event::Started { job, .. }
            | Event::Progress { job, .. }
            | Event::Warning { job, .. }
            | Event::Finished { job, .. }
            | Event::Failed { job, .. }
            | Event::Cancelled { job } => *job,
        }
    }

    /// Whether it ends the stream.
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            Event::Finished { .. } | Event::Failed { .. } | Event::Cancelled { .. }
        )
    }

    /// The event as one JSON object: `{"event": kind, "job": id, ...}`.
    pub fn to_json(&self) -> Value {
        let mut v = json!({"event": self.kind(), "job": self.job().0});
        let m = v.as_object_mut().expect("an object");
        match self {
            Event::Started { name, .. } => {
                m.insert("name".into(), json!(name));
            }
            Event::Progress { report, .. } | Event::Finished { report, .. } => {
                m.insert("report".into(), report_json(report));
            }
            Event::Warning { message, .. } => {
                m.insert("message".into(), json!(message));
            }
            Event::Failed { error, stage, .. } => {
                m.insert("error".into(), json!(error));
                m.insert("stage".into(), json!(stage));
            }
            Event::Cancelled { .. } => {}
        }
        v
    }
}

/// A run report as JSON: elapsed seconds, records read, one object per stage instance, where
/// the records went, and `checkpoints` (null without a `[checkpoint]` table; otherwise counts,
/// bytes, the longest alignment, what a resume used and skipped, and the latest checkpoints'
/// stats).
pub fn report_json(r: &RunReport) -> Value {
    let stages: Vec<Value> = r
        .stages
        .iter()
        .map(|s| {
            json!({
                "stage": s.stage,
                "instance": s.instance,
                "records_in": s.records_in,
                "records_out": s.records_out,
                "batches_in": s.batches_in,
                "batches_out": s.batches_out,
                "busy_ms": s.busy.as_secs_f64() * 1e3,
                "send_blocked_ms": s.send_blocked.as_secs_f64() * 1e3,
                "recv_blocked_ms": s.recv_blocked.as_secs_f64() * 1e3,
                "late": s.late,
                "skipped": s.skipped,
                "dead_lettered": s.dead_lettered,
                "open_windows": s.open_windows,
                // Checkpoint barrier alignment, summed over checkpoints (0 without them).
                "aligning_ms": s.aligning.as_secs_f64() * 1e3,
                // The input channel's fill (messages queued, as last sampled, and capacity).
                "queue_len": s.queue_len,
                "queue_capacity": s.queue_capacity,
            })
        })
        .collect();
    json!({
        "elapsed_s": r.elapsed.as_secs_f64(),
        "records_read": r.records_read(),
        "stages": stages,
        // Where the records went, per step: {stage, shape, records_in, records_out, filtered,
        // skipped, dead_lettered, late}.
        "accounts": serde_json::to_value(&r.accounts).unwrap_or(Value::Null),
        "checkpoints": checkpoints::to_json(r),
    })
}

/// What the engine knows about a job.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct JobInfo {
    /// Its id.
    pub id: JobId,
    /// Its name.
    pub name: String,
    /// Where it is.
    pub status: JobStatus,
    /// Time since it was submitted, or its run time once ended.
    pub elapsed: Duration,
    /// The final report (succeeded jobs), the last live snapshot (running ones), or the
    /// snapshot taken as it ended (failed and cancelled ones that had started running).
    pub report: Option<RunReport>,
    /// The error of a failed job.
    pub error: Option<String>,
    /// The stage graph of a TOML pipeline's job ([`PipelineSpec::graph_json`](crate::config::PipelineSpec::graph_json));
    /// `None` for a pipeline built in code.
    pub graph: Option<crate::sync::Arc<Value>>,
}

impl JobInfo {
    /// As JSON: `{"id", "name", "status", "elapsed_s", "error", "report", "graph"}`.
    pub fn to_json(&self) -> Value {
        json!({
            "id": self.id.0,
            "name": self.name,
            "status": self.status.as_str(),
            "elapsed_s": self.elapsed.as_secs_f64(),
            "error": self.error,
            "report": self.report.as_ref().map(report_json),
            "graph": self.graph.as_deref(),
        })
    }
}

/// Tuning of an [`Engine`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct EngineOptions {
    /// How often running jobs publish a `Progress` event (default 500 ms).
    pub progress_interval: Duration,
    /// Events each subscriber may have queued before the oldest are dropped (default 256).
    pub subscriber_capacity: usize,
    /// Ended jobs kept for `status` and late subscribers; older ones are forgotten first
    /// (default 1,000).
    pub keep_finished: usize,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            progress_interval: Duration::from_millis(500),
            subscriber_capacity: 256,
            keep_finished: 1000,
        }
    }
}

/// Runs many pipelines at once. Dropping it shuts it down (10 s deadline).
///
/// The jobs' bookkeeping (intake, threads, cancellation, shutdown) is a `job::supervisor`
/// `Supervisor` of pipelines, which the loom models in `tests/loom_engine.rs` check; the engine
/// adds the progress ticker.
pub struct Engine {
    jobs: Supervisor<CancelHandle>,
    ticker: Mutex<Option<(Sender<()>, JoinHandle<()>)>>,
}

impl Default for Engine {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("jobs", &self.jobs.job_count())
            .finish()
    }
}

impl Engine {
    /// An engine with default options.
    pub fn new() -> Self {
        Self::with_options(EngineOptions::default())
    }

    /// An engine with the given options. Starts the progress ticker thread.
    pub fn with_options(opts: EngineOptions) -> Self {
        let jobs = Supervisor::new(&opts);
        let (stop_tx, stop_rx) = bounded::<()>(0);
        let sampled = jobs.clone();
        let interval = opts.progress_interval;
        let ticker = thread::Builder::new()
            .name("millrace-ticker".into())
            .spawn(move || {
                // Until `shutdown` drops the sender.
                while let Err(crossbeam_channel::RecvTimeoutError::Timeout) =
                    stop_rx.recv_timeout(interval)
                {
                    sampled.publish_progress();
                }
            })
            .expect("spawn the progress ticker");
        Engine {
            jobs,
            ticker: Mutex::new(Some((stop_tx, ticker))),
        }
    }

    /// Submits a pipeline built by `build` on the job's own thread; returns at once.
    pub fn submit<F>(&self, name: &str, build: F) -> Result<JobId, Error>
    where
        F: FnOnce() -> Result<Pipeline, Error> + Send + 'static,
    {
        self.start(name, None, build, false).map(|(id, _)| id)
    }

    /// Like [`submit`](Engine::submit), with a progress stream subscribed before the job
    /// starts, so that it sees every event from `Started` on.
    pub fn submit_watched<F>(
        &self,
        name: &str,
        build: F,
    ) -> Result<(JobId, Subscription<Event>), Error>
    where
        F: FnOnce() -> Result<Pipeline, Error> + Send + 'static,
    {
        self.start(name, None, build, true)
            .map(|(id, sub)| (id, sub.expect("subscribed before the start")))
    }

    fn start<F>(
        &self,
        name: &str,
        graph: Option<crate::sync::Arc<Value>>,
        build: F,
        watch: bool,
    ) -> Result<(JobId, Option<Subscription<Event>>), Error>
    where
        F: FnOnce() -> Result<Pipeline, Error> + Send + 'static,
    {
        self.jobs
            .start_with_graph(name, graph, watch, move |control| {
                let p = build()?;
                control.running(p.cancel_handle())?;
                p.run()
            })
    }

    /// Submits a TOML pipeline (already parsed and validated).
    pub fn submit_toml(&self, spec: crate::config::PipelineSpec) -> Result<JobId, Error> {
        let name = spec.name.clone();
        let graph = Some(crate::sync::Arc::new(spec.graph_json()));
        self.start(
            &name,
            graph,
            move || spec.build().map_err(Error::from),
            false,
        )
        .map(|(id, _)| id)
    }

    /// [`submit_toml`](Engine::submit_toml) with a progress stream from the start.
    pub fn submit_toml_watched(
        &self,
        spec: crate::config::PipelineSpec,
    ) -> Result<(JobId, Subscription<Event>), Error> {
        let name = spec.name.clone();
        let graph = Some(crate::sync::Arc::new(spec.graph_json()));
        self.start(
            &name,
            graph,
            move || spec.build().map_err(Error::from),
            true,
        )
        .map(|(id, sub)| (id, sub.expect("subscribed before the start")))
    }

    /// The job's current state; `None` for an unknown (or forgotten) job.
    pub fn status(&self, id: JobId) -> Option<JobInfo> {
        self.jobs.status(id)
    }

    /// Every job the engine remembers, by id.
    pub fn list(&self) -> Vec<JobInfo> {
        self.jobs.list()
    }

    /// Asks a running job to stop; false if it is unknown or already ended. The job's stages
    /// notice between batches and while blocked on a channel.
    pub fn cancel(&self, id: JobId) -> bool {
        self.jobs.cancel(id)
    }

    /// Like [`cancel`](Engine::cancel), and says what the cancel found, decided in the same
    /// critical section as the cancel itself: a job that ends just before it is
    /// [`CancelOutcome::Ended`], never `Requested`.
    pub fn try_cancel(&self, id: JobId) -> CancelOutcome {
        self.jobs.try_cancel(id)
    }

    /// Waits for the job to end (its progress stream has its final event by then); `None` for
    /// an unknown job.
    pub fn wait(&self, id: JobId) -> Option<JobInfo> {
        self.jobs.wait(id)
    }

    /// A progress stream of the job; `None` for an unknown job. A subscriber to an ended job
    /// receives its final event.
    pub fn subscribe(&self, id: JobId) -> Option<Subscription<Event>> {
        self.jobs.subscribe(id)
    }

    /// Forgets an ended job and returns it; `None` if it is unknown, already removed, or still
    /// running (cancel it first).
    pub fn remove(&self, id: JobId) -> Option<JobInfo> {
        self.jobs.remove(id)
    }

    /// Threads the engine has started and not joined (job threads and the ticker).
    pub fn threads(&self) -> usize {
        self.jobs.threads() + usize::from(self.ticker.lock().is_some())
    }

    /// Stops accepting jobs, cancels every running one, and joins every thread the engine
    /// started. Returns an error naming the jobs still running at `deadline` (a user closure
    /// that never returns cannot be interrupted); their threads are then left to finish.
    pub fn shutdown(&self, deadline: Duration) -> Result<(), Error> {
        let jobs = self.jobs.shutdown(deadline);
        if let Some((stop, ticker)) = self.ticker.lock().take() {
            drop(stop);
            let _ = ticker.join();
        }
        jobs
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown(Duration::from_secs(10)) {
            log::warn!("engine dropped: {e}");
        }
    }
}
