//! An example native millrace plugin with state: `count` counts records per key and emits the
//! counts in `finish`, when its input ends. Nothing is emitted before that, so a host that drops
//! an instance without finishing it loses every count the instance holds (hot reload hands the
//! old instance's counts over by finishing it before the new one sees a record).

use std::collections::BTreeMap;

use millrace_plugin::{export_plugin, Node, Value};

struct Count {
    key: String,
    label: Option<String>,
    /// Counts by the key's value, as JSON text (a `Value` is not `Ord`).
    counts: BTreeMap<String, u64>,
}

impl Node for Count {
    fn process(&mut self, batch: Vec<Value>, _out: &mut Vec<Value>) -> Result<(), String> {
        for record in &batch {
            let key = record.get(&self.key).unwrap_or(&Value::Null).to_string();
            *self.counts.entry(key).or_insert(0) += 1;
        }
        Ok(())
    }

    fn finish(&mut self, out: &mut Vec<Value>) -> Result<(), String> {
        for (key, count) in std::mem::take(&mut self.counts) {
            let key: Value =
                millrace_plugin::serde_json::from_str(&key).map_err(|e| e.to_string())?;
            let mut o = millrace_plugin::serde_json::Map::new();
            o.insert("key".into(), key);
            o.insert("count".into(), count.into());
            if let Some(l) = &self.label {
                o.insert("label".into(), Value::String(l.clone()));
            }
            out.push(Value::Object(o));
        }
        Ok(())
    }
}

fn create(node: &str, params: &Value) -> Result<Box<dyn Node>, String> {
    match node {
        "count" => Ok(Box::new(Count {
            key: params["key"].as_str().unwrap_or_default().to_string(),
            label: params["label"].as_str().map(str::to_string),
            counts: BTreeMap::new(),
        })),
        other => Err(format!("counter has no node `{other}`")),
    }
}

export_plugin!(name = "counter", engine = ">=0.1, <0.2", create = create);
