//! The typed pipeline builder: [`Pipeline`], [`Stream`] and [`KeyedStream`].
//!
//! A `Stream<I, C>` is an *open* stage: a head producing `I` (a source, or the stage's input
//! channel) followed by a fused chain `C` of stateless operators. Adding a stateless operator
//! extends the chain; a partitioning step (`rebalance`, `key_by`, `new_stage`, ...) or a sink
//! *closes* the stage and registers it with the pipeline. Nothing runs until
//! [`Pipeline::run`].

use std::cell::RefCell;
use std::collections::HashSet;
use std::fmt::Write as _;
use std::hash::{Hash, Hasher};
use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;

use crossbeam_channel::{bounded, Receiver, Sender};
use rustc_hash::{FxHashMap, FxHasher};

use crate::channel::{ChannelTail, InputHead, Message, Partition, TeeTail};
use crate::error::{BoxError, Error};
use crate::metrics::RunReport;
use crate::operator::Emit;
use crate::operator::{
    Boxed, Chain, Filter, FlatMap, Halt, Identity, Inspect, Limit, Map, TryFlatMap, TryMap,
};
use crate::runtime::{self, CancelHandle, Cx, Head, Options, Pull, RunShared, Tail, Worker};
use crate::sink::{open_output, CollectTail, Collected, ForEachTail, WriteTail};
use crate::source::{
    parse_json, parse_text, ChannelSourceHead, Chunk, ChunkHead, Input, IterHead, LineHead,
};
use crate::sync::Mutex;
use crate::time::Timestamp;
use crate::window::stage::{result_only, result_or_late, WatermarkTail, WindowHead};
use crate::window::{
    Aggregate, EventTime, LateRecord, WindowOutput, WindowResult, WindowSpec, Windowed,
};

type Phase2 = Box<dyn FnOnce() -> Result<Vec<Worker>, Error>>;
type Phase1 = Box<dyn FnOnce(&Options) -> Result<Phase2, Error>>;

struct StageSlot {
    name: String,
    parallelism: usize,
    inputs: Vec<usize>,
    build: Option<Phase1>,
}

#[derive(Default)]
struct Builder {
    opts: Options,
    stages: Vec<StageSlot>,
    names: HashSet<String>,
    errors: Vec<String>,
}

impl Builder {
    fn unique(&mut self, base: &str) -> Arc<str> {
        let mut name = base.to_string();
        let mut k = 1;
        while self.names.contains(&name) {
            k += 1;
            name = format!("{base}-{k}");
        }
        self.names.insert(name.clone());
        Arc::from(name)
    }

    /// Claims an explicit name; a duplicate is recorded as a build error.
    fn reserve(&mut self, name: &str) -> Arc<str> {
        if !self.names.insert(name.to_string()) {
            self.errors.push(format!("duplicate stage name `{name}`"));
        }
        Arc::from(name)
    }
}

/// Where one stage's output goes: filled in by the consumer when it is built.
struct EdgeCell<T> {
    partition: Partition<T>,
    senders: Option<Vec<Sender<Message<T>>>>,
    /// Emptied batches coming back from the consumers, for the producers to refill.
    recycle: Option<Receiver<Vec<T>>>,
    from_stage: usize,
    from_name: String,
    from_parallelism: usize,
    /// The input slot of the producer's instance 0 at the consumer (edges into one stage
    /// number their producers' instances one after another).
    slot_base: usize,
}

type Edge<T> = Rc<RefCell<EdgeCell<T>>>;

/// Makes a stage's heads (one per instance) when the run starts.
type MakeHeads<I> = Box<dyn FnOnce(usize, &Options) -> Result<Vec<Box<dyn Head<I>>>, Error>>;

/// Makes a tail on its worker thread.
type MakeTail<T> = Box<dyn FnOnce(&Cx) -> Result<T, Halt> + Send>;

/// A stream just opened on a head, with no operator yet.
pub type Fresh<T> = Stream<T, Identity<T>>;

/// How a stage's instances are made when the run starts.
struct HeadSpec<I> {
    name: Option<Arc<str>>,
    source: bool,
    inputs: Vec<usize>,
    make: MakeHeads<I>,
}

/// A dataflow pipeline under construction. Add sources, chain operators on the returned
/// [`Stream`]s, end each with a sink, then [`run`](Pipeline::run) it.
///
/// # Examples
/// ```
/// use millrace::Pipeline;
/// let p = Pipeline::new();
/// let evens = p.source("numbers", 1..=10u64).filter(|x| x % 2 == 0).map(|x| x * 10).collect();
/// let report = p.run().unwrap();
/// assert_eq!(evens.take(), vec![20, 40, 60, 80, 100]);
/// assert_eq!(report.records_read(), 10);
/// ```
pub struct Pipeline {
    b: Rc<RefCell<Builder>>,
    shared: Arc<RunShared>,
}

impl Default for Pipeline {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let b = self.b.borrow();
        f.debug_struct("Pipeline")
            .field(
                "stages",
                &b.stages.iter().map(|s| &s.name).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Pipeline {
    /// A pipeline with default [`Options`].
    pub fn new() -> Self {
        Self::with_options(Options::default())
    }

    /// A pipeline with the given batch size, channel capacity and linger time.
    pub fn with_options(opts: Options) -> Self {
        let opts = Options {
            batch_size: opts.batch_size.max(1),
            channel_capacity: opts.channel_capacity.max(1),
            ..opts
        };
        let shared = RunShared::new(opts.clone());
        Pipeline {
            b: Rc::new(RefCell::new(Builder {
                opts,
                ..Builder::default()
            })),
            shared,
        }
    }

    /// The options the pipeline runs with.
    pub fn options(&self) -> Options {
        self.b.borrow().opts.clone()
    }

    /// A handle that can cancel the run from another thread and sample its metrics.
    pub fn cancel_handle(&self) -> CancelHandle {
        CancelHandle {
            shared: Arc::clone(&self.shared),
        }
    }

    fn open<I: Send + 'static>(
        &self,
        head: HeadSpec<I>,
        parallelism: usize,
    ) -> Stream<I, Identity<I>> {
        Stream {
            b: Rc::clone(&self.b),
            head,
            chain: Identity::new(),
            parallelism,
        }
    }

    /// Opens a one-instance source stage named `name` whose head `make` builds when the run
    /// starts (opening files then, so that an error names the stage).
    fn open_source<T: Send + 'static>(
        &self,
        name: Arc<str>,
        make: impl FnOnce(&Arc<str>) -> Result<Box<dyn Head<T>>, Error> + 'static,
    ) -> Stream<T, Identity<T>> {
        let stage = Arc::clone(&name);
        let head = HeadSpec {
            name: Some(name),
            source: true,
            inputs: Vec::new(),
            make: Box::new(move |_, _| Ok(vec![make(&stage)?])),
        };
        self.open(head, 1)
    }

    /// A source stage pulling records from any iterator, on one thread.
    ///
    /// ```
    /// let p = millrace::Pipeline::new();
    /// let out = p.source("words", vec!["a", "b"]).collect();
    /// p.run().unwrap();
    /// assert_eq!(out.take(), vec!["a", "b"]);
    /// ```
    pub fn source<It>(&self, name: &str, iter: It) -> Stream<It::Item, Identity<It::Item>>
    where
        It: IntoIterator + Send + 'static,
        It::IntoIter: Send + 'static,
        It::Item: Send + 'static,
    {
        let name = self.b.borrow_mut().unique(name);
        self.open_source(name, move |_| Ok(Box::new(IterHead::new(iter.into_iter()))))
    }

