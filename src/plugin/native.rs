//! Native plugins: loading a `cdylib` built with the `millrace-plugin` SDK, checking it, and
//! calling its nodes batch by batch.
//!
//! Before calling anything in a library, [`NativeLibrary::load`] checks, in this order: that
//! it exports `MILLRACE_PLUGIN`; its ABI version (read alone, before any other field, since the
//! rest of the declaration's layout depends on it); the compiler that built it (the same
//! `rustc --version` as this millrace); its name (the manifest's); and its `engine` requirement
//! (this millrace's version). Any mismatch refuses the plugin with a message saying what was
//! expected and found.
//!
//! Records cross the boundary as NDJSON bytes, a whole batch per call, and results come back
//! through a callback that appends to a host buffer: no Rust type, allocation or panic crosses
//! it. A panic inside a plugin is caught on its side and becomes a stage error naming the
//! plugin; the node instance is then poisoned.
//!
//! **Two paths.** An ABI 1 plugin, and an ABI 2 instance that does not say
//! [`CAP_LINES`], gets each batch through `process` as NDJSON text, which the SDK parses into
//! values. An ABI 2 instance with `CAP_LINES` (a `LineNode`) gets it through `process_lines`:
//! the same bytes plus the offset of every record, which it reads in place. Either way the
//! output is NDJSON lines in a host buffer. On the value path ([`NativeNode::process`]) the host
//! serialises its records and parses what comes back; on the byte path
//! (`NativeNode::process_block`, a TOML pipeline `ndjson.read → native … → ndjson.write`)
//! it hands over the checked lines it read and checks the lines that come back
//! (`ndjson::check_block`: UTF-8, one JSON object per line) without building a value. Every
//! length and offset the host hands over is its own; the plugin hands back only bytes through
//! the sink, so a bad answer is a bad line, refused with an error naming the plugin, never
//! a read outside a buffer.
//!
//! **Lifetime and unload policy.** Every [`NativeNode`] holds an `Arc` of its
//! [`NativeLibrary`], so the code stays loaded while any node made from it exists. When the
//! last one goes, the plugin is *unloaded*: its `unload` hook detaches its log sink, and the
//! host never calls it again. The image itself is **never `dlclose`d**: unmapping code that a
//! thread-local destructor, an `atexit` handler or a thread of the plugin's own may still run is
//! undefined behaviour on several platforms, and Rust gives no way to prove none is left. The
//! cost is the mapped image (a few MB) until the process exits; hot reload loads each version
//! from a copy at a new path, so it costs one image per reload.
//!
//! **Logging.** Each plugin has its own `log` crate (a `cdylib` links it statically); the SDK
//! installs there a logger that forwards to a sink the host hands over: one per stage instance
//! (the stage's `log_level`, target `plugin::<name>`), and a plugin-wide one for threads of the
//! plugin's own. One plugin's level or sink never touches another's, and unloading one leaves
//! the others' sinks as they are.

use std::ffi::c_void;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use log::LevelFilter;
use millrace_plugin::abi::{
    HostLog, LineBatch, PluginDecl, PluginDeclV1, Sink, Str, CAP_LINES, ERROR, OK, PANIC,
};
use serde_json::Value;

use crate::source::Chunk;

/// The ABI 2 entry points of a library's declaration (the line path).
#[derive(Clone, Copy)]
struct LineEntries {
    caps: unsafe extern "C" fn(inst: *mut c_void) -> u32,
    process_lines: unsafe extern "C" fn(
        inst: *mut c_void,
        batch: *const LineBatch,
        log: *const HostLog,
        out: *const Sink,
        err: *const Sink,
    ) -> i32,
}

/// A loaded, checked native plugin library. Shared by the nodes made from it.
pub struct NativeLibrary {
    name: String,
    version: String,
    path: PathBuf,
    /// Points into the mapped image, which is never unmapped (see the module docs): the
    /// version 1 fields, which every ABI version starts with.
    decl: *const PluginDeclV1,
    /// The ABI version the library declares.
    abi: u32,
    /// Its line-path entry points (ABI 2 and later).
    lines: Option<LineEntries>,
    /// Kept so the handle is never closed; never dropped (the unload policy).
    _lib: std::mem::ManuallyDrop<libloading::Library>,
    /// The plugin-wide log sink (boxed: the plugin holds its address until `unload`).
    log: Box<LogSink>,
}

// SAFETY: `decl` points to immutable static data (strings and functions) in an image that is
// never unmapped; the functions may be called from any thread (the ABI requires it; calls on one
// instance are serialised by `NativeNode`, which is `Send` but not `Sync`).
unsafe impl Send for NativeLibrary {}
// SAFETY: as above: nothing in a `NativeLibrary` is mutated after loading.
unsafe impl Sync for NativeLibrary {}

impl fmt::Debug for NativeLibrary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NativeLibrary")
            .field("name", &self.name)
            .field("version", &self.version)
            .field("path", &self.path)
            .finish()
    }
}

