//! The stateless operators of [`Stream`] (fused into the stage's chain), naming, parallelism,
//! and the partitioning steps that end a stage and start the next.

use std::rc::Rc;

use super::graph::{channel_tail, edge, input_head, plain, Edge, MakeTail};
use super::{Fresh, Out, Stream};
use crate::channel::{Partition, TeeTail};
use crate::error::BoxError;
use crate::operator::{
    Boxed, Chain, Filter, FlatMap, Inspect, Limit, Map, MapPar, TryFlatMap, TryMap,
};
use crate::par::ParMapHead;
use crate::runtime::{Cx, Head};

impl<I: Send + 'static, C: Chain<I>> Stream<I, C> {
    /// Applies `f` to every record.
    ///
    /// # Examples
    ///
    /// ```
    /// let p = millrace::Pipeline::new();
    /// let out = p.source("n", 1..=3u32).map(|x| x * 10).collect();
    /// p.run().unwrap();
    /// assert_eq!(out.take(), vec![10, 20, 30]);
    /// ```
    pub fn map<U, F>(self, f: F) -> Stream<I, Map<C, F>>
    where
        U: Send + 'static,
        F: Fn(Out<I, C>) -> U + Send + Sync + 'static,
    {
        let name = self.default_name("map");
        let chain = Map::new(self.chain.clone(), f, name);
        self.with(chain)
    }

    /// Applies `f` to every record on the run's rayon pool, a batch at a time: for expensive
    /// per-record work (parsing, hashing, scoring: microseconds per record or more), where it
    /// uses every core from one stage instance without a channel hop or a rebalance.
    ///
    /// **Order.** The records of each batch are mapped in parallel and come out in the batch's
    /// order, and batches keep theirs: in a stage of one instance (a source, or after
    /// [`new_stage`](Stream::new_stage)) the output is in input order, record for record, like
    /// [`map`](Stream::map)'s. With several instances, each instance's output is in its input's
    /// order, as for `map`.
    ///
    /// **Where it runs.** The step takes in the stage's head and the operators before it (still
    /// one stage, no hop): each batch they produce goes to the pool while the stage's thread
    /// waits; the operators after the step and the tail then run on the stage's thread. Every
    /// `map_par` of a run shares one pool, made for the run when the first batch arrives, of
    /// [`Options::par_threads`](crate::Options::par_threads) threads (default: one per CPU,
    /// or `RAYON_NUM_THREADS`); its threads are joined before [`Pipeline::run`] returns, as every
    /// thread of the run is. rayon's global pool is not used.
    ///
    /// **Failures and stopping.** A panic in `f` fails the run with [`Error::Panic`] naming the
    /// stage (after the batch's other records finish). A cancelled or failing run stops
    /// mapping at the next record; a [`limit`](Stream::limit) after the step, or consumers that
    /// are gone, stop the stage after the batch in hand, as for any stage. The step's account
    /// (`map_par`, renamed by [`name`](Stream::name)) is one record out per record in.
    ///
    /// Each batch costs a hand-off to the pool and back (tens of microseconds): for cheap work
    /// (nanoseconds per record) use [`map`](Stream::map). Against more instances of a `map`
    /// (`rebalance(n)...parallelism(n)`, which do not keep the order), `docs/performance.md`
    /// measures both; a larger [`Options::batch_size`](crate::Options::batch_size) narrows the
    /// per-batch cost.
    ///
    /// [`Pipeline::run`]: crate::Pipeline::run
    /// [`Error::Panic`]: crate::Error::Panic
    ///
    /// # Examples
    ///
    /// ```
    /// // Expensive per record: a thousand rounds of integer mixing.
    /// fn score(x: u64) -> u64 {
    ///     (0..1_000).fold(x, |h, i| (h ^ i).wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(7))
    /// }
    ///
    /// let mut opts = millrace::Options::default();
    /// opts.par_threads = Some(2); // the run's rayon pool
    /// let p = millrace::Pipeline::with_options(opts);
    /// let out = p.source("n", 0..10_000u64).map_par(score).name("score").collect();
    /// let report = p.run()?;
    /// // Same records, same order, as `map(score)`.
    /// assert_eq!(out.take(), (0..10_000u64).map(score).collect::<Vec<_>>());
    /// assert_eq!(report.account("score").unwrap().records_out, 10_000);
    /// # Ok::<(), millrace::Error>(())
    /// ```
    pub fn map_par<U, F>(self, f: F) -> Stream<U, MapPar<U>>
    where
        U: Send + 'static,
        F: Fn(Out<I, C>) -> U + Send + Sync + 'static,
    {
        let name = self.default_name("map_par");
        let f = std::sync::Arc::new(f);
        let fresh = self.into_head_with(move |head| {
            Box::new(ParMapHead::new(head, std::sync::Arc::clone(&f))) as Box<dyn Head<U>>
        });
        fresh.with(MapPar::new(name))
    }

    /// Applies a fallible `f`; an `Err` fails the run with an error naming this operator.
    ///
    /// # Examples
    ///
    /// ```
    /// let p = millrace::Pipeline::new();
    /// p.source("s", vec!["1", "x"]).try_map(|s: &str| s.parse::<u32>()).name("parse").for_each(|_| {});
    /// let err = p.run().unwrap_err();
    /// assert_eq!(err.stage(), Some("parse"));
    /// ```
    pub fn try_map<U, X, F>(self, f: F) -> Stream<I, TryMap<C, F>>
    where
        U: Send + 'static,
        X: Into<BoxError>,
        F: Fn(Out<I, C>) -> Result<U, X> + Send + Sync + 'static,
    {
        let name = self.default_name("try_map");
        let chain = TryMap::new(self.chain.clone(), f, name);
        self.with(chain)
    }

    /// Keeps the records for which `f` returns true.
    ///
    /// # Examples
    ///
    /// ```
    /// let p = millrace::Pipeline::new();
    /// let out = p.source("n", 1..=6u32).filter(|x| x % 3 == 0).collect();
    /// p.run().unwrap();
    /// assert_eq!(out.take(), vec![3, 6]);
    /// ```
    pub fn filter<F>(self, f: F) -> Stream<I, Filter<C, F>>
    where
        F: Fn(&Out<I, C>) -> bool + Send + Sync + 'static,
    {
        let name = self.default_name("filter");
        let chain = Filter::new(self.chain.clone(), f, name);
        self.with(chain)
    }

    /// Replaces every record by the records `f` returns.
    ///
    /// # Examples
    ///
    /// ```
    /// let p = millrace::Pipeline::new();
    /// let out = p.source("n", 1..=3u32).flat_map(|x| vec![x; x as usize]).collect();
    /// p.run().unwrap();
    /// assert_eq!(out.take(), vec![1, 2, 2, 3, 3, 3]);
    /// ```
    pub fn flat_map<It, F>(self, f: F) -> Stream<I, FlatMap<C, F>>
    where
        It: IntoIterator,
        It::Item: Send + 'static,
        F: Fn(Out<I, C>) -> It + Send + Sync + 'static,
    {
        let name = self.default_name("flat_map");
        let chain = FlatMap::new(self.chain.clone(), f, name);
        self.with(chain)
    }

    /// A fallible [`flat_map`](Stream::flat_map): an `Err` fails the run naming this operator.
    ///
    /// # Examples
    ///
    /// ```
    /// let p = millrace::Pipeline::new();
    /// let out = p.source("s", vec!["1,2", "3"])
    ///     .try_flat_map(|s: &str| s.split(',').map(str::parse::<u32>).collect::<Result<Vec<_>, _>>())
    ///     .collect();
    /// p.run().unwrap();
    /// assert_eq!(out.take(), vec![1, 2, 3]);
    /// ```
    pub fn try_flat_map<It, X, F>(self, f: F) -> Stream<I, TryFlatMap<C, F>>
    where
        It: IntoIterator,
        It::Item: Send + 'static,
        X: Into<BoxError>,
        F: Fn(Out<I, C>) -> Result<It, X> + Send + Sync + 'static,
    {
        let name = self.default_name("try_flat_map");
        let chain = TryFlatMap::new(self.chain.clone(), f, name);
        self.with(chain)
    }

    /// Calls `f` on every record and passes it on.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::sync::atomic::{AtomicU64, Ordering};
    /// static SEEN: AtomicU64 = AtomicU64::new(0);
    /// let p = millrace::Pipeline::new();
    /// p.source("n", 0..5u32).inspect(|_| { SEEN.fetch_add(1, Ordering::Relaxed); }).for_each(|_| {});
    /// p.run().unwrap();
    /// assert_eq!(SEEN.load(Ordering::Relaxed), 5);
    /// ```
    pub fn inspect<F>(self, f: F) -> Stream<I, Inspect<C, F>>
    where
        F: Fn(&Out<I, C>) + Send + Sync + 'static,
    {
        let name = self.default_name("inspect");
        let chain = Inspect::new(self.chain.clone(), f, name);
        self.with(chain)
    }

    /// Passes the first `n` records (across all instances of the stage), then stops the stage
    /// and, through it, everything upstream.
    ///
    /// # Examples
    ///
    /// ```
    /// let p = millrace::Pipeline::new();
    /// let out = p.source("endless", 0u64..).limit(3).collect();
    /// p.run().unwrap();
    /// assert_eq!(out.take(), vec![0, 1, 2]);
    /// ```
    pub fn limit(self, n: u64) -> Stream<I, Limit<C>> {
        let name = self.default_name("limit");
        let chain = Limit::new(self.chain.clone(), n, name);
        self.with(chain)
    }

    /// Erases the chain's type (one dynamic call per record), for pipelines assembled at run
    /// time.
    ///
    /// # Examples
    ///
    /// ```
    /// let p = millrace::Pipeline::new();
    /// let mut s = p.source("n", 1..=4u32).boxed();
    /// for k in [2, 3] {
    ///     s = s.map(move |x| x * k).boxed();
    /// }
    /// let out = s.collect();
    /// p.run().unwrap();
    /// assert_eq!(out.take(), vec![6, 12, 18, 24]);
    /// ```
    pub fn boxed(self) -> Stream<I, Boxed<I, Out<I, C>>> {
        let chain = Boxed::new(self.chain.clone());
        self.with(chain)
    }

    /// Renames the step just added: the last operator, or the head (a source, an aggregation)
    /// when there is none. Names must be unique within a pipeline; errors and metrics use them.
    ///
    /// # Examples
    ///
    /// ```
    /// let p = millrace::Pipeline::new();
    /// p.source("n", 0..3u32).map(|x| x + 1).name("inc").for_each(|_| {});
    /// let report = p.run().unwrap();
    /// assert_eq!(report.stage("inc").unwrap().records_in, 3);
    /// ```
    pub fn name(mut self, name: &str) -> Self {
        let mut names = Vec::new();
        self.chain.names(&mut names);
        match names.pop() {
            Some(old) => {
                let new = self.b.borrow_mut().rename(Some(&old), name);
                self.chain.rename_last(new);
            }
            None => {
                let old = self.head.name.take();
                let new = self.b.borrow_mut().rename(old.as_deref(), name);
                self.head.name = Some(new);
            }
        }
        self
    }

    /// Sets how many instances (threads) run this stage. Only a stage that reads from a channel
    /// can choose; a source stage runs as many instances as it has parts (one, unless it is a
    /// [`parallel_source`](crate::Pipeline::parallel_source) or
    /// [`source_split`](crate::Pipeline::source_split)): call
    /// [`rebalance`](Stream::rebalance) first to spread its operators over another number.
    ///
    /// # Examples
    ///
    /// ```
    /// let p = millrace::Pipeline::new();
    /// let out = p.source("n", 0..100u32).rebalance(2).map(|x| x * 2).parallelism(2).collect();
    /// p.run().unwrap();
    /// assert_eq!(out.take().len(), 100);
    /// ```
    pub fn parallelism(mut self, n: usize) -> Self {
        if self.head.source && n.max(1) != self.parallelism {
            let name = self.stage_name();
            let parts = self.parallelism;
            let threads = if parts == 1 {
                "one thread".to_string()
            } else {
                format!("{parts} threads (one per part)")
            };
            self.b.borrow_mut().errors.push(format!(
                "stage `{name}` reads a source and runs on {threads}; call .rebalance({n}) before the operators to parallelise"
            ));
        } else {
            self.parallelism = n.max(1);
        }
        self
    }

    /// Keeps input order across this stage's instances: what the next stage reads is in the
    /// order this stage's input came in, as with one instance, instead of the order the
    /// instances finish in (like `jq` or `parallel --keep-order`).
    ///
    /// For a stage fed by [`rebalance(n)`](Stream::rebalance) (or a fresh stage given
    /// [`parallelism(n)`](Stream::parallelism)): batches are dealt strictly round-robin, each
    /// instance marks the end of what it made of a batch (nothing, for a filter that dropped
    /// it all; several batches, for a flat_map), and the next stage reads the instances in the
    /// same turn. The feeding stage must have one instance. For a parallel source
    /// ([`source_split`](crate::Pipeline::source_split),
    /// [`parallel_source`](crate::Pipeline::parallel_source)): the parts' batches are read in
    /// turn, part 0's first batch, part 1's first, ..., part 0's second, ... — for
    /// `source_split` that is the data's order (its stripes are dealt the same way); for
    /// `parallel_source`, whose parts are independent iterators, batches of
    /// [`batch_size`](crate::Options::batch_size) records from each part in turn (a part that
    /// ends leaves the turn; a slow iterator's partial batches, sent after
    /// [`linger`](crate::Options::linger), make the interleaving depend on timing).
    ///
    /// Memory stays bounded: each (instance, consumer) pair has its own bounded channel and an
    /// instance that runs ahead blocks on it, so the slowest instance sets the pace. A sink
    /// after an ordered stage of several instances runs on one instance, in order.
    /// At parallelism 1 this does nothing (order is kept anyway). An ordered stage cannot be
    /// [`union`](Stream::union)ed with another stream (that would lose the order). With
    /// exactly-once checkpoints, a barrier that reaches the parts of an ordered parallel
    /// source at different batches is declined (the checkpoint fails, order is kept); after
    /// `rebalance(n)` barriers stay aligned. `docs/semantics.md` says what the order means.
    ///
    /// # Examples
    ///
    /// ```
    /// let p = millrace::Pipeline::new();
    /// let out = p
    ///     .source("n", 0..10_000u64)
    ///     .rebalance(4)
    ///     .ordered()
    ///     .filter(|x| x % 3 != 0)
    ///     .map(|x| x * 2)
    ///     .collect();
    /// p.run()?;
    /// let want: Vec<u64> = (0..10_000u64).filter(|x| x % 3 != 0).map(|x| x * 2).collect();
    /// assert_eq!(out.take(), want);
    /// # Ok::<(), millrace::Error>(())
    /// ```
    pub fn ordered(mut self) -> Self {
        self.ordered = true;
        self
    }

    /// Ends the fused chain here: what follows runs in a new single-instance stage on its own
    /// thread, fed through a channel.
    ///
    /// # Examples
    ///
    /// ```
    /// let p = millrace::Pipeline::new();
    /// p.source("n", 0..3u32).new_stage().for_each(|_| {});
    /// assert_eq!(p.stage_names(), vec!["n", "for_each"]);
    /// ```
    pub fn new_stage(self) -> Fresh<Out<I, C>> {
        self.hop(Partition::Forward, 1)
    }

    /// What follows runs in a new stage of `n` instances; whole batches are dealt round-robin,
    /// preferring an instance with room in its channel. The instances' outputs merge in the
    /// order they are made; add [`ordered`](Stream::ordered) to keep the input's.
    ///
    /// # Examples
    ///
    /// ```
    /// let p = millrace::Pipeline::new();
    /// let out = p.source("n", 0..1000u32).rebalance(2).map(|x| x + 1).collect();
    /// p.run().unwrap();
    /// assert_eq!(out.take().len(), 1000);
    /// ```
    pub fn rebalance(self, n: usize) -> Fresh<Out<I, C>> {
        self.hop(Partition::Rebalance, n.max(1))
    }

    /// What follows runs in a new stage whose instance `i` receives the output of this stage's
    /// instance `i` (modulo the instance count): no reshuffling.
    ///
    /// # Examples
    ///
    /// ```
    /// let p = millrace::Pipeline::new();
    /// let out = p.source("n", 0..10u32).rebalance(2).forward().map(|x| x * 2).collect();
    /// p.run().unwrap();
    /// assert_eq!(out.take().len(), 10);
    /// ```
    pub fn forward(self) -> Fresh<Out<I, C>> {
        let p = self.parallelism;
        self.hop(Partition::Forward, p)
    }

    /// Merges another stream of the same record type into a new stage.
    ///
    /// # Examples
    ///
    /// ```
    /// let p = millrace::Pipeline::new();
    /// let odd = p.source("odd", vec![1u32, 3]);
    /// let out = p.source("even", vec![2u32, 4]).union(odd).collect();
    /// p.run().unwrap();
    /// let mut all = out.take();
    /// all.sort();
    /// assert_eq!(all, vec![1, 2, 3, 4]);
    /// ```
    pub fn union<J, D>(self, other: Stream<J, D>) -> Fresh<Out<I, C>>
    where
        J: Send + 'static,
        D: Chain<J, Out = Out<I, C>>,
    {
        let b = Rc::clone(&self.b);
        let e1 = self.connect(Partition::Forward);
        let e2 = other.connect(Partition::Forward);
        Stream::open(&b, input_head(vec![e1, e2], plain), 1)
    }

    /// Sends every record to each of `n` new streams (fan-out).
    ///
    /// # Examples
    ///
    /// ```
    /// let p = millrace::Pipeline::new();
    /// let mut copies = p.source("n", 1..=3u32).split(2).into_iter();
    /// let a = copies.next().unwrap().collect();
    /// let b = copies.next().unwrap().map(|x| x * 10).collect();
    /// p.run().unwrap();
    /// assert_eq!((a.take(), b.take()), (vec![1, 2, 3], vec![10, 20, 30]));
    /// ```
    pub fn split(self, n: usize) -> Vec<Fresh<Out<I, C>>>
    where
        Out<I, C>: Clone,
    {
        let b = Rc::clone(&self.b);
        let (p, name, ordered) = (self.parallelism, self.stage_name(), self.keeps_order());
        let edges: Vec<Edge<Out<I, C>>> = (0..n)
            .map(|_| edge(Partition::Forward, name.clone(), p))
            .collect();
        for e in &edges {
            e.borrow_mut().ordered = ordered;
        }
        let outs = edges.clone();
        let id = self.close(
            None,
            Box::new(move |_, i| {
                let makers = outs
                    .iter()
                    .map(|e| channel_tail(e, i))
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(Box::new(move |cx: &Cx| {
                    let tails = makers
                        .into_iter()
                        .map(|m| m(cx))
                        .collect::<Result<Vec<_>, _>>()?;
                    Ok(TeeTail::new(tails))
                }) as MakeTail<_>)
            }),
        );
        edges
            .into_iter()
            .map(|e| {
                e.borrow_mut().from_stage = id;
                Stream::open(&b, input_head(vec![e], plain), 1)
            })
            .collect()
    }
}

