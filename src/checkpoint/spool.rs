//! The stdin spool (`spool_stdin = true`): stdin appended to a CRC-framed log in the
//! checkpoint directory (`stdin.spool`) and read back from there, so that a pipeline reading
//! stdin can be resumed like one reading a file.
//!
//! This module owns the log's format, its writer thread and its reader:
//! - **Format**: frames `len: u32 LE | crc32c(payload): u32 LE | payload`, `1 <= len <= 64
//!   KiB`. The *payload stream* is the frames' payloads in order: exactly the bytes stdin gave;
//!   positions (a source's checkpointed offset) are offsets in it.
//! - **Writer** ([`SpoolWriter`]): a thread (spawned through `crate::sync::thread`, joined by
//!   [`SpoolWriter::join`] or on drop) reads the input in pieces of at most 64 KiB and appends
//!   one frame per piece. It stops at end of input, on an error, or when cancelled (seen between
//!   reads; with [`SpoolWriter::start_fd`] the input is polled in slices of 100 ms so that a
//!   silent stdin does not hold it). [`SpoolWriter::sync`] (or [`SpoolReader::sync`]) fsyncs the
//!   log: a source's snapshot calls it *before* recording its position, so a checkpointed
//!   position is always within the durable log. An fsync error is fatal.
//! - **Reader** ([`SpoolReader`], `std::io::Read`): reads the payload stream from any offset
//!   ([`SpoolReader::seek_payload`]), verifying each frame's CRC, holding at most one frame
//!   (64 KiB); at the end of what is written it blocks on the shared condvar (a wait with a
//!   100 ms deadline in a loop, so cancellation is seen) until the writer appends more, ends,
//!   fails or is cancelled.
//! - **Recovery** ([`SpoolLog::open`]): the log is scanned; a torn last frame (a crash
//!   mid-append: a short header or payload, a last frame whose checksum fails, or a zero-filled
//!   tail) is truncated away. A bad frame *followed by more data* is corruption, and opening
//!   fails naming its byte offset.
//!
//! **Resuming.** A resumed run appends its stdin after the existing log: the new process's
//! stdin is taken to be the *rest* of the input. Either re-pipe the remainder (what was not yet
//! spooled), or, when the log already holds all of it, give an empty stdin (`< /dev/null`).
//! Re-piping the whole input would append it twice.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::Error;
use crate::sync::{thread, Arc, AtomicU64, Condvar, Mutex, Ordering};

/// The log's file name in the checkpoint directory.
pub const SPOOL_FILE: &str = "stdin.spool";
/// The largest payload of one frame (and the writer's read size).
pub const MAX_FRAME: usize = 64 * 1024;
const HEADER: usize = 8;
/// How long a blocked reader or a polling writer waits before looking at cancellation again.
const SLICE: Duration = Duration::from_millis(100);

#[derive(Debug, Default)]
struct State {
    /// Payload bytes in complete frames.
    payload_len: u64,
    /// File bytes of complete frames.
    file_len: u64,
    eof: bool,
    error: Option<String>,
    cancelled: bool,
}

#[derive(Debug)]
struct Shared {
    path: PathBuf,
    /// Opened for appending (the writer's; `sync` fsyncs through it).
    file: File,
    state: Mutex<State>,
    cond: Condvar,
}

impl Shared {
    fn sync(&self) -> Result<(), Error> {
        self.file.sync_data().map_err(|source| Error::CheckpointIo {
            op: "fsync",
            path: self.path.display().to_string(),
            source,
        })
    }

    fn cancel(&self) {
        self.state.lock().cancelled = true;
        self.cond.notify_all();
    }
}

/// The spool log in a checkpoint directory.
#[derive(Debug)]
#[non_exhaustive]
pub struct SpoolLog;

