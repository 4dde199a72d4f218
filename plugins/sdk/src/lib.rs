//! # millrace-plugin: the SDK for native millrace plugins
//!
//! A native plugin is a `cdylib` that exports one static, `MILLRACE_PLUGIN`, made by
//! [`export_plugin!`]. The host (millrace) reads it, checks that the plugin speaks the same
//! [ABI version](ABI_VERSION), was built by the same compiler and accepts this millrace
//! version, and only then calls into it.
//!
//! Everything that crosses the boundary is C: `#[repr(C)]` structs, `extern "C"` functions,
//! bytes. Records cross as NDJSON, one batch per call, so host and plugin never share a Rust
//! type, an allocator or a `serde_json` version. No panic crosses it: every entry point catches
//! unwinding and reports it as an error naming the plugin.
//!
//! A node is written one of two ways:
//!
//! - [`Node`]: it gets each batch as `serde_json::Value`s and pushes `Value`s. Simple; the SDK
//!   parses every input line and serialises every output record (about 1 µs a record).
//! - [`LineNode`] (ABI 2, the *line path*): it gets the batch's records as the NDJSON lines the
//!   host already has ([`Lines`], one borrowed byte slice each, no allocation) and writes output
//!   lines into a [`LineWriter`]. Nothing is parsed unless the node parses it, so a map that
//!   touches a few bytes runs at memory speed. The host checks every line it gets back (UTF-8,
//!   one JSON object per line) and fails the stage, naming it and the plugin, on the first bad
//!   one.
//!
//! A plugin's `create` returns either (anything `Into<`[`AnyNode`]`>`), node by node.
//!
//! Logging: the `log` macros inside a plugin go to a sink the host hands over, under the target
//! `plugin::<name>` and at the level the pipeline sets for the stage (`log_level`). The plugin's
//! `log` crate is its own copy (a `cdylib` links its dependencies statically), so its logger
//! and level never touch another plugin's or the host's.
//!
//! ```ignore
//! use millrace_plugin::{export_plugin, Node, Value};
//!
//! struct Tag(String);
//!
//! impl Node for Tag {
//!     fn process(&mut self, batch: Vec<Value>, out: &mut Vec<Value>) -> Result<(), String> {
//!         for mut record in batch {
//!             record["tag"] = Value::String(self.0.clone());
//!             out.push(record);
//!         }
//!         Ok(())
//!     }
//! }
//!
//! fn create(node: &str, params: &Value) -> Result<Box<dyn Node>, String> {
//!     match node {
//!         "tag" => Ok(Box::new(Tag(params["value"].as_str().unwrap_or("x").into()))),
//!         other => Err(format!("no node `{other}`")),
//!     }
//! }
//!
//! export_plugin!(name = "tagger", engine = ">=0.1, <0.2", create = create);
//! ```

#![warn(missing_docs)]

pub use log;
pub use serde_json;
pub use serde_json::Value;

/// The version of the boundary between host and plugin. It changes whenever anything in
/// [`abi`] changes; a host refuses a plugin whose number it does not speak.
///
/// - 1: NDJSON batches in and out ([`abi::PluginDeclV1`]).
/// - 2: adds the line path ([`abi::PluginDecl::caps`], [`abi::PluginDecl::process_lines`]): a
///   batch is the host's bytes plus the offsets of its records. The declaration starts with
///   version 1's fields, so a version 2 host still loads a version 1 plugin.
pub const ABI_VERSION: u32 = 2;

/// The oldest ABI version a host built with this SDK still loads.
pub const ABI_VERSION_MIN: u32 = 1;

/// The compiler that built this SDK (`rustc --version`). A plugin carries the one it was built
/// with, and the host refuses a plugin built by another.
pub const RUSTC_VERSION: &str = env!("MILLRACE_PLUGIN_RUSTC");

/// This SDK's version.
pub const SDK_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The exported symbol the host looks up, NUL-terminated.
pub const DECL_SYMBOL: &[u8] = b"MILLRACE_PLUGIN\0";

/// One node instance: it receives whole batches of records and pushes what it emits.
///
/// One instance is created per stage instance and is only ever called from one thread at a
/// time.
pub trait Node: Send {
    /// Processes one batch; records pushed to `out` go downstream in order.
    fn process(&mut self, batch: Vec<Value>, out: &mut Vec<Value>) -> Result<(), String>;

    /// The input ended: emit whatever is still held.
    fn finish(&mut self, _out: &mut Vec<Value>) -> Result<(), String> {
        Ok(())
    }
}

/// A node on the line path: it sees each record as the bytes of one NDJSON line (a JSON object,
/// UTF-8, without its newline) and writes the lines it emits. See the crate docs.
///
/// One instance is created per stage instance and is only ever called from one thread at a
/// time. Neither [`Lines`] nor [`LineWriter`] can be kept past the call (they borrow host
/// memory for its duration only).
pub trait LineNode: Send {
    /// Processes one batch; lines written to `out` go downstream in order.
    fn process(&mut self, batch: &Lines<'_>, out: &mut LineWriter<'_>) -> Result<(), String>;

