//! Stage heads that produce records: iterators, and lines or NDJSON read from a file or stdin.
//!
//! The line framing of the file sources is here: line endings (`\n`, `\r\n`) and a byte-order
//! mark at the start are dropped, a line over the cap (`max_line_bytes`) is a per-line record
//! error whose rest is read and dropped without being buffered, and a regular file found
//! shorter at its end than the bytes read fails as truncated (see "Input files" in
//! `docs/semantics.md`).
//!
//! Checkpoints: a source on a regular file snapshots the byte offset of its next unread line
//! and that line's number (so dead letters name the right line after a resume too), and its
//! restore reopens the file and seeks there. Stdin, pipes, readers and iterators cannot be
//! replayed: their heads say so in `state_support`, which makes checkpointing refuse to start,
//! naming the stage. [`Replayable`](crate::Replayable) sources (`Pipeline::replayable_source`)
//! snapshot their own position.
//!
//! A source fills one batch at a time. It returns a partly filled batch early when the batch has
//! waited longer than the run's linger time, and a source reading a pipe or terminal also does so
//! before a read that would block (checked with `poll`), so a slow trickle still flows.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use crate::checkpoint::state::InstanceState;
use crate::checkpoint::StateSupport;
use crate::error::{Error, Location};
use crate::operator::Halt;
use crate::runtime::{Cx, Head, Pull};

pub(crate) mod ranges;

/// A head that pulls from an iterator.
pub(crate) struct IterHead<It> {
    iter: It,
    /// Records to pull before the next look at the clock (see `pull`).
    step: usize,
}

impl<It> IterHead<It> {
    pub(crate) fn new(iter: It) -> Self {
        IterHead { iter, step: 1 }
    }
}

impl<It> Head<It::Item> for IterHead<It>
where
    It: Iterator + Send,
{
    fn state_support(&self) -> StateSupport {
        StateSupport::Unsupported(
            "an iterator cannot be replayed: use Pipeline::replayable_source".into(),
        )
    }
    fn pull(
        &mut self,
        cx: &Cx,
        buf: &mut Vec<It::Item>,
        flush_at: Option<u64>,
    ) -> Result<Pull, Halt> {
        let cap = cx.batch_size();
        let linger = cx.linger_ms();
        let mut deadline = flush_at.unwrap_or(u64::MAX);
        while buf.len() < cap {
            // Pull `step` records at a time (one `extend`, which specialises well for ranges,
            // slices and maps over them). `step` doubles while the iterator keeps up and drops
            // to 1 when it is slow, so a trickle is checked against the linger time per record.
            let want = self.step.min(cap - buf.len());
            let before = buf.len();
            let t0 = cx.clock_ms();
            buf.extend(self.iter.by_ref().take(want));
            if buf.len() - before < want {
                return Ok(Pull::End);
            }
            let now = cx.clock_ms();
            self.step = if now > t0 {
                1
            } else {
                (self.step * 2).min(MAX_STEP)
            };
            if deadline == u64::MAX {
                deadline = now + linger;
            } else if now >= deadline {
                return Ok(Pull::Idle);
            }
        }
        Ok(Pull::Data)
    }
}

/// How a split source's stripes are dealt to its parts.
///
/// **Unordered** (the default): from one shared counter. Each part takes the next stripe when
/// it is ready for one, with a `fetch_add`, so every stripe goes to exactly one part. A part
/// that runs slower (its thread preempted, its records costlier) takes fewer stripes instead of
/// falling behind, so the parts stay within a stripe or so of each other in the data — which is
/// what keeps their event-time watermarks together. Dealt by `k % parts`, a part that lost its
/// core fell behind by as much as the other ran ahead: on the peers' W2 at parallelism 2 a
/// window stage behind two parts held up to 25 windows open instead of 1–2 (the laggard's
/// watermark held them all): 3–6 MB more memory, and merges into tables that no longer fit
/// the cache.
///
/// **Ordered** (`.ordered()` with more than one part): stripe `k` to part `k % parts`, the
/// order an ordered consumer reads the parts' batches in (`docs/semantics.md`).
///
/// Public (hidden) for `tests/loom_split.rs`, which runs the parts' takes under loom.
#[doc(hidden)]
#[derive(Debug)]
pub struct Deal {
    parts: usize,
    shared: Option<std::sync::Arc<crate::sync::AtomicUsize>>,
    /// The seeded bug of `tests/loom_split.rs`: the counter read and written back apart.
    split: bool,
}

impl Deal {
    /// The deal of a split source of `parts` parts.
    pub fn new(parts: usize, ordered: bool) -> Self {
        Deal {
            parts: parts.max(1),
            shared: (!ordered).then(|| std::sync::Arc::new(crate::sync::AtomicUsize::new(0))),
            split: false,
        }
    }

    /// An unordered deal whose parts load the counter and store it incremented instead of
    /// one `fetch_add`: the bug the loom model must catch (two parts take the same stripe).
    pub fn with_split_take(parts: usize) -> Self {
        Deal {
            split: true,
            ..Deal::new(parts, false)
        }
    }

    /// Part `part`'s share of the deal.
    pub fn part(&self, part: usize) -> PartDeal {
        match &self.shared {
            Some(next) if self.split => PartDeal::SplitTake(std::sync::Arc::clone(next)),
            Some(next) => PartDeal::Shared(std::sync::Arc::clone(next)),
            None => PartDeal::Fixed {
                next: part,
                step: self.parts,
            },
        }
    }
}

/// One part's way to its next stripe (see [`Deal`]).
#[doc(hidden)]
#[derive(Debug)]
pub enum PartDeal {
    /// Stripes `next`, `next + step`, ...
    Fixed { next: usize, step: usize },
    /// The next stripe no part has taken.
    Shared(std::sync::Arc<crate::sync::AtomicUsize>),
    /// [`Deal::with_split_take`]'s seeded bug.
    SplitTake(std::sync::Arc<crate::sync::AtomicUsize>),
}

impl PartDeal {
    /// The index of the stripe this part reads next. Past the end of the data, every call
    /// answers past the end again.
    #[inline]
    pub fn take(&mut self) -> usize {
        use crate::sync::Ordering::Relaxed;
        match self {
            PartDeal::Fixed { next, step } => {
                let k = *next;
                *next = next.saturating_add(*step);
                k
            }
            // Relaxed: the count is the only thing shared (the data is immutable behind its
            // `Arc`), and a read-modify-write hands each value out once in any ordering.
            PartDeal::Shared(next) => next.fetch_add(1, Relaxed),
            PartDeal::SplitTake(next) => {
                let k = next.load(Relaxed);
                next.store(k + 1, Relaxed);
                k
            }
        }
    }
}

/// A head reading its part of shared data in stripes of one batch: stripe `k` is records
/// `k * batch .. (k + 1) * batch`, and which stripes are this part's is the [`Deal`]'s. Each pull
/// clones one stripe (or what is left of it) into the batch with `extend_from_slice`.
pub(crate) struct StripeHead<S, T> {
    data: std::sync::Arc<S>,
    deal: PartDeal,
    _t: std::marker::PhantomData<fn() -> T>,
}

impl<S, T> StripeHead<S, T> {
    pub(crate) fn new(data: std::sync::Arc<S>, deal: PartDeal) -> Self {
        StripeHead {
            data,
            deal,
            _t: std::marker::PhantomData,
        }
    }
}

impl<S, T> Head<crate::operator::Stripe<S>> for StripeHead<S, T>
where
    S: AsRef<[T]> + Send + Sync,
    T: Clone + Send,
{
    fn counts_input(&self) -> bool {
        // A message is a stripe; the records read are counted here, and those handed on by
        // the chain's first step (`operator::Stripes`).
        true
    }
    fn state_support(&self) -> StateSupport {
        StateSupport::Unsupported(
            "a split source is not checkpointed: use Pipeline::replayable_source".into(),
        )
    }
    fn pull(
        &mut self,
        cx: &Cx,
        buf: &mut Vec<crate::operator::Stripe<S>>,
        _flush_at: Option<u64>,
    ) -> Result<Pull, Halt> {
        let len = (*self.data).as_ref().len();
        let size = cx.batch_size().max(1);
        let start = self.deal.take().saturating_mul(size);
        if start >= len {
            return Ok(Pull::End);
        }
        let end = start.saturating_add(size).min(len);
        buf.push(crate::operator::Stripe::new(
            std::sync::Arc::clone(&self.data),
            start,
            end,
        ));
        crate::metrics::InstanceMetrics::add(&cx.metrics.records_in, (end - start) as u64);
        crate::metrics::InstanceMetrics::add(&cx.metrics.batches_in, 1);
        Ok(Pull::Data)
    }
}