impl SpoolLog {
    /// Opens (creating it if missing) `dir/stdin.spool`, truncating a torn last frame, and
    /// returns its writer (not started) and a reader at payload offset 0.
    pub fn open(dir: impl AsRef<Path>) -> Result<(SpoolWriter, SpoolReader), Error> {
        let path = dir.as_ref().join(SPOOL_FILE);
        let io_err = |op: &'static str| {
            let path = path.display().to_string();
            move |source| Error::CheckpointIo { op, path, source }
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)
            .map_err(io_err("open"))?;
        // The file's entry must be as durable as the bytes a snapshot fsyncs into it: a crash
        // could otherwise take the whole log (created here, never in the directory's fsync)
        // while checkpoints hold positions in it.
        std::fs::File::open(dir.as_ref())
            .and_then(|d| d.sync_all())
            .map_err(|source| Error::CheckpointIo {
                op: "fsync",
                path: dir.as_ref().display().to_string(),
                source,
            })?;
        let (file_len, payload_len) = recover(&file, &path)?;
        let reader_file = File::open(&path).map_err(io_err("open"))?;
        let shared = Arc::new(Shared {
            path,
            file,
            state: Mutex::new(State {
                payload_len,
                file_len,
                ..State::default()
            }),
            cond: Condvar::new(),
        });
        Ok((
            SpoolWriter {
                shared: Arc::clone(&shared),
                thread: None,
            },
            SpoolReader {
                shared,
                file: reader_file,
                recovered: payload_len,
                next_frame: 0,
                frame: Vec::new(),
                frame_off: 0,
                cancel: None,
                consumed: Arc::new(AtomicU64::new(0)),
            },
        ))
    }
}

/// Why a frame whose header and payload are these is bad, if it is.
fn check_frame(header: &[u8; HEADER], payload: &[u8]) -> Result<(), String> {
    let crc = u32::from_le_bytes(header[4..].try_into().expect("4 bytes"));
    let actual = crc32c::crc32c(payload);
    if crc == actual {
        Ok(())
    } else {
        Err(format!(
            "checksum mismatch (stored {crc:08x}, computed {actual:08x})"
        ))
    }
}

fn frame_len(header: &[u8; HEADER]) -> Result<usize, String> {
    let len = u32::from_le_bytes(header[..4].try_into().expect("4 bytes")) as usize;
    if len == 0 || len > MAX_FRAME {
        Err(format!("bad frame length {len}"))
    } else {
        Ok(len)
    }
}

/// What a scan of the log found: the file and payload bytes of its complete frames, and the
/// first bad frame after them, if any (whether it can be a torn append, and why it is bad).
struct Scan {
    file_len: u64,
    payload_len: u64,
    bad: Option<(bool, String)>,
    len: u64,
}

/// Reads the log's frames from the start (changing nothing).
fn scan(file: &File, path: &Path) -> Result<Scan, Error> {
    let io_err = |op: &'static str| {
        let path = path.display().to_string();
        move |source| Error::CheckpointIo { op, path, source }
    };
    let len = file.metadata().map_err(io_err("stat"))?.len();
    let mut pos = 0u64;
    let mut payload = 0u64;
    let mut buf = vec![0u8; MAX_FRAME];
    let bad = loop {
        if pos == len {
            break None;
        }
        if len - pos < HEADER as u64 {
            break Some((true, "torn frame header".to_string()));
        }
        let mut header = [0u8; HEADER];
        file.read_exact_at(&mut header, pos)
            .map_err(io_err("read"))?;
        let n = match frame_len(&header) {
            Ok(n) => n,
            Err(why) => break Some((false, why)),
        };
        if len - pos - (HEADER as u64) < n as u64 {
            break Some((true, "torn frame payload".to_string()));
        }
        file.read_exact_at(&mut buf[..n], pos + HEADER as u64)
            .map_err(io_err("read"))?;
        if let Err(why) = check_frame(&header, &buf[..n]) {
            // A bad last frame is a torn append (its pages half written).
            let last = pos + (HEADER + n) as u64 == len;
            break Some((last, why));
        }
        pos += (HEADER + n) as u64;
        payload += n as u64;
    };
    let bad = match bad {
        Some((false, why)) if zeros_from(file, pos, len).map_err(io_err("read"))? => {
            Some((true, why))
        }
        other => other,
    };
    Ok(Scan {
        file_len: pos,
        payload_len: payload,
        bad,
        len,
    })
}

