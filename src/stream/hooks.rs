//! The extension points the TOML layer builds its stage kinds on. Each is generic: it knows
//! nothing of exec, plugins or reloading, which live in their own layers and hand in a head or a
//! chain step.
//!
//! - [`Pipeline::source_stage`](super::Pipeline::source_stage) and `line_source`: a source of
//!   any head;
//! - [`Stream::head_stage`]: a stage whose head transforms the input batches itself (exec
//!   children, native plugin nodes, the byte path);
//! - [`Stream::step`]: one more step of the fused chain (reloadable record operations);
//! - [`Stream::into_head`]: a stream's chain moved into its head, so that streams of different
//!   chains share one type (`into_head_with` also wraps that head: `map_par` is built on it);
//! - [`Stream::write_with`](Stream): a sink writing records formatted by a closure;
//! - [`Stream::current_parallelism`] and [`Stream::is_fresh_channel_stage`]: what the TOML layer
//!   needs to decide whether a stage fuses with its input.

use std::rc::Rc;
use std::sync::Arc;

use super::graph::{input_head, HeadSpec};
use super::heads::ChainedHead;
use super::{Fresh, Out, Stream};
use crate::channel::{InputHead, Partition};
use crate::operator::Chain;
use crate::runtime::Head;

impl<I: Send + 'static, C: Chain<I>> Stream<I, C> {
    /// A stage of `parallelism` instances whose head, made per instance by `make` from the
    /// head's final name and its channel input, transforms the input batches itself: order is
    /// kept at parallelism 1, batches are rebalanced above. `kind` is the head's default name;
    /// `None` leaves it unnamed (the stage is then named by what follows).
    pub(crate) fn head_stage<O, M>(
        self,
        kind: Option<&str>,
        parallelism: usize,
        make: M,
    ) -> Fresh<O>
    where
        O: Send + 'static,
        M: Fn(&Arc<str>, InputHead<Out<I, C>>) -> Box<dyn Head<O>> + 'static,
    {
        let b = Rc::clone(&self.b);
        let name = kind.map(|k| self.default_name(k));
        let partition = if parallelism == 1 {
            Partition::Forward
        } else {
            Partition::Rebalance
        };
        let edge = self.connect(partition);
        let mut head = input_head(vec![edge], make);
        head.shape = name.as_ref().map(|_| crate::metrics::Shape::Exec);
        head.name = name;
        Stream::open(&b, head, parallelism)
    }

    /// Adds one step to the fused chain: `make` wraps the chain so far, given the step's name
    /// (by default `kind`).
    pub(crate) fn step<C2, M>(self, kind: &str, make: M) -> Stream<I, C2>
    where
        C2: Chain<I>,
        M: FnOnce(C, Arc<str>) -> C2,
    {
        let name = self.default_name(kind);
        let chain = make(self.chain.clone(), name);
        self.with(chain)
    }

    /// Moves the chain into the head, so that the stream's head type is its output type (used
    /// where streams of different heads must share one type). Still one stage, no hop.
    pub(crate) fn into_head(self) -> Fresh<Out<I, C>> {
        self.into_head_with(|head| head)
    }

    /// [`into_head`](Self::into_head), with each instance's head (the old head and the chain)
    /// wrapped by `wrap` (`map_par` wraps it in the head that maps batches on the run's pool).
    /// The new head is named after the steps it took in (none when there were none).
    pub(crate) fn into_head_with<O, W>(self, wrap: W) -> Fresh<O>
    where
        O: Send + 'static,
        W: Fn(Box<dyn Head<Out<I, C>>>) -> Box<dyn Head<O>> + 'static,
    {
        let name = self.stage_name();
        let Stream {
            b,
            head,
            chain,
            parallelism,
            ordered,
        } = self;
        let HeadSpec {
            name: inner_name,
            source,
            dead_letter,
            shape,
            mut steps,
            inputs,
            make,
            order_input,
            input,
        } = head;
        if let (Some(n), Some(shape)) = (&inner_name, shape) {
            steps.push(crate::metrics::StepEntry::Head(Arc::clone(n), shape));
        }
        // The chain's input is counted by the chain itself where the head's messages stand for
        // several records (a split source's stripes), and here by the new head otherwise.
        let (pushed, own) = match input {
            Some(c) => (c, false),
            None => (Arc::new(crate::sync::AtomicU64::new(0)), true),
        };
        steps.push(crate::metrics::StepEntry::Input(Some(Arc::clone(&pushed))));
        let mut ops = Vec::new();
        chain.steps(&mut ops);
        steps.extend(ops.into_iter().map(crate::metrics::StepEntry::Op));
        let head = HeadSpec {
            name: (!name.is_empty()).then(|| Arc::from(name)),
            source,
            dead_letter,
            shape: None,
            steps,
            inputs,
            order_input,
            input: None,
            make: Box::new(move |name, p, opts, ordered| {
                // The inner head keeps its own name (a window's errors name the window).
                let heads = make(inner_name.as_ref().unwrap_or(name), p, opts, ordered)?;
                Ok(heads
                    .into_iter()
                    .map(|inner| {
                        wrap(Box::new(ChainedHead::new(
                            inner,
                            chain.clone(),
                            own.then(|| Arc::clone(&pushed)),
                        )))
                    })
                    .collect())
            }),
        };
        let mut s = Stream::open(&b, head, parallelism);
        s.ordered = ordered;
        s
    }

    /// The number of instances this open stage will run.
    pub(crate) fn current_parallelism(&self) -> usize {
        self.parallelism
    }

    /// Whether this is a channel-fed stage with no operator yet (its parallelism is free).
    pub(crate) fn is_fresh_channel_stage(&self) -> bool {
        let mut names = Vec::new();
        self.chain.names(&mut names);
        !self.head.source && self.head.name.is_none() && names.is_empty()
    }
}
