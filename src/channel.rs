//! The links between stages: messages, partitioning, batching, and send/receive with
//! backpressure timing and cancellation.
//!
//! Each stage instance owns one bounded input channel; every instance of every upstream stage
//! holds a sender to it. Upstream instances batch records per destination and block when the
//! channel is full — that blocking *is* the backpressure. End of stream is an explicit message,
//! one per upstream instance; a channel that disconnects before all of them arrived means the
//! upstream stopped abnormally (the run is failing or cancelled). When a consumer finishes early
//! it drops its receiver, senders see the disconnect, and producers with no consumer left stop.
//!
//! An *ordered* edge (out of a stage that asked for [`ordered`](crate::Stream::ordered)) is
//! different in two ways: each consumer instance has one channel per upstream instance, which
//! it reads in turn ([`InputHead::in_turns`]), and each upstream instance ends the output of
//! every input batch with a [`Message::BatchEnd`] marker; see the design note on `Turns`.

use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::{select, Receiver, Sender, TryRecvError, TrySendError};

use crate::metrics::{InstanceMetrics, Parked};
use crate::operator::{Emit, Halt};
use crate::runtime::{Cx, Head, Pull, RunShared, Tail};
use crate::time::Timestamp;
use crate::window::WatermarkTracker;

/// What travels on a channel between stages. `from` is the sender's input slot at the
/// receiver: upstream instances are numbered `0..n` over all the edges into one stage.
#[derive(Debug)]
pub(crate) enum Message<T> {
    /// A batch of records.
    Data { from: usize, batch: Vec<T> },
    /// The sender promises no record with an event time before `at` will follow.
    Watermark { from: usize, at: Timestamp },
    /// The sender has no more records (a watermark of +∞).
    End { from: usize },
    /// Checkpoint barrier `id`: every record the sender sent before it belongs to checkpoint
    /// `id`, none after it.
    Barrier {
        from: usize,
        id: crate::checkpoint::CheckpointId,
    },
    /// On an ordered edge only: the sender has sent everything it made of one input batch (a
    /// filter may have made nothing of it, a flat_map several batches). The consumer then reads
    /// the next upstream instance.
    BatchEnd { from: usize },
}

/// How an upstream instance picks the downstream instance for a record.
pub(crate) enum Partition<T> {
    /// Upstream instance `i` sends to downstream instance `i % n` (1:1 when the counts match,
    /// a gather when downstream has one instance).
    Forward,
    /// Whole batches round-robin, preferring an instance whose channel has room.
    Rebalance,
    /// Whole batches strictly round-robin: batch `k` goes to instance `k % n`, waiting for
    /// room if need be (what an ordered stage is fed by: its merge reads the instances in the
    /// same turn).
    RoundRobin,
    /// By a hash of the record's key: all records of a key reach the same instance.
    Hash(Arc<dyn Fn(&T) -> u64 + Send + Sync>),
}

impl<T> Clone for Partition<T> {
    fn clone(&self) -> Self {
        match self {
            Partition::Forward => Partition::Forward,
            Partition::Rebalance => Partition::Rebalance,
            Partition::RoundRobin => Partition::RoundRobin,
            Partition::Hash(h) => Partition::Hash(Arc::clone(h)),
        }
    }
}

/// Sends one message, blocking while the channel is full (timed as backpressure).
/// `Err(Halt::Done)` when the receiver is gone or the run is cancelled.
fn send_blocking<T>(
    run: &RunShared,
    metrics: &InstanceMetrics,
    tx: &Sender<Message<T>>,
    msg: Message<T>,
) -> Result<(), Halt> {
    let mut msg = match tx.try_send(msg) {
        Ok(()) => return Ok(()),
        Err(TrySendError::Disconnected(_)) => return Err(Halt::Done),
        Err(TrySendError::Full(m)) => m,
    };
    let t0 = Instant::now();
    // Yield before parking: with more stage threads than cores, the consumer is usually
    // runnable and about to drain; a futex sleep and wake per batch would cost more than the
    // batch itself.
    for _ in 0..YIELDS {
        std::thread::yield_now();
        msg = match tx.try_send(msg) {
            Ok(()) => {
                InstanceMetrics::add(&metrics.send_wait_ns, t0.elapsed().as_nanos() as u64);
                return Ok(());
            }
            Err(TrySendError::Disconnected(_)) => return Err(Halt::Done),
            Err(TrySendError::Full(m)) => m,
        };
    }
    // Parked: marked so that a snapshot sees the block while it lasts.
    let parked = Parked::new(
        &metrics.send_parked_since_ms,
        run.clock_ms.load(crate::sync::Ordering::Relaxed),
    );
    let result = select! {
        send(tx, msg) -> r => r.map_err(|_| Halt::Done),
        recv(run.cancel_rx) -> _ => Err(Halt::Done),
    };
    drop(parked);
    InstanceMetrics::add(&metrics.send_wait_ns, t0.elapsed().as_nanos() as u64);
    result
}

/// How many times a blocked send or receive yields the CPU before it parks the thread.
const YIELDS: usize = 32;

/// A stage's output towards one downstream stage.
pub(crate) struct ChannelTail<T> {
    metrics: Arc<InstanceMetrics>,
    run: Arc<RunShared>,
    senders: Vec<Option<Sender<Message<T>>>>,
    /// This instance's input slot at every receiver.
    slot: usize,
    live: usize,
    partition: Partition<T>,
    /// The batch being filled, when all records go to one destination at a time (the
    /// per-record path of `emit` touches only this).
    cur: Vec<T>,
    /// One buffer per destination when hashing over several; empty otherwise.
    bufs: Vec<Vec<T>>,
    /// Emptied batches sent back by the consumers: reusing them saves an allocation and a
    /// cross-thread free per batch.
    recycle: Option<Receiver<Vec<T>>>,
    /// Destination of `Forward`, or the next round-robin candidate.
    next: usize,
    batch_size: usize,
    /// Clock time (ms) at which the records now buffered started to arrive: set before each
    /// input batch while the buffers are empty, so `emit` need not look at the clock.
    started: u64,
    /// Every consumer is gone: emitting more is pointless.
    stopped: bool,
    /// Key groups hash partitioning routes by (at least the number of consumers).
    key_groups: u16,
    /// On an ordered edge: end the output of each input batch with a [`Message::BatchEnd`].
    ordered: bool,
}

