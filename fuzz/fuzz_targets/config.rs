//! Any text given as a pipeline file either validates or fails with an error that names the
//! file; it never panics. A pipeline that validates also builds.
#![no_main]

use libfuzzer_sys::fuzz_target;
use millrace::config::PipelineSpec;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match PipelineSpec::from_str(text, "fuzz.toml") {
        Ok(spec) => {
            // Validation passed: building must not fail on structure.
            let _ = spec.to_dot();
            spec.build().expect("a validated pipeline builds");
        }
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.starts_with("fuzz.toml"), "error without the file name: {msg}");
        }
    }
});
