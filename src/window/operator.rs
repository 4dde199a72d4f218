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

use std::collections::{BTreeMap, VecDeque};
use std::hash::{BuildHasher, Hash};

use hashbrown::HashTable;
use rustc_hash::FxHashMap;

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

/// A window as checkpoints store it: `(start, end)` in ms.
pub(crate) type WindowMs = (i64, i64);

fn to_ms(w: &Window) -> WindowMs {
    (w.start.0, w.end.0)
}

fn from_ms((start, end): WindowMs) -> Window {
    Window::new(Timestamp(start), Timestamp(end.max(start)))
}

/// One key's windows, as a checkpoint stores them (see [`WindowState::export`]).
///
/// With each window and timer goes the key's position among the window's keys (or the
/// timer's keys): the order results are emitted in, which a restore rebuilds.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct KeyWindows<Acc> {
    /// Tumbling or sliding windows holding this key: the window, the key's position among its
    /// keys, the key's accumulator.
    pub fixed: Vec<(WindowMs, u32, Acc)>,
    /// Session windows of this key, sorted.
    pub sessions: Vec<SessionSlot<Acc>>,
    /// The session timers naming this key: when due (ms), and the key's position among the
    /// keys due then.
    pub timers: Vec<(i64, u32)>,
}

/// A session window of one key, as a checkpoint stores it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct SessionSlot<Acc> {
    pub window: WindowMs,
    pub acc: Acc,
    pub fired: bool,
    pub replaces: Vec<WindowMs>,
}

/// What a window state holds besides its keys' windows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct WindowMeta {
    /// The watermark (ms; `i64::MIN` before the first).
    pub watermark: i64,
    pub late: u64,
    pub missed: u64,
    pub outside: u64,
}

/// One fixed window's keys: their accumulators in a hash table (one probe per record, as a
/// hand loop's map) and, beside it, the keys in first-seen order (the order results are emitted
/// and checkpoints record). An `IndexMap` keeps the same order but costs two dependent memory
/// accesses per lookup (its index table, then the entry); the order vector is only appended
/// to when a key is new and read once per firing.
///
/// `C` is a small value kept per key beside the accumulator: the window combiner's record count
/// (`u32`), nothing (`()`) elsewhere. The entry is one flat `(K, Acc, C)` tuple in a
/// `hashbrown::HashTable` rather than a `HashMap<K, (Acc, C)>`, whose entry nests the count in
/// the value and pads to the value's alignment: a `u32` key, an `f64` sum and a `u32` count
/// take 16 bytes flat and 24 nested. These loops are bound by the table's memory (the probe's
/// load of the bucket is most of their time); with 10,000 keys the table's 16,384 entries are
/// 256 KiB instead of 384, half of a 512 KiB L2 cache instead of three quarters. (A stand-alone
/// model of the combiner's loop over the peers' W2 input, 24 rounds on a noisy machine: the
/// `FxHashMap<u32, (f64, u32)>` at 224 ms (minimum) and 249 ms (first quartile), the same
/// nested entry in a `HashTable` at 210 and 228, the flat entry at 190 and 214.)
pub(crate) struct FixedKeys<K, Acc, C = ()> {
    table: HashTable<(K, Acc, C)>,
    order: Vec<K>,
}

impl<K, Acc, C> Default for FixedKeys<K, Acc, C> {
    fn default() -> Self {
        FixedKeys {
            table: HashTable::new(),
            order: Vec::new(),
        }
    }
}

/// The hash the table is probed with (rustc-hash's `FxHasher`, as `FxHashMap` uses).
#[inline(always)]
fn fx<K: Hash>(key: &K) -> u64 {
    rustc_hash::FxBuildHasher.hash_one(key)
}

impl<K, Acc, C> FixedKeys<K, Acc, C> {
    /// The bytes one key's entry takes in the table (besides its control byte).
    #[cfg(test)]
    pub(crate) const ENTRY_BYTES: usize = std::mem::size_of::<(K, Acc, C)>();
}

impl<K: Hash + Eq + Clone, Acc, C> FixedKeys<K, Acc, C> {
    pub(crate) fn len(&self) -> usize {
        self.order.len()
    }

    pub(crate) fn clear(&mut self) {
        self.table.clear();
        self.order.clear();
    }

