//! Stage tails that consume records: closures, collection into a `Vec`, and line or NDJSON
//! writers to a file or stdout.
//!
//! A writer treats a closed stdout (`EPIPE`, as when piped into `head`) as a normal end: the sink
//! stops, its producers see it gone and stop too, and the run succeeds.
//!
//! Checkpoints (see `docs/checkpoints.md` and the design note in `dir_sink`): a writer to a
//! regular file is exactly once — at each barrier it flushes, fsyncs and records the file's
//! length, and a restore truncates the file back to it; a writer to a directory writes part
//! files that are pre-committed at the barrier and committed when the checkpoint completes
//! ([`commit_part`]); stdout and caller-given writers cannot be rolled back (at least once);
//! `for_each` and `collect` keep nothing (a resumed run hands them the replayed records again).
//!
//! The file writer does its file-system work (create, write, fsync, truncate, length) through
//! the run's [`Fs`] (see `dir_sink`'s design note): the file is opened for appending, so that
//! after a truncation back to the committed length the next write lands there.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::checkpoint::fs::FsWriter;
use crate::checkpoint::state::InstanceState;
use crate::checkpoint::store::Fs;
use crate::checkpoint::StateSupport;

mod dir_sink;
pub(crate) use dir_sink::{commit_part, DirWriteTail};

use crate::error::{BoxError, Error};
use crate::metrics::InstanceMetrics;
use crate::operator::{Emit, Halt};
use crate::runtime::{Cx, Tail};
use crate::sync::Mutex;

/// Counts records written and publishes the count at each flush.
struct Counter {
    metrics: Arc<InstanceMetrics>,
    unpublished: u64,
}

impl Counter {
    fn new(cx: &Cx) -> Self {
        Counter {
            metrics: Arc::clone(&cx.metrics),
            unpublished: 0,
        }
    }
    fn publish(&mut self) {
        InstanceMetrics::add(
            &self.metrics.records_out,
            std::mem::take(&mut self.unpublished),
        );
    }
}

/// Calls a closure for each record.
pub(crate) struct ForEachTail<F> {
    f: F,
    name: Arc<str>,
    count: Counter,
}

impl<F> ForEachTail<F> {
    pub(crate) fn new(cx: &Cx, f: F, name: Arc<str>) -> Self {
        ForEachTail {
            f,
            name,
            count: Counter::new(cx),
        }
    }
}

impl<T, X: Into<BoxError>, F: FnMut(T) -> Result<(), X> + Send> Emit<T> for ForEachTail<F> {
    #[inline]
    fn emit(&mut self, item: T) -> Result<(), Halt> {
        self.count.unpublished += 1;
        (self.f)(item).map_err(|e| crate::operator::op_error(&self.name, e))
    }
}

impl<T, X: Into<BoxError>, F: FnMut(T) -> Result<(), X> + Send> Tail<T> for ForEachTail<F> {
    fn flush(&mut self, _: &Cx) -> Result<(), Halt> {
        self.count.publish();
        Ok(())
    }
    fn finish(&mut self, _: &Cx) -> Result<(), Halt> {
        self.count.publish();
        Ok(())
    }
}

/// The records a [`Stream::collect`](crate::Stream::collect) sink gathered, available once the
/// run has finished.
#[derive(Debug)]
pub struct Collected<T> {
    pub(crate) items: Arc<Mutex<Vec<T>>>,
}

impl<T> Clone for Collected<T> {
    fn clone(&self) -> Self {
        Collected {
            items: Arc::clone(&self.items),
        }
    }
}