impl Scan {
    /// Fails on corruption (a bad frame followed by data that is not a crash's zeros).
    fn check(&self, path: &Path) -> Result<(), Error> {
        match &self.bad {
            Some((false, why)) => Err(Error::Checkpoint {
                message: format!(
                    "{}: frame at byte {}: {why}, and data follows it: the spool is corrupt",
                    path.display(),
                    self.file_len
                ),
            }),
            _ => Ok(()),
        }
    }
}

/// Scans the log; truncates a torn tail; returns (file bytes, payload bytes) of its complete
/// frames.
fn recover(file: &File, path: &Path) -> Result<(u64, u64), Error> {
    let found = scan(file, path)?;
    found.check(path)?;
    if let Some((_, why)) = &found.bad {
        log::warn!(
            "{}: dropping a torn last frame at byte {} ({why}; {} bytes)",
            path.display(),
            found.file_len,
            found.len - found.file_len
        );
        let io_err = |op: &'static str| {
            let path = path.display().to_string();
            move |source| Error::CheckpointIo { op, path, source }
        };
        file.set_len(found.file_len).map_err(io_err("truncate"))?;
        file.sync_data().map_err(io_err("fsync"))?;
    }
    Ok((found.file_len, found.payload_len))
}

/// The bytes of stdin the spool in `dir` holds (its complete frames; a torn last frame does
/// not count), or `None` when there is no spool. Reads only: `checkpoint list` and the start
/// of a run use it.
pub fn spooled_len(dir: impl AsRef<Path>) -> Result<Option<u64>, Error> {
    let path = dir.as_ref().join(SPOOL_FILE);
    let file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(Error::CheckpointIo {
                op: "open",
                path: path.display().to_string(),
                source,
            })
        }
    };
    let found = scan(&file, &path)?;
    found.check(&path)?;
    Ok(Some(found.payload_len))
}

/// Removes the spool in `dir`, if there is one, and makes the removal durable (a run that
/// succeeded, or a fresh start).
pub fn remove(dir: impl AsRef<Path>) -> Result<(), Error> {
    let dir = dir.as_ref();
    let path = dir.join(SPOOL_FILE);
    let io_err = |op: &'static str, p: &Path| {
        let path = p.display().to_string();
        move |source| Error::CheckpointIo { op, path, source }
    };
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err("remove", &path)(e)),
    }
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync", dir))
}

/// Whether the file holds only zero bytes from `pos` to `len` (a crash's zero-filled tail).
fn zeros_from(file: &File, mut pos: u64, len: u64) -> io::Result<bool> {
    let mut buf = vec![0u8; MAX_FRAME];
    while pos < len {
        let n = ((len - pos) as usize).min(buf.len());
        file.read_exact_at(&mut buf[..n], pos)?;
        if buf[..n].iter().any(|&b| b != 0) {
            return Ok(false);
        }
        pos += n as u64;
    }
    Ok(true)
}

/// Appends the input to the spool log on a thread of its own (see the module docs).
#[derive(Debug)]
pub struct SpoolWriter {
    shared: Arc<Shared>,
    thread: Option<thread::JoinHandle<()>>,
}

