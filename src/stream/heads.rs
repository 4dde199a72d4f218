//! The heads of the stateful stages — a keyed fold (emitting at end of input), a sort, a head
//! followed by a chain acting as one head — and the tail that routes each record to one of two
//! channels.
//!
//! Checkpoints: a keyed fold snapshots its map by key group (the group of a key comes from the
//! same hash the router used, so a key's state is where its group says; see
//! `checkpoint::state`), a sort its gathered records — each only when built through the
//! checkpointed API (`.key_by(..).checkpointed()`, `checkpointed_sort_by`), whose types are
//! serde; otherwise it declares its state unsupported, naming the fix. Both stop gathering at
//! a barrier and return [`Pull::Barrier`] with an empty buffer, so the worker snapshots them.

use std::hash::Hash;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::checkpoint::keyed::{
    check_groups, first_seen_order, in_first_seen_order, key_groups_of, keyed_part,
    record_key_groups, FxIndexMap, KeyGroups,
};
use crate::checkpoint::state::{InstanceState, KeyedPart};
use crate::checkpoint::{CheckpointId, StateSupport};
use crate::error::Error;

use super::graph::partition_hash;
use crate::channel::{ChannelTail, InputHead};
use crate::metrics::InstanceMetrics;
use crate::operator::{Chain, Emit, Halt};
use crate::runtime::{Cx, Head, Pull, Tail};
use crate::time::Timestamp;
use crate::window::FixedKeys;

/// Sends each record to one of two channel tails.
pub(super) struct RouteTail<X, L, R> {
    left: ChannelTail<L>,
    right: ChannelTail<R>,
    f: fn(X) -> Result<L, R>,
    /// Whether each side still has a consumer.
    live: [bool; 2],
}

impl<X, L: Send, R: Send> Emit<X> for RouteTail<X, L, R> {
    #[inline]
    fn emit(&mut self, item: X) -> Result<(), Halt> {
        let r = match (self.f)(item) {
            Ok(l) if self.live[0] => self.left.emit(l).map_err(|e| (0, e)),
            Err(r) if self.live[1] => self.right.emit(r).map_err(|e| (1, e)),
            _ => Ok(()),
        };
        match r {
            Ok(()) => Ok(()),
            Err((side, Halt::Done)) => {
                self.live[side] = false;
                if self.live == [false, false] {
                    Err(Halt::Done)
                } else {
                    Ok(())
                }
            }
            Err((_, e)) => Err(e),
        }
    }
}