impl<I: Send + 'static, C: Chain<I>> Stream<I, C> {
    /// Records a build error if `policy` sends to a dead-letter stream of another pipeline
    /// (whose run would never take the letters).
    fn check_handle(&self, policy: &crate::OnError) {
        if let crate::OnError::DeadLetter(dl) = policy {
            let mut b = self.b.borrow_mut();
            if !b.dead_letter_handles.contains(&dl.id()) {
                b.errors.push(format!(
                    "`on_error` of step `{}` sends to a dead-letter stream of another pipeline",
                    self.stage_name()
                ));
            }
        }
    }
}

impl<I, C, F> Stream<I, TryMap<C, F>>
where
    I: Send + 'static,
    C: Chain<I>,
    Out<I, C>: serde::Serialize + Clone,
    TryMap<C, F>: Chain<I>,
{
    /// Sets what the `try_map` step just added does with a record its function fails on:
    /// fail the run (the default), skip it (counted), or send it with the error (formatted with
    /// `Display`) to a dead-letter stream ([`Pipeline::dead_letters`](crate::Pipeline::dead_letters)).
    ///
    /// The dead-letter policy keeps a clone of each input record while the function runs (the
    /// function consumes it), hence the `Serialize + Clone` bound; `Fail` and `Skip` clone
    /// nothing.
    ///
    /// # Examples
    ///
    /// ```
    /// use millrace::{OnError, Pipeline};
    /// let p = Pipeline::new();
    /// let out = p
    ///     .source("s", vec!["1".to_string(), "x".into(), "3".into()])
    ///     .try_map(|s: String| s.parse::<u32>())
    ///     .on_error(OnError::Skip)
    ///     .name("parse")
    ///     .collect();
    /// let report = p.run().unwrap();
    /// assert_eq!(out.take(), vec![1, 3]);
    /// assert_eq!(report.account("parse").unwrap().skipped, 1);
    /// ```
    pub fn on_error(mut self, policy: crate::OnError) -> Self {
        self.check_handle(&policy);
        self.chain.set_policy::<Out<I, C>>(policy);
        self
    }
}

impl<I, C, F> Stream<I, TryFlatMap<C, F>>
where
    I: Send + 'static,
    C: Chain<I>,
    Out<I, C>: serde::Serialize + Clone,
    TryFlatMap<C, F>: Chain<I>,
{
    /// Sets what the `try_flat_map` step just added does with a record its function fails on;
    /// see [`Stream::on_error`](Stream#method.on_error) of `try_map`.
    pub fn on_error(mut self, policy: crate::OnError) -> Self {
        self.check_handle(&policy);
        self.chain.set_policy::<Out<I, C>>(policy);
        self
    }
}
