//! The directory sink: part files committed at checkpoints (exactly once, two-phase).
//!
//! # Design note
//!
//! Each instance `i` of the sink writes its records into part files of the directory, one
//! after the other, numbered by a sequence `s`:
//!
//! ```text
//! .part-<i:05>-<s:06>.<ext>.inprogress   being written (hidden: readers skip dot files)
//! .part-<i:05>-<s:06>.<ext>.pending      pre-committed at a barrier: complete and fsynced
//! part-<i:05>-<s:06>.<ext>               committed: part of the output
//! ```
//!
//! - **Write.** The first record after a barrier (or at the start) opens part `s` as
//!   in-progress; a barrier with no record since the last one opens nothing (no empty parts).
//! - **Pre-commit, at barrier n.** Flush, `fsync` the part, rename it in-progress → pending,
//!   `fsync` the directory; then `s += 1`. The barrier records in the instance's state the
//!   next sequence (`tail`: `{next_seq}`) and, in `precommitted`, the absolute paths of every
//!   pending part not yet seen committed (a checkpoint that failed leaves its parts pending:
//!   the next one carries them on, since their records are before its barrier too).
//! - **Commit, when checkpoint n completes** ([`commit_part`], called by the coordinator):
//!   rename pending → final, `fsync` the directory. Idempotent: a part already committed is
//!   fine (its rename is made durable again), so a crash between completion and commit loses
//!   nothing — recovery commits again.
//! - **Recover from checkpoint n** (`restore`): commit every part in the state's
//!   `precommitted`, and every pending part of this instance below `next_seq` (pre-committed
//!   at a barrier ≤ n, so before n's barrier); delete this instance's parts at or above
//!   `next_seq` — final, pending or in-progress: their records come after the barrier and are
//!   replayed — and every in-progress part of this instance.
//! - **Finish.** The last part is fsynced and renamed straight to its final name, and every
//!   part still pending is committed: at the end of input every record is in.
//! - **A fresh run** (no restore) refuses a directory that holds part files (any state) of
//!   its instance: they belong to an earlier run, and mixing them would duplicate output.
//!   Empty the directory, or resume the earlier run — or start with `--fresh`
//!   ([`Start::Fresh`](crate::checkpoint::Start)), which removes them, as a file sink replaces
//!   its file.
//! - **A resumed run with nothing to restore** (the earlier run crashed before its first
//!   checkpoint completed) removes this instance's in-progress and pending parts: none was
//!   committed, and their records are replayed from the start. Final parts are still refused
//!   (they come from a run that completed or whose checkpoints are gone). Before this rule a
//!   crash between a barrier's pre-commit and the first checkpoint's manifest left a pending
//!   part that made every `--resume` fail (found by `tests/checkpoint_crash.rs`).
//!
//! Every rename is followed by an `fsync` of the directory; an `fsync` error is fatal
//! ([`Error::CheckpointIo`]), never retried as if it had succeeded.
//!
//! **Durability of the directory itself.** The sink creates its directory (and missing
//! parents) with `Fs::create_dir_all`, which fsyncs the parent of every directory it creates:
//! otherwise a crash could take away a new output directory with every part committed in it
//! (found by the crash-point enumeration, `tests/checkpoint_crash.rs`).
//!
//! **Where the I/O goes.** Every file-system operation (create, write, fsync, rename,
//! directory fsync, remove, list) goes through the run's [`Fs`]: the operating system's
//! ([`RealFs`](crate::checkpoint::fs::RealFs)) unless the hidden `CheckpointOptions::fs`
//! gives another — the tests' `SimFs`, shared with the checkpoint store, so that a simulated
//! crash drops the sink's unsynced data and undoes its unsynced renames together with the
//! store's. A `BufWriter` sits in front of the part's handle: one handle write per 256 KiB,
//! as before.

use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::Counter;
use crate::checkpoint::fs::FsWriter;
use crate::checkpoint::state::InstanceState;
use crate::checkpoint::store::Fs;
use crate::checkpoint::StateSupport;
use crate::error::Error;
use crate::operator::{Emit, Halt};
use crate::runtime::{Cx, Tail};

/// The state of a part file, from its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PartState {
    InProgress,
    Pending,
    Final,
}

/// A part file's name, parsed: `(instance, seq, state)`.
pub(crate) fn parse_part(name: &str, ext: &str) -> Option<(usize, u64, PartState)> {
    let (body, state) = if let Some(b) = name.strip_prefix('.') {
        if let Some(b) = b.strip_suffix(".inprogress") {
            (b, PartState::InProgress)
        } else if let Some(b) = b.strip_suffix(".pending") {
            (b, PartState::Pending)
        } else {
            return None;
        }
    } else {
        (name, PartState::Final)
    };
    let body = body
        .strip_prefix("part-")?
        .strip_suffix(ext)?
        .strip_suffix('.')?;
    let (i, s) = body.split_once('-')?;
    if i.len() < 5 || s.len() < 6 {
        return None;
    }
    Some((i.parse().ok()?, s.parse().ok()?, state))
}