    /// The input ended: emit whatever is still held.
    fn finish(&mut self, _out: &mut LineWriter<'_>) -> Result<(), String> {
        Ok(())
    }
}

/// A node of either kind, as a plugin's constructor returns it.
pub enum AnyNode {
    /// A [`Node`]: records as `Value`s.
    Values(Box<dyn Node>),
    /// A [`LineNode`]: records as NDJSON lines.
    Lines(Box<dyn LineNode>),
}

impl AnyNode {
    /// A [`Node`].
    pub fn values(node: impl Node + 'static) -> AnyNode {
        AnyNode::Values(Box::new(node))
    }

    /// A [`LineNode`].
    pub fn lines(node: impl LineNode + 'static) -> AnyNode {
        AnyNode::Lines(Box::new(node))
    }
}

impl From<Box<dyn Node>> for AnyNode {
    fn from(n: Box<dyn Node>) -> AnyNode {
        AnyNode::Values(n)
    }
}

impl From<Box<dyn LineNode>> for AnyNode {
    fn from(n: Box<dyn LineNode>) -> AnyNode {
        AnyNode::Lines(n)
    }
}

/// One batch on the line path: record `i` is the `i`-th NDJSON line, without its newline.
/// Borrowed from the host for one call.
#[derive(Clone, Copy, Debug)]
pub struct Lines<'a> {
    data: &'a [u8],
    /// `len() + 1` entries, non-decreasing, the last at most `data.len()` (checked when made).
    offsets: &'a [usize],
}

impl<'a> Lines<'a> {
    /// The records of `data` delimited by `offsets` (`n + 1` entries for `n` records: record `i`
    /// is `data[offsets[i]..offsets[i + 1]]` less one final `\n`). `None` when the offsets do
    /// not fit: fewer than one, decreasing, or past the data.
    pub fn new(data: &'a [u8], offsets: &'a [usize]) -> Option<Lines<'a>> {
        let ok = !offsets.is_empty()
            && offsets.windows(2).all(|w| w[0] <= w[1])
            && offsets[offsets.len() - 1] <= data.len();
        ok.then_some(Lines { data, offsets })
    }

    /// How many records.
    pub fn len(&self) -> usize {
        self.offsets.len() - 1
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Record `i` (the bytes of one JSON object), or `None` past the end.
    pub fn get(&self, i: usize) -> Option<&'a [u8]> {
        let (start, end) = (*self.offsets.get(i)?, *self.offsets.get(i + 1)?);
        let line = &self.data[start..end];
        Some(line.strip_suffix(b"\n").unwrap_or(line))
    }

    /// The records in order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = &'a [u8]> + 'a {
        let data = self.data;
        self.offsets.windows(2).map(move |w| {
            let line = &data[w[0]..w[1]];
            line.strip_suffix(b"\n").unwrap_or(line)
        })
    }

    /// Every record's bytes, back to back with their newlines: `data[offsets[0]..offsets[n]]`.
    /// A node that passes most records through unchanged can copy runs of them at once.
    pub fn bytes(&self) -> &'a [u8] {
        &self.data[self.offsets[0]..self.offsets[self.len()]]
    }
}

/// Where a [`LineNode`] writes its records: one NDJSON line each (a JSON object, UTF-8, no
/// newline inside; the writer adds the newline). The host checks every line.
#[derive(Debug)]
pub struct LineWriter<'a> {
    buf: &'a mut Vec<u8>,
}

impl<'a> LineWriter<'a> {
    /// A writer appending to `buf` (the SDK's buffer; public for tests of a node).
    pub fn new(buf: &'a mut Vec<u8>) -> LineWriter<'a> {
        LineWriter { buf }
    }

    /// Emits one record: `line` and a newline.
    pub fn push(&mut self, line: &[u8]) {
        self.buf.reserve(line.len() + 1);
        self.buf.extend_from_slice(line);
        self.buf.push(b'\n');
    }

    /// Emits one record written piece by piece by `f` into the buffer (which holds the lines
    /// before it: `f` only appends), then a newline.
    pub fn push_with<R>(&mut self, f: impl FnOnce(&mut Vec<u8>) -> R) -> R {
        let r = f(self.buf);
        self.buf.push(b'\n');
        r
    }

    /// Emits records already framed as NDJSON (each ending in `\n`), as [`Lines::bytes`] gives.
    pub fn push_lines(&mut self, ndjson: &[u8]) {
        self.buf.extend_from_slice(ndjson);
        if !ndjson.is_empty() && !ndjson.ends_with(b"\n") {
            self.buf.push(b'\n');
        }
    }
}

/// The signature of a plugin's constructor: the node's name and its parameters (a JSON object,
/// already checked against the manifest by the host). The constructor [`export_plugin!`] takes
/// may return any `Into<AnyNode>` (this `Box<dyn Node>`, an [`AnyNode`], ...).
pub type CreateFn = fn(node: &str, params: &Value) -> Result<Box<dyn Node>, String>;

/// The C boundary. Changing anything here means raising [`ABI_VERSION`].
pub mod abi {
    use std::ffi::c_void;

