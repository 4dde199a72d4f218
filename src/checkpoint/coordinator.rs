//! The checkpoint coordinator: triggers checkpoints, records acknowledgements, completes,
//! fails and removes checkpoints, and applies retention.
//!
//! It owns the pending checkpoints (each with the instances it expects and the
//! acknowledgements received), the final snapshots of instances that have ended, the ids of
//! the complete checkpoints, and the per-checkpoint [`CheckpointStats`].
//!
//! # Design note: the lock only records results
//!
//! The seed's coordinator wrote state while holding its lock, so one slow upload stalled every
//! other acknowledgement, and it never removed a checkpoint that missed its timeout. Here:
//!
//! - **Stage instances write their own state** (`Store::put`, on the worker thread, no lock
//!   held) and then call [`Coordinator::ack`], which takes the lock only to record the file's
//!   entry. An ack for a checkpoint that is no longer pending (timed out, declined, abandoned)
//!   is refused with [`Stale`]; the worker then discards its file itself (`Store::discard` is
//!   idempotent), so a late file never outlives its checkpoint.
//! - **Every other I/O is done by the coordinator's own thread outside the lock**: `begin`, the
//!   files of finished instances, the manifest (`complete`), `discard` of failed and superseded
//!   checkpoints, retention and the sinks' commits. [`Coordinator::step`] decides under the
//!   lock what to do (a list of `Action`s), releases it, and does it.
//! - **A timeout is decided under the lock, by the same critical section that would accept the
//!   last ack**: so a checkpoint either completes or is removed, never both. A removed one is
//!   gone from `pending` at once (nothing of it stays in memory), and its directory is
//!   discarded by the thread right after.
//! - **Completion**: when every expected instance has acked (or has ended, below), the thread
//!   takes the checkpoint (marked `completing`: no timeout can hit it any more, no ack is
//!   expected), writes the finished instances' files, then the manifest; only then is it
//!   complete, and only then are the sinks' pre-committed files committed (a crash between the
//!   two loses nothing: recovery re-commits idempotently).
//!
//! # Design note: instances that have ended
//!
//! An instance that ends normally hands over a final snapshot ([`Coordinator::finish`]); it
//! counts as its acknowledgement of every pending and every later checkpoint, and the thread
//! writes it into each such checkpoint. This is consistent: an instance ends only after every
//! one of its inputs ended, so everything it will ever receive is already in its state, and
//! every record it will ever emit is already in its output channels, *before* the End marker.
//! A downstream instance treats an ended input as having delivered every barrier, so the cut of
//! any later barrier at that downstream instance comes after all of the ended instance's
//! output — exactly what the final snapshot describes. A source's final snapshot is its end
//! position: a resume from such a checkpoint reads nothing more from it.
//!
//! # Time
//!
//! The coordinator reads time only through [`Clock`], so the loom models and the tests drive
//! it with a [`ManualClock`] and call [`Coordinator::step`] themselves instead of sleeping.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use super::state::InstanceState;
use super::store::{FileEntry, InstanceEntry, Manifest, Store};
use super::{CheckpointId, CheckpointStats, InstanceId, Outcome};
use crate::error::Error;
use std::sync::Arc;

use crate::sync::{AtomicU64, Condvar, Mutex, Ordering};

/// Where the coordinator reads the time (since its start).
pub trait Clock: Send + Sync + 'static {
    /// Time since an arbitrary fixed start.
    fn now(&self) -> Duration;
}

/// The real, monotonic clock.
#[derive(Debug)]
pub struct SystemClock(std::time::Instant);

impl SystemClock {
    /// A clock starting now.
    pub fn new() -> Self {
        SystemClock(std::time::Instant::now())
    }
}

impl Default for SystemClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for SystemClock {
    fn now(&self) -> Duration {
        self.0.elapsed()
    }
}

/// A clock that moves only when told to (tests and loom models).
#[derive(Debug, Default)]
pub struct ManualClock(AtomicU64);

