//! Event time in the runtime: the window stage's head that drives a [`WindowState`], and the
//! typed API around them ([`WindowSpec`]; the builder type [`Windowed`](crate::Windowed) lives with the other streams).
//!
//! Checkpoints: the generator snapshots the newest event time it saw, the last watermark it
//! sent and its count towards the next one (part `tail.watermark` of the feeding stage), so a
//! resumed run sends the same watermarks after the same records; the window head snapshots
//! every open window of every key with its accumulator, by key group, and the stage's
//! watermark and counters (parts `head`, `head.meta`) — only when built with
//! `.key_by(..).checkpointed().window(..)`, whose key and accumulator types are serde.
//!
//! Watermarks travel as channel messages after the records they follow. A stage combines the
//! watermarks of all its input slots (one per upstream instance) and forwards their minimum;
//! end of input counts as +∞, so the last window always fires.

use std::time::Duration;

use super::combine::WindowIn;
use super::operator::{KeyWindows, WindowMeta};
use super::{Aggregate, Assigner, WindowOutput, WindowResult, WindowState};
use crate::channel::InputHead;
use crate::checkpoint::keyed::{
    check_groups, key_groups_of, keyed_part_owned, record_key_groups, KeyGroups,
};
use crate::checkpoint::state::{InstanceState, KeyedPart};
use crate::checkpoint::StateSupport;
use crate::error::Error;
use crate::metrics::InstanceMetrics;
use crate::operator::Halt;
use crate::runtime::{Cx, Head, Pull};
use crate::time::Timestamp;

/// How a window stage reads a record's event time.
///
/// Any `Fn(&T) -> Timestamp` is one; a fallible implementation (the TOML layer's, which reads
/// a JSON field) returns a [`TimeError`] for a record without a usable time, its reason
/// showing the record, and the stage's [`OnError`] policy decides what happens to it.
pub trait EventTime<T>: Clone + Send + Sync + 'static {
    /// The record's event time.
    fn time(&self, record: &T) -> Result<Timestamp, TimeError>;
    /// The record as JSON, for the letter of an [`OnError::DeadLetter`] policy (default
    /// `None`: the letter's `record` is null).
    fn record_json(&self, _record: &T) -> Option<serde_json::Value> {
        None
    }
}

/// Why a record's event time could not be read: the reason, shown to the user as it is (a
/// failing window stage adds the record's position).
///
/// ```
/// let e = millrace::window::TimeError::new("no time field `t`");
/// assert_eq!(e.to_string(), "no time field `t`");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimeError {
    reason: String,
}

impl TimeError {
    /// A time error with this reason.
    pub fn new(reason: impl Into<String>) -> Self {
        TimeError {
            reason: reason.into(),
        }
    }

    /// The reason.
    pub fn reason(&self) -> &str {
        &self.reason
    }
}

impl std::fmt::Display for TimeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.reason)
    }
}

impl std::error::Error for TimeError {}

impl<T, F> EventTime<T> for F
where
    F: Fn(&T) -> Timestamp + Clone + Send + Sync + 'static,
{
    #[inline]
    fn time(&self, record: &T) -> Result<Timestamp, TimeError> {
        Ok(self(record))
    }
}

/// What a window stage does with a record whose event time cannot be read: the crate's
/// [`OnError`](crate::OnError), re-exported here for code written against `window::OnError`.
pub use crate::dead_letter::OnError;

/// How a keyed stream is windowed: the assigner, where the event time comes from, how much
/// disorder the watermark allows, and how long fired windows accept late records.
///
/// ```
/// use std::time::Duration;
/// use millrace::window::{Tumbling, WindowSpec};
/// use millrace::Timestamp;
/// let spec = WindowSpec::new(Tumbling::new(10_000, 0).unwrap(), |e: &(u32, i64)| Timestamp(e.1))
///     .max_out_of_orderness(Duration::from_secs(2))
///     .allowed_lateness(Duration::from_secs(5));
/// # let _ = spec;
/// ```
#[derive(Clone)]
pub struct WindowSpec<E> {
    pub(crate) assigner: Assigner,
    pub(crate) time: E,
    pub(crate) max_out_of_orderness: i64,
    pub(crate) allowed_lateness: i64,
    pub(crate) on_error: OnError,
    /// Set by a reloadable build: the parameters that can change while the window runs.
    pub(crate) live: Option<std::sync::Arc<crate::versioned::Versioned<WindowLive>>>,
}