/// A log sink handed to a plugin: the ABI struct and the state its callback reads.
struct LogSink {
    abi: HostLog,
    /// Never read here, but kept alive: `abi.ctx` points into it.
    _state: Box<LogState>,
}

struct LogState {
    target: String,
    level: LevelFilter,
    /// Prefix naming the stage (empty for the plugin-wide sink).
    prefix: String,
}

impl LogSink {
    fn new(plugin: &str, stage: Option<&str>, level: LevelFilter) -> Box<LogSink> {
        let state = Box::new(LogState {
            target: format!("plugin::{plugin}"),
            level,
            prefix: stage.map(|s| format!("[{s}] ")).unwrap_or_default(),
        });
        let wanted = level.min(log::max_level());
        Box::new(LogSink {
            abi: HostLog {
                ctx: (&*state as *const LogState).cast(),
                max_level: wanted as u32,
                write: host_log,
            },
            _state: state,
        })
    }
}

/// The host side of a plugin's log sink.
///
/// # Safety
/// `ctx` is the `LogState` of a live `LogSink`; `ptr` points to `len` bytes.
unsafe extern "C" fn host_log(ctx: *const c_void, level: u32, ptr: *const u8, len: usize) {
    // Nothing may unwind into the plugin.
    let _ = std::panic::catch_unwind(|| {
        // SAFETY: the sink's owner keeps `ctx` alive for as long as the plugin may call it.
        let state = unsafe { &*ctx.cast::<LogState>() };
        let level = match level {
            1 => log::Level::Error,
            2 => log::Level::Warn,
            3 => log::Level::Info,
            4 => log::Level::Debug,
            5 => log::Level::Trace,
            _ => return,
        };
        if level > state.level {
            return;
        }
        // SAFETY: the plugin passes `len` live bytes for the duration of the call.
        let msg = unsafe { Str { ptr, len }.as_bytes() };
        let msg = String::from_utf8_lossy(msg);
        log::logger().log(
            &log::Record::builder()
                .level(level)
                .target(&state.target)
                .args(format_args!("{}{msg}", state.prefix))
                .build(),
        );
    });
}

/// The host's buffer behind a [`Sink`].
unsafe extern "C" fn append(ctx: *mut c_void, ptr: *const u8, len: usize) {
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // SAFETY: `ctx` is the `Vec<u8>` the host passed for this call; `ptr` has `len` bytes.
        let (buf, bytes) = unsafe { (&mut *ctx.cast::<Vec<u8>>(), Str { ptr, len }.as_bytes()) };
        buf.extend_from_slice(bytes);
    }));
}

fn sink(buf: &mut Vec<u8>) -> Sink {
    Sink {
        ctx: (buf as *mut Vec<u8>).cast(),
        write: append,
    }
}

/// Why a native plugin library was refused by [`NativeLibrary::load`]: the plugin, the library
/// and what was wrong ([`kind`](LoadError::kind)). Its `source` is the underlying error, when
/// there is one (an `io::Error` copying the library, the loader's error, a semver error).
#[derive(Debug)]
pub struct LoadError {
    plugin: String,
    path: PathBuf,
    kind: LoadErrorKind,
}

impl LoadError {
    fn new(plugin: &str, path: &Path, kind: LoadErrorKind) -> Self {
        LoadError {
            plugin: plugin.to_string(),
            path: path.to_path_buf(),
            kind,
        }
    }

    /// The plugin's name (its manifest's).
    pub fn plugin(&self) -> &str {
        &self.plugin
    }

    /// The library file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What was wrong.
    pub fn kind(&self) -> &LoadErrorKind {
        &self.kind
    }
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "native plugin `{}` ({}): {}",
            self.plugin,
            self.path.display(),
            self.kind
        )
    }
}

impl std::error::Error for LoadError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        std::error::Error::source(&self.kind)
    }
}