impl ManualClock {
    /// A clock at zero.
    pub fn new() -> Self {
        ManualClock(AtomicU64::new(0))
    }
    /// Moves the clock forward by `d`.
    pub fn advance(&self, d: Duration) {
        self.0.fetch_add(d.as_nanos() as u64, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Duration {
        Duration::from_nanos(self.0.load(Ordering::SeqCst))
    }
}

/// The coordinator's settings (from [`CheckpointOptions`](super::CheckpointOptions)).
#[derive(Debug, Clone)]
pub struct Config {
    /// Between the trigger of one checkpoint and the next.
    pub interval: Duration,
    /// A checkpoint not complete this long after its trigger is failed and removed.
    pub timeout: Duration,
    /// Checkpoints in progress at once (at least 1).
    pub max_concurrent: usize,
    /// Between the end of one checkpoint and the next trigger.
    pub min_pause: Duration,
    /// Consecutive failures allowed.
    pub tolerable_failures: u32,
    /// Complete checkpoints kept (at least 1).
    pub retain: usize,
    /// Written into manifests.
    pub max_parallelism: u16,
}

impl From<&super::CheckpointOptions> for Config {
    fn from(o: &super::CheckpointOptions) -> Self {
        Config {
            interval: o.interval,
            timeout: o.timeout,
            max_concurrent: o.max_concurrent.max(1),
            min_pause: o.min_pause,
            tolerable_failures: o.tolerable_failures,
            retain: o.retain.max(1),
            max_parallelism: o.max_parallelism,
        }
    }
}

/// Test hook (the hidden `CheckpointOptions::trigger_hook`): gates the triggers and hears
/// when each checkpoint was triggered and completed, so that a test can place every
/// checkpoint at a known point of its input and keep the file-system operations of a run in
/// one deterministic order (the crash-point enumeration of `tests/checkpoint_crash.rs`).
#[doc(hidden)]
pub trait TriggerHook: Send + Sync + 'static {
    /// Whether checkpoint `id` may be triggered now (on top of the interval and the other
    /// settings). Called under the coordinator's lock: it must not call the coordinator.
    fn may_trigger(&self, id: CheckpointId) -> bool;
    /// Checkpoint `id` was triggered (sources inject its barrier from their next batch on).
    fn triggered(&self, id: CheckpointId);
    /// Checkpoint `id` completed: its manifest is durable, its sinks' files are committed and
    /// retention is done.
    fn completed(&self, id: CheckpointId);
}

/// A stage instance the coordinator expects an acknowledgement from.
#[derive(Debug, Clone)]
pub struct Expected {
    /// The instance.
    pub instance: InstanceId,
    /// Its stage's fingerprint (written into the manifest).
    pub fingerprint: String,
    /// Whether its stage holds state.
    pub stateful: bool,
    /// On the dead-letter side (a dead-letter source or downstream of one).
    pub dead_letter_side: bool,
}

/// One instance's acknowledgement of a checkpoint: its state file, written.
#[derive(Debug, Clone)]
pub struct Ack {
    /// The file, as the store wrote it.
    pub file: FileEntry,
    /// What the manifest records of its state.
    pub key_groups: Option<(u16, u16)>,
    /// Source positions.
    pub positions: Vec<(String, u64)>,
    /// Sink files pre-committed at the barrier.
    pub precommitted: Vec<String>,
    /// How long the instance aligned its inputs for this checkpoint.
    pub align_ns: u64,
}

/// The coordinator refused an acknowledgement: the checkpoint is no longer pending (it timed
/// out, was declined or abandoned). The caller discards its file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stale;

/// An instance's final state, given when it ends.
#[derive(Debug, Clone)]
struct Finished {
    bytes: Arc<Vec<u8>>,
    key_groups: Option<(u16, u16)>,
    positions: Vec<(String, u64)>,
    precommitted: Vec<String>,
}

#[derive(Debug)]
struct Pending {
    started: Duration,
    acks: Vec<Option<Ack>>,
    /// Taken by the thread for completion: no timeout, no more acks.
    completing: bool,
}

impl Pending {
    /// The stats of checkpoint `id`, failed at `now` for `error`.
    fn failed(&self, id: CheckpointId, now: Duration, error: String) -> CheckpointStats {
        CheckpointStats {
            id,
            outcome: Outcome::Failed,
            duration_ms: now.saturating_sub(self.started).as_millis() as u64,
            bytes: 0,
            max_alignment_ms: 0,
            slowest_alignment: None,
            error: Some(error),
        }
    }
}

/// What the thread does outside the lock.
#[derive(Debug)]
enum Action {
    Begin(CheckpointId),
    Discard(CheckpointId),
    Complete(CheckpointId),
}

#[derive(Debug, Default)]
struct Inner {
    pending: BTreeMap<CheckpointId, Pending>,
    finished: Vec<Option<Finished>>,
    /// The last id handed out.
    last_id: CheckpointId,
    last_trigger: Option<Duration>,
    last_end: Option<Duration>,
    consecutive_failures: u32,
    /// Complete checkpoints in the store, ascending (restored ones included).
    complete: Vec<CheckpointId>,
    /// Incomplete or unreadable checkpoints found at start: removed once a newer one completes.
    leftovers: Vec<CheckpointId>,
    stats: Vec<CheckpointStats>,
    /// Begun checkpoints whose begin the thread has not done yet (none can be acked before).
    actions: Vec<Action>,
    /// No more triggers.
    stopping: bool,
    /// The error that fails the run (tolerable failures exceeded, a store error).
    error: Option<Error>,
}

/// Commits one pre-committed sink file.
type CommitFn = Box<dyn Fn(&str) -> Result<(), Error> + Send + Sync>;

/// The checkpoint coordinator of one run (see the module docs).
pub struct Coordinator {
    inner: Mutex<Inner>,
    wake: Condvar,
    /// The newest triggered checkpoint (0: none). Sources load it once per batch.
    triggered: AtomicU64,
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    cfg: Config,
    expected: Vec<Expected>,
    index: BTreeMap<InstanceId, usize>,
    /// Test hook: commits pre-committed sink files (the default is `crate::sink::commit_part`).
    commit: CommitFn,
    /// Loom demonstration: skip the "still pending?" check in `ack`.
    seed_bug_accept_stale: bool,
    /// Test hook: gates triggers (see [`TriggerHook`]).
    hook: Option<Arc<dyn TriggerHook>>,
    base: CheckpointId,
}

impl fmt::Debug for Coordinator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Coordinator")
            .field("triggered", &self.triggered())
            .field("pending", &self.pending_ids())
            .finish_non_exhaustive()
    }
}