impl<T> Collected<T> {
    /// Takes the collected records (arrival order for a single instance), leaving it empty.
    pub fn take(&self) -> Vec<T> {
        std::mem::take(&mut *self.items.lock())
    }
    /// How many records are held.
    pub fn len(&self) -> usize {
        self.items.lock().len()
    }
    /// Whether no record is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The buffer a `collect` sink starts with, allocated where `collect()` is called: on the
/// caller's thread, not the sink's worker.
///
/// Why it matters (glibc): `realloc` keeps a block in the arena it came from, and each thread
/// allocates from an arena of its own. A result grown from nothing on a worker thread lives in
/// that worker's arena; freed by the caller after the run, it stays there, and the next run's
/// threads need not be given that arena again, so a process that runs pipelines one after
/// another held about 23 MB more after each run of the peers' W2 (1 M results). Grown from a
/// block of the caller's, the result is the caller's memory, as a hand-written loop's would be
/// (`docs/performance.md`, "W2 memory, 2026-12-07"; `tests/collect_memory.rs`). With other
/// allocators it is one small allocation made early.
pub(crate) fn first_buffer<T>() -> Vec<T> {
    const BYTES: usize = 4096;
    match std::mem::size_of::<T>() {
        0 => Vec::new(),
        n => Vec::with_capacity((BYTES / n).max(1)),
    }
}

/// Gathers records locally and hands them over at the end of the instance's input.
pub(crate) struct CollectTail<T> {
    local: Vec<T>,
    out: Arc<Mutex<Vec<T>>>,
    count: Counter,
}

impl<T> CollectTail<T> {
    /// The first instance made takes the handle's buffer (see [`first_buffer`]); any other
    /// starts empty.
    pub(crate) fn new(cx: &Cx, out: Arc<Mutex<Vec<T>>>) -> Self {
        let local = std::mem::take(&mut *out.lock());
        CollectTail {
            local,
            out,
            count: Counter::new(cx),
        }
    }
}

impl<T: Send> Emit<T> for CollectTail<T> {
    #[inline]
    fn emit(&mut self, item: T) -> Result<(), Halt> {
        self.count.unpublished += 1;
        // Unbounded by design: the caller asked for every record in memory.
        self.local.push(item);
        Ok(())
    }
}

impl<T: Send> Tail<T> for CollectTail<T> {
    fn flush(&mut self, _: &Cx) -> Result<(), Halt> {
        self.count.publish();
        Ok(())
    }
    fn finish(&mut self, _: &Cx) -> Result<(), Halt> {
        self.count.publish();
        let mut out = self.out.lock();
        if out.is_empty() {
            // The first to finish hands over its buffer: no copy, no second allocation the
            // size of the result.
            std::mem::swap(&mut *out, &mut self.local);
        } else {
            out.append(&mut self.local);
        }
        Ok(())
    }
}

/// Where a writer sink's bytes go, as far as checkpoints care.
pub(crate) enum Target {
    /// A regular file: made durable at each barrier and truncated back on restore.
    File {
        /// The file system it is on (the run's).
        fs: Arc<dyn Fs>,
        /// The file.
        path: PathBuf,
        /// The file was truncated (a fresh run) or restored: writing may start.
        started: bool,
    },
    /// Anything that cannot be rolled back, with the reason (stdout, a pipe, a writer).
    Stream(&'static str),
}

/// What a writer sink's buffer writes into.
pub(crate) enum Output {
    /// Stdout (or a caller's writer).
    Stream(Box<dyn Write + Send>),
    /// A file opened through the run's file system (regular or not).
    File(FsWriter),
}

impl Write for Output {
    #[inline]
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Output::Stream(w) => w.write(buf),
            Output::File(w) => w.write(buf),
        }
    }
    #[inline]
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        match self {
            Output::Stream(w) => w.write_all(buf),
            Output::File(w) => w.write_all(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Output::Stream(w) => w.flush(),
            Output::File(w) => w.flush(),
        }
    }
}