impl<T: Send> ChannelTail<T> {
    pub(crate) fn new(
        cx: &Cx,
        instance: usize,
        slot: usize,
        senders: Vec<Sender<Message<T>>>,
        partition: Partition<T>,
        recycle: Option<Receiver<Vec<T>>>,
    ) -> Self {
        let n = senders.len();
        let bufs = match partition {
            Partition::Hash(_) if n > 1 => (0..n).map(|_| Vec::new()).collect(),
            _ => Vec::new(),
        };
        ChannelTail {
            metrics: Arc::clone(&cx.metrics),
            run: Arc::clone(&cx.run),
            live: n,
            slot,
            senders: senders.into_iter().map(Some).collect(),
            partition,
            cur: Vec::new(),
            bufs,
            recycle,
            next: instance % n.max(1),
            batch_size: cx.batch_size_for::<T>(),
            started: 0,
            stopped: n == 0,
            key_groups: cx
                .run
                .max_parallelism()
                .max(n.min(u16::MAX as usize) as u16),
            ordered: false,
        }
    }

    /// This tail feeds an ordered edge: it sends a [`Message::BatchEnd`] to every consumer
    /// after what it made of each input batch.
    pub(crate) fn ordered(mut self, ordered: bool) -> Self {
        self.ordered = ordered;
        self
    }

    /// Sends buffer `b` (a full or flushed batch) to its destination.
    fn send_buf(&mut self, b: usize) -> Result<(), Halt> {
        if self.buf_mut(b).is_empty() {
            return Ok(());
        }
        let fresh = match self.recycle.as_ref().and_then(|r| r.try_recv().ok()) {
            Some(mut v) => {
                v.clear();
                v
            }
            None => Vec::with_capacity(self.batch_size),
        };
        let batch = std::mem::replace(self.buf_mut(b), fresh);
        let len = batch.len() as u64;
        let dest = match self.partition {
            Partition::Hash(_) if !self.bufs.is_empty() => b,
            Partition::Forward => self.next,
            Partition::RoundRobin => {
                let d = self.next;
                self.next = (d + 1) % self.senders.len();
                d
            }
            _ => self.pick_rebalance(),
        };
        let Some(tx) = &self.senders[dest] else {
            // That consumer finished early and wants nothing more; its share is dropped.
            return Ok(());
        };
        let msg = Message::Data {
            from: self.slot,
            batch,
        };
        match send_blocking(&self.run, &self.metrics, tx, msg) {
            Ok(()) => {
                InstanceMetrics::add(&self.metrics.batches_out, 1);
                InstanceMetrics::add(&self.metrics.records_out, len);
                Ok(())
            }
            Err(_) if self.run.is_cancelled() => Err(Halt::Done),
            Err(_) => {
                self.senders[dest] = None;
                self.live -= 1;
                if self.live == 0 {
                    self.stopped = true;
                    Err(Halt::Done)
                } else {
                    Ok(())
                }
            }
        }
    }

    /// Round-robin over live consumers, preferring one whose channel has room.
    fn pick_rebalance(&mut self) -> usize {
        let n = self.senders.len();
        let start = self.next;
        self.next = (self.next + 1) % n;
        for k in 0..n {
            let i = (start + k) % n;
            if let Some(tx) = &self.senders[i] {
                if !tx.is_full() {
                    return i;
                }
            }
        }
        (0..n)
            .map(|k| (start + k) % n)
            .find(|&i| self.senders[i].is_some())
            .unwrap_or(start)
    }
}

impl<T: Send> ChannelTail<T> {
    #[inline]
    fn buf_mut(&mut self, b: usize) -> &mut Vec<T> {
        if self.bufs.is_empty() {
            &mut self.cur
        } else {
            &mut self.bufs[b]
        }
    }

    /// The slow path of `emit`: a buffer filled up.
    #[cold]
    #[inline(never)]
    fn full(&mut self, b: usize) -> Result<(), Halt> {
        self.send_buf(b)
    }

    /// `emit` when hashing over several destinations (kept out of line so that the common
    /// path inlines into the chain's loop).
    #[inline(never)]
    fn emit_hashed(&mut self, item: T) -> Result<(), Halt> {
        let b = match &self.partition {
            Partition::Hash(h) => self.instance_of(h(&item)),
            _ => 0,
        };
        self.push_to(b, item)
    }

    /// `emit` with the record's partition hash computed by the caller (a tail that knows the
    /// key's type, instead of the edge's boxed hash function).
    #[inline(always)]
    pub(crate) fn emit_hashed_by(&mut self, hash: u64, item: T) -> Result<(), Halt> {
        if self.bufs.is_empty() {
            return self.emit(item);
        }
        self.push_to(self.instance_of(hash), item)
    }

    /// The consumer instance of a record with partition hash `hash`: by key group (see
    /// `checkpoint::state`), the hash picks one of `key_groups` groups (multiply-shift instead
    /// of `%`: a 64-bit division would cost more than the rest of the send, and the hash is
    /// well mixed), and each instance owns a contiguous range of groups, so keyed state is
    /// stored and restored by group.
    #[inline]
    fn instance_of(&self, hash: u64) -> usize {
        let g = crate::checkpoint::state::key_group(hash, self.key_groups);
        crate::checkpoint::state::instance_of_group(g, self.bufs.len(), self.key_groups)
    }

