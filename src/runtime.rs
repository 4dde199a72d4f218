//! Running a built pipeline: one scoped thread per stage instance, cancellation, error and panic
//! capture, the coarse clock that drives idle flushes, and the join that ends every run.
//!
//! Every worker runs [`drive`]: pull a batch from the stage's head (a source, an input channel or
//! a keyed aggregate), push each record through the fused chain into the tail (a channel
//! partitioner or a sink), repeat. Threads are spawned in a [`std::thread::scope`], so none can
//! outlive [`run`] whatever happens.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender};

use crate::error::Error;
use crate::metrics::{InstanceMetrics, MetricsEntry, RunReport};
use crate::operator::{Chain, Emit, Halt};
use crate::sync::{thread, AtomicBool, AtomicU64, Mutex, Ordering};

/// Tuning knobs of a run.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Options {
    /// Records per batch on every link, or `0` (the default) to size each link's batches by
    /// its record type: as many records as fill 32 KiB, at least 1,024 and at most 8,192
    /// (see [`batch_size_for`](Options::batch_size_for)). A batch costs about the same to
    /// send whatever it holds, so small records (a `u64`, a pair of numbers) ride in bigger
    /// batches, while a batch of records of 32 bytes or more keeps 1,024 of them.
    pub batch_size: usize,
    /// Batches each stage instance's input channel holds (default 4).
    pub channel_capacity: usize,
    /// How long a partly filled batch may wait before it is sent anyway (default 10 ms).
    pub linger: Duration,
    /// A watermark generator sends its watermark downstream (when it has risen) after every
    /// this many records it emits (default 8,192), and whenever its input goes idle. Counting
    /// records rather than time makes replaying a file deterministic: with one producing
    /// instance, which records are late depends on the data alone, unless the input goes idle,
    /// which a partial batch waiting [`linger`](Options::linger) counts as (see
    /// `docs/semantics.md`, "When they are sent"). Each send flushes the batches being filled,
    /// so much smaller values cost throughput.
    pub watermark_every: usize,
    /// How long an input of a stage may stay silent before it stops holding the stage's
    /// watermark back (default `None`: an input holds it back until it ends).
    pub idle_timeout: Option<Duration>,
    /// How many dead letters the run may send before it fails with
    /// [`Error::TooManyDeadLetters`] (default `None`: no limit).
    pub max_dead_letters: Option<crate::dead_letter::DeadLetterLimit>,
    /// Threads of the run's rayon pool, which every
    /// [`map_par`](crate::Stream::map_par) step of the run shares (default `None`: rayon's
    /// default, the `RAYON_NUM_THREADS` environment variable or one thread per CPU). The pool
    /// is made when the first batch reaches a `map_par` step, so a run without one starts no
    /// pool, and its threads are joined before `run` returns.
    pub par_threads: Option<usize>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            batch_size: 0,
            channel_capacity: 4,
            linger: Duration::from_millis(10),
            watermark_every: 8192,
            idle_timeout: None,
            max_dead_letters: None,
            par_threads: None,
        }
    }
}

/// With [`Options::batch_size`] `0`: the bytes of records a batch is sized to hold (Flink's
/// network buffers are 32 KiB too), and the fewest and most records it may then hold.
const AUTO_BATCH_BYTES: usize = 32 * 1024;
const AUTO_BATCH_MIN: usize = 1024;
const AUTO_BATCH_MAX: usize = 8192;

impl Options {
    /// Records per batch on a link that carries `T`: [`batch_size`](Options::batch_size) when
    /// it is set, otherwise as many `T` as fill 32 KiB, clamped to 1,024..=8,192.
    ///
    /// # Examples
    ///
    /// ```
    /// let mut opts = millrace::Options::default();
    /// assert_eq!(opts.batch_size_for::<u64>(), 4096);
    /// assert_eq!(opts.batch_size_for::<(String, u64)>(), 1024);
    /// opts.batch_size = 64;
    /// assert_eq!(opts.batch_size_for::<u64>(), 64);
    /// ```
    pub fn batch_size_for<T>(&self) -> usize {
        match self.batch_size {
            0 => (AUTO_BATCH_BYTES / std::mem::size_of::<T>().max(1))
                .clamp(AUTO_BATCH_MIN, AUTO_BATCH_MAX),
            n => n,
        }
    }

    /// Records per batch where no record type decides it (how many records a source pulls at
    /// a time, a `source_split` stripe): `batch_size`, or 1,024 when it is `0`.
    pub(crate) fn batch_records(&self) -> usize {
        match self.batch_size {
            0 => AUTO_BATCH_MIN,
            n => n,
        }
    }
}

const TICK: Duration = Duration::from_millis(2);

