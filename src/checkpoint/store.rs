//! The checkpoint store: where checkpoints are written, verified and found again.
//!
//! [`Store`] is the interface the coordinator and recovery use; [`FsStore`] is the default,
//! on a local directory, over the [`Fs`] trait so that tests can put a fault-injecting file
//! system under it.
//!
//! On disk (format 1, see docs/checkpoints.md):
//! ```text
//! DIR/LOCK                      flock(2)ed for the run's life
//! DIR/chk-00000007/             one directory per checkpoint
//!     <stage>#<i>.state         one file per stage instance (encoded `InstanceState`)
//!     MANIFEST                  written last: lists every file with size and CRC32C, and
//!                               carries its own CRC32C; its presence makes the checkpoint
//!                               complete
//! ```
//! Every file is written under a temporary name, fsynced, renamed, and its directory fsynced.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{CheckpointId, InstanceId};
use crate::error::Error;

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
}
