//! The checkpoint store: where checkpoints are written, verified and found again.
//!
//! [`Store`] is the interface the coordinator and recovery use; [`FsStore`] is the default,
//! on a local directory, over the [`Fs`] trait so that tests can put a fault-injecting file
//! system under it (`SimFs`, in [`super::fs`]).
//!
//! On disk (format 1, see docs/checkpoints.md):
//! ```text
//! DIR/LOCK                      flock(2)ed for the run's life
//! DIR/COMPLETED                 the run completed (the time, ms since the epoch): written
//!                               before its checkpoints are removed, kept until a new run
//! DIR/stdin.spool               the stdin spool, with `spool_stdin` (see `spool`)
//! DIR/chk-00000007/             one directory per checkpoint
//!     <stage>#<i>.state         one file per stage instance (encoded `InstanceState`); the
//!                               stage name percent-escaped (`escape_name`)
//!     MANIFEST                  written last: `MILLRACE-MANIFEST v1`, the manifest as one
//!                               line of JSON (every file with size and CRC32C), and
//!                               `crc32c <hex>` of the bytes before it; its presence makes
//!                               the checkpoint complete
//!     *.tmp-<32 hex>            a write in progress (or a crashed one's leftover)
//! ```
//! Every file is written under a temporary name, fsynced, renamed, and its directory fsynced;
//! the design note `store.md` beside this file gives the protocol step by step, what each
//! failure leaves behind and how recovery treats it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{CheckpointId, InstanceId};
use crate::error::Error;
// std's `Arc`, not the loom shim's: the store's API hands out `Arc<FsStore>` and takes
// `Arc<dyn Fs>` (an unsized coercion loom's `Arc` cannot do), and no modelled protocol lives
// in it. Its lock is the shim's.
use std::sync::Arc;

use crate::sync::Mutex;

/// The on-disk format version the manifest carries.
pub const FORMAT: u32 = 1;

/// One file of a checkpoint as the manifest lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Its name inside the checkpoint's directory.
    pub name: String,
    /// Its length in bytes.
    pub size: u64,
    /// CRC32C (Castagnoli) of its bytes.
    pub crc32c: u32,
}

/// What the manifest records of one stage instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceEntry {
    /// The instance.
    pub instance: InstanceId,
    /// The stage's fingerprint (its kind and parameters): a resume whose stage of this name
    /// changed is refused when the stage holds state.
    pub fingerprint: String,
    /// Whether the stage holds state (a changed stateless stage may be resumed).
    pub stateful: bool,
    /// Its state file.
    pub file: FileEntry,
    /// The key groups its keyed state covers, `[start, end)`.
    pub key_groups: Option<(u16, u16)>,
    /// Source positions (`(part, byte offset)`).
    pub positions: Vec<(String, u64)>,
    /// Sink files pre-committed at the barrier, committed once the checkpoint completes.
    pub precommitted: Vec<String>,
}

/// A checkpoint's manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`FORMAT`].
    pub format: u32,
    /// The checkpoint's number.
    pub id: CheckpointId,
    /// When it completed (milliseconds since the Unix epoch).
    pub created_ms: u64,
    /// The key groups keyed state is stored by.
    pub max_parallelism: u16,
    /// Every stage instance of the run, sorted.
    pub instances: Vec<InstanceEntry>,
}

/// One checkpoint found in a store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing {
    /// Its number.
    pub id: CheckpointId,
    /// Its manifest's time, when it has one that decodes.
    pub created_ms: Option<u64>,
    /// Bytes of all its files.
    pub bytes: u64,
    /// `None` when it is complete and every file verifies; otherwise why not (no manifest, a
    /// torn or bit-flipped file, a missing file, …).
    pub problem: Option<String>,
}

