//! A file read by N readers at once: part `k` of `n` reads the lines that *start* in its byte
//! range `[len·k/n, len·(k+1)/n)`, so every line is read by exactly one part, whole, and no
//! part needs to know where the others stop.
//!
//! The rule at a boundary `b` (the end of part `k`, the start of part `k + 1`): part `k` reads
//! on past `b` to the end of the line that holds byte `b - 1`; part `k + 1` skips from `b - 1`
//! through the first `\n` it finds. Both look for the same newline, the first at or after
//! `b - 1`, so the line it ends belongs to part `k` and the next to part `k + 1`. A line longer
//! than a whole range makes the part it starts in read it and leaves the parts it covers empty.
//!
//! Line numbers: a part knows only its own lines (its first is number 1). An error needs the
//! file's number, so [`LineBase`] counts the newlines before the part's range when an error
//! first asks for it, once per part: clean input never pays for that read.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;

/// The byte range of part `part` of `parts` of a file of `len` bytes.
pub(crate) fn part_range(len: u64, part: usize, parts: usize) -> (u64, u64) {
    let at = |k: usize| (u128::from(len) * k as u128 / parts.max(1) as u128) as u64;
    (at(part), at(part + 1))
}

/// Where a part is in its reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Before the first read: skip through the first newline at or after `start - 1`.
    Align,
    /// Inside the range.
    Body,
    /// Past the range's end, finishing the line that holds its last byte.
    Tail,
    Done,
}

/// A reader of the lines that start in one byte range of a regular file (see the module doc).
pub(crate) struct RangeReader {
    file: File,
    /// The next byte `read` returns is at this offset.
    pos: u64,
    start: u64,
    end: u64,
    phase: Phase,
    /// The last byte returned (`\n` when none was): a range that ends just after a newline has
    /// no line to finish.
    last: u8,
}

impl RangeReader {
    /// Opens part `part` of `parts` of the file at `path` (its length read now).
    pub(crate) fn open(
        path: &std::path::Path,
        part: usize,
        parts: usize,
    ) -> std::io::Result<RangeReader> {
        let file = File::open(path)?;
        let len = file.metadata()?.len();
        let (start, end) = part_range(len, part, parts);
        Ok(RangeReader {
            file,
            pos: start,
            start,
            end,
            phase: if start == 0 {
                Phase::Body
            } else {
                Phase::Align
            },
            last: b'\n',
        })
    }

    /// The range's first byte (0 for the first part).
    pub(crate) fn start(&self) -> u64 {
        self.start
    }

    /// Skips from `start - 1` through the first newline; the part is empty when that newline is
    /// at or past the range's end (the line that holds the boundary belongs to an earlier part).
    fn align(&mut self) -> std::io::Result<()> {
        let mut at = self.start - 1;
        self.file.seek(SeekFrom::Start(at))?;
        let mut scratch = vec![0u8; 64 * 1024];
        loop {
            let n = read_some(&mut self.file, &mut scratch)?;
            if n == 0 {
                self.phase = Phase::Done;
                return Ok(());
            }
            if let Some(i) = memchr::memchr(b'\n', &scratch[..n]) {
                at += i as u64 + 1;
                break;
            }
            at += n as u64;
        }
        self.pos = at;
        if at >= self.end {
            self.phase = Phase::Done;
        } else {
            self.file.seek(SeekFrom::Start(at))?;
            self.phase = Phase::Body;
        }
        Ok(())
    }
}

fn read_some(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    loop {
        match file.read(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            r => return r,
        }
    }
}

impl Read for RangeReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.phase == Phase::Align {
            self.align()?;
        }
        match self.phase {
            Phase::Align => unreachable!("aligned above"),
            Phase::Done => Ok(0),
            Phase::Body if self.pos >= self.end => {
                // An empty range (a file shorter than its number of parts).
                self.phase = Phase::Done;
                Ok(0)
            }
            Phase::Body => {
                let want = buf.len().min((self.end - self.pos) as usize);
                let n = read_some(&mut self.file, &mut buf[..want])?;
                if n == 0 {
                    let now = self.file.metadata()?.len();
                    return Err(std::io::Error::other(format!(
                        "truncated while read (read up to byte {}, now {now} bytes)",
                        self.pos
                    )));
                }
                self.pos += n as u64;
                self.last = buf[n - 1];
                if self.pos == self.end {
                    self.phase = if self.last == b'\n' {
                        Phase::Done
                    } else {
                        Phase::Tail
                    };
                }
                Ok(n)
            }
            Phase::Tail => {
                let n = read_some(&mut self.file, buf)?;
                if n == 0 {
                    // The file's last line, without a newline.
                    self.phase = Phase::Done;
                    return Ok(0);
                }
                match memchr::memchr(b'\n', &buf[..n]) {
                    Some(i) => {
                        self.phase = Phase::Done;
                        self.pos += i as u64 + 1;
                        Ok(i + 1)
                    }
                    None => {
                        self.pos += n as u64;
                        Ok(n)
                    }
                }
            }
        }
    }
}

