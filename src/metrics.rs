//! Per-stage-instance counters, their snapshots, the per-step accounts derived from them, and
//! the run report tables.
//!
//! Workers update their own [`InstanceMetrics`] with relaxed atomics once per batch, so the cost
//! is a few nanoseconds per batch and a progress reader on another thread can sample them live.
//! The per-step accounts ([`StageAccount`], one per operator, counted head and sink) are derived
//! at report time from each stage's step plan ([`SlotPlan`]): the records each batch pushed into
//! a chain, and the event counts (filtered, skipped, dead-lettered, 1:N outputs) each operator
//! flushes once per batch (`Chain::end_batch`); see `docs/semantics.md`, "Bad records".

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::sync::{AtomicU64, Ordering::Relaxed};

/// Live counters of one stage instance (one worker thread).
#[derive(Debug, Default)]
pub(crate) struct InstanceMetrics {
    pub records_in: AtomicU64,
    pub records_out: AtomicU64,
    /// Records the stage's fused chain took from its head (the input of its first operator).
    pub chain_in: AtomicU64,
    pub batches_in: AtomicU64,
    pub batches_out: AtomicU64,
    /// Nanoseconds blocked sending downstream: backpressure.
    pub send_wait_ns: AtomicU64,
    /// Nanoseconds blocked waiting for input: idle.
    pub recv_wait_ns: AtomicU64,
    /// Nanoseconds from the thread's start to its end (0 while running).
    pub wall_ns: AtomicU64,
    /// Window stages: records too late for every window they belong to.
    pub late: AtomicU64,
    /// Records dropped by a `skip` error policy.
    pub skipped: AtomicU64,
    /// Records sent to a dead-letter stream (by the head; fused operators count their own).
    pub dead_lettered: AtomicU64,
    /// Window stages: windows currently held (a gauge).
    pub open_windows: AtomicU64,
    /// Nanoseconds spent aligning checkpoint barriers (first barrier of a checkpoint seen to
    /// the last), summed over checkpoints.
    pub align_ns: AtomicU64,
    /// The latest alignment's nanoseconds (what the instance's acknowledgement reports).
    pub last_align_ns: AtomicU64,
    /// While the instance is parked sending (the channel full after its yields): 1 + the run's
    /// `clock_ms` when it parked; 0 when it is not. A snapshot counts a block still under way
    /// as blocked time, so a stage stuck behind a full channel shows as backpressured while it
    /// is stuck, not only once the send returns.
    pub send_parked_since_ms: AtomicU64,
    /// The same for a receive parked on an empty input (idle).
    pub recv_parked_since_ms: AtomicU64,
    /// Messages waiting in the channel the instance reads, sampled at each receive (a gauge).
    pub queue_len: AtomicU64,
    /// That channel's capacity in messages (0 for a source, which reads none).
    pub queue_capacity: AtomicU64,
}

impl InstanceMetrics {
    #[inline]
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }
}

/// Marks an instance parked on a channel (`send_parked_since_ms` or `recv_parked_since_ms`)
/// from `clock_ms` on, until dropped: drop it before adding the block's time to its counter,
/// so that a snapshot never counts a block twice (it may miss the last moments of one).
pub(crate) struct Parked<'a>(&'a AtomicU64);

impl<'a> Parked<'a> {
    pub(crate) fn new(mark: &'a AtomicU64, clock_ms: u64) -> Self {
        mark.store(clock_ms + 1, Relaxed);
        Parked(mark)
    }
}

impl Drop for Parked<'_> {
    fn drop(&mut self) {
        self.0.store(0, Relaxed);
    }
}

/// How a step's record counts relate (see [`StageAccount::check`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Shape {
    /// Reads records: `in` = records produced + skipped + dead-lettered (blank lines are not
    /// records); `in = out + skipped + dead_lettered`.
    Source,
    /// One record out per record in (map, try_map, select, inspect):
    /// `in = out + filtered + skipped + dead_lettered + late`.
    OneToOne,
    /// Drops some records (filter, limit): the same invariant as [`Shape::OneToOne`].
    Filtering,
    /// Zero or more records out per record in (words, flat_map, try_flat_map): `out` is
    /// counted; `in` = records expanded + skipped + dead-lettered, and `in >= skipped +
    /// dead_lettered`.
    OneToMany,
    /// A window: `in` = records windowed + late + skipped + dead-lettered; `out` = results.
    Window,
    /// count, fold, reduce, sort: `out` = results; no relation to `in`.
    Aggregate,
    /// exec, process and native plugin nodes: `in` = records sent; `out + dead_lettered` =
    /// records the child or node produced; no relation between `in` and `out`.
    Exec,
    /// A sink: `in = out + skipped + dead_lettered` (`out` = records written).
    Sink,
}