    /// Borrowed bytes (UTF-8 where text is meant).
    #[repr(C)]
    #[derive(Clone, Copy, Debug)]
    pub struct Str {
        /// Start of the bytes.
        pub ptr: *const u8,
        /// How many.
        pub len: usize,
    }

    impl Str {
        /// A `'static` string, usable in a `static` initialiser.
        pub const fn new(s: &'static str) -> Str {
            Str {
                ptr: s.as_ptr(),
                len: s.len(),
            }
        }

        /// Borrows a byte slice for the duration of a call.
        pub fn from_bytes(b: &[u8]) -> Str {
            Str {
                ptr: b.as_ptr(),
                len: b.len(),
            }
        }

        /// The bytes.
        ///
        /// # Safety
        /// `ptr` must point to `len` readable bytes that outlive `'a`.
        pub unsafe fn as_bytes<'a>(self) -> &'a [u8] {
            if self.len == 0 {
                return &[];
            }
            // SAFETY: the caller guarantees `ptr` points to `len` live bytes.
            unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
        }
    }

    /// Where a plugin writes bytes (records out, error messages): the host appends them to a
    /// buffer of its own, so no allocation crosses the boundary.
    #[repr(C)]
    pub struct Sink {
        /// The host's buffer.
        pub ctx: *mut c_void,
        /// Appends `len` bytes at `ptr` to the buffer.
        pub write: unsafe extern "C" fn(ctx: *mut c_void, ptr: *const u8, len: usize),
    }

    /// A log sink the host hands a plugin: records at `max_level` or below (1 = error ...
    /// 5 = trace, 0 = off) are passed to `write`, which logs them under `plugin::<name>`.
    #[repr(C)]
    pub struct HostLog {
        /// The host's sink state.
        pub ctx: *const c_void,
        /// The most verbose level wanted (1 = error ... 5 = trace; 0 = nothing).
        pub max_level: u32,
        /// Logs one message at `level`.
        pub write: unsafe extern "C" fn(ctx: *const c_void, level: u32, ptr: *const u8, len: usize),
    }

    /// Returned by the calls below: done.
    pub const OK: i32 = 0;
    /// Returned by the calls below: failed, the message is in the error sink.
    pub const ERROR: i32 = 1;
    /// Returned by the calls below: the plugin panicked, the message is in the error sink; the
    /// instance is poisoned.
    pub const PANIC: i32 = 2;

    /// [`PluginDecl::caps`]: the instance takes its batches through `process_lines` (it is a
    /// [`LineNode`](crate::LineNode)); otherwise the host calls `process`.
    pub const CAP_LINES: u32 = 1;

    /// A batch on the line path: `count` records in the `len` bytes at `data`, record `i` being
    /// `data[offsets[i]..offsets[i + 1]]` less its final `\n`. `offsets` points to `count + 1`
    /// non-decreasing offsets, the last at most `len`. Each record is one JSON object, UTF-8,
    /// with no newline inside.
    #[repr(C)]
    #[derive(Clone, Copy, Debug)]
    pub struct LineBatch {
        /// The records' bytes.
        pub data: *const u8,
        /// How many bytes.
        pub len: usize,
        /// `count + 1` offsets into `data`.
        pub offsets: *const usize,
        /// How many records.
        pub count: usize,
    }

    /// The plugin's declaration, exported as `MILLRACE_PLUGIN`.
    ///
    /// `abi_version` comes first and stays first in every ABI version: the host reads it
    /// before anything else and reads nothing more if it differs. Version 2 appends its
    /// fields after version 1's ([`PluginDeclV1`]), which keep their places.
    #[repr(C)]
    pub struct PluginDecl {
        /// [`ABI_VERSION`](crate::ABI_VERSION) of the SDK the plugin was built with.
        pub abi_version: u32,
        /// `rustc --version` of the compiler that built it.
        pub rustc: Str,
        /// The SDK's version.
        pub sdk_version: Str,
        /// The plugin's name; it must match its manifest.
        pub name: Str,
        /// The plugin's version.
        pub version: Str,
        /// The millrace versions it works with (a semver requirement).
        pub engine: Str,
        /// Called once after loading, with the plugin-wide log sink (used by threads of the
        /// plugin's own, outside calls from the host).
        pub init: unsafe extern "C" fn(log: *const HostLog, err: *const Sink) -> i32,
        /// Creates an instance of a node from its JSON parameters; null on failure (the
        /// reason in `err`).
        pub create: unsafe extern "C" fn(
            node: Str,
            params: Str,
            log: *const HostLog,
            err: *const Sink,
        ) -> *mut c_void,
        /// Processes one NDJSON batch, writing NDJSON records to `out`.
        pub process: unsafe extern "C" fn(
            inst: *mut c_void,
            batch: Str,
            log: *const HostLog,
            out: *const Sink,
            err: *const Sink,
        ) -> i32,
        /// End of input: writes what the instance still holds to `out`.
        pub finish: unsafe extern "C" fn(
            inst: *mut c_void,
            log: *const HostLog,
            out: *const Sink,
            err: *const Sink,
        ) -> i32,
        /// Drops an instance.
        pub destroy: unsafe extern "C" fn(inst: *mut c_void, log: *const HostLog),
        /// The host is done with the plugin: detach the plugin-wide sink if it is `log`.
        pub unload: unsafe extern "C" fn(log: *const HostLog),
        /// ABI 2: what an instance made by `create` can do ([`CAP_LINES`]: take batches
        /// through `process_lines`). Asked once per instance.
        pub caps: unsafe extern "C" fn(inst: *mut c_void) -> u32,
        /// ABI 2: processes one batch given as the host's bytes and the offsets of its records
        /// (see [`LineBatch`]), writing NDJSON records to `out` as `process` does. The batch,
        /// its offsets and the sinks are the host's for the duration of the call only.
        pub process_lines: unsafe extern "C" fn(
            inst: *mut c_void,
            batch: *const LineBatch,
            log: *const HostLog,
            out: *const Sink,
            err: *const Sink,
        ) -> i32,
    }

