//! NDJSON round trip: whatever the reader accepts, written back and read again, is the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use millrace::Pipeline;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.ndjson");
    std::fs::write(&input, data).unwrap();
    let p = Pipeline::new();
    let first = p.read_ndjson::<Value>(&input).collect();
    if p.run().is_err() {
        return; // Malformed input is reported, not a crash.
    }
    let first = first.take();
    let again = dir.path().join("again.ndjson");
    let p = Pipeline::new();
    p.source("values", first.clone()).write_ndjson(&again);
    p.run().unwrap();
    let p = Pipeline::new();
    let second = p.read_ndjson::<Value>(&again).collect();
    p.run().unwrap();
    assert_eq!(first, second.take());
});
