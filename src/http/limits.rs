//! What no client can exceed: the number of connections served at once (the rest get `503` at
//! once), a deadline for the whole request (head and body, not per read), a deadline for writing
//! each response and each event, and the bookkeeping that lets shutdown end every connection at
//! once, whatever its client does, and join its thread.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use crate::sync::thread::JoinHandle;
use crate::sync::Mutex;

/// How long a connection whose request was refused before it was read in full keeps reading
/// (and discarding) what its client still sends, so that closing it does not reset the
/// connection before the client has read the answer.
const LINGER: Duration = Duration::from_secs(1);
/// The most a refused request's remainder that is read and discarded.
const LINGER_BYTES: u64 = 1 << 20;

/// Reads from a stream until a fixed instant: each read waits only for what is left of the
/// time, so a client that trickles bytes cannot stretch it.
#[derive(Debug)]
pub(super) struct DeadlineReader<'a> {
    stream: &'a TcpStream,
    deadline: Instant,
}

impl<'a> DeadlineReader<'a> {
    pub(super) fn new(stream: &'a TcpStream, deadline: Instant) -> Self {
        DeadlineReader { stream, deadline }
    }
}

impl Read for DeadlineReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        self.stream.set_read_timeout(Some(left))?;
        (&*self.stream).read(buf)
    }
}

/// Whether an I/O error is a read or write timing out (`set_*_timeout` reports `WouldBlock`).
pub(super) fn timed_out(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Writes all of `bytes` by `deadline` (a client that reads slowly or not at all gets an error
/// when it passes, not a thread blocked forever).
pub(super) fn write_all_by(mut w: &TcpStream, bytes: &[u8], deadline: Instant) -> io::Result<()> {
    let mut rest = bytes;
    while !rest.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        w.set_write_timeout(Some(left))?;
        match w.write(rest) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => rest = &rest[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Closes a connection whose request was not read to its end: stops writing, then reads and
/// discards what the client still sends (bounded in bytes and time) until it closes.
pub(super) fn linger_close(stream: &TcpStream) {
    let _ = stream.shutdown(Shutdown::Write);
    let deadline = Instant::now() + LINGER;
    let _ = io::copy(
        &mut DeadlineReader::new(stream, deadline).take(LINGER_BYTES),
        &mut io::sink(),
    );
}

/// Answers a connection over the cap, from the accepting thread: one non-blocking write (a
/// fresh socket's send buffer always has room for it), then close. Never blocks.
pub(super) fn refuse(stream: TcpStream, response: &[u8]) {
    if stream.set_nonblocking(true).is_err() {
        return;
    }
    let _ = (&stream).write(response);
    let _ = stream.shutdown(Shutdown::Write);
    // Discard what already arrived, so that closing does not reset the connection under the
    // answer.
    let mut buf = [0u8; 4096];
    for _ in 0..16 {
        match (&stream).read(&mut buf) {
            Ok(n) if n > 0 => {}
            _ => break,
        }
    }
}

/// One connection being served: its thread, and a handle on its socket to shut it down.
struct Conn {
    thread: JoinHandle<()>,
    socket: TcpStream,
}

/// Every connection being served, up to a cap.
pub(super) struct Connections {
    live: Mutex<Vec<Conn>>,
    max: usize,
}

impl Connections {
    pub(super) fn new(max: usize) -> Self {
        Connections {
            live: Mutex::new(Vec::new()),
            max,
        }
    }

    /// Joins the connections that have ended; `true` if there is room for one more.
    pub(super) fn reap(&self) -> bool {
        let done: Vec<Conn> = {
            let mut live = self.live.lock();
            let (done, rest) = live.drain(..).partition(|c| c.thread.is_finished());
            *live = rest;
            done
        };
        for c in done {
            let _ = c.thread.join();
        }
        self.live.lock().len() < self.max
    }

    /// Records a connection's thread and socket.
    pub(super) fn add(&self, thread: JoinHandle<()>, socket: TcpStream) {
        self.live.lock().push(Conn { thread, socket });
    }

    /// How many connections are being served (their threads have not ended).
    pub(super) fn count(&self) -> usize {
        self.live
            .lock()
            .iter()
            .filter(|c| !c.thread.is_finished())
            .count()
    }

    /// Shuts every connection's socket down, which ends at once any read or write its thread
    /// is blocked in, and joins every thread.
    pub(super) fn close_all(&self) {
        let all: Vec<Conn> = self.live.lock().drain(..).collect();
        for c in &all {
            let _ = c.socket.shutdown(Shutdown::Both);
        }
        for c in all {
            let _ = c.thread.join();
        }
    }
}

/// The accepting thread's pause after a failed `accept` (`EMFILE`, `ENFILE`, `ENOBUFS`, ...):
/// doubles from 10 ms up to 250 ms while they last, so that it does not spin a core, and
/// resets on the next success.
#[derive(Debug, Default)]
pub(super) struct Backoff {
    next: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(10);
    /// The longest pause (also how late shutdown may notice during a run of errors).
    pub(super) const MAX: Duration = Duration::from_millis(250);

    /// The pause to take now.
    pub(super) fn failed(&mut self) -> Duration {
        self.next = (self.next * 2).clamp(Self::FIRST, Self::MAX);
        self.next
    }

    pub(super) fn succeeded(&mut self) {
        self.next = Duration::ZERO;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_resets() {
        let mut b = Backoff::default();
        let pauses: Vec<u64> = (0..7).map(|_| b.failed().as_millis() as u64).collect();
        assert_eq!(pauses, [10, 20, 40, 80, 160, 250, 250]);
        b.succeeded();
        assert_eq!(b.failed(), Duration::from_millis(10));
    }
}
