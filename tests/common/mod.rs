//! Helpers shared by the tests that need the workspace's native plugins built.
// A test drives the engine from outside with std's threads and atomics: the `crate::sync`
// rule (clippy.toml) is for the engine's own code.
#![allow(clippy::disallowed_types, clippy::disallowed_methods)]
#![allow(dead_code)] // each test binary uses its own subset

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

pub(crate) fn repo(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

/// Builds the workspace's plugin crates (once per test binary) into the same profile directory
/// as this test, and returns that directory.
pub(crate) fn built() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        // <target>/<profile>/deps/native-<hash>
        let exe = std::env::current_exe().unwrap();
        let profile_dir = exe.parent().unwrap().parent().unwrap().to_path_buf();
        let target = profile_dir.parent().unwrap().to_path_buf();
        let profile = profile_dir
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.current_dir(env!("CARGO_MANIFEST_DIR"))
            .env("CARGO_TARGET_DIR", &target)
            .args(["build", "--quiet"]);
        if profile == "release" {
            cmd.arg("--release");
        }
        for p in [
            "millrace-tagger",
            "millrace-casefold",
            "millrace-counter",
            "millrace-test-bad_abi",
            "millrace-test-bad_engine",
            "millrace-test-linetest",
            "millrace-test-abi_v1",
            "millrace-test-faulty",
        ] {
            cmd.args(["-p", p]);
        }
        let status = cmd.status().expect("cargo runs");
        assert!(status.success(), "building the plugins failed: {status}");
        profile_dir
    })
}

pub(crate) fn lib(name: &str) -> PathBuf {
    built().join(format!("lib{name}.so"))
}

/// Writes `<root>/<dir>/plugin.toml`: the bundled manifest text `manifest` with its `entry`
/// pointing at the built library `lib_name`.
pub(crate) fn install(root: &Path, dir: &str, manifest: &str, lib_name: &str) {
    let d = root.join(dir);
    std::fs::create_dir_all(&d).unwrap();
    let text: String = manifest
        .lines()
        .map(|l| {
            if l.starts_with("entry = ") {
                format!("entry = {:?}", lib(lib_name).display().to_string())
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(d.join("plugin.toml"), text).unwrap();
}

pub(crate) fn bundled(name: &str) -> String {
    std::fs::read_to_string(repo(&format!("plugins/{name}/plugin.toml"))).unwrap()
}
