//! Tumbling, sliding and session windows: each timestamp is in exactly the windows that contain it.
//! The property is `millrace::fuzzing::window`, which `tests/fuzz_corpus.rs` replays on stable.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| millrace::fuzzing::window(data));