/// Where checkpoints are kept. Every method may do I/O: the coordinator never calls one while
/// holding its lock.
pub trait Store: Send + Sync + 'static {
    /// Creates checkpoint `id`'s (empty) place.
    fn begin(&self, id: CheckpointId) -> Result<(), Error>;
    /// Writes file `name` of checkpoint `id` crash-safely (temporary name, fsync, rename,
    /// directory fsync) and returns its entry. Fails if the checkpoint was discarded.
    fn put(&self, id: CheckpointId, name: &str, bytes: &[u8]) -> Result<FileEntry, Error>;
    /// Writes the manifest, last and by the same protocol: afterwards the checkpoint is
    /// complete. Returns the manifest's size in bytes.
    fn complete(&self, manifest: &Manifest) -> Result<u64, Error>;
    /// Removes everything of checkpoint `id` (complete or not); removing one that is not there
    /// succeeds.
    fn discard(&self, id: CheckpointId) -> Result<(), Error>;
    /// Every checkpoint present, ascending, each verified.
    fn list(&self) -> Result<Vec<Listing>, Error>;
    /// Checkpoint `id`'s manifest, after verifying it and the size and checksum of every file
    /// it lists.
    fn load(&self, id: CheckpointId) -> Result<Manifest, Error>;
    /// File `name` of checkpoint `id`, verified against `entry`.
    fn read(&self, id: CheckpointId, entry: &FileEntry) -> Result<Vec<u8>, Error>;
    /// The checkpoints present, ascending, each with whether its manifest is there — without
    /// reading or verifying their files (what a start-up needs to number the next checkpoint
    /// and to find the newest candidate). The default lists (and so verifies) them all.
    fn ids(&self) -> Result<Vec<(CheckpointId, bool)>, Error> {
        Ok(self
            .list()?
            .into_iter()
            .map(|l| (l.id, l.problem.is_none()))
            .collect())
    }
    /// Checkpoint `id`'s manifest and the bytes of every file it lists (in its order), each
    /// verified against its entry: what a resume restores, reading each file once. The default
    /// is [`load`](Self::load) and a [`read`](Self::read) per file.
    fn load_files(&self, id: CheckpointId) -> Result<(Manifest, Vec<Vec<u8>>), Error> {
        let manifest = self.load(id)?;
        let files = read_listed(self, id, &manifest)?;
        Ok((manifest, files))
    }
    /// Records durably that the run using the store completed, before its checkpoints are
    /// removed: a crash during the removal still leaves a completed run, which a later
    /// `--resume` has nothing to do for. The default (a store without it) records nothing.
    fn mark_completed(&self) -> Result<(), Error> {
        Ok(())
    }
    /// Whether the store's run completed ([`mark_completed`](Self::mark_completed)), with
    /// when (milliseconds since the Unix epoch; 0 if unknown).
    fn completed(&self) -> Result<Option<u64>, Error> {
        Ok(None)
    }
    /// Clears the mark, durably: a new run starts on the store.
    fn clear_completed(&self) -> Result<(), Error> {
        Ok(())
    }
}

/// Every file `manifest` lists, in its order, each read once and verified by [`Store::read`].
fn read_listed<S: Store + ?Sized>(
    store: &S,
    id: CheckpointId,
    manifest: &Manifest,
) -> Result<Vec<Vec<u8>>, Error> {
    manifest
        .instances
        .iter()
        .map(|e| store.read(id, &e.file))
        .collect()
}

/// The file-system operations [`FsStore`] uses, so that a test can fail or "crash" any one of
/// them (see `SimFs`).
pub trait Fs: Send + Sync + 'static {
    /// Creates a directory (its parent exists).
    fn create_dir(&self, path: &Path) -> std::io::Result<()>;
    /// Creates (or truncates) a file and writes all of `bytes` (not yet durable).
    fn write(&self, path: &Path, bytes: &[u8]) -> std::io::Result<()>;
    /// Makes a file's contents durable.
    fn fsync(&self, path: &Path) -> std::io::Result<()>;
    /// Renames a file (atomically replacing `to`).
    fn rename(&self, from: &Path, to: &Path) -> std::io::Result<()>;
    /// Makes a directory's entries (creations, renames, removals) durable.
    fn fsync_dir(&self, path: &Path) -> std::io::Result<()>;
    /// Removes a file.
    fn remove_file(&self, path: &Path) -> std::io::Result<()>;
    /// Removes an empty directory.
    fn remove_dir(&self, path: &Path) -> std::io::Result<()>;
    /// The names in a directory.
    fn read_dir(&self, path: &Path) -> std::io::Result<Vec<String>>;
    /// A file's bytes.
    fn read(&self, path: &Path) -> std::io::Result<Vec<u8>>;
    /// Takes an exclusive, non-blocking lock on `path` (created if missing), held until the
    /// guard is dropped; `EWOULDBLOCK` when another holder has it.
    fn lock_exclusive(&self, path: &Path) -> std::io::Result<super::fs::LockGuard>;

    // Streaming writes, for the sinks (which write their output through the run's `Fs`, so
    // that a simulated crash drops their unsynced data and undoes their unsynced renames
    // together with the store's).

    /// Creates (or truncates) a file and opens it for writing at its start.
    fn create(&self, path: &Path) -> std::io::Result<Box<dyn super::fs::FsFile>>;
    /// Opens a file for appending (created empty if missing, never truncated): every write
    /// goes to the file's end at the time of the write, also after a `truncate`.
    fn open_append(&self, path: &Path) -> std::io::Result<Box<dyn super::fs::FsFile>>;
    /// Sets a file's length (not yet durable: `fsync` it).
    fn truncate(&self, path: &Path, len: u64) -> std::io::Result<()>;
    /// A file's length (what was written, durable or not).
    fn file_len(&self, path: &Path) -> std::io::Result<u64>;
    /// Creates a directory and its missing parents, making each created entry durable (the
    /// parent of every created directory is fsynced): a directory that a crash can take away
    /// would take its durable files with it.
    fn create_dir_all(&self, path: &Path) -> std::io::Result<()>;
    /// The absolute path without `.`, `..` or symbolic links (the directory must exist).
    fn canonicalize(&self, path: &Path) -> std::io::Result<std::path::PathBuf>;
}

