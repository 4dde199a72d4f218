//! TOML pipelines: parse a pipeline file, validate it completely, and build it into a typed
//! [`Pipeline`](crate::Pipeline) of JSON-object records.
//!
//! Every error names the file, the line (where there is one) and the stage. Validation covers
//! syntax, unknown kinds, unknown or mistyped parameters, dangling inputs, cycles and missing
//! input files, all before anything runs.
//!
//! ```
//! let toml = r#"
//! [stages.read]
//! kind = "lines.read"
//! path = "Cargo.toml"
//!
//! [stages.first]
//! kind = "limit"
//! input = "read"
//! n = 1
//!
//! [stages.out]
//! kind = "ndjson.write"
//! input = "first"
//! path = "/dev/null"
//! "#;
//! let spec = millrace::config::PipelineSpec::from_str(toml, "inline.toml").unwrap();
//! let report = spec.build().unwrap().run().unwrap();
//! assert_eq!(report.stage("out").unwrap().records_out, 1);
//! ```

mod build;
pub(crate) mod kinds;
mod limits;
mod live_map;
mod parse;
mod reload;
mod stages;
mod window_kind;

use std::fmt;
use std::path::{Path, PathBuf};

pub use kinds::KINDS;
pub use parse::{PipelineSpec, StageSpec};
pub use reload::{ReloadEvent, ReloadHandle, Watcher};

/// A pipeline file that cannot be loaded, validated or built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The pipeline file.
    pub file: PathBuf,
    /// The 1-based line the error is about, when known.
    pub line: Option<usize>,
    /// The stage the error is about, when there is one.
    pub stage_name: Option<String>,
    /// What is wrong.
    pub message: String,
}

impl ConfigError {
    pub(crate) fn new(
        file: &Path,
        line: Option<usize>,
        stage: Option<&str>,
        message: impl Into<String>,
    ) -> Self {
        ConfigError {
            file: file.to_path_buf(),
            line,
            stage_name: stage.map(str::to_string),
            message: message.into(),
        }
    }

    /// The stage the error is about, when there is one.
    pub fn stage(&self) -> Option<&str> {
        self.stage_name.as_deref()
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if let Some(stage) = &self.stage_name {
            write!(f, ": stage `{stage}`")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}