    /// The declaration of an ABI version 1 plugin: the first fields of [`PluginDecl`], in the
    /// same order (a host reads a version 1 plugin's declaration as this).
    #[repr(C)]
    pub struct PluginDeclV1 {
        /// [`ABI_VERSION`](crate::ABI_VERSION) of the SDK the plugin was built with.
        pub abi_version: u32,
        /// `rustc --version` of the compiler that built it.
        pub rustc: Str,
        /// The SDK's version.
        pub sdk_version: Str,
        /// The plugin's name; it must match its manifest.
        pub name: Str,
        /// The plugin's version.
        pub version: Str,
        /// The millrace versions it works with (a semver requirement).
        pub engine: Str,
        /// Called once after loading, with the plugin-wide log sink (used by threads of the
        /// plugin's own, outside calls from the host).
        pub init: unsafe extern "C" fn(log: *const HostLog, err: *const Sink) -> i32,
        /// Creates an instance of a node from its JSON parameters; null on failure (the
        /// reason in `err`).
        pub create: unsafe extern "C" fn(
            node: Str,
            params: Str,
            log: *const HostLog,
            err: *const Sink,
        ) -> *mut c_void,
        /// Processes one NDJSON batch, writing NDJSON records to `out`.
        pub process: unsafe extern "C" fn(
            inst: *mut c_void,
            batch: Str,
            log: *const HostLog,
            out: *const Sink,
            err: *const Sink,
        ) -> i32,
        /// End of input: writes what the instance still holds to `out`.
        pub finish: unsafe extern "C" fn(
            inst: *mut c_void,
            log: *const HostLog,
            out: *const Sink,
            err: *const Sink,
        ) -> i32,
        /// Drops an instance.
        pub destroy: unsafe extern "C" fn(inst: *mut c_void, log: *const HostLog),
        /// The host is done with the plugin: detach the plugin-wide sink if it is `log`.
        pub unload: unsafe extern "C" fn(log: *const HostLog),
    }

    // SAFETY: a declaration is immutable static data: pointers to `'static` strings and
    // functions. Sharing it between threads shares nothing mutable.
    unsafe impl Sync for PluginDecl {}
    // SAFETY: as above.
    unsafe impl Sync for PluginDeclV1 {}

    // Version 2 keeps version 1's fields where they were: a host reads either through them.
    const _: () = {
        use std::mem::offset_of;
        assert!(offset_of!(PluginDecl, abi_version) == offset_of!(PluginDeclV1, abi_version));
        assert!(offset_of!(PluginDecl, rustc) == offset_of!(PluginDeclV1, rustc));
        assert!(offset_of!(PluginDecl, name) == offset_of!(PluginDeclV1, name));
        assert!(offset_of!(PluginDecl, engine) == offset_of!(PluginDeclV1, engine));
        assert!(offset_of!(PluginDecl, init) == offset_of!(PluginDeclV1, init));
        assert!(offset_of!(PluginDecl, create) == offset_of!(PluginDeclV1, create));
        assert!(offset_of!(PluginDecl, process) == offset_of!(PluginDeclV1, process));
        assert!(offset_of!(PluginDecl, finish) == offset_of!(PluginDeclV1, finish));
        assert!(offset_of!(PluginDecl, destroy) == offset_of!(PluginDeclV1, destroy));
        assert!(offset_of!(PluginDecl, unload) == offset_of!(PluginDeclV1, unload));
        assert!(std::mem::size_of::<PluginDeclV1>() <= offset_of!(PluginDecl, caps));
    };
}

/// Exports the plugin's declaration. `name` must match the manifest's `name`; `engine` is the
/// semver requirement on millrace; `create` is a [`CreateFn`].
///
/// ```ignore
/// millrace_plugin::export_plugin!(name = "tagger", engine = ">=0.1, <0.2", create = create);
/// ```
#[macro_export]
macro_rules! export_plugin {
    (name = $name:literal, engine = $engine:literal, create = $create:path $(,)?) => {
        #[no_mangle]
        #[used]
        /// The declaration the millrace host reads.
        pub static MILLRACE_PLUGIN: $crate::abi::PluginDecl = $crate::abi::PluginDecl {
            abi_version: $crate::ABI_VERSION,
            rustc: $crate::abi::Str::new($crate::RUSTC_VERSION),
            sdk_version: $crate::abi::Str::new($crate::SDK_VERSION),
            name: $crate::abi::Str::new($name),
            version: $crate::abi::Str::new(env!("CARGO_PKG_VERSION")),
            engine: $crate::abi::Str::new($engine),
            init: $crate::rt::init,
            create: {
                unsafe extern "C" fn __millrace_create(
                    node: $crate::abi::Str,
                    params: $crate::abi::Str,
                    log: *const $crate::abi::HostLog,
                    err: *const $crate::abi::Sink,
                ) -> *mut ::std::ffi::c_void {
                    // SAFETY: forwarded unchanged from the host, which upholds the ABI contract.
                    unsafe { $crate::rt::create(node, params, log, err, $create) }
                }
                __millrace_create
            },
            process: $crate::rt::process,
            finish: $crate::rt::finish,
            destroy: $crate::rt::destroy,
            unload: $crate::rt::unload,
            caps: $crate::rt::caps,
            process_lines: $crate::rt::process_lines,
        };
    };
}

/// The plugin side of the boundary, used by [`export_plugin!`]. Not for direct use.
#[doc(hidden)]
// The plugin's own crate, linked into its image: the engine's `crate::sync` rule (clippy.toml)
// is not for it, and a `static` lock needs std's const constructor.
#[allow(clippy::disallowed_types)]
pub mod rt {
    use std::cell::Cell;
    use std::ffi::c_void;
    use std::panic::{catch_unwind, AssertUnwindSafe};
    use std::sync::RwLock;