/// State shared by every worker of one run.
pub(crate) struct RunShared {
    pub opts: Options,
    cancelled: AtomicBool,
    /// A worker is unwinding from a panic and its error is not recorded yet: consumers that see
    /// its channels close in the meantime must not report that as an error of their own.
    aborting: AtomicBool,
    /// Dropped on cancel: every blocking channel operation selects on `cancel_rx` as well.
    cancel_tx: Mutex<Option<Sender<()>>>,
    pub cancel_rx: Receiver<()>,
    first_error: Mutex<Option<Error>>,
    started: Mutex<Option<Instant>>,
    /// Milliseconds since the run started, advanced by the run's main thread every [`TICK`]:
    /// sources read it per record (one relaxed load) to notice a batch that waited too long.
    pub clock_ms: AtomicU64,
    pub metrics: Mutex<Vec<MetricsEntry>>,
    /// Samplers of the pools whose metrics belong in the report.
    pub pools: Mutex<Vec<PoolSampler>>,
    /// The stages' step plans, for the per-step accounts.
    pub plan: Mutex<Vec<crate::metrics::SlotPlan>>,
    /// A stage stopped before its input ended (a `limit`, or its consumers gone): records in
    /// flight between stages were dropped, which the accounts' links allow for.
    pub stopped_early: AtomicBool,
    /// Dead letters sent so far (all streams).
    pub dead_letters: AtomicU64,
    /// The stage of the latest dead letter (for the limit's final check).
    pub last_dead_letter_stage: Mutex<Option<String>>,
    /// Lines the sources rejected (skipped or dead-lettered): records read that no metric
    /// counts as read.
    pub source_rejected: AtomicU64,
    /// The "main side alive" token (see [`crate::dead_letter`]): every worker off the
    /// dead-letter side holds a clone; the run drops this one once every worker is spawned.
    main_alive_tx: Mutex<Option<Sender<()>>>,
    /// Disconnects when every worker off the dead-letter side has ended.
    pub main_alive_rx: Receiver<()>,
    /// The checkpoint options the pipeline was given (`Pipeline::checkpoints`).
    pub checkpoint_opts: Mutex<Option<crate::checkpoint::CheckpointOptions>>,
    /// Checkpointing's shared part, set before the workers start when it is on. Workers read it
    /// once when they start.
    pub checkpoint: Mutex<Option<Arc<crate::checkpoint::CheckpointRun>>>,
    /// The start gate of a run with checkpoints (see [`tail_ready`]).
    gate: Mutex<Gate>,
    gate_cv: crate::sync::Condvar,
    /// The run's rayon pool (see [`crate::par`]), made by the first `map_par` batch; taken and
    /// dropped (which joins its threads) by [`run`] once every worker has ended.
    par_pool: Mutex<Option<Arc<crate::par::ParPool>>>,
}

/// The start gate's state: how many workers have checked their tail's state support, of how
/// many, and whether the gate is open (the last one to arrive opens it).
#[derive(Debug, Default)]
struct Gate {
    arrived: usize,
    expected: usize,
    open: bool,
}

/// Reads one pool's metrics.
pub(crate) type PoolSampler = Box<dyn Fn() -> crate::PoolMetrics + Send + Sync>;

impl RunShared {
    pub(crate) fn new(opts: Options) -> Arc<Self> {
        let (tx, rx) = bounded(0);
        let (alive_tx, alive_rx) = bounded(0);
        Arc::new(RunShared {
            opts,
            cancelled: AtomicBool::new(false),
            aborting: AtomicBool::new(false),
            cancel_tx: Mutex::new(Some(tx)),
            cancel_rx: rx,
            first_error: Mutex::new(None),
            started: Mutex::new(None),
            clock_ms: AtomicU64::new(0),
            metrics: Mutex::new(Vec::new()),
            pools: Mutex::new(Vec::new()),
            plan: Mutex::new(Vec::new()),
            stopped_early: AtomicBool::new(false),
            dead_letters: AtomicU64::new(0),
            last_dead_letter_stage: Mutex::new(None),
            source_rejected: AtomicU64::new(0),
            main_alive_tx: Mutex::new(Some(alive_tx)),
            main_alive_rx: alive_rx,
            checkpoint_opts: Mutex::new(None),
            checkpoint: Mutex::new(None),
            gate: Mutex::new(Gate::default()),
            gate_cv: crate::sync::Condvar::new(),
            par_pool: Mutex::new(None),
        })
    }

    /// The number of key groups hash partitioning routes by (the checkpoint options' value;
    /// the default without checkpoints).
    pub(crate) fn max_parallelism(&self) -> u16 {
        self.checkpoint_opts
            .lock()
            .as_ref()
            .map_or(crate::checkpoint::state::DEFAULT_MAX_PARALLELISM, |o| {
                o.max_parallelism.max(1)
            })
    }

    /// Records the sources read so far, counting the lines they rejected.
    pub(crate) fn records_read_so_far(&self) -> u64 {
        let read: u64 = self
            .metrics
            .lock()
            .iter()
            .filter(|m| m.source)
            .map(|m| m.metrics.records_in.load(Ordering::Relaxed))
            .sum();
        read + self.source_rejected.load(Ordering::Relaxed)
    }