/// The most records an iterator source pulls between two looks at the clock.
const MAX_STEP: usize = 256;

/// Where a reader's bytes come from.
pub(crate) struct Input {
    pub reader: Box<dyn Read + Send>,
    /// Set for pipes and terminals, which can be idle: polled before blocking reads.
    #[cfg(unix)]
    pub poll_fd: Option<std::os::fd::OwnedFd>,
    pub path: String,
    /// The longest line accepted, not counting its `\r\n` or `\n` (`max_line_bytes`).
    pub max_line: usize,
    /// Whether (and how) the input can be read again from a position.
    pub replay: Replay,
    /// Set when the input is one part of a file read by several readers (see [`ranges`]):
    /// a head's line numbers then count from the part's start, and only the first part can
    /// begin with a byte-order mark.
    pub origin: Option<std::sync::Arc<ranges::LineBase>>,
}

/// Whether an input can be replayed from a byte offset after a resume.
#[derive(Debug, Clone)]
pub(crate) enum Replay {
    /// A regular file at this path: reopened and sought to the checkpoint's offset.
    File(PathBuf),
    /// Stdin: replayable through the stdin spool (`spool_stdin`), which the source attaches
    /// to before its first read ([`attach_spool`]).
    Stdin,
    /// Not replayable, with the reason (stdin, a pipe, a reader given by the caller).
    No(&'static str),
}

impl Replay {
    /// The support a source on this input declares.
    fn support(&self) -> StateSupport {
        match self {
            Replay::File(_) => StateSupport::Snapshots,
            Replay::Stdin => StateSupport::StdinSpool,
            Replay::No(why) => StateSupport::Unsupported((*why).to_string()),
        }
    }

    /// Reopens the file at `offset`, with the truncation check of a fresh open.
    fn reopen(&self, stage: &str, shown: &str, offset: u64) -> Result<Box<dyn Read + Send>, Error> {
        let Replay::File(path) = self else {
            return Err(Error::CheckpointUnsupported {
                stage: stage.to_string(),
                reason: format!("{shown} cannot be replayed"),
            });
        };
        let io_err = |source| Error::Io {
            stage: stage.to_string(),
            path: shown.to_string(),
            source,
        };
        let mut file = File::open(path).map_err(io_err)?;
        let len = file.metadata().map_err(io_err)?.len();
        if len < offset {
            return Err(Error::Checkpoint {
                message: format!(
                    "stage `{stage}`: {shown} is {len} bytes, shorter than the position {offset} \
                     of the checkpoint: the input changed since; refusing to resume"
                ),
            });
        }
        file.seek(SeekFrom::Start(offset)).map_err(io_err)?;
        Ok(Box::new(TruncationCheck { file, read: offset }))
    }
}

/// Where a line source is in its file (part `head`).
#[derive(serde::Serialize, serde::Deserialize)]
struct LinePosition {
    /// Byte offset of the next unread line (or of the rest of a line over the cap).
    offset: u64,
    /// Lines read so far (the next line's number is one more).
    line: u64,
    /// The bytes at `offset` are the rest of a line over the cap, to be dropped.
    skip_rest: bool,
}

/// Where a block source is in its file (part `head`).
#[derive(serde::Serialize, serde::Deserialize)]
struct BlockPosition {
    offset: u64,
    /// The number of the line at `offset`.
    next_line: u64,
    skipping: bool,
    bom_checked: bool,
}

impl Input {
    /// Opens `path`, or stdin for `-`.
    pub(crate) fn open(stage: &str, path: &Path) -> Result<Input, Error> {
        let shown = path.display().to_string();
        let io_err = |source| Error::Io {
            stage: stage.to_string(),
            path: shown.clone(),
            source,
        };
        let file = if shown == "-" {
            #[cfg(unix)]
            {
                use std::os::fd::AsFd;
                File::from(
                    std::io::stdin()
                        .as_fd()
                        .try_clone_to_owned()
                        .map_err(io_err)?,
                )
            }
            #[cfg(not(unix))]
            {
                return Ok(Input {
                    reader: Box::new(std::io::stdin()),
                    path: shown,
                    max_line: MAX_LINE_BYTES,
                    replay: Replay::No(STDIN),
                    origin: None,
                });
            }
        } else {
            File::open(path).map_err(io_err)?
        };
        let meta = file.metadata().ok();
        let regular = meta.as_ref().is_some_and(|m| m.file_type().is_file());
        // Files of `/proc` and `/sys` say they are empty: their size means nothing.
        let sized = meta.is_some_and(|m| m.len() > 0);
        #[cfg(unix)]
        let poll_fd = if regular {
            None
        } else {
            use std::os::fd::AsFd;
            Some(file.as_fd().try_clone_to_owned().map_err(io_err)?)
        };
        let reader: Box<dyn Read + Send> = if regular && sized {
            Box::new(TruncationCheck { file, read: 0 })
        } else {
            Box::new(file)
        };
        let replay = if shown == "-" {
            Replay::Stdin
        } else if regular {
            Replay::File(path.to_path_buf())
        } else {
            Replay::No(
                "the input is not a regular file (a pipe or a device) and cannot be replayed",
            )
        };
        Ok(Input {
            reader,
            #[cfg(unix)]
            poll_fd,
            path: shown,
            max_line: MAX_LINE_BYTES,
            replay,
            origin: None,
        })
    }

    /// Opens part `part` of `parts` of the regular file at `path`: the lines that start in its
    /// byte range (see [`ranges`]). It cannot be replayed.
    pub(crate) fn part(
        stage: &str,
        path: &Path,
        max_line: usize,
        part: usize,
        parts: usize,
    ) -> Result<Input, Error> {
        let shown = path.display().to_string();
        let reader = ranges::RangeReader::open(path, part, parts).map_err(|source| Error::Io {
            stage: stage.to_string(),
            path: shown.clone(),
            source,
        })?;
        let start = reader.start();
        Ok(Input {
            reader: Box::new(reader),
            #[cfg(unix)]
            poll_fd: None,
            path: shown,
            max_line,
            replay: Replay::No(PARTS),
            origin: (start > 0)
                .then(|| std::sync::Arc::new(ranges::LineBase::new(path.to_path_buf(), start))),
        })
    }

    /// Sets the longest line accepted (not counting its `\r\n` or `\n`).
    pub(crate) fn with_max_line(mut self, max_line: usize) -> Input {
        self.max_line = max_line;
        self
    }
}

/// Why stdin cannot be checkpointed.
pub(crate) const STDIN: &str = "stdin cannot be replayed: set spool_stdin = true in [checkpoint] (stdin is then logged in the checkpoint directory and read back from there), or read the input from a file";

/// Why one of several readers of a file cannot be checkpointed.
const PARTS: &str = "a file read by several readers (parallelism > 1) cannot be replayed: \
                     checkpointed runs read it with one reader";

/// Why a reader given by the caller cannot be checkpointed.
pub(crate) const READER: &str =
    "a reader cannot be replayed: read a file, or use Pipeline::replayable_source";

/// A regular file's reader that, at each end of file, checks the file was not truncated under
/// it: a file now shorter than the bytes already read fails the read. (A file that grows is
/// read to the end found at that moment; bytes appended after it are not read.) Not used for a
/// file empty when opened, which includes the pseudo-files of `/proc` and `/sys`.
struct TruncationCheck {
    file: File,
    /// Bytes read so far.
    read: u64,
}

impl Read for TruncationCheck {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.file.read(buf)?;
        self.read += n as u64;
        if n == 0 && !buf.is_empty() {
            let now = self.file.metadata()?.len();
            if now < self.read {
                return Err(std::io::Error::other(format!(
                    "truncated while read (read {} bytes, now {now})",
                    self.read
                )));
            }
        }
        Ok(n)
    }
}