/// The file name of part `seq` of instance `instance` in state `state`.
pub(crate) fn part_name(instance: usize, seq: u64, ext: &str, state: PartState) -> String {
    let base = format!("part-{instance:05}-{seq:06}.{ext}");
    match state {
        PartState::Final => base,
        PartState::Pending => format!(".{base}.pending"),
        PartState::InProgress => format!(".{base}.inprogress"),
    }
}

fn io_error(op: &'static str, path: &Path, source: io::Error) -> Error {
    Error::CheckpointIo {
        op,
        path: path.display().to_string(),
        source,
    }
}

/// `fsync` of a directory, so that the renames in it are durable.
fn sync_dir(fs: &dyn Fs, dir: &Path) -> Result<(), Error> {
    fs.fsync_dir(dir)
        .map_err(|e| io_error("fsync directory", dir, e))
}

/// Commits a pre-committed part: renames `.X.pending` to `X` and fsyncs the directory.
///
/// Idempotent: when `X` already exists and the pending file does not (committed before), it
/// fsyncs the directory again and succeeds. Neither existing is an error: the part is lost
/// (someone deleted it), and the output would miss records.
pub(crate) fn commit_part(fs: &dyn Fs, pending: &Path) -> Result<(), Error> {
    let name = pending.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let Some(final_name) = name
        .strip_prefix('.')
        .and_then(|n| n.strip_suffix(".pending"))
    else {
        return Err(Error::Checkpoint {
            message: format!("{} is not a pending part file", pending.display()),
        });
    };
    let dir = pending.parent().unwrap_or(Path::new("."));
    let target = dir.join(final_name);
    match fs.rename(pending, &target) {
        Ok(()) => sync_dir(fs, dir),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if fs.file_len(&target).is_ok() {
                // Committed before (maybe just before a crash): make sure it is durable.
                sync_dir(fs, dir)
            } else {
                Err(Error::Checkpoint {
                    message: format!(
                        "pre-committed part {} is missing, and so is {}: the output lost it",
                        pending.display(),
                        target.display()
                    ),
                })
            }
        }
        Err(e) => Err(io_error("rename", pending, e)),
    }
}

/// What a directory sink records at a barrier (part `tail`).
#[derive(serde::Serialize, serde::Deserialize)]
struct DirSinkState {
    /// The sequence number of the next part: every part below it holds records before the
    /// barrier, none at or above it.
    next_seq: u64,
}

/// Writes each record as one line into the part files of a directory (see the module docs).
pub(crate) struct DirWriteTail<F> {
    /// The directory, absolute (pre-committed paths are recorded absolute).
    dir: PathBuf,
    /// The file extension of the parts (`ndjson`, `txt`).
    ext: &'static str,
    stage: Arc<str>,
    instance: usize,
    /// The sequence number of the part being written, or of the next one.
    seq: u64,
    /// The part being written.
    cur: Option<BufWriter<FsWriter>>,
    /// The run's file system (see the module docs).
    fs: Arc<dyn Fs>,
    /// Pending parts not yet seen committed.
    uncommitted: Vec<PathBuf>,
    /// Restored, or checked to be a fresh directory: writing may start.
    started: bool,
    /// The run was started with `--fresh` ([`Start::Fresh`](crate::checkpoint::Start)): the
    /// earlier run's parts of this instance are removed instead of refused, as a file sink
    /// replaces its file.
    replace_earlier: bool,
    /// The run was started with `--resume`: when no checkpoint is restored (none completed
    /// before the crash), the crashed run's in-progress and pending parts are removed (their
    /// records are replayed from the start); final parts are still refused.
    resuming: bool,
    format: F,
    count: Counter,
}

impl<F> DirWriteTail<F> {
    /// A sink writing into `dir` (created if missing).
    pub(crate) fn new(
        cx: &Cx,
        dir: &Path,
        ext: &'static str,
        stage: Arc<str>,
        format: F,
    ) -> Result<Self, Error> {
        let io_err = |source| Error::Io {
            stage: stage.to_string(),
            path: dir.display().to_string(),
            source,
        };
        let opts = cx.run.checkpoint_opts.lock().clone();
        let fs = crate::checkpoint::run_fs(opts.as_ref());
        fs.create_dir_all(dir).map_err(io_err)?;
        let dir = fs.canonicalize(dir).map_err(io_err)?;
        Ok(DirWriteTail {
            dir,
            ext,
            stage,
            instance: cx.instance,
            seq: 0,
            cur: None,
            uncommitted: Vec::new(),
            started: false,
            replace_earlier: opts
                .as_ref()
                .is_some_and(|o| o.start == crate::checkpoint::Start::Fresh),
            resuming: opts
                .as_ref()
                .is_some_and(|o| o.start == crate::checkpoint::Start::Resume),
            fs,
            format,
            count: Counter::new(cx),
        })
    }

