//! Keyed streams and their aggregations (fold, count, reduce, windows), the [`Windowed`] stage,
//! and `sort_by`: the stages that hold state across batches.

use std::fmt;
use std::hash::Hash;
use std::marker::PhantomData;
use std::rc::Rc;
use std::sync::Arc;

use super::graph::{channel_tail, edge, input_head, partition_hash, Edge, MakeTail, TailFactory};
use super::heads::{CountTail, KeyedCodec, KeyedHead, RouteTail, SortCodec, SortHead};
use super::{Fresh, Out, Stream};
use crate::channel::Partition;
use crate::checkpoint::keyed::KeyGroups;
use crate::operator::{Chain, FlatMap, Identity, Map};
use crate::runtime::{Cx, Head, Tail};
use crate::window::combine::{CombineTail, WindowIn};
use crate::window::stage::{result_only, result_or_late, WindowCodec, WindowHead};
use crate::window::{Aggregate, EventTime, LateRecord, WindowOutput, WindowResult, WindowSpec};

impl<I: Send + 'static, C: Chain<I>> Stream<I, C> {
    /// Partitions records by key for a keyed aggregation. The key is computed once per record,
    /// on the producing side.
    ///
    /// # Examples
    ///
    /// ```
    /// let p = millrace::Pipeline::new();
    /// let out = p.source("w", vec!["a", "b", "a"]).key_by(|w| w.to_string()).count().collect();
    /// p.run().unwrap();
    /// let mut v = out.take();
    /// v.sort();
    /// assert_eq!(v, vec![("a".to_string(), 2), ("b".to_string(), 1)]);
    /// ```
    #[allow(clippy::type_complexity)]
    pub fn key_by<K, KF>(
        self,
        key: KF,
    ) -> KeyedStream<K, Out<I, C>, I, impl Chain<I, Out = (K, Out<I, C>)>>
    where
        K: Hash + Eq + Send + 'static,
        KF: Fn(&Out<I, C>) -> K + Send + Sync + 'static,
    {
        let name = self.default_name("key_by");
        let chain = Map::new(self.chain.clone(), move |x| (key(&x), x), Arc::clone(&name));
        KeyedStream {
            key_name: name,
            stream: self.with(chain),
            parallelism: 1,
            _kt: PhantomData,
        }
    }

    /// Gathers every record into one instance and, at end of input, emits them sorted by `cmp`.
    /// Holds all records in memory: use it on aggregated output, not raw input.
    ///
    /// # Examples
    ///
    /// ```
    /// let p = millrace::Pipeline::new();
    /// let out = p.source("n", vec![3u32, 1, 2]).sort_by(|a, b| a.cmp(b)).collect();
    /// p.run().unwrap();
    /// assert_eq!(out.take(), vec![1, 2, 3]);
    /// ```
    pub fn sort_by<F>(self, cmp: F) -> Fresh<Out<I, C>>
    where
        F: Fn(&Out<I, C>, &Out<I, C>) -> std::cmp::Ordering + Send + Sync + 'static,
    {
        self.sort_with(cmp, None)
    }

    /// [`sort_by`](Stream::sort_by) whose gathered records are checkpointed (they must be
    /// serde): a resumed run restores them instead of needing the whole input again.
    ///
    /// # Examples
    ///
    /// ```
    /// let p = millrace::Pipeline::new();
    /// let out = p.source("n", vec![3u32, 1, 2]).checkpointed_sort_by(|a, b| a.cmp(b)).collect();
    /// p.run().unwrap();
    /// assert_eq!(out.take(), vec![1, 2, 3]);
    /// ```
    pub fn checkpointed_sort_by<F>(self, cmp: F) -> Fresh<Out<I, C>>
    where
        F: Fn(&Out<I, C>, &Out<I, C>) -> std::cmp::Ordering + Send + Sync + 'static,
        Out<I, C>: serde::Serialize + serde::de::DeserializeOwned,
    {
        self.sort_with(cmp, Some(SortCodec::new()))
    }

    fn sort_with<F>(self, cmp: F, codec: Option<SortCodec<Out<I, C>>>) -> Fresh<Out<I, C>>
    where
        F: Fn(&Out<I, C>, &Out<I, C>) -> std::cmp::Ordering + Send + Sync + 'static,
    {
        let b = Rc::clone(&self.b);
        let name = self.default_name("sort");
        let edge = self.connect(Partition::Forward);
        let cmp = Arc::new(cmp);
        let mut head = input_head(vec![edge], move |_, input| {
            Box::new(SortHead::new(input, Arc::clone(&cmp), codec)) as Box<dyn Head<_>>
        });
        head.name = Some(name);
        head.shape = Some(crate::metrics::Shape::Aggregate);
        Stream::open(&b, head, 1)
    }

    /// Routes each record to one of two new streams: `Ok` to the first, `Err` to the second.
    /// Both must be consumed.
    fn route<L, R>(self, f: fn(Out<I, C>) -> Result<L, R>) -> (Fresh<L>, Fresh<R>)
    where
        L: Send + 'static,
        R: Send + 'static,
    {
        let b = Rc::clone(&self.b);
        let (p, name) = (self.parallelism, self.stage_name());
        let left = edge::<L>(Partition::Forward, name.clone(), p);
        let right = edge::<R>(Partition::Forward, name, p);
        let (l, r) = (Rc::clone(&left), Rc::clone(&right));
        let id = self.close(
            None,
            Box::new(move |_, i| {
                let (ml, mr) = (channel_tail(&l, i)?, channel_tail(&r, i)?);
                Ok(Box::new(move |cx: &Cx| Ok(RouteTail::new(ml(cx)?, mr(cx)?, f))) as MakeTail<_>)
            }),
        );
        left.borrow_mut().from_stage = id;
        right.borrow_mut().from_stage = id;
        (
            Stream::open(&b, input_head(vec![left], super::plain), 1),
            Stream::open(&b, input_head(vec![right], super::plain), 1),
        )
    }
}

