//! Window assigners: which windows an event time belongs to.
//!
//! | assigner | windows of an event at `t` |
//! | --- | --- |
//! | [`Tumbling`] `{ size, offset }` | the one `[s, s + size)` with `s ≡ offset (mod size)` and `s ≤ t` |
//! | [`Sliding`] `{ size, slide, offset }` | every `[s, s + size)` with `s ≡ offset (mod slide)` that contains `t` |
//! | [`Session`] `{ gap }` | `[t, t + gap)`, merged with the windows it overlaps |
//!
//! All arithmetic floors (`rem_euclid`), so negative timestamps behave like positive ones, and
//! membership is always decided by [`Window::contains`](crate::Window::contains).

mod assign;

pub use assign::{AssignerError, Session, Sliding, Tumbling};
