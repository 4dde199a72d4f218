//! The sandbox parameters of `exec` and plugin node stages: `limits = { ... }`, and the
//! Landlock / seccomp policy a plugin's grants give (see [`crate::sandbox`]).

use toml::Spanned;

use super::kinds::Params;
use super::{ConfigError, ConfigErrorKind};
use crate::sandbox::Limits;
#[cfg(feature = "plugin")]
use crate::sandbox::Policy;

impl Params<'_> {
    /// `limits = { address_space = "512MiB", cpu_seconds = 10, open_files = 256 }`.
    pub(crate) fn opt_limits(&mut self) -> Result<Limits, ConfigError> {
        match self.get("limits").map(Spanned::get_ref) {
            None => Ok(Limits::default()),
            Some(toml::Value::Table(t)) => Limits::from_table(t).map_err(|e| {
                let kind = if crate::sandbox::LIMIT_KEYS.contains(&e.key.as_str()) {
                    ConfigErrorKind::BadValue
                } else {
                    ConfigErrorKind::UnknownParameter
                };
                self.error_at("limits", kind, format!("parameter {e}"))
            }),
            Some(other) => Err(self.wrong(
                "limits",
                "a table such as { cpu_seconds = 10, address_space = \"512MiB\" }",
                other,
            )),
        }
    }
}

/// A plugin node stage's limits (the stage's `limits` over the manifest's `[limits]`) and its
/// sandbox: what the granted permissions open.
#[cfg(feature = "plugin")]
pub(super) fn plugin_sandbox(
    p: &mut Params<'_>,
    plugin: &crate::plugin::Plugin,
    grant: &[String],
) -> Result<(Limits, Option<Policy>), ConfigError> {
    let limits = p.opt_limits()?.or(&plugin.manifest.limits);
    let granted = |perm: &str| grant.iter().any(|g| g == perm);
    let policy = Policy {
        plugin_dir: plugin.dir.clone(),
        write_dir: p.resolve_dir("."),
        fs_read: granted("filesystem.read"),
        fs_write: granted("filesystem.write"),
        network: granted("network"),
    };
    Ok((limits, Some(policy)))
}