/// Closes `stream`, the stage feeding a keyed stream, with a tail of its own: each instance's
/// tail is `wrap(cx, channel)` around its channel into a new edge partitioned by `partition`,
/// which is returned. The tail's type is concrete, so the stage's chain and its tail (a
/// combiner, say) are compiled into one loop: no dynamic call per record.
fn connect_tail<K, T, I, C, X, Tl, W>(
    stream: Stream<I, C>,
    partition: Partition<X>,
    wrap: W,
) -> Edge<X>
where
    I: Send + 'static,
    C: Chain<I, Out = (K, T)>,
    X: Send + 'static,
    Tl: Tail<(K, T)> + 'static,
    W: Fn(&Cx, crate::channel::ChannelTail<X>) -> Tl + Clone + Send + 'static,
{
    let out = edge(partition, stream.stage_name(), stream.parallelism);
    let tails: TailFactory<Tl> = {
        let out = Rc::clone(&out);
        Box::new(move |_, i| {
            let make = channel_tail(&out, i)?;
            let wrap = wrap.clone();
            Ok(Box::new(move |cx: &Cx| Ok(wrap(cx, make(cx)?))) as MakeTail<_>)
        })
    };
    let id = stream.close(None, tails);
    out.borrow_mut().from_stage = id;
    out
}

/// Records partitioned by key, ready for a per-key aggregation emitted at end of input.
#[must_use = "a keyed stream does nothing until it is aggregated"]
///
/// It carries the stage that computes the keys — a [`Stream`] whose chain ends in the
/// `key_by` step and emits `(key, record)` — so that the aggregation's side of that stage (a
/// combiner, a local count) is compiled into the same loop as its operators. To return one from
/// a function, write `KeyedStream<K, T, I, impl Chain<I, Out = (K, T)>>`.
pub struct KeyedStream<K, T, I, C> {
    /// The name of the `key_by` step (the last of `stream`'s chain).
    key_name: Arc<str>,
    /// The producing stage, open: closed by the aggregation.
    stream: Stream<I, C>,
    parallelism: usize,
    _kt: PhantomData<fn() -> (K, T)>,
}

/// A [`KeyedStream`] whose producing stage's type is erased ([`KeyedStream::boxed`]).
pub type BoxedKeyed<K, T> = KeyedStream<K, T, (K, T), Identity<(K, T)>>;