impl<E> std::fmt::Debug for WindowSpec<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WindowSpec")
            .field("assigner", &self.assigner)
            .field("max_out_of_orderness", &self.max_out_of_orderness)
            .field("allowed_lateness", &self.allowed_lateness)
            .field("on_error", &self.on_error)
            .finish_non_exhaustive()
    }
}

/// The parameters of a window stage that a reload can change without touching its state.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct WindowLive {
    /// Allowed lateness, ms.
    pub allowed_lateness: i64,
    /// What to do with records whose time cannot be read.
    pub on_error: OnError,
}

impl<E> WindowSpec<E> {
    /// Windows from `assigner` over event times read by `time`; no disorder allowed, no
    /// lateness, failing on unreadable times until configured otherwise.
    pub fn new(assigner: impl Into<Assigner>, time: E) -> Self {
        WindowSpec {
            assigner: assigner.into(),
            time,
            max_out_of_orderness: 0,
            allowed_lateness: 0,
            on_error: OnError::Fail,
            live: None,
        }
    }

    /// The watermark trails the newest event time seen by each producing instance by this much:
    /// records at most this much older than the newest are on time.
    pub fn max_out_of_orderness(mut self, d: Duration) -> Self {
        self.max_out_of_orderness = duration_ms(d);
        self
    }

    /// A fired window keeps its state this long (in event time) and re-emits an updated result
    /// for each late record; later records go to the late output.
    pub fn allowed_lateness(mut self, d: Duration) -> Self {
        self.allowed_lateness = duration_ms(d);
        self
    }

    /// What to do with a record whose time cannot be read.
    pub fn on_error(mut self, policy: OnError) -> Self {
        self.on_error = policy;
        self
    }
}

fn duration_ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl From<super::Tumbling> for Assigner {
    fn from(a: super::Tumbling) -> Self {
        Assigner::Tumbling(a)
    }
}
impl From<super::Sliding> for Assigner {
    fn from(a: super::Sliding) -> Self {
        Assigner::Sliding(a)
    }
}
impl From<super::Session> for Assigner {
    fn from(a: super::Session) -> Self {
        Assigner::Session(a)
    }
}

/// A record too late for every window it belongs to, as the late output carries it.
#[derive(Debug, Clone, PartialEq)]
pub struct LateRecord<K, T> {
    /// Its key.
    pub key: K,
    /// Its event time.
    pub time: Timestamp,
    /// The record.
    pub record: T,
}

/// The head of a window stage: reads `(key, record)` batches and watermarks from its input,
/// drives the [`WindowState`], and yields results and late records.
pub(crate) struct WindowHead<K, T, A: Aggregate<T>, E> {
    /// The window operator's own name (errors name it, not the fused stage).
    pub name: std::sync::Arc<str>,
    pub input: InputHead<WindowIn<K, T, A::Acc>>,
    pub state: WindowState<K, T, A>,
    pub time: E,
    pub on_error: OnError,
    pub tmp: Vec<WindowIn<K, T, A::Acc>>,
    /// A reloadable window's changeable parameters, and the version applied.
    pub live: Option<(std::sync::Arc<crate::versioned::Versioned<WindowLive>>, u64)>,
    /// Records received by this instance (the position reported for a bad record).
    pub seen: u64,
    pub skipped: u64,
    pub dead_lettered: u64,
    pub done: bool,
    /// The key groups of the stage (its router's hash and parallelism).
    pub groups: KeyGroups<K>,
    /// How the state is encoded: set by `.checkpointed().window(..)`.
    pub codec: Option<WindowCodec<K, A::Acc>>,
}

/// A window head's counters and its state's watermark (part `head.meta`).
#[derive(serde::Serialize, serde::Deserialize)]
pub(crate) struct WindowHeadMeta {
    window: WindowMeta,
    seen: u64,
    skipped: u64,
    dead_lettered: u64,
}

/// A window stage's keyed state, by key group.
pub(crate) type WindowPart<K, Acc> = KeyedPart<K, KeyWindows<Acc>>;

