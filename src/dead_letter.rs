//! Error policies for bad records ([`OnError`]) and the dead-letter output they may route them
//! to ([`DeadLetter`], [`DeadLetters`]), with the limit on how many a run may divert
//! ([`DeadLetterLimit`]).
//!
//! # Design note: when does a dead-letter source end?
//!
//! A dead-letter stream is an ordinary source stage fed by a bounded channel of letters. It
//! cannot end when every sender is dropped, as [`Pipeline::source_channel`] does: the senders
//! are [`DeadLetters`] handles, which user code clones into closures that live as long as the
//! pipeline value (and the TOML layer keeps one per policy), so "all senders gone" may never
//! happen, or happen only after `run` waits for the source — a hang.
//!
//! Instead the run hands out *tokens*: every worker thread that is **not** on the dead-letter
//! side of the graph (the dead-letter source and the stages downstream of it) holds a clone of
//! a `Sender<()>` for its whole life, and the run's own copy is dropped once every worker is
//! spawned. Nobody sends on it; the dead-letter head selects on its letter channel, on the
//! token channel and on the run's cancel channel. When the token channel disconnects, every
//! thread that could send a letter has ended — and each letter it sent was in the channel
//! before its token was dropped — so the head drains what is left with `try_recv` and ends.
//! A send blocks under backpressure (the channel is bounded), but selects on cancel, so a
//! failed or cancelled run never hangs on it. A dead-letter stage that fails fails the run, and
//! its senders then see cancel: letters are never dropped silently. A letter sent after the
//! dead-letter source ended (only possible from a stage on the dead-letter side, which the TOML
//! layer refuses) fails the run.

use std::sync::Arc;

use crossbeam_channel::{bounded, select, Receiver, Sender, TryRecvError};
use serde_json::{Map, Value};

use crate::error::Error;
use crate::operator::Halt;
use crate::runtime::{Cx, Head, Pull, RunShared};
use crate::sync::Ordering;

/// Letters a dead-letter channel holds before senders block.
pub(crate) const CAPACITY: usize = 1024;

/// What a stage does with a record it cannot process (malformed, a missing or mistyped field,
/// an error returned by an operator).
#[derive(Debug, Clone, Default)]
pub enum OnError {
    /// Fail the run, naming the stage and the record (the default).
    #[default]
    Fail,
    /// Drop the record and count it in the stage's `skipped` count.
    Skip,
    /// Send the record, with its error, to a dead-letter stream (see [`Pipeline::dead_letters`])
    /// and count it in the stage's `dead_lettered` count.
    ///
    /// [`Pipeline::dead_letters`]: crate::Pipeline::dead_letters
    DeadLetter(DeadLetters),
}

impl PartialEq for OnError {
    fn eq(&self, other: &Self) -> bool {
        matches!(
            (self, other),
            (OnError::Fail, OnError::Fail) | (OnError::Skip, OnError::Skip)
        ) || matches!((self, other), (OnError::DeadLetter(a), OnError::DeadLetter(b)) if Arc::ptr_eq(&a.inner, &b.inner))
    }
}

/// What an error policy did with a bad record that it did not fail on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rejected {
    /// Dropped and counted.
    Skipped,
    /// Sent to the dead-letter stream.
    DeadLettered,
}

/// The bad part of a bad record, as a letter shows it.
pub(crate) enum Bad {
    /// The record, as JSON.
    Record(Value),
    /// Text that could not be parsed into a record (lossily decoded).
    Raw(String),
}

impl OnError {
    /// Whether the policy is [`OnError::DeadLetter`].
    pub fn is_dead_letter(&self) -> bool {
        matches!(self, OnError::DeadLetter(_))
    }