    pub(crate) fn cancel(&self) {
        self.cancelled.store(true, Ordering::Release);
        self.cancel_tx.lock().take();
    }

    pub(crate) fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Acquire)
    }

    /// Records the run's first error and stops the run; later errors are consequences.
    pub(crate) fn fail(&self, e: Error) {
        {
            let mut slot = self.first_error.lock();
            if slot.is_none() {
                *slot = Some(e);
            } else {
                log::debug!("suppressed later error: {e}");
            }
        }
        self.cancel();
    }

    /// Whether the run is failing: an error is recorded or a worker is unwinding from a panic.
    pub(crate) fn has_failed(&self) -> bool {
        self.aborting.load(Ordering::Acquire) || self.first_error.lock().is_some()
    }

    /// A report of these instance rows, with the per-step accounts derived from them.
    fn report(&self, elapsed: Duration, stages: Vec<crate::StageMetrics>) -> RunReport {
        let (accounts, links) = crate::metrics::derive_accounts(&self.plan.lock(), &stages);
        let cp = self.checkpoint.lock().clone();
        RunReport {
            elapsed,
            stages,
            pools: self.pool_metrics(),
            accounts,
            links,
            stopped_early: self.stopped_early.load(Ordering::Relaxed),
            checkpoints: cp.as_ref().map(|c| c.coord.stats()).unwrap_or_default(),
            resumed_from: cp.as_ref().and_then(|c| c.resumed_from),
            skipped_checkpoints: cp.as_ref().map(|c| c.skipped.clone()).unwrap_or_default(),
            already_completed: cp.and_then(|c| c.already_completed),
        }
    }

    fn pool_metrics(&self) -> Vec<crate::PoolMetrics> {
        self.pools.lock().iter().map(|sample| sample()).collect()
    }

    fn elapsed(&self) -> Duration {
        self.started.lock().map(|s| s.elapsed()).unwrap_or_default()
    }

    /// The report of a run that did not run: a resume found its directory's run completed.
    pub(crate) fn report_without_running(&self) -> RunReport {
        self.report(Duration::ZERO, Vec::new())
    }

    /// The run's rayon pool, made on first use (by the instance of stage `stage`, which a
    /// spawn error names).
    pub(crate) fn par_pool(&self, stage: &str) -> Result<Arc<crate::par::ParPool>, Error> {
        let mut slot = self.par_pool.lock();
        if let Some(p) = &*slot {
            return Ok(Arc::clone(p));
        }
        let pool = Arc::new(crate::par::ParPool::new(self.opts.par_threads, stage)?);
        *slot = Some(Arc::clone(&pool));
        Ok(pool)
    }

    /// Precise milliseconds since the start (the clock the coarse `clock_ms` approximates).
    pub(crate) fn now_ms(&self) -> u64 {
        self.elapsed().as_millis() as u64
    }
}

/// A handle that cancels a run from another thread and samples its live metrics.
///
/// # Examples
/// ```
/// use millrace::Pipeline;
/// let p = Pipeline::new();
/// let handle = p.cancel_handle();
/// p.source("forever", 0u64..).for_each(|_| {});
/// std::thread::spawn(move || {
///     std::thread::sleep(std::time::Duration::from_millis(20));
///     handle.cancel();
/// });
/// assert!(matches!(p.run(), Err(millrace::Error::Cancelled)));
/// ```
#[derive(Clone)]
pub struct CancelHandle {
    pub(crate) shared: Arc<RunShared>,
}

impl CancelHandle {
    /// Asks the run to stop: workers notice between batches and while blocked on a channel,
    /// and `run()` returns [`Error::Cancelled`] once every thread has been joined.
    pub fn cancel(&self) {
        self.shared.cancel();
    }

    /// Whether the run was cancelled (or failed, which cancels it).
    pub fn is_cancelled(&self) -> bool {
        self.shared.is_cancelled()
    }

    /// A snapshot of the live metrics (empty before the run starts).
    pub fn snapshot(&self) -> RunReport {
        let elapsed = self.shared.elapsed();
        let stages = self
            .shared
            .metrics
            .lock()
            .iter()
            .map(|m| m.snapshot(elapsed))
            .collect();
        self.shared.report(elapsed, stages)
    }
}

impl CancelHandle {
    /// The running coordinator, for tests' introspection (`None` before the run starts or
    /// without checkpoints).
    #[doc(hidden)]
    pub fn checkpoint_coordinator(
        &self,
    ) -> Option<Arc<crate::checkpoint::coordinator::Coordinator>> {
        self.shared
            .checkpoint
            .lock()
            .as_ref()
            .map(|c| Arc::clone(&c.coord))
    }
}