    /// A source stage fed through a channel by code outside the pipeline (another thread, a
    /// callback). It flushes partial batches after the linger time even while the senders are
    /// silent, which an iterator that blocks in `next()` cannot do, and it ends when every
    /// sender has been dropped.
    ///
    /// ```
    /// let (tx, rx) = millrace::crossbeam_channel::bounded(16);
    /// let p = millrace::Pipeline::new();
    /// let out = p.source_channel("events", rx).map(|x: u32| x * 2).collect();
    /// let feeder = std::thread::spawn(move || (1..=3).for_each(|x| tx.send(x).unwrap()));
    /// p.run().unwrap();
    /// feeder.join().unwrap();
    /// assert_eq!(out.take(), vec![2, 4, 6]);
    /// ```
    pub fn source_channel<T: Send + 'static>(
        &self,
        name: &str,
        rx: crossbeam_channel::Receiver<T>,
    ) -> Stream<T, Identity<T>> {
        let name = self.b.borrow_mut().unique(name);
        self.open_source(name, move |_| Ok(Box::new(ChannelSourceHead::new(rx))))
    }

    fn line_source<T, P>(&self, name: Arc<str>, path: &Path, parse: P) -> Stream<T, Identity<T>>
    where
        T: Send + 'static,
        P: FnMut(&[u8], u64) -> crate::source::ParseResult<T> + Send + 'static,
    {
        let path = path.to_path_buf();
        self.open_source(name, move |stage| {
            let input = Input::open(stage, &path)?;
            Ok(Box::new(LineHead::new(Arc::clone(stage), input, parse)))
        })
    }

    /// A source stage yielding the lines of a file (`-` for stdin), without line endings.
    /// Invalid UTF-8 fails the run naming the file and line.
    pub fn read_lines(&self, path: impl AsRef<Path>) -> Stream<String, Identity<String>> {
        let name = self.b.borrow_mut().unique("lines.read");
        self.line_source(name, path.as_ref(), |l, _| parse_text(l))
    }

    /// `lines.read` of the TOML layer: lines mapped by `f`, under an explicit stage name.
    pub(crate) fn lines_as<T: Send + 'static>(
        &self,
        name: &str,
        path: &Path,
        f: impl Fn(String) -> T + Send + 'static,
    ) -> Stream<T, Identity<T>> {
        let name = self.b.borrow_mut().reserve(name);
        self.line_source(name, path, move |l, _| parse_text(l).map(|o| o.map(&f)))
    }

    /// Blocks of whole lines (about `chunk_size` bytes each, one per message), for parsing on
    /// other threads.
    pub(crate) fn chunks_as(
        &self,
        name: &str,
        path: &Path,
        chunk_size: usize,
    ) -> Stream<Chunk, Identity<Chunk>> {
        self.block_source_as(name, path, chunk_size, |h| Box::new(h))
    }

    /// `ndjson.read` on the byte path: blocks of whole lines, every line checked to be a JSON
    /// object (blank lines dropped), never parsed into values.
    pub(crate) fn ndjson_blocks_as(
        &self,
        name: &str,
        path: &Path,
        block_size: usize,
    ) -> Stream<Chunk, Identity<Chunk>> {
        self.block_source_as(name, path, block_size, |h| {
            Box::new(crate::source::NdjsonBlockHead::new(h))
        })
    }

    /// A source of blocks read by a [`ChunkHead`], wrapped by `wrap`.
    fn block_source_as(
        &self,
        name: &str,
        path: &Path,
        size: usize,
        wrap: fn(ChunkHead) -> Box<dyn Head<Chunk>>,
    ) -> Stream<Chunk, Identity<Chunk>> {
        let name = self.b.borrow_mut().reserve(name);
        let path = path.to_path_buf();
        self.open_source(name, move |stage| {
            let input = Input::open(stage, &path)?;
            Ok(wrap(ChunkHead::new(Arc::clone(stage), input, size)))
        })
    }

    /// `ndjson.read` of the TOML layer: one JSON object per non-blank line.
    pub(crate) fn ndjson_objects_as(
        &self,
        name: &str,
        path: &Path,
    ) -> Stream<serde_json::Value, Identity<serde_json::Value>> {
        let name = self.b.borrow_mut().reserve(name);
        self.line_source(name, path, |l, _| {
            crate::config::parse_object(l).map(|v| if v.is_null() { None } else { Some(v) })
        })
    }

    /// A source stage parsing each line of a file (`-` for stdin) as one JSON value of type `T`.
    /// Blank lines are skipped; a malformed line fails the run naming the file and line.
    pub fn read_ndjson<T>(&self, path: impl AsRef<Path>) -> Stream<T, Identity<T>>
    where
        T: serde::de::DeserializeOwned + Send + 'static,
    {
        let name = self.b.borrow_mut().unique("ndjson.read");
        self.line_source(name, path.as_ref(), |l, _| parse_json::<T>(l))
    }

    /// The stage graph as Graphviz DOT.
    pub fn to_dot(&self) -> String {
        let b = self.b.borrow();
        let mut s = String::from("digraph pipeline {\n  rankdir=LR;\n  node [shape=box];\n");
        for (i, st) in b.stages.iter().enumerate() {
            let label = if st.parallelism > 1 {
                format!("{} ×{}", st.name, st.parallelism)
            } else {
                st.name.clone()
            };
            let _ = writeln!(s, "  s{i} [label={:?}];", label);
        }
        for (i, st) in b.stages.iter().enumerate() {
            for up in &st.inputs {
                let _ = writeln!(s, "  s{up} -> s{i};");
            }
        }
        s.push_str("}\n");
        s
    }

    /// Includes a [`Pool`](crate::Pool)'s metrics (capacity, in use, waiters, wait time,
    /// timeouts, deadlocks detected) in this run's report and live snapshots.
    ///
    /// ```
    /// let pool = millrace::Pool::from_resources("conns", vec![1u8, 2]);
    /// let p = millrace::Pipeline::new();
    /// p.track_pool(&pool);
    /// let q = pool.clone();
    /// p.source("n", 0..10u32).map(move |x| { let _c = q.acquire().unwrap(); x }).for_each(|_| {});
    /// let report = p.run().unwrap();
    /// assert_eq!(report.pools[0].acquires, 10);
    /// ```
    pub fn track_pool<R: Send + 'static>(&self, pool: &crate::Pool<R>) {
        let pool = pool.clone();
        self.shared
            .pools
            .lock()
            .push(Box::new(move || pool.metrics()));
    }

    /// Names of the stages registered so far, in the order they run.
    pub fn stage_names(&self) -> Vec<String> {
        self.b
            .borrow()
            .stages
            .iter()
            .map(|s| s.name.clone())
            .collect()
    }

    /// Runs the pipeline to completion on one thread per stage instance and returns its report,
    /// or the first error. Every thread has been joined when this returns.
    pub fn run(self) -> Result<RunReport, Error> {
        let mut b = std::mem::take(&mut *self.b.borrow_mut());
        if !b.errors.is_empty() {
            return Err(Error::Build(b.errors.join("; ")));
        }
        if b.stages.is_empty() {
            return Err(Error::Build("the pipeline has no sink".into()));
        }
        let opts = b.opts.clone();
        let mut phase2 = Vec::with_capacity(b.stages.len());
        for slot in &mut b.stages {
            let build = slot.build.take().expect("each stage is built once");
            phase2.push(build(&opts)?);
        }
        let mut workers = Vec::new();
        for p in phase2 {
            workers.extend(p()?);
        }
        runtime::run(Arc::clone(&self.shared), workers)
    }
}

