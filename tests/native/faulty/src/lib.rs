//! A native plugin that fails on purpose, for the fault suite (`tests/faults.rs`):
//!
//! - `panic` passes records through and panics at record `at` of its instance (`during =
//!   "process"`), at the end of its input (`"finish"`), when it is created (`"create"`), or when
//!   it is dropped (`"drop"`, after passing every record): the SDK must catch each, so that no
//!   panic unwinds across the C boundary;
//! - `fail` passes records through and returns an error at record `at` (the ERROR status).

use millrace_plugin::{export_plugin, Node, Value};

struct Panic {
    at: u64,
    seen: u64,
    during: String,
}

impl Node for Panic {
    fn process(&mut self, batch: Vec<Value>, out: &mut Vec<Value>) -> Result<(), String> {
        for record in batch {
            self.seen += 1;
            if self.during == "process" && self.seen == self.at {
                panic!("faulty panic at record {}", self.seen);
            }
            out.push(record);
        }
        Ok(())
    }

    fn finish(&mut self, _out: &mut Vec<Value>) -> Result<(), String> {
        if self.during == "finish" {
            panic!("faulty panic in finish after {} records", self.seen);
        }
        Ok(())
    }
}

impl Drop for Panic {
    fn drop(&mut self) {
        if self.during == "drop" {
            panic!("faulty panic in drop after {} records", self.seen);
        }
    }
}

struct Fail {
    at: u64,
    seen: u64,
}

impl Node for Fail {
    fn process(&mut self, batch: Vec<Value>, out: &mut Vec<Value>) -> Result<(), String> {
        for record in batch {
            self.seen += 1;
            if self.seen == self.at {
                return Err(format!("faulty error at record {}", self.seen));
            }
            out.push(record);
        }
        Ok(())
    }
}

fn create(node: &str, params: &Value) -> Result<Box<dyn Node>, String> {
    let at = params["at"].as_u64().unwrap_or(1);
    match node {
        "panic" => {
            let during = params["during"].as_str().unwrap_or("process").to_string();
            if during == "create" {
                panic!("faulty panic in create");
            }
            Ok(Box::new(Panic {
                at,
                seen: 0,
                during,
            }))
        }
        "fail" => Ok(Box::new(Fail { at, seen: 0 })),
        other => Err(format!("no node `{other}`")),
    }
}

export_plugin!(name = "faulty", engine = ">=0.1", create = create);
