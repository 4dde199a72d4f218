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

pub mod hub;
pub mod registry;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Sender};
use parking_lot::{Condvar, Mutex};
use serde_json::{json, Value};

pub use hub::{ProgressHub, Received, RecvTimeoutError, Subscription};
pub use registry::Registry;

use crate::{CancelHandle, Error, Pipeline, RunReport};

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

/// A run report as JSON: elapsed seconds, records read, and one object per stage instance.
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
                "open_windows": s.open_windows,
            })
        })
        .collect();
    json!({
        "elapsed_s": r.elapsed.as_secs_f64(),
        "records_read": r.records_read(),
        "stages": stages,
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
    /// The final report (succeeded jobs) or the last live snapshot (running ones).
    pub report: Option<RunReport>,
    /// The error of a failed job.
    pub error: Option<String>,
}

impl JobInfo {
    /// As JSON: `{"id", "name", "status", "elapsed_s", "error", "report"}`.
    pub fn to_json(&self) -> Value {
        json!({
            "id": self.id.0,
            "name": self.name,
            "status": self.status.as_str(),
            "elapsed_s": self.elapsed.as_secs_f64(),
            "error": self.error,
            "report": self.report.as_ref().map(report_json),
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

struct Job {
    id: JobId,
    name: String,
    submitted: Instant,
    hub: ProgressHub<Event>,
    slot: Mutex<Slot>,
    ended: Condvar,
}

struct Slot {
    status: JobStatus,
    /// The running pipeline's handle (set once built, cleared when it ends).
    cancel: Option<CancelHandle>,
    cancel_requested: bool,
    report: Option<RunReport>,
    error: Option<String>,
    run_time: Option<Duration>,
    /// Order in which jobs ended (for forgetting the oldest).
    ended_seq: u64,
}

impl Job {
    fn info(&self) -> JobInfo {
        let s = self.slot.lock();
        let report = match (&s.report, &s.cancel) {
            (Some(r), _) => Some(r.clone()),
            (None, Some(h)) => Some(h.snapshot()),
            _ => None,
        };
        JobInfo {
            id: self.id,
            name: self.name.clone(),
            status: s.status,
            elapsed: s.run_time.unwrap_or_else(|| self.submitted.elapsed()),
            report,
            error: s.error.clone(),
        }
    }
}

struct Inner {
    opts: EngineOptions,
    jobs: Registry<JobId, Arc<Job>>,
    /// Job threads not joined yet.
    threads: Mutex<Vec<(JobId, JoinHandle<()>)>>,
    next_id: AtomicU64,
    ended_seq: AtomicU64,
    accepting: AtomicBool,
    ticker: Mutex<Option<(Sender<()>, JoinHandle<()>)>>,
}

/// Runs many pipelines at once. Dropping it shuts it down (10 s deadline).
pub struct Engine {
    inner: Arc<Inner>,
}

impl Default for Engine {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("jobs", &self.inner.jobs.len())
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
        let inner = Arc::new(Inner {
            opts,
            jobs: Registry::new(),
            threads: Mutex::new(Vec::new()),
            next_id: AtomicU64::new(1),
            ended_seq: AtomicU64::new(0),
            accepting: AtomicBool::new(true),
            ticker: Mutex::new(None),
        });
        let (stop_tx, stop_rx) = bounded::<()>(0);
        let weak = Arc::downgrade(&inner);
        let interval = inner.opts.progress_interval;
        let ticker = std::thread::Builder::new()
            .name("millrace-ticker".into())
            .spawn(move || loop {
                match stop_rx.recv_timeout(interval) {
                    Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                    _ => return, // stopped, or the engine is gone
                }
                let Some(inner) = weak.upgrade() else { return };
                for (_, job) in inner.jobs.list() {
                    let handle = job.slot.lock().cancel.clone();
                    if let Some(h) = handle {
                        job.hub.publish(Event::Progress {
                            job: job.id,
                            report: h.snapshot(),
                        });
                    }
                }
            })
            .expect("spawn the progress ticker");
        *inner.ticker.lock() = Some((stop_tx, ticker));
        Engine { inner }
    }

    /// Submits a pipeline built by `build` on the job's own thread; returns at once.
    pub fn submit<F>(&self, name: &str, build: F) -> Result<JobId, Error>
    where
        F: FnOnce() -> Result<Pipeline, Error> + Send + 'static,
    {
        self.start(name, build, false).map(|(id, _)| id)
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
        self.start(name, build, true)
            .map(|(id, sub)| (id, sub.expect("subscribed before the start")))
    }

    fn start<F>(
        &self,
        name: &str,
        build: F,
        watch: bool,
    ) -> Result<(JobId, Option<Subscription<Event>>), Error>
    where
        F: FnOnce() -> Result<Pipeline, Error> + Send + 'static,
    {
        self.reap();
        // Checked and acted on under the threads lock, which shutdown takes to stop intake: a
        // job is either refused or has its thread registered before shutdown looks for threads.
        let mut threads = self.inner.threads.lock();
        if !self.inner.accepting.load(Ordering::Acquire) {
            return Err(Error::ShuttingDown);
        }
        let id = JobId(self.inner.next_id.fetch_add(1, Ordering::Relaxed));
        let job = Arc::new(Job {
            id,
            name: name.to_string(),
            submitted: Instant::now(),
            hub: ProgressHub::new(self.inner.opts.subscriber_capacity),
            slot: Mutex::new(Slot {
                status: JobStatus::Running,
                cancel: None,
                cancel_requested: false,
                report: None,
                error: None,
                run_time: None,
                ended_seq: 0,
            }),
            ended: Condvar::new(),
        });
        let sub = watch.then(|| job.hub.subscribe());
        self.inner.jobs.insert(id, Arc::clone(&job));
        let inner = Arc::clone(&self.inner);
        let thread = std::thread::Builder::new()
            .name(format!("millrace-job-{id}"))
            .spawn(move || run_job(&inner, &job, build));
        match thread {
            Ok(t) => {
                threads.push((id, t));
                Ok((id, sub))
            }
            Err(source) => {
                self.inner.jobs.remove(&id);
                Err(Error::Spawn {
                    what: format!("a thread for job `{name}`"),
                    stage: None,
                    source,
                })
            }
        }
    }

    /// Submits a TOML pipeline (already parsed and validated).
    pub fn submit_toml(&self, spec: crate::config::PipelineSpec) -> Result<JobId, Error> {
        let name = spec.name.clone();
        self.submit(&name, move || spec.build().map_err(Error::from))
    }

    /// [`submit_toml`](Engine::submit_toml) with a progress stream from the start.
    pub fn submit_toml_watched(
        &self,
        spec: crate::config::PipelineSpec,
    ) -> Result<(JobId, Subscription<Event>), Error> {
        let name = spec.name.clone();
        self.submit_watched(&name, move || spec.build().map_err(Error::from))
    }

    /// The job's current state; `None` for an unknown (or forgotten) job.
    pub fn status(&self, id: JobId) -> Option<JobInfo> {
        self.inner.jobs.get(&id).map(|j| j.info())
    }

    /// Every job the engine remembers, by id.
    pub fn list(&self) -> Vec<JobInfo> {
        self.inner
            .jobs
            .list()
            .into_iter()
            .map(|(_, j)| j.info())
            .collect()
    }

    /// Asks a running job to stop; false if it is unknown or already ended. The job's stages
    /// notice between batches and while blocked on a channel.
    pub fn cancel(&self, id: JobId) -> bool {
        let Some(job) = self.inner.jobs.get(&id) else {
            return false;
        };
        let mut s = job.slot.lock();
        if s.status.is_final() {
            return false;
        }
        s.cancel_requested = true;
        if let Some(h) = &s.cancel {
            h.cancel();
        }
        true
    }

    /// Waits for the job to end (its progress stream has its final event by then); `None` for
    /// an unknown job.
    pub fn wait(&self, id: JobId) -> Option<JobInfo> {
        let job = self.inner.jobs.get(&id)?;
        let mut s = job.slot.lock();
        while !s.status.is_final() {
            job.ended.wait(&mut s);
        }
        drop(s);
        Some(job.info())
    }

    /// A progress stream of the job; `None` for an unknown job. A subscriber to an ended job
    /// receives its final event.
    pub fn subscribe(&self, id: JobId) -> Option<Subscription<Event>> {
        self.inner.jobs.get(&id).map(|j| j.hub.subscribe())
    }

    /// Forgets an ended job and returns it; `None` if it is unknown, already removed, or still
    /// running (cancel it first).
    pub fn remove(&self, id: JobId) -> Option<JobInfo> {
        self.inner
            .jobs
            .remove_if(&id, |j| j.slot.lock().status.is_final())
            .map(|j| j.info())
    }

    /// Threads the engine has started and not joined (job threads and the ticker).
    pub fn threads(&self) -> usize {
        self.inner.threads.lock().len() + usize::from(self.inner.ticker.lock().is_some())
    }

    /// Joins the threads of jobs that have ended.
    fn reap(&self) {
        let done: Vec<JoinHandle<()>> = {
            let mut t = self.inner.threads.lock();
            let (done, running): (Vec<_>, Vec<_>) = t.drain(..).partition(|(_, h)| h.is_finished());
            *t = running;
            done.into_iter().map(|(_, h)| h).collect()
        };
        for h in done {
            let _ = h.join();
        }
    }

    /// Stops accepting jobs, cancels every running one, and joins every thread the engine
    /// started. Returns an error naming the jobs still running at `deadline` (a user closure
    /// that never returns cannot be interrupted); their threads are then left to finish.
    pub fn shutdown(&self, deadline: Duration) -> Result<(), Error> {
        {
            // Under the lock `submit` holds while it registers a job (see there).
            let _threads = self.inner.threads.lock();
            self.inner.accepting.store(false, Ordering::Release);
        }
        for (id, _) in self.inner.jobs.list() {
            self.cancel(id);
        }
        if let Some((stop, ticker)) = self.inner.ticker.lock().take() {
            drop(stop);
            let _ = ticker.join();
        }
        let until = Instant::now() + deadline;
        loop {
            self.reap();
            let left: Vec<JobId> = self
                .inner
                .threads
                .lock()
                .iter()
                .map(|(id, _)| *id)
                .collect();
            if left.is_empty() {
                return Ok(());
            }
            if Instant::now() >= until {
                return Err(Error::ShutdownTimeout {
                    deadline,
                    running: left.iter().map(|id| id.0).collect(),
                });
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown(Duration::from_secs(10)) {
            log::warn!("engine dropped: {e}");
        }
    }
}

/// A job's thread: build, run, record the outcome, publish the final event.
fn run_job<F>(inner: &Inner, job: &Job, build: F)
where
    F: FnOnce() -> Result<Pipeline, Error>,
{
    job.hub.publish(Event::Started {
        job: job.id,
        name: job.name.clone(),
    });
    let t0 = Instant::now();
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        let p = build()?;
        {
            let mut s = job.slot.lock();
            if s.cancel_requested {
                return Err(Error::Cancelled);
            }
            s.cancel = Some(p.cancel_handle());
        }
        p.run()
    }))
    .unwrap_or_else(|payload| {
        let message = crate::runtime::panic_message(&*payload);
        Err(Error::BuildPanicked {
            job: job.name.to_string(),
            message,
        })
    });
    {
        // Status and final event change together (lock order: slot, then hub; nothing takes
        // them the other way round), so a `wait` that returns finds the stream closed.
        let mut s = job.slot.lock();
        s.cancel = None;
        s.run_time = Some(t0.elapsed());
        s.ended_seq = inner.ended_seq.fetch_add(1, Ordering::Relaxed);
        let event = match outcome {
            Ok(report) => {
                s.status = JobStatus::Succeeded;
                s.report = Some(report.clone());
                Event::Finished {
                    job: job.id,
                    report,
                }
            }
            Err(Error::Cancelled) => {
                s.status = JobStatus::Cancelled;
                Event::Cancelled { job: job.id }
            }
            Err(e) => {
                s.status = JobStatus::Failed;
                s.error = Some(e.to_string());
                Event::Failed {
                    job: job.id,
                    error: e.to_string(),
                    stage: e.stage().map(str::to_string),
                }
            }
        };
        job.hub.close(event);
        job.ended.notify_all();
    }
    forget_oldest(inner);
}

/// Keeps at most `keep_finished` ended jobs, forgetting the ones that ended first.
fn forget_oldest(inner: &Inner) {
    inner.jobs.with(|jobs| {
        let mut ended: Vec<(u64, JobId)> = jobs
            .iter()
            .filter_map(|(id, j)| {
                let s = j.slot.lock();
                s.status.is_final().then_some((s.ended_seq, *id))
            })
            .collect();
        if ended.len() <= inner.opts.keep_finished {
            return;
        }
        ended.sort_unstable();
        let excess = ended.len() - inner.opts.keep_finished;
        for (_, id) in ended.into_iter().take(excess) {
            jobs.remove(&id);
        }
    });
}