/// What was wrong with a native plugin library (see [`LoadError`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadErrorKind {
    /// There is no file at the path.
    #[error("no library at this path: build the plugin first (see its plugin.toml)")]
    Missing,
    /// The library could not be copied for a reload.
    #[error("cannot copy it to {}: {source}", to.display())]
    Copy {
        /// Where it was to be copied.
        to: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The dynamic loader refused the file.
    #[error("cannot load it: {source}")]
    Open {
        /// The loader's error.
        #[source]
        source: crate::BoxError,
    },
    /// The library exports no plugin declaration.
    #[error("it exports no `MILLRACE_PLUGIN`: is it built with millrace_plugin::export_plugin!?")]
    NoDeclaration,
    /// The library's declaration is a null pointer.
    #[error("its `MILLRACE_PLUGIN` is null")]
    NullDeclaration,
    /// It was built for a plugin ABI version this millrace does not speak.
    #[error(
        "it was built for plugin ABI version {found}, and this millrace speaks ABI versions \
         {} to {expected}: rebuild it against millrace-plugin {}",
        millrace_plugin::ABI_VERSION_MIN,
        millrace_plugin::SDK_VERSION
    )]
    Abi {
        /// The library's ABI version.
        found: u32,
        /// The newest this millrace speaks (it speaks every one from
        /// `millrace_plugin::ABI_VERSION_MIN` on).
        expected: u32,
    },
    /// It was built by another compiler.
    #[error(
        "it was built with `{found}`, and this millrace with `{expected}`: rebuild the plugin \
         with the same compiler"
    )]
    Compiler {
        /// The library's `rustc --version`.
        found: String,
        /// This millrace's.
        expected: String,
    },
    /// A string of its declaration is not UTF-8.
    #[error("its {field} is not UTF-8")]
    NotUtf8 {
        /// Which one: `name`, `version`, ...
        field: &'static str,
    },
    /// The library declares another name than its manifest.
    #[error("the library declares the name `{declared}`, its manifest `{manifest}`")]
    Name {
        /// The library's name for itself.
        declared: String,
        /// The manifest's.
        manifest: String,
    },
    /// Its engine requirement is not a semver requirement.
    #[error("its engine requirement {requirement:?} is not a semver requirement: {source}")]
    BadRequirement {
        /// The requirement as declared.
        requirement: String,
        /// The semver parser's error.
        #[source]
        source: crate::BoxError,
    },
    /// It requires another millrace version.
    #[error("it requires millrace {requirement}, and this is millrace {version}")]
    Engine {
        /// The requirement as declared.
        requirement: String,
        /// This millrace's version.
        version: String,
    },
    /// Its `init` function failed.
    #[error("its init failed: {message}")]
    Init {
        /// What the plugin said.
        message: String,
    },
}

/// Reads a string field of a declaration whose ABI version matched.
fn text(s: Str, field: &'static str) -> Result<String, LoadErrorKind> {
    // SAFETY: with a matching ABI version, the declaration's strings are `'static` strings in
    // the mapped image.
    let bytes = unsafe { s.as_bytes() };
    String::from_utf8(bytes.to_vec()).map_err(|_| LoadErrorKind::NotUtf8 { field })
}

impl NativeLibrary {
    /// Loads the plugin `name` from the library at `path` and checks it (see the module docs).
    /// Errors say which plugin and what did not match.
    pub fn load(name: &str, path: &Path) -> Result<Arc<NativeLibrary>, LoadError> {
        let fail = |kind| LoadError::new(name, path, kind);
        if !path.is_file() {
            return Err(fail(LoadErrorKind::Missing));
        }
        // SAFETY: loading a library runs its initialisers. A millrace plugin's are those of a
        // Rust cdylib (none of its own); a library that is not a plugin is refused right after.
        let lib = unsafe { libloading::Library::new(path) }.map_err(|e| {
            fail(LoadErrorKind::Open {
                source: Box::new(e),
            })
        })?;
        // SAFETY: the symbol is a static, so the "function" we get is its address; it is only
        // dereferenced below after the null check.
        let decl: *const PluginDecl = unsafe {
            lib.get::<*const PluginDecl>(millrace_plugin::DECL_SYMBOL)
                .map(|s| *s)
                .map_err(|_| fail(LoadErrorKind::NoDeclaration))?
        };
        if decl.is_null() {
            return Err(fail(LoadErrorKind::NullDeclaration));
        }
        // SAFETY: `abi_version` is the first field in every ABI version, so it can be read
        // before knowing the layout of the rest.
        let abi = unsafe { std::ptr::addr_of!((*decl).abi_version).read() };
        check_abi(abi).map_err(fail)?;
        // SAFETY: the ABI version is one we speak: every one of them starts with version 1's
        // layout (the SDK asserts the offsets).
        let d = unsafe { &*decl.cast::<PluginDeclV1>() };
        let lines = (abi >= 2).then(|| {
            // SAFETY: an ABI 2 declaration has the whole `PluginDecl` layout.
            let d2 = unsafe { &*decl };
            LineEntries {
                caps: d2.caps,
                process_lines: d2.process_lines,
            }
        });
        let rustc = text(d.rustc, "compiler version").map_err(fail)?;
        check_rustc(&rustc).map_err(fail)?;
        let declared = text(d.name, "name").map_err(fail)?;
        if declared != name {
            return Err(fail(LoadErrorKind::Name {
                declared,
                manifest: name.to_string(),
            }));
        }
        let engine = text(d.engine, "engine requirement").map_err(fail)?;
        check_engine(&engine).map_err(fail)?;
        let version = text(d.version, "version").map_err(fail)?;

        let log = LogSink::new(name, None, LevelFilter::Trace);
        let mut err = Vec::new();
        // SAFETY: the declaration was checked; `log` lives in the returned `NativeLibrary`
        // until `unload` is called in its `Drop`; `err` lives for the call.
        let status = unsafe { (d.init)(&log.abi, &sink(&mut err)) };
        if status != OK {
            return Err(fail(LoadErrorKind::Init {
                message: String::from_utf8_lossy(&err).into_owned(),
            }));
        }
        log::debug!(target: "millrace::plugin", "loaded native plugin `{name}` {version} from {}", path.display());
        Ok(Arc::new(NativeLibrary {
            name: name.to_string(),
            version,
            path: path.to_path_buf(),
            decl: decl.cast::<PluginDeclV1>(),
            abi,
            lines,
            _lib: std::mem::ManuallyDrop::new(lib),
            log,
        }))
    }