    use log::{Level, LevelFilter, Log, Metadata, Record};

    use crate::abi::{HostLog, LineBatch, Sink, Str, CAP_LINES, ERROR, OK, PANIC};
    use crate::{AnyNode, LineNode, LineWriter, Lines, Node, Value};

    struct SinkPtr(*const HostLog);
    // SAFETY: the host keeps the plugin-wide sink alive and its `write` callable from any
    // thread until it calls `unload`, which takes the write lock before detaching it.
    unsafe impl Send for SinkPtr {}
    // SAFETY: as above.
    unsafe impl Sync for SinkPtr {}

    /// The plugin-wide sink, for logging outside calls from the host.
    static GLOBAL: RwLock<SinkPtr> = RwLock::new(SinkPtr(std::ptr::null()));

    thread_local! {
        /// The sink of the stage whose call this thread is in (const-initialised and without a
        /// destructor, so it registers no thread-local destructor in the plugin's image).
        static CURRENT: Cell<*const HostLog> = const { Cell::new(std::ptr::null()) };
    }

    struct Logger;
    static LOGGER: Logger = Logger;

    fn level_number(l: Level) -> u32 {
        l as u32 // Error = 1 ... Trace = 5, as in the ABI
    }

    /// Runs `f` with the sink that applies on this thread, if any.
    fn with_sink<R>(f: impl FnOnce(&HostLog) -> R) -> Option<R> {
        let current = CURRENT.with(Cell::get);
        if !current.is_null() {
            // SAFETY: set by `Scope` for the duration of a host call, during which the host
            // keeps the stage's sink alive.
            return Some(f(unsafe { &*current }));
        }
        let global = GLOBAL.read().unwrap_or_else(|e| e.into_inner());
        if global.0.is_null() {
            return None;
        }
        // SAFETY: the read lock keeps `unload` (which takes the write lock) from detaching the
        // sink while it is in use; the host keeps it alive until `unload` returns.
        Some(f(unsafe { &*global.0 }))
    }

    impl Log for Logger {
        fn enabled(&self, m: &Metadata<'_>) -> bool {
            with_sink(|s| level_number(m.level()) <= s.max_level).unwrap_or(false)
        }

        fn log(&self, r: &Record<'_>) {
            with_sink(|s| {
                let level = level_number(r.level());
                if level <= s.max_level {
                    let msg = r.args().to_string();
                    // SAFETY: the host's callback, called as the ABI describes.
                    unsafe { (s.write)(s.ctx, level, msg.as_ptr(), msg.len()) };
                }
            });
        }

        fn flush(&self) {}
    }

    /// Sets the thread's current sink for one host call, restoring the previous one after.
    struct Scope(*const HostLog);

    impl Scope {
        fn enter(log: *const HostLog) -> Scope {
            Scope(CURRENT.with(|c| c.replace(log)))
        }
    }

    impl Drop for Scope {
        fn drop(&mut self) {
            CURRENT.with(|c| c.set(self.0));
        }
    }

    fn write(sink: *const Sink, bytes: &[u8]) {
        if sink.is_null() {
            return;
        }
        // SAFETY: the host passes a live sink for the duration of the call.
        unsafe { ((*sink).write)((*sink).ctx, bytes.as_ptr(), bytes.len()) }
    }

    fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
        if let Some(s) = p.downcast_ref::<&str>() {
            (*s).to_string()
        } else if let Some(s) = p.downcast_ref::<String>() {
            s.clone()
        } else {
            "a panic with a non-string payload".to_string()
        }
    }

    /// Runs `f`, turning an error or a panic into a status and a message in `err`.
    fn guarded(err: *const Sink, f: impl FnOnce() -> Result<(), String>) -> i32 {
        match catch_unwind(AssertUnwindSafe(f)) {
            Ok(Ok(())) => OK,
            Ok(Err(msg)) => {
                write(err, msg.as_bytes());
                ERROR
            }
            Err(p) => {
                write(err, panic_text(&*p).as_bytes());
                PANIC
            }
        }
    }

    struct Instance {
        node: AnyNode,
        poisoned: bool,
        /// The output of the call in progress, handed to the host in one piece (reused).
        out: Vec<u8>,
        /// Record offsets of an NDJSON batch given to a line node through `process` (reused).
        offsets: Vec<usize>,
    }

    /// See [`PluginDecl::init`](crate::abi::PluginDecl::init).
    ///
    /// # Safety
    /// `log` must stay valid until `unload(log)` returns.
    pub unsafe extern "C" fn init(log: *const HostLog, err: *const Sink) -> i32 {
        guarded(err, || {
            // Fails only if this image installed it already (loaded twice): then it is ours.
            let _ = log::set_logger(&LOGGER);
            log::set_max_level(LevelFilter::Trace);
            *GLOBAL.write().unwrap_or_else(|e| e.into_inner()) = SinkPtr(log);
            Ok(())
        })
    }

    /// See [`PluginDecl::unload`](crate::abi::PluginDecl::unload).
    ///
    /// # Safety
    /// Called by the host only.
    pub unsafe extern "C" fn unload(log: *const HostLog) {
        let _ = catch_unwind(|| {
            let mut g = GLOBAL.write().unwrap_or_else(|e| e.into_inner());
            if std::ptr::eq(g.0, log) {
                g.0 = std::ptr::null();
            }
        });
    }

    /// See [`PluginDecl::create`](crate::abi::PluginDecl::create).
    ///
    /// # Safety
    /// `node` and `params` must be live UTF-8 bytes, `log` and `err` live for the call.
    pub unsafe fn create<N: Into<AnyNode>>(
        node: Str,
        params: Str,
        log: *const HostLog,
        err: *const Sink,
        create: fn(&str, &Value) -> Result<N, String>,
    ) -> *mut c_void {
        let _scope = Scope::enter(log);
        let mut made = None;
        let status = guarded(err, || {
            // SAFETY: the host passes live bytes for the duration of the call.
            let (node, params) = unsafe { (node.as_bytes(), params.as_bytes()) };
            let node = std::str::from_utf8(node).map_err(|e| format!("node name: {e}"))?;
            let params: Value = if params.is_empty() {
                Value::Object(Default::default())
            } else {
                serde_json::from_slice(params).map_err(|e| format!("parameters: {e}"))?
            };
            made = Some(create(node, &params)?.into());
            Ok(())
        });
        match (status, made) {
            (OK, Some(node)) => Box::into_raw(Box::new(Instance {
                node,
                poisoned: false,
                out: Vec::new(),
                offsets: Vec::new(),
            }))
            .cast(),
            _ => std::ptr::null_mut(),
        }
    }

    /// Runs `f` on a live, unpoisoned instance; a panic poisons it. What `f` left in the
    /// instance's output buffer goes to `out` (in one call), even after an error.
    ///
    /// # Safety
    /// `inst` must come from `create` and not be destroyed; `out` live for the call.
    unsafe fn on_instance(
        inst: *mut c_void,
        out: *const Sink,
        err: *const Sink,
        f: impl FnOnce(&mut Instance) -> Result<(), String>,
    ) -> i32 {
        // SAFETY: the caller guarantees `inst` is a live instance, used by one thread at a time.
        let inst = unsafe { &mut *inst.cast::<Instance>() };
        if inst.poisoned {
            write(err, b"the node panicked earlier and cannot be used again");
            return ERROR;
        }
        inst.out.clear();
        let status = guarded(err, || f(inst));
        if status == PANIC {
            inst.poisoned = true;
        } else if status == OK {
            write(out, &inst.out);
        }
        inst.out.clear();
        status
    }

    fn emit(out: &mut Vec<u8>, records: &[Value]) -> Result<(), String> {
        for r in records {
            serde_json::to_writer(&mut *out, r).map_err(|e| format!("output record: {e}"))?;
            out.push(b'\n');
        }
        Ok(())
    }

