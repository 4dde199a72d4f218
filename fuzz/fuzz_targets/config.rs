//! Pipeline text (lossily decoded) validates or fails naming `fuzz.toml`; nothing is built or run.
//! The property is `millrace::fuzzing::config`, which `tests/fuzz_corpus.rs` replays on stable.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| millrace::fuzzing::config(data));