/// Where the records of one step (an operator, head or sink: each TOML stage, even when
/// fused) went, summed over its instances.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct StageAccount {
    /// The step's name.
    pub stage: String,
    /// Its shape: which invariant relates the counts.
    pub shape: Shape,
    /// Records that reached it.
    pub records_in: u64,
    /// Records it handed on (or wrote).
    pub records_out: u64,
    /// Records it dropped by design (a filter's predicate, records reaching a limit after its
    /// n).
    pub filtered: u64,
    /// Bad records dropped by a `skip` policy.
    pub skipped: u64,
    /// Bad records sent to a dead-letter stream.
    pub dead_lettered: u64,
    /// Records too late for every window (windows only).
    pub late: u64,
}

impl StageAccount {
    /// Checks the invariant of the step's [`Shape`].
    pub fn check(&self) -> Result<(), String> {
        let a = self;
        let lost = a.filtered + a.skipped + a.dead_lettered + a.late;
        let ok = match a.shape {
            Shape::Source | Shape::OneToOne | Shape::Filtering | Shape::Sink => {
                a.records_in == a.records_out + lost
            }
            Shape::OneToMany => a.records_in >= a.skipped + a.dead_lettered,
            Shape::Window => a.records_in >= a.late + a.skipped + a.dead_lettered,
            Shape::Aggregate | Shape::Exec => true,
        };
        if ok {
            Ok(())
        } else {
            Err(format!(
                "step `{}` ({:?}): in {} but out {} + filtered {} + skipped {} + dead-lettered {} + late {}",
                a.stage, a.shape, a.records_in, a.records_out, a.filtered, a.skipped, a.dead_lettered, a.late
            ))
        }
    }
}

/// One entry of a stage's step plan: how its per-step accounts are derived at report time.
#[derive(Debug, Clone)]
pub(crate) enum StepEntry {
    /// A head that is a step (a source, aggregation, window, exec or plugin node): its counts
    /// come from the stage's instance metrics; its `out` from the `Input` that follows.
    Head(Arc<str>, Shape),
    /// Records pushed into the operators that follow: a counter of a chain moved into a head,
    /// or (`None`) the stage's `chain_in` metrics.
    Input(Option<Arc<AtomicU64>>),
    /// A fused operator: `in` is the previous step's `out`.
    Op(crate::operator::StepInfo),
}

/// The step plan of one stage, for deriving its accounts.
#[derive(Debug, Clone)]
pub(crate) struct SlotPlan {
    pub stage: String,
    pub sink: Option<String>,
    pub steps: Vec<StepEntry>,
    /// The stages feeding this one (indices into the plan).
    pub inputs: Vec<usize>,
    /// How many stages read this one.
    pub consumers: usize,
}