/// The manifest's file name in a checkpoint's directory.
pub const MANIFEST: &str = "MANIFEST";
/// The lock file's name in the checkpoint directory.
pub const LOCK: &str = "LOCK";
/// The file that says the directory's run completed ([`Store::mark_completed`]).
pub const COMPLETED: &str = "COMPLETED";
/// The manifest's first line, before the format version.
const HEADER: &str = "MILLRACE-MANIFEST v";
/// The manifest's last line, before its CRC32C in hex.
const TRAILER: &str = "crc32c ";
/// How often `discard` re-lists a directory that a late writer keeps non-empty.
const DISCARD_ATTEMPTS: usize = 16;
/// The longest file name `put` accepts (NAME_MAX is 255; a temporary name adds 37 bytes).
const MAX_NAME: usize = 200;

/// The directory name of checkpoint `id` (`chk-00000007`).
pub fn checkpoint_dir_name(id: CheckpointId) -> String {
    format!("chk-{id:08}")
}

/// The checkpoint a directory name belongs to (`chk-00000007` → 7), for exactly the names
/// [`checkpoint_dir_name`] makes.
pub fn parse_checkpoint_dir_name(name: &str) -> Option<CheckpointId> {
    let digits = name.strip_prefix("chk-")?;
    if digits.len() < 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let id = digits.parse().ok()?;
    (checkpoint_dir_name(id) == name).then_some(id)
}

/// Escapes a stage name for a file name, reversibly: every byte outside `[A-Za-z0-9._-]`
/// becomes `%XX` (so `/` can never leave the directory, `#` stays the instance separator, and
/// two stages never share a file).
pub fn escape_name(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The inverse of [`escape_name`]; `None` for a name it cannot have made.
pub fn unescape_name(escaped: &str) -> Option<String> {
    let bytes = escaped.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                if hex.bytes().any(|b| b.is_ascii_lowercase()) {
                    return None;
                }
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-') => {
                out.push(b);
                i += 1;
            }
            _ => return None,
        }
    }
    String::from_utf8(out).ok()
}

/// The state file name of a stage instance: `<escaped stage>#<instance>.state`.
pub fn state_file_name(instance: &InstanceId) -> String {
    format!(
        "{}#{}.state",
        escape_name(&instance.stage),
        instance.instance
    )
}

/// The stage instance a [`state_file_name`] belongs to.
pub fn parse_state_file_name(name: &str) -> Option<InstanceId> {
    let (stage, rest) = name.strip_suffix(".state")?.rsplit_once('#')?;
    if rest.is_empty() || !rest.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(InstanceId {
        stage: unescape_name(stage)?,
        instance: rest.parse().ok()?,
    })
}

/// Whether `name` is a temporary name of the write protocol (`<name>.tmp-<32 hex digits>`):
/// never a checkpoint's file, removed when found by the store's owner.
fn is_temp(name: &str) -> bool {
    name.rsplit_once(".tmp-").is_some_and(|(_, r)| {
        r.len() == 32
            && r.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// Why a name cannot be a checkpoint file's, if it cannot.
fn bad_name(name: &str) -> Option<&'static str> {
    if name.is_empty() || name == "." || name == ".." {
        Some("empty, `.` or `..`")
    } else if name.len() > MAX_NAME {
        Some("too long (the stage name is over about 200 bytes)")
    } else if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'%' | b'#'))
    {
        Some("not made of [A-Za-z0-9._-%#] (escape it with escape_name)")
    } else if name == MANIFEST || is_temp(name) {
        Some("reserved")
    } else {
        None
    }
}

fn io_error(op: &'static str, path: &Path, source: std::io::Error) -> Error {
    Error::CheckpointIo {
        op,
        path: path.display().to_string(),
        source,
    }
}

fn is_not_found(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::NotFound
}

/// Encodes a manifest: the header line `MILLRACE-MANIFEST v1`, the manifest as one line of
/// JSON, and the trailer line `crc32c <8 hex digits>` with the CRC32C of every byte before it.
pub fn encode_manifest(manifest: &Manifest) -> Result<Vec<u8>, Error> {
    let mut out = format!("{HEADER}{}\n", manifest.format).into_bytes();
    serde_json::to_writer(&mut out, manifest).map_err(|e| Error::Checkpoint {
        message: format!(
            "checkpoint {}: cannot encode the manifest: {e}",
            manifest.id
        ),
    })?;
    out.push(b'\n');
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(format!("{TRAILER}{crc:08x}\n").as_bytes());
    Ok(out)
}

