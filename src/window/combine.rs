//! The window combiner: the tail of the stage that feeds a window stage. It generates that
//! instance's watermarks and, for tumbling windows, pre-aggregates each `(key, window)`
//! locally, sending one partial accumulator per key and window instead of every record.
//!
//! See `src/window/README.md` ("Why the combiner changes no result") for the invariants. In
//! short:
//!
//! - A record is combined only while every window it belongs to ends after the last watermark
//!   this instance sent; otherwise it goes on as it is, and the window stage decides, as
//!   without a combiner, whether it is late, an update, or on time.
//! - Before sending a watermark `wm`, the combiner sends the partials of every window ending at
//!   or before `wm`, in window order and, within a window, in the order its keys were first
//!   seen. A window stage's watermark is the minimum over its inputs, so it cannot pass the end
//!   of a window before every input's partials for it have arrived: partials are never late.
//! - It also sends everything it holds at a checkpoint barrier, at the end of input, when the
//!   stage's input is idle and inputs may be released as idle (`Options::idle_timeout`), and
//!   when it holds more than [`MAX_ENTRIES`] partials (memory stays bounded). Sliding windows
//!   (a record is in several: the accounts would count it once per window), sessions (they
//!   merge per key), and windows whose state is checkpointed (see `window_with`) are not
//!   combined: every record goes on as it is.
//!
//! The partial of a `(key, window)` counts its records, so the stages' accounts (records
//! handed on and taken) count records, not messages.

use std::collections::VecDeque;
use std::hash::Hash;
use std::sync::Arc;

use super::operator::FixedKeys;
use super::stage::EventTime;
use super::{Aggregate, Assigner, BoundedOutOfOrderness};
use crate::channel::ChannelTail;
use crate::checkpoint::state::InstanceState;
use crate::checkpoint::StateSupport;
use crate::metrics::InstanceMetrics;
use crate::operator::{Emit, Halt};
use crate::runtime::{Cx, Tail};
use crate::sync::Ordering;
use crate::time::{Timestamp, Window};

/// What travels from the stage feeding a window to the window stage.
pub(crate) enum WindowIn<K, T, Acc> {
    /// A record, as it is.
    Record(K, T),
    /// What `records` records of `key` in `window` added up to.
    Partial {
        key: K,
        window: Window,
        acc: Acc,
        records: u32,
    },
}

impl<K, T, Acc> WindowIn<K, T, Acc> {
    /// The key (for routing).
    pub(crate) fn key(&self) -> &K {
        match self {
            WindowIn::Record(k, _) | WindowIn::Partial { key: k, .. } => k,
        }
    }
}

/// The most partials one combiner holds before it sends them all. At 10,000 keys and two or
/// three open windows a combiner holds about 30,000; this bound only stops a key space or a
/// disorder far larger than that from growing without limit.
pub(crate) const MAX_ENTRIES: usize = 1 << 18;

/// One open window's partials: per key, the accumulator and how many records it holds.
type Partials<K, Acc> = FixedKeys<K, Acc, u32>;

/// How many emptied key maps a combiner keeps for reuse.
const SPARE_MAPS: usize = 2;

/// The tail of one instance of the stage feeding a window stage (see the module docs).
pub(crate) struct CombineTail<K, T, A: Aggregate<T>, E> {
    inner: ChannelTail<WindowIn<K, T, A::Acc>>,
    time: E,
    agg: Arc<A>,
    assigner: Assigner,
    /// Whether records are pre-aggregated at all (not for sessions or checkpointed windows).
    combine: bool,
    /// Whether partials are sent when the input is idle (inputs can be released as idle).
    flush_on_idle: bool,
    hash: fn(&K) -> u64,
    gen: BoundedOutOfOrderness,
    /// The last watermark sent.
    sent: Timestamp,
    /// Records emitted since the last watermark check, up to the last time `countdown` was
    /// armed (see [`since`](Self::since)).
    since: usize,
    /// Records left until `tick` must run: the watermark's turn, or sooner when a partial is
    /// due to be sent (`force`). One decrement and one test per record.
    countdown: usize,
    /// What `countdown` was armed with.
    armed: usize,
    every: usize,
    /// Open windows, ascending, each with its keys' partials (accumulator, records).
    open: VecDeque<(Window, Partials<K, A::Acc>)>,
    spare: Vec<Partials<K, A::Acc>>,
    /// Partials held, over every open window.
    entries: usize,
    /// A partial's record count is near its limit: send them all after this record.
    must_send: bool,
    metrics: Arc<InstanceMetrics>,
}

