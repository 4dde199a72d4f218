//! A reloadable `exec` stage (or process plugin node): [`ReloadExecHead`] starts a new child
//! for each new version of its [`ExecSpec`] and sends it the batches from then on; the old child
//! gets end of input, finishes its records, and is waited for; its output is read to the end
//! before the new child's, so order is kept and no output batch mixes versions.

use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, SendTimeoutError, Sender};

use super::{ExecHead, ExecSpec, Wire};
use crate::channel::{InputHead, Message};
use crate::error::Error;
use crate::operator::Halt;
use crate::runtime::{Cx, Head, Pull};
use crate::sync::thread::{self, JoinHandle};
use crate::sync::{AtomicBool, Ordering};
use crate::versioned::Versioned;

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
    pub(crate) fn new(name: Arc<str>, input: InputHead<T>, spec: Arc<Versioned<ExecSpec>>) -> Self {
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
        // The generations first (dropping one stops its writer, kills and reaps its child),
        // then the dispatcher: were the dispatcher stopped first, it could drop a generation's
        // input before that generation's writer was told to stop, which the writer would take
        // for an input closed abnormally.
        self.current = None;
        if let Some(rx) = self.generations.take() {
            while rx.try_recv().is_ok() {}
            drop(rx);
        }
        self.stop.store(true, Ordering::Release);
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
            Err(Halt::Failed(e)) if !stop.load(Ordering::Acquire) => {
                // The input closed abnormally (without its end markers): it is truncated, so
                // the run fails at once, before the current child's input is closed (which
                // it would otherwise take for a clean end).
                cx.run.fail(e);
                return Ok(());
            }
            Err(_) => return Ok(()), // cancelled, failing or told to stop
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