impl std::fmt::Debug for CancelHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CancelHandle")
            .field("cancelled", &self.is_cancelled())
            .finish()
    }
}

/// What a worker thread knows about itself.
pub(crate) struct Cx {
    pub run: Arc<RunShared>,
    pub stage: Arc<str>,
    /// Which instance of the stage this worker runs (0-based).
    pub instance: usize,
    /// Whether the worker runs a source (which injects checkpoint barriers).
    pub source: bool,
    pub metrics: Arc<InstanceMetrics>,
}

impl Cx {
    /// The same context, for a helper thread of the stage instance (a writer, a dispatcher).
    pub(crate) fn clone_for_thread(&self) -> Cx {
        Cx {
            run: Arc::clone(&self.run),
            stage: Arc::clone(&self.stage),
            instance: self.instance,
            source: self.source,
            metrics: Arc::clone(&self.metrics),
        }
    }

    #[inline]
    pub(crate) fn batch_size(&self) -> usize {
        self.run.opts.batch_records()
    }
    /// Records per batch on an output link carrying `T`.
    #[inline]
    pub(crate) fn batch_size_for<T>(&self) -> usize {
        self.run.opts.batch_size_for::<T>()
    }
    #[inline]
    pub(crate) fn clock_ms(&self) -> u64 {
        self.run.clock_ms.load(Ordering::Relaxed)
    }
    pub(crate) fn linger_ms(&self) -> u64 {
        self.run.opts.linger.as_millis().max(1) as u64
    }
}

/// What a head produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pull {
    /// Records are in the buffer; more may follow.
    Data,
    /// The input is idle (the buffer may hold a few records): flush the tail after them.
    Idle,
    /// The input is exhausted (the buffer may hold its last records).
    End,
    /// The input's watermark rose to this: forward it after the records in the buffer.
    Watermark(crate::time::Timestamp),
    /// Checkpoint barrier `n` (aligned over every input): after the records in the buffer,
    /// snapshot the instance's state, acknowledge, and forward the barrier.
    Barrier(crate::checkpoint::CheckpointId),
}

/// The start of a stage instance: where its records come from.
pub(crate) trait Head<I>: Send {
    /// Fills `buf` (which is empty) with up to a batch of records. `flush_at` is the clock time
    /// (ms) by which the tail wants to flush what it holds: a head that would block past it
    /// returns [`Pull::Idle`] instead.
    fn pull(&mut self, cx: &Cx, buf: &mut Vec<I>, flush_at: Option<u64>) -> Result<Pull, Halt>;
    /// True for heads that count their own input records (aggregations, whose output is not
    /// their input).
    fn counts_input(&self) -> bool {
        false
    }
    /// Whether this head's state (a source's position, a keyed aggregate's map) can be
    /// checkpointed. Checked before a run with checkpoints starts.
    fn state_support(&self) -> crate::checkpoint::StateSupport {
        crate::checkpoint::StateSupport::Stateless
    }
    /// Puts the head's state into `state` (at a barrier: every record before it is in).
    fn snapshot(
        &mut self,
        _cx: &Cx,
        _state: &mut crate::checkpoint::state::InstanceState,
    ) -> Result<(), Halt> {
        Ok(())
    }
    /// Restores what [`snapshot`](Self::snapshot) put, before the first pull.
    fn restore(
        &mut self,
        _cx: &Cx,
        _state: &crate::checkpoint::state::InstanceState,
    ) -> Result<(), Halt> {
        Ok(())
    }
}

/// The end of a stage instance: a channel partitioner or a sink.
pub(crate) trait Tail<T>: Emit<T> + Send {
    /// Called before the records of each input batch are pushed, with the coarse clock.
    fn before_batch(&mut self, _now: u64) {}
    /// Clock time (ms) since which the tail has held records it has not sent.
    fn pending_since(&self) -> Option<u64> {
        None
    }
    /// Called after the records of each input batch were pushed.
    #[inline]
    fn after_batch(&mut self, _cx: &Cx) -> Result<(), Halt> {
        Ok(())
    }
    /// Called once the records of an input batch were pushed (a pull that returned records, or
    /// `Pull::Data`, which a filter in the head may have emptied): a channel tail of an ordered
    /// edge marks the end of what it made of that batch. Only for pulls that took one input
    /// batch; not after a `limit` or a gone consumer stopped the batch midway.
    #[inline]
    fn end_input_batch(&mut self, _cx: &Cx) -> Result<(), Halt> {
        Ok(())
    }
    /// The stage's watermark rose: pass it on after the records already emitted. Sinks
    /// ignore it.
    fn watermark(&mut self, _cx: &Cx, _at: crate::time::Timestamp) -> Result<(), Halt> {
        Ok(())
    }
    /// Sends whatever is buffered.
    fn flush(&mut self, cx: &Cx) -> Result<(), Halt>;
    /// Flushes and signals end of stream downstream (or closes the file).
    fn finish(&mut self, cx: &Cx) -> Result<(), Halt>;
    /// Checkpoint barrier `id`: send what is buffered, then the barrier to every consumer (a
    /// channel tail), or make the output durable and record how far it is committed in
    /// `state` (a sink).
    fn barrier(
        &mut self,
        cx: &Cx,
        _id: crate::checkpoint::CheckpointId,
        _state: &mut crate::checkpoint::state::InstanceState,
    ) -> Result<(), Halt> {
        self.flush(cx)
    }
    /// Restores what [`barrier`](Self::barrier) recorded (a sink truncates its file to the
    /// committed length), before the first record.
    fn restore(
        &mut self,
        _cx: &Cx,
        _state: &crate::checkpoint::state::InstanceState,
    ) -> Result<(), Halt> {
        Ok(())
    }
    /// Whether this tail's state can be checkpointed.
    fn state_support(&self) -> crate::checkpoint::StateSupport {
        crate::checkpoint::StateSupport::Stateless
    }
}

