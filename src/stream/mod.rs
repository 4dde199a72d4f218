//! The typed pipeline builder: [`Pipeline`], [`Stream`], [`KeyedStream`], [`Windowed`] and
//! [`Sink`].
//!
//! A `Stream<I, C>` is an *open* stage: a head producing `I` (a source, or the stage's input
//! channel) followed by a fused chain `C` of stateless operators. Adding a stateless operator
//! extends the chain; a partitioning step (`rebalance`, `key_by`, `new_stage`, ...) or a sink
//! *closes* the stage and registers it with the pipeline. Nothing runs until
//! [`Pipeline::run`].
//!
//! | file | what it owns |
//! | --- | --- |
//! | `graph.rs` | stage slots, edges and their one constructor, names, the two build phases |
//! | `pipeline.rs` | [`Pipeline`]: sources, `run`, DOT output |
//! | `operators.rs` | the stateless operators, naming, parallelism and partitioning of [`Stream`] |
//! | `sinks.rs` | the sinks and their [`Sink`] handle |
//! | `keyed.rs` | [`KeyedStream`] (fold, count, reduce, window), [`Windowed`], `sort_by` |
//! | `heads.rs` | the heads of the stateful stages (keyed fold, sort, a chain as a head) and the routing tail |
//! | `replayable.rs` | [`Pipeline::replayable_source`] |
//! | `hooks.rs` | the few extension points the TOML layer builds its stage kinds on |
//!
//! The naming rule and how to return a stream from a function are documented on [`Stream`],
//! where users read them.

use std::cell::RefCell;
use std::fmt;
use std::rc::Rc;
use std::sync::Arc;

use crate::channel::Partition;
use crate::error::Error;
use crate::operator::{Chain, Identity};
use crate::runtime::{self, Cx, Tail, Worker};

#[cfg(test)]
mod checkpoint_tests;
mod graph;
mod heads;
mod hooks;
mod keyed;
mod operators;
mod pipeline;
mod replayable;
mod sinks;

use graph::{channel_tail, edge, input_head, plain, Builder, Edge, HeadSpec, Names, Phase1};
use graph::{order_input, Phase2, StageSlot, TailFactory};

pub use keyed::{BoxedKeyed, CheckpointedKeyed, KeyedStream, Windowed};
pub use pipeline::Pipeline;
pub use sinks::Sink;

/// A stream just opened on a head, with no operator yet.
pub(crate) type Fresh<T> = Stream<T, Identity<T>>;

/// The output record type of a stream.
type Out<I, C> = <C as Chain<I>>::Out;

/// An open stage producing records of type `C::Out`: a head of type `I` followed by the fused
/// chain `C`. See the [crate docs](crate) for an example.
///
/// **Naming.** Every step gets a default name from its kind (`map`, `map-2`, ...), and
/// `.name(n)` renames the step just added — on a [`Stream`] (its last operator, or its head),
/// a [`KeyedStream`] (the `key_by` step), a [`Windowed`] (the window stage) or a [`Sink`]. Names
/// are unique within a pipeline; a duplicate fails [`Pipeline::run`]. A stage's name joins its
/// steps' names with `+`, and metrics and errors use it.
///
/// **Returning a stream from a function.** The chain type grows with every operator, but it
/// need not be spelled: return `Stream<I, impl Chain<I, Out = T>>` (a stream whose head reads
/// `I` and that emits `T`), and take `Stream<I, C>` with `C: Chain<I, Out = T>`:
///
/// ```
/// use millrace::{operator::Chain, Pipeline, Stream};
///
/// /// The even squares of a stream of numbers.
/// fn even_squares<I: Send + 'static>(
///     s: Stream<I, impl Chain<I, Out = u64>>,
/// ) -> Stream<I, impl Chain<I, Out = u64>> {
///     s.map(|x| x * x).filter(|x| x % 2 == 0)
/// }
///
/// let p = Pipeline::new();
/// let out = even_squares(p.source("n", 1..=6u64)).collect();
/// p.run()?;
/// assert_eq!(out.take(), vec![4, 16, 36]);
/// # Ok::<(), millrace::Error>(())
/// ```
///
/// Where the chain must be chosen at run time, [`Stream::boxed`] erases it at the cost of one
/// dynamic call per record.
#[must_use = "a stream does nothing until it ends in a sink and the pipeline runs"]
pub struct Stream<I, C> {
    b: Rc<RefCell<Builder>>,
    head: HeadSpec<I>,
    chain: C,
    parallelism: usize,
    /// Whether the stage keeps input order across its instances ([`Stream::ordered`]).
    ordered: bool,
}