/// Decodes what [`encode_manifest`] wrote, or says why the bytes are not a whole, intact
/// manifest of the supported format (a torn or truncated one never decodes: its trailer is
/// missing or its checksum does not match).
pub fn decode_manifest(bytes: &[u8]) -> Result<Manifest, String> {
    let header_end =
        memchr::memchr(b'\n', bytes).ok_or("torn or truncated (no complete header line)")?;
    let version = std::str::from_utf8(&bytes[..header_end])
        .ok()
        .and_then(|h| h.strip_prefix(HEADER))
        .ok_or("not a millrace manifest (bad header line)")?;
    let version: u32 = version
        .parse()
        .map_err(|_| "not a millrace manifest (bad format version)")?;
    if version != FORMAT {
        return Err(format!(
            "format version {version} is not supported (this millrace reads version {FORMAT})"
        ));
    }
    let torn = "torn or truncated (no checksum trailer)";
    let body = bytes.strip_suffix(b"\n").ok_or(torn)?;
    let trailer_start = memchr::memrchr(b'\n', body).ok_or(torn)? + 1;
    if trailer_start <= header_end + 1 {
        return Err(torn.into());
    }
    let stored = std::str::from_utf8(&body[trailer_start..])
        .ok()
        .and_then(|t| t.strip_prefix(TRAILER))
        .filter(|h| h.len() == 8)
        .and_then(|h| u32::from_str_radix(h, 16).ok())
        .ok_or(torn)?;
    let computed = crc32c::crc32c(&bytes[..trailer_start]);
    if stored != computed {
        return Err(format!(
            "checksum mismatch (stored {stored:08x}, computed {computed:08x}): torn or bit-flipped"
        ));
    }
    let manifest: Manifest = serde_json::from_slice(&bytes[header_end + 1..trailer_start - 1])
        .map_err(|e| format!("does not decode: {e}"))?;
    if manifest.format != version {
        return Err(format!(
            "says format {} in a version {version} file",
            manifest.format
        ));
    }
    Ok(manifest)
}

/// A checkpoint's files as found: name → (size, CRC32C).
type Found = BTreeMap<String, (u64, u32)>;

/// What inspecting one checkpoint found.
struct Inspection {
    manifest: Option<Manifest>,
    bytes: u64,
    problem: Option<String>,
}

/// Which checkpoints a store's writers are at work on.
#[derive(Debug, Default, Clone)]
struct Progress {
    /// Begun, neither completed nor discarded.
    active: BTreeSet<CheckpointId>,
    /// The highest checkpoint completed or discarded (ids only grow: one begun later is
    /// higher).
    finished_max: Option<CheckpointId>,
}

impl Progress {
    fn finish(&mut self, id: CheckpointId) {
        self.active.remove(&id);
        self.finished_max = self.finished_max.max(Some(id));
    }
}

/// The checkpoint store on a local directory (see the module docs and `store.md` beside this
/// file for the format and the commit protocol).
///
/// Opened with [`FsStore::open`], it holds the directory's lock until dropped. Every fsync
/// error is fatal: it is returned as [`Error::CheckpointIo`] with `op: "fsync"`, and the store
/// takes no more writes afterwards (no later checkpoint can complete on top of data the kernel
/// may have dropped).
pub struct FsStore {
    dir: PathBuf,
    fs: Arc<dyn Fs>,
    /// `None` for a read-only store (`checkpoint list` / `verify` of a running job's dir).
    _lock: Option<super::fs::LockGuard>,
    /// Which checkpoints writers of this store are at work on: `list` leaves their
    /// temporary files alone.
    progress: Mutex<Progress>,
    /// The first fsync error, after which the store refuses writes.
    poisoned: Mutex<Option<String>>,
}

impl std::fmt::Debug for FsStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FsStore")
            .field("dir", &self.dir)
            .field("locked", &self._lock.is_some())
            .finish_non_exhaustive()
    }
}

