//! The engine's bookkeeping of its jobs: intake, ids, one thread per job, cancellation, and a
//! shutdown that joins every job thread. [`Engine`](super::Engine) is a `Supervisor` of
//! pipelines plus the progress ticker; the loom models in `tests/loom_engine.rs` drive this same
//! code with trivial job bodies (a closure instead of a pipeline, which loom cannot run). The
//! protocol, its invariants and its lock order are in `README.md` beside this file.
//!
//! Every lock, condition variable, atomic and thread here comes from [`crate::sync`], so under
//! `cfg(loom)` all of it is modelled.

// The items are `pub` because `job` re-exports them under `cfg(loom)` for the models; in other
// builds they are the crate's own.
#![cfg_attr(not(loom), allow(unreachable_pub))]

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

use super::{
    CancelOutcome, EngineOptions, Event, JobId, JobInfo, JobStatus, ProgressHub, Registry,
    Subscription,
};
use crate::sync::thread::{self, JoinHandle};
use crate::sync::{Arc, AtomicU64, Condvar, Mutex, Ordering};
use crate::{Error, RunReport};

/// What the supervisor needs of a running job: a way to stop it and to sample its progress.
/// The engine's is a pipeline's [`CancelHandle`](crate::CancelHandle).
pub trait Handle: Clone + Send + 'static {
    /// Asks the job to stop (it notices when it next looks).
    fn cancel(&self);
    /// Its live metrics.
    fn snapshot(&self) -> RunReport;
}

impl Handle for crate::CancelHandle {
    fn cancel(&self) {
        crate::CancelHandle::cancel(self);
    }
    fn snapshot(&self) -> RunReport {
        crate::CancelHandle::snapshot(self)
    }
}

/// A bug seeded on purpose, so that the loom models can show they catch it.
#[cfg(loom)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mutation {
    /// `start` checks intake in one critical section and registers the job in another, so a
    /// shutdown can slip in between and return while the job still runs.
    IntakeCheckedApart,
    /// [`Control::running`] ignores a cancel that came before the job was running, so the
    /// cancel is lost.
    CancelRequestIgnored,
}

/// The jobs of one engine. Cloning it shares them.
pub struct Supervisor<H> {
    shared: Arc<Shared<H>>,
}

impl<H> Clone for Supervisor<H> {
    fn clone(&self) -> Self {
        Supervisor {
            shared: Arc::clone(&self.shared),
        }
    }
}

struct Shared<H> {
    subscriber_capacity: usize,
    keep_finished: usize,
    jobs: Registry<JobId, Arc<Job<H>>>,
    /// Intake and job threads. Lock order: intake, then the job table, then a job's slot, then
    /// its hub.
    intake: Mutex<Intake>,
    /// Notified (after a thread marked itself ended under the intake lock) when a job thread
    /// ends.
    thread_ended: Condvar,
    /// Order in which jobs ended (for forgetting the oldest).
    ended_seq: AtomicU64,
    #[cfg(loom)]
    mutation: Option<Mutation>,
}

struct Intake {
    /// False once shutdown began: `start` refuses jobs.
    accepting: bool,
    next_id: u64,
    /// Job threads not joined yet.
    threads: Vec<JobThread>,
}

struct JobThread {
    id: JobId,
    handle: JoinHandle<()>,
    /// Set by the thread itself, under the intake lock, as the last thing it does.
    ended: bool,
}

struct Job<H> {
    id: JobId,
    name: String,
    /// The pipeline's stage graph, when it came from a TOML pipeline (for the console).
    graph: Option<Arc<serde_json::Value>>,
    submitted: Instant,
    hub: ProgressHub<Event>,
    slot: Mutex<Slot<H>>,
    ended: Condvar,
}

struct Slot<H> {
    status: JobStatus,
    /// The running job's handle (set once running, cleared when it ends).
    cancel: Option<H>,
    cancel_requested: bool,
    report: Option<RunReport>,
    error: Option<String>,
    run_time: Option<Duration>,
    /// Order in which jobs ended (for forgetting the oldest).
    ended_seq: u64,
}

impl<H: Handle> Job<H> {
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
            graph: self.graph.clone(),
            status: s.status,
            elapsed: s.run_time.unwrap_or_else(|| self.submitted.elapsed()),
            report,
            error: s.error.clone(),
        }
    }
}