    /// Runs `f` on the key's accumulator and extra value, made with `create` (and the key
    /// appended to the order) if the key is new, telling it whether it was. One probe when the
    /// key is there (most records). Always inlined: it is the per-record work of the window
    /// stage and of the combiners, and a call per record showed in profiles.
    #[inline(always)]
    pub(crate) fn update_with<R>(
        &mut self,
        key: &K,
        create: impl FnOnce() -> (Acc, C),
        f: impl FnOnce(&mut Acc, &mut C, bool) -> R,
    ) -> R {
        let h = fx(key);
        if let Some((_, acc, c)) = self.table.find_mut(h, |e| e.0 == *key) {
            return f(acc, c, false);
        }
        self.order.push(key.clone());
        let (acc, c) = create();
        let (_, acc, c) = self
            .table
            .insert_unique(h, (key.clone(), acc, c), |e| fx(&e.0))
            .into_mut();
        f(acc, c, true)
    }

    /// Takes every key, accumulator and extra value out, in first-seen order, handing each to
    /// `f` until it fails; the rest are dropped. Either way the map is left empty (with its
    /// capacity).
    pub(crate) fn drain_ordered_with<E>(
        &mut self,
        mut f: impl FnMut(K, Acc, C) -> Result<(), E>,
    ) -> Result<(), E> {
        for k in self.order.drain(..) {
            let Ok(entry) = self.table.find_entry(fx(&k), |e| e.0 == k) else {
                unreachable!("every ordered key has a value");
            };
            let ((key, acc, c), _) = entry.remove();
            if let Err(e) = f(key, acc, c) {
                self.table.clear();
                return Err(e);
            }
        }
        // Empty now, but removals can leave tombstones, which a refilled table would have to
        // rehash away; clearing resets its control bytes (a memset of one byte per bucket).
        self.table.clear();
        Ok(())
    }

    /// Keys and accumulators in first-seen order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&K, &Acc)> {
        self.order.iter().map(|k| {
            let Some((_, acc, _)) = self.table.find(fx(k), |e| e.0 == *k) else {
                unreachable!("every ordered key has a value");
            };
            (k, acc)
        })
    }
}

impl<K: Hash + Eq + Clone, Acc> FixedKeys<K, Acc> {
    /// [`update_with`](Self::update_with) without an extra value.
    #[inline(always)]
    pub(crate) fn update<R>(
        &mut self,
        key: &K,
        create: impl FnOnce() -> Acc,
        f: impl FnOnce(&mut Acc, bool) -> R,
    ) -> R {
        self.update_with(key, || (create(), ()), |acc, _, new| f(acc, new))
    }

    /// Inserts a key that is not there yet (a restore); false if it was.
    pub(crate) fn insert(&mut self, key: K, acc: Acc) -> bool {
        let h = fx(&key);
        if self.table.find(h, |e| e.0 == key).is_some() {
            return false;
        }
        self.order.push(key.clone());
        self.table.insert_unique(h, (key, acc, ()), |e| fx(&e.0));
        true
    }

    /// [`drain_ordered_with`](Self::drain_ordered_with) without an extra value.
    pub(crate) fn drain_ordered<E>(
        &mut self,
        mut f: impl FnMut(K, Acc) -> Result<(), E>,
    ) -> Result<(), E> {
        self.drain_ordered_with(|k, acc, ()| f(k, acc))
    }
}

/// How many emptied key maps a window state keeps for reuse.
const SPARE_MAPS: usize = 2;

/// Keyed window state for one stage instance.
///
/// Tumbling and sliding windows all have one size, so ordering them by start orders them by
/// end: they live in a map by window, each holding its keys. A watermark walks the front of
/// that map, firing the windows it reaches and freeing those past their lateness.
///
/// Session windows differ per key: per key, its live windows sorted; and a timer queue of
/// `(time, key)`: every session has a timer at its end (to fire it) and, once fired with a
/// non-zero lateness, one at `end + lateness` (to free it). Either way a watermark costs in
/// proportion to the windows it fires, not to the number of keys held.
pub struct WindowState<K, T, A: Aggregate<T>> {
    assigner: Assigner,
    agg: A,
    lateness: i64,
    watermark: Timestamp,
    /// Tumbling and sliding windows, sorted (by start, and so by end), each with its keys.
    /// Few are live at once and most records go to the newest, so a sorted deque searched from
    /// the back beats a tree.
    ///
    /// A fixed window has fired exactly when the watermark has reached its end (the watermark
    /// only rises and firing happens as it passes), so its keys need no flag of their own.
    ///
    /// Each window's keys are in first-seen order (the order its results are emitted in, which
    /// a checkpoint records): a hash map's order would depend on its history, and a restored
    /// run at parallelism 1 would emit one firing's results in another order.
    fixed: VecDeque<(Window, FixedKeys<K, A::Acc>)>,
    /// Emptied key maps of freed windows, kept (at most [`SPARE_MAPS`]) so that the next
    /// window starts at the size the last one reached instead of growing and rehashing again.
    spare: Vec<FixedKeys<K, A::Acc>>,
    /// The tumbling window of the last record (empty at first).
    last_tumbling: Window,
    keys: FxHashMap<K, Vec<Slot<A::Acc>>>,
    /// Timers by time. A session window that grows leaves a stale timer at its old end, which
    /// finds nothing to do when it comes due; they are bounded by the records of the last
    /// `gap + max_out_of_orderness` of event time.
    timers: BTreeMap<Timestamp, Vec<K>>,
    live: usize,
    late: u64,
    missed: u64,
    outside: u64,
    _record: std::marker::PhantomData<fn(&T)>,
}