/// Waits until `fd` is readable or `timeout_ms` passes; true when readable (or on error, so the
/// caller's read reports it).
#[cfg(unix)]
pub(crate) fn poll_readable(fd: &impl std::os::fd::AsRawFd, timeout_ms: u64) -> bool {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let timeout = timeout_ms.min(i32::MAX as u64) as libc::c_int;
    // SAFETY: `pfd` is a valid, initialised pollfd that lives across the call, and we pass a
    // count of exactly one; `fd` is borrowed from its owner and open for the call's duration.
    let n = unsafe { libc::poll(&mut pfd, 1, timeout) };
    n != 0
}

/// A source on stdin reading through the stdin spool (`spool_stdin`): the spool's writer
/// thread (cancelled and joined when this is dropped, that is when the source's worker ends),
/// and the watch that says whether a read of the spool would block.
#[cfg(unix)]
pub(crate) struct Spooled {
    writer: crate::checkpoint::spool::SpoolWriter,
    watch: crate::checkpoint::spool::SpoolWatch,
}

#[cfg(unix)]
impl Spooled {
    /// Makes every byte spooled so far durable: a snapshot calls it before it records its
    /// position, so that a checkpointed position is always within the durable log.
    fn sync(&self) -> Result<(), Halt> {
        self.writer.sync().map_err(Halt::Failed)
    }
}
#[cfg(not(unix))]
pub(crate) struct Spooled;
#[cfg(not(unix))]
impl Spooled {
    fn sync(&self) -> Result<(), Halt> {
        Ok(())
    }
}

/// A reader of the stdin spool, with its writer and watch.
type SpooledReader = (Box<dyn Read + Send>, Spooled);

/// For a source on stdin (`replay` is [`Replay::Stdin`]) in a run whose checkpoints spool
/// stdin: opens the spool (recovering a torn tail), starts its writer on stdin, and returns a
/// reader of the spool at payload `offset` (0 on a fresh start, the checkpoint's position on a
/// resume). `None` when stdin is read directly (no checkpoints, or no spool).
#[cfg(unix)]
fn attach_spool(
    cx: &Cx,
    stage: &str,
    replay: &Replay,
    offset: u64,
) -> Result<Option<SpooledReader>, Halt> {
    use crate::checkpoint::spool::SpoolLog;
    use std::os::fd::AsFd;
    if !matches!(replay, Replay::Stdin) {
        return Ok(None);
    }
    let Some(c) = cx.run.checkpoint.lock().clone() else {
        return Ok(None);
    };
    if !c.spool_stdin {
        return Ok(None);
    }
    if c.spool_taken.swap(true, crate::sync::Ordering::AcqRel) {
        return Err(Halt::Failed(Error::CheckpointUnsupported {
            stage: stage.to_string(),
            reason: "another source reads stdin: with spool_stdin, only one source may".into(),
        }));
    }
    let (mut writer, mut reader) = SpoolLog::open(&c.dir)?;
    if offset > 0 {
        reader.seek_payload(offset)?;
    }
    log::info!(
        "stage `{stage}`: reading stdin through {} (it held {} bytes; reading from byte \
         {offset})",
        c.dir.join(crate::checkpoint::spool::SPOOL_FILE).display(),
        reader.recovered_len()
    );
    let run = std::sync::Arc::clone(&cx.run);
    reader.set_cancel(move || run.is_cancelled());
    let stdin = std::io::stdin()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|source| Error::Io {
            stage: stage.to_string(),
            path: "-".into(),
            source,
        })?;
    writer.start_fd(File::from(stdin))?;
    let watch = reader.watch();
    Ok(Some((Box::new(reader), Spooled { writer, watch })))
}

#[cfg(not(unix))]
fn attach_spool(
    _cx: &Cx,
    _stage: &str,
    _replay: &Replay,
    _offset: u64,
) -> Result<Option<SpooledReader>, Halt> {
    Ok(None)
}