impl SpoolWriter {
    /// Starts the writer thread on `input` (cancellation is seen between reads: use
    /// [`start_fd`](Self::start_fd) for an input that may block for long, such as stdin).
    pub fn start<R: Read + Send + 'static>(&mut self, input: R) -> Result<(), Error> {
        self.spawn(input, |_| true)
    }

    /// Starts the writer thread on `input`, polling its descriptor so that cancellation is seen
    /// within 100 ms even while it is silent.
    pub fn start_fd<R>(&mut self, input: R) -> Result<(), Error>
    where
        R: Read + std::os::fd::AsRawFd + Send + 'static,
    {
        self.spawn(input, |r| {
            crate::source::poll_readable(r, SLICE.as_millis() as u64)
        })
    }

    fn spawn<R: Read + Send + 'static>(
        &mut self,
        input: R,
        ready: fn(&R) -> bool,
    ) -> Result<(), Error> {
        if self.thread.is_some() {
            return Err(Error::Checkpoint {
                message: "the stdin spool's writer is already started".into(),
            });
        }
        let shared = Arc::clone(&self.shared);
        let handle = thread::Builder::new()
            .name("stdin-spool".into())
            .spawn(move || write_loop(input, &shared, ready))
            .map_err(|e| Error::Checkpoint {
                message: format!("cannot start the stdin spool's writer: {e}"),
            })?;
        self.thread = Some(handle);
        Ok(())
    }

    /// Makes every byte appended so far durable (called by the source's snapshot before it
    /// records its position). An fsync error is fatal: [`Error::CheckpointIo`] with `op:
    /// "fsync"`.
    pub fn sync(&self) -> Result<(), Error> {
        self.shared.sync()
    }

    /// Asks the writer to stop (seen between reads) and wakes blocked readers, which then fail
    /// with "cancelled".
    pub fn cancel(&self) {
        self.shared.cancel();
    }

    /// Payload bytes spooled so far, and whether the input has ended.
    pub fn progress(&self) -> (u64, bool) {
        let s = self.shared.state.lock();
        (s.payload_len, s.eof)
    }

    /// Waits for the writer thread to end (at end of input, an error or cancellation) and
    /// returns its error, if it failed.
    pub fn join(mut self) -> Result<(), Error> {
        self.join_thread();
        match self.shared.state.lock().error.clone() {
            None => Ok(()),
            Some(message) => Err(Error::Checkpoint { message }),
        }
    }

    fn join_thread(&mut self) {
        if let Some(t) = self.thread.take() {
            // The loop catches nothing that could panic but a bug; a panic is reported as the
            // writer's error so that readers do not wait forever.
            if t.join().is_err() {
                let mut s = self.shared.state.lock();
                s.error
                    .get_or_insert_with(|| "the stdin spool's writer panicked".into());
                drop(s);
                self.shared.cond.notify_all();
            }
        }
    }
}

impl Drop for SpoolWriter {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.shared.cancel();
            self.join_thread();
        }
    }
}

fn write_loop<R: Read>(mut input: R, shared: &Shared, ready: fn(&R) -> bool) {
    // One frame: header and at most 64 KiB of payload, reused.
    let mut frame = vec![0u8; HEADER + MAX_FRAME];
    let end = |error: Option<String>| {
        let mut s = shared.state.lock();
        match error {
            None => s.eof = true,
            Some(e) => s.error = Some(e),
        }
        drop(s);
        shared.cond.notify_all();
    };
    loop {
        if shared.state.lock().cancelled {
            return;
        }
        if !ready(&input) {
            continue;
        }
        let n = match input.read(&mut frame[HEADER..]) {
            Ok(0) => return end(None),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return end(Some(format!("reading stdin for the spool: {e}"))),
        };
        let crc = crc32c::crc32c(&frame[HEADER..HEADER + n]);
        frame[..4].copy_from_slice(&(n as u32).to_le_bytes());
        frame[4..HEADER].copy_from_slice(&crc.to_le_bytes());
        if let Err(e) = (&shared.file).write_all(&frame[..HEADER + n]) {
            return end(Some(format!("appending to {}: {e}", shared.path.display())));
        }
        let mut s = shared.state.lock();
        s.payload_len += n as u64;
        s.file_len += (HEADER + n) as u64;
        drop(s);
        shared.cond.notify_all();
    }
}

/// Reads the spooled payload stream (see the module docs).
pub struct SpoolReader {
    shared: Arc<Shared>,
    /// A read-only handle of its own (positioned reads: no shared offset).
    file: File,
    /// Payload bytes in the log when it was opened (after recovery).
    recovered: u64,
    /// File offset of the next frame to load.
    next_frame: u64,
    /// The loaded frame's payload, and how much of it was read.
    frame: Vec<u8>,
    frame_off: usize,
    cancel: Option<Box<dyn Fn() -> bool + Send + Sync>>,
    /// The payload offset of the next byte [`read`](Read::read) returns (for [`SpoolWatch`]).
    consumed: Arc<AtomicU64>,
}