/// A tail chosen at run time (a combiner in front of a channel): one virtual call per record,
/// in exchange for whatever the boxed tail saves downstream.
impl<T> Emit<T> for Box<dyn Tail<T>> {
    #[inline]
    fn emit(&mut self, item: T) -> Result<(), Halt> {
        (**self).emit(item)
    }
}

impl<T> Tail<T> for Box<dyn Tail<T>> {
    fn before_batch(&mut self, now: u64) {
        (**self).before_batch(now)
    }
    fn pending_since(&self) -> Option<u64> {
        (**self).pending_since()
    }
    fn after_batch(&mut self, cx: &Cx) -> Result<(), Halt> {
        (**self).after_batch(cx)
    }
    fn end_input_batch(&mut self, cx: &Cx) -> Result<(), Halt> {
        (**self).end_input_batch(cx)
    }
    fn watermark(&mut self, cx: &Cx, at: crate::time::Timestamp) -> Result<(), Halt> {
        (**self).watermark(cx, at)
    }
    fn flush(&mut self, cx: &Cx) -> Result<(), Halt> {
        (**self).flush(cx)
    }
    fn finish(&mut self, cx: &Cx) -> Result<(), Halt> {
        (**self).finish(cx)
    }
    fn barrier(
        &mut self,
        cx: &Cx,
        id: crate::checkpoint::CheckpointId,
        state: &mut crate::checkpoint::state::InstanceState,
    ) -> Result<(), Halt> {
        (**self).barrier(cx, id, state)
    }
    fn restore(
        &mut self,
        cx: &Cx,
        state: &crate::checkpoint::state::InstanceState,
    ) -> Result<(), Halt> {
        (**self).restore(cx, state)
    }
    fn state_support(&self) -> crate::checkpoint::StateSupport {
        (**self).state_support()
    }
}

/// The loop every stage instance runs.
///
/// Failures are recorded *before* the tail (and so the senders to downstream stages) is dropped:
/// a consumer that sees its input close without an end marker must find the run already failing,
/// or it would report the disconnect as an error of its own.
pub(crate) fn drive<I, C, T>(
    cx: &Cx,
    mut head: Box<dyn Head<I>>,
    mut chain: C,
    mut tail: T,
) -> Result<(), Halt>
where
    C: Chain<I>,
    T: Tail<C::Out>,
{
    // Declared after `tail`, so dropped before it, also while unwinding from a panic.
    let _guard = AbortGuard(&cx.run);
    match drive_loop(cx, &mut *head, &mut chain, &mut tail) {
        Err(Halt::Failed(e)) => {
            cx.run.fail(e);
            Err(Halt::Done)
        }
        other => other,
    }
}

/// Marks the run as failing if the worker is unwinding from a panic.
struct AbortGuard<'a>(&'a RunShared);

impl Drop for AbortGuard<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.aborting.store(true, Ordering::Release);
            self.0.cancel();
        }
    }
}

