//! Hot reload of a running TOML pipeline: re-read the file, check that the new version can
//! replace the old one in place, build it completely, then swap it in stage by stage.
//!
//! [`PipelineSpec::build_reloadable`] builds the pipeline with its reloadable stages reading
//! their logic from versioned cells (see [`crate::versioned`]) and returns a [`ReloadHandle`].
//! [`ReloadHandle::reload`] (or the watcher behind `millrace run --watch`) then:
//!
//! 1. parses and validates the file again, loading native plugins whose files changed from
//!    fresh copies;
//! 2. refuses, with "restart required", a change of topology (stages added, removed, renamed,
//!    rewired, another kind or parallelism) or of `[options]`, a change to a stage that cannot
//!    reload in place (sources, sinks, `count`, `limit`: their state or files would not carry
//!    over), and a change to a `window` other than `allowed_lateness` and `on_error`;
//! 3. builds every changed stage's new version (parameters, plugin library, process command);
//! 4. only if all of that succeeded, publishes the new versions. Otherwise nothing changes: the
//!    old version keeps running and the error is returned, logged and kept with the events.
//!
//! Each stage switches at its next input batch, so every batch is processed by exactly one
//! version of its stage; two stages switch independently (a record may meet version 3 of one
//! stage and version 4 of the next). Nothing waits for a grace period: an old version lives
//! exactly as long as the batches that loaded it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use super::build::{LiveStage, LiveStages};
use super::live_map::MapLogic;
use super::{ConfigError, ConfigErrorKind, PipelineSpec};
use crate::sync::thread::{self, JoinHandle};
use crate::sync::{AtomicBool, Mutex, Ordering};
use crate::Pipeline;

/// One reload, applied or refused.
#[derive(Debug, Clone, serde::Serialize)]
#[non_exhaustive]
pub struct ReloadEvent {
    /// The pipeline's version after the reload (the first reload makes version 1); for a
    /// refused reload, the version that keeps running.
    pub version: u64,
    /// What changed, one entry per stage (`"stage `tag`: parameters, plugin files"`).
    pub changed: Vec<String>,
    /// Why the reload was refused (the old version keeps running), or `None`.
    pub error: Option<String>,
    /// From the file change the watcher saw to the new version going live (`None` for a
    /// reload asked for through the API).
    #[serde(serialize_with = "ms")]
    pub latency: Option<Duration>,
    /// When it happened (milliseconds since the Unix epoch).
    pub at_unix_ms: u64,
}

fn ms<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_f64(d.as_secs_f64() * 1000.0),
        None => s.serialize_none(),
    }
}

impl std::fmt::Display for ReloadEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.error {
            Some(e) => write!(
                f,
                "reload refused, version {} keeps running: {e}",
                self.version
            ),
            None => {
                write!(f, "version {} live", self.version)?;
                if let Some(l) = self.latency {
                    write!(f, " {:.0} ms after the change", l.as_secs_f64() * 1000.0)?;
                }
                if self.changed.is_empty() {
                    write!(f, " (nothing changed)")
                } else {
                    write!(f, ": {}", self.changed.join("; "))
                }
            }
        }
    }
}

/// How long after a file's last change a hash of its content, or a stamp taken after it was
/// read, is not trusted (see [`Stamp`]): above the timestamp granularity of the common file
/// systems (a clock tick on ext4, XFS or btrfs; 1 s on ext3 or HFS+; 2 s on FAT).
const RACY: Duration = Duration::from_secs(2);

/// A file's identity for change detection.
///
/// **The stamp rule.** A reload stamps every file it knows of *before* it reads any of them,
/// so an edit that lands while it reads, or after, is seen by the next reload. A stamp is the
/// file's modification time, its length and a hash of its content, so two writes of the same
/// length within the timestamp granularity are told apart. The hash is not recomputed while
/// the file's metadata (device, inode, length, modification and change times) stays as it was
/// when the hash was taken, provided that was at least [`RACY`] after the file's last change: a
/// later write cannot leave all of that as it was. A file first seen in a reload (one the
/// previous version did not use, or any file when the pipeline is built) can only be stamped
/// after it was read; if it changed less than [`RACY`] before the reading began, its stamp is
/// [`Stamp::Unverified`] and the next reload counts it as changed.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Stamp {
    /// No file there (or it cannot be read).
    Missing,
    /// Its modification time, length and content hash, taken before it was read.
    Seen {
        modified: SystemTime,
        len: u64,
        hash: u64,
    },
    /// Stamped after it was read, and changed too recently for the stamp to be sure to
    /// describe what was read: counts as changed at the next reload.
    Unverified,
}