impl FsStore {
    /// Opens (creating it if missing) the checkpoint directory `dir` on the real file system
    /// and takes its lock; [`Error::CheckpointDirLocked`] when another store (in this process
    /// or another) holds it. Stale temporary files of a crashed run are removed.
    ///
    /// ```
    /// use millrace::checkpoint::store::{FsStore, Manifest, Store, FORMAT};
    ///
    /// let dir = tempfile::tempdir()?;
    /// let store = FsStore::open(dir.path().join("ckpt"))?;
    /// store.begin(1)?;
    /// let file = store.put(1, "count#0.state", b"state bytes")?;
    /// let manifest = Manifest {
    ///     format: FORMAT,
    ///     id: 1,
    ///     created_ms: 0,
    ///     max_parallelism: 128,
    ///     instances: Vec::new(),
    /// };
    /// store.complete(&manifest)?;
    /// assert_eq!(store.list()?[0].problem, None);
    /// assert_eq!(store.load(1)?, manifest);
    /// assert_eq!(store.read(1, &file)?, b"state bytes");
    /// // A second run on the same directory is refused.
    /// assert!(FsStore::open(dir.path().join("ckpt")).is_err());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn open(dir: impl AsRef<Path>) -> Result<Arc<Self>, Error> {
        Self::open_with(dir, Arc::new(super::fs::RealFs))
    }

    /// [`open`](Self::open) over another file system (the tests' `SimFs`).
    #[doc(hidden)]
    pub fn open_with(dir: impl AsRef<Path>, fs: Arc<dyn Fs>) -> Result<Arc<Self>, Error> {
        let dir = dir.as_ref().to_path_buf();
        ensure_dir(&*fs, &dir)?;
        let lock_path = dir.join(LOCK);
        let lock = fs.lock_exclusive(&lock_path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::WouldBlock
                || e.raw_os_error() == Some(libc::EWOULDBLOCK)
            {
                Error::CheckpointDirLocked {
                    dir: dir.display().to_string(),
                }
            } else {
                io_error("lock", &lock_path, e)
            }
        })?;
        let store = FsStore {
            dir,
            fs,
            _lock: Some(lock),
            progress: Mutex::new(Progress::default()),
            poisoned: Mutex::new(None),
        };
        store.remove_stale(true)?;
        Ok(Arc::new(store))
    }

    /// Opens `dir` for reading only, without its lock (a running job's directory can be
    /// listed and verified): it never writes or removes anything.
    #[doc(hidden)]
    pub fn open_read_only(dir: impl AsRef<Path>, fs: Arc<dyn Fs>) -> Result<Arc<Self>, Error> {
        let dir = dir.as_ref().to_path_buf();
        fs.read_dir(&dir)
            .map_err(|e| io_error("read_dir", &dir, e))?;
        Ok(Arc::new(FsStore {
            dir,
            fs,
            _lock: None,
            progress: Mutex::new(Progress::default()),
            poisoned: Mutex::new(None),
        }))
    }

    /// The checkpoint directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn chk_dir(&self, id: CheckpointId) -> PathBuf {
        self.dir.join(checkpoint_dir_name(id))
    }

    fn check_poisoned(&self) -> Result<(), Error> {
        match &*self.poisoned.lock() {
            None => Ok(()),
            Some(first) => Err(Error::Checkpoint {
                message: format!(
                    "the store takes no more writes after an fsync error ({first}): an fsync \
                     error is fatal; restart the run with --resume"
                ),
            }),
        }
    }

    /// An fsync (of a file or a directory) that failed: the store is poisoned.
    fn fsync_failed(&self, path: &Path, source: std::io::Error) -> Error {
        let e = io_error("fsync", path, source);
        self.poisoned.lock().get_or_insert_with(|| e.to_string());
        e
    }

    fn fsync(&self, path: &Path) -> Result<(), Error> {
        self.fs.fsync(path).map_err(|e| self.fsync_failed(path, e))
    }

    fn fsync_dir(&self, path: &Path) -> Result<(), Error> {
        self.fs
            .fsync_dir(path)
            .map_err(|e| self.fsync_failed(path, e))
    }

    /// Removes temporary files left by a crashed writer. Only the lock's holder does this: at
    /// open (`all`), everywhere; from `list`, only in checkpoints this store finished (or a
    /// crashed run left, numbered below them) and is not at work on, so that a writer's
    /// temporary file is never removed under it.
    fn remove_stale(&self, all: bool) -> Result<(), Error> {
        if self._lock.is_none() {
            return Ok(());
        }
        let names = self
            .fs
            .read_dir(&self.dir)
            .map_err(|e| io_error("read_dir", &self.dir, e))?;
        let progress = self.progress.lock().clone();
        for name in names {
            let path = self.dir.join(&name);
            if is_temp(&name) && all {
                self.remove_if_present(&path)?;
            } else if let Some(id) = parse_checkpoint_dir_name(&name) {
                let finished = progress.finished_max.is_some_and(|max| id <= max);
                if progress.active.contains(&id) || !(all || finished) {
                    continue;
                }
                let Ok(inner) = self.fs.read_dir(&path) else {
                    continue;
                };
                for name in inner.iter().filter(|n| is_temp(n)) {
                    self.remove_if_present(&path.join(name))?;
                }
            }
        }
        Ok(())
    }

    fn remove_if_present(&self, path: &Path) -> Result<(), Error> {
        match self.fs.remove_file(path) {
            Err(e) if !is_not_found(&e) => Err(io_error("unlink", path, e)),
            _ => Ok(()),
        }
    }

    /// Writes `dir/name` by the protocol: `name.tmp-<random>`, fsync, rename, fsync `dir`.
    fn write_durably(
        &self,
        id: CheckpointId,
        dir: &Path,
        name: &str,
        bytes: &[u8],
    ) -> Result<(), Error> {
        let tmp = dir.join(format!("{name}.tmp-{}", crate::private_dir::random_hex()));
        let target = dir.join(name);
        if let Err(e) = self.fs.write(&tmp, bytes) {
            // Never create the checkpoint's directory here: a checkpoint discarded (timed
            // out) while one of its writers was late must not come back.
            let _ = self.fs.remove_file(&tmp);
            return Err(if is_not_found(&e) {
                Error::Checkpoint {
                    message: format!(
                        "checkpoint {id}: cannot write `{name}`: {} is gone (the checkpoint \
                         was discarded or never begun)",
                        dir.display()
                    ),
                }
            } else {
                io_error("write", &tmp, e)
            });
        }
        let result = self.fsync(&tmp).and_then(|()| {
            self.fs
                .rename(&tmp, &target)
                .map_err(|e| io_error("rename", &tmp, e))
        });
        if let Err(e) = result {
            let _ = self.fs.remove_file(&tmp);
            return Err(e);
        }
        self.fsync_dir(dir)
    }

    /// Reads every file of checkpoint `id` once (size and CRC32C) and checks the manifest and
    /// every file it lists.
    fn inspect(&self, id: CheckpointId) -> Result<Inspection, Error> {
        let dir = self.chk_dir(id);
        let mut found = Found::new();
        let mut bytes = 0;
        let mut manifest_bytes = None;
        let names = match self.fs.read_dir(&dir) {
            Ok(names) => names,
            Err(e) if is_not_found(&e) => {
                return Err(Error::Checkpoint {
                    message: format!("checkpoint {id}: not found in {}", self.dir.display()),
                })
            }
            Err(e) => return Err(io_error("read_dir", &dir, e)),
        };
        for name in names.into_iter().filter(|n| !is_temp(n)) {
            let path = dir.join(&name);
            let data = match self.fs.read(&path) {
                Ok(data) => data,
                // Removed under us (a concurrent discard): as if never there.
                Err(e) if is_not_found(&e) => continue,
                Err(e) => return Err(io_error("read", &path, e)),
            };
            bytes += data.len() as u64;
            if name == MANIFEST {
                manifest_bytes = Some(data);
            } else {
                found.insert(name, (data.len() as u64, crc32c::crc32c(&data)));
            }
        }
        let Some(raw) = manifest_bytes else {
            let why = if self.progress.lock().active.contains(&id) {
                "in progress (no MANIFEST yet)"
            } else {
                "incomplete: no MANIFEST (the run stopped, or the checkpoint failed, before it \
                 completed)"
            };
            return Ok(Inspection {
                manifest: None,
                bytes,
                problem: Some(why.into()),
            });
        };
        let manifest = match decode_manifest(&raw) {
            Ok(m) => m,
            Err(why) => {
                return Ok(Inspection {
                    manifest: None,
                    bytes,
                    problem: Some(format!("{MANIFEST}: {why}")),
                })
            }
        };
        let problem = check_files(id, &manifest, &found);
        Ok(Inspection {
            manifest: Some(manifest),
            bytes,
            problem,
        })
    }
}