    /// Buffers `item` for consumer instance `b`, sending the batch when it is full.
    #[inline(always)]
    fn push_to(&mut self, b: usize, item: T) -> Result<(), Halt> {
        let buf = &mut self.bufs[b];
        buf.push(item);
        if buf.len() >= self.batch_size {
            return self.full(b);
        }
        Ok(())
    }

    fn is_empty(&self) -> bool {
        self.cur.is_empty() && self.bufs.iter().all(Vec::is_empty)
    }
}

impl<T: Send> Emit<T> for ChannelTail<T> {
    /// The per-record path: one branch, a push and a length check.
    #[inline(always)]
    fn emit(&mut self, item: T) -> Result<(), Halt> {
        if !self.bufs.is_empty() {
            return self.emit_hashed(item);
        }
        self.cur.push(item);
        if self.cur.len() >= self.batch_size {
            return self.full(0);
        }
        Ok(())
    }
}

impl<T: Send> Tail<T> for ChannelTail<T> {
    fn before_batch(&mut self, now: u64) {
        if self.is_empty() {
            self.started = now;
        }
    }

    fn pending_since(&self) -> Option<u64> {
        (!self.is_empty()).then_some(self.started)
    }

    fn flush(&mut self, _cx: &Cx) -> Result<(), Halt> {
        for b in 0..self.bufs.len().max(1) {
            self.send_buf(b)?;
        }
        Ok(())
    }

    fn finish(&mut self, cx: &Cx) -> Result<(), Halt> {
        if !self.stopped {
            match self.flush(cx) {
                Ok(()) | Err(Halt::Done) => {}
                Err(e) => return Err(e),
            }
        }
        if cx.run.is_cancelled() {
            return Err(Halt::Done);
        }
        for tx in self.senders.iter().flatten() {
            // A consumer that is gone needs no end marker.
            let end = Message::End { from: self.slot };
            let _ = send_blocking(&self.run, &self.metrics, tx, end);
        }
        self.senders.clear();
        Ok(())
    }

    fn watermark(&mut self, _cx: &Cx, at: Timestamp) -> Result<(), Halt> {
        self.send_watermark(at)
    }

    fn end_input_batch(&mut self, _cx: &Cx) -> Result<(), Halt> {
        if !self.ordered {
            return Ok(());
        }
        let from = self.slot;
        self.send_control(|| Message::BatchEnd { from })
    }

    fn barrier(
        &mut self,
        _cx: &Cx,
        id: crate::checkpoint::CheckpointId,
        _state: &mut crate::checkpoint::state::InstanceState,
    ) -> Result<(), Halt> {
        self.send_barrier(id)
    }
}

impl<T: Send> ChannelTail<T> {
    /// Sends what is buffered (records older than the watermark must not overtake it), then the
    /// watermark to every consumer: each combines the watermarks of all its inputs.
    pub(crate) fn send_watermark(&mut self, at: Timestamp) -> Result<(), Halt> {
        let from = self.slot;
        self.send_control(|| Message::Watermark { from, at })
    }

    /// Sends what is buffered (a batch never straddles a barrier, and no record overtakes
    /// one), then barrier `id` to every live consumer.
    pub(crate) fn send_barrier(&mut self, id: crate::checkpoint::CheckpointId) -> Result<(), Halt> {
        let from = self.slot;
        self.send_control(|| Message::Barrier { from, id })
    }

    /// Sends every buffered batch, then the message `make` builds to every live consumer.
    fn send_control(&mut self, make: impl Fn() -> Message<T>) -> Result<(), Halt> {
        for b in 0..self.bufs.len().max(1) {
            self.send_buf(b)?;
        }
        for tx in self.senders.iter_mut() {
            let Some(sender) = tx else { continue };
            if send_blocking(&self.run, &self.metrics, sender, make()).is_err() {
                if self.run.is_cancelled() {
                    return Err(Halt::Done);
                }
                *tx = None;
                self.live -= 1;
            }
        }
        if self.live == 0 && !self.senders.is_empty() {
            self.stopped = true;
            return Err(Halt::Done);
        }
        Ok(())
    }
}

/// Fan-out: every record goes to each of several downstream stages.
pub(crate) struct TeeTail<T> {
    pub outs: Vec<ChannelTail<T>>,
    live: Vec<bool>,
}

impl<T> TeeTail<T> {
    pub(crate) fn new(outs: Vec<ChannelTail<T>>) -> Self {
        let live = vec![true; outs.len()];
        TeeTail { outs, live }
    }

    /// Calls `f` on each output still live: one whose consumers all stopped (`Done`, not a
    /// cancel) leaves the set; `Done` when none is left.
    fn each_live(
        &mut self,
        cx: &Cx,
        mut f: impl FnMut(&mut ChannelTail<T>) -> Result<(), Halt>,
    ) -> Result<(), Halt> {
        for (i, out) in self.outs.iter_mut().enumerate() {
            if self.live[i] {
                match f(out) {
                    Ok(()) => {}
                    Err(Halt::Done) if !cx.run.is_cancelled() => self.live[i] = false,
                    Err(e) => return Err(e),
                }
            }
        }
        if self.live.iter().any(|l| *l) {
            Ok(())
        } else {
            Err(Halt::Done)
        }
    }
}

impl<T: Clone + Send> Emit<T> for TeeTail<T> {
    fn emit(&mut self, item: T) -> Result<(), Halt> {
        let mut any = false;
        for (i, out) in self.outs.iter_mut().enumerate() {
            if !self.live[i] {
                continue;
            }
            match out.emit(item.clone()) {
                Ok(()) => any = true,
                Err(Halt::Done) => self.live[i] = false,
                Err(e) => return Err(e),
            }
        }
        if any {
            Ok(())
        } else {
            Err(Halt::Done)
        }
    }
}

