//! The job server's request parser never panics and answers with the documented statuses.
//! The property is `millrace::fuzzing::http_request`, which `tests/fuzz_corpus.rs` replays on stable.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| millrace::fuzzing::http_request(data));
