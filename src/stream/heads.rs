//! The heads of the stateful stages — a keyed fold (emitting at end of input), a sort, a head
//! followed by a chain acting as one head — and the tail that routes each record to one of two
//! channels.

use std::hash::Hash;
use std::sync::Arc;

use rustc_hash::FxHashMap;

use crate::channel::{ChannelTail, InputHead};
use crate::metrics::InstanceMetrics;
use crate::operator::{Chain, Emit, Halt};
use crate::runtime::{Cx, Head, Pull, Tail};
use crate::time::Timestamp;

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
    fn finish(&mut self, cx: &Cx) -> Result<(), Halt> {
        self.left.finish(cx)?;
        self.right.finish(cx)
    }
    /// Both outputs are channels: each sends what it buffered, then the barrier.
    fn barrier(
        &mut self,
        cx: &Cx,
        id: crate::checkpoint::CheckpointId,
        _state: &mut crate::checkpoint::state::InstanceState,
    ) -> Result<(), Halt> {
        self.each(cx, |t, _| t.send_barrier(id), |t, _| t.send_barrier(id))
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
            match res {
                Ok(()) => {}
                Err(Halt::Done) if !cx.run.is_cancelled() => self.live[side] = false,
                Err(e) => return Err(e),
            }
        }
        if self.live == [false, false] {
            Err(Halt::Done)
        } else {
            Ok(())
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
    state: FxHashMap<K, A>,
    drain: Option<std::collections::hash_map::IntoIter<K, A>>,
}

impl<K, T, A, N, F, G> KeyedHead<K, T, A, N, F, G> {
    pub(super) fn new(
        input: InputHead<(K, T)>,
        init: Arc<N>,
        fold: Arc<F>,
        finish: Arc<G>,
        state: FxHashMap<K, A>,
    ) -> Self {
        KeyedHead {
            input,
            init,
            fold,
            finish,
            state,
            drain: None,
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
            let ended = gather(&mut self.input, cx, flush_at, |batch| {
                for (k, x) in batch.drain(..) {
                    fold(state.entry(k).or_insert_with(|| init()), x);
                }
            })?;
            if !ended {
                return Ok(Pull::Idle);
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
}

/// Head of `sort_by`: gathers all input, then emits it sorted.
pub(super) struct SortHead<T, F> {
    input: InputHead<T>,
    cmp: Arc<F>,
    items: Vec<T>,
    sorted: Option<std::vec::IntoIter<T>>,
}

impl<T, F> SortHead<T, F> {
    pub(super) fn new(input: InputHead<T>, cmp: Arc<F>) -> Self {
        SortHead {
            input,
            cmp,
            items: Vec::new(),
            sorted: None,
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
            if !gather(&mut self.input, cx, flush_at, |batch| items.append(batch))? {
                return Ok(Pull::Idle);
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
}

/// Counts one input batch of `records` records in the instance's metrics.
fn count_in(cx: &Cx, records: usize) {
    InstanceMetrics::add(&cx.metrics.records_in, records as u64);
    InstanceMetrics::add(&cx.metrics.batches_in, 1);
}

/// The loop of a head that consumes its whole input before emitting (a keyed fold, a sort):
/// pulls batches from `input` until its end, counting each and handing it to `each` (which
/// empties it). `Ok(false)` when the input went idle first (call again once the tail has
/// flushed); `Halt::Done` once the run is cancelled.
fn gather<T: Send>(
    input: &mut InputHead<T>,
    cx: &Cx,
    flush_at: Option<u64>,
    mut each: impl FnMut(&mut Vec<T>),
) -> Result<bool, Halt> {
    let mut batch = Vec::new();
    loop {
        if cx.run.is_cancelled() {
            return Err(Halt::Done);
        }
        match input.pull(cx, &mut batch, flush_at)? {
            Pull::Idle if batch.is_empty() => return Ok(false),
            pull => {
                if !batch.is_empty() {
                    count_in(cx, batch.len());
                    each(&mut batch);
                }
                if pull == Pull::End {
                    return Ok(true);
                }
            }
        }
    }
}