impl std::fmt::Debug for SpoolReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpoolReader")
            .field("path", &self.shared.path)
            .field("next_frame", &self.next_frame)
            .finish_non_exhaustive()
    }
}

impl SpoolReader {
    /// Also stop a blocked read (with an error, "cancelled") when `cancelled` returns true;
    /// it is asked every 100 ms while the reader waits.
    pub fn set_cancel(&mut self, cancelled: impl Fn() -> bool + Send + Sync + 'static) {
        self.cancel = Some(Box::new(cancelled));
    }

    /// Payload bytes the log held when opened (after a torn frame was dropped): a resumed
    /// source's position is never beyond it.
    pub fn recovered_len(&self) -> u64 {
        self.recovered
    }

    /// See [`SpoolWriter::sync`].
    pub fn sync(&self) -> Result<(), Error> {
        self.shared.sync()
    }

    /// Positions the reader at payload offset `offset` (a checkpointed position). An offset
    /// beyond what the log holds fails: the log lost bytes a checkpoint had read.
    pub fn seek_payload(&mut self, offset: u64) -> Result<(), Error> {
        let (file_len, payload_len) = {
            let s = self.shared.state.lock();
            (s.file_len, s.payload_len)
        };
        if offset > payload_len {
            return Err(Error::Checkpoint {
                message: format!(
                    "{}: holds {payload_len} bytes of stdin, but the checkpoint read up to \
                     {offset}: the spool lost bytes it had synced",
                    self.shared.path.display()
                ),
            });
        }
        let (mut pos, mut payload) = (0u64, 0u64);
        self.frame.clear();
        self.frame_off = 0;
        while pos < file_len {
            let len = self.header_at(pos).map_err(|e| self.read_error(e))? as u64;
            if payload + len > offset {
                self.load_frame(pos).map_err(|e| self.read_error(e))?;
                self.frame_off = (offset - payload) as usize;
                self.consumed.store(offset, Ordering::Relaxed);
                return Ok(());
            }
            pos += HEADER as u64 + len;
            payload += len;
        }
        self.next_frame = pos;
        self.consumed.store(offset, Ordering::Relaxed);
        Ok(())
    }

    /// A handle that waits until this reader has bytes to read without blocking (for a source
    /// that flushes its records when its input idles).
    pub fn watch(&self) -> SpoolWatch {
        SpoolWatch {
            shared: Arc::clone(&self.shared),
            consumed: Arc::clone(&self.consumed),
        }
    }

    fn read_error(&self, e: io::Error) -> Error {
        Error::CheckpointIo {
            op: "read",
            path: self.shared.path.display().to_string(),
            source: e,
        }
    }

    fn header_at(&self, pos: u64) -> io::Result<usize> {
        let mut header = [0u8; HEADER];
        self.file.read_exact_at(&mut header, pos)?;
        frame_len(&header).map_err(|why| self.corrupt(pos, &why))
    }

    fn corrupt(&self, pos: u64, why: &str) -> io::Error {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: frame at byte {pos}: {why}", self.shared.path.display()),
        )
    }

    /// Loads and verifies the frame at `pos`; the next one follows it.
    fn load_frame(&mut self, pos: u64) -> io::Result<()> {
        let mut header = [0u8; HEADER];
        self.file.read_exact_at(&mut header, pos)?;
        let len = frame_len(&header).map_err(|why| self.corrupt(pos, &why))?;
        self.frame.resize(len, 0);
        self.file
            .read_exact_at(&mut self.frame, pos + HEADER as u64)?;
        if let Err(why) = check_frame(&header, &self.frame) {
            self.frame.clear();
            return Err(self.corrupt(pos, &why));
        }
        self.frame_off = 0;
        self.next_frame = pos + (HEADER + len) as u64;
        Ok(())
    }

    /// Waits until a frame starts at `next_frame`: `Ok(true)`, or the input ended (`Ok(false)`).
    fn wait_for_frame(&self) -> io::Result<bool> {
        let mut s = self.shared.state.lock();
        loop {
            if s.file_len > self.next_frame {
                return Ok(true);
            }
            if let Some(e) = &s.error {
                return Err(io::Error::other(e.clone()));
            }
            if s.eof {
                return Ok(false);
            }
            if s.cancelled || self.cancel.as_ref().is_some_and(|c| c()) {
                return Err(io::Error::other("cancelled"));
            }
            self.shared.cond.wait_until(&mut s, Instant::now() + SLICE);
        }
    }
}

