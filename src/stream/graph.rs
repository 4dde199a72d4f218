//! The graph under construction: stage slots, the edges between them, and how a stage's heads
//! and tails are made when the run starts.
//!
//! Building is in two phases so that every stage can refer to channels that do not exist yet.
//! A stage registers a [`StageSlot`] when its stream is *closed* (by a sink or a partitioning
//! step). [`Pipeline::run`](crate::Pipeline::run) then calls each slot's phase 1 in order, which
//! makes the stage's heads — and, for a stage reading edges, the channels of those edges, filling
//! in the producers' [`EdgeCell`]s — and returns phase 2, which makes the workers once every
//! channel exists. A producer is always registered before its consumers, so phase 1 of a
//! consumer runs after its producers' phase 1 and before their phase 2.

use std::cell::RefCell;
use std::collections::HashSet;
use std::hash::{Hash, Hasher};
use std::rc::Rc;
use std::sync::Arc;

use crossbeam_channel::{bounded, Receiver, Sender};
use rustc_hash::FxHasher;

use crate::channel::{ChannelTail, InputHead, Message, Partition};
use crate::error::Error;
use crate::operator::Halt;
use crate::runtime::{Cx, Head, Options, Worker};

/// Makes a stage's workers, once every channel exists.
pub(super) type Phase2 = Box<dyn FnOnce() -> Result<Vec<Worker>, Error>>;
/// Makes a stage's heads (and its input channels) once its names are final.
pub(super) type Phase1 = Box<dyn FnOnce(&Names, &Options) -> Result<Phase2, Error>>;

/// A stage's final names, known when the run starts.
#[derive(Clone)]
pub(super) struct Names {
    /// The whole stage (`source+map+sink`): what metrics and errors of the stage's threads say.
    pub(super) stage: Arc<str>,
    /// Its sink, if it ends in one.
    pub(super) sink: Option<Arc<str>>,
}

/// One registered stage.
pub(super) struct StageSlot {
    /// The operators' part of the name (`source+map+filter`); empty when the stage is only a
    /// sink reading a channel.
    pub(super) chain_name: String,
    /// The sink's name, for a stage that ends in one; [`Sink::name`](super::Sink::name) can still
    /// change it after the stage is closed.
    pub(super) sink: Option<Arc<str>>,
    pub(super) parallelism: usize,
    pub(super) inputs: Vec<usize>,
    /// Whether the stage's head is a dead-letter source.
    pub(super) dead_letter: bool,
    /// The counted steps of the stage, in order (head, operators; the sink is added from
    /// `sink`).
    pub(super) steps: Vec<crate::metrics::StepEntry>,
    pub(super) build: Option<Phase1>,
}

impl StageSlot {
    /// The stage's name: its operators and its sink, joined by `+`.
    pub(super) fn name(&self) -> String {
        match (&self.sink, self.chain_name.is_empty()) {
            (None, _) => self.chain_name.clone(),
            (Some(s), true) => s.to_string(),
            (Some(s), false) => format!("{}+{s}", self.chain_name),
        }
    }
}

/// The builder state shared by every stream of one pipeline.
#[derive(Default)]
pub(super) struct Builder {
    pub(super) opts: Options,
    pub(super) stages: Vec<StageSlot>,
    names: HashSet<String>,
    pub(super) errors: Vec<String>,
    /// The dead-letter handles this pipeline made (their identities), to refuse another's.
    pub(super) dead_letter_handles: HashSet<usize>,
    /// Checkpoint fingerprints set by the TOML layer (stage name → its kind and parameters);
    /// a stage without one gets `"<stage> p=<parallelism>"`.
    pub(super) fingerprints: std::collections::HashMap<String, String>,
}

impl Builder {
    /// A builder for a pipeline run with `opts`.
    pub(super) fn new(opts: Options) -> Self {
        Builder {
            opts,
            ..Builder::default()
        }
    }

    /// A default name for a step of kind `kind`: the kind itself, or `kind-2`, `kind-3`, ...
    pub(super) fn default_name(&mut self, kind: &str) -> Arc<str> {
        let mut name = kind.to_string();
        let mut k = 1;
        while self.names.contains(&name) {
            k += 1;
            name = format!("{kind}-{k}");
        }
        self.names.insert(name.clone());
        Arc::from(name)
    }

    /// Gives the step named `old` the explicit name `new`; a name already taken is recorded as
    /// a build error (reported by `run`).
    pub(super) fn rename(&mut self, old: Option<&str>, new: &str) -> Arc<str> {
        if let Some(old) = old {
            self.names.remove(old);
        }
        if !self.names.insert(new.to_string()) {
            self.errors.push(format!("duplicate stage name `{new}`"));
        }
        Arc::from(new)
    }
}