    /// Loads the plugin from a fresh copy of the library at `path`. A reload uses it: `dlopen`
    /// of a path already loaded returns the image already loaded, not the file now on disk.
    ///
    /// The copy is made in a private directory of its own (mode 0700, an unpredictable name,
    /// see `private_dir.rs`), created afresh with `O_EXCL | O_NOFOLLOW`, and the directory
    /// is removed once the copy is loaded (the mapping stays), so no other user can plant a
    /// link where it is written or swap it before `dlopen`. `path` is read as `dlopen` would
    /// read it (links on the way to it followed) and must be a regular file.
    pub fn load_copy(name: &str, path: &Path) -> Result<Arc<NativeLibrary>, LoadError> {
        let copy_error =
            |to: PathBuf, source| LoadError::new(name, path, LoadErrorKind::Copy { to, source });
        let private = crate::private_dir::PrivateDir::new("millrace-native-")
            .map_err(|source| copy_error(std::env::temp_dir(), source))?;
        let copy = private.path().join(format!("{name}.so"));
        if let Err(source) = crate::private_dir::copy_file(path, &copy, true) {
            return Err(copy_error(copy, source));
        }
        let loaded = Self::load(name, &copy);
        drop(private); // removes the copy and its directory
                       // Errors name the library the user knows, not the copy.
        let mut lib = loaded.map_err(|mut e| {
            e.path = path.to_path_buf();
            if let LoadErrorKind::Open { source } = &mut e.kind {
                let (from, to) = (copy.display().to_string(), path.display().to_string());
                *source = source.to_string().replace(&from, &to).into();
            }
            e
        })?;
        if let Some(l) = Arc::get_mut(&mut lib) {
            l.path = path.to_path_buf();
        }
        Ok(lib)
    }

    /// The plugin's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The version the library declares.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Where it was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The ABI version the library declares.
    pub fn abi_version(&self) -> u32 {
        self.abi
    }

    fn decl(&self) -> &PluginDeclV1 {
        // SAFETY: checked at load; the image is never unmapped.
        unsafe { &*self.decl }
    }

    /// Creates an instance of `node` with `params` (a JSON object) for stage `stage`, logging
    /// at `level`.
    pub fn node(
        self: &Arc<Self>,
        node: &str,
        params: &Value,
        stage: &str,
        level: LevelFilter,
    ) -> Result<NativeNode, NodeError> {
        let log = LogSink::new(&self.name, Some(stage), level);
        let params = params.to_string();
        let mut err = Vec::new();
        // SAFETY: checked declaration; the strings, `log` and `err` live for the call; `log`
        // then lives in the node for as long as the instance.
        let inst = unsafe {
            (self.decl().create)(
                Str::from_bytes(node.as_bytes()),
                Str::from_bytes(params.as_bytes()),
                &log.abi,
                &sink(&mut err),
            )
        };
        if inst.is_null() {
            return Err(NodeError::Create {
                plugin: self.name.clone(),
                node: node.to_string(),
                message: String::from_utf8_lossy(&err).into_owned(),
            });
        }
        // SAFETY: `inst` is a live instance just made by this library's `create`.
        let lines = self
            .lines
            .filter(|l| unsafe { (l.caps)(inst) } & CAP_LINES != 0);
        Ok(NativeNode {
            lib: Arc::clone(self),
            node: node.to_string(),
            inst,
            log,
            lines,
            input: Vec::new(),
            offsets: Vec::new(),
            output: Vec::new(),
        })
    }
}

impl Drop for NativeLibrary {
    /// The last node is gone: detach the plugin's sink. The image stays mapped (module docs).
    fn drop(&mut self) {
        // SAFETY: checked declaration; `self.log` is the sink given to `init`, freed only after
        // `unload` returns (which waits for any thread of the plugin logging through it).
        unsafe { (self.decl().unload)(&self.log.abi) };
        log::debug!(target: "millrace::plugin", "unloaded native plugin `{}`", self.name);
    }
}

fn check_abi(found: u32) -> Result<(), LoadErrorKind> {
    let expected = millrace_plugin::ABI_VERSION;
    if !(millrace_plugin::ABI_VERSION_MIN..=expected).contains(&found) {
        return Err(LoadErrorKind::Abi { found, expected });
    }
    Ok(())
}

fn check_rustc(found: &str) -> Result<(), LoadErrorKind> {
    let ours = millrace_plugin::RUSTC_VERSION;
    if found != ours {
        return Err(LoadErrorKind::Compiler {
            found: found.to_string(),
            expected: ours.to_string(),
        });
    }
    Ok(())
}