impl<K, T, A: Aggregate<T>> std::fmt::Debug for WindowState<K, T, A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WindowState")
            .field("assigner", &self.assigner)
            .field("lateness", &self.lateness)
            .field("watermark", &self.watermark)
            .finish_non_exhaustive()
    }
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
            fixed: VecDeque::new(),
            spare: Vec::new(),
            last_tumbling: Window::new(Timestamp(0), Timestamp(0)),
            keys: FxHashMap::default(),
            timers: BTreeMap::new(),
            live: 0,
            late: 0,
            missed: 0,
            outside: 0,
            _record: std::marker::PhantomData,
        }
    }

    /// Changes the allowed lateness (ms) of a running state (a hot reload). Windows already
    /// freed stay freed; held ones are kept until the new lateness runs out, and those it has
    /// already run out for are freed at the next watermark.
    pub fn set_lateness(&mut self, allowed_lateness: i64) {
        let lateness = allowed_lateness.max(0);
        if lateness == self.lateness {
            return;
        }
        self.lateness = lateness;
        // Session timers are due at times that depend on the lateness: schedule them again.
        if !self.keys.is_empty() {
            self.timers.clear();
            let wm = self.watermark;
            for (key, slots) in &self.keys {
                for s in slots {
                    let at = Self::due(&s.window, wm, lateness);
                    self.timers.entry(at).or_default().push(key.clone());
                }
            }
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

    /// When a window's next timer is due: its end while it has not fired, else when its
    /// lateness runs out.
    fn due(w: &Window, watermark: Timestamp, lateness: i64) -> Timestamp {
        if w.end > watermark {
            w.end
        } else {
            w.end.saturating_add(lateness)
        }
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

    /// Adds one record at event time `t`; appends any result it changes (and the record itself
    /// when it is late) to `out`.
    #[inline]
    pub fn on_record(
        &mut self,
        key: K,
        t: Timestamp,
        record: T,
        out: &mut Vec<WindowOutput<K, T, A::Out>>,
    ) {
        match self.assigner {
            Assigner::Tumbling(a) => {
                // Most records fall in the window of the one before: skip the division.
                if !self.last_tumbling.contains(t) {
                    self.last_tumbling = a.assign(t);
                }
                let w = self.last_tumbling;
                // The common case, inline: the record's window has not fired, so it is not
                // freed or missed, and `add_fixed` would only fold the record into it.
                if w.end > self.watermark {
                    return self.fold_fixed(&key, w, |agg, acc| agg.add(acc, &record), out);
                }
                self.add_fixed(key, t, record, &[w], out)
            }
            Assigner::Sliding(a) => self.add_fixed(key, t, record, &a.assign(t), out),
            Assigner::Session(a) => self.add_session(key, t, record, a.assign(t), out),
        }
    }

    #[inline(never)]
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
        let gone = windows.iter().filter(|w| self.freed(w)).count();
        if gone == windows.len() {
            return self.late(key, t, record, out);
        }
        self.missed += gone as u64;
        let (wm, lateness) = (self.watermark, self.lateness);
        for w in windows {
            if w.end.saturating_add(lateness) <= wm {
                continue;
            }
            self.fold_fixed(&key, *w, |agg, acc| agg.add(acc, &record), out);
        }
    }

    /// Folds into `key`'s accumulator of fixed window `w` (opened if absent) with `fold`; if
    /// `w` already fired, emits the result now, as an update if this key was emitted.
    #[inline]
    fn fold_fixed(
        &mut self,
        key: &K,
        w: Window,
        fold: impl FnOnce(&A, &mut A::Acc),
        out: &mut Vec<WindowOutput<K, T, A::Out>>,
    ) {
        let wm = self.watermark;
        let i = self.fixed_index(w);
        let agg = &self.agg;
        let new = self.fixed[i].1.update(
            key,
            || agg.create(),
            |acc, new| {
                fold(agg, acc);
                if w.end <= wm {
                    out.push(WindowOutput::Result(WindowResult {
                        key: key.clone(),
                        window: w,
                        value: agg.result(acc),
                        update: !new,
                        replaces: Vec::new(),
                    }));
                }
                new
            },
        );
        if new {
            self.live += 1;
        }
    }

    /// Merges a combiner's partial: what `records` records of `key` in the fixed window
    /// `window` added up to (see `combine.rs`). A partial arrives before the watermark that
    /// fires its window; should its window be gone anyway, its records are counted as late
    /// (they cannot be returned one by one).
    pub(crate) fn on_partial(
        &mut self,
        key: K,
        window: Window,
        acc: A::Acc,
        records: u32,
        out: &mut Vec<WindowOutput<K, T, A::Out>>,
    ) {
        if self.freed(&window) {
            debug_assert!(false, "a partial arrived after its window was freed");
            log::warn!("{records} pre-aggregated records arrived after their window {window:?} was freed; counted as late");
            self.late += u64::from(records);
            return;
        }
        self.fold_fixed(&key, window, |agg, into| agg.merge(into, acc), out);
    }

    /// The position of fixed window `w`, inserted (with a spare key map) if absent.
    #[inline]
    fn fixed_index(&mut self, w: Window) -> usize {
        let n = self.fixed.len();
        if n > 0 && self.fixed[n - 1].0 == w {
            return n - 1;
        }
        match self.fixed.binary_search_by(|(x, _)| x.cmp(&w)) {
            Ok(i) => i,
            Err(i) => {
                let keys = self.spare.pop().unwrap_or_default();
                self.fixed.insert(i, (w, keys));
                i
            }
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
        let (wm, lateness) = (self.watermark, self.lateness);
        let slots = self.keys.entry(key.clone()).or_default();
        let mut merged = Slot {
            window: w,
            acc: self.agg.create(),
            fired: false,
            replaces: Vec::new(),
        };
        self.agg.add(&mut merged.acc, &record);
        let mut absorbed = Vec::new();
        let mut kept = Vec::with_capacity(slots.len() + 1);
        for s in slots.drain(..) {
            if s.window.overlaps(&merged.window) {
                merged.window = merged.window.cover(&s.window);
                self.agg.merge(&mut merged.acc, s.acc);
                merged.replaces.extend(s.replaces);
                if s.fired {
                    merged.replaces.push(s.window);
                }
                absorbed.push(s.window);
            } else {
                kept.push(s);
            }
        }
        self.live -= absorbed.len();
        // A window that grew in place is an update of itself, not a replacement.
        let window = merged.window;
        if merged.replaces.contains(&window) {
            merged.replaces.retain(|r| *r != window);
            merged.fired = true;
        }
        // A record inside an existing session leaves its window, and so its timer, as it was.
        if absorbed != [window] {
            let at = Self::due(&window, wm, lateness);
            self.timers.entry(at).or_default().push(key.clone());
        }
        let i = kept.partition_point(|s| s.window < window);
        kept.insert(i, merged);
        self.live += 1;
        *slots = kept;
        let slot = &mut slots[i];
        if slot.window.end <= wm {
            let update = slot.fired || !slot.replaces.is_empty();
            slot.fired = true;
            out.push(WindowOutput::Result(WindowResult {
                key,
                window,
                value: self.agg.result(&slot.acc),
                update,
                replaces: std::mem::take(&mut slot.replaces),
            }));
        }
    }

    /// The state, key by key, for a checkpoint: every open window with its accumulator and the
    /// key's position in it, the session timers with the key's position in each, and the
    /// watermark and counters.
    #[allow(clippy::type_complexity)]
    pub(crate) fn export(&self) -> (Vec<(K, KeyWindows<A::Acc>)>, WindowMeta) {
        let mut by_key: FxHashMap<K, KeyWindows<A::Acc>> = FxHashMap::default();
        let empty = || KeyWindows {
            fixed: Vec::new(),
            sessions: Vec::new(),
            timers: Vec::new(),
        };
        for (w, keys) in &self.fixed {
            for (pos, (k, acc)) in keys.iter().enumerate() {
                by_key.entry(k.clone()).or_insert_with(empty).fixed.push((
                    to_ms(w),
                    pos as u32,
                    acc.clone(),
                ));
            }
        }
        for (at, keys) in &self.timers {
            for (pos, k) in keys.iter().enumerate() {
                by_key
                    .entry(k.clone())
                    .or_insert_with(empty)
                    .timers
                    .push((at.0, pos as u32));
            }
        }
        for (k, slots) in &self.keys {
            by_key.entry(k.clone()).or_insert_with(empty).sessions = slots
                .iter()
                .map(|s| SessionSlot {
                    window: to_ms(&s.window),
                    acc: s.acc.clone(),
                    fired: s.fired,
                    replaces: s.replaces.iter().map(to_ms).collect(),
                })
                .collect();
        }
        let meta = WindowMeta {
            watermark: self.watermark.0,
            late: self.late,
            missed: self.missed,
            outside: self.outside,
        };
        (by_key.into_iter().collect(), meta)
    }

    /// Restores what [`export`](Self::export) returned (into an empty state; the entries of
    /// several exports may be imported one after the other, with one `meta`).
    pub(crate) fn import(
        &mut self,
        entries: impl IntoIterator<Item = (K, KeyWindows<A::Acc>)>,
        meta: WindowMeta,
    ) {
        self.watermark = Timestamp(meta.watermark);
        self.late = meta.late;
        self.missed = meta.missed;
        self.outside = meta.outside;
        // Windows' keys and timers' keys are put back in the order they were in: by window (or
        // time), then by the position recorded.
        let mut fixed = Vec::new();
        let mut timers = Vec::new();
        for (key, kw) in entries {
            for (w, pos, acc) in kw.fixed {
                fixed.push((w, pos, key.clone(), acc));
            }
            for (at, pos) in kw.timers {
                timers.push((at, pos, key.clone()));
            }
            if kw.sessions.is_empty() {
                continue;
            }
            let mut slots: Vec<Slot<A::Acc>> = kw
                .sessions
                .into_iter()
                .map(|s| Slot {
                    window: from_ms(s.window),
                    acc: s.acc,
                    fired: s.fired,
                    replaces: s.replaces.into_iter().map(from_ms).collect(),
                })
                .collect();
            slots.sort_by_key(|s| s.window);
            self.live += slots.len();
            self.keys.insert(key, slots);
        }
        fixed.sort_unstable_by_key(|(w, pos, _, _)| (*w, *pos));
        for (w, _, key, acc) in fixed {
            let i = self.fixed_index(from_ms(w));
            if self.fixed[i].1.insert(key, acc) {
                self.live += 1;
            }
        }
        timers.sort_unstable_by_key(|(at, pos, _)| (*at, *pos));
        for (at, _, key) in timers {
            self.timers.entry(Timestamp(at)).or_default().push(key);
        }
    }

    /// Advances the watermark (a lower one is ignored): fires every window whose end it
    /// reaches, then frees every window past its allowed lateness.
    pub fn on_watermark(&mut self, wm: Timestamp, out: &mut Vec<WindowOutput<K, T, A::Out>>) {
        if wm <= self.watermark {
            return;
        }
        let prev = std::mem::replace(&mut self.watermark, wm);
        let lateness = self.lateness;
        // Fixed windows: fire those ending in (prev, wm]; those ending earlier fired before (or
        // were emitted as they were created, past their end).
        for (w, keys) in self.fixed.iter_mut() {
            let w = &*w;
            if w.end > wm {
                break;
            }
            if w.end <= prev {
                continue;
            }
            for (key, acc) in keys.iter() {
                out.push(WindowOutput::Result(WindowResult {
                    key: key.clone(),
                    window: *w,
                    value: self.agg.result(acc),
                    update: false,
                    replaces: Vec::new(),
                }));
            }
        }
        while let Some((w, _)) = self.fixed.front() {
            if w.end.saturating_add(lateness) > wm {
                break;
            }
            let (_, mut keys) = self.fixed.pop_front().expect("front exists");
            self.live -= keys.len();
            if self.spare.len() < SPARE_MAPS && wm < Timestamp::MAX {
                keys.clear();
                self.spare.push(keys);
            }
        }
        if wm == Timestamp::MAX {
            self.spare = Vec::new(); // end of input: give the memory back
        }
        // Sessions: the keys whose timers are due.
        while let Some(due) = self.timers.first_entry() {
            if *due.key() > wm {
                break;
            }
            for key in due.remove() {
                let Some(slots) = self.keys.get_mut(&key) else {
                    continue; // a stale timer: the key's windows are gone
                };
                for s in slots.iter_mut() {
                    if !s.fired && s.window.end <= wm {
                        s.fired = true;
                        let replaces = std::mem::take(&mut s.replaces);
                        out.push(WindowOutput::Result(WindowResult {
                            key: key.clone(),
                            window: s.window,
                            value: self.agg.result(&s.acc),
                            update: !replaces.is_empty(),
                            replaces,
                        }));
                        let free_at = s.window.end.saturating_add(lateness);
                        if free_at > wm {
                            self.timers.entry(free_at).or_default().push(key.clone());
                        }
                    }
                }
                let before = slots.len();
                slots.retain(|s| s.window.end.saturating_add(lateness) > wm);
                self.live -= before - slots.len();
                if slots.is_empty() {
                    self.keys.remove(&key);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::FixedKeys;

    /// A `u32` key, an `f64` sum and a `u32` record count (the window combiner's partial) take a
    /// hand loop's 16 bytes, not the 24 a `HashMap<u32, (f64, u32)>` entry pads to (see
    /// [`FixedKeys`]).
    #[test]
    fn a_partial_of_a_u32_key_an_f64_sum_and_a_count_takes_16_bytes() {
        assert_eq!(FixedKeys::<u32, f64, u32>::ENTRY_BYTES, 16);
        assert_eq!(FixedKeys::<u32, f64>::ENTRY_BYTES, 16);
        // What a `HashMap<u32, (f64, u32)>` entry takes.
        assert_eq!(std::mem::size_of::<(u32, (f64, u32))>(), 24);
    }

    /// Sums, counts and first-seen order survive the table's growth, and a drained map is empty
    /// and is filled again the same way.
    #[test]
    fn keys_add_up_count_and_drain_in_first_seen_order() {
        let mut p: FixedKeys<u32, f64, u32> = FixedKeys::default();
        for round in 0..2 {
            // 5,000 keys in a scrambled order (7,919 is prime to 5,000); key k is seen
            // (k % 7) + 1 times, each time adding k.
            let keys: Vec<u32> = (0..5_000u32).map(|i| (i * 7_919 + 13) % 5_000).collect();
            let mut new = 0;
            for pass in 0..7 {
                for &k in &keys {
                    if pass <= k % 7 {
                        let is_new = p.update_with(
                            &k,
                            || (0.0, 0),
                            |acc, n, is_new| {
                                *acc += f64::from(k);
                                *n += 1;
                                is_new
                            },
                        );
                        new += usize::from(is_new);
                        assert_eq!(is_new, pass == 0, "round {round}, key {k}, pass {pass}");
                    }
                }
            }
            assert_eq!((new, p.len()), (5_000, 5_000));
            let listed: Vec<(u32, f64)> = p.iter().map(|(k, acc)| (*k, *acc)).collect();
            let mut out = Vec::new();
            p.drain_ordered_with::<()>(|k, acc, n| {
                out.push((k, acc, n));
                Ok(())
            })
            .unwrap();
            let want: Vec<(u32, f64, u32)> = keys
                .iter()
                .map(|&k| (k, f64::from(k) * f64::from(k % 7 + 1), k % 7 + 1))
                .collect();
            assert_eq!(out, want, "round {round}");
            let want: Vec<(u32, f64)> = want.iter().map(|&(k, acc, _)| (k, acc)).collect();
            assert_eq!(listed, want, "round {round}");
            assert_eq!(p.len(), 0);
        }
    }

    /// A failing consumer stops the drain, and the map is left empty either way; a restored key
    /// is inserted once.
    #[test]
    fn a_failed_drain_leaves_the_keys_empty() {
        let mut p: FixedKeys<u32, u64> = FixedKeys::default();
        for k in 0..100u32 {
            p.update(&k, || 0, |acc, _| *acc += 1);
        }
        let mut taken = 0;
        let r = p.drain_ordered(|k, _| {
            taken += 1;
            if k == 41 {
                Err(k)
            } else {
                Ok(())
            }
        });
        assert_eq!((r, taken), (Err(41), 42));
        assert_eq!((p.len(), p.iter().count()), (0, 0));
        assert!(p.insert(7, 5));
        assert!(!p.insert(7, 6));
        p.update(&3, || 0, |acc, _| *acc += 2);
        let mut out = Vec::new();
        p.drain_ordered::<()>(|k, acc| {
            out.push((k, acc));
            Ok(())
        })
        .unwrap();
        assert_eq!(out, vec![(7, 5), (3, 2)]);
    }
}