impl Coordinator {
    /// A coordinator expecting acks from `expected`; checkpoint numbering continues after
    /// `after` (the newest id present in the store), and `complete` lists the complete
    /// checkpoints already there, `leftovers` the others.
    pub fn new(
        cfg: Config,
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        expected: Vec<Expected>,
        after: CheckpointId,
        complete: Vec<CheckpointId>,
        leftovers: Vec<CheckpointId>,
    ) -> Self {
        let index = expected
            .iter()
            .enumerate()
            .map(|(i, e)| (e.instance.clone(), i))
            .collect();
        let n = expected.len();
        Coordinator {
            inner: Mutex::new(Inner {
                finished: vec![None; n],
                last_id: after,
                complete,
                leftovers,
                ..Inner::default()
            }),
            wake: Condvar::new(),
            triggered: AtomicU64::new(0),
            store,
            clock,
            cfg,
            expected,
            index,
            commit: Box::new(|p| {
                crate::sink::commit_part(&super::fs::RealFs, std::path::Path::new(p))
            }),
            seed_bug_accept_stale: false,
            hook: None,
            base: after,
        }
    }

    /// Replaces how pre-committed sink files are committed (tests).
    pub fn with_commit(
        mut self,
        f: impl Fn(&str) -> Result<(), Error> + Send + Sync + 'static,
    ) -> Self {
        self.commit = Box::new(f);
        self
    }

    /// Gates triggers with `hook` (tests).
    pub fn with_trigger_hook(mut self, hook: Option<Arc<dyn TriggerHook>>) -> Self {
        self.hook = hook;
        self
    }