fn check_engine(req: &str) -> Result<(), LoadErrorKind> {
    let parsed = semver::VersionReq::parse(req).map_err(|e| LoadErrorKind::BadRequirement {
        requirement: req.to_string(),
        source: Box::new(e),
    })?;
    let ours = semver::Version::parse(env!("CARGO_PKG_VERSION")).expect("our own version");
    if !parsed.matches(&ours) {
        return Err(LoadErrorKind::Engine {
            requirement: req.to_string(),
            version: ours.to_string(),
        });
    }
    Ok(())
}

/// A native node that could not be created or failed on a batch. In a pipeline it is the
/// `source` of the stage's [`Error::Operator`](crate::Error::Operator).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// The plugin refused to create the node (an unknown node, bad parameters).
    #[error("plugin `{plugin}` cannot create node `{node}`: {message}")]
    Create {
        /// The plugin.
        plugin: String,
        /// The node.
        node: String,
        /// What the plugin said.
        message: String,
    },
    /// The node returned an error.
    #[error("plugin `{plugin}` (node `{node}`): {message}")]
    Failed {
        /// The plugin.
        plugin: String,
        /// The node.
        node: String,
        /// What the node said.
        message: String,
    },
    /// The node panicked (caught on the plugin's side); the instance is poisoned.
    #[error("plugin `{plugin}` (node `{node}`) panicked: {message}")]
    Panicked {
        /// The plugin.
        plugin: String,
        /// The node.
        node: String,
        /// The panic message.
        message: String,
    },
    /// The node returned a status the ABI does not define.
    #[error("plugin `{plugin}` (node `{node}`) returned unknown status {status}")]
    UnknownStatus {
        /// The plugin.
        plugin: String,
        /// The node.
        node: String,
        /// The status.
        status: i32,
    },
    /// A record the node wrote is not JSON.
    #[error("plugin `{plugin}` (node `{node}`): output record {record}: {source}")]
    BadOutput {
        /// The plugin.
        plugin: String,
        /// The node.
        node: String,
        /// The record's 1-based position in the node's output for the call.
        record: usize,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
    /// A line the node wrote on the byte path is not one JSON object (or not UTF-8).
    #[error("plugin `{plugin}` (node `{node}`): output record {record}: {message}")]
    BadLine {
        /// The plugin.
        plugin: String,
        /// The node.
        node: String,
        /// The line's 1-based position in the node's output for the call.
        record: u64,
        /// What is wrong with it.
        message: String,
    },
    /// An input record could not be serialised for the node.
    #[error("plugin `{plugin}` (node `{node}`): cannot serialise an input record: {source}")]
    Input {
        /// The plugin.
        plugin: String,
        /// The node.
        node: String,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
}

/// One instance of a native node. Holds its library alive.
pub struct NativeNode {
    lib: Arc<NativeLibrary>,
    node: String,
    inst: *mut c_void,
    log: Box<LogSink>,
    /// The line path's entry points, when this instance takes it (`CAP_LINES`).
    lines: Option<LineEntries>,
    input: Vec<u8>,
    /// Record offsets into `input` (or a block) for the line path.
    offsets: Vec<usize>,
    output: Vec<u8>,
}

// SAFETY: an instance is used by one thread at a time (`&mut self` methods; not `Sync`); the
// ABI lets the host move an instance between threads (the SDK requires `Node: Send`).
unsafe impl Send for NativeNode {}

impl fmt::Debug for NativeNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NativeNode({}.{})", self.lib.name, self.node)
    }
}

impl NativeNode {
    /// Whether this instance takes its batches on the line path (a `LineNode` of an ABI 2
    /// plugin) rather than as NDJSON text for the SDK to parse.
    pub fn takes_lines(&self) -> bool {
        self.lines.is_some()
    }

    /// Processes one batch, appending the node's records to `out`.
    pub fn process(&mut self, batch: &[Value], out: &mut Vec<Value>) -> Result<(), NodeError> {
        self.input.clear();
        self.offsets.clear();
        self.offsets.push(0);
        for v in batch {
            serde_json::to_writer(&mut self.input, v).map_err(|source| NodeError::Input {
                plugin: self.lib.name.clone(),
                node: self.node.clone(),
                source,
            })?;
            self.input.push(b'\n');
            self.offsets.push(self.input.len());
        }
        let input = std::mem::take(&mut self.input);
        let called = self.call(&input);
        self.input = input;
        called?;
        self.collect(out)
    }

    /// Processes one block of checked NDJSON lines (each one JSON object ending in `\n`, as
    /// `ndjson::check_block` leaves them) and returns the node's output, every line checked
    /// the same way, and how many records it holds. The bytes are the node's own: nothing is
    /// parsed into values.
    pub(crate) fn process_block(&mut self, block: &[u8]) -> Result<(Vec<u8>, u64), NodeError> {
        self.offsets.clear();
        if self.lines.is_some() {
            self.offsets.push(0);
            self.offsets
                .extend(crate::ndjson::Newlines::new(block).map(|i| i + 1));
            if block.last().is_some_and(|b| *b != b'\n') {
                self.offsets.push(block.len());
            }
        }
        // The output goes on in a block of its own: room for about as much as came in.
        self.output = Vec::with_capacity(block.len() + block.len() / 4);
        self.call(block)?;
        self.block_output()
    }

