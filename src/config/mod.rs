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
mod checkpoint;
pub(crate) mod kinds;
mod limits;
mod live_map;
mod palette;
mod parse;
mod project;
mod reload;
pub mod spark;
mod stages;
mod window_kind;

pub use crate::error::{ConfigError, ConfigErrorKind};
pub use kinds::KINDS;
pub use palette::kinds_json;
pub use parse::{PipelineSpec, StageSpec};
pub use reload::{ReloadEvent, ReloadHandle, WatchError, Watcher};
