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
/// [`abi`] changes; a host refuses a plugin whose number differs.
pub const ABI_VERSION: u32 = 1;

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

/// The signature of a plugin's constructor: the node's name and its parameters (a JSON object,
/// already checked against the manifest by the host).
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

    /// The plugin's declaration, exported as `MILLRACE_PLUGIN`.
    ///
    /// `abi_version` comes first and stays first in every ABI version: the host reads it
    /// before anything else and reads nothing more if it differs.
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
    }

    // SAFETY: a declaration is immutable static data: pointers to `'static` strings and
    // functions. Sharing it between threads shares nothing mutable.
    unsafe impl Sync for PluginDecl {}
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

    use crate::abi::{HostLog, Sink, Str, ERROR, OK, PANIC};
    use crate::{CreateFn, Node, Value};

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
        node: Box<dyn Node>,
        poisoned: bool,
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
    pub unsafe fn create(
        node: Str,
        params: Str,
        log: *const HostLog,
        err: *const Sink,
        create: CreateFn,
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
            made = Some(create(node, &params)?);
            Ok(())
        });
        match (status, made) {
            (OK, Some(node)) => Box::into_raw(Box::new(Instance {
                node,
                poisoned: false,
            }))
            .cast(),
            _ => std::ptr::null_mut(),
        }
    }

    /// Runs `f` on a live, unpoisoned instance; a panic poisons it.
    ///
    /// # Safety
    /// `inst` must come from `create` and not be destroyed.
    unsafe fn on_instance(
        inst: *mut c_void,
        err: *const Sink,
        f: impl FnOnce(&mut dyn Node) -> Result<(), String>,
    ) -> i32 {
        // SAFETY: the caller guarantees `inst` is a live instance, used by one thread at a time.
        let inst = unsafe { &mut *inst.cast::<Instance>() };
        if inst.poisoned {
            write(err, b"the node panicked earlier and cannot be used again");
            return ERROR;
        }
        let status = guarded(err, || f(&mut *inst.node));
        if status == PANIC {
            inst.poisoned = true;
        }
        status
    }

    fn emit(out: *const Sink, records: &[Value]) -> Result<(), String> {
        let mut bytes = Vec::with_capacity(records.len() * 64);
        for r in records {
            serde_json::to_writer(&mut bytes, r).map_err(|e| format!("output record: {e}"))?;
            bytes.push(b'\n');
        }
        write(out, &bytes);
        Ok(())
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
            on_instance(inst, err, |node| {
                // SAFETY: the host passes live bytes for the duration of the call.
                let bytes = batch.as_bytes();
                let mut records = Vec::new();
                for (i, line) in bytes.split(|b| *b == b'\n').enumerate() {
                    if !line.is_empty() {
                        let v = serde_json::from_slice(line)
                            .map_err(|e| format!("input record {}: {e}", i + 1))?;
                        records.push(v);
                    }
                }
                let mut output = Vec::with_capacity(records.len());
                node.process(records, &mut output)?;
                emit(out, &output)
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
            on_instance(inst, err, |node| {
                let mut output = Vec::new();
                node.finish(&mut output)?;
                emit(out, &output)
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