    /// The input ended: the node's last records as a block (see [`Self::process_block`]).
    pub(crate) fn finish_block(&mut self) -> Result<(Vec<u8>, u64), NodeError> {
        self.call_finish()?;
        self.block_output()
    }

    /// Calls the node on `data` (its records at `self.offsets` when on the line path), the
    /// output in `self.output`; the status is checked.
    fn call(&mut self, data: &[u8]) -> Result<(), NodeError> {
        self.output.clear();
        let mut err = Vec::new();
        let status = match self.lines {
            Some(l) => {
                let batch = LineBatch {
                    data: data.as_ptr(),
                    len: data.len(),
                    offsets: self.offsets.as_ptr(),
                    count: self.offsets.len() - 1,
                };
                // SAFETY: a live instance of this library that said `CAP_LINES`, used by one
                // thread; `data` has `len` bytes and `offsets` `count + 1` entries, the last
                // `len`, all alive (and unchanged) for the call, as are the sinks.
                unsafe {
                    (l.process_lines)(
                        self.inst,
                        &batch,
                        &self.log.abi,
                        &sink(&mut self.output),
                        &sink(&mut err),
                    )
                }
            }
            // SAFETY: a live instance of this library, used by one thread; every buffer lives
            // for the call.
            None => unsafe {
                (self.lib.decl().process)(
                    self.inst,
                    Str::from_bytes(data),
                    &self.log.abi,
                    &sink(&mut self.output),
                    &sink(&mut err),
                )
            },
        };
        self.status(status, &err)
    }

    fn call_finish(&mut self) -> Result<(), NodeError> {
        self.output.clear();
        let mut err = Vec::new();
        let d = self.lib.decl();
        // SAFETY: as in `call`.
        let status = unsafe {
            (d.finish)(
                self.inst,
                &self.log.abi,
                &sink(&mut self.output),
                &sink(&mut err),
            )
        };
        self.status(status, &err)
    }

    /// The input ended: appends what the node still holds to `out`.
    pub fn finish(&mut self, out: &mut Vec<Value>) -> Result<(), NodeError> {
        self.call_finish()?;
        self.collect(out)
    }

    fn status(&self, status: i32, err: &[u8]) -> Result<(), NodeError> {
        let (plugin, node) = (self.lib.name.clone(), self.node.clone());
        let message = String::from_utf8_lossy(err).into_owned();
        match status {
            OK => Ok(()),
            ERROR => Err(NodeError::Failed {
                plugin,
                node,
                message,
            }),
            PANIC => Err(NodeError::Panicked {
                plugin,
                node,
                message,
            }),
            status => Err(NodeError::UnknownStatus {
                plugin,
                node,
                status,
            }),
        }
    }

    /// The output of a call on the byte path, checked: every line one JSON object (blank lines
    /// and `\r` dropped), UTF-8, within the line cap.
    fn block_output(&mut self) -> Result<(Vec<u8>, u64), NodeError> {
        let mut data = std::mem::take(&mut self.output);
        match crate::ndjson::check_block(&mut data, 1, crate::source::MAX_LINE_BYTES) {
            Ok(records) => Ok((data, records)),
            Err(bad) => Err(NodeError::BadLine {
                plugin: self.lib.name.clone(),
                node: self.node.clone(),
                record: bad.line,
                message: bad.message,
            }),
        }
    }

    fn collect(&self, out: &mut Vec<Value>) -> Result<(), NodeError> {
        for (i, line) in self.output.split(|b| *b == b'\n').enumerate() {
            if line.is_empty() {
                continue;
            }
            let v = serde_json::from_slice(line).map_err(|source| NodeError::BadOutput {
                plugin: self.lib.name.clone(),
                node: self.node.clone(),
                record: i + 1,
                source,
            })?;
            out.push(v);
        }
        Ok(())
    }
}