/// The number of lines of a file before a part's range, counted when an error first needs a
/// line number of that part (see the module doc); 0 for the first part.
#[derive(Debug)]
pub(crate) struct LineBase {
    path: PathBuf,
    /// The range's first byte.
    start: u64,
    counted: crate::sync::Mutex<Option<u64>>,
}

impl LineBase {
    pub(crate) fn new(path: PathBuf, start: u64) -> LineBase {
        LineBase {
            path,
            start,
            counted: crate::sync::Mutex::new(if start == 0 { Some(0) } else { None }),
        }
    }

    /// The lines before the part's first line: the newlines before `start - 1`, and the one the
    /// part skipped to. A file that cannot be read again gives 0 (the numbers are then the
    /// part's own), said in the log.
    pub(crate) fn lines_before(&self) -> u64 {
        let mut counted = self.counted.lock();
        if let Some(n) = *counted {
            return n;
        }
        let n = match count_newlines(&self.path, self.start - 1) {
            Ok(n) => n + 1,
            Err(e) => {
                log::warn!(
                    "{}: cannot count the lines before byte {} ({e}); line numbers of this part \
                     count from its start",
                    self.path.display(),
                    self.start
                );
                0
            }
        };
        *counted = Some(n);
        n
    }
}

/// The newlines in the first `len` bytes of the file at `path`.
fn count_newlines(path: &std::path::Path, len: u64) -> std::io::Result<u64> {
    let mut file = File::open(path)?.take(len);
    let mut buf = vec![0u8; 1 << 20];
    let mut lines = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            return Ok(lines);
        }
        lines += buf[..n].iter().filter(|&&b| b == b'\n').count() as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::io::Write;

    /// Every part's bytes, read to the end.
    fn parts_of(data: &[u8], parts: usize) -> Vec<Vec<u8>> {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(data).unwrap();
        (0..parts)
            .map(|k| {
                let mut r = RangeReader::open(f.path(), k, parts).unwrap();
                let mut out = Vec::new();
                // Small reads, so that the boundaries fall inside a read too.
                let mut buf = [0u8; 7];
                loop {
                    let n = r.read(&mut buf).unwrap();
                    if n == 0 {
                        break;
                    }
                    out.extend_from_slice(&buf[..n]);
                }
                out
            })
            .collect()
    }

    #[test]
    fn parts_read_whole_lines_once_and_in_order() {
        let data = b"aa\nbbbbbbbbbbbbbbbbbbbb\n\nc\nddd\ne";
        for parts in 1..=12 {
            let got = parts_of(data, parts);
            assert_eq!(got.concat(), data, "{parts} parts");
            for p in &got[..got.len() - 1] {
                assert!(p.is_empty() || p.ends_with(b"\n"), "{parts} parts: {p:?}");
            }
        }
    }

    #[test]
    fn a_boundary_just_after_a_newline_starts_the_next_part() {
        // 8 bytes, 2 parts: the boundary is at 4, just after "abc\n".
        assert_eq!(
            parts_of(b"abc\ndef\n", 2),
            [b"abc\n".to_vec(), b"def\n".to_vec()]
        );
    }

    #[test]
    fn lines_before_counts_the_earlier_parts_lines() {
        let data = b"1\n22\n333\n4444\n55555\n666666\n";
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(data).unwrap();
        let parts = 3;
        let mut seen = 0u64;
        for (k, bytes) in parts_of(data, parts).iter().enumerate() {
            let r = RangeReader::open(f.path(), k, parts).unwrap();
            let base = LineBase::new(f.path().to_path_buf(), r.start());
            if !bytes.is_empty() {
                assert_eq!(base.lines_before(), seen, "part {k}");
            }
            seen += bytes.iter().filter(|&&b| b == b'\n').count() as u64;
        }
    }

    proptest! {
        #[test]
        fn any_split_reads_every_byte_once(
            data in prop::collection::vec(prop::sample::select(vec![b'a', b'b', b'\n', b'\r']), 0..200),
            parts in 1usize..9,
        ) {
            let got = parts_of(&data, parts);
            prop_assert_eq!(got.concat(), data.clone());
            // Whole lines: a part ends with a newline, unless it holds the file's end.
            for k in 0..got.len() {
                let rest_empty = got[k + 1..].iter().all(Vec::is_empty);
                prop_assert!(got[k].is_empty() || got[k].ends_with(b"\n") || rest_empty);
            }
        }
    }
}