impl<I, C> fmt::Debug for Stream<I, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Stream")
            .field("head", &self.head.name)
            .field("source", &self.head.source)
            .field("parallelism", &self.parallelism)
            .field("ordered", &self.ordered)
            .finish_non_exhaustive()
    }
}

impl<I: Send + 'static> Fresh<I> {
    /// A stream on `head` with no operator yet.
    fn open(b: &Rc<RefCell<Builder>>, head: HeadSpec<I>, parallelism: usize) -> Self {
        Stream {
            b: Rc::clone(b),
            head,
            chain: Identity::new(),
            parallelism,
            ordered: false,
        }
    }
}

impl<I: Send + 'static, C: Chain<I>> Stream<I, C> {
    /// The same stage with `chain` as its operators.
    fn with<C2>(self, chain: C2) -> Stream<I, C2> {
        Stream {
            b: self.b,
            head: self.head,
            chain,
            parallelism: self.parallelism,
            ordered: self.ordered,
        }
    }

    /// A default name for a step of this stream.
    fn default_name(&self, kind: &str) -> Arc<str> {
        self.b.borrow_mut().default_name(kind)
    }

    /// The operators' part of the stage name: the head's name, then each operator's.
    fn stage_name(&self) -> String {
        let mut names: Vec<Arc<str>> = self.head.name.iter().cloned().collect();
        self.chain.names(&mut names);
        names.iter().map(|n| &**n).collect::<Vec<_>>().join("+")
    }

    /// Closes the stage: registers it with a tail per instance, made on the worker thread by
    /// what `tails` returns; `sink` names the sink the stage ends in, if any. Returns the
    /// stage's id.
    fn close<T>(mut self, sink: Option<Arc<str>>, mut tails: TailFactory<T>) -> usize
    where
        T: Tail<Out<I, C>> + 'static,
    {
        let chain_name = self.stage_name();
        let ordered = self.keeps_order();
        if ordered && !self.head.source {
            let why = match self.head.order_input.take() {
                Some(order) => order().err(),
                None => Some(
                    "only a stage fed by a partitioning step (`.rebalance(n)`) or a parallel \
                     source can keep order"
                        .to_string(),
                ),
            };
            if let Some(why) = why {
                self.b
                    .borrow_mut()
                    .errors
                    .push(format!("stage `{chain_name}` is ordered, but {why}"));
            }
        }
        let Stream {
            b,
            head,
            chain,
            parallelism,
            ordered: _,
        } = self;
        let source = head.source;
        let dead_letter = head.dead_letter;
        let mut steps = head.steps;
        if let (Some(n), Some(shape)) = (&head.name, head.shape) {
            steps.push(crate::metrics::StepEntry::Head(Arc::clone(n), shape));
        }
        steps.push(crate::metrics::StepEntry::Input(head.input.clone()));
        let mut ops = Vec::new();
        chain.steps(&mut ops);
        steps.extend(ops.into_iter().map(crate::metrics::StepEntry::Op));
        let make_head = head.make;
        let head_name = head.name;
        let build: Phase1 = Box::new(move |names: &Names, opts| {
            let head_name = head_name.unwrap_or_else(|| Arc::clone(&names.stage));
            let heads = make_head(&head_name, parallelism, opts, ordered)?;
            let names = names.clone();
            // Tails are made in phase 2: an output channel exists only once its consumer's
            // phase 1 has run, and consumers are registered after their producers.
            Ok(Box::new(move || {
                let mut workers = Vec::with_capacity(heads.len());
                for (i, head) in heads.into_iter().enumerate() {
                    let mk = tails(&names, i)?;
                    let stage = Arc::clone(&names.stage);
                    let chain = chain.clone();
                    let mut support = vec![(Arc::clone(&head_name), head.state_support())];
                    chain.state_support(&mut support);
                    workers.push(Worker {
                        stage,
                        instance: i,
                        source,
                        dead_letter_side: false,
                        support,
                        body: Box::new(move |cx: &Cx| {
                            let tail = mk(cx)?;
                            runtime::tail_ready(cx, tail.state_support())?;
                            runtime::drive(cx, head, chain, tail)
                        }),
                    });
                }
                Ok(workers)
            }) as Phase2)
        });
        let mut bm = b.borrow_mut();
        let id = bm.stages.len();
        bm.stages.push(StageSlot {
            chain_name,
            sink,
            parallelism,
            inputs: head.inputs,
            dead_letter,
            steps,
            build: Some(build),
        });
        id
    }

    /// Closes the stage into an edge with the given partitioning; returns the edge.
    fn connect(self, partition: Partition<Out<I, C>>) -> Edge<Out<I, C>> {
        let edge = edge(partition, self.stage_name(), self.parallelism);
        edge.borrow_mut().ordered = self.keeps_order();
        let out = Rc::clone(&edge);
        let id = self.close(None, Box::new(move |_, i| channel_tail(&out, i)));
        edge.borrow_mut().from_stage = id;
        edge
    }

    /// Starts a new stage of `parallelism` instances fed through a channel with the given
    /// partitioning.
    fn hop(self, partition: Partition<Out<I, C>>, parallelism: usize) -> Fresh<Out<I, C>> {
        let b = Rc::clone(&self.b);
        let edge = self.connect(partition);
        let mut head = input_head(vec![edge.clone()], plain);
        head.order_input = Some(order_input(&edge));
        Stream::open(&b, head, parallelism)
    }

    /// Whether the stage's instances must keep input order: asked for, with more than one.
    fn keeps_order(&self) -> bool {
        self.ordered && self.parallelism > 1
    }
}

