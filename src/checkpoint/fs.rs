//! The file systems under [`FsStore`](super::store::FsStore): [`RealFs`] (the operating
//! system's, through `std::fs`) and [`SimFs`], an in-memory model of what survives a crash,
//! with fault injection, for crash-point enumeration.
//!
//! # The model SimFs implements (and that the store's protocol assumes of a real one)
//!
//! POSIX, as ext4/xfs/btrfs behave with their default options:
//! - a file's *data* is durable only after `fsync` of that file; until then a crash may lose
//!   it (SimFs keeps, per file, the `durable` bytes of the last fsync and the `current` ones);
//! - a directory's *entries* (a creation, a rename, a removal) are durable only after `fsync`
//!   of the directory; until then a crash may undo them (SimFs keeps, per directory, the
//!   `durable` entries of its last fsync and the `current` ones). A file whose name never
//!   became durable is gone after a crash, whatever was fsynced of its data; a name made
//!   durable before its data was fsynced points at the data of its last fsync (empty for a
//!   file never fsynced — the classic zero-length file after rename);
//! - `rename` within a file system is atomic: after a crash the name refers to the old file
//!   or to the new one, never to a mixture (SimFs: an entry points at one node);
//! - an operation that failed did nothing.
//!
//! What the model leaves out, on purpose: partially written data (a crash keeps a file's last
//! fsynced contents, not a prefix of the volatile ones: the store never relies on the
//! difference, as every file it trusts is checksummed), hard links, metadata other than names,
//! and reordering of fsyncs that did succeed (an fsync that returned is durable).
//!
//! # Fault injection
//!
//! Every mutating operation (`create_dir`, `write`, `fsync`, `rename`, `fsync_dir`,
//! `remove_file`, `remove_dir`, and for the sinks' streaming writes `create`/`open_append`, a
//! handle's `write_all` and `sync_data`, and `truncate`) is numbered from 1 and logged
//! ([`SimFs::ops`]); `create_dir_all` counts as the `create_dir` and `fsync_dir` it does.
//! [`SimFs::fail_at`]`(k, kind)` makes the k-th one fail: with [`FaultKind::Error`] that one
//! returns `EIO` and changes nothing, and later ones run normally; with [`FaultKind::Crash`]
//! that one and every later one return `EIO` (the machine is down), until [`SimFs::crash`]
//! "reboots" it, keeping only what was durable. Reads never fail by injection.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io;
use std::path::{Component, Path, PathBuf};

use std::sync::Arc;

use crate::sync::Mutex;

/// What [`Fs::lock_exclusive`](super::store::Fs::lock_exclusive) returns: the lock is held
/// until this is dropped.
pub type LockGuard = Box<dyn std::any::Any + Send + Sync>;

/// A file open for writing, from [`Fs::create`](super::store::Fs::create) or
/// [`Fs::open_append`](super::store::Fs::open_append). The sinks buffer in front of it: one
/// `write_all` per buffer flush.
pub trait FsFile: Send {
    /// Writes all of `buf` (not yet durable).
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()>;
    /// Makes the file's data durable (`fdatasync`).
    fn sync_data(&mut self) -> io::Result<()>;
    /// Whether it is a regular file (not a pipe, a terminal or a device): only a regular file
    /// can be truncated back to a checkpoint.
    fn is_regular(&self) -> bool;
}

/// An [`FsFile`] as an [`io::Write`] (for a `BufWriter` in front of it): `write` writes all.
pub struct FsWriter(pub Box<dyn FsFile>);

impl io::Write for FsWriter {
    #[inline]
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write_all(buf)?;
        Ok(buf.len())
    }
    #[inline]
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.0.write_all(buf)
    }
    #[inline]
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl fmt::Debug for FsWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FsWriter")
    }
}

/// The operating system's file system.
#[derive(Debug, Clone, Copy, Default)]
pub struct RealFs;

/// A real file: writes go straight to the descriptor (the caller buffers).
struct RealFile {
    file: std::fs::File,
    regular: bool,
}

impl FsFile for RealFile {
    #[inline]
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        io::Write::write_all(&mut self.file, buf)
    }
    fn sync_data(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }
    fn is_regular(&self) -> bool {
        self.regular
    }
}