/// Why a decoded manifest does not describe the files found, if it does not.
fn check_files(id: CheckpointId, manifest: &Manifest, found: &Found) -> Option<String> {
    if manifest.id != id {
        return Some(format!(
            "{MANIFEST}: belongs to checkpoint {}, found in {}",
            manifest.id,
            checkpoint_dir_name(id)
        ));
    }
    for inst in &manifest.instances {
        let entry = &inst.file;
        if let Some(why) = bad_name(&entry.name) {
            return Some(format!(
                "{MANIFEST}: lists file `{}` for {}: the name is {why}",
                entry.name, inst.instance
            ));
        }
        let problem = match found.get(&entry.name) {
            None => Some("missing".to_string()),
            Some(&(size, crc)) => entry_problem(entry, size, crc),
        };
        if let Some(p) = problem {
            return Some(format!("file `{}` ({}): {p}", entry.name, inst.instance));
        }
    }
    None
}

/// Why a file of `size` bytes and checksum `crc` is not what `entry` lists, if it is not.
fn entry_problem(entry: &FileEntry, size: u64, crc: u32) -> Option<String> {
    if size < entry.size {
        Some(format!(
            "truncated: {size} bytes, the manifest lists {}",
            entry.size
        ))
    } else if size > entry.size {
        Some(format!(
            "too long: {size} bytes, the manifest lists {}",
            entry.size
        ))
    } else if crc != entry.crc32c {
        Some(format!(
            "checksum mismatch (manifest {:08x}, file {crc:08x}): bit-flipped or overwritten",
            entry.crc32c
        ))
    } else {
        None
    }
}

/// Makes sure `dir` exists (creating its missing ancestors, each made durable in its parent).
fn ensure_dir(fs: &dyn Fs, dir: &Path) -> Result<(), Error> {
    match fs.read_dir(dir) {
        // It may be there only in the page cache: an earlier run that created it could have
        // failed (fatally) on the parent's fsync. Made durable again before anything in it is
        // trusted to be.
        Ok(_) => {
            let parent = parent_of(dir);
            fs.fsync_dir(&parent)
                .map_err(|e| io_error("fsync", &parent, e))
        }
        Err(e) if is_not_found(&e) => create_dirs(fs, dir),
        Err(e) => Err(io_error("read_dir", dir, e)),
    }
}