/// How a window head encodes its state: fn pointers set by the checkpointed API, whose key and
/// accumulator types are serde (the head itself needs no serde bounds).
#[allow(clippy::type_complexity)]
pub(crate) struct WindowCodec<K, Acc> {
    put: fn(&mut InstanceState, &WindowPart<K, Acc>, &WindowHeadMeta) -> Result<(), Error>,
    #[allow(clippy::type_complexity)]
    get: fn(&InstanceState) -> Result<Option<(WindowPart<K, Acc>, WindowHeadMeta)>, Error>,
}

impl<K, Acc> Clone for WindowCodec<K, Acc> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<K, Acc> Copy for WindowCodec<K, Acc> {}

fn put_window<K: serde::Serialize, Acc: serde::Serialize>(
    s: &mut InstanceState,
    part: &WindowPart<K, Acc>,
    meta: &WindowHeadMeta,
) -> Result<(), Error> {
    s.put("head", part)?;
    s.put("head.meta", meta)
}

#[allow(clippy::type_complexity)]
fn get_window<K: serde::de::DeserializeOwned, Acc: serde::de::DeserializeOwned>(
    s: &InstanceState,
) -> Result<Option<(WindowPart<K, Acc>, WindowHeadMeta)>, Error> {
    match (s.get("head")?, s.get("head.meta")?) {
        (Some(p), Some(m)) => Ok(Some((p, m))),
        _ => Ok(None),
    }
}

impl<K, Acc> WindowCodec<K, Acc>
where
    K: serde::Serialize + serde::de::DeserializeOwned,
    Acc: serde::Serialize + serde::de::DeserializeOwned,
{
    pub(crate) fn new() -> Self {
        WindowCodec {
            put: put_window::<K, Acc>,
            get: get_window::<K, Acc>,
        }
    }
}

impl<K, T, A, E> WindowHead<K, T, A, E>
where
    K: std::hash::Hash + Eq + Clone,
    A: Aggregate<T>,
{
    pub(crate) fn new(
        name: std::sync::Arc<str>,
        input: InputHead<WindowIn<K, T, A::Acc>>,
        spec: &WindowSpec<E>,
        agg: A,
        groups: KeyGroups<K>,
        codec: Option<WindowCodec<K, A::Acc>>,
    ) -> Self
    where
        E: Clone,
    {
        WindowHead {
            name,
            input,
            state: WindowState::new(spec.assigner, agg, spec.allowed_lateness),
            time: spec.time.clone(),
            on_error: spec.on_error.clone(),
            dead_lettered: 0,
            tmp: Vec::new(),
            live: spec.live.as_ref().map(|l| (std::sync::Arc::clone(l), 0)),
            seen: 0,
            skipped: 0,
            done: false,
            groups,
            codec,
        }
    }
}

