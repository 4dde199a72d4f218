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

/// A file's identity for change detection: modification time and length.
type Stamp = Option<(SystemTime, u64)>;

fn stamp(path: &Path) -> Stamp {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

fn stamps(files: Vec<PathBuf>) -> BTreeMap<PathBuf, Stamp> {
    files
        .into_iter()
        .map(|f| {
            let s = stamp(&f);
            (f, s)
        })
        .collect()
}

struct State {
    spec: PipelineSpec,
    stamps: BTreeMap<PathBuf, Stamp>,
    version: u64,
}

struct Inner {
    file: PathBuf,
    live: LiveStages,
    /// Serialises reloads.
    state: Mutex<State>,
    events: Mutex<Vec<ReloadEvent>>,
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
    pub fn build_reloadable(&self) -> Result<(Pipeline, ReloadHandle), ConfigError> {
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
        let stamps = stamps(self.watched_files());
        let inner = Inner {
            file: self.file.clone(),
            live,
            state: Mutex::new(State {
                spec: self.clone(),
                stamps,
                version: 0,
            }),
            events: Mutex::new(Vec::new()),
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
        // Native libraries whose files did not change are reused, not loaded again.
        let changed_files: Vec<&PathBuf> = state
            .stamps
            .iter()
            .filter(|(f, s)| stamp(f) != **s)
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
                (LiveStage::Exec(_), super::kinds::Kind::Exec(e)) => {
                    Next::Exec(e.snapshot_plugin().map_err(|m| {
                        ConfigError::new(file, Some(n.line), Some(&n.name), ConfigErrorKind::Io, m)
                    })?)
                }
                #[cfg(feature = "plugin")]
                (LiveStage::Native(_), super::kinds::Kind::Native(s)) => {
                    Next::Native((**s).clone())
                }
                (LiveStage::Window(_), super::kinds::Kind::Window(w)) => Next::Window(w.live()),
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
                    v.store(e);
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
        state.stamps = stamps(new.watched_files());
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
    Exec(crate::exec::ExecSpec),
    #[cfg(feature = "plugin")]
    Native(crate::plugin::native::NativeSpec),
    Window(crate::window::WindowLive),
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
