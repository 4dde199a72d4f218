//! The run-time side of hot reload: a stage's logic as a versioned value, and the stage heads
//! that switch between versions only between batches.
//!
//! A reloadable stage reads its logic from a [`Versioned`] cell (an RCU
//! [`Snapshot`](crate::Snapshot) plus counts per version) **once per input batch**, so each
//! batch is processed by exactly one version, and an old version lives until the last batch
//! that loaded it is done (it is an `Arc`). No sleep, grace period or epoch is involved. How a
//! stage switches:
//!
//! - built-in record operations (`filter`, `select`, `words`): a [`LiveMap`] step, fused like
//!   the fixed operators, loads its version when a batch begins (`Chain::begin_batch`);
//! - native plugin nodes: the node instance is recreated from the new version (its library,
//!   loaded from a fresh copy, and parameters) before the first batch that sees it; the old
//!   instance, and with it the old library, is released after its last batch;
//! - `window` stages: the window head applies a new `allowed_lateness` or `on_error` to its
//!   running state (`WindowState::set_lateness`) before the batch;
//! - `exec` stages and process plugins: [`ReloadExecHead`] starts a new child for the new
//!   version and sends it the batches from then on; the old child gets end of input, finishes
//!   its records, and is waited for; its output is read to the end before the new child's, so
//!   order is kept and no output batch mixes versions.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, SendTimeoutError, Sender};
use serde_json::Value;

use crate::channel::{InputHead, Message};
use crate::config::kinds::{self, FilterOp, Kind};
use crate::error::Error;
use crate::exec::{ExecHead, ExecSpec, Wire};
use crate::operator::{Chain, Emit, Halt};
use crate::runtime::{Cx, Head, Pull};
use crate::sync::thread::{self, JoinHandle};
use crate::sync::{AtomicBool, Mutex, Ordering};
use crate::Snapshot;

/// A stage's logic, replaceable between batches, with the records each version processed.
pub(crate) struct Versioned<V> {
    cell: Snapshot<V>,
    counts: Mutex<BTreeMap<u64, u64>>,
}

impl<V> Versioned<V> {
    pub fn new(v: V) -> Arc<Self> {
        Arc::new(Versioned {
            cell: Snapshot::new(v),
            counts: Mutex::new(BTreeMap::new()),
        })
    }

    /// The current version, for one batch (the `Arc` of [`crate::sync`], as the cell's).
    pub fn load(&self) -> (u64, crate::sync::Arc<V>) {
        self.cell.load_versioned()
    }

    /// Publishes a new version; returns its number.
    pub fn store(&self, v: V) -> u64 {
        self.cell.store(v)
    }

    /// Records that version `version` processed `n` records.
    pub fn count(&self, version: u64, n: u64) {
        *self.counts.lock().entry(version).or_default() += n;
    }

    /// Records processed per version.
    pub fn counts(&self) -> BTreeMap<u64, u64> {
        self.counts.lock().clone()
    }
}

/// A built-in record operation whose parameters can be reloaded.
#[derive(Debug, Clone)]
pub(crate) enum MapLogic {
    Filter {
        field: String,
        op: FilterOp,
        value: Value,
    },
    Select {
        fields: Vec<String>,
    },
    Words {
        field: String,
        lowercase: bool,
    },
}

impl MapLogic {
    /// The logic of a reloadable built-in kind.
    pub fn of(kind: &Kind) -> Option<MapLogic> {
        Some(match kind {
            Kind::Filter { field, op, value } => MapLogic::Filter {
                field: field.clone(),
                op: *op,
                value: value.clone(),
            },
            Kind::Select { fields } => MapLogic::Select {
                fields: fields.clone(),
            },
            Kind::Words { field, lowercase } => MapLogic::Words {
                field: field.clone(),
                lowercase: *lowercase,
            },
            _ => return None,
        })
    }
}

/// A reloadable `filter`, `select` or `words` step of a fused chain: it loads its version in
/// [`Chain::begin_batch`], so every record of a batch meets the same version, and counts the
/// batch's records for that version.
pub(crate) struct LiveMap<C> {
    prev: C,
    name: Arc<str>,
    logic: Arc<Versioned<MapLogic>>,
    current: Option<crate::sync::Arc<MapLogic>>,
}

impl<C: Clone> Clone for LiveMap<C> {
    fn clone(&self) -> Self {
        LiveMap {
            prev: self.prev.clone(),
            name: Arc::clone(&self.name),
            logic: Arc::clone(&self.logic),
            current: None,
        }
    }
}

