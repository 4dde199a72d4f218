//! Nodes on the line path and their twins on the value path, for millrace's tests
//! (`tests/native.rs`):
//!
//! - `echo`: passes every record through (one copy of the whole batch);
//! - `drop` / `drop_values`: keeps every `every`-th record of the instance (the first, the
//!   `every + 1`-th, ...);
//! - `dup` / `dup_values`: emits each record `times` times, then at the end of input one
//!   `{"seen": n}`;
//! - `garbage`: passes records through but replaces record `at` of the instance with a bad
//!   line: `mode` = `not_json`, `not_utf8`, `not_object` or `two_lines` (an object split over
//!   two lines).

use millrace_plugin::{export_plugin, AnyNode, LineNode, LineWriter, Lines, Node, Value};

struct Echo;

impl LineNode for Echo {
    fn process(&mut self, batch: &Lines<'_>, out: &mut LineWriter<'_>) -> Result<(), String> {
        out.push_lines(batch.bytes());
        Ok(())
    }
}

struct Keep {
    every: u64,
    seen: u64,
}

impl Keep {
    fn keep(&mut self) -> bool {
        self.seen += 1;
        (self.seen - 1).is_multiple_of(self.every)
    }
}

impl LineNode for Keep {
    fn process(&mut self, batch: &Lines<'_>, out: &mut LineWriter<'_>) -> Result<(), String> {
        for r in batch.iter() {
            if self.keep() {
                out.push(r);
            }
        }
        Ok(())
    }
}

impl Node for Keep {
    fn process(&mut self, batch: Vec<Value>, out: &mut Vec<Value>) -> Result<(), String> {
        for r in batch {
            if self.keep() {
                out.push(r);
            }
        }
        Ok(())
    }
}

struct Dup {
    times: u64,
    seen: u64,
}

impl LineNode for Dup {
    fn process(&mut self, batch: &Lines<'_>, out: &mut LineWriter<'_>) -> Result<(), String> {
        for r in batch.iter() {
            self.seen += 1;
            for _ in 0..self.times {
                out.push(r);
            }
        }
        Ok(())
    }

    fn finish(&mut self, out: &mut LineWriter<'_>) -> Result<(), String> {
        out.push(format!("{{\"seen\":{}}}", self.seen).as_bytes());
        Ok(())
    }
}

impl Node for Dup {
    fn process(&mut self, batch: Vec<Value>, out: &mut Vec<Value>) -> Result<(), String> {
        for r in batch {
            self.seen += 1;
            for _ in 0..self.times {
                out.push(r.clone());
            }
        }
        Ok(())
    }

    fn finish(&mut self, out: &mut Vec<Value>) -> Result<(), String> {
        out.push(millrace_plugin::serde_json::json!({ "seen": self.seen }));
        Ok(())
    }
}

struct Garbage {
    at: u64,
    seen: u64,
    mode: String,
}

impl LineNode for Garbage {
    fn process(&mut self, batch: &Lines<'_>, out: &mut LineWriter<'_>) -> Result<(), String> {
        for r in batch.iter() {
            self.seen += 1;
            if self.seen != self.at {
                out.push(r);
                continue;
            }
            match self.mode.as_str() {
                "not_json" => out.push(b"{\"a\":"),
                "not_utf8" => out.push(b"{\"a\":\"\xff\"}"),
                "not_object" => out.push(b"[1,2]"),
                "two_lines" => out.push(b"{\"a\":\n1}"),
                other => return Err(format!("no mode `{other}`")),
            }
        }
        Ok(())
    }
}

fn create(node: &str, params: &Value) -> Result<AnyNode, String> {
    let every = params["every"].as_u64().unwrap_or(2).max(1);
    let times = params["times"].as_u64().unwrap_or(2);
    Ok(match node {
        "echo" => AnyNode::lines(Echo),
        "drop" => AnyNode::lines(Keep { every, seen: 0 }),
        "drop_values" => AnyNode::values(Keep { every, seen: 0 }),
        "dup" => AnyNode::lines(Dup { times, seen: 0 }),
        "dup_values" => AnyNode::values(Dup { times, seen: 0 }),
        "garbage" => AnyNode::lines(Garbage {
            at: params["at"].as_u64().unwrap_or(1),
            seen: 0,
            mode: params["mode"].as_str().unwrap_or("not_json").to_string(),
        }),
        other => return Err(format!("no node `{other}`")),
    })
}

export_plugin!(name = "linetest", engine = ">=0.1", create = create);