/// `dir`'s parent (`.` for a bare name).
fn parent_of(dir: &Path) -> PathBuf {
    match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Creates `dir` and its missing ancestors, each made durable in its parent.
fn create_dirs(fs: &dyn Fs, dir: &Path) -> Result<(), Error> {
    match fs.read_dir(dir) {
        Ok(_) => Ok(()),
        Err(e) if is_not_found(&e) => {
            let parent = parent_of(dir);
            create_dirs(fs, &parent)?;
            match fs.create_dir(dir) {
                Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                    return Err(io_error("mkdir", dir, e))
                }
                _ => {}
            }
            fs.fsync_dir(&parent)
                .map_err(|e| io_error("fsync", &parent, e))
        }
        Err(e) => Err(io_error("read_dir", dir, e)),
    }
}

impl Store for FsStore {
    fn mark_completed(&self) -> Result<(), Error> {
        let ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        self.write_durably(0, &self.dir, COMPLETED, format!("{ms}\n").as_bytes())
    }

    fn completed(&self) -> Result<Option<u64>, Error> {
        let path = self.dir.join(COMPLETED);
        match self.fs.read(&path) {
            Ok(b) => Ok(Some(
                std::str::from_utf8(&b)
                    .ok()
                    .and_then(|s| s.trim().parse().ok())
                    .unwrap_or(0),
            )),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(io_error("read", &path, e)),
        }
    }

    fn clear_completed(&self) -> Result<(), Error> {
        let path = self.dir.join(COMPLETED);
        match self.fs.remove_file(&path) {
            Ok(()) => self.fsync_dir(&self.dir),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(io_error("unlink", &path, e)),
        }
    }

    fn begin(&self, id: CheckpointId) -> Result<(), Error> {
        self.check_poisoned()?;
        let dir = self.chk_dir(id);
        self.progress.lock().active.insert(id);
        let result = self
            .fs
            .create_dir(&dir)
            .map_err(|e| io_error("mkdir", &dir, e))
            // The checkpoint's directory must be durable in the store's before anything in it
            // can be: a durable MANIFEST under a lost directory entry is no checkpoint.
            .and_then(|()| self.fsync_dir(&self.dir));
        if result.is_err() {
            self.progress.lock().finish(id);
        }
        result
    }

    fn put(&self, id: CheckpointId, name: &str, bytes: &[u8]) -> Result<FileEntry, Error> {
        self.check_poisoned()?;
        if let Some(why) = bad_name(name) {
            return Err(Error::Checkpoint {
                message: format!("checkpoint {id}: cannot store file `{name}`: the name is {why}"),
            });
        }
        self.write_durably(id, &self.chk_dir(id), name, bytes)?;
        Ok(FileEntry {
            name: name.to_string(),
            size: bytes.len() as u64,
            crc32c: crc32c::crc32c(bytes),
        })
    }

    fn complete(&self, manifest: &Manifest) -> Result<u64, Error> {
        self.check_poisoned()?;
        let id = manifest.id;
        if manifest.format != FORMAT {
            return Err(Error::Checkpoint {
                message: format!(
                    "checkpoint {id}: manifest of format {} (this store writes {FORMAT})",
                    manifest.format
                ),
            });
        }
        for inst in &manifest.instances {
            if let Some(why) = bad_name(&inst.file.name) {
                return Err(Error::Checkpoint {
                    message: format!(
                        "checkpoint {id}: {}'s file `{}`: the name is {why}",
                        inst.instance, inst.file.name
                    ),
                });
            }
        }
        let bytes = encode_manifest(manifest)?;
        self.write_durably(id, &self.chk_dir(id), MANIFEST, &bytes)?;
        self.progress.lock().finish(id);
        Ok(bytes.len() as u64)
    }

    fn discard(&self, id: CheckpointId) -> Result<(), Error> {
        self.progress.lock().finish(id);
        let dir = self.chk_dir(id);
        // The manifest goes first, durably: a checkpoint half removed by a crash is then
        // incomplete, never complete with files missing.
        match self.fs.remove_file(&dir.join(MANIFEST)) {
            Ok(()) => self.fsync_dir(&dir)?,
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(io_error("unlink", &dir.join(MANIFEST), e)),
        }
        let mut removed = false;
        for _ in 0..DISCARD_ATTEMPTS {
            let names = match self.fs.read_dir(&dir) {
                Ok(names) => names,
                Err(e) if is_not_found(&e) => {
                    removed = true;
                    break;
                }
                Err(e) => return Err(io_error("read_dir", &dir, e)),
            };
            for name in names {
                self.remove_if_present(&dir.join(name))?;
            }
            match self.fs.remove_dir(&dir) {
                Ok(()) => {
                    removed = true;
                    break;
                }
                Err(e) if is_not_found(&e) => {
                    removed = true;
                    break;
                }
                // A late writer added a file after the listing: list again.
                Err(e) if e.raw_os_error() == Some(libc::ENOTEMPTY) => continue,
                Err(e) => return Err(io_error("rmdir", &dir, e)),
            }
        }
        if !removed {
            return Err(Error::Checkpoint {
                message: format!(
                    "checkpoint {id}: {} stays non-empty after {DISCARD_ATTEMPTS} attempts to \
                     remove it (a writer keeps adding files)",
                    dir.display()
                ),
            });
        }
        self.fsync_dir(&self.dir)
    }