/// Derives every step's account from the stage plans and the instance metrics; also returns
/// the links `check_accounting` tests: (the last accounts of the producers, the first account
/// of their consumer).
pub(crate) fn derive_accounts(
    plan: &[SlotPlan],
    stages: &[StageMetrics],
) -> (Vec<StageAccount>, Vec<(Vec<usize>, usize)>) {
    let mut accounts = Vec::new();
    let mut bounds: Vec<Option<(usize, usize)>> = Vec::with_capacity(plan.len());
    for slot in plan {
        let rows: Vec<&StageMetrics> = stages.iter().filter(|s| s.stage == slot.stage).collect();
        let sum = |f: fn(&StageMetrics) -> u64| rows.iter().map(|r| f(r)).sum::<u64>();
        let first = accounts.len();
        let mut prev_out = 0u64;
        let mut pending_head: Option<usize> = None;
        for e in &slot.steps {
            match e {
                StepEntry::Head(name, shape) => {
                    accounts.push(StageAccount {
                        stage: name.to_string(),
                        shape: *shape,
                        records_in: if *shape == Shape::Source {
                            0
                        } else {
                            sum(|r| r.records_in)
                        },
                        records_out: 0,
                        filtered: 0,
                        skipped: sum(|r| r.skipped),
                        dead_lettered: sum(|r| r.dead_lettered),
                        late: sum(|r| r.late),
                    });
                    pending_head = Some(accounts.len() - 1);
                }
                StepEntry::Input(c) => {
                    prev_out = match c {
                        Some(c) => c.load(Relaxed),
                        None => sum(|r| r.chain_in),
                    };
                    if let Some(h) = pending_head.take() {
                        let a = &mut accounts[h];
                        a.records_out = prev_out;
                        if a.shape == Shape::Source {
                            a.records_in = prev_out + a.skipped + a.dead_lettered;
                        }
                    }
                }
                StepEntry::Op(info) => {
                    let c = &info.counts;
                    if info.counted_in {
                        prev_out = c.records_in.load(Relaxed);
                    }
                    let (filtered, skipped, dead) = (
                        c.filtered.load(Relaxed),
                        c.skipped.load(Relaxed),
                        c.dead_lettered.load(Relaxed),
                    );
                    let out = if info.shape == Shape::OneToMany {
                        c.out.load(Relaxed)
                    } else {
                        prev_out.saturating_sub(filtered + skipped + dead)
                    };
                    accounts.push(StageAccount {
                        stage: info.name.to_string(),
                        shape: info.shape,
                        records_in: prev_out,
                        records_out: out,
                        filtered,
                        skipped,
                        dead_lettered: dead,
                        late: 0,
                    });
                    prev_out = out;
                }
            }
        }
        if let Some(sink) = &slot.sink {
            accounts.push(StageAccount {
                stage: sink.clone(),
                shape: Shape::Sink,
                records_in: prev_out,
                records_out: sum(|r| r.records_out),
                filtered: 0,
                skipped: 0,
                dead_lettered: 0,
                late: 0,
            });
        }
        bounds.push((accounts.len() > first).then(|| (first, accounts.len() - 1)));
    }
    let mut links = Vec::new();
    for (i, slot) in plan.iter().enumerate() {
        let Some((first, _)) = bounds[i] else {
            continue;
        };
        let producers: Option<Vec<usize>> = slot
            .inputs
            .iter()
            .map(|&u| {
                let p = plan.get(u)?;
                if p.consumers != 1 {
                    return None;
                }
                bounds[u].map(|(_, last)| last)
            })
            .collect();
        if let Some(producers) = producers.filter(|p| !p.is_empty()) {
            links.push((producers, first));
        }
    }
    (accounts, links)
}

/// Registration of one instance's counters, for reports.
#[derive(Debug, Clone)]
pub(crate) struct MetricsEntry {
    pub stage: Arc<str>,
    pub source: bool,
    pub instance: usize,
    pub metrics: Arc<InstanceMetrics>,
}

impl MetricsEntry {
    pub(crate) fn snapshot(&self, elapsed: Duration) -> StageMetrics {
        let m = &self.metrics;
        let wall = match m.wall_ns.load(Relaxed) {
            0 => elapsed,
            ns => Duration::from_nanos(ns),
        };
        // A block under way counts up to now (see `send_parked_since_ms`); the thread clears
        // the mark before it adds the block's time, so a block is never counted twice.
        let ongoing = |since: &AtomicU64| match since.load(Relaxed) {
            0 => Duration::ZERO,
            s => elapsed.saturating_sub(Duration::from_millis(s - 1)),
        };
        let send_blocked =
            Duration::from_nanos(m.send_wait_ns.load(Relaxed)) + ongoing(&m.send_parked_since_ms);
        let recv_blocked =
            Duration::from_nanos(m.recv_wait_ns.load(Relaxed)) + ongoing(&m.recv_parked_since_ms);
        StageMetrics {
            stage: self.stage.to_string(),
            source: self.source,
            instance: self.instance,
            records_in: m.records_in.load(Relaxed),
            records_out: m.records_out.load(Relaxed),
            batches_in: m.batches_in.load(Relaxed),
            batches_out: m.batches_out.load(Relaxed),
            busy: wall
                .saturating_sub(send_blocked)
                .saturating_sub(recv_blocked),
            send_blocked,
            recv_blocked,
            late: m.late.load(Relaxed),
            skipped: m.skipped.load(Relaxed),
            dead_lettered: m.dead_lettered.load(Relaxed),
            chain_in: m.chain_in.load(Relaxed),
            open_windows: m.open_windows.load(Relaxed),
            aligning: Duration::from_nanos(m.align_ns.load(Relaxed)),
            queue_len: m.queue_len.load(Relaxed),
            queue_capacity: m.queue_capacity.load(Relaxed),
        }
    }
}