/// What a job's body is given: the way to say that it is running.
pub struct Control<'a, H> {
    job: &'a Job<H>,
    #[cfg(loom)]
    mutation: Option<Mutation>,
}

impl<H: Handle> Control<'_, H> {
    /// Records the running job's handle, so that a cancel from now on reaches it; or, if a
    /// cancel came first, `Err(Error::Cancelled)`, which the body should return. Checked and
    /// recorded under the job's lock, which `cancel` takes too: a cancel cannot slip between.
    pub fn running(&self, handle: H) -> Result<(), Error> {
        let mut s = self.job.slot.lock();
        #[cfg(loom)]
        let requested = s.cancel_requested && self.mutation != Some(Mutation::CancelRequestIgnored);
        #[cfg(not(loom))]
        let requested = s.cancel_requested;
        if requested {
            return Err(Error::Cancelled);
        }
        s.cancel = Some(handle);
        Ok(())
    }
}

/// Marks the job thread ended when it returns or unwinds, and wakes a waiting shutdown.
struct MarkEnded<'a, H> {
    shared: &'a Shared<H>,
    id: JobId,
}

impl<H> Drop for MarkEnded<'_, H> {
    fn drop(&mut self) {
        let mut intake = self.shared.intake.lock();
        // The entry is there: `start` pushed it before it released the lock this waits for, and
        // only ended entries are ever taken out.
        if let Some(t) = intake.threads.iter_mut().find(|t| t.id == self.id) {
            t.ended = true;
        }
        drop(intake);
        self.shared.thread_ended.notify_all();
    }
}

impl<H: Handle> Supervisor<H> {
    /// A supervisor with the engine's options (subscriber capacity, ended jobs kept).
    pub fn new(opts: &EngineOptions) -> Self {
        Supervisor {
            shared: Arc::new(Shared {
                subscriber_capacity: opts.subscriber_capacity,
                keep_finished: opts.keep_finished,
                jobs: Registry::new(),
                intake: Mutex::new(Intake {
                    accepting: true,
                    next_id: 1,
                    threads: Vec::new(),
                }),
                thread_ended: Condvar::new(),
                ended_seq: AtomicU64::new(0),
                #[cfg(loom)]
                mutation: None,
            }),
        }
    }

    /// A supervisor with a seeded bug, for the loom models' demonstrations.
    #[cfg(loom)]
    pub fn with_mutation(opts: &EngineOptions, mutation: Mutation) -> Self {
        let mut s = Self::new(opts);
        Arc::get_mut(&mut s.shared)
            .expect("not shared yet")
            .mutation = Some(mutation);
        s
    }