/// Waits for a [`SpoolReader`] to have something to read (see [`SpoolReader::watch`]).
#[derive(Debug, Clone)]
pub struct SpoolWatch {
    shared: Arc<Shared>,
    consumed: Arc<AtomicU64>,
}

impl SpoolWatch {
    /// Waits at most `timeout` until the reader's next read would not block: the log holds
    /// bytes it has not read, or the input ended, failed or was cancelled. Returns whether
    /// that happened.
    pub fn wait(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut s = self.shared.state.lock();
        loop {
            if s.payload_len > self.consumed.load(Ordering::Relaxed)
                || s.eof
                || s.error.is_some()
                || s.cancelled
            {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            self.shared.cond.wait_until(&mut s, deadline);
        }
    }
}

impl Read for SpoolReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.frame_off == self.frame.len() {
            if !self.wait_for_frame()? {
                return Ok(0);
            }
            self.load_frame(self.next_frame)?;
        }
        let n = buf.len().min(self.frame.len() - self.frame_off);
        buf[..n].copy_from_slice(&self.frame[self.frame_off..self.frame_off + n]);
        self.frame_off += n;
        self.consumed.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    /// A pipe-like input fed by the test: each `send` is one read's worth; dropping the sender
    /// is end of input.
    struct Feed(crossbeam_channel::Receiver<Vec<u8>>, Vec<u8>);