    fn path(&self, seq: u64, state: PartState) -> PathBuf {
        self.dir
            .join(part_name(self.instance, seq, self.ext, state))
    }

    /// This instance's part files in the directory: `(seq, state, path)`.
    fn own_parts(&self) -> Result<Vec<(u64, PartState, PathBuf)>, Error> {
        let mut out = Vec::new();
        let names = self
            .fs
            .read_dir(&self.dir)
            .map_err(|e| io_error("list", &self.dir, e))?;
        for name in names {
            if let Some((i, seq, state)) = parse_part(&name, self.ext) {
                if i == self.instance {
                    out.push((seq, state, self.dir.join(&name)));
                }
            }
        }
        out.sort_by_key(|(seq, _, _)| *seq);
        Ok(out)
    }

    /// A fresh run's first use: refuse parts of an earlier run (remove them under `--fresh`).
    #[cold]
    fn start(&mut self) -> Result<(), Halt> {
        let parts = self.own_parts()?;
        // Resuming a run that crashed before its first checkpoint completed: what it left
        // is not committed (a part becomes final only once a checkpoint that covers it is
        // durable, or at the end of a successful run), and its records are replayed.
        let uncommitted_only = parts.iter().all(|(_, st, _)| *st != PartState::Final);
        if (self.replace_earlier || (self.resuming && uncommitted_only)) && !parts.is_empty() {
            for (_, _, path) in &parts {
                self.fs
                    .remove_file(path)
                    .map_err(|e| self.io_halt(path, e))?;
            }
            sync_dir(&*self.fs, &self.dir)?;
            self.started = true;
            return Ok(());
        }
        if let Some((_, _, path)) = parts.first() {
            return Err(Error::Io {
                stage: self.stage.to_string(),
                path: self.dir.display().to_string(),
                source: io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!(
                        "holds part files of an earlier run ({} and {} more): empty the \
                         directory or write to another, or resume that run",
                        path.file_name().unwrap_or_default().to_string_lossy(),
                        parts.len() - 1
                    ),
                ),
            }
            .into());
        }
        self.started = true;
        Ok(())
    }

    fn io_halt(&self, path: &Path, e: io::Error) -> Halt {
        Halt::Failed(Error::Io {
            stage: self.stage.to_string(),
            path: path.display().to_string(),
            source: e,
        })
    }

    /// Opens part `seq` as in-progress.
    #[cold]
    fn open_part(&mut self) -> Result<(), Halt> {
        if !self.started {
            self.start()?;
        }
        let path = self.path(self.seq, PartState::InProgress);
        let file = self.fs.create(&path).map_err(|e| self.io_halt(&path, e))?;
        self.cur = Some(BufWriter::with_capacity(256 * 1024, FsWriter(file)));
        Ok(())
    }

    /// Flushes and fsyncs the part being written, renames it to `state`, fsyncs the
    /// directory, and moves on to the next sequence number. Nothing when no part is open.
    fn close_part(&mut self, state: PartState) -> Result<Option<PathBuf>, Halt> {
        let Some(w) = self.cur.take() else {
            return Ok(None);
        };
        let from = self.path(self.seq, PartState::InProgress);
        let FsWriter(mut file) = w
            .into_inner()
            .map_err(|e| self.io_halt(&from, e.into_error()))?;
        file.sync_data().map_err(|e| io_error("fsync", &from, e))?;
        drop(file);
        let to = self.path(self.seq, state);
        self.fs
            .rename(&from, &to)
            .map_err(|e| io_error("rename", &from, e))?;
        sync_dir(&*self.fs, &self.dir)?;
        self.seq += 1;
        Ok(Some(to))
    }
}

impl<T, F: FnMut(&mut dyn Write, &T) -> io::Result<u64> + Send> Emit<T> for DirWriteTail<F> {
    #[inline]
    fn emit(&mut self, item: T) -> Result<(), Halt> {
        if self.cur.is_none() {
            self.open_part()?;
        }
        let out = self.cur.as_mut().expect("opened above");
        match (self.format)(out, &item).and_then(|n| out.write_all(b"\n").map(|()| n)) {
            Ok(n) => {
                self.count.unpublished += n;
                Ok(())
            }
            Err(e) => Err(self.io_halt(&self.path(self.seq, PartState::InProgress), e)),
        }
    }
}