    /// Applies the policy to a bad record of stage `stage`: `fail` makes the run's error, `bad`
    /// the letter's record or raw text (called only for `DeadLetter`).
    pub(crate) fn reject(
        &self,
        stage: &str,
        message: String,
        bad: impl FnOnce() -> Bad,
        file: Option<&str>,
        line: Option<u64>,
        fail: impl FnOnce(String) -> Error,
    ) -> Result<Rejected, Halt> {
        match self {
            OnError::Fail => Err(Halt::Failed(fail(message))),
            OnError::Skip => Ok(Rejected::Skipped),
            OnError::DeadLetter(dl) => {
                let (record, raw) = match bad() {
                    Bad::Record(v) => (Some(v), None),
                    Bad::Raw(s) => (None, Some(s)),
                };
                dl.send(DeadLetter {
                    stage: stage.to_string(),
                    error: message,
                    record,
                    raw,
                    file: file.map(str::to_string),
                    line,
                    time_ms: now_ms(),
                })?;
                Ok(Rejected::DeadLettered)
            }
        }
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A bad record with its error, as a dead-letter stream carries it.
///
/// `file` and `line` are known for records a source could not read; records downstream of a
/// source do not carry their position, so theirs are `None`.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct DeadLetter {
    /// The stage that rejected the record.
    pub stage: String,
    /// Why (the operator's error, formatted with `Display`).
    pub error: String,
    /// The record, when it was one (as JSON).
    pub record: Option<Value>,
    /// The text that could not be parsed into a record, lossily decoded as UTF-8.
    pub raw: Option<String>,
    /// The file the text came from, when a source rejected it.
    pub file: Option<String>,
    /// Its 1-based line number in `file` (or in an `exec` child's stdout).
    pub line: Option<u64>,
    /// When it was rejected: wall clock, milliseconds since the Unix epoch.
    pub time_ms: u64,
}

impl DeadLetter {
    /// The letter as a JSON object: `{"stage", "error", "record" | "raw", "file", "line",
    /// "time"}` (`record` or `raw`, whichever is set; `file` and `line` null when unknown).
    ///
    /// ```
    /// # use millrace::DeadLetter;
    /// let p = millrace::Pipeline::new();
    /// let (dl, letters) = p.dead_letters("bad");
    /// let out = letters.map(|l: DeadLetter| l.to_json().to_string()).collect();
    /// p.source("n", vec![1u32, 0, 2])
    ///     .try_map(|x| if x == 0 { Err("zero") } else { Ok(10 / x) })
    ///     .on_error(millrace::OnError::DeadLetter(dl))
    ///     .name("div")
    ///     .for_each(|_| {});
    /// p.run().unwrap();
    /// let v: serde_json::Value = serde_json::from_str(&out.take()[0]).unwrap();
    /// assert_eq!(v["stage"], "div");
    /// assert_eq!(v["error"], "zero");
    /// assert_eq!(v["record"], 0);
    /// assert!(v["file"].is_null() && v["line"].is_null());
    /// ```
    pub fn to_json(&self) -> Value {
        let mut m = Map::with_capacity(6);
        m.insert("stage".into(), Value::String(self.stage.clone()));
        m.insert("error".into(), Value::String(self.error.clone()));
        match (&self.record, &self.raw) {
            (Some(r), _) => m.insert("record".into(), r.clone()),
            (None, Some(raw)) => m.insert("raw".into(), Value::String(raw.clone())),
            (None, None) => m.insert("record".into(), Value::Null),
        };
        m.insert(
            "file".into(),
            self.file.clone().map_or(Value::Null, Value::String),
        );
        m.insert("line".into(), self.line.map_or(Value::Null, Value::from));
        m.insert("time".into(), Value::from(self.time_ms));
        Value::Object(m)
    }
}

/// How many dead letters a run may send before it fails with
/// [`Error::TooManyDeadLetters`] (`Options::max_dead_letters`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum DeadLetterLimit {
    /// At most this many letters: checked at every letter.
    Count(u64),
    /// At most this fraction of the records the sources read (counting the lines they
    /// rejected): checked at every letter once 1,000 records were read, and when the
    /// dead-letter stream ends.
    Ratio(f64),
}

impl std::fmt::Display for DeadLetterLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeadLetterLimit::Count(n) => write!(f, "{n}"),
            DeadLetterLimit::Ratio(r) => write!(f, "{r} of the records read"),
        }
    }
}

/// Records a ratio limit waits for before it is checked per letter.
const RATIO_MIN_RECORDS: u64 = 1000;

/// A handle that sends bad records to one dead-letter stream; made by
/// [`Pipeline::dead_letters`](crate::Pipeline::dead_letters) and given to
/// [`OnError::DeadLetter`]. Cheap to clone; several stages may share one.
#[derive(Clone)]
pub struct DeadLetters {
    inner: Arc<Inner>,
}

struct Inner {
    name: Arc<str>,
    tx: Sender<DeadLetter>,
    run: Arc<RunShared>,
}

impl std::fmt::Debug for DeadLetters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeadLetters")
            .field("stage", &self.inner.name)
            .finish_non_exhaustive()
    }
}