/// Where one stage's output goes: filled in by the consumer when it is built.
pub(super) struct EdgeCell<T> {
    pub(super) partition: Partition<T>,
    pub(super) senders: Option<Vec<Sender<Message<T>>>>,
    /// Emptied batches coming back from the consumers, for the producers to refill.
    pub(super) recycle: Option<Receiver<Vec<T>>>,
    pub(super) from_stage: usize,
    pub(super) from_name: String,
    pub(super) from_parallelism: usize,
    /// The input slot of the producer's instance 0 at the consumer (edges into one stage
    /// number their producers' instances one after another).
    pub(super) slot_base: usize,
    /// The producer asked for order ([`Stream::ordered`](super::Stream::ordered), with more
    /// than one instance): its tails mark the end of each input batch, and the consumer reads
    /// one channel per producer instance in turn (see `channel::Turns`).
    pub(super) ordered: bool,
    /// On an ordered edge, the senders by producer instance, then consumer instance (each pair
    /// has its own channel); `senders` is then unused.
    pub(super) turn_senders: Option<Vec<Vec<Sender<Message<T>>>>>,
}

/// An edge, shared by the producing stage (which sends on it) and the consuming one (which
/// makes its channels).
pub(super) type Edge<T> = Rc<RefCell<EdgeCell<T>>>;

/// A new edge out of a stage named `from_name` with `from_parallelism` instances; the stage's
/// id is filled in when the producer is registered.
pub(super) fn edge<T>(
    partition: Partition<T>,
    from_name: String,
    from_parallelism: usize,
) -> Edge<T> {
    Rc::new(RefCell::new(EdgeCell {
        partition,
        senders: None,
        recycle: None,
        from_stage: usize::MAX,
        from_name,
        from_parallelism,
        slot_base: 0,
        ordered: false,
        turn_senders: None,
    }))
}

/// Makes a stage's heads (one per instance) when the run starts, given the head's final name,
/// the stage's parallelism, the run's options and whether the stage keeps input order
/// (`.ordered()` with more than one instance).
pub(super) type MakeHeads<I> =
    Box<dyn FnOnce(&Arc<str>, usize, &Options, bool) -> Result<Vec<Box<dyn Head<I>>>, Error>>;

/// Makes the tail maker of one instance (`usize`), given the stage's final names.
pub(super) type TailFactory<T> = Box<dyn FnMut(&Names, usize) -> Result<MakeTail<T>, Error>>;

/// Makes a tail on its worker thread.
pub(super) type MakeTail<T> = Box<dyn FnOnce(&Cx) -> Result<T, Halt> + Send>;

/// How a stage's instances are made when the run starts.
pub(super) struct HeadSpec<I> {
    /// The head's own name (a source, an aggregation, a plugin node); `None` for a plain
    /// channel input.
    pub(super) name: Option<Arc<str>>,
    /// Whether the head is a source (one instance, no input).
    pub(super) source: bool,
    /// Whether the head is a dead-letter source (see [`crate::dead_letter`]).
    pub(super) dead_letter: bool,
    /// The head's shape, when it is a counted step (a source, an aggregation, a window, an
    /// exec or plugin node); `None` for a plain channel input.
    pub(super) shape: Option<crate::metrics::Shape>,
    /// Counted steps moved into the head (by `into_head`), before its own.
    pub(super) steps: Vec<crate::metrics::StepEntry>,
    /// Counts the records pushed into the chain where a head's message stands for several
    /// (a split source's stripes: see [`Stripes`](crate::operator::Stripes)); `None`: the
    /// stage's `chain_in` metrics count them.
    pub(super) input: Option<Arc<crate::sync::AtomicU64>>,
    pub(super) inputs: Vec<usize>,
    pub(super) make: MakeHeads<I>,
    /// For a stage fed by one edge out of a partitioning step: makes that edge deal strictly
    /// round-robin, as an ordered stage needs; an error when the producer has several
    /// instances (there is no one input order to keep). `None` for other heads.
    pub(super) order_input: Option<OrderInput>,
}

/// See [`HeadSpec::order_input`].
pub(super) type OrderInput = Box<dyn FnOnce() -> Result<(), String>>;

/// What makes the edge `e` feed an ordered stage (see [`HeadSpec::order_input`]).
pub(super) fn order_input<T: 'static>(e: &Edge<T>) -> OrderInput {
    let e = Rc::clone(e);
    Box::new(move || {
        let mut e = e.borrow_mut();
        if e.from_parallelism > 1 {
            return Err(format!(
                "`{}` runs {} instances, so its output has no one order to keep: merge it first \
                 (`.new_stage()`, itself ordered if need be)",
                e.from_name, e.from_parallelism
            ));
        }
        e.partition = Partition::RoundRobin;
        Ok(())
    })
}