impl Stamp {
    /// Whether a file stamped `self` then `now` is unchanged.
    fn same(&self, now: &Stamp) -> bool {
        !matches!(self, Stamp::Unverified) && self == now
    }
}

/// The metadata a content hash is valid for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct MetaKey {
    dev: u64,
    ino: u64,
    len: u64,
    modified: (i64, i64),
    changed: (i64, i64),
}

impl MetaKey {
    fn of(m: &std::fs::Metadata) -> MetaKey {
        use std::os::unix::fs::MetadataExt;
        MetaKey {
            dev: m.dev(),
            ino: m.ino(),
            len: m.size(),
            modified: (m.mtime(), m.mtime_nsec()),
            changed: (m.ctime(), m.ctime_nsec()),
        }
    }

    /// The file's last change (its ctime: any write, and setting the times, moves it).
    fn changed_at(&self) -> SystemTime {
        let (s, ns) = self.changed;
        let d = Duration::new(s.max(0) as u64, ns.clamp(0, 999_999_999) as u32);
        SystemTime::UNIX_EPOCH + d
    }
}

/// A content hash and what it is valid for.
#[derive(Debug)]
struct Hashed {
    key: MetaKey,
    hash: u64,
    /// When it was taken (before reading).
    at: SystemTime,
}

/// The content hashes of the watched files, kept between reloads so that a file that did not
/// change is not read again (see [`Stamp`]).
#[derive(Debug, Default)]
struct Stamper {
    hashes: BTreeMap<PathBuf, Hashed>,
}

impl Stamper {
    /// The file's stamp now.
    fn stamp(&mut self, path: &Path) -> Stamp {
        let Ok((meta, modified)) =
            std::fs::metadata(path).and_then(|m| m.modified().map(|t| (m, t)))
        else {
            self.hashes.remove(path);
            return Stamp::Missing;
        };
        let key = MetaKey::of(&meta);
        let kept = self.hashes.get(path).filter(|h| {
            h.key == key
                && h.at
                    .duration_since(key.changed_at())
                    .is_ok_and(|d| d >= RACY)
        });
        let hash = match kept {
            Some(h) => h.hash,
            None => {
                let at = SystemTime::now();
                let Ok(hash) = hash_file(path) else {
                    self.hashes.remove(path);
                    return Stamp::Missing;
                };
                self.hashes
                    .insert(path.to_path_buf(), Hashed { key, hash, at });
                hash
            }
        };
        Stamp::Seen {
            modified,
            len: key.len,
            hash,
        }
    }

    /// The stamp of a file that was read from `read_at` on, before this stamp (see [`Stamp`]).
    fn stamp_after_read(&mut self, path: &Path, read_at: SystemTime) -> Stamp {
        let stamp = self.stamp(path);
        let recent = self.hashes.get(path).is_some_and(|h| {
            read_at
                .duration_since(h.key.changed_at())
                .map_or(true, |d| d < RACY)
        });
        if recent {
            Stamp::Unverified
        } else {
            stamp
        }
    }

    /// The stamps of `files`, which were read from `read_at` on.
    fn stamps_after_read(
        &mut self,
        files: Vec<PathBuf>,
        read_at: SystemTime,
    ) -> BTreeMap<PathBuf, Stamp> {
        files
            .into_iter()
            .map(|f| {
                let s = self.stamp_after_read(&f, read_at);
                (f, s)
            })
            .collect()
    }
}