impl DeadLetters {
    /// A handle and the receiving end of its channel, for a dead-letter source named `name`.
    pub(crate) fn new(name: Arc<str>, run: Arc<RunShared>) -> (Self, Receiver<DeadLetter>) {
        let (tx, rx) = bounded(CAPACITY);
        (
            DeadLetters {
                inner: Arc::new(Inner { name, tx, run }),
            },
            rx,
        )
    }

    /// The handle's identity (shared by its clones).
    pub(crate) fn id(&self) -> usize {
        Arc::as_ptr(&self.inner) as usize
    }

    /// Sends one letter, blocking while the stream is full (but not past a cancel), after
    /// checking the run's limit.
    pub(crate) fn send(&self, letter: DeadLetter) -> Result<(), Halt> {
        let run = &self.inner.run;
        let count = run.dead_letters.fetch_add(1, Ordering::AcqRel) + 1;
        *run.last_dead_letter_stage.lock() = Some(letter.stage.clone());
        check_limit(run, count, &letter.stage, false)?;
        let letter = match self.inner.tx.try_send(letter) {
            Ok(()) => return Ok(()),
            Err(crossbeam_channel::TrySendError::Full(l)) => l,
            Err(crossbeam_channel::TrySendError::Disconnected(l)) => l,
        };
        select! {
            send(self.inner.tx, letter) -> r => r.map_err(|_| Halt::Failed(Error::Build(format!(
                "a dead letter was sent after the dead-letter stage `{}` ended (dead letters of dead letters?)",
                self.inner.name
            )))),
            recv(run.cancel_rx) -> _ => Err(Halt::Done),
        }
    }
}

/// Fails when `count` letters exceed the run's limit; `at_end`: the final ratio check.
fn check_limit(run: &RunShared, count: u64, stage: &str, at_end: bool) -> Result<(), Halt> {
    let Some(limit) = run.opts.max_dead_letters else {
        return Ok(());
    };
    let over = match limit {
        DeadLetterLimit::Count(n) => count > n,
        DeadLetterLimit::Ratio(r) => {
            let read = run.records_read_so_far();
            (at_end || read >= RATIO_MIN_RECORDS) && count as f64 > r * read.max(1) as f64
        }
    };
    if over {
        return Err(Halt::Failed(Error::TooManyDeadLetters {
            count,
            limit: limit.to_string(),
            stage: stage.to_string(),
        }));
    }
    Ok(())
}

/// The head of a dead-letter source: letters until every worker off the dead-letter side has
/// ended (see the module's design note).
pub(crate) struct DeadLetterHead {
    rx: Receiver<DeadLetter>,
    main: Receiver<()>,
    main_done: bool,
    /// Checkpointing, read at the first pull (`None` inside when it is off).
    cp: Option<Option<Arc<crate::checkpoint::CheckpointRun>>>,
    /// The next checkpoint to cut.
    next: u64,
    /// The checkpoint being cut, and how many letters are still to be sent before its barrier.
    cut: Option<(u64, usize)>,
}

/// How often a dead-letter head with nothing to read checks whether it may send a barrier.
const CUT_POLL: std::time::Duration = std::time::Duration::from_millis(2);

impl DeadLetterHead {
    pub(crate) fn new(rx: Receiver<DeadLetter>, main: Receiver<()>) -> Self {
        DeadLetterHead {
            rx,
            main,
            main_done: false,
            cp: None,
            next: 0,
            cut: None,
        }
    }

    /// Checkpoints on the dead-letter side.
    ///
    /// # Design note
    ///
    /// Letters are not replayed: the dead-letter source has no position to rewind to. Its
    /// barrier `n` is sent once every instance off the dead-letter side has acknowledged `n`
    /// (or ended), after the letters queued at that moment (`rx.len()`): every letter caused by
    /// a record before the cut was sent before the sender's snapshot, so it is before the
    /// barrier and is not lost on resume. Letters sent after the cut by records that the resumed
    /// run reprocesses may be sent again: dead letters are at-least-once.
    ///
    /// Returns the barrier to send now, if any.
    fn barrier_due(&mut self, cx: &Cx) -> Option<u64> {
        let cp = self
            .cp
            .get_or_insert_with(|| cx.run.checkpoint.lock().clone())
            .as_ref()?;
        if self.next == 0 {
            self.next = cp.coord.base() + 1;
        }
        if self.cut.is_none()
            && self.next <= cp.coord.triggered()
            && cp.coord.main_side_done(self.next)
        {
            self.cut = Some((self.next, self.rx.len()));
        }
        match self.cut {
            Some((id, 0)) => {
                self.cut = None;
                self.next = id + 1;
                Some(id)
            }
            _ => None,
        }
    }