    /// Loom demonstration only: accept acks for checkpoints that are no longer pending (the
    /// seed's bug: a late ack resurrects a timed-out checkpoint).
    pub fn seed_bug_accept_stale(mut self) -> Self {
        self.seed_bug_accept_stale = true;
        self
    }

    /// The id after which this run's checkpoints are numbered (the newest found in the store).
    pub fn base(&self) -> CheckpointId {
        self.base
    }

    /// The newest triggered checkpoint (`base()` while none is): one load.
    #[inline]
    pub fn triggered(&self) -> CheckpointId {
        self.triggered.load(Ordering::Acquire).max(self.base)
    }

    /// Whether checkpoint `id` is pending (triggered, not complete, failed or abandoned).
    pub fn is_pending(&self, id: CheckpointId) -> bool {
        self.inner.lock().pending.contains_key(&id)
    }

    /// The pending checkpoints' ids (introspection for tests).
    pub fn pending_ids(&self) -> Vec<CheckpointId> {
        self.inner.lock().pending.keys().copied().collect()
    }

    /// The complete checkpoints in the store, ascending.
    pub fn complete_ids(&self) -> Vec<CheckpointId> {
        self.inner.lock().complete.clone()
    }

    /// Every checkpoint's outcome so far.
    pub fn stats(&self) -> Vec<CheckpointStats> {
        self.inner.lock().stats.clone()
    }

