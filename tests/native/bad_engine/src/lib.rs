//! A plugin that asks for a millrace version that does not exist yet: the host must refuse it.

use millrace_plugin::{export_plugin, Node, Value};

fn create(node: &str, _params: &Value) -> Result<Box<dyn Node>, String> {
    Err(format!("never called (node `{node}`)"))
}

export_plugin!(name = "bad_engine", engine = ">=99.0", create = create);