    /// Whether a checkpoint is waiting for this head (it must not block for long).
    fn checkpoint_waiting(&self) -> bool {
        match &self.cp {
            Some(Some(cp)) => self.cut.is_some() || self.next <= cp.coord.triggered(),
            _ => false,
        }
    }
}

impl Head<DeadLetter> for DeadLetterHead {
    fn pull(
        &mut self,
        cx: &Cx,
        buf: &mut Vec<DeadLetter>,
        flush_at: Option<u64>,
    ) -> Result<Pull, Halt> {
        let cap = cx.batch_size();
        if let Some(id) = self.barrier_due(cx) {
            return Ok(Pull::Barrier(id));
        }
        while buf.len() < cap {
            if let Some((_, 0)) = self.cut {
                // The letters before the cut are in the buffer: the barrier follows them.
                return Ok(Pull::Data);
            }
            match self.rx.try_recv() {
                Ok(l) => {
                    buf.push(l);
                    if let Some((_, left)) = &mut self.cut {
                        *left -= 1;
                    }
                    continue;
                }
                Err(TryRecvError::Empty) if !self.main_done => {}
                Err(_) => {
                    // Every sender's thread has ended: the run's last check of the ratio.
                    let run = &cx.run;
                    let count = run.dead_letters.load(Ordering::Acquire);
                    if count > 0 {
                        let stage = run
                            .last_dead_letter_stage
                            .lock()
                            .clone()
                            .unwrap_or_default();
                        check_limit(run, count, &stage, true)?;
                    }
                    return Ok(Pull::End);
                }
            }
            if !buf.is_empty() {
                return Ok(Pull::Data);
            }
            let t0 = std::time::Instant::now();
            let waited = |cx: &Cx| {
                crate::metrics::InstanceMetrics::add(
                    &cx.metrics.recv_wait_ns,
                    t0.elapsed().as_nanos() as u64,
                )
            };
            let flush_at = match (flush_at, self.checkpoint_waiting()) {
                (f, false) => f,
                (None, true) => Some(cx.run.now_ms() + CUT_POLL.as_millis() as u64),
                (Some(f), true) => Some(f.min(cx.run.now_ms() + CUT_POLL.as_millis() as u64)),
            };
            let got = match flush_at {
                Some(at) => {
                    let wait = std::time::Duration::from_millis(at.saturating_sub(cx.run.now_ms()));
                    select! {
                        recv(self.rx) -> m => m.ok(),
                        recv(self.main) -> _ => { self.main_done = true; None }
                        recv(cx.run.cancel_rx) -> _ => return Err(Halt::Done),
                        default(wait) => {
                            waited(cx);
                            return Ok(Pull::Idle);
                        }
                    }
                }
                None => select! {
                    recv(self.rx) -> m => m.ok(),
                    recv(self.main) -> _ => { self.main_done = true; None }
                    recv(cx.run.cancel_rx) -> _ => return Err(Halt::Done),
                },
            };
            waited(cx);
            if let Some(l) = got {
                buf.push(l);
                if let Some((_, left)) = &mut self.cut {
                    *left = left.saturating_sub(1);
                }
            }
        }
        Ok(Pull::Data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn letter_json_has_record_xor_raw() {
        let l = DeadLetter {
            stage: "read".into(),
            error: "bad".into(),
            record: None,
            raw: Some("{x".into()),
            file: Some("in.ndjson".into()),
            line: Some(3),
            time_ms: 7,
        };
        assert_eq!(
            l.to_json(),
            serde_json::json!({"stage": "read", "error": "bad", "raw": "{x", "file": "in.ndjson", "line": 3, "time": 7})
        );
        let l = DeadLetter {
            record: Some(serde_json::json!({"a": 1})),
            raw: None,
            file: None,
            line: None,
            ..l
        };
        assert_eq!(
            l.to_json(),
            serde_json::json!({"stage": "read", "error": "bad", "record": {"a": 1}, "file": null, "line": null, "time": 7})
        );
    }
}