/// Opens an output file (through `fs`), or stdout for `-`, behind a large buffer.
///
/// A regular file is opened for appending and *without* truncating it: a resumed run
/// truncates it to the length committed at its checkpoint instead, and a fresh run truncates
/// it before the first byte is written (see [`WriteTail`]).
pub(crate) fn open_output(
    stage: &str,
    path: &Path,
    fs: &Arc<dyn Fs>,
) -> Result<(BufWriter<Output>, Target), Error> {
    let shown = path.display().to_string();
    let io_err = |source| Error::Io {
        stage: stage.to_string(),
        path: shown.clone(),
        source,
    };
    let (w, target): (Output, Target) = if shown == "-" {
        #[cfg(unix)]
        let w: Box<dyn Write + Send> = {
            use std::os::fd::AsFd;
            // A duplicate of fd 1: unbuffered by std, so our BufWriter decides when to write.
            Box::new(File::from(
                io::stdout().as_fd().try_clone_to_owned().map_err(io_err)?,
            ))
        };
        #[cfg(not(unix))]
        let w: Box<dyn Write + Send> = Box::new(io::stdout());
        (
            Output::Stream(w),
            Target::Stream(
                "stdout cannot be rolled back: write to a file or a directory for exactly-once",
            ),
        )
    } else {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs.create_dir_all(dir).map_err(io_err)?;
        }
        let file = fs.open_append(path).map_err(io_err)?;
        let target = if file.is_regular() {
            // The file's entry must be durable before anything committed in it counts: a
            // file created now (or by a run that crashed) is gone after a crash until its
            // directory is fsynced (found by `tests/checkpoint_crash.rs`).
            crate::checkpoint::fs::sync_entry_of(&**fs, path).map_err(io_err)?;
            Target::File {
                fs: Arc::clone(fs),
                path: path.to_path_buf(),
                started: false,
            }
        } else {
            Target::Stream("the output is not a regular file and cannot be rolled back")
        };
        (Output::File(FsWriter(file)), target)
    };
    Ok((BufWriter::with_capacity(256 * 1024, w), target))
}

/// The state a file writer records at a barrier (part `tail`).
#[derive(serde::Serialize, serde::Deserialize)]
struct FileSinkState {
    /// The file's length once every record before the barrier was written and fsynced.
    committed: u64,
}

/// Writes each record as one line, formatted by `format`, which returns how many records it
/// wrote (1, or a block's count on the byte path).
pub(crate) struct WriteTail<F> {
    out: Option<BufWriter<Output>>,
    target: Target,
    path: String,
    stage: Arc<str>,
    format: F,
    count: Counter,
}

impl<F> WriteTail<F> {
    pub(crate) fn new(
        cx: &Cx,
        out: BufWriter<Output>,
        target: Target,
        path: String,
        stage: Arc<str>,
        format: F,
    ) -> Self {
        WriteTail {
            out: Some(out),
            target,
            path,
            stage,
            format,
            count: Counter::new(cx),
        }
    }

    fn io_halt(&mut self, e: io::Error) -> Halt {
        if e.kind() == io::ErrorKind::BrokenPipe {
            // The reader went away (`| head`): a normal stop, not an error.
            log::debug!("stage `{}`: {} closed; stopping", self.stage, self.path);
            self.out = None;
            Halt::Done
        } else {
            Halt::Failed(Error::Io {
                stage: self.stage.to_string(),
                path: self.path.clone(),
                source: e,
            })
        }
    }

    /// A fresh run's first write: truncate the file (opened without truncating, in case the
    /// run resumed and restored it instead).
    #[cold]
    fn start(&mut self) -> Result<(), Halt> {
        if let Target::File { fs, path, started } = &mut self.target {
            let r = fs.truncate(path, 0);
            *started = true;
            if let Err(e) = r {
                return Err(self.io_halt(e));
            }
        }
        Ok(())
    }

    #[inline]
    fn ensure_started(&mut self) -> Result<(), Halt> {
        match self.target {
            Target::File { started: false, .. } => self.start(),
            _ => Ok(()),
        }
    }

    /// `fsync` of the file being written (through its own handle).
    fn sync_file(&mut self) -> Result<(), Error> {
        if let Some(Output::File(FsWriter(file))) = self.out.as_mut().map(BufWriter::get_mut) {
            file.sync_data()
                .map_err(|source| fsync_error(&self.path, &self.stage, source))?;
        }
        Ok(())
    }

    /// Flushes the buffer into the file and fsyncs it: the file's length after.
    fn sync(&mut self) -> Result<u64, Halt> {
        if let Some(out) = self.out.as_mut() {
            if let Err(e) = out.flush() {
                return Err(self.io_halt(e));
            }
        }
        let Target::File { fs, path, .. } = &self.target else {
            return Ok(0);
        };
        let len = fs.file_len(path).map_err(|source| Error::CheckpointIo {
            op: "length of",
            path: format!("{} (sink `{}`)", self.path, self.stage),
            source,
        })?;
        self.sync_file()?;
        Ok(len)
    }
}