impl<X: Send, L: Send, R: Send> Tail<X> for RouteTail<X, L, R> {
    fn before_batch(&mut self, now: u64) {
        self.left.before_batch(now);
        self.right.before_batch(now);
    }
    fn pending_since(&self) -> Option<u64> {
        match (self.left.pending_since(), self.right.pending_since()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
    fn watermark(&mut self, cx: &Cx, at: Timestamp) -> Result<(), Halt> {
        self.each(cx, |t, cx| t.watermark(cx, at), |t, cx| t.watermark(cx, at))
    }
    fn flush(&mut self, cx: &Cx) -> Result<(), Halt> {
        self.each(cx, |t, cx| t.flush(cx), |t, cx| t.flush(cx))
    }
    fn end_input_batch(&mut self, cx: &Cx) -> Result<(), Halt> {
        self.each(
            cx,
            |t, cx| t.end_input_batch(cx),
            |t, cx| t.end_input_batch(cx),
        )
    }
    fn finish(&mut self, cx: &Cx) -> Result<(), Halt> {
        self.left.finish(cx)?;
        self.right.finish(cx)
    }
    fn barrier(
        &mut self,
        cx: &Cx,
        id: CheckpointId,
        state: &mut InstanceState,
    ) -> Result<(), Halt> {
        // As `each`, with `state` lent to one side at a time.
        for side in 0..2 {
            let r = match (self.live[side], side) {
                (false, _) => Ok(()),
                (true, 0) => self.left.barrier(cx, id, state),
                (true, _) => self.right.barrier(cx, id, state),
            };
            self.settle(cx, side, r)?;
        }
        self.any_live()
    }
    fn restore(&mut self, cx: &Cx, state: &InstanceState) -> Result<(), Halt> {
        self.left.restore(cx, state)?;
        self.right.restore(cx, state)
    }
    fn state_support(&self) -> StateSupport {
        weaker(self.left.state_support(), self.right.state_support())
    }
}

impl<X, L: Send, R: Send> RouteTail<X, L, R> {
    pub(super) fn new(
        left: ChannelTail<L>,
        right: ChannelTail<R>,
        f: fn(X) -> Result<L, R>,
    ) -> Self {
        RouteTail {
            left,
            right,
            f,
            live: [true, true],
        }
    }

    fn each(
        &mut self,
        cx: &Cx,
        l: impl FnOnce(&mut ChannelTail<L>, &Cx) -> Result<(), Halt>,
        r: impl FnOnce(&mut ChannelTail<R>, &Cx) -> Result<(), Halt>,
    ) -> Result<(), Halt> {
        let results = [
            if self.live[0] {
                l(&mut self.left, cx)
            } else {
                Ok(())
            },
            if self.live[1] {
                r(&mut self.right, cx)
            } else {
                Ok(())
            },
        ];
        for (side, res) in results.into_iter().enumerate() {
            self.settle(cx, side, res)?;
        }
        self.any_live()
    }

    /// One side's result: `Done` (its consumers are gone, the run is not cancelled) retires
    /// that side; any other error is the tail's.
    fn settle(&mut self, cx: &Cx, side: usize, r: Result<(), Halt>) -> Result<(), Halt> {
        match r {
            Ok(()) => Ok(()),
            Err(Halt::Done) if !cx.run.is_cancelled() => {
                self.live[side] = false;
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// `Done` once both sides are retired.
    fn any_live(&self) -> Result<(), Halt> {
        if self.live == [false, false] {
            Err(Halt::Done)
        } else {
            Ok(())
        }
    }
}

/// How a keyed head encodes its map: set only by the checkpointed API, whose key and state
/// types are serde (plain fn pointers, so the head itself needs no serde bounds).
pub(crate) struct KeyedCodec<K, A> {
    put: fn(&mut InstanceState, &KeyedPart<&K, &A>) -> Result<(), Error>,
    get: GetKeyed<K, A>,
}

/// Decodes a keyed head's part `head`.
type GetKeyed<K, A> = fn(&InstanceState) -> Result<Option<KeyedPart<K, A>>, Error>;

impl<K, A> Clone for KeyedCodec<K, A> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<K, A> Copy for KeyedCodec<K, A> {}

fn put_keyed<K: Serialize, A: Serialize>(
    s: &mut InstanceState,
    v: &KeyedPart<&K, &A>,
) -> Result<(), Error> {
    s.put("head", v)
}

fn get_keyed<K: DeserializeOwned, A: DeserializeOwned>(
    s: &InstanceState,
) -> Result<Option<KeyedPart<K, A>>, Error> {
    s.get("head")
}

impl<K: Serialize + DeserializeOwned, A: Serialize + DeserializeOwned> KeyedCodec<K, A> {
    pub(crate) fn new() -> Self {
        KeyedCodec {
            put: put_keyed::<K, A>,
            get: get_keyed::<K, A>,
        }
    }
}

/// Head of a keyed aggregation: folds all input, then emits the state in batches.
pub(super) struct KeyedHead<K, T, A, N, F, G> {
    input: InputHead<(K, T)>,
    init: Arc<N>,
    fold: Arc<F>,
    /// Turns a key's final state into its output.
    finish: Arc<G>,
    /// In the order keys were first seen: the order results are emitted in, which a snapshot
    /// records (part `head.order`) so that a resumed run emits them in the same order.
    state: FxIndexMap<K, A>,
    drain: Option<indexmap::map::IntoIter<K, A>>,
    /// `count`, `fold`, `reduce` (for the unsupported-state message).
    kind: &'static str,
    groups: KeyGroups<K>,
    codec: Option<KeyedCodec<K, A>>,
    /// How many records an input item stands for beyond the one the channel counted (a
    /// combiner's partial count stands for `n`); `None`: one each.
    weight: Option<fn(&T) -> u64>,
}

impl<K, T, A, N, F, G> KeyedHead<K, T, A, N, F, G> {
    /// The same head, over the partials of a combiner: `weight(x)` is how many records item
    /// `x` stands for.
    pub(super) fn weighted(mut self, weight: fn(&T) -> u64) -> Self {
        self.weight = Some(weight);
        self
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        input: InputHead<(K, T)>,
        init: Arc<N>,
        fold: Arc<F>,
        finish: Arc<G>,
        kind: &'static str,
        groups: KeyGroups<K>,
        codec: Option<KeyedCodec<K, A>>,
    ) -> Self {
        KeyedHead {
            input,
            init,
            fold,
            finish,
            state: FxIndexMap::default(),
            drain: None,
            kind,
            groups,
            codec,
            weight: None,
        }
    }
}

impl<K, T, A, O, N, F, G> Head<(K, O)> for KeyedHead<K, T, A, N, F, G>
where
    K: Hash + Eq + Send,
    T: Send,
    A: Send,
    O: Send,
    N: Fn() -> A + Send + Sync,
    F: Fn(&mut A, T) + Send + Sync,
    G: Fn(A) -> O + Send + Sync,
{
    fn counts_input(&self) -> bool {
        true
    }
    fn pull(
        &mut self,
        cx: &Cx,
        buf: &mut Vec<(K, O)>,
        flush_at: Option<u64>,
    ) -> Result<Pull, Halt> {
        if self.drain.is_none() {
            let (state, init, fold) = (&mut self.state, &self.init, &self.fold);
            let weight = self.weight;
            match gather(&mut self.input, cx, flush_at, |batch| {
                if let Some(w) = weight {
                    let more: u64 = batch.iter().map(|(_, x)| w(x).saturating_sub(1)).sum();
                    count_in(cx, more as usize);
                }
                for (k, x) in batch.drain(..) {
                    fold(state.entry(k).or_insert_with(|| init()), x);
                }
            })? {
                Gathered::Ended => {}
                Gathered::Idle => return Ok(Pull::Idle),
                Gathered::Barrier(id) => return Ok(Pull::Barrier(id)),
            }
            self.drain = Some(std::mem::take(&mut self.state).into_iter());
        }
        let drain = self.drain.as_mut().expect("set above");
        let finish = &*self.finish;
        buf.extend(drain.take(cx.batch_size()).map(|(k, a)| (k, finish(a))));
        Ok(if drain.len() == 0 {
            Pull::End
        } else {
            Pull::Data
        })
    }

    fn state_support(&self) -> StateSupport {
        match self.codec {
            Some(_) => StateSupport::Snapshots,
            None => StateSupport::Unsupported(format!(
                "it keeps keyed state that is not serde: build it with \
                 `.key_by(..).checkpointed().{}(..)`, whose key and state types are \
                 Serialize + DeserializeOwned",
                self.kind
            )),
        }
    }

    fn snapshot(&mut self, cx: &Cx, state: &mut InstanceState) -> Result<(), Halt> {
        let Some(codec) = self.codec else {
            return Err(unsupported(cx, self.state_support()));
        };
        let groups = key_groups_of(cx, self.groups.parallelism);
        let part = keyed_part(self.state.iter(), self.groups.hash, groups);
        (codec.put)(state, &part)?;
        state.put("head.order", &first_seen_order(&self.state, &part))?;
        record_key_groups(cx, state, self.groups.parallelism);
        Ok(())
    }

    fn restore(&mut self, cx: &Cx, state: &InstanceState) -> Result<(), Halt> {
        let Some(codec) = self.codec else {
            return Err(unsupported(cx, self.state_support()));
        };
        let Some(part) = (codec.get)(state)? else {
            return Ok(());
        };
        check_groups(cx, &part, self.groups.parallelism)?;
        let order: Option<Vec<u32>> = state.get("head.order")?;
        self.state.extend(in_first_seen_order(
            part.groups.into_iter().flat_map(|g| g.1),
            order,
        ));
        Ok(())
    }
}

/// The error of a snapshot or restore asked of a head that declared its state unsupported.
fn unsupported(cx: &Cx, support: StateSupport) -> Halt {
    let reason = match support {
        StateSupport::Unsupported(r) | StateSupport::AtLeastOnce(r) => r,
        StateSupport::StdinSpool => crate::source::STDIN.into(),
        _ => "its state cannot be checkpointed".into(),
    };
    Halt::Failed(Error::CheckpointUnsupported {
        stage: cx.stage.to_string(),
        reason,
    })
}

/// The weaker of two supports (for a head made of parts): unsupported, then stdin (replayable
/// only through the spool), then at least once, then snapshots, then stateless.
pub(crate) fn weaker(a: StateSupport, b: StateSupport) -> StateSupport {
    fn rank(s: &StateSupport) -> u8 {
        match s {
            StateSupport::Unsupported(_) => 4,
            StateSupport::StdinSpool => 3,
            StateSupport::AtLeastOnce(_) => 2,
            StateSupport::Snapshots => 1,
            StateSupport::Stateless => 0,
        }
    }
    if rank(&b) > rank(&a) {
        b
    } else {
        a
    }
}

/// One support for the steps of a chain, naming the step of an unsupported one.
pub(crate) fn chain_support<I, C: Chain<I>>(chain: &C) -> StateSupport {
    let mut steps = Vec::new();
    chain.state_support(&mut steps);
    steps
        .into_iter()
        .map(|(name, s)| match s {
            StateSupport::Unsupported(r) => {
                StateSupport::Unsupported(format!("step `{name}`: {r}"))
            }
            StateSupport::AtLeastOnce(r) => {
                StateSupport::AtLeastOnce(format!("step `{name}`: {r}"))
            }
            other => other,
        })
        .fold(StateSupport::Stateless, weaker)
}

/// A head followed by a chain, acting as one head.
pub(super) struct ChainedHead<I, C> {
    inner: Box<dyn Head<I>>,
    chain: C,
    tmp: Vec<I>,
    done: bool,
    /// Records the chain took, summed over the stage's instances (for the accounts).
    pushed: Option<Arc<crate::sync::AtomicU64>>,
}

impl<I, C> ChainedHead<I, C> {
    pub(super) fn new(
        inner: Box<dyn Head<I>>,
        chain: C,
        pushed: Option<Arc<crate::sync::AtomicU64>>,
    ) -> Self {
        ChainedHead {
            inner,
            chain,
            tmp: Vec::new(),
            done: false,
            pushed,
        }
    }
}

impl<I: Send, C: Chain<I>> Head<C::Out> for ChainedHead<I, C> {
    fn counts_input(&self) -> bool {
        true
    }
    fn pull(
        &mut self,
        cx: &Cx,
        buf: &mut Vec<C::Out>,
        flush_at: Option<u64>,
    ) -> Result<Pull, Halt> {
        if self.done {
            return Ok(Pull::End);
        }
        let pull = self.inner.pull(cx, &mut self.tmp, flush_at)?;
        if !self.inner.counts_input() && !self.tmp.is_empty() {
            count_in(cx, self.tmp.len());
        }
        if !self.tmp.is_empty() {
            self.chain.begin_batch(self.tmp.len());
        }
        let mut pushed = 0u64;
        let mut halted = None;
        for x in self.tmp.drain(..) {
            pushed += 1;
            if let Err(h) = self.chain.push(x, buf) {
                halted = Some(h);
                break;
            }
        }
        self.tmp.clear();
        self.chain.end_batch();
        if pushed > 0 {
            if let Some(c) = &self.pushed {
                c.fetch_add(pushed, crate::sync::Ordering::Relaxed);
            }
        }
        match halted {
            None => Ok(pull),
            Some(Halt::Done) => {
                cx.run
                    .stopped_early
                    .store(true, crate::sync::Ordering::Relaxed);
                self.done = true;
                Ok(Pull::End)
            }
            Some(e) => Err(e),
        }
    }

    fn state_support(&self) -> StateSupport {
        weaker(self.inner.state_support(), chain_support(&self.chain))
    }
    fn snapshot(&mut self, cx: &Cx, state: &mut InstanceState) -> Result<(), Halt> {
        self.inner.snapshot(cx, state)?;
        Ok(self.chain.snapshot(state)?)
    }
    fn restore(&mut self, cx: &Cx, state: &InstanceState) -> Result<(), Halt> {
        self.inner.restore(cx, state)?;
        Ok(self.chain.restore(state)?)
    }
}

/// How a sort encodes its gathered records (set by `checkpointed_sort_by`).
pub(crate) struct SortCodec<T> {
    put: fn(&mut InstanceState, &[T]) -> Result<(), Error>,
    get: fn(&InstanceState) -> Result<Option<Vec<T>>, Error>,
}

impl<T> Clone for SortCodec<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for SortCodec<T> {}

fn put_items<T: Serialize>(s: &mut InstanceState, v: &[T]) -> Result<(), Error> {
    s.put("head", v)
}

fn get_items<T: DeserializeOwned>(s: &InstanceState) -> Result<Option<Vec<T>>, Error> {
    s.get("head")
}

impl<T: Serialize + DeserializeOwned> SortCodec<T> {
    pub(crate) fn new() -> Self {
        SortCodec {
            put: put_items::<T>,
            get: get_items::<T>,
        }
    }
}

/// Head of `sort_by`: gathers all input, then emits it sorted.
pub(super) struct SortHead<T, F> {
    input: InputHead<T>,
    cmp: Arc<F>,
    items: Vec<T>,
    sorted: Option<std::vec::IntoIter<T>>,
    codec: Option<SortCodec<T>>,
}

impl<T, F> SortHead<T, F> {
    pub(super) fn new(input: InputHead<T>, cmp: Arc<F>, codec: Option<SortCodec<T>>) -> Self {
        SortHead {
            input,
            cmp,
            items: Vec::new(),
            sorted: None,
            codec,
        }
    }
}

impl<T: Send, F: Fn(&T, &T) -> std::cmp::Ordering + Send + Sync> Head<T> for SortHead<T, F> {
    fn counts_input(&self) -> bool {
        true
    }
    fn pull(&mut self, cx: &Cx, buf: &mut Vec<T>, flush_at: Option<u64>) -> Result<Pull, Halt> {
        if self.sorted.is_none() {
            let items = &mut self.items;
            match gather(&mut self.input, cx, flush_at, |batch| items.append(batch))? {
                Gathered::Ended => {}
                Gathered::Idle => return Ok(Pull::Idle),
                Gathered::Barrier(id) => return Ok(Pull::Barrier(id)),
            }
            let mut items = std::mem::take(&mut self.items);
            let cmp = Arc::clone(&self.cmp);
            items.sort_by(|a, b| cmp(a, b));
            self.sorted = Some(items.into_iter());
        }
        let it = self.sorted.as_mut().expect("set above");
        buf.extend(it.take(cx.batch_size()));
        Ok(if it.len() == 0 { Pull::End } else { Pull::Data })
    }

    fn state_support(&self) -> StateSupport {
        match self.codec {
            Some(_) => StateSupport::Snapshots,
            None => StateSupport::Unsupported(
                "it keeps the records it sorts, which are not serde: build it with \
                 `.checkpointed_sort_by(..)`, whose records are Serialize + DeserializeOwned"
                    .into(),
            ),
        }
    }

    fn snapshot(&mut self, cx: &Cx, state: &mut InstanceState) -> Result<(), Halt> {
        let Some(codec) = self.codec else {
            return Err(unsupported(cx, self.state_support()));
        };
        Ok((codec.put)(state, &self.items)?)
    }

    fn restore(&mut self, cx: &Cx, state: &InstanceState) -> Result<(), Halt> {
        let Some(codec) = self.codec else {
            return Err(unsupported(cx, self.state_support()));
        };
        if let Some(items) = (codec.get)(state)? {
            self.items = items;
        }
        Ok(())
    }
}

/// Counts one input batch of `records` records in the instance's metrics.
fn count_in(cx: &Cx, records: usize) {
    InstanceMetrics::add(&cx.metrics.records_in, records as u64);
    InstanceMetrics::add(&cx.metrics.batches_in, 1);
}

/// Why [`gather`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Gathered {
    /// The input ended: everything is in.
    Ended,
    /// The input went idle first: call again once the tail has flushed.
    Idle,
    /// Checkpoint barrier `n` arrived (every record before it is in): snapshot, then call
    /// again.
    Barrier(CheckpointId),
}

/// The loop of a head that consumes its whole input before emitting (a keyed fold, a sort):
/// pulls batches from `input` until its end, a barrier or idleness, counting each batch and
/// handing it to `each` (which empties it); `Halt::Done` once the run is cancelled.
pub(crate) fn gather<T: Send>(
    input: &mut InputHead<T>,
    cx: &Cx,
    flush_at: Option<u64>,
    mut each: impl FnMut(&mut Vec<T>),
) -> Result<Gathered, Halt> {
    let mut batch = Vec::new();
    loop {
        if cx.run.is_cancelled() {
            return Err(Halt::Done);
        }
        match input.pull(cx, &mut batch, flush_at)? {
            Pull::Idle if batch.is_empty() => return Ok(Gathered::Idle),
            pull => {
                if !batch.is_empty() {
                    count_in(cx, batch.len());
                    each(&mut batch);
                }
                match pull {
                    Pull::End => return Ok(Gathered::Ended),
                    Pull::Barrier(id) => return Ok(Gathered::Barrier(id)),
                    _ => {}
                }
            }
        }
    }
}

/// The tail of the stage feeding a keyed `count`: counts each key's records locally and sends
/// one `(key, n)` per key — at the end of input, at a checkpoint barrier, and whenever it holds
/// more than [`MAX_COUNTED`] keys — instead of every record. Keys go out in the order they were
/// first seen, so the count stage (which emits in first-seen order) emits in the same order as
/// without the combiner, and a barrier leaves nothing here to snapshot. Counts are integers:
/// the result is exactly the same.
pub(super) struct CountTail<K, T> {
    inner: ChannelTail<(K, u64)>,
    /// One probe per record (see `FixedKeys`: an `IndexMap` costs two dependent accesses).
    counts: FixedKeys<K, u64>,
    metrics: Arc<InstanceMetrics>,
    _record: std::marker::PhantomData<fn(T)>,
}

/// The most keys a count combiner holds before it sends their counts (memory stays bounded).
pub(super) const MAX_COUNTED: usize = 1 << 18;

impl<K: Hash + Eq + Clone + Send, T> CountTail<K, T> {
    pub(super) fn new(cx: &Cx, inner: ChannelTail<(K, u64)>) -> Self {
        CountTail {
            inner,
            counts: FixedKeys::default(),
            metrics: Arc::clone(&cx.metrics),
            _record: std::marker::PhantomData,
        }
    }

    /// Sends every count held, in first-seen order.
    fn send_counts(&mut self) -> Result<(), Halt> {
        let (inner, metrics) = (&mut self.inner, &self.metrics);
        self.counts.drain_ordered(|k, n| {
            // The channel counts one record per message: this one stands for `n`.
            InstanceMetrics::add(&metrics.records_out, n - 1);
            inner.emit_hashed_by(partition_hash(&k), (k, n))
        })
    }
}

impl<K: Hash + Eq + Clone + Send, T> Emit<(K, T)> for CountTail<K, T> {
    #[inline]
    fn emit(&mut self, (k, _): (K, T)) -> Result<(), Halt> {
        self.counts.update(&k, || 0, |n, _| *n += 1);
        if self.counts.len() > MAX_COUNTED {
            self.send_counts()?;
        }
        Ok(())
    }
}

impl<K: Hash + Eq + Clone + Send, T> Tail<(K, T)> for CountTail<K, T> {
    fn before_batch(&mut self, now: u64) {
        self.inner.before_batch(now)
    }
    fn pending_since(&self) -> Option<u64> {
        self.inner.pending_since()
    }
    fn flush(&mut self, cx: &Cx) -> Result<(), Halt> {
        // Counts are only needed at the end: holding them is the point.
        self.inner.flush(cx)
    }
    fn finish(&mut self, cx: &Cx) -> Result<(), Halt> {
        match self.send_counts() {
            Ok(()) | Err(Halt::Done) => {}
            Err(e) => return Err(e),
        }
        self.inner.finish(cx)
    }
    fn barrier(
        &mut self,
        cx: &Cx,
        id: CheckpointId,
        state: &mut InstanceState,
    ) -> Result<(), Halt> {
        self.send_counts()?;
        self.inner.barrier(cx, id, state)
    }
    fn restore(&mut self, cx: &Cx, state: &InstanceState) -> Result<(), Halt> {
        self.inner.restore(cx, state)
    }
    fn state_support(&self) -> StateSupport {
        self.inner.state_support()
    }
}