    /// Parses a batch's lines for a [`Node`] and runs it.
    fn values_batch<'a>(
        node: &mut dyn Node,
        lines: impl Iterator<Item = &'a [u8]>,
        out: &mut Vec<u8>,
    ) -> Result<(), String> {
        let mut records = Vec::new();
        for (i, line) in lines.enumerate() {
            let v =
                serde_json::from_slice(line).map_err(|e| format!("input record {}: {e}", i + 1))?;
            records.push(v);
        }
        let mut output = Vec::with_capacity(records.len());
        node.process(records, &mut output)?;
        emit(out, &output)
    }

    /// See [`PluginDecl::process`](crate::abi::PluginDecl::process).
    ///
    /// # Safety
    /// As the ABI describes: a live instance, live bytes and sinks for the call.
    pub unsafe extern "C" fn process(
        inst: *mut c_void,
        batch: Str,
        log: *const HostLog,
        out: *const Sink,
        err: *const Sink,
    ) -> i32 {
        let _scope = Scope::enter(log);
        // SAFETY: forwarded from the host under the same contract.
        unsafe {
            on_instance(inst, out, err, |inst| {
                // SAFETY: the host passes live bytes for the duration of the call.
                let bytes = batch.as_bytes();
                match &mut inst.node {
                    AnyNode::Values(node) => values_batch(
                        &mut **node,
                        bytes.split(|b| *b == b'\n').filter(|l| !l.is_empty()),
                        &mut inst.out,
                    ),
                    AnyNode::Lines(node) => {
                        if line_offsets(bytes, &mut inst.offsets) {
                            return lines_batch(&mut **node, bytes, &inst.offsets, &mut inst.out);
                        }
                        // Blank lines: the non-blank ones, each ending in a newline.
                        let mut compact = Vec::with_capacity(bytes.len() + 1);
                        for l in bytes.split(|b| *b == b'\n') {
                            if !l.iter().all(u8::is_ascii_whitespace) {
                                compact.extend_from_slice(l);
                                compact.push(b'\n');
                            }
                        }
                        line_offsets(&compact, &mut inst.offsets);
                        lines_batch(&mut **node, &compact, &inst.offsets, &mut inst.out)
                    }
                }
            })
        }
    }

    /// The record offsets of NDJSON text (each line with its newline) into `offsets`; false if
    /// a line is blank (then the offsets are not the records').
    fn line_offsets(bytes: &[u8], offsets: &mut Vec<usize>) -> bool {
        offsets.clear();
        offsets.push(0);
        let mut start = 0;
        while start < bytes.len() {
            let end = bytes[start..]
                .iter()
                .position(|b| *b == b'\n')
                .map_or(bytes.len(), |i| start + i + 1);
            if bytes[start..end].iter().all(u8::is_ascii_whitespace) {
                return false;
            }
            offsets.push(end);
            start = end;
        }
        true
    }

    /// Runs a [`LineNode`] on a batch (its offsets checked first).
    fn lines_batch(
        node: &mut dyn LineNode,
        data: &[u8],
        offsets: &[usize],
        out: &mut Vec<u8>,
    ) -> Result<(), String> {
        let lines = Lines::new(data, offsets)
            .ok_or("the host passed record offsets outside its batch (an ABI violation)")?;
        node.process(&lines, &mut LineWriter::new(out))
    }

    /// See [`PluginDecl::caps`](crate::abi::PluginDecl::caps).
    ///
    /// # Safety
    /// `inst` must come from `create` and not be destroyed.
    pub unsafe extern "C" fn caps(inst: *mut c_void) -> u32 {
        // SAFETY: the caller guarantees `inst` is a live instance; only its kind is read.
        let inst = unsafe { &*inst.cast::<Instance>() };
        match inst.node {
            AnyNode::Lines(_) => CAP_LINES,
            AnyNode::Values(_) => 0,
        }
    }

    /// See [`PluginDecl::process_lines`](crate::abi::PluginDecl::process_lines). A [`Node`]
    /// instance takes it too (its lines parsed as `process` parses them).
    ///
    /// # Safety
    /// As the ABI describes: a live instance; a batch whose pointers are live for the call.
    pub unsafe extern "C" fn process_lines(
        inst: *mut c_void,
        batch: *const LineBatch,
        log: *const HostLog,
        out: *const Sink,
        err: *const Sink,
    ) -> i32 {
        let _scope = Scope::enter(log);
        // SAFETY: forwarded from the host under the same contract.
        unsafe {
            on_instance(inst, out, err, |inst| {
                if batch.is_null() {
                    return Err("the host passed no batch (an ABI violation)".into());
                }
                // SAFETY: the host passes a live batch whose `data` has `len` bytes and whose
                // `offsets` has `count + 1` entries for the duration of the call.
                let (data, offsets) = {
                    let b = &*batch;
                    let data = Str {
                        ptr: b.data,
                        len: b.len,
                    }
                    .as_bytes();
                    let offsets: &[usize] = if b.offsets.is_null() {
                        &[]
                    } else {
                        std::slice::from_raw_parts(b.offsets, b.count.saturating_add(1))
                    };
                    (data, offsets)
                };
                match &mut inst.node {
                    AnyNode::Lines(node) => lines_batch(&mut **node, data, offsets, &mut inst.out),
                    AnyNode::Values(node) => {
                        let lines = Lines::new(data, offsets).ok_or(
                            "the host passed record offsets outside its batch (an ABI violation)",
                        )?;
                        values_batch(&mut **node, lines.iter(), &mut inst.out)
                    }
                }
            })
        }
    }

    /// See [`PluginDecl::finish`](crate::abi::PluginDecl::finish).
    ///
    /// # Safety
    /// As the ABI describes.
    pub unsafe extern "C" fn finish(
        inst: *mut c_void,
        log: *const HostLog,
        out: *const Sink,
        err: *const Sink,
    ) -> i32 {
        let _scope = Scope::enter(log);
        // SAFETY: forwarded from the host under the same contract.
        unsafe {
            on_instance(inst, out, err, |inst| match &mut inst.node {
                AnyNode::Values(node) => {
                    let mut output = Vec::new();
                    node.finish(&mut output)?;
                    emit(&mut inst.out, &output)
                }
                AnyNode::Lines(node) => node.finish(&mut LineWriter::new(&mut inst.out)),
            })
        }
    }

    /// See [`PluginDecl::destroy`](crate::abi::PluginDecl::destroy).
    ///
    /// # Safety
    /// `inst` must come from `create`; it is not used again.
    pub unsafe extern "C" fn destroy(inst: *mut c_void, log: *const HostLog) {
        if inst.is_null() {
            return;
        }
        let _scope = Scope::enter(log);
        // SAFETY: `inst` was made by `Box::into_raw` in `create` and is destroyed once.
        let boxed = unsafe { Box::from_raw(inst.cast::<Instance>()) };
        // A node whose drop panics is leaked rather than unwinding into the host.
        let _ = catch_unwind(AssertUnwindSafe(move || drop(boxed)));
    }
}

