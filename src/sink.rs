//! Stage tails that consume records: closures, collection into a `Vec`, and line or NDJSON
//! writers to a file or stdout.
//!
//! A writer treats a closed stdout (`EPIPE`, as when piped into `head`) as a normal end: the sink
//! stops, its producers see it gone and stop too, and the run succeeds.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::Path;
use std::sync::Arc;

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

/// Gathers records locally and hands them over at the end of the instance's input.
pub(crate) struct CollectTail<T> {
    local: Vec<T>,
    out: Arc<Mutex<Vec<T>>>,
    count: Counter,
}

impl<T> CollectTail<T> {
    pub(crate) fn new(cx: &Cx, out: Arc<Mutex<Vec<T>>>) -> Self {
        CollectTail {
            local: Vec::new(),
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
        self.out.lock().append(&mut self.local);
        Ok(())
    }
}

/// Opens an output file, or stdout for `-`, behind a large buffer.
pub(crate) fn open_output(
    stage: &str,
    path: &Path,
) -> Result<BufWriter<Box<dyn Write + Send>>, Error> {
    let shown = path.display().to_string();
    let io_err = |source| Error::Io {
        stage: stage.to_string(),
        path: shown.clone(),
        source,
    };
    let w: Box<dyn Write + Send> = if shown == "-" {
        #[cfg(unix)]
        {
            use std::os::fd::AsFd;
            // A duplicate of fd 1: unbuffered by std, so our BufWriter decides when to write.
            Box::new(File::from(
                io::stdout().as_fd().try_clone_to_owned().map_err(io_err)?,
            ))
        }
        #[cfg(not(unix))]
        {
            Box::new(io::stdout())
        }
    } else {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io_err)?;
        }
        Box::new(File::create(path).map_err(io_err)?)
    };
    Ok(BufWriter::with_capacity(256 * 1024, w))
}

/// Writes each record as one line, formatted by `format`, which returns how many records it
/// wrote (1, or a block's count on the byte path).
pub(crate) struct WriteTail<F> {
    out: Option<BufWriter<Box<dyn Write + Send>>>,
    path: String,
    stage: Arc<str>,
    format: F,
    count: Counter,
}

impl<F> WriteTail<F> {
    pub(crate) fn new(
        cx: &Cx,
        out: BufWriter<Box<dyn Write + Send>>,
        path: String,
        stage: Arc<str>,
        format: F,
    ) -> Self {
        WriteTail {
            out: Some(out),
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
}

impl<T, F: FnMut(&mut dyn Write, &T) -> io::Result<u64> + Send> Emit<T> for WriteTail<F> {
    #[inline]
    fn emit(&mut self, item: T) -> Result<(), Halt> {
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
        self.flush(cx)?;
        if let Some(out) = self.out.take() {
            // Surface errors the final flush inside `into_inner` would otherwise swallow.
            if let Err(e) = out
                .into_inner()
                .map_err(|e| e.into_error())
                .and_then(|mut w| w.flush())
            {
                return Err(self.io_halt(e));
            }
        }
        Ok(())
    }
}

/// Commits a sink file pre-committed at a barrier, once its checkpoint is complete: an
/// idempotent rename plus a directory fsync. Stub until the sinks' exactly-once side lands
/// (helper C owns it): there is nothing pre-committed yet, so anything asked of it is an error.
pub(crate) fn commit_part(path: &std::path::Path) -> Result<(), crate::Error> {
    Err(crate::Error::Checkpoint {
        message: format!(
            "cannot commit {}: sink commits are not implemented",
            path.display()
        ),
    })
}