/// What a read may wait for: nothing (a regular file never blocks), a pipe's or terminal's
/// descriptor, or the stdin spool.
#[derive(Clone, Copy)]
enum Wait<'a> {
    Never,
    #[cfg(unix)]
    Fd(&'a std::os::fd::OwnedFd),
    #[cfg(unix)]
    Spool(&'a crate::checkpoint::spool::SpoolWatch),
    #[cfg(not(unix))]
    #[allow(dead_code)]
    Phantom(std::marker::PhantomData<&'a ()>),
}

impl<'a> Wait<'a> {
    fn of(fd: Option<&'a PollFd>, spooled: Option<&'a Spooled>) -> Wait<'a> {
        #[cfg(unix)]
        {
            if let Some(s) = spooled {
                return Wait::Spool(&s.watch);
            }
            if let Some(fd) = fd {
                return Wait::Fd(fd);
            }
        }
        let _ = (fd, spooled);
        Wait::Never
    }
}

/// Before a read that could block: waits until the input has data or the clock passes
/// `deadline` (false then). Waits in short slices so that cancellation is seen; a regular
/// file, which never blocks, is always ready.
#[cfg(unix)]
fn wait_for_data(wait: Wait<'_>, cx: &Cx, deadline: Option<u64>) -> Result<bool, Halt> {
    if let Wait::Never = wait {
        return Ok(true);
    }
    loop {
        if cx.run.is_cancelled() {
            return Err(Halt::Done);
        }
        let now = cx.run.now_ms();
        let slice = match deadline {
            Some(d) if now >= d => return Ok(false),
            Some(d) => (d - now).min(100),
            None => 100,
        };
        let t0 = std::time::Instant::now();
        let ready = match wait {
            Wait::Fd(fd) => poll_readable(fd, slice),
            Wait::Spool(w) => w.wait(std::time::Duration::from_millis(slice)),
            Wait::Never => true,
        };
        crate::metrics::InstanceMetrics::add(
            &cx.metrics.recv_wait_ns,
            t0.elapsed().as_nanos() as u64,
        );
        if ready {
            return Ok(true);
        }
    }
}

#[cfg(not(unix))]
fn wait_for_data(_wait: Wait<'_>, _cx: &Cx, _deadline: Option<u64>) -> Result<bool, Halt> {
    Ok(true)
}

#[cfg(unix)]
type PollFd = std::os::fd::OwnedFd;
#[cfg(not(unix))]
type PollFd = ();

/// A block of whole lines read in one go, for parsing on other threads.
#[derive(Debug)]
pub(crate) struct Chunk {
    /// Line number of the first line in `data` (1-based).
    pub first_line: u64,
    /// Whole lines, each ending in `\n` (the file's last line may lack it).
    pub data: Vec<u8>,
    /// How many records the block holds: its lines, or once checked (the byte path), its
    /// non-blank lines. Channels count a block as one record; the stage that makes a block adds
    /// `records - 1` to its `records_out` so that reports count records.
    pub records: u64,
    /// Set when the block comes from one part of a file read by several readers: `first_line`
    /// then counts from the part's start, and [`Chunk::line_number`] gives the file's number.
    pub origin: Option<std::sync::Arc<ranges::LineBase>>,
}

impl Chunk {
    /// The file's number of the line numbered `line` in this block's numbering (the same unless
    /// the block comes from a part of a file read by several readers; see [`ranges`]).
    #[cold]
    pub(crate) fn line_number(&self, line: u64) -> u64 {
        self.origin
            .as_ref()
            .map_or(line, |o| o.lines_before() + line)
    }

    /// The chunk's lines without their endings, with their line numbers.
    pub(crate) fn lines(&self) -> impl Iterator<Item = (u64, &[u8])> {
        let data = self.data.strip_suffix(b"\n").unwrap_or(&self.data);
        let mut start = 0;
        let mut ends = memchr::memchr_iter(b'\n', data).chain(std::iter::once(data.len()));
        let mut line = self.first_line;
        std::iter::from_fn(move || {
            if start > data.len() {
                return None;
            }
            let end = ends.next()?;
            let l = &data[start..end];
            start = end + 1;
            line += 1;
            Some((line - 1, l.strip_suffix(b"\r").unwrap_or(l)))
        })
    }
}

/// A head reading blocks of whole lines: one [`Chunk`] per pull, flushed at once, so that a
/// message on the channel carries one block of about `chunk_size` bytes.
///
/// A UTF-8 byte-order mark at the start of the input is dropped. A line longer than the cap is
/// passed on as its first `max_line + 2` bytes (for the parser to reject with its number) and
/// the rest of it is read and dropped, so the block never holds more than the cap of one line.
pub(crate) struct ChunkHead {
    name: std::sync::Arc<str>,
    reader: Box<dyn Read + Send>,
    poll_fd: Option<PollFd>,
    path: String,
    next_line: u64,
    chunk_size: usize,
    max_line: usize,
    /// Bytes after the last newline of the previous block.
    carry: Vec<u8>,
    /// Dropping the rest of a line over the cap, up to its newline.
    skipping: bool,
    /// The start of the input was looked at for a byte-order mark.
    bom_checked: bool,
    eof: bool,
    /// Bytes read from the input so far (the file offset of the reader).
    read: u64,
    replay: Replay,
    /// Stdin read through the spool, once attached.
    spooled: Option<Spooled>,
    /// The spool was looked for (at the first pull, or by a restore).
    attached: bool,
    /// The part of the file this head reads, when several read it (see [`ranges`]).
    origin: Option<std::sync::Arc<ranges::LineBase>>,
}

impl ChunkHead {
    pub(crate) fn new(name: std::sync::Arc<str>, input: Input, chunk_size: usize) -> Self {
        ChunkHead {
            name,
            reader: input.reader,
            #[cfg(unix)]
            poll_fd: input.poll_fd,
            #[cfg(not(unix))]
            poll_fd: None,
            path: input.path,
            next_line: 1,
            chunk_size,
            max_line: input.max_line,
            carry: Vec::new(),
            skipping: false,
            // Only the file's start can hold a byte-order mark.
            bom_checked: input.origin.is_some(),
            eof: false,
            read: 0,
            replay: input.replay,
            spooled: None,
            attached: false,
            origin: input.origin,
        }
    }

    /// Reads stdin through the spool from payload `offset` when the run spools it (see
    /// [`attach_spool`]); looked at once, before the first read.
    fn attach(&mut self, cx: &Cx, offset: u64) -> Result<(), Halt> {
        self.attached = true;
        if let Some((reader, spooled)) = attach_spool(cx, &self.name, &self.replay, offset)? {
            self.reader = reader;
            self.poll_fd = None;
            self.spooled = Some(spooled);
        }
        Ok(())
    }
}

impl Head<Chunk> for ChunkHead {
    /// Counts lines read, not blocks: a block is a transport detail.
    fn counts_input(&self) -> bool {
        true
    }

    fn pull(
        &mut self,
        cx: &Cx,
        buf: &mut Vec<Chunk>,
        _flush_at: Option<u64>,
    ) -> Result<Pull, Halt> {
        if self.eof {
            return Ok(Pull::End);
        }
        if !self.attached {
            self.attach(cx, 0)?;
        }
        let mut data = std::mem::take(&mut self.carry);
        data.reserve(self.chunk_size.saturating_sub(data.len()));
        // Read until the block holds at least one whole line and is full, or the input idles.
        loop {
            let start = data.len();
            // Grow by a whole chunk when one line is longer than a chunk.
            let want = if start < self.chunk_size {
                self.chunk_size
            } else {
                start + self.chunk_size
            };
            data.resize(want, 0);
            let wait = Wait::of(self.poll_fd.as_ref(), self.spooled.as_ref());
            if !wait_for_data(wait, cx, None)? {
                data.truncate(start);
                break;
            }
            let n = loop {
                match self.reader.read(&mut data[start..]) {
                    Ok(n) => break n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(source) => {
                        return Err(Halt::Failed(Error::Io {
                            stage: self.name.to_string(),
                            path: self.path.clone(),
                            source,
                        }))
                    }
                }
            };
            data.truncate(start + n);
            self.read += n as u64;
            if n == 0 {
                self.eof = true;
                break;
            }
            if self.skipping {
                // The rest of a line over the cap: dropped up to and with its newline.
                match memchr::memchr(b'\n', &data[start..]) {
                    None => {
                        data.truncate(start);
                        continue;
                    }
                    Some(i) => {
                        data.drain(start..=start + i);
                        self.skipping = false;
                    }
                }
            }
            let line_start = memchr::memrchr(b'\n', &data).map_or(0, |i| i + 1);
            // Over the cap even if a `\r` of a `\r\n` ending is still to come.
            if data.len() - line_start > self.max_line + 1 {
                // Keep `max_line + 2` bytes of it, ended here, for the parser to reject.
                data.truncate(line_start + self.max_line + 2);
                data.push(b'\n');
                self.skipping = true;
                break;
            }
            // A stream (a pipe, the spool) sends what it has: it may not fill a block soon.
            let stream = self.poll_fd.is_some() || self.spooled.is_some();
            let full = data.len() >= self.chunk_size || stream;
            if full && memchr::memrchr(b'\n', &data).is_some() {
                break;
            }
        }
        if !self.bom_checked {
            self.bom_checked = true;
            if data.starts_with(BOM) {
                data.drain(..BOM.len());
            }
        }
        if !self.eof {
            // Keep the partial last line for the next block.
            let cut = memchr::memrchr(b'\n', &data).map_or(0, |i| i + 1);
            self.carry = data.split_off(cut);
        }
        if !data.is_empty() {
            let lines = memchr::memchr_iter(b'\n', &data).count() as u64
                + u64::from(self.eof && !data.ends_with(b"\n"));
            buf.push(Chunk {
                first_line: self.next_line,
                data,
                records: lines,
                origin: self.origin.clone(),
            });
            self.next_line += lines;
            crate::metrics::InstanceMetrics::add(&cx.metrics.records_in, lines);
            crate::metrics::InstanceMetrics::add(&cx.metrics.batches_in, 1);
        }
        Ok(if self.eof { Pull::End } else { Pull::Idle })
    }

    fn state_support(&self) -> StateSupport {
        self.replay.support()
    }

    fn snapshot(&mut self, _cx: &Cx, state: &mut InstanceState) -> Result<(), Halt> {
        if let Some(s) = &self.spooled {
            s.sync()?;
        }
        // Everything read but the partial last line kept for the next block was emitted.
        let offset = self.read - self.carry.len() as u64;
        state.put(
            "head",
            &BlockPosition {
                offset,
                next_line: self.next_line,
                skipping: self.skipping,
                bom_checked: self.bom_checked,
            },
        )?;
        state.positions.push(("head".into(), offset));
        Ok(())
    }

    fn restore(&mut self, cx: &Cx, state: &InstanceState) -> Result<(), Halt> {
        let Some(p) = state.get::<BlockPosition>("head")? else {
            return Ok(());
        };
        if matches!(self.replay, Replay::Stdin) {
            self.attach(cx, p.offset)?;
        } else {
            self.reader = self.replay.reopen(&self.name, &self.path, p.offset)?;
        }
        self.read = p.offset;
        self.next_line = p.next_line;
        self.skipping = p.skipping;
        self.bom_checked = p.bom_checked;
        self.carry.clear();
        self.eof = false;
        Ok(())
    }
}

/// The blocks of a [`ChunkHead`] for a stage that parses them: the chain after it counts their
/// lines, not the blocks (for the accounts; see `Chunk::records`).
pub(crate) struct LinesOf(pub ChunkHead);

impl Head<Chunk> for LinesOf {
    fn counts_input(&self) -> bool {
        true
    }

    fn pull(&mut self, cx: &Cx, buf: &mut Vec<Chunk>, flush_at: Option<u64>) -> Result<Pull, Halt> {
        let pulled = self.0.pull(cx, buf, flush_at)?;
        for c in buf.iter() {
            crate::metrics::InstanceMetrics::add(&cx.metrics.chain_in, c.records.saturating_sub(1));
        }
        Ok(pulled)
    }

    fn state_support(&self) -> StateSupport {
        self.0.state_support()
    }
    fn snapshot(&mut self, cx: &Cx, state: &mut InstanceState) -> Result<(), Halt> {
        self.0.snapshot(cx, state)
    }
    fn restore(&mut self, cx: &Cx, state: &InstanceState) -> Result<(), Halt> {
        self.0.restore(cx, state)
    }
}

/// The UTF-8 byte-order mark, dropped from the start of an input.
pub(crate) const BOM: &[u8] = b"\xef\xbb\xbf";

/// `ndjson.read` on the byte path: the blocks of a [`ChunkHead`], each line checked to be a
/// JSON object (an error names the file and line), blank lines dropped.
pub(crate) struct NdjsonBlockHead {
    inner: ChunkHead,
    /// What to do with a bad line: with `skip` or `dead_letter` it is cut out of its block
    /// (made blank, which the check drops), and the block keeps its good lines.
    on_error: crate::dead_letter::OnError,
    skipped: u64,
    dead_lettered: u64,
}

impl NdjsonBlockHead {
    pub(crate) fn new(inner: ChunkHead) -> Self {
        NdjsonBlockHead {
            inner,
            on_error: crate::dead_letter::OnError::Fail,
            skipped: 0,
            dead_lettered: 0,
        }
    }

    pub(crate) fn with_policy(mut self, on_error: crate::dead_letter::OnError) -> Self {
        self.on_error = on_error;
        self
    }
}

/// The byte range of line `line` (of a block whose first line is `first`), without its newline.
fn line_range(data: &[u8], first: u64, line: u64) -> std::ops::Range<usize> {
    let mut start = 0;
    for _ in first..line {
        start = memchr::memchr(b'\n', &data[start..]).map_or(data.len(), |i| start + i + 1);
    }
    let end = memchr::memchr(b'\n', &data[start..]).map_or(data.len(), |i| start + i);
    start..end
}

impl NdjsonBlockHead {
    /// Checks every line of `c` to be a JSON object (blank lines dropped), cutting out a bad
    /// line by the policy (or failing the run): `c.records` is then its records.
    pub(crate) fn check(&mut self, cx: &Cx, c: &mut Chunk) -> Result<(), Halt> {
        loop {
            let bad =
                match crate::ndjson::check_block(&mut c.data, c.first_line, self.inner.max_line) {
                    Ok(n) => {
                        c.records = n;
                        return Ok(());
                    }
                    Err(bad) => bad,
                };
            let range = line_range(&c.data, c.first_line, bad.line);
            let text = &c.data[range.clone()];
            let text = text.strip_suffix(b"\r").unwrap_or(text);
            let line = c.line_number(bad.line);
            self.reject(cx, bad.message, text, line)?;
            // Cut the line out, keeping its newline so later lines keep their numbers: the
            // check drops the blank line it leaves.
            c.data.drain(range);
        }
    }

    /// Applies the source's policy to the bad line `text` (number `line` of the file): fails
    /// the run naming the file and line, or counts it skipped or dead-lettered.
    pub(crate) fn reject(
        &mut self,
        cx: &Cx,
        message: String,
        text: &[u8],
        line: u64,
    ) -> Result<(), Halt> {
        let name = &self.inner.name;
        let path = &self.inner.path;
        let r = self.on_error.reject(
            name,
            message,
            || crate::dead_letter::Bad::Raw(String::from_utf8_lossy(text).into_owned()),
            Some(path),
            Some(line),
            |message| Error::Record {
                stage: name.to_string(),
                location: crate::error::Location {
                    path: path.clone(),
                    line,
                },
                message,
            },
        )?;
        use crate::sync::Ordering::Relaxed;
        match r {
            crate::dead_letter::Rejected::Skipped => {
                self.skipped += 1;
                cx.metrics.skipped.store(self.skipped, Relaxed);
            }
            crate::dead_letter::Rejected::DeadLettered => {
                self.dead_lettered += 1;
                cx.metrics.dead_lettered.store(self.dead_lettered, Relaxed);
            }
        }
        cx.run.source_rejected.fetch_add(1, Relaxed);
        Ok(())
    }

    /// The longest line accepted (`max_line_bytes`).
    pub(crate) fn max_line(&self) -> usize {
        self.inner.max_line
    }

    /// The blocks of the file, unchecked (for a head that checks them itself).
    pub(crate) fn pull_raw(
        &mut self,
        cx: &Cx,
        buf: &mut Vec<Chunk>,
        flush_at: Option<u64>,
    ) -> Result<Pull, Halt> {
        self.inner.pull(cx, buf, flush_at)
    }
}

impl Head<Chunk> for NdjsonBlockHead {
    fn counts_input(&self) -> bool {
        true
    }

    fn pull(&mut self, cx: &Cx, buf: &mut Vec<Chunk>, flush_at: Option<u64>) -> Result<Pull, Halt> {
        let pulled = self.inner.pull(cx, buf, flush_at)?;
        for c in buf.iter_mut() {
            self.check(cx, c)?;
            // The channel counts a block as one record (see `Chunk::records`).
            crate::metrics::InstanceMetrics::add(
                &cx.metrics.records_out,
                c.records.saturating_sub(1),
            );
            // So does the chain after this head (the accounts count records).
            crate::metrics::InstanceMetrics::add(&cx.metrics.chain_in, c.records.saturating_sub(1));
        }
        buf.retain(|c| c.records > 0);
        Ok(pulled)
    }

    fn state_support(&self) -> StateSupport {
        self.inner.state_support()
    }
    fn snapshot(&mut self, cx: &Cx, state: &mut InstanceState) -> Result<(), Halt> {
        self.inner.snapshot(cx, state)
    }
    fn restore(&mut self, cx: &Cx, state: &InstanceState) -> Result<(), Halt> {
        self.inner.restore(cx, state)
    }
}

/// The input of a stage that takes blocks: counts the records in them, not the blocks.
pub(crate) struct BlockInput(pub crate::channel::InputHead<Chunk>);

impl Head<Chunk> for BlockInput {
    fn counts_input(&self) -> bool {
        true
    }

    fn pull(&mut self, cx: &Cx, buf: &mut Vec<Chunk>, flush_at: Option<u64>) -> Result<Pull, Halt> {
        let pulled = self.0.pull(cx, buf, flush_at)?;
        if !buf.is_empty() {
            let records: u64 = buf.iter().map(|c| c.records).sum();
            crate::metrics::InstanceMetrics::add(&cx.metrics.records_in, records);
            // The chain after this head counts blocks: add the rest (the accounts count
            // records).
            crate::metrics::InstanceMetrics::add(&cx.metrics.chain_in, records - buf.len() as u64);
            crate::metrics::InstanceMetrics::add(&cx.metrics.batches_in, 1);
        }
        Ok(pulled)
    }
}

/// Reads one line (with its newline) into `raw`, cleared first, reading at most `limit` bytes:
/// a line longer than that comes back cut, so callers either reject `n > max` (with
/// `limit = max + 1`) or take the pieces. Returns the bytes read; 0 at end of input.
pub(crate) fn read_line_bounded(
    r: &mut impl BufRead,
    limit: usize,
    raw: &mut Vec<u8>,
) -> std::io::Result<usize> {
    raw.clear();
    r.take(limit as u64).read_until(b'\n', raw)
}

/// The longest line a line source accepts by default (16 MiB, `max_line_bytes`): input without
/// newlines (a binary file, `/dev/zero`) must fail with its position, not buffer without bound.
pub(crate) const MAX_LINE_BYTES: usize = 16 << 20;

/// Reads and drops the rest of a line, up to and with its newline, without buffering it; false
/// when the input ended first.
fn skip_line(r: &mut impl BufRead, consumed: &mut u64) -> std::io::Result<bool> {
    loop {
        let got = match r.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if got.is_empty() {
            return Ok(false);
        }
        match memchr::memchr(b'\n', got) {
            Some(i) => {
                r.consume(i + 1);
                *consumed += i as u64 + 1;
                return Ok(true);
            }
            None => {
                let n = got.len();
                r.consume(n);
                *consumed += n as u64;
            }
        }
    }
}

/// A head reading newline-delimited records, parsing each line with `parse`.
pub(crate) struct LineHead<T, P> {
    /// The source's own name (its stage may fuse more operators after it).
    name: std::sync::Arc<str>,
    reader: BufReader<Box<dyn Read + Send>>,
    #[cfg(unix)]
    poll_fd: Option<std::os::fd::OwnedFd>,
    path: String,
    line: u64,
    raw: Vec<u8>,
    max_line: usize,
    /// The last line was over the cap: the rest of it is dropped before the next is read.
    skip_rest: bool,
    parse: P,
    /// What to do with a line that does not parse.
    on_error: crate::dead_letter::OnError,
    skipped: u64,
    dead_lettered: u64,
    /// Byte offset of the next unread byte (lines consumed so far).
    offset: u64,
    replay: Replay,
    /// Stdin read through the spool, once attached.
    spooled: Option<Spooled>,
    /// The spool was looked for (at the first pull, or by a restore).
    attached: bool,
    /// The part of the file this head reads, when several read it (see [`ranges`]): its line
    /// numbers then count from the part's start.
    origin: Option<std::sync::Arc<ranges::LineBase>>,
    _t: std::marker::PhantomData<fn() -> T>,
}

/// Parses one line (without its newline); `None` skips it.
pub(crate) type ParseResult<T> = Result<Option<T>, String>;

impl<T, P> LineHead<T, P>
where
    P: FnMut(&[u8], u64) -> ParseResult<T> + Send,
{
    pub(crate) fn new(name: std::sync::Arc<str>, input: Input, parse: P) -> Self {
        LineHead {
            name,
            reader: BufReader::with_capacity(256 * 1024, input.reader),
            #[cfg(unix)]
            poll_fd: input.poll_fd,
            path: input.path,
            line: 0,
            raw: Vec::with_capacity(256),
            max_line: input.max_line,
            skip_rest: false,
            parse,
            on_error: crate::dead_letter::OnError::Fail,
            skipped: 0,
            dead_lettered: 0,
            offset: 0,
            replay: input.replay,
            spooled: None,
            attached: false,
            origin: input.origin,
            _t: std::marker::PhantomData,
        }
    }

    /// The same head with an error policy for lines that do not parse.
    pub(crate) fn with_policy(mut self, on_error: crate::dead_letter::OnError) -> Self {
        self.on_error = on_error;
        self
    }
}

impl<T, P> LineHead<T, P> {
    /// Counts a line the policy skipped or dead-lettered, in the stage's metrics and the run's
    /// count of lines read.
    fn count_rejected(&mut self, cx: &Cx, r: crate::dead_letter::Rejected) {
        use crate::dead_letter::Rejected;
        use crate::sync::Ordering::Relaxed;
        match r {
            Rejected::Skipped => {
                self.skipped += 1;
                cx.metrics.skipped.store(self.skipped, Relaxed);
            }
            Rejected::DeadLettered => {
                self.dead_lettered += 1;
                cx.metrics.dead_lettered.store(self.dead_lettered, Relaxed);
            }
        }
        cx.run.source_rejected.fetch_add(1, Relaxed);
    }

    fn poll_fd(&self) -> Option<&PollFd> {
        #[cfg(unix)]
        return self.poll_fd.as_ref();
        #[cfg(not(unix))]
        None
    }

    /// Reads stdin through the spool from payload `offset` when the run spools it (see
    /// [`attach_spool`]); looked at once, before the first read.
    fn attach(&mut self, cx: &Cx, offset: u64) -> Result<(), Halt> {
        self.attached = true;
        if let Some((reader, spooled)) = attach_spool(cx, &self.name, &self.replay, offset)? {
            self.reader = BufReader::with_capacity(256 * 1024, reader);
            #[cfg(unix)]
            {
                self.poll_fd = None;
            }
            self.spooled = Some(spooled);
        }
        Ok(())
    }
}

impl<T, P> Head<T> for LineHead<T, P>
where
    T: Send,
    P: FnMut(&[u8], u64) -> ParseResult<T> + Send,
{
    fn pull(&mut self, cx: &Cx, buf: &mut Vec<T>, flush_at: Option<u64>) -> Result<Pull, Halt> {
        if !self.attached {
            self.attach(cx, 0)?;
        }
        let cap = cx.batch_size();
        let mut deadline = flush_at;
        while buf.len() < cap {
            if !buf.is_empty() && deadline.is_none() {
                deadline = Some(cx.clock_ms() + cx.linger_ms());
            }
            if self.reader.buffer().is_empty()
                && !wait_for_data(
                    Wait::of(self.poll_fd(), self.spooled.as_ref()),
                    cx,
                    deadline,
                )?
            {
                return Ok(Pull::Idle);
            }
            let io_err = |source| {
                Halt::Failed(Error::Io {
                    stage: self.name.to_string(),
                    path: self.path.clone(),
                    source,
                })
            };
            if self.skip_rest {
                self.skip_rest = false;
                if !skip_line(&mut self.reader, &mut self.offset).map_err(io_err)? {
                    return Ok(Pull::End);
                }
                continue;
            }
            // At most the cap and a `\r\n`; that many bytes without a `\n` are over the cap.
            let limit = self.max_line.saturating_add(2);
            let n = read_line_bounded(&mut self.reader, limit, &mut self.raw).map_err(io_err)?;
            if n == 0 {
                return Ok(Pull::End);
            }
            self.offset += n as u64;
            self.line += 1;
            let mut line = &self.raw[..];
            let whole = line.ends_with(b"\n") || n < limit;
            line = line.strip_suffix(b"\n").unwrap_or(line);
            line = line.strip_suffix(b"\r").unwrap_or(line);
            let parsed = if !whole || line.len() > self.max_line {
                // The rest is dropped at the next read: a policy that goes on reads on from the
                // next line, and one that stops does not wait for a newline that never comes.
                self.skip_rest = !whole;
                Err(crate::ndjson::line_too_long(self.max_line))
            } else {
                // Only the file's start can hold a byte-order mark.
                if self.line == 1 && self.origin.is_none() {
                    line = line.strip_prefix(BOM).unwrap_or(line);
                }
                (self.parse)(line, self.line)
            };
            match parsed {
                Ok(Some(x)) => buf.push(x),
                Ok(None) => {}
                Err(message) => {
                    let at = match &self.origin {
                        Some(o) => o.lines_before() + self.line,
                        None => self.line,
                    };
                    let (name, path) = (&self.name, &self.path);
                    let r = self.on_error.reject(
                        name,
                        message,
                        || crate::dead_letter::Bad::Raw(String::from_utf8_lossy(line).into_owned()),
                        Some(path),
                        Some(at),
                        |message| Error::Record {
                            stage: name.to_string(),
                            location: Location {
                                path: path.clone(),
                                line: at,
                            },
                            message,
                        },
                    )?;
                    self.count_rejected(cx, r);
                }
            }
        }
        Ok(Pull::Data)
    }

    fn state_support(&self) -> StateSupport {
        self.replay.support()
    }

    fn snapshot(&mut self, _cx: &Cx, state: &mut InstanceState) -> Result<(), Halt> {
        if let Some(s) = &self.spooled {
            s.sync()?;
        }
        state.put(
            "head",
            &LinePosition {
                offset: self.offset,
                line: self.line,
                skip_rest: self.skip_rest,
            },
        )?;
        state.positions.push(("head".into(), self.offset));
        Ok(())
    }

    fn restore(&mut self, cx: &Cx, state: &InstanceState) -> Result<(), Halt> {
        let Some(p) = state.get::<LinePosition>("head")? else {
            return Ok(());
        };
        if matches!(self.replay, Replay::Stdin) {
            self.attach(cx, p.offset)?;
        } else {
            let reader = self.replay.reopen(&self.name, &self.path, p.offset)?;
            self.reader = BufReader::with_capacity(256 * 1024, reader);
        }
        self.offset = p.offset;
        self.line = p.line;
        self.skip_rest = p.skip_rest;
        Ok(())
    }
}

/// Parses a line as UTF-8 text.
pub(crate) fn parse_text(line: &[u8]) -> ParseResult<String> {
    match std::str::from_utf8(line) {
        Ok(s) => Ok(Some(s.to_string())),
        Err(e) => Err(format!("invalid UTF-8: {e}")),
    }
}

/// Parses a line as one JSON value; blank lines are skipped.
pub(crate) fn parse_json<T: serde::de::DeserializeOwned>(line: &[u8]) -> ParseResult<T> {
    if line.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    serde_json::from_slice(line)
        .map(Some)
        .map_err(|e| format!("invalid JSON: {e}"))
}

/// A head receiving records pushed into a crossbeam channel by code outside the pipeline. Unlike
/// an iterator it can wait with a deadline, so a partial batch is flushed on time even while the
/// sender is silent. The source ends when every sender is dropped.
pub(crate) struct ChannelSourceHead<T> {
    rx: crossbeam_channel::Receiver<T>,
}

impl<T> ChannelSourceHead<T> {
    pub(crate) fn new(rx: crossbeam_channel::Receiver<T>) -> Self {
        ChannelSourceHead { rx }
    }
}

impl<T: Send> Head<T> for ChannelSourceHead<T> {
    fn state_support(&self) -> StateSupport {
        StateSupport::Unsupported(
            "a channel source cannot be replayed: use Pipeline::replayable_source".into(),
        )
    }
    fn pull(&mut self, cx: &Cx, buf: &mut Vec<T>, flush_at: Option<u64>) -> Result<Pull, Halt> {
        use crossbeam_channel::{select, TryRecvError};
        let cap = cx.batch_size();
        let mut deadline = flush_at;
        while buf.len() < cap {
            match self.rx.try_recv() {
                Ok(x) => {
                    buf.push(x);
                    continue;
                }
                Err(TryRecvError::Disconnected) => return Ok(Pull::End),
                Err(TryRecvError::Empty) => {}
            }
            if !buf.is_empty() && deadline.is_none() {
                deadline = Some(cx.clock_ms() + cx.linger_ms());
            }
            let t0 = std::time::Instant::now();
            let got = match deadline {
                Some(at) => {
                    let wait = std::time::Duration::from_millis(at.saturating_sub(cx.run.now_ms()));
                    select! {
                        recv(self.rx) -> m => m.ok(),
                        recv(cx.run.cancel_rx) -> _ => return Err(Halt::Done),
                        default(wait) => {
                            crate::metrics::InstanceMetrics::add(&cx.metrics.recv_wait_ns, t0.elapsed().as_nanos() as u64);
                            return Ok(Pull::Idle);
                        }
                    }
                }
                None => select! {
                    recv(self.rx) -> m => m.ok(),
                    recv(cx.run.cancel_rx) -> _ => return Err(Halt::Done),
                },
            };
            crate::metrics::InstanceMetrics::add(
                &cx.metrics.recv_wait_ns,
                t0.elapsed().as_nanos() as u64,
            );
            match got {
                Some(x) => buf.push(x),
                None => return Ok(Pull::End),
            }
        }
        Ok(Pull::Data)
    }
}

/// A source that can be read again from a position: what a pipeline with checkpoints needs
/// of a source, so that a resumed run reads on from where its checkpoint was taken.
///
/// At every checkpoint the engine asks for [`position`](Replayable::position) (after every
/// item it took from [`next`](Replayable::next) is in), stores it, and on `--resume` hands it
/// back to [`seek`](Replayable::seek) before the first `next`. `Position` must be serde; it
/// should be small (an offset, an id, a cursor), not the data.
///
/// Ready-made: integer ranges (`0..n`, position = the next value) and [`ReplayVec`].
///
/// # Examples
///
/// A source over a `Vec` (what [`ReplayVec`] does), in a pipeline:
///
/// ```
/// use millrace::{BoxError, Pipeline, Replayable};
///
/// struct Lines { lines: Vec<String>, next: usize }
///
/// impl Replayable for Lines {
///     type Item = String;
///     type Position = usize;
///     fn position(&self) -> usize { self.next }
///     fn seek(&mut self, to: usize) -> Result<(), BoxError> {
///         if to > self.lines.len() {
///             return Err(format!("position {to} is past the end").into());
///         }
///         self.next = to;
///         Ok(())
///     }
///     fn next(&mut self) -> Option<String> {
///         let line = self.lines.get(self.next).cloned();
///         self.next += line.is_some() as usize;
///         line
///     }
///     fn offset(position: &usize) -> Option<u64> { Some(*position as u64) }
/// }
///
/// let p = Pipeline::new();
/// let src = Lines { lines: vec!["a".into(), "b".into()], next: 0 };
/// let out = p.replayable_source("lines", src).collect();
/// p.run().unwrap();
/// assert_eq!(out.take(), vec!["a", "b"]);
/// ```
pub trait Replayable: Send + 'static {
    /// What the source yields.
    type Item: Send + 'static;
    /// Where the source is: enough to [`seek`](Replayable::seek) back there in a new process.
    type Position: serde::Serialize + serde::de::DeserializeOwned;
    /// The position of the item the next [`next`](Replayable::next) returns.
    fn position(&self) -> Self::Position;
    /// Goes to `position` (one [`position`](Replayable::position) returned, maybe in an
    /// earlier process). An error fails the resume, naming the stage.
    fn seek(&mut self, position: Self::Position) -> Result<(), crate::BoxError>;
    /// The next item; `None` at the end.
    fn next(&mut self) -> Option<Self::Item>;
    /// A number that grows with the position (a byte offset, an index), for
    /// `millrace checkpoint verify`'s check that positions never go back; `None` (the
    /// default) when there is none.
    fn offset(_position: &Self::Position) -> Option<u64> {
        None
    }
}