/// What a combiner records at a barrier (part `tail.watermark`, as the plain generator did).
#[derive(serde::Serialize, serde::Deserialize)]
struct GeneratorState {
    /// The newest event time seen and the last watermark computed (ms).
    gen: (Option<i64>, i64),
    /// The last watermark sent (ms).
    sent: i64,
    /// Records emitted since the last send.
    since: usize,
}

impl<K, T, A, E> CombineTail<K, T, A, E>
where
    K: Hash + Eq + Clone + Send,
    T: Send,
    A: Aggregate<T>,
    E: EventTime<T>,
{
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        cx: &Cx,
        inner: ChannelTail<WindowIn<K, T, A::Acc>>,
        time: E,
        agg: Arc<A>,
        assigner: Assigner,
        combine: bool,
        hash: fn(&K) -> u64,
        bound_ms: i64,
    ) -> Self {
        CombineTail {
            inner,
            time,
            agg,
            combine: combine && matches!(assigner, Assigner::Tumbling(_)),
            assigner,
            flush_on_idle: cx.run.opts.idle_timeout.is_some(),
            hash,
            gen: BoundedOutOfOrderness::new(bound_ms),
            sent: Timestamp::MIN,
            since: 0,
            countdown: cx.run.opts.watermark_every.max(1),
            armed: cx.run.opts.watermark_every.max(1),
            every: cx.run.opts.watermark_every.max(1),
            open: VecDeque::new(),
            spare: Vec::new(),
            entries: 0,
            must_send: false,
            metrics: Arc::clone(&cx.metrics),
        }
    }

    /// The same tail, checking its watermark every `n` records (tests).
    #[cfg(test)]
    pub(crate) fn every(mut self, n: usize) -> Self {
        self.every = n.max(1);
        self.set_since(0);
        self
    }

    /// Records emitted since the last watermark check.
    fn since(&self) -> usize {
        self.since + (self.armed - self.countdown)
    }

    /// Sets the records since the last watermark check, and arms `countdown` for the rest.
    fn set_since(&mut self, since: usize) {
        self.since = since;
        self.armed = self.every.saturating_sub(since).max(1);
        self.countdown = self.armed;
    }

    /// Makes `tick` run after the current record.
    #[cold]
    fn force(&mut self) {
        let since = self.since();
        self.since = since;
        // `emit` counts the current record down after this: `tick` runs then, and counts it.
        self.armed = 1;
        self.countdown = 1;
    }

    #[inline(always)]
    fn raw(&mut self, key: K, record: T) -> Result<(), Halt> {
        let h = (self.hash)(&key);
        self.inner.emit_hashed_by(h, WindowIn::Record(key, record))
    }

    /// Adds `record` to the partial of `key` in open window `i`.
    #[inline(always)]
    fn add(&mut self, i: usize, key: &K, record: &T) {
        let agg = &*self.agg;
        let (new, full) = self.open[i].1.update_with(
            key,
            || (agg.create(), 0),
            |acc, n, new| {
                agg.add(acc, record);
                *n += 1;
                (new, *n >= u32::MAX / 2)
            },
        );
        if new {
            self.entries += 1;
            if self.entries > MAX_ENTRIES {
                self.force();
            }
        }
        // A record count near its limit: send everything after this record.
        if full {
            self.must_send = true;
            self.force();
        }
    }

    /// The position of open window `w`, inserted if absent.
    fn index(&mut self, w: Window) -> usize {
        match self.open.binary_search_by(|(x, _)| x.cmp(&w)) {
            Ok(i) => i,
            Err(i) => {
                let keys = self.spare.pop().unwrap_or_default();
                self.open.insert(i, (w, keys));
                i
            }
        }
    }

    /// Sends the partials of the windows ending at or before `upto`, oldest first.
    fn send_partials(&mut self, upto: Timestamp) -> Result<(), Halt> {
        while self.open.front().is_some_and(|(w, _)| w.end <= upto) {
            let (window, mut keys) = self.open.pop_front().expect("front exists");
            self.entries -= keys.len();
            let (hash, inner, metrics) = (self.hash, &mut self.inner, &self.metrics);
            let result = keys.drain_ordered_with(|key, acc, records| {
                // The channel counts one record per message: the partial stands for
                // `records`.
                InstanceMetrics::add(&metrics.records_out, u64::from(records) - 1);
                let h = hash(&key);
                inner.emit_hashed_by(
                    h,
                    WindowIn::Partial {
                        key,
                        window,
                        acc,
                        records,
                    },
                )
            });
            if self.spare.len() < SPARE_MAPS {
                self.spare.push(keys);
            }
            result?;
        }
        Ok(())
    }

    /// Sends the watermark if it rose (after the partials it closes); while partials are held
    /// and it did not rise, sends the last one again, so the window stage keeps hearing from
    /// this input.
    fn send_watermark(&mut self) -> Result<(), Halt> {
        self.set_since(0);
        let wm = self.gen.current();
        if wm > self.sent {
            self.send_partials(wm)?;
            self.sent = wm;
            self.inner.send_watermark(wm)?;
        } else if self.entries > 0 {
            self.inner.send_watermark(self.sent)?;
        }
        Ok(())
    }
}