fn real_file(file: std::fs::File) -> io::Result<Box<dyn FsFile>> {
    let regular = file.metadata()?.file_type().is_file();
    Ok(Box::new(RealFile { file, regular }))
}

/// The directory holding `path` (`.` for a bare name).
fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// `create_dir_all` through `fs`'s own operations: the missing directories from the top
/// down, each followed by an fsync of its parent. `exists` tells whether a directory is there.
///
/// The leaf's parent is fsynced even when the leaf existed: an earlier run may have created
/// it and failed (or crashed) before its entry was durable — a directory that is there now
/// need not survive a crash (found by `tests/checkpoint_crash.rs`: an `EIO` on that fsync,
/// then a resume that found the directory and wrote its output into it, lost everything at
/// the reboot). Without read access to the parent that fsync is skipped (as before).
fn create_dir_all_durably(
    fs: &dyn super::store::Fs,
    path: &Path,
    exists: impl Fn(&Path) -> io::Result<bool>,
) -> io::Result<()> {
    let mut missing = Vec::new();
    let mut p = path;
    while !p.as_os_str().is_empty() && !exists(p)? {
        missing.push(p);
        match p.parent() {
            Some(q) => p = q,
            None => break,
        }
    }
    let leaf_created = !missing.is_empty();
    for d in missing.into_iter().rev() {
        match fs.create_dir(d) {
            Ok(()) => {}
            // Another instance of the same sink made it meanwhile: still make it durable.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        fs.fsync_dir(parent_of(d))?;
    }
    if !leaf_created && path.parent().is_some() {
        sync_entry_of(fs, path)?;
    }
    Ok(())
}

/// Fsyncs the directory holding `path`, so that `path`'s entry is durable; skipped when the
/// directory cannot be opened for reading (`EACCES`: nothing this process made).
pub(crate) fn sync_entry_of(fs: &dyn super::store::Fs, path: &Path) -> io::Result<()> {
    match fs.fsync_dir(parent_of(path)) {
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => Ok(()),
        r => r,
    }
}

impl super::store::Fs for RealFs {
    fn create_dir(&self, path: &Path) -> io::Result<()> {
        std::fs::create_dir(path)
    }

    fn write(&self, path: &Path, bytes: &[u8]) -> io::Result<()> {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        f.write_all(bytes)
    }

    fn fsync(&self, path: &Path) -> io::Result<()> {
        // A fresh descriptor sees a writeback error no other descriptor has seen (Linux >=
        // 4.16 reports an unseen error to the next fsync on any descriptor); nothing else
        // fsyncs the store's files, so the error cannot have been consumed elsewhere.
        std::fs::OpenOptions::new()
            .write(true)
            .open(path)?
            .sync_all()
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }

    fn fsync_dir(&self, path: &Path) -> io::Result<()> {
        std::fs::File::open(path)?.sync_all()
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }

    fn remove_dir(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_dir(path)
    }

    fn read_dir(&self, path: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(path)? {
            // A name that is not UTF-8 is nothing the store wrote: skipped.
            if let Ok(name) = entry?.file_name().into_string() {
                names.push(name);
            }
        }
        names.sort();
        Ok(names)
    }

    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        std::fs::read(path)
    }

    fn lock_exclusive(&self, path: &Path) -> io::Result<LockGuard> {
        use std::os::fd::AsRawFd;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        // SAFETY: `file` is open for the whole call, so its descriptor is valid; flock takes
        // no pointers.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // flock(2) locks belong to the open file description: closing `file` (dropping the
        // guard) releases the lock, and a second open of the same file, in this process or
        // another, conflicts with it.
        Ok(Box::new(file))
    }

    fn create(&self, path: &Path) -> io::Result<Box<dyn FsFile>> {
        real_file(
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(path)?,
        )
    }

    fn open_append(&self, path: &Path) -> io::Result<Box<dyn FsFile>> {
        real_file(
            std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(path)?,
        )
    }

    fn truncate(&self, path: &Path, len: u64) -> io::Result<()> {
        std::fs::OpenOptions::new()
            .write(true)
            .open(path)?
            .set_len(len)
    }

    fn file_len(&self, path: &Path) -> io::Result<u64> {
        Ok(std::fs::metadata(path)?.len())
    }

    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        create_dir_all_durably(self, path, |p| match std::fs::metadata(p) {
            Ok(m) => Ok(m.is_dir()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        })
    }

    fn canonicalize(&self, path: &Path) -> io::Result<PathBuf> {
        std::fs::canonicalize(path)
    }
}