    /// Which acks checkpoint `id` has received (introspection for tests).
    pub fn acked(&self, id: CheckpointId) -> Vec<InstanceId> {
        let g = self.inner.lock();
        g.pending
            .get(&id)
            .map(|p| {
                p.acks
                    .iter()
                    .enumerate()
                    .filter(|(_, a)| a.is_some())
                    .map(|(i, _)| self.expected[i].instance.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The error that fails the run, if any (taken).
    pub fn take_error(&self) -> Option<Error> {
        self.inner.lock().error.take()
    }

    /// Records instance `who`'s acknowledgement of checkpoint `id`. `Err(Stale)` when `id` is
    /// no longer pending: the caller discards its file.
    pub fn ack(&self, id: CheckpointId, who: &InstanceId, ack: Ack) -> Result<(), Stale> {
        let Some(&i) = self.index.get(who) else {
            return Err(Stale);
        };
        let mut g = self.inner.lock();
        let ready = {
            let inner = &mut *g;
            let p = match inner.pending.get_mut(&id) {
                Some(p) if !p.completing => p,
                Some(_) => return Err(Stale),
                None if self.seed_bug_accept_stale => {
                    // The seeded bug: a late ack recreates the checkpoint.
                    inner.pending.entry(id).or_insert_with(|| Pending {
                        started: self.clock.now(),
                        acks: vec![None; self.expected.len()],
                        completing: false,
                    })
                }
                None => return Err(Stale),
            };
            p.acks[i] = Some(ack);
            Self::ready(p, &inner.finished)
        };
        drop(g);
        if ready {
            self.wake.notify_all();
        }
        Ok(())
    }

    /// Instance `who` declines checkpoint `id` (its alignment buffer overflowed): the
    /// checkpoint fails at once.
    pub fn decline(&self, id: CheckpointId, who: &InstanceId, reason: &str) {
        let mut g = self.inner.lock();
        if g.pending.get(&id).is_some_and(|p| !p.completing) {
            let now = self.clock.now();
            self.fail_locked(&mut g, id, now, format!("declined by {who}: {reason}"));
        }
        drop(g);
        self.wake.notify_all();
    }

    /// Instance `who` ended normally with this final state: it counts as its ack of every
    /// pending and later checkpoint.
    pub fn finish(&self, who: &InstanceId, state: &InstanceState, bytes: Vec<u8>) {
        let Some(&i) = self.index.get(who) else {
            return;
        };
        let f = Finished {
            bytes: Arc::new(bytes),
            key_groups: state.key_groups,
            positions: state.positions.clone(),
            precommitted: state.precommitted.clone(),
        };
        let mut g = self.inner.lock();
        g.finished[i] = Some(f);
        let any_ready = g
            .pending
            .values()
            .any(|p| !p.completing && Self::ready(p, &g.finished));
        drop(g);
        if any_ready {
            self.wake.notify_all();
        }
    }

    /// Whether every instance off the dead-letter side has acked checkpoint `id` (or ended),
    /// or `id` is no longer pending: the dead-letter head may then send its barrier.
    pub fn main_side_done(&self, id: CheckpointId) -> bool {
        let g = self.inner.lock();
        match g.pending.get(&id) {
            None => true,
            Some(p) => {
                self.expected.iter().enumerate().all(|(i, e)| {
                    e.dead_letter_side || p.acks[i].is_some() || g.finished[i].is_some()
                })
            }
        }
    }

    fn ready(p: &Pending, finished: &[Option<Finished>]) -> bool {
        p.acks
            .iter()
            .zip(finished)
            .all(|(a, f)| a.is_some() || f.is_some())
    }

    /// Fails pending checkpoint `id` under the lock: removed from memory at once, its directory
    /// queued for discard, counted against `tolerable_failures`.
    fn fail_locked(&self, g: &mut Inner, id: CheckpointId, now: Duration, reason: String) {
        let Some(p) = g.pending.remove(&id) else {
            return;
        };
        log::warn!("checkpoint {id} failed: {reason}");
        g.actions.push(Action::Discard(id));
        g.last_end = Some(now);
        g.consecutive_failures += 1;
        g.stats.push(p.failed(id, now, reason.clone()));
        if g.consecutive_failures > self.cfg.tolerable_failures && g.error.is_none() {
            g.error = Some(Error::CheckpointFailed {
                id,
                failures: g.consecutive_failures,
                tolerable: self.cfg.tolerable_failures,
                reason,
            });
        }
    }

    /// One round of the coordinator's work: under the lock, fail the checkpoints past their
    /// timeout, take the ready ones for completion and trigger a new one if it is time; then,
    /// outside it, do the I/O. Returns how long the thread may sleep before the next round
    /// (`None`: until woken).
    pub fn step(&self) -> Option<Duration> {
        let now = self.clock.now();
        let mut actions;
        {
            let mut g = self.inner.lock();
            // Ready ones first: a checkpoint whose last ack was recorded is complete in
            // substance, whatever the clock says now; only the others can time out.
            let inner = &mut *g;
            for (id, p) in inner.pending.iter_mut() {
                if !p.completing && Self::ready(p, &inner.finished) {
                    p.completing = true;
                    inner.actions.push(Action::Complete(*id));
                }
            }
            let expired: Vec<CheckpointId> = g
                .pending
                .iter()
                .filter(|(_, p)| !p.completing && now.saturating_sub(p.started) >= self.cfg.timeout)
                .map(|(id, _)| *id)
                .collect();
            for id in expired {
                let reason = format!("timed out after {:?}", self.cfg.timeout);
                self.fail_locked(&mut g, id, now, reason);
            }
            if self.due(&g, now) {
                g.last_id += 1;
                let id = g.last_id;
                g.last_trigger = Some(now);
                g.pending.insert(
                    id,
                    Pending {
                        started: now,
                        acks: vec![None; self.expected.len()],
                        completing: false,
                    },
                );
                // Begin before anything else of this round: the trigger is published only once
                // the checkpoint's place exists.
                g.actions.insert(0, Action::Begin(id));
            }
            actions = std::mem::take(&mut g.actions);
        }
        // Completions after begins and discards: order within the round as queued.
        actions.sort_by_key(|a| match a {
            Action::Begin(_) => 0,
            Action::Discard(_) => 1,
            Action::Complete(_) => 2,
        });
        for a in actions {
            let r = match a {
                Action::Begin(id) => self.store.begin(id).map(|()| {
                    self.triggered.store(id, Ordering::Release);
                    if let Some(h) = &self.hook {
                        h.triggered(id);
                    }
                }),
                Action::Discard(id) => self.store.discard(id),
                Action::Complete(id) => self.complete(id),
            };
            if let Err(e) = r {
                let mut g = self.inner.lock();
                if g.error.is_none() {
                    g.error = Some(e);
                }
            }
        }
        self.next_wake()
    }

    fn due(&self, g: &Inner, now: Duration) -> bool {
        if g.stopping || g.error.is_some() || g.pending.len() >= self.cfg.max_concurrent {
            return false;
        }
        let after_trigger = g
            .last_trigger
            .map_or(true, |t| now >= t + self.cfg.interval);
        let after_end = g.last_end.map_or(true, |t| now >= t + self.cfg.min_pause);
        after_trigger
            && after_end
            && self
                .hook
                .as_ref()
                .map_or(true, |h| h.may_trigger(g.last_id + 1))
    }

    fn next_wake(&self) -> Option<Duration> {
        let now = self.clock.now();
        let g = self.inner.lock();
        let mut at: Option<Duration> = None;
        let mut consider = |t: Duration| at = Some(at.map_or(t, |a| a.min(t)));
        for p in g.pending.values() {
            if !p.completing {
                consider(p.started + self.cfg.timeout);
            }
        }
        if !g.stopping && g.error.is_none() && g.pending.len() < self.cfg.max_concurrent {
            let t = g.last_trigger.map_or(now, |t| t + self.cfg.interval);
            let e = g.last_end.map_or(now, |t| t + self.cfg.min_pause);
            // A trigger the hook holds back is polled every millisecond, not spun on.
            let poll = if self.hook.is_some() {
                now + Duration::from_millis(1)
            } else {
                now
            };
            consider(t.max(e).max(poll));
        }
        at.map(|t| t.saturating_sub(now))
    }

    /// Completes checkpoint `id` (taken by `step`): the finished instances' files, the
    /// manifest, then the record, the sinks' commits and retention. No lock held during I/O.
    fn complete(&self, id: CheckpointId) -> Result<(), Error> {
        let (acks, finished, started) = {
            let g = self.inner.lock();
            let Some(p) = g.pending.get(&id) else {
                return Ok(());
            };
            (p.acks.clone(), g.finished.clone(), p.started)
        };
        let mut instances = Vec::with_capacity(self.expected.len());
        let mut bytes = 0u64;
        let mut slowest: Option<(u64, String)> = None;
        for (i, e) in self.expected.iter().enumerate() {
            let entry = match (&acks[i], &finished[i]) {
                (Some(a), _) => {
                    if a.align_ns > 0 && slowest.as_ref().map_or(true, |(n, _)| a.align_ns > *n) {
                        slowest = Some((a.align_ns, e.instance.to_string()));
                    }
                    InstanceEntry {
                        instance: e.instance.clone(),
                        fingerprint: e.fingerprint.clone(),
                        stateful: e.stateful,
                        file: a.file.clone(),
                        key_groups: a.key_groups,
                        positions: a.positions.clone(),
                        precommitted: a.precommitted.clone(),
                    }
                }
                (None, Some(f)) => {
                    let file = self.store.put(
                        id,
                        &super::store::state_file_name(&e.instance),
                        &f.bytes,
                    )?;
                    InstanceEntry {
                        instance: e.instance.clone(),
                        fingerprint: e.fingerprint.clone(),
                        stateful: e.stateful,
                        file,
                        key_groups: f.key_groups,
                        positions: f.positions.clone(),
                        precommitted: f.precommitted.clone(),
                    }
                }
                (None, None) => {
                    unreachable!("checkpoint {id} taken for completion while incomplete")
                }
            };
            bytes += entry.file.size;
            instances.push(entry);
        }
        instances.sort_by(|a, b| a.instance.cmp(&b.instance));
        let manifest = Manifest {
            format: super::store::FORMAT,
            id,
            created_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            max_parallelism: self.cfg.max_parallelism,
            instances,
        };
        bytes += self.store.complete(&manifest)?;
        // Complete: record it.
        let now = self.clock.now();
        let (to_discard, superseded) = {
            let mut g = self.inner.lock();
            g.pending.remove(&id);
            g.consecutive_failures = 0;
            g.last_end = Some(now);
            g.complete.push(id);
            g.complete.sort_unstable();
            let (slow_ns, slow_name) = slowest.map_or((0, None), |(n, s)| (n, Some(s)));
            g.stats.push(CheckpointStats {
                id,
                outcome: Outcome::Completed,
                duration_ms: now.saturating_sub(started).as_millis() as u64,
                bytes,
                max_alignment_ms: slow_ns / 1_000_000,
                slowest_alignment: slow_name,
                error: None,
            });
            // Retention: keep the last `retain` complete ones; older ones, leftovers older than
            // this one, and pending ones older than it (superseded) go.
            let keep_from = g.complete.len().saturating_sub(self.cfg.retain);
            let mut gone: Vec<CheckpointId> = g.complete.drain(..keep_from).collect();
            let (old, young): (Vec<_>, Vec<_>) = g.leftovers.iter().partition(|l| **l < id);
            gone.extend(old);
            g.leftovers = young;
            let superseded: Vec<CheckpointId> = g
                .pending
                .iter()
                .filter(|(p, st)| **p < id && !st.completing)
                .map(|(p, _)| *p)
                .collect();
            for s in &superseded {
                if let Some(p) = g.pending.remove(s) {
                    g.stats
                        .push(p.failed(*s, now, format!("superseded by checkpoint {id}")));
                }
            }
            (gone, superseded)
        };
        // The checkpoint is durable: commit what its sinks pre-committed (idempotent).
        for e in &manifest.instances {
            for path in &e.precommitted {
                (self.commit)(path)?;
            }
        }
        for old in to_discard.into_iter().chain(superseded) {
            self.store.discard(old)?;
        }
        if let Some(h) = &self.hook {
            h.completed(id);
        }
        Ok(())
    }

    /// Stops triggering. With `success` (every instance ended), one last checkpoint made of the
    /// final snapshots is completed (so the sinks' last files are committed) — unless one
    /// pending already covers it — and pending ones complete; otherwise pending ones are
    /// abandoned and removed (the complete ones stay, for a resume).
    pub fn shutdown(&self, success: bool) -> Result<(), Error> {
        {
            let mut g = self.inner.lock();
            g.stopping = true;
        }
        if success {
            let all_finished = self.inner.lock().finished.iter().all(Option::is_some);
            if all_finished {
                // Every pending checkpoint is now ready; complete them and then a final one.
                let need_final = {
                    let mut g = self.inner.lock();
                    let none_pending = g.pending.is_empty();
                    if none_pending && g.error.is_none() {
                        g.last_id += 1;
                        let id = g.last_id;
                        let now = self.clock.now();
                        g.pending.insert(
                            id,
                            Pending {
                                started: now,
                                acks: vec![None; self.expected.len()],
                                completing: false,
                            },
                        );
                        Some(id)
                    } else {
                        None
                    }
                };
                if let Some(id) = need_final {
                    self.store.begin(id)?;
                }
                self.step();
            }
        }
        let abandoned: Vec<CheckpointId> = {
            let mut g = self.inner.lock();
            let ids: Vec<_> = g.pending.keys().copied().collect();
            let now = self.clock.now();
            for id in &ids {
                if let Some(p) = g.pending.remove(id) {
                    g.stats
                        .push(p.failed(*id, now, "abandoned: the run ended".into()));
                }
            }
            ids
        };
        for id in abandoned {
            self.store.discard(id)?;
        }
        if let Some(e) = self.take_error() {
            return Err(e);
        }
        Ok(())
    }

    /// Removes every checkpoint of the store that this coordinator knows of (a successful run
    /// without `retain_on_success`).
    pub fn remove_all(&self) -> Result<(), Error> {
        let ids: Vec<CheckpointId> = {
            let mut g = self.inner.lock();
            let mut ids = std::mem::take(&mut g.complete);
            ids.append(&mut g.leftovers);
            ids
        };
        for id in ids {
            self.store.discard(id)?;
        }
        Ok(())
    }

    /// The coordinator thread's loop: steps until stopped by [`stop_thread`](Self::stop_thread),
    /// sleeping on the condvar until the next deadline or a wake-up. A fatal error is handed to
    /// `fail` and ends the loop.
    pub fn run_thread(&self, stop: &crate::sync::AtomicBool, fail: &dyn Fn(Error)) {
        loop {
            if stop.load(Ordering::Acquire) {
                return;
            }
            let sleep = self.step();
            if let Some(e) = self.take_error() {
                fail(e);
                return;
            }
            let mut g = self.inner.lock();
            if stop.load(Ordering::Acquire) {
                return;
            }
            // Acks that became ready since `step` looked are seen now: nothing to wait for.
            let ready = g
                .pending
                .values()
                .any(|p| !p.completing && Self::ready(p, &g.finished));
            if ready || !g.actions.is_empty() {
                continue;
            }
            let sleep = sleep.unwrap_or(Duration::from_millis(100));
            let deadline = std::time::Instant::now() + sleep;
            self.wake.wait_until(&mut g, deadline);
        }
    }

    /// Wakes the thread so that it notices `stop`.
    pub fn stop_thread(&self, stop: &crate::sync::AtomicBool) {
        let _g = self.inner.lock();
        stop.store(true, Ordering::Release);
        self.wake.notify_all();
    }
}

/// A store in memory, for the crate's unit tests.
#[cfg(test)]
pub(crate) mod mem {
    use std::collections::BTreeMap;

    use super::super::store::{FileEntry, Listing, Manifest, Store};
    use super::super::CheckpointId;
    use crate::error::Error;
    use crate::sync::Mutex;

    /// A checkpoint's files and manifest.
    type Cp = (BTreeMap<String, Vec<u8>>, Option<Manifest>);

    /// Checkpoint id → (files, manifest).
    #[derive(Default)]
    pub(crate) struct MemStore {
        pub(crate) cps: Mutex<BTreeMap<CheckpointId, Cp>>,
    }

    fn gone(id: CheckpointId) -> Error {
        Error::Checkpoint {
            message: format!("checkpoint {id} is not there"),
        }
    }

    impl Store for MemStore {
        fn begin(&self, id: CheckpointId) -> Result<(), Error> {
            self.cps.lock().entry(id).or_default();
            Ok(())
        }
        fn put(&self, id: CheckpointId, name: &str, bytes: &[u8]) -> Result<FileEntry, Error> {
            let mut g = self.cps.lock();
            let c = g.get_mut(&id).ok_or_else(|| gone(id))?;
            c.0.insert(name.to_string(), bytes.to_vec());
            Ok(FileEntry {
                name: name.to_string(),
                size: bytes.len() as u64,
                crc32c: crc32c::crc32c(bytes),
            })
        }
        fn complete(&self, m: &Manifest) -> Result<u64, Error> {
            let mut g = self.cps.lock();
            let c = g.get_mut(&m.id).ok_or_else(|| gone(m.id))?;
            c.1 = Some(m.clone());
            Ok(1)
        }
        fn discard(&self, id: CheckpointId) -> Result<(), Error> {
            self.cps.lock().remove(&id);
            Ok(())
        }
        fn list(&self) -> Result<Vec<Listing>, Error> {
            Ok(self
                .cps
                .lock()
                .iter()
                .map(|(id, (files, m))| Listing {
                    id: *id,
                    created_ms: m.as_ref().map(|m| m.created_ms),
                    bytes: files.values().map(|f| f.len() as u64).sum(),
                    problem: m.is_none().then(|| "no manifest".to_string()),
                })
                .collect())
        }
        fn load(&self, id: CheckpointId) -> Result<Manifest, Error> {
            self.cps
                .lock()
                .get(&id)
                .and_then(|c| c.1.clone())
                .ok_or_else(|| gone(id))
        }
        fn read(&self, id: CheckpointId, entry: &FileEntry) -> Result<Vec<u8>, Error> {
            self.cps
                .lock()
                .get(&id)
                .and_then(|c| c.0.get(&entry.name).cloned())
                .ok_or_else(|| gone(id))
        }
    }
}