/// Builds every stage and runs the pipeline (what [`Pipeline::run`] does once the builder has
/// been taken out of it).
fn build_and_run(
    mut b: Builder,
    shared: Arc<runtime::RunShared>,
) -> Result<crate::RunReport, Error> {
    if !b.errors.is_empty() {
        return Err(Error::Build(b.errors.join("; ")));
    }
    if b.stages.is_empty() {
        return Err(Error::Build("the pipeline has no sink".into()));
    }
    let opts = b.opts.clone();
    let mut phase2 = Vec::with_capacity(b.stages.len());
    for slot in &mut b.stages {
        let names = Names {
            stage: Arc::from(slot.name()),
            sink: slot.sink.clone(),
        };
        let build = slot.build.take().expect("each stage is built once");
        phase2.push(build(&names, &opts)?);
    }
    // The dead-letter side: each dead-letter source and every stage downstream of it (slots
    // are registered producers first).
    let mut plan: Vec<crate::metrics::SlotPlan> = b
        .stages
        .iter()
        .map(|slot| crate::metrics::SlotPlan {
            stage: slot.name(),
            sink: slot.sink.as_ref().map(|s| s.to_string()),
            steps: slot.steps.clone(),
            inputs: slot.inputs.clone(),
            consumers: 0,
        })
        .collect();
    for slot in &b.stages {
        for &u in &slot.inputs {
            if let Some(p) = plan.get_mut(u) {
                p.consumers += 1;
            }
        }
    }
    *shared.plan.lock() = plan;
    let mut side = vec![false; b.stages.len()];
    for (i, slot) in b.stages.iter().enumerate() {
        side[i] = slot.dead_letter || slot.inputs.iter().any(|&u| side.get(u) == Some(&true));
    }
    let mut workers = Vec::new();
    let mut stage_of = Vec::new();
    for (i, p) in phase2.into_iter().enumerate() {
        for mut w in p()? {
            w.dead_letter_side = side[i];
            // Letters are not records read: a dead-letter source does not count as a source.
            w.source &= !b.stages[i].dead_letter;
            workers.push(w);
            stage_of.push(i);
        }
    }
    let cp_opts = shared.checkpoint_opts.lock().clone();
    if let Some(opts) = cp_opts {
        let run = start_checkpoints(&b, &opts, &workers, &stage_of)?;
        let done = run.already_completed.is_some();
        *shared.checkpoint.lock() = Some(Arc::new(run));
        if done {
            // A resume of a run that completed: no worker starts.
            return Ok(shared.report_without_running());
        }
    }
    runtime::run(shared, workers)
}