/// How an injected fault behaves (see [`SimFs::fail_at`]).
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// The operation returns `EIO` and does nothing; later ones succeed.
    Error,
    /// The operation and every later one return `EIO` until [`SimFs::crash`].
    Crash,
}

/// A mutating operation, as [`SimFs::ops`] logs it.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    /// `create_dir`.
    CreateDir,
    /// `write` (create or truncate, and write).
    Write,
    /// `fsync` of a file.
    Fsync,
    /// `rename`.
    Rename,
    /// `fsync` of a directory.
    FsyncDir,
    /// `remove_file` (unlink).
    RemoveFile,
    /// `remove_dir` (rmdir).
    RemoveDir,
    /// `create` or `open_append` (a file opened for writing, created if missing).
    Create,
    /// A handle's `write_all`.
    Append,
    /// `truncate` (set a file's length).
    Truncate,
}

/// One logged operation.
#[doc(hidden)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Op {
    /// Its number (from 1, over the SimFs's life).
    pub index: u64,
    /// What it was.
    pub kind: OpKind,
    /// The file or directory.
    pub path: PathBuf,
    /// A rename's destination.
    pub to: Option<PathBuf>,
    /// Whether it succeeded.
    pub ok: bool,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{} {:?} {}", self.index, self.kind, self.path.display())?;
        if let Some(to) = &self.to {
            write!(f, " -> {}", to.display())?;
        }
        if !self.ok {
            f.write_str(" (failed)")?;
        }
        Ok(())
    }
}

#[derive(Debug)]
enum Node {
    File {
        durable: Vec<u8>,
        current: Vec<u8>,
    },
    Dir {
        durable: BTreeMap<String, u64>,
        current: BTreeMap<String, u64>,
    },
}

#[derive(Debug)]
struct Sim {
    nodes: HashMap<u64, Node>,
    next_node: u64,
    ops: Vec<Op>,
    fault: Option<(u64, FaultKind)>,
    crashed: bool,
    /// Locked paths, with the token of the guard holding each.
    locks: HashMap<PathBuf, u64>,
    next_token: u64,
    /// Counts crashes: a file handle opened before one is dead after it.
    boot: u64,
}

const ROOT: u64 = 0;

/// An in-memory file system that models what a crash keeps, with fault injection (see the
/// module docs). Cloning shares the same file system.
#[doc(hidden)]
#[derive(Debug, Clone)]
pub struct SimFs {
    sim: Arc<Mutex<Sim>>,
}

impl Default for SimFs {
    fn default() -> Self {
        Self::new()
    }
}

fn eio(what: &str) -> io::Error {
    io::Error::new(
        io::Error::from_raw_os_error(libc::EIO).kind(),
        format!("{what} (simulated EIO)"),
    )
}