impl<T, F: FnMut(&mut dyn Write, &T) -> io::Result<u64> + Send> Emit<T> for WriteTail<F> {
    #[inline]
    fn emit(&mut self, item: T) -> Result<(), Halt> {
        self.ensure_started()?;
        let Some(out) = self.out.as_mut() else {
            return Err(Halt::Done);
        };
        match (self.format)(out, &item).and_then(|n| out.write_all(b"\n").map(|()| n)) {
            Ok(n) => {
                self.count.unpublished += n;
                Ok(())
            }
            Err(e) => Err(self.io_halt(e)),
        }
    }
}

impl<T, F: FnMut(&mut dyn Write, &T) -> io::Result<u64> + Send> Tail<T> for WriteTail<F> {
    fn flush(&mut self, _: &Cx) -> Result<(), Halt> {
        self.count.publish();
        match self.out.as_mut().map(|o| o.flush()) {
            None | Some(Ok(())) => Ok(()),
            Some(Err(e)) => Err(self.io_halt(e)),
        }
    }
    fn finish(&mut self, cx: &Cx) -> Result<(), Halt> {
        self.ensure_started()?;
        self.flush(cx)?;
        if let Some(out) = self.out.take() {
            // Surface errors the final flush inside `into_inner` would otherwise swallow.
            let mut w = match out.into_inner().map_err(|e| e.into_error()) {
                Ok(w) => w,
                Err(e) => return Err(self.io_halt(e)),
            };
            if let Err(e) = w.flush() {
                return Err(self.io_halt(e));
            }
            if let (Target::File { .. }, Output::File(FsWriter(file))) = (&self.target, &mut w) {
                // Durable before the run reports success.
                file.sync_data()
                    .map_err(|source| fsync_error(&self.path, &self.stage, source))?;
            }
        }
        Ok(())
    }
    fn barrier(
        &mut self,
        _cx: &Cx,
        _id: crate::checkpoint::CheckpointId,
        state: &mut InstanceState,
    ) -> Result<(), Halt> {
        self.ensure_started()?;
        self.count.publish();
        let committed = self.sync()?;
        if matches!(self.target, Target::File { .. }) {
            state.put("tail", &FileSinkState { committed })?;
            state.positions.push(("tail".into(), committed));
        }
        Ok(())
    }
    fn restore(&mut self, _cx: &Cx, state: &InstanceState) -> Result<(), Halt> {
        let Target::File { fs, path, started } = &mut self.target else {
            return Ok(());
        };
        let Some(FileSinkState { committed }) = state.get("tail")? else {
            return Err(Error::Checkpoint {
                message: format!(
                    "stage `{}`: the checkpoint holds no committed length for {}",
                    self.stage, self.path
                ),
            }
            .into());
        };
        let shown = format!("{} (sink `{}`)", self.path, self.stage);
        let io = |op, source| Error::CheckpointIo {
            op,
            path: shown.clone(),
            source,
        };
        let len = fs.file_len(path).map_err(|e| io("stat", e))?;
        if len < committed {
            return Err(Error::Checkpoint {
                message: format!(
                    "stage `{}`: {} is {len} bytes, shorter than the {committed} bytes \
                     committed at the checkpoint: it was changed outside the run; refusing to \
                     resume onto it",
                    self.stage, self.path
                ),
            }
            .into());
        }
        // Bytes after the committed length were written after the barrier: the resumed run
        // writes them again (appending: after the truncation, at the committed length).
        fs.truncate(path, committed)
            .map_err(|e| io("truncate", e))?;
        *started = true;
        self.sync_file()?;
        Ok(())
    }
    fn state_support(&self) -> StateSupport {
        match self.target {
            Target::File { .. } => StateSupport::Snapshots,
            Target::Stream(why) => StateSupport::AtLeastOnce(why.to_string()),
        }
    }
}

/// A file sink's failed fsync: fatal, never retried as if it had succeeded.
fn fsync_error(path: &str, stage: &str, source: std::io::Error) -> Error {
    Error::CheckpointIo {
        op: "fsync",
        path: format!("{path} (sink `{stage}`)"),
        source,
    }
}