/// An open stage producing records of type `C::Out`: a head of type `I` followed by the fused
/// chain `C`. See the [crate docs](crate) for an example.
#[must_use = "a stream does nothing until it ends in a sink and the pipeline runs"]
pub struct Stream<I, C> {
    b: Rc<RefCell<Builder>>,
    head: HeadSpec<I>,
    chain: C,
    parallelism: usize,
}

/// The output record type of a stream.
type Out<I, C> = <C as Chain<I>>::Out;

impl<I: Send + 'static, C: Chain<I>> Stream<I, C> {
    fn with<C2>(self, chain: C2) -> Stream<I, C2> {
        Stream {
            b: self.b,
            head: self.head,
            chain,
            parallelism: self.parallelism,
        }
    }

    fn op_name(&self, kind: &str) -> Arc<str> {
        self.b.borrow_mut().unique(kind)
    }

    /// Applies `f` to every record.
    pub fn map<U, F>(self, f: F) -> Stream<I, Map<C, F>>
    where
        U: Send + 'static,
        F: Fn(Out<I, C>) -> U + Send + Sync + 'static,
    {
        let name = self.op_name("map");
        let chain = Map::new(self.chain.clone(), f, name);
        self.with(chain)
    }

    /// Applies a fallible `f`; an `Err` fails the run with an error naming this operator.
    pub fn try_map<U, X, F>(self, f: F) -> Stream<I, TryMap<C, F>>
    where
        U: Send + 'static,
        X: Into<BoxError>,
        F: Fn(Out<I, C>) -> Result<U, X> + Send + Sync + 'static,
    {
        let name = self.op_name("try_map");
        let chain = TryMap::new(self.chain.clone(), f, name);
        self.with(chain)
    }

    /// Keeps the records for which `f` returns true.
    pub fn filter<F>(self, f: F) -> Stream<I, Filter<C, F>>
    where
        F: Fn(&Out<I, C>) -> bool + Send + Sync + 'static,
    {
        let name = self.op_name("filter");
        let chain = Filter::new(self.chain.clone(), f, name);
        self.with(chain)
    }

    /// Replaces every record by the records `f` returns.
    pub fn flat_map<It, F>(self, f: F) -> Stream<I, FlatMap<C, F>>
    where
        It: IntoIterator,
        It::Item: Send + 'static,
        F: Fn(Out<I, C>) -> It + Send + Sync + 'static,
    {
        let name = self.op_name("flat_map");
        let chain = FlatMap::new(self.chain.clone(), f, name);
        self.with(chain)
    }

    /// A fallible [`flat_map`](Stream::flat_map).
    pub fn try_flat_map<It, X, F>(self, f: F) -> Stream<I, TryFlatMap<C, F>>
    where
        It: IntoIterator,
        It::Item: Send + 'static,
        X: Into<BoxError>,
        F: Fn(Out<I, C>) -> Result<It, X> + Send + Sync + 'static,
    {
        let name = self.op_name("try_flat_map");
        let chain = TryFlatMap::new(self.chain.clone(), f, name);
        self.with(chain)
    }

    /// Calls `f` on every record and passes it on.
    pub fn inspect<F>(self, f: F) -> Stream<I, Inspect<C, F>>
    where
        F: Fn(&Out<I, C>) + Send + Sync + 'static,
    {
        let name = self.op_name("inspect");
        let chain = Inspect::new(self.chain.clone(), f, name);
        self.with(chain)
    }

    /// Passes the first `n` records (across all instances of the stage), then stops the stage
    /// and, through it, everything upstream.
    pub fn limit(self, n: u64) -> Stream<I, Limit<C>> {
        let name = self.op_name("limit");
        let chain = Limit::new(self.chain.clone(), n, name);
        self.with(chain)
    }

    /// Erases the chain's type (one dynamic call per record), for pipelines assembled at run
    /// time.
    pub fn boxed(self) -> Stream<I, Boxed<I, Out<I, C>>> {
        let chain = Boxed::new(self.chain.clone());
        self.with(chain)
    }

    /// Renames the last operator added (or the source, if there is none). Names must be unique
    /// within a pipeline; errors and metrics use them.
    pub fn name(mut self, name: &str) -> Self {
        let new = self.b.borrow_mut().reserve(name);
        let mut names = Vec::new();
        self.chain.names(&mut names);
        let old = match names.pop() {
            Some(old) => {
                self.chain.rename_last(new);
                Some(old)
            }
            None => self.head.name.replace(new),
        };
        if let Some(old) = old {
            self.b.borrow_mut().names.remove(&*old);
        }
        self
    }

    /// Sets how many instances (threads) run this stage. Only a stage that reads from a channel
    /// can have more than one; a source stage needs [`rebalance`](Stream::rebalance) first.
    pub fn parallelism(mut self, n: usize) -> Self {
        if self.head.source && n != 1 {
            let name = self.stage_name();
            self.b.borrow_mut().errors.push(format!(
                "stage `{name}` reads a source and runs on one thread; call .rebalance({n}) before the operators to parallelise"
            ));
        } else {
            self.parallelism = n.max(1);
        }
        self
    }

    /// Moves the chain into the head, so that the stream's head type is its output type (used
    /// where streams of different heads must share one type). Still one stage, no hop.
    pub(crate) fn into_head(self) -> Stream<Out<I, C>, Identity<Out<I, C>>> {
        let name = self.stage_name();
        let Stream {
            b,
            head,
            chain,
            parallelism,
        } = self;
        let HeadSpec {
            source,
            inputs,
            make,
            ..
        } = head;
        let head = HeadSpec {
            name: Some(Arc::from(name)),
            source,
            inputs,
            make: Box::new(move |p, opts| {
                let heads = make(p, opts)?;
                Ok(heads
                    .into_iter()
                    .map(|inner| {
                        Box::new(ChainedHead {
                            inner,
                            chain: chain.clone(),
                            tmp: Vec::new(),
                            done: false,
                        }) as Box<dyn Head<Out<I, C>>>
                    })
                    .collect())
            }),
        };
        Stream {
            b,
            head,
            chain: Identity::new(),
            parallelism,
        }
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

    fn stage_name(&self) -> String {
        let mut names: Vec<Arc<str>> = self.head.name.iter().cloned().collect();
        self.chain.names(&mut names);
        names.iter().map(|n| &**n).collect::<Vec<_>>().join("+")
    }

    /// Closes the stage with a tail made per instance on the worker thread.
    fn close<T, MK>(self, sink_name: Option<Arc<str>>, mut make_tail: MK) -> usize
    where
        T: Tail<Out<I, C>> + 'static,
        MK: FnMut(usize) -> Result<MakeTail<T>, Error> + 'static,
    {
        let mut name = self.stage_name();
        if let Some(s) = &sink_name {
            if name.is_empty() {
                name = s.to_string();
            } else {
                name = format!("{name}+{s}");
            }
        }
        let stage: Arc<str> = Arc::from(name.as_str());
        let Stream {
            b,
            head,
            chain,
            parallelism,
            ..
        } = self;
        let source = head.source;
        let make_head = head.make;
        let build: Phase1 = Box::new(move |opts| {
            let heads = make_head(parallelism, opts)?;
            Ok(Box::new(move || {
                let mut workers = Vec::with_capacity(heads.len());
                for (i, head) in heads.into_iter().enumerate() {
                    let mk = make_tail(i)?;
                    let chain = chain.clone();
                    workers.push(Worker {
                        stage: Arc::clone(&stage),
                        instance: i,
                        source,
                        body: Box::new(move |cx: &Cx| {
                            let tail = mk(cx)?;
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
            name,
            parallelism,
            inputs: head.inputs,
            build: Some(build),
        });
        id
    }

    /// A stage of `parallelism` instances whose head transforms the input batches itself
    /// (exec, native nodes, the byte path): order kept at parallelism 1, rebalanced above.
    fn head_stage_as<O, M>(self, name: &str, parallelism: usize, make: M) -> Fresh<O>
    where
        O: Send + 'static,
        M: Fn(Arc<str>, InputHead<Out<I, C>>) -> Box<dyn Head<O>> + 'static,
    {
        let b = Rc::clone(&self.b);
        let name = b.borrow_mut().reserve(name);
        let partition = if parallelism == 1 {
            Partition::Forward
        } else {
            Partition::Rebalance
        };
        let edge = self.connect(partition);
        let op = Arc::clone(&name);
        let mut head = input_head(vec![edge], move |input| make(Arc::clone(&op), input));
        head.name = Some(name);
        Stream {
            b,
            head,
            chain: Identity::new(),
            parallelism,
        }
    }

    /// Closes the stage into an edge with the given partitioning; returns the edge.
    fn connect(self, partition: Partition<Out<I, C>>) -> Edge<Out<I, C>> {
        let edge: Edge<Out<I, C>> = Rc::new(RefCell::new(EdgeCell {
            partition,
            senders: None,
            recycle: None,
            from_stage: usize::MAX,
            from_name: self.stage_name(),
            from_parallelism: self.parallelism,
            slot_base: 0,
        }));
        let out = Rc::clone(&edge);
        let id = self.close(None, move |i| channel_tail(&out, i));
        edge.borrow_mut().from_stage = id;
        edge
    }

    /// Starts a new stage fed through a channel with the given partitioning.
    fn hop(
        self,
        partition: Partition<Out<I, C>>,
        parallelism: usize,
    ) -> Stream<Out<I, C>, Identity<Out<I, C>>> {
        let b = Rc::clone(&self.b);
        let edge = self.connect(partition);
        let head = input_head(vec![edge], |h| Box::new(h) as Box<dyn Head<_>>);
        Stream {
            b,
            head,
            chain: Identity::new(),
            parallelism,
        }
    }

    /// Ends the fused chain here: what follows runs in a new single-instance stage on its own
    /// thread, fed through a channel.
    pub fn new_stage(self) -> Stream<Out<I, C>, Identity<Out<I, C>>> {
        self.hop(Partition::Forward, 1)
    }

    /// What follows runs in a new stage of `n` instances; whole batches are dealt round-robin,
    /// preferring an instance with room in its channel.
    pub fn rebalance(self, n: usize) -> Stream<Out<I, C>, Identity<Out<I, C>>> {
        self.hop(Partition::Rebalance, n.max(1))
    }

    /// What follows runs in a new stage whose instance `i` receives the output of this stage's
    /// instance `i` (modulo the instance count): no reshuffling.
    pub fn forward(self) -> Stream<Out<I, C>, Identity<Out<I, C>>> {
        let p = self.parallelism;
        self.hop(Partition::Forward, p)
    }

    /// Merges another stream of the same record type into a new stage.
    pub fn union<J, D>(self, other: Stream<J, D>) -> Stream<Out<I, C>, Identity<Out<I, C>>>
    where
        J: Send + 'static,
        D: Chain<J, Out = Out<I, C>>,
    {
        let b = Rc::clone(&self.b);
        let e1 = self.connect(Partition::Forward);
        let e2 = other.connect(Partition::Forward);
        let head = input_head(vec![e1, e2], |h| Box::new(h) as Box<dyn Head<_>>);
        Stream {
            b,
            head,
            chain: Identity::new(),
            parallelism: 1,
        }
    }

    /// Sends every record to each of `n` new streams (fan-out).
    pub fn split(self, n: usize) -> Vec<Fresh<Out<I, C>>>
    where
        Out<I, C>: Clone,
    {
        let b = Rc::clone(&self.b);
        let p = self.parallelism;
        let name = self.stage_name();
        let edges: Vec<Edge<Out<I, C>>> = (0..n)
            .map(|_| {
                Rc::new(RefCell::new(EdgeCell {
                    partition: Partition::Forward,
                    senders: None,
                    recycle: None,
                    from_stage: usize::MAX,
                    from_name: name.clone(),
                    from_parallelism: p,
                    slot_base: 0,
                }))
            })
            .collect();
        let outs = edges.clone();
        let id = self.close(None, move |i| {
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
        });
        edges
            .into_iter()
            .map(|e| {
                e.borrow_mut().from_stage = id;
                let head = input_head(vec![e], |h| Box::new(h) as Box<dyn Head<_>>);
                Stream {
                    b: Rc::clone(&b),
                    head,
                    chain: Identity::new(),
                    parallelism: 1,
                }
            })
            .collect()
    }

    /// Partitions records by key for a keyed aggregation. The key is computed once per record,
    /// on the producing side.
    pub fn key_by<K, KF>(self, key: KF) -> KeyedStream<K, Out<I, C>>
    where
        K: Hash + Eq + Send + 'static,
        KF: Fn(&Out<I, C>) -> K + Send + Sync + 'static,
    {
        let name = self.op_name("key_by");
        self.key_by_named(name, key)
    }

    pub(crate) fn key_by_as<K, KF>(self, name: &str, key: KF) -> KeyedStream<K, Out<I, C>>
    where
        K: Hash + Eq + Send + 'static,
        KF: Fn(&Out<I, C>) -> K + Send + Sync + 'static,
    {
        let name = self.b.borrow_mut().reserve(name);
        self.key_by_named(name, key)
    }

    fn key_by_named<K, KF>(self, name: Arc<str>, key: KF) -> KeyedStream<K, Out<I, C>>
    where
        K: Hash + Eq + Send + 'static,
        KF: Fn(&Out<I, C>) -> K + Send + Sync + 'static,
    {
        let b = Rc::clone(&self.b);
        let chain = Map::new(self.chain.clone(), move |x| (key(&x), x), name);
        let keyed = self.with(chain);
        let hash = Partition::Hash(Arc::new(|(k, _): &(K, _)| partition_hash(k)));
        KeyedStream {
            b,
            connect: Box::new(move |gen| match gen {
                None => keyed.connect(hash),
                Some((time, bound)) => connect_with_watermarks(keyed, hash, time, bound),
            }),
            parallelism: 1,
        }
    }

    /// Routes each record to one of two new streams: `Ok` to the first, `Err` to the second.
    /// Both must be consumed.
    pub(crate) fn route<L, R>(self, f: fn(Out<I, C>) -> Result<L, R>) -> (Fresh<L>, Fresh<R>)
    where
        L: Send + 'static,
        R: Send + 'static,
    {
        let b = Rc::clone(&self.b);
        let p = self.parallelism;
        let name = self.stage_name();
        fn edge<X>(name: &str, p: usize) -> Edge<X> {
            Rc::new(RefCell::new(EdgeCell {
                partition: Partition::Forward,
                senders: None,
                recycle: None,
                from_stage: usize::MAX,
                from_name: name.to_string(),
                from_parallelism: p,
                slot_base: 0,
            }))
        }
        let (left, right) = (edge::<L>(&name, p), edge::<R>(&name, p));
        let (l, r) = (Rc::clone(&left), Rc::clone(&right));
        let id = self.close(None, move |i| {
            let (ml, mr) = (channel_tail(&l, i)?, channel_tail(&r, i)?);
            Ok(Box::new(move |cx: &Cx| {
                Ok(RouteTail {
                    left: ml(cx)?,
                    right: mr(cx)?,
                    f,
                    live: [true, true],
                })
            }) as MakeTail<_>)
        });
        left.borrow_mut().from_stage = id;
        right.borrow_mut().from_stage = id;
        let open = |e| input_head(vec![e], |h| Box::new(h) as Box<dyn Head<_>>);
        let lh = open(left);
        let rh = input_head(vec![right], |h| Box::new(h) as Box<dyn Head<_>>);
        (
            Stream {
                b: Rc::clone(&b),
                head: lh,
                chain: Identity::new(),
                parallelism: 1,
            },
            Stream {
                b,
                head: rh,
                chain: Identity::new(),
                parallelism: 1,
            },
        )
    }

    /// Gathers every record into one instance and, at end of input, emits them sorted by `cmp`.
    /// Holds all records in memory: use it on aggregated output, not raw input.
    pub fn sort_by<F>(self, cmp: F) -> Stream<Out<I, C>, Identity<Out<I, C>>>
    where
        F: Fn(&Out<I, C>, &Out<I, C>) -> std::cmp::Ordering + Send + Sync + 'static,
    {
        let name = self.op_name("sort");
        self.sort_by_named(name, cmp)
    }

    pub(crate) fn sort_by_as<F>(self, name: &str, cmp: F) -> Stream<Out<I, C>, Identity<Out<I, C>>>
    where
        F: Fn(&Out<I, C>, &Out<I, C>) -> std::cmp::Ordering + Send + Sync + 'static,
    {
        let name = self.b.borrow_mut().reserve(name);
        self.sort_by_named(name, cmp)
    }

    fn sort_by_named<F>(self, name: Arc<str>, cmp: F) -> Stream<Out<I, C>, Identity<Out<I, C>>>
    where
        F: Fn(&Out<I, C>, &Out<I, C>) -> std::cmp::Ordering + Send + Sync + 'static,
    {
        let b = Rc::clone(&self.b);
        let edge = self.connect(Partition::Forward);
        let cmp = Arc::new(cmp);
        let mut head = input_head(vec![edge], move |input| {
            Box::new(SortHead {
                input,
                cmp: Arc::clone(&cmp),
                items: Vec::new(),
                sorted: None,
            }) as Box<dyn Head<_>>
        });
        head.name = Some(name);
        Stream {
            b,
            head,
            chain: Identity::new(),
            parallelism: 1,
        }
    }

    /// Calls `f` for each record, on one thread, in arrival order. Fused into this stage when it
    /// has one instance.
    pub fn for_each<F>(self, f: F)
    where
        F: FnMut(Out<I, C>) + Send + 'static,
    {
        let mut f = f;
        self.try_for_each_named("for_each", move |x| {
            f(x);
            Ok::<(), BoxError>(())
        })
    }

    /// A fallible [`for_each`](Stream::for_each): an `Err` fails the run naming the sink.
    pub fn try_for_each<X, F>(self, f: F)
    where
        X: Into<BoxError> + 'static,
        F: FnMut(Out<I, C>) -> Result<(), X> + Send + 'static,
    {
        self.try_for_each_named("for_each", f)
    }

    fn try_for_each_named<X, F>(self, kind: &str, f: F)
    where
        X: Into<BoxError> + 'static,
        F: FnMut(Out<I, C>) -> Result<(), X> + Send + 'static,
    {
        if self.parallelism > 1 {
            return self.new_stage().try_for_each_named(kind, f);
        }
        let name = self.op_name(kind);
        let mut f = Some(f);
        let sink = Arc::clone(&name);
        self.close(Some(name), move |_| {
            let f = f.take().expect("a for_each sink has one instance");
            let sink = Arc::clone(&sink);
            Ok(Box::new(move |cx: &Cx| Ok(ForEachTail::new(cx, f, sink))) as MakeTail<_>)
        });
    }

    /// Collects every record into memory; the returned handle yields them after the run.
    pub fn collect(self) -> Collected<Out<I, C>> {
        let items = Arc::new(Mutex::new(Vec::new()));
        let handle = Collected {
            items: Arc::clone(&items),
        };
        let name = self.op_name("collect");
        self.close(Some(name), move |_| {
            let items = Arc::clone(&items);
            Ok(Box::new(move |cx: &Cx| Ok(CollectTail::new(cx, items))) as MakeTail<_>)
        });
        handle
    }

    fn write_with<F>(self, name: Arc<str>, path: &Path, format: F)
    where
        F: FnMut(&mut dyn std::io::Write, &Out<I, C>) -> std::io::Result<u64> + Send + 'static,
    {
        if self.parallelism > 1 {
            return self.new_stage().write_with(name, path, format);
        }
        let sink = Arc::clone(&name);
        let path = path.to_path_buf();
        let mut format = Some(format);
        self.close(Some(name), move |_| {
            let out = open_output(&sink, &path)?;
            let shown = path.display().to_string();
            let format = format.take().expect("a writer sink has one instance");
            let sink = Arc::clone(&sink);
            Ok(
                Box::new(move |cx: &Cx| Ok(WriteTail::new(cx, out, shown, sink, format)))
                    as MakeTail<_>,
            )
        });
    }

    /// Writes each record as a line of text to a file (`-` for stdout). A closed stdout ends
    /// the run quietly.
    pub fn write_lines(self, path: impl AsRef<Path>)
    where
        Out<I, C>: std::fmt::Display,
    {
        let name = self.op_name("lines.write");
        self.write_with(name, path.as_ref(), |w, x| write!(w, "{x}").map(|()| 1))
    }

    /// Writes each record as one line of JSON to a file (`-` for stdout).
    pub fn write_ndjson(self, path: impl AsRef<Path>)
    where
        Out<I, C>: serde::Serialize,
    {
        let name = self.op_name("ndjson.write");
        self.write_ndjson_named(name, path.as_ref())
    }

    pub(crate) fn write_ndjson_as(self, name: &str, path: &Path)
    where
        Out<I, C>: serde::Serialize,
    {
        let name = self.b.borrow_mut().reserve(name);
        self.write_ndjson_named(name, path)
    }

    fn write_ndjson_named(self, name: Arc<str>, path: &Path)
    where
        Out<I, C>: serde::Serialize,
    {
        self.write_with(name, path, |w, x| {
            serde_json::to_writer(&mut *w, x)
                .map(|()| 1)
                .map_err(std::io::Error::from)
        })
    }
}

// `Chunk` is crate-private and so are these methods; the public type only carries them.
#[allow(private_bounds)]
impl<I: Send + 'static, C: Chain<I, Out = Chunk>> Stream<I, C> {
    /// `ndjson.write` on the byte path: checked blocks of lines written as they are.
    ///
    /// Always a stage of its own: every stage that makes blocks then ends in a channel, which
    /// counts a block as one record, and corrects its count by `records - 1` (see
    /// [`Chunk::records`]); this sink counts the block's records.
    pub(crate) fn write_blocks_as(self, name: &str, path: &Path) {
        let b = Rc::clone(&self.b);
        let name = b.borrow_mut().reserve(name);
        let edge = self.connect(Partition::Forward);
        let head = input_head(vec![edge], |input| {
            Box::new(crate::source::BlockInput(input)) as Box<dyn Head<Chunk>>
        });
        let own_stage = Stream {
            b,
            head,
            chain: Identity::new(),
            parallelism: 1,
        };
        own_stage.write_with(name, path, |w, c: &Chunk| {
            // Checked blocks end in a newline; the writer adds it back.
            let data = c.data.strip_suffix(b"\n").unwrap_or(&c.data);
            w.write_all(data).map(|()| c.records)
        })
    }

    /// A reloadable `exec` stage on the byte path (see [`crate::reload`]).
    pub(crate) fn exec_blocks_live_as(
        self,
        name: &str,
        spec: Arc<crate::reload::Versioned<crate::exec::ExecSpec>>,
    ) -> Stream<Chunk, Identity<Chunk>> {
        self.head_stage_as(name, 1, move |op, input| {
            Box::new(crate::reload::ReloadExecHead::new(
                op,
                input,
                Arc::clone(&spec),
            ))
        })
    }

    /// An `exec` stage on the byte path: blocks of NDJSON lines to the child and back.
    pub(crate) fn exec_blocks_as(
        self,
        name: &str,
        spec: crate::exec::ExecSpec,
    ) -> Stream<Chunk, Identity<Chunk>> {
        let spec = Arc::new(spec);
        self.head_stage_as(name, 1, move |op, input| {
            Box::new(crate::exec::ExecHead::new(op, input, Arc::clone(&spec)))
        })
    }
}

impl<I: Send + 'static, C: Chain<I, Out = serde_json::Value>> Stream<I, C> {
    /// A reloadable `filter`, `select` or `words` step, fused like the fixed ones; it loads its
    /// version once per batch (see [`crate::reload`]).
    pub(crate) fn live_map(
        self,
        logic: Arc<crate::reload::Versioned<crate::reload::MapLogic>>,
    ) -> Stream<I, crate::reload::LiveMap<C>> {
        let name = self.op_name("live");
        let chain = crate::reload::LiveMap::new(self.chain.clone(), name, logic);
        self.with(chain)
    }

    /// An `exec` stage of `parallelism` instances (one child process each), fed by this one.
    pub(crate) fn exec_as(
        self,
        name: &str,
        spec: crate::exec::ExecSpec,
        parallelism: usize,
    ) -> Fresh<serde_json::Value> {
        let spec = Arc::new(spec);
        self.head_stage_as(name, parallelism, move |op, input| {
            Box::new(crate::exec::ExecHead::new(op, input, Arc::clone(&spec)))
        })
    }

    /// A stage running a native plugin's node (one node instance per stage instance);
    /// `live`: the spec may be replaced between batches (hot reload).
    pub(crate) fn native_as(
        self,
        name: &str,
        spec: Arc<crate::reload::Versioned<crate::plugin::native::NativeSpec>>,
        live: bool,
        parallelism: usize,
    ) -> Fresh<serde_json::Value> {
        self.head_stage_as(name, parallelism, move |op, input| {
            Box::new(crate::plugin::native::NativeHead::new(
                op,
                input,
                Arc::clone(&spec),
                live,
            ))
        })
    }

    /// A reloadable `exec` stage: one child per version (see [`crate::reload`]).
    pub(crate) fn exec_live_as(
        self,
        name: &str,
        spec: Arc<crate::reload::Versioned<crate::exec::ExecSpec>>,
        parallelism: usize,
    ) -> Fresh<serde_json::Value> {
        self.head_stage_as(name, parallelism, move |op, input| {
            Box::new(crate::reload::ReloadExecHead::new(
                op,
                input,
                Arc::clone(&spec),
            ))
        })
    }
}

/// Builds the per-instance tail maker for an edge, at run time (phase 2).
fn channel_tail<T: Send + 'static>(
    edge: &Edge<T>,
    instance: usize,
) -> Result<MakeTail<ChannelTail<T>>, Error> {
    let e = edge.borrow();
    let senders = e.senders.clone().ok_or_else(|| {
        Error::Build(format!(
            "the output of stage `{}` is never consumed: end the stream in a sink",
            e.from_name
        ))
    })?;
    let partition = e.partition.clone();
    let recycle = e.recycle.clone();
    let slot = e.slot_base + instance;
    Ok(Box::new(move |cx: &Cx| {
        Ok(ChannelTail::new(
            cx, instance, slot, senders, partition, recycle,
        ))
    }))
}

/// A head spec reading the given edges; the channels are made when the run starts.
fn input_head<X, I, W>(edges: Vec<Edge<X>>, mut wrap: W) -> HeadSpec<I>
where
    X: Send + 'static,
    W: FnMut(InputHead<X>) -> Box<dyn Head<I>> + 'static,
{
    let inputs = edges.iter().map(|e| e.borrow().from_stage).collect();
    HeadSpec {
        name: None,
        source: false,
        inputs,
        make: Box::new(move |parallelism, opts| {
            let ends: usize = edges.iter().map(|e| e.borrow().from_parallelism).sum();
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
                .map(|rx| wrap(InputHead::new(rx, ends, back_tx.clone(), idle)))
                .collect())
        }),
    }
}

/// The hash that picks a keyed instance. Re-mixed so that it is independent of the low bits
/// the instance's own hash table uses.
fn partition_hash<K: Hash>(k: &K) -> u64 {
    let mut h = FxHasher::default();
    k.hash(&mut h);
    h.finish()
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .rotate_left(32)
}

/// Closes the stage feeding a keyed stream, with an optional watermark generator (event time and
/// bound in ms).
type ConnectKeyed<K, T> = Box<dyn FnOnce(Option<(DynTime<T>, i64)>) -> Edge<(K, T)>>;

/// Records partitioned by key, ready for a per-key aggregation emitted at end of input.
#[must_use = "a keyed stream does nothing until it is aggregated"]
pub struct KeyedStream<K, T> {
    b: Rc<RefCell<Builder>>,
    /// Closes the producing stage into the keyed edge, with a watermark generator at its end
    /// when a window consumes it.
    connect: ConnectKeyed<K, T>,
    parallelism: usize,
}

impl<K, T> KeyedStream<K, T>
where
    K: Hash + Eq + Send + 'static,
    T: Send + 'static,
{
    /// Sets how many instances run the aggregation; each key is owned by exactly one.
    pub fn parallelism(mut self, n: usize) -> Self {
        self.parallelism = n.max(1);
        self
    }

    /// Folds each key's records into an accumulator starting at `init`; emits `(key, acc)` per
    /// key at end of input.
    ///
    /// ```
    /// let p = millrace::Pipeline::new();
    /// let out = p.source("n", 1..=6u32).key_by(|x| x % 2).fold(0u32, |acc, x| *acc += x).collect();
    /// p.run().unwrap();
    /// let mut v = out.take();
    /// v.sort();
    /// assert_eq!(v, vec![(0, 12), (1, 9)]);
    /// ```
    pub fn fold<A, F>(self, init: A, f: F) -> Stream<(K, A), Identity<(K, A)>>
    where
        A: Clone + Send + Sync + 'static,
        F: Fn(&mut A, T) + Send + Sync + 'static,
    {
        let name = self.b.borrow_mut().unique("fold");
        self.aggregate(name, move || init.clone(), f)
    }

    pub(crate) fn aggregate_as<A, N, F>(
        self,
        name: &str,
        init: N,
        f: F,
    ) -> Stream<(K, A), Identity<(K, A)>>
    where
        A: Send + 'static,
        N: Fn() -> A + Send + Sync + 'static,
        F: Fn(&mut A, T) + Send + Sync + 'static,
    {
        let name = self.b.borrow_mut().reserve(name);
        self.aggregate(name, init, f)
    }

    fn aggregate<A, N, F>(self, name: Arc<str>, init: N, f: F) -> Stream<(K, A), Identity<(K, A)>>
    where
        A: Send + 'static,
        N: Fn() -> A + Send + Sync + 'static,
        F: Fn(&mut A, T) + Send + Sync + 'static,
    {
        let f = Arc::new(f);
        let init = Arc::new(init);
        let edge = (self.connect)(None);
        let mut head = input_head(vec![edge], move |input| {
            Box::new(KeyedHead {
                input,
                init: Arc::clone(&init),
                fold: Arc::clone(&f),
                state: FxHashMap::default(),
                drain: None,
            }) as Box<dyn Head<(K, A)>>
        });
        head.name = Some(name);
        Stream {
            b: self.b,
            head,
            chain: Identity::new(),
            parallelism: self.parallelism,
        }
    }

    /// Windows each key's records by event time and aggregates every window with `agg`.
    ///
    /// The stage feeding the window generates watermarks from `spec`'s event time (one
    /// generator per instance, trailing the newest time it emitted by the spec's
    /// `max_out_of_orderness`); a window fires once the watermark reaches its end. See
    /// docs/semantics.md.
    ///
    /// ```
    /// use millrace::window::{Aggregate, Sum, Tumbling, WindowSpec};
    /// use millrace::{Pipeline, Timestamp, Window};
    /// let p = Pipeline::new();
    /// // (key, event time ms, value)
    /// let events = vec![("a", 0, 1.0), ("a", 9_999, 2.0), ("a", 10_000, 4.0), ("b", 5_000, 8.0)];
    /// let spec = WindowSpec::new(Tumbling::new(10_000, 0).unwrap(), |e: &(&str, i64, f64)| {
    ///     Timestamp(e.1)
    /// });
    /// let out = p
    ///     .source("events", events)
    ///     .key_by(|e| e.0)
    ///     .window(spec, Sum.on(|e: &(&str, i64, f64)| e.2))
    ///     .results()
    ///     .map(|r| (r.key, r.window, r.value))
    ///     .collect();
    /// p.run().unwrap();
    /// let mut got = out.take();
    /// got.sort_by_key(|(k, w, _)| (*k, *w));
    /// assert_eq!(got, vec![
    ///     ("a", Window::new(Timestamp(0), Timestamp(10_000)), 3.0),
    ///     ("a", Window::new(Timestamp(10_000), Timestamp(20_000)), 4.0),
    ///     ("b", Window::new(Timestamp(0), Timestamp(10_000)), 8.0),
    /// ]);
    /// ```
    pub fn window<A, E>(self, spec: WindowSpec<E>, agg: A) -> Windowed<K, T, A::Out>
    where
        K: Clone,
        A: Aggregate<T>,
        A::Out: 'static,
        E: EventTime<T>,
    {
        let name = self.b.borrow_mut().unique("window");
        self.window_named(name, spec, agg)
    }

    pub(crate) fn window_as<A, E>(
        self,
        name: &str,
        spec: WindowSpec<E>,
        agg: A,
    ) -> Windowed<K, T, A::Out>
    where
        K: Clone,
        A: Aggregate<T>,
        A::Out: 'static,
        E: EventTime<T>,
    {
        let name = self.b.borrow_mut().reserve(name);
        self.window_named(name, spec, agg)
    }

    fn window_named<A, E>(
        self,
        name: Arc<str>,
        spec: WindowSpec<E>,
        agg: A,
    ) -> Windowed<K, T, A::Out>
    where
        K: Clone,
        A: Aggregate<T>,
        A::Out: 'static,
        E: EventTime<T>,
    {
        let time = spec.time.clone();
        let generator = DynTime(Arc::new(move |x: &T| time.time(x)));
        let edge = (self.connect)(Some((generator, spec.max_out_of_orderness)));
        let agg = Arc::new(agg);
        let op = Arc::clone(&name);
        let mut head = input_head(vec![edge], move |input| {
            Box::new(WindowHead::new(
                Arc::clone(&op),
                input,
                &spec,
                Arc::clone(&agg),
            )) as Box<dyn Head<WindowOutput<K, T, A::Out>>>
        });
        head.name = Some(name);
        Windowed {
            stream: Stream {
                b: self.b,
                head,
                chain: Identity::new(),
                parallelism: self.parallelism,
            },
        }
    }

    /// Counts the records of each key; emits `(key, count)` at end of input.
    pub fn count(self) -> Stream<(K, u64), Identity<(K, u64)>> {
        let name = self.b.borrow_mut().unique("count");
        self.aggregate(name, || 0u64, |n, _| *n += 1)
    }

    /// Combines each key's records pairwise with `f`; emits `(key, result)` at end of input.
    #[allow(clippy::type_complexity)]
    pub fn reduce<F>(
        self,
        f: F,
    ) -> Stream<(K, Option<T>), Map<Identity<(K, Option<T>)>, fn((K, Option<T>)) -> (K, T)>>
    where
        F: Fn(T, T) -> T + Send + Sync + 'static,
    {
        let name = self.b.borrow_mut().unique("reduce");
        let s = self.aggregate(
            name,
            || None,
            move |acc: &mut Option<T>, x| {
                *acc = Some(match acc.take() {
                    None => x,
                    Some(prev) => f(prev, x),
                })
            },
        );
        let unwrap: fn((K, Option<T>)) -> (K, T) = |(k, v)| {
            (
                k,
                v.expect("a key exists only once a record has set its value"),
            )
        };
        let name = s.op_name("reduce.result");
        let chain = Map::new(Identity::new(), unwrap, name);
        s.with(chain)
    }
}

impl<K, T, O> Windowed<K, T, O>
where
    K: Send + 'static,
    T: Send + 'static,
    O: Send + 'static,
{
    /// The window results; late records are dropped (and counted in the window stage's
    /// `late` metric). What follows is fused into the window stage.
    pub fn results(self) -> Fresh<WindowResult<K, O>> {
        let name = self.stream.op_name("results");
        let f: ResultOnly<K, T, O> = result_only;
        let chain = FlatMap::new(Identity::new(), f, name);
        self.stream.with(chain).into_head()
    }

    /// The window results and, as a second stream, the records too late for every window they
    /// belong to. Both streams must end in a sink.
    #[allow(clippy::type_complexity)]
    pub fn with_late(self) -> (Fresh<WindowResult<K, O>>, Fresh<LateRecord<K, T>>) {
        self.stream.route(result_or_late)
    }

    /// Everything the window stage emits, results and late records in one stream.
    pub fn outputs(self) -> Fresh<WindowOutput<K, T, O>> {
        self.stream
    }
}

/// An event-time extractor behind a pointer, for the watermark generator of a keyed edge.
pub(crate) struct DynTime<T>(Arc<TimeFn<T>>);

type TimeFn<T> = dyn Fn(&T) -> Result<Timestamp, String> + Send + Sync;

type ResultOnly<K, T, O> = fn(WindowOutput<K, T, O>) -> Option<WindowResult<K, O>>;

impl<T> Clone for DynTime<T> {
    fn clone(&self) -> Self {
        DynTime(Arc::clone(&self.0))
    }
}

impl<T: 'static> EventTime<T> for DynTime<T> {
    #[inline]
    fn time(&self, record: &T) -> Result<Timestamp, String> {
        (self.0)(record)
    }
}

/// Closes a keyed stage into its edge with a watermark generator at the end of each instance.
fn connect_with_watermarks<I, C, K, T>(
    s: Stream<I, C>,
    partition: Partition<(K, T)>,
    time: DynTime<T>,
    bound_ms: i64,
) -> Edge<(K, T)>
where
    I: Send + 'static,
    C: Chain<I, Out = (K, T)>,
    K: Send + 'static,
    T: Send + 'static,
{
    let edge: Edge<(K, T)> = Rc::new(RefCell::new(EdgeCell {
        partition,
        senders: None,
        recycle: None,
        from_stage: usize::MAX,
        from_name: s.stage_name(),
        from_parallelism: s.parallelism,
        slot_base: 0,
    }));
    let out = Rc::clone(&edge);
    let id = s.close(None, move |i| {
        let make = channel_tail(&out, i)?;
        let time = time.clone();
        Ok(Box::new(move |cx: &Cx| {
            let inner = make(cx)?;
            Ok(WatermarkTail::new(
                inner,
                time,
                bound_ms,
                cx.run.opts.watermark_every,
            ))
        }) as MakeTail<_>)
    });
    edge.borrow_mut().from_stage = id;
    edge
}

/// Sends each record to one of two channel tails.
struct RouteTail<X, L, R> {
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
}

impl<X, L: Send, R: Send> RouteTail<X, L, R> {
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
struct KeyedHead<K, T, A, N, F> {
    input: InputHead<(K, T)>,
    init: Arc<N>,
    fold: Arc<F>,
    state: FxHashMap<K, A>,
    drain: Option<std::collections::hash_map::IntoIter<K, A>>,
}

impl<K, T, A, N, F> Head<(K, A)> for KeyedHead<K, T, A, N, F>
where
    K: Hash + Eq + Send,
    T: Send,
    A: Send,
    N: Fn() -> A + Send + Sync,
    F: Fn(&mut A, T) + Send + Sync,
{
    fn counts_input(&self) -> bool {
        true
    }
    fn pull(
        &mut self,
        cx: &Cx,
        buf: &mut Vec<(K, A)>,
        flush_at: Option<u64>,
    ) -> Result<Pull, Halt> {
        if self.drain.is_none() {
            let mut batch = Vec::new();
            loop {
                if cx.run.is_cancelled() {
                    return Err(Halt::Done);
                }
                match self.input.pull(cx, &mut batch, flush_at)? {
                    Pull::Idle if batch.is_empty() => return Ok(Pull::Idle),
                    pull => {
                        if !batch.is_empty() {
                            crate::metrics::InstanceMetrics::add(
                                &cx.metrics.records_in,
                                batch.len() as u64,
                            );
                            crate::metrics::InstanceMetrics::add(&cx.metrics.batches_in, 1);
                        }
                        for (k, x) in batch.drain(..) {
                            let acc = self.state.entry(k).or_insert_with(|| (self.init)());
                            (self.fold)(acc, x);
                        }
                        if pull == Pull::End {
                            break;
                        }
                    }
                }
            }
            self.drain = Some(std::mem::take(&mut self.state).into_iter());
        }
        let drain = self.drain.as_mut().expect("set above");
        buf.extend(drain.take(cx.batch_size()));
        Ok(if drain.len() == 0 {
            Pull::End
        } else {
            Pull::Data
        })
    }
}

/// A head followed by a chain, acting as one head.
struct ChainedHead<I, C> {
    inner: Box<dyn Head<I>>,
    chain: C,
    tmp: Vec<I>,
    done: bool,
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
            crate::metrics::InstanceMetrics::add(&cx.metrics.records_in, self.tmp.len() as u64);
            crate::metrics::InstanceMetrics::add(&cx.metrics.batches_in, 1);
        }
        if !self.tmp.is_empty() {
            self.chain.begin_batch(self.tmp.len());
        }
        for x in self.tmp.drain(..) {
            match self.chain.push(x, buf) {
                Ok(()) => {}
                Err(Halt::Done) => {
                    self.done = true;
                    return Ok(Pull::End);
                }
                Err(e) => return Err(e),
            }
        }
        Ok(pull)
    }
}

/// Head of `sort_by`: gathers all input, then emits it sorted.
struct SortHead<T, F> {
    input: InputHead<T>,
    cmp: Arc<F>,
    items: Vec<T>,
    sorted: Option<std::vec::IntoIter<T>>,
}

impl<T: Send, F: Fn(&T, &T) -> std::cmp::Ordering + Send + Sync> Head<T> for SortHead<T, F> {
    fn counts_input(&self) -> bool {
        true
    }
    fn pull(&mut self, cx: &Cx, buf: &mut Vec<T>, flush_at: Option<u64>) -> Result<Pull, Halt> {
        if self.sorted.is_none() {
            let mut batch = Vec::new();
            loop {
                match self.input.pull(cx, &mut batch, flush_at)? {
                    Pull::Idle if batch.is_empty() => return Ok(Pull::Idle),
                    pull => {
                        if !batch.is_empty() {
                            crate::metrics::InstanceMetrics::add(
                                &cx.metrics.records_in,
                                batch.len() as u64,
                            );
                            crate::metrics::InstanceMetrics::add(&cx.metrics.batches_in, 1);
                        }
                        self.items.append(&mut batch);
                        if pull == Pull::End {
                            break;
                        }
                    }
                }
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