/// Builds the per-instance tail maker for an edge, at run time (phase 2).
pub(super) fn channel_tail<T: Send + 'static>(
    edge: &Edge<T>,
    instance: usize,
) -> Result<MakeTail<ChannelTail<T>>, Error> {
    let e = edge.borrow();
    let turn_senders = e.turn_senders.as_ref().map(|t| t[instance].clone());
    let senders = turn_senders.or_else(|| e.senders.clone()).ok_or_else(|| {
        Error::Build(format!(
            "the output of stage `{}` is never consumed: end the stream in a sink",
            e.from_name
        ))
    })?;
    let partition = e.partition.clone();
    let recycle = e.recycle.clone();
    let slot = e.slot_base + instance;
    let ordered = e.ordered;
    Ok(Box::new(move |cx: &Cx| {
        Ok(ChannelTail::new(cx, instance, slot, senders, partition, recycle).ordered(ordered))
    }))
}

/// A head spec reading the given edges; the channels are made when the run starts. `wrap`
/// turns each instance's channel input into the stage's head, given the head's name.
pub(super) fn input_head<X, I, W>(edges: Vec<Edge<X>>, mut wrap: W) -> HeadSpec<I>
where
    X: Send + 'static,
    W: FnMut(&Arc<str>, InputHead<X>) -> Box<dyn Head<I>> + 'static,
{
    let inputs = edges.iter().map(|e| e.borrow().from_stage).collect();
    HeadSpec {
        name: None,
        source: false,
        dead_letter: false,
        shape: None,
        steps: Vec::new(),
        inputs,
        order_input: None,
        input: None,
        make: Box::new(move |name, parallelism, opts, _| {
            let ends: usize = edges.iter().map(|e| e.borrow().from_parallelism).sum();
            if edges.len() > 1 {
                if let Some(e) = edges.iter().find(|e| e.borrow().ordered) {
                    return Err(Error::Build(format!(
                        "stage `{}` is ordered, but a union merges it with another stream \
                         into `{name}`, which loses its order: merge streams before the \
                         ordered stage",
                        e.borrow().from_name
                    )));
                }
            }
            if let [e] = &edges[..] {
                if e.borrow().ordered {
                    return Ok(in_turns(e, name, parallelism, opts, &mut wrap));
                }
            }
            let (txs, rxs): (Vec<_>, Vec<_>) = (0..parallelism)
                .map(|_| bounded(opts.channel_capacity))
                .unzip();
            // Bounded: at most as many empty batches as the channels and the batches being
            // filled or drained can hold.
            let (back_tx, back_rx) = bounded(parallelism * (opts.channel_capacity + 2));
            let mut slot_base = 0;
            for e in &edges {
                let mut e = e.borrow_mut();
                e.senders = Some(txs.clone());
                e.recycle = Some(back_rx.clone());
                e.slot_base = slot_base;
                slot_base += e.from_parallelism;
            }
            let idle = opts.idle_timeout;
            Ok(rxs
                .into_iter()
                .map(|rx| wrap(name, InputHead::new(rx, ends, back_tx.clone(), idle)))
                .collect())
        }),
    }
}

/// The heads of the consumer of an ordered edge: one channel per (producer, consumer) pair,
/// each consumer instance reading its producers' channels in turn.
fn in_turns<X, I, W>(
    e: &Edge<X>,
    name: &Arc<str>,
    parallelism: usize,
    opts: &Options,
    wrap: &mut W,
) -> Vec<Box<dyn Head<I>>>
where
    X: Send + 'static,
    W: FnMut(&Arc<str>, InputHead<X>) -> Box<dyn Head<I>>,
{
    let mut e = e.borrow_mut();
    let producers = e.from_parallelism;
    let mut by_producer: Vec<Vec<Sender<Message<X>>>> = vec![Vec::new(); producers];
    let mut by_consumer = Vec::with_capacity(parallelism);
    for _ in 0..parallelism {
        let mut rxs = Vec::with_capacity(producers);
        for senders in &mut by_producer {
            let (tx, rx) = bounded(opts.channel_capacity);
            senders.push(tx);
            rxs.push(rx);
        }
        by_consumer.push(rxs);
    }
    let (back_tx, back_rx) = bounded(parallelism * producers * (opts.channel_capacity + 2));
    e.turn_senders = Some(by_producer);
    e.recycle = Some(back_rx);
    e.slot_base = 0;
    let idle = opts.idle_timeout;
    by_consumer
        .into_iter()
        .map(|rxs| wrap(name, InputHead::in_turns(rxs, back_tx.clone(), idle)))
        .collect()
}

/// A plain channel input as a head.
pub(super) fn plain<X: Send + 'static>(_: &Arc<str>, input: InputHead<X>) -> Box<dyn Head<X>> {
    Box::new(input)
}

/// The hash that picks a keyed instance. Re-mixed so that it is independent of the low bits
/// the instance's own hash table uses.
pub(super) fn partition_hash<K: Hash>(k: &K) -> u64 {
    let mut h = FxHasher::default();
    k.hash(&mut h);
    h.finish()
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .rotate_left(32)
}