impl<K, T, I, C> fmt::Debug for KeyedStream<K, T, I, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedStream")
            .field("key_by", &self.key_name)
            .field("parallelism", &self.parallelism)
            .finish_non_exhaustive()
    }
}

impl<K, T, I, C> KeyedStream<K, T, I, C>
where
    K: Hash + Eq + Send + 'static,
    T: Send + 'static,
    I: Send + 'static,
    C: Chain<I, Out = (K, T)>,
{
    /// Renames the `key_by` step (part of the stage that computes the keys).
    ///
    /// # Examples
    ///
    /// ```
    /// let p = millrace::Pipeline::new();
    /// p.source("n", 0..4u32).key_by(|x| x % 2).name("parity").count().for_each(|_| {});
    /// assert_eq!(p.stage_names()[0], "n+parity");
    /// ```
    pub fn name(mut self, name: &str) -> Self {
        self.stream = self.stream.name(name);
        let mut names = Vec::new();
        self.stream.chain.names(&mut names);
        self.key_name = names.pop().expect("the chain ends in the key_by step");
        self
    }

    /// The same keyed stream with its producing stage's type erased, so that keyed streams
    /// built in different ways have one type (the two arms of an `if`, a value returned from
    /// a function: [`BoxedKeyed`]). The stage's operators run as before, in one stage; the
    /// cost is one move of each record through a batch between them and the aggregation's
    /// side of the stage, where an unerased stream compiles both into one loop.
    ///
    /// # Examples
    ///
    /// ```
    /// use millrace::{BoxedKeyed, Pipeline};
    /// // Known only at run time: whether to spread the keying over two threads.
    /// let spread = std::env::var_os("SPREAD").is_some();
    /// let p = Pipeline::new();
    /// let src = p.source("n", 0..100u32);
    /// let keyed: BoxedKeyed<u32, u32> = if spread {
    ///     src.rebalance(2).key_by(|x| x % 10).boxed()
    /// } else {
    ///     src.key_by(|x| x % 10).boxed()
    /// };
    /// let out = keyed.count().collect();
    /// p.run().unwrap();
    /// assert_eq!(out.take().len(), 10);
    /// ```
    pub fn boxed(self) -> BoxedKeyed<K, T> {
        KeyedStream {
            key_name: self.key_name,
            stream: self.stream.into_head(),
            parallelism: self.parallelism,
            _kt: PhantomData,
        }
    }

    /// Sets how many instances run the aggregation; each key is owned by exactly one.
    ///
    /// # Examples
    ///
    /// ```
    /// let p = millrace::Pipeline::new();
    /// let out = p.source("n", 0..100u32).key_by(|x| x % 10).parallelism(2).count().collect();
    /// p.run().unwrap();
    /// assert_eq!(out.take().len(), 10);
    /// ```
    pub fn parallelism(mut self, n: usize) -> Self {
        self.parallelism = n.max(1);
        self
    }

    /// Folds each key's records into an accumulator starting at `init`; emits `(key, acc)` per
    /// key at end of input.
    ///
    /// # Examples
    ///
    /// ```
    /// let p = millrace::Pipeline::new();
    /// let out = p.source("n", 1..=6u32).key_by(|x| x % 2).fold(0u32, |acc, x| *acc += x).collect();
    /// p.run().unwrap();
    /// let mut v = out.take();
    /// v.sort();
    /// assert_eq!(v, vec![(0, 12), (1, 9)]);
    /// ```
    pub fn fold<A, F>(self, init: A, f: F) -> Fresh<(K, A)>
    where
        A: Clone + Send + Sync + 'static,
        F: Fn(&mut A, T) + Send + Sync + 'static,
    {
        self.aggregate("fold", move || init.clone(), f, |a| a)
    }

    /// Counts the records of each key; emits `(key, count)` at end of input.
    ///
    /// # Examples
    ///
    /// ```
    /// let p = millrace::Pipeline::new();
    /// let out = p.source("n", vec![1u32, 1, 2]).key_by(|x| *x).count().collect();
    /// p.run().unwrap();
    /// let mut v = out.take();
    /// v.sort();
    /// assert_eq!(v, vec![(1, 2), (2, 1)]);
    /// ```
    pub fn count(self) -> Fresh<(K, u64)>
    where
        K: Clone,
    {
        self.count_with(None)
    }

    /// A keyed count whose producing stage counts locally (a [`CountTail`] at the end of each
    /// instance) and sends one `(key, n)` per key: the count stage adds them up.
    fn count_with(self, codec: Option<KeyedCodec<K, u64>>) -> Fresh<(K, u64)>
    where
        K: Clone,
    {
        let b = Rc::clone(&self.stream.b);
        let name = b.borrow_mut().default_name("count");
        let hash = Partition::Hash(Arc::new(|(k, _): &(K, u64)| partition_hash(k)));
        let edge = connect_tail(self.stream, hash, |cx, inner| {
            CountTail::<K, T>::new(cx, inner)
        });
        let groups = KeyGroups {
            hash: partition_hash::<K>,
            parallelism: self.parallelism,
        };
        let (init, fold, finish) = (
            Arc::new(|| 0u64),
            Arc::new(|n: &mut u64, m: u64| *n += m),
            Arc::new(|n: u64| n),
        );
        let mut head = input_head(vec![edge], move |_, input| {
            Box::new(
                KeyedHead::new(
                    input,
                    Arc::clone(&init),
                    Arc::clone(&fold),
                    Arc::clone(&finish),
                    "count",
                    groups,
                    codec,
                )
                .weighted(|n: &u64| *n),
            ) as Box<dyn Head<(K, u64)>>
        });
        head.name = Some(name);
        head.shape = Some(crate::metrics::Shape::Aggregate);
        Stream::open(&b, head, self.parallelism)
    }

    /// Combines each key's records pairwise with `f`; emits `(key, result)` at end of input.
    ///
    /// # Examples
    ///
    /// ```
    /// let p = millrace::Pipeline::new();
    /// let out = p.source("n", 1..=6u32).key_by(|x| x % 2).reduce(u32::max).collect();
    /// p.run().unwrap();
    /// let mut v = out.take();
    /// v.sort();
    /// assert_eq!(v, vec![(0, 6), (1, 5)]);
    /// ```
    pub fn reduce<F>(self, f: F) -> Fresh<(K, T)>
    where
        F: Fn(T, T) -> T + Send + Sync + 'static,
    {
        self.aggregate(
            "reduce",
            || None,
            move |acc: &mut Option<T>, x| {
                *acc = Some(match acc.take() {
                    None => x,
                    Some(prev) => f(prev, x),
                })
            },
            |v| v.expect("a key exists only once a record has set its value"),
        )
    }

    /// Makes the state of the aggregation that follows checkpointable: its `count`, `fold`,
    /// `reduce` and `window` require serde key and state types, and snapshot the state by key
    /// group at every checkpoint. (The aggregations of a plain keyed stream work with any
    /// types, and a pipeline with checkpoints holding one is refused, naming it.)
    ///
    /// # Examples
    ///
    /// ```
    /// let p = millrace::Pipeline::new();
    /// let out = p.source("w", vec!["a", "b", "a"])
    ///     .key_by(|w| w.to_string())
    ///     .checkpointed()
    ///     .count()
    ///     .collect();
    /// p.run().unwrap();
    /// let mut v = out.take();
    /// v.sort();
    /// assert_eq!(v, vec![("a".to_string(), 2), ("b".to_string(), 1)]);
    /// ```
    pub fn checkpointed(self) -> CheckpointedKeyed<K, T, I, C>
    where
        K: serde::Serialize + serde::de::DeserializeOwned,
    {
        CheckpointedKeyed { keyed: self }
    }

    /// A keyed aggregation of kind `kind`: each key's state starts at `init()`, every record is
    /// folded in with `fold`, and at end of input `finish` turns each state into the output.
    fn aggregate<A, O, N, F, G>(
        self,
        kind: &'static str,
        init: N,
        fold: F,
        finish: G,
    ) -> Fresh<(K, O)>
    where
        A: Send + 'static,
        O: Send + 'static,
        N: Fn() -> A + Send + Sync + 'static,
        F: Fn(&mut A, T) + Send + Sync + 'static,
        G: Fn(A) -> O + Send + Sync + 'static,
    {
        self.aggregate_with(kind, init, fold, finish, None)
    }

    fn aggregate_with<A, O, N, F, G>(
        self,
        kind: &'static str,
        init: N,
        fold: F,
        finish: G,
        codec: Option<KeyedCodec<K, A>>,
    ) -> Fresh<(K, O)>
    where
        A: Send + 'static,
        O: Send + 'static,
        N: Fn() -> A + Send + Sync + 'static,
        F: Fn(&mut A, T) + Send + Sync + 'static,
        G: Fn(A) -> O + Send + Sync + 'static,
    {
        let b = Rc::clone(&self.stream.b);
        let name = b.borrow_mut().default_name(kind);
        let (fold, init, finish) = (Arc::new(fold), Arc::new(init), Arc::new(finish));
        let hash = Partition::Hash(Arc::new(|(k, _): &(K, T)| partition_hash(k)));
        let edge = self.stream.connect(hash);
        let groups = KeyGroups {
            hash: partition_hash::<K>,
            parallelism: self.parallelism,
        };
        let mut head = input_head(vec![edge], move |_, input| {
            Box::new(KeyedHead::new(
                input,
                Arc::clone(&init),
                Arc::clone(&fold),
                Arc::clone(&finish),
                kind,
                groups,
                codec,
            )) as Box<dyn Head<(K, O)>>
        });
        head.name = Some(name);
        head.shape = Some(crate::metrics::Shape::Aggregate);
        Stream::open(&b, head, self.parallelism)
    }

    /// Windows each key's records by event time and aggregates every window with `agg`.
    ///
    /// The stage feeding the window generates watermarks from `spec`'s event time (one
    /// generator per instance, trailing the newest time it emitted by the spec's
    /// `max_out_of_orderness`); a window fires once the watermark reaches its end. See
    /// docs/semantics.md.
    ///
    /// # Examples
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
        self.window_with(spec, agg, None)
    }

    fn window_with<A, E>(
        self,
        spec: WindowSpec<E>,
        agg: A,
        codec: Option<WindowCodec<K, A::Acc>>,
    ) -> Windowed<K, T, A::Out>
    where
        K: Clone,
        A: Aggregate<T>,
        A::Out: 'static,
        E: EventTime<T>,
    {
        let groups = KeyGroups {
            hash: partition_hash::<K>,
            parallelism: self.parallelism,
        };
        let b = Rc::clone(&self.stream.b);
        let name = b.borrow_mut().default_name("window");
        let agg = Arc::new(agg);
        // Checkpointed windows are not combined: a combiner sends what it holds at each
        // barrier, and a float sum's grouping (so its rounding) would then depend on when
        // checkpoints happen (see src/window/combine.rs).
        let combine = codec.is_none();
        let hash = Partition::Hash(Arc::new(|x: &WindowIn<K, T, A::Acc>| {
            partition_hash(x.key())
        }));
        let edge = {
            let (agg, time) = (Arc::clone(&agg), spec.time.clone());
            let (assigner, bound) = (spec.assigner, spec.max_out_of_orderness);
            connect_tail(self.stream, hash, move |cx, inner| {
                let (time, agg) = (time.clone(), Arc::clone(&agg));
                let hash = partition_hash::<K>;
                CombineTail::new(cx, inner, time, agg, assigner, combine, hash, bound)
            })
        };
        let mut head = input_head(vec![edge], move |op: &Arc<str>, input| {
            Box::new(WindowHead::new(
                Arc::clone(op),
                input,
                &spec,
                Arc::clone(&agg),
                groups,
                codec,
            )) as Box<dyn Head<WindowOutput<K, T, A::Out>>>
        });
        head.name = Some(name);
        head.shape = Some(crate::metrics::Shape::Window);
        Windowed {
            stream: Stream::open(&b, head, self.parallelism),
        }
    }
}