fn errno(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

/// `path`'s normal components (`.` skipped; `..` refused: the store never builds one).
fn components(path: &Path) -> io::Result<Vec<String>> {
    let mut out = Vec::new();
    for c in path.components() {
        match c {
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
            Component::ParentDir => return Err(errno(libc::EINVAL)),
            Component::Normal(s) => out.push(s.to_str().ok_or_else(|| errno(libc::EINVAL))?.into()),
        }
    }
    Ok(out)
}

impl Sim {
    /// The node `path` names in the current view.
    fn lookup(&self, path: &Path) -> io::Result<u64> {
        let mut node = ROOT;
        for name in components(path)? {
            match self.nodes.get(&node) {
                Some(Node::Dir { current, .. }) => {
                    node = *current.get(&name).ok_or_else(|| errno(libc::ENOENT))?;
                }
                _ => return Err(errno(libc::ENOTDIR)),
            }
        }
        Ok(node)
    }

    /// The parent directory's node and the last name of `path`.
    fn parent(&self, path: &Path) -> io::Result<(u64, String)> {
        let mut names = components(path)?;
        let name = names.pop().ok_or_else(|| errno(libc::EINVAL))?;
        let parent: PathBuf = names.iter().collect();
        let node = self.lookup(&parent)?;
        match self.nodes.get(&node) {
            Some(Node::Dir { .. }) => Ok((node, name)),
            _ => Err(errno(libc::ENOTDIR)),
        }
    }

    fn entries_mut(&mut self, dir: u64) -> &mut BTreeMap<String, u64> {
        match self.nodes.get_mut(&dir) {
            Some(Node::Dir { current, .. }) => current,
            _ => unreachable!("parent() returned a directory"),
        }
    }

    /// Counts, logs and gates one mutating operation: `Err` when a fault applies.
    fn begin(&mut self, kind: OpKind, path: &Path, to: Option<&Path>) -> io::Result<usize> {
        let index = self.ops.len() as u64 + 1;
        self.ops.push(Op {
            index,
            kind,
            path: path.to_path_buf(),
            to: to.map(Path::to_path_buf),
            ok: false,
        });
        if self.crashed {
            return Err(eio("the machine crashed"));
        }
        match self.fault {
            Some((k, FaultKind::Error)) if k == index => Err(eio("injected fault")),
            Some((k, FaultKind::Crash)) if k == index => {
                self.crashed = true;
                Err(eio("injected crash"))
            }
            _ => Ok(self.ops.len() - 1),
        }
    }

    fn mutate(
        &mut self,
        kind: OpKind,
        path: &Path,
        to: Option<&Path>,
        f: impl FnOnce(&mut Sim) -> io::Result<()>,
    ) -> io::Result<()> {
        let slot = self.begin(kind, path, to)?;
        f(self)?;
        self.ops[slot].ok = true;
        Ok(())
    }

    /// Opens file `path` for writing (created if missing; emptied with `truncate`): its node.
    fn open_file(&mut self, path: &Path, truncate: bool) -> io::Result<u64> {
        let (parent, name) = self.parent(path)?;
        match self.entries_mut(parent).get(&name).copied() {
            Some(node) => match self.nodes.get_mut(&node) {
                Some(Node::File { current, .. }) => {
                    if truncate {
                        current.clear();
                    }
                    Ok(node)
                }
                _ => Err(errno(libc::EISDIR)),
            },
            None => {
                let node = self.new_node(Node::File {
                    durable: Vec::new(),
                    current: Vec::new(),
                });
                self.entries_mut(parent).insert(name, node);
                Ok(node)
            }
        }
    }

    fn new_node(&mut self, node: Node) -> u64 {
        self.next_node += 1;
        self.nodes.insert(self.next_node, node);
        self.next_node
    }
}

impl SimFs {
    /// An empty file system (only the root directory, durable).
    pub fn new() -> Self {
        let mut nodes = HashMap::new();
        nodes.insert(
            ROOT,
            Node::Dir {
                durable: BTreeMap::new(),
                current: BTreeMap::new(),
            },
        );
        SimFs {
            sim: Arc::new(Mutex::new(Sim {
                nodes,
                next_node: ROOT,
                ops: Vec::new(),
                fault: None,
                crashed: false,
                locks: HashMap::new(),
                next_token: 0,
                boot: 0,
            })),
        }
    }

    /// Makes the `k`-th mutating operation (counted from 1 over this file system's life, see
    /// [`op_count`](Self::op_count)) fail as `kind` says. Replaces an earlier fault.
    pub fn fail_at(&self, k: u64, kind: FaultKind) {
        self.sim.lock().fault = Some((k, kind));
    }

    /// Removes a pending fault.
    pub fn clear_fault(&self) {
        self.sim.lock().fault = None;
    }

    /// How many mutating operations were attempted so far.
    pub fn op_count(&self) -> u64 {
        self.sim.lock().ops.len() as u64
    }

    /// Every mutating operation attempted so far, in order.
    pub fn ops(&self) -> Vec<Op> {
        self.sim.lock().ops.clone()
    }

    /// Whether a [`FaultKind::Crash`] fault has struck (and [`crash`](Self::crash) not yet
    /// run).
    pub fn crashed(&self) -> bool {
        self.sim.lock().crashed
    }

    /// The machine crashes and restarts: everything not durable is lost (file contents not
    /// fsynced, directory entries not fsynced, and whatever only they reached), locks are
    /// released, and a pending fault is removed.
    pub fn crash(&self) {
        let mut sim = self.sim.lock();
        let mut keep = vec![ROOT];
        let mut reachable = std::collections::HashSet::new();
        while let Some(id) = keep.pop() {
            if !reachable.insert(id) {
                continue;
            }
            match sim.nodes.get_mut(&id) {
                Some(Node::File { durable, current }) => current.clone_from(durable),
                Some(Node::Dir { durable, current }) => {
                    current.clone_from(durable);
                    keep.extend(durable.values().copied());
                }
                None => {}
            }
        }
        sim.nodes.retain(|id, _| reachable.contains(id));
        sim.crashed = false;
        sim.fault = None;
        sim.locks.clear();
        sim.boot += 1;
    }

    /// Changes file `path`'s bytes, durably and in place (a test's bit flip or truncation on
    /// the disk); no operation is counted.
    pub fn corrupt(&self, path: &Path, f: impl FnOnce(&mut Vec<u8>)) -> io::Result<()> {
        let mut sim = self.sim.lock();
        let node = sim.lookup(path)?;
        match sim.nodes.get_mut(&node) {
            Some(Node::File { durable, current }) => {
                f(current);
                durable.clone_from(current);
                Ok(())
            }
            _ => Err(errno(libc::EISDIR)),
        }
    }
}

impl super::store::Fs for SimFs {
    fn create_dir(&self, path: &Path) -> io::Result<()> {
        self.sim
            .lock()
            .mutate(OpKind::CreateDir, path, None, |sim| {
                let (parent, name) = sim.parent(path)?;
                if sim.entries_mut(parent).contains_key(&name) {
                    return Err(errno(libc::EEXIST));
                }
                let node = sim.new_node(Node::Dir {
                    durable: BTreeMap::new(),
                    current: BTreeMap::new(),
                });
                sim.entries_mut(parent).insert(name, node);
                Ok(())
            })
    }

    fn write(&self, path: &Path, bytes: &[u8]) -> io::Result<()> {
        self.sim.lock().mutate(OpKind::Write, path, None, |sim| {
            let (parent, name) = sim.parent(path)?;
            match sim.entries_mut(parent).get(&name).copied() {
                Some(node) => match sim.nodes.get_mut(&node) {
                    Some(Node::File { current, .. }) => {
                        *current = bytes.to_vec();
                        Ok(())
                    }
                    _ => Err(errno(libc::EISDIR)),
                },
                None => {
                    let node = sim.new_node(Node::File {
                        durable: Vec::new(),
                        current: bytes.to_vec(),
                    });
                    sim.entries_mut(parent).insert(name, node);
                    Ok(())
                }
            }
        })
    }

    fn fsync(&self, path: &Path) -> io::Result<()> {
        self.sim.lock().mutate(OpKind::Fsync, path, None, |sim| {
            let node = sim.lookup(path)?;
            match sim.nodes.get_mut(&node) {
                Some(Node::File { durable, current }) => {
                    durable.clone_from(current);
                    Ok(())
                }
                _ => Err(errno(libc::EISDIR)),
            }
        })
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.sim
            .lock()
            .mutate(OpKind::Rename, from, Some(to), |sim| {
                let (src_dir, src_name) = sim.parent(from)?;
                let (dst_dir, dst_name) = sim.parent(to)?;
                let node = *sim
                    .entries_mut(src_dir)
                    .get(&src_name)
                    .ok_or_else(|| errno(libc::ENOENT))?;
                if let Some(old) = sim.entries_mut(dst_dir).get(&dst_name).copied() {
                    if matches!(sim.nodes.get(&old), Some(Node::Dir { .. })) {
                        return Err(errno(libc::EISDIR));
                    }
                }
                sim.entries_mut(src_dir).remove(&src_name);
                sim.entries_mut(dst_dir).insert(dst_name, node);
                Ok(())
            })
    }

    fn fsync_dir(&self, path: &Path) -> io::Result<()> {
        self.sim.lock().mutate(OpKind::FsyncDir, path, None, |sim| {
            let node = sim.lookup(path)?;
            match sim.nodes.get_mut(&node) {
                Some(Node::Dir { durable, current }) => {
                    durable.clone_from(current);
                    Ok(())
                }
                _ => Err(errno(libc::ENOTDIR)),
            }
        })
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        self.sim
            .lock()
            .mutate(OpKind::RemoveFile, path, None, |sim| {
                let (parent, name) = sim.parent(path)?;
                let node = *sim
                    .entries_mut(parent)
                    .get(&name)
                    .ok_or_else(|| errno(libc::ENOENT))?;
                if matches!(sim.nodes.get(&node), Some(Node::Dir { .. })) {
                    return Err(errno(libc::EISDIR));
                }
                sim.entries_mut(parent).remove(&name);
                Ok(())
            })
    }

    fn remove_dir(&self, path: &Path) -> io::Result<()> {
        self.sim
            .lock()
            .mutate(OpKind::RemoveDir, path, None, |sim| {
                let (parent, name) = sim.parent(path)?;
                let node = *sim
                    .entries_mut(parent)
                    .get(&name)
                    .ok_or_else(|| errno(libc::ENOENT))?;
                match sim.nodes.get(&node) {
                    Some(Node::Dir { current, .. }) if current.is_empty() => {}
                    Some(Node::Dir { .. }) => return Err(errno(libc::ENOTEMPTY)),
                    _ => return Err(errno(libc::ENOTDIR)),
                }
                sim.entries_mut(parent).remove(&name);
                Ok(())
            })
    }

    fn read_dir(&self, path: &Path) -> io::Result<Vec<String>> {
        let sim = self.sim.lock();
        let node = sim.lookup(path)?;
        match sim.nodes.get(&node) {
            Some(Node::Dir { current, .. }) => Ok(current.keys().cloned().collect()),
            _ => Err(errno(libc::ENOTDIR)),
        }
    }

    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        let sim = self.sim.lock();
        let node = sim.lookup(path)?;
        match sim.nodes.get(&node) {
            Some(Node::File { current, .. }) => Ok(current.clone()),
            _ => Err(errno(libc::EISDIR)),
        }
    }

    fn create(&self, path: &Path) -> io::Result<Box<dyn FsFile>> {
        self.open_handle(path, true)
    }

    fn open_append(&self, path: &Path) -> io::Result<Box<dyn FsFile>> {
        self.open_handle(path, false)
    }

    fn truncate(&self, path: &Path, len: u64) -> io::Result<()> {
        self.sim.lock().mutate(OpKind::Truncate, path, None, |sim| {
            let node = sim.lookup(path)?;
            match sim.nodes.get_mut(&node) {
                Some(Node::File { current, .. }) => {
                    current.resize(len as usize, 0);
                    Ok(())
                }
                _ => Err(errno(libc::EISDIR)),
            }
        })
    }

    fn file_len(&self, path: &Path) -> io::Result<u64> {
        let sim = self.sim.lock();
        let node = sim.lookup(path)?;
        match sim.nodes.get(&node) {
            Some(Node::File { current, .. }) => Ok(current.len() as u64),
            _ => Err(errno(libc::EISDIR)),
        }
    }

    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        create_dir_all_durably(self, path, |p| {
            let sim = self.sim.lock();
            match sim.lookup(p) {
                Ok(node) => match sim.nodes.get(&node) {
                    Some(Node::Dir { .. }) => Ok(true),
                    _ => Err(errno(libc::ENOTDIR)),
                },
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
                Err(e) => Err(e),
            }
        })
    }

    fn canonicalize(&self, path: &Path) -> io::Result<PathBuf> {
        let names = components(path)?;
        self.sim.lock().lookup(path)?;
        let mut out = PathBuf::from("/");
        out.extend(names);
        Ok(out)
    }

    fn lock_exclusive(&self, path: &Path) -> io::Result<LockGuard> {
        let mut sim = self.sim.lock();
        if sim.locks.contains_key(path) {
            return Err(errno(libc::EWOULDBLOCK));
        }
        sim.next_token += 1;
        let token = sim.next_token;
        sim.locks.insert(path.to_path_buf(), token);
        Ok(Box::new(SimLock {
            sim: Arc::clone(&self.sim),
            path: path.to_path_buf(),
            token,
        }))
    }
}

