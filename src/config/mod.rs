//! TOML pipelines (placeholder).

/// A pipeline file error.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(String);

impl ConfigError {
    /// The stage the error is about.
    pub fn stage(&self) -> Option<&str> {
        None
    }
}