/// What one stage instance did during a run.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct StageMetrics {
    /// The stage's name (the names of its fused operators joined by `+`).
    pub stage: String,
    /// Whether the stage is a source (its `records_in` counts records it read).
    pub source: bool,
    /// Which instance of the stage (0-based).
    pub instance: usize,
    /// Records that entered the stage instance.
    pub records_in: u64,
    /// Records it emitted downstream (or wrote, for a sink).
    pub records_out: u64,
    /// Batches it received.
    pub batches_in: u64,
    /// Batches it sent.
    pub batches_out: u64,
    /// Time spent working: wall time less the two blocked times.
    pub busy: Duration,
    /// Time blocked sending to a full channel: backpressure from downstream.
    pub send_blocked: Duration,
    /// Time blocked waiting for input: the stage was idle.
    pub recv_blocked: Duration,
    /// Window stages: records too late for every window they belong to (routed to the late
    /// output, or dropped when it has none; counted either way).
    pub late: u64,
    /// Records dropped by the stage's head under a `skip` error policy (its fused operators
    /// count theirs in [`RunReport::accounts`]).
    pub skipped: u64,
    /// Records its head sent to a dead-letter stream (likewise).
    pub dead_lettered: u64,
    /// Records its fused chain took from its head.
    pub(crate) chain_in: u64,
    /// Window stages: windows held at the time of the snapshot (0 at the end of a run).
    pub open_windows: u64,
    /// Time spent aligning checkpoint barriers over its inputs (from the first input's barrier
    /// to the last one's), summed over checkpoints: grows under backpressure, when a barrier
    /// waits behind queued batches.
    pub aligning: Duration,
    /// Messages (batches, watermarks, markers) queued in the channel it reads, as last
    /// sampled, when it received its latest message: with [`queue_capacity`](Self::queue_capacity),
    /// how full its input is (a gauge; a full input is a stage that cannot keep up).
    pub queue_len: u64,
    /// The capacity of the channel it reads, in messages (0 for a source).
    pub queue_capacity: u64,
}

/// The result of a successful run: elapsed time and per-instance metrics. `Display` prints it as
/// a table.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RunReport {
    /// Wall-clock time of the run.
    pub elapsed: Duration,
    /// One row per stage instance, in stage order.
    pub stages: Vec<StageMetrics>,
    /// The pools registered with [`Pipeline::track_pool`](crate::Pipeline::track_pool), as
    /// they stood at the end of the run.
    pub pools: Vec<crate::PoolMetrics>,
    /// Where the records went, one row per step (each operator, counted head and sink, also
    /// when fused), in stage order.
    pub accounts: Vec<StageAccount>,
    /// The one-to-one links between steps of different stages (see `check_accounting`).
    pub(crate) links: Vec<(Vec<usize>, usize)>,
    /// Whether a stage stopped before its input ended (records in flight were dropped).
    pub(crate) stopped_early: bool,
    /// One row per checkpoint triggered (empty without checkpoints), in the order they ended.
    pub checkpoints: Vec<crate::checkpoint::CheckpointStats>,
    /// The checkpoint the run resumed from, if it resumed.
    pub resumed_from: Option<crate::checkpoint::CheckpointId>,
    /// Checkpoints skipped at resume because they did not verify, with why.
    pub skipped_checkpoints: Vec<(crate::checkpoint::CheckpointId, String)>,
    /// A resume found that the checkpoint directory's run had completed (when, in
    /// milliseconds since the Unix epoch; 0 if unknown): nothing ran.
    pub already_completed: Option<u64>,
}

impl RunReport {
    /// Sums the metrics of every instance of the stage that runs the named operator: either the
    /// stage's full name or one of its fused parts (`filter` finds `read+filter+out`, whose
    /// counts are those of the whole fused stage).
    pub fn stage(&self, name: &str) -> Option<StageMetrics> {
        let matches = |s: &&StageMetrics| s.stage == name || s.stage.split('+').any(|p| p == name);
        let first = self.stages.iter().find(matches)?.stage.clone();
        let mut rows = self.stages.iter().filter(|s| s.stage == first);
        let mut total = rows.next()?.clone();
        for r in rows {
            total.records_in += r.records_in;
            total.records_out += r.records_out;
            total.batches_in += r.batches_in;
            total.batches_out += r.batches_out;
            total.busy += r.busy;
            total.send_blocked += r.send_blocked;
            total.recv_blocked += r.recv_blocked;
            total.late += r.late;
            total.skipped += r.skipped;
            total.dead_lettered += r.dead_lettered;
            total.chain_in += r.chain_in;
            total.open_windows += r.open_windows;
            total.aligning += r.aligning;
            total.queue_len += r.queue_len;
            total.queue_capacity += r.queue_capacity;
        }
        Some(total)
    }