impl<C> LiveMap<C> {
    pub fn new(prev: C, name: Arc<str>, logic: Arc<Versioned<MapLogic>>) -> Self {
        LiveMap {
            prev,
            name,
            logic,
            current: None,
        }
    }
}

struct LiveEmit<'a, E> {
    logic: &'a MapLogic,
    name: &'a str,
    out: &'a mut E,
}

impl<E: Emit<Value>> Emit<Value> for LiveEmit<'_, E> {
    #[inline]
    fn emit(&mut self, rec: Value) -> Result<(), Halt> {
        match self.logic {
            MapLogic::Filter { field, op, value } => {
                if kinds::filter(&rec, field, *op, value) {
                    self.out.emit(rec)?;
                }
            }
            MapLogic::Select { fields } => self.out.emit(kinds::select(rec, fields))?,
            MapLogic::Words { field, lowercase } => {
                let words = kinds::words(&rec, field, *lowercase).map_err(|e| {
                    Halt::Failed(Error::Operator {
                        stage: self.name.to_string(),
                        source: e.into(),
                    })
                })?;
                for w in words {
                    self.out.emit(w)?;
                }
            }
        }
        Ok(())
    }
}

impl<In, C: Chain<In, Out = Value>> Chain<In> for LiveMap<C> {
    type Out = Value;

    fn begin_batch(&mut self, records: usize) {
        self.prev.begin_batch(records);
        let (version, logic) = self.logic.load();
        self.logic.count(version, records as u64);
        self.current = Some(logic);
    }

    #[inline]
    fn push<E: Emit<Value>>(&mut self, item: In, out: &mut E) -> Result<(), Halt> {
        if self.current.is_none() {
            // Driven without batches: one version from here on until the next batch.
            self.current = Some(self.logic.load().1);
        }
        let logic = self.current.as_ref().expect("loaded above");
        self.prev.push(
            item,
            &mut LiveEmit {
                logic,
                name: &self.name,
                out,
            },
        )
    }

    fn names(&self, names: &mut Vec<Arc<str>>) {
        self.prev.names(names);
        names.push(Arc::clone(&self.name));
    }

    fn rename_last(&mut self, name: Arc<str>) -> bool {
        self.name = name;
        true
    }
}

/// Batches queued for one child generation.
const GENERATION_QUEUE: usize = 4;

/// The head of a reloadable `exec` stage instance (or process plugin node): one child per
/// version, fed by a dispatcher thread that loads the version once per input batch.
pub(crate) struct ReloadExecHead<T: Wire> {
    name: Arc<str>,
    spec: Arc<Versioned<ExecSpec>>,
    input: Option<InputHead<T>>,
    /// Child generations in the order their batches were sent.
    generations: Option<Receiver<ExecHead<T>>>,
    current: Option<ExecHead<T>>,
    dispatcher: Option<JoinHandle<Result<(), Error>>>,
    stop: Arc<AtomicBool>,
}

impl<T: Wire> ReloadExecHead<T> {
    pub fn new(name: Arc<str>, input: InputHead<T>, spec: Arc<Versioned<ExecSpec>>) -> Self {
        ReloadExecHead {
            name,
            spec,
            input: Some(input),
            generations: None,
            current: None,
            dispatcher: None,
            stop: Arc::new(AtomicBool::new(false)),
        }
    }

    fn start(&mut self, cx: &Cx) -> Result<(), Halt> {
        let (tx, rx) = bounded(2);
        let input = self.input.take().expect("started once");
        let dcx = cx.clone_for_thread();
        let spec = Arc::clone(&self.spec);
        let name = Arc::clone(&self.name);
        let stop = Arc::clone(&self.stop);
        let handle = thread::Builder::new()
            .name(format!("millrace:{}:dispatch", self.name))
            .spawn(move || dispatch(&dcx, input, &spec, &name, &tx, &stop))
            .map_err(|e| {
                Halt::Failed(Error::Operator {
                    stage: self.name.to_string(),
                    source: format!("cannot start a dispatcher thread: {e}").into(),
                })
            })?;
        self.dispatcher = Some(handle);
        self.generations = Some(rx);
        Ok(())
    }

    /// The dispatcher ended: its error, if it had one.
    fn dispatcher_result(&mut self) -> Result<(), Halt> {
        match self.dispatcher.take().map(JoinHandle::join) {
            Some(Ok(Err(e))) => Err(Halt::Failed(e)),
            Some(Err(_)) => Err(Halt::Failed(Error::Operator {
                stage: self.name.to_string(),
                source: "the dispatcher thread panicked".into(),
            })),
            _ => Ok(()),
        }
    }
}