    impl Read for Feed {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.1.is_empty() {
                match self.0.recv() {
                    Ok(v) => self.1 = v,
                    Err(_) => return Ok(0),
                }
            }
            let n = buf.len().min(self.1.len());
            buf[..n].copy_from_slice(&self.1[..n]);
            self.1.drain(..n);
            Ok(n)
        }
    }

    fn data(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 % 251) as u8).collect()
    }

    fn read_all(r: &mut SpoolReader) -> Vec<u8> {
        let mut out = Vec::new();
        r.read_to_end(&mut out).unwrap();
        out
    }

    #[test]
    fn round_trip_in_64k_frames_and_from_any_offset() {
        let dir = tempfile::tempdir().unwrap();
        let input = data(200_000);
        let (mut w, mut r) = SpoolLog::open(dir.path()).unwrap();
        w.start(io::Cursor::new(input.clone())).unwrap();
        assert_eq!(read_all(&mut r), input);
        w.sync().unwrap();
        w.join().unwrap();
        // 200 000 bytes = 3 full frames and one of 3 392.
        let len = std::fs::metadata(dir.path().join(SPOOL_FILE))
            .unwrap()
            .len();
        assert_eq!(len, 200_000 + 4 * HEADER as u64);
        let (w, mut r) = SpoolLog::open(dir.path()).unwrap();
        assert_eq!(r.recovered_len(), 200_000);
        for offset in [0u64, 1, 65_535, 65_536, 65_537, 199_999] {
            r.seek_payload(offset).unwrap();
            let mut first = [0u8; 1];
            r.read_exact(&mut first).unwrap();
            assert_eq!(first[0], input[offset as usize], "offset {offset}");
        }
        r.seek_payload(200_000).unwrap();
        drop(w); // never started: the reader would wait; a dropped writer is not EOF
        let err = r.seek_payload(200_001).unwrap_err();
        assert!(err.to_string().contains("lost bytes"), "{err}");
    }

    #[test]
    fn a_resumed_run_appends_after_the_existing_log() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, _r) = SpoolLog::open(dir.path()).unwrap();
        w.start(io::Cursor::new(b"first part, ".to_vec())).unwrap();
        w.join().unwrap();
        let (mut w, mut r) = SpoolLog::open(dir.path()).unwrap();
        w.start(io::Cursor::new(b"the rest".to_vec())).unwrap();
        r.seek_payload(6).unwrap();
        assert_eq!(read_all(&mut r), b"part, the rest");
        w.join().unwrap();
    }

    #[test]
    fn a_torn_last_frame_is_truncated_on_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SPOOL_FILE);
        let (mut w, _r) = SpoolLog::open(dir.path()).unwrap();
        w.start(io::Cursor::new(data(100_000))).unwrap();
        w.join().unwrap();
        let full = std::fs::read(&path).unwrap();
        let first = HEADER + MAX_FRAME;
        // A crash mid-append: a short payload, a short header, a zero-filled tail, a last
        // frame whose pages were half written.
        let mut half_written = full.clone();
        half_written[first + 100] ^= 0xff;
        let mut zero_tail = full[..first].to_vec();
        zero_tail.extend_from_slice(&[0u8; 5000]);
        for torn in [
            full[..full.len() - 10].to_vec(),
            full[..first + 3].to_vec(),
            zero_tail,
            half_written,
        ] {
            std::fs::write(&path, &torn).unwrap();
            let (w, mut r) = SpoolLog::open(dir.path()).unwrap();
            assert_eq!(r.recovered_len(), MAX_FRAME as u64);
            assert_eq!(
                std::fs::metadata(&path).unwrap().len(),
                first as u64,
                "truncated to the last whole frame"
            );
            drop(w);
            r.seek_payload(0).unwrap();
            let mut got = vec![0u8; MAX_FRAME];
            r.read_exact(&mut got).unwrap();
            assert_eq!(got, data(100_000)[..MAX_FRAME]);
        }
    }

    #[test]
    fn a_flipped_bit_is_detected_at_open_and_by_the_reader() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SPOOL_FILE);
        let (mut w, _r) = SpoolLog::open(dir.path()).unwrap();
        w.start(io::Cursor::new(data(150_000))).unwrap();
        w.join().unwrap();
        let good = std::fs::read(&path).unwrap();
        let mut bad = good.clone();
        bad[HEADER + 10] ^= 0x04; // first frame's payload; two frames follow
        std::fs::write(&path, &bad).unwrap();
        let err = SpoolLog::open(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("frame at byte 0") && err.contains("checksum mismatch"),
            "{err}"
        );
        assert_eq!(std::fs::read(&path).unwrap(), bad, "nothing truncated");
        // Flipped after opening: the reader fails on that frame, naming it.
        std::fs::write(&path, &good).unwrap();
        let (w, mut r) = SpoolLog::open(dir.path()).unwrap();
        drop(w);
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&[bad[HEADER + 10]], (HEADER + 10) as u64)
            .unwrap();
        let mut buf = vec![0u8; 10];
        let e = r.read(&mut buf).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(e.to_string().contains("frame at byte 0"), "{e}");
    }

    #[test]
    fn the_reader_blocks_then_wakes_on_append_and_on_eof() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, rx) = crossbeam_channel::bounded::<Vec<u8>>(1);
        let (mut w, mut r) = SpoolLog::open(dir.path()).unwrap();
        w.start(Feed(rx, Vec::new())).unwrap();
        let (got_tx, got_rx) = crossbeam_channel::bounded::<Vec<u8>>(4);
        let reader = thread::spawn(move || {
            let mut buf = vec![0u8; 100];
            loop {
                let n = r.read(&mut buf).unwrap();
                got_tx.send(buf[..n].to_vec()).unwrap();
                if n == 0 {
                    return;
                }
            }
        });
        let deadline = Duration::from_secs(10);
        assert!(
            got_rx.recv_timeout(Duration::from_millis(300)).is_err(),
            "nothing written yet: the reader waits"
        );
        tx.send(b"hello".to_vec()).unwrap();
        assert_eq!(got_rx.recv_timeout(deadline).unwrap(), b"hello");
        tx.send(b"world".to_vec()).unwrap();
        assert_eq!(got_rx.recv_timeout(deadline).unwrap(), b"world");
        drop(tx); // end of input
        assert_eq!(got_rx.recv_timeout(deadline).unwrap(), b"");
        reader.join().unwrap();
        w.join().unwrap();
    }

    #[test]
    fn the_watch_says_when_a_read_would_not_block() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, rx) = crossbeam_channel::bounded::<Vec<u8>>(1);
        let (mut w, mut r) = SpoolLog::open(dir.path()).unwrap();
        let watch = r.watch();
        assert!(
            !watch.wait(Duration::from_millis(20)),
            "nothing spooled yet"
        );
        w.start(Feed(rx, Vec::new())).unwrap();
        tx.send(b"abc".to_vec()).unwrap();
        assert!(watch.wait(Duration::from_secs(10)), "3 bytes spooled");
        let mut buf = [0u8; 2];
        assert_eq!(r.read(&mut buf).unwrap(), 2);
        assert!(watch.wait(Duration::ZERO), "1 byte left of the frame");
        assert_eq!(r.read(&mut buf).unwrap(), 1);
        assert!(
            !watch.wait(Duration::from_millis(20)),
            "all read, input open"
        );
        drop(tx);
        assert!(
            watch.wait(Duration::from_secs(10)),
            "end of input: a read returns 0"
        );
        assert_eq!(r.read(&mut buf).unwrap(), 0);
        // A seek moves what the watch compares with.
        r.seek_payload(1).unwrap();
        assert!(watch.wait(Duration::ZERO));
        w.join().unwrap();
    }

    #[test]
    fn spooled_len_reads_without_changing_the_log() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(spooled_len(dir.path()).unwrap(), None, "no spool");
        {
            let (mut w, _r) = SpoolLog::open(dir.path()).unwrap();
            w.start(std::io::Cursor::new(data(100_000))).unwrap();
            w.join().unwrap();
        }
        let path = dir.path().join(SPOOL_FILE);
        let full = std::fs::metadata(&path).unwrap().len();
        // A torn last frame (a crash mid-append): not counted, and not truncated by a read.
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(full - 10).unwrap();
        assert_eq!(spooled_len(dir.path()).unwrap(), Some(MAX_FRAME as u64));
        assert_eq!(std::fs::metadata(&path).unwrap().len(), full - 10);
        // Corruption before the end is an error naming the offset.
        let mut b = std::fs::read(&path).unwrap();
        b[HEADER + 5] ^= 1;
        std::fs::write(&path, b).unwrap();
        let e = spooled_len(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("frame at byte 0") && e.contains("corrupt"),
            "{e}"
        );
        remove(dir.path()).unwrap();
        assert!(!path.exists());
        remove(dir.path()).unwrap();
    }

    #[test]
    fn cancel_stops_a_silent_writer_and_a_waiting_reader() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, mut r) = SpoolLog::open(dir.path()).unwrap();
        // A pipe that never speaks: only polling lets the writer see the cancel.
        let (read_end, write_end) = pipe();
        w.start_fd(read_end).unwrap();
        let (done_tx, done_rx) = crossbeam_channel::bounded(1);
        let reader = thread::spawn(move || {
            let mut buf = [0u8; 8];
            done_tx
                .send(r.read(&mut buf).map_err(|e| e.to_string()))
                .unwrap();
        });
        w.cancel();
        let got = done_rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(got.unwrap_err(), "cancelled");
        reader.join().unwrap();
        w.join().unwrap(); // returns: the writer saw the cancel while stdin was silent
        drop(write_end);
    }

    fn pipe() -> (File, File) {
        use std::os::fd::FromRawFd;
        let mut fds = [0; 2];
        // SAFETY: `fds` is a valid array of two ints for pipe(2) to fill.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: pipe(2) succeeded, so both descriptors are open and owned by nobody else.
        unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) }
    }
}