    /// The account of the step named `name`.
    pub fn account(&self, name: &str) -> Option<&StageAccount> {
        self.accounts.iter().find(|a| a.stage == name)
    }

    /// Checks every step's invariant (see [`Shape`]) and that each stage's first step took
    /// what its producers handed on, where that is one-to-one (each producer read by this stage
    /// alone). When a stage stopped early (a `limit`, a closed output), the records in flight
    /// between stages were dropped: a stage may then have taken fewer than were handed on.
    pub fn check_accounting(&self) -> Result<(), String> {
        for a in &self.accounts {
            a.check()?;
        }
        for (producers, consumer) in &self.links {
            let out: u64 = producers
                .iter()
                .map(|&p| self.accounts[p].records_out)
                .sum();
            let c = &self.accounts[*consumer];
            if out != c.records_in && !(self.stopped_early && c.records_in < out) {
                let names: Vec<&str> = producers
                    .iter()
                    .map(|&p| self.accounts[p].stage.as_str())
                    .collect();
                return Err(format!(
                    "step `{}` took {} records but {} handed on {}",
                    c.stage,
                    c.records_in,
                    names.join(" + "),
                    out
                ));
            }
        }
        Ok(())
    }

    /// Records read by all sources.
    pub fn records_read(&self) -> u64 {
        self.stages
            .iter()
            .filter(|s| s.source)
            .map(|s| s.records_in)
            .sum()
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e3)
}

impl fmt::Display for RunReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let width = self
            .stages
            .iter()
            .map(|s| s.stage.len() + 3)
            .max()
            .unwrap_or(5)
            .max(5);
        writeln!(
            f,
            "{:<width$} {:>12} {:>12} {:>9} {:>9} {:>10} {:>10} {:>10}",
            "stage", "in", "out", "b.in", "b.out", "busy ms", "send ms", "recv ms"
        )?;
        for s in &self.stages {
            let name = format!("{}#{}", s.stage, s.instance);
            writeln!(
                f,
                "{:<width$} {:>12} {:>12} {:>9} {:>9} {:>10} {:>10} {:>10}",
                name,
                s.records_in,
                s.records_out,
                s.batches_in,
                s.batches_out,
                ms(s.busy),
                ms(s.send_blocked),
                ms(s.recv_blocked)
            )?;
        }
        for s in self
            .stages
            .iter()
            .filter(|s| s.late + s.skipped + s.open_windows > 0)
        {
            writeln!(
                f,
                "{}#{}: {} late, {} skipped, {} windows open",
                s.stage, s.instance, s.late, s.skipped, s.open_windows
            )?;
        }
        if !self.accounts.is_empty() {
            let width = self
                .accounts
                .iter()
                .map(|a| a.stage.len())
                .max()
                .unwrap_or(0)
                .max(7);
            writeln!(
                f,
                "{:<width$} {:>10} {:>10} {:>9} {:>8} {:>8} {:>8}",
                "records", "in", "out", "filtered", "skipped", "dead", "late"
            )?;
            for a in &self.accounts {
                writeln!(
                    f,
                    "{:<width$} {:>10} {:>10} {:>9} {:>8} {:>8} {:>8}",
                    a.stage,
                    a.records_in,
                    a.records_out,
                    a.filtered,
                    a.skipped,
                    a.dead_lettered,
                    a.late
                )?;
            }
        }
        if !self.pools.is_empty() {
            writeln!(f, "{}", crate::PoolMetrics::HEADER)?;
            for p in &self.pools {
                writeln!(f, "{p}")?;
            }
        }
        let secs = self.elapsed.as_secs_f64();
        let read = self.records_read();
        write!(
            f,
            "{} records read in {:.3} s ({:.0} records/s)",
            read,
            secs,
            if secs > 0.0 { read as f64 / secs } else { 0.0 }
        )
    }
}