impl<T: Wire> Head<T> for ReloadExecHead<T>
where
    ExecHead<T>: Head<T>,
{
    fn counts_input(&self) -> bool {
        true // the dispatcher counts what it hands to the children
    }

    fn pull(&mut self, cx: &Cx, buf: &mut Vec<T>, flush_at: Option<u64>) -> Result<Pull, Halt> {
        if self.generations.is_none() {
            self.start(cx)?;
        }
        loop {
            if self.current.is_none() {
                let rx = self.generations.as_ref().expect("started");
                match rx.recv_timeout(Duration::from_millis(100)) {
                    Ok(g) => self.current = Some(g),
                    Err(RecvTimeoutError::Timeout) => {
                        if cx.run.is_cancelled() {
                            return Err(Halt::Done);
                        }
                        if flush_at.is_some_and(|at| cx.clock_ms() >= at) {
                            return Ok(Pull::Idle);
                        }
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => {
                        self.dispatcher_result()?;
                        return Ok(Pull::End);
                    }
                }
            }
            let g = self.current.as_mut().expect("a generation");
            match g.pull(cx, buf, flush_at)? {
                Pull::End => {
                    // This child is done (its status checked); the next one's output follows,
                    // in a batch of its own.
                    self.current = None;
                    if !buf.is_empty() {
                        return Ok(Pull::Idle);
                    }
                }
                Pull::Watermark(_) => return Ok(Pull::Idle),
                other => return Ok(other),
            }
        }
    }
}

impl<T: Wire> Drop for ReloadExecHead<T> {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Generations not yet read: dropping them kills and reaps their children.
        self.current = None;
        if let Some(rx) = self.generations.take() {
            while rx.try_recv().is_ok() {}
            drop(rx);
        }
        if let Some(d) = self.dispatcher.take() {
            let _ = d.join();
        }
    }
}

/// Sends `msg`, giving up when `stop` is set or the run is cancelled.
fn send_until<M>(cx: &Cx, tx: &Sender<M>, mut msg: M, stop: &AtomicBool) -> bool {
    loop {
        match tx.send_timeout(msg, Duration::from_millis(100)) {
            Ok(()) => return true,
            Err(SendTimeoutError::Timeout(m)) => {
                if stop.load(Ordering::Acquire) || cx.run.is_cancelled() {
                    return false;
                }
                msg = m;
            }
            Err(SendTimeoutError::Disconnected(_)) => return false,
        }
    }
}

/// The dispatcher: per input batch, loads the stage's version; on a new version, ends the
/// current child's input and starts a generation for the new one.
fn dispatch<T: Wire>(
    cx: &Cx,
    mut input: InputHead<T>,
    spec: &Versioned<ExecSpec>,
    name: &Arc<str>,
    generations: &Sender<ExecHead<T>>,
    stop: &AtomicBool,
) -> Result<(), Error> {
    let mut current: Option<(u64, Sender<Message<T>>)> = None;
    let (recycle, _unused) = bounded(1);
    let mut batch = Vec::new();
    loop {
        if stop.load(Ordering::Acquire) {
            return Ok(());
        }
        let pulled = match input.pull(cx, &mut batch, Some(cx.run.now_ms() + 100)) {
            Ok(p) => p,
            Err(_) => return Ok(()), // cancelled or failing: the run reports it
        };
        if !batch.is_empty() {
            let (version, s) = spec.load();
            if current.as_ref().map(|c| c.0) != Some(version) {
                if let Some((_, tx)) = current.take() {
                    // The old child finishes what it has, then sees end of input.
                    let _ = send_until(cx, &tx, Message::End { from: 0 }, stop);
                }
                let (tx, rx) = bounded(GENERATION_QUEUE);
                let mut head = ExecHead::new(
                    Arc::clone(name),
                    InputHead::new(rx, 1, recycle.clone(), None),
                    Arc::new((*s).clone()),
                );
                // The new child starts now, while the old one finishes its records.
                if let Err(Halt::Failed(e)) = head.start_now(cx) {
                    return Err(e);
                }
                if !send_until(cx, generations, head, stop) {
                    return Ok(());
                }
                current = Some((version, tx));
            }
            spec.count(version, T::records(&batch));
            let (_, tx) = current.as_ref().expect("a generation");
            let msg = Message::Data {
                from: 0,
                batch: std::mem::take(&mut batch),
            };
            if !send_until(cx, tx, msg, stop) {
                return Ok(());
            }
        }
        if pulled == Pull::End {
            if let Some((_, tx)) = current.take() {
                let _ = send_until(cx, &tx, Message::End { from: 0 }, stop);
            }
            return Ok(());
        }
    }
}