/// A hash of the file's content (SipHash, std's fixed keys: the same bytes give the same hash
/// in every run).
fn hash_file(path: &Path) -> std::io::Result<u64> {
    use std::hash::Hasher;
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut h = std::hash::DefaultHasher::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match f.read(&mut buf) {
            Ok(0) => return Ok(h.finish()),
            Ok(n) => h.write(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

struct State {
    spec: PipelineSpec,
    stamps: BTreeMap<PathBuf, Stamp>,
    stamper: Stamper,
    version: u64,
}

struct Inner {
    file: PathBuf,
    live: LiveStages,
    /// Serialises reloads.
    state: Mutex<State>,
    events: Mutex<Vec<ReloadEvent>>,
    /// Called after a reload has read the new version's files, before it completes.
    #[cfg(test)]
    after_read: Mutex<Option<Box<dyn FnMut() + Send>>>,
}

/// Reloads a running pipeline built by [`PipelineSpec::build_reloadable`]. Cheap to clone;
/// usable from any thread while the pipeline runs.
#[derive(Clone)]
pub struct ReloadHandle {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ReloadHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReloadHandle")
            .field("file", &self.inner.file)
            .finish_non_exhaustive()
    }
}

impl PipelineSpec {
    /// Builds the pipeline so that it can be reloaded while it runs: its `filter`, `select`,
    /// `words`, `exec` and plugin stages read their logic once per batch from a versioned cell
    /// (they do not fuse with their neighbours). The handle re-reads [`file`](Self::file).
    ///
    /// A pipeline with a `[checkpoint]` table is refused: a reload changes stages under a run
    /// whose checkpoints record their fingerprints, and a resume would meet a pipeline that no
    /// file describes.
    pub fn build_reloadable(&self) -> Result<(Pipeline, ReloadHandle), ConfigError> {
        if self.checkpoint.is_some() {
            return Err(ConfigError::new(
                &self.file,
                None,
                None,
                ConfigErrorKind::BadValue,
                "[checkpoint]: a pipeline with checkpoints cannot be reloaded while it runs (--watch); remove the [checkpoint] table or run without --watch",
            ));
        }
        // Every version runs from a private copy of its plugin's code (a native library copy, a
        // process plugin's directory), so that edits on disk never reach a running version.
        let mut versioned = self.clone();
        for st in &mut versioned.stages {
            let err = |kind, m: String| {
                ConfigError::new(&self.file, Some(st.line), Some(&st.name), kind, m)
            };
            match &mut st.params {
                super::kinds::Kind::Exec(e) => {
                    **e = e
                        .snapshot_plugin()
                        .map_err(|m| err(ConfigErrorKind::Io, m))?;
                }
                #[cfg(feature = "plugin")]
                super::kinds::Kind::Native(n) => {
                    n.lib =
                        crate::plugin::native::NativeLibrary::load_copy(n.lib.name(), n.lib.path())
                            .map_err(|e| err(ConfigErrorKind::Plugin, e.to_string()))?;
                }
                _ => {}
            }
        }
        let (p, live) = versioned.build_live()?;
        // Read from `read_at` on: the manifests when the spec was parsed, the libraries and
        // programs just now, for their copies.
        let mut stamper = Stamper::default();
        let stamps = stamper.stamps_after_read(self.watched_files(), self.read_at);
        let inner = Inner {
            file: self.file.clone(),
            live,
            state: Mutex::new(State {
                spec: self.clone(),
                stamps,
                stamper,
                version: 0,
            }),
            events: Mutex::new(Vec::new()),
            #[cfg(test)]
            after_read: Mutex::new(None),
        };
        Ok((
            p,
            ReloadHandle {
                inner: Arc::new(inner),
            },
        ))
    }

    /// The pipeline file and every file its plugin stages depend on.
    fn watched_files(&self) -> Vec<PathBuf> {
        let mut files = vec![self.file.clone()];
        for st in &self.stages {
            for f in &st.files {
                if !files.contains(f) {
                    files.push(f.clone());
                }
            }
        }
        files
    }
}

impl ReloadHandle {
    /// Re-reads the pipeline file and applies it (see the module docs). On error nothing
    /// changed; either way the event is logged and kept ([`events`](Self::events)).
    pub fn reload(&self) -> Result<ReloadEvent, ConfigError> {
        self.reload_after(None)
    }

    /// As [`reload`](Self::reload), for a change seen at `changed_at` (the event's latency is
    /// measured from it).
    pub fn reload_after(&self, changed_at: Option<Instant>) -> Result<ReloadEvent, ConfigError> {
        let mut state = self.inner.state.lock();
        let outcome = self.try_reload(&mut state);
        let at_unix_ms = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let event = match &outcome {
            Ok(changed) => ReloadEvent {
                version: state.version,
                changed: changed.clone(),
                error: None,
                latency: changed_at.map(|t| t.elapsed()),
                at_unix_ms,
            },
            Err(e) => ReloadEvent {
                version: state.version,
                changed: Vec::new(),
                error: Some(e.to_string()),
                latency: None,
                at_unix_ms,
            },
        };
        match &event.error {
            None => {
                log::info!(target: "millrace::reload", "{}: {event}", self.inner.file.display())
            }
            Some(_) => {
                log::error!(target: "millrace::reload", "{}: {event}", self.inner.file.display())
            }
        }
        self.inner.events.lock().push(event.clone());
        outcome.map(|_| event)
    }

    fn try_reload(&self, state: &mut State) -> Result<Vec<String>, ConfigError> {
        let file = &self.inner.file;
        // Every known file is stamped before anything is read (the stamp rule, at `Stamp`).
        let read_at = SystemTime::now();
        let before: BTreeMap<PathBuf, Stamp> = state
            .stamps
            .keys()
            .map(|f| (f.clone(), state.stamper.stamp(f)))
            .collect();
        // Native libraries whose files did not change are reused, not loaded again.
        let changed_files: Vec<&PathBuf> = state
            .stamps
            .iter()
            .filter(|(f, s)| !s.same(&before[*f]))
            .map(|(f, _)| f)
            .collect();
        // Only native plugin libraries are reused.
        #[cfg_attr(not(feature = "plugin"), allow(unused_mut))]
        let mut reuse = BTreeMap::new();
        #[cfg(feature = "plugin")]
        for (name, live) in &self.inner.live {
            if let LiveStage::Native(v) = live {
                let old = state.spec.stages.iter().find(|s| &s.name == name);
                let untouched =
                    old.is_some_and(|s| !s.files.iter().any(|f| changed_files.contains(&f)));
                if untouched {
                    let (_, spec) = v.load();
                    reuse.insert(spec.lib.name().to_string(), Arc::clone(&spec.lib));
                }
            }
        }
        let new = PipelineSpec::from_file_for_reload(file, reuse)?;
        #[cfg(test)]
        if let Some(hook) = self.inner.after_read.lock().as_mut() {
            hook();
        }
        let old = &state.spec;
        let restart = |stage: Option<&str>, line: Option<usize>, why: String| {
            ConfigError::new(
                file,
                line,
                stage,
                ConfigErrorKind::RestartRequired,
                format!("restart required: {why}"),
            )
        };
        if format!("{:?}", old.options) != format!("{:?}", new.options)
            || old.byte_path != new.byte_path
        {
            return Err(restart(None, None, "[options] changed".into()));
        }
        for o in &old.stages {
            if !new.stages.iter().any(|n| n.name == o.name) {
                return Err(restart(Some(&o.name), None, "the stage was removed".into()));
            }
        }
        let mut plan = Vec::new();
        let mut changed = Vec::new();
        for n in &new.stages {
            let Some(o) = old.stages.iter().find(|o| o.name == n.name) else {
                return Err(restart(
                    Some(&n.name),
                    Some(n.line),
                    "the stage was added".into(),
                ));
            };
            let what = |w: &str| restart(Some(&n.name), Some(n.line), format!("its {w} changed"));
            if o.kind != n.kind {
                return Err(what("kind"));
            }
            if o.inputs != n.inputs || o.late_of != n.late_of {
                return Err(what("input"));
            }
            if o.parallelism != n.parallelism {
                return Err(what("parallelism"));
            }
            if o.ordered != n.ordered {
                return Err(what("ordered"));
            }
            // The error policy is fixed for the run, but for a window's fail/skip.
            let window_flip = matches!(n.params, super::kinds::Kind::Window(_))
                && !matches!(o.on_error, super::parse::PolicySpec::DeadLetter(_))
                && !matches!(n.on_error, super::parse::PolicySpec::DeadLetter(_));
            if o.on_error != n.on_error && !window_flip {
                return Err(what("on_error (or dead_letter)"));
            }
            let params = o.raw != n.raw;
            let files = n.files != o.files || n.files.iter().any(|f| changed_files.contains(&f));
            if !params && !files {
                continue;
            }
            let mut parts = Vec::new();
            if params {
                parts.push("parameters");
            }
            if files {
                parts.push("plugin files");
            }
            let Some(live) = self.inner.live.get(&n.name) else {
                return Err(restart(
                    Some(&n.name),
                    Some(n.line),
                    format!(
                        "a `{}` stage cannot change while the pipeline runs (its state or files would not carry over)",
                        n.kind
                    ),
                ));
            };
            if let (super::kinds::Kind::Window(ow), super::kinds::Kind::Window(nw)) =
                (&o.params, &n.params)
            {
                if let Some(why) = ow.incompatible(nw) {
                    return Err(restart(Some(&n.name), Some(n.line), why));
                }
            }
            let next = match (live, &n.params) {
                (LiveStage::Map(_), k) => Next::Map(MapLogic::of(k).expect("same kind as built")),
                (LiveStage::Exec(v), super::kinds::Kind::Exec(e)) => {
                    let mut e = e.snapshot_plugin().map_err(|m| {
                        ConfigError::new(file, Some(n.line), Some(&n.name), ConfigErrorKind::Io, m)
                    })?;
                    // The policy did not change (checked above): keep the running handle.
                    e.on_error = v.load().1.on_error.clone();
                    Next::Exec(Box::new(e))
                }
                #[cfg(feature = "plugin")]
                (LiveStage::Native(_), super::kinds::Kind::Native(s)) => {
                    Next::Native((**s).clone())
                }
                (LiveStage::Window(v), super::kinds::Kind::Window(w)) => {
                    let mut l = w.live();
                    if matches!(n.on_error, super::parse::PolicySpec::DeadLetter(_)) {
                        // The handle is the running one's (the policy did not change).
                        l.on_error = v.load().1.on_error.clone();
                    }
                    Next::Window(l)
                }
                _ => unreachable!("a stage keeps its kind"),
            };
            plan.push((n.name.clone(), next));
            changed.push(format!("stage `{}`: {}", n.name, parts.join(", ")));
        }
        // Everything is built: publish.
        for (name, next) in plan {
            match (self.inner.live.get(&name), next) {
                (Some(LiveStage::Map(v)), Next::Map(m)) => {
                    v.store(m);
                }
                (Some(LiveStage::Exec(v)), Next::Exec(e)) => {
                    v.store(*e);
                }
                #[cfg(feature = "plugin")]
                (Some(LiveStage::Native(v)), Next::Native(s)) => {
                    v.store(s);
                }
                (Some(LiveStage::Window(v)), Next::Window(w)) => {
                    v.store(w);
                }
                _ => unreachable!("planned from the same map"),
            }
        }
        state.version += 1;
        // The stamps taken before reading; a file this version uses for the first time can
        // only be stamped now.
        let mut stamps = before;
        let files = new.watched_files();
        stamps.retain(|f, _| files.contains(f));
        for f in files {
            if let std::collections::btree_map::Entry::Vacant(e) = stamps.entry(f) {
                let s = state.stamper.stamp_after_read(e.key(), read_at);
                e.insert(s);
            }
        }
        state.stamper.hashes.retain(|f, _| stamps.contains_key(f));
        state.stamps = stamps;
        state.spec = new;
        Ok(changed)
    }

    /// Every reload so far, applied or refused, in order.
    pub fn events(&self) -> Vec<ReloadEvent> {
        self.inner.events.lock().clone()
    }

    /// The current version (0 until the first successful reload).
    pub fn version(&self) -> u64 {
        self.inner.state.lock().version
    }

    /// For each reloadable stage, the records each of its versions processed (stage versions
    /// count the stage's own reloads: 0 is the version it started with).
    pub fn records_per_version(&self) -> BTreeMap<String, BTreeMap<u64, u64>> {
        self.inner
            .live
            .iter()
            .map(|(name, l)| {
                let counts = match l {
                    LiveStage::Map(v) => v.counts(),
                    LiveStage::Exec(v) => v.counts(),
                    #[cfg(feature = "plugin")]
                    LiveStage::Native(v) => v.counts(),
                    LiveStage::Window(v) => v.counts(),
                };
                (name.clone(), counts)
            })
            .collect()
    }

    /// The files a watcher should watch: the pipeline file and its plugins' files.
    pub fn watched_files(&self) -> Vec<PathBuf> {
        self.inner.state.lock().stamps.keys().cloned().collect()
    }

    /// Watches the pipeline file and its plugins' files, and reloads after a change once they
    /// have been quiet for `debounce` (editors and compilers write a file in several steps:
    /// a temporary file renamed over it, or truncate and write). Stops when the returned
    /// [`Watcher`] is dropped.
    pub fn watch(&self, debounce: Duration) -> Result<Watcher, WatchError> {
        use notify::Watcher as _;
        let (tx, rx) = crossbeam_channel::bounded::<PathBuf>(1024);
        let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            if let Ok(ev) = res {
                if !may_change(&ev.kind) {
                    return;
                }
                for p in ev.paths {
                    // Dropped when full: one pending change is enough to trigger a reload.
                    let _ = tx.try_send(p);
                }
            }
        })
        .map_err(|e| WatchError::Init {
            source: Box::new(e),
        })?;
        // Watch directories, not files: a file replaced by a rename is a new inode.
        let mut dirs: Vec<PathBuf> = self
            .watched_files()
            .iter()
            .filter_map(|f| f.parent().map(Path::to_path_buf))
            .map(|d| {
                if d.as_os_str().is_empty() {
                    PathBuf::from(".")
                } else {
                    d
                }
            })
            .collect();
        dirs.sort();
        dirs.dedup();
        for d in &dirs {
            watcher
                .watch(d, notify::RecursiveMode::NonRecursive)
                .map_err(|e| WatchError::Dir {
                    dir: d.clone(),
                    source: Box::new(e),
                })?;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let handle = self.clone();
        let s = Arc::clone(&stop);
        let thread = thread::Builder::new()
            .name("millrace:watch".into())
            .spawn(move || watch_loop(&handle, &rx, debounce, &s))
            .map_err(|source| WatchError::Spawn { source })?;
        Ok(Watcher {
            _watcher: Some(watcher),
            stop,
            thread: Some(thread),
        })
    }
}

/// Why [`ReloadHandle::watch`] could not start watching.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WatchError {
    /// The file watcher could not be created (inotify limits, for one).
    #[error("cannot watch files: {source}")]
    Init {
        /// The watcher's error.
        #[source]
        source: crate::BoxError,
    },
    /// A directory holding a watched file could not be watched (it no longer exists, say).
    #[error("cannot watch {}: {source}", dir.display())]
    Dir {
        /// The directory.
        dir: PathBuf,
        /// The watcher's error.
        #[source]
        source: crate::BoxError,
    },
    /// The thread that reloads after a change could not be started.
    #[error("cannot start the watcher thread: {source}")]
    Spawn {
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

/// A stage's next version, built before anything is published.
enum Next {
    Map(MapLogic),
    // Boxed: without the `plugin` feature it would be four times the other variants.
    Exec(Box<crate::exec::ExecSpec>),
    #[cfg(feature = "plugin")]
    Native(crate::plugin::native::NativeSpec),
    Window(crate::window::WindowLive),
}

/// Whether a file event can mean a change: not a mere open, read or close after reading.
/// (notify reports those too, and a reload opens and reads the files it watches: counting them
/// made every reload trigger the next, one per debounce interval, for as long as it ran.)
fn may_change(kind: &notify::EventKind) -> bool {
    use notify::event::{AccessKind, AccessMode};
    match kind {
        notify::EventKind::Access(a) => *a == AccessKind::Close(AccessMode::Write),
        _ => true,
    }
}

/// The file names a change to `path` may concern (a file itself, or one renamed over it).
fn concerns(handle: &ReloadHandle, path: &Path) -> bool {
    let canon = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let path = canon(path);
    handle.watched_files().iter().any(|f| canon(f) == path)
        || path.file_name().is_some_and(|n| {
            handle
                .watched_files()
                .iter()
                .any(|f| f.file_name() == Some(n))
        })
}

fn watch_loop(
    handle: &ReloadHandle,
    rx: &crossbeam_channel::Receiver<PathBuf>,
    debounce: Duration,
    stop: &AtomicBool,
) {
    let mut pending: Option<(Instant, Instant)> = None; // (first change, last change)
    while !stop.load(Ordering::Acquire) {
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(path) => {
                if concerns(handle, &path) {
                    let now = Instant::now();
                    pending = Some(pending.map_or((now, now), |(first, _)| (first, now)));
                }
            }
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return,
        }
        if let Some((first, last)) = pending {
            if last.elapsed() >= debounce {
                pending = None;
                // Errors are logged and kept with the events; the old version keeps running.
                let _ = handle.reload_after(Some(first));
            }
        }
    }
}

/// A running file watcher (see [`ReloadHandle::watch`]). Dropping it stops the watch and joins
/// its thread.
pub struct Watcher {
    /// notify's watcher: dropping it ends notify's own event thread.
    _watcher: Option<notify::RecommendedWatcher>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Watcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watcher").finish_non_exhaustive()
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self._watcher = None;
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pipeline file using a process plugin `p` (running `cat`) whose manifest gives its
    /// node's parameter `v` the default `default`; returns the pipeline file and the manifest.
    fn setup(dir: &Path, default: &str) -> (PathBuf, PathBuf) {
        let plugin = dir.join("plugins/p");
        std::fs::create_dir_all(&plugin).unwrap();
        let manifest = plugin.join("plugin.toml");
        write_manifest(&manifest, default);
        std::fs::write(dir.join("in.ndjson"), "").unwrap();
        let file = dir.join("p.toml");
        std::fs::write(
            &file,
            "plugin_dirs = [\"plugins\"]\n[stages.read]\nkind = \"ndjson.read\"\npath = \"in.ndjson\"\n[stages.s]\nkind = \"p.n\"\ninput = \"read\"\n[stages.out]\nkind = \"ndjson.write\"\ninput = \"s\"\npath = \"out.ndjson\"\n",
        )
        .unwrap();
        (file, manifest)
    }

    fn write_manifest(path: &Path, default: &str) {
        std::fs::write(
            path,
            format!(
                "name = \"p\"\nversion = \"1.0.0\"\nkind = \"process\"\nentry = [\"cat\"]\nengine = \">=0.1\"\n[[nodes]]\nname = \"n\"\n[nodes.params.v]\ntype = \"string\"\ndefault = \"{default}\"\n"
            ),
        )
        .unwrap();
    }

    /// [`setup`], then the pipeline built reloadable: the pipeline, its handle, the manifest.
    fn reloadable(dir: &Path, default: &str) -> (Pipeline, ReloadHandle, PathBuf) {
        let (file, manifest) = setup(dir, default);
        let (pipeline, h) = PipelineSpec::from_file(&file)
            .unwrap()
            .build_reloadable()
            .unwrap();
        (pipeline, h, manifest)
    }

    /// Rewrites the manifest with the default `default` and sets its modification time back to
    /// `mtime`: a write within the timestamp granularity of the one before.
    fn rewrite_keeping_mtime(manifest: &Path, default: &str, mtime: SystemTime) {
        write_manifest(manifest, default);
        std::fs::File::options()
            .write(true)
            .open(manifest)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
    }

    /// The parameters the running version of stage `s` was given.
    fn live_params(h: &ReloadHandle) -> serde_json::Value {
        let Some(LiveStage::Exec(v)) = h.inner.live.get("s") else {
            panic!("stage `s` is a live exec stage");
        };
        let (_, spec) = v.load();
        let (_, params) = spec
            .env
            .iter()
            .find(|(k, _)| k == "MILLRACE_PARAMS")
            .expect("the plugin's parameters");
        serde_json::from_str(params).unwrap()
    }

    fn changed(e: &ReloadEvent) -> Vec<String> {
        e.changed.clone()
    }

    /// Issue 13, item 10: an edit that lands after a reload has read the files, before it
    /// completes, is picked up by the next reload (the files were stamped before reading).
    /// Before the fix the stamps were taken at the end, after the edit, and it was ignored for
    /// good.
    #[test]
    fn an_edit_while_a_reload_reads_is_picked_up_by_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let (_pipeline, h, manifest) = reloadable(dir.path(), "a");
        assert_eq!(live_params(&h)["v"], "a");
        let m = manifest.clone();
        let mut once = Some(move || write_manifest(&m, "edited"));
        *h.inner.after_read.lock() = Some(Box::new(move || {
            if let Some(edit) = once.take() {
                edit();
            }
        }));
        // This reload read the manifest with "a", then the edit landed.
        h.reload().unwrap();
        assert_eq!(live_params(&h)["v"], "a");
        let e = h.reload().unwrap();
        assert_eq!(changed(&e), ["stage `s`: plugin files"], "{e}");
        assert_eq!(live_params(&h)["v"], "edited");
        // And nothing more after that.
        assert_eq!(changed(&h.reload().unwrap()), Vec::<String>::new());
    }

    /// Issue 13, item 10: two writes of the same length within the timestamp granularity (the
    /// modification time set back to the first write's) are both seen: the content hash
    /// differs. Before the fix the stamp was (modification time, length), equal both times.
    #[test]
    fn same_length_writes_within_the_timestamp_granularity_are_both_seen() {
        let dir = tempfile::tempdir().unwrap();
        let (_pipeline, h, manifest) = reloadable(dir.path(), "a");
        h.reload().unwrap(); // stamps taken before reading
        let mtime = std::fs::metadata(&manifest).unwrap().modified().unwrap();
        let len = std::fs::metadata(&manifest).unwrap().len();
        for v in ["b", "c"] {
            rewrite_keeping_mtime(&manifest, v, mtime);
            let meta = std::fs::metadata(&manifest).unwrap();
            assert_eq!((meta.modified().unwrap(), meta.len()), (mtime, len));
            let e = h.reload().unwrap();
            assert_eq!(changed(&e), ["stage `s`: plugin files"], "{v}: {e}");
            assert_eq!(live_params(&h)["v"], v);
        }
        assert_eq!(changed(&h.reload().unwrap()), Vec::<String>::new());
    }

    /// The same through the watcher: each write's notification reloads, and each reload sees
    /// its write.
    #[test]
    fn the_watcher_sees_same_length_writes_within_the_granularity() {
        let dir = tempfile::tempdir().unwrap();
        let (_pipeline, h, manifest) = reloadable(dir.path(), "a");
        h.reload().unwrap();
        let mtime = std::fs::metadata(&manifest).unwrap().modified().unwrap();
        let watcher = h.watch(Duration::from_millis(20)).unwrap();
        for v in ["b", "c"] {
            rewrite_keeping_mtime(&manifest, v, mtime);
            // Wait (with a deadline) for a reload that applied this write.
            let deadline = Instant::now() + Duration::from_secs(20);
            while live_params(&h)["v"] != v {
                assert!(
                    Instant::now() < deadline,
                    "{v} never applied: {:?}",
                    h.events()
                );
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        drop(watcher);
        let events = h.events();
        let applied = events
            .iter()
            .filter(|e| e.latency.is_some() && !e.changed.is_empty())
            .count();
        assert_eq!(applied, 2, "{events:?}");
    }

    /// The watcher's own reads (a reload opens and reads every file it watches) are not
    /// changes: counting them made each reload trigger the next, forever.
    #[test]
    fn opening_or_reading_a_file_is_not_a_change() {
        use notify::event::{AccessKind, AccessMode, CreateKind, ModifyKind};
        use notify::EventKind;
        for (kind, change) in [
            (EventKind::Access(AccessKind::Open(AccessMode::Any)), false),
            (EventKind::Access(AccessKind::Read), false),
            (
                EventKind::Access(AccessKind::Close(AccessMode::Read)),
                false,
            ),
            (
                EventKind::Access(AccessKind::Close(AccessMode::Write)),
                true,
            ),
            (EventKind::Modify(ModifyKind::Any), true),
            (EventKind::Create(CreateKind::File), true),
            (EventKind::Any, true),
        ] {
            assert_eq!(may_change(&kind), change, "{kind:?}");
        }
    }
}