impl<K, T, A, E> Head<WindowOutput<K, T, A::Out>> for WindowHead<K, T, A, E>
where
    K: std::hash::Hash + Eq + Clone + Send,
    T: Send,
    A: Aggregate<T> + Send,
    A::Acc: Send,
    A::Out: Send,
    E: EventTime<T>,
{
    fn counts_input(&self) -> bool {
        true
    }

    fn pull(
        &mut self,
        cx: &Cx,
        buf: &mut Vec<WindowOutput<K, T, A::Out>>,
        flush_at: Option<u64>,
    ) -> Result<Pull, Halt> {
        if self.done {
            return Ok(Pull::End);
        }
        let pull = self.input.pull(cx, &mut self.tmp, flush_at)?;
        if !self.tmp.is_empty() {
            InstanceMetrics::add(&cx.metrics.records_in, self.tmp.len() as u64);
            InstanceMetrics::add(&cx.metrics.batches_in, 1);
            // A reloadable window applies its changeable parameters once per batch.
            if let Some((live, applied)) = &mut self.live {
                let (version, p) = live.load();
                if version != *applied {
                    *applied = version;
                    self.state.set_lateness(p.allowed_lateness);
                    self.on_error = p.on_error.clone();
                }
                live.count(version, self.tmp.len() as u64);
            }
        }
        let mut partials_in = 0u64;
        for item in self.tmp.drain(..) {
            let (k, x) = match item {
                WindowIn::Record(k, x) => (k, x),
                WindowIn::Partial {
                    key,
                    window,
                    acc,
                    records,
                } => {
                    // The channel counted one record for the partial: it stands for `records`.
                    partials_in += u64::from(records) - 1;
                    self.seen += u64::from(records);
                    self.state.on_partial(key, window, acc, records, buf);
                    continue;
                }
            };
            self.seen += 1;
            match self.time.time(&x) {
                Ok(t) => self.state.on_record(k, t, x, buf),
                Err(reason) => {
                    let (seen, instance) = (self.seen, cx.instance);
                    let time = &self.time;
                    let r = self.on_error.reject(
                        &self.name,
                        reason.to_string(),
                        || {
                            crate::dead_letter::Bad::Record(
                                time.record_json(&x).unwrap_or(serde_json::Value::Null),
                            )
                        },
                        None,
                        None,
                        |m| Error::Operator {
                            stage: self.name.to_string(),
                            source: format!("input record {seen} of instance {instance}: {m}")
                                .into(),
                        },
                    )?;
                    match r {
                        crate::dead_letter::Rejected::Skipped => self.skipped += 1,
                        crate::dead_letter::Rejected::DeadLettered => self.dead_lettered += 1,
                    }
                }
            }
        }
        if partials_in > 0 {
            InstanceMetrics::add(&cx.metrics.records_in, partials_in);
        }
        let pull = match pull {
            Pull::Watermark(wm) => {
                self.state.on_watermark(wm, buf);
                Pull::Watermark(wm)
            }
            Pull::End => {
                self.state.on_watermark(Timestamp::MAX, buf);
                self.done = true;
                Pull::End
            }
            other => other,
        };
        let m = &cx.metrics;
        m.late.store(
            self.state.late_records(),
            std::sync::atomic::Ordering::Relaxed,
        );
        m.skipped
            .store(self.skipped, std::sync::atomic::Ordering::Relaxed);
        m.dead_lettered
            .store(self.dead_lettered, std::sync::atomic::Ordering::Relaxed);
        m.open_windows.store(
            self.state.live_windows() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        Ok(pull)
    }

    fn state_support(&self) -> StateSupport {
        match self.codec {
            Some(_) => StateSupport::Snapshots,
            None => StateSupport::Unsupported(
                "it keeps keyed window state that is not serde: build it with \
                 `.key_by(..).checkpointed().window(..)`, whose key and accumulator types are \
                 Serialize + DeserializeOwned"
                    .into(),
            ),
        }
    }

    fn snapshot(&mut self, cx: &Cx, state: &mut InstanceState) -> Result<(), Halt> {
        let codec = self.codec.ok_or_else(|| self.unsupported(cx))?;
        let (entries, window) = self.state.export();
        let groups = key_groups_of(cx, self.groups.parallelism);
        let part = keyed_part_owned(entries, self.groups.hash, groups);
        let meta = WindowHeadMeta {
            window,
            seen: self.seen,
            skipped: self.skipped,
            dead_lettered: self.dead_lettered,
        };
        (codec.put)(state, &part, &meta)?;
        record_key_groups(cx, state, self.groups.parallelism);
        Ok(())
    }

    fn restore(&mut self, cx: &Cx, state: &InstanceState) -> Result<(), Halt> {
        let codec = self.codec.ok_or_else(|| self.unsupported(cx))?;
        let Some((part, meta)) = (codec.get)(state)? else {
            return Ok(());
        };
        check_groups(cx, &part, self.groups.parallelism)?;
        self.state
            .import(part.groups.into_iter().flat_map(|(_, e)| e), meta.window);
        self.seen = meta.seen;
        self.skipped = meta.skipped;
        self.dead_lettered = meta.dead_lettered;
        Ok(())
    }
}

impl<K, T, A: Aggregate<T>, E> WindowHead<K, T, A, E> {
    fn unsupported(&self, cx: &Cx) -> Halt {
        Halt::Failed(Error::CheckpointUnsupported {
            stage: cx.stage.to_string(),
            reason: "its keyed window state is not serde".into(),
        })
    }
}

/// Keeps the result of a window output, dropping late records.
pub(crate) fn result_only<K, T, O>(o: WindowOutput<K, T, O>) -> Option<WindowResult<K, O>> {
    match o {
        WindowOutput::Result(r) => Some(r),
        WindowOutput::Late { .. } => None,
    }
}

/// Splits a window output into a result or a late record.
pub(crate) fn result_or_late<K, T, O>(
    o: WindowOutput<K, T, O>,
) -> Result<WindowResult<K, O>, LateRecord<K, T>> {
    match o {
        WindowOutput::Result(r) => Ok(r),
        WindowOutput::Late { key, time, record } => Err(LateRecord { key, time, record }),
    }
}
