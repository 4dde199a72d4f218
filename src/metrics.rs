//! Per-stage-instance counters, their snapshots, and the run report table.
//!
//! Workers update their own [`InstanceMetrics`] with relaxed atomics once per batch, so the cost
//! is a few nanoseconds per batch and a progress reader on another thread can sample them live.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::sync::{AtomicU64, Ordering::Relaxed};

/// Live counters of one stage instance (one worker thread).
#[derive(Debug, Default)]
pub(crate) struct InstanceMetrics {
    pub records_in: AtomicU64,
    pub records_out: AtomicU64,
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
    /// Window stages: windows currently held (a gauge).
    pub open_windows: AtomicU64,
}

impl InstanceMetrics {
    #[inline]
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }
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
        let send_blocked = Duration::from_nanos(m.send_wait_ns.load(Relaxed));
        let recv_blocked = Duration::from_nanos(m.recv_wait_ns.load(Relaxed));
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
            open_windows: m.open_windows.load(Relaxed),
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
    /// Records dropped by the stage's `skip` error policy.
    pub skipped: u64,
    /// Window stages: windows held at the time of the snapshot (0 at the end of a run).
    pub open_windows: u64,
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
            total.open_windows += r.open_windows;
        }
        Some(total)
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
