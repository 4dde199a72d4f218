//! An example native millrace plugin.
//!
//! - `tag` sets a field on every record (and, with `chatty = true`, logs one line at every
//!   level per batch, which shows the stage's `log_level` at work; with `batch_field`, writes
//!   there an identity of the batch and of the loaded library image, which shows hot reload
//!   never splits a batch between versions);
//! - `explode` passes records through and panics at record `after`, which shows that a panic
//!   stops only its stage, with an error naming the plugin.

use millrace_plugin::log::{debug, error, info, trace, warn};
use millrace_plugin::{export_plugin, Node, Value};

struct Tag {
    field: String,
    value: Value,
    chatty: bool,
    batches: u64,
    /// Where to write the batch's identity (this library image and the call), if anywhere.
    batch_field: Option<String>,
}

/// Distinguishes one loaded image of this library from another (hot reload loads copies).
static IMAGE: u8 = 0;
/// Calls to `process` in this image.
// A plugin crate: the engine's `crate::sync` rule (clippy.toml) is not for it.
#[allow(clippy::disallowed_types)]
static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl Node for Tag {
    fn process(&mut self, batch: Vec<Value>, out: &mut Vec<Value>) -> Result<(), String> {
        self.batches += 1;
        if self.chatty {
            let (n, b) = (batch.len(), self.batches);
            trace!("batch {b}: {n} records (trace)");
            debug!("batch {b}: {n} records (debug)");
            info!("batch {b}: {n} records (info)");
            warn!("batch {b}: {n} records (warn)");
            error!("batch {b}: {n} records (error)");
        }
        let batch_id = self.batch_field.as_ref().map(|_| {
            let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Value::String(format!("{:p}-{call}", &IMAGE))
        });
        for mut record in batch {
            match record.as_object_mut() {
                Some(o) => {
                    o.insert(self.field.clone(), self.value.clone());
                    if let (Some(f), Some(id)) = (&self.batch_field, &batch_id) {
                        o.insert(f.clone(), id.clone());
                    }
                }
                None => return Err(format!("expected a JSON object, found {record}")),
            }
            out.push(record);
        }
        Ok(())
    }
}

struct Explode {
    after: u64,
    seen: u64,
}

impl Node for Explode {
    fn process(&mut self, batch: Vec<Value>, out: &mut Vec<Value>) -> Result<(), String> {
        for record in batch {
            self.seen += 1;
            if self.seen == self.after {
                panic!("exploded at record {} as asked", self.seen);
            }
            out.push(record);
        }
        Ok(())
    }
}

fn create(node: &str, params: &Value) -> Result<Box<dyn Node>, String> {
    match node {
        "tag" => Ok(Box::new(Tag {
            field: params["field"].as_str().unwrap_or("tag").to_string(),
            value: params["value"].clone(),
            chatty: params["chatty"].as_bool().unwrap_or(false),
            batches: 0,
            batch_field: params["batch_field"].as_str().map(str::to_string),
        })),
        "explode" => Ok(Box::new(Explode {
            after: params["after"].as_u64().unwrap_or(1),
            seen: 0,
        })),
        other => Err(format!("tagger has no node `{other}`")),
    }
}

export_plugin!(name = "tagger", engine = ">=0.1, <0.2", create = create);