macro_rules! replayable_range {
    ($($t:ty),*) => {$(
        /// The range's values in order; the position is the next value.
        impl Replayable for std::ops::Range<$t> {
            type Item = $t;
            type Position = $t;
            fn position(&self) -> $t {
                self.start
            }
            fn seek(&mut self, position: $t) -> Result<(), crate::BoxError> {
                self.start = position;
                Ok(())
            }
            fn next(&mut self) -> Option<$t> {
                Iterator::next(self)
            }
            fn offset(position: &$t) -> Option<u64> {
                u64::try_from(*position).ok()
            }
        }
    )*};
}
replayable_range!(u8, u16, u32, u64, usize, i8, i16, i32, i64, isize);

/// A `Vec` as a [`Replayable`] source: yields clones of its items in order; the position is
/// the index of the next one.
///
/// ```
/// let p = millrace::Pipeline::new();
/// let out = p.replayable_source("v", millrace::ReplayVec::from(vec!["a", "b"])).collect();
/// p.run().unwrap();
/// assert_eq!(out.take(), vec!["a", "b"]);
/// ```
#[derive(Debug, Clone)]
pub struct ReplayVec<T> {
    items: Vec<T>,
    next: usize,
}

impl<T> From<Vec<T>> for ReplayVec<T> {
    fn from(items: Vec<T>) -> Self {
        ReplayVec { items, next: 0 }
    }
}