/// A keyed stream whose aggregation is checkpointed: made by
/// [`KeyedStream::checkpointed`]. Its aggregations are those of [`KeyedStream`], with serde
/// key and state types.
#[must_use = "a keyed stream does nothing until it is aggregated"]
pub struct CheckpointedKeyed<K, T, I, C> {
    keyed: KeyedStream<K, T, I, C>,
}

impl<K, T, I, C> fmt::Debug for CheckpointedKeyed<K, T, I, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("CheckpointedKeyed")
            .field(&self.keyed)
            .finish()
    }
}

impl<K, T, I, C> CheckpointedKeyed<K, T, I, C>
where
    K: Hash + Eq + Send + serde::Serialize + serde::de::DeserializeOwned + 'static,
    T: Send + 'static,
    I: Send + 'static,
    C: Chain<I, Out = (K, T)>,
{
    /// As [`KeyedStream::name`].
    pub fn name(self, name: &str) -> Self {
        CheckpointedKeyed {
            keyed: self.keyed.name(name),
        }
    }

    /// As [`KeyedStream::parallelism`].
    pub fn parallelism(self, n: usize) -> Self {
        CheckpointedKeyed {
            keyed: self.keyed.parallelism(n),
        }
    }

    /// As [`KeyedStream::fold`], with a serde accumulator.
    ///
    /// # Examples
    ///
    /// ```
    /// let p = millrace::Pipeline::new();
    /// let out = p.source("n", 1..=6u32).key_by(|x| x % 2).checkpointed()
    ///     .fold(0u32, |acc, x| *acc += x).collect();
    /// p.run().unwrap();
    /// let mut v = out.take();
    /// v.sort();
    /// assert_eq!(v, vec![(0, 12), (1, 9)]);
    /// ```
    pub fn fold<A, F>(self, init: A, f: F) -> Fresh<(K, A)>
    where
        A: Clone + Send + Sync + serde::Serialize + serde::de::DeserializeOwned + 'static,
        F: Fn(&mut A, T) + Send + Sync + 'static,
    {
        self.keyed.aggregate_with(
            "fold",
            move || init.clone(),
            f,
            |a| a,
            Some(KeyedCodec::new()),
        )
    }

    /// As [`KeyedStream::window`], with a serde key and accumulator: every open window, its
    /// accumulator, the stage's watermark and the generator's state are checkpointed, and a
    /// resumed run gives the same results and late records as an uninterrupted one.
    ///
    /// # Examples
    ///
    /// ```
    /// use millrace::window::{Count, Tumbling, WindowSpec};
    /// let p = millrace::Pipeline::new();
    /// let spec = WindowSpec::new(Tumbling::new(10, 0).unwrap(), |t: &i64| millrace::Timestamp(*t));
    /// let out = p.source("t", vec![1i64, 2, 11])
    ///     .key_by(|_| "all".to_string())
    ///     .checkpointed()
    ///     .window(spec, Count)
    ///     .results()
    ///     .map(|r| r.value)
    ///     .collect();
    /// p.run().unwrap();
    /// assert_eq!(out.take(), vec![2, 1]);
    /// ```
    pub fn window<A, E>(self, spec: WindowSpec<E>, agg: A) -> Windowed<K, T, A::Out>
    where
        K: Clone,
        A: Aggregate<T>,
        A::Acc: serde::Serialize + serde::de::DeserializeOwned,
        A::Out: 'static,
        E: EventTime<T>,
    {
        self.keyed.window_with(spec, agg, Some(WindowCodec::new()))
    }

    /// As [`KeyedStream::count`].
    pub fn count(self) -> Fresh<(K, u64)>
    where
        K: Clone,
    {
        self.keyed.count_with(Some(KeyedCodec::new()))
    }

    /// As [`KeyedStream::reduce`], with serde records.
    pub fn reduce<F>(self, f: F) -> Fresh<(K, T)>
    where
        T: serde::Serialize + serde::de::DeserializeOwned,
        F: Fn(T, T) -> T + Send + Sync + 'static,
    {
        self.keyed.aggregate_with(
            "reduce",
            || None,
            move |acc: &mut Option<T>, x| {
                *acc = Some(match acc.take() {
                    None => x,
                    Some(prev) => f(prev, x),
                })
            },
            |v| v.expect("a key exists only once a record has set its value"),
            Some(KeyedCodec::new()),
        )
    }
}

