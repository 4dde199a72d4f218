//! [`Pipeline`]: the builder's entry point, its sources, and `run`.

use std::cell::RefCell;
use std::fmt::Write as _;
use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;

use super::graph::{Builder, HeadSpec};
use super::{build_and_run, Fresh, Stream};
use crate::error::Error;
use crate::metrics::RunReport;
use crate::operator::{Stripe, Stripes};
use crate::runtime::{CancelHandle, Head, Options, RunShared};
use crate::source::{
    parse_json, parse_text, ChannelSourceHead, Input, IterHead, LineHead, MAX_LINE_BYTES,
};

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
    pub(super) b: Rc<RefCell<Builder>>,
    shared: Arc<RunShared>,
}

impl Default for Pipeline {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("stages", &self.stage_names())
            .finish()
    }
}

impl Pipeline {
    /// A pipeline with default [`Options`].
    pub fn new() -> Self {
        Self::with_options(Options::default())
    }

    /// A pipeline with the given batch size, channel capacity and linger time.
    ///
    /// # Examples
    ///
    /// ```
    /// let mut opts = millrace::Options::default();
    /// opts.batch_size = 64;
    /// let p = millrace::Pipeline::with_options(opts);
    /// assert_eq!(p.options().batch_size, 64);
    /// ```
    pub fn with_options(opts: Options) -> Self {
        let opts = Options {
            // 0: sized per link by the record type.
            batch_size: opts.batch_size,
            channel_capacity: opts.channel_capacity.max(1),
            ..opts
        };
        let shared = RunShared::new(opts.clone());
        Pipeline {
            b: Rc::new(RefCell::new(Builder::new(opts))),
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

    /// Opens a one-instance source stage of kind `kind` (its default name) whose head `make`
    /// builds when the run starts, from the stage's final name (so that an error opening a file
    /// names the stage).
    pub(crate) fn source_stage<T: Send + 'static>(
        &self,
        kind: &str,
        make: impl FnOnce(&Arc<str>) -> Result<Box<dyn Head<T>>, Error> + 'static,
    ) -> Fresh<T> {
        // One part: `make` is called once.
        let mut make = Some(make);
        self.source_stage_parts(kind, 1, move |name, _, _| {
            (make.take().expect("a one-part source makes one head"))(name)
        })
    }

    /// A source stage of kind `kind` running `parts` instances (threads): instance `part` of
    /// `parts` pulls from the head `make(name, part, parts)` returns. Stateless operators chained
    /// on it run in every instance (the stream's parallelism is `parts`).
    pub(crate) fn source_stage_parts<T: Send + 'static>(
        &self,
        kind: &str,
        parts: usize,
        mut make: impl FnMut(&Arc<str>, usize, usize) -> Result<Box<dyn Head<T>>, Error> + 'static,
    ) -> Fresh<T> {
        self.source_stage_heads(kind, parts, move |name, n, _| {
            (0..n).map(|part| make(name, part, n)).collect()
        })
    }