impl SimFs {
    fn open_handle(&self, path: &Path, truncate: bool) -> io::Result<Box<dyn FsFile>> {
        let mut sim = self.sim.lock();
        let mut node = 0;
        sim.mutate(OpKind::Create, path, None, |sim| {
            node = sim.open_file(path, truncate)?;
            Ok(())
        })?;
        Ok(Box::new(SimFile {
            sim: Arc::clone(&self.sim),
            node,
            boot: sim.boot,
            path: path.to_path_buf(),
        }))
    }
}

/// A [`SimFs`] file handle. Its writes go to the file's end (the sinks write their files
/// sequentially, and nothing else writes them), also if it was unlinked or renamed meanwhile
/// (the handle holds the file, not the name). A crash kills it: every later call is `EIO`.
struct SimFile {
    sim: Arc<Mutex<Sim>>,
    node: u64,
    boot: u64,
    path: PathBuf,
}

impl SimFile {
    fn with_data(
        &self,
        kind: OpKind,
        f: impl FnOnce(&mut Vec<u8>, &mut Vec<u8>),
    ) -> io::Result<()> {
        let mut sim = self.sim.lock();
        let (boot, node) = (self.boot, self.node);
        sim.mutate(kind, &self.path, None, |sim| {
            if sim.boot != boot {
                return Err(eio("a handle opened before the crash"));
            }
            match sim.nodes.get_mut(&node) {
                Some(Node::File { durable, current }) => {
                    f(durable, current);
                    Ok(())
                }
                _ => Err(eio("the file is gone")),
            }
        })
    }
}