impl<T: Clone + Send + 'static> Replayable for ReplayVec<T> {
    type Item = T;
    type Position = usize;
    fn position(&self) -> usize {
        self.next
    }
    fn seek(&mut self, position: usize) -> Result<(), crate::BoxError> {
        if position > self.items.len() {
            return Err(format!(
                "position {position} is past the end ({} items)",
                self.items.len()
            )
            .into());
        }
        self.next = position;
        Ok(())
    }
    fn next(&mut self) -> Option<T> {
        let x = self.items.get(self.next).cloned();
        self.next += usize::from(x.is_some());
        x
    }
    fn offset(position: &usize) -> Option<u64> {
        Some(*position as u64)
    }
}

/// The head of a [`Replayable`] source.
pub(crate) struct ReplayHead<R> {
    src: R,
    /// The source ended.
    done: bool,
}

impl<R> ReplayHead<R> {
    pub(crate) fn new(src: R) -> Self {
        ReplayHead { src, done: false }
    }
}

impl<R: Replayable> Head<R::Item> for ReplayHead<R> {
    fn pull(
        &mut self,
        cx: &Cx,
        buf: &mut Vec<R::Item>,
        flush_at: Option<u64>,
    ) -> Result<Pull, Halt> {
        if self.done {
            return Ok(Pull::End);
        }
        let cap = cx.batch_size();
        let deadline = flush_at.unwrap_or_else(|| cx.clock_ms() + cx.linger_ms());
        while buf.len() < cap {
            match self.src.next() {
                Some(x) => buf.push(x),
                None => {
                    self.done = true;
                    return Ok(Pull::End);
                }
            }
            // A look at the (coarse, relaxed) clock now and then: a slow source still
            // flushes partial batches on time.
            if buf.len() % 64 == 0 && cx.clock_ms() >= deadline {
                return Ok(Pull::Idle);
            }
        }
        Ok(Pull::Data)
    }

