//! Window assigners: which windows an event time belongs to.
//!
//! | assigner | windows of an event at `t` |
//! | --- | --- |
//! | [`Tumbling`] `{ size, offset }` | the one `[s, s + size)` with `s ≡ offset (mod size)` and `s ≤ t` |
//! | [`Sliding`] `{ size, slide, offset }` | every `[s, s + size)` with `s ≡ offset (mod slide)` that contains `t` |
//! | [`Session`] `{ gap }` | `[t, t + gap)`, merged with the windows it overlaps |
//!
//! [`BoundedOutOfOrderness`] generates watermarks at a source and [`WatermarkTracker`] combines
//! them over a stage's inputs (minimum, idle inputs released, ended inputs at +∞).
//! [`WindowState`] is the keyed window state machine (fire on watermark, allowed lateness,
//! late records returned and counted) with the [`Aggregate`] trait and built-in aggregates.
//!
//! All arithmetic floors (`rem_euclid`), so negative timestamps behave like positive ones, and
//! membership is always decided by [`Window::contains`](crate::Window::contains).

mod aggregate;
mod assign;
pub(crate) mod combine;
mod operator;
pub(crate) mod stage;
mod watermark;

pub use aggregate::{Aggregate, Count, Max, Mean, Min, On, Sum};
pub use assign::{AssignerError, Session, Sliding, Tumbling};
pub(crate) use operator::FixedKeys;
pub use operator::{Assigner, WindowOutput, WindowResult, WindowState};
pub(crate) use stage::WindowLive;
pub use stage::{EventTime, LateRecord, OnError, TimeError, WindowSpec};
pub use watermark::{BoundedOutOfOrderness, WatermarkTracker};