/// Results of a window stage, with the late records still in the stream: call
/// [`results`](Windowed::results) to keep the results only (late records are then dropped and
/// counted in the stage's `late` metric) or [`with_late`](Windowed::with_late) to route the late
/// records to a stream of their own.
#[must_use = "a window does nothing until its results are consumed"]
pub struct Windowed<K, T, O> {
    stream: Fresh<WindowOutput<K, T, O>>,
}

impl<K, T, O> fmt::Debug for Windowed<K, T, O> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Windowed")
            .field("stage", &self.stream.head.name)
            .field("parallelism", &self.stream.parallelism)
            .finish()
    }
}

/// The function that keeps the results of a window's output.
type ResultOnly<K, T, O> = fn(WindowOutput<K, T, O>) -> Option<WindowResult<K, O>>;

impl<K, T, O> Windowed<K, T, O>
where
    K: Send + 'static,
    T: Send + 'static,
    O: Send + 'static,
{
    /// Renames the window stage (by default `window`).
    ///
    /// # Examples
    ///
    /// ```
    /// use millrace::window::{Count, Tumbling, WindowSpec};
    /// let p = millrace::Pipeline::new();
    /// let spec = WindowSpec::new(Tumbling::new(10, 0).unwrap(), |t: &i64| millrace::Timestamp(*t));
    /// p.source("t", vec![1i64, 2, 11]).key_by(|_| ()).window(spec, Count).name("per10").results().for_each(|_| {});
    /// assert!(p.to_dot().contains("per10"));
    /// ```
    pub fn name(mut self, name: &str) -> Self {
        self.stream = self.stream.name(name);
        self
    }

    /// The window results; late records are dropped (and counted in the window stage's
    /// `late` metric). What follows is fused into the window stage.
    ///
    /// See [`KeyedStream::window`] for an example.
    pub fn results(self) -> Fresh<WindowResult<K, O>> {
        let name = self.stream.default_name("results");
        let f: ResultOnly<K, T, O> = result_only;
        let chain = FlatMap::new(Identity::new(), f, name);
        self.stream.with(chain).into_head()
    }

    /// The window results and, as a second stream, the records too late for every window they
    /// belong to. Both streams must end in a sink.
    ///
    /// # Examples
    ///
    /// ```
    /// use millrace::window::{Count, Tumbling, WindowSpec};
    /// // A watermark after every record, so that 3 arrives after the watermark 25 closed [0, 10).
    /// let mut opts = millrace::Options::default();
    /// opts.watermark_every = 1;
    /// let p = millrace::Pipeline::with_options(opts);
    /// let spec = WindowSpec::new(Tumbling::new(10, 0).unwrap(), |t: &i64| millrace::Timestamp(*t));
    /// let (results, late) = p.source("t", vec![1i64, 25, 3]).key_by(|_| ()).window(spec, Count).with_late();
    /// let (results, late) = (results.collect(), late.map(|l| l.record).collect());
    /// p.run().unwrap();
    /// assert_eq!(late.take(), vec![3]);
    /// assert_eq!(results.take().len(), 2);
    /// ```
    #[allow(clippy::type_complexity)]
    pub fn with_late(self) -> (Fresh<WindowResult<K, O>>, Fresh<LateRecord<K, T>>) {
        self.stream.route(result_or_late)
    }

    /// Everything the window stage emits, results and late records in one stream.
    ///
    /// # Examples
    ///
    /// ```
    /// use millrace::window::{Count, Tumbling, WindowOutput, WindowSpec};
    /// let mut opts = millrace::Options::default();
    /// opts.watermark_every = 1;
    /// let p = millrace::Pipeline::with_options(opts);
    /// let spec = WindowSpec::new(Tumbling::new(10, 0).unwrap(), |t: &i64| millrace::Timestamp(*t));
    /// let out = p.source("t", vec![1i64, 25, 3]).key_by(|_| ()).window(spec, Count).outputs().collect();
    /// p.run().unwrap();
    /// let late = out.take().into_iter().filter(|o| matches!(o, WindowOutput::Late { .. })).count();
    /// assert_eq!(late, 1);
    /// ```
    pub fn outputs(self) -> Fresh<WindowOutput<K, T, O>> {
        self.stream
    }
}