fn drive_loop<I, C, T>(
    cx: &Cx,
    head: &mut dyn Head<I>,
    chain: &mut C,
    tail: &mut T,
) -> Result<(), Halt>
where
    C: Chain<I>,
    T: Tail<C::Out>,
{
    let mut buf: Vec<I> = Vec::with_capacity(cx.batch_size());
    let linger = cx.linger_ms();
    let count_in = !head.counts_input();
    // Checkpointing: read once; `None` when it is off (then nothing below costs anything).
    let cp = cx.run.checkpoint.lock().clone();
    let cp = cp.as_deref().map(|c| {
        let who = crate::checkpoint::InstanceId {
            stage: cx.stage.to_string(),
            instance: cx.instance,
        };
        (c, who)
    });
    let mut injected = 0;
    if let Some((c, who)) = &cp {
        if let Some(state) = c.restored.get(who) {
            head.restore(cx, state)?;
            chain.restore(state).map_err(Halt::Failed)?;
            tail.restore(cx, state)?;
        }
        injected = c.coord.base();
    }
    loop {
        if cx.run.is_cancelled() {
            return Err(Halt::Done);
        }
        // A source injects every checkpoint triggered since its last batch, after the records
        // it already pushed: one load per batch.
        if cx.source {
            if let Some((c, who)) = &cp {
                let t = c.coord.triggered();
                while injected < t {
                    injected += 1;
                    checkpoint_at(cx, c, who, injected, 0, head, chain, tail)?;
                }
            }
        }
        let flush_at = tail.pending_since().map(|t| t + linger);
        let pull = head.pull(cx, &mut buf, flush_at)?;
        tail.before_batch(cx.clock_ms());
        let batch = buf.len() as u64;
        if !buf.is_empty() {
            chain.begin_batch(buf.len());
        }
        let mut pushed = 0u64;
        let mut halted = None;
        for item in buf.drain(..) {
            pushed += 1;
            match chain.push(item, &mut *tail) {
                Ok(()) => {}
                Err(h) => {
                    halted = Some(h);
                    break;
                }
            }
        }
        // Records the chain took: when a `Halt::Done` stops mid-batch, the rest of the batch
        // was read (by a source) but never handed on, and is not counted.
        buf.clear();
        chain.end_batch();
        if pushed > 0 {
            InstanceMetrics::add(&cx.metrics.chain_in, pushed);
            if count_in {
                InstanceMetrics::add(&cx.metrics.records_in, pushed);
            }
        }
        if count_in && batch > 0 {
            InstanceMetrics::add(&cx.metrics.batches_in, 1);
        }
        match halted {
            None => {}
            // A limit was reached or every consumer is gone: end cleanly.
            Some(Halt::Done) => {
                cx.run.stopped_early.store(true, Ordering::Relaxed);
                return finish(cx, &cp, head, chain, tail);
            }
            Some(e) => return Err(e),
        }
        tail.after_batch(cx)?;
        if batch > 0 || pull == Pull::Data {
            tail.end_input_batch(cx)?;
        }
        match pull {
            Pull::Data => {}
            Pull::Idle => tail.flush(cx)?,
            Pull::Watermark(at) => tail.watermark(cx, at)?,
            Pull::Barrier(n) => match &cp {
                Some((c, who)) => {
                    let align = cx.metrics.last_align_ns.load(Ordering::Relaxed);
                    checkpoint_at(cx, c, who, n, align, head, chain, tail)?;
                }
                // Barriers come only from checkpointing sources: pass one on regardless.
                None => tail.barrier(cx, n, &mut Default::default())?,
            },
            Pull::End => return finish(cx, &cp, head, chain, tail),
        }
    }
}

/// The state part holding the records an instance's chain took before a barrier.
pub(crate) const RECORDS_PART: &str = "runtime.records";

/// Checkpoint `id` at this instance, after every record before its barrier: snapshot the head
/// and the chain, hand the barrier on (a sink makes its output durable), write the state file
/// and acknowledge. A checkpoint no longer pending (failed, declined) is not snapshotted, but
/// its barrier is still handed on, so that no downstream instance waits for it for ever.
#[allow(clippy::too_many_arguments)]
fn checkpoint_at<I, C, T>(
    cx: &Cx,
    cp: &crate::checkpoint::CheckpointRun,
    who: &crate::checkpoint::InstanceId,
    id: crate::checkpoint::CheckpointId,
    align_ns: u64,
    head: &mut dyn Head<I>,
    chain: &mut C,
    tail: &mut T,
) -> Result<(), Halt>
where
    C: Chain<I>,
    T: Tail<C::Out>,
{
    let pending = cp.coord.is_pending(id);
    let mut state = crate::checkpoint::state::InstanceState::default();
    if pending {
        // A diagnostic part: the records this instance's chain took before the barrier (since
        // this run started). Summed over a stage's instances it equals the same sum over the
        // upstream stage's output at the same barrier: what the protocol tests check.
        state
            .put(RECORDS_PART, &cx.metrics.chain_in.load(Ordering::Relaxed))
            .map_err(Halt::Failed)?;
        head.snapshot(cx, &mut state)?;
        chain.snapshot(&mut state).map_err(Halt::Failed)?;
    }
    tail.barrier(cx, id, &mut state)?;
    if pending {
        cp.write_and_ack(who, id, &state, align_ns)
            .map_err(Halt::Failed)?;
    }
    Ok(())
}