impl<K, T, A, E> Emit<(K, T)> for CombineTail<K, T, A, E>
where
    K: Hash + Eq + Clone + Send,
    T: Send,
    A: Aggregate<T>,
    E: EventTime<T>,
{
    #[inline]
    fn emit(&mut self, (key, record): (K, T)) -> Result<(), Halt> {
        // A record without a readable time does not move the watermark; the window stage
        // applies its error policy to it.
        let Ok(t) = self.time.time(&record) else {
            return self.raw(key, record);
        };
        self.gen.observe(t);
        // Not combined (sliding windows, sessions, checkpointed windows): every record goes on
        // as it is, inline, to the window stage.
        if !self.combine {
            self.raw(key, record)?;
        } else {
            self.emit_combined(key, record, t)?;
        }
        self.countdown -= 1;
        if self.countdown == 0 {
            self.tick()?;
        }
        Ok(())
    }
}

impl<K, T, A, E> CombineTail<K, T, A, E>
where
    K: Hash + Eq + Clone + Send,
    T: Send,
    A: Aggregate<T>,
    E: EventTime<T>,
{
    /// `emit` of a record with time `t` while records are combined.
    #[inline(always)]
    fn emit_combined(&mut self, key: K, record: T, t: Timestamp) -> Result<(), Halt> {
        // The common cases, kept small so that they stay fast: the record falls in the newest
        // open window, or (it is out of order by less than a window) in the one before it.
        // (Every open window is on time: it is dropped from `open` when the watermark sent
        // passes its end.)
        let n = self.open.len();
        if n > 0 && self.open[n - 1].0.contains(t) {
            self.add(n - 1, &key, &record);
        } else if n > 1 && self.open[n - 2].0.contains(t) {
            self.add(n - 2, &key, &record);
        } else {
            self.emit_other(key, record, t)?;
        }
        Ok(())
    }

    /// A record outside the newest two open windows while combining: combined into an older or
    /// a new window, or (late for this combiner) sent as it is.
    #[inline(never)]
    fn emit_other(&mut self, key: K, record: T, t: Timestamp) -> Result<(), Halt> {
        let combined = match self.assigner {
            Assigner::Tumbling(a) => {
                // Not in the newest two windows (`emit` looked): an older or a new one.
                let w = a.assign(t);
                let i = (w.end > self.sent).then(|| self.index(w));
                if let Some(i) = i {
                    self.add(i, &key, &record);
                }
                i.is_some()
            }
            // Never combined (`new` turns `combine` off for them): a sliding record is in
            // several windows, and its partials would count it once each where the accounts
            // count records.
            Assigner::Sliding(_) | Assigner::Session(_) => false,
        };
        if combined {
            Ok(())
        } else {
            self.raw(key, record)
        }
    }

    /// Every `every` records: the watermark; at the cap: every partial.
    #[inline(never)]
    fn tick(&mut self) -> Result<(), Halt> {
        let since = self.since();
        if since >= self.every {
            self.send_watermark()?;
        } else {
            self.set_since(since);
        }
        if self.entries > MAX_ENTRIES || self.must_send {
            self.must_send = false;
            self.send_partials(Timestamp::MAX)?;
        }
        Ok(())
    }
}