#[cfg(test)]
mod tests {
    use super::abi::{LineBatch, Sink, Str, CAP_LINES, ERROR, OK};
    use super::*;

    struct Echo;
    impl LineNode for Echo {
        fn process(&mut self, b: &Lines<'_>, out: &mut LineWriter<'_>) -> Result<(), String> {
            for r in b.iter() {
                out.push(r);
            }
            Ok(())
        }
    }

    fn create(_: &str, _: &Value) -> Result<AnyNode, String> {
        Ok(AnyNode::lines(Echo))
    }

    unsafe extern "C" fn append(ctx: *mut std::ffi::c_void, ptr: *const u8, len: usize) {
        // SAFETY: `ctx` is the test's `Vec<u8>`; `ptr` has `len` bytes.
        unsafe { (*ctx.cast::<Vec<u8>>()).extend_from_slice(std::slice::from_raw_parts(ptr, len)) }
    }

    fn sink(v: &mut Vec<u8>) -> Sink {
        Sink {
            ctx: (v as *mut Vec<u8>).cast(),
            write: append,
        }
    }

    /// Offsets that do not fit the batch are refused with an error, never read past it.
    #[test]
    fn line_batches_are_checked_before_use() {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        // SAFETY: the ABI's calls, made as a host makes them: live buffers for each call.
        unsafe {
            let inst = rt::create(
                Str::new("echo"),
                Str::new(""),
                std::ptr::null(),
                &sink(&mut err),
                create,
            );
            assert!(!inst.is_null());
            assert_eq!(rt::caps(inst), CAP_LINES);
            let data = b"{\"a\":1}\n{\"b\":2}\n";
            let mut call = |offsets: &[usize], count: usize| {
                out.clear();
                err.clear();
                let batch = LineBatch {
                    data: data.as_ptr(),
                    len: data.len(),
                    offsets: offsets.as_ptr(),
                    count,
                };
                let st = rt::process_lines(
                    inst,
                    &batch,
                    std::ptr::null(),
                    &sink(&mut out),
                    &sink(&mut err),
                );
                (st, out.clone(), String::from_utf8_lossy(&err).into_owned())
            };
            assert_eq!(call(&[0, 8, 16], 2), (OK, data.to_vec(), String::new()));
            assert_eq!(call(&[0], 0), (OK, Vec::new(), String::new()));
            for (offsets, count) in [(&[0usize, 8, 99][..], 2), (&[0, 9, 8][..], 2)] {
                let (st, out, err) = call(offsets, count);
                assert_eq!((st, out), (ERROR, Vec::new()), "{offsets:?}");
                assert!(err.contains("record offsets outside its batch"), "{err}");
            }
            rt::destroy(inst, std::ptr::null());
        }
    }

    #[test]
    fn lines_give_each_record_without_its_newline() {
        let data = b"{}\n{\"a\":1}\n";
        let l = Lines::new(data, &[0, 3, 11]).unwrap();
        assert_eq!(l.iter().collect::<Vec<_>>(), [&b"{}"[..], b"{\"a\":1}"]);
        assert_eq!((l.len(), l.get(2), l.bytes()), (2, None, &data[..]));
        assert!(Lines::new(data, &[]).is_none());
        assert!(Lines::new(data, &[0, 12]).is_none());
        let mut buf = Vec::new();
        let mut w = LineWriter::new(&mut buf);
        w.push(b"{}");
        w.push_with(|b| b.extend_from_slice(b"{\"x\":1}"));
        w.push_lines(b"{\"y\":2}");
        assert_eq!(buf, b"{}\n{\"x\":1}\n{\"y\":2}\n");
    }
}
