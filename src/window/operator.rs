//! The keyed window state machine: records and watermarks in, window results and late records
//! out. Single-threaded and free of I/O, so that it can be tested against a brute-force
//! reference and then run inside a stage (one instance per key partition).
//!
//! Rules (see docs/semantics.md):
//! - a window *fires* when the watermark reaches its end (`watermark >= end`);
//! - its state is kept until `watermark >= end + allowed_lateness`, then freed;
//! - a record for a window that has fired but is still kept updates it, and the new result is
//!   emitted marked as an update;
//! - a record whose every window has been freed is *late*: it is returned as
//!   [`WindowOutput::Late`] and counted, never silently dropped. (A sliding-window record that
//!   is too late for some of its windows but not all is added to the live ones; each window it
//!   missed is counted in [`WindowState::missed_windows`].)

use std::collections::HashMap;
use std::hash::Hash;

use super::{Aggregate, Session, Sliding, Tumbling};
use crate::time::{Timestamp, Window};

/// Which windows a record belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Assigner {
    /// Fixed, non-overlapping windows.
    Tumbling(Tumbling),
    /// Fixed, overlapping windows.
    Sliding(Sliding),
    /// Activity-bounded windows that merge.
    Session(Session),
}

/// One window's result.
#[derive(Debug, Clone, PartialEq)]
pub struct WindowResult<K, O> {
    /// The key.
    pub key: K,
    /// The window.
    pub window: Window,
    /// The aggregate.
    pub value: O,
    /// True when this supersedes a result already emitted: for the same window (a late record
    /// within the allowed lateness) or for the windows in `replaces`.
    pub update: bool,
    /// Session windows whose results this one supersedes: they fired, then a late record merged
    /// them into this window. Empty for tumbling and sliding windows.
    pub replaces: Vec<Window>,
}

/// What the window state emits.
#[derive(Debug, Clone, PartialEq)]
pub enum WindowOutput<K, T, O> {
    /// A window result.
    Result(WindowResult<K, O>),
    /// A record too late for every window it belongs to.
    Late {
        /// Its key.
        key: K,
        /// Its event time.
        time: Timestamp,
        /// The record.
        record: T,
    },
}

struct Slot<Acc> {
    window: Window,
    acc: Acc,
    fired: bool,
    /// Windows already emitted that were merged into this one (sessions only).
    replaces: Vec<Window>,
}

/// Keyed window state for one stage instance.
pub struct WindowState<K, T, A: Aggregate<T>> {
    assigner: Assigner,
    agg: A,
    lateness: i64,
    watermark: Timestamp,
    /// Per key, its live windows sorted by window.
    keys: HashMap<K, Vec<Slot<A::Acc>>>,
    live: usize,
    late: u64,
    missed: u64,
    outside: u64,
}