impl<K, T, A, E> Tail<(K, T)> for CombineTail<K, T, A, E>
where
    K: Hash + Eq + Clone + Send,
    T: Send,
    A: Aggregate<T>,
    A::Acc: Send,
    E: EventTime<T>,
{
    fn before_batch(&mut self, now: u64) {
        self.inner.before_batch(now)
    }
    fn after_batch(&mut self, _cx: &Cx) -> Result<(), Halt> {
        // The windows this combiner holds partials of: the producing stage's `open_windows`.
        if self.combine {
            let held = self.open.len() as u64;
            self.metrics.open_windows.store(held, Ordering::Relaxed);
        }
        Ok(())
    }
    fn barrier(
        &mut self,
        cx: &Cx,
        id: crate::checkpoint::CheckpointId,
        state: &mut InstanceState,
    ) -> Result<(), Halt> {
        // A checkpointed window is never combined (see the module docs), so nothing is held
        // here; sending it all keeps a barrier's meaning if that changes.
        self.send_partials(Timestamp::MAX)?;
        // No watermark is sent here: which records are late must not depend on when
        // checkpoints happen.
        self.inner.barrier(cx, id, state)?;
        state.put(
            "tail.watermark",
            &GeneratorState {
                gen: self.gen.save(),
                sent: self.sent.0,
                since: self.since(),
            },
        )?;
        Ok(())
    }
    fn restore(&mut self, cx: &Cx, state: &InstanceState) -> Result<(), Halt> {
        self.inner.restore(cx, state)?;
        if let Some(g) = state.get::<GeneratorState>("tail.watermark")? {
            self.gen.load(g.gen);
            self.sent = Timestamp(g.sent);
            self.set_since(g.since);
        }
        Ok(())
    }
    fn state_support(&self) -> StateSupport {
        match self.inner.state_support() {
            StateSupport::Stateless => StateSupport::Snapshots,
            other => other,
        }
    }
    fn watermark(&mut self, _cx: &Cx, _at: Timestamp) -> Result<(), Halt> {
        // Upstream watermarks are replaced by this generator's.
        Ok(())
    }
    fn pending_since(&self) -> Option<u64> {
        // Partials are not "pending" records: holding them is the point, and sending them on
        // a timer would make a float sum's grouping depend on timing.
        self.inner.pending_since()
    }
    fn flush(&mut self, cx: &Cx) -> Result<(), Halt> {
        if self.flush_on_idle {
            self.send_partials(Timestamp::MAX)?;
        }
        self.send_watermark()?;
        self.inner.flush(cx)
    }
    fn finish(&mut self, cx: &Cx) -> Result<(), Halt> {
        match self.send_partials(Timestamp::MAX) {
            Ok(()) | Err(Halt::Done) => {}
            Err(e) => return Err(e),
        }
        self.metrics.open_windows.store(0, Ordering::Relaxed);
        // End of stream is a watermark of +∞ at the consumer.
        self.inner.finish(cx)
    }
}
