//! A plugin whose declaration is ABI version 1's (`PluginDeclV1`, without the line path), as
//! a plugin built before ABI 2 has: the host must still load and run it, on the NDJSON path.
//! `echo` passes its records through with `"v1": true` added.

use millrace_plugin::abi::{HostLog, PluginDeclV1, Sink, Str};
use millrace_plugin::{rt, Node, Value};

struct Echo;

impl Node for Echo {
    fn process(&mut self, batch: Vec<Value>, out: &mut Vec<Value>) -> Result<(), String> {
        for mut r in batch {
            r["v1"] = Value::Bool(true);
            out.push(r);
        }
        Ok(())
    }
}

fn create(node: &str, _params: &Value) -> Result<Box<dyn Node>, String> {
    match node {
        "echo" => Ok(Box::new(Echo)),
        other => Err(format!("no node `{other}`")),
    }
}

unsafe extern "C" fn create_c(
    node: Str,
    params: Str,
    log: *const HostLog,
    err: *const Sink,
) -> *mut std::ffi::c_void {
    // SAFETY: forwarded unchanged from the host, which upholds the ABI contract.
    unsafe { rt::create(node, params, log, err, create) }
}

/// The declaration, in ABI version 1's layout.
#[no_mangle]
#[used]
pub static MILLRACE_PLUGIN: PluginDeclV1 = PluginDeclV1 {
    abi_version: 1,
    rustc: Str::new(millrace_plugin::RUSTC_VERSION),
    sdk_version: Str::new(millrace_plugin::SDK_VERSION),
    name: Str::new("abi_v1"),
    version: Str::new("0.1.0"),
    engine: Str::new(">=0.1"),
    init: rt::init,
    create: create_c,
    process: rt::process,
    finish: rt::finish,
    destroy: rt::destroy,
    unload: rt::unload,
};