/// Before any thread is spawned: refuses a pipeline that cannot be checkpointed (a step whose
/// state cannot be snapshotted or whose input cannot be replayed; a step fine only at least
/// once, in exactly-once mode; a stage wider than `max_parallelism`), then opens the store and
/// handles the checkpoints found there (see `checkpoint::start`).
fn start_checkpoints(
    b: &Builder,
    opts: &crate::checkpoint::CheckpointOptions,
    workers: &[Worker],
    stage_of: &[usize],
) -> Result<crate::checkpoint::CheckpointRun, Error> {
    use crate::checkpoint::{InstanceId, Mode, StartInstance, StateSupport};
    let mut instances = Vec::with_capacity(workers.len());
    let mut stdin_reader: Option<&Arc<str>> = None;
    for (w, &i) in workers.iter().zip(stage_of) {
        let slot = &b.stages[i];
        let mut stateful = slot.sink.is_some();
        for (step, support) in &w.support {
            match support {
                StateSupport::Stateless => {}
                StateSupport::Snapshots => stateful = true,
                StateSupport::AtLeastOnce(_) if opts.mode == Mode::AtLeastOnce => stateful = true,
                StateSupport::StdinSpool if opts.spool_stdin => {
                    if let Some(other) = stdin_reader.replace(step) {
                        return Err(Error::CheckpointUnsupported {
                            stage: step.to_string(),
                            reason: format!(
                                "`{other}` reads stdin too: with spool_stdin, only one source \
                                 may read stdin"
                            ),
                        });
                    }
                    stateful = true;
                }
                StateSupport::StdinSpool => {
                    return Err(Error::CheckpointUnsupported {
                        stage: step.to_string(),
                        reason: crate::source::STDIN.into(),
                    })
                }
                StateSupport::AtLeastOnce(reason) | StateSupport::Unsupported(reason) => {
                    return Err(Error::CheckpointUnsupported {
                        stage: step.to_string(),
                        reason: reason.clone(),
                    })
                }
            }
        }
        if slot.parallelism > opts.max_parallelism as usize {
            return Err(Error::CheckpointUnsupported {
                stage: w.stage.to_string(),
                reason: format!(
                    "its parallelism {} is above max_parallelism = {}",
                    slot.parallelism, opts.max_parallelism
                ),
            });
        }
        let fingerprint = b
            .fingerprints
            .get(&*w.stage)
            .cloned()
            .unwrap_or_else(|| format!("{} p={}", w.stage, slot.parallelism));
        instances.push(StartInstance {
            id: InstanceId {
                stage: w.stage.to_string(),
                instance: w.instance,
            },
            fingerprint,
            stateful,
            dead_letter_side: w.dead_letter_side,
            parallelism: slot.parallelism,
        });
    }
    crate::checkpoint::start(opts, &instances)
}