impl Drop for NativeNode {
    fn drop(&mut self) {
        // SAFETY: a live instance, destroyed once; its sink lives until after the call.
        unsafe { (self.lib.decl().destroy)(self.inst, &self.log.abi) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mismatches_are_explained() {
        let ours = millrace_plugin::ABI_VERSION;
        let e = check_abi(ours + 1).unwrap_err();
        assert!(
            matches!(e, LoadErrorKind::Abi { found, expected } if found == ours + 1 && expected == ours),
            "{e:?}"
        );
        assert_eq!(
            e.to_string(),
            format!(
                "it was built for plugin ABI version 3, and this millrace speaks ABI versions 1 \
                 to 2: rebuild it against millrace-plugin {}",
                millrace_plugin::SDK_VERSION
            )
        );
        assert!(check_abi(ours).is_ok());
        assert!(check_abi(millrace_plugin::ABI_VERSION_MIN).is_ok());
        assert!(check_abi(0).is_err());

        let e = check_rustc("rustc 1.0.0 (a28077b28 2015-05-13)").unwrap_err();
        assert!(
            matches!(&e, LoadErrorKind::Compiler { found, expected }
                if found.starts_with("rustc 1.0.0") && expected == millrace_plugin::RUSTC_VERSION),
            "{e:?}"
        );
        assert!(check_rustc(millrace_plugin::RUSTC_VERSION).is_ok());

        let e = check_engine(">=99").unwrap_err();
        assert!(
            matches!(&e, LoadErrorKind::Engine { requirement, version }
                if requirement == ">=99" && version == env!("CARGO_PKG_VERSION")),
            "{e:?}"
        );
        let e = check_engine("not a requirement").unwrap_err();
        assert!(matches!(e, LoadErrorKind::BadRequirement { .. }), "{e:?}");
        assert!(std::error::Error::source(&e).is_some());
        assert!(e.to_string().contains("not a semver requirement"), "{e}");
        assert!(check_engine(">=0.1, <0.2").is_ok());

        let e = NativeLibrary::load("nothing", Path::new("/no/such/lib.so")).unwrap_err();
        assert!(matches!(e.kind(), LoadErrorKind::Missing), "{e:?}");
        assert_eq!(
            e.to_string(),
            "native plugin `nothing` (/no/such/lib.so): no library at this path: build the \
             plugin first (see its plugin.toml)"
        );
    }
}

/// A native node stage as the config layer builds it.
#[derive(Debug, Clone)]
pub(crate) struct NativeSpec {
    /// The loaded library.
    pub lib: Arc<NativeLibrary>,
    /// The node's name.
    pub node: String,
    /// Its parameters (checked against the manifest).
    pub params: Value,
    /// The stage's `log_level`.
    pub log_level: LevelFilter,
    /// Why the stage cannot be checkpointed (its node's manifest does not declare `stateless
    /// = true`); `None` for a stateless node.
    pub checkpoint_refusal: Option<String>,
}

/// What a native stage moves: records as values, or (the byte path) blocks of checked lines.
pub(crate) trait NativeItem: Send + Sized + 'static {
    /// How many records a batch holds.
    fn records(batch: &[Self]) -> u64;
    /// Has `node` process `batch`, appending what it emits to `out` (counted in `cx`).
    fn process(
        node: &mut NativeNode,
        batch: &[Self],
        out: &mut Vec<Self>,
        cx: &crate::runtime::Cx,
    ) -> Result<(), NodeError>;
    /// The input of `node` ended: appends what it still holds to `out`.
    fn finish(
        node: &mut NativeNode,
        out: &mut Vec<Self>,
        cx: &crate::runtime::Cx,
    ) -> Result<(), NodeError>;
    /// How a pull that produced output ends: blocks are sent one by one (a batch of them could
    /// hold `batch_size` blocks of 256 KiB).
    fn produced(pulled: crate::runtime::Pull) -> crate::runtime::Pull;
}

impl NativeItem for Value {
    fn records(batch: &[Self]) -> u64 {
        batch.len() as u64
    }
    fn process(
        node: &mut NativeNode,
        batch: &[Self],
        out: &mut Vec<Self>,
        _: &crate::runtime::Cx,
    ) -> Result<(), NodeError> {
        node.process(batch, out)
    }
    fn finish(
        node: &mut NativeNode,
        out: &mut Vec<Self>,
        _: &crate::runtime::Cx,
    ) -> Result<(), NodeError> {
        node.finish(out)
    }
    fn produced(pulled: crate::runtime::Pull) -> crate::runtime::Pull {
        pulled
    }
}

/// Appends a block the node emitted, if it holds records: the channel and the chain after the
/// head count a block as one record, so the rest are added (see [`Chunk::records`]).
fn push_block((data, records): (Vec<u8>, u64), out: &mut Vec<Chunk>, cx: &crate::runtime::Cx) {
    if records == 0 {
        return;
    }
    crate::metrics::InstanceMetrics::add(&cx.metrics.records_out, records - 1);
    crate::metrics::InstanceMetrics::add(&cx.metrics.chain_in, records - 1);
    out.push(Chunk {
        first_line: 1,
        data,
        records,
        origin: None,
    });
}

impl NativeItem for Chunk {
    fn records(batch: &[Self]) -> u64 {
        batch.iter().map(|c| c.records).sum()
    }
    fn process(
        node: &mut NativeNode,
        batch: &[Self],
        out: &mut Vec<Self>,
        cx: &crate::runtime::Cx,
    ) -> Result<(), NodeError> {
        for c in batch {
            push_block(node.process_block(&c.data)?, out, cx);
        }
        Ok(())
    }
    fn finish(
        node: &mut NativeNode,
        out: &mut Vec<Self>,
        cx: &crate::runtime::Cx,
    ) -> Result<(), NodeError> {
        push_block(node.finish_block()?, out, cx);
        Ok(())
    }
    fn produced(pulled: crate::runtime::Pull) -> crate::runtime::Pull {
        match pulled {
            crate::runtime::Pull::Data => crate::runtime::Pull::Idle,
            other => other,
        }
    }
}

/// The head of a native node stage instance: pulls a batch, has the node process it.
///
/// A reloadable stage (`live`) loads its spec once per batch and recreates its node when the
/// version changed, before processing the batch; otherwise the spec is read once. The old
/// version's node is finished first and its last records are emitted before the new node sees
/// a record (see [`NativeHead::node_for_batch`]).
pub(crate) struct NativeHead<T> {
    name: Arc<str>,
    spec: Arc<crate::versioned::Versioned<NativeSpec>>,
    live: bool,
    input: crate::channel::InputHead<T>,
    /// The node and the version it was made from.
    node: Option<(u64, NativeNode)>,
    batch: Vec<T>,
    /// An input batch held back for the next pull, and how the pull that got it ended: after a
    /// reload the old node's last records go out first, in a batch of their own.
    held: Option<crate::runtime::Pull>,
    ended: bool,
}

impl<T: NativeItem> NativeHead<T> {
    pub(crate) fn new(
        name: Arc<str>,
        input: crate::channel::InputHead<T>,
        spec: Arc<crate::versioned::Versioned<NativeSpec>>,
        live: bool,
    ) -> Self {
        NativeHead {
            name,
            spec,
            live,
            input,
            node: None,
            batch: Vec::new(),
            held: None,
            ended: false,
        }
    }