    fn list(&self) -> Result<Vec<Listing>, Error> {
        self.remove_stale(false)?;
        let names = self
            .fs
            .read_dir(&self.dir)
            .map_err(|e| io_error("read_dir", &self.dir, e))?;
        let mut ids: Vec<CheckpointId> = names
            .iter()
            .filter_map(|n| parse_checkpoint_dir_name(n))
            .collect();
        ids.sort_unstable();
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            let listing = match self.inspect(id) {
                Ok(found) => Listing {
                    id,
                    created_ms: found.manifest.map(|m| m.created_ms),
                    bytes: found.bytes,
                    problem: found.problem,
                },
                // Discarded between the listing and now.
                Err(Error::Checkpoint { .. }) => continue,
                Err(e) => Listing {
                    id,
                    created_ms: None,
                    bytes: 0,
                    problem: Some(e.to_string()),
                },
            };
            out.push(listing);
        }
        Ok(out)
    }

    fn ids(&self) -> Result<Vec<(CheckpointId, bool)>, Error> {
        self.remove_stale(false)?;
        let names = self
            .fs
            .read_dir(&self.dir)
            .map_err(|e| io_error("read_dir", &self.dir, e))?;
        let mut ids = Vec::new();
        for id in names.iter().filter_map(|n| parse_checkpoint_dir_name(n)) {
            let dir = self.chk_dir(id);
            let has_manifest = match self.fs.read_dir(&dir) {
                Ok(names) => names.iter().any(|n| n == MANIFEST),
                // Discarded between the listing and now.
                Err(e) if is_not_found(&e) => continue,
                Err(e) => return Err(io_error("read_dir", &dir, e)),
            };
            ids.push((id, has_manifest));
        }
        ids.sort_unstable();
        Ok(ids)
    }

    fn load_files(&self, id: CheckpointId) -> Result<(Manifest, Vec<Vec<u8>>), Error> {
        let dir = self.chk_dir(id);
        let fail = |why: String| Error::Checkpoint {
            message: format!("checkpoint {id} ({}): {why}", dir.display()),
        };
        let path = dir.join(MANIFEST);
        let raw =
            match self.fs.read(&path) {
                Ok(b) => b,
                Err(e) if is_not_found(&e) => return Err(fail(
                    "incomplete: no MANIFEST (the run stopped, or the checkpoint failed, before \
                     it completed)"
                        .into(),
                )),
                Err(e) => return Err(io_error("read", &path, e)),
            };
        let manifest = decode_manifest(&raw).map_err(|why| fail(format!("{MANIFEST}: {why}")))?;
        if manifest.id != id {
            return Err(fail(format!(
                "{MANIFEST}: belongs to checkpoint {}, found in {}",
                manifest.id,
                checkpoint_dir_name(id)
            )));
        }
        // Each file read once: `read` checks its name, size and checksum on the bytes it
        // returns.
        let files = read_listed(self, id, &manifest)?;
        Ok((manifest, files))
    }

    fn load(&self, id: CheckpointId) -> Result<Manifest, Error> {
        let found = self.inspect(id)?;
        match (found.manifest, found.problem) {
            (Some(m), None) => Ok(m),
            (_, problem) => Err(Error::Checkpoint {
                message: format!(
                    "checkpoint {id} ({}): {}",
                    self.chk_dir(id).display(),
                    problem.unwrap_or_default()
                ),
            }),
        }
    }

    fn read(&self, id: CheckpointId, entry: &FileEntry) -> Result<Vec<u8>, Error> {
        let path = self.chk_dir(id).join(&entry.name);
        let fail = |why: String| Error::Checkpoint {
            message: format!("checkpoint {id}: file {}: {why}", path.display()),
        };
        if let Some(why) = bad_name(&entry.name) {
            return Err(fail(format!("the name is {why}")));
        }
        let bytes = match self.fs.read(&path) {
            Ok(b) => b,
            Err(e) if is_not_found(&e) => return Err(fail("missing".into())),
            Err(e) => return Err(io_error("read", &path, e)),
        };
        match entry_problem(entry, bytes.len() as u64, crc32c::crc32c(&bytes)) {
            None => Ok(bytes),
            Some(why) => Err(fail(why)),
        }
    }
}