    /// A source stage of `parts` instances whose heads `make` builds together, given the head's
    /// name, the instance count and whether the stage keeps order.
    fn source_stage_heads<T: Send + 'static>(
        &self,
        kind: &str,
        parts: usize,
        make: impl FnOnce(&Arc<str>, usize, bool) -> Result<Vec<Box<dyn Head<T>>>, Error> + 'static,
    ) -> Fresh<T> {
        let parts = parts.max(1);
        let name = self.b.borrow_mut().default_name(kind);
        let head = HeadSpec {
            name: Some(name),
            source: true,
            dead_letter: false,
            shape: Some(crate::metrics::Shape::Source),
            steps: Vec::new(),
            inputs: Vec::new(),
            order_input: None,
            input: None,
            make: Box::new(move |name, n, _, ordered| make(name, n, ordered)),
        };
        Stream::open(&self.b, head, parts)
    }

    /// A parallel source stage named `name`: `parts` instances, each on its own thread, where
    /// instance `part` pulls the records of `make(part, parts)`. The operators chained on it run
    /// in every instance, so `parts` is also their parallelism; a keyed stage after it routes
    /// every instance's records by key. Records of one part keep their order; parts interleave
    /// (see [`source_split`](Self::source_split) for input that must advance evenly).
    ///
    /// `make` runs when the run starts, once per part, on the thread that calls
    /// [`run`](Self::run).
    ///
    /// # Examples
    ///
    /// ```
    /// let p = millrace::Pipeline::new();
    /// // Part `i` of 4 yields the numbers below 1,000 that are `i` modulo 4.
    /// let sum = p
    ///     .parallel_source("numbers", 4, |part, parts| (part as u64..1_000).step_by(parts))
    ///     .map(|x| x * 2)
    ///     .collect();
    /// p.run().unwrap();
    /// assert_eq!(sum.take().iter().sum::<u64>(), 999 * 1_000);
    /// ```
    pub fn parallel_source<It, F>(&self, name: &str, parts: usize, make: F) -> Fresh<It::Item>
    where
        F: Fn(usize, usize) -> It + 'static,
        It: IntoIterator,
        It::IntoIter: Send + 'static,
        It::Item: Send + 'static,
    {
        self.source_stage_parts(name, parts, move |_, part, parts| {
            Ok(Box::new(IterHead::new(make(part, parts).into_iter())) as Box<dyn Head<_>>)
        })
    }

    /// A parallel source stage named `name` over a slice, a `Vec`, or anything that derefs to
    /// one, read by `parts` instances. The data is dealt in *stripes* of one batch
    /// ([`Options::batch_size`] records, 1,024 when it is 0), each part taking the next stripe
    /// no part has taken when it is ready for one. So the parts advance through the data
    /// together, however their threads are scheduled (a part that is slowed down takes fewer
    /// stripes) — event-time watermarks of the parts stay close together and a window stage
    /// after them keeps few windows open, which N contiguous ranges, or stripes dealt in
    /// turn, would not ensure. Each record is cloned out of the shared data where the first
    /// operator takes it, never copied up front or into a batch. With `parts = 1` it is the
    /// fastest way to feed a pipeline from a slice. With [`ordered`](Stream::ordered), stripe
    /// `k` goes to part `k % parts` instead, and the consumer reads the parts' batches in
    /// turn: the slice's order.
    ///
    /// The stream's head type is [`Stripe`] and its chain starts with [`Stripes`] (which hands
    /// a stripe's records on one by one); write `Stream<I, impl Chain<I, Out = T>>` to name it.
    ///
    /// # Examples
    ///
    /// ```
    /// let p = millrace::Pipeline::new();
    /// let data: Vec<u32> = (0..10_000).collect();
    /// let evens = p.source_split("data", data, 2).filter(|x| x % 2 == 0).collect();
    /// p.run().unwrap();
    /// let mut evens = evens.take();
    /// evens.sort_unstable();
    /// assert_eq!(evens, (0..10_000).step_by(2).collect::<Vec<u32>>());
    /// ```
    pub fn source_split<S, T>(
        &self,
        name: &str,
        data: S,
        parts: usize,
    ) -> Stream<Stripe<S>, Stripes<S, T>>
    where
        S: AsRef<[T]> + Send + Sync + 'static,
        T: Clone + Send + 'static,
    {
        let data = Arc::new(data);
        let mut s = self.source_stage_heads(name, parts, move |_, parts, ordered| {
            let deal = crate::source::Deal::new(parts, ordered);
            Ok((0..parts)
                .map(|part| {
                    Box::new(crate::source::StripeHead::new(
                        Arc::clone(&data),
                        deal.part(part),
                    )) as Box<dyn Head<Stripe<S>>>
                })
                .collect())
        });
        let pushed = Arc::new(crate::sync::AtomicU64::new(0));
        s.head.input = Some(Arc::clone(&pushed));
        s.with(Stripes::new(pushed))
    }

    /// A dead-letter stream named `name`: a handle to give to [`OnError::DeadLetter`] (clone it
    /// for several stages) and a source stage of the letters, which the caller ends in any
    /// sink. The stream ends once every stage that is not downstream of it has ended (see
    /// `src/dead_letter.rs`); a stage downstream of it may not send letters to it. If it fails
    /// (its sink cannot write), the run fails: letters are never dropped silently.
    ///
    /// # Examples
    ///
    /// ```
    /// use millrace::{DeadLetter, OnError, Pipeline};
    /// let p = Pipeline::new();
    /// let (dl, letters) = p.dead_letters("bad");
    /// let bad = letters.map(|l: DeadLetter| (l.stage, l.error, l.record)).collect();
    /// let good = p
    ///     .source("s", vec!["1".to_string(), "x".into()])
    ///     .try_map(|s: String| s.parse::<u32>())
    ///     .on_error(OnError::DeadLetter(dl))
    ///     .name("parse")
    ///     .collect();
    /// let report = p.run().unwrap();
    /// assert_eq!(good.take(), vec![1]);
    /// let bad = bad.take();
    /// assert_eq!(bad[0].0, "parse");
    /// assert_eq!(bad[0].2, Some(serde_json::json!("x")));
    /// report.check_accounting().unwrap();
    /// ```
    ///
    /// [`OnError::DeadLetter`]: crate::OnError::DeadLetter
    pub fn dead_letters(&self, name: &str) -> (crate::DeadLetters, Fresh<crate::DeadLetter>) {
        let name = self.b.borrow_mut().rename(None, name);
        let (handle, rx) = crate::DeadLetters::new(Arc::clone(&name), Arc::clone(&self.shared));
        self.b.borrow_mut().dead_letter_handles.insert(handle.id());
        let shared = Arc::clone(&self.shared);
        let head = HeadSpec {
            name: Some(name),
            source: true,
            dead_letter: true,
            shape: Some(crate::metrics::Shape::Source),
            steps: Vec::new(),
            inputs: Vec::new(),
            order_input: None,
            input: None,
            make: Box::new(move |_, _, _, _| {
                Ok(vec![Box::new(crate::dead_letter::DeadLetterHead::new(
                    rx,
                    shared.main_alive_rx.clone(),
                )) as Box<dyn Head<crate::DeadLetter>>])
            }),
        };
        (handle, Stream::open(&self.b, head, 1))
    }

    /// A source stage named `name` pulling records from any iterator, on one thread.
    ///
    /// # Examples
    ///
    /// ```
    /// let p = millrace::Pipeline::new();
    /// let out = p.source("words", vec!["a", "b"]).collect();
    /// p.run().unwrap();
    /// assert_eq!(out.take(), vec!["a", "b"]);
    /// ```
    pub fn source<It>(&self, name: &str, iter: It) -> Fresh<It::Item>
    where
        It: IntoIterator + Send + 'static,
        It::IntoIter: Send + 'static,
        It::Item: Send + 'static,
    {
        self.source_stage(name, move |_| Ok(Box::new(IterHead::new(iter.into_iter()))))
    }

    /// A source stage fed through a channel by code outside the pipeline (another thread, a
    /// callback). It flushes partial batches after the linger time even while the senders are
    /// silent, which an iterator that blocks in `next()` cannot do, and it ends when every
    /// sender has been dropped.
    ///
    /// # Examples
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
    ) -> Fresh<T> {
        self.source_stage(name, move |_| Ok(Box::new(ChannelSourceHead::new(rx))))
    }

    /// A source stage of kind `kind` reading the lines of `path` (none longer than `max_line`
    /// bytes) and parsing each with `parse`.
    pub(crate) fn line_source<T, P>(
        &self,
        kind: &str,
        path: &Path,
        max_line: usize,
        parse: P,
    ) -> Fresh<T>
    where
        T: Send + 'static,
        P: FnMut(&[u8], u64) -> crate::source::ParseResult<T> + Send + 'static,
    {
        self.line_source_with(kind, path, max_line, parse, crate::OnError::Fail)
    }

    /// [`line_source`](Self::line_source) with an error policy for lines that do not parse
    /// (their letters carry the line as `raw`, with the file and line number).
    pub(crate) fn line_source_with<T, P>(
        &self,
        kind: &str,
        path: &Path,
        max_line: usize,
        parse: P,
        on_error: crate::OnError,
    ) -> Fresh<T>
    where
        T: Send + 'static,
        P: FnMut(&[u8], u64) -> crate::source::ParseResult<T> + Send + 'static,
    {
        let path = path.to_path_buf();
        self.source_stage(kind, move |stage| {
            let input = Input::open(stage, &path)?.with_max_line(max_line);
            Ok(Box::new(
                LineHead::new(Arc::clone(stage), input, parse).with_policy(on_error),
            ))
        })
    }

    /// [`line_source_with`](Self::line_source_with) over `parts` readers of the regular file
    /// at `path`, each reading the lines that start in its part of the file (see
    /// `source::ranges`); the parts' records interleave.
    pub(crate) fn line_source_parts<T, P>(
        &self,
        kind: &str,
        path: &Path,
        max_line: usize,
        parse: P,
        on_error: crate::OnError,
        parts: usize,
    ) -> Fresh<T>
    where
        T: Send + 'static,
        P: FnMut(&[u8], u64) -> crate::source::ParseResult<T> + Clone + Send + 'static,
    {
        let path = path.to_path_buf();
        self.source_stage_parts(kind, parts, move |stage, part, parts| {
            let input = Input::part(stage, &path, max_line, part, parts)?;
            let head = LineHead::new(Arc::clone(stage), input, parse.clone());
            Ok(Box::new(head.with_policy(on_error.clone())) as Box<dyn Head<T>>)
        })
    }

    /// A source stage (`lines.read`) yielding the lines of a file (`-` for stdin), without line
    /// endings (`\n`, `\r\n`, or a `\r` ending the last line) and without a byte-order mark at
    /// the start of the file. Invalid UTF-8, or a line over 16 MiB, fails the run naming the
    /// file and line; a file truncated while read fails naming the file.
    ///
    /// # Examples
    ///
    /// ```
    /// let p = millrace::Pipeline::new();
    /// let first = p.read_lines("Cargo.toml").limit(1).collect();
    /// p.run().unwrap();
    /// assert_eq!(first.take(), vec!["[package]".to_string()]);
    /// ```
    pub fn read_lines(&self, path: impl AsRef<Path>) -> Fresh<String> {
        self.line_source("lines.read", path.as_ref(), MAX_LINE_BYTES, |l, _| {
            parse_text(l)
        })
    }

    /// A source stage (`ndjson.read`) parsing each line of a file (`-` for stdin) as one JSON
    /// value of type `T`. Blank lines are skipped; a malformed line (or one over 16 MiB) fails
    /// the run naming the file and line. Line endings and a byte-order mark are dropped as by
    /// [`read_lines`](Self::read_lines).
    ///
    /// # Examples
    ///
    /// ```
    /// # let dir = tempfile::tempdir().unwrap();
    /// # let path = dir.path().join("in.ndjson");
    /// std::fs::write(&path, "{\"n\":1}\n{\"n\":2}\n").unwrap();
    /// #[derive(serde::Deserialize)]
    /// struct Rec { n: u32 }
    /// let p = millrace::Pipeline::new();
    /// let ns = p.read_ndjson(&path).map(|r: Rec| r.n).collect();
    /// p.run().unwrap();
    /// assert_eq!(ns.take(), vec![1, 2]);
    /// ```
    pub fn read_ndjson<T>(&self, path: impl AsRef<Path>) -> Fresh<T>
    where
        T: serde::de::DeserializeOwned + Send + 'static,
    {
        self.line_source("ndjson.read", path.as_ref(), MAX_LINE_BYTES, |l, _| {
            parse_json::<T>(l)
        })
    }

    /// [`read_ndjson`](Self::read_ndjson) with an error policy for the lines that do not parse
    /// as a `T` (or are longer than `max_line_bytes`): `Skip` drops and counts them,
    /// `DeadLetter` sends each, as `raw` text with the file and line, to a dead-letter stream.
    /// The source's account counts them (`skipped`, `dead_lettered`).
    ///
    /// # Examples
    ///
    /// ```
    /// # let dir = tempfile::tempdir().unwrap();
    /// # let path = dir.path().join("in.ndjson");
    /// std::fs::write(&path, "{\"n\":1}\n{\"n\":\n{\"n\":3}\n").unwrap();
    /// #[derive(serde::Deserialize)]
    /// struct Rec { n: u32 }
    /// let p = millrace::Pipeline::new();
    /// let (dl, letters) = p.dead_letters("bad");
    /// let bad = letters.map(|l: millrace::DeadLetter| (l.line, l.raw)).collect();
    /// let ns = p
    ///     .read_ndjson_with(&path, 1 << 20, millrace::OnError::DeadLetter(dl))
    ///     .map(|r: Rec| r.n)
    ///     .collect();
    /// let report = p.run().unwrap();
    /// assert_eq!(ns.take(), vec![1, 3]);
    /// assert_eq!(bad.take(), vec![(Some(2), Some("{\"n\":".to_string()))]);
    /// assert_eq!(report.account("ndjson.read").unwrap().dead_lettered, 1);
    /// report.check_accounting().unwrap();
    /// ```
    pub fn read_ndjson_with<T>(
        &self,
        path: impl AsRef<Path>,
        max_line_bytes: usize,
        on_error: crate::OnError,
    ) -> Fresh<T>
    where
        T: serde::de::DeserializeOwned + Send + 'static,
    {
        self.line_source_with(
            "ndjson.read",
            path.as_ref(),
            max_line_bytes.max(1),
            |l, _| parse_json::<T>(l),
            on_error,
        )
    }

    /// [`read_lines`](Self::read_lines) with a line cap and an error policy for the lines that
    /// are not UTF-8 or longer than `max_line_bytes` (see [`read_ndjson_with`](Self::read_ndjson_with)).
    ///
    /// # Examples
    ///
    /// ```
    /// # let dir = tempfile::tempdir().unwrap();
    /// # let path = dir.path().join("in.txt");
    /// std::fs::write(&path, b"ok\nbad \xff\nfine\n").unwrap();
    /// let p = millrace::Pipeline::new();
    /// let lines = p.read_lines_with(&path, 1 << 20, millrace::OnError::Skip).collect();
    /// let report = p.run().unwrap();
    /// assert_eq!(lines.take(), vec!["ok", "fine"]);
    /// assert_eq!(report.account("lines.read").unwrap().skipped, 1);
    /// ```
    pub fn read_lines_with(
        &self,
        path: impl AsRef<Path>,
        max_line_bytes: usize,
        on_error: crate::OnError,
    ) -> Fresh<String> {
        self.line_source_with(
            "lines.read",
            path.as_ref(),
            max_line_bytes.max(1),
            |l, _| parse_text(l),
            on_error,
        )
    }

    /// The stage graph as Graphviz DOT.
    ///
    /// # Examples
    ///
    /// ```
    /// let p = millrace::Pipeline::new();
    /// p.source("n", 0..3).rebalance(2).map(|x| x + 1).for_each(|_| {});
    /// assert!(p.to_dot().contains("s0 -> s1"));
    /// ```
    pub fn to_dot(&self) -> String {
        let b = self.b.borrow();
        let mut s = String::from("digraph pipeline {\n  rankdir=LR;\n  node [shape=box];\n");
        for (i, st) in b.stages.iter().enumerate() {
            let label = if st.parallelism > 1 {
                format!("{} ×{}", st.name(), st.parallelism)
            } else {
                st.name()
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
    /// # Examples
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

    /// Turns checkpoints on: every `opts.interval` the sources record their positions and send
    /// a barrier through the pipeline; each stage instance snapshots its state when the barrier
    /// reaches it (aligned over its inputs in exactly-once mode), and a checkpoint is complete
    /// once every instance's state is durable in `opts.dir`. A run with
    /// [`Start::Resume`](crate::checkpoint::Start::Resume) restores every stage from the newest
    /// checkpoint that verifies. The run refuses to start if a step cannot be checkpointed (an
    /// iterator source cannot be replayed), naming it.
    ///
    /// # Examples
    ///
    /// ```
    /// use millrace::checkpoint::CheckpointOptions;
    /// # let dir = tempfile::tempdir().unwrap();
    /// let mut opts = CheckpointOptions::new(dir.path().join("checkpoints"));
    /// opts.interval = std::time::Duration::from_millis(200);
    /// opts.max_parallelism = 2; // the number of key groups: no stage may be wider
    /// let p = millrace::Pipeline::new();
    /// p.checkpoints(opts);
    /// p.read_lines("Cargo.toml").rebalance(4).map(|l| l.len()).name("wide").for_each(|_| {});
    /// // Refused before anything runs, naming the stage.
    /// let err = p.run().unwrap_err();
    /// assert!(matches!(err, millrace::Error::CheckpointUnsupported { .. }), "{err}");
    /// assert_eq!(err.stage(), Some("wide"));
    /// ```
    pub fn checkpoints(&self, opts: crate::checkpoint::CheckpointOptions) -> &Self {
        *self.shared.checkpoint_opts.lock() = Some(opts);
        self
    }

    /// Sets the checkpoint fingerprint of stage `name` (its kind and parameters): a resume
    /// whose stateful stage of this name has another fingerprint is refused. Called by the
    /// TOML layer.
    #[doc(hidden)]
    pub fn set_stage_fingerprint(&self, name: &str, fingerprint: &str) {
        self.b
            .borrow_mut()
            .fingerprints
            .insert(name.to_string(), fingerprint.to_string());
    }

    /// Names of the stages registered so far, in the order they run.
    ///
    /// # Examples
    ///
    /// ```
    /// let p = millrace::Pipeline::new();
    /// p.source("n", 0..3).map(|x| x + 1).name("inc").new_stage().for_each(|_| {}).name("out");
    /// assert_eq!(p.stage_names(), vec!["n+inc", "out"]);
    /// ```
    pub fn stage_names(&self) -> Vec<String> {
        self.b.borrow().stages.iter().map(|s| s.name()).collect()
    }

    /// Runs the pipeline to completion on one thread per stage instance and returns its report,
    /// or the first error. Every thread has been joined when this returns.
    pub fn run(self) -> Result<RunReport, Error> {
        let b = std::mem::take(&mut *self.b.borrow_mut());
        build_and_run(b, Arc::clone(&self.shared))
    }
}

impl Pipeline {
    /// A source stage named `name` yielding the lines of any reader (a socket, a decompressor,
    /// a test's fault-injecting reader), without line endings, on one thread. Errors name the
    /// stage and show the input as `<reader>`: a read error is an [`Error::Io`]
    /// (``stage `name`: <reader>: ...``), invalid UTF-8 an [`Error::Record`] with its line
    /// (``<reader>:3``). The reader is read in large blocks and is never polled: a reader that
    /// blocks holds back a partly filled batch (use [`source_channel`](Pipeline::source_channel)
    /// for a trickle).
    ///
    /// # Examples
    ///
    /// ```
    /// let p = millrace::Pipeline::new();
    /// let out = p.read_lines_from("text", std::io::Cursor::new("a\nb\r\nc")).collect();
    /// p.run().unwrap();
    /// assert_eq!(out.take(), vec!["a", "b", "c"]);
    /// ```
    pub fn read_lines_from(
        &self,
        name: &str,
        reader: impl std::io::Read + Send + 'static,
    ) -> Fresh<String> {
        let reader: Box<dyn std::io::Read + Send> = Box::new(reader);
        self.source_stage(name, move |stage| {
            let input = Input {
                reader,
                #[cfg(unix)]
                poll_fd: None,
                path: "<reader>".to_string(),
                max_line: crate::source::MAX_LINE_BYTES,
                replay: crate::source::Replay::No(crate::source::READER),
                origin: None,
            };
            Ok(Box::new(LineHead::new(Arc::clone(stage), input, |l, _| {
                parse_text(l)
            })))
        })
    }
}