impl<T, F: FnMut(&mut dyn Write, &T) -> io::Result<u64> + Send> Tail<T> for DirWriteTail<F> {
    fn flush(&mut self, _: &Cx) -> Result<(), Halt> {
        self.count.publish();
        Ok(())
    }

    fn finish(&mut self, _: &Cx) -> Result<(), Halt> {
        self.count.publish();
        if !self.started {
            self.start()?;
        }
        self.close_part(PartState::Final)?;
        for p in std::mem::take(&mut self.uncommitted) {
            commit_part(&*self.fs, &p)?;
        }
        Ok(())
    }

    fn barrier(
        &mut self,
        _cx: &Cx,
        _id: crate::checkpoint::CheckpointId,
        state: &mut InstanceState,
    ) -> Result<(), Halt> {
        self.count.publish();
        if !self.started {
            self.start()?;
        }
        if let Some(p) = self.close_part(PartState::Pending)? {
            self.uncommitted.push(p);
        }
        // Those the coordinator committed since are gone from their pending names.
        if !self.uncommitted.is_empty() {
            let names = self
                .fs
                .read_dir(&self.dir)
                .map_err(|e| io_error("list", &self.dir, e))?;
            self.uncommitted.retain(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| names.binary_search_by(|x| x.as_str().cmp(n)).is_ok())
            });
        }
        state.put("tail", &DirSinkState { next_seq: self.seq })?;
        state.positions.push(("tail".into(), self.seq));
        state
            .precommitted
            .extend(self.uncommitted.iter().map(|p| p.display().to_string()));
        Ok(())
    }

    fn restore(&mut self, _cx: &Cx, state: &InstanceState) -> Result<(), Halt> {
        let Some(DirSinkState { next_seq }) = state.get("tail")? else {
            return Err(Error::Checkpoint {
                message: format!(
                    "stage `{}`: the checkpoint holds no part sequence for {}",
                    self.stage,
                    self.dir.display()
                ),
            }
            .into());
        };
        for p in &state.precommitted {
            commit_part(&*self.fs, Path::new(p))?;
        }
        let mut deleted = false;
        for (seq, part, path) in self.own_parts()? {
            if seq >= next_seq || part == PartState::InProgress {
                // Written after the checkpoint's barrier: its records are replayed.
                self.fs
                    .remove_file(&path)
                    .map_err(|e| io_error("remove", &path, e))?;
                deleted = true;
            } else if part == PartState::Pending {
                // Pre-committed at an earlier barrier whose checkpoint failed or was never
                // committed: its records are before this checkpoint's barrier.
                commit_part(&*self.fs, &path)?;
            }
        }
        if deleted {
            sync_dir(&*self.fs, &self.dir)?;
        }
        self.seq = next_seq;
        self.started = true;
        Ok(())
    }

    fn state_support(&self) -> StateSupport {
        StateSupport::Snapshots
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn part_names_round_trip() {
        for state in [PartState::InProgress, PartState::Pending, PartState::Final] {
            let n = part_name(3, 42, "ndjson", state);
            assert_eq!(parse_part(&n, "ndjson"), Some((3, 42, state)), "{n}");
            assert_eq!(parse_part(&n, "txt"), None);
        }
        assert_eq!(
            part_name(3, 42, "ndjson", PartState::Final),
            "part-00003-000042.ndjson"
        );
        assert_eq!(
            part_name(3, 42, "ndjson", PartState::Pending),
            ".part-00003-000042.ndjson.pending"
        );
        assert_eq!(parse_part("part-1-2.ndjson", "ndjson"), None);
        assert_eq!(parse_part("notes.txt", "ndjson"), None);
    }

    #[test]
    fn commit_part_is_idempotent_and_reports_a_lost_part() {
        use std::fs;
        let real = crate::checkpoint::fs::RealFs;
        let commit_part = |p: &Path| super::commit_part(&real, p);
        let dir = tempfile::tempdir().unwrap();
        let pending = dir
            .path()
            .join(part_name(0, 0, "ndjson", PartState::Pending));
        fs::write(&pending, "{}\n").unwrap();
        commit_part(&pending).unwrap();
        let fin = dir.path().join("part-00000-000000.ndjson");
        assert_eq!(fs::read_to_string(&fin).unwrap(), "{}\n");
        assert!(!pending.exists());
        // Again: already committed, fine.
        commit_part(&pending).unwrap();
        assert_eq!(fs::read_to_string(&fin).unwrap(), "{}\n");
        // Neither exists: lost.
        fs::remove_file(&fin).unwrap();
        let e = commit_part(&pending).unwrap_err();
        assert!(matches!(e, Error::Checkpoint { .. }), "{e}");
        assert!(e.to_string().contains("missing"), "{e}");
        // Not a pending name.
        assert!(matches!(commit_part(&fin), Err(Error::Checkpoint { .. })));
    }
}