impl FsFile for SimFile {
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.with_data(OpKind::Append, |_, current| current.extend_from_slice(buf))
    }

    fn sync_data(&mut self) -> io::Result<()> {
        self.with_data(OpKind::Fsync, |durable, current| {
            durable.clone_from(current)
        })
    }

    fn is_regular(&self) -> bool {
        true
    }
}

/// A [`SimFs`] lock: released on drop, unless a crash released it first (and another holder
/// may have it now: the token tells).
struct SimLock {
    sim: Arc<Mutex<Sim>>,
    path: PathBuf,
    token: u64,
}

impl Drop for SimLock {
    fn drop(&mut self) {
        let mut sim = self.sim.lock();
        if sim.locks.get(&self.path) == Some(&self.token) {
            sim.locks.remove(&self.path);
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::super::store::Fs;
    use super::*;

    fn p(s: &str) -> &Path {
        Path::new(s)
    }

    #[test]
    fn only_fsynced_data_under_fsynced_names_survives_a_crash() {
        let fs = SimFs::new();
        fs.create_dir(p("/d")).unwrap();
        fs.fsync_dir(p("/")).unwrap();
        fs.write(p("/d/a"), b"aaa").unwrap();
        fs.fsync(p("/d/a")).unwrap();
        fs.write(p("/d/b"), b"bbb").unwrap(); // data never fsynced
        fs.fsync_dir(p("/d")).unwrap();
        fs.write(p("/d/c"), b"ccc").unwrap();
        fs.fsync(p("/d/c")).unwrap(); // name never made durable
        fs.write(p("/d/a"), b"new").unwrap(); // overwrite not fsynced
        fs.crash();
        assert_eq!(fs.read_dir(p("/d")).unwrap(), vec!["a", "b"]);
        assert_eq!(fs.read(p("/d/a")).unwrap(), b"aaa");
        assert_eq!(fs.read(p("/d/b")).unwrap(), b"");
    }

    #[test]
    fn rename_and_removal_need_the_directory_fsync() {
        let fs = SimFs::new();
        fs.create_dir(p("/d")).unwrap();
        fs.fsync_dir(p("/")).unwrap();
        fs.write(p("/d/t"), b"x").unwrap();
        fs.fsync(p("/d/t")).unwrap();
        fs.fsync_dir(p("/d")).unwrap();
        fs.rename(p("/d/t"), p("/d/f")).unwrap();
        fs.crash();
        assert_eq!(fs.read_dir(p("/d")).unwrap(), vec!["t"]);
        fs.rename(p("/d/t"), p("/d/f")).unwrap();
        fs.fsync_dir(p("/d")).unwrap();
        fs.remove_file(p("/d/f")).unwrap();
        assert_eq!(
            fs.remove_dir(p("/")).unwrap_err().raw_os_error(),
            Some(libc::EINVAL)
        );
        fs.crash();
        assert_eq!(fs.read(p("/d/f")).unwrap(), b"x");
    }

    #[test]
    fn a_volatile_directory_takes_its_durable_files_with_it() {
        let fs = SimFs::new();
        fs.create_dir(p("/d")).unwrap();
        fs.write(p("/d/a"), b"a").unwrap();
        fs.fsync(p("/d/a")).unwrap();
        fs.fsync_dir(p("/d")).unwrap();
        fs.crash();
        assert_eq!(fs.read_dir(p("/")).unwrap(), Vec::<String>::new());
        assert_eq!(
            fs.read(p("/d/a")).unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
    }

    #[test]
    fn faults_error_once_or_crash_for_good() {
        let fs = SimFs::new();
        fs.fail_at(2, FaultKind::Error);
        fs.create_dir(p("/d")).unwrap();
        assert!(fs.write(p("/d/a"), b"a").is_err());
        assert!(fs.read(p("/d/a")).is_err(), "a failed op does nothing");
        fs.write(p("/d/a"), b"a").unwrap();
        fs.fail_at(5, FaultKind::Crash);
        fs.fsync(p("/d/a")).unwrap();
        assert!(fs.fsync_dir(p("/d")).is_err());
        assert!(fs.crashed());
        assert!(fs.fsync_dir(p("/")).is_err(), "later ops fail too");
        fs.crash();
        assert!(!fs.crashed());
        assert_eq!(fs.read_dir(p("/")).unwrap(), Vec::<String>::new());
        let log: Vec<(u64, OpKind, bool)> =
            fs.ops().iter().map(|o| (o.index, o.kind, o.ok)).collect();
        assert_eq!(
            log,
            vec![
                (1, OpKind::CreateDir, true),
                (2, OpKind::Write, false),
                (3, OpKind::Write, true),
                (4, OpKind::Fsync, true),
                (5, OpKind::FsyncDir, false),
                (6, OpKind::FsyncDir, false),
            ]
        );
    }

    #[test]
    fn streaming_writes_survive_only_when_synced() {
        let fs = SimFs::new();
        fs.create_dir_all(p("/a/b")).unwrap();
        let mut f = fs.create(p("/a/b/f")).unwrap();
        f.write_all(b"one ").unwrap();
        f.sync_data().unwrap();
        f.write_all(b"two").unwrap();
        assert_eq!(fs.file_len(p("/a/b/f")).unwrap(), 7);
        fs.fsync_dir(p("/a/b")).unwrap();
        fs.crash();
        // create_dir_all made both directories durable; the unsynced write is gone.
        assert_eq!(fs.read(p("/a/b/f")).unwrap(), b"one ");
        assert!(f.write_all(b"x").is_err(), "a handle dies with the crash");
        let mut g = fs.open_append(p("/a/b/f")).unwrap();
        fs.truncate(p("/a/b/f"), 2).unwrap();
        g.write_all(b"!").unwrap();
        assert_eq!(fs.read(p("/a/b/f")).unwrap(), b"on!");
        fs.crash();
        assert_eq!(
            fs.read(p("/a/b/f")).unwrap(),
            b"one ",
            "truncation not synced"
        );
        assert_eq!(fs.canonicalize(p("/a/./b")).unwrap(), PathBuf::from("/a/b"));
        let kinds: Vec<OpKind> = fs.ops().iter().map(|o| o.kind).collect();
        assert_eq!(
            &kinds[..8],
            &[
                OpKind::CreateDir,
                OpKind::FsyncDir,
                OpKind::CreateDir,
                OpKind::FsyncDir,
                OpKind::Create,
                OpKind::Append,
                OpKind::Fsync,
                OpKind::Append,
            ]
        );
    }

    #[test]
    fn locks_conflict_until_dropped_or_crashed() {
        let fs = SimFs::new();
        let g = fs.lock_exclusive(p("/LOCK")).unwrap();
        assert_eq!(
            fs.lock_exclusive(p("/LOCK")).unwrap_err().raw_os_error(),
            Some(libc::EWOULDBLOCK)
        );
        fs.crash();
        let g2 = fs.lock_exclusive(p("/LOCK")).unwrap();
        drop(g); // the pre-crash guard must not release the new holder's lock
        assert!(fs.lock_exclusive(p("/LOCK")).is_err());
        drop(g2);
        fs.lock_exclusive(p("/LOCK")).unwrap();
    }
}