    fn error(&self, e: NodeError) -> crate::operator::Halt {
        crate::operator::Halt::Failed(crate::error::Error::Operator {
            stage: self.name.to_string(),
            source: Box::new(e),
        })
    }

    /// The node for the next batch: made (again) when there is none or, for a live stage, when
    /// the version changed. A reload hands over as a process stage does: the old version's
    /// node sees the end of its input and appends what it still holds to `buf` (a stateful
    /// node's counts or buffered records), then it, and the library it holds, go, before the
    /// new version's node is made.
    fn node_for_batch(
        &mut self,
        buf: &mut Vec<T>,
        cx: &crate::runtime::Cx,
    ) -> Result<u64, crate::operator::Halt> {
        if let (Some((version, _)), false) = (&self.node, self.live) {
            return Ok(*version);
        }
        let (version, s) = self.spec.load();
        if self.node.as_ref().map(|n| n.0) != Some(version) {
            if let Some((_, mut old)) = self.node.take() {
                T::finish(&mut old, buf, cx).map_err(|e| self.error(e))?;
            }
            let node = s
                .lib
                .node(&s.node, &s.params, &self.name, s.log_level)
                .map_err(|e| self.error(e))?;
            self.node = Some((version, node));
        }
        Ok(version)
    }
}

impl<T: NativeItem> crate::runtime::Head<T> for NativeHead<T> {
    fn counts_input(&self) -> bool {
        true // a node's output is not its input
    }

    /// A stateless node has nothing to snapshot; any other is refused (the native ABI has no
    /// snapshot call yet).
    fn state_support(&self) -> crate::checkpoint::StateSupport {
        match &self.spec.load().1.checkpoint_refusal {
            None => crate::checkpoint::StateSupport::Stateless,
            Some(why) => crate::checkpoint::StateSupport::Unsupported(why.clone()),
        }
    }

    fn pull(
        &mut self,
        cx: &crate::runtime::Cx,
        buf: &mut Vec<T>,
        flush_at: Option<u64>,
    ) -> Result<crate::runtime::Pull, crate::operator::Halt> {
        use crate::metrics::InstanceMetrics;
        use crate::runtime::Pull;
        if self.ended {
            return Ok(Pull::End);
        }
        if self.node.is_none() {
            self.node_for_batch(buf, cx)?; // the first node: nothing to hand over
        }
        loop {
            let pulled = match self.held.take() {
                Some(pulled) => pulled, // `self.batch` is the batch held back
                None => {
                    self.batch.clear();
                    let pulled = self.input.pull(cx, &mut self.batch, flush_at)?;
                    if !self.batch.is_empty() {
                        let n = T::records(&self.batch);
                        InstanceMetrics::add(&cx.metrics.records_in, n);
                        InstanceMetrics::add(&cx.metrics.batches_in, 1);
                    }
                    pulled
                }
            };
            if !self.batch.is_empty() {
                let version = self.node_for_batch(buf, cx)?;
                if !buf.is_empty() {
                    // A reload: the old node's last records go out now, flushed as a batch of
                    // their own; this batch goes to the new node at the next pull.
                    self.held = Some(pulled);
                    return Ok(Pull::Idle);
                }
                if self.live {
                    self.spec.count(version, T::records(&self.batch));
                }
                let node = &mut self.node.as_mut().expect("made above").1;
                if let Err(e) = T::process(node, &self.batch, buf, cx) {
                    return Err(self.error(e));
                }
            }
            if pulled == Pull::End {
                self.ended = true;
                let node = &mut self.node.as_mut().expect("made above").1;
                if let Err(e) = T::finish(node, buf, cx) {
                    return Err(self.error(e));
                }
                return Ok(Pull::End);
            }
            if pulled != Pull::Data {
                return Ok(pulled);
            }
            if !buf.is_empty() {
                return Ok(T::produced(pulled));
            }
        }
    }
}