/// The instance ends normally: finish the tail, then hand the coordinator the final snapshot
/// (head, chain, and the tail's state through one last `barrier(FINAL)`), which counts as the
/// instance's ack of every pending and later checkpoint.
fn finish<I, C, T>(
    cx: &Cx,
    cp: &Option<(
        &crate::checkpoint::CheckpointRun,
        crate::checkpoint::InstanceId,
    )>,
    head: &mut dyn Head<I>,
    chain: &mut C,
    tail: &mut T,
) -> Result<(), Halt>
where
    C: Chain<I>,
    T: Tail<C::Out>,
{
    tail.finish(cx)?;
    if let Some((c, who)) = cp {
        let mut state = crate::checkpoint::state::InstanceState::default();
        state
            .put(RECORDS_PART, &cx.metrics.chain_in.load(Ordering::Relaxed))
            .map_err(Halt::Failed)?;
        head.snapshot(cx, &mut state)?;
        chain.snapshot(&mut state).map_err(Halt::Failed)?;
        tail.barrier(cx, crate::checkpoint::FINAL, &mut state)?;
        let bytes = state.encode().map_err(Halt::Failed)?;
        c.coord.finish(who, &state, bytes);
    }
    Ok(())
}

/// Called by each worker once its tail is made, before its first pull: with checkpoints on,
/// refuses a tail whose state cannot be checkpointed (naming the stage), then waits until every
/// worker of the run has checked its own, so that no record moves before the run is known to be
/// checkpointable. The last worker to arrive opens the gate: it first does what must wait until
/// the run is known to start (`CheckpointRun::open_gate`: `--fresh` discards the earlier run's
/// checkpoints there), outside the gate's lock. Without checkpoints it returns at once.
pub(crate) fn tail_ready(cx: &Cx, support: crate::checkpoint::StateSupport) -> Result<(), Halt> {
    use crate::checkpoint::{Mode, StateSupport};
    let Some(c) = cx.run.checkpoint.lock().clone() else {
        return Ok(());
    };
    let mode = c.mode;
    let refused = match support {
        StateSupport::Unsupported(r) => Some(r),
        StateSupport::StdinSpool => Some(crate::source::STDIN.into()),
        StateSupport::AtLeastOnce(r) if mode == Mode::ExactlyOnce => Some(r),
        _ => None,
    };
    if let Some(reason) = refused {
        cx.run.fail(Error::CheckpointUnsupported {
            stage: cx.stage.to_string(),
            reason,
        });
        return Err(Halt::Done);
    }
    let mut g = cx.run.gate.lock();
    g.arrived += 1;
    if g.arrived == g.expected {
        drop(g);
        // A failure is recorded before the others are let through: they see the run cancelled.
        let opened = c.open_gate().map_err(|e| cx.run.fail(e));
        g = cx.run.gate.lock();
        g.open = true;
        cx.run.gate_cv.notify_all();
        drop(g);
        return opened.map_err(|()| Halt::Done);
    }
    while !g.open {
        // A worker that failed (or a thread that could not be spawned) fails the run, which
        // cancels it: the gate never opens then.
        if cx.run.is_cancelled() {
            return Err(Halt::Done);
        }
        let deadline = Instant::now() + Duration::from_millis(20);
        cx.run.gate_cv.wait_until(&mut g, deadline);
    }
    drop(g);
    if cx.run.is_cancelled() {
        return Err(Halt::Done);
    }
    Ok(())
}

/// What a worker thread runs.
pub(crate) type WorkerBody = Box<dyn FnOnce(&Cx) -> Result<(), Halt> + Send>;

/// One stage instance, ready to run on its own thread.
pub(crate) struct Worker {
    pub stage: Arc<str>,
    pub instance: usize,
    pub source: bool,
    /// Whether the worker is on the dead-letter side (a dead-letter source or downstream of
    /// one): such workers hold no "main alive" token.
    pub dead_letter_side: bool,
    /// What the worker's head and chain steps say of their state (checked before a run with
    /// checkpoints starts; the tail is checked by [`tail_ready`]).
    pub support: Vec<(Arc<str>, crate::checkpoint::StateSupport)>,
    pub body: WorkerBody,
}

/// The message of a panic payload (`&str` or `String`), for errors that report a panic.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    }
}