    fn state_support(&self) -> StateSupport {
        StateSupport::Snapshots
    }

    fn snapshot(&mut self, _cx: &Cx, state: &mut InstanceState) -> Result<(), Halt> {
        let p = self.src.position();
        if let Some(o) = R::offset(&p) {
            state.positions.push(("head".into(), o));
        }
        Ok(state.put("head", &p)?)
    }

    fn restore(&mut self, cx: &Cx, state: &InstanceState) -> Result<(), Halt> {
        if let Some(p) = state.get::<R::Position>("head")? {
            self.src.seek(p).map_err(|e| Error::Checkpoint {
                message: format!(
                    "stage `{}`: cannot seek the source to the checkpoint's position: {e}",
                    cx.stage
                ),
            })?;
            self.done = false;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::InstanceMetrics;
    use crate::runtime::RunShared;
    use std::sync::Arc;

    fn cx() -> Cx {
        Cx {
            run: RunShared::new(crate::Options::default()),
            stage: "read".into(),
            instance: 0,
            source: false,
            metrics: Arc::new(InstanceMetrics::default()),
        }
    }

    /// `long` bytes of `x`, then `tail`, handed out at most `step` bytes per read.
    struct Gen {
        long: usize,
        tail: Vec<u8>,
        at: usize,
        step: usize,
    }

    impl Read for Gen {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let total = self.long + self.tail.len();
            let n = buf.len().min(self.step).min(total - self.at);
            for b in &mut buf[..n] {
                *b = if self.at < self.long {
                    b'x'
                } else {
                    self.tail[self.at - self.long]
                };
                self.at += 1;
            }
            Ok(n)
        }
    }

    fn input(head: &[u8], long: usize, tail: &[u8], step: usize, max_line: usize) -> Input {
        let mut t = head.to_vec();
        // The generated run of `x` goes after `head`: put `head` in front of it.
        let gen = Gen {
            long,
            tail: tail.to_vec(),
            at: 0,
            step,
        };
        Input {
            reader: Box::new(std::io::Cursor::new(std::mem::take(&mut t)).chain(gen)),
            #[cfg(unix)]
            poll_fd: None,
            path: "in".into(),
            max_line,
            replay: Replay::No(READER),
            origin: None,
        }
    }

    /// Pulls until the end, collecting records and per-line errors (going on after each, as
    /// a skipping policy does).
    fn drain_lines(input: Input) -> (Vec<String>, Vec<(u64, String)>, usize) {
        let mut head = LineHead::new("read".into(), input, |l: &[u8], _| parse_text(l));
        let cx = cx();
        let (mut out, mut errors) = (Vec::new(), Vec::new());
        loop {
            let mut buf = Vec::new();
            match head.pull(&cx, &mut buf, None) {
                Ok(p) => {
                    out.append(&mut buf);
                    if matches!(p, Pull::End) {
                        break;
                    }
                }
                Err(Halt::Failed(Error::Record {
                    location, message, ..
                })) => {
                    out.append(&mut buf);
                    errors.push((location.line, message));
                }
                Err(other) => panic!("{other:?}"),
            }
        }
        (out, errors, head.raw.capacity())
    }

    #[test]
    fn a_line_over_the_cap_is_a_record_error_and_reading_goes_on_at_the_next_line() {
        // 10 MiB without a newline under a 1 KiB cap, read 4 KiB at a time.
        let (out, errors, held) = drain_lines(input(
            b"\xef\xbb\xbffirst\r\n",
            10 << 20,
            b"\r\nnext\nx\r",
            4096,
            1024,
        ));
        assert_eq!(out, ["first", "next", "x"]);
        assert_eq!(
            errors,
            [(2, "line longer than max_line_bytes (1024)".to_string())]
        );
        assert!(held <= 4096, "the line buffer grew to {held} bytes");
        // Exactly the cap is accepted, with either ending; one more byte is not.
        for (text, ok, bad) in [
            (
                &b"abcd\nabcd\r\nabcde\nabcd"[..],
                vec!["abcd", "abcd", "abcd"],
                vec![3],
            ),
            (b"abcde", vec![], vec![1]),
            (b"abcd\r", vec!["abcd"], vec![]),
        ] {
            let (out, errors, _) = drain_lines(input(text, 0, b"", 3, 4));
            assert_eq!(out, ok, "{:?}", String::from_utf8_lossy(text));
            assert_eq!(errors.iter().map(|e| e.0).collect::<Vec<_>>(), bad);
        }
        // The last line over the cap, at the end of input.
        let (out, errors, _) = drain_lines(input(b"a\n", 50, b"", 7, 8));
        assert_eq!((out, errors.len()), (vec!["a".to_string()], 1));
    }

    /// What the byte path and the parallel parse path see: blocks whose lines are checked.
    fn drain_chunks(input: Input, chunk: usize) -> (Vec<Chunk>, usize) {
        let mut head = ChunkHead::new("read".into(), input, chunk);
        let cx = cx();
        let (mut out, mut most) = (Vec::new(), 0);
        loop {
            let mut buf = Vec::new();
            let p = head.pull(&cx, &mut buf, None).unwrap();
            most = most.max(buf.iter().map(|c| c.data.len()).sum());
            out.append(&mut buf);
            if matches!(p, Pull::End) {
                return (out, most);
            }
        }
    }

    #[test]
    fn blocks_cut_a_line_over_the_cap_and_drop_its_rest() {
        let (chunks, most) = drain_chunks(
            input(
                b"\xef\xbb\xbf{\"a\":1}\r\n",
                10 << 20,
                b"\r\n{\"b\":2}\n{\"c\":3}",
                4096,
                1024,
            ),
            512,
        );
        assert!(most <= 4096, "a block held {most} bytes");
        let mut lines = Vec::new();
        for c in &chunks {
            for (n, text) in c.lines() {
                lines.push((n, crate::ndjson::parse_line(text, 1024)));
            }
        }
        let want: Vec<(u64, Result<serde_json::Value, String>)> = vec![
            (1, Ok(serde_json::json!({"a": 1}))),
            (2, Err("line longer than max_line_bytes (1024)".into())),
            (3, Ok(serde_json::json!({"b": 2}))),
            (4, Ok(serde_json::json!({"c": 3}))),
        ];
        assert_eq!(lines, want);
        assert_eq!(chunks.iter().map(|c| c.records).sum::<u64>(), 4);
        // The byte path's check says the same of the same blocks.
        let mut errors = Vec::new();
        for c in chunks {
            let mut data = c.data.clone();
            if let Err(bad) = crate::ndjson::check_block(&mut data, c.first_line, 1024) {
                errors.push((bad.line, bad.message));
            }
        }
        assert_eq!(
            errors,
            [(2, "line longer than max_line_bytes (1024)".to_string())]
        );
    }

    #[test]
    fn a_file_shorter_at_its_end_than_what_was_read_fails_the_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("in");
        std::fs::write(&path, vec![b'x'; 1000]).unwrap();
        let mut input = Input::open("read", &path).unwrap();
        let mut buf = vec![0; 600];
        assert_eq!(input.reader.read(&mut buf).unwrap(), 600);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(100)
            .unwrap();
        let e = input.reader.read(&mut buf).unwrap_err();
        assert_eq!(
            e.to_string(),
            "truncated while read (read 600 bytes, now 100)"
        );
        // A pseudo-file that says it is empty is read whole.
        let mut input = Input::open("read", Path::new("/proc/self/status")).unwrap();
        let mut all = String::new();
        input.reader.read_to_string(&mut all).unwrap();
        assert!(all.contains("Pid:"), "{all}");
        // Growing is fine: read to the end found.
        std::fs::write(&path, vec![b'x'; 10]).unwrap();
        let mut input = Input::open("read", &path).unwrap();
        let mut all = Vec::new();
        input.reader.read_to_end(&mut all).unwrap();
        assert_eq!(all.len(), 10);
    }
}
