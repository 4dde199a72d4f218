//! An example native millrace plugin: `upper` upper-cases a string field.

use millrace_plugin::log::{debug, error, info, trace, warn};
use millrace_plugin::{export_plugin, Node, Value};

struct Upper {
    field: String,
    chatty: bool,
}

impl Node for Upper {
    fn process(&mut self, mut batch: Vec<Value>, out: &mut Vec<Value>) -> Result<(), String> {
        if self.chatty {
            let n = batch.len();
            trace!("{n} records (trace)");
            debug!("{n} records (debug)");
            info!("{n} records (info)");
            warn!("{n} records (warn)");
            error!("{n} records (error)");
        }
        for record in &mut batch {
            if let Some(Value::String(s)) = record.get_mut(&self.field) {
                *s = s.to_uppercase();
            }
        }
        out.append(&mut batch);
        Ok(())
    }
}

fn create(node: &str, params: &Value) -> Result<Box<dyn Node>, String> {
    match node {
        "upper" => Ok(Box::new(Upper {
            field: params["field"].as_str().unwrap_or_default().to_string(),
            chatty: params["chatty"].as_bool().unwrap_or(false),
        })),
        other => Err(format!("casefold has no node `{other}`")),
    }
}

export_plugin!(name = "casefold", engine = ">=0.1, <0.2", create = create);