/// Runs the workers to completion and joins every thread.
pub(crate) fn run(shared: Arc<RunShared>, workers: Vec<Worker>) -> Result<RunReport, Error> {
    let start = Instant::now();
    *shared.started.lock() = Some(start);
    let mut entries = Vec::with_capacity(workers.len());
    let mut jobs = Vec::with_capacity(workers.len());
    for w in workers {
        let metrics = Arc::new(InstanceMetrics::default());
        entries.push(MetricsEntry {
            stage: Arc::clone(&w.stage),
            source: w.source,
            instance: w.instance,
            metrics: Arc::clone(&metrics),
        });
        jobs.push((w, metrics));
    }
    *shared.metrics.lock() = entries;
    shared.gate.lock().expected = jobs.len();
    let cp = shared.checkpoint.lock().clone();
    let cp_stop = AtomicBool::new(false);

    // Every worker holds a clone of `alive_tx`; when the last one ends the main thread's
    // `recv_timeout` sees the channel disconnect and stops ticking the clock.
    let (alive_tx, alive_rx) = bounded::<()>(0);
    thread::scope(|scope| {
        // Joined explicitly at the end: the scope itself waits only for the closures to
        // return, not for the threads to exit (their thread-local destructors may still be
        // running), and `run` promises that every thread is gone when it returns.
        let mut handles = Vec::with_capacity(jobs.len());
        for (w, metrics) in jobs {
            let cx = Cx {
                run: Arc::clone(&shared),
                stage: Arc::clone(&w.stage),
                instance: w.instance,
                source: w.source,
                metrics,
            };
            let alive = alive_tx.clone();
            let main_alive = if w.dead_letter_side {
                None
            } else {
                shared.main_alive_tx.lock().clone()
            };
            let name = format!("millrace:{}#{}", w.stage, w.instance);
            let stage = Arc::clone(&w.stage);
            let spawned = thread::Builder::new()
                .name(name)
                .spawn_scoped(scope, move || {
                    let _alive = alive;
                    let _main_alive = main_alive;
                    let t0 = Instant::now();
                    let result = catch_unwind(AssertUnwindSafe(|| (w.body)(&cx)));
                    cx.metrics
                        .wall_ns
                        .store(t0.elapsed().as_nanos().max(1) as u64, Ordering::Relaxed);
                    match result {
                        Ok(Ok(())) | Ok(Err(Halt::Done)) => {}
                        Ok(Err(Halt::Failed(e))) => cx.run.fail(e),
                        Err(payload) => cx.run.fail(Error::Panic {
                            stage: w.stage.to_string(),
                            message: panic_message(&*payload),
                        }),
                    }
                });
            match spawned {
                Ok(h) => handles.push(h),
                Err(source) => {
                    shared.fail(Error::Spawn {
                        what: format!("a thread for stage `{stage}`"),
                        stage: Some(stage.to_string()),
                        source,
                    });
                    break;
                }
            }
        }
        drop(alive_tx);
        shared.main_alive_tx.lock().take();
        let coordinator = cp.as_ref().and_then(|c| {
            let (c, stop, run) = (Arc::clone(c), &cp_stop, &shared);
            let spawned = thread::Builder::new()
                .name("millrace:checkpoint".into())
                .spawn_scoped(scope, move || {
                    let fail = |e: Error| run.fail(e);
                    if let Err(p) =
                        catch_unwind(AssertUnwindSafe(|| c.coord.run_thread(stop, &fail)))
                    {
                        run.fail(Error::Checkpoint {
                            message: format!("the coordinator panicked: {}", panic_message(&*p)),
                        });
                    }
                });
            match spawned {
                Ok(h) => Some(h),
                Err(source) => {
                    shared.fail(Error::Spawn {
                        what: "the checkpoint coordinator's thread".into(),
                        stage: None,
                        source,
                    });
                    None
                }
            }
        });
        // Nobody sends on `alive`: this waits for the last worker, ticking the clock meanwhile.
        while let Err(RecvTimeoutError::Timeout) = alive_rx.recv_timeout(TICK) {
            shared
                .clock_ms
                .store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
        }
        for h in handles {
            // A worker's panic was caught inside it: joining cannot fail but by a bug.
            let _ = h.join();
        }
        if let Some(c) = &cp {
            c.coord.stop_thread(&cp_stop);
        }
        if let Some(h) = coordinator {
            let _ = h.join();
        }
    });
    // Every worker has ended, and with it every `map_par` head's reference: this is the
    // pool's last, and dropping it joins the pool's threads.
    let par_pool = shared.par_pool.lock().take();
    drop(par_pool);
    if let Some(c) = &cp {
        // Every worker has ended: complete what can be completed (on success, a final
        // checkpoint commits the sinks' last files), abandon the rest, and on success remove
        // the directory's checkpoints unless asked to keep them.
        let success = !shared.has_failed() && !shared.is_cancelled();
        let r = c.coord.shutdown(success).and_then(|()| {
            if !success {
                return Ok(());
            }
            // Marked completed first, so that a crash while the checkpoints are removed still
            // leaves a completed run (which a --resume has nothing to do for), never a
            // directory of half-removed checkpoints that a resume would start over from.
            c.store.mark_completed()?;
            if c.retain_on_success {
                return Ok(());
            }
            c.coord.remove_all().and_then(|()| c.remove_spool())
        });
        if let Err(e) = r {
            shared.fail(e);
        }
    }

    let elapsed = start.elapsed();
    if let Some(e) = shared.first_error.lock().take() {
        return Err(e);
    }
    if shared.is_cancelled() {
        return Err(Error::Cancelled);
    }
    let stages = shared
        .metrics
        .lock()
        .iter()
        .map(|m| m.snapshot(elapsed))
        .collect();
    Ok(shared.report(elapsed, stages))
}
