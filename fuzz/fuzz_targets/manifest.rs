//! A `plugin.toml` parses or fails with a message; it never panics.
//! The property is `millrace::fuzzing::manifest`, which `tests/fuzz_corpus.rs` replays on stable.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| millrace::fuzzing::manifest(data));
