//! Records the compiler that builds the SDK, so that the host can refuse a plugin built by
//! another one (`millrace_plugin::RUSTC_VERSION`).
use std::process::Command;

fn main() {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let version = Command::new(&rustc)
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown rustc".into());
    println!("cargo:rustc-env=MILLRACE_PLUGIN_RUSTC={version}");
    println!("cargo:rerun-if-env-changed=RUSTC");
}
