//! A plugin that claims another ABI version: the host must refuse it before reading anything
//! else of its declaration.

use millrace_plugin::abi::{PluginDecl, Str};
use millrace_plugin::rt;

fn create(
    node: &str,
    _params: &millrace_plugin::Value,
) -> Result<Box<dyn millrace_plugin::Node>, String> {
    Err(format!("never called (node `{node}`)"))
}

unsafe extern "C" fn create_c(
    node: Str,
    params: Str,
    log: *const millrace_plugin::abi::HostLog,
    err: *const millrace_plugin::abi::Sink,
) -> *mut std::ffi::c_void {
    // SAFETY: forwarded unchanged from the host (never reached: the host refuses this plugin).
    unsafe { rt::create(node, params, log, err, create) }
}

/// The declaration, with an ABI version from the future.
#[no_mangle]
#[used]
pub static MILLRACE_PLUGIN: PluginDecl = PluginDecl {
    abi_version: millrace_plugin::ABI_VERSION + 1000,
    rustc: Str::new(millrace_plugin::RUSTC_VERSION),
    sdk_version: Str::new(millrace_plugin::SDK_VERSION),
    name: Str::new("bad_abi"),
    version: Str::new("0.1.0"),
    engine: Str::new(">=0.1"),
    init: rt::init,
    create: create_c,
    process: rt::process,
    finish: rt::finish,
    destroy: rt::destroy,
    unload: rt::unload,
    caps: rt::caps,
    process_lines: rt::process_lines,
};