    /// Starts a job running `body` on a thread of its own; returns at once. With `watch`, a
    /// progress stream subscribed before the job starts, so that it sees every event from
    /// `Started` on.
    #[cfg_attr(not(loom), allow(dead_code))]
    pub fn start<F>(
        &self,
        name: &str,
        watch: bool,
        body: F,
    ) -> Result<(JobId, Option<Subscription<Event>>), Error>
    where
        F: FnOnce(&Control<'_, H>) -> Result<RunReport, Error> + Send + 'static,
    {
        self.start_with_graph(name, None, watch, body)
    }

    /// [`start`](Self::start) for a job whose stage graph is known (a TOML pipeline's).
    pub fn start_with_graph<F>(
        &self,
        name: &str,
        graph: Option<Arc<serde_json::Value>>,
        watch: bool,
        body: F,
    ) -> Result<(JobId, Option<Subscription<Event>>), Error>
    where
        F: FnOnce(&Control<'_, H>) -> Result<RunReport, Error> + Send + 'static,
    {
        self.reap();
        // Checked and acted on under the intake lock, which shutdown takes to stop intake: a job
        // is either refused or has its thread registered before shutdown looks for threads.
        let mut intake = self.shared.intake.lock();
        if !intake.accepting {
            return Err(Error::ShuttingDown);
        }
        #[cfg(loom)]
        if self.shared.mutation == Some(Mutation::IntakeCheckedApart) {
            drop(intake);
            intake = self.shared.intake.lock();
        }
        let id = JobId(intake.next_id);
        intake.next_id += 1;
        let job = Arc::new(Job {
            id,
            name: name.to_string(),
            graph,
            submitted: Instant::now(),
            hub: ProgressHub::new(self.shared.subscriber_capacity),
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
        self.shared.jobs.insert(id, Arc::clone(&job));
        let shared = Arc::clone(&self.shared);
        let spawned = thread::Builder::new()
            .name(format!("millrace-job-{id}"))
            .spawn(move || {
                let _ended = MarkEnded {
                    shared: &shared,
                    id,
                };
                run_job(&shared, &job, body);
            });
        match spawned {
            Ok(handle) => {
                intake.threads.push(JobThread {
                    id,
                    handle,
                    ended: false,
                });
                Ok((id, sub))
            }
            Err(source) => {
                self.shared.jobs.remove(&id);
                Err(Error::Spawn {
                    what: format!("a thread for job `{name}`"),
                    stage: None,
                    source,
                })
            }
        }
    }

    /// The job's current state; `None` for an unknown (or forgotten) job.
    pub fn status(&self, id: JobId) -> Option<JobInfo> {
        self.shared.jobs.get(&id).map(|j| j.info())
    }

    /// Every job it remembers, by id.
    pub fn list(&self) -> Vec<JobInfo> {
        self.shared
            .jobs
            .list()
            .into_iter()
            .map(|(_, j)| j.info())
            .collect()
    }

    /// How many jobs it remembers.
    pub fn job_count(&self) -> usize {
        self.shared.jobs.len()
    }

    /// Asks a running job to stop; false if it is unknown or already ended. A cancel that
    /// returns true before the job is running stops it from running at all (see
    /// [`Control::running`]); one that comes later reaches its handle.
    pub fn cancel(&self, id: JobId) -> bool {
        self.try_cancel(id) == CancelOutcome::Requested
    }

    /// [`cancel`](Supervisor::cancel), telling what it found: decided under the job's lock, so
    /// the answer is the cancel's own (a job that ends just before it is `Ended`, not
    /// `Requested`).
    pub fn try_cancel(&self, id: JobId) -> CancelOutcome {
        let Some(job) = self.shared.jobs.get(&id) else {
            return CancelOutcome::Unknown;
        };
        let mut s = job.slot.lock();
        if s.status.is_final() {
            return CancelOutcome::Ended(s.status);
        }
        s.cancel_requested = true;
        if let Some(h) = &s.cancel {
            h.cancel();
        }
        CancelOutcome::Requested
    }

    /// Waits for the job to end (its progress stream has its final event by then); `None` for
    /// an unknown job.
    pub fn wait(&self, id: JobId) -> Option<JobInfo> {
        let job = self.shared.jobs.get(&id)?;
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
        self.shared.jobs.get(&id).map(|j| j.hub.subscribe())
    }

    /// Forgets an ended job and returns it; `None` if it is unknown, already removed, or still
    /// running.
    pub fn remove(&self, id: JobId) -> Option<JobInfo> {
        self.shared
            .jobs
            .remove_if(&id, |j| j.slot.lock().status.is_final())
            .map(|j| j.info())
    }

    /// Publishes a `Progress` event with live metrics for every running job.
    pub fn publish_progress(&self) {
        for (_, job) in self.shared.jobs.list() {
            let handle = job.slot.lock().cancel.clone();
            if let Some(h) = handle {
                job.hub.publish(Event::Progress {
                    job: job.id,
                    report: h.snapshot(),
                });
            }
        }
    }

    /// Job threads started and not joined yet.
    pub fn threads(&self) -> usize {
        self.shared.intake.lock().threads.len()
    }

    /// Joins the threads of jobs that have ended.
    fn reap(&self) {
        let done: Vec<JobThread> = {
            let mut intake = self.shared.intake.lock();
            let (done, running) = std::mem::take(&mut intake.threads)
                .into_iter()
                .partition(|t| t.ended);
            intake.threads = running;
            done
        };
        for t in done {
            let _ = t.handle.join();
        }
    }

    /// Stops accepting jobs, cancels every running one, and joins every job thread. Returns an
    /// error naming the jobs still running at `deadline` (a body that never returns cannot be
    /// interrupted); their threads are then left to finish.
    pub fn shutdown(&self, deadline: Duration) -> Result<(), Error> {
        // Under the lock `start` holds while it checks intake and registers a job (see there).
        self.shared.intake.lock().accepting = false;
        for (id, _) in self.shared.jobs.list() {
            self.cancel(id);
        }
        let until = Instant::now() + deadline;
        let mut intake = self.shared.intake.lock();
        while intake.threads.iter().any(|t| !t.ended) {
            let timed_out = self
                .shared
                .thread_ended
                .wait_until(&mut intake, until)
                .timed_out();
            let left: Vec<u64> = intake
                .threads
                .iter()
                .filter(|t| !t.ended)
                .map(|t| t.id.0)
                .collect();
            if timed_out && !left.is_empty() {
                return Err(Error::ShutdownTimeout {
                    deadline,
                    running: left,
                });
            }
        }
        let done = std::mem::take(&mut intake.threads);
        drop(intake);
        for t in done {
            let _ = t.handle.join();
        }
        Ok(())
    }
}

/// A job's thread: run the body, record the outcome, publish the final event.
fn run_job<H: Handle, F>(shared: &Shared<H>, job: &Job<H>, body: F)
where
    F: FnOnce(&Control<'_, H>) -> Result<RunReport, Error>,
{
    job.hub.publish(Event::Started {
        job: job.id,
        name: job.name.clone(),
    });
    let t0 = Instant::now();
    let control = Control {
        job,
        #[cfg(loom)]
        mutation: shared.mutation,
    };
    let outcome = catch_unwind(AssertUnwindSafe(|| body(&control))).unwrap_or_else(|payload| {
        let message = crate::runtime::panic_message(&*payload);
        Err(Error::BuildPanicked {
            job: job.name.to_string(),
            message,
        })
    });
    // What a failed or cancelled job did before it ended (its run has joined its threads, so
    // this is its last word), taken outside the job's lock: the console shows it.
    let handle = job.slot.lock().cancel.clone();
    let last = match &outcome {
        Ok(_) => None,
        Err(_) => handle.map(|h| h.snapshot()),
    };
    {
        // Status and final event change together (lock order: slot, then hub; nothing takes
        // them the other way round), so a `wait` that returns finds the stream closed.
        let mut s = job.slot.lock();
        s.cancel = None;
        s.run_time = Some(t0.elapsed());
        s.ended_seq = shared.ended_seq.fetch_add(1, Ordering::Relaxed);
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
                s.report = last;
                Event::Cancelled { job: job.id }
            }
            Err(e) => {
                s.status = JobStatus::Failed;
                s.report = last;
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
    forget_oldest(shared);
}

/// Keeps at most `keep_finished` ended jobs, forgetting the ones that ended first.
fn forget_oldest<H>(shared: &Shared<H>) {
    shared.jobs.with(|jobs| {
        let mut ended: Vec<(u64, JobId)> = jobs
            .iter()
            .filter_map(|(id, j)| {
                let s = j.slot.lock();
                s.status.is_final().then_some((s.ended_seq, *id))
            })
            .collect();
        if ended.len() <= shared.keep_finished {
            return;
        }
        ended.sort_unstable();
        let excess = ended.len() - shared.keep_finished;
        for (_, id) in ended.into_iter().take(excess) {
            jobs.remove(&id);
        }
    });
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    /// A handle whose cancel cannot reach the job (a body that ignores it).
    #[derive(Clone)]
    struct Deaf;

    impl Handle for Deaf {
        fn cancel(&self) {}
        fn snapshot(&self) -> RunReport {
            crate::Pipeline::new().cancel_handle().snapshot()
        }
    }

    /// The deadline path, which loom cannot model: a job that ignores its cancel outlives the
    /// deadline and is named; once it ends, a second shutdown joins it.
    #[test]
    fn shutdown_names_the_jobs_still_running_at_the_deadline() {
        let sup = Supervisor::<Deaf>::new(&EngineOptions::default());
        let (release, released) = crossbeam_channel::bounded::<()>(0);
        let (start, started) = crossbeam_channel::bounded::<()>(1);
        let (id, _) = sup
            .start("stuck", false, move |control| {
                control.running(Deaf)?;
                start.send(()).unwrap();
                let _ = released.recv();
                Ok(Deaf.snapshot())
            })
            .unwrap();
        started.recv().unwrap();
        let err = sup.shutdown(Duration::from_millis(20)).unwrap_err();
        assert!(
            err.to_string()
                .contains(&format!("jobs still running: {id}")),
            "{err}"
        );
        assert_eq!(sup.threads(), 1);
        assert!(matches!(
            sup.start("late", false, |_| Err(Error::Cancelled)),
            Err(Error::ShuttingDown)
        ));
        drop(release);
        sup.shutdown(Duration::from_secs(10)).unwrap();
        assert_eq!(sup.threads(), 0);
        assert_eq!(sup.status(id).unwrap().status, JobStatus::Succeeded);
    }
}