impl<K, T, A> WindowState<K, T, A>
where
    K: Hash + Eq + Clone,
    A: Aggregate<T>,
{
    /// Empty state; `allowed_lateness` in ms (0 frees a window as soon as it fires).
    pub fn new(assigner: Assigner, agg: A, allowed_lateness: i64) -> Self {
        WindowState {
            assigner,
            agg,
            lateness: allowed_lateness.max(0),
            watermark: Timestamp::MIN,
            keys: HashMap::new(),
            live: 0,
            late: 0,
            missed: 0,
            outside: 0,
        }
    }

    /// The current watermark (`Timestamp::MIN` before the first).
    pub fn watermark(&self) -> Timestamp {
        self.watermark
    }

    /// Windows currently held (0 once every window has been freed).
    pub fn live_windows(&self) -> usize {
        self.live
    }

    /// Records returned as late so far.
    pub fn late_records(&self) -> u64 {
        self.late
    }

    /// Windows that on-time records of sliding windows could not join because they were freed.
    pub fn missed_windows(&self) -> u64 {
        self.missed
    }

    /// Records that belong to no window at all (a sliding slide longer than its size leaves
    /// gaps between windows).
    pub fn outside_windows(&self) -> u64 {
        self.outside
    }

    fn freed(&self, w: &Window) -> bool {
        w.end.saturating_add(self.lateness) <= self.watermark
    }

    /// Returns a record too late for every window it belongs to, and counts it.
    fn late(
        &mut self,
        key: K,
        time: Timestamp,
        record: T,
        out: &mut Vec<WindowOutput<K, T, A::Out>>,
    ) {
        self.late += 1;
        out.push(WindowOutput::Late { key, time, record });
    }

    fn result(&self, key: &K, slot: &Slot<A::Acc>, update: bool) -> WindowOutput<K, T, A::Out> {
        WindowOutput::Result(WindowResult {
            key: key.clone(),
            window: slot.window,
            value: self.agg.result(&slot.acc),
            update: update || !slot.replaces.is_empty(),
            replaces: slot.replaces.clone(),
        })
    }

    /// Adds one record at event time `t`; appends any result it changes (and the record itself
    /// when it is late) to `out`.
    pub fn on_record(
        &mut self,
        key: K,
        t: Timestamp,
        record: T,
        out: &mut Vec<WindowOutput<K, T, A::Out>>,
    ) {
        match self.assigner {
            Assigner::Tumbling(a) => self.add_fixed(key, t, record, &[a.assign(t)], out),
            Assigner::Sliding(a) => self.add_fixed(key, t, record, &a.assign(t), out),
            Assigner::Session(a) => self.add_session(key, t, record, a.assign(t), out),
        }
    }

    fn add_fixed(
        &mut self,
        key: K,
        t: Timestamp,
        record: T,
        windows: &[Window],
        out: &mut Vec<WindowOutput<K, T, A::Out>>,
    ) {
        if windows.is_empty() {
            self.outside += 1;
            return;
        }
        let live: Vec<Window> = windows.iter().copied().filter(|w| !self.freed(w)).collect();
        if live.is_empty() {
            return self.late(key, t, record, out);
        }
        self.missed += (windows.len() - live.len()) as u64;
        let wm = self.watermark;
        let slots = self.keys.entry(key.clone()).or_default();
        let mut emit = Vec::new();
        for w in live {
            let i = match slots.binary_search_by(|s| s.window.cmp(&w)) {
                Ok(i) => i,
                Err(i) => {
                    let acc = self.agg.create();
                    slots.insert(
                        i,
                        Slot {
                            window: w,
                            acc,
                            fired: false,
                            replaces: Vec::new(),
                        },
                    );
                    self.live += 1;
                    i
                }
            };
            let slot = &mut slots[i];
            self.agg.add(&mut slot.acc, &record);
            if w.end <= wm {
                // The window already passed: emit now, as an update if it was emitted before.
                emit.push((w, slot.fired));
                slot.fired = true;
            }
        }
        // By window, not index: inserting a later window may have shifted the slots.
        let slots = &self.keys[&key];
        for (w, update) in emit {
            let i = slots
                .binary_search_by(|s| s.window.cmp(&w))
                .expect("just inserted");
            out.push(self.result(&key, &slots[i], update));
        }
    }

    fn add_session(
        &mut self,
        key: K,
        t: Timestamp,
        record: T,
        w: Window,
        out: &mut Vec<WindowOutput<K, T, A::Out>>,
    ) {
        if self.freed(&w) {
            return self.late(key, t, record, out);
        }
        let slots = self.keys.entry(key.clone()).or_default();
        let mut merged = Slot {
            window: w,
            acc: self.agg.create(),
            fired: false,
            replaces: Vec::new(),
        };
        self.agg.add(&mut merged.acc, &record);
        let mut absorbed = 0;
        let mut kept = Vec::with_capacity(slots.len() + 1);
        for s in slots.drain(..) {
            if s.window.overlaps(&merged.window) {
                merged.window = merged.window.cover(&s.window);
                self.agg.merge(&mut merged.acc, s.acc);
                merged.replaces.extend(s.replaces);
                if s.fired {
                    merged.replaces.push(s.window);
                }
                absorbed += 1;
            } else {
                kept.push(s);
            }
        }
        self.live -= absorbed;
        // A window that grew in place is an update of itself, not a replacement.
        let window = merged.window;
        if merged.replaces.contains(&window) {
            merged.replaces.retain(|r| *r != window);
            merged.fired = true;
        }
        let i = kept.partition_point(|s| s.window < merged.window);
        kept.insert(i, merged);
        self.live += 1;
        *slots = kept;
        let slot = &mut slots[i];
        if slot.window.end <= self.watermark {
            let update = slot.fired;
            slot.fired = true;
            let slot = &self.keys[&key][i];
            out.push(self.result(&key, slot, update));
            self.keys.get_mut(&key).expect("present")[i]
                .replaces
                .clear();
        }
    }

    /// Advances the watermark (a lower one is ignored): fires every window whose end it
    /// reaches, then frees every window past its allowed lateness.
    pub fn on_watermark(&mut self, wm: Timestamp, out: &mut Vec<WindowOutput<K, T, A::Out>>) {
        if wm <= self.watermark {
            return;
        }
        self.watermark = wm;
        let lateness = self.lateness;
        let agg = &self.agg;
        let mut freed = 0;
        self.keys.retain(|key, slots| {
            for s in slots.iter_mut() {
                if !s.fired && s.window.end <= wm {
                    s.fired = true;
                    let replaces = std::mem::take(&mut s.replaces);
                    out.push(WindowOutput::Result(WindowResult {
                        key: key.clone(),
                        window: s.window,
                        value: agg.result(&s.acc),
                        update: !replaces.is_empty(),
                        replaces,
                    }));
                }
            }
            let before = slots.len();
            slots.retain(|s| s.window.end.saturating_add(lateness) > wm);
            freed += before - slots.len();
            !slots.is_empty()
        });
        self.live -= freed;
    }
}
