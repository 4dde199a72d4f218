//! The byte path's NDJSON scanner and serde_json agree, line by line, on what is an object.
//! The property is `millrace::fuzzing::ndjson`, which `tests/fuzz_corpus.rs` replays on stable.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| millrace::fuzzing::ndjson(data));