impl<T: Clone + Send> Tail<T> for TeeTail<T> {
    fn before_batch(&mut self, now: u64) {
        for out in &mut self.outs {
            out.before_batch(now);
        }
    }
    fn pending_since(&self) -> Option<u64> {
        self.outs.iter().filter_map(|o| o.pending_since()).min()
    }
    fn flush(&mut self, cx: &Cx) -> Result<(), Halt> {
        for (i, out) in self.outs.iter_mut().enumerate() {
            if self.live[i] {
                match out.flush(cx) {
                    Ok(()) => {}
                    Err(Halt::Done) => self.live[i] = false,
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(())
    }
    fn watermark(&mut self, cx: &Cx, at: Timestamp) -> Result<(), Halt> {
        self.each_live(cx, |out| out.watermark(cx, at))
    }
    fn finish(&mut self, cx: &Cx) -> Result<(), Halt> {
        for out in &mut self.outs {
            out.finish(cx)?;
        }
        Ok(())
    }
    fn end_input_batch(&mut self, cx: &Cx) -> Result<(), Halt> {
        self.each_live(cx, |out| out.end_input_batch(cx))
    }
    fn barrier(
        &mut self,
        cx: &Cx,
        id: crate::checkpoint::CheckpointId,
        state: &mut crate::checkpoint::state::InstanceState,
    ) -> Result<(), Halt> {
        for (i, out) in self.outs.iter_mut().enumerate() {
            if self.live[i] {
                match out.barrier(cx, id, state) {
                    Ok(()) => {}
                    Err(Halt::Done) if !cx.run.is_cancelled() => self.live[i] = false,
                    Err(e) => return Err(e),
                }
            }
        }
        if self.live.iter().any(|l| *l) {
            Ok(())
        } else {
            Err(Halt::Done)
        }
    }
}

/// A stage instance's input: one channel fed by every upstream instance.
///
/// It also combines the upstream watermarks (one input slot per upstream instance) in a
/// [`WatermarkTracker`], and reports a rise of their minimum as [`Pull::Watermark`], and it
/// aligns checkpoint barriers over its slots (see [`Align`]).
pub(crate) struct InputHead<T> {
    src: Src<T>,
    /// Where drained batches go back to the producers (dropped when that channel is full).
    recycle: Sender<Vec<T>>,
    ends_expected: usize,
    ends_seen: usize,
    tracker: WatermarkTracker,
    /// How long a silent input may hold the watermark back (`None`: for ever).
    idle_after: Option<std::time::Duration>,
    align: Align<T>,
}

/// Barrier alignment over an input's slots.
///
/// # Design note
///
/// Slot `s` has *delivered* barrier `n` once `Barrier(n)` from it was read; an ended slot
/// counts as having delivered every barrier. When every slot has delivered `n`, the head
/// returns [`Pull::Barrier`]`(n)` and the instance snapshots.
///
/// Exactly-once: from the moment slot `s` delivers `n` until every slot has, every later
/// message from `s` (data, watermarks, its next barrier, its end) is *held*, in arrival order,
/// in `held`, while the other slots are read; so the snapshot holds exactly the records before
/// the barrier on every slot. When the barrier is returned, the held messages are moved in
/// front of `replay` and read before the channel again (per slot, order is kept: a held message
/// of a slot is always older than that slot's messages still in `replay`). Nothing is read
/// from the channel while `replay` is non-empty, so `held` and `replay` together never hold
/// more than `bound` messages (`4 × channel_capacity × slots`, at least 64: a held slot is no
/// longer backpressured by this consumer, so its burst can be several channels' worth before
/// the slowest slot's barrier arrives; still a fixed bound). When `held` would
/// exceed it, the instance *declines* the checkpoint (the coordinator fails it), releases what
/// it held in order, stops holding for it, and still returns `Pull::Barrier(n)` once every slot
/// delivered `n` — the runtime then sees that `n` is no longer pending, takes no snapshot and
/// only forwards the barrier, so downstream never waits for ever.
///
/// At-least-once: nothing is held; `Pull::Barrier(n)` is returned when the last slot delivers
/// `n` (records after the barrier on faster slots are then in the snapshot).
///
/// Cost: a barrier costs a lock (the first one reads the run's checkpoint settings) and a
/// scan of the slots; the data path checks one `Option` per message.
struct Align<T> {
    /// The latest barrier each slot delivered.
    delivered: Vec<u64>,
    ended: Vec<bool>,
    /// Barriers seen but not yet returned, with when the first slot delivered each.
    seen: std::collections::BTreeMap<u64, Instant>,
    /// The last barrier returned.
    emitted: u64,
    /// Exactly-once and aligning on this barrier: messages of slots that delivered it are held.
    holding: Option<u64>,
    held: std::collections::VecDeque<Message<T>>,
    replay: std::collections::VecDeque<Message<T>>,
    bound: usize,
    /// The run's mode, read at the first barrier.
    exactly_once: Option<bool>,
    /// A pull to return before reading more (a watermark that came with an end marker that
    /// also completed an alignment).
    deferred: Option<Pull>,
}

impl<T> Align<T> {
    fn new(slots: usize) -> Self {
        Align {
            delivered: vec![0; slots],
            ended: vec![false; slots],
            seen: std::collections::BTreeMap::new(),
            emitted: 0,
            holding: None,
            held: std::collections::VecDeque::new(),
            replay: std::collections::VecDeque::new(),
            bound: 16,
            exactly_once: None,
            deferred: None,
        }
    }

    /// Whether a message from `from` must be held.
    #[inline]
    fn holds(&self, from: usize) -> bool {
        match self.holding {
            None => false,
            Some(n) => self.delivered.get(from).is_some_and(|d| *d >= n),
        }
    }

    /// The smallest barrier seen that every slot has delivered, if any.
    fn complete(&self) -> Option<u64> {
        let (&n, _) = self.seen.iter().next()?;
        self.delivered
            .iter()
            .zip(&self.ended)
            .all(|(d, e)| *e || *d >= n)
            .then_some(n)
    }
}

fn from_of<T>(m: &Message<T>) -> usize {
    match m {
        Message::Data { from, .. }
        | Message::Watermark { from, .. }
        | Message::End { from }
        | Message::BatchEnd { from }
        | Message::Barrier { from, .. } => *from,
    }
}

/// Where an input head reads its messages.
enum Src<T> {
    /// One channel every upstream instance sends to, read in arrival order.
    Shared(Receiver<Message<T>>),
    /// One channel per upstream instance, read in turn.
    Turns(Turns<T>),
}

/// The merge of an ordered edge: upstream instance `i`'s messages on `rxs[i]`, read in turn.
///
/// # Design note
///
/// The stage feeding an ordered stage deals its batches strictly round-robin
/// ([`Partition::RoundRobin`]): batch `k` goes to instance `k % n`. Each instance ends what it
/// made of an input batch with [`Message::BatchEnd`] — also when a filter made nothing of it,
/// and after all the batches a flat_map made of it. So the merge reads `rxs[turn]` until that
/// marker and then moves to the next instance: batch `k`'s output is read before batch
/// `k + 1`'s, which is input order. The marker never reaches [`InputHead::pull`].
///
/// No reorder buffer: an instance that is ahead fills its own bounded channel and blocks
/// (backpressure), and the dealer blocks on that instance's input in turn. This cannot
/// deadlock: the instance whose batch the merge waits for has that batch in hand (it was dealt
/// before every later one), and what it makes of it goes to the channel being read.
///
/// Control messages stay in each instance's stream: watermarks are combined per slot as on a
/// shared channel, and a barrier from one dealer sits at the same batch boundary in every
/// instance's stream, so turn `k` meets it first and the next turns meet it at the head of
/// theirs (exactly-once alignment then holds at most one round of batches). An instance's
/// [`Message::End`] takes it out of the turn; a channel closing without it is the same
/// protocol error or failing run as on a shared channel; cancellation wakes the blocked read.
/// Several independent producers (an ordered parallel source, whose parts inject barriers at
/// their own pace) can deliver a barrier at different batches: keeping the order would then put
/// records after a held slot's barrier before records of a slot not yet aligned, so the head
/// declines that checkpoint instead (`InputHead::pull`) and keeps the order.
struct Turns<T> {
    rxs: Vec<Receiver<Message<T>>>,
    /// The instance whose batch comes next.
    turn: usize,
    /// Instances whose end marker was read: out of the turn.
    ended: Vec<bool>,
}

impl<T> Turns<T> {
    /// Moves the turn to the next instance that has not ended (stays put when all have).
    fn advance(&mut self) {
        let n = self.rxs.len();
        for k in 1..=n {
            let i = (self.turn + k) % n;
            if !self.ended[i] {
                self.turn = i;
                return;
            }
        }
    }
}

impl<T> InputHead<T> {
    pub(crate) fn new(
        rx: Receiver<Message<T>>,
        ends_expected: usize,
        recycle: Sender<Vec<T>>,
        idle_after: Option<std::time::Duration>,
    ) -> Self {
        Self::with_src(Src::Shared(rx), ends_expected, recycle, idle_after)
    }

    /// The input of a consumer of an ordered edge: `rxs[i]` carries upstream instance `i`'s
    /// messages (its input slot is `i`), read in turn (see [`Turns`]).
    pub(crate) fn in_turns(
        rxs: Vec<Receiver<Message<T>>>,
        recycle: Sender<Vec<T>>,
        idle_after: Option<std::time::Duration>,
    ) -> Self {
        let n = rxs.len();
        let turns = Turns {
            rxs,
            turn: 0,
            ended: vec![false; n],
        };
        Self::with_src(Src::Turns(turns), n, recycle, idle_after)
    }

    fn with_src(
        src: Src<T>,
        ends_expected: usize,
        recycle: Sender<Vec<T>>,
        idle_after: Option<std::time::Duration>,
    ) -> Self {
        InputHead {
            src,
            recycle,
            ends_expected,
            ends_seen: 0,
            tracker: WatermarkTracker::new(ends_expected, idle_after, Instant::now()),
            idle_after,
            align: Align::new(ends_expected),
        }
    }
    /// Receives the next message, blocking (timed as idle) at most until `flush_at`.
    /// `Ok(None)` means "idle: flush now". On an ordered edge, the next message in turn (batch
    /// end markers are consumed here).
    pub(crate) fn recv(
        &mut self,
        cx: &Cx,
        flush_at: Option<u64>,
    ) -> Result<Option<Message<T>>, Halt> {
        loop {
            let m = self.recv_raw(cx, flush_at)?;
            let Src::Turns(t) = &mut self.src else {
                return Ok(m);
            };
            match m {
                Some(Message::BatchEnd { from }) => {
                    debug_assert_eq!(from, t.turn, "a batch end out of turn");
                    t.advance();
                }
                Some(Message::End { from }) => {
                    if let Some(e) = t.ended.get_mut(from) {
                        *e = true;
                    }
                    t.advance();
                    return Ok(Some(Message::End { from }));
                }
                other => return Ok(other),
            }
        }
    }

    /// The channel to read now: the shared one, or the one whose turn it is.
    fn current(&self) -> &Receiver<Message<T>> {
        match &self.src {
            Src::Shared(rx) => rx,
            Src::Turns(t) => &t.rxs[t.turn],
        }
    }

    fn recv_raw(&self, cx: &Cx, flush_at: Option<u64>) -> Result<Option<Message<T>>, Halt> {
        let rx = self.current();
        // The input's fill, for reports and the console: two relaxed stores per message.
        let relaxed = crate::sync::Ordering::Relaxed;
        cx.metrics.queue_len.store(rx.len() as u64, relaxed);
        cx.metrics
            .queue_capacity
            .store(rx.capacity().unwrap_or(0) as u64, relaxed);
        match rx.try_recv() {
            Ok(m) => return Ok(Some(m)),
            Err(TryRecvError::Disconnected) => return Err(self.disconnected(cx)),
            Err(TryRecvError::Empty) => {}
        }
        let t0 = Instant::now();
        // Yield before parking (see `send_blocking`).
        for _ in 0..YIELDS {
            std::thread::yield_now();
            match rx.try_recv() {
                Ok(m) => {
                    InstanceMetrics::add(&cx.metrics.recv_wait_ns, t0.elapsed().as_nanos() as u64);
                    return Ok(Some(m));
                }
                Err(TryRecvError::Disconnected) => return Err(self.disconnected(cx)),
                Err(TryRecvError::Empty) => {}
            }
            if cx.run.is_cancelled() {
                return Err(Halt::Done);
            }
        }
        // While some input may still be released as idle, wake up to check it.
        let idle_check = self
            .idle_after
            .filter(|_| self.tracker.current() < Timestamp::MAX)
            .map(|d| cx.run.now_ms() + (d.as_millis() as u64 / 2).max(1));
        let wake = match (flush_at, idle_check) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        // Parked: marked so that a snapshot sees the idle time while it lasts.
        let parked = Parked::new(
            &cx.metrics.recv_parked_since_ms,
            cx.run.clock_ms.load(relaxed),
        );
        let result = match wake {
            Some(at) => {
                let wait = std::time::Duration::from_millis(at.saturating_sub(cx.run.now_ms()));
                select! {
                    recv(rx) -> m => m.map(Some).map_err(|_| ()),
                    recv(cx.run.cancel_rx) -> _ => return Err(Halt::Done),
                    default(wait) => Ok(None),
                }
            }
            None => select! {
                recv(rx) -> m => m.map(Some).map_err(|_| ()),
                recv(cx.run.cancel_rx) -> _ => return Err(Halt::Done),
            },
        };
        drop(parked);
        InstanceMetrics::add(&cx.metrics.recv_wait_ns, t0.elapsed().as_nanos() as u64);
        result.map_err(|()| self.disconnected(cx))
    }

    fn disconnected(&self, cx: &Cx) -> Halt {
        if cx.run.is_cancelled() || cx.run.has_failed() {
            Halt::Done
        } else {
            Halt::Failed(crate::Error::Protocol {
                stage: cx.stage.to_string(),
                message: format!(
                    "input closed after {} of {} end-of-stream markers",
                    self.ends_seen, self.ends_expected
                ),
            })
        }
    }

    /// Counts input `from`'s end marker: whether every upstream instance has ended, and the
    /// watermark if the ended input was holding it back.
    fn end(&mut self, from: usize) -> (bool, Option<Timestamp>) {
        self.ends_seen += 1;
        let wm = self.tracker.ended(from, Instant::now());
        (self.ends_seen >= self.ends_expected, wm)
    }
}

impl<T> InputHead<T> {
    /// Slot `from` delivered barrier `id`: returns the barrier to hand on if that completed an
    /// alignment.
    fn on_barrier(&mut self, cx: &Cx, from: usize, id: u64) -> Option<Pull> {
        let a = &mut self.align;
        if a.exactly_once.is_none() {
            let exactly = cx
                .run
                .checkpoint
                .lock()
                .as_ref()
                .is_some_and(|c| c.mode == crate::checkpoint::Mode::ExactlyOnce);
            a.exactly_once = Some(exactly);
            a.bound = (4 * cx.run.opts.channel_capacity * a.delivered.len()).max(64);
        }
        if let Some(d) = a.delivered.get_mut(from) {
            *d = (*d).max(id);
        }
        if id > a.emitted {
            a.seen.entry(id).or_insert_with(Instant::now);
            if a.exactly_once == Some(true) && a.holding.is_none() {
                a.holding = a.seen.keys().next().copied();
            }
        }
        self.try_emit(cx)
    }

    /// Returns the oldest barrier every slot has delivered, if any, releasing what was held.
    fn try_emit(&mut self, cx: &Cx) -> Option<Pull> {
        let a = &mut self.align;
        let n = a.complete()?;
        let since = a.seen.remove(&n).unwrap_or_else(Instant::now);
        let ns = since.elapsed().as_nanos() as u64;
        InstanceMetrics::add(&cx.metrics.align_ns, ns);
        cx.metrics
            .last_align_ns
            .store(ns, crate::sync::Ordering::Relaxed);
        a.emitted = n;
        // Release: held messages go first (they are older than their slots' replayed ones).
        let mut held = std::mem::take(&mut a.held);
        held.append(&mut a.replay);
        a.replay = held;
        a.holding = match a.exactly_once {
            Some(true) => a.seen.keys().next().copied(),
            _ => None,
        };
        Some(Pull::Barrier(n))
    }

    /// The hold buffer is full: decline the barrier being aligned and release what is held.
    #[cold]
    fn overflow(&mut self, cx: &Cx) {
        let why = format!(
            "alignment buffer full ({} messages held)",
            self.align.held.len()
        );
        self.decline(cx, &why);
    }

    /// Declines the barrier being aligned (the coordinator fails it) and releases what is held,
    /// in order.
    #[cold]
    fn decline(&mut self, cx: &Cx, why: &str) {
        let a = &mut self.align;
        let Some(n) = a.holding.take() else { return };
        if let Some(cp) = cx.run.checkpoint.lock().clone() {
            let who = crate::checkpoint::InstanceId {
                stage: cx.stage.to_string(),
                instance: cx.instance,
            };
            cp.coord.decline(n, &who, why);
        }
        let mut held = std::mem::take(&mut a.held);
        held.append(&mut a.replay);
        a.replay = held;
    }
}

impl<T: Send> Head<T> for InputHead<T> {
    fn pull(&mut self, cx: &Cx, buf: &mut Vec<T>, flush_at: Option<u64>) -> Result<Pull, Halt> {
        loop {
            if let Some(p) = self.align.deferred.take() {
                return Ok(p);
            }
            let msg = match self.align.replay.pop_front() {
                Some(m) => m,
                None => match self.recv(cx, flush_at)? {
                    Some(m) => m,
                    None => {
                        // Woken without input: releasing idle inputs may advance the watermark.
                        return Ok(match self.tracker.advance(Instant::now()) {
                            Some(wm) => Pull::Watermark(wm),
                            None => Pull::Idle,
                        });
                    }
                },
            };
            if self.align.holding.is_some() && self.align.holds(from_of(&msg)) {
                self.align.held.push_back(msg);
                if self.align.held.len() > self.align.bound {
                    self.overflow(cx);
                }
                continue;
            }
            if self.align.holding.is_some()
                && matches!(self.src, Src::Turns(_))
                && matches!(msg, Message::Data { .. })
            {
                // Ordered input, data of a slot not yet aligned after data held: delivering it
                // now would break the order (see `Turns`). Release the held data first, then
                // this message, then whatever was still to replay.
                self.align.replay.push_front(msg);
                self.decline(
                    cx,
                    "ordered input: the barrier came at different batches of the upstream instances",
                );
                continue;
            }
            match msg {
                Message::Data { from, mut batch } => {
                    if self.idle_after.is_some() {
                        self.tracker.heard(from, Instant::now());
                    }
                    std::mem::swap(buf, &mut batch);
                    if batch.capacity() > 0 {
                        // `batch` is the caller's previous, drained buffer.
                        batch.clear();
                        let _ = self.recycle.try_send(batch);
                    }
                    return Ok(Pull::Data);
                }
                Message::Watermark { from, at } => {
                    if let Some(wm) = self.tracker.update(from, at, Instant::now()) {
                        return Ok(Pull::Watermark(wm));
                    }
                }
                Message::Barrier { from, id } => {
                    if let Some(p) = self.on_barrier(cx, from, id) {
                        return Ok(p);
                    }
                }
                // Consumed by `recv` on an ordered edge; never sent on a shared channel.
                Message::BatchEnd { .. } => {}
                Message::End { from } => {
                    if let Some(e) = self.align.ended.get_mut(from) {
                        *e = true;
                    }
                    match self.end(from) {
                        // Every input ended: the instance finishes (its final snapshot covers
                        // any barrier still being aligned).
                        (true, _) => return Ok(Pull::End),
                        (false, wm) => {
                            let wm = wm.map(Pull::Watermark);
                            if let Some(p) = self.try_emit(cx) {
                                self.align.deferred = wm;
                                return Ok(p);
                            }
                            if let Some(p) = wm {
                                return Ok(p);
                            }
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Error;

    /// An input whose upstream went away without its end marker, in a run that is neither
    /// cancelled nor failing, is a protocol breach naming the stage.
    #[test]
    fn an_input_closed_early_is_a_protocol_error() {
        let (tx, rx) = crossbeam_channel::bounded::<Message<u32>>(4);
        let (recycle, _recycled) = crossbeam_channel::bounded(4);
        let mut input = InputHead::new(rx, 2, recycle, None);
        let cx = Cx {
            run: RunShared::new(crate::Options::default()),
            stage: "sink".into(),
            instance: 0,
            source: false,
            metrics: Arc::new(InstanceMetrics::default()),
        };
        tx.send(Message::End { from: 0 }).unwrap();
        drop(tx);
        assert!(matches!(
            input.recv(&cx, None),
            Ok(Some(Message::End { from: 0 }))
        ));
        input.end(0);
        match input.recv(&cx, None) {
            Err(Halt::Failed(e @ Error::Protocol { .. })) => {
                assert_eq!(e.stage(), Some("sink"));
                assert_eq!(
                    e.to_string(),
                    "stage `sink`: channel protocol violated: input closed after 1 of 2 \
                     end-of-stream markers"
                );
            }
            other => panic!("expected a protocol error, got {other:?}"),
        }
    }

    use crate::checkpoint::coordinator::{
        mem::MemStore, Config, Coordinator, Expected, ManualClock,
    };
    use crate::checkpoint::{CheckpointRun, InstanceId, Mode, Outcome};

    /// A run whose checkpointing expects one instance, `sink#0`, with checkpoint 1 triggered.
    fn checkpointing(mode: Mode) -> Cx {
        let run = RunShared::new(crate::Options::default());
        let cfg = Config {
            interval: std::time::Duration::ZERO,
            timeout: std::time::Duration::from_secs(60),
            max_concurrent: 1,
            min_pause: std::time::Duration::ZERO,
            tolerable_failures: 5,
            retain: 3,
            max_parallelism: 128,
        };
        let who = InstanceId {
            stage: "sink".into(),
            instance: 0,
        };
        let coord = Coordinator::new(
            cfg,
            Arc::new(MemStore::default()),
            Arc::new(ManualClock::new()),
            vec![Expected {
                instance: who,
                fingerprint: "sink p=1".into(),
                stateful: false,
                dead_letter_side: false,
            }],
            0,
            Vec::new(),
            Vec::new(),
        );
        coord.step();
        assert_eq!(coord.triggered(), 1);
        let store: Arc<dyn crate::checkpoint::store::Store> = Arc::new(MemStore::default());
        *run.checkpoint.lock() = Some(Arc::new(CheckpointRun {
            coord: Arc::new(coord),
            store,
            mode,
            restored: Default::default(),
            retain_on_success: false,
            resumed_from: None,
            skipped: Vec::new(),
            drop_ack: None,
            fresh_discards: None,
            dir: std::path::PathBuf::new(),
            spool_stdin: false,
            spool_taken: crate::sync::AtomicBool::new(false),
            already_completed: None,
        }));
        Cx {
            run,
            stage: "sink".into(),
            instance: 0,
            source: false,
            metrics: Arc::new(InstanceMetrics::default()),
        }
    }

    /// What the head returns, as text, until its input ends.
    fn drain(cx: &Cx, head: &mut InputHead<u32>) -> Vec<String> {
        let mut out = Vec::new();
        let mut buf = Vec::new();
        loop {
            let p = head.pull(cx, &mut buf, None).unwrap();
            match p {
                Pull::Data => out.push(format!("{:?}", buf)),
                Pull::Barrier(n) => out.push(format!("B{n}")),
                Pull::End => return out,
                Pull::Watermark(w) => out.push(format!("W{w:?}")),
                Pull::Idle => {}
            }
            buf.clear();
        }
    }

    fn data(from: usize, x: u32) -> Message<u32> {
        Message::Data {
            from,
            batch: vec![x],
        }
    }

    /// Exactly-once: after slot 0's barrier its data is held while slot 1 is read; the barrier
    /// is returned once slot 1 delivers it, and the held data follows it.
    #[test]
    fn exactly_once_alignment_holds_the_barriered_slot() {
        let cx = checkpointing(Mode::ExactlyOnce);
        let (tx, rx) = crossbeam_channel::bounded(64);
        let (recycle, _r) = crossbeam_channel::bounded(64);
        let mut head = InputHead::new(rx, 2, recycle, None);
        for m in [
            data(0, 1),
            Message::Barrier { from: 0, id: 1 },
            data(0, 2),
            data(1, 10),
            Message::Barrier { from: 1, id: 1 },
            data(1, 11),
            Message::End { from: 0 },
            Message::End { from: 1 },
        ] {
            tx.send(m).unwrap();
        }
        assert_eq!(drain(&cx, &mut head), ["[1]", "[10]", "B1", "[2]", "[11]"]);
        let ns = cx.metrics.align_ns.load(crate::sync::Ordering::Relaxed);
        assert!(ns > 0, "alignment time is measured");
    }

    /// At-least-once: nothing is held; the barrier comes when the last slot delivers it.
    #[test]
    fn at_least_once_alignment_holds_nothing() {
        let cx = checkpointing(Mode::AtLeastOnce);
        let (tx, rx) = crossbeam_channel::bounded(64);
        let (recycle, _r) = crossbeam_channel::bounded(64);
        let mut head = InputHead::new(rx, 2, recycle, None);
        for m in [
            Message::Barrier { from: 0, id: 1 },
            data(0, 2),
            data(1, 10),
            Message::Barrier { from: 1, id: 1 },
            Message::End { from: 0 },
            Message::End { from: 1 },
        ] {
            tx.send(m).unwrap();
        }
        assert_eq!(drain(&cx, &mut head), ["[2]", "[10]", "B1"]);
    }

    /// An ended slot counts as having delivered every barrier.
    #[test]
    fn an_ended_slot_completes_the_alignment() {
        let cx = checkpointing(Mode::ExactlyOnce);
        let (tx, rx) = crossbeam_channel::bounded(64);
        let (recycle, _r) = crossbeam_channel::bounded(64);
        let mut head = InputHead::new(rx, 2, recycle, None);
        for m in [
            Message::Barrier { from: 0, id: 1 },
            data(0, 2),
            data(1, 10),
            Message::End { from: 1 },
            Message::End { from: 0 },
        ] {
            tx.send(m).unwrap();
        }
        assert_eq!(drain(&cx, &mut head), ["[10]", "B1", "[2]"]);
    }

    /// More held messages than the bound (16 here): the instance declines the checkpoint (it
    /// fails at the coordinator), releases what it held in order, and still returns the
    /// barrier once every slot delivered it.
    #[test]
    fn alignment_overflow_declines_and_releases_in_order() {
        let cx = checkpointing(Mode::ExactlyOnce);
        // One more than the hold bound (at least 64 messages) from the slot that delivered
        // the barrier, before the other slot's barrier.
        let over = 65;
        let (tx, rx) = crossbeam_channel::bounded(over + 8);
        let (recycle, _r) = crossbeam_channel::bounded(over + 8);
        let mut head = InputHead::new(rx, 2, recycle, None);
        tx.send(Message::Barrier { from: 0, id: 1 }).unwrap();
        for x in 0..over as u32 {
            tx.send(data(0, x)).unwrap();
        }
        tx.send(data(1, 100)).unwrap();
        tx.send(Message::Barrier { from: 1, id: 1 }).unwrap();
        tx.send(Message::End { from: 0 }).unwrap();
        tx.send(Message::End { from: 1 }).unwrap();
        let got = drain(&cx, &mut head);
        let mut want: Vec<String> = (0..over).map(|x| format!("[{x}]")).collect();
        want.push("[100]".into());
        want.push("B1".into());
        assert_eq!(got, want);
        let cp = cx.run.checkpoint.lock().clone().unwrap();
        assert!(!cp.coord.is_pending(1));
        let stats = cp.coord.stats();
        assert_eq!(stats.len(), 1);
        assert_eq!(stats[0].outcome, Outcome::Failed);
        let why = stats[0].error.as_deref().unwrap();
        assert!(
            why.contains("declined by sink#0") && why.contains("alignment buffer full"),
            "{why}"
        );
    }
}
